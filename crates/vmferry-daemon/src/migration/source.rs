//! The source half of a migration: `begin`, `perform` (and its background job), `status`,
//! `confirm`.
//!
//! Invariant: the source guest keeps running unless the destination confirmed it has the
//! whole state. Every path out of a failed or cancelled migration ends in `confirm(false)`,
//! the job's own failure handling, or an expired lease, all of which resume the guest if
//! QEMU paused it. After QEMU completed, the source QEMU is stopped only once the
//! destination runs the guest (confirm, or the destination's word over the peer link),
//! and resumed only once the destination has aborted.

use super::channel::{self, DataConn, Slots, Trust};
use super::lease::Lease;
use super::peer::{PeerEvent, PeerLink};
use super::{QemuHandle, UNLIMITED_BANDWIDTH};
use crate::error::{DaemonError, Result};
use crate::server::Daemon;
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
    /// The tunnel, kept open after QEMU completed until `confirm`.
    tunnel_keep: Mutex<Option<Tunnel>>,
}

impl SourceMigration {
    /// `begin`: describes the VM, makes this migration's identity, returns the first cookie.
    pub fn begin(
        daemon: &Daemon,
        id: MigrationId,
        vm: VmRef,
        mut options: MigrationOptions,
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
        };
        let status = qemu.with_qmp(|q| q.query_status())?;
        let active = qemu.with_qmp(|q| q.query_migrate())?;
        if active.status.is_active() {
            return Err(DaemonError::Exists(format!(
                "{} is already migrating ({:?})",
                qemu.describe(),
                active.status
            )));
        }
        {
            let busy = lock(&daemon.migrations.sources)
                .values()
                .any(|m| m.qemu.same_qemu(&qemu) && !m.state().is_final());
            if busy {
                return Err(DaemonError::Exists(format!(
                    "{} is already the source of a migration",
                    qemu.describe()
                )));
            }
        }
        let identity = EphemeralIdentity::generate(&format!("vmferry-source-{id}"))
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
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
            source_machine: qemu.with_qmp(|q| q.machine_facts()).ok().map(|f| {
                vmferry_proto::MachineShape {
                    ram_bytes: f.ram_bytes,
                    machine: f.machine,
                }
            }),
            peer_link: false,
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
            note: Mutex::new(None),
            status: Mutex::new(MigrationStatus {
                qemu_status: "none".into(),
                ..Default::default()
            }),
            finished: std::sync::Condvar::new(),
            meter: Arc::new(Meter::default()),
            stops: Mutex::new(Vec::new()),
            pump_error: Mutex::new(None),
            cancel: AtomicBool::new(false),
            started_qemu: AtomicBool::new(false),
            socket_path,
            held: Mutex::new(Held::Nothing),
            held_changed: Condvar::new(),
            reverse_config: Mutex::new(None),
            tunnel_stop: Mutex::new(None),
            tunnel_keep: Mutex::new(None),
        };
        let mut sources = lock(&daemon.migrations.sources);
        if sources.contains_key(&id) {
            return Err(DaemonError::Exists(format!(
                "migration {id} already exists"
            )));
        }
        sources.insert(id, Arc::new(m));
        Ok(cookie)
    }

    /// `perform`: dials every data stream, points QEMU at our unix socket, and leaves a
    /// job pumping and watching QEMU. Returns once the migration is under way.
    pub fn perform(self: &Arc<Self>, daemon: &Arc<Daemon>, cookie: &Cookie) -> Result<()> {
        self.advance(SourceEvent::Perform)?;
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

    fn peer_message(&self) -> PeerMessage {
        PeerMessage {
            state: MigrationState::Source(self.state()),
            cause: lock(&self.status).error.clone(),
        }
    }

    /// Starts the peer link made by `connect`, if the controller asked for one.
    fn start_peer(self: &Arc<Self>, daemon: &Arc<Daemon>) -> Result<()> {
        let Some(c) = lock(&self.peer_pending).take() else {
            return Ok(());
        };
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
        *lock(&self.peer) = Some(link);
        Ok(())
    }

    /// What the destination says. Its failure stops our QEMU's migration at once, with
    /// its cause; its success lets an unattended source stop its QEMU.
    fn on_peer(&self, daemon: &Daemon, ev: PeerEvent) {
        let state = self.state();
        match ev {
            PeerEvent::Message(PeerMessage {
                state: MigrationState::Destination(DestinationState::Aborted),
                cause,
            }) => {
                let cause = cause.unwrap_or_else(|| "no reason given".into());
                lock(&self.peer_failure).get_or_insert(cause.clone());
                if state == SourceState::Completed {
                    self.fail(&format!(
                        "the destination aborted after the source sent everything: {cause}"
                    ));
                    if self.lease.unattended() {
                        self.end(daemon);
                    }
                } else if state.before_switchover() {
                    self.cancel.store(true, Ordering::SeqCst);
                }
            }
            PeerEvent::Message(PeerMessage {
                state: MigrationState::Destination(DestinationState::Finished),
                ..
            }) if state == SourceState::Completed && self.lease.unattended() => {
                self.confirm_alone(daemon);
            }
            PeerEvent::Message(_) => {}
            PeerEvent::Lost(why) => {
                if state == SourceState::Performing {
                    lock(&self.peer_failure).get_or_insert(why);
                    self.cancel.store(true, Ordering::SeqCst);
                } else {
                    tracing::info!(migration = %self.id, "{why}");
                }
            }
        }
    }

    /// Stops the source QEMU once the destination runs the guest, with no controller.
    fn confirm_alone(&self, daemon: &Daemon) {
        let how = if self.lease.detached() {
            "detached: the daemons finished the migration on their own".to_string()
        } else {
            format!(
                "the controller's lease ({} s) expired after the switch-over; the daemons \
                 finished the migration on their own",
                self.lease.secs()
            )
        };
        *lock(&self.note) = Some(how);
        if let Err(e) = self.confirm(daemon, true) {
            tracing::error!(migration = %self.id, "cannot finish alone: {e}");
        }
    }

    /// Renews the lease (a controller's `status` with `renew`).
    pub fn renew(&self) {
        self.lease.renew();
    }

    pub fn detach(&self) {
        self.lease.detach();
    }

    /// Acts on an expired lease by the state the source is in; removes an unattended
    /// migration that is over.
    pub fn check_lease(&self, daemon: &Daemon) {
        if self.lease.take_expired() {
            match self.state().on_lease_expiry() {
                LeaseAction::RollBack => {
                    *lock(&self.note) = Some(format!(
                        "the controller's lease ({} s) expired before the switch-over; \
                         rolled back: the source VM keeps running",
                        self.lease.secs()
                    ));
                    self.cancel.store(true, Ordering::SeqCst);
                    self.fail("the controller went away (its lease expired)");
                }
                LeaseAction::FinishAlone => {
                    let last = lock(&self.peer).as_ref().and_then(|p| p.last());
                    match last.map(|m| m.state) {
                        Some(MigrationState::Destination(DestinationState::Finished)) => {
                            self.confirm_alone(daemon)
                        }
                        _ => {
                            *lock(&self.note) = Some(
                                "the controller's lease expired after the switch-over; \
                                 waiting for the destination to resume the guest"
                                    .into(),
                            );
                            tracing::warn!(migration = %self.id, "lease expired after the switch-over; waiting for the destination");
                        }
                    }
                }
                LeaseAction::Nothing => {}
            }
        }
        if self.state().is_final() && self.lease.unattended() {
            self.end(daemon);
        }
    }

    /// Leaves the in-flight table for the recent one.
    fn end(&self, daemon: &Daemon) {
        if let Some(p) = lock(&self.peer).take() {
            p.stop();
        }
        let removed = lock(&daemon.migrations.sources).remove(&self.id);
        if removed.is_some() {
            daemon.migrations.remember(self.summary());
        }
    }

    fn streams(&self) -> usize {
        1 + self.options.multifd as usize
    }

    fn trust(&self, cookie: &Cookie) -> Trust {
        Trust {
            auth: self.options.data_auth.clone(),
            peer_fingerprint: cookie.destination_fingerprint.clone(),
        }
    }

    /// `connect`: makes the data channel for one transport before QEMU sends a byte, so a
    /// channel that cannot be made fails while the guest is untouched. Whatever an
    /// earlier attempt left is dropped first; a failed attempt leaves nothing behind.
    pub fn connect(
        &self,
        daemon: &Daemon,
        cookie: &Cookie,
        transport: Transport,
        timeout: Duration,
    ) -> Result<()> {
        cookie.check().map_err(DaemonError::BadRequest)?;
        if !matches!(self.state(), SourceState::Begun | SourceState::Connected) {
            return Err(DaemonError::BadRequest(format!(
                "migration {} is already under way; its channel is fixed",
                self.id
            )));
        }
        self.make_channel(daemon, cookie, transport, timeout)?;
        self.advance(SourceEvent::Connect)?;
        Ok(())
    }

    fn make_channel(
        &self,
        daemon: &Daemon,
        cookie: &Cookie,
        transport: Transport,
        timeout: Duration,
    ) -> Result<()> {
        *lock(&self.held) = Held::Nothing;
        *lock(&self.reverse_config) = None;
        *lock(&self.peer_pending) = None;
        let n = self.streams();
        let n16 =
            u16::try_from(n).map_err(|_| DaemonError::BadRequest("too many streams".into()))?;
        let trust = self.trust(cookie);
        let held = match transport {
            Transport::Direct => {
                let addr = cookie.data_address.clone().ok_or_else(|| {
                    DaemonError::BadRequest(
                        "the cookie names no data address for the destination".into(),
                    )
                })?;
                let cfg = trust.client_config(daemon, &self.identity, &addr, "destination")?;
                let mut slots = Slots::default();
                for k in 0..n16 {
                    let pre = Preamble {
                        transport,
                        stream: k,
                        streams: n16,
                        kind: StreamKind::Qemu,
                    };
                    let c = channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?;
                    slots.put(transport, &pre, n, c)?;
                }
                self.dial_peer(cookie, &addr, cfg, transport, n16, timeout)?;
                Held::Conns(slots)
            }
            Transport::Tunnel => {
                let addr = cookie.destination_control_address.clone().ok_or_else(|| {
                    DaemonError::BadRequest(
                        "the cookie names no control address for the destination to tunnel to"
                            .into(),
                    )
                })?;
                let cfg = trust.client_config(daemon, &self.identity, &addr, "destination")?;
                let pre = Preamble {
                    transport,
                    stream: 0,
                    streams: n16,
                    kind: StreamKind::Qemu,
                };
                let c = channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?;
                self.dial_peer(cookie, &addr, cfg, transport, n16, timeout)?;
                let t = Tunnel::client(c.conn, c.sock, &c.peer, self.meter.clone(), self.filters())
                    .map_err(|e| DaemonError::Channel(e.to_string()))?;
                *lock(&self.tunnel_stop) = Some(t.stop_handle());
                Held::Tunnel(t)
            }
            Transport::Reverse => {
                let cfg = trust.server_config(
                    daemon,
                    &self.identity,
                    "destination",
                    cookie.data_address.as_deref(),
                )?;
                *lock(&self.reverse_config) = Some(cfg);
                Held::Conns(Slots::default())
            }
        };
        *lock(&self.held) = held;
        Ok(())
    }

    /// Dials the peer link beside the streams, when the controller asked for one.
    fn dial_peer(
        &self,
        cookie: &Cookie,
        addr: &str,
        cfg: Arc<rustls::ClientConfig>,
        transport: Transport,
        streams: u16,
        timeout: Duration,
    ) -> Result<()> {
        if !cookie.peer_link {
            return Ok(());
        }
        let pre = Preamble {
            transport,
            stream: 0,
            streams,
            kind: StreamKind::Peer,
        };
        *lock(&self.peer_pending) = Some(channel::dial(&self.id, addr, cfg, pre, timeout)?);
        Ok(())
    }

    /// The TLS configuration for a reverse data connection naming this migration, or
    /// `None` when none is expected.
    pub fn data_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        if !matches!(self.state(), SourceState::Begun | SourceState::Connected) {
            return None;
        }
        let cfg = lock(&self.reverse_config).clone()?;
        match &*lock(&self.held) {
            Held::Conns(s) if !s.complete() || lock(&self.peer_pending).is_none() => Some(cfg),
            _ => None,
        }
    }

    /// Takes one reverse data connection the destination dialed.
    pub fn accept_reverse(&self, pre: Preamble, c: DataConn) -> Result<()> {
        if pre.transport != Transport::Reverse {
            return Err(DaemonError::Denied(format!(
                "{} offered a {} stream to the source of migration {}; only reverse streams are taken here",
                c.peer, pre.transport, self.id
            )));
        }
        let n = self.streams();
        let mut held = lock(&self.held);
        match &mut *held {
            Held::Conns(_) if pre.kind == StreamKind::Peer => {
                let mut p = lock(&self.peer_pending);
                if p.is_some() {
                    return Err(DaemonError::Denied(format!(
                        "{} tried to open the peer link of migration {} a second time; refused",
                        c.peer, self.id
                    )));
                }
                *p = Some(c);
            }
            Held::Conns(slots) => slots.put(Transport::Reverse, &pre, n, c)?,
            _ => {
                return Err(DaemonError::Denied(format!(
                    "migration {} expects no reverse connection",
                    self.id
                )))
            }
        }
        self.held_changed.notify_all();
        Ok(())
    }

    /// The channel `connect` made, complete; waits a little for reverse connections.
    fn take_carrier(&self, daemon: &Daemon, cookie: &Cookie) -> Result<(Transport, Carrier)> {
        if matches!(&*lock(&self.held), Held::Nothing) {
            // A controller that did not negotiate: dial direct as the spine did.
            self.make_channel(daemon, cookie, Transport::Direct, DIAL_TIMEOUT)?;
        }
        let deadline = Instant::now() + REVERSE_WAIT;
        let mut held = lock(&self.held);
        loop {
            match std::mem::take(&mut *held) {
                Held::Tunnel(t) => return Ok((Transport::Tunnel, Carrier::Tunnel(t))),
                Held::Conns(mut slots) => {
                    if let Some((t, conns)) = slots.take_complete() {
                        *lock(&self.reverse_config) = None;
                        return Ok((t, Carrier::Conns(conns)));
                    }
                    *held = Held::Conns(slots);
                }
                Held::Nothing => {
                    return Err(DaemonError::BadRequest(
                        "no data channel was made for this migration".into(),
                    ))
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DaemonError::Timeout(format!(
                    "the destination's reverse connections did not all arrive within {} s",
                    REVERSE_WAIT.as_secs()
                )));
            }
            held = match self.held_changed.wait_timeout(held, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn start(self: &Arc<Self>, daemon: &Arc<Daemon>, cookie: &Cookie) -> Result<()> {
        cookie.check().map_err(DaemonError::BadRequest)?;
        let (transport, carrier) = self.take_carrier(daemon, cookie)?;
        self.start_peer(daemon)?;
        {
            let mut st = lock(&self.status);
            st.streams = self.streams() as u32;
            st.transport = Some(transport);
            st.transport_notes = cookie.transport_notes.clone();
            st.data_path = daemon.data_path.clone();
            st.compression = self.options.compress.to_string();
        }

        let _ = std::fs::remove_file(&self.socket_path);
        let listener = UnixListener::bind(&self.socket_path).map_err(|e| {
            DaemonError::Internal(format!(
                "cannot listen on {}: {e}",
                self.socket_path.display()
            ))
        })?;

        let multifd = self.options.multifd;
        let bandwidth = if self.options.max_bandwidth == 0 {
            UNLIMITED_BANDWIDTH
        } else {
            self.options.max_bandwidth
        };
        let downtime = self.options.downtime_limit_ms;
        let uri = format!("unix:{}", self.socket_path.display());
        self.qemu.with_qmp(|q| {
            q.migrate_set_capabilities(&[("multifd", multifd > 0)])?;
            let mut params = serde_json::json!({ "max-bandwidth": bandwidth });
            if multifd > 0 {
                params["multifd-channels"] = serde_json::json!(multifd);
            }
            if downtime > 0 {
                params["downtime-limit"] = serde_json::json!(downtime);
            }
            q.migrate_set_parameters(params)?;
            q.migrate(&uri)
        })?;
        self.started_qemu.store(true, Ordering::SeqCst);
        lock(&self.status).qemu_status = "setup".into();

        let me = self.clone();
        let d = daemon.clone();
        std::thread::Builder::new()
            .name(format!("migrate-src-{}", &self.id.as_str()[..8]))
            .spawn(move || me.run(&d, listener, carrier))
            .map_err(|e| DaemonError::Internal(format!("cannot start migration job: {e}")))?;
        Ok(())
    }

    /// The background job: accept QEMU's connections, carry each, watch QEMU until the end.
    fn run(self: Arc<Self>, daemon: &Daemon, listener: UnixListener, carrier: Carrier) {
        let outcome = match self.accept_and_carry(&listener, carrier) {
            Ok(running) => match self.watch(match &running {
                Running::Tunnel(t) => Some(t),
                Running::Pumps(_) => None,
            }) {
                Ok(()) => Ok(running),
                Err(e) => {
                    if let Running::Tunnel(t) = &running {
                        t.stop();
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        drop(listener);
        let _ = std::fs::remove_file(&self.socket_path);
        match outcome {
            Ok(running) => {
                // QEMU has sent everything into our sockets; wait for the channel to hand
                // it all to the destination before calling it complete.
                // QEMU says it sent everything. Whether it all arrived is the destination
                // QEMU's to say (finish checks it); a stream that ends badly now is noted,
                // and never turns a migration QEMU completed into a failure here.
                if let Err(e) = self.drain(running) {
                    tracing::warn!(migration = %self.id, "after QEMU completed: {e}");
                }
                if let Err(e) = self.advance(SourceEvent::QemuCompleted) {
                    // Rolled back meanwhile (an expired lease, the destination aborting).
                    tracing::warn!(migration = %self.id, "{e}");
                    return;
                }
                let mut st = lock(&self.status);
                st.qemu_status = "completed".into();
                st.channel_bytes = self.meter.forward();
                st.wire_bytes = self.meter.wire_forward();
                st.finished = true;
                self.finished.notify_all();
            }
            Err(e) => {
                self.fail(&e.to_string());
                if self.lease.unattended() {
                    self.end(daemon);
                }
            }
        }
    }

    /// Waits until everything QEMU sent went out to the destination. Only our direction
    /// counts: the destination QEMU closes its ends when it is done, which may be after
    /// `finish`; the streams stay up until `confirm`.
    fn drain(&self, running: Running) -> std::result::Result<(), String> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        match running {
            Running::Pumps(pumps) => loop {
                let sent = {
                    let stops = lock(&self.stops);
                    stops
                        .iter()
                        .zip(&pumps)
                        .all(|(s, p)| s.forward_done() || p.is_finished())
                };
                if sent {
                    return match lock(&self.pump_error).clone() {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the data streams did not drain within {} s",
                        DRAIN_TIMEOUT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            },
            Running::Tunnel(t) => {
                let r = t.wait_streams(self.streams(), TUNNEL_DRAIN);
                *lock(&self.tunnel_keep) = Some(t);
                r
            }
        }
    }

    fn accept_and_carry(
        self: &Arc<Self>,
        listener: &UnixListener,
        carrier: Carrier,
    ) -> Result<Running> {
        listener
            .set_nonblocking(true)
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let deadline = Instant::now() + QEMU_CONNECT_TIMEOUT;
        let n = self.streams();
        let (mut conns, tunnel) = match carrier {
            Carrier::Conns(c) => (c.into_iter(), None),
            Carrier::Tunnel(t) => (Vec::new().into_iter(), Some(t)),
        };
        let mut pumps = Vec::new();
        for k in 0..n {
            let local = loop {
                if self.cancel.load(Ordering::SeqCst) {
                    return Err(DaemonError::Cancelled(
                        "cancelled before QEMU connected".into(),
                    ));
                }
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(DaemonError::Internal(format!("accept: {e}"))),
                }
                // QEMU may fail before it connects (e.g. bad parameters): ask it.
                if let Ok(info) = self.qemu.with_qmp(|q| q.query_migrate()) {
                    if info.status == QemuMigrationStatus::Failed {
                        return Err(DaemonError::Qemu(format!(
                            "migration failed: {}",
                            info.error_desc.unwrap_or_else(|| "no reason given".into())
                        )));
                    }
                }
                if Instant::now() >= deadline {
                    return Err(DaemonError::Timeout(format!(
                        "QEMU opened {k} of its migration streams within {} s",
                        QEMU_CONNECT_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let _ = local.set_nonblocking(false);
            match &tunnel {
                Some(t) => {
                    let k16 = u16::try_from(k)
                        .map_err(|_| DaemonError::Internal("too many streams".into()))?;
                    t.open(k16, local)
                        .map_err(|e| DaemonError::Channel(e.to_string()))?;
                }
                None => {
                    let c = conns.next().ok_or_else(|| {
                        DaemonError::Internal(format!("no data connection for stream {k}"))
                    })?;
                    pumps.push(self.spawn_pump(k, local, c)?);
                }
            }
        }
        Ok(match tunnel {
            Some(t) => Running::Tunnel(t),
            None => Running::Pumps(pumps),
        })
    }

    fn filters(&self) -> Filters {
        Filters {
            compress: self.options.compress,
        }
    }

    fn spawn_pump(
        self: &Arc<Self>,
        k: usize,
        local: UnixStream,
        stream: DataConn,
    ) -> Result<std::thread::JoinHandle<()>> {
        let DataConn { conn, sock, peer } = stream;
        let stop = StopHandle::new(&local, &sock)
            .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
        lock(&self.stops).push(stop.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("pump-src-{k}"))
            .spawn(move || {
                let r: std::result::Result<PumpStats, _> =
                    pump::pump_with(local, conn, sock, &peer, &me.meter, &stop, me.filters());
                if let Err(e) = r {
                    let mut pe = lock(&me.pump_error);
                    if pe.is_none() {
                        *pe = Some(format!("data stream {k}: {e}"));
                    }
                }
            })
            .map_err(|e| DaemonError::Internal(format!("cannot start pump: {e}")))
    }

    /// Polls QEMU until the migration ends; cancels QEMU's side if asked or if a stream
    /// broke.
    fn watch(&self, tunnel: Option<&Tunnel>) -> Result<()> {
        let _held = self.qemu.hold();
        let mut cancel_sent = false;
        let stall_after = self.options.stall_timeout();
        // What moved last, and when: bytes through QEMU and through the channel, or a
        // change of QEMU's status.
        let mut progress = (0u64, 0u64, String::new());
        let mut moved = Instant::now();
        loop {
            if let Some((_, Some(e))) = tunnel.map(|t| t.streams_done()) {
                let mut pe = lock(&self.pump_error);
                if pe.is_none() {
                    *pe = Some(e);
                }
            }
            let want_cancel =
                self.cancel.load(Ordering::SeqCst) || lock(&self.pump_error).is_some();
            if want_cancel && !cancel_sent {
                let _ = self.qemu.with_qmp(|q| q.migrate_cancel());
                cancel_sent = true;
            }
            let info = self.qemu.with_qmp(|q| q.query_migrate())?;
            {
                let mut st = lock(&self.status);
                st.qemu_status = info.status.as_str().to_string();
                if let Some(ram) = &info.ram {
                    st.ram_total = ram.total;
                    st.ram_transferred = ram.transferred;
                    st.ram_remaining = ram.remaining;
                    st.mbps = ram.mbps;
                }
                st.total_time_ms = info.total_time_ms.or(st.total_time_ms);
                st.downtime_ms = info.downtime_ms.or(st.downtime_ms);
                st.channel_bytes = self.meter.forward();
                st.wire_bytes = self.meter.wire_forward();
                let now = (st.ram_transferred, st.channel_bytes, st.qemu_status.clone());
                if now != progress {
                    progress = now;
                    moved = Instant::now();
                } else if moved.elapsed() > stall_after && !cancel_sent {
                    let peer = lock(&self.peer)
                        .as_ref()
                        .and_then(|p| p.last())
                        .map(|m| format!("the destination last said it was {}", m.state))
                        .unwrap_or_else(|| "no word from the destination".into());
                    lock(&self.pump_error).get_or_insert(format!(
                        "stalled: nothing moved for {} s (source QEMU '{}' after {} of RAM \
                         and {} bytes carried; {peer})",
                        stall_after.as_secs(),
                        st.qemu_status,
                        st.ram_transferred,
                        st.channel_bytes
                    ));
                }
            }
            match info.status {
                QemuMigrationStatus::Completed => return Ok(()),
                QemuMigrationStatus::Failed => {
                    let pump = lock(&self.pump_error).clone();
                    let qemu = info.error_desc.unwrap_or_else(|| "no reason given".into());
                    return Err(DaemonError::Channel(match pump {
                        Some(p) => format!("{p} (QEMU: {qemu})"),
                        None => format!("QEMU reports the migration failed: {qemu}"),
                    }));
                }
                QemuMigrationStatus::Cancelled => {
                    return Err(match lock(&self.pump_error).clone() {
                        Some(p) => DaemonError::Channel(p),
                        None => DaemonError::Cancelled("cancelled on request".into()),
                    })
                }
                _ => {}
            }
            std::thread::sleep(POLL);
        }
    }

    /// Marks the migration failed, cuts the streams, and makes sure the guest runs again.
    fn fail(&self, why: &str) {
        // The destination's own words beat what its failure looked like from here.
        let why = match lock(&self.peer_failure).clone() {
            Some(p) => format!("the destination gave up: {p}"),
            None => why.to_string(),
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
        *lock(&self.held) = Held::Nothing;
        let _ = std::fs::remove_file(&self.socket_path);
        self.ensure_source_runs();
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
        // Already final (a second failure report): the guest was seen to above.
        let _ = self.advance(SourceEvent::RollBack);
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
        let deadline = Instant::now() + wait;
        let mut st = lock(&self.status);
        while !st.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.finished.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        let mut st = st.clone();
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
            self.fail("cancelled by the controller");
        }
        self.end(daemon);
        Ok(())
    }
}
