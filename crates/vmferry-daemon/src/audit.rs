//! The audit log: one line for every accepted and refused connection, every change a
//! client asks for, and every migration phase — who, from where, by which scheme, what,
//! and the outcome — and one summary line for each half of a migration that ended here
//! (`migration::record`).
//!
//! Lines are JSON, appended to `STATE_DIR/audit.log` (mode 0600) and also emitted as
//! `tracing` events with target `audit`. Writing the log must never fail a request, and
//! a line must never carry a secret (no password, no key, no cookie).

use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

/// One audit line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Event<'a> {
    /// `connection`, `request`, `migration`, `credentials`.
    pub what: &'a str,
    /// The client as authenticated (`CN=...`, `user NAME`, `uid N`), or `-` before that.
    pub who: &'a str,
    /// Peer address, or `local` for the unix socket; for a `migration` line, the source
    /// host.
    pub from: &'a str,
    /// `x509`, `scram-sha-256`, `unix`, `pinned`, ...
    pub scheme: &'a str,
    /// The operation (`accept`, `begin`, `vm_start`, ...).
    pub op: &'a str,
    /// Migration id or VM name, when there is one.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub subject: &'a str,
    /// `ok`, `refused`, `failed`.
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub detail: &'a str,
    /// `migration` lines: this daemon's half (`source`, `destination`) ...
    #[serde(skip_serializing_if = "str::is_empty")]
    pub role: &'a str,
    /// ... the VM (its name, or its QMP socket in attach mode) ...
    #[serde(skip_serializing_if = "str::is_empty")]
    pub vm: &'a str,
    /// ... the destination host ...
    #[serde(skip_serializing_if = "str::is_empty")]
    pub to: &'a str,
    /// ... and the transport that carried it (`none` if it ended before one was made).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub transport: &'a str,
}

/// The outcomes that are logged as information rather than warnings.
const GOOD: [&str; 2] = ["ok", "completed"];

impl AuditLog {
    pub fn open(state_dir: &Path) -> AuditLog {
        let path = state_dir.join("audit.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path);
        if let Err(e) = &file {
            tracing::error!("cannot open the audit log {}: {e}", path.display());
        }
        AuditLog {
            path,
            file: Mutex::new(file.ok()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, e: &Event<'_>) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut v = serde_json::to_value(e).unwrap_or_default();
        v["unix_ms"] = ms.into();
        let line = v.to_string();
        if GOOD.contains(&e.outcome) {
            tracing::info!(target: "audit", "{line}");
        } else {
            tracing::warn!(target: "audit", "{line}");
        }
        let mut f = match self.file.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(f) = f.as_mut() {
            if let Err(err) = writeln!(f, "{line}") {
                tracing::error!("cannot write the audit log {}: {err}", self.path.display());
            }
        }
    }
}
