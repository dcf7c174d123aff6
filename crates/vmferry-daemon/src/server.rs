//! The daemon's listeners: the TCP port (mutual TLS; control and data connections share
//! it, told apart by the TLS server name) and the local unix control socket (peer
//! credentials).
//!
//! Every accepted connection gets its own thread and a handshake deadline, so a silent or
//! hostile peer costs one thread for a bounded time and never blocks another client.

use crate::audit::{AuditLog, Event};
use crate::auth::{AuthPolicy, Identity};
use crate::config::DaemonConfig;
use crate::control::{serve_control, Caller};
use crate::error::{DaemonError, Result};
use crate::migration::Migrations;
use crate::state::{load_tls, Daemon};
use crate::vms::{lock, VmRegistry};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use vmferry_channel::{peercred, tls};
use vmferry_proto::MigrationId;

/// How long a new connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many connections may be in their handshake at once.
const MAX_PENDING: usize = 64;

/// A bound, not yet running daemon. Tests bind on `127.0.0.1:0` and read the port.
#[derive(Debug)]
pub struct Server {
    daemon: Arc<Daemon>,
    tcp: Option<TcpListener>,
    /// The optional data-only port.
    data: Option<TcpListener>,
    /// The optional metrics port (plain HTTP).
    metrics: Option<TcpListener>,
    unix: UnixListener,
    shutdown: Arc<AtomicBool>,
}

