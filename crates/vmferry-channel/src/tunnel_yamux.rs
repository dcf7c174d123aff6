//! The tunnel: every stream of one migration (QEMU's main channel, its multifd channels)
//! and a control stream, multiplexed by yamux inside ONE authenticated TLS connection.
//!
//! Layers, as everywhere in this crate: the TLS connection is carried by [`pump`] (the
//! security layer, unchanged) between the network and one end of a local socket pair;
//! yamux (the framing layer, run by a small single-threaded tokio runtime) speaks over
//! the other end. yamux gives each stream its own flow-control window, so a slow QEMU
//! exerts back-pressure on its own stream without starving the control stream, and no
//! buffer grows without bound.
//!
//! This module must never touch keys or records itself (that is the pump's job), and
//! never block the runtime thread on anything but the runtime.
//!
//! Wire format inside the mux: the client (the source) opens the control stream first,
//! then one stream per QEMU connection, in QEMU's order; each stream starts with its
//! index as a big-endian u16 (`CONTROL` for the control stream). Control messages are a
//! 4-byte big-endian length and JSON, at most 64 KiB.

use crate::meter::Meter;
use crate::pump::{self, PumpError, StopHandle};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// The index of the control stream.
pub const CONTROL: u16 = u16::MAX;
/// Largest control message.
pub const MAX_CONTROL: usize = 64 * 1024;
/// Bytes per yamux data frame (libvirt's tunnel moves 64 KiB at a time).
const FRAME: usize = 256 * 1024;
/// Copy buffer per direction per stream.
const COPY_BUF: usize = 256 * 1024;
/// Socket buffer of each end of the pair between the TLS and mux layers.
const PAIR_BUF: usize = 4 << 20;
/// At most this many streams (multifd is bounded far lower by the cookie).
const MAX_STREAMS: usize = 80;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("tunnel with {peer}: {msg}")]
    Failed { peer: String, msg: String },
    #[error("tunnel with {peer} is closed")]
    Closed { peer: String },
}

/// What happened to the tunnel's streams so far.
#[derive(Debug, Default)]
struct State {
    /// Data streams that ended cleanly in both directions.
    done: usize,
    /// The first failure, in words.
    error: Option<String>,
    /// The mux ended (cleanly or not).
    ended: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, msg: String) {
        let mut st = self.lock();
        if st.error.is_none() {
            st.error = Some(msg);
        }
        self.changed.notify_all();
    }

    fn stream_done(&self) {
        self.lock().done += 1;
        self.changed.notify_all();
    }

    fn end(&self) {
        self.lock().ended = true;
        self.changed.notify_all();
    }
}

enum Cmd {
    Open(u16, UnixStream),
    Control(Vec<u8>),
    Close,
}

/// The server's choice of where each stream the client opens goes.
pub type Accept = Box<dyn FnMut(u16) -> Result<UnixStream, String> + Send>;

/// Cuts a tunnel from any thread.
#[derive(Debug, Clone)]
pub struct TunnelStop {
    pump: StopHandle,
    stopped: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl TunnelStop {
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.pump.stop();
        self.shared.fail("stopped".into());
    }
}

pub struct Tunnel {
    peer: String,
    cmds: mpsc::UnboundedSender<Cmd>,
    control_rx: Mutex<std::sync::mpsc::Receiver<serde_json::Value>>,
    shared: Arc<Shared>,
    stop: TunnelStop,
    mux: Option<std::thread::JoinHandle<()>>,
    pump: Option<std::thread::JoinHandle<Result<(), PumpError>>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("peer", &self.peer).finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

impl Tunnel {
    /// The source's end: starts the mux over an established TLS connection.
    pub fn client(
        conn: rustls::Connection,
        tcp: TcpStream,
        peer: &str,
        meter: Arc<Meter>,
    ) -> Result<Tunnel, TunnelError> {
        Self::start(conn, tcp, peer, meter, Role::Client, None)
    }

