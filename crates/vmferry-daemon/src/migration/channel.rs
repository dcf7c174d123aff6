//! Making a migration's data connections, whichever side dials: the TLS configurations
//! each side uses for its role, dialing one stream with its preamble, and reading the
//! preamble of an accepted one.
//!
//! Both halves of a migration come here, so the trust rules are the same on every
//! transport: pinned per-migration identities (or x509 on request), TLS 1.3, and the
//! migration named in the server name. This module never decides which transport to use
//! and never touches QEMU.

use crate::error::{DaemonError, Result};
use crate::state::Daemon;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;
use vmferry_channel::identity::{EphemeralIdentity, Fingerprint};
use vmferry_channel::{tls, transport};
use vmferry_proto::preamble::{Preamble, PREAMBLE_LEN};
use vmferry_proto::{DataAuth, MigrationId, Transport};

/// How long the TLS handshake of a data connection may take once TCP connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an accepted data connection may take to send its preamble.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The byte that acknowledges an accepted preamble.
const ACK: u8 = 0x06;

/// One authenticated data connection, in either TLS role: its TLS session (whose record
/// layer the pump or the tunnel carries on) and its socket.
#[derive(Debug)]
pub struct DataConn {
    pub conn: vmferry_channel::pump::Session,
    pub sock: TcpStream,
    /// The peer's address, for errors.
    pub peer: String,
}

/// The trust one side of one migration extends to the other.
#[derive(Debug, Clone)]
pub struct Trust {
    pub auth: DataAuth,
    /// The peer's pinned fingerprint (pinned mode).
    pub peer_fingerprint: Option<String>,
}

impl Trust {
    fn peer_fp(&self, role: &str) -> Result<Fingerprint> {
        self.peer_fingerprint
            .as_deref()
            .ok_or_else(|| {
                DaemonError::BadRequest(format!("the cookie carries no {role} fingerprint"))
            })?
            .parse()
            .map_err(|e| DaemonError::BadRequest(format!("{role} fingerprint: {e}")))
    }

    /// Configuration for dialing the peer at `addr`. `role` names the peer in errors
    /// ("source", "destination").
    pub fn client_config(
        &self,
        daemon: &Daemon,
        identity: &EphemeralIdentity,
        addr: &str,
        role: &str,
    ) -> Result<Arc<rustls::ClientConfig>> {
        match &self.auth {
            DataAuth::Pinned => tls::pinned_client_config(identity, self.peer_fp(role)?)
                .map_err(|e| DaemonError::Internal(e.to_string())),
            DataAuth::X509 { tls_hostname } => {
                let creds = daemon.credentials()?;
                // The override names the destination; a source is verified by its address.
                let host = match (tls_hostname, role) {
                    (Some(h), "destination") => h.clone(),
                    _ => host_of(addr),
                };
                vmferry_channel::x509_data::client_config(&creds, &host, &allowed_peers(daemon)?)
                    .map_err(|e| DaemonError::Internal(e.to_string()))
            }
        }
    }

    /// Configuration for accepting the peer's connections. `peer_addr` is where the peer
    /// is reached (x509 mode checks a destination's name even when it is the client).
    pub fn server_config(
        &self,
        daemon: &Daemon,
        identity: &EphemeralIdentity,
        role: &str,
        peer_addr: Option<&str>,
    ) -> Result<Arc<rustls::ServerConfig>> {
        match &self.auth {
            DataAuth::Pinned => tls::pinned_server_config(identity, self.peer_fp(role)?),
            DataAuth::X509 { tls_hostname } => {
                let creds = daemon.credentials()?;
                let name = match (tls_hostname, role, peer_addr) {
                    (Some(h), "destination", _) => Some(h.clone()),
                    (None, "destination", Some(a)) => Some(host_of(a)),
                    _ => None,
                };
                vmferry_channel::x509_data::server_config_expecting(
                    &creds,
                    name.as_deref(),
                    &allowed_peers(daemon)?,
                )
            }
        }
        .map_err(|e| DaemonError::Internal(e.to_string()))
    }
}

