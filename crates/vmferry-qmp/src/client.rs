//! The QMP session: connecting and the handshake, command ids and reply matching, and the
//! event queue. The framing on the socket is [`crate::wire`]'s; the typed commands are
//! [`crate::commands`]'s.
//!
//! What it must never do:
//! - **take a late reply for the answer to the current command.** Each command carries a
//!   fresh id; a reply with another id answers an earlier command that timed out, and is
//!   skipped.
//! - **lose an event, or hoard them.** Events arriving while waiting for something else
//!   are queued, oldest first, up to [`MAX_QUEUED_EVENTS`]; beyond that the oldest go.
//! - **wait without a deadline.** Connecting, the handshake, each command and each event
//!   wait run against a deadline the caller chose.
//! - **pile commands up behind a busy QEMU.** A command whose reply timed out is still
//!   queued in QEMU (its main loop may be blocked, e.g. by a vCPU waiting for a post-copy
//!   page): the next in-band command waits for that late reply before it is sent, so
//!   QEMU's request queue never fills and out-of-band commands (`exec-oob`, negotiated
//!   when QEMU offers it) still get through.

use crate::error::QmpError;
use crate::types::{Event, QemuVersion};
use crate::wire::{preview, Deadline, Wire};
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a command waits for its reply unless [`Qmp::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Events kept for [`Qmp::take_events`] before the oldest are dropped, so a caller that
/// never looks at events cannot make the queue grow without bound.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// The least time the greeting and capabilities negotiation get after connecting, even
/// if the socket appeared just before the connect timeout ran out.
const MIN_HANDSHAKE: Duration = Duration::from_secs(1);
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// How many events left over from the previous client a new one skips before the greeting.
const MAX_STALE_EVENTS: usize = 64;

/// A connected QMP session (greeting read, capabilities negotiated).
///
/// QEMU serves one QMP client at a time: while a `Qmp` exists, nobody else can talk to
/// that QEMU. Drop it as soon as you are done.
#[derive(Debug)]
pub struct Qmp {
    /// The connection, framed into messages. Never cloned, so dropping `Qmp` closes it
    /// and frees QEMU's monitor.
    wire: Wire,
    /// Events that arrived while waiting for something else, oldest first.
    events: VecDeque<Event>,
    /// The id of the next command. A reply with another id answers an earlier command
    /// that timed out, and is skipped.
    next_id: u64,
    /// How long each command waits for its reply.
    timeout: Duration,
    /// The QEMU version from the greeting, if it announced one.
    version: Option<QemuVersion>,
    /// Whether out-of-band execution was negotiated (QEMU offered "oob").
    oob: bool,
    /// An in-band command whose reply timed out: (its id, its name). QEMU still holds it.
    late: Option<(u64, String)>,
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
            wire: Wire::new(sock),
            events: VecDeque::new(),
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
            version: None,
            oob: false,
            late: None,
        };
        // An event QEMU emitted while the previous client was leaving can reach the next
        // one before its greeting (seen: a mirror's JOB_STATUS_CHANGE, under load): such
        // stale events are skipped, a bounded number of them.
        let mut stale = 0;
        let greeting = loop {
            let m = q.wire.read_message(
                &deadline,
                "QMP greeting (QEMU serves one client at a time: is another connected?)",
            )?;
            if m.contains_key("event") && !m.contains_key("QMP") && stale < MAX_STALE_EVENTS {
                stale += 1;
                tracing::debug!("QMP event before the greeting, skipped: {m:?}");
                continue;
            }
            break m;
        };
        if !greeting.contains_key("QMP") {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {}",
                preview(Value::Object(greeting).to_string().as_bytes())
            )));
        }
        q.version = QemuVersion::from_greeting(&greeting);
        let offered = greeting
            .get("QMP")
            .and_then(|g| g.get("capabilities"))
            .and_then(Value::as_array)
            .is_some_and(|caps| caps.iter().any(|c| c.as_str() == Some("oob")));
        tracing::debug!(version = ?q.version, oob = offered, "QMP greeting");
        let args = offered.then(|| serde_json::json!({ "enable": ["oob"] }));
        q.execute_by("qmp_capabilities", args, &deadline, false)?;
        q.oob = offered;
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
        self.execute_by(cmd, args, &deadline, false)
    }

    /// Like [`Qmp::execute`], but out of band (`exec-oob`) when the session negotiated it:
    /// QEMU runs the command at once in its monitor thread, even while its main loop is
    /// blocked. Only commands QEMU marks `allow-oob` may be sent so (e.g.
    /// `migrate-recover`, `migrate-pause`). Without out-of-band support it runs in band.
    pub fn execute_oob(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let deadline = Deadline::after(self.timeout);
        let oob = self.oob;
        self.execute_by(cmd, args, &deadline, oob)
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob(&self) -> bool {
        self.oob
    }

    fn execute_by(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        deadline: &Deadline,
        oob: bool,
    ) -> Result<Value, QmpError> {
        self.wire.usable()?;
        if !oob {
            self.wait_late(deadline)?;
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert(
            if oob { "exec-oob" } else { "execute" }.into(),
            Value::from(cmd),
        );
        if let Some(a) = args {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = Value::Object(msg).to_string().into_bytes();
        line.push(b'\n');
        tracing::debug!(command = cmd, id, "QMP command");
        let what = format!("reply to {cmd}");
        self.wire.send(&line, deadline, &what)?;
        loop {
            let mut m = match self.wire.read_message(deadline, &what) {
                Ok(m) => m,
                Err(e @ QmpError::Timeout { .. }) => {
                    if !oob {
                        self.late = Some((id, cmd.to_string()));
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
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
                    if self
                        .late
                        .as_ref()
                        .is_some_and(|(l, _)| other.as_u64() == Some(*l))
                    {
                        self.late = None;
                    }
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

    /// Waits, by `deadline`, for the late reply of an in-band command that timed out, so
    /// that no second in-band command queues up behind it in QEMU.
    fn wait_late(&mut self, deadline: &Deadline) -> Result<(), QmpError> {
        while let Some((late, name)) = self.late.clone() {
            let what = format!("the late reply to {name} (QEMU's main loop is busy)");
            let m = self.wire.read_message(deadline, &what)?;
            if m.contains_key("event") {
                self.queue_event(&m)?;
            } else if m.get("id").and_then(Value::as_u64) == Some(late) {
                self.late = None;
            }
        }
        Ok(())
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
        self.wire.usable()?;
        let deadline = Deadline::after(timeout);
        loop {
            let m = self.wire.read_message(&deadline, what)?;
            if !m.contains_key("event") {
                let id = m.get("id").and_then(Value::as_u64);
                if self.late.as_ref().is_some_and(|(l, _)| id == Some(*l)) {
                    self.late = None;
                }
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

fn parse_event(m: &Map<String, Value>) -> Result<Event, QmpError> {
    Event::from_message(m).ok_or_else(|| {
        QmpError::Protocol(format!(
            "an event whose name is not text: {}",
            preview(Value::Object(m.clone()).to_string().as_bytes())
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qemu::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

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
        assert!(t.elapsed() < HANG, "{:?}", t.elapsed());
    }

    #[test]
    fn a_server_that_never_greets_times_out_instead_of_hanging() {
        let (_d, p, _h) = serve(|mut s| {
            // Silent until the client gives up and closes (or the fake's socket timeout).
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        });
        let t = Instant::now();
        let e = Qmp::connect(&p, Duration::from_millis(1500)).expect_err("no greeting");
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("greeting"), "{e}");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(1500) && waited < HANG,
            "{waited:?}"
        );
    }

    #[test]
    fn stale_events_before_the_greeting_are_skipped_but_not_forever() {
        // QEMU can hand an event meant for the client before to the next one, ahead of
        // its greeting (a mirror's JOB_STATUS_CHANGE, seen in the disk copy tests).
        let (_d, p, h) = serve(|s| {
            let mut w = s.try_clone().expect("clone");
            let _ = w.write_all(
                b"{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"m0\", \"status\": \"ready\"}}\r\n",
            );
            let (mut r, _w) = handshake(s);
            let _ = next_command(&mut r);
        });
        let q = Qmp::connect(&p, Duration::from_secs(5)).expect("greeting after a stale event");
        assert_eq!(q.version().map(|v| v.major), Some(7));
        drop(q);
        h.join().expect("server");

        let (_d, p, _h) = serve(|mut s| {
            for _ in 0..=MAX_STALE_EVENTS {
                let _ = s.write_all(b"{\"event\": \"STOP\"}\r\n");
            }
            std::thread::sleep(Duration::from_secs(1));
        });
        let e = Qmp::connect(&p, Duration::from_secs(2)).expect_err("events only");
        assert!(e.to_string().contains("greeting"), "{e}");
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

    #[test]
    fn a_reply_with_neither_return_nor_error_is_a_protocol_error() {
        let why = protocol_error_for(b"{\"id\": 2, \"result\": {}}\r\n");
        assert!(
            why.contains("neither") && why.contains("query-status"),
            "{why}"
        );
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
    fn no_second_in_band_command_is_sent_while_qemu_still_holds_a_timed_out_one() {
        let (_d, p, h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let first = next_command(&mut r).expect("first");
            // Nothing else may arrive while the first is unanswered.
            r.get_ref()
                .set_read_timeout(Some(Duration::from_millis(800)))
                .expect("timeout");
            let early = next_command(&mut r);
            assert!(early.is_none(), "sent behind a late command: {early:?}");
            r.get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            reply(
                &mut w,
                &format!(
                    "{{\"return\": {{\"status\": \"late\", \"running\": false}}, \"id\": {}}}",
                    first["id"]
                ),
            );
            let next = next_command(&mut r).expect("next");
            reply(
                &mut w,
                &format!(
                    "{{\"return\": {{\"status\": \"running\", \"running\": true}}, \"id\": {}}}",
                    next["id"]
                ),
            );
            let _ = next_command(&mut r);
        });
        let mut q = connect(&p);
        q.set_timeout(Duration::from_millis(200));
        assert!(matches!(q.query_status(), Err(QmpError::Timeout { .. })));
        let e = q.query_status().expect_err("the first is still late");
        assert!(e.to_string().contains("late reply to query-status"), "{e}");
        q.set_timeout(Duration::from_secs(5));
        assert_eq!(q.query_status().expect("status").status, "running");
        drop(q);
        h.join().expect("the server saw one command at a time");
    }

    #[test]
    fn an_out_of_band_command_goes_out_while_an_in_band_one_is_late() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let first = next_command(&mut r).expect("first");
            let oob = next_command(&mut r).expect("out of band");
            assert_eq!(oob["exec-oob"], "migrate-recover", "{oob}");
            assert_eq!(oob["arguments"]["uri"], "unix:/r.sock");
            reply(
                &mut w,
                &format!("{{\"return\": {{}}, \"id\": {}}}", oob["id"]),
            );
            reply(
                &mut w,
                &format!(
                    "{{\"return\": {{\"status\": \"late\", \"running\": false}}, \"id\": {}}}",
                    first["id"]
                ),
            );
            let next = next_command(&mut r).expect("next");
            reply(
                &mut w,
                &format!(
                    "{{\"return\": {{\"status\": \"running\", \"running\": true}}, \"id\": {}}}",
                    next["id"]
                ),
            );
            let _ = next_command(&mut r);
        });
        let mut q = connect(&p);
        assert!(q.oob(), "QEMU offered oob");
        q.set_timeout(Duration::from_millis(200));
        assert!(matches!(q.query_status(), Err(QmpError::Timeout { .. })));
        q.set_timeout(Duration::from_secs(5));
        q.migrate_recover("unix:/r.sock").expect("answered at once");
        assert_eq!(q.query_status().expect("status").status, "running");
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
        // A zero timeout never reads the socket: RESUME came from the queue, and only once.
        assert_eq!(
            q.wait_event("RESUME", Duration::ZERO).expect("queued").name,
            "RESUME"
        );
        assert!(
            matches!(
                q.wait_event("RESUME", Duration::ZERO),
                Err(QmpError::Timeout { .. })
            ),
            "taken from the queue"
        );
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
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < HANG,
            "{waited:?}"
        );
        assert_eq!(q.take_events().len(), 1, "RESUME was kept");
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
}
