//! Shared pieces of the end-to-end tests: the vmferry binary, certificates, daemons.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vmferry_testkit::netns::Host;

pub mod disks;
pub mod libvirt_setup;
pub mod live;

pub const BIN: &str = env!("CARGO_BIN_EXE_vmferry");

pub fn vmferry() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("VMFERRY_DAEMON").env_remove("VMFERRY_CERTS");
    c
}

/// Runs a command and returns its output, failing the test with stderr on spawn errors.
pub fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null());
    match c.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {c:?}: {e}"),
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A CA and one certs dir per host name (cert for the name and `ip`), plus one for the
/// controller, all made with `vmferry certs`.
pub struct Pki {
    pub root: PathBuf,
}

impl Pki {
    pub fn new(root: &Path) -> Result<Pki> {
        let ca = root.join("ca");
        let o = run({
            let mut c = vmferry();
            c.args(["certs", "init", "--dir"]).arg(&ca);
            c
        });
        if !o.status.success() {
            bail!("certs init failed: {}", text(&o));
        }
        Ok(Pki {
            root: root.to_path_buf(),
        })
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// Issues a certificate for `host` (+ IP SAN) into its own dir and returns the dir.
    pub fn issue(&self, host: &str, ip: Option<&str>) -> Result<PathBuf> {
        let out = self.root.join(host);
        let mut c = vmferry();
        c.args(["certs", "issue", "--dir"])
            .arg(self.ca_dir())
            .args(["--host", host, "--out"])
            .arg(&out);
        if let Some(ip) = ip {
            c.args(["--ip", ip]);
        }
        let o = run(c);
        if !o.status.success() {
            bail!("certs issue failed: {}", text(&o));
        }
        Ok(out)
    }
}

/// A `vmferry serve` process, killed (with the VMs it started) on drop.
pub struct DaemonProc {
    pub child: Child,
    pub addr: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    certs: PathBuf,
    extra: Vec<String>,
}

/// Makes the command that a daemon's command line starts with: `vmferry` itself, or a
/// wrapper that runs it somewhere (`ip netns exec HOST vmferry`, `nsenter ... vmferry`).
/// The wrapper must exec the program, so that the child's pid is the daemon's.
pub type Launcher<'a> = &'a dyn Fn(&str) -> Command;

/// How to run `vmferry` inside `host`'s network namespace, or here without one.
fn launcher_for(host: Option<&Host>) -> impl Fn(&str) -> Command + '_ {
    move |bin| match host {
        Some(h) => h.command(bin),
        None => Command::new(bin),
    }
}

impl DaemonProc {
    /// Starts a daemon (inside `host`'s namespace if given) and waits until its port
    /// accepts connections.
    pub fn start(
        host: Option<&Host>,
        addr: &str,
        state_dir: &Path,
        certs: &Path,
        extra: &[&str],
    ) -> Result<DaemonProc> {
        Self::start_with(&launcher_for(host), addr, state_dir, certs, extra)
    }

    /// Starts a daemon through `launch` (e.g. in a libvirt test host's namespaces:
    /// `&|bin| libvirt_host.command(bin)`) and waits until its port accepts connections.
    pub fn start_with(
        launch: Launcher,
        addr: &str,
        state_dir: &Path,
        certs: &Path,
        extra: &[&str],
    ) -> Result<DaemonProc> {
        std::fs::create_dir_all(state_dir)?;
        let log = state_dir.with_extension("log");
        let child = Self::spawn(launch, addr, state_dir, certs, extra, &log)?;
        let mut d = DaemonProc {
            child,
            addr: addr.to_string(),
            state_dir: state_dir.to_path_buf(),
            log,
            certs: certs.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.wait_ready()?;
        Ok(d)
    }

    /// Starts the daemon again after it was killed, on the same state dir and flags; the
    /// QEMUs it had started are left alone (they outlive it by design).
    pub fn restart(&mut self, host: Option<&Host>) -> Result<()> {
        self.restart_with(&launcher_for(host))
    }

    /// [`DaemonProc::restart`] through `launch` (see [`DaemonProc::start_with`]).
    pub fn restart_with(&mut self, launch: Launcher) -> Result<()> {
        self.kill();
        let _ = std::fs::remove_file(self.state_dir.join("control.sock"));
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::spawn(
            launch,
            &self.addr,
            &self.state_dir,
            &self.certs,
            &extra,
            &self.log.with_extension("restarted.log"),
        )?;
        self.log = self.log.with_extension("restarted.log");
        self.wait_ready()
    }

    fn spawn(
        launch: Launcher,
        addr: &str,
        state_dir: &Path,
        certs: &Path,
        extra: &[&str],
        log: &Path,
    ) -> Result<Child> {
        let logf = std::fs::File::create(log)?;
        let mut c = launch(BIN);
        c.args(["serve", "--listen", addr, "--state-dir"])
            .arg(state_dir)
            .arg("--certs")
            .arg(certs);
        // The guests a daemon starts keep running while they migrate: not on 7.2's TCG
        // (see require::guest_qemu), unless the test chose its QEMU itself.
        if !extra.iter().any(|a| *a == "--qemu" || *a == "--config") {
            c.arg("--qemu").arg(vmferry_testkit::require::guest_qemu());
        }
        c.args(extra)
            .env("VMFERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        c.spawn().context("spawn vmferry serve")
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.state_dir.join("control.sock").exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("daemon exited ({st}): {}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("daemon did not start: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill();
        // QEMUs the daemon started outlive it by design; tests must not leak them.
        kill_qemus_under(&self.state_dir);
    }
}

/// The QEMUs whose command line mentions `dir` (the VMs of one test daemon): processes
/// whose program is a qemu-system binary, not the daemon itself, whose own command line
/// names its QEMU (`--qemu .../qemu-system-x86_64`) and its state directory.
pub fn qemu_pids_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let program = raw.split(|&b| b == 0).next().unwrap_or_default();
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            (String::from_utf8_lossy(program).contains("qemu-system") && cmd.contains(&needle))
                .then_some(pid)
        })
        .collect()
}

/// Kills every QEMU whose command line mentions `dir` (the VMs of one test daemon).
pub fn kill_qemus_under(dir: &Path) {
    for pid in qemu_pids_under(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie is not alive.
    !stat
        .rsplit(')')
        .next()
        .map(|s| s.trim_start().starts_with('Z'))
        .unwrap_or(false)
}
