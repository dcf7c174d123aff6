//! The rustls configurations of the control API and of pinned data connections, and
//! the crypto provider they share. (x509 data connections: [`x509`](super::x509).)
//!
//! This module must never build a configuration that allows anything but TLS 1.3,
//! resumes a session (a server sends no tickets; a client keeps none), or trusts a peer
//! without [`Verifier`] checking it.
//!
//! Every configuration a data connection may use enables secret extraction: once the
//! handshake is done, the pump takes the record layer over with the traffic secrets and
//! rustls' `KernelConnection`, which renews them (as kernel TLS would). Extraction is an
//! API of the connection's owner only; it changes nothing a peer can see or do.

use super::verify::Verifier;
use super::TlsError;
use crate::certs::HostCredentials;
use crate::identity::{EphemeralIdentity, Fingerprint};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ServerConfig};
use std::sync::Arc;

/// Control API, server side: mutual TLS; a client certificate signed by our CA is required.
pub fn control_server_config(creds: &HostCredentials) -> Result<Arc<ServerConfig>, TlsError> {
    control_server_config_with(creds, true)
}

/// As [`control_server_config`]; with `require_client_cert` false a client may come
/// without a certificate (it must then authenticate inside, by password). A certificate
/// it does present is still verified against the CA.
pub fn control_server_config_with(
    creds: &HostCredentials,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let verifier = Verifier::ca(roots(creds)?, p.clone())
        .map_err(|e| TlsError::Config(format!("cannot build the client verifier: {e}")))?
        .requiring_client_cert(require_client_cert);
    server_config(p, verifier, creds)
}

/// Control API, client side: verifies the daemon against our CA (and the server name
/// given to [`connect`](super::connect)), and presents our certificate.
pub fn control_client_config(creds: &HostCredentials) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let verifier = Verifier::ca(roots(creds)?, p.clone())
        .map_err(|e| TlsError::Config(format!("cannot build the server verifier: {e}")))?
        .naming_ca_file(creds.dir.join("ca.pem"));
    let mut cfg = tls13_client(p)?
        // Not dangerous: webpki still does all the checking; only an error's words change.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| host_cert_err(creds, e))?;
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Control API, client side, for a client without a certificate (it will authenticate by
/// password): verifies the daemon against the CA in `ca_dir/ca.pem` only.
pub fn control_client_config_anonymous(
    ca_dir: &std::path::Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let ca_file = ca_dir.join("ca.pem");
    let ca = crate::certs::load_ca(ca_dir).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut r = rustls::RootCertStore::empty();
    for c in ca {
        r.add(c).map_err(|e| {
            TlsError::Config(format!(
                "{}: not a CA certificate vmferry can use ({e})",
                ca_file.display()
            ))
        })?;
    }
    let verifier = Verifier::ca(r, p.clone())
        .map_err(|e| TlsError::Config(format!("cannot build the server verifier: {e}")))?
        .naming_ca_file(ca_file);
    let mut cfg = tls13_client(p)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Data channel, destination side (pinned): presents `me`, and requires the client
/// certificate whose fingerprint is `peer` (the source's, from the cookie).
pub fn pinned_server_config(
    me: &EphemeralIdentity,
    peer: Fingerprint,
) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let mut cfg = tls13_server(p.clone())?
        .with_client_cert_verifier(Arc::new(Verifier::pinned(peer, p)))
        .with_single_cert(vec![me.cert().clone()], me.key())
        .map_err(|e| TlsError::Config(format!("this migration's identity: {e}")))?;
    cfg.send_tls13_tickets = 0;
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Data channel, source side (pinned): presents `me`, and accepts only the server
/// certificate whose fingerprint is `peer` (the destination's, from the cookie).
pub fn pinned_client_config(
    me: &EphemeralIdentity,
    peer: Fingerprint,
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let mut cfg = tls13_client(p.clone())?
        // The pin replaces name and chain checks; the handshake signature is still checked.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier::pinned(peer, p)))
        .with_client_auth_cert(vec![me.cert().clone()], me.key())
        .map_err(|e| TlsError::Config(format!("this migration's identity: {e}")))?;
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// A server config presenting `creds`, checking clients with `verifier`, TLS 1.3 only,
/// no tickets.
pub(super) fn server_config(
    p: Arc<CryptoProvider>,
    verifier: Verifier,
    creds: &HostCredentials,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = tls13_server(p)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| host_cert_err(creds, e))?;
    // We never resume: unread tickets would turn a clean close into a reset.
    cfg.send_tls13_tickets = 0;
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

pub(super) fn tls13_server(
    p: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TlsError> {
    ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))
}

pub(super) fn tls13_client(
    p: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// TLS 1.3 suites in our order of preference. AES-128-GCM first: it is TLS 1.3's
/// mandatory suite, and with 10 AES rounds instead of 14 it encrypts the data path
/// measurably faster than AES-256-GCM (see bench/README.md); AES-256-GCM and
/// ChaCha20-Poly1305 remain acceptable to a peer that prefers them.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

pub(super) fn roots(creds: &HostCredentials) -> Result<rustls::RootCertStore, TlsError> {
    let mut r = rustls::RootCertStore::empty();
    for c in &creds.ca {
        r.add(c.clone()).map_err(|e| {
            TlsError::Config(format!(
                "{}: not a CA certificate vmferry can use ({e})",
                creds.dir.join("ca.pem").display()
            ))
        })?;
    }
    Ok(r)
}

pub(super) fn host_cert_err(creds: &HostCredentials, e: rustls::Error) -> TlsError {
    TlsError::Config(format!(
        "{} and key.pem cannot be used: {e}",
        creds.dir.join("cert.pem").display()
    ))
}
