//! Control messages between a controller and a daemon.
//!
//! Framing (a 4-byte length before each JSON document) is the channel crate's job; this
//! module only defines what the documents mean. A daemon answers every [`Request`] with
//! exactly one [`Response`] carrying the same `id`.

use crate::cookie::{Cookie, MigrationOptions, Transport};
use crate::error::WireError;
use crate::names::{MigrationId, VmName};
use crate::phase::{MigrationState, Role};
use serde::{Deserialize, Serialize};

/// The first message on every control connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Who is speaking, for logs: e.g. `vmferry 0.1.0 (controller)`.
    pub agent: String,
    /// Daemon only: who the daemon takes the client to be, once authenticated (by its
    /// certificate or its unix credentials), with its role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Daemon only, when the client is not authenticated yet: the schemes it may use,
    /// in the daemon's order of preference (e.g. `scram-sha-256`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth: Vec<String>,
}

impl Hello {
    /// A client's hello.
    pub fn client(agent: String) -> Hello {
        Hello {
            version: crate::PROTOCOL_VERSION,
            agent,
            identity: None,
            auth: Vec::new(),
        }
    }
}

/// A request from a controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub body: RequestBody,
}

/// What a controller asks for. Source-side phases: `Begin`, `Perform`, `Status`, `Confirm`;
/// destination-side: `Prepare`, `Finish`, `Abort`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RequestBody {
    Ping,
    /// One step of an authentication exchange (SCRAM: client-first, then client-final).
    Auth {
        scheme: String,
        message: String,
    },
    VmStart {
        spec: VmSpec,
    },
    VmList,
    VmStop {
        name: VmName,
    },
    Begin {
        migration: MigrationId,
        vm: VmRef,
        options: MigrationOptions,
    },
    Prepare {
        cookie: Cookie,
        vm: VmRef,
    },
    /// Makes the data channel for one transport before any guest byte moves: on the
    /// source, dial (direct, tunnel) or expect the destination's connections (reverse);
    /// on the destination, dial the source (reverse). Each dial waits at most
    /// `timeout_ms`; a failure leaves nothing half-open behind.
    Connect {
        cookie: Cookie,
        transport: Transport,
        timeout_ms: u64,
    },
    Perform {
        cookie: Cookie,
    },
    /// With `wait_ms`, the source answers as soon as the migration finishes, or after
    /// that long at the latest (a long poll: no completion is noticed late). Either half
    /// answers. With `renew`, the request also renews the migration's lease (which a
    /// read-only client may not do: watching a migration must not keep it alive).
    Status {
        migration: MigrationId,
        #[serde(default)]
        wait_ms: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        renew: bool,
    },
    /// Hands the migration to the daemons: no lease any more; the source carries it to
    /// its end and the destination resumes the guest once it holds the whole state.
    Detach {
        migration: MigrationId,
    },
    /// The migrations this daemon takes part in now, and the last ones it was the
    /// source of (with how they ended).
    MigrationList,
    Finish {
        migration: MigrationId,
    },
    Confirm {
        migration: MigrationId,
        success: bool,
    },
    Abort {
        migration: MigrationId,
        reason: String,
    },
    /// Cancels a migration this daemon is the source of, from any authorized
    /// controller: the source guest keeps running, the destination hears it over the
    /// peer link and tears down. Refused once the source has switched over.
    Cancel {
        migration: MigrationId,
    },
    /// What this host has to offer a migrated guest: its available memory and what its
    /// managed VMs take (answered with [`ResponseBody::Host`]); `vmferry drain` places
    /// guests by it. It changes nothing, so a read-only client may ask.
    HostInfo,
}

