//! One control session: the version handshake, then requests answered in order.
//!
//! What arrives here is authenticated (mutual TLS or unix peer credentials) but still not
//! trusted: every frame is size-bounded, every wait has a deadline, and a malformed
//! message ends in an error reply and a closed connection, never a panic.

use crate::error::{DaemonError, Result};
use crate::migration::{DestinationMigration, SourceMigration};
use crate::server::Daemon;
use std::io::{Read, Write};
use std::time::Duration;
use vmferry_channel::framed::{self, FrameError, MAX_FRAME};
use vmferry_proto::{
    ErrorKind, Hello, Request, RequestBody, Response, ResponseBody, WireError, PROTOCOL_VERSION,
};

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest long-poll a status request may ask for.
const MAX_STATUS_WAIT_MS: u64 = 5_000;
/// How long a session may stay silent between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Who is on the other end, for logs and (later) authorization.
#[derive(Debug, Clone)]
pub struct Caller {
    pub who: String,
}

/// Serves one control connection until the peer closes it or breaks the protocol.
/// `set_timeout` sets the read timeout of the underlying socket.
pub fn serve_control<S: Read + Write>(
    daemon: &Daemon,
    stream: &mut S,
    caller: &Caller,
    set_timeout: impl Fn(&mut S, Option<Duration>),
) {
    set_timeout(stream, Some(HELLO_TIMEOUT));
    let hello: Hello = match framed::read_json(stream, MAX_FRAME) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(caller = %caller.who, "control session refused: bad hello: {e}");
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
    if hello.version != PROTOCOL_VERSION {
        tracing::warn!(caller = %caller.who, version = hello.version, "control session refused: version");
        reply_error(
            stream,
            0,
            WireError::new(
                ErrorKind::Version,
                format!(
                    "this daemon speaks control protocol version {PROTOCOL_VERSION}, the client ({}) speaks {}",
                    hello.agent, hello.version
                ),
            ),
        );
        return;
    }
    let mine = Hello {
        version: PROTOCOL_VERSION,
        agent: format!(
            "vmferry-daemon {} on {}",
            env!("CARGO_PKG_VERSION"),
            daemon.hostname
        ),
    };
    if framed::write_json(stream, &mine).is_err() {
        return;
    }
    loop {
        set_timeout(stream, Some(IDLE_TIMEOUT));
        let req: Request = match framed::read_json(stream, MAX_FRAME) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(FrameError::Timeout) => {
                tracing::info!(caller = %caller.who, "control session idle; closing");
                return;
            }
            Err(e) => {
                tracing::warn!(caller = %caller.who, "bad control message: {e}");
                reply_error(
                    stream,
                    0,
                    WireError::new(ErrorKind::BadRequest, format!("bad control message: {e}")),
                );
                return;
            }
        };
        let op = req.body.op();
        let body = match handle(daemon, req.body) {
            Ok(b) => {
                tracing::info!(caller = %caller.who, op, "request done");
                b
            }
            Err(e) => {
                tracing::warn!(caller = %caller.who, op, "request failed: {e}");
                ResponseBody::Error { error: e.to_wire() }
            }
        };
        if framed::write_json(stream, &Response { id: req.id, body }).is_err() {
            return;
        }
    }
}

fn reply_error<S: Write>(stream: &mut S, id: u64, error: WireError) {
    let _ = framed::write_json(
        stream,
        &Response {
            id,
            body: ResponseBody::Error { error },
        },
    );
}

fn handle(daemon: &Daemon, body: RequestBody) -> Result<ResponseBody> {
    Ok(match body {
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
            vm,
            options,
        } => ResponseBody::Cookie {
            cookie: SourceMigration::begin(daemon, migration, vm, options)?,
        },
        RequestBody::Prepare { cookie, vm } => ResponseBody::Cookie {
            cookie: DestinationMigration::prepare(daemon, cookie, vm)?,
        },
        RequestBody::Connect {
            cookie,
            transport,
            timeout_ms,
        } => {
            let timeout = std::time::Duration::from_millis(timeout_ms.clamp(100, 60_000));
            if let Ok(m) = daemon.migrations.source(&cookie.migration) {
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
            let m = daemon.migrations.source(&cookie.migration)?;
            m.perform(daemon, &cookie)?;
            ResponseBody::Done
        }
        RequestBody::Status { migration, wait_ms } => {
            let m = match daemon.migrations.source(&migration) {
                Ok(m) => m,
                Err(e) => {
                    return match daemon.migrations.ended_status(&migration) {
                        Some(status) => Ok(ResponseBody::Status { status }),
                        None => Err(e),
                    }
                }
            };
            let wait = std::time::Duration::from_millis(wait_ms.min(MAX_STATUS_WAIT_MS));
            ResponseBody::Status {
                status: m.wait_status(wait),
            }
        }
        RequestBody::MigrationList => ResponseBody::Migrations {
            migrations: daemon.migrations.list(),
        },
        RequestBody::Finish { migration } => {
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
            daemon
                .migrations
                .source(&migration)?
                .confirm(daemon, success)?;
            ResponseBody::Done
        }
        RequestBody::Abort { migration, reason } => {
            match daemon.migrations.destination(&migration) {
                Ok(m) => m.abort(daemon, &reason),
                Err(DaemonError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            ResponseBody::Done
        }
    })
}
