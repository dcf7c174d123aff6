"""The paused guest of migrate_bench.py (the default scenario), and the routes it and the
live guest (live_routes) migrate over.

Each route (plain, plain-unix, qemu-tls, stunnel, relay: QEMU driven over QMP; direct,
reverse, tunnel, vmferry, direct-zstd, tunnel-zstd: `vmferry migrate` in attach mode
between two vmferry daemons) is driven by migrate(). run_paused() migrates a paused guest
with --ram-mib MiB of RAM from a template on /dev/shm and checks the destination RAM byte
for byte; run_all() runs every (route, stream count) cell, interleaved, with retries and a
failure limit; summarize() and print_paused() make the table.

Processes, QEMU, QMP and the carriers come from benchlib, which registers everything for its
one cleanup; this module must never leave a QEMU, daemon, relay or /dev/shm file behind.
"""
import datetime
import json
import os
import statistics
import subprocess
import time

from benchlib import (PROCS, UNLIMITED, VMFERRY, Qemu, Qmp, children_cpu, cpu_seconds, fmt_ms,
                      free_port, kill, qemu_complaints, remove, shm_path, spawn, start_relay,
                      stop_relays,
                      streams_label)

QEMU_ROUTES = ("plain", "plain-unix", "qemu-tls", "stunnel", "relay")
VMFERRY_ROUTES = ("direct", "reverse", "tunnel", "vmferry", "direct-zstd", "tunnel-zstd")
ALL_ROUTES = QEMU_ROUTES + VMFERRY_ROUTES


