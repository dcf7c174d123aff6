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

/// The shortest a wait for the guest may be. The guests are TCG guests, several at once
/// on a shared 2-core machine under the whole suite: a vCPU can get next to no CPU for
/// tens of seconds (CI saw a guest report "soft lockup - CPU#0 stuck for 44s" right after
/// its migration, then count on). A wait exists to catch a guest that never goes on, so
/// a shorter one asked for is lengthened to this; one that succeeds returns at once.
pub const MIN_GUEST_WAIT: Duration = Duration::from_secs(90);

/// Waits until the last heartbeat is at least `min`, and returns it; waits
/// [`MIN_GUEST_WAIT`] at least, whatever `timeout` says.
pub fn wait_for_heartbeat(log: &Path, min: u64, timeout: Duration) -> Result<u64> {
    let timeout = timeout.max(MIN_GUEST_WAIT);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(&last) = heartbeats(log).last() {
            if last >= min {
                return Ok(last);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no heartbeat >= {min} in {} within {timeout:?}; {}",
                log.display(),
                what_went_wrong(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the guest's next disk check ("vmferry-diskcheck ok N", printed every 10th
/// beat, or "vmferry-diskcheck BAD N") in a complete line of the log and fails if any check
/// in the log is BAD or none came within `timeout`. A console that starts past some beat
/// has not necessarily checked yet: a test must wait for the check, not assume it.
pub fn wait_for_disk_check(log: &Path, timeout: Duration) -> Result<()> {
    wait_for_check(log, "vmferry-diskcheck ", timeout)
}

/// As [`wait_for_disk_check`] for the busy guest's memory check ("vmferry-memcheck ok N"
/// every 20th beat): the memory it dirties from still has its first checksum.
pub fn wait_for_memory_check(log: &Path, timeout: Duration) -> Result<()> {
    wait_for_check(log, "vmferry-memcheck ", timeout)
}

fn wait_for_check(log: &Path, prefix: &str, timeout: Duration) -> Result<()> {
    let timeout = timeout.max(MIN_GUEST_WAIT);
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        match parse_check(&text, prefix) {
            Some(Err(bad)) => bail!(
                "{}: {bad}; the log ends: {:?}",
                log.display(),
                tail(log, 400)
            ),
            Some(Ok(())) => return Ok(()),
            None if Instant::now() > deadline => bail!(
                "no \"{}\" line in {} within {timeout:?}; the log ends: {:?}",
                prefix.trim_end(),
                log.display(),
                tail(log, 400)
            ),
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `None` until a complete check line appears; then `Ok` if every check says ok, else
/// the first BAD line.
fn parse_check(text: &str, prefix: &str) -> Option<Result<(), String>> {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut seen = false;
    for line in complete.lines() {
        if let Some(at) = line.find(prefix) {
            let verdict = line[at + prefix.len()..].trim_end();
            if !verdict.starts_with("ok ") {
                return Some(Err(line[at..].trim_end().to_string()));
            }
            seen = true;
        }
    }
    seen.then_some(Ok(()))
}

/// Lines a guest kernel prints when it fails: a test that sees one says so, with the
/// report from its start (a tail of the log holds only the end of a long oops).
const GUEST_FAILURES: [&str; 5] = [
    "BUG: ",
    "Oops",
    "Kernel panic",
    "general protection",
    "RIP: ",
];

/// For error messages: the guest kernel's failure report, from its first line (up to 3000
/// characters), if the log has one; else the end of the log.
fn what_went_wrong(log: &Path) -> String {
    match kernel_failure(log) {
        Some(report) => format!("the guest kernel failed: {report}"),
        None => format!("the log ends: {:?}", tail(log, 400)),
    }
}

/// The guest kernel's first failure report in the log (up to 3000 characters from the line
/// it starts on), if there is one.
pub fn kernel_failure(log: &Path) -> Option<String> {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let at = GUEST_FAILURES.iter().filter_map(|m| text.find(m)).min()?;
    let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
    Some(text[from..].chars().take(3000).collect())
}

/// The last `n` characters of the log, for error messages.
pub fn tail(log: &Path, n: usize) -> String {
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

    #[test]
    fn a_check_counts_once_its_line_ends_and_any_bad_one_fails() {
        let p = "vmferry-diskcheck ";
        assert_eq!(parse_check("vmferry-heartbeat 9\r\n", p), None);
        assert_eq!(
            parse_check("vmferry-diskcheck ok 1", p),
            None,
            "line not ended"
        );
        assert_eq!(
            parse_check("x\r\nvmferry-diskcheck ok 10\r\n", p),
            Some(Ok(()))
        );
        assert_eq!(
            parse_check(
                "vmferry-diskcheck ok 10\r\nvmferry-diskcheck BAD 12 (read '3')\r\n",
                p
            ),
            Some(Err("vmferry-diskcheck BAD 12 (read '3')".into()))
        );
        assert_eq!(
            parse_check("vmferry-memcheck BAD 20\n", "vmferry-memcheck "),
            Some(Err("vmferry-memcheck BAD 20".into()))
        );
    }
}