impl RequestBody {
    /// A short name for logs.
    pub fn op(&self) -> &'static str {
        match self {
            RequestBody::Ping => "ping",
            RequestBody::Auth { .. } => "auth",
            RequestBody::VmStart { .. } => "vm_start",
            RequestBody::VmList => "vm_list",
            RequestBody::VmStop { .. } => "vm_stop",
            RequestBody::Begin { .. } => "begin",
            RequestBody::Prepare { .. } => "prepare",
            RequestBody::Connect { .. } => "connect",
            RequestBody::Perform { .. } => "perform",
            RequestBody::Status { .. } => "status",
            RequestBody::MigrationList => "migration_list",
            RequestBody::Finish { .. } => "finish",
            RequestBody::Confirm { .. } => "confirm",
            RequestBody::Abort { .. } => "abort",
            RequestBody::Detach { .. } => "detach",
            RequestBody::Cancel { .. } => "cancel",
            RequestBody::HostInfo => "host_info",
        }
    }
}

impl RequestBody {
    /// Whether a read-only client may make this request: it changes nothing.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            RequestBody::Ping
                | RequestBody::Auth { .. }
                | RequestBody::VmList
                | RequestBody::Status { renew: false, .. }
                | RequestBody::MigrationList
                | RequestBody::HostInfo
        )
    }
}

/// A daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    #[serde(flatten)]
    pub body: ResponseBody,
}

// One answer per control request, a few per migration: the size of the largest variant
// (a cookie) costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ResponseBody {
    Pong {
        host: String,
    },
    Done,
    Vm {
        vm: VmInfo,
    },
    Vms {
        vms: Vec<VmInfo>,
    },
    Cookie {
        cookie: Cookie,
    },
    Status {
        status: MigrationStatus,
    },
    Migrations {
        migrations: Vec<MigrationSummary>,
    },
    Host {
        host: HostInfo,
    },
    /// The daemon's next authentication message; `done` with the identity when accepted.
    Auth {
        message: String,
        #[serde(default)]
        identity: Option<String>,
    },
    Error {
        error: WireError,
    },
}

/// A host's room for more guests, as its daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The daemon's host name, for the operator.
    pub host: String,
    /// The kernel's estimate of memory available for new work (`MemAvailable` in
    /// `/proc/meminfo`), in bytes. Memory a running guest has touched is already
    /// subtracted; memory it was given but never touched is not.
    pub mem_available: u64,
    /// The memory its managed VMs were given (their specs, incoming ones included), in
    /// bytes.
    pub vms_memory: u64,
    /// How many VMs it manages, incoming ones included.
    pub vms: u32,
}

/// One line of `vmferry status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub migration: MigrationId,
    pub role: Role,
    /// The VM's name, or the QMP socket in attach mode.
    pub vm: String,
    /// The source's view (the destination knows little until `finish`).
    pub status: MigrationStatus,
}

/// Which VM a phase is about: one the daemon manages, or a QEMU started by someone else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmRef {
    Managed {
        name: VmName,
    },
    /// Attach mode: the daemon only carries the stream of this QEMU, reached by its QMP
    /// socket on the daemon's host. A destination QEMU must run with `-incoming defer`.
    Attached {
        qmp: String,
    },
    /// A domain of the libvirt the daemon is configured for (`libvirt_uri`): libvirt
    /// migrates it peer to peer, and the daemons carry every socket it uses.
    Libvirt {
        domain: String,
    },
}

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM if it really runs a guest on this host, else TCG (the daemon says which).
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// A name that is not an accelerator vmferry knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?}: use auto, kvm or tcg")]
pub struct UnknownAccel(pub String);

impl std::str::FromStr for Accel {
    type Err = UnknownAccel;
    fn from_str(s: &str) -> Result<Self, UnknownAccel> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(UnknownAccel(other.to_string())),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Everything needed to start an identical QEMU on another host. Paths must name the same
/// files on both hosts (shared storage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: VmName,
    pub memory_mib: u64,
    pub cpus: u32,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub append: Option<String>,
    #[serde(default)]
    pub disks: Vec<String>,
    /// `Auto` in a start request; always resolved to `Kvm` or `Tcg` in a running VM's spec,
    /// because a destination must use the accelerator the source uses.
    #[serde(default)]
    pub accel: Accel,
    /// QEMU's machine type. `None` or an alias (`q35`) in a start request; a running VM's
    /// spec holds the versioned type its QEMU resolved it to (`pc-q35-7.2`), because a
    /// newer QEMU's `q35` is another machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
}

