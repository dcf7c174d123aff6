//! The client against a real QEMU: a machine with no devices and no CPUs
//! (`-machine none -S`), which starts in milliseconds and needs no accelerator.

use serde_json::json;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmferry_qmp::{MigrationStatus, Qmp, QmpError};

const QEMU: &str = "qemu-system-x86_64";

/// A QEMU process in its own temp dir; killed (and the dir removed) when dropped, even
/// if the test panics.
struct TestQemu {
    child: Child,
    qmp: PathBuf,
    /// Removed after the child is reaped (fields drop after `drop` runs).
    dir: tempfile::TempDir,
}

impl TestQemu {
    fn start(extra: &[&str]) -> TestQemu {
        let dir = tempfile::tempdir().expect("temp dir");
        let qmp = dir.path().join("qmp.sock");
        let child = Command::new(QEMU)
            .args(["-machine", "none", "-S", "-nodefaults", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            // No QEMU fails the test (never a skip): scripts/setup.sh installs it.
            .unwrap_or_else(|e| panic!("this test needs {QEMU} (scripts/setup.sh): {e}"));
        TestQemu { child, qmp, dir }
    }

    fn connect(&self) -> Qmp {
        Qmp::connect(&self.qmp, Duration::from_secs(10)).expect("connect to QEMU")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for QEMU to exit by itself.
    fn exited_within(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for TestQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_paused_qemu_reports_prelaunch_then_obeys_cont_and_stop() {
    let qemu = TestQemu::start(&[]);
    let mut q = qemu.connect();
    let v = q.version().expect("QEMU announces its version");
    assert!(v.major >= 7, "{v}");

    let st = q.query_status().expect("query-status");
    assert!(!st.running);
    assert_eq!(st.status, "prelaunch");

    q.cont().expect("cont");
    q.wait_event("RESUME", Duration::from_secs(5))
        .expect("RESUME event");
    let st = q.query_status().expect("query-status");
    assert!(st.running);
    assert_eq!(st.status, "running");

    q.stop().expect("stop");
    let e = q
        .wait_event("STOP", Duration::from_secs(5))
        .expect("STOP event");
    assert!(e.timestamp.0 > 0, "QEMU stamps events");
    let st = q.query_status().expect("query-status");
    assert!(!st.running);
    assert_eq!(st.status, "paused");
}

#[test]
fn sets_migration_parameters_and_reports_no_migration_yet() {
    let qemu = TestQemu::start(&[]);
    let mut q = qemu.connect();
    q.migrate_set_parameters(json!({ "max-bandwidth": 123_456_789, "downtime-limit": 250 }))
        .expect("migrate-set-parameters");
    let p = q.query_migrate_parameters().expect("parameters");
    assert_eq!(p["max-bandwidth"], 123_456_789);
    assert_eq!(p["downtime-limit"], 250);
    q.migrate_set_capabilities(&[("events", true)])
        .expect("migrate-set-capabilities");

    let info = q.query_migrate().expect("query-migrate");
    assert_eq!(info.status, MigrationStatus::None);
    assert!(!info.status.is_active());
    assert_eq!(info.ram, None);
}

#[test]
fn an_unknown_command_gives_qemus_own_error() {
    let qemu = TestQemu::start(&[]);
    let mut q = qemu.connect();
    match q.execute("no-such-command", None) {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected QEMU's error, got {other:?}"),
    }
    // A refused command leaves the session usable.
    assert_eq!(q.query_status().expect("still usable").status, "prelaunch");
}

#[test]
fn a_bad_argument_gives_a_command_error() {
    let qemu = TestQemu::start(&[]);
    let mut q = qemu.connect();
    let e = q
        .migrate_set_capabilities(&[("no-such-capability", true)])
        .expect_err("QEMU refuses it");
    assert!(
        matches!(&e, QmpError::Command { desc, .. } if desc.contains("no-such-capability")),
        "{e}"
    );
}

#[test]
fn a_second_client_times_out_while_the_first_holds_the_socket() {
    let qemu = TestQemu::start(&[]);
    let first = qemu.connect();
    let t = Instant::now();
    let e = Qmp::connect(&qemu.qmp, Duration::from_millis(1500)).expect_err("QEMU is busy");
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    // It waited its time out, and then gave up (the upper bound only catches a hang: a
    // loaded machine may be seconds late).
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    drop(first);
    // Once the first is dropped, QEMU serves the next client.
    let mut second = qemu.connect();
    second.query_status().expect("served after the first left");
}

#[test]
fn quit_ends_qemu() {
    let mut qemu = TestQemu::start(&[]);
    let mut q = qemu.connect();
    q.quit().expect("quit");
    assert!(qemu.exited_within(Duration::from_secs(10)), "QEMU exited");
    let e = q.query_status().expect_err("nobody is there");
    assert!(matches!(e, QmpError::Closed | QmpError::Io(_)), "{e}");
}

#[test]
fn migrates_a_paused_machine_from_one_qemu_to_another() {
    let source = TestQemu::start(&[]);
    let destination = TestQemu::start(&["-incoming", "defer"]);
    let mut src = source.connect();
    let mut dst = destination.connect();
    assert_eq!(dst.query_status().expect("status").status, "inmigrate");
    for q in [&mut src, &mut dst] {
        q.migrate_set_capabilities(&[("events", true)])
            .expect("events capability");
    }
    let uri = format!("unix:{}", destination.path("migrate.sock").display());
    dst.migrate_incoming(&uri).expect("migrate-incoming");
    src.migrate(&uri).expect("migrate");

    let completed = |e: &vmferry_qmp::Event| {
        e.name == "MIGRATION" && e.data["status"] == MigrationStatus::Completed.as_str()
    };
    for q in [&mut src, &mut dst] {
        q.wait_event_matching("migration completed", Duration::from_secs(20), completed)
            .expect("MIGRATION completed event");
    }
    let info = src.query_migrate().expect("query-migrate");
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(info.total_time_ms.is_some());
    assert!(info.ram.is_some());
    let seen: Vec<String> = src
        .take_events()
        .into_iter()
        .filter(|e| e.name == "MIGRATION")
        .filter_map(|e| e.data["status"].as_str().map(str::to_string))
        .collect();
    assert!(seen.iter().any(|s| s == "setup"), "{seen:?}");
    assert_eq!(
        dst.query_migrate().expect("query-migrate").status,
        MigrationStatus::Completed
    );
    assert_eq!(
        src.query_status().expect("status").status,
        "postmigrate",
        "the source stays paused after handing over"
    );
}

#[test]
fn a_migration_held_before_switchover_can_be_cancelled() {
    let source = TestQemu::start(&[]);
    let mut src = source.connect();
    // The destination is this test: it takes the stream and throws it away.
    let sock = source.path("sink.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
    });
    src.migrate_set_capabilities(&[("events", true), ("pause-before-switchover", true)])
        .expect("capabilities");
    src.migrate(&format!("unix:{}", sock.display()))
        .expect("migrate");
    let held = |e: &vmferry_qmp::Event| {
        e.name == "MIGRATION" && e.data["status"] == MigrationStatus::PreSwitchover.as_str()
    };
    src.wait_event_matching("pre-switchover", Duration::from_secs(20), held)
        .expect("QEMU holds before switchover");
    let info = src.query_migrate().expect("query-migrate");
    assert_eq!(info.status, MigrationStatus::PreSwitchover);
    assert!(info.status.is_active());

    src.migrate_cancel().expect("migrate_cancel");
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = src.query_migrate().expect("query-migrate");
        if info.status.is_terminal() {
            break info;
        }
        assert!(Instant::now() < deadline, "still {}", info.status);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info.status, MigrationStatus::Cancelled);
    let st = src.query_status().expect("status");
    assert!(
        !st.running,
        "a cancelled migration leaves the guest as it was: {st:?}"
    );
}
