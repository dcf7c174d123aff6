//! What a source and a destination QEMU must agree on before a migration can load: the
//! guest's RAM size and the machine type (which fixes the RAM blocks and the device
//! layout), and the names of its RAM blocks (the main RAM's block is `pc.ram`, or the id
//! of its memory backend: a state whose blocks the destination lacks cannot load). Read
//! with `query-memory-size-summary` (QEMU 2.11+), `qom-get` of `/machine`'s `type`
//! (QEMU 1.2+) and HMP `info ramblock` (QEMU 2.10+; no QMP command lists RAM blocks).
//!
//! This module only reads; it never decides what a mismatch means.

use crate::client::Qmp;
use crate::error::QmpError;
use serde::Deserialize;
use serde_json::json;

/// A QEMU's migration-relevant shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineFacts {
    /// Boot RAM in bytes (`base-memory`; hot-plugged memory is not counted).
    pub ram_bytes: u64,
    /// The versioned machine type, e.g. `pc-q35-7.2` (an alias like `q35` resolved).
    pub machine: String,
    /// RAM block names, sorted (empty if QEMU would not list them).
    pub ram_blocks: Vec<String>,
    /// The devices given on the command line or hot-plugged (`-device`): `id (type)` for
    /// those with an id, the type alone for the others; sorted.
    pub devices: Vec<String>,
}

#[derive(Deserialize)]
struct MemorySummary {
    #[serde(rename = "base-memory")]
    base_memory: u64,
}

impl Qmp {
    /// Every machine type this QEMU can build (`query-machines`): names and aliases.
    pub fn machine_types(&mut self) -> Result<Vec<String>, QmpError> {
        let list = self.execute("query-machines", None)?;
        let list = list.as_array().ok_or_else(|| {
            QmpError::Protocol(format!("query-machines answered {list}, not a list"))
        })?;
        let mut names = Vec::new();
        for m in list {
            for key in ["name", "alias"] {
                if let Some(n) = m[key].as_str() {
                    names.push(n.to_string());
                }
            }
        }
        Ok(names)
    }

    /// The versioned machine type this QEMU runs (`pc-q35-7.2`), whatever alias (`q35`)
    /// started it.
    pub fn machine_type(&mut self) -> Result<String, QmpError> {
        let ty = self.execute(
            "qom-get",
            Some(json!({ "path": "/machine", "property": "type" })),
        )?;
        let ty = ty.as_str().ok_or_else(|| {
            QmpError::Protocol(format!("qom-get /machine type answered {ty}, not a name"))
        })?;
        Ok(machine_name(ty).to_string())
    }

    /// The RAM size and machine type of this QEMU.
    pub fn machine_facts(&mut self) -> Result<MachineFacts, QmpError> {
        let mem = self.execute("query-memory-size-summary", None)?;
        let mem: MemorySummary = serde_json::from_value(mem).map_err(|e| {
            QmpError::Protocol(format!("the reply to query-memory-size-summary: {e}"))
        })?;
        let machine = self.machine_type()?;
        let blocks = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": "info ramblock" })),
            )
            .ok()
            .and_then(|v| v.as_str().map(ram_block_names))
            .unwrap_or_default();
        let mut devices = Vec::new();
        for (path, named) in [
            ("/machine/peripheral", true),
            ("/machine/peripheral-anon", false),
        ] {
            let list = self.execute("qom-list", Some(json!({ "path": path })))?;
            devices.extend(device_entries(&list, named));
        }
        devices.sort();
        Ok(MachineFacts {
            ram_bytes: mem.base_memory,
            machine,
            ram_blocks: blocks,
            devices,
        })
    }
}

/// `pc-q35-7.2-machine` (the QOM type) → `pc-q35-7.2` (the `-machine` name).
fn machine_name(qom_type: &str) -> &str {
    qom_type.strip_suffix("-machine").unwrap_or(qom_type)
}

/// The devices in a `qom-list` of a peripheral container: children are typed
/// `child<TYPE>`; `named` containers hold devices by their id.
fn device_entries(list: &serde_json::Value, named: bool) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let ty = p["type"]
                .as_str()?
                .strip_prefix("child<")?
                .strip_suffix('>')?;
            let name = p["name"].as_str()?;
            Some(if named {
                format!("{name} ({ty})")
            } else {
                ty.to_string()
            })
        })
        .collect()
}

/// The block names of HMP `info ramblock`'s table (first column; a header line first).
fn ram_block_names(table: &str) -> Vec<String> {
    let mut v: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_read_from_qom_children_by_id_or_type() {
        let named = json!([
            {"name": "type", "type": "string"},
            {"name": "rng0", "type": "child<virtio-rng-pci>"}
        ]);
        let anon = json!([{"name": "device[0]", "type": "child<virtio-balloon-pci>"}]);
        assert_eq!(device_entries(&named, true), vec!["rng0 (virtio-rng-pci)"]);
        assert_eq!(device_entries(&anon, false), vec!["virtio-balloon-pci"]);
        assert!(device_entries(&json!("odd"), true).is_empty());
    }

    #[test]
    fn ram_block_names_come_from_the_first_column_sorted() {
        let t = "              Block Name    PSize              Offset               Used              Total\r\n                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000\r\n    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000\r\n";
        assert_eq!(ram_block_names(t), vec!["/rom@etc/acpi/tables", "pc.ram"]);
        assert!(ram_block_names("").is_empty());
    }

    #[test]
    fn a_qom_machine_type_reads_as_the_name_given_to_machine() {
        assert_eq!(machine_name("pc-q35-7.2-machine"), "pc-q35-7.2");
        assert_eq!(machine_name("pc-i440fx-10.0-machine"), "pc-i440fx-10.0");
        assert_eq!(machine_name("odd"), "odd");
    }
}
