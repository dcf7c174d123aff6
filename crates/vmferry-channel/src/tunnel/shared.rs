//! What the caller's threads, the mux's thread and its tasks share about one tunnel:
//! its state (streams done, failures, the connection's end), the peer's word on how
//! each stream ended, the mux's phase, and the few helpers that change them.
//!
//! Everything here is reached from several threads: it must never hold a lock across an
//! `.await` or a blocking wait other than its own `Condvar`, and never decide anything
//! about the wire (that is the mux's, the carriers' and the control stream's).

use super::api::{AcceptError, TunnelError};
use super::mailbox::Mailbox;
use crate::compress::Filters;
use crate::meter::Meter;
use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use vmferry_proto::tunnel_frame::Frame;

/// Which end of the tunnel this is. The names are TLS's; the roles are the migration's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The source: opens streams.
    Client,
    /// The destination: accepts them.
    Server,
}

impl Role {
    /// The other end, as errors name it.
    pub(super) fn peer_word(self) -> &'static str {
        match self {
            Role::Client => "the destination",
            Role::Server => "the source",
        }
    }
}

pub(super) struct Shared {
    /// The TLS peer, as errors name it (e.g. "10.0.0.2:4700").
    pub(super) peer: String,
    pub(super) role: Role,
    /// What every data stream applies between its local socket and the mux.
    pub(super) filters: Filters,
    pub(super) meter: Arc<Meter>,
    /// What the callers wait on; `changed` is signalled on every change.
    pub(super) state: Mutex<State>,
    pub(super) changed: Condvar,
    /// Control frames to send, and control messages received.
    pub(super) outbox: Mailbox<Frame>,
    pub(super) inbox: Mailbox<serde_json::Value>,
    /// The peer's word on how each of our incoming stream directions ended.
    pub(super) ends: Mutex<Ends>,
    pub(super) ends_changed: Notify,
    /// Where the mux is in its life; tasks watch it to stop.
    pub(super) phase: watch::Sender<Phase>,
    /// Stream and control tasks still running, so the mux ends only after them.
    pub(super) tasks: AtomicUsize,
    pub(super) tasks_changed: Notify,
    /// Requests to the mux.
    pub(super) commands: mpsc::Sender<Command>,
    /// The TCP connection, to cut it (the mux then sees it end).
    pub(super) tcp_stop: TcpStream,
    /// `cut` was called: the connection's end is ours, not a failure.
    pub(super) stopped: AtomicBool,
}

#[derive(Debug, Default)]
pub(super) struct State {
    /// Data streams that ended cleanly in both directions.
    pub(super) done: usize,
    /// The first stream failure, as a whole sentence naming the peer.
    pub(super) failed: Option<String>,
    /// Why the connection broke (or was stopped), if it did.
    pub(super) broken: Option<String>,
    /// The TLS connection's end, once it came.
    pub(super) tls_end: Option<TlsEnd>,
    /// The mux thread has finished.
    pub(super) mux_ended: bool,
}

/// How the TLS connection under the tunnel ended.
#[derive(Debug)]
pub(super) enum TlsEnd {
    /// Cleanly: close_notify both ways.
    Clean,
    /// Otherwise, and why.
    Failed(String),
}

#[derive(Debug, Default)]
pub(super) struct Ends {
    pub(super) notes: HashMap<u16, PeerEnd>,
    /// No more notes will come: the control stream ended.
    pub(super) control_ended: bool,
}

#[derive(Debug)]
pub(super) enum PeerEnd {
    Sent(u64),
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    /// We closed the mux: anything still open is cut short.
    ClosedHere,
    /// The peer closed the mux: streams drain what they were sent, then end.
    ClosedThere,
    /// The connection broke or was stopped: everything ends at once.
    Broken,
}

pub(super) enum Command {
    Open {
        k: u16,
        local: UnixStream,
        reply: std::sync::mpsc::SyncSender<Result<(), TunnelError>>,
    },
    /// The control writer sent everything and closed its side (part of closing).
    ControlFlushed,
    Close,
}

pub(super) type AcceptRequest = (u16, oneshot::Sender<Result<UnixStream, AcceptError>>);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn stream_done(&self) {
        self.lock().done += 1;
        self.changed.notify_all();
    }

    /// Records a stream failure; `what` follows "tunnel to PEER: ".
    pub(super) fn stream_failed(&self, what: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(format!("tunnel to {}: {what}", self.peer));
        }
        drop(st);
        self.changed.notify_all();
    }

    pub(super) fn record_broken(&self, cause: String) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(cause);
        }
        drop(st);
        self.changed.notify_all();
    }

    pub(super) fn broken_cause(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    /// Cuts everything: the cause is recorded first, so whatever sees the cut names it.
    pub(super) fn cut(&self, cause: String) {
        self.record_broken(cause);
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.tcp_stop.shutdown(Shutdown::Both);
        self.phase.send_if_modified(|p| {
            let was = *p;
            *p = Phase::Broken;
            was != Phase::Broken
        });
    }

    pub(super) fn note_end(&self, k: u16, end: PeerEnd) {
        lock(&self.ends).notes.insert(k, end);
        self.ends_changed.notify_waiters();
    }

    pub(super) fn control_ended(&self) {
        lock(&self.ends).control_ended = true;
        self.ends_changed.notify_waiters();
    }

    /// Waits for the peer's word on how stream `k`'s incoming direction ended.
    pub(super) async fn peer_end(&self, k: u16) -> Option<PeerEnd> {
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

    pub(super) fn task_started(self: &Arc<Self>) -> TaskGuard {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        TaskGuard(self.clone())
    }

    pub(super) async fn tasks_finished(&self) {
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
pub(super) struct TaskGuard(Arc<Shared>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.tasks.fetch_sub(1, Ordering::SeqCst);
        self.0.tasks_changed.notify_waiters();
    }
}

/// A cause, cut short so that its note fits a control frame.
pub(super) fn short(cause: &str) -> String {
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

impl Shared {
    /// How a failure of the TLS connection reads (a cut makes it fail too).
    pub(super) fn tls_cause(&self, e: &dyn std::fmt::Display) -> String {
        if self.stopped.load(Ordering::SeqCst) {
            "it was stopped on this host".to_string()
        } else {
            format!("the connection broke: {e}")
        }
    }
}
