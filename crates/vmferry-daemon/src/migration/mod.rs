//! Migrations in flight on this daemon: the source half and the destination half, each a
//! module whose methods are the phases it serves.
//!
//! A migration's one-time identity lives only here, in memory, for as long as the
//! migration does; it is never written to disk and never sent (only its fingerprint is).

pub mod channel;
pub mod destination;
pub mod lease;
pub mod peer;
pub mod record;
pub mod source;

use crate::error::{DaemonError, Result};
use crate::vms::{lock, ManagedVm};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmferry_proto::{MigrationId, MigrationStatus, MigrationSummary, Role};
use vmferry_qmp::{Qmp, QmpError};

pub use destination::DestinationMigration;
pub use source::SourceMigration;

/// What a disk copy compares of a disk, as QEMU shows it: both halves describe their
/// disks this way.
pub(crate) fn disk_shape(d: &vmferry_qmp::BlockDisk) -> vmferry_proto::DiskShape {
    vmferry_proto::DiskShape {
        device: d.device.clone(),
        format: d.format.clone(),
        virtual_size: d.virtual_size,
        backing: d.backing.clone(),
        read_only: d.read_only,
    }
}

/// QEMU's capability for post-copy's preempt channel.
pub(crate) const PREEMPT: &str = "postcopy-preempt";

/// The QEMU a migration acts on: one this daemon manages, or one it was attached to.
#[derive(Debug, Clone)]
pub enum QemuHandle {
    Managed(Arc<ManagedVm>),
    /// Attach mode: QMP is opened for each use and closed right after, because QEMU
    /// serves one QMP client at a time and the QEMU's owner may need it too — except
    /// while the migration runs ([`QemuHandle::hold`]).
    Attached(Arc<AttachedQmp>),
}

/// An attached QEMU's QMP socket, and the connection kept while a phase polls it.
#[derive(Debug)]
pub struct AttachedQmp {
    path: PathBuf,
    held: Mutex<Option<Qmp>>,
    holding: std::sync::atomic::AtomicBool,
}

/// Keeps an attached QEMU's QMP connection open until dropped.
#[must_use]
pub struct QmpHold<'a>(Option<&'a AttachedQmp>);

impl Drop for QmpHold<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.0 {
            a.holding.store(false, std::sync::atomic::Ordering::SeqCst);
            *lock(&a.held) = None;
        }
    }
}

