//! A bounded queue between blocking callers (the daemon's threads) and the mux's async
//! tasks: the control messages a caller sends (outbox) and receives (inbox).
//!
//! Hand-written because no queue in the tree does all of it: a blocking push and pop
//! with a deadline for std threads, async push and pop for the tasks, and notes of the
//! tunnel's own that skip the limit (tokio's `mpsc` has blocking calls without deadlines,
//! and no way past its bound). It must never block the mux's thread (async callers only
//! await) and never grow without bound: only [`Mailbox::push_note`] skips the limit, and
//! the tunnel sends at most two notes per stream.

use super::shared::lock;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

pub(super) struct Mailbox<T> {
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

pub(super) enum PushError {
    Full,
    Closed,
}

impl<T> Mailbox<T> {
    pub(super) fn new(cap: usize) -> Self {
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
    pub(super) fn push_wait(&self, item: T, deadline: Instant) -> Result<(), PushError> {
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
    pub(super) fn push_note(&self, item: T) {
        let mut g = lock(&self.inner);
        if !g.closed {
            g.items.push_back(item);
        }
        drop(g);
        self.changed();
    }

    /// Async push: waits for room. Err once closed.
    pub(super) async fn push(&self, item: T) -> Result<(), ()> {
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
    pub(super) fn pop_wait(&self, deadline: Instant) -> Result<Option<T>, ()> {
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
    pub(super) async fn pop(&self) -> Option<T> {
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

    pub(super) fn close(&self) {
        lock(&self.inner).closed = true;
        self.changed();
    }
}
