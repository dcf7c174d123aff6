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
            hops alone (vmferry's topology without its TLS); one stream only
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

Last, a Markdown table to paste into the README. This machine is shared and noisy (2
cores): trust the ratios and the CPU numbers more than the absolute times.

Example: python3 bench/migrate_bench.py                    # everything, 5 runs, 1 GiB
         python3 bench/migrate_bench.py --ram-mib 128 --runs 1 --routes plain,direct
         python3 bench/migrate_bench.py --busy-only --runs 3       # the busy guest alone
         python3 bench/migrate_bench.py --disk-only --runs 3       # disk copy alone
Needs: qemu-system-x86_64, openssl, a release build of vmferry (cargo build --release -p
vmferry); installs stunnel4 with apt-get if it is missing (as root). Everything it starts is
killed and its files (also in /dev/shm) removed on exit, failure or Ctrl-C. Exits 1 if any
run failed (the tables are printed all the same).
"""
import argparse
import ctypes
import datetime
import glob
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import disk_routes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMFERRY = os.environ.get("VMFERRY", os.path.join(ROOT, "target", "release", "vmferry"))
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
GUEST_DIR = os.environ.get("VMFERRY_CACHE", os.path.join(ROOT, ".cache", "guest"))
GUEST_APPEND = "console=ttyS0 quiet panic=-1"
SHM_PREFIX = "/dev/shm/vmferry-bench-"
QEMU_ROUTES = ("plain", "plain-unix", "qemu-tls", "stunnel", "relay")
VMFERRY_ROUTES = ("direct", "reverse", "tunnel", "vmferry", "direct-zstd", "tunnel-zstd")
ALL_ROUTES = QEMU_ROUTES + VMFERRY_ROUTES
UNLIMITED = 1 << 40  # QEMU's max-bandwidth default is a cap: lift it for every route
GIB = 1 << 30

# ---------------------------------------------------------------------------------------
# Everything started or made is registered here and torn down by cleanup().

PROCS = []  # Popen objects still to kill
PATHS = []  # files and dirs to remove


def _die_with_parent():
    # Children get SIGKILL if this script dies without running its cleanup (kill -9).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw):
    """Starts a child in its own session (Ctrl-C reaches only this script, whose cleanup
    then kills it), registered for cleanup."""
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                         start_new_session=True, preexec_fn=_die_with_parent, **kw)
    PROCS.append(p)
    return p


def kill(p):
    if p.poll() is None:
        try:
            p.kill()
        except OSError:
            pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if p in PROCS:
        PROCS.remove(p)


def remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass
    if path in PATHS:
        PATHS.remove(path)


def cleanup():
    for p in list(PROCS):
        kill(p)
    for path in list(PATHS):
        remove(path)


def _on_signal(sig, _frame):
    raise SystemExit(128 + sig)


def remove_stale_files():
    """Removes the /dev/shm files and work dirs of earlier runs of this script that were
    killed -9 (their names carry the pid)."""
    tmp = tempfile.gettempdir()
    for path in glob.glob(SHM_PREFIX + "*") + glob.glob(os.path.join(tmp, "vmferry-bench-*-*")):
        m = re.match(r".*/vmferry-bench-(?:src-|dst-)?(\d+)-", path + "-")
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            remove(path)
        except OSError:
            pass


def shm_path(what):
    path = f"{SHM_PREFIX}{os.getpid()}-{what}"
    PATHS.append(path)
    return path


# ---------------------------------------------------------------------------------------
# QEMU and QMP


class Qmp:
    def __init__(self, path, timeout=30.0):
        deadline = time.time() + timeout
        while True:
            self.s = socket.socket(socket.AF_UNIX)
            try:
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.s.settimeout(timeout)
        self.f = self.s.makefile("rwb")
        try:
            self.f.readline()  # the greeting: sent once QEMU's main loop runs
            self.cmd("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP {name}: QEMU closed the connection")
            r = json.loads(line)
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error'].get('desc', r['error'])}")

    def close(self):
        # The file object holds its own reference to the socket: close both, or
        # QEMU (one QMP client at a time) never greets the next client.
        try:
            self.f.close()
        finally:
            self.s.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class Qemu:
    def __init__(self, work, tag, ram_path, ram_mib, incoming, prealloc, paused=True, guest=None,
                 append=GUEST_APPEND, extra=()):
        self.tag = tag
        self.qmp = os.path.join(work, f"{tag}.qmp")
        self.serial = os.path.join(work, f"{tag}.serial")
        self.errlog = os.path.join(work, f"{tag}.stderr")
        for path in (self.qmp, self.serial):
            remove(path)
        args = [QEMU, "-machine", "q35,accel=tcg,memory-backend=ram0", "-m", f"{ram_mib}M",
                "-object", f"memory-backend-file,id=ram0,size={ram_mib}M,mem-path={ram_path},share=on"
                + (",prealloc=on" if prealloc else ""),
                "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", f"file:{self.serial}",
                "-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if guest:
            args += ["-kernel", guest[0], "-initrd", guest[1], "-append", append]
        args += list(extra)
        if paused:
            args.append("-S")
        if incoming:
            args += ["-incoming", "defer"]
        with open(self.errlog, "w") as err:
            self.p = spawn(args, stderr=err)
        self.pid = self.p.pid
        # Wait for the QMP greeting, not just the socket file: QEMU greets from its main
        # loop, after prealloc=on has touched all RAM, so that stays out of the clock.
        deadline = time.time() + 120
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"QEMU {tag} exited: {self.stderr_tail()}")
            if os.path.exists(self.qmp):
                try:
                    Qmp(self.qmp, timeout=120).close()
                    break
                except OSError:
                    pass
            if time.time() > deadline:
                raise RuntimeError(f"QEMU {tag} did not start")
            time.sleep(0.01)

    def stderr_tail(self):
        try:
            with open(self.errlog) as f:
                return " ".join(f.read().strip().splitlines()[-3:]) or "(no stderr)"
        except OSError:
            return "(no stderr)"

    def stop(self):
        kill(self.p)
        remove(self.qmp)


def cpu_seconds(pids):
    """utime + stime of these processes (all their threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_listening(port, proc, what, timeout=20):
    """Waits until something listens on 127.0.0.1:port (read from /proc/net/tcp, so no
    probe connection is made)."""
    needle = f"0100007F:{port:04X}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[1] == needle and parts[3] == "0A":
                    return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on port {port}")


# ---------------------------------------------------------------------------------------
# Certificates (for QEMU's TLS and stunnel; vmferry makes its own with `vmferry certs`)


def make_x509(dir_):
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate, with the
    file names QEMU's tls-creds-x509 expects."""
    os.makedirs(dir_)

    def ossl(*args):
        r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=dir_)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {args[0]}: {r.stderr.strip()}")

    with open(os.path.join(dir_, "ca.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
                "subjectKeyIdentifier=hash\n")
    with open(os.path.join(dir_, "server.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    with open(os.path.join(dir_, "client.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=clientAuth\n")
    for name in ("ca", "server", "client"):
        ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}-key.pem")
    ossl("req", "-new", "-key", "ca-key.pem", "-subj", "/CN=vmferry-bench CA", "-out", "ca.csr")
    ossl("x509", "-req", "-in", "ca.csr", "-signkey", "ca-key.pem", "-days", "30",
         "-extfile", "ca.ext", "-out", "ca-cert.pem")
    for name, cn in (("server", "localhost"), ("client", "vmferry-bench-client")):
        ossl("req", "-new", "-key", f"{name}-key.pem", "-subj", f"/CN={cn}", "-out", f"{name}.csr")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}-cert.pem")


# ---------------------------------------------------------------------------------------
# The long-running carriers: vmferry daemons and stunnel


class Daemon:
    def __init__(self, work, name, certs):
        self.work, self.name, self.certs = work, name, certs
        self.restarts = 0
        self.start()

    def start(self):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        state = os.path.join(self.work, self.name)
        remove(os.path.join(state, "control.sock"))
        with open(os.path.join(self.work, f"{self.name}.log"), "a") as log:
            self.p = spawn([VMFERRY, "serve", "--listen", self.addr, "--state-dir", state,
                            "--certs", self.certs], stderr=log)
        self.pid = self.p.pid
        deadline = time.time() + 20
        while not os.path.exists(os.path.join(state, "control.sock")):
            if time.time() > deadline or self.p.poll() is not None:
                raise RuntimeError(f"vmferry daemon {self.name} did not start (see its log)")
            time.sleep(0.02)
        wait_listening(self.port, self.p, f"vmferry daemon {self.name}")

    def ensure(self):
        """Restarts the daemon if an earlier (failed) run took it down."""
        if self.p.poll() is not None:
            print(f"    (vmferry daemon {self.name} had exited with status {self.p.returncode}:"
                  " restarting it)", flush=True)
            kill(self.p)
            self.restarts += 1
            self.start()


def find_stunnel():
    return shutil.which("stunnel4") or shutil.which("stunnel")


def install_stunnel():
    if find_stunnel():
        return find_stunnel()
    if os.geteuid() != 0:
        raise RuntimeError("stunnel is missing (apt-get install stunnel4, as root)")
    print("installing stunnel4 with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "stunnel4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not find_stunnel():
        raise RuntimeError(f"apt-get install stunnel4 failed: {r.stderr.strip()[-300:]}")
    return find_stunnel()


class Stunnel:
    """stunnel client (source side) -> TLS 1.3 with mutual certificates -> stunnel server
    (destination side) -> the destination QEMU's fixed incoming port."""

    def __init__(self, work, x509):
        binary = install_stunnel()
        self.dst_port = free_port()  # the destination QEMU listens here, every run
        self.server_port = free_port()
        self.client_port = free_port()
        ca = os.path.join(x509, "ca-cert.pem")
        common = "foreground = yes\npid =\nsyslog = no\ndebug = 4\nsslVersionMin = TLSv1.3\n"
        server = (common + f"[migration]\naccept = 127.0.0.1:{self.server_port}\n"
                  f"connect = 127.0.0.1:{self.dst_port}\n"
                  f"cert = {x509}/server-cert.pem\nkey = {x509}/server-key.pem\n"
                  f"CAfile = {ca}\nverifyChain = yes\n")
        client = (common + f"client = yes\n[migration]\naccept = 127.0.0.1:{self.client_port}\n"
                  f"connect = 127.0.0.1:{self.server_port}\n"
                  f"cert = {x509}/client-cert.pem\nkey = {x509}/client-key.pem\n"
                  f"CAfile = {ca}\nverifyChain = yes\ncheckHost = localhost\n")
        self.procs = []
        for name, conf, port in (("server", server, self.server_port),
                                 ("client", client, self.client_port)):
            path = os.path.join(work, f"stunnel-{name}.conf")
            with open(path, "w") as f:
                f.write(conf)
            with open(os.path.join(work, f"stunnel-{name}.log"), "w") as log:
                p = spawn([binary, path], stderr=log)
            self.procs.append(p)
            wait_listening(port, p, f"stunnel {name}")
        self.pids = [p.pid for p in self.procs]
        r = subprocess.run([binary, "-version"], capture_output=True, text=True)
        lines = (r.stdout + r.stderr).splitlines()
        self.version = " / ".join(x.strip() for x in lines if x.startswith(("stunnel ", "Running "))) or "stunnel"

    def alive(self):
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"stunnel exited with status {p.returncode}")


# ---------------------------------------------------------------------------------------
# One migration


class Env:
    """What the runs share: work dir, certificates, carriers, sizes."""

    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.certs = None
        self.x509 = None
        self.daemons = None
        self.daemons_error = None
        self.stunnel = None
        self.stunnel_error = None


def install_socat():
    if shutil.which("socat"):
        return shutil.which("socat")
    if os.geteuid() != 0:
        raise RuntimeError("socat is missing (apt-get install socat, as root)")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "socat"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not shutil.which("socat"):
        raise RuntimeError(f"apt-get install socat failed: {r.stderr.strip()[-300:]}")
    return shutil.which("socat")


def start_relay(dst_port):
    """Two socat relays in a row (like the two daemons), 256 KiB buffers, no encryption.
    Returns (the port the source QEMU dials, the socat processes)."""
    if not hasattr(start_relay, "socat"):
        start_relay.socat = install_socat()
    mid, entry = free_port(), free_port()
    procs = []
    for listen, to in ((mid, dst_port), (entry, mid)):
        p = spawn([start_relay.socat, "-b", "262144", f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr",
                   f"TCP:127.0.0.1:{to}"])
        procs.append(p)
        wait_listening(listen, p, "socat")
    return entry, procs


def qemu_route_migrate(env, route, src, dst, multifd, live):
    """plain / qemu-tls / stunnel / relay: drives both QEMUs over QMP. Returns (elapsed s,
    source query-migrate info, carrier pids)."""
    carrier = []
    relays = []
    if route == "relay":
        if multifd:
            raise RuntimeError("relay carries one stream only (socat without fork)")
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
        # socat ends with its connection; reaped here, its CPU is the children's.
        c0 = children_cpu()
        for p in relays:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill(p)
            if p in PROCS:
                PROCS.remove(p)
        r["controller_cpu"] = children_cpu() - c0
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
         "streams": result.get("streams"), "controller_cpu": controller_cpu}
    return elapsed, r, carrier


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
        q0 = cpu_seconds(qemu_pids)
        c0 = cpu_seconds(carrier)
        try:
            elapsed, r, carrier = migrate(env, route, src, dst, multifd)
        except Exception as e:
            raise RuntimeError(f"{e}{qemu_complaints(src, dst)}") from None
        r["cpu_qemu"] = cpu_seconds(qemu_pids) - q0
        r["cpu"] = r["cpu_qemu"] + cpu_seconds(carrier) - c0 + r.get("controller_cpu", 0.0)
        r["elapsed"] = elapsed
        if subprocess.run(["cmp", "-s", template, dst_ram]).returncode != 0:
            raise RuntimeError("destination RAM differs from the source RAM")
        return r
    finally:
        for q in (src, dst):
            if q:
                q.stop()
        remove(dst_ram)


def qemu_complaints(*qemus):
    """What the QEMUs wrote on stderr (why a migration failed, often), as an error tail."""
    said = []
    for q in qemus:
        try:
            with open(q.errlog, errors="replace") as f:
                text = " ".join(f.read().split())
        except OSError:
            continue
        if text:
            said.append(f"{q.tag} QEMU: {text[-300:]}")
    return f" [{'; '.join(said)}]" if said else ""


def heartbeats(path):
    try:
        with open(path, errors="replace") as f:
            return [int(n) for n in re.findall(r"vmferry-heartbeat (\d+)", f.read())]
    except OSError:
        return []


def wait_heartbeat(path, above, timeout, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        hb = heartbeats(path)
        if hb and hb[-1] > above:
            return hb
        if proc.p.poll() is not None:
            raise RuntimeError(f"QEMU {proc.tag} exited: {proc.stderr_tail()}")
        time.sleep(0.1)
    raise RuntimeError(f"no heartbeat above {above} in {os.path.basename(path)} after {timeout} s")


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


# ---------------------------------------------------------------------------------------
# The busy guest: dirties memory faster than a capped link carries it

BUSY_ROUTES = ("plain-postcopy", "postcopy-direct", "postcopy-tunnel", "autoconv-direct")
BUSY_POLL = 0.005  # how often the source is asked, as vmferry's source daemon does


def parse_size(s):
    """A size like vmferry's --max-bandwidth takes: 4096, 10M, 1G (binary suffixes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 10M, 1048576)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


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


# ---------------------------------------------------------------------------------------
# Reporting


def streams_label(multifd):
    return "1 stream" if multifd == 0 else f"multifd {multifd}"


def fmt_ms(v):
    return "-" if v is None else f"{v:.0f} ms"


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
                       cpu_qemu=statistics.median(r["cpu_qemu"] for r in runs) / gib)
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
    print("cpu s/GiB: both QEMUs + the carrier (stunnel, or both vmferry daemons + controller);"
          " (QEMUs): the QEMUs' share.")
    print()
    print_table(rows, a.runs)


def print_table(rows, runs):
    print(f"{'route':11} {'streams':10} {'n':>2} {'median s':>9} {'min-max s':>13} {'GiB/s':>6}"
          f" {'vs plain':>9} {'QEMU ms':>8} {'cpu s/GiB':>10} {'(QEMUs)':>8}")
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
              f" {ratio:>9} {row['qemu_ms']:8.0f} {row['cpu']:10.2f} {row['cpu_qemu']:8.2f}")
        if row["failed"]:
            print(f"{'':13} and {row['failed']} failed run(s), the last: {row['error']}")


def print_markdown(rows, live_rows, a, header):
    cmd = " ".join(["python3 bench/migrate_bench.py"] + sys.argv[1:])
    print(f"Measured {header} (`{cmd}`):")
    notes = []
    if rows:
        print()
        print("| route       | streams    | runs | median wall | min–max       | GiB/s | vs plain | CPU s/GiB |")
        print("|-------------|------------|------|-------------|---------------|-------|----------|-----------|")
        for row in rows:
            runs = f"{row['n']}" + (f"+{row['failed']}✗" if row["failed"] else "")
            head = f"| {row['route']:11} | {streams_label(row['multifd']):10} | {runs:4} |"
            if row["failed"]:
                notes.append(f"{row['route']}, {streams_label(row['multifd'])}: {row['failed']} failed"
                             f" run(s): {row['error']}")
            if row.get("median") is None:
                print(f"{head} failed      | –             |     – |        – |         – |")
                continue
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "–"
            mm = f"{row['min']:.2f}–{row['max']:.2f} s"
            med = f"{row['median']:.3f} s"
            print(f"{head} {med:11} | {mm:13} | {row['gibps']:5.2f} | {ratio:>8} | {row['cpu']:9.2f} |")
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


def med_range(values, unit="ms", digits=0):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"
            f" {unit}")


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


def machine_header(load_start):
    return (f"{datetime.date.today().isoformat()} on this {os.cpu_count()}-core machine (127.0.0.1, TCG;"
            f" load average {load_start.split()[0]} at the start, {loadavg().split()[0]} at the end)")


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------


def parse_list(s, allowed=None, conv=str):
    items = [conv(x.strip()) for x in s.split(",") if x.strip()]
    if allowed:
        bad = [x for x in items if x not in allowed]
        if bad:
            sys.exit(f"unknown: {', '.join(map(str, bad))} (choose from {', '.join(allowed)})")
    return items


def main():
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    ap.add_argument("--routes", default="plain,qemu-tls,stunnel,direct,reverse,tunnel",
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
    ap.add_argument("--json-out", help="also write every run's numbers to this file")
    a = ap.parse_args()
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
    need_vmferry = (any(r in VMFERRY_ROUTES for r in routes + live_routes)
                    or any(r != "plain-postcopy" for r in busy_routes)
                    or any(r in VMFERRY_ROUTES for r in disk_list))
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
        if need_vmferry:
            env.certs = os.path.join(work, "certs")
            subprocess.run([VMFERRY, "certs", "init", "--dir", env.certs], check=True, capture_output=True)
            subprocess.run([VMFERRY, "certs", "issue", "--dir", env.certs, "--host", "localhost",
                            "--ip", "127.0.0.1"], check=True, capture_output=True)
            try:
                env.daemons = [Daemon(work, "src-daemon", env.certs), Daemon(work, "dst-daemon", env.certs)]
            except Exception as e:  # reported on each vmferry route
                env.daemons_error = str(e)
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
                          f"  cpu {r['cpu']:5.2f} s (QEMUs {r['cpu_qemu']:.2f})  RAM identical{extra}",
                          flush=True)
                    all_runs.append({"route": route, "multifd": mfd, "round": tag, **r})
                    if i >= a.warmup:
                        results[cell].append(r)
                    break

        rows = summarize(cells, results, failures, gib)
        if rows:
            print_paused(rows, a)

        disk_rows, disk_load = [], None
        if disk_list:
            disk_start = loadavg()
            disk_rows = disk_routes.run_all(sys.modules[__name__], env, disk_list)
            disk_load = (disk_start.split()[0], loadavg().split()[0])
            disk_routes.print_rows(disk_rows, a)

        live_rows = []
        if live_routes:
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

        busy_rows, busy_summary, busy_load = [], None, None
        if busy_routes:
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

        print(f"\nload average now {loadavg()}")
        if env.daemons and any(d.restarts for d in env.daemons):
            print("note: a vmferry daemon was restarted after a failed run")
        print("\n--- for the README ---\n")
        print_markdown(rows, live_rows, a, machine_header(load_start))
        if busy_summary:
            print_busy_markdown(busy_summary, a, busy_load)
        if disk_rows:
            disk_routes.print_markdown(disk_rows, a, disk_load)
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump({"args": vars(a), "runs": all_runs,
                           "summary": [{k: v for k, v in row.items()} for row in rows]}, f, indent=1)
        if (any(failures.values()) or any(err for *_, err in live_rows)
                or any(row["failed"] for row in disk_rows)
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