    /// The destination's end: `accept(k)` is called, in the order the client opened
    /// them, for every data stream; it returns where to carry that stream.
    pub fn server(
        conn: rustls::Connection,
        tcp: TcpStream,
        peer: &str,
        meter: Arc<Meter>,
        accept: Accept,
    ) -> Result<Tunnel, TunnelError> {
        Self::start(conn, tcp, peer, meter, Role::Server, Some(accept))
    }

    fn start(
        conn: rustls::Connection,
        tcp: TcpStream,
        peer: &str,
        meter: Arc<Meter>,
        role: Role,
        accept: Option<Accept>,
    ) -> Result<Tunnel, TunnelError> {
        let failed = |msg: String| TunnelError::Failed {
            peer: peer.to_string(),
            msg,
        };
        let (tls_side, mux_side) =
            UnixStream::pair().map_err(|e| failed(format!("socket pair: {e}")))?;
        // Deep buffers between the two layers: fewer, larger hand-overs between threads.
        for s in [&tls_side, &mux_side] {
            let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &PAIR_BUF);
            let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBuf, &PAIR_BUF);
        }
        let shared = Arc::new(Shared::default());
        let pump_stop =
            StopHandle::new(&tls_side, &tcp).map_err(|e| failed(format!("stop handle: {e}")))?;
        let stop = TunnelStop {
            pump: pump_stop.clone(),
            stopped: Arc::new(AtomicBool::new(false)),
            shared: shared.clone(),
        };
        // Security layer: TLS ⇄ plaintext socket.
        let pump = {
            let peer = peer.to_string();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tunnel-tls".into())
                .spawn(move || {
                    let r = pump::pump(tls_side, conn, tcp, &peer, &meter, &pump_stop).map(|_| ());
                    if let Err(e) = &r {
                        shared.fail(format!("the connection broke: {e}"));
                    }
                    r
                })
                .map_err(|e| failed(format!("cannot start the TLS pump: {e}")))?
        };
        // Framing layer: yamux on the other end.
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
        let mux = {
            let shared = shared.clone();
            let peer = peer.to_string();
            std::thread::Builder::new()
                .name("tunnel-mux".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            shared.fail(format!("cannot start the mux runtime: {e}"));
                            shared.end();
                            return;
                        }
                    };
                    // Kept past the mux's end: see `linger`.
                    let keep = mux_side.try_clone();
                    rt.block_on(drive(
                        mux_side,
                        role,
                        cmd_rx,
                        ctl_tx,
                        accept,
                        shared.clone(),
                        peer,
                    ));
                    drop(rt);
                    if let Ok(keep) = keep {
                        linger(keep);
                    }
                    shared.end();
                })
                .map_err(|e| failed(format!("cannot start the mux: {e}")))?
        };
        let t = Tunnel {
            peer: peer.to_string(),
            cmds: cmd_tx,
            control_rx: Mutex::new(ctl_rx),
            shared,
            stop,
            mux: Some(mux),
            pump: Some(pump),
        };
        if role == Role::Client {
            // The control stream first, so the server sees it before any data stream.
            t.cmds
                .send(Cmd::Open(CONTROL, placeholder()?))
                .map_err(|_| t.closed())?;
        }
        Ok(t)
    }

    fn closed(&self) -> TunnelError {
        TunnelError::Closed {
            peer: self.peer.clone(),
        }
    }

    /// Client: opens data stream `k` and carries `local` over it, both directions, until
    /// both have ended. Returns at once.
    pub fn open(&self, k: u16, local: UnixStream) -> Result<(), TunnelError> {
        if k == CONTROL {
            return Err(TunnelError::Failed {
                peer: self.peer.clone(),
                msg: format!("stream index {k} is reserved"),
            });
        }
        if let Some(e) = self.shared.lock().error.clone() {
            return Err(TunnelError::Failed {
                peer: self.peer.clone(),
                msg: e,
            });
        }
        self.cmds
            .send(Cmd::Open(k, local))
            .map_err(|_| self.closed())
    }

    /// Sends one control message to the other end.
    pub fn send_control(&self, msg: &serde_json::Value) -> Result<(), TunnelError> {
        let body = serde_json::to_vec(msg).map_err(|e| TunnelError::Failed {
            peer: self.peer.clone(),
            msg: e.to_string(),
        })?;
        if body.len() > MAX_CONTROL {
            return Err(TunnelError::Failed {
                peer: self.peer.clone(),
                msg: format!("control message of {} bytes is too large", body.len()),
            });
        }
        self.cmds
            .send(Cmd::Control(body))
            .map_err(|_| self.closed())
    }

    /// The next control message from the other end, or `None` after `timeout`.
    pub fn recv_control(
        &self,
        timeout: Duration,
    ) -> Result<Option<serde_json::Value>, TunnelError> {
        let rx = self.control_rx.lock().unwrap_or_else(|p| p.into_inner());
        match rx.recv_timeout(timeout) {
            Ok(v) => Ok(Some(v)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(self.closed()),
        }
    }

    /// Data streams that ended cleanly so far, and the first failure if any.
    pub fn streams_done(&self) -> (usize, Option<String>) {
        let st = self.shared.lock();
        (st.done, st.error.clone())
    }

    /// Waits until `n` data streams ended cleanly; fails on the first stream failure,
    /// or after `timeout`.
    pub fn wait_streams(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(format!("tunnel with {}: {e}", self.peer));
            }
            if st.done >= n {
                return Ok(());
            }
            if st.ended {
                return Err(format!(
                    "tunnel with {} ended after {} of {n} streams",
                    self.peer, st.done
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "tunnel with {}: {} of {n} streams ended within {} s",
                    self.peer,
                    st.done,
                    timeout.as_secs()
                ));
            }
            st = match self.shared.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Ends the tunnel cleanly: closes the mux, then TLS with close_notify once the
    /// other end closed too.
    pub fn close(mut self, timeout: Duration) -> Result<(), String> {
        let _ = self.cmds.send(Cmd::Close);
        let deadline = Instant::now() + timeout;
        let mux_done = self
            .mux
            .as_ref()
            .map(|h| finished_by(h, deadline))
            .unwrap_or(true);
        let pump_done = self
            .pump
            .as_ref()
            .map(|h| finished_by(h, deadline))
            .unwrap_or(true);
        if !(mux_done && pump_done) {
            self.stop.stop();
            return Err(format!(
                "tunnel with {} did not close within {} s",
                self.peer,
                timeout.as_secs()
            ));
        }
        if let Some(h) = self.pump.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("tunnel with {}: {e}", self.peer)),
                Err(_) => return Err(format!("tunnel with {}: the pump panicked", self.peer)),
            }
        }
        if let Some(h) = self.mux.take() {
            let _ = h.join();
        }
        match self.shared.lock().error.clone() {
            Some(e) => Err(format!("tunnel with {}: {e}", self.peer)),
            None => Ok(()),
        }
    }

    /// Cuts everything at once.
    pub fn stop(&self) {
        self.stop.stop();
    }

    pub fn stop_handle(&self) -> TunnelStop {
        self.stop.clone()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // A tunnel dropped without `close` is abandoned: cut it so no thread lingers.
        if self.mux.is_some() || self.pump.is_some() {
            self.stop.stop();
        }
    }
}

