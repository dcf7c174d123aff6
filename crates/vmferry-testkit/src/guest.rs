//! The test guest: Debian's kernel and a busybox initramfs that prints heartbeats.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

/// The repository root (this crate lives in crates/vmferry-testkit).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the image with scripts/guest-image.sh if needed (serialized by a lock file).
pub fn guest_image() -> Result<GuestImage> {
    let root = repo_root();
    let dir = std::env::var_os("VMFERRY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/guest"));
    let img = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.img"),
        append: "console=ttyS0 quiet panic=-1".into(),
    };
    if img.kernel.exists() && img.initrd.exists() {
        return img.canonical();
    }
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::File::create(dir.join(".lock"))?;
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock: {e}"))?;
    if !(img.kernel.exists() && img.initrd.exists()) {
        let st = Command::new(root.join("scripts/guest-image.sh"))
            .status()
            .context("run scripts/guest-image.sh")?;
        if !st.success() {
            bail!("scripts/guest-image.sh failed ({st})");
        }
    }
    img.canonical()
}

impl GuestImage {
    fn canonical(self) -> Result<Self> {
        Ok(GuestImage {
            kernel: std::fs::canonicalize(&self.kernel)?,
            initrd: std::fs::canonicalize(&self.initrd)?,
            append: self.append,
        })
    }
}
