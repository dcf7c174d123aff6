//! Lanes: the frames that share the tunnel's TLS plaintext. Every record the tunnel sends
//! holds one frame — a lane byte, a big-endian u16 length, the bytes — so that bulk data
//! goes from a local socket into a record, and from a record into a local socket, with no
//! copy in between, beside the multiplexer's own byte stream:
//!
//! - lane [`MUX_LANE`] (0): the multiplexer's (yamux's) byte stream;
//! - lanes 1..=254: the bulk bytes of one data stream each;
//! - lane [`CREDIT_LANE`] (255): a credit, `[lane][u32]`: the peer may send that many
//!   more bytes on that lane; 0 bytes is the sender's word that it ran out of credit.
//!
//! A receiver hands a bulk frame to its local socket at once; what the socket does not
//! take waits in the lane's overflow, which the peer's credit bounds ([`WINDOW`]): a
//! local reader that stops stalls its own lane only, never the others or the mux.
//!
//! This module keeps the lanes' state and parses frames; it must never touch records or
//! sockets other than the lanes' own local ones, and never accept a byte beyond the
//! credit it gave.

use crate::meter::Meter;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, IoSlice};
use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// The multiplexer's byte stream.
pub const MUX_LANE: u8 = 0;
/// Credits for the other lanes.
pub const CREDIT_LANE: u8 = 255;
/// A credit frame's body: the lane, then the bytes (big-endian u32).
const CREDIT_BODY: usize = 5;
/// What each lane's receiver first lets the sender have in flight: on the wire, in TLS
/// buffers and in its overflow. Granted again once half of it reached the local socket.
pub const WINDOW: u64 = 8 << 20;
/// The largest a lane's window grows. A sender that runs out of credit says so; if the
/// receiver's local socket took everything so far (the link, not the reader, is what
/// holds it up: a long round trip), the window doubles, up to this.
pub const MAX_WINDOW: u64 = 64 << 20;

/// Why a lane cannot go on.
#[derive(Debug)]
pub enum LaneError {
    /// Its local socket failed.
    Local(String),
    /// The tunnel's connection failed.
    Tunnel(String),
}

/// One lane's sending half: the credit the peer gave.
#[derive(Default)]
struct Out {
    credit: u64,
    /// The peer was told that the credit ran out, and has not given more since.
    starved: bool,
    waker: Option<Waker>,
}

/// One lane's receiving half.
struct In {
    /// None once the lane was closed here: what still comes is dropped.
    sock: Option<Arc<tokio::net::UnixStream>>,
    /// Counts the bytes as they arrive (backward: toward the local socket).
    meter: Arc<Meter>,
    /// Bytes that came but the local socket has not taken yet, in order.
    overflow: VecDeque<u8>,
    received: u64,
    delivered: u64,
    /// Bytes the peer was allowed to send so far, in total, and in flight at most.
    granted: u64,
    window: u64,
    /// The local socket failed: later bytes are dropped.
    failed: Option<String>,
    waker: Option<Waker>,
}

/// Every lane of one connection, both directions.
#[derive(Default)]
pub struct Lanes {
    out: HashMap<u8, Out>,
    inn: HashMap<u8, In>,
    /// Credits to send, in order.
    grants: Vec<[u8; CREDIT_BODY]>,
}

impl Lanes {
    /// Starts receiving on `lane` into `sock` and grants the peer its first window.
    pub fn open(
        &mut self,
        lane: u8,
        sock: Arc<tokio::net::UnixStream>,
        meter: Arc<Meter>,
    ) -> Result<(), String> {
        if lane == MUX_LANE || lane == CREDIT_LANE || self.inn.contains_key(&lane) {
            return Err(format!("lane {lane} cannot be opened (taken or reserved)"));
        }
        self.inn.insert(
            lane,
            In {
                sock: Some(sock),
                meter,
                overflow: VecDeque::new(),
                received: 0,
                delivered: 0,
                granted: WINDOW,
                window: WINDOW,
                failed: None,
                waker: None,
            },
        );
        self.grant(lane, WINDOW);
        Ok(())
    }

    fn grant(&mut self, lane: u8, n: u64) {
        let mut body = [0u8; CREDIT_BODY];
        body[0] = lane;
        body[1..].copy_from_slice(&(n.min(u32::MAX as u64) as u32).to_be_bytes());
        self.grants.push(body);
    }

