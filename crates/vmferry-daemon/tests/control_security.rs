//! The control API refuses what it must, with a clear error, and keeps serving: real TLS
//! over real sockets on 127.0.0.1, a daemon running in-process.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmferry_channel::certs::{self, HostCredentials, IssueOptions};
use vmferry_channel::framed::FrameError;
use vmferry_daemon::client::{ClientError, ControlClient};
use vmferry_daemon::{ControlTarget, DaemonConfig, Server};
use vmferry_proto::{RequestBody, ResponseBody, PROTOCOL_VERSION};

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

/// A TLS session to the daemon with a good client certificate, nothing sent yet; reads
/// time out after 5 s.
fn tls_session(d: &Daemon) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let creds = good_client(d);
    let cfg = vmferry_channel::tls::control_client_config(&creds).expect("cfg");
    let tcp = TcpStream::connect(&d.addr).expect("tcp");
    let s = vmferry_channel::tls::connect(tcp, "127.0.0.1", cfg, Duration::from_secs(5), &d.addr)
        .expect("handshake");
    let _ = s.sock.set_read_timeout(Some(Duration::from_secs(5)));
    s
}

/// Announces a frame of u32::MAX bytes and sends nothing more: the daemon must answer
/// with the refusal of that length — which `framed::read_frame` checks before it makes
/// any buffer — within 5 s (a reader that allocated and waited for the body would time
/// out instead, 10 s later, with another error), and close the session.
fn announce_four_gigabytes<S: Read + Write>(s: &mut S) -> String {
    s.write_all(&u32::MAX.to_be_bytes()).expect("write");
    s.flush().expect("flush");
    let reply = vmferry_channel::framed::read_frame(s, 1 << 20)
        .expect("an answer within 5 s, not a wait for the body")
        .expect("an error reply, not a bare close");
    let v: serde_json::Value = serde_json::from_slice(&reply).expect("json");
    assert_eq!(v["reply"], "error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
    // The length check comes before any buffer is made (framed::read_frame).
    assert!(
        msg.contains("announced a 4294967295-byte frame") && msg.contains("limit is 1048576"),
        "{v}"
    );
    // Closed, not left open: a read of a session left open would time out after 5 s.
    let after = vmferry_channel::framed::read_frame(s, 1 << 20);
    assert!(
        matches!(
            after,
            Ok(None) | Err(FrameError::Truncated | FrameError::Io(_))
        ),
        "the session must end after the refusal: {after:?}"
    );
    msg
}

#[test]
fn a_frame_announcing_four_gigabytes_is_refused_before_allocating_and_the_session_closed() {
    let d = daemon();
    // In place of the hello.
    let mut s = tls_session(&d);
    let msg = announce_four_gigabytes(&mut s);
    assert!(msg.contains("hello"), "{msg}");
    // In place of a request, after a good hello.
    let mut s = tls_session(&d);
    vmferry_channel::framed::write_json(
        &mut s,
        &vmferry_proto::Hello::client("test client".into()),
    )
    .expect("hello");
    let hello: serde_json::Value = vmferry_channel::framed::read_json(&mut s, 1 << 20)
        .expect("the daemon's hello")
        .expect("not EOF");
    assert!(hello.get("reply").is_none(), "{hello}");
    let msg = announce_four_gigabytes(&mut s);
    assert!(msg.contains("bad control message"), "{msg}");
    still_serving(&d);
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
    // Both versions, as numbers of their own (whatever the sentence around them).
    let numbers: Vec<&str> = msg
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .collect();
    assert!(
        numbers.contains(&PROTOCOL_VERSION.to_string().as_str()) && numbers.contains(&"99"),
        "{v}"
    );
    still_serving(&d);
}

/// How a trickling client ended.
struct Trickled {
    /// When the daemon closed the connection; `None` if it was still open after 40 s.
    closed_after: Option<Duration>,
    /// Everything the daemon sent (raw: TLS records, or plaintext frames over TLS).
    received: Vec<u8>,
}

/// Sends `bytes` one per second, reading between bytes, until the daemon closes the
/// connection (end of stream, or an error that is not a read timeout) or 40 s have passed.
/// The caller sets a read timeout of about a second on the socket: it paces the bytes.
fn trickle<S: Read + Write>(s: &mut S, bytes: &[u8]) -> Trickled {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    for b in bytes.iter().cycle() {
        if started.elapsed() > Duration::from_secs(40) {
            return Trickled {
                closed_after: None,
                received,
            };
        }
        if s.write_all(&[*b]).and_then(|_| s.flush()).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Trickled {
        closed_after: Some(started.elapsed()),
        received,
    }
}

#[test]
fn clients_that_send_one_byte_a_second_are_dropped_and_others_are_served() {
    let d = daemon();
    // One trickles its TLS handshake, one a valid hello after a good handshake. Neither
    // would finish before the daemon's 10 s deadlines (handshake, hello): the garbage
    // record announces 512 bytes, the hello is longer than ten.
    let raw = {
        let addr = d.addr.clone();
        std::thread::spawn(move || {
            let mut tcp = TcpStream::connect(&addr).expect("tcp");
            tcp.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            trickle(&mut tcp, b"\x16\x03\x01\x02\x00garbage-client-hello")
        })
    };
    let mut s = tls_session(&d);
    s.sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut hello = Vec::new();
    vmferry_channel::framed::write_json(
        &mut hello,
        &vmferry_proto::Hello::client("slow client".into()),
    )
    .expect("frame");
    assert!(hello.len() > 20, "{} bytes", hello.len());
    let tls_side = std::thread::spawn(move || trickle(&mut s, &hello));
    // Meanwhile, everyone else is served.
    std::thread::sleep(Duration::from_secs(2));
    still_serving(&d);
    let raw = raw.join().expect("join");
    let tls = tls_side.join().expect("join");
    // Both were cut off by the daemon, not by the 40 s this test waits at most (four
    // times the deadline: room for a loaded machine, and far less than a client that
    // is never dropped would get).
    assert!(
        raw.closed_after.is_some(),
        "a client trickling its TLS handshake was kept 40 s"
    );
    assert!(
        tls.closed_after.is_some(),
        "a client trickling its hello was kept 40 s"
    );
    eprintln!(
        "cut off after {:?} (trickling the handshake) and {:?} (the hello)",
        raw.closed_after, tls.closed_after
    );
    // The one past the handshake was told why: its hello did not arrive in time.
    assert!(tls.received.len() > 4, "no reply: {:?}", tls.received);
    let reply: serde_json::Value =
        serde_json::from_slice(&tls.received[4..]).expect("one JSON reply frame");
    assert_eq!(reply["reply"], "error", "{reply}");
    let msg = reply["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("hello") && msg.contains("timed out"),
        "{reply}"
    );
    still_serving(&d);
}
