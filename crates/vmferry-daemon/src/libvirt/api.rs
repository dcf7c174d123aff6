//! The libvirt calls vmferry makes, through libvirt's own bindings (the `virt` crate):
//! connect, find a domain, read its state, definition and job progress, and the URIs
//! and socket paths a peer-to-peer migration through vmferry uses.
//!
//! Every libvirt failure becomes a [`DaemonError::Libvirt`] saying what was asked, with
//! libvirt's own message. It must never let libvirt print to stderr (its default error
//! handler does; [`open`] turns it off) and never call `virDomainGetJobStats` through
//! `virt` 0.5, which frees libvirt's array with Rust's allocator (the daemon's is
//! mimalloc) and panics on a parameter of an unexpected type: progress comes from
//! `virDomainGetJobInfo` ([`progress`]).

use crate::error::{DaemonError, Result};
use std::path::{Path, PathBuf};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

/// One connection to a libvirt daemon. Closed on drop.
pub struct Libvirt {
    conn: Connect,
    pub uri: String,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Libvirt({})", self.uri)
    }
}

/// libvirt's words for a failure of `what`.
pub fn error(what: &str, e: &virt::error::Error) -> DaemonError {
    DaemonError::Libvirt(format!("{what}: {}", e.message().trim()))
}

/// Opens a read-write connection to the libvirt at `uri`.
pub fn open(uri: &str) -> Result<Libvirt> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(virt::error::clear_error_callback);
    let conn = Connect::open(Some(uri)).map_err(|e| {
        DaemonError::Libvirt(format!(
            "cannot connect to libvirt at {uri}: {}",
            e.message().trim()
        ))
    })?;
    Ok(Libvirt {
        conn,
        uri: uri.to_string(),
    })
}

/// What a domain is doing, as far as a migration cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Paused; `migrating` when a migration paused it (the switch-over, or an incoming
    /// domain on the destination).
    Paused {
        migrating: bool,
    },
    ShutOff,
    /// Any other state, in libvirt's words.
    Other(String),
}

impl Libvirt {
    /// The domain called `name`, or `None` when this libvirt has none.
    pub fn domain(&self, name: &str) -> Result<Option<Domain>> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => Ok(None),
            Err(e) => Err(error(&format!("looking up domain {name}"), &e)),
        }
    }

    /// The domain with this UUID, or `None`.
    pub fn domain_by_uuid(&self, uuid: &str) -> Result<Option<Domain>> {
        match self.conn.lookup_domain_by_uuid_string(uuid) {
            Ok(d) => Ok(Some(d)),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => Ok(None),
            Err(e) => Err(error(&format!("looking up domain {uuid}"), &e)),
        }
    }

    /// libvirt's release, e.g. `9.0.0`.
    pub fn version(&self) -> Option<String> {
        let v = self.conn.lib_version().ok()?;
        Some(format!(
            "{}.{}.{}",
            v / 1_000_000,
            (v / 1000) % 1000,
            v % 1000
        ))
    }

    pub fn connect(&self) -> &Connect {
        &self.conn
    }
}

/// The domain's state.
pub fn run_state(dom: &Domain) -> Result<RunState> {
    use virt::domain::{DomainPausedReason, DomainStateReason};
    let (state, reason) = dom
        .state()
        .map_err(|e| error("reading the domain's state", &e))?;
    Ok(match state {
        Enum::Known(DomainState::Running) => RunState::Running,
        Enum::Known(DomainState::Paused) => RunState::Paused {
            migrating: matches!(
                reason,
                Enum::Known(DomainStateReason::Paused(Enum::Known(
                    DomainPausedReason::Migration
                        | DomainPausedReason::PostCopy
                        | DomainPausedReason::PostCopyFailed
                )))
            ),
        },
        Enum::Known(DomainState::Shutoff) => RunState::ShutOff,
        Enum::Known(other) => RunState::Other(format!("{other:?}").to_lowercase()),
        Enum::Unknown(n) => RunState::Other(format!("state {n}")),
    })
}

