//! TLS over a nonblocking TCP socket as a `futures::io` byte stream, for a task of a
//! single-threaded tokio runtime (the tunnel's mux): the pump's rules, without a thread
//! and a local socket of its own.
//!
//! - Reads return decrypted plaintext. TCP is read (256 KiB at a time, into a buffer
//!   reused for the whole connection) only once rustls has handed out everything it had
//!   decrypted, and the bytes read are fed to rustls only as fast as they are consumed.
//! - Writes are bounded: small writes (yamux's frame headers) are gathered in a small
//!   buffer; a large write is taken only once rustls has no TLS data left to send, as the
//!   pump reads its local socket only then. What is given to rustls goes out at once as
//!   far as TCP takes it, and the rest on `poll_flush`.
//! - The peer's close_notify reads as end-of-stream; a TCP end without it is an error
//!   ([`PumpError::Truncated`]), never a silent end. `poll_close` sends close_notify,
//!   flushes and half-closes TCP.
//!
//! Errors carry a [`PumpError`] (worded as the pump words them); the first one is also
//! kept ([`TlsIo::failure`]) and handed to the `on_fail` hook when it happens.

use crate::pump::PumpError;
use std::cell::RefCell;
use std::io::{ErrorKind, IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

/// TCP read buffer.
const CHUNK: usize = 256 * 1024;
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
    conn: rustls::Connection,
    tcp: tokio::net::TcpStream,
    /// The same socket, for the half-close.
    shut: TcpStream,
    peer: String,
    /// TCP bytes read and not yet given to rustls: `rbuf[roff..rlen]`.
    rbuf: Vec<u8>,
    roff: usize,
    rlen: usize,
    /// Small writes gathered, not yet given to rustls.
    gathered: Vec<u8>,
    /// The peer's close_notify came.
    peer_done: bool,
    close_sent: bool,
    write_shut: bool,
    failed: Option<String>,
    on_fail: Option<OnFail>,
}

/// Writes TLS to the nonblocking tokio socket (for `write_tls`).
struct TcpOut<'a>(&'a tokio::net::TcpStream);

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
        mut conn: rustls::Connection,
        tcp: TcpStream,
        peer: &str,
        on_fail: OnFail,
    ) -> std::io::Result<TlsIo> {
        tcp.set_nonblocking(true)?;
        let shut = tcp.try_clone()?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        // What rustls holds to send is bounded by when we give it plaintext (see above).
        conn.set_buffer_limit(None);
        Ok(TlsIo {
            inner: Rc::new(RefCell::new(Inner {
                conn,
                tcp,
                shut,
                peer: peer.to_string(),
                rbuf: vec![0u8; CHUNK],
                roff: 0,
                rlen: 0,
                gathered: Vec::with_capacity(GATHER + SMALL),
                peer_done: false,
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

    /// Sends what rustls holds, as far as TCP takes it now. Ok(true) once all is sent.
    fn try_send(&mut self) -> std::io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut TcpOut(&self.tcp)) {
                Ok(0) => return Err(self.peer_err("the connection wrote nothing".into())),
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) => return Err(self.peer_err(e.to_string())),
            }
        }
        Ok(true)
    }

    /// Sends everything rustls holds, waiting for TCP as needed.
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

    /// Gives rustls the gathered plaintext, with `more` after it.
    fn encrypt(&mut self, more: &[u8]) -> std::io::Result<()> {
        let bufs = [IoSlice::new(&self.gathered), IoSlice::new(more)];
        let bufs: &[IoSlice<'_>] = match (self.gathered.is_empty(), more.is_empty()) {
            (true, true) => return Ok(()),
            (false, true) => &bufs[..1],
            (true, false) => &bufs[1..],
            (false, false) => &bufs,
        };
        let want = self.gathered.len() + more.len();
        match self.conn.writer().write_vectored(bufs) {
            Ok(n) if n == want => {
                self.gathered.clear();
                Ok(())
            }
            Ok(n) => Err(self.peer_err(format!("TLS took {n} of {want} bytes"))),
            Err(e) => Err(self.peer_err(e.to_string())),
        }
    }

    /// Makes rustls's decrypted plaintext available, reading TCP if needed. Ready(Ok)
    /// when there is plaintext or the peer's close_notify came.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            // TLS bytes already read: to rustls, one record's worth at a time.
            if self.roff < self.rlen {
                let mut slice = &self.rbuf[self.roff..self.rlen];
                let before = slice.len();
                let read = self.conn.read_tls(&mut slice);
                self.roff += before - slice.len();
                let took = match read {
                    Ok(n) => n,
                    Err(e) => return Poll::Ready(Err(self.peer_err(e.to_string()))),
                };
                match self.conn.process_new_packets() {
                    Ok(state) => {
                        if state.peer_has_closed() {
                            self.peer_done = true;
                        }
                        if state.plaintext_bytes_to_read() > 0 || self.peer_done {
                            // Whatever rustls wants to send (key updates, ...) goes
                            // along when TCP takes it.
                            let _ = self.try_send();
                            return Poll::Ready(Ok(()));
                        }
                        if took == 0 {
                            // Never spin: rustls took nothing and gave nothing.
                            return Poll::Ready(Err(
                                self.peer_err("TLS made no progress (internal error)".into())
                            ));
                        }
                    }
                    Err(e) => {
                        // Its alert, best effort.
                        let _ = self.conn.write_tls(&mut TcpOut(&self.tcp));
                        let msg = crate::tls::describe(&e, &self.peer);
                        return Poll::Ready(Err(self.peer_err(msg)));
                    }
                }
                continue;
            }
            self.roff = 0;
            self.rlen = 0;
            if let Err(e) = ready!(self.tcp.poll_read_ready(cx)) {
                return Poll::Ready(Err(self.peer_err(e.to_string())));
            }
            match self.tcp.try_read(&mut self.rbuf) {
                Ok(0) => {
                    // Everything read was processed; no close_notify came.
                    let peer = self.peer.clone();
                    return Poll::Ready(Err(self.fail(PumpError::Truncated { peer })));
                }
                Ok(n) => self.rlen = n,
                Err(e) if would_block(&e) => {}
                Err(e) => return Poll::Ready(Err(self.peer_err(e.to_string()))),
            }
        }
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
        loop {
            if me.peer_done {
                // Plaintext that came before the close_notify first, then the end.
                return match std::io::Read::read(&mut me.conn.reader(), buf) {
                    Ok(n) => Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => Poll::Ready(Ok(0)),
                    Err(e) => Poll::Ready(Err(me.peer_err(e.to_string()))),
                };
            }
            match std::io::Read::read(&mut me.conn.reader(), buf) {
                Ok(0) => me.peer_done = true,
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    ready!(me.poll_fill(cx))?;
                }
                Err(e) => return Poll::Ready(Err(me.peer_err(e.to_string()))),
            }
        }
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
        // A large write (or too much gathered): only once rustls sent what it had.
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
            me.conn.send_close_notify();
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
