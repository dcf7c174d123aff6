//! Carrying one data stream: on a lane of its own ([`bulk`](super::bulk)) or, compressed,
//! the local socket ⇄ its yamux stream, both directions in one task, with the
//! compression filter, metering, and the `end` note that makes a direction's end
//! trustworthy. Also the two small stream helpers the control
//! stream shares (`write_all`, `read_exact` on a yamux stream behind a mutex).
//!
//! A carrier must never buffer more than its fixed copy buffer per direction (yamux's
//! window is the flow control), never count a direction as ended without the peer's
//! matching byte count, and never hold the stream's lock across an `.await`.

use super::bulk::carry_lane;
use super::shared::{lock, short, PeerEnd, Phase, Shared};
use crate::compress::{Compression, Outgoing};
use crate::tls_async::lanes::CREDIT_LANE;
use crate::tls_async::TlsIo;
use futures::future::{self, Either};
use futures::io::{AsyncRead as _, AsyncWrite as _};
use futures::StreamExt as _;
use std::future::poll_fn;
use std::io::ErrorKind;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vmferry_proto::tunnel_frame::Frame;

/// Copy buffer per direction per stream.
pub(super) const COPY_BUF: usize = 256 * 1024;
/// How long a failing stream waits for the peer's word on why, before reporting its own.
const CAUSE_GRACE: Duration = Duration::from_secs(1);

/// Why carrying a stream failed, and whose fault it was.
pub(super) enum CarryError {
    /// Here (our local socket, our own decision): the peer is told why.
    Here(String),
    /// At the peer or on the way: the peer knows already, or cannot be told.
    There(String),
}

/// Carries one data stream both ways until both directions ended; counts it done or
/// failed. The client (`announce`) first sends the stream's index and lane
/// ([`announcement`]); `lane` 0: its bytes go through yamux.
pub(super) async fn carry(
    shared: Arc<Shared>,
    tls: TlsIo,
    k: u16,
    lane: u8,
    stream: yamux::Stream,
    local: tokio::net::UnixStream,
    announce: bool,
) {
    let _task = shared.task_started();
    let mut phase = shared.phase.subscribe();
    let work = async {
        if lane != 0 {
            carry_lane(&shared, &tls, k, lane, stream, local, announce).await
        } else {
            carry_both(&shared, k, stream, local, announce).await
        }
    };
    // A broken connection cuts the stream at once, and so does our own close. A close by
    // the peer does not: what it sent before it closed is still delivered.
    let cut = phase.wait_for(|p| matches!(p, Phase::Broken | Phase::ClosedHere));
    let outcome = match future::select(pin!(work), pin!(cut)).await {
        Either::Left((r, _)) => Some(r),
        Either::Right(_) => None,
    };
    match outcome {
        Some(Ok(())) => shared.stream_done(),
        Some(Err(CarryError::Here(cause))) => {
            shared.stream_failed(format!("stream {k}: {cause}"));
            shared.outbox.push_note(Frame::Failed {
                stream: k,
                cause: short(&cause),
            });
        }
        Some(Err(CarryError::There(cause))) => {
            shared.stream_failed(format!("stream {k}: {cause}"));
        }
        None => {
            let cause = shared
                .broken_cause()
                .unwrap_or_else(|| "the tunnel was closed while it was open".into());
            shared.stream_failed(format!("stream {k} was cut off: {cause}"));
        }
    }
}

