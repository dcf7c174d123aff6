//! Two libvirt test hosts with a vmferry daemon each, the daemon inside its host's
//! namespaces (network, mount, UTS: `LibvirtHost::command`), so that the migration
//! directory DIR (`WORK/mig`) names the same directory for the daemon and for that host's
//! libvirtd and QEMUs — and a different one on each host, at the same path:
//!
//! ```text
//!   host A (netns, mount ns, uts ns)          host B (same, its own)
//!   libvirtd  /run/libvirt/libvirt-sock       libvirtd  /run/libvirt/libvirt-sock
//!   vmferry serve  IP_A:4700  ◄── TLS, the only TCP between hosts ──►  vmferry serve  IP_B:4700
//!     DIR/ID/{libvirt,migrate,nbd}.sock         connects to libvirt-sock, DIR/ID/migrate.sock,
//!     (listens: A's libvirtd and QEMU dial in)  DIR/ID/nbd.sock (B's QEMU listens there)
//! ```
//! The controller (`vmferry migrate --libvirt`) runs here, outside both hosts, and reaches
//! each daemon over its unix control socket (in the test's directory, which every mount
//! namespace sees). [`NetWatch`] samples both hosts' TCP sockets while a migration runs:
//! libvirt's own ports must never be opened, and every connection between the hosts must be
//! to vmferry's port.
//!
//! Drop order is the reverse of what was started: the daemons, then the libvirtds (with
//! their QEMUs and namespaces), then the netns hosts, then the directory.

use super::*;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmferry_testkit::guest::guest_image;
use vmferry_testkit::libvirt::{output_within, Domain, LibvirtHost, START_TIMEOUT};
use vmferry_testkit::netns::{Host, TwoHosts};
use vmferry_testkit::require;

/// Each daemon's control port, the only TCP port the hosts may use between them.
pub const PORT: u16 = 4700;
/// The guest's disk (MiB) and its first line (the guest prints it at boot).
pub const DISK_MIB: u64 = 16;
pub const DISK_LINE: &str = "vmferry-libvirt-disk";
/// How long one `vmferry migrate` may take before the test kills it.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct LvSetup {
    // Dropped in this order (declaration order): daemons, libvirtds, netns, files.
    pub da: DaemonProc,
    pub db: DaemonProc,
    pub a: LibvirtHost,
    pub b: LibvirtHost,
    pub hosts: TwoHosts,
    pub tmp: tempfile::TempDir,
    /// The migration directory (`--libvirt-migrations-dir`) as both hosts see it.
    pub migrations: PathBuf,
    /// Each daemon's flags, for restarts.
    pub daemon_flags: Vec<String>,
    /// The user the hosts' QEMUs run as, if not root.
    pub qemu_user: Option<String>,
}

impl LvSetup {
    /// Two netns hosts, a libvirtd in each (started at once), a vmferry daemon in each
    /// host's namespaces on IP:4700.
    pub fn new(tag: &str) -> Result<LvSetup> {
        Self::new_as(tag, None)
    }

