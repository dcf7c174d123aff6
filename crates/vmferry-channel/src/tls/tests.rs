use super::config::provider;
use super::verify::Verifier;
use super::*;
use crate::certs::{init_ca, issue_host, HostCredentials, IssueOptions};
use crate::identity::EphemeralIdentity;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

const T: Duration = Duration::from_secs(5);

/// A CA, a daemon "hosta" (also valid for 127.0.0.1) and a "controller".
struct Pki {
    dir: tempfile::TempDir,
    hosta: HostCredentials,
    controller: HostCredentials,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tmp");
        init_ca(&dir.path().join("ca"), "test CA").expect("ca");
        let mut o = IssueOptions::new("hosta");
        o.ips = vec!["127.0.0.1".parse().expect("ip")];
        let hosta = issue(dir.path(), "ca", "hosta", &o);
        let controller = issue(dir.path(), "ca", "c", &IssueOptions::new("controller"));
        Pki {
            dir,
            hosta,
            controller,
        }
    }

    /// Credentials issued by a second CA ("other"), trusting only that CA.
    fn other_ca(&self, name: &str, o: &IssueOptions) -> HostCredentials {
        let ca = self.dir.path().join("other");
        if !ca.join("ca.pem").exists() {
            init_ca(&ca, "other CA").expect("ca");
        }
        issue(self.dir.path(), "other", name, o)
    }
}

/// Midnight UTC on the first of January of `year` (plus `day - 1` days).
fn utc(year: i32, day: u16) -> time::OffsetDateTime {
    time::Date::from_ordinal_date(year, day)
        .expect("date")
        .midnight()
        .assume_utc()
}

fn issue(root: &Path, ca: &str, name: &str, o: &IssueOptions) -> HostCredentials {
    issue_host(&root.join(ca), &root.join(name), o).expect("issue");
    HostCredentials::load(&root.join(name)).expect("load")
}

/// Accepts one connection with `choose`; on success reads "ping!" and answers "pong!".
fn serve_with(
    choose: impl FnOnce(Option<&str>) -> Option<Arc<ServerConfig>> + Send + 'static,
) -> (String, JoinHandle<Result<Option<String>, String>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let h = std::thread::spawn(move || {
        let (tcp, _) = l.accept().expect("accept");
        let (mut s, sni) = accept(tcp, T, choose).map_err(|e| e.to_string())?;
        let mut b = [0u8; 5];
        s.read_exact(&mut b)
            .map_err(|e| describe_io(&e, "client"))?;
        assert_eq!(&b, b"ping!");
        s.write_all(b"pong!").map_err(|e| e.to_string())?;
        s.conn.send_close_notify();
        let _ = s.conn.complete_io(&mut s.sock);
        Ok(sni)
    });
    (addr, h)
}

fn serve(cfg: Arc<ServerConfig>) -> (String, JoinHandle<Result<Option<String>, String>>) {
    serve_with(move |_| Some(cfg))
}

/// Handshakes, sends "ping!", expects "pong!". Errors are worded as an operator sees them.
fn ping(addr: &str, name: &str, cfg: Arc<ClientConfig>) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let mut s = connect(tcp, name, cfg, T, addr).map_err(|e| e.to_string())?;
    s.write_all(b"ping!").map_err(|e| describe_io(&e, addr))?;
    let mut b = [0u8; 5];
    s.read_exact(&mut b).map_err(|e| describe_io(&e, addr))?;
    assert_eq!(&b, b"pong!");
    Ok(())
}

fn server_err(h: JoinHandle<Result<Option<String>, String>>) -> String {
    h.join()
        .expect("server thread")
        .expect_err("server refuses")
}

