//! The controller: drives one migration through its phases over two control connections,
//! and rolls back on any failure.
//!
//! It may run on a third machine; it holds no key material of its own beyond its
//! certificate, and it carries the cookie (fingerprints, addresses) from phase to phase.
//! Whatever goes wrong after `begin`, it must leave the source guest running: every error
//! path goes through [`Driver::roll_back`].

use crate::client::{ClientAuth, ClientError, ControlClient, ControlTarget};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmferry_proto::{
    Cookie, MigrationId, MigrationOptions, MigrationStatus, RequestBody, ResponseBody, Transport,
    TransportChoice, VmRef,
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
/// Longest wait of one status long-poll (progress is shown at least this often).
const POLL: Duration = Duration::from_millis(200);

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
}

/// What a completed migration reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationReport {
    pub migration: String,
    pub transport: String,
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
}

#[derive(Debug, thiserror::Error)]
#[error("{phase} failed: {cause}{rollback}")]
pub struct ControllerError {
    pub phase: &'static str,
    pub cause: String,
    /// What the rollback did, as a sentence tail.
    pub rollback: String,
}

struct Driver {
    src: ControlClient,
    dst: ControlClient,
    id: MigrationId,
}

/// Runs a whole migration. `progress` sees every status the source reports. Setting
/// `cancel` rolls the migration back at the next poll.
pub fn migrate(
    plan: &MigrationPlan,
    auth: &ClientAuth,
    mut progress: impl FnMut(&MigrationStatus),
    cancel: &AtomicBool,
) -> Result<MigrationReport, ControllerError> {
    let started = Instant::now();
    let connect = |t: &ControlTarget, role: &'static str| {
        ControlClient::connect_with(t, auth, None).map_err(|e| ControllerError {
            phase: role,
            cause: e.to_string(),
            rollback: String::new(),
        })
    };
    let src = connect(&plan.source, "connecting to the source daemon")?;
    let dst = connect(&plan.destination, "connecting to the destination daemon")?;
    let id = new_migration_id();
    let mut d = Driver {
        src,
        dst,
        id: id.clone(),
    };

    // begin
    let cookie = match d.src.call(
        RequestBody::Begin {
            migration: id.clone(),
            vm: plan.source_vm.clone(),
            options: plan.options.clone(),
        },
        BEGIN_TIMEOUT,
    ) {
        Ok(ResponseBody::Cookie { cookie }) => cookie,
        Ok(other) => return Err(unexpected("begin", &other)),
        Err(e) => {
            return Err(ControllerError {
                phase: "begin",
                cause: e.to_string(),
                rollback: String::new(),
            })
        }
    };

    // prepare
    let mut cookie = match d.dst.call(
        RequestBody::Prepare {
            cookie,
            vm: plan.destination_vm.clone(),
        },
        PREPARE_TIMEOUT,
    ) {
        Ok(ResponseBody::Cookie { cookie }) => cookie,
        Ok(other) => return Err(d.fail("prepare", unexpected_text(&other), false)),
        Err(e) => return Err(d.fail("prepare", e.to_string(), false)),
    };
    if let Some(a) = &plan.data_address {
        cookie.data_address = Some(a.clone());
    }
    // Addresses a daemon could not name itself (it listens on a wildcard) are the ones
    // this controller reached it at.
    if let ControlTarget::Tcp(a) = &plan.destination {
        cookie.data_address.get_or_insert_with(|| a.clone());
        cookie
            .destination_control_address
            .get_or_insert_with(|| a.clone());
    }
    if let ControlTarget::Tcp(a) = &plan.source {
        cookie.source_data_address.get_or_insert_with(|| a.clone());
    }

    // connect: the data channel, over the first transport that works
    let choice = cookie.options.transport.unwrap_or_default();
    let connect_timeout = plan.connect_timeout.unwrap_or(match choice {
        TransportChoice::Auto => AUTO_CONNECT_TIMEOUT,
        _ => SINGLE_CONNECT_TIMEOUT,
    });
    let mut notes = Vec::new();
    for t in choice.candidates() {
        match d.connect(&cookie, t, connect_timeout) {
            Ok(()) => {
                cookie.transport = Some(t);
                break;
            }
            Err(e) => {
                tracing::info!("transport {t} unavailable: {e}");
                notes.push(format!("{t}: {e}"));
            }
        }
    }
    if cookie.transport.is_none() {
        let why = if notes.len() == 1 {
            notes.remove(0)
        } else {
            format!(
                "no transport could carry the migration ({})",
                notes.join("; ")
            )
        };
        return Err(d.fail("connect", why, true));
    }
    cookie.transport_notes = notes;

    // perform
    match d.src.call(
        RequestBody::Perform {
            cookie: cookie.clone(),
        },
        PERFORM_TIMEOUT,
    ) {
        Ok(ResponseBody::Done) => {}
        Ok(other) => return Err(d.fail("perform", unexpected_text(&other), true)),
        Err(e) => return Err(d.fail("perform", e.to_string(), true)),
    }

    // watch the source until QEMU and the pumps are done
    let last = loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(d.fail("migration", "cancelled by the operator".into(), true));
        }
        if let Some(t) = plan.timeout {
            if started.elapsed() > t {
                return Err(d.fail(
                    "migration",
                    format!("not complete after {} s (--timeout)", t.as_secs()),
                    true,
                ));
            }
        }
        let st = match d.src.call(
            RequestBody::Status {
                migration: id.clone(),
                wait_ms: POLL.as_millis() as u64,
            },
            STATUS_TIMEOUT,
        ) {
            Ok(ResponseBody::Status { status }) => status,
            Ok(other) => return Err(d.fail("status", unexpected_text(&other), true)),
            Err(e) => return Err(d.fail("status", e.to_string(), true)),
        };
        progress(&st);
        if st.finished {
            if st.qemu_status == "completed" {
                break st;
            }
            let why = st
                .error
                .clone()
                .unwrap_or_else(|| format!("the source reports '{}'", st.qemu_status));
            return Err(d.fail("perform", why, true));
        }
    };

    // finish
    match d.dst.call(
        RequestBody::Finish {
            migration: id.clone(),
        },
        FINISH_TIMEOUT,
    ) {
        Ok(ResponseBody::Status { .. }) => {}
        Ok(other) => return Err(d.fail("finish", unexpected_text(&other), true)),
        Err(e) => return Err(d.fail("finish", e.to_string(), true)),
    }

    // confirm: the guest now lives on the destination
    if let Err(e) = d.src.call(
        RequestBody::Confirm {
            migration: id.clone(),
            success: true,
        },
        CONFIRM_TIMEOUT,
    ) {
        tracing::warn!("the guest runs on the destination, but the source did not confirm: {e}");
    }
    let total = started.elapsed();
    let secs = last
        .total_time_ms
        .map(|ms| ms as f64 / 1000.0)
        .unwrap_or(total.as_secs_f64())
        .max(1e-6);
    Ok(MigrationReport {
        migration: id.to_string(),
        transport: last.transport.clone(),
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
    })
}

