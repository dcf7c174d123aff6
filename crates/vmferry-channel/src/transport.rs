//! The transport layer: TCP connections with errors worded for operators.
//! Every connect has a timeout; nothing here encrypts — that is the next layer's job.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve '{addr}': {reason}")]
    Resolve { addr: String, reason: String },
    #[error("connection to {addr} refused (is the daemon running and the port open?)")]
    Refused { addr: String },
    #[error("connection to {addr} timed out after {secs} s (a firewall dropping packets?)")]
    TimedOut { addr: String, secs: u64 },
    #[error("no route to {addr}")]
    Unreachable { addr: String },
    #[error("connection to {addr} failed: {source}")]
    Other {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Connects to `host:port` within `timeout`, trying each resolved address.
pub fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, TransportError> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| TransportError::Resolve {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    let addr = addr.to_string();
    Err(match last {
        None => TransportError::Resolve {
            addr,
            reason: "no addresses".into(),
        },
        Some(e) => match e.kind() {
            ErrorKind::ConnectionRefused => TransportError::Refused { addr },
            ErrorKind::TimedOut | ErrorKind::WouldBlock => TransportError::TimedOut {
                addr,
                secs: timeout.as_secs().max(1),
            },
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                TransportError::Unreachable { addr }
            }
            _ => TransportError::Other { addr, source: e },
        },
    })
}

/// Low latency and large kernel buffers for bulk streams (best effort).
pub fn tune_socket(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = s.set_nodelay(true);
    let _ = setsockopt(s, sockopt::SndBuf, &(4 << 20));
    let _ = setsockopt(s, sockopt::RcvBuf, &(4 << 20));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_reported_as_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        let e = connect_tcp(&addr, Duration::from_secs(2)).expect_err("refused");
        assert!(
            e.to_string().contains("refused") && e.to_string().contains(&addr),
            "{e}"
        );
    }

    #[test]
    fn an_unresolvable_name_is_named() {
        let e = connect_tcp("no-such-host.invalid:1", Duration::from_secs(2)).expect_err("resolve");
        assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
    }
}
