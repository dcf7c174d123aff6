//! Byte counters shared by all streams of one migration (the metering filter).
//! Counting must never block or allocate on the data path.

use std::sync::atomic::{AtomicU64, Ordering};

/// Plaintext bytes carried "forward" (local unix side → TLS peer) and "backward", and
/// the same after the compression filter ("wire": what TLS encrypts).
#[derive(Debug, Default)]
pub struct Meter {
    forward: AtomicU64,
    backward: AtomicU64,
    wire_forward: AtomicU64,
    wire_backward: AtomicU64,
}

impl Meter {
    pub fn add_forward(&self, n: u64) {
        self.forward.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_backward(&self, n: u64) {
        self.backward.fetch_add(n, Ordering::Relaxed);
    }
    pub fn forward(&self) -> u64 {
        self.forward.load(Ordering::Relaxed)
    }
    pub fn backward(&self) -> u64 {
        self.backward.load(Ordering::Relaxed)
    }
    pub fn add_wire_forward(&self, n: u64) {
        self.wire_forward.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_wire_backward(&self, n: u64) {
        self.wire_backward.fetch_add(n, Ordering::Relaxed);
    }
    pub fn wire_forward(&self) -> u64 {
        self.wire_forward.load(Ordering::Relaxed)
    }
    pub fn wire_backward(&self) -> u64 {
        self.wire_backward.load(Ordering::Relaxed)
    }
}
