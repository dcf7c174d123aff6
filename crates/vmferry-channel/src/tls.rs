//! The security layer: every rustls configuration vmferry uses, the blocking handshakes
//! with deadlines, and the wording of TLS failures for operators.
//!
//! Three kinds of trust live here and nowhere else:
//! - control connections: mutual TLS with the operator's CA;
//! - pinned data connections: each side accepts exactly the per-migration certificate
//!   whose fingerprint the controller carried in the cookie;
//! - x509 data connections (see `x509_data`).
//!
//! Everything is TLS 1.3 only. Nothing here may accept a certificate "for now" or fall
//! back to an unauthenticated connection.

use crate::certs::HostCredentials;
use crate::identity::{fingerprint_of, EphemeralIdentity, Fingerprint};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{Acceptor, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName,
    ServerConfig, ServerConnection, SignatureScheme, StreamOwned,
};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server name a pinned certificate carries (it is never resolved).
pub const PINNED_SERVER_NAME: &str = "vmferry.invalid";
const DATA_SNI_SUFFIX: &str = ".data.vmferry.invalid";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(String),
    /// A handshake failure, already worded for an operator.
    #[error("{0}")]
    Handshake(String),
    #[error("TLS handshake with {peer} timed out after {secs} s")]
    Timeout { peer: String, secs: u64 },
    #[error("{peer} closed the connection during the TLS handshake (is it a vmferry daemon, and does it accept us?)")]
    Closed { peer: String },
    #[error("connection from {peer} refused: {reason}")]
    Refused { peer: String, reason: String },
    #[error("{peer}: {source}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &HostCredentials) -> Result<rustls::RootCertStore, TlsError> {
    let mut r = rustls::RootCertStore::empty();
    for c in &creds.ca {
        r.add(c.clone()).map_err(|e| {
            TlsError::Config(format!("CA certificate in {}: {e}", creds.dir.display()))
        })?;
    }
    Ok(r)
}

fn cfg_err(creds: &HostCredentials) -> impl Fn(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Config(format!("certificate in {}: {e}", creds.dir.display()))
}

/// Control API, server side: a client certificate signed by our CA is required.
pub fn control_server_config(creds: &HostCredentials) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(creds)?), p.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(cfg_err(creds))?;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Control API, client side: verifies the daemon against our CA, presents our certificate.
pub fn control_client_config(creds: &HostCredentials) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(creds)?)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(cfg_err(creds))?;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
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

/// Accepts exactly one certificate, by fingerprint; still checks the handshake signature
/// so the peer must hold the matching private key.
#[derive(Debug)]
struct Pinned {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
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
        check_pin(end_entity, self.expected).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_pin(end_entity, self.expected).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Data channel, destination side (pinned): requires the source's per-migration certificate.
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
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Data channel, source side (pinned): accepts only the destination's per-migration
/// certificate.
pub fn pinned_client_config(
    me: &EphemeralIdentity,
    peer: Fingerprint,
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let mut cfg = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            expected: peer,
            provider: p,
        }))
        .with_client_auth_cert(vec![me.cert().clone()], me.key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The server name a data connection of migration `id` sends.
pub fn data_sni(migration_id: &str) -> String {
    format!("m-{migration_id}{DATA_SNI_SUFFIX}")
}

/// The migration a data connection's server name names, if it is one.
pub fn migration_id_from_sni(sni: &str) -> Option<&str> {
    sni.strip_prefix("m-")?.strip_suffix(DATA_SNI_SUFFIX)
}

fn io_err(peer: &str, e: std::io::Error, timeout: Duration) -> TlsError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TlsError::Timeout {
            peer: peer.to_string(),
            secs: timeout.as_secs().max(1),
        },
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            TlsError::Closed {
                peer: peer.to_string(),
            }
        }
        ErrorKind::InvalidData => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            Some(r) => TlsError::Handshake(describe(r, peer)),
            None => TlsError::Io {
                peer: peer.to_string(),
                source: e,
            },
        },
        _ => TlsError::Io {
            peer: peer.to_string(),
            source: e,
        },
    }
}

