//! libvirt test hosts: one `libvirtd` per netns test host, so a test can run libvirt's own
//! peer-to-peer migration (and later vmferry under it) between two "machines" on one.
//!
//! Each [`LibvirtHost`] is a `libvirtd` started as
//! `ip netns exec HOST unshare --mount --uts -- sh -c '<bind mounts>; exec libvirtd'`:
//!
//! ```text
//!   inside the host (what libvirtd and its QEMUs see)   outside (the test's files)
//!   /run/libvirt        (sockets, running state)         DIR/run
//!   /var/lib/libvirt    (domain dirs, monitor sockets)   DIR/lib
//!   /var/cache/libvirt  (QEMU capabilities cache)        DIR/cache
//!   /var/log/libvirt    (libvirtd.log, qemu/NAME.log)    DIR/log
//!   /etc/libvirt        (libvirtd.conf, qemu.conf only)  DIR/etc
//!   WORK                (disks, serial logs, sockets)    DIR/work
//!   /run/systemd, /run/dbus (if present)                 empty tmpfs: hidden
//! ```
//! `WORK` is the same path on every host (the test's `<tmp>/work`) but a different directory
//! behind it: libvirt migration needs every path in the domain XML, and the migration and
//! NBD socket paths, to be equal on both sides, while each side must see its own files.
//! (A tmpfs there would do too; a bind of a directory of the test's keeps the files readable
//! from outside, for the heartbeat checks and failure messages, until the test's temporary
//! directory goes.) The UTS namespace gives each host its own host name, and libvirtd.conf
//! its own `host_uuid`: migration refuses a destination with the source's name or UUID.
//! systemd and D-Bus are hidden so that libvirtd neither registers the test's QEMUs with the
//! machine's systemd-machined (A and B would both register `qemu-1-NAME`) nor asks polkit.
//!
//! libvirtd's pid file is moved into /run/libvirt: its default, /run/libvirtd.pid, lies
//! outside the private directories, so the second host failed to lock it (and the first
//! wrote into the machine's /run). The settings libvirtd needs here, each for a reason, are
//! in [`QEMU_CONF`] and [`LibvirtHost::spawn`]; docs/libvirt.md has the whole story, with
//! timings.
//!
//! libvirt's probe of the QEMU binaries (the bulk of its start-up time) is kept in
//! `<repo>/.cache/libvirt-qemu-caps` and copied into each new host's cache; libvirt
//! re-validates it and probes again when it is stale.
//!
//! This module must never touch the system's libvirt: not its sockets, state, logs or
//! configuration (everything libvirt writes lands in the private directories above; the only
//! thing made outside is an empty /run/libvirt mount point if the machine has none). Every
//! process it starts dies on drop — libvirtd, the QEMUs it started, anything else in the
//! host's UTS namespace — and with the last of them the mount namespace and its mounts go.
//! Every wait has a timeout. The fixture drives libvirt with `virsh` (simple to read and
//! debug); the product will use the `virt` crate.

use crate::guest::GuestImage;
use crate::netns::Host;
use crate::process::ChildGuard;
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long libvirtd may take to answer after it was started. It probes every QEMU binary
/// it finds first (4–9 s here, more when two start at once on 2 cores), unless the
/// capabilities kept from an earlier start are still valid (then 0.5–2 s).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one `virsh` call may take unless the caller says otherwise.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);

/// The directories each host gets privately: (path inside, directory under the host's dir).
const PRIVATE: [(&str, &str); 5] = [
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/var/cache/libvirt", "cache"),
    ("/var/log/libvirt", "log"),
    ("/etc/libvirt", "etc"),
];

/// qemu.conf for every test host. Each line is needed here:
/// - `stdio_handler = "file"`: QEMU's stdout/stderr go straight to /var/log/libvirt/qemu/
///   NAME.log; the default ("logd") needs a virtlogd, which nobody runs here.
/// - `cgroup_controllers = [ ]`: no cgroups (the machine's are not ours to change, and a
///   container may not delegate them).
/// - `user`/`group = "root"`, `security_driver = "none"`, `dynamic_ownership = 0`,
///   `remember_owner = 0`: QEMU runs as root and libvirt neither relabels nor chowns the
///   test's files (no SELinux/AppArmor profile, no xattrs left on images).
pub const QEMU_CONF: &str = r#"# vmferry test host (vmferry-testkit libvirt.rs); see docs/libvirt.md
stdio_handler = "file"
cgroup_controllers = [ ]
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
"#;

