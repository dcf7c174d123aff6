//! The source half of a migration: `begin`, `perform` (and its background job), `status`,
//! `confirm`.
//!
//! Invariant: the source guest keeps running unless the destination confirmed it has the
//! whole state. Every path out of a failed or cancelled migration ends in `confirm(false)`,
//! the job's own failure handling, or an expired lease, all of which resume the guest if
//! QEMU paused it. After QEMU completed, the source QEMU is stopped only once the
//! destination runs the guest (confirm, or the destination's word over the peer link),
//! and resumed only once the destination has aborted.

mod connect;
mod disks;
mod job;
mod preempt;
mod recover;
pub mod restart;
mod unattended;

use super::channel::{self, DataConn, Slots, Trust};
use super::lease::Lease;
use super::peer::{PeerEvent, PeerLink};
use super::record::{self, Parties};
use super::{QemuHandle, PREEMPT, UNLIMITED_BANDWIDTH};
use crate::error::{DaemonError, Result};
use crate::state::Daemon;
use crate::vms::lock;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::compress::Filters;
use vmferry_channel::identity::EphemeralIdentity;
use vmferry_channel::meter::Meter;
use vmferry_channel::pump::{self, PumpStats, StopHandle};
use vmferry_channel::tunnel::{Tunnel, TunnelStop};
use vmferry_proto::peer::PeerMessage;
use vmferry_proto::preamble::{Preamble, StreamKind};
use vmferry_proto::{
    Cookie, DestinationState, LeaseAction, MigrationId, MigrationOptions, MigrationState,
    MigrationStatus, MigrationSummary, Role, SourceEvent, SourceState, Transport, VmName, VmRef,
};
use vmferry_qmp::MigrationStatus as QemuMigrationStatus;

/// How long dialing one data connection may take when `perform` has to dial itself.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the source waits for a tunnel's streams to end once QEMU completed.
const TUNNEL_DRAIN: Duration = Duration::from_secs(10);
/// How long the source waits for the destination's reverse connections to arrive.
const REVERSE_WAIT: Duration = Duration::from_secs(10);
/// How long QEMU may take to open its migration sockets to us.
const QEMU_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pumps may take to drain after QEMU says it completed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often QEMU is asked how the migration goes (query-migrate is cheap).
const POLL: Duration = Duration::from_millis(5);
/// How long a broken stream waits for the destination's word on why.
const PEER_WORD_WAIT: Duration = Duration::from_secs(2);

/// The data channel made by `connect`, waiting for `perform`.
#[derive(Debug, Default)]
enum Held {
    #[default]
    Nothing,
    /// One TLS connection per stream: dialed by us (direct) or by the destination (reverse).
    Conns(Slots),
    Tunnel(Tunnel),
}

/// What carries the streams while QEMU migrates.
#[derive(Debug)]
enum Carrier {
    Conns(Vec<DataConn>),
    Tunnel(Tunnel),
}

/// What the job runs while QEMU migrates.
#[derive(Debug)]
enum Running {
    Pumps(Vec<std::thread::JoinHandle<()>>),
    Tunnel(Tunnel),
}

impl Running {
    fn tunnel(&self) -> Option<&Tunnel> {
        match self {
            Running::Tunnel(t) => Some(t),
            Running::Pumps(_) => None,
        }
    }
}

