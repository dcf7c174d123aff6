//! The destination half of a migration: `prepare`, the data connections it accepts,
//! the watcher that follows the incoming QEMU, `finish`, `abort`.
//!
//! Invariant: the destination guest never runs before QEMU has loaded the complete state
//! and either the controller asked for `finish` or the migration is unattended (detached,
//! or its lease ran out) — then it resumes on its own; on any failure its QEMU is killed,
//! never resumed, and the source hears why at once over the peer link. A data connection is accepted only for a prepared, unexpired migration, only
//! from the peer it pins, each stream slot only once, and none once the streams reached
//! QEMU.

use super::channel::{self, DataConn, Slots, Trust};
use super::lease::Lease;
use super::peer::{PeerEvent, PeerLink};
use super::QemuHandle;
use crate::error::{DaemonError, Result};
use crate::server::Daemon;
use crate::vms::lock;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
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
    MigrationSummary, Role, SourceState, Transport, VmName, VmRef,
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
    incoming_socket: PathBuf,
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
}

impl DestinationMigration {
    /// `prepare`: readies a QEMU to receive, makes this migration's identity, opens the
    /// door for exactly `cookie.streams()` data connections.
    pub fn prepare(daemon: &Daemon, mut cookie: Cookie, vm: VmRef) -> Result<Cookie> {
        cookie.check().map_err(DaemonError::BadRequest)?;
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
                let v = daemon.vms.start(spec, true)?;
                (QemuHandle::Managed(v), Some(name.clone()))
            }
            VmRef::Attached { qmp } => (QemuHandle::attached(PathBuf::from(qmp)), None),
        };
        let incoming_socket = daemon
            .config
            .state_dir
            .join(format!("migrate-in-{id}.sock"));
        let setup = Self::ready_qemu(&qemu, &cookie, &incoming_socket);
        if let Err(e) = setup {
            if let (QemuHandle::Managed(v), Some(n)) = (&qemu, &vm_name) {
                v.kill();
                daemon.vms.forget(n);
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
            incoming_socket,
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
        };
        cookie.destination_fingerprint = Some(m.identity.fingerprint().to_string());
        cookie.data_address = daemon.config.data_address();
        cookie.destination_control_address = daemon.config.control_address();
        claim.fill(Arc::new(m));
        Ok(cookie)
    }

    fn ready_qemu(qemu: &QemuHandle, cookie: &Cookie, socket: &std::path::Path) -> Result<()> {
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
                };
                if let Some(why) = src.mismatch(&dst) {
                    return Err(DaemonError::BadRequest(format!(
                        "{} cannot receive this VM: {why}",
                        qemu.describe()
                    )));
                }
            }
        }
        let _ = std::fs::remove_file(socket);
        let multifd = cookie.options.multifd;
        let uri = format!("unix:{}", socket.display());
        qemu.with_qmp(|q| {
            q.migrate_set_capabilities(&[("multifd", multifd > 0)])?;
            if multifd > 0 {
                q.migrate_set_parameters(serde_json::json!({ "multifd-channels": multifd }))?;
            }
            q.migrate_incoming(&uri)
        })?;
        Ok(())
    }

    /// The TLS configuration for a data connection that names this migration, or `None`
    /// when it must be refused (expired, or the channel already reached QEMU).
    pub fn data_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let open = *lock(&self.state) == DestinationState::Prepared
            || (lock(&self.peer).is_none() && !self.state().is_final());
        if Instant::now() > self.expires || !open {
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

    /// What this half tells the source over the peer link.
    fn peer_message(&self) -> PeerMessage {
        PeerMessage {
            state: MigrationState::Destination(self.state()),
            cause: lock(&self.cause).clone(),
        }
    }

    /// Takes the peer link the source dialed (direct, tunnel) or we dialed (reverse).
    fn start_peer(self: &Arc<Self>, daemon: &Arc<Daemon>, c: DataConn) -> Result<()> {
        let mut slot = lock(&self.peer);
        if slot.is_some() {
            return Err(DaemonError::Denied(format!(
                "{}: migration {} already has its peer link; refused",
                c.peer, self.id
            )));
        }
        let own = Arc::downgrade(self);
        let me = Arc::downgrade(self);
        let d = Arc::downgrade(daemon);
        let link = PeerLink::start(
            c,
            &self.id.as_str()[..8],
            move || own.upgrade().map(|m| m.peer_message()),
            move |ev| {
                if let (Some(m), Some(d)) = (me.upgrade(), d.upgrade()) {
                    m.on_peer(&d, ev);
                }
            },
        )
        .map_err(|e| DaemonError::Internal(format!("cannot start the peer link: {e}")))?;
        *slot = Some(link);
        Ok(())
    }

    /// What the source says: a source that rolled back means our QEMU will never get the
    /// rest, so tear down now rather than wait for the streams to time out.
    fn on_peer(&self, daemon: &Daemon, ev: PeerEvent) {
        match ev {
            PeerEvent::Message(PeerMessage {
                state: MigrationState::Source(SourceState::RolledBack),
                cause,
            }) if !self.state().is_final() && self.state() != DestinationState::Loaded => {
                let why = format!(
                    "the source rolled back{}",
                    cause.map(|c| format!(": {c}")).unwrap_or_default()
                );
                self.abort(daemon, &why);
            }
            PeerEvent::Message(_) => {}
            PeerEvent::Lost(why) => {
                tracing::info!(migration = %self.id, "{why}");
            }
        }
    }

    /// Takes one authenticated data connection the source dialed: a direct stream (held
    /// until all have arrived, then handed to QEMU together) or the tunnel.
    pub fn accept_data(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        pre: Preamble,
        c: DataConn,
    ) -> Result<()> {
        if pre.kind == StreamKind::Peer {
            return self.start_peer(daemon, c);
        }
        match pre.transport {
            Transport::Direct => {
                let complete = {
                    let mut st = lock(&self.streams);
                    if st.attached {
                        return Err(DaemonError::Denied(format!(
                            "{}: migration {} already has its streams; refused",
                            c.peer, self.id
                        )));
                    }
                    st.slots.put(Transport::Direct, &pre, self.n_streams, c)?;
                    st.slots.take_complete()
                };
                match complete {
                    Some((t, conns)) => self.attach(daemon, t, conns),
                    None => Ok(()),
                }
            }
            Transport::Tunnel => self.accept_tunnel(daemon, pre, c),
            Transport::Reverse => Err(DaemonError::Denied(format!(
                "{} offered a reverse stream to the destination of migration {}; the destination dials those itself",
                c.peer, self.id
            ))),
        }
    }

    fn accept_tunnel(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        pre: Preamble,
        c: DataConn,
    ) -> Result<()> {
        if usize::from(pre.streams) != self.n_streams {
            return Err(DaemonError::Channel(format!(
                "{} opened a tunnel for {} streams, but this migration has {}",
                c.peer, pre.streams, self.n_streams
            )));
        }
        {
            let mut st = lock(&self.streams);
            if st.attached {
                return Err(DaemonError::Denied(format!(
                    "{}: migration {} already has its streams; refused",
                    c.peer, self.id
                )));
            }
            st.slots.clear();
            st.attached = true;
            st.transport = Some(Transport::Tunnel);
        }
        self.advance(DestinationEvent::Attach)?;
        let socket = self.incoming_socket.clone();
        let n = self.n_streams;
        // Streams arrive in the order the source opened them, main channel first, which
        // is the order QEMU must see them in.
        let accept = Box::new(move |k: u16| -> std::result::Result<UnixStream, String> {
            if usize::from(k) >= n {
                return Err(format!("stream {k} does not exist ({n} streams)"));
            }
            UnixStream::connect(&socket).map_err(|e| {
                format!(
                    "cannot reach the incoming QEMU at {}: {e}",
                    socket.display()
                )
            })
        });
        let t = Tunnel::server(
            c.conn,
            c.sock,
            &c.peer,
            self.meter.clone(),
            self.filters,
            accept,
        )
        .map_err(|e| DaemonError::Channel(e.to_string()))?;
        *lock(&self.tunnel_stop) = Some(t.stop_handle());
        *lock(&self.tunnel) = Some(t);
        tracing::info!(migration = %self.id, peer = %c.peer, "tunnel established");
        self.spawn_watcher(daemon)
    }

    /// `connect` for reverse: dials every stream to the source, then hands them to QEMU.
    pub fn connect_reverse(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        cookie: &Cookie,
        timeout: Duration,
    ) -> Result<()> {
        let addr = cookie.source_data_address.clone().ok_or_else(|| {
            DaemonError::BadRequest("the cookie names no data address for the source".into())
        })?;
        {
            let mut st = lock(&self.streams);
            if st.attached {
                return Err(DaemonError::BadRequest(format!(
                    "migration {} already has its streams",
                    self.id
                )));
            }
            st.slots.clear();
        }
        let cfg = self
            .trust
            .client_config(daemon, &self.identity, &addr, "source")?;
        let n16 = u16::try_from(self.n_streams)
            .map_err(|_| DaemonError::BadRequest("too many streams".into()))?;
        let mut conns = Vec::with_capacity(self.n_streams);
        for k in 0..n16 {
            let pre = Preamble {
                transport: Transport::Reverse,
                stream: k,
                streams: n16,
                kind: StreamKind::Qemu,
            };
            conns.push(channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?);
        }
        if cookie.peer_link {
            let pre = Preamble {
                transport: Transport::Reverse,
                stream: 0,
                streams: n16,
                kind: StreamKind::Peer,
            };
            let link = channel::dial(&self.id, &addr, cfg, pre, timeout)?;
            self.start_peer(daemon, link)?;
        }
        self.attach(daemon, Transport::Reverse, conns)
    }

    /// Connects every stream to QEMU, main channel first, and starts a pump for each.
    fn attach(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        transport: Transport,
        conns: Vec<DataConn>,
    ) -> Result<()> {
        {
            let mut st = lock(&self.streams);
            if st.attached {
                return Err(DaemonError::Denied(format!(
                    "migration {} already has its streams",
                    self.id
                )));
            }
            st.attached = true;
            st.transport = Some(transport);
        }
        self.advance(DestinationEvent::Attach)?;
        for (k, c) in conns.into_iter().enumerate() {
            let local = UnixStream::connect(&self.incoming_socket).map_err(|e| {
                DaemonError::Qemu(format!(
                    "cannot reach the incoming QEMU at {}: {e}",
                    self.incoming_socket.display()
                ))
            });
            let local = match local {
                Ok(l) => l,
                Err(e) => {
                    self.record_end(Err(e.to_string()));
                    return Err(e);
                }
            };
            let stop = StopHandle::new(&local, &c.sock)
                .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
            lock(&self.stops).push(stop.clone());
            lock(&self.streams).running += 1;
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pump-dst-{k}"))
                .spawn(move || {
                    let DataConn { conn, sock, peer } = c;
                    let r = pump::pump_with(local, conn, sock, &peer, &me.meter, &stop, me.filters)
                        .map(|_| ())
                        .map_err(|e| format!("data stream {k} with {peer}: {e}"));
                    lock(&me.streams).running -= 1;
                    me.record_end(r);
                });
            if let Err(e) = spawned {
                lock(&self.streams).running -= 1;
                return Err(DaemonError::Internal(format!("cannot start pump: {e}")));
            }
        }
        tracing::info!(migration = %self.id, streams = self.n_streams, "data streams reached QEMU");
        self.spawn_watcher(daemon)
    }

    fn record_end(&self, r: std::result::Result<(), String>) {
        let mut st = lock(&self.streams);
        match r {
            Ok(()) => st.finished += 1,
            Err(e) => {
                if st.error.is_none() {
                    st.error = Some(e);
                }
            }
        }
        self.changed.notify_all();
    }

    /// Starts the watcher: it follows the incoming QEMU until it has loaded the whole
    /// state or failed, and tells the source at once either way.
    fn spawn_watcher(self: &Arc<Self>, daemon: &Arc<Daemon>) -> Result<()> {
        let me = self.clone();
        let d = daemon.clone();
        std::thread::Builder::new()
            .name(format!("migrate-dst-{}", &self.id.as_str()[..8]))
            .spawn(move || me.watch(&d))
            .map(|_| ())
            .map_err(|e| DaemonError::Internal(format!("cannot start the watcher: {e}")))
    }

    fn watch(self: Arc<Self>, daemon: &Daemon) {
        match self.wait_loaded() {
            Ok(()) => {
                if self.advance(DestinationEvent::QemuLoaded).is_err() {
                    return; // aborted meanwhile
                }
                tracing::info!(migration = %self.id, "the destination QEMU holds the whole state");
                // With a controller, `finish` resumes; without one, we do, as soon as
                // the migration is unattended (detached, or its lease ran out).
                loop {
                    if self.state() != DestinationState::Loaded {
                        return;
                    }
                    if self.lease.unattended() {
                        let how = if self.lease.detached() {
                            "detached: the destination finished on its own".to_string()
                        } else {
                            format!(
                                "the controller's lease ({} s) expired after the destination \
                                 loaded the whole state; it finished on its own",
                                self.lease.secs()
                            )
                        };
                        match self.resume(daemon) {
                            Ok(_) => *lock(&self.note) = Some(how),
                            Err(e) => self.abort(daemon, &e.to_string()),
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) => {
                if !self.state().is_final() {
                    self.abort(daemon, &e.to_string());
                }
            }
        }
    }

    /// Waits until QEMU loaded the whole state. QEMU is the authority on that: a stream
    /// that breaks at the very end (QEMU 7.2 closes or resets multifd sockets once it has
    /// what it needs) must not fail a migration QEMU completed; one that breaks before
    /// fails it, once QEMU has had a moment to say so itself.
    fn wait_loaded(&self) -> Result<()> {
        let deadline = Instant::now() + LOAD_TIMEOUT;
        let mut broken_since: Option<(Instant, String)> = None;
        let _held = self.qemu.hold();
        loop {
            if self.state().is_final() {
                return Err(DaemonError::Cancelled(
                    lock(&self.cause)
                        .clone()
                        .unwrap_or_else(|| "aborted".into()),
                ));
            }
            let stream_error = lock(&self.streams)
                .error
                .clone()
                .or_else(|| lock(&self.tunnel).as_ref().and_then(|t| t.streams_done().1));
            if let (Some(e), None) = (&stream_error, &broken_since) {
                broken_since = Some((Instant::now(), e.clone()));
            }
            let info = match self.qemu.with_qmp(|q| q.query_migrate()) {
                Ok(info) => info,
                Err(e) => return Err(self.qemu_gone(e)),
            };
            match info.status {
                QemuMigrationStatus::Completed => return Ok(()),
                QemuMigrationStatus::Failed | QemuMigrationStatus::Cancelled => {
                    let qemu = info.error_desc.unwrap_or_else(|| "no reason given".into());
                    return Err(DaemonError::Qemu(match &broken_since {
                        Some((_, e)) => {
                            format!("the destination QEMU failed to load the state: {qemu} ({e})")
                        }
                        None => format!("the destination QEMU failed to load the state: {qemu}"),
                    }));
                }
                _ => {}
            }
            if let Some((since, e)) = &broken_since {
                if since.elapsed() > BROKEN_GRACE {
                    return Err(DaemonError::Channel(e.clone()));
                }
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::Timeout(format!(
                    "the destination QEMU had not loaded the state after {} s (status {})",
                    LOAD_TIMEOUT.as_secs(),
                    info.status.as_str()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The error for a QEMU that stopped answering: for a managed one, how it exited and
    /// the end of its stderr (where QEMU says why a load failed).
    fn qemu_gone(&self, e: DaemonError) -> DaemonError {
        // Give the process a moment to be reaped so its exit status is known.
        for _ in 0..20 {
            if let Some(why) = self.qemu.exit_reason() {
                return DaemonError::Qemu(format!(
                    "the destination QEMU exited during the migration: {why}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        DaemonError::Qemu(format!(
            "the destination QEMU stopped answering during the migration: {e}"
        ))
    }

    /// `finish`: waits until QEMU loaded the whole state, then resumes the guest if it ran
    /// on the source.
    pub fn finish(&self, daemon: &Daemon) -> Result<MigrationStatus> {
        let deadline = Instant::now() + LOAD_TIMEOUT + BROKEN_GRACE;
        let mut st = lock(&self.state);
        loop {
            match *st {
                DestinationState::Loaded => break,
                DestinationState::Finished => {
                    drop(st);
                    return Ok(self.finished_status());
                }
                DestinationState::Aborted => {
                    let cause = lock(&self.cause).clone().unwrap_or_default();
                    return Err(DaemonError::Qemu(cause));
                }
                DestinationState::Prepared => {
                    return Err(DaemonError::BadRequest(format!(
                        "migration {} never got its streams",
                        self.id
                    )))
                }
                DestinationState::Receiving => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DaemonError::Timeout(format!(
                    "the destination QEMU had not loaded the state after {} s",
                    LOAD_TIMEOUT.as_secs()
                )));
            }
            st = match self.state_changed.wait_timeout(st, left.min(POLL * 20)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(st);
        self.resume(daemon)
    }

    /// Ends the streams (QEMU needs nothing more from them), resumes the guest if it ran
    /// on the source, and leaves the migration finished.
    fn resume(&self, daemon: &Daemon) -> Result<MigrationStatus> {
        // QEMU completed; the streams end when the source closes its side. Whatever
        // happens to them now cannot take anything from QEMU: note it, and go on.
        let tunnel = lock(&self.tunnel).take();
        if let Some(t) = tunnel {
            if let Err(e) = t.wait_streams(self.n_streams, DRAIN_TIMEOUT) {
                tracing::warn!(migration = %self.id, "after QEMU completed: {e}");
            }
            if let Err(e) = t.close(DRAIN_TIMEOUT) {
                tracing::warn!(migration = %self.id, "tunnel did not close cleanly: {e}");
            }
        }
        let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let st = lock(&self.streams);
            if st.running == 0 || Instant::now() >= drain_deadline {
                if let Some(e) = &st.error {
                    tracing::warn!(migration = %self.id, "after QEMU completed: {e}");
                }
                break;
            }
            drop(st);
            std::thread::sleep(POLL);
        }
        for s in lock(&self.stops).iter() {
            s.stop();
        }
        let status = self.qemu.with_qmp(|q| q.query_status())?;
        if self.source_running && !status.running {
            self.qemu.with_qmp(|q| q.cont())?;
        }
        let status = self.qemu.with_qmp(|q| q.query_status())?;
        self.advance(DestinationEvent::Resume)?;
        self.end(daemon);
        tracing::info!(migration = %self.id, state = %status.status, "migration finished on the destination");
        Ok(self.finished_status())
    }

    fn finished_status(&self) -> MigrationStatus {
        MigrationStatus {
            state: Some(MigrationState::Destination(self.state())),
            qemu_status: "completed".into(),
            finished: true,
            channel_bytes: self.meter.forward() + self.meter.backward(),
            transport: lock(&self.streams).transport,
            note: lock(&self.note).clone(),
            ..Default::default()
        }
    }

    /// Leaves the in-flight table for the recent one; the peer link says its last word
    /// (the final state) and closes.
    fn end(&self, daemon: &Daemon) {
        let _ = std::fs::remove_file(&self.incoming_socket);
        if let Some(p) = lock(&self.peer).take() {
            p.stop();
        }
        lock(&daemon.migrations.destinations).remove(&self.id);
        daemon.migrations.remember(self.summary());
    }

    /// Renews the lease (a controller's `status` with `renew`).
    pub fn renew(&self) {
        self.lease.renew();
    }

    pub fn detach(&self) {
        self.lease.detach();
    }

    /// Acts on an expired lease: a destination that never got its streams is torn down;
    /// one receiving waits for its QEMU to say (the watcher finishes or aborts).
    pub fn check_lease(&self, daemon: &Daemon) {
        if !self.lease.take_expired() {
            return;
        }
        match self.state().on_lease_expiry() {
            vmferry_proto::LeaseAction::RollBack => self.abort(
                daemon,
                &format!(
                    "the controller's lease ({} s) expired before the streams arrived",
                    self.lease.secs()
                ),
            ),
            vmferry_proto::LeaseAction::FinishAlone => {
                tracing::warn!(migration = %self.id, "the controller's lease expired; the destination carries on alone");
            }
            vmferry_proto::LeaseAction::Nothing => {}
        }
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
        for s in lock(&self.stops).iter() {
            s.stop();
        }
        if let Some(t) = lock(&self.tunnel_stop).as_ref() {
            t.stop();
        }
        if let (QemuHandle::Managed(v), Some(n)) = (&self.qemu, &self.vm_name) {
            v.kill();
            daemon.vms.forget(n);
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
