//! The block commands of a disk copy (QEMU 7.2+; the built-in block migration, gone in
//! 9.1, is never used), in the order libvirt uses them:
//!
//! ```text
//! destination: nbd-server-start (unix) ─ block-export-add (nbd, writable) per disk
//! source:      blockdev-add (nbd client) ─ blockdev-mirror ─ … BLOCK_JOB_READY
//!              migrate (pause-before-switchover) ─ at pre-switchover: block-job-cancel
//!              (a READY mirror then ends with a consistent copy, no pivot)
//!              ─ migrate-continue ─ blockdev-del
//! destination: nbd-server-stop ─ cont
//! ```
//!
//! This module only speaks QMP; it never decides which disks to copy or what a failure
//! means.

use crate::client::Qmp;
use crate::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};

/// A disk attached to a guest device, as `query-block` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDisk {
    /// The guest device's id (`-device …,id=ID`), or for `-drive` disks without one the
    /// drive's name.
    pub device: String,
    /// The top node QEMU opened for the device (what a mirror copies and an export
    /// serves).
    pub node_name: String,
    /// The image format of the top node (`qcow2`, `raw`, …).
    pub format: String,
    pub virtual_size: u64,
    pub backing: Option<String>,
    pub read_only: bool,
}

/// A block job, as `query-block-jobs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJob {
    /// The job's id (QEMU calls it `device`).
    #[serde(rename = "device")]
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Bytes to copy in all, and copied so far (both grow while the guest writes).
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    /// A mirror is ready once source and target are in sync.
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub status: String,
    /// Why the job failed, once it did.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct RawBlockInfo {
    #[serde(default)]
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    inserted: Option<RawInserted>,
}

#[derive(Deserialize)]
struct RawInserted {
    #[serde(rename = "node-name", default)]
    node_name: String,
    #[serde(default)]
    drv: String,
    #[serde(default)]
    ro: bool,
    #[serde(default)]
    image: Option<RawImage>,
    #[serde(default)]
    backing_file: Option<String>,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(rename = "virtual-size", default)]
    virtual_size: u64,
}

/// The device id in a `qdev` field: QEMU gives the id itself for some devices and the
/// QOM path (`/machine/peripheral/ID/virtio-backend`) for others; devices without an id
/// live under `peripheral-anon` and have none.
fn device_id(qdev: &str) -> Option<String> {
    match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().map(str::to_string),
        None if qdev.starts_with('/') => None,
        None if qdev.is_empty() => None,
        None => Some(qdev.to_string()),
    }
}

impl Qmp {
    /// The disks attached to guest devices (`query-block`), with a medium inserted.
    pub fn block_disks(&mut self) -> Result<Vec<BlockDisk>, QmpError> {
        let v = self.execute("query-block", None)?;
        let list: Vec<RawBlockInfo> = serde_json::from_value(v)
            .map_err(|e| QmpError::Protocol(format!("the reply to query-block: {e}")))?;
        Ok(list
            .into_iter()
            .filter_map(|b| {
                let ins = b.inserted?;
                let device = b
                    .qdev
                    .as_deref()
                    .and_then(device_id)
                    .or_else(|| (!b.device.is_empty()).then(|| b.device.clone()))?;
                Some(BlockDisk {
                    device,
                    node_name: ins.node_name,
                    format: ins.drv,
                    virtual_size: ins.image.map(|i| i.virtual_size).unwrap_or(0),
                    backing: ins.backing_file,
                    read_only: ins.ro,
                })
            })
            .collect())
    }

