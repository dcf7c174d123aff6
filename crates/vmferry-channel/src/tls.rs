//! The security layer: every rustls configuration vmferry uses, the blocking handshakes
//! with deadlines, and the wording of TLS failures for operators.
//!
//! Three kinds of trust live here and nowhere else:
//! - control connections: mutual TLS with the operator's CA ([`control_server_config`],
//!   [`control_client_config`]);
//! - pinned data connections: each side accepts exactly the per-migration certificate
//!   whose fingerprint the controller carried in the cookie ([`pinned_server_config`],
//!   [`pinned_client_config`]);
//! - x509 data connections (see `x509_data`).
//!
//! One port serves them all: [`accept`] reads the ClientHello first and lets the caller
//! pick a configuration by the server name the client sent ([`data_sni`]).
//!
//! What this module must never do: negotiate anything but TLS 1.3; accept a certificate
//! "for now" or fall back to an unauthenticated connection; accept a pinned peer without
//! checking that it holds the pinned certificate's private key (the handshake signature
//! is always verified); or let a handshake wait without a deadline.
//!
//! A TLS 1.3 client finishes its handshake before the server has checked the client's
//! certificate: a server's refusal of our client certificate therefore arrives as an
//! alert on the first read after [`connect`], worded by [`describe_io`].

use crate::certs::HostCredentials;
use crate::identity::{fingerprint_of, EphemeralIdentity, Fingerprint};
use crate::transport::fmt_duration;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{Acceptor, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, ConnectionCommon,
    DigitallySignedStruct, DistinguishedName, ServerConfig, ServerConnection, SignatureScheme,
    StreamOwned,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server name a pinned client sends, and the DNS name a pinned certificate carries.
/// It is never resolved (`.invalid` is reserved) and never checked: the pin is the identity.
pub const PINNED_SERVER_NAME: &str = "vmferry.invalid";

const DATA_SNI_PREFIX: &str = "m-";
const DATA_SNI_SUFFIX: &str = ".data.vmferry.invalid";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot set up TLS: {0}")]
    Config(String),
    /// A handshake failure, already worded for an operator.
    #[error("{0}")]
    Handshake(String),
    #[error("TLS handshake with {peer} timed out after {}", fmt_duration(*.after))]
    Timeout { peer: String, after: Duration },
    #[error("{peer} closed the connection during the TLS handshake ({hint})")]
    Closed { peer: String, hint: &'static str },
    #[error("refused {peer}: {reason}")]
    Refused { peer: String, reason: String },
    #[error("TLS handshake with {peer} failed: {source}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
}

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
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(creds)?), p.clone());
    let builder = if require_client_cert {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Config(format!("cannot build the client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| host_cert_err(creds, e))?;
    // We never resume: unread tickets would turn a clean close into a reset.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Control API, client side: verifies the daemon against our CA (and the server name
/// given to [`connect`]), and presents our certificate.
pub fn control_client_config(creds: &HostCredentials) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(creds)?), p.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("cannot build the server verifier: {e}")))?;
    let verifier = NamesCaFile {
        inner,
        ca_file: creds.dir.join("ca.pem"),
    };
    let mut cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        // Not dangerous: webpki still does all the checking; only an error's words change.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| host_cert_err(creds, e))?;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Control API, client side, for a client without a certificate (it will authenticate by
/// password): verifies the daemon against the CA in `ca_dir/ca.pem` only.
pub fn control_client_config_anonymous(
    ca_dir: &std::path::Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let mut r = rustls::RootCertStore::empty();
    let ca = crate::certs::load_ca(ca_dir).map_err(|e| TlsError::Config(e.to_string()))?;
    for c in ca {
        r.add(c).map_err(|e| {
            TlsError::Config(format!(
                "{}: not a CA certificate vmferry can use ({e})",
                ca_dir.join("ca.pem").display()
            ))
        })?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(r), p.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("cannot build the server verifier: {e}")))?;
    let verifier = NamesCaFile {
        inner,
        ca_file: ca_dir.join("ca.pem"),
    };
    let mut cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
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
    let mut cfg = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(Pinned {
            expected: peer,
            provider: p,
        }))
        .with_single_cert(vec![me.cert().clone()], me.key())
        .map_err(|e| TlsError::Config(format!("this migration's identity: {e}")))?;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Data channel, source side (pinned): presents `me`, and accepts only the server
/// certificate whose fingerprint is `peer` (the destination's, from the cookie).
pub fn pinned_client_config(
    me: &EphemeralIdentity,
    peer: Fingerprint,
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let mut cfg = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        // The pin replaces name and chain checks; the handshake signature is still checked.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            expected: peer,
            provider: p,
        }))
        .with_client_auth_cert(vec![me.cert().clone()], me.key())
        .map_err(|e| TlsError::Config(format!("this migration's identity: {e}")))?;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The server name a data connection of migration `migration_id` sends, so that the
