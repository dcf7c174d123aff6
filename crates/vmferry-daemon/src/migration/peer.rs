//! The peer link of one migration: a thread that owns one more TLS connection of the data
//! channel, sends this half's state whenever it changes (and every second), and hands
//! every message from the other half to its owner.
//!
//! It is how a destination's failure reaches the source at once (with QEMU's own words),
//! and how the halves finish a migration whose controller is gone. It must never carry
//! guest bytes and never decide anything itself: it reports, its owner acts.

use super::channel::DataConn;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::framed;
use vmferry_proto::peer::{PeerMessage, MAX_PEER_MESSAGE, PEER_HEARTBEAT_MS, PEER_SILENCE_MS};

/// What the link tells its owner.
#[derive(Debug)]
pub enum PeerEvent {
    Message(PeerMessage),
    /// The link ended or went silent; the text says how.
    Lost(String),
}

/// The owner's side of a running link.
#[derive(Debug)]
pub struct PeerLink {
    /// A state to send now rather than at the next heartbeat: carried by value, so
    /// a half that ends right after a change still says the change.
    pending: Arc<Mutex<Option<PeerMessage>>>,
    stop: Arc<AtomicBool>,
    /// What the other half last said, and when.
    last: Arc<Mutex<Option<PeerMessage>>>,
    /// Set once the link's thread ended (after it handed over its last message).
    ended: Arc<AtomicBool>,
}

impl PeerLink {
    /// Starts the link's thread. `own` says this half's state when asked (`None` once
    /// the half is gone: the link then repeats what it said last, never a guess);
    /// `on_event` is called from the link's thread for each message and once when the
    /// link is lost.
    pub fn start(
        conn: DataConn,
        name: &str,
        own: impl Fn() -> Option<PeerMessage> + Send + 'static,
        on_event: impl Fn(PeerEvent) + Send + 'static,
    ) -> std::io::Result<PeerLink> {
        let link = PeerLink {
            pending: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
            last: Arc::new(Mutex::new(None)),
            ended: Arc::new(AtomicBool::new(false)),
        };
        let (pending, stop, last) = (link.pending.clone(), link.stop.clone(), link.last.clone());
        let ended = link.ended.clone();
        std::thread::Builder::new()
            .name(format!("peer-{name}"))
            .spawn(move || {
                let lost = run(conn, &pending, &stop, &last, &own, &on_event);
                ended.store(true, Ordering::SeqCst);
                if !stop.load(Ordering::SeqCst) {
                    on_event(PeerEvent::Lost(lost));
                }
            })?;
        Ok(link)
    }

    /// Sends this state now rather than at the next heartbeat.
    pub fn notify(&self, msg: PeerMessage) {
        *crate::vms::lock(&self.pending) = Some(msg);
    }

    /// What the other half said last.
    pub fn last(&self) -> Option<PeerMessage> {
        crate::vms::lock(&self.last).clone()
    }

    /// Whether the link still runs: every message the other half sent before it ended
    /// has been handed over once this is false.
    pub fn alive(&self) -> bool {
        !self.ended.load(Ordering::SeqCst)
    }

    /// Ends the link, once a state given to [`PeerLink::notify`] went out.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl PeerLink {
    /// Starts the link for one half of a migration: `own` says the half's state, and
    /// `on_event` hands it the other half's news. Both hold the half and the daemon
    /// weakly, so the link never keeps an ended migration alive.
    pub fn for_half<H: Send + Sync + 'static>(
        conn: DataConn,
        id: &vmferry_proto::MigrationId,
        half: &Arc<H>,
        daemon: &Arc<crate::state::Daemon>,
        own: fn(&H) -> PeerMessage,
        on_event: fn(&Arc<H>, &Arc<crate::state::Daemon>, PeerEvent),
    ) -> crate::error::Result<PeerLink> {
        let me = Arc::downgrade(half);
        let me2 = Arc::downgrade(half);
        let d = Arc::downgrade(daemon);
        PeerLink::start(
            conn,
            &id.as_str()[..8],
            move || me.upgrade().map(|m| own(&m)),
            move |ev| {
                if let (Some(m), Some(d)) = (me2.upgrade(), d.upgrade()) {
                    on_event(&m, &d, ev);
                }
            },
        )
        .map_err(|e| {
            crate::error::DaemonError::Internal(format!("cannot start the peer link: {e}"))
        })
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    conn: DataConn,
    pending: &Mutex<Option<PeerMessage>>,
    stop: &AtomicBool,
    last: &Mutex<Option<PeerMessage>>,
    own: &dyn Fn() -> Option<PeerMessage>,
    on_event: &dyn Fn(PeerEvent),
) -> String {
    let DataConn {
        mut conn,
        mut sock,
        peer,
    } = conn;
    let heartbeat = Duration::from_millis(PEER_HEARTBEAT_MS);
    let silence = Duration::from_millis(PEER_SILENCE_MS);
    let _ = sock.set_write_timeout(Some(silence));
    let _ = sock.set_read_timeout(Some(silence));
    let mut sent = Instant::now() - heartbeat;
    let mut heard = Instant::now();
    let mut said: Option<PeerMessage> = None;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let now = crate::vms::lock(pending).take();
        if now.is_some() || sent.elapsed() >= heartbeat {
            let Some(msg) = now.or_else(own).or_else(|| said.clone()) else {
                return String::new(); // the half ended before it said anything
            };
            said = Some(msg.clone());
            let written = {
                let mut s = conn.stream(&mut sock);
                framed::write_json(&mut s, &msg)
                    .and_then(|_| s.flush().map_err(framed::FrameError::Io))
            };
            if let Err(e) = written {
                return format!("the peer link to {peer} broke: {e}");
            }
            sent = Instant::now();
        }
        if stopping {
            conn.close(&mut sock);
            return String::new();
        }
        // Plaintext already opened is read before waiting on the socket.
        if !conn.has_plaintext() {
            let mut fds = [nix::poll::PollFd::new(
                sock.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16)).unwrap_or(0);
            if ready == 0 {
                if heard.elapsed() > silence {
                    return format!(
                        "the peer link to {peer} went silent for {} s",
                        silence.as_secs()
                    );
                }
                continue;
            }
        }
        let read = {
            let mut s = conn.stream(&mut sock);
            framed::read_json::<_, PeerMessage>(
                &mut framed::Deadline::new(&mut s, silence),
                MAX_PEER_MESSAGE,
            )
        };
        match read {
            Ok(Some(m)) => {
                heard = Instant::now();
                *crate::vms::lock(last) = Some(m.clone());
                on_event(PeerEvent::Message(m));
            }
            Ok(None) => return format!("{peer} closed the peer link"),
            Err(e) => return format!("the peer link to {peer} failed: {e}"),
        }
    }
}