def qemu_route_migrate(env, route, src, dst, multifd, live):
    """plain / qemu-tls / stunnel / relay: drives both QEMUs over QMP. Returns (elapsed s,
    source query-migrate info, carrier pids)."""
    carrier = []
    relays = []
    if route == "relay":
        port = free_port()
        dst_uri = f"tcp:127.0.0.1:{port}"
        # socat dials onward only once dialed itself, so it may start before QEMU listens.
        entry, relays = start_relay(port)
        src_uri = f"tcp:127.0.0.1:{entry}"
    elif route == "stunnel":
        if env.stunnel is None:
            raise RuntimeError(f"stunnel unavailable: {env.stunnel_error}")
        env.stunnel.alive()
        carrier = env.stunnel.pids
        dst_uri = f"tcp:127.0.0.1:{env.stunnel.dst_port}"
        src_uri = f"tcp:127.0.0.1:{env.stunnel.client_port}"
    elif route == "plain-unix":
        dst_uri = src_uri = f"unix:{os.path.join(env.work, f'plain-{free_port()}.sock')}"
    else:
        port = free_port()
        dst_uri = src_uri = f"tcp:127.0.0.1:{port}"
    t0 = time.perf_counter()
    with Qmp(dst.qmp) as qd, Qmp(src.qmp) as qs:
        for q, side in ((qd, "dst"), (qs, "src")):
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "multifd", "state": multifd > 0}])
            params = {"max-bandwidth": UNLIMITED}
            if multifd:
                params["multifd-channels"] = multifd
            if route == "qemu-tls":
                q.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": env.x509,
                                       "endpoint": "server" if side == "dst" else "client",
                                       "verify-peer": True})
                params["tls-creds"] = "tls0"
                if side == "src":
                    params["tls-hostname"] = "localhost"
            q.cmd("migrate-set-parameters", **params)
        qd.cmd("migrate-incoming", uri=dst_uri)
        qs.cmd("migrate", uri=src_uri)
        deadline = time.time() + env.args.timeout
        polls = 0
        progress, progress_at = -1, time.time()
        while True:
            d = qd.cmd("query-migrate")
            if d.get("status") == "completed":
                elapsed = time.perf_counter() - t0
                break
            if d.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"destination: migration {d['status']}: {d.get('error-desc')}")
            polls += 1
            if polls % 20 == 0:  # the source too, less often (every ~0.1 s)
                s = qs.cmd("query-migrate")
                if s.get("status") in ("failed", "cancelled"):
                    raise RuntimeError(f"source: migration {s['status']}: {s.get('error-desc')}")
                sent = s.get("ram", {}).get("transferred", 0)
                if sent != progress:
                    progress, progress_at = sent, time.time()
                elif time.time() - progress_at > env.args.stall:
                    raise RuntimeError(
                        f"stalled: no progress for {env.args.stall} s (source {s.get('status')}, "
                        f"{sent >> 20} MiB sent; destination status {d.get('status')})")
                if dst.p.poll() is not None:
                    raise RuntimeError(f"destination QEMU exited: {dst.stderr_tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"timed out after {env.args.timeout} s (destination status"
                                   f" {d.get('status')})")
            time.sleep(0.005)
        while True:
            info = qs.cmd("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled") or time.time() > deadline:
                raise RuntimeError(f"source: migration {info.get('status')}: {info.get('error-desc')}")
            time.sleep(0.005)
    r = {"qemu_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
         "setup_ms": info.get("setup-time"), "bytes": info.get("ram", {}).get("transferred"),
         "dirty_syncs": info.get("ram", {}).get("dirty-sync-count")}
    if relays:
        # The relay children end with their connections; their CPU is the socats'.
        r["relay_cpu"] = stop_relays(relays)
    return elapsed, r, carrier


def vmferry_route_migrate(env, route, src, dst, multifd, live):
    if env.daemons is None:
        raise RuntimeError(f"vmferry daemons unavailable: {env.daemons_error}")
    for d in env.daemons:
        d.ensure()
    transport = "auto" if route == "vmferry" else route.removesuffix("-zstd")
    compress = ["--compress", "zstd"] if route.endswith("-zstd") else []
    cmd = [VMFERRY, "migrate", "--from", env.daemons[0].addr, "--to", env.daemons[1].addr,
           "--src-qmp", src.qmp, "--dst-qmp", dst.qmp, "--certs", env.certs,
           "--multifd", str(multifd), "--json", "--transport", transport,
           "--timeout", str(env.args.timeout)] + compress
    carrier = [d.pid for d in env.daemons]
    c0 = children_cpu()
    wall0 = time.time()
    t0 = time.perf_counter()
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=env.args.timeout + 30)
    except subprocess.TimeoutExpired:
        kill(p)
        raise RuntimeError(f"vmferry migrate did not return within {env.args.timeout + 30} s")
    elapsed = time.perf_counter() - t0
    PROCS.remove(p)
    controller_cpu = children_cpu() - c0
    result = None
    for line in out.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("event") == "result":
            result = obj
    if p.returncode != 0 or not result or not result.get("ok"):
        msg = (result or {}).get("error") or err.strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
        raise RuntimeError(msg if isinstance(msg, str) else msg[0])
    if transport != "auto" and result.get("transport") != transport:
        raise RuntimeError(f"asked for transport {transport}, got {result.get('transport')}")
    r = {"qemu_ms": result.get("qemu_total_time_ms"), "downtime_ms": result.get("downtime_ms"),
         "bytes": result.get("bytes"), "transport": result.get("transport"),
         "streams": result.get("streams"), "controller_cpu": controller_cpu,
         "first_byte_ms": first_byte_ms(env.daemons[1], wall0)}
    return elapsed, r, carrier


def first_byte_ms(dst_daemon, wall0):
    """Milliseconds from the controller's start (`wall0`, time.time()) to the destination
    daemon's "data streams reached QEMU": it connects QEMU once the source's first bytes
    have arrived, so this is the controller's time to the first guest byte. None if the
    daemon's log has no such line since then."""
    best = None
    try:
        with open(dst_daemon.log_path, errors="replace") as f:
            for line in f:
                if "data streams reached QEMU" not in line:
                    continue
                stamp = line.split()[0] if line.strip() else ""
                try:
                    t = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
                if t >= wall0:
                    best = (t - wall0) * 1000
    except OSError:
        return None
    return best


def migrate(env, route, src, dst, multifd, live=False):
    fn = qemu_route_migrate if route in QEMU_ROUTES else vmferry_route_migrate
    return fn(env, route, src, dst, multifd, live)


