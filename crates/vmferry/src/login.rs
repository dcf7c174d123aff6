//! How the command line logs in to daemons: a client certificate, or a CA to verify
//! daemons plus a password account. Shared by every subcommand that talks to a daemon;
//! it reads files and the environment, and never connects anywhere itself.

use anyhow::{anyhow, Context, Result};
use std::path::PathBuf;
use vmferry_channel::certs::HostCredentials;
use vmferry_daemon::client::Login;
use vmferry_daemon::ClientAuth;

/// How to log in to daemons, from `--certs`, `--user` and the password source.
/// A certs dir with `cert.pem` holds a client certificate; one with only `ca.pem` is
/// for verifying daemons when logging in by password.
pub fn load_auth(
    certs: &Option<PathBuf>,
    user: &Option<String>,
    password_file: &Option<PathBuf>,
) -> Result<ClientAuth> {
    let mut auth = ClientAuth::default();
    if let Some(d) = certs {
        if d.join("cert.pem").exists() || user.is_none() {
            auth.creds = Some(HostCredentials::load(d)?);
        } else {
            auth.ca_dir = Some(d.clone());
        }
    }
    if let Some(user) = user {
        let password = match password_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the password file {}", f.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            None => std::env::var("VMFERRY_PASSWORD").map_err(|_| {
                anyhow!(
                    "--user {user} needs a password: set VMFERRY_PASSWORD or give --password-file"
                )
            })?,
        };
        auth.login = Some(Login {
            user: user.clone(),
            password,
        });
    }
    Ok(auth)
}
