//! The migration cookie: what one phase hands the next, carried by the controller over its
//! authenticated control connections.
//!
//! The cookie holds the trust of one migration: the fingerprints of the ephemeral
//! certificates each side made for it. Because the controller is authenticated to both
//! daemons, the daemons need no trust relationship of their own. A cookie must never carry
//! a private key.

use crate::control::{SpecError, VmSpec};
use crate::names::MigrationId;
use serde::{Deserialize, Serialize};

/// How the data channel between the daemons authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum DataAuth {
    /// Each side pins the other's per-migration certificate (fingerprints in the cookie).
    #[default]
    Pinned,
    /// Both sides use their CA-signed host certificates; the source verifies the
    /// destination's certificate for `tls_hostname` (default: the host in the data address).
    X509 { tls_hostname: Option<String> },
}

/// How a migration's streams travel between the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The source dials the destination's data address, one TLS connection per stream.
    Direct,
    /// The destination dials the source's data address (a destination that accepts no
    /// inbound connection), one TLS connection per stream.
    Reverse,
    /// All streams multiplexed in one TLS connection from the source to the destination's
    /// control port (the one port that must be open anyway).
    Tunnel,
}

impl Transport {
    /// The order `auto` tries them in: the cheapest first.
    pub const AUTO_ORDER: [Transport; 3] =
        [Transport::Direct, Transport::Reverse, Transport::Tunnel];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Direct => "direct",
            Transport::Reverse => "reverse",
            Transport::Tunnel => "tunnel",
        }
    }

    /// The code carried in the stream preamble.
    pub fn code(self) -> u8 {
        match self {
            Transport::Direct => 1,
            Transport::Reverse => 2,
            Transport::Tunnel => 3,
        }
    }

    pub fn parse(s: &str) -> Option<Transport> {
        Transport::AUTO_ORDER.into_iter().find(|t| t.as_str() == s)
    }

    pub fn from_code(c: u8) -> Option<Transport> {
        match c {
            1 => Some(Transport::Direct),
            2 => Some(Transport::Reverse),
            3 => Some(Transport::Tunnel),
            _ => None,
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What the operator asked for: one transport, or `auto` (try each in turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransportChoice {
    #[default]
    Auto,
    Direct,
    Reverse,
    Tunnel,
}

impl TransportChoice {
    /// The transports to try, in order.
    pub fn candidates(self) -> Vec<Transport> {
        match self {
            TransportChoice::Auto => Transport::AUTO_ORDER.to_vec(),
            TransportChoice::Direct => vec![Transport::Direct],
            TransportChoice::Reverse => vec![Transport::Reverse],
            TransportChoice::Tunnel => vec![Transport::Tunnel],
        }
    }
}

/// A name that is not a transport vmferry knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport '{0}' (expected auto, direct, reverse or tunnel)")]
pub struct UnknownTransport(pub String);

impl std::str::FromStr for TransportChoice {
    type Err = UnknownTransport;
    fn from_str(s: &str) -> Result<Self, UnknownTransport> {
        match s {
            "auto" => Ok(TransportChoice::Auto),
            "direct" => Ok(TransportChoice::Direct),
            "reverse" => Ok(TransportChoice::Reverse),
            "tunnel" => Ok(TransportChoice::Tunnel),
            other => Err(UnknownTransport(other.to_string())),
        }
    }
}

/// The compression levels `--compress-level` accepts (zstd's negative levels are faster).
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = -7..=19;

/// A stream's compression, as agreed through the migration's cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "algorithm")]
pub enum Compression {
    #[default]
    None,
    Zstd {
        level: i32,
    },
}

impl Compression {
    pub fn is_none(&self) -> bool {
        matches!(self, Compression::None)
    }

    /// Refuses a level zstd does not have (a peer's cookie, or a typo).
    pub fn check(&self) -> Result<(), CompressionLevelError> {
        match self {
            Compression::None => Ok(()),
            Compression::Zstd { level } if COMPRESSION_LEVELS.contains(level) => Ok(()),
            Compression::Zstd { level } => Err(CompressionLevelError { level: *level }),
        }
    }
}

/// A zstd level outside [`COMPRESSION_LEVELS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "zstd level {level} is not one vmferry uses (from {} to {})",
    COMPRESSION_LEVELS.start(),
    COMPRESSION_LEVELS.end()
)]
pub struct CompressionLevelError {
    pub level: i32,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Zstd { level } => write!(f, "zstd (level {level})"),
        }
    }
}

