//! End to end, issue 16: libvirt-managed domains migrated through vmferry. Two libvirt test
//! hosts (a libvirtd each in its own netns, mount and UTS namespaces), a vmferry daemon
//! inside each host's namespaces (tests/common/libvirt_setup.rs draws the topology), and
//! `vmferry migrate --libvirt NAME` run here against the daemons' control sockets. The
//! guest is the TCG test guest with a local qcow2 disk: it beats on its serial console,
//! writes each beat's number into its disk's second sector and reads it back.
//!
//! The destination host is given nothing beforehand — no disk image, no migration
//! directory: its daemon makes what libvirt needs. The libvirt daemons never talk to each
//! other: while a migration runs, both hosts' TCP sockets are sampled, and neither libvirt's
//! ports (16509, 16514, 49152–49215) may listen nor any connection between the hosts go
//! elsewhere than to vmferry's port.

mod common;

use anyhow::{ensure, Context, Result};
use common::libvirt_setup::*;
use common::*;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};
use vmferry_testkit::guest::guest_image;
use vmferry_testkit::libvirt::{Domain, LibvirtHost};
use vmferry_testkit::serial::heartbeats;

#[test]
fn a_libvirt_domain_with_a_local_disk_migrates_a_to_b_and_back_over_the_tunnel() -> Result<()> {
    let t0 = Instant::now();
    let s = LvSetup::new("lvmig")?;
    eprintln!("hosts and daemons ready after {:?}", t0.elapsed());
    let (dom, before) = s.boot_guest("vmf-lv", 128, "")?;
    eprintln!("guest beats on A ({before}) after {:?}", t0.elapsed());
    with_diagnostics(&s, || {
        // A → B over the default transport (auto: direct), the disk copied, the RAM over
        // libvirt's PARALLEL (multifd) connections: the main stream and 2 channels.
        let a_beat = there_and_check(
            &s,
            &s.da,
            &s.db,
            &dom,
            &["--copy-storage", "all", "--multifd", "2", "--json"],
        )?;
        eprintln!("A → B done after {:?}", t0.elapsed());
        // B → A through the tunnel: A still has the image from before (overwritten).
        there_and_check(
            &s,
            &s.db,
            &s.da,
            &dom,
            &["--copy-storage", "all", "--transport", "tunnel"],
        )
        .context("back B → A over the tunnel")?;
        eprintln!(
            "B → A done after {:?} (the guest left A at beat {a_beat})",
            t0.elapsed()
        );
        Ok(())
    })
}

/// The QEMUs run as `libvirt-qemu`, not root, with libvirt's dynamic ownership, as a
/// distribution's libvirt runs them; the daemons are given its group
/// (`--libvirt-qemu-group`). A → B with the disk copied and multifd: B's QEMU makes its
/// sockets in B's DIR/ID, A's QEMU connects its multifd channels and its disk's NBD client
/// to A's DIR/ID itself — all as that user. B's image, made by B's daemon as root, is
/// given to QEMU by libvirt.
#[test]
fn a_domain_whose_qemu_is_not_root_migrates_with_its_disk() -> Result<()> {
    const USER: &str = "libvirt-qemu";
    let uid = nix::unistd::User::from_name(USER)?
        .with_context(|| format!("no user {USER} (setup.sh installs libvirt, which adds it)"))?
        .uid
        .as_raw();
    let t0 = Instant::now();
    let s = LvSetup::new_as("lvuser", Some(USER))?;
    let (dom, _) = s.boot_guest("vmf-lvuser", 128, "")?;
    eprintln!("guest beats on A after {:?}", t0.elapsed());
    with_diagnostics(&s, || {
        ensure!(
            qemu_uid(&s.a, &dom.name)? == uid,
            "A's QEMU is not {USER}'s"
        );
        there_and_check(
            &s,
            &s.da,
            &s.db,
            &dom,
            &["--copy-storage", "all", "--multifd", "2", "--json"],
        )?;
        ensure!(
            qemu_uid(&s.b, &dom.name)? == uid,
            "B's QEMU is not {USER}'s"
        );
        eprintln!("A → B as {USER} done after {:?}", t0.elapsed());
        Ok(())
    })
}

