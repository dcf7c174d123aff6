"""Disk-copy routes of migrate_bench.py (--disk, --disk-only).

A paused guest with --disk-ram-mib MiB of random RAM and a --disk-mib MiB raw disk of
random data (virtio-blk, both on /dev/shm so the carrier, not a disk, is measured)
migrates with its disk copied, the way libvirt does it: destination NBD server and a
writable export, source blockdev-mirror (sync full) onto an nbd client node, every mirror
READY, then the RAM migration with pause-before-switchover; at pre-switchover the mirror is
cancelled (the destination holds a consistent copy) and the migration continues.

Routes, side by side, interleaved (the order rotates every round):
  plain-nbd  QEMU's NBD and migration over TCP, unencrypted: the baseline
  nbd-tls    the same with QEMU's own TLS on both (tls-creds-x509, mutual, verify-peer,
             tls-hostname): QEMU's secure way, which needs a PKI and open ports
  direct, tunnel, reverse
             vmferry migrate --copy-storage all in attach mode, --transport ROUTE
Every run checks that the destination disk and RAM are byte-identical to the source's.

Reports the median total wall time (first command to the destination having everything),
the time until every disk was in sync and its MiB/s, CPU per run (QEMUs + carrier), and
the ratios to plain-nbd; then the issue's goals: vmferry <= 1.3x plain NBD's time, faster
than QEMU NBD+TLS, tunnel >= 0.9x direct's throughput.

This module holds the disk scenario only; processes, QEMU, QMP and the vmferry daemons
come from benchlib, so that everything started is registered in its one cleanup list
(PROCS, PATHS). It must never leave a QEMU, daemon or /dev/shm file behind.
"""
import json
import os
import statistics
import subprocess
import time

from benchlib import (PROCS, UNLIMITED, VMFERRY, Qemu, Qmp, children_cpu, cpu_seconds, fmt_ms,
                      free_port, kill, loadavg, qemu_complaints, remove, shm_path, spawn)

DISK_ROUTES = ("plain-nbd", "nbd-tls", "direct", "tunnel", "reverse")
DEFAULT_DISK_ROUTES = "plain-nbd,nbd-tls,direct,tunnel"


def disk_args(image):
    """One raw virtio-blk disk, node vd0 (node names and device id equal on both sides)."""
    return ["-blockdev", f"driver=file,node-name=file-vd0,filename={image}",
            "-blockdev", "driver=raw,node-name=vd0,file=file-vd0",
            "-device", "virtio-blk-pci,drive=vd0,id=vd0"]


def write_random(path, mib):
    with open("/dev/urandom", "rb") as r, open(path, "wb") as w:
        for _ in range(mib):
            w.write(r.read(1 << 20))


