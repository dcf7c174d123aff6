//! Who a control client is, and what it may do.
//!
//! Three schemes, as the config lists them: `x509` (a client certificate from the
//! operator's CA, its subject matched against `allowed_clients` / `readonly_clients`),
//! `scram-sha-256` (a password for an account in the users file, which holds only
//! salted verifiers), and, on the local socket only, the kernel's peer credentials
//! (`allowed_uids`/`_gids`, `readonly_uids`/`_gids`). Each identity gets a role:
//! operators may do everything, read-only clients only what changes nothing.
//!
//! This module decides; it never does I/O on a connection, and it never stores or logs
//! a password.

use crate::config::DaemonConfig;
use base64::Engine;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use vmferry_channel::dn::{self, DnPattern};

pub const X509: &str = "x509";
pub const SCRAM: &str = "scram-sha-256";
pub const UNIX: &str = "unix";

/// Why a policy or a users file could not be built, or why a client is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth: unknown scheme '{0}' (expected {X509} or {SCRAM})")]
    UnknownScheme(String),
    #[error("auth: list at least one scheme ({X509}, {SCRAM})")]
    NoScheme,
    #[error("{key}: {source}")]
    Pattern {
        key: &'static str,
        #[source]
        source: dn::DnError,
    },
    #[error("auth lists {SCRAM}, but no scram_users file is configured (make one with `vmferry users add`)")]
    NoUsersFile,
    #[error(transparent)]
    Subject(#[from] dn::DnError),
    #[error(
        "this daemon does not accept certificates for control (auth = {0:?}); \
         log in with a password (--user)"
    )]
    CertificatesNotAccepted(Vec<String>),
    #[error(
        "certificate subject '{0}' is not in this daemon's allowed_clients or readonly_clients"
    )]
    SubjectNotAllowed(String),
    #[error("this daemon requires a client certificate from its CA")]
    NoClientCertificate,
    #[error(
        "uid {uid} (gid {gid}) is not allowed on this daemon's control socket \
         (allowed_uids, allowed_gids, readonly_uids, readonly_gids)"
    )]
    UidNotAllowed { uid: u32, gid: u32 },
    #[error("cannot read users file {}: {source}", path.display())]
    ReadUsers {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("users file {}: {source}", path.display())]
    ParseUsers {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("users file {}: user '{name}': {source}", path.display())]
    BadUser {
        path: PathBuf,
        name: String,
        #[source]
        source: VerifierError,
    },
    #[error("user name '{0}': use letters, digits and - _ . @ only")]
    BadUserName(String),
    #[error("the password must have at least 12 characters")]
    ShortPassword,
    #[error("the system random generator failed")]
    Random,
    #[error("bad iteration count")]
    IterationCount,
    #[error(transparent)]
    SerializeUsers(#[from] toml::ser::Error),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a stored SCRAM verifier is unusable.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("salt is not base64: {0}")]
    Salt(#[source] base64::DecodeError),
    #[error("salted_password is not base64: {0}")]
    SaltedPassword(#[source] base64::DecodeError),
    #[error("salted_password must be 32 bytes (SHA-256)")]
    SaltedPasswordLength,
    #[error("iterations {0} outside 4096..=65535")]
    Iterations(u32),
}

/// What an authenticated client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Status and lists only.
    ReadOnly,
    /// Everything: migrate, cancel, start and stop VMs.
    #[default]
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Operator => "operator",
        }
    }
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `CN=controller,O=ops`, `user migrator`, `uid 1000`.
    pub name: String,
    pub scheme: &'static str,
    pub role: Role,
}

impl Identity {
    pub fn describe(&self) -> String {
        format!("{} ({}, {})", self.name, self.scheme, self.role.as_str())
    }
}

/// The rules of one daemon, built from its config (and rebuilt on SIGHUP).
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    /// Schemes accepted on TCP, in order of preference.
    pub schemes: Vec<String>,
    allowed_clients: Vec<DnPattern>,
    readonly_clients: Vec<DnPattern>,
    allowed_uids: Vec<u32>,
    readonly_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    readonly_gids: Vec<u32>,
    users: ScramUsers,
    own_uid: u32,
}

