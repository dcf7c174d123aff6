//! Attackers on the data path: a rogue client racing the source to the destination
//! with a made-up identity (even knowing the cookie's fingerprints), a replay after the
//! migration, a credential that expired, a man in the middle with its own certificate.
//! Each is refused and logged; the real migration is not disturbed, or, when the
//! attacker sits on the only path, fails safely with the source intact.

mod common;

use anyhow::Result;
use common::*;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmferry_channel::identity::{EphemeralIdentity, Fingerprint};
use vmferry_channel::tls;
use vmferry_daemon::client::ControlClient;
use vmferry_daemon::ControlTarget;
use vmferry_proto::{
    Cookie, MigrationId, MigrationOptions, RequestBody, ResponseBody, Transport, VmRef,
};
use vmferry_testkit::ports::free_port;
use vmferry_testkit::qemu::{start_qemu, QemuOpts, QemuProcess};

const T: Duration = Duration::from_secs(30);

struct Pair {
    tmp: tempfile::TempDir,
    ctl: vmferry_channel::certs::HostCredentials,
    a: String,
    b: String,
    da: DaemonProc,
    db: DaemonProc,
    src: QemuProcess,
    dst: QemuProcess,
}

/// Two daemons on loopback (`extra` for both), a paused source QEMU and an incoming one.
fn pair(extra: &[&str]) -> Result<Pair> {
    vmferry_testkit::require::qemu();
    let tmp = tempfile::tempdir()?;
    let pki = Pki::new(tmp.path())?;
    let host = pki.issue("localhost", Some("127.0.0.1"))?;
    let ctl = vmferry_channel::certs::HostCredentials::load(&pki.issue("controller", None)?)?;
    let (a, b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let da = DaemonProc::start(None, &a, &tmp.path().join("a"), &host, extra)?;
    let db = DaemonProc::start(None, &b, &tmp.path().join("b"), &host, extra)?;
    let mut o = QemuOpts::new(tmp.path().join("src.qmp"), tmp.path().join("src.serial"));
    o.memory_mib = 64;
    o.paused = true;
    let src = start_qemu(&o)?;
    let mut o = QemuOpts::new(tmp.path().join("dst.qmp"), tmp.path().join("dst.serial"));
    o.memory_mib = 64;
    o.incoming = Some("defer".into());
    let dst = start_qemu(&o)?;
    Ok(Pair {
        tmp,
        ctl,
        a,
        b,
        da,
        db,
        src,
        dst,
    })
}

fn control(p: &Pair, addr: &str) -> Result<ControlClient> {
    Ok(ControlClient::connect(
        &ControlTarget::Tcp(addr.to_string()),
        Some(&p.ctl),
        None,
    )?)
}

/// begin + prepare by hand: the cookie a controller would carry.
fn begin_and_prepare(p: &Pair, src: &mut ControlClient, dst: &mut ControlClient) -> Result<Cookie> {
    let id = MigrationId::from_random(rand_bytes());
    let ResponseBody::Cookie { cookie } = src.call(
        RequestBody::Begin {
            migration: id,
            vm: VmRef::Attached {
                qmp: p.src.qmp.display().to_string(),
            },
            options: MigrationOptions::default(),
        },
        T,
    )?
    else {
        anyhow::bail!("begin gave no cookie")
    };
    let ResponseBody::Cookie { mut cookie } = dst.call(
        RequestBody::Prepare {
            cookie,
            vm: VmRef::Attached {
                qmp: p.dst.qmp.display().to_string(),
            },
        },
        T,
    )?
    else {
        anyhow::bail!("prepare gave no cookie")
    };
    cookie.data_address.get_or_insert_with(|| p.b.clone());
    Ok(cookie)
}

fn rand_bytes() -> [u8; 16] {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        ^ u128::from(std::process::id());
    n.to_le_bytes()
}

/// A rogue dials migration `id`'s data channel at `addr` with its own identity, pinning
/// `server_fp` (it read the cookie). Returns the error it got.
fn rogue_dial(addr: &str, id: &str, server_fp: Fingerprint) -> String {
    let me = EphemeralIdentity::generate("rogue").expect("identity");
    let cfg = tls::pinned_client_config(&me, server_fp).expect("cfg");
    let tcp = match TcpStream::connect(addr) {
        Ok(t) => t,
        Err(e) => return e.to_string(),
    };
    match tls::connect(tcp, &tls::data_sni(id), cfg, Duration::from_secs(5), addr) {
        Err(e) => e.to_string(),
        Ok(mut s) => {
            // TLS 1.3: the server judges our certificate after our Finished; the first
            // read shows its verdict.
            let _ = s.sock.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 1];
            match std::io::Read::read(&mut s, &mut b) {
                Err(e) => tls::describe_io(&e, addr),
                Ok(0) => "closed".into(),
                Ok(_) => "ACCEPTED".into(),
            }
        }
    }
}

