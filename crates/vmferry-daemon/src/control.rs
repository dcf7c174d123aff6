//! One control session: the version handshake, then requests answered in order.
//!
//! What arrives here is authenticated (mutual TLS or unix peer credentials) but still not
//! trusted: every frame is size-bounded, every wait has a deadline, and a malformed
//! message ends in an error reply and a closed connection, never a panic.

use crate::audit::Event;
use crate::auth::{Identity, Role, SCRAM};
use crate::error::{DaemonError, Result};
use crate::libvirt::{LibvirtDestination, LibvirtSource};
use crate::migration::record::Parties;
use crate::migration::{DestinationMigration, SourceMigration};
use crate::state::Daemon;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;
use vmferry_channel::framed::{self, FrameError, MAX_FRAME};
use vmferry_proto::{
    negotiate_version, ErrorKind, Hello, Request, RequestBody, Response, ResponseBody, VmRef,
    WireError,
};

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest long-poll a status request may ask for.
const MAX_STATUS_WAIT_MS: u64 = 5_000;
/// How long a session may stay silent between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Who is on the other end: where from, and (once known) who, with what role.
#[derive(Debug, Clone)]
pub struct Caller {
    pub from: String,
    pub identity: Option<Identity>,
}

impl Caller {
    pub fn new(from: String, identity: Option<Identity>) -> Caller {
        Caller { from, identity }
    }

    /// Who asks for a migration, for its audit line.
    fn parties(&self) -> Parties {
        match &self.identity {
            Some(i) => Parties::new(&i.name, i.scheme),
            None => Parties::new("-", "-"),
        }
    }

    fn who(&self) -> String {
        match &self.identity {
            Some(i) => format!("{} at {}", i.name, self.from),
            None => format!("unauthenticated client at {}", self.from),
        }
    }
}

/// Serves one control connection until the peer closes it or breaks the protocol.
/// `set_timeout` sets the read timeout of the underlying socket.
pub fn serve_control<S: Read + Write>(
    daemon: &Arc<Daemon>,
    stream: &mut S,
    caller: &Caller,
    set_timeout: impl Fn(&mut S, Option<Duration>),
) {
    let mut caller = caller.clone();
    set_timeout(stream, Some(HELLO_TIMEOUT));
    let hello: Hello =
        match framed::read_json(&mut framed::Deadline::new(stream, HELLO_TIMEOUT), MAX_FRAME) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(caller = %caller.who(), "control session refused: bad hello: {e}");
                reply_error(
                    stream,
                    0,
                    WireError::new(
                        ErrorKind::BadRequest,
                        format!("expected a hello message: {e}"),
                    ),
                );
                return;
            }
        };
    // The version both speak: the client's, if this daemon still accepts it, capped by
    // the version this daemon is configured to speak (tests use that to stand in for
    // the previous release).
    let version = match negotiate_version(hello.version, &hello.agent) {
        Ok(v) => v.min(daemon.config.protocol_version()),
        Err(e) => {
            tracing::warn!(caller = %caller.who(), version = hello.version, "control session refused: {e}");
            reply_error(
                stream,
                0,
                WireError::new(
                    ErrorKind::Version,
                    format!("this daemon refuses the client: {e}"),
                ),
            );
            return;
        }
    };
    let policy = daemon.policy();
    let mine = Hello {
        version,
        agent: format!(
            "vmferry-daemon {} on {}",
            env!("CARGO_PKG_VERSION"),
            daemon.hostname
        ),
        identity: caller.identity.as_ref().map(|i| i.describe()),
        auth: if caller.identity.is_none() && policy.accepts(SCRAM) {
            vec![SCRAM.to_string()]
        } else {
            Vec::new()
        },
    };
    if framed::write_json(stream, &mine).is_err() {
        return;
    }
    loop {
        // An unauthenticated client gets no more time than a hello.
        let idle = if caller.identity.is_some() {
            IDLE_TIMEOUT
        } else {
            HELLO_TIMEOUT
        };
        set_timeout(stream, Some(idle));
        let req: Request =
            match framed::read_json(&mut framed::Deadline::new(stream, idle), MAX_FRAME) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(FrameError::Timeout) => {
                    tracing::info!(caller = %caller.who(), "control session idle; closing");
                    return;
                }
                Err(e) => {
                    tracing::warn!(caller = %caller.who(), "bad control message: {e}");
                    reply_error(
                        stream,
                        0,
                        WireError::new(ErrorKind::BadRequest, format!("bad control message: {e}")),
                    );
                    return;
                }
            };
        let op = req.body.op();
        if let RequestBody::Auth { scheme, message } = &req.body {
            match scram_exchange(daemon, stream, &mut caller, req.id, scheme, message) {
                Ok(()) => continue,
                Err(()) => return,
            }
        }
        let subject = subject_of(&req.body);
        let read_only = req.body.is_read_only();
        let body = match authorize(&caller, &req.body) {
            Err(e) => {
                audit_request(daemon, &caller, op, &subject, "refused", &e.to_string());
                ResponseBody::Error { error: e.to_wire() }
            }
            Ok(()) => match handle(daemon, &caller, req.body) {
                Ok(b) => {
                    if !read_only {
                        audit_request(daemon, &caller, op, &subject, "ok", "");
                    }
                    b
                }
                Err(e) => {
                    audit_request(daemon, &caller, op, &subject, "failed", &e.to_string());
                    ResponseBody::Error { error: e.to_wire() }
                }
            },
        };
        if framed::write_json(stream, &Response { id: req.id, body }).is_err() {
            return;
        }
    }
}