/// destination can route it on its shared port. The id must fit one DNS label with the
/// `m-` prefix (61 characters; vmferry's ids have 32).
pub fn data_sni(migration_id: &str) -> String {
    format!("{DATA_SNI_PREFIX}{migration_id}{DATA_SNI_SUFFIX}")
}

/// The migration id a data connection's server name carries, if it is one.
pub fn migration_id_from_sni(sni: &str) -> Option<&str> {
    let id = sni
        .strip_prefix(DATA_SNI_PREFIX)?
        .strip_suffix(DATA_SNI_SUFFIX)?;
    (!id.is_empty() && !id.contains('.')).then_some(id)
}

/// Server side of the shared port: reads the ClientHello within `timeout`, asks `choose`
/// for the configuration that serves the server name the client sent (`None` refuses:
/// nothing is sent, the connection is closed), and completes the handshake by the same
/// deadline. Returns the stream (socket timeouts cleared) and the server name.
pub fn accept(
    mut tcp: TcpStream,
    timeout: Duration,
    choose: impl FnOnce(Option<&str>) -> Option<Arc<ServerConfig>>,
) -> Result<(StreamOwned<ServerConnection, TcpStream>, Option<String>), TlsError> {
    let side = Side::Server;
    let who = side.who(
        &tcp.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "at an unknown address".into()),
    );
    let deadline = Instant::now() + timeout;
    let mut acceptor = Acceptor::default();
    let accepted = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: who,
                after: timeout,
            });
        }
        let _ = tcp.set_read_timeout(Some(left));
        match acceptor.read_tls(&mut tcp) {
            Ok(0) => {
                return Err(TlsError::Closed {
                    peer: who,
                    hint: side.closed_hint(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(who, e, timeout, side)),
        }
        match acceptor.accept() {
            Ok(Some(a)) => break a,
            Ok(None) => {}
            Err((e, mut alert)) => {
                let _ = tcp.set_write_timeout(Some(LINGER));
                let _ = alert.write_all(&mut tcp);
                linger_close(&tcp);
                return Err(TlsError::Refused {
                    peer: who,
                    reason: format!(
                        "it did not open a TLS handshake ({e}); is it a vmferry client?"
                    ),
                });
            }
        }
    };
    let sni = accepted.client_hello().server_name().map(str::to_string);
    let Some(config) = choose(sni.as_deref()) else {
        // Say why in TLS terms (a fatal unrecognized_name alert, in the clear as it is
        // before any key exists), rather than hanging up without a word.
        let _ = tcp.set_write_timeout(Some(LINGER));
        let _ = tcp.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112]);
        linger_close(&tcp);
        return Err(TlsError::Refused {
            peer: who,
            reason: match &sni {
                Some(name) => format!(
                    "it asked for '{name}', which this daemon does not serve \
                     (an unknown, finished or expired migration?)"
                ),
                None => "it sent no server name, and this daemon serves nothing without one".into(),
            },
        });
    };
    let mut conn = match accepted.into_connection(config) {
        Ok(c) => c,
        Err((e, mut alert)) => {
            let _ = tcp.set_write_timeout(Some(LINGER));
            let _ = alert.write_all(&mut tcp);
            linger_close(&tcp);
            return Err(TlsError::Handshake(describe_as(&e, &who, side)));
        }
    };
    if let Err(e) = finish_handshake(&mut conn, &mut tcp, &who, timeout, deadline, side) {
        // rustls has already tried to send the alert saying why; make sure it is read.
        linger_close(&tcp);
        return Err(e);
    }
    Ok((StreamOwned::new(conn, tcp), sni))
}

/// Client side: a TLS handshake over the connected `tcp`, completed within `timeout`, so
/// that a failure is known before any data flows. `server_name` is what the server's
/// certificate is checked against (and the SNI sent); `peer` (e.g. "10.0.0.2:4700")
/// names the server in errors. Socket timeouts are cleared on success.
pub fn connect(
    mut tcp: TcpStream,
    server_name: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
    peer: &str,
) -> Result<StreamOwned<ClientConnection, TcpStream>, TlsError> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|_| {
        TlsError::Config(format!(
            "'{server_name}' is not a valid TLS server name (a DNS name or an IP address)"
        ))
    })?;
    let mut conn = ClientConnection::new(config, name)
        .map_err(|e| TlsError::Config(format!("cannot start a TLS session with {peer}: {e}")))?;
    let deadline = Instant::now() + timeout;
    finish_handshake(&mut conn, &mut tcp, peer, timeout, deadline, Side::Client)?;
    Ok(StreamOwned::new(conn, tcp))
}

