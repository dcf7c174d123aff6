//! Disk copy on the source: each writable disk is mirrored (QEMU's `blockdev-mirror`) to
//! an NBD client node whose connection goes to a unix socket of ours and from there over
//! the migration's channel, as one stream of kind NBD, to the destination QEMU's NBD
//! server. Once every mirror is READY the RAM migration starts, paused before the
//! switch-over; there the mirrors are cancelled (a READY mirror then ends with the
//! destination a consistent copy) and the migration continues.
//!
//! On any failure the mirrors are cancelled and the NBD nodes removed: the source keeps
//! running on its own images with no job or node of ours left behind. It never pivots
//! the source onto the copy.

use super::*;
use vmferry_proto::disk::{CopyStorage, StorageMode};
use vmferry_qmp::BlockDisk;

/// How long QEMU gets to connect each NBD client node to our socket.
const NBD_CONNECT: Duration = Duration::from_secs(30);
/// How often the mirrors are polled while they copy: the RAM starts at most this late
/// after the last disk is in sync.
const DISK_POLL: Duration = Duration::from_millis(20);
/// How long a cancelled mirror gets to end.
const JOB_END: Duration = Duration::from_secs(30);

/// What this half added to the source QEMU, to be removed again.
#[derive(Debug, Default)]
pub(super) struct DiskJobs {
    nodes: Vec<String>,
    jobs: Vec<String>,
}

/// The names of the NBD client nodes and mirror jobs a disk copy adds to a source QEMU.
pub(super) const NBD_PREFIX: &str = "vmferry-nbd";
pub(super) const MIRROR_PREFIX: &str = "vmferry-mirror";

fn nbd_node(k: usize) -> String {
    format!("{NBD_PREFIX}{k}")
}

fn mirror_job(k: usize) -> String {
    format!("{MIRROR_PREFIX}{k}")
}

/// The writable disks of a source QEMU that `--copy-storage` copies; refused when there
/// are none.
pub(super) fn disks_to_copy(qemu: &QemuHandle) -> Result<Vec<BlockDisk>> {
    let all = qemu.with_qmp(|q| q.block_disks())?;
    let writable: Vec<BlockDisk> = all.into_iter().filter(|d| !d.read_only).collect();
    if writable.is_empty() {
        return Err(DaemonError::BadRequest(format!(
            "--copy-storage: {} has no writable disk attached to a device",
            qemu.describe()
        )));
    }
    if writable.len() > vmferry_proto::disk::MAX_DISKS {
        return Err(DaemonError::BadRequest(format!(
            "--copy-storage: {} has {} disks; vmferry copies at most {}",
            qemu.describe(),
            writable.len(),
            vmferry_proto::disk::MAX_DISKS
        )));
    }
    Ok(writable)
}

impl SourceMigration {
    fn copy(&self) -> Option<CopyStorage> {
        self.options.copy_storage
    }

    /// Connects every disk's NBD client node through the channel and starts its mirror;
    /// returns once every mirror is READY (then the RAM migration may start).
    pub(super) fn copy_disks(self: &Arc<Self>, carrier: &Carrier) -> Result<()> {
        let Some(copy) = self.copy() else {
            return Ok(());
        };
        let mut conns = std::mem::take(&mut *lock(&self.nbd_conns)).into_iter();
        *lock(&self.disk_copy_started) = Some(Instant::now());
        for (k, disk) in self.disks.iter().enumerate() {
            let path = self.socket_path.with_extension(format!("nbd{k}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| {
                DaemonError::Internal(format!("cannot listen on {}: {e}", path.display()))
            })?;
            lock(&self.disk_sockets).push(path.clone());
            // QEMU connects, and speaks NBD through the channel, while blockdev-add runs:
            // the connection is taken and carried on another thread meanwhile.
            let conn = match carrier {
                Carrier::Conns(_) => Some(conns.next().ok_or_else(|| {
                    DaemonError::Internal(format!("no NBD connection for disk {}", disk.device))
                })?),
                Carrier::Tunnel(_) => None,
            };
            let node = nbd_node(k);
            let uri = path.display().to_string();
            let give_up = AtomicBool::new(false);
            let (added, carried) = std::thread::scope(|sc| {
                let give_up = &give_up;
                let carry = sc.spawn(move || -> Result<()> {
                    let local = accept_one(&listener, NBD_CONNECT, give_up)
                        .map_err(|e| disk_error(disk, &e))?;
                    match (carrier, conn) {
                        (Carrier::Tunnel(t), _) => {
                            let id = u16::try_from(self.streams() + k)
                                .map_err(|_| DaemonError::Internal("too many streams".into()))?;
                            t.open(id, local)
                                .map_err(|e| disk_error(disk, &e.to_string()))
                        }
                        (_, Some(c)) => self.spawn_nbd_pump(k, local, c),
                        (_, None) => Ok(()),
                    }
                });
                let added = self
                    .qemu
                    .with_qmp(|q| q.blockdev_add_nbd(&node, &uri, &disk.device));
                if added.is_err() {
                    give_up.store(true, Ordering::SeqCst);
                }
                let carried = carry.join().unwrap_or_else(|_| {
                    Err(DaemonError::Internal(
                        "the NBD carrier thread panicked".into(),
                    ))
                });
                (added, carried)
            });
            if let Err(e) = added {
                let link = carried.err().map(|c| format!(" ({c})")).unwrap_or_default();
                return Err(disk_error(
                    disk,
                    &format!("QEMU cannot reach the destination's copy: {e}{link}"),
                ));
            }
            lock(&self.disk_jobs).nodes.push(node.clone());
            carried?;
            let job = mirror_job(k);
            let sync = match copy.mode {
                StorageMode::All => "full",
                StorageMode::Inc => "top",
            };
            // The operator's cap holds for the disks too.
            let speed = self.options.max_bandwidth;
            self.qemu
                .with_qmp(|q| {
                    q.blockdev_mirror(
                        &job,
                        &disk.node_name,
                        &node,
                        sync,
                        copy.copy_mode.as_str(),
                        speed,
                    )
                })
                .map_err(|e| disk_error(disk, &format!("cannot start the mirror: {e}")))?;
            lock(&self.disk_jobs).jobs.push(job);
        }
        self.wait_disks_ready()
    }

