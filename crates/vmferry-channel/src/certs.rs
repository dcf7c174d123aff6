//! A CA and host certificates in one command, and loading a host's credentials.
//!
//! A certs dir holds `ca.pem` (the CA certificate), `cert.pem` and `key.pem` (this host's
//! identity, used both as TLS server and as TLS client certificate), and, in the CA's own
//! dir only, `ca-key.pem`. Private keys are written with mode 0600 and never overwritten
//! silently.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path} already exists; refusing to overwrite a CA")]
    Exists { path: PathBuf },
    #[error("{path} does not exist: {hint}")]
    Missing { path: PathBuf, hint: String },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the certificate: {0}")]
    Generate(String),
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let w = |e| CertError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(w)?;
    f.write_all(data).map_err(w)
}

fn gen(e: rcgen::Error) -> CertError {
    CertError::Generate(e.to_string())
}

/// Creates a CA in `dir` (`ca.pem`, `ca-key.pem`).
pub fn init_ca(dir: &Path, common_name: &str) -> Result<(), CertError> {
    let ca_pem = dir.join("ca.pem");
    if ca_pem.exists() {
        return Err(CertError::Exists { path: ca_pem });
    }
    std::fs::create_dir_all(dir).map_err(|e| CertError::Write {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    let cert = p.self_signed(&key).map_err(gen)?;
    write_file(
        &dir.join("ca-key.pem"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&ca_pem, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// What a host certificate says.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    pub host: String,
    pub ips: Vec<IpAddr>,
    pub extra_dns: Vec<String>,
    pub organization: Option<String>,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

impl IssueOptions {
    /// Valid from an hour ago for 825 days.
    pub fn new(host: &str) -> Self {
        let now = time::OffsetDateTime::now_utc();
        IssueOptions {
            host: host.to_string(),
            ips: Vec::new(),
            extra_dns: Vec::new(),
            organization: None,
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(825),
        }
    }
}

/// Issues a host certificate signed by the CA in `ca_dir` into `out_dir` (`cert.pem`,
/// `key.pem`, and a copy of `ca.pem`).
pub fn issue_host(ca_dir: &Path, out_dir: &Path, o: &IssueOptions) -> Result<(), CertError> {
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca-key.pem");
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|_| CertError::Missing {
            path: p.to_path_buf(),
            hint: format!("run `vmferry certs init --dir {}` first", ca_dir.display()),
        })
    };
    let ca_pem = read(&ca_pem_path)?;
    let ca_key_pem = read(&ca_key_path)?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).map_err(|e| CertError::Bad {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_params =
        rcgen::CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|e| CertError::Bad {
            path: ca_pem_path.clone(),
            reason: e.to_string(),
        })?;
    let ca = ca_params.self_signed(&ca_key).map_err(gen)?;

    let mut names = vec![o.host.clone()];
    names.extend(o.extra_dns.iter().cloned());
    let mut p = rcgen::CertificateParams::new(names).map_err(gen)?;
    for ip in &o.ips {
        p.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
    }
    p.distinguished_name
        .push(rcgen::DnType::CommonName, o.host.as_str());
    if let Some(org) = &o.organization {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, org.as_str());
    }
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.not_before = o.not_before;
    p.not_after = o.not_after;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let cert = p.signed_by(&key, &ca, &ca_key).map_err(gen)?;
    std::fs::create_dir_all(out_dir).map_err(|e| CertError::Write {
        path: out_dir.to_path_buf(),
        source: e,
    })?;
    write_file(
        &out_dir.join("key.pem"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&out_dir.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
    if out_dir.join("ca.pem") != ca_pem_path {
        write_file(&out_dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// A host's identity and the CA it trusts.
#[derive(Debug)]
pub struct HostCredentials {
    pub dir: PathBuf,
    pub ca: Vec<CertificateDer<'static>>,
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

fn load_certs(path: &Path, dir: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    if !path.exists() {
        return Err(CertError::Missing {
            path: path.to_path_buf(),
            hint: format!(
                "make one with `vmferry certs issue --dir CA_DIR --host NAME --out {}`",
                dir.display()
            ),
        });
    }
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| CertError::Bad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .collect();
    let certs = certs.map_err(|e| CertError::Bad {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(CertError::Bad {
            path: path.to_path_buf(),
            reason: "no PEM certificate in file".into(),
        });
    }
    Ok(certs)
}

impl HostCredentials {
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let ca = load_certs(&dir.join("ca.pem"), dir)?;
        let chain = load_certs(&dir.join("cert.pem"), dir)?;
        let key_path = dir.join("key.pem");
        if !key_path.exists() {
            return Err(CertError::Missing {
                path: key_path,
                hint: "the host's private key belongs next to cert.pem".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| CertError::Bad {
            path: key_path.clone(),
            reason: format!("no private key: {e}"),
        })?;
        Ok(HostCredentials {
            dir: dir.to_path_buf(),
            ca,
            chain,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_and_a_host_certificate_round_trip_through_files() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(&d.path().join("ca"), "test").expect("ca");
        let mut o = IssueOptions::new("hosta");
        o.ips = vec!["10.0.0.1".parse().expect("ip")];
        issue_host(&d.path().join("ca"), &d.path().join("a"), &o).expect("issue");
        let c = HostCredentials::load(&d.path().join("a")).expect("load");
        assert_eq!(c.chain.len(), 1);
        assert_eq!(c.ca.len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("a/key.pem"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn an_existing_ca_is_never_overwritten() {
        let d = tempfile::tempdir().expect("tmp");
        init_ca(d.path(), "one").expect("ca");
        let e = init_ca(d.path(), "two").expect_err("refused");
        assert!(e.to_string().contains("refusing"), "{e}");
    }

    #[test]
    fn missing_files_are_named_with_a_hint() {
        let d = tempfile::tempdir().expect("tmp");
        let e = HostCredentials::load(d.path()).expect_err("missing");
        assert!(e.to_string().contains("ca.pem"), "{e}");
        std::fs::write(d.path().join("ca.pem"), "not pem").expect("w");
        let e = HostCredentials::load(d.path()).expect_err("bad");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }
}
