#!/usr/bin/env bash
# Log and archive benchmark: release build, the test services started on free ports
# (scripts/services.sh), then cloudtap-bench-log (see benches/src/log.rs), which prints
# every figure beside a baseline measured in the same run. Not part of the tests.
#   scripts/bench-log.sh [--events N] [--frames-mb N]
# DISK_DIR (default: a folder under the cache dir) is where the log and archive live.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CLOUDTAP_CACHE:-$HOME/.cache/cloudtap}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
cargo build --release --locked -p cloudtap-bench --bin cloudtap-bench-log
services_dir="$cache/bench-services-$$"
trap 'scripts/services.sh stop "$services_dir" >/dev/null || true' EXIT
eval "$(scripts/services.sh start "$services_dir")"
disk="${DISK_DIR:-$cache/bench-disk}"
mkdir -p "$disk"
"$CARGO_TARGET_DIR/release/cloudtap-bench-log" --disk "$disk" \
  --kafka "$CLOUDTAP_TEST_KAFKA" \
  --s3-endpoint "$CLOUDTAP_TEST_S3_ENDPOINT" --s3-key "$CLOUDTAP_TEST_S3_ACCESS_KEY" \
  --s3-secret "$CLOUDTAP_TEST_S3_SECRET_KEY" --s3-bucket "$CLOUDTAP_TEST_S3_BUCKET" "$@"
