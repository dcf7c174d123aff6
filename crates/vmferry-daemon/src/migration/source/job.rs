//! The source's background job: point QEMU at our unix socket, accept its connections,
//! carry each over the channel, and follow QEMU until the migration ends; a stream that
//! breaks, a cancel or a stall cancels QEMU's migration.
//!
//! It never resumes or stops the guest itself: failure goes through `fail`, success
//! waits for `confirm`.

use super::*;

/// How a watch ended without an error.
#[derive(Debug)]
pub(super) enum WatchEnd {
    Completed,
    /// Post-copy lost its link (the cause): recover it.
    LinkLost(String),
}

/// Why not everything QEMU sent reached the destination (noted, never fatal: QEMU has
/// completed by then).
#[derive(Debug, thiserror::Error)]
pub(super) enum DrainError {
    /// The first stream error, as the pumps recorded it.
    #[error("{0}")]
    Stream(String),
    #[error("the data streams did not drain within {} s", DRAIN_TIMEOUT.as_secs())]
    Timeout,
    #[error(transparent)]
    Tunnel(#[from] vmferry_channel::tunnel::TunnelError),
}

impl SourceMigration {
    pub(super) fn start(self: &Arc<Self>, daemon: &Arc<Daemon>, cookie: &Cookie) -> Result<()> {
        cookie.check()?;
        let (transport, carrier) = self.take_carrier(daemon, cookie)?;
        *lock(&self.performed) = Some((cookie.clone(), transport));
        record::started(daemon, Role::Source, transport);
        self.start_peer(daemon)?;
        {
            let mut st = lock(&self.status);
            st.streams = self.streams() as u32;
            st.transport = Some(transport);
            st.transport_notes = cookie.transport_notes.clone();
            st.data_path = daemon.data_path.clone();
            st.compression = self.options.compress.to_string();
        }

        let _ = std::fs::remove_file(&self.socket_path);
        let listener = UnixListener::bind(&self.socket_path).map_err(|e| {
            DaemonError::Internal(format!(
                "cannot listen on {}: {e}",
                self.socket_path.display()
            ))
        })?;

        let me = self.clone();
        let d = daemon.clone();
        if self.disks.is_empty() {
            self.start_qemu()?;
            std::thread::Builder::new()
                .name(format!("migrate-src-{}", &self.id.as_str()[..8]))
                .spawn(move || me.run(&d, listener, carrier))
                .map_err(|e| DaemonError::Internal(format!("cannot start migration job: {e}")))?;
            return Ok(());
        }
        // The disks first (minutes, perhaps): in the background, as the RAM migration.
        std::thread::Builder::new()
            .name(format!("migrate-src-{}", &self.id.as_str()[..8]))
            .spawn(move || {
                let copied = me.copy_disks(&carrier).and_then(|()| me.start_qemu());
                match copied {
                    Ok(()) => me.run(&d, listener, carrier),
                    Err(e) => {
                        if let Carrier::Tunnel(t) = &carrier {
                            t.stop();
                        }
                        drop(listener);
                        let _ = std::fs::remove_file(&me.socket_path);
                        me.fail(&e.to_string());
                        if me.lease.unattended() {
                            me.end(&d);
                        }
                    }
                }
            })
            .map_err(|e| DaemonError::Internal(format!("cannot start migration job: {e}")))?;
        Ok(())
    }

