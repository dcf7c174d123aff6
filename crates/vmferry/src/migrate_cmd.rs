//! `vmferry migrate`: runs the controller, shows progress, prints the summary.

use crate::login::load_auth;
use crate::units::human_bytes;
use anyhow::{anyhow, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmferry_daemon::controller::{self, MigrationPlan, MigrationReport};
use vmferry_daemon::{ClientAuth, ControlTarget};
use vmferry_proto::cookie::Compression;
use vmferry_proto::{DataAuth, MigrationOptions, MigrationStatus, TransportChoice, VmName, VmRef};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The managed VM to migrate (omit with --src-qmp/--dst-qmp: attach mode).
    pub name: Option<String>,
    /// Source daemon: host:port or a unix socket path.
    #[arg(long)]
    pub from: ControlTarget,
    /// Destination daemon: host:port or a unix socket path.
    #[arg(long)]
    pub to: ControlTarget,
    /// Attach mode: QMP socket of a running source QEMU (on the source daemon's host).
    #[arg(long, requires = "dst_qmp")]
    pub src_qmp: Option<PathBuf>,
    /// Attach mode: QMP socket of a destination QEMU started with -incoming defer.
    #[arg(long, requires = "src_qmp")]
    pub dst_qmp: Option<PathBuf>,
    /// A libvirt domain, by name, of the libvirt each daemon drives (`--libvirt-uri`):
    /// libvirt migrates it peer to peer and the daemons carry every connection it makes
    /// (libvirt's RPC, RAM, disks) over their secure channel.
    #[arg(long, value_name = "DOMAIN", conflicts_with_all = ["name", "src_qmp", "dst_qmp"])]
    pub libvirt: Option<String>,
    #[command(flatten)]
    pub login: LoginArgs,
    #[command(flatten)]
    pub tuning: Tuning,
    /// host:port the source dials for data (default: the destination's address).
    #[arg(long)]
    pub data_address: Option<String>,
    /// Machine-readable progress and result, one JSON object per line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Hand the migration to the daemons once it is under way and return at once;
    /// follow it with `vmferry status MIGRATION --daemon SOURCE`.
    #[arg(long)]
    pub detach: bool,
}

/// How the controller logs in to both daemons (shared by `migrate` and `drain`).
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Certs dir: the controller's certificate for the daemons (or only ca.pem, with --user).
    #[arg(long, env = "VMFERRY_CERTS")]
    pub certs: Option<PathBuf>,
    /// Log in to the daemons with this account's password (SCRAM-SHA-256).
    #[arg(long, env = "VMFERRY_USER")]
    pub user: Option<String>,
    /// File holding the password for --user (else VMFERRY_PASSWORD).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
}

impl LoginArgs {
    pub fn auth(&self) -> Result<ClientAuth> {
        load_auth(&self.certs, &self.user, &self.password_file)
    }
}

