"""Two libvirt "hosts" on one machine for the libvirt benchmark (bench/libvirt_routes.py):
the Python twin of the Rust test fixture (crates/vmferry-testkit/src/libvirt/host.rs and
netns.rs), with the same commands and settings; docs/libvirt.md says why each is needed.

Each host is a network namespace (`vmf-lvbench-<pid>-<n>a`/`b`, joined by a veth pair,
10.232.X.1 and .2) with a libvirtd started as

    ip netns exec NS unshare --mount --uts --propagation private -- sh -c START_SCRIPT

which bind-mounts private copies over /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
/var/log/libvirt, /etc/libvirt and the work path WORK (the same path on both hosts, a
different directory behind it), hides /run/systemd and /run/dbus, sets the host name, and
execs libvirtd with its pid file in /run/libvirt. Outside, virsh reaches a host's libvirtd
with `qemu:///system?socket=DIR/run/libvirt-sock`; a process started with
`LibvirtHost.command()` (nsenter into libvirtd's network, mount and UTS namespaces) sees
the host as libvirtd does, and reaches it with `qemu:///system`.

Everything is torn down by benchlib.cleanup() (on exit, failure or Ctrl-C): each host's
libvirtd and every process in its UTS namespace (its QEMUs, vmferry daemons, socats
started inside), then the namespaces (with anything left in them), then the directories.
The names carry this script's pid, so a later run, or the Rust tests' own sweep (prefix
`vmf-`), removes what a run killed -9 left behind. The system's libvirt is never used or
touched.
"""
import os
import shutil
import subprocess
import time
import uuid

from benchlib import HOOKS, PATHS, ROOT, kill, remove, spawn

PREFIX = "vmf-lvbench-"
CAPS_CACHE = os.path.join(ROOT, ".cache", "libvirt-qemu-caps")
START_TIMEOUT = 60
VIRSH_TIMEOUT = 30

PRIVATE = [("/run/libvirt", "run"), ("/var/lib/libvirt", "lib"), ("/var/cache/libvirt", "cache"),
           ("/var/log/libvirt", "log"), ("/etc/libvirt", "etc")]

QEMU_CONF = """# vmferry bench host (bench/libvirt_hosts.py); see docs/libvirt.md
stdio_handler = "file"
cgroup_controllers = [ ]
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
"""

START_SCRIPT = r"""set -e
hostname "$1"
d=$2
mkdir -p /run/libvirt
mount --bind "$d/run" /run/libvirt
mount --bind "$d/lib" /var/lib/libvirt
mount --bind "$d/cache" /var/cache/libvirt
mount --bind "$d/log" /var/log/libvirt
mount --bind "$d/etc" /etc/libvirt
mount --bind "$d/work" "$3"
for hide in /run/systemd /run/dbus; do
    if [ -d "$hide" ]; then mount -t tmpfs -o mode=0755,size=64k vmferry-hidden "$hide"; fi
done
exec libvirtd --pid-file /run/libvirt/libvirtd.pid
"""


def run(args, timeout=30, check=True, **kw):
    """Runs a command to completion within `timeout` s; its CompletedProcess (text)."""
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:6]))} failed ({r.returncode}):"
                           f" {(r.stderr or r.stdout).strip()[-500:]}")
    return r


def _uts_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def _pids_in_uts(ns):
    pids = []
    for e in os.listdir("/proc"):
        if e.isdigit() and _uts_of(e) == ns:
            pids.append(int(e))
    return pids