/// Words a rustls error for an operator. `peer` is the other side's address.
pub fn describe(e: &rustls::Error, peer: &str) -> String {
    describe_as(e, peer, Side::Either)
}

/// Words an I/O error from a TLS stream (e.g. an alert on the first read after the
/// handshake) for an operator.
pub fn describe_io(e: &std::io::Error, peer: &str) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(r) => describe(r, peer),
        None => format!("{peer}: {e}"),
    }
}

/// The subject of a certificate as text (for logs and DN checks), e.g. "CN=controller".
pub fn subject_of(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, c)) => c.subject().to_string(),
        Err(_) => "unparsable certificate".into(),
    }
}

/// Which end of the handshake we are: it decides how the peer is named and which hints fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
    /// Unknown (a post-handshake error reported by a caller).
    Either,
}

impl Side {
    fn who(self, addr: &str) -> String {
        match self {
            Side::Server => format!("client {addr}"),
            Side::Client | Side::Either => addr.to_string(),
        }
    }

    fn closed_hint(self) -> &'static str {
        match self {
            Side::Client => "is it a vmferry daemon?",
            Side::Server => "is it a vmferry client?",
            Side::Either => "is it vmferry at the other end?",
        }
    }

    fn our_certificate(self) -> &'static str {
        match self {
            Side::Client => "our client certificate",
            Side::Server | Side::Either => "our certificate",
        }
    }
}

/// How long a refused connection is kept open so the peer reads our alert rather than a
/// reset (closing with its unread data in our buffer would send a TCP RST).
const LINGER: Duration = Duration::from_millis(250);

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

pub(crate) fn roots(creds: &HostCredentials) -> Result<rustls::RootCertStore, TlsError> {
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

pub(crate) fn host_cert_err(creds: &HostCredentials, e: rustls::Error) -> TlsError {
    TlsError::Config(format!(
        "{} and key.pem cannot be used: {e}",
        creds.dir.join("cert.pem").display()
    ))
}

/// webpki's server verification, with "unknown issuer" reworded to name our CA file:
/// that is the first thing an operator has to check. (The peer then sees the alert
/// `CertificateUnknown` instead of `UnknownCA`.)
#[derive(Debug)]
struct NamesCaFile {
    inner: Arc<WebPkiServerVerifier>,
    ca_file: PathBuf,
}

/// The server's chain does not lead to a CA in our `ca.pem`.
#[derive(Debug)]
struct NotSignedByCa {
    ca_file: PathBuf,
}

impl std::fmt::Display for NotSignedByCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not signed by a CA in {}", self.ca_file.display())
    }
}

impl std::error::Error for NotSignedByCa {}

impl ServerCertVerifier for NamesCaFile {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                        Arc::new(NotSignedByCa {
                            ca_file: self.ca_file.clone(),
                        }),
                    )))
                }
                other => other,
            })
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
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Every config here is TLS 1.3 only, so a TLS 1.2 signature never reaches a verifier;
/// if one did, it is refused rather than checked.
fn tls12_refused() -> rustls::Error {
    rustls::Error::General("vmferry never uses TLS 1.2".into())
}

/// Why a pinned peer was refused; carried inside rustls's error so it reaches logs whole.
#[derive(Debug)]
struct PinMismatch {
    got: Fingerprint,
    expected: Fingerprint,
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

/// Accepts exactly one certificate, by fingerprint, ignoring names and dates (the pin is
/// the identity, and lives one migration). The handshake signature is still verified, so
/// the peer must hold the pinned certificate's private key.
#[derive(Debug)]
struct Pinned {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The signature must come from the pinned certificate, whatever was checked before.
        check_pin(cert, self.expected)?;
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

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_pin(end_entity, self.expected).map(|()| ServerCertVerified::assertion())
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

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_pin(end_entity, self.expected).map(|()| ClientCertVerified::assertion())
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

/// Drives a handshake to completion by `deadline` (`timeout` is what errors report).
fn finish_handshake<D>(
    conn: &mut ConnectionCommon<D>,
    tcp: &mut TcpStream,
    who: &str,
    timeout: Duration,
    deadline: Instant,
    side: Side,
) -> Result<(), TlsError> {
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: who.to_string(),
                after: timeout,
            });
        }
        let _ = tcp.set_read_timeout(Some(left));
        let _ = tcp.set_write_timeout(Some(left));
        match conn.complete_io(tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(who.to_string(), e, timeout, side)),
        }
    }
    // Callers set their own timeouts for the data that follows.
    let _ = tcp.set_read_timeout(None);
    let _ = tcp.set_write_timeout(None);
    Ok(())
}

