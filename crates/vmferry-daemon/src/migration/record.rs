//! What a migration leaves behind on this daemon when it starts and when it ends: the
//! metrics, and one audit line (`what: "migration"`, `op: "result"`) per half that says
//! who asked for it, which VM went from which host to which, over which transport, and
//! how it ended.
//!
//! Each half calls [`started`] once its streams flow and [`ended`] once, from its `end`.
//! This module only reads what it is given; it never changes a migration, and it never
//! writes a secret (no cookie, key or fingerprint) into a line.

use crate::audit::Event;
use crate::metrics::{Ended, EndedMigration, NO_TRANSPORT};
use crate::state::Daemon;
use vmferry_proto::{
    DestinationState, MigrationState, MigrationSummary, Role, SourceState, Transport,
};

/// Who asked for a migration and between which hosts, as this half learns it.
#[derive(Debug, Clone, Default)]
pub struct Parties {
    /// The controller's identity as authenticated here (`CN=...`, `user NAME`, `uid N`).
    pub who: String,
    /// How it authenticated (`x509`, `scram-sha-256`, `unix`).
    pub scheme: String,
    /// The source host's address (as its daemon or the controller named it).
    pub source: Option<String>,
    /// The destination host's address.
    pub destination: Option<String>,
}

impl Parties {
    pub fn new(who: &str, scheme: &str) -> Parties {
        Parties {
            who: who.to_string(),
            scheme: scheme.to_string(),
            ..Parties::default()
        }
    }
}

/// The address other hosts know this daemon by, for its own side of the audit line:
/// the data or control address it advertises, else its host name.
pub(crate) fn own_address(daemon: &Daemon) -> String {
    daemon
        .config
        .data_address()
        .or_else(|| daemon.config.control_address())
        .unwrap_or_else(|| daemon.hostname.clone())
}

/// How a half ended, from its final summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed(String),
    Cancelled(String),
}

impl Outcome {
    pub fn of(summary: &MigrationSummary) -> Outcome {
        let st = &summary.status;
        let cause = || {
            st.error
                .clone()
                .unwrap_or_else(|| "no cause was recorded".to_string())
        };
        match st.state {
            Some(MigrationState::Source(SourceState::Confirmed))
            | Some(MigrationState::Destination(DestinationState::Finished)) => Outcome::Completed,
            Some(MigrationState::Source(SourceState::RolledBack))
            | Some(MigrationState::Destination(DestinationState::Aborted)) => {
                let cause = cause();
                // A cancel says so in its cause: `vmferry cancel` on the source ("cancelled
                // by WHO", which the destination hears too), a controller's operator in
                // the destination's abort reason ("cancelled by the operator"). The
                // source's rollback by a controller carries no reason: counted as failed.
                if cause.contains("cancelled by") {
                    Outcome::Cancelled(cause)
                } else {
                    Outcome::Failed(cause)
                }
            }
            Some(MigrationState::Source(SourceState::Lost)) => Outcome::Failed(cause()),
            Some(other) => Outcome::Failed(match &st.error {
                Some(e) => format!("ended while {other}: {e}"),
                None => format!("ended while {other}"),
            }),
            None => Outcome::Failed(cause()),
        }
    }

    fn word(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed(_) => "failed",
            Outcome::Cancelled(_) => "cancelled",
        }
    }

    fn cause(&self) -> &str {
        match self {
            Outcome::Completed => "",
            Outcome::Failed(c) | Outcome::Cancelled(c) => c,
        }
    }
}

/// A half's streams began to flow.
pub(crate) fn started(daemon: &Daemon, role: Role, transport: Transport) {
    daemon.metrics.started(role, transport);
}

/// A half ended: counts it and writes its audit line.
pub(crate) fn ended(daemon: &Daemon, summary: &MigrationSummary, parties: &Parties) {
    let outcome = Outcome::of(summary);
    let st = &summary.status;
    daemon.metrics.ended(&EndedMigration {
        role: summary.role,
        transport: st.transport,
        ended: match outcome {
            Outcome::Completed => Ended::Completed,
            Outcome::Failed(_) => Ended::Failed,
            Outcome::Cancelled(_) => Ended::Cancelled,
        },
        bytes: st.channel_bytes,
        total_time_ms: st.total_time_ms,
        downtime_ms: st.downtime_ms,
    });
    let unknown = "unknown";
    daemon.audit.record(&Event {
        what: "migration",
        who: if parties.who.is_empty() {
            "-"
        } else {
            &parties.who
        },
        from: parties.source.as_deref().unwrap_or(unknown),
        scheme: if parties.scheme.is_empty() {
            "-"
        } else {
            &parties.scheme
        },
        op: "result",
        subject: summary.migration.as_str(),
        outcome: outcome.word(),
        detail: outcome.cause(),
        role: summary.role.as_str(),
        vm: &summary.vm,
        to: parties.destination.as_deref().unwrap_or(unknown),
        transport: st.transport.map_or(NO_TRANSPORT, Transport::as_str),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmferry_proto::{MigrationId, MigrationStatus};

    fn summary(state: MigrationState, error: Option<&str>) -> MigrationSummary {
        MigrationSummary {
            migration: MigrationId::from_random([7; 16]),
            role: Role::Source,
            vm: "vm1".into(),
            status: MigrationStatus {
                state: Some(state),
                error: error.map(str::to_string),
                ..Default::default()
            },
        }
    }

    #[test]
    fn final_states_map_to_completed_failed_or_cancelled() {
        let s = |st| MigrationState::Source(st);
        let d = |st| MigrationState::Destination(st);
        assert_eq!(
            Outcome::of(&summary(s(SourceState::Confirmed), None)),
            Outcome::Completed
        );
        assert_eq!(
            Outcome::of(&summary(d(DestinationState::Finished), None)),
            Outcome::Completed
        );
        assert_eq!(
            Outcome::of(&summary(s(SourceState::RolledBack), Some("link cut"))),
            Outcome::Failed("link cut".into())
        );
        assert_eq!(
            Outcome::of(&summary(
                d(DestinationState::Aborted),
                Some("the source gave up: cancelled by CN=ops at 10.0.0.9:5000")
            )),
            Outcome::Cancelled("the source gave up: cancelled by CN=ops at 10.0.0.9:5000".into())
        );
        let Outcome::Failed(why) = Outcome::of(&summary(s(SourceState::Performing), None)) else {
            panic!("a half that ended before a final state failed");
        };
        assert!(why.contains("ended while"), "{why}");
    }
}
