//! How long a new thread's first random bytes take: aws-lc seeds a per-thread generator on
//! first use, and with its CPU jitter entropy source that costs milliseconds per thread —
//! paid by every pump thread and handshake of a migration.
//!
//! `cargo run --release -p vmferry-channel --example thread_entropy` (`THREADS=50`).

use std::time::{Duration, Instant};

fn main() {
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut times: Vec<Duration> = (0..threads)
        .map(|_| {
            std::thread::spawn(|| {
                let mut buf = [0u8; 32];
                let t = Instant::now();
                aws_lc_rs::rand::fill(&mut buf).expect("random bytes");
                t.elapsed()
            })
            .join()
            .expect("thread")
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "first random bytes in a new thread ({threads} threads): median {:.3} ms, min {:.3} ms, max {:.3} ms",
        ms(times[threads / 2]),
        ms(times[0]),
        ms(times[threads - 1])
    );
}