/// How each migration runs: the options `migrate` and `drain` share.
#[derive(Debug, Args)]
pub struct Tuning {
    /// Multifd channels (0 = one stream).
    #[arg(long, default_value_t = 0)]
    pub multifd: u32,
    /// Bandwidth cap, e.g. 500M (bytes/s); 0 = unlimited.
    #[arg(long, default_value = "0", value_parser = crate::units::bandwidth)]
    pub max_bandwidth: u64,
    /// Longest pause QEMU may take at switch-over, in ms (0 = QEMU's default).
    #[arg(long, default_value_t = 0)]
    pub downtime_limit: u64,
    /// How the data channel authenticates: pinned (per-migration identities) or x509.
    #[arg(long, default_value = "pinned")]
    pub data_auth: String,
    /// With x509: the name the destination's certificate must carry.
    #[arg(long)]
    pub tls_hostname: Option<String>,
    /// How the stream travels: direct (source dials destination), reverse (destination
    /// dials source), tunnel (inside one connection to the destination's control port),
    /// or auto (those in turn; default: the source daemon's configured choice, else auto).
    #[arg(long)]
    pub transport: Option<TransportChoice>,
    /// Compress each stream before encryption: none (default) or zstd. Pays off when
    /// the network is slower than the CPUs and guest memory compresses.
    #[arg(long, default_value = "none", value_parser = ["none", "zstd"])]
    pub compress: String,
    /// zstd level with --compress zstd: -7 (fastest) to 19 (smallest).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub compress_level: i32,
    /// Seconds each data connection may take to connect (default 2 under auto, else 5).
    #[arg(long)]
    pub connect_timeout: Option<f64>,
    /// Give up and roll back after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Seconds the daemons wait for this controller before acting alone: before the
    /// switch-over they roll back (the source keeps running), after it they finish.
    #[arg(long, default_value_t = 15)]
    pub lease: u64,
    /// Fail when nothing moved (no byte, no change of QEMU's status) for this many
    /// seconds, whatever --timeout says.
    #[arg(long, default_value_t = 30)]
    pub stall_timeout: u64,
    /// Throttle the guest's CPUs while pre-copy does not converge (QEMU's auto-converge),
    /// for guests that dirty memory faster than the link carries it.
    #[arg(long)]
    pub auto_converge: bool,
    /// With --auto-converge: the first throttle step, in percent of guest CPU time.
    #[arg(long, default_value_t = 20, requires = "auto_converge")]
    pub throttle_initial: u8,
    /// With --auto-converge: each further step, in percent.
    #[arg(long, default_value_t = 10, requires = "auto_converge")]
    pub throttle_increment: u8,
    /// Switch to post-copy once the first full pre-copy pass is done without converging:
    /// the guest then runs on the destination, which fetches the rest of its memory on
    /// demand, so any guest completes. A lost link is recovered by the daemons on their
    /// own; pages the guest waits for travel on a channel of their own (QEMU's
    /// postcopy-preempt) where both QEMUs can. From then on the migration cannot be
    /// cancelled, and if the destination QEMU dies the guest cannot be saved.
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: switch after this many seconds of pre-copy instead.
    #[arg(long, requires = "postcopy")]
    pub postcopy_after: Option<u64>,
    /// Copy the guest's writable disks too, over the same channel (disks on local
    /// storage): `all` copies each whole disk, `inc` only its top image (the destination
    /// has the same backing file). The destination QEMU needs a disk of the same format,
    /// at least the same size, on a device of the same id.
    #[arg(long, value_name = "all|inc")]
    pub copy_storage: Option<vmferry_proto::StorageMode>,
    /// With --copy-storage: `background` (the default) copies the guest's writes after
    /// the fact; `write-blocking` makes each write wait until it reached the destination,
    /// for guests that write faster than the link carries.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "background",
        requires = "copy_storage"
    )]
    pub storage_copy_mode: vmferry_proto::CopyMode,
}

