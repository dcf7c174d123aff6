//! Disk copy: what the controller asks for (`--copy-storage`), what the source says of
//! each disk it copies, and the check a destination disk must pass before any byte moves.
//!
//! Pure data and rules, no I/O. A disk is named by the guest device it is attached to
//! (its `-device` id, or for `-drive` disks the drive's name), never by a node name:
//! node names are each QEMU's own business.

use serde::{Deserialize, Serialize};

/// Which part of each disk is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageMode {
    /// The whole disk, backing chain flattened into the destination image.
    All,
    /// Only the top image: the destination has the same backing file.
    Inc,
}

impl StorageMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::All => "all",
            StorageMode::Inc => "inc",
        }
    }
}

impl std::str::FromStr for StorageMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(StorageMode::All),
            "inc" => Ok(StorageMode::Inc),
            other => Err(format!(
                "copy-storage mode '{other}' is neither 'all' nor 'inc'"
            )),
        }
    }
}

/// How the mirror treats the guest's writes while it copies (QEMU's `copy-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Writes land on the source and are copied later (may not converge for a guest that
    /// writes faster than the link).
    #[default]
    Background,
    /// Each guest write waits until it reached the destination too: always converges.
    WriteBlocking,
}

impl CopyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

impl std::str::FromStr for CopyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "background" => Ok(CopyMode::Background),
            "write-blocking" => Ok(CopyMode::WriteBlocking),
            other => Err(format!(
                "storage copy mode '{other}' is neither 'background' nor 'write-blocking'"
            )),
        }
    }
}

/// `--copy-storage`: copy the guest's writable disks beside its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyStorage {
    pub mode: StorageMode,
    #[serde(default)]
    pub copy_mode: CopyMode,
}

/// How many disks one migration copies at most (each is a stream of its own).
pub const MAX_DISKS: usize = 64;

/// A disk as one QEMU sees it: what the check compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskShape {
    /// The guest device it is attached to.
    pub device: String,
    /// The image format QEMU opened (`qcow2`, `raw`, ...).
    pub format: String,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// The backing file of the top image, if any (as the image names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// Whether QEMU opened it read-only (never copied from the source; refused as a
    /// destination).
    #[serde(default)]
    pub read_only: bool,
}

impl DiskShape {
    /// Why the destination disk `dst` cannot receive this source disk in `mode`, naming
    /// the disk and both values; `None` when it can.
    pub fn mismatch(&self, dst: &DiskShape, mode: StorageMode) -> Option<String> {
        let d = &self.device;
        if dst.read_only {
            return Some(format!(
                "disk {d}: the destination opened it read-only; it must be writable"
            ));
        }
        if dst.format != self.format {
            return Some(format!(
                "disk {d}: the destination image is {}, the source's {} (create it with \
                 qemu-img create -f {})",
                dst.format, self.format, self.format
            ));
        }
        if dst.virtual_size < self.virtual_size {
            return Some(format!(
                "disk {d}: the destination image holds {} bytes, the source's {} bytes",
                dst.virtual_size, self.virtual_size
            ));
        }
        if mode == StorageMode::Inc && dst.backing.is_none() {
            return Some(format!(
                "disk {d}: --copy-storage inc needs the destination image to be an overlay \
                 on the same backing file as the source's ({})",
                self.backing.as_deref().unwrap_or("which has none")
            ));
        }
        None
    }
}

/// How far one disk's copy is, as the source reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskProgress {
    pub device: String,
    /// Bytes copied, and to copy in all (both grow while the guest writes).
    pub copied: u64,
    pub total: u64,
    /// Source and destination are in sync; the guest's writes are mirrored from now on.
    pub ready: bool,
    /// How long the copy took to get in sync, from the start of the first disk's mirror
    /// (to within the source's poll, 20 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync_ms: Option<u64>,
}

/// Pairs each source disk with the destination's disk of the same device, or says which
/// is missing; checks every pair. The destination's other disks are left alone.
pub fn match_disks<'a>(
    source: &'a [DiskShape],
    destination: &'a [DiskShape],
    mode: StorageMode,
) -> Result<Vec<(&'a DiskShape, &'a DiskShape)>, String> {
    let mut pairs = Vec::with_capacity(source.len());
    for s in source {
        let d = destination
            .iter()
            .find(|d| d.device == s.device)
            .ok_or_else(|| {
                let have: Vec<&str> = destination.iter().map(|d| d.device.as_str()).collect();
                format!(
                    "disk {}: the destination QEMU has no disk attached to a device of that id \
                     (it has: {})",
                    s.device,
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                )
            })?;
        if let Some(why) = s.mismatch(d, mode) {
            return Err(why);
        }
        pairs.push((s, d));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(device: &str, format: &str, size: u64) -> DiskShape {
        DiskShape {
            device: device.into(),
            format: format.into(),
            virtual_size: size,
            backing: None,
            read_only: false,
        }
    }

    #[test]
    fn a_destination_of_the_same_shape_or_larger_takes_the_disk() {
        let s = disk("vd0", "qcow2", 1 << 30);
        assert_eq!(s.mismatch(&s, StorageMode::All), None);
        assert_eq!(
            s.mismatch(&disk("vd0", "qcow2", 2 << 30), StorageMode::All),
            None
        );
    }

    #[test]
    fn each_mismatch_names_the_disk_and_both_values() {
        let s = disk("vd0", "qcow2", 1 << 30);
        let small = s.mismatch(&disk("vd0", "qcow2", 1 << 20), StorageMode::All);
        let small = small.expect("smaller is refused");
        assert!(small.contains("vd0") && small.contains("1048576") && small.contains("1073741824"));
        let fmt = s.mismatch(&disk("vd0", "raw", 1 << 30), StorageMode::All);
        assert!(fmt
            .expect("other format")
            .contains("raw, the source's qcow2"));
        let mut ro = disk("vd0", "qcow2", 1 << 30);
        ro.read_only = true;
        assert!(s
            .mismatch(&ro, StorageMode::All)
            .expect("read-only")
            .contains("read-only"));
        let inc = s.mismatch(&disk("vd0", "qcow2", 1 << 30), StorageMode::Inc);
        assert!(inc.expect("inc without backing").contains("overlay"));
    }

    #[test]
    fn disks_pair_by_device_and_a_missing_one_is_named() {
        let src = vec![disk("vd0", "qcow2", 10), disk("vd1", "raw", 10)];
        let dst = vec![
            disk("vd1", "raw", 10),
            disk("vd0", "qcow2", 10),
            disk("x", "raw", 1),
        ];
        let pairs = match_disks(&src, &dst, StorageMode::All).expect("all there");
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(|(s, d)| s.device == d.device));
        let e = match_disks(&src, &dst[..1], StorageMode::All).expect_err("vd0 missing");
        assert!(e.contains("disk vd0") && e.contains("it has: vd1"), "{e}");
    }

    #[test]
    fn modes_parse_and_print_their_cli_words() {
        for m in [StorageMode::All, StorageMode::Inc] {
            assert_eq!(m.as_str().parse::<StorageMode>(), Ok(m));
        }
        for m in [CopyMode::Background, CopyMode::WriteBlocking] {
            assert_eq!(m.as_str().parse::<CopyMode>(), Ok(m));
            let json = serde_json::to_string(&m).expect("serialises");
            assert_eq!(json, format!("\"{}\"", m.as_str()));
        }
        assert!("some".parse::<StorageMode>().is_err());
    }
}
