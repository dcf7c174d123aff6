//! A CA and host certificates in one command, and loading a host's credentials.
//!
//! A certs dir holds `ca.pem` (the CA certificate), `cert.pem` and `key.pem` (this host's
//! identity, used both as TLS server and as TLS client certificate), and, in the CA's own
//! dir only, `ca-key.pem`.
//!
//! What this module must never do: overwrite an existing CA (every certificate it signed
//! would silently stop being trusted), leave a private key readable by anyone but its
//! owner (keys are written to a fresh 0600 file and renamed into place), or hand out
//! credentials whose key does not belong to their certificate (`load` checks, so the
//! failure names a file instead of surfacing later as a baffling handshake error).

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "{path} already exists: refusing to overwrite a CA (every certificate it signed would \
         stop being trusted); remove it first if you really mean to start a new CA"
    )]
    Exists { path: PathBuf },
    #[error("{path} does not exist: {hint}")]
    Missing { path: PathBuf, hint: String },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot issue a certificate for '{host}': {reason}")]
    Options { host: String, reason: String },
    #[error("cannot make the certificate: {0}")]
    Generate(String),
}

/// How long a CA made by [`init_ca`] is valid.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a host certificate is valid by default (the longest period browsers accept,
/// and a common ceiling in operators' policies).
const HOST_VALIDITY_DAYS: i64 = 825;

