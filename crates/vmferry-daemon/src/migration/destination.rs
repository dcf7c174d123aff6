//! The destination half of a migration: `prepare`, the data connections it accepts,
//! `finish`, `abort`.
//!
//! Invariant: the destination guest never runs before QEMU has loaded the complete state
//! and the controller asked for `finish`; on any failure its QEMU is killed, never
//! resumed. A data connection is accepted only for a prepared, unexpired migration, only
//! from the peer it pins, each stream slot only once, and none once the streams reached
//! QEMU.

use super::channel::{self, DataConn, Slots, Trust};
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
use vmferry_proto::preamble::Preamble;
use vmferry_proto::{
    Cookie, MigrationId, MigrationStatus, MigrationSummary, Transport, VmName, VmRef,
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
}

impl DestinationMigration {
    /// `prepare`: readies a QEMU to receive, makes this migration's identity, opens the
    /// door for exactly `cookie.streams()` data connections.
    pub fn prepare(daemon: &Daemon, mut cookie: Cookie, vm: VmRef) -> Result<Cookie> {
        cookie.check().map_err(DaemonError::BadRequest)?;
        let id = cookie.migration.clone();
        if lock(&daemon.migrations.destinations).contains_key(&id) {
            return Err(DaemonError::Exists(format!(
                "migration {id} is already prepared here"
            )));
        }
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
            expires: Instant::now() + Duration::from_secs(daemon.config.credential_ttl_secs),
            identity,
        };
        cookie.destination_fingerprint = Some(m.identity.fingerprint().to_string());
        cookie.data_address = daemon.config.data_address();
        cookie.destination_control_address = daemon.config.control_address();
        lock(&daemon.migrations.destinations).insert(id, Arc::new(m));
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
        if Instant::now() > self.expires || lock(&self.streams).attached {
            return None;
        }
        Some(self.server_config.clone())
    }

    /// Takes one authenticated data connection the source dialed: a direct stream (held
    /// until all have arrived, then handed to QEMU together) or the tunnel.
    pub fn accept_data(self: &Arc<Self>, pre: Preamble, c: DataConn) -> Result<()> {
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
                    Some((_, conns)) => self.attach(conns),
                    None => Ok(()),
                }
            }
            Transport::Tunnel => self.accept_tunnel(pre, c),
            Transport::Reverse => Err(DaemonError::Denied(format!(
                "{} offered a reverse stream to the destination of migration {}; the destination dials those itself",
                c.peer, self.id
            ))),
        }
    }

    fn accept_tunnel(self: &Arc<Self>, pre: Preamble, c: DataConn) -> Result<()> {
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
        }
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
        Ok(())
    }

    /// `connect` for reverse: dials every stream to the source, then hands them to QEMU.
    pub fn connect_reverse(
        self: &Arc<Self>,
        daemon: &Daemon,
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
            };
            conns.push(channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?);
        }
        self.attach(conns)
    }

    /// Connects every stream to QEMU, main channel first, and starts a pump for each.
    fn attach(self: &Arc<Self>, conns: Vec<DataConn>) -> Result<()> {
        {
            let mut st = lock(&self.streams);
            if st.attached {
                return Err(DaemonError::Denied(format!(
                    "migration {} already has its streams",
                    self.id
                )));
            }
            st.attached = true;
        }
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
        Ok(())
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

    /// `finish`: waits until QEMU loaded the whole state, then resumes the guest if it ran
    /// on the source.
    pub fn finish(&self, daemon: &Daemon) -> Result<MigrationStatus> {
        // QEMU is the authority on whether it has the whole state: a stream that breaks
        // at the very end (QEMU 7.2 closes or resets multifd sockets once it has what it
        // needs) must not fail a migration QEMU completed; one that breaks before fails
        // it, once QEMU has had a moment to say so itself.
        let deadline = Instant::now() + LOAD_TIMEOUT;
        let mut broken_since: Option<(Instant, String)> = None;
        let held = self.qemu.hold();
        let info = loop {
            let stream_error = lock(&self.streams)
                .error
                .clone()
                .or_else(|| lock(&self.tunnel).as_ref().and_then(|t| t.streams_done().1));
            if let (Some(e), None) = (&stream_error, &broken_since) {
                broken_since = Some((Instant::now(), e.clone()));
            }
            let info = self.qemu.with_qmp(|q| q.query_migrate())?;
            match info.status {
                QemuMigrationStatus::Completed => break info,
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
        };
        drop(held);
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
        lock(&daemon.migrations.destinations).remove(&self.id);
        let _ = std::fs::remove_file(&self.incoming_socket);
        tracing::info!(migration = %self.id, state = %status.status, "migration finished on the destination");
        Ok(MigrationStatus {
            qemu_status: info.status.as_str().to_string(),
            finished: true,
            channel_bytes: self.meter.forward() + self.meter.backward(),
            ..Default::default()
        })
    }

    pub fn summary(&self) -> MigrationSummary {
        let st = lock(&self.streams);
        MigrationSummary {
            migration: self.id.clone(),
            role: "destination".into(),
            vm: match (&self.vm_name, &self.qemu) {
                (Some(n), _) => n.to_string(),
                (None, q) => q.describe(),
            },
            status: MigrationStatus {
                qemu_status: if st.attached { "receiving" } else { "prepared" }.into(),
                transport: st
                    .slots
                    .transport()
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                streams: self.n_streams as u32,
                channel_bytes: self.meter.forward() + self.meter.backward(),
                error: st.error.clone(),
                ..Default::default()
            },
        }
    }

    /// `abort`: cuts the streams and kills a QEMU this daemon started for the migration.
    pub fn abort(&self, daemon: &Daemon, reason: &str) {
        tracing::warn!(migration = %self.id, "aborting on the destination: {reason}");
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
        let _ = std::fs::remove_file(&self.incoming_socket);
        lock(&daemon.migrations.destinations).remove(&self.id);
    }

    pub fn expired(&self) -> bool {
        Instant::now() > self.expires && !lock(&self.streams).attached
    }
}
