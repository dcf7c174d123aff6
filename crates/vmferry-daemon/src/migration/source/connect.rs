//! The source's data channel: `connect` makes it over one transport before QEMU sends a
//! byte (dialing, or waiting for the destination's reverse connections), with the peer
//! link beside it; `perform` then takes it complete.
//!
//! Nothing here touches QEMU: a channel that cannot be made fails while the guest is
//! untouched.

use super::*;

impl SourceMigration {
    /// QEMU's connections: the main channel, the multifd channels, and post-copy's
    /// preempt channel while it is used.
    pub(super) fn streams(&self) -> usize {
        1 + self.options.multifd as usize + usize::from(self.preempt.load(Ordering::SeqCst))
    }

    pub(super) fn trust(&self, cookie: &Cookie) -> Trust {
        Trust {
            auth: self.options.data_auth.clone(),
            peer_fingerprint: cookie.destination_fingerprint.clone(),
        }
    }

    /// `connect`: makes the data channel for one transport before QEMU sends a byte, so a
    /// channel that cannot be made fails while the guest is untouched. Whatever an
    /// earlier attempt left is dropped first; a failed attempt leaves nothing behind.
    pub fn connect(
        &self,
        daemon: &Daemon,
        cookie: &Cookie,
        transport: Transport,
        timeout: Duration,
    ) -> Result<()> {
        cookie.check()?;
        self.learn_destination(cookie);
        if !matches!(self.state(), SourceState::Begun | SourceState::Connected) {
            return Err(DaemonError::BadRequest(format!(
                "migration {} is already under way; its channel is fixed",
                self.id
            )));
        }
        self.make_channel(daemon, cookie, transport, timeout)?;
        self.advance(SourceEvent::Connect)?;
        Ok(())
    }

    pub(super) fn make_channel(
        &self,
        daemon: &Daemon,
        cookie: &Cookie,
        transport: Transport,
        timeout: Duration,
    ) -> Result<()> {
        *lock(&self.held) = Held::Nothing;
        // A preempt stream of the channel this one replaces is no longer ours to carry.
        *lock(&self.late) = None;
        *lock(&self.late_pump) = None;
        *lock(&self.reverse_config) = None;
        *lock(&self.peer_pending) = None;
        lock(&self.nbd_conns).clear();
        *lock(&self.nbd_slots) = Slots::default();
        // The destination may turn the preempt channel off (its QEMU lacks it, or speaks
        // another preempt protocol); it never turns it on.
        if !cookie.options.postcopy.is_some_and(|p| p.preempt) {
            self.preempt.store(false, Ordering::SeqCst);
        }
        let n = self.streams();
        let n16 =
            u16::try_from(n).map_err(|_| DaemonError::BadRequest("too many streams".into()))?;
        let trust = self.trust(cookie);
        let held = match transport {
            Transport::Direct => {
                let addr = cookie.data_address.clone().ok_or_else(|| {
                    DaemonError::BadRequest(
                        "the cookie names no data address for the destination".into(),
                    )
                })?;
                let cfg = trust.client_config(daemon, &self.identity, &addr, "destination")?;
                // The peer link first: a destination recovering a post-copy closes its door
                // once the streams are in.
                self.dial_peer(cookie, &addr, cfg.clone(), transport, n16, timeout)?;
                // The disks before the RAM streams: the destination's door closes once
                // those are complete.
                self.dial_disks(&addr, &cfg, transport, timeout)?;
                let mut slots = Slots::default();
                for k in 0..n16 {
                    let pre = Preamble {
                        transport,
                        stream: k,
                        streams: n16,
                        kind: StreamKind::Qemu,
                    };
                    let c = channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?;
                    slots.put(transport, &pre, n, c)?;
                }
                Held::Conns(slots)
            }
            Transport::Tunnel => {
                let addr = cookie.destination_control_address.clone().ok_or_else(|| {
                    DaemonError::BadRequest(
                        "the cookie names no control address for the destination to tunnel to"
                            .into(),
                    )
                })?;
                let cfg = trust.client_config(daemon, &self.identity, &addr, "destination")?;
                self.dial_peer(cookie, &addr, cfg.clone(), transport, n16, timeout)?;
                let pre = Preamble {
                    transport,
                    stream: 0,
                    streams: n16,
                    kind: StreamKind::Qemu,
                };
                let c = channel::dial(&self.id, &addr, cfg.clone(), pre, timeout)?;
                let t = Tunnel::client(c.conn, c.sock, &c.peer, self.meter.clone(), self.filters())
                    .map_err(|e| DaemonError::Channel(e.to_string()))?;
                *lock(&self.tunnel_stop) = Some(t.stop_handle());
                Held::Tunnel(t)
            }
            Transport::Reverse => {
                let cfg = trust.server_config(
                    daemon,
                    &self.identity,
                    "destination",
                    cookie.data_address.as_deref(),
                )?;
                *lock(&self.reverse_config) = Some(cfg);
                Held::Conns(Slots::default())
            }
        };
        *lock(&self.held) = held;
        Ok(())
    }

