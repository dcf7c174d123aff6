"""libvirt routes of migrate_bench.py (--libvirt, --libvirt-only): issue 16's benchmark.

Two libvirt hosts on this machine (bench/libvirt_hosts.py: a libvirtd each in its own
network, mount and UTS namespaces, as the Rust tests' fixture makes them) and the test
guest as a libvirt domain with --libvirt-ram-mib (512) MiB of RAM, TCG, live (it dirties
16 MiB continuously), and a --libvirt-disk-mib (1024) MiB qcow2 disk of random data. The
domain migrates back and forth between the hosts (they are alike), live, peer to peer,
persistent on the destination and undefined on the source, by:

  plain-copy      libvirt p2p, --copy-storage-all, every socket (libvirt RPC, migration
                  stream, NBD) forwarded by socat pairs over TCP, unencrypted: the baseline
  vmferry-copy    vmferry migrate --libvirt --copy-storage all (daemons inside the hosts'
                  namespaces carry the same three sockets over TLS)
  plain-ram       libvirt p2p over socat, RAM only
  tunnelled       libvirt's tunnelled mode (--p2p --tunnelled): the migration stream inside
                  libvirt's RPC connection (socat-forwarded); RAM only, because libvirt 9.0
                  fails --tunnelled --copy-storage-all with an internal error
  vmferry-ram     vmferry migrate --libvirt, RAM only

The RAM-only routes migrate a second domain, the same guest without a disk: what a
migration with shared storage carries. (A disk in a directory both hosts see would do too,
but libvirt refuses it — "Unsafe migration: Migration without shared storage is unsafe" —
unless told --unsafe: /tmp is no shared file system.) The socat routes
use a fresh directory per run, as vmferry's daemons do; the copy routes start each run with
no image on the destination: plain-copy gets a blank one (libvirt needs it), vmferry's
destination daemon makes its own. Wall time is the migrate command's, first byte to return;
libvirt's "Total downtime" is read on the destination afterwards. Each run checks that the
domain runs on the destination and beats there, its disk intact (the guest reads back what
it wrote), and that the source no longer has it.

Reports medians, min–max, the ratio to plain-copy (copy routes) or plain-ram (the rest),
and the issue's goals: vmferry-copy <= 1.5x plain-copy, vmferry-ram faster than tunnelled.

Processes go through benchlib.spawn and the hosts register their teardown in benchlib.HOOKS:
nothing (libvirtd, QEMU, socat, vmferry daemon, namespace, mount) outlives the run.
"""
import json
import shutil
import os
import statistics
import subprocess
import time

import benchlib
from benchlib import GUEST_APPEND, GUEST_DIR, ROOT, VMFERRY, kill, loadavg, remove, spawn
import libvirt_hosts as lh


def emulator():
    """The bench's QEMU (--qemu) as an absolute path, for the domains' <emulator>."""
    path = shutil.which(benchlib.QEMU)
    if path is None:
        raise RuntimeError(f"{benchlib.QEMU} not found")
    return os.path.abspath(path)

LIBVIRT_ROUTES = ("plain-copy", "vmferry-copy", "plain-ram", "tunnelled", "vmferry-ram")
COPY_ROUTES = ("plain-copy", "vmferry-copy")
DISK_LINE = "vmferry-bench-libvirt-disk"
PORT = 4700  # each vmferry daemon's one port


