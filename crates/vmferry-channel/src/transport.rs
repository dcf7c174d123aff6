//! The transport layer: TCP connections with errors worded for operators, and socket
//! tuning for bulk streams.
//!
//! What this module must never do: connect without a deadline (a silently dropped SYN
//! would hang a migration phase for minutes), or encrypt and authenticate — that is the
//! next layer's job (`tls`), and nothing may send migration bytes over a stream from here
//! before it.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve '{addr}': {reason}")]
    Resolve { addr: String, reason: String },
    #[error("connection to {addr} refused (is the daemon running, and listening on that port?)")]
    Refused { addr: String },
    #[error(
        "connection to {addr} timed out after {} (is a firewall dropping packets, or the host down?)",
        fmt_duration(*.after)
    )]
    TimedOut { addr: String, after: Duration },
    #[error("no route to {addr} (check the address and this host's routes)")]
    Unreachable { addr: String },
    #[error("connection to {addr} failed: {source}")]
    Other {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Connects to `addr` (`host:port`) within `timeout` per resolved address, trying each
/// in turn, and turns Nagle off. The error is that of the last address tried.
pub fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, TransportError> {
    let addrs: Vec<SocketAddr> = addr
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
                // Control messages are small request/response pairs: Nagle would delay them.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => {
                tracing::debug!(%addr, resolved = %a, "connect failed: {e}");
                last = Some(e);
            }
        }
    }
    Err(match last {
        None => TransportError::Resolve {
            addr: addr.to_string(),
            reason: "the name has no addresses".into(),
        },
        Some(e) => classify(addr, e, timeout),
    })
}

/// Low latency, and kernel buffers large enough for a migration stream (best effort).
///
/// A buffer set with `setsockopt` is fixed: Linux then stops autotuning it. So a buffer
/// is only set when the fixed size beats the autotuning ceiling (`tcp_rmem`/`tcp_wmem`);
/// otherwise the kernel's autotuning is left to do better than we would.
pub fn tune_socket(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    const WANT: usize = 4 << 20;
    let _ = s.set_nodelay(true);
    if let Some(n) = fixed_buffer(
        WANT,
        sysctl_max("/proc/sys/net/core/wmem_max"),
        sysctl_max("/proc/sys/net/ipv4/tcp_wmem"),
    ) {
        if let Err(e) = setsockopt(s, sockopt::SndBuf, &n) {
            tracing::debug!("cannot set SO_SNDBUF to {n}: {e}");
        }
    }
    if let Some(n) = fixed_buffer(
        WANT,
        sysctl_max("/proc/sys/net/core/rmem_max"),
        sysctl_max("/proc/sys/net/ipv4/tcp_rmem"),
    ) {
        if let Err(e) = setsockopt(s, sockopt::RcvBuf, &n) {
            tracing::debug!("cannot set SO_RCVBUF to {n}: {e}");
        }
    }
}

/// The local (QEMU) end of a stream: a large send buffer, so each write hands QEMU more
/// and wakes it less often. A unix stream socket has no autotuning, and its default
/// (`wmem_default`, ~208 KiB) made QEMU's multifd receive threads wake for every few
/// hundred KiB: with 4 MiB the benchmark's multifd-4 migration took 0.74 s instead of
/// 0.91 s, the QEMUs' CPU per GiB fell from 0.93 to 0.64 s. Best effort: the kernel caps
/// the request at `wmem_max`.
pub fn tune_local(s: &std::os::unix::net::UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    const WANT: usize = 4 << 20;
    let n = WANT.min(sysctl_max("/proc/sys/net/core/wmem_max").unwrap_or(WANT));
    if let Err(e) = setsockopt(s, sockopt::SndBuf, &n) {
        tracing::debug!("cannot set the local socket's SO_SNDBUF to {n}: {e}");
    }
}

/// The buffer size to set, if setting one is better than autotuning: the kernel caps a
/// request at `core_max` and doubles it (bookkeeping overhead); autotuning may grow a
/// buffer up to `autotune_max`.
fn fixed_buffer(
    want: usize,
    core_max: Option<usize>,
    autotune_max: Option<usize>,
) -> Option<usize> {
    let granted = want.min(core_max?);
    (granted.saturating_mul(2) > autotune_max?).then_some(granted)
}

/// The last number in a sysctl file (`rmem_max` holds one, `tcp_rmem` holds min default max).
fn sysctl_max(path: &str) -> Option<usize> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

