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
use vmferry_testkit::capture::{file_contains, Capture};
use vmferry_testkit::qemu::{start_qemu, QemuOpts, QemuProcess};
use vmferry_testkit::require;

const DISK_MIB: u64 = 24;
/// Written into a source disk: it must never cross the wire in clear.
const MARKER: &[u8] = b"vmferry-disk-marker-never-in-clear";

/// Writes `MARKER` over 64 KiB at 1 MiB into a raw image.
fn put_marker(raw: &Path) -> Result<()> {
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

/// A running TCG guest (the test guest) with one disk vd0 (/dev/vda): it writes each
/// heartbeat's number into the disk's second sector, synchronously.
fn guest(dir: &Path, tag: &str, disk: &Path, incoming: bool) -> Result<QemuProcess> {
    require::qemu();
    let img = vmferry_testkit::guest::guest_image()?;
    let mut o = QemuOpts::new(
        dir.join(format!("{tag}.qmp")),
        dir.join(format!("{tag}.serial")),
    );
    o.memory_mib = 128;
    o.kernel = Some(img.kernel);
    o.initrd = Some(img.initrd);
    o.append = Some(img.append);
    o.incoming = incoming.then(|| "defer".to_string());
    o.extra_args = disk_args(&[("vd0", disk, "qcow2")]);
    start_qemu(&o)
}

/// A qcow2 image's guest-visible bytes.
fn raw_bytes(dir: &Path, img: &Path) -> Result<Vec<u8>> {
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
fn sector_counter(bytes: &[u8]) -> u64 {
    let s = &bytes[512..1024];
    let end = s.iter().position(|b| !b.is_ascii_digit()).unwrap_or(0);
    std::str::from_utf8(&s[..end])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// `vmferry migrate` in attach mode from host a, with `extra` flags.
fn migrate_cmd(s: &Setup, src: &QemuProcess, dst: &QemuProcess, extra: &[&str]) -> Command {
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

fn migrate(
    s: &Setup,
    src: &QemuProcess,
    dst: &QemuProcess,
    extra: &[&str],
) -> std::process::Output {
    run(migrate_cmd(s, src, dst, extra))
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
        put_marker(&src_r)?;
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
        let cap = Capture::start(
            &s.hosts.b,
            &s.hosts.b.iface,
            "tcp",
            &dir.join(format!("{transport}.pcap")),
        )?;
        let o = migrate(
            &s,
            &src,
            &dst,
            &[
                &["--copy-storage", "all", "--transport", transport, "--json"][..],
                // With multifd streams beside the disks, and compressed in the tunnel.
                match transport {
                    "direct" => &["--multifd", "4"][..],
                    "tunnel" => &["--compress", "zstd"][..],
                    _ => &[][..],
                },
            ]
            .concat(),
        );
        let pcap = cap.stop()?;
        assert!(
            o.status.success(),
            "over {transport}: {}\n--- b:\n{}",
            text(&o),
            s.db.log_text()
        );
        // The result says what was copied, disk by disk.
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let result: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("{}"))?;
        let disks = result["disks"].as_array().cloned().unwrap_or_default();
        let totals: Vec<(String, u64)> = disks
            .iter()
            .map(|d| {
                (
                    d["device"].as_str().unwrap_or("").to_string(),
                    d["total"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            totals,
            vec![
                ("vd0".to_string(), DISK_MIB << 20),
                ("vd1".to_string(), 8 << 20)
            ],
            "{result}"
        );
        assert!(
            disks.iter().all(|d| d["in_sync_ms"].as_u64().is_some()),
            "each disk says when it was in sync: {result}"
        );
        let size = std::fs::metadata(&pcap)?.len();
        assert!(
            size > (DISK_MIB + 8) << 20,
            "{transport}: capture too small ({size} bytes) to have seen the copy"
        );
        assert!(
            file_contains(&src_r, MARKER)?,
            "the marker is in the source disk"
        );
        assert!(
            !file_contains(&pcap, MARKER)?,
            "disk contents crossed the wire in clear over {transport}"
        );
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

#[test]
fn a_guest_that_writes_to_its_disk_during_the_copy_keeps_every_write() -> Result<()> {
    let s = setup("diskw")?;
    // Pre-copy, and post-copy from the start: the mirrors end at the same pause before
    // the switch-over, after which the guest writes only to the destination's disk.
    for (n, mode) in [&[][..], &["--postcopy", "--postcopy-after", "0"][..]]
        .into_iter()
        .enumerate()
    {
        writes_survive(&s, n, mode).with_context(|| format!("with {mode:?}"))?;
    }
    Ok(())
}

fn writes_survive(s: &Setup, n: usize, mode: &[&str]) -> Result<()> {
    let dir = s.tmp.path();
    let src_img = image(dir, &format!("src{n}"), "qcow2", 96, Some(0x3117e))?;
    let dst_img = image(dir, &format!("dst{n}"), "qcow2", 96, None)?;
    let src = guest(dir, &format!("wsrc{n}"), &src_img, false)?;
    let dst = guest(dir, &format!("wdst{n}"), &dst_img, true)?;
    let beat =
        vmferry_testkit::serial::wait_for_heartbeat(&src.serial, 2, Duration::from_secs(90))?;
    // Capped above the rate the guest dirties its RAM (16 MiB a beat, two beats a
    // second), so pre-copy converges, and low enough that the disk's copy takes beats
    // (96 MiB at 64 MiB/s): the guest writes to its disk while the mirror runs.
    let flags = [
        &["--copy-storage", "all", "--max-bandwidth", "64M"][..],
        mode,
    ]
    .concat();
    let o = migrate(s, &src, &dst, &flags);
    assert!(o.status.success(), "{}", text(&o));
    if mode.contains(&"--postcopy") {
        assert!(
            s.da.log_text().contains("switching to post-copy"),
            "no post-copy: {}",
            s.da.log_text()
        );
    }
    let on_src =
        vmferry_testkit::serial::wait_for_heartbeat(&src.serial, 0, Duration::from_secs(1))?;
    // At least one write while the mirror ran (it runs until the switch-over).
    assert!(
        on_src > beat,
        "the guest wrote during the migration ({beat} .. {on_src})"
    );
    // The guest runs on, on the destination, reading back what it wrote on the source
    // (its first read there must find the source's last write) and writing to the copy.
    let on_dst = vmferry_testkit::serial::wait_for_heartbeat(
        &dst.serial,
        on_src + 11,
        Duration::from_secs(60),
    )?;
    let console = String::from_utf8_lossy(&std::fs::read(&dst.serial)?).to_string();
    assert!(
        !console.contains("vmferry-diskcheck BAD"),
        "the destination's disk lost a write: {console}"
    );
    assert!(
        console.contains("vmferry-diskcheck ok"),
        "the guest checked its disk on the destination: {console}"
    );
    nothing_left(&src)?;
    quit(src)?;
    quit(dst)?;
    let (a, b) = (raw_bytes(dir, &src_img)?, raw_bytes(dir, &dst_img)?);
    assert_eq!(a.len(), b.len());
    // Everything but the heartbeat sector is the source's, byte for byte ...
    assert!(
        a[..512] == b[..512] && a[1024..] == b[1024..],
        "the copy differs"
    );
    // ... and that sector holds what the guest wrote last: on the source up to the
    // switch-over, then on the destination.
    let (last_src, last_dst) = (sector_counter(&a), sector_counter(&b));
    assert!(
        last_src >= on_src,
        "the source's last write ({last_src}, heartbeat {on_src})"
    );
    assert!(
        last_dst > last_src && last_dst >= on_dst,
        "the destination's writes ({last_dst}) follow the source's ({last_src})"
    );
    Ok(())
}

/// `--copy-storage inc`: both hosts have the base image; only the source's overlay is
/// copied, onto the destination's overlay of the same base.
#[test]
fn inc_copies_only_the_top_image_onto_an_overlay_of_the_same_base() -> Result<()> {
    require::command("qemu-io");
    let s = setup("diskinc")?;
    let dir = s.tmp.path();
    let base = image(dir, "base", "qcow2", DISK_MIB, Some(0xba5e))?;
    let overlay = |name: &str| -> Result<PathBuf> {
        let p = dir.join(format!("{name}.qcow2"));
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&p)
            .output()?;
        if !o.status.success() {
            bail!("qemu-img create: {}", text(&o));
        }
        Ok(p)
    };
    let (src_img, dst_img) = (overlay("src")?, overlay("dst")?);
    // What the guest changed since the base: 2 MiB at 1 MiB.
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 1M 2M"])
        .arg(&src_img)
        .output()?;
    assert!(o.status.success(), "qemu-io: {}", text(&o));
    let src = qemu(dir, "isrc", &[("vd0", &src_img, "qcow2")], false)?;
    let dst = qemu(dir, "idst", &[("vd0", &dst_img, "qcow2")], true)?;
    let o = migrate(&s, &src, &dst, &["--copy-storage", "inc"]);
    assert!(o.status.success(), "{}", text(&o));
    nothing_left(&src)?;
    quit(src)?;
    quit(dst)?;
    identical(&src_img, &dst_img)?;
    // Only the top was copied: the destination's overlay holds the 2 MiB, not the base.
    let o = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&dst_img)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let used = info["actual-size"].as_u64().context("actual-size")?;
    assert!(
        used < (DISK_MIB << 20) / 2,
        "the overlay took {used} bytes: the base was copied too"
    );
    // A destination without the overlay is refused for inc, naming the disk.
    let src = qemu(dir, "isrc2", &[("vd0", &src_img, "qcow2")], false)?;
    let flat = image(dir, "flat", "qcow2", DISK_MIB, None)?;
    let dst = qemu(dir, "idst2", &[("vd0", &flat, "qcow2")], true)?;
    let o = migrate(&s, &src, &dst, &["--copy-storage", "inc"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("disk vd0") && text(&o).contains("overlay"),
        "{}",
        text(&o)
    );
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
    // A serial console may carry bytes that are not UTF-8.
    let console = String::from_utf8_lossy(&std::fs::read(&b_log)?).to_string();
    assert!(!console.contains("vmferry-diskcheck BAD"), "{console}");
    assert!(console.contains("vmferry-diskcheck ok"), "{console}");
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
    let b_qemus = || -> usize {
        let needle = b_state.display().to_string();
        std::fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        std::fs::read(e.path().join("cmdline"))
                            .map(|c| {
                                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                                c.contains("qemu-system") && c.contains(&needle)
                            })
                            .unwrap_or(false)
                    })
                    .count()
            })
            .unwrap_or(0)
    };
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
