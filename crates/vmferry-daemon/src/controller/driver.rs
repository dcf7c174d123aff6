//! The driver: one method per phase, run in the protocol's order by [`Driver::run`], over
//! any [`Daemons`] (the real pair, or a fake in tests).
//!
//! Each phase method either advances the cookie or returns the cause; [`Driver::run`]
//! turns a cause into a rollback. A phase must never leave the source guest stopped
//! without the destination holding the whole state.

use super::daemons::Daemons;
use super::{ControllerError, MigrationPlan, MigrationReport, PhaseError, Step};
use crate::client::{ClientError, ControlTarget};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmferry_proto::{
    Cookie, DestinationState, MigrationId, MigrationState, MigrationStatus, Phase, RequestBody,
    ResponseBody, Role, SourceState, Transport, TransportChoice,
};

/// Timeouts of each phase's request.
const BEGIN_TIMEOUT: Duration = Duration::from_secs(30);
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
const PERFORM_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one data connection may take to connect when `auto` tries transports in
/// turn (short: a firewall that drops packets must not stall the fallback), and when
/// the operator named one transport.
const AUTO_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const SINGLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FINISH_TIMEOUT: Duration = Duration::from_secs(180);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination gets to acknowledge an abort: the source is already safe
/// by then, so an unresponsive destination is reported, not waited for.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);
const SILENT_ABORT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait of one status long-poll (progress is shown at least this often).
const POLL: Duration = Duration::from_millis(200);
/// How often the watch also asks the destination how it fares, and how long it waits.
const DESTINATION_POLL: Duration = Duration::from_secs(1);
const DESTINATION_STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a destination's failure waits for the source's word on it.
const SOURCE_WORD: Duration = Duration::from_secs(2);

/// A test hook: stop dead (as if killed) after a phase, so tests can kill the
/// controller at each phase boundary. Read from `VMFERRY_DANGER_STOP_AFTER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StopAfter(pub Option<Phase>);

impl StopAfter {
    pub fn from_env() -> StopAfter {
        let want = std::env::var("VMFERRY_DANGER_STOP_AFTER").unwrap_or_default();
        StopAfter(Phase::ALL.into_iter().find(|p| p.as_str() == want))
    }
}

/// One migration, driven phase by phase.
pub struct Driver<'a, D: Daemons, P: FnMut(&MigrationStatus)> {
    daemons: D,
    plan: MigrationPlan,
    id: MigrationId,
    cancel: &'a AtomicBool,
    progress: P,
    started: Instant,
    /// The cookie as the last phase left it.
    cookie: Option<Cookie>,
    /// Whether the destination holds something to abort.
    prepared: bool,
    /// The source's last status (the figures of the report).
    last: MigrationStatus,
    /// Whether the destination let a status go unanswered: a rollback then tells it
    /// with the shortest bound, the source being safe already.
    destination_silent: bool,
    /// Whether the operator was told a cancel cannot stop post-copy.
    cancel_refused: bool,
    /// The source's note last shown to the operator (each one is said once).
    shown_note: Option<String>,
    pub stop_after: StopAfter,
}

impl<'a, D: Daemons, P: FnMut(&MigrationStatus)> Driver<'a, D, P> {
    pub fn new(daemons: D, mut plan: MigrationPlan, cancel: &'a AtomicBool, progress: P) -> Self {
        // Leases, detach and the peer link need both daemons at protocol version 2.
        let both_v2 = [Role::Source, Role::Destination]
            .iter()
            .all(|r| daemons.version(*r) >= 2);
        plan.options.lease_ms = if both_v2 {
            plan.lease.as_millis().min(u128::from(u64::MAX)) as u64
        } else {
            0
        };
        Driver {
            daemons,
            plan,
            id: new_migration_id(),
            cancel,
            progress,
            started: Instant::now(),
            cookie: None,
            prepared: false,
            last: MigrationStatus::default(),
            destination_silent: false,
            cancel_refused: false,
            shown_note: None,
            stop_after: StopAfter::default(),
        }
    }

