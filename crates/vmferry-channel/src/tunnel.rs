//! The tunnel transport: every stream of one migration (QEMU's main channel, its multifd
//! channels) and a control stream, multiplexed by yamux inside ONE already-established,
//! already-authenticated TLS connection, for when no new connection can be made at all.
//!
//! ```text
//!  local sockets ⇄ [mux thread: tokio + yamux ⇄ TLS (tls_async)] ⇄ TCP
//! ```
//! The security layer is [`tls_async`], the pump's rules as a byte stream for tokio: it
//! carries plaintext between yamux and the TLS connection, in the same thread (no local
//! socket pair, no second thread in between). The framing layer is yamux, run by a
//! single-threaded tokio runtime over it. yamux gives every stream its own flow-control
//! window: a QEMU that stops reading stalls its own stream only (the sender blocks once
//! the window is spent), and the control stream keeps moving.
//!
//! This module must never touch keys or records (that is [`tls_async`]'s job, and only
//! its), and never buffer without bound: every queue here has a limit, every copy a
//! fixed buffer, and yamux's receive windows are capped per connection.
//!
//! # Inside the mux
//! The client (the migration source) opens the control stream first, then one stream per
//! local connection; the server (the destination) never opens streams. Each data stream
//! begins with its index k as a big-endian u16, then carries raw bytes. The server hands
//! streams to its `accept` callback in yamux stream-id order, which is the order they
//! were opened (QEMU needs its main channel first), whatever order their first frames
//! arrive in.
//!
//! The control stream carries frames of a 4-byte big-endian length and JSON (at most
//! 64 KiB): the client's `hello` (protocol version) first, then the callers' messages
//! and the tunnel's own notes:
//! - `end {stream, bytes}`: "I sent all of stream k's bytes in my direction: this many".
//!   A yamux stream end alone cannot be trusted: a reset, or a connection that died,
//!   also reads as end-of-stream. A direction counts as ended cleanly only when its EOF
//!   came and the byte count matches this note, as TLS's close_notify does for a
//!   connection.
//! - `refused {stream, cause}` / `failed {stream, cause}`: the peer gave up on stream k,
//!   and why; the other side reports the cause instead of a bare reset.
//!
//! # Ending
//! `close` on either side sends the remaining control messages, closes yamux (GoAway),
//! then sends close_notify. The other side's yamux ends on the GoAway, and its mux
//! answers in the same way by itself, so TLS ends cleanly both ways. Both muxes keep
//! reading TLS until the peer's close_notify, so neither closes its socket on data the
//! other still sends. A TCP end without close_notify breaks the tunnel ("cut short").
//! `stop` cuts the TCP connection and every local socket at once.

use crate::compress::{Filters, Outgoing};
use crate::meter::Meter;
use crate::tls_async::{self, TlsIo};
use futures::future::{self, Either};
use futures::io::{AsyncRead as _, AsyncReadExt as _, AsyncWrite as _};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::io::ErrorKind;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot, watch, Notify};

/// The version of the framing described in the module docs.
const VERSION: u32 = 1;
/// Largest control frame, once encoded (libvirt's whole tunnel moves 64 KiB at a time).
pub const MAX_CONTROL: usize = 64 * 1024;
/// Largest yamux data frame we send. yamux's own default (16 KiB) costs a frame, a
/// channel message and a wake-up per 16 KiB; larger frames measured faster (see the
/// throughput test). yamux refuses frames over 1 MiB.
const FRAME: usize = 256 * 1024;
/// Copy buffer per direction per stream.
const COPY_BUF: usize = 256 * 1024;
/// yamux streams per connection (the control stream included). Each is guaranteed a
/// 256 KiB window; windows grow with measured bandwidth up to the connection's cap.
const MAX_STREAMS: usize = 128;
/// Data streams one tunnel may open (main channel + multifd channels + spares).
const MAX_DATA_STREAMS: usize = MAX_STREAMS - 8;
/// Cap of all receive windows of the connection together: what a stalled receiver can
/// be made to buffer at most.
const MAX_WINDOWS: usize = 256 << 20;
/// Control messages queued in each direction before the sender waits.
const MAILBOX: usize = 64;
/// How long `open`, `send_control` and the server's wait for a stream's index may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server's `accept` callback may take for one stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failing stream waits for the peer's word on why, before reporting its own.
const CAUSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("tunnel to {peer}: cannot start: {cause}")]
    Start { peer: String, cause: String },
    #[error("tunnel to {peer}: {cause}")]
    Ended { peer: String, cause: String },
    #[error("tunnel to {peer}: stream {k}: {cause}")]
    Stream { peer: String, k: u16, cause: String },
    #[error("tunnel to {peer}: a control message may be at most 64 KiB once encoded; this one is {len} bytes")]
    ControlTooLarge { peer: String, len: usize },
    #[error("tunnel to {peer}: {what} did not happen within {after:?}{hint}")]
    Timeout {
        peer: String,
        what: &'static str,
        after: Duration,
        hint: &'static str,
    },
    #[error("tunnel to {peer}: only the source opens streams")]
    NotClient { peer: String },
    #[error("tunnel to {peer}: {MAILBOX} requests are already waiting for the multiplexer")]
    Busy { peer: String },
}

/// The server's choice of where each stream the client opens goes.
pub type Accept = Box<dyn FnMut(u16) -> Result<UnixStream, String> + Send>;

/// One migration's tunnel, either end. Blocking methods, usable from any std thread.
pub struct Tunnel {
    shared: Arc<Shared>,
    stop: TunnelStop,
    /// Set once `close` has run, so that dropping the tunnel afterwards cuts nothing.
    closed: bool,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Tunnel")
            .field("peer", &self.shared.peer)
            .field("role", &self.shared.role)
            .field("streams_done", &st.done)
            .field("failed", &st.failed)
            .field("broken", &st.broken)
            .finish()
    }
}

/// Cuts a tunnel from any thread: the TCP connection, the mux and every local socket.
#[derive(Clone)]
pub struct TunnelStop {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TunnelStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStop")
            .field("peer", &self.shared.peer)
            .finish()
    }
}

impl TunnelStop {
    pub fn stop(&self) {
        self.shared.cut("it was stopped on this host".into());
    }
}

/// Which end of the tunnel this is. The names are TLS's; the roles are the migration's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The source: opens streams.
    Client,
    /// The destination: accepts them.
    Server,
}

impl Role {
    /// The other end, as errors name it.
    fn peer_word(self) -> &'static str {
        match self {
            Role::Client => "the destination",
            Role::Server => "the source",
        }
    }
}

impl Tunnel {
    /// Client (source): starts the mux over an established TLS connection.
    pub fn client(
        conn: rustls::Connection,
        tcp: TcpStream,
        peer: &str,
        meter: Arc<Meter>,
        filters: Filters,
    ) -> Result<Tunnel, TunnelError> {
        Self::start(conn, tcp, peer, meter, filters, None)
    }

    /// Server (destination): `accept(k)` is called (from a thread of the tunnel, in the
    /// order the client opened them) for every data stream; it returns the local socket
    /// to carry that stream to, or `Err(cause)` to refuse it, which fails the stream on
    /// both ends with that cause.
    pub fn server(
        conn: rustls::Connection,
        tcp: TcpStream,
        peer: &str,
        meter: Arc<Meter>,
        filters: Filters,
        accept: Accept,
    ) -> Result<Tunnel, TunnelError> {
        Self::start(conn, tcp, peer, meter, filters, Some(accept))
    }

