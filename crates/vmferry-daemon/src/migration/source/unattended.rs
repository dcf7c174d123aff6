//! The source without its controller: the peer link (what the destination says), the
//! lease (what to do when the controller is gone) and `detach`.
//!
//! After the switch-over it stops the source QEMU only on the destination's word that the
//! guest runs there, and resumes it only on its word that it aborted.

use super::*;

impl SourceMigration {
    pub(super) fn peer_message(&self) -> PeerMessage {
        PeerMessage {
            state: MigrationState::Source(self.state()),
            cause: lock(&self.status).error.clone(),
        }
    }

    /// Starts the peer link made by `connect`, if the controller asked for one.
    pub(super) fn start_peer(self: &Arc<Self>, daemon: &Arc<Daemon>) -> Result<()> {
        let Some(c) = lock(&self.peer_pending).take() else {
            return Ok(());
        };
        let link =
            PeerLink::for_half(c, &self.id, self, daemon, Self::peer_message, |m, d, ev| {
                m.on_peer(d, ev)
            })?;
        *lock(&self.peer) = Some(link);
        Ok(())
    }

    /// What the destination says. Its failure stops our QEMU's migration at once, with
    /// its cause; its success lets an unattended source stop its QEMU.
    pub(super) fn on_peer(&self, daemon: &Daemon, ev: PeerEvent) {
        let state = self.state();
        match ev {
            PeerEvent::Message(PeerMessage {
                state: MigrationState::Destination(DestinationState::Aborted),
                cause,
            }) => {
                let cause = cause.unwrap_or_else(|| "no reason given".into());
                lock(&self.peer_failure).get_or_insert(format!("the destination gave up: {cause}"));
                if state == SourceState::Completed {
                    self.fail(&format!(
                        "the destination aborted after the source sent everything: {cause}"
                    ));
                    if self.lease.unattended() {
                        self.end(daemon);
                    }
                } else if state.before_switchover() {
                    self.cancel.store(true, Ordering::SeqCst);
                }
            }
            PeerEvent::Message(PeerMessage {
                state: MigrationState::Destination(DestinationState::Finished),
                ..
            }) if state == SourceState::Completed && self.lease.unattended() => {
                self.confirm_alone(daemon);
            }
            PeerEvent::Message(_) => {}
            PeerEvent::Lost(why) if state == SourceState::PostCopy => {
                // The watch takes it from here: post-copy recovers its link.
                lock(&self.pump_error).get_or_insert(why);
            }
            PeerEvent::Lost(why) => {
                if state == SourceState::Performing {
                    lock(&self.peer_failure).get_or_insert(why);
                    self.cancel.store(true, Ordering::SeqCst);
                } else {
                    tracing::info!(migration = %self.id, "{why}");
                }
            }
        }
    }

    /// Stops the source QEMU once the destination runs the guest, with no controller.
    pub(super) fn confirm_alone(&self, daemon: &Daemon) {
        let how = if self.lease.detached() {
            "detached: the daemons finished the migration on their own".to_string()
        } else {
            format!(
                "the controller's lease ({} s) expired after the switch-over; the daemons \
                 finished the migration on their own",
                self.lease.secs()
            )
        };
        *lock(&self.note) = Some(how);
        if let Err(e) = self.confirm(daemon, true) {
            tracing::error!(migration = %self.id, "cannot finish alone: {e}");
        }
    }

    /// Renews the lease (a controller's `status` with `renew`).
    pub fn renew(&self) {
        self.lease.renew();
    }

    pub fn detach(&self) {
        self.lease.detach();
    }

    /// Acts on an expired lease by the state the source is in; removes an unattended
    /// migration that is over.
    pub fn check_lease(&self, daemon: &Daemon) {
        if self.lease.take_expired() {
            match self.state().on_lease_expiry() {
                LeaseAction::RollBack => {
                    *lock(&self.note) = Some(format!(
                        "the controller's lease ({} s) expired before the switch-over; \
                         rolled back: the source VM keeps running",
                        self.lease.secs()
                    ));
                    self.cancel.store(true, Ordering::SeqCst);
                    self.fail("the controller went away (its lease expired)");
                }
                LeaseAction::FinishAlone => {
                    let last = lock(&self.peer).as_ref().and_then(|p| p.last());
                    match last.map(|m| m.state) {
                        Some(MigrationState::Destination(DestinationState::Finished)) => {
                            self.confirm_alone(daemon)
                        }
                        _ => {
                            *lock(&self.note) = Some(
                                "the controller's lease expired after the switch-over; \
                                 waiting for the destination to resume the guest"
                                    .into(),
                            );
                            tracing::warn!(migration = %self.id, "lease expired after the switch-over; waiting for the destination");
                        }
                    }
                }
                LeaseAction::Nothing => {}
            }
        }
        if self.state().is_final() && self.lease.unattended() {
            self.end(daemon);
        }
    }

    /// `cancel`, from any authorized controller: before the switch-over the source
    /// guest keeps running (returns once it does) and the destination hears it over the
    /// peer link; after the switch-over the guest belongs to the destination: refused.
    pub fn cancel(&self, daemon: &Daemon, who: &str) -> Result<()> {
        let state = self.state();
        if !state.before_switchover() {
            return Err(DaemonError::BadRequest(format!(
                "migration {} cannot be cancelled: it is {state}, past the switch-over",
                self.id
            )));
        }
        let why = format!("cancelled by {who}");
        lock(&self.peer_failure).get_or_insert(why.clone());
        *lock(&self.note) = Some(why.clone());
        self.cancel.store(true, Ordering::SeqCst);
        if state != SourceState::Performing {
            // No job runs yet to notice the flag.
            self.fail(&why);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.state().is_final() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.lease.unattended() {
            self.end(daemon);
        }
        match self.state() {
            SourceState::RolledBack => Ok(()),
            other => Err(DaemonError::Timeout(format!(
                "migration {} is still {other} 15 s after the cancel",
                self.id
            ))),
        }
    }
}