/// Words a rustls error for an operator. `peer` is the other side's address.
pub fn describe(e: &rustls::Error, peer: &str) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => {
                let exp = match expected {
                    ServerName::DnsName(d) => d.as_ref().to_string(),
                    ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
                    other => format!("{other:?}"),
                };
                format!(
                    "certificate presented by {peer} is not valid for '{exp}' (it names {})",
                    presented
                        .iter()
                        .map(|p| format!("'{}'", clean_name(p)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            CertificateError::NotValidForName => {
                format!("certificate presented by {peer} is not valid for the name we expected")
            }
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "certificate presented by {peer} expired at {}",
                fmt_time(*not_after)
            ),
            CertificateError::Expired => format!("certificate presented by {peer} has expired"),
            CertificateError::NotValidYetContext { not_before, .. } => format!(
                "certificate presented by {peer} is not valid before {}",
                fmt_time(*not_before)
            ),
            CertificateError::NotValidYet => {
                format!("certificate presented by {peer} is not valid yet")
            }
            CertificateError::UnknownIssuer => {
                format!("certificate presented by {peer} is not signed by a CA we trust (ca.pem)")
            }
            CertificateError::BadSignature => {
                format!("certificate presented by {peer} has a bad signature")
            }
            CertificateError::Other(o) => format!("{peer} presented a certificate that is {}", o.0),
            other => format!("certificate presented by {peer} was refused: {other:?}"),
        },
        E::NoCertificatesPresented => format!("{peer} presented no certificate"),
        E::AlertReceived(a) => {
            use rustls::AlertDescription as A;
            let what = match a {
                A::CertificateRequired => "it requires a client certificate and we sent none",
                A::UnknownCA => "our certificate is not signed by a CA it trusts",
                A::CertificateExpired => "our certificate has expired",
                A::BadCertificate | A::CertificateUnknown => "it refused our certificate",
                A::AccessDenied => {
                    "it refused our certificate (not the one pinned for this migration?)"
                }
                A::UnrecognisedName => {
                    "it does not know the name we asked for (unknown or expired migration?)"
                }
                A::HandshakeFailure => "no common TLS parameters",
                _ => "",
            };
            if what.is_empty() {
                format!("{peer} ended the TLS handshake with alert {a:?}")
            } else {
                format!("{peer} refused our client certificate or request: {what} (alert {a:?})")
            }
        }
        other => format!("TLS with {peer} failed: {other}"),
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
    let secs = t.as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {secs}"))
}

/// Drives a handshake to completion by `deadline`.
fn finish_handshake<C>(
    conn: &mut C,
    tcp: &mut TcpStream,
    peer: &str,
    timeout: Duration,
) -> Result<(), TlsError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<<C as ConnSide>::Data>> + ConnSide,
{
    let deadline = Instant::now() + timeout;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer: peer.to_string(),
                secs: timeout.as_secs().max(1),
            });
        }
        let _ = tcp.set_read_timeout(Some(left));
        let _ = tcp.set_write_timeout(Some(left));
        match conn.complete_io(tcp) {
            Ok((0, 0)) if conn.is_handshaking() => {
                // complete_io read EOF
                return Err(TlsError::Closed {
                    peer: peer.to_string(),
                });
            }
            Ok(_) => {}
            Err(e) => return Err(io_err(peer, e, timeout)),
        }
    }
    // Flush our last handshake flight (the client's Finished).
    while conn.wants_write() {
        conn.write_tls(tcp).map_err(|e| io_err(peer, e, timeout))?;
    }
    let _ = tcp.set_read_timeout(None);
    let _ = tcp.set_write_timeout(None);
    Ok(())
}

/// Lets `finish_handshake` name the connection's side-specific data type.
pub trait ConnSide {
    type Data;
}
impl ConnSide for ClientConnection {
    type Data = rustls::client::ClientConnectionData;
}
impl ConnSide for ServerConnection {
    type Data = rustls::server::ServerConnectionData;
}

