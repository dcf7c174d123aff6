//! Unix sockets forwarded between two libvirt test hosts by socat (the baseline that
//! vmferry's daemons replace).

use super::LibvirtHost;
use crate::netns::Host;
use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A unix socket on one host forwarded to a unix socket on another, through one TCP
/// connection per client between their namespaces, by two `socat`s:
///
/// ```text
///   host from: socat UNIX-LISTEN:listen,fork ──TCP to.ip:port──► host to: socat
///              TCP-LISTEN:port,fork UNIX-CONNECT:connect
/// ```
/// Half-closes pass through (socat shuts down the other side's write on EOF, and waits
/// `-t 60` s rather than its default 0.5 s for the other direction to end). Both socats are
/// killed on drop; the listening socket file is removed then.
#[derive(Debug)]
pub struct UnixBridge {
    /// The socket clients on the `from` host connect to (path as the hosts see it).
    pub listen: PathBuf,
    listen_outside: PathBuf,
    /// The `from` side (listens on the unix socket), killed first on drop.
    from_socat: ChildGuard,
    /// The `to` side (listens on TCP).
    to_socat: ChildGuard,
}

impl UnixBridge {
    /// Forwards `listen` on `from` to `connect` on `to` (both paths as the hosts see them:
    /// in their work directories or private directories) over TCP port `port` on `to`'s
    /// address. Waits (bounded) until both socats listen. The target need not exist yet: each
    /// client's connection is made to it when the client arrives.
    pub fn start(
        from: &LibvirtHost,
        listen: &Path,
        to: &LibvirtHost,
        connect: &Path,
        port: u16,
    ) -> Result<UnixBridge> {
        let listen_outside = from.outside(listen)?;
        let connect_outside = to.outside(connect)?;
        for p in [&listen_outside, &connect_outside] {
            if p.as_os_str().len() > 100 {
                bail!("{} is too long for a unix socket path", p.display());
            }
        }
        let log = |side: &LibvirtHost| -> Result<std::fs::File> {
            let p = side.dir.join(format!("socat-{port}.log"));
            std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))
        };
        let to_socat = ChildGuard::spawn(
            to.host
                .command("socat")
                .args(["-d", "-t", "60"])
                .arg(format!(
                    "TCP-LISTEN:{port},bind={},reuseaddr,fork",
                    to.host.ip
                ))
                .arg(format!("UNIX-CONNECT:{}", connect_outside.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log(to)?),
        )?;
        wait_for_tcp_listener(&to.host, port, Duration::from_secs(10))?;
        let from_socat = ChildGuard::spawn(
            from.host
                .command("socat")
                .args(["-d", "-t", "60"])
                .arg(format!(
                    "UNIX-LISTEN:{},fork,unlink-early,mode=600",
                    listen_outside.display()
                ))
                .arg(format!("TCP:{}:{port}", to.host.ip))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log(from)?),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listen_outside.exists() {
            if Instant::now() > deadline {
                bail!(
                    "socat did not create {} within 10 s",
                    listen_outside.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(UnixBridge {
            listen: listen.to_path_buf(),
            listen_outside,
            from_socat,
            to_socat,
        })
    }
}

impl Drop for UnixBridge {
    fn drop(&mut self) {
        self.from_socat.kill();
        self.to_socat.kill();
        let _ = std::fs::remove_file(&self.listen_outside);
    }
}

/// Waits until something in `host` listens on TCP `port` (read from the namespace's
/// /proc/thread-self/net/tcp, so no probing connection reaches the listener).
fn wait_for_tcp_listener(host: &Host, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let listening = host.run(|| {
            std::fs::read_to_string("/proc/thread-self/net/tcp")
                .map(|t| tcp_listens(&t, port))
                .unwrap_or(false)
        })?;
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on TCP port {port} in {} after {timeout:?}",
                host.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether /proc/net/tcp's `table` has a socket in state LISTEN (0A) on local `port`.
fn tcp_listens(table: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        local.rsplit(':').next() == Some(want.as_str()) && state == "0A"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                     \x20  0: 0202E70A:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
                     \x20  1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(tcp_listens(table, 8001));
        assert!(
            !tcp_listens(table, 80),
            "an established socket is no listener"
        );
        assert!(!tcp_listens(table, 8002));
    }
}
