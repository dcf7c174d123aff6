//! The daemon's configuration: a TOML file, overridden by command-line flags.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use vmferry_proto::{Accel, TransportChoice};

/// Why the daemon's config file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {}: {source}", path.display())]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// What `vmferry serve` needs. Every field can come from the TOML file; the binary lets
/// flags override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// `host:port` for the control API (mutual TLS). Data connections may use the same
    /// port (told apart by the TLS server name), and the tunnel transport always does.
    pub listen: Option<String>,
    /// An extra `host:port` that serves data connections only (direct and reverse
    /// transports), for sites that keep migration traffic off the management port.
    #[serde(default)]
    pub data_listen: Option<String>,
    /// The transport a migration uses when its controller does not ask for one.
    #[serde(default)]
    pub transport: TransportChoice,
    /// Where sockets, VM directories and logs live.
    pub state_dir: PathBuf,
    /// Where a destination creates the disk images of a migration that copies storage
    /// (default: `STATE_DIR/images`).
    #[serde(default)]
    pub images_dir: Option<PathBuf>,
    /// A certs dir: `ca.pem`, `cert.pem`, `key.pem` (see `vmferry certs`).
    pub certs: Option<PathBuf>,
    /// The QEMU binary to run.
    #[serde(default = "default_qemu", alias = "qemu_binary")]
    pub qemu: String,
    /// Accelerator for VMs started without one.
    #[serde(default)]
    pub accel: Accel,
    /// `host:port` peers dial for data (direct to a destination, reverse to a source), if
    /// not `data_listen` or `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Control authentication schemes accepted on TCP, in order of preference:
    /// `x509` (client certificates) and/or `scram-sha-256` (passwords, `scram_users`).
    #[serde(default = "default_auth")]
    pub auth: Vec<String>,
    /// Certificate subjects allowed to operate (e.g. `CN=controller,O=ops`,
    /// `CN=*.mig.example`). Empty (and `readonly_clients` empty): any certificate from the CA.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Certificate subjects allowed to read only (status, lists).
    #[serde(default)]
    pub readonly_clients: Vec<String>,
    /// In x509 data mode, the certificate subjects of daemons this one may send a guest to
    /// or receive one from (empty: any host certificate from the CA).
    #[serde(default)]
    pub allowed_peers: Vec<String>,
    /// The SCRAM users file (salted verifiers; `vmferry users add`).
    #[serde(default)]
    pub scram_users: Option<PathBuf>,
    /// Uids allowed on the local unix control socket besides root and the daemon's own.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Groups allowed to operate, and uids and groups allowed to read only, on the
    /// local socket.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    #[serde(default)]
    pub readonly_uids: Vec<u32>,
    #[serde(default)]
    pub readonly_gids: Vec<u32>,
    /// Seconds an unused prepared migration (its one-time identities) stays valid.
    #[serde(default = "default_credential_ttl")]
    pub credential_ttl_secs: u64,
    /// `host:port` for the Prometheus metrics endpoint (plain HTTP, `GET /metrics`);
    /// none by default. It shows only counts, but bind it to loopback or a management
    /// network all the same.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The newest control protocol version this daemon speaks (default: this build's).
    /// Only for tests that stand in for the previous release; never lower it in service.
    #[serde(default)]
    pub danger_protocol_version: Option<u32>,
    /// The libvirt this daemon drives for `migrate --libvirt` (the source asks it to
    /// migrate; the destination carries streams to its socket).
    #[serde(default = "default_libvirt_uri")]
    pub libvirt_uri: String,
    /// Where each libvirt migration gets its directory of sockets (`DIR/ID/`). It must be
    /// the same path on every host: libvirt uses one path on both sides.
    #[serde(default = "default_libvirt_migrations_dir")]
    pub libvirt_migrations_dir: PathBuf,
    /// The group libvirt runs QEMU as (qemu.conf `group`), when QEMU does not run as root:
    /// each migration's directory and the sockets QEMU uses in it are given to it
    /// (source: `0750`, sockets `0660`; destination: `0770`, QEMU makes its sockets there).
    /// None: root only.
    #[serde(default)]
    pub libvirt_qemu_group: Option<String>,
}

