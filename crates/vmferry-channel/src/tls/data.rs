//! The handshakes of data connections, through rustls' unbuffered API: driven to the end
//! by a deadline, then turned into a [`Session`] with `dangerous_into_kernel_connection`,
//! so that the pump's record layer carries the records and rustls' `KernelConnection`
//! renews the keys. ([`connect_data`] dials; the shared port's
//! [`accept_any`](super::accept_any) answers with [`Choice::Data`](super::Choice).)
//!
//! This module must never let a handshake wait without a deadline, never hand out a
//! session whose handshake has not completed, and never drop a byte that arrived after
//! the handshake (it is plaintext for the session, or the start of its next record).

use super::describe::{describe_as, Side};
use super::TlsError;
use crate::pump::{Kernel, Session};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most handshake bytes held at once: a handshake message may span records, which
/// stay in the buffer until it is whole (a long certificate chain); 64 KiB is plenty.
const MAX_INCOMING: usize = 4 * crate::pump::record::SLOT;

/// Client side of a data connection: a TLS handshake over the connected `tcp`, completed
/// within `timeout`. `server_name` is what the server's certificate is checked against
/// (and the SNI sent); `peer` names the server in errors. Socket timeouts are cleared on
/// success.
pub fn connect_data(
    tcp: &mut TcpStream,
    server_name: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
    peer: &str,
) -> Result<Session, TlsError> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|_| {
        TlsError::Config(format!(
            "'{server_name}' is not a valid TLS server name (a DNS name or an IP address)"
        ))
    })?;
    let mut conn = UnbufferedClientConnection::new(config, name)
        .map_err(|e| TlsError::Config(format!("cannot start a TLS session with {peer}: {e}")))?;
    let mut d = Driver::new(tcp, peer, timeout, Side::Client, Vec::new());
    d.run(&mut conn)?;
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| d.internal(e))?;
    d.session(secrets, Kernel::Client(kernel))
}

/// Server side, after the shared port read the ClientHello (`hello`: every byte read
/// so far) and picked `config` for it. `who` names the client in errors.
pub(super) fn accept_data(
    tcp: &mut TcpStream,
    config: Arc<ServerConfig>,
    hello: Vec<u8>,
    who: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<Session, TlsError> {
    let mut conn = UnbufferedServerConnection::new(config)
        .map_err(|e| TlsError::Config(format!("cannot start a TLS session with {who}: {e}")))?;
    let mut d = Driver::new(tcp, who, timeout, Side::Server, hello);
    d.deadline = deadline;
    d.run(&mut conn)?;
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| d.internal(e))?;
    d.session(secrets, Kernel::Server(kernel))
}

/// The two unbuffered connections, for one driver.
trait Unbuffered {
    type Data;
    fn handshaking(&self) -> bool;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
}

/// What to do once a state was handled (its borrows ended).
enum Next {
    Continue,
    ReadMore,
    /// rustls may send data; the handshake is done unless it still waits for the peer
    /// (a server may write before the client's Finished arrived).
    Writable,
    /// The handshake failed.
    Failed(rustls::Error),
}

/// One handshake's buffers and deadline.
struct Driver<'a> {
    tcp: &'a mut TcpStream,
    who: &'a str,
    timeout: Duration,
    deadline: Instant,
    side: Side,
    /// Bytes from the peer not yet processed: `incoming[..used]`.
    incoming: Vec<u8>,
    used: usize,
    /// Records to send: `outgoing[..out]`.
    outgoing: Vec<u8>,
    out: usize,
    /// Plaintext that arrived with the handshake (the client's first message).
    early: Vec<u8>,
    peer_done: bool,
}

