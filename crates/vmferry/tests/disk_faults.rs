//! End to end, disk copy (`--copy-storage`) cut short: the destination QEMU or daemon
//! killed, the link cut, in attach and managed mode. The source keeps running on its own
//! images with no job or node of vmferry's left, and a destination leaves no image behind.
//! Also managed mode's whole path: a VM started with a local disk moves with it.

mod common;

use anyhow::{bail, Context, Result};
use common::disks::*;
use common::live::*;
use common::*;
use std::path::PathBuf;
use std::time::Duration;
use vmferry_testkit::require;

#[test]
fn a_copy_that_fails_midway_leaves_the_source_running_on_its_own_images() -> Result<()> {
    require::command("nft");
    let s = setup("diskfault")?;
    let dir = s.tmp.path();
    // The daemon's kill comes last: the other faults need it.
    for (n, fault) in ["qemu", "link", "daemon"].into_iter().enumerate() {
        let src_img = image(dir, &format!("src{n}"), "qcow2", 48, Some(0xfa + n as u64))?;
        let pristine = dir.join(format!("pristine{n}.qcow2"));
        std::fs::copy(&src_img, &pristine)?;
        let dst_img = image(dir, &format!("dst{n}"), "qcow2", 48, None)?;
        let src = qemu(
            dir,
            &format!("fsrc{n}"),
            &[("vd0", &src_img, "qcow2")],
            false,
        )?;
        let dst = qemu(
            dir,
            &format!("fdst{n}"),
            &[("vd0", &dst_img, "qcow2")],
            true,
        )?;
        // 48 MiB at 4 MiB/s: the copy is still running when the fault comes.
        let mut c = migrate_cmd(
            &s,
            &src,
            &dst,
            &["--copy-storage", "all", "--max-bandwidth", "4M"],
        );
        if fault == "link" {
            c.args(["--timeout", "10"]);
        }
        let child = c
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(4));
        let mut dst = Some(dst);
        match fault {
            "qemu" => drop(dst.take()),
            "link" => s.hosts.b.nft(
                "table inet vmferry_cut {
                   chain input { type filter hook input priority -10; policy drop; }
                   chain output { type filter hook output priority -10; policy drop; }
                 }",
            )?,
            _ => {
                let pid = s.db.child.id();
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )?;
            }
        }
        let o = child.wait_with_output()?;
        if fault == "link" {
            s.hosts.b.nft("delete table inet vmferry_cut")?;
        }
        assert!(!o.status.success(), "{fault}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(err.contains("disk vd0"), "{fault}: names the disk: {err}");
        assert!(
            err.contains("the source VM keeps running"),
            "{fault}: {err}"
        );
        source_as_it_was(&src).with_context(|| {
            format!(
                "after the {fault} fault; source daemon:\n{}",
                s.da.log_text()
            )
        })?;
        quit(src)?;
        identical(&src_img, &pristine).with_context(|| format!("after the {fault} fault"))?;
        drop(dst);
    }
    Ok(())
}