class LvBench:
    """The hosts, the vmferry daemons in them, the two domains and where each one is."""

    def __init__(self, env, routes):
        a = env.args
        self.args = a
        self.root = os.path.join(env.work, "lv")
        os.makedirs(self.root)
        self.net, self.a, self.b = lh.start_two(self.root, env.args.libvirt_phases)
        self.hosts = (self.a, self.b)
        self.work = self.a.work
        self.runs = 0
        self.daemons = None
        self.daemons_error = None
        if any(r.startswith("vmferry") for r in routes):
            try:
                self.daemons = self.start_daemons()
            except Exception as e:  # reported on each vmferry route
                self.daemons_error = str(e)
                print(f"vmferry under libvirt unavailable: {e}", flush=True)
        kernel, initrd = (os.path.join(GUEST_DIR, "vmlinuz"), os.path.join(GUEST_DIR, "initramfs.img"))
        if not (os.path.exists(kernel) and os.path.exists(initrd)):
            raise RuntimeError(f"no test guest in {GUEST_DIR} (scripts/guest-image.sh)")
        self.domains = {}
        for kind in ("local", "ram"):
            if not any(domain_kind(r) == kind for r in routes):
                continue
            name = f"lv-{kind}"
            d = {"name": name, "disk": os.path.join(self.work, f"{name}.qcow2") if kind == "local"
                 else None, "serial": os.path.join(self.work, f"{name}.serial"), "on": self.a}
            d["xml"] = lh.domain_xml(name, a.libvirt_ram_mib, kernel, initrd, GUEST_APPEND,
                                     d["disk"], d["serial"], emulator())
            if d["disk"]:
                print(f"making {name}'s {a.libvirt_disk_mib} MiB disk ({a.libvirt_disk_mib - 1} MiB"
                      " of random data) ...", flush=True)
                lh.make_disk(self.a.outside(d["disk"]), a.libvirt_disk_mib, DISK_LINE,
                             fill_mib=a.libvirt_disk_mib - 1)
            self.boot(d)
            self.domains[kind] = d

    def start_daemons(self):
        help_ = subprocess.run([VMFERRY, "serve", "--help"], capture_output=True, text=True).stdout
        if "--libvirt-migrations-dir" not in help_:
            # TODO(issue 16): the daemon side; until it lands the vmferry routes fail here.
            raise RuntimeError(f"{VMFERRY} has no --libvirt-migrations-dir (issue 16's daemon side"
                               " not built in)")
        ca = os.path.join(self.root, "ca")
        lh.run([VMFERRY, "certs", "init", "--dir", ca])
        daemons = []
        for h, tag in ((self.a, "a"), (self.b, "b")):
            certs = os.path.join(self.root, f"certs-{tag}")
            lh.run([VMFERRY, "certs", "issue", "--dir", ca, "--host", f"host{tag}", "--ip",
                    h.net.ip, "--out", certs])
            state = os.path.join(self.root, f"vmferry-{tag}")
            log = open(os.path.join(self.root, f"vmferry-{tag}.log"), "w")
            p = spawn(h.command(VMFERRY, "serve", "--listen", f"{h.net.ip}:{PORT}", "--state-dir",
                                state, "--certs", certs, "--libvirt-uri", "qemu:///system",
                                "--libvirt-migrations-dir", os.path.join(self.work, "mig")),
                      stderr=log)
            log.close()
            sock = os.path.join(state, "control.sock")
            deadline = time.time() + 20
            while not os.path.exists(sock):
                if p.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the vmferry daemon in host {tag} did not start (see"
                                       f" {self.root}/vmferry-{tag}.log)")
                time.sleep(0.02)
            daemons.append({"p": p, "sock": sock, "host": h})
        return daemons

    def boot(self, d):
        h = d["on"]
        xml = os.path.join(self.root, f"{d['name']}.xml")
        with open(xml, "w") as f:
            f.write(d["xml"])
        h.virsh("define", xml)
        h.virsh("start", d["name"])
        wait_beats(h.outside(d["serial"]), 3, 120)
        h.virsh("suspend", d["name"])

    def other(self, h):
        return self.b if h is self.a else self.a

    def locate(self, d):
        """Where the domain runs now (after a failed run libvirt may have kept it on the
        source); boots it again on A if it is lost. Between runs the bench keeps it paused
        by hand ("paused (user)"): a paused copy for any other reason (an incoming domain a
        failed migration left behind) is not it, and is removed."""
        found = [(h, h.virsh("domstate", "--reason", d["name"], check=False).strip())
                 for h in self.hosts if d["name"] in h.domains()]
        live = [h for h, st in found if st.startswith("running") or st == "paused (user)"]
        if len(live) == 1:
            d["on"] = live[0]
            for h, st in found:
                if h is not live[0]:
                    print(f"    (a stale copy of {d['name']} on {h.hostname}, {st}: removed)",
                          flush=True)
                    h.virsh("destroy", d["name"], check=False)
                    h.virsh("undefine", d["name"], check=False)
            return
        print(f"    ({d['name']} is lost ({found and ', '.join(st for _, st in found)}):"
              " booting it again on A)", flush=True)
        for h in self.hosts:
            h.virsh("destroy", d["name"], check=False)
            h.virsh("undefine", d["name"], check=False)
        d["on"] = self.a
        self.boot(d)


