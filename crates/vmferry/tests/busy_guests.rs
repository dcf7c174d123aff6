//! End to end: a guest that dirties memory faster than a capped link carries it (the
//! test guest with `vmferry.busy=MIB`), between two hosts. Without help, pre-copy cannot
//! finish: `--timeout` fails it with a cause an operator can act on and the guest keeps
//! running; `vmferry cancel` from a second controller stops it the same way;
//! `--auto-converge` throttles the guest until it converges, and the live view shows the
//! throttle rising.

mod common;

use anyhow::{bail, Context, Result};
use common::live::*;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};
use vmferry_testkit::guest::guest_image;
use vmferry_testkit::require;
use vmferry_testkit::serial::wait_for_heartbeat;

/// The link: slower than the busy guest dirties memory.
const CAP: &str = "10M";

fn start_busy_guest(s: &Setup) -> Result<std::path::PathBuf> {
    let img = guest_image()?;
    let mut c = s.hosts.a.command(BIN);
    c.args(["vm", "start", "g1", "--daemon", &s.a_addr, "--certs"])
        .arg(&s.ctl)
        .args([
            "--memory", "384M", "--cpus", "1", "--accel", "tcg", "--kernel",
        ])
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args(["--append", &format!("{} vmferry.busy=64", img.append)]);
    let o = run(c);
    assert!(o.status.success(), "vm start: {}", text(&o));
    let log = s.da.state_dir.join("vms/g1/serial.log");
    wait_for_heartbeat(&log, 2, Duration::from_secs(90))?;
    let console = String::from_utf8_lossy(&std::fs::read(&log)?).to_string();
    assert!(console.contains("dirtying 64 MiB"), "{console}");
    Ok(log)
}

fn vm_names(s: &Setup, on_b: bool) -> Result<Vec<String>> {
    let (h, addr) = if on_b {
        (&s.hosts.b, &s.b_addr)
    } else {
        (&s.hosts.a, &s.a_addr)
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
        .map(|vm| format!("{} {}", vm["spec"]["name"], vm["state"]))
        .collect())
}

