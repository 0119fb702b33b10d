#!/usr/bin/env bash
# Runs Ferry's four services as separate processes on loopback, each with its
# own data directory, pid file and log under $FERRY_LOCAL_DIR, with mutual TLS
# between them: `start` makes a CA and a certificate per service (and an admin
# operator certificate) under $FERRY_LOCAL_DIR/pki with `ferry certs init`,
# and registry writes the bootstrap admin token to $FERRY_LOCAL_DIR/admin-token.
#
#   deploy/local/ferry-local.sh start    build if needed, start, wait, print addresses
#   deploy/local/ferry-local.sh stop     SIGTERM, wait up to 10 s each, then SIGKILL
#   deploy/local/ferry-local.sh status   pid, address and up/down of each
#
# Each service also serves Prometheus metrics on its gRPC port + 2000 (9101 to
# 9104 by default), as deploy/prometheus/prometheus.yml expects.
#
# Environment: FERRY_LOCAL_DIR (default deploy/local/run), FERRY_LOCAL_BASE_PORT
# (default 7101: registry, then cache, processor, failover), FERRY_BIN_DIR
# (default: $CARGO_TARGET_DIR, else target, /debug if it holds every binary,
# else /release if that does, else debug after `cargo build`).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
run_dir=${FERRY_LOCAL_DIR:-$root/deploy/local/run}
base=${FERRY_LOCAL_BASE_PORT:-7101}
services=(registry cache processor failover)

# Whether $1 holds every binary this script starts.
complete() {
  local s
  for s in "${services[@]}"; do [ -x "$1/$s-svc" ] || return 1; done
  [ -x "$1/ferry" ]
}
if [ -n "${FERRY_BIN_DIR:-}" ]; then
  bin_dir=$FERRY_BIN_DIR
else
  target=${CARGO_TARGET_DIR:-$root/target}
  bin_dir=$target/debug
  if ! complete "$bin_dir" && complete "$target/release"; then
    bin_dir=$target/release
  fi
fi
pki=$run_dir/pki

port_of() {
  case $1 in
    registry) echo $((base)) ;;
    cache) echo $((base + 1)) ;;
    processor) echo $((base + 2)) ;;
    failover) echo $((base + 3)) ;;
  esac
}
url_of() { echo "https://127.0.0.1:$(port_of "$1")"; }
metrics_of() { echo "127.0.0.1:$(($(port_of "$1") + 2000))"; }

tls_of() {
  echo "--tls-cert $pki/$1.pem --tls-key $pki/$1-key.pem --tls-ca $pki/ca.pem"
}

peers_of() {
  case $1 in
    registry) echo "--cache $(url_of cache) --bootstrap-token-file $run_dir/admin-token" ;;
    cache) echo "--registry $(url_of registry)" ;;
    processor) echo "--registry $(url_of registry) --cache $(url_of cache)" ;;
    failover) echo "--registry $(url_of registry) --processor $(url_of processor) --cache $(url_of cache)" ;;
  esac
}

pid_of() {
  local file="$run_dir/$1.pid"
  [ -f "$file" ] && cat "$file"
}

# Whether the pid file names a running process of this service (not an exited
# one waiting to be reaped, nor an unrelated process that got the pid later).
alive() {
  local pid cmdline
  pid=$(pid_of "$1") || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -d "/proc/$pid" ]; then
    # Empty for a zombie; the binary's path otherwise.
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    case $cmdline in
      *"$1-svc "*) return 0 ;;
      *) return 1 ;;
    esac
  fi
}

# SERVING per grpc.health.v1 when grpcurl is at hand, else the port accepts.
healthy() {
  local grpcurl="$root/.venv/bin/grpcurl"
  if [ -x "$grpcurl" ]; then
    "$grpcurl" -cacert "$pki/ca.pem" "127.0.0.1:$(port_of "$1")" grpc.health.v1.Health/Check 2>/dev/null \
      | grep -q '"SERVING"'
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$(port_of "$1")") 2>/dev/null
  fi
}

start() {
  mkdir -p "$run_dir"
  if ! complete "$bin_dir"; then
    echo "building the binaries (cargo build --bins)"
    (cd "$root" && cargo build --bins -p registry-svc -p cache-svc -p processor-svc \
      -p failover-svc -p ferry-cli)
  fi
  if [ ! -f "$pki/ca.pem" ]; then
    "$bin_dir/ferry" certs init "$pki" --operator admin:admin >/dev/null
    echo "made a CA and certificates in $pki"
  fi
  for s in "${services[@]}"; do
    if [ ! -x "$bin_dir/$s-svc" ]; then
      echo "no $bin_dir/$s-svc (FERRY_BIN_DIR names where the binaries are)" >&2
      exit 1
    fi
  done
  for s in "${services[@]}"; do
    if alive "$s"; then
      echo "$s-svc already running (pid $(pid_of "$s"))"
      continue
    fi
    # shellcheck disable=SC2046
    "$bin_dir/$s-svc" --listen "127.0.0.1:$(port_of "$s")" --data-dir "$run_dir/$s" \
      --metrics-listen "$(metrics_of "$s")" \
      $(tls_of "$s") $(peers_of "$s") >>"$run_dir/$s.log" 2>&1 &
    echo $! >"$run_dir/$s.pid"
  done
  local deadline=$((SECONDS + 60))
  for s in "${services[@]}"; do
    until healthy "$s"; do
      if ! alive "$s"; then
        echo "$s-svc exited; see $run_dir/$s.log" >&2
        tail -n 20 "$run_dir/$s.log" >&2 || true
        exit 1
      fi
      if [ $SECONDS -ge $deadline ]; then
        echo "$s-svc not serving after 60 s; see $run_dir/$s.log" >&2
        exit 1
      fi
      sleep 0.2
    done
  done
  for s in "${services[@]}"; do
    echo "$s $(url_of "$s") metrics http://$(metrics_of "$s")/metrics"
  done
  echo "# the CLI: export FERRY_TLS_CA=$pki/ca.pem FERRY_TOKEN=\$(cat $run_dir/admin-token)"
  echo "#          ferry --registry $(url_of registry) --failover $(url_of failover) --processor $(url_of processor) list"
}

stop() {
  for s in failover processor cache registry; do
    local pid
    pid=$(pid_of "$s") || continue
    if alive "$s"; then
      kill -TERM "$pid"
      local deadline=$((SECONDS + 10))
      while alive "$s" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
      if alive "$s"; then
        echo "$s-svc ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
      echo "$s stopped"
    fi
    rm -f "$run_dir/$s.pid"
  done
}

status() {
  for s in "${services[@]}"; do
    if alive "$s"; then
      echo "$s pid $(pid_of "$s") $(url_of "$s") up"
    else
      echo "$s $(url_of "$s") down"
    fi
  done
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
