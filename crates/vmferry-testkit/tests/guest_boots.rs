//! The test guest boots under TCG and keeps printing increasing heartbeats.

use anyhow::{ensure, Result};
use std::time::{Duration, Instant};
use vmferry_testkit::guest::guest_image;
use vmferry_testkit::qemu::{start_qemu, QemuOpts};
use vmferry_testkit::serial::{heartbeats, wait_for_heartbeat};

#[test]
fn guest_boots_under_tcg_and_prints_increasing_heartbeats() -> Result<()> {
    vmferry_testkit::require::qemu();
    let img = guest_image()?;
    let tmp = tempfile::tempdir()?;
    let mut o = QemuOpts::new(tmp.path().join("qmp"), tmp.path().join("serial.log"));
    o.kernel = Some(img.kernel);
    o.initrd = Some(img.initrd);
    o.append = Some(img.append);
    let started = Instant::now();
    let q = start_qemu(&o)?;
    let last = wait_for_heartbeat(&q.serial, 3, Duration::from_secs(60))?;
    eprintln!(
        "guest reached heartbeat {last} {:.1} s after start",
        started.elapsed().as_secs_f64()
    );
    let beats = heartbeats(&q.serial);
    ensure!(beats.len() >= 3, "heartbeats: {beats:?}");
    ensure!(
        beats.windows(2).all(|w| w[1] == w[0] + 1) && beats[0] == 1,
        "heartbeats must count up from 1 by one: {beats:?}"
    );
    let log = std::fs::read_to_string(&q.serial)?;
    ensure!(
        log.matches("vmferry-guest: booted").count() == 1,
        "boot banner must appear once: {log}"
    );
    Ok(())
}