/// What the controller asks of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MigrationOptions {
    /// Number of multifd channels; 0 = a single stream.
    #[serde(default)]
    pub multifd: u32,
    /// QEMU's max-bandwidth in bytes per second; 0 = unlimited (QEMU's default is a cap).
    #[serde(default)]
    pub max_bandwidth: u64,
    #[serde(default)]
    pub data_auth: DataAuth,
    /// Downtime QEMU may take at the switch-over, in milliseconds (0 = QEMU's default).
    #[serde(default)]
    pub downtime_limit_ms: u64,
    /// The transport asked for; `None` lets the source daemon's configured default decide.
    #[serde(default)]
    pub transport: Option<TransportChoice>,
    /// The compression filter on every stream (off unless asked for).
    #[serde(default, skip_serializing_if = "Compression::is_none")]
    pub compress: Compression,
    /// How long the migration lives without hearing from its controller, in ms; 0 = no
    /// lease (a version-1 controller). See [`crate::phase`] for what expiry does.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lease_ms: u64,
    /// Fail when nothing moved (no byte, no change of QEMU's status) for this long, in
    /// ms; 0 = [`DEFAULT_STALL_TIMEOUT_MS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stall_timeout_ms: u64,
    /// QEMU's auto-converge: throttle the guest's CPUs while pre-copy does not converge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<AutoConverge>,
    /// Post-copy: switch once the first full pre-copy pass is done without converging,
    /// or after `after_ms` of pre-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostCopy>,
    /// Copy the guest's writable disks too (local storage on both hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_storage: Option<crate::disk::CopyStorage>,
}

impl MigrationOptions {
    /// QEMU's connections: the main channel, one per multifd channel, and post-copy's
    /// preempt channel. Saturates rather than overflows.
    pub fn streams(&self) -> u32 {
        let preempt = self.postcopy.is_some_and(|p| p.preempt);
        self.multifd
            .saturating_add(1)
            .saturating_add(u32::from(preempt))
    }
}

/// When a migration switches to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PostCopy {
    /// Switch after this much pre-copy (ms) rather than after the first full pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// QEMU's postcopy-preempt: pages the destination faults on travel on a connection
    /// of their own instead of queueing behind the background stream. Set by the source
    /// when its QEMU has it, kept by the destination only when its QEMU has it too and
    /// the two speak the same preempt protocol ([`PostCopy::preempt_between`]). It adds
    /// one stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preempt: bool,
}

impl PostCopy {
    /// Whether QEMUs of these releases can use postcopy-preempt together: QEMU 8.0
    /// changed the preempt channel's protocol (before, 7.2's was experimental), so the
    /// releases must both be 8.0 or newer, or be the same release. An unknown release
    /// is not guessed at.
    pub fn preempt_between(source: Option<QemuRelease>, destination: Option<QemuRelease>) -> bool {
        match (source, destination) {
            (Some(s), Some(d)) => {
                let v8 = |r: QemuRelease| (r.major, r.minor) >= (8, 0);
                (v8(s) && v8(d)) || (s.major, s.minor) == (d.major, d.minor)
            }
            _ => false,
        }
    }
}

/// A QEMU release, as its QMP greeting gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuRelease {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
}

impl std::fmt::Display for QemuRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// How auto-converge throttles: the first step and each further one, in percent of the
/// guest's CPU time (QEMU's cpu-throttle-initial and cpu-throttle-increment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoConverge {
    pub initial: u8,
    pub increment: u8,
}

impl Default for AutoConverge {
    /// QEMU's own defaults.
    fn default() -> Self {
        AutoConverge {
            initial: 20,
            increment: 10,
        }
    }
}

