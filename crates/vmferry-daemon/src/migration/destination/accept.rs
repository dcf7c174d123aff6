//! The destination's data connections: the streams the source dials (direct, tunnel) or
//! we dial (reverse), handed to QEMU together and in order, and the peer link beside them.
//!
//! A connection is taken only for a prepared, unexpired migration, each stream slot once,
//! and none once the streams reached QEMU.

use super::*;
use vmferry_channel::tunnel::AcceptError;

/// Why this destination refuses a stream the source opened through the tunnel; the
/// source is told in these words.
#[derive(Debug, thiserror::Error)]
enum StreamRefused {
    #[error("stream {k} does not exist ({n} streams)")]
    NoSuchStream { k: u16, n: usize },
    #[error("cannot reach the incoming QEMU at {}: {source}", socket.display())]
    QemuUnreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A data stream that broke while carrying the migration.
#[derive(Debug, thiserror::Error)]
#[error("data stream {k} with {peer}: {source}")]
struct StreamFailed {
    k: usize,
    peer: String,
    #[source]
    source: vmferry_channel::pump::PumpError,
}

impl DestinationMigration {
    /// What this half tells the source over the peer link.
    pub(super) fn peer_message(&self) -> PeerMessage {
        PeerMessage {
            state: MigrationState::Destination(self.state()),
            cause: lock(&self.cause).clone(),
        }
    }

    /// Takes the peer link the source dialed (direct, tunnel) or we dialed (reverse).
    pub(super) fn start_peer(self: &Arc<Self>, daemon: &Arc<Daemon>, c: DataConn) -> Result<()> {
        let mut slot = lock(&self.peer);
        if self.recovering.load(Ordering::SeqCst) {
            // Each recovery try of the source starts with its peer link: whatever an
            // earlier try left (its link, the streams it got through) is replaced.
            if let Some(old) = slot.take() {
                old.stop();
            }
            lock(&self.streams).slots.clear();
        }
        if slot.is_some() {
            return Err(DaemonError::Denied(format!(
                "{}: migration {} already has its peer link; refused",
                c.peer, self.id
            )));
        }
        let link =
            PeerLink::for_half(c, &self.id, self, daemon, Self::peer_message, |m, d, ev| {
                m.on_peer(d, ev)
            })?;
        *slot = Some(link);
        Ok(())
    }