/// Whether the caller may make this request.
fn authorize(caller: &Caller, body: &RequestBody) -> Result<()> {
    match &caller.identity {
        None => Err(DaemonError::Denied(format!(
            "authenticate first: this daemon accepts {SCRAM} for clients without a \
             certificate (give --user NAME and the password)"
        ))),
        Some(id) if id.role == Role::ReadOnly && !body.is_read_only() => {
            Err(DaemonError::Denied(format!(
                "{} may only read (status, lists); '{}' needs an operator",
                id.name,
                body.op()
            )))
        }
        Some(_) => Ok(()),
    }
}

/// The migration or VM a request is about, for the audit log.
fn subject_of(body: &RequestBody) -> String {
    match body {
        RequestBody::VmStart { spec } => spec.name.to_string(),
        RequestBody::VmStop { name } => name.to_string(),
        RequestBody::Begin { migration, .. }
        | RequestBody::Status { migration, .. }
        | RequestBody::Detach { migration }
        | RequestBody::Cancel { migration }
        | RequestBody::Finish { migration }
        | RequestBody::Confirm { migration, .. }
        | RequestBody::Abort { migration, .. } => migration.to_string(),
        RequestBody::Prepare { cookie, .. }
        | RequestBody::Perform { cookie }
        | RequestBody::Connect { cookie, .. } => cookie.migration.to_string(),
        _ => String::new(),
    }
}

fn audit_request(
    daemon: &Daemon,
    caller: &Caller,
    op: &str,
    subject: &str,
    outcome: &str,
    detail: &str,
) {
    let (who, scheme) = match &caller.identity {
        Some(i) => (i.name.as_str(), i.scheme),
        None => ("-", "-"),
    };
    daemon.audit.record(&Event {
        what: "request",
        who,
        from: &caller.from,
        scheme,
        op,
        subject,
        outcome,
        detail,
        ..Default::default()
    });
}

/// Runs a SCRAM-SHA-256 exchange: `first` is the client-first message; reads the
/// client-final from the stream. On success the caller is authenticated. `Err` means
/// the session must end (the reason was sent and logged).
fn scram_exchange<S: Read + Write>(
    daemon: &Daemon,
    stream: &mut S,
    caller: &mut Caller,
    id: u64,
    scheme: &str,
    first: &str,
) -> std::result::Result<(), ()> {
    let policy = daemon.policy();
    let fail = |stream: &mut S, caller: &Caller, user: &str, why: &str, detail: &str| {
        daemon.audit.record(&Event {
            what: "connection",
            who: user,
            from: &caller.from,
            scheme: SCRAM,
            op: "auth",
            subject: "",
            outcome: "refused",
            detail,
            ..Default::default()
        });
        reply_error(
            stream,
            id,
            WireError::new(ErrorKind::Denied, why.to_string()),
        );
    };
    if caller.identity.is_some() {
        fail(
            stream,
            caller,
            "-",
            "already authenticated",
            "second authentication",
        );
        return Err(());
    }
    if scheme != SCRAM || !policy.accepts(SCRAM) {
        let why = format!(
            "authentication scheme '{scheme}' is not accepted here (accepted: {:?})",
            policy.schemes
        );
        fail(stream, caller, "-", &why, &why);
        return Err(());
    }
    // The user name as the client claims it, for the log only (RFC 5802: n,,n=NAME,r=...).
    let claimed: String = first
        .split(',')
        .find_map(|p| p.strip_prefix("n="))
        .unwrap_or("?")
        .chars()
        .take(64)
        .collect();
    let wrong = "authentication failed: unknown user or wrong password";
    let server = scram_2::ScramServer::new(policy.users().clone());
    let sf = match server.handle_client_first(first) {
        Ok(sf) => sf,
        Err(e) => {
            fail(stream, caller, &claimed, wrong, &e.to_string());
            return Err(());
        }
    };
    let (cf, server_first) = sf.server_first();
    let reply = Response {
        id,
        body: ResponseBody::Auth {
            message: server_first,
            identity: None,
        },
    };
    if framed::write_json(stream, &reply).is_err() {
        return Err(());
    }
    let next: Request =
        match framed::read_json(&mut framed::Deadline::new(stream, HELLO_TIMEOUT), MAX_FRAME) {
            Ok(Some(r)) => r,
            _ => return Err(()),
        };
    let RequestBody::Auth { message, .. } = next.body else {
        fail(
            stream,
            caller,
            &claimed,
            "expected the final authentication message",
            "protocol",
        );
        return Err(());
    };
    let status = cf.handle_client_final(&message).map(|f| f.server_final());
    match status {
        Ok((scram_2::AuthenticationStatus::Authenticated, server_final)) => {
            let role = policy.users().role_of(&claimed).unwrap_or(Role::ReadOnly);
            let identity = Identity {
                name: format!("user {claimed}"),
                scheme: SCRAM,
                role,
            };
            daemon.audit.record(&Event {
                what: "connection",
                who: &identity.name,
                from: &caller.from,
                scheme: SCRAM,
                op: "auth",
                subject: "",
                outcome: "ok",
                detail: role.as_str(),
                ..Default::default()
            });
            let reply = Response {
                id: next.id,
                body: ResponseBody::Auth {
                    message: server_final,
                    identity: Some(identity.describe()),
                },
            };
            caller.identity = Some(identity);
            framed::write_json(stream, &reply).map_err(|_| ())
        }
        Ok((_, _)) => {
            fail(stream, caller, &claimed, wrong, "wrong password");
            Err(())
        }
        Err(e) => {
            fail(stream, caller, &claimed, wrong, &e.to_string());
            Err(())
        }
    }
}

