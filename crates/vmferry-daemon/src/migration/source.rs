//! The source half of a migration: `begin`, `perform` (and its background job), `status`,
//! `confirm`.
//!
//! Invariant: the source guest keeps running unless the destination confirmed it has the
//! whole state. Every path out of a failed or cancelled migration ends in `confirm(false)`
//! or the job's own failure handling, both of which resume the guest if QEMU paused it.

use super::{QemuHandle, UNLIMITED_BANDWIDTH};
use crate::error::{DaemonError, Result};
use crate::server::Daemon;
use crate::vms::lock;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::identity::{EphemeralIdentity, Fingerprint};
use vmferry_channel::meter::Meter;
use vmferry_channel::pump::{self, PumpStats, StopHandle};
use vmferry_channel::{tls, transport};
use vmferry_proto::preamble::Preamble;
use vmferry_proto::{
    Cookie, DataAuth, MigrationId, MigrationOptions, MigrationStatus, VmName, VmRef,
};
use vmferry_qmp::MigrationStatus as QemuMigrationStatus;

/// How long dialing one data connection (TCP + TLS) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may take to open its migration sockets to us.
const QEMU_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pumps may take to drain after QEMU says it completed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often QEMU is asked how the migration goes (query-migrate is cheap).
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Begun,
    Performing,
    Done,
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
}