impl QemuHandle {
    pub fn attached(path: PathBuf) -> QemuHandle {
        QemuHandle::Attached(Arc::new(AttachedQmp {
            path,
            held: Mutex::new(None),
            holding: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// While the returned guard lives, QMP calls reuse one connection instead of
    /// connecting (greeting, capabilities) for each: a phase polling `query-migrate`
    /// every few milliseconds otherwise spends them on handshakes, and each reconnect
    /// can wait for QEMU to take the next client. Managed VMs keep theirs anyway.
    pub fn hold(&self) -> QmpHold<'_> {
        match self {
            QemuHandle::Managed(_) => QmpHold(None),
            QemuHandle::Attached(a) => {
                a.holding.store(true, std::sync::atomic::Ordering::SeqCst);
                QmpHold(Some(a))
            }
        }
    }

    pub fn with_qmp<R>(&self, f: impl FnOnce(&mut Qmp) -> Result<R, QmpError>) -> Result<R> {
        match self {
            QemuHandle::Managed(vm) => vm.with_qmp(f),
            QemuHandle::Attached(a) => {
                let mut held = lock(&a.held);
                let mut q = match held.take() {
                    Some(q) => q,
                    // QEMU takes one QMP client at a time and accepts the next only from
                    // its main loop: on a loaded host that can take seconds.
                    None => Qmp::connect(&a.path, ATTACHED_QMP_CONNECT).map_err(|e| {
                        let why = std::error::Error::source(&e)
                            .map(|s| format!(" ({s})"))
                            .unwrap_or_default();
                        DaemonError::Qemu(format!(
                            "cannot reach QMP at {}: {e}{why}",
                            a.path.display()
                        ))
                    })?,
                };
                let r = f(&mut q);
                // Kept only while held, and only if still usable (a command error is).
                let usable = matches!(
                    &r,
                    Ok(_) | Err(QmpError::Command { .. } | QmpError::Timeout { .. })
                );
                if usable && a.holding.load(std::sync::atomic::Ordering::SeqCst) {
                    *held = Some(q);
                }
                Ok(r?)
            }
        }
    }

    /// Waits until a post-copy QEMU paused on its broken channel (or ended: completed or
    /// failed), at most `within`; its `query-migrate` then.
    pub fn wait_postcopy_pause(&self, within: Duration) -> Result<vmferry_qmp::MigrationInfo> {
        use vmferry_qmp::MigrationStatus as S;
        let deadline = std::time::Instant::now() + within;
        loop {
            let info = self.with_qmp(|q| q.query_migrate())?;
            if matches!(info.status, S::PostcopyPaused | S::Completed | S::Failed) {
                return Ok(info);
            }
            if std::time::Instant::now() > deadline {
                return Err(DaemonError::Timeout(format!(
                    "QEMU did not pause post-copy within {} s of the broken link (status {})",
                    within.as_secs(),
                    info.status.as_str()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `query-migrate`, waiting at most `wait` for the reply: `None` when QEMU did not
    /// answer by then. During post-copy that is expected: a vCPU waiting for a page that
    /// has not arrived can hold QEMU's main loop, which answers in-band commands. The
    /// session stays usable (the next command waits for the late reply first).
    pub fn query_migrate_within(
        &self,
        wait: Duration,
    ) -> Result<Option<vmferry_qmp::MigrationInfo>> {
        self.with_qmp(|q| {
            let usual = q.timeout();
            q.set_timeout(wait);
            let r = q.query_migrate();
            q.set_timeout(usual);
            match r {
                Ok(info) => Ok(Some(info)),
                Err(QmpError::Timeout { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// A warning for the operator when this QEMU runs its guest under TCG and is older
    /// than 9.0: such a QEMU can lose guest writes during a live migration (see
    /// `QemuVersion::tcg_migration_loses_writes`). `None` under KVM, for a paused guest
    /// (it writes nothing), or when QEMU cannot say.
    pub fn tcg_write_loss(&self, running: bool) -> Option<String> {
        if !running {
            return None;
        }
        let (version, kvm) = self
            .with_qmp(|q| Ok((q.version().cloned(), q.kvm_enabled().ok())))
            .ok()?;
        let v = version?;
        (kvm == Some(false) && v.tcg_migration_loses_writes()).then(|| {
            format!(
                "QEMU {}.{} runs this guest under TCG, and TCG before QEMU 9.0 can lose guest \
                 writes during a live migration (QEMU commit 03bfc2188f): the guest may be \
                 damaged on the destination; migrate it paused, or use QEMU 9.0 or newer",
                v.major, v.minor
            )
        })
    }

    /// The QEMU's release (from its QMP greeting) and the migration capabilities it has.
    pub fn release_and_capabilities(
        &self,
    ) -> Result<(Option<vmferry_proto::QemuRelease>, Vec<String>)> {
        self.with_qmp(|q| {
            let release = q.version().map(|v| vmferry_proto::QemuRelease {
                major: v.major,
                minor: v.minor,
                micro: v.micro,
            });
            Ok((release, q.migrate_capabilities()?))
        })
    }

    /// `cont`, waiting at most `wait` for the reply: `false` when QEMU did not answer by
    /// then (during post-copy its main loop may be held by a vCPU waiting for a page; the
    /// command stays queued in QEMU and runs once the loop is free).
    pub fn cont_within(&self, wait: Duration) -> Result<bool> {
        self.with_qmp(|q| {
            let usual = q.timeout();
            q.set_timeout(wait);
            let r = q.cont();
            q.set_timeout(usual);
            match r {
                Ok(()) => Ok(true),
                Err(QmpError::Timeout { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Whether both handles reach the same QEMU.
    pub fn same_qemu(&self, other: &QemuHandle) -> bool {
        match (self, other) {
            (QemuHandle::Managed(a), QemuHandle::Managed(b)) => a.spec.name == b.spec.name,
            (QemuHandle::Attached(a), QemuHandle::Attached(b)) => a.path == b.path,
            _ => false,
        }
    }

    /// How a QEMU exited (a managed one with the end of its stderr), once it has; `None`
    /// while it runs.
    /// [`Self::exit_reason`], given up to `within` to show: a QEMU killed closes its QMP
    /// connection before it can be reaped (or, attached, before its listening socket
    /// closes), so a failure seen first as a closed connection would otherwise not name
    /// the exit. None if it still runs then.
    pub fn exit_reason_within(&self, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(why) = self.exit_reason() {
                return Some(why);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn exit_reason(&self) -> Option<String> {
        match self {
            QemuHandle::Managed(vm) => vm.exit_reason(),
            // Not our child to reap: a QMP socket nobody listens on any more says it.
            QemuHandle::Attached(a) => {
                let gone = |e: &std::io::Error| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    )
                };
                match std::os::unix::net::UnixStream::connect(&a.path) {
                    Err(e) if gone(&e) => Some(format!(
                        "its QMP socket {} no longer answers ({e})",
                        a.path.display()
                    )),
                    _ => None,
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            QemuHandle::Managed(vm) => format!("VM '{}'", vm.spec.name),
            QemuHandle::Attached(a) => format!("QEMU at {}", a.path.display()),
        }
    }
}

/// Every migration this daemon takes part in, by id.
#[derive(Debug, Default)]
pub struct Migrations {
    pub sources: Mutex<HashMap<MigrationId, Arc<SourceMigration>>>,
    pub destinations: Mutex<HashMap<MigrationId, Arc<DestinationMigration>>>,
    /// Migrations of libvirt domains (`migrate --libvirt`). A destination id maps to
    /// `None` while its prepare runs.
    pub libvirt_sources: Mutex<HashMap<MigrationId, Arc<crate::libvirt::LibvirtSource>>>,
    pub libvirt_destinations:
        Mutex<HashMap<MigrationId, Option<Arc<crate::libvirt::LibvirtDestination>>>>,
    /// Destination ids being prepared (QEMU starting): taken before anything starts,
    /// so two prepares of one id cannot both start a QEMU.
    preparing: Mutex<HashSet<MigrationId>>,
    /// The last migrations that ended here, newest last.
    recent: Mutex<VecDeque<MigrationSummary>>,
}

/// The right to prepare one destination id; released on drop unless filled.
#[must_use]
pub struct DestinationClaim<'a> {
    migrations: &'a Migrations,
    id: MigrationId,
}

impl DestinationClaim<'_> {
    /// Publishes the prepared destination under the claimed id.
    pub fn fill(self, m: Arc<DestinationMigration>) {
        lock(&self.migrations.destinations).insert(self.id.clone(), m);
        // Drop releases the claim.
    }
}

impl Drop for DestinationClaim<'_> {
    fn drop(&mut self) {
        lock(&self.migrations.preparing).remove(&self.id);
    }
}

/// How many ended migrations `status` remembers.
const RECENT: usize = 16;

impl Migrations {
    /// Claims `id` for a prepare, or says it is taken (prepared, or being prepared).
    pub fn claim_destination(&self, id: &MigrationId) -> Result<DestinationClaim<'_>> {
        let mut preparing = lock(&self.preparing);
        if preparing.contains(id) || lock(&self.destinations).contains_key(id) {
            return Err(DaemonError::Exists(format!(
                "migration {id} is already prepared here"
            )));
        }
        preparing.insert(id.clone());
        Ok(DestinationClaim {
            migrations: self,
            id: id.clone(),
        })
    }

    /// Remembers how a migration ended here.
    pub fn remember(&self, summary: MigrationSummary) {
        let mut r = lock(&self.recent);
        r.retain(|m| m.migration != summary.migration || m.role != summary.role);
        r.push_back(summary);
        while r.len() > RECENT {
            r.pop_front();
        }
    }

    /// How a migration that ended here ended (the source's view first, where this
    /// daemon held both halves).
    pub fn ended_status(&self, id: &MigrationId) -> Option<MigrationStatus> {
        let r = lock(&self.recent);
        let of = |role| {
            r.iter()
                .rev()
                .find(|m| &m.migration == id && m.role == role)
        };
        of(Role::Source)
            .or_else(|| of(Role::Destination))
            .map(|m| m.status.clone())
    }

    /// Everything `vmferry status` lists: ended ones first, then those in flight.
    pub fn list(&self) -> Vec<MigrationSummary> {
        let mut v: Vec<MigrationSummary> = lock(&self.recent).iter().cloned().collect();
        for m in lock(&self.sources).values() {
            v.push(m.summary());
        }
        for m in lock(&self.destinations).values() {
            v.push(m.summary());
        }
        for m in lock(&self.libvirt_sources).values() {
            v.push(m.summary());
        }
        for m in lock(&self.libvirt_destinations).values().flatten() {
            v.push(m.summary());
        }
        v
    }

    /// How many migrations of each role this daemon holds that have not ended.
    pub fn in_flight(&self) -> [(Role, usize); 2] {
        [
            (
                Role::Source,
                lock(&self.sources).len() + lock(&self.libvirt_sources).len(),
            ),
            (
                Role::Destination,
                lock(&self.destinations).len() + lock(&self.libvirt_destinations).len(),
            ),
        ]
    }

    pub fn source(&self, id: &MigrationId) -> Result<Arc<SourceMigration>> {
        lock(&self.sources).get(id).cloned().ok_or_else(|| {
            DaemonError::NotFound(format!("no migration {id} with this host as its source"))
        })
    }

    pub fn libvirt_source(&self, id: &MigrationId) -> Option<Arc<crate::libvirt::LibvirtSource>> {
        lock(&self.libvirt_sources).get(id).cloned()
    }

    pub fn libvirt_destination(
        &self,
        id: &MigrationId,
    ) -> Option<Arc<crate::libvirt::LibvirtDestination>> {
        lock(&self.libvirt_destinations).get(id).cloned().flatten()
    }

    pub fn destination(&self, id: &MigrationId) -> Result<Arc<DestinationMigration>> {
        lock(&self.destinations).get(id).cloned().ok_or_else(|| {
            DaemonError::NotFound(format!(
                "no migration {id} with this host as its destination"
            ))
        })
    }
}

/// Waits until `status` is finished, or `wait` passed (`finished` is signalled when it
/// becomes so); returns the status held under its lock.
pub(crate) fn wait_finished<'a>(
    status: &'a Mutex<MigrationStatus>,
    finished: &std::sync::Condvar,
    wait: Duration,
) -> std::sync::MutexGuard<'a, MigrationStatus> {
    let deadline = Instant::now() + wait;
    let mut st = lock(status);
    while !st.finished {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        st = match finished.wait_timeout(st, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
    st
}

/// How long reaching an attached QEMU's QMP socket may take.
const ATTACHED_QMP_CONNECT: Duration = Duration::from_secs(15);

/// QEMU's max-bandwidth for "unlimited": QEMU's default is a cap (32 MiB/s in old
/// releases) that would silently throttle a migration.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
