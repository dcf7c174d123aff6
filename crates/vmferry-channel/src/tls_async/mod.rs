//! TLS over a nonblocking TCP socket as a `futures::io` byte stream, for a task of a
//! single-threaded tokio runtime (the tunnel's mux): the pump's rules, without a thread
//! and a local socket of its own.
//!
//! - The record layer is the pump's (`pump::wire`), taken over from a [`Session`]:
//!   records are sealed and opened in place in buffers reused for the whole connection
//!   (no per-record copy or `Vec`), and keys are renewed with TLS KeyUpdate.
//! - Reads return decrypted plaintext. TCP is read (up to 256 KiB of records at a time)
//!   only once everything opened before was handed out.
//! - Mux writes are bounded: small writes (yamux's frame headers) are gathered in a small
//!   buffer; a large write is taken only once the records before it went to TCP, as the
//!   pump reads its local socket only then. What is sealed goes out at once as far as TCP
//!   takes it, and the rest on `poll_flush`.
//! - The peer's close_notify reads as end-of-stream; a TCP end without it is an error
//!   ([`PumpError::Truncated`]), never a silent end. `poll_close` sends close_notify,
//!   flushes and half-closes TCP.
//!
//! - The plaintext is framed in lanes ([`lanes`]): the multiplexer's bytes on one, each
//!   data stream's bulk bytes on a lane of its own, read from its local socket straight
//!   into records ([`TlsIo::poll_send_lane`]) and written from records straight into it.
//! - One task, the writer ([`TlsIo::poll_writer`]), waits for TCP to take what is sealed;
//!   the others seal what they have, write what TCP takes at once, and leave the rest
//!   to it (tokio keeps one waker per socket direction: one waiter, no lost wake-ups).
//!
//! Errors carry a [`PumpError`] (worded as the pump words them); the first one is also
//! kept ([`TlsIo::failure`]) and handed to the `on_fail` hook when it happens.

pub mod lanes;

