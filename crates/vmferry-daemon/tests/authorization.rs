//! Who may talk to a daemon, and what they may do: allowed-DN lists, read-only clients,
//! SCRAM password accounts, certificate reload, and the audit log. Real TLS over real
//! sockets on 127.0.0.1, a daemon running in-process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmferry_channel::certs::{self, HostCredentials, IssueOptions, KeyUse};
use vmferry_daemon::auth::{Role, ScramUsers};
use vmferry_daemon::client::{ClientAuth, ClientError, ControlClient, Login};
use vmferry_daemon::{ControlTarget, DaemonConfig, Server};
use vmferry_proto::{MigrationId, MigrationOptions, RequestBody, ResponseBody, VmRef};

struct Daemon {
    addr: String,
    root: PathBuf,
    daemon: Arc<vmferry_daemon::state::Daemon>,
    _tmp: tempfile::TempDir,
}

/// How long a request may take: a deadline against hangs, not a speed check (a busy
/// 2-core machine running debug builds may be seconds late).
const T: Duration = Duration::from_secs(20);

/// A daemon for "hosta" / 127.0.0.1 with `tweak` applied to its config; users
/// "migrator" (operator) and "watcher" (read-only) exist in its users file.
fn daemon(tweak: impl FnOnce(&mut DaemonConfig)) -> Daemon {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    certs::init_ca(&root.join("ca"), "test CA").expect("ca");
    let mut o = IssueOptions::new("hosta");
    o.ips = vec!["127.0.0.1".parse().expect("ip")];
    certs::issue_host(&root.join("ca"), &root.join("hosta"), &o).expect("issue");
    let users = root.join("users.toml");
    ScramUsers::add(
        &users,
        "migrator",
        "a long operator password",
        Role::Operator,
    )
    .expect("u");
    ScramUsers::add(&users, "watcher", "a long watcher password", Role::ReadOnly).expect("u");
    let mut cfg = DaemonConfig::new(root.join("state"));
    cfg.listen = Some("127.0.0.1:0".into());
    cfg.certs = Some(root.join("hosta"));
    cfg.scram_users = Some(users);
    tweak(&mut cfg);
    let server = Server::bind(cfg).expect("bind");
    let addr = server.local_addr().expect("addr").to_string();
    let daemon = server.daemon();
    std::thread::spawn(move || server.run());
    Daemon {
        addr,
        root,
        daemon,
        _tmp: tmp,
    }
}

fn client(d: &Daemon, cn: &str, org: Option<&str>) -> HostCredentials {
    let mut o = IssueOptions::new(cn);
    o.organization = org.map(String::from);
    let out = d.root.join(format!("client-{cn}"));
    certs::issue_host(&d.root.join("ca"), &out, &o).expect("issue client");
    HostCredentials::load(&out).expect("load")
}

fn connect(d: &Daemon, auth: &ClientAuth) -> Result<ControlClient, ClientError> {
    ControlClient::connect_with(&ControlTarget::Tcp(d.addr.clone()), auth, None)
}

fn with_cert(creds: HostCredentials) -> ClientAuth {
    ClientAuth {
        creds: Some(creds),
        ..Default::default()
    }
}

fn with_password(d: &Daemon, user: &str, password: &str) -> ClientAuth {
    ClientAuth {
        creds: None,
        ca_dir: Some(d.root.join("hosta")),
        login: Some(Login {
            user: user.into(),
            password: password.into(),
        }),
    }
}

fn begin() -> RequestBody {
    RequestBody::Begin {
        migration: MigrationId::from_random([7; 16]),
        vm: VmRef::Attached {
            qmp: "/nonexistent/qmp.sock".into(),
        },
        options: MigrationOptions::default(),
    }
}

fn audit(d: &Daemon) -> String {
    std::fs::read_to_string(d.root.join("state/audit.log")).unwrap_or_default()
}

