//! Packet capture inside a test host, to check what crosses the wire.

use crate::netns::Host;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running tcpdump; stop it to flush the file.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
    /// tcpdump's stderr lines (its closing summary counts dropped packets).
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Capture {
    pub fn start(host: &Host, iface: &str, filter: &str, path: &Path) -> Result<Capture> {
        let mut child = host
            .command("tcpdump")
            .args(["-i", iface, "-U", "-s", "0", "-B", "262144", "-w"])
            .arg(path)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn tcpdump")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                if let Ok(mut v) = l2.lock() {
                    v.push(line);
                }
            }
        });
        let mut cap = Capture {
            child: Some(child),
            path: path.to_path_buf(),
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if rx.try_recv().is_ok() {
                return Ok(cap);
            }
            if let Some(c) = cap.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("tcpdump exited ({st})");
                }
            }
            if Instant::now() > deadline {
                bail!("tcpdump did not start listening");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops tcpdump (SIGINT, so it flushes) and returns the capture file. Fails if the
    /// kernel dropped packets: a capture with holes proves nothing about what crossed.
    pub fn stop(mut self) -> Result<PathBuf> {
        if let Some(mut c) = self.child.take() {
            // Let the last packets reach the file.
            std::thread::sleep(Duration::from_millis(300));
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
        std::thread::sleep(Duration::from_millis(100));
        let lines = self.lines.lock().map(|v| v.clone()).unwrap_or_default();
        for l in &lines {
            if let Some(n) = l.strip_suffix(" packets dropped by kernel") {
                if n.trim() != "0" {
                    bail!("tcpdump dropped packets ({l}); the capture is incomplete");
                }
            }
        }
        Ok(self.path.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `needle` occurs anywhere in the file.
pub fn file_contains(path: &Path, needle: &[u8]) -> Result<bool> {
    let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(!needle.is_empty() && data.windows(needle.len()).any(|w| w == needle))
}
