//! QEMU processes started directly by a test (attach mode: QEMU is not the daemon's), killed
//! on drop.
//!
//! The machine is minimal and the same on both sides of a migration: `-machine q35`,
//! `-nodefaults -no-user-config -display none`, the serial console to a file and QMP on a
//! unix socket. QEMU's own stderr goes to `<serial>.stderr`, and start-up errors quote it.

use crate::netns::Host;
use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How to start one QEMU; [`QemuOpts::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct QemuOpts {
    /// The program (default `qemu-system-x86_64`).
    pub binary: String,
    /// The accelerator (default `tcg`: this machine's KVM cannot run a booting guest).
    pub accel: String,
    /// The machine type (default `q35`).
    pub machine: String,
    /// Guest RAM in MiB (default 128).
    pub memory_mib: u64,
    /// Back guest RAM with this file (`memory-backend-file`, share=on), so the test can
    /// read and write it; put it on /dev/shm.
    pub mem_file: Option<PathBuf>,
    /// Preallocate the backing file (`prealloc=on`); only with `mem_file`.
    pub prealloc: bool,
    /// `-kernel`, `-initrd`, `-append` (see [`crate::guest::GuestImage`]).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Start with the CPUs stopped (`-S`).
    pub paused: bool,
    /// The `-incoming` argument: `"defer"` or a URI such as `tcp:10.231.5.2:4444`.
    pub incoming: Option<String>,
    /// Run inside this host's network namespace.
    pub netns: Option<Host>,
    /// Where QMP listens (a unix socket path).
    pub qmp: PathBuf,
    /// Where the serial console (ttyS0) is written.
    pub serial: PathBuf,
    /// More arguments, appended as given (e.g. `-device ...`).
    pub extra_args: Vec<String>,
}

impl QemuOpts {
    /// Defaults: qemu-system-x86_64, TCG, 128 MiB, no guest, running, not incoming, no
    /// namespace.
    pub fn new(qmp: PathBuf, serial: PathBuf) -> Self {
        QemuOpts {
            binary: "qemu-system-x86_64".into(),
            accel: "tcg".into(),
            machine: "q35".into(),
            memory_mib: 128,
            mem_file: None,
            prealloc: false,
            kernel: None,
            initrd: None,
            append: None,
            paused: false,
            incoming: None,
            netns: None,
            qmp,
            serial,
            extra_args: Vec::new(),
        }
    }

    /// The command line arguments (without the program).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut machine = format!("{},accel={}", self.machine, self.accel);
        if let Some(f) = &self.mem_file {
            machine.push_str(",memory-backend=ram0");
            a.push("-object".into());
            a.push(format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share=on{}",
                self.memory_mib,
                f.display(),
                if self.prealloc { ",prealloc=on" } else { "" }
            ));
        }
        a.extend(["-machine".into(), machine]);
        a.extend(["-m".into(), format!("{}M", self.memory_mib)]);
        for s in ["-nodefaults", "-no-user-config", "-display", "none"] {
            a.push(s.into());
        }
        a.extend(["-serial".into(), format!("file:{}", self.serial.display())]);
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp.display()),
        ]);
        if let Some(k) = &self.kernel {
            a.extend(["-kernel".into(), k.display().to_string()]);
        }
        if let Some(i) = &self.initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        if let Some(s) = &self.append {
            a.extend(["-append".into(), s.clone()]);
        }
        if self.paused {
            a.push("-S".into());
        }
        if let Some(i) = &self.incoming {
            a.extend(["-incoming".into(), i.clone()]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running QEMU, killed (SIGKILL) and reaped on drop; its QMP socket file is removed then.
#[derive(Debug)]
pub struct QemuProcess {
    guard: ChildGuard,
    /// The QMP socket (exists once `start_qemu` returns).
    pub qmp: PathBuf,
    /// The serial console log.
    pub serial: PathBuf,
    /// QEMU's stderr.
    pub stderr: PathBuf,
}

impl QemuProcess {
    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// QEMU's exit status if it has exited (e.g. after `quit`), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.guard.try_wait()
    }

    /// What QEMU wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.guard.kill();
        let _ = std::fs::remove_file(&self.qmp);
    }
}

/// Starts QEMU and waits (bounded: 30 s) until its QMP socket exists.
pub fn start_qemu(o: &QemuOpts) -> Result<QemuProcess> {
    let mut c = match &o.netns {
        Some(h) => h.command(&o.binary),
        None => Command::new(&o.binary),
    };
    let stderr = stderr_path(&o.serial);
    let err_file =
        std::fs::File::create(&stderr).with_context(|| format!("create {}", stderr.display()))?;
    // A stale socket would satisfy the wait below before QEMU binds its own.
    let _ = std::fs::remove_file(&o.qmp);
    c.args(o.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file);
    let guard = ChildGuard::spawn(&mut c).context("start QEMU")?;
    let mut p = QemuProcess {
        guard,
        qmp: o.qmp.clone(),
        serial: o.serial.clone(),
        stderr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.qmp.exists() {
        if let Some(st) = p.try_wait()? {
            bail!("QEMU exited at start ({st}): {}", p.stderr_text().trim());
        }
        if Instant::now() > deadline {
            bail!(
                "QEMU did not open {} within 30 s: {}",
                p.qmp.display(),
                p.stderr_text().trim()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(p)
}

/// `<serial>.stderr`, next to the serial log.
fn stderr_path(serial: &Path) -> PathBuf {
    let mut s = serial.as_os_str().to_os_string();
    s.push(".stderr");
    PathBuf::from(s)
}