#[test]
fn a_mutual_tls_control_handshake_succeeds() {
    let pki = Pki::new();
    let (addr, h) = serve(control_server_config(&pki.hosta).expect("server"));
    ping(
        &addr,
        "127.0.0.1",
        control_client_config(&pki.controller).expect("client"),
    )
    .expect("ping");
    assert_eq!(h.join().expect("join"), Ok(None));
    // And by host name.
    let (addr, h) = serve(control_server_config(&pki.hosta).expect("server"));
    ping(
        &addr,
        "hosta",
        control_client_config(&pki.controller).expect("client"),
    )
    .expect("ping");
    assert_eq!(h.join().expect("join"), Ok(Some("hosta".into())));
}

#[test]
fn a_wrong_host_name_names_both_names() {
    let pki = Pki::new();
    let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
    let e = ping(
        &addr,
        "hostb",
        control_client_config(&pki.controller).expect("c"),
    )
    .expect_err("refused");
    assert_eq!(
        e,
        format!("certificate presented by {addr} is not valid for 'hostb' (it names 'hosta', '127.0.0.1')")
    );
    let s = server_err(h);
    assert!(
        s.contains("refused our certificate") && s.contains("BadCertificate"),
        "{s}"
    );
}

#[test]
fn a_daemon_certificate_from_another_ca_is_refused_naming_our_ca_file() {
    let pki = Pki::new();
    let mut o = IssueOptions::new("hosta");
    o.ips = vec!["127.0.0.1".parse().expect("ip")];
    let rogue = pki.other_ca("rogue-daemon", &o);
    let (addr, h) = serve(control_server_config(&rogue).expect("s"));
    let e = ping(
        &addr,
        "hosta",
        control_client_config(&pki.controller).expect("c"),
    )
    .expect_err("refused");
    let ca_file = pki.dir.path().join("c/ca.pem");
    assert_eq!(
        e,
        format!(
            "certificate presented by {addr} is not signed by a CA in {}",
            ca_file.display()
        )
    );
    let s = server_err(h);
    assert!(
        s.starts_with("client 127.0.0.1:") && s.contains("refused our certificate"),
        "{s}"
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_on_both_sides() {
    let pki = Pki::new();
    let rogue = HostCredentials {
        ca: pki.controller.ca.clone(),
        ..pki.other_ca("rogue-client", &IssueOptions::new("controller"))
    };
    let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
    let e = ping(&addr, "hosta", control_client_config(&rogue).expect("c")).expect_err("refused");
    assert_eq!(
        e,
        format!("{addr} refused our certificate: it does not trust the CA that signed it (alert: UnknownCA)")
    );
    let s = server_err(h);
    assert!(
        s.starts_with("client 127.0.0.1:")
            && s.ends_with("presented a certificate not signed by our CA"),
        "{s}"
    );
}

#[test]
fn an_expired_daemon_certificate_says_when_it_expired() {
    let pki = Pki::new();
    let mut o = IssueOptions::new("hosta");
    o.not_before = utc(2020, 1);
    o.not_after = utc(2021, 1);
    let old = issue(pki.dir.path(), "ca", "old", &o);
    let (addr, h) = serve(control_server_config(&old).expect("s"));
    let e = ping(
        &addr,
        "hosta",
        control_client_config(&pki.controller).expect("c"),
    )
    .expect_err("refused");
    assert_eq!(
        e,
        format!("certificate presented by {addr} expired at 2021-01-01T00:00:00Z")
    );
    let s = server_err(h);
    assert!(
        s.contains("expired") && s.contains("CertificateExpired"),
        "{s}"
    );
}

#[test]
fn an_expired_client_certificate_is_refused_by_the_daemon() {
    let pki = Pki::new();
    let mut o = IssueOptions::new("controller");
    o.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    o.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let old = issue(pki.dir.path(), "ca", "old-client", &o);
    let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
    let e = ping(&addr, "hosta", control_client_config(&old).expect("c")).expect_err("refused");
    assert!(
        e.contains("expired") && e.contains("CertificateExpired"),
        "{e}"
    );
    let s = server_err(h);
    assert!(
        s.starts_with("certificate presented by client 127.0.0.1:") && s.contains("expired at"),
        "{s}"
    );
}

#[test]
fn a_daemon_certificate_not_yet_valid_says_from_when() {
    let pki = Pki::new();
    let mut o = IssueOptions::new("hosta");
    o.not_before = utc(2999, 1);
    o.not_after = utc(3000, 1);
    let early = issue(pki.dir.path(), "ca", "early", &o);
    let (addr, _h) = serve(control_server_config(&early).expect("s"));
    let e = ping(
        &addr,
        "hosta",
        control_client_config(&pki.controller).expect("c"),
    )
    .expect_err("refused");
    assert!(
        e.starts_with(&format!(
            "certificate presented by {addr} is not valid before 2999-01-01T00:00:00Z"
        )),
        "{e}"
    );
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let mut roots = rustls::RootCertStore::empty();
    for c in &pki.controller.ca {
        roots.add(c.clone()).expect("root");
    }
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (addr, h) = serve(control_server_config(&pki.hosta).expect("s"));
    let e = ping(&addr, "hosta", Arc::new(anonymous)).expect_err("refused");
    assert!(e.contains("CertificateRequired"), "{e}");
    let s = server_err(h);
    assert!(
        s.starts_with("client 127.0.0.1:") && s.ends_with("presented no certificate"),
        "{s}"
    );
}

/// A TLS 1.2 ClientHello, as a TLS 1.2-only client sends it: version 1.2, ECDHE-GCM
/// suites, server name `hosta`, signature algorithms and groups; with `supported_versions`
/// naming only TLS 1.2 if `versions_ext` (a client that knows the extension), without it
/// otherwise (one that predates TLS 1.3).
fn tls12_client_hello(versions_ext: bool) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut exts = Vec::new();
    let name = b"hosta";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    ext(&mut exts, 0, &sni);
    // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    ext(&mut exts, 13, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]);
    // secp256r1, x25519
    ext(&mut exts, 10, &[0, 4, 0x00, 0x17, 0x00, 0x1d]);
    ext(&mut exts, 11, &[1, 0]); // ec_point_formats: uncompressed
    if versions_ext {
        ext(&mut exts, 43, &[2, 0x03, 0x03]);
    }
    let mut hello = vec![0x03, 0x03]; // client_version TLS 1.2
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(0); // no session id
                   // ECDHE_ECDSA/RSA_WITH_AES_128_GCM_SHA256
    hello.extend_from_slice(&[0, 4, 0xc0, 0x2b, 0xc0, 0x2f]);
    hello.extend_from_slice(&[1, 0]); // null compression
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut hs = vec![1]; // client_hello
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

#[test]
fn a_tls12_only_client_is_refused_by_the_daemon() {
    let pki = Pki::new();
    for versions_ext in [false, true] {
        let cfg = control_server_config(&pki.hosta).expect("s");
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = std::thread::spawn(move || {
            let (tcp, _) = l.accept().expect("accept");
            accept(tcp, T, |_| Some(cfg)).map(|_| ())
        });
        let mut c = TcpStream::connect(addr).expect("c");
        c.write_all(&tls12_client_hello(versions_ext))
            .expect("hello");
        c.set_read_timeout(Some(T)).expect("timeout");
        // The answer is a fatal protocol_version alert, in the clear, and nothing else:
        // no ServerHello, so no TLS 1.2 session could follow.
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        assert_eq!(
            answer,
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 70],
            "hello with supported_versions: {versions_ext}"
        );
        let e = h.join().expect("server").expect_err("refused").to_string();
        assert!(
            e.starts_with("client 127.0.0.1:") && e.contains("TLS 1.3"),
            "{e}"
        );
    }
}

#[test]
fn pinned_identities_accept_each_other_both_ways() {
    let s = EphemeralIdentity::generate("source").expect("s");
    let d = EphemeralIdentity::generate("destination").expect("d");
    let (addr, h) = serve(pinned_server_config(&d, s.fingerprint()).expect("cfg"));
    ping(
        &addr,
        PINNED_SERVER_NAME,
        pinned_client_config(&s, d.fingerprint()).expect("c"),
    )
    .expect("ping");
    h.join().expect("join").expect("server");
    // The reverse transport: the destination dials the source.
    let (addr, h) = serve(pinned_server_config(&s, d.fingerprint()).expect("cfg"));
    ping(
        &addr,
        &data_sni("0123abcd"),
        pinned_client_config(&d, s.fingerprint()).expect("c"),
    )
    .expect("ping");
    h.join().expect("join").expect("server");
}

#[test]
fn a_source_refuses_a_destination_that_is_not_the_pinned_one() {
    let s = EphemeralIdentity::generate("source").expect("s");
    let d = EphemeralIdentity::generate("destination").expect("d");
    let rogue = EphemeralIdentity::generate("destination").expect("r");
    let (addr, h) = serve(pinned_server_config(&rogue, s.fingerprint()).expect("cfg"));
    let e = ping(
        &addr,
        PINNED_SERVER_NAME,
        pinned_client_config(&s, d.fingerprint()).expect("c"),
    )
    .expect_err("rogue destination");
    assert_eq!(
        e,
        format!(
            "{addr} does not present the certificate pinned for this migration (got {}, expected {})",
            rogue.fingerprint(),
            d.fingerprint()
        )
    );
    let se = server_err(h);
    assert!(se.contains("refused our certificate"), "{se}");
}

#[test]
fn a_destination_refuses_a_source_that_is_not_the_pinned_one() {
    let s = EphemeralIdentity::generate("source").expect("s");
    let d = EphemeralIdentity::generate("destination").expect("d");
    let rogue = EphemeralIdentity::generate("source").expect("r");
    let (addr, h) = serve(pinned_server_config(&d, s.fingerprint()).expect("cfg"));
    let e = ping(
        &addr,
        PINNED_SERVER_NAME,
        pinned_client_config(&rogue, d.fingerprint()).expect("c"),
    )
    .expect_err("rogue source");
    assert!(
        e.contains("refused our certificate") && e.contains("pinned"),
        "{e}"
    );
    let se = server_err(h);
    assert!(
        se.starts_with("client 127.0.0.1:")
            && se.contains("does not present the certificate pinned for this migration")
            && se.contains(&rogue.fingerprint().to_string()),
        "{se}"
    );
}

#[test]
fn a_pinned_peer_must_hold_the_private_key() {
    // The rogue presents the pinned certificate but signs with its own key.
    let s = EphemeralIdentity::generate("source").expect("s");
    let d = EphemeralIdentity::generate("destination").expect("d");
    let rogue = EphemeralIdentity::generate("rogue").expect("r");
    let p = provider();
    let key = p
        .key_provider
        .load_private_key(rogue.key())
        .expect("rogue key");
    let stolen = Arc::new(rustls::sign::CertifiedKey::new(vec![d.cert().clone()], key));
    let mut cfg = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(Arc::new(Verifier::pinned(s.fingerprint(), p)))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(stolen)));
    cfg.send_tls13_tickets = 0;
    let (addr, _h) = serve(Arc::new(cfg));
    let e = ping(
        &addr,
        PINNED_SERVER_NAME,
        pinned_client_config(&s, d.fingerprint()).expect("c"),
    )
    .expect_err("impostor");
    assert!(e.contains(&addr) && e.contains("signature"), "{e}");
}

