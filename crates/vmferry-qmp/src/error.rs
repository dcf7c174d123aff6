//! The one error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Why a QMP call failed.
///
/// [`QmpError::Command`] leaves the session usable: QEMU understood the command and
/// refused it. So does [`QmpError::Timeout`] of a command's reply: the next command first
/// waits for the late reply (see [`crate::Qmp::execute`]); dropping the session instead
/// would need a new handshake, which a QEMU whose main loop is blocked cannot answer.
/// After any other error the caller should drop the [`crate::Qmp`] and connect again if
/// it still needs QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to before the connect timeout ran out.
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not send `what` within `after`.
    #[error("no {what} from QEMU within {after:?}")]
    Timeout { what: String, after: Duration },
    /// The socket failed in a way other than being closed.
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    /// QEMU sent something that is not a QMP message of the expected shape; the text says what.
    #[error("malformed QMP message: {0}")]
    Protocol(String),
    /// QEMU answered the command with an `error` reply.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// QEMU closed the socket (it exited, or dropped this client).
    #[error("QEMU closed the QMP connection")]
    Closed,
}