/// The daemons this one may exchange a guest with in x509 mode, by certificate subject.
fn allowed_peers(daemon: &Daemon) -> Result<Vec<vmferry_channel::dn::DnPattern>> {
    daemon
        .config
        .allowed_peers
        .iter()
        .map(|p| {
            vmferry_channel::dn::DnPattern::parse(p)
                .map_err(|e| DaemonError::BadRequest(format!("allowed_peers: {e}")))
        })
        .collect()
}

/// Dials one data connection: TCP (at most `timeout`), TLS naming the migration, then
/// the preamble. Errors say which stream, which address and what happened.
pub fn dial(
    id: &MigrationId,
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    preamble: Preamble,
    timeout: Duration,
) -> Result<DataConn> {
    let what = match preamble.transport {
        Transport::Tunnel => "tunnel".to_string(),
        _ => format!("data stream {}", preamble.stream),
    };
    let mut tcp = transport::connect_tcp(addr, timeout)
        .map_err(|e| DaemonError::Channel(format!("{what}: {e}")))?;
    transport::tune_socket(&tcp);
    let mut conn = tls::connect_data(
        &mut tcp,
        &tls::data_sni(id.as_str()),
        config,
        HANDSHAKE_TIMEOUT,
        addr,
    )
    .map_err(|e| DaemonError::Channel(format!("{what}: {e}")))?;
    let _ = tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut s = conn.stream(&mut tcp);
    s.write_all(&preamble.encode())
        .and_then(|_| s.flush())
        .map_err(|e| DaemonError::Channel(format!("{what} to {addr}: {e}")))?;
    // In TLS 1.3 the client finishes its handshake before the server has judged the
    // client's certificate: wait for the peer's acknowledgement, so a refusal (an
    // alert) surfaces here, while another transport can still be tried.
    let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut s = conn.stream(&mut tcp);
    let mut ack = [0u8; 1];
    match s.read_exact(&mut ack) {
        Ok(()) if ack[0] == ACK => {}
        Ok(()) => {
            return Err(DaemonError::Channel(format!(
                "{what}: {addr} answered our preamble with {:#04x}, not an acknowledgement",
                ack[0]
            )))
        }
        Err(e) => {
            return Err(DaemonError::Channel(format!(
                "{what}: {addr} did not accept the connection: {}",
                tls::describe_io(&e, addr)
            )))
        }
    }
    let _ = tcp.set_read_timeout(None);
    let _ = tcp.set_write_timeout(None);
    Ok(DataConn {
        conn,
        sock: tcp,
        peer: addr.to_string(),
    })
}

/// Reads the preamble of an accepted data connection.
pub fn read_preamble(
    mut conn: vmferry_channel::pump::Session,
    mut sock: TcpStream,
) -> Result<(Preamble, DataConn)> {
    let peer = sock
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "peer".into());
    let mut pre = [0u8; PREAMBLE_LEN];
    {
        let _ = sock.set_read_timeout(Some(PREAMBLE_TIMEOUT));
        let mut s = conn.stream(&mut sock);
        s.read_exact(&mut pre)
            .map_err(|e| DaemonError::Channel(format!("{peer} sent no stream preamble: {e}")))?;
        let _ = sock.set_read_timeout(None);
    }
    let pre = Preamble::decode(&pre).map_err(|e| DaemonError::Channel(format!("{peer}: {e}")))?;
    {
        let _ = sock.set_write_timeout(Some(PREAMBLE_TIMEOUT));
        let mut s = conn.stream(&mut sock);
        s.write_all(&[ACK])
            .and_then(|_| s.flush())
            .map_err(|e| DaemonError::Channel(format!("{peer}: cannot acknowledge: {e}")))?;
        let _ = sock.set_write_timeout(None);
    }
    Ok((pre, DataConn { conn, sock, peer }))
}

