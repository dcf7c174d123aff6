//! The blocking handshakes, each with a deadline: [`accept_any`] on the shared port (read
//! the ClientHello, let the caller pick a configuration by server name, finish: with
//! rustls' buffered connection for control, or through [`data`](super::data) for a data
//! connection) and [`connect`] (control; data connections dial with
//! [`connect_data`](super::connect_data)).
//!
//! This module must never let a handshake wait without a deadline, never close a
//! refused connection before the peer could read our alert (see `linger_close`), and
//! never hand out a stream whose handshake has not completed.

use super::describe::{describe_as, Side};
use super::TlsError;
use rustls::pki_types::ServerName;
use rustls::server::Acceptor;
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection, StreamOwned,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the shared port serves a connection with, picked by its server name.
pub enum Choice {
    /// A control connection: rustls' buffered connection, for framed requests.
    Control(Arc<ServerConfig>),
    /// A data connection: a [`Session`](crate::pump::Session) whose records the pump
    /// carries.
    Data(Arc<ServerConfig>),
}

/// An accepted connection, as [`Choice`] asked.
// Made once per connection and moved once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Accepted {
    Control(StreamOwned<ServerConnection, TcpStream>),
    Data(crate::pump::Session, TcpStream),
}

/// Server side of the shared port for control connections only: [`accept_any`] with
/// every configuration `choose` returns serving control.
pub fn accept(
    tcp: TcpStream,
    timeout: Duration,
    choose: impl FnOnce(Option<&str>) -> Option<Arc<ServerConfig>>,
) -> Result<(StreamOwned<ServerConnection, TcpStream>, Option<String>), TlsError> {
    match accept_any(tcp, timeout, |sni| choose(sni).map(Choice::Control))? {
        (Accepted::Control(s), sni) => Ok((s, sni)),
        (Accepted::Data(..), _) => Err(TlsError::Config(
            "a control accept made a data connection".into(),
        )),
    }
}

/// Server side of the shared port: reads the ClientHello within `timeout`, asks `choose`
/// for the configuration that serves the server name the client sent (`None` refuses:
/// an unrecognized_name alert is sent, the connection is closed), and completes the
/// handshake by the same deadline. Returns the connection (socket timeouts cleared) and
/// the server name.
pub fn accept_any(
    mut tcp: TcpStream,
    timeout: Duration,
    choose: impl FnOnce(Option<&str>) -> Option<Choice>,
) -> Result<(Accepted, Option<String>), TlsError> {
    let side = Side::Server;
    let who = side.who(
        &tcp.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "at an unknown address".into()),
    );
    let deadline = Instant::now() + timeout;
    let mut acceptor = Acceptor::default();
    // Every byte read, so that a data connection's unbuffered handshake can start over
    // from the ClientHello the acceptor parsed.
    let mut hello: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let accepted = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: who,
                after: timeout,
            });
        }
        let _ = tcp.set_read_timeout(Some(left));
        let n = match tcp.read(&mut chunk) {
            Ok(0) => {
                return Err(TlsError::Closed {
                    peer: who,
                    hint: side.closed_hint(),
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(who, e, timeout, side)),
        };
        hello.extend_from_slice(&chunk[..n]);
        let mut rd = &chunk[..n];
        while !rd.is_empty() {
            if let Err(e) = acceptor.read_tls(&mut rd) {
                linger_close(&tcp);
                return Err(TlsError::Refused {
                    peer: who,
                    reason: format!(
                        "it did not open a TLS handshake ({e}); is it a vmferry client?"
                    ),
                });
            }
        }
        match acceptor.accept() {
            Ok(Some(a)) => break a,
            Ok(None) => {}
            Err((e, mut alert)) => {
                let _ = tcp.set_write_timeout(Some(LINGER));
                let _ = alert.write_all(&mut tcp);
                linger_close(&tcp);
                return Err(TlsError::Refused {
                    peer: who,
                    reason: format!(
                        "it did not open a TLS handshake ({e}); is it a vmferry client?"
                    ),
                });
            }
        }
    };
    let sni = accepted.client_hello().server_name().map(str::to_string);
    let Some(choice) = choose(sni.as_deref()) else {
        // Say why in TLS terms (a fatal unrecognized_name alert, in the clear as it is
        // before any key exists), rather than hanging up without a word.
        let _ = tcp.set_write_timeout(Some(LINGER));
        let _ = tcp.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112]);
        linger_close(&tcp);
        return Err(TlsError::Refused {
            peer: who,
            reason: match &sni {
                Some(name) => format!(
                    "it asked for '{name}', which this daemon does not serve \
                     (an unknown, finished or expired migration?)"
                ),
                None => "it sent no server name, and this daemon serves nothing without one".into(),
            },
        });
    };
    let config = match choice {
        Choice::Control(config) => config,
        Choice::Data(config) => {
            return match super::data::accept_data(&mut tcp, config, hello, &who, timeout, deadline)
            {
                Ok(session) => Ok((Accepted::Data(session, tcp), sni)),
                Err(e) => {
                    // The driver has already tried to send the alert saying why.
                    linger_close(&tcp);
                    Err(e)
                }
            };
        }
    };
    let mut conn = match accepted.into_connection(config) {
        Ok(c) => c,
        Err((e, mut alert)) => {
            let _ = tcp.set_write_timeout(Some(LINGER));
            let _ = alert.write_all(&mut tcp);
            linger_close(&tcp);
            return Err(TlsError::Handshake(describe_as(&e, &who, side)));
        }
    };
    if let Err(e) = finish_handshake(&mut conn, &mut tcp, &who, timeout, deadline, side) {
        // rustls has already tried to send the alert saying why; make sure it is read.
        linger_close(&tcp);
        return Err(e);
    }
    Ok((Accepted::Control(StreamOwned::new(conn, tcp)), sni))
}

