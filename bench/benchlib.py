"""The shared machinery of the migration benchmark (bench/migrate_bench.py and its scenario
modules: paused_routes, live_routes, busy_routes, disk_routes).

What is here: the one cleanup registry (PROCS, PATHS) with spawn/kill/remove/cleanup and
remove_stale_files, shm_path; QEMU and QMP (Qemu, Qmp, qemu_complaints, heartbeats,
wait_heartbeat); CPU accounting (cpu_seconds, children_cpu); ports (free_port,
wait_listening); certificates for QEMU's TLS and stunnel (make_x509); the long-running
carriers (vmferry Daemon, Stunnel, start_relay with socat); Env, what the runs share; and
the small helpers of reporting and argument parsing (fmt_ms, streams_label, med_range,
loadavg, machine_header, parse_size, parse_list).

Every process any module starts goes through spawn() and every file or dir it makes is in
PATHS (shm_path() registers its /dev/shm files); what needs more than a kill or an unlink
(libvirt hosts, network namespaces) registers a teardown function in HOOKS. cleanup() tears
all of it down on exit, failure or Ctrl-C. Nothing here or in the scenario modules may ever
leave a process (QEMU, vmferry daemon or controller, stunnel, socat, libvirtd), a namespace
or a /dev/shm file behind: start processes only through spawn(), register every file, and
keep PROCS, PATHS and HOOKS the one registry (append to and remove from them, never rebind
them).
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMFERRY = os.environ.get("VMFERRY", os.path.join(ROOT, "target", "release", "vmferry"))
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")


def use_qemu(choice):
    """Sets the QEMU every guest of this run uses: "system" (qemu-system-x86_64 on PATH),
    "10" (QEMU 10.0 from scripts/qemu10.sh, fetched if missing) or a path."""
    global QEMU
    if choice == "system":
        QEMU = "qemu-system-x86_64"
    elif choice == "10":
        out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "qemu10.sh")],
                             capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            sys.exit(f"--qemu 10: scripts/qemu10.sh failed: {out.stderr.strip()}")
        QEMU = out.stdout.strip().splitlines()[-1]
    else:
        QEMU = choice
    return QEMU
GUEST_DIR = os.environ.get("VMFERRY_CACHE", os.path.join(ROOT, ".cache", "guest"))
GUEST_APPEND = "console=ttyS0 quiet panic=-1 no_timer_check"
SHM_PREFIX = "/dev/shm/vmferry-bench-"
UNLIMITED = 1 << 40  # QEMU's max-bandwidth default is a cap: lift it for every route
GIB = 1 << 30

# ---------------------------------------------------------------------------------------
# Everything started or made is registered here and torn down by cleanup().

PROCS = []  # Popen objects still to kill
PATHS = []  # files and dirs to remove
HOOKS = []  # teardown functions (libvirt hosts, namespaces): run first, last registered first


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
    while HOOKS:
        try:
            HOOKS.pop()()
        except Exception as e:  # the rest of the teardown must still run
            print(f"cleanup: {e}", file=sys.stderr)
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
                 append=GUEST_APPEND, extra=(), binary=None):
        self.tag = tag
        self.qmp = os.path.join(work, f"{tag}.qmp")
        self.serial = os.path.join(work, f"{tag}.serial")
        self.errlog = os.path.join(work, f"{tag}.stderr")
        for path in (self.qmp, self.serial):
            remove(path)
        args = [binary or QEMU, "-machine", "q35,accel=tcg,memory-backend=ram0", "-m", f"{ram_mib}M",
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
# The long-running carriers: vmferry daemons, stunnel, socat relays


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
        self.log_path = os.path.join(self.work, f"{self.name}.log")
        with open(self.log_path, "a") as log:
            # The daemons start the QEMUs of managed VMs: the same binary as the bench's own.
            self.p = spawn([VMFERRY, "serve", "--listen", self.addr, "--state-dir", state,
                            "--certs", self.certs, "--qemu", QEMU], stderr=log)
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
    Each forks a child per connection (one relay per connection, as the daemons run one
    pump per stream), so multifd works too. Returns (the port the source QEMU dials, the
    socat processes); end them with stop_relays."""
    if not hasattr(start_relay, "socat"):
        start_relay.socat = install_socat()
    mid, entry = free_port(), free_port()
    procs = []
    for listen, to in ((mid, dst_port), (entry, mid)):
        p = spawn([start_relay.socat, "-b", "262144", f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork",
                   f"TCP:127.0.0.1:{to}"])
        procs.append(p)
        wait_listening(listen, p, "socat")
    return entry, procs


def stop_relays(relays, timeout=10):
    """Waits until every forked relay child has ended (their connections closed) and was
    reaped, then ends the listening socats. Returns their CPU seconds, children included."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(child_pids(p.pid) for p in relays):
        time.sleep(0.01)
    cpu = sum(cpu_seconds_tree(p.pid) for p in relays)
    for p in relays:
        try:
            p.terminate()
            p.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        kill(p)
    return cpu


def child_pids(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return f.read().split()
    except OSError:
        return []


def cpu_seconds_tree(pid):
    """utime + stime of a process and of its children it has reaped (cutime + cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / tick
    except (OSError, IndexError, ValueError):
        return 0.0


# ---------------------------------------------------------------------------------------
# What the runs share


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


# ---------------------------------------------------------------------------------------
# Reporting and arguments


def streams_label(multifd):
    return "1 stream" if multifd == 0 else f"multifd {multifd}"


def fmt_ms(v):
    return "-" if v is None else f"{v:.0f} ms"


def med_range(values, unit="ms", digits=0):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"
            f" {unit}")


def machine_header(load_start):
    return (f"{datetime.date.today().isoformat()} on this {os.cpu_count()}-core machine (127.0.0.1, TCG;"
            f" load average {load_start.split()[0]} at the start, {loadavg().split()[0]} at the end)")


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def parse_size(s):
    """A size like vmferry's --max-bandwidth takes: 4096, 10M, 1G (binary suffixes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 10M, 1048576)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


def parse_list(s, allowed=None, conv=str):
    items = [conv(x.strip()) for x in s.split(",") if x.strip()]
    if allowed:
        bad = [x for x in items if x not in allowed]
        if bad:
            sys.exit(f"unknown: {', '.join(map(str, bad))} (choose from {', '.join(allowed)})")
    return items