def qemu_disk_migrate(env, route, src, dst):
    """plain-nbd / nbd-tls, driven over QMP as libvirt drives QEMU 7.2. Returns (elapsed s,
    numbers)."""
    a = env.args
    tls = route == "nbd-tls"
    deadline = time.time() + a.timeout
    t0 = time.perf_counter()
    with Qmp(dst.qmp) as qd, Qmp(src.qmp) as qs:
        for q, side in ((qd, "dst"), (qs, "src")):
            if tls:
                q.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": env.x509,
                                       "endpoint": "server" if side == "dst" else "client",
                                       "verify-peer": True})
            params = {"max-bandwidth": UNLIMITED}
            if tls:
                params["tls-creds"] = "tls0"
                if side == "src":
                    params["tls-hostname"] = "localhost"
            q.cmd("migrate-set-parameters", **params)
        qs.cmd("migrate-set-capabilities",
               capabilities=[{"capability": "pause-before-switchover", "state": True}])
        nbd_port, ram_port = free_port(), free_port()
        start = {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd_port)}}}
        if tls:
            start["tls-creds"] = "tls0"
        qd.cmd("nbd-server-start", **start)
        qd.cmd("block-export-add", **{"type": "nbd", "id": "vd0", "node-name": "vd0", "writable": True})
        node = {"driver": "nbd", "node-name": "tgt0", "export": "vd0",
                "server": {"type": "inet", "host": "127.0.0.1", "port": str(nbd_port)}}
        if tls:
            node["tls-creds"] = "tls0"
            node["tls-hostname"] = "localhost"
        qs.cmd("blockdev-add", **node)
        t_mirror = time.perf_counter()
        qs.cmd("blockdev-mirror", **{"job-id": "m0", "device": "vd0", "target": "tgt0",
                                     "sync": "full", "auto-dismiss": False})
        while True:
            jobs = qs.cmd("query-block-jobs")
            job = next((j for j in jobs if j.get("device") == "m0"), None)
            if job is None or job.get("error"):
                raise RuntimeError(f"mirror failed: {job and job.get('error')}")
            if job.get("ready"):
                in_sync = time.perf_counter() - t_mirror
                break
            if time.time() > deadline:
                raise RuntimeError(f"the mirror was not ready after {a.timeout} s"
                                   f" ({job.get('offset', 0) >> 20} MiB copied)")
            time.sleep(0.02)
        qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{ram_port}")
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{ram_port}")
        while True:
            s = qs.cmd("query-migrate")
            if s.get("status") == "pre-switchover":
                break
            if s.get("status") in ("failed", "cancelled") or time.time() > deadline:
                raise RuntimeError(f"source: migration {s.get('status')}: {s.get('error-desc')}")
            time.sleep(0.005)
        qs.cmd("block-job-cancel", device="m0")
        while True:
            jobs = qs.cmd("query-block-jobs")
            job = next((j for j in jobs if j.get("device") == "m0"), None)
            if job is None or job.get("status") == "concluded":
                break
            if time.time() > deadline:
                raise RuntimeError("the mirror did not end after block-job-cancel")
            time.sleep(0.005)
        if job is not None:
            qs.cmd("job-dismiss", id="m0")
        qs.cmd("migrate-continue", state="pre-switchover")
        while True:
            d = qd.cmd("query-migrate")
            if d.get("status") == "completed":
                elapsed = time.perf_counter() - t0
                break
            if d.get("status") in ("failed", "cancelled") or time.time() > deadline:
                raise RuntimeError(f"destination: migration {d.get('status')}: {d.get('error-desc')}")
            time.sleep(0.005)
        qd.cmd("nbd-server-stop")
        info = qs.cmd("query-migrate")
    return elapsed, {"in_sync_s": in_sync, "downtime_ms": info.get("downtime")}


def vmferry_disk_migrate(env, route, src, dst):
    a = env.args
    if env.daemons is None:
        raise RuntimeError(f"vmferry daemons unavailable: {env.daemons_error}")
    for d in env.daemons:
        d.ensure()
    cmd = [VMFERRY, "migrate", "--from", env.daemons[0].addr, "--to", env.daemons[1].addr,
           "--src-qmp", src.qmp, "--dst-qmp", dst.qmp, "--certs", env.certs, "--json",
           "--transport", route, "--copy-storage", "all", "--timeout", str(a.timeout)]
    c0 = children_cpu()
    t0 = time.perf_counter()
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=a.timeout + 30)
    except subprocess.TimeoutExpired:
        kill(p)
        raise RuntimeError(f"vmferry migrate did not return within {a.timeout + 30} s")
    elapsed = time.perf_counter() - t0
    PROCS.remove(p)
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
    if result.get("transport") != route:
        raise RuntimeError(f"asked for transport {route}, got {result.get('transport')}")
    synced = [d.get("in_sync_ms") for d in result.get("disks", [])]
    if not synced or None in synced:
        raise RuntimeError(f"the result does not say when the disks were in sync: {result.get('disks')}")
    return elapsed, {"in_sync_s": max(synced) / 1000, "downtime_ms": result.get("downtime_ms"),
                     "controller_cpu": children_cpu() - c0}


