//! The tunnel over real TLS on loopback: several streams byte-exact in both directions,
//! back-pressure from a slow reader without starving the control stream, a refused
//! stream, and a cut connection, each ending promptly with a cause.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::tunnel::{Accept, Tunnel};

use vmferry_channel::testing::{self, noise as pattern};

/// Streams that reached the server side, with their index.
type Arrived = Arc<Mutex<Vec<(u16, UnixStream)>>>;

/// A client and a server tunnel over a fresh TLS pair; `accept` decides the streams.
fn tunnel_pair(accept: Accept) -> (Tunnel, Tunnel) {
    let (client, server, _) = testing::tunnel_pair(accept, testing::TunnelOpts::default());
    (client, server)
}

/// A client and a server tunnel; each stream the client opens reaches the server's
/// side of a socket pair, whose other end is pushed to `arrived`.
fn tunnels() -> (Tunnel, Tunnel, Arrived) {
    let arrived = Arc::new(Mutex::new(Vec::new()));
    let a2 = arrived.clone();
    let accept: Accept = Box::new(move |k| {
        let (ours, theirs) = UnixStream::pair()?;
        a2.lock().expect("lock").push((k, theirs));
        Ok(ours)
    });
    let (client, server) = tunnel_pair(accept);
    (client, server, arrived)
}

fn wait_arrived(arrived: &Mutex<Vec<(u16, UnixStream)>>, n: usize) -> Vec<(u16, UnixStream)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let mut a = arrived.lock().expect("lock");
            if a.len() >= n {
                return std::mem::take(&mut *a);
            }
        }
        assert!(Instant::now() < deadline, "streams did not arrive");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn four_streams_cross_byte_exact_both_ways_in_order_with_control_messages() {
    let (client, server, arrived) = tunnels();
    const N: usize = 4;
    const LEN: usize = 8 << 20;
    let mut src_ends = Vec::new();
    for k in 0..N as u16 {
        let (qemu, ours) = UnixStream::pair().expect("pair");
        client.open(k, ours).expect("open");
        src_ends.push(qemu);
    }
    let dst_ends = wait_arrived(&arrived, N);
    // The server saw them in the order they were opened: main channel first.
    assert_eq!(
        dst_ends.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    client
        .send_control(&serde_json::json!({"op": "hello", "n": 1}))
        .expect("send");
    let got = server
        .recv_control(Duration::from_secs(5))
        .expect("recv")
        .expect("a control message");
    assert_eq!(got["op"], "hello");
    server
        .send_control(&serde_json::json!({"op": "ack"}))
        .expect("send back");
    assert_eq!(
        client
            .recv_control(Duration::from_secs(5))
            .expect("recv")
            .expect("msg")["op"],
        "ack"
    );

    let mut threads = Vec::new();
    for (i, (mut s, (_, mut d))) in src_ends.into_iter().zip(dst_ends).enumerate() {
        threads.push(std::thread::spawn(move || {
            let up = pattern(i as u64 + 1, LEN);
            let back = pattern(i as u64 + 100, 4096);
            let mut s2 = s.try_clone().expect("clone");
            let writer = std::thread::spawn(move || {
                s2.write_all(&up).expect("write");
                s2.shutdown(std::net::Shutdown::Write).expect("shutdown");
                up
            });
            let mut got = Vec::new();
            d.write_all(&back).expect("write back");
            d.shutdown(std::net::Shutdown::Write)
                .expect("shutdown back");
            d.read_to_end(&mut got).expect("read");
            let mut got_back = Vec::new();
            s.read_to_end(&mut got_back).expect("read back");
            let up = writer.join().expect("join");
            assert!(got == up, "stream {i} differs upstream");
            assert!(got_back == back, "stream {i} differs downstream");
        }));
    }
    for t in threads {
        t.join().expect("stream thread");
    }
    client
        .wait_for_streams(N, Duration::from_secs(30))
        .expect("client streams");
    server
        .wait_for_streams(N, Duration::from_secs(30))
        .expect("server streams");
    let s = std::thread::spawn(move || server.close(Duration::from_secs(10)));
    client.close(Duration::from_secs(10)).expect("client close");
    s.join().expect("join").expect("server close");
}

#[test]
fn a_reader_that_stops_pushes_back_and_control_messages_still_flow() {
    let (client, server, arrived) = tunnels();
    let (mut qemu, ours) = UnixStream::pair().expect("pair");
    client.open(0, ours).expect("open");
    let (_, _stalled) = wait_arrived(&arrived, 1).pop().expect("one");
    // Write until the whole path is full: the writer must block, not buffer forever.
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
        matches!(
            blocked.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the writer did not block but failed: {blocked}"
    );
    assert!(
        written < 256 << 20,
        "{} MiB went in with nobody reading: no back-pressure",
        written >> 20
    );
    // The tunnel holds at most its stated bound; the rest sits in the two socket pairs'
    // kernel buffers (a few MiB at most).
    assert!(
        written <= Tunnel::STREAM_BUFFER_LIMIT + (8 << 20),
        "{written} bytes went in; the tunnel promises at most {} per stream",
        Tunnel::STREAM_BUFFER_LIMIT
    );
    // The data stream is stuck; the control stream is not.
    let t0 = Instant::now();
    client
        .send_control(&serde_json::json!({"op": "still-there"}))
        .expect("send");
    let got = server
        .recv_control(Duration::from_secs(2))
        .expect("recv")
        .expect("a control message while the data stream is stalled");
    assert_eq!(got["op"], "still-there");
    assert!(t0.elapsed() < Duration::from_secs(1));
    client.stop();
    server.stop();
}

#[test]
fn a_stream_the_server_refuses_fails_both_ends_with_the_cause() {
    let accept: Accept = Box::new(|k| Err(format!("no QEMU waits for stream {k}").into()));
    let (client, server) = tunnel_pair(accept);
    let (_qemu, ours) = UnixStream::pair().expect("pair");
    client.open(0, ours).expect("open");
    let e = server
        .wait_for_streams(1, Duration::from_secs(5))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("no QEMU waits for stream 0"), "{e}");
    server.stop();
    let t0 = Instant::now();
    let e = client
        .wait_for_streams(1, Duration::from_secs(10))
        .expect_err("the client sees the end too")
        .to_string();
    assert!(t0.elapsed() < Duration::from_secs(5), "{e}");
}

#[test]
fn cutting_the_connection_mid_transfer_ends_both_sides_promptly() {
    let (client, server, arrived) = tunnels();
    let (mut qemu, ours) = UnixStream::pair().expect("pair");
    client.open(0, ours).expect("open");
    let (_, mut dst) = wait_arrived(&arrived, 1).pop().expect("one");
    let writer = std::thread::spawn(move || {
        let chunk = vec![1u8; 1 << 20];
        while qemu.write_all(&chunk).is_ok() {}
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < 32 << 20 {
        got += dst.read(&mut buf).expect("read");
    }
    let t0 = Instant::now();
    client.stop();
    let e1 = client
        .wait_for_streams(1, Duration::from_secs(10))
        .expect_err("client")
        .to_string();
    let e2 = server
        .wait_for_streams(1, Duration::from_secs(10))
        .expect_err("server")
        .to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}: {e1} / {e2}",
        t0.elapsed()
    );
    drop(dst);
    writer.join().expect("writer ends once its socket is gone");
}