    /// Credits waiting to be sent: each the body of a [`CREDIT_LANE`] frame.
    pub fn take_grants(&mut self) -> Vec<[u8; CREDIT_BODY]> {
        std::mem::take(&mut self.grants)
    }

    /// The credit the peer gave for sending on `lane`; Pending (the waker kept) if none,
    /// and the peer is told once (see [`Self::take_grants`]).
    pub fn poll_credit(&mut self, cx: &mut Context<'_>, lane: u8) -> Poll<u64> {
        let out = self.out.entry(lane).or_default();
        if out.credit > 0 {
            return Poll::Ready(out.credit);
        }
        out.waker = Some(cx.waker().clone());
        if !out.starved {
            out.starved = true;
            self.grant(lane, 0);
        }
        Poll::Pending
    }

    /// `n` bytes were sent on `lane`.
    pub fn spend(&mut self, lane: u8, n: u64) {
        let out = self.out.entry(lane).or_default();
        out.credit = out.credit.saturating_sub(n);
    }

    /// Stops receiving on `lane`: its local socket is let go, what still comes dropped.
    pub fn close(&mut self, lane: u8) {
        if let Some(l) = self.inn.get_mut(&lane) {
            l.sock = None;
            l.overflow = VecDeque::new();
            l.waker = None;
        }
        if let Some(o) = self.out.get_mut(&lane) {
            o.waker = None;
        }
    }

    /// Bytes received on `lane` so far.
    pub fn received(&self, lane: u8) -> u64 {
        self.inn.get(&lane).map_or(0, |l| l.received)
    }

    /// Wakes every lane's task (the connection failed).
    pub fn wake_all(&mut self) {
        for l in self.inn.values_mut() {
            if let Some(w) = l.waker.take() {
                w.wake();
            }
        }
        for o in self.out.values_mut() {
            if let Some(w) = o.waker.take() {
                w.wake();
            }
        }
    }

    /// A credit frame's body arrived.
    fn credit(&mut self, body: &[u8; CREDIT_BODY]) {
        let (lane, n) = (
            body[0],
            u32::from_be_bytes([body[1], body[2], body[3], body[4]]),
        );
        if n == 0 {
            // The peer ran out of credit on our lane: a larger window if the local socket
            // is not what holds it up.
            if let Some(l) = self.inn.get_mut(&lane) {
                if l.overflow.is_empty() && l.window < MAX_WINDOW {
                    l.window = (l.window * 2).min(MAX_WINDOW);
                }
            }
            self.grant_if_due(lane);
            return;
        }
        let out = self.out.entry(lane).or_default();
        out.credit = out.credit.saturating_add(n as u64);
        out.starved = false;
        if let Some(w) = out.waker.take() {
            w.wake();
        }
    }

    /// `len` bulk bytes arrived on `lane`: counted against the credit given. Whether
    /// they are wanted ([`Self::deliver`] them) or dropped (the lane was closed here or its
    /// socket failed).
    fn accept(&mut self, lane: u8, len: usize) -> Result<bool, String> {
        let Some(l) = self.inn.get_mut(&lane) else {
            return Err(format!(
                "bulk data came on lane {lane}, which was never opened here"
            ));
        };
        l.received += len as u64;
        l.meter.add_wire_backward(len as u64);
        l.meter.add_backward(len as u64);
        if l.received > l.granted {
            return Err(format!(
                "lane {lane}: {} bytes came where only {} were allowed",
                l.received, l.granted
            ));
        }
        Ok(l.sock.is_some() && l.failed.is_none())
    }

