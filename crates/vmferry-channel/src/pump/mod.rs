//! The byte pump: one local unix stream (QEMU's migration socket) ⇄ one TLS connection.
//!
//! This is the hot path of a migration. One thread per connection drives both directions
//! with nonblocking sockets and `poll`, so neither direction can deadlock the other and
//! memory stays bounded: the local socket is read only when the records sealed before
//! went to TCP, and the TCP socket only when the plaintext already opened has been handed
//! to QEMU. rustls does the handshake (its unbuffered API, see `tls::data`); then the pump
//! runs the TLS 1.3 record layer itself (`record`) with the traffic secrets rustls handed
//! over in a [`Session`], sealing and opening records in place in two buffers reused for
//! the whole stream (`wire`): 256 KiB per read and per write, no copy or allocation per
//! record. Keys are renewed with TLS KeyUpdate through rustls' `KernelConnection`, long
//! before the cipher's confidentiality limit. With the compression filter on, what QEMU sends is compressed
//! before it is sealed, and what arrives is decompressed a bounded chunk at a time after
//! it is opened.
//!
//! It must never end a stream silently: a TCP close without TLS close_notify is an attack
//! or a crash, and is reported as [`PumpError::Truncated`].

use crate::compress::{Filters, Outgoing};
use crate::meter::Meter;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use record::RecordError;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wire::WireError;

pub(crate) mod record;
pub(crate) mod session;
pub(crate) mod wire;

pub(crate) use record::Kernel;
pub use session::{KeyUpdates, Session, SessionStream};

/// Bytes per read from QEMU's socket when compressing, and per decompressed chunk.
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
    conn: Session,
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
    conn: Session,
    mut tcp: TcpStream,
    peer: &str,
    meter: &Meter,
    stop: &StopHandle,
    options: Filters,
) -> Result<PumpStats, PumpError> {
    let result = run(&mut local, conn, &mut tcp, peer, meter, stop, options);
    match result {
        Err(_) if stop.is_stopped() => Err(PumpError::Stopped),
        other => other,
    }
}

fn run(
    local: &mut UnixStream,
    conn: Session,
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
    let record_err = |e: RecordError| peer_err(e.to_string());

    // The compression filter: what the local side sends goes through `outgoing`; what
    // arrives waits in `staged` (compressed) until `pending` has room for its output.
    let mut outgoing = Outgoing::new(&options).map_err(filter_err)?;
    let mut decompressor = options.decompressor().map_err(filter_err)?;
    let mut staged: Vec<u8> = Vec::new();
    let mut staged_off = 0usize;
    // The decompressor filled the room it had: it may hold more output.
    let mut decode_more = false;
    // Plaintext waiting for the local socket that is not in `inbound` (what arrived with
    // the handshake, or the decompressor's output), and how far it was written.
    if let Some(why) = conn.failure() {
        return Err(peer_err(format!(
            "the connection failed before the pump: {why}"
        )));
    }
    let session::Parts {
        mut outbound,
        mut inbound,
        early,
        mut peer_done,
    } = conn.into_parts();
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_off = 0usize;
    if decompressor.is_some() {
        staged = early;
    } else {
        pending = early;
    }
    if decompressor.is_some() {
        pending.reserve(CHUNK);
    }

    local.set_nonblocking(true).map_err(PumpError::Local)?;
    crate::transport::tune_local(local);
    tcp.set_nonblocking(true)
        .map_err(|e| peer_err(e.to_string()))?;

    let mut lbuf = if decompressor.is_some() || outgoing.compresses() {
        vec![0u8; CHUNK]
    } else {
        Vec::new()
    };
    let mut stats = PumpStats::default();
    let mut local_eof = false;
    let mut local_write_shut = false;

    loop {
        if stop.is_stopped() {
            return Err(PumpError::Stopped);
        }
        let mut progress = false;

        // TLS records out to the peer.
        while !outbound.is_empty() {
            match outbound.flush_to(tcp) {
                Ok(0) => break,
                Ok(_) => progress = true,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(peer_err(e.to_string())),
            }
        }

        if local_eof && outbound.is_empty() {
            stop.forward_done.store(true, Ordering::SeqCst);
        }

        // Decrypted plaintext out to QEMU: first what waits in `pending`, then records.
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
            while !inbound.is_empty() {
                match inbound.deliver(local) {
                    Ok(0) => return Err(PumpError::Local(ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        stats.backward += n as u64;
                        meter.add_backward(n as u64);
                        progress = true;
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) => return Err(PumpError::Local(e)),
                }
            }
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
        let inbound_empty =
            pending.is_empty() && inbound.is_empty() && staged.is_empty() && !decode_more;
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
        if local_eof && peer_done && inbound_empty && outbound.is_empty() {
            let _ = tcp.shutdown(Shutdown::Write);
            return Ok(stats);
        }

        // QEMU → TLS: read straight into the records' plaintext slots, unless compressing.
        if !local_eof && outbound.is_empty() {
            let read = if outgoing.compresses() {
                local.read(&mut lbuf).map_err(WireError::Io)
            } else {
                outbound.fill_from(local)
            };
            match read {
                Ok(0) => {
                    local_eof = true;
                    let tail = outgoing.finish().map_err(filter_err)?;
                    outbound.stage(tail).map_err(record_err)?;
                    meter.add_wire_forward(tail.len() as u64);
                    outbound.stage_close_notify().map_err(record_err)?;
                    progress = true;
                }
                Ok(n) => {
                    if outgoing.compresses() {
                        let out = outgoing.pass(&lbuf[..n]).map_err(filter_err)?;
                        outbound.stage(out).map_err(record_err)?;
                        meter.add_wire_forward(out.len() as u64);
                    } else {
                        meter.add_wire_forward(n as u64);
                    }
                    stats.forward += n as u64;
                    meter.add_forward(n as u64);
                    progress = true;
                }
                Err(WireError::Io(e)) if would_block(&e) => {}
                Err(WireError::Io(e)) => return Err(PumpError::Local(e)),
                Err(WireError::Record(e)) => return Err(record_err(e)),
            }
        }

        // Peer → plaintext.
        if !peer_done && inbound_empty {
            let copy_to = decompressor.is_some().then_some(&mut staged);
            match inbound.read_from(tcp, copy_to) {
                Ok(a) if a.read == 0 => {
                    // Every whole record was opened; no close_notify came.
                    return Err(PumpError::Truncated {
                        peer: peer.to_string(),
                    });
                }
                Ok(a) => {
                    meter.add_wire_backward(a.plain as u64);
                    peer_done = a.closed;
                    progress = true;
                }
                Err(WireError::Io(e)) if would_block(&e) => {}
                Err(WireError::Io(e)) => return Err(peer_err(e.to_string())),
                Err(WireError::Record(e)) => return Err(record_err(e)),
            }
        }

        if progress {
            continue;
        }

        // Nothing moved: sleep until something can.
        let want_local_in = !local_eof && outbound.is_empty();
        let want_local_out = pending_off < pending.len() || !inbound.is_empty();
        let want_tcp_in = !peer_done && inbound_empty;
        let want_tcp_out = !outbound.is_empty();
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

#[cfg(test)]
mod renewal_tests;
#[cfg(test)]
mod tests;
