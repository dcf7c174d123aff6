//! The pump's tests: whole streams through two pumps over loopback TLS.

use super::*;
use crate::compress::Compression;
use std::time::{Duration, Instant};

/// A TLS pair over loopback, each side wrapped in a pump with a unix socketpair;
/// returns the outer ends (source QEMU side, destination QEMU side) and the pumps.
pub(super) struct Rig {
    pub(super) src_qemu: UnixStream,
    pub(super) dst_qemu: UnixStream,
    pub(super) a: std::thread::JoinHandle<Result<PumpStats, PumpError>>,
    pub(super) b: std::thread::JoinHandle<Result<PumpStats, PumpError>>,
    pub(super) stop_a: StopHandle,
    pub(super) tcp_b: TcpStream,
    pub(super) meter_a: Arc<Meter>,
    pub(super) meter_b: Arc<Meter>,
}

fn rig() -> Rig {
    rig_with(Filters::default(), Filters::default())
}

use crate::testing::tls_pair;

#[test]
fn data_streams_negotiate_aes_128_gcm() {
    let (cs, _ct, ss, _st) = tls_pair();
    for suite in [cs.cipher_suite(), ss.cipher_suite()] {
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}

fn rig_with(opts_a: Filters, opts_b: Filters) -> Rig {
    let (cs, ct, ss, st) = tls_pair();
    rig_over(cs, ct, ss, st, opts_a, opts_b)
}

/// [`rig_with`] over sessions the test prepared (e.g. to renew keys often).
pub(super) fn rig_over(
    cs: Session,
    ct: TcpStream,
    ss: Session,
    st: TcpStream,
    opts_a: Filters,
    opts_b: Filters,
) -> Rig {
    let (src_qemu, a_local) = UnixStream::pair().expect("pair");
    let (dst_qemu, b_local) = UnixStream::pair().expect("pair");
    let stop_a = StopHandle::new(&a_local, &ct).expect("stop");
    let stop_b = StopHandle::new(&b_local, &st).expect("stop");
    let tcp_b = st.try_clone().expect("clone");
    let sa = stop_a.clone();
    let (meter_a, meter_b) = (Arc::new(Meter::default()), Arc::new(Meter::default()));
    let (ma, mb) = (meter_a.clone(), meter_b.clone());
    let a = std::thread::spawn(move || pump_with(a_local, cs, ct, "b", &ma, &sa, opts_a));
    let b = std::thread::spawn(move || pump_with(b_local, ss, st, "a", &mb, &stop_b, opts_b));
    Rig {
        src_qemu,
        dst_qemu,
        a,
        b,
        stop_a,
        tcp_b,
        meter_a,
        meter_b,
    }
}

const ZSTD: Filters = Filters {
    compress: Compression::Zstd { level: 1 },
};

/// Guest memory that compresses: page-sized runs of text and counters.
fn compressible(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| match (i / 4096) % 3 {
            0 => b"kernel page cache line "[i % 23],
            1 => (i / 64) as u8,
            _ => 0,
        })
        .collect()
}

#[test]
fn compressed_streams_arrive_byte_identical_both_ways_and_shrink_on_the_wire() {
    let r = rig_with(ZSTD, ZSTD);
    let (mut src, mut dst) = (r.src_qemu, r.dst_qemu);
    let up = compressible(48 << 20);
    let down = data(2 << 20); // random: passes through, barely larger
    let (up2, down2) = (up.clone(), down.clone());
    let mut src2 = src.try_clone().expect("clone");
    let mut dst2 = dst.try_clone().expect("clone");
    let w1 = std::thread::spawn(move || {
        src2.write_all(&up2).expect("write up");
        src2.shutdown(Shutdown::Write).expect("shut");
    });
    let w2 = std::thread::spawn(move || {
        dst2.write_all(&down2).expect("write down");
        dst2.shutdown(Shutdown::Write).expect("shut");
    });
    let reader = std::thread::spawn(move || {
        let mut got_down = Vec::new();
        src.read_to_end(&mut got_down).expect("read down");
        got_down
    });
    let mut got_up = Vec::new();
    dst.read_to_end(&mut got_up).expect("read up");
    w1.join().expect("w1");
    w2.join().expect("w2");
    r.b.join().expect("b").expect("pump b ok");
    r.a.join().expect("a").expect("pump a ok");
    let got_down = reader.join().expect("reader");
    assert!(got_up == up, "upstream differs");
    assert!(got_down == down, "downstream differs");
    let (a, b) = (&r.meter_a, &r.meter_b);
    assert_eq!(a.forward(), 48 << 20);
    assert_eq!(b.backward(), 48 << 20);
    assert_eq!(a.wire_forward(), b.wire_backward(), "wire bytes agree");
    assert!(
        a.wire_forward() < a.forward() / 20,
        "{} of {} bytes on the wire",
        a.wire_forward(),
        a.forward()
    );
    assert!(b.wire_forward() < b.forward() + b.forward() / 50);
}