impl SourceMigration {
    /// `begin`: describes the VM, makes this migration's identity, returns the first cookie.
    pub fn begin(
        daemon: &Daemon,
        id: MigrationId,
        vm: VmRef,
        options: MigrationOptions,
    ) -> Result<Cookie> {
        let (qemu, vm_name, spec) = match &vm {
            VmRef::Managed { name } => {
                let v = daemon.vms.get(name)?;
                let spec = v.spec.clone();
                (QemuHandle::Managed(v), Some(name.clone()), Some(spec))
            }
            VmRef::Attached { qmp } => (QemuHandle::Attached(PathBuf::from(qmp)), None, None),
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

    fn start(self: &Arc<Self>, daemon: &Daemon, cookie: &Cookie) -> Result<()> {
        cookie.check().map_err(DaemonError::BadRequest)?;
        let addr = cookie.data_address.clone().ok_or_else(|| {
            DaemonError::BadRequest("the cookie names no data address for the destination".into())
        })?;
        let (config, server_name) = match &self.options.data_auth {
            DataAuth::Pinned => {
                let fp: Fingerprint = cookie
                    .destination_fingerprint
                    .as_deref()
                    .ok_or_else(|| {
                        DaemonError::BadRequest(
                            "the cookie carries no destination fingerprint".into(),
                        )
                    })?
                    .parse()
                    .map_err(|e| {
                        DaemonError::BadRequest(format!("destination fingerprint: {e}"))
                    })?;
                let cfg = tls::pinned_client_config(&self.identity, fp)
                    .map_err(|e| DaemonError::Internal(e.to_string()))?;
                (cfg, tls::data_sni(self.id.as_str()))
            }
            DataAuth::X509 { tls_hostname } => {
                let creds = daemon.credentials()?;
                let host = match tls_hostname {
                    Some(h) => h.clone(),
                    None => host_of(&addr),
                };
                let cfg = vmferry_channel::x509_data::client_config(&creds, &host)
                    .map_err(|e| DaemonError::Internal(e.to_string()))?;
                (cfg, tls::data_sni(self.id.as_str()))
            }
        };
        let streams = cookie.streams();
        let streams16 = u16::try_from(streams)
            .map_err(|_| DaemonError::BadRequest("too many streams".into()))?;

        // Dial every stream before QEMU sends a byte: a channel that cannot be made fails
        // the migration while the guest is untouched, with the cause in words.
        let mut dialed = Vec::with_capacity(streams as usize);
        for k in 0..streams16 {
            let tcp = transport::connect_tcp(&addr, DIAL_TIMEOUT)
                .map_err(|e| DaemonError::Channel(format!("data stream {k}: {e}")))?;
            transport::tune_socket(&tcp);
            let mut s = tls::connect(tcp, &server_name, config.clone(), HANDSHAKE_TIMEOUT, &addr)
                .map_err(|e| DaemonError::Channel(format!("data stream {k}: {e}")))?;
            let pre = Preamble {
                stream: k,
                streams: streams16,
            };
            s.write_all(&pre.encode())
                .and_then(|_| s.flush())
                .map_err(|e| DaemonError::Channel(format!("data stream {k} to {addr}: {e}")))?;
            dialed.push(s);
        }
        lock(&self.status).streams = streams;

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
            .spawn(move || me.run(listener, dialed))
            .map_err(|e| DaemonError::Internal(format!("cannot start migration job: {e}")))?;
        Ok(())
    }

    /// The background job: accept QEMU's connections, pump each, watch QEMU until the end.
    fn run(
        self: Arc<Self>,
        listener: UnixListener,
        dialed: Vec<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    ) {
        let outcome = match self.accept_and_pump(&listener, dialed) {
            Ok(pumps) => self.watch().map(|_| pumps),
            Err(e) => Err(e),
        };
        drop(listener);
        let _ = std::fs::remove_file(&self.socket_path);
        match outcome {
            Ok(pumps) => {
                // QEMU has sent everything into our sockets; wait for the pumps to hand it
                // all to the destination before calling it complete.
                let deadline = Instant::now() + DRAIN_TIMEOUT;
                let mut drained = true;
                for p in pumps {
                    while !p.is_finished() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if !p.is_finished() {
                        drained = false;
                    }
                }
                let pump_error = lock(&self.pump_error).clone();
                match (drained, pump_error) {
                    (true, None) => {
                        let mut st = lock(&self.status);
                        st.qemu_status = "completed".into();
                        st.channel_bytes = self.meter.forward();
                        st.finished = true;
                        self.finished.notify_all();
                    }
                    (false, _) => self.fail("the data streams did not drain within 60 s"),
                    (true, Some(e)) => self.fail(&e),
                }
            }
            Err(e) => self.fail(&e.to_string()),
        }
    }

    fn accept_and_pump(
        self: &Arc<Self>,
        listener: &UnixListener,
        dialed: Vec<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    ) -> Result<Vec<std::thread::JoinHandle<()>>> {
        listener
            .set_nonblocking(true)
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let deadline = Instant::now() + QEMU_CONNECT_TIMEOUT;
        let mut pumps = Vec::new();
        for (k, stream) in dialed.into_iter().enumerate() {
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
            pumps.push(self.spawn_pump(k, local, stream)?);
        }
        Ok(pumps)
    }

    fn spawn_pump(
        self: &Arc<Self>,
        k: usize,
        local: UnixStream,
        stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    ) -> Result<std::thread::JoinHandle<()>> {
        let rustls::StreamOwned { conn, sock } = stream;
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "destination".into());
        let stop = StopHandle::new(&local, &sock)
            .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
        lock(&self.stops).push(stop.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("pump-src-{k}"))
            .spawn(move || {
                let r: std::result::Result<PumpStats, _> = pump::pump(
                    local,
                    rustls::Connection::Client(conn),
                    sock,
                    &peer,
                    &me.meter,
                    &stop,
                );
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
    fn watch(&self) -> Result<()> {
        let mut cancel_sent = false;
        loop {
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
        st
    }

    /// `confirm`: success stops the source QEMU (the guest lives on the destination now);
    /// failure cancels whatever is left and resumes the guest.
    pub fn confirm(&self, daemon: &Daemon, success: bool) -> Result<()> {
        *lock(&self.stage) = Stage::Done;
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
        Ok(())
    }
}

/// The host part of `host:port` (IPv6 in brackets allowed).
pub(crate) fn host_of(addr: &str) -> String {
    let h = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    h.trim_start_matches('[').trim_end_matches(']').to_string()
}
