#!/usr/bin/env python3
"""Migration benchmark: plain QEMU TCP vs QEMU native TLS vs stunnel vs vmferry.

A paused guest with RAM_MIB of random RAM (a memory-backend-file on /dev/shm, written from
the host) migrates over each route, each with one stream and with multifd, interleaved:
one warm-up round, then RUNS rounds (the order rotates every round). Destination RAM is
preallocated (prealloc=on) for every route alike, before the clock starts. Every run checks
that the destination RAM is byte-identical to the source RAM.

Routes (all on 127.0.0.1; the QEMUs run TCG, which is fine for a paused guest):
  plain     QEMU -> TCP -> QEMU, unencrypted (the baseline)
  qemu-tls  QEMU's own TLS (tls-creds-x509, mutual, verify-peer=on, tls-hostname)
  stunnel   QEMU -> stunnel client -> TLS -> stunnel server -> QEMU (mutual certificates;
            all multifd channels go through the same stunnel port)
  plain-unix  QEMU -> unix socket -> QEMU, unencrypted: what QEMU itself spends on the
            unix sockets vmferry's daemons give it
  relay     QEMU -> socat -> TCP -> socat -> QEMU, unencrypted: the cost of two userspace
            hops alone (vmferry's topology without its TLS); each socat forks one relay per
            connection, so multifd works too
  direct, reverse, tunnel
            vmferry serve (two daemons) + vmferry migrate in attach mode, --transport ROUTE
  vmferry   the same with --transport auto
  direct-zstd, tunnel-zstd
            direct or tunnel with --compress zstd (level 1)
A failed run (say the tunnel transport is mid-change) is reported with its error (and what
the QEMUs wrote on stderr), tried again (--retries), counted, and shown in the tables; a
route that failed --max-failures times is left out from then on; the other routes go on.
Known on QEMU 7.2: multifd through a proxy that connects the channels in its own order
(stunnel) fails often, because the destination QEMU takes the first connection to arrive
as the main channel ("multifd: received packet magic 5145564d expected 11223344").

Prints each run, then per stream count: median wall time, min-max, GiB/s, ratio to plain
TCP with the same stream count, QEMU's own total-time, and CPU seconds per GiB (utime+stime
from /proc of both QEMUs and whatever carries the stream: stunnel, or both vmferry daemons
plus the vmferry controller). Wall time runs from the first QMP command (or the start of
`vmferry migrate`) until the destination has the whole state (for vmferry: until
`vmferry migrate` returns, so its phases and handshakes are included). QEMU's total-time is
the source's view: it ends when the source has written everything, which can be well before
a slower destination (decrypting, say) has read it.

Then (unless --no-live) a live run: the test guest (scripts/guest-image.sh: it dirties 16 MiB
continuously and prints "vmferry-heartbeat N") boots under TCG with the same random RAM
behind it, runs, and migrates live over plain and vmferry direct (--live-routes); reports
QEMU's total-time and downtime from query-migrate on the source (vmferry: its --json
result) and checks that the heartbeat goes on at the destination.

With --busy (off by default: it takes minutes) or --busy-only (nothing else), a busy guest:
the test guest booted with vmferry.busy=MIB (--busy-mib 64) in --busy-ram-mib (384) MiB
rewrites that much memory without pause, faster than a link capped at --busy-cap (10M =
10 MiB/s) carries it, so pre-copy alone never converges. It migrates over plain QEMU
post-copy (postcopy-ram on both, max-bandwidth and max-postcopy-bandwidth = the cap,
migrate-start-postcopy once dirty-sync-count >= 2, as vmferry does), vmferry --postcopy
over direct and tunnel, and vmferry --auto-converge over direct (--busy-routes), --runs
rounds, interleaved. Reports QEMU's total-time and downtime on the source, the time in
post-copy, whether the guest counts on at the destination with its memory check ok, and
the ratios to plain post-copy (goal: vmferry post-copy <= 1.3x the total time, downtime
within 20 ms).

With --disk (off by default) or --disk-only, a paused guest with a local raw disk
(--disk-mib, 1 GiB of random data) and --disk-ram-mib (256) MiB of RAM migrates with its
disk copied: plain NBD (the baseline), QEMU NBD+TLS, vmferry --copy-storage all over direct
and tunnel (--disk-routes); see bench/disk_routes.py.

With --libvirt (off by default) or --libvirt-only, issue 16's benchmark: two libvirt hosts
on this machine (network, mount and UTS namespaces; bench/libvirt_hosts.py), a live
libvirt domain of --libvirt-ram-mib (512) MiB with a --libvirt-disk-mib (1 GiB) qcow2 disk,
migrated by plain libvirt peer to peer over socat forwards (the baseline), libvirt's
tunnelled mode (RAM only) and vmferry migrate --libvirt (--libvirt-routes); see
bench/libvirt_routes.py. Needs libvirtd, virsh, socat, nsenter and unshare.

Last, a Markdown table to paste into the README. This machine is shared and noisy (2
cores): trust the ratios and the CPU numbers more than the absolute times.

Example: python3 bench/migrate_bench.py                    # everything, 5 runs, 1 GiB
         python3 bench/migrate_bench.py --ram-mib 128 --runs 1 --routes plain,direct
         python3 bench/migrate_bench.py --busy-only --runs 3       # the busy guest alone
         python3 bench/migrate_bench.py --disk-only --runs 3       # disk copy alone
         python3 bench/migrate_bench.py --libvirt-only --libvirt-runs 3  # libvirt domains
Needs: qemu-system-x86_64, openssl, a release build of vmferry (cargo build --release -p
vmferry); installs stunnel4 with apt-get if it is missing (as root). Everything it starts is
killed and its files (also in /dev/shm) removed on exit, failure or Ctrl-C. Exits 1 if any
run failed (the tables are printed all the same).
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import busy_routes as busy
import disk_routes
import libvirt_routes
import live_routes as live
import paused_routes as paused
import benchlib
from benchlib import (PATHS, PROCS, ROOT, VMFERRY, Daemon, Env, Stunnel, _on_signal, cleanup, kill,
                      loadavg, machine_header, make_x509, parse_list, parse_size, remove_stale_files,
                      shm_path, spawn, streams_label)
from busy_routes import BUSY_ROUTES
from live_routes import summarize_live
from paused_routes import ALL_ROUTES, VMFERRY_ROUTES

# The scenarios live in their own modules, the machinery they share in benchlib:
#   paused_routes  the paused guest (the default) and the routes (QEMU's and vmferry's)
#   live_routes    the live guest (unless --no-live), over the same routes
#   busy_routes    the busy guest (--busy, --busy-only)
#   disk_routes    the disk copy (--disk, --disk-only)
#   libvirt_routes libvirt domains between two libvirt hosts (--libvirt, --libvirt-only)
# This file is the entry point: the arguments, the setup, the order of the scenarios, and
# the Markdown for the README.


def print_markdown(rows, live_rows, a, header):
    cmd = " ".join(["python3 bench/migrate_bench.py"] + sys.argv[1:])
    print(f"Measured {header} (`{cmd}`):")
    notes = []
    if rows:
        print()
        print("| route       | streams    | runs | median wall | min–max       | GiB/s | vs plain | CPU s/GiB |"
              " QEMUs | carrier |")
        print("|-------------|------------|------|-------------|---------------|-------|----------|-----------|"
              "-------|---------|")
        for row in rows:
            runs = f"{row['n']}" + (f"+{row['failed']}✗" if row["failed"] else "")
            head = f"| {row['route']:11} | {streams_label(row['multifd']):10} | {runs:4} |"
            if row["failed"]:
                notes.append(f"{row['route']}, {streams_label(row['multifd'])}: {row['failed']} failed"
                             f" run(s): {row['error']}")
            if row.get("median") is None:
                print(f"{head} failed      | –             |     – |        – |         – |     – |       – |")
                continue
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "–"
            mm = f"{row['min']:.2f}–{row['max']:.2f} s"
            med = f"{row['median']:.3f} s"
            print(f"{head} {med:11} | {mm:13} | {row['gibps']:5.2f} | {ratio:>8} | {row['cpu']:9.2f} |"
                  f" {row['cpu_qemu']:5.2f} | {row['cpu_carrier']:7.2f} |")
        for n in notes:
            n = n if len(n) <= 300 else n[:297] + "..."
            print(f"\n✗ {n}".replace("|", "/"))
    if live_rows:
        print()
        print(f"Live guest ({a.live_ram_mib} MiB, dirtying 16 MiB continuously, TCG; medians, min–max),"
              " QEMU's total-time and downtime from query-migrate on the source:")
        print()
        print("| route       | streams    | runs | QEMU total-time      | downtime             | wall    |")
        print("|-------------|------------|------|----------------------|----------------------|---------|")
        for lr in summarize_live(live_rows):
            runs = f"{lr['n']}" + (f"+{lr['failed']}✗" if lr["failed"] else "")
            head = f"| {lr['route']:11} | {streams_label(lr['multifd']):10} | {runs:4} |"
            if not lr["n"]:
                print(f"{head} failed               | –                    | –       |")
                continue
            wall = f"{lr['wall']:.2f} s"
            print(f"{head} {lr['total']:20} | {lr['downtime']:20} | {wall:7} |")
        for lr in summarize_live(live_rows):
            if lr["failed"]:
                print(f"\n✗ live {lr['route']}: {lr['failed']} failed run(s): {lr['error']}".replace("|", "/"))


def start_profile(path, env):
    """`perf record -g` of both daemons (their threads, and the pump threads they start)."""
    if not shutil.which("perf"):
        sys.exit("--profile needs perf (apt-get install linux-perf)")
    if not env.daemons:
        sys.exit("--profile records the vmferry daemons: give a vmferry route")
    pids = ",".join(str(d.pid) for d in env.daemons)
    p = spawn(["perf", "record", "-F", "999", "-g", "-p", pids, "-o", path],
              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    if p.poll() is not None:
        sys.exit(f"perf record failed: {p.stderr.read().strip()[-300:]}")
    print(f"profiling the daemons (pids {pids}) into {path}", flush=True)
    return p


def stop_profile(p, path):
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill(p)
    if p in PROCS:
        PROCS.remove(p)
    for sort, title, n in (("comm", "threads", 12), ("sym", "symbols", 30)):
        r = subprocess.run(["perf", "report", "-i", path, "--stdio", "--no-children", "--sort", sort,
                            "-g", "none"], capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        print(f"\nprofile of the daemons, top {title} (perf report -i {path} --no-children"
              f" --sort {sort}):")
        for ln in lines[:n]:
            print(f"  {ln.strip()}")


def main():
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    ap.add_argument("--routes", default="plain,qemu-tls,stunnel,relay,direct,reverse,tunnel",
                    help="comma-separated, from: " + ",".join(ALL_ROUTES))
    ap.add_argument("--multifd", default="0,2,4",
                    help="comma-separated stream counts: 0 = one stream, N = multifd with N channels")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per route and stream count")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds (not counted)")
    ap.add_argument("--ram-mib", type=int, default=1024, help="guest RAM, MiB of random data")
    ap.add_argument("--ram-pattern", choices=("random", "text"), default="random",
                    help="guest RAM contents: random (incompressible) or text-like pages "
                         "(compressible, no zero pages)")
    ap.add_argument("--live", action=argparse.BooleanOptionalAction, default=True,
                    help="also migrate a live guest that dirties memory (default on)")
    ap.add_argument("--live-routes", default="plain,direct", help="routes for the live guest")
    ap.add_argument("--live-multifd", type=int, default=0, help="stream count for the live guest")
    ap.add_argument("--live-runs", type=int, default=3, help="live runs per route (interleaved)")
    ap.add_argument("--live-ram-mib", type=int, default=None, help="default: --ram-mib")
    ap.add_argument("--busy", action=argparse.BooleanOptionalAction, default=False,
                    help="also migrate a busy guest that dirties memory faster than a capped link"
                         " carries it, over plain QEMU post-copy and vmferry post-copy/auto-converge"
                         " (off by default: opt in, it boots a guest per run and takes minutes)")
    ap.add_argument("--busy-only", action="store_true",
                    help="run only the busy-guest scenario (implies --busy; no paused or live runs)")
    ap.add_argument("--busy-routes", default=",".join(BUSY_ROUTES),
                    help="busy-guest routes, from: " + ",".join(BUSY_ROUTES))
    ap.add_argument("--busy-mib", type=int, default=64,
                    help="MiB the busy guest rewrites without pause (vmferry.busy=MIB)")
    ap.add_argument("--busy-cap", type=parse_size, default="10M",
                    help="the link's cap for the busy guest, bytes/s (binary suffixes as vmferry's"
                         " --max-bandwidth: 10M = 10 MiB/s): max-bandwidth and max-postcopy-bandwidth")
    ap.add_argument("--busy-ram-mib", type=int, default=384, help="the busy guest's RAM, MiB")
    ap.add_argument("--busy-fill", choices=("zero", "random"), default="zero",
                    help="what lies under the busy guest's RAM before it boots: zero (QEMU sends"
                         " untouched pages as a few bytes: quicker) or random (every page is carried)")
    ap.add_argument("--busy-timeout", type=int, default=300,
                    help="seconds one busy-guest migration may take (pre-copy; post-copy runs out)")
    ap.add_argument("--disk", action=argparse.BooleanOptionalAction, default=False,
                    help="also migrate a paused guest with a local disk copied (--copy-storage all)"
                         " over plain NBD, QEMU NBD+TLS and vmferry (off by default)")
    ap.add_argument("--disk-only", action="store_true",
                    help="run only the disk-copy scenario (implies --disk)")
    ap.add_argument("--disk-routes", default=disk_routes.DEFAULT_DISK_ROUTES,
                    help="disk-copy routes, from: " + ",".join(disk_routes.DISK_ROUTES))
    ap.add_argument("--disk-mib", type=int, default=1024, help="the disk's size, MiB of random data")
    ap.add_argument("--disk-ram-mib", type=int, default=256, help="RAM of the guest with the disk, MiB")
    ap.add_argument("--libvirt", action=argparse.BooleanOptionalAction, default=False,
                    help="also migrate a live libvirt domain between two libvirt hosts: plain p2p"
                         " over socat, libvirt's tunnelled mode, vmferry migrate --libvirt (off by"
                         " default)")
    ap.add_argument("--libvirt-only", action="store_true",
                    help="run only the libvirt scenario (implies --libvirt)")
    ap.add_argument("--libvirt-routes", default=",".join(libvirt_routes.LIBVIRT_ROUTES),
                    help="libvirt routes, from: " + ",".join(libvirt_routes.LIBVIRT_ROUTES))
    ap.add_argument("--libvirt-ram-mib", type=int, default=512, help="the libvirt domain's RAM, MiB")
    ap.add_argument("--libvirt-disk-mib", type=int, default=1024,
                    help="the libvirt domain's disk, MiB (all but the first MiB random data)")
    ap.add_argument("--libvirt-phases", action="store_true",
                    help="libvirtd logs its migration steps (debug) and the bench prints how long"
                         " each took, per route")
    ap.add_argument("--libvirt-runs", type=int, default=3, help="measured runs per libvirt route")
    ap.add_argument("--timeout", type=int, default=90, help="seconds one migration may take")
    ap.add_argument("--stall", type=int, default=10,
                    help="QEMU routes: fail a migration whose source sent nothing for this many seconds")
    ap.add_argument("--retries", type=int, default=2,
                    help="a failed run is tried again this many times in its round (failures are counted"
                         " and reported)")
    ap.add_argument("--max-failures", type=int, default=4,
                    help="a route that failed this many times in all is left out from then on")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work dir (logs, configs, certificates) for a look afterwards")
    ap.add_argument("--qemu", default=None,
                    help="QEMU for every guest and both sides: system (qemu-system-x86_64, 7.2 on"
                         " Debian 12), 10 (QEMU 10.0 from scripts/qemu10.sh) or a path; default $QEMU"
                         " or system")
    ap.add_argument("--json-out", help="also write every run's numbers to this file")
    ap.add_argument("--profile", metavar="FILE",
                    help="record the vmferry daemons with `perf record -g` during the paused runs"
                         " into FILE, then print their top symbols and threads")
    a = ap.parse_args()
    QEMU = benchlib.use_qemu(a.qemu) if a.qemu else benchlib.QEMU
    routes = parse_list(a.routes, ALL_ROUTES)
    try:
        mfds = parse_list(a.multifd, conv=int)
    except ValueError:
        sys.exit("--multifd takes comma-separated integers, e.g. 0,2,4")
    if a.busy_only:
        a.busy, a.live = True, False
        routes = []
    if a.disk_only:
        a.disk, a.live, a.busy = True, False, False
        routes = []
    if a.libvirt_only:
        a.libvirt, a.disk, a.live, a.busy = True, False, False, False
        routes = []
    libvirt_list = parse_list(a.libvirt_routes, libvirt_routes.LIBVIRT_ROUTES) if a.libvirt else []
    if libvirt_list and (a.libvirt_ram_mib < 128 or a.libvirt_disk_mib < 2 or a.libvirt_runs < 1):
        sys.exit("need --libvirt-ram-mib >= 128, --libvirt-disk-mib >= 2 and --libvirt-runs >= 1")
    disk_list = parse_list(a.disk_routes, disk_routes.DISK_ROUTES) if a.disk else []
    if disk_list and (a.disk_mib < 1 or a.disk_ram_mib < 16):
        sys.exit("need --disk-mib >= 1 and --disk-ram-mib >= 16")
    live_routes = parse_list(a.live_routes, ALL_ROUTES) if a.live else []
    busy_routes = parse_list(a.busy_routes, BUSY_ROUTES) if a.busy else []
    if busy_routes and (a.busy_ram_mib < 128 or a.busy_mib < 1 or a.busy_mib + 160 > a.busy_ram_mib
                        or a.busy_cap < 1):
        sys.exit("need --busy-mib >= 1, --busy-cap >= 1 and --busy-ram-mib >= 128 and at least"
                 " --busy-mib + 160 (the guest's kernel and its tmpfs must fit)")
    if a.live_ram_mib is None:
        a.live_ram_mib = a.ram_mib
    if a.runs < 1 or a.ram_mib < 16 or any(m < 0 for m in mfds) or (live_routes and a.live_ram_mib < 128):
        sys.exit("need --runs >= 1, --ram-mib >= 16, --multifd >= 0, and --live-ram-mib >= 128"
                 " (the guest's kernel must fit)")
    need_daemons = (any(r in VMFERRY_ROUTES for r in routes + live_routes)
                    or any(r != "plain-postcopy" for r in busy_routes)
                    or any(r in VMFERRY_ROUTES for r in disk_list))
    # The libvirt routes start their own daemons, inside the libvirt hosts.
    need_vmferry = need_daemons or any(r.startswith("vmferry") for r in libvirt_list)
    if need_vmferry and not os.access(VMFERRY, os.X_OK):
        sys.exit(f"build vmferry first: cargo build --release -p vmferry ({VMFERRY} missing)")
    if not shutil.which(QEMU):
        sys.exit(f"{QEMU} not found")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    remove_stale_files()
    work = tempfile.mkdtemp(prefix=f"vmferry-bench-{os.getpid()}-")
    if not a.keep_work:
        PATHS.append(work)
    env = Env(a, work)
    all_runs = []
    try:
        qemu_version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        load_start = loadavg()
        print(f"{qemu_version}; {os.cpu_count()} cores; load average {load_start}", flush=True)
        if need_daemons:
            env.certs = os.path.join(work, "certs")
            subprocess.run([VMFERRY, "certs", "init", "--dir", env.certs], check=True, capture_output=True)
            subprocess.run([VMFERRY, "certs", "issue", "--dir", env.certs, "--host", "localhost",
                            "--ip", "127.0.0.1"], check=True, capture_output=True)
            try:
                env.daemons = [Daemon(work, "src-daemon", env.certs), Daemon(work, "dst-daemon", env.certs)]
            except Exception as e:  # reported on each vmferry route
                env.daemons_error = str(e)
        if need_vmferry:
            rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                 capture_output=True, text=True).stdout.strip()
            built = datetime.datetime.fromtimestamp(os.path.getmtime(VMFERRY)).strftime("%Y-%m-%d %H:%M")
            print(f"vmferry {VMFERRY} (built {built}; the tree is now at {rev or '?'})", flush=True)
        if ("qemu-tls" in routes + live_routes or "stunnel" in routes + live_routes
                or "nbd-tls" in disk_list):
            env.x509 = os.path.join(work, "x509")
            make_x509(env.x509)
        if "stunnel" in routes + live_routes:
            try:
                env.stunnel = Stunnel(work, env.x509)
                print(f"{env.stunnel.version}", flush=True)
            except Exception as e:
                env.stunnel_error = str(e)
                print(f"stunnel unavailable: {e}", flush=True)

        template = None
        if routes or live_routes:
            template = shm_path("src")
            print(f"writing {a.ram_mib} MiB of {a.ram_pattern} guest RAM to {template} ...", flush=True)
            with open("/dev/urandom", "rb") as r, open(template, "wb") as w:
                for mib in range(a.ram_mib):
                    if a.ram_pattern == "random":
                        w.write(r.read(1 << 20))
                        continue
                    # Text-like pages: every page different, none zero, compressible ~10:1.
                    pages = []
                    for p in range(256):
                        line = (f"page {mib * 256 + p:08} of the guest page cache: "
                                f"{r.read(6).hex()} lorem ipsum dolor sit amet. ").encode()
                        pages.append((line * (4096 // len(line) + 1))[:4096])
                    w.write(b"".join(pages))
        gib = a.ram_mib / 1024

        cells = [(r, m) for m in mfds for r in routes]
        profiler = start_profile(a.profile, env) if a.profile else None
        try:
            results, failures = paused.run_all(env, cells, template, gib, all_runs)
        finally:
            if profiler:
                stop_profile(profiler, a.profile)

        rows = paused.summarize(cells, results, failures, gib)
        if rows:
            paused.print_paused(rows, a)

        disk_rows, disk_load = [], None
        if disk_list:
            disk_start = loadavg()
            disk_rows = disk_routes.run_all(env, disk_list)
            disk_load = (disk_start.split()[0], loadavg().split()[0])
            disk_routes.print_rows(disk_rows, a)

        libvirt_rows, libvirt_load = [], None
        if libvirt_list:
            libvirt_start = loadavg()
            libvirt_rows = libvirt_routes.run_all(env, libvirt_list)
            libvirt_load = (libvirt_start.split()[0], loadavg().split()[0])
            libvirt_routes.print_rows(libvirt_rows, a)

        live_rows = []
        if live_routes:
            live_rows = live.run_all(env, live_routes, template, all_runs)

        busy_rows, busy_summary, busy_load = [], None, None
        if busy_routes:
            busy_rows, busy_summary, busy_load = busy.run_all(env, busy_routes, all_runs)

        print(f"\nload average now {loadavg()}")
        if env.daemons and any(d.restarts for d in env.daemons):
            print("note: a vmferry daemon was restarted after a failed run")
        print("\n--- for the README ---\n")
        print_markdown(rows, live_rows, a, machine_header(load_start))
        if busy_summary:
            busy.print_busy_markdown(busy_summary, a, busy_load)
        if disk_rows:
            disk_routes.print_markdown(disk_rows, a, disk_load)
        if libvirt_rows:
            libvirt_routes.print_markdown(libvirt_rows, a, libvirt_load)
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump({"args": vars(a), "runs": all_runs,
                           "summary": [{k: v for k, v in row.items()} for row in rows]}, f, indent=1)
        if (any(failures.values()) or any(err for *_, err in live_rows)
                or any(row["failed"] for row in disk_rows)
                or any(row["failed"] for row in libvirt_rows)
                or any(err or not r.get("guest_ok") for _, r, err in busy_rows)):
            sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup()
        if a.keep_work:
            print(f"work dir kept: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
