//! The control API refuses what it must, with a clear error, and keeps serving: real TLS
//! over real sockets on 127.0.0.1, a daemon running in-process.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmferry_channel::certs::{self, HostCredentials, IssueOptions};
use vmferry_channel::testing::rss_kib;
use vmferry_daemon::client::{ClientError, ControlClient};
use vmferry_daemon::{ControlTarget, DaemonConfig, Server};
use vmferry_proto::{RequestBody, ResponseBody};

struct Daemon {
    addr: String,
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

/// A daemon with a certificate for "hosta" / 127.0.0.1, and a CA to issue clients from.
fn daemon() -> Daemon {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    certs::init_ca(&root.join("ca"), "test CA").expect("ca");
    let mut o = IssueOptions::new("hosta");
    o.ips = vec!["127.0.0.1".parse().expect("ip")];
    certs::issue_host(&root.join("ca"), &root.join("hosta"), &o).expect("issue");
    let mut cfg = DaemonConfig::new(root.join("state"));
    cfg.listen = Some("127.0.0.1:0".into());
    cfg.certs = Some(root.join("hosta"));
    let server = Server::bind(cfg).expect("bind");
    let addr = server.local_addr().expect("addr").to_string();
    std::thread::spawn(move || server.run());
    Daemon {
        addr,
        _tmp: tmp,
        root,
    }
}

fn client_certs(ca: &Path, out: &Path, o: IssueOptions) -> HostCredentials {
    certs::issue_host(ca, out, &o).expect("issue client");
    HostCredentials::load(out).expect("load")
}

fn connect(
    d: &Daemon,
    creds: &HostCredentials,
    name: Option<&str>,
) -> Result<ControlClient, ClientError> {
    ControlClient::connect(&ControlTarget::Tcp(d.addr.clone()), Some(creds), name)
}

fn good_client(d: &Daemon) -> HostCredentials {
    client_certs(
        &d.root.join("ca"),
        &d.root.join("ctl"),
        IssueOptions::new("controller"),
    )
}

fn still_serving(d: &Daemon) {
    let mut c = connect(d, &good_client(d), None).expect("a good client still connects");
    let r = c
        .call(RequestBody::Ping, Duration::from_secs(5))
        .expect("ping");
    assert!(matches!(r, ResponseBody::Pong { .. }));
}

#[test]
fn a_client_with_a_good_certificate_is_served() {
    let d = daemon();
    still_serving(&d);
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let d = daemon();
    let other = d.root.join("other-ca");
    certs::init_ca(&other, "rogue CA").expect("ca");
    // The rogue client trusts the real CA for the server, but its own cert is rogue.
    let creds = client_certs(
        &other,
        &d.root.join("rogue"),
        IssueOptions::new("controller"),
    );
    let creds = HostCredentials {
        ca: HostCredentials::load(&d.root.join("hosta"))
            .expect("load")
            .ca,
        ..creds
    };
    let e = connect(&d, &creds, None)
        .expect_err("must be refused")
        .to_string();
    assert!(
        e.contains("refused our client certificate") || e.contains("CA"),
        "{e}"
    );
    still_serving(&d);
}

#[test]
fn a_daemon_certificate_from_an_unknown_ca_is_refused_by_the_client() {
    let d = daemon();
    let other = d.root.join("other-ca2");
    certs::init_ca(&other, "other CA").expect("ca");
    let creds = client_certs(&other, &d.root.join("c2"), IssueOptions::new("controller"));
    let e = connect(&d, &creds, None)
        .expect_err("must be refused")
        .to_string();
    assert!(e.contains("not signed by"), "{e}");
    still_serving(&d);
}

#[test]
fn an_expired_client_certificate_is_refused() {
    let d = daemon();
    let mut o = IssueOptions::new("controller");
    o.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    o.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let creds = client_certs(&d.root.join("ca"), &d.root.join("expired"), o);
    let e = connect(&d, &creds, None)
        .expect_err("must be refused")
        .to_string();
    assert!(
        e.to_lowercase().contains("expired") || e.contains("refused our client certificate"),
        "{e}"
    );
    still_serving(&d);
}

#[test]
fn a_daemon_certificate_for_another_host_name_is_refused_naming_both() {
    let d = daemon();
    let e = connect(&d, &good_client(&d), Some("hostb"))
        .expect_err("must be refused")
        .to_string();
    assert!(e.contains("hostb") && e.contains("hosta"), "{e}");
    still_serving(&d);
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let d = daemon();
    let creds = HostCredentials::load(&d.root.join("hosta")).expect("load");
    let mut roots = rustls::RootCertStore::empty();
    for c in &creds.ca {
        roots.add(c.clone()).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(&d.addr).expect("tcp");
    let r = vmferry_channel::tls::connect(
        tcp,
        "127.0.0.1",
        std::sync::Arc::new(cfg),
        Duration::from_secs(5),
        &d.addr,
    );
    let mut s = match r {
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("certificate"), "{e}");
            still_serving(&d);
            return;
        }
        Ok(s) => s,
    };
    // TLS 1.3: the client may finish its side before the server's refusal arrives.
    let _ = vmferry_channel::framed::write_json(
        &mut s,
        &serde_json::json!({"version": 1, "agent": "x"}),
    );
    let r = vmferry_channel::framed::read_frame(&mut s, 1 << 20);
    assert!(
        r.is_err() || matches!(r, Ok(None)),
        "no-certificate client was served: {r:?}"
    );
    still_serving(&d);
}

