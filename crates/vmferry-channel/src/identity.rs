//! Per-migration ephemeral identities, pinned by fingerprint.
//!
//! Each daemon makes a fresh key pair for each migration; the controller carries the
//! certificate's SHA-256 fingerprint to the other side in the cookie, and the data
//! connection accepts exactly that certificate (see `tls::pinned_*_config`). Source and
//! destination thus need no CA relationship, and an identity is worthless after its
//! migration.
//!
//! What this module must never do: write the private key to disk, send it anywhere, or
//! print it (the `Debug` of [`EphemeralIdentity`] shows only the fingerprint); and never
//! let two spellings of a fingerprint compare differently — fingerprints are parsed into
//! bytes, never compared as text.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::fmt;
use std::str::FromStr;

/// The server name a pinned client sends, and the DNS name a pinned certificate carries.
/// It is never resolved (`.invalid` is reserved) and never checked: the pin is the identity.
pub const PINNED_SERVER_NAME: &str = "vmferry.invalid";

/// SHA-256 of a certificate's DER encoding; written `sha256:` and 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "'{0}' is not a certificate fingerprint: expected 'sha256:' followed by 64 hex digits"
    )]
    BadFingerprint(String),
    #[error("cannot make this migration's TLS identity: {0}")]
    Generate(String),
}

impl FromStr for Fingerprint {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        // Quote at most a line's worth of what we were given, with control characters escaped.
        let bad = || {
            IdentityError::BadFingerprint(
                s.chars().take(80).flat_map(char::escape_default).collect(),
            )
        };
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// The fingerprint of a certificate as sent on the wire (DER).
pub fn fingerprint_of(cert: &CertificateDer<'_>) -> Fingerprint {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Fingerprint(out)
}

/// A self-signed certificate and its key, made for one migration.
pub struct EphemeralIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for EphemeralIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("EphemeralIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl EphemeralIdentity {
    /// A fresh ECDSA P-256 key and a self-signed certificate for it: subject `CN=label`,
    /// DNS name `vmferry.invalid`, valid from an hour ago (clock skew) for one day.
    pub fn generate(label: &str) -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![PINNED_SERVER_NAME.to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, label);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = cert.der().clone();
        let fingerprint = fingerprint_of(&cert);
        Ok(EphemeralIdentity {
            cert,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            fingerprint,
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A copy of the private key, for building a rustls config (and nothing else).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_through_text() {
        let id = EphemeralIdentity::generate("t").expect("gen");
        let s = id.fingerprint().to_string();
        assert!(s.starts_with("sha256:") && s.len() == 71, "{s}");
        assert_eq!(s.parse::<Fingerprint>().expect("parse"), id.fingerprint());
    }

    #[test]
    fn malformed_fingerprints_are_refused() {
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &format!("sha256:{}", "g".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("sha256:{}", "a".repeat(65)),
            &format!("SHA256:{}", "a".repeat(64)),
            &format!(" sha256:{}", "a".repeat(64)),
            &format!("sha256:{} ", "a".repeat(64)),
            &format!("sha256:+{}", "a".repeat(63)),
            &format!("sha256:{}é", "a".repeat(62)),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parsing_reads_the_hex_digits_in_order() {
        let text = format!("sha256:00ff{}0a0b0c", "a1b2c3".repeat(9));
        let fp: Fingerprint = text.parse().expect("parse");
        assert_eq!(fp.0[0], 0x00);
        assert_eq!(fp.0[1], 0xff);
        assert_eq!(fp.0[2], 0xa1);
        assert_eq!(fp.0[31], 0x0c);
        assert_eq!(fp.to_string(), text);
        let upper: Fingerprint = text
            .to_uppercase()
            .replace("SHA256", "sha256")
            .parse()
            .expect("upper");
        assert_eq!(upper, fp);
    }

    #[test]
    fn a_bad_fingerprint_is_quoted_in_the_error() {
        let e = "sha1:abc".parse::<Fingerprint>().expect_err("bad");
        let s = e.to_string();
        assert!(
            s.contains("'sha1:abc'") && s.contains("64 hex digits"),
            "{s}"
        );
    }

    #[test]
    fn the_fingerprint_is_that_of_the_certificate() {
        let id = EphemeralIdentity::generate("t").expect("gen");
        assert_eq!(fingerprint_of(id.cert()), id.fingerprint());
        let (_, x) = x509_parser::parse_x509_certificate(id.cert().as_ref()).expect("parse");
        assert!(x.subject().to_string().contains("CN=t"));
        assert!(!format!("{id:?}").contains("key"), "{id:?}");
    }

    #[test]
    fn two_identities_never_share_a_fingerprint() {
        let a = EphemeralIdentity::generate("a").expect("a");
        let b = EphemeralIdentity::generate("a").expect("b");
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
