//! Two test hosts reach each other over their veth (and n hosts over their bridge),
//! firewall rules load, captures see payloads, and everything is gone after drop.

use anyhow::{ensure, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use vmferry_testkit::capture::{file_contains, Capture};
use vmferry_testkit::netns::{Host, Hosts, TwoHosts};
use vmferry_testkit::require;

/// Listens on `server`'s address and `port` inside its namespace, connects from `client`,
/// sends `msg` and expects it echoed back. Every wait is bounded, so a blocked port fails
/// the call instead of leaving a thread behind.
fn echo_once(client: &Host, server: &Host, port: u16, msg: &[u8]) -> Result<()> {
    let addr = SocketAddr::from((server.ip, port));
    let listener = server.run(|| TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        s.write_all(&buf)
    });
    let got = client.run(|| -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(msg)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    });
    let served = echo
        .join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))?;
    let got = got??;
    served?;
    ensure!(got == msg, "echo mismatch");
    Ok(())
}

fn namespace_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn hosts_on_a_bridge_all_reach_each_other_and_vanish_on_drop() -> Result<()> {
    require::netns();
    let hosts = Hosts::new("bridge", 3)?;
    let ips: std::collections::HashSet<_> = hosts.hosts.iter().map(|h| h.ip).collect();
    ensure!(ips.len() == 3, "addresses not distinct: {ips:?}");
    echo_once(&hosts[0], &hosts[1], 5001, b"a to b")?;
    echo_once(&hosts[0], &hosts[2], 5002, b"a to c")?;
    echo_once(&hosts[2], &hosts[1], 5003, b"c to b")?;
    let mut sleeper = hosts[2].spawn_killable("sleep", ["1000"])?;
    let names: Vec<String> = hosts.hosts.iter().map(|h| h.name.clone()).collect();
    let hub = format!("{}hub", names[0].trim_end_matches('a'));
    ensure!(namespace_exists(&hub), "no hub namespace {hub}");
    drop(hosts);
    for n in names.iter().chain([&hub]) {
        ensure!(!namespace_exists(n), "namespace {n} survived the drop");
    }
    // The drop's SIGKILL leaves the namespace first and the process table a moment later
    // (a dying process quits its namespaces before it becomes a zombie to reap).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        if let Some(st) = sleeper.try_wait()? {
            break st;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "process in the namespace survived the drop"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    ensure!(!status.success(), "sleep should have been killed: {status}");
    ensure!(Hosts::new("bridge", 1).is_err(), "one host is no set");
    Ok(())
}

#[test]
fn hosts_reach_each_other_and_vanish_on_drop() -> Result<()> {
    require::netns();
    let hosts = TwoHosts::new("reach")?;
    ensure!(hosts.a.ip != hosts.b.ip);
    echo_once(&hosts.a, &hosts.b, 5001, b"a to b")?;
    echo_once(&hosts.b, &hosts.a, 5002, b"b to a")?;
    // A process left running inside is killed by the drop.
    let mut sleeper = hosts.a.spawn_killable("sleep", ["1000"])?;
    let names = (hosts.a.name.clone(), hosts.b.name.clone());
    ensure!(namespace_exists(&names.0) && namespace_exists(&names.1));
    drop(hosts);
    ensure!(
        !namespace_exists(&names.0) && !namespace_exists(&names.1),
        "namespaces survived the drop"
    );
    let status = sleeper
        .try_wait()?
        .context("process in the namespace survived")?;
    ensure!(!status.success(), "sleep should have been killed: {status}");
    Ok(())
}

#[test]
fn parallel_instances_get_distinct_names_and_subnets() -> Result<()> {
    require::netns();
    let (h1, h2) = (TwoHosts::new("par")?, TwoHosts::new("par")?);
    ensure!(h1.a.name != h2.a.name && h1.b.name != h2.b.name);
    ensure!(h1.a.ip != h2.a.ip);
    Ok(())
}

#[test]
fn nft_rules_load_inside_the_namespace() -> Result<()> {
    require::netns();
    require::command("nft");
    let hosts = TwoHosts::new("nft")?;
    echo_once(&hosts.a, &hosts.b, 5010, b"open")?;
    hosts.b.nft(
        "table inet vmferry_test {
            chain input {
                type filter hook input priority 0; policy accept;
                tcp dport 5010 reject with tcp reset
            }
        }",
    )?;
    let refused = echo_once(&hosts.a, &hosts.b, 5010, b"closed");
    ensure!(refused.is_err(), "the rule did not block port 5010");
    echo_once(&hosts.a, &hosts.b, 5011, b"still open")?;
    ensure!(hosts.b.nft("this is not nftables").is_err());
    Ok(())
}

#[test]
fn capture_records_a_payload_sent_across_the_veth() -> Result<()> {
    require::netns();
    require::command("tcpdump");
    const MARKER: &[u8] = b"<<vmferry-testkit-capture-marker-93be1d>>";
    let tmp = tempfile::tempdir()?;
    let hosts = TwoHosts::new("cap")?;
    let pcap = tmp.path().join("veth.pcap");
    let cap = Capture::start(&hosts.b, &hosts.b.iface, "tcp port 5020", &pcap)?;
    let payload: Vec<u8> = MARKER
        .iter()
        .copied()
        .cycle()
        .take(MARKER.len() * 20)
        .collect();
    echo_once(&hosts.a, &hosts.b, 5020, &payload)?;
    let path = cap.stop()?;
    ensure!(
        file_contains(&path, MARKER)?,
        "the capture misses the payload"
    );
    ensure!(!file_contains(&path, b"<<never-sent-0b5d>>")?);

    // Traffic outside the filter is not recorded.
    let pcap2 = tmp.path().join("filtered.pcap");
    let cap = Capture::start(&hosts.b, &hosts.b.iface, "tcp port 5021", &pcap2)?;
    echo_once(&hosts.a, &hosts.b, 5022, &payload)?;
    ensure!(!file_contains(&cap.stop()?, MARKER)?);
    Ok(())
}
