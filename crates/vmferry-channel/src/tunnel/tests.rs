//! End-to-end over real TLS on loopback, with access to the tunnel's limits.
//! (`tests/tunnel.rs` drives it through the public API only; the throughput
//! comparison is `examples/tunnel_throughput.rs`.)

use super::*;
use crate::compress::Filters;
use crate::meter::Meter;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        let (ours, theirs) = UnixStream::pair()?;
        tx.send((k, theirs))?;
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
        .wait_for_streams(2, Duration::from_secs(10))
        .expect("client");
    p.server
        .wait_for_streams(2, Duration::from_secs(10))
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

/// Sends noise both ways over stream `k` (source end `s`, destination end `d`), each
/// direction `(seed, length)`, and checks that both arrive whole and byte-exact.
fn cross_both_ways(
    k: u16,
    s: UnixStream,
    d: &mut UnixStream,
    up: (u64, usize),
    down: (u64, usize),
) {
    let s2 = s.try_clone().expect("clone");
    let sent_up = std::thread::spawn(move || send_noise(s2, up.0, up.1));
    let d2 = d.try_clone().expect("clone");
    let sent_down = std::thread::spawn(move || send_noise(d2, down.0, down.1));
    let (got_up, up_len) = recv_hash(d);
    let mut s = s;
    let (got_down, down_len) = recv_hash(&mut s);
    assert_eq!((up_len, down_len), (up.1, down.1), "stream {k}");
    assert!(
        got_up == sent_up.join().expect("up"),
        "stream {k} differs upstream"
    );
    assert!(
        got_down == sent_down.join().expect("down"),
        "stream {k} differs downstream"
    );
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
            cross_both_ways(k, s, &mut d, (seed, UP), (seed + 7, DOWN));
        }));
    }
    for t in threads {
        t.join().expect("stream");
    }
    p.client
        .wait_for_streams(N as usize, Duration::from_secs(10))
        .expect("client streams");
    p.server
        .wait_for_streams(N as usize, Duration::from_secs(10))
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
    qemu.set_write_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0usize;
    let blocked = loop {
        match qemu.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => break e,
        }
        assert!(written < 1 << 30, "1 GiB went in with nobody reading");
    };
    assert!(
        matches!(blocked.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "the writer did not block but failed: {blocked}"
    );
    assert!(
        written < 64 << 20,
        "{} MiB went in with nobody reading: no back-pressure",
        written >> 20
    );
    // What went in is held by the sockets and the tunnel, and the tunnel holds at most
    // its stated bound per stream (however fast the stream ran before).
    assert!(
        written <= Tunnel::STREAM_BUFFER_LIMIT + local_buffers(&qemu),
        "{written} bytes went in; the tunnel promises to hold at most {} per stream",
        Tunnel::STREAM_BUFFER_LIMIT
    );

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
        .wait_for_streams(1, Duration::from_secs(5))
        .expect("server");
    p.client
        .wait_for_streams(1, Duration::from_secs(5))
        .expect("client");
}

