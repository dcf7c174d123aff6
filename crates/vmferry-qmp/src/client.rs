//! The QMP session: framing, deadlines, command/reply matching and the event queue.

use crate::error::QmpError;
use crate::types::{Event, MigrationInfo, QemuVersion, RunStatus};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a command waits for its reply unless [`Qmp::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest message (one line) accepted from QEMU. The largest real reply,
/// `query-qmp-schema`, is well under 1 MiB; anything near this is a broken or hostile peer,
/// which must not make us buffer without bound.
pub const MAX_MESSAGE_LEN: usize = 16 << 20;

/// Events kept for [`Qmp::take_events`] before the oldest are dropped, so a caller that
/// never looks at events cannot make the queue grow without bound.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// The least time the greeting and capabilities negotiation get after connecting, even
/// if the socket appeared just before the connect timeout ran out.
const MIN_HANDSHAKE: Duration = Duration::from_secs(1);

const READ_CHUNK: usize = 64 << 10;
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// A connected QMP session (greeting read, capabilities negotiated).
///
/// QEMU serves one QMP client at a time: while a `Qmp` exists, nobody else can talk to
/// that QEMU. Drop it as soon as you are done.
#[derive(Debug)]
pub struct Qmp {
    /// The connection. Never cloned, so dropping `Qmp` closes it and frees QEMU's monitor.
    sock: UnixStream,
    /// Bytes read but not yet handed out: the start of the next line(s).
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline, so a long line is scanned once
    /// rather than once per read.
    scanned: usize,
    /// Events that arrived while waiting for something else, oldest first.
    events: VecDeque<Event>,
    /// The id of the next command. A reply with another id answers an earlier command
    /// that timed out, and is skipped.
    next_id: u64,
    /// How long each command waits for its reply.
    timeout: Duration,
    /// Why the session can no longer be used, once the stream cannot be trusted to be in
    /// step (half a command written, a line too long to frame). Every later call fails
    /// with this instead of misreading what follows.
    broken: Option<String>,
    /// The QEMU version from the greeting, if it announced one.
    version: Option<QemuVersion>,
}

/// When a wait ends, and how long it was allowed (for the error message).
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    allowed: Duration,
}

impl Deadline {
    fn after(d: Duration) -> Self {
        let now = Instant::now();
        Deadline {
            at: now
                .checked_add(d)
                .unwrap_or(now + Duration::from_secs(86400 * 365)),
            allowed: d,
        }
    }

    fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    fn expired(&self, what: &str) -> QmpError {
        QmpError::Timeout {
            what: what.to_string(),
            after: self.allowed,
        }
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path`, reads the greeting (it must carry "QMP")
    /// and negotiates capabilities.
    ///
    /// Connecting is retried until `timeout`: while QEMU starts, the socket may not exist
    /// yet or may not accept yet. The handshake must finish within the same `timeout`,
    /// but gets at least 1 s after connecting. A QEMU that already serves another client
    /// accepts the connection but never greets: that ends in [`QmpError::Timeout`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Deadline::after(timeout);
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if retryable(&e) && !deadline.left().is_zero() => {
                    std::thread::sleep(CONNECT_RETRY.min(deadline.left()));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let handshake = if deadline.left() >= MIN_HANDSHAKE {
            deadline
        } else {
            Deadline::after(MIN_HANDSHAKE)
        };
        Self::handshake(sock, handshake)
    }

    /// Runs the handshake on an already connected socket (e.g. one handed over by the
    /// process that started QEMU), within `timeout`.
    pub fn from_stream(sock: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        Self::handshake(sock, Deadline::after(timeout))
    }

    fn handshake(sock: UnixStream, deadline: Deadline) -> Result<Qmp, QmpError> {
        let mut q = Qmp {
            sock,
            buf: Vec::new(),
            scanned: 0,
            events: VecDeque::new(),
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
            broken: None,
            version: None,
        };
        let greeting = q.read_message(
            &deadline,
            "QMP greeting (QEMU serves one client at a time: is another connected?)",
        )?;
        if !greeting.contains_key("QMP") {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {}",
                preview(Value::Object(greeting).to_string().as_bytes())
            )));
        }
        q.version = QemuVersion::from_greeting(&greeting);
        tracing::debug!(version = ?q.version, "QMP greeting");
        q.execute_by("qmp_capabilities", None, &deadline)?;
        Ok(q)
    }

    /// Sets how long each later command waits for its reply (default 30 s).
    pub fn set_timeout(&mut self, d: Duration) {
        self.timeout = d;
    }

    /// The per-command reply timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The QEMU version the greeting announced.
    pub fn version(&self) -> Option<&QemuVersion> {
        self.version.as_ref()
    }

    /// Sends `{"execute": cmd, "arguments": args, "id": n}` and returns the reply's
    /// `return` value. Events arriving meanwhile are queued for [`Qmp::take_events`];
    /// replies with another id (to an earlier command that timed out) are skipped.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let deadline = Deadline::after(self.timeout);
        self.execute_by(cmd, args, &deadline)
    }

    fn execute_by(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        deadline: &Deadline,
    ) -> Result<Value, QmpError> {
        self.usable()?;
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::from(cmd));
        if let Some(a) = args {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = Value::Object(msg).to_string().into_bytes();
        line.push(b'\n');
        tracing::debug!(command = cmd, id, "QMP command");
        let what = format!("reply to {cmd}");
        self.send(&line, deadline, &what)?;
        loop {
            let mut m = self.read_message(deadline, &what)?;
            if m.contains_key("event") {
                self.queue_event(&m)?;
                continue;
            }
            match m.get("id") {
                Some(v) if v.as_u64() == Some(id) => {}
                // QEMU leaves the id out only when it could not read the request's id;
                // the one request in flight is ours.
                None => {}
                Some(other) => {
                    tracing::debug!(id = %other, "skipping a reply to an earlier command");
                    continue;
                }
            }
            if let Some(r) = m.remove("return") {
                return Ok(r);
            }
            if let Some(e) = m.get("error") {
                let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
                return Err(QmpError::Command {
                    command: cmd.to_string(),
                    class: text("class").unwrap_or_else(|| "(no class)".into()),
                    desc: text("desc").unwrap_or_else(|| e.to_string()),
                });
            }
            return Err(QmpError::Protocol(format!(
                "the reply to {cmd} has neither \"return\" nor \"error\": {}",
                preview(Value::Object(m).to_string().as_bytes())
            )));
        }
    }

    /// Hands out the events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits up to `timeout` for an event called `name`, looking in the queue first.
    /// Other events arriving meanwhile are queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        self.wait_event_matching(&format!("event {name}"), timeout, |e| e.name == name)
    }

    /// Waits up to `timeout` for an event `accept` takes, looking in the queue first
    /// (e.g. a `MIGRATION` event whose status is "completed"). `what` names it in a
    /// timeout error. Other events arriving meanwhile are queued.
    pub fn wait_event_matching(
        &mut self,
        what: &str,
        timeout: Duration,
        mut accept: impl FnMut(&Event) -> bool,
    ) -> Result<Event, QmpError> {
        if let Some(pos) = self.events.iter().position(&mut accept) {
            if let Some(e) = self.events.remove(pos) {
                return Ok(e);
            }
        }
        self.usable()?;
        let deadline = Deadline::after(timeout);
        loop {
            let m = self.read_message(&deadline, what)?;
            if !m.contains_key("event") {
                tracing::debug!("skipping a reply to an earlier command");
                continue;
            }
            let ev = parse_event(&m)?;
            if accept(&ev) {
                return Ok(ev);
            }
            self.push_event(ev);
        }
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<RunStatus, QmpError> {
        let v = self.execute("query-status", None)?;
        typed("query-status", v)
    }

    /// Pauses the guest's CPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes (or first starts) the guest's CPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// Asks QEMU to exit. QEMU may close the socket before its reply arrives, which
    /// counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `migrate-set-capabilities` with (capability, state) pairs, e.g. `("multifd", true)`.
    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// `migrate-set-parameters` with QEMU's own names, e.g.
    /// `json!({"max-bandwidth": 1 << 30, "downtime-limit": 300})`.
    pub fn migrate_set_parameters(&mut self, params: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(params))
            .map(drop)
    }

    /// `query-migrate-parameters`, untyped (its set of fields changes every release).
    pub fn query_migrate_parameters(&mut self) -> Result<Value, QmpError> {
        self.execute("query-migrate-parameters", None)
    }

    /// Starts an outgoing migration to `uri` (e.g. "unix:/run/x.sock"); returns at once,
    /// follow it with [`Qmp::query_migrate`] or `MIGRATION` events.
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Makes a QEMU started with `-incoming defer` listen on `uri`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Cancels the outgoing migration (the status passes through "cancelling").
    pub fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", None)?;
        typed("query-migrate", v)
    }

    fn usable(&self) -> Result<(), QmpError> {
        match &self.broken {
            Some(why) => Err(QmpError::Protocol(format!(
                "the session is unusable since {why}"
            ))),
            None => Ok(()),
        }
    }

    fn queue_event(&mut self, m: &Map<String, Value>) -> Result<(), QmpError> {
        let ev = parse_event(m)?;
        self.push_event(ev);
        Ok(())
    }

    fn push_event(&mut self, ev: Event) {
        tracing::debug!(event = %ev.name, "QMP event queued");
        if self.events.len() >= MAX_QUEUED_EVENTS {
            if let Some(old) = self.events.pop_front() {
                tracing::warn!(event = %old.name, "QMP event queue full: dropping the oldest");
            }
        }
        self.events.push_back(ev);
    }

    /// Writes one whole command by `deadline`. Half a command on the wire would make
    /// QEMU misread the next one, so a partial write breaks the session.
    fn send(&mut self, mut data: &[u8], deadline: &Deadline, what: &str) -> Result<(), QmpError> {
        let mut sent_any = false;
        while !data.is_empty() {
            let left = deadline.left();
            let err = if left.is_zero() {
                Some(deadline.expired(what))
            } else {
                self.sock.set_write_timeout(Some(left))?;
                match self.sock.write(data) {
                    Ok(0) => Some(QmpError::Closed),
                    Ok(n) => {
                        data = &data[n..];
                        sent_any = true;
                        None
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => None,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        None // the deadline check above ends it
                    }
                    Err(e) if closed(&e) => Some(QmpError::Closed),
                    Err(e) => Some(QmpError::Io(e)),
                }
            };
            if let Some(e) = err {
                if sent_any {
                    self.broken = Some("a command was only partly written".into());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads the next message (one JSON object on one line) by `deadline`.
    fn read_message(
        &mut self,
        deadline: &Deadline,
        what: &str,
    ) -> Result<Map<String, Value>, QmpError> {
        loop {
            self.usable()?;
            if let Some(off) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + off;
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return match serde_json::from_slice::<Value>(text) {
                    Ok(Value::Object(m)) => Ok(m),
                    Ok(_) => Err(QmpError::Protocol(format!(
                        "a message that is not a JSON object: {}",
                        preview(text)
                    ))),
                    Err(e) => Err(QmpError::Protocol(format!(
                        "a message that is not JSON ({e}): {}",
                        preview(text)
                    ))),
                };
            }
            self.scanned = self.buf.len();
            // Invariant: buf.len() <= MAX_MESSAGE_LEN + 1, since reads are capped below.
            if self.buf.len() > MAX_MESSAGE_LEN {
                self.buf = Vec::new();
                self.scanned = 0;
                let why = format!("QEMU sent a message longer than {MAX_MESSAGE_LEN} bytes");
                self.broken = Some(why.clone());
                return Err(QmpError::Protocol(why));
            }
            let left = deadline.left();
            if left.is_zero() {
                return Err(deadline.expired(what));
            }
            self.sock.set_read_timeout(Some(left))?;
            let room = READ_CHUNK.min(MAX_MESSAGE_LEN + 1 - self.buf.len());
            let old = self.buf.len();
            self.buf.resize(old + room, 0);
            let got = self.sock.read(&mut self.buf[old..]);
            self.buf.truncate(old + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) => {}
                // A timeout or a signal: the deadline check above decides.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) if closed(&e) => return Err(QmpError::Closed),
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
    }
}

/// Whether connecting again may succeed: QEMU has not created or not yet listens on its
/// socket, or its backlog is full.
fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound
            | ErrorKind::ConnectionRefused
            | ErrorKind::WouldBlock
            | ErrorKind::Interrupted
    )
}

fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

fn parse_event(m: &Map<String, Value>) -> Result<Event, QmpError> {
    Event::from_message(m).ok_or_else(|| {
        QmpError::Protocol(format!(
            "an event whose name is not text: {}",
            preview(Value::Object(m.clone()).to_string().as_bytes())
        ))
    })
}

fn typed<T: serde::de::DeserializeOwned>(cmd: &str, v: Value) -> Result<T, QmpError> {
    serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("the reply to {cmd}: {e}")))
}

