//! The daemon's shared state: its configuration, the VMs and migrations it holds, its
//! credentials and authorization policy (both replaced on SIGHUP), its audit log and its
//! metrics.
//!
//! Every connection's thread and every migration's job sees the daemon through this one
//! type. It holds state and answers questions about it; it never listens, accepts or
//! serves a request (that is `server` and `control`).

use crate::audit::AuditLog;
use crate::auth::AuthPolicy;
use crate::config::DaemonConfig;
use crate::error::{DaemonError, Result};
use crate::metrics::Metrics;
use crate::migration::Migrations;
use crate::vms::VmRegistry;
use std::sync::{Arc, RwLock};
use vmferry_channel::certs::HostCredentials;
use vmferry_channel::tls;

/// Shared state of a running daemon.
#[derive(Debug)]
pub struct Daemon {
    pub config: DaemonConfig,
    pub vms: VmRegistry,
    pub migrations: Migrations,
    /// The host identity, when a certs dir is configured; replaced on SIGHUP.
    pub(crate) creds: RwLock<Option<HostCredentials>>,
    pub(crate) control_tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    pub(crate) policy: RwLock<Arc<AuthPolicy>>,
    pub audit: AuditLog,
    /// Counters of migrations started and ended here, for `--metrics`.
    pub metrics: Metrics,
    pub hostname: String,
    /// How migration bytes are protected here, for status and results.
    pub data_path: String,
}

impl Daemon {
    /// The host's CA-signed credentials, needed for x509 data channels.
    pub fn credentials(&self) -> Result<HostCredentials> {
        read(&self.creds).clone().ok_or_else(|| {
            DaemonError::BadRequest("this daemon has no certificates configured (--certs)".into())
        })
    }

    pub fn policy(&self) -> Arc<AuthPolicy> {
        read(&self.policy).clone()
    }

    /// The metrics page as a scrape gets it.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.migrations.in_flight())
    }

    pub(crate) fn control_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        read(&self.control_tls).clone()
    }

    /// Reloads the certificates and the users file (SIGHUP): new connections use the new
    /// ones, connections already open keep theirs. On any error the old ones stay.
    pub fn reload(&self) -> std::result::Result<(), ReloadError> {
        let policy = AuthPolicy::from_config(&self.config)?;
        let (creds, tls) = load_tls(&self.config, &policy)?;
        *write(&self.creds) = creds;
        *write(&self.control_tls) = tls;
        *write(&self.policy) = Arc::new(policy);
        Ok(())
    }
}

/// Why a reload kept the old credentials. Either cause says it all.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Policy(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Credentials(#[from] DaemonError),
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

pub(crate) type TlsSetup = (Option<HostCredentials>, Option<Arc<rustls::ServerConfig>>);

/// The host credentials and the control API's TLS configuration.
pub(crate) fn load_tls(config: &DaemonConfig, policy: &AuthPolicy) -> Result<TlsSetup> {
    let creds = match &config.certs {
        Some(dir) => {
            Some(HostCredentials::load(dir).map_err(|e| DaemonError::BadRequest(e.to_string()))?)
        }
        None => None,
    };
    let tls = match &creds {
        Some(c) => Some(
            tls::control_server_config_with(c, policy.requires_client_cert())
                .map_err(|e| DaemonError::BadRequest(e.to_string()))?,
        ),
        None => None,
    };
    Ok((creds, tls))
}
