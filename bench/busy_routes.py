"""The busy guest of migrate_bench.py (--busy, --busy-only; off by default: it takes minutes).

The test guest booted with vmferry.busy=MIB rewrites that much memory without pause, faster
than a link capped at --busy-cap carries it, so pre-copy alone never converges. It migrates
over plain QEMU post-copy (plain_postcopy_migrate, driven the way vmferry's daemons drive
it), vmferry --postcopy over direct and tunnel, and vmferry --auto-converge over direct
(vmferry_busy_migrate): BUSY_ROUTES. run_busy() checks that the guest counts on at the
destination past its next memory check, which must say ok; run_all() runs every route
--runs rounds, interleaved; summarize_busy(), print_busy() and print_busy_markdown() report
the ratios to plain post-copy.

Processes, QEMU and QMP come from benchlib, which registers everything for its one cleanup;
this module must never leave a QEMU, vmferry controller or /dev/shm file behind.
"""
import json
import os
import re
import statistics
import subprocess
import threading
import time

from benchlib import (GUEST_APPEND, GUEST_DIR, PROCS, ROOT, VMFERRY, Qemu, Qmp, fmt_ms, free_port,
                      heartbeats, kill, loadavg, med_range, qemu_complaints, remove, shm_path, spawn,
                      wait_heartbeat)

BUSY_ROUTES = ("plain-postcopy", "postcopy-direct", "postcopy-tunnel", "autoconv-direct")
BUSY_POLL = 0.005  # how often the source is asked, as vmferry's source daemon does


def memchecks(path):
    """[(beat, ok)] of the guest's 'vmferry-memcheck ok|BAD N' lines."""
    try:
        with open(path, errors="replace") as f:
            return [(int(n), w == "ok") for w, n in re.findall(r"vmferry-memcheck (ok|BAD) (\d+)", f.read())]
    except OSError:
        return []


def plain_postcopy_migrate(env, src, dst):
    """Plain QEMU post-copy over TCP, the way vmferry's daemons drive it: postcopy-ram on
    both QEMUs (and postcopy-preempt where both have it, as vmferry does), max-bandwidth
    and max-postcopy-bandwidth = the cap on the source, and migrate-start-postcopy once
    the first full pass is done (dirty-sync-count >= 2), the source polled every 5 ms.
    Times run from the migrate command."""
    a = env.args
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    with Qmp(dst.qmp) as qd, Qmp(src.qmp) as qs:
        offered = [{c["capability"] for c in q.cmd("query-migrate-capabilities")} for q in (qd, qs)]
        preempt = all("postcopy-preempt" in o for o in offered)
        for q in (qd, qs):
            caps = [{"capability": "multifd", "state": False},
                    {"capability": "postcopy-ram", "state": True}]
            if preempt:
                caps.append({"capability": "postcopy-preempt", "state": True})
            q.cmd("migrate-set-capabilities", capabilities=caps)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": a.busy_cap,
                                            "max-postcopy-bandwidth": a.busy_cap})
        qd.cmd("migrate-incoming", uri=uri)
        t0 = time.perf_counter()
        qs.cmd("migrate", uri=uri)
        deadline = time.time() + a.busy_timeout
        asked = pc_at = None
        progress, progress_at = -1, time.time()
        while True:
            info = qs.cmd("query-migrate")
            status = info.get("status")
            now = time.perf_counter() - t0
            ram = info.get("ram", {})
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"source: migration {status}: {info.get('error-desc')}")
            if asked is None and status == "active" and ram.get("dirty-sync-count", 0) >= 2:
                qs.cmd("migrate-start-postcopy")
                asked = now
            if pc_at is None and status == "postcopy-active":
                pc_at = now
            sent = ram.get("transferred", 0)
            if sent != progress:
                progress, progress_at = sent, time.time()
            elif time.time() - progress_at > 30:
                raise RuntimeError(f"stalled: nothing sent for 30 s (source {status}, {sent >> 20} MiB sent)")
            if dst.p.poll() is not None:
                raise RuntimeError(f"destination QEMU exited: {dst.stderr_tail()}")
            if time.time() > deadline and status != "postcopy-active":
                raise RuntimeError(f"timed out after {a.busy_timeout} s (source {status})")
            time.sleep(BUSY_POLL)
    elapsed = time.perf_counter() - t0
    return elapsed, {"qemu_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                     "postcopy_s": elapsed - pc_at if pc_at is not None else None,
                     "bytes": ram.get("transferred"), "passes": ram.get("dirty-sync-count"),
                     "throttle": None}