def run_paused(env, route, multifd, template):
    """One migration of the paused guest; checks the destination RAM byte for byte."""
    ram_mib = env.args.ram_mib
    dst_ram = shm_path("dst")
    src = dst = None
    try:
        src = Qemu(env.work, "src", template, ram_mib, incoming=False, prealloc=False)
        dst = Qemu(env.work, "dst", dst_ram, ram_mib, incoming=True, prealloc=True)
        qemu_pids = [src.pid, dst.pid]
        if route in VMFERRY_ROUTES and env.daemons:
            for d in env.daemons:
                d.ensure()
        carrier = ([d.pid for d in env.daemons] if route in VMFERRY_ROUTES and env.daemons else
                   env.stunnel.pids if route == "stunnel" and env.stunnel else [])
        s0, d0 = cpu_seconds([src.pid]), cpu_seconds([dst.pid])
        c0 = cpu_seconds(carrier)
        try:
            elapsed, r, carrier = migrate(env, route, src, dst, multifd)
        except Exception as e:
            raise RuntimeError(f"{e}{qemu_complaints(src, dst)}") from None
        r["cpu_src"] = cpu_seconds([src.pid]) - s0
        r["cpu_dst"] = cpu_seconds([dst.pid]) - d0
        r["cpu_qemu"] = r["cpu_src"] + r["cpu_dst"]
        # The carrier: vmferry's daemons and controller, stunnel, or the socat relays.
        r["cpu_carrier"] = (cpu_seconds(carrier) - c0 + r.get("controller_cpu", 0.0)
                            + r.get("relay_cpu", 0.0))
        r["cpu"] = r["cpu_qemu"] + r["cpu_carrier"]
        r["elapsed"] = elapsed
        if subprocess.run(["cmp", "-s", template, dst_ram]).returncode != 0:
            raise RuntimeError("destination RAM differs from the source RAM")
        return r
    finally:
        for q in (src, dst):
            if q:
                q.stop()
        remove(dst_ram)


def run_all(env, cells, template, gib, all_runs):
    """Every (route, stream count) cell, --warmup + --runs rounds, interleaved (the order
    rotating each round), a failed run tried again (--retries), a cell left out after
    --max-failures. Appends each run to all_runs; returns (results, failures) per cell."""
    a = env.args
    results = {c: [] for c in cells}
    failures = {c: [] for c in cells}
    total = len(cells) * (a.runs + a.warmup)
    if cells:
        print(f"{len(cells)} routes x stream counts, {a.warmup} warm-up + {a.runs} runs each:"
              f" {total} migrations of {a.ram_mib} MiB", flush=True)
    for i in range(a.warmup + a.runs if cells else 0):
        tag = f"warm-up {i + 1}" if i < a.warmup else f"run {i - a.warmup + 1}/{a.runs}"
        k = i % len(cells)
        for cell in cells[k:] + cells[:k]:  # interleaved, the order rotating each round
            route, mfd = cell
            for attempt in range(1 + a.retries):
                if len(failures[cell]) >= a.max_failures:
                    break
                try:
                    r = run_paused(env, route, mfd, template)
                except Exception as e:
                    failures[cell].append(str(e))
                    if len(failures[cell]) >= a.max_failures:
                        e = f"{e} (failed {len(failures[cell])} times: left out from now on)"
                    elif attempt < a.retries:
                        e = f"{e} (trying again)"
                    print(f"  {tag:11} {route:8} {streams_label(mfd):10} FAILED: {e}", flush=True)
                    all_runs.append({"route": route, "multifd": mfd, "round": tag, "error": str(e)})
                    continue
                extra = f"  transport {r['transport']}" if r.get("transport") and route == "vmferry" else ""
                print(f"  {tag:11} {route:8} {streams_label(mfd):10} {r['elapsed']:6.3f} s"
                      f" {gib / r['elapsed']:5.2f} GiB/s  QEMU {fmt_ms(r.get('qemu_ms')):>8}"
                      f"  cpu {r['cpu']:5.2f} s (QEMU src {r['cpu_src']:.2f} dst {r['cpu_dst']:.2f},"
                      f" carrier {r['cpu_carrier']:.2f})  RAM identical{extra}",
                      flush=True)
                all_runs.append({"route": route, "multifd": mfd, "round": tag, **r})
                if i >= a.warmup:
                    results[cell].append(r)
                break
    return results, failures


