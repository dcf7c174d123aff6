//! The test guest as a libvirt domain.

use crate::guest::GuestImage;
use std::path::{Path, PathBuf};

/// A domain running the test guest, as libvirt will be told about it.
#[derive(Debug, Clone)]
pub struct Domain {
    /// The domain's name (also its QEMU log's).
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The versioned machine type (pinned, so both ends build the same machine).
    pub machine: String,
    /// `-kernel`, `-initrd`, `-append`.
    pub image: GuestImage,
    /// A qcow2 image (path as the hosts see it) on virtio (`vda`), if any.
    pub disk: Option<PathBuf>,
    /// More qcow2 images, on `vdb`, `vdc`, ... (the guest does not use them).
    pub more_disks: Vec<PathBuf>,
    /// The serial console's log (path as the hosts see it).
    pub serial: PathBuf,
    /// The QEMU binary (`<emulator>`); libvirt's default when `None`.
    pub emulator: Option<PathBuf>,
}

impl Domain {
    /// The test guest with 128 MiB on `pc-q35-7.2`, its disk `WORK/NAME.qcow2` and its serial
    /// log `WORK/NAME.serial`.
    pub fn test_guest(name: &str, work: &Path, image: GuestImage) -> Domain {
        Domain {
            name: name.to_string(),
            memory_mib: 128,
            machine: "pc-q35-7.2".into(),
            image,
            disk: Some(work.join(format!("{name}.qcow2"))),
            more_disks: Vec::new(),
            serial: work.join(format!("{name}.serial")),
            emulator: None,
        }
    }

    /// [`Domain::test_guest`] on the QEMU that runs migrating guests in the tests
    /// ([`crate::require::guest_qemu`]: not 7.2, whose TCG loses guest writes).
    pub fn migrating_guest(name: &str, work: &Path, image: GuestImage) -> Domain {
        Domain {
            emulator: Some(crate::require::guest_qemu()),
            ..Domain::test_guest(name, work, image)
        }
    }

    /// The domain XML: TCG, one vCPU, no USB, no balloon, no graphics; the serial console
    /// to a file; any end of the guest (power-off, reboot, crash: the guest's kernel runs
    /// with panic=-1) destroys the domain rather than restarting it.
    pub fn xml(&self) -> String {
        let disk_xml = |p: &Path, dev: char| {
            format!(
                "    <disk type='file' device='disk'>\n\
                 \x20     <driver name='qemu' type='qcow2'/>\n\
                 \x20     <source file='{}'/>\n\
                 \x20     <target dev='vd{dev}' bus='virtio'/>\n\
                 \x20   </disk>\n",
                esc(&p.to_string_lossy())
            )
        };
        let mut disk: String = self.disk.iter().map(|p| disk_xml(p, 'a')).collect();
        for (p, dev) in self.more_disks.iter().zip('b'..='z') {
            disk.push_str(&disk_xml(p, dev));
        }
        let emulator = self
            .emulator
            .as_ref()
            .map(|e| format!("    <emulator>{}</emulator>\n", esc(&e.to_string_lossy())))
            .unwrap_or_default();
        format!(
            "<domain type='qemu'>\n\
             \x20 <name>{name}</name>\n\
             \x20 <memory unit='MiB'>{mem}</memory>\n\
             \x20 <vcpu>1</vcpu>\n\
             \x20 <os>\n\
             \x20   <type arch='x86_64' machine='{machine}'>hvm</type>\n\
             \x20   <kernel>{kernel}</kernel>\n\
             \x20   <initrd>{initrd}</initrd>\n\
             \x20   <cmdline>{append}</cmdline>\n\
             \x20 </os>\n\
             \x20 <features><acpi/></features>\n\
             \x20 <on_poweroff>destroy</on_poweroff>\n\
             \x20 <on_reboot>destroy</on_reboot>\n\
             \x20 <on_crash>destroy</on_crash>\n\
             \x20 <devices>\n\
             {emulator}\
             {disk}\
             \x20   <serial type='file'>\n\
             \x20     <source path='{serial}'/>\n\
             \x20     <target port='0'/>\n\
             \x20   </serial>\n\
             \x20   <controller type='usb' model='none'/>\n\
             \x20   <memballoon model='none'/>\n\
             \x20 </devices>\n\
             </domain>\n",
            name = esc(&self.name),
            mem = self.memory_mib,
            machine = esc(&self.machine),
            kernel = esc(&self.image.kernel.to_string_lossy()),
            initrd = esc(&self.image.initrd.to_string_lossy()),
            append = esc(&self.image.append),
            serial = esc(&self.serial.to_string_lossy()),
        )
    }
}

/// Escapes text for an XML attribute or element.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_escapes_and_pins_the_machine() {
        let image = GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0 a<b".into(),
        };
        let d = Domain::test_guest("vm", Path::new("/w"), image);
        let x = d.xml();
        assert!(x.contains("machine='pc-q35-7.2'"));
        assert!(x.contains("<cmdline>console=ttyS0 a&lt;b</cmdline>"));
        assert!(x.contains("<source file='/w/vm.qcow2'/>"));
        let mut d = d;
        d.more_disks = vec!["/w/data.qcow2".into()];
        assert!(d
            .xml()
            .contains("<source file='/w/data.qcow2'/>\n      <target dev='vdb'"));
        assert!(x.contains("<on_crash>destroy</on_crash>"));
    }
}
