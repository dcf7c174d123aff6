//! What a source daemon killed in the middle of a migration left in a QEMU it adopts when
//! it starts again: a pre-copy migration still running into a socket nobody reads, and a
//! disk copy's mirrors and NBD client nodes. The guest never left (pre-copy does not hand
//! it over before the daemon says so), so these are undone and the guest runs on here.
//!
//! A QEMU in post-copy is never touched: the guest runs on the other host then, with part
//! of its memory here, and only an operator (or a recovery) may decide.

use super::disks::{MIRROR_PREFIX, NBD_PREFIX};
use crate::vms::ManagedVm;
use std::time::{Duration, Instant};
use vmferry_qmp::MigrationStatus as QemuMigrationStatus;

/// How long the undone mirrors and migration get to end.
const UNDO_WAIT: Duration = Duration::from_secs(10);

/// Undoes an interrupted migration of `vm`; one line per thing done.
pub fn undo_interrupted(vm: &ManagedVm) -> Vec<String> {
    let name = &vm.spec.name;
    let mut said = Vec::new();
    let status = match vm.with_qmp(|q| q.query_migrate()) {
        Ok(info) => info.status,
        Err(e) => {
            said.push(format!("VM '{name}': cannot read its migration state: {e}"));
            return said;
        }
    };
    if matches!(
        status,
        QemuMigrationStatus::PostcopyActive
            | QemuMigrationStatus::PostcopyPaused
            | QemuMigrationStatus::PostcopyRecover
    ) {
        said.push(format!(
            "VM '{name}' was in post-copy ({status}) when the daemon stopped: the guest runs \
             on the destination with part of its memory here; left as it is for an operator"
        ));
        return said;
    }
    if status.is_active() {
        match vm.with_qmp(|q| q.migrate_cancel()) {
            Ok(()) => said.push(format!(
                "VM '{name}': its migration ({status}), interrupted by the restart, is cancelled"
            )),
            Err(e) => said.push(format!("VM '{name}': cannot cancel its migration: {e}")),
        }
        let deadline = Instant::now() + UNDO_WAIT;
        while Instant::now() < deadline
            && vm
                .with_qmp(|q| q.query_migrate())
                .is_ok_and(|i| i.status.is_active())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let jobs = vm.with_qmp(|q| q.block_jobs()).unwrap_or_default();
    let ours: Vec<String> = jobs
        .iter()
        .filter(|j| j.id.starts_with(MIRROR_PREFIX))
        .map(|j| j.id.clone())
        .collect();
    for id in &ours {
        let _ = vm.with_qmp(|q| q.block_job_cancel(id, true));
    }
    let deadline = Instant::now() + UNDO_WAIT;
    for id in &ours {
        loop {
            let jobs = vm.with_qmp(|q| q.block_jobs()).unwrap_or_default();
            match jobs.iter().find(|j| &j.id == id) {
                None => break,
                Some(j) if j.status == "concluded" || Instant::now() > deadline => {
                    let _ = vm.with_qmp(|q| q.job_dismiss(id));
                    break;
                }
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        said.push(format!(
            "VM '{name}': the disk copy's mirror {id} is cancelled"
        ));
    }
    let nodes = vm
        .with_qmp(|q| q.execute("query-named-block-nodes", None))
        .ok();
    let names: Vec<String> = nodes
        .as_ref()
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with(NBD_PREFIX))
        .map(str::to_string)
        .collect();
    for node in names {
        match vm.with_qmp(|q| q.blockdev_del(&node)) {
            Ok(()) => said.push(format!(
                "VM '{name}': the disk copy's node {node} is removed"
            )),
            Err(e) => said.push(format!("VM '{name}': cannot remove the node {node}: {e}")),
        }
    }
    said
}