fn classify(addr: &str, e: std::io::Error, timeout: Duration) -> TransportError {
    let addr = addr.to_string();
    match e.kind() {
        ErrorKind::ConnectionRefused => TransportError::Refused { addr },
        ErrorKind::TimedOut | ErrorKind::WouldBlock => TransportError::TimedOut {
            addr,
            after: timeout,
        },
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
            TransportError::Unreachable { addr }
        }
        _ => TransportError::Other { addr, source: e },
    }
}

/// "2 s", "1.5 s", "300 ms": how long an operator waited.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Whether this kernel offers TLS offload (`TCP_ULP` "tls"), tried once on a throwaway
/// loopback connection. vmferry's data path is userspace TLS (rustls) either way; this
/// says which the kernel would allow, so the daemon can report the fallback it takes.
pub fn kernel_tls_available() -> Result<(), KernelTlsError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(KernelTlsError::Probe)?;
    let addr = l.local_addr().map_err(KernelTlsError::Probe)?;
    let c =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(KernelTlsError::Probe)?;
    let _accepted = l.accept().map_err(KernelTlsError::Probe)?;
    nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::TcpUlp::default(), b"tls").map_err(
        |e| match e {
            nix::errno::Errno::ENOENT => KernelTlsError::NoModule,
            other => KernelTlsError::Refused(other),
        },
    )
}

/// Why the kernel's TLS offload is not available.
#[derive(Debug, thiserror::Error)]
pub enum KernelTlsError {
    #[error("probe: {0}")]
    Probe(#[source] std::io::Error),
    #[error("the kernel has no TLS module (TCP_ULP \"tls\": not found; modprobe tls?)")]
    NoModule,
    #[error("TCP_ULP \"tls\" refused: {0}")]
    Refused(#[source] nix::errno::Errno),
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
            e.to_string()
                .starts_with(&format!("connection to {addr} refused")),
            "{e}"
        );
    }

    #[test]
    fn an_open_port_connects_without_nagle() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let s = connect_tcp(&addr, Duration::from_secs(2)).expect("connect");
        assert!(s.nodelay().expect("nodelay"));
        tune_socket(&s);
    }

    #[test]
    fn an_unresolvable_name_is_named() {
        let e = connect_tcp("no-such-host.invalid:1", Duration::from_secs(2)).expect_err("resolve");
        assert!(
            e.to_string()
                .starts_with("cannot resolve 'no-such-host.invalid:1'"),
            "{e}"
        );
    }

    #[test]
    fn an_address_without_a_port_is_named() {
        let e = connect_tcp("127.0.0.1", Duration::from_secs(2)).expect_err("no port");
        assert!(e.to_string().contains("'127.0.0.1'"), "{e}");
    }

    #[test]
    fn timeouts_and_missing_routes_are_worded() {
        let t = classify(
            "10.0.0.2:4701",
            ErrorKind::TimedOut.into(),
            Duration::from_secs(2),
        );
        assert!(
            t.to_string()
                .starts_with("connection to 10.0.0.2:4701 timed out after 2 s"),
            "{t}"
        );
        let u = classify(
            "10.0.0.2:4701",
            ErrorKind::NetworkUnreachable.into(),
            Duration::from_secs(2),
        );
        assert!(
            u.to_string().starts_with("no route to 10.0.0.2:4701"),
            "{u}"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(fmt_duration(Duration::from_secs(5)), "5 s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(fmt_duration(Duration::from_millis(300)), "300 ms");
    }

    #[test]
    fn a_buffer_is_fixed_only_when_it_beats_autotuning() {
        // Autotuning may reach 32 MiB: a fixed 8 MiB would be a step down.
        assert_eq!(fixed_buffer(4 << 20, Some(4 << 20), Some(32 << 20)), None);
        // Autotuning stops at 4 MiB: the fixed 4 MiB (8 MiB in the kernel) is better.
        assert_eq!(
            fixed_buffer(4 << 20, Some(4 << 20), Some(4 << 20)),
            Some(4 << 20)
        );
        // The kernel would cap a request at 208 KiB: leave autotuning alone.
        assert_eq!(fixed_buffer(4 << 20, Some(212_992), Some(6 << 20)), None);
        // Unknown limits: change nothing.
        assert_eq!(fixed_buffer(4 << 20, None, Some(4 << 20)), None);
    }
}