impl Server {
    pub fn bind(config: DaemonConfig) -> Result<Server> {
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            DaemonError::Internal(format!(
                "cannot create state dir {}: {e}",
                config.state_dir.display()
            ))
        })?;
        // Others may traverse (to reach control.sock, where peer credentials decide) but
        // not list; QEMU's own sockets inside are not writable by others.
        let _ = std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o711));
        let audit = AuditLog::open(&config.state_dir);
        // Before any socket is bound: a previous run killed mid-migration left a
        // receiving QEMU and half-copied images behind; the source kept the guest, so
        // they are undone.
        // Incoming libvirt migrations a previous run lost likewise: their directories
        // and the images they made.
        let interrupted = crate::migration::destination::roll_back_interrupted(&config.state_dir)
            .into_iter()
            .chain(crate::libvirt::recover(&config));
        for line in interrupted {
            tracing::warn!("{line}");
            audit.record(&Event {
                what: "migration",
                who: "-",
                from: "restart",
                scheme: "-",
                op: "roll_back",
                subject: "",
                outcome: "ok",
                detail: &line,
                role: "destination",
                ..Default::default()
            });
        }
        let vms = VmRegistry::new(&config.state_dir, config.qemu.clone(), config.accel);
        // The VMs a previous run started still run: adopted, with whatever migration the
        // restart interrupted undone.
        let (adopted, mut said) = vms.adopt();
        for vm in &adopted {
            said.extend(crate::migration::source::restart::undo_interrupted(vm));
        }
        for line in said {
            tracing::warn!("{line}");
            audit.record(&Event {
                what: "vm",
                who: "-",
                from: "restart",
                scheme: "-",
                op: "adopt",
                subject: "",
                outcome: "ok",
                detail: &line,
                ..Default::default()
            });
        }
        let policy =
            AuthPolicy::from_config(&config).map_err(|e| DaemonError::BadRequest(e.to_string()))?;
        let (creds, control_tls) = load_tls(&config, &policy)?;
        let tcp = match &config.listen {
            Some(addr) => {
                if control_tls.is_none() {
                    return Err(DaemonError::BadRequest(format!(
                        "listening on {addr} needs certificates: give --certs DIR (see `vmferry certs`)"
                    )));
                }
                Some(TcpListener::bind(addr).map_err(|e| {
                    DaemonError::BadRequest(format!("cannot listen on {addr}: {e}"))
                })?)
            }
            None => None,
        };
        let data = match &config.data_listen {
            Some(addr) => {
                if control_tls.is_none() {
                    return Err(DaemonError::BadRequest(format!(
                        "a data port ({addr}) needs certificates: give --certs DIR"
                    )));
                }
                Some(TcpListener::bind(addr).map_err(|e| {
                    DaemonError::BadRequest(format!("cannot listen for data on {addr}: {e}"))
                })?)
            }
            None => None,
        };
        let metrics = match &config.metrics {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|e| {
                DaemonError::BadRequest(format!("cannot serve metrics on {addr}: {e}"))
            })?),
            None => None,
        };
        let sock = config.control_socket();
        let _ = std::fs::remove_file(&sock);
        let unix = UnixListener::bind(&sock).map_err(|e| {
            DaemonError::BadRequest(format!("cannot listen on {}: {e}", sock.display()))
        })?;
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666));
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let data_path = match vmferry_channel::transport::kernel_tls_available() {
            Ok(()) => "userspace TLS 1.3 (rustls on aws-lc-rs, AES-128-GCM preferred); the \
                       kernel offers TLS offload, which this build does not use yet"
                .to_string(),
            Err(why) => format!(
                "userspace TLS 1.3 (rustls on aws-lc-rs, AES-128-GCM preferred); kernel TLS \
                 unavailable: {why}"
            ),
        };
        tracing::info!("data path: {data_path}");
        Ok(Server {
            daemon: Arc::new(Daemon {
                config,
                vms,
                migrations: Migrations::default(),
                creds: RwLock::new(creds),
                control_tls: RwLock::new(control_tls),
                policy: RwLock::new(Arc::new(policy)),
                audit,
                metrics: crate::metrics::Metrics::new(),
                hostname,
                data_path,
            }),
            tcp,
            data,
            metrics,
            unix,
            shutdown: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn daemon(&self) -> Arc<Daemon> {
        self.daemon.clone()
    }

    /// Serves until the process ends.
    pub fn run(self) -> Result<()> {
        let daemon = self.daemon.clone();
        let unix = self.unix;
        let d2 = daemon.clone();
        std::thread::Builder::new()
            .name("accept-unix".into())
            .spawn(move || accept_unix(d2, unix))
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        if let Some(data) = self.data {
            let d4 = daemon.clone();
            let shutdown = self.shutdown.clone();
            std::thread::Builder::new()
                .name("accept-data".into())
                .spawn(move || accept_tcp(d4, data, shutdown, Port::DataOnly))
                .map_err(|e| DaemonError::Internal(e.to_string()))?;
        }
        if let Some(listener) = self.metrics {
            let d6 = daemon.clone();
            let render: crate::metrics::http::Render = Arc::new(move || d6.render_metrics());
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || {
                    crate::metrics::http::serve(
                        listener,
                        render,
                        crate::metrics::http::REQUEST_TIMEOUT,
                    )
                })
                .map_err(|e| DaemonError::Internal(e.to_string()))?;
        }
        let d5 = daemon.clone();
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
            .map_err(|e| DaemonError::Internal(format!("cannot handle SIGHUP: {e}")))?;
        std::thread::Builder::new()
            .name("sighup".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let (outcome, detail) = match d5.reload() {
                        Ok(()) => ("ok", String::new()),
                        Err(e) => ("failed", format!("{e}; keeping the previous ones")),
                    };
                    d5.audit.record(&Event {
                        what: "credentials",
                        who: "-",
                        from: "SIGHUP",
                        scheme: "-",
                        op: "reload",
                        subject: "",
                        outcome,
                        detail: &detail,
                        ..Default::default()
                    });
                }
            })
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let d3 = daemon.clone();
        std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || sweep(d3))
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        match self.tcp {
            Some(tcp) => accept_tcp(daemon, tcp, self.shutdown, Port::Control),
            None => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }
}

fn accept_unix(daemon: Arc<Daemon>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let daemon = daemon.clone();
        let _ = std::thread::Builder::new()
            .name("control-unix".into())
            .spawn(move || {
                let mut conn = conn;
                let cred = match peercred::peer_cred(&conn) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("unix control connection refused: no peer credentials: {e}");
                        return;
                    }
                };
                let from = format!("local (pid {})", cred.pid.unwrap_or(0));
                match daemon.policy().unix(cred.uid, cred.gid) {
                    Ok(id) => {
                        audit_connection(
                            &daemon,
                            &id.name,
                            &from,
                            id.scheme,
                            "ok",
                            id.role.as_str(),
                        );
                        let caller = Caller::new(from, Some(id));
                        serve_control(&daemon, &mut conn, &caller, |s, t| {
                            let _ = s.set_read_timeout(t);
                        });
                    }
                    Err(why) => {
                        let why = why.to_string();
                        let who = format!("uid {}", cred.uid);
                        audit_connection(&daemon, &who, &from, crate::auth::UNIX, "refused", &why);
                        let _ = conn.set_read_timeout(Some(REFUSE_READ));
                        let _ = conn.set_write_timeout(Some(REFUSE_WRITE));
                        refuse(&mut conn, &why);
                        let _ = conn.shutdown(std::net::Shutdown::Write);
                    }
                }
            });
    }
}