/// Limits that keep a peer's VM spec from asking for absurd resources.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
pub const MAX_CPUS: u32 = 512;
pub const MAX_DISKS: usize = 16;

/// A VM spec asks for something vmferry refuses to start (a peer's spec, or a typo).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("memory {0} MiB is out of range (16..={MAX_MEMORY_MIB})")]
    Memory(u64),
    #[error("cpus {0} is out of range (1..={MAX_CPUS})")]
    Cpus(u32),
    #[error("{0} disks given; at most {MAX_DISKS}")]
    Disks(usize),
    #[error("path {0:?} must be absolute and must not contain ','")]
    Path(String),
    #[error("machine type {0:?} is not a QEMU machine type name (letters, digits, '.', '_', '-')")]
    Machine(String),
}

impl VmSpec {
    /// Checks the parts serde cannot: sizes, counts, and that paths are absolute.
    pub fn check(&self) -> Result<(), SpecError> {
        if self.memory_mib < 16 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(SpecError::Memory(self.memory_mib));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(SpecError::Cpus(self.cpus));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(SpecError::Disks(self.disks.len()));
        }
        let paths = self
            .kernel
            .iter()
            .chain(self.initrd.iter())
            .chain(self.disks.iter());
        for p in paths {
            if !p.starts_with('/') || p.contains(',') {
                return Err(SpecError::Path(p.clone()));
            }
        }
        // It goes onto QEMU's command line: nothing that could add an option there.
        if let Some(m) = &self.machine {
            let name_like = !m.is_empty()
                && m.len() <= 64
                && m.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !name_like {
                return Err(SpecError::Machine(m.clone()));
            }
        }
        Ok(())
    }
}

/// A VM as a daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub spec: VmSpec,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, ...), or `exited`.
    pub state: String,
    pub pid: Option<u32>,
    /// Where the guest's serial console is written on the daemon's host.
    pub serial_log: String,
    /// Why this accelerator (e.g. why `auto` fell back to TCG).
    #[serde(default)]
    pub accel_reason: String,
}

/// Where a migration stands, as one half reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// The half's own state (`performing`, `completed`, `rolled_back`, `loaded`, ...);
    /// absent from daemons of protocol version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MigrationState>,
    /// `setup`, `active`, `completed`, `failed`, `cancelled`, ... in QEMU's own words.
    pub qemu_status: String,
    /// True once the daemon will not change this status any more.
    pub finished: bool,
    pub ram_total: u64,
    pub ram_transferred: u64,
    pub ram_remaining: u64,
    /// QEMU's own rate estimate, in megabits per second.
    pub mbps: f64,
    /// Plaintext bytes the daemon carried to the peer, over all streams.
    pub channel_bytes: u64,
    /// The same after the compression filter: what TLS encrypted (= `channel_bytes`
    /// without compression).
    #[serde(default)]
    pub wire_bytes: u64,
    /// The streams' compression, e.g. `zstd (level 1)`, or `none`.
    #[serde(default)]
    pub compression: String,
    pub streams: u32,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// The transport carrying the streams, once one was chosen.
    #[serde(default, deserialize_with = "transport_or_empty")]
    pub transport: Option<Transport>,
    /// Why transports tried before the one used were passed over.
    #[serde(default)]
    pub transport_notes: Vec<String>,
    /// How the bytes are protected on the source (e.g. userspace TLS, and why not kernel TLS).
    #[serde(default)]
    pub data_path: String,
    pub error: Option<String>,
    /// What happened without a controller (a lease ran out, a detached migration), in
    /// words: "the controller's lease expired after the switch-over; finished alone".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The pre-copy pass QEMU is in (its dirty-sync count: 1 is the first full pass).
    #[serde(default)]
    pub pass: u64,
    /// How fast the guest dirties its memory, in bytes per second (QEMU's estimate).
    #[serde(default)]
    pub dirty_rate: u64,
    /// The guest CPU throttle auto-converge applies, in percent.
    #[serde(default)]
    pub throttle_pct: u64,
    /// QEMU's estimate of the pause at the switch-over, while pre-copy runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime_ms: Option<u64>,
    /// Each copied disk's progress (disk copy only), in the cookie's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::disk::DiskProgress>,
    /// The QEMU releases on both sides (`7.2.22`), where known: a migration between
    /// versions says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_qemu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_qemu: Option<String>,
}