fn io_err(who: String, e: std::io::Error, timeout: Duration, side: Side) -> TlsError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TlsError::Timeout {
            peer: who,
            after: timeout,
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => TlsError::Closed {
            peer: who,
            hint: side.closed_hint(),
        },
        _ => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) => TlsError::Handshake(describe_as(r, &who, side)),
            None => TlsError::Io {
                peer: who,
                source: e,
            },
        },
    }
}

/// Closes a refused connection so that the peer reads what we sent before it (an alert)
/// instead of a reset: stop writing, then drain what the peer still sends, briefly.
fn linger_close(tcp: &TcpStream) {
    let _ = tcp.shutdown(Shutdown::Write);
    let _ = tcp.set_read_timeout(Some(LINGER));
    let until = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    let mut r = tcp;
    while Instant::now() < until {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Words a rustls error for an operator; `who` names the peer as the messages need it
/// ("10.0.0.2:4700" or "client 10.0.0.2:51234").
fn describe_as(e: &rustls::Error, who: &str, side: Side) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => describe_certificate(c, who),
        E::NoCertificatesPresented => format!("{who} presented no certificate"),
        E::AlertReceived(a) => describe_alert(*a, who, side),
        E::PeerIncompatible(p) => {
            format!("{who} and we have no TLS 1.3 parameters in common ({p:?})")
        }
        E::InvalidMessage(_) | E::PeerMisbehaved(_) | E::InappropriateMessage { .. } => {
            format!("{who} sent something that is not valid TLS 1.3 ({e})")
        }
        other => format!("TLS with {who} failed: {other}"),
    }
}