    /// Starts QEMU's NBD server on a unix socket (`nbd-server-start`).
    pub fn nbd_server_start_unix(&mut self, path: &str) -> Result<(), QmpError> {
        self.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "unix", "data": { "path": path } } })),
        )
        .map(drop)
    }

    /// Stops QEMU's NBD server and removes its exports (`nbd-server-stop`).
    pub fn nbd_server_stop(&mut self) -> Result<(), QmpError> {
        self.execute("nbd-server-stop", None).map(drop)
    }

    /// Exports `node` writable over the NBD server under the name `name`
    /// (`block-export-add`; QEMU activates a node an incoming migration holds inactive).
    pub fn nbd_export_writable(
        &mut self,
        id: &str,
        node: &str,
        name: &str,
    ) -> Result<(), QmpError> {
        self.execute(
            "block-export-add",
            Some(json!({
                "type": "nbd", "id": id, "node-name": node, "name": name, "writable": true
            })),
        )
        .map(drop)
    }

    /// Adds an NBD client node that connects to the export `export` on a unix socket
    /// (`blockdev-add`; QEMU connects while the command runs).
    pub fn blockdev_add_nbd(
        &mut self,
        node: &str,
        path: &str,
        export: &str,
    ) -> Result<(), QmpError> {
        self.execute(
            "blockdev-add",
            Some(json!({
                "driver": "nbd", "node-name": node, "export": export,
                "server": { "type": "unix", "path": path }
            })),
        )
        .map(drop)
    }

    /// Removes a node this client added (`blockdev-del`).
    pub fn blockdev_del(&mut self, node: &str) -> Result<(), QmpError> {
        self.execute("blockdev-del", Some(json!({ "node-name": node })))
            .map(drop)
    }

    /// Starts mirroring `device` (a node name) to `target` (`blockdev-mirror`): `sync`
    /// is "full" or "top", `copy_mode` "background" or "write-blocking". The job stays
    /// listed once it ended (`auto-dismiss` off), so its error can be read; end it with
    /// [`Qmp::job_dismiss`]. `speed` caps it in bytes per second (0: no cap).
    pub fn blockdev_mirror(
        &mut self,
        job: &str,
        device: &str,
        target: &str,
        sync: &str,
        copy_mode: &str,
        speed: u64,
    ) -> Result<(), QmpError> {
        let mut args = json!({
            "job-id": job, "device": device, "target": target, "sync": sync,
            "auto-dismiss": false
        });
        if speed > 0 {
            args["speed"] = Value::from(speed);
        }
        // Sent only when asked for, so a QEMU without the option is not refused for it.
        if copy_mode != "background" {
            args["copy-mode"] = Value::from(copy_mode);
        }
        self.execute("blockdev-mirror", Some(args)).map(drop)
    }

    /// The block jobs QEMU runs (`query-block-jobs`).
    pub fn block_jobs(&mut self) -> Result<Vec<BlockJob>, QmpError> {
        let v = self.execute("query-block-jobs", None)?;
        serde_json::from_value(v)
            .map_err(|e| QmpError::Protocol(format!("the reply to query-block-jobs: {e}")))
    }

    /// Cancels a block job (`block-job-cancel`). A READY mirror then ends with the target
    /// a consistent copy of the source at that moment; `force` cancels even that.
    pub fn block_job_cancel(&mut self, job: &str, force: bool) -> Result<(), QmpError> {
        self.execute(
            "block-job-cancel",
            Some(json!({ "device": job, "force": force })),
        )
        .map(drop)
    }

    /// Removes a job that ended (`job-dismiss`; its status is "concluded").
    pub fn job_dismiss(&mut self, job: &str) -> Result<(), QmpError> {
        self.execute("job-dismiss", Some(json!({ "id": job })))
            .map(drop)
    }

    /// Lets a migration paused at `pre-switchover` continue (`migrate-continue`).
    pub fn migrate_continue_pre_switchover(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qemu::*;

    #[test]
    fn device_ids_come_from_the_qom_path_or_the_id_itself() {
        assert_eq!(
            device_id("/machine/peripheral/vd0/virtio-backend").as_deref(),
            Some("vd0")
        );
        assert_eq!(device_id("scsi0-disk1").as_deref(), Some("scsi0-disk1"));
        assert_eq!(
            device_id("/machine/peripheral-anon/device[0]/virtio-backend"),
            None
        );
        assert_eq!(device_id(""), None);
    }

    #[test]
    fn query_block_lists_inserted_disks_by_device() {
        let (_d, p, _h) = answering(|c| {
            let ret = match c["execute"].as_str() {
                Some("query-block") => {
                    r##"[{"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
                        "inserted": {"node-name": "fmt0", "drv": "qcow2", "ro": false,
                                     "image": {"virtual-size": 67108864, "format": "qcow2"}}},
                       {"device": "disk1", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
                        "inserted": {"node-name": "#block123", "drv": "raw", "ro": true,
                                     "backing_file": "/base.img",
                                     "image": {"virtual-size": 1024}}},
                       {"device": "ide1-cd0", "qdev": "/machine/unattached/device[23]"},
                       {"device": "", "qdev": "/machine/peripheral-anon/device[2]",
                        "inserted": {"node-name": "x", "drv": "raw"}}]"##
                }
                _ => "{}",
            };
            // One message per line, as QEMU sends them.
            let ret = ret.replace('\n', " ");
            format!("{{\"return\": {ret}, \"id\": {}}}\r\n", c["id"])
        });
        let mut q = connect(&p);
        let disks = q.block_disks().expect("disks");
        assert_eq!(disks.len(), 2, "{disks:?}");
        assert_eq!(disks[0].device, "vd0");
        assert_eq!(disks[0].node_name, "fmt0");
        assert_eq!(disks[0].format, "qcow2");
        assert_eq!(disks[0].virtual_size, 64 << 20);
        assert!(!disks[0].read_only);
        assert_eq!(
            disks[1].device, "disk1",
            "a -drive disk goes by its drive name"
        );
        assert_eq!(disks[1].backing.as_deref(), Some("/base.img"));
        assert!(disks[1].read_only);
    }

    #[test]
    fn the_mirror_sends_copy_mode_only_when_it_is_not_the_default() {
        let (_d, p, h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            for want in [None, Some("write-blocking")] {
                let c = next_command(&mut r).expect("mirror");
                assert_eq!(c["execute"], "blockdev-mirror");
                assert_eq!(c["arguments"]["sync"], "full");
                assert_eq!(
                    c["arguments"]["auto-dismiss"], false,
                    "errors stay readable"
                );
                assert_eq!(c["arguments"]["copy-mode"].as_str(), want, "{c}");
                let speed = want.map(|_| 1 << 20);
                assert_eq!(
                    c["arguments"]["speed"].as_u64(),
                    speed,
                    "a cap only when given"
                );
                reply(
                    &mut w,
                    &format!("{{\"return\": {{}}, \"id\": {}}}", c["id"]),
                );
            }
        });
        let mut q = connect(&p);
        q.blockdev_mirror("j", "fmt0", "nbd0", "full", "background", 0)
            .expect("background");
        q.blockdev_mirror("j", "fmt0", "nbd0", "full", "write-blocking", 1 << 20)
            .expect("write-blocking");
        drop(q);
        h.join().expect("server");
    }

    #[test]
    fn block_jobs_parse_and_a_bad_shape_is_a_protocol_error() {
        let (_d, p, _h) = answering(|c| {
            format!(
                "{{\"return\": [{{\"device\": \"m0\", \"type\": \"mirror\", \"len\": 10, \
                 \"offset\": 4, \"ready\": false, \"status\": \"running\", \"busy\": true}}], \
                 \"id\": {}}}\r\n",
                c["id"]
            )
        });
        let mut q = connect(&p);
        let jobs = q.block_jobs().expect("jobs");
        assert_eq!(jobs[0].id, "m0");
        assert_eq!((jobs[0].len, jobs[0].offset, jobs[0].ready), (10, 4, false));
        let (_d, p, _h) =
            answering(|c| format!("{{\"return\": {{\"x\": 1}}, \"id\": {}}}\r\n", c["id"]));
        let mut q = connect(&p);
        assert!(matches!(q.block_jobs(), Err(QmpError::Protocol(_))));
    }
}
