//! What this host's QEMU binary is — its release and the machine types it can build —
//! probed once by running it (`--version`, `-machine help`), so that a destination refuses
//! a VM it cannot build before it starts anything, in words that say what to do.
//!
//! It only ever runs those two queries, each with a deadline; a binary that cannot be run
//! or answers nonsense is reported, never guessed about.

use crate::error::{DaemonError, Result};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vmferry_proto::QemuRelease;

/// How long one query of the binary may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// What the binary said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub release: QemuRelease,
    /// Every `-machine` name it accepts (versioned types and aliases).
    pub machines: Vec<String>,
}

#[derive(Debug)]
pub struct QemuBinary {
    path: String,
    probed: OnceLock<std::result::Result<Probe, String>>,
}

impl QemuBinary {
    pub fn new(path: &str) -> Self {
        QemuBinary {
            path: path.to_string(),
            probed: OnceLock::new(),
        }
    }

    pub fn probe(&self) -> Result<&Probe> {
        self.probed
            .get_or_init(|| probe(&self.path))
            .as_ref()
            .map_err(|e| DaemonError::Qemu(e.clone()))
    }

    /// Refuses a machine type this QEMU cannot build, naming one it can (the newest of
    /// the same family: `pc-q35-7.2` for `pc-q35-10.0` on QEMU 7.2). `whose` starts the
    /// sentence: "destination", "this host's".
    pub fn check_machine(&self, machine: &str, whose: &str) -> Result<()> {
        let p = self.probe()?;
        if p.machines.iter().any(|m| m == machine) {
            return Ok(());
        }
        let hint = newest_of_family(&p.machines, machine)
            .map(|m| format!("; start the VM with --machine {m}"))
            .unwrap_or_default();
        Err(DaemonError::BadRequest(format!(
            "{whose} QEMU {}.{} has no machine type {machine}{hint}",
            p.release.major, p.release.minor
        )))
    }
}

fn probe(path: &str) -> std::result::Result<Probe, String> {
    let version = run(path, &["--version"])?;
    let release = parse_version(&version)
        .ok_or_else(|| format!("'{path} --version' said {:?}: no version", first(&version)))?;
    let help = run(path, &["-machine", "help"])?;
    let machines = parse_machines(&help);
    if machines.is_empty() {
        return Err(format!("'{path} -machine help' listed no machine types"));
    }
    Ok(Probe { release, machines })
}

fn first(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// Runs the binary with `args` and returns what it printed, within [`PROBE_TIMEOUT`].
fn run(path: &str, args: &[&str]) -> std::result::Result<String, String> {
    let what = format!("'{path} {}'", args.join(" "));
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not answer within {} s",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `QEMU emulator version 7.2.22 (Debian ...)` → 7.2.22.
fn parse_version(text: &str) -> Option<QemuRelease> {
    let rest = text.split("version ").nth(1)?;
    let word = rest.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| p.parse::<u64>().ok());
    Some(QemuRelease {
        major: parts.next()??,
        minor: parts.next()??,
        micro: parts.next().flatten().unwrap_or(0),
    })
}

/// The names in `-machine help`: the first word of each line after the header; a line
/// `pc-q35-7.2  Standard PC (Q35 + ICH9, 2009) (alias of q35)` also makes `q35` a name.
fn parse_machines(help: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in help
        .lines()
        .skip_while(|l| !l.starts_with("Supported machines"))
    {
        if line.starts_with("Supported machines") {
            continue;
        }
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        names.push(name.to_string());
        if let Some(alias) = line
            .split("(alias of ")
            .nth(1)
            .and_then(|r| r.split(')').next())
        {
            names.push(alias.trim().to_string());
        }
    }
    names
}

/// Splits `pc-q35-10.0` into (`pc-q35-`, (10, 0)).
fn family_and_version(name: &str) -> Option<(&str, (u64, u64))> {
    let cut = name.rfind('-')? + 1;
    let (family, v) = name.split_at(cut);
    let (major, minor) = v.split_once('.')?;
    Some((family, (major.parse().ok()?, minor.parse().ok()?)))
}

/// The newest machine type of `wanted`'s family (`pc-q35-`) among `machines`.
pub fn newest_of_family<'a>(machines: &'a [String], wanted: &str) -> Option<&'a str> {
    let (family, _) = family_and_version(wanted)?;
    machines
        .iter()
        .filter_map(|m| {
            let (f, v) = family_and_version(m)?;
            (f == family).then_some((v, m.as_str()))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP_7_2: &str = "Supported machines are:\n\
        microvm              microvm (i386)\n\
        pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n\
        pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n\
        pc-i440fx-2.12       Standard PC (i440FX + PIIX, 1996)\n\
        q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n\
        pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n\
        pc-q35-7.1           Standard PC (Q35 + ICH9, 2009)\n\
        pc-q35-2.10          Standard PC (Q35 + ICH9, 2009)\n\
        none                 empty machine\n";

    #[test]
    fn versions_and_machine_types_are_read_from_the_binary_s_words() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some(QemuRelease {
                major: 10,
                minor: 0,
                micro: 2
            })
        );
        assert_eq!(parse_version("qemu, no version here"), None);
        let m = parse_machines(HELP_7_2);
        for name in ["q35", "pc-q35-7.2", "pc-i440fx-2.12", "none"] {
            assert!(m.iter().any(|x| x == name), "{name} missing from {m:?}");
        }
        assert!(!m.iter().any(|x| x.starts_with("Supported")));
    }

    #[test]
    fn an_unknown_machine_is_refused_naming_the_newest_of_its_family() {
        let machines = parse_machines(HELP_7_2);
        assert_eq!(
            newest_of_family(&machines, "pc-q35-10.0"),
            Some("pc-q35-7.2")
        );
        assert_eq!(
            newest_of_family(&machines, "pc-i440fx-9.2"),
            Some("pc-i440fx-7.2")
        );
        assert_eq!(newest_of_family(&machines, "virt-9.0"), None);
        let b = QemuBinary::new("qemu-system-x86_64");
        let _ = b.probed.set(Ok(Probe {
            release: QemuRelease {
                major: 7,
                minor: 2,
                micro: 22,
            },
            machines,
        }));
        let e = b
            .check_machine("pc-q35-10.0", "destination")
            .expect_err("unknown there");
        assert_eq!(
            e.to_string().trim_start_matches("bad request: "),
            "destination QEMU 7.2 has no machine type pc-q35-10.0; start the VM with --machine pc-q35-7.2"
        );
        assert!(b.check_machine("pc-q35-7.1", "destination").is_ok());
    }

    #[test]
    fn a_binary_that_cannot_run_is_reported() {
        let b = QemuBinary::new("/nonexistent/qemu");
        let e = b.probe().expect_err("cannot run");
        assert!(e.to_string().contains("/nonexistent/qemu"), "{e}");
    }
}