/// `--copy-storage inc` with two disks: `vda` is an overlay on a base image both hosts
/// have (8 MiB of a pattern past the guest's first line), `vdb` a plain image. B's daemon
/// makes an overlay on B's base for `vda` and a blank image for `vdb`; libvirt copies only
/// the overlay's own clusters and all of `vdb`. Through the chain, every disk reads the
/// same on both hosts, and B's overlay holds none of the base's pattern.
#[test]
fn copy_storage_inc_copies_the_overlay_onto_the_same_base_and_every_disk_moves() -> Result<()> {
    let t0 = Instant::now();
    let s = LvSetup::new("lvinc")?;
    let name = "vmf-lvinc";
    let mut dom = Domain::migrating_guest(name, &s.a.work, guest_image()?);
    let top = dom.disk.clone().context("the test guest has a disk")?;
    let base = s.a.work.join(format!("{name}-base.qcow2"));
    let data = s.a.work.join(format!("{name}-data.qcow2"));
    make_base(&s.a, &base)?;
    std::fs::copy(s.a.outside(&base)?, s.b.outside(&base)?)?;
    s.a.create_overlay(&top, &base)?;
    s.a.create_disk(&data, 8, Some("vmferry-data-disk"))?;
    dom.more_disks.push(data.clone());
    s.a.start_domain(&dom)?;
    s.a.wait_for_heartbeat(&dom, 3, Duration::from_secs(90))?;
    eprintln!("guest beats on A after {:?}", t0.elapsed());
    with_diagnostics(&s, || {
        there_and_check(&s, &s.da, &s.db, &dom, &["--copy-storage", "inc"])?;
        let info = image_info(&s.b, &top)?;
        ensure!(
            info["backing-filename"] == base.to_string_lossy().as_ref(),
            "B's vda is not an overlay on the base: {info}"
        );
        let copied = info["actual-size"].as_u64().unwrap_or(u64::MAX);
        ensure!(
            copied < 4 << 20,
            "B's overlay holds {copied} bytes: the base's 8 MiB were copied into it: {info}"
        );
        let (was, now) = (s.a.read_disk(&data)?, s.b.read_disk(&data)?);
        ensure!(
            now.starts_with(b"vmferry-data-disk\n") && was == now,
            "vdb differs on B"
        );
        eprintln!("inc with two disks done after {:?}", t0.elapsed());
        Ok(())
    })
}