#[test]
fn a_peer_that_does_not_compress_is_refused_and_nothing_reaches_qemu() {
    let r = rig_with(Filters::default(), ZSTD);
    let mut src = r.src_qemu;
    src.write_all(&data(1 << 20)).expect("write");
    let e = r.b.join().expect("b").expect_err("refused");
    assert!(e.to_string().contains("cannot be decoded"), "{e}");
    let mut dst = r.dst_qemu;
    dst.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = dst.read_to_end(&mut got);
    assert!(got.is_empty(), "{} bytes reached QEMU", got.len());
    r.stop_a.stop();
    let _ = r.a.join();
}

pub(super) fn data(n: usize) -> Vec<u8> {
    crate::testing::noise(0x1234_5678_9abc_def1, n)
}

#[test]
fn sixty_four_megabytes_arrive_byte_identical_and_both_pumps_end_cleanly() {
    let r = rig();
    let payload = data(64 << 20);
    let expect = payload.clone();
    let mut src = r.src_qemu;
    let w = std::thread::spawn(move || {
        src.write_all(&payload).expect("write");
        src.shutdown(Shutdown::Write).expect("shutdown");
        src
    });
    let mut dst = r.dst_qemu;
    let mut got = Vec::new();
    dst.read_to_end(&mut got).expect("read");
    assert!(got == expect, "data differs");
    drop(dst); // the destination QEMU closes its side: the return direction ends
    let _src = w.join().expect("writer");
    let sa = r.a.join().expect("a").expect("pump a ok");
    let sb = r.b.join().expect("b").expect("pump b ok");
    assert_eq!(sa.forward, 64 << 20);
    assert_eq!(sb.backward, 64 << 20);
}

#[test]
fn data_flows_both_ways_at_once() {
    let r = rig();
    let (mut src, mut dst) = (r.src_qemu, r.dst_qemu);
    let up = data(8 << 20);
    let down: Vec<u8> = data(4 << 20).into_iter().rev().collect();
    let (up2, down2) = (up.clone(), down.clone());
    let mut src2 = src.try_clone().expect("clone");
    let mut dst2 = dst.try_clone().expect("clone");
    let w1 = std::thread::spawn(move || {
        src2.write_all(&up2).expect("w");
        src2.shutdown(Shutdown::Write).expect("s");
    });
    let w2 = std::thread::spawn(move || {
        dst2.write_all(&down2).expect("w");
        dst2.shutdown(Shutdown::Write).expect("s");
    });
    let mut got_up = Vec::new();
    let mut got_down = Vec::new();
    let rd = std::thread::spawn(move || {
        dst.read_to_end(&mut got_up).expect("r");
        got_up
    });
    src.read_to_end(&mut got_down).expect("r");
    let got_up = rd.join().expect("join");
    w1.join().expect("w1");
    w2.join().expect("w2");
    assert!(got_up == up && got_down == down);
    assert!(r.a.join().expect("a").is_ok());
    assert!(r.b.join().expect("b").is_ok());
}

#[test]
fn a_tcp_close_without_close_notify_is_reported_as_truncation() {
    let r = rig();
    let mut src = r.src_qemu;
    src.write_all(b"some bytes").expect("w");
    std::thread::sleep(Duration::from_millis(100));
    // Cut the TCP connection under the destination pump, as a crash or attacker would.
    r.tcp_b.shutdown(Shutdown::Both).expect("cut");
    let e = r.a.join().expect("a").expect_err("must fail");
    assert!(
        matches!(e, PumpError::Truncated { .. } | PumpError::Peer { .. }),
        "{e}"
    );
    drop(r.b.join());
    drop(r.dst_qemu);
}

