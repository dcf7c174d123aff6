//! The controller: drives one migration through its phases over two control connections,
//! and rolls back on any failure.
//!
//! It may run on a third machine; it holds no key material of its own beyond its
//! certificate, and it carries the cookie (fingerprints, addresses) from phase to phase.
//! Whatever goes wrong after `begin`, it must leave the source guest running: every error
//! path goes through the driver's rollback. Should the controller itself die, the
//! migration's lease runs out and the daemons finish or roll back on their own.

mod daemons;
mod driver;

pub use daemons::{Connected, Daemons, Renewer};
pub use driver::{Driver, StopAfter};

use crate::client::{ClientAuth, ClientError, ControlClient, ControlTarget};
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use vmferry_proto::{
    MigrationOptions, MigrationStatus, Phase, ResponseBody, Role, Transport, VmRef, WireError,
};

/// The lease a controller asks for unless told otherwise: long enough to ride out a
/// short network blip between controller and daemons, short enough that a dead
/// controller's guest is not left waiting for long.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// What to migrate, from where to where.
#[derive(Debug, Clone)]
pub struct MigrationPlan {
    pub source: ControlTarget,
    pub destination: ControlTarget,
    pub source_vm: VmRef,
    pub destination_vm: VmRef,
    pub options: MigrationOptions,
    /// `host:port` the source dials for data; default: what the destination advertises,
    /// else the destination's control address.
    pub data_address: Option<String>,
    /// Give up (and roll back) if the migration has not completed in this time.
    pub timeout: Option<Duration>,
    /// How long each data connection may take to connect (default: 2 s under `auto`,
    /// 5 s for a named transport).
    pub connect_timeout: Option<Duration>,
    /// How long the daemons wait for this controller before acting alone.
    pub lease: Duration,
    /// Hand the migration to the daemons once it is under way, and return.
    pub detach: bool,
}

/// What a completed (or detached) migration reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationReport {
    pub migration: String,
    /// Whether the controller handed the migration to the daemons (`--detach`): the
    /// figures below are then those at the hand-over.
    pub detached: bool,
    pub transport: Option<Transport>,
    /// Why transports tried before the one used were passed over.
    pub transport_notes: Vec<String>,
    pub data_path: String,
    pub streams: u32,
    pub total_time_ms: u64,
    pub qemu_total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub bytes: u64,
    /// Bytes after compression (what TLS carried); equals `bytes` without it.
    pub wire_bytes: u64,
    pub compression: String,
    pub throughput_mbps: f64,
    /// The disks copied (`--copy-storage`), as the source last reported them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<vmferry_proto::DiskProgress>,
    /// Both sides' QEMU releases, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_qemu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_qemu: Option<String>,
}

/// Where the controller was when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Reaching one of the daemons.
    Reach(Role),
    Phase(Phase),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Reach(r) => write!(f, "connecting to the {r} daemon"),
            Step::Phase(p) => p.fmt(f),
        }
    }
}

/// Why a step failed. A daemon's own refusal is shown in its words alone: which daemon
/// is clear from the step.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    /// A daemon could not be reached or did not answer.
    #[error("{source}")]
    Daemon {
        role: Role,
        #[source]
        source: ClientError,
    },
    /// A daemon refused the request.
    #[error("{source}")]
    Refused {
        role: Role,
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("unexpected answer {0:?}")]
    Unexpected(Box<ResponseBody>),
    #[error("no cookie yet: begin has not run")]
    NoCookie,
    #[error(
        "--detach needs both daemons at control protocol version 2; one \
         speaks protocol version 1, which cannot carry a migration alone"
    )]
    DetachNeedsV2,
    /// One transport could not carry the migration.
    #[error("{transport}: {source}")]
    Transport {
        transport: Transport,
        #[source]
        source: Box<PhaseError>,
    },
    /// Every transport `auto` tried failed; each is a [`PhaseError::Transport`].
    #[error("no transport could carry the migration ({})", join(.0))]
    NoTransport(Vec<PhaseError>),
    #[error("cancelled by the operator")]
    Cancelled,
    #[error("not complete after {} s (--timeout){}", .0.as_secs(), .1.as_ref().map(|w| format!(": {w}")).unwrap_or_default())]
    Timeout(Duration, Option<String>),
    /// A daemon's account of why the migration failed.
    #[error("{0}")]
    Failed(String),
    #[error("the source reports '{0}'")]
    SourceReports(String),
    #[error("the destination aborted the migration")]
    DestinationAborted,
}

fn join(errors: &[PhaseError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, thiserror::Error)]
#[error("{step} failed: {cause}{rollback}")]
pub struct ControllerError {
    pub step: Step,
    #[source]
    pub cause: PhaseError,
    /// What the rollback did, as a sentence tail.
    pub rollback: String,
}

/// Runs a whole migration. `progress` sees every status the source reports. Setting
/// `cancel` rolls the migration back at the next poll.
pub fn migrate(
    plan: &MigrationPlan,
    auth: &ClientAuth,
    progress: impl FnMut(&MigrationStatus),
    cancel: &AtomicBool,
) -> Result<MigrationReport, ControllerError> {
    let reach = |t: &ControlTarget, role| {
        ControlClient::connect_with(t, auth, None).map_err(|e| ControllerError {
            step: Step::Reach(role),
            cause: PhaseError::Daemon { role, source: e },
            rollback: String::new(),
        })
    };
    let daemons = Connected {
        source: reach(&plan.source, Role::Source)?,
        destination: reach(&plan.destination, Role::Destination)?,
    };
    let mut driver = Driver::new(daemons, plan.clone(), cancel, progress);
    driver.stop_after = StopAfter::from_env();
    let renewer = driver.lease().map(|lease| {
        Renewer::start(
            [plan.source.clone(), plan.destination.clone()],
            auth.clone(),
            driver.id().clone(),
            lease,
        )
    });
    let result = driver.run();
    drop(renewer);
    result
}
