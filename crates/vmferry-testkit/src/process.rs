//! Child processes that cannot outlive the test that started them.
//!
//! A test that panics unwinds through its locals, so a guard's `Drop` is the one place that
//! runs on every way out. Without it a failed test leaves a QEMU or a daemon running, which
//! then holds ports and namespaces that the next run trips over.

use anyhow::{Context, Result};
use std::process::{Child, Command, ExitStatus};

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `cmd` as it is configured (stdio included).
    pub fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
        Ok(ChildGuard { child })
    }

    /// Takes ownership of an already running child.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited (it is reaped then), `None` if it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Kills the process now and reaps it; later calls and the drop do nothing more.
    pub fn kill(&mut self) {
        // kill() fails only if the child was already reaped; wait() then returns the
        // cached status, so both errors mean "already gone".
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
