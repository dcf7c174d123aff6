//! x509 mode of the data channel: both daemons use their CA-signed host certificates.
//! (Also reachable as `vmferry_channel::x509_data`, its old path.)
//!
//! A data connection must still name its migration in the TLS server name (so the
//! destination can route it on its shared port), so the name the destination's
//! certificate is checked against cannot be the SNI: it is fixed here, per connection, to
//! the destination's host name or the operator's `--tls-hostname`. Everything else —
//! chain, expiry, signatures — is webpki's ordinary verification.
//!
//! This module must never check a data connection's certificate against the name the
//! client sent, nor skip `allowed_peers` when it is given.

use super::config::{self, control_server_config, provider, roots, tls13_client};
use super::verify::Verifier;
use super::TlsError;
use crate::certs::HostCredentials;
use crate::dn::DnPattern;
use rustls::pki_types::ServerName;
use std::sync::Arc;

/// Client (source) side: our host certificate as client certificate; the destination's
/// must chain to our CA and be valid for `expected_name`.
pub fn client_config(
    creds: &HostCredentials,
    expected_name: &str,
    allowed: &[DnPattern],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let p = provider();
    let mut r = rustls::RootCertStore::empty();
    for c in &creds.ca {
        r.add(c.clone()).map_err(|e| {
            TlsError::Config(format!("CA certificate in {}: {e}", creds.dir.display()))
        })?;
    }
    let name = ServerName::try_from(expected_name.to_string())
        .map_err(|_| TlsError::Config(format!("{expected_name:?} is not a valid TLS host name")))?;
    let verifier = Verifier::ca(r, p.clone())
        .map_err(|e| TlsError::Config(format!("cannot build the certificate verifier: {e}")))?
        .for_name(Some(name))
        .allowing(allowed);
    let mut cfg = tls13_client(p)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| {
            TlsError::Config(format!("host certificate in {}: {e}", creds.dir.display()))
        })?;
    cfg.resumption = rustls::client::Resumption::disabled();
    // The pump takes the record layer over (see `config`).
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Server (destination) side: the same mutual-TLS rules as the control API.
pub fn server_config(creds: &HostCredentials) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    control_server_config(creds)
}

/// Server side of an x509 data connection. The client's certificate must chain to our
/// CA, as for the control API; when the client is the peer whose name matters (the
/// reverse transport: the destination dials the source) it must also be valid for
/// `expected_name`, exactly as when it is the server; and its subject must match
/// `allowed` when that is not empty.
pub fn server_config_expecting(
    creds: &HostCredentials,
    expected_name: Option<&str>,
    allowed: &[DnPattern],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let p = provider();
    let verifier = Verifier::ca(roots(creds)?, p.clone())
        .map_err(|e| TlsError::Config(format!("cannot build the client verifier: {e}")))?;
    let name = match expected_name {
        Some(n) => Some(
            ServerName::try_from(n.to_string())
                .map_err(|_| TlsError::Config(format!("{n:?} is not a valid TLS host name")))?,
        ),
        None => None,
    };
    config::server_config(p, verifier.for_name(name).allowing(allowed), creds)
}
