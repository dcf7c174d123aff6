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