use crate::pump::wire::{Inbound, Outbound, WireError};
use crate::pump::{PumpError, Session};
use lanes::{LaneError, Lanes, Rx, CREDIT_LANE, MUX_LANE};
use std::io::{ErrorKind, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

/// Writes up to this size are gathered rather than encrypted one by one.
const SMALL: usize = 16 * 1024;
/// Most plaintext gathered before it must go to rustls.
const GATHER: usize = 64 * 1024;
/// Most plaintext taken from one large write.
const MAX_TAKE: usize = 1 << 20;
/// TCP reads routed in one `poll_read` without mux bytes for the caller, before it
/// yields to the lanes' tasks.
const READS_PER_POLL: usize = 4;

/// Called once, with the first failure.
pub type OnFail = Box<dyn Fn(&PumpError) + Send>;

/// A TLS connection over nonblocking TCP. Clones share the connection (one may be
/// handed to yamux, others to the writer and the lanes' tasks).
#[derive(Clone)]
pub struct TlsIo {
    inner: Arc<Mutex<Inner>>,
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
    /// Small mux writes gathered, not yet sealed.
    gathered: Vec<u8>,
    /// The frame parser, a credit frame's body as it comes, and the lanes.
    rx: Rx,
    credit: Vec<u8>,
    lanes: Lanes,
    /// The writer task, while it waits for something to send.
    writer: Option<Waker>,
    /// Tasks waiting for everything sealed to go to TCP.
    space: Vec<Waker>,
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

/// Reads a lane's local socket (nonblocking).
struct LocalIn<'a>(&'a tokio::net::UnixStream);

impl Read for TcpIn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Read for LocalIn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        self.0.try_read_vectored(bufs)
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
            inner: Arc::new(Mutex::new(Inner {
                outbound,
                inbound,
                early,
                early_off: 0,
                tcp,
                shut,
                peer: peer.to_string(),
                gathered: Vec::with_capacity(GATHER + SMALL),
                rx: Rx::default(),
                credit: Vec::new(),
                lanes: Lanes::default(),
                writer: None,
                space: Vec::new(),
                peer_done,
                close_sent: false,
                write_shut: false,
                failed: None,
                on_fail: Some(on_fail),
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first failure, worded as [`PumpError`]'s Display.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// The writer: sends what the others sealed whenever TCP takes it. Ready once the
    /// connection failed or was half-closed with everything sent. Exactly one task
    /// polls it.
    pub fn poll_writer(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut me = self.lock();
        loop {
            if me.failed.is_some() {
                me.wake_waiters();
                return Poll::Ready(());
            }
            if me.outbound.is_empty() {
                me.wake_space();
                if me.write_shut {
                    return Poll::Ready(());
                }
                me.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            match me.try_send() {
                Ok(true) | Err(_) => {}
                Ok(false) => match me.tcp.poll_write_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        me.peer_err(e.to_string());
                    }
                },
            }
        }
    }

    /// Starts `lane`: its bulk bytes from the peer go to `sock`, and the peer is given
    /// its first window.
    pub fn open_lane(
        &self,
        lane: u8,
        sock: Arc<tokio::net::UnixStream>,
        meter: Arc<crate::meter::Meter>,
    ) -> Result<(), LaneError> {
        let mut me = self.lock();
        me.check().map_err(|e| LaneError::Tunnel(e.to_string()))?;
        me.lanes.open(lane, sock, meter).map_err(LaneError::Local)?;
        me.send_grants()
            .map_err(|e| LaneError::Tunnel(e.to_string()))
    }

    /// Reads `sock` (as far as the peer's credit allows) straight into records of `lane`
    /// and seals them: the bytes read, 0 at the socket's end.
    pub fn poll_send_lane(
        &self,
        cx: &mut Context<'_>,
        lane: u8,
        sock: &tokio::net::UnixStream,
    ) -> Poll<Result<usize, LaneError>> {
        let tunnel = |e: std::io::Error| LaneError::Tunnel(e.to_string());
        let mut me = self.lock();
        me.check().map_err(tunnel)?;
        if me.close_sent {
            return Poll::Ready(Err(LaneError::Tunnel(
                "the connection was closed here".into(),
            )));
        }
        let credit = match me.lanes.poll_credit(cx, lane) {
            Poll::Ready(c) => c,
            Poll::Pending => {
                // The peer hears that the credit ran out (see `lanes::MAX_WINDOW`).
                me.send_grants().map_err(tunnel)?;
                return Poll::Pending;
            }
        };
        // Records are filled in place: only once what was sealed before went to TCP.
        ready!(me.poll_space(cx)).map_err(tunnel)?;
        let max = usize::try_from(credit).unwrap_or(usize::MAX);
        loop {
            match me.outbound.fill_framed_from(&mut LocalIn(sock), lane, max) {
                Ok(n) => {
                    me.lanes.spend(lane, n as u64);
                    me.push_out().map_err(tunnel)?;
                    return Poll::Ready(Ok(n));
                }
                Err(WireError::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    match sock.poll_read_ready(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Err(LaneError::Local(e.to_string())))
                        }
                    }
                }
                Err(WireError::Io(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(WireError::Io(e)) => return Poll::Ready(Err(LaneError::Local(e.to_string()))),
                Err(WireError::Record(e)) => {
                    let e = me.peer_err(e.to_string());
                    return Poll::Ready(Err(tunnel(e)));
                }
            }
        }
    }

    /// Writes what waits for `lane`'s local socket: Ready once nothing waits if
    /// `until_empty`, otherwise Pending for as long as the lane works.
    pub fn poll_drain_lane(
        &self,
        cx: &mut Context<'_>,
        lane: u8,
        until_empty: bool,
    ) -> Poll<Result<(), LaneError>> {
        let mut me = self.lock();
        if let Some(f) = &me.failed {
            return Poll::Ready(Err(LaneError::Tunnel(f.clone())));
        }
        let r = me.lanes.poll_drain(cx, lane, until_empty);
        if let Err(e) = me.send_grants() {
            return Poll::Ready(Err(LaneError::Tunnel(e.to_string())));
        }
        r
    }

    /// Stops `lane`: its local socket is let go, what still comes for it dropped.
    pub fn close_lane(&self, lane: u8) {
        self.lock().lanes.close(lane);
    }

    /// Bulk bytes received on `lane` so far.
    pub fn lane_received(&self, lane: u8) -> u64 {
        self.lock().lanes.received(lane)
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
            self.wake_waiters();
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

    fn wake_space(&mut self) {
        for w in self.space.drain(..) {
            w.wake();
        }
    }

    /// Everyone who waits on this connection (it failed).
    fn wake_waiters(&mut self) {
        self.wake_space();
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        self.lanes.wake_all();
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

    /// After sealing: writes what TCP takes now, and leaves the rest to the writer.
    fn push_out(&mut self) -> std::io::Result<()> {
        if !self.try_send()? {
            if let Some(w) = self.writer.take() {
                w.wake();
            }
        }
        Ok(())
    }

    /// Ready once everything sealed went to TCP; otherwise the writer is at it and
    /// wakes this task when it is done.
    fn poll_space(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        if self.outbound.is_empty() || self.try_send()? {
            return Poll::Ready(Ok(()));
        }
        if !self.space.iter().any(|w| w.will_wake(cx.waker())) {
            self.space.push(cx.waker().clone());
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        Poll::Pending
    }

    /// Seals the gathered mux bytes, with `more` after them.
    fn encrypt(&mut self, more: &[u8]) -> std::io::Result<()> {
        let sealed = self
            .outbound
            .stage_framed(MUX_LANE, &self.gathered)
            .and_then(|()| self.outbound.stage_framed(MUX_LANE, more));
        self.gathered.clear();
        sealed.map_err(|e| self.peer_err(e.to_string()))
    }

    /// Seals and sends the credits the lanes owe the peer.
    fn send_grants(&mut self) -> std::io::Result<()> {
        let grants = self.lanes.take_grants();
        if grants.is_empty() || self.close_sent {
            return Ok(());
        }
        for g in grants {
            if let Err(e) = self.outbound.stage_framed(CREDIT_LANE, &g) {
                return Err(self.peer_err(e.to_string()));
            }
        }
        self.push_out()
    }

    /// Routes the plaintext opened so far: mux bytes into `buf` from `*n` on (until it
    /// is full), the rest to the lanes (each lane's bytes with one `writev`).
    fn route_opened(&mut self, buf: &mut [u8], n: &mut usize) -> std::io::Result<()> {
        let mut bulk: Vec<(u8, std::ops::Range<usize>)> = Vec::new();
        let routed = loop {
            let Inner {
                early,
                early_off,
                inbound,
                rx,
                credit,
                lanes,
                ..
            } = &mut *self;
            let (used, len, from_early) = if *early_off < early.len() {
                let piece = &early[*early_off..];
                let used = lanes::route(rx, credit, lanes, piece, None, &mut bulk, buf, n);
                (used, piece.len(), true)
            } else if let Some((at, piece)) = inbound.front() {
                let used = lanes::route(rx, credit, lanes, piece, Some(at), &mut bulk, buf, n);
                (used, piece.len(), false)
            } else {
                break Ok(());
            };
            let used = match used {
                Ok(u) => u,
                Err(e) => break Err(e),
            };
            if from_early {
                *early_off += used;
            } else {
                inbound.consume(used);
            }
            if used < len {
                // `buf` is full.
                break Ok(());
            }
        };
        // The bulk bytes lie in the inbound buffer until the next TCP read: hand them
        // over now, each lane's in order.
        while let Some(&(lane, _)) = bulk.first() {
            let pieces: Vec<&[u8]> = bulk
                .iter()
                .filter(|(l, _)| *l == lane)
                .map(|(_, r)| self.inbound.slice(r.clone()))
                .collect();
            self.lanes.deliver(lane, &pieces);
            bulk.retain(|(l, _)| *l != lane);
        }
        routed.map_err(|e| self.peer_err(e))
    }

    /// Reads TCP once (whole records opened): Pending until something came.
    fn poll_read_tcp(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if let Err(e) = ready!(self.tcp.poll_read_ready(cx)) {
                return Poll::Ready(Err(self.peer_err(e.to_string())));
            }
            match self.inbound.read_from(&mut TcpIn(&self.tcp), None) {
                Ok(a) if a.read == 0 => {
                    // Every whole record was opened; no close_notify came.
                    let peer = self.peer.clone();
                    return Poll::Ready(Err(self.fail(PumpError::Truncated { peer })));
                }
                Ok(a) => {
                    self.peer_done = a.closed;
                    return Poll::Ready(Ok(()));
                }
                Err(WireError::Io(e)) if would_block(&e) => {}
                Err(WireError::Io(e)) => return Poll::Ready(Err(self.peer_err(e.to_string()))),
                Err(WireError::Record(e)) => return Poll::Ready(Err(self.peer_err(e.to_string()))),
            }
        }
    }
}

impl futures::io::AsyncRead for TlsIo {
    /// The mux's bytes; bulk frames met on the way go to their lanes.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut me = self.lock();
        me.check()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut n = 0;
        let mut reads = 0;
        loop {
            let routed = me.route_opened(buf, &mut n);
            me.send_grants()?;
            routed?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            // Plaintext that came before a close_notify first, then the end.
            if me.peer_done {
                return Poll::Ready(Ok(0));
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(me.poll_read_tcp(cx))?;
            reads += 1;
        }
    }
}

impl futures::io::AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut me = self.lock();
        me.check()?;
        if me.close_sent {
            return Poll::Ready(Err(ErrorKind::BrokenPipe.into()));
        }
        if buf.len() <= SMALL && me.gathered.len() < GATHER {
            me.gathered.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // A large write (or too much gathered): only once the records before it went.
        ready!(me.poll_space(cx))?;
        let n = if buf.len() <= SMALL {
            0
        } else {
            buf.len().min(MAX_TAKE)
        };
        me.encrypt(&buf[..n])?;
        me.push_out()?;
        if n == 0 {
            me.gathered.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut me = self.lock();
        me.check()?;
        if !me.gathered.is_empty() {
            me.encrypt(&[])?;
            me.push_out()?;
        }
        me.poll_space(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut me = self.lock();
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
            me.push_out()?;
        }
        ready!(me.poll_space(cx))?;
        if let Err(e) = me.shut.shutdown(Shutdown::Write) {
            return Poll::Ready(Err(me.peer_err(e.to_string())));
        }
        me.write_shut = true;
        if let Some(w) = me.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}
