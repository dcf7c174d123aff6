//! A managed VM's QEMU process: a child this daemon started, or one that a previous run of
//! the daemon started and this run adopted after a restart. An adopted QEMU is not this
//! process's child, so it cannot be waited for: /proc says whether it still runs.
//!
//! It must never signal a pid that is no longer that QEMU (pids are reused): an adopted
//! process counts as gone as soon as its command line stops naming the VM's QMP socket.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub enum QemuProcess {
    /// Started by this run of the daemon.
    Child(Child),
    /// Started by an earlier run; `qmp` is named on its command line.
    Adopted { pid: u32, qmp: PathBuf },
}

impl QemuProcess {
    pub fn id(&self) -> u32 {
        match self {
            QemuProcess::Child(c) => c.id(),
            QemuProcess::Adopted { pid, .. } => *pid,
        }
    }

    /// `Some(how)` once the process has ended.
    pub fn exited(&mut self) -> Option<String> {
        match self {
            QemuProcess::Child(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            QemuProcess::Adopted { pid, qmp } => {
                (!is_running_qemu_of(*pid, qmp)).then(|| "it ended while adopted".to_string())
            }
        }
    }

    /// Kills the process and waits (a few seconds at most) until it is gone.
    pub fn kill(&mut self) {
        match self {
            QemuProcess::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            QemuProcess::Adopted { pid, qmp } => {
                if !is_running_qemu_of(*pid, qmp) {
                    return;
                }
                let Ok(raw) = i32::try_from(*pid) else {
                    return;
                };
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let deadline = Instant::now() + Duration::from_secs(5);
                while is_running_qemu_of(*pid, qmp) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Whether `pid` runs (not a zombie) with `qmp` on its command line.
pub fn is_running_qemu_of(pid: u32, qmp: &std::path::Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|s| s.trim_start().starts_with('Z'));
    if zombie {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = qmp.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Waits until `pid` runs with `qmp` on its command line: spawn returns once the child's
/// close-on-exec descriptors are closed, a moment before the kernel has set up the new
/// program's arguments (until then /proc shows the parent's, or none). Waits 10 s at most
/// (a loaded CI machine can keep the child off a CPU), then panics: a test that went on
/// would fail later, saying less.
#[cfg(test)]
pub(crate) fn wait_for_cmdline(pid: u32, qmp: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_running_qemu_of(pid, qmp) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} never showed {} on its command line",
            qmp.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopted_process_is_known_by_its_command_line_and_killed_only_then() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qmp = dir.path().join("vms/g/qmp.sock");
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import time; time.sleep(30)",
                &qmp.display().to_string(),
            ])
            .spawn()
            .expect("python3");
        let pid = child.id();
        wait_for_cmdline(pid, &qmp);
        // Another socket's name: not ours, never signalled.
        let mut other = QemuProcess::Adopted {
            pid,
            qmp: dir.path().join("vms/h/qmp.sock"),
        };
        assert!(other.exited().is_some());
        other.kill();
        assert!(
            child.try_wait().is_ok_and(|s| s.is_none()),
            "a stranger was killed"
        );
        let mut ours = QemuProcess::Adopted {
            pid,
            qmp: qmp.clone(),
        };
        assert_eq!(ours.id(), pid);
        assert!(ours.exited().is_none());
        // The test reaps its own child while `kill` waits for it to go.
        let reaper = std::thread::spawn(move || child.wait());
        ours.kill();
        let reaped = reaper.join();
        assert!(
            ours.exited().is_some(),
            "{reaped:?} {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
        );
        assert!(reaped.is_ok_and(|r| r.is_ok_and(|s| !s.success())));
    }
}
