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
    let console = std::fs::read_to_string(&log)?;
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
    assert!(o.status.success(), "cancel: {}", text(&o));
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
    Ok(())
}

#[test]
fn a_guest_that_never_converges_completes_by_post_copy_with_its_memory_intact() -> Result<()> {
    let s = setup("pcopy")?;
    let log = start_busy_guest(&s)?;
    // Switch after 3 s of pre-copy; post-copy is capped like the link, so it lasts long
    // enough to try a cancel in it.
    let mut c = migrate_cmd(
        &s,
        &["--postcopy", "--postcopy-after", "3", "--timeout", "150"],
    );
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let id = loop {
        let o = run({
            let mut c = s.hosts.a.command(BIN);
            c.args(["status", "--json", "--daemon", &s.a_addr, "--certs"])
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
            break m["migration"].as_str().context("id")?.to_string();
        }
        if let Some(st) = child.try_wait()? {
            bail!("migrate ended ({st}) before post-copy was seen");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("post-copy never started");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Cancel during post-copy is refused, with the reason.
    let o = run({
        let mut c = s.hosts.a.command(BIN);
        c.args(["cancel", &id, "--daemon", &s.a_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("post-copy"), "{}", text(&o));
    let st = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    assert!(st.success(), "post-copy migration: {err}");
    // The guest counts on at B, and finds the memory it checks intact.
    let dst_log = s.db.state_dir.join("vms/g1/serial.log");
    let beat = wait_for_heartbeat(&dst_log, 0, Duration::from_secs(30))?;
    let next_check = (beat / 20 + 1) * 20;
    wait_for_heartbeat(&dst_log, next_check + 1, Duration::from_secs(60))
        .context("the guest counts on at B")?;
    let console = std::fs::read_to_string(&dst_log)?;
    assert!(
        console.contains(&format!("vmferry-memcheck ok {next_check}")),
        "the guest checked its memory after post-copy: {console}"
    );
    assert!(!console.contains("vmferry-memcheck BAD"), "{console}");
    assert!(vm_names(&s, false)?.is_empty(), "nothing left on A");
    drop(log);
    Ok(())
}
