#!/usr/bin/env bash
# Tunnel benchmark: release build, then cloudtap-bench (see benches/src/main.rs), which
# prints every figure beside a baseline measured in the same run. Not part of the tests.
#   scripts/bench.sh [--bytes N] [--round-trips N] [--idle-streams N]
# TMPFS_DIR (default /dev/shm) and DISK_DIR (default: a folder under the cache dir)
# choose where the traffic log lives for the tmpfs and the disk runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CLOUDTAP_CACHE:-$HOME/.cache/cloudtap}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
cargo build --release --locked -p cloudtap-cli -p cloudtap-bench --bins
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
disk="${DISK_DIR:-$cache/bench-disk}"
mkdir -p "$disk"
"$CARGO_TARGET_DIR/release/cloudtap-bench" \
  --cloudtapd "$CARGO_TARGET_DIR/release/cloudtapd" \
  --cloudtapctl "$CARGO_TARGET_DIR/release/cloudtapctl" \
  --tmpfs "${TMPFS_DIR:-/dev/shm}" --disk "$disk" "$@"
