//! The daemon's configuration: a TOML file, overridden by command-line flags.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use vmferry_proto::Accel;

/// What `vmferry serve` needs. Every field can come from the TOML file; the binary lets
/// flags override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// `host:port` for the control API (mutual TLS). Data connections use the same port.
    pub listen: Option<String>,
    /// Where sockets, VM directories and logs live.
    pub state_dir: PathBuf,
    /// A certs dir: `ca.pem`, `cert.pem`, `key.pem` (see `vmferry certs`).
    pub certs: Option<PathBuf>,
    /// The QEMU binary to run.
    #[serde(default = "default_qemu")]
    pub qemu: String,
    /// Accelerator for VMs started without one.
    #[serde(default)]
    pub accel: Accel,
    /// `host:port` peers dial for data, if not the address a controller used to reach us.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Uids allowed on the local unix control socket besides root and the daemon's own.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Seconds an unused prepared migration (its one-time identities) stays valid.
    #[serde(default = "default_credential_ttl")]
    pub credential_ttl_secs: u64,
}

fn default_qemu() -> String {
    "qemu-system-x86_64".to_string()
}

fn default_credential_ttl() -> u64 {
    300
}

impl DaemonConfig {
    pub fn new(state_dir: PathBuf) -> Self {
        DaemonConfig {
            listen: None,
            state_dir,
            certs: None,
            qemu: default_qemu(),
            accel: Accel::Auto,
            advertise: None,
            allowed_uids: Vec::new(),
            credential_ttl_secs: default_credential_ttl(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Path of the local control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_with_an_unknown_key_is_refused_by_name() {
        let e = toml::from_str::<DaemonConfig>("state_dir = \"/s\"\nlisen = \"x\"\n")
            .expect_err("typo must be caught");
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c: DaemonConfig = toml::from_str("state_dir = \"/s\"").expect("parses");
        assert_eq!(c.qemu, "qemu-system-x86_64");
        assert_eq!(c.accel, Accel::Auto);
        assert_eq!(c.credential_ttl_secs, 300);
    }
}
