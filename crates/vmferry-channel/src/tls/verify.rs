//! The one certificate verifier every vmferry configuration uses, for server and for
//! client certificates alike, parameterized by what it checks:
//! - [`Trust`]: exactly one pinned certificate (by fingerprint: names and dates ignored,
//!   the pin is the identity and lives one migration), or a chain to our CA (webpki);
//! - a fixed name the certificate must be valid for, instead of the server name the
//!   client sent (x509 data connections, whose server name routes the migration), or in
//!   addition to the chain check for a client certificate (the reverse transport);
//! - subjects the certificate must match (`allowed_peers`), when any are given;
//! - whether a client must present a certificate at all.
//!
//! What it must never do: accept a certificate it did not check; accept a handshake
//! signature it did not verify (a pinned peer must hold the pinned certificate's private
//! key); or check a TLS 1.2 signature (every configuration is TLS 1.3 only, so none
//! should arrive; one that does is refused).

use crate::dn::{self, DnPattern};
use crate::identity::{fingerprint_of, Fingerprint};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use std::path::PathBuf;
use std::sync::Arc;

/// What a verifier checks a certificate against.
#[derive(Debug)]
pub(super) struct Verifier {
    trust: Trust,
    /// The name a certificate must be valid for. For a server certificate it replaces
    /// the server name the client sent; for a client certificate it is checked in
    /// addition to the chain. `None`: the server name sent / no name check.
    name: Option<ServerName<'static>>,
    /// Subjects a certificate must match (any of them); empty: any subject.
    allowed: Vec<DnPattern>,
    /// A client must present a certificate (server side only).
    client_auth_mandatory: bool,
    provider: Arc<CryptoProvider>,
}

/// Where trust comes from.
#[derive(Debug)]
enum Trust {
    /// Exactly this certificate.
    Pinned(Fingerprint),
    /// A chain to one of our CAs, checked by webpki.
    Ca {
        server: Arc<WebPkiServerVerifier>,
        client: Arc<dyn ClientCertVerifier>,
        /// Name this file when a server's chain leads to none of its CAs: the first
        /// thing an operator has to check. (The peer then sees the alert
        /// `CertificateUnknown` instead of `UnknownCA`.)
        names_ca_file: Option<PathBuf>,
    },
}

impl Verifier {
    /// Accepts exactly the certificate whose fingerprint is `expected`.
    pub(super) fn pinned(expected: Fingerprint, provider: Arc<CryptoProvider>) -> Verifier {
        Verifier {
            trust: Trust::Pinned(expected),
            name: None,
            allowed: Vec::new(),
            client_auth_mandatory: true,
            provider,
        }
    }

    /// Accepts certificates that chain to one of `roots` (webpki's checks).
    pub(super) fn ca(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<Verifier, VerifierBuilderError> {
        let roots = Arc::new(roots);
        let server =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let client =
            WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
        Ok(Verifier {
            trust: Trust::Ca {
                server,
                client,
                names_ca_file: None,
            },
            name: None,
            allowed: Vec::new(),
            client_auth_mandatory: true,
            provider,
        })
    }

    /// Rewords "unknown issuer" of a server certificate to name `ca_file`.
    pub(super) fn naming_ca_file(mut self, ca_file: PathBuf) -> Verifier {
        if let Trust::Ca { names_ca_file, .. } = &mut self.trust {
            *names_ca_file = Some(ca_file);
        }
        self
    }

    /// Checks certificates against `name` (see the field).
    pub(super) fn for_name(mut self, name: Option<ServerName<'static>>) -> Verifier {
        self.name = name;
        self
    }

    /// Requires a subject matching one of `allowed` (none: any).
    pub(super) fn allowing(mut self, allowed: &[DnPattern]) -> Verifier {
        self.allowed = allowed.to_vec();
        self
    }

    /// Whether a client must present a certificate (one it does present is checked).
    pub(super) fn requiring_client_cert(mut self, required: bool) -> Verifier {
        self.client_auth_mandatory = required;
        self
    }

    /// The subject must match one of `allowed` (when any are given).
    fn check_allowed(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.allowed.is_empty() {
            return Ok(());
        }
        let rdns = dn::subject_rdns(cert).map_err(|e| rustls::Error::General(e.to_string()))?;
        if self.allowed.iter().any(|p| p.matches(&rdns)) {
            return Ok(());
        }
        Err(rustls::Error::General(format!(
            "certificate subject '{}' is not in allowed_peers",
            dn::format_rdns(&rdns)
        )))
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The signature must come from the pinned certificate, whatever was checked before.
        if let Trust::Pinned(expected) = &self.trust {
            check_pin(cert, *expected)?;
        }
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.trust {
            Trust::Pinned(expected) => check_pin(end_entity, *expected)?,
            Trust::Ca {
                server,
                names_ca_file,
                ..
            } => {
                let name = self.name.as_ref().unwrap_or(server_name);
                server
                    .verify_server_cert(end_entity, intermediates, name, ocsp, now)
                    .map_err(|e| match (e, names_ca_file) {
                        (
                            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                            Some(ca_file),
                        ) => rustls::Error::InvalidCertificate(CertificateError::Other(
                            rustls::OtherError(Arc::new(NotSignedByCa {
                                ca_file: ca_file.clone(),
                            })),
                        )),
                        (other, _) => other,
                    })?;
            }
        }
        self.check_allowed(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        match &self.trust {
            Trust::Pinned(_) => &[],
            Trust::Ca { client, .. } => client.root_hint_subjects(),
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.trust {
            Trust::Pinned(expected) => check_pin(end_entity, *expected)?,
            Trust::Ca { client, .. } => {
                client.verify_client_cert(end_entity, intermediates, now)?;
                if let Some(name) = &self.name {
                    let parsed = ParsedCertificate::try_from(end_entity)?;
                    rustls::client::verify_server_name(&parsed, name)?;
                }
            }
        }
        self.check_allowed(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Every config here is TLS 1.3 only, so a TLS 1.2 signature never reaches a verifier;
/// if one did, it is refused rather than checked.
fn tls12_refused() -> rustls::Error {
    rustls::Error::General("vmferry never uses TLS 1.2".into())
}

fn check_pin(cert: &CertificateDer<'_>, expected: Fingerprint) -> Result<(), rustls::Error> {
    let got = fingerprint_of(cert);
    if got == expected {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch { got, expected })),
        )))
    }
}

/// Why a pinned peer was refused; carried inside rustls's error so it reaches logs whole.
#[derive(Debug)]
pub(super) struct PinMismatch {
    pub(super) got: Fingerprint,
    pub(super) expected: Fingerprint,
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not the certificate pinned for this migration (got {}, expected {})",
            self.got, self.expected
        )
    }
}

impl std::error::Error for PinMismatch {}

/// The server's chain does not lead to a CA in our `ca.pem`.
#[derive(Debug)]
pub(super) struct NotSignedByCa {
    ca_file: PathBuf,
}

impl std::fmt::Display for NotSignedByCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not signed by a CA in {}", self.ca_file.display())
    }
}

impl std::error::Error for NotSignedByCa {}
