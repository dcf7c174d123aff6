//! The registry of VMs this daemon manages: it starts their QEMU, owns their QMP socket,
//! and stops them.
//!
//! The daemon is the only QMP client of a managed VM (QEMU serves one client at a time):
//! everything that talks to such a QEMU goes through [`ManagedVm::with_qmp`]. A VM's
//! files live in `state_dir/vms/NAME/`; names are validated before they reach a path.

use crate::accel::{AccelChoice, AccelResolver};
use crate::error::{DaemonError, Result};
use crate::qemu_cmd::{qemu_args, DiskCache, VmPaths};
use crate::vm_process::QemuProcess;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmferry_proto::{Accel, VmInfo, VmName, VmSpec};
use vmferry_qmp::{Qmp, QmpError};

/// How long a freshly started QEMU may take to open its QMP socket.
const QMP_START_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// One QEMU process the daemon started.
#[derive(Debug)]
pub struct ManagedVm {
    /// The spec with the accelerator resolved.
    pub spec: VmSpec,
    pub dir: PathBuf,
    pub qmp_path: PathBuf,
    pub serial_log: PathBuf,
    /// QEMU's stderr, for error messages when it exits.
    pub qemu_log: PathBuf,
    /// Why this accelerator, for the operator.
    pub accel_reason: String,
    process: Mutex<QemuProcess>,
    qmp: Mutex<Option<Qmp>>,
}

/// What `vms/NAME/vm.json` keeps of a running VM, for a restarted daemon to adopt it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct VmRecord {
    spec: VmSpec,
    pid: u32,
    #[serde(default)]
    accel_reason: String,
}

impl ManagedVm {
    /// Runs `f` with this VM's QMP connection, reconnecting if an earlier call broke it.
    pub fn with_qmp<R>(&self, f: impl FnOnce(&mut Qmp) -> Result<R, QmpError>) -> Result<R> {
        let mut guard = lock(&self.qmp);
        if guard.is_none() {
            if let Some(reason) = self.exit_reason() {
                return Err(DaemonError::Qemu(reason));
            }
            *guard = Some(Qmp::connect(&self.qmp_path, Duration::from_secs(5))?);
        }
        let Some(q) = guard.as_mut() else {
            return Err(DaemonError::Internal("QMP connection vanished".into()));
        };
        match f(q) {
            Ok(r) => Ok(r),
            Err(e) => {
                // A broken connection is dropped so the next call reconnects; a command
                // error or a late reply leaves it usable (a QEMU whose main loop is
                // blocked could not answer a new handshake either).
                if !matches!(e, QmpError::Command { .. } | QmpError::Timeout { .. }) {
                    *guard = None;
                    if let Some(reason) = self.exit_reason() {
                        return Err(DaemonError::Qemu(reason));
                    }
                }
                Err(e.into())
            }
        }
    }

    pub fn pid(&self) -> u32 {
        lock(&self.process).id()
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("vm.json")
    }