impl AuthPolicy {
    pub fn from_config(c: &DaemonConfig) -> Result<AuthPolicy, AuthError> {
        let mut schemes = Vec::new();
        for s in &c.auth {
            match s.as_str() {
                X509 | SCRAM => {
                    if !schemes.contains(s) {
                        schemes.push(s.clone())
                    }
                }
                other => return Err(AuthError::UnknownScheme(other.to_string())),
            }
        }
        if schemes.is_empty() {
            return Err(AuthError::NoScheme);
        }
        let parse = |v: &[String], key: &'static str| {
            v.iter()
                .map(|p| DnPattern::parse(p).map_err(|source| AuthError::Pattern { key, source }))
                .collect::<Result<Vec<_>, _>>()
        };
        parse(&c.allowed_peers, "allowed_peers")?;
        let users = match &c.scram_users {
            Some(p) => ScramUsers::load(p)?,
            None => ScramUsers::default(),
        };
        if schemes.iter().any(|s| s == SCRAM) && c.scram_users.is_none() {
            return Err(AuthError::NoUsersFile);
        }
        Ok(AuthPolicy {
            schemes,
            allowed_clients: parse(&c.allowed_clients, "allowed_clients")?,
            readonly_clients: parse(&c.readonly_clients, "readonly_clients")?,
            allowed_uids: c.allowed_uids.clone(),
            readonly_uids: c.readonly_uids.clone(),
            allowed_gids: c.allowed_gids.clone(),
            readonly_gids: c.readonly_gids.clone(),
            users,
            own_uid: nix::unistd::geteuid().as_raw(),
        })
    }

    pub fn accepts(&self, scheme: &str) -> bool {
        self.schemes.iter().any(|s| s == scheme)
    }

    /// Whether TLS must demand a client certificate (no password scheme to fall back on).
    pub fn requires_client_cert(&self) -> bool {
        !self.accepts(SCRAM)
    }

    /// A client that presented a CA-verified certificate.
    pub fn x509(&self, cert: &CertificateDer<'_>) -> Result<Identity, AuthError> {
        let rdns = dn::subject_rdns(cert)?;
        let name = dn::format_rdns(&rdns);
        if !self.accepts(X509) {
            return Err(AuthError::CertificatesNotAccepted(self.schemes.clone()));
        }
        let open = self.allowed_clients.is_empty() && self.readonly_clients.is_empty();
        let role = if open || self.allowed_clients.iter().any(|p| p.matches(&rdns)) {
            Role::Operator
        } else if self.readonly_clients.iter().any(|p| p.matches(&rdns)) {
            Role::ReadOnly
        } else {
            return Err(AuthError::SubjectNotAllowed(name));
        };
        Ok(Identity {
            name,
            scheme: X509,
            role,
        })
    }

    /// A client on the local socket, by its kernel-reported credentials.
    pub fn unix(&self, uid: u32, gid: u32) -> Result<Identity, AuthError> {
        let name = format!("uid {uid}");
        let role = if uid == 0
            || uid == self.own_uid
            || self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
        {
            Role::Operator
        } else if self.readonly_uids.contains(&uid) || self.readonly_gids.contains(&gid) {
            Role::ReadOnly
        } else {
            return Err(AuthError::UidNotAllowed { uid, gid });
        };
        Ok(Identity {
            name,
            scheme: UNIX,
            role,
        })
    }

    pub fn users(&self) -> &ScramUsers {
        &self.users
    }
}

/// One account of the users file: a salted SCRAM verifier, never the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScramUser {
    pub role: Role,
    pub iterations: u32,
    /// Base64.
    pub salt: String,
    /// Base64 of PBKDF2-HMAC-SHA-256(password, salt, iterations).
    pub salted_password: String,
}

/// The users file: `[users.NAME]` tables of [`ScramUser`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScramUsers {
    #[serde(default)]
    pub users: BTreeMap<String, ScramUser>,
}

/// PBKDF2 rounds for new verifiers (SCRAM carries the count as 16 bits in this crate).
pub const SCRAM_ITERATIONS: u32 = 16_384;

impl ScramUsers {
    pub fn load(path: &Path) -> Result<ScramUsers, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::ReadUsers {
            path: path.to_path_buf(),
            source,
        })?;
        let u: ScramUsers = toml::from_str(&text).map_err(|source| AuthError::ParseUsers {
            path: path.to_path_buf(),
            source,
        })?;
        for (name, user) in &u.users {
            user.verifier().map_err(|source| AuthError::BadUser {
                path: path.to_path_buf(),
                name: name.clone(),
                source,
            })?;
        }
        Ok(u)
    }

    /// Adds or replaces `name` with a fresh salt; writes the file with mode 0600.
    pub fn add(path: &Path, name: &str, password: &str, role: Role) -> Result<(), AuthError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(AuthError::BadUserName(name.to_string()));
        }
        if password.len() < 12 {
            return Err(AuthError::ShortPassword);
        }
        let mut u = if path.exists() {
            ScramUsers::load(path)?
        } else {
            ScramUsers::default()
        };
        let mut salt = [0u8; 16];
        aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| AuthError::Random)?;
        let iters = NonZeroU32::new(SCRAM_ITERATIONS).ok_or(AuthError::IterationCount)?;
        let salted = scram_2::hash_password(password, iters, &salt);
        let b64 = base64::engine::general_purpose::STANDARD;
        u.users.insert(
            name.to_string(),
            ScramUser {
                role,
                iterations: SCRAM_ITERATIONS,
                salt: b64.encode(salt),
                salted_password: b64.encode(salted),
            },
        );
        let text = toml::to_string(&u)?;
        write_private(path, &text)
    }

    pub fn role_of(&self, name: &str) -> Option<Role> {
        self.users.get(name).map(|u| u.role)
    }
}

