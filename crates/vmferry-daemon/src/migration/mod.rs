//! Migrations in flight on this daemon: the source half and the destination half, each a
//! module whose methods are the phases it serves.
//!
//! A migration's one-time identity lives only here, in memory, for as long as the
//! migration does; it is never written to disk and never sent (only its fingerprint is).

pub mod channel;
pub mod destination;
pub mod source;

use crate::error::{DaemonError, Result};
use crate::vms::{lock, ManagedVm};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmferry_proto::MigrationId;
use vmferry_qmp::{Qmp, QmpError};

pub use destination::DestinationMigration;
pub use source::SourceMigration;

/// The QEMU a migration acts on: one this daemon manages, or one it was attached to.
#[derive(Debug, Clone)]
pub enum QemuHandle {
    Managed(Arc<ManagedVm>),
    /// Attach mode: QMP is opened for each use and closed right after, because QEMU
    /// serves one QMP client at a time and the QEMU's owner may need it too.
    Attached(PathBuf),
}

impl QemuHandle {
    pub fn with_qmp<R>(&self, f: impl FnOnce(&mut Qmp) -> Result<R, QmpError>) -> Result<R> {
        match self {
            QemuHandle::Managed(vm) => vm.with_qmp(f),
            QemuHandle::Attached(path) => {
                let mut q = Qmp::connect(path, Duration::from_secs(5)).map_err(|e| {
                    DaemonError::Qemu(format!("cannot reach QMP at {}: {e}", path.display()))
                })?;
                Ok(f(&mut q)?)
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            QemuHandle::Managed(vm) => format!("VM '{}'", vm.spec.name),
            QemuHandle::Attached(p) => format!("QEMU at {}", p.display()),
        }
    }
}

/// Every migration this daemon takes part in, by id.
#[derive(Debug, Default)]
pub struct Migrations {
    pub sources: Mutex<HashMap<MigrationId, Arc<SourceMigration>>>,
    pub destinations: Mutex<HashMap<MigrationId, Arc<DestinationMigration>>>,
}

impl Migrations {
    pub fn source(&self, id: &MigrationId) -> Result<Arc<SourceMigration>> {
        lock(&self.sources).get(id).cloned().ok_or_else(|| {
            DaemonError::NotFound(format!("no migration {id} with this host as its source"))
        })
    }

    pub fn destination(&self, id: &MigrationId) -> Result<Arc<DestinationMigration>> {
        lock(&self.destinations).get(id).cloned().ok_or_else(|| {
            DaemonError::NotFound(format!(
                "no migration {id} with this host as its destination"
            ))
        })
    }
}

/// QEMU's max-bandwidth for "unlimited": QEMU's default is a cap (32 MiB/s in old
/// releases) that would silently throttle a migration.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