fn default_libvirt_uri() -> String {
    "qemu:///system".to_string()
}

fn default_libvirt_migrations_dir() -> PathBuf {
    PathBuf::from("/run/vmferry/migrations")
}

fn default_qemu() -> String {
    "qemu-system-x86_64".to_string()
}

fn default_auth() -> Vec<String> {
    vec!["x509".to_string()]
}

fn default_credential_ttl() -> u64 {
    300
}

impl DaemonConfig {
    /// Where copied disk images are created.
    pub fn images_dir(&self) -> PathBuf {
        self.images_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("images"))
    }

    pub fn new(state_dir: PathBuf) -> Self {
        DaemonConfig {
            listen: None,
            data_listen: None,
            transport: TransportChoice::Auto,
            state_dir,
            images_dir: None,
            certs: None,
            qemu: default_qemu(),
            accel: Accel::Auto,
            advertise: None,
            auth: default_auth(),
            allowed_clients: Vec::new(),
            readonly_clients: Vec::new(),
            scram_users: None,
            allowed_peers: Vec::new(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            readonly_uids: Vec::new(),
            readonly_gids: Vec::new(),
            credential_ttl_secs: default_credential_ttl(),
            metrics: None,
            danger_protocol_version: None,
            libvirt_uri: default_libvirt_uri(),
            libvirt_migrations_dir: default_libvirt_migrations_dir(),
            libvirt_qemu_group: None,
        }
    }

    /// The newest protocol version this daemon speaks.
    pub fn protocol_version(&self) -> u32 {
        self.danger_protocol_version
            .unwrap_or(vmferry_proto::PROTOCOL_VERSION)
            .clamp(
                vmferry_proto::MIN_PROTOCOL_VERSION,
                vmferry_proto::PROTOCOL_VERSION,
            )
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The address peers dial for data: `advertise`, else `data_listen`, else `listen`,
    /// unless that is a wildcard address nobody can dial (then the controller fills in
    /// the address it reached us at).
    pub fn data_address(&self) -> Option<String> {
        self.advertise
            .clone()
            .or_else(|| self.data_listen.clone().filter(|a| dialable(a)))
            .or_else(|| self.control_address())
    }

    /// The control address peers can dial (the tunnel rides on it), if `listen` names one.
    pub fn control_address(&self) -> Option<String> {
        self.listen.clone().filter(|a| dialable(a))
    }

    /// Path of the local control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }
}

/// False for wildcard listen addresses (`0.0.0.0:4700`, `[::]:4700`).
fn dialable(addr: &str) -> bool {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => !a.ip().is_unspecified(),
        Err(_) => true,
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
        assert_eq!(c.metrics, None);
    }

    #[test]
    fn the_metrics_address_comes_from_the_config_file() {
        let c: DaemonConfig =
            toml::from_str("state_dir = \"/s\"\nmetrics = \"127.0.0.1:9464\"\n").expect("parses");
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9464"));
    }

    #[test]
    fn data_and_control_addresses_skip_wildcards_and_prefer_advertise() {
        let mut c = DaemonConfig::new("/s".into());
        c.listen = Some("0.0.0.0:4700".into());
        assert_eq!(c.data_address(), None);
        assert_eq!(c.control_address(), None);
        c.listen = Some("10.0.0.1:4700".into());
        c.data_listen = Some("10.0.0.1:4701".into());
        assert_eq!(c.data_address().as_deref(), Some("10.0.0.1:4701"));
        assert_eq!(c.control_address().as_deref(), Some("10.0.0.1:4700"));
        c.advertise = Some("hosta:4701".into());
        assert_eq!(c.data_address().as_deref(), Some("hosta:4701"));
        let t: DaemonConfig =
            toml::from_str("state_dir = \"/s\"\ntransport = \"tunnel\"").expect("parses");
        assert_eq!(t.transport, TransportChoice::Tunnel);
    }
}
