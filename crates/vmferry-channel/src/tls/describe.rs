//! How TLS failures read for an operator: rustls errors, alerts and certificate
//! problems turned into sentences that name the peer and say what to check, and a
//! certificate's subject as text.
//!
//! Only words live here: this module must never decide whether anything is accepted
//! (that is [`verify`](super::verify)'s job) and never lose the cause (an error it does
//! not know is quoted, not dropped).

use super::verify::{NotSignedByCa, PinMismatch};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError};

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
pub(super) enum Side {
    Client,
    Server,
    /// Unknown (a post-handshake error reported by a caller).
    Either,
}

impl Side {
    pub(super) fn who(self, addr: &str) -> String {
        match self {
            Side::Server => format!("client {addr}"),
            Side::Client | Side::Either => addr.to_string(),
        }
    }

    pub(super) fn closed_hint(self) -> &'static str {
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

/// Words a rustls error for an operator; `who` names the peer as the messages need it
/// ("10.0.0.2:4700" or "client 10.0.0.2:51234").
pub(super) fn describe_as(e: &rustls::Error, who: &str, side: Side) -> String {
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
