//! The destination half of a migration: `prepare`, the data connections it accepts,
//! `finish`, `abort`.
//!
//! Invariant: the destination guest never runs before QEMU has loaded the complete state
//! and the controller asked for `finish`; on any failure its QEMU is killed, never
//! resumed. A data connection is accepted only for a prepared, unexpired migration, only
//! from the peer it pins, and each stream slot only once.

use super::QemuHandle;
use crate::error::{DaemonError, Result};
use crate::server::Daemon;
use crate::vms::lock;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::identity::{EphemeralIdentity, Fingerprint};
use vmferry_channel::meter::Meter;
use vmferry_channel::pump::{self, StopHandle};
use vmferry_channel::tls;
use vmferry_proto::preamble::{Preamble, PREAMBLE_LEN};
use vmferry_proto::{Cookie, DataAuth, MigrationId, MigrationStatus, VmName, VmRef};
use vmferry_qmp::MigrationStatus as QemuMigrationStatus;

/// How long a data connection may take to send its preamble after the handshake.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a multifd stream waits for the main stream to reach QEMU first.
const MAIN_FIRST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `finish` waits for QEMU to load the state once the source is done.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct Streams {
    /// Which stream slots a connection already took (single use).
    taken: Vec<bool>,
    /// Whether stream 0 (QEMU's main channel) reached QEMU.
    main_connected: bool,
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
    source_running: bool,
    /// The unix socket the destination QEMU listens on.
    incoming_socket: PathBuf,
    streams: Mutex<Streams>,
    changed: Condvar,
    meter: Arc<Meter>,
    stops: Mutex<Vec<StopHandle>>,
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
        let server_config = match &cookie.options.data_auth {
            DataAuth::Pinned => {
                let fp: Fingerprint = cookie
                    .source_fingerprint
                    .as_deref()
                    .ok_or_else(|| {
                        DaemonError::BadRequest("the cookie carries no source fingerprint".into())
                    })?
                    .parse()
                    .map_err(|e| DaemonError::BadRequest(format!("source fingerprint: {e}")))?;
                tls::pinned_server_config(&identity, fp)
            }
            DataAuth::X509 { .. } => {
                vmferry_channel::x509_data::server_config(&daemon.credentials()?)
            }
        }
        .map_err(|e| DaemonError::Internal(e.to_string()))?;

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
            VmRef::Attached { qmp } => (QemuHandle::Attached(PathBuf::from(qmp)), None),
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
            source_running: cookie.source_running,
            incoming_socket,
            streams: Mutex::new(Streams {
                taken: vec![false; streams],
                ..Default::default()
            }),
            changed: Condvar::new(),
            meter: Arc::new(Meter::default()),
            stops: Mutex::new(Vec::new()),
            expires: Instant::now() + Duration::from_secs(daemon.config.credential_ttl_secs),
            identity,
        };
        cookie.destination_fingerprint = Some(m.identity.fingerprint().to_string());
        cookie.data_address = daemon.config.advertise.clone();
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
    /// when it must be refused (expired, or every stream already connected).
    pub fn data_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        if Instant::now() > self.expires {
            return None;
        }
        let st = lock(&self.streams);
        if st.taken.iter().all(|t| *t) {
            return None;
        }
        Some(self.server_config.clone())
    }

    /// Serves one authenticated data connection: reads its preamble, takes its slot,
    /// connects it to QEMU (main stream first), and pumps until the stream ends.
    pub fn serve_data(
        self: &Arc<Self>,
        stream: rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    ) -> Result<()> {
        let rustls::StreamOwned { mut conn, mut sock } = stream;
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "source".into());
        let mut pre = [0u8; PREAMBLE_LEN];
        {
            let _ = sock.set_read_timeout(Some(PREAMBLE_TIMEOUT));
            let mut s = rustls::Stream::new(&mut conn, &mut sock);
            s.read_exact(&mut pre).map_err(|e| {
                DaemonError::Channel(format!("{peer} sent no stream preamble: {e}"))
            })?;
            let _ = sock.set_read_timeout(None);
        }
        let pre = Preamble::decode(&pre).map_err(|e| DaemonError::Channel(e.to_string()))?;
        let k = usize::from(pre.stream);
        {
            let mut st = lock(&self.streams);
            if usize::from(pre.streams) != st.taken.len() || k >= st.taken.len() {
                return Err(DaemonError::Channel(format!(
                    "{peer} claims stream {} of {}, but this migration has {} streams",
                    pre.stream,
                    pre.streams,
                    st.taken.len()
                )));
            }
            if st.taken[k] {
                return Err(DaemonError::Denied(format!(
                    "{peer} tried to open stream {k} of migration {} a second time; refused",
                    self.id
                )));
            }
            st.taken[k] = true;
            if k > 0 {
                let deadline = Instant::now() + MAIN_FIRST_TIMEOUT;
                while !st.main_connected {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(DaemonError::Timeout(format!(
                            "stream {k}: the main stream of migration {} never arrived",
                            self.id
                        )));
                    }
                    st = match self.changed.wait_timeout(st, left) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
            }
        }
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
        let stop = StopHandle::new(&local, &sock)
            .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
        lock(&self.stops).push(stop.clone());
        {
            let mut st = lock(&self.streams);
            if k == 0 {
                st.main_connected = true;
            }
            st.running += 1;
            self.changed.notify_all();
        }
        let r = pump::pump(
            local,
            rustls::Connection::Server(conn),
            sock,
            &peer,
            &self.meter,
            &stop,
        );
        let r = r
            .map(|_| ())
            .map_err(|e| format!("data stream {k} from {peer}: {e}"));
        {
            let mut st = lock(&self.streams);
            st.running -= 1;
        }
        self.record_end(r.clone());
        r.map_err(DaemonError::Channel)
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
        let deadline = Instant::now() + LOAD_TIMEOUT;
        let info = loop {
            if let Some(e) = lock(&self.streams).error.clone() {
                return Err(DaemonError::Channel(e));
            }
            let info = self.qemu.with_qmp(|q| q.query_migrate())?;
            match info.status {
                QemuMigrationStatus::Completed => break info,
                QemuMigrationStatus::Failed | QemuMigrationStatus::Cancelled => {
                    return Err(DaemonError::Qemu(format!(
                        "the destination QEMU failed to load the state: {}",
                        info.error_desc.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                _ => {}
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
        // QEMU completed; the pumps end when the source closes its side.
        let drain_deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = lock(&self.streams);
            if let Some(e) = st.error.clone() {
                return Err(DaemonError::Channel(e));
            }
            if st.running == 0 || Instant::now() >= drain_deadline {
                break;
            }
            drop(st);
            std::thread::sleep(POLL);
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

    /// `abort`: cuts the streams and kills a QEMU this daemon started for the migration.
    pub fn abort(&self, daemon: &Daemon, reason: &str) {
        tracing::warn!(migration = %self.id, "aborting on the destination: {reason}");
        for s in lock(&self.stops).iter() {
            s.stop();
        }
        if let (QemuHandle::Managed(v), Some(n)) = (&self.qemu, &self.vm_name) {
            v.kill();
            daemon.vms.forget(n);
        }
        let _ = std::fs::remove_file(&self.incoming_socket);
        lock(&daemon.migrations.destinations).remove(&self.id);
    }

    pub fn expired(&self) -> bool {
        Instant::now() > self.expires && lock(&self.streams).taken.iter().all(|t| !*t)
    }
}
