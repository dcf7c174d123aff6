//! Carrying libvirt's connections between the hosts.
//!
//! On the source, the daemon listens on the migration directory's three sockets
//! (`libvirt.sock`, `migrate.sock`, `nbd.sock`) and carries each connection libvirtd or
//! QEMU makes there to the destination, as it comes: over a TLS connection of its own
//! (direct) or as a stream of the migration's tunnel. On the destination, each stream is
//! connected to what it stands for: libvirtd's socket, or the socket libvirt made the
//! destination QEMU listen on. QEMU's RAM streams reach it in the order the source took
//! them (QEMU takes the first as its main channel).
//!
//! It never connects to anything but those three targets, never takes a stream of a
//! kind it does not know, and never waits without a deadline.

use crate::error::{DaemonError, Result};
use crate::migration::channel::{self, DataConn};
use crate::vms::lock;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmferry_channel::compress::Filters;
use vmferry_channel::meter::Meter;
use vmferry_channel::pump::{self, PumpError, StopHandle};
use vmferry_channel::tunnel::Tunnel;
use vmferry_proto::libvirt::{self as plan, LIBVIRT_SOCKET, MIGRATE_SOCKET, NBD_SOCKET};
use vmferry_proto::preamble::{Preamble, StreamKind};
use vmferry_proto::{MigrationId, Transport};

/// How long dialing one stream to the destination may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a destination target may take to appear (libvirt makes QEMU's sockets
/// during its prepare, which runs while the RPC stream is already carried).
const TARGET_WAIT: Duration = Duration::from_secs(30);
/// How often an idle acceptor looks at its stop flag.
const ACCEPT_POLL_MS: u16 = 100;

/// The three kinds of connection, with the socket each uses in the directory.
pub const KINDS: [(StreamKind, &str); 3] = [
    (StreamKind::Libvirt, LIBVIRT_SOCKET),
    (StreamKind::Qemu, MIGRATE_SOCKET),
    (StreamKind::Nbd, NBD_SOCKET),
];

pub fn kind_name(kind: StreamKind) -> &'static str {
    match kind {
        StreamKind::Libvirt => "libvirt RPC",
        StreamKind::Qemu => "RAM",
        StreamKind::Nbd => "disk (NBD)",
        StreamKind::Peer => "peer link",
    }
}

/// How the source reaches the destination for each stream.
pub enum Link {
    Direct {
        id: MigrationId,
        addr: String,
        config: Arc<rustls::ClientConfig>,
    },
    Tunnel(Arc<Tunnel>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Direct { addr, .. } => write!(f, "Direct({addr})"),
            Link::Tunnel(_) => write!(f, "Tunnel"),
        }
    }
}

/// What both ends keep of their running streams: the pumps to cut, the first failure.
#[derive(Debug, Default)]
pub struct Streams {
    stops: Mutex<Vec<StopHandle>>,
    error: Mutex<Option<String>>,
}

impl Streams {
    pub fn fail(&self, why: String) {
        tracing::warn!("libvirt migration stream failed: {why}");
        lock(&self.error).get_or_insert(why);
    }

    pub fn first_error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    pub fn cut(&self) {
        for s in lock(&self.stops).iter() {
            s.stop();
        }
    }

    /// Pumps one connection on a thread of its own; a failure is recorded.
    fn pump(
        self: &Arc<Self>,
        what: String,
        local: UnixStream,
        c: DataConn,
        meter: Arc<Meter>,
        filters: Filters,
    ) -> Result<()> {
        let stop = StopHandle::new(&local, &c.sock)
            .map_err(|e| DaemonError::Internal(format!("{what}: {e}")))?;
        lock(&self.stops).push(stop.clone());
        let streams = self.clone();
        std::thread::Builder::new()
            .name("libvirt-pump".into())
            .spawn(move || {
                let peer = c.peer.clone();
                let r = pump::pump_with(local, c.conn, c.sock, &peer, &meter, &stop, filters);
                // The stop handle holds the sockets too: whatever way the pump ended, the
                // local end must see it (libvirtd waits out its keepalive otherwise).
                stop.stop();
                match r {
                    Ok(_) | Err(PumpError::Stopped) => {}
                    Err(e) => streams.fail(format!("{what}: {e}")),
                }
            })
            .map(|_| ())
            .map_err(|e| DaemonError::Internal(format!("cannot start a pump: {e}")))
    }
}

