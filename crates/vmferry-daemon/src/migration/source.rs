//! The source half of a migration: `begin`, `perform` (and its background job), `status`,
//! `confirm`.
//!
//! Invariant: the source guest keeps running unless the destination confirmed it has the
//! whole state. Every path out of a failed or cancelled migration ends in `confirm(false)`
//! or the job's own failure handling, both of which resume the guest if QEMU paused it.

use super::channel::{self, DataConn, Slots, Trust};
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
use vmferry_proto::preamble::Preamble;
use vmferry_proto::{
    Cookie, MigrationId, MigrationOptions, MigrationStatus, MigrationSummary, Transport, VmName,
    VmRef,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Begun,
    Performing,
    Done,
}

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
    stage: Mutex<Stage>,
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
        if let Some(name) = &vm_name {
            let busy = lock(&daemon.migrations.sources)
                .values()
                .any(|m| m.vm_name.as_ref() == Some(name));
            if busy {
                return Err(DaemonError::Exists(format!(
                    "VM '{name}' is already the source of a migration"
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
            stage: Mutex::new(Stage::Begun),
            status: Mutex::new(MigrationStatus {
                qemu_status: "begun".into(),
                transport: "direct".into(),
                ..Default::default()
            }),
            finished: std::sync::Condvar::new(),
            meter: Arc::new(Meter::default()),
            stops: Mutex::new(Vec::new()),
            pump_error: Mutex::new(None),
            cancel: AtomicBool::new(false),
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
    pub fn perform(self: &Arc<Self>, daemon: &Daemon, cookie: &Cookie) -> Result<()> {
        {
            let mut stage = lock(&self.stage);
            if *stage != Stage::Begun {
                return Err(DaemonError::BadRequest(format!(
                    "migration {} was already performed",
                    self.id
                )));
            }
            *stage = Stage::Performing;
        }
        let result = self.start(daemon, cookie);
        if let Err(e) = &result {
            self.fail(&e.to_string());
        }
        result
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
        if *lock(&self.stage) != Stage::Begun {
            return Err(DaemonError::BadRequest(format!(
                "migration {} is already under way; its channel is fixed",
                self.id
            )));
        }
        self.make_channel(daemon, cookie, transport, timeout)
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
                    };
                    let c = channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?;
                    slots.put(transport, &pre, n, c)?;
                }
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
                };
                let c = channel::dial(&self.id, &addr, cfg, pre, timeout)?;
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

    /// The TLS configuration for a reverse data connection naming this migration, or
    /// `None` when none is expected.
    pub fn data_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        if *lock(&self.stage) == Stage::Done {
            return None;
        }
        let cfg = lock(&self.reverse_config).clone()?;
        match &*lock(&self.held) {
            Held::Conns(s) if !s.complete() => Some(cfg),
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

    fn start(self: &Arc<Self>, daemon: &Daemon, cookie: &Cookie) -> Result<()> {
        cookie.check().map_err(DaemonError::BadRequest)?;
        let (transport, carrier) = self.take_carrier(daemon, cookie)?;
        {
            let mut st = lock(&self.status);
            st.streams = self.streams() as u32;
            st.transport = transport.to_string();
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
        lock(&self.status).qemu_status = "setup".into();

        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("migrate-src-{}", &self.id.as_str()[..8]))
            .spawn(move || me.run(listener, carrier))
            .map_err(|e| DaemonError::Internal(format!("cannot start migration job: {e}")))?;
        Ok(())
    }

    /// The background job: accept QEMU's connections, carry each, watch QEMU until the end.
    fn run(self: Arc<Self>, listener: UnixListener, carrier: Carrier) {
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
                let mut st = lock(&self.status);
                st.qemu_status = "completed".into();
                st.channel_bytes = self.meter.forward();
                st.wire_bytes = self.meter.wire_forward();
                st.finished = true;
                self.finished.notify_all();
            }
            Err(e) => self.fail(&e.to_string()),
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
        let mut st = lock(&self.status);
        if st.error.is_none() {
            st.error = Some(why.to_string());
        }
        if st.qemu_status != "cancelled" {
            st.qemu_status = "failed".into();
        }
        st.finished = true;
        self.finished.notify_all();
    }

    /// Cancels QEMU's migration if it is still going and resumes a guest that was running.
    fn ensure_source_runs(&self) {
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
        st
    }

    pub fn summary(&self) -> MigrationSummary {
        MigrationSummary {
            migration: self.id.clone(),
            role: "source".into(),
            vm: match (&self.vm_name, &self.qemu) {
                (Some(n), _) => n.to_string(),
                (None, q) => q.describe(),
            },
            status: self.status(),
        }
    }

    /// `confirm`: success stops the source QEMU (the guest lives on the destination now);
    /// failure cancels whatever is left and resumes the guest.
    pub fn confirm(&self, daemon: &Daemon, success: bool) -> Result<()> {
        *lock(&self.stage) = Stage::Done;
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
            let st = self.status();
            if st.qemu_status != "completed" {
                return Err(DaemonError::BadRequest(format!(
                    "migration {} cannot be confirmed: it is {}",
                    self.id, st.qemu_status
                )));
            }
            if let (QemuHandle::Managed(vm), Some(name)) = (&self.qemu, &self.vm_name) {
                vm.shutdown(Duration::from_secs(5));
                daemon.vms.forget(name);
            }
        } else {
            self.cancel.store(true, Ordering::SeqCst);
            self.fail("cancelled by the controller");
        }
        lock(&daemon.migrations.sources).remove(&self.id);
        daemon.migrations.remember(self.summary());
        Ok(())
    }
}