/// How long a refused client gets to send its hello, and we to answer it.
const REFUSE_READ: Duration = Duration::from_millis(500);
const REFUSE_WRITE: Duration = Duration::from_secs(2);

/// Answers a refused client's hello with the reason. The hello is read first (briefly),
/// so the answer is not lost to a reset when we close with unread data in the socket.
fn refuse<S: std::io::Read + std::io::Write>(conn: &mut S, why: &str) {
    let _ = vmferry_channel::framed::read_json::<_, serde_json::Value>(conn, 4096);
    crate::control::reply_error(
        conn,
        0,
        vmferry_proto::WireError::new(vmferry_proto::ErrorKind::Denied, why.to_string()),
    );
}

fn audit_connection(
    daemon: &Daemon,
    who: &str,
    from: &str,
    scheme: &str,
    outcome: &str,
    detail: &str,
) {
    daemon.audit.record(&Event {
        what: "connection",
        who,
        from,
        scheme,
        op: "control",
        subject: "",
        outcome,
        detail,
        ..Default::default()
    });
}

/// What a TCP port serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// Control connections and, told apart by the server name, data connections.
    Control,
    /// Data connections only.
    DataOnly,
}

/// The half of a migration a data connection is for.
enum Route {
    Destination(Arc<crate::migration::DestinationMigration>),
    Source(Arc<crate::migration::SourceMigration>),
    Libvirt(Arc<crate::libvirt::LibvirtDestination>),
}

fn accept_tcp(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    shutdown: Arc<AtomicBool>,
    port: Port,
) -> Result<()> {
    let pending = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if shutdown.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        if pending.load(Ordering::SeqCst) >= MAX_PENDING {
            tracing::warn!("too many connections in handshake; dropping one");
            continue;
        }
        pending.fetch_add(1, Ordering::SeqCst);
        let daemon = daemon.clone();
        let pending = pending.clone();
        let _ = std::thread::Builder::new()
            .name("conn-tcp".into())
            .spawn(move || handle_tcp(daemon, conn, pending, port));
    }
    Ok(())
}

use std::io::Write as _;

