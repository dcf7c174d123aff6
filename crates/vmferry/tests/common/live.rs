//! Two hosts with a daemon each and a real guest on host a: what the live end-to-end
//! tests share.

use super::*;
use anyhow::{Context, Result};
use vmferry_testkit::guest::guest_image;
use vmferry_testkit::netns::TwoHosts;
use vmferry_testkit::require;

pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub hosts: TwoHosts,
    pub ctl: std::path::PathBuf,
    pub a_addr: String,
    pub b_addr: String,
    pub da: DaemonProc,
    pub db: DaemonProc,
}

pub fn setup(tag: &str) -> Result<Setup> {
    setup_with(tag, None)
}

/// Two hosts, a daemon on each (TCG) with its control port on :4700 and, if given, a
/// data-only port.
pub fn setup_with(tag: &str, data_port: Option<u16>) -> Result<Setup> {
    setup_full(tag, data_port, None)
}

const SYSTEM_QEMU: &str = "qemu-system-x86_64";

/// Two hosts as [`setup`] makes them, host b's daemon reading `b_config` (TOML) too, and
/// host a's running the system's QEMU.
pub fn setup_with_config(tag: &str, b_config: &str) -> Result<Setup> {
    setup_full(tag, None, Some(b_config))
}

fn setup_full(tag: &str, data_port: Option<u16>, b_config: Option<&str>) -> Result<Setup> {
    require::netns();
    require::qemu();
    let tmp = tempfile::tempdir()?;
    let hosts = TwoHosts::new(tag)?;
    let pki = Pki::new(tmp.path())?;
    let a_certs = pki.issue("hosta", Some(&hosts.a.ip.to_string()))?;
    let b_certs = pki.issue("hostb", Some(&hosts.b.ip.to_string()))?;
    let ctl = pki.issue("controller", None)?;
    let a_addr = format!("{}:4700", hosts.a.ip);
    let b_addr = format!("{}:4700", hosts.b.ip);
    let mut a_args = daemon_args(&hosts.a, data_port);
    // With a config, B runs the QEMU it names and A keeps the system's (the cross-version
    // tests), not the tests' usual QEMU 10.
    if b_config.is_some() {
        a_args.extend(["--qemu".to_string(), SYSTEM_QEMU.to_string()]);
    }
    let da = DaemonProc::start(
        Some(&hosts.a),
        &a_addr,
        &tmp.path().join("a"),
        &a_certs,
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let mut b_args = daemon_args(&hosts.b, data_port);
    if let Some(text) = b_config {
        let path = tmp.path().join("b.toml");
        let dir = tmp.path().join("b");
        std::fs::write(
            &path,
            format!("state_dir = {:?}\n{text}", dir.display().to_string()),
        )?;
        b_args.push("--config".into());
        b_args.push(path.display().to_string());
    }
    let db = DaemonProc::start(
        Some(&hosts.b),
        &b_addr,
        &tmp.path().join("b"),
        &b_certs,
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    Ok(Setup {
        tmp,
        hosts,
        ctl,
        a_addr,
        b_addr,
        da,
        db,
    })
}

fn daemon_args(h: &vmferry_testkit::netns::Host, data_port: Option<u16>) -> Vec<String> {
    let mut v = vec!["--accel".to_string(), "tcg".to_string()];
    if let Some(p) = data_port {
        v.push("--data-listen".into());
        v.push(format!("{}:{p}", h.ip));
    }
    v
}

pub fn start_guest(s: &Setup, name: &str) -> Result<(u32, std::path::PathBuf)> {
    start_guest_with(s, name, &[])
}

pub fn start_guest_with(
    s: &Setup,
    name: &str,
    extra: &[&str],
) -> Result<(u32, std::path::PathBuf)> {
    let img = guest_image()?;
    let mut c = s.hosts.a.command(BIN);
    c.args(["vm", "start", name, "--daemon", &s.a_addr, "--certs"])
        .arg(&s.ctl)
        .args([
            "--memory", "256M", "--cpus", "1", "--accel", "tcg", "--kernel",
        ])
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args(["--append", &img.append])
        .args(extra);
    let o = run(c);
    assert!(o.status.success(), "vm start: {}", text(&o));
    let list = run({
        let mut c = s.hosts.a.command(BIN);
        c.args(["vm", "list", "--json", "--daemon", &s.a_addr, "--certs"])
            .arg(&s.ctl);
        c
    });
    assert!(list.status.success(), "vm list: {}", text(&list));
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    let pid = vms
        .as_array()
        .and_then(|v| v.iter().find(|v| v["spec"]["name"] == name))
        .and_then(|v| v["pid"].as_u64())
        .with_context(|| format!("no pid for {name} in {vms}"))? as u32;
    let log = s.da.state_dir.join("vms").join(name).join("serial.log");
    Ok((pid, log))
}
