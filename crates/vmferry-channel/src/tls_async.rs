//! TLS over a nonblocking TCP socket as a `futures::io` byte stream, for a task of a
//! single-threaded tokio runtime (the tunnel's mux): the pump's rules, without a thread
//! and a local socket of its own.
//!
//! - The record layer is the pump's (`pump::wire`), taken over from a [`Session`]:
//!   records are sealed and opened in place in buffers reused for the whole connection
//!   (no per-record copy or `Vec`), and keys are renewed with TLS KeyUpdate.
//! - Reads return decrypted plaintext. TCP is read (up to 256 KiB of records at a time)
//!   only once everything opened before was handed out.
//! - Writes are bounded: small writes (yamux's frame headers) are gathered in a small
//!   buffer; a large write is taken only once the records before it went to TCP, as the
//!   pump reads its local socket only then. What is sealed goes out at once as far as TCP
//!   takes it, and the rest on `poll_flush`.
//! - The peer's close_notify reads as end-of-stream; a TCP end without it is an error
//!   ([`PumpError::Truncated`]), never a silent end. `poll_close` sends close_notify,
//!   flushes and half-closes TCP.
//!
//! Errors carry a [`PumpError`] (worded as the pump words them); the first one is also
//! kept ([`TlsIo::failure`]) and handed to the `on_fail` hook when it happens.

use crate::pump::wire::{Inbound, Outbound, WireError};
use crate::pump::{PumpError, Session};
use std::cell::RefCell;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

/// Writes up to this size are gathered rather than encrypted one by one.
const SMALL: usize = 16 * 1024;
/// Most plaintext gathered before it must go to rustls.
const GATHER: usize = 64 * 1024;
/// Most plaintext taken from one large write.
const MAX_TAKE: usize = 1 << 20;

/// Called once, with the first failure.
pub type OnFail = Box<dyn Fn(&PumpError)>;

/// A TLS connection over nonblocking TCP. Clones share the connection (one may be
/// handed to yamux and another kept to finish the connection once yamux let go of it).
#[derive(Clone)]
pub struct TlsIo {
    inner: Rc<RefCell<Inner>>,
}

struct Inner {
    /// Records to send, and records received.
    outbound: Outbound,
    inbound: Inbound,
    /// Plaintext that arrived with the handshake or before the session was handed over,
    /// and how far it was read.
    early: Vec<u8>,
    early_off: usize,
    tcp: tokio::net::TcpStream,
    /// The same socket, for the half-close.
    shut: TcpStream,
    peer: String,
    /// Small writes gathered, not yet given to rustls.
    gathered: Vec<u8>,
    /// The peer's close_notify came.
    peer_done: bool,
    close_sent: bool,
    write_shut: bool,
    failed: Option<String>,
    on_fail: Option<OnFail>,
}

/// Writes TLS to the nonblocking tokio socket.
struct TcpOut<'a>(&'a tokio::net::TcpStream);

/// Reads TLS from the nonblocking tokio socket.
struct TcpIn<'a>(&'a tokio::net::TcpStream);

impl Read for TcpIn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for TcpOut<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TlsIo {
    /// Takes over an established TLS connection. Must be called within a tokio runtime
    /// with I/O enabled. `peer` names the TLS peer in errors.
    pub fn new(
        session: Session,
        tcp: TcpStream,
        peer: &str,
        on_fail: OnFail,
    ) -> std::io::Result<TlsIo> {
        if let Some(why) = session.failure() {
            return Err(std::io::Error::other(format!(
                "{peer}: the connection failed before the tunnel: {why}"
            )));
        }
        let crate::pump::session::Parts {
            outbound,
            inbound,
            early,
            peer_done,
        } = session.into_parts();
        tcp.set_nonblocking(true)?;
        let shut = tcp.try_clone()?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        Ok(TlsIo {
            inner: Rc::new(RefCell::new(Inner {
                outbound,
                inbound,
                early,
                early_off: 0,
                tcp,
                shut,
                peer: peer.to_string(),
                gathered: Vec::with_capacity(GATHER + SMALL),
                peer_done,
                close_sent: false,
                write_shut: false,
                failed: None,
                on_fail: Some(on_fail),
            })),
        })
    }

    /// The first failure, worded as [`PumpError`]'s Display.
    pub fn failure(&self) -> Option<String> {
        self.inner.borrow().failed.clone()
    }