/// Client side of a handshake over a connected TCP stream, completed within `timeout`.
/// `peer` (e.g. "10.0.0.2:4700") is used in error messages.
pub fn connect(
    mut tcp: TcpStream,
    server_name: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
    peer: &str,
) -> Result<StreamOwned<ClientConnection, TcpStream>, TlsError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::Config(format!("{server_name:?} is not a valid TLS server name")))?;
    let mut conn =
        ClientConnection::new(config, name).map_err(|e| TlsError::Config(e.to_string()))?;
    finish_handshake(&mut conn, &mut tcp, peer, timeout)?;
    Ok(StreamOwned::new(conn, tcp))
}

/// Server side of the shared port: reads the ClientHello, asks `choose` which
/// configuration serves that server name (`None` refuses the connection), and completes
/// the handshake within `timeout`. Returns the stream and the server name.
pub fn accept(
    mut tcp: TcpStream,
    timeout: Duration,
    choose: impl FnOnce(Option<&str>) -> Option<Arc<ServerConfig>>,
) -> Result<(StreamOwned<ServerConnection, TcpStream>, Option<String>), TlsError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "peer".into());
    let deadline = Instant::now() + timeout;
    let mut acceptor = Acceptor::default();
    let accepted = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout {
                peer,
                secs: timeout.as_secs().max(1),
            });
        }
        let _ = tcp.set_read_timeout(Some(left));
        match acceptor.read_tls(&mut tcp) {
            Ok(0) => return Err(TlsError::Closed { peer }),
            Ok(_) => {}
            Err(e) => return Err(io_err(&peer, e, timeout)),
        }
        match acceptor.accept() {
            Ok(Some(a)) => break a,
            Ok(None) => {}
            Err((e, mut alert)) => {
                let _ = tcp.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = alert.write_all(&mut tcp);
                return Err(TlsError::Refused {
                    peer,
                    reason: format!("not a valid TLS 1.3 ClientHello ({e})"),
                });
            }
        }
    };
    let sni = accepted.client_hello().server_name().map(str::to_string);
    let Some(config) = choose(sni.as_deref()) else {
        return Err(TlsError::Refused {
            peer,
            reason: format!(
                "it asked for {} which this daemon does not serve (unknown, finished or expired migration?)",
                sni.as_deref().unwrap_or("no server name")
            ),
        });
    };
    let mut conn = match accepted.into_connection(config) {
        Ok(c) => c,
        Err((e, mut alert)) => {
            let _ = alert.write_all(&mut tcp);
            return Err(TlsError::Handshake(describe(&e, &peer)));
        }
    };
    match finish_handshake(
        &mut conn,
        &mut tcp,
        &peer,
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ) {
        Ok(()) => {}
        Err(e) => {
            // Tell the client why, if rustls queued an alert.
            let _ = tcp.set_write_timeout(Some(Duration::from_secs(1)));
            while conn.wants_write() {
                if conn.write_tls(&mut tcp).is_err() {
                    break;
                }
            }
            return Err(e);
        }
    }
    Ok((StreamOwned::new(conn, tcp), sni))
}

