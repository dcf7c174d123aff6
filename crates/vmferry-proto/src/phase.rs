//! The phases of a migration and the states each daemon's half goes through, with the
//! transitions allowed between them. No I/O: the daemons hold one of these states per
//! migration and ask [`SourceState::next`] / [`DestinationState::next`] before they act,
//! so a request in the wrong phase is refused by the same table everywhere.
//!
//! # Phases, as the controller drives them
//! ```text
//!   begin ──► prepare ──► connect ──► perform ──► (watch) ──► finish ──► confirm
//!   source    destination  source     source                  destination source
//!                          (+dest for reverse)
//! ```
//!
//! # The source's states
//! ```text
//!            connect            perform              QEMU completed           confirm(ok)
//!  Begun ─────────────► Connected ───────► Performing ──────────────► Completed ──────────► Confirmed
//!    │ ▲  (retry: another │                   │                          │
//!    │ └──── transport) ──┘                   │                          │ the destination aborted,
//!    │  perform (a controller that did        │                          │ or confirm(false)
//!    │  not negotiate: dial direct) ──────────┤                          ▼
//!    └──────────── fail / cancel / lease ─────┴──────────────────────► RolledBack
//! ```
//! `Completed` is the switch-over line: before it, any failure rolls back (the source
//! guest keeps running); after it, the source may only stop once the destination runs
//! the guest, and may only resume if the destination has aborted.
//!
//! With post-copy, the switch-over comes earlier: `Performing → PostCopy` when QEMU
//! starts post-copy, after which the guest runs on the destination and part of its memory
//! is still on the source. Nothing rolls back from there: it completes, or — if a QEMU
//! dies — the guest is `Lost`, and the source never resumes its stale copy.
//!
//! # The destination's states
//! ```text
//!             streams reach QEMU           QEMU loaded everything        guest resumed
//!  Prepared ──────────────────► Receiving ──────────────────────► Loaded ─────────────► Finished
//!     │                            │                                 │
//!     └──── abort / expired / QEMU failed / lease ───────────────────┴────────────────► Aborted
//! ```
//! `Loaded` means the destination QEMU holds the whole state: from there the only safe
//! way forward is to resume it (unless the source says it rolled back, which it cannot
//! once its QEMU completed).
//!
//! # Leases
//! A controller that sets [`crate::MigrationOptions::lease_ms`] keeps the migration
//! alive by renewing it on both daemons. When a lease runs out, each daemon decides by
//! its own state ([`SourceState::on_lease_expiry`], [`DestinationState::on_lease_expiry`]):
//! before the switch-over it rolls back, after it the migration finishes without the
//! controller. Never are both halves left paused.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One step of the protocol, as the controller runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Begin,
    Prepare,
    Connect,
    Perform,
    /// Following the source until QEMU is done (not a request of its own: status polls).
    Watch,
    Finish,
    Confirm,
}

impl Phase {
    /// Every phase, in the order the controller runs them.
    pub const ALL: [Phase; 7] = [
        Phase::Begin,
        Phase::Prepare,
        Phase::Connect,
        Phase::Perform,
        Phase::Watch,
        Phase::Finish,
        Phase::Confirm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Begin => "begin",
            Phase::Prepare => "prepare",
            Phase::Connect => "connect",
            Phase::Perform => "perform",
            Phase::Watch => "migration",
            Phase::Finish => "finish",
            Phase::Confirm => "confirm",
        }
    }

    /// The daemon that serves this phase.
    pub fn served_by(self) -> Role {
        match self {
            Phase::Prepare | Phase::Finish => Role::Destination,
            _ => Role::Source,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Which half of a migration a daemon holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A state change the table refused: what was asked, in which state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{role} of the migration cannot {event} while it is {from}")]
pub struct TransitionError {
    pub role: Role,
    pub from: &'static str,
    pub event: &'static str,
}

/// The source half's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// `begin` made the identity and the first cookie; the guest is untouched.
    Begun,
    /// A data channel is made and waits for QEMU.
    Connected,
    /// QEMU is sending the guest.
    Performing,
    /// QEMU switched to post-copy: the guest runs on the destination, which fetches the
    /// rest of its memory from here.
    PostCopy,
    /// QEMU sent everything (the guest is paused here, in `postmigrate`): the switch-over.
    Completed,
    /// The destination runs the guest; the source QEMU is stopped. Final.
    Confirmed,
    /// The migration failed or was cancelled; the source guest keeps running. Final.
    RolledBack,
    /// A QEMU failed during post-copy: the guest's memory was split between the hosts
    /// and cannot be put together again. Final.
    Lost,
}

/// What happens to a source half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEvent {
    /// A data channel was made (again: a controller may try transports in turn).
    Connect,
    /// QEMU was told to migrate.
    Perform,
    /// QEMU started post-copy.
    StartPostCopy,
    /// QEMU reports `completed`.
    QemuCompleted,
    /// The destination runs the guest (confirm(ok), or the destination said so).
    Confirm,
    /// Failure, cancel, or confirm(false): the source guest must keep running.
    RollBack,
    /// Failure during post-copy.
    Lose,
}