#[derive(Debug)]
pub struct SourceMigration {
    pub id: MigrationId,
    qemu: QemuHandle,
    /// The managed VM's name, so `confirm` can forget it once it lives elsewhere.
    vm_name: Option<VmName>,
    identity: EphemeralIdentity,
    options: MigrationOptions,
    /// Whether the guest ran at `begin`: on failure it is resumed only then.
    was_running: bool,
    state: Mutex<SourceState>,
    /// Held through [`Self::fail`]: two failure reports (the lease's sweeper and the job
    /// seeing QEMU cancelled) must not both act on QEMU.
    failing: Mutex<()>,
    lease: Lease,
    /// The peer link once `connect` made it (dialed, or accepted for reverse) ...
    peer_pending: Mutex<Option<DataConn>>,
    /// ... and once `perform` started it.
    peer: Mutex<Option<PeerLink>>,
    /// Why the destination gave up, as it told us over the peer link.
    peer_failure: Mutex<Option<String>>,
    /// What happened without a controller, for status.
    note: Mutex<Option<String>>,
    status: Mutex<MigrationStatus>,
    /// Signalled when `status` becomes finished.
    finished: std::sync::Condvar,
    /// Plaintext bytes carried, over all streams.
    meter: Arc<Meter>,
    /// One per live pump, to cut them all on cancel.
    stops: Mutex<Vec<StopHandle>>,
    /// The first pump failure, if any.
    pump_error: Mutex<Option<String>>,
    cancel: AtomicBool,
    /// Set once QEMU accepted our `migrate`: only a migration this half started may be
    /// cancelled, and the guest resumed, by this half (another controller's migration
    /// of the same QEMU is none of its business).
    started_qemu: AtomicBool,
    /// The unix socket QEMU migrates into.
    socket_path: PathBuf,
    held: Mutex<Held>,
    held_changed: Condvar,
    /// For reverse: the TLS configuration the destination's connections must complete.
    reverse_config: Mutex<Option<Arc<rustls::ServerConfig>>>,
    tunnel_stop: Mutex<Option<TunnelStop>>,
    /// The cookie and transport `perform` used: a post-copy that lost its link makes
    /// its channel again with them.
    performed: Mutex<Option<(Cookie, Transport)>>,
    /// Set while a broken post-copy makes its channel again (reverse connections are
    /// taken again then).
    recovering: AtomicBool,
    /// Whether post-copy's preempt channel is used: as `begin` offered it, until the
    /// destination's cookie turns it off.
    preempt: AtomicBool,
    /// Whether this QEMU has the postcopy-preempt capability at all.
    preempt_offered: bool,
    /// Whether it may open the preempt channel only when post-copy starts (8.0 and newer).
    preempt_late: bool,
    /// The preempt stream's carrier until QEMU connects ([`preempt`]) ...
    late: Mutex<Option<preempt::LateStream>>,
    /// ... and its pump once it did (direct, reverse).
    late_pump: Mutex<Option<(StopHandle, std::thread::JoinHandle<()>)>>,
    /// Which channel the pumps belong to: a pump of a channel that recovery replaced
    /// must not report its (expected) end as a failure of the new one.
    generation: std::sync::atomic::AtomicU32,
    /// The tunnel, kept open after QEMU completed until `confirm`.
    tunnel_keep: Mutex<Option<Tunnel>>,
    /// With --copy-storage: the disks copied, in stream order.
    disks: Vec<vmferry_qmp::BlockDisk>,
    /// Their NBD connections once the channel is made (direct, reverse), in disk order.
    nbd_conns: Mutex<Vec<DataConn>>,
    /// For reverse: the destination's NBD connections as they arrive.
    nbd_slots: Mutex<Slots>,
    /// The mirrors and NBD nodes the disk copy added to QEMU.
    disk_jobs: Mutex<disks::DiskJobs>,
    /// Our unix sockets QEMU's NBD clients connect to.
    disk_sockets: Mutex<Vec<PathBuf>>,
    /// The NBD pumps (direct, reverse), stopped and dropped when the disk copy ends.
    nbd_stops: Mutex<Vec<StopHandle>>,
    /// Bytes the disk copy carried (kept apart from the RAM's).
    disk_meter: Arc<Meter>,
    /// The first NBD stream failure, in words.
    disk_error: Mutex<Option<String>>,
    /// When the first mirror started: each disk's time to READY counts from here.
    disk_copy_started: Mutex<Option<Instant>>,
    /// Who asked for the migration, and the hosts: for its audit line.
    parties: Mutex<Parties>,
}

