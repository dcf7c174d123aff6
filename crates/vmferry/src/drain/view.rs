//! What `vmferry drain` shows: a live table on a terminal (one line per VM, redrawn in
//! place), else one line per event, or with `--json` one object per VM and a summary.
//!
//! It only renders and counts what it is told; it must never decide anything about the
//! drain (the scheduler does), so that every mode reports the same facts.

use super::schedule::{Event, Job, Outcome};
use crate::units::human_bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeSet, HashMap};
use vmferry_proto::{HostInfo, VmName};

/// How to show the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A table on the terminal, redrawn in place (stderr), and the summary on stdout.
    Table,
    /// One line per event on stdout.
    Lines,
    /// One JSON object per VM result and a final summary, on stdout.
    Json,
}

/// The display, and the tally the summary is made of.
pub struct View {
    mode: Mode,
    /// Each destination as the operator named it, by index.
    labels: Vec<String>,
    /// Table mode: the lines, and each VM's bar.
    table: Option<MultiProgress>,
    bars: HashMap<VmName, ProgressBar>,
    /// Table and line mode: the transport each VM's migration uses, once known.
    transports: HashMap<VmName, String>,
    /// Destinations that failed too often and got no more VMs.
    excluded: BTreeSet<usize>,
    outcomes: Vec<Outcome>,
}

