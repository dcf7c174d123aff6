//! End to end, attach mode on loopback: faults injected mid-stream (the migration capped so
//! they land while guest memory flows). In every case `vmferry migrate` fails within
//! seconds of the fault, naming the real cause; the source QEMU lives (unless it was the
//! one killed) with its RAM unchanged and not migrating; both daemons still answer; no
//! QMP socket stays taken.

mod common;

use anyhow::{bail, Context, Result};
use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vmferry_testkit::ports::free_port;
use vmferry_testkit::qemu::{start_qemu, QemuOpts, QemuProcess};
use vmferry_testkit::require;

const RAM_MIB: u64 = 128;
/// Slow enough that 128 MiB takes ~16 s: every fault lands mid-stream.
const CAP: &str = "8M";

/// Two daemons on loopback and a paused source QEMU with random RAM; the destination
/// QEMU as `dst` describes it.
struct Rig {
    tmp: tempfile::TempDir,
    certs: PathBuf,
    a: String,
    b: String,
    da: DaemonProc,
    db: DaemonProc,
    src: QemuProcess,
    dst: QemuProcess,
    src_ram: tempfile::NamedTempFile,
    /// A hash of the source RAM before the migration.
    src_hash: u64,
}

fn rig(dst: impl FnOnce(&mut QemuOpts)) -> Result<Rig> {
    require::qemu();
    require::path("/dev/shm");
    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("certs");
    for args in [
        vec!["certs", "init", "--dir"],
        vec![
            "certs",
            "issue",
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--dir",
        ],
    ] {
        let o = run({
            let mut c = vmferry();
            c.args(&args).arg(&certs);
            c
        });
        assert!(o.status.success(), "{}", text(&o));
    }
    let a = format!("127.0.0.1:{}", free_port());
    let b = format!("127.0.0.1:{}", free_port());
    let da = DaemonProc::start(None, &a, &tmp.path().join("s1"), &certs, &[])?;
    let db = DaemonProc::start(None, &b, &tmp.path().join("s2"), &certs, &[])?;
    let shm = |tag: &str| {
        tempfile::Builder::new()
            .prefix(&format!("vmferry-test-dfail-{tag}-"))
            .tempfile_in("/dev/shm")
    };
    let (src_ram, dst_ram) = (shm("src")?, shm("dst")?);
    let mut o = QemuOpts::new(tmp.path().join("src.qmp"), tmp.path().join("src.serial"));
    o.memory_mib = RAM_MIB;
    o.mem_file = Some(src_ram.path().to_path_buf());
    o.paused = true;
    let mut src = start_qemu(&o)?;
    // The source must answer QMP before its RAM is written: QEMU opens its memory file
    // after its QMP socket, and refuses a file a writer has started to fill ("backing
    // store size ... does not match"). Say why if it cannot.
    if let Err(e) = vmferry_qmp::Qmp::connect(&src.qmp, Duration::from_secs(15))
        .and_then(|mut q| q.query_status())
    {
        bail!(
            "the source QEMU does not answer QMP ({e}); exited: {:?}; stderr: {}",
            src.try_wait()?,
            src.stderr_text()
        );
    }
    fill_random(src_ram.path())?;
    let mut o = QemuOpts::new(tmp.path().join("dst.qmp"), tmp.path().join("dst.serial"));
    o.memory_mib = RAM_MIB;
    o.mem_file = Some(dst_ram.path().to_path_buf());
    o.incoming = Some("defer".into());
    dst(&mut o);
    let dst = start_qemu(&o)?;
    let src_hash = hash_file(src_ram.path())?;
    // The destination's RAM file is only needed while its QEMU runs.
    drop(dst_ram);
    Ok(Rig {
        tmp,
        certs,
        a,
        b,
        da,
        db,
        src,
        dst,
        src_ram,
        src_hash,
    })
}

