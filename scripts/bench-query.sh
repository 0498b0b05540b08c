#!/usr/bin/env bash
# Query benchmark: release build; generate at least --gb GB (default 2) of captured
# traffic as Parquet with the real recorder (reused when already there); start
# `cloudtapd all` on it; time six queries through cloudtap's HTTP endpoint and through
# DuckDB's Python API on the same files; print the ratios and the session lookup's
# pruning metrics from EXPLAIN ANALYZE. Not part of the tests.
#   scripts/bench-query.sh [--gb N] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
gb=2
runs=5
while [ $# -gt 0 ]; do
  case "$1" in
    --gb) gb="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
cache="${CLOUDTAP_CACHE:-$HOME/.cache/cloudtap}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
cargo build --release --locked -p cloudtap-cli -p cloudtap-bench --bins
bin="$CARGO_TARGET_DIR/release"

venv="$cache/venv"
if ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet duckdb==1.4.2
fi

data="$cache/bench-query-${gb}gb"
if [ ! -s "$data/sample_session" ]; then
  rm -rf "$data"
  mkdir -p "$data"
  echo "==> generating ${gb} GB of captured traffic into $data/archive"
  "$bin/cloudtap-bench-query-gen" --dir "$data" --gb "$gb"
fi
echo "==> archive: $(du -sh "$data/archive" | cut -f1) in $(find "$data/archive" -name '*.parquet' | wc -l) Parquet files"

rm -f "$data/endpoints.json"
"$bin/cloudtapd" all --data-dir "$data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --tunnel-addr 127.0.0.1:0 >"$data/cloudtapd.out" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q '^ready' "$data/cloudtapd.out" 2>/dev/null && break
  sleep 0.1
done
grep -q '^ready' "$data/cloudtapd.out" || { cat "$data/cloudtapd.out"; exit 1; }
http="http://$("$venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$data/endpoints.json")"
token=$(CLOUDTAP_DATA_DIR="$data" "$bin/cloudtapctl" -o json token issue --subject dev-admin --ttl 1h \
  | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
echo "==> cloudtapd all at $http; $(nproc) cores"
"$venv/bin/python" scripts/bench_query.py --http "$http" --token "$token" \
  --archive "$data/archive" --session "$(cat "$data/sample_session")" --runs "$runs"
