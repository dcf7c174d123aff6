//! The destination half of a libvirt migration: `prepare` checks this host's libvirt,
//! makes the disk images and the migration directory, and takes the source's streams
//! to libvirtd's socket and to the sockets libvirt makes the incoming QEMU listen on;
//! `finish` sees the domain running here; `abort` removes everything it made.
//!
//! It never destroys a running domain (one that runs here is one libvirt completed),
//! never touches a domain that existed before `prepare` (prepare refuses when one does),
//! and only removes images it created.

use super::api::{self, RunState};
use super::images::{self, Journal};
use super::relay::{DestinationRelay, Targets};
use super::{remove_dir, LIBVIRT_POLL};
use crate::error::{DaemonError, Result};
use crate::migration::channel::{DataConn, Trust};
use crate::migration::lease::Lease;
use crate::migration::record::{self, Parties};
use crate::state::Daemon;
use crate::vms::lock;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::compress::Filters;
use vmferry_channel::identity::EphemeralIdentity;
use vmferry_channel::meter::Meter;
use vmferry_channel::tunnel::Tunnel;
use vmferry_proto::libvirt::{tunnel_kind, LibvirtPlan};
use vmferry_proto::preamble::{Preamble, StreamKind};
use vmferry_proto::{
    Cookie, DestinationEvent, DestinationState, MigrationId, MigrationState, MigrationStatus,
    MigrationSummary, Role, Transport,
};

/// How long `finish` waits for libvirt to run the domain here.
const FINISH_WAIT: Duration = Duration::from_secs(30);
/// How long the tunnel may take to close once the domain runs here.
const TUNNEL_CLOSE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct LibvirtDestination {
    pub id: MigrationId,
    plan: LibvirtPlan,
    source_running: bool,
    config: Arc<rustls::ServerConfig>,
    state: Mutex<DestinationState>,
    lease: Lease,
    relay: Arc<DestinationRelay>,
    meter: Arc<Meter>,
    filters: Filters,
    tunnel: Mutex<Option<Tunnel>>,
    /// The direct transport's probe connections, held open until the end.
    probes: Mutex<Vec<DataConn>>,
    journal: Mutex<Journal>,
    journal_file: PathBuf,
    error: Mutex<Option<String>>,
    parties: Mutex<Parties>,
}

