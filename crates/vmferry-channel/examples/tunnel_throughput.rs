//! Throughput of the tunnel against the direct transport (one TLS connection per
//! stream, each through the pump), 1 GiB in 1 and in 4 streams, median of `RUNS` (3):
//!
//! ```sh
//! cargo run --release -p vmferry-channel --example tunnel_throughput
//! RUNS=5 cargo run --release -p vmferry-channel --example tunnel_throughput
//! ONLY=tunnel STREAMS=1 perf record -g target/release/examples/tunnel_throughput
//! ```
//! Prints tunnel/direct ratios and CPU seconds per GiB. A benchmark, not a test: its
//! figures depend on the machine and on whatever else runs on it.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use vmferry_channel::meter::Meter;
use vmferry_channel::pump::{self, StopHandle};
use vmferry_channel::testing::{self, tls_pair};
use vmferry_channel::tunnel::{Accept, Tunnel};

/// The daemon's allocator (the vmferry binary's), so these figures match its.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A client and a server tunnel; the far end of each stream the server accepts arrives
/// on the receiver.
fn pair() -> (Tunnel, Tunnel, Receiver<(u16, UnixStream)>) {
    let (tx, arrivals) = std::sync::mpsc::channel();
    let accept: Accept = Box::new(move |k| {
        let (ours, theirs) = UnixStream::pair()?;
        tx.send((k, theirs))?;
        Ok(ours)
    });
    let (client, server, _) = testing::tunnel_pair(accept, testing::TunnelOpts::default());
    (client, server, arrivals)
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
    let (client, server, arrivals) = pair();
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for k in 0..streams {
        let (qemu, ours) = UnixStream::pair().expect("pair");
        client.open(k as u16, ours).expect("open");
        src.push(qemu);
        let (_, d) = arrivals
            .recv_timeout(Duration::from_secs(5))
            .expect("a stream arrived");
        dst.push(d);
    }
    let t = timed_copy(src, dst, len);
    client
        .wait_for_streams(streams, Duration::from_secs(10))
        .expect("client");
    server
        .wait_for_streams(streams, Duration::from_secs(10))
        .expect("server");
    client.stop();
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

fn main() {
    const GIB: usize = 1 << 30;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // ONLY=tunnel or ONLY=direct: that transport alone (to profile it).
    let only = std::env::var("ONLY").ok();
    let only = only.as_deref();
    let counts: &[usize] = match std::env::var("STREAMS").ok().as_deref() {
        Some("1") => &[1],
        Some("4") => &[4],
        _ => &[1, 4],
    };
    for &streams in counts {
        let len = GIB / streams;
        let (mut tunnel, mut direct) = (Vec::new(), Vec::new());
        let (mut tunnel_cpu, mut direct_cpu) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            if only != Some("direct") {
                let c = cpu_secs();
                tunnel.push(through_tunnel(streams, len));
                tunnel_cpu.push(cpu_secs() - c);
            }
            if only != Some("tunnel") {
                let c = cpu_secs();
                direct.push(through_pumps(streams, len));
                direct_cpu.push(cpu_secs() - c);
            }
        }
        if only.is_some() {
            let (name, t, cpu) = match only {
                Some("tunnel") => ("tunnel", tunnel, tunnel_cpu),
                _ => ("direct", direct, direct_cpu),
            };
            println!(
                "1 GiB in {streams} stream(s): {name} {:.3} s, CPU {:.2} s/GiB (runs {t:.3?})",
                median(t.clone()),
                median(cpu)
            );
            continue;
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
