//! `vmferry drain`: moves every managed VM off one host, onto the destinations with the
//! most memory free, a few at a time, with the controller `vmferry migrate` runs.
//!
//! The steps: ask each destination what it has room for ([`survey`]), list the source's
//! VMs, place them ([`placement`]), run the migrations ([`schedule`]) and show them
//! ([`view`]). It must never move a VM by any other way than a full migration (a failed
//! one leaves the VM running on the source), nor place a VM on a destination that could
//! not be asked.

mod placement;
mod schedule;
mod view;

use crate::migrate_cmd::{cancel_on_signals, LoginArgs, Tuning};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use placement::Room;
use schedule::{Event, Failure, Job, Outcome};
use std::io::IsTerminal;
use std::time::Duration;
use view::{Mode, View};
use vmferry_daemon::controller::{self, Step};
use vmferry_daemon::{ClientAuth, ControlClient, ControlTarget};
use vmferry_proto::{HostInfo, Phase, RequestBody, ResponseBody, Role, VmInfo, VmName, VmRef};

/// How long one question to a daemon (its VMs, its room) may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);
/// Most migrations a drain runs at once.
const MAX_PARALLEL: usize = 16;

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The daemon of the host to empty: host:port or a unix socket path.
    #[arg(long)]
    pub from: ControlTarget,
    /// The destination daemons, comma-separated (host:port or unix socket paths).
    #[arg(long, value_delimiter = ',', required = true)]
    pub to: Vec<ControlTarget>,
    /// How many migrations may run at once.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    #[command(flatten)]
    pub login: LoginArgs,
    #[command(flatten)]
    pub tuning: Tuning,
    /// One JSON object per VM result on stdout, then a summary object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DrainArgs) -> Result<()> {
    if !(1..=MAX_PARALLEL).contains(&a.parallel) {
        bail!("--parallel {}: give 1 to {MAX_PARALLEL}", a.parallel);
    }
    for (i, t) in a.to.iter().enumerate() {
        if *t == a.from {
            bail!("--to names the source {t} itself");
        }
        if a.to[..i].contains(t) {
            bail!("--to names {t} twice");
        }
    }
    // The options are checked once, before any daemon is asked anything.
    let probe = VmRef::Managed {
        name: VmName::new("drain".to_string())?,
    };
    a.tuning
        .plan(a.from.clone(), a.from.clone(), probe.clone(), probe)?;
    let auth = a.login.auth()?;
    let cancel = cancel_on_signals(
        "migrations under way roll back (their VMs keep running on the source); no more start",
    );
    let mode = if a.json {
        Mode::Json
    } else if std::io::stderr().is_terminal() {
        Mode::Table
    } else {
        Mode::Lines
    };
    let mut view = View::new(mode, a.to.iter().map(|t| t.to_string()).collect());

    let survey = survey(&a.to, &auth);
    view.destinations(&survey);
    let vms = source_vms(&a.from, &auth)?;

    // Only a running (or paused) guest can be migrated; anything else is reported.
    let (movable, other): (Vec<VmInfo>, Vec<VmInfo>) = vms
        .into_iter()
        .partition(|v| matches!(v.state.as_str(), "running" | "paused"));
    let room: Vec<Room> = survey
        .iter()
        .map(|r| r.as_ref().ok().map(|h| h.mem_available))
        .collect();
    let guests: Vec<(VmName, u64)> = movable
        .iter()
        .map(|v| {
            (
                v.spec.name.clone(),
                v.spec.memory_mib.saturating_mul(1 << 20),
            )
        })
        .collect();
    let plan = placement::place(&guests, &room);
    let bytes_of = |name: &VmName| {
        guests
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, b)| *b)
    };
    let queue: Vec<Job> = plan
        .assigned
        .iter()
        .map(|(vm, d)| Job {
            vm: vm.clone(),
            bytes: bytes_of(vm),
            destination: *d,
        })
        .collect();
    view.planned(&queue);
    let none_usable = room.iter().all(Option::is_none);
    for vm in &plan.unplaced {
        let why = if none_usable {
            "not migrated: no destination can be used".to_string()
        } else {
            format!(
                "not migrated: no destination has {} free",
                crate::units::human_bytes(bytes_of(vm))
            )
        };
        view.event(&Event::Finished(Outcome {
            vm: vm.clone(),
            destination: None,
            result: Err(why),
        }));
    }
    for v in &other {
        view.event(&Event::Finished(Outcome {
            vm: v.spec.name.clone(),
            destination: None,
            result: Err(format!("not migrated: its QEMU is {}", v.state)),
        }));
    }

    schedule::run(
        queue,
        plan.left,
        a.parallel,
        &cancel,
        |job, progress| migrate_one(&a, &auth, job, progress, &cancel),
        |e| view.event(e),
    );

    let not_migrated = view.summary(&a.from.to_string(), &survey);
    if not_migrated > 0 {
        return Err(anyhow!(
            "{not_migrated} VM{} not migrated off {}",
            if not_migrated == 1 { " was" } else { "s were" },
            a.from
        ));
    }
    Ok(())
}

/// One VM's migration, as `vmferry migrate NAME --from --to` runs it.
fn migrate_one(
    a: &DrainArgs,
    auth: &ClientAuth,
    job: &Job,
    progress: &mut dyn FnMut(&vmferry_proto::MigrationStatus),
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<controller::MigrationReport, Failure> {
    let destination =
        a.to.get(job.destination)
            .ok_or_else(|| Failure::of_destination("no such destination"))?;
    let vm = VmRef::Managed {
        name: job.vm.clone(),
    };
    let plan = a
        .tuning
        .plan(a.from.clone(), destination.clone(), vm.clone(), vm)
        .map_err(|e| Failure {
            error: format!("{e:#}"),
            destination_at_fault: false,
        })?;
    controller::migrate(&plan, auth, progress, cancel).map_err(|e| Failure {
        // The source not reaching or not beginning says nothing of the destination.
        destination_at_fault: !matches!(
            e.step,
            Step::Reach(Role::Source) | Step::Phase(Phase::Begin)
        ),
        error: e.to_string(),
    })
}

/// What each destination has room for, asked of all at once (an unreachable one costs
/// its connect timeout, not the sum of them); an error says why one cannot be used.
fn survey(targets: &[ControlTarget], auth: &ClientAuth) -> Vec<Result<HostInfo, String>> {
    std::thread::scope(|s| {
        let asks: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || host_info(t, auth)))
            .collect();
        asks.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("asking it failed (a bug: the thread panicked)".into()))
            })
            .collect()
    })
}

fn host_info(target: &ControlTarget, auth: &ClientAuth) -> Result<HostInfo, String> {
    let mut c = ControlClient::connect_with(target, auth, None).map_err(|e| e.to_string())?;
    match c.call(RequestBody::HostInfo, ASK_TIMEOUT) {
        Ok(ResponseBody::Host { host }) => Ok(host),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(format!("it refused to say what it has room for: {e}")),
    }
}

/// The source's managed VMs.
fn source_vms(source: &ControlTarget, auth: &ClientAuth) -> Result<Vec<VmInfo>> {
    let mut c = ControlClient::connect_with(source, auth, None)
        .with_context(|| format!("cannot reach the source daemon {source}"))?;
    match c
        .call(RequestBody::VmList, ASK_TIMEOUT)
        .with_context(|| format!("the source daemon {source} did not list its VMs"))?
    {
        ResponseBody::Vms { vms } => Ok(vms),
        other => bail!("unexpected answer from the source daemon: {other:?}"),
    }
}