    /// What the source says: a source that rolled back means our QEMU will never get the
    /// rest, so tear down now rather than wait for the streams to time out.
    pub(super) fn on_peer(self: &Arc<Self>, daemon: &Arc<Daemon>, ev: PeerEvent) {
        match ev {
            PeerEvent::Message(PeerMessage {
                state: MigrationState::Source(SourceState::RolledBack),
                cause,
            }) if !self.state().is_final() && self.state() != DestinationState::Loaded => {
                let why = format!(
                    "the source rolled back{}",
                    cause.map(|c| format!(": {c}")).unwrap_or_default()
                );
                self.abort(daemon, &why);
            }
            PeerEvent::Message(_) => {}
            PeerEvent::Lost(why) if self.recovering.load(Ordering::SeqCst) => {
                // The link of a recovery try that did not get through: the door stays
                // open for the next try.
                tracing::info!(migration = %self.id, "post-copy recovery: {why}");
            }
            PeerEvent::Lost(why)
                if self.postcopy.load(Ordering::SeqCst) && !self.state().is_final() =>
            {
                // The guest runs here and needs the rest of its memory: get the channel
                // back rather than give up. One recovery at a time.
                if self.recovery_running.swap(true, Ordering::SeqCst) {
                    tracing::info!(migration = %self.id, "{why} (already recovering)");
                    return;
                }
                let me = self.clone();
                let d = daemon.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("recover-{}", &self.id.as_str()[..8]))
                    .spawn(move || {
                        if let Err(e) = me.recover(&d, &why) {
                            tracing::error!(migration = %me.id, "post-copy recovery: {e}");
                            *lock(&me.note) = Some(format!("post-copy recovery failed: {e}"));
                        }
                        me.recovery_running.store(false, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    self.recovery_running.store(false, Ordering::SeqCst);
                    tracing::error!(migration = %self.id, "cannot start recovery: {e}");
                }
            }
            PeerEvent::Lost(why) => {
                tracing::info!(migration = %self.id, "{why}");
            }
        }
    }

    /// Takes one authenticated data connection the source dialed: a direct stream (held
    /// until all have arrived, then handed to QEMU together) or the tunnel.
    pub fn accept_data(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        pre: Preamble,
        c: DataConn,
    ) -> Result<()> {
        match pre.kind {
            StreamKind::Peer => return self.start_peer(daemon, c),
            StreamKind::Nbd => return self.carry_nbd(&pre, c),
            StreamKind::Qemu => self.learn_source(&c.peer, true),
            StreamKind::Libvirt => {
                return Err(DaemonError::Denied(format!(
                    "{} offered a libvirt stream to migration {}, which is not a libvirt one",
                    c.peer, self.id
                )))
            }
        }
        match pre.transport {
            Transport::Direct => {
                let complete = {
                    let mut st = lock(&self.streams);
                    if st.attached {
                        return Err(DaemonError::Denied(format!(
                            "{}: migration {} already has its streams; refused",
                            c.peer, self.id
                        )));
                    }
                    st.slots.put(Transport::Direct, &pre, self.n_streams, c)?;
                    st.slots.take_complete()
                };
                match complete {
                    Some((t, conns)) => self.attach(daemon, t, conns),
                    None => Ok(()),
                }
            }
            Transport::Tunnel => self.accept_tunnel(daemon, pre, c),
            Transport::Reverse => Err(DaemonError::Denied(format!(
                "{} offered a reverse stream to the destination of migration {}; the destination dials those itself",
                c.peer, self.id
            ))),
        }
    }

    pub(super) fn accept_tunnel(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        pre: Preamble,
        c: DataConn,
    ) -> Result<()> {
        if usize::from(pre.streams) != self.n_streams {
            return Err(DaemonError::Channel(format!(
                "{} opened a tunnel for {} streams, but this migration has {}",
                c.peer, pre.streams, self.n_streams
            )));
        }
        {
            let mut st = lock(&self.streams);
            if st.attached {
                return Err(DaemonError::Denied(format!(
                    "{}: migration {} already has its streams; refused",
                    c.peer, self.id
                )));
            }
            st.slots.clear();
            st.attached = true;
            st.transport = Some(Transport::Tunnel);
        }
        let recovered = self.recovering.swap(false, Ordering::SeqCst);
        if !recovered {
            self.advance(DestinationEvent::Attach)?;
            self.count_start(daemon, Transport::Tunnel);
        }
        let socket = lock(&self.incoming_socket).clone();
        let n = self.n_streams;
        let nbd = self.nbd_socket.clone();
        let disks = self.n_disks;
        // Streams arrive in the order the source opened them, main channel first, which
        // is the order QEMU must see them in. Streams n.. are the disks' NBD connections.
        let accept = Box::new(
            move |k: u16| -> std::result::Result<UnixStream, AcceptError> {
                let k_ = usize::from(k);
                let socket = match &nbd {
                    Some(nbd) if (n..n + disks).contains(&k_) => nbd,
                    _ if k_ >= n => {
                        return Err(StreamRefused::NoSuchStream { k, n: n + disks }.into())
                    }
                    _ => &socket,
                };
                UnixStream::connect(socket).map_err(|source| {
                    StreamRefused::QemuUnreachable {
                        socket: socket.clone(),
                        source,
                    }
                    .into()
                })
            },
        );
        let t = Tunnel::server(
            c.conn,
            c.sock,
            &c.peer,
            self.meter.clone(),
            self.filters,
            accept,
        )
        .map_err(|e| DaemonError::Channel(e.to_string()))?;
        *lock(&self.tunnel_stop) = Some(t.stop_handle());
        *lock(&self.tunnel) = Some(t);
        tracing::info!(migration = %self.id, peer = %c.peer, "tunnel established");
        if recovered {
            return Ok(());
        }
        self.spawn_watcher(daemon)
    }

    /// `connect` for reverse: dials every stream to the source, then hands them to QEMU.
    pub fn connect_reverse(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        cookie: &Cookie,
        timeout: Duration,
    ) -> Result<()> {
        *lock(&self.reverse_cookie) = Some(cookie.clone());
        let addr = cookie.source_data_address.clone().ok_or_else(|| {
            DaemonError::BadRequest("the cookie names no data address for the source".into())
        })?;
        self.learn_source(&addr, false);
        {
            let mut st = lock(&self.streams);
            if st.attached {
                return Err(DaemonError::BadRequest(format!(
                    "migration {} already has its streams",
                    self.id
                )));
            }
            st.slots.clear();
        }
        let cfg = self
            .trust
            .client_config(daemon, &self.identity, &addr, "source")?;
        let n16 = u16::try_from(self.n_streams)
            .map_err(|_| DaemonError::BadRequest("too many streams".into()))?;
        // The peer link first, as the source dials it too: the other side closes its
        // door once the streams are complete.
        if cookie.peer_link {
            let pre = Preamble {
                transport: Transport::Reverse,
                stream: 0,
                streams: n16,
                kind: StreamKind::Peer,
            };
            let link = channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?;
            self.start_peer(daemon, link)?;
        }
        // The disks' NBD streams before the RAM streams, as the source dials them.
        let d16 = u16::try_from(self.n_disks)
            .map_err(|_| DaemonError::BadRequest("too many disks".into()))?;
        for k in 0..d16 {
            let pre = Preamble {
                transport: Transport::Reverse,
                stream: k,
                streams: d16,
                kind: StreamKind::Nbd,
            };
            let c = channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?;
            self.carry_nbd(&pre, c)?;
        }
        let mut conns = Vec::with_capacity(self.n_streams);
        for k in 0..n16 {
            let pre = Preamble {
                transport: Transport::Reverse,
                stream: k,
                streams: n16,
                kind: StreamKind::Qemu,
            };
            conns.push(channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?);
        }
        self.attach(daemon, Transport::Reverse, conns)
    }

    /// Connects every stream to QEMU, main channel first, and starts a pump for each.
    pub(super) fn attach(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        transport: Transport,
        conns: Vec<DataConn>,
    ) -> Result<()> {
        {
            let mut st = lock(&self.streams);
            if st.attached {
                return Err(DaemonError::Denied(format!(
                    "migration {} already has its streams",
                    self.id
                )));
            }
            st.attached = true;
            st.transport = Some(transport);
        }
        // A recovered post-copy only replaces its streams: the watcher still runs.
        let recovered = self.recovering.swap(false, Ordering::SeqCst);
        if !recovered {
            self.advance(DestinationEvent::Attach)?;
            self.count_start(daemon, transport);
        }
        if self.n_disks > 0 && !recovered {
            // The source QEMU starts only once the disks are copied, perhaps minutes from
            // now. QEMU 7.2 peeks each new migration connection's first bytes from its
            // main loop (measured: with multifd, its monitor and NBD server stood still
            // until then, so the disk copy could never finish): hand the streams over
            // once the source's first bytes are here.
            let me = self.clone();
            std::thread::Builder::new()
                .name(format!("ram-wait-{}", &self.id.as_str()[..8]))
                .spawn(move || {
                    let handed = me
                        .wait_first_bytes(&conns)
                        .and_then(|()| me.hand_to_qemu(conns, false));
                    if let Err(e) = handed {
                        if !me.state().is_final() {
                            me.record_end(Err(&e));
                        }
                    }
                })
                .map_err(|e| DaemonError::Internal(format!("cannot start a thread: {e}")))?;
        } else {
            self.hand_to_qemu(conns, recovered)?;
        }
        if recovered {
            return Ok(());
        }
        self.spawn_watcher(daemon)
    }

    /// Waits until the first stream (QEMU's main channel) has bytes from the source, or
    /// the migration ended.
    fn wait_first_bytes(&self, conns: &[DataConn]) -> Result<()> {
        let Some(first) = conns.first() else {
            return Ok(());
        };
        loop {
            if self.state().is_final() {
                return Err(DaemonError::Cancelled("the migration ended".into()));
            }
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&first.sock),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(250u16)) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(DaemonError::Channel(format!(
                        "waiting for the source's first bytes: {e}"
                    )))
                }
            }
        }
    }

    /// Connects every stream to QEMU, main channel first, and starts a pump for each.
    fn hand_to_qemu(self: &Arc<Self>, conns: Vec<DataConn>, recovered: bool) -> Result<()> {
        for (k, c) in conns.into_iter().enumerate() {
            let socket = lock(&self.incoming_socket).clone();
            let local = UnixStream::connect(&socket).map_err(|e| {
                DaemonError::Qemu(format!(
                    "cannot reach the incoming QEMU at {}: {e}",
                    socket.display()
                ))
            });
            let local = match local {
                Ok(l) => l,
                Err(e) => {
                    if recovered {
                        // The next recovery try gets the door again.
                        lock(&self.streams).attached = false;
                        self.recovering.store(true, Ordering::SeqCst);
                    } else {
                        self.record_end(Err(&e));
                    }
                    return Err(e);
                }
            };
            let stop = StopHandle::new(&local, &c.sock)
                .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
            lock(&self.stops).push(stop.clone());
            lock(&self.streams).running += 1;
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pump-dst-{k}"))
                .spawn(move || {
                    let DataConn { conn, sock, peer } = c;
                    let r = pump::pump_with(local, conn, sock, &peer, &me.meter, &stop, me.filters)
                        .map(|_| ())
                        .map_err(|source| StreamFailed { k, peer, source });
                    lock(&me.streams).running -= 1;
                    me.record_end(r);
                });
            if let Err(e) = spawned {
                lock(&self.streams).running -= 1;
                return Err(DaemonError::Internal(format!("cannot start pump: {e}")));
            }
        }
        tracing::info!(migration = %self.id, streams = self.n_streams, "data streams reached QEMU");
        Ok(())
    }

    /// Counts a stream that ended; the first failure is kept, in words, for the status.
    pub(super) fn record_end(&self, r: std::result::Result<(), impl std::fmt::Display>) {
        let mut st = lock(&self.streams);
        match r {
            Ok(()) => st.finished += 1,
            Err(e) => {
                if st.error.is_none() {
                    st.error = Some(e.to_string());
                }
            }
        }
        self.changed.notify_all();
    }
}
