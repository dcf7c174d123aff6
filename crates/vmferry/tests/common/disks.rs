//! Disk images, QEMUs with disks, and checks that the disk-copy tests share
//! (disk_copy.rs, disk_faults.rs): attach-mode QEMUs with `-blockdev` disks on local
//! images, and what a source must look like after a copy (no job or node of vmferry's).

use super::live::Setup;
use super::*;
use anyhow::{bail, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmferry_testkit::qemu::{start_qemu, QemuOpts, QemuProcess};
use vmferry_testkit::require;

pub const DISK_MIB: u64 = 24;
/// Written into a source disk: it must never cross the wire in clear.
pub const MARKER: &[u8] = b"vmferry-disk-marker-never-in-clear";

/// Writes `MARKER` over 64 KiB at 1 MiB into a raw image.
pub fn put_marker(raw: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new().write(true).open(raw)?;
    f.seek(SeekFrom::Start(1 << 20))?;
    let region: Vec<u8> = MARKER.iter().copied().cycle().take(64 << 10).collect();
    f.write_all(&region)?;
    f.sync_all()?;
    Ok(())
}

/// A disk image: `format` qcow2 or raw, `mib` MiB, filled with pseudo-random data (and a
/// marker) when `seed` is given, blank otherwise.
pub fn image(dir: &Path, name: &str, format: &str, mib: u64, seed: Option<u64>) -> Result<PathBuf> {
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
pub fn disk_args(disks: &[(&str, &Path, &str)]) -> Vec<String> {
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

pub fn qemu(
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

/// A running TCG guest (the test guest) with one disk vd0 (/dev/vda): it writes each
/// heartbeat's number into the disk's second sector, synchronously.
pub fn guest(dir: &Path, tag: &str, disk: &Path, incoming: bool) -> Result<QemuProcess> {
    require::qemu();
    let img = vmferry_testkit::guest::guest_image()?;
    let mut o = QemuOpts::new(
        dir.join(format!("{tag}.qmp")),
        dir.join(format!("{tag}.serial")),
    );
    // It runs while it migrates: not on 7.2's TCG (see require::guest_qemu).
    o.binary = require::guest_qemu().display().to_string();
    o.memory_mib = 128;
    o.kernel = Some(img.kernel);
    o.initrd = Some(img.initrd);
    o.append = Some(img.append);
    o.incoming = incoming.then(|| "defer".to_string());
    o.extra_args = disk_args(&[("vd0", disk, "qcow2")]);
    start_qemu(&o)
}

/// A qcow2 image's guest-visible bytes.
pub fn raw_bytes(dir: &Path, img: &Path) -> Result<Vec<u8>> {
    let out = dir.join("flat.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(img)
        .arg(&out)
        .output()?;
    if !o.status.success() {
        bail!("qemu-img convert: {}", text(&o));
    }
    let b = std::fs::read(&out)?;
    std::fs::remove_file(&out)?;
    Ok(b)
}

/// The heartbeat number a guest last wrote into its disk's second sector.
pub fn sector_counter(bytes: &[u8]) -> u64 {
    let s = &bytes[512..1024];
    let end = s.iter().position(|b| !b.is_ascii_digit()).unwrap_or(0);
    std::str::from_utf8(&s[..end])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// `vmferry migrate` in attach mode from host a, with `extra` flags.
pub fn migrate_cmd(s: &Setup, src: &QemuProcess, dst: &QemuProcess, extra: &[&str]) -> Command {
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
    c
}

pub fn migrate(
    s: &Setup,
    src: &QemuProcess,
    dst: &QemuProcess,
    extra: &[&str],
) -> std::process::Output {
    run(migrate_cmd(s, src, dst, extra))
}

/// Ends QEMU with `quit` (a killed QEMU could leave qcow2 metadata unwritten) and waits
/// for it to be gone.
pub fn quit(q: QemuProcess) -> Result<()> {
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

pub fn identical(a: &Path, b: &Path) -> Result<()> {
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
pub fn nothing_left(src: &QemuProcess) -> Result<()> {
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

/// The source QEMU is back as it was: reachable, no job or node of vmferry's (checked
/// for a while: the source cleans up as the controller reports the failure).
pub fn source_as_it_was(src: &QemuProcess) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match nothing_left(src) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
