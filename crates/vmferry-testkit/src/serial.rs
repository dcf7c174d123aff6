//! Reading the guest's serial console log.

use anyhow::{bail, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// Every `vmferry-heartbeat N` in the log, in order.
pub fn heartbeats(log: &Path) -> Vec<u64> {
    let data = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&data);
    text.split("vmferry-heartbeat ")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Waits until a heartbeat ≥ `min` appears; returns the last one.
pub fn wait_for_heartbeat(log: &Path, min: u64, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(&last) = heartbeats(log).last() {
            if last >= min {
                return Ok(last);
            }
        }
        if Instant::now() > deadline {
            let tail: String = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "no heartbeat >= {min} in {} within {timeout:?}; log ends: {tail}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
