//! Disk copy on the destination: before any byte moves, each of the source's disks is
//! matched with this QEMU's disk of the same device and checked (format, size,
//! writable); then QEMU's NBD server listens on a unix socket of ours and exports each
//! disk writable. Every NBD stream the source opens is carried to that socket. The
//! server is stopped before the guest runs here, and on abort.
//!
//! It never exports a disk the source did not name, and never touches an image file.

use super::*;
use vmferry_proto::disk::match_disks;

/// The export id of disk `k` (the export's NBD name is the device id).
fn export_id(k: usize) -> String {
    format!("vmferry-export{k}")
}

/// Checks the destination's disks against the source's and starts QEMU's NBD server
/// with one writable export per disk; refused, naming the disk, before anything starts.
pub(super) fn export_disks(
    qemu: &QemuHandle,
    cookie: &Cookie,
    socket: &std::path::Path,
) -> Result<()> {
    let Some(copy) = cookie.options.copy_storage else {
        return Ok(());
    };
    let ours = qemu.with_qmp(|q| q.block_disks())?;
    let shapes: Vec<vmferry_proto::DiskShape> = ours.iter().map(super::super::disk_shape).collect();
    let pairs = match_disks(&cookie.disks, &shapes, copy.mode).map_err(|why| {
        DaemonError::BadRequest(format!("{} cannot receive this VM: {why}", qemu.describe()))
    })?;
    let _ = std::fs::remove_file(socket);
    let path = socket.display().to_string();
    qemu.with_qmp(|q| q.nbd_server_start_unix(&path))?;
    for (k, (src, _)) in pairs.iter().enumerate() {
        let node = ours
            .iter()
            .find(|d| d.device == src.device)
            .map(|d| d.node_name.clone())
            .unwrap_or_default();
        let exported = qemu.with_qmp(|q| q.nbd_export_writable(&export_id(k), &node, &src.device));
        if let Err(e) = exported {
            let _ = qemu.with_qmp(|q| q.nbd_server_stop());
            return Err(DaemonError::Qemu(format!(
                "disk {}: cannot export it for the copy: {e}",
                src.device
            )));
        }
    }
    Ok(())
}

impl DestinationMigration {
    /// Carries one NBD stream of the source to QEMU's NBD server.
    pub(super) fn carry_nbd(self: &Arc<Self>, pre: &Preamble, c: DataConn) -> Result<()> {
        let k = usize::from(pre.stream);
        if usize::from(pre.streams) != self.n_disks || k >= self.n_disks {
            return Err(DaemonError::Channel(format!(
                "{} claims NBD stream {} of {}, but this migration copies {} disks",
                c.peer, pre.stream, pre.streams, self.n_disks
            )));
        }
        {
            let mut taken = lock(&self.nbd_taken);
            if taken.contains(&k) {
                return Err(DaemonError::Denied(format!(
                    "{} tried to open NBD stream {k} a second time; refused",
                    c.peer
                )));
            }
            taken.push(k);
        }
        let local = self.nbd_local()?;
        self.spawn_nbd_pump(k, local, c)
    }

    /// A connection to QEMU's NBD server, for one disk's stream.
    pub(super) fn nbd_local(&self) -> Result<UnixStream> {
        let socket = self.nbd_socket.as_ref().ok_or_else(|| {
            DaemonError::BadRequest(format!("migration {} copies no disks", self.id))
        })?;
        UnixStream::connect(socket).map_err(|e| {
            DaemonError::Qemu(format!(
                "cannot reach the destination QEMU's NBD server at {}: {e}",
                socket.display()
            ))
        })
    }

    fn spawn_nbd_pump(self: &Arc<Self>, k: usize, local: UnixStream, c: DataConn) -> Result<()> {
        let stop = StopHandle::new(&local, &c.sock)
            .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
        lock(&self.stops).push(stop.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("pump-nbd-{k}"))
            .spawn(move || {
                let DataConn { conn, sock, peer } = c;
                let r =
                    pump::pump_with(local, conn, sock, &peer, &me.disk_meter, &stop, me.filters);
                if let Err(e) = r {
                    tracing::info!(migration = %me.id, "NBD stream {k} with {peer}: {e}");
                }
            })
            .map(drop)
            .map_err(|e| DaemonError::Internal(format!("cannot start pump: {e}")))
    }

    /// Stops QEMU's NBD server (the exports go with it): before the guest runs here, and
    /// on abort. A QEMU that is gone has nothing to stop.
    pub(super) fn stop_nbd(&self) {
        if let Some(socket) = &self.nbd_socket {
            if let Err(e) = self.qemu.with_qmp(|q| q.nbd_server_stop()) {
                tracing::info!(migration = %self.id, "stopping the NBD server: {e}");
            }
            let _ = std::fs::remove_file(socket);
        }
    }
}
