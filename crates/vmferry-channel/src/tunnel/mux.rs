//! The mux: one task on the tunnel's own thread drives the yamux connection over TLS
//! ([`tls_async`](crate::tls_async)), opens the streams callers ask for (client) or takes
//! the peer's in the order they were opened (server), and starts a task per stream
//! ([`carry`](super::carry)) and for the control stream ([`control`](super::control)).
//! When the connection ends it settles the tunnel's phase and ends TLS.
//!
//! It must never copy a stream's bytes itself (the carriers do, each with its own flow
//! control), never block its thread (the server's `accept` runs on a thread of its own),
//! and never accept a stream it cannot account for: every inbound stream is the control
//! stream, queued in id order within [`MAX_STREAMS`], or the end of the tunnel.

use super::api::TunnelError;
use super::carry::{carry, next_lane};
use super::config::{yamux_config, CONTROL_STREAM_ID, MAX_STREAMS};
use super::control::control;
use super::shared::{short, AcceptRequest, Command, Phase, Role, Shared, TlsEnd};
use super::{ACCEPT_TIMEOUT, MAX_DATA_STREAMS, REQUEST_TIMEOUT};
use crate::tls_async::{self, TlsIo};
use futures::future;
use futures::io::AsyncReadExt as _;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::net::TcpStream;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use tokio::sync::{mpsc, oneshot};
use vmferry_proto::tunnel_frame::Frame;

enum Event {
    Command(Command),
    Outbound(Result<yamux::Stream, yamux::ConnectionError>),
    Inbound(yamux::Stream),
    /// The connection ended: with an error, or (None) at EOF or the peer's GoAway.
    Ended(Option<yamux::ConnectionError>),
    ClosedHere(Result<(), yamux::ConnectionError>),
}

/// What the client asked to open, waiting for yamux.
enum Opening {
    Control,
    Data {
        k: u16,
        local: tokio::net::UnixStream,
        reply: std::sync::mpsc::SyncSender<Result<(), TunnelError>>,
    },
}

