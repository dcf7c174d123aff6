//! The error that crosses the wire: a daemon tells a controller why a request failed.

use serde::{Deserialize, Serialize};

/// What kind of failure a daemon reports, so a controller can react without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed, named something unknown, or came in the wrong phase.
    BadRequest,
    /// The peer speaks another protocol version.
    Version,
    /// The caller is not allowed to do this.
    Denied,
    /// No such VM or migration.
    NotFound,
    /// A VM or migration with that name already exists.
    Exists,
    /// QEMU failed or refused.
    Qemu,
    /// A data connection could not be made or was broken.
    Channel,
    /// The migration was cancelled.
    Cancelled,
    /// A wait ran out of time.
    Timeout,
    /// Anything else on the daemon's side.
    Internal,
}

/// A failure as sent to a peer: a kind and a sentence an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError {
            kind,
            message: message.into(),
        }
    }
}