/// A throttle QEMU would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auto-converge throttle {what} {value}% is out of range (1 to {max})")]
pub struct ThrottleError {
    pub what: &'static str,
    pub value: u8,
    pub max: u8,
}

impl AutoConverge {
    pub fn check(&self) -> Result<(), ThrottleError> {
        if !(1..=99).contains(&self.initial) {
            return Err(ThrottleError {
                what: "initial",
                value: self.initial,
                max: 99,
            });
        }
        if !(1..=100).contains(&self.increment) {
            return Err(ThrottleError {
                what: "increment",
                value: self.increment,
                max: 100,
            });
        }
        Ok(())
    }
}

/// How long a migration may stand still before it fails, unless the controller says.
pub const DEFAULT_STALL_TIMEOUT_MS: u64 = 30_000;

impl MigrationOptions {
    pub fn stall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(match self.stall_timeout_ms {
            0 => DEFAULT_STALL_TIMEOUT_MS,
            ms => ms,
        })
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Bounds on a lease: shorter would expire between a controller's polls, longer would
/// leave a dead controller's guest paused for too long.
pub const LEASE_MS: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;

/// Upper bound on multifd channels, so a cookie cannot make a daemon open absurd numbers
/// of connections.
pub const MAX_MULTIFD: u32 = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie {
    pub migration: MigrationId,
    pub options: MigrationOptions,
    /// The VM's definition, for a destination that starts the QEMU itself (managed VMs).
    #[serde(default)]
    pub vm: Option<VmSpec>,
    /// Whether the source guest was running at begin: the destination resumes it only then.
    pub source_running: bool,
    /// `sha256:...` of the source's ephemeral certificate (pinned mode).
    #[serde(default)]
    pub source_fingerprint: Option<String>,
    /// `sha256:...` of the destination's ephemeral certificate (pinned mode).
    #[serde(default)]
    pub destination_fingerprint: Option<String>,
    /// `host:port` the source dials for data. Filled by the controller if the destination
    /// did not advertise one.
    #[serde(default)]
    pub data_address: Option<String>,
    /// `host:port` the destination dials for data when the transport is reverse.
    #[serde(default)]
    pub source_data_address: Option<String>,
    /// `host:port` of the destination's control port, which the tunnel rides on.
    #[serde(default)]
    pub destination_control_address: Option<String>,
    /// The transport the controller settled on, and why earlier ones were passed over
    /// (e.g. "direct: 10.0.0.2:4701 timed out after 2 s"), for status and the result.
    #[serde(default)]
    pub transport: Option<Transport>,
    #[serde(default)]
    pub transport_notes: Vec<String>,
    /// The source QEMU's RAM size and machine type, which the destination's must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_machine: Option<MachineShape>,
    /// Whether the daemons open a peer link beside the streams (both speak protocol
    /// version 2; the controller decides).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peer_link: bool,
    /// The source QEMU's release, where it announced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_qemu: Option<QemuRelease>,
    /// The destination QEMU's release (prepare fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_qemu: Option<QemuRelease>,
    /// With `copy_storage`: the disks the source copies, in stream order (disk k is NBD
    /// stream k).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::disk::DiskShape>,
    /// A libvirt-managed domain: what libvirt's migration needs on both hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::libvirt::LibvirtPlan>,
}

/// What a destination QEMU must match for the source's state to load into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub ram_bytes: u64,
    /// The versioned machine type, e.g. `pc-q35-7.2`.
    pub machine: String,
    /// RAM block names, sorted; empty when unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ram_blocks: Vec<String>,
    /// `-device`s: `id (type)`, or the type for those without an id; sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

impl MachineShape {
    /// Why a destination of shape `dst` cannot take this source's state, naming both
    /// values; `None` when they fit.
    pub fn mismatch(&self, dst: &MachineShape) -> Option<String> {
        let mib = |b: u64| b / (1 << 20);
        if self.ram_bytes != dst.ram_bytes {
            return Some(format!(
                "the destination QEMU has {} MiB of RAM, the source {} MiB (start it with -m {}M)",
                mib(dst.ram_bytes),
                mib(self.ram_bytes),
                mib(self.ram_bytes)
            ));
        }
        if self.machine != dst.machine {
            return Some(format!(
                "the destination QEMU's machine type is {}, the source's {} (start it with -machine {})",
                dst.machine, self.machine, self.machine
            ));
        }
        let known = !self.ram_blocks.is_empty() && !dst.ram_blocks.is_empty();
        let missing: Vec<&str> = self
            .ram_blocks
            .iter()
            .filter(|b| !dst.ram_blocks.contains(b))
            .map(String::as_str)
            .collect();
        if known && !missing.is_empty() {
            return Some(format!(
                "the destination QEMU has no RAM block {} (it has {}): back its RAM as the \
                 source's is (e.g. the same memory-backend id)",
                missing.join(", "),
                dst.ram_blocks.join(", ")
            ));
        }
        let only = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter().filter(|d| !b.contains(d)).cloned().collect()
        };
        let (src_only, dst_only) = (
            only(&self.devices, &dst.devices),
            only(&dst.devices, &self.devices),
        );
        if !src_only.is_empty() || !dst_only.is_empty() {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            };
            return Some(format!(
                "the QEMUs' devices differ: only the source has {}; only the destination has {} \
                 (start the destination with the same -device options)",
                list(&src_only),
                list(&dst_only)
            ));
        }
        None
    }
}

