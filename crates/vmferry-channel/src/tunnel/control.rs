//! The control stream: its writer sends the outbox (callers' messages and the tunnel's
//! notes), its reader decodes the peer's frames with
//! [`vmferry_proto::tunnel_frame`] and files them: messages to the inbox, `end` /
//! `refused` / `failed` notes to the streams they concern.
//!
//! It must never read a frame larger than the codec allows (the header is checked before
//! any buffer is made), and a peer that breaks the sequence cuts the tunnel with a cause,
//! never a panic.

use super::carry::{read_exact, write_all};
use super::shared::{lock, Command, PeerEnd, Phase, Role, Shared};
use futures::future;
use futures::io::AsyncWrite as _;
use std::future::poll_fn;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use vmferry_proto::tunnel_frame::{self, Frame, Incoming};

/// The control stream: the writer sends the outbox, the reader files what comes in.
pub(super) async fn control(shared: Arc<Shared>, stream: yamux::Stream) {
    let _task = shared.task_started();
    let stream = Mutex::new(stream);
    let mut phase = shared.phase.subscribe();
    let writer = async {
        while let Some(frame) = shared.outbox.pop().await {
            if write_all(&stream, &frame.encode()).await.is_err() {
                // The connection is going; its end is reported from there.
                return;
            }
        }
        let _ = poll_fn(|cx| Pin::new(&mut *lock(&stream)).poll_close(cx)).await;
        let _ = shared.commands.try_send(Command::ControlFlushed);
    };
    let reader = async {
        if let Err(cause) = read_control(&shared, &stream).await {
            shared.cut(format!("{} {cause}", shared.role.peer_word()));
        }
    };
    let both = future::join(writer, reader);
    let over = phase.wait_for(|p| matches!(p, Phase::Broken | Phase::ClosedHere));
    future::select(pin!(both), pin!(over)).await;
    shared.control_ended();
}

/// Reads control frames until the stream ends; Err (completing "the peer ...") if the
/// peer broke the protocol.
async fn read_control(
    shared: &Shared,
    stream: &Mutex<yamux::Stream>,
) -> Result<(), tunnel_frame::FrameError> {
    let mut incoming = match shared.role {
        Role::Client => Incoming::without_hello(),
        Role::Server => Incoming::expecting_hello(),
    };
    loop {
        let mut header = [0u8; tunnel_frame::HEADER_LEN];
        match read_exact(stream, &mut header).await {
            Ok(true) => {}
            // Its end, or the connection's (reported from there).
            Ok(false) | Err(_) => return Ok(()),
        }
        let mut body = vec![0u8; tunnel_frame::body_len(header)?];
        if !matches!(read_exact(stream, &mut body).await, Ok(true)) {
            return Ok(());
        }
        let Some(frame) = incoming.admit(Frame::decode_body(&body)?)? else {
            continue;
        };
        match frame {
            Frame::Hello { .. } => {}
            Frame::Message(v) => {
                if shared.inbox.push(v).await.is_err() {
                    return Ok(());
                }
            }
            Frame::End { stream, bytes } => shared.note_end(stream, PeerEnd::Sent(bytes)),
            Frame::Refused { stream, cause } => {
                let word = shared.role.peer_word();
                shared.stream_failed(format!("stream {stream} refused by {word}: {cause}"));
                shared.note_end(
                    stream,
                    PeerEnd::Failed(format!("refused by {word}: {cause}")),
                );
            }
            Frame::Failed { stream, cause } => {
                let word = shared.role.peer_word();
                shared.stream_failed(format!("stream {stream} failed at {word}: {cause}"));
                shared.note_end(
                    stream,
                    PeerEnd::Failed(format!("failed at {word}: {cause}")),
                );
            }
        }
    }
}
