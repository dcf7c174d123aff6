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

impl SourceMigration {
    pub(super) fn recover(
        self: &Arc<Self>,
        daemon: &Arc<Daemon>,
        why: &str,
        attempt: u32,
    ) -> Result<Running> {
        tracing::warn!(migration = %self.id, "post-copy lost its link ({why}); recovering (attempt {attempt})");
        *lock(&self.note) = Some(format!(
            "post-copy paused: {why}; recovering (attempt {attempt})"
        ));
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
        loop {
            if let Some(p) = lock(&self.peer_failure).clone() {
                return Err(DaemonError::Qemu(format!(
                    "the guest is lost: {p}, during post-copy"
                )));
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
                    let running = self.accept_and_carry(&listener, carrier);
                    drop(listener);
                    let _ = std::fs::remove_file(&path);
                    *lock(&self.pump_error) = None;
                    *lock(&self.note) = Some(format!(
                        "post-copy recovered after: {why} (attempt {attempt})"
                    ));
                    tracing::info!(migration = %self.id, "post-copy resumed over a new channel");
                    return running;
                }
                Err(e) => {
                    tracing::info!(migration = %self.id, "post-copy recovery try {try_no}: {e}");
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