pub(crate) fn reply_error<S: Write>(stream: &mut S, id: u64, error: WireError) {
    let _ = framed::write_json(
        stream,
        &Response {
            id,
            body: ResponseBody::Error { error },
        },
    );
}

fn handle(daemon: &Arc<Daemon>, caller: &Caller, body: RequestBody) -> Result<ResponseBody> {
    Ok(match body {
        RequestBody::Auth { .. } => {
            return Err(DaemonError::BadRequest(
                "authentication is only possible at the start of a session".into(),
            ))
        }
        RequestBody::Ping => ResponseBody::Pong {
            host: daemon.hostname.clone(),
        },
        RequestBody::VmStart { spec } => {
            let vm = daemon.vms.start(spec, false)?;
            tracing::info!(vm = %vm.spec.name, "{}", vm.accel_reason);
            ResponseBody::Vm { vm: vm.info() }
        }
        RequestBody::VmList => ResponseBody::Vms {
            vms: daemon.vms.list(),
        },
        RequestBody::VmStop { name } => {
            daemon.vms.stop(&name)?;
            ResponseBody::Done
        }
        RequestBody::Begin {
            migration,
            vm: VmRef::Libvirt { domain },
            options,
        } => ResponseBody::Cookie {
            cookie: LibvirtSource::begin(daemon, migration, domain, options, caller.parties())?,
        },
        RequestBody::Begin {
            migration,
            vm,
            options,
        } => ResponseBody::Cookie {
            cookie: SourceMigration::begin(daemon, migration, vm, options, caller.parties())?,
        },
        RequestBody::Prepare {
            cookie,
            vm: VmRef::Libvirt { domain },
        } => ResponseBody::Cookie {
            cookie: LibvirtDestination::prepare(daemon, cookie, domain, caller.parties())?,
        },
        RequestBody::Prepare { cookie, vm } => ResponseBody::Cookie {
            cookie: DestinationMigration::prepare(daemon, cookie, vm, caller.parties())?,
        },
        RequestBody::Connect {
            cookie,
            transport,
            timeout_ms,
        } => {
            let timeout = std::time::Duration::from_millis(timeout_ms.clamp(100, 60_000));
            if let Some(m) = daemon.migrations.libvirt_source(&cookie.migration) {
                m.connect(daemon, &cookie, transport, timeout)?;
            } else if daemon
                .migrations
                .libvirt_destination(&cookie.migration)
                .is_some()
            {
                return Err(DaemonError::BadRequest(
                    "a libvirt migration's destination dials nothing (no reverse transport)".into(),
                ));
            } else if let Ok(m) = daemon.migrations.source(&cookie.migration) {
                m.connect(daemon, &cookie, transport, timeout)?;
            } else {
                let m = daemon.migrations.destination(&cookie.migration)?;
                if transport != vmferry_proto::Transport::Reverse {
                    return Err(DaemonError::BadRequest(format!(
                        "the destination dials only for the reverse transport, not {transport}"
                    )));
                }
                m.connect_reverse(daemon, &cookie, timeout)?;
            }
            ResponseBody::Done
        }
        RequestBody::Perform { cookie } => {
            if let Some(m) = daemon.migrations.libvirt_source(&cookie.migration) {
                m.perform(daemon, &cookie)?;
                return Ok(ResponseBody::Done);
            }
            let m = daemon.migrations.source(&cookie.migration)?;
            m.perform(daemon, &cookie)?;
            ResponseBody::Done
        }
        RequestBody::Status {
            migration,
            wait_ms,
            renew,
        } => {
            // Either half answers; a renewal reaches whichever halves live here.
            let lv_source = daemon.migrations.libvirt_source(&migration);
            let lv_destination = daemon.migrations.libvirt_destination(&migration);
            if renew {
                lv_source.iter().for_each(|m| m.renew());
                lv_destination.iter().for_each(|m| m.renew());
            }
            match (lv_source, lv_destination) {
                (Some(m), _) => {
                    let wait = std::time::Duration::from_millis(wait_ms.min(MAX_STATUS_WAIT_MS));
                    return Ok(ResponseBody::Status {
                        status: m.wait_status(wait),
                    });
                }
                (None, Some(m)) => return Ok(ResponseBody::Status { status: m.status() }),
                (None, None) => {}
            }
            let source = daemon.migrations.source(&migration).ok();
            let destination = daemon.migrations.destination(&migration).ok();
            if renew {
                source.iter().for_each(|m| m.renew());
                destination.iter().for_each(|m| m.renew());
            }
            match (source, destination) {
                (Some(m), _) => {
                    let wait = std::time::Duration::from_millis(wait_ms.min(MAX_STATUS_WAIT_MS));
                    ResponseBody::Status {
                        status: m.wait_status(wait),
                    }
                }
                (None, Some(m)) => ResponseBody::Status { status: m.status() },
                (None, None) => match daemon.migrations.ended_status(&migration) {
                    Some(status) => ResponseBody::Status { status },
                    None => {
                        return Err(DaemonError::NotFound(format!(
                            "no migration {migration} on this host"
                        )))
                    }
                },
            }
        }
        RequestBody::Detach { migration } => {
            let lv_source = daemon.migrations.libvirt_source(&migration);
            let lv_destination = daemon.migrations.libvirt_destination(&migration);
            if lv_source.is_some() || lv_destination.is_some() {
                lv_source.iter().for_each(|m| m.detach());
                lv_destination.iter().for_each(|m| m.detach());
                return Ok(ResponseBody::Done);
            }
            let source = daemon.migrations.source(&migration).ok();
            let destination = daemon.migrations.destination(&migration).ok();
            if source.is_none() && destination.is_none() {
                return Err(DaemonError::NotFound(format!(
                    "no migration {migration} in flight on this host"
                )));
            }
            source.iter().for_each(|m| m.detach());
            destination.iter().for_each(|m| m.detach());
            ResponseBody::Done
        }
        RequestBody::MigrationList => ResponseBody::Migrations {
            migrations: daemon.migrations.list(),
        },
        RequestBody::HostInfo => ResponseBody::Host {
            host: crate::host::host_info(daemon)?,
        },
        RequestBody::Finish { migration } => {
            if let Some(m) = daemon.migrations.libvirt_destination(&migration) {
                return match m.finish(daemon) {
                    Ok(status) => Ok(ResponseBody::Status { status }),
                    Err(e) => {
                        m.abort(daemon, &e.to_string());
                        Err(e)
                    }
                };
            }
            let m = daemon.migrations.destination(&migration)?;
            match m.finish(daemon) {
                Ok(status) => ResponseBody::Status { status },
                Err(e) => {
                    m.abort(daemon, &e.to_string());
                    return Err(e);
                }
            }
        }
        RequestBody::Confirm { migration, success } => {
            if let Some(m) = daemon.migrations.libvirt_source(&migration) {
                m.confirm(daemon, success)?;
                return Ok(ResponseBody::Done);
            }
            daemon
                .migrations
                .source(&migration)?
                .confirm(daemon, success)?;
            ResponseBody::Done
        }
        RequestBody::Abort { migration, reason } => {
            if let Some(m) = daemon.migrations.libvirt_destination(&migration) {
                m.abort(daemon, &reason);
                return Ok(ResponseBody::Done);
            }
            match daemon.migrations.destination(&migration) {
                Ok(m) => m.abort(daemon, &reason),
                Err(DaemonError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            ResponseBody::Done
        }
        RequestBody::Cancel { migration } => {
            if let Some(m) = daemon.migrations.libvirt_source(&migration) {
                m.cancel(daemon, &caller.who())?;
                return Ok(ResponseBody::Done);
            }
            daemon
                .migrations
                .source(&migration)?
                .cancel(daemon, &caller.who())?;
            ResponseBody::Done
        }
    })
}