fn describe_certificate(c: &CertificateError, who: &str) -> String {
    match c {
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let names = if presented.is_empty() {
                "no name at all".to_string()
            } else {
                presented
                    .iter()
                    .map(|p| format!("'{}'", clean_name(p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "certificate presented by {who} is not valid for '{}' (it names {names})",
                name_text(expected)
            )
        }
        CertificateError::NotValidForName => {
            format!("certificate presented by {who} is not valid for the name we asked for")
        }
        CertificateError::ExpiredContext { not_after, .. } => format!(
            "certificate presented by {who} expired at {}",
            fmt_time(*not_after)
        ),
        CertificateError::Expired => format!("certificate presented by {who} has expired"),
        CertificateError::NotValidYetContext { not_before, .. } => format!(
            "certificate presented by {who} is not valid before {} (is a clock wrong?)",
            fmt_time(*not_before)
        ),
        CertificateError::NotValidYet => {
            format!("certificate presented by {who} is not valid yet (is a clock wrong?)")
        }
        CertificateError::UnknownIssuer => {
            format!("{who} presented a certificate not signed by our CA")
        }
        CertificateError::BadSignature => {
            format!("certificate presented by {who} has a signature that does not check out")
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!(
                "certificate presented by {who} is not meant for this use \
                 (its extended key usage lacks TLS server or client authentication)"
            )
        }
        CertificateError::Other(o) => {
            if let Some(pin) = o.0.downcast_ref::<PinMismatch>() {
                format!(
                    "{who} does not present the certificate pinned for this migration \
                     (got {}, expected {})",
                    pin.got, pin.expected
                )
            } else if let Some(ca) = o.0.downcast_ref::<NotSignedByCa>() {
                format!("certificate presented by {who} is {ca}")
            } else {
                format!("certificate presented by {who} was refused: {o}")
            }
        }
        other => format!("certificate presented by {who} was refused: {other}"),
    }
}

fn describe_alert(a: AlertDescription, who: &str, side: Side) -> String {
    use AlertDescription as A;
    let about_our_certificate = match a {
        A::CertificateRequired => Some("it requires one and we sent none"),
        A::UnknownCA => Some("it does not trust the CA that signed it"),
        A::CertificateExpired => {
            Some("it says it is expired or not yet valid (check the dates, and both clocks)")
        }
        A::BadCertificate => Some("it is not valid for the name asked for, or malformed"),
        A::CertificateUnknown => Some(
            "it is not the certificate expected (signed by another CA, or not the one \
             pinned for this migration)",
        ),
        A::UnsupportedCertificate => Some("its extended key usage does not allow this use"),
        A::CertificateRevoked => Some("it was revoked"),
        A::DecryptError => Some("its signature does not check out"),
        A::AccessDenied => Some("it is not allowed here"),
        _ => None,
    };
    if let Some(why) = about_our_certificate {
        return format!(
            "{who} refused {}: {why} (alert: {a:?})",
            side.our_certificate()
        );
    }
    match a {
        A::UnrecognisedName => format!(
            "{who} does not serve the name we asked for (an unknown or expired migration?) \
             (alert: {a:?})"
        ),
        A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity => format!(
            "{who} and we have no TLS parameters in common (vmferry needs TLS 1.3) (alert: {a:?})"
        ),
        _ => format!("{who} ended the TLS session with alert {a:?}"),
    }
}

fn name_text(n: &ServerName<'_>) -> String {
    match n {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// rustls reports presented names as `DnsName("x")` / `IpAddress(1.2.3.4)`: keep the name.
fn clean_name(p: &str) -> &str {
    let inner = match (p.find('('), p.rfind(')')) {
        (Some(a), Some(b)) if a < b => &p[a + 1..b],
        _ => p,
    };
    inner.trim_matches('"')
}

fn fmt_time(t: UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{init_ca, issue_host, IssueOptions};
    use std::io::Write;
    use std::net::{SocketAddr, TcpListener};
    use std::path::Path;
    use std::thread::JoinHandle;

    const T: Duration = Duration::from_secs(5);

    /// A CA, a daemon "hosta" (also valid for 127.0.0.1) and a "controller".
    struct Pki {
        dir: tempfile::TempDir,
        hosta: HostCredentials,
        controller: HostCredentials,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("tmp");
            init_ca(&dir.path().join("ca"), "test CA").expect("ca");
            let mut o = IssueOptions::new("hosta");
            o.ips = vec!["127.0.0.1".parse().expect("ip")];
            let hosta = issue(dir.path(), "ca", "hosta", &o);
            let controller = issue(dir.path(), "ca", "c", &IssueOptions::new("controller"));
            Pki {
                dir,
                hosta,
                controller,
            }
        }

        /// Credentials issued by a second CA ("other"), trusting only that CA.
        fn other_ca(&self, name: &str, o: &IssueOptions) -> HostCredentials {
            let ca = self.dir.path().join("other");
            if !ca.join("ca.pem").exists() {
                init_ca(&ca, "other CA").expect("ca");
            }
            issue(self.dir.path(), "other", name, o)
        }
    }

    /// Midnight UTC on the first of January of `year` (plus `day - 1` days).
    fn utc(year: i32, day: u16) -> time::OffsetDateTime {
        time::Date::from_ordinal_date(year, day)
            .expect("date")
            .midnight()
            .assume_utc()
    }

    fn issue(root: &Path, ca: &str, name: &str, o: &IssueOptions) -> HostCredentials {
        issue_host(&root.join(ca), &root.join(name), o).expect("issue");
        HostCredentials::load(&root.join(name)).expect("load")
    }

    /// Accepts one connection with `choose`; on success reads "ping!" and answers "pong!".
    fn serve_with(
        choose: impl FnOnce(Option<&str>) -> Option<Arc<ServerConfig>> + Send + 'static,
    ) -> (String, JoinHandle<Result<Option<String>, String>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let h = std::thread::spawn(move || {
            let (tcp, _) = l.accept().expect("accept");
            let (mut s, sni) = accept(tcp, T, choose).map_err(|e| e.to_string())?;
            let mut b = [0u8; 5];
            s.read_exact(&mut b)
                .map_err(|e| describe_io(&e, "client"))?;
            assert_eq!(&b, b"ping!");
            s.write_all(b"pong!").map_err(|e| e.to_string())?;
            s.conn.send_close_notify();
            let _ = s.conn.complete_io(&mut s.sock);
            Ok(sni)
        });
        (addr, h)
    }

    fn serve(cfg: Arc<ServerConfig>) -> (String, JoinHandle<Result<Option<String>, String>>) {
        serve_with(move |_| Some(cfg))
    }

    /// Handshakes, sends "ping!", expects "pong!". Errors are worded as an operator sees them.
    fn ping(addr: &str, name: &str, cfg: Arc<ClientConfig>) -> Result<(), String> {
        let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let mut s = connect(tcp, name, cfg, T, addr).map_err(|e| e.to_string())?;
        s.write_all(b"ping!").map_err(|e| describe_io(&e, addr))?;
        let mut b = [0u8; 5];
        s.read_exact(&mut b).map_err(|e| describe_io(&e, addr))?;
        assert_eq!(&b, b"pong!");
        Ok(())
    }

    fn server_err(h: JoinHandle<Result<Option<String>, String>>) -> String {
        h.join()
            .expect("server thread")
            .expect_err("server refuses")
    }

    #[test]
    fn a_mutual_tls_control_handshake_succeeds() {
        let pki = Pki::new();
        let (addr, h) = serve(control_server_config(&pki.hosta).expect("server"));
        ping(
            &addr,
            "127.0.0.1",
            control_client_config(&pki.controller).expect("client"),
        )
        .expect("ping");
        assert_eq!(h.join().expect("join"), Ok(None));
        // And by host name.
        let (addr, h) = serve(control_server_config(&pki.hosta).expect("server"));
        ping(
            &addr,
            "hosta",
            control_client_config(&pki.controller).expect("client"),
        )
        .expect("ping");
        assert_eq!(h.join().expect("join"), Ok(Some("hosta".into())));
    }

    #[test]
    fn a_wrong_host_name_names_both_names() {
        let pki = Pki::new();
        let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
        let e = ping(
            &addr,
            "hostb",
            control_client_config(&pki.controller).expect("c"),
        )
        .expect_err("refused");
        assert_eq!(
            e,
            format!("certificate presented by {addr} is not valid for 'hostb' (it names 'hosta', '127.0.0.1')")
        );
        let s = server_err(h);
        assert!(
            s.contains("refused our certificate") && s.contains("BadCertificate"),
            "{s}"
        );
    }

    #[test]
    fn a_daemon_certificate_from_another_ca_is_refused_naming_our_ca_file() {
        let pki = Pki::new();
        let mut o = IssueOptions::new("hosta");
        o.ips = vec!["127.0.0.1".parse().expect("ip")];
        let rogue = pki.other_ca("rogue-daemon", &o);
        let (addr, h) = serve(control_server_config(&rogue).expect("s"));
        let e = ping(
            &addr,
            "hosta",
            control_client_config(&pki.controller).expect("c"),
        )
        .expect_err("refused");
        let ca_file = pki.dir.path().join("c/ca.pem");
        assert_eq!(
            e,
            format!(
                "certificate presented by {addr} is not signed by a CA in {}",
                ca_file.display()
            )
        );
        let s = server_err(h);
        assert!(
            s.starts_with("client 127.0.0.1:") && s.contains("refused our certificate"),
            "{s}"
        );
    }

    #[test]
    fn a_client_certificate_from_another_ca_is_refused_on_both_sides() {
        let pki = Pki::new();
        let rogue = HostCredentials {
            ca: pki.controller.ca.clone(),
            ..pki.other_ca("rogue-client", &IssueOptions::new("controller"))
        };
        let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
        let e =
            ping(&addr, "hosta", control_client_config(&rogue).expect("c")).expect_err("refused");
        assert_eq!(
            e,
            format!("{addr} refused our certificate: it does not trust the CA that signed it (alert: UnknownCA)")
        );
        let s = server_err(h);
        assert!(
            s.starts_with("client 127.0.0.1:")
                && s.ends_with("presented a certificate not signed by our CA"),
            "{s}"
        );
    }

    #[test]
    fn an_expired_daemon_certificate_says_when_it_expired() {
        let pki = Pki::new();
        let mut o = IssueOptions::new("hosta");
        o.not_before = utc(2020, 1);
        o.not_after = utc(2021, 1);
        let old = issue(pki.dir.path(), "ca", "old", &o);
        let (addr, h) = serve(control_server_config(&old).expect("s"));
        let e = ping(
            &addr,
            "hosta",
            control_client_config(&pki.controller).expect("c"),
        )
        .expect_err("refused");
        assert_eq!(
            e,
            format!("certificate presented by {addr} expired at 2021-01-01T00:00:00Z")
        );
        let s = server_err(h);
        assert!(
            s.contains("expired") && s.contains("CertificateExpired"),
            "{s}"
        );
    }

    #[test]
    fn an_expired_client_certificate_is_refused_by_the_daemon() {
        let pki = Pki::new();
        let mut o = IssueOptions::new("controller");
        o.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
        o.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let old = issue(pki.dir.path(), "ca", "old-client", &o);
        let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
        let e = ping(&addr, "hosta", control_client_config(&old).expect("c")).expect_err("refused");
        assert!(
            e.contains("expired") && e.contains("CertificateExpired"),
            "{e}"
        );
        let s = server_err(h);
        assert!(
            s.starts_with("certificate presented by client 127.0.0.1:") && s.contains("expired at"),
            "{s}"
        );
    }

    #[test]
    fn a_daemon_certificate_not_yet_valid_says_from_when() {
        let pki = Pki::new();
        let mut o = IssueOptions::new("hosta");
        o.not_before = utc(2999, 1);
        o.not_after = utc(3000, 1);
        let early = issue(pki.dir.path(), "ca", "early", &o);
        let (addr, _h) = serve(control_server_config(&early).expect("s"));
        let e = ping(
            &addr,
            "hosta",
            control_client_config(&pki.controller).expect("c"),
        )
        .expect_err("refused");
        assert!(
            e.starts_with(&format!(
                "certificate presented by {addr} is not valid before 2999-01-01T00:00:00Z"
            )),
            "{e}"
        );
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let pki = Pki::new();
        let mut roots = rustls::RootCertStore::empty();
        for c in &pki.controller.ca {
            roots.add(c.clone()).expect("root");
        }
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
        let e = ping(&addr, "hosta", Arc::new(anonymous)).expect_err("refused");
        assert!(e.contains("CertificateRequired"), "{e}");
        let s = server_err(h);
        assert!(
            s.starts_with("client 127.0.0.1:") && s.ends_with("presented no certificate"),
            "{s}"
        );
    }

    #[test]
    fn a_tls12_only_client_is_refused_by_the_daemon() {
        let pki = Pki::new();
        let mut roots = rustls::RootCertStore::empty();
        for c in &pki.controller.ca {
            roots.add(c.clone()).expect("root");
        }
        // The stock provider: ours lists TLS 1.3 suites only.
        let stock = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let old = ClientConfig::builder_with_provider(stock)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("tls12")
            .with_root_certificates(roots)
            .with_client_auth_cert(pki.controller.chain.clone(), pki.controller.key.clone_key())
            .expect("client cert");
        let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
        let e = ping(&addr, "hosta", Arc::new(old)).expect_err("refused");
        assert!(e.contains("no TLS parameters in common"), "{e}");
        let s = server_err(h);
        assert!(s.contains("TLS 1.3"), "{s}");
    }

    #[test]
    fn pinned_identities_accept_each_other_both_ways() {
        let s = EphemeralIdentity::generate("source").expect("s");
        let d = EphemeralIdentity::generate("destination").expect("d");
        let (addr, h) = serve(pinned_server_config(&d, s.fingerprint()).expect("cfg"));
        ping(
            &addr,
            PINNED_SERVER_NAME,
            pinned_client_config(&s, d.fingerprint()).expect("c"),
        )
        .expect("ping");
        h.join().expect("join").expect("server");
        // The reverse transport: the destination dials the source.
        let (addr, h) = serve(pinned_server_config(&s, d.fingerprint()).expect("cfg"));
        ping(
            &addr,
            &data_sni("0123abcd"),
            pinned_client_config(&d, s.fingerprint()).expect("c"),
        )
        .expect("ping");
        h.join().expect("join").expect("server");
    }

    #[test]
    fn a_source_refuses_a_destination_that_is_not_the_pinned_one() {
        let s = EphemeralIdentity::generate("source").expect("s");
        let d = EphemeralIdentity::generate("destination").expect("d");
        let rogue = EphemeralIdentity::generate("destination").expect("r");
        let (addr, h) = serve(pinned_server_config(&rogue, s.fingerprint()).expect("cfg"));
        let e = ping(
            &addr,
            PINNED_SERVER_NAME,
            pinned_client_config(&s, d.fingerprint()).expect("c"),
        )
        .expect_err("rogue destination");
        assert_eq!(
            e,
            format!(
                "{addr} does not present the certificate pinned for this migration (got {}, expected {})",
                rogue.fingerprint(),
                d.fingerprint()
            )
        );
        let se = server_err(h);
        assert!(se.contains("refused our certificate"), "{se}");
    }

    #[test]
    fn a_destination_refuses_a_source_that_is_not_the_pinned_one() {
        let s = EphemeralIdentity::generate("source").expect("s");
        let d = EphemeralIdentity::generate("destination").expect("d");
        let rogue = EphemeralIdentity::generate("source").expect("r");
        let (addr, h) = serve(pinned_server_config(&d, s.fingerprint()).expect("cfg"));
        let e = ping(
            &addr,
            PINNED_SERVER_NAME,
            pinned_client_config(&rogue, d.fingerprint()).expect("c"),
        )
        .expect_err("rogue source");
        assert!(
            e.contains("refused our certificate") && e.contains("pinned"),
            "{e}"
        );
        let se = server_err(h);
        assert!(
            se.starts_with("client 127.0.0.1:")
                && se.contains("does not present the certificate pinned for this migration")
                && se.contains(&rogue.fingerprint().to_string()),
            "{se}"
        );
    }

    #[test]
    fn a_pinned_peer_must_hold_the_private_key() {
        // The rogue presents the pinned certificate but signs with its own key.
        let s = EphemeralIdentity::generate("source").expect("s");
        let d = EphemeralIdentity::generate("destination").expect("d");
        let rogue = EphemeralIdentity::generate("rogue").expect("r");
        let p = provider();
        let key = p
            .key_provider
            .load_private_key(rogue.key())
            .expect("rogue key");
        let stolen = Arc::new(rustls::sign::CertifiedKey::new(vec![d.cert().clone()], key));
        let mut cfg = ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_client_cert_verifier(Arc::new(Pinned {
                expected: s.fingerprint(),
                provider: p,
            }))
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(stolen)));
        cfg.send_tls13_tickets = 0;
        let (addr, _h) = serve(Arc::new(cfg));
        let e = ping(
            &addr,
            PINNED_SERVER_NAME,
            pinned_client_config(&s, d.fingerprint()).expect("c"),
        )
        .expect_err("impostor");
        assert!(e.contains(&addr) && e.contains("signature"), "{e}");
    }

    #[test]
    fn accept_routes_each_server_name_to_its_own_config() {
        let s = EphemeralIdentity::generate("source").expect("s");
        let d1 = EphemeralIdentity::generate("d1").expect("d1");
        let d2 = EphemeralIdentity::generate("d2").expect("d2");
        let route = {
            let c1 = pinned_server_config(&d1, s.fingerprint()).expect("c1");
            let c2 = pinned_server_config(&d2, s.fingerprint()).expect("c2");
            move |sni: Option<&str>| match sni.and_then(migration_id_from_sni) {
                Some("aaaa0001") => Some(c1),
                Some("aaaa0002") => Some(c2),
                _ => None,
            }
        };
        for (id, d) in [("aaaa0001", &d1), ("aaaa0002", &d2)] {
            let (addr, h) = serve_with(route.clone());
            // Pinned to this migration's destination: the other config would be refused.
            ping(
                &addr,
                &data_sni(id),
                pinned_client_config(&s, d.fingerprint()).expect("c"),
            )
            .expect("routed");
            assert_eq!(h.join().expect("join"), Ok(Some(data_sni(id))));
        }
    }

    #[test]
    fn accept_refuses_an_unknown_server_name_with_an_unrecognized_name_alert() {
        let s = EphemeralIdentity::generate("source").expect("s");
        let d = EphemeralIdentity::generate("d").expect("d");
        let (addr, h) = serve_with(|_| None);
        let e = ping(
            &addr,
            &data_sni("ffff0000"),
            pinned_client_config(&s, d.fingerprint()).expect("c"),
        )
        .expect_err("refused");
        assert!(
            e.contains("does not serve the name we asked for") && e.contains("UnrecognisedName"),
            "{e}"
        );
        let se = server_err(h);
        assert!(
            se.contains("'m-ffff0000.data.vmferry.invalid', which this daemon does not serve"),
            "{se}"
        );
    }

    #[test]
    fn garbage_instead_of_a_client_hello_is_refused_cleanly() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = std::thread::spawn(move || {
            let (tcp, _) = l.accept().expect("accept");
            accept(tcp, T, |_| panic!("no config is asked for garbage")).map(|_| ())
        });
        let mut c = TcpStream::connect(addr).expect("c");
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("w");
        let e = h.join().expect("no panic").expect_err("refused");
        let s = e.to_string();
        assert!(
            matches!(e, TlsError::Refused { .. })
                && s.starts_with("refused client 127.0.0.1:")
                && s.contains("did not open a TLS handshake"),
            "{s}"
        );
    }

    #[test]
    fn a_silent_client_times_out_within_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let _c = TcpStream::connect(addr).expect("c");
        let (tcp, _) = l.accept().expect("accept");
        let t = Instant::now();
        let e = accept(tcp, Duration::from_millis(300), |_| None)
            .map(|_| ())
            .expect_err("timeout");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            e.to_string()
                .starts_with("TLS handshake with client 127.0.0.1:")
                && e.to_string().ends_with("timed out after 300 ms"),
            "{e}"
        );
    }

    #[test]
    fn a_silent_server_times_out_within_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr: SocketAddr = l.local_addr().expect("addr");
        let tcp = TcpStream::connect(addr).expect("c");
        let _server_side = l.accept().expect("accept");
        let s = EphemeralIdentity::generate("s").expect("s");
        let t = Instant::now();
        let e = connect(
            tcp,
            PINNED_SERVER_NAME,
            pinned_client_config(&s, s.fingerprint()).expect("c"),
            Duration::from_millis(300),
            &addr.to_string(),
        )
        .map(|_| ())
        .expect_err("timeout");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(
            e.to_string(),
            format!("TLS handshake with {addr} timed out after 300 ms")
        );
    }

    #[test]
    fn data_server_names_round_trip() {
        assert_eq!(data_sni("abcd1234"), "m-abcd1234.data.vmferry.invalid");
        assert_eq!(
            migration_id_from_sni(&data_sni("abcd1234")),
            Some("abcd1234")
        );
        for other in [
            "hosta",
            PINNED_SERVER_NAME,
            "m-.data.vmferry.invalid",
            "m-a.b.data.vmferry.invalid",
            "x-abcd.data.vmferry.invalid",
        ] {
            assert_eq!(migration_id_from_sni(other), None, "{other}");
        }
        // A real id fits a DNS label, so a client can send it.
        let id = "0123456789abcdef0123456789abcdef";
        assert!(ServerName::try_from(data_sni(id)).is_ok());
    }
}
