//! The daemon's metrics: how many migrations started, completed, failed or were cancelled
//! here (by role and transport), the bytes they carried, how long they took and how long
//! the guest paused, how many are in flight, and which build runs — in the Prometheus
//! text format (`serve --metrics ADDR`, served by [`http`]).
//!
//! It only counts what the migration code tells it ([`Metrics::started`],
//! [`Metrics::ended`]); it never reads or changes a migration, and a label never carries
//! anything but a role, a transport or the version (never a VM, a host or an identity:
//! those belong to the audit log, which is not world-readable).

pub mod http;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use vmferry_proto::{Role, Transport};

/// The content type of [`Metrics::render`]'s text (OpenMetrics 1.0, which Prometheus
/// reads, as does any parser of its classic text format: the two differ only in `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The transport label of a migration that ended before a channel was made.
pub const NO_TRANSPORT: &str = "none";

/// Upper bounds of the duration buckets, in seconds: a paused small guest takes well
/// under a second, a busy large one many minutes.
const DURATION_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Upper bounds of the downtime buckets, in seconds: QEMU's default downtime limit is
/// 300 ms; anything past a few seconds is an incident.
const DOWNTIME_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    role: &'static str,
    transport: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// How a migration ended on this daemon, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Completed,
    Failed,
    Cancelled,
}

/// What the metrics keep of a migration that ended here.
#[derive(Debug, Clone, Copy)]
pub struct EndedMigration {
    pub role: Role,
    /// `None` when it ended before a channel was made.
    pub transport: Option<Transport>,
    pub ended: Ended,
    /// Plaintext bytes the daemon carried for it.
    pub bytes: u64,
    /// QEMU's figures (the source knows them): the whole migration, and the guest's pause.
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
}