impl MigrationStatus {
    /// The rate the link carries, in bytes per second (QEMU's own measure).
    pub fn link_rate(&self) -> u64 {
        (self.mbps.max(0.0) * 1e6 / 8.0) as u64
    }

    /// Whether pre-copy can finish: after the first pass, the guest must dirty memory at
    /// less than half the rate the link carries it (QEMU's own test before it throttles a
    /// guest under auto-converge). `None` before there is anything to judge.
    pub fn converging(&self) -> Option<bool> {
        (self.pass >= 2 && self.link_rate() > 0)
            .then(|| self.dirty_rate.saturating_mul(2) < self.link_rate())
    }

    /// The disks whose copy had not caught up, in words ("disk copy not finished: disk
    /// vd0: 12 MiB of 48 MiB"); `None` when every disk is in sync (or none is copied).
    pub fn disks_unfinished(&self) -> Option<String> {
        let behind: Vec<String> = self
            .disks
            .iter()
            .filter(|d| !d.ready)
            .map(|d| {
                format!(
                    "disk {}: {} MiB of {} MiB",
                    d.device,
                    d.copied >> 20,
                    d.total >> 20
                )
            })
            .collect();
        (!behind.is_empty()).then(|| format!("disk copy not finished: {}", behind.join(", ")))
    }

    /// Why a pre-copy that did not finish in time could not, in words an operator can
    /// act on; `None` when it was converging (or there was nothing to judge).
    pub fn not_converging(&self) -> Option<String> {
        if self.converging()? {
            return None;
        }
        Some(format!(
            "not converging: the guest dirties {} MB/s, the link carries {} MB/s (pass {}); \
             try --postcopy or --auto-converge",
            self.dirty_rate / 1_000_000,
            self.link_rate() / 1_000_000,
            self.pass
        ))
    }
}

