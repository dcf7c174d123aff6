//! The controller's side of a control connection: connect (mutual TLS or the local unix
//! socket), say hello, send requests and wait for their answers with a deadline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use vmferry_channel::certs::HostCredentials;
use vmferry_channel::framed::{self, FrameError, MAX_FRAME};
use vmferry_channel::{tls, transport};
use vmferry_proto::{Hello, Request, RequestBody, Response, ResponseBody, WireError};

/// How a client proves who it is to daemons.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// A certificate from the operator's CA (mutual x509).
    pub creds: Option<HostCredentials>,
    /// Without a certificate: a dir holding the CA's `ca.pem`, to verify daemons.
    pub ca_dir: Option<PathBuf>,
    /// A password login (SCRAM-SHA-256), for daemons that ask for one.
    pub login: Option<Login>,
}

#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where a daemon's control API is: `host:port` (TLS) or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlTarget {
    Tcp(String),
    Unix(PathBuf),
}

/// A daemon address that is neither `host:port` nor a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("daemon address {0:?} needs a port (host:port) or a unix socket path")]
pub struct BadControlTarget(pub String);

impl std::str::FromStr for ControlTarget {
    type Err = BadControlTarget;
    fn from_str(s: &str) -> Result<Self, BadControlTarget> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(ControlTarget::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(ControlTarget::Unix(PathBuf::from(s)));
        }
        if !s.contains(':') {
            return Err(BadControlTarget(s.to_string()));
        }
        Ok(ControlTarget::Tcp(s.to_string()))
    }
}

impl std::fmt::Display for ControlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlTarget::Tcp(a) => f.write_str(a),
            ControlTarget::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Connect(String),
    #[error("{peer}: {source}")]
    Remote {
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("{peer} did not answer within {secs} s")]
    Timeout { peer: String, secs: u64 },
    #[error("{peer}: {msg}")]
    Protocol { peer: String, msg: String },
}

trait Conn: Read + Write + Send {
    fn set_timeout(&mut self, t: Option<Duration>);
    /// Ends the session cleanly (TLS close_notify), so the daemon can tell a finished
    /// session from a cut one.
    fn close(&mut self);
}

impl Conn for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_timeout(&mut self, t: Option<Duration>) {
        let _ = self.sock.set_read_timeout(t);
        let _ = self.sock.set_write_timeout(t);
    }
    fn close(&mut self) {
        self.set_timeout(Some(Duration::from_secs(1)));
        self.conn.send_close_notify();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.sock).is_err() {
                break;
            }
        }
    }
}

impl Conn for UnixStream {
    fn set_timeout(&mut self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
        let _ = self.set_write_timeout(t);
    }
    fn close(&mut self) {}
}

/// A connected, greeted control session.
pub struct ControlClient {
    conn: Box<dyn Conn>,
    peer: String,
    next_id: u64,
    /// What the daemon said of itself in its hello.
    pub daemon_agent: String,
    /// Who the daemon takes us to be, with our role.
    pub identity: Option<String>,
    /// The control protocol version the session speaks (the daemon's answer).
    version: u32,
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.conn.close();
    }
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("peer", &self.peer)
            .finish()
    }
}

