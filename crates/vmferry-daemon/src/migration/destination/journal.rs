//! The incoming journal: one small file per migration a managed destination is receiving
//! (`STATE_DIR/incoming/ID.json`), naming what this daemon made for it — the QEMU it
//! started and the disk images it created — written *before* each of those exists.
//!
//! A daemon killed in the middle of a migration cannot undo anything itself; when it
//! starts again, [`roll_back_interrupted`] reads the journals left behind and undoes what
//! they name: the receiving QEMU (nothing of the guest runs there yet: the source keeps
//! the guest until the migration completes) and the half-copied images. A migration that
//! ends, either way, removes its journal.
//!
//! It must never touch what it did not record: a pid is only killed while its command
//! line still names this VM's QMP socket (pids are reused), and only listed files are
//! removed.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Entry {
    migration: String,
    vm: String,
    /// The receiving QEMU's QMP socket, which its command line names.
    qmp: Option<PathBuf>,
    images: Vec<PathBuf>,
}

/// The journal of one incoming migration of a managed VM.
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    entry: Mutex<Entry>,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("incoming")
}

impl Journal {
    /// Starts the journal of migration `id` receiving VM `vm`.
    pub(super) fn open(state_dir: &Path, id: &str, vm: &str) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir(state_dir))?;
        let j = Journal {
            path: dir(state_dir).join(format!("{id}.json")),
            entry: Mutex::new(Entry {
                migration: id.to_string(),
                vm: vm.to_string(),
                ..Default::default()
            }),
        };
        j.write()?;
        Ok(j)
    }

    /// Records an image about to be created.
    pub(super) fn image(&self, path: &Path) -> std::io::Result<()> {
        crate::vms::lock(&self.entry)
            .images
            .push(path.to_path_buf());
        self.write()
    }

    /// Records the QEMU about to be started to receive, by its QMP socket.
    pub(super) fn qemu(&self, qmp: &Path) -> std::io::Result<()> {
        crate::vms::lock(&self.entry).qmp = Some(qmp.to_path_buf());
        self.write()
    }

    /// The migration ended (completed, or undone by this daemon): nothing to roll back.
    pub(super) fn close(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }

    /// Written to a temporary file and renamed, so a crash never leaves half a journal.
    fn write(&self) -> std::io::Result<()> {
        let text = serde_json::to_vec(&*crate::vms::lock(&self.entry))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Undoes the incoming migrations a previous run of this daemon left unfinished; returns
/// one line per migration saying what was undone.
pub fn roll_back_interrupted(state_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut said = Vec::new();
    for f in rd.flatten() {
        let path = f.path();
        if path.extension().and_then(|e| e.to_str()) == Some("tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let entry: Entry = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(
                    "unreadable incoming journal {}: {e}; left alone",
                    path.display()
                );
                continue;
            }
        };
        let mut undone = Vec::new();
        if let Some(qmp) = &entry.qmp {
            for pid in kill_qemus_of(qmp) {
                undone.push(format!("killed its receiving QEMU (pid {pid})"));
            }
        }
        for img in &entry.images {
            match std::fs::remove_file(img) {
                Ok(()) => undone.push(format!("removed {}", img.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove the image {}: {e}", img.display()),
            }
        }
        let _ = std::fs::remove_file(&path);
        said.push(format!(
            "migration {} of VM '{}' was interrupted by a daemon restart and is rolled back{}{}",
            entry.migration,
            entry.vm,
            if undone.is_empty() { "" } else { ": " },
            undone.join(", ")
        ));
    }
    said
}

/// Kills every process whose command line names `qmp` (the QEMU started to receive; it
/// was a child of the previous run, not of this one), and waits for each to go.
fn kill_qemus_of(qmp: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut killed = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if crate::vm_process::is_running_qemu_of(pid, qmp) {
            let mut adopted = crate::vm_process::QemuProcess::Adopted {
                pid,
                qmp: qmp.to_path_buf(),
            };
            adopted.kill();
            killed.push(pid);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_migration_is_undone_and_nothing_else_is_touched() {
        let state = tempfile::tempdir().expect("tempdir");
        let img = state.path().join("g-disk0.qcow2");
        let other = state.path().join("other.qcow2");
        std::fs::write(&img, b"half a copy").expect("write");
        std::fs::write(&other, b"not ours").expect("write");
        // A process whose command line names the QMP socket, and one that does not.
        let qmp = state.path().join("vms/g/qmp.sock");
        let mut ours = std::process::Command::new("python3")
            .args([
                "-c",
                "import time; time.sleep(30)",
                &qmp.display().to_string(),
            ])
            .spawn()
            .expect("python3");
        crate::vm_process::wait_for_cmdline(ours.id(), &qmp);
        let mut stranger = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let j = Journal::open(state.path(), "m1", "g").expect("journal");
        j.image(&img).expect("image");
        j.qemu(&qmp).expect("qemu");
        let j2 = Journal::open(state.path(), "m2", "h").expect("journal");
        j2.qemu(&qmp.with_file_name("other.sock")).expect("qemu");
        let done = Journal::open(state.path(), "m3", "k").expect("journal");
        done.close();
        std::fs::write(dir(state.path()).join("bad.json"), b"{").expect("write");

        let said = roll_back_interrupted(state.path());
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said.iter()
                .any(|s| s.contains("m1") && s.contains("killed")),
            "{said:?}"
        );
        assert!(!img.exists(), "the half copy stays");
        assert!(other.exists(), "a file it never made went");
        assert!(
            ours.wait().is_ok_and(|s| !s.success()),
            "ours was not killed"
        );
        assert!(
            stranger.try_wait().is_ok_and(|s| s.is_none()),
            "a stranger was killed"
        );
        let _ = stranger.kill();
        let _ = stranger.wait();
        assert!(roll_back_interrupted(state.path()).is_empty(), "twice");
    }
}
