#!/usr/bin/env python3
"""Writes the test guest's initramfs: a gzip'd newc cpio with busybox and /init.

Usage: mkinitramfs.py BUSYBOX OUT KERNEL_MODULES_DIR

The guest prints "vmferry-guest: booted" once. If it has a virtio disk (/dev/vda; the
virtio modules come from the kernel package's KERNEL_MODULES_DIR), it prints the disk's
first line as "vmferry-disk: LINE" and writes each heartbeat's number into the disk's
second 512-byte sector, synchronously, so a test can see which host last wrote it; before
each write it reads the sector back past the page cache and prints "vmferry-diskcheck BAD
N" if it does not hold the previous number ("vmferry-diskcheck ok N" every 10th time).
Then it forever rewrites 16 MiB of a tmpfs file
in place (so memory keeps getting dirtied during a live migration) and prints
"vmferry-heartbeat N" on the console, N counting up from 1, about every 0.5 s. With
"vmferry.busy=MIB" on the kernel command line it also rewrites MIB MiB more of tmpfs in a
loop without pause (a guest that dirties memory faster than a capped link carries it), and
every 20 heartbeats checks that the 16 MiB it dirties from (written once at boot) still has
its first checksum: "vmferry-memcheck ok N" or "vmferry-memcheck BAD N". The bytes
written are random, not zero: QEMU sends a zero page as a few bytes, so zeros would let a
migration "converge" without carrying any data. 32 MiB/s of dirtying is modest enough for
a migration under TCG to converge. There is no cpio binary on the machine, so the archive
is written here by hand.
"""
import gzip
import os
import stat
import sys

INIT = r"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
busy=0
for arg in $(cat /proc/cmdline); do
    case $arg in vmferry.busy=*) busy=${arg#vmferry.busy=} ;; esac
done
mount -t tmpfs -o size=$((busy + 48))m tmp /tmp
exec </dev/console >/dev/console 2>&1
echo "vmferry-guest: booted"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do
    sleep 0.1
    i=$((i + 1))
done
disk=no
if [ -b /dev/vda ]; then
    disk=yes
    read -r label </dev/vda
    echo "vmferry-disk: $label"
fi
# 16 MiB of non-zero bytes, made once (random bytes are slow to make under TCG).
dd if=/dev/urandom of=/tmp/seed bs=64k count=16 2>/dev/null
i=0
while [ $i -lt 16 ]; do
    cat /tmp/seed
    i=$((i + 1))
done >/tmp/pattern
sum0=""
if [ "$busy" -gt 0 ]; then
    sum0=$(md5sum </tmp/pattern)
    echo "vmferry-guest: dirtying $busy MiB without pause"
    (
        while true; do
            i=0
            while [ $((i * 16)) -lt "$busy" ]; do
                dd if=/tmp/pattern of=/tmp/busy bs=1M seek=$((i * 16)) conv=notrunc 2>/dev/null
                i=$((i + 1))
            done
        done
    ) &
fi
n=0
while true; do
    n=$((n + 1))
    dd if=/tmp/pattern of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null
    echo "$n" >/tmp/counter
    if [ $disk = yes ]; then
        # Read back (past the page cache) what the last heartbeat wrote: after a migration
        # that copied the disk, the destination's disk must hold the source's last write.
        if [ $n -gt 1 ]; then
            echo 1 >/proc/sys/vm/drop_caches
            prev=$(dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | { read -r l; echo "$l"; })
            if [ "$prev" != "$((n - 1))" ]; then
                echo "vmferry-diskcheck BAD $n (read '$prev')"
            elif [ $((n % 10)) -eq 0 ]; then
                echo "vmferry-diskcheck ok $n"
            fi
        fi
        echo "$n" | dd of=/dev/vda bs=512 seek=1 conv=notrunc,fsync 2>/dev/null
    fi
    echo "vmferry-heartbeat $n"
    if [ -n "$sum0" ] && [ $((n % 20)) -eq 0 ]; then
        if [ "$(md5sum </tmp/pattern)" = "$sum0" ]; then
            echo "vmferry-memcheck ok $n"
        else
            echo "vmferry-memcheck BAD $n"
        fi
    fi
    sleep 0.5
done
"""

APPLETS = ["sh", "mount", "mkdir", "echo", "dd", "sleep", "cat", "ls", "ps", "free", "insmod",
           "md5sum"]
# Loaded in this order (each after what it depends on); Debian builds them as modules.
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "virtio_blk"]


class Cpio:
    def __init__(self):
        self.out = bytearray()
        self.ino = 1

    def add(self, name, mode, data=b"", rdev=(0, 0)):
        """Appends one entry: header, NUL-terminated name and data, each padded to 4."""
        namez = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(namez), 0)
        hdr = "070701" + "".join(f"{v:08x}" for v in fields)
        self.ino += 1
        self.out += hdr.encode() + namez
        self.out += b"\0" * ((4 - len(self.out) % 4) % 4)
        self.out += data
        self.out += b"\0" * ((4 - len(self.out) % 4) % 4)

    def finish(self):
        self.add("TRAILER!!!", 0)
        return bytes(self.out)


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: mkinitramfs.py BUSYBOX OUT KERNEL_MODULES_DIR")
    busybox, out, moddir = sys.argv[1], sys.argv[2], sys.argv[3]
    found = {}
    for dirpath, _, files in os.walk(moddir):
        for f in files:
            if f.endswith(".ko") and f[:-3] in MODULES:
                found[f[:-3]] = os.path.join(dirpath, f)
    missing = [m for m in MODULES if m not in found]
    if missing:
        sys.exit(f"mkinitramfs: kernel modules not found under {moddir}: {', '.join(missing)}")
    with open(busybox, "rb") as f:
        bb = f.read()
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        c.add(d, stat.S_IFDIR | 0o755)
    for m in MODULES:
        with open(found[m], "rb") as f:
            c.add(f"lib/modules/{m}.ko", stat.S_IFREG | 0o644, f.read())
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    c.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    c.add("bin/busybox", stat.S_IFREG | 0o755, bb)
    for a in APPLETS:
        c.add(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox")
    c.add("init", stat.S_IFREG | 0o755, INIT.encode())
    with open(out, "wb") as f:
        f.write(gzip.compress(c.finish(), 9, mtime=0))


if __name__ == "__main__":
    main()