def run_disk(env, route, ram_template, disk_template):
    """One migration of the paused guest with its disk; checks disk and RAM byte for byte."""
    a = env.args
    dst_ram, dst_disk = shm_path("disk-dst-ram"), shm_path("disk-dst-vd0")
    with open(dst_disk, "wb") as f:
        f.truncate(a.disk_mib << 20)
    src = dst = None
    try:
        src = Qemu(env.work, "disk-src", ram_template, a.disk_ram_mib, incoming=False,
                   prealloc=False, extra=disk_args(disk_template))
        dst = Qemu(env.work, "disk-dst", dst_ram, a.disk_ram_mib, incoming=True,
                   prealloc=True, extra=disk_args(dst_disk))
        qemu_pids = [src.pid, dst.pid]
        vmferry = route not in ("plain-nbd", "nbd-tls")
        carrier = [d.pid for d in env.daemons] if vmferry and env.daemons else []
        q0, c0 = cpu_seconds(qemu_pids), cpu_seconds(carrier)
        try:
            fn = vmferry_disk_migrate if vmferry else qemu_disk_migrate
            elapsed, r = fn(env, route, src, dst)
        except Exception as e:
            raise RuntimeError(f"{e}{qemu_complaints(src, dst)}") from None
        r["cpu_qemu"] = cpu_seconds(qemu_pids) - q0
        r["cpu"] = r["cpu_qemu"] + cpu_seconds(carrier) - c0 + r.get("controller_cpu", 0.0)
        r["elapsed"] = elapsed
        src.stop()
        dst.stop()
        src = dst = None
        if subprocess.run(["cmp", "-s", disk_template, dst_disk]).returncode != 0:
            raise RuntimeError("the destination disk differs from the source disk")
        if subprocess.run(["cmp", "-s", ram_template, dst_ram]).returncode != 0:
            raise RuntimeError("destination RAM differs from the source RAM")
        return r
    finally:
        for q in (src, dst):
            if q:
                q.stop()
        remove(dst_ram)
        remove(dst_disk)


def run_all(env, routes):
    """Every route, --warmup + --runs rounds, interleaved. Returns the summary rows."""
    a = env.args
    ram = shm_path("disk-src-ram")
    disk = shm_path("disk-src-vd0")
    print(f"\nDisk copy: paused guest, {a.disk_ram_mib} MiB random RAM + a {a.disk_mib} MiB raw disk of"
          f" random data (both on /dev/shm); {a.warmup} warm-up + {a.runs} runs per route,"
          f" interleaved; load average {loadavg()}", flush=True)
    write_random(ram, a.disk_ram_mib)
    write_random(disk, a.disk_mib)
    results = {r: [] for r in routes}
    failures = {r: [] for r in routes}
    for i in range(a.warmup + a.runs):
        tag = f"warm-up {i + 1}" if i < a.warmup else f"run {i - a.warmup + 1}/{a.runs}"
        k = i % len(routes)
        for route in routes[k:] + routes[:k]:
            for attempt in range(1 + a.retries):
                if len(failures[route]) >= a.max_failures:
                    break
                try:
                    r = run_disk(env, route, ram, disk)
                except Exception as e:
                    failures[route].append(str(e))
                    print(f"  {tag:11} disk {route:9} FAILED: {e}", flush=True)
                    continue
                mibps = a.disk_mib / r["in_sync_s"] if r["in_sync_s"] else 0
                print(f"  {tag:11} disk {route:9} {r['elapsed']:6.2f} s; disk in sync after"
                      f" {r['in_sync_s']:5.2f} s ({mibps:4.0f} MiB/s); downtime"
                      f" {fmt_ms(r.get('downtime_ms'))}; cpu {r['cpu']:5.2f} s (QEMUs"
                      f" {r['cpu_qemu']:.2f}); disk and RAM identical", flush=True)
                if i >= a.warmup:
                    results[route].append(r)
                break
    remove(ram)
    remove(disk)
    rows = []
    for route in routes:
        runs, fails = results[route], failures[route]
        row = {"route": route, "n": len(runs), "failed": len(fails), "error": fails[-1] if fails else None}
        if runs:
            ts = [r["elapsed"] for r in runs]
            sync = statistics.median(r["in_sync_s"] for r in runs)
            row.update(median=statistics.median(ts), min=min(ts), max=max(ts), in_sync=sync,
                       mibps=a.disk_mib / sync if sync else None,
                       cpu=statistics.median(r["cpu"] for r in runs),
                       cpu_qemu=statistics.median(r["cpu_qemu"] for r in runs))
        rows.append(row)
    base = next((r for r in rows if r["route"] == "plain-nbd" and r.get("median")), None)
    for row in rows:
        if base and row.get("median"):
            row["ratio"] = row["median"] / base["median"]
            row["mibps_ratio"] = (row["mibps"] / base["mibps"]) if row["mibps"] and base["mibps"] else None
    return rows