def vmferry_busy_migrate(env, route, src, dst):
    """vmferry migrate in attach mode with the cap, --postcopy or --auto-converge; the
    post-copy time is taken from its --json progress lines (the first that says
    postcopy-active, until the first that says completed, or the result)."""
    a = env.args
    if env.daemons is None:
        raise RuntimeError(f"vmferry daemons unavailable: {env.daemons_error}")
    for d in env.daemons:
        d.ensure()
    mode, transport = route.split("-")
    cmd = [VMFERRY, "migrate", "--from", env.daemons[0].addr, "--to", env.daemons[1].addr,
           "--src-qmp", src.qmp, "--dst-qmp", dst.qmp, "--certs", env.certs, "--json",
           "--transport", transport, "--max-bandwidth", str(a.busy_cap),
           "--timeout", str(a.busy_timeout)]
    cmd += ["--postcopy"] if mode == "postcopy" else ["--auto-converge"]
    lines = []  # (seconds since start, parsed line), stamped as they arrive
    errpath = os.path.join(env.work, "busy-migrate.stderr")
    t0 = time.perf_counter()
    with open(errpath, "w") as errf:
        p = spawn(cmd, stdout=subprocess.PIPE, stderr=errf, text=True)

    def read_stdout():
        for line in p.stdout:
            try:
                lines.append((time.perf_counter() - t0, json.loads(line)))
            except ValueError:
                pass

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        p.wait(timeout=a.busy_timeout + 60)
    except subprocess.TimeoutExpired:
        kill(p)
        raise RuntimeError(f"vmferry migrate did not return within {a.busy_timeout + 60} s")
    reader.join(timeout=5)
    elapsed = time.perf_counter() - t0
    PROCS.remove(p)
    with open(errpath, errors="replace") as f:
        err = f.read()
    result = next((o for _, o in reversed(lines) if o.get("event") == "result"), None)
    if p.returncode != 0 or not result or not result.get("ok"):
        msg = (result or {}).get("error") or err.strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
        msg = msg if isinstance(msg, str) else msg[0]
        last = next((o for _, o in reversed(lines) if o.get("event") == "progress"), None)
        if last:  # how far it got: the pass, the throttle
            top = max(o.get("throttle_pct") or 0 for _, o in lines if o.get("event") == "progress")
            msg += (f" (after {elapsed:.0f} s; last seen: QEMU {last.get('status')}, pass {last.get('pass')},"
                    f" {(last.get('ram_transferred') or 0) >> 20} MiB sent, dirtying"
                    f" {(last.get('dirty_rate') or 0) / (1 << 20):.1f} MiB/s; highest throttle {top}%)")
        raise RuntimeError(msg)
    if result.get("transport") != transport:
        raise RuntimeError(f"asked for transport {transport}, got {result.get('transport')}")
    progress = [(t, o) for t, o in lines if o.get("event") == "progress"]
    pc_at = next((t for t, o in progress if o.get("status") == "postcopy-active"), None)
    done_at = next((t for t, o in progress if o.get("status") == "completed"),
                   next(t for t, o in lines if o.get("event") == "result"))
    if mode == "postcopy" and pc_at is None:
        print(f"    ({route}: no progress line showed postcopy-active; it went too fast to see,"
              " or pre-copy converged)", flush=True)
    return elapsed, {"qemu_ms": result.get("qemu_total_time_ms"), "downtime_ms": result.get("downtime_ms"),
                     "postcopy_s": done_at - pc_at if pc_at is not None else None,
                     "bytes": result.get("bytes"),
                     "passes": max((o.get("pass") or 0 for _, o in progress), default=None),
                     "throttle": max((o.get("throttle_pct") or 0 for _, o in progress), default=None)}


