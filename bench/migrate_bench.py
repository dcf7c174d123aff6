#!/usr/bin/env python3
"""Side-by-side migration benchmark: plain (unencrypted) QEMU TCP migration vs vmferry over
each of its transports (direct, reverse, tunnel).

A paused guest with RAM_MIB of random RAM (a memory-backend-file on /dev/shm, written from
the host) migrates over each route, interleaved, after one warm-up round; every run checks
that the destination RAM is byte-identical to the source RAM. Destination RAM is
preallocated (prealloc=on) for every route alike. Prints medians, min-max and the ratio of
each route to plain TCP. This machine is shared and noisy: trust the ratios, not the
absolute times.

Usage: bench/migrate_bench.py [--runs 5] [--ram-mib 1024] [--multifd 0]
                              [--routes plain,direct,reverse,tunnel]
(route "vmferry" is vmferry with --transport auto)
Needs root only for nothing; needs qemu-system-x86_64 and a release build of vmferry.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMFERRY = os.path.join(ROOT, "target", "release", "vmferry")
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")


class Qmp:
    def __init__(self, path, timeout=10.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")

    def close(self):
        # The file object holds its own reference to the socket: close both, or
        # QEMU (one QMP client at a time) never greets the next client.
        self.f.close()
        self.s.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def qemu(work, tag, ram_path, ram_mib, incoming, prealloc):
    qmp = os.path.join(work, f"{tag}.qmp")
    args = [QEMU, "-machine", "q35,accel=tcg,memory-backend=ram0", "-m", f"{ram_mib}M",
            "-object", f"memory-backend-file,id=ram0,size={ram_mib}M,mem-path={ram_path},share=on"
            + (",prealloc=on" if prealloc else ""),
            "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        args += ["-incoming", "defer"]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while not os.path.exists(qmp):
        if p.poll() is not None:
            raise RuntimeError(f"QEMU {tag} exited: {p.stderr.read().decode()}")
        if time.time() > deadline:
            raise RuntimeError(f"QEMU {tag} did not start")
        time.sleep(0.01)
    return p, qmp


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def wait_completed(qmp_path, timeout=300):
    q = Qmp(qmp_path)
    deadline = time.time() + timeout
    try:
        while True:
            info = q.cmd("query-migrate")
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"migration {st}: {info.get('error-desc')}")
            if time.time() > deadline:
                raise RuntimeError("migration timed out")
            time.sleep(0.005)
    finally:
        q.close()


def run_once(route, work, template, ram_mib, multifd, daemons, certs):
    dst_ram = os.path.join("/dev/shm", f"vmferry-bench-dst-{os.getpid()}")
    src, src_qmp = qemu(work, "src", template, ram_mib, False, False)
    dst, dst_qmp = qemu(work, "dst", dst_ram, ram_mib, True, True)
    try:
        daemon_pids = [d.pid for d in daemons] if route != "plain" else []
        cpu0 = cpu_seconds([src.pid, dst.pid] + daemon_pids)
        if route == "plain":
            port = free_port()
            uri = f"tcp:127.0.0.1:{port}"
            t0 = time.perf_counter()
            for path, incoming in ((dst_qmp, True), (src_qmp, False)):
                q = Qmp(path)
                if multifd:
                    q.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                    q.cmd("migrate-set-parameters", **{"multifd-channels": multifd})
                q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
                if incoming:
                    q.cmd("migrate-incoming", uri=uri)
                else:
                    q.cmd("migrate", uri=uri)
                q.close()
            wait_completed(dst_qmp)
            elapsed = time.perf_counter() - t0
            q = Qmp(src_qmp)
            qemu_ms = q.cmd("query-migrate").get("total-time")
            q.close()
        else:
            cmd = [VMFERRY, "migrate", "--from", daemons[0].addr, "--to", daemons[1].addr,
                   "--src-qmp", src_qmp, "--dst-qmp", dst_qmp, "--certs", certs,
                   "--multifd", str(multifd), "--json",
                   "--transport", "auto" if route == "vmferry" else route]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            elapsed = time.perf_counter() - t0
            if r.returncode != 0:
                raise RuntimeError(f"vmferry migrate failed: {r.stderr.strip()}")
            qemu_ms = json.loads(r.stdout.strip().splitlines()[-1]).get("qemu_total_time_ms")
        cpu = cpu_seconds([src.pid, dst.pid] + daemon_pids) - cpu0
        same = subprocess.run(["cmp", "-s", template, dst_ram]).returncode == 0
        if not same:
            raise RuntimeError(f"{route}: destination RAM differs from source RAM")
        return elapsed, cpu, qemu_ms
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        if os.path.exists(dst_ram):
            os.unlink(dst_ram)


class Daemon:
    def __init__(self, work, name, certs):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        state = os.path.join(work, name)
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.p = subprocess.Popen([VMFERRY, "serve", "--listen", self.addr, "--state-dir", state,
                                   "--certs", certs], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=self.log)
        self.pid = self.p.pid
        deadline = time.time() + 15
        while not os.path.exists(os.path.join(state, "control.sock")):
            if time.time() > deadline or self.p.poll() is not None:
                raise RuntimeError(f"daemon {name} did not start")
            time.sleep(0.02)

    def stop(self):
        self.p.kill()
        self.p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--multifd", type=int, default=0)
    ap.add_argument("--routes", default="plain,direct,reverse,tunnel")
    a = ap.parse_args()
    routes = a.routes.split(",")
    unknown = [r for r in routes if r not in ("plain", "vmferry", "direct", "reverse", "tunnel")]
    if unknown:
        sys.exit(f"unknown route(s) {', '.join(unknown)}: use plain, vmferry, direct, reverse, tunnel")
    if not os.path.exists(VMFERRY):
        sys.exit(f"build vmferry first: cargo build --release -p vmferry ({VMFERRY} missing)")
    work = tempfile.mkdtemp(prefix="vmferry-bench-")
    template = os.path.join("/dev/shm", f"vmferry-bench-src-{os.getpid()}")
    daemons = []
    try:
        certs = os.path.join(work, "certs")
        subprocess.run([VMFERRY, "certs", "init", "--dir", certs], check=True, capture_output=True)
        subprocess.run([VMFERRY, "certs", "issue", "--dir", certs, "--host", "localhost", "--ip", "127.0.0.1"],
                       check=True, capture_output=True)
        daemons = [Daemon(work, "d1", certs), Daemon(work, "d2", certs)]
        print(f"writing {a.ram_mib} MiB of random guest RAM ...", flush=True)
        with open("/dev/urandom", "rb") as r, open(template, "wb") as w:
            for _ in range(a.ram_mib):
                w.write(r.read(1 << 20))
        results = {r: [] for r in routes}
        for i in range(a.runs + 1):
            for route in routes:
                t, cpu, qemu_ms = run_once(route, work, template, a.ram_mib, a.multifd, daemons, certs)
                tag = "warm-up" if i == 0 else f"run {i}"
                print(f"  {tag:8} {route:8} {t:6.3f} s  {a.ram_mib / 1024 / t:5.2f} GiB/s  cpu {cpu:5.2f} s"
                      f"  (QEMU total-time {qemu_ms} ms)", flush=True)
                if i > 0:
                    results[route].append((t, cpu))
        print()
        base = statistics.median(t for t, _ in results[routes[0]])
        print(f"{'route':10} {'median s':>9} {'min-max s':>15} {'GiB/s':>6} {'time vs ' + routes[0]:>14} {'cpu s/GiB':>10}")
        for route in routes:
            ts = [t for t, _ in results[route]]
            cpus = [c for _, c in results[route]]
            m = statistics.median(ts)
            print(f"{route:10} {m:9.3f} {min(ts):7.3f}-{max(ts):<7.3f} {a.ram_mib / 1024 / m:6.2f} "
                  f"{m / base:13.2f}x {statistics.median(cpus) / (a.ram_mib / 1024):10.2f}")
        if "direct" in results and "tunnel" in results:
            d = statistics.median(t for t, _ in results["direct"])
            t = statistics.median(t for t, _ in results["tunnel"])
            print(f"\ntunnel throughput vs direct: {d / t:.2f}x")
        print(f"\n(multifd={a.multifd}, {a.runs} runs each after a warm-up, interleaved; RAM verified byte-identical every run)")
    finally:
        for d in daemons:
            d.stop()
        if os.path.exists(template):
            os.unlink(template)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
