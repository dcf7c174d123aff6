//! Test hosts: network namespaces joined by a veth pair, each with its own address.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One host: a network namespace with one veth end.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The veth interface inside the namespace.
    pub iface: String,
}

impl Host {
    /// A command that runs `program` inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        use std::io::Write;
        let mut c = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("spawn nft")?;
        c.stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())?;
        let st = c.wait()?;
        if !st.success() {
            bail!("nft failed in {} ({st})", self.name);
        }
        Ok(())
    }
}

/// Two hosts joined by a veth pair; removed (with every process inside) on drop.
#[derive(Debug)]
pub struct TwoHosts {
    pub a: Host,
    pub b: Host,
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip").args(args).output().context("run ip")?;
    if !o.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl TwoHosts {
    pub fn new(tag: &str) -> Result<TwoHosts> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // A subnet per instance, so tests can run in parallel.
        let x = ((pid.wrapping_mul(7) + n * 13) % 200 + 20) as u8;
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(6)
            .collect();
        let base = format!("vmf{tag}{}x{n}", pid % 100_000);
        let a = Host {
            name: format!("{base}a"),
            ip: Ipv4Addr::new(10, 231, x, 1),
            iface: "vethA".into(),
        };
        let b = Host {
            name: format!("{base}b"),
            ip: Ipv4Addr::new(10, 231, x, 2),
            iface: "vethB".into(),
        };
        let hosts = TwoHosts { a, b };
        hosts
            .create()
            .with_context(|| format!("creating test hosts {base}a/b"))?;
        Ok(hosts)
    }

    fn create(&self) -> Result<()> {
        let (a, b) = (&self.a, &self.b);
        ip(&["netns", "add", &a.name])?;
        ip(&["netns", "add", &b.name])?;
        // The veth is made inside namespace a, then one end moved to b: no names leak
        // into the root namespace.
        ip(&[
            "-n", &a.name, "link", "add", &a.iface, "type", "veth", "peer", "name", &b.iface,
        ])?;
        ip(&["-n", &a.name, "link", "set", &b.iface, "netns", &b.name])?;
        for h in [a, b] {
            ip(&[
                "-n",
                &h.name,
                "addr",
                "add",
                &format!("{}/24", h.ip),
                "dev",
                &h.iface,
            ])?;
            ip(&["-n", &h.name, "link", "set", &h.iface, "up"])?;
            ip(&["-n", &h.name, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }
}

fn kill_all_in(ns: &str) {
    for _ in 0..3 {
        let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() else {
            return;
        };
        let pids: Vec<i32> = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for h in [&self.a, &self.b] {
            kill_all_in(&h.name);
            let _ = Command::new("ip")
                .args(["netns", "del", &h.name])
                .stderr(Stdio::null())
                .status();
        }
    }
}
