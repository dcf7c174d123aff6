//! The destination half of a migration: `prepare`, the data connections it accepts,
//! the watcher that follows the incoming QEMU, `finish`, `abort`.
//!
//! Invariant: the destination guest never runs before QEMU has loaded the complete state
//! and either the controller asked for `finish` or the migration is unattended (detached,
//! or its lease ran out) — then it resumes on its own; on any failure its QEMU is killed,
//! never resumed, and the source hears why at once over the peer link. A data connection is accepted only for a prepared, unexpired migration, only
//! from the peer it pins, each stream slot only once, and none once the streams reached
//! QEMU.

mod accept;
mod disks;
mod images;
mod journal;
pub use journal::roll_back_interrupted;
mod load;
mod recover;

use super::channel::{self, DataConn, Slots, Trust};
use super::lease::Lease;
use super::peer::{PeerEvent, PeerLink};
use super::record::{self, Parties};
use super::{QemuHandle, PREEMPT};
use crate::error::{DaemonError, Result};
use crate::state::Daemon;
use crate::vms::lock;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::compress::Filters;
use vmferry_channel::identity::EphemeralIdentity;
use vmferry_channel::meter::Meter;
use vmferry_channel::pump::{self, StopHandle};
use vmferry_channel::tunnel::{Tunnel, TunnelStop};
use vmferry_proto::peer::PeerMessage;
use vmferry_proto::preamble::{Preamble, StreamKind};
use vmferry_proto::{
    Cookie, DestinationEvent, DestinationState, MigrationId, MigrationState, MigrationStatus,
    MigrationSummary, PostCopy, Role, SourceState, Transport, VmName, VmRef,
};
use vmferry_qmp::MigrationStatus as QemuMigrationStatus;

/// How long `finish` waits for QEMU to load the state once the source is done.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the streams may take to end once QEMU loaded everything (QEMU needs nothing
/// more from them; this only lets them end cleanly rather than be cut).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(5);
/// How long QEMU gets to report completion after a stream broke.
const BROKEN_GRACE: Duration = Duration::from_secs(3);
/// How long a post-copy poll waits for QEMU's in-band reply before trying again.
const BUSY_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Streams {
    /// Connections of one transport as they arrive, until all are there.
    slots: Slots,
    /// The transport the streams came by, once they reached QEMU.
    transport: Option<Transport>,
    /// Whether the streams reached QEMU (after which the channel is fixed).
    attached: bool,
    /// Pumps still running.
    running: usize,
    /// Pumps that ended well.
    finished: usize,
    /// The first stream failure.
    error: Option<String>,
    /// How many times a broken post-copy got a new channel.
    recoveries: u32,
}

#[derive(Debug)]
pub struct DestinationMigration {
    pub id: MigrationId,
    qemu: QemuHandle,
    /// A managed VM started for this migration (killed on abort, kept on finish).
    vm_name: Option<VmName>,
    identity: EphemeralIdentity,
    /// The TLS configuration data connections must complete: pins the source's identity.
    server_config: Arc<rustls::ServerConfig>,
    trust: Trust,
    n_streams: usize,
    /// The filters every stream applies (compression), as the cookie says.
    filters: Filters,
    source_running: bool,
    /// The unix socket the destination QEMU listens on.
    incoming_socket: Mutex<PathBuf>,
    streams: Mutex<Streams>,
    changed: Condvar,
    meter: Arc<Meter>,
    stops: Mutex<Vec<StopHandle>>,
    tunnel: Mutex<Option<Tunnel>>,
    tunnel_stop: Mutex<Option<TunnelStop>>,
    /// After this instant, the one-time identity is no longer accepted.
    expires: Instant,
    state: Mutex<DestinationState>,
    /// Why the migration was aborted, in the failing part's words.
    cause: Mutex<Option<String>>,
    /// Signalled on every state change.
    state_changed: Condvar,
    lease: Lease,
    peer: Mutex<Option<PeerLink>>,
    /// What happened without a controller, for status.
    note: Mutex<Option<String>>,
    /// Whether QEMU is in post-copy (the guest runs here).
    postcopy: AtomicBool,
    /// How long the load may stand still (nothing received, no change of QEMU's status)
    /// before it fails: twice the migration's stall timeout, so that the source, which
    /// sees both sides, is the one to judge a stall; this only keeps a destination left
    /// alone from waiting forever.
    stall_after: Duration,
    /// Whether the migration may switch to post-copy (the cookie enabled it).
    may_postcopy: bool,
    /// Set while a broken post-copy waits for its new channel.
    recovering: AtomicBool,
    /// Set while a recovery readies QEMU for a new channel: one at a time.
    recovery_running: AtomicBool,
    /// For reverse: the cookie to dial the source with again after a broken post-copy.
    reverse_cookie: Mutex<Option<Cookie>>,
    /// With --copy-storage: how many disks, and QEMU's NBD server socket.
    n_disks: usize,
    nbd_socket: Option<PathBuf>,
    /// The NBD streams taken so far.
    nbd_taken: Mutex<Vec<usize>>,
    /// Bytes the disk copy carried (kept apart from the RAM's).
    disk_meter: Arc<Meter>,
    /// Images this daemon created for the copy (managed VMs): removed if it fails.
    created_images: Vec<PathBuf>,
    /// What this daemon made for a managed VM, for a restart to undo.
    journal: Option<journal::Journal>,
    /// Who asked for the migration, and the hosts: for its audit line.
    parties: Mutex<Parties>,
}

