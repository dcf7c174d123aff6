//! QEMU processes started directly by a test (attach mode), killed on drop.

use crate::netns::Host;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct QemuOpts {
    pub binary: String,
    pub accel: String,
    pub memory_mib: u64,
    /// Back guest RAM with this file (share=on), so the test can read and write it.
    pub mem_file: Option<PathBuf>,
    pub prealloc: bool,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Start paused (-S).
    pub paused: bool,
    /// `-incoming` argument: "defer" or a URI.
    pub incoming: Option<String>,
    pub netns: Option<Host>,
    pub qmp: PathBuf,
    pub serial: PathBuf,
}

impl QemuOpts {
    pub fn new(qmp: PathBuf, serial: PathBuf) -> Self {
        QemuOpts {
            binary: "qemu-system-x86_64".into(),
            accel: "tcg".into(),
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
        }
    }
}

#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    pub qmp: PathBuf,
    pub serial: PathBuf,
}

impl QemuProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
    }
}

pub fn start_qemu(o: &QemuOpts) -> Result<QemuProcess> {
    let mut c = match &o.netns {
        Some(h) => h.command(&o.binary),
        None => Command::new(&o.binary),
    };
    let mut machine = format!("q35,accel={}", o.accel);
    if let Some(f) = &o.mem_file {
        machine.push_str(",memory-backend=ram0");
        c.arg("-object").arg(format!(
            "memory-backend-file,id=ram0,size={}M,mem-path={},share=on{}",
            o.memory_mib,
            f.display(),
            if o.prealloc { ",prealloc=on" } else { "" }
        ));
    }
    c.args(["-machine", &machine, "-m", &format!("{}M", o.memory_mib)])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", o.serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", o.qmp.display()));
    if let Some(k) = &o.kernel {
        c.arg("-kernel").arg(k);
    }
    if let Some(i) = &o.initrd {
        c.arg("-initrd").arg(i);
    }
    if let Some(a) = &o.append {
        c.arg("-append").arg(a);
    }
    if o.paused {
        c.arg("-S");
    }
    if let Some(i) = &o.incoming {
        c.args(["-incoming", i]);
    }
    let _ = std::fs::remove_file(&o.qmp);
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn qemu")?;
    let mut p = QemuProcess {
        child,
        qmp: o.qmp.clone(),
        serial: o.serial.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.qmp.exists() {
        if let Ok(Some(st)) = p.child.try_wait() {
            bail!("QEMU exited at start ({st})");
        }
        if Instant::now() > deadline {
            bail!("QEMU did not open {}", p.qmp.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(p)
}