impl ScramUser {
    fn verifier(&self) -> Result<scram_2::server::PasswordInfo, VerifierError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b64.decode(&self.salt).map_err(VerifierError::Salt)?;
        let salted = b64
            .decode(&self.salted_password)
            .map_err(VerifierError::SaltedPassword)?;
        if salted.len() != 32 {
            return Err(VerifierError::SaltedPasswordLength);
        }
        let iterations = u16::try_from(self.iterations)
            .ok()
            .filter(|i| *i >= 4096)
            .ok_or(VerifierError::Iterations(self.iterations))?;
        Ok(scram_2::server::PasswordInfo::new(salted, iterations, salt))
    }
}

impl scram_2::AuthenticationProvider for ScramUsers {
    fn get_password_for(&self, username: &str) -> Option<scram_2::server::PasswordInfo> {
        self.users.get(username)?.verifier().ok()
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| AuthError::Write {
            path: tmp.clone(),
            source,
        })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| AuthError::Write {
            path: tmp.clone(),
            source,
        })?;
    std::fs::rename(&tmp, path).map_err(|source| AuthError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DaemonConfig {
        DaemonConfig::new("/s".into())
    }

    #[test]
    fn unknown_schemes_and_scram_without_users_are_refused() {
        let mut c = config();
        c.auth = vec!["kerberos".into()];
        assert!(AuthPolicy::from_config(&c)
            .unwrap_err()
            .to_string()
            .contains("kerberos"));
        c.auth = vec![SCRAM.into()];
        assert!(AuthPolicy::from_config(&c)
            .unwrap_err()
            .to_string()
            .contains("scram_users"));
    }

    #[test]
    fn unix_credentials_map_to_roles() {
        let mut c = config();
        c.allowed_uids = vec![1000];
        c.readonly_uids = vec![1001];
        c.readonly_gids = vec![50];
        let p = AuthPolicy::from_config(&c).unwrap();
        assert_eq!(p.unix(0, 0).unwrap().role, Role::Operator);
        assert_eq!(p.unix(1000, 1000).unwrap().role, Role::Operator);
        assert_eq!(p.unix(1001, 1001).unwrap().role, Role::ReadOnly);
        assert_eq!(p.unix(4242, 50).unwrap().role, Role::ReadOnly);
        let e = p.unix(4242, 4242).unwrap_err().to_string();
        assert!(e.contains("uid 4242") && e.contains("allowed_uids"), "{e}");
    }

    #[test]
    fn a_users_file_keeps_only_salted_verifiers_that_scram_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users.toml");
        ScramUsers::add(&f, "migrator", "correct horse battery", Role::Operator).unwrap();
        ScramUsers::add(&f, "watcher", "another long password", Role::ReadOnly).unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("correct horse"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let users = ScramUsers::load(&f).unwrap();
        assert_eq!(users.role_of("watcher"), Some(Role::ReadOnly));
        // A full SCRAM exchange against the stored verifier.
        let server = scram_2::ScramServer::new(users.clone());
        for (password, ok) in [("correct horse battery", true), ("wrong password!!", false)] {
            let client = scram_2::ScramClient::new("migrator", password, None);
            let (client, first) = client.client_first();
            let sf = server.handle_client_first(&first).unwrap();
            let (cf, server_first) = sf.server_first();
            let client = client.handle_server_first(&server_first).unwrap();
            let (client, client_final) = client.client_final();
            let sfin = cf.handle_client_final(&client_final).unwrap();
            let (status, server_final) = sfin.server_final();
            assert_eq!(
                status == scram_2::AuthenticationStatus::Authenticated,
                ok,
                "{password}"
            );
            assert_eq!(client.handle_server_final(&server_final).is_ok(), ok);
        }
        assert!(ScramUsers::add(&f, "x", "short", Role::Operator)
            .unwrap_err()
            .to_string()
            .contains("12 characters"));
    }
}