impl LibvirtDestination {
    /// `prepare`: checks this host can take the domain, makes its disk images and the
    /// migration directory, and answers with this half's identity and addresses.
    pub fn prepare(
        daemon: &Arc<Daemon>,
        mut cookie: Cookie,
        domain: String,
        mut parties: Parties,
    ) -> Result<Cookie> {
        cookie.check()?;
        let id = cookie.migration.clone();
        let mut plan = cookie.libvirt.clone().ok_or_else(|| {
            DaemonError::BadRequest(
                "the cookie carries no libvirt plan: the source did not begin a libvirt migration"
                    .into(),
            )
        })?;
        if plan.domain != domain {
            return Err(DaemonError::BadRequest(format!(
                "the cookie is for domain {}, not {domain}",
                plan.domain
            )));
        }
        let cfg = &daemon.config;
        let expected = LibvirtPlan::expected_dir(&cfg.libvirt_migrations_dir, &id);
        if plan.dir != expected {
            return Err(DaemonError::BadRequest(format!(
                "the source puts libvirt's sockets under {}, this host under {}: libvirt uses \
                 one path on both hosts, so both daemons need the same libvirt_migrations_dir",
                plan.dir.parent().unwrap_or(&plan.dir).display(),
                cfg.libvirt_migrations_dir.display()
            )));
        }
        let uri = api::parse_uri(&cfg.libvirt_uri)?;
        let libvirt_socket = uri.daemon_socket()?;
        let lv = api::open(&cfg.libvirt_uri)?;
        let existing = match lv.domain(&plan.domain)? {
            Some(d) => Some(d),
            None => lv.domain_by_uuid(&plan.uuid)?,
        };
        if let Some(found) = existing {
            let name = found.name().unwrap_or_else(|_| plan.domain.clone());
            let state = api::run_state(&found)
                .map(|s| format!("{s:?}").to_lowercase())
                .unwrap_or_default();
            return Err(DaemonError::Exists(format!(
                "a domain {name} ({state}) with this name or UUID is already defined on this \
                 host; libvirt would refuse it, so nothing was moved"
            )));
        }
        let copy = cookie.options.copy_storage;
        let mut journal = Journal {
            domain: plan.domain.clone(),
            uuid: plan.uuid.clone(),
            dir: plan.dir.clone(),
            images: Vec::new(),
        };
        let journal_file = images::journal_path(&cfg.state_dir, &id);
        {
            let mut claimed = lock(&daemon.migrations.libvirt_destinations);
            if claimed.contains_key(&id) {
                return Err(DaemonError::Exists(format!(
                    "migration {id} is already prepared here"
                )));
            }
            // Reserve the id while the images are made (no second prepare of it).
            claimed.insert(id.clone(), None);
        }
        let unclaim = |e: DaemonError| {
            lock(&daemon.migrations.libvirt_destinations).remove(&id);
            e
        };
        journal.save(&journal_file).map_err(unclaim)?;
        let made = (|| -> Result<()> {
            if let Some(c) = copy {
                images::prepare_images(&plan.disks, c.mode, &mut journal, &journal_file)?;
            }
            super::make_dir(cfg, &plan.dir, super::Side::Destination)
        })();
        let identity = EphemeralIdentity::generate(&format!("vmferry-destination-{id}"))
            .map_err(|e| DaemonError::Internal(e.to_string()));
        let config = made.and_then(|_| {
            let identity = identity?;
            let config = Trust {
                auth: cookie.options.data_auth.clone(),
                peer_fingerprint: cookie.source_fingerprint.clone(),
            }
            .server_config(
                daemon,
                &identity,
                "source",
                cookie.source_data_address.as_deref(),
            )?;
            Ok((identity, config))
        });
        let (identity, config) = match config {
            Ok(x) => x,
            Err(e) => {
                images::remove_images(&journal.images);
                remove_dir(&plan.dir);
                let _ = std::fs::remove_file(&journal_file);
                return Err(unclaim(e));
            }
        };
        plan.destination_uri = Some(cfg.libvirt_uri.clone());
        plan.destination_libvirt = lv.version();
        cookie.libvirt = Some(plan.clone());
        cookie.destination_fingerprint = Some(identity.fingerprint().to_string());
        cookie.data_address = cfg.data_address();
        cookie.destination_control_address = cfg.control_address();
        parties.destination = Some(record::own_address(daemon));
        parties.source = cookie.source_data_address.clone();
        let m = Arc::new(LibvirtDestination {
            id: id.clone(),
            source_running: cookie.source_running,
            config,
            state: Mutex::new(DestinationState::Prepared),
            lease: Lease::new(cookie.options.lease_ms),
            relay: Arc::new(DestinationRelay::new(Targets {
                libvirt: libvirt_socket,
                dir: plan.dir.clone(),
            })),
            meter: Arc::new(Meter::default()),
            filters: Filters {
                compress: cookie.options.compress,
            },
            plan,
            tunnel: Mutex::new(None),
            probes: Mutex::new(Vec::new()),
            journal: Mutex::new(journal),
            journal_file,
            error: Mutex::new(None),
            parties: Mutex::new(parties),
        });
        lock(&daemon.migrations.libvirt_destinations).insert(id, Some(m.clone()));
        m.watch_lease(daemon.clone());
        tracing::info!(migration = %m.id, domain = %m.plan.domain, "prepared for a libvirt migration");
        Ok(cookie)
    }

    pub fn state(&self) -> DestinationState {
        *lock(&self.state)
    }

    fn advance(&self, event: DestinationEvent) -> Result<DestinationState> {
        let mut st = lock(&self.state);
        let next = st
            .next(event)
            .map_err(|e| DaemonError::BadRequest(format!("migration {}: {e}", self.id)))?;
        *st = next;
        Ok(next)
    }

