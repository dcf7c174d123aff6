//! End to end, attach mode: QEMUs started by someone else, two daemons, the exact command
//! forms outside tools use. Guest RAM lives in files on /dev/shm, so the test can write it
//! before and compare it after.

mod common;

use anyhow::Result;
use common::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;
use vmferry_testkit::capture::{file_contains, Capture};
use vmferry_testkit::netns::TwoHosts;
use vmferry_testkit::ports::free_port;
use vmferry_testkit::qemu::{start_qemu, QemuOpts, QemuProcess};
use vmferry_testkit::require;

const RAM_MIB: u64 = 128;

fn shm_file(tag: &str) -> Result<tempfile::NamedTempFile> {
    require::path("/dev/shm");
    Ok(tempfile::Builder::new()
        .prefix(&format!("vmferry-test-{tag}-"))
        .tempfile_in("/dev/shm")?)
}

fn qemu_pair(
    dir: &Path,
    src_ram: &Path,
    dst_ram: &Path,
    src_ns: Option<&vmferry_testkit::netns::Host>,
    dst_ns: Option<&vmferry_testkit::netns::Host>,
    dst_incoming: Option<&str>,
) -> Result<(QemuProcess, QemuProcess)> {
    require::qemu();
    let mut o = QemuOpts::new(dir.join("src.qmp"), dir.join("src.serial"));
    o.memory_mib = RAM_MIB;
    o.mem_file = Some(src_ram.to_path_buf());
    o.paused = true;
    o.netns = src_ns.cloned();
    let src = start_qemu(&o)?;
    let mut o = QemuOpts::new(dir.join("dst.qmp"), dir.join("dst.serial"));
    o.memory_mib = RAM_MIB;
    o.mem_file = Some(dst_ram.to_path_buf());
    o.prealloc = true;
    o.incoming = Some(dst_incoming.unwrap_or("defer").to_string());
    o.netns = dst_ns.cloned();
    let dst = start_qemu(&o)?;
    Ok((src, dst))
}

/// Fills guest RAM (through its backing file) with pseudo-random bytes, and `marker`
/// repeated over 4 MiB at 32 MiB if given.
fn fill_ram(path: &Path, seed: u64, marker: Option<&[u8]>) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..RAM_MIB {
        for chunk in buf.chunks_mut(8) {
            // xorshift64: fast, and incompressible enough for a transport test
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.write_all(&buf)?;
    }
    if let Some(m) = marker {
        f.seek(SeekFrom::Start(32 << 20))?;
        let region: Vec<u8> = m.iter().copied().cycle().take(4 << 20).collect();
        f.write_all(&region)?;
    }
    f.sync_all()?;
    Ok(())
}

fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba)?;
        let mut nb = 0;
        while nb < na {
            let n = fb.read(&mut bb[nb..na])?;
            if n == 0 {
                return Ok(false);
            }
            nb += n;
        }
        if na == 0 {
            return Ok(fb.read(&mut bb)? == 0);
        }
        if ba[..na] != bb[..na] {
            return Ok(false);
        }
    }
}

/// Runs one attach-mode migration on loopback with `extra` flags; returns the output and
/// whether the destination RAM equals the source RAM afterwards.
fn attach_migrate_with(multifd: u32, extra: &[&str]) -> Result<(std::process::Output, bool)> {
    attach_migrate_filled(multifd, extra, |p, seed| fill_ram(p, seed, None))
}

/// Guest RAM that compresses the way a page cache of text does (and has no zero pages,
/// which QEMU would skip anyway).
fn fill_ram_compressible(path: &Path, _seed: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut page = vec![0u8; 4096];
    for i in 0..(RAM_MIB << 8) {
        let line = format!("page {i:08} of the guest's page cache: lorem ipsum dolor sit amet. ");
        for (j, b) in page.iter_mut().enumerate() {
            *b = line.as_bytes()[j % line.len()];
        }
        f.write_all(&page)?;
    }
    f.sync_all()?;
    Ok(())
}

