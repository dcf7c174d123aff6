//! Post-copy recovery on the source: when the link breaks during post-copy, both QEMUs
//! pause (`postcopy-paused`) with the guest's memory split between them. The source cuts
//! what is left of the old streams, makes the channel again over the same transport and
//! identities (retrying with back-off while the link is down), and resumes QEMU over it
//! (`migrate` with `resume`), the destination having run `migrate-recover`.
//!
//! It never rolls anything back: a post-copy either completes or, if a QEMU is gone, is
//! reported lost.

use super::*;

/// How long recovery keeps trying before the guest is given up as paused.
const RECOVER_FOR: Duration = Duration::from_secs(300);
/// How long QEMU gets to notice the cut streams.
const PAUSE_WAIT: Duration = Duration::from_secs(30);
/// How long recovery listens for the destination's word before it cuts the peer link:
/// a destination whose QEMU died says so a moment after the streams broke (it notices
/// by polling QEMU), and then there is nothing to recover.
const HEAR_GRACE: Duration = Duration::from_secs(5);
/// How long the destination may answer that it does not know the migration before
/// recovery gives up: briefly expected (its door opens only once its QEMU listens
/// again, after its own peer link went silent), for longer it means the destination
/// gave the migration up or its daemon restarted.
const UNKNOWN_FOR: Duration = Duration::from_secs(60);

impl SourceMigration {
    pub(super) fn recover(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        why: &str,
        attempt: u32,
    ) -> Result<(Running, UnixListener, PathBuf)> {
        tracing::warn!(migration = %self.id, "post-copy lost its link ({why}); recovering (attempt {attempt})");
        *lock(&self.note) = Some(format!(
            "post-copy paused: {why}; recovering (attempt {attempt})"
        ));
        self.hear_destination(HEAR_GRACE)?;
        // QEMU must see the break: cut what is left of the old streams (whose pumps'
        // endings no longer count).
        if let Some(p) = lock(&self.peer).take() {
            p.stop();
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        for s in lock(&self.stops).drain(..) {
            s.stop();
        }
        if let Some(t) = lock(&self.tunnel_stop).take() {
            t.stop();
        }
        *lock(&self.pump_error) = None;
        let info = self.qemu.wait_postcopy_pause(PAUSE_WAIT)?;
        match info.status {
            QemuMigrationStatus::Completed => {
                return Err(DaemonError::Internal(
                    "QEMU completed while the link was being recovered".into(),
                ))
            }
            QemuMigrationStatus::Failed => {
                return Err(DaemonError::Qemu(format!(
                    "post-copy failed: {}",
                    info.error_desc.unwrap_or_default()
                )))
            }
            _ => {}
        }
        let (cookie, transport) = lock(&self.performed)
            .clone()
            .ok_or_else(|| DaemonError::Internal("post-copy without a channel".into()))?;
        let give_up = Instant::now() + RECOVER_FOR;
        let mut backoff = Duration::from_millis(500);
        let mut try_no = 0u32;
        let mut unknown_since: Option<Instant> = None;
        loop {
            if let Some(p) = lock(&self.peer_failure).clone() {
                return Err(guest_lost(&p));
            }
            try_no += 1;
            *lock(&self.note) = Some(format!(
                "post-copy paused: {why}; recovering (attempt {attempt}, try {try_no})"
            ));
            self.recovering.store(true, Ordering::SeqCst);
            let made = self
                .make_channel(daemon, &cookie, transport, DIAL_TIMEOUT)
                .and_then(|()| self.take_carrier(daemon, &cookie));
            self.recovering.store(false, Ordering::SeqCst);
            match made {
                Ok((_, carrier)) => {
                    self.start_peer(daemon)?;
                    let path = self.socket_path.with_extension(format!("r{attempt}.sock"));
                    let _ = std::fs::remove_file(&path);
                    let listener = UnixListener::bind(&path).map_err(|e| {
                        DaemonError::Internal(format!("cannot listen on {}: {e}", path.display()))
                    })?;
                    let uri = format!("unix:{}", path.display());
                    self.qemu.with_qmp(|q| q.migrate_resume(&uri))?;
                    let running = match self.accept_and_carry(&listener, carrier) {
                        Ok(r) => r,
                        Err(e) => {
                            drop(listener);
                            let _ = std::fs::remove_file(&path);
                            return Err(e);
                        }
                    };
                    *lock(&self.pump_error) = None;
                    *lock(&self.note) = Some(format!(
                        "post-copy recovered after: {why} (attempt {attempt})"
                    ));
                    tracing::info!(migration = %self.id, "post-copy resumed over a new channel");
                    // Kept for a preempt channel QEMU opens later (`preempt`).
                    return Ok((running, listener, path));
                }
                Err(e) => {
                    tracing::info!(migration = %self.id, "post-copy recovery try {try_no}: {e}");
                    if unknown_here(&e) {
                        let since = *unknown_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > UNKNOWN_FOR {
                            return Err(DaemonError::Qemu(format!(
                                "post-copy cannot be recovered: for {} s the destination has \
                                 not known migration {} ({e}); it gave the migration up or \
                                 its daemon restarted, and the guest is lost to vmferry",
                                UNKNOWN_FOR.as_secs(),
                                self.id
                            )));
                        }
                    } else {
                        unknown_since = None;
                    }
                    if Instant::now() > give_up {
                        return Err(DaemonError::Timeout(format!(
                            "post-copy could not be recovered within {} s ({e}); both QEMUs \
                             hold the guest paused",
                            RECOVER_FOR.as_secs()
                        )));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(4));
                }
            }
        }
    }
}

impl SourceMigration {
    /// Waits up to `within` for the destination to say its half failed, while the peer
    /// link still runs: a failure it reports means the guest is lost, not the link.
    fn hear_destination(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = lock(&self.peer_failure).clone() {
                return Err(guest_lost(&p));
            }
            let listening = lock(&self.peer).as_ref().is_some_and(|p| p.alive());
            if !listening || Instant::now() > deadline {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The error for a post-copy whose destination half failed.
pub(super) fn guest_lost(cause: &str) -> DaemonError {
    DaemonError::Qemu(format!(
        "the guest is lost: {cause}, during post-copy, when part of the guest's memory was \
         only there; the source's copy is stale and is not resumed"
    ))
}

/// Whether a dial failed because the destination does not serve this migration's name
/// (the TLS alert `unrecognized_name`, as the channel crate words it).
fn unknown_here(e: &DaemonError) -> bool {
    e.to_string().contains("alert: UnrecognisedName")
}
