//! End to end, disk copy (`--copy-storage`) in attach mode between two netns hosts: QEMUs
//! with `-blockdev` disks on local images, the destination's blank, the source's full of
//! a known pattern. After the migration the two images are identical (`qemu-img
//! compare`), and the source QEMU has no job or node of vmferry's left.

mod common;

use anyhow::{bail, Context, Result};
use common::live::*;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmferry_testkit::qemu::{start_qemu, QemuOpts, QemuProcess};
use vmferry_testkit::require;

const DISK_MIB: u64 = 24;

/// A disk image: `format` qcow2 or raw, `mib` MiB, filled with pseudo-random data (and a
/// marker) when `seed` is given, blank otherwise.
fn image(dir: &Path, name: &str, format: &str, mib: u64, seed: Option<u64>) -> Result<PathBuf> {
    require::command("qemu-img");
    let path = dir.join(format!("{name}.{format}"));
    match seed {
        None => {
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", format])
                .arg(&path)
                .arg(format!("{mib}M"))
                .output()?;
            if !o.status.success() {
                bail!("qemu-img create: {}", text(&o));
            }
        }
        Some(seed) => {
            let raw = dir.join(format!("{name}.fill"));
            let mut f = std::fs::File::create(&raw)?;
            let mut x = seed | 1;
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..mib {
                for c in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
                }
                f.write_all(&buf)?;
            }
            f.sync_all()?;
            let o = Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", format])
                .arg(&raw)
                .arg(&path)
                .output()?;
            std::fs::remove_file(&raw)?;
            if !o.status.success() {
                bail!("qemu-img convert: {}", text(&o));
            }
        }
    }
    Ok(path)
}

/// `-blockdev` and `-device` arguments for disks (id, image, format).
fn disk_args(disks: &[(&str, &Path, &str)]) -> Vec<String> {
    let mut a = Vec::new();
    for (id, path, format) in disks {
        a.push("-blockdev".into());
        a.push(format!(
            "driver=file,node-name=file-{id},filename={}",
            path.display()
        ));
        a.push("-blockdev".into());
        a.push(format!("driver={format},node-name=fmt-{id},file=file-{id}"));
        a.push("-device".into());
        a.push(format!("virtio-blk-pci,drive=fmt-{id},id={id}"));
    }
    a
}

fn qemu(
    dir: &Path,
    tag: &str,
    disks: &[(&str, &Path, &str)],
    incoming: bool,
) -> Result<QemuProcess> {
    require::qemu();
    let mut o = QemuOpts::new(
        dir.join(format!("{tag}.qmp")),
        dir.join(format!("{tag}.serial")),
    );
    o.memory_mib = 64;
    o.paused = !incoming;
    o.incoming = incoming.then(|| "defer".to_string());
    o.extra_args = disk_args(disks);
    start_qemu(&o)
}

fn migrate(
    s: &Setup,
    src: &QemuProcess,
    dst: &QemuProcess,
    extra: &[&str],
) -> std::process::Output {
    let mut c = s.hosts.a.command(BIN);
    c.args([
        "migrate",
        "--from",
        &s.a_addr,
        "--to",
        &s.b_addr,
        "--src-qmp",
    ])
    .arg(&src.qmp)
    .arg("--dst-qmp")
    .arg(&dst.qmp)
    .arg("--certs")
    .arg(&s.ctl)
    .args(extra);
    run(c)
}