/// The start of what QEMU sent, for an error message.
fn preview(bytes: &[u8]) -> String {
    const SHOWN: usize = 200;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN * 4)]);
    let mut s: String = text.chars().take(SHOWN).collect();
    if s.len() < bytes.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

    /// A fake QEMU: one connection, handled by `script`. It plays broken and hostile
    /// servers; the socket lives in a temp dir that the test holds.
    fn serve(
        script: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).expect("bind");
        let h = std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                // Never let a fake server outlive a failed test for long.
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                script(s)
            }
        });
        (dir, path, h)
    }

    /// Greets, answers qmp_capabilities, then hands over the reader for the commands.
    fn handshake(s: UnixStream) -> (BufReader<UnixStream>, UnixStream) {
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        w.write_all(GREETING.as_bytes()).expect("greet");
        let cmd = next_command(&mut r).expect("qmp_capabilities");
        assert_eq!(cmd["execute"], "qmp_capabilities");
        reply(
            &mut w,
            &format!("{{\"return\": {{}}, \"id\": {}}}", cmd["id"]),
        );
        (r, w)
    }

    fn next_command(r: &mut BufReader<UnixStream>) -> Option<Value> {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
            _ => None,
        }
    }

    fn reply(w: &mut UnixStream, line: &str) {
        let _ = w.write_all(format!("{line}\r\n").as_bytes());
    }

    /// A server that greets, then answers each command with `answer(command)`.
    fn answering(
        answer: impl Fn(&Value) -> String + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        serve(move |s| {
            let (mut r, mut w) = handshake(s);
            while let Some(cmd) = next_command(&mut r) {
                let text = answer(&cmd);
                let _ = w.write_all(text.as_bytes());
            }
        })
    }

    fn connect(p: &Path) -> Qmp {
        Qmp::connect(p, Duration::from_secs(5)).expect("connect")
    }

    #[test]
    fn connects_reads_the_version_and_negotiates_capabilities_first() {
        let (_d, p, h) = answering(|c| format!("{{\"return\": {{}}, \"id\": {}}}\r\n", c["id"]));
        let q = connect(&p);
        assert_eq!(q.version().map(|v| (v.major, v.minor)), Some((7, 2)));
        assert_eq!(q.timeout(), DEFAULT_TIMEOUT);
        drop(q);
        h.join().expect("the server saw qmp_capabilities first");
    }

    #[test]
    fn retries_connecting_until_the_socket_appears() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("late.sock");
        let p2 = path.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let l = UnixListener::bind(&p2).expect("bind");
            let (s, _) = l.accept().expect("accept");
            let (mut r, _w) = handshake(s);
            let _ = next_command(&mut r);
        });
        let q = Qmp::connect(&path, Duration::from_secs(5)).expect("connects once it exists");
        drop(q);
        h.join().expect("server");
    }

    #[test]
    fn gives_a_connect_error_once_the_timeout_passes_without_a_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let t = Instant::now();
        let e = Qmp::connect(&dir.path().join("never.sock"), Duration::from_millis(200))
            .expect_err("nothing listens");
        assert!(matches!(e, QmpError::Connect { .. }), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(200), "it retried");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_server_that_never_greets_times_out_instead_of_hanging() {
        let (_d, p, _h) = serve(|s| {
            std::thread::sleep(Duration::from_secs(3));
            drop(s)
        });
        let t = Instant::now();
        let e = Qmp::connect(&p, Duration::from_millis(1500)).expect_err("no greeting");
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("greeting"), "{e}");
        assert!(t.elapsed() < Duration::from_millis(2500));
    }

    #[test]
    fn a_greeting_without_qmp_is_a_protocol_error() {
        let (_d, p, _h) = serve(|mut s| {
            let _ = s.write_all(b"{\"hello\": \"world\"}\r\n");
            std::thread::sleep(Duration::from_secs(1));
        });
        let e = Qmp::connect(&p, Duration::from_secs(2)).expect_err("not QMP");
        assert!(matches!(e, QmpError::Protocol(_)), "{e}");
        assert!(e.to_string().contains("greeting"), "{e}");
    }

    fn protocol_error_for(bad_reply: &'static [u8]) -> String {
        let (_d, p, _h) = serve(move |s| {
            let (mut r, mut w) = handshake(s);
            while next_command(&mut r).is_some() {
                let _ = w.write_all(bad_reply);
            }
        });
        let mut q = connect(&p);
        match q.query_status() {
            Err(QmpError::Protocol(why)) => why,
            other => panic!(
                "expected a protocol error for {:?}, got {other:?}",
                String::from_utf8_lossy(bad_reply)
            ),
        }
    }

    #[test]
    fn a_reply_that_is_not_json_is_a_protocol_error() {
        let why = protocol_error_for(b"garbage here\r\n");
        assert!(why.contains("not JSON") && why.contains("garbage"), "{why}");
    }

    #[test]
    fn a_reply_that_is_not_a_json_object_is_a_protocol_error() {
        let why = protocol_error_for(b"[1, 2, 3]\r\n");
        assert!(why.contains("not a JSON object"), "{why}");
    }

    #[test]
    fn a_reply_with_neither_return_nor_error_is_a_protocol_error() {
        let why = protocol_error_for(b"{\"id\": 2, \"result\": {}}\r\n");
        assert!(
            why.contains("neither") && why.contains("query-status"),
            "{why}"
        );
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_a_protocol_error() {
        let why = protocol_error_for(b"{\"return\": {\"status\": 42}, \"id\": 2}\r\n");
        assert!(why.contains("query-status"), "{why}");
    }

    #[test]
    fn invalid_utf8_is_a_protocol_error() {
        let why = protocol_error_for(b"{\"return\": \"\xff\xfe\", \"id\": 2}\r\n");
        assert!(why.contains("not JSON"), "{why}");
    }

    #[test]
    fn an_oversized_message_is_refused_without_reading_it_all_and_breaks_the_session() {
        let (sent_tx, sent_rx) = std::sync::mpsc::channel();
        let (_d, p, _h) = serve(move |s| {
            let (mut r, mut w) = handshake(s);
            let _ = next_command(&mut r);
            let chunk = vec![b'x'; 1 << 20];
            // 64 MiB without a newline: the client must stop reading after 16.
            let mut sent = 0;
            while sent < 64 && w.write_all(&chunk).is_ok() {
                sent += 1;
            }
            let _ = sent_tx.send(sent);
        });
        let mut q = connect(&p);
        let e = q.query_status().expect_err("oversized");
        assert!(
            matches!(&e, QmpError::Protocol(why) if why.contains("longer than")),
            "{e}"
        );
        let e = q.query_status().expect_err("the session is broken");
        assert!(
            matches!(&e, QmpError::Protocol(why) if why.contains("unusable")),
            "{e}"
        );
        drop(q);
        let sent = sent_rx.recv().expect("the server counted");
        // 16 MiB read, plus what the socket buffers hold.
        assert!(sent <= 20, "the client kept reading: {sent} MiB");
    }

    #[test]
    fn a_server_that_never_answers_times_out_within_the_configured_time() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, _w) = handshake(s);
            while next_command(&mut r).is_some() {}
        });
        let mut q = connect(&p);
        q.set_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let e = q.query_status().expect_err("must time out");
        assert!(
            matches!(&e, QmpError::Timeout { after, .. } if *after == Duration::from_millis(300)),
            "{e}"
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_trickle_of_bytes_does_not_extend_the_deadline() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let _ = next_command(&mut r);
            for _ in 0..100 {
                if w.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut q = connect(&p);
        q.set_timeout(Duration::from_millis(400));
        let t = Instant::now();
        let e = q.query_status().expect_err("must time out");
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn an_error_reply_carries_qemus_class_and_description() {
        let (_d, p, _h) = answering(|c| {
            format!(
                "{{\"id\": {}, \"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}}}\r\n",
                c["id"]
            )
        });
        let mut q = connect(&p);
        match q.execute("nope", None) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command nope has not been found");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
    }

    #[test]
    fn events_that_arrive_before_a_reply_are_queued_not_lost() {
        let (_d, p, _h) = answering(|c| {
            format!(
                "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"STOP\"}}\r\n\
                 {{\"event\": \"MIGRATION\", \"data\": {{\"status\": \"setup\"}}}}\r\n\
                 {{\"return\": {{}}, \"id\": {}}}\r\n",
                c["id"]
            )
        });
        let mut q = connect(&p);
        q.stop().expect("stop");
        let events = q.take_events();
        let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["STOP", "MIGRATION"]);
        assert_eq!(events[0].timestamp, (1, 2));
        assert_eq!(events[1].data["status"], "setup");
        assert!(q.take_events().is_empty(), "taken once");
    }

    #[test]
    fn replies_to_other_ids_are_skipped() {
        let (_d, p, _h) = answering(|c| {
            format!(
                "{{\"return\": {{\"status\": \"stale\", \"running\": true}}, \"id\": 999}}\r\n\
                 {{\"return\": {{\"status\": \"prelaunch\", \"running\": false, \"singlestep\": false}}, \"id\": {}}}\r\n",
                c["id"]
            )
        });
        let mut q = connect(&p);
        let st = q.query_status().expect("status");
        assert_eq!(st.status, "prelaunch");
        assert!(!st.running);
    }

    #[test]
    fn a_late_reply_to_a_timed_out_command_is_not_taken_for_the_next_ones() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let first = next_command(&mut r).expect("first");
            std::thread::sleep(Duration::from_millis(500));
            reply(
                &mut w,
                &format!(
                    "{{\"return\": {{\"status\": \"late\", \"running\": false}}, \"id\": {}}}",
                    first["id"]
                ),
            );
            let second = next_command(&mut r).expect("second");
            reply(
                &mut w,
                &format!(
                    "{{\"return\": {{\"status\": \"running\", \"running\": true}}, \"id\": {}}}",
                    second["id"]
                ),
            );
            let _ = next_command(&mut r);
        });
        let mut q = connect(&p);
        q.set_timeout(Duration::from_millis(200));
        assert!(matches!(q.query_status(), Err(QmpError::Timeout { .. })));
        q.set_timeout(Duration::from_secs(5));
        assert_eq!(q.query_status().expect("status").status, "running");
    }

    #[test]
    fn sends_commands_with_execute_arguments_and_id() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (_d, p, _h) = answering(move |c| {
            let _ = tx.send(c.clone());
            format!("{{\"return\": {{}}, \"id\": {}}}\r\n", c["id"])
        });
        let mut q = connect(&p);
        q.migrate_set_capabilities(&[("events", true), ("multifd", false)])
            .expect("caps");
        q.migrate("unix:/x.sock").expect("migrate");
        q.stop().expect("stop");
        let caps = rx.recv().expect("first command");
        assert_eq!(
            caps,
            json!({"execute": "migrate-set-capabilities", "id": 2, "arguments": {"capabilities": [
                {"capability": "events", "state": true}, {"capability": "multifd", "state": false}]}})
        );
        let mig = rx.recv().expect("second command");
        assert_eq!(mig["arguments"], json!({"uri": "unix:/x.sock"}));
        assert_eq!(mig["id"], 3);
        let stop = rx.recv().expect("third command");
        assert_eq!(
            stop,
            json!({"execute": "stop", "id": 4}),
            "no arguments key"
        );
    }

    #[test]
    fn wait_event_looks_in_the_queue_first_then_at_the_socket() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let c = next_command(&mut r).expect("cont");
            reply(&mut w, "{\"event\": \"RESUME\"}");
            reply(
                &mut w,
                &format!("{{\"return\": {{}}, \"id\": {}}}", c["id"]),
            );
            std::thread::sleep(Duration::from_millis(100));
            reply(&mut w, "{\"event\": \"BALLOON_CHANGE\", \"data\": {}}");
            reply(&mut w, "{\"event\": \"STOP\"}");
            let _ = next_command(&mut r);
        });
        let mut q = connect(&p);
        q.cont().expect("cont");
        let t = Instant::now();
        assert_eq!(
            q.wait_event("RESUME", Duration::ZERO).expect("queued").name,
            "RESUME"
        );
        assert!(t.elapsed() < Duration::from_millis(50));
        let e = q
            .wait_event("STOP", Duration::from_secs(5))
            .expect("from the socket");
        assert_eq!(e.name, "STOP");
        let rest = q.take_events();
        assert_eq!(rest.len(), 1, "the other event was queued");
        assert_eq!(rest[0].name, "BALLOON_CHANGE");
    }

    #[test]
    fn wait_event_times_out_when_the_event_never_comes() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            reply(&mut w, "{\"event\": \"RESUME\"}");
            let _ = next_command(&mut r);
        });
        let mut q = connect(&p);
        let t = Instant::now();
        let e = q
            .wait_event("SHUTDOWN", Duration::from_millis(300))
            .expect_err("never sent");
        assert!(
            matches!(&e, QmpError::Timeout { what, .. } if what.contains("SHUTDOWN")),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(q.take_events().len(), 1, "RESUME was kept");
    }

    #[test]
    fn a_closed_connection_is_reported_as_closed() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, _w) = handshake(s);
            let _ = next_command(&mut r);
        });
        let mut q = connect(&p);
        let e = q.query_status().expect_err("closed");
        assert!(matches!(e, QmpError::Closed), "{e}");
    }

    #[test]
    fn quit_succeeds_when_qemu_closes_before_replying() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let _ = next_command(&mut r);
            reply(
                &mut w,
                "{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false}}",
            );
        });
        let mut q = connect(&p);
        q.quit().expect("closing is success");
    }

    #[test]
    fn the_event_queue_is_bounded() {
        let (_d, p, _h) = answering(|c| {
            let mut s = String::new();
            for i in 0..MAX_QUEUED_EVENTS + 10 {
                s.push_str(&format!("{{\"event\": \"E{i}\"}}\r\n"));
            }
            s.push_str(&format!("{{\"return\": {{}}, \"id\": {}}}\r\n", c["id"]));
            s
        });
        let mut q = connect(&p);
        q.stop().expect("stop");
        let events = q.take_events();
        assert_eq!(events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(events[0].name, "E10", "the oldest were dropped");
    }

    #[test]
    fn previews_cut_long_text() {
        let long = vec![b'a'; 10_000];
        let p = preview(&long);
        assert!(p.chars().count() <= 201 && p.ends_with('…'));
        assert_eq!(preview(b"short"), "short");
    }
}