impl SourceMigration {
    /// `begin`: describes the VM, makes this migration's identity, returns the first cookie.
    /// `parties` says who asked (for the audit line when it ends).
    pub fn begin(
        daemon: &Daemon,
        id: MigrationId,
        vm: VmRef,
        mut options: MigrationOptions,
        mut parties: Parties,
    ) -> Result<Cookie> {
        if options.transport.is_none() {
            options.transport = Some(daemon.config.transport);
        }
        let (qemu, vm_name, spec) = match &vm {
            VmRef::Managed { name } => {
                let v = daemon.vms.get(name)?;
                let spec = v.spec.clone();
                (QemuHandle::Managed(v), Some(name.clone()), Some(spec))
            }
            VmRef::Attached { qmp } => (QemuHandle::attached(PathBuf::from(qmp)), None, None),
            VmRef::Libvirt { domain } => {
                return Err(DaemonError::Internal(format!(
                    "libvirt domain {domain} reached the QEMU source (internal error)"
                )))
            }
        };
        let status = qemu.with_qmp(|q| q.query_status())?;
        super::destination::check_postcopy_combination(
            &qemu,
            "source",
            options.postcopy.is_some(),
            options.multifd,
        )?;
        // Post-copy's preempt channel where this QEMU has it; the destination keeps it
        // only if its QEMU can take it (prepare).
        let (release, capabilities) = qemu.release_and_capabilities()?;
        // 8.0 and newer open the preempt channel when post-copy starts (QEMU 5655aab079,
        // except on pc-*-7.2 and older machines): the job takes it whenever it comes.
        let preempt_offered = capabilities.iter().any(|c| c == PREEMPT);
        let preempt_late = release.is_none_or(|r| r.major >= 8);
        // Not with multifd: a QEMU that opens it at the start (pc-*-7.2 machines on 8.0+)
        // may connect it between the multifd channels, which the job takes in order.
        let multifd = options.multifd;
        if let Some(pc) = options.postcopy.as_mut() {
            pc.preempt = preempt_offered && multifd == 0;
        }
        // With --copy-storage and --postcopy the mirrors end at the pause before the
        // switch-over (pause-before-switchover holds post-copy's start too), so the
        // destination's guest never runs on a disk the source still writes.
        let disks = match options.copy_storage {
            Some(_) => disks::disks_to_copy(&qemu)?,
            None => Vec::new(),
        };
        let active = qemu.with_qmp(|q| q.query_migrate())?;
        if active.status.is_active() {
            return Err(DaemonError::Exists(format!(
                "{} is already migrating ({:?})",
                qemu.describe(),
                active.status
            )));
        }
        // QEMU refuses to migrate again once it has handed its guest over; say so here,
        // before a destination is prepared, and in words that name what happened.
        if qemu.with_qmp(|q| q.query_status())?.status == "postmigrate" {
            return Err(DaemonError::Exists(format!(
                "{} has already migrated its guest away (it is paused after a completed \
                 migration); the guest runs on the destination of that migration",
                qemu.describe()
            )));
        }
        let tcg_warning = qemu.tcg_write_loss(status.running);
        if let Some(w) = &tcg_warning {
            tracing::warn!(migration = %id, "{w}");
        }
        let identity = EphemeralIdentity::generate(&format!("vmferry-source-{id}"))
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let source_machine =
            qemu.with_qmp(|q| q.machine_facts())
                .ok()
                .map(|f| vmferry_proto::MachineShape {
                    ram_bytes: f.ram_bytes,
                    machine: f.machine,
                    ram_blocks: f.ram_blocks,
                    devices: f.devices,
                });
        // The destination builds the machine this QEMU runs, by its versioned name (a VM
        // started before specs kept it has none).
        let spec = spec.map(|mut s| {
            if let Some(m) = &source_machine {
                s.machine = Some(m.machine.clone());
            }
            s
        });
        let cookie = Cookie {
            migration: id.clone(),
            options: options.clone(),
            vm: spec,
            source_running: status.running,
            source_fingerprint: Some(identity.fingerprint().to_string()),
            destination_fingerprint: None,
            data_address: None,
            source_data_address: daemon.config.data_address(),
            destination_control_address: None,
            transport: None,
            transport_notes: vec![],
            // An old QEMU that cannot say is not refused for it; the load will tell.
            source_machine,
            peer_link: false,
            source_qemu: release,
            destination_qemu: None,
            libvirt: None,
            disks: disks.iter().map(super::disk_shape).collect(),
        };
        let socket_path = daemon
            .config
            .state_dir
            .join(format!("migrate-out-{id}.sock"));
        let m = SourceMigration {
            id: id.clone(),
            qemu,
            vm_name,
            identity,
            options,
            was_running: status.running,
            state: Mutex::new(SourceState::Begun),
            lease: Lease::new(cookie.options.lease_ms),
            peer_pending: Mutex::new(None),
            peer: Mutex::new(None),
            peer_failure: Mutex::new(None),
            note: Mutex::new(tcg_warning),
            status: Mutex::new(MigrationStatus {
                qemu_status: "none".into(),
                source_qemu: release.map(|r| r.to_string()),
                ..Default::default()
            }),
            finished: std::sync::Condvar::new(),
            meter: Arc::new(Meter::default()),
            stops: Mutex::new(Vec::new()),
            pump_error: Mutex::new(None),
            failing: Mutex::new(()),
            cancel: AtomicBool::new(false),
            started_qemu: AtomicBool::new(false),
            socket_path,
            held: Mutex::new(Held::Nothing),
            held_changed: Condvar::new(),
            reverse_config: Mutex::new(None),
            tunnel_stop: Mutex::new(None),
            performed: Mutex::new(None),
            recovering: AtomicBool::new(false),
            preempt: AtomicBool::new(cookie.options.postcopy.is_some_and(|p| p.preempt)),
            preempt_offered,
            preempt_late,
            late: Mutex::new(None),
            late_pump: Mutex::new(None),
            generation: std::sync::atomic::AtomicU32::new(0),
            tunnel_keep: Mutex::new(None),
            disks,
            nbd_conns: Mutex::new(Vec::new()),
            nbd_slots: Mutex::new(Slots::default()),
            disk_jobs: Mutex::new(disks::DiskJobs::default()),
            disk_sockets: Mutex::new(Vec::new()),
            nbd_stops: Mutex::new(Vec::new()),
            disk_meter: Arc::new(Meter::default()),
            disk_error: Mutex::new(None),
            disk_copy_started: Mutex::new(None),
            parties: Mutex::new({
                parties.source = Some(record::own_address(daemon));
                parties
            }),
        };
        // Checked and taken under one lock: of two begins for one QEMU, one wins.
        let mut sources = lock(&daemon.migrations.sources);
        if sources.contains_key(&id) {
            return Err(DaemonError::Exists(format!(
                "migration {id} already exists"
            )));
        }
        let busy = sources
            .values()
            .any(|o| o.qemu.same_qemu(&m.qemu) && !o.state().is_final());
        if busy {
            return Err(DaemonError::Exists(format!(
                "{} is already the source of a migration",
                m.qemu.describe()
            )));
        }
        sources.insert(id, Arc::new(m));
        Ok(cookie)
    }