#[test]
fn accept_routes_each_server_name_to_its_own_config() {
    let s = EphemeralIdentity::generate("source").expect("s");
    let d1 = EphemeralIdentity::generate("d1").expect("d1");
    let d2 = EphemeralIdentity::generate("d2").expect("d2");
    let route = {
        let c1 = pinned_server_config(&d1, s.fingerprint()).expect("c1");
        let c2 = pinned_server_config(&d2, s.fingerprint()).expect("c2");
        move |sni: Option<&str>| match sni.and_then(migration_id_from_sni) {
            Some("aaaa0001") => Some(c1),
            Some("aaaa0002") => Some(c2),
            _ => None,
        }
    };
    for (id, d) in [("aaaa0001", &d1), ("aaaa0002", &d2)] {
        let (addr, h) = serve_with(route.clone());
        // Pinned to this migration's destination: the other config would be refused.
        ping(
            &addr,
            &data_sni(id),
            pinned_client_config(&s, d.fingerprint()).expect("c"),
        )
        .expect("routed");
        assert_eq!(h.join().expect("join"), Ok(Some(data_sni(id))));
    }
}

#[test]
fn accept_refuses_an_unknown_server_name_with_an_unrecognized_name_alert() {
    let s = EphemeralIdentity::generate("source").expect("s");
    let d = EphemeralIdentity::generate("d").expect("d");
    let (addr, h) = serve_with(|_| None);
    let e = ping(
        &addr,
        &data_sni("ffff0000"),
        pinned_client_config(&s, d.fingerprint()).expect("c"),
    )
    .expect_err("refused");
    assert!(
        e.contains("does not serve the name we asked for") && e.contains("UnrecognisedName"),
        "{e}"
    );
    let se = server_err(h);
    assert!(
        se.contains("'m-ffff0000.data.vmferry.invalid', which this daemon does not serve"),
        "{se}"
    );
}