    /// [`LvSetup::new`]; with `qemu_user`, both libvirtds run their QEMUs as that user
    /// (and its group, which both daemons are given as `--libvirt-qemu-group`).
    pub fn new_as(tag: &str, qemu_user: Option<&str>) -> Result<LvSetup> {
        require::libvirt();
        let tmp = tempfile::tempdir()?;
        if qemu_user.is_some() {
            // A temporary directory is root's alone (0700): QEMU must reach the work path.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let hosts = TwoHosts::new(tag)?;
        let work = tmp.path().join("work");
        // libvirtd probes QEMU for seconds: make the certificates meanwhile.
        let mut a = LibvirtHost::spawn_as(&hosts.a, &tmp.path().join("a"), &work, qemu_user)?;
        let mut b = LibvirtHost::spawn_as(&hosts.b, &tmp.path().join("b"), &work, qemu_user)?;
        let pki = Pki::new(tmp.path())?;
        let a_certs = pki.issue("hosta", Some(&hosts.a.ip.to_string()))?;
        let b_certs = pki.issue("hostb", Some(&hosts.b.ip.to_string()))?;
        a.wait_ready(START_TIMEOUT)?;
        b.wait_ready(START_TIMEOUT)?;
        let migrations = work.join("mig");
        let mut daemon_flags = daemon_flags(&migrations);
        if let Some(user) = qemu_user {
            daemon_flags.extend(["--libvirt-qemu-group".to_string(), user.to_string()]);
        }
        let flags: Vec<&str> = daemon_flags.iter().map(String::as_str).collect();
        let da = DaemonProc::start_with(
            &|bin| a.command(bin),
            &format!("{}:{PORT}", hosts.a.ip),
            &tmp.path().join("da"),
            &a_certs,
            &flags,
        )
        .with_context(|| format!("vmferry daemon in host A: {}", a.diagnostics()))?;
        let db = DaemonProc::start_with(
            &|bin| b.command(bin),
            &format!("{}:{PORT}", hosts.b.ip),
            &tmp.path().join("db"),
            &b_certs,
            &flags,
        )
        .with_context(|| format!("vmferry daemon in host B: {}", b.diagnostics()))?;
        for (d, h) in [(&da, &a), (&db, &b)] {
            same_namespaces(d.child.id(), h.pid())
                .with_context(|| format!("the daemon in host {}", h.hostname))?;
            let o = output_within(
                vmferry()
                    .args(["status", "--daemon"])
                    .arg(d.state_dir.join("control.sock")),
                Duration::from_secs(15),
            )?;
            ensure!(
                o.status.success(),
                "the daemon in host {} does not answer: {}",
                h.hostname,
                text(&o)
            );
        }
        Ok(LvSetup {
            da,
            db,
            a,
            b,
            hosts,
            tmp,
            migrations,
            daemon_flags,
            qemu_user: qemu_user.map(str::to_string),
        })
    }

    /// The test guest as domain `name` on A with a local qcow2 disk (`WORK/NAME.qcow2`,
    /// starting with [`DISK_LINE`]), `memory_mib` of RAM and `append` added to its kernel
    /// command line; started, and beating. B gets nothing: its daemon must create the
    /// disk image. Returns the domain and the heartbeat seen.
    pub fn boot_guest(&self, name: &str, memory_mib: u64, append: &str) -> Result<(Domain, u64)> {
        let mut dom = Domain::migrating_guest(name, &self.a.work, guest_image()?);
        dom.memory_mib = memory_mib;
        if self.qemu_user.is_some() {
            // QEMU, not root, opens the kernel and initrd, and libvirt gives them to QEMU's
            // user while the domain runs: each host gets its own copies in its work path
            // (the same path on both), never the shared ones in the repository's cache.
            for file in [&mut dom.image.kernel, &mut dom.image.initrd] {
                let name = file.file_name().context("guest image file name")?;
                let inside = self.a.work.join(name);
                for h in [&self.a, &self.b] {
                    std::fs::copy(&*file, h.outside(&inside)?)
                        .with_context(|| format!("copy {} into {}", file.display(), h.hostname))?;
                }
                *file = inside;
            }
        }
        if !append.is_empty() {
            dom.image.append = format!("{} {append}", dom.image.append);
        }
        let disk = dom.disk.clone().context("the test guest has a disk")?;
        self.a.create_disk(&disk, DISK_MIB, Some(DISK_LINE))?;
        self.a.start_domain(&dom)?;
        let beat = self
            .a
            .wait_for_heartbeat(&dom, 3, Duration::from_secs(90))?;
        Ok((dom, beat))
    }

    /// `vmferry migrate --libvirt NAME --from FROM --to TO ARGS` run here, through the
    /// daemons' unix control sockets; killed after [`MIGRATE_TIMEOUT`].
    pub fn migrate(
        &self,
        from: &DaemonProc,
        to: &DaemonProc,
        name: &str,
        args: &[&str],
    ) -> Result<Output> {
        self.migrate_within(from, to, name, args, MIGRATE_TIMEOUT)
    }

    /// [`LvSetup::migrate`], killed after `timeout`.
    pub fn migrate_within(
        &self,
        from: &DaemonProc,
        to: &DaemonProc,
        name: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let mut c = vmferry();
        c.args(["migrate", "--libvirt", name, "--from"])
            .arg(from.state_dir.join("control.sock"))
            .arg("--to")
            .arg(to.state_dir.join("control.sock"))
            .args(args);
        output_within(&mut c, timeout)
    }

    /// Restarts B's daemon in B's namespaces (same state dir and flags).
    pub fn restart_b_daemon(&mut self) -> Result<()> {
        let b = &self.b;
        self.db.restart_with(&|bin| b.command(bin))
    }

    /// The entries of `host`'s migration directory (the daemons' DIR/ID directories):
    /// empty, or missing, when no migration runs.
    pub fn migration_dirs(&self, host: &LibvirtHost) -> Result<Vec<String>> {
        let dir = host.outside(&self.migrations)?;
        match std::fs::read_dir(&dir) {
            Ok(rd) => Ok(rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("read {}", dir.display())),
        }
    }

    /// Waits (up to `timeout`) until `host`'s migration directory is empty.
    pub fn wait_no_migration_dirs(&self, host: &LibvirtHost, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.migration_dirs(host)?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} still holds {left:?} after {timeout:?}",
                    host.outside(&self.migrations)?.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Both daemons' logs, both hosts' libvirt logs and the ends of the guests' consoles
    /// on both hosts (a domain that died says why there): for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "=== vmferry daemon A ({}):\n{}\n=== vmferry daemon B ({}):\n{}\n=== libvirt host A:{}\n=== libvirt host B:{}\n=== consoles:{}",
            self.da.log.display(),
            self.da.log_text(),
            self.db.log.display(),
            self.db.log_text(),
            self.a.diagnostics(),
            self.b.diagnostics(),
            consoles(&[&self.a, &self.b])
        )
    }
}