    /// `perform`: dials every data stream, points QEMU at our unix socket, and leaves a
    /// job pumping and watching QEMU. Returns once the migration is under way.
    pub fn perform(self: &Arc<Self>, daemon: &Arc<Daemon>, cookie: &Cookie) -> Result<()> {
        self.learn_destination(cookie);
        self.advance(SourceEvent::Perform)?;
        lock(&self.status).destination_qemu = cookie.destination_qemu.map(|r| r.to_string());
        let result = self.start(daemon, cookie);
        if let Err(e) = &result {
            self.fail(&e.to_string());
        }
        result
    }

    pub fn state(&self) -> SourceState {
        *lock(&self.state)
    }

    /// Moves to the next state, or says why not; tells the destination.
    fn advance(&self, event: SourceEvent) -> Result<SourceState> {
        let mut st = lock(&self.state);
        let next = st
            .next(event)
            .map_err(|e| DaemonError::BadRequest(format!("migration {}: {e}", self.id)))?;
        *st = next;
        drop(st);
        if let Some(p) = lock(&self.peer).as_ref() {
            p.notify(self.peer_message());
        }
        Ok(next)
    }

    /// The destination host, as the cookie names it (its data address, which the
    /// controller fills in when the destination could not name itself).
    fn learn_destination(&self, cookie: &Cookie) {
        let to = cookie
            .data_address
            .clone()
            .or_else(|| cookie.destination_control_address.clone());
        if to.is_some() {
            lock(&self.parties).destination = to;
        }
    }

