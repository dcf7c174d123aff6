//! Typed QMP replies, parsed tolerantly.
//!
//! QEMU adds fields and enum values with every release. Unknown fields are ignored,
//! unknown migration states are kept as text ([`MigrationStatus::Other`]), and missing
//! fields read as `None` (or 0 for counters): a newer or older QEMU must never make a
//! reply unreadable. Only the fields a caller decides on (`running`, `status`) are
//! checked for their type; informational counters of an unexpected type read as 0 so a
//! statistic can never fail a migration.

use serde::Deserialize;
use serde_json::Value;

/// The reply to `query-status`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct RunStatus {
    /// Whether the guest's CPUs run.
    pub running: bool,
    /// QEMU's run state as text: "prelaunch", "running", "paused", "inmigrate",
    /// "postmigrate", "shutdown", ... (kept as text: new states appear).
    pub status: String,
}

/// QEMU's migration state. States this build does not know are kept as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum MigrationStatus {
    /// No migration has been started (also what a reply without `status` means).
    #[default]
    None,
    Setup,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    /// A state this build does not know (a newer QEMU's).
    Other(String),
}

impl MigrationStatus {
    /// Reads QEMU's name for a state; never fails.
    pub fn parse(s: &str) -> Self {
        match s {
            "none" => Self::None,
            "setup" => Self::Setup,
            "active" => Self::Active,
            "postcopy-active" => Self::PostcopyActive,
            "postcopy-paused" => Self::PostcopyPaused,
            "postcopy-recover" => Self::PostcopyRecover,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            "colo" => Self::Colo,
            "pre-switchover" => Self::PreSwitchover,
            "device" => Self::Device,
            "wait-unplug" => Self::WaitUnplug,
            other => Self::Other(other.to_string()),
        }
    }

    /// QEMU's name for the state.
    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
            Self::Other(s) => s,
        }
    }

    /// True once the migration can change no more: completed, failed or cancelled.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// True while a migration is under way. An unknown state counts as under way, so a
    /// caller polling for a terminal state keeps polling (up to its own deadline) rather
    /// than mistaking a new QEMU state for the end.
    pub fn is_active(&self) -> bool {
        !matches!(self, Self::None) && !self.is_terminal()
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MigrationStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// Transfer counters of `query-migrate` (its `ram`, and `disk` for block migration).
/// Every counter QEMU leaves out reads as 0.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct RamStats {
    #[serde(deserialize_with = "lenient::u64")]
    pub transferred: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub remaining: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub total: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub duplicate: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub skipped: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub normal: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub normal_bytes: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub dirty_pages_rate: u64,
    /// Throughput QEMU measured, in megabits per second.
    #[serde(deserialize_with = "lenient::f64")]
    pub mbps: f64,
    #[serde(deserialize_with = "lenient::u64")]
    pub dirty_sync_count: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub postcopy_requests: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub page_size: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub multifd_bytes: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub pages_per_second: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub precopy_bytes: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub downtime_bytes: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub postcopy_bytes: u64,
}

/// The reply to `query-migrate`. A QEMU that never migrated answers `{}`, which reads
/// as status [`MigrationStatus::None`] with everything else absent.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    #[serde(rename = "total-time", deserialize_with = "lenient::opt_u64")]
    pub total_time_ms: Option<u64>,
    /// The guest's actual pause, once completed.
    #[serde(rename = "downtime", deserialize_with = "lenient::opt_u64")]
    pub downtime_ms: Option<u64>,
    /// QEMU's estimate of the pause, while active.
    #[serde(rename = "expected-downtime", deserialize_with = "lenient::opt_u64")]
    pub expected_downtime_ms: Option<u64>,
    #[serde(rename = "setup-time", deserialize_with = "lenient::opt_u64")]
    pub setup_time_ms: Option<u64>,
    #[serde(deserialize_with = "lenient::opt_u64")]
    pub cpu_throttle_percentage: Option<u64>,
    #[serde(deserialize_with = "lenient::stats")]
    pub ram: Option<RamStats>,
    #[serde(deserialize_with = "lenient::stats")]
    pub disk: Option<RamStats>,
    /// QEMU's reason, once failed.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub error_desc: Option<String>,
}

/// An asynchronous QMP event (`{"event": .., "data": .., "timestamp": ..}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's name, e.g. "STOP", "RESUME", "MIGRATION", "SHUTDOWN".
    pub name: String,
    /// The event's data; `Null` when QEMU sent none.
    pub data: Value,
    /// (seconds, microseconds) since the Unix epoch as QEMU stamped it; (0, 0) if absent.
    pub timestamp: (i64, i64),
}

impl Event {
    /// Reads an event message; `None` if `event` is not a string. Everything else is
    /// optional.
    pub(crate) fn from_message(m: &serde_json::Map<String, Value>) -> Option<Event> {
        let name = m.get("event")?.as_str()?.to_string();
        let ts = m.get("timestamp");
        let part = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_i64);
        Some(Event {
            name,
            data: m.get("data").cloned().unwrap_or(Value::Null),
            timestamp: (
                part("seconds").unwrap_or(0),
                part("microseconds").unwrap_or(0),
            ),
        })
    }
}