/// Ends QEMU with `quit` (a killed QEMU could leave qcow2 metadata unwritten) and waits
/// for it to be gone.
fn quit(q: QemuProcess) -> Result<()> {
    let mut c = vmferry_qmp::Qmp::connect(&q.qmp, Duration::from_secs(5))?;
    let _ = c.execute("quit", None);
    drop(c);
    for _ in 0..200 {
        if vmferry_qmp::Qmp::connect(&q.qmp, Duration::from_millis(50)).is_err() {
            drop(q);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("QEMU did not quit")
}

fn identical(a: &Path, b: &Path) -> Result<()> {
    let o = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()?;
    if !o.status.success() {
        bail!("{} and {} differ: {}", a.display(), b.display(), text(&o));
    }
    Ok(())
}

/// The source QEMU has no block job and no node of vmferry's.
fn nothing_left(src: &QemuProcess) -> Result<()> {
    let mut q = vmferry_qmp::Qmp::connect(&src.qmp, Duration::from_secs(5))?;
    let jobs = q.block_jobs()?;
    if !jobs.is_empty() {
        bail!("block jobs left on the source: {jobs:?}");
    }
    let nodes = q.execute("query-named-block-nodes", None)?;
    if nodes.to_string().contains("vmferry") {
        bail!("nodes of vmferry's left on the source: {nodes}");
    }
    Ok(())
}

#[test]
fn disks_are_copied_over_every_transport_and_arrive_identical() -> Result<()> {
    let s = setup("disks")?;
    let dir = s.tmp.path();
    for (n, transport) in ["direct", "tunnel", "reverse"].into_iter().enumerate() {
        let seed = 0xd15c + n as u64;
        let src_q = image(dir, &format!("src{n}-vd0"), "qcow2", DISK_MIB, Some(seed))?;
        let src_r = image(dir, &format!("src{n}-vd1"), "raw", 8, Some(seed + 1))?;
        let dst_q = image(dir, &format!("dst{n}-vd0"), "qcow2", DISK_MIB, None)?;
        let dst_r = image(dir, &format!("dst{n}-vd1"), "raw", 8, None)?;
        let src = qemu(
            dir,
            &format!("src{n}"),
            &[("vd0", &src_q, "qcow2"), ("vd1", &src_r, "raw")],
            false,
        )?;
        let dst = qemu(
            dir,
            &format!("dst{n}"),
            &[("vd0", &dst_q, "qcow2"), ("vd1", &dst_r, "raw")],
            true,
        )?;
        let o = migrate(
            &s,
            &src,
            &dst,
            &["--copy-storage", "all", "--transport", transport, "--json"],
        );
        assert!(o.status.success(), "over {transport}: {}", text(&o));
        nothing_left(&src).with_context(|| format!("after {transport}"))?;
        let synced = s.da.log_text().matches("every disk is in sync").count();
        assert_eq!(synced, n + 1, "the mirrors ran over {transport}");
        quit(src)?;
        quit(dst)?;
        identical(&src_q, &dst_q).with_context(|| format!("vd0 over {transport}"))?;
        identical(&src_r, &dst_r).with_context(|| format!("vd1 over {transport}"))?;
    }
    Ok(())
}

#[test]
fn a_destination_whose_disks_do_not_fit_is_refused_before_anything_is_copied() -> Result<()> {
    let s = setup("diskno")?;
    let dir = s.tmp.path();
    let src_img = image(dir, "src", "qcow2", DISK_MIB, Some(7))?;
    let small = image(dir, "small", "qcow2", DISK_MIB / 2, None)?;
    let src = qemu(dir, "src", &[("vd0", &src_img, "qcow2")], false)?;
    for (what, dst_disks, want) in [
        (
            "smaller",
            vec![("vd0", small.as_path(), "qcow2")],
            "disk vd0: the destination image holds",
        ),
        (
            "missing",
            vec![("other", small.as_path(), "qcow2")],
            "only the source has vd0", // the device check, naming the device
        ),
    ] {
        let dst = qemu(dir, &format!("dst-{what}"), &dst_disks, true)?;
        let o = migrate(&s, &src, &dst, &["--copy-storage", "all"]);
        assert!(!o.status.success(), "{what}: {}", text(&o));
        assert!(text(&o).contains(want), "{what}: {}", text(&o));
        nothing_left(&src)?;
        let mut q = vmferry_qmp::Qmp::connect(&dst.qmp, Duration::from_secs(5))?;
        assert!(q.block_jobs()?.is_empty());
    }
    // A VM without a writable disk has nothing to copy: said so, up front.
    let bare = qemu(dir, "bare", &[], false)?;
    let dst = qemu(dir, "dst-bare", &[], true)?;
    let o = migrate(&s, &bare, &dst, &["--copy-storage", "all"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no writable disk"), "{}", text(&o));
    Ok(())
}

/// The source QEMU is back as it was: reachable, no job or node of vmferry's (checked
/// for a while: the source cleans up as the controller reports the failure).
fn source_as_it_was(src: &QemuProcess) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match nothing_left(src) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

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
        let mut c = s.hosts.a.command(BIN);
        c.args([
            "migrate",
            "--from",
            &s.a_addr,
            "--to",
            &s.b_addr,
            "--src-qmp",
        ])
        .arg(&src.qmp)
        .arg("--dst-qmp")
        .arg(&dst.qmp)
        .arg("--certs")
        .arg(&s.ctl)
        .args(["--copy-storage", "all", "--max-bandwidth", "4M"]);
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