/// The script that `unshare` runs in the host's new mount and UTS namespaces before it
/// becomes libvirtd. Arguments: $1 host name, $2 the host's directory, $3 the work path.
/// `set -e`: a failed mount ends the start (the error is in the stderr file) rather than
/// letting libvirtd run on the system's directories.
const START_SCRIPT: &str = r#"set -e
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
# Its pid file would be /run/libvirtd.pid, outside the private directories: shared by
# the hosts (the second fails to lock it) and the system's own libvirtd.
exec libvirtd --pid-file /run/libvirt/libvirtd.pid
"#;

/// One libvirtd in its own mount and UTS namespace inside a netns test host; killed, with
/// everything it started, on drop.
#[derive(Debug)]
pub struct LibvirtHost {
    /// The network namespace libvirtd and its QEMUs run in.
    pub host: Host,
    /// The host name libvirtd sees (its own UTS namespace).
    pub hostname: String,
    /// libvirtd's host UUID (libvirtd.conf `host_uuid`).
    pub uuid: String,
    /// The host's directory outside: the sources of its private directories.
    pub dir: PathBuf,
    /// Where the host sees its private work directory (the same path on every host).
    pub work: PathBuf,
    /// The URI to reach this libvirtd from outside (virsh `-c`).
    pub uri: String,
    /// libvirtd itself (`ip` and `unshare` exec into it, so this is libvirtd's pid).
    daemon: ChildGuard,
    /// libvirtd's UTS namespace (`uts:[inode]`), once known: the QEMUs it starts share it,
    /// which is how [`Drop`] finds them even after libvirtd has died.
    uts_ns: Option<String>,
    /// When [`LibvirtHost::spawn`] started it, for the start-up time.
    started: Instant,
}

impl LibvirtHost {
    /// Starts libvirtd in `host` with its private directories under `dir` (made if
    /// missing) and its work directory seen at `work`, and waits until it answers.
    pub fn start(host: &Host, dir: &Path, work: &Path) -> Result<LibvirtHost> {
        let mut h = Self::spawn(host, dir, work)?;
        h.wait_ready(START_TIMEOUT)?;
        Ok(h)
    }

    /// Starts one libvirtd on each of two hosts at once (each spends seconds probing QEMU),
    /// under `root/a` and `root/b`, both seeing their work directory at `root/work`.
    pub fn start_two(
        hosts: &crate::netns::TwoHosts,
        root: &Path,
    ) -> Result<(LibvirtHost, LibvirtHost)> {
        let work = root.join("work");
        let mut a = Self::spawn(&hosts.a, &root.join("a"), &work)?;
        let mut b = Self::spawn(&hosts.b, &root.join("b"), &work)?;
        a.wait_ready(START_TIMEOUT)?;
        b.wait_ready(START_TIMEOUT)?;
        Ok((a, b))
    }