fn handle_tcp(daemon: Arc<Daemon>, conn: TcpStream, pending: Arc<AtomicUsize>, port: Port) {
    // A TLS handshake and a control exchange are small writes answered by the peer: with
    // Nagle on, each waited for the peer's delayed ACK (~25-40 ms per handshake, measured).
    let _ = conn.set_nodelay(true);
    let peer = conn
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let Some(control) = daemon.control_tls() else {
        pending.fetch_sub(1, Ordering::SeqCst);
        return;
    };
    let mut route: Option<Route> = None;
    let mut data_sni = false;
    let accepted = tls::accept_any(conn, HANDSHAKE_TIMEOUT, |sni| {
        match sni.and_then(tls::migration_id_from_sni) {
            Some(id) => {
                data_sni = true;
                let id = MigrationId::new(id).ok()?;
                if let Ok(m) = daemon.migrations.destination(&id) {
                    let cfg = m.data_config()?;
                    route = Some(Route::Destination(m));
                    return Some(tls::Choice::Data(cfg));
                }
                if let Some(m) = daemon.migrations.libvirt_destination(&id) {
                    let cfg = m.data_config()?;
                    route = Some(Route::Libvirt(m));
                    return Some(tls::Choice::Data(cfg));
                }
                let m = daemon.migrations.source(&id).ok()?;
                let cfg = m.data_config()?;
                route = Some(Route::Source(m));
                Some(tls::Choice::Data(cfg))
            }
            None if port == Port::Control => Some(tls::Choice::Control(control)),
            None => None,
        }
    });
    pending.fetch_sub(1, Ordering::SeqCst);
    let (accepted, _sni) = match accepted {
        Ok(s) => s,
        Err(e) => {
            let what = if data_sni { "data" } else { "control" };
            daemon.audit.record(&Event {
                what: "connection",
                who: "-",
                from: &peer,
                scheme: "tls",
                op: what,
                subject: "",
                outcome: "refused",
                detail: &e.to_string(),
                ..Default::default()
            });
            return;
        }
    };
    match (route, accepted) {
        (Some(route), tls::Accepted::Data(session, sock)) => {
            let (pre, conn) = match crate::migration::channel::read_preamble(session, sock) {
                Ok(x) => x,
                Err(e) => {
                    audit_data(&daemon, &peer, "", "refused", &e.to_string());
                    return;
                }
            };
            let (id, r) = match &route {
                Route::Destination(m) => (m.id.clone(), m.accept_data(&daemon, pre, conn)),
                Route::Source(m) => (m.id.clone(), m.accept_reverse(pre, conn)),
                Route::Libvirt(m) => (m.id.clone(), m.accept_data(pre, conn)),
            };
            match r {
                Ok(()) => audit_data(
                    &daemon,
                    &peer,
                    id.as_str(),
                    "ok",
                    &format!("{} stream {} of {}", pre.transport, pre.stream, pre.streams),
                ),
                Err(e) => audit_data(&daemon, &peer, id.as_str(), "refused", &e.to_string()),
            }
        }
        (_, tls::Accepted::Data(..)) | (Some(_), tls::Accepted::Control(_)) => {
            // accept_any answers as `choose` chose, and it chose by the route.
            audit_data(
                &daemon,
                &peer,
                "",
                "refused",
                "internal error: route and connection kind disagree",
            );
        }
        (None, tls::Accepted::Control(mut stream)) => {
            let policy = daemon.policy();
            let identity: std::result::Result<Option<Identity>, crate::auth::AuthError> =
                match stream.conn.peer_certificates().and_then(|c| c.first()) {
                    Some(cert) => policy.x509(cert).map(Some),
                    None if policy.accepts(crate::auth::SCRAM) => Ok(None),
                    None => Err(crate::auth::AuthError::NoClientCertificate),
                };
            match identity {
                Ok(id) => {
                    match &id {
                        Some(i) => audit_connection(
                            &daemon,
                            &i.name,
                            &peer,
                            i.scheme,
                            "ok",
                            i.role.as_str(),
                        ),
                        None => audit_connection(
                            &daemon,
                            "-",
                            &peer,
                            "tls",
                            "ok",
                            "not yet authenticated",
                        ),
                    }
                    let caller = Caller::new(peer.clone(), id);
                    serve_control(&daemon, &mut stream, &caller, |s, t| {
                        let _ = s.sock.set_read_timeout(t);
                    });
                }
                Err(why) => {
                    let why = why.to_string();
                    let who = client_name(&stream).unwrap_or_else(|| "-".into());
                    audit_connection(&daemon, &who, &peer, crate::auth::X509, "refused", &why);
                    let _ = stream.sock.set_read_timeout(Some(REFUSE_READ));
                    let _ = stream.sock.set_write_timeout(Some(REFUSE_WRITE));
                    refuse(&mut stream, &why);
                    stream.conn.send_close_notify();
                    let _ = stream.flush();
                }
            }
        }
    }
}

fn audit_data(daemon: &Daemon, from: &str, migration: &str, outcome: &str, detail: &str) {
    daemon.audit.record(&Event {
        what: "connection",
        who: "migration peer",
        from,
        scheme: "tls (pinned or x509)",
        op: "data",
        subject: migration,
        outcome,
        detail,
        ..Default::default()
    });
}

/// The subject of the client's certificate, for logs.
fn client_name(s: &rustls::StreamOwned<rustls::ServerConnection, TcpStream>) -> Option<String> {
    let cert = s.conn.peer_certificates()?.first()?;
    Some(tls::subject_of(cert))
}

/// Drops prepared migrations nobody connected to before their credentials expired, and
/// acts on leases that ran out (each half by its own state).
fn sweep(daemon: Arc<Daemon>) {
    loop {
        std::thread::sleep(SWEEP_EVERY);
        let destinations: Vec<_> = lock(&daemon.migrations.destinations)
            .values()
            .cloned()
            .collect();
        for m in destinations {
            if m.expired() {
                m.abort(&daemon, "its one-time credentials expired unused");
            } else {
                m.check_lease(&daemon);
            }
        }
        let sources: Vec<_> = lock(&daemon.migrations.sources).values().cloned().collect();
        for m in sources {
            m.check_lease(&daemon);
        }
    }
}

/// How often leases and credentials are checked: a small part of the shortest lease.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
