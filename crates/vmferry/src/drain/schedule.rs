//! Runs a drain's migrations: at most N at once, in the placement's order, each on a
//! thread of its own; a destination that failed twice gets no more guests, and the guests
//! still waiting for it are placed again on the others.
//!
//! It decides only what runs where and when; the migration itself is the closure it is
//! given (the same controller `vmferry migrate` runs), so it can be tested without
//! daemons. It must never start a guest's migration twice, nor start anything once the
//! operator cancelled.

use super::placement::{take, Room};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use vmferry_daemon::controller::MigrationReport;
use vmferry_proto::{MigrationStatus, VmName};

/// Failed migrations after which a destination gets no more guests.
pub const FAILURES_TO_EXCLUDE: u32 = 2;

/// One guest to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub vm: VmName,
    /// The memory it needs on its destination.
    pub bytes: u64,
    /// The index of its destination.
    pub destination: usize,
}

/// What happened, as it happens (for the display).
#[derive(Debug, Clone)]
pub enum Event {
    Started(Job),
    Progress(Job, MigrationStatus),
    /// A waiting guest's destination (`from`) was excluded: it goes to the job's
    /// destination instead.
    Replaced {
        job: Job,
        from: usize,
    },
    Finished(Outcome),
    /// A destination failed [`FAILURES_TO_EXCLUDE`] times and gets no more guests.
    Excluded {
        destination: usize,
    },
}

/// How one guest fared.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub vm: VmName,
    /// Where it went or was tried; `None` if it never found a destination.
    pub destination: Option<usize>,
    pub result: Result<MigrationReport, String>,
}

/// Why one migration failed, and whether that counts against its destination (a source
/// that refuses to begin says nothing about the destination).
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: String,
    pub destination_at_fault: bool,
}

impl Failure {
    pub fn of_destination(error: impl Into<String>) -> Failure {
        Failure {
            error: error.into(),
            destination_at_fault: true,
        }
    }
}

/// A worker's word to the scheduler.
enum Msg {
    Progress(Job, MigrationStatus),
    Done(Job, Result<MigrationReport, Failure>),
}

/// Runs `queue` (in order) with at most `parallel` migrations at once; `room` is each
/// destination's room left after the queue's placements. `migrate` runs one job, calling
/// its second argument with each status. Returns every queued guest's outcome, in the
/// order they ended.
pub fn run<F>(
    queue: Vec<Job>,
    mut room: Vec<Room>,
    parallel: usize,
    cancel: &AtomicBool,
    migrate: F,
    mut on_event: impl FnMut(&Event),
) -> Vec<Outcome>
where
    F: Fn(&Job, &mut dyn FnMut(&MigrationStatus)) -> Result<MigrationReport, Failure> + Sync,
{
    let mut pending: VecDeque<Job> = queue.into();
    let mut failures = vec![0u32; room.len()];
    let mut outcomes = Vec::new();
    let mut running = 0usize;
    let (tx, rx) = mpsc::channel::<Msg>();
    fn end(o: Outcome, on_event: &mut dyn FnMut(&Event), outcomes: &mut Vec<Outcome>) {
        on_event(&Event::Finished(o.clone()));
        outcomes.push(o);
    }
    std::thread::scope(|scope| {
        loop {
            while running < parallel.max(1) && !cancel.load(Ordering::SeqCst) {
                let Some(mut job) = pending.pop_front() else {
                    break;
                };
                if room.get(job.destination).copied().flatten().is_none() {
                    let from = job.destination;
                    match take(job.bytes, &mut room) {
                        Some(d) => {
                            job.destination = d;
                            on_event(&Event::Replaced {
                                job: job.clone(),
                                from,
                            });
                        }
                        None => {
                            let o = Outcome {
                                vm: job.vm.clone(),
                                destination: None,
                                result: Err(format!(
                                    "not migrated: its destination failed {FAILURES_TO_EXCLUDE} \
                                     times and no other has room for it"
                                )),
                            };
                            end(o, &mut on_event, &mut outcomes);
                            continue;
                        }
                    }
                }
                on_event(&Event::Started(job.clone()));
                running += 1;
                let tx = tx.clone();
                let migrate = &migrate;
                scope.spawn(move || {
                    let mut done = Done {
                        tx: tx.clone(),
                        job: job.clone(),
                        result: None,
                    };
                    let mut progress = |st: &MigrationStatus| {
                        let _ = tx.send(Msg::Progress(job.clone(), st.clone()));
                    };
                    done.result = Some(migrate(&job, &mut progress));
                });
            }
            if cancel.load(Ordering::SeqCst) {
                for job in pending.drain(..) {
                    let o = Outcome {
                        vm: job.vm,
                        destination: Some(job.destination),
                        result: Err("not migrated: the drain was cancelled before it began".into()),
                    };
                    end(o, &mut on_event, &mut outcomes);
                }
            }
            if running == 0 {
                break;
            }
            // Every worker sends Done, even one that panics (see `Done`), so this wait
            // ends; each migration is bounded by the controller's own timeouts.
            let Ok(msg) = rx.recv() else { break };
            match msg {
                Msg::Progress(job, st) => on_event(&Event::Progress(job, st)),
                Msg::Done(job, result) => {
                    running -= 1;
                    let d = job.destination;
                    if result.as_ref().is_err_and(|f| f.destination_at_fault) {
                        failures[d] += 1;
                        if failures[d] >= FAILURES_TO_EXCLUDE && room[d].is_some() {
                            room[d] = None;
                            on_event(&Event::Excluded { destination: d });
                        }
                    }
                    if result.is_err() {
                        if let Some(r) = room[d].as_mut() {
                            // The guest did not land: its memory is free there again.
                            *r = r.saturating_add(job.bytes);
                        }
                    }
                    let o = Outcome {
                        vm: job.vm,
                        destination: Some(d),
                        result: result.map_err(|f| f.error),
                    };
                    end(o, &mut on_event, &mut outcomes);
                }
            }
        }
    });
    outcomes
}

