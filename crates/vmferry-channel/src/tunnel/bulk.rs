//! Carrying one uncompressed data stream on a lane of its own
//! ([`lanes`](crate::tls_async::lanes)): the local socket is read straight into TLS
//! records and written straight from them, with no copy and no yamux frame in between.
//! The stream's yamux stream stays open beside it for what yamux is good at: the
//! announcement of the stream's index, the server's accept order, and its close.
//!
//! As for every stream, a direction ends cleanly only with the peer's `end` note and a
//! matching byte count. The note travels on the mux lane after the lane's last frame,
//! in one TLS stream, so when it arrives every byte it counts has arrived too.
//!
//! This must never count a direction as ended without that note, and never buffer
//! beyond the lane's window (the lanes enforce it).

use super::carry::{announcement, confirm_end, there, write_all, CarryError};
use super::shared::{lock, PeerEnd, Phase, Shared};
use crate::tls_async::lanes::LaneError;
use crate::tls_async::TlsIo;
use futures::future::{self, Either};
use futures::io::AsyncWrite as _;
use std::future::poll_fn;
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use vmferry_proto::tunnel_frame::Frame;

pub(super) async fn carry_lane(
    shared: &Shared,
    tls: &TlsIo,
    k: u16,
    lane: u8,
    stream: yamux::Stream,
    local: tokio::net::UnixStream,
    announce: bool,
) -> Result<(), CarryError> {
    let sock = Arc::new(local);
    match tls.open_lane(lane, sock.clone(), shared.meter.clone()) {
        Ok(()) => {}
        Err(LaneError::Local(m)) => return Err(CarryError::Here(m)),
        // The connection failed before the stream started: say why, as a cut would.
        Err(LaneError::Tunnel(m)) => {
            return Err(there(shared, k, format!("cannot start its lane: {m}")).await)
        }
    }
    let carried = both_ways(shared, tls, k, lane, stream, &sock, announce).await;
    // However it ended, the local socket goes with this task (its peer sees the end).
    tls.close_lane(lane);
    carried
}

async fn both_ways(
    shared: &Shared,
    tls: &TlsIo,
    k: u16,
    lane: u8,
    stream: yamux::Stream,
    sock: &tokio::net::UnixStream,
    announce: bool,
) -> Result<(), CarryError> {
    let peer_word = shared.role.peer_word();
    let stream = Mutex::new(stream);
    let mut phase = shared.phase.subscribe();

    let up = async {
        if announce {
            write_all(&stream, &announcement(k, lane))
                .await
                .map_err(|e| CarryError::There(format!("cannot announce it: {e}")))?;
        }
        let mut sent = 0u64;
        // Once the peer closed the mux, what the local socket sends has nowhere to go.
        let mut closed_there = pin!(phase.wait_for(|p| *p == Phase::ClosedThere));
        loop {
            let send = poll_fn(|cx| tls.poll_send_lane(cx, lane, sock));
            let sent_now = match future::select(pin!(send), closed_there.as_mut()).await {
                Either::Left((r, _)) => Some(r),
                Either::Right(_) => None,
            };
            let n = match sent_now {
                Some(Ok(n)) => n,
                Some(Err(LaneError::Local(e))) => {
                    return Err(CarryError::Here(format!("reading the local socket: {e}")))
                }
                Some(Err(LaneError::Tunnel(e))) => {
                    return Err(there(shared, k, format!("sending: {e}")).await)
                }
                None => {
                    return Err(CarryError::There(format!(
                        "{peer_word} closed the tunnel while this stream was still sending"
                    )))
                }
            };
            if n == 0 {
                break;
            }
            sent += n as u64;
            shared.meter.add_forward(n as u64);
            shared.meter.add_wire_forward(n as u64);
        }
        shared.outbox.push_note(Frame::End {
            stream: k,
            bytes: sent,
        });
        if let Err(e) = poll_fn(|cx| Pin::new(&mut *lock(&stream)).poll_close(cx)).await {
            return Err(there(shared, k, format!("ending: {e}")).await);
        }
        Ok(())
    };

    let down = async {
        let lane_err = |e: LaneError| async move {
            match e {
                LaneError::Local(e) => {
                    CarryError::Here(format!("writing to the local socket: {e}"))
                }
                LaneError::Tunnel(e) => there(shared, k, format!("receiving: {e}")).await,
            }
        };
        // Bytes the local socket did not take at once go on being written until the
        // peer's word on the end comes.
        let drain = poll_fn(|cx| tls.poll_drain_lane(cx, lane, false));
        let end = match future::select(pin!(drain), pin!(shared.peer_end(k))).await {
            Either::Left((Err(e), _)) => return Err(lane_err(e).await),
            Either::Left((Ok(()), end)) => end.await,
            Either::Right((end, _)) => end,
        };
        // What the note counts arrived before it; what waits for the socket goes first.
        if let Some(PeerEnd::Sent(_)) = end {
            if let Err(e) = poll_fn(|cx| tls.poll_drain_lane(cx, lane, true)).await {
                return Err(lane_err(e).await);
            }
        }
        confirm_end(shared, end, tls.lane_received(lane))?;
        nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            .map_err(|e| CarryError::Here(format!("half-closing the local socket: {e}")))
    };

    future::try_join(up, down).await.map(|_| ())
}
