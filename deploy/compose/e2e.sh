#!/usr/bin/env bash
# End to end on real containers: Ferry in two regions (deploy/compose), a VM
# protected and written through its agent's NBD export, the WAN cut for longer
# than several point intervals while the writes go on, healed, the VM caught up
# without a full resync, a test failover compared byte for byte with the
# source, every container SIGKILLed and restarted once, and a planned
# failover compared byte for byte again. Then everything is torn down.
#
# Skips (exit 0, saying why) where Docker is absent or its daemon is down.
# Environment: FERRY_BIN_DIR (the binaries for the image and the host's
# `ferry`; default target/debug, built if missing), FERRY_E2E_KEEP=1 (leave
# the stack up at the end, or at a failure, to look at it), FERRY_E2E_SEED
# (the write pattern's seed; printed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

if ! command -v docker >/dev/null; then
  echo "compose e2e: skipped: docker is not installed"
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "compose e2e: skipped: the Docker daemon does not answer (docker info fails)"
  exit 0
fi
if command -v docker-compose >/dev/null; then
  compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  echo "compose e2e: skipped: neither docker-compose nor the compose plugin is installed"
  exit 0
fi
for tool in qemu-io qemu-img python3; do
  command -v $tool >/dev/null || { echo "compose e2e: $tool is missing (scripts/test.sh installs it)" >&2; exit 1; }
done

bin_dir=${FERRY_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/debug}
have_bins() {
  local b
  for b in registry-svc cache-svc processor-svc failover-svc ferry-agent ferry; do
    [ -x "$bin_dir/$b" ] || return 1
  done
}
if ! have_bins; then
  echo "==> cargo build --bins"
  (cd "$root" && cargo build -p registry-svc -p cache-svc -p processor-svc -p failover-svc \
    -p ferry-agent -p ferry-cli)
fi

seed=${FERRY_E2E_SEED:-$RANDOM}
echo "compose e2e: seed $seed (FERRY_E2E_SEED=$seed repeats this run's writes)"
project=ferry-e2e-$$
run=$(mktemp -d /tmp/ferry-e2e.XXXXXX)
export COMPOSE_PROJECT_NAME=$project FERRY_COMPOSE_DIR=$run
export FERRY_IMAGE=ferry:e2e-$$
compose() { "${compose_cmd[@]}" -f "$here/docker-compose.yml" --profile vm "$@"; }

# Free loopback ports for the published ones.
read -r FERRY_REGISTRY_PORT FERRY_CACHE_PORT FERRY_PROCESSOR_PORT FERRY_FAILOVER_PORT \
  FERRY_NBD_PORT FERRY_AGENT_METRICS_PORT < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)
export FERRY_REGISTRY_PORT FERRY_CACHE_PORT FERRY_PROCESSOR_PORT FERRY_FAILOVER_PORT \
  FERRY_NBD_PORT FERRY_AGENT_METRICS_PORT

writer_pid=""
teardown() {
  local status=$?
  [ -z "$writer_pid" ] || kill "$writer_pid" 2>/dev/null || true
  if [ $status -ne 0 ]; then
    echo "compose e2e: FAILED (seed $seed); the services' last log lines:" >&2
    compose logs --no-color --tail 30 >&2 2>&1 || true
  fi
  if [ "${FERRY_E2E_KEEP:-}" = 1 ]; then
    echo "compose e2e: left up: COMPOSE_PROJECT_NAME=$project FERRY_COMPOSE_DIR=$run" >&2
    return
  fi
  compose down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  docker image rm "$FERRY_IMAGE" >/dev/null 2>&1 || true
  rm -rf "$run"
}
trap teardown EXIT

fail() { echo "compose e2e: $*" >&2; exit 1; }
step() { echo "==> $*"; }