fn fill_random(path: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..RAM_MIB {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

fn hash_file(path: &Path) -> Result<u64> {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.write(&buf[..n]);
    }
}

impl Rig {
    /// Starts `vmferry migrate` in attach mode, capped.
    fn spawn_migrate(&self, extra: &[&str]) -> Result<Child> {
        self.spawn_migrate_to(&self.dst.qmp, CAP, extra)
    }

    fn spawn_migrate_to(&self, dst_qmp: &Path, cap: &str, extra: &[&str]) -> Result<Child> {
        let mut c = vmferry();
        c.args(["migrate", "--from", &self.a, "--to", &self.b, "--src-qmp"])
            .arg(&self.src.qmp)
            .arg("--dst-qmp")
            .arg(dst_qmp)
            .arg("--certs")
            .arg(&self.certs)
            .args(["--max-bandwidth", cap])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(c.spawn()?)
    }

    /// Waits until guest memory flows (the source daemon lists a migration that carried
    /// bytes).
    fn wait_flowing(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = run({
                let mut c = vmferry();
                c.args(["status", "--json", "--daemon", &self.a, "--certs"])
                    .arg(&self.certs);
                c
            });
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
                let flowing = v.as_array().into_iter().flatten().any(|m| {
                    m["status"]["channel_bytes"].as_u64().unwrap_or(0) > 2 << 20
                        && m["status"]["finished"] == false
                });
                if flowing {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the migration never got going: {}", self.da.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What must hold after any failure: the source lives, unchanged and not migrating,
    /// its QMP free; both daemons answer.
    fn check_source_safe(&self) -> Result<()> {
        let mut q = vmferry_qmp::Qmp::connect(&self.src.qmp, Duration::from_secs(5))
            .context("the source QMP must be free and answer")?;
        let st = q.query_migrate()?;
        assert!(!st.status.is_active(), "source still migrating: {st:?}");
        drop(q);
        assert_eq!(
            hash_file(self.src_ram.path())?,
            self.src_hash,
            "the source RAM changed"
        );
        self.check_daemons_answer()?;
        self.check_nothing_left()
    }

    /// No socket of the migration stays in either daemon's state dir, and neither
    /// daemon lists the migration as in flight.
    fn check_nothing_left(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left: Vec<String> = Vec::new();
            for d in [&self.da.state_dir, &self.db.state_dir] {
                for e in std::fs::read_dir(d)?.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with("migrate-") {
                        left.push(format!("{}/{name}", d.display()));
                    }
                }
            }
            for d in [&self.a, &self.b] {
                let o = run({
                    let mut c = vmferry();
                    c.args(["status", "--json", "--daemon", d, "--certs"])
                        .arg(&self.certs);
                    c
                });
                let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
                for m in v.as_array().into_iter().flatten() {
                    if m["status"]["finished"] == false {
                        left.push(format!("{d}: migration {} still in flight", m["migration"]));
                    }
                }
            }
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("left behind: {left:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_daemons_answer(&self) -> Result<()> {
        for d in [&self.a, &self.b] {
            let o = run({
                let mut c = vmferry();
                c.args(["status", "--daemon", d, "--certs"])
                    .arg(&self.certs);
                c
            });
            assert!(o.status.success(), "daemon {d} must answer: {}", text(&o));
        }
        Ok(())
    }
}

/// Waits for the controller to exit, at most `within`; its output.
fn wait_exit(mut child: Child, within: Duration) -> Result<(bool, String)> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait()? {
            let mut out = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut out)?;
            }
            return Ok((st.success(), out));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let mut out = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut out)?;
            }
            bail!("vmferry migrate did not exit within {within:?}: {out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn a_destination_qemu_killed_mid_stream_fails_the_migration_within_seconds() -> Result<()> {
    let r = rig(|_| {})?;
    let child = r.spawn_migrate(&[])?;
    r.wait_flowing()?;
    kill9(r.dst.pid());
    let (ok, err) = wait_exit(child, Duration::from_secs(10))?;
    assert!(!ok, "{err}");
    assert!(err.contains("destination QEMU"), "names the cause: {err}");
    assert!(err.contains("the source VM keeps running"), "{err}");
    r.check_source_safe()
}

#[test]
fn a_destination_qemu_with_less_ram_or_another_machine_is_refused_before_any_byte() -> Result<()> {
    for (what, setup, want) in [
        (
            "less RAM",
            (|o: &mut QemuOpts| o.memory_mib = RAM_MIB / 2) as fn(&mut QemuOpts),
            "64 MiB of RAM, the source 128 MiB",
        ),
        (
            "another machine type",
            |o: &mut QemuOpts| o.machine = "pc".into(),
            "machine type",
        ),
        (
            "a device the source does not have",
            |o: &mut QemuOpts| {
                o.extra_args = vec!["-device".into(), "virtio-rng-pci,id=rng0".into()];
            },
            "only the destination has rng0 (virtio-rng-pci)",
        ),
        (
            "RAM not backed as the source's",
            |o: &mut QemuOpts| o.mem_file = None,
            "no RAM block ram0",
        ),
    ] {
        let r = rig(setup)?;
        let child = r.spawn_migrate(&[])?;
        let (ok, err) = wait_exit(child, Duration::from_secs(30))?;
        assert!(!ok, "{what}: {err}");
        assert!(
            err.contains("prepare failed"),
            "{what}: refused in prepare: {err}"
        );
        assert!(err.contains(want), "{what}: names both values: {err}");
        r.check_source_safe()?;
        let st = vmferry_qmp::Qmp::connect(&r.src.qmp, Duration::from_secs(5))?.query_migrate()?;
        assert!(st.ram.is_none(), "{what}: nothing moved: {st:?}");
        drop(r.tmp);
    }
    Ok(())
}