/// The host part of `host:port` (IPv6 in brackets allowed).
pub(crate) fn host_of(addr: &str) -> String {
    let h = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    h.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// The streams of one migration as they arrive, one slot each; complete when every
/// slot is filled. Streams of another transport replace an incomplete set (an earlier,
/// abandoned attempt).
#[derive(Debug, Default)]
pub struct Slots {
    transport: Option<Transport>,
    slots: Vec<Option<DataConn>>,
}

impl Slots {
    /// Takes stream `k` of `n`. Refuses a second connection for a slot of the same
    /// transport and an index that does not fit.
    pub fn put(
        &mut self,
        transport: Transport,
        pre: &Preamble,
        n: usize,
        c: DataConn,
    ) -> Result<()> {
        let k = usize::from(pre.stream);
        if usize::from(pre.streams) != n || k >= n {
            return Err(DaemonError::Channel(format!(
                "{} claims stream {} of {}, but this migration has {n} streams",
                c.peer, pre.stream, pre.streams
            )));
        }
        if self.transport != Some(transport) {
            self.transport = Some(transport);
            self.slots = (0..n).map(|_| None).collect();
        }
        if self.slots[k].is_some() {
            return Err(DaemonError::Denied(format!(
                "{} tried to open stream {k} a second time; refused",
                c.peer
            )));
        }
        self.slots[k] = Some(c);
        Ok(())
    }

    pub fn complete(&self) -> bool {
        !self.slots.is_empty() && self.slots.iter().all(|s| s.is_some())
    }

    pub fn transport(&self) -> Option<Transport> {
        self.transport
    }

    /// All streams, in order, if complete; leaves the slots empty.
    pub fn take_complete(&mut self) -> Option<(Transport, Vec<DataConn>)> {
        if !self.complete() {
            return None;
        }
        let t = self.transport.take()?;
        let v = std::mem::take(&mut self.slots)
            .into_iter()
            .flatten()
            .collect();
        Some((t, v))
    }

    /// Drops whatever arrived (closing those connections).
    pub fn clear(&mut self) {
        self.transport = None;
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data connection over real loopback TLS (its TLS state is never used here).
    fn conn() -> DataConn {
        let (conn, sock, _, _) = vmferry_channel::testing::tls_pair();
        DataConn {
            conn,
            sock,
            peer: "127.0.0.1:1".into(),
        }
    }

    fn pre(transport: Transport, stream: u16, streams: u16) -> Preamble {
        Preamble {
            transport,
            stream,
            streams,
            kind: vmferry_proto::preamble::StreamKind::Qemu,
        }
    }

    #[test]
    fn each_stream_slot_is_taken_once_and_a_second_claim_is_refused() {
        let mut s = Slots::default();
        s.put(Transport::Direct, &pre(Transport::Direct, 0, 2), 2, conn())
            .expect("first");
        let e = s
            .put(Transport::Direct, &pre(Transport::Direct, 0, 2), 2, conn())
            .expect_err("second claim of stream 0");
        assert!(e.to_string().contains("a second time"), "{e}");
        assert!(!s.complete());
        s.put(Transport::Direct, &pre(Transport::Direct, 1, 2), 2, conn())
            .expect("stream 1");
        let (t, conns) = s.take_complete().expect("complete");
        assert_eq!((t, conns.len()), (Transport::Direct, 2));
    }

    #[test]
    fn a_claim_that_does_not_fit_the_migration_is_refused() {
        let mut s = Slots::default();
        let e = s
            .put(Transport::Direct, &pre(Transport::Direct, 0, 5), 2, conn())
            .expect_err("wrong count");
        assert!(e.to_string().contains("has 2 streams"), "{e}");
    }

    #[test]
    fn streams_of_another_transport_replace_an_abandoned_attempt() {
        let mut s = Slots::default();
        s.put(Transport::Direct, &pre(Transport::Direct, 0, 2), 2, conn())
            .expect("direct");
        s.put(
            Transport::Reverse,
            &pre(Transport::Reverse, 0, 2),
            2,
            conn(),
        )
        .expect("reverse replaces");
        s.put(
            Transport::Reverse,
            &pre(Transport::Reverse, 1, 2),
            2,
            conn(),
        )
        .expect("reverse 1");
        assert_eq!(s.take_complete().map(|(t, _)| t), Some(Transport::Reverse));
    }
}