#[test]
fn stop_ends_a_stalled_pump_promptly() {
    let r = rig();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    r.stop_a.stop();
    let e = r.a.join().expect("a").expect_err("stopped");
    assert!(matches!(e, PumpError::Stopped), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
    drop((r.src_qemu, r.dst_qemu, r.b.join()));
}

/// A pump on the server side only; the client is rustls' own buffered connection, driven
/// by the test: (client stream, destination QEMU end, the pump).
pub(super) fn half_rig() -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    UnixStream,
    std::thread::JoinHandle<Result<PumpStats, PumpError>>,
) {
    let (cs, ss, st) = crate::testing::stock_client_and_session();
    let (dst_qemu, b_local) = UnixStream::pair().expect("pair");
    let stop_b = StopHandle::new(&b_local, &st).expect("stop");
    let b = std::thread::spawn(move || pump(b_local, ss, st, "a", &Meter::default(), &stop_b));
    (cs, dst_qemu, b)
}

#[test]
fn a_stock_rustls_peer_and_the_pump_understand_each_other_both_ways() {
    let (mut cs, dst, b) = half_rig();
    let up = data(4 << 20);
    let down = data(1 << 20);
    let (mut dst_r, mut dst_w) = (dst.try_clone().expect("clone"), dst);
    let down2 = down.clone();
    let w = std::thread::spawn(move || {
        dst_w.write_all(&down2).expect("write down");
        dst_w.shutdown(Shutdown::Write).expect("shut");
    });
    let r = std::thread::spawn(move || {
        let mut got = Vec::new();
        dst_r.read_to_end(&mut got).expect("read up");
        got
    });
    cs.write_all(&up).expect("write up");
    cs.conn.send_close_notify();
    cs.flush().expect("flush");
    let mut got_down = Vec::new();
    cs.read_to_end(&mut got_down).expect("read down");
    w.join().expect("w");
    assert!(r.join().expect("r") == up, "upstream differs");
    assert!(got_down == down, "downstream differs");
    let stats = b.join().expect("b").expect("pump ok");
    assert_eq!((stats.backward, stats.forward), (4 << 20, 1 << 20));
}

#[test]
fn a_tampered_record_ends_the_stream_and_nothing_after_it_reaches_qemu() {
    let (mut cs, mut dst, b) = half_rig();
    let record = |conn: &mut rustls::ClientConnection, text: &[u8]| {
        conn.writer().write_all(text).expect("plaintext");
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).expect("records");
        }
        wire
    };
    let first = record(&mut cs.conn, b"first record");
    let mut second = record(&mut cs.conn, b"second record");
    let third = record(&mut cs.conn, b"third record");
    second[12] ^= 0x01;
    cs.sock.write_all(&first).expect("send first");
    let mut got = [0u8; 12];
    dst.read_exact(&mut got).expect("first arrives");
    assert_eq!(&got, b"first record");
    cs.sock.write_all(&second).expect("send second");
    let _ = cs.sock.write_all(&third);
    let e = b.join().expect("b").expect_err("must fail");
    assert!(e.to_string().contains("bad_record_mac"), "{e}");
    dst.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = dst.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "{} bytes reached QEMU after it",
        rest.len()
    );
}

#[test]
fn a_stock_rustls_peer_that_renews_its_keys_is_followed() {
    let (mut cs, mut dst, b) = half_rig();
    cs.write_all(b"old keys, ").expect("write");
    cs.flush().expect("flush");
    cs.conn.refresh_traffic_keys().expect("key update");
    cs.write_all(b"new keys").expect("write");
    cs.conn.send_close_notify();
    cs.flush().expect("flush");
    let mut got = [0u8; 18];
    dst.read_exact(&mut got)
        .expect("both sides of the update arrive");
    assert_eq!(&got, b"old keys, new keys");
    dst.shutdown(Shutdown::Write).expect("shut");
    let mut rest = Vec::new();
    cs.read_to_end(&mut rest).expect("clean end");
    b.join().expect("b").expect("pump ok");
}
