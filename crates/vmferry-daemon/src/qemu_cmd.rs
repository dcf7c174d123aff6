//! The QEMU command line for a managed VM, built from its spec.
//!
//! Source and destination must build the same machine from the same spec, or QEMU refuses
//! the incoming state: everything that shapes the guest comes from [`VmSpec`] only, never
//! from the host it runs on.

use std::path::Path;
use vmferry_proto::{Accel, VmSpec};

/// Per-VM files on the daemon's host, and how this host opens the VM's disks.
#[derive(Debug, Clone)]
pub struct VmPaths<'a> {
    pub qmp: &'a Path,
    pub serial_log: &'a Path,
    /// QEMU's `cache=` for each of the spec's disks, in order; missing entries mean
    /// `none` (O_DIRECT: what shared storage needs for a safe migration).
    pub disk_cache: &'a [DiskCache],
}

/// How QEMU caches a disk on this host. Not part of the guest's shape: source and
/// destination may differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCache {
    /// O_DIRECT: no host page cache, so the destination reads what the source wrote.
    None,
    /// For a filesystem without O_DIRECT (tmpfs); coherent only on one host.
    Writeback,
}

impl DiskCache {
    fn as_qemu(self) -> &'static str {
        match self {
            DiskCache::None => "none",
            DiskCache::Writeback => "writeback",
        }
    }
}

/// Arguments after the binary name. `incoming` starts the QEMU paused, waiting for a
/// migration (`-S -incoming defer`).
pub fn qemu_args(spec: &VmSpec, paths: &VmPaths<'_>, incoming: bool) -> Vec<String> {
    let accel = match spec.accel {
        Accel::Kvm => "kvm",
        // Auto must have been resolved before; TCG is the safe reading.
        Accel::Tcg | Accel::Auto => "tcg",
    };
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", spec.name),
        "-machine".into(),
        format!("{},accel={accel}", spec.machine.as_deref().unwrap_or("q35")),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", paths.serial_log.display()),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", paths.qmp.display()),
    ];
    if let Some(k) = &spec.kernel {
        a.push("-kernel".into());
        a.push(k.clone());
    }
    if let Some(i) = &spec.initrd {
        a.push("-initrd".into());
        a.push(i.clone());
    }
    if let Some(ap) = &spec.append {
        a.push("-append".into());
        a.push(ap.clone());
    }
    for (n, d) in spec.disks.iter().enumerate() {
        let format = if d.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let cache = paths
            .disk_cache
            .get(n)
            .copied()
            .unwrap_or(DiskCache::None)
            .as_qemu();
        a.push("-drive".into());
        a.push(format!(
            "file={d},if=virtio,format={format},cache={cache},id=disk{n}"
        ));
    }
    if incoming {
        a.push("-S".into());
        a.push("-incoming".into());
        a.push("defer".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmferry_proto::VmName;

    #[test]
    fn an_incoming_vm_starts_paused_and_deferred() {
        let spec = VmSpec {
            name: VmName::new("g").expect("valid"),
            memory_mib: 128,
            cpus: 2,
            kernel: Some("/k".into()),
            initrd: None,
            append: Some("console=ttyS0 quiet".into()),
            disks: vec!["/d.qcow2".into()],
            accel: Accel::Tcg,
            machine: Some("pc-q35-7.2".into()),
        };
        let p = VmPaths {
            qmp: Path::new("/s/qmp.sock"),
            serial_log: Path::new("/s/serial.log"),
            disk_cache: &[DiskCache::Writeback],
        };
        let a = qemu_args(&spec, &p, true);
        let joined = a.join(" ");
        assert!(joined.contains("-incoming defer"), "{joined}");
        assert!(joined.contains("-S"));
        assert!(joined.contains("-machine pc-q35-7.2,accel=tcg"), "{joined}");
        assert!(
            joined.contains("file=/d.qcow2,if=virtio,format=qcow2,cache=writeback,id=disk0"),
            "{joined}"
        );
        assert!(joined.contains("format=qcow2"));
        // the append string stays one argument
        assert!(a.iter().any(|x| x == "console=ttyS0 quiet"));
        assert!(!qemu_args(&spec, &p, false).join(" ").contains("incoming"));
    }
}
