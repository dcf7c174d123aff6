//! Disk images a managed destination creates for a migration that copies storage: one
//! per disk of the VM, in the daemon's images directory, of the source's format and
//! virtual size (`qemu-img create`; for `inc`, an overlay on the same backing file,
//! which must exist on this host). The VM's spec then points at them.
//!
//! It only ever removes images it created itself, and only for a migration that failed.

use super::journal::Journal;
use super::*;
use std::process::Command;
use vmferry_proto::disk::StorageMode;
use vmferry_proto::VmSpec;

/// Creates the images and points `spec` at them; on failure nothing created is left.
/// Each image is in `journal` before it exists.
pub(super) fn create_images(
    daemon: &Daemon,
    id: &MigrationId,
    spec: &mut VmSpec,
    cookie: &Cookie,
    journal: &Journal,
) -> Result<Vec<PathBuf>> {
    let Some(copy) = cookie.options.copy_storage else {
        return Ok(Vec::new());
    };
    let dir = daemon.config.images_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| DaemonError::Internal(format!("cannot create {}: {e}", dir.display())))?;
    let mut created = Vec::new();
    for k in 0..spec.disks.len() {
        let device = format!("disk{k}");
        let made = cookie
            .disks
            .iter()
            .find(|d| d.device == device)
            .ok_or_else(|| {
                DaemonError::BadRequest(format!(
                    "disk {device}: the source did not describe it (is it read-only there?)"
                ))
            })
            .and_then(|shape| {
                let ext = if shape.format == "qcow2" {
                    "qcow2"
                } else {
                    "raw"
                };
                let path = dir.join(format!(
                    "{}-{}-{device}.{ext}",
                    spec.name,
                    &id.as_str()[..8]
                ));
                // Never journalled unless it is ours to make: a restart removes what
                // the journal names.
                if path.exists() {
                    return Err(DaemonError::Exists(format!(
                        "disk {device}: {} already exists; not overwritten",
                        path.display()
                    )));
                }
                journal.image(&path).map_err(|e| {
                    DaemonError::Internal(format!("cannot write the incoming journal: {e}"))
                })?;
                create_one(&path, shape, copy.mode).map(|()| path)
            });
        match made {
            Ok(path) => {
                spec.disks[k] = path.display().to_string();
                created.push(path);
            }
            Err(e) => {
                remove_images(&created);
                return Err(e);
            }
        }
    }
    Ok(created)
}

fn create_one(
    path: &std::path::Path,
    shape: &vmferry_proto::DiskShape,
    mode: StorageMode,
) -> Result<()> {
    let d = &shape.device;
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", &shape.format]);
    if mode == StorageMode::Inc {
        let backing = shape.backing.as_deref().ok_or_else(|| {
            DaemonError::BadRequest(format!(
                "disk {d}: --copy-storage inc needs a disk with a backing file; the source's has none"
            ))
        })?;
        if !std::path::Path::new(backing).exists() {
            return Err(DaemonError::BadRequest(format!(
                "disk {d}: --copy-storage inc needs the backing file {backing} on this host too"
            )));
        }
        c.args(["-b", backing, "-F", &backing_format(backing)?]);
    }
    c.arg(path).arg(shape.virtual_size.to_string());
    let o = c
        .output()
        .map_err(|e| DaemonError::Internal(format!("cannot run qemu-img (qemu-utils): {e}")))?;
    if !o.status.success() {
        return Err(DaemonError::Internal(format!(
            "disk {d}: qemu-img create {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// The format of an existing image, as `qemu-img info` reads it.
fn backing_format(path: &str) -> Result<String> {
    let o = Command::new("qemu-img")
        .args(["info", "--output=json", path])
        .output()
        .map_err(|e| DaemonError::Internal(format!("cannot run qemu-img (qemu-utils): {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .map_err(|e| DaemonError::BadRequest(format!("cannot read the image {path}: {e}")))?;
    v["format"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| DaemonError::BadRequest(format!("qemu-img cannot tell {path}'s format")))
}

/// Removes images this daemon created for a migration that failed.
pub(super) fn remove_images(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::warn!("cannot remove the image {}: {e}", p.display());
        }
    }
}
