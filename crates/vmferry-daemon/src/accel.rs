//! Choosing the accelerator: KVM where it really runs a guest, TCG otherwise.
//!
//! `/dev/kvm` existing proves little: on a nested layer it may open fine and still
//! triple-fault a booting guest. So `auto` boots a short probe guest under KVM and watches
//! whether its kernel prints its banner; the result is cached for the daemon's lifetime and the
//! reason is reported to the operator. The probe must never be mistaken for a VM: it has
//! its own socket and is always killed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmferry_proto::{Accel, VmSpec};

/// How long the probe guest may take to print its kernel banner under KVM.
const PROBE_TIME: Duration = Duration::from_millis(4000);

/// A resolved accelerator and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Caches the result of the KVM probe.
#[derive(Debug, Default)]
pub struct AccelResolver {
    probed: Mutex<Option<AccelChoice>>,
}

impl AccelResolver {
    /// Resolves `requested` for a VM like `spec`. `Kvm` and `Tcg` are taken as asked.
    pub fn resolve(
        &self,
        requested: Accel,
        qemu: &str,
        spec: &VmSpec,
        scratch: &Path,
    ) -> AccelChoice {
        match requested {
            Accel::Kvm => AccelChoice {
                accel: Accel::Kvm,
                reason: "kvm requested".into(),
            },
            Accel::Tcg => AccelChoice {
                accel: Accel::Tcg,
                reason: "tcg requested".into(),
            },
            Accel::Auto => {
                let mut cached = match self.probed.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                if let Some(c) = cached.as_ref() {
                    return c.clone();
                }
                let c = probe(qemu, spec, scratch);
                tracing::info!(accel = %c.accel, reason = %c.reason, "accelerator chosen");
                *cached = Some(c.clone());
                c
            }
        }
    }
}

fn tcg(reason: impl Into<String>) -> AccelChoice {
    AccelChoice {
        accel: Accel::Tcg,
        reason: format!("auto: using TCG because {}", reason.into()),
    }
}

fn probe(qemu: &str, spec: &VmSpec, scratch: &Path) -> AccelChoice {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return tcg("/dev/kvm cannot be opened");
    }
    let Some(kernel) = &spec.kernel else {
        return AccelChoice {
            accel: Accel::Kvm,
            reason: "auto: /dev/kvm opens; no kernel to probe with, so KVM is assumed to work"
                .into(),
        };
    };
    // Boot the VM's own kernel under KVM with early console output: a kernel that really
    // runs prints its banner within milliseconds; a broken nested layer hangs or resets
    // before that.
    let log = scratch.join("kvm-probe.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine",
        "q35,accel=kvm",
        "-m",
        "128M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    cmd.arg("-serial").arg(format!("file:{}", log.display()));
    cmd.arg("-kernel").arg(kernel);
    if let Some(i) = &spec.initrd {
        cmd.arg("-initrd").arg(i);
    }
    cmd.arg("-append")
        .arg("console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return tcg(format!("the KVM probe could not start {qemu}: {e}")),
    };
    let started = Instant::now();
    let verdict = loop {
        let out = std::fs::read(&log).unwrap_or_default();
        if out.windows(13).any(|w| w == b"Linux version") {
            break AccelChoice {
                accel: Accel::Kvm,
                reason: format!(
                    "auto: KVM boots a probe guest here ({} ms to its banner)",
                    started.elapsed().as_millis()
                ),
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            break tcg(format!(
                "a probe guest under KVM stopped after {:.1} s ({status}) before printing its banner",
                started.elapsed().as_secs_f64()
            ));
        }
        if started.elapsed() >= PROBE_TIME {
            break tcg(format!(
                "a probe guest under KVM printed no kernel banner within {:.1} s: KVM here cannot run a booting guest",
                PROBE_TIME.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log);
    verdict
}