/// Words an I/O error from a TLS stream (after the handshake) for an operator.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{init_ca, issue_host, IssueOptions};
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn pki() -> (tempfile::TempDir, HostCredentials, HostCredentials) {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(&d.path().join("ca"), "t").expect("ca");
        let mut o = IssueOptions::new("hosta");
        o.ips = vec!["127.0.0.1".parse().expect("ip")];
        issue_host(&d.path().join("ca"), &d.path().join("a"), &o).expect("a");
        issue_host(
            &d.path().join("ca"),
            &d.path().join("c"),
            &IssueOptions::new("controller"),
        )
        .expect("c");
        let a = HostCredentials::load(&d.path().join("a")).expect("a");
        let c = HostCredentials::load(&d.path().join("c")).expect("c");
        (d, a, c)
    }

    /// Runs a one-connection server with `cfg`; returns its address and its result.
    fn serve_one(
        cfg: Arc<ServerConfig>,
    ) -> (String, std::thread::JoinHandle<Result<Vec<u8>, TlsError>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let h = std::thread::spawn(move || {
            let (tcp, _) = l.accept().expect("accept");
            let (mut s, _) = accept(tcp, Duration::from_secs(3), |_| Some(cfg))?;
            let mut b = [0u8; 5];
            s.read_exact(&mut b)
                .map_err(|e| TlsError::Handshake(describe_io(&e, "client")))?;
            s.write_all(b"pong!")
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            Ok(b.to_vec())
        });
        (addr, h)
    }

    fn client(addr: &str, name: &str, cfg: Arc<ClientConfig>) -> Result<Vec<u8>, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let mut s =
            connect(tcp, name, cfg, Duration::from_secs(3), addr).map_err(|e| e.to_string())?;
        s.write_all(b"ping!").map_err(|e| describe_io(&e, addr))?;
        let mut b = [0u8; 5];
        s.read_exact(&mut b).map_err(|e| describe_io(&e, addr))?;
        Ok(b.to_vec())
    }

    #[test]
    fn mutual_tls_with_one_ca_works() {
        let (_d, a, c) = pki();
        let (addr, h) = serve_one(control_server_config(&a).expect("s"));
        let r = client(&addr, "127.0.0.1", control_client_config(&c).expect("c"));
        assert_eq!(r, Ok(b"pong!".to_vec()));
        assert!(h.join().expect("join").is_ok());
    }

    #[test]
    fn a_wrong_host_name_names_both_names() {
        let (_d, a, c) = pki();
        let (addr, _h) = serve_one(control_server_config(&a).expect("s"));
        let e = client(&addr, "hostb", control_client_config(&c).expect("c")).expect_err("refused");
        assert!(e.contains("'hostb'") && e.contains("'hosta'"), "{e}");
    }

    #[test]
    fn pinned_identities_accept_each_other_and_nothing_else() {
        let s = EphemeralIdentity::generate("s").expect("s");
        let d = EphemeralIdentity::generate("d").expect("d");
        let (addr, h) = serve_one(pinned_server_config(&d, s.fingerprint()).expect("cfg"));
        let r = client(
            &addr,
            PINNED_SERVER_NAME,
            pinned_client_config(&s, d.fingerprint()).expect("c"),
        );
        assert_eq!(r, Ok(b"pong!".to_vec()));
        assert!(h.join().expect("join").is_ok());

        // A rogue source with its own identity is refused by the destination.
        let rogue = EphemeralIdentity::generate("rogue").expect("r");
        let (addr, h) = serve_one(pinned_server_config(&d, s.fingerprint()).expect("cfg"));
        let r = client(
            &addr,
            PINNED_SERVER_NAME,
            pinned_client_config(&rogue, d.fingerprint()).expect("c"),
        );
        assert!(r.is_err(), "rogue source accepted");
        let e = h.join().expect("join").expect_err("server refuses");
        assert!(e.to_string().contains("pinned"), "{e}");

        // A source never talks to a destination with another identity.
        let (addr, _h) = serve_one(pinned_server_config(&rogue, s.fingerprint()).expect("cfg"));
        let e = client(
            &addr,
            PINNED_SERVER_NAME,
            pinned_client_config(&s, d.fingerprint()).expect("c"),
        )
        .expect_err("rogue destination");
        assert!(
            e.contains("pinned") && e.contains(&d.fingerprint().to_string()),
            "{e}"
        );
    }

    #[test]
    fn data_server_names_round_trip() {
        assert_eq!(
            migration_id_from_sni(&data_sni("abcd1234")),
            Some("abcd1234")
        );
        assert_eq!(migration_id_from_sni("hosta"), None);
    }

    #[test]
    fn garbage_instead_of_a_client_hello_is_refused_cleanly() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = std::thread::spawn(move || {
            let (tcp, _) = l.accept().expect("accept");
            accept(tcp, Duration::from_secs(2), |_| None).map(|_| ())
        });
        let mut s = TcpStream::connect(addr).expect("c");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("w");
        let e = h.join().expect("join").expect_err("refused");
        assert!(
            matches!(e, TlsError::Refused { .. } | TlsError::Closed { .. }),
            "{e}"
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
        assert!(matches!(e, TlsError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
