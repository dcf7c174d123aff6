//! End to end: firewalls decide the transport. Two hosts (network namespaces joined by a
//! veth pair) with real nftables rules inside them; each daemon serves control on :4700
//! and data on :4701; a live guest with 4 multifd channels migrates under `--transport
//! auto`, which must pick the cheapest transport the rules allow, say why it passed over
//! the others, and keep the guest counting. The controller talks to both daemons over
//! their unix sockets, so the rules only concern what the daemons send each other.

mod common;

use anyhow::Result;
use common::live::*;
use common::*;
use std::time::{Duration, Instant};
use vmferry_testkit::require;
use vmferry_testkit::serial::{heartbeats, wait_for_heartbeat};

/// Drops every inbound connection but the control port's (established traffic flows).
const INBOUND_CONTROL_PORT_ONLY: &str = "
table inet vmferry_test {
    chain input {
        type filter hook input priority 0; policy drop;
        iif lo accept
        ct state established,related accept
        tcp dport 4700 accept
    }
}
";

/// Inbound as above, and outbound only to a control port: one port, nothing else.
const CONTROL_PORT_BOTH_WAYS: &str = "
table inet vmferry_test {
    chain input {
        type filter hook input priority 0; policy drop;
        iif lo accept
        ct state established,related accept
        tcp dport 4700 accept
    }
    chain output {
        type filter hook output priority 0; policy drop;
        oif lo accept
        ct state established,related accept
        tcp dport 4700 accept
    }
}
";

/// Nothing leaves or enters but on loopback.
const EVERYTHING_BLOCKED: &str = "
table inet vmferry_test {
    chain input {
        type filter hook input priority 0; policy drop;
        iif lo accept
    }
    chain output {
        type filter hook output priority 0; policy drop;
        oif lo accept
    }
}
";

fn setup_two_ports(tag: &str) -> Result<Setup> {
    setup_with(tag, Some(4701))
}

/// Migrates guest `name` a → b through the daemons' unix sockets with `--transport
/// auto --multifd 4`; returns the output.
fn migrate_auto(s: &Setup, name: &str) -> std::process::Output {
    let mut c = vmferry();
    c.args(["migrate", name, "--from"])
        .arg(s.da.state_dir.join("control.sock"))
        .arg("--to")
        .arg(s.db.state_dir.join("control.sock"))
        .args(["--transport", "auto", "--multifd", "4", "--json"]);
    run(c)
}

/// Runs a live migration under `rules` (loaded into the hosts `on`) and checks that
/// `auto` used `expected`, naming each transport it passed over, and that the guest
/// goes on counting on host b.
fn live_migration_under(
    tag: &str,
    rules: &str,
    on: &[char],
    expected: &str,
    passed_over: &[&str],
) -> Result<()> {
    if !on.is_empty() {
        require::command("nft");
    }
    let s = setup_two_ports(tag)?;
    let (_pid, src_log) = start_guest(&s, "fw")?;
    let before = wait_for_heartbeat(&src_log, 3, Duration::from_secs(90))?;
    for h in on {
        match h {
            'a' => s.hosts.a.nft(rules)?,
            _ => s.hosts.b.nft(rules)?,
        }
    }
    let o = migrate_auto(&s, "fw");
    assert!(o.status.success(), "migrate: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let result: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a result line"))?;
    assert_eq!(result["transport"], expected, "{result}");
    assert_eq!(result["streams"], 5, "{result}");
    let notes: Vec<String> = result["transport_notes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(notes.len(), passed_over.len(), "{notes:?}");
    for (note, t) in notes.iter().zip(passed_over) {
        assert!(note.starts_with(&format!("{t}: ")), "{notes:?}");
    }
    // `vmferry status` on the source says the same, after the fact.
    let id = result["migration"].as_str().expect("migration id");
    let st = run({
        let mut c = vmferry();
        c.args(["status", id, "--daemon"])
            .arg(s.da.state_dir.join("control.sock"));
        c
    });
    let st_out = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success(), "status: {}", text(&st));
    assert!(st_out.contains("state       completed"), "{st_out}");
    assert!(
        st_out.contains(&format!("transport   {expected} (5 streams)")),
        "{st_out}"
    );
    for t in passed_over {
        assert!(st_out.contains(&format!("passed over {t}: ")), "{st_out}");
    }

    let dst_log = s.db.state_dir.join("vms/fw/serial.log");
    wait_for_heartbeat(&dst_log, before + 3, Duration::from_secs(60))?;
    let first = *heartbeats(&dst_log).first().expect("beats on b");
    assert!(
        first >= before,
        "the guest restarted counting at {first} on b"
    );
    Ok(())
}

#[test]
fn with_everything_open_auto_goes_direct() -> Result<()> {
    live_migration_under("tdirect", "", &[], "direct", &[])
}

#[test]
fn a_destination_open_only_on_its_control_port_is_reached_in_reverse() -> Result<()> {
    live_migration_under(
        "treverse",
        INBOUND_CONTROL_PORT_ONLY,
        &['b'],
        "reverse",
        &["direct"],
    )
}

#[test]
fn with_one_control_port_and_nothing_else_the_stream_rides_the_tunnel() -> Result<()> {
    live_migration_under(
        "ttunnel",
        CONTROL_PORT_BOTH_WAYS,
        &['a', 'b'],
        "tunnel",
        &["direct", "reverse"],
    )
}

#[test]
fn with_everything_blocked_auto_fails_in_bounded_time_naming_each_attempt() -> Result<()> {
    require::command("nft");
    let s = setup_two_ports("tblocked")?;
    let (src_pid, src_log) = start_guest(&s, "fw")?;
    wait_for_heartbeat(&src_log, 2, Duration::from_secs(90))?;
    s.hosts.a.nft(EVERYTHING_BLOCKED)?;
    s.hosts.b.nft(EVERYTHING_BLOCKED)?;
    let started = Instant::now();
    let o = migrate_auto(&s, "fw");
    let took = started.elapsed();
    assert!(!o.status.success(), "migrate must fail: {}", text(&o));
    // auto gives each transport 2 s to connect: about 10 s in all here. A controller
    // that waited on its request timeouts instead (25 s an attempt with 5 streams) or
    // not at all would take 75 s or more; 60 s leaves a loaded machine room.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    for t in ["direct: ", "reverse: ", "tunnel: "] {
        assert!(err.contains(t), "no word on {t}: {err}");
    }
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("source VM keeps running"), "{err}");
    assert!(pid_alive(src_pid));
    let last = *heartbeats(&src_log).last().expect("beats");
    wait_for_heartbeat(&src_log, last + 2, Duration::from_secs(30))?;
    Ok(())
}
