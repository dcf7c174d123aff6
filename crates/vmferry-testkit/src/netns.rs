//! Test hosts: two network namespaces joined by a veth pair ([`TwoHosts`]), or any
//! number of them on one bridge ([`Hosts`]), each with its own address.
//!
//! ```text
//!   namespace vmf-<tag>-<pid>-<n>a          namespace vmf-<tag>-<pid>-<n>b
//!   lo (up)   vethA 10.231.X.1/24 ◄──veth──► vethB 10.231.X.2/24   lo (up)
//!
//!   Hosts: namespace vmf-<tag>-<pid>-<n>hub holds bridge br0 and one veth end per host
//!   vethA 10.231.X.1/24 ◄──► pa ┐
//!   vethB 10.231.X.2/24 ◄──► pb ├ br0
//!   vethC 10.231.X.3/24 ◄──► pc ┘
//! ```
//! Nothing is created in the root namespace: each veth is made inside a host's namespace
//! and one end moved away, so parallel tests never collide on interface names. X differs
//! per instance (it need not: each set has its own stacks, but distinct subnets make
//! captures and logs unambiguous). Dropping [`TwoHosts`] or [`Hosts`] kills every process
//! left inside and deletes the namespaces (the veths and the bridge go with them).
//! Namespaces left behind by a test process that was killed outright (no unwinding) are
//! swept when the next process makes its first hosts.

use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

/// Prefix of every namespace this module makes; the sweep touches nothing else.
const PREFIX: &str = "vmf-";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// One test host: a network namespace with one end of the veth pair.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace name (as `ip netns` knows it).
    pub name: String,
    /// This host's address on the veth link (a /24).
    pub ip: Ipv4Addr,
    /// The veth interface inside the namespace (`vethA`, `vethB`, ...).
    pub iface: String,
}

