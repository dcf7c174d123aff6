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
//! accepts its own version and the one before ([`MIN_PROTOCOL_VERSION`]) and answers with
//! the version both then speak; anything else is refused with an error that names both
//! versions ([`negotiate_version`]). A controller treats a version-1 daemon as one without
//! leases, `detach` and typed states. Unknown fields are ignored (so a newer peer may add optional fields), unknown
//! request kinds are refused with an error naming them.
//!
//! This crate must never touch a socket, a file or a process: everything here is testable
//! (and fuzzable) as plain data.

#![forbid(unsafe_code)]

pub mod control;
pub mod cookie;
pub mod disk;
pub mod error;
pub mod libvirt;
pub mod names;
pub mod peer;
pub mod phase;
pub mod preamble;
pub mod tunnel_frame;

pub use control::*;
pub use cookie::*;
pub use disk::{CopyMode, CopyStorage, DiskProgress, DiskShape, StorageMode};
pub use error::*;
pub use names::*;
pub use phase::{
    DestinationEvent, DestinationState, LeaseAction, MigrationState, Phase, Role, SourceEvent,
    SourceState, TransitionError,
};

/// The control protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest version this build still accepts from a peer: the one before. A version-1
/// peer knows no leases, no `detach`, no peer link, and reports no typed state; what it
/// sends still parses (every new field has a default).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// A peer speaks a protocol version outside the window this build accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("{peer} speaks control protocol version {version}, which this vmferry ({PROTOCOL_VERSION}) no longer accepts (oldest: {MIN_PROTOCOL_VERSION}); upgrade it")]
    TooOld { peer: String, version: u32 },
    #[error("{peer} speaks control protocol version {version}, newer than this vmferry's {PROTOCOL_VERSION}; upgrade this side")]
    TooNew { peer: String, version: u32 },
}

/// Whether a peer speaking `version` is accepted; the version both then speak.
pub fn negotiate_version(version: u32, peer: &str) -> Result<u32, VersionError> {
    if version < MIN_PROTOCOL_VERSION {
        Err(VersionError::TooOld {
            peer: peer.to_string(),
            version,
        })
    } else if version > PROTOCOL_VERSION {
        Err(VersionError::TooNew {
            peer: peer.to_string(),
            version,
        })
    } else {
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_version_is_accepted_and_older_or_newer_ones_are_refused_by_name() {
        assert_eq!(
            negotiate_version(PROTOCOL_VERSION, "p"),
            Ok(PROTOCOL_VERSION)
        );
        assert_eq!(
            negotiate_version(PROTOCOL_VERSION - 1, "p"),
            Ok(PROTOCOL_VERSION - 1)
        );
        let old = negotiate_version(MIN_PROTOCOL_VERSION - 1, "vmferry 0.0.1").expect_err("old");
        assert!(old.to_string().contains("no longer accepts"), "{old}");
        assert!(old.to_string().contains("vmferry 0.0.1"), "{old}");
        let new = negotiate_version(PROTOCOL_VERSION + 1, "p").expect_err("new");
        assert!(new.to_string().contains("newer"), "{new}");
    }
}
