#!/usr/bin/env bash
# Builds the tiny guest Ferry's tests boot under QEMU: Debian's kernel
# (linux-image-amd64) and an initramfs of busybox-static, the modules a
# virtio disk with ext4 and a virtio NIC need, and an init that prints
# "FERRY-READY" on the serial console once its modules are loaded, then
# works on the data disk /dev/vda as the kernel command line says:
#
#   ferry.mode=write ferry.files=N   writes files f1..fN (random data, 4 to
#                                    64 KiB), each synced, then prints
#                                    "FERRY-FILE fK <sha256>" for it
#   ferry.delay=SECONDS              (with write) waits that long after each
#                                    file (a guest that writes for a while)
#   ferry.mode=verify                prints "FERRY-FILE fK <sha256>" for
#                                    every file on the disk (fK and hK)
#   ferry.more=N                     (with verify) then writes files
#                                    h1..hN as write does
#   ferry.net=dhcp                   first asks DHCP for eth0's address and
#                                    prints "FERRY-IP <address>"
#
# then "FERRY-DONE" and powers off (with ferry.stay=1 it stays up instead).
# Anything amiss prints "FERRY-ERROR ...". The disk must hold an ext4
# filesystem (mkfs.ext4 on the host).
#
#   scripts/guest.sh [DIR]    writes DIR/vmlinuz and DIR/initrd.gz (default
#                             target/guest); does nothing if they are there
#                             and were made by this version of the script
#
# Packages come from Debian's archive with `apt-get download`: nothing is
# installed on this machine.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${CARGO_TARGET_DIR:-$root/target}/guest}
stamp=$(sha256sum "$0" | cut -d' ' -f1)
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# The kernel package linux-image-amd64 points to, and busybox.
kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kernel_pkg" ] || { echo "guest: no kernel behind linux-image-amd64 (apt-get update?)" >&2; exit 1; }
apt-get download -q "$kernel_pkg" busybox-static 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
mkdir x
for deb in ./*.deb; do dpkg-deb -x "$deb" x; done
modules=$(echo x/lib/modules/*)
[ -d "$modules" ] || { echo "guest: $kernel_pkg has no modules" >&2; exit 1; }

rootfs=$work/rootfs
mkdir -p "$rootfs/bin" "$rootfs/lib/modules" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/mnt"
cp x/bin/busybox "$rootfs/bin/busybox"
# In load order: each after what it depends on (their .modinfo says).
load="crc32c_generic crc16 mbcache jbd2 ext4 virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net"
for m in $load; do
  ko=$(find "$modules" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)
  [ -n "$ko" ] || { echo "guest: no module $m in $kernel_pkg" >&2; exit 1; }
  case $ko in
    *.xz) xz -dc "$ko" >"$rootfs/lib/modules/$m.ko" ;;
    *) cp "$ko" "$rootfs/lib/modules/$m.ko" ;;
  esac
done
echo "$load" >"$rootfs/modules.load"

cat >"$rootfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.load); do
  insmod /lib/modules/$m.ko || echo "FERRY-ERROR insmod $m"
done
arg() { sed -n "s/.*ferry\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
mode=$(arg mode)
files=$(arg files)
more=$(arg more)
delay=$(arg delay)
echo FERRY-READY
if [ "$(arg net)" = dhcp ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  ip link set eth0 up
  if ! udhcpc -i eth0 -n -q -t 20 -T 1 -s /bin/dhcp-event >/dev/null 2>&1; then
    echo "FERRY-ERROR no DHCP lease on eth0"
  fi
fi
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 /dev/vda /mnt; then
  case $mode in
    write)
      n=1
      while [ "$n" -le "${files:-0}" ]; do
        dd if=/dev/urandom of=/mnt/f$n bs=4096 count=$((n % 16 + 1)) 2>/dev/null
        sync
        echo "FERRY-FILE f$n $(sha256sum /mnt/f$n | cut -d' ' -f1)"
        [ -z "$delay" ] || sleep "$delay"
        n=$((n + 1))
      done
      ;;
    verify)
      for f in /mnt/f* /mnt/h*; do
        [ -f "$f" ] && echo "FERRY-FILE ${f#/mnt/} $(sha256sum "$f" | cut -d' ' -f1)"
      done
      n=1
      while [ "$n" -le "${more:-0}" ]; do
        dd if=/dev/urandom of=/mnt/h$n bs=4096 count=$((n % 16 + 1)) 2>/dev/null
        sync
        echo "FERRY-FILE h$n $(sha256sum /mnt/h$n | cut -d' ' -f1)"
        n=$((n + 1))
      done
      ;;
    *) echo "FERRY-ERROR unknown ferry.mode=$mode" ;;
  esac
  umount /mnt || echo "FERRY-ERROR umount"
else
  echo "FERRY-ERROR cannot mount /dev/vda"
fi
echo FERRY-DONE
if [ "$(arg stay)" = 1 ]; then
  while true; do sleep 3600; done
fi
poweroff -f
INIT
# udhcpc's event script: the lease's address goes on the NIC and the console.
cat >"$rootfs/bin/dhcp-event" <<'DHCP'
#!/bin/busybox sh
case $1 in
  bound|renew)
    ip addr add "$ip/${mask:-24}" dev "$interface"
    echo "FERRY-IP $ip" >/dev/console
    ;;
esac
DHCP
chmod 0755 "$rootfs/init" "$rootfs/bin/busybox" "$rootfs/bin/dhcp-event"

# The initramfs: a newc cpio archive, gzipped (Python's standard library,
# so that cpio need not be installed).
python3 - "$rootfs" "$work/initrd.gz" <<'PY'
import gzip, os, stat, sys

root, target = sys.argv[1], sys.argv[2]
ino = 0

def entry(name, mode, data=b""):
    global ino
    ino += 1
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out

archive = bytearray()
for directory, dirs, files in os.walk(root):
    dirs.sort()
    rel = os.path.relpath(directory, root)
    if rel != ".":
        archive += entry(rel, stat.S_IFDIR | 0o755)
    for f in sorted(files):
        path = os.path.join(directory, f)
        mode = os.stat(path).st_mode
        with open(path, "rb") as fh:
            archive += entry(os.path.normpath(os.path.join(rel, f)), stat.S_IFREG | (mode & 0o777), fh.read())
archive += entry("TRAILER!!!", 0)
with gzip.open(target, "wb") as out:
    out.write(archive)
PY

mkdir -p "$out"
cp x/boot/vmlinuz-* "$out/vmlinuz"
cp "$work/initrd.gz" "$out/initrd.gz"
echo "$stamp" >"$out/stamp"
echo "guest: $out/vmlinuz ($kernel_pkg) and $out/initrd.gz"