/// The source's listeners: one acceptor thread per socket, until stopped.
#[derive(Debug)]
pub struct SourceRelay {
    stop: Arc<AtomicBool>,
    pub streams: Arc<Streams>,
    link: Arc<Link>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// How many connections of each kind came, in [`KINDS`]' order.
    counts: [Arc<AtomicU16>; 3],
    /// The directory the sockets are in (a connection to each wakes its acceptor).
    dir: PathBuf,
}

impl SourceRelay {
    /// Listens on the three sockets in `dir` (which must exist and hold none of them).
    pub fn start(
        dir: &Path,
        link: Link,
        meter: Arc<Meter>,
        filters: Filters,
    ) -> Result<SourceRelay> {
        let relay = SourceRelay {
            stop: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(Streams::default()),
            link: Arc::new(link),
            threads: Mutex::new(Vec::new()),
            counts: Default::default(),
            dir: dir.to_path_buf(),
        };
        for (i, (kind, name)) in KINDS.into_iter().enumerate() {
            let path = dir.join(name);
            let listener = UnixListener::bind(&path).map_err(|e| {
                DaemonError::Internal(format!("cannot listen on {}: {e}", path.display()))
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| DaemonError::Internal(format!("{}: {e}", path.display())))?;
            let acceptor = Acceptor {
                kind,
                listener,
                stop: relay.stop.clone(),
                streams: relay.streams.clone(),
                link: relay.link.clone(),
                meter: meter.clone(),
                filters,
                next: relay.counts[i].clone(),
            };
            let t = std::thread::Builder::new()
                .name("libvirt-accept".into())
                .spawn(move || acceptor.run())
                .map_err(|e| DaemonError::Internal(format!("cannot start an acceptor: {e}")))?;
            lock(&relay.threads).push(t);
        }
        Ok(relay)
    }

    /// Stops taking connections; with `cut`, also cuts every stream in flight.
    pub fn stop(&self, cut: bool) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes each acceptor at once (it would see the flag within its poll anyway).
        for (_, name) in KINDS {
            let _ = UnixStream::connect(self.dir.join(name));
        }
        for t in std::mem::take(&mut *lock(&self.threads)) {
            let _ = t.join();
        }
        if cut {
            self.streams.cut();
            if let Link::Tunnel(t) = &*self.link {
                t.stop();
            }
        }
    }

    /// How many connections of `kind` libvirt or QEMU made so far.
    pub fn connections(&self, kind: StreamKind) -> u16 {
        KINDS
            .iter()
            .position(|(k, _)| *k == kind)
            .map_or(0, |i| self.counts[i].load(Ordering::SeqCst))
    }

    /// The tunnel, if the streams ride one (to close it once everything ended).
    pub fn tunnel(&self) -> Option<Arc<Tunnel>> {
        match &*self.link {
            Link::Tunnel(t) => Some(t.clone()),
            Link::Direct { .. } => None,
        }
    }
}

struct Acceptor {
    kind: StreamKind,
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    streams: Arc<Streams>,
    link: Arc<Link>,
    meter: Arc<Meter>,
    filters: Filters,
    next: Arc<AtomicU16>,
}

