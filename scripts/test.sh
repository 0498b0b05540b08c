#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only the Rust toolchain.
#
# - Builds and tests in the dev profile with a target dir shared outside the clone
#   ($CLOUDTAP_CACHE, default ~/.cache/cloudtap), so a second run reuses the build.
# - Starts the real services the tests need through scripts/services.sh (an
#   S3-compatible server and a Kafka-protocol broker, installed from crates.io into
#   the cache when missing) and stops them afterwards, also on failure.
# - Installs the Python packages the external-reader checks use (duckdb, and ADBC's
#   Flight SQL driver with pyarrow) into a virtualenv in the cache, Debian's tshark,
#   and the npm packages har-schema and ajv (HAR 1.2 validation) into the cache.
# - Prints the test runner's own summary lines; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${CLOUDTAP_CACHE:-$HOME/.cache/cloudtap}"
mkdir -p "$cache"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

start=$(date +%s)
echo "==> building tests (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --locked

echo "==> starting services"
services_dir="$cache/services-$$"
stop_services() { scripts/services.sh stop "$services_dir" || true; }
trap stop_services EXIT
eval "$(scripts/services.sh start "$services_dir")"

venv="$cache/venv"
if ! "$venv/bin/python" -c 'import duckdb, adbc_driver_flightsql, pyarrow' 2>/dev/null; then
  echo "==> installing duckdb, adbc-driver-flightsql and pyarrow into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet duckdb==1.4.2 adbc-driver-flightsql==1.13.0 \
    adbc-driver-manager==1.13.0 pyarrow==26.0.1
fi
export CLOUDTAP_TEST_PYTHON="$venv/bin/python"

# The bundle tests open exports in the tools people have: Debian's tshark (Wireshark's
# command line) and a HAR 1.2 JSON Schema validator (npm: har-schema with ajv).
if ! command -v tshark >/dev/null 2>&1; then
  echo "==> installing tshark (Debian package)"
  sudo_="" ; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tshark >/dev/null \
    || { $sudo_ apt-get update >/dev/null && $sudo_ env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y --no-install-recommends tshark >/dev/null; }
fi
export CLOUDTAP_TEST_TSHARK="$(command -v tshark)"
npm_dir="$cache/npm"
if [ ! -f "$npm_dir/node_modules/har-schema/package.json" ] || [ ! -f "$npm_dir/node_modules/ajv/package.json" ]; then
  echo "==> installing har-schema and ajv into $npm_dir"
  mkdir -p "$npm_dir"
  (cd "$npm_dir" && npm install --silent --no-audit --no-fund --no-save har-schema@2.0.0 ajv@6.12.6 >/dev/null)
fi
export CLOUDTAP_TEST_NODE_PATH="$npm_dir/node_modules"

echo "==> running tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --failure-output final
else
  cargo test --workspace --locked --no-fail-fast
fi
echo "==> test suite finished in $(( $(date +%s) - start ))s"