/// Sends a worker's result when it ends, however it ends: a worker that panicked still
/// reports, so the scheduler never waits for it forever.
struct Done {
    tx: mpsc::Sender<Msg>,
    job: Job,
    result: Option<Result<MigrationReport, Failure>>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(Failure {
                error: "the migration's thread ended without a result".into(),
                destination_at_fault: false,
            })
        });
        let _ = self.tx.send(Msg::Done(self.job.clone(), result));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const G: u64 = 1 << 30;

    fn report() -> MigrationReport {
        MigrationReport {
            migration: "m".into(),
            detached: false,
            transport: None,
            transport_notes: vec![],
            data_path: String::new(),
            streams: 1,
            total_time_ms: 1,
            qemu_total_time_ms: None,
            downtime_ms: None,
            bytes: 0,
            wire_bytes: 0,
            compression: String::new(),
            throughput_mbps: 0.0,
            disks: vec![],
            source_qemu: None,
            destination_qemu: None,
        }
    }

    fn job(name: &str, destination: usize) -> Job {
        Job {
            vm: VmName::new(name.to_string()).expect("name"),
            bytes: G,
            destination,
        }
    }

    #[test]
    fn a_destination_that_fails_twice_gets_no_more_and_its_guests_go_elsewhere() {
        // Destination 1 fails every migration; five guests alternate between 0 and 1.
        let queue: Vec<Job> = (0..5).map(|i| job(&format!("g{i}"), i % 2)).collect();
        let tried = Mutex::new(Vec::new());
        let mut events = Vec::new();
        let outcomes = run(
            queue,
            vec![Some(10 * G), Some(10 * G)],
            1,
            &AtomicBool::new(false),
            |j, _| {
                tried
                    .lock()
                    .expect("lock")
                    .push((j.vm.to_string(), j.destination));
                if j.destination == 1 {
                    Err(Failure::of_destination("firewalled"))
                } else {
                    Ok(report())
                }
            },
            |e| events.push(format!("{e:?}")),
        );
        let tried = tried.into_inner().expect("lock");
        // One at a time: g1 and g3 fail on destination 1, which is then excluded (no
        // guest was left for it).
        assert_eq!(
            tried.iter().filter(|(_, d)| *d == 1).count(),
            2,
            "{tried:?}"
        );
        assert_eq!(outcomes.len(), 5);
        let failed: Vec<String> = outcomes
            .iter()
            .filter(|o| o.result.is_err())
            .map(|o| o.vm.to_string())
            .collect();
        assert_eq!(failed, vec!["g1", "g3"]);
        assert!(events.iter().any(|e| e.contains("Excluded")), "{events:?}");
    }

    #[test]
    fn waiting_guests_of_an_excluded_destination_are_placed_again() {
        // All four planned for destination 1, which fails: two attempts, then the other
        // two move to destination 0. (With N at once, up to N + 1 may have been tried
        // there: a migration started after the first failure still runs its course.)
        let queue: Vec<Job> = (0..4).map(|i| job(&format!("g{i}"), 1)).collect();
        let outcomes = run(
            queue,
            vec![Some(10 * G), Some(10 * G)],
            1,
            &AtomicBool::new(false),
            |j, _| {
                if j.destination == 1 {
                    Err(Failure::of_destination("firewalled"))
                } else {
                    Ok(report())
                }
            },
            |_| {},
        );
        let on = |d: usize, ok: bool| {
            outcomes
                .iter()
                .filter(|o| o.destination == Some(d) && o.result.is_ok() == ok)
                .count()
        };
        assert_eq!((on(1, false), on(0, true)), (2, 2), "{outcomes:?}");
    }

    #[test]
    fn guests_that_no_destination_has_room_for_after_an_exclusion_are_reported() {
        let queue: Vec<Job> = (0..3).map(|i| job(&format!("g{i}"), 0)).collect();
        let outcomes = run(
            queue,
            vec![Some(10 * G), Some(0)],
            1,
            &AtomicBool::new(false),
            |_, _| Err(Failure::of_destination("refused")),
            |_| {},
        );
        assert_eq!(outcomes.len(), 3);
        let last = &outcomes[2];
        assert_eq!(last.destination, None);
        assert!(
            last.result
                .as_ref()
                .err()
                .is_some_and(|e| e.contains("room")),
            "{last:?}"
        );
    }

    #[test]
    fn failures_that_are_not_the_destinations_fault_do_not_exclude_it() {
        let queue: Vec<Job> = (0..3).map(|i| job(&format!("g{i}"), 0)).collect();
        let outcomes = run(
            queue,
            vec![Some(10 * G)],
            1,
            &AtomicBool::new(false),
            |_, _| {
                Err(Failure {
                    error: "the source refused to begin".into(),
                    destination_at_fault: false,
                })
            },
            |_| {},
        );
        assert!(
            outcomes.iter().all(|o| o.destination == Some(0)),
            "{outcomes:?}"
        );
    }

    #[test]
    fn at_most_n_run_at_once() {
        let queue: Vec<Job> = (0..6).map(|i| job(&format!("g{i}"), 0)).collect();
        let now = Mutex::new((0usize, 0usize)); // (running, most at once)
        let outcomes = run(
            queue,
            vec![Some(10 * G)],
            2,
            &AtomicBool::new(false),
            |_, _| {
                {
                    let mut n = now.lock().expect("lock");
                    n.0 += 1;
                    n.1 = n.1.max(n.0);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                now.lock().expect("lock").0 -= 1;
                Ok(report())
            },
            |_| {},
        );
        assert!((1..=2).contains(&now.lock().expect("lock").1));
        assert_eq!(outcomes.len(), 6);
        assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
    }

    #[test]
    fn nothing_starts_after_a_cancel_and_the_waiting_guests_are_reported() {
        let queue: Vec<Job> = (0..6).map(|i| job(&format!("g{i}"), 0)).collect();
        let cancel = AtomicBool::new(false);
        let started = Mutex::new(Vec::new());
        let outcomes = run(
            queue,
            vec![Some(10 * G)],
            2,
            &cancel,
            |j, _| {
                started.lock().expect("lock").push(j.vm.to_string());
                cancel.store(true, Ordering::SeqCst);
                Ok(report())
            },
            |_| {},
        );
        // The first job cancels at once; the second may have started before it did.
        let started = started.into_inner().expect("lock");
        assert!((1..=2).contains(&started.len()), "{started:?}");
        assert_eq!(outcomes.len(), 6);
        let cancelled = outcomes
            .iter()
            .filter(|o| {
                o.result
                    .as_ref()
                    .err()
                    .is_some_and(|e| e.contains("cancelled"))
            })
            .count();
        assert_eq!(cancelled, 6 - started.len(), "{outcomes:?}");
    }
}
