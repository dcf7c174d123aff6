//! A data connection's TLS session once rustls' handshake is done: its record layer is
//! ours ([`Outbound`], [`Inbound`]), its keys are renewed through rustls'
//! `KernelConnection`. The daemon holds one per data connection, reads and writes the
//! connection's first messages (preamble, acknowledgement, the peer link's messages)
//! through [`Session::stream`], then hands it to [`pump`](super::pump) or a tunnel.
//!
//! What this module must never do: hand out plaintext from a record that failed, go on
//! after a failed record (every later read fails too), or make a session whose keys
//! cannot be renewed.

use super::record::{Kernel, Opener, RecordError, Renewal, Sealer};
use super::wire::{Inbound, Outbound, WireError};
use rustls::ExtractedSecrets;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

/// An established data connection's TLS state, without its socket.
pub struct Session {
    outbound: Outbound,
    inbound: Inbound,
    /// Plaintext that arrived with the handshake, and how far it was read.
    early: Vec<u8>,
    early_off: usize,
    /// The peer's close_notify came.
    peer_done: bool,
    /// A record failed or the socket did: the session is unusable.
    broken: Option<String>,
    suite: rustls::CipherSuite,
    renewal: Arc<Renewal>,
}

/// KeyUpdates one connection sent and followed, readable while a pump or a tunnel owns
/// the connection.
#[derive(Clone)]
pub struct KeyUpdates(Arc<Renewal>);

impl KeyUpdates {
    /// (sent, followed) so far.
    pub fn counts(&self) -> (u64, u64) {
        self.0.counts()
    }
}