    /// Hands accepted bytes of `lane`, in order, to its local socket at once (one
    /// `writev`) if nothing waits before them; what the socket does not take waits in
    /// the overflow.
    pub fn deliver(&mut self, lane: u8, pieces: &[&[u8]]) {
        let Some(l) = self.inn.get_mut(&lane) else {
            return;
        };
        let Some(sock) = l.sock.as_ref().filter(|_| l.failed.is_none()) else {
            return;
        };
        let mut wrote = 0;
        if l.overflow.is_empty() {
            // Straight to the socket, whatever tokio last saw of it: it may not have
            // polled it yet. (Only the lane's task waits on its readiness.)
            let iov: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
            match nix::sys::uio::writev(&**sock, &iov) {
                Ok(n) => wrote = n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    l.failed = Some(std::io::Error::from(e).to_string());
                    if let Some(w) = l.waker.take() {
                        w.wake();
                    }
                    return;
                }
            }
            l.delivered += wrote as u64;
        }
        for p in pieces {
            let skip = wrote.min(p.len());
            wrote -= skip;
            l.overflow.extend(&p[skip..]);
        }
        if !l.overflow.is_empty() {
            if let Some(w) = l.waker.take() {
                w.wake();
            }
        }
        self.grant_if_due(lane);
    }

    /// Grants the peer more once half of the window reached the local socket.
    fn grant_if_due(&mut self, lane: u8) {
        let Some(l) = self.inn.get_mut(&lane) else {
            return;
        };
        let more = (l.delivered + l.window).saturating_sub(l.granted);
        if more >= l.window / 2 {
            l.granted += more;
            self.grant(lane, more);
        }
    }

    /// Writes `lane`'s overflow to its local socket. Ready(Ok) once it is empty if
    /// `until_empty`; otherwise Pending for as long as the lane lives (the waker is kept
    /// for bytes that the socket does not take at once).
    pub fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        lane: u8,
        until_empty: bool,
    ) -> Poll<Result<(), LaneError>> {
        loop {
            let Some(l) = self.inn.get_mut(&lane) else {
                return Poll::Ready(Err(LaneError::Local(format!("lane {lane} is not open"))));
            };
            if let Some(f) = &l.failed {
                return Poll::Ready(Err(LaneError::Local(f.clone())));
            }
            if l.overflow.is_empty() {
                if until_empty {
                    return Poll::Ready(Ok(()));
                }
                l.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let Some(sock) = l.sock.clone() else {
                return Poll::Ready(Err(LaneError::Local(format!("lane {lane} was closed"))));
            };
            let (head, _) = l.overflow.as_slices();
            match sock.try_write(head) {
                Ok(n) => {
                    l.overflow.drain(..n);
                    l.delivered += n as u64;
                    self.grant_if_due(lane);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => match sock.poll_write_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => l.failed = Some(e.to_string()),
                },
                Err(e) => l.failed = Some(e.to_string()),
            }
        }
    }
}

/// Where the frame parser is in the plaintext.
pub enum Rx {
    Header { got: [u8; 3], n: usize },
    Body { lane: u8, left: usize },
}

impl Default for Rx {
    fn default() -> Self {
        Rx::Header { got: [0; 3], n: 0 }
    }
}