impl SourceEvent {
    fn as_str(self) -> &'static str {
        match self {
            SourceEvent::Connect => "make its data channel",
            SourceEvent::Perform => "start sending",
            SourceEvent::StartPostCopy => "switch to post-copy",
            SourceEvent::Lose => "lose the guest",
            SourceEvent::QemuCompleted => "complete",
            SourceEvent::Confirm => "be confirmed",
            SourceEvent::RollBack => "roll back",
        }
    }
}

/// What a daemon does with a half whose lease ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Before the switch-over: undo (source runs, destination torn down).
    RollBack,
    /// After it: complete the migration without the controller.
    FinishAlone,
    /// Already over; nothing to do.
    Nothing,
}

impl SourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Begun => "begun",
            SourceState::Connected => "connected",
            SourceState::Performing => "performing",
            SourceState::Completed => "completed",
            SourceState::Confirmed => "confirmed",
            SourceState::RolledBack => "rolled back",
            SourceState::PostCopy => "in post-copy",
            SourceState::Lost => "lost",
        }
    }

    /// The state after `event`, or why it is refused.
    pub fn next(self, event: SourceEvent) -> Result<SourceState, TransitionError> {
        use SourceEvent as E;
        use SourceState as S;
        match (self, event) {
            (S::Begun | S::Connected, E::Connect) => Ok(S::Connected),
            (S::Begun | S::Connected, E::Perform) => Ok(S::Performing),
            (S::Performing, E::StartPostCopy) => Ok(S::PostCopy),
            (S::Performing | S::PostCopy, E::QemuCompleted) => Ok(S::Completed),
            (S::PostCopy, E::Lose) => Ok(S::Lost),
            (S::Completed, E::Confirm) => Ok(S::Confirmed),
            // A destination that fails to load what the source completed sending aborts;
            // the source then resumes its guest, which is still whole.
            (S::Begun | S::Connected | S::Performing | S::Completed, E::RollBack) => {
                Ok(S::RolledBack)
            }
            (from, event) => Err(TransitionError {
                role: Role::Source,
                from: from.as_str(),
                event: event.as_str(),
            }),
        }
    }

    /// Whether nothing will change this state any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SourceState::Confirmed | SourceState::RolledBack | SourceState::Lost
        )
    }

    /// Whether the source QEMU may still run the guest (before the switch-over).
    pub fn before_switchover(self) -> bool {
        matches!(
            self,
            SourceState::Begun | SourceState::Connected | SourceState::Performing
        )
    }

    pub fn on_lease_expiry(self) -> LeaseAction {
        if self.is_final() {
            LeaseAction::Nothing
        } else if self.before_switchover() {
            LeaseAction::RollBack
        } else {
            LeaseAction::FinishAlone
        }
    }
}

/// The destination half's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationState {
    /// A QEMU waits for the streams; the one-time identity is open for them.
    Prepared,
    /// The streams reached QEMU, which is loading the guest.
    Receiving,
    /// QEMU holds the whole state; the guest is not resumed yet.
    Loaded,
    /// The guest runs here. Final.
    Finished,
    /// The destination QEMU was torn down (managed) or left unused (attach). Final.
    Aborted,
}

/// What happens to a destination half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationEvent {
    /// All streams were handed to QEMU.
    Attach,
    /// QEMU reports `completed`.
    QemuLoaded,
    /// The guest was resumed (or left paused if it was paused on the source).
    Resume,
    /// Abort, expiry, or a failure: tear down.
    Abort,
}