    /// Leaves the in-flight table for the recent one; counts the migration and writes its
    /// audit line (once: only the call that removed it).
    fn end(&self, daemon: &Daemon) {
        if let Some(p) = lock(&self.peer).take() {
            p.stop();
        }
        let removed = lock(&daemon.migrations.sources).remove(&self.id);
        if removed.is_some() {
            let summary = self.summary();
            daemon.migrations.remember(summary.clone());
            let parties = lock(&self.parties).clone();
            record::ended(daemon, &summary, &parties);
        }
    }

    /// Marks the migration failed, cuts the streams, and makes sure the guest runs again.
    fn fail(&self, why: &str) {
        let _failing = lock(&self.failing);
        // Once final, QEMU is no longer this migration's: the VM may already be migrating
        // again, and cancelling "our" migration would cancel that one (a rollback by the
        // lease, then the job's own report of the cancelled QEMU migration, arriving late).
        if self.state().is_final() {
            tracing::debug!(migration = %self.id, "a later failure report, ignored: {why}");
            return;
        }
        // The destination's own words beat what its failure looked like from here
        // (except in post-copy, where the message already carries them).
        let why = match lock(&self.peer_failure).clone() {
            Some(p) if self.state() != SourceState::PostCopy => p,
            _ => why.to_string(),
        };
        // A failure while the disks were copied says how far each got.
        let why = if !self.disks.is_empty()
            && !self.started_qemu.load(Ordering::SeqCst)
            && !why.contains("disk copy stopped")
        {
            format!("the disk copy stopped ({}): {why}", self.disks_so_far())
        } else {
            why
        };
        // A source QEMU that died is the cause, whatever it looked like from here.
        let exited = self.qemu.exit_reason();
        let why = match &exited {
            Some(e) => format!("the source QEMU has exited: {e}"),
            None => why,
        };
        let why = why.as_str();
        tracing::warn!(migration = %self.id, "migration failed: {why}");
        for s in lock(&self.stops).iter() {
            s.stop();
        }
        if let Some(t) = lock(&self.tunnel_stop).as_ref() {
            t.stop();
        }
        if exited.is_none() {
            // After the streams are cut: NBD requests still in flight then fail at once,
            // rather than hold the cancelled mirrors until the link times out.
            self.clean_disks(true);
        }
        *lock(&self.held) = Held::Nothing;
        *lock(&self.late) = None;
        let _ = std::fs::remove_file(&self.socket_path);
        // After post-copy started, the source's copy is stale: it must never run again
        // (not on this failure, and not on a later confirm(false) either).
        let lost = matches!(self.state(), SourceState::PostCopy | SourceState::Lost);
        if exited.is_none() && !lost {
            // A QEMU that exited has nothing to resume (and would only cost the
            // QMP connect timeouts here).
            self.ensure_source_runs();
        }
        {
            let mut st = lock(&self.status);
            if st.error.is_none() {
                st.error = Some(why.to_string());
            }
            if exited.is_some() {
                st.qemu_status = "exited".into();
            } else if st.qemu_status != "cancelled" && st.qemu_status != "completed" {
                st.qemu_status = "failed".into();
            }
            st.finished = true;
        }
        let _ = self.advance(if lost {
            SourceEvent::Lose
        } else {
            SourceEvent::RollBack
        });
        self.finished.notify_all();
    }