impl DestinationMigration {
    /// `prepare`: readies a QEMU to receive, makes this migration's identity, opens the
    /// door for exactly `cookie.streams()` data connections. `parties` says who asked
    /// (for the audit line when it ends).
    pub fn prepare(
        daemon: &Daemon,
        mut cookie: Cookie,
        vm: VmRef,
        mut parties: Parties,
    ) -> Result<Cookie> {
        cookie.check()?;
        let id = cookie.migration.clone();
        // Claimed before anything is started, so two prepares of one id cannot both
        // start a QEMU; the claim is dropped on every way out but success.
        let claim = daemon.migrations.claim_destination(&id)?;
        let identity = EphemeralIdentity::generate(&format!("vmferry-destination-{id}"))
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let trust = Trust {
            auth: cookie.options.data_auth.clone(),
            peer_fingerprint: cookie.source_fingerprint.clone(),
        };
        let server_config = trust.server_config(daemon, &identity, "source", None)?;

        let mut created_images = Vec::new();
        let mut journal = None;
        let (qemu, vm_name) = match &vm {
            VmRef::Managed { name } => {
                let mut spec = cookie.vm.clone().ok_or_else(|| {
                    DaemonError::BadRequest("the cookie carries no VM definition".into())
                })?;
                if &spec.name != name {
                    return Err(DaemonError::BadRequest(format!(
                        "the cookie describes VM '{}', not '{name}'",
                        spec.name
                    )));
                }
                spec.name = name.clone();
                // A machine type this QEMU cannot build is refused before anything starts.
                if let Some(m) = &spec.machine {
                    daemon.vms.binary.check_machine(m, "destination")?;
                }
                let j =
                    journal::Journal::open(&daemon.config.state_dir, id.as_str(), name.as_str())
                        .map_err(|e| {
                            DaemonError::Internal(format!("cannot write the incoming journal: {e}"))
                        })?;
                let started =
                    images::create_images(daemon, &id, &mut spec, &cookie, &j).and_then(|images| {
                        j.qemu(&daemon.vms.qmp_path(name)).map_err(|e| {
                            DaemonError::Internal(format!("cannot write the incoming journal: {e}"))
                        })?;
                        match daemon.vms.start(spec, true) {
                            Ok(v) => Ok((v, images)),
                            Err(e) => {
                                images::remove_images(&images);
                                Err(e)
                            }
                        }
                    });
                let (v, images) = match started {
                    Ok(s) => s,
                    Err(e) => {
                        j.close();
                        return Err(e);
                    }
                };
                created_images = images;
                journal = Some(j);
                (QemuHandle::Managed(v), Some(name.clone()))
            }
            VmRef::Attached { qmp } => (QemuHandle::attached(PathBuf::from(qmp)), None),
            VmRef::Libvirt { domain } => {
                return Err(DaemonError::Internal(format!(
                    "libvirt domain {domain} reached the QEMU destination (internal error)"
                )))
            }
        };
        let incoming_socket = daemon
            .config
            .state_dir
            .join(format!("migrate-in-{id}.sock"));
        let nbd_socket = cookie
            .options
            .copy_storage
            .map(|_| daemon.config.state_dir.join(format!("nbd-in-{id}.sock")));
        let setup = Self::ready_qemu(&qemu, &mut cookie, &incoming_socket, nbd_socket.as_deref());
        if let Err(e) = setup {
            if let (QemuHandle::Managed(v), Some(n)) = (&qemu, &vm_name) {
                v.kill();
                daemon.vms.forget(n);
            }
            images::remove_images(&created_images);
            if let Some(j) = &journal {
                j.close();
            }
            return Err(e);
        }
        let streams = cookie.streams() as usize;
        let m = DestinationMigration {
            id: id.clone(),
            qemu,
            vm_name,
            server_config,
            trust,
            n_streams: streams,
            filters: Filters {
                compress: cookie.options.compress,
            },
            source_running: cookie.source_running,
            incoming_socket: Mutex::new(incoming_socket),
            streams: Mutex::new(Streams::default()),
            changed: Condvar::new(),
            meter: Arc::new(Meter::default()),
            stops: Mutex::new(Vec::new()),
            tunnel: Mutex::new(None),
            tunnel_stop: Mutex::new(None),
            // A TTL too large for the clock never expires rather than panics.
            expires: Instant::now()
                .checked_add(Duration::from_secs(daemon.config.credential_ttl_secs))
                .unwrap_or_else(far_future),
            identity,
            state: Mutex::new(DestinationState::Prepared),
            cause: Mutex::new(None),
            state_changed: Condvar::new(),
            lease: Lease::new(cookie.options.lease_ms),
            peer: Mutex::new(None),
            note: Mutex::new(None),
            postcopy: AtomicBool::new(false),
            stall_after: cookie.options.stall_timeout().saturating_mul(2),
            may_postcopy: cookie.options.postcopy.is_some(),
            recovering: AtomicBool::new(false),
            recovery_running: AtomicBool::new(false),
            reverse_cookie: Mutex::new(None),
            n_disks: cookie.disks.len(),
            nbd_socket,
            nbd_taken: Mutex::new(Vec::new()),
            disk_meter: Arc::new(Meter::default()),
            created_images,
            journal,
            parties: Mutex::new({
                parties.source = cookie.source_data_address.clone();
                parties.destination = Some(record::own_address(daemon));
                parties
            }),
        };
        cookie.destination_fingerprint = Some(m.identity.fingerprint().to_string());
        cookie.data_address = daemon.config.data_address();
        cookie.destination_control_address = daemon.config.control_address();
        claim.fill(Arc::new(m));
        Ok(cookie)
    }