impl Cookie {
    /// Number of TCP data connections the migration uses: QEMU's main channel, plus one
    /// per multifd channel, plus post-copy's preempt channel. Saturates rather than overflows: it may be asked of a cookie
    /// from a peer before [`Cookie::check`] refuses absurd counts.
    pub fn streams(&self) -> u32 {
        self.options.streams()
    }

    /// Checks what serde cannot: bounds on counts.
    pub fn check(&self) -> Result<(), CookieError> {
        if self.options.multifd > MAX_MULTIFD {
            return Err(CookieError::Multifd(self.options.multifd));
        }
        self.options.compress.check()?;
        if self.options.lease_ms != 0 && !LEASE_MS.contains(&self.options.lease_ms) {
            return Err(CookieError::Lease {
                lease_ms: self.options.lease_ms,
            });
        }
        if let Some(ac) = &self.options.auto_converge {
            ac.check()?;
        }
        if let Some(vm) = &self.vm {
            vm.check()?;
        }
        if self.disks.len() > crate::disk::MAX_DISKS {
            return Err(CookieError::Disks(self.disks.len()));
        }
        if !self.disks.is_empty() && self.options.copy_storage.is_none() {
            return Err(CookieError::DisksWithoutCopy);
        }
        if let Some(l) = &self.libvirt {
            if l.disks.len() > crate::disk::MAX_DISKS {
                return Err(CookieError::Disks(l.disks.len()));
            }
            if !l.disks.is_empty() && self.options.copy_storage.is_none() {
                return Err(CookieError::DisksWithoutCopy);
            }
        }
        Ok(())
    }
}