pub(super) async fn mux(
    shared: Arc<Shared>,
    tls: crate::pump::Session,
    tcp: TcpStream,
    mut commands: mpsc::Receiver<Command>,
    accept: Option<std::sync::mpsc::Sender<AcceptRequest>>,
) {
    // The first failure of the connection is recorded as it happens, before yamux (and
    // so any stream) sees it.
    let on_fail: tls_async::OnFail = {
        let shared = shared.clone();
        Box::new(move |e| shared.record_broken(shared.tls_cause(e)))
    };
    let wire = match TlsIo::new(tls, tcp, &shared.peer, on_fail) {
        Ok(w) => w,
        Err(e) => {
            shared.cut(format!("the mux cannot use its socket: {e}"));
            shared.lock().tls_end = Some(TlsEnd::Failed(format!(
                "the mux cannot use its socket: {e}"
            )));
            shared.changed.notify_all();
            return;
        }
    };
    let tls = wire.clone();
    // The one task that waits for TCP to take what the others sealed.
    let writer = tokio::spawn({
        let tls = tls.clone();
        async move { poll_fn(|cx| tls.poll_writer(cx)).await }
    });
    let role = shared.role;
    let mode = match role {
        Role::Client => yamux::Mode::Client,
        Role::Server => yamux::Mode::Server,
    };
    let mut conn = yamux::Connection::new(wire, yamux_config(), mode);

    let mut opening: VecDeque<Opening> = VecDeque::new();
    let mut opened: HashSet<u16> = HashSet::new();
    // Server: inbound data streams by yamux id, handed to the acceptor in id order.
    let mut early: BTreeMap<u32, yamux::Stream> = BTreeMap::new();
    let mut next_id: u32 = 3;
    let (to_acceptor, acceptor_rx) = mpsc::unbounded_channel::<yamux::Stream>();
    let mut have_control = false;
    // Client: the last lane given to a data stream.
    let mut lanes_used: u8 = 0;
    let mut close_asked = false;
    let mut closing = false;
    match (role, accept) {
        (Role::Client, _) => opening.push_back(Opening::Control),
        (Role::Server, Some(accept)) => {
            tokio::spawn(acceptor(shared.clone(), tls.clone(), acceptor_rx, accept));
        }
        (Role::Server, None) => {}
    }

    let end = loop {
        let event = poll_fn(|cx| {
            if closing {
                return conn.poll_close(cx).map(Event::ClosedHere);
            }
            if !opening.is_empty() {
                if let Poll::Ready(r) = conn.poll_new_outbound(cx) {
                    return Poll::Ready(Event::Outbound(r));
                }
            }
            if let Poll::Ready(Some(c)) = commands.poll_recv(cx) {
                return Poll::Ready(Event::Command(c));
            }
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => Poll::Ready(Event::Inbound(s)),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Event::Ended(Some(e))),
                Poll::Ready(None) => Poll::Ready(Event::Ended(None)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match event {
            Event::Command(Command::Open { k, local, reply }) => {
                let refuse = |cause: String| {
                    let _ = reply.send(Err(TunnelError::Stream {
                        peer: shared.peer.clone(),
                        k,
                        cause,
                    }));
                };
                if close_asked {
                    refuse("the tunnel is closing".into());
                } else if opened.contains(&k) {
                    refuse("is already open".into());
                } else if opened.len() >= MAX_DATA_STREAMS {
                    refuse(format!(
                        "a tunnel carries at most {MAX_DATA_STREAMS} streams"
                    ));
                } else {
                    // Made ready before yamux assigns an id: an id given out must be used
                    // at once, or the server would wait for it forever (see `early`).
                    match local
                        .set_nonblocking(true)
                        .map(|_| crate::transport::tune_local(&local))
                        .and_then(|_| tokio::net::UnixStream::from_std(local))
                    {
                        Ok(local) => {
                            opened.insert(k);
                            opening.push_back(Opening::Data { k, local, reply });
                        }
                        Err(e) => refuse(format!("cannot use the local socket: {e}")),
                    }
                }
            }
            Event::Command(Command::Close) => {
                close_asked = true;
                // What callers queued goes out first; the writer then says so.
                shared.outbox.close();
                if !have_control {
                    closing = true;
                }
            }
            Event::Command(Command::ControlFlushed) => {
                if close_asked {
                    closing = true;
                }
            }
            Event::Outbound(Ok(stream)) => match opening.pop_front() {
                Some(Opening::Control) => {
                    have_control = true;
                    tokio::spawn(control(shared.clone(), stream));
                }
                Some(Opening::Data { k, local, reply }) => {
                    let lane = next_lane(&shared, &mut lanes_used);
                    tokio::spawn(carry(
                        shared.clone(),
                        tls.clone(),
                        k,
                        lane,
                        stream,
                        local,
                        true,
                    ));
                    let _ = reply.send(Ok(()));
                }
                None => {}
            },
            Event::Outbound(Err(e)) => {
                break Err(format!("the multiplexer failed to open a stream: {e}"));
            }
            Event::Inbound(stream) => {
                let id = stream.id().val();
                if role == Role::Client {
                    // The destination opens nothing; dropping it resets it.
                    tracing::debug!(peer = %shared.peer, id, "tunnel: refused a stream the destination opened");
                } else if id == CONTROL_STREAM_ID && !have_control {
                    have_control = true;
                    tokio::spawn(control(shared.clone(), stream));
                } else if id >= next_id && early.len() < MAX_STREAMS {
                    early.insert(id, stream);
                    while let Some(s) = early.remove(&next_id) {
                        let _ = to_acceptor.send(s);
                        next_id += 2;
                    }
                } else {
                    break Err(format!(
                        "the source opened stream id {id} out of order or too many streams"
                    ));
                }
            }
            Event::Ended(Some(e)) => break Err(format!("the multiplexer failed: {e}")),
            Event::Ended(None) => break Ok(Phase::ClosedThere),
            Event::ClosedHere(Ok(())) => break Ok(Phase::ClosedHere),
            Event::ClosedHere(Err(e)) => {
                break Err(format!("the multiplexer failed while closing: {e}"))
            }
        }
    };
    // A failed connection (or `stop`) records its cause before yamux sees it end, so
    // look there first.
    let end = match (end, shared.broken_cause()) {
        (_, Some(_)) => Phase::Broken,
        (Ok(p), None) => p,
        (Err(cause), None) => {
            shared.cut(cause);
            Phase::Broken
        }
    };
    // Never undo a cut made meanwhile from another thread.
    shared.phase.send_if_modified(|p| {
        let keep = *p == Phase::Broken;
        if !keep {
            *p = end;
        }
        !keep
    });
    // Nothing more can be sent; the control writer ends once it has tried the rest.
    shared.outbox.close();
    if !have_control {
        shared.control_ended();
    }
    drop(to_acceptor);
    drop(early);
    for o in opening {
        if let Opening::Data { k, reply, .. } = o {
            let _ = reply.send(Err(TunnelError::Stream {
                peer: shared.peer.clone(),
                k,
                cause: "the tunnel ended before it opened".into(),
            }));
        }
    }
    // Streams that drained what they were sent, control tasks, ... end by themselves now.
    // Meanwhile end TLS: close_notify (unless yamux's close sent it), then keep reading
    // until the peer's, as it may still deliver its last frames.
    drop(conn);
    let finish = async {
        let end = if shared.stopped.load(Ordering::SeqCst) {
            TlsEnd::Failed("it was stopped on this host".to_string())
        } else {
            match tls.finish().await {
                Ok(()) => TlsEnd::Clean,
                Err(e) => TlsEnd::Failed(shared.tls_cause(&e)),
            }
        };
        if let TlsEnd::Failed(cause) = &end {
            shared.record_broken(cause.clone());
        }
        shared.lock().tls_end = Some(end);
        shared.changed.notify_all();
    };
    future::join(finish, shared.tasks_finished()).await;
    writer.abort();
}

/// Server: takes the client's data streams in the order they were opened, reads each
/// one's index, and asks `accept` where it goes, one at a time.
async fn acceptor(
    shared: Arc<Shared>,
    tls: TlsIo,
    mut inbound: mpsc::UnboundedReceiver<yamux::Stream>,
    accept: std::sync::mpsc::Sender<AcceptRequest>,
) {
    let _task = shared.task_started();
    let mut phase = shared.phase.subscribe();
    let work = async {
        let mut seen = HashSet::new();
        while let Some(mut stream) = inbound.recv().await {
            let mut head = [0u8; 3];
            let (k, lane) = match tokio::time::timeout(
                REQUEST_TIMEOUT,
                stream.read_exact(&mut head),
            )
            .await
            {
                Ok(Ok(())) => (u16::from_be_bytes([head[0], head[1]]), head[2]),
                Ok(Err(e)) => {
                    shared.stream_failed(format!(
                        "the source opened a stream but sent no stream index: {e}"
                    ));
                    continue;
                }
                Err(_) => {
                    shared.stream_failed(format!(
                        "the source opened a stream but sent no stream index within {REQUEST_TIMEOUT:?}"
                    ));
                    continue;
                }
            };
            let refuse = |cause: String| {
                shared.stream_failed(format!("stream {k} refused by this destination: {cause}"));
                shared.outbox.push_note(Frame::Refused {
                    stream: k,
                    cause: short(&cause),
                });
            };
            if !seen.insert(k) {
                refuse("a stream with this index is already open".into());
                continue;
            }
            if lane == crate::tls_async::lanes::CREDIT_LANE {
                refuse(format!("lane {lane} is reserved"));
                continue;
            }
            let (tx, rx) = oneshot::channel();
            if accept.send((k, tx)).is_err() {
                refuse("the accept callback has gone".into());
                continue;
            }
            let local = match tokio::time::timeout(ACCEPT_TIMEOUT, rx).await {
                Ok(Ok(Ok(local))) => local,
                Ok(Ok(Err(cause))) => {
                    refuse(cause.to_string());
                    continue;
                }
                Ok(Err(_)) => {
                    refuse("the accept callback panicked".into());
                    continue;
                }
                Err(_) => {
                    refuse(format!("no local socket within {ACCEPT_TIMEOUT:?}"));
                    continue;
                }
            };
            match local
                .set_nonblocking(true)
                .map(|_| crate::transport::tune_local(&local))
                .and_then(|_| tokio::net::UnixStream::from_std(local))
            {
                Ok(local) => {
                    tokio::spawn(carry(
                        shared.clone(),
                        tls.clone(),
                        k,
                        lane,
                        stream,
                        local,
                        false,
                    ));
                }
                Err(e) => refuse(format!("cannot use the local socket: {e}")),
            }
        }
    };
    let over = phase.wait_for(|p| matches!(p, Phase::Broken | Phase::ClosedHere));
    future::select(pin!(work), pin!(over)).await;
}