impl DestinationEvent {
    fn as_str(self) -> &'static str {
        match self {
            DestinationEvent::Attach => "take its streams",
            DestinationEvent::QemuLoaded => "finish loading",
            DestinationEvent::Resume => "resume the guest",
            DestinationEvent::Abort => "abort",
        }
    }
}

impl DestinationState {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationState::Prepared => "prepared",
            DestinationState::Receiving => "receiving",
            DestinationState::Loaded => "loaded",
            DestinationState::Finished => "finished",
            DestinationState::Aborted => "aborted",
        }
    }

    pub fn next(self, event: DestinationEvent) -> Result<DestinationState, TransitionError> {
        use DestinationEvent as E;
        use DestinationState as S;
        match (self, event) {
            (S::Prepared, E::Attach) => Ok(S::Receiving),
            (S::Receiving, E::QemuLoaded) => Ok(S::Loaded),
            (S::Loaded, E::Resume) => Ok(S::Finished),
            (S::Prepared | S::Receiving | S::Loaded, E::Abort) => Ok(S::Aborted),
            (from, event) => Err(TransitionError {
                role: Role::Destination,
                from: from.as_str(),
                event: event.as_str(),
            }),
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, DestinationState::Finished | DestinationState::Aborted)
    }

    /// A destination whose QEMU is still receiving cannot know whether the source has
    /// switched over: it waits for its QEMU to say (completed: finish; failed: abort).
    /// One that never got its streams rolls back; one that loaded everything finishes.
    pub fn on_lease_expiry(self) -> LeaseAction {
        match self {
            DestinationState::Prepared => LeaseAction::RollBack,
            DestinationState::Receiving | DestinationState::Loaded => LeaseAction::FinishAlone,
            DestinationState::Finished | DestinationState::Aborted => LeaseAction::Nothing,
        }
    }
}

impl fmt::Display for SourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Display for DestinationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Either half's state, as status reports carry it (`"performing"`, `"loaded"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MigrationState {
    Source(SourceState),
    Destination(DestinationState),
}

