//! Typed QMP replies, parsed tolerantly.

use serde::Deserialize;
use serde_json::Value;

/// `query-status`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct RunStatus {
    pub running: bool,
    pub status: String,
}

/// QEMU's migration state; values this build does not know are kept as text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Active,
    PostcopyActive,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    PreSwitchover,
    Device,
    WaitUnplug,
    Other(String),
}

impl MigrationStatus {
    pub fn parse(s: &str) -> Self {
        match s {
            "none" => Self::None,
            "setup" => Self::Setup,
            "active" => Self::Active,
            "postcopy-active" => Self::PostcopyActive,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            "pre-switchover" => Self::PreSwitchover,
            "device" => Self::Device,
            "wait-unplug" => Self::WaitUnplug,
            other => Self::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
            Self::Other(s) => s,
        }
    }

    /// True once the migration can change no more.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// True while a migration is under way (an unknown state counts as under way).
    pub fn is_active(&self) -> bool {
        !matches!(self, Self::None) && !self.is_terminal()
    }
}

impl<'de> Deserialize<'de> for MigrationStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// `query-migrate`'s `ram` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub dirty_pages_rate: u64,
    pub mbps: f64,
    pub dirty_sync_count: u64,
}

/// `query-migrate`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    #[serde(rename = "total-time")]
    pub total_time_ms: Option<u64>,
    #[serde(rename = "downtime")]
    pub downtime_ms: Option<u64>,
    #[serde(rename = "expected-downtime")]
    pub expected_downtime_ms: Option<u64>,
    #[serde(rename = "setup-time")]
    pub setup_time_ms: Option<u64>,
    pub ram: Option<RamStats>,
    pub error_desc: Option<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub seconds: i64,
    pub microseconds: i64,
}

impl Event {
    pub(crate) fn from_value(v: &Value) -> Option<Event> {
        let name = v.get("event")?.as_str()?.to_string();
        let ts = v.get("timestamp");
        Some(Event {
            name,
            data: v.get("data").cloned().unwrap_or(Value::Null),
            seconds: ts
                .and_then(|t| t.get("seconds"))
                .and_then(Value::as_i64)
                .unwrap_or(0),
            microseconds: ts
                .and_then(|t| t.get("microseconds"))
                .and_then(Value::as_i64)
                .unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_parses_with_missing_fields_and_unknown_states() {
        let v: MigrationInfo = serde_json::from_str(
            r#"{"status":"active","ram":{"transferred":10,"total":100,"mbps":1.5,"new-field":1},"total-time":7}"#,
        )
        .expect("parses");
        assert_eq!(v.status, MigrationStatus::Active);
        assert_eq!(v.ram.as_ref().map(|r| r.total), Some(100));
        assert_eq!(v.total_time_ms, Some(7));
        let v: MigrationInfo =
            serde_json::from_str(r#"{"status":"teleporting"}"#).expect("tolerant");
        assert_eq!(v.status, MigrationStatus::Other("teleporting".into()));
        assert!(v.status.is_active());
        let v: MigrationInfo = serde_json::from_str("{}").expect("empty");
        assert_eq!(v.status, MigrationStatus::None);
        let v: MigrationInfo =
            serde_json::from_str(r#"{"status":"failed","error-desc":"Unable to write to socket"}"#)
                .expect("failed");
        assert!(v.status.is_terminal());
        assert_eq!(v.error_desc.as_deref(), Some("Unable to write to socket"));
    }
}