    fn ready_qemu(
        qemu: &QemuHandle,
        cookie: &mut Cookie,
        socket: &std::path::Path,
        nbd_socket: Option<&std::path::Path>,
    ) -> Result<()> {
        let status = qemu.with_qmp(|q| q.query_status())?;
        if status.status != "inmigrate" {
            return Err(DaemonError::Qemu(format!(
                "{} is in state '{}', not waiting for a migration (start it with -incoming defer)",
                qemu.describe(),
                status.status
            )));
        }
        // Refused before any byte moves: a state of another shape cannot load.
        if let Some(src) = &cookie.source_machine {
            if let Ok(f) = qemu.with_qmp(|q| q.machine_facts()) {
                let dst = vmferry_proto::MachineShape {
                    ram_bytes: f.ram_bytes,
                    machine: f.machine,
                    ram_blocks: f.ram_blocks,
                    devices: f.devices,
                };
                if let Some(why) = src.mismatch(&dst) {
                    // A machine type this QEMU cannot build at all is the source's to change.
                    let buildable = qemu.with_qmp(|q| q.machine_types()).ok();
                    if let Some(names) = buildable.filter(|n| !n.contains(&src.machine)) {
                        let release = qemu
                            .with_qmp(|q| Ok(q.version().cloned()))
                            .ok()
                            .flatten()
                            .map(|v| format!(" {}.{}", v.major, v.minor))
                            .unwrap_or_default();
                        return Err(DaemonError::BadRequest(format!(
                            "destination QEMU{release} has no machine type {}: start the source \
                             VM with an older machine type it has (e.g. -machine {}), or migrate \
                             to a host with a newer QEMU",
                            src.machine,
                            crate::qemu_binary::newest_of_family(&names, &src.machine)
                                .unwrap_or(dst.machine.as_str())
                        )));
                    }
                    return Err(DaemonError::BadRequest(format!(
                        "{} cannot receive this VM: {why}",
                        qemu.describe()
                    )));
                }
            }
        }
        let _ = std::fs::remove_file(socket);
        let multifd = cookie.options.multifd;
        let postcopy = cookie.options.postcopy.is_some();
        check_postcopy_combination(qemu, "destination", postcopy, multifd)?;
        // Post-copy's preempt channel only where both QEMUs have it and speak the same
        // preempt protocol; otherwise it is turned off here, for both halves.
        let (release, capabilities) = qemu.release_and_capabilities()?;
        cookie.destination_qemu = release;
        let preempt_offered = capabilities.iter().any(|c| c == PREEMPT);
        let source_qemu = cookie.source_qemu;
        if let Some(pc) = cookie.options.postcopy.as_mut() {
            if pc.preempt && !(preempt_offered && PostCopy::preempt_between(source_qemu, release)) {
                tracing::info!(
                    "post-copy without its preempt channel: the source runs QEMU {}, this \
                     host QEMU {}{}",
                    source_qemu
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "(unknown)".into()),
                    release
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "(unknown)".into()),
                    if preempt_offered {
                        ""
                    } else {
                        " without postcopy-preempt"
                    }
                );
                pc.preempt = false;
            }
        }
        let mut caps = vec![("multifd", multifd > 0), ("postcopy-ram", postcopy)];
        if preempt_offered {
            caps.push((PREEMPT, cookie.options.postcopy.is_some_and(|p| p.preempt)));
        }
        if let Some(nbd) = nbd_socket {
            disks::export_disks(qemu, cookie, nbd)?;
        }
        let uri = format!("unix:{}", socket.display());
        let listening = qemu.with_qmp(|q| {
            q.migrate_set_capabilities(&caps)?;
            if multifd > 0 {
                q.migrate_set_parameters(serde_json::json!({ "multifd-channels": multifd }))?;
            }
            q.migrate_incoming(&uri)
        });
        if listening.is_err() && nbd_socket.is_some() {
            let _ = qemu.with_qmp(|q| q.nbd_server_stop());
        }
        listening
    }

    /// The TLS configuration for a data connection that names this migration, or `None`
    /// when it must be refused (expired, or the channel already reached QEMU).
    pub fn data_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        // Open while prepared; for the peer link that follows the streams; and while a
        // broken post-copy waits for its new channel (and only then: a post-copy that
        // has not yet noticed its loss takes nothing new).
        let recovering = self.recovering.load(Ordering::SeqCst);
        let state = self.state();
        let open = state == DestinationState::Prepared
            || recovering
            || (state == DestinationState::Receiving
                && lock(&self.peer).is_none()
                && !self.postcopy.load(Ordering::SeqCst));
        if (Instant::now() > self.expires && !recovering) || !open {
            return None;
        }
        Some(self.server_config.clone())
    }

    fn state(&self) -> DestinationState {
        *lock(&self.state)
    }

    /// Moves to the next state, or says why not.
    fn advance(&self, event: DestinationEvent) -> Result<DestinationState> {
        let mut st = lock(&self.state);
        let next = st
            .next(event)
            .map_err(|e| DaemonError::BadRequest(format!("migration {}: {e}", self.id)))?;
        *st = next;
        drop(st);
        self.state_changed.notify_all();
        if let Some(p) = lock(&self.peer).as_ref() {
            p.notify(self.peer_message());
        }
        Ok(next)
    }

    /// Leaves the in-flight table for the recent one; the peer link says its last word
    /// (the final state) and closes.
    fn end(&self, daemon: &Daemon) {
        let _ = std::fs::remove_file(&*lock(&self.incoming_socket));
        // Completed, or undone above: nothing is left for a restart to roll back.
        if let Some(j) = &self.journal {
            j.close();
        }
        if let Some(p) = lock(&self.peer).take() {
            p.stop();
        }
        let removed = lock(&daemon.migrations.destinations).remove(&self.id);
        let summary = self.summary();
        daemon.migrations.remember(summary.clone());
        // Counted and logged once: only by the call that removed it.
        if removed.is_some() {
            let parties = lock(&self.parties).clone();
            record::ended(daemon, &summary, &parties);
        }
    }

    /// The source host, when the cookie did not name it at `prepare`: the address the
    /// controller filled in, or else the one its (pinned, authenticated) streams came from.
    fn learn_source(&self, address: &str, from_connection: bool) {
        let mut p = lock(&self.parties);
        if from_connection && p.source.is_some() {
            return;
        }
        // A connection's address names the host, not the port it happened to dial from.
        p.source = Some(match address.parse::<std::net::SocketAddr>() {
            Ok(a) if from_connection => a.ip().to_string(),
            _ => address.to_string(),
        });
    }

    /// The streams reached QEMU for the first time: counted once per migration.
    fn count_start(&self, daemon: &Daemon, transport: Transport) {
        record::started(daemon, Role::Destination, transport);
    }

    pub fn status(&self) -> MigrationStatus {
        self.summary().status
    }

    pub fn summary(&self) -> MigrationSummary {
        let st = lock(&self.streams);
        let state = self.state();
        MigrationSummary {
            migration: self.id.clone(),
            role: Role::Destination,
            vm: match (&self.vm_name, &self.qemu) {
                (Some(n), _) => n.to_string(),
                (None, q) => q.describe(),
            },
            status: MigrationStatus {
                state: Some(MigrationState::Destination(state)),
                qemu_status: state.as_str().into(),
                finished: state.is_final(),
                transport: st.transport.or(st.slots.transport()),
                streams: self.n_streams as u32,
                channel_bytes: self.meter.forward() + self.meter.backward(),
                error: lock(&self.cause).clone().or_else(|| st.error.clone()),
                note: lock(&self.note).clone(),
                ..Default::default()
            },
        }
    }

    /// `abort`: cuts the streams and kills a QEMU this daemon started for the migration;
    /// the source hears why over the peer link before the streams are cut. A migration
    /// that already finished here is left alone (the guest runs here now).
    pub fn abort(&self, daemon: &Daemon, reason: &str) {
        {
            let mut c = lock(&self.cause);
            if self.state().is_final() {
                return;
            }
            c.get_or_insert_with(|| reason.to_string());
        }
        if self.advance(DestinationEvent::Abort).is_err() {
            return;
        }
        tracing::warn!(migration = %self.id, "aborting on the destination: {reason}");
        // Let the peer link carry the cause out before the streams go.
        std::thread::sleep(Duration::from_millis(20));
        if self.vm_name.is_none() {
            // An attached QEMU is left as it was before the migration: no exports.
            self.stop_nbd();
        }
        for s in lock(&self.stops).iter() {
            s.stop();
        }
        if let Some(t) = lock(&self.tunnel_stop).as_ref() {
            t.stop();
        }
        if let (QemuHandle::Managed(v), Some(n)) = (&self.qemu, &self.vm_name) {
            v.kill();
            daemon.vms.forget(n);
            images::remove_images(&self.created_images);
        }
        self.end(daemon);
    }

    pub fn expired(&self) -> bool {
        Instant::now() > self.expires && self.state() == DestinationState::Prepared
    }
}

/// An instant no lease or TTL reaches (about 30 years on).
fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(1 << 30)).unwrap_or(now)
}

/// Post-copy with multifd needs QEMU 8.0 or newer (7.2 refuses the combination):
/// refused before anything starts, naming what and why.
pub(super) fn check_postcopy_combination(
    qemu: &QemuHandle,
    side: &str,
    postcopy: bool,
    multifd: u32,
) -> Result<()> {
    if !postcopy || multifd == 0 {
        return Ok(());
    }
    let version = qemu.with_qmp(|q| Ok(q.version().cloned()))?;
    match version {
        Some(v) if (v.major, v.minor) >= (8, 0) => Ok(()),
        v => Err(DaemonError::BadRequest(format!(
            "post-copy with multifd needs QEMU 8.0 or newer on both hosts; the {side} runs \
             QEMU {}: drop --multifd or --postcopy",
            v.map(|v| format!("{}.{}", v.major, v.minor))
                .unwrap_or_else(|| "of an unknown version".into())
        ))),
    }
}