fn attach_migrate_filled(
    multifd: u32,
    extra: &[&str],
    fill: fn(&Path, u64) -> Result<()>,
) -> Result<(std::process::Output, bool)> {
    let tmp = tempfile::tempdir()?;
    // Exactly the forms an outside benchmark uses: one certs dir for everything.
    let certs = tmp.path().join("certs");
    let o = run({
        let mut c = vmferry();
        c.args(["certs", "init", "--dir"]).arg(&certs);
        c
    });
    assert!(o.status.success(), "{}", text(&o));
    let o = run({
        let mut c = vmferry();
        c.args(["certs", "issue", "--dir"]).arg(&certs).args([
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
        ]);
        c
    });
    assert!(o.status.success(), "{}", text(&o));
    let (p1, p2) = (free_port(), free_port());
    let a = format!("127.0.0.1:{p1}");
    let b = format!("127.0.0.1:{p2}");
    let _da = DaemonProc::start(None, &a, &tmp.path().join("s1"), &certs, &[])?;
    let _db = DaemonProc::start(None, &b, &tmp.path().join("s2"), &certs, &[])?;

    let (src_ram, dst_ram) = (shm_file("src")?, shm_file("dst")?);
    let (src, dst) = qemu_pair(tmp.path(), src_ram.path(), dst_ram.path(), None, None, None)?;
    fill(src_ram.path(), 0x5eed + u64::from(multifd))?;

    let mut c = vmferry();
    c.args(["migrate", "--from", &a, "--to", &b, "--src-qmp"])
        .arg(&src.qmp)
        .arg("--dst-qmp")
        .arg(&dst.qmp)
        .arg("--certs")
        .arg(&certs)
        .args(["--multifd", &multifd.to_string()])
        .args(extra);
    let o = run(c);
    let same = same_contents(src_ram.path(), dst_ram.path())?;
    // QMP serves one client at a time: vmferry held it while the migration ran, and must
    // have let go of it on both sides, whatever the outcome, for the QEMUs' owner.
    for (side, qmp) in [("source", &src.qmp), ("destination", &dst.qmp)] {
        let mut q = vmferry_qmp::Qmp::connect(qmp, Duration::from_secs(2))
            .map_err(|e| anyhow::anyhow!("{side} QMP still taken after the migration: {e}"))?;
        q.query_status()?;
    }
    if !o.status.success() {
        // A failed migration leaves the source QEMU usable.
        let mut q = vmferry_qmp::Qmp::connect(&src.qmp, Duration::from_secs(5))?;
        let st = q.query_migrate()?;
        assert!(
            !st.status.is_active(),
            "source still migrating after failure: {st:?}"
        );
    }
    Ok((o, same))
}

fn attach_migrate(multifd: u32) -> Result<()> {
    let (o, same) = attach_migrate_with(multifd, &[])?;
    assert!(o.status.success(), "migrate: {}", text(&o));
    assert!(same, "destination RAM differs from source RAM");
    Ok(())
}

/// `--compress zstd`: compressible guest memory crosses in a fraction of its size, over a
/// pump (direct, multifd) and inside the tunnel, and arrives byte for byte.
#[test]
fn compressed_migrations_shrink_on_the_wire_and_copy_ram_exactly() -> Result<()> {
    for (transport, multifd) in [("direct", 2), ("tunnel", 0)] {
        let extra = ["--compress", "zstd", "--transport", transport, "--json"];
        let (o, same) = attach_migrate_filled(multifd, &extra, fill_ram_compressible)?;
        assert!(o.status.success(), "migrate over {transport}: {}", text(&o));
        assert!(same, "destination RAM differs over {transport}");
        let out = String::from_utf8_lossy(&o.stdout);
        let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("{}"))?;
        assert_eq!(r["compression"], "zstd (level 1)", "{r}");
        let (bytes, wire) = (r["bytes"].as_u64(), r["wire_bytes"].as_u64());
        let (bytes, wire) = (bytes.unwrap_or(0), wire.unwrap_or(u64::MAX));
        assert!(bytes > RAM_MIB << 20, "{r}");
        assert!(
            wire < bytes / 10,
            "{transport}: {wire} of {bytes} bytes on the wire"
        );
    }
    // A level zstd does not have is refused before anything starts.
    let (o, _) = attach_migrate_with(0, &["--compress", "zstd", "--compress-level", "40"])?;
    assert!(!o.status.success());
    assert!(text(&o).contains("level 40"), "{}", text(&o));
    Ok(())
}

#[test]
fn x509_data_channel_mode_migrates_and_checks_the_destination_name() -> Result<()> {
    let (o, same) = attach_migrate_with(0, &["--data-auth", "x509"])?;
    assert!(o.status.success(), "migrate: {}", text(&o));
    assert!(same, "destination RAM differs from source RAM");
    let (o, _) = attach_migrate_with(0, &["--data-auth", "x509", "--tls-hostname", "hostb"])?;
    assert!(!o.status.success(), "a wrong --tls-hostname must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not valid for 'hostb'") && err.contains("'localhost'"),
        "{err}"
    );
    assert!(err.contains("source VM keeps running"), "{err}");
    Ok(())
}

#[test]
fn attach_mode_copies_guest_ram_byte_for_byte() -> Result<()> {
    attach_migrate(0)
}

#[test]
fn attach_mode_with_multifd_copies_guest_ram_byte_for_byte() -> Result<()> {
    attach_migrate(3)
}