#[test]
fn a_stream_the_destination_refuses_fails_at_the_source_with_the_cause() {
    let accept: Accept = Box::new(|k| Err(format!("no QEMU listens for stream {k}").into()));
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
        .wait_for_streams(1, Duration::from_secs(5))
        .expect_err("refused")
        .to_string();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(
        e,
        "tunnel to 10.0.0.2:4700: stream 2 refused by the destination: \
         no QEMU listens for stream 2"
    );
    let e = server
        .wait_for_streams(1, Duration::from_secs(5))
        .expect_err("refused")
        .to_string();
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
        .wait_for_streams(1, Duration::from_secs(10))
        .expect_err("client")
        .to_string();
    let e2 = p
        .server
        .wait_for_streams(1, Duration::from_secs(10))
        .expect_err("server")
        .to_string();
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
        .wait_for_streams(1, Duration::from_secs(5))
        .expect_err("stopped")
        .to_string();
    assert!(e.contains("stopped on this host"), "{e}");
    let e = p
        .server
        .wait_for_streams(1, Duration::from_secs(5))
        .expect_err("cut")
        .to_string();
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

/// What the kernel may hold in a socket pair like `s` (both ends' buffers, both sides of
/// the tunnel): the part of a stalled stream the tunnel does not hold itself.
fn local_buffers(s: &UnixStream) -> usize {
    use nix::sys::socket::{getsockopt, sockopt};
    let snd = getsockopt(s, sockopt::SndBuf).unwrap_or(0);
    let rcv = getsockopt(s, sockopt::RcvBuf).unwrap_or(0);
    // Two socket pairs (source and destination side), each a sender and a receiver.
    2 * 2 * (snd + rcv)
}

#[test]
fn streams_cross_the_tunnel_byte_exact_while_both_sides_renew_keys_every_few_records() {
    const UP: usize = 8 << 20;
    const DOWN: usize = 2 << 20;
    let (mut cs, ct, mut ss, st) = crate::testing::tls_pair();
    cs.renew_every(3);
    ss.renew_every(2);
    let (ck, sk) = (cs.key_updates(), ss.key_updates());
    let (tx, arrivals) = std::sync::mpsc::channel();
    let accept: Accept = Box::new(move |k| {
        let (ours, theirs) = UnixStream::pair()?;
        tx.send((k, theirs))?;
        Ok(ours)
    });
    let meters = || Arc::new(Meter::default());
    let server =
        Tunnel::server(ss, st, "source", meters(), Filters::default(), accept).expect("server");
    let client =
        Tunnel::client(cs, ct, "destination", meters(), Filters::default()).expect("client");
    let (qemu, ours) = UnixStream::pair().expect("pair");
    client.open(0, ours).expect("open");
    let (_, mut d) = arrival(&arrivals);
    let d2 = d.try_clone().expect("clone");
    let down = std::thread::spawn(move || send_noise(d2, 5, DOWN));
    let q2 = qemu.try_clone().expect("clone");
    let up = std::thread::spawn(move || send_noise(q2, 6, UP));
    let (got_up, n_up) = recv_hash(&mut d);
    let mut q = qemu;
    let (got_down, n_down) = recv_hash(&mut q);
    assert_eq!((n_up, n_down), (UP, DOWN));
    assert!(got_up == up.join().expect("up"), "upstream differs");
    assert!(got_down == down.join().expect("down"), "downstream differs");
    client
        .wait_for_streams(1, Duration::from_secs(10))
        .expect("client");
    server
        .wait_for_streams(1, Duration::from_secs(10))
        .expect("server");
    let (c, s) = (ck.counts(), sk.counts());
    assert!(
        c.0 >= 512 / (3 + 16) && s.0 >= 128 / (2 + 64),
        "{c:?} {s:?}"
    );
    // Updates sent last may precede yamux frames still in flight: followed <= sent.
    assert!(
        s.1 <= c.0 && c.1 <= s.0 && s.1 > 0 && c.1 > 0,
        "{c:?} {s:?}"
    );
    client.stop();
}

#[test]
fn streams_with_any_index_get_lanes_and_cross_byte_exact_both_ways() {
    // libvirt's relay numbers its streams by kind (0x1000 apart): lanes are given in
    // turn, whatever the index.
    const KS: [u16; 3] = [0x2000, 0x1003, 7];
    let p = pair();
    let mut src = Vec::new();
    for k in KS {
        let (qemu, ours) = UnixStream::pair().expect("pair");
        p.client.open(k, ours).expect("open");
        src.push(qemu);
    }
    for (i, s) in src.into_iter().enumerate() {
        let (k, mut d) = arrival(&p.arrivals);
        assert_eq!(k, KS[i]);
        cross_both_ways(
            k,
            s,
            &mut d,
            (11 + i as u64, 3 << 20),
            (99 + i as u64, 5000),
        );
    }
    p.client
        .wait_for_streams(KS.len(), Duration::from_secs(10))
        .expect("client streams");
    p.server
        .wait_for_streams(KS.len(), Duration::from_secs(10))
        .expect("server streams");
}
