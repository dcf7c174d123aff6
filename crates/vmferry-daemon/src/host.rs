//! What this host has to offer a migrated guest (`host_info`): the memory the kernel says
//! is available, beside what the managed VMs were given.
//!
//! It only reads: it must never reserve, allocate or start anything, and a request for it
//! must stay cheap (no QMP round trip to each VM).

use crate::error::{DaemonError, Result};
use crate::state::Daemon;
use vmferry_proto::HostInfo;

const MEMINFO: &str = "/proc/meminfo";

/// This host's figures now.
pub fn host_info(daemon: &Daemon) -> Result<HostInfo> {
    let text = std::fs::read_to_string(MEMINFO)
        .map_err(|e| DaemonError::Internal(format!("cannot read {MEMINFO}: {e}")))?;
    let mem_available = mem_available(&text).ok_or_else(|| {
        DaemonError::Internal(format!("{MEMINFO} has no readable MemAvailable line"))
    })?;
    let (vms, mib) = daemon.vms.memory_given();
    Ok(HostInfo {
        host: daemon.hostname.clone(),
        mem_available,
        vms_memory: mib.saturating_mul(1 << 20),
        vms,
    })
}

/// `MemAvailable` from `/proc/meminfo`'s text, in bytes (the kernel writes kB).
fn mem_available(meminfo: &str) -> Option<u64> {
    let rest = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut words = rest.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16310652 kB\nMemFree:         1020304 kB\n\
                    MemAvailable:    9473020 kB\nBuffers:          191868 kB\n";
        assert_eq!(mem_available(text), Some(9_473_020 * 1024));
    }

    #[test]
    fn a_meminfo_without_mem_available_or_with_another_unit_gives_nothing() {
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: 12 MB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn this_host_has_some_memory_available() {
        let text = std::fs::read_to_string(MEMINFO).expect("meminfo");
        assert!(mem_available(&text).unwrap_or(0) > 0);
    }
}
