//! End to end: a daemon killed (kill -9) and started again does not lose its guests. Its
//! QEMUs run on while it is down, the restarted daemon adopts them from its state dir, a
//! migration the kill interrupted is undone on the source (a disk copy's mirrors and
//! nodes too), and the adopted VMs migrate.

mod common;

use anyhow::{Context, Result};
use common::live::*;
use common::*;
use std::time::Duration;

fn vm_list(s: &Setup, on_b: bool) -> Result<serde_json::Value> {
    let (host, addr) = if on_b {
        (&s.hosts.b, &s.b_addr)
    } else {
        (&s.hosts.a, &s.a_addr)
    };
    let o = run({
        let mut c = host.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    anyhow::ensure!(o.status.success(), "vm list: {}", text(&o));
    Ok(serde_json::from_slice(&o.stdout)?)
}

fn pid_of(list: &serde_json::Value, name: &str) -> Option<u64> {
    list.as_array()?
        .iter()
        .find(|v| v["spec"]["name"] == name)
        .and_then(|v| v["pid"].as_u64())
}

#[test]
fn guests_outlive_a_killed_daemon_and_are_adopted_when_it_starts_again() -> Result<()> {
    let mut s = setup("restart")?;
    let (g1_pid, g1_log) = start_guest(&s, "g1")?;
    let (g2_pid, g2_log) = start_guest(&s, "g2")?;
    vmferry_testkit::serial::wait_for_heartbeat(&g1_log, 2, Duration::from_secs(90))?;
    vmferry_testkit::serial::wait_for_heartbeat(&g2_log, 2, Duration::from_secs(90))?;

    // g1's migration is under way (capped, so it is still copying) when the daemon dies.
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate", "g1", "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
    ])
    .arg(&s.ctl)
    .args(["--max-bandwidth", "2M", "--timeout", "60"])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = c.spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.da.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let o = child.wait_with_output()?;
    assert!(!o.status.success(), "the migration went on: {}", text(&o));

    // While the daemon is down, both guests run on.
    assert!(
        pid_alive(g1_pid) && pid_alive(g2_pid),
        "a QEMU died with its daemon"
    );
    let beat = vmferry_testkit::serial::wait_for_heartbeat(&g2_log, 0, Duration::from_secs(1))?;
    vmferry_testkit::serial::wait_for_heartbeat(&g2_log, beat + 2, Duration::from_secs(30))
        .context("g2 counts on while its daemon is down")?;

    s.da.restart(Some(&s.hosts.a))?;
    let log = s.da.log_text();
    let adopted = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(") adopted"))
        .count();
    assert_eq!(adopted, 2, "{log}");
    let list = vm_list(&s, false)?;
    assert_eq!(pid_of(&list, "g1"), Some(u64::from(g1_pid)), "{list}");
    assert_eq!(pid_of(&list, "g2"), Some(u64::from(g2_pid)), "{list}");
    for v in list.as_array().into_iter().flatten() {
        assert_eq!(v["state"], "running", "{list}");
    }
    let beat = vmferry_testkit::serial::wait_for_heartbeat(&g1_log, 0, Duration::from_secs(1))?;
    vmferry_testkit::serial::wait_for_heartbeat(&g1_log, beat + 2, Duration::from_secs(30))
        .context("g1 counts on on the source after the interrupted migration")?;
    // The destination gave up the interrupted migration by itself: no g1 there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pid_of(&vm_list(&s, true)?, "g1").is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        pid_of(&vm_list(&s, true)?, "g1"),
        None,
        "g1 half-arrived on b"
    );

    // Adopted VMs migrate like any other: g1, whose migration was interrupted, too.
    for name in ["g1", "g2"] {
        let o = run({
            let mut c = s.hosts.a.command(BIN);
            c.args([
                "migrate", name, "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
            ])
            .arg(&s.ctl);
            c
        });
        assert!(
            o.status.success(),
            "{name}: {}\n{}",
            text(&o),
            s.da.log_text()
        );
        let b_log = s.db.state_dir.join("vms").join(name).join("serial.log");
        let beat = vmferry_testkit::serial::wait_for_heartbeat(&b_log, 0, Duration::from_secs(30))?;
        vmferry_testkit::serial::wait_for_heartbeat(&b_log, beat + 2, Duration::from_secs(30))
            .with_context(|| format!("{name} counts on on b"))?;
    }
    assert!(
        !pid_alive(g1_pid) && !pid_alive(g2_pid),
        "the adopted source QEMUs stay after their guests left"
    );
    Ok(())
}

#[test]
fn a_disk_copy_interrupted_by_a_source_restart_is_undone_and_can_run_again() -> Result<()> {
    let mut s = setup("restartd")?;
    // A local raw disk of non-zero bytes (zeros would be copied at once), with the text
    // line the guest reads as its label first.
    let disk = s.tmp.path().join("g3-local.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&disk)?;
        f.write_all(b"vmferry restart disk\n")?;
        let mut x: u64 = 0x5eed;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..24 {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
            }
            f.write_all(&buf)?;
        }
    }
    let path = disk.display().to_string();
    let (_pid, a_log) = start_guest_with(&s, "g3", &["--disk", &path])?;
    vmferry_testkit::serial::wait_for_heartbeat(&a_log, 2, Duration::from_secs(90))?;
    let images = s.db.state_dir.join("images");
    let made = || {
        std::fs::read_dir(&images)
            .map(|rd| rd.flatten().count())
            .unwrap_or(0)
    };
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate", "g3", "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
    ])
    .arg(&s.ctl)
    .args([
        "--copy-storage",
        "all",
        "--max-bandwidth",
        "2M",
        "--timeout",
        "60",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = c.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while made() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::ensure!(made() > 0, "no image on b: {}", s.db.log_text());
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.da.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let o = child.wait_with_output()?;
    assert!(!o.status.success(), "the copy went on: {}", text(&o));

    s.da.restart(Some(&s.hosts.a))?;
    let log = s.da.log_text();
    assert!(
        log.contains("mirror vmferry-mirror0 is cancelled")
            && log.contains("node vmferry-nbd0 is removed"),
        "the restart did not undo the copy: {log}"
    );
    // The destination gave up by itself and removed the image it had made.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while made() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(made(), 0, "an image stayed on b");
    let beat = vmferry_testkit::serial::wait_for_heartbeat(&a_log, 0, Duration::from_secs(1))?;
    vmferry_testkit::serial::wait_for_heartbeat(&a_log, beat + 2, Duration::from_secs(30))
        .context("g3 counts on on the source")?;
    // The same node and job names are free again: the copy runs to the end this time.
    let o = run({
        let mut c = s.hosts.a.command(BIN);
        c.args([
            "migrate", "g3", "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
        ])
        .arg(&s.ctl)
        .args(["--copy-storage", "all"]);
        c
    });
    assert!(o.status.success(), "{}\n{}", text(&o), s.da.log_text());
    let b_log = s.db.state_dir.join("vms/g3/serial.log");
    let beat = vmferry_testkit::serial::wait_for_heartbeat(&b_log, 0, Duration::from_secs(30))?;
    vmferry_testkit::serial::wait_for_heartbeat(&b_log, beat + 11, Duration::from_secs(60))?;
    vmferry_testkit::serial::wait_for_disk_check(&b_log, Duration::from_secs(60))?;
    Ok(())
}