def run_busy(env, route, guest):
    """Boots the test guest with vmferry.busy=MIB, migrates it over the capped route, then
    checks that it counts on at the destination past its next memory check, which must say ok."""
    a = env.args
    append = f"{GUEST_APPEND} vmferry.busy={a.busy_mib}"
    src_ram = shm_path("busy-src")
    dst_ram = shm_path("busy-dst")
    src = dst = None
    try:
        if a.busy_fill == "random":
            with open("/dev/urandom", "rb") as r, open(src_ram, "wb") as w:
                for _ in range(a.busy_ram_mib):
                    w.write(r.read(1 << 20))
        src = Qemu(env.work, "busy-src", src_ram, a.busy_ram_mib, incoming=False, prealloc=False,
                   paused=False, guest=guest, append=append)
        t_boot = time.time()
        first = wait_heartbeat(src.serial, 0, 300, src)[-1]
        boot_s = time.time() - t_boot
        with open(src.serial, errors="replace") as f:
            if f"dirtying {a.busy_mib} MiB" not in f.read():
                raise RuntimeError("the guest does not say it dirties memory: is the test guest"
                                   " image older than vmferry.busy= (run scripts/guest-image.sh)?")
        wait_heartbeat(src.serial, first + 2, 60, src)  # busy for a good second
        dst = Qemu(env.work, "busy-dst", dst_ram, a.busy_ram_mib, incoming=True, prealloc=True,
                   paused=False, guest=guest, append=append)
        try:
            if route == "plain-postcopy":
                elapsed, r = plain_postcopy_migrate(env, src, dst)
            else:
                elapsed, r = vmferry_busy_migrate(env, route, src, dst)
        except Exception as e:
            raise RuntimeError(f"{e}{qemu_complaints(src, dst)}") from None
        r["elapsed"] = elapsed
        r["boot_s"] = boot_s
        last_src = heartbeats(src.serial)[-1]
        src.stop()  # its CPU is the destination's from here on
        try:
            hb = wait_heartbeat(dst.serial, 0, 60, dst)
        except RuntimeError as e:
            # Say whether QEMU ran the guest at all: a guest that stopped counting and a
            # destination left paused are different failures.
            try:
                with Qmp(dst.qmp) as q:
                    st = q.cmd("query-status")
                raise RuntimeError(f"{e} (destination QEMU: {st.get('status')})") from None
            except OSError:
                raise e from None
        r["heartbeat"] = (last_src, hb[0])
        next_check = (hb[-1] // 20 + 1) * 20
        r["guest_ok"] = False
        if hb[0] > last_src + 1:
            r["guest_error"] = f"destination heartbeat jumped from {last_src} to {hb[0]}"
            return r
        try:
            wait_heartbeat(dst.serial, next_check, 90, dst)
        except RuntimeError as e:
            r["guest_error"] = f"the guest stopped counting on the destination: {e}"
            return r
        checks = memchecks(dst.serial)
        r["memcheck"] = checks[-1] if checks else None
        if any(not ok for _, ok in checks):
            r["guest_error"] = f"memcheck BAD at beat {next(n for n, ok in checks if not ok)}"
        elif not any(n >= next_check for n, _ in checks):
            r["guest_error"] = f"no memcheck at beat {next_check} on the destination"
        else:
            r["guest_ok"] = True
        return r
    finally:
        for q in (src, dst):
            if q:
                q.stop()
        remove(src_ram)
        remove(dst_ram)


def run_all(env, busy_routes, all_runs):
    """(Re)builds the test guest, then every route, --runs rounds, interleaved (the order
    rotating each round); prints the table. Appends each run to all_runs; returns (rows,
    summary, load average at the start and the end)."""
    a = env.args
    busy_rows = []
    guest = (os.path.join(GUEST_DIR, "vmlinuz"), os.path.join(GUEST_DIR, "initramfs.img"))
    # Always: it rebuilds only if the image is older than the guest scripts, and an
    # image from before vmferry.busy= would not dirty anything.
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "guest-image.sh")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"guest-image.sh failed: {r.stderr.strip()[-300:]}")
    busy_start = loadavg()
    print(f"\nBusy guest: {a.busy_ram_mib} MiB ({a.busy_fill} RAM under it), TCG, rewriting"
          f" {a.busy_mib} MiB without pause, link capped at {a.busy_cap} B/s; {a.runs} run(s)"
          f" per route, interleaved; load average {busy_start}", flush=True)
    for i in range(a.runs):
        k = i % len(busy_routes)
        for route in busy_routes[k:] + busy_routes[:k]:
            try:
                if not all(os.path.exists(p) for p in guest):
                    raise RuntimeError(f"no test guest in {GUEST_DIR} (scripts/guest-image.sh)")
                r = run_busy(env, route, guest)
            except Exception as e:
                print(f"  busy {route:16} FAILED: {e}", flush=True)
                busy_rows.append((route, None, str(e)))
                all_runs.append({"busy": True, "route": route, "error": str(e)})
                continue
            pc = f", post-copy {r['postcopy_s']:.1f} s" if r.get("postcopy_s") is not None else ""
            thr = f", throttle up to {r['throttle']}%" if r.get("throttle") else ""
            passes = f", {r['passes']} passes" if r.get("passes") is not None else ""
            mib = f", {r['bytes'] / (1 << 20):.0f} MiB sent" if r.get("bytes") else ""
            mc = r.get("memcheck")
            guest_said = (f"memcheck {'ok' if mc[1] else 'BAD'} at {mc[0]}" if mc else "no memcheck")
            verdict = "ok" if r["guest_ok"] else f"NOT OK: {r.get('guest_error')}"
            print(f"  busy {route:16} total {fmt_ms(r.get('qemu_ms'))}, downtime"
                  f" {fmt_ms(r.get('downtime_ms'))}{pc}, wall {r['elapsed']:.1f} s{mib}{passes}{thr};"
                  f" heartbeat {r['heartbeat'][0]} on the source, then {r['heartbeat'][1]} on the"
                  f" destination, {guest_said}: {verdict} (boot took {r['boot_s']:.0f} s)", flush=True)
            busy_rows.append((route, r, None))
            all_runs.append({"busy": True, "route": route, **r})
    busy_load = (busy_start.split()[0], loadavg().split()[0])
    busy_summary = summarize_busy(busy_rows, busy_routes)
    print_busy(busy_summary, a, busy_load)
    return busy_rows, busy_summary, busy_load


