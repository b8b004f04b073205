//! Protocol compatibility across one release: this central with an agent of the previous release
//! (a client speaking the frozen protocol 3 definitions, `outpost_protocol::v3`), this agent with
//! a central that only speaks protocol 3 (`[quic] protocol_version_max = 3`), and a peer two
//! versions away refused at the handshake with the reason.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use outpost_protocol::v3;
use outpost_protocol::{Hello, PROTOCOL_VERSION};
use outpost_tests::quic_client::{client_config_alpn, milestone_event, open, read_cert as read};
use outpost_tests::*;
use serde_json::Value;

/// The fleet view of one site.
async fn fleet_site(central: &Api, site: &str) -> Result<Value> {
    let r = central.get(&format!("/v1/fleet/{site}")).await?;
    ensure!(r.status == 200, "fleet view: {} {}", r.status, r.body);
    Ok(r.body)
}

fn v3_hello(site: &str, last_seq: u64) -> v3::AgentMsg {
    v3::AgentMsg::Hello(Hello {
        protocol_version: v3::PROTOCOL_VERSION,
        agent_version: "previous-release".into(),
        site: site.into(),
        master_rev: 0,
        last_seq,
        agent_time_ms: 0,
        acked_seq: 0,
        retained_from_seq: 1,
        central_incarnation: 0,
    })
}

/// Receives protocol 3 messages until one that is not master data.
async fn v3_recv(s: &mut outpost_tests::quic_client::Session) -> Result<v3::CentralMsg> {
    for _ in 0..10_000 {
        match s.recv_as::<v3::CentralMsg>().await? {
            v3::CentralMsg::Master(_) => continue,
            other => return Ok(other),
        }
    }
    bail!("only master frames from central")
}

/// Goal: an agent of the previous release (protocol 3, frozen message definitions) gets a
/// protocol 3 session from this central, uploads, is acknowledged, and its events reach the
/// feed; the fleet view says which protocol the site speaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_the_previous_release_syncs_with_this_central() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let capi = Api::new(&central);
    let addr: SocketAddr = central.ready.quic.clone().context("quic")?.parse()?;
    let cfg = client_config_alpn(
        &read(fleet.path(), "ca.pem")?,
        &read(fleet.path(), "plant-1.pem")?,
        &read(fleet.path(), "plant-1.key")?,
        vec![v3::ALPN.to_vec()],
    )?;
    let mut s = open(addr, cfg).await?;
    s.send_as(&v3_hello("plant-1", 2)).await?;
    let welcome = match v3_recv(&mut s).await? {
        v3::CentralMsg::Welcome(w) => w,
        other => bail!("expected a Welcome, got {other:?}"),
    };
    assert_eq!(
        welcome.protocol_version, 3,
        "central answers in the agent's version"
    );
    assert_eq!(welcome.acked_seq, 0);
    let events = vec![
        milestone_event("plant-1", 1, "old-agent-1"),
        milestone_event("plant-1", 2, "old-agent-2"),
    ];
    s.send_as(&v3::AgentMsg::Events(events)).await?;
    match v3_recv(&mut s).await? {
        v3::CentralMsg::Ack { through_seq } => assert_eq!(through_seq, 2),
        other => bail!("expected an Ack, got {other:?}"),
    }
    let feed = read_feed(&capi).await?;
    let ids: Vec<&str> = feed.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids, ["old-agent-1", "old-agent-2"], "feed: {feed:?}");
    let site = fleet_site(&capi, "plant-1").await?;
    assert_eq!(site["protocol_version"], 3, "{site}");

    // Protocol 4's renewal request is not part of a protocol 3 session.
    s.send(&outpost_protocol::AgentMsg::RenewCertificate {
        csr_der: vec![0; 16],
    })
    .await?;
    match v3_recv(&mut s).await? {
        v3::CentralMsg::Refuse(r) => {
            assert_eq!(r.code, outpost_protocol::RefuseCode::ProtocolViolation);
            assert!(r.reason.contains("protocol 3"), "{}", r.reason);
        }
        other => bail!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

/// Goal: this agent, facing a central of the previous release (one that offers only protocol
/// 3), settles on protocol 3, syncs, and does not ask for a certificate renewal the old central
/// could not read, even when one is due. Positive control: with a central of this release the
/// same agent speaks the current version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_agent_falls_back_to_a_central_of_the_previous_release() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central_with(
        None,
        &[("OUTPOST_QUIC__PROTOCOL_VERSION_MAX", "3".to_string())],
    )?;
    let capi = Api::new(&central);
    let quic = central.ready.quic.clone().context("quic")?;
    // Due for renewal at once: the dev fleet's certificates are valid for a year.
    let renew_now = [("OUTPOST_SYNC__RENEW_BEFORE_DAYS", "400".to_string())];
    let mut agent = fleet.start_agent("plant-1", &quic, &renew_now)?;
    let aapi = Api::new(&agent);
    wait_connected(&aapi, true).await?;
    let h = health(&aapi).await?;
    assert_eq!(h["protocol_version"], 3, "{h}");
    let ids = post_milestones(&aapi, "fallback", 3).await?;
    wait_drained(&aapi).await?;
    let feed = read_feed(&capi).await?;
    for id in &ids {
        ensure!(
            feed.iter().any(|e| e["id"] == id.as_str()),
            "{id} not in the feed"
        );
    }
    let h = health(&aapi).await?;
    assert_eq!(h["certificate"]["renewals"], 0, "{h}");
    assert_eq!(h["certificate"]["last_renewal_error"], Value::Null, "{h}");
    assert_eq!(fleet_site(&capi, "plant-1").await?["protocol_version"], 3);
    agent.terminate()?;

    // The same agent and a central of this release: the current version.
    let mut central = central;
    let ready = central.ready.clone();
    central.terminate()?;
    let central = fleet.start_central(Some(&ready))?;
    let agent = fleet.start_agent("plant-1", &quic, &[])?;
    let aapi = Api::new(&agent);
    wait_connected(&aapi, true).await?;
    assert_eq!(health(&aapi).await?["protocol_version"], PROTOCOL_VERSION);
    assert_eq!(
        fleet_site(&Api::new(&central), "plant-1").await?["protocol_version"],
        PROTOCOL_VERSION
    );
    Ok(())
}

/// Goal: a peer that speaks no version this build speaks (here protocol 2) is refused in the TLS
/// handshake, with a reason naming the cause, and gets no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_two_versions_away_is_refused_at_the_handshake() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let addr: SocketAddr = central.ready.quic.clone().context("quic")?.parse()?;
    let cfg = client_config_alpn(
        &read(fleet.path(), "ca.pem")?,
        &read(fleet.path(), "plant-1.pem")?,
        &read(fleet.path(), "plant-1.key")?,
        vec![b"outpost/2".to_vec()],
    )?;
    let refused = async {
        let mut s = open(addr, cfg).await?;
        s.send(&outpost_tests::quic_client::hello("plant-1", 2, 0))
            .await?;
        s.recv().await
    };
    match tokio::time::timeout(Duration::from_secs(20), refused).await? {
        Ok(m) => panic!("central answered a protocol 2 peer with {m:?}"),
        Err(e) => {
            let text = format!("{e:#}").to_lowercase();
            assert!(
                text.contains("any known protocol") || text.contains("application protocol"),
                "the refusal names the cause: {text}"
            );
        }
    }
    Ok(())
}