    /// Ends the connection cleanly: sends close_notify (unless sent already), flushes,
    /// half-closes TCP, then reads (and drops) what still comes until the peer's
    /// close_notify. Err if the connection failed (now or before): the first failure,
    /// worded as [`PumpError`]'s Display.
    pub async fn finish(&self) -> std::io::Result<()> {
        let failed = |e: std::io::Error| match self.failure() {
            Some(f) => std::io::Error::other(f),
            None => e,
        };
        if let Some(f) = self.failure() {
            return Err(std::io::Error::other(f));
        }
        let mut this = self.clone();
        let closed =
            std::future::poll_fn(|cx| futures::io::AsyncWrite::poll_close(Pin::new(&mut this), cx))
                .await;
        if let Err(e) = closed {
            return Err(failed(e));
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let r = std::future::poll_fn(|cx| {
                futures::io::AsyncRead::poll_read(Pin::new(&mut this), cx, &mut buf)
            })
            .await;
            match r {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(failed(e)),
            }
        }
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

impl Inner {
    fn fail(&mut self, e: PumpError) -> std::io::Error {
        if self.failed.is_none() {
            if let Some(hook) = self.on_fail.take() {
                hook(&e);
            }
            self.failed = Some(e.to_string());
        }
        std::io::Error::other(e)
    }

    fn peer_err(&mut self, msg: String) -> std::io::Error {
        let peer = self.peer.clone();
        self.fail(PumpError::Peer { peer, msg })
    }

    fn check(&self) -> std::io::Result<()> {
        match &self.failed {
            Some(f) => Err(std::io::Error::other(f.clone())),
            None => Ok(()),
        }
    }

    /// Sends the sealed records, as far as TCP takes them now. Ok(true) once all went.
    fn try_send(&mut self) -> std::io::Result<bool> {
        while !self.outbound.is_empty() {
            match self.outbound.flush_to(&mut TcpOut(&self.tcp)) {
                Ok(0) => return Err(self.peer_err("the connection wrote nothing".into())),
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) => return Err(self.peer_err(e.to_string())),
            }
        }
        Ok(true)
    }

    /// Sends every sealed record, waiting for TCP as needed.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if self.try_send()? {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = ready!(self.tcp.poll_write_ready(cx)) {
                return Poll::Ready(Err(self.peer_err(e.to_string())));
            }
        }
    }

    /// Seals the gathered plaintext, with `more` after it.
    fn encrypt(&mut self, more: &[u8]) -> std::io::Result<()> {
        let sealed = self
            .outbound
            .stage(&self.gathered)
            .and_then(|()| self.outbound.stage(more));
        self.gathered.clear();
        sealed.map_err(|e| self.peer_err(e.to_string()))
    }

    /// Opens records from TCP until there is plaintext or the peer's close_notify came.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.inbound.is_empty() && !self.peer_done {
            if let Err(e) = ready!(self.tcp.poll_read_ready(cx)) {
                return Poll::Ready(Err(self.peer_err(e.to_string())));
            }
            match self.inbound.read_from(&mut TcpIn(&self.tcp), None) {
                Ok(a) if a.read == 0 => {
                    // Every whole record was opened; no close_notify came.
                    let peer = self.peer.clone();
                    return Poll::Ready(Err(self.fail(PumpError::Truncated { peer })));
                }
                Ok(a) => self.peer_done = a.closed,
                Err(WireError::Io(e)) if would_block(&e) => {}
                Err(WireError::Io(e)) => return Poll::Ready(Err(self.peer_err(e.to_string()))),
                Err(WireError::Record(e)) => return Poll::Ready(Err(self.peer_err(e.to_string()))),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl futures::io::AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut me = self.inner.borrow_mut();
        me.check()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if me.early_off < me.early.len() {
            let from = me.early_off;
            let n = buf.len().min(me.early.len() - from);
            buf[..n].copy_from_slice(&me.early[from..from + n]);
            me.early_off += n;
            return Poll::Ready(Ok(n));
        }
        // Plaintext that came before a close_notify first, then the end.
        ready!(me.poll_fill(cx))?;
        Poll::Ready(Ok(me.inbound.read_into(buf)))
    }
}

impl futures::io::AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut me = self.inner.borrow_mut();
        me.check()?;
        if me.close_sent {
            return Poll::Ready(Err(ErrorKind::BrokenPipe.into()));
        }
        if buf.len() <= SMALL && me.gathered.len() < GATHER {
            me.gathered.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // A large write (or too much gathered): only once the records before it went.
        ready!(me.poll_send(cx))?;
        let n = if buf.len() <= SMALL {
            0
        } else {
            buf.len().min(MAX_TAKE)
        };
        me.encrypt(&buf[..n])?;
        me.try_send()?;
        if n == 0 {
            me.gathered.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut me = self.inner.borrow_mut();
        me.check()?;
        if !me.gathered.is_empty() {
            me.encrypt(&[])?;
        }
        me.poll_send(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut me = self.inner.borrow_mut();
        me.check()?;
        if me.write_shut {
            return Poll::Ready(Ok(()));
        }
        if !me.close_sent {
            me.encrypt(&[])?;
            if let Err(e) = me.outbound.stage_close_notify() {
                return Poll::Ready(Err(me.peer_err(e.to_string())));
            }
            me.close_sent = true;
        }
        ready!(me.poll_send(cx))?;
        if let Err(e) = me.shut.shutdown(Shutdown::Write) {
            return Poll::Ready(Err(me.peer_err(e.to_string())));
        }
        me.write_shut = true;
        Poll::Ready(Ok(()))
    }
}