    /// Writes the record a restarted daemon adopts this VM from.
    fn write_record(&self) {
        let rec = VmRecord {
            spec: self.spec.clone(),
            pid: self.pid(),
            accel_reason: self.accel_reason.clone(),
        };
        let path = self.record_path();
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&rec)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(vm = %self.spec.name, "cannot write {}: a restart would not adopt it: {e}", path.display());
        }
    }

    fn remove_record(&self) {
        let _ = std::fs::remove_file(self.record_path());
    }

    /// `Some(why)` once QEMU has exited, with the end of its stderr.
    pub fn exit_reason(&self) -> Option<String> {
        let status = lock(&self.process).exited()?;
        let tail = log_tail(&self.qemu_log, 600);
        Some(if tail.is_empty() {
            format!("QEMU for VM '{}' exited ({status})", self.spec.name)
        } else {
            format!("QEMU for VM '{}' exited ({status}): {tail}", self.spec.name)
        })
    }

    /// QEMU's run state, or `exited`.
    pub fn state(&self) -> String {
        if self.exit_reason().is_some() {
            return "exited".into();
        }
        match self.with_qmp(|q| q.query_status()) {
            Ok(s) => s.status,
            Err(e) => format!("unknown ({e})"),
        }
    }

    pub fn info(&self) -> VmInfo {
        VmInfo {
            spec: self.spec.clone(),
            state: self.state(),
            pid: Some(self.pid()),
            serial_log: self.serial_log.display().to_string(),
            accel_reason: self.accel_reason.clone(),
        }
    }

    /// Asks QEMU to quit, then kills it if it has not gone within `grace`.
    pub fn shutdown(&self, grace: Duration) {
        let _ = self.with_qmp(|q| q.quit());
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if lock(&self.process).exited().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Kills QEMU at once (an incoming QEMU holds nothing worth saving).
    pub fn kill(&self) {
        lock(&self.process).kill();
        *lock(&self.qmp) = None;
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}

fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// All managed VMs of this daemon.
#[derive(Debug)]
pub struct VmRegistry {
    vms: Mutex<HashMap<VmName, Arc<ManagedVm>>>,
    /// Names being started, so two starts of one name cannot race.
    starting: Mutex<HashSet<VmName>>,
    dir: PathBuf,
    qemu: String,
    default_accel: Accel,
    accel: AccelResolver,
    /// The QEMU binary's release and machine types, probed once when first needed.
    pub binary: crate::qemu_binary::QemuBinary,
}

impl VmRegistry {
    pub fn new(state_dir: &Path, qemu: String, default_accel: Accel) -> Self {
        VmRegistry {
            vms: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashSet::new()),
            dir: state_dir.join("vms"),
            binary: crate::qemu_binary::QemuBinary::new(&qemu),
            qemu,
            default_accel,
            accel: AccelResolver::default(),
        }
    }

    /// The QMP socket a VM of this name has (its QEMU's command line names it).
    pub fn qmp_path(&self, name: &VmName) -> PathBuf {
        self.dir.join(name.as_str()).join("qmp.sock")
    }

    /// Starts a VM. `incoming` starts it paused waiting for a migration, and then the
    /// spec's accelerator is used as given (the source already resolved it).
    pub fn start(&self, mut spec: VmSpec, incoming: bool) -> Result<Arc<ManagedVm>> {
        spec.check()?;
        if let Some(m) = &spec.machine {
            self.binary.check_machine(m, "this host's")?;
        }
        let name = spec.name.clone();
        {
            let vms = lock(&self.vms);
            let mut starting = lock(&self.starting);
            if vms.contains_key(&name) || !starting.insert(name.clone()) {
                return Err(DaemonError::Exists(format!(
                    "a VM named '{name}' already exists on this host"
                )));
            }
        }
        let result = self.launch(&mut spec, incoming);
        lock(&self.starting).remove(&name);
        let vm = Arc::new(result?);
        // An incoming VM is this host's only once its migration completed (`settled`).
        if !incoming {
            vm.write_record();
        }
        lock(&self.vms).insert(name, vm.clone());
        Ok(vm)
    }

    fn launch(&self, spec: &mut VmSpec, incoming: bool) -> Result<ManagedVm> {
        let dir = self.dir.join(spec.name.as_str());
        std::fs::create_dir_all(&dir)
            .map_err(|e| DaemonError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let requested = if spec.accel == Accel::Auto {
            self.default_accel
        } else {
            spec.accel
        };
        let AccelChoice { accel, reason } = self.accel.resolve(requested, &self.qemu, spec, &dir);
        spec.accel = accel;
        let qmp_path = self.qmp_path(&spec.name);
        let serial_log = dir.join("serial.log");
        let qemu_log = dir.join("qemu.log");
        let disk_cache = spec
            .disks
            .iter()
            .map(|d| disk_cache_for(&spec.name, d))
            .collect::<Result<Vec<_>>>()?;
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&serial_log);
        let args = qemu_args(
            spec,
            &VmPaths {
                qmp: &qmp_path,
                serial_log: &serial_log,
                disk_cache: &disk_cache,
            },
            incoming,
        );
        let stderr = File::create(&qemu_log).map_err(|e| {
            DaemonError::Internal(format!("cannot create {}: {e}", qemu_log.display()))
        })?;
        tracing::info!(vm = %spec.name, %accel, incoming, "starting QEMU: {} {}", self.qemu, args.join(" "));
        let child = Command::new(&self.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: a signal to the daemon's group (Ctrl-C, a service
            // manager stopping the daemon) does not reach the guest.
            .process_group(0)
            .spawn()
            .map_err(|e| DaemonError::Qemu(format!("cannot run '{}': {e}", self.qemu)))?;
        let mut vm = ManagedVm {
            spec: spec.clone(),
            dir,
            qmp_path,
            serial_log,
            qemu_log,
            accel_reason: reason,
            process: Mutex::new(QemuProcess::Child(child)),
            qmp: Mutex::new(None),
        };
        let deadline = Instant::now() + QMP_START_TIMEOUT;
        loop {
            if let Some(reason) = vm.exit_reason() {
                return Err(DaemonError::Qemu(reason));
            }
            if vm.qmp_path.exists() {
                match Qmp::connect(&vm.qmp_path, Duration::from_secs(2)) {
                    Ok(mut q) => {
                        // The spec keeps the versioned type an alias stood for: a
                        // destination with a newer QEMU must build the same machine.
                        match q.machine_type() {
                            Ok(m) => vm.spec.machine = Some(m),
                            Err(e) => {
                                tracing::warn!(vm = %spec.name, "cannot read the machine type: {e}")
                            }
                        }
                        *lock(&vm.qmp) = Some(q);
                        return Ok(vm);
                    }
                    Err(e) if Instant::now() >= deadline => {
                        vm.kill();
                        return Err(DaemonError::Qemu(format!(
                            "QEMU for VM '{}' did not answer on QMP: {e}",
                            spec.name
                        )));
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() >= deadline {
                vm.kill();
                return Err(DaemonError::Timeout(format!(
                    "QEMU for VM '{}' did not open its QMP socket within {} s",
                    spec.name,
                    QMP_START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, name: &VmName) -> Result<Arc<ManagedVm>> {
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::NotFound(format!("no VM named '{name}' on this host")))
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<Arc<ManagedVm>> = lock(&self.vms).values().cloned().collect();
        let mut infos: Vec<VmInfo> = vms.iter().map(|v| v.info()).collect();
        infos.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        infos
    }

    /// How many VMs there are (incoming ones too) and the memory their specs give them,
    /// in MiB. Asks no QEMU anything.
    pub fn memory_given(&self) -> (u32, u64) {
        let vms = lock(&self.vms);
        let mib = vms.values().map(|v| v.spec.memory_mib).sum();
        (u32::try_from(vms.len()).unwrap_or(u32::MAX), mib)
    }

    /// Stops a VM (quit, then kill) and forgets it.
    pub fn stop(&self, name: &VmName) -> Result<()> {
        let vm = lock(&self.vms)
            .remove(name)
            .ok_or_else(|| DaemonError::NotFound(format!("no VM named '{name}' on this host")))?;
        vm.remove_record();
        vm.shutdown(Duration::from_secs(5));
        Ok(())
    }

    /// Forgets a VM without touching its process (after it was killed or migrated away).
    pub fn forget(&self, name: &VmName) {
        if let Some(vm) = lock(&self.vms).remove(name) {
            vm.remove_record();
        }
    }

    /// An incoming VM whose migration completed: this host's now, adopted after a restart.
    pub fn settled(&self, name: &VmName) {
        if let Some(vm) = lock(&self.vms).get(name) {
            vm.write_record();
        }
    }

    /// Adopts the VMs a previous run of the daemon started that still run (their QEMUs
    /// outlive the daemon by design); a record whose QEMU is gone is removed. Returns
    /// the adopted VMs and one line per VM saying what happened.
    pub fn adopt(&self) -> (Vec<Arc<ManagedVm>>, Vec<String>) {
        let (mut adopted, mut said) = (Vec::new(), Vec::new());
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return (adopted, said);
        };
        for e in rd.flatten() {
            let dir = e.path();
            let path = dir.join("vm.json");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let rec: VmRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(err) => {
                    said.push(format!(
                        "{}: unreadable ({err}); left alone",
                        path.display()
                    ));
                    continue;
                }
            };
            let name = rec.spec.name.clone();
            if dir.file_name() != Some(std::ffi::OsStr::new(name.as_str())) {
                said.push(format!("{}: names VM '{name}'; left alone", path.display()));
                continue;
            }
            let qmp_path = self.qmp_path(&name);
            if !crate::vm_process::is_running_qemu_of(rec.pid, &qmp_path) {
                let _ = std::fs::remove_file(&path);
                said.push(format!(
                    "VM '{name}' (pid {}) ended while the daemon was down",
                    rec.pid
                ));
                continue;
            }
            let qmp = match Qmp::connect(&qmp_path, Duration::from_secs(5)) {
                Ok(q) => q,
                Err(err) => {
                    said.push(format!("VM '{name}' (pid {}) runs but its QMP does not answer ({err}); not adopted", rec.pid));
                    continue;
                }
            };
            let vm = Arc::new(ManagedVm {
                spec: rec.spec,
                serial_log: dir.join("serial.log"),
                qemu_log: dir.join("qemu.log"),
                dir,
                qmp_path: qmp_path.clone(),
                accel_reason: rec.accel_reason,
                process: Mutex::new(QemuProcess::Adopted {
                    pid: rec.pid,
                    qmp: qmp_path,
                }),
                qmp: Mutex::new(Some(qmp)),
            });
            lock(&self.vms).insert(name.clone(), vm.clone());
            said.push(format!("VM '{name}' (pid {}) adopted", rec.pid));
            adopted.push(vm);
        }
        (adopted, said)
    }

    /// Kills every VM (daemon shutdown in tests; production leaves VMs running).
    pub fn kill_all(&self) {
        let vms: Vec<Arc<ManagedVm>> = lock(&self.vms).drain().map(|(_, v)| v).collect();
        for v in vms {
            v.kill();
        }
    }
}

/// Checks that a disk is there and picks its cache mode: `none` (O_DIRECT), which
/// shared storage needs so the destination never reads stale host cache, unless the
/// filesystem cannot do O_DIRECT (tmpfs before Linux 6.6, some FUSE), where QEMU would refuse to open it.
fn disk_cache_for(vm: &impl std::fmt::Display, disk: &str) -> Result<DiskCache> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |direct: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(if direct { nix::libc::O_DIRECT } else { 0 })
            .open(disk)
    };
    match open(true) {
        Ok(_) => Ok(DiskCache::None),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) && open(false).is_ok() => {
            tracing::warn!(
                %vm,
                disk,
                "the disk's filesystem has no O_DIRECT; using cache=writeback, which is only \
                 safe to migrate when both QEMUs share this host's page cache"
            );
            Ok(DiskCache::Writeback)
        }
        Err(e) => Err(DaemonError::BadRequest(format!(
            "disk {disk} of VM '{vm}' cannot be opened on this host: {e} \
             (a migrated VM's disks must be on storage both hosts mount at the same path)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_disk_is_refused_naming_the_path_and_the_shared_storage_rule() {
        let e = disk_cache_for(&"g", "/nonexistent/vmferry/disk.raw").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/vmferry/disk.raw"), "{msg}");
        assert!(msg.contains("same path"), "{msg}");
    }

    #[test]
    fn disks_use_o_direct_where_the_filesystem_has_it() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let disk = dir.path().join("d.raw");
        std::fs::write(&disk, [0u8; 4096]).unwrap();
        assert_eq!(
            disk_cache_for(&"g", disk.to_str().unwrap()).unwrap(),
            DiskCache::None
        );
    }
}
