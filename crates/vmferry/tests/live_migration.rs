//! End to end: a real guest migrates between two hosts (network namespaces joined by a
//! veth pair), each running its own `vmferry serve`; and when the destination dies
//! mid-migration, the source guest keeps running.

mod common;

use anyhow::Result;
use common::live::*;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};
use vmferry_testkit::require;
use vmferry_testkit::serial::{heartbeats, wait_for_heartbeat};

#[test]
fn a_running_guest_migrates_between_two_hosts_and_keeps_counting() -> Result<()> {
    let s = setup("live")?;
    // A disk on storage both hosts see at the same path (here: the same filesystem).
    // The guest prints its first line at boot and writes every heartbeat into sector 1.
    let disk = s.tmp.path().join("shared-disk.raw");
    std::fs::write(&disk, b"vmferry-shared-disk-label\n")?;
    std::fs::File::options()
        .write(true)
        .open(&disk)?
        .set_len(1 << 20)?;
    let disk_arg = disk.to_string_lossy().into_owned();
    let (src_pid, src_log) = start_guest_with(&s, "g1", &["--disk", &disk_arg])?;
    let before = wait_for_heartbeat(&src_log, 3, Duration::from_secs(90))?;
    // A serial console may carry bytes that are not UTF-8.
    let console = String::from_utf8_lossy(&std::fs::read(&src_log)?).to_string();
    assert!(
        console.contains("vmferry-disk: vmferry-shared-disk-label"),
        "the guest did not read its disk: {console}"
    );

    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate", "g1", "--from", &s.a_addr, "--to", &s.b_addr, "--json", "--certs",
    ])
    .arg(&s.ctl);
    let o = run(c);
    assert!(o.status.success(), "migrate: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let result: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a result line"))?;
    assert_eq!(result["event"], "result");
    assert_eq!(result["ok"], true);
    assert_eq!(result["transport"], "direct");
    assert!(result["bytes"].as_u64().unwrap_or(0) > 1 << 20, "{result}");

    // The counter continues on the destination: its console starts where the source
    // stopped, never from 1, and keeps rising.
    let dst_log = s.db.state_dir.join("vms/g1/serial.log");
    wait_for_heartbeat(&dst_log, before + 3, Duration::from_secs(60))?;
    let dst_beats = heartbeats(&dst_log);
    let first = *dst_beats.first().expect("heartbeats on the destination");
    assert!(
        first >= before,
        "destination restarted counting at {first} (source was at {before}); destination \
         console:\n{}\n--- source daemon:\n{}\n--- destination daemon:\n{}",
        String::from_utf8_lossy(&std::fs::read(&dst_log)?),
        s.da.log_text(),
        s.db.log_text()
    );
    // Rising from there: waited for explicitly, since the source may have counted past
    // `before + 3` during the migration, so the line above can be the destination's
    // first and only one so far.
    let after = wait_for_heartbeat(&dst_log, first + 2, Duration::from_secs(60))?;
    assert!(after > first);

    // The guest on the destination writes to the same disk: its sector 1 holds a
    // heartbeat the destination printed.
    let bytes = std::fs::read(&disk)?;
    let written: u64 = String::from_utf8_lossy(&bytes[512..532])
        .trim_end_matches('\0')
        .trim()
        .parse()?;
    assert!(
        written >= first,
        "disk holds heartbeat {written}, older than the destination's first ({first})"
    );

    // The source QEMU is gone and the source daemon no longer lists the VM.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(src_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_alive(src_pid), "source QEMU {src_pid} still runs");
    let list = run({
        let mut c = s.hosts.a.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", &s.a_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    assert_eq!(vms.as_array().map(|a| a.len()), Some(0), "{vms}");
    drop(s.tmp);
    Ok(())
}

#[test]
fn killing_the_destination_mid_migration_keeps_the_source_guest_running() -> Result<()> {
    let mut s = setup("fail")?;
    let (src_pid, src_log) = start_guest(&s, "g2")?;
    wait_for_heartbeat(&src_log, 2, Duration::from_secs(90))?;

    // A slow migration, so there is time to kill the destination in the middle of it.
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate",
        "g2",
        "--from",
        &s.a_addr,
        "--to",
        &s.b_addr,
        "--json",
        "--max-bandwidth",
        "2M",
        "--certs",
    ])
    .arg(&s.ctl)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    // Wait until guest memory is really flowing.
    loop {
        let Some(line) = lines.next() else {
            panic!("migrate ended before data flowed")
        };
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        if v["ram_transferred"].as_u64().unwrap_or(0) > 1 << 20 {
            break;
        }
    }
    s.db.kill();
    kill_qemus_under(&s.db.state_dir);

    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "migrate hung after the destination died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut err)?;
    assert!(!status.success(), "migrate must fail");
    assert!(err.contains("failed"), "no cause given: {err}");
    assert!(err.contains("source VM keeps running"), "{err}");

    // The source guest is alive, running, and its heartbeat goes on.
    assert!(pid_alive(src_pid));
    let last = *heartbeats(&src_log).last().expect("beats");
    wait_for_heartbeat(&src_log, last + 3, Duration::from_secs(30))?;
    let list = run({
        let mut c = s.hosts.a.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", &s.a_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    assert_eq!(vms[0]["state"], "running", "{vms}");
    Ok(())
}

#[test]
fn ctrl_c_during_a_migration_rolls_back_and_the_source_guest_keeps_running() -> Result<()> {
    let s = setup("ctrlc")?;
    let (src_pid, src_log) = start_guest(&s, "g3")?;
    wait_for_heartbeat(&src_log, 2, Duration::from_secs(90))?;
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate",
        "g3",
        "--from",
        &s.a_addr,
        "--to",
        &s.b_addr,
        "--json",
        "--max-bandwidth",
        "2M",
        "--certs",
    ])
    .arg(&s.ctl)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    loop {
        let Some(line) = lines.next() else {
            panic!("migrate ended before data flowed")
        };
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        if v["ram_transferred"].as_u64().unwrap_or(0) > 1 << 20 {
            break;
        }
    }
    // `ip netns exec` runs vmferry as its child: signal the vmferry process itself.
    let out = std::process::Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(child.id() as i32);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "migrate did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut err)?;
    assert!(!status.success());
    assert!(
        err.contains("cancelled by the operator") && err.contains("source VM keeps running"),
        "{err}"
    );
    assert!(pid_alive(src_pid));
    let last = *heartbeats(&src_log).last().expect("beats");
    wait_for_heartbeat(&src_log, last + 3, Duration::from_secs(30))?;
    // The destination holds nothing: no incoming VM left behind.
    let list = run({
        let mut c = s.hosts.b.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", &s.b_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    assert_eq!(vms.as_array().map(|a| a.len()), Some(0), "{vms}");
    Ok(())
}

#[test]
fn the_local_control_socket_serves_root_and_refuses_other_uids() -> Result<()> {
    require::command("setpriv");
    let s = setup("unix")?;
    // Let the other uid reach the socket, so that the daemon's check is what refuses it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.tmp.path(), std::fs::Permissions::from_mode(0o711))?;
    let sock = s.da.state_dir.join("control.sock");
    let o = run({
        let mut c = vmferry();
        c.args(["vm", "list", "--daemon"]).arg(&sock);
        c
    });
    assert!(o.status.success(), "root on the unix socket: {}", text(&o));
    let o = run({
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BIN,
            "vm",
            "list",
            "--daemon",
        ])
        .arg(&sock);
        c
    });
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("uid 65534") && err.contains("not allowed"),
        "{err}"
    );
    Ok(())
}