    /// Cancels QEMU's migration if it is still going and resumes a guest that was running.
    fn ensure_source_runs(&self) {
        if !self.started_qemu.load(Ordering::SeqCst) {
            return; // QEMU never started our migration: the guest is as it was
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.qemu.with_qmp(|q| q.query_migrate()) {
                Ok(info) if info.status.is_active() => {
                    let _ = self.qemu.with_qmp(|q| q.migrate_cancel());
                }
                _ => break,
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        if self.was_running {
            match self.qemu.with_qmp(|q| q.query_status()) {
                Ok(s) if !s.running => {
                    if let Err(e) = self.qemu.with_qmp(|q| q.cont()) {
                        tracing::error!(migration = %self.id, "cannot resume the source guest: {e}");
                    } else {
                        tracing::info!(migration = %self.id, "source guest resumed");
                    }
                }
                _ => {}
            }
        }
    }

    pub fn status(&self) -> MigrationStatus {
        self.wait_status(Duration::ZERO)
    }

    /// The status once the migration finished, or after `wait` at the latest.
    pub fn wait_status(&self, wait: Duration) -> MigrationStatus {
        let mut st = super::wait_finished(&self.status, &self.finished, wait).clone();
        st.channel_bytes = self.meter.forward();
        st.wire_bytes = self.meter.wire_forward();
        st.state = Some(MigrationState::Source(self.state()));
        st.note = lock(&self.note).clone();
        st
    }

    pub fn summary(&self) -> MigrationSummary {
        MigrationSummary {
            migration: self.id.clone(),
            role: Role::Source,
            vm: match (&self.vm_name, &self.qemu) {
                (Some(n), _) => n.to_string(),
                (None, q) => q.describe(),
            },
            status: self.status(),
        }
    }

    /// `confirm`: success stops the source QEMU (the guest lives on the destination now);
    /// failure cancels whatever is left and resumes the guest. Success is refused unless
    /// QEMU completed — before anything is cut, so a refused confirm changes nothing.
    pub fn confirm(&self, daemon: &Daemon, success: bool) -> Result<()> {
        if !success && self.state() == SourceState::PostCopy {
            return Err(DaemonError::BadRequest(format!(
                "migration {} is in post-copy: the guest runs on the destination and cannot \
                 be rolled back; it completes on its own",
                self.id
            )));
        }
        if success {
            let state = self.state();
            if state != SourceState::Completed {
                return Err(DaemonError::BadRequest(format!(
                    "migration {} cannot be confirmed: it is {state}",
                    self.id
                )));
            }
        }
        // The destination has what it needs (or the migration is over): end the streams.
        if let Some(t) = lock(&self.tunnel_keep).take() {
            let id = self.id.clone();
            let _ = std::thread::Builder::new()
                .name("tunnel-close".into())
                .spawn(move || {
                    if let Err(e) = t.close(Duration::from_secs(10)) {
                        tracing::warn!(migration = %id, "tunnel did not close cleanly: {e}");
                    }
                });
        }
        for s in lock(&self.stops).iter() {
            s.stop();
        }
        if success {
            if let (QemuHandle::Managed(vm), Some(name)) = (&self.qemu, &self.vm_name) {
                vm.shutdown(Duration::from_secs(5));
                daemon.vms.forget(name);
            }
            self.advance(SourceEvent::Confirm)?;
        } else {
            self.cancel.store(true, Ordering::SeqCst);
            // Not "cancelled": a controller rolls back after a failure elsewhere just as
            // after its operator's cancel, and `confirm` does not say which.
            self.fail("rolled back by the controller");
        }
        self.end(daemon);
        Ok(())
    }
}
