//! The peer link: what the two daemons of one migration tell each other directly, over
//! one more connection of the migration's data channel (same transport, same pinned
//! identities), so that neither depends on the controller to learn how the other fares.
//!
//! Each side sends its state whenever it changes and at least every
//! [`PEER_HEARTBEAT_MS`]; a side that hears nothing for [`PEER_SILENCE_MS`] takes the
//! link for dead. The link carries no authority beyond the TLS identity it runs in, and
//! no guest byte.
//!
//! ```text
//!  source                                   destination
//!    |--- {state: performing} ------------------>|
//!    |<-- {state: receiving} --------------------|
//!    |<-- {state: aborted, cause: "the destination QEMU exited: ..."}   (failure pushed at once)
//!    |--- {state: completed} ------------------->|   lease gone: the destination resumes
//!    |<-- {state: finished} ---------------------|   ... and the source may stop its QEMU
//! ```

use crate::phase::MigrationState;
use serde::{Deserialize, Serialize};

/// How often each side says where it stands, even without change.
pub const PEER_HEARTBEAT_MS: u64 = 1_000;
/// Silence after which the link counts as dead.
pub const PEER_SILENCE_MS: u64 = 5_000;
/// Largest peer message accepted.
pub const MAX_PEER_MESSAGE: usize = 16 * 1024;

/// One message on the peer link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMessage {
    /// The sender's state.
    pub state: MigrationState,
    /// Why, for a failed state: in the failing side's words (QEMU's own when it is QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::{DestinationState, SourceState};

    #[test]
    fn peer_messages_round_trip_and_keep_their_cause() {
        let m = PeerMessage {
            state: MigrationState::Destination(DestinationState::Aborted),
            cause: Some("Size mismatch".into()),
        };
        let t = serde_json::to_string(&m).expect("ser");
        assert_eq!(t, r#"{"state":"aborted","cause":"Size mismatch"}"#);
        assert_eq!(serde_json::from_str::<PeerMessage>(&t).expect("de"), m);
        let s: PeerMessage = serde_json::from_str(r#"{"state":"completed"}"#).expect("de");
        assert_eq!(s.state, MigrationState::Source(SourceState::Completed));
    }

    #[test]
    fn a_peer_message_with_an_unknown_state_is_refused() {
        assert!(serde_json::from_str::<PeerMessage>(r#"{"state":"exploded"}"#).is_err());
    }
}