/// Client side: a TLS handshake over the connected `tcp`, completed within `timeout`, so
/// that a failure is known before any data flows. `server_name` is what the server's
/// certificate is checked against (and the SNI sent); `peer` (e.g. "10.0.0.2:4700")
/// names the server in errors. Socket timeouts are cleared on success.
pub fn connect(
    mut tcp: TcpStream,
    server_name: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
    peer: &str,
) -> Result<StreamOwned<ClientConnection, TcpStream>, TlsError> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|_| {
        TlsError::Config(format!(
            "'{server_name}' is not a valid TLS server name (a DNS name or an IP address)"
        ))
    })?;
    let mut conn = ClientConnection::new(config, name)
        .map_err(|e| TlsError::Config(format!("cannot start a TLS session with {peer}: {e}")))?;
    let deadline = Instant::now() + timeout;
    finish_handshake(&mut conn, &mut tcp, peer, timeout, deadline, Side::Client)?;
    Ok(StreamOwned::new(conn, tcp))
}

/// How long a refused connection is kept open so the peer reads our alert rather than a
/// reset (closing with its unread data in our buffer would send a TCP RST).
const LINGER: Duration = Duration::from_millis(250);

/// Drives a handshake to completion by `deadline` (`timeout` is what errors report).
fn finish_handshake<D>(
    conn: &mut ConnectionCommon<D>,
    tcp: &mut TcpStream,
    who: &str,
    timeout: Duration,
    deadline: Instant,
    side: Side,
) -> Result<(), TlsError> {
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: who.to_string(),
                after: timeout,
            });
        }
        let _ = tcp.set_read_timeout(Some(left));
        let _ = tcp.set_write_timeout(Some(left));
        match conn.complete_io(tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(who.to_string(), e, timeout, side)),
        }
    }
    // Callers set their own timeouts for the data that follows.
    let _ = tcp.set_read_timeout(None);
    let _ = tcp.set_write_timeout(None);
    Ok(())
}

fn io_err(who: String, e: std::io::Error, timeout: Duration, side: Side) -> TlsError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TlsError::Timeout {
            peer: who,
            after: timeout,
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => TlsError::Closed {
            peer: who,
            hint: side.closed_hint(),
        },
        _ => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) => TlsError::Handshake(describe_as(r, &who, side)),
            None => TlsError::Io {
                peer: who,
                source: e,
            },
        },
    }
}

/// Closes a refused connection so that the peer reads what we sent before it (an alert)
/// instead of a reset: stop writing, then drain what the peer still sends, briefly.
fn linger_close(tcp: &TcpStream) {
    let _ = tcp.shutdown(Shutdown::Write);
    let _ = tcp.set_read_timeout(Some(LINGER));
    let until = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    let mut r = tcp;
    while Instant::now() < until {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}