/// The last 1500 characters of every `*.serial` file in each host's work directory, and
/// the guest kernel's failure report from its start if there is one.
fn consoles(hosts: &[&LibvirtHost]) -> String {
    let mut out = String::new();
    for h in hosts {
        let Ok(rd) = std::fs::read_dir(h.dir.join("work")) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "serial") {
                let end = vmferry_testkit::serial::tail(&p, 1500);
                out.push_str(&format!("\n--- {} on {}:\n{end}", p.display(), h.hostname));
                if let Some(report) = vmferry_testkit::serial::kernel_failure(&p) {
                    out.push_str(&format!(
                        "\n--- its kernel failure, from the start:\n{report}"
                    ));
                }
            }
        }
    }
    out
}

/// The daemons' flags: libvirt's URI as a process inside the host reaches it (the default,
/// said explicitly), and DIR, under the hosts' private work path.
fn daemon_flags(migrations: &Path) -> Vec<String> {
    vec![
        "--libvirt-uri".into(),
        LibvirtHost::URI_INSIDE.into(),
        "--libvirt-migrations-dir".into(),
        migrations.display().to_string(),
    ]
}

/// Checks that process `pid` runs in the network, mount and UTS namespaces of `libvirtd`.
fn same_namespaces(pid: u32, libvirtd: u32) -> Result<()> {
    for ns in ["net", "mnt", "uts"] {
        let of = |p: u32| {
            std::fs::read_link(format!("/proc/{p}/ns/{ns}"))
                .with_context(|| format!("namespace {ns} of pid {p}"))
        };
        let (mine, theirs) = (of(pid)?, of(libvirtd)?);
        ensure!(
            mine == theirs,
            "{ns} namespace {} is not libvirtd's {}",
            mine.display(),
            theirs.display()
        );
    }
    Ok(())
}