async fn carry_both(
    shared: &Shared,
    k: u16,
    stream: yamux::Stream,
    local: tokio::net::UnixStream,
    announce: bool,
) -> Result<(), CarryError> {
    let peer_word = shared.role.peer_word();
    // Both directions in this one task, each locking the stream only within a poll: no
    // contention, and the receiving side can take yamux's frames whole (one copy less).
    let stream = Mutex::new(stream);
    let (mut lr, mut lw) = local.into_split();
    let mut phase = shared.phase.subscribe();
    let there = |what: String| there(shared, k, what);

    let up = async {
        if announce {
            write_all(&stream, &announcement(k, 0))
                .await
                .map_err(|e| format!("cannot announce it: {e}"))
                .map_err(CarryError::There)?;
        }
        let mut buf = vec![0u8; COPY_BUF];
        let mut outgoing =
            Outgoing::new(&shared.filters).map_err(|e| CarryError::Here(e.to_string()))?;
        // Bytes given to the stream (compressed, if so): what the peer must confirm.
        let mut sent = 0u64;
        // Once the peer closed the mux, what the local socket sends has nowhere to go.
        // (A break or our own close is `carry`'s to report.)
        let mut closed_there = pin!(phase.wait_for(|p| *p == Phase::ClosedThere));
        loop {
            let n = match future::select(pin!(lr.read(&mut buf)), closed_there.as_mut()).await {
                Either::Left((Ok(n), _)) => n,
                Either::Left((Err(e), _)) => {
                    return Err(CarryError::Here(format!("reading the local socket: {e}")))
                }
                Either::Right(_) => {
                    return Err(CarryError::There(format!(
                        "{peer_word} closed the tunnel while this stream was still sending"
                    )))
                }
            };
            if n == 0 {
                let tail = outgoing
                    .finish()
                    .map_err(|e| CarryError::Here(e.to_string()))?;
                if let Err(e) = write_all(&stream, tail).await {
                    return Err(there(format!("sending: {e}")).await);
                }
                sent += tail.len() as u64;
                shared.meter.add_wire_forward(tail.len() as u64);
                break;
            }
            let out = outgoing
                .pass(&buf[..n])
                .map_err(|e| CarryError::Here(e.to_string()))?;
            if let Err(e) = write_all(&stream, out).await {
                return Err(there(format!("sending: {e}")).await);
            }
            sent += out.len() as u64;
            shared.meter.add_forward(n as u64);
            shared.meter.add_wire_forward(out.len() as u64);
        }
        shared.outbox.push_note(Frame::End {
            stream: k,
            bytes: sent,
        });
        if let Err(e) = poll_fn(|cx| Pin::new(&mut *lock(&stream)).poll_close(cx)).await {
            return Err(there(format!("ending: {e}")).await);
        }
        Ok(())
    };

    let down = async {
        let mut decompressor = shared
            .filters
            .decompressor()
            .map_err(|e| CarryError::Here(e.to_string()))?;
        let mut plain = Vec::new();
        let mut got = 0u64;
        loop {
            match poll_fn(|cx| lock(&stream).poll_next_unpin(cx)).await {
                Some(Ok(packet)) => {
                    let packet = packet.as_ref();
                    got += packet.len() as u64;
                    shared.meter.add_wire_backward(packet.len() as u64);
                    let Some(d) = decompressor.as_mut() else {
                        lw.write_all(packet).await.map_err(|e| {
                            CarryError::Here(format!("writing to the local socket: {e}"))
                        })?;
                        shared.meter.add_backward(packet.len() as u64);
                        continue;
                    };
                    // A chunk of output at a time, however far the packet expands.
                    let mut at = 0;
                    loop {
                        plain.clear();
                        at += d
                            .decompress(&packet[at..], &mut plain, COPY_BUF)
                            .map_err(|e| CarryError::There(e.to_string()))?;
                        lw.write_all(&plain).await.map_err(|e| {
                            CarryError::Here(format!("writing to the local socket: {e}"))
                        })?;
                        shared.meter.add_backward(plain.len() as u64);
                        if at == packet.len() && plain.len() < COPY_BUF {
                            break;
                        }
                    }
                }
                Some(Err(e)) => return Err(there(format!("receiving: {e}")).await),
                None => break,
            }
        }
        confirm_end(shared, shared.peer_end(k).await, got)?;
        if decompressor.as_ref().is_some_and(|d| !d.at_frame_end()) {
            return Err(CarryError::There(format!(
                "{peer_word}'s compressed stream ended in the middle of a frame"
            )));
        }
        lw.shutdown()
            .await
            .map_err(|e| CarryError::Here(format!("half-closing the local socket: {e}")))
    };

    future::try_join(up, down).await.map(|_| ())
}

/// What a data stream's yamux stream begins with: its index k (big-endian) and its lane
/// (0: none, its bytes follow in yamux).
pub(super) fn announcement(k: u16, lane: u8) -> [u8; 3] {
    let [hi, lo] = k.to_be_bytes();
    [hi, lo, lane]
}

/// Which lane the client gives its next data stream: uncompressed streams get lanes
/// 1..=254 in turn, never one used before in this tunnel (so no late byte of an old
/// stream can reach a new one); compressed streams, and any after the 254th, none.
pub(super) fn next_lane(shared: &Shared, used: &mut u8) -> u8 {
    if shared.filters.compress != Compression::None || *used >= CREDIT_LANE - 1 {
        return 0;
    }
    *used += 1;
    *used
}

/// Whether the peer's word on how a stream's incoming direction ended confirms the
/// `got` bytes that arrived: the only clean end of a direction.
pub(super) fn confirm_end(
    shared: &Shared,
    end: Option<PeerEnd>,
    got: u64,
) -> Result<(), CarryError> {
    let peer_word = shared.role.peer_word();
    match end {
        Some(PeerEnd::Sent(n)) if n == got => Ok(()),
        Some(PeerEnd::Sent(n)) => Err(CarryError::There(format!(
            "ended after {got} of the {n} bytes {peer_word} sent"
        ))),
        Some(PeerEnd::Failed(cause)) => Err(CarryError::There(cause)),
        None => {
            let cause = shared
                .broken_cause()
                .unwrap_or_else(|| "the connection ended".into());
            Err(CarryError::There(format!(
                "ended without {peer_word} confirming it ({cause})"
            )))
        }
    }
}

/// A failure on the way: a yamux or TLS error alone says little ("connection is
/// closed"), so the peer's note on stream `k` says why, if it comes within a grace.
pub(super) async fn there(shared: &Shared, k: u16, what: String) -> CarryError {
    let word = tokio::time::timeout(CAUSE_GRACE, shared.peer_end(k)).await;
    match word {
        Ok(Some(PeerEnd::Failed(cause))) => CarryError::There(cause),
        _ => match shared.broken_cause() {
            Some(b) => CarryError::There(format!("{what}: {b}")),
            None => CarryError::There(what),
        },
    }
}

pub(super) async fn write_all(
    stream: &Mutex<yamux::Stream>,
    mut buf: &[u8],
) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *lock(stream)).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

pub(super) async fn read_exact(
    stream: &Mutex<yamux::Stream>,
    mut buf: &mut [u8],
) -> std::io::Result<bool> {
    let mut first = true;
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *lock(stream)).poll_read(cx, buf)).await?;
        if n == 0 {
            return if first {
                Ok(false)
            } else {
                Err(ErrorKind::UnexpectedEof.into())
            };
        }
        first = false;
        buf = &mut buf[n..];
    }
    Ok(true)
}
