//! A fake QEMU for the unit tests: a unix socket in a temp dir, one connection, served by a
//! script that can play a well-behaved, broken or hostile QEMU.
//!
//! Test-only. It must never outlive a failed test for long (its sockets time out after
//! 10 s), nor share a socket between tests (each gets its own temp dir).

use crate::{Qmp, QmpError};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The upper bound for a wait that must end. It only catches a hang: on a shared, loaded
/// 2-core machine a test thread can run seconds late, so a tighter bound would test the
/// machine rather than the client. What the client guarantees is the lower bound (it
/// waited at least its timeout), and tests assert that exactly.
pub(crate) const HANG: Duration = Duration::from_secs(10);

const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

/// A fake QEMU: one connection, handled by `script`. It plays broken and hostile
/// servers; the socket lives in a temp dir that the test holds.
pub(crate) fn serve(
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
pub(crate) fn handshake(s: UnixStream) -> (BufReader<UnixStream>, UnixStream) {
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    w.write_all(GREETING.as_bytes()).expect("greet");
    let cmd = next_command(&mut r).expect("qmp_capabilities");
    assert_eq!(cmd["execute"], "qmp_capabilities");
    assert_eq!(
        cmd["arguments"]["enable"][0], "oob",
        "offered, so negotiated"
    );
    reply(
        &mut w,
        &format!("{{\"return\": {{}}, \"id\": {}}}", cmd["id"]),
    );
    (r, w)
}

pub(crate) fn next_command(r: &mut BufReader<UnixStream>) -> Option<Value> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
        _ => None,
    }
}

pub(crate) fn reply(w: &mut UnixStream, line: &str) {
    let _ = w.write_all(format!("{line}\r\n").as_bytes());
}

/// A server that greets, then answers each command with `answer(command)`.
pub(crate) fn answering(
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

pub(crate) fn connect(p: &Path) -> Qmp {
    Qmp::connect(p, Duration::from_secs(5)).expect("connect")
}

pub(crate) fn protocol_error_for(bad_reply: &'static [u8]) -> String {
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
