//! Command-line definitions and the small commands (serve, certs, vm).

use crate::login::load_auth;
use crate::units::parse_memory_mib;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::IpAddr;
use std::path::PathBuf;
use vmferry_channel::certs::{self, IssueOptions};
use vmferry_daemon::auth::{Role, ScramUsers};
use vmferry_daemon::client::ControlClient;
use vmferry_daemon::{ControlTarget, DaemonConfig, Server};
use vmferry_proto::{Accel, RequestBody, ResponseBody, VmName, VmSpec};

/// Default local control socket of a daemon with the default state dir.
pub const DEFAULT_DAEMON: &str = "/var/lib/vmferry/control.sock";

#[derive(Debug, Parser)]
#[command(
    name = "vmferry",
    version,
    about = "Secure, fast live migration for unmodified QEMU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More logging (VMFERRY_LOG overrides).
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

impl Cli {
    pub fn default_log_level(&self) -> &'static str {
        match (&self.command, self.verbose) {
            (_, true) => "debug",
            (Command::Serve(_), false) => "info",
            _ => "warn",
        }
    }

    /// How log lines are written: only the daemon can be told (`serve --log-format`).
    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            Command::Serve(a) => a.log_format,
            _ => LogFormat::Text,
        }
    }
}

/// The shape of log lines on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, as a terminal shows it.
    #[default]
    Text,
    /// For log collectors: one JSON object per line (timestamp, level, target, fields).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the per-host daemon.
    Serve(ServeArgs),
    /// Make a CA and host certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Manage VMs on a daemon.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a VM from one daemon to another.
    Migrate(crate::migrate_cmd::MigrateArgs),
    /// Live-migrate every managed VM off a host, onto the destinations with the most
    /// memory free, a few at a time; a VM whose migration fails keeps running on the
    /// source.
    Drain(crate::drain::DrainArgs),
    /// Password accounts for the control API (SCRAM-SHA-256; the file keeps only salted
    /// verifiers).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Migrations on a daemon (in flight, and the last ones it was the source of), or one
    /// migration in detail: its state, transport, and why other transports were passed over.
    Status {
        /// A migration id (from `vmferry migrate`'s output); omit to list them all.
        migration: Option<String>,
        #[command(flatten)]
        daemon: DaemonArgs,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a migration in flight, from any authorized controller (give the source
    /// daemon): the source VM keeps running and the destination QEMU is torn down.
    /// Refused once the source has switched over.
    Cancel {
        /// The migration id.
        migration: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Control (and data) address, host:port, served with mutual TLS.
    #[arg(long)]
    pub listen: Option<String>,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Certs dir with ca.pem, cert.pem, key.pem.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// The QEMU binary for the VMs this daemon starts (default qemu-system-x86_64).
    #[arg(long)]
    pub qemu: Option<String>,
    /// Default accelerator for VMs: auto, kvm or tcg.
    #[arg(long)]
    pub accel: Option<Accel>,
    /// Address peers dial for data, if not the one controllers use.
    #[arg(long)]
    pub advertise: Option<String>,
    /// An extra data-only port (direct and reverse transports), host:port.
    #[arg(long)]
    pub data_listen: Option<String>,
    /// Transport for migrations whose controller names none: auto, direct, reverse, tunnel.
    #[arg(long)]
    pub transport: Option<vmferry_proto::TransportChoice>,
    /// Control authentication schemes accepted on TCP, in order: x509, scram-sha-256.
    #[arg(long, value_delimiter = ',')]
    pub auth: Option<Vec<String>>,
    /// The SCRAM users file (`vmferry users add`).
    #[arg(long)]
    pub scram_users: Option<PathBuf>,
    /// A certificate subject allowed to operate, e.g. "CN=controller,O=ops" (repeatable).
    #[arg(long = "allowed-client")]
    pub allowed_clients: Vec<String>,
    /// A certificate subject allowed to read only (repeatable).
    #[arg(long = "readonly-client")]
    pub readonly_clients: Vec<String>,
    /// In x509 data mode, a peer daemon's certificate subject allowed to exchange guests
    /// with this one, e.g. "CN=hostb" (repeatable; default any host of the CA).
    #[arg(long = "allowed-peer")]
    pub allowed_peers: Vec<String>,
    /// Seconds a prepared migration's one-time credentials stay valid (default 300).
    #[arg(long)]
    pub credential_ttl: Option<u64>,
    /// Serve Prometheus metrics over plain HTTP on host:port (GET /metrics). Counts only
    /// (no VM, host or identity), but bind it to loopback or a management network.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// The libvirt to drive for `migrate --libvirt` (default qemu:///system).
    #[arg(long, value_name = "URI")]
    pub libvirt_uri: Option<String>,
    /// Where libvirt migrations make their socket directories (default
    /// /run/vmferry/migrations); the same path on every host.
    #[arg(long, value_name = "DIR")]
    pub libvirt_migrations_dir: Option<PathBuf>,
    /// The group libvirt runs QEMU as, when not root (qemu.conf `group`): it gets access
    /// to each libvirt migration's directory and the sockets QEMU uses there.
    #[arg(long, value_name = "GROUP")]
    pub libvirt_qemu_group: Option<String>,
    /// Log lines as text (default) or as JSON objects, one per line, for a log collector.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA in DIR (ca.pem, ca-key.pem).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "vmferry CA")]
        cn: String,
    },
    /// Issue a host certificate (server and client) signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// The host's name (CN and DNS SAN).
        #[arg(long)]
        host: String,
        /// IP address SANs.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Extra DNS SANs.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Organization (O=) in the subject.
        #[arg(long)]
        org: Option<String>,
        /// Where to write cert.pem, key.pem and a copy of ca.pem (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Add an account, or give it a new password and role. The password is read from
    /// --password-file, else from standard input (one line).
    Add {
        name: String,
        /// The users file (the daemon's `scram_users`); created with mode 0600.
        #[arg(long)]
        file: PathBuf,
        /// operator (migrate, cancel, start and stop VMs) or readonly (status, lists).
        #[arg(long, default_value = "operator")]
        role: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The daemon: host:port (TLS) or a unix socket path.
    #[arg(long, env = "VMFERRY_DAEMON", default_value = DEFAULT_DAEMON)]
    pub daemon: ControlTarget,
    /// Certs dir for TLS connections (a client certificate, or only ca.pem with --user).
    #[arg(long, env = "VMFERRY_CERTS")]
    pub certs: Option<PathBuf>,
    /// Log in with this account's password (SCRAM-SHA-256) instead of a certificate.
    #[arg(long, env = "VMFERRY_USER")]
    pub user: Option<String>,
    /// File holding the password for --user (else VMFERRY_PASSWORD).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Start a VM managed by the daemon.
    Start {
        name: String,
        #[command(flatten)]
        daemon: DaemonArgs,
        #[arg(long, default_value = "512M")]
        memory: String,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long)]
        append: Option<String>,
        /// A disk image, qcow2 or raw (repeatable): on shared storage, or local and
        /// copied by `migrate --copy-storage`.
        #[arg(long = "disk")]
        disks: Vec<PathBuf>,
        #[arg(long, default_value = "auto")]
        accel: Accel,
        /// QEMU machine type (default q35, pinned to the versioned type this host's QEMU
        /// gives it, e.g. pc-q35-7.2). Pin an older one to migrate to hosts with an older
        /// QEMU: a QEMU 10.0 VM started as q35 is pc-q35-10.0, unknown to QEMU 7.2.
        #[arg(long)]
        machine: Option<String>,
    },
    /// List the daemon's VMs.
    List {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM.
    Stop {
        name: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => serve(a),
        Command::Certs(c) => certs_cmd(c),
        Command::Vm(v) => vm_cmd(v),
        Command::Migrate(m) => crate::migrate_cmd::run(m),
        Command::Drain(d) => crate::drain::run(d),
        Command::Users(u) => users_cmd(u),
        Command::Cancel { migration, daemon } => cancel_cmd(&migration, &daemon),
        Command::Status {
            migration,
            daemon,
            json,
        } => status_cmd(migration, &daemon, json),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let mut config = match &a.config {
        Some(p) => DaemonConfig::from_file(p).map_err(|e| anyhow!(e))?,
        None => DaemonConfig::new(
            a.state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/lib/vmferry")),
        ),
    };
    if let Some(s) = a.state_dir {
        config.state_dir = s;
    }
    if a.listen.is_some() {
        config.listen = a.listen;
    }
    if a.certs.is_some() {
        config.certs = a.certs;
    }
    if let Some(q) = a.qemu {
        config.qemu = q;
    }
    if let Some(x) = a.accel {
        config.accel = x;
    }
    if a.advertise.is_some() {
        config.advertise = a.advertise;
    }
    if a.data_listen.is_some() {
        config.data_listen = a.data_listen;
    }
    if let Some(t) = a.transport {
        config.transport = t;
    }
    if let Some(v) = a.auth {
        config.auth = v;
    }
    if a.scram_users.is_some() {
        config.scram_users = a.scram_users;
    }
    if !a.allowed_clients.is_empty() {
        config.allowed_clients = a.allowed_clients;
    }
    if !a.readonly_clients.is_empty() {
        config.readonly_clients = a.readonly_clients;
    }
    if !a.allowed_peers.is_empty() {
        config.allowed_peers = a.allowed_peers;
    }
    if let Some(t) = a.credential_ttl {
        config.credential_ttl_secs = t;
    }
    if a.metrics.is_some() {
        config.metrics = a.metrics;
    }
    if let Some(u) = a.libvirt_uri {
        config.libvirt_uri = u;
    }
    if let Some(d) = a.libvirt_migrations_dir {
        config.libvirt_migrations_dir = d;
    }
    if a.libvirt_qemu_group.is_some() {
        config.libvirt_qemu_group = a.libvirt_qemu_group;
    }
    let server = Server::bind(config.clone()).context("cannot start the daemon")?;
    tracing::info!(
        listen = ?server.local_addr(),
        socket = %config.control_socket().display(),
        "vmferry daemon serving"
    );
    if let Some(a) = server.metrics_addr() {
        tracing::info!(metrics = %a, "Prometheus metrics at http://{a}/metrics");
    }
    server.run().context("daemon stopped")?;
    Ok(())
}

fn users_cmd(c: UsersCommand) -> Result<()> {
    match c {
        UsersCommand::Add {
            name,
            file,
            role,
            password_file,
        } => {
            let role = match role.as_str() {
                "operator" => Role::Operator,
                "readonly" | "read-only" => Role::ReadOnly,
                other => bail!("--role {other:?}: use operator or readonly"),
            };
            let password = match password_file {
                Some(f) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .context("cannot read the password from standard input")?;
                    line
                }
            };
            let password = password.trim_end_matches(['\n', '\r']);
            ScramUsers::add(&file, &name, password, role).map_err(|e| anyhow!(e))?;
            println!(
                "user '{name}' ({}) written to {}",
                role.as_str(),
                file.display()
            );
        }
    }
    Ok(())
}

fn certs_cmd(c: CertsCommand) -> Result<()> {
    match c {
        CertsCommand::Init { dir, cn } => {
            certs::init_ca(&dir, &cn)?;
            println!("CA created in {}", dir.display());
        }
        CertsCommand::Issue {
            dir,
            host,
            ips,
            dns,
            org,
            out,
            days,
        } => {
            let mut o = IssueOptions::new(&host);
            o.ips = ips;
            o.extra_dns = dns;
            o.organization = org;
            o.not_after = o.not_before + time::Duration::days(i64::from(days));
            let out = out.unwrap_or_else(|| dir.clone());
            certs::issue_host(&dir, &out, &o)?;
            println!("certificate for {host} written to {}", out.display());
        }
    }
    Ok(())
}

fn connect(d: &DaemonArgs) -> Result<ControlClient> {
    let auth = load_auth(&d.certs, &d.user, &d.password_file)?;
    Ok(ControlClient::connect_with(&d.daemon, &auth, None)?)
}

const VM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn cancel_cmd(migration: &str, daemon: &DaemonArgs) -> Result<()> {
    let id = vmferry_proto::MigrationId::new(migration.to_string())?;
    let mut c = connect(daemon)?;
    match c.call(
        RequestBody::Cancel {
            migration: id.clone(),
        },
        VM_TIMEOUT,
    )? {
        ResponseBody::Done => {
            println!("migration {id} cancelled; the source VM keeps running");
            Ok(())
        }
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn status_cmd(migration: Option<String>, daemon: &DaemonArgs, json: bool) -> Result<()> {
    let mut c = connect(daemon)?;
    match migration {
        Some(id) => {
            let id = vmferry_proto::MigrationId::new(id)?;
            let st = match c.call(
                RequestBody::Status {
                    migration: id.clone(),
                    wait_ms: 0,
                    renew: false,
                },
                VM_TIMEOUT,
            )? {
                ResponseBody::Status { status } => status,
                other => bail!("unexpected answer: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            println!("migration {id}");
            println!("  state       {}", st.qemu_status);
            if let Some(s) = st.state {
                println!("  phase       {s}");
            }
            if let Some(n) = &st.note {
                println!("  note        {n}");
            }
            if st.source_qemu.is_some() || st.destination_qemu.is_some() {
                let v = |r: &Option<String>| r.clone().unwrap_or_else(|| "?".into());
                println!(
                    "  QEMU        {} → {}",
                    v(&st.source_qemu),
                    v(&st.destination_qemu)
                );
            }
            println!(
                "  transport   {} ({} stream{})",
                st.transport.map(|t| t.as_str()).unwrap_or("not chosen yet"),
                st.streams,
                if st.streams == 1 { "" } else { "s" }
            );
            for n in &st.transport_notes {
                println!("  passed over {n}");
            }
            println!(
                "  progress    {} of {} ({} carried)",
                crate::units::human_bytes(st.ram_transferred),
                crate::units::human_bytes(st.ram_total),
                crate::units::human_bytes(st.channel_bytes)
            );
            for d in &st.disks {
                println!(
                    "  disk {:<6} {} of {}{}",
                    d.device,
                    crate::units::human_bytes(d.copied),
                    crate::units::human_bytes(d.total),
                    if d.ready { " (in sync)" } else { "" }
                );
            }
            if !st.compression.is_empty() && st.compression != "none" {
                println!(
                    "  compressed  {} on the wire ({})",
                    crate::units::human_bytes(st.wire_bytes),
                    st.compression
                );
            }
            if st.pass > 0 {
                let judged = match st.converging() {
                    Some(true) => ", converging",
                    Some(false) => ", NOT converging",
                    None => "",
                };
                println!(
                    "  pre-copy    pass {}, guest dirties {}/s, link carries {}/s{judged}",
                    st.pass,
                    crate::units::human_bytes(st.dirty_rate),
                    crate::units::human_bytes(st.link_rate()),
                );
            }
            if st.throttle_pct > 0 {
                println!("  throttle    {}% of the guest's CPU", st.throttle_pct);
            }
            if let Some(d) = st.expected_downtime_ms {
                println!("  expected    {d} ms downtime");
            }
            if let Some(d) = st.downtime_ms {
                println!("  downtime    {d} ms");
            }
            if let Some(e) = &st.error {
                println!("  error       {e}");
            }
        }
        None => {
            let list = match c.call(RequestBody::MigrationList, VM_TIMEOUT)? {
                ResponseBody::Migrations { migrations } => migrations,
                other => bail!("unexpected answer: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<32} {:<11} {:<20} {:<10} {:<8}",
                "MIGRATION", "ROLE", "VM", "STATE", "TRANSPORT"
            );
            for m in list {
                println!(
                    "{:<32} {:<11} {:<20} {:<10} {:<8}",
                    m.migration,
                    m.role,
                    m.vm,
                    m.status
                        .state
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| m.status.qemu_status.clone()),
                    m.status.transport.map(|t| t.as_str()).unwrap_or("-")
                );
            }
        }
    }
    Ok(())
}

fn vm_cmd(v: VmCommand) -> Result<()> {
    match v {
        VmCommand::Start {
            name,
            daemon,
            memory,
            cpus,
            kernel,
            initrd,
            append,
            disks,
            accel,
            machine,
        } => {
            let abs = |p: PathBuf| -> Result<String> {
                let p = std::fs::canonicalize(&p)
                    .with_context(|| format!("{} does not exist", p.display()))?;
                Ok(p.display().to_string())
            };
            let spec = VmSpec {
                name: VmName::new(name)?,
                memory_mib: parse_memory_mib(&memory).map_err(|e| anyhow!(e))?,
                cpus,
                kernel: kernel.map(abs).transpose()?,
                initrd: initrd.map(abs).transpose()?,
                append,
                disks: disks.into_iter().map(abs).collect::<Result<_>>()?,
                accel,
                machine,
            };
            spec.check().map_err(|e| anyhow!(e))?;
            let mut c = connect(&daemon)?;
            match c.call(RequestBody::VmStart { spec }, VM_TIMEOUT)? {
                ResponseBody::Vm { vm } => {
                    println!(
                        "VM '{}' started on {} (accel {}, machine {}, pid {}, state {}, serial log {})",
                        vm.spec.name,
                        c.peer(),
                        vm.spec.accel,
                        vm.spec.machine.as_deref().unwrap_or("q35"),
                        vm.pid.map(|p| p.to_string()).unwrap_or_default(),
                        vm.state,
                        vm.serial_log
                    );
                    if !vm.accel_reason.is_empty() {
                        println!("  accel: {}", vm.accel_reason);
                    }
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        VmCommand::List { daemon, json } => {
            let mut c = connect(&daemon)?;
            match c.call(RequestBody::VmList, VM_TIMEOUT)? {
                ResponseBody::Vms { vms } => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&vms)?);
                    } else {
                        println!(
                            "{:<20} {:<12} {:>8} {:>5} {:<5}",
                            "NAME", "STATE", "MEMORY", "CPUS", "ACCEL"
                        );
                        for vm in vms {
                            println!(
                                "{:<20} {:<12} {:>7}M {:>5} {:<5}",
                                vm.spec.name,
                                vm.state,
                                vm.spec.memory_mib,
                                vm.spec.cpus,
                                vm.spec.accel
                            );
                        }
                    }
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        VmCommand::Stop { name, daemon } => {
            let name = VmName::new(name)?;
            let mut c = connect(&daemon)?;
            c.call(RequestBody::VmStop { name: name.clone() }, VM_TIMEOUT)?;
            println!("VM '{name}' stopped");
        }
    }
    Ok(())
}
