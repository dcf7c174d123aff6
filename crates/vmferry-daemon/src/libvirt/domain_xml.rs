//! What a migration needs to know from a domain's definition (libvirt's XML): its UUID,
//! the disks libvirt would copy, and what libvirt cannot migrate (host devices).
//!
//! Reads only; it never rewrites a definition. Anything it cannot make sense of is an
//! error naming the element, never a panic.

use crate::error::{DaemonError, Result};
use std::path::PathBuf;

/// One `<disk>` that a copy of the storage takes along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlDisk {
    pub target: String,
    pub path: PathBuf,
    pub format: String,
    /// The file this image is an overlay on (`<backingStore>`'s first level, which
    /// libvirt fills in for a running domain), and its format.
    pub backing: Option<(PathBuf, String)>,
}

/// The parts of a domain definition a migration looks at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainFacts {
    pub uuid: String,
    /// Writable disks backed by a file (what `--copy-storage` copies), in order.
    pub disks: Vec<XmlDisk>,
    /// Writable disks that are not files (block devices, network disks): their targets.
    pub other_disks: Vec<String>,
    /// Host devices passed through (`<hostdev>`), described: libvirt refuses to migrate them.
    pub hostdevs: Vec<String>,
}

pub fn parse(domain: &str, xml: &str) -> Result<DomainFacts> {
    let bad = |why: String| {
        DaemonError::Libvirt(format!(
            "the definition of domain {domain} cannot be read: {why}"
        ))
    };
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(bad(format!("its root is <{}>", root.tag_name().name())));
    }
    let uuid = child(root, "uuid")
        .and_then(|u| u.text())
        .map(|t| t.trim().to_string())
        .ok_or_else(|| bad("it has no <uuid>".into()))?;
    let mut facts = DomainFacts {
        uuid,
        ..DomainFacts::default()
    };
    let Some(devices) = child(root, "devices") else {
        return Ok(facts);
    };
    for dev in devices.children().filter(|c| c.is_element()) {
        match dev.tag_name().name() {
            "hostdev" => {
                let kind = dev.attribute("type").unwrap_or("unknown");
                facts.hostdevs.push(format!("a {kind} host device"));
            }
            "disk" => {
                if dev.attribute("device").unwrap_or("disk") != "disk"
                    || child(dev, "readonly").is_some()
                    || child(dev, "shareable").is_some()
                {
                    continue;
                }
                let target = child(dev, "target")
                    .and_then(|t| t.attribute("dev"))
                    .ok_or_else(|| bad("a <disk> has no <target dev=...>".into()))?
                    .to_string();
                let source = child(dev, "source");
                match (dev.attribute("type").unwrap_or("file"), source) {
                    ("file", Some(src)) => {
                        let path = src
                            .attribute("file")
                            .ok_or_else(|| bad(format!("disk {target} has no source file")))?;
                        let format = child(dev, "driver")
                            .and_then(|d| d.attribute("type"))
                            .unwrap_or("raw")
                            .to_string();
                        facts.disks.push(XmlDisk {
                            backing: backing_file(dev),
                            target,
                            path: PathBuf::from(path),
                            format,
                        });
                    }
                    // An empty drive (no medium) has nothing to copy.
                    ("file", None) => {}
                    _ => facts.other_disks.push(target),
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// A disk's backing file: `<backingStore type='file'><format type=.../><source file=.../>`.
/// An empty `<backingStore/>` (the end of the chain) or one that is not a file is none.
fn backing_file(disk: roxmltree::Node) -> Option<(PathBuf, String)> {
    let b = child(disk, "backingStore")?;
    if b.attribute("type") != Some("file") {
        return None;
    }
    let path = child(b, "source")?.attribute("file")?;
    let format = child(b, "format")
        .and_then(|f| f.attribute("type"))
        .unwrap_or("raw");
    Some((PathBuf::from(path), format.to_string()))
}

/// The first child element of `n` called `name`.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu'>
  <name>web1</name>
  <uuid>6f1c0d2e-0000-4000-8000-000000000001</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore type='file' index='2'>
          <format type='raw'/>
          <source file='/var/lib/libvirt/images/root.raw'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/web1-data.raw'/>
      <backingStore/>
      <target dev='vde' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/installer.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/shared/data.raw'/>
      <target dev='vdc' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn writable_file_disks_are_copied_and_the_rest_is_told_apart() {
        let f = parse("web1", XML).expect("parse");
        assert_eq!(f.uuid, "6f1c0d2e-0000-4000-8000-000000000001");
        assert_eq!(
            f.disks,
            vec![
                XmlDisk {
                    target: "vda".into(),
                    path: "/var/lib/libvirt/images/web1.qcow2".into(),
                    format: "qcow2".into(),
                    // Only the first level: an overlay is made on its direct backing file.
                    backing: Some(("/var/lib/libvirt/images/base.qcow2".into(), "qcow2".into())),
                },
                XmlDisk {
                    target: "vde".into(),
                    path: "/var/lib/libvirt/images/web1-data.raw".into(),
                    format: "raw".into(),
                    backing: None,
                }
            ]
        );
        assert_eq!(f.other_disks, vec!["vdb".to_string()]);
        assert!(f.hostdevs.is_empty());
    }

    #[test]
    fn host_devices_are_found_and_garbage_is_an_error_naming_the_domain() {
        let xml = XML.replace(
            "</devices>",
            "<hostdev mode='subsystem' type='pci'/></devices>",
        );
        let f = parse("web1", &xml).expect("parse");
        assert_eq!(f.hostdevs, vec!["a pci host device".to_string()]);
        for bad in ["<domain>", "<network/>", "<domain><devices/></domain>"] {
            let e = parse("web1", bad).expect_err(bad).to_string();
            assert!(e.contains("domain web1"), "{e}");
        }
    }
}
