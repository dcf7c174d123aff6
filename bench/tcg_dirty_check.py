#!/usr/bin/env python3
"""Does QEMU lose guest writes during a live migration under TCG? Plain QEMU, no vmferry.

Usage: python3 bench/tcg_dirty_check.py [--runs 6] [--hogs 4] [--mib-per-s 64] [--qemus system,10]

Each run boots the test guest (it rewrites 16 MiB of tmpfs every 0.5 s) on a source QEMU
whose RAM is a /dev/shm file, migrates it over a unix socket, capped at --mib-per-s so that it takes several passes, to a
destination QEMU started with -S (so it stays paused after the migration), and compares the
two RAM files page by page: after a correct migration they are identical. HOGS busy loops
load the machine meanwhile, as the test suite's parallel guests do. The QEMUs alternate run
by run, so both see the same machine. "system" is qemu-system-x86_64 on PATH (7.2 on Debian
12), "10" the one scripts/qemu10.sh fetches.

Why it exists: QEMU before 9.0 clears a page's migration dirty bit without dropping the
vCPU's writable TLB entry for the page, so the guest's later writes through that entry are
never marked dirty and never sent (fixed by QEMU commit 03bfc2188f, "physmem: Fix migration
dirty bitmap coherency with TCG memory access"). KVM is not affected. This is why the
end-to-end tests run their migrating guests on QEMU 10 (testkit require::guest_qemu).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchlib import (GUEST_DIR, PATHS, ROOT, UNLIMITED, Qemu, Qmp, cleanup, kill, loadavg,
                      shm_path, spawn, wait_heartbeat)

PAGE = 4096


def qemu_binary(name):
    if name == "system":
        return "qemu-system-x86_64"
    if name == "10":
        out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "qemu10.sh")],
                             capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            sys.exit(f"tcg_dirty_check: scripts/qemu10.sh failed: {out.stderr.strip()}")
        return out.stdout.strip()
    return name  # a path


def differing_pages(a, b):
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(PAGE * 256), fb.read(PAGE * 256)
            if not x and not y:
                return n
            if x != y:
                n += sum(x[i:i + PAGE] != y[i:i + PAGE] for i in range(0, max(len(x), len(y)), PAGE))


def one_run(binary, ram_mib, tag, bandwidth):
    work = tempfile.mkdtemp(prefix="vmferry-tcgcheck-")
    PATHS.append(work)
    guest = (os.path.join(GUEST_DIR, "vmlinuz"), os.path.join(GUEST_DIR, "initramfs.img"))
    src_ram, dst_ram = shm_path(f"{tag}-src"), shm_path(f"{tag}-dst")
    src = Qemu(work, "src", src_ram, ram_mib, incoming=False, prealloc=False, paused=False,
               guest=guest, binary=binary)
    dst = None
    try:
        wait_heartbeat(src.serial, 5, 180, src)
        dst = Qemu(work, "dst", dst_ram, ram_mib, incoming=True, prealloc=False, binary=binary)
        sock = os.path.join(work, "migrate.sock")
        with Qmp(dst.qmp) as d:
            d.cmd("migrate-incoming", uri=f"unix:{sock}")
        t0 = time.time()
        with Qmp(src.qmp) as s:
            s.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
            s.cmd("migrate", uri=f"unix:{sock}")
            while True:
                st = s.cmd("query-migrate").get("status")
                if st in ("completed", "failed", "cancelled"):
                    break
                if time.time() - t0 > 300:
                    raise RuntimeError("the migration did not end in 300 s")
                time.sleep(0.1)
        if st != "completed":
            raise RuntimeError(f"the migration ended {st}")
        with Qmp(dst.qmp) as d:
            while d.cmd("query-status").get("status") == "inmigrate":
                time.sleep(0.05)
        return differing_pages(src_ram, dst_ram), time.time() - t0
    finally:
        src.stop()
        if dst:
            dst.stop()
        for p in (src_ram, dst_ram):
            if os.path.exists(p):
                os.unlink(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=6, help="migrations per QEMU (default 6)")
    ap.add_argument("--hogs", type=int, default=4, help="busy loops beside (default 4)")
    ap.add_argument("--mib-per-s", type=int, default=64,
                    help="migration bandwidth cap in MiB/s, 0 for none (default 64)")
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--qemus", default="system,10", help="system, 10 or paths, comma-separated")
    a = ap.parse_args()
    qemus = [(q, qemu_binary(q)) for q in a.qemus.split(",")]
    load0 = loadavg()
    for _ in range(a.hogs):
        spawn(["sh", "-c", "while :; do :; done"])
    results = {q: [] for q, _ in qemus}
    try:
        for i in range(a.runs):
            for q, binary in qemus:
                cap = a.mib_per_s << 20 if a.mib_per_s > 0 else UNLIMITED
                pages, secs = one_run(binary, a.ram_mib, f"{q.replace('/', '_')}-{i}", cap)
                results[q].append(pages)
                print(f"run {i + 1} QEMU {q}: {pages} pages differ after a {secs:.1f} s migration"
                      f" (load {loadavg().split()[0]})", flush=True)
    finally:
        cleanup()
    print(f"\n{a.runs} runs per QEMU, {a.hogs} busy loops, {a.ram_mib} MiB guest,"
          f" {a.mib_per_s or 'no'} MiB/s cap;"
          f" load average {load0.split()[0]} at the start, {loadavg().split()[0]} at the end")
    for q, pages in results.items():
        bad = sum(1 for p in pages if p)
        print(f"  QEMU {q:8} runs with guest RAM differing: {bad} of {len(pages)}"
              f" (pages per run: {', '.join(map(str, pages))})")


if __name__ == "__main__":
    main()