#[test]
fn a_frozen_destination_daemon_fails_the_migration_within_seconds() -> Result<()> {
    for extra in [&[][..], &["--timeout", "15"][..]] {
        let r = rig(|_| {})?;
        let child = r.spawn_migrate(extra)?;
        r.wait_flowing()?;
        let pid = nix::unistd::Pid::from_raw(r.db.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
        let exit = wait_exit(child, Duration::from_secs(10));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
        let (ok, err) = exit.with_context(|| format!("with {extra:?}"))?;
        assert!(!ok, "{err}");
        assert!(err.contains("peer link"), "names the silent peer: {err}");
        assert!(err.contains("the source VM keeps running"), "{err}");
        r.check_source_safe()?;
    }
    Ok(())
}

#[test]
fn a_migration_where_nothing_moves_fails_at_the_stall_timeout_saying_what_it_saw() -> Result<()> {
    let r = rig(|_| {})?;
    let child = r.spawn_migrate(&["--stall-timeout", "3"])?;
    r.wait_flowing()?;
    // A frozen destination QEMU reads nothing more: the stream stands still while
    // both daemons stay healthy.
    let pid = nix::unistd::Pid::from_raw(r.dst.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let exit = wait_exit(child, Duration::from_secs(15));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    let (ok, err) = exit?;
    assert!(!ok, "{err}");
    assert!(err.contains("stalled: nothing moved for 3 s"), "{err}");
    assert!(
        err.contains("the destination last said it was receiving"),
        "says what the other side last said: {err}"
    );
    r.check_source_safe()
}

#[test]
fn a_source_qemu_killed_mid_stream_is_reported_as_exited() -> Result<()> {
    let r = rig(|_| {})?;
    let child = r.spawn_migrate(&[])?;
    r.wait_flowing()?;
    kill9(r.src.pid());
    let (ok, err) = wait_exit(child, Duration::from_secs(10))?;
    assert!(!ok, "{err}");
    assert!(err.contains("source QEMU"), "names the cause: {err}");
    assert!(
        !err.contains("the source VM keeps running"),
        "must not claim a dead source runs: {err}"
    );
    r.check_daemons_answer()
}

#[test]
fn of_two_concurrent_migrations_of_one_source_only_one_runs_and_it_is_never_cancelled() -> Result<()>
{
    for round in 0..3 {
        let r = rig(|_| {})?;
        // A second destination for the second controller.
        let mut o = QemuOpts::new(r.tmp.path().join("dst2.qmp"), r.tmp.path().join("dst2.ser"));
        let dst2_ram = tempfile::Builder::new()
            .prefix("vmferry-test-dfail-dst2-")
            .tempfile_in("/dev/shm")?;
        o.memory_mib = RAM_MIB;
        o.mem_file = Some(dst2_ram.path().to_path_buf());
        o.incoming = Some("defer".into());
        let dst2 = start_qemu(&o)?;
        // Both capped so they overlap: 128 MiB at 32 MB/s takes 4 s.
        let first = r.spawn_migrate_to(&r.dst.qmp, "32M", &[])?;
        let second = r.spawn_migrate_to(&dst2.qmp, "32M", &[])?;
        let (ok1, err1) = wait_exit(first, Duration::from_secs(60))?;
        let (ok2, err2) = wait_exit(second, Duration::from_secs(60))?;
        // Exactly one wins; the loser is refused for the reason, and never cancelled
        // the winner.
        assert!(
            ok1 ^ ok2,
            "round {round}: one must win: {err1} / {err2}\ndestination QEMU: {}\n{}",
            r.dst.stderr_text(),
            r.db.log_text()
        );
        let loser = if ok1 { &err2 } else { &err1 };
        assert!(
            loser.contains("already"),
            "round {round}: refused because the QEMU is busy: {loser}"
        );
        let mut q = vmferry_qmp::Qmp::connect(&r.src.qmp, Duration::from_secs(5))?;
        let st = q.query_migrate()?;
        assert_eq!(
            st.status,
            vmferry_qmp::MigrationStatus::Completed,
            "round {round}"
        );
        r.check_daemons_answer()?;
    }
    Ok(())
}
