//! The data connections' handshakes (rustls' unbuffered API): a refused peer learns why,
//! as it did with rustls' buffered connection, and plaintext that came with the
//! handshake is not lost.

use super::*;
use crate::identity::EphemeralIdentity;
use crate::pump::Session;
use rustls::{ClientConfig, ServerConfig};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;

const T: Duration = Duration::from_secs(5);

type Served = JoinHandle<Result<(Session, TcpStream), String>>;

/// Accepts one data connection with `cfg`; returns its address and the server's result.
fn serve_data(cfg: Arc<ServerConfig>) -> (String, Served) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let h = std::thread::spawn(move || {
        let (tcp, _) = l.accept().expect("accept");
        match accept_any(tcp, T, |_| Some(Choice::Data(cfg))) {
            Ok((Accepted::Data(s, tcp), _)) => Ok((s, tcp)),
            Ok((Accepted::Control(_), _)) => Err("a control connection".into()),
            Err(e) => Err(e.to_string()),
        }
    });
    (addr, h)
}

/// Dials a data connection and reads one byte: the server's verdict on our certificate
/// arrives on that first read (TLS 1.3). Returns the error, worded for an operator.
fn dial_data(addr: &str, cfg: Arc<ClientConfig>) -> Result<(), String> {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    let mut s =
        connect_data(&mut tcp, PINNED_SERVER_NAME, cfg, T, addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(T)).expect("timeout");
    let mut b = [0u8; 1];
    s.stream(&mut tcp)
        .read_exact(&mut b)
        .map_err(|e| describe_io(&e, addr))
}

#[test]
fn a_destination_refuses_a_source_that_is_not_the_pinned_one_and_says_why() {
    let s = EphemeralIdentity::generate("source").expect("s");
    let d = EphemeralIdentity::generate("destination").expect("d");
    let rogue = EphemeralIdentity::generate("source").expect("r");
    let (addr, h) = serve_data(pinned_server_config(&d, s.fingerprint()).expect("cfg"));
    let e = dial_data(
        &addr,
        pinned_client_config(&rogue, d.fingerprint()).expect("c"),
    )
    .expect_err("rogue source");
    assert!(
        e.contains("refused our certificate") && e.contains("pinned"),
        "{e}"
    );
    let se = h
        .join()
        .expect("join")
        .map(|_| ())
        .expect_err("server refused");
    assert!(
        se.starts_with("client 127.0.0.1:")
            && se.contains("does not present the certificate pinned for this migration")
            && se.contains(&rogue.fingerprint().to_string()),
        "{se}"
    );
}

#[test]
fn a_source_refuses_a_destination_that_is_not_the_pinned_one_and_says_why() {
    let s = EphemeralIdentity::generate("source").expect("s");
    let d = EphemeralIdentity::generate("destination").expect("d");
    let rogue = EphemeralIdentity::generate("destination").expect("r");
    let (addr, h) = serve_data(pinned_server_config(&rogue, s.fingerprint()).expect("cfg"));
    let e = dial_data(&addr, pinned_client_config(&s, d.fingerprint()).expect("c"))
        .expect_err("rogue destination");
    assert_eq!(
        e,
        format!(
            "{addr} does not present the certificate pinned for this migration (got {}, expected {})",
            rogue.fingerprint(),
            d.fingerprint()
        )
    );
    let se = h
        .join()
        .expect("join")
        .map(|_| ())
        .expect_err("server refused");
    assert!(se.contains("refused our certificate"), "{se}");
}

#[test]
fn plaintext_sent_with_the_clients_finished_reaches_the_session() {
    let (ccfg, scfg) = crate::testing::pinned_configs();
    let (addr, h) = serve_data(scfg);
    // rustls' buffered client sends what was written before the handshake ended right
    // after its Finished, in the same write.
    let name = rustls::pki_types::ServerName::try_from(PINNED_SERVER_NAME).expect("name");
    let mut c = rustls::ClientConnection::new(ccfg, name).expect("client");
    c.writer()
        .write_all(b"with the handshake")
        .expect("early write");
    let mut tcp = TcpStream::connect(&addr).expect("connect");
    while c.is_handshaking() || c.wants_write() {
        c.complete_io(&mut tcp).expect("handshake");
    }
    let (mut ss, mut st) = h.join().expect("join").expect("server");
    let mut got = [0u8; 18];
    ss.stream(&mut st).read_exact(&mut got).expect("read");
    assert_eq!(&got, b"with the handshake");
}

#[test]
fn a_peer_that_hangs_up_mid_handshake_is_an_error_not_a_hang() {
    let (_, scfg) = crate::testing::pinned_configs();
    let (addr, h) = serve_data(scfg);
    let mut tcp = TcpStream::connect(&addr).expect("connect");
    // The start of a ClientHello record, then nothing more.
    tcp.write_all(&[22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3])
        .expect("write");
    drop(tcp);
    let se = h
        .join()
        .expect("join")
        .map(|_| ())
        .expect_err("server error");
    assert!(se.contains("closed the connection"), "{se}");
}