/// A qcow2 base image at `inside` on `host`: the guest's first disk line, then 8 MiB of
/// 0x5a from 1 MiB on ([`DISK_MIB`] in all).
fn make_base(host: &LibvirtHost, inside: &Path) -> Result<()> {
    let raw = host.outside(&inside.with_extension("raw"))?;
    let mut bytes = vec![0u8; (DISK_MIB << 20) as usize];
    let line = format!("{DISK_LINE}\n");
    bytes[..line.len()].copy_from_slice(line.as_bytes());
    bytes[1 << 20..9 << 20].fill(0x5a);
    std::fs::write(&raw, &bytes)?;
    let o = vmferry_testkit::libvirt::output_within(
        host.command("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(inside.with_extension("raw"))
            .arg(inside),
        Duration::from_secs(30),
    )?;
    std::fs::remove_file(&raw)?;
    ensure!(o.status.success(), "qemu-img convert: {}", text(&o));
    Ok(())
}

/// `qemu-img info` of the image at `inside` on `host`, read while QEMU may hold it.
fn image_info(host: &LibvirtHost, inside: &Path) -> Result<serde_json::Value> {
    let o = vmferry_testkit::libvirt::output_within(
        host.command("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(inside),
        Duration::from_secs(30),
    )?;
    ensure!(o.status.success(), "qemu-img info: {}", text(&o));
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// The real user id of the QEMU of domain `name` on `host`.
fn qemu_uid(host: &LibvirtHost, name: &str) -> Result<u32> {
    let pid = host.qemu_pid(name).context("no QEMU pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Uid in /proc/{pid}/status"))
}

/// How long `vmferry migrate` may take in the test that kills the destination daemon: it
/// must fail within seconds of the kill, not run into the general limit.
const KILLED_MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn killing_the_destination_daemon_mid_migration_leaves_the_domain_running_on_a_and_nothing_on_b(
) -> Result<()> {
    let t0 = Instant::now();
    let mut s = LvSetup::new("lvkill")?;
    let name = "vmf-lvkill";
    // The guest dirties 32 MiB/s; capped at 2 MB/s the migration cannot converge, so it is
    // still under way whenever the daemon dies.
    let (dom, _) = s.boot_guest(name, 128, "")?;
    eprintln!("guest beats on A after {:?}", t0.elapsed());
    let (o, killed_at) = with_diagnostics(&s, || {
        std::thread::scope(|sc| {
            let migration = sc.spawn(|| {
                s.migrate_within(
                    &s.da,
                    &s.db,
                    name,
                    &["--copy-storage", "all", "--max-bandwidth", "2M"],
                    KILLED_MIGRATE_TIMEOUT,
                )
            });
            let under_way = wait_for(
                "A's libvirt migrating memory",
                Duration::from_secs(60),
                || {
                    if migration.is_finished() {
                        anyhow::bail!("vmferry migrate ended before the daemon was killed");
                    }
                    Ok(memory_moving(&s.a, name).then_some(()))
                },
            );
            let killed = under_way.and_then(|()| {
                kill9(s.db.child.id())?;
                Ok(Instant::now())
            });
            let o = migration
                .join()
                .map_err(|_| anyhow::anyhow!("the migrate thread panicked"))?;
            Ok((o?, killed?))
        })
    })?;
    eprintln!(
        "vmferry migrate failed {:?} after the kill: {}",
        killed_at.elapsed(),
        text(&o).trim()
    );
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    ensure!(!o.status.success(), "migrate succeeded: {}", text(&o));
    ensure!(
        killed_at.elapsed() < Duration::from_secs(30),
        "vmferry migrate took {:?} to fail after the destination daemon died",
        killed_at.elapsed()
    );
    ensure!(
        !err.contains("panicked") && err.contains("destination"),
        "the error should say that the destination failed: {}",
        text(&o)
    );
    with_diagnostics(&s, || {
        // A: libvirt rolled back, the guest runs on.
        wait_for("the domain running on A", Duration::from_secs(30), || {
            Ok((s.a.domain_state(name)? == "running").then_some(()))
        })?;
        let last = s.a.heartbeats(&dom)?.last().copied().unwrap_or(0);
        s.a.wait_for_heartbeat(&dom, last + 2, Duration::from_secs(30))?;
        // B: nothing defined or running, within libvirt's own clean-up.
        wait_for("no domain on B", Duration::from_secs(30), || {
            Ok(s.b.domains()?.is_empty().then_some(()))
        })?;
        ensure!(
            s.b.qemu_pid(name).is_none(),
            "B's QEMU pid file outlived the domain"
        );
        s.wait_no_migration_dirs(&s.a, Duration::from_secs(15))
            .context("A's daemon removes its migration directory")?;
        eprintln!(
            "B's migration directory with its daemon dead: {:?}",
            s.migration_dirs(&s.b)?
        );
        Ok(())
    })?;
    s.restart_b_daemon()?;
    with_diagnostics(&s, || {
        s.wait_no_migration_dirs(&s.b, Duration::from_secs(15))
            .context("B's daemon, restarted, removes what the dead one left")
    })?;
    eprintln!("whole test: {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn unknown_shut_off_unsafe_or_unreachable_is_refused_before_anything_moves() -> Result<()> {
    let t0 = Instant::now();
    let s = LvSetup::new("lvbad")?;
    with_diagnostics(&s, || {
        let o = s.migrate(
            &s.da,
            &s.db,
            "vmf-no-such-domain",
            &["--copy-storage", "all"],
        )?;
        refused(&s, &o, "vmf-no-such-domain", "the unknown domain")?;

        let off = Domain::migrating_guest("vmf-off", &s.a.work, guest_image()?);
        let disk = off.disk.clone().context("the test guest has a disk")?;
        s.a.create_disk(&disk, DISK_MIB, Some(DISK_LINE))?;
        s.a.define_domain(&off)?;
        let o = s.migrate(&s.da, &s.db, &off.name, &["--copy-storage", "all"])?;
        refused(&s, &o, "not running", "the shut-off domain")?;
        ensure!(s.a.domain_state(&off.name)? == "shut off");

        // Running, but its local disk neither copied nor shared: libvirt's own refusal,
        // passed on.
        s.a.virsh(&["start", &off.name], Duration::from_secs(30))?;
        let o = s.migrate(&s.da, &s.db, &off.name, &[])?;
        refused(&s, &o, "unsafe", "a local disk without --copy-storage")?;

        // Post-copy with multifd: QEMU 7.2's destination aborts in post-copy
        // (yank_unregister_instance: Assertion `QLIST_EMPTY(&entry->yankfns)' failed) and
        // the guest is lost on both hosts; refused as for managed VMs.
        let o = s.migrate(
            &s.da,
            &s.db,
            &off.name,
            &["--copy-storage", "all", "--postcopy", "--multifd", "2"],
        )?;
        refused(&s, &o, "multifd", "post-copy with multifd")?;
        ensure!(s.a.domain_state(&off.name)? == "running");

        // B's libvirtd gone: B's daemon cannot reach it.
        kill9(s.b.pid())?;
        let o = s.migrate(&s.da, &s.db, &off.name, &["--copy-storage", "all"])?;
        refused(&s, &o, "libvirt", "a destination without libvirtd")?;
        ensure!(s.a.domain_state(&off.name)? == "running");
        eprintln!("whole test: {:?}", t0.elapsed());
        Ok(())
    })
}

#[test]
fn a_busy_libvirt_domain_completes_in_post_copy() -> Result<()> {
    let t0 = Instant::now();
    let s = LvSetup::new("lvpost")?;
    let name = "vmf-lvpost";
    // 32 MiB rewritten without pause: pre-copy at 20 MB/s never converges. The switch to
    // post-copy comes after 3 s of pre-copy, so that post-copy has most of the memory to
    // fetch (the destination's page requests travel back through the daemons).
    let (dom, before) = s.boot_guest(name, 192, "vmferry.busy=32")?;
    eprintln!("busy guest beats on A ({before}) after {:?}", t0.elapsed());
    let (o, b_said_postcopy) = with_diagnostics(&s, || {
        std::thread::scope(|sc| {
            let migration = sc.spawn(|| {
                s.migrate(
                    &s.da,
                    &s.db,
                    name,
                    &[
                        "--copy-storage",
                        "all",
                        "--postcopy",
                        "--postcopy-after",
                        "3",
                        "--max-bandwidth",
                        "20M",
                        "--json",
                    ],
                )
            });
            // libvirt shows the destination domain as "running (post-copy)" meanwhile.
            let mut seen = false;
            while !migration.is_finished() {
                seen |=
                    s.b.virsh(&["domstate", "--reason", name], Duration::from_secs(10))
                        .is_ok_and(|st| st.contains("post-copy"));
                std::thread::sleep(Duration::from_millis(100));
            }
            let o = migration
                .join()
                .map_err(|_| anyhow::anyhow!("the migrate thread panicked"))??;
            Ok((o, seen))
        })
    })?;
    eprintln!(
        "migrate returned after {:?} (B's libvirt said post-copy: {b_said_postcopy})",
        t0.elapsed()
    );
    with_diagnostics(&s, || {
        ensure!(o.status.success(), "migrate --postcopy: {}", text(&o));
        let progress = String::from_utf8_lossy(&o.stdout);
        ensure!(
            b_said_postcopy || progress.contains("\"postcopy-active\""),
            "neither vmferry's progress nor B's libvirt ever showed post-copy: {progress}"
        );
        ensure!(s.b.domain_state(name)? == "running");
        ensure!(!s.a.domains()?.iter().any(|d| d == name));
        // The guest checks the memory it dirties from every 20 beats.
        let serial = s.b.outside(&dom.serial)?;
        let log = wait_for("a memory check on B", Duration::from_secs(60), || {
            let t = std::fs::read_to_string(&serial).unwrap_or_default();
            Ok(t.contains("vmferry-memcheck ").then_some(t))
        })?;
        ensure!(
            !log.contains("vmferry-memcheck BAD") && !log.contains("vmferry-diskcheck BAD"),
            "the guest's memory or disk is damaged on B: {log}"
        );
        ensure!(
            heartbeats(&serial).first().is_some_and(|&n| n > before),
            "the guest restarted on B"
        );
        for h in [&s.a, &s.b] {
            s.wait_no_migration_dirs(h, Duration::from_secs(10))?;
        }
        eprintln!("whole test: {:?}", t0.elapsed());
        Ok(())
    })
}

/// The socket watch itself: it must see a listener on a libvirt port and a connection
/// between the hosts that is not to vmferry's port (socat stands in for libvirt).
#[test]
fn the_socket_watch_sees_libvirt_ports_and_foreign_connections() -> Result<()> {
    vmferry_testkit::require::netns();
    vmferry_testkit::require::command("socat");
    let hosts = vmferry_testkit::netns::TwoHosts::new("lvwatch")?;
    let _listener = hosts.b.spawn_killable(
        "socat",
        [
            // fork: the listener stays while the connection is open.
            format!("TCP-LISTEN:16509,bind={},reuseaddr,fork", hosts.b.ip),
            "EXEC:sleep 30".to_string(),
        ],
    )?;
    let watch = NetWatch::start(&hosts);
    wait_for("the listener", Duration::from_secs(10), || {
        Ok(tcp_sockets(&hosts.b)?
            .iter()
            .any(|s| s.state == "LISTEN")
            .then_some(()))
    })?;
    let _client = hosts.a.spawn_killable(
        "socat",
        [
            "-u".to_string(),
            "EXEC:sleep 30".to_string(),
            format!("TCP:{}:16509", hosts.b.ip),
        ],
    )?;
    wait_for("the connection", Duration::from_secs(10), || {
        Ok(tcp_sockets(&hosts.a)?
            .iter()
            .any(|s| s.state == "ESTAB" && s.between_hosts())
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let r = watch.stop()?;
    ensure!(r.violations.iter().any(|v| v.contains("listener")), "{r:?}");
    ensure!(
        r.violations
            .iter()
            .any(|v| v.contains("not to vmferry's port")),
        "{r:?}"
    );
    ensure!(r.vmferry_seen == 0, "{r:?}");
    Ok(())
}

/// Migrates `dom` from `from`'s host to `to`'s host with `args`, watching the hosts' TCP
/// sockets, and checks that it arrived: running there and beating on from where it was,
/// its disk copied, gone from the source, no migration directory left on either host.
/// Returns the last beat seen at the source before the migration.
fn there_and_check(
    s: &LvSetup,
    from: &DaemonProc,
    to: &DaemonProc,
    dom: &Domain,
    args: &[&str],
) -> Result<u64> {
    let (src, dst) = if std::ptr::eq(from, &s.da) {
        (&s.a, &s.b)
    } else {
        (&s.b, &s.a)
    };
    let disk = dom.disk.clone().context("the test guest has a disk")?;
    // The destination's serial log may hold an earlier stay's beats (its QEMU is gone):
    // what the guest prints there now goes into a new file.
    let dst_serial = dst.outside(&dom.serial)?;
    match std::fs::remove_file(&dst_serial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", dst_serial.display()))
        }
        _ => {}
    }
    let before = src.heartbeats(dom)?.last().copied().unwrap_or(0);

    let watch = NetWatch::start(&s.hosts);
    let t = Instant::now();
    let o = s.migrate(from, to, &dom.name, args)?;
    let took = t.elapsed();
    let net = watch.stop()?;
    ensure!(
        o.status.success(),
        "migrate {} → {}: {}",
        src.hostname,
        dst.hostname,
        text(&o)
    );
    eprintln!(
        "{} → {} took {took:?} ({} socket samples, vmferry's port in {})",
        src.hostname, dst.hostname, net.samples, net.vmferry_seen
    );
    if args.contains(&"--json") {
        // What the result says about the streams: the transport asked for (or auto's
        // first choice), and with --multifd N the main stream and N channels.
        let out = String::from_utf8_lossy(&o.stdout);
        let result: serde_json::Value =
            serde_json::from_str(out.lines().last().unwrap_or("{}")).context("the result")?;
        let want = args
            .windows(2)
            .find(|w| w[0] == "--transport")
            .map_or("direct", |w| w[1]);
        ensure!(result["transport"] == want, "{result}");
        if let Some(w) = args.windows(2).find(|w| w[0] == "--multifd") {
            let n: u64 = w[1].parse()?;
            ensure!(result["streams"] == n + 1, "{result}");
        }
    }
    ensure!(
        net.violations.is_empty(),
        "the hosts talked past vmferry: {:#?}",
        net.violations
    );
    ensure!(
        net.vmferry_seen > 0,
        "no connection on vmferry's port {PORT} was ever seen between the hosts ({} samples)",
        net.samples
    );

    ensure!(
        dst.domain_state(&dom.name)? == "running",
        "not running on {}",
        dst.hostname
    );
    ensure!(
        !src.domains()?.contains(&dom.name),
        "{} still knows the domain: {:?}",
        src.hostname,
        src.domains()?
    );
    let beats = wait_for("the guest beating on", Duration::from_secs(60), || {
        let b = heartbeats(&dst_serial);
        Ok((b.len() >= 3).then_some(b))
    })?;
    ensure!(
        beats[0] > before,
        "on {} the guest counts from {} — not on from {before}: it restarted",
        dst.hostname,
        beats[0]
    );
    let new = std::fs::read_to_string(&dst_serial)?;
    ensure!(
        !new.contains("vmferry-diskcheck BAD"),
        "the guest's disk on {} lost a write it made before: {new}",
        dst.hostname
    );

    // The source's image (its QEMU gone) and the destination's hold the same bytes, but
    // for the second sector, where the guest goes on writing its beat.
    let (mut was, mut now) = (src.read_disk(&disk)?, dst.read_disk(&disk)?);
    ensure!(
        now.starts_with(format!("{DISK_LINE}\n").as_bytes()),
        "{}'s disk does not start with the guest's first line: not copied",
        dst.hostname
    );
    let beat_on_disk = |d: &[u8]| -> Option<u64> {
        String::from_utf8_lossy(d.get(512..1024)?)
            .split('\n')
            .next()?
            .parse()
            .ok()
    };
    ensure!(
        beat_on_disk(&now).is_some_and(|n| n >= before),
        "{}'s disk holds beat {:?}, older than {before}",
        dst.hostname,
        beat_on_disk(&now)
    );
    ensure!(was.len() == now.len(), "the images' sizes differ");
    was[512..1024].fill(0);
    now[512..1024].fill(0);
    ensure!(
        was == now,
        "the disk images differ beyond the beat sector (first difference at byte {:?})",
        was.iter().zip(&now).position(|(x, y)| x != y)
    );

    for h in [src, dst] {
        s.wait_no_migration_dirs(h, Duration::from_secs(10))?;
    }
    Ok(before)
}

/// The migration was refused with `why` (case-insensitively) in its error, and nothing
/// happened: no domain on B, no migration directory on either host.
fn refused(s: &LvSetup, o: &Output, why: &str, what: &str) -> Result<()> {
    ensure!(
        !o.status.success(),
        "{what}: migrate succeeded: {}",
        text(o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        err.to_lowercase().contains(&why.to_lowercase()) && !err.contains("panicked"),
        "{what}: the error should say {why:?}: {}",
        text(o)
    );
    // Nothing moved, so there is nothing for the operator to check.
    ensure!(
        !err.contains("WARNING"),
        "{what}: a refusal before anything moved should carry no warning: {}",
        text(o)
    );
    eprintln!("{what}: {}", err.trim());
    if pid_alive(s.b.pid()) {
        let on_b = s.b.domains()?;
        ensure!(on_b.is_empty(), "{what}: B has a domain: {on_b:?}");
    }
    for h in [&s.a, &s.b] {
        s.wait_no_migration_dirs(h, Duration::from_secs(10))
            .with_context(|| what.to_string())?;
    }
    Ok(())
}

/// Whether A's libvirt reports an outgoing migration of `name` that has moved memory.
fn memory_moving(a: &LibvirtHost, name: &str) -> bool {
    let Ok(info) = a.virsh(&["domjobinfo", name], Duration::from_secs(10)) else {
        return false;
    };
    info.lines().any(|l| {
        l.starts_with("Memory processed:")
            && l.split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
    })
}

/// Runs `f`; on failure adds both daemons' and both libvirt hosts' logs.
fn with_diagnostics<T>(s: &LvSetup, f: impl FnOnce() -> Result<T>) -> Result<T> {
    f().map_err(|e| anyhow::anyhow!("{e:#}\n{}", s.diagnostics()))
}