def domain_kind(route):
    return "local" if route in COPY_ROUTES else "ram"


def wait_beats(serial, n, timeout):
    """Waits until the serial log `serial` (outside path) has `n` complete heartbeats."""
    deadline = time.time() + timeout
    while True:
        try:
            with open(serial, errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        if text.count("vmferry-heartbeat ") >= n and text.endswith("\n"):
            return text
        if time.time() > deadline:
            raise RuntimeError(f"fewer than {n} heartbeats in {serial} after {timeout} s:"
                               f" {text[-300:]!r}")
        time.sleep(0.1)


def virsh_migrate(lv, route, d, src, dst, deadline):
    """plain-copy, plain-ram, tunnelled: socat bridges for the sockets the route uses,
    then `virsh migrate` on the source (timed). Returns the elapsed seconds."""
    lv.runs += 1
    dir_ = os.path.join(lv.work, "m", str(lv.runs))
    for h in (src, dst):
        os.makedirs(h.outside(dir_))
    desturi = f"qemu+unix:///system?socket={dir_}/libvirt.sock"
    bridges = []
    try:
        bridges.append(lh.UnixBridge(src, f"{dir_}/libvirt.sock", dst, "/run/libvirt/libvirt-sock",
                                     16509, lv.root))
        args = ["migrate", "--live", "--p2p", "--persistent", "--undefinesource", "--desturi", desturi]
        if route == "tunnelled":
            args.append("--tunnelled")
        else:
            bridges.append(lh.UnixBridge(src, f"{dir_}/migrate.sock", dst, f"{dir_}/migrate.sock",
                                         49152, lv.root))
            args += ["--migrateuri", f"unix://{dir_}/migrate.sock"]
        if route == "plain-copy":
            bridges.append(lh.UnixBridge(src, f"{dir_}/nbd.sock", dst, f"{dir_}/nbd.sock", 10809,
                                         lv.root))
            args += ["--copy-storage-all", "--disks-uri", f"unix://{dir_}/nbd.sock"]
        t0 = time.perf_counter()
        r = subprocess.run(["virsh", "-c", src.uri, *args, d["name"]], capture_output=True,
                           text=True, timeout=max(deadline - time.time(), 1),
                           stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"virsh migrate: {r.stderr.strip()[-400:]}")
        return elapsed
    finally:
        for b in bridges:
            b.stop()
        for h in (src, dst):
            remove(h.outside(dir_))


def vmferry_migrate(lv, route, d, src, dst, deadline):
    """vmferry-copy, vmferry-ram: `vmferry migrate --libvirt` (timed). Returns the
    elapsed seconds."""
    if lv.daemons is None:
        raise RuntimeError(f"vmferry daemons unavailable: {lv.daemons_error}")
    by_host = {id(x["host"]): x for x in lv.daemons}
    for x in lv.daemons:
        if x["p"].poll() is not None:
            raise RuntimeError(f"the vmferry daemon in {x['host'].hostname} exited"
                               f" ({x['p'].returncode})")
    timeout = max(int(deadline - time.time()), 1)
    cmd = [VMFERRY, "migrate", "--libvirt", d["name"], "--from", by_host[id(src)]["sock"],
           "--to", by_host[id(dst)]["sock"], "--json", "--timeout", str(timeout)]
    if route == "vmferry-copy":
        cmd += ["--copy-storage", "all"]
    t0 = time.perf_counter()
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        kill(p)
        raise RuntimeError(f"vmferry migrate did not return within {timeout + 30} s")
    elapsed = time.perf_counter() - t0
    kill(p)  # reaped already: this only unregisters it
    result = None
    for line in out.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("event") == "result":
            result = obj
    if p.returncode != 0 or (result is not None and not result.get("ok")):
        msg = (result or {}).get("error") or (err.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise RuntimeError(f"vmferry migrate: {msg}")
    return elapsed


def run_libvirt(lv, route):
    """One migration of the route's domain to the other host, checked. Returns the numbers."""
    a = lv.args
    d = lv.domains[domain_kind(route)]
    lv.locate(d)
    src = d["on"]
    dst = lv.other(src)
    # The destination starts clean: no serial log of an earlier stay, and for the copy
    # routes no image (plain libvirt needs a blank one of the same size; vmferry makes it).
    remove(dst.outside(d["serial"]))
    if route in COPY_ROUTES:
        remove(dst.outside(d["disk"]))
        if route == "plain-copy":
            lh.make_disk(dst.outside(d["disk"]), a.libvirt_disk_mib, None)
    # Live: the guest runs (and dirties memory) for a couple of beats before the clock starts.
    if src.state(d["name"]) == "paused":
        src.virsh("resume", d["name"])
    before = open(src.outside(d["serial"]), errors="replace").read().count("vmferry-heartbeat ")
    wait_beats(src.outside(d["serial"]), before + 2, 30)
    deadline = time.time() + a.timeout
    log_from = os.path.getsize(src.log) if a.libvirt_phases and os.path.exists(src.log) else 0
    fn = vmferry_migrate if route.startswith("vmferry") else virsh_migrate
    try:
        elapsed = fn(lv, route, d, src, dst, deadline)
    except Exception:
        for h in lv.hosts:  # leave nothing running but the domain where it ended up
            if d["name"] in h.domains() and h.state(d["name"]) == "running":
                h.virsh("suspend", d["name"], check=False)
        raise
    d["on"] = dst
    r = {"elapsed": elapsed, "way": f"{src.hostname[-1].upper()} → {dst.hostname[-1].upper()}",
         "downtime_ms": None, "libvirt_ms": None, "phases": None}
    if a.libvirt_phases:
        with open(src.log, errors="replace") as f:
            f.seek(log_from)
            r["phases"] = lh.migration_phases(f.read())
    info = dst.virsh("domjobinfo", "--completed", d["name"], check=False)
    for line in info.splitlines():
        k, _, v = line.partition(":")
        v = v.split()
        if k.strip() == "Total downtime" and v:
            r["downtime_ms"] = int(v[0])
        if k.strip() == "Time elapsed" and v:
            r["libvirt_ms"] = int(v[0])
    state = dst.state(d["name"])
    if state != "running":
        try:
            console = open(dst.outside(d["serial"]), errors="replace").read()
        except OSError:
            console = ""
        raise RuntimeError(f"the domain is {state} on the destination; its console ends:"
                           f" {console[-1500:]!r}")
    if d["name"] in src.domains():
        raise RuntimeError("the source still has the domain")
    text = wait_beats(dst.outside(d["serial"]), 2, 30)
    if "vmferry-diskcheck BAD" in text:
        raise RuntimeError(f"the guest's disk lost a write: {text[-300:]!r}")
    dst.virsh("suspend", d["name"])
    return r


def run_all(env, routes):
    """Every route, --warmup + --libvirt-runs rounds, interleaved (the order rotates each
    round). Returns the summary rows."""
    a = env.args
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "guest-image.sh")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"guest-image.sh failed: {r.stderr.strip()[-300:]}")
    t0 = time.time()
    lv = LvBench(env, routes)
    print(f"\nlibvirt: two hosts (libvirtd {libvirt_version()}), a domain of {a.libvirt_ram_mib} MiB"
          f" (TCG, live) with a {a.libvirt_disk_mib} MiB qcow2 disk of random data; ready after"
          f" {time.time() - t0:.0f} s; {a.warmup} warm-up + {a.libvirt_runs} runs per route,"
          f" interleaved; load average {loadavg()}", flush=True)
    results = {r: [] for r in routes}
    failures = {r: [] for r in routes}
    for i in range(a.warmup + a.libvirt_runs):
        tag = f"warm-up {i + 1}" if i < a.warmup else f"run {i - a.warmup + 1}/{a.libvirt_runs}"
        k = i % len(routes)
        for route in routes[k:] + routes[:k]:
            for _attempt in range(1 + a.retries):
                if len(failures[route]) >= a.max_failures:
                    break
                try:
                    res = run_libvirt(lv, route)
                except Exception as e:
                    failures[route].append(str(e))
                    print(f"  {tag:11} libvirt {route:14} FAILED: {e}", flush=True)
                    continue
                dt = f"{res['downtime_ms']} ms" if res["downtime_ms"] is not None else "-"
                print(f"  {tag:11} libvirt {route:14} {res['elapsed']:6.2f} s ({res['way']});"
                      f" downtime {dt}; running and beating on the destination", flush=True)
                if i >= a.warmup:
                    results[route].append(res)
                break
    rows = []
    for route in routes:
        runs, fails = results[route], failures[route]
        row = {"route": route, "n": len(runs), "failed": len(fails), "error": fails[-1] if fails else None}
        if runs:
            ts = [x["elapsed"] for x in runs]
            dts = [x["downtime_ms"] for x in runs if x["downtime_ms"] is not None]
            lts = [x["libvirt_ms"] for x in runs if x["libvirt_ms"] is not None]
            row.update(median=statistics.median(ts), min=min(ts), max=max(ts),
                       downtime=statistics.median(dts) if dts else None,
                       libvirt_s=statistics.median(lts) / 1000 if lts else None)
            phases = [x["phases"] for x in runs if x.get("phases")]
            if phases:
                row["phases"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
                row["phases_n"] = len(phases)
        rows.append(row)
    by = {r["route"]: r for r in rows if r.get("median")}
    for row in rows:
        base = by.get("plain-copy" if row["route"] in COPY_ROUTES else "plain-ram")
        if base and row.get("median"):
            row["ratio"] = row["median"] / base["median"]
            row["base"] = base["route"]
    return rows


def libvirt_version():
    r = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True)
    return r.stdout.strip().split()[-1] if r.returncode == 0 and r.stdout.strip() else "?"