def goals(rows):
    """The issue's goals, each as (text, met or None when a route is missing)."""
    by = {r["route"]: r for r in rows if r.get("median")}
    out = []
    for v in ("direct", "tunnel"):
        if v in by and "plain-nbd" in by:
            out.append((f"{v} time <= 1.3x plain NBD's ({by[v]['ratio']:.2f}x)", by[v]["ratio"] <= 1.3))
        if v in by and "nbd-tls" in by:
            out.append((f"{v} faster than QEMU NBD+TLS ({by[v]['median']:.2f} s vs"
                        f" {by['nbd-tls']['median']:.2f} s)", by[v]["median"] < by["nbd-tls"]["median"]))
    if "direct" in by and "tunnel" in by:
        t = by["direct"]["median"] / by["tunnel"]["median"]
        out.append((f"tunnel throughput >= 0.9x direct's ({t:.2f}x)", t >= 0.9))
    return out


def print_rows(rows, a, header=None):
    print()
    print(f"Disk copy, {a.disk_mib} MiB disk + {a.disk_ram_mib} MiB RAM; medians of {a.runs} runs;"
          " disk and RAM verified byte-identical every run.")
    print("total: first command until the destination has everything.  in sync: mirror start until"
          " every disk is READY.  cpu: QEMUs + carrier (vmferry: both daemons + controller).")
    print()
    print(f"{'route':10} {'n':>2} {'total s':>8} {'min-max s':>13} {'vs plain':>9} {'in sync s':>10}"
          f" {'disk MiB/s':>11} {'vs plain':>9} {'cpu s':>6} {'(QEMUs)':>8}")
    for row in rows:
        head = f"{row['route']:10} {row['n']:>2}"
        if row.get("median") is None:
            print(f"{head} FAILED: {row['error']}")
            continue
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "-"
        mratio = f"{row['mibps_ratio']:.2f}x" if row.get("mibps_ratio") else "-"
        print(f"{head} {row['median']:8.2f} {row['min']:6.2f}-{row['max']:<6.2f} {ratio:>9}"
              f" {row['in_sync']:10.2f} {row['mibps']:11.0f} {mratio:>9} {row['cpu']:6.2f}"
              f" {row['cpu_qemu']:8.2f}")
        if row["failed"]:
            print(f"{'':13} and {row['failed']} failed run(s), the last: {row['error']}")
    g = goals(rows)
    if g:
        print()
        for text, met in g:
            print(f"  goal: {text}: {'met' if met else 'NOT met'}")


def print_markdown(rows, a, load):
    print()
    print(f"Disk copy ({a.disk_mib} MiB random raw disk + {a.disk_ram_mib} MiB RAM, paused guest;"
          f" medians of {a.runs} runs; load average {load[0]} at the start, {load[1]} at the end):")
    print()
    print("| route     | runs | total      | vs plain NBD | disk in sync | disk MiB/s | vs plain NBD | CPU s |")
    print("|-----------|------|------------|--------------|--------------|------------|--------------|-------|")
    for row in rows:
        runs = f"{row['n']}" + (f"+{row['failed']}✗" if row["failed"] else "")
        if row.get("median") is None:
            print(f"| {row['route']:9} | {runs:4} | failed     | –            | –            | –          | –            | –     |")
            continue
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "–"
        mratio = f"{row['mibps_ratio']:.2f}x" if row.get("mibps_ratio") else "–"
        print(f"| {row['route']:9} | {runs:4} | {row['median']:7.2f} s  | {ratio:>12} |"
              f" {row['in_sync']:9.2f} s  | {row['mibps']:10.0f} | {mratio:>12} | {row['cpu']:5.2f} |")
    g = goals(rows)
    if g:
        print()
    for text, met in g:
        print(f"- {text}: {'met' if met else '**not met**'}")
