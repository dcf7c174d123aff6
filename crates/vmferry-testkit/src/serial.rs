//! Reading the guest's serial console log (QEMU `-serial file:LOG`).
//!
//! QEMU appends to the log as the guest writes, so the last line may be incomplete: a
//! heartbeat counts only once its line has ended, else "vmferry-heartbeat 12" read between
//! the "1" and the "2" would show as 1.

use anyhow::{bail, Result};
use std::path::Path;
use std::time::{Duration, Instant};

const BEAT: &str = "vmferry-heartbeat ";

/// Every complete `vmferry-heartbeat N` line in the log, in order; empty if the log does
/// not exist yet.
pub fn heartbeats(log: &Path) -> Vec<u64> {
    let data = std::fs::read(log).unwrap_or_default();
    parse_heartbeats(&String::from_utf8_lossy(&data))
}

fn parse_heartbeats(text: &str) -> Vec<u64> {
    text.split(BEAT)
        .skip(1)
        .filter_map(|rest| {
            let end = rest.find(|c: char| !c.is_ascii_digit())?;
            if !rest[end..].starts_with(['\r', '\n']) {
                return None;
            }
            rest[..end].parse().ok()
        })
        .collect()
}

/// Waits until the last heartbeat is at least `min`, and returns it.
pub fn wait_for_heartbeat(log: &Path, min: u64, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(&last) = heartbeats(log).last() {
            if last >= min {
                return Ok(last);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no heartbeat >= {min} in {} within {timeout:?}; the log ends: {:?}",
                log.display(),
                tail(log, 400)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` characters of the log, for error messages.
fn tail(log: &Path, n: usize) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let skip = text.chars().count().saturating_sub(n);
    text.chars().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_complete_lines() {
        let log = "vmferry-guest: booted\r\nvmferry-heartbeat 1\r\nvmferry-heartbeat 2\r\n\
                   noise vmferry-heartbeat x\r\nvmferry-heartbeat 3\nvmferry-heartbeat 1";
        assert_eq!(parse_heartbeats(log), vec![1, 2, 3]);
        assert!(parse_heartbeats("").is_empty());
    }
}