impl View {
    pub fn new(mode: Mode, labels: Vec<String>) -> View {
        let table = (mode == Mode::Table)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)));
        View {
            mode,
            labels,
            table,
            bars: HashMap::new(),
            transports: HashMap::new(),
            excluded: BTreeSet::new(),
            outcomes: Vec::new(),
        }
    }

    fn label(&self, d: Option<usize>) -> &str {
        d.and_then(|d| self.labels.get(d))
            .map_or("-", String::as_str)
    }

    /// What each destination reported (or why it cannot be used).
    pub fn destinations(&self, survey: &[Result<HostInfo, String>]) {
        for (i, r) in survey.iter().enumerate() {
            let label = self.label(Some(i));
            match r {
                // Always said on stderr, whatever the mode: an operator must see it.
                Err(e) => eprintln!("vmferry: destination {label} is not used: {e}"),
                Ok(h) if self.mode != Mode::Json => println!(
                    "destination {label} ({}): {} available; {} VM{} given {}",
                    h.host,
                    human_bytes(h.mem_available),
                    h.vms,
                    if h.vms == 1 { "" } else { "s" },
                    human_bytes(h.vms_memory)
                ),
                Ok(_) => {}
            }
        }
    }

    /// The plan: the jobs in order, before any starts.
    pub fn planned(&mut self, jobs: &[Job]) {
        match self.mode {
            Mode::Json => {}
            Mode::Lines => {
                for j in jobs {
                    println!(
                        "{}: {} to {}",
                        j.vm,
                        human_bytes(j.bytes),
                        self.label(Some(j.destination))
                    );
                }
            }
            Mode::Table => {
                let Some(table) = &self.table else { return };
                let _ = table.println(format!(
                    "{:<16} {:<26} {:<9} {:<20} RESULT",
                    "VM", "DESTINATION", "TRANSPORT", "PROGRESS"
                ));
                // The bytes go in the message: a bar's own length is 0 (shown full) or
                // a stand-in until QEMU says how much RAM there is.
                let style = ProgressStyle::with_template("{prefix} {bar:20} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                for j in jobs {
                    let bar = table.add(ProgressBar::new(1).with_style(style.clone()));
                    bar.set_prefix(self.prefix(&j.vm, j.destination));
                    bar.set_message("waiting");
                    self.bars.insert(j.vm.clone(), bar);
                }
            }
        }
    }

    fn prefix(&self, vm: &VmName, destination: usize) -> String {
        let transport = self.transports.get(vm).map_or("-", String::as_str);
        format!(
            "{:<16} {:<26} {:<9}",
            vm.as_str(),
            self.label(Some(destination)),
            transport
        )
    }

    pub fn event(&mut self, e: &Event) {
        match e {
            Event::Started(j) => match self.mode {
                Mode::Lines => {
                    println!("{}: migrating to {}", j.vm, self.label(Some(j.destination)))
                }
                Mode::Table => {
                    if let Some(b) = self.bars.get(&j.vm) {
                        b.set_message("migrating");
                    }
                }
                Mode::Json => {}
            },
            Event::Progress(j, st) => {
                if let Some(b) = self.bars.get(&j.vm) {
                    if st.ram_total > 0 {
                        b.set_length(st.ram_total);
                        b.set_position(st.ram_transferred.min(st.ram_total));
                    }
                    b.set_message(format!(
                        "{} of {} {}",
                        human_bytes(st.ram_transferred),
                        human_bytes(st.ram_total),
                        st.qemu_status
                    ));
                }
                let Some(t) = st.transport else { return };
                if self.transports.contains_key(&j.vm) {
                    return;
                }
                self.transports.insert(j.vm.clone(), t.as_str().to_string());
                match self.mode {
                    Mode::Lines => println!(
                        "{}: carried to {} over {}",
                        j.vm,
                        self.label(Some(j.destination)),
                        t.as_str()
                    ),
                    Mode::Table => {
                        let prefix = self.prefix(&j.vm, j.destination);
                        if let Some(b) = self.bars.get(&j.vm) {
                            b.set_prefix(prefix);
                        }
                    }
                    Mode::Json => {}
                }
            }
            Event::Replaced { job, from } => {
                let said = format!(
                    "{}: {} failed {} times; placed on {} instead",
                    job.vm,
                    self.label(Some(*from)),
                    super::schedule::FAILURES_TO_EXCLUDE,
                    self.label(Some(job.destination))
                );
                match self.mode {
                    Mode::Lines => println!("{said}"),
                    Mode::Table => {
                        let prefix = self.prefix(&job.vm, job.destination);
                        if let Some(b) = self.bars.get(&job.vm) {
                            b.set_prefix(prefix);
                            b.set_message(format!("waiting (was for {})", self.label(Some(*from))));
                        }
                    }
                    Mode::Json => {}
                }
            }
            Event::Excluded { destination } => {
                self.excluded.insert(*destination);
                let said = format!(
                    "destination {} failed {} times: no more VMs are placed on it",
                    self.label(Some(*destination)),
                    super::schedule::FAILURES_TO_EXCLUDE
                );
                match (&self.table, self.mode) {
                    (Some(t), _) => {
                        let _ = t.println(said);
                    }
                    (None, Mode::Lines) => println!("{said}"),
                    _ => {}
                }
            }
            Event::Finished(o) => {
                self.finished(o);
                self.outcomes.push(o.clone());
            }
        }
    }

    fn finished(&self, o: &Outcome) {
        let dest = self.label(o.destination).to_string();
        match self.mode {
            Mode::Json => {
                let mut v = match &o.result {
                    Ok(r) => serde_json::to_value(r).unwrap_or_default(),
                    Err(e) => serde_json::json!({ "error": e }),
                };
                v["event"] = "vm".into();
                v["vm"] = o.vm.as_str().into();
                v["destination"] = o
                    .destination
                    .map_or(serde_json::Value::Null, |_| dest.into());
                v["ok"] = o.result.is_ok().into();
                println!("{v}");
            }
            Mode::Lines => match &o.result {
                Ok(r) => println!("{}: migrated to {dest}{}", o.vm, done(r)),
                Err(e) => println!("{}: FAILED (on {dest}): {e}", o.vm),
            },
            Mode::Table => {
                let Some(table) = &self.table else { return };
                let bar = match self.bars.get(&o.vm) {
                    Some(b) => b.clone(),
                    // A VM that never had a line (not placed): one of its own.
                    None => {
                        let b = table.add(
                            ProgressBar::new(1).with_style(
                                ProgressStyle::with_template("{prefix} {msg}")
                                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                            ),
                        );
                        b.set_prefix(format!("{:<16} {:<26} {:<9}", o.vm.as_str(), dest, "-"));
                        b
                    }
                };
                match &o.result {
                    Ok(r) => {
                        bar.set_position(bar.length().unwrap_or(0));
                        bar.finish_with_message(format!("migrated{}", done(r)));
                    }
                    Err(e) => bar.abandon_with_message(format!("FAILED: {e}")),
                }
            }
        }
    }

    /// The summary, once every VM has an outcome. Returns how many were not migrated.
    pub fn summary(&self, source: &str, survey: &[Result<HostInfo, String>]) -> usize {
        // The table stays on the terminal as it last stood: it is the per-VM account. Its
        // last line has no newline of its own.
        if self.table.is_some() && !self.bars.is_empty() {
            eprintln!();
        }
        let migrated = self.outcomes.iter().filter(|o| o.result.is_ok()).count();
        let failed = self.outcomes.len() - migrated;
        if self.mode == Mode::Json {
            let destinations: Vec<serde_json::Value> = survey
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let on = |ok: bool| {
                        self.outcomes
                            .iter()
                            .filter(|o| o.destination == Some(i) && o.result.is_ok() == ok)
                            .count()
                    };
                    let mut v = match r {
                        Ok(h) => serde_json::to_value(h).unwrap_or_default(),
                        Err(e) => serde_json::json!({ "error": e }),
                    };
                    v["destination"] = self.label(Some(i)).into();
                    v["usable"] = r.is_ok().into();
                    v["migrated"] = on(true).into();
                    v["failed"] = on(false).into();
                    v["excluded"] = self.excluded.contains(&i).into();
                    v
                })
                .collect();
            let not_migrated: Vec<&str> = self
                .outcomes
                .iter()
                .filter(|o| o.result.is_err())
                .map(|o| o.vm.as_str())
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "event": "summary",
                    "source": source,
                    "vms": self.outcomes.len(),
                    "migrated": migrated,
                    "not_migrated": not_migrated,
                    "destinations": destinations,
                })
            );
        } else {
            println!(
                "drain of {source}: {migrated} of {} VM{} migrated{}",
                self.outcomes.len(),
                if self.outcomes.len() == 1 { "" } else { "s" },
                if failed > 0 {
                    format!("; {failed} not migrated")
                } else {
                    String::new()
                }
            );
        }
        failed
    }
}

/// A completed migration in a few words: ` (direct, 2.1 s, downtime 40 ms)`.
fn done(r: &vmferry_daemon::controller::MigrationReport) -> String {
    format!(
        " ({}, {:.1} s, downtime {})",
        r.transport.map_or("-", |t| t.as_str()),
        r.total_time_ms as f64 / 1000.0,
        r.downtime_ms
            .map_or_else(|| "n/a".to_string(), |d| format!("{d} ms"))
    )
}