#[test]
fn garbage_instead_of_a_client_hello_is_refused_cleanly() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = std::thread::spawn(move || {
        let (tcp, _) = l.accept().expect("accept");
        accept(tcp, T, |_| panic!("no config is asked for garbage")).map(|_| ())
    });
    let mut c = TcpStream::connect(addr).expect("c");
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("w");
    let e = h.join().expect("no panic").expect_err("refused");
    let s = e.to_string();
    assert!(
        matches!(e, TlsError::Refused { .. })
            && s.starts_with("refused client 127.0.0.1:")
            && s.contains("did not open a TLS handshake"),
        "{s}"
    );
}

#[test]
fn a_silent_client_times_out_within_the_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let _c = TcpStream::connect(addr).expect("c");
    let (tcp, _) = l.accept().expect("accept");
    let t = Instant::now();
    let e = accept(tcp, Duration::from_millis(300), |_| None)
        .map(|_| ())
        .expect_err("timeout");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        e.to_string()
            .starts_with("TLS handshake with client 127.0.0.1:")
            && e.to_string().ends_with("timed out after 300 ms"),
        "{e}"
    );
}

#[test]
fn a_silent_server_times_out_within_the_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = l.local_addr().expect("addr");
    let tcp = TcpStream::connect(addr).expect("c");
    let _server_side = l.accept().expect("accept");
    let s = EphemeralIdentity::generate("s").expect("s");
    let t = Instant::now();
    let e = connect(
        tcp,
        PINNED_SERVER_NAME,
        pinned_client_config(&s, s.fingerprint()).expect("c"),
        Duration::from_millis(300),
        &addr.to_string(),
    )
    .map(|_| ())
    .expect_err("timeout");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(
        e.to_string(),
        format!("TLS handshake with {addr} timed out after 300 ms")
    );
}

#[test]
fn data_server_names_round_trip() {
    assert_eq!(data_sni("abcd1234"), "m-abcd1234.data.vmferry.invalid");
    assert_eq!(
        migration_id_from_sni(&data_sni("abcd1234")),
        Some("abcd1234")
    );
    for other in [
        "hosta",
        PINNED_SERVER_NAME,
        "m-.data.vmferry.invalid",
        "m-a.b.data.vmferry.invalid",
        "x-abcd.data.vmferry.invalid",
    ] {
        assert_eq!(migration_id_from_sni(other), None, "{other}");
    }
    // A real id fits a DNS label, so a client can send it.
    let id = "0123456789abcdef0123456789abcdef";
    assert!(ServerName::try_from(data_sni(id)).is_ok());
}