pub fn run(a: MigrateArgs) -> Result<()> {
    let (source_vm, destination_vm) = match (&a.name, &a.src_qmp, &a.dst_qmp) {
        _ if a.libvirt.is_some() => {
            let domain = a.libvirt.clone().unwrap_or_default();
            if domain.is_empty() || domain.contains(['/', '\0']) {
                return Err(anyhow!("--libvirt {domain:?}: not a domain name"));
            }
            (
                VmRef::Libvirt {
                    domain: domain.clone(),
                },
                VmRef::Libvirt { domain },
            )
        }
        (Some(n), None, None) => {
            let name = VmName::new(n.clone())?;
            (
                VmRef::Managed { name: name.clone() },
                VmRef::Managed { name },
            )
        }
        (None, Some(s), Some(d)) => (
            VmRef::Attached {
                qmp: s.display().to_string(),
            },
            VmRef::Attached {
                qmp: d.display().to_string(),
            },
        ),
        (Some(_), Some(_), _) => {
            return Err(anyhow!(
                "give either a VM name or --src-qmp/--dst-qmp, not both"
            ))
        }
        _ => {
            return Err(anyhow!(
                "give a VM name, --src-qmp and --dst-qmp (attach mode), or --libvirt DOMAIN"
            ))
        }
    };
    let mut plan = a
        .tuning
        .plan(a.from.clone(), a.to.clone(), source_vm, destination_vm)?;
    plan.data_address = a.data_address.clone();
    plan.detach = a.detach;
    let auth = a.login.auth()?;
    let cancel = cancel_on_signals("the source VM will keep running");

    let bar = if !a.json && std::io::stderr().is_terminal() {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let json = a.json;
    let progress = |st: &MigrationStatus| {
        // Disks first (they are copied before the RAM moves), then the RAM.
        let disks_copying = !st.disks.is_empty() && st.ram_total == 0;
        if let Some(b) = &bar {
            if disks_copying {
                let total: u64 = st.disks.iter().map(|d| d.total).sum();
                let copied: u64 = st.disks.iter().map(|d| d.copied).sum();
                b.set_length(total.max(1));
                b.set_position(copied.min(total));
                let ready = st.disks.iter().filter(|d| d.ready).count();
                b.set_message(format!("disks {ready}/{} in sync", st.disks.len()));
            } else {
                b.set_length(st.ram_total.max(1));
                b.set_position(st.ram_transferred.min(st.ram_total));
            }
        }
        if let (Some(b), false) = (&bar, disks_copying) {
            let mut msg = st.qemu_status.clone();
            if st.pass > 1 {
                msg.push_str(&format!(
                    " pass {} dirty {}/s{}{}",
                    st.pass,
                    human_bytes(st.dirty_rate),
                    if st.throttle_pct > 0 {
                        format!(" throttle {}%", st.throttle_pct)
                    } else {
                        String::new()
                    },
                    match st.converging() {
                        Some(false) => " (not converging)",
                        _ => "",
                    }
                ));
            }
            b.set_message(msg);
        }
        if json {
            let line = serde_json::json!({
                "event": "progress",
                "status": st.qemu_status,
                "ram_total": st.ram_total,
                "ram_transferred": st.ram_transferred,
                "ram_remaining": st.ram_remaining,
                "mbps": st.mbps,
                "channel_bytes": st.channel_bytes,
                "pass": st.pass,
                "dirty_rate": st.dirty_rate,
                "throttle_pct": st.throttle_pct,
                "expected_downtime_ms": st.expected_downtime_ms,
                "converging": st.converging(),
                "disks": st.disks,
            });
            println!("{line}");
        }
    };
    let result = controller::migrate(&plan, &auth, progress, &cancel);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match result {
        Ok(report) => {
            print_report(&report, json);
            Ok(())
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "result", "ok": false, "error": e.to_string()})
                );
            }
            Err(e.into())
        }
    }
}

impl Tuning {
    /// The plan of one migration of `source_vm` from `source` to `destination` under
    /// these options (no data address, not detached). Refuses contradictory options.
    pub fn plan(
        &self,
        source: ControlTarget,
        destination: ControlTarget,
        source_vm: VmRef,
        destination_vm: VmRef,
    ) -> Result<MigrationPlan> {
        let a = self;
        let data_auth = match a.data_auth.as_str() {
            "pinned" => DataAuth::Pinned,
            "x509" => DataAuth::X509 {
                tls_hostname: a.tls_hostname.clone(),
            },
            other => return Err(anyhow!("unknown --data-auth {other:?}: use pinned or x509")),
        };
        if a.tls_hostname.is_some() && data_auth == DataAuth::Pinned {
            return Err(anyhow!("--tls-hostname goes with --data-auth x509"));
        }
        let compress = match a.compress.as_str() {
            "zstd" => Compression::Zstd {
                level: a.compress_level,
            },
            _ => Compression::None,
        };
        if a.auto_converge {
            vmferry_proto::cookie::AutoConverge {
                initial: a.throttle_initial,
                increment: a.throttle_increment,
            }
            .check()?;
        }
        compress
            .check()
            .map_err(|e| anyhow!("--compress-level: {e}"))?;
        Ok(MigrationPlan {
            source,
            destination,
            source_vm,
            destination_vm,
            options: MigrationOptions {
                multifd: a.multifd,
                max_bandwidth: a.max_bandwidth,
                data_auth,
                downtime_limit_ms: a.downtime_limit,
                transport: a.transport,
                compress,
                lease_ms: 0, // set by the controller from --lease, if both daemons keep leases
                auto_converge: a
                    .auto_converge
                    .then_some(vmferry_proto::cookie::AutoConverge {
                        initial: a.throttle_initial,
                        increment: a.throttle_increment,
                    }),
                copy_storage: a.copy_storage.map(|mode| vmferry_proto::CopyStorage {
                    mode,
                    copy_mode: a.storage_copy_mode,
                }),
                postcopy: a.postcopy.then_some(vmferry_proto::cookie::PostCopy {
                    after_ms: a.postcopy_after.map(|s| s.saturating_mul(1000)),
                    preempt: false, // the daemons decide, by what their QEMUs can
                }),
                stall_timeout_ms: match a.stall_timeout {
                    0 => return Err(anyhow!("--stall-timeout must be at least 1 second")),
                    s => s.saturating_mul(1000),
                },
            },
            data_address: None,
            timeout: a.timeout.map(Duration::from_secs),
            connect_timeout: match a.connect_timeout {
                Some(s) if s.is_finite() && s > 0.0 && s <= 60.0 => {
                    Some(Duration::from_secs_f64(s))
                }
                Some(s) => {
                    return Err(anyhow!(
                        "--connect-timeout {s}: give seconds between 0 and 60"
                    ))
                }
                None => None,
            },
            lease: {
                let ms = a.lease.saturating_mul(1000);
                if !vmferry_proto::cookie::LEASE_MS.contains(&ms) {
                    return Err(anyhow!(
                        "--lease {}: give seconds from {} to {}",
                        a.lease,
                        vmferry_proto::cookie::LEASE_MS.start() / 1000,
                        vmferry_proto::cookie::LEASE_MS.end() / 1000
                    ));
                }
                Duration::from_millis(ms)
            },
            detach: false,
        })
    }
}