/// Creates a CA in `dir` (`ca.pem`, and `ca-key.pem` with mode 0600), making `dir` if
/// needed. Refuses if `dir` already holds a CA certificate or key.
pub fn init_ca(dir: &Path, common_name: &str) -> Result<(), CertError> {
    for existing in [dir.join("ca.pem"), dir.join("ca-key.pem")] {
        if existing.exists() {
            return Err(CertError::Exists { path: existing });
        }
    }
    create_dir(dir)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = p.self_signed(&key).map_err(gen)?;
    // Key first: a ca.pem without its key is a CA nobody can use, and `init_ca` would
    // refuse to run again over it.
    write_new(
        &dir.join("ca-key.pem"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join("ca.pem"), cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// What a host certificate says.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// The host's name: the subject CN and the first DNS name (or IP address) it carries.
    pub host: String,
    /// IP addresses the certificate is also valid for.
    pub ips: Vec<IpAddr>,
    /// Further DNS names the certificate is also valid for.
    pub extra_dns: Vec<String>,
    /// `O=` in the subject (useful for allowed-DN lists).
    pub organization: Option<String>,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
    /// What the certificate may authenticate: a host needs both (it serves and it dials).
    pub usage: KeyUse,
}

/// The extended key usages of a host certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyUse {
    #[default]
    ServerAndClient,
    ServerOnly,
    ClientOnly,
}

impl IssueOptions {
    /// Valid from an hour ago (for clocks slightly behind) for 825 days.
    pub fn new(host: &str) -> Self {
        let now = time::OffsetDateTime::now_utc();
        IssueOptions {
            host: host.to_string(),
            ips: Vec::new(),
            extra_dns: Vec::new(),
            organization: None,
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(HOST_VALIDITY_DAYS),
            usage: KeyUse::ServerAndClient,
        }
    }
}

/// Issues a host certificate signed by the CA in `ca_dir` into `out_dir` (`cert.pem`,
/// `key.pem` with mode 0600, and a copy of `ca.pem` unless `out_dir` is `ca_dir`).
/// Re-issuing into a dir replaces its certificate and key together.
pub fn issue_host(ca_dir: &Path, out_dir: &Path, opts: &IssueOptions) -> Result<(), CertError> {
    let bad_opts = |reason: String| CertError::Options {
        host: opts.host.clone(),
        reason,
    };
    if opts.not_after <= opts.not_before {
        return Err(bad_opts(format!(
            "it would expire ({}) before it becomes valid ({})",
            opts.not_after, opts.not_before
        )));
    }
    let hint = format!("run `vmferry certs init --dir {}` first", ca_dir.display());
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca-key.pem");
    let ca_pem = read_text(&ca_pem_path, &hint)?;
    let ca_key_pem = read_text(
        &ca_key_path,
        &format!(
            "issue certificates in the CA's own dir (the one `vmferry certs init` made); \
             {} has ca.pem but not the CA's key",
            ca_dir.display()
        ),
    )?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).map_err(|e| CertError::Bad {
        path: ca_key_path.clone(),
        reason: format!("not a private key vmferry can use ({e})"),
    })?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| CertError::Bad {
        path: ca_pem_path.clone(),
        reason: pem_reason(&e, "certificate"),
    })?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(ca_der.as_ref()).map_err(|e| CertError::Bad {
            path: ca_pem_path.clone(),
            reason: format!("not a readable X.509 certificate ({e})"),
        })?;
    if parsed.public_key().raw != ca_key.public_key_der().as_slice() {
        return Err(CertError::Bad {
            path: ca_key_path,
            reason: format!("this key does not belong to {}", ca_pem_path.display()),
        });
    }
    let ca_params =
        rcgen::CertificateParams::from_ca_cert_der(&ca_der).map_err(|e| CertError::Bad {
            path: ca_pem_path.clone(),
            reason: format!("not a CA certificate vmferry can sign with ({e})"),
        })?;
    // Only the issuer's name and key identifier are taken from this re-signed copy.
    let ca = ca_params.self_signed(&ca_key).map_err(gen)?;

    let mut names = vec![opts.host.clone()];
    names.extend(opts.extra_dns.iter().cloned());
    let mut p = rcgen::CertificateParams::new(names)
        .map_err(|e| bad_opts(format!("not a valid DNS name ({e})")))?;
    for ip in &opts.ips {
        let san = rcgen::SanType::IpAddress(*ip);
        if !p.subject_alt_names.contains(&san) {
            p.subject_alt_names.push(san);
        }
    }
    p.distinguished_name
        .push(rcgen::DnType::CommonName, opts.host.as_str());
    if let Some(org) = &opts.organization {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, org.as_str());
    }
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.extended_key_usages = match opts.usage {
        KeyUse::ServerAndClient => vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
        KeyUse::ServerOnly => vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
        KeyUse::ClientOnly => vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
    };
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.not_before = opts.not_before;
    p.not_after = opts.not_after;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let cert = p.signed_by(&key, &ca, &ca_key).map_err(gen)?;

    create_dir(out_dir)?;
    write_replace(
        &out_dir.join("key.pem"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_replace(&out_dir.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
    if !same_dir(ca_dir, out_dir) {
        write_replace(&out_dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// A host's identity and the CA it trusts, loaded from a certs dir.
#[derive(Debug)]
pub struct HostCredentials {
    /// Where they were loaded from (named in error messages).
    pub dir: PathBuf,
    /// The CA certificates peers must be signed by.
    pub ca: Vec<CertificateDer<'static>>,
    /// This host's certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for HostCredentials {
    fn clone(&self) -> Self {
        HostCredentials {
            dir: self.dir.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Loads only `ca.pem` from `dir`: enough to verify a daemon for a client that
/// authenticates by password (SCRAM) rather than by certificate.
pub fn load_ca(dir: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    load_certs(
        &dir.join("ca.pem"),
        "copy the CA's ca.pem (not its key) into this directory",
    )
}

impl HostCredentials {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`, and checks that the key
    /// belongs to the certificate.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let issue_hint = format!(
            "run `vmferry certs issue --dir CA_DIR --host NAME --out {}`",
            dir.display()
        );
        let ca = load_certs(&dir.join("ca.pem"), &issue_hint)?;
        let cert_path = dir.join("cert.pem");
        let chain = load_certs(&cert_path, &issue_hint)?;
        let key_path = dir.join("key.pem");
        let key_pem = read_bytes(&key_path, &issue_hint)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::Bad {
            path: key_path.clone(),
            reason: pem_reason(&e, "private key"),
        })?;
        warn_if_readable_by_others(&key_path);
        // Only its key loader is used here, which is the same in every aws-lc-rs provider
        // (so certs need not depend on the TLS configurations, which depend on certs).
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |e| match e {
                rustls::Error::InconsistentKeys(_) => CertError::Bad {
                    path: key_path.clone(),
                    reason: format!(
                        "this key does not belong to {} (was one of them replaced without \
                         the other? issue both again)",
                        cert_path.display()
                    ),
                },
                other => CertError::Bad {
                    path: key_path.clone(),
                    reason: format!("not a private key vmferry can use ({other})"),
                },
            },
        )?;
        Ok(HostCredentials {
            dir: dir.to_path_buf(),
            ca,
            chain,
            key,
        })
    }

    /// The common name in this host's certificate subject, if it has one.
    pub fn subject_cn(&self) -> Option<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(self.chain.first()?.as_ref()).ok()?;
        let cn = cert.subject().iter_common_name().next()?;
        cn.as_str().ok().map(str::to_string)
    }
}

fn gen(e: rcgen::Error) -> CertError {
    CertError::Generate(e.to_string())
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|e| CertError::Write {
        path: dir.to_path_buf(),
        source: e,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Writes a file that must not exist yet (a CA), with `mode` from the moment it exists.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let w = |e| CertError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(w)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(w)
}

/// Replaces a file atomically: a fresh temporary file gets `mode` at creation (so a key
/// is never briefly readable, even if the old file had looser permissions), then is
/// renamed over `path`.
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let result = write_new(&tmp, data, mode).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| CertError::Write {
            path: path.to_path_buf(),
            source: e,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn read_bytes(path: &Path, hint: &str) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CertError::Missing {
            path: path.to_path_buf(),
            hint: hint.to_string(),
        },
        _ => CertError::Read {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

fn read_text(path: &Path, hint: &str) -> Result<String, CertError> {
    String::from_utf8(read_bytes(path, hint)?).map_err(|_| CertError::Bad {
        path: path.to_path_buf(),
        reason: "not a PEM file (it is not text)".into(),
    })
}

fn pem_reason(e: &pem::Error, what: &str) -> String {
    match e {
        pem::Error::NoItemsFound => format!("no PEM {what} in file"),
        other => format!("not a valid PEM file ({other})"),
    }
}

fn load_certs(path: &Path, hint: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = read_bytes(path, hint)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Bad {
            path: path.to_path_buf(),
            reason: pem_reason(&e, "certificate"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Bad {
            path: path.to_path_buf(),
            reason: "no PEM certificate in file".into(),
        });
    }
    Ok(certs)
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "private key is readable by other users; run chmod 600 on it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn a_ca_and_a_host_certificate_round_trip_through_files() {
        let d = tempfile::tempdir().expect("tmp");
        let ca = d.path().join("ca");
        init_ca(&ca, "test").expect("ca");
        assert_eq!(mode_of(&ca.join("ca-key.pem")), 0o600);
        let mut o = IssueOptions::new("hosta");
        o.ips = vec!["10.0.0.1".parse().expect("ip")];
        o.organization = Some("Example".into());
        issue_host(&ca, &d.path().join("a"), &o).expect("issue");
        let c = HostCredentials::load(&d.path().join("a")).expect("load");
        assert_eq!(c.chain.len(), 1);
        assert_eq!(c.ca.len(), 1);
        assert_eq!(c.subject_cn().as_deref(), Some("hosta"));
        assert_eq!(mode_of(&d.path().join("a/key.pem")), 0o600);
        assert!(!d.path().join("a/ca-key.pem").exists());
        let (_, x) = x509_parser::parse_x509_certificate(c.chain[0].as_ref()).expect("parse");
        let subject = x.subject().to_string();
        assert!(
            subject.contains("CN=hosta") && subject.contains("O=Example"),
            "{subject}"
        );
    }

    #[test]
    fn issuing_into_the_ca_dir_keeps_its_ca() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(d.path(), "test").expect("ca");
        let before = std::fs::read(d.path().join("ca.pem")).expect("read");
        issue_host(d.path(), d.path(), &IssueOptions::new("hosta")).expect("issue");
        assert_eq!(
            std::fs::read(d.path().join("ca.pem")).expect("read"),
            before
        );
        HostCredentials::load(d.path()).expect("load");
    }

    #[test]
    fn a_reissued_key_is_never_readable_by_others() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(&d.path().join("ca"), "test").expect("ca");
        let out = d.path().join("a");
        issue_host(&d.path().join("ca"), &out, &IssueOptions::new("a")).expect("issue");
        std::fs::set_permissions(out.join("key.pem"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        issue_host(&d.path().join("ca"), &out, &IssueOptions::new("a")).expect("reissue");
        assert_eq!(mode_of(&out.join("key.pem")), 0o600);
    }

    #[test]
    fn an_existing_ca_is_never_overwritten() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(d.path(), "one").expect("ca");
        let before = std::fs::read(d.path().join("ca-key.pem")).expect("read");
        let e = init_ca(d.path(), "two").expect_err("refused");
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
        assert_eq!(
            std::fs::read(d.path().join("ca-key.pem")).expect("read"),
            before
        );
    }

    #[test]
    fn issuing_without_a_ca_says_how_to_make_one() {
        let d = tempfile::tempdir().expect("tmp");
        let e = issue_host(d.path(), d.path(), &IssueOptions::new("a")).expect_err("no ca");
        let s = e.to_string();
        assert!(
            s.contains("ca.pem") && s.contains("vmferry certs init"),
            "{s}"
        );
    }

    #[test]
    fn a_certificate_that_ends_before_it_starts_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(d.path(), "test").expect("ca");
        let mut o = IssueOptions::new("a");
        o.not_after = o.not_before - time::Duration::days(1);
        let e = issue_host(d.path(), d.path(), &o).expect_err("refused");
        assert!(e.to_string().contains("before it becomes valid"), "{e}");
    }

    #[test]
    fn missing_files_are_named_with_a_hint() {
        let d = tempfile::tempdir().expect("tmp");
        let e = HostCredentials::load(d.path()).expect_err("missing");
        let s = e.to_string();
        assert!(
            s.contains("ca.pem") && s.contains("vmferry certs issue"),
            "{s}"
        );
        std::fs::write(d.path().join("ca.pem"), "not pem").expect("w");
        let e = HostCredentials::load(d.path()).expect_err("bad");
        assert!(e.to_string().contains("no PEM certificate in file"), "{e}");
    }

    #[test]
    fn a_missing_key_is_named_with_a_hint() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(d.path(), "test").expect("ca");
        issue_host(d.path(), d.path(), &IssueOptions::new("a")).expect("issue");
        std::fs::remove_file(d.path().join("key.pem")).expect("rm");
        let s = HostCredentials::load(d.path())
            .expect_err("missing")
            .to_string();
        assert!(
            s.contains("key.pem does not exist") && s.contains("vmferry certs issue"),
            "{s}"
        );
        std::fs::write(d.path().join("key.pem"), "").expect("w");
        let s = HostCredentials::load(d.path())
            .expect_err("empty")
            .to_string();
        assert!(s.contains("no PEM private key"), "{s}");
    }

    #[test]
    fn a_key_from_another_certificate_is_refused_on_load() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(d.path(), "test").expect("ca");
        let a = d.path().join("a");
        let b = d.path().join("b");
        issue_host(d.path(), &a, &IssueOptions::new("a")).expect("a");
        issue_host(d.path(), &b, &IssueOptions::new("b")).expect("b");
        std::fs::copy(b.join("key.pem"), a.join("key.pem")).expect("cp");
        let s = HostCredentials::load(&a).expect_err("mismatch").to_string();
        assert!(s.contains("does not belong to"), "{s}");
    }
}