/// The control: plain QEMU migration between the two hosts shows the marker on the wire;
/// the same migration through vmferry never does.
#[test]
fn guest_memory_never_crosses_the_wire_in_clear() -> Result<()> {
    const MARKER: &[u8] = b"<<vmferry-cleartext-marker-4f1c9a27 guest secret>>";
    require::netns();
    require::command("tcpdump");
    let tmp = tempfile::tempdir()?;
    let hosts = TwoHosts::new("clear")?;

    // 1. Control: unencrypted QEMU TCP migration from host a to host b.
    {
        let (src_ram, dst_ram) = (shm_file("csrc")?, shm_file("cdst")?);
        let d = tmp.path().join("plain");
        std::fs::create_dir_all(&d)?;
        let uri = format!("tcp:{}:4444", hosts.b.ip);
        let (src, dst) = qemu_pair(
            &d,
            src_ram.path(),
            dst_ram.path(),
            Some(&hosts.a),
            Some(&hosts.b),
            Some(&uri),
        )?;
        fill_ram(src_ram.path(), 7, Some(MARKER))?;
        let cap = Capture::start(
            &hosts.b,
            &hosts.b.iface,
            "tcp port 4444",
            &d.join("plain.pcap"),
        )?;
        let mut q = vmferry_qmp::Qmp::connect(&src.qmp, Duration::from_secs(5))?;
        q.migrate_set_parameters(serde_json::json!({"max-bandwidth": 300u64 << 20}))?;
        q.migrate(&uri)?;
        wait_completed(&mut q)?;
        let pcap = cap.stop()?;
        assert!(
            file_contains(&pcap, MARKER)?,
            "the control capture must see the marker (else this test proves nothing)"
        );
        drop(dst);
    }

    // 2. vmferry between the same two hosts.
    let pki = Pki::new(&tmp.path().join("pki"))?;
    let a_certs = pki.issue("hosta", Some(&hosts.a.ip.to_string()))?;
    let b_certs = pki.issue("hostb", Some(&hosts.b.ip.to_string()))?;
    let ctl = pki.issue("controller", None)?;
    let a_addr = format!("{}:4700", hosts.a.ip);
    let b_addr = format!("{}:4700", hosts.b.ip);
    let _da = DaemonProc::start(
        Some(&hosts.a),
        &a_addr,
        &tmp.path().join("a"),
        &a_certs,
        &[],
    )?;
    let _db = DaemonProc::start(
        Some(&hosts.b),
        &b_addr,
        &tmp.path().join("b"),
        &b_certs,
        &[],
    )?;
    // Every transport: direct, reverse (the destination dials) and the tunnel (all
    // streams in one connection to the control port), each with multifd streams.
    for transport in ["direct", "reverse", "tunnel"] {
        let (src_ram, dst_ram) = (shm_file("vsrc")?, shm_file("vdst")?);
        let d = tmp.path().join(transport);
        std::fs::create_dir_all(&d)?;
        let (src, dst) = qemu_pair(&d, src_ram.path(), dst_ram.path(), None, None, None)?;
        fill_ram(src_ram.path(), 9, Some(MARKER))?;
        let cap = Capture::start(&hosts.b, &hosts.b.iface, "tcp", &d.join("vmferry.pcap"))?;
        let mut c = hosts.a.command(BIN);
        c.args(["migrate", "--from", &a_addr, "--to", &b_addr, "--src-qmp"])
            .arg(&src.qmp)
            .arg("--dst-qmp")
            .arg(&dst.qmp)
            .arg("--certs")
            .arg(&ctl)
            .args(["--transport", transport, "--multifd", "2", "--json"])
            // Slow enough for tcpdump to keep every packet (it fails the test if it drops any).
            .args(["--max-bandwidth", "300M"]);
        let o = run(c);
        let pcap = cap.stop()?;
        assert!(o.status.success(), "migrate over {transport}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let result: serde_json::Value =
            serde_json::from_str(out.lines().last().expect("a result line"))?;
        assert_eq!(result["transport"], transport, "{result}");
        // Kernel TLS where the kernel offers it; here the fallback must say why not.
        let ulps =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
        let path = result["data_path"].as_str().unwrap_or("");
        if ulps.split_whitespace().any(|u| u == "tls") {
            assert!(path.contains("offers TLS offload"), "{path}");
        } else {
            assert!(path.contains("kernel TLS unavailable"), "{path}");
        }
        assert!(
            same_contents(src_ram.path(), dst_ram.path())?,
            "RAM differs after a migration over {transport}"
        );
        let size = std::fs::metadata(&pcap)?.len();
        assert!(
            size > RAM_MIB << 20,
            "{transport}: capture too small ({size} bytes) to have seen the migration"
        );
        assert!(
            !file_contains(&pcap, MARKER)?,
            "guest memory crossed the wire in clear over {transport}"
        );
        drop((src, dst));
    }
    Ok(())
}

fn wait_completed(q: &mut vmferry_qmp::Qmp) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let info = q.query_migrate()?;
        match info.status {
            vmferry_qmp::MigrationStatus::Completed => return Ok(()),
            vmferry_qmp::MigrationStatus::Failed => {
                anyhow::bail!("plain migration failed: {:?}", info.error_desc)
            }
            _ => {}
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "plain migration did not complete"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