def _netns_pids(ns):
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _remove_netns(ns):
    for _ in range(5):
        pids = _netns_pids(ns)
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, 9)
            except OSError:
                pass
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def sweep_stale():
    """Removes the namespaces of earlier runs of this script that were killed -9."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _remove_netns(name)


class NetHost:
    def __init__(self, name, ip, iface):
        self.name, self.ip, self.iface = name, ip, iface

    def command(self, *args):
        return ["ip", "netns", "exec", self.name, *args]


class TwoHosts:
    """Two network namespaces joined by a veth pair; removed (with every process inside)
    by benchlib.cleanup()."""
    count = 0

    def __init__(self):
        n = TwoHosts.count
        TwoHosts.count += 1
        base = f"{PREFIX}{os.getpid()}-{n}"
        x = (os.getpid() * 37 + n) % 200 + 20
        self.a = NetHost(base + "a", f"10.232.{x}.1", "vethA")
        self.b = NetHost(base + "b", f"10.232.{x}.2", "vethB")
        HOOKS.append(self.remove)
        a, b = self.a, self.b
        run(["ip", "netns", "add", a.name])
        run(["ip", "netns", "add", b.name])
        run(["ip", "-n", a.name, "link", "add", a.iface, "type", "veth", "peer", "name", b.iface])
        run(["ip", "-n", a.name, "link", "set", b.iface, "netns", b.name])
        for h in (a, b):
            run(["ip", "-n", h.name, "addr", "add", f"{h.ip}/24", "dev", h.iface])
            run(["ip", "-n", h.name, "link", "set", h.iface, "up"])
            run(["ip", "-n", h.name, "link", "set", "lo", "up"])

    def remove(self):
        _remove_netns(self.a.name)
        _remove_netns(self.b.name)


# libvirtd's debug log of its migration and process code (--libvirt-phases): each step of
# a peer-to-peer migration with a timestamp, for migration_phases().
MIGRATION_LOG = ('log_filters = "1:qemu.qemu_migration 1:qemu.qemu_process 4:object 4:json'
                 ' 4:event 4:util 4:rpc"\nlog_outputs = "1:file:/var/log/libvirt/libvirtd.log"\n')


def migration_phases(text):
    """Seconds each step of the last peer-to-peer migration in a source libvirtd's debug log
    (`text`, MIGRATION_LOG) took, or None if it holds no whole one: prepare (the destination
    starts its QEMU), perform (the migration proper), finish (the destination resumes the
    guest), source exit (SIGTERM to the source QEMU until it is gone: libvirt looks every
    200 ms)."""
    marks = {}
    for line in text.splitlines():
        for key, needle in (("prepare", ": Prepare3 "), ("perform", ": Perform3 "),
                            ("finish", ": Finish3 "), ("confirm", ": Confirm3 "),
                            ("kill", "qemuProcessKill:"),
                            ("gone", "qemuMigrationSrcRestoreDomainState:")):
            if needle in line:
                try:
                    clock = line.split()[1].split("+")[0]
                    h, m, sec = clock.split(":")
                    marks[key] = int(h) * 3600 + int(m) * 60 + float(sec)
                except (IndexError, ValueError):
                    pass
    need = ("prepare", "perform", "finish", "confirm", "kill", "gone")
    if any(k not in marks for k in need):
        return None
    return {"prepare": marks["perform"] - marks["prepare"],
            "perform": marks["finish"] - marks["perform"],
            "finish": marks["confirm"] - marks["finish"],
            "source exit": marks["gone"] - marks["kill"]}


class LibvirtHost:
    """One libvirtd in its own mount and UTS namespaces inside netns host `net`, its private
    directories under `dir_`, its work directory seen at `work` (the same on every host)."""

    def __init__(self, net, dir_, work, migration_log=False):
        self.net = net
        self.work = work
        self.hostname = net.name[:63]
        os.makedirs(work, exist_ok=True)
        for _, sub in PRIVATE:
            os.makedirs(os.path.join(dir_, sub), exist_ok=True)
        os.makedirs(os.path.join(dir_, "work"), exist_ok=True)
        self.dir = os.path.realpath(dir_)
        self.socket = os.path.join(self.dir, "run", "libvirt-sock")
        if len(self.socket) > 100:
            raise RuntimeError(f"{self.socket} is too long for a unix socket path")
        self.uri = f"qemu:///system?socket={self.socket}"
        self.uuid = str(uuid.uuid4())
        self.log = os.path.join(self.dir, "log", "libvirtd.log")
        with open(os.path.join(self.dir, "etc", "libvirtd.conf"), "w") as f:
            f.write(f"# vmferry bench host {self.hostname} (bench/libvirt_hosts.py)\n"
                    f'host_uuid = "{self.uuid}"\nauth_unix_ro = "none"\nauth_unix_rw = "none"\n'
                    'unix_sock_ro_perms = "0700"\n'
                    + (MIGRATION_LOG if migration_log else
                       'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'))
        with open(os.path.join(self.dir, "etc", "qemu.conf"), "w") as f:
            f.write(QEMU_CONF)
        self._seed_caps()
        self.uts = None
        HOOKS.append(self.stop)
        env = {k: v for k, v in os.environ.items()
               if k not in ("DBUS_SYSTEM_BUS_ADDRESS", "DBUS_SESSION_BUS_ADDRESS")}
        self.stderr = os.path.join(self.dir, "libvirtd.stderr")
        with open(self.stderr, "w") as err:
            self.p = spawn(net.command("unshare", "--mount", "--uts", "--propagation", "private",
                                       "--", "sh", "-c", START_SCRIPT, "sh", self.hostname,
                                       self.dir, work), stdout=err, stderr=err, env=env)
        self.pid = self.p.pid
        self.started = time.time()

    def wait_ready(self, timeout=START_TIMEOUT):
        """Waits until libvirtd answers `virsh version`; returns the seconds since start."""
        deadline = self.started + timeout
        last = ""
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"libvirtd in {self.net.name} exited ({self.p.returncode}):"
                                   f" {self.diagnostics()}")
            if os.path.exists(self.socket):
                try:
                    r = subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True,
                                       text=True, timeout=10, stdin=subprocess.DEVNULL)
                    if r.returncode == 0:
                        break
                    last = r.stderr.strip()
                except subprocess.TimeoutExpired:
                    last = "virsh version did not answer within 10 s"
            if time.time() > deadline:
                raise RuntimeError(f"libvirtd in {self.net.name} did not answer within {timeout} s"
                                   f" ({last}): {self.diagnostics()}")
            time.sleep(0.1)
        self.uts = _uts_of(self.pid)
        if self.uts is None or self.uts == _uts_of(os.getpid()):
            raise RuntimeError(f"libvirtd in {self.net.name} has no UTS namespace of its own")
        self._keep_caps()
        return time.time() - self.started

    def stop(self):
        """libvirtd, then every process in its UTS namespace (its QEMUs, whatever ran
        through command()); with the last of them its mount namespace goes."""
        ns = _uts_of(self.pid) or self.uts
        kill(self.p)
        if not ns or ns == _uts_of(os.getpid()):
            return
        for _ in range(10):
            pids = _pids_in_uts(ns)
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
            time.sleep(0.05)

    def command(self, *args):
        """argv that runs a program inside the host as libvirtd sees it."""
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "-u", "--", *args]

    def virsh(self, *args, timeout=VIRSH_TIMEOUT, check=True):
        return run(["virsh", "-c", self.uri, *args], timeout=timeout, check=check).stdout

    def outside(self, inside):
        """The path outside of what the host sees at `inside` (under WORK or a private dir)."""
        if inside == self.work or inside.startswith(self.work + "/"):
            return os.path.join(self.dir, "work", os.path.relpath(inside, self.work))
        for mount, sub in PRIVATE:
            if inside.startswith(mount + "/"):
                return os.path.join(self.dir, sub, os.path.relpath(inside, mount))
        raise ValueError(f"{inside} is not private to host {self.hostname}")

    def domains(self):
        return [l.strip() for l in self.virsh("list", "--all", "--name").splitlines() if l.strip()]

    def state(self, name):
        return self.virsh("domstate", name).strip()

    def qemu_pid(self, name):
        try:
            with open(os.path.join(self.dir, "run", "qemu", f"{name}.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def diagnostics(self):
        out = []
        for p in (self.stderr, os.path.join(self.dir, "log", "libvirtd.log")):
            try:
                with open(p, errors="replace") as f:
                    out.append(f"{p}: {f.read()[-1500:]}")
            except OSError:
                pass
        return "\n".join(out)

    def _seed_caps(self):
        into = os.path.join(self.dir, "cache", "qemu", "capabilities")
        try:
            names = [n for n in os.listdir(CAPS_CACHE) if n.endswith(".xml")]
        except OSError:
            return
        os.makedirs(into, exist_ok=True)
        for n in names:
            try:
                shutil.copy(os.path.join(CAPS_CACHE, n), os.path.join(into, n))
            except OSError:
                pass

    def _keep_caps(self):
        src = os.path.join(self.dir, "cache", "qemu", "capabilities")
        try:
            names = [n for n in os.listdir(src) if n.endswith(".xml")]
            os.makedirs(CAPS_CACHE, exist_ok=True)
        except OSError:
            return
        for n in names:
            try:
                with open(os.path.join(src, n), "rb") as f:
                    new = f.read()
                try:
                    with open(os.path.join(CAPS_CACHE, n), "rb") as f:
                        if f.read() == new:
                            continue
                except OSError:
                    pass
                tmp = os.path.join(CAPS_CACHE, f".{n}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.write(new)
                os.rename(tmp, os.path.join(CAPS_CACHE, n))
            except OSError:
                pass


def start_two(root, migration_log=False):
    """Two netns hosts and a libvirtd on each, started at once, under root/a and root/b, both
    seeing their work directory at root/work (`migration_log`: MIGRATION_LOG). Returns
    (TwoHosts, a, b)."""
    sweep_stale()
    if not os.path.isdir("/run/libvirt"):
        os.makedirs("/run/libvirt", exist_ok=True)  # an empty mount point, as the fixture
    net = TwoHosts()
    work = os.path.join(root, "work")
    a = LibvirtHost(net.a, os.path.join(root, "a"), work, migration_log)
    b = LibvirtHost(net.b, os.path.join(root, "b"), work, migration_log)
    a.wait_ready()
    b.wait_ready()
    return net, a, b


def esc(s):
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def domain_xml(name, memory_mib, kernel, initrd, append, disk, serial, emulator):
    """The test guest's domain, as the Rust fixture's Domain::xml() writes it (`disk` None:
    no disk), run by the QEMU binary `emulator` (an absolute path)."""
    disk_xml = "" if disk is None else f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{esc(disk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
"""
    return f"""<domain type='qemu'>
  <name>{esc(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>{esc(kernel)}</kernel>
    <initrd>{esc(initrd)}</initrd>
    <cmdline>{esc(append)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{esc(emulator)}</emulator>
{disk_xml}    <serial type='file'>
      <source path='{esc(serial)}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def make_disk(path, mib, first_line, fill_mib=0):
    """A qcow2 image of `mib` MiB at `path` (outside path) starting with `first_line` (the
    test guest reads it at boot) and, from 1 MiB on, `fill_mib` MiB of random data (so a
    disk copy carries that much). Blank (a copy's destination) when first_line is None."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if first_line is None:
        run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{mib}M"])
        return
    raw = path + ".raw"
    PATHS.append(raw)
    with open(raw, "wb") as f:
        f.write(first_line.encode() + b"\n")
        if fill_mib:
            f.seek(1 << 20)
            for _ in range(min(fill_mib, mib - 1)):
                f.write(os.urandom(1 << 20))
        f.truncate(mib << 20)
    try:
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path], timeout=300)
    finally:
        remove(raw)