impl Acceptor {
    fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((local, _)) => {
                    if self.stop.load(Ordering::SeqCst) {
                        return; // stop's own wake-up, or too late to carry
                    }
                    let k = self.next.fetch_add(1, Ordering::SeqCst);
                    if let Err(e) = self.carry(k, local) {
                        self.streams.fail(e.to_string());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(ACCEPT_POLL_MS));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.streams.fail(format!(
                        "accepting a {} connection: {e}",
                        kind_name(self.kind)
                    ));
                    return;
                }
            }
        }
    }

    /// Carries connection `k` of this kind to the destination. Dialing happens here, so
    /// connections of one kind leave in the order they came.
    fn carry(&self, k: u16, local: UnixStream) -> Result<()> {
        let what = format!("{} connection {k}", kind_name(self.kind));
        local
            .set_nonblocking(false)
            .map_err(|e| DaemonError::Internal(format!("{what}: {e}")))?;
        if k >= plan::MAX_CONNECTIONS {
            return Err(DaemonError::BadRequest(format!(
                "{what}: more connections than a migration may make"
            )));
        }
        match &*self.link {
            Link::Direct { id, addr, config } => {
                let pre = Preamble {
                    transport: Transport::Direct,
                    stream: k,
                    streams: k + 1,
                    kind: self.kind,
                };
                let c = channel::dial(id, addr, config.clone(), pre, DIAL_TIMEOUT)
                    .map_err(|e| DaemonError::Channel(format!("{what}: {e}")))?;
                self.streams
                    .pump(what, local, c, self.meter.clone(), self.filters)
            }
            Link::Tunnel(t) => {
                let sid = plan::tunnel_stream(self.kind, k)
                    .ok_or_else(|| DaemonError::Internal(format!("{what}: no tunnel stream id")))?;
                t.open(sid, local)
                    .map_err(|e| DaemonError::Channel(format!("{what}: {e}")))
            }
        }
    }
}

/// Where the destination connects each kind of stream.
#[derive(Debug, Clone)]
pub struct Targets {
    pub libvirt: PathBuf,
    pub dir: PathBuf,
}

/// The destination's side: connects streams to their targets, QEMU's in order.
#[derive(Debug)]
pub struct DestinationRelay {
    targets: Targets,
    pub streams: Arc<Streams>,
    /// The next RAM stream QEMU may see.
    next_qemu: Mutex<u16>,
    qemu_turn: Condvar,
}

impl DestinationRelay {
    pub fn new(targets: Targets) -> DestinationRelay {
        DestinationRelay {
            targets,
            streams: Arc::new(Streams::default()),
            next_qemu: Mutex::new(0),
            qemu_turn: Condvar::new(),
        }
    }

    /// Connects stream `k` of `kind` to its target (RAM streams in order), waiting up to
    /// [`TARGET_WAIT`] for the target to appear.
    pub fn connect(&self, kind: StreamKind, k: u16) -> Result<UnixStream> {
        let deadline = Instant::now() + TARGET_WAIT;
        let what = format!("{} connection {k}", kind_name(kind));
        let path = match kind {
            StreamKind::Libvirt => self.targets.libvirt.clone(),
            StreamKind::Qemu => self.targets.dir.join(MIGRATE_SOCKET),
            StreamKind::Nbd => self.targets.dir.join(NBD_SOCKET),
            StreamKind::Peer => {
                return Err(DaemonError::BadRequest(format!(
                    "{what}: the peer link goes to no socket"
                )))
            }
        };
        if kind == StreamKind::Qemu {
            let mut next = lock(&self.next_qemu);
            while *next != k {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(DaemonError::Timeout(format!(
                        "{what}: RAM stream {} never came before it",
                        *next
                    )));
                }
                next = match self.qemu_turn.wait_timeout(next, left) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
        }
        let local = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < deadline
                        && e.kind() != std::io::ErrorKind::PermissionDenied =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(DaemonError::Channel(format!(
                        "{what}: cannot connect to {}: {e}",
                        path.display()
                    )))
                }
            }
        };
        if kind == StreamKind::Qemu {
            *lock(&self.next_qemu) = k + 1;
            self.qemu_turn.notify_all();
        }
        Ok(local)
    }

    /// Takes a direct stream: connects it and pumps it.
    pub fn carry(
        self: &Arc<Self>,
        kind: StreamKind,
        k: u16,
        c: DataConn,
        meter: Arc<Meter>,
        filters: Filters,
    ) {
        let relay = self.clone();
        let spawned = std::thread::Builder::new()
            .name("libvirt-connect".into())
            .spawn(move || {
                let what = format!("{} connection {k}", kind_name(kind));
                let r = relay
                    .connect(kind, k)
                    .and_then(|local| relay.streams.pump(what, local, c, meter, filters));
                if let Err(e) = r {
                    relay.streams.fail(e.to_string());
                }
            });
        if let Err(e) = spawned {
            self.streams
                .fail(format!("cannot start a stream's thread: {e}"));
        }
    }
}
