//! The daemon as a system service: its Prometheus endpoint read by a real text-format
//! parser, JSON log lines, the one audit line each daemon writes for a migration that
//! ended, and the systemd unit in dist/ as `systemd-analyze verify` sees it.

mod common;

use anyhow::{anyhow, bail, Context, Result};
use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use vmferry_testkit::ports::free_port;
use vmferry_testkit::qemu::{start_qemu, QemuOpts};
use vmferry_testkit::require;

/// One scrape: the page parsed by `prometheus-parse`.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    /// `GET /metrics` over plain HTTP, and the body parsed.
    fn take(addr: &str) -> Result<Scrape> {
        let mut c = std::net::TcpStream::connect(addr).with_context(|| format!("dial {addr}"))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut reply = String::new();
        c.read_to_string(&mut reply)?;
        let (head, body) = reply
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP head in {reply:?}"))?;
        if !head.starts_with("HTTP/1.1 200 ") {
            bail!("scrape of {addr}: {head}");
        }
        let lines = body.lines().map(|l| Ok(l.to_string()));
        Ok(Scrape(prometheus_parse::Scrape::parse(lines)?))
    }

    /// The value of the sample `name` whose labels include `labels`; counters and gauges
    /// alike (the parser reads an OpenMetrics counter, named `X_total` under `# TYPE X`,
    /// as untyped).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        use prometheus_parse::Value;
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .find_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    /// How many observations the histogram `name` with `labels` holds.
    fn observations(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(b) => b
                    .iter()
                    .find(|h| h.less_than.is_infinite())
                    .map(|h| h.count),
                _ => None,
            })
    }
}

/// The daemon's log, which `--log-format json` makes one JSON object per line.
fn json_lines(log: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(log)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON log line: {l}")))
        .collect()
}

/// Where a daemon serves its metrics, from its log (it was told `--metrics 127.0.0.1:0`,
/// so no port is guessed and tests may run side by side).
fn metrics_address(d: &DaemonProc) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = json_lines(&d.log)?
            .iter()
            .find_map(|l| l["fields"]["metrics"].as_str().map(str::to_string));
        if let Some(a) = found {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon never said where its metrics are: {}",
                d.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The audit log's `migration` `result` lines.
fn result_lines(state_dir: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(state_dir.join("audit.log"))?;
    let mut out = Vec::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if v["what"] == "migration" && v["op"] == "result" {
            out.push(v);
        }
    }
    Ok(out)
}

