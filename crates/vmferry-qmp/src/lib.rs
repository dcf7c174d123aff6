//! A small, blocking QMP client over a unix socket.
//!
//! It must never panic on what QEMU sends, never wait without a deadline, and never hold
//! the socket longer than its owner does: QEMU serves one QMP client at a time, so a
//! `Qmp` is dropped as soon as the caller is done. Replies are parsed tolerantly: unknown
//! fields are ignored and unknown enum values (a newer QEMU's migration states) are kept
//! as text, never refused.

#![forbid(unsafe_code)]

mod types;

pub use types::{Event, MigrationInfo, MigrationStatus, RamStats, RunStatus};

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest line accepted from QEMU.
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU did not answer {what} within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed QMP message: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU closed the QMP connection")]
    Closed,
}

/// A connected QMP session (capabilities negotiated).
#[derive(Debug)]
pub struct Qmp {
    sock: UnixStream,
    buf: Vec<u8>,
    events: VecDeque<Event>,
    next_id: u64,
    timeout: Duration,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities. Retries connecting until
    /// `timeout`, since the socket may not exist yet while QEMU starts.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    let retry =
                        matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused);
                    if !retry || Instant::now() >= deadline {
                        return Err(QmpError::Connect {
                            path: path.to_path_buf(),
                            source: e,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut q = Qmp {
            sock,
            buf: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            timeout: timeout.max(Duration::from_secs(1)),
        };
        let greeting = q.read_message(
            deadline.max(Instant::now() + Duration::from_secs(1)),
            "greeting",
        )?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        q.timeout = Duration::from_secs(30);
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Sets how long each command may take to be answered.
    pub fn set_timeout(&mut self, d: Duration) {
        self.timeout = d;
    }

    /// Reads one JSON message by `deadline`.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).map_err(|e| {
                    let shown: String = text.chars().take(200).collect();
                    QmpError::Protocol(format!("not JSON ({e}): {shown}"))
                });
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "a QMP line longer than {MAX_LINE} bytes"
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_string(),
                    after: self.timeout,
                });
            }
            self.sock.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 8192];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(QmpError::Timeout {
                        what: what.to_string(),
                        after: self.timeout,
                    })
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(QmpError::Closed),
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
    }

    /// Runs a command and returns its `return` value. Events that arrive meanwhile are
    /// queued for [`Qmp::take_events`].
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.sock.set_write_timeout(Some(self.timeout))?;
        self.sock.write_all(&line).map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => QmpError::Closed,
            _ => QmpError::Io(e),
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self.read_message(deadline, cmd)?;
            if v.get("event").is_some() {
                if let Some(ev) = Event::from_value(&v) {
                    self.events.push_back(ev);
                }
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: cmd.to_string(),
                    class: e
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string(),
                    desc: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string(),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply to {cmd} has neither return nor error: {v}"
            )));
        }
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits for an event by name (the queue first).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        if let Some(pos) = self.events.iter().position(|e| e.name == name) {
            if let Some(e) = self.events.remove(pos) {
                return Ok(e);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read_message(deadline, name)?;
            if let Some(ev) = Event::from_value(&v) {
                if ev.name == name {
                    return Ok(ev);
                }
                self.events.push_back(ev);
            }
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(cmd: &str, v: Value) -> Result<T, QmpError> {
        serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("reply to {cmd}: {e}")))
    }

    pub fn query_status(&mut self) -> Result<RunStatus, QmpError> {
        let v = self.execute("query-status", None)?;
        Self::parse("query-status", v)
    }

    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(|_| ())
    }

    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(|_| ())
    }

    /// Asks QEMU to exit; QEMU may close the socket before answering, which is success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(|_| ())
    }

    pub fn migrate_set_parameters(&mut self, params: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(params))
            .map(|_| ())
    }

    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(|_| ())
    }

    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(|_| ())
    }

    pub fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).map(|_| ())
    }

    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", None)?;
        Self::parse("query-migrate", v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A hostile or broken QMP server: sends `greeting`, then answers each line with the
    /// next canned reply (or nothing once they run out).
    fn fake_server(replies: Vec<&'static str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n");
            let mut buf = [0u8; 4096];
            for r in replies {
                let Ok(n) = s.read(&mut buf) else { return };
                if n == 0 {
                    return;
                }
                let _ = s.write_all(r.as_bytes());
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        (dir, path)
    }

    #[test]
    fn a_reply_that_is_not_json_is_a_protocol_error() {
        let (_d, p) = fake_server(vec!["{\"return\": {}, \"id\": 1}\r\n", "garbage here\r\n"]);
        let mut q = Qmp::connect(&p, Duration::from_secs(2)).expect("connect");
        let e = q.query_status().expect_err("garbage must fail");
        assert!(matches!(e, QmpError::Protocol(_)), "{e}");
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let (_d, p) = fake_server(vec!["{\"return\": {}, \"id\": 1}\r\n"]);
        let mut q = Qmp::connect(&p, Duration::from_secs(2)).expect("connect");
        q.set_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let e = q.query_status().expect_err("must time out");
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn an_error_reply_carries_qemus_description() {
        let (_d, p) = fake_server(vec![
            "{\"return\": {}, \"id\": 1}\r\n",
            "{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"no way\"}, \"id\": 2}\r\n",
        ]);
        let mut q = Qmp::connect(&p, Duration::from_secs(2)).expect("connect");
        let e = q.execute("nope", None).expect_err("error reply");
        assert!(e.to_string().contains("no way"), "{e}");
        assert_eq!(q.take_events().len(), 1, "the event was queued, not lost");
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_a_protocol_error() {
        let (_d, p) = fake_server(vec![
            "{\"return\": {}, \"id\": 1}\r\n",
            "{\"return\": {\"status\": 42}, \"id\": 2}\r\n",
        ]);
        let mut q = Qmp::connect(&p, Duration::from_secs(2)).expect("connect");
        let e = q.query_status().expect_err("bad shape");
        assert!(matches!(e, QmpError::Protocol(_)), "{e}");
    }
}