class UnixBridge:
    """A unix socket on host `frm` (`listen`, path as the hosts see it) forwarded to one on
    host `to` (`connect`) through TCP `port` between the namespaces, by two socats, as the
    Rust fixture's UnixBridge: `-t 60` so half-closes pass through. Unlike the fixture's,
    with 256 KiB buffers (`-b 262144`, as benchlib's relay): socat's default 8 KiB would
    make the baseline slower than it need be."""

    def __init__(self, frm, listen, to, connect, port, log_dir):
        self.listen_outside = frm.outside(listen)
        connect_outside = to.outside(connect)
        with open(os.path.join(log_dir, f"socat-{port}-to.log"), "w") as log:
            self.to_socat = spawn(to.net.command(
                "socat", "-d", "-d", "-b", "262144", "-t", "60", f"TCP-LISTEN:{port},bind={to.net.ip},reuseaddr,fork",
                f"UNIX-CONNECT:{connect_outside}"), stderr=log)
        _wait_tcp_listener(to.net, port, self.to_socat)
        with open(os.path.join(log_dir, f"socat-{port}-from.log"), "w") as log:
            self.from_socat = spawn(frm.net.command(
                "socat", "-d", "-d", "-b", "262144", "-t", "60", f"UNIX-LISTEN:{self.listen_outside},fork,unlink-early,mode=600",
                f"TCP:{to.net.ip}:{port}"), stderr=log)
        deadline = time.time() + 10
        while not os.path.exists(self.listen_outside):
            if time.time() > deadline or self.from_socat.poll() is not None:
                raise RuntimeError(f"socat did not create {self.listen_outside}")
            time.sleep(0.02)

    def stop(self):
        kill(self.from_socat)
        kill(self.to_socat)
        try:
            os.unlink(self.listen_outside)
        except OSError:
            pass


def _wait_tcp_listener(net, port, proc, timeout=10):
    deadline = time.time() + timeout
    want = f":{port:04X}"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"socat on port {port} exited ({proc.returncode})")
        r = subprocess.run(net.command("cat", "/proc/net/tcp"), capture_output=True, text=True)
        for line in r.stdout.splitlines()[1:]:
            f = line.split()
            if len(f) > 3 and f[1].endswith(want) and f[3] == "0A":
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} in {net.name}")
