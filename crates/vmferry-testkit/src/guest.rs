//! The test guest: Debian 12's kernel and a busybox initramfs whose init dirties memory and
//! prints `vmferry-heartbeat N` on ttyS0 about twice a second (see scripts/mkinitramfs.py).
//!
//! The image is built by scripts/guest-image.sh into `$VMFERRY_CACHE` (default
//! `<repo>/.cache/guest`). [`guest_image`] runs that script once per test process. The script
//! returns at once when its stamp matches, rebuilds when the scripts changed, and holds a
//! file lock (`flock` on `.lock` in the cache) while it builds, so parallel test binaries and
//! `scripts/setup.sh` never build at the same time. (The lock lives in the script, not here:
//! a lock held by this process on its own open file would block the script forever.)

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

/// The kernel command line the tests boot the guest with. `no_timer_check`: under TCG on a
/// loaded machine the kernel's check that the IO-APIC timer ticks can fail, and the boot
/// ends in "IO-APIC + timer doesn't work!" (seen with the suite's load).
pub const APPEND: &str = "console=ttyS0 quiet panic=-1 no_timer_check";

/// Paths to boot the test guest with `-kernel`, `-initrd` and `-append`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

/// The repository root (this crate lives in `crates/vmferry-testkit`).
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&root).unwrap_or(root)
}

/// The guest image, built first if missing or stale.
pub fn guest_image() -> Result<GuestImage> {
    // The outcome is kept per process: every test asks, one builds (and shares a
    // failure, hence the Arc).
    static IMAGE: OnceLock<Result<GuestImage, Arc<anyhow::Error>>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build().map_err(Arc::new))
        .clone()
        .map_err(|e| anyhow!("test guest image: {e:#}"))
}

fn build() -> Result<GuestImage> {
    let root = repo_root();
    let dir = std::env::var_os("VMFERRY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/guest"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let script = root.join("scripts/guest-image.sh");
    let st = Command::new(&script)
        .env("VMFERRY_CACHE", &dir)
        .status()
        .with_context(|| format!("run {}", script.display()))?;
    if !st.success() {
        bail!("{} failed ({st})", script.display());
    }
    let canonical = |name: &str| {
        let p = dir.join(name);
        std::fs::canonicalize(&p).with_context(|| format!("{} missing", p.display()))
    };
    Ok(GuestImage {
        kernel: canonical("vmlinuz")?,
        initrd: canonical("initramfs.img")?,
        append: APPEND.into(),
    })
}
