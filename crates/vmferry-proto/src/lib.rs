//! The vmferry wire protocol, without any I/O: control messages, the migration cookie,
//! and the validation of what a peer sends.
//!
//! # Message sequence
//! ```text
//! controller                 source daemon                destination daemon
//!     |-- Hello ------------------>|                               |
//!     |-- Hello --------------------------------------------------->|
//!     |-- Begin(vm) -------------->|  ephemeral identity S          |
//!     |<- Begun(cookie: S fp, vm) -|                               |
//!     |-- Prepare(cookie) ------------------------------------------>|  ephemeral identity D,
//!     |<- Prepared(cookie: D fp, data address) ---------------------|  QEMU -incoming on a unix socket
//!     |-- Perform(cookie) -------->|  dials D (TLS, pins D), QEMU migrates to a unix socket
//!     |-- Status ----------------->|  (polled: progress from query-migrate)
//!     |-- Finish ---------------------------------------------------->|  QEMU completed? resume guest
//!     |-- Confirm(ok) ------------>|  stop source QEMU
//! ```
//! On failure the controller sends `Abort` to the destination (its QEMU is killed) and
//! `Confirm(ok = false)` to the source (its guest keeps running).
//!
//! # Versioning
//! Every control connection starts with [`Hello`] carrying [`PROTOCOL_VERSION`]. A daemon
//! refuses any other version with an error that names both versions; there is no silent
//! downgrade. Unknown fields are ignored (so a newer peer may add optional fields), unknown
//! request kinds are refused with an error naming them.
//!
//! This crate must never touch a socket, a file or a process: everything here is testable
//! (and fuzzable) as plain data.

#![forbid(unsafe_code)]

pub mod control;
pub mod cookie;
pub mod error;
pub mod names;
pub mod preamble;
pub mod tunnel_frame;

pub use control::*;
pub use cookie::*;
pub use error::*;
pub use names::*;

/// The control protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
