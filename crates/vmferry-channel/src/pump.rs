//! The byte pump: one local unix stream (QEMU's migration socket) ⇄ one TLS connection.
//!
//! This is the hot path of a migration. One thread per connection drives both directions
//! with nonblocking sockets and `poll`, so neither direction can deadlock the other and
//! memory stays bounded: the local socket is read only when rustls has flushed what it had,
//! and the TCP socket only when the plaintext already decrypted has been handed to QEMU.
//! Reads and writes are large (256 KiB) into buffers reused for the whole stream.
//! With the compression filter on, what QEMU sends is compressed before rustls sees it,
//! and what arrives is decompressed a bounded chunk at a time after it.
//!
//! It must never end a stream silently: a TCP close without TLS close_notify is an attack
//! or a crash, and is reported as [`PumpError::Truncated`].

use crate::compress::{Filters, Outgoing};
use crate::meter::Meter;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("stopped")]
    Stopped,
    #[error("{peer} closed the connection without TLS close_notify: the stream was cut short")]
    Truncated { peer: String },
    #[error("{peer}: {msg}")]
    Peer { peer: String, msg: String },
    /// The compression filter failed (ours, or the peer's stream does not decode).
    #[error("{peer}: {source}")]
    Filter {
        peer: String,
        #[source]
        source: crate::compress::CompressError,
    },
    /// Reading what rustls decrypted failed (a TLS error from the peer).
    #[error("{peer}: {source}")]
    Tls {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("local QEMU socket: {0}")]
    Local(#[source] std::io::Error),
}

/// Plaintext bytes moved by one pump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpStats {
    pub forward: u64,
    pub backward: u64,
}

/// Stops a running pump from another thread: both sockets are shut down, which wakes the
/// pump's poll, and the pump returns [`PumpError::Stopped`].
#[derive(Debug, Clone)]
pub struct StopHandle {
    local: Arc<UnixStream>,
    tcp: Arc<TcpStream>,
    stopped: Arc<AtomicBool>,
    /// Set once the local side ended and every byte of it, and close_notify, went out.
    forward_done: Arc<AtomicBool>,
}

