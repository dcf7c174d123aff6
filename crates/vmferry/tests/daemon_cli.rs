//! The daemon as operators run it: password accounts made with `vmferry users add` and
//! used with `--user`, certificates reloaded on SIGHUP, and the audit log.

mod common;

use anyhow::Result;
use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};
use vmferry_testkit::ports::free_port;
use vmferry_testkit::require;

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

/// Runs `vmferry ARGS` as another uid and gid (no supplementary groups).
fn as_user(uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new("setpriv");
    c.args([
        "--reuid",
        &uid.to_string(),
        "--regid",
        &gid.to_string(),
        "--clear-groups",
        BIN,
    ])
    .args(args);
    run(c)
}

#[test]
fn the_local_socket_gives_groups_their_roles() -> Result<()> {
    // Switching to other uids and gids takes root.
    require::root();
    require::command("setpriv");
    let tmp = tempfile::tempdir()?;
    // Others may reach the socket, so that the daemon's own check is what decides.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711))?;
    let pki = Pki::new(tmp.path())?;
    let host = pki.issue("localhost", Some("127.0.0.1"))?;
    let state = tmp.path().join("state");
    let config = tmp.path().join("vmferry.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nallowed_gids = [4250]\nreadonly_gids = [4243]\n",
            state.display()
        ),
    )?;
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = config.display().to_string();
    let _d = DaemonProc::start(None, &addr, &state, &host, &["--config", &cfg])?;
    let sock = state.join("control.sock").display().to_string();
    // A read-only group: may list, may not stop a VM.
    let o = as_user(4242, 4243, &["vm", "list", "--daemon", &sock]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_user(4242, 4243, &["vm", "stop", "x", "--daemon", &sock]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("uid 4242 may only read"), "{}", text(&o));
    // An operator group gets past authorization (the VM does not exist).
    let o = as_user(4242, 4250, &["vm", "stop", "x", "--daemon", &sock]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("may only read") && !err.contains("not allowed"),
        "{}",
        text(&o)
    );
    // Neither: refused, naming the uid and its group.
    let o = as_user(4244, 4245, &["vm", "list", "--daemon", &sock]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("uid 4244 (gid 4245) is not allowed"),
        "{}",
        text(&o)
    );
    Ok(())
}