fn wait_done(src: &mut ControlClient, id: &MigrationId) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ResponseBody::Status { status } = src.call(
            RequestBody::Status {
                migration: id.clone(),
                wait_ms: 500,
                renew: false,
            },
            T,
        )?
        else {
            anyhow::bail!("no status")
        };
        if status.finished {
            anyhow::ensure!(status.qemu_status == "completed", "{status:?}");
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "migration did not finish");
    }
}

#[test]
fn rogue_and_replayed_connections_are_refused_and_the_real_migration_succeeds() -> Result<()> {
    let p = pair(&[])?;
    let (mut src, mut dst) = (control(&p, &p.a)?, control(&p, &p.b)?);
    let cookie = begin_and_prepare(&p, &mut src, &mut dst)?;
    let id = cookie.migration.clone();
    let dst_fp: Fingerprint = cookie
        .destination_fingerprint
        .as_deref()
        .expect("fp")
        .parse()?;

    // 1. A rogue races the source, knowing the cookie: refused, it holds no pinned key.
    let e = rogue_dial(&p.b, id.as_str(), dst_fp);
    assert!(e.contains("refused our certificate"), "{e}");
    // 2. The credential of another (unknown) migration: refused by name.
    let other = MigrationId::from_random([0x42; 16]);
    let e = rogue_dial(&p.b, other.as_str(), dst_fp);
    assert!(e.contains("does not serve the name"), "{e}");

    // 3. The real migration is not disturbed.
    src.call(
        RequestBody::Connect {
            cookie: cookie.clone(),
            transport: Transport::Direct,
            timeout_ms: 5000,
        },
        T,
    )?;
    src.call(
        RequestBody::Perform {
            cookie: cookie.clone(),
        },
        T,
    )?;
    wait_done(&mut src, &id)?;
    dst.call(
        RequestBody::Finish {
            migration: id.clone(),
        },
        T,
    )?;
    src.call(
        RequestBody::Confirm {
            migration: id.clone(),
            success: true,
        },
        T,
    )?;

    // 4. Replaying the spent credential afterwards: the migration is gone.
    let e = rogue_dial(&p.b, id.as_str(), dst_fp);
    assert!(e.contains("does not serve the name"), "{e}");

    // Every refusal is in the destination's audit log.
    // (The daemon writes a refusal's line after lingering for the alert to arrive.)
    let path = p.db.state_dir.join("audit.log");
    let count = |log: &str, outcome: &str| {
        log.lines()
            .filter(|l| l.contains(r#""op":"data""#) && l.contains(outcome))
            .count()
    };
    // Polled: a loaded machine may write them seconds late; there is no hurry to assert.
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = std::fs::read_to_string(&path)?;
        if count(&log, r#""outcome":"refused""#) >= 3 || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(count(&log, r#""outcome":"refused""#), 3, "{log}");
    assert_eq!(count(&log, r#""outcome":"ok""#), 1, "{log}");
    drop(p.tmp);
    Ok(())
}

#[test]
fn an_expired_one_time_credential_is_refused_and_the_source_is_untouched() -> Result<()> {
    let p = pair(&["--credential-ttl", "1"])?;
    let (mut src, mut dst) = (control(&p, &p.a)?, control(&p, &p.b)?);
    let cookie = begin_and_prepare(&p, &mut src, &mut dst)?;
    std::thread::sleep(Duration::from_millis(1500));
    let e = src
        .call(
            RequestBody::Connect {
                cookie: cookie.clone(),
                transport: Transport::Direct,
                timeout_ms: 3000,
            },
            T,
        )
        .expect_err("an expired credential must be refused")
        .to_string();
    assert!(e.contains("unknown or expired migration"), "{e}");
    src.call(
        RequestBody::Confirm {
            migration: cookie.migration.clone(),
            success: false,
        },
        T,
    )?;
    let mut q = vmferry_qmp::Qmp::connect(&p.src.qmp, Duration::from_secs(5))?;
    assert!(!q.query_migrate()?.status.is_active());
    assert_eq!(q.query_status()?.status, "prelaunch");
    drop(p.da);
    Ok(())
}

/// Accepts any server certificate: the man in the middle's own client side.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[test]
fn a_man_in_the_middle_is_refused_by_both_sides_and_the_source_keeps_its_guest() -> Result<()> {
    let p = pair(&[])?;
    // The relay: terminates the source's TLS with its own certificate, and dials the
    // destination with its own client certificate.
    let relay = TcpListener::bind("127.0.0.1:0")?;
    let relay_addr = relay.local_addr()?.to_string();
    let b = p.b.clone();
    let mitm = std::thread::spawn(move || -> Vec<String> {
        let mut seen = Vec::new();
        let _ = relay.set_nonblocking(false);
        let Ok((from_src, _)) = relay.accept() else {
            return seen;
        };
        let me = EphemeralIdentity::generate("mitm").expect("identity");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Towards the destination, claiming to be the source (SNI copied below).
        let client_cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider.clone())))
            .with_client_auth_cert(vec![me.cert().clone()], me.key())
            .expect("cfg");
        // Towards the source: present our own certificate.
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(vec![me.cert().clone()], me.key())
            .expect("cfg");
        // Between the source's hello and our answer, try the destination with the
        // server name the source asked for (before any rollback can remove it).
        let mut dst_leg = Vec::new();
        let src_side = tls::accept(from_src, Duration::from_secs(5), |name| {
            if let (Some(name), Ok(tcp)) = (name, TcpStream::connect(&b)) {
                match tls::connect(tcp, name, Arc::new(client_cfg), Duration::from_secs(5), &b) {
                    Err(e) => dst_leg.push(format!("destination leg: {e}")),
                    Ok(mut s) => {
                        let _ = s.sock.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut x = [0u8; 1];
                        if let Err(e) = std::io::Read::read(&mut s, &mut x) {
                            dst_leg.push(format!("destination leg: {}", tls::describe_io(&e, &b)));
                        }
                    }
                }
            }
            Some(Arc::new(server_cfg.clone()))
        });
        seen.extend(dst_leg);
        if let Err(e) = src_side {
            seen.push(format!("source leg: {e}"));
        }
        seen
    });
    let mut c = vmferry();
    c.args(["migrate", "--from", &p.a, "--to", &p.b, "--src-qmp"])
        .arg(&p.src.qmp)
        .arg("--dst-qmp")
        .arg(&p.dst.qmp)
        .arg("--certs")
        .arg(p.tmp.path().join("controller"))
        .args(["--transport", "direct", "--data-address", &relay_addr]);
    let o = run(c);
    assert!(
        !o.status.success(),
        "a MITM must not get through: {}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not the certificate expected") || err.contains("pinned"),
        "{err}"
    );
    assert!(err.contains("source VM keeps running"), "{err}");
    let seen = mitm.join().expect("relay");
    assert!(
        seen.iter()
            .any(|s| s.contains("destination leg") && s.contains("refused our certificate")),
        "{seen:?}"
    );
    let mut q = vmferry_qmp::Qmp::connect(&p.src.qmp, Duration::from_secs(5))?;
    assert!(!q.query_migrate()?.status.is_active());
    drop(p.db);
    Ok(())
}

#[test]
fn in_x509_mode_only_allowed_peer_daemons_exchange_guests() -> Result<()> {
    for (allowed, ok) in [("CN=localhost", true), ("CN=some-other-host", false)] {
        let p = pair(&["--allowed-peer", allowed])?;
        let mut c = vmferry();
        c.args(["migrate", "--from", &p.a, "--to", &p.b, "--src-qmp"])
            .arg(&p.src.qmp)
            .arg("--dst-qmp")
            .arg(&p.dst.qmp)
            .arg("--certs")
            .arg(p.tmp.path().join("controller"))
            .args(["--data-auth", "x509", "--transport", "direct"]);
        let o = run(c);
        assert_eq!(o.status.success(), ok, "allowed {allowed}: {}", text(&o));
        if !ok {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("not in allowed_peers"), "{err}");
            assert!(err.contains("source VM keeps running"), "{err}");
        }
    }
    Ok(())
}