    /// Dials the peer link beside the streams, when the controller asked for one.
    pub(super) fn dial_peer(
        &self,
        cookie: &Cookie,
        addr: &str,
        cfg: Arc<rustls::ClientConfig>,
        transport: Transport,
        streams: u16,
        timeout: Duration,
    ) -> Result<()> {
        if !cookie.peer_link {
            return Ok(());
        }
        let pre = Preamble {
            transport,
            stream: 0,
            streams,
            kind: StreamKind::Peer,
        };
        *lock(&self.peer_pending) = Some(channel::dial(&self.id, addr, cfg, pre, timeout)?);
        Ok(())
    }

    /// Dials one NBD stream per copied disk (direct), held until QEMU's NBD clients
    /// connect.
    fn dial_disks(
        &self,
        addr: &str,
        cfg: &Arc<rustls::ClientConfig>,
        transport: Transport,
        timeout: Duration,
    ) -> Result<()> {
        let n = u16::try_from(self.disks.len())
            .map_err(|_| DaemonError::BadRequest("too many disks".into()))?;
        let mut conns = Vec::with_capacity(self.disks.len());
        for k in 0..n {
            let pre = Preamble {
                transport,
                stream: k,
                streams: n,
                kind: StreamKind::Nbd,
            };
            conns.push(channel::dial(&self.id, addr, cfg.clone(), pre, timeout)?);
        }
        *lock(&self.nbd_conns) = conns;
        Ok(())
    }

    /// Whether every disk's NBD connection is here: dialed (direct), or dialed by the
    /// destination (reverse).
    fn disks_arrived(&self) -> bool {
        self.disks.is_empty()
            || lock(&self.nbd_conns).len() == self.disks.len()
            || lock(&self.nbd_slots).complete()
    }

    /// The TLS configuration for a reverse data connection naming this migration, or
    /// `None` when none is expected.
    pub fn data_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let recovering = self.recovering.load(Ordering::SeqCst);
        if !matches!(self.state(), SourceState::Begun | SourceState::Connected) && !recovering {
            return None;
        }
        let cfg = lock(&self.reverse_config).clone()?;
        match &*lock(&self.held) {
            Held::Conns(s)
                if !s.complete() || lock(&self.peer_pending).is_none() || !self.disks_arrived() =>
            {
                Some(cfg)
            }
            _ => None,
        }
    }

    /// Takes one reverse data connection the destination dialed.
    pub fn accept_reverse(&self, pre: Preamble, c: DataConn) -> Result<()> {
        if pre.transport != Transport::Reverse {
            return Err(DaemonError::Denied(format!(
                "{} offered a {} stream to the source of migration {}; only reverse streams are taken here",
                c.peer, pre.transport, self.id
            )));
        }
        let n = self.streams();
        let mut held = lock(&self.held);
        match &mut *held {
            Held::Conns(_) if pre.kind == StreamKind::Nbd => {
                lock(&self.nbd_slots).put(Transport::Reverse, &pre, self.disks.len(), c)?
            }
            Held::Conns(_) if pre.kind == StreamKind::Peer => {
                let mut p = lock(&self.peer_pending);
                if p.is_some() {
                    return Err(DaemonError::Denied(format!(
                        "{} tried to open the peer link of migration {} a second time; refused",
                        c.peer, self.id
                    )));
                }
                *p = Some(c);
            }
            Held::Conns(slots) => slots.put(Transport::Reverse, &pre, n, c)?,
            _ => {
                return Err(DaemonError::Denied(format!(
                    "migration {} expects no reverse connection",
                    self.id
                )))
            }
        }
        self.held_changed.notify_all();
        Ok(())
    }

    /// The channel `connect` made, complete; waits a little for reverse connections.
    pub(super) fn take_carrier(
        &self,
        daemon: &Daemon,
        cookie: &Cookie,
    ) -> Result<(Transport, Carrier)> {
        if matches!(&*lock(&self.held), Held::Nothing) {
            // A controller that did not negotiate: dial direct as the spine did.
            self.make_channel(daemon, cookie, Transport::Direct, DIAL_TIMEOUT)?;
        }
        let deadline = Instant::now() + REVERSE_WAIT;
        let mut held = lock(&self.held);
        loop {
            match std::mem::take(&mut *held) {
                Held::Tunnel(t) => return Ok((Transport::Tunnel, Carrier::Tunnel(t))),
                Held::Conns(mut slots) => {
                    if slots.complete() && self.disks_arrived() {
                        if let Some((t, conns)) = slots.take_complete() {
                            *lock(&self.reverse_config) = None;
                            if let Some((_, nbd)) = lock(&self.nbd_slots).take_complete() {
                                *lock(&self.nbd_conns) = nbd;
                            }
                            return Ok((t, Carrier::Conns(conns)));
                        }
                    }
                    *held = Held::Conns(slots);
                }
                Held::Nothing => {
                    return Err(DaemonError::BadRequest(
                        "no data channel was made for this migration".into(),
                    ))
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DaemonError::Timeout(format!(
                    "the destination's reverse connections did not all arrive within {} s",
                    REVERSE_WAIT.as_secs()
                )));
            }
            held = match self.held_changed.wait_timeout(held, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}
