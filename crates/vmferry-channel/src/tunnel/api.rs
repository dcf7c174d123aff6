//! The tunnel's public face: [`Tunnel`] (start either end, open streams, send and
//! receive control messages, wait for streams, close), [`TunnelStop`], [`TunnelError`]
//! and the server's [`Accept`] callback.
//!
//! Every method here is blocking and callable from any std thread; it only talks to the
//! mux through [`Shared`] (commands, mailboxes, state). It must never touch yamux or the
//! TLS connection itself, and never wait without a deadline.

use super::carry::COPY_BUF;
use super::config::{FRAME, MAX_STREAM_WINDOW};
use super::mailbox::{Mailbox, PushError};
use super::mux::mux;
use super::shared::{AcceptRequest, Command, Ends, Phase, Role, Shared, State, TlsEnd};
use super::{MAILBOX, MAX_CONTROL, REQUEST_TIMEOUT};
use crate::compress::Filters;
use crate::meter::Meter;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use vmferry_proto::tunnel_frame::{Frame, VERSION};

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
    /// The first stream failure, a whole sentence naming the peer.
    #[error("{0}")]
    StreamFailed(String),
    #[error("tunnel to {peer}: {cause} ({done} of {n} streams had ended)")]
    BrokenAfter {
        peer: String,
        cause: String,
        done: usize,
        n: usize,
    },
    #[error("tunnel to {peer}: the tunnel ended after {done} of {n} streams")]
    EndedAfter { peer: String, done: usize, n: usize },
    #[error("tunnel to {peer}: only {done} of {n} streams ended within {timeout:?}")]
    StreamsTimeout {
        peer: String,
        done: usize,
        n: usize,
        timeout: Duration,
    },
    #[error("tunnel to {peer}: did not close cleanly within {timeout:?}; cut")]
    CloseTimeout { peer: String, timeout: Duration },
}

/// Why the server's [`Accept`] refused a stream: any error, its text (not its sources)
/// is the cause the source is told.
pub type AcceptError = Box<dyn std::error::Error + Send + Sync>;

/// The server's choice of where each stream the client opens goes.
pub type Accept = Box<dyn FnMut(u16) -> Result<UnixStream, AcceptError> + Send>;

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

impl Tunnel {
    /// The most bytes of one stream the tunnel holds, both ends together, when the
    /// stream's reader stops: its largest receive window (everything in flight, on the
    /// wire or in TLS and yamux buffers, counts against it), a copy buffer and its
    /// filtered output at each end, and one frame taken out of the window but not yet
    /// written to the local socket. Beyond that the local writer blocks.
    pub const STREAM_BUFFER_LIMIT: usize = MAX_STREAM_WINDOW + 2 * (2 * COPY_BUF) + FRAME;

    /// Client (source): starts the mux over an established TLS connection.
    pub fn client(
        conn: crate::pump::Session,
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
        conn: crate::pump::Session,
        tcp: TcpStream,
        peer: &str,
        meter: Arc<Meter>,
        filters: Filters,
        accept: Accept,
    ) -> Result<Tunnel, TunnelError> {
        Self::start(conn, tcp, peer, meter, filters, Some(accept))
    }

    fn start(
        conn: crate::pump::Session,
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
    pub fn wait_for_streams(&self, n: usize, timeout: Duration) -> Result<(), TunnelError> {
        let peer = || self.shared.peer.clone();
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(f) = &st.failed {
                return Err(TunnelError::StreamFailed(f.clone()));
            }
            if st.done >= n {
                return Ok(());
            }
            if let Some(b) = &st.broken {
                return Err(TunnelError::BrokenAfter {
                    peer: peer(),
                    cause: b.clone(),
                    done: st.done,
                    n,
                });
            }
            if st.mux_ended {
                return Err(TunnelError::EndedAfter {
                    peer: peer(),
                    done: st.done,
                    n,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TunnelError::StreamsTimeout {
                    peer: peer(),
                    done: st.done,
                    n,
                    timeout,
                });
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
    pub fn close(mut self, timeout: Duration) -> Result<(), TunnelError> {
        self.closed = true;
        let peer = self.shared.peer.clone();
        let deadline = Instant::now() + timeout;
        // Fails only if the mux has ended already, which is what we wait for below.
        let _ = self.shared.commands.try_send(Command::Close);
        let mut st = self.shared.lock();
        while !(st.mux_ended && st.tls_end.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                self.shared
                    .cut(format!("it did not close within {timeout:?}"));
                return Err(TunnelError::CloseTimeout { peer, timeout });
            }
            st = match self.shared.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        if let Some(b) = &st.broken {
            return Err(TunnelError::Ended {
                peer,
                cause: b.clone(),
            });
        }
        match &st.tls_end {
            Some(TlsEnd::Failed(cause)) => Err(TunnelError::Ended {
                peer,
                cause: cause.clone(),
            }),
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