/// Managed mode: a VM started with a local disk (`vm start --disk`) is migrated with its
/// disk; the destination daemon creates the image itself in its images directory.
#[test]
fn a_managed_vm_with_a_local_disk_moves_with_it() -> Result<()> {
    let s = setup("diskvm")?;
    let dir = s.tmp.path();
    let img = image(dir, "g1-local", "qcow2", DISK_MIB, Some(0x10ca1))?;
    let disk = img.display().to_string();
    let (_pid, a_log) = start_guest_with(&s, "g1", &["--disk", &disk])?;
    vmferry_testkit::serial::wait_for_heartbeat(&a_log, 2, Duration::from_secs(90))?;
    let images = s.db.state_dir.join("images");
    let made = || -> Vec<PathBuf> {
        std::fs::read_dir(&images)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let migrate = |extra: &[&str]| {
        let mut c = s.hosts.a.command(BIN);
        c.args([
            "migrate", "g1", "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
        ])
        .arg(&s.ctl)
        .args(extra);
        run(c)
    };
    // inc needs a backing file, which this disk does not have: refused, nothing made.
    let o = migrate(&["--copy-storage", "inc"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("disk disk0"), "{}", text(&o));
    assert!(made().is_empty(), "images left behind: {:?}", made());
    // The destination QEMU killed while the disk is copied: the images it was given go,
    // the guest keeps running on the source.
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate", "g1", "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
    ])
    .arg(&s.ctl)
    .args(["--copy-storage", "all", "--max-bandwidth", "4M"])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = c.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pid = loop {
        let o = run({
            let mut c = s.hosts.b.command(BIN);
            c.args(["vm", "list", "--json", "--daemon", &s.b_addr, "--certs"])
                .arg(&s.ctl);
            c
        });
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        match v[0]["pid"].as_u64() {
            Some(p) if !made().is_empty() => break p,
            _ if std::time::Instant::now() > deadline => bail!("no destination VM: {v}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let o = child.wait_with_output()?;
    assert!(!o.status.success(), "{}", text(&o));
    // Mid-copy the error names the disk; on a loaded machine the copy may have finished
    // and the RAM be under way, when the cause alone is said.
    assert!(
        text(&o).contains("disk disk0") || text(&o).contains("destination QEMU exited"),
        "{}",
        text(&o)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !made().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(made().is_empty(), "images left behind: {:?}", made());
    let beat = vmferry_testkit::serial::wait_for_heartbeat(&a_log, 0, Duration::from_secs(1))?;
    vmferry_testkit::serial::wait_for_heartbeat(&a_log, beat + 2, Duration::from_secs(30))
        .context("the guest counts on on the source")?;
    // all: the disk moves with the guest.
    let o = migrate(&["--copy-storage", "all"]);
    assert!(o.status.success(), "{}", text(&o));
    let created = made();
    assert_eq!(created.len(), 1, "{created:?}");
    let b_log = s.db.state_dir.join("vms/g1/serial.log");
    vmferry_testkit::serial::wait_for_heartbeat(&b_log, 11, Duration::from_secs(60))?;
    // The destination's console may start past beat 11 before its first check (seen in
    // CI): wait for one.
    vmferry_testkit::serial::wait_for_disk_check(&b_log, Duration::from_secs(60))?;
    let o = run({
        let mut c = s.hosts.b.command(BIN);
        c.args(["vm", "stop", "g1", "--daemon", &s.b_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    assert!(o.status.success(), "vm stop: {}", text(&o));
    let (a, b) = (raw_bytes(dir, &img)?, raw_bytes(dir, &created[0])?);
    assert!(
        a[..512] == b[..512] && a[1024..] == b[1024..],
        "the copy differs"
    );
    Ok(())
}

#[test]
fn a_managed_copy_cut_short_leaves_no_image_and_no_qemu_on_the_destination() -> Result<()> {
    require::command("nft");
    let mut s = setup("diskcut")?;
    let dir = s.tmp.path().to_path_buf();
    let img = image(&dir, "g2-local", "qcow2", DISK_MIB, Some(0xc07))?;
    let disk = img.display().to_string();
    let (_pid, a_log) = start_guest_with(&s, "g2", &["--disk", &disk])?;
    vmferry_testkit::serial::wait_for_heartbeat(&a_log, 2, Duration::from_secs(90))?;
    let b_state = s.db.state_dir.clone();
    let images = b_state.join("images");
    let made = || -> Vec<PathBuf> {
        std::fs::read_dir(&images)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let b_qemus = || qemu_pids_under(&b_state).len();
    for fault in ["link", "daemon"] {
        // 24 MiB at 4 MiB/s: the copy runs for seconds after the images appear.
        let mut c = s.hosts.a.command(BIN);
        c.args([
            "migrate", "g2", "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
        ])
        .arg(&s.ctl)
        .args(["--copy-storage", "all", "--max-bandwidth", "4M"])
        .args(["--timeout", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let child = c.spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while made().is_empty() {
            if std::time::Instant::now() > deadline {
                bail!("{fault}: no image made on b:\n{}", s.db.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        match fault {
            "link" => s.hosts.b.nft(
                "table inet vmferry_cut {
                   chain input { type filter hook input priority -10; policy drop; }
                   chain output { type filter hook output priority -10; policy drop; }
                 }",
            )?,
            _ => {
                let pid = s.db.child.id();
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )?;
            }
        }
        let o = child.wait_with_output()?;
        assert!(!o.status.success(), "{fault}: {}", text(&o));
        assert!(
            text(&o).contains("the source VM keeps running"),
            "{fault}: {}",
            text(&o)
        );
        match fault {
            "link" => {
                // The destination, alone, gives up and undoes what it made.
                s.hosts.b.nft("delete table inet vmferry_cut")?;
                let deadline = std::time::Instant::now() + Duration::from_secs(40);
                while (!made().is_empty() || b_qemus() > 0) && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            _ => {
                // Killed, it could undo nothing: its restart does.
                assert!(
                    !made().is_empty(),
                    "the half copy is there before the restart"
                );
                s.db.restart(Some(&s.hosts.b))?;
                assert!(
                    s.db.log_text().contains("is rolled back"),
                    "{}",
                    s.db.log_text()
                );
            }
        }
        assert!(
            made().is_empty(),
            "{fault}: images left behind: {:?}",
            made()
        );
        assert_eq!(
            b_qemus(),
            0,
            "{fault}: a QEMU left on b:\n{}",
            s.db.log_text()
        );
        let beat = vmferry_testkit::serial::wait_for_heartbeat(&a_log, 0, Duration::from_secs(1))?;
        vmferry_testkit::serial::wait_for_heartbeat(&a_log, beat + 2, Duration::from_secs(30))
            .with_context(|| format!("{fault}: the guest counts on on the source"))?;
    }
    // After the restart, the same VM moves with its disk.
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate", "g2", "--from", &s.a_addr, "--to", &s.b_addr, "--certs",
    ])
    .arg(&s.ctl)
    .args(["--copy-storage", "all"]);
    let o = run(c);
    assert!(o.status.success(), "{}\n{}", text(&o), s.db.log_text());
    assert_eq!(made().len(), 1, "{:?}", made());
    Ok(())
}