def goals(rows):
    by = {r["route"]: r for r in rows if r.get("median")}
    out = []
    if "vmferry-copy" in by and "plain-copy" in by:
        x = by["vmferry-copy"]["ratio"]
        out.append((f"vmferry-copy <= 1.5x plain-copy ({x:.2f}x)", x <= 1.5))
    if "vmferry-ram" in by and "tunnelled" in by:
        v, t = by["vmferry-ram"]["median"], by["tunnelled"]["median"]
        out.append((f"vmferry-ram faster than libvirt's tunnel ({v:.2f} s vs {t:.2f} s,"
                    f" {t / v:.2f}x)", v < t))
    return out


def print_rows(rows, a):
    print()
    print(f"libvirt: {a.libvirt_ram_mib} MiB live domain, {a.libvirt_disk_mib} MiB disk; medians of"
          f" {a.libvirt_runs} runs. wall: the migrate command's. libvirt: the job's own time"
          " (domjobinfo --completed on the destination). downtime: libvirt's.")
    print()
    print(f"{'route':15} {'n':>2} {'wall s':>7} {'min-max s':>13} {'vs':>14} {'libvirt s':>10}"
          f" {'downtime':>9}")
    for row in rows:
        head = f"{row['route']:15} {row['n']:>2}"
        if row.get("median") is None:
            print(f"{head} FAILED: {row['error']}")
            continue
        vs = f"{row['ratio']:.2f}x {row['base']}" if row.get("ratio") else "-"
        dt = f"{row['downtime']:.0f} ms" if row.get("downtime") is not None else "-"
        lt = f"{row['libvirt_s']:.2f}" if row.get("libvirt_s") is not None else "-"
        print(f"{head} {row['median']:7.2f} {row['min']:6.2f}-{row['max']:<6.2f} {vs:>14} {lt:>10}"
              f" {dt:>9}")
        if row["failed"]:
            print(f"{'':18} and {row['failed']} failed run(s), the last: {row['error']}")
    for text, met in goals(rows):
        print(f"  goal: {text}: {'met' if met else 'NOT met'}")
    print_phases(rows)