impl MigrationState {
    pub fn is_final(self) -> bool {
        match self {
            MigrationState::Source(s) => s.is_final(),
            MigrationState::Destination(d) => d.is_final(),
        }
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationState::Source(s) => s.fmt(f),
            MigrationState::Destination(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE_STATES: [SourceState; 8] = [
        SourceState::Begun,
        SourceState::Connected,
        SourceState::Performing,
        SourceState::PostCopy,
        SourceState::Completed,
        SourceState::Confirmed,
        SourceState::RolledBack,
        SourceState::Lost,
    ];
    const SOURCE_EVENTS: [SourceEvent; 7] = [
        SourceEvent::Connect,
        SourceEvent::Perform,
        SourceEvent::StartPostCopy,
        SourceEvent::QemuCompleted,
        SourceEvent::Confirm,
        SourceEvent::RollBack,
        SourceEvent::Lose,
    ];
    const DESTINATION_STATES: [DestinationState; 5] = [
        DestinationState::Prepared,
        DestinationState::Receiving,
        DestinationState::Loaded,
        DestinationState::Finished,
        DestinationState::Aborted,
    ];
    const DESTINATION_EVENTS: [DestinationEvent; 4] = [
        DestinationEvent::Attach,
        DestinationEvent::QemuLoaded,
        DestinationEvent::Resume,
        DestinationEvent::Abort,
    ];

    #[test]
    fn every_source_transition_is_allowed_or_refused_as_the_table_says() {
        use SourceEvent as E;
        use SourceState as S;
        let allowed = [
            (S::Begun, E::Connect, S::Connected),
            (S::Connected, E::Connect, S::Connected),
            (S::Begun, E::Perform, S::Performing),
            (S::Connected, E::Perform, S::Performing),
            (S::Performing, E::QemuCompleted, S::Completed),
            (S::Performing, E::StartPostCopy, S::PostCopy),
            (S::PostCopy, E::QemuCompleted, S::Completed),
            (S::PostCopy, E::Lose, S::Lost),
            (S::Completed, E::Confirm, S::Confirmed),
            (S::Begun, E::RollBack, S::RolledBack),
            (S::Connected, E::RollBack, S::RolledBack),
            (S::Performing, E::RollBack, S::RolledBack),
            (S::Completed, E::RollBack, S::RolledBack),
        ];
        for from in SOURCE_STATES {
            for event in SOURCE_EVENTS {
                let want = allowed
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (from.next(event), want) {
                    (Ok(got), Some(to)) => assert_eq!(got, to, "{from:?} + {event:?}"),
                    (Err(e), None) => {
                        assert_eq!(e.from, from.as_str());
                        assert_eq!(e.role, Role::Source);
                    }
                    (got, want) => panic!("{from:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn every_destination_transition_is_allowed_or_refused_as_the_table_says() {
        use DestinationEvent as E;
        use DestinationState as S;
        let allowed = [
            (S::Prepared, E::Attach, S::Receiving),
            (S::Receiving, E::QemuLoaded, S::Loaded),
            (S::Loaded, E::Resume, S::Finished),
            (S::Prepared, E::Abort, S::Aborted),
            (S::Receiving, E::Abort, S::Aborted),
            (S::Loaded, E::Abort, S::Aborted),
        ];
        for from in DESTINATION_STATES {
            for event in DESTINATION_EVENTS {
                let want = allowed
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (from.next(event), want) {
                    (Ok(got), Some(to)) => assert_eq!(got, to, "{from:?} + {event:?}"),
                    (Err(e), None) => assert_eq!(e.role, Role::Destination),
                    (got, want) => panic!("{from:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn final_states_accept_nothing_more() {
        for s in SOURCE_STATES.into_iter().filter(|s| s.is_final()) {
            for e in SOURCE_EVENTS {
                assert!(s.next(e).is_err(), "{s:?} + {e:?}");
            }
        }
        for s in DESTINATION_STATES.into_iter().filter(|s| s.is_final()) {
            for e in DESTINATION_EVENTS {
                assert!(s.next(e).is_err(), "{s:?} + {e:?}");
            }
        }
    }

    #[test]
    fn an_expired_lease_rolls_back_before_the_switchover_and_finishes_after_it() {
        assert_eq!(SourceState::Begun.on_lease_expiry(), LeaseAction::RollBack);
        assert_eq!(
            SourceState::Connected.on_lease_expiry(),
            LeaseAction::RollBack
        );
        assert_eq!(
            SourceState::Performing.on_lease_expiry(),
            LeaseAction::RollBack
        );
        assert_eq!(
            SourceState::Completed.on_lease_expiry(),
            LeaseAction::FinishAlone
        );
        assert_eq!(
            SourceState::PostCopy.on_lease_expiry(),
            LeaseAction::FinishAlone,
            "nothing rolls back out of post-copy"
        );
        assert!(SourceState::PostCopy.next(SourceEvent::RollBack).is_err());
        assert_eq!(
            SourceState::Confirmed.on_lease_expiry(),
            LeaseAction::Nothing
        );
        assert_eq!(
            DestinationState::Prepared.on_lease_expiry(),
            LeaseAction::RollBack
        );
        assert_eq!(
            DestinationState::Receiving.on_lease_expiry(),
            LeaseAction::FinishAlone
        );
        assert_eq!(
            DestinationState::Loaded.on_lease_expiry(),
            LeaseAction::FinishAlone
        );
        assert_eq!(
            DestinationState::Aborted.on_lease_expiry(),
            LeaseAction::Nothing
        );
    }

    #[test]
    fn a_refused_transition_says_who_what_and_when() {
        let e = SourceState::Confirmed
            .next(SourceEvent::Perform)
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "source of the migration cannot start sending while it is confirmed"
        );
    }

    #[test]
    fn states_keep_their_wire_names() {
        let s =
            serde_json::to_string(&MigrationState::Source(SourceState::RolledBack)).expect("ser");
        assert_eq!(s, "\"rolled_back\"");
        let d: MigrationState = serde_json::from_str("\"loaded\"").expect("de");
        assert_eq!(d, MigrationState::Destination(DestinationState::Loaded));
        assert_eq!(
            serde_json::to_string(&Role::Destination).expect("ser"),
            "\"destination\""
        );
        assert!(Phase::ALL
            .iter()
            .all(|p| p.served_by() == Role::Destination
                || !matches!(p, Phase::Prepare | Phase::Finish)));
    }
}
