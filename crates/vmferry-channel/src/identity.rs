//! Per-migration ephemeral identities, pinned by fingerprint.
//!
//! Each daemon makes a fresh key pair for each migration; only the certificate's SHA-256
//! fingerprint leaves the process (in the cookie). The private key must never be written
//! to disk or sent anywhere.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::fmt;
use std::str::FromStr;

/// SHA-256 of a certificate's DER encoding.
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
    #[error("fingerprint {0:?} is not 'sha256:' followed by 64 hex digits")]
    BadFingerprint(String),
    #[error("cannot generate a key pair: {0}")]
    Generate(String),
}

impl FromStr for Fingerprint {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadFingerprint(s.chars().take(80).collect());
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

pub fn fingerprint_of(cert: &CertificateDer<'_>) -> Fingerprint {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Fingerprint(out)
}

/// A self-signed certificate and its key, made for one migration.
pub struct EphemeralIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
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
    pub fn generate(label: &str) -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let mut params =
            rcgen::CertificateParams::new(vec![crate::tls::PINNED_SERVER_NAME.to_string()])
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
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            fingerprint,
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
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
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn two_identities_never_share_a_fingerprint() {
        let a = EphemeralIdentity::generate("a").expect("a");
        let b = EphemeralIdentity::generate("a").expect("b");
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