def print_phases(rows):
    """--libvirt-phases: where each route's wall time went, from the source libvirtd's log."""
    with_phases = [r for r in rows if r.get("phases")]
    if not with_phases:
        return
    names = list(with_phases[0]["phases"])
    print()
    print("libvirt's steps on the source (medians, seconds; --libvirt-phases): prepare = the"
          " destination starts its QEMU, perform = the migration, finish = the destination resumes"
          " the guest, source exit = SIGTERM until the source QEMU is gone (libvirt looks every"
          " 200 ms)")
    print(f"{'route':15} {'n':>2} " + " ".join(f"{n:>12}" for n in names))
    for r in with_phases:
        print(f"{r['route']:15} {r['phases_n']:>2} "
              + " ".join(f"{r['phases'][n]:12.3f}" for n in names))


def print_markdown(rows, a, load):
    print()
    print(f"libvirt domain ({a.libvirt_ram_mib} MiB live TCG guest, {a.libvirt_disk_mib} MiB qcow2 disk"
          f" of random data; medians of {a.libvirt_runs} runs; load average {load[0]} at the start,"
          f" {load[1]} at the end). `plain-ram`, `tunnelled` and `vmferry-ram` migrate the same"
          " guest without a disk (RAM only, as with shared storage): libvirt 9.0 cannot tunnel a"
          " disk copy.")
    print()
    print("| route          | runs | wall       | min–max        | vs plain same disk | libvirt's job | downtime |")
    print("|----------------|------|------------|----------------|--------------------|---------------|----------|")
    for row in rows:
        runs = f"{row['n']}" + (f"+{row['failed']}✗" if row["failed"] else "")
        if row.get("median") is None:
            print(f"| {row['route']:14} | {runs:4} | failed     | –              | –                  | –             | –        |")
            continue
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "–"
        mm = f"{row['min']:.2f}–{row['max']:.2f} s"
        dt = f"{row['downtime']:.0f} ms" if row.get("downtime") is not None else "–"
        lt = f"{row['libvirt_s']:.2f} s" if row.get("libvirt_s") is not None else "–"
        print(f"| {row['route']:14} | {runs:4} | {row['median']:7.2f} s  | {mm:14} | {ratio:>18} |"
              f" {lt:>13} | {dt:>8} |")
    for row in rows:
        if row["failed"]:
            err = row["error"] if len(row["error"]) <= 300 else row["error"][:297] + "..."
            print(f"\n✗ libvirt {row['route']}: {row['failed']} failed run(s): {err}".replace("|", "/"))
    g = goals(rows)
    if g:
        print()
        for text, met in g:
            print(f"- goal: {text}: {'met' if met else '**not met**'}")