    /// The TLS configuration a data connection naming this migration must complete,
    /// while streams are still expected.
    pub fn data_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        matches!(
            self.state(),
            DestinationState::Prepared | DestinationState::Receiving
        )
        .then(|| self.config.clone())
    }

    /// Takes one data connection the source dialed.
    pub fn accept_data(&self, pre: Preamble, c: DataConn) -> Result<()> {
        if self.data_config().is_none() {
            return Err(DaemonError::Denied(format!(
                "migration {} takes no more streams",
                self.id
            )));
        }
        match (pre.transport, pre.kind) {
            (Transport::Direct, StreamKind::Peer) => lock(&self.probes).push(c),
            (Transport::Direct, kind) => {
                self.receiving();
                self.relay
                    .carry(kind, pre.stream, c, self.meter.clone(), self.filters);
            }
            (Transport::Tunnel, _) => {
                let mut held = lock(&self.tunnel);
                if held.is_some() {
                    return Err(DaemonError::Denied(format!(
                        "{} opened a second tunnel for migration {}; refused",
                        c.peer, self.id
                    )));
                }
                let relay = self.relay.clone();
                let accept = Box::new(move |k: u16| {
                    let (kind, n) = tunnel_kind(k)
                        .ok_or_else(|| format!("tunnel stream {k} names no kind of connection"))?;
                    relay
                        .connect(kind, n)
                        .map_err(|e| -> vmferry_channel::tunnel::AcceptError {
                            e.to_string().into()
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
                *held = Some(t);
                drop(held);
                self.receiving();
            }
            (Transport::Reverse, _) => {
                return Err(DaemonError::Denied(format!(
                    "migration {} is a libvirt one: it takes no reverse streams",
                    self.id
                )))
            }
        }
        Ok(())
    }

    fn receiving(&self) {
        if self.state() == DestinationState::Prepared {
            let _ = self.advance(DestinationEvent::Attach);
        }
    }

    pub fn status(&self) -> MigrationStatus {
        let state = self.state();
        MigrationStatus {
            state: Some(MigrationState::Destination(state)),
            qemu_status: state.as_str().to_string(),
            finished: state.is_final(),
            channel_bytes: self.meter.backward(),
            wire_bytes: self.meter.wire_backward(),
            error: lock(&self.error).clone(),
            ..Default::default()
        }
    }

    pub fn summary(&self) -> MigrationSummary {
        MigrationSummary {
            migration: self.id.clone(),
            role: Role::Destination,
            vm: format!("libvirt:{}", self.plan.domain),
            status: self.status(),
        }
    }

    pub fn renew(&self) {
        self.lease.renew();
    }

    pub fn detach(&self) {
        self.lease.detach();
    }

    /// `finish`: the domain runs here (libvirt resumed it); the directory goes.
    pub fn finish(&self, daemon: &Daemon) -> Result<MigrationStatus> {
        match self.state() {
            DestinationState::Finished => return Ok(self.status()),
            DestinationState::Aborted => {
                return Err(DaemonError::BadRequest(format!(
                    "migration {} was aborted here: {}",
                    self.id,
                    lock(&self.error).clone().unwrap_or_default()
                )))
            }
            _ => {}
        }
        let lv = api::open(&daemon.config.libvirt_uri)?;
        let deadline = Instant::now() + FINISH_WAIT;
        let last = loop {
            let state = match lv.domain_by_uuid(&self.plan.uuid)? {
                Some(dom) => Some(api::run_state(&dom)?),
                None => None,
            };
            let done = match &state {
                Some(RunState::Running) => true,
                Some(RunState::Paused { migrating: false }) => !self.source_running,
                _ => false,
            };
            if done {
                break state;
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::Timeout(format!(
                    "libvirt did not run domain {} here within {} s ({})",
                    self.plan.domain,
                    FINISH_WAIT.as_secs(),
                    match state {
                        Some(s) => format!("it is {s:?}").to_lowercase(),
                        None => "it is not defined here".into(),
                    }
                )));
            }
            std::thread::sleep(LIBVIRT_POLL);
        };
        tracing::info!(migration = %self.id, domain = %self.plan.domain, "the domain runs here ({last:?})");
        for e in [
            DestinationEvent::Attach,
            DestinationEvent::QemuLoaded,
            DestinationEvent::Resume,
        ] {
            if self.state() != DestinationState::Finished {
                let _ = self.advance(e);
            }
        }
        if let Some(t) = lock(&self.tunnel).take() {
            let _ = std::thread::Builder::new()
                .name("libvirt-tunnel-close".into())
                .spawn(move || {
                    let _ = t.close(TUNNEL_CLOSE);
                });
        }
        lock(&self.probes).clear();
        remove_dir(&self.plan.dir);
        let _ = std::fs::remove_file(&self.journal_file);
        self.end(daemon);
        Ok(self.status())
    }

    /// `abort`: cuts the streams, removes an incoming domain libvirt left here (never a
    /// running one), the images this half created, and the directory.
    pub fn abort(&self, daemon: &Daemon, reason: &str) {
        if self.state().is_final() {
            return;
        }
        tracing::warn!(migration = %self.id, "aborting: {reason}");
        lock(&self.error).get_or_insert_with(|| reason.to_string());
        self.relay.streams.cut();
        if let Some(t) = lock(&self.tunnel).take() {
            t.stop();
        }
        lock(&self.probes).clear();
        let keep_images = match remove_incoming(&daemon.config.libvirt_uri, &self.plan) {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(migration = %self.id, "{e}");
                true
            }
        };
        let journal = lock(&self.journal).clone();
        if !keep_images {
            images::remove_images(&journal.images);
        }
        remove_dir(&self.plan.dir);
        let _ = std::fs::remove_file(&self.journal_file);
        let _ = self.advance(DestinationEvent::Abort);
        self.end(daemon);
    }

    fn end(&self, daemon: &Daemon) {
        let removed = lock(&daemon.migrations.libvirt_destinations).remove(&self.id);
        if removed.is_some() {
            let summary = self.summary();
            daemon.migrations.remember(summary.clone());
            record::ended(daemon, &summary, &lock(&self.parties));
        }
    }

    /// A lease that runs out before `finish`: done if the domain runs here already (libvirt
    /// completed), else aborted.
    fn watch_lease(self: &Arc<Self>, daemon: Arc<Daemon>) {
        let weak = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("libvirt-lease".into())
            .spawn(move || loop {
                std::thread::sleep(LIBVIRT_POLL);
                let Some(m) = weak.upgrade() else { return };
                if m.state().is_final() {
                    return;
                }
                if !m.lease.take_expired() {
                    continue;
                }
                let why = format!("the controller's lease of {:.0} s expired", m.lease.secs());
                if m.finish(&daemon).is_err() {
                    m.abort(&daemon, &why);
                }
                return;
            });
    }
}

/// Removes what libvirt left of an incoming domain, if it is still paused as one:
/// destroyed, and undefined if defined. Returns whether the domain's images must stay
/// (it runs here, or is in a state that may make it the guest's only copy).
pub(super) fn remove_incoming(libvirt_uri: &str, plan: &LibvirtPlan) -> Result<bool> {
    let lv = api::open(libvirt_uri)?;
    let Some(dom) = lv.domain_by_uuid(&plan.uuid)? else {
        return Ok(false);
    };
    let state = api::run_state(&dom)?;
    match state {
        RunState::Running => {
            tracing::warn!(
                "domain {} runs here: libvirt completed its migration; left as it is",
                plan.domain
            );
            return Ok(true);
        }
        // Only a domain still paused as libvirt's incoming one is removed. Anything else
        // (shut off after a crash in post-copy, ...) may be the last copy of the guest:
        // its definition and images stay for the operator.
        RunState::Paused { .. } => {}
        other => {
            tracing::warn!(
                "domain {} is {other:?} here after its migration began; its definition and \
                 images are left for the operator (it may be the guest's only copy)",
                plan.domain
            );
            return Ok(true);
        }
    }
    if dom.is_active().unwrap_or(false) {
        dom.destroy().map_err(|e| {
            api::error(
                &format!("destroying the incoming domain {}", plan.domain),
                &e,
            )
        })?;
    }
    if dom.is_persistent().unwrap_or(false) {
        dom.undefine().map_err(|e| {
            api::error(
                &format!("undefining the incoming domain {}", plan.domain),
                &e,
            )
        })?;
    }
    tracing::info!("removed the incoming domain {} ({state:?})", plan.domain);
    Ok(false)
}