/// The QEMU version announced in the greeting.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct QemuVersion {
    #[serde(deserialize_with = "lenient::u64")]
    pub major: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub minor: u64,
    #[serde(deserialize_with = "lenient::u64")]
    pub micro: u64,
    /// The distribution's package string, e.g. "Debian 1:7.2+dfsg-7".
    #[serde(deserialize_with = "lenient::string")]
    pub package: String,
}

impl QemuVersion {
    /// Whether this QEMU, running its guest under TCG, can lose guest writes during a live
    /// migration: before 9.0 the migration's dirty-bitmap sync cleared a page's bit without
    /// dropping the vCPU's writable TLB entry for it, so later writes through that entry
    /// were never sent (fixed by QEMU commit 03bfc2188f, "physmem: Fix migration dirty
    /// bitmap coherency with TCG memory access"). KVM tracks dirty pages itself and is
    /// not affected. bench/tcg_dirty_check.py measures it.
    pub fn tcg_migration_loses_writes(&self) -> bool {
        (self.major, self.minor) < (9, 0)
    }

    /// Reads `greeting.QMP.version`; `None` if it is missing or not an object.
    pub(crate) fn from_greeting(greeting: &serde_json::Map<String, Value>) -> Option<Self> {
        let v = greeting.get("QMP")?.get("version")?;
        let q = v.get("qemu")?;
        let mut version: QemuVersion = serde_json::from_value(q.clone()).ok()?;
        version.package = v
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Some(version)
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// Deserializers for informational fields: a value of an unexpected type reads as
/// absent instead of failing the whole reply.
mod lenient {
    use super::RamStats;
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub(super) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(v.as_u64().or_else(|| {
            // A float counter (some QEMU versions report rates as doubles): truncated.
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                .map(|f| f as u64)
        }))
    }

    pub(super) fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        Ok(opt_u64(d)?.unwrap_or(0))
    }

