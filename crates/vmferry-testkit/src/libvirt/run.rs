//! Commands with a deadline.

use crate::process::ChildGuard;
use anyhow::{anyhow, bail, Result};
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` to completion within `timeout`, collecting its output; kills it and fails
/// when it takes longer.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let program = format!("{:?}", cmd.get_program());
    let mut child = ChildGuard::spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    // The pipes are drained on threads, so a chatty child never blocks on a full pipe.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .child_mut()
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .child_mut()
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            // Killing the child closes its pipes, so the drain threads end.
            child.kill();
            let _ = out.join();
            let stderr = err.join().unwrap_or_default();
            bail!(
                "{program} did not finish within {timeout:?}: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out
        .join()
        .map_err(|_| anyhow!("reading {program}'s stdout panicked"))?;
    let stderr = err
        .join()
        .map_err(|_| anyhow!("reading {program}'s stderr panicked"))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}