    /// Follows the mirrors until all are READY; fails on a job error, a stall or cancel.
    fn wait_disks_ready(&self) -> Result<()> {
        let stall_after = self.options.stall_timeout();
        let mut moved = Instant::now();
        let mut seen = 0u64;
        loop {
            if self.cancel.load(Ordering::SeqCst) {
                let cause = lock(&self.peer_failure)
                    .clone()
                    .unwrap_or_else(|| "cancelled".into());
                return Err(DaemonError::Cancelled(format!(
                    "the disk copy stopped ({}): {cause}",
                    self.disks_so_far()
                )));
            }
            let progress = self.disk_progress()?;
            let copied: u64 = progress.iter().map(|p| p.copied).sum();
            let all_ready = progress.iter().all(|p| p.ready);
            lock(&self.status).disks = progress;
            if all_ready {
                tracing::info!(migration = %self.id, disks = self.disks.len(), "every disk is in sync; the RAM follows");
                return Ok(());
            }
            if copied != seen {
                seen = copied;
                moved = Instant::now();
            } else if moved.elapsed() > stall_after {
                let stuck: Vec<String> = lock(&self.status)
                    .disks
                    .iter()
                    .filter(|p| !p.ready)
                    .map(|p| format!("disk {}: {} of {} bytes", p.device, p.copied, p.total))
                    .collect();
                return Err(DaemonError::Timeout(format!(
                    "the disk copy stalled: nothing moved for {} s ({})",
                    stall_after.as_secs(),
                    stuck.join(", ")
                )));
            }
            std::thread::sleep(DISK_POLL);
        }
    }