# Waits up to $1 seconds for the command after it to succeed.
wait_until() {
  local secs=$1 deadline
  shift
  deadline=$((SECONDS + secs))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

step "image $FERRY_IMAGE"
FERRY_BIN_DIR=$bin_dir bash "$root/deploy/images/build.sh"

step "certificates, the VM's disk image"
"$bin_dir/ferry" certs init "$run/pki" --agent vm1 --operator e2e:admin >/dev/null
mkdir -p "$run/disks" "$run/agent"
disk=$run/disks/vm1-os.raw
truncate -s 64M "$disk"
# The image runs as uid 10001: it reads the certificates, the agent writes
# the disk image.
chown -R 10001:10001 "$run/pki" "$run/disks" "$run/agent"

ferry() {
  "$bin_dir/ferry" --registry "https://127.0.0.1:$FERRY_REGISTRY_PORT" \
    --processor "https://127.0.0.1:$FERRY_PROCESSOR_PORT" \
    --failover "https://127.0.0.1:$FERRY_FAILOVER_PORT" \
    --tls-ca "$run/pki/ca.pem" --tls-cert "$run/pki/operator-e2e.pem" \
    --tls-key "$run/pki/operator-e2e-key.pem" "$@"
}
# A JSON field of `ferry show vm1`, by a Python expression on `v`.
show() {
  ferry --output json show vm1 | python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"
}

step "services up: registry, processor, failover in the target region; cache in the source"
compose up -d registry cache processor failover
ready() { ferry regions >/dev/null 2>&1; }
wait_until 60 ready || fail "registry did not answer in 60 s"

step "protect vm1"
ferry policy create fast --crash-interval 1s --retention 1h >/dev/null
ferry register vm1 --region eastus --resource-group prod --vnet prod-vnet --subnet app \
  --nic nic0=10.0.0.4 --disk "id=os,size=64M,role=os,path=/disks/vm1-os.raw" >/dev/null
ferry enable vm1 --target-region westus --policy fast >/dev/null
ferry agent enroll vm1 >"$run/agent/enroll"
chown 10001:10001 "$run/agent/enroll"
compose up -d agent
protected() { [ "$(show "v['state']")" = PROTECTED ]; }
wait_until 120 protected || fail "vm1 not PROTECTED after 120 s: $(ferry show vm1)"

cid() { compose ps -q "$1"; }
wan=$(docker network ls -q --filter "label=com.docker.compose.project=$project" \
  --filter label=com.docker.compose.network=wan)
[ -n "$wan" ] || fail "no WAN network of project $project"

# The agent's metric $1 (its first sample, a whole number), from its published
# metrics port.
agent_metric() {
  python3 - "$FERRY_AGENT_METRICS_PORT" "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(sys.argv[2] + "{") or line.startswith(sys.argv[2] + " "):
        print(int(float(line.rsplit(" ", 1)[1])))
        break
PY
}

# The VM's writes: 64 KiB at a random 64 KiB block of its disk, a random
# pattern byte, through the agent's NBD export, about every 0.1 s until
# $run/stop appears. A write that fails is recorded: replication must never
# fail the VM's writes, whatever happens to the WAN or to any service.
nbd=nbd://127.0.0.1:$FERRY_NBD_PORT/os
writer() {
  RANDOM=$1
  local n=0
  while [ ! -e "$run/stop" ]; do
    local block=$((RANDOM % 1024)) pattern=$((RANDOM % 255 + 1))
    if ! qemu-io -f raw -c "write -P $pattern $((block * 65536)) 64k" "$nbd" >/dev/null 2>>"$run/write-errors"; then
      echo "write $n (block $block) failed" >>"$run/write-errors"
    fi
    n=$((n + 1))
    echo "$n" >"$run/writes"
    sleep 0.1
  done
  echo "$n" >"$run/writes"
}
round=0
start_writer() {
  round=$((round + 1))
  rm -f "$run/stop" "$run/writes"
  writer $((seed * 100 + round)) &
  writer_pid=$!
}
stop_writer() {
  touch "$run/stop"
  wait "$writer_pid"
  writer_pid=""
  stopped_at=$SECONDS
  [ ! -s "$run/write-errors" ] || fail "the VM's writes failed: $(cat "$run/write-errors")"
  echo "    $(cat "$run/writes") writes"
}
# Whether the running writer has made $1 writes.
wrote() {
  local n
  n=$(cat "$run/writes" 2>/dev/null) || true
  [ "${n:-0}" -ge "$1" ] 2>/dev/null
}
# Everything the VM wrote has left the agent (its buffer, sampled each
# second, is empty at least 2 s after the last write).
flushed() { [ $SECONDS -ge $((stopped_at + 2)) ] && [ "$(agent_metric ferry_agent_buffered_bytes)" = 0 ]; }
# Whether vm1's RPO exceeds $1 seconds (no RPO yet counts as above).
rpo_above() { [ "$(show "1 if v['rpo'] is None or v['rpo'] > $1 else 0")" = 1 ]; }
caught_up() {
  [ "$(show "v['state']")" = PROTECTED ] && [ "$(show "v['backlog_records']")" -lt 64 ] && ! rpo_above 5
}

# Fails over with the arguments given (the job is followed to its end), then
# compares the disk it made, copied out of failover-svc's volume, with the
# source image byte for byte.
failover_and_compare() {
  local test=$1
  shift
  ferry failover vm1 "$@"
  local path
  path=$(ferry --output json target-vms | python3 -c "
import json, sys
vms = [v for v in json.load(sys.stdin) if v['source_vm'] == 'vm1' and v['test'] == $test]
print(vms[0]['disks'][0]['path'])")
  docker cp "$(cid failover):$path" - | tar -xO >"$run/failed-over.raw"
  cmp "$disk" "$run/failed-over.raw" || fail "the failed-over disk differs from the source"
  echo "    $path equals the source, byte for byte"
  rm -f "$run/failed-over.raw"
}

step "writes through the agent's NBD export"
start_writer
wait_until 60 wrote 20 || fail "the VM could not write 20 times"
wait_until 60 caught_up || fail "vm1 did not keep up before the cut: $(ferry show vm1)"

# Every state change of vm1 from here to the end of the catch-up.
ferry --output json watch >"$run/watch.jsonl" 2>&1 &
watch_pid=$!

step "cut the WAN: the source region (cache, agent) from the target region"
for c in cache agent; do docker network disconnect "$wan" "$(cid $c)"; done
cut_at=$SECONDS
wait_until 25 rpo_above 10 || fail "the RPO did not grow (about a second a second) while the WAN was cut: $(ferry show vm1)"
echo "    RPO $(show "round(v['rpo'], 1)") s after $((SECONDS - cut_at)) s cut, writes going on"
[ "$(agent_metric ferry_agent_tracking)" = 0 ] || fail "the agent fell back to tracking during the cut"

step "heal the WAN"
docker network connect --alias cache "$wan" "$(cid cache)"
docker network connect --alias agent "$wan" "$(cid agent)"
healed_at=$SECONDS
wait_until 120 caught_up || fail "vm1 did not catch up within 120 s of the heal: $(ferry show vm1)"
echo "    caught up $((SECONDS - healed_at)) s after the heal: RPO $(show "round(v['rpo'], 1)") s"
stop_writer
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true
python3 - "$run/watch.jsonl" <<'PY' || fail "vm1 left PROTECTED around the cut"
import json, sys
seen = set()
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        item = json.loads(line).get("item") or {}
        if item.get("source", {}).get("name") == "vm1":
            seen.add(item.get("state"))
print("    states seen around the cut:", sorted(seen))
sys.exit(0 if seen == {"PROTECTED"} else 1)
PY
[ "$(agent_metric ferry_agent_tracking)" = 0 ] || fail "the agent is tracking after the heal"

step "test failover to the latest point, compared with the source"
wait_until 30 flushed || fail "the agent still holds buffered writes"
ferry network create drill --region westus --resource-group drill --subnet default=10.9.0.0/24 >/dev/null
failover_and_compare True --test --network drill --point latest
ferry failover cleanup-test vm1 >/dev/null

for s in registry cache processor failover agent; do
  step "SIGKILL $s, start it again, write, and see vm1 protected again"
  compose kill -s SIGKILL "$s" >/dev/null 2>&1
  compose start "$s" >/dev/null 2>&1
  wait_until 60 ready || fail "registry does not answer after $s restarted"
  start_writer
  wait_until 60 wrote 30 || fail "the VM could not write 30 times after $s restarted"
  wait_until 120 caught_up || fail "vm1 not protected and caught up after $s restarted: $(ferry show vm1)"
  stop_writer
done

step "planned failover, compared with the source"
wait_until 30 flushed || fail "the agent still holds buffered writes"
failover_and_compare False --planned
ferry failover commit vm1 >/dev/null
echo "compose e2e: passed (seed $seed)"
