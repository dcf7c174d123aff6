//! Free TCP ports on loopback.

/// A port that was free on 127.0.0.1 a moment ago (bind to port 0, read, close); 0 if
/// binding fails. Another process may take it before the test does: prefer listeners that
/// bind port 0 themselves where the code allows it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}