/// How long connecting (TCP + TLS + hello) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl ControlClient {
    /// Connects to a daemon. TCP needs credentials (the controller's certificate);
    /// `tls_hostname` overrides the name the daemon's certificate must carry.
    pub fn connect(
        target: &ControlTarget,
        creds: Option<&HostCredentials>,
        tls_hostname: Option<&str>,
    ) -> Result<ControlClient, ClientError> {
        let auth = ClientAuth {
            creds: creds.cloned(),
            ..Default::default()
        };
        Self::connect_with(target, &auth, tls_hostname)
    }

    /// Connects and authenticates: by certificate (TLS), by unix credentials, or by
    /// password when the daemon asks for one and `auth` has a login.
    pub fn connect_with(
        target: &ControlTarget,
        auth: &ClientAuth,
        tls_hostname: Option<&str>,
    ) -> Result<ControlClient, ClientError> {
        let peer = target.to_string();
        let conn: Box<dyn Conn> = match target {
            ControlTarget::Unix(path) => Box::new(UnixStream::connect(path).map_err(|e| {
                ClientError::Connect(format!(
                    "cannot reach the daemon's control socket {}: {e}",
                    path.display()
                ))
            })?),
            ControlTarget::Tcp(addr) => {
                let cfg = match (&auth.creds, &auth.ca_dir) {
                    (Some(creds), _) => tls::control_client_config(creds),
                    (None, Some(ca)) => tls::control_client_config_anonymous(ca),
                    (None, None) => {
                        return Err(ClientError::Connect(format!(
                            "connecting to {addr} needs --certs DIR (a certificate from the \
                             daemons' CA, or just its ca.pem together with --user)"
                        )))
                    }
                }
                .map_err(|e| ClientError::Connect(e.to_string()))?;
                let tcp = transport::connect_tcp(addr, CONNECT_TIMEOUT)
                    .map_err(|e| ClientError::Connect(e.to_string()))?;
                let name = match tls_hostname {
                    Some(n) => n.to_string(),
                    None => crate::migration::channel::host_of(addr),
                };
                Box::new(
                    tls::connect(tcp, &name, cfg, CONNECT_TIMEOUT, addr)
                        .map_err(|e| ClientError::Connect(e.to_string()))?,
                )
            }
        };
        let mut c = ControlClient {
            conn,
            peer,
            next_id: 1,
            daemon_agent: String::new(),
            identity: None,
            version: vmferry_proto::PROTOCOL_VERSION,
        };
        c.conn.set_timeout(Some(CONNECT_TIMEOUT));
        let hello = Hello::client(format!(
            "vmferry {} (controller)",
            env!("CARGO_PKG_VERSION")
        ));
        // A daemon that refuses us may answer and close before our hello is
        // written; its answer says why, so read it even when the write failed.
        let written = framed::write_json(&mut c.conn, &hello);
        // The daemon answers a hello with its own, or with an error response.
        let v: serde_json::Value = match framed::read_json(&mut c.conn, MAX_FRAME) {
            Ok(v) => v,
            Err(e) => return Err(c.frame_error(written.err().unwrap_or(e))),
        }
        .ok_or_else(|| ClientError::Protocol {
            peer: c.peer.clone(),
            msg: "closed the connection after our hello".into(),
        })?;
        if let Ok(Response {
            body: ResponseBody::Error { error },
            ..
        }) = serde_json::from_value::<Response>(v.clone())
        {
            return Err(ClientError::Remote {
                peer: c.peer.clone(),
                source: error,
            });
        }
        let theirs: Hello = serde_json::from_value(v).map_err(|e| ClientError::Protocol {
            peer: c.peer.clone(),
            msg: format!("bad hello: {e}"),
        })?;
        c.version =
            vmferry_proto::negotiate_version(theirs.version, &theirs.agent).map_err(|e| {
                ClientError::Protocol {
                    peer: c.peer.clone(),
                    msg: e.to_string(),
                }
            })?;
        c.daemon_agent = theirs.agent;
        c.identity = theirs.identity;
        if c.identity.is_none() {
            let scram = "scram-sha-256";
            match &auth.login {
                Some(login) if theirs.auth.iter().any(|a| a == scram) => c.login(login)?,
                Some(_) => {
                    return Err(ClientError::Protocol {
                        peer: c.peer.clone(),
                        msg: format!(
                            "the daemon offers no password login (it accepts {:?})",
                            theirs.auth
                        ),
                    })
                }
                None if !theirs.auth.is_empty() => {
                    return Err(ClientError::Connect(format!(
                        "{} asks for a login ({}): give --user NAME, with the password in \
                         VMFERRY_PASSWORD or --password-file",
                        c.peer,
                        theirs.auth.join(", ")
                    )))
                }
                None => {}
            }
        }
        Ok(c)
    }

    /// SCRAM-SHA-256 with the daemon; on success the session is authenticated.
    fn login(&mut self, login: &Login) -> Result<(), ClientError> {
        let peer = self.peer.clone();
        let proto = |msg: String| ClientError::Protocol {
            peer: peer.clone(),
            msg,
        };
        let client = scram_2::ScramClient::new(&login.user, &login.password, None);
        let (client, first) = client.client_first();
        let server_first = match self.call(
            RequestBody::Auth {
                scheme: "scram-sha-256".into(),
                message: first,
            },
            CONNECT_TIMEOUT,
        )? {
            ResponseBody::Auth { message, .. } => message,
            other => return Err(proto(format!("unexpected answer to a login: {other:?}"))),
        };
        let client = client
            .handle_server_first(&server_first)
            .map_err(|e| proto(format!("bad login message from the daemon: {e}")))?;
        let (client, last) = client.client_final();
        let (server_final, identity) = match self.call(
            RequestBody::Auth {
                scheme: "scram-sha-256".into(),
                message: last,
            },
            CONNECT_TIMEOUT,
        )? {
            ResponseBody::Auth { message, identity } => (message, identity),
            other => return Err(proto(format!("unexpected answer to a login: {other:?}"))),
        };
        // The daemon proves it knows the verifier too: a fake daemon fails here.
        client.handle_server_final(&server_final).map_err(|e| {
            proto(format!(
                "the daemon could not prove it knows our password's verifier ({e}): \
                 is it really the daemon we meant?"
            ))
        })?;
        self.identity = identity;
        Ok(())
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn frame_error(&self, e: FrameError) -> ClientError {
        match e {
            FrameError::Timeout => ClientError::Timeout {
                peer: self.peer.clone(),
                secs: 0,
            },
            // A TLS alert after the handshake (TLS 1.3 judges client certificates then):
            // word it for an operator.
            FrameError::Io(e) if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => {
                ClientError::Connect(tls::describe_io(&e, &self.peer))
            }
            other => ClientError::Protocol {
                peer: self.peer.clone(),
                msg: other.to_string(),
            },
        }
    }

    /// Sends one request and waits up to `timeout` for its answer. An error reply comes
    /// back as [`ClientError::Remote`].
    /// The control protocol version this session speaks.
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn call(
        &mut self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ResponseBody, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.conn.set_timeout(Some(timeout));
        framed::write_json(&mut self.conn, &Request { id, body })
            .map_err(|e| self.frame_error(e))?;
        // An answer to an earlier request that timed out may still arrive first: skip it.
        let resp: Response = match self.read_answer(id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(ClientError::Protocol {
                    peer: self.peer.clone(),
                    msg: "the daemon closed the connection".into(),
                })
            }
            Err(FrameError::Timeout) => {
                return Err(ClientError::Timeout {
                    peer: self.peer.clone(),
                    secs: timeout.as_secs(),
                })
            }
            Err(e) => return Err(self.frame_error(e)),
        };
        if let ResponseBody::Error { error } = resp.body {
            return Err(ClientError::Remote {
                peer: self.peer.clone(),
                source: error,
            });
        }
        if resp.id != id {
            return Err(ClientError::Protocol {
                peer: self.peer.clone(),
                msg: format!("answered request {} while we asked {id}", resp.id),
            });
        }
        Ok(resp.body)
    }

    /// The next response that is not a late answer to an earlier request.
    fn read_answer(&mut self, id: u64) -> Result<Option<Response>, FrameError> {
        loop {
            match framed::read_json::<_, Response>(&mut self.conn, MAX_FRAME)? {
                // An error is never skipped: a daemon may answer a refusal under the id
                // of the exchange's first request (SCRAM does).
                Some(r)
                    if r.id != 0 && r.id < id && !matches!(r.body, ResponseBody::Error { .. }) =>
                {
                    tracing::debug!(
                        "{}: skipping the late answer to request {}",
                        self.peer,
                        r.id
                    )
                }
                other => return Ok(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_targets_parse_addresses_and_socket_paths() {
        assert_eq!(
            "127.0.0.1:4700".parse::<ControlTarget>(),
            Ok(ControlTarget::Tcp("127.0.0.1:4700".into()))
        );
        assert_eq!(
            "/run/vmferry/control.sock".parse::<ControlTarget>(),
            Ok(ControlTarget::Unix("/run/vmferry/control.sock".into()))
        );
        assert!("hostonly".parse::<ControlTarget>().is_err());
    }
}