impl<'a> Driver<'a> {
    fn new(
        tcp: &'a mut TcpStream,
        who: &'a str,
        timeout: Duration,
        side: Side,
        incoming: Vec<u8>,
    ) -> Driver<'a> {
        let used = incoming.len();
        Driver {
            tcp,
            who,
            timeout,
            deadline: Instant::now() + timeout,
            side,
            incoming,
            used,
            outgoing: vec![0u8; 16 * 1024],
            out: 0,
            early: Vec::new(),
            peer_done: false,
        }
    }

    /// Drives `conn` until its handshake is complete and nothing waits to be sent.
    fn run<C: Unbuffered>(&mut self, conn: &mut C) -> Result<(), TlsError> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process(&mut self.incoming[..self.used]);
            let next = match state {
                Err(e) => Next::Failed(e),
                Ok(ConnectionState::EncodeTlsData(mut s)) => {
                    loop {
                        match s.encode(&mut self.outgoing[self.out..]) {
                            Ok(n) => {
                                self.out += n;
                                break;
                            }
                            Err(EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => self.outgoing.resize(self.out + required_size, 0),
                            Err(e) => {
                                return Err(TlsError::Handshake(format!(
                                    "TLS handshake with {}: {e}",
                                    self.who
                                )))
                            }
                        }
                    }
                    Next::Continue
                }
                Ok(ConnectionState::TransmitTlsData(s)) => {
                    self.transmit()?;
                    s.done();
                    Next::Continue
                }
                Ok(ConnectionState::BlockedHandshake) => Next::ReadMore,
                Ok(ConnectionState::WriteTraffic(_)) => Next::Writable,
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(|e| {
                            TlsError::Handshake(describe_as(&e, self.who, self.side))
                        })?;
                        discard += record.discard;
                        self.early.extend_from_slice(record.payload);
                    }
                    Next::Continue
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_done = true;
                    Next::Continue
                }
                Ok(ConnectionState::Closed) => {
                    return Err(TlsError::Closed {
                        peer: self.who.to_string(),
                        hint: self.side.closed_hint(),
                    })
                }
                Ok(other) => {
                    return Err(TlsError::Handshake(format!(
                        "TLS handshake with {}: rustls is in a state a data connection never \
                         enters ({other:?})",
                        self.who
                    )))
                }
            };
            self.incoming.copy_within(discard..self.used, 0);
            self.used -= discard;
            match next {
                Next::Failed(e) => {
                    self.send_alert(conn);
                    return Err(TlsError::Handshake(describe_as(&e, self.who, self.side)));
                }
                Next::Continue => {}
                Next::Writable if !conn.handshaking() => break,
                Next::Writable | Next::ReadMore => self.read_more()?,
            }
        }
        // Callers set their own timeouts for the data that follows.
        let _ = self.tcp.set_read_timeout(None);
        let _ = self.tcp.set_write_timeout(None);
        Ok(())
    }

    fn left(&self) -> Result<Duration, TlsError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: self.who.to_string(),
                after: self.timeout,
            });
        }
        Ok(left)
    }

    fn transmit(&mut self) -> Result<(), TlsError> {
        let left = self.left()?;
        let _ = self.tcp.set_write_timeout(Some(left));
        let r = self.tcp.write_all(&self.outgoing[..self.out]);
        self.out = 0;
        r.map_err(|e| self.io_err(e))
    }

    fn read_more(&mut self) -> Result<(), TlsError> {
        if self.used == self.incoming.len() {
            if self.incoming.len() >= MAX_INCOMING {
                return Err(TlsError::Handshake(format!(
                    "{} sent a handshake message larger than TLS allows",
                    self.who
                )));
            }
            let more = (self.incoming.len() * 2).clamp(16 * 1024, MAX_INCOMING);
            self.incoming.resize(more, 0);
        }
        loop {
            let left = self.left()?;
            let _ = self.tcp.set_read_timeout(Some(left));
            match self.tcp.read(&mut self.incoming[self.used..]) {
                Ok(0) => {
                    return Err(TlsError::Closed {
                        peer: self.who.to_string(),
                        hint: self.side.closed_hint(),
                    })
                }
                Ok(n) => {
                    self.used += n;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
    }

    /// After a failure rustls holds an alert saying why: send it, best effort, so the
    /// peer learns the reason rather than seeing a closed connection. (rustls must be
    /// given the same buffer again: a handshake message it holds in part points into it.)
    fn send_alert<C: Unbuffered>(&mut self, conn: &mut C) {
        // Each alert chunk is written as soon as it is encoded: asked again, rustls would
        // go on with the records after the failed one and answer with the error again.
        for _ in 0..4 {
            let UnbufferedStatus { discard, state } = conn.process(&mut self.incoming[..self.used]);
            let Ok(ConnectionState::EncodeTlsData(mut s)) = state else {
                return;
            };
            self.out = 0;
            match s.encode(&mut self.outgoing) {
                Ok(n) => self.out = n,
                Err(_) => return,
            }
            if self.transmit().is_err() {
                return;
            }
            self.incoming.copy_within(discard..self.used, 0);
            self.used -= discard;
        }
    }

    fn io_err(&self, e: std::io::Error) -> TlsError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => TlsError::Timeout {
                peer: self.who.to_string(),
                after: self.timeout,
            },
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => TlsError::Closed {
                peer: self.who.to_string(),
                hint: self.side.closed_hint(),
            },
            _ => TlsError::Io {
                peer: self.who.to_string(),
                source: e,
            },
        }
    }

    fn internal(&self, e: rustls::Error) -> TlsError {
        TlsError::Config(format!(
            "cannot take over the TLS record layer of the connection with {} ({e}): the \
             configuration must enable secret extraction",
            self.who
        ))
    }

    /// The session, with what arrived after the handshake.
    fn session(
        self,
        secrets: rustls::ExtractedSecrets,
        kernel: Kernel,
    ) -> Result<Session, TlsError> {
        Session::new(
            secrets,
            kernel,
            &self.incoming[..self.used],
            self.early,
            self.peer_done,
        )
        .map_err(|e| TlsError::Handshake(format!("{}: {e}", self.who)))
    }
}
