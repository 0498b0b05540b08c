#!/usr/bin/env bash
# Real services for the tests: an S3-compatible server (s3s-fs) and a Kafka-protocol
# broker (tansu). Installed from crates.io into the cache dir (skipped when present)
# and started on free loopback ports.
#
# The broker keeps its data in memory by default: tansu 0.6's S3 storage engine reads
# only ~40 records/s once a topic holds a few hundred. KAFKA_STORAGE=s3 puts the
# broker's storage on the S3 server of the same DIR instead, so topics and committed
# offsets survive a broker restart; fault tests that kill the broker start such
# private instances and restart the broker with DIR/tansu.sh.
#
#   scripts/services.sh install            build the binaries if missing
#   scripts/services.sh start [DIR]        start both; prints the environment the tests read
#   scripts/services.sh env [DIR]          print that environment again
#   scripts/services.sh stop [DIR]         stop what `start` started in DIR
#
# DIR (default $CLOUDTAP_CACHE/services) holds the data, logs, pids and the env file.
# Fault tests start private instances with their own DIR, so no other test sees them.
set -euo pipefail

cache="${CLOUDTAP_CACHE:-$HOME/.cache/cloudtap}"
tools="$cache/tools"
S3S_VERSION=0.14.1
TANSU_VERSION=0.6.0

install() {
  mkdir -p "$tools"
  if [ ! -x "$tools/bin/s3s-fs" ]; then
    echo "==> installing s3s-fs $S3S_VERSION into $tools (about 3 minutes)" >&2
    cargo install --locked --quiet "s3s-fs@$S3S_VERSION" --features binary --root "$tools"
  fi
  if [ ! -x "$tools/bin/tansu" ]; then
    echo "==> installing tansu $TANSU_VERSION into $tools (about 10 minutes)" >&2
    cargo install --locked --quiet "tansu@$TANSU_VERSION" --features dynostore --root "$tools"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
  local port=$1 what=$2 pid=$3 i
  for i in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "services: $what exited before listening; see its log in $dir" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "services: $what did not listen on 127.0.0.1:$port within 30 s; see its log in $dir" >&2
  return 1
}

start() {
  install
  mkdir -p "$dir/s3" "$dir/s3/tansu" "$dir/s3/cloudtap"
  local s3_port kafka_port key secret
  s3_port=$(free_port)
  kafka_port=$(free_port)
  key="cloudtap-test"
  secret="cloudtap-test-secret"

  # A script that starts (or, for fault tests, restarts) this DIR's S3 server.
  {
    echo '#!/usr/bin/env bash'
    echo "exec '$tools/bin/s3s-fs' --host 127.0.0.1 --port '$s3_port' \\"
    echo "  --access-key '$key' --secret-key '$secret' '$dir/s3' >>'$dir/s3s-fs.log' 2>&1"
  } >"$dir/s3s-fs.sh"
  chmod +x "$dir/s3s-fs.sh"
  "$dir/s3s-fs.sh" &
  echo $! >"$dir/s3s-fs.pid"
  wait_port "$s3_port" s3s-fs "$(cat "$dir/s3s-fs.pid")"

  local storage="memory://tansu/"
  if [ "${KAFKA_STORAGE:-memory}" = s3 ]; then
    storage="s3://tansu/"
  fi
  # A script that starts (or, for fault tests, restarts) this DIR's broker on its port.
  {
    echo '#!/usr/bin/env bash'
    echo "AWS_ACCESS_KEY_ID='$key' AWS_SECRET_ACCESS_KEY='$secret' AWS_DEFAULT_REGION=us-east-1 \\"
    echo "  AWS_ENDPOINT='http://127.0.0.1:$s3_port' AWS_ALLOW_HTTP=true \\"
    echo "  exec '$tools/bin/tansu' broker \\"
    echo "  --listener-url 'tcp://127.0.0.1:$kafka_port' \\"
    echo "  --advertised-listener-url 'tcp://127.0.0.1:$kafka_port' \\"
    echo "  --storage-engine '$storage' >>'$dir/tansu.log' 2>&1"
  } >"$dir/tansu.sh"
  chmod +x "$dir/tansu.sh"
  "$dir/tansu.sh" &
  echo $! >"$dir/tansu.pid"
  wait_port "$kafka_port" tansu "$(cat "$dir/tansu.pid")"

  cat >"$dir/env" <<EOF
export CLOUDTAP_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port
export CLOUDTAP_TEST_S3_ACCESS_KEY=$key
export CLOUDTAP_TEST_S3_SECRET_KEY=$secret
export CLOUDTAP_TEST_S3_REGION=us-east-1
export CLOUDTAP_TEST_S3_BUCKET=cloudtap
export CLOUDTAP_TEST_KAFKA=127.0.0.1:$kafka_port
export CLOUDTAP_TEST_SERVICES_DIR=$dir
export CLOUDTAP_TEST_KAFKA_STORAGE=$storage
EOF
  cat "$dir/env"
}

stop() {
  local f pid
  for f in "$dir"/tansu.pid "$dir"/s3s-fs.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

cmd="${1:-}"
dir="${2:-$cache/services}"
case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) cat "$dir/env" ;;
  *) echo "usage: scripts/services.sh install|start|stop|env [DIR]" >&2; exit 2 ;;
esac
