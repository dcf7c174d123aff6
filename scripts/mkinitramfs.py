#!/usr/bin/env python3
"""Writes a gzip'd newc cpio initramfs with busybox and the test guest's /init.

The guest prints "vmferry-guest: booted", then forever: rewrites a 16 MiB tmpfs file (so
memory keeps getting dirtied during a live migration) and prints "vmferry-heartbeat N" on
the console, N counting up from 1, every ~0.5 s. There is no cpio binary on the machine,
so the archive is written here by hand.
"""
import gzip
import os
import stat
import sys

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs -o size=64m tmp /tmp
exec </dev/console >/dev/console 2>&1
echo "vmferry-guest: booted"
n=0
while true; do
    n=$((n + 1))
    dd if=/dev/zero of=/tmp/dirty bs=1M count=16 2>/dev/null
    echo "$n" >> /tmp/dirty
    echo "vmferry-heartbeat $n"
    sleep 0.5
done
"""

APPLETS = ["sh", "mount", "mkdir", "echo", "dd", "sleep", "cat", "ls"]


class Cpio:
    def __init__(self):
        self.out = bytearray()
        self.ino = 1

    def add(self, name, mode, data=b""):
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
        )
        self.ino += 1
        self.out += hdr.encode() + namez
        self.out += b"\0" * ((4 - len(self.out) % 4) % 4)
        self.out += data
        self.out += b"\0" * ((4 - len(self.out) % 4) % 4)

    def finish(self):
        self.add("TRAILER!!!", 0)
        return bytes(self.out)


def main():
    busybox, out = sys.argv[1], sys.argv[2]
    with open(busybox, "rb") as f:
        bb = f.read()
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        c.add(d, stat.S_IFDIR | 0o755)
    c.add("bin/busybox", stat.S_IFREG | 0o755, bb)
    for a in APPLETS:
        c.add(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox")
    c.add("init", stat.S_IFREG | 0o755, INIT.encode())
    with open(out, "wb") as f:
        f.write(gzip.compress(c.finish(), 6))


if __name__ == "__main__":
    main()
