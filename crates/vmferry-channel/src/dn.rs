//! Distinguished-name patterns for allow-lists: `CN=controller,O=ops`, `CN=*.mig.example`.
//!
//! A pattern matches a certificate subject when both name the same set of attributes and
//! each value matches; `*` in a pattern value stands for any run of characters. Attribute
//! names compare case-insensitively, values exactly. Order does not matter. This module
//! only compares names: it never decides whether a certificate is trusted (webpki does).

use rustls::pki_types::CertificateDer;

/// One `ATTR=value` pair of a subject or pattern.
pub type Rdn = (String, String);

/// Why a pattern or a certificate's subject could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DnError {
    #[error("'{pattern}': '{piece}' is not ATTR=value")]
    NotAttrValue { pattern: String, piece: String },
    #[error("'{pattern}': '{attr}' is not an attribute name like CN or O")]
    BadAttr { pattern: String, attr: String },
    #[error("'{pattern}' names no attribute (expected e.g. CN=controller,O=ops)")]
    Empty { pattern: String },
    #[error("unparsable certificate: {0}")]
    Unparsable(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("subject attribute {attr} is not a string")]
    NotString { attr: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnPattern {
    text: String,
    parts: Vec<Rdn>,
}

impl DnPattern {
    pub fn parse(s: &str) -> Result<DnPattern, DnError> {
        let mut parts = Vec::new();
        for piece in s.split(',') {
            let piece = piece.trim();
            if piece.is_empty() {
                continue;
            }
            let (k, v) = piece.split_once('=').ok_or_else(|| DnError::NotAttrValue {
                pattern: s.to_string(),
                piece: piece.to_string(),
            })?;
            let k = k.trim();
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(DnError::BadAttr {
                    pattern: s.to_string(),
                    attr: k.to_string(),
                });
            }
            parts.push((k.to_ascii_uppercase(), v.trim().to_string()));
        }
        if parts.is_empty() {
            return Err(DnError::Empty {
                pattern: s.to_string(),
            });
        }
        Ok(DnPattern {
            text: s.to_string(),
            parts,
        })
    }

    pub fn matches(&self, subject: &[Rdn]) -> bool {
        if subject.len() != self.parts.len() {
            return false;
        }
        let mut used = vec![false; subject.len()];
        self.parts.iter().all(|(k, pat)| {
            let hit = subject
                .iter()
                .enumerate()
                .position(|(i, (sk, sv))| !used[i] && sk.eq_ignore_ascii_case(k) && glob(pat, sv));
            match hit {
                Some(i) => {
                    used[i] = true;
                    true
                }
                None => false,
            }
        })
    }
}

impl std::fmt::Display for DnPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The subject of a certificate as `ATTR=value` pairs (e.g. `("CN", "controller")`).
pub fn subject_rdns(cert: &CertificateDer<'_>) -> Result<Vec<Rdn>, DnError> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(DnError::Unparsable)?;
    let reg = x509_parser::objects::oid_registry();
    let mut out = Vec::new();
    for atv in c.subject().iter_attributes() {
        let key = x509_parser::objects::oid2abbrev(atv.attr_type(), reg)
            .map(|s| s.to_ascii_uppercase())
            .unwrap_or_else(|_| atv.attr_type().to_id_string());
        let val = atv
            .as_str()
            .map_err(|_| DnError::NotString { attr: key.clone() })?;
        out.push((key, val.to_string()));
    }
    Ok(out)
}

/// `CN=controller,O=ops` for logs and errors.
pub fn format_rdns(rdns: &[Rdn]) -> String {
    rdns.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `*` matches any run of characters (including none); everything else literally.
fn glob(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|i| tail.is_char_boundary(*i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rdns(v: &[(&str, &str)]) -> Vec<Rdn> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn patterns_match_whole_subjects_in_any_order_with_wildcards() {
        let p = DnPattern::parse("CN=controller, O=ops").unwrap();
        assert!(p.matches(&rdns(&[("O", "ops"), ("CN", "controller")])));
        assert!(!p.matches(&rdns(&[("CN", "controller")])));
        assert!(!p.matches(&rdns(&[("CN", "controller"), ("O", "dev")])));
        assert!(!p.matches(&rdns(&[("CN", "controller"), ("O", "ops"), ("C", "DE")])));
        let w = DnPattern::parse("cn=*.mig.example").unwrap();
        assert!(w.matches(&rdns(&[("CN", "a.mig.example")])));
        assert!(!w.matches(&rdns(&[("CN", "a.mig.example.evil")])));
        assert!(!w.matches(&rdns(&[("CN", "mig.example")])));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        assert!(DnPattern::parse("")
            .unwrap_err()
            .to_string()
            .contains("no attribute"));
        assert!(DnPattern::parse("controller")
            .unwrap_err()
            .to_string()
            .contains("ATTR=value"));
        assert!(DnPattern::parse("C N=x")
            .unwrap_err()
            .to_string()
            .contains("attribute name"));
    }
}
