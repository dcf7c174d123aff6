//! A small, blocking QMP client over a unix socket.
//!
//! vmferry drives unmodified QEMU through its QMP monitor: it reads the run state, sets
//! migration capabilities and parameters, starts and follows migrations, and resumes or
//! stops guests. This crate is that client and nothing more: it has no policy and knows
//! nothing of vmferry's channels.
//!
//! ```text
//!  client                                QEMU
//!    │ connect (retried while QEMU starts)  │
//!    │ ◄──────── {"QMP": {"version": ..}} ──│ greeting
//!    │ ── {"execute": "qmp_capabilities"} ─►│
//!    │ ◄──────────────── {"return": {}} ────│ command mode
//!    │ ── {"execute": .., "id": n} ────────►│
//!    │ ◄──── {"event": ..} (queued) ────────│ any time
//!    │ ◄──── {"return"|"error": .., "id": n}│
//! ```
//! One JSON object per line ("\r\n"-terminated). Each command carries a fresh id, so the
//! late reply to a command that timed out is recognised and skipped, never taken for the
//! answer to the next one.
//!
//! What it must never do:
//! - **panic on QEMU's replies.** Whatever QEMU (or something pretending to be QEMU)
//!   sends ends in a value or a [`QmpError`]; lines are bounded ([`MAX_MESSAGE_LEN`]),
//!   unknown fields are ignored and unknown enum values are kept as text, so a newer
//!   QEMU does not break an older vmferry.
//! - **wait without a timeout.** Every read and write runs against a deadline that
//!   partial reads do not extend: a QEMU that hangs costs the caller the time it chose.
//! - **hold the socket longer than the caller asks.** QEMU's QMP socket serves one client
//!   at a time; a second client is accepted but never greeted. A [`Qmp`] owns the one
//!   connection and closes it when dropped.

#![forbid(unsafe_code)]

mod block;
mod client;
mod commands;
mod error;
#[cfg(test)]
mod fake_qemu;
mod machine;
mod types;
mod wire;

pub use block::{BlockDisk, BlockJob};
pub use client::{Qmp, DEFAULT_TIMEOUT, MAX_QUEUED_EVENTS};
pub use error::QmpError;
pub use machine::MachineFacts;
pub use types::{Event, MigrationInfo, MigrationStatus, QemuVersion, RamStats, RunStatus};
pub use wire::MAX_MESSAGE_LEN;
