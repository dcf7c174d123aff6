//! Post-copy recovery on the destination: when the peer link goes silent during post-copy,
//! the guest runs here with part of its memory still on the source. The destination cuts
//! the old streams (QEMU pauses: `postcopy-paused`), has QEMU listen on a fresh socket
//! (`migrate-recover`) and takes the source's new channel there — or, for the reverse
//! transport, dials it again — until the source resumes.
//!
//! It never tears the guest down: a failed recovery leaves QEMU paused for an operator.

use super::*;

/// How long QEMU gets to notice the cut streams.
const PAUSE_WAIT: Duration = Duration::from_secs(15);
/// How long a reverse destination keeps dialing the source.
const RECOVER_FOR: Duration = Duration::from_secs(300);

impl DestinationMigration {
    pub(super) fn recover(self: &Arc<Self>, daemon: &Arc<Daemon>, why: &str) -> Result<()> {
        tracing::warn!(migration = %self.id, "post-copy lost its link ({why}); recovering");
        *lock(&self.note) = Some(format!("post-copy paused: {why}; recovering"));
        for s in lock(&self.stops).drain(..) {
            s.stop();
        }
        if let Some(t) = lock(&self.tunnel_stop).take() {
            t.stop();
        }
        drop(lock(&self.tunnel).take());
        // Silenced now, but its slot is only freed once QEMU listens again (below), so
        // that no new link is taken before the new streams can be.
        if let Some(p) = lock(&self.peer).as_ref() {
            p.stop();
        }
        // QEMU listens on a fresh socket; it becomes the one streams are taken to only
        // once QEMU said yes.
        let path = {
            let sock = lock(&self.incoming_socket);
            let n = lock(&self.streams).recoveries + 1;
            let base = self.id.as_str();
            sock.with_file_name(format!("migrate-in-{base}-r{n}.sock"))
        };
        let _ = std::fs::remove_file(&path);
        let uri = format!("unix:{}", path.display());
        // Out of band, and without asking QEMU's state first (query-migrate is in-band,
        // and the main loop may be held by a vCPU waiting for a page): QEMU refuses
        // migrate-recover until it noticed the cut streams and paused, so ask again.
        let deadline = Instant::now() + PAUSE_WAIT;
        loop {
            match self.qemu.with_qmp(|q| q.migrate_recover(&uri)) {
                Ok(()) => break,
                Err(_) if self.state() != DestinationState::Receiving => {
                    return Ok(()); // post-copy completed (or ended) meanwhile
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(DaemonError::Qemu(format!(
                        "QEMU did not take migrate-recover within {} s of the broken link: {e}",
                        PAUSE_WAIT.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        {
            let mut sock = lock(&self.incoming_socket);
            let _ = std::fs::remove_file(&*sock);
            *sock = path;
        }
        let transport = {
            let mut st = lock(&self.streams);
            st.recoveries += 1;
            st.slots.clear();
            st.attached = false;
            st.error = None;
            st.transport
        };
        drop(lock(&self.peer).take());
        self.recovering.store(true, Ordering::SeqCst);
        tracing::info!(migration = %self.id, "post-copy: waiting for the source's new channel");
        if transport == Some(Transport::Reverse) {
            let cookie = lock(&self.reverse_cookie).clone().ok_or_else(|| {
                DaemonError::Internal("a reverse migration without its cookie".into())
            })?;
            let give_up = Instant::now() + RECOVER_FOR;
            let mut backoff = Duration::from_millis(500);
            loop {
                match self.connect_reverse(daemon, &cookie, Duration::from_secs(5)) {
                    Ok(()) => break,
                    Err(e) if Instant::now() < give_up => {
                        tracing::info!(migration = %self.id, "post-copy recovery: {e}");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(4));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}
