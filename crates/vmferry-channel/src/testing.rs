//! Test support, shared by this crate's unit tests, its integration tests and other
//! crates' tests (hidden from the docs; not for use by the daemon's own code). What it must never do: weaken a configuration
//! the daemon uses — it builds connections only with the real pinned configurations.

use crate::compress::Filters;
use crate::identity::EphemeralIdentity;
use crate::meter::Meter;
use crate::pump::Session;
use crate::tls;
use crate::tunnel::{Accept, Tunnel};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// A loopback listener whose first connection gets the data path's server handshake:
/// (its address, the thread that returns the server's session and tcp).
fn data_server(
    scfg: Arc<rustls::ServerConfig>,
) -> (String, std::thread::JoinHandle<(Session, TcpStream)>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let srv = std::thread::spawn(move || {
        let (tcp, _) = l.accept().expect("accept");
        match tls::accept_any(tcp, Duration::from_secs(5), |_| {
            Some(tls::Choice::Data(scfg))
        })
        .expect("accept tls")
        {
            (tls::Accepted::Data(s, tcp), _) => (s, tcp),
            (tls::Accepted::Control(_), _) => panic!("a data choice made a control connection"),
        }
    });
    (addr, srv)
}

/// A pinned data connection on loopback, both handshakes complete through the data
/// path's own handshakes (rustls' unbuffered API), exactly as the daemons make them:
/// (client session, client tcp, server session, server tcp).
pub fn tls_pair() -> (Session, TcpStream, Session, TcpStream) {
    let (ccfg, scfg) = pinned_configs();
    let (addr, srv) = data_server(scfg);
    let mut tcp = TcpStream::connect(&addr).expect("connect");
    let c = tls::connect_data(
        &mut tcp,
        tls::PINNED_SERVER_NAME,
        ccfg,
        Duration::from_secs(5),
        &addr,
    )
    .expect("client tls");
    let (s, st) = srv.join().expect("join");
    (c, tcp, s, st)
}

/// A stock rustls client (buffered, as a peer that is not vmferry would be) and a data
/// server session, over loopback: (client stream, server session, server tcp).
pub fn stock_client_and_session() -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    Session,
    TcpStream,
) {
    let (ccfg, scfg) = pinned_configs();
    let (addr, srv) = data_server(scfg);
    let tcp = TcpStream::connect(&addr).expect("connect");
    let c = tls::connect(
        tcp,
        tls::PINNED_SERVER_NAME,
        ccfg,
        Duration::from_secs(5),
        &addr,
    )
    .expect("client tls");
    let (s, st) = srv.join().expect("join");
    (c, s, st)
}

/// A pinned (client, server) configuration pair for two fresh identities.
pub fn pinned_configs() -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
    let s = EphemeralIdentity::generate("s").expect("s");
    let d = EphemeralIdentity::generate("d").expect("d");
    let scfg = tls::pinned_server_config(&d, s.fingerprint()).expect("server cfg");
    let ccfg = tls::pinned_client_config(&s, d.fingerprint()).expect("client cfg");
    (ccfg, scfg)
}

/// How [`tunnel_pair`] sets its tunnels up.
#[derive(Debug)]
pub struct TunnelOpts<'a> {
    pub filters: Filters,
    pub client_meter: Arc<Meter>,
    pub server_meter: Arc<Meter>,
    /// How each side names its peer in errors.
    pub client_calls_server: &'a str,
    pub server_calls_client: &'a str,
}

impl Default for TunnelOpts<'_> {
    fn default() -> Self {
        TunnelOpts {
            filters: Filters::default(),
            client_meter: Arc::default(),
            server_meter: Arc::default(),
            client_calls_server: "server",
            server_calls_client: "client",
        }
    }
}

/// A client and a server tunnel over a fresh pinned TLS pair, as the daemons make them;
/// `accept` decides the server's streams. Also returns the server's TCP socket, to cut
/// the connection under both.
pub fn tunnel_pair(accept: Accept, o: TunnelOpts<'_>) -> (Tunnel, Tunnel, TcpStream) {
    let (cc, ct, sc, st) = tls_pair();
    let server_tcp = st.try_clone().expect("clone");
    let server = Tunnel::server(
        sc,
        st,
        o.server_calls_client,
        o.server_meter,
        o.filters,
        accept,
    )
    .expect("server");
    let client =
        Tunnel::client(cc, ct, o.client_calls_server, o.client_meter, o.filters).expect("client");
    (client, server, server_tcp)
}

/// `len` pseudo-random (xorshift64) bytes: incompressible, and the same for a seed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// This process's resident memory, in KiB (0 if /proc says nothing).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
