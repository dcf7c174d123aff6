//! The daemon as operators run it: password accounts made with `vmferry users add` and
//! used with `--user`, certificates reloaded on SIGHUP, and the audit log.

mod common;

use anyhow::Result;
use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};
use vmferry_testkit::ports::free_port;

fn wait_for(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn password_accounts_sighup_reload_and_the_audit_log() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::new(tmp.path())?;
    let host = pki.issue("localhost", Some("127.0.0.1"))?;
    let users = tmp.path().join("users.toml");
    let mut add = vmferry()
        .args(["users", "add", "migrator", "--role", "readonly", "--file"])
        .arg(&users)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    add.stdin
        .take()
        .expect("stdin")
        .write_all(b"a long enough password\n")?;
    assert!(add.wait()?.success());
    let addr = format!("127.0.0.1:{}", free_port());
    let state = tmp.path().join("state");
    let users_arg = users.display().to_string();
    let d = DaemonProc::start(
        None,
        &addr,
        &state,
        &host,
        &["--auth", "x509,scram-sha-256", "--scram-users", &users_arg],
    )?;
    // Only the CA's certificate on the client side: the password does the rest.
    let ca_only = tmp.path().join("ca-only");
    std::fs::create_dir_all(&ca_only)?;
    std::fs::copy(host.join("ca.pem"), ca_only.join("ca.pem"))?;
    let list = |password: &str| {
        let mut c = vmferry();
        c.args([
            "vm", "list", "--daemon", &addr, "--user", "migrator", "--certs",
        ])
        .arg(&ca_only)
        .env("VMFERRY_PASSWORD", password);
        run(c)
    };
    let o = list("a long enough password");
    assert!(o.status.success(), "{}", text(&o));
    let o = list("wrong password here");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("authentication failed"),
        "{}",
        text(&o)
    );
    // Read-only: starting a VM is refused.
    let mut c = vmferry();
    c.args([
        "vm", "stop", "x", "--daemon", &addr, "--user", "migrator", "--certs",
    ])
    .arg(&ca_only)
    .env("VMFERRY_PASSWORD", "a long enough password");
    let o = run(c);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("may only read"),
        "{}",
        text(&o)
    );

    // SIGHUP reloads, and the daemon goes on serving.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let log = wait_for(&state.join("audit.log"), r#""op":"reload""#);
    assert!(
        log.contains(r#""op":"reload","outcome":"ok""#),
        "no reload in the audit log: {log}"
    );
    let o = list("a long enough password");
    assert!(o.status.success(), "after SIGHUP: {}", text(&o));
    assert!(log.contains(r#""who":"user migrator""#), "{log}");
    assert!(log.contains(r#""detail":"wrong password""#), "{log}");
    assert!(
        !log.contains("a long enough password"),
        "a password in the log"
    );
    Ok(())
}
