//! Packet captures inside a test host, to check what crosses the wire.
//!
//! A capture is evidence only if it is complete: [`Capture::stop`] fails when tcpdump
//! reports packets dropped by the kernel, since a "marker not found" over a capture with
//! holes proves nothing.

use crate::netns::Host;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running tcpdump writing a pcap file; [`Capture::stop`] it to flush the file. Dropped
/// without `stop`, it is killed.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
    /// Collects tcpdump's stderr lines (its closing summary counts dropped packets); ends
    /// when tcpdump exits, returning them.
    reader: Option<JoinHandle<Vec<String>>>,
}

impl Capture {
    /// Runs `tcpdump -i IFACE -U -w PATH FILTER` inside `host`'s namespace and returns once
    /// it is listening (bounded: 10 s).
    pub fn start(host: &Host, iface: &str, filter: &str, path: &Path) -> Result<Capture> {
        let mut child = host
            .command("tcpdump")
            // --immediate-mode: hand each packet over at once. Without it libpcap batches
            // packets in ring blocks that are read when full or after a 1 s timeout, and a
            // SIGINT before then loses the last block without counting it as dropped.
            // -s 0: whole packets; -B: a 256 MiB kernel buffer, so fast transfers are kept.
            .args([
                "-i",
                iface,
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-B",
                "262144",
            ])
            .arg("-w")
            .arg(path)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn tcpdump")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        let mut cap = Capture {
            child: Some(child),
            path: path.to_path_buf(),
            reader: Some(reader),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(()) => return Ok(cap),
                // The reader ended: tcpdump closed stderr, i.e. it exited.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = cap.child.as_mut().and_then(|c| c.wait().ok());
                    bail!(
                        "tcpdump exited before listening ({status:?}): {}",
                        cap.stderr_lines().join("; ")
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() > deadline {
                bail!("tcpdump did not start listening on {iface} within 10 s");
            }
        }
    }

    /// Stops tcpdump (SIGINT, so it flushes and prints its summary) and returns the pcap
    /// path. Fails if the kernel dropped packets.
    pub fn stop(mut self) -> Result<PathBuf> {
        if let Some(mut c) = self.child.take() {
            // Let packets still in flight reach the capture, and a tcpdump that fell
            // behind on a loaded machine write out what its kernel buffer holds (a
            // SIGINT loses that without counting it as dropped): wait until the file
            // stops growing (bounded).
            std::thread::sleep(Duration::from_millis(300));
            let settle = Instant::now() + Duration::from_secs(20);
            let mut last = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
            while Instant::now() < settle {
                std::thread::sleep(Duration::from_millis(300));
                let now = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
                if now == last {
                    break;
                }
                last = now;
            }
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id())?);
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
        for l in self.stderr_lines() {
            if let Some(n) = l.strip_suffix(" packets dropped by kernel") {
                if n.trim() != "0" {
                    bail!("tcpdump dropped packets ({l}); the capture is incomplete");
                }
            }
        }
        Ok(self.path.clone())
    }

    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// tcpdump's stderr, once it has exited (the reader thread ends with the pipe).
    fn stderr_lines(&mut self) -> Vec<String> {
        self.reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default()
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

/// Whether `needle` occurs anywhere in the file: a plain byte search, so a marker is found
/// only if some packet carries it whole (repeat it in the payload to make sure one does).
pub fn file_contains(path: &Path, needle: &[u8]) -> Result<bool> {
    let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(!needle.is_empty() && data.windows(needle.len()).any(|w| w == needle))
}
