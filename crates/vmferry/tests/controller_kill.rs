//! End to end: a migration outlives its controller. The controller is killed (SIGKILL)
//! at each phase boundary; within the lease the daemons roll back (before the
//! switch-over) or finish on their own (after it). In every case the guest runs on
//! exactly one host, the VM can be migrated again, and `vmferry status` says what
//! happened. Also: two concurrent prepares of one id start one QEMU, and a daemon that
//! speaks the previous protocol version still migrates.

mod common;

use anyhow::{bail, Context, Result};
use common::live::*;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};
use vmferry_daemon::{ClientAuth, ControlClient, ControlTarget};
use vmferry_proto::{MigrationId, MigrationOptions, RequestBody, ResponseBody, VmName, VmRef};
use vmferry_testkit::serial::wait_for_heartbeat;

/// The lease the killed controllers ask for: short, so the matrix runs quickly.
const LEASE_SECS: u64 = 2;

/// Which host runs the guest, by each daemon's `vm list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    A,
    B,
}

fn vm_states(s: &Setup, host: Where) -> Result<Vec<(String, String)>> {
    let (h, addr) = match host {
        Where::A => (&s.hosts.a, &s.a_addr),
        Where::B => (&s.hosts.b, &s.b_addr),
    };
    let o = run({
        let mut c = h.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    if !o.status.success() {
        bail!("vm list: {}", text(&o));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|vm| {
            (
                vm["spec"]["name"].as_str().unwrap_or("?").to_string(),
                vm["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect())
}

/// Waits until the guest runs on `want` and the other host holds no VM at all.
fn wait_running_only_on(s: &Setup, want: Where, within: Duration) -> Result<()> {
    let other = if want == Where::A { Where::B } else { Where::A };
    let deadline = Instant::now() + within;
    loop {
        let here = vm_states(s, want)?;
        let there = vm_states(s, other)?;
        let ok = here.len() == 1 && here[0].1 == "running" && there.is_empty();
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "expected the guest running on {want:?} only; {want:?}: {here:?}, other: \
                 {there:?}\n--- daemon a:\n{}\n--- daemon b:\n{}",
                tail(&s.da.log_text()),
                tail(&s.db.log_text())
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(log: &str) -> String {
    // The test's own polling fills the audit log; what the daemons did is the rest.
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(r#""what":"connection""#) && !l.contains(r#""what":"request""#))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Starts `vmferry migrate` that stops dead after `phase`, kills it with SIGKILL once it
/// says so, and returns the migration id.
fn migrate_and_kill_after(s: &Setup, from: Where, phase: &str, extra: &[&str]) -> Result<String> {
    let (h, src, dst) = match from {
        Where::A => (&s.hosts.a, &s.a_addr, &s.b_addr),
        Where::B => (&s.hosts.b, &s.b_addr, &s.a_addr),
    };
    let mut c = h.command(BIN);
    c.args(["migrate", "g1", "--from", src, "--to", dst, "--json"])
        .args(["--lease", &LEASE_SECS.to_string()])
        .args(extra)
        .arg("--certs")
        .arg(&s.ctl)
        .env("VMFERRY_DANGER_STOP_AFTER", phase)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let id = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(rest) = line.split(" of migration ").nth(1) {
                    break rest.split_whitespace().next().unwrap_or("").to_string();
                }
                seen.push(line);
            }
            Err(_) => {
                if let Ok(Some(st)) = child.try_wait() {
                    bail!(
                        "migrate exited ({st}) before stopping after {phase}: {seen:?}\n\
                         daemon a:\n{}\ndaemon b:\n{}",
                        s.da.log_text(),
                        s.db.log_text()
                    );
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("migrate never stopped after {phase}: {seen:?}");
                }
            }
        }
    };
    // SIGKILL: no rollback, no goodbye; the lease is all that is left.
    child.kill()?;
    child.wait()?;
    Ok(id)
}

/// Waits until the half on `on` reached a final state, and returns its status.
fn wait_final(s: &Setup, on: Where, id: &str, within: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let st = status_of(s, on, id)?;
        if st["state"] == "rolled_back" || st["state"] == "confirmed" {
            return Ok(st);
        }
        if Instant::now() > deadline {
            bail!(
                "migration {id} did not end on {on:?}: {st}\n--- daemon a:\n{}\n--- daemon b:\n{}",
                tail(&s.da.log_text()),
                tail(&s.db.log_text())
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status_of(s: &Setup, on: Where, id: &str) -> Result<serde_json::Value> {
    let (h, addr) = match on {
        Where::A => (&s.hosts.a, &s.a_addr),
        Where::B => (&s.hosts.b, &s.b_addr),
    };
    let o = run({
        let mut c = h.command(BIN);
        c.args(["status", id, "--json", "--daemon", addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    if !o.status.success() {
        bail!("status: {}", text(&o));
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

#[test]
fn a_killed_controller_leaves_the_guest_running_on_exactly_one_host() -> Result<()> {
    // The migration after three rolled-back ones once ended "cancelled on request" under
    // load: the job of a migration the lease had rolled back reported QEMU's cancelled
    // migration late and, in that second failure report, cancelled QEMU's next one. A
    // final migration now never touches QEMU again.
    let s = setup("ckill")?;
    let (_pid, src_log) = start_guest(&s, "g1")?;
    wait_for_heartbeat(&src_log, 2, Duration::from_secs(90))?;
    let settle = Duration::from_secs(LEASE_SECS + 15);

    // Before the switch-over, every kill rolls back: the guest stays on A.
    for (phase, extra) in [
        ("begin", &[][..]),
        ("prepare", &[][..]),
        // Capped, so the guest's memory is still streaming when the controller dies.
        ("perform", &["--max-bandwidth", "4M"][..]),
    ] {
        let id = migrate_and_kill_after(&s, Where::A, phase, extra)?;
        let st = wait_final(&s, Where::A, &id, settle)?;
        wait_running_only_on(&s, Where::A, settle)
            .with_context(|| format!("controller killed after {phase}"))?;
        assert_eq!(st["state"], "rolled_back", "after {phase}: {st}");
        let note = st["note"].as_str().unwrap_or_default();
        assert!(
            note.contains("lease") && note.contains("rolled back"),
            "after {phase}: {st}"
        );
    }
    let beat = wait_for_heartbeat(&src_log, 0, Duration::from_secs(1))?;
    wait_for_heartbeat(&src_log, beat + 1, Duration::from_secs(30))
        .context("the guest on A must keep counting after the rollbacks")?;

    // After QEMU completed, the daemons finish alone: the guest goes to B ...
    let id = migrate_and_kill_after(&s, Where::A, "migration", &[])?;
    let st = wait_final(&s, Where::A, &id, settle)?;
    wait_running_only_on(&s, Where::B, settle).context("controller killed after completion")?;
    assert_eq!(st["state"], "confirmed", "{st}");
    assert!(
        st["note"]
            .as_str()
            .unwrap_or_default()
            .contains("on their own"),
        "{st}"
    );
    let dst_log = s.db.state_dir.join("vms/g1/serial.log");
    let beat = wait_for_heartbeat(&dst_log, 0, Duration::from_secs(30))?;
    wait_for_heartbeat(&dst_log, beat + 1, Duration::from_secs(30))
        .context("the guest on B must count on")?;

    // ... and a controller killed after finish (before confirm) leaves it on the
    // destination too: here, back on A.
    let id = migrate_and_kill_after(&s, Where::B, "finish", &[])?;
    let st = wait_final(&s, Where::B, &id, settle)?;
    wait_running_only_on(&s, Where::A, settle).context("controller killed before confirm")?;
    assert_eq!(st["state"], "confirmed", "{st}");

    // Handed to the daemons: migrate --detach returns at once, the daemons finish, and
    // status follows it to the end.
    let o = run({
        let mut c = s.hosts.a.command(BIN);
        c.args([
            "migrate", "g1", "--from", &s.a_addr, "--to", &s.b_addr, "--detach", "--json",
            "--certs",
        ])
        .arg(&s.ctl);
        c
    });
    assert!(o.status.success(), "migrate --detach: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let result: serde_json::Value =
        serde_json::from_str(out.lines().last().context("a result line")?)?;
    assert_eq!(result["detached"], true, "{result}");
    let id = result["migration"].as_str().context("id")?.to_string();
    let st = wait_final(&s, Where::A, &id, settle)?;
    assert_eq!(st["state"], "confirmed", "{st}");
    assert!(
        st["note"].as_str().unwrap_or_default().contains("detached"),
        "{st}"
    );
    wait_running_only_on(&s, Where::B, settle).context("detached migration")?;

    // The VM is free to migrate again, with a controller that lives: back to A.
    let o = run({
        let mut c = s.hosts.a.command(BIN);
        c.args([
            "migrate", "g1", "--from", &s.b_addr, "--to", &s.a_addr, "--json", "--certs",
        ])
        .arg(&s.ctl);
        c
    });
    assert!(o.status.success(), "migrate after the kills: {}", text(&o));
    wait_running_only_on(&s, Where::A, Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn two_concurrent_prepares_of_one_migration_start_one_qemu() -> Result<()> {
    let s = setup("cprep")?;
    let (_pid, _log) = start_guest(&s, "g1")?;
    let auth = ClientAuth {
        creds: Some(vmferry_channel::certs::HostCredentials::load(&s.ctl)?),
        ..Default::default()
    };
    let a = ControlTarget::Tcp(s.a_addr.clone());
    let b = ControlTarget::Tcp(s.b_addr.clone());
    let vm = VmRef::Managed {
        name: VmName::new("g1")?,
    };
    let id = MigrationId::from_random([7; 16]);
    // The test talks to the namespaced daemons from a thread inside host a.
    s.hosts
        .a
        .run(|| prepare_twice(&s, &auth, &a, &b, &vm, &id))??;
    Ok(())
}

fn prepare_twice(
    s: &Setup,
    auth: &ClientAuth,
    a: &ControlTarget,
    b: &ControlTarget,
    vm: &VmRef,
    id: &MigrationId,
) -> Result<()> {
    let t = Duration::from_secs(60);
    let mut src = ControlClient::connect_with(a, auth, None)?;
    let cookie = match src.call(
        RequestBody::Begin {
            migration: id.clone(),
            vm: vm.clone(),
            options: MigrationOptions::default(),
        },
        t,
    )? {
        ResponseBody::Cookie { cookie } => cookie,
        other => bail!("begin: {other:?}"),
    };
    let answers: Vec<Result<ResponseBody, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (cookie, vm) = (cookie.clone(), vm.clone());
                sc.spawn(move || {
                    let mut dst =
                        ControlClient::connect_with(b, auth, None).map_err(|e| e.to_string())?;
                    dst.call(RequestBody::Prepare { cookie, vm }, t)
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    let ok = answers.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = answers.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(ok, 1, "exactly one prepare succeeds: {answers:?}");
    assert!(
        refused[0].contains("already prepared"),
        "the other is refused by name: {refused:?}"
    );
    assert_eq!(vm_states(s, Where::B)?.len(), 1, "one VM on B");
    assert_eq!(
        qemu_pids_under(&s.db.state_dir).len(),
        1,
        "exactly one destination QEMU"
    );
    // Clean up: the source resumes, the destination is aborted.
    let mut dst = ControlClient::connect_with(b, auth, None)?;
    dst.call(
        RequestBody::Abort {
            migration: id.clone(),
            reason: "test over".into(),
        },
        t,
    )?;
    src.call(
        RequestBody::Confirm {
            migration: id.clone(),
            success: false,
        },
        t,
    )?;
    assert!(vm_states(s, Where::B)?.is_empty());
    Ok(())
}

#[test]
fn a_daemon_speaking_the_previous_protocol_version_still_migrates() -> Result<()> {
    // Host b's daemon answers as a version-1 daemon: no leases, no peer link, no
    // typed state. The controller must notice and go on without them.
    let s = setup_with_config("cv1", "danger_protocol_version = 1\n")?;
    let (_pid, src_log) = start_guest(&s, "g1")?;
    wait_for_heartbeat(&src_log, 2, Duration::from_secs(90))?;
    let o = run({
        let mut c = s.hosts.a.command(BIN);
        c.args([
            "migrate", "g1", "--from", &s.a_addr, "--to", &s.b_addr, "--json", "--certs",
        ])
        .arg(&s.ctl)
        .env("VMFERRY_LOG", "info");
        c
    });
    assert!(o.status.success(), "migrate: {}", text(&o));
    wait_running_only_on(&s, Where::B, Duration::from_secs(10))?;
    // The version-1 side saw no lease: nothing in its log about one.
    assert!(
        !s.db.log_text().contains("lease"),
        "a version-1 session must carry no lease: {}",
        s.db.log_text()
    );
    // --detach needs leases, so against a version-1 daemon it is refused up front.
    let o = run({
        let mut c = s.hosts.b.command(BIN);
        c.args([
            "migrate", "g1", "--from", &s.b_addr, "--to", &s.a_addr, "--detach", "--certs",
        ])
        .arg(&s.ctl);
        c
    });
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("protocol version 1"),
        "the refusal names the version: {}",
        text(&o)
    );
    wait_running_only_on(&s, Where::B, Duration::from_secs(15))?;
    Ok(())
}
