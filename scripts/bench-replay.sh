#!/usr/bin/env bash
# Replay benchmark (issue 7): release build, then cloudtap-bench-replay (see
# benches/src/replay.rs), which prints the replay rate at --speed max beside the
# capture rate of the same session, measured in the same run. Not part of the tests.
#   scripts/bench-replay.sh [--requests N] [--concurrency C]
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CLOUDTAP_CACHE:-$HOME/.cache/cloudtap}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
cargo build --release --locked --workspace --bins
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
"$CARGO_TARGET_DIR/release/cloudtap-bench-replay" \
  --cloudtapd "$CARGO_TARGET_DIR/release/cloudtapd" \
  --cloudtapctl "$CARGO_TARGET_DIR/release/cloudtapctl" \
  --dir "$cache/bench-replay" "$@"
