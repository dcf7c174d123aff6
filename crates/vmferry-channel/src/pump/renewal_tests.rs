//! Key renewal through whole streams: two pumps over loopback TLS that send KeyUpdates
//! every few records (the renewal threshold forced down), a stock rustls peer that must
//! follow ours, and KeyUpdates that must fail cleanly.

use super::tests::{data, rig_over};
use super::*;
use crate::testing::{stock_client_and_session, tls_pair};
use std::time::Duration;

fn sha256(b: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// What [`carry`] saw: the bytes that arrived at each end, and each side's KeyUpdates
/// (sent, followed).
type Carried = (Vec<u8>, Vec<u8>, (u64, u64), (u64, u64));

/// Sends `up` from the source QEMU end and `down` from the destination's through two
/// pumps over `sessions`; returns what arrived at each end (up, down), and the pumps'
/// KeyUpdate counters (client, server).
fn carry(sessions: (Session, TcpStream, Session, TcpStream), up: &[u8], down: &[u8]) -> Carried {
    let (cs, ct, ss, st) = sessions;
    let (ck, sk) = (cs.key_updates(), ss.key_updates());
    let r = rig_over(cs, ct, ss, st, Filters::default(), Filters::default());
    let (mut src, mut dst) = (r.src_qemu, r.dst_qemu);
    let (mut src_w, mut dst_w) = (
        src.try_clone().expect("clone"),
        dst.try_clone().expect("clone"),
    );
    let (up2, down2) = (up.to_vec(), down.to_vec());
    let w1 = std::thread::spawn(move || {
        src_w.write_all(&up2).expect("write up");
        src_w.shutdown(Shutdown::Write).expect("shut");
    });
    let w2 = std::thread::spawn(move || {
        dst_w.write_all(&down2).expect("write down");
        dst_w.shutdown(Shutdown::Write).expect("shut");
    });
    let got_down = std::thread::spawn(move || {
        let mut v = Vec::new();
        src.read_to_end(&mut v).expect("read down");
        v
    });
    let mut got_up = Vec::new();
    dst.read_to_end(&mut got_up).expect("read up");
    w1.join().expect("w1");
    w2.join().expect("w2");
    let got_down = got_down.join().expect("reader");
    r.a.join().expect("a").expect("pump a");
    r.b.join().expect("b").expect("pump b");
    (got_up, got_down, ck.counts(), sk.counts())
}

#[test]
fn data_crosses_many_key_updates_both_ways_intact() {
    let (mut cs, ct, mut ss, st) = tls_pair();
    cs.renew_every(3);
    ss.renew_every(5);
    let up = data(6 << 20);
    let down = data(3 << 20);
    let (got_up, got_down, client, server) = carry((cs, ct, ss, st), &up, &down);
    assert_eq!(sha256(&got_up), sha256(&up), "upstream differs");
    assert_eq!(sha256(&got_down), sha256(&down), "downstream differs");
    // 6 MiB is 384 full records, 3 MiB 192. The pump renews between batches of up to
    // 16 records, so an update comes every 3 + 16 records at the least.
    assert!(
        client.0 >= 384 / (3 + 16),
        "client sent only {} updates",
        client.0
    );
    assert!(
        server.0 >= 192 / (5 + 16),
        "server sent only {} updates",
        server.0
    );
    assert_eq!(
        client.0, server.1,
        "every update the client sent was followed"
    );
    assert_eq!(
        server.0, client.1,
        "every update the server sent was followed"
    );
}

#[test]
fn one_side_renewing_and_the_other_not_still_understand_each_other() {
    let (mut cs, ct, ss, st) = tls_pair();
    cs.renew_every(2);
    let up = data(2 << 20);
    let down = data(1 << 20);
    let (got_up, got_down, client, server) = carry((cs, ct, ss, st), &up, &down);
    assert_eq!(sha256(&got_up), sha256(&up), "upstream differs");
    assert_eq!(sha256(&got_down), sha256(&down), "downstream differs");
    assert!(
        client.0 >= 128 / (2 + 16),
        "client sent {} updates",
        client.0
    );
    assert_eq!(client.0, server.1);
    assert_eq!((server.0, client.1), (0, 0), "the server never renewed");
}

#[test]
fn a_peer_asking_for_an_update_gets_one_before_our_next_record() {
    let (mut cs, mut ct, mut ss, mut st) = tls_pair();
    cs.renew_every(1);
    cs.request_peer_updates();
    for i in 0..5u8 {
        cs.stream(&mut ct).write_all(&[i; 10]).expect("write");
        let mut got = [0u8; 10];
        ss.stream(&mut st).read_exact(&mut got).expect("read");
        assert_eq!(got, [i; 10]);
        ss.stream(&mut st).write_all(&[!i; 3]).expect("answer");
        let mut ack = [0u8; 3];
        cs.stream(&mut ct)
            .read_exact(&mut ack)
            .expect("read answer");
        assert_eq!(ack, [!i; 3]);
    }
    let (client, server) = (cs.key_updates().counts(), ss.key_updates().counts());
    // The first message goes under the handshake's key; each later one asks for an update.
    assert_eq!(client, (4, 4), "client (sent, followed)");
    assert_eq!(server, (4, 4), "server (sent, followed)");
}

#[test]
fn a_stock_rustls_peer_follows_our_key_updates() {
    let (mut cs, mut ss, st) = stock_client_and_session();
    ss.renew_every(3);
    let keys = ss.key_updates();
    let (dst_qemu, b_local) = UnixStream::pair().expect("pair");
    let stop_b = StopHandle::new(&b_local, &st).expect("stop");
    let b = std::thread::spawn(move || pump(b_local, ss, st, "a", &Meter::default(), &stop_b));
    let down = data(2 << 20);
    let mut w = dst_qemu.try_clone().expect("clone");
    let down2 = down.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&down2).expect("write down");
        w.shutdown(Shutdown::Write).expect("shut");
    });
    cs.conn.send_close_notify();
    cs.flush().expect("flush");
    let mut got = Vec::new();
    cs.read_to_end(&mut got).expect("rustls read every record");
    writer.join().expect("writer");
    assert_eq!(sha256(&got), sha256(&down), "downstream differs");
    b.join().expect("b").expect("pump ok");
    assert!(keys.counts().0 >= 128 / (3 + 16), "{:?}", keys.counts());
    drop(dst_qemu);
}

