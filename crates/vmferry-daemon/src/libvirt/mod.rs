//! libvirt-managed domains (`vmferry migrate --libvirt`): libvirt migrates the domain peer
//! to peer, and the two vmferry daemons carry every connection it makes — libvirt's RPC,
//! QEMU's RAM streams, the disks' NBD — over the migration's secure channel, so the two
//! libvirt daemons never talk to each other directly.
//!
//! ```text
//!  source host                                      destination host
//!  libvirtd ─► DIR/libvirt.sock ─┐              ┌─► libvirtd's socket
//!  libvirtd/QEMU ─► DIR/migrate.sock ─ vmferry ═╪═ vmferry ─► DIR/migrate.sock ◄─ QEMU
//!  QEMU (mirror) ─► DIR/nbd.sock ─┘   (TLS)     └─► DIR/nbd.sock ◄─ QEMU's NBD server
//! ```
//! DIR is `libvirt_migrations_dir/ID`: one path, a directory on each host.
//!
//! The phases are the ones every migration has (the controller's driver runs them
//! unchanged); this module implements them for a libvirt domain. It must never move a
//! domain libvirt refuses, and never leave the domain stopped on both hosts.

pub mod api;
pub mod destination;
pub mod domain_xml;
mod ffi;
pub mod images;
pub mod relay;
pub mod source;

pub use destination::LibvirtDestination;
pub use source::LibvirtSource;

use crate::config::DaemonConfig;
use std::path::Path;
use std::time::Duration;

/// How often the job, leases and waits look at libvirt.
pub(crate) const LIBVIRT_POLL: Duration = Duration::from_millis(200);

/// Which side of a migration a directory is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The daemon listens; QEMU connects (NBD, multifd): the group may search and connect.
    Source,
    /// libvirt's QEMU makes its sockets there: the group may write.
    Destination,
}

/// Makes a migration's socket directory, root's only (`0700`), or shared with QEMU's
/// group when one is configured.
pub(crate) fn make_dir(config: &DaemonConfig, dir: &Path, side: Side) -> crate::error::Result<()> {
    use crate::error::DaemonError;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let gid = qemu_gid(config)?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            DaemonError::Internal(format!("cannot create {}: {e}", parent.display()))
        })?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| DaemonError::Internal(format!("cannot create {}: {e}", dir.display())))?;
    if let Some(gid) = gid {
        let mode = match side {
            Side::Source => 0o750,
            Side::Destination => 0o770,
        };
        let shared = nix::unistd::chown(dir, None, Some(gid))
            .map_err(std::io::Error::from)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)));
        if let Err(e) = shared {
            remove_dir(dir);
            return Err(DaemonError::Internal(format!(
                "cannot give {} to QEMU's group: {e}",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Lets QEMU's group connect to a socket the source daemon listens on.
pub(crate) fn share_socket(config: &DaemonConfig, path: &Path) -> crate::error::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(gid) = qemu_gid(config)? else {
        return Ok(());
    };
    nix::unistd::chown(path, None, Some(gid))
        .map_err(std::io::Error::from)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)))
        .map_err(|e| {
            crate::error::DaemonError::Internal(format!(
                "cannot give {} to QEMU's group: {e}",
                path.display()
            ))
        })
}

fn qemu_gid(config: &DaemonConfig) -> crate::error::Result<Option<nix::unistd::Gid>> {
    let Some(name) = &config.libvirt_qemu_group else {
        return Ok(None);
    };
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(Some(g.gid)),
        Ok(None) => Err(crate::error::DaemonError::BadRequest(format!(
            "libvirt_qemu_group {name:?}: no such group on this host"
        ))),
        Err(e) => Err(crate::error::DaemonError::Internal(format!(
            "libvirt_qemu_group {name:?}: {e}"
        ))),
    }
}

/// Removes a migration's socket directory (its sockets are all that is in it).
pub(crate) fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
    }
}

/// At start, before any socket is bound: removes what incoming libvirt migrations that
/// this daemon lost (it was killed) had made — their directory, and the images it
/// created unless the domain runs here (libvirt completed) — and their journals. Returns
/// what it did, in words.
pub fn recover(config: &DaemonConfig) -> Vec<String> {
    let mut said = Vec::new();
    let dir = images::journal_dir(&config.state_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return said;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match images::Journal::load(&path) {
            Ok(j) => {
                let plan = vmferry_proto::libvirt::LibvirtPlan {
                    domain: j.domain.clone(),
                    uuid: j.uuid.clone(),
                    dir: j.dir.clone(),
                    disks: vec![],
                    destination_uri: None,
                    source_libvirt: None,
                    destination_libvirt: None,
                };
                let runs = match destination::remove_incoming(&config.libvirt_uri, &plan) {
                    Ok(runs) => runs,
                    Err(e) => {
                        tracing::warn!("recovering the lost migration of {}: {e}", j.domain);
                        true
                    }
                };
                if !runs {
                    images::remove_images(&j.images);
                }
                // Only a directory under our migrations directory is ours to remove.
                if j.dir.starts_with(&config.libvirt_migrations_dir) {
                    remove_dir(&j.dir);
                }
                said.push(format!(
                    "rolled back the incoming libvirt migration of {} this daemon lost when it \
                     stopped ({} image(s) {}, {} removed)",
                    j.domain,
                    j.images.len(),
                    if runs {
                        "kept: the domain runs here"
                    } else {
                        "removed"
                    },
                    j.dir.display()
                ));
            }
            Err(err) => tracing::warn!("{err}"),
        }
        let _ = std::fs::remove_file(&path);
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn directories_are_root_only_unless_a_qemu_group_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut config = DaemonConfig::new(tmp.path().to_path_buf());
        let private = tmp.path().join("m/a");
        make_dir(&config, &private, Side::Source).expect("make");
        assert_eq!(mode(&private), 0o700);

        // The group every test machine has; its gid is what the directory gets.
        config.libvirt_qemu_group = Some("root".into());
        for (side, want) in [(Side::Source, 0o750), (Side::Destination, 0o770)] {
            let d = tmp.path().join(format!("m/{side:?}"));
            make_dir(&config, &d, side).expect("make");
            assert_eq!(mode(&d), want, "{side:?}");
            assert_eq!(std::fs::metadata(&d).expect("stat").gid(), 0);
        }
        let sock = tmp.path().join("m/Source/nbd.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        share_socket(&config, &sock).expect("share");
        assert_eq!(mode(&sock), 0o660);

        config.libvirt_qemu_group = Some("vmferry-no-such-group".into());
        let e = make_dir(&config, &tmp.path().join("m/x"), Side::Source)
            .expect_err("unknown group")
            .to_string();
        assert!(e.contains("vmferry-no-such-group"), "{e}");
        assert!(
            !tmp.path().join("m/x").exists(),
            "nothing made for a bad group"
        );
    }
}
