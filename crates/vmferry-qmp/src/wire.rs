//! QMP's framing on the socket: one JSON object per line, each command written whole, each
//! message read by a deadline.
//!
//! A [`Wire`] owns the connection and the bytes read but not yet handed out. It knows
//! nothing of commands, ids or events: it hands over each message as a JSON object and
//! leaves its meaning to the session ([`crate::client`]).
//!
//! What it must never do:
//! - **buffer without bound.** A line longer than [`MAX_MESSAGE_LEN`] is refused after
//!   reading at most that much, and breaks the session.
//! - **wait past a deadline.** Every read and write gets only the time left; a trickle of
//!   bytes does not extend it.
//! - **go on out of step.** Once half a command was written or a line could not be
//!   framed, every later call fails instead of misreading what follows.
//! - **panic on what it reads.** Bytes that are not a JSON object end in
//!   [`QmpError::Protocol`].

use crate::error::QmpError;
use serde_json::{Map, Value};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The longest message (one line) accepted from QEMU. The largest real reply,
/// `query-qmp-schema`, is well under 1 MiB; anything near this is a broken or hostile peer,
/// which must not make us buffer without bound.
pub const MAX_MESSAGE_LEN: usize = 16 << 20;

/// The most asked of one read: large enough for any ordinary message at once.
const READ_CHUNK: usize = 64 << 10;

/// The connection, framed into messages.
#[derive(Debug)]
pub(crate) struct Wire {
    /// The connection. Never cloned, so dropping the `Wire` (with its `Qmp`) closes it
    /// and frees QEMU's monitor.
    sock: UnixStream,
    /// Bytes read but not yet handed out: the start of the next line(s).
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline, so a long line is scanned once
    /// rather than once per read.
    scanned: usize,
    /// Why the session can no longer be used, once the stream cannot be trusted to be in
    /// step (half a command written, a line too long to frame). Every later call fails
    /// with this instead of misreading what follows.
    broken: Option<String>,
}

/// When a wait ends, and how long it was allowed (for the error message).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    allowed: Duration,
}

impl Deadline {
    pub(crate) fn after(d: Duration) -> Self {
        let now = Instant::now();
        Deadline {
            at: now
                .checked_add(d)
                .unwrap_or(now + Duration::from_secs(86400 * 365)),
            allowed: d,
        }
    }

    pub(crate) fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub(crate) fn expired(&self, what: &str) -> QmpError {
        QmpError::Timeout {
            what: what.to_string(),
            after: self.allowed,
        }
    }
}

impl Wire {
    pub(crate) fn new(sock: UnixStream) -> Self {
        Wire {
            sock,
            buf: Vec::new(),
            scanned: 0,
            broken: None,
        }
    }

    /// Fails, saying why, once the stream is out of step and must not be read or
    /// written again.
    pub(crate) fn usable(&self) -> Result<(), QmpError> {
        match &self.broken {
            Some(why) => Err(QmpError::Protocol(format!(
                "the session is unusable since {why}"
            ))),
            None => Ok(()),
        }
    }

    /// Writes one whole command by `deadline`. Half a command on the wire would make
    /// QEMU misread the next one, so a partial write breaks the session.
    pub(crate) fn send(
        &mut self,
        mut data: &[u8],
        deadline: &Deadline,
        what: &str,
    ) -> Result<(), QmpError> {
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
    pub(crate) fn read_message(
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

fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

/// The start of what QEMU sent, for an error message.
pub(crate) fn preview(bytes: &[u8]) -> String {
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
    use crate::fake_qemu::*;

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
        assert!(t.elapsed() < HANG, "{:?}", t.elapsed());
    }

    #[test]
    fn a_trickle_of_bytes_does_not_extend_the_deadline() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let _ = next_command(&mut r);
            // Longer than HANG: a client whose deadline each byte extended would wait for
            // the trickle to end, then see the connection close.
            let until = Instant::now() + 2 * HANG;
            while Instant::now() < until {
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
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < HANG,
            "{waited:?}"
        );
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
    fn previews_cut_long_text() {
        let long = vec![b'a'; 10_000];
        let p = preview(&long);
        assert!(p.chars().count() <= 201 && p.ends_with('…'));
        assert_eq!(preview(b"short"), "short");
    }
}
