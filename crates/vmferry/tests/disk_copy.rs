//! End to end, disk copy (`--copy-storage`) in attach mode between two netns hosts: QEMUs
//! with `-blockdev` disks on local images, the destination's blank, the source's full of
//! a known pattern. After the migration the two images are identical (`qemu-img
//! compare`), and the source QEMU has no job or node of vmferry's left.

mod common;

use anyhow::{bail, Context, Result};
use common::disks::*;
use common::live::*;
use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use vmferry_testkit::capture::{file_contains, Capture};
use vmferry_testkit::require;

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
    vmferry_testkit::serial::wait_for_disk_check(&dst.serial, Duration::from_secs(60))
        .context("the guest checks its disk on the destination, finding every write")?;
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