    pub(super) fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(v.as_f64().filter(|f| f.is_finite()).unwrap_or(0.0))
    }

    pub(super) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(match v {
            Value::String(s) => Some(s),
            Value::Null => None,
            other => Some(other.to_string()),
        })
    }

    pub(super) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(opt_string(d)?.unwrap_or_default())
    }

    pub(super) fn stats<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RamStats>, D::Error> {
        // Only an object: serde would also read a struct from an array, by position.
        Ok(match Value::deserialize(d)? {
            v @ Value::Object(_) => serde_json::from_value(v).ok(),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(json: &str) -> MigrationInfo {
        serde_json::from_str(json).expect("a tolerant parse")
    }

    #[test]
    fn parses_query_migrate_for_every_known_status() {
        for name in [
            "none",
            "setup",
            "active",
            "postcopy-active",
            "postcopy-paused",
            "postcopy-recover",
            "completed",
            "failed",
            "cancelling",
            "cancelled",
            "colo",
            "pre-switchover",
            "device",
            "wait-unplug",
        ] {
            let i = info(&format!(r#"{{"status":"{name}"}}"#));
            assert!(
                !matches!(i.status, MigrationStatus::Other(_)),
                "{name} is known"
            );
            assert_eq!(i.status.as_str(), name, "round trip");
        }
    }

    #[test]
    fn keeps_an_unknown_future_status_as_text_and_counts_it_as_active() {
        let i = info(r#"{"status":"teleporting","new-section":{"x":1}}"#);
        assert_eq!(i.status, MigrationStatus::Other("teleporting".into()));
        assert!(i.status.is_active());
        assert!(!i.status.is_terminal());
        assert_eq!(i.status.to_string(), "teleporting");
    }

    #[test]
    fn reads_a_fresh_qemus_empty_reply_as_no_migration() {
        let i = info("{}");
        assert_eq!(i.status, MigrationStatus::None);
        assert!(!i.status.is_active() && !i.status.is_terminal());
        assert_eq!(i.ram, None);
        assert_eq!(i.total_time_ms, None);
        assert_eq!(i.error_desc, None);
    }

    #[test]
    fn parses_an_active_migration_with_ram_stats_and_missing_fields() {
        let i = info(
            r#"{"status":"active","setup-time":2,"total-time":7,"expected-downtime":300,
                "ram":{"transferred":10,"total":100,"remaining":90,"mbps":1.5,
                       "dirty-sync-count":3,"brand-new-counter":1}}"#,
        );
        assert_eq!(i.status, MigrationStatus::Active);
        assert_eq!(i.total_time_ms, Some(7));
        assert_eq!(i.setup_time_ms, Some(2));
        assert_eq!(i.expected_downtime_ms, Some(300));
        assert_eq!(i.downtime_ms, None, "only known once completed");
        let ram = i.ram.expect("ram section");
        assert_eq!((ram.transferred, ram.remaining, ram.total), (10, 90, 100));
        assert_eq!(ram.mbps, 1.5);
        assert_eq!(ram.dirty_sync_count, 3);
        assert_eq!(ram.duplicate, 0, "absent counters read as 0");
    }

    #[test]
    fn parses_a_completed_reply_as_qemu_7_2_sends_it() {
        let i = info(
            r#"{"blocked": false, "expected-downtime": 0, "status": "completed",
                "setup-time": 0, "total-time": 9, "downtime": 3,
                "ram": {"total": 1073741824, "postcopy-requests": 0, "dirty-sync-count": 3,
                        "multifd-bytes": 0, "pages-per-second": 0, "downtime-bytes": 4096,
                        "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 0,
                        "transferred": 1069, "dirty-sync-missed-zero-copy": 0,
                        "precopy-bytes": 1000, "duplicate": 262144, "dirty-pages-rate": 0,
                        "skipped": 0, "normal-bytes": 0, "normal": 0}}"#,
        );
        assert!(i.status.is_terminal());
        assert_eq!(i.downtime_ms, Some(3));
        let ram = i.ram.expect("ram section");
        assert_eq!(ram.total, 1 << 30);
        assert_eq!(ram.duplicate, 262144);
        assert_eq!(ram.page_size, 4096);
        assert_eq!(ram.downtime_bytes, 4096);
    }

    #[test]
    fn a_failed_migration_carries_qemus_reason() {
        let i = info(r#"{"status":"failed","error-desc":"Unable to write to socket"}"#);
        assert!(i.status.is_terminal());
        assert_eq!(i.error_desc.as_deref(), Some("Unable to write to socket"));
    }

    #[test]
    fn counters_of_an_unexpected_type_read_as_absent_instead_of_failing() {
        let i = info(
            r#"{"status":"active","total-time":"soon","downtime":-1,
                "ram":{"total":"big","transferred":12.9,"mbps":"fast","remaining":5}}"#,
        );
        assert_eq!(i.status, MigrationStatus::Active);
        assert_eq!(i.total_time_ms, None);
        assert_eq!(i.downtime_ms, None);
        let ram = i.ram.expect("ram section");
        assert_eq!(
            (ram.total, ram.transferred, ram.remaining, ram.mbps),
            (0, 12, 5, 0.0)
        );
        let i = info(r#"{"status":"active","ram":[1,2,3]}"#);
        assert_eq!(i.ram, None, "a ram section of the wrong shape is dropped");
    }

    #[test]
    fn a_status_that_is_not_text_is_refused() {
        assert!(serde_json::from_str::<MigrationInfo>(r#"{"status":42}"#).is_err());
        assert!(serde_json::from_str::<RunStatus>(r#"{"status":"running"}"#).is_err());
    }

    #[test]
    fn terminal_and_active_states_are_told_apart() {
        use MigrationStatus as S;
        for s in [S::Completed, S::Failed, S::Cancelled] {
            assert!(s.is_terminal() && !s.is_active(), "{s}");
        }
        for s in [
            S::Setup,
            S::Active,
            S::PostcopyActive,
            S::Cancelling,
            S::Device,
        ] {
            assert!(s.is_active() && !s.is_terminal(), "{s}");
        }
    }

    #[test]
    fn an_event_without_data_or_timestamp_still_parses() {
        let m: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"event":"STOP"}"#).expect("object");
        let e = Event::from_message(&m).expect("an event");
        assert_eq!(e.name, "STOP");
        assert_eq!(e.data, Value::Null);
        assert_eq!(e.timestamp, (0, 0));
        let m: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"timestamp":{"seconds":5,"microseconds":6},"event":"MIGRATION","data":{"status":"setup"}}"#,
        )
        .expect("object");
        let e = Event::from_message(&m).expect("an event");
        assert_eq!(e.timestamp, (5, 6));
        assert_eq!(e.data["status"], "setup");
        let m: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"event":7}"#).expect("object");
        assert_eq!(Event::from_message(&m), None);
    }

    #[test]
    fn reads_the_version_from_the_greeting() {
        let g: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
                "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#,
        )
        .expect("object");
        let v = QemuVersion::from_greeting(&g).expect("a version");
        assert_eq!((v.major, v.minor, v.micro), (7, 2, 22));
        assert_eq!(v.to_string(), "7.2.22 (Debian 1:7.2+dfsg-7)");
        assert!(v.tcg_migration_loses_writes(), "7.2 lacks the fix");
        for (major, minor, loses) in [(8, 2, true), (9, 0, false), (10, 0, false)] {
            let w = QemuVersion {
                major,
                minor,
                ..v.clone()
            };
            assert_eq!(w.tcg_migration_loses_writes(), loses, "{major}.{minor}");
        }
        let g: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"QMP": {}}"#).expect("object");
        assert_eq!(QemuVersion::from_greeting(&g), None);
    }
}
