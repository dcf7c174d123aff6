//! Test support, shared by this crate's unit tests and its integration tests (hidden from
//! the docs; not for use by the daemon). What it must never do: weaken a configuration
//! the daemon uses — it builds connections only with the real pinned configurations.

use crate::identity::EphemeralIdentity;
use crate::tls;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A pinned TLS 1.3 connection on loopback, both handshakes complete, exactly as a data
/// stream starts: (client, server). Panics on failure: for tests only.
pub fn tls_streams() -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
) {
    let s = EphemeralIdentity::generate("s").expect("s");
    let d = EphemeralIdentity::generate("d").expect("d");
    let scfg = tls::pinned_server_config(&d, s.fingerprint()).expect("server cfg");
    let ccfg = tls::pinned_client_config(&s, d.fingerprint()).expect("client cfg");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let srv = std::thread::spawn(move || {
        let (tcp, _) = l.accept().expect("accept");
        tls::accept(tcp, Duration::from_secs(5), |_| Some(scfg)).expect("accept tls")
    });
    let tcp = TcpStream::connect(&addr).expect("connect");
    let c = tls::connect(
        tcp,
        tls::PINNED_SERVER_NAME,
        ccfg,
        Duration::from_secs(5),
        &addr,
    )
    .expect("client tls");
    let (s, _) = srv.join().expect("join");
    (c, s)
}

/// The same as (client conn, client tcp, server conn, server tcp).
pub fn tls_pair() -> (rustls::Connection, TcpStream, rustls::Connection, TcpStream) {
    let (c, s) = tls_streams();
    (
        rustls::Connection::Client(c.conn),
        c.sock,
        rustls::Connection::Server(s.conn),
        s.sock,
    )
}