#[test]
fn a_key_update_with_an_unknown_request_value_is_an_error() {
    let (mut cs, mut ct, ss, st) = tls_pair();
    let (dst_qemu, b_local) = UnixStream::pair().expect("pair");
    let stop_b = StopHandle::new(&b_local, &st).expect("stop");
    let b = std::thread::spawn(move || pump(b_local, ss, st, "a", &Meter::default(), &stop_b));
    cs.send_raw(&mut ct, 22, &[24, 0, 0, 1, 2]).expect("send");
    let e = b.join().expect("b").expect_err("must fail");
    assert!(e.to_string().contains("request_update 2"), "{e}");
    drop((dst_qemu, ct));
}

#[test]
fn a_handshake_message_other_than_key_update_or_ticket_is_an_error() {
    let (mut cs, mut ct, ss, st) = tls_pair();
    let (_dst, b_local) = UnixStream::pair().expect("pair");
    let stop_b = StopHandle::new(&b_local, &st).expect("stop");
    let b = std::thread::spawn(move || pump(b_local, ss, st, "a", &Meter::default(), &stop_b));
    // A ClientHello after the handshake (renegotiation does not exist in TLS 1.3).
    cs.send_raw(&mut ct, 22, &[1, 0, 0, 2, 3, 3]).expect("send");
    let e = b.join().expect("b").expect_err("must fail");
    assert!(e.to_string().contains("handshake message 1"), "{e}");
}