/// The audit log once it contains `needle` (the daemon may write just after answering).
fn audit_with(d: &Daemon, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = audit(d);
        if log.contains(needle) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn only_subjects_on_the_allow_lists_get_in_each_with_its_role() {
    let d = daemon(|c| {
        c.allowed_clients = vec!["CN=controller,O=ops".into(), "CN=*.mig.example".into()];
        c.readonly_clients = vec!["CN=monitor".into()];
    });
    // An operator by exact DN and one by wildcard.
    for (cn, org) in [("controller", Some("ops")), ("node7.mig.example", None)] {
        let mut c = connect(&d, &with_cert(client(&d, cn, org))).expect(cn);
        assert!(c.identity.as_deref().unwrap_or("").contains("operator"));
        c.call(RequestBody::VmList, T).expect("list");
    }
    // Same CN, wrong O: refused, naming the subject.
    let e = connect(&d, &with_cert(client(&d, "controller", Some("dev"))))
        .expect_err("O=dev must be refused")
        .to_string();
    assert!(
        e.contains("CN=controller") && e.contains("O=dev") && e.contains("allowed_clients"),
        "{e}"
    );
    // Read-only: may list, may not begin a migration.
    let mut m = connect(&d, &with_cert(client(&d, "monitor", None))).expect("monitor");
    m.call(RequestBody::VmList, T)
        .expect("a read-only client may list");
    // ... and may ask what the host has room for (`vmferry drain` places guests by it).
    match m
        .call(RequestBody::HostInfo, T)
        .expect("a read-only client may ask")
    {
        ResponseBody::Host { host } => {
            assert!(host.mem_available > 0, "{host:?}");
            assert_eq!((host.vms, host.vms_memory), (0, 0), "{host:?}");
        }
        other => panic!("unexpected answer {other:?}"),
    }
    let e = m.call(begin(), T).expect_err("must be refused").to_string();
    assert!(e.contains("may only read") && e.contains("begin"), "{e}");
    let log = audit_with(&d, r#""op":"begin""#);
    assert!(
        log.contains(r#""outcome":"refused""#) && log.contains("O=dev"),
        "{log}"
    );
    assert!(log.contains(r#""op":"begin""#), "{log}");
}

#[test]
fn password_accounts_log_in_by_scram_and_wrong_ones_are_refused() {
    let d = daemon(|c| c.auth = vec!["x509".into(), "scram-sha-256".into()]);
    let mut c = connect(
        &d,
        &with_password(&d, "migrator", "a long operator password"),
    )
    .expect("the right password logs in");
    assert!(
        c.identity
            .as_deref()
            .unwrap_or("")
            .contains("user migrator"),
        "{:?}",
        c.identity
    );
    c.call(RequestBody::Ping, T).expect("ping");
    for (user, pw) in [
        ("migrator", "not the password!"),
        ("nobody", "a long operator password"),
    ] {
        let e = connect(&d, &with_password(&d, user, pw))
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains("authentication failed"), "{user}: {e}");
    }
    // A read-only account cannot change anything.
    let mut w = connect(&d, &with_password(&d, "watcher", "a long watcher password"))
        .expect("watcher logs in");
    let e = w.call(begin(), T).expect_err("refused").to_string();
    assert!(e.contains("user watcher may only read"), "{e}");
    // No certificate and no login: told what to give.
    let none = ClientAuth {
        ca_dir: Some(d.root.join("hosta")),
        ..Default::default()
    };
    let e = connect(&d, &none).expect_err("refused").to_string();
    assert!(e.contains("--user"), "{e}");
    // Certificates still work next to passwords.
    connect(&d, &with_cert(client(&d, "controller", None)))
        .expect("a certificate still gets in")
        .call(RequestBody::Ping, T)
        .expect("ping");
    let log = audit_with(&d, "wrong password");
    assert!(log.contains("user migrator"), "{log}");
    assert!(log.contains("wrong password"), "{log}");
}

#[test]
fn a_daemon_that_requires_passwords_does_not_take_a_certificate_instead() {
    let d = daemon(|c| c.auth = vec!["scram-sha-256".into()]);
    let e = connect(&d, &with_cert(client(&d, "controller", None)))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("does not accept certificates"), "{e}");
}

#[test]
fn a_client_certificate_that_is_not_yet_valid_is_refused() {
    let d = daemon(|_| {});
    let mut o = IssueOptions::new("controller");
    o.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    o.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let out = d.root.join("future");
    certs::issue_host(&d.root.join("ca"), &out, &o).expect("issue");
    let e = connect(&d, &with_cert(HostCredentials::load(&out).expect("load")))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("not yet valid"), "{e}");
    // The daemon's audit log has the exact reason.
    let log = audit_with(&d, "is not valid before");
    assert!(log.contains("is not valid before"), "{log}");
}

#[test]
fn reloaded_certificates_serve_new_connections_and_old_sessions_go_on() {
    let d = daemon(|_| {});
    let ctl = client(&d, "controller", None);
    let mut old = connect(&d, &with_cert(ctl.clone())).expect("connect");
    // Re-issue the host certificate under another name; before the reload the daemon
    // still presents the old one.
    let mut o = IssueOptions::new("hosta-renewed");
    o.ips = vec!["127.0.0.1".parse().expect("ip")];
    certs::issue_host(&d.root.join("ca"), &d.root.join("hosta"), &o).expect("reissue");
    let target = ControlTarget::Tcp(d.addr.clone());
    let auth = with_cert(ctl);
    let e = ControlClient::connect_with(&target, &auth, Some("hosta-renewed"))
        .expect_err("not reloaded yet")
        .to_string();
    assert!(e.contains("hosta-renewed"), "{e}");
    d.daemon.reload().expect("reload");
    ControlClient::connect_with(&target, &auth, Some("hosta-renewed"))
        .expect("new connections get the new certificate");
    old.call(RequestBody::Ping, T)
        .expect("a session opened before the reload goes on");
}

#[test]
fn a_broken_certificate_on_reload_keeps_the_old_ones() {
    let d = daemon(|_| {});
    std::fs::write(d.root.join("hosta/cert.pem"), "not a certificate").expect("write");
    let e = d.daemon.reload().expect_err("must fail").to_string();
    assert!(e.contains("cert.pem"), "{e}");
    let mut c = connect(&d, &with_cert(client(&d, "controller", None))).expect("still served");
    assert!(matches!(
        c.call(RequestBody::Ping, T).expect("ping"),
        ResponseBody::Pong { .. }
    ));
}

#[test]
fn certificates_are_only_taken_for_the_use_their_key_usage_allows() {
    // A server-only certificate presented by a client is refused.
    let d = daemon(|_| {});
    let mut o = IssueOptions::new("controller");
    o.usage = KeyUse::ServerOnly;
    let out = d.root.join("server-only");
    certs::issue_host(&d.root.join("ca"), &out, &o).expect("issue");
    let e = connect(&d, &with_cert(HostCredentials::load(&out).expect("load")))
        .expect_err("a server-only certificate cannot log in")
        .to_string();
    assert!(e.contains("refused our certificate"), "{e}");
    let log = audit_with(&d, "refused");
    assert!(log.to_lowercase().contains("usage"), "{log}");

    // A daemon presenting a client-only certificate is refused by the client.
    let d2 = daemon(|_| {});
    let mut o = IssueOptions::new("hosta");
    o.ips = vec!["127.0.0.1".parse().expect("ip")];
    o.usage = KeyUse::ClientOnly;
    certs::issue_host(&d2.root.join("ca"), &d2.root.join("hosta"), &o).expect("reissue");
    d2.daemon.reload().expect("reload");
    let e = connect(&d2, &with_cert(client(&d2, "controller", None)))
        .expect_err("a client-only certificate cannot serve")
        .to_string();
    assert!(e.to_lowercase().contains("usage"), "{e}");
}