/// Waits until `f` returns `Some`, polling every 100 ms, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One TCP socket as `ss -Htanp` shows it.
#[derive(Debug, Clone)]
pub struct TcpSocket {
    pub host: String,
    pub state: String,
    pub local: String,
    pub peer: String,
    pub line: String,
}

impl TcpSocket {
    fn port(addr: &str) -> Option<u16> {
        addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
    }
    pub fn local_port(&self) -> Option<u16> {
        Self::port(&self.local)
    }
    pub fn peer_port(&self) -> Option<u16> {
        Self::port(&self.peer)
    }
    /// Whether both ends are on the hosts' link (not loopback, not a listener's wildcard).
    pub fn between_hosts(&self) -> bool {
        let on_link = |a: &str| a.starts_with("10.231.") || a.starts_with("[::ffff:10.231.");
        on_link(&self.local) && on_link(&self.peer)
    }
}

/// The TCP sockets in `host`'s network namespace (`ss -Htanp`).
pub fn tcp_sockets(host: &Host) -> Result<Vec<TcpSocket>> {
    let o = output_within(host.command("ss").arg("-Htanp"), Duration::from_secs(10))?;
    ensure!(
        o.status.success(),
        "ss in {}: {}",
        host.name,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5).then(|| TcpSocket {
                host: host.name.clone(),
                state: f[0].to_string(),
                local: f[3].to_string(),
                peer: f[4].to_string(),
                line: l.to_string(),
            })
        })
        .collect())
}

/// What about `s` breaks "libvirt's daemons never talk to each other, and only vmferry's
/// port carries anything between the hosts", if anything.
pub fn violation(s: &TcpSocket) -> Option<String> {
    let libvirt_port = |p: u16| p == 16509 || p == 16514 || (49152..=49215).contains(&p);
    if s.state == "LISTEN" && s.local_port().is_some_and(libvirt_port) {
        return Some(format!("a listener on libvirt's ports: {}", s.line));
    }
    if s.state != "LISTEN"
        && s.between_hosts()
        && s.local_port() != Some(PORT)
        && s.peer_port() != Some(PORT)
    {
        return Some(format!(
            "a connection between the hosts not to vmferry's port {PORT}: {}",
            s.line
        ));
    }
    None
}

/// Samples both hosts' TCP sockets every 100 ms on a thread until stopped.
pub struct NetWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<NetReport>>>,
}

#[derive(Debug, Default)]
pub struct NetReport {
    pub samples: u32,
    /// Samples in which a connection between the hosts on vmferry's port was open.
    pub vmferry_seen: u32,
    pub violations: Vec<String>,
}

impl NetWatch {
    pub fn start(hosts: &TwoHosts) -> NetWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = (hosts.a.clone(), hosts.b.clone());
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut r = NetReport::default();
            // One sample more after the stop: what the migration left behind.
            let mut last = false;
            while !last {
                last = flag.load(Ordering::SeqCst);
                let mut seen = false;
                for h in [&a, &b] {
                    for s in tcp_sockets(h)? {
                        seen |= s.state == "ESTAB"
                            && s.between_hosts()
                            && (s.local_port() == Some(PORT) || s.peer_port() == Some(PORT));
                        if let Some(v) = violation(&s) {
                            if !r.violations.contains(&v) {
                                r.violations.push(v);
                            }
                        }
                    }
                }
                r.samples += 1;
                r.vmferry_seen += u32::from(seen);
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(r)
        });
        NetWatch {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Result<NetReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .context("stopped twice")?
            .join()
            .map_err(|_| anyhow!("the socket watcher panicked"))?
    }
}

impl Drop for NetWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) -> Result<()> {
    let pid = i32::try_from(pid).context("pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .context("kill -9")
}
