//! What the cookie carries for a libvirt-managed domain (`vmferry migrate --libvirt`):
//! the domain, the per-migration directory both daemons use for libvirt's sockets, and the
//! disks the destination must have before libvirt copies them.
//!
//! The two daemons never let a peer name a path of its own choosing: the destination
//! accepts `dir` only when it is its own migrations directory joined with the migration
//! id ([`LibvirtPlan::expected_dir`]), and creates disk images only at the paths its
//! own libvirt domain definition will use (the source's, which libvirt keeps as they are).

use crate::names::MigrationId;
use crate::preamble::StreamKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The socket a source's libvirtd dials for the destination's libvirt RPC (the
/// peer-to-peer `desturi`).
pub const LIBVIRT_SOCKET: &str = "libvirt.sock";
/// The socket the RAM streams use: the destination QEMU listens on it (libvirt tells it
/// to), the source daemon on the source host.
pub const MIGRATE_SOCKET: &str = "migrate.sock";
/// The socket of the disk copy (QEMU's NBD server on the destination).
pub const NBD_SOCKET: &str = "nbd.sock";

/// How many connections of one kind a libvirt migration may make (per kind).
pub const MAX_CONNECTIONS: u16 = 0x1000;

/// The tunnel stream id of the `k`th connection of `kind` in a libvirt migration: QEMU's
/// RAM streams count from 0, the disks' from 0x1000, libvirt's RPC from 0x2000. `None`
/// for a kind a libvirt migration does not carry, or too many connections.
pub fn tunnel_stream(kind: StreamKind, k: u16) -> Option<u16> {
    if k >= MAX_CONNECTIONS {
        return None;
    }
    let base = match kind {
        StreamKind::Qemu => 0,
        StreamKind::Nbd => MAX_CONNECTIONS,
        StreamKind::Libvirt => 2 * MAX_CONNECTIONS,
        StreamKind::Peer => return None,
    };
    Some(base + k)
}

/// The kind and index a tunnel stream id stands for ([`tunnel_stream`]'s inverse).
pub fn tunnel_kind(id: u16) -> Option<(StreamKind, u16)> {
    let kind = match id / MAX_CONNECTIONS {
        0 => StreamKind::Qemu,
        1 => StreamKind::Nbd,
        2 => StreamKind::Libvirt,
        _ => return None,
    };
    Some((kind, id % MAX_CONNECTIONS))
}

/// A libvirt migration's half of the cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtPlan {
    /// The domain's name (the same on both hosts).
    pub domain: String,
    /// Its UUID, which the destination checks no domain of its own already has.
    pub uuid: String,
    /// The per-migration directory, one path naming a directory on each host.
    pub dir: PathBuf,
    /// The disks libvirt copies (with `--copy-storage`), in the domain's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<LibvirtDisk>,
    /// The destination's libvirt URI (`qemu:///system`): the source's libvirtd reaches
    /// it as `DRIVER+unix://PATH?socket=DIR/libvirt.sock`. Prepare fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_uri: Option<String>,
    /// The libvirt release on each side (`9.0.0`), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_libvirt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_libvirt: Option<String>,
}

impl LibvirtPlan {
    /// The directory a migration with this id uses under a daemon's migrations directory.
    pub fn expected_dir(migrations_dir: &Path, id: &MigrationId) -> PathBuf {
        migrations_dir.join(id.as_str())
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One disk of the domain that libvirt copies: the destination needs an image at the
/// same path with the same virtual size before libvirt's NBD copy starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtDisk {
    /// The guest's device name (`vda`).
    pub target: String,
    /// The image's path on the source (and on the destination).
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// The image this one is an overlay on, if any: with `--copy-storage inc` libvirt
    /// copies only this image, and the destination's must be an overlay on the same
    /// backing file (which must be there already). Absent from a peer of an earlier version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<LibvirtBacking>,
}

/// The backing file of an overlay, as the source's libvirt names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtBacking {
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_stream_ids_round_trip_per_kind_and_the_peer_link_has_none() {
        for kind in [StreamKind::Qemu, StreamKind::Nbd, StreamKind::Libvirt] {
            for k in [0, 1, MAX_CONNECTIONS - 1] {
                let id = tunnel_stream(kind, k).expect("id");
                assert_eq!(tunnel_kind(id), Some((kind, k)));
            }
            assert_eq!(tunnel_stream(kind, MAX_CONNECTIONS), None);
        }
        assert_eq!(tunnel_stream(StreamKind::Peer, 0), None);
        assert_eq!(tunnel_kind(3 * MAX_CONNECTIONS), None);
    }

    #[test]
    fn a_plan_round_trips_and_names_its_sockets_under_its_dir() {
        let id = MigrationId::new("0123456789abcdef0123456789abcdef".to_string()).expect("id");
        let dir = LibvirtPlan::expected_dir(Path::new("/run/vmferry/migrations"), &id);
        let plan = LibvirtPlan {
            domain: "web1".into(),
            uuid: "6f1c0d2e-0000-4000-8000-000000000001".into(),
            dir: dir.clone(),
            disks: vec![LibvirtDisk {
                target: "vda".into(),
                path: "/var/lib/libvirt/images/web1.qcow2".into(),
                format: "qcow2".into(),
                capacity: 1 << 30,
                backing: Some(LibvirtBacking {
                    path: "/var/lib/libvirt/images/base.qcow2".into(),
                    format: "qcow2".into(),
                }),
            }],
            destination_uri: Some("qemu:///system".into()),
            source_libvirt: Some("9.0.0".into()),
            destination_libvirt: None,
        };
        let json = serde_json::to_string(&plan).expect("json");
        let back: LibvirtPlan = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, plan);
        assert_eq!(
            plan.socket(MIGRATE_SOCKET),
            dir.join("migrate.sock"),
            "sockets live in the migration's directory"
        );
        assert!(dir.ends_with(id.as_str()));
    }
}