#[test]
fn metrics_json_logs_and_audit_lines_follow_a_migration() -> Result<()> {
    require::qemu();
    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("certs");
    let o = run({
        let mut c = vmferry();
        c.args(["certs", "init", "--dir"]).arg(&certs);
        c
    });
    assert!(o.status.success(), "{}", text(&o));
    let o = run({
        let mut c = vmferry();
        c.args(["certs", "issue", "--dir"]).arg(&certs).args([
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
        ]);
        c
    });
    assert!(o.status.success(), "{}", text(&o));
    let (a, b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let flags = ["--metrics", "127.0.0.1:0", "--log-format", "json"];
    let (sa, sb) = (tmp.path().join("a"), tmp.path().join("b"));
    let da = DaemonProc::start(None, &a, &sa, &certs, &flags)?;
    let db = DaemonProc::start(None, &b, &sb, &certs, &flags)?;
    let (ma, mb) = (metrics_address(&da)?, metrics_address(&db)?);

    let before = Scrape::take(&ma)?;
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(before.value("vmferry_build_info", &version), Some(1.0));
    for role in ["source", "destination"] {
        let r = [("role", role)];
        assert_eq!(before.value("vmferry_migrations_in_flight", &r), Some(0.0));
    }

    // A paused guest: nothing dirties its memory, so it crosses in well under a second.
    let mut o = QemuOpts::new(tmp.path().join("src.qmp"), tmp.path().join("src.serial"));
    o.memory_mib = 64;
    o.paused = true;
    let src = start_qemu(&o)?;
    let mut o = QemuOpts::new(tmp.path().join("dst.qmp"), tmp.path().join("dst.serial"));
    o.memory_mib = 64;
    o.incoming = Some("defer".into());
    let dst = start_qemu(&o)?;
    let mut c = vmferry();
    c.args(["migrate", "--from", &a, "--to", &b, "--src-qmp"])
        .arg(&src.qmp)
        .arg("--dst-qmp")
        .arg(&dst.qmp)
        .arg("--certs")
        .arg(&certs)
        .args(["--transport", "direct"]);
    let o = run(c);
    assert!(o.status.success(), "migrate: {}", text(&o));

    for (addr, role) in [(&ma, "source"), (&mb, "destination")] {
        let s = Scrape::take(addr)?;
        let this = [("role", role), ("transport", "direct")];
        let count = |name| s.value(name, &this);
        assert_eq!(
            count("vmferry_migrations_started_total"),
            Some(1.0),
            "{role}"
        );
        assert_eq!(
            count("vmferry_migrations_completed_total"),
            Some(1.0),
            "{role}"
        );
        assert_eq!(
            count("vmferry_migrations_failed_total"),
            Some(0.0),
            "{role}"
        );
        let bytes = count("vmferry_migration_bytes_total").unwrap_or(0.0);
        assert!(bytes > 0.0, "{role}: no bytes counted");
        assert_eq!(
            s.value("vmferry_migrations_in_flight", &[("role", role)]),
            Some(0.0),
            "{role}"
        );
    }
    let s = Scrape::take(&ma)?;
    let direct = [("transport", "direct")];
    assert_eq!(
        s.observations("vmferry_migration_duration_seconds", &direct),
        Some(1.0)
    );
    assert_eq!(
        s.observations("vmferry_migration_downtime_seconds", &direct),
        Some(1.0)
    );

    // One result line on each daemon, saying who moved which VM from where to where.
    for (state, role) in [(&sa, "source"), (&sb, "destination")] {
        let lines = result_lines(state)?;
        assert_eq!(lines.len(), 1, "{role}: {lines:?}");
        let l = &lines[0];
        assert_eq!(l["outcome"], "completed", "{l}");
        assert_eq!(l["role"], role, "{l}");
        assert_eq!(l["transport"], "direct", "{l}");
        assert_eq!(l["from"], a.as_str(), "{l}");
        assert_eq!(l["to"], b.as_str(), "{l}");
        assert_eq!(l["scheme"], "x509", "{l}");
        assert!(l["who"].as_str().is_some_and(|w| w.contains("CN=")), "{l}");
        let qmp = if role == "source" { &src.qmp } else { &dst.qmp };
        let vm = l["vm"].as_str().unwrap_or_default();
        assert!(vm.contains(&qmp.display().to_string()), "{l}");
        assert!(l["subject"].as_str().is_some_and(|m| !m.is_empty()), "{l}");
    }

    // A migration the destination refuses (its QEMU does not wait for one): the source
    // rolls back, counts a failure before any channel and says why; the destination
    // never held it.
    let mut o = QemuOpts::new(tmp.path().join("src2.qmp"), tmp.path().join("src2.serial"));
    o.memory_mib = 64;
    o.paused = true;
    let src2 = start_qemu(&o)?;
    let mut o = QemuOpts::new(tmp.path().join("dst2.qmp"), tmp.path().join("dst2.serial"));
    o.memory_mib = 64;
    o.paused = true;
    let dst2 = start_qemu(&o)?;
    let mut c = vmferry();
    c.args(["migrate", "--from", &a, "--to", &b, "--src-qmp"])
        .arg(&src2.qmp)
        .arg("--dst-qmp")
        .arg(&dst2.qmp)
        .arg("--certs")
        .arg(&certs);
    let o = run(c);
    assert!(
        !o.status.success(),
        "migrate to a QEMU not waiting: {}",
        text(&o)
    );
    let s = Scrape::take(&ma)?;
    let none = [("role", "source"), ("transport", "none")];
    assert_eq!(s.value("vmferry_migrations_failed_total", &none), Some(1.0));
    assert_eq!(
        s.value("vmferry_migrations_in_flight", &[("role", "source")]),
        Some(0.0)
    );
    let lines = result_lines(&sa)?;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let l = &lines[1];
    assert_eq!(l["outcome"], "failed", "{l}");
    assert_eq!(l["transport"], "none", "{l}");
    assert!(
        l["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rolled back by the controller")),
        "{l}"
    );
    assert_eq!(result_lines(&sb)?.len(), 1, "the destination never held it");

    // Every line the daemons logged is a JSON object with a level and a time; the
    // audit events among them keep their target.
    for d in [&da, &db] {
        let lines = json_lines(&d.log)?;
        assert!(!lines.is_empty());
        for l in &lines {
            assert!(l["level"].is_string() && l["timestamp"].is_string(), "{l}");
        }
        assert!(lines.iter().any(|l| l["target"] == "audit"), "{lines:?}");
    }
    Ok(())
}

/// `dist/vmferry.service` as systemd reads it. `verify` insists that ExecStart's program
/// exists, so it checks a copy that runs the vmferry just built; everything else is the
/// file as shipped.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() -> Result<()> {
    require::command("systemd-analyze");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/vmferry.service");
    let unit = std::fs::read_to_string(&shipped)?;
    let exec = "ExecStart=/usr/local/bin/vmferry serve --config /etc/vmferry/config.toml\n";
    assert!(unit.contains(exec), "the unit must start {exec}");
    for line in [
        "Restart=on-failure\n",
        "KillMode=process\n",
        "NoNewPrivileges=yes\n",
        "ProtectSystem=strict\n",
        "ReadWritePaths=/var/lib/vmferry /run/vmferry\n",
        "PrivateTmp=yes\n",
        "ProtectHome=yes\n",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}");
    }
    assert!(
        unit.lines()
            .any(|l| l.starts_with("CapabilityBoundingSet=") && !l.contains("CAP_SYS_ADMIN")),
        "the unit must bound its capabilities, without CAP_SYS_ADMIN"
    );
    let tmp = tempfile::tempdir()?;
    let copy = tmp.path().join("vmferry.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/vmferry", BIN))?;
    let o = run({
        let mut c = std::process::Command::new("systemd-analyze");
        c.args(["verify", "--man=no", "--recursive-errors=no"])
            .arg(&copy);
        c
    });
    // A directive systemd cannot parse is only a warning (exit 0 on older systemd):
    // any word about our unit fails the test too.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !stderr.contains("vmferry.service"),
        "systemd-analyze verify: {}",
        text(&o)
    );
    Ok(())
}
