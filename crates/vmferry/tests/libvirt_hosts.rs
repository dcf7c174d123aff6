//! libvirt's own live migration between two libvirt test hosts, every socket carried between
//! them by socat — the proof that the testkit's libvirt hosts work, and the mechanism of the
//! benchmark baseline that vmferry under libvirt will be measured against.
//!
//! Two netns hosts, a libvirtd on each (vmferry_testkit::libvirt). The test guest runs on A
//! with a local qcow2 disk; B has a blank image of the same size at the same path. Then:
//!
//! ```text
//! virsh -c A migrate --live --p2p --persistent --undefinesource --copy-storage-all \
//!   --desturi 'qemu+unix:///system?socket=DIR/libvirt.sock' \
//!   --migrateuri unix://DIR/migrate.sock --disks-uri unix://DIR/nbd.sock NAME
//! ```
//! DIR (`WORK/migrations/1`) is one path that names a different directory on each host. The
//! topology, which vmferry will carry instead of the socats (one socat pair per row: the
//! unix listener on A, TCP across the veth, the unix connect on B):
//!
//! | stream | on A, who connects | to what, on A | on B, the socat connects to | who listens there |
//! |---|---|---|---|---|
//! | libvirt RPC | A's libvirtd (p2p `desturi`) | DIR/libvirt.sock (socat) | /run/libvirt/libvirt-sock | B's libvirtd |
//! | RAM (main) | A's libvirtd, which hands the fd to A's QEMU | DIR/migrate.sock (socat) | DIR/migrate.sock | B's QEMU (`-incoming`, from prepare on) |
//! | NBD, one connection per disk | A's QEMU (drive-mirror's NBD client) | DIR/nbd.sock (socat) | DIR/nbd.sock | B's QEMU's NBD server (from prepare on) |
//!
//! Nothing listens on B's DIR before prepare, and nothing on A's DIR but the socats. The
//! test then checks that the guest runs on B (its heartbeat goes on counting, its disk
//! holds what it wrote on A) and is gone from A, and that no process or mount of the hosts
//! outlives them. It must stay well under a minute (the hosts start in parallel).

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use vmferry_testkit::guest::guest_image;
use vmferry_testkit::libvirt::{Domain, LibvirtHost, UnixBridge};
use vmferry_testkit::netns::TwoHosts;
use vmferry_testkit::require;

const NAME: &str = "vmf-guest";
const DISK_MIB: u64 = 16;
const DISK_LINE: &str = "vmferry-libvirt-disk";

#[test]
fn libvirt_migrates_a_guest_and_its_disk_between_hosts_over_bridged_unix_sockets() -> Result<()> {
    require::libvirt();
    let t0 = Instant::now();
    let image = guest_image()?;
    let tmp = tempfile::tempdir()?;
    let hosts = TwoHosts::new("libvirt")?;
    let (a, b) = LibvirtHost::start_two(&hosts, tmp.path())?;
    eprintln!("two libvirtds answer after {:?}", t0.elapsed());

    // A failure quotes both hosts' libvirtd and QEMU logs.
    let b_qemu = migrate_and_check(&a, &b, image, t0).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n=== host a:{}\n=== host b:{}",
            a.diagnostics(),
            b.diagnostics()
        )
    })?;
    let (a_libvirtd, b_libvirtd) = (a.pid(), b.pid());

    // Everything goes with the hosts: libvirtd, B's QEMU, the hosts' mounts.
    drop(a);
    drop(b);
    for (what, pid) in [
        ("A's libvirtd", a_libvirtd),
        ("B's libvirtd", b_libvirtd),
        ("B's QEMU", b_qemu),
    ] {
        ensure!(!alive(pid), "{what} (pid {pid}) outlived its host");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let root = tmp.path().to_string_lossy().into_owned();
    ensure!(
        !mounts.contains(&root),
        "a mount under {root} leaked into the test's namespace"
    );
    drop(hosts);
    eprintln!("whole test: {:?}", t0.elapsed());
    Ok(())
}