def summarize_busy(busy_rows, routes):
    out = []
    for route in routes:
        mine = [x for x in busy_rows if x[0] == route]
        ok = [r for _, r, err in mine if not err]
        errs = [err for _, _, err in mine if err]
        bad = [r.get("guest_error") for r in ok if not r.get("guest_ok")]

        def med(key):
            vals = [r[key] for r in ok if r.get(key) is not None]
            return statistics.median(vals) if vals else None

        out.append({"route": route, "n": len(ok), "failed": len(errs), "error": errs[-1] if errs else None,
                    "total": med_range([r.get("qemu_ms") for r in ok]),
                    "downtime": med_range([r.get("downtime_ms") for r in ok]),
                    "postcopy": med_range([r.get("postcopy_s") for r in ok], unit="s", digits=1),
                    "wall": med_range([r.get("elapsed") for r in ok], unit="s", digits=1),
                    "total_med": med("qemu_ms"), "downtime_med": med("downtime_ms"),
                    "throttle": med("throttle") if route.startswith("autoconv") else None,
                    "guest": f"{len(ok) - len(bad)}/{len(ok)} ok" if ok else "–",
                    "guest_error": bad[-1] if bad else None})
    base = next((s for s in out if s["route"] == "plain-postcopy" and s["total_med"]), None)
    for s in out:
        s["vs_total"] = s["total_med"] / base["total_med"] if base and s["total_med"] else None
        s["vs_downtime"] = (s["downtime_med"] - base["downtime_med"]
                            if base and s["downtime_med"] is not None and base["downtime_med"] is not None
                            else None)
        s["vs_downtime_x"] = (s["downtime_med"] / base["downtime_med"]
                              if s["vs_downtime"] is not None and base["downtime_med"] else None)
    return out


