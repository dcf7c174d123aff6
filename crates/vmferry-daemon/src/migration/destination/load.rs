//! The destination while QEMU loads: the watcher that follows the incoming QEMU and tells
//! the source at once how it fares, `finish` (the controller's word) and the lease (the
//! daemons finishing alone).
//!
//! The guest is resumed only once QEMU reports it loaded the whole state.

use super::*;

impl DestinationMigration {
    /// Starts the watcher: it follows the incoming QEMU until it has loaded the whole
    /// state or failed, and tells the source at once either way.
    pub(super) fn spawn_watcher(self: &Arc<Self>, daemon: &Arc<Daemon>) -> Result<()> {
        let me = self.clone();
        let d = daemon.clone();
        std::thread::Builder::new()
            .name(format!("migrate-dst-{}", &self.id.as_str()[..8]))
            .spawn(move || me.watch(&d))
            .map(|_| ())
            .map_err(|e| DaemonError::Internal(format!("cannot start the watcher: {e}")))
    }

    pub(super) fn watch(self: Arc<Self>, daemon: &Daemon) {
        match self.wait_loaded() {
            Ok(()) => {
                if self.advance(DestinationEvent::QemuLoaded).is_err() {
                    return; // aborted meanwhile
                }
                tracing::info!(migration = %self.id, "the destination QEMU holds the whole state");
                // With a controller, `finish` resumes; without one, we do, as soon as
                // the migration is unattended (detached, or its lease ran out).
                loop {
                    if self.state() != DestinationState::Loaded {
                        return;
                    }
                    if self.lease.unattended() {
                        let how = if self.lease.detached() {
                            "detached: the destination finished on its own".to_string()
                        } else {
                            format!(
                                "the controller's lease ({} s) expired after the destination \
                                 loaded the whole state; it finished on its own",
                                self.lease.secs()
                            )
                        };
                        match self.resume(daemon) {
                            Ok(_) => *lock(&self.note) = Some(how),
                            Err(e) => self.abort(daemon, &e.to_string()),
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) => {
                if !self.state().is_final() {
                    self.abort(daemon, &e.to_string());
                }
            }
        }
    }

    /// Waits until QEMU loaded the whole state. QEMU is the authority on that: a stream
    /// that breaks at the very end (QEMU 7.2 closes or resets multifd sockets once it has
    /// what it needs) must not fail a migration QEMU completed; one that breaks before
    /// fails it, once QEMU has had a moment to say so itself.
    pub(super) fn wait_loaded(&self) -> Result<()> {
        // No fixed deadline: a large guest over a slow link loads for as long as it
        // takes (the controller's --timeout and the source decide how long that may
        // be); a load where nothing moves fails after the stall timeout.
        let mut moved = Instant::now();
        let mut seen = (0u64, String::new());
        let mut broken_since: Option<(Instant, String)> = None;
        let _held = self.qemu.hold();
        // Once post-copy started the guest lives here with part of its memory still on
        // the source: nothing here may tear it down on a broken stream or a deadline
        // (QEMU pauses it, postcopy-paused, and it can be recovered).
        let mut postcopy = false;
        loop {
            if self.state().is_final() {
                return Err(DaemonError::Cancelled(
                    lock(&self.cause)
                        .clone()
                        .unwrap_or_else(|| "aborted".into()),
                ));
            }
            let stream_error = lock(&self.streams)
                .error
                .clone()
                .or_else(|| lock(&self.tunnel).as_ref().and_then(|t| t.streams_done().1));
            if let (Some(e), None) = (&stream_error, &broken_since) {
                broken_since = Some((Instant::now(), e.clone()));
            }
            // Where post-copy may happen, never long in QMP's lock (recovery needs it for
            // migrate-recover), and a busy main loop is no reason to give up.
            let polled = if self.may_postcopy {
                self.qemu.query_migrate_within(BUSY_WAIT)
            } else {
                self.qemu.with_qmp(|q| q.query_migrate()).map(Some)
            };
            let info = match polled {
                Ok(Some(info)) => info,
                Ok(None) if postcopy => {
                    *lock(&self.note) = Some(
                        "post-copy: the guest waits for pages from the source (QEMU's main \
                         loop is busy)"
                            .into(),
                    );
                    continue;
                }
                Ok(None) if moved.elapsed() > self.stall_after => {
                    return Err(DaemonError::Timeout(format!(
                        "the destination QEMU answered nothing for {} s",
                        self.stall_after.as_secs()
                    )))
                }
                Ok(None) => continue,
                Err(e) => return Err(self.qemu_gone(e)),
            };
            if !postcopy
                && matches!(
                    info.status,
                    QemuMigrationStatus::PostcopyActive
                        | QemuMigrationStatus::PostcopyPaused
                        | QemuMigrationStatus::PostcopyRecover
                )
            {
                postcopy = true;
                self.postcopy.store(true, Ordering::SeqCst);
                *lock(&self.note) = Some("post-copy: the guest runs here".into());
                if self.source_running {
                    // During an incoming migration `cont` only says "run once you can":
                    // QEMU starts the guest as soon as post-copy lets it. A busy main loop
                    // (a vCPU waiting for a page) answers later: never a reason to give
                    // the guest up.
                    if !self.qemu.cont_within(BUSY_WAIT)? {
                        tracing::info!(migration = %self.id, "post-copy: cont is queued behind QEMU's busy main loop");
                    }
                }
                tracing::info!(migration = %self.id, "post-copy: the guest runs on the destination");
            }
            if postcopy {
                if info.status == QemuMigrationStatus::Completed {
                    return Ok(());
                }
                std::thread::sleep(POLL * 10);
                continue;
            }
            match info.status {
                QemuMigrationStatus::Completed => return Ok(()),
                QemuMigrationStatus::Failed | QemuMigrationStatus::Cancelled => {
                    let qemu = info.error_desc.unwrap_or_else(|| "no reason given".into());
                    return Err(DaemonError::Qemu(match &broken_since {
                        Some((_, e)) => {
                            format!("the destination QEMU failed to load the state: {qemu} ({e})")
                        }
                        None => format!("the destination QEMU failed to load the state: {qemu}"),
                    }));
                }
                _ => {}
            }
            if let Some((since, e)) = &broken_since {
                if since.elapsed() > BROKEN_GRACE {
                    return Err(DaemonError::Channel(e.clone()));
                }
            }
            // The disk copy counts as movement: it runs before the RAM moves.
            let now = (
                self.meter.forward()
                    + self.meter.backward()
                    + self.disk_meter.forward()
                    + self.disk_meter.backward(),
                info.status.as_str().to_string(),
            );
            if now != seen {
                seen = now;
                moved = Instant::now();
            } else if moved.elapsed() > self.stall_after {
                return Err(DaemonError::Timeout(format!(
                    "nothing reached the destination QEMU for {} s (status {}, {} bytes \
                     received)",
                    self.stall_after.as_secs(),
                    info.status.as_str(),
                    seen.0
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The error for a QEMU that stopped answering: for a managed one, how it exited and
    /// the end of its stderr (where QEMU says why a load failed).
    pub(super) fn qemu_gone(&self, e: DaemonError) -> DaemonError {
        // Give the process a moment to be reaped so its exit status is known.
        match self.qemu.exit_reason_within(Duration::from_secs(1)) {
            Some(why) => DaemonError::Qemu(format!(
                "the destination QEMU exited during the migration: {why}"
            )),
            None => DaemonError::Qemu(format!(
                "the destination QEMU stopped answering during the migration: {e}"
            )),
        }
    }

    /// `finish`: waits until QEMU loaded the whole state, then resumes the guest if it ran
    /// on the source.
    pub fn finish(&self, daemon: &Daemon) -> Result<MigrationStatus> {
        let deadline = Instant::now() + LOAD_TIMEOUT + BROKEN_GRACE;
        let mut st = lock(&self.state);
        loop {
            match *st {
                DestinationState::Loaded => break,
                DestinationState::Finished => {
                    drop(st);
                    return Ok(self.finished_status());
                }
                DestinationState::Aborted => {
                    let cause = lock(&self.cause).clone().unwrap_or_default();
                    return Err(DaemonError::Qemu(cause));
                }
                DestinationState::Prepared => {
                    return Err(DaemonError::BadRequest(format!(
                        "migration {} never got its streams",
                        self.id
                    )))
                }
                DestinationState::Receiving => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DaemonError::Timeout(format!(
                    "the destination QEMU had not loaded the state after {} s",
                    LOAD_TIMEOUT.as_secs()
                )));
            }
            st = match self.state_changed.wait_timeout(st, left.min(POLL * 20)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(st);
        self.resume(daemon)
    }

    /// Ends the streams (QEMU needs nothing more from them), resumes the guest if it ran
    /// on the source, and leaves the migration finished.
    pub(super) fn resume(&self, daemon: &Daemon) -> Result<MigrationStatus> {
        // QEMU completed; the streams end when the source closes its side. Whatever
        // happens to them now cannot take anything from QEMU: note it, and go on.
        let tunnel = lock(&self.tunnel).take();
        if let Some(t) = tunnel {
            if let Err(e) = t.wait_for_streams(self.n_streams, DRAIN_TIMEOUT) {
                tracing::warn!(migration = %self.id, "after QEMU completed: {e}");
            }
            if let Err(e) = t.close(DRAIN_TIMEOUT) {
                tracing::warn!(migration = %self.id, "tunnel did not close cleanly: {e}");
            }
        }
        let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let st = lock(&self.streams);
            if st.running == 0 || Instant::now() >= drain_deadline {
                if let Some(e) = &st.error {
                    tracing::warn!(migration = %self.id, "after QEMU completed: {e}");
                }
                break;
            }
            drop(st);
            std::thread::sleep(POLL);
        }
        for s in lock(&self.stops).iter() {
            s.stop();
        }
        // The copied disks are the guest's own now: no export may stay.
        self.stop_nbd();
        let status = self.qemu.with_qmp(|q| q.query_status())?;
        if self.source_running && !status.running {
            self.qemu.with_qmp(|q| q.cont())?;
        }
        let status = self.qemu.with_qmp(|q| q.query_status())?;
        self.advance(DestinationEvent::Resume)?;
        // The guest is this host's now: a restarted daemon adopts it.
        if let Some(n) = &self.vm_name {
            daemon.vms.settled(n);
        }
        self.end(daemon);
        tracing::info!(migration = %self.id, state = %status.status, "migration finished on the destination");
        Ok(self.finished_status())
    }

    pub(super) fn finished_status(&self) -> MigrationStatus {
        MigrationStatus {
            state: Some(MigrationState::Destination(self.state())),
            qemu_status: "completed".into(),
            finished: true,
            channel_bytes: self.meter.forward() + self.meter.backward(),
            transport: lock(&self.streams).transport,
            note: lock(&self.note).clone(),
            ..Default::default()
        }
    }

    /// Renews the lease (a controller's `status` with `renew`).
    pub fn renew(&self) {
        self.lease.renew();
    }

    pub fn detach(&self) {
        self.lease.detach();
    }

    /// Acts on an expired lease: a destination that never got its streams is torn down;
    /// one receiving waits for its QEMU to say (the watcher finishes or aborts).
    pub fn check_lease(&self, daemon: &Daemon) {
        if !self.lease.take_expired() {
            return;
        }
        match self.state().on_lease_expiry() {
            vmferry_proto::LeaseAction::RollBack => self.abort(
                daemon,
                &format!(
                    "the controller's lease ({} s) expired before the streams arrived",
                    self.lease.secs()
                ),
            ),
            vmferry_proto::LeaseAction::FinishAlone => {
                tracing::warn!(migration = %self.id, "the controller's lease expired; the destination carries on alone");
            }
            vmferry_proto::LeaseAction::Nothing => {}
        }
    }
}