/// After the mux closed, the peer may still send its last frames (its own close, window
/// updates) before the TLS close: keep reading (and dropping) them until the pump
/// signals the end, so it never writes into a closed socket.
fn linger(sock: UnixStream) {
    use std::io::Read;
    let _ = sock.set_nonblocking(false);
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 16 * 1024];
    let mut sock = sock;
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

fn finished_by<T>(h: &std::thread::JoinHandle<T>, deadline: Instant) -> bool {
    while !h.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    h.is_finished()
}

/// The control stream has no local socket; this stands in for one in `Cmd::Open`.
fn placeholder() -> Result<UnixStream, TunnelError> {
    let (a, _b) = UnixStream::pair().map_err(|e| TunnelError::Failed {
        peer: "local".into(),
        msg: e.to_string(),
    })?;
    Ok(a)
}

fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS);
    c.set_max_connection_receive_window(Some(MAX_STREAMS * 4 * 1024 * 1024));
    c.set_split_send_size(FRAME);
    c
}

/// Runs the mux until it ends: opens what the client asks, hands inbound streams (in
/// order) to the acceptor, and carries the control stream.
async fn drive(
    sock: UnixStream,
    role: Role,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    control_in: std::sync::mpsc::Sender<serde_json::Value>,
    accept: Option<Accept>,
    shared: Arc<Shared>,
    peer: String,
) {
    let sock = match sock
        .set_nonblocking(true)
        .and_then(|_| tokio::net::UnixStream::from_std(sock))
    {
        Ok(s) => s,
        Err(e) => {
            shared.fail(format!("mux socket: {e}"));
            return;
        }
    };
    let mode = match role {
        Role::Client => yamux::Mode::Client,
        Role::Server => yamux::Mode::Server,
    };
    let mut conn = yamux::Connection::new(sock.compat(), yamux_config(), mode);
    let (inbound_tx, inbound_rx) = mpsc::unbounded_channel::<yamux::Stream>();
    let (control_out_tx, control_out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut control_out_rx = Some(control_out_rx);
    if let Some(accept) = accept {
        tokio::spawn(acceptor(
            inbound_rx,
            accept,
            control_in.clone(),
            control_out_rx.take(),
            shared.clone(),
        ));
    }
    let mut opens: std::collections::VecDeque<(u16, UnixStream)> = Default::default();
    let mut closing = false;
    let mut cmds_open = true;
    std::future::poll_fn(|cx| {
        while cmds_open {
            match cmds.poll_recv(cx) {
                Poll::Ready(Some(Cmd::Open(k, s))) => opens.push_back((k, s)),
                Poll::Ready(Some(Cmd::Control(b))) => {
                    let _ = control_out_tx.send(b);
                }
                Poll::Ready(Some(Cmd::Close)) => closing = true,
                Poll::Ready(None) => {
                    cmds_open = false;
                    closing = true;
                }
                Poll::Pending => break,
            }
        }
        while !opens.is_empty() && !closing {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    let Some((k, local)) = opens.pop_front() else {
                        break;
                    };
                    if k == CONTROL {
                        tokio::spawn(control_stream(
                            stream,
                            true,
                            control_in.clone(),
                            control_out_rx.take(),
                            shared.clone(),
                        ));
                    } else {
                        tokio::spawn(carry_opened(stream, k, local, shared.clone()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    shared.fail(format!("cannot open a stream: {e}"));
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            }
        }
        if closing {
            return match conn.poll_close(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(()),
                Poll::Ready(Err(e)) => {
                    shared.fail(format!("closing the mux: {e}"));
                    Poll::Ready(())
                }
                Poll::Pending => Poll::Pending,
            };
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if role == Role::Client || inbound_tx.send(stream).is_err() {
                        // The client accepts no streams; an acceptor that ended refuses.
                        continue;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    shared.fail(format!("the mux failed: {e}"));
                    return Poll::Ready(());
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    tracing::debug!(%peer, "tunnel mux ended");
}

/// Server side: takes inbound streams in the order they were opened, reads each one's
/// index, and hands it to the caller's choice (QEMU needs its main channel first).
async fn acceptor(
    mut inbound: mpsc::UnboundedReceiver<yamux::Stream>,
    mut accept: Accept,
    control_in: std::sync::mpsc::Sender<serde_json::Value>,
    mut control_out: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    shared: Arc<Shared>,
) {
    while let Some(stream) = inbound.recv().await {
        let mut stream = stream.compat();
        let k = match tokio::time::timeout(Duration::from_secs(30), stream.read_u16()).await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => {
                shared.fail(format!("a stream opened without its index: {e}"));
                return;
            }
            Err(_) => {
                shared.fail("a stream sent no index within 30 s".into());
                return;
            }
        };
        if k == CONTROL {
            tokio::spawn(control_stream(
                stream.into_inner(),
                false,
                control_in.clone(),
                control_out.take(),
                shared.clone(),
            ));
            continue;
        }
        let local = match accept(k) {
            Ok(l) => l,
            Err(e) => {
                shared.fail(format!("stream {k} refused: {e}"));
                return;
            }
        };
        tokio::spawn(carry(stream, k, local, shared.clone()));
    }
}

/// Client side of a data stream: send the index, then carry.
async fn carry_opened(stream: yamux::Stream, k: u16, local: UnixStream, shared: Arc<Shared>) {
    let mut stream = stream.compat();
    if let Err(e) = stream.write_u16(k).await {
        shared.fail(format!("stream {k}: {e}"));
        return;
    }
    carry(stream, k, local, shared).await;
}

/// Carries one stream both ways until both directions ended; each end's EOF is passed
/// on as a half-close.
async fn carry(
    stream: tokio_util::compat::Compat<yamux::Stream>,
    k: u16,
    local: UnixStream,
    shared: Arc<Shared>,
) {
    let local = match local
        .set_nonblocking(true)
        .and_then(|_| tokio::net::UnixStream::from_std(local))
    {
        Ok(l) => l,
        Err(e) => {
            shared.fail(format!("stream {k}: local socket: {e}"));
            return;
        }
    };
    let (mut lr, mut lw) = local.into_split();
    let (mut yr, mut yw) = tokio::io::split(stream);
    let up = async {
        let mut r = tokio::io::BufReader::with_capacity(COPY_BUF, &mut lr);
        tokio::io::copy_buf(&mut r, &mut yw).await?;
        yw.shutdown().await
    };
    let down = async {
        let mut r = tokio::io::BufReader::with_capacity(COPY_BUF, &mut yr);
        tokio::io::copy_buf(&mut r, &mut lw).await?;
        lw.shutdown().await
    };
    match tokio::try_join!(up, down) {
        Ok(_) => shared.stream_done(),
        Err(e) => shared.fail(format!("stream {k}: {e}")),
    }
}

/// The control stream: length-prefixed JSON both ways. The opener (`announce`) first
/// sends the stream's index.
async fn control_stream(
    stream: yamux::Stream,
    announce: bool,
    incoming: std::sync::mpsc::Sender<serde_json::Value>,
    outgoing: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    shared: Arc<Shared>,
) {
    let stream = stream.compat();
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async move {
        if announce {
            let _ = w.write_u16(CONTROL).await;
        }
        if let Some(mut out) = outgoing {
            while let Some(body) = out.recv().await {
                let len = body.len() as u32;
                if w.write_u32(len).await.is_err() || w.write_all(&body).await.is_err() {
                    break;
                }
                let _ = w.flush().await;
            }
        }
        let _ = w.shutdown().await;
    };
    let reader = async move {
        loop {
            let len = match r.read_u32().await {
                Ok(n) => n as usize,
                Err(_) => return,
            };
            if len > MAX_CONTROL {
                shared.fail(format!(
                    "control message of {len} bytes announced; at most {MAX_CONTROL}"
                ));
                return;
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).await.is_err() {
                return;
            }
            match serde_json::from_slice(&body) {
                Ok(v) => {
                    if incoming.send(v).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    shared.fail(format!("bad control message: {e}"));
                    return;
                }
            }
        }
    };
    tokio::join!(writer, reader);
}