    /// Sets QEMU's capabilities and parameters and starts its migration into our socket.
    fn start_qemu(&self) -> Result<()> {
        let multifd = self.options.multifd;
        let bandwidth = if self.options.max_bandwidth == 0 {
            UNLIMITED_BANDWIDTH
        } else {
            self.options.max_bandwidth
        };
        let downtime = self.options.downtime_limit_ms;
        let auto_converge = self.options.auto_converge;
        let postcopy = self.options.postcopy.is_some();
        let capped = self.options.max_bandwidth != 0;
        let uri = format!("unix:{}", self.socket_path.display());
        let mut caps = vec![
            ("multifd", multifd > 0),
            ("auto-converge", auto_converge.is_some()),
            ("postcopy-ram", postcopy),
        ];
        if self.preempt_offered {
            caps.push((PREEMPT, self.preempt.load(Ordering::SeqCst)));
        }
        // A disk copy ends its mirrors at the switch-over (QEMU 2.11+); set either way,
        // so an earlier migration's setting does not linger in an attached QEMU.
        caps.push(("pause-before-switchover", !self.disks.is_empty()));
        self.qemu.with_qmp(|q| {
            q.migrate_set_capabilities(&caps)?;
            let mut params = serde_json::json!({ "max-bandwidth": bandwidth });
            if postcopy {
                // The operator's cap is the link's: it holds for post-copy too, which QEMU
                // otherwise leaves unlimited.
                params["max-postcopy-bandwidth"] =
                    serde_json::json!(if capped { bandwidth } else { 0 });
            }
            if multifd > 0 {
                params["multifd-channels"] = serde_json::json!(multifd);
            }
            if downtime > 0 {
                params["downtime-limit"] = serde_json::json!(downtime);
            }
            if let Some(ac) = auto_converge {
                params["cpu-throttle-initial"] = serde_json::json!(ac.initial);
                params["cpu-throttle-increment"] = serde_json::json!(ac.increment);
            }
            q.migrate_set_parameters(params)?;
            q.migrate(&uri)
        })?;
        self.started_qemu.store(true, Ordering::SeqCst);
        lock(&self.status).qemu_status = "setup".into();
        Ok(())
    }

    /// The background job: accept QEMU's connections, carry each, watch QEMU until the end.
    pub(super) fn run(
        self: Arc<Self>,
        daemon: &Arc<Daemon>,
        listener: UnixListener,
        carrier: Carrier,
    ) {
        let mut attempt = 0;
        let mut outcome = self.accept_and_carry(&listener, carrier);
        // The listener QEMU's next connection comes to: this one, or a recovery's.
        let mut recovered: Option<(UnixListener, PathBuf)> = None;
        let outcome = loop {
            let running = match outcome {
                Ok(r) => r,
                Err(e) => break Err(e),
            };
            let now_listening = recovered.as_ref().map_or(&listener, |(l, _)| l);
            let watched = self.watch(running.tunnel(), now_listening);
            match watched {
                Ok(WatchEnd::Completed) => break Ok(running),
                Ok(WatchEnd::LinkLost(why)) => {
                    // Post-copy: the guest runs on the destination and needs the rest of
                    // its memory from here; make the channel again and resume QEMU.
                    if let Running::Tunnel(t) = &running {
                        t.stop();
                    }
                    drop(running);
                    attempt += 1;
                    if let Some((_, path)) = recovered.take() {
                        let _ = std::fs::remove_file(path);
                    }
                    outcome = self.recover(daemon, &why, attempt).map(|(r, l, path)| {
                        recovered = Some((l, path));
                        r
                    });
                }
                Err(e) => {
                    if let Running::Tunnel(t) = &running {
                        t.stop();
                    }
                    break Err(e);
                }
            }
        };
        drop(listener);
        let _ = std::fs::remove_file(&self.socket_path);
        if let Some((_, path)) = recovered.take() {
            let _ = std::fs::remove_file(path);
        }
        match outcome {
            Ok(running) => {
                // A preempt channel QEMU never opened (no post-copy) ends cleanly.
                if let Err(e) = self.close_late(running.tunnel()) {
                    tracing::warn!(migration = %self.id, "closing the unused preempt stream: {e}");
                }
                // The mirrors ended at the switch-over; their NBD nodes go now, which
                // ends the NBD streams before the channel drains.
                self.clean_disks(false);
                if !self.disks.is_empty() {
                    *lock(&self.note) = Some(format!(
                        "{} disk(s) copied; the source's images stay where they were on this \
                         host",
                        self.disks.len()
                    ));
                }
                // QEMU has sent everything into our sockets; wait for the channel to hand
                // it all to the destination before calling it complete.
                // QEMU says it sent everything. Whether it all arrived is the destination
                // QEMU's to say (finish checks it); a stream that ends badly now is noted,
                // and never turns a migration QEMU completed into a failure here.
                if let Err(e) = self.drain(running) {
                    tracing::warn!(migration = %self.id, "after QEMU completed: {e}");
                }
                if let Err(e) = self.advance(SourceEvent::QemuCompleted) {
                    // Rolled back meanwhile (an expired lease, the destination aborting).
                    tracing::warn!(migration = %self.id, "{e}");
                    return;
                }
                let mut st = lock(&self.status);
                st.qemu_status = "completed".into();
                st.channel_bytes = self.meter.forward();
                st.wire_bytes = self.meter.wire_forward();
                st.finished = true;
                self.finished.notify_all();
            }
            Err(e) => {
                self.fail(&e.to_string());
                if self.lease.unattended() {
                    self.end(daemon);
                }
            }
        }
    }