/// What the pump takes over from a [`Session`].
pub(crate) struct Parts {
    pub outbound: Outbound,
    /// Holds no opened plaintext: only the start of a record not yet whole.
    pub inbound: Inbound,
    /// Plaintext not read yet.
    pub early: Vec<u8>,
    pub peer_done: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("suite", &self.suite)
            .field("peer_done", &self.peer_done)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Takes the record layer over from rustls: `secrets` and `kernel` from
    /// `dangerous_into_kernel_connection`, `unread` the start of a record rustls did not
    /// process, `early` the plaintext it decrypted during the handshake.
    pub(crate) fn new(
        secrets: ExtractedSecrets,
        kernel: Kernel,
        unread: &[u8],
        early: Vec<u8>,
        peer_done: bool,
    ) -> Result<Session, RecordError> {
        let suite = match &kernel {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        let Some(tls13) = suite.tls13() else {
            return Err(RecordError::Key);
        };
        let limit = tls13.common.confidentiality_limit;
        let renewal = Renewal::new(kernel);
        let counts = renewal.clone();
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        // Half the limit: far from it, yet a KeyUpdate only every 2^23 records (128 GiB
        // of full AES-GCM records), so renewal costs nothing measurable.
        let sealer = Sealer::renewing(tx_seq, tx, limit, limit / 2, renewal.clone())?;
        let opener = Opener::renewing(rx_seq, rx, renewal)?;
        Ok(Session {
            outbound: Outbound::new(sealer),
            inbound: Inbound::with_unread(opener, unread)?,
            early,
            early_off: 0,
            peer_done,
            broken: None,
            suite: suite.suite(),
            renewal: counts,
        })
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> rustls::CipherSuite {
        self.suite
    }

    /// Renews the sending key every `records` records from now on, to test renewal.
    #[cfg(test)]
    pub(crate) fn renew_every(&mut self, records: u64) {
        self.outbound.sealer_mut().set_renew_at(records);
    }

    /// Makes our KeyUpdates ask the peer to update its key too (update_requested).
    #[cfg(test)]
    pub(crate) fn request_peer_updates(&mut self) {
        self.outbound.sealer_mut().request_peer_update = true;
    }

    /// Sends one record of `content_type` holding `body` as it is (to test what a peer
    /// makes of a record vmferry never sends).
    #[cfg(test)]
    pub(crate) fn send_raw(
        &mut self,
        tcp: &mut TcpStream,
        content_type: u8,
        body: &[u8],
    ) -> std::io::Result<()> {
        let mut slot = vec![0u8; super::record::SLOT];
        slot[super::record::HEADER..super::record::HEADER + body.len()].copy_from_slice(body);
        let n = self
            .outbound
            .sealer_mut()
            .seal(&mut slot, body.len(), content_type)
            .map_err(record_io)?;
        tcp.write_all(&slot[..n])
    }

    /// The session's KeyUpdate counters (they outlive the session in a pump).
    pub fn key_updates(&self) -> KeyUpdates {
        KeyUpdates(self.renewal.clone())
    }

    /// Why the session is unusable, if a record or the socket failed.
    pub fn failure(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Whether plaintext is waiting to be read without touching the socket.
    pub fn has_plaintext(&self) -> bool {
        self.early_off < self.early.len() || !self.inbound.is_empty()
    }

    /// Reads and writes plaintext over `tcp` (blocking, with `tcp`'s timeouts). A read
    /// returns 0 once the peer's close_notify came; a TCP end without one is an error.
    pub fn stream<'a>(&'a mut self, tcp: &'a mut TcpStream) -> SessionStream<'a> {
        SessionStream { session: self, tcp }
    }

    /// Sends close_notify (best effort: the connection is being dropped).
    pub fn close(&mut self, tcp: &mut TcpStream) {
        if self.broken.is_some() || self.outbound.stage_close_notify().is_err() {
            return;
        }
        while !self.outbound.is_empty() {
            match self.outbound.flush_to(tcp) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Hands the session over. Plaintext opened but not read yet (records that came with
    /// the last message read through [`Self::stream`]) joins `early`, so that the new
    /// owner filters it like everything after it (a decompressor must see it).
    pub(crate) fn into_parts(mut self) -> Parts {
        let mut early = self.early.split_off(self.early_off);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = self.inbound.read_into(&mut chunk);
            if n == 0 {
                break;
            }
            early.extend_from_slice(&chunk[..n]);
        }
        Parts {
            outbound: self.outbound,
            inbound: self.inbound,
            early,
            peer_done: self.peer_done,
        }
    }

    fn fail(&mut self, e: std::io::Error) -> std::io::Error {
        if !matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
        ) {
            self.broken.get_or_insert_with(|| e.to_string());
        }
        e
    }
}

/// A record error as an I/O error: an alert as rustls words it (so that
/// [`describe_io`](crate::tls::describe_io) says what it means), anything else as
/// invalid data.
pub(crate) fn record_io(e: RecordError) -> std::io::Error {
    match e {
        RecordError::Alert(a) => std::io::Error::other(rustls::Error::AlertReceived(a)),
        e => std::io::Error::new(ErrorKind::InvalidData, e),
    }
}

/// [`Session::stream`]: the session's plaintext as a blocking byte stream.
pub struct SessionStream<'a> {
    session: &'a mut Session,
    tcp: &'a mut TcpStream,
}

impl Read for SessionStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let s = &mut *self.session;
        if let Some(b) = &s.broken {
            return Err(std::io::Error::other(b.clone()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if s.early_off < s.early.len() {
            let n = buf.len().min(s.early.len() - s.early_off);
            buf[..n].copy_from_slice(&s.early[s.early_off..s.early_off + n]);
            s.early_off += n;
            return Ok(n);
        }
        loop {
            if !s.inbound.is_empty() {
                return Ok(s.inbound.read_into(buf));
            }
            if s.peer_done {
                return Ok(0);
            }
            match s.inbound.read_from(self.tcp, None) {
                Ok(a) if a.read == 0 => {
                    let e = std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the peer closed the connection without a TLS close_notify",
                    );
                    return Err(s.fail(e));
                }
                Ok(a) => s.peer_done = a.closed,
                Err(WireError::Io(e)) => return Err(s.fail(e)),
                Err(WireError::Record(e)) => return Err(s.fail(record_io(e))),
            }
        }
    }
}

impl Write for SessionStream<'_> {
    /// Seals `buf` and sends it whole: a short write is an error that breaks the session
    /// (the bytes may have been partly sent).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let s = &mut *self.session;
        if let Some(b) = &s.broken {
            return Err(std::io::Error::other(b.clone()));
        }
        if let Err(e) = s.outbound.stage(buf) {
            return Err(s.fail(record_io(e)));
        }
        while !s.outbound.is_empty() {
            match s.outbound.flush_to(self.tcp) {
                Ok(0) => return Err(s.fail(ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = std::io::Error::new(e.kind(), e.to_string());
                    s.broken.get_or_insert_with(|| e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