def busy_vs(s):
    if s["route"] == "plain-postcopy" or s["vs_total"] is None:
        return "–", "–"
    total = f"{s['vs_total']:.2f}x"
    dt = f"{s['vs_downtime']:+.0f} ms" + (f" ({s['vs_downtime_x']:.2f}x)" if s["vs_downtime_x"] else "")
    return total, dt


def print_busy(summary, a, load):
    print(f"\nBusy guest: {a.busy_ram_mib} MiB ({a.busy_fill} RAM under it), vmferry.busy={a.busy_mib},"
          f" cap {a.busy_cap} B/s ({a.busy_cap / (1 << 20):.1f} MiB/s); medians (min–max) of"
          f" {a.runs} run(s), interleaved; load average {load[0]} at the start, {load[1]} at the end")
    print("total: QEMU's total-time on the source (migrate command to completed); downtime: QEMU's;"
          " post-copy: postcopy-active to completed, as seen by polling (vmferry: its progress lines);"
          " guest: counted on at the destination past its next memcheck, which said ok")
    print()
    print(f"{'route':16} {'n':>3} {'total':>24} {'downtime':>22} {'post-copy':>18} {'wall':>18}"
          f" {'guest':>7} {'total vs plain':>15} {'downtime vs plain':>20}")
    for s in summary:
        n = f"{s['n']}" + (f"+{s['failed']}✗" if s["failed"] else "")
        if not s["n"]:
            print(f"{s['route']:16} {n:>3} FAILED: {s['error']}")
            continue
        vt, vd = busy_vs(s)
        print(f"{s['route']:16} {n:>3} {s['total']:>24} {s['downtime']:>22} {s['postcopy']:>18}"
              f" {s['wall']:>18} {s['guest']:>7} {vt:>15} {vd:>20}")
        if s["throttle"] is not None:
            print(f"{'':20} (auto-converge throttle reached {s['throttle']:.0f}%, median)")
        if s["failed"]:
            print(f"{'':20} and {s['failed']} failed run(s), the last: {s['error']}")
        if s["guest_error"]:
            print(f"{'':20} guest: {s['guest_error']}")
    targets = [s for s in summary if s["route"].startswith("postcopy-") and s["vs_total"] is not None]
    if targets:
        print("\ngoal: vmferry post-copy total time <= 1.3x plain post-copy, downtime within 20 ms of it:")
        for s in targets:
            ok = s["vs_total"] <= 1.3 and abs(s["vs_downtime"]) <= 20
            print(f"  {s['route']:16} total {s['vs_total']:.2f}x, downtime {s['vs_downtime']:+.0f} ms:"
                  f" {'met' if ok else 'NOT met'}")


def print_busy_markdown(summary, a, load):
    print()
    print(f"Busy guest ({a.busy_ram_mib} MiB, {a.busy_fill} RAM under it, `vmferry.busy={a.busy_mib}`,"
          f" cap {a.busy_cap / (1 << 20):g} MiB/s, TCG; load average {load[0]} at the start, {load[1]} at"
          " the end; medians, min–max), QEMU's total-time and downtime from query-migrate on the source:")
    print()
    print("| route           | runs | total time               | downtime             | post-copy          | guest  | total vs plain | downtime vs plain |")
    print("|-----------------|------|--------------------------|----------------------|--------------------|--------|----------------|-------------------|")
    for s in summary:
        runs = f"{s['n']}" + (f"+{s['failed']}✗" if s["failed"] else "")
        if not s["n"]:
            print(f"| {s['route']:15} | {runs:4} | failed                   | –                    | –                  | –      | –              | –                 |")
            continue
        vt, vd = busy_vs(s)
        print(f"| {s['route']:15} | {runs:4} | {s['total']:24} | {s['downtime']:20} | {s['postcopy']:18}"
              f" | {s['guest']:6} | {vt:14} | {vd:17} |")
    for s in summary:
        if s["failed"]:
            print(f"\n✗ busy {s['route']}: {s['failed']} failed run(s): {s['error']}"[:400].replace("|", "/"))
