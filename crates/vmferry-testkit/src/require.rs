//! What a test needs from the machine, checked up front: a test that cannot run here fails,
//! naming what is missing. It never returns early as a pass.
//!
//! A skipped end-to-end test looks like a passed one in `cargo test`'s summary, so a suite
//! that skips quietly (no root, no QEMU, no nft) proves nothing while reporting success —
//! on CI most of all. Every check here therefore panics when its need is unmet, inside CI
//! (`CI` set, as CI services do) and outside it; only the hint differs.
//!
//! ```no_run
//! vmferry_testkit::require::netns(); // root and network namespaces, or the test fails
//! vmferry_testkit::require::command("nft");
//! ```

use anyhow::{anyhow, bail, Result};
use std::path::Path;
use std::sync::OnceLock;

/// Whether this runs under CI: `CI` is set to anything but empty, `false` or `0`.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Fails the calling test unless `ok`, saying it needs `what`.
#[track_caller]
pub fn require(what: &str, ok: bool) {
    if !ok {
        unmet(what, "not available here");
    }
}

/// Fails the calling test with `check`'s error unless it is `Ok`, saying it needs `what`.
#[track_caller]
pub fn require_ok(what: &str, check: Result<()>) {
    if let Err(e) = check {
        unmet(what, &format!("{e:#}"));
    }
}

/// Fails the calling test unless it runs as root (user namespaces do not count: the
/// tests make network namespaces, run tcpdump and switch uids).
#[track_caller]
pub fn root() {
    let euid = nix::unistd::geteuid();
    let check = if euid.is_root() {
        Ok(())
    } else {
        Err(anyhow!("running as uid {euid}"))
    };
    require_ok("root (network namespaces, tcpdump, other uids)", check);
}

/// Fails the calling test unless this process can make network namespaces: root,
/// iproute2's `ip`, and kernel support (a namespace is made and removed to find out).
#[track_caller]
pub fn netns() {
    root();
    command("ip");
    // One probe per test process: the answer does not change between tests.
    static PROBE: OnceLock<Result<(), anyhow::Error>> = OnceLock::new();
    if let Err(why) = PROBE.get_or_init(crate::netns::probe_netns) {
        unmet("network namespaces (ip netns add)", &format!("{why:#}"));
    }
}

/// Fails the calling test unless `program` is an executable file on `PATH`.
#[track_caller]
pub fn command(program: &str) {
    require_ok(&format!("the program {program}"), find_in_path(program));
}

/// Fails the calling test unless `path` exists (a device such as /dev/net/tun, or a
/// directory such as /dev/shm).
#[track_caller]
pub fn path(path: &str) {
    require(path, Path::new(path).exists());
}

/// QEMU for x86-64 guests (`qemu-system-x86_64`).
#[track_caller]
pub fn qemu() {
    command("qemu-system-x86_64");
}

/// The QEMU that runs every guest that keeps running while it migrates (they run under
/// TCG here): `$VMFERRY_TEST_QEMU` if set, else QEMU 10.0 ([`qemu10`]).
///
/// Not the system's 7.2: before 9.0, QEMU under TCG loses guest writes during a migration.
/// Its dirty-bitmap sync clears a page's bit without dropping the vCPU's writable TLB entry
/// for it, so later writes through that entry are never marked and never sent (fixed
/// upstream by 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory
/// access", QEMU 9.0). `bench/tcg_dirty_check.py` measures it with plain QEMU and no
/// vmferry in the path (README, "QEMU versions"): on 7.2 the two sides' RAM differed after
/// a completed migration in most runs on a loaded machine, and destination guests crashed;
/// on QEMU 10 it never differed. KVM's dirty log is not affected. Paused guests (`-S`)
/// write nothing and still run on 7.2.
#[track_caller]
pub fn guest_qemu() -> std::path::PathBuf {
    match std::env::var_os("VMFERRY_TEST_QEMU") {
        Some(q) if !q.is_empty() => std::path::PathBuf::from(q),
        _ => qemu10(),
    }
}

/// QEMU 10.0 beside the system's 7.2, for the cross-version tests: its binary's path.
/// `scripts/qemu10.sh` fetches it from bookworm-backports into `.cache/qemu10` once (the
/// set-up script does so too); a machine that cannot get it fails the test.
#[track_caller]
pub fn qemu10() -> std::path::PathBuf {
    static FOUND: OnceLock<Result<std::path::PathBuf, String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/qemu10.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || said.is_empty() {
            return Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(std::path::PathBuf::from(said))
    });
    match found {
        Ok(p) => p.clone(),
        Err(why) => unmet("QEMU 10.0 (scripts/qemu10.sh)", why),
    }
}

/// What a libvirt test host needs (crate::libvirt): root, network namespaces, libvirtd
/// and virsh, unshare/nsenter/hostname, socat and qemu-img, QEMU, the `libvirt-qemu` user
/// (libvirtd resolves it before it reads qemu.conf, even though the tests run QEMU as
/// root), and the directories the hosts mount their private copies over.
#[track_caller]
pub fn libvirt() {
    netns();
    qemu();
    for program in [
        "libvirtd", "virsh", "unshare", "nsenter", "hostname", "socat", "qemu-img",
    ] {
        command(program);
    }
    let user = nix::unistd::User::from_name("libvirt-qemu")
        .map_err(|e| anyhow!("cannot look it up: {e}"))
        .and_then(|u| u.map(|_| ()).ok_or_else(|| anyhow!("no such user")));
    require_ok(
        "the system user libvirt-qemu (libvirtd looks it up before reading qemu.conf)",
        user,
    );
    for dir in [
        "/var/lib/libvirt",
        "/var/cache/libvirt",
        "/var/log/libvirt",
        "/etc/libvirt",
    ] {
        path(dir);
    }
}

fn find_in_path(program: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(());
            }
        }
    }
    bail!("not found on PATH ({})", path.to_string_lossy())
}

#[track_caller]
fn unmet(what: &str, why: &str) -> ! {
    let hint = if on_ci() {
        "CI must provide it: scripts/setup.sh installs what the tests use, and CI runs as root"
    } else {
        "tests never skip: run scripts/setup.sh, and the tests as root (README)"
    };
    panic!("this test cannot run here: it needs {what}: {why}. {hint}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_met_need_passes() {
        require("nothing", true);
        require_ok("nothing", Ok(()));
        command("sh");
    }

    #[test]
    #[should_panic(expected = "this test cannot run here: it needs a unicorn: not available here")]
    fn an_unmet_need_fails_the_test_naming_it() {
        require("a unicorn", false);
    }

    #[test]
    #[should_panic(expected = "needs the program vmferry-no-such-program-7e1: not found on PATH")]
    fn a_missing_program_fails_the_test_naming_it() {
        command("vmferry-no-such-program-7e1");
    }
}
