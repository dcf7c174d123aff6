//! The libvirtd of one test host: started in its own mount and UTS namespaces inside a
//! netns host, driven with `virsh`, killed with everything it started on drop.

use super::caps::{keep_capabilities, seed_capabilities};
use super::run::output_within;
use super::{Domain, START_TIMEOUT, VIRSH_TIMEOUT};
use crate::netns::Host;
use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The directories each host gets privately: (path inside, directory under the host's dir).
const PRIVATE: [(&str, &str); 5] = [
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/var/cache/libvirt", "cache"),
    ("/var/log/libvirt", "log"),
    ("/etc/libvirt", "etc"),
];

/// qemu.conf for a test host whose QEMUs run as root. Each line is needed here:
/// - `stdio_handler = "file"`: QEMU's stdout/stderr go straight to /var/log/libvirt/qemu/
///   NAME.log; the default ("logd") needs a virtlogd, which nobody runs here.
/// - `cgroup_controllers = [ ]`: no cgroups (the machine's are not ours to change, and a
///   container may not delegate them).
/// - `user`/`group = "root"`, `security_driver = "none"`, `dynamic_ownership = 0`,
///   `remember_owner = 0`: QEMU runs as root and libvirt neither relabels nor chowns the
///   test's files (no SELinux/AppArmor profile, no xattrs left on images).
pub const QEMU_CONF: &str = r#"# vmferry test host (vmferry-testkit libvirt/host.rs); see docs/libvirt.md
stdio_handler = "file"
cgroup_controllers = [ ]
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
"#;

/// qemu.conf for a test host whose QEMUs run as `user` (and that user's group), as a
/// distribution's libvirt runs them: `dynamic_ownership = 1`, so libvirt gives each
/// domain's disk images, kernel and initrd to that user while the domain runs (and back to
/// root after). `remember_owner = 0`: no xattrs left on the files. Still no security
/// driver: this kernel has neither SELinux nor AppArmor (docs/libvirt.md).
pub fn qemu_conf_as(user: &str) -> String {
    format!(
        "# vmferry test host, QEMU as {user} (vmferry-testkit libvirt/host.rs); see docs/libvirt.md\n\
         stdio_handler = \"file\"\n\
         cgroup_controllers = [ ]\n\
         user = \"{user}\"\n\
         group = \"{user}\"\n\
         security_driver = \"none\"\n\
         dynamic_ownership = 1\n\
         remember_owner = 0\n"
    )
}

/// The script that `unshare` runs in the host's new mount and UTS namespaces before it
/// becomes libvirtd. Arguments: $1 host name, $2 the host's directory, $3 the work path,
/// $4 empty, or the group that may open /dev/kvm (hosts whose QEMUs are not root's).
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
# QEMU as a user of its own: a distribution's /dev/kvm is root:kvm 0660, this machine's is
# root's alone. libvirt's probe then finds KVM (QEMU opens it before it drops root) but not
# for QEMU's user, and calls its capabilities stale at every request: each `virsh` call
# waits seconds for a new probe. The host gets a private node, as a distribution has it.
if [ -n "$4" ] && [ -c /dev/kvm ]; then
    mkdir -p "$d/dev"
    mount -t tmpfs -o mode=0755,size=64k vmferry-dev "$d/dev"
    set -- $(stat -c '%t %T' /dev/kvm) "$4"
    mknod -m 0660 "$d/dev/kvm" c "0x$1" "0x$2"
    chgrp "$3" "$d/dev/kvm"
    mount --bind "$d/dev/kvm" /dev/kvm
fi
for hide in /run/systemd /run/dbus; do
    if [ -d "$hide" ]; then mount -t tmpfs -o mode=0755,size=64k vmferry-hidden "$hide"; fi
done
# Its pid file would be /run/libvirtd.pid, outside the private directories: shared by
# the hosts (the second fails to lock it) and the system's own libvirtd.
exec libvirtd --pid-file /run/libvirt/libvirtd.pid
"#;

/// The group that may open /dev/kvm on a host whose QEMUs are not root's (Debian's).
const KVM_GROUP: &str = "kvm";

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
    /// The user its QEMUs run as, if not root.
    qemu_user: Option<String>,
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
        Self::spawn_as(host, dir, work, None)
    }

    /// [`LibvirtHost::spawn`]; with `qemu_user`, libvirt runs its QEMUs as that user
    /// ([`qemu_conf_as`]) rather than as root.
    pub fn spawn_as(
        host: &Host,
        dir: &Path,
        work: &Path,
        qemu_user: Option<&str>,
    ) -> Result<LibvirtHost> {
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
            "# vmferry test host {hostname} (vmferry-testkit libvirt/host.rs); see docs/libvirt.md\n\
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
        match qemu_user {
            None => write(&dir.join("etc/qemu.conf"), QEMU_CONF)?,
            Some(user) => write(&dir.join("etc/qemu.conf"), &qemu_conf_as(user))?,
        }
        seed_capabilities(&dir.join("cache"), qemu_user);
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
            .arg(if qemu_user.is_some() { KVM_GROUP } else { "" })
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
            qemu_user: qemu_user.map(str::to_string),
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
        keep_capabilities(&self.dir.join("cache"), self.qemu_user.as_deref());
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

    /// The URI of this libvirtd for a process inside the host ([`LibvirtHost::command`]):
    /// the default one, as /run/libvirt is the host's own there.
    pub const URI_INSIDE: &'static str = "qemu:///system";

    /// libvirtd's socket as the host sees it (outside: `DIR/run/libvirt-sock`).
    pub const SOCKET_INSIDE: &'static str = "/run/libvirt/libvirt-sock";

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

    /// Makes a qcow2 overlay at `inside` on the image `backing` (both paths as the host
    /// sees them; the overlay names its backing file by that path).
    pub fn create_overlay(&self, inside: &Path, backing: &Path) -> Result<()> {
        let o = output_within(
            self.command("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(backing)
                .arg(inside),
            Duration::from_secs(30),
        )?;
        if !o.status.success() {
            bail!(
                "qemu-img create {} on {} failed: {}",
                inside.display(),
                backing.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    }

    /// Defines `d` (persistently) without starting it.
    pub fn define_domain(&self, d: &Domain) -> Result<()> {
        let xml = self.dir.join(format!("{}.xml", d.name));
        write(&xml, &d.xml())?;
        let path = xml.to_string_lossy();
        self.virsh(&["define", &path], VIRSH_TIMEOUT)?;
        Ok(())
    }

    /// Defines `d` (persistently) and starts it. Its disk, if any, must exist.
    pub fn start_domain(&self, d: &Domain) -> Result<()> {
        self.define_domain(d)?;
        self.virsh(&["start", &d.name], VIRSH_TIMEOUT)
            .with_context(|| format!("QEMU's log: {}", self.qemu_log(&d.name)))?;
        Ok(())
    }

    /// The contents of the qcow2 image at `inside` (a path as the host sees it), as raw
    /// bytes; readable while a QEMU has the image open (`qemu-img convert -U`), but then
    /// only what has reached the file.
    pub fn read_disk(&self, inside: &Path) -> Result<Vec<u8>> {
        // Run inside the host: an overlay names its backing file by the host's path.
        let img = self.outside(inside)?;
        let raw_inside = inside.with_extension("read.raw");
        let raw = self.outside(&raw_inside)?;
        let o = output_within(
            self.command("qemu-img")
                .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
                .arg(inside)
                .arg(&raw_inside),
            Duration::from_secs(30),
        );
        let data = match o {
            Ok(o) if o.status.success() => {
                std::fs::read(&raw).with_context(|| format!("read {}", raw.display()))
            }
            Ok(o) => Err(anyhow::anyhow!(
                "qemu-img convert {} failed: {}",
                img.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&raw);
        data
    }

    /// The pid of the QEMU that runs domain `name` here, if libvirt runs it (from
    /// /run/libvirt/qemu/NAME.pid, which libvirt removes when the domain stops).
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        let p = self.dir.join("run/qemu").join(format!("{name}.pid"));
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
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
        s.push_str(&self.jobs());
        s
    }

    /// What libvirt and QEMU say about every running domain's jobs: `domjobinfo`, and
    /// QEMU's own `query-migrate` and `query-block-jobs` (a stalled disk mirror keeps a
    /// migration from ever moving memory). Each question has a short timeout: this runs
    /// when something already went wrong, and libvirtd may be the thing that hangs.
    fn jobs(&self) -> String {
        let t = Duration::from_secs(5);
        let Ok(names) = self.virsh(&["list", "--name"], t) else {
            return format!("\n--- {}: virsh list did not answer", self.hostname);
        };
        let mut s = String::new();
        for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
            let mut ask = |what: &str, args: &[&str]| {
                let answer = self.virsh(args, t).unwrap_or_else(|e| format!("{e:#}"));
                s.push_str(&format!(
                    "\n--- {what} of {name} on {}:\n{}",
                    self.hostname,
                    answer.trim()
                ));
            };
            ask("domjobinfo", &["domjobinfo", name]);
            for q in ["query-migrate", "query-block-jobs"] {
                let cmd = format!("{{\"execute\":\"{q}\"}}");
                ask(q, &["qemu-monitor-command", name, &cmd]);
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
}