/// A migration job's progress, from `virDomainGetJobInfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Whether a job runs (libvirt's `VIR_DOMAIN_JOB_BOUNDED`/`UNBOUNDED`).
    pub active: bool,
    pub elapsed_ms: u64,
    pub mem_total: u64,
    pub mem_processed: u64,
    pub mem_remaining: u64,
    pub disk_total: u64,
    pub disk_processed: u64,
    pub disk_remaining: u64,
}

/// The domain's job, now.
pub fn progress(dom: &Domain) -> Result<Progress> {
    let j = dom
        .job_info()
        .map_err(|e| error("reading the migration job's progress", &e))?;
    Ok(Progress {
        active: matches!(j.r#type, 1 | 2),
        elapsed_ms: j.time_elapsed.unwrap_or(0),
        mem_total: j.mem_total.unwrap_or(0),
        mem_processed: j.mem_processed.unwrap_or(0),
        mem_remaining: j.mem_remaining.unwrap_or(0),
        disk_total: j.disk_total.unwrap_or(0),
        disk_processed: j.disk_processed.unwrap_or(0),
        disk_remaining: j.disk_remaining.unwrap_or(0),
    })
}

/// A libvirt URI taken apart as far as vmferry needs: `qemu:///system` is driver
/// `qemu`, path `/system`; a `socket=` parameter names the daemon's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriParts {
    pub driver: String,
    pub path: String,
    pub socket: Option<PathBuf>,
}

/// Parses a local libvirt URI (`qemu:///system`, `qemu+unix:///system?socket=/p`).
pub fn parse_uri(uri: &str) -> Result<UriParts> {
    let bad = |why: &str| DaemonError::BadRequest(format!("libvirt URI {uri:?}: {why}"));
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| bad("expected DRIVER:///PATH, e.g. qemu:///system"))?;
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if driver.is_empty() || !driver.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad("the driver name is not a plain word"));
    }
    if transport.is_some_and(|t| t != "unix") {
        return Err(bad(
            "only a local libvirt is reached (no host, transport unix at most)",
        ));
    }
    let (hostpath, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let path = hostpath
        .strip_prefix('/')
        .map(|p| format!("/{p}"))
        .ok_or_else(|| bad("it names a remote host; use the local daemon's URI"))?;
    if !matches!(path.as_str(), "/system" | "/session") {
        return Err(bad("the path must be /system or /session"));
    }
    let socket = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("socket="))
        .map(PathBuf::from);
    Ok(UriParts {
        driver: driver.to_string(),
        path,
        socket,
    })
}

impl UriParts {
    /// The socket this libvirt daemon listens on: `socket=` if given, else the
    /// system daemon's (`/run/libvirt/libvirt-sock`, or virtqemud's where only the
    /// modular daemons run).
    pub fn daemon_socket(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if self.path == "/session" {
            return Err(DaemonError::BadRequest(
                "a qemu:///session libvirt_uri needs socket=PATH (its socket is per user)".into(),
            ));
        }
        let mono = Path::new("/run/libvirt/libvirt-sock");
        let modular = Path::new("/run/libvirt/virtqemud-sock");
        Ok(if !mono.exists() && modular.exists() {
            modular.to_path_buf()
        } else {
            mono.to_path_buf()
        })
    }

    /// The peer-to-peer destination URI that reaches this libvirt through `socket`.
    pub fn through(&self, socket: &Path) -> String {
        format!(
            "{}+unix://{}?socket={}",
            self.driver,
            self.path,
            socket.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_uris_parse_and_remote_ones_are_refused() {
        let p = parse_uri("qemu:///system").expect("system");
        assert_eq!((p.driver.as_str(), p.path.as_str()), ("qemu", "/system"));
        assert_eq!(p.socket, None);
        let p = parse_uri("qemu+unix:///system?socket=/w/run/libvirt-sock").expect("socket");
        assert_eq!(p.socket, Some(PathBuf::from("/w/run/libvirt-sock")));
        assert_eq!(
            p.through(Path::new("/run/vmferry/migrations/ab/libvirt.sock")),
            "qemu+unix:///system?socket=/run/vmferry/migrations/ab/libvirt.sock"
        );
        for bad in [
            "qemu+ssh://host/system",
            "qemu://host/system",
            "system",
            "qemu:///other",
            "q$emu:///system",
        ] {
            let e = parse_uri(bad).expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
