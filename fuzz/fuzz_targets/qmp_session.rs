//! Everything a QMP client reads from QEMU, through the client itself: the fuzz input
//! is what "QEMU" sends down the socket (greeting, replies, events, in any order and
//! framing), the client connects over a socket pair, negotiates, and runs a few
//! commands until the input runs out. This reaches the line framing, the greeting and
//! version, reply/id matching, error replies, events and typed replies, which are only
//! reachable through a socket.
//!
//! The fake QEMU's end is closed for writing once the input is sent, so every read ends
//! at once (in a message or in `Closed`) and no deadline is ever waited for.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vmferry_qmp::Qmp;

fuzz_target!(|data: &[u8]| {
    let (client, mut qemu) = UnixStream::pair().expect("socket pair");
    // The input (at most -max_len bytes) fits the socket buffer, so this never blocks.
    qemu.write_all(data)
        .expect("the input fits the socket buffer");
    qemu.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let Ok(mut q) = Qmp::from_stream(client, Duration::from_secs(5)) else {
        return;
    };
    let _ = q.version().map(|v| v.to_string());
    q.set_timeout(Duration::from_secs(5));
    // Each call stops at the first error other than QEMU refusing the command.
    let _ = q.query_status();
    let _ = q.query_migrate().map(|i| i.status.is_active());
    let _ = q.wait_event("MIGRATION", Duration::ZERO);
    let _ = q.execute("query-migrate-parameters", None);
    let _ = q.migrate("unix:/nonexistent");
    for e in q.take_events() {
        let _ = (e.name, e.data, e.timestamp);
    }
    let _ = q.quit();
    drop(qemu);
});