    pub fn id(&self) -> &MigrationId {
        &self.id
    }

    /// The lease the daemons were asked to keep, if they speak leases.
    pub fn lease(&self) -> Option<Duration> {
        (self.plan.options.lease_ms > 0).then(|| Duration::from_millis(self.plan.options.lease_ms))
    }

    /// Every phase in order; any failure rolls back what was done.
    pub fn run(&mut self) -> Result<MigrationReport, ControllerError> {
        if self.plan.detach && self.plan.options.lease_ms == 0 {
            // Said before anything starts: a migration cannot be handed to daemons
            // that could not finish it alone.
            return Err(ControllerError {
                step: Step::Phase(Phase::Begin),
                cause: PhaseError::DetachNeedsV2,
                rollback: String::new(),
            });
        }
        for phase in Phase::ALL {
            if let Err(cause) = self.run_phase(phase) {
                let rollback = self.roll_back(&cause.to_string());
                return Err(ControllerError {
                    step: Step::Phase(phase),
                    cause,
                    rollback,
                });
            }
            if self.stop_after.0 == Some(phase) {
                eprintln!(
                    "vmferry: stopping after {phase} of migration {} (VMFERRY_DANGER_STOP_AFTER)",
                    self.id
                );
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            if phase == Phase::Perform && self.plan.detach {
                self.run_detach().map_err(|cause| ControllerError {
                    step: Step::Phase(phase),
                    cause,
                    rollback: "; the migration goes on without this controller".into(),
                })?;
                return Ok(self.report(true));
            }
        }
        Ok(self.report(false))
    }

    pub fn run_phase(&mut self, phase: Phase) -> Result<(), PhaseError> {
        match phase {
            Phase::Begin => self.begin(),
            Phase::Prepare => self.prepare(),
            Phase::Connect => self.connect(),
            Phase::Perform => self.perform(),
            Phase::Watch => self.watch(),
            Phase::Finish => self.finish(),
            Phase::Confirm => self.confirm(),
        }
    }

    /// begin: the source describes the VM and makes its identity.
    fn begin(&mut self) -> Result<(), PhaseError> {
        let body = RequestBody::Begin {
            migration: self.id.clone(),
            vm: self.plan.source_vm.clone(),
            options: self.plan.options.clone(),
        };
        self.cookie = Some(self.expect_cookie(Role::Source, body, BEGIN_TIMEOUT)?);
        Ok(())
    }

    /// prepare: the destination readies a QEMU and its identity.
    fn prepare(&mut self) -> Result<(), PhaseError> {
        let body = RequestBody::Prepare {
            cookie: self.cookie()?.clone(),
            vm: self.plan.destination_vm.clone(),
        };
        // From here on the destination may hold something, even if the answer is lost.
        self.prepared = true;
        let mut cookie = self.expect_cookie(Role::Destination, body, PREPARE_TIMEOUT)?;
        if let Some(a) = &self.plan.data_address {
            cookie.data_address = Some(a.clone());
        }
        // Addresses a daemon could not name itself (it listens on a wildcard) are the
        // ones this controller reached it at.
        if let ControlTarget::Tcp(a) = &self.plan.destination {
            cookie.data_address.get_or_insert_with(|| a.clone());
            cookie
                .destination_control_address
                .get_or_insert_with(|| a.clone());
        }
        if let ControlTarget::Tcp(a) = &self.plan.source {
            cookie.source_data_address.get_or_insert_with(|| a.clone());
        }
        cookie.peer_link = self.plan.options.lease_ms > 0;
        self.cookie = Some(cookie);
        Ok(())
    }

    /// connect: the data channel, over the first transport that works.
    fn connect(&mut self) -> Result<(), PhaseError> {
        let cookie = self.cookie()?.clone();
        let choice = cookie.options.transport.unwrap_or_default();
        let timeout = self.plan.connect_timeout.unwrap_or(match choice {
            TransportChoice::Auto => AUTO_CONNECT_TIMEOUT,
            _ => SINGLE_CONNECT_TIMEOUT,
        });
        let mut failed: Vec<PhaseError> = Vec::new();
        for t in choice.candidates() {
            match self.connect_over(&cookie, t, timeout) {
                Ok(()) => {
                    let c = self.cookie_mut()?;
                    c.transport = Some(t);
                    c.transport_notes = failed.iter().map(|e| e.to_string()).collect();
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!("transport {t} unavailable: {e}");
                    failed.push(PhaseError::Transport {
                        transport: t,
                        source: Box::new(e),
                    });
                }
            }
        }
        Err(if failed.len() == 1 {
            failed.remove(0)
        } else {
            PhaseError::NoTransport(failed)
        })
    }

    /// Makes the data channel over one transport.
    fn connect_over(
        &mut self,
        cookie: &Cookie,
        t: Transport,
        timeout: Duration,
    ) -> Result<(), PhaseError> {
        let req = || RequestBody::Connect {
            cookie: cookie.clone(),
            transport: t,
            timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        // Every stream may take the connect timeout, plus a TLS handshake.
        let wait = timeout
            .saturating_mul(
                cookie
                    .streams()
                    .saturating_add(2)
                    .min(2 + vmferry_proto::MAX_MULTIFD),
            )
            .saturating_add(Duration::from_secs(15));
        self.expect_done(Role::Source, req(), wait)?;
        if t == Transport::Reverse {
            self.expect_done(Role::Destination, req(), wait)?;
        }
        Ok(())
    }

    /// perform: the source points QEMU at its daemon and starts carrying.
    fn perform(&mut self) -> Result<(), PhaseError> {
        let body = RequestBody::Perform {
            cookie: self.cookie()?.clone(),
        };
        self.expect_done(Role::Source, body, PERFORM_TIMEOUT)
    }

    /// Hands the migration to the daemons (`--detach`).
    fn run_detach(&mut self) -> Result<(), PhaseError> {
        for role in [Role::Destination, Role::Source] {
            self.expect_done(
                role,
                RequestBody::Detach {
                    migration: self.id.clone(),
                },
                STATUS_TIMEOUT,
            )?;
        }
        self.last = self.status(Role::Source, Duration::ZERO)?;
        Ok(())
    }

    /// The watch: follows the source until QEMU is done; asks the destination too, so
    /// a destination that gave up is noticed even without a peer link.
    fn watch(&mut self) -> Result<(), PhaseError> {
        let mut asked_destination = Instant::now();
        loop {
            let in_postcopy =
                self.last.state == Some(MigrationState::Source(SourceState::PostCopy));
            if self.cancel.load(Ordering::SeqCst) && in_postcopy {
                if !self.cancel_refused {
                    eprintln!(
                        "vmferry: post-copy has started and cannot be cancelled (the guest runs \
                         on the destination); waiting for it to complete"
                    );
                    self.cancel_refused = true;
                }
            } else if self.cancel.load(Ordering::SeqCst) {
                return Err(PhaseError::Cancelled);
            }
            if let (Some(t), false) = (self.plan.timeout, in_postcopy) {
                if self.started.elapsed() > t {
                    let why = self
                        .last
                        .disks_unfinished()
                        .or_else(|| self.last.not_converging());
                    return Err(PhaseError::Timeout(t, why));
                }
            }
            let st = self.status(Role::Source, POLL)?;
            if let Some(n) = st
                .note
                .as_ref()
                .filter(|n| self.shown_note.as_ref() != Some(n))
            {
                eprintln!("vmferry: note from the source: {n}");
                self.shown_note = Some(n.clone());
            }
            (self.progress)(&st);
            self.last = st.clone();
            if st.finished {
                let completed = match st.state {
                    Some(s) => s == MigrationState::Source(SourceState::Completed),
                    None => st.qemu_status == "completed",
                };
                if completed {
                    return Ok(());
                }
                return Err(match st.error.clone() {
                    Some(e) => PhaseError::Failed(e),
                    None => PhaseError::SourceReports(st.qemu_status.clone()),
                });
            }
            if asked_destination.elapsed() >= DESTINATION_POLL {
                asked_destination = Instant::now();
                // Best effort: the peer link is what reports a destination that died or
                // froze; this only catches one that gave up where no link runs.
                match self.status_within(Role::Destination, DESTINATION_STATUS_TIMEOUT) {
                    // In post-copy the source says what a dead destination means.
                    Ok(d)
                        if !in_postcopy
                            && d.state
                                == Some(MigrationState::Destination(DestinationState::Aborted)) =>
                    {
                        // The source hears it over the peer link within a moment and says
                        // it with what only it knows (how far each disk got): its word first.
                        if let Some(e) = self.source_failure_within(SOURCE_WORD) {
                            return Err(PhaseError::Failed(e));
                        }
                        return Err(d
                            .error
                            .map_or(PhaseError::DestinationAborted, PhaseError::Failed));
                    }
                    Ok(_) => self.destination_silent = false,
                    Err(e) => {
                        self.destination_silent = true;
                        tracing::info!("the destination did not say how it fares: {e}");
                    }
                }
            }
        }
    }

    /// The source's error, if it reports its half failed within `wait`.
    fn source_failure_within(&mut self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.status(Role::Source, POLL) {
                Ok(st) if st.finished => return st.error,
                Ok(st) => self.last = st,
                Err(_) => return None,
            }
        }
        None
    }

    /// finish: the destination resumes the guest once QEMU loaded it all.
    fn finish(&mut self) -> Result<(), PhaseError> {
        let body = RequestBody::Finish {
            migration: self.id.clone(),
        };
        match self.call(Role::Destination, body, FINISH_TIMEOUT)? {
            ResponseBody::Status { .. } => Ok(()),
            other => Err(PhaseError::Unexpected(Box::new(other))),
        }
    }

    /// confirm: the guest lives on the destination now; the source stops its QEMU. A
    /// failure here is only reported: the guest runs, and the source's lease ends it.
    fn confirm(&mut self) -> Result<(), PhaseError> {
        let body = RequestBody::Confirm {
            migration: self.id.clone(),
            success: true,
        };
        if let Err(e) = self.call(Role::Source, body, CONFIRM_TIMEOUT) {
            tracing::warn!(
                "the guest runs on the destination, but the source did not confirm: {e}"
            );
        }
        Ok(())
    }

    /// Puts the source back first (its guest must keep running), then tells the
    /// destination with a short bound. Returns what happened as a sentence tail.
    fn roll_back(&mut self, cause: &str) -> String {
        if self.cookie.is_none() {
            return String::new(); // begin failed: nothing was made
        }
        let mut notes = Vec::new();
        let confirm = RequestBody::Confirm {
            migration: self.id.clone(),
            success: false,
        };
        match self.call(Role::Source, confirm, CONFIRM_TIMEOUT) {
            Ok(_) => notes.push(self.source_fate()),
            Err(e) => notes.push(format!(
                "WARNING: the source could not be told to resume ({e}); check the source VM"
            )),
        }
        // After post-copy started the destination holds the running guest: tearing it
        // down would lose it for certain.
        let source_state = self
            .status(Role::Source, Duration::ZERO)
            .ok()
            .and_then(|s| s.state);
        let split = matches!(
            source_state,
            Some(MigrationState::Source(
                SourceState::Lost | SourceState::PostCopy
            ))
        );
        if self.prepared && !split {
            let abort = RequestBody::Abort {
                migration: self.id.clone(),
                reason: cause.to_string(),
            };
            let bound = if self.destination_silent {
                SILENT_ABORT_TIMEOUT
            } else {
                ABORT_TIMEOUT
            };
            if let Err(e) = self.call(Role::Destination, abort, bound) {
                notes.push(format!(
                    "the destination could not be told to abort ({e}); its lease will end it"
                ));
            }
        }
        format!("; {}", notes.join("; "))
    }

    /// What is true of the source guest after a rollback, in words.
    fn source_fate(&mut self) -> String {
        match self.status(Role::Source, Duration::ZERO) {
            Ok(st) if st.state == Some(MigrationState::Source(SourceState::Lost)) => {
                "the guest is lost to vmferry: post-copy broke with its memory split between \
                 the hosts; both QEMUs are left as they are (QEMU's migrate-recover can resume it)"
                    .to_string()
            }
            Ok(st) if st.qemu_status == "exited" => "the source QEMU has exited".to_string(),
            _ => "the source VM keeps running".to_string(),
        }
    }

    fn report(&self, detached: bool) -> MigrationReport {
        let last = &self.last;
        let total = self.started.elapsed();
        let secs = last
            .total_time_ms
            .map(|ms| ms as f64 / 1000.0)
            .unwrap_or(total.as_secs_f64())
            .max(1e-6);
        MigrationReport {
            migration: self.id.to_string(),
            detached,
            transport: last.transport,
            transport_notes: last.transport_notes.clone(),
            data_path: last.data_path.clone(),
            streams: last.streams,
            total_time_ms: total.as_millis() as u64,
            qemu_total_time_ms: last.total_time_ms,
            downtime_ms: last.downtime_ms,
            bytes: last.channel_bytes,
            wire_bytes: last.wire_bytes,
            compression: last.compression.clone(),
            throughput_mbps: last.channel_bytes as f64 * 8.0 / 1e6 / secs,
            disks: last.disks.clone(),
            source_qemu: last.source_qemu.clone(),
            destination_qemu: last.destination_qemu.clone(),
        }
    }

    fn status(&mut self, role: Role, wait: Duration) -> Result<MigrationStatus, PhaseError> {
        self.status_call(role, wait, STATUS_TIMEOUT)
    }

    fn status_within(
        &mut self,
        role: Role,
        timeout: Duration,
    ) -> Result<MigrationStatus, PhaseError> {
        self.status_call(role, Duration::ZERO, timeout)
    }

    fn status_call(
        &mut self,
        role: Role,
        wait: Duration,
        timeout: Duration,
    ) -> Result<MigrationStatus, PhaseError> {
        let body = RequestBody::Status {
            migration: self.id.clone(),
            wait_ms: wait.as_millis() as u64,
            // The renewer renews; a status from the driver need not.
            renew: false,
        };
        match self.call(role, body, timeout)? {
            ResponseBody::Status { status } => Ok(status),
            other => Err(PhaseError::Unexpected(Box::new(other))),
        }
    }

    fn call(
        &mut self,
        role: Role,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ResponseBody, PhaseError> {
        self.daemons.call(role, body, timeout).map_err(|e| match e {
            ClientError::Remote { peer, source } => PhaseError::Refused { role, peer, source },
            source => PhaseError::Daemon { role, source },
        })
    }

    fn expect_cookie(
        &mut self,
        role: Role,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<Cookie, PhaseError> {
        match self.call(role, body, timeout)? {
            ResponseBody::Cookie { cookie } => Ok(cookie),
            other => Err(PhaseError::Unexpected(Box::new(other))),
        }
    }

    fn expect_done(
        &mut self,
        role: Role,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<(), PhaseError> {
        match self.call(role, body, timeout)? {
            ResponseBody::Done => Ok(()),
            other => Err(PhaseError::Unexpected(Box::new(other))),
        }
    }

    fn cookie(&self) -> Result<&Cookie, PhaseError> {
        self.cookie.as_ref().ok_or(PhaseError::NoCookie)
    }

    fn cookie_mut(&mut self) -> Result<&mut Cookie, PhaseError> {
        self.cookie.as_mut().ok_or(PhaseError::NoCookie)
    }
}

fn new_migration_id() -> MigrationId {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 16];
    // The system RNG does not fail on Linux; should it, a time-based id is still unique
    // enough for naming (it carries no authority).
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    }
    MigrationId::from_random(b)
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