/// The guest runs on A, counts on, and B holds nothing (after a failed migration).
fn still_on_a(s: &Setup, log: &std::path::Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !vm_names(s, true)?.is_empty() {
        if Instant::now() > deadline {
            bail!("B still holds {:?}", vm_names(s, true)?);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(vm_names(s, false)?, vec![r#""g1" "running""#.to_string()]);
    let beat = wait_for_heartbeat(log, 0, Duration::from_secs(1))?;
    wait_for_heartbeat(log, beat + 2, Duration::from_secs(30))
        .context("the guest must count on")?;
    Ok(())
}

fn migrate_cmd(s: &Setup, extra: &[&str]) -> std::process::Command {
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate", "g1", "--from", &s.a_addr, "--to", &s.b_addr, "--json",
    ])
    .args(["--max-bandwidth", CAP])
    .args(extra)
    .arg("--certs")
    .arg(&s.ctl);
    c
}

#[test]
fn a_guest_that_dirties_faster_than_the_link_fails_with_a_cause_is_cancelled_or_converges(
) -> Result<()> {
    let s = setup("busy")?;
    let log = start_busy_guest(&s)?;

    // 1. No help: --timeout fails it, saying why and what to try.
    let o = run(migrate_cmd(&s, &["--timeout", "40"]));
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not converging: the guest dirties")
            && err.contains("try --postcopy or --auto-converge"),
        "{}",
        text(&o)
    );
    assert!(err.contains("the source VM keeps running"), "{err}");
    still_on_a(&s, &log)?;

    // 2. Cancelled from a second controller while pre-copy runs.
    let mut first = migrate_cmd(&s, &[])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let o = run({
            let mut c = s.hosts.a.command(BIN);
            c.args(["status", "--json", "--daemon", &s.a_addr, "--certs"])
                .arg(&s.ctl);
            c
        });
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let running = v.as_array().into_iter().flatten().find(|m| {
            m["role"] == "source"
                && m["status"]["finished"] == false
                && m["status"]["ram_transferred"].as_u64().unwrap_or(0) > 0
        });
        if let Some(m) = running {
            break m["migration"].as_str().context("id")?.to_string();
        }
        if Instant::now() > deadline {
            let _ = first.kill();
            bail!("the migration never got going");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let o = run({
        let mut c = s.hosts.b.command(BIN); // any controller, anywhere
        c.args(["cancel", &id, "--daemon", &s.a_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    if !o.status.success() {
        // Say what became of the migration it could not cancel.
        let _ = first.kill();
        let _ = first.wait();
        let mut err = String::new();
        if let Some(mut e) = first.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!(
            "cancel: {}\nthe migrating controller said: {err}\nsource daemon log:\n{}\n\
             destination daemon log:\n{}",
            text(&o),
            s.da.log_text(),
            s.db.log_text()
        );
    }
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("the source VM keeps running"),
        "{}",
        text(&o)
    );
    let st = first.wait()?;
    let mut err = String::new();
    if let Some(mut e) = first.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("cancelled by"),
        "the first controller says who: {err}"
    );
    still_on_a(&s, &log)?;

    // 3. --auto-converge throttles the guest until pre-copy finishes; the live view shows
    // the throttle rising.
    let mut c = migrate_cmd(
        &s,
        &[
            "--auto-converge",
            "--throttle-initial",
            "40",
            "--throttle-increment",
            "30",
            "--timeout",
            "150",
        ],
    );
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut throttles = Vec::new();
    let mut result = serde_json::Value::Null;
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        if v["event"] == "progress" {
            throttles.push(v["throttle_pct"].as_u64().unwrap_or(0));
        } else {
            result = v;
        }
    }
    let st = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    assert!(st.success(), "auto-converge: {err} {result}");
    assert_eq!(result["ok"], true, "{result}");
    let max = throttles.iter().copied().max().unwrap_or(0);
    assert!(max >= 40, "the throttle must show, rising: {throttles:?}");
    assert_eq!(
        throttles.first(),
        Some(&0),
        "no throttle before it is needed: {throttles:?}"
    );
    let dst_log = s.db.state_dir.join("vms/g1/serial.log");
    let beat = wait_for_heartbeat(&dst_log, 0, Duration::from_secs(30))?;
    wait_for_heartbeat(&dst_log, beat + 2, Duration::from_secs(30))
        .context("the guest counts on at B")?;
    // What it dirtied from at boot arrived intact, every page of it.
    vmferry_testkit::serial::wait_for_memory_check(&dst_log, Duration::from_secs(60))?;
    Ok(())
}

/// Starts a post-copy migration between the hosts (`from_a`: A to B) and waits until the
/// source says it is in post-copy; returns the migration id and the controller.
fn start_postcopy(
    s: &Setup,
    from_a: bool,
    transport: &str,
) -> Result<(String, std::process::Child)> {
    let (h, src, dst) = if from_a {
        (&s.hosts.a, &s.a_addr, &s.b_addr)
    } else {
        (&s.hosts.b, &s.b_addr, &s.a_addr)
    };
    let mut c = h.command(BIN);
    c.args(["migrate", "g1", "--from", src, "--to", dst])
        .args(["--max-bandwidth", CAP, "--transport", transport])
        // Switch after 3 s of pre-copy; post-copy is capped like the link, so it lasts
        // long enough to act in it.
        .args(["--postcopy", "--postcopy-after", "3", "--timeout", "150"])
        .arg("--certs")
        .arg(&s.ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let o = run({
            let mut c = h.command(BIN);
            c.args(["status", "--json", "--daemon", src, "--certs"])
                .arg(&s.ctl);
            c
        });
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let in_postcopy = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["role"] == "source" && m["status"]["state"] == "post_copy");
        if let Some(m) = in_postcopy {
            return Ok((m["migration"].as_str().context("id")?.to_string(), child));
        }
        if let Some(st) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut err)?;
            }
            bail!("migrate over {transport} ended ({st}) before post-copy was seen: {err}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("post-copy over {transport} never started");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finish(mut child: std::process::Child) -> Result<(bool, String)> {
    let st = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    Ok((st.success(), err))
}

/// The guest counts on in `log` past its next memory check, which says ok.
fn counts_on_intact(log: &std::path::Path) -> Result<()> {
    let beat = wait_for_heartbeat(log, 0, Duration::from_secs(30))?;
    let next_check = (beat / 20 + 1) * 20;
    wait_for_heartbeat(log, next_check + 1, Duration::from_secs(60))
        .context("the guest counts on")?;
    let console = String::from_utf8_lossy(&std::fs::read(log)?).to_string();
    assert!(
        console.contains(&format!("vmferry-memcheck ok {next_check}")),
        "the guest checked its memory after post-copy: {console}"
    );
    assert!(!console.contains("vmferry-memcheck BAD"), "{console}");
    Ok(())
}

#[test]
fn a_guest_that_never_converges_completes_by_post_copy_on_every_transport() -> Result<()> {
    let s = setup("pcopy")?;
    let a_log = start_busy_guest(&s)?;
    let b_log = s.db.state_dir.join("vms/g1/serial.log");
    for (from_a, transport) in [(true, "direct"), (false, "tunnel"), (true, "reverse")] {
        let (id, child) = start_postcopy(&s, from_a, transport)?;
        if transport == "direct" {
            // Cancel during post-copy is refused, with the reason.
            let src = if from_a { &s.a_addr } else { &s.b_addr };
            let o = run({
                let mut c = s.hosts.a.command(BIN);
                c.args(["cancel", &id, "--daemon", src, "--certs"])
                    .arg(&s.ctl);
                c
            });
            assert!(!o.status.success(), "{}", text(&o));
            assert!(text(&o).contains("post-copy"), "{}", text(&o));
        }
        let (ok, err) = finish(child)?;
        assert!(ok, "post-copy over {transport}: {err}");
        if transport == "direct" {
            // Both QEMUs have postcopy-preempt: its channel is a second stream, which QEMU
            // 10 opens only when post-copy starts, long after the first.
            let b = s.db.log_text();
            assert!(
                b.lines()
                    .any(|l| l.contains("data streams reached QEMU") && l.contains("streams=2")),
                "the preempt channel is carried: {b}"
            );
            let a = s.da.log_text();
            assert!(
                a.contains("QEMU opened post-copy's preempt channel"),
                "the source took QEMU's preempt channel when post-copy started: {a}"
            );
        }
        counts_on_intact(if from_a { &b_log } else { &a_log })
            .with_context(|| format!("after post-copy over {transport}"))?;
        assert!(
            vm_names(&s, !from_a)?.is_empty(),
            "nothing left on the source after {transport}"
        );
    }
    Ok(())
}

#[test]
fn a_destination_qemu_killed_during_post_copy_is_reported_as_losing_the_guest() -> Result<()> {
    let s = setup("pckill")?;
    let _log = start_busy_guest(&s)?;
    let (_id, child) = start_postcopy(&s, true, "direct")?;
    let o = run({
        let mut c = s.hosts.b.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", &s.b_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let pid = v[0]["pid"].as_u64().context("the destination QEMU's pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let (ok, err) = finish(child)?;
    assert!(!ok, "{err}");
    assert!(
        err.contains("the guest is lost") && err.contains("destination QEMU exited"),
        "says the guest is lost and why: {err}"
    );
    assert!(!err.contains("keeps running"), "{err}");
    Ok(())
}

#[test]
fn a_post_copy_whose_link_is_cut_for_seconds_recovers_by_itself_on_every_transport() -> Result<()> {
    require::command("nft");
    let s = setup("pcut")?;
    let a_log = start_busy_guest(&s)?;
    let b_log = s.db.state_dir.join("vms/g1/serial.log");
    let quiet = |log: String| -> String {
        log.lines()
            .filter(|l| !l.contains(r#""what":"connection""#) && !l.contains(r#""what":"request""#))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (from_a, transport) in [(true, "direct"), (false, "tunnel"), (true, "reverse")] {
        let (_id, child) = start_postcopy(&s, from_a, transport)?;
        // A real link cut: host b drops every packet (in and out) for 8 s, longer than
        // the daemons' 5 s peer silence, then lets them through again.
        s.hosts.b.nft(
            "table inet vmferry_cut {
               chain input { type filter hook input priority -10; policy drop; }
               chain output { type filter hook output priority -10; policy drop; }
             }",
        )?;
        std::thread::sleep(Duration::from_secs(8));
        s.hosts.b.nft("delete table inet vmferry_cut")?;
        let (ok, err) = finish(child)?;
        assert!(
            ok,
            "post-copy over {transport} across a link cut: {err}\n--- a:\n{}\n--- b:\n{}",
            quiet(s.da.log_text()),
            quiet(s.db.log_text())
        );
        counts_on_intact(if from_a { &b_log } else { &a_log })
            .with_context(|| format!("after the recovered post-copy over {transport}"))?;
        let src_log = if from_a {
            s.da.log_text()
        } else {
            s.db.log_text()
        };
        assert_eq!(
            src_log
                .matches("post-copy resumed over a new channel")
                .count(),
            if transport == "reverse" { 2 } else { 1 },
            "the source recovered over {transport}, not something else: {src_log}"
        );
    }
    Ok(())
}