    /// Waits until everything QEMU sent went out to the destination. Only our direction
    /// counts: the destination QEMU closes its ends when it is done, which may be after
    /// `finish`; the streams stay up until `confirm`.
    pub(super) fn drain(&self, running: Running) -> std::result::Result<(), DrainError> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        match running {
            Running::Pumps(pumps) => loop {
                let sent = {
                    let stops = lock(&self.stops);
                    stops
                        .iter()
                        .zip(&pumps)
                        .all(|(s, p)| s.forward_done() || p.is_finished())
                        && self.late_sent()
                };
                if sent {
                    return match lock(&self.pump_error).clone() {
                        Some(e) => Err(DrainError::Stream(e)),
                        None => Ok(()),
                    };
                }
                if Instant::now() >= deadline {
                    return Err(DrainError::Timeout);
                }
                std::thread::sleep(Duration::from_millis(5));
            },
            Running::Tunnel(t) => {
                let r = t.wait_for_streams(self.streams() + self.disks.len(), TUNNEL_DRAIN);
                *lock(&self.tunnel_keep) = Some(t);
                Ok(r?)
            }
        }
    }

    pub(super) fn accept_and_carry(
        self: &Arc<Self>,
        listener: &UnixListener,
        carrier: Carrier,
    ) -> Result<Running> {
        listener
            .set_nonblocking(true)
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let deadline = Instant::now() + QEMU_CONNECT_TIMEOUT;
        let n = self.streams();
        let (mut conns, tunnel) = match carrier {
            Carrier::Conns(c) => (c.into_iter(), None),
            Carrier::Tunnel(t) => (Vec::new().into_iter(), Some(t)),
        };
        // The preempt channel, the last stream, may come when post-copy starts: the
        // watch takes it then (`preempt`).
        let now = if self.preempt_comes_late() { n - 1 } else { n };
        let mut pumps = Vec::new();
        for k in 0..now {
            let local = loop {
                if self.cancel.load(Ordering::SeqCst) {
                    return Err(DaemonError::Cancelled(
                        "cancelled before QEMU connected".into(),
                    ));
                }
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(DaemonError::Internal(format!("accept: {e}"))),
                }
                // QEMU may fail before it connects (e.g. bad parameters): ask it.
                if let Ok(info) = self.qemu.with_qmp(|q| q.query_migrate()) {
                    if info.status == QemuMigrationStatus::Failed {
                        return Err(DaemonError::Qemu(format!(
                            "migration failed: {}",
                            info.error_desc.unwrap_or_else(|| "no reason given".into())
                        )));
                    }
                }
                if Instant::now() >= deadline {
                    return Err(DaemonError::Timeout(format!(
                        "QEMU opened {k} of its migration streams within {} s",
                        QEMU_CONNECT_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let _ = local.set_nonblocking(false);
            match &tunnel {
                Some(t) => {
                    let k16 = u16::try_from(k)
                        .map_err(|_| DaemonError::Internal("too many streams".into()))?;
                    t.open(k16, local)
                        .map_err(|e| DaemonError::Channel(e.to_string()))?;
                }
                None => {
                    let c = conns.next().ok_or_else(|| {
                        DaemonError::Internal(format!("no data connection for stream {k}"))
                    })?;
                    pumps.push(self.spawn_pump(k, local, c)?);
                }
            }
        }
        if now < n {
            let late = match &tunnel {
                Some(_) => preempt::LateStream::Tunnel(
                    u16::try_from(now)
                        .map_err(|_| DaemonError::Internal("too many streams".into()))?,
                ),
                None => preempt::LateStream::Conn(
                    now,
                    Box::new(conns.next().ok_or_else(|| {
                        DaemonError::Internal(format!("no data connection for stream {now}"))
                    })?),
                ),
            };
            *lock(&self.late) = Some(late);
        }
        Ok(match tunnel {
            Some(t) => Running::Tunnel(t),
            None => Running::Pumps(pumps),
        })
    }

    pub(super) fn filters(&self) -> Filters {
        Filters {
            compress: self.options.compress,
        }
    }

    pub(super) fn spawn_pump(
        self: &Arc<Self>,
        k: usize,
        local: UnixStream,
        stream: DataConn,
    ) -> Result<std::thread::JoinHandle<()>> {
        let DataConn { conn, sock, peer } = stream;
        let stop = StopHandle::new(&local, &sock)
            .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
        lock(&self.stops).push(stop.clone());
        let me = self.clone();
        let generation = self.generation.load(Ordering::SeqCst);
        std::thread::Builder::new()
            .name(format!("pump-src-{k}"))
            .spawn(move || {
                let r: std::result::Result<PumpStats, _> =
                    pump::pump_with(local, conn, sock, &peer, &me.meter, &stop, me.filters());
                let current = me.generation.load(Ordering::SeqCst) == generation;
                if let (Err(e), true) = (r, current) {
                    let mut pe = lock(&me.pump_error);
                    if pe.is_none() {
                        *pe = Some(format!("data stream {k}: {e}"));
                    }
                }
            })
            .map_err(|e| DaemonError::Internal(format!("cannot start pump: {e}")))
    }

    /// Polls QEMU until the migration ends; cancels QEMU's side if asked or if a stream
    /// broke.
    pub(super) fn watch(
        self: &Arc<Self>,
        tunnel: Option<&Tunnel>,
        listener: &UnixListener,
    ) -> Result<WatchEnd> {
        let _held = self.qemu.hold();
        let mut cancel_sent = false;
        let stall_after = self.options.stall_timeout();
        // What moved last, and when: bytes through QEMU and through the channel, or a
        // change of QEMU's status.
        let mut progress = (0u64, 0u64, String::new());
        let mut moved = Instant::now();
        let started = Instant::now();
        let mut postcopy_asked = false;
        let mut switched_disks = false;
        loop {
            // Rolled back meanwhile (the lease, a cancel before QEMU started): QEMU's
            // migration was ended by whoever did it, and the VM may be migrating again.
            if self.state().is_final() {
                return Err(DaemonError::Cancelled(
                    lock(&self.status)
                        .error
                        .clone()
                        .unwrap_or_else(|| "rolled back".into()),
                ));
            }
            if let Err(e) = self.accept_late(listener, tunnel) {
                lock(&self.pump_error).get_or_insert(e.to_string());
            }
            if let Some((_, Some(e))) = tunnel.map(|t| t.streams_done()) {
                let mut pe = lock(&self.pump_error);
                if pe.is_none() {
                    *pe = Some(e);
                }
            }
            let want_cancel =
                self.cancel.load(Ordering::SeqCst) || lock(&self.pump_error).is_some();
            if want_cancel && self.state() == SourceState::PostCopy {
                // A destination whose QEMU died cannot be resumed; any other break can.
                if lock(&self.peer_failure).is_some() || self.cancel.load(Ordering::SeqCst) {
                    return Err(self.postcopy_broken());
                }
                let why = lock(&self.pump_error)
                    .take()
                    .unwrap_or_else(|| "the link to the destination broke".into());
                return Ok(WatchEnd::LinkLost(why));
            }
            if want_cancel && !cancel_sent {
                let _ = self.qemu.with_qmp(|q| q.migrate_cancel());
                cancel_sent = true;
            }
            let info = match self.qemu.with_qmp(|q| q.query_migrate()) {
                Ok(info) => info,
                Err(e) => {
                    // Often how QEMU's death shows first: let `fail` see the exit.
                    let _ = self.qemu.exit_reason_within(Duration::from_secs(1));
                    return Err(e);
                }
            };
            {
                let mut st = lock(&self.status);
                st.qemu_status = info.status.as_str().to_string();
                if let Some(ram) = &info.ram {
                    st.ram_total = ram.total;
                    st.ram_transferred = ram.transferred;
                    st.ram_remaining = ram.remaining;
                    st.mbps = ram.mbps;
                    st.pass = ram.dirty_sync_count;
                    st.dirty_rate = ram.dirty_pages_rate.saturating_mul(ram.page_size.max(4096));
                }
                st.throttle_pct = info.cpu_throttle_percentage.unwrap_or(0);
                st.expected_downtime_ms = info.expected_downtime_ms;
                st.total_time_ms = info.total_time_ms.or(st.total_time_ms);
                st.downtime_ms = info.downtime_ms.or(st.downtime_ms);
                st.channel_bytes = self.meter.forward();
                st.wire_bytes = self.meter.wire_forward();
                let now = (st.ram_transferred, st.channel_bytes, st.qemu_status.clone());
                if now != progress {
                    progress = now;
                    moved = Instant::now();
                } else if moved.elapsed() > stall_after && !cancel_sent {
                    let peer = lock(&self.peer)
                        .as_ref()
                        .and_then(|p| p.last())
                        .map(|m| format!("the destination last said it was {}", m.state))
                        .unwrap_or_else(|| "no word from the destination".into());
                    lock(&self.pump_error).get_or_insert(format!(
                        "stalled: nothing moved for {} s (source QEMU '{}' after {} of RAM \
                         and {} bytes carried; {peer})",
                        stall_after.as_secs(),
                        st.qemu_status,
                        st.ram_transferred,
                        st.channel_bytes
                    ));
                }
            }
            // Post-copy: once the first full pass is done without converging (QEMU counts a
            // pass at its end), or after the time the operator gave.
            if let (Some(pc), false) = (self.options.postcopy, postcopy_asked) {
                let due = match pc.after_ms {
                    Some(ms) => started.elapsed() >= Duration::from_millis(ms),
                    None => info.ram.as_ref().is_some_and(|r| r.dirty_sync_count >= 2),
                };
                if due && info.status == QemuMigrationStatus::Active {
                    self.qemu.with_qmp(|q| q.migrate_start_postcopy())?;
                    postcopy_asked = true;
                    tracing::info!(migration = %self.id, "switching to post-copy");
                }
            }
            if info.status == QemuMigrationStatus::PreSwitchover && !switched_disks {
                switched_disks = true;
                self.switch_over_disks()?;
            }
            if info.status == QemuMigrationStatus::PostcopyActive
                && self.state() == SourceState::Performing
            {
                self.advance(SourceEvent::StartPostCopy)?;
            }
            match info.status {
                QemuMigrationStatus::Completed => return Ok(WatchEnd::Completed),
                QemuMigrationStatus::Failed => {
                    let pump = lock(&self.pump_error).clone();
                    let qemu = info.error_desc.unwrap_or_else(|| "no reason given".into());
                    return Err(DaemonError::Channel(match pump {
                        Some(p) => format!("{p} (QEMU: {qemu})"),
                        None => format!("QEMU reports the migration failed: {qemu}"),
                    }));
                }
                QemuMigrationStatus::Cancelled => {
                    return Err(match lock(&self.pump_error).clone() {
                        // A broken stream is usually how a failure on the destination
                        // looks from here: give its own word a moment to arrive (fail()
                        // prefers it).
                        Some(p) => {
                            self.await_peer_word(PEER_WORD_WAIT);
                            DaemonError::Channel(p)
                        }
                        None => DaemonError::Cancelled("cancelled on request".into()),
                    });
                }
                _ => {}
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits (at most `wait`) for the destination's own account of a failure, which
    /// usually follows a broken stream by a moment; returns it if it came.
    fn await_peer_word(&self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        while lock(&self.peer_failure).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        lock(&self.peer_failure).clone()
    }

    /// What a post-copy that broke means. Nothing can be cancelled once post-copy
    /// started: the guest runs on the destination with part of its memory here. If the
    /// destination says its QEMU died, the guest is gone; otherwise QEMU holds both
    /// halves paused.
    fn postcopy_broken(&self) -> DaemonError {
        if let Some(p) = self.await_peer_word(PEER_WORD_WAIT) {
            return super::recover::guest_lost(&p);
        }
        let why = lock(&self.pump_error)
            .clone()
            .unwrap_or_else(|| "the migration was interrupted".into());
        DaemonError::Channel(format!(
            "{why} during post-copy: the guest's memory is split between the hosts and QEMU \
             holds both halves paused (postcopy-paused) for an operator"
        ))
    }
}
