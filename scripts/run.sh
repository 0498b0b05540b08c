#!/usr/bin/env bash
# cloudtap's main job on the embedded default: builds cloudtapd and cloudtapctl
# (release), puts them in ./bin and on PATH (~/.cargo/bin, or $CLOUDTAP_BIN_DIR), then
# runs `cloudtapd all`: local traffic log and development certificates in the data dir
# (~/.local/share/cloudtap unless --data-dir / CLOUDTAP_DATA_DIR), the built-in
# demo-service target, listeners on 127.0.0.1 only. Extra arguments go to cloudtapd.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${CLOUDTAP_CACHE:-$HOME/.cache/cloudtap}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
bin_dir="${CLOUDTAP_BIN_DIR:-$HOME/.cargo/bin}"

echo "==> building cloudtapd and cloudtapctl (release; the first build takes a few minutes)" >&2
cargo build --release --locked -p cloudtap-cli --bins
mkdir -p bin "$bin_dir"
for b in cloudtapd cloudtapctl; do
  install -m 0755 "$CARGO_TARGET_DIR/release/$b" "bin/$b"
  install -m 0755 "$CARGO_TARGET_DIR/release/$b" "$bin_dir/$b"
done
echo "==> installed cloudtapd and cloudtapctl into ./bin and $bin_dir" >&2
case ":$PATH:" in
  *":$bin_dir:"*) ;;
  *) echo "    note: $bin_dir is not on your PATH; add it, or use ./bin/cloudtapctl" >&2 ;;
esac
exec bin/cloudtapd all "$@"
