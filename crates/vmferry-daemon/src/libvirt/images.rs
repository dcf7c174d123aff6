//! The destination's disk images for a libvirt migration that copies storage, and the
//! journal that lets a restarted daemon remove what a migration it lost had made.
//!
//! libvirt copies into images that must already exist on the destination, at the
//! source's paths, with the same virtual size. This creates those that are missing
//! (`qemu-img create`) and reuses one that exists with the right size; it never creates
//! a file outside an existing directory, never overwrites one, and only ever removes
//! images it created itself — recorded in the journal before they exist.

use crate::error::{DaemonError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use vmferry_proto::disk::StorageMode;
use vmferry_proto::libvirt::{LibvirtBacking, LibvirtDisk};
use vmferry_proto::MigrationId;

/// What an incoming libvirt migration made on this host, kept until it ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Journal {
    pub domain: String,
    pub uuid: String,
    pub dir: PathBuf,
    pub images: Vec<PathBuf>,
}

pub fn journal_path(state_dir: &Path, id: &MigrationId) -> PathBuf {
    journal_dir(state_dir).join(format!("{}.json", id.as_str()))
}

pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("incoming-libvirt")
}

impl Journal {
    /// Writes the journal (atomically: a crash leaves the old one or the new one).
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |e: std::io::Error| {
            DaemonError::Internal(format!("cannot write the journal {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        let text =
            serde_json::to_vec(self).map_err(|e| DaemonError::Internal(format!("journal: {e}")))?;
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn load(path: &Path) -> Result<Journal> {
        let text = std::fs::read(path).map_err(|e| {
            DaemonError::Internal(format!("cannot read the journal {}: {e}", path.display()))
        })?;
        serde_json::from_slice(&text).map_err(|e| {
            DaemonError::Internal(format!("the journal {} is damaged: {e}", path.display()))
        })
    }
}

/// Whether a path a peer sent is absolute and plain (no `.` or `..`).
fn plain_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// A path the peer sent that this host may create a file at: absolute, no `..`.
fn check_path(d: &LibvirtDisk) -> Result<()> {
    if !plain_absolute(&d.path) {
        return Err(DaemonError::BadRequest(format!(
            "disk {}: {} is not a plain absolute path",
            d.target,
            d.path.display()
        )));
    }
    if !matches!(d.format.as_str(), "qcow2" | "raw") {
        return Err(DaemonError::BadRequest(format!(
            "disk {}: format {:?} is not one vmferry creates (qcow2, raw)",
            d.target, d.format
        )));
    }
    Ok(())
}

/// The backing file an overlay made here for `--copy-storage inc` goes onto: it must
/// already be here, a regular file at the source's path (libvirt copies none of it).
fn check_backing<'a>(d: &LibvirtDisk, b: &'a LibvirtBacking) -> Result<&'a LibvirtBacking> {
    if !plain_absolute(&b.path)
        || !matches!(b.format.as_str(), "qcow2" | "raw")
        || d.format != "qcow2"
    {
        return Err(DaemonError::BadRequest(format!(
            "disk {}: a {} overlay on {} ({:?}) is not one vmferry creates (a qcow2 overlay \
             on a qcow2 or raw file at a plain absolute path)",
            d.target,
            d.format,
            b.path.display(),
            b.format
        )));
    }
    if !b.path.is_file() {
        return Err(DaemonError::BadRequest(format!(
            "disk {}: --copy-storage inc copies only the top image, which is an overlay on \
             {}; that backing file must be on this host already, at the same path, and it \
             is not",
            d.target,
            b.path.display()
        )));
    }
    Ok(b)
}

/// The virtual size of an existing image.
fn virtual_size(path: &Path) -> Result<u64> {
    let o = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .map_err(|e| DaemonError::Internal(format!("cannot run qemu-img (qemu-utils): {e}")))?;
    if !o.status.success() {
        return Err(DaemonError::BadRequest(format!(
            "{} exists but qemu-img cannot read it: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .map_err(|e| DaemonError::BadRequest(format!("qemu-img info {}: {e}", path.display())))?;
    v["virtual-size"].as_u64().ok_or_else(|| {
        DaemonError::BadRequest(format!("qemu-img cannot tell {}'s size", path.display()))
    })
}

/// Makes every disk's image that is missing; `journal` records each before it exists.
/// On failure, what this call created is removed again.
pub fn prepare_images(
    disks: &[LibvirtDisk],
    mode: StorageMode,
    journal: &mut Journal,
    journal_file: &Path,
) -> Result<()> {
    for d in disks {
        check_path(d)?;
    }
    let result = (|| {
        for d in disks {
            if d.path.exists() {
                let have = virtual_size(&d.path)?;
                if have != d.capacity {
                    return Err(DaemonError::BadRequest(format!(
                        "disk {}: {} exists here with a virtual size of {have} bytes, the \
                         source's is {}; not overwritten",
                        d.target,
                        d.path.display(),
                        d.capacity
                    )));
                }
                tracing::info!(
                    "disk {}: reusing {} (same virtual size)",
                    d.target,
                    d.path.display()
                );
                continue;
            }
            // inc copies only the overlay: it goes onto the same backing file here. A disk
            // with no backing file is its own top, copied whole as with `all`.
            let backing = match (mode, &d.backing) {
                (StorageMode::Inc, Some(b)) => Some(check_backing(d, b)?),
                _ => None,
            };
            let parent = d.path.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                return Err(DaemonError::BadRequest(format!(
                    "disk {}: the directory {} does not exist on this host (the image goes at \
                     the source's path)",
                    d.target,
                    parent.display()
                )));
            }
            journal.images.push(d.path.clone());
            journal.save(journal_file)?;
            let mut create = Command::new("qemu-img");
            create.args(["create", "-q", "-f", &d.format]);
            if let Some(b) = backing {
                create.args(["-F", &b.format]).arg("-b").arg(&b.path);
            }
            let o = create
                .arg(&d.path)
                .arg(d.capacity.to_string())
                .output()
                .map_err(|e| {
                    DaemonError::Internal(format!("cannot run qemu-img (qemu-utils): {e}"))
                })?;
            if !o.status.success() {
                return Err(DaemonError::Internal(format!(
                    "disk {}: qemu-img create {} failed: {}",
                    d.target,
                    d.path.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )));
            }
        }
        Ok(())
    })();
    if result.is_err() {
        remove_images(&journal.images);
        journal.images.clear();
        let _ = journal.save(journal_file);
    }
    result
}

pub fn remove_images(paths: &[PathBuf]) {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => tracing::info!("removed the image {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the image {}: {e}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str) -> LibvirtDisk {
        LibvirtDisk {
            target: "vda".into(),
            path: path.into(),
            format: "qcow2".into(),
            capacity: 1 << 20,
            backing: None,
        }
    }

    #[test]
    fn paths_a_peer_sends_must_be_plain_and_absolute() {
        for bad in ["relative.qcow2", "/var/lib/../../etc/passwd", "./a.qcow2"] {
            let e = check_path(&disk(bad)).expect_err(bad).to_string();
            assert!(e.contains("plain absolute path"), "{e}");
        }
        check_path(&disk("/var/lib/libvirt/images/a.qcow2")).expect("plain");
        let mut d = disk("/x.img");
        d.format = "vmdk".into();
        assert!(check_path(&d).is_err());
    }

    #[test]
    fn a_missing_directory_is_refused_and_nothing_is_journalled() {
        let tmp = tempfile::tempdir().expect("tmp");
        let jf = tmp.path().join("j.json");
        let mut j = Journal::default();
        let missing = tmp.path().join("no-such-dir/a.qcow2");
        let e = prepare_images(
            &[disk(missing.to_str().expect("utf8"))],
            StorageMode::All,
            &mut j,
            &jf,
        )
        .expect_err("refused")
        .to_string();
        assert!(e.contains("does not exist on this host"), "{e}");
        assert!(j.images.is_empty());
    }

    #[test]
    fn inc_makes_an_overlay_on_the_backing_file_here_and_refuses_without_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let jf = tmp.path().join("j.json");
        let base = tmp.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("base");
        let top = tmp.path().join("top.qcow2");
        let mut d = disk(top.to_str().expect("utf8"));
        d.backing = Some(LibvirtBacking {
            path: tmp.path().join("missing.raw"),
            format: "raw".into(),
        });
        let mut j = Journal::default();
        let e = prepare_images(std::slice::from_ref(&d), StorageMode::Inc, &mut j, &jf)
            .expect_err("no backing file here")
            .to_string();
        assert!(
            e.contains("missing.raw") && e.contains("must be on this host"),
            "{e}"
        );
        assert!(!top.exists() && j.images.is_empty());
        for (path, format) in [("/a/../etc/shadow", "raw"), ("/x.raw", "vmdk")] {
            d.backing = Some(LibvirtBacking {
                path: path.into(),
                format: format.into(),
            });
            let e = prepare_images(std::slice::from_ref(&d), StorageMode::Inc, &mut j, &jf)
                .expect_err(path)
                .to_string();
            assert!(e.contains("not one vmferry creates"), "{e}");
        }

        d.backing = Some(LibvirtBacking {
            path: base.clone(),
            format: "raw".into(),
        });
        prepare_images(std::slice::from_ref(&d), StorageMode::Inc, &mut j, &jf).expect("made");
        assert_eq!(j.images, vec![top.clone()]);
        let o = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&top)
            .output()
            .expect("qemu-img");
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(info["backing-filename"], base.to_str().expect("utf8"));
        assert_eq!(info["backing-filename-format"], "raw");
        assert_eq!(info["virtual-size"], 1 << 20);
    }
}