impl StopHandle {
    pub fn new(local: &UnixStream, tcp: &TcpStream) -> std::io::Result<StopHandle> {
        Ok(StopHandle {
            local: Arc::new(local.try_clone()?),
            tcp: Arc::new(tcp.try_clone()?),
            stopped: Arc::new(AtomicBool::new(false)),
            forward_done: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.local.shutdown(Shutdown::Both);
        let _ = self.tcp.shutdown(Shutdown::Both);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Whether the local side ended and everything it sent (and our close_notify) was
    /// handed to the kernel for the peer; the other direction may still be open.
    pub fn forward_done(&self) -> bool {
        self.forward_done.load(Ordering::SeqCst)
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// Pumps until both directions have ended cleanly, or fails. `peer` names the TLS peer
/// in errors (e.g. "10.0.0.2:4700").
pub fn pump(
    local: UnixStream,
    conn: rustls::Connection,
    tcp: TcpStream,
    peer: &str,
    meter: &Meter,
    stop: &StopHandle,
) -> Result<PumpStats, PumpError> {
    pump_with(local, conn, tcp, peer, meter, stop, Filters::default())
}

/// [`pump`] with filters: both ends of a stream must use the same options.
pub fn pump_with(
    mut local: UnixStream,
    mut conn: rustls::Connection,
    mut tcp: TcpStream,
    peer: &str,
    meter: &Meter,
    stop: &StopHandle,
    options: Filters,
) -> Result<PumpStats, PumpError> {
    let result = run(&mut local, &mut conn, &mut tcp, peer, meter, stop, options);
    match result {
        Err(_) if stop.is_stopped() => Err(PumpError::Stopped),
        other => other,
    }
}

fn run(
    local: &mut UnixStream,
    conn: &mut rustls::Connection,
    tcp: &mut TcpStream,
    peer: &str,
    meter: &Meter,
    stop: &StopHandle,
    options: Filters,
) -> Result<PumpStats, PumpError> {
    let peer_err = |msg: String| PumpError::Peer {
        peer: peer.to_string(),
        msg,
    };
    let filter_err = |source| PumpError::Filter {
        peer: peer.to_string(),
        source,
    };
    let tls_err = |source| PumpError::Tls {
        peer: peer.to_string(),
        source,
    };
    local.set_nonblocking(true).map_err(PumpError::Local)?;
    crate::transport::tune_local(local);
    tcp.set_nonblocking(true)
        .map_err(|e| peer_err(e.to_string()))?;
    // The local socket is read only when rustls's send buffer is empty, so one read's
    // worth is the most it ever holds.
    conn.set_buffer_limit(None);

    let mut lbuf = vec![0u8; CHUNK];
    let mut tbuf = vec![0u8; CHUNK];
    // Decrypted bytes waiting for the local socket, and how far they were written.
    let mut pending: Vec<u8> = Vec::with_capacity(CHUNK + 16 * 1024);
    let mut pending_off = 0usize;
    let mut stats = PumpStats::default();
    let mut local_eof = false;
    let mut peer_done = false;
    let mut local_write_shut = false;
    // The compression filter: what the local side sends goes through `outgoing`; what
    // arrives waits in `staged` (compressed) until `pending` has room for its output.
    let mut outgoing = Outgoing::new(&options).map_err(filter_err)?;
    let mut decompressor = options.decompressor().map_err(filter_err)?;
    let mut staged: Vec<u8> = Vec::new();
    let mut staged_off = 0usize;
    // The decompressor filled the room it had: it may hold more output.
    let mut decode_more = false;

    // Plaintext that arrived with the handshake or a preamble read.
    let inbox = if decompressor.is_some() {
        &mut staged
    } else {
        &mut pending
    };
    drain_plaintext(conn, inbox, &mut peer_done).map_err(tls_err)?;

    loop {
        if stop.is_stopped() {
            return Err(PumpError::Stopped);
        }
        let mut progress = false;

        // TLS records out to the peer.
        while conn.wants_write() {
            match conn.write_tls(tcp) {
                Ok(0) => break,
                Ok(_) => progress = true,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(peer_err(e.to_string())),
            }
        }

        if local_eof && !conn.wants_write() {
            stop.forward_done.store(true, Ordering::SeqCst);
        }

        // Decrypted plaintext out to QEMU.
        while pending_off < pending.len() {
            match local.write(&pending[pending_off..]) {
                Ok(0) => return Err(PumpError::Local(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    pending_off += n;
                    stats.backward += n as u64;
                    meter.add_backward(n as u64);
                    progress = true;
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(PumpError::Local(e)),
            }
        }
        if pending_off == pending.len() {
            pending.clear();
            pending_off = 0;
        }
        // Compressed input out to plaintext, a chunk at a time.
        if let Some(d) = decompressor.as_mut() {
            if pending.is_empty() && (staged_off < staged.len() || decode_more) {
                let used = d
                    .decompress(&staged[staged_off..], &mut pending, CHUNK)
                    .map_err(filter_err)?;
                staged_off += used;
                if staged_off == staged.len() {
                    staged.clear();
                    staged_off = 0;
                }
                decode_more = pending.len() == CHUNK;
                progress |= used > 0 || !pending.is_empty();
                if used == 0 && pending.is_empty() && !staged.is_empty() {
                    return Err(peer_err(
                        "the compressed stream makes no progress".to_string(),
                    ));
                }
            }
        }
        let inbound_empty = pending.is_empty() && staged.is_empty() && !decode_more;
        if peer_done && inbound_empty && !local_write_shut {
            if let Some(d) = &decompressor {
                if !d.at_frame_end() {
                    return Err(peer_err(
                        "the compressed stream ended in the middle of a frame".to_string(),
                    ));
                }
            }
            let _ = local.shutdown(Shutdown::Write);
            local_write_shut = true;
        }
        if local_eof && peer_done && inbound_empty && !conn.wants_write() {
            let _ = tcp.shutdown(Shutdown::Write);
            return Ok(stats);
        }

        // QEMU → TLS.
        if !local_eof && !conn.wants_write() {
            match local.read(&mut lbuf) {
                Ok(0) => {
                    local_eof = true;
                    let tail = outgoing.finish().map_err(filter_err)?;
                    conn.writer()
                        .write_all(tail)
                        .map_err(|e| peer_err(e.to_string()))?;
                    meter.add_wire_forward(tail.len() as u64);
                    conn.send_close_notify();
                    progress = true;
                }
                Ok(n) => {
                    let out = outgoing.pass(&lbuf[..n]).map_err(filter_err)?;
                    conn.writer()
                        .write_all(out)
                        .map_err(|e| peer_err(e.to_string()))?;
                    meter.add_wire_forward(out.len() as u64);
                    stats.forward += n as u64;
                    meter.add_forward(n as u64);
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(PumpError::Local(e)),
            }
        }

        // Peer → plaintext.
        if !peer_done && inbound_empty {
            match tcp.read(&mut tbuf) {
                Ok(0) => {
                    // Anything still buffered was processed; no close_notify came.
                    return Err(PumpError::Truncated {
                        peer: peer.to_string(),
                    });
                }
                Ok(n) => {
                    let inbox = if decompressor.is_some() {
                        &mut staged
                    } else {
                        &mut pending
                    };
                    let before = inbox.len();
                    let mut slice = &tbuf[..n];
                    while !slice.is_empty() {
                        conn.read_tls(&mut slice)
                            .map_err(|e| peer_err(e.to_string()))?;
                        conn.process_new_packets()
                            .map_err(|e| peer_err(crate::tls::describe(&e, peer)))?;
                        drain_plaintext(conn, inbox, &mut peer_done).map_err(tls_err)?;
                    }
                    meter.add_wire_backward((inbox.len() - before) as u64);
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(peer_err(e.to_string())),
            }
        }

        if progress {
            continue;
        }

        // Nothing moved: sleep until something can.
        let want_local_in = !local_eof && !conn.wants_write();
        let want_local_out = pending_off < pending.len();
        let want_tcp_in = !peer_done && inbound_empty;
        let want_tcp_out = conn.wants_write();
        let mut lflags = PollFlags::empty();
        if want_local_in {
            lflags |= PollFlags::POLLIN;
        }
        if want_local_out {
            lflags |= PollFlags::POLLOUT;
        }
        let mut tflags = PollFlags::empty();
        if want_tcp_in {
            tflags |= PollFlags::POLLIN;
        }
        if want_tcp_out {
            tflags |= PollFlags::POLLOUT;
        }
        let mut fds = Vec::with_capacity(2);
        if !lflags.is_empty() {
            fds.push(PollFd::new(local.as_fd(), lflags));
        }
        if !tflags.is_empty() {
            fds.push(PollFd::new(tcp.as_fd(), tflags));
        }
        if fds.is_empty() {
            // Waiting on nothing yet not done cannot happen; fail loudly instead of hanging.
            return Err(peer_err(
                "pump has nothing to wait for (internal error)".into(),
            ));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(peer_err(format!("poll: {e}"))),
        }
    }
}

/// Moves all plaintext rustls has decrypted into `pending`; notes a close_notify.
fn drain_plaintext(
    conn: &mut rustls::Connection,
    pending: &mut Vec<u8>,
    peer_done: &mut bool,
) -> std::io::Result<()> {
    // rustls's own buffer straight into `pending`: one copy out of rustls, not two.
    use std::io::BufRead;
    loop {
        let mut reader = conn.reader();
        match reader.fill_buf() {
            Ok([]) => {
                *peer_done = true;
                return Ok(());
            }
            Ok(buf) => {
                let n = buf.len();
                pending.extend_from_slice(buf);
                reader.consume(n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Compression;
    use std::time::{Duration, Instant};

    /// A TLS pair over loopback, each side wrapped in a pump with a unix socketpair;
    /// returns the outer ends (source QEMU side, destination QEMU side) and the pumps.
    struct Rig {
        src_qemu: UnixStream,
        dst_qemu: UnixStream,
        a: std::thread::JoinHandle<Result<PumpStats, PumpError>>,
        b: std::thread::JoinHandle<Result<PumpStats, PumpError>>,
        stop_a: StopHandle,
        tcp_b: TcpStream,
        meter_a: Arc<Meter>,
        meter_b: Arc<Meter>,
    }

    fn rig() -> Rig {
        rig_with(Filters::default(), Filters::default())
    }

    use crate::testing::tls_streams as handshake;

    #[test]
    fn data_streams_negotiate_aes_128_gcm() {
        let (cs, ss) = handshake();
        for suite in [
            cs.conn.negotiated_cipher_suite(),
            ss.conn.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    fn rig_with(opts_a: Filters, opts_b: Filters) -> Rig {
        let (cs, ss) = handshake();
        let (src_qemu, a_local) = UnixStream::pair().expect("pair");
        let (dst_qemu, b_local) = UnixStream::pair().expect("pair");
        let stop_a = StopHandle::new(&a_local, &cs.sock).expect("stop");
        let stop_b = StopHandle::new(&b_local, &ss.sock).expect("stop");
        let tcp_b = ss.sock.try_clone().expect("clone");
        let sa = stop_a.clone();
        let (meter_a, meter_b) = (Arc::new(Meter::default()), Arc::new(Meter::default()));
        let (ma, mb) = (meter_a.clone(), meter_b.clone());
        let a = std::thread::spawn(move || {
            pump_with(
                a_local,
                rustls::Connection::Client(cs.conn),
                cs.sock,
                "b",
                &ma,
                &sa,
                opts_a,
            )
        });
        let b = std::thread::spawn(move || {
            pump_with(
                b_local,
                rustls::Connection::Server(ss.conn),
                ss.sock,
                "a",
                &mb,
                &stop_b,
                opts_b,
            )
        });
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

    fn data(n: usize) -> Vec<u8> {
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
}
