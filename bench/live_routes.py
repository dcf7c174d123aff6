"""The live guest of migrate_bench.py (on unless --no-live).

The test guest (scripts/guest-image.sh: it dirties 16 MiB continuously and prints
"vmferry-heartbeat N") boots under TCG with the paused guest's random RAM behind it, runs,
and migrates live over --live-routes (the routes of paused_routes, driven by its migrate());
run_live() reports QEMU's total-time and downtime and checks that the heartbeat goes on at
the destination; run_all() runs every route --live-runs times; summarize_live() makes the
rows of the README table.

Processes, QEMU and QMP come from benchlib, which registers everything for its one cleanup;
this module must never leave a QEMU or /dev/shm file behind.
"""
import os
import statistics
import subprocess
import time

from benchlib import (GUEST_DIR, ROOT, Qemu, fmt_ms, heartbeats, med_range, qemu_complaints,
                      remove, shm_path, streams_label, wait_heartbeat)
from paused_routes import migrate


def run_live(env, route, multifd, template, guest):
    """Boots the test guest on the same random RAM, lets it run and dirty memory, migrates it
    live; the destination must go on with the heartbeat."""
    ram_mib = env.args.live_ram_mib
    src_ram = shm_path("live-src")
    dst_ram = shm_path("live-dst")
    src = dst = None
    try:
        # Random, not zero, RAM behind the guest (what the kernel does not overwrite stays
        # random), so the migration carries real data, not just zero pages.
        with open(template, "rb") as r, open(src_ram, "wb") as w:
            left = ram_mib << 20
            while left > 0:
                chunk = r.read(min(left, 16 << 20)) or b"\0" * min(left, 16 << 20)
                w.write(chunk)
                left -= len(chunk)
        src = Qemu(env.work, "live-src", src_ram, ram_mib, incoming=False, prealloc=False,
                   paused=False, guest=guest)
        t_boot = time.time()
        first = wait_heartbeat(src.serial, 0, 300, src)[-1]
        boot_s = time.time() - t_boot
        wait_heartbeat(src.serial, first + 2, 60, src)  # dirtying for a good second
        dst = Qemu(env.work, "live-dst", dst_ram, ram_mib, incoming=True, prealloc=True,
                   paused=False, guest=guest)
        try:
            elapsed, r, _ = migrate(env, route, src, dst, multifd, live=True)
        except Exception as e:
            raise RuntimeError(f"{e}{qemu_complaints(src, dst)}") from None
        r["elapsed"] = elapsed
        r["boot_s"] = boot_s
        last_src = heartbeats(src.serial)[-1]
        hb = wait_heartbeat(dst.serial, 0, 30, dst)
        r["heartbeat"] = (last_src, hb[0])
        if hb[0] > last_src + 1:
            raise RuntimeError(f"destination heartbeat jumped from {last_src} to {hb[0]}")
        return r
    finally:
        for q in (src, dst):
            if q:
                q.stop()
        remove(src_ram)
        remove(dst_ram)


def run_all(env, live_routes, template, all_runs):
    """Builds the test guest if it is missing, then every route, --live-runs rounds.
    Appends each run to all_runs; returns the rows (route, multifd, numbers, error)."""
    a = env.args
    live_rows = []
    guest = (os.path.join(GUEST_DIR, "vmlinuz"), os.path.join(GUEST_DIR, "initramfs.img"))
    if not all(os.path.exists(p) for p in guest):
        print("\nbuilding the test guest (scripts/guest-image.sh) ...", flush=True)
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "guest-image.sh")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"guest-image.sh failed: {r.stderr.strip()[-300:]}")
    print(f"\nLive guest: {a.live_ram_mib} MiB (random RAM under it), TCG, dirtying 16 MiB"
          f" continuously; {streams_label(a.live_multifd)}; {a.live_runs} run(s) per route", flush=True)
    for i in range(a.live_runs):
        for route in live_routes:
            try:
                if not all(os.path.exists(p) for p in guest):
                    raise RuntimeError(f"no test guest in {GUEST_DIR} (scripts/guest-image.sh)")
                r = run_live(env, route, a.live_multifd, template, guest)
            except Exception as e:
                print(f"  live {route:8} FAILED: {e}", flush=True)
                live_rows.append((route, a.live_multifd, None, str(e)))
                all_runs.append({"live": True, "route": route, "multifd": a.live_multifd, "error": str(e)})
                continue
            extra = f", {r['dirty_syncs']} dirty syncs" if r.get("dirty_syncs") is not None else ""
            mib = f", {r['bytes'] / (1 << 20):.0f} MiB sent" if r.get("bytes") else ""
            print(f"  live {route:8} QEMU total-time {fmt_ms(r.get('qemu_ms'))}, downtime"
                  f" {fmt_ms(r.get('downtime_ms'))}, wall {r['elapsed']:.2f} s{mib}{extra};"
                  f" heartbeat {r['heartbeat'][0]} on the source, then {r['heartbeat'][1]} on"
                  f" the destination (boot took {r['boot_s']:.0f} s)", flush=True)
            live_rows.append((route, a.live_multifd, r, None))
            all_runs.append({"live": True, "route": route, "multifd": a.live_multifd, **r})
    return live_rows


def summarize_live(live_rows):
    out = []
    for route in dict.fromkeys(r for r, *_ in live_rows):
        mine = [x for x in live_rows if x[0] == route]
        ok = [r for _, _, r, err in mine if not err]
        errs = [err for *_, err in mine if err]
        out.append({"route": route, "multifd": mine[0][1], "n": len(ok), "failed": len(errs),
                    "error": errs[-1] if errs else None,
                    "total": med_range([r.get("qemu_ms") for r in ok]),
                    "downtime": med_range([r.get("downtime_ms") for r in ok]),
                    "wall": statistics.median(r["elapsed"] for r in ok) if ok else None})
    return out
