//! Choosing the accelerator: KVM where it really runs a guest, TCG otherwise.
//!
//! `/dev/kvm` existing proves little: on a nested layer it may open fine and still
//! triple-fault a booting guest. So `auto` boots a short probe guest under KVM and watches
//! whether it keeps running; the result is cached for the daemon's lifetime and the
//! reason is reported to the operator. The probe must never be mistaken for a VM: it has
//! its own socket and is always killed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmferry_proto::{Accel, VmSpec};
use vmferry_qmp::Qmp;

/// How long the probe guest must stay running for KVM to count as working.
const PROBE_TIME: Duration = Duration::from_millis(2500);

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
    let qmp_path = scratch.join("kvm-probe.qmp");
    let _ = std::fs::remove_file(&qmp_path);
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
        "-serial",
        "none",
    ]);
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    if let Some(k) = &spec.kernel {
        cmd.arg("-kernel").arg(k);
        if let Some(i) = &spec.initrd {
            cmd.arg("-initrd").arg(i);
        }
        cmd.arg("-append").arg("console=ttyS0 panic=-1 quiet");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return tcg(format!("the KVM probe could not start {qemu}: {e}")),
    };
    let started = Instant::now();
    let verdict = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                break tcg(format!(
                    "a probe guest under KVM stopped after {:.1} s ({status}): KVM here cannot run a booting guest",
                    started.elapsed().as_secs_f64()
                ))
            }
            Ok(None) => {}
            Err(e) => break tcg(format!("the KVM probe could not be watched: {e}")),
        }
        if started.elapsed() >= PROBE_TIME {
            break match Qmp::connect(&qmp_path, Duration::from_secs(2))
                .and_then(|mut q| q.query_status())
            {
                Ok(s) if s.running => AccelChoice {
                    accel: Accel::Kvm,
                    reason: "auto: KVM runs a probe guest here".into(),
                },
                Ok(s) => tcg(format!(
                    "a probe guest under KVM ended in state '{}'",
                    s.status
                )),
                Err(e) => tcg(format!("the KVM probe did not answer: {e}")),
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&qmp_path);
    verdict
}
