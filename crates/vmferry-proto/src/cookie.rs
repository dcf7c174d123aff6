//! The migration cookie: what one phase hands the next, carried by the controller over its
//! authenticated control connections.
//!
//! The cookie holds the trust of one migration: the fingerprints of the ephemeral
//! certificates each side made for it. Because the controller is authenticated to both
//! daemons, the daemons need no trust relationship of their own. A cookie must never carry
//! a private key.

use crate::control::VmSpec;
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
}

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
}

impl Cookie {
    /// Number of TCP data connections the migration uses: QEMU's main channel, plus one
    /// per multifd channel.
    pub fn streams(&self) -> u32 {
        1 + self.options.multifd
    }

    /// Checks what serde cannot: bounds on counts.
    pub fn check(&self) -> Result<(), String> {
        if self.options.multifd > MAX_MULTIFD {
            return Err(format!(
                "{} multifd channels requested; at most {MAX_MULTIFD}",
                self.options.multifd
            ));
        }
        if let Some(vm) = &self.vm {
            vm.check()?;
        }
        Ok(())
    }
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
        };
        assert_eq!(c.streams(), 1);
        c.options.multifd = 4;
        assert_eq!(c.streams(), 5);
        c.options.multifd = 10_000;
        assert!(c.check().is_err());
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
}
