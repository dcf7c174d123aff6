//! A migration's lease: how long a half lives without hearing from its controller.
//!
//! The controller renews it with every `status` it sends with `renew`. When it runs out
//! (the controller died, or its network did), the half acts on its own by its state
//! ([`vmferry_proto::LeaseAction`]). A detached migration has no lease: the daemons carry
//! it to its end. A migration whose controller asked for no lease (protocol version 1)
//! never expires this way.
//!
//! This module only keeps time; it never acts on QEMU.

use crate::vms::lock;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Lease {
    /// The lease's length; `None` for none at all.
    length: Option<Duration>,
    state: Mutex<LeaseState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    /// No lease (a version-1 controller): only the controller ends the migration.
    Unlimited,
    /// Runs until this instant unless renewed.
    Until(Instant),
    /// Handed to the daemons (`detach`): never expires.
    Detached,
    /// Expired, and noticed once ([`Lease::take_expired`]).
    Expired,
}

impl Lease {
    /// A lease of `ms` milliseconds from now; 0 = none.
    pub fn new(ms: u64) -> Lease {
        let length = (ms > 0).then(|| Duration::from_millis(ms));
        // A length too large for the clock is as good as none.
        let state = match length.and_then(|l| Instant::now().checked_add(l)) {
            Some(t) => LeaseState::Until(t),
            None => LeaseState::Unlimited,
        };
        Lease {
            length,
            state: Mutex::new(state),
        }
    }

    pub fn renew(&self) {
        let Some(l) = self.length else { return };
        let mut s = lock(&self.state);
        if let LeaseState::Until(_) = *s {
            if let Some(t) = Instant::now().checked_add(l) {
                *s = LeaseState::Until(t);
            }
        }
    }

    pub fn detach(&self) {
        *lock(&self.state) = LeaseState::Detached;
    }

    /// Whether the daemons carry this migration on their own (detached, or its lease
    /// ran out after the switch-over).
    pub fn unattended(&self) -> bool {
        matches!(
            *lock(&self.state),
            LeaseState::Detached | LeaseState::Expired
        )
    }

    pub fn detached(&self) -> bool {
        *lock(&self.state) == LeaseState::Detached
    }

    /// True exactly once: the first time it is asked after the lease ran out.
    pub fn take_expired(&self) -> bool {
        let mut s = lock(&self.state);
        match *s {
            LeaseState::Until(t) if Instant::now() >= t => {
                *s = LeaseState::Expired;
                true
            }
            _ => false,
        }
    }

    /// The lease's length in seconds, for messages.
    pub fn secs(&self) -> f64 {
        self.length.map(|l| l.as_secs_f64()).unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_once_unless_renewed() {
        let l = Lease::new(50);
        assert!(!l.take_expired());
        std::thread::sleep(Duration::from_millis(30));
        l.renew();
        std::thread::sleep(Duration::from_millis(30));
        assert!(!l.take_expired(), "renewed 30 ms ago");
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.take_expired());
        assert!(!l.take_expired(), "noticed once");
        assert!(l.unattended());
    }

    #[test]
    fn no_lease_and_a_detached_lease_never_expire() {
        let none = Lease::new(0);
        let detached = Lease::new(10);
        detached.detach();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!none.take_expired());
        assert!(!detached.take_expired());
        assert!(detached.unattended());
        assert!(!none.unattended());
    }

    #[test]
    fn a_lease_too_long_for_the_clock_never_expires_and_never_panics() {
        let l = Lease::new(u64::MAX);
        l.renew();
        assert!(!l.take_expired());
        assert!(!l.unattended());
    }
}