/// Starts the guest on A, migrates it to B, checks it there; returns B's QEMU's pid.
fn migrate_and_check(
    a: &LibvirtHost,
    b: &LibvirtHost,
    image: vmferry_testkit::guest::GuestImage,
    t0: Instant,
) -> Result<u32> {
    let dom = Domain::migrating_guest(NAME, &a.work, image);
    let disk = dom.disk.clone().context("the test guest has a disk")?;
    a.create_disk(&disk, DISK_MIB, Some(DISK_LINE))?;
    // The destination's image must exist beforehand, with the same virtual size.
    b.create_disk(&disk, DISK_MIB, None)?;
    a.start_domain(&dom)?;
    let before = a.wait_for_heartbeat(&dom, 3, Duration::from_secs(60))?;
    eprintln!("guest beats on A ({before}) after {:?}", t0.elapsed());

    // One fresh directory per migration, the same path on both hosts.
    let dir = a.work.join("migrations/1");
    for h in [a, b] {
        let d = h.outside(&dir)?;
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    }
    let libvirt_sock = dir.join("libvirt.sock");
    let migrate_sock = dir.join("migrate.sock");
    let nbd_sock = dir.join("nbd.sock");
    let _bridges = [
        UnixBridge::start(
            a,
            &libvirt_sock,
            b,
            Path::new("/run/libvirt/libvirt-sock"),
            16509,
        )?,
        UnixBridge::start(a, &migrate_sock, b, &migrate_sock, 49152)?,
        UnixBridge::start(a, &nbd_sock, b, &nbd_sock, 10809)?,
    ];

    let t = Instant::now();
    let desturi = format!("qemu+unix:///system?socket={}", libvirt_sock.display());
    let migrateuri = format!("unix://{}", migrate_sock.display());
    let disksuri = format!("unix://{}", nbd_sock.display());
    a.virsh(
        &[
            "migrate",
            "--live",
            "--p2p",
            "--persistent",
            "--undefinesource",
            "--copy-storage-all",
            "--desturi",
            &desturi,
            "--migrateuri",
            &migrateuri,
            "--disks-uri",
            &disksuri,
            NAME,
        ],
        Duration::from_secs(45),
    )?;
    eprintln!("virsh migrate took {:?}", t.elapsed());

    ensure!(
        b.domain_state(NAME)? == "running",
        "the domain is not running on B"
    );
    let after = b.wait_for_heartbeat(&dom, before + 2, Duration::from_secs(20))?;
    let on_b = b.heartbeats(&dom)?;
    ensure!(
        on_b.first().is_some_and(|&n| n > before),
        "B's guest counts from {:?}, not on from A's {before}: it did not migrate",
        on_b.first()
    );
    ensure!(
        !a.domains()?.iter().any(|d| d == NAME),
        "the domain is still known to A after --undefinesource: {:?}",
        a.domains()?
    );
    let serial = std::fs::read_to_string(b.outside(&dom.serial)?)?;
    ensure!(
        !serial.contains("vmferry-diskcheck BAD"),
        "the guest's disk on B lost a write it made on A: {serial}"
    );
    check_disk(b, &disk)?;
    eprintln!(
        "guest beats on B ({after}); domain gone from A; after {:?}",
        t0.elapsed()
    );

    b.qemu_pid(NAME)
        .context("B's QEMU has no pid file: the domain does not run there")
}

/// B's image (read while QEMU has it open: `-U`) starts with the line A's image had, and its
/// second sector holds a heartbeat number the guest wrote.
fn check_disk(b: &LibvirtHost, disk: &Path) -> Result<()> {
    let data = b.read_disk(disk)?;
    ensure!(
        data.starts_with(format!("{DISK_LINE}\n").as_bytes()),
        "B's disk does not start with A's first line: the disk was not copied"
    );
    let sector1 = String::from_utf8_lossy(data.get(512..1024).unwrap_or_default());
    ensure!(
        sector1
            .split('\n')
            .next()
            .is_some_and(|l| l.parse::<u64>().is_ok()),
        "B's disk's second sector holds no heartbeat number: {sector1:?}"
    );
    Ok(())
}

/// Whether process `pid` exists and is not a zombie (a killed QEMU's parent may be an init
/// that reaps late).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