def summarize(cells, results, failures, gib):
    """Returns rows: dicts with the numbers of each (route, multifd) cell."""
    rows = []
    for route, mfd in cells:
        runs = results[(route, mfd)]
        fails = failures[(route, mfd)]
        row = {"route": route, "multifd": mfd, "n": len(runs), "failed": len(fails),
               "error": fails[-1] if fails else None}
        if runs:
            ts = [r["elapsed"] for r in runs]
            row.update(median=statistics.median(ts), min=min(ts), max=max(ts),
                       gibps=gib / statistics.median(ts),
                       qemu_ms=statistics.median([r["qemu_ms"] for r in runs if r.get("qemu_ms") is not None] or [0]),
                       cpu=statistics.median(r["cpu"] for r in runs) / gib,
                       cpu_qemu=statistics.median(r["cpu_qemu"] for r in runs) / gib,
                       cpu_src=statistics.median(r["cpu_src"] for r in runs) / gib,
                       cpu_dst=statistics.median(r["cpu_dst"] for r in runs) / gib,
                       cpu_carrier=statistics.median(r["cpu_carrier"] for r in runs) / gib)
            firsts = [r["first_byte_ms"] for r in runs if r.get("first_byte_ms") is not None]
            row["first_byte_ms"] = statistics.median(firsts) if firsts else None
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if b["route"] == "plain" and b["multifd"] == row["multifd"]
                     and b.get("median")), None)
        row["ratio"] = row["median"] / base["median"] if base and row.get("median") else None
    return rows


def print_paused(rows, a):
    print()
    print(f"Paused guest, {a.ram_mib} MiB {a.ram_pattern} RAM; medians of {a.runs} runs after {a.warmup}"
          " warm-up, interleaved; destination RAM verified byte-identical every run.")
    print("vs plain: median wall time / plain TCP's with the same stream count.  QEMU ms: QEMU's"
          " total-time on the source.")
    print("cpu s/GiB: both QEMUs + the carrier (stunnel, the socat relays, or both vmferry daemons"
          " + controller); then each share: QEMUs, source QEMU, destination QEMU, carrier"
          " (each a median of its own, so they need not add up exactly).  1st byte: vmferry"
          " routes, from starting `vmferry migrate` to the destination daemon connecting QEMU"
          " on the source's first bytes (its log).")
    print()
    print_table(rows, a.runs)


def first_byte_label(ms):
    return "-" if ms is None else f"{ms:.0f} ms"


def print_table(rows, runs):
    print(f"{'route':11} {'streams':10} {'n':>2} {'median s':>9} {'min-max s':>13} {'GiB/s':>6}"
          f" {'vs plain':>9} {'QEMU ms':>8} {'cpu s/GiB':>10} {'QEMUs':>6} {'src':>5} {'dst':>5}"
          f" {'carrier':>7} {'1st byte':>8}")
    last = None
    for row in rows:
        if last is not None and row["multifd"] != last:
            print()
        last = row["multifd"]
        head = f"{row['route']:11} {streams_label(row['multifd']):10} {row['n']:>2}"
        if row.get("median") is None:
            print(f"{head} FAILED: {row['error']}")
            continue
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        print(f"{head} {row['median']:9.3f} {row['min']:6.3f}-{row['max']:<6.3f} {row['gibps']:6.2f}"
              f" {ratio:>9} {row['qemu_ms']:8.0f} {row['cpu']:10.2f} {row['cpu_qemu']:6.2f}"
              f" {row['cpu_src']:5.2f} {row['cpu_dst']:5.2f} {row['cpu_carrier']:7.2f}"
              f" {first_byte_label(row.get('first_byte_ms')):>8}")
        if row["failed"]:
            print(f"{'':13} and {row['failed']} failed run(s), the last: {row['error']}")