impl Host {
    /// A command that runs `program` inside this host's namespace
    /// (`ip netns exec NAME program`; `ip` execs the program, so the child's pid is the
    /// program's own).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Starts `program args...` inside the namespace, stdin closed, output inherited; the
    /// process is killed when the returned guard is dropped.
    pub fn spawn_killable<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = ChildGuard::spawn(self.command(program).args(args).stdin(Stdio::null()))
            .with_context(|| format!("in namespace {}", self.name))?;
        self.wait_inside(&mut child)?;
        Ok(child)
    }

    /// Waits until `child` (started by [`Host::command`]) has joined this namespace or
    /// ended. Until `ip netns exec` has switched, the process is in no namespace the drop
    /// can find: dropping the host then would leave it running.
    fn wait_inside(&self, child: &mut ChildGuard) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = format!("/run/netns/{}", self.name);
        let ino = std::fs::metadata(&path)
            .with_context(|| format!("stat {path}"))?
            .ino();
        let want = format!("net:[{ino}]");
        let link = format!("/proc/{}/ns/net", child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = std::fs::read_link(&link).map(|l| l.to_string_lossy().into_owned());
            if now.as_deref().ok() == Some(want.as_str()) || child.try_wait()?.is_some() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "process {} did not join namespace {} within 10 s",
                    child.id(),
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Runs `f` on a new thread that has joined this host's network namespace, and returns
    /// its result: sockets `f` opens live in the namespace. Only that thread moves (a
    /// network namespace is per thread), so the test's own thread is unaffected.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("join namespace {}", self.name))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Loads an nftables ruleset inside the namespace (`nft -f -`).
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn nft")?;
        // Dropping stdin after the write closes it, so nft sees the end of the ruleset.
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())
            .context("write ruleset to nft")?;
        let out = child.wait_with_output().context("wait for nft")?;
        if !out.status.success() {
            bail!(
                "nft failed in {} ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Two hosts joined by a veth pair; removed, with every process inside, on drop.
#[derive(Debug)]
pub struct TwoHosts {
    pub a: Host,
    pub b: Host,
}

impl TwoHosts {
    /// Makes the two namespaces and the link. `tag` (its first 8 ASCII letters and digits)
    /// goes into the namespace names so a leftover can be traced to its test.
    pub fn new(tag: &str) -> Result<TwoHosts> {
        let (base, x) = next_base(tag);
        let hosts = TwoHosts {
            a: Host {
                name: format!("{base}a"),
                ip: Ipv4Addr::new(10, 231, x, 1),
                iface: "vethA".into(),
            },
            b: Host {
                name: format!("{base}b"),
                ip: Ipv4Addr::new(10, 231, x, 2),
                iface: "vethB".into(),
            },
        };
        // On failure `hosts` is dropped here, which removes whatever part was made.
        hosts
            .create()
            .with_context(|| format!("creating test hosts {base}a and {base}b"))?;
        Ok(hosts)
    }

    fn create(&self) -> Result<()> {
        let (a, b) = (&self.a, &self.b);
        ip(&["netns", "add", &a.name])?;
        ip(&["netns", "add", &b.name])?;
        ip(&[
            "-n", &a.name, "link", "add", &a.iface, "type", "veth", "peer", "name", &b.iface,
        ])?;
        ip(&["-n", &a.name, "link", "set", &b.iface, "netns", &b.name])?;
        for h in [a, b] {
            let addr = format!("{}/24", h.ip);
            ip(&["-n", &h.name, "addr", "add", &addr, "dev", &h.iface])?;
            ip(&["-n", &h.name, "link", "set", &h.iface, "up"])?;
            ip(&["-n", &h.name, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        remove_namespace(&self.a.name);
        remove_namespace(&self.b.name);
    }
}

/// Hosts on one bridge (in a namespace of its own): every host reaches every other.
/// Removed, with every process inside, on drop.
#[derive(Debug)]
pub struct Hosts {
    /// Host i has address 10.231.X.(i+1) and its namespace ends in the letter `a` + i.
    pub hosts: Vec<Host>,
    /// The namespace holding the bridge.
    hub: String,
}

impl Hosts {
    /// Most hosts one set may have (one letter each, and room in the /24).
    pub const MAX: usize = 20;

    /// Makes `n` (2 to [`Hosts::MAX`]) namespaces on one bridge. `tag` is used as in
    /// [`TwoHosts::new`].
    pub fn new(tag: &str, n: usize) -> Result<Hosts> {
        if !(2..=Self::MAX).contains(&n) {
            bail!("Hosts::new: {n} hosts asked for; give 2 to {}", Self::MAX);
        }
        let (base, x) = next_base(tag);
        let hosts = Hosts {
            hosts: (0..n)
                .map(|i| {
                    let letter = char::from(b'a' + i as u8);
                    Host {
                        name: format!("{base}{letter}"),
                        ip: Ipv4Addr::new(10, 231, x, i as u8 + 1),
                        iface: format!("veth{}", letter.to_ascii_uppercase()),
                    }
                })
                .collect(),
            hub: format!("{base}hub"),
        };
        // On failure `hosts` is dropped here, which removes whatever part was made.
        hosts
            .create()
            .with_context(|| format!("creating {n} test hosts {base}a... on bridge {base}hub"))?;
        Ok(hosts)
    }

    fn create(&self) -> Result<()> {
        let hub = self.hub.as_str();
        ip(&["netns", "add", hub])?;
        ip(&["-n", hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", hub, "link", "set", "br0", "up"])?;
        for (i, h) in self.hosts.iter().enumerate() {
            let port = format!("p{}", char::from(b'a' + i as u8));
            ip(&["netns", "add", &h.name])?;
            ip(&[
                "-n", &h.name, "link", "add", &h.iface, "type", "veth", "peer", "name", &port,
            ])?;
            ip(&["-n", &h.name, "link", "set", &port, "netns", hub])?;
            ip(&["-n", hub, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", hub, "link", "set", &port, "up"])?;
            let addr = format!("{}/24", h.ip);
            ip(&["-n", &h.name, "addr", "add", &addr, "dev", &h.iface])?;
            ip(&["-n", &h.name, "link", "set", &h.iface, "up"])?;
            ip(&["-n", &h.name, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }
}

impl std::ops::Index<usize> for Hosts {
    type Output = Host;
    fn index(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            remove_namespace(&h.name);
        }
        remove_namespace(&self.hub);
    }
}

/// The next namespace base name for `tag` (`vmf-<tag>-<pid>-<n>`) and its subnet octet.
fn next_base(tag: &str) -> (String, u8) {
    SWEEP.call_once(sweep_stale);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    (format!("{PREFIX}{tag}-{pid}-{n}"), subnet_octet(pid, n))
}

/// Whether this process can make network namespaces (root, `ip` present, kernel support):
/// makes one and removes it. Tests call [`crate::require::netns`], which fails them when not.
pub(crate) fn probe_netns() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("not running as root");
    }
    let name = format!(
        "{PREFIX}probe-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    ip(&["netns", "add", &name])?;
    remove_namespace(&name);
    Ok(())
}

/// The third octet of the link's subnet: distinct for the first 200 instances of a process
/// and, thanks to the pid, usually across processes too.
fn subnet_octet(pid: u32, n: u32) -> u8 {
    let v = (pid.wrapping_mul(37).wrapping_add(n)) % 200 + 20;
    u8::try_from(v).unwrap_or(20)
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip (is iproute2 installed?)")?;
    if !o.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Kills every process in namespace `ns` (a few rounds: one may fork as it dies), then
/// deletes it. Errors are ignored: this runs in `Drop`, and the namespace may be half made.
fn remove_namespace(ns: &str) {
    for _ in 0..5 {
        let pids = pids_in(ns);
        if pids.is_empty() {
            break;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn pids_in(ns: &str) -> Vec<i32> {
    let Ok(o) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Removes namespaces named `vmf-<tag>-<pid>-<n>{a,b,...,hub}` (or `vmf-probe-<pid>-<n>`) whose
/// creating process no longer exists.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_octets_differ_within_a_process() {
        let v: std::collections::HashSet<u8> = (0..200).map(|n| subnet_octet(4242, n)).collect();
        assert_eq!(v.len(), 200);
        assert!(v.iter().all(|&x| (20..220).contains(&x)));
    }
}
