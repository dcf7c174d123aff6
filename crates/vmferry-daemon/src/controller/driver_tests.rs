//! The driver over a fake pair of daemons: which requests it sends, in which order, and
//! what a failure in each phase rolls back.

use super::*;
use crate::client::ClientError;
use crate::controller::{Daemons, MigrationPlan};
use std::sync::atomic::AtomicBool;
use vmferry_proto::{
    Cookie, ErrorKind, MigrationOptions, MigrationStatus, RequestBody, ResponseBody, Role,
    SourceState, VmName, VmRef, WireError,
};

/// Answers like healthy daemons, except for the one operation told to fail, and records
/// every request as `role:op`.
struct Fake {
    fail_op: Option<&'static str>,
    log: Vec<String>,
    version: u32,
}

impl Fake {
    fn new(fail_op: Option<&'static str>) -> Fake {
        Fake {
            fail_op,
            log: Vec::new(),
            version: vmferry_proto::PROTOCOL_VERSION,
        }
    }
}

fn cookie() -> Cookie {
    serde_json::from_value(serde_json::json!({
        "migration": "0123456789abcdef",
        "options": {},
        "source_running": true,
    }))
    .expect("a cookie")
}

impl Daemons for Fake {
    fn call(
        &mut self,
        role: Role,
        body: RequestBody,
        _timeout: Duration,
    ) -> Result<ResponseBody, ClientError> {
        let op = body.op();
        self.log.push(format!("{role}:{op}"));
        if self.fail_op == Some(op) {
            return Err(ClientError::Remote {
                peer: role.to_string(),
                source: WireError::new(ErrorKind::Qemu, format!("{op} broke")),
            });
        }
        Ok(match body {
            RequestBody::Begin { .. } | RequestBody::Prepare { .. } => {
                ResponseBody::Cookie { cookie: cookie() }
            }
            RequestBody::Status { .. } => ResponseBody::Status {
                status: MigrationStatus {
                    state: Some(vmferry_proto::MigrationState::Source(
                        SourceState::Completed,
                    )),
                    qemu_status: "completed".into(),
                    finished: true,
                    ..Default::default()
                },
            },
            RequestBody::Finish { .. } => ResponseBody::Status {
                status: MigrationStatus::default(),
            },
            _ => ResponseBody::Done,
        })
    }

    fn version(&self, _role: Role) -> u32 {
        self.version
    }
}

fn plan() -> MigrationPlan {
    let vm = VmRef::Managed {
        name: VmName::new("g1").expect("name"),
    };
    MigrationPlan {
        source: "a:1".parse().expect("target"),
        destination: "b:1".parse().expect("target"),
        source_vm: vm.clone(),
        destination_vm: vm,
        options: MigrationOptions::default(),
        data_address: None,
        timeout: None,
        connect_timeout: None,
        lease: Duration::from_secs(15),
        detach: false,
    }
}

fn run(fake: Fake) -> (Result<MigrationReport, ControllerError>, Vec<String>) {
    let cancel = AtomicBool::new(false);
    let mut d = Driver::new(fake, plan(), &cancel, |_| {});
    let r = d.run();
    (r, d.daemons.log.clone())
}

#[test]
fn a_healthy_migration_runs_every_phase_in_the_protocol_order() {
    let (r, log) = run(Fake::new(None));
    assert!(r.is_ok(), "{r:?}");
    let ops: Vec<&str> = log
        .iter()
        .map(String::as_str)
        .filter(|o| !o.ends_with(":status"))
        .collect();
    assert_eq!(
        ops,
        [
            "source:begin",
            "destination:prepare",
            "source:connect",
            "source:perform",
            "destination:finish",
            "source:confirm"
        ]
    );
}

#[test]
fn a_failed_begin_rolls_nothing_back() {
    let (r, log) = run(Fake::new(Some("begin")));
    let e = r.expect_err("fails");
    assert_eq!(e.step, Step::Phase(vmferry_proto::Phase::Begin));
    assert_eq!(log, ["source:begin"]);
}

#[test]
fn a_failure_after_prepare_puts_the_source_back_before_telling_the_destination() {
    for op in ["connect", "perform", "finish"] {
        let (r, log) = run(Fake::new(Some(op)));
        let e = r.expect_err("fails");
        assert!(e.to_string().contains(&format!("{op} broke")), "{e}");
        let confirm = log
            .iter()
            .position(|o| o == "source:confirm")
            .unwrap_or_else(|| panic!("{op}: no confirm(false) in {log:?}"));
        let abort = log
            .iter()
            .position(|o| o == "destination:abort")
            .unwrap_or_else(|| panic!("{op}: no abort in {log:?}"));
        assert!(confirm < abort, "{op}: the source first: {log:?}");
    }
}

#[test]
fn a_version_1_daemon_gets_no_lease_and_detach_is_refused_before_anything_starts() {
    let mut fake = Fake::new(None);
    fake.version = 1;
    let cancel = AtomicBool::new(false);
    let mut p = plan();
    p.detach = true;
    let mut d = Driver::new(fake, p, &cancel, |_| {});
    assert_eq!(d.lease(), None);
    let e = d.run().expect_err("refused");
    assert!(e.to_string().contains("protocol version 1"), "{e}");
    assert!(d.daemons.log.is_empty(), "{:?}", d.daemons.log);
}
