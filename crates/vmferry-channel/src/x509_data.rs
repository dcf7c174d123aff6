//! x509 mode of the data channel: both daemons use their CA-signed host certificates.
//!
//! A data connection must still name its migration in the TLS server name (so the
//! destination can route it on its shared port), so the name the destination's
//! certificate is checked against cannot be the SNI: it is fixed here, per connection, to
//! the destination's host name or the operator's `--tls-hostname`. Everything else —
//! chain, expiry, signatures — is webpki's ordinary verification.

use crate::certs::HostCredentials;
use crate::dn::{self, DnPattern};
use crate::tls::{self, TlsError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

/// Verifies the server's chain against our CA for a fixed name, whatever SNI was sent.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
    allowed: Vec<DnPattern>,
}

/// The peer's subject must match one of `allowed` (when any are given).
fn check_allowed(cert: &CertificateDer<'_>, allowed: &[DnPattern]) -> Result<(), rustls::Error> {
    if allowed.is_empty() {
        return Ok(());
    }
    let rdns = dn::subject_rdns(cert).map_err(rustls::Error::General)?;
    if allowed.iter().any(|p| p.matches(&rdns)) {
        return Ok(());
    }
    Err(rustls::Error::General(format!(
        "certificate subject '{}' is not in allowed_peers",
        dn::format_rdns(&rdns)
    )))
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sni: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)?;
        check_allowed(end_entity, &self.allowed)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client (source) side: our host certificate as client certificate; the destination's
/// must chain to our CA and be valid for `expected_name`.
pub fn client_config(
    creds: &HostCredentials,
    expected_name: &str,
    allowed: &[DnPattern],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = crate::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in &creds.ca {
        roots.add(c.clone()).map_err(|e| {
            TlsError::Config(format!("CA certificate in {}: {e}", creds.dir.display()))
        })?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("cannot build the certificate verifier: {e}")))?;
    let name = ServerName::try_from(expected_name.to_string())
        .map_err(|_| TlsError::Config(format!("{expected_name:?} is not a valid TLS host name")))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FixedNameVerifier {
            inner,
            name,
            allowed: allowed.to_vec(),
        }))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| {
            TlsError::Config(format!("host certificate in {}: {e}", creds.dir.display()))
        })?;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Server (destination) side: the same mutual-TLS rules as the control API.
pub fn server_config(creds: &HostCredentials) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    tls::control_server_config(creds)
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
    let p = tls::provider();
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(tls::roots(creds)?),
        p.clone(),
    )
    .build()
    .map_err(|e| TlsError::Config(format!("cannot build the client verifier: {e}")))?;
    let name = match expected_name {
        Some(n) => Some(
            ServerName::try_from(n.to_string())
                .map_err(|_| TlsError::Config(format!("{n:?} is not a valid TLS host name")))?,
        ),
        None => None,
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(NamedClientVerifier {
            inner,
            name,
            allowed: allowed.to_vec(),
        }))
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| tls::host_cert_err(creds, e))?;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// webpki's client verification, plus a name check on the client's certificate.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    name: Option<ServerName<'static>>,
    allowed: Vec<DnPattern>,
}

impl rustls::server::danger::ClientCertVerifier for NamedClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(name) = &self.name {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&parsed, name)?;
        }
        check_allowed(end_entity, &self.allowed)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