    /// Starts libvirtd without waiting for it; see [`LibvirtHost::wait_ready`].
    pub fn spawn(host: &Host, dir: &Path, work: &Path) -> Result<LibvirtHost> {
        if !work.is_absolute() {
            bail!("the work path {} must be absolute", work.display());
        }
        std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
        for (_, sub) in PRIVATE {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let own_work = dir.join("work");
        std::fs::create_dir_all(&own_work)
            .with_context(|| format!("create {}", own_work.display()))?;
        let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
        let socket = dir.join("run/libvirt-sock");
        // The socket's path must fit in sockaddr_un (108 bytes with the NUL).
        if socket.as_os_str().len() > 100 {
            bail!(
                "{} is too long for a unix socket path; use a shorter directory",
                socket.display()
            );
        }
        // A host name is at most 64 bytes; the namespace name is unique and short.
        let hostname: String = host.name.chars().take(63).collect();
        let uuid = random_uuid();
        let libvirtd_conf = format!(
            "# vmferry test host {hostname} (vmferry-testkit libvirt.rs); see docs/libvirt.md\n\
             # Distinct per host: migration refuses a destination with the source's UUID.\n\
             host_uuid = \"{uuid}\"\n\
             # No polkit (no D-Bus here); the sockets are root's only (mode 0700).\n\
             auth_unix_ro = \"none\"\n\
             auth_unix_rw = \"none\"\n\
             unix_sock_ro_perms = \"0700\"\n\
             # Warnings and errors (a failed migration's reason is an error).\n\
             log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n"
        );
        write(&dir.join("etc/libvirtd.conf"), &libvirtd_conf)?;
        write(&dir.join("etc/qemu.conf"), QEMU_CONF)?;
        seed_capabilities(&dir.join("cache"));
        let stderr_path = dir.join("libvirtd.stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let stdout = stderr.try_clone().context("dup libvirtd's stderr file")?;
        let mut cmd = host.command("unshare");
        cmd.args(["--mount", "--uts", "--propagation", "private", "--"])
            .args(["sh", "-c", START_SCRIPT, "sh"])
            .arg(&hostname)
            .arg(&dir)
            .arg(work)
            // No D-Bus for libvirtd, even if the environment names a bus.
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let daemon = ChildGuard::spawn(&mut cmd)
            .with_context(|| format!("start libvirtd in {}", host.name))?;
        Ok(LibvirtHost {
            host: host.clone(),
            hostname,
            uuid,
            uri: format!("qemu:///system?socket={}", socket.display()),
            dir,
            work: work.to_path_buf(),
            daemon,
            uts_ns: None,
            started: Instant::now(),
        })
    }

    /// Waits until libvirtd answers `virsh version` (which needs its QEMU driver ready),
    /// failing early, with its log, if it exits. Returns the time since the start.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = self.started + timeout;
        let socket = self.dir.join("run/libvirt-sock");
        let mut last = String::new();
        loop {
            if let Some(st) = self.daemon.try_wait()? {
                bail!(
                    "libvirtd in {} exited at start ({st}): {}",
                    self.host.name,
                    self.diagnostics()
                );
            }
            if socket.exists() {
                match self.virsh(&["version"], Duration::from_secs(10)) {
                    Ok(_) => break,
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "libvirtd in {} did not answer within {timeout:?} (last: {last}): {}",
                    self.host.name,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        keep_capabilities(&self.dir.join("cache"));
        self.uts_ns = uts_ns_of(self.daemon.id()).and_then(not_ours);
        if self.uts_ns.is_none() {
            bail!(
                "libvirtd in {} is not in a UTS namespace of its own",
                self.host.name
            );
        }
        Ok(self.started.elapsed())
    }

    /// libvirtd's process id.
    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// Runs `virsh -c URI ARGS` from outside, within `timeout`; its stdout, or an error with
    /// its stderr.
    pub fn virsh(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut c = Command::new("virsh");
        c.arg("-c").arg(&self.uri).args(args);
        let o = output_within(&mut c, timeout)?;
        if !o.status.success() {
            bail!(
                "virsh {} on {} failed ({}): {}",
                args.join(" "),
                self.hostname,
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The file outside that the host sees at `inside` (a path under one of its private
    /// directories or its work path).
    pub fn outside(&self, inside: &Path) -> Result<PathBuf> {
        if let Ok(rest) = inside.strip_prefix(&self.work) {
            return Ok(self.dir.join("work").join(rest));
        }
        for (mount, sub) in PRIVATE {
            if let Ok(rest) = inside.strip_prefix(mount) {
                return Ok(self.dir.join(sub).join(rest));
            }
        }
        bail!(
            "{} is not private to host {}: only {} and {} are",
            inside.display(),
            self.hostname,
            self.work.display(),
            PRIVATE.map(|(m, _)| m).join(", ")
        )
    }

    /// A command that runs `program` inside the host as libvirtd sees it: its network,
    /// mount and UTS namespaces (`nsenter -t PID -n -m -u`; nsenter execs, so the child's
    /// pid is the program's). For a process that must see the host's private paths.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.daemon.id().to_string(), "-n", "-m", "-u", "--"])
            .arg(program);
        c
    }

    /// Makes a qcow2 image of `mib` MiB at `inside` (a path in the work directory, as the
    /// host sees it). With `first_line` it starts with that line (the test guest reads the
    /// disk's first line at boot: on a blank disk that read crawls through the whole disk);
    /// without, it is blank (a destination for a disk copy).
    pub fn create_disk(&self, inside: &Path, mib: u64, first_line: Option<&str>) -> Result<()> {
        let path = self.outside(inside)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let size = format!("{mib}M");
        let mut c = Command::new("qemu-img");
        match first_line {
            None => {
                c.args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(&size);
            }
            Some(line) => {
                if line.contains('\n') {
                    bail!("the disk's first line must be one line: {line:?}");
                }
                let raw = path.with_extension("raw");
                let mut f = std::fs::File::create(&raw)
                    .with_context(|| format!("create {}", raw.display()))?;
                f.write_all(format!("{line}\n").as_bytes())?;
                f.set_len(mib << 20)?;
                drop(f);
                c.args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(&path);
            }
        }
        let o = output_within(&mut c, Duration::from_secs(30))?;
        let _ = std::fs::remove_file(path.with_extension("raw"));
        if !o.status.success() {
            bail!(
                "qemu-img for {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    }

    /// Defines `d` (persistently) and starts it. Its disk, if any, must exist.
    pub fn start_domain(&self, d: &Domain) -> Result<()> {
        let xml = self.dir.join(format!("{}.xml", d.name));
        write(&xml, &d.xml())?;
        let path = xml.to_string_lossy();
        self.virsh(&["define", &path], VIRSH_TIMEOUT)?;
        self.virsh(&["start", &d.name], VIRSH_TIMEOUT)
            .with_context(|| format!("QEMU's log: {}", self.qemu_log(&d.name)))?;
        Ok(())
    }

    /// The names of every domain this libvirtd knows, running or defined.
    pub fn domains(&self) -> Result<Vec<String>> {
        let out = self.virsh(&["list", "--all", "--name"], VIRSH_TIMEOUT)?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// `virsh domstate NAME`, e.g. "running", "paused", "shut off".
    pub fn domain_state(&self, name: &str) -> Result<String> {
        Ok(self
            .virsh(&["domstate", name], VIRSH_TIMEOUT)?
            .trim()
            .to_string())
    }

    /// The heartbeats in `d`'s serial log on this host (empty before it starts here).
    pub fn heartbeats(&self, d: &Domain) -> Result<Vec<u64>> {
        Ok(crate::serial::heartbeats(&self.outside(&d.serial)?))
    }

    /// Waits until `d`'s last heartbeat on this host is at least `min`; returns it.
    pub fn wait_for_heartbeat(&self, d: &Domain, min: u64, timeout: Duration) -> Result<u64> {
        crate::serial::wait_for_heartbeat(&self.outside(&d.serial)?, min, timeout)
            .with_context(|| format!("on host {}: {}", self.hostname, self.qemu_log(&d.name)))
    }

    /// The end of QEMU's log for domain `name` (its stderr and libvirt's notes).
    pub fn qemu_log(&self, name: &str) -> String {
        let p = self.dir.join("log/qemu").join(format!("{name}.log"));
        format!("{}: {}", p.display(), tail(&p, 1500))
    }

    /// The ends of libvirtd's stderr and log, and of every QEMU log: for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let stderr = self.dir.join("libvirtd.stderr");
        let log = self.dir.join("log/libvirtd.log");
        for p in [stderr, log] {
            s.push_str(&format!("\n--- {}:\n{}", p.display(), tail(&p, 3000)));
        }
        if let Ok(rd) = std::fs::read_dir(self.dir.join("log/qemu")) {
            for e in rd.flatten() {
                let p = e.path();
                s.push_str(&format!("\n--- {}:\n{}", p.display(), tail(&p, 1500)));
            }
        }
        s
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        // libvirtd first, so it starts nothing more; then everything left in its UTS
        // namespace (its QEMUs, anything run with `command`). A few rounds: one may fork
        // as it dies. With the last process the mount namespace and its mounts go.
        // Never the test's own namespace (libvirtd may not have unshared yet): that would
        // kill every process on the machine.
        let ns = uts_ns_of(self.daemon.id())
            .and_then(not_ours)
            .or_else(|| self.uts_ns.clone().and_then(not_ours));
        self.daemon.kill();
        let Some(ns) = ns else { return };
        for _ in 0..10 {
            let pids = pids_in_uts(&ns);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A domain running the test guest, as libvirt will be told about it.
#[derive(Debug, Clone)]
pub struct Domain {
    /// The domain's name (also its QEMU log's).
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The versioned machine type (pinned, so both ends build the same machine).
    pub machine: String,
    /// `-kernel`, `-initrd`, `-append`.
    pub image: GuestImage,
    /// A qcow2 image (path as the hosts see it) on virtio (`vda`), if any.
    pub disk: Option<PathBuf>,
    /// The serial console's log (path as the hosts see it).
    pub serial: PathBuf,
}

impl Domain {
    /// The test guest with 128 MiB on `pc-q35-7.2`, its disk `WORK/NAME.qcow2` and its serial
    /// log `WORK/NAME.serial`.
    pub fn test_guest(name: &str, work: &Path, image: GuestImage) -> Domain {
        Domain {
            name: name.to_string(),
            memory_mib: 128,
            machine: "pc-q35-7.2".into(),
            image,
            disk: Some(work.join(format!("{name}.qcow2"))),
            serial: work.join(format!("{name}.serial")),
        }
    }

    /// The domain XML: TCG, one vCPU, no USB, no balloon, no graphics; the serial console
    /// to a file; any end of the guest (power-off, reboot, crash: the guest's kernel runs
    /// with panic=-1) destroys the domain rather than restarting it.
    pub fn xml(&self) -> String {
        let disk = match &self.disk {
            Some(p) => format!(
                "    <disk type='file' device='disk'>\n\
                 \x20     <driver name='qemu' type='qcow2'/>\n\
                 \x20     <source file='{}'/>\n\
                 \x20     <target dev='vda' bus='virtio'/>\n\
                 \x20   </disk>\n",
                esc(&p.to_string_lossy())
            ),
            None => String::new(),
        };
        format!(
            "<domain type='qemu'>\n\
             \x20 <name>{name}</name>\n\
             \x20 <memory unit='MiB'>{mem}</memory>\n\
             \x20 <vcpu>1</vcpu>\n\
             \x20 <os>\n\
             \x20   <type arch='x86_64' machine='{machine}'>hvm</type>\n\
             \x20   <kernel>{kernel}</kernel>\n\
             \x20   <initrd>{initrd}</initrd>\n\
             \x20   <cmdline>{append}</cmdline>\n\
             \x20 </os>\n\
             \x20 <features><acpi/></features>\n\
             \x20 <on_poweroff>destroy</on_poweroff>\n\
             \x20 <on_reboot>destroy</on_reboot>\n\
             \x20 <on_crash>destroy</on_crash>\n\
             \x20 <devices>\n\
             {disk}\
             \x20   <serial type='file'>\n\
             \x20     <source path='{serial}'/>\n\
             \x20     <target port='0'/>\n\
             \x20   </serial>\n\
             \x20   <controller type='usb' model='none'/>\n\
             \x20   <memballoon model='none'/>\n\
             \x20 </devices>\n\
             </domain>\n",
            name = esc(&self.name),
            mem = self.memory_mib,
            machine = esc(&self.machine),
            kernel = esc(&self.image.kernel.to_string_lossy()),
            initrd = esc(&self.image.initrd.to_string_lossy()),
            append = esc(&self.image.append),
            serial = esc(&self.serial.to_string_lossy()),
        )
    }
}

/// A unix socket on one host forwarded to a unix socket on another, through one TCP
/// connection per client between their namespaces, by two `socat`s:
///
/// ```text
///   host from: socat UNIX-LISTEN:listen,fork ──TCP to.ip:port──► host to: socat
///              TCP-LISTEN:port,fork UNIX-CONNECT:connect
/// ```
/// Half-closes pass through (socat shuts down the other side's write on EOF, and waits
/// `-t 60` s rather than its default 0.5 s for the other direction to end). Both socats are
/// killed on drop; the listening socket file is removed then.
#[derive(Debug)]
pub struct UnixBridge {
    /// The socket clients on the `from` host connect to (path as the hosts see it).
    pub listen: PathBuf,
    listen_outside: PathBuf,
    /// The `from` side (listens on the unix socket), killed first on drop.
    from_socat: ChildGuard,
    /// The `to` side (listens on TCP).
    to_socat: ChildGuard,
}

impl UnixBridge {
    /// Forwards `listen` on `from` to `connect` on `to` (both paths as the hosts see them:
    /// in their work directories or private directories) over TCP port `port` on `to`'s
    /// address. Waits (bounded) until both socats listen. The target need not exist yet: each
    /// client's connection is made to it when the client arrives.
    pub fn start(
        from: &LibvirtHost,
        listen: &Path,
        to: &LibvirtHost,
        connect: &Path,
        port: u16,
    ) -> Result<UnixBridge> {
        let listen_outside = from.outside(listen)?;
        let connect_outside = to.outside(connect)?;
        for p in [&listen_outside, &connect_outside] {
            if p.as_os_str().len() > 100 {
                bail!("{} is too long for a unix socket path", p.display());
            }
        }
        let log = |side: &LibvirtHost| -> Result<std::fs::File> {
            let p = side.dir.join(format!("socat-{port}.log"));
            std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))
        };
        let to_socat = ChildGuard::spawn(
            to.host
                .command("socat")
                .args(["-d", "-t", "60"])
                .arg(format!(
                    "TCP-LISTEN:{port},bind={},reuseaddr,fork",
                    to.host.ip
                ))
                .arg(format!("UNIX-CONNECT:{}", connect_outside.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log(to)?),
        )?;
        wait_for_tcp_listener(&to.host, port, Duration::from_secs(10))?;
        let from_socat = ChildGuard::spawn(
            from.host
                .command("socat")
                .args(["-d", "-t", "60"])
                .arg(format!(
                    "UNIX-LISTEN:{},fork,unlink-early,mode=600",
                    listen_outside.display()
                ))
                .arg(format!("TCP:{}:{port}", to.host.ip))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log(from)?),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listen_outside.exists() {
            if Instant::now() > deadline {
                bail!(
                    "socat did not create {} within 10 s",
                    listen_outside.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(UnixBridge {
            listen: listen.to_path_buf(),
            listen_outside,
            from_socat,
            to_socat,
        })
    }
}

impl Drop for UnixBridge {
    fn drop(&mut self) {
        self.from_socat.kill();
        self.to_socat.kill();
        let _ = std::fs::remove_file(&self.listen_outside);
    }
}

/// Where libvirt's QEMU capabilities are kept between hosts and test runs
/// (`<repo>/.cache/libvirt-qemu-caps`, one XML file per QEMU binary).
///
/// A libvirtd with an empty cache spends 4–9 s here probing each QEMU binary (a QEMU per
/// binary, queried over QMP) before it answers; with the files of an earlier probe it answers
/// in 0.5–2 s. libvirt checks every cached file before using it (the QEMU binary's and
/// libvirtd's own change times, libvirt's version, the kernel, the CPU microcode) and probes
/// again when anything differs, so a stale file costs only the time it would have saved.
fn capabilities_cache() -> PathBuf {
    crate::guest::repo_root().join(".cache/libvirt-qemu-caps")
}

/// Copies the kept capabilities into a new host's /var/cache/libvirt (`cache`). Best
/// effort: without them libvirtd only starts slower.
fn seed_capabilities(cache: &Path) {
    let Ok(rd) = std::fs::read_dir(capabilities_cache()) else {
        return;
    };
    let into = cache.join("qemu/capabilities");
    if std::fs::create_dir_all(&into).is_err() {
        return;
    }
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "xml") {
            let _ = std::fs::copy(&p, into.join(e.file_name()));
        }
    }
}

/// Keeps a ready host's capabilities for the next hosts (write to a temporary name, then
/// rename: parallel test processes never see half a file). Best effort.
fn keep_capabilities(cache: &Path) {
    let Ok(rd) = std::fs::read_dir(cache.join("qemu/capabilities")) else {
        return;
    };
    let keep = capabilities_cache();
    if std::fs::create_dir_all(&keep).is_err() {
        return;
    }
    for e in rd.flatten() {
        let (p, name) = (e.path(), e.file_name());
        let Ok(new) = std::fs::read(&p) else { continue };
        if std::fs::read(keep.join(&name)).is_ok_and(|old| old == new) {
            continue;
        }
        let tmp = keep.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        if std::fs::write(&tmp, &new).is_ok() && std::fs::rename(&tmp, keep.join(&name)).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Runs `cmd` to completion within `timeout`, collecting its output; kills it and fails
/// when it takes longer.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let program = format!("{:?}", cmd.get_program());
    let mut child = ChildGuard::spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    // The pipes are drained on threads, so a chatty child never blocks on a full pipe.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .child_mut()
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .child_mut()
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            // Killing the child closes its pipes, so the drain threads end.
            child.kill();
            let _ = out.join();
            let stderr = err.join().unwrap_or_default();
            bail!(
                "{program} did not finish within {timeout:?}: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out
        .join()
        .map_err(|_| anyhow!("reading {program}'s stdout panicked"))?;
    let stderr = err
        .join()
        .map_err(|_| anyhow!("reading {program}'s stderr panicked"))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Waits until something in `host` listens on TCP `port` (read from the namespace's
/// /proc/thread-self/net/tcp, so no probing connection reaches the listener).
fn wait_for_tcp_listener(host: &Host, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let listening = host.run(|| {
            std::fs::read_to_string("/proc/thread-self/net/tcp")
                .map(|t| tcp_listens(&t, port))
                .unwrap_or(false)
        })?;
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on TCP port {port} in {} after {timeout:?}",
                host.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether /proc/net/tcp's `table` has a socket in state LISTEN (0A) on local `port`.
fn tcp_listens(table: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        local.rsplit(':').next() == Some(want.as_str()) && state == "0A"
    })
}

/// The UTS namespace of process `pid` (`uts:[inode]`), if it exists.
fn uts_ns_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/uts"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// `ns`, unless it is the UTS namespace this test process runs in.
fn not_ours(ns: String) -> Option<String> {
    match uts_ns_of(std::process::id()) {
        Some(own) if own != ns => Some(ns),
        _ => None,
    }
}

/// Every process in UTS namespace `ns`.
fn pids_in_uts(ns: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|&p| u32::try_from(p).ok().and_then(uts_ns_of).as_deref() == Some(ns))
        .collect()
}

/// A random version-4 UUID (from the standard library's per-process random hash keys).
fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Escapes text for an XML attribute or element.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// The last `n` characters of a file, or a note that it cannot be read.
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(data) => {
            let text = String::from_utf8_lossy(&data);
            let skip = text.chars().count().saturating_sub(n);
            text.chars().skip(skip).collect()
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4_and_differ() {
        let (a, b) = (random_uuid(), random_uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn finds_a_listener_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                     \x20  0: 0202E70A:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
                     \x20  1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(tcp_listens(table, 8001));
        assert!(
            !tcp_listens(table, 80),
            "an established socket is no listener"
        );
        assert!(!tcp_listens(table, 8002));
    }

    #[test]
    fn domain_xml_escapes_and_pins_the_machine() {
        let image = GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0 a<b".into(),
        };
        let d = Domain::test_guest("vm", Path::new("/w"), image);
        let x = d.xml();
        assert!(x.contains("machine='pc-q35-7.2'"));
        assert!(x.contains("<cmdline>console=ttyS0 a&lt;b</cmdline>"));
        assert!(x.contains("<source file='/w/vm.qcow2'/>"));
        assert!(x.contains("<on_crash>destroy</on_crash>"));
    }
}