/// Parses frames from `piece` (plaintext, split anywhere): mux bytes into `out` from
/// `*out_n` on, bulk bytes to their lanes, credits into `lanes`. Returns the bytes of
/// `piece` used: fewer than all only once `out` is full.
///
/// `piece` lies at `base` in a buffer that stays put until the caller hands the bulk
/// bytes over: their places are added to `bulk` (a lane and a range of that buffer).
/// Without `base`, they are delivered at once.
#[allow(clippy::too_many_arguments)]
pub fn route(
    rx: &mut Rx,
    credit: &mut Vec<u8>,
    lanes: &mut Lanes,
    piece: &[u8],
    base: Option<usize>,
    bulk: &mut Vec<(u8, Range<usize>)>,
    out: &mut [u8],
    out_n: &mut usize,
) -> Result<usize, String> {
    let mut used = 0;
    while used < piece.len() {
        let rest = &piece[used..];
        match rx {
            Rx::Header { got, n } => {
                let take = (3 - *n).min(rest.len());
                got[*n..*n + take].copy_from_slice(&rest[..take]);
                *n += take;
                used += take;
                if *n == 3 {
                    let lane = got[0];
                    let len = u16::from_be_bytes([got[1], got[2]]) as usize;
                    if lane == CREDIT_LANE && len != CREDIT_BODY {
                        return Err(format!("a credit frame of {len} bytes"));
                    }
                    *rx = if len == 0 {
                        Rx::default()
                    } else {
                        Rx::Body { lane, left: len }
                    };
                }
            }
            Rx::Body { lane, left } => {
                let take = (*left).min(rest.len());
                match *lane {
                    MUX_LANE => {
                        let room = out.len() - *out_n;
                        if room == 0 {
                            return Ok(used);
                        }
                        let take = take.min(room);
                        out[*out_n..*out_n + take].copy_from_slice(&rest[..take]);
                        *out_n += take;
                        *left -= take;
                        used += take;
                    }
                    CREDIT_LANE => {
                        credit.extend_from_slice(&rest[..take]);
                        *left -= take;
                        used += take;
                        if *left == 0 {
                            let mut body = [0u8; CREDIT_BODY];
                            body.copy_from_slice(&credit[..CREDIT_BODY]);
                            credit.clear();
                            lanes.credit(&body);
                        }
                    }
                    k => {
                        if lanes.accept(k, take)? {
                            match base {
                                Some(b) => bulk.push((k, b + used..b + used + take)),
                                None => lanes.deliver(k, &[&rest[..take]]),
                            }
                        }
                        *left -= take;
                        used += take;
                    }
                }
                if *left == 0 {
                    *rx = Rx::default();
                }
            }
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pump::wire::frame_header;
    use std::io::Read;

    fn frame(lane: u8, body: &[u8]) -> Vec<u8> {
        let mut v = frame_header(lane, body.len()).to_vec();
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn frames_split_anywhere_reach_their_lanes_whole_and_in_order() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let ours = Arc::new(tokio::net::UnixStream::from_std(ours).expect("tokio"));
        let mut lanes = Lanes::default();
        lanes.open(3, ours, Arc::default()).expect("open");
        assert_eq!(lanes.take_grants().len(), 1, "the first window is granted");
        let mut stream = Vec::new();
        stream.extend(frame(MUX_LANE, b"hello "));
        stream.extend(frame(3, b"bulk one "));
        stream.extend(frame(CREDIT_LANE, &[7, 0, 0, 1, 0]));
        stream.extend(frame(MUX_LANE, b"world"));
        stream.extend(frame(3, b"bulk two"));
        for split in 1..stream.len() {
            let mut rx = Rx::default();
            let mut credit = Vec::new();
            let mut out = vec![0u8; 64];
            let mut n = 0;
            for piece in [&stream[..split], &stream[split..]] {
                let mut bulk = Vec::new();
                let used = route(
                    &mut rx,
                    &mut credit,
                    &mut lanes,
                    piece,
                    Some(0),
                    &mut bulk,
                    &mut out,
                    &mut n,
                )
                .expect("route");
                for (lane, r) in bulk {
                    lanes.deliver(lane, &[&piece[r]]);
                }
                assert_eq!(used, piece.len());
            }
            assert_eq!(&out[..n], b"hello world", "split at {split}");
        }
        let mut got = vec![0u8; 4096];
        let mut theirs = theirs;
        let n = theirs.read(&mut got).expect("read");
        let want = b"bulk one bulk two".repeat(stream.len() - 1);
        assert_eq!(&got[..n], &want[..n]);
        let Poll::Ready(credit) =
            lanes.poll_credit(&mut Context::from_waker(futures::task::noop_waker_ref()), 7)
        else {
            panic!("no credit on lane 7")
        };
        assert_eq!(credit, 256 * (stream.len() as u64 - 1));
    }

    #[tokio::test]
    async fn bytes_beyond_the_credit_or_on_a_lane_never_opened_are_refused() {
        let mut lanes = Lanes::default();
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let ours = Arc::new(tokio::net::UnixStream::from_std(ours).expect("tokio"));
        lanes.open(1, ours, Arc::default()).expect("open");
        // The reader takes nothing: the whole window is accepted, one byte more is not.
        let chunk = vec![7u8; 60_000];
        let mut rx = Rx::default();
        let (mut credit, mut out, mut n, mut bulk) = (Vec::new(), [0u8; 8], 0, Vec::new());
        let mut sent = 0u64;
        while sent < WINDOW {
            let len = chunk.len().min((WINDOW - sent) as usize);
            let f = frame(1, &chunk[..len]);
            route(
                &mut rx,
                &mut credit,
                &mut lanes,
                &f,
                None,
                &mut bulk,
                &mut out,
                &mut n,
            )
            .expect("within the window");
            sent += len as u64;
        }
        let err = route(
            &mut rx,
            &mut credit,
            &mut lanes,
            &frame(1, b"x"),
            None,
            &mut bulk,
            &mut out,
            &mut n,
        )
        .expect_err("beyond the window");
        assert!(err.contains("only 8388608 were allowed"), "{err}");
        let mut rx = Rx::default();
        let err = route(
            &mut rx,
            &mut credit,
            &mut lanes,
            &frame(9, b"x"),
            None,
            &mut bulk,
            &mut out,
            &mut n,
        )
        .expect_err("lane 9 was never opened");
        assert!(err.contains("never opened"), "{err}");
        let mut rx = Rx::default();
        let err = route(
            &mut rx,
            &mut credit,
            &mut lanes,
            &frame(CREDIT_LANE, &[1, 2]),
            None,
            &mut bulk,
            &mut out,
            &mut n,
        )
        .expect_err("short credit");
        assert!(err.contains("credit frame of 2 bytes"), "{err}");
    }

    #[tokio::test]
    async fn any_bytes_from_the_peer_end_in_frames_or_an_error_never_a_panic() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let ours = Arc::new(tokio::net::UnixStream::from_std(ours).expect("tokio"));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut lanes = Lanes::default();
            lanes.open(1, ours.clone(), Arc::default()).expect("open");
            lanes.open(2, ours.clone(), Arc::default()).expect("open");
            lanes.close(2);
            // Mostly well-formed headers on known lanes, with garbage lengths and bodies.
            let mut input = Vec::new();
            for _ in 0..(next() % 8) {
                let r = next();
                let lane = [0, 1, 2, 3, CREDIT_LANE][(r % 5) as usize];
                let len = ((r >> 8) % 40) as usize;
                input.extend_from_slice(&[lane, 0, (len as u8)]);
                input.extend((0..(r >> 16) % 48).map(|i| (i as u8) ^ (r as u8)));
            }
            let (mut rx, mut credit, mut bulk) = (Rx::default(), Vec::new(), Vec::new());
            let mut out = vec![0u8; (next() % 64) as usize + 1];
            let mut n = 0;
            let mut at = 0;
            while at < input.len() {
                let cut = (at + 1 + (next() % 17) as usize).min(input.len());
                let len = cut - at;
                match route(
                    &mut rx,
                    &mut credit,
                    &mut lanes,
                    &input[at..cut],
                    Some(at),
                    &mut bulk,
                    &mut out,
                    &mut n,
                ) {
                    Ok(used) => {
                        assert!(used <= len);
                        if used < len {
                            assert_eq!(n, out.len(), "stopped short with room left");
                            // The mux reader takes what was routed to it.
                            n = 0;
                        }
                        at += used;
                    }
                    Err(_) => break,
                }
            }
            for (_, r) in bulk {
                assert!(r.end <= input.len(), "{r:?} outside the input");
            }
        }
    }

    #[tokio::test]
    async fn a_starved_sender_gets_a_larger_window_only_while_the_reader_keeps_up() {
        let cx = &mut Context::from_waker(futures::task::noop_waker_ref());
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let ours = Arc::new(tokio::net::UnixStream::from_std(ours).expect("tokio"));
        let mut lanes = Lanes::default();
        // Sending on lane 5 with no credit: the peer is told once.
        assert!(lanes.poll_credit(cx, 5).is_pending());
        assert!(lanes.poll_credit(cx, 5).is_pending());
        assert_eq!(lanes.take_grants(), vec![[5, 0, 0, 0, 0]]);
        // Receiving on lane 1, whose reader took everything: the window doubles.
        lanes.open(1, ours, Arc::default()).expect("open");
        lanes.take_grants();
        lanes.credit(&[1, 0, 0, 0, 0]);
        let more = (WINDOW as u32).to_be_bytes();
        assert_eq!(
            lanes.take_grants(),
            vec![[1, more[0], more[1], more[2], more[3]]]
        );
        // A reader that stops: bytes wait in the overflow, and the window stays.
        let big = vec![1u8; 1 << 20];
        for _ in 0..12 {
            assert!(lanes.accept(1, big.len()).expect("within the window"));
            lanes.deliver(1, &[&big]);
        }
        assert!(!lanes.inn[&1].overflow.is_empty());
        let window = lanes.inn[&1].window;
        lanes.credit(&[1, 0, 0, 0, 0]);
        assert_eq!(lanes.inn[&1].window, window);
        // Up to the cap, however often it is asked while the reader keeps up.
        let mut sink = vec![0u8; 1 << 20];
        theirs.set_nonblocking(true).expect("nonblocking");
        while std::io::Read::read(&mut theirs, &mut sink).is_ok() {}
        lanes.inn.get_mut(&1).expect("lane").overflow.clear();
        for _ in 0..10 {
            lanes.credit(&[1, 0, 0, 0, 0]);
        }
        assert_eq!(lanes.inn[&1].window, MAX_WINDOW);
    }
}
