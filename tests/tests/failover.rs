//! An agent whose `[sync] central_addr` lists several addresses of one central moves to another
//! when the one in use is lost, tested with real processes:
//! - two UDP proxies in front of one central stand for two network paths; the proxy in use is cut off
//!   entirely (the node is gone), and the agent carries on through the other one;
//! - central SIGKILLed and started again on the same store at the list's second address: the
//!   agent finds it there on its own.
//!
//! In both, every milestone the agent acknowledged is in central's feed exactly once.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_tests::proxy::UdpProxy;
use outpost_tests::*;
use serde_json::Value;

const SITE: &str = "plant-1";
/// Patience for one failover: the idle timeout (2 s with `fast_agent_env`) plus a handshake,
/// with room for a busy 2-core machine. The measured figure is printed.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);

/// Fails unless every id in `acked` is in the feed exactly once and the feed holds nothing else
/// of the site.
async fn exactly_once(central: &Api, acked: &[String]) -> Result<()> {
    let counts = feed_counts(central, SITE).await?;
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "acknowledged {}, in the feed {}, missing {}, duplicated {}",
        acked.len(),
        counts.len(),
        missing.len(),
        duplicated.len()
    );
    if !missing.is_empty() || !duplicated.is_empty() || counts.len() != acked.len() {
        bail!(
            "missing {missing:?}, duplicated {duplicated:?}, feed holds {} ids for {} acknowledged",
            counts.len(),
            acked.len()
        );
    }
    Ok(())
}

/// Waits until the agent is connected through `addr`; returns how long that took.
async fn wait_connected_via(agent: &Api, addr: &str) -> Result<Duration> {
    let start = Instant::now();
    eventually(
        &format!("agent connected through {addr}"),
        FAILOVER_TIMEOUT,
        || async {
            let h = health(agent).await?;
            Ok((h["connected"] == Value::Bool(true) && h["central_addr"] == addr).then_some(()))
        },
    )
    .await?;
    Ok(start.elapsed())
}

/// Goal: with two addresses of one central, losing the one in use costs no acknowledged event
/// and the agent goes on through the other, within the idle timeout and a handshake; losing
/// that one too sends it back to the first. Method: central behind two UDP proxies; the agent's
/// `central_addr` lists both; milestones posted before, during and after each cut; the proxy in
/// use dropped entirely; health's `central_addr`, the switch counter and central's feed read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_address_is_left_for_the_next_one() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central_p = fleet.start_central_with(None, &fast_central_env())?;
    let central = Api::new(&central_p);
    let quic: std::net::SocketAddr = central_p.ready.quic.clone().context("quic")?.parse()?;
    let a = UdpProxy::start(quic, 1).await?;
    let b = UdpProxy::start(quic, 2).await?;
    let (addr_a, addr_b) = (a.addr().to_string(), b.addr().to_string());
    let agent_p = fleet.start_agent(SITE, &format!("{addr_a},{addr_b}"), &fast_agent_env())?;
    let agent = Api::new(&agent_p);
    wait_connected_via(&agent, &addr_a).await?;

    let mut acked = post_milestones(&agent, "first", 20).await?;
    wait_drained(&agent).await?;

    a.partition(true);
    acked.extend(post_milestones(&agent, "during-a", 10).await?);
    let took = wait_connected_via(&agent, &addr_b).await?;
    println!("failover a -> b: connected through b {took:?} after a was cut off");
    acked.extend(post_milestones(&agent, "on-b", 20).await?);
    wait_drained(&agent).await?;

    a.heal();
    b.partition(true);
    acked.extend(post_milestones(&agent, "during-b", 10).await?);
    let took = wait_connected_via(&agent, &addr_a).await?;
    println!("failover b -> a: connected through a {took:?} after b was cut off");
    wait_drained(&agent).await?;

    let h = health(&agent).await?;
    let switches = h["central_address_switches"].as_u64().context("switches")?;
    assert!(switches >= 2, "at least two switches counted: {h}");
    let metrics = agent
        .http
        .get(format!("{}/metrics", agent.base))
        .bearer_auth(&agent.token)
        .send()
        .await?
        .text()
        .await?;
    let line = format!("outpost_agent_central_address_switches_total {switches}");
    assert!(
        metrics.lines().any(|l| l == line),
        "{line} in /metrics:\n{metrics}"
    );
    exactly_once(&central, &acked).await
}

/// A free UDP port on loopback (bound and released; a test-only race, no one else binds here).
fn free_udp_addr() -> Result<String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.to_string())
}

/// Goal: a central process SIGKILLed and started again on the same store at the second listed
/// address is found there without touching the agent, with 0 lost and 0 duplicated. Method:
/// central on address 1; the agent lists address 1 and a free address 2; milestones acked;
/// central SIGKILLed; more milestones taken while no central runs; central started on the same
/// data directory listening on address 2; the agent reconnects there and drains; the feed is
/// read once each id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_killed_and_started_at_the_second_address_is_found() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let mut central_p = fleet.start_central_with(None, &fast_central_env())?;
    let first = central_p.ready.quic.clone().context("quic")?;
    let second = free_udp_addr()?;
    let agent_p = fleet.start_agent(SITE, &format!("{first},{second}"), &fast_agent_env())?;
    let agent = Api::new(&agent_p);
    wait_connected_via(&agent, &first).await?;
    let mut acked = post_milestones(&agent, "before", 20).await?;
    wait_drained(&agent).await?;

    central_p.kill9()?;
    acked.extend(post_milestones(&agent, "no-central", 15).await?);
    let mut env = fast_central_env();
    env.push(("OUTPOST_QUIC__LISTEN", second.clone()));
    env.push(("OUTPOST_API__LISTEN", central_p.ready.api.clone()));
    let started = Instant::now();
    let central_p2 = fleet.start_central_with(None, &env)?;
    let central = Api::new(&central_p2);
    wait_connected_via(&agent, &second).await?;
    println!(
        "connected at the second address {:?} after central started there",
        started.elapsed()
    );
    acked.extend(post_milestones(&agent, "after", 15).await?);
    wait_drained(&agent).await?;
    exactly_once(&central, &acked).await
}