    fn start(
        conn: rustls::Connection,
        tcp: TcpStream,
        peer: &str,
        meter: Arc<Meter>,
        filters: Filters,
        accept: Option<Accept>,
    ) -> Result<Tunnel, TunnelError> {
        let start_err = |what: &str, e: std::io::Error| TunnelError::Start {
            peer: peer.to_string(),
            cause: format!("{what}: {e}"),
        };
        let role = match accept {
            Some(_) => Role::Server,
            None => Role::Client,
        };
        // Kept to cut the connection from any thread (`stop`).
        let tcp_stop = tcp.try_clone().map_err(|e| start_err("stop handle", e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| start_err("mux runtime", e))?;
        let (cmd_tx, cmd_rx) = mpsc::channel(MAILBOX);
        let (phase, _) = watch::channel(Phase::Running);
        let shared = Arc::new(Shared {
            peer: peer.to_string(),
            role,
            filters,
            meter,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            outbox: Mailbox::new(MAILBOX),
            inbox: Mailbox::new(MAILBOX),
            ends: Mutex::new(Ends::default()),
            ends_changed: Notify::new(),
            phase,
            tasks: AtomicUsize::new(0),
            tasks_changed: Notify::new(),
            commands: cmd_tx,
            tcp_stop,
            stopped: AtomicBool::new(false),
        });
        if role == Role::Client {
            shared.outbox.push_note(Frame::Hello { version: VERSION });
        }
        let tunnel = Tunnel {
            stop: TunnelStop {
                shared: shared.clone(),
            },
            shared: shared.clone(),
            closed: false,
        };

        // Where the server's `accept` runs: its own thread, as it may block (connecting
        // to a QEMU whose backlog is full must not stall the streams QEMU is reading).
        let accept_tx = match accept {
            Some(mut accept) => {
                let (tx, rx) = std::sync::mpsc::channel::<AcceptRequest>();
                let spawned = std::thread::Builder::new()
                    .name("tunnel-accept".into())
                    .spawn(move || {
                        for (k, reply) in rx {
                            let _ = reply.send(accept(k));
                        }
                    });
                if let Err(e) = spawned {
                    tunnel.stop();
                    return Err(start_err("cannot start the accept thread", e));
                }
                Some(tx)
            }
            None => None,
        };

        // Framing layer.
        {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("tunnel-mux".into())
                .spawn(move || {
                    rt.block_on(mux(shared.clone(), conn, tcp, cmd_rx, accept_tx));
                    drop(rt);
                    shared.outbox.close();
                    shared.inbox.close();
                    shared.lock().mux_ended = true;
                    shared.changed.notify_all();
                });
            if let Err(e) = spawned {
                tunnel.stop();
                return Err(start_err("cannot start the mux thread", e));
            }
        }
        Ok(tunnel)
    }

    /// Client: opens data stream `k` and carries `local` ⇄ it in both directions until
    /// both directions end (each EOF passed on as a half-close). Returns once the stream
    /// is open, without waiting for any data.
    pub fn open(&self, k: u16, local: UnixStream) -> Result<(), TunnelError> {
        let peer = self.shared.peer.clone();
        if self.shared.role != Role::Client {
            return Err(TunnelError::NotClient { peer });
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.command(Command::Open { k, local, reply })?;
        match answer.recv_timeout(REQUEST_TIMEOUT) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(TunnelError::Timeout {
                peer,
                what: "opening a stream",
                after: REQUEST_TIMEOUT,
                hint: "",
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(self.ended()),
        }
    }

    /// Sends one control message (queued behind at most 63 others; waits up to 10 s for
    /// room if the peer is not reading its control messages).
    pub fn send_control(&self, msg: &serde_json::Value) -> Result<(), TunnelError> {
        let peer = self.shared.peer.clone();
        let frame = Frame::Message(msg.clone());
        let len = frame.encode().len();
        if len > MAX_CONTROL + 4 {
            return Err(TunnelError::ControlTooLarge { peer, len: len - 4 });
        }
        match self
            .shared
            .outbox
            .push_wait(frame, Instant::now() + REQUEST_TIMEOUT)
        {
            Ok(()) => Ok(()),
            Err(PushError::Full) => Err(TunnelError::Timeout {
                peer,
                what: "queueing a control message",
                after: REQUEST_TIMEOUT,
                hint: " (is the peer reading its control messages?)",
            }),
            Err(PushError::Closed) => Err(self.ended()),
        }
    }

    /// Receives the next control message: `None` if none came within `timeout`, an
    /// error once the tunnel has ended and every message it brought has been read.
    pub fn recv_control(
        &self,
        timeout: Duration,
    ) -> Result<Option<serde_json::Value>, TunnelError> {
        match self.shared.inbox.pop_wait(Instant::now() + timeout) {
            Ok(v) => Ok(v),
            Err(()) => Err(self.ended()),
        }
    }

    /// Data streams that ended cleanly so far, and the first stream failure (if any).
    pub fn streams_done(&self) -> (usize, Option<String>) {
        let st = self.shared.lock();
        (st.done, st.failed.clone())
    }

    /// Blocks until `n` data streams ended cleanly (Ok), one failed (Err(cause)), the
    /// tunnel ended, or `timeout` passed (Err naming it).
    pub fn wait_streams(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let peer = &self.shared.peer;
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(f) = &st.failed {
                return Err(f.clone());
            }
            if st.done >= n {
                return Ok(());
            }
            if let Some(b) = &st.broken {
                return Err(format!(
                    "tunnel to {peer}: {b} ({} of {n} streams had ended)",
                    st.done
                ));
            }
            if st.mux_ended {
                return Err(format!(
                    "tunnel to {peer}: the tunnel ended after {} of {n} streams",
                    st.done
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "tunnel to {peer}: only {} of {n} streams ended within {timeout:?}",
                    st.done
                ));
            }
            st = match self.shared.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Graceful end: sends the control messages still queued, closes the mux and then
    /// the TLS connection with close_notify (once the other end has closed its side
    /// too). Call it after all streams ended: streams still open fail. Err if the
    /// tunnel could not end cleanly within `timeout` (it is then cut).
    pub fn close(mut self, timeout: Duration) -> Result<(), String> {
        self.closed = true;
        let peer = self.shared.peer.clone();
        let deadline = Instant::now() + timeout;
        // Fails only if the mux has ended already, which is what we wait for below.
        let _ = self.shared.commands.try_send(Command::Close);
        let mut st = self.shared.lock();
        while !(st.mux_ended && st.pump.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                self.shared
                    .cut(format!("it did not close within {timeout:?}"));
                return Err(format!(
                    "tunnel to {peer}: did not close cleanly within {timeout:?}; cut"
                ));
            }
            st = match self.shared.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        if let Some(b) = &st.broken {
            return Err(format!("tunnel to {peer}: {b}"));
        }
        match &st.pump {
            Some(Err(e)) => Err(format!("tunnel to {peer}: {e}")),
            _ => Ok(()),
        }
    }

    /// Cuts everything at once (cancel): the TCP connection, the mux, every local socket.
    pub fn stop(&self) {
        self.stop.stop();
    }

    pub fn stop_handle(&self) -> TunnelStop {
        self.stop.clone()
    }

    fn command(&self, c: Command) -> Result<(), TunnelError> {
        self.shared.commands.try_send(c).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TunnelError::Busy {
                peer: self.shared.peer.clone(),
            },
            mpsc::error::TrySendError::Closed(_) => self.ended(),
        })
    }

    fn ended(&self) -> TunnelError {
        let cause = self
            .shared
            .lock()
            .broken
            .clone()
            .unwrap_or_else(|| "the tunnel has ended".into());
        TunnelError::Ended {
            peer: self.shared.peer.clone(),
            cause,
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // A tunnel dropped without `close` is abandoned: cut it, so no thread lingers.
        if !self.closed {
            self.stop.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------
// State shared by the caller's threads, the pump's thread and the mux's tasks.

struct Shared {
    /// The TLS peer, as errors name it (e.g. "10.0.0.2:4700").
    peer: String,
    role: Role,
    /// What every data stream applies between its local socket and the mux.
    filters: Filters,
    meter: Arc<Meter>,
    /// What the callers wait on; `changed` is signalled on every change.
    state: Mutex<State>,
    changed: Condvar,
    /// Control frames to send, and control messages received.
    outbox: Mailbox<Frame>,
    inbox: Mailbox<serde_json::Value>,
    /// The peer's word on how each of our incoming stream directions ended.
    ends: Mutex<Ends>,
    ends_changed: Notify,
    /// Where the mux is in its life; tasks watch it to stop.
    phase: watch::Sender<Phase>,
    /// Stream and control tasks still running, so the mux ends only after them.
    tasks: AtomicUsize,
    tasks_changed: Notify,
    /// Requests to the mux.
    commands: mpsc::Sender<Command>,
    /// The TCP connection, to cut it (the mux then sees it end).
    tcp_stop: TcpStream,
    /// `cut` was called: the connection's end is ours, not a failure.
    stopped: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Data streams that ended cleanly in both directions.
    done: usize,
    /// The first stream failure, as a whole sentence naming the peer.
    failed: Option<String>,
    /// Why the connection broke (or was stopped), if it did.
    broken: Option<String>,
    /// The TLS connection's end: Ok after a clean close (close_notify both ways).
    pump: Option<Result<(), String>>,
    /// The mux thread has finished.
    mux_ended: bool,
}

#[derive(Debug, Default)]
struct Ends {
    notes: HashMap<u16, PeerEnd>,
    /// No more notes will come: the control stream ended.
    control_ended: bool,
}

#[derive(Debug)]
enum PeerEnd {
    Sent(u64),
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// We closed the mux: anything still open is cut short.
    ClosedHere,
    /// The peer closed the mux: streams drain what they were sent, then end.
    ClosedThere,
    /// The connection broke or was stopped: everything ends at once.
    Broken,
}

enum Command {
    Open {
        k: u16,
        local: UnixStream,
        reply: std::sync::mpsc::SyncSender<Result<(), TunnelError>>,
    },
    /// The control writer sent everything and closed its side (part of closing).
    ControlFlushed,
    Close,
}

type AcceptRequest = (u16, oneshot::Sender<Result<UnixStream, String>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn stream_done(&self) {
        self.lock().done += 1;
        self.changed.notify_all();
    }

    /// Records a stream failure; `what` follows "tunnel to PEER: ".
    fn stream_failed(&self, what: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(format!("tunnel to {}: {what}", self.peer));
        }
        drop(st);
        self.changed.notify_all();
    }

    fn record_broken(&self, cause: String) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(cause);
        }
        drop(st);
        self.changed.notify_all();
    }

    fn broken_cause(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    /// Cuts everything: the cause is recorded first, so whatever sees the cut names it.
    fn cut(&self, cause: String) {
        self.record_broken(cause);
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.tcp_stop.shutdown(Shutdown::Both);
        self.phase.send_if_modified(|p| {
            let was = *p;
            *p = Phase::Broken;
            was != Phase::Broken
        });
    }

    fn note_end(&self, k: u16, end: PeerEnd) {
        lock(&self.ends).notes.insert(k, end);
        self.ends_changed.notify_waiters();
    }

    fn control_ended(&self) {
        lock(&self.ends).control_ended = true;
        self.ends_changed.notify_waiters();
    }

    /// Waits for the peer's word on how stream `k`'s incoming direction ended.
    async fn peer_end(&self, k: u16) -> Option<PeerEnd> {
        loop {
            let changed = self.ends_changed.notified();
            {
                let mut ends = lock(&self.ends);
                if let Some(e) = ends.notes.remove(&k) {
                    return Some(e);
                }
                if ends.control_ended {
                    return None;
                }
            }
            changed.await;
        }
    }

    fn task_started(self: &Arc<Self>) -> TaskGuard {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        TaskGuard(self.clone())
    }

    async fn tasks_finished(&self) {
        loop {
            let changed = self.tasks_changed.notified();
            if self.tasks.load(Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// Counts a running task; dropped (however the task ends) it counts it out.
struct TaskGuard(Arc<Shared>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.tasks.fetch_sub(1, Ordering::SeqCst);
        self.0.tasks_changed.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------
// A bounded queue between blocking callers and the mux's tasks.

struct Mailbox<T> {
    inner: Mutex<MailboxInner<T>>,
    cap: usize,
    /// Blocking waiters.
    cond: Condvar,
    /// Async waiters.
    notify: Notify,
}

struct MailboxInner<T> {
    items: VecDeque<T>,
    closed: bool,
}

enum PushError {
    Full,
    Closed,
}

impl<T> Mailbox<T> {
    fn new(cap: usize) -> Self {
        Mailbox {
            inner: Mutex::new(MailboxInner {
                items: VecDeque::new(),
                closed: false,
            }),
            cap,
            cond: Condvar::new(),
            notify: Notify::new(),
        }
    }

    fn changed(&self) {
        self.cond.notify_all();
        self.notify.notify_waiters();
    }

    /// Blocking push: waits for room until `deadline`.
    fn push_wait(&self, item: T, deadline: Instant) -> Result<(), PushError> {
        let mut g = lock(&self.inner);
        loop {
            if g.closed {
                return Err(PushError::Closed);
            }
            if g.items.len() < self.cap {
                g.items.push_back(item);
                drop(g);
                self.changed();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PushError::Full);
            }
            g = match self.cond.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The tunnel's own notes skip the limit: there are at most two per stream.
    fn push_note(&self, item: T) {
        let mut g = lock(&self.inner);
        if !g.closed {
            g.items.push_back(item);
        }
        drop(g);
        self.changed();
    }

    /// Async push: waits for room. Err once closed.
    async fn push(&self, item: T) -> Result<(), ()> {
        let mut item = Some(item);
        loop {
            let changed = self.notify.notified();
            {
                let mut g = lock(&self.inner);
                if g.closed {
                    return Err(());
                }
                if g.items.len() < self.cap {
                    if let Some(item) = item.take() {
                        g.items.push_back(item);
                    }
                    drop(g);
                    self.changed();
                    return Ok(());
                }
            }
            changed.await;
        }
    }

    /// Blocking pop: `Ok(None)` at the deadline, Err once closed and empty.
    fn pop_wait(&self, deadline: Instant) -> Result<Option<T>, ()> {
        let mut g = lock(&self.inner);
        loop {
            if let Some(item) = g.items.pop_front() {
                drop(g);
                self.changed();
                return Ok(Some(item));
            }
            if g.closed {
                return Err(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            g = match self.cond.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Async pop: None once closed and empty.
    async fn pop(&self) -> Option<T> {
        loop {
            let changed = self.notify.notified();
            {
                let mut g = lock(&self.inner);
                if let Some(item) = g.items.pop_front() {
                    drop(g);
                    self.changed();
                    return Some(item);
                }
                if g.closed {
                    return None;
                }
            }
            changed.await;
        }
    }

    fn close(&self) {
        lock(&self.inner).closed = true;
        self.changed();
    }
}

// ---------------------------------------------------------------------------------------
// Control frames.

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Frame {
    Hello { version: u32 },
    Message(serde_json::Value),
    End { stream: u16, bytes: u64 },
    Refused { stream: u16, cause: String },
    Failed { stream: u16, cause: String },
}

impl Frame {
    /// Length-prefixed JSON.
    fn encode(&self) -> Vec<u8> {
        // Serializing these types cannot fail (string keys, no foreign Serialize impls).
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// A cause, cut short so that its note fits a control frame.
fn short(cause: &str) -> String {
    const MAX: usize = 4096;
    if cause.len() <= MAX {
        return cause.to_string();
    }
    let mut end = MAX;
    while !cause.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &cause[..end])
}

// ---------------------------------------------------------------------------------------
// The TLS connection's end, as the tunnel reports it.

impl Shared {
    /// How a failure of the TLS connection reads (a cut makes it fail too).
    fn tls_cause(&self, e: &dyn std::fmt::Display) -> String {
        if self.stopped.load(Ordering::SeqCst) {
            "it was stopped on this host".to_string()
        } else {
            format!("the connection broke: {e}")
        }
    }
}

fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    // In this order: each setter checks windows ≥ 256 KiB × streams.
    c.set_max_num_streams(MAX_STREAMS);
    c.set_max_connection_receive_window(Some(MAX_WINDOWS));
    c.set_split_send_size(FRAME);
    // Data the peer sent before it closed is still delivered.
    c.set_read_after_close(true);
    c
}

// ---------------------------------------------------------------------------------------
// The mux: one task drives the yamux connection; each stream is carried by its own task.

enum Event {
    Command(Command),
    Outbound(Result<yamux::Stream, yamux::ConnectionError>),
    Inbound(yamux::Stream),
    /// The connection ended: with an error, or (None) at EOF or the peer's GoAway.
    Ended(Option<yamux::ConnectionError>),
    ClosedHere(Result<(), yamux::ConnectionError>),
}

/// What the client asked to open, waiting for yamux.
enum Opening {
    Control,
    Data {
        k: u16,
        local: tokio::net::UnixStream,
        reply: std::sync::mpsc::SyncSender<Result<(), TunnelError>>,
    },
}

async fn mux(
    shared: Arc<Shared>,
    tls: rustls::Connection,
    tcp: TcpStream,
    mut commands: mpsc::Receiver<Command>,
    accept: Option<std::sync::mpsc::Sender<AcceptRequest>>,
) {
    // The first failure of the connection is recorded as it happens, before yamux (and
    // so any stream) sees it.
    let on_fail: tls_async::OnFail = {
        let shared = shared.clone();
        Box::new(move |e| shared.record_broken(shared.tls_cause(e)))
    };
    let wire = match TlsIo::new(tls, tcp, &shared.peer, on_fail) {
        Ok(w) => w,
        Err(e) => {
            shared.cut(format!("the mux cannot use its socket: {e}"));
            shared.lock().pump = Some(Err(format!("the mux cannot use its socket: {e}")));
            shared.changed.notify_all();
            return;
        }
    };
    let tls = wire.clone();
    let role = shared.role;
    let mode = match role {
        Role::Client => yamux::Mode::Client,
        Role::Server => yamux::Mode::Server,
    };
    let mut conn = yamux::Connection::new(wire, yamux_config(), mode);

    let mut opening: VecDeque<Opening> = VecDeque::new();
    let mut opened: HashSet<u16> = HashSet::new();
    // Server: inbound data streams by yamux id, handed to the acceptor in id order.
    let mut early: BTreeMap<u32, yamux::Stream> = BTreeMap::new();
    let mut next_id: u32 = 3;
    let (to_acceptor, acceptor_rx) = mpsc::unbounded_channel::<yamux::Stream>();
    let mut have_control = false;
    let mut close_asked = false;
    let mut closing = false;
    match (role, accept) {
        (Role::Client, _) => opening.push_back(Opening::Control),
        (Role::Server, Some(accept)) => {
            tokio::spawn(acceptor(shared.clone(), acceptor_rx, accept));
        }
        (Role::Server, None) => {}
    }

    let end = loop {
        let event = poll_fn(|cx| {
            if closing {
                return conn.poll_close(cx).map(Event::ClosedHere);
            }
            if !opening.is_empty() {
                if let Poll::Ready(r) = conn.poll_new_outbound(cx) {
                    return Poll::Ready(Event::Outbound(r));
                }
            }
            if let Poll::Ready(Some(c)) = commands.poll_recv(cx) {
                return Poll::Ready(Event::Command(c));
            }
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => Poll::Ready(Event::Inbound(s)),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Event::Ended(Some(e))),
                Poll::Ready(None) => Poll::Ready(Event::Ended(None)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match event {
            Event::Command(Command::Open { k, local, reply }) => {
                let refuse = |cause: String| {
                    let _ = reply.send(Err(TunnelError::Stream {
                        peer: shared.peer.clone(),
                        k,
                        cause,
                    }));
                };
                if close_asked {
                    refuse("the tunnel is closing".into());
                } else if opened.contains(&k) {
                    refuse("is already open".into());
                } else if opened.len() >= MAX_DATA_STREAMS {
                    refuse(format!(
                        "a tunnel carries at most {MAX_DATA_STREAMS} streams"
                    ));
                } else {
                    // Made ready before yamux assigns an id: an id given out must be used
                    // at once, or the server would wait for it forever (see `early`).
                    match local
                        .set_nonblocking(true)
                        .map(|_| crate::transport::tune_local(&local))
                        .and_then(|_| tokio::net::UnixStream::from_std(local))
                    {
                        Ok(local) => {
                            opened.insert(k);
                            opening.push_back(Opening::Data { k, local, reply });
                        }
                        Err(e) => refuse(format!("cannot use the local socket: {e}")),
                    }
                }
            }
            Event::Command(Command::Close) => {
                close_asked = true;
                // What callers queued goes out first; the writer then says so.
                shared.outbox.close();
                if !have_control {
                    closing = true;
                }
            }
            Event::Command(Command::ControlFlushed) => {
                if close_asked {
                    closing = true;
                }
            }
            Event::Outbound(Ok(stream)) => match opening.pop_front() {
                Some(Opening::Control) => {
                    have_control = true;
                    tokio::spawn(control(shared.clone(), stream));
                }
                Some(Opening::Data { k, local, reply }) => {
                    tokio::spawn(carry(shared.clone(), k, stream, local, true));
                    let _ = reply.send(Ok(()));
                }
                None => {}
            },
            Event::Outbound(Err(e)) => {
                break Err(format!("the multiplexer failed to open a stream: {e}"));
            }
            Event::Inbound(stream) => {
                let id = stream.id().val();
                if role == Role::Client {
                    // The destination opens nothing; dropping it resets it.
                    tracing::debug!(peer = %shared.peer, id, "tunnel: refused a stream the destination opened");
                } else if id == 1 && !have_control {
                    have_control = true;
                    tokio::spawn(control(shared.clone(), stream));
                } else if id >= next_id && early.len() < MAX_STREAMS {
                    early.insert(id, stream);
                    while let Some(s) = early.remove(&next_id) {
                        let _ = to_acceptor.send(s);
                        next_id += 2;
                    }
                } else {
                    break Err(format!(
                        "the source opened stream id {id} out of order or too many streams"
                    ));
                }
            }
            Event::Ended(Some(e)) => break Err(format!("the multiplexer failed: {e}")),
            Event::Ended(None) => break Ok(Phase::ClosedThere),
            Event::ClosedHere(Ok(())) => break Ok(Phase::ClosedHere),
            Event::ClosedHere(Err(e)) => {
                break Err(format!("the multiplexer failed while closing: {e}"))
            }
        }
    };
    // A failed connection (or `stop`) records its cause before yamux sees it end, so
    // look there first.
    let end = match (end, shared.broken_cause()) {
        (_, Some(_)) => Phase::Broken,
        (Ok(p), None) => p,
        (Err(cause), None) => {
            shared.cut(cause);
            Phase::Broken
        }
    };
    // Never undo a cut made meanwhile from another thread.
    shared.phase.send_if_modified(|p| {
        let keep = *p == Phase::Broken;
        if !keep {
            *p = end;
        }
        !keep
    });
    // Nothing more can be sent; the control writer ends once it has tried the rest.
    shared.outbox.close();
    if !have_control {
        shared.control_ended();
    }
    drop(to_acceptor);
    drop(early);
    for o in opening {
        if let Opening::Data { k, reply, .. } = o {
            let _ = reply.send(Err(TunnelError::Stream {
                peer: shared.peer.clone(),
                k,
                cause: "the tunnel ended before it opened".into(),
            }));
        }
    }
    // Streams that drained what they were sent, control tasks, ... end by themselves now.
    // Meanwhile end TLS: close_notify (unless yamux's close sent it), then keep reading
    // until the peer's, as it may still deliver its last frames.
    drop(conn);
    let finish = async {
        let r = if shared.stopped.load(Ordering::SeqCst) {
            Err("it was stopped on this host".to_string())
        } else {
            tls.finish().await.map_err(|e| shared.tls_cause(&e))
        };
        if let Err(cause) = &r {
            shared.record_broken(cause.clone());
        }
        shared.lock().pump = Some(r);
        shared.changed.notify_all();
    };
    future::join(finish, shared.tasks_finished()).await;
}

/// Server: takes the client's data streams in the order they were opened, reads each
/// one's index, and asks `accept` where it goes, one at a time.
async fn acceptor(
    shared: Arc<Shared>,
    mut inbound: mpsc::UnboundedReceiver<yamux::Stream>,
    accept: std::sync::mpsc::Sender<AcceptRequest>,
) {
    let _task = shared.task_started();
    let mut phase = shared.phase.subscribe();
    let work = async {
        let mut seen = HashSet::new();
        while let Some(mut stream) = inbound.recv().await {
            let mut head = [0u8; 2];
            let k = match tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut head)).await
            {
                Ok(Ok(())) => u16::from_be_bytes(head),
                Ok(Err(e)) => {
                    shared.stream_failed(format!(
                        "the source opened a stream but sent no stream index: {e}"
                    ));
                    continue;
                }
                Err(_) => {
                    shared.stream_failed(format!(
                        "the source opened a stream but sent no stream index within {REQUEST_TIMEOUT:?}"
                    ));
                    continue;
                }
            };
            let refuse = |cause: String| {
                shared.stream_failed(format!("stream {k} refused by this destination: {cause}"));
                shared.outbox.push_note(Frame::Refused {
                    stream: k,
                    cause: short(&cause),
                });
            };
            if !seen.insert(k) {
                refuse("a stream with this index is already open".into());
                continue;
            }
            let (tx, rx) = oneshot::channel();
            if accept.send((k, tx)).is_err() {
                refuse("the accept callback has gone".into());
                continue;
            }
            let local = match tokio::time::timeout(ACCEPT_TIMEOUT, rx).await {
                Ok(Ok(Ok(local))) => local,
                Ok(Ok(Err(cause))) => {
                    refuse(cause);
                    continue;
                }
                Ok(Err(_)) => {
                    refuse("the accept callback panicked".into());
                    continue;
                }
                Err(_) => {
                    refuse(format!("no local socket within {ACCEPT_TIMEOUT:?}"));
                    continue;
                }
            };
            match local
                .set_nonblocking(true)
                .map(|_| crate::transport::tune_local(&local))
                .and_then(|_| tokio::net::UnixStream::from_std(local))
            {
                Ok(local) => {
                    tokio::spawn(carry(shared.clone(), k, stream, local, false));
                }
                Err(e) => refuse(format!("cannot use the local socket: {e}")),
            }
        }
    };
    let over = phase.wait_for(|p| matches!(p, Phase::Broken | Phase::ClosedHere));
    future::select(pin!(work), pin!(over)).await;
}

/// Why carrying a stream failed, and whose fault it was.
enum CarryError {
    /// Here (our local socket, our own decision): the peer is told why.
    Here(String),
    /// At the peer or on the way: the peer knows already, or cannot be told.
    There(String),
}

/// Carries one data stream both ways until both directions ended; counts it done or
/// failed. The client (`announce`) first sends the stream's index.
async fn carry(
    shared: Arc<Shared>,
    k: u16,
    stream: yamux::Stream,
    local: tokio::net::UnixStream,
    announce: bool,
) {
    let _task = shared.task_started();
    let mut phase = shared.phase.subscribe();
    let work = carry_both(&shared, k, stream, local, announce);
    // A broken connection cuts the stream at once, and so does our own close. A close by
    // the peer does not: what it sent before it closed is still delivered.
    let cut = phase.wait_for(|p| matches!(p, Phase::Broken | Phase::ClosedHere));
    let outcome = match future::select(pin!(work), pin!(cut)).await {
        Either::Left((r, _)) => Some(r),
        Either::Right(_) => None,
    };
    match outcome {
        Some(Ok(())) => shared.stream_done(),
        Some(Err(CarryError::Here(cause))) => {
            shared.stream_failed(format!("stream {k}: {cause}"));
            shared.outbox.push_note(Frame::Failed {
                stream: k,
                cause: short(&cause),
            });
        }
        Some(Err(CarryError::There(cause))) => {
            shared.stream_failed(format!("stream {k}: {cause}"));
        }
        None => {
            let cause = shared
                .broken_cause()
                .unwrap_or_else(|| "the tunnel was closed while it was open".into());
            shared.stream_failed(format!("stream {k} was cut off: {cause}"));
        }
    }
}

async fn carry_both(
    shared: &Shared,
    k: u16,
    stream: yamux::Stream,
    local: tokio::net::UnixStream,
    announce: bool,
) -> Result<(), CarryError> {
    let peer_word = shared.role.peer_word();
    // Both directions in this one task, each locking the stream only within a poll: no
    // contention, and the receiving side can take yamux's frames whole (one copy less).
    let stream = Mutex::new(stream);
    let (mut lr, mut lw) = local.into_split();
    let mut phase = shared.phase.subscribe();

    // A yamux error alone says little ("connection is closed"); the peer's note says why.
    let there = |what: String| async move {
        let word = tokio::time::timeout(CAUSE_GRACE, shared.peer_end(k)).await;
        match word {
            Ok(Some(PeerEnd::Failed(cause))) => CarryError::There(cause),
            _ => match shared.broken_cause() {
                Some(b) => CarryError::There(format!("{what}: {b}")),
                None => CarryError::There(what),
            },
        }
    };

    let up = async {
        if announce {
            write_all(&stream, &k.to_be_bytes())
                .await
                .map_err(|e| format!("cannot announce it: {e}"))
                .map_err(CarryError::There)?;
        }
        let mut buf = vec![0u8; COPY_BUF];
        let mut outgoing = Outgoing::new(&shared.filters).map_err(CarryError::Here)?;
        // Bytes given to the stream (compressed, if so): what the peer must confirm.
        let mut sent = 0u64;
        // Once the peer closed the mux, what the local socket sends has nowhere to go.
        // (A break or our own close is `carry`'s to report.)
        let mut closed_there = pin!(phase.wait_for(|p| *p == Phase::ClosedThere));
        loop {
            let n = match future::select(pin!(lr.read(&mut buf)), closed_there.as_mut()).await {
                Either::Left((Ok(n), _)) => n,
                Either::Left((Err(e), _)) => {
                    return Err(CarryError::Here(format!("reading the local socket: {e}")))
                }
                Either::Right(_) => {
                    return Err(CarryError::There(format!(
                        "{peer_word} closed the tunnel while this stream was still sending"
                    )))
                }
            };
            if n == 0 {
                let tail = outgoing.finish().map_err(CarryError::Here)?;
                if let Err(e) = write_all(&stream, tail).await {
                    return Err(there(format!("sending: {e}")).await);
                }
                sent += tail.len() as u64;
                shared.meter.add_wire_forward(tail.len() as u64);
                break;
            }
            let out = outgoing.pass(&buf[..n]).map_err(CarryError::Here)?;
            if let Err(e) = write_all(&stream, out).await {
                return Err(there(format!("sending: {e}")).await);
            }
            sent += out.len() as u64;
            shared.meter.add_forward(n as u64);
            shared.meter.add_wire_forward(out.len() as u64);
        }
        shared.outbox.push_note(Frame::End {
            stream: k,
            bytes: sent,
        });
        if let Err(e) = poll_fn(|cx| Pin::new(&mut *lock(&stream)).poll_close(cx)).await {
            return Err(there(format!("ending: {e}")).await);
        }
        Ok(())
    };

    let down = async {
        let mut decompressor = shared.filters.decompressor().map_err(CarryError::Here)?;
        let mut plain = Vec::new();
        let mut got = 0u64;
        loop {
            match poll_fn(|cx| lock(&stream).poll_next_unpin(cx)).await {
                Some(Ok(packet)) => {
                    let packet = packet.as_ref();
                    got += packet.len() as u64;
                    shared.meter.add_wire_backward(packet.len() as u64);
                    let Some(d) = decompressor.as_mut() else {
                        lw.write_all(packet).await.map_err(|e| {
                            CarryError::Here(format!("writing to the local socket: {e}"))
                        })?;
                        shared.meter.add_backward(packet.len() as u64);
                        continue;
                    };
                    // A chunk of output at a time, however far the packet expands.
                    let mut at = 0;
                    loop {
                        plain.clear();
                        at += d
                            .decompress(&packet[at..], &mut plain, COPY_BUF)
                            .map_err(CarryError::There)?;
                        lw.write_all(&plain).await.map_err(|e| {
                            CarryError::Here(format!("writing to the local socket: {e}"))
                        })?;
                        shared.meter.add_backward(plain.len() as u64);
                        if at == packet.len() && plain.len() < COPY_BUF {
                            break;
                        }
                    }
                }
                Some(Err(e)) => return Err(there(format!("receiving: {e}")).await),
                None => break,
            }
        }
        match shared.peer_end(k).await {
            Some(PeerEnd::Sent(n)) if n == got => {
                if decompressor.as_ref().is_some_and(|d| !d.at_frame_end()) {
                    return Err(CarryError::There(format!(
                        "{peer_word}'s compressed stream ended in the middle of a frame"
                    )));
                }
            }
            Some(PeerEnd::Sent(n)) => {
                return Err(CarryError::There(format!(
                    "ended after {got} of the {n} bytes {peer_word} sent"
                )))
            }
            Some(PeerEnd::Failed(cause)) => return Err(CarryError::There(cause)),
            None => {
                let cause = shared
                    .broken_cause()
                    .unwrap_or_else(|| "the connection ended".into());
                return Err(CarryError::There(format!(
                    "ended without {peer_word} confirming it ({cause})"
                )));
            }
        }
        lw.shutdown()
            .await
            .map_err(|e| CarryError::Here(format!("half-closing the local socket: {e}")))
    };

    future::try_join(up, down).await.map(|_| ())
}

async fn write_all(stream: &Mutex<yamux::Stream>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *lock(stream)).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

async fn read_exact(stream: &Mutex<yamux::Stream>, mut buf: &mut [u8]) -> std::io::Result<bool> {
    let mut first = true;
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *lock(stream)).poll_read(cx, buf)).await?;
        if n == 0 {
            return if first {
                Ok(false)
            } else {
                Err(ErrorKind::UnexpectedEof.into())
            };
        }
        first = false;
        buf = &mut buf[n..];
    }
    Ok(true)
}

/// The control stream: the writer sends the outbox, the reader files what comes in.
async fn control(shared: Arc<Shared>, stream: yamux::Stream) {
    let _task = shared.task_started();
    let stream = Mutex::new(stream);
    let mut phase = shared.phase.subscribe();
    let writer = async {
        while let Some(frame) = shared.outbox.pop().await {
            if write_all(&stream, &frame.encode()).await.is_err() {
                // The connection is going; its end is reported from there.
                return;
            }
        }
        let _ = poll_fn(|cx| Pin::new(&mut *lock(&stream)).poll_close(cx)).await;
        let _ = shared.commands.try_send(Command::ControlFlushed);
    };
    let reader = async {
        if let Err(cause) = read_control(&shared, &stream).await {
            shared.cut(format!("{} {cause}", shared.role.peer_word()));
        }
    };
    let both = future::join(writer, reader);
    let over = phase.wait_for(|p| matches!(p, Phase::Broken | Phase::ClosedHere));
    future::select(pin!(both), pin!(over)).await;
    shared.control_ended();
}

/// Reads control frames until the stream ends; Err (completing "the peer ...") if the
/// peer broke the protocol.
async fn read_control(shared: &Shared, stream: &Mutex<yamux::Stream>) -> Result<(), String> {
    let mut hello = shared.role == Role::Client;
    loop {
        let mut len = [0u8; 4];
        match read_exact(stream, &mut len).await {
            Ok(true) => {}
            // Its end, or the connection's (reported from there).
            Ok(false) | Err(_) => return Ok(()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_CONTROL {
            return Err(format!(
                "sent a control message of {len} bytes; at most {MAX_CONTROL} are allowed"
            ));
        }
        let mut body = vec![0u8; len];
        if !matches!(read_exact(stream, &mut body).await, Ok(true)) {
            return Ok(());
        }
        let frame: Frame = serde_json::from_slice(&body)
            .map_err(|e| format!("sent a control frame this host does not understand: {e}"))?;
        match frame {
            Frame::Hello { version } if version == VERSION => hello = true,
            Frame::Hello { version } => {
                return Err(format!(
                    "speaks tunnel version {version}; this host speaks {VERSION}"
                ))
            }
            _ if !hello => return Err("did not start the control stream with hello".into()),
            Frame::Message(v) => {
                if shared.inbox.push(v).await.is_err() {
                    return Ok(());
                }
            }
            Frame::End { stream, bytes } => shared.note_end(stream, PeerEnd::Sent(bytes)),
            Frame::Refused { stream, cause } => {
                let word = shared.role.peer_word();
                shared.stream_failed(format!("stream {stream} refused by {word}: {cause}"));
                shared.note_end(
                    stream,
                    PeerEnd::Failed(format!("refused by {word}: {cause}")),
                );
            }
            Frame::Failed { stream, cause } => {
                let word = shared.role.peer_word();
                shared.stream_failed(format!("stream {stream} failed at {word}: {cause}"));
                shared.note_end(
                    stream,
                    PeerEnd::Failed(format!("failed at {word}: {cause}")),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! End-to-end over real TLS on loopback. (They live here rather than in `tests/`
    //! because `tests/tunnel.rs` belongs to `tunnel_yamux`.)

    use super::*;
    use crate::pump::{self, StopHandle};
    use crate::testing::{rss_kib, tls_pair};
    use std::io::{Read, Write};

    /// Where the server's streams arrive: the far end of each stream's local socket.
    type Arrivals = std::sync::mpsc::Receiver<(u16, UnixStream)>;

    struct Pair {
        client: Tunnel,
        server: Tunnel,
        arrivals: Arrivals,
        /// The server's TCP socket, to cut the connection under it.
        server_tcp: TcpStream,
    }

    fn pair() -> Pair {
        pair_with(Filters::default(), Arc::default(), Arc::default())
    }

    fn pair_with(filters: Filters, client_meter: Arc<Meter>, server_meter: Arc<Meter>) -> Pair {
        let (tx, arrivals) = std::sync::mpsc::channel();
        let accept: Accept = Box::new(move |k| {
            let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
            tx.send((k, theirs)).map_err(|e| e.to_string())?;
            Ok(ours)
        });
        let (client, server, server_tcp) = crate::testing::tunnel_pair(
            accept,
            crate::testing::TunnelOpts {
                filters,
                client_meter,
                server_meter,
                client_calls_server: "destination",
                server_calls_client: "source",
            },
        );
        Pair {
            client,
            server,
            arrivals,
            server_tcp,
        }
    }

    fn arrival(a: &Arrivals) -> (u16, UnixStream) {
        a.recv_timeout(Duration::from_secs(5))
            .expect("a stream arrived")
    }

    /// Pseudo-random bytes, cheap enough for hundreds of MiB.
    struct Noise(u64);

    impl Noise {
        fn fill(&mut self, buf: &mut [u8]) {
            for c in buf.chunks_mut(8) {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                c.copy_from_slice(&self.0.to_le_bytes()[..c.len()]);
            }
        }
    }

    /// Writes `len` pseudo-random bytes, half-closes, returns their SHA-256.
    fn send_noise(mut s: UnixStream, seed: u64, len: usize) -> Vec<u8> {
        let mut noise = Noise(seed | 1);
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            noise.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            s.write_all(&buf[..n]).expect("write");
            left -= n;
        }
        s.shutdown(Shutdown::Write).expect("half-close");
        hash.finish().as_ref().to_vec()
    }

    /// Reads to EOF; returns the SHA-256 and the length.
    fn recv_hash(s: &mut UnixStream) -> (Vec<u8>, usize) {
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0;
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                return (hash.finish().as_ref().to_vec(), len);
            }
            hash.update(&buf[..n]);
            len += n;
        }
    }

    #[test]
    fn compressed_streams_cross_byte_exact_and_shrink_inside_the_tunnel() {
        const UP: usize = 24 << 20;
        let filters = Filters {
            compress: crate::compress::Compression::Zstd { level: 1 },
        };
        let (cm, sm) = (Arc::new(Meter::default()), Arc::new(Meter::default()));
        let p = pair_with(filters, cm.clone(), sm.clone());
        let page = |i: usize| b"guest text page "[i % 16] ^ ((i / 4096) as u8 & 1);
        let up: Vec<u8> = (0..UP).map(page).collect();
        let mut threads = Vec::new();
        for k in 0..2u16 {
            let (qemu, ours) = UnixStream::pair().expect("pair");
            p.client.open(k, ours).expect("open");
            let (_, mut d) = arrival(&p.arrivals);
            let up = up.clone();
            threads.push(std::thread::spawn(move || {
                let d2 = d.try_clone().expect("clone");
                let down = std::thread::spawn(move || send_noise(d2, 99 + k as u64, 300_000));
                let mut q = qemu;
                let mut q2 = q.try_clone().expect("clone");
                let w = std::thread::spawn(move || {
                    q2.write_all(&up).expect("write");
                    q2.shutdown(Shutdown::Write).expect("shut");
                });
                let mut got = Vec::new();
                d.read_to_end(&mut got).expect("read up");
                let (got_down, n) = recv_hash(&mut q);
                w.join().expect("writer");
                assert_eq!(n, 300_000);
                assert!(got_down == down.join().expect("down"), "stream {k} down");
                got
            }));
        }
        for t in threads {
            assert!(t.join().expect("stream") == up, "upstream differs");
        }
        p.client
            .wait_streams(2, Duration::from_secs(10))
            .expect("client");
        p.server
            .wait_streams(2, Duration::from_secs(10))
            .expect("server");
        assert_eq!(cm.forward(), 2 * UP as u64);
        assert_eq!(sm.backward(), 2 * UP as u64);
        assert_eq!(cm.wire_forward(), sm.wire_backward());
        assert!(
            cm.wire_forward() < cm.forward() / 20,
            "{} of {} bytes",
            cm.wire_forward(),
            cm.forward()
        );
        p.client.stop();
    }

    #[test]
    fn four_streams_arrive_byte_exact_in_order_and_the_tunnel_closes_cleanly() {
        const N: u16 = 4;
        const UP: usize = 64 << 20;
        const DOWN: usize = 100_000;
        let p = pair();
        let mut src = Vec::new();
        for k in 0..N {
            let (qemu, ours) = UnixStream::pair().expect("pair");
            p.client.open(k, ours).expect("open");
            src.push(qemu);
        }
        // QEMU needs its main channel first: accept saw them in the order opened.
        let dst: Vec<_> = (0..N).map(|_| arrival(&p.arrivals)).collect();
        assert_eq!(
            dst.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );

        // Control messages both ways, as the daemon would use them meanwhile.
        p.client
            .send_control(&serde_json::json!({"op": "begin", "streams": N}))
            .expect("send");
        let got = p.server.recv_control(Duration::from_secs(5)).expect("recv");
        assert_eq!(got.expect("a message")["op"], "begin");
        p.server
            .send_control(&serde_json::json!({"op": "ready"}))
            .expect("send back");
        let got = p.client.recv_control(Duration::from_secs(5)).expect("recv");
        assert_eq!(got.expect("a message")["op"], "ready");

        let mut threads = Vec::new();
        for (i, (s, (k, mut d))) in src.into_iter().zip(dst).enumerate() {
            threads.push(std::thread::spawn(move || {
                let seed = 1000 + i as u64;
                let s2 = s.try_clone().expect("clone");
                let up = std::thread::spawn(move || send_noise(s2, seed, UP));
                let down = {
                    let d2 = d.try_clone().expect("clone");
                    std::thread::spawn(move || send_noise(d2, seed + 7, DOWN))
                };
                let (got_up, up_len) = recv_hash(&mut d);
                let mut s = s;
                let (got_down, down_len) = recv_hash(&mut s);
                assert_eq!((up_len, down_len), (UP, DOWN), "stream {k}");
                assert!(
                    got_up == up.join().expect("up"),
                    "stream {k} differs upstream"
                );
                assert!(
                    got_down == down.join().expect("down"),
                    "stream {k} differs downstream"
                );
            }));
        }
        for t in threads {
            t.join().expect("stream");
        }
        p.client
            .wait_streams(N as usize, Duration::from_secs(10))
            .expect("client streams");
        p.server
            .wait_streams(N as usize, Duration::from_secs(10))
            .expect("server streams");
        assert_eq!(p.client.streams_done(), (N as usize, None));
        let server = p.server;
        let s = std::thread::spawn(move || server.close(Duration::from_secs(5)));
        p.client
            .close(Duration::from_secs(5))
            .expect("client close");
        s.join().expect("join").expect("server close");
    }

    #[test]
    fn a_reader_that_stops_pushes_back_while_control_messages_still_flow() {
        let p = pair();
        let (mut qemu, ours) = UnixStream::pair().expect("pair");
        p.client.open(0, ours).expect("open");
        let (_, mut stalled) = arrival(&p.arrivals);
        // Nobody reads the destination's end: the writer must soon block, not fill memory.
        let before = rss_kib();
        qemu.set_write_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let chunk = vec![7u8; 1 << 20];
        let mut written = 0usize;
        while written < 1 << 30 {
            match qemu.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        let grown = rss_kib().saturating_sub(before);
        assert!(
            written < 64 << 20,
            "{} MiB went in with nobody reading: no back-pressure",
            written >> 20
        );
        assert!(grown < 512 * 1024, "memory grew by {} MiB", grown >> 10);

        // The data stream is stuck; the control stream is not, either way.
        for (from, to) in [(&p.client, &p.server), (&p.server, &p.client)] {
            let t0 = Instant::now();
            from.send_control(&serde_json::json!({"op": "still-there"}))
                .expect("send");
            let got = to
                .recv_control(Duration::from_secs(1))
                .expect("recv")
                .expect("a control message while the data stream is stalled");
            assert_eq!(got["op"], "still-there");
            assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        }

        // Nothing was lost: once the reader reads, every byte arrives.
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0usize;
            loop {
                match stalled.read(&mut buf).expect("read") {
                    0 => return n,
                    r => n += r,
                }
            }
        });
        qemu.set_write_timeout(None).expect("timeout");
        qemu.write_all(&chunk).expect("write after the stall");
        written += chunk.len();
        qemu.shutdown(Shutdown::Write).expect("half-close");
        assert_eq!(reader.join().expect("reader"), written);
        drop(qemu);
        p.server
            .wait_streams(1, Duration::from_secs(5))
            .expect("server");
        p.client
            .wait_streams(1, Duration::from_secs(5))
            .expect("client");
    }

    #[test]
    fn a_stream_the_destination_refuses_fails_at_the_source_with_the_cause() {
        let accept: Accept = Box::new(|k| Err(format!("no QEMU listens for stream {k}")));
        let (client, server, _) = crate::testing::tunnel_pair(
            accept,
            crate::testing::TunnelOpts {
                client_calls_server: "10.0.0.2:4700",
                server_calls_client: "source",
                ..Default::default()
            },
        );
        let (mut qemu, ours) = UnixStream::pair().expect("pair");
        let t0 = Instant::now();
        client.open(2, ours).expect("open");
        let e = client
            .wait_streams(1, Duration::from_secs(5))
            .expect_err("refused");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert_eq!(
            e,
            "tunnel to 10.0.0.2:4700: stream 2 refused by the destination: \
             no QEMU listens for stream 2"
        );
        let e = server
            .wait_streams(1, Duration::from_secs(5))
            .expect_err("refused");
        assert!(e.contains("no QEMU listens for stream 2"), "{e}");
        // The source's QEMU sees its connection end.
        qemu.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(qemu.read(&mut [0u8; 16]).expect("read"), 0);
        // The refusal cost one stream, not the tunnel: control still works.
        client
            .send_control(&serde_json::json!({"op": "abort"}))
            .expect("send");
        let got = server.recv_control(Duration::from_secs(2)).expect("recv");
        assert_eq!(got.expect("a message")["op"], "abort");
    }

    #[test]
    fn cutting_the_connection_mid_transfer_fails_both_ends_promptly() {
        let p = pair();
        let (mut qemu, ours) = UnixStream::pair().expect("pair");
        p.client.open(0, ours).expect("open");
        let (_, mut dst) = arrival(&p.arrivals);
        let writer = std::thread::spawn(move || {
            let chunk = vec![1u8; 1 << 20];
            while qemu.write_all(&chunk).is_ok() {}
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < 16 << 20 {
            got += dst.read(&mut buf).expect("read");
        }
        // As a crash or an attacker would: no close_notify.
        let t0 = Instant::now();
        p.server_tcp.shutdown(Shutdown::Both).expect("cut");
        let e1 = p
            .client
            .wait_streams(1, Duration::from_secs(10))
            .expect_err("client");
        let e2 = p
            .server
            .wait_streams(1, Duration::from_secs(10))
            .expect_err("server");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // Whichever is recorded first: the stream's failure, or the connection's.
        for e in [&e1, &e2] {
            assert!(e.contains("the connection broke: "), "{e}");
        }
        assert!(e1.contains("tunnel to destination: "), "{e1}");
        assert!(e2.contains("tunnel to source: "), "{e2}");
        // Both local sockets were cut: the writer stops, the reader sees the end.
        writer.join().expect("writer");
        while dst.read(&mut buf).expect("read") > 0 {}
        assert!(p.client.close(Duration::from_secs(2)).is_err());
    }

    #[test]
    fn stop_ends_a_stalled_tunnel_at_once_on_both_ends() {
        let p = pair();
        let (_qemu, ours) = UnixStream::pair().expect("pair");
        p.client.open(0, ours).expect("open");
        let (_, _dst) = arrival(&p.arrivals);
        let stop = p.client.stop_handle();
        let t0 = Instant::now();
        std::thread::spawn(move || stop.stop());
        let e = p
            .client
            .wait_streams(1, Duration::from_secs(5))
            .expect_err("stopped");
        assert!(e.contains("stopped on this host"), "{e}");
        let e = p
            .server
            .wait_streams(1, Duration::from_secs(5))
            .expect_err("cut");
        assert!(e.contains("the connection broke: "), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(p.client.recv_control(Duration::from_secs(2)).is_err());
        assert!(p
            .client
            .open(1, UnixStream::pair().expect("pair").0)
            .is_err());
    }

    #[test]
    fn an_oversized_control_message_is_refused_before_it_is_sent() {
        let p = pair();
        let big = serde_json::Value::String("x".repeat(MAX_CONTROL));
        let e = p.client.send_control(&big).expect_err("too large");
        assert!(matches!(e, TunnelError::ControlTooLarge { .. }), "{e}");
        assert!(p
            .server
            .open(0, UnixStream::pair().expect("pair").0)
            .is_err());
    }

    /// CPU seconds this process has used (user + system), at 100 ticks a second.
    fn cpu_secs() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Fields 14 and 15 of the line; 12 and 13 after the command name.
        (tick(11) + tick(12)) / 100.0
    }

    /// Moves `len` bytes from a writer thread to a reader; returns the seconds taken.
    fn timed_copy(src: Vec<UnixStream>, dst: Vec<UnixStream>, len: usize) -> f64 {
        let t0 = Instant::now();
        let mut threads = Vec::new();
        for mut s in src {
            threads.push(std::thread::spawn(move || {
                let chunk = vec![0x5au8; 1 << 20];
                let mut n = 0;
                while n < len {
                    s.write_all(&chunk).expect("write");
                    n += chunk.len();
                }
                s.shutdown(Shutdown::Write).expect("half-close");
            }));
        }
        for mut d in dst {
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0;
                loop {
                    match d.read(&mut buf).expect("read") {
                        0 => break,
                        r => n += r,
                    }
                }
                assert_eq!(n, len);
            }));
        }
        for t in threads {
            t.join().expect("copy");
        }
        t0.elapsed().as_secs_f64()
    }

    fn through_tunnel(streams: usize, len: usize) -> f64 {
        let p = pair();
        let mut src = Vec::new();
        let mut dst = Vec::new();
        for k in 0..streams {
            let (qemu, ours) = UnixStream::pair().expect("pair");
            p.client.open(k as u16, ours).expect("open");
            src.push(qemu);
            dst.push(arrival(&p.arrivals).1);
        }
        let t = timed_copy(src, dst, len);
        p.client
            .wait_streams(streams, Duration::from_secs(10))
            .expect("client");
        p.server
            .wait_streams(streams, Duration::from_secs(10))
            .expect("server");
        p.client.stop();
        t
    }

    /// The direct transport: one TLS connection per stream, each through `pump`.
    fn through_pumps(streams: usize, len: usize) -> f64 {
        let mut src = Vec::new();
        let mut dst = Vec::new();
        let mut pumps = Vec::new();
        for _ in 0..streams {
            let (cc, ct, sc, st) = tls_pair();
            let (qa, la) = UnixStream::pair().expect("pair");
            let (qb, lb) = UnixStream::pair().expect("pair");
            let sa = StopHandle::new(&la, &ct).expect("stop");
            let sb = StopHandle::new(&lb, &st).expect("stop");
            pumps.push(std::thread::spawn(move || {
                pump::pump(la, cc, ct, "b", &Meter::default(), &sa)
            }));
            pumps.push(std::thread::spawn(move || {
                pump::pump(lb, sc, st, "a", &Meter::default(), &sb)
            }));
            src.push(qa);
            // The return direction ends at once, as QEMU's destination sends nothing.
            qb.shutdown(Shutdown::Write).expect("half-close");
            dst.push(qb);
        }
        let t = timed_copy(src, dst, len);
        for p in pumps {
            let _ = p.join();
        }
        t
    }

    /// The daemon's allocator (the vmferry binary's), so these figures match its.
    #[global_allocator]
    static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

    /// `cargo test --release -p vmferry-channel --lib tunnel::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput_against_the_direct_transport() {
        const GIB: usize = 1 << 30;
        let median = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let runs: usize = std::env::var("RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        for streams in [1usize, 4] {
            let len = GIB / streams;
            let (mut tunnel, mut direct) = (Vec::new(), Vec::new());
            let (mut tunnel_cpu, mut direct_cpu) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let c = cpu_secs();
                tunnel.push(through_tunnel(streams, len));
                tunnel_cpu.push(cpu_secs() - c);
                let c = cpu_secs();
                direct.push(through_pumps(streams, len));
                direct_cpu.push(cpu_secs() - c);
            }
            let (t, d) = (median(tunnel.clone()), median(direct.clone()));
            println!(
                "1 GiB in {streams} stream(s): tunnel {t:.3} s ({:.2} GiB/s), direct {d:.3} s \
                 ({:.2} GiB/s): tunnel/direct throughput {:.2}x; CPU s per GiB: tunnel {:.2}, \
                 direct {:.2} (runs: tunnel {tunnel:.3?}, direct {direct:.3?})",
                1.0 / t,
                1.0 / d,
                d / t,
                median(tunnel_cpu),
                median(direct_cpu),
            );
        }
    }
}