/// A peer's cookie asks for more than vmferry allows. The nested errors already say
/// what is wrong, so they are shown as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    #[error("{0} multifd channels requested; at most {MAX_MULTIFD}")]
    Multifd(u32),
    #[error(transparent)]
    Compression(#[from] CompressionLevelError),
    #[error("a lease of {lease_ms} ms is out of range ({} to {} ms)", LEASE_MS.start(), LEASE_MS.end())]
    Lease { lease_ms: u64 },
    #[error(transparent)]
    Vm(#[from] SpecError),
    #[error(transparent)]
    Throttle(#[from] ThrottleError),
    #[error("{0} disks to copy; at most {max}", max = crate::disk::MAX_DISKS)]
    Disks(usize),
    #[error("the cookie lists disks to copy but the migration does not copy storage")]
    DisksWithoutCopy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_counts_the_main_stream_and_each_multifd_channel() {
        let mut c = Cookie {
            migration: MigrationId::from_random([1; 16]),
            options: MigrationOptions::default(),
            vm: None,
            source_running: true,
            source_fingerprint: None,
            destination_fingerprint: None,
            data_address: None,
            source_data_address: None,
            destination_control_address: None,
            transport: None,
            transport_notes: vec![],
            source_machine: None,
            peer_link: false,
            source_qemu: None,
            destination_qemu: None,
            disks: vec![],
            libvirt: None,
        };
        assert_eq!(c.streams(), 1);
        c.options.multifd = 4;
        assert_eq!(c.streams(), 5);
        c.options.postcopy = Some(PostCopy {
            after_ms: None,
            preempt: true,
        });
        assert_eq!(c.streams(), 6, "the preempt channel is a stream of its own");
        c.options.multifd = u32::MAX;
        assert_eq!(c.streams(), u32::MAX, "saturates");
        c.options.multifd = 10_000;
        assert!(c.check().is_err());
    }

    #[test]
    fn a_machine_mismatch_names_both_values() {
        let src = MachineShape {
            ram_bytes: 256 << 20,
            machine: "pc-q35-7.2".into(),
            ram_blocks: vec!["pc.bios".into(), "ram0".into()],
            devices: vec!["rng0 (virtio-rng-pci)".into()],
        };
        assert_eq!(src.mismatch(&src.clone()), None);
        let small = MachineShape {
            ram_bytes: 128 << 20,
            ..src.clone()
        };
        let e = src.mismatch(&small).expect("mismatch");
        assert!(e.contains("128 MiB") && e.contains("256 MiB"), "{e}");
        let other = MachineShape {
            machine: "pc-i440fx-7.2".into(),
            ..src.clone()
        };
        let e = src.mismatch(&other).expect("mismatch");
        assert!(
            e.contains("pc-i440fx-7.2") && e.contains("pc-q35-7.2"),
            "{e}"
        );
    }

    #[test]
    fn data_auth_defaults_to_pinned_and_round_trips() {
        let o: MigrationOptions = serde_json::from_str("{}").expect("defaults");
        assert_eq!(o.data_auth, DataAuth::Pinned);
        let x = DataAuth::X509 {
            tls_hostname: Some("hostb".into()),
        };
        let t = serde_json::to_string(&x).expect("ser");
        assert_eq!(serde_json::from_str::<DataAuth>(&t).expect("de"), x);
    }

    #[test]
    fn transports_parse_round_trip_and_auto_tries_cheapest_first() {
        assert_eq!("auto".parse::<TransportChoice>(), Ok(TransportChoice::Auto));
        assert_eq!(
            TransportChoice::Auto.candidates(),
            vec![Transport::Direct, Transport::Reverse, Transport::Tunnel]
        );
        assert_eq!(
            TransportChoice::Tunnel.candidates(),
            vec![Transport::Tunnel]
        );
        let e = "carrier-pigeon".parse::<TransportChoice>().unwrap_err();
        let e = e.to_string();
        assert!(e.contains("carrier-pigeon") && e.contains("tunnel"), "{e}");
        for t in Transport::AUTO_ORDER {
            assert_eq!(Transport::from_code(t.code()), Some(t));
        }
        assert_eq!(Transport::from_code(0), None);
    }

    #[test]
    fn preempt_is_used_only_between_releases_that_speak_the_same_preempt_protocol() {
        let r = |major, minor| {
            Some(QemuRelease {
                major,
                minor,
                micro: 0,
            })
        };
        assert!(PostCopy::preempt_between(r(7, 2), r(7, 2)));
        assert!(PostCopy::preempt_between(r(8, 0), r(10, 0)));
        assert!(PostCopy::preempt_between(r(10, 0), r(9, 2)));
        assert!(
            !PostCopy::preempt_between(r(7, 2), r(10, 0)),
            "7.2's protocol is older"
        );
        assert!(!PostCopy::preempt_between(r(10, 0), r(7, 2)));
        assert!(!PostCopy::preempt_between(r(7, 1), r(7, 2)));
        assert!(
            !PostCopy::preempt_between(None, r(10, 0)),
            "unknown: not guessed"
        );
        assert!(!PostCopy::preempt_between(r(10, 0), None));
    }
}
