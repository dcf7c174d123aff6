//! libvirt's QEMU capabilities, kept between hosts and test runs.

use std::path::{Path, PathBuf};

/// Where libvirt's QEMU capabilities are kept between hosts and test runs
/// (`<repo>/.cache/libvirt-qemu-caps`, one XML file per QEMU binary).
///
/// A libvirtd with an empty cache spends 4–9 s here probing each QEMU binary (a QEMU per
/// binary, queried over QMP) before it answers; with the files of an earlier probe it answers
/// in 0.5–2 s. libvirt checks every cached file before using it (the QEMU binary's and
/// libvirtd's own change times, libvirt's version, the kernel, the CPU microcode) and probes
/// again when anything differs, so a stale file costs only the time it would have saved.
/// Hosts whose QEMUs run as another user than root keep theirs apart
/// (`libvirt-qemu-caps-USER`): libvirt records whether that user may open /dev/kvm, and
/// one set of files shared by both kinds of host would be probed again at every start.
fn capabilities_cache(qemu_user: Option<&str>) -> PathBuf {
    let name = match qemu_user {
        None => ".cache/libvirt-qemu-caps".to_string(),
        Some(user) => format!(".cache/libvirt-qemu-caps-{user}"),
    };
    crate::guest::repo_root().join(name)
}

/// Copies the kept capabilities into a new host's /var/cache/libvirt (`cache`). Best
/// effort: without them libvirtd only starts slower.
pub(super) fn seed_capabilities(cache: &Path, qemu_user: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(capabilities_cache(qemu_user)) else {
        return;
    };
    let into = cache.join("qemu/capabilities");
    if std::fs::create_dir_all(&into).is_err() {
        return;
    }
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "xml") {
            let _ = std::fs::copy(&p, into.join(e.file_name()));
        }
    }
}

/// Keeps a ready host's capabilities for the next hosts (write to a temporary name, then
/// rename: parallel test processes never see half a file). Best effort.
pub(super) fn keep_capabilities(cache: &Path, qemu_user: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(cache.join("qemu/capabilities")) else {
        return;
    };
    let keep = capabilities_cache(qemu_user);
    if std::fs::create_dir_all(&keep).is_err() {
        return;
    }
    for e in rd.flatten() {
        let (p, name) = (e.path(), e.file_name());
        let Ok(new) = std::fs::read(&p) else { continue };
        if std::fs::read(keep.join(&name)).is_ok_and(|old| old == new) {
            continue;
        }
        let tmp = keep.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        if std::fs::write(&tmp, &new).is_ok() && std::fs::rename(&tmp, keep.join(&name)).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}