/// The registry and every metric in it. Cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    started: Family<MigrationLabels, Counter>,
    completed: Family<MigrationLabels, Counter>,
    failed: Family<MigrationLabels, Counter>,
    cancelled: Family<MigrationLabels, Counter>,
    bytes: Family<MigrationLabels, Counter>,
    duration: HistogramFamily<TransportLabel>,
    downtime: HistogramFamily<TransportLabel>,
    in_flight: Family<RoleLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vmferry");
        let started = Family::<MigrationLabels, Counter>::default();
        let completed = Family::<MigrationLabels, Counter>::default();
        let failed = Family::<MigrationLabels, Counter>::default();
        let cancelled = Family::<MigrationLabels, Counter>::default();
        let bytes = Family::<MigrationLabels, Counter>::default();
        let duration: HistogramFamily<TransportLabel> =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        let downtime: HistogramFamily<TransportLabel> =
            Family::new_with_constructor(|| Histogram::new(DOWNTIME_BUCKETS));
        let in_flight = Family::<RoleLabel, Gauge>::default();
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "migrations_started",
            "Migrations whose data channel was made and whose streams began to flow here",
            started.clone(),
        );
        registry.register(
            "migrations_completed",
            "Migrations that ended here with the guest running on the destination",
            completed.clone(),
        );
        registry.register(
            "migrations_failed",
            "Migrations that failed here (transport \"none\": before a channel was made)",
            failed.clone(),
        );
        registry.register(
            "migrations_cancelled",
            "Migrations cancelled by a controller, rolled back here",
            cancelled.clone(),
        );
        registry.register(
            "migration_bytes",
            "Plaintext migration bytes this daemon carried, counted when a migration ends",
            bytes.clone(),
        );
        registry.register(
            "migration_duration_seconds",
            "Time of completed migrations, as the source QEMU measured it",
            duration.clone(),
        );
        registry.register(
            "migration_downtime_seconds",
            "Guest pause at the switch-over of completed migrations, as the source QEMU \
             measured it",
            downtime.clone(),
        );
        registry.register(
            "migrations_in_flight",
            "Migrations this daemon holds that have not ended",
            in_flight.clone(),
        );
        registry.register(
            "build_info",
            "The vmferry version this daemon runs (always 1)",
            build_info,
        );
        // Every series a dashboard or alert may ask for exists from the first scrape, at
        // 0: an absent series would make `increase()` miss the first migration.
        for role in [Role::Source, Role::Destination] {
            for transport in Transport::AUTO_ORDER.map(Transport::as_str) {
                let labels = MigrationLabels {
                    role: role.as_str(),
                    transport,
                };
                for family in [&started, &completed, &failed, &cancelled, &bytes] {
                    let _ = family.get_or_create(&labels);
                }
            }
            let _ = failed.get_or_create(&MigrationLabels {
                role: role.as_str(),
                transport: NO_TRANSPORT,
            });
        }
        Metrics {
            registry,
            started,
            completed,
            failed,
            cancelled,
            bytes,
            duration,
            downtime,
            in_flight,
        }
    }

    /// A migration's streams began to flow on this daemon (once per migration and role).
    pub fn started(&self, role: Role, transport: Transport) {
        self.started
            .get_or_create(&MigrationLabels {
                role: role.as_str(),
                transport: transport.as_str(),
            })
            .inc();
    }

    /// A migration ended on this daemon (once per migration and role).
    pub fn ended(&self, m: &EndedMigration) {
        let transport = m.transport.map_or(NO_TRANSPORT, Transport::as_str);
        let labels = MigrationLabels {
            role: m.role.as_str(),
            transport,
        };
        let counter = match m.ended {
            Ended::Completed => &self.completed,
            Ended::Failed => &self.failed,
            Ended::Cancelled => &self.cancelled,
        };
        counter.get_or_create(&labels).inc();
        if m.bytes > 0 {
            self.bytes.get_or_create(&labels).inc_by(m.bytes);
        }
        if m.ended == Ended::Completed {
            let label = TransportLabel { transport };
            if let Some(ms) = m.total_time_ms {
                self.duration.get_or_create(&label).observe(seconds(ms));
            }
            if let Some(ms) = m.downtime_ms {
                self.downtime.get_or_create(&label).observe(seconds(ms));
            }
        }
    }

    /// The text a scrape gets. `in_flight` is how many migrations of each role this
    /// daemon holds right now (counted by the caller from its tables, so the gauge can
    /// never drift from them); both roles are always present.
    pub fn render(&self, in_flight: &[(Role, usize)]) -> String {
        for role in [Role::Source, Role::Destination] {
            let n = in_flight
                .iter()
                .filter(|(r, _)| *r == role)
                .map(|(_, n)| *n)
                .sum::<usize>();
            self.in_flight
                .get_or_create(&RoleLabel {
                    role: role.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a
        // metric, and a partial page is still better than none.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_registry_shows_the_build_and_nothing_in_flight() {
        let text = Metrics::new().render(&[]);
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("vmferry_build_info{{version=\"{version}\"}} 1\n")),
            "{text}"
        );
        assert!(
            text.contains("vmferry_migrations_in_flight{role=\"source\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "vmferry_migrations_completed_total{role=\"destination\",transport=\"reverse\"} 0\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn an_ended_migration_is_counted_by_role_transport_and_result() {
        let m = Metrics::new();
        m.started(Role::Source, Transport::Tunnel);
        m.ended(&EndedMigration {
            role: Role::Source,
            transport: Some(Transport::Tunnel),
            ended: Ended::Completed,
            bytes: 4096,
            total_time_ms: Some(1500),
            downtime_ms: Some(40),
        });
        m.ended(&EndedMigration {
            role: Role::Destination,
            transport: None,
            ended: Ended::Failed,
            bytes: 0,
            total_time_ms: None,
            downtime_ms: None,
        });
        let text = m.render(&[(Role::Destination, 2)]);
        for line in [
            "vmferry_migrations_started_total{role=\"source\",transport=\"tunnel\"} 1",
            "vmferry_migrations_completed_total{role=\"source\",transport=\"tunnel\"} 1",
            "vmferry_migrations_failed_total{role=\"destination\",transport=\"none\"} 1",
            "vmferry_migration_bytes_total{role=\"source\",transport=\"tunnel\"} 4096",
            "vmferry_migration_duration_seconds_count{transport=\"tunnel\"} 1",
            "vmferry_migration_downtime_seconds_bucket{le=\"0.05\",transport=\"tunnel\"} 1",
            "vmferry_migrations_in_flight{role=\"destination\"} 2",
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
    }
}
