//! Post-copy's preempt channel when QEMU opens it late. QEMU 8.0 and newer connect that
//! channel when post-copy starts (QEMU 5655aab079; at the start only on pc-*-7.2 and older
//! machine types, as 7.x does), long after the job took the other streams. Its data
//! connection is made with the others, and the destination hands it to its QEMU as
//! usual (QEMU takes a preempt channel whenever it comes); here the job looks for QEMU's
//! connection on every turn of its watch and carries it once it is there. A migration
//! that ends without post-copy closes the unused stream as QEMU closes one it used.
//!
//! It must never block the watch (accepting is a nonblocking look at the listener) and
//! never carry a stream of a channel that recovery replaced.

use super::*;

/// The preempt stream's carrier, kept until QEMU connects.
#[derive(Debug)]
pub(super) enum LateStream {
    /// Direct or reverse: stream `k`'s own TLS connection.
    Conn(usize, Box<DataConn>),
    /// Tunnel: stream `k` of the tunnel, opened once QEMU connects.
    Tunnel(u16),
}

impl SourceMigration {
    /// Whether QEMU may connect its preempt channel after the job took the other streams.
    pub(super) fn preempt_comes_late(&self) -> bool {
        self.preempt_late && self.preempt.load(Ordering::SeqCst)
    }

    /// Takes QEMU's preempt connection if it came; nothing if none is awaited.
    pub(super) fn accept_late(
        self: &Arc<Self>,
        listener: &UnixListener,
        tunnel: Option<&Tunnel>,
    ) -> Result<()> {
        if lock(&self.late).is_none() {
            return Ok(());
        }
        match listener.accept() {
            Ok((local, _)) => {
                tracing::info!(migration = %self.id, "QEMU opened post-copy's preempt channel");
                self.carry_late(local, tunnel)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(DaemonError::Internal(format!(
                "accepting QEMU's preempt channel: {e}"
            ))),
        }
    }

    /// Ends a preempt stream QEMU never opened (the migration completed without
    /// post-copy): it is carried with a local side that has already ended, so both ends
    /// see it close cleanly.
    pub(super) fn close_late(self: &Arc<Self>, tunnel: Option<&Tunnel>) -> Result<()> {
        if lock(&self.late).is_none() {
            return Ok(());
        }
        let (local, ended) =
            UnixStream::pair().map_err(|e| DaemonError::Internal(format!("socket pair: {e}")))?;
        drop(ended);
        self.carry_late(local, tunnel)
    }

    fn carry_late(self: &Arc<Self>, local: UnixStream, tunnel: Option<&Tunnel>) -> Result<()> {
        let Some(late) = lock(&self.late).take() else {
            return Ok(());
        };
        let _ = local.set_nonblocking(false);
        match late {
            LateStream::Tunnel(k) => {
                let t = tunnel.ok_or_else(|| {
                    DaemonError::Internal("a tunnel stream without its tunnel".into())
                })?;
                t.open(k, local)
                    .map_err(|e| DaemonError::Channel(e.to_string()))?;
            }
            LateStream::Conn(k, conn) => {
                let pump = self.spawn_pump(k, local, *conn)?;
                let stop = lock(&self.stops).last().cloned();
                if let Some(stop) = stop {
                    *lock(&self.late_pump) = Some((stop, pump));
                }
            }
        }
        Ok(())
    }

    /// Whether the preempt stream's pump, if it has one, sent everything QEMU gave it.
    pub(super) fn late_sent(&self) -> bool {
        lock(&self.late_pump)
            .as_ref()
            .is_none_or(|(stop, pump)| stop.forward_done() || pump.is_finished())
    }
}