#[test]
fn a_record_cut_short_by_the_end_of_tcp_is_an_error() {
    let (mut cs, ct, ss, st) = tls_pair();
    let (_dst, b_local) = UnixStream::pair().expect("pair");
    let stop_b = StopHandle::new(&b_local, &st).expect("stop");
    let b = std::thread::spawn(move || pump(b_local, ss, st, "a", &Meter::default(), &stop_b));
    // Half a record, then the end of the connection.
    let mut wire = Vec::new();
    {
        let (mut probe, mut probe_peer) = loopback();
        cs.send_raw(&mut probe, 23, &[7u8; 1000]).expect("seal");
        drop(probe);
        probe_peer.read_to_end(&mut wire).expect("record");
    }
    let mut ct = ct;
    ct.write_all(&wire[..wire.len() / 2]).expect("half");
    ct.shutdown(Shutdown::Write).expect("shut");
    let e = b.join().expect("b").expect_err("must fail");
    assert!(matches!(e, PumpError::Truncated { .. }), "{e}");
}

#[test]
fn the_session_stream_carries_the_first_messages_across_key_updates() {
    let (mut cs, mut ct, mut ss, mut st) = tls_pair();
    cs.renew_every(1);
    ss.renew_every(1);
    ct.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    st.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for i in 0..20u8 {
        cs.stream(&mut ct).write_all(&[i; 100]).expect("write");
        let mut got = [0u8; 100];
        ss.stream(&mut st).read_exact(&mut got).expect("read");
        assert_eq!(got, [i; 100]);
        ss.stream(&mut st)
            .write_all(&[i ^ 0xff; 7])
            .expect("answer");
        let mut ack = [0u8; 7];
        cs.stream(&mut ct)
            .read_exact(&mut ack)
            .expect("read answer");
        assert_eq!(ack, [i ^ 0xff; 7]);
    }
    assert!(cs.key_updates().counts().0 >= 19);
    assert!(ss.key_updates().counts().1 >= 19);
    cs.close(&mut ct);
    let mut rest = Vec::new();
    ss.stream(&mut st)
        .read_to_end(&mut rest)
        .expect("clean end");
    assert!(rest.is_empty());
}

#[test]
fn plaintext_that_came_with_the_last_message_read_is_decompressed_by_the_pump() {
    // As a source dials: it reads the destination's one-byte acknowledgement through the
    // session, and the same TCP read may bring the first compressed bytes of the stream
    // (an NBD server greets at once). They must go through the decompressor, not to QEMU.
    const ZSTD: Filters = Filters {
        compress: crate::compress::Compression::Zstd { level: 1 },
    };
    let (mut cs, mut ct, mut ss, mut st) = tls_pair();
    ss.stream(&mut st).write_all(&[6]).expect("ack");
    let (mut dst_qemu, b_local) = UnixStream::pair().expect("pair");
    let stop_b = StopHandle::new(&b_local, &st).expect("stop");
    let b = std::thread::spawn(move || {
        pump_with(b_local, ss, st, "a", &Meter::default(), &stop_b, ZSTD)
    });
    let greeting = data(100_000);
    dst_qemu.write_all(&greeting).expect("greet");
    dst_qemu.shutdown(Shutdown::Write).expect("shut");
    // Wait until the compressed greeting arrived behind the acknowledgement (a record
    // of 23 bytes on the wire).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut peek = vec![0u8; 4096];
    while ct.peek(&mut peek).expect("peek") < peek.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the greeting never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ack = [0u8; 1];
    cs.stream(&mut ct).read_exact(&mut ack).expect("ack");
    assert_eq!(ack, [6]);
    assert!(
        cs.has_plaintext(),
        "the greeting should have come with the ack"
    );
    let (mut src_qemu, a_local) = UnixStream::pair().expect("pair");
    let stop_a = StopHandle::new(&a_local, &ct).expect("stop");
    let a = std::thread::spawn(move || {
        pump_with(a_local, cs, ct, "b", &Meter::default(), &stop_a, ZSTD)
    });
    src_qemu.shutdown(Shutdown::Write).expect("shut");
    let mut got = Vec::new();
    src_qemu.read_to_end(&mut got).expect("read");
    assert_eq!(sha256(&got), sha256(&greeting), "the greeting differs");
    a.join().expect("a").expect("pump a");
    b.join().expect("b").expect("pump b");
    drop(dst_qemu);
}

/// A connected loopback TCP pair.
fn loopback() -> (TcpStream, TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}