/// A flag that Ctrl-C (SIGINT) or SIGTERM sets: the controller then rolls back and the
/// source VM keeps running. The first signal says `what` happens; a second one only says
/// the rollback must finish. The signals are read on a thread of their own, so the
/// messages need no async-signal safety.
pub fn cancel_on_signals(what: &'static str) -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        let c = cancel.clone();
        std::thread::spawn(move || {
            for _ in signals.forever() {
                if c.swap(true, Ordering::SeqCst) {
                    eprintln!("vmferry: still rolling back, please wait");
                } else {
                    eprintln!("vmferry: cancelling; {what}");
                }
            }
        });
    }
    cancel
}

fn print_report(r: &MigrationReport, json: bool) {
    if json {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["event"] = "result".into();
        v["ok"] = true.into();
        println!("{v}");
        return;
    }
    if r.detached {
        println!(
            "migration {} handed to the daemons; follow it with `vmferry status {}` on the source daemon",
            r.migration, r.migration
        );
        return;
    }
    println!("migration {} completed", r.migration);
    let plural = if r.streams == 1 { "" } else { "s" };
    let transport = r.transport.map(|t| t.as_str()).unwrap_or("none");
    if transport == "tunnel" {
        println!(
            "  transport   tunnel ({} stream{plural} in one TLS 1.3 connection to the control port)",
            r.streams
        );
    } else {
        println!(
            "  transport   {} ({} stream{plural}, TLS 1.3)",
            transport, r.streams
        );
    }
    for n in &r.transport_notes {
        println!("  passed over {n}");
    }
    if !r.data_path.is_empty() {
        println!("  data path   {}", r.data_path);
    }
    println!(
        "  total time  {:.2} s (QEMU: {})",
        r.total_time_ms as f64 / 1000.0,
        r.qemu_total_time_ms
            .map(|t| format!("{t} ms"))
            .unwrap_or_else(|| "n/a".into())
    );
    println!("  data        {}", human_bytes(r.bytes));
    if let (Some(s), Some(d)) = (&r.source_qemu, &r.destination_qemu) {
        println!("  QEMU        {s} → {d}");
    }
    for d in &r.disks {
        let pace = match d.in_sync_ms {
            Some(ms) if ms > 0 => format!(
                ", in sync after {:.1} s ({:.0} MiB/s)",
                ms as f64 / 1000.0,
                d.total as f64 / (1u64 << 20) as f64 / (ms as f64 / 1000.0)
            ),
            _ => String::new(),
        };
        println!(
            "  disk {:<7}{} copied{pace}",
            d.device,
            human_bytes(d.total)
        );
    }
    if !r.compression.is_empty() && r.compression != "none" {
        let ratio = r.bytes as f64 / r.wire_bytes.max(1) as f64;
        println!(
            "  compressed  {} → {} on the wire ({ratio:.1}:1, {})",
            human_bytes(r.bytes),
            human_bytes(r.wire_bytes),
            r.compression
        );
    }
    println!("  throughput  {:.0} Mbit/s", r.throughput_mbps);
    println!(
        "  downtime    {}",
        r.downtime_ms
            .map(|d| format!("{d} ms"))
            .unwrap_or_else(|| "n/a".into())
    );
}
