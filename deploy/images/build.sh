#!/usr/bin/env bash
# Builds the container image of Ferry without pulling any base image: FROM
# scratch with every Ferry binary (the command picks which), the shared
# libraries they link (as ldd lists them), a passwd and group naming the user
# `ferry` (uid/gid 10001, whom the image runs as) and /data owned by it.
#
#   deploy/images/build.sh            cargo build --release, then docker build
#
# Environment: FERRY_IMAGE (default ferry:dev), FERRY_PROFILE (release or
# debug, default release), FERRY_BIN_DIR (take the binaries from there instead
# of building them). The binaries are copied stripped of debug symbols.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
image=${FERRY_IMAGE:-ferry:dev}
profile=${FERRY_PROFILE:-release}
bins=(registry-svc cache-svc processor-svc failover-svc ferry-agent ferry)

if [ -n "${FERRY_BIN_DIR:-}" ]; then
  bin_dir=$FERRY_BIN_DIR
else
  case $profile in
    release) flag=(--release) ;;
    debug) flag=() ;;
    *) echo "FERRY_PROFILE is release or debug, not $profile" >&2; exit 2 ;;
  esac
  echo "==> cargo build ${flag[*]} (the binaries of the image)"
  (cd "$root" && cargo build "${flag[@]}" --locked -p registry-svc -p cache-svc \
    -p processor-svc -p failover-svc -p ferry-agent -p ferry-cli)
  bin_dir=${CARGO_TARGET_DIR:-$root/target}/$profile
fi
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "no $bin_dir/$b (FERRY_BIN_DIR names where the binaries are)" >&2; exit 1; }
done
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
rootfs=$ctx/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp" "$ctx/data"
chmod 1777 "$rootfs/tmp"
for b in "${bins[@]}"; do
  cp "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
  strip --strip-debug "$rootfs/usr/local/bin/$b"
done
# Every library the binaries load, and the dynamic loader itself, at the
# paths the binaries name them by.
for lib in $(for b in "${bins[@]}"; do ldd "$bin_dir/$b"; done |
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u); do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/nonexistent
ferry:x:10001:10001:ferry:/data:/nonexistent
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
ferry:x:10001:
GROUP
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /data/
ENV PATH=/usr/local/bin
USER 10001:10001
WORKDIR /data
VOLUME /data
DOCKERFILE
echo "==> docker build -t $image ($(du -sh "$rootfs" | cut -f1) of binaries and libraries)"
# The classic builder: this Docker has no buildx, and FROM scratch needs none.
if ! out=$(DOCKER_BUILDKIT=0 docker build --quiet -t "$image" "$ctx" 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "built $image"