impl Driver {
    /// Makes the data channel over one transport; the error is the cause in words.
    fn connect(&mut self, cookie: &Cookie, t: Transport, timeout: Duration) -> Result<(), String> {
        let req = || RequestBody::Connect {
            cookie: cookie.clone(),
            transport: t,
            timeout_ms: timeout.as_millis() as u64,
        };
        // Every stream may take the connect timeout, plus a TLS handshake.
        let wait = timeout
            .saturating_mul(
                cookie
                    .streams()
                    .saturating_add(1)
                    .min(1 + vmferry_proto::MAX_MULTIFD),
            )
            .saturating_add(Duration::from_secs(15));
        let expect_done = |r: Result<ResponseBody, ClientError>| match r {
            Ok(ResponseBody::Done) => Ok(()),
            Ok(other) => Err(unexpected_text(&other)),
            Err(ClientError::Remote { source, .. }) => Err(source.message),
            Err(e) => Err(e.to_string()),
        };
        match t {
            Transport::Direct | Transport::Tunnel => expect_done(self.src.call(req(), wait)),
            Transport::Reverse => {
                expect_done(self.src.call(req(), wait))?;
                expect_done(self.dst.call(req(), wait))
            }
        }
    }

    /// Rolls back and builds the error. `prepared` says whether the destination holds
    /// anything to abort.
    fn fail(&mut self, phase: &'static str, cause: String, prepared: bool) -> ControllerError {
        let rollback = self.roll_back(prepared, &cause);
        ControllerError {
            phase,
            cause,
            rollback,
        }
    }

    fn roll_back(&mut self, prepared: bool, cause: &str) -> String {
        let mut notes = Vec::new();
        if prepared {
            if let Err(e) = self.dst.call(
                RequestBody::Abort {
                    migration: self.id.clone(),
                    reason: cause.to_string(),
                },
                CONFIRM_TIMEOUT,
            ) {
                notes.push(format!("the destination could not be told to abort ({e})"));
            }
        }
        match self.src.call(
            RequestBody::Confirm {
                migration: self.id.clone(),
                success: false,
            },
            CONFIRM_TIMEOUT,
        ) {
            Ok(_) => notes.insert(0, "the source VM keeps running".to_string()),
            Err(e) => notes.insert(
                0,
                format!(
                    "WARNING: the source could not be told to resume ({e}); check the source VM"
                ),
            ),
        }
        format!("; {}", notes.join("; "))
    }
}

fn unexpected_text(b: &ResponseBody) -> String {
    format!("unexpected answer {b:?}")
}

fn unexpected(phase: &'static str, b: &ResponseBody) -> ControllerError {
    ControllerError {
        phase,
        cause: unexpected_text(b),
        rollback: String::new(),
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

impl From<ClientError> for ControllerError {
    fn from(e: ClientError) -> Self {
        ControllerError {
            phase: "control",
            cause: e.to_string(),
            rollback: String::new(),
        }
    }
}