    /// How far each disk got, in words: "disk vd0: 12 MiB of 48 MiB".
    pub(super) fn disks_so_far(&self) -> String {
        let mib = |b: u64| b >> 20;
        lock(&self.status)
            .disks
            .iter()
            .map(|p| {
                format!(
                    "disk {}: {} MiB of {} MiB",
                    p.device,
                    mib(p.copied),
                    mib(p.total)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Each disk's copy as QEMU's mirror reports it; a mirror that ended with an error
    /// fails the copy, naming the disk and how far it got.
    fn disk_progress(&self) -> Result<Vec<vmferry_proto::DiskProgress>> {
        let jobs = self.qemu.with_qmp(|q| q.block_jobs())?;
        let mut out = Vec::with_capacity(self.disks.len());
        for (k, disk) in self.disks.iter().enumerate() {
            let name = mirror_job(k);
            let Some(j) = jobs.iter().find(|j| j.id == name) else {
                return Err(disk_error(disk, "its mirror job vanished"));
            };
            if let Some(e) = &j.error {
                let link = lock(&self.disk_error).clone();
                return Err(disk_error(
                    disk,
                    &format!(
                        "the copy failed after {} of {} bytes: {e}{}",
                        j.offset,
                        j.len,
                        link.map(|l| format!(" ({l})")).unwrap_or_default()
                    ),
                ));
            }
            // The first poll that sees it READY dates it; later polls keep that date.
            let in_sync_ms = lock(&self.status)
                .disks
                .iter()
                .find(|p| p.device == disk.device)
                .and_then(|p| p.in_sync_ms)
                .or_else(|| {
                    let started = (*lock(&self.disk_copy_started))?;
                    j.ready
                        .then(|| u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
                });
            out.push(vmferry_proto::DiskProgress {
                device: disk.device.clone(),
                copied: j.offset,
                total: j.len,
                ready: j.ready,
                in_sync_ms,
            });
        }
        Ok(out)
    }

    /// At `pre-switchover`: ends each mirror with the destination a consistent copy
    /// (cancel of a READY mirror: no pivot), then lets the migration continue.
    pub(super) fn switch_over_disks(&self) -> Result<()> {
        let progress = self.disk_progress()?;
        lock(&self.status).disks = progress;
        for k in 0..self.disks.len() {
            let job = mirror_job(k);
            self.qemu.with_qmp(|q| q.block_job_cancel(&job, false))?;
        }
        self.end_jobs(false)?;
        self.qemu
            .with_qmp(|q| q.migrate_continue_pre_switchover())?;
        tracing::info!(migration = %self.id, "the disks are copied; switching over");
        Ok(())
    }

    /// Waits for every job of ours to conclude and dismisses it. With `failed` the jobs
    /// were force-cancelled and their errors do not matter; otherwise a job that ended
    /// with an error fails the migration.
    fn end_jobs(&self, failed: bool) -> Result<()> {
        let deadline = Instant::now() + JOB_END;
        let ours: Vec<String> = lock(&self.disk_jobs).jobs.clone();
        loop {
            let jobs = self.qemu.with_qmp(|q| q.block_jobs())?;
            let mut pending = false;
            for name in &ours {
                let Some(j) = jobs.iter().find(|j| &j.id == name) else {
                    continue;
                };
                if j.status != "concluded" {
                    pending = true;
                    continue;
                }
                let _ = self.qemu.with_qmp(|q| q.job_dismiss(name));
                lock(&self.disk_jobs).jobs.retain(|n| n != name);
                if let (Some(e), false) = (&j.error, failed) {
                    return Err(DaemonError::Qemu(format!(
                        "the disk copy's job {name} ended with an error: {e}"
                    )));
                }
            }
            if !pending {
                return Ok(());
            }
            if Instant::now() > deadline {
                let states: Vec<String> = jobs
                    .iter()
                    .filter(|j| ours.contains(&j.id))
                    .map(|j| format!("{} {} at {} of {}", j.id, j.status, j.offset, j.len))
                    .collect();
                return Err(DaemonError::Timeout(format!(
                    "the disk mirrors did not end within {} s ({})",
                    JOB_END.as_secs(),
                    states.join(", ")
                )));
            }
            // At switch-over the guest is paused until the mirrors end: poll closely.
            std::thread::sleep(super::POLL);
        }
    }

    /// Removes what the disk copy added to the source QEMU: its mirrors (cancelled, with
    /// `failed`) and its NBD nodes; the NBD streams end with them. Never fails: what
    /// cannot be removed is logged.
    pub(super) fn clean_disks(&self, failed: bool) {
        if self.disks.is_empty() {
            return;
        }
        // Closed, not only shut down: QEMU's NBD client waits to write into a full
        // socket and is woken only once our end is gone (a shut-down end still holds
        // the unread bytes). Its requests then fail at once and the mirror can end.
        if failed {
            for stop in lock(&self.nbd_stops).drain(..) {
                stop.stop();
            }
            let jobs = lock(&self.disk_jobs).jobs.clone();
            for job in &jobs {
                let _ = self.qemu.with_qmp(|q| q.block_job_cancel(job, true));
            }
        }
        if let Err(e) = self.end_jobs(true) {
            tracing::warn!(migration = %self.id, "disk copy clean-up: {e}");
        }
        let nodes = std::mem::take(&mut lock(&self.disk_jobs).nodes);
        for node in nodes {
            if let Err(e) = self.qemu.with_qmp(|q| q.blockdev_del(&node)) {
                tracing::warn!(migration = %self.id, "cannot remove {node}: {e}");
            }
        }
        // On success the NBD clients said goodbye with blockdev-del; their streams go now.
        for stop in lock(&self.nbd_stops).drain(..) {
            stop.stop();
        }
        for path in lock(&self.disk_sockets).drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Carries one disk's NBD connection; a failure is kept, in words, for the error.
    fn spawn_nbd_pump(self: &Arc<Self>, k: usize, local: UnixStream, c: DataConn) -> Result<()> {
        let DataConn { conn, sock, peer } = c;
        let stop = StopHandle::new(&local, &sock)
            .map_err(|e| DaemonError::Internal(format!("stop handle: {e}")))?;
        lock(&self.nbd_stops).push(stop.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("pump-nbd-{k}"))
            .spawn(move || {
                let r = pump::pump_with(
                    local,
                    conn,
                    sock,
                    &peer,
                    &me.disk_meter,
                    &stop,
                    me.filters(),
                );
                if let Err(e) = r {
                    let device = me.disks.get(k).map(|d| d.device.as_str()).unwrap_or("?");
                    lock(&me.disk_error)
                        .get_or_insert(format!("disk {device}: the NBD stream with {peer}: {e}"));
                }
            })
            .map(drop)
            .map_err(|e| DaemonError::Internal(format!("cannot start pump: {e}")))
    }
}

fn disk_error(disk: &BlockDisk, why: &str) -> DaemonError {
    DaemonError::Qemu(format!("disk {}: {why}", disk.device))
}

/// Accepts one connection within `within`, unless told to give up.
fn accept_one(
    listener: &UnixListener,
    within: Duration,
    give_up: &AtomicBool,
) -> std::result::Result<UnixStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot poll our NBD socket: {e}"))?;
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accepting QEMU's NBD connection: {e}")),
        }
        if give_up.load(Ordering::SeqCst) {
            return Err("QEMU did not open its NBD connection".into());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "QEMU did not open its NBD connection within {} s",
                within.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