/// Protocol version 1 sent `""` for "no transport yet".
fn transport_or_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Transport>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => Transport::parse(s)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown transport {s:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: VmName::new("g1").expect("valid"),
            memory_mib: 256,
            cpus: 1,
            kernel: Some("/k".into()),
            initrd: None,
            append: None,
            disks: vec![],
            accel: Accel::Tcg,
            machine: None,
        }
    }

    #[test]
    fn requests_round_trip_through_json() {
        let r = Request {
            id: 7,
            body: RequestBody::VmStart { spec: spec() },
        };
        let text = serde_json::to_string(&r).expect("serializes");
        assert!(text.contains("\"op\":\"vm_start\""), "{text}");
        let back: Request = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, r);
    }

    #[test]
    fn unknown_request_kinds_are_named_in_the_error() {
        let err = serde_json::from_str::<Request>(r#"{"id":1,"op":"format_disk"}"#)
            .expect_err("must be refused");
        assert!(err.to_string().contains("format_disk"), "{err}");
    }

    #[test]
    fn unknown_fields_from_a_newer_peer_are_ignored() {
        let r: Request =
            serde_json::from_str(r#"{"id":1,"op":"ping","future":true}"#).expect("tolerated");
        assert_eq!(r.body, RequestBody::Ping);
    }

    #[test]
    fn vm_specs_with_absurd_or_unsafe_values_are_refused() {
        let s = spec();
        assert!(s.check().is_ok());
        for bad in ["q35,accel=kvm", "", "pc q35", &"x".repeat(65)] {
            let mut s = spec();
            s.machine = Some(bad.to_string());
            assert!(s.check().is_err(), "{bad:?} passed");
        }
        let mut s = spec();
        s.machine = Some("pc-q35-7.2".into());
        assert!(s.check().is_ok());
        s.memory_mib = 1 << 30;
        assert!(s.check().is_err());
        let mut s = spec();
        s.cpus = 0;
        assert!(s.check().is_err());
        let mut s = spec();
        s.kernel = Some("relative/k".into());
        assert!(s.check().is_err());
        let mut s = spec();
        s.disks = vec!["/d,readonly=off".into()];
        assert!(s.check().unwrap_err().to_string().contains("','"));
    }

    #[test]
    fn a_version_1_status_with_an_empty_transport_still_parses() {
        let st: MigrationStatus = serde_json::from_str(
            r#"{"qemu_status":"active","finished":false,"ram_total":0,"ram_transferred":0,
               "ram_remaining":0,"mbps":0.0,"channel_bytes":0,"streams":1,
               "total_time_ms":null,"downtime_ms":null,"transport":"","error":null}"#,
        )
        .expect("parses");
        assert_eq!(st.transport, None);
        assert_eq!(st.state, None);
        let st: MigrationStatus =
            serde_json::from_str(r#"{"qemu_status":"x","finished":true,"ram_total":0,"ram_transferred":0,"ram_remaining":0,"mbps":0.0,"channel_bytes":0,"streams":1,"total_time_ms":null,"downtime_ms":null,"transport":"tunnel","error":null}"#)
                .expect("parses");
        assert_eq!(st.transport, Some(Transport::Tunnel));
    }

    #[test]
    fn a_guest_that_dirties_faster_than_the_link_is_named_as_not_converging() {
        let mut st = MigrationStatus {
            pass: 7,
            dirty_rate: 310_000_000,
            mbps: 240.0, // 30 MB/s
            ..Default::default()
        };
        assert_eq!(st.converging(), Some(false));
        assert_eq!(
            st.not_converging().as_deref(),
            Some(
                "not converging: the guest dirties 310 MB/s, the link carries 30 MB/s (pass 7); \
                 try --postcopy or --auto-converge"
            )
        );
        st.dirty_rate = 20_000_000;
        assert_eq!(
            st.converging(),
            Some(false),
            "dirtying 2/3 of the link never ends"
        );
        st.dirty_rate = 1_000_000;
        assert_eq!(st.converging(), Some(true));
        assert_eq!(st.not_converging(), None);
        st.pass = 1;
        assert_eq!(st.converging(), None, "nothing to judge in the first pass");
    }

    #[test]
    fn renewing_a_lease_is_not_read_only() {
        let id = MigrationId::from_random([3; 16]);
        let watch = RequestBody::Status {
            migration: id.clone(),
            wait_ms: 0,
            renew: false,
        };
        let renew = RequestBody::Status {
            migration: id,
            wait_ms: 0,
            renew: true,
        };
        assert!(watch.is_read_only());
        assert!(!renew.is_read_only());
    }

    #[test]
    fn host_info_is_read_only_and_round_trips() {
        assert!(RequestBody::HostInfo.is_read_only());
        let text = serde_json::to_string(&Request {
            id: 3,
            body: RequestBody::HostInfo,
        })
        .expect("serializes");
        assert_eq!(text, r#"{"id":3,"op":"host_info"}"#);
        let answer = ResponseBody::Host {
            host: HostInfo {
                host: "hostb".into(),
                mem_available: 8 << 30,
                vms_memory: 1 << 30,
                vms: 2,
            },
        };
        let text = serde_json::to_string(&answer).expect("serializes");
        assert!(text.contains(r#""reply":"host""#), "{text}");
        let back: ResponseBody = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, answer);
    }

    #[test]
    fn accel_parses_only_known_names() {
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("xen".parse::<Accel>().is_err());
    }
}
