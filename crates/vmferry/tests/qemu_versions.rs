//! End to end across QEMU versions: the system's QEMU 7.2 and QEMU 10.0 from
//! bookworm-backports (scripts/qemu10.sh), both ways, as a fleet upgrading its hosts does.
//! Machine types are pinned (10.0's `q35` is pc-q35-10.0, which 7.2 cannot build), and a
//! combination that cannot work is refused before anything moves, saying what to do.

mod common;

use anyhow::{Context, Result};
use common::live::*;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmferry_testkit::ports::free_port;
use vmferry_testkit::qemu::{start_qemu, QemuOpts, QemuProcess};
use vmferry_testkit::require;

const RAM_MIB: u64 = 64;

fn release_of(binary: &Path) -> Result<String> {
    let o = std::process::Command::new(binary)
        .arg("--version")
        .output()?;
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    text.split("version ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
        .with_context(|| format!("no version in {text:?}"))
}

/// A paused QEMU of `binary` with its RAM in a /dev/shm file.
fn paused_qemu(
    dir: &Path,
    tag: &str,
    binary: &str,
    machine: &str,
    ram: &Path,
    incoming: bool,
) -> Result<QemuProcess> {
    let mut o = QemuOpts::new(
        dir.join(format!("{tag}.qmp")),
        dir.join(format!("{tag}.serial")),
    );
    o.binary = binary.to_string();
    o.machine = machine.to_string();
    o.memory_mib = RAM_MIB;
    o.mem_file = Some(ram.to_path_buf());
    o.prealloc = incoming;
    o.paused = !incoming;
    o.incoming = incoming.then(|| "defer".to_string());
    start_qemu(&o)
}

fn fill(path: &Path, seed: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut x = seed | 1;
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

fn shm(tag: &str) -> Result<tempfile::NamedTempFile> {
    require::path("/dev/shm");
    Ok(tempfile::Builder::new()
        .prefix(&format!("vmferry-test-xv-{tag}-"))
        .tempfile_in("/dev/shm")?)
}

fn last_json(o: &std::process::Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or_default()
}

#[test]
fn paused_guests_cross_between_7_2_and_10_0_both_ways_with_one_stream_and_multifd() -> Result<()> {
    require::qemu();
    let q10 = require::qemu10();
    let (old, new) = ("qemu-system-x86_64".to_string(), q10.display().to_string());
    let (v_old, v_new) = (release_of(Path::new(&old))?, release_of(&q10)?);
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
    let (a, b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let _da = DaemonProc::start(None, &a, &tmp.path().join("a"), &certs, &[])?;
    let _db = DaemonProc::start(None, &b, &tmp.path().join("b"), &certs, &[])?;
    let mut n = 0u64;
    for ((src_bin, v_src), (dst_bin, v_dst)) in [
        ((&old, &v_old), (&new, &v_new)),
        ((&new, &v_new), (&old, &v_old)),
    ] {
        for multifd in [0u32, 2] {
            n += 1;
            let (src_ram, dst_ram) = (shm("src")?, shm("dst")?);
            let src = paused_qemu(
                tmp.path(),
                &format!("src{n}"),
                src_bin,
                "pc-q35-7.2",
                src_ram.path(),
                false,
            )?;
            let dst = paused_qemu(
                tmp.path(),
                &format!("dst{n}"),
                dst_bin,
                "pc-q35-7.2",
                dst_ram.path(),
                true,
            )?;
            fill(src_ram.path(), 0x7e2 + n)?;
            let mut c = vmferry();
            c.args(["migrate", "--from", &a, "--to", &b, "--src-qmp"])
                .arg(&src.qmp)
                .arg("--dst-qmp")
                .arg(&dst.qmp)
                .arg("--certs")
                .arg(&certs)
                .args(["--multifd", &multifd.to_string(), "--json"]);
            let o = run(c);
            let case = format!("QEMU {v_src} -> {v_dst}, multifd {multifd}");
            assert!(o.status.success(), "{case}: {}", text(&o));
            let r = last_json(&o);
            assert_eq!(
                r["source_qemu"].as_str(),
                Some(v_src.as_str()),
                "{case}: {r}"
            );
            assert_eq!(
                r["destination_qemu"].as_str(),
                Some(v_dst.as_str()),
                "{case}: {r}"
            );
            assert!(
                std::fs::read(src_ram.path())? == std::fs::read(dst_ram.path())?,
                "{case}: destination RAM differs"
            );
        }
    }
    // A 10.0 source on its own q35 (pc-q35-10.0) cannot go to 7.2: refused, saying what.
    let (src_ram, dst_ram) = (shm("src")?, shm("dst")?);
    let src = paused_qemu(tmp.path(), "srcx", &new, "q35", src_ram.path(), false)?;
    let dst = paused_qemu(tmp.path(), "dstx", &old, "pc-q35-7.2", dst_ram.path(), true)?;
    let mut c = vmferry();
    c.args(["migrate", "--from", &a, "--to", &b, "--src-qmp"])
        .arg(&src.qmp)
        .arg("--dst-qmp")
        .arg(&dst.qmp)
        .arg("--certs")
        .arg(&certs);
    let o = run(c);
    assert!(!o.status.success(), "{}", text(&o));
    let minor = v_old.rsplit_once('.').map(|x| x.0).unwrap_or(&v_old);
    assert!(
        text(&o).contains(&format!(
            "destination QEMU {minor} has no machine type pc-q35-10.0"
        )) && text(&o).contains("-machine pc-q35-7.2"),
        "{}",
        text(&o)
    );
    let mut q = vmferry_qmp::Qmp::connect(&src.qmp, Duration::from_secs(5))?;
    assert!(!q.query_migrate()?.status.is_active());
    Ok(())
}

/// Starts a managed VM with the test guest on `host` through `addr`; returns its serial log.
fn start_vm(
    s: &Setup,
    on_b: bool,
    name: &str,
    extra: &[&str],
) -> Result<(PathBuf, serde_json::Value)> {
    let img = vmferry_testkit::guest::guest_image()?;
    let (host, addr, state) = if on_b {
        (&s.hosts.b, &s.b_addr, &s.db.state_dir)
    } else {
        (&s.hosts.a, &s.a_addr, &s.da.state_dir)
    };
    let mut c = host.command(BIN);
    c.args(["vm", "start", name, "--daemon", addr, "--certs"])
        .arg(&s.ctl)
        .args(["--memory", "256M", "--accel", "tcg", "--kernel"])
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args(["--append", &img.append])
        .args(extra);
    let o = run(c);
    assert!(o.status.success(), "vm start: {}", text(&o));
    let list = run({
        let mut c = host.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    let vm = vms
        .as_array()
        .and_then(|v| v.iter().find(|v| v["spec"]["name"] == name).cloned())
        .with_context(|| format!("{name} not in {vms}"))?;
    Ok((state.join("vms").join(name).join("serial.log"), vm))
}

fn migrate(s: &Setup, name: &str, from_b: bool, extra: &[&str]) -> std::process::Output {
    let (host, from, to) = if from_b {
        (&s.hosts.b, &s.b_addr, &s.a_addr)
    } else {
        (&s.hosts.a, &s.a_addr, &s.b_addr)
    };
    let mut c = host.command(BIN);
    c.args(["migrate", name, "--from", from, "--to", to, "--certs"])
        .arg(&s.ctl)
        .args(extra);
    run(c)
}

#[test]
fn a_running_guest_with_a_live_disk_crosses_7_2_and_10_0_both_ways() -> Result<()> {
    let q10 = require::qemu10();
    let s = setup_with_config(
        "xver",
        &format!("qemu_binary = {:?}\n", q10.display().to_string()),
    )?;
    let dir = s.tmp.path();
    // A disk both hosts see (shared storage); the guest writes and reads it every beat.
    // It starts with a line the guest reads as its label (a blank disk is read to its end).
    let disk = dir.join("g1-shared.raw");
    let mut f = std::fs::File::create(&disk)?;
    f.write_all(b"vmferry cross-version disk\n")?;
    f.set_len(16 << 20)?;
    drop(f);
    let disk = disk.display().to_string();
    let (a_log, vm) = start_vm(&s, false, "g1", &["--disk", &disk])?;
    assert_eq!(vm["spec"]["machine"], "pc-q35-7.2", "q35 is pinned: {vm}");
    // Started on 10.0 as plain q35, a VM is pc-q35-10.0, which 7.2 cannot build.
    let (_, vm2) = start_vm(&s, true, "g2", &[])?;
    assert_eq!(vm2["spec"]["machine"], "pc-q35-10.0", "{vm2}");
    let o = migrate(&s, "g2", true, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o)
            .contains("has no machine type pc-q35-10.0; start the VM with --machine pc-q35-7.2"),
        "{}",
        text(&o)
    );
    assert!(
        !s.da.state_dir.join("vms/g2/qmp.sock").exists(),
        "a QEMU was started on a for g2"
    );
    let o = run({
        let mut c = s.hosts.b.command(BIN);
        c.args(["vm", "stop", "g2", "--daemon", &s.b_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    assert!(o.status.success(), "vm stop: {}", text(&o));

    vmferry_testkit::serial::wait_for_heartbeat(&a_log, 2, Duration::from_secs(90))?;
    let o = migrate(&s, "g1", false, &["--json"]);
    assert!(
        o.status.success(),
        "7.2 -> 10.0: {}\n{}",
        text(&o),
        s.db.log_text()
    );
    let r = last_json(&o);
    assert!(
        r["source_qemu"]
            .as_str()
            .is_some_and(|v| v.starts_with("7.2"))
            && r["destination_qemu"]
                .as_str()
                .is_some_and(|v| v.starts_with("10.0")),
        "{r}"
    );
    // 7.2 runs the guest under TCG: the operator is told that it can lose guest writes.
    let warned = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stderr).contains("TCG before QEMU 9.0 can lose guest writes")
    };
    assert!(warned(&o), "no TCG warning from 7.2: {}", text(&o));
    let b_log = s.db.state_dir.join("vms/g1/serial.log");
    let beat = vmferry_testkit::serial::wait_for_heartbeat(&b_log, 0, Duration::from_secs(30))?;
    vmferry_testkit::serial::wait_for_heartbeat(&b_log, beat + 3, Duration::from_secs(30))
        .context("the guest counts on under QEMU 10.0")?;

    let o = migrate(&s, "g1", true, &["--multifd", "2"]);
    assert!(
        o.status.success(),
        "10.0 -> 7.2: {}\n{}",
        text(&o),
        s.da.log_text()
    );
    assert!(!warned(&o), "a TCG warning from 10.0: {}", text(&o));
    let beat = vmferry_testkit::serial::wait_for_heartbeat(&a_log, beat, Duration::from_secs(30))?;
    vmferry_testkit::serial::wait_for_heartbeat(&a_log, beat + 3, Duration::from_secs(30))
        .context("the guest counts on under QEMU 7.2 again")?;
    vmferry_testkit::serial::wait_for_disk_check(&a_log, Duration::from_secs(60))?;
    Ok(())
}