#[test]
fn a_garbage_control_message_gets_a_clear_error_and_the_daemon_keeps_serving() {
    let d = daemon();
    let creds = good_client(&d);
    let cfg = vmferry_channel::tls::control_client_config(&creds).expect("cfg");
    let tcp = TcpStream::connect(&d.addr).expect("tcp");
    let mut s =
        vmferry_channel::tls::connect(tcp, "127.0.0.1", cfg, Duration::from_secs(5), &d.addr)
            .expect("handshake");
    let _ = s.sock.set_read_timeout(Some(Duration::from_secs(5)));
    vmferry_channel::framed::write_frame(&mut s, b"\x00\xffnot json at all").expect("write");
    let reply = vmferry_channel::framed::read_frame(&mut s, 1 << 20)
        .expect("a reply")
        .expect("not EOF");
    let v: serde_json::Value = serde_json::from_slice(&reply).expect("json reply");
    assert_eq!(v["reply"], "error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("hello"),
        "{v}"
    );
    still_serving(&d);
}

#[test]
fn a_frame_announcing_four_gigabytes_is_dropped_without_allocating() {
    let d = daemon();
    let before = rss_kib();
    let creds = good_client(&d);
    let cfg = vmferry_channel::tls::control_client_config(&creds).expect("cfg");
    let tcp = TcpStream::connect(&d.addr).expect("tcp");
    let mut s =
        vmferry_channel::tls::connect(tcp, "127.0.0.1", cfg, Duration::from_secs(5), &d.addr)
            .expect("handshake");
    let _ = s.sock.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(&[0xff, 0xff, 0xff, 0xff]).expect("write");
    s.flush().expect("flush");
    let reply = vmferry_channel::framed::read_frame(&mut s, 1 << 20);
    if let Ok(Some(r)) = reply {
        let v: serde_json::Value = serde_json::from_slice(&r).expect("json");
        assert_eq!(v["reply"], "error", "{v}");
    }
    still_serving(&d);
    // The daemon runs in this process: its memory did not follow the announcement.
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
}

#[test]
fn a_client_speaking_another_protocol_version_is_refused_with_both_versions() {
    let d = daemon();
    let creds = good_client(&d);
    let cfg = vmferry_channel::tls::control_client_config(&creds).expect("cfg");
    let tcp = TcpStream::connect(&d.addr).expect("tcp");
    let mut s =
        vmferry_channel::tls::connect(tcp, "127.0.0.1", cfg, Duration::from_secs(5), &d.addr)
            .expect("handshake");
    let _ = s.sock.set_read_timeout(Some(Duration::from_secs(5)));
    vmferry_channel::framed::write_json(
        &mut s,
        &serde_json::json!({"version": 99, "agent": "future"}),
    )
    .expect("write");
    let v: serde_json::Value = vmferry_channel::framed::read_json(&mut s, 1 << 20)
        .expect("reply")
        .expect("not EOF");
    let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("version 1") && msg.contains("99"), "{v}");
    still_serving(&d);
}

/// Sends `bytes` one per second until the peer closes; returns how long that took.
fn trickle<S: std::io::Read + Write>(s: &mut S, bytes: &[u8]) -> Duration {
    let started = std::time::Instant::now();
    for b in bytes.iter().cycle() {
        if s.write_all(&[*b]).and_then(|_| s.flush()).is_err() {
            break;
        }
        if started.elapsed() > Duration::from_secs(40) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    started.elapsed()
}

#[test]
fn clients_that_send_one_byte_a_second_are_dropped_and_others_are_served() {
    let d = daemon();
    // One trickles its TLS handshake, one a valid hello after a good handshake.
    let raw = {
        let addr = d.addr.clone();
        std::thread::spawn(move || {
            let mut tcp = TcpStream::connect(&addr).expect("tcp");
            trickle(&mut tcp, b"\x16\x03\x01\x02\x00garbage-client-hello")
        })
    };
    let creds = good_client(&d);
    let cfg = vmferry_channel::tls::control_client_config(&creds).expect("cfg");
    let tcp = TcpStream::connect(&d.addr).expect("tcp");
    let mut s =
        vmferry_channel::tls::connect(tcp, "127.0.0.1", cfg, Duration::from_secs(5), &d.addr)
            .expect("handshake");
    let mut hello = Vec::new();
    vmferry_channel::framed::write_json(
        &mut hello,
        &vmferry_proto::Hello::client("slow client".into()),
    )
    .expect("frame");
    let tls_side = std::thread::spawn(move || trickle(&mut s, &hello));
    // Meanwhile, everyone else is served, and memory stays flat.
    let before = rss_kib();
    std::thread::sleep(Duration::from_secs(2));
    still_serving(&d);
    for (what, t) in [
        ("handshake", raw.join().expect("join")),
        ("hello", tls_side.join().expect("join")),
    ] {
        assert!(
            t < Duration::from_secs(25),
            "a client trickling its {what} was kept {t:?}"
        );
    }
    still_serving(&d);
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
}
