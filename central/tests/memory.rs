//! Central's memory limit (`quic.memory_limit_mib`), tested in its own process: central runs
//! in-process here and its resident size is this test binary's, so no other test may share the
//! process. I/O: real QUIC with mutual TLS on loopback.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost_central::certs;
use outpost_central::config::{
    AllowanceConfig, ApiClient, ApiConfig, CentralConfig, QuicConfig, Redacted, Role, sha256_hex,
};
use outpost_protocol::io::{read_frame, write_frame};
use outpost_protocol::{
    ALPN, AgentMsg, CentralMsg, EventBody, EventEnvelope, Hello, Milestone, MilestoneKind,
    PROTOCOL_VERSION,
};

const STEP: Duration = Duration::from_secs(10);
/// The smallest limit central accepts.
const LIMIT_MIB: u64 = 32;
/// Touched memory that takes the process well over the limit.
const BALLAST_MIB: usize = 96;
/// Attempts (one every `POLL`) before a condition is declared never met.
const ATTEMPTS: usize = 40;
const POLL: Duration = Duration::from_millis(250);

fn client_endpoint(dir: &Path, site: &str) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs::load_certs(&dir.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let chain = certs::load_certs(&dir.join(format!("{site}.pem"))).unwrap();
    let key = certs::load_key(&dir.join(format!("{site}.key"))).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

fn hello(site: &str) -> AgentMsg {
    AgentMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        site: site.into(),
        master_rev: 0,
        last_seq: 0,
        agent_time_ms: 0,
        acked_seq: 0,
        retained_from_seq: 0,
        central_incarnation: 0,
    })
}

/// A new connection of `site` with its Hello: whether central welcomed it (bounded).
async fn welcomed(dir: &Path, quic: std::net::SocketAddr, site: &str) -> bool {
    let ep = client_endpoint(dir, site);
    let attempt = async {
        let conn = ep
            .connect(quic, certs::DEFAULT_CENTRAL_NAME)
            .ok()?
            .await
            .ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        write_frame(&mut send, &hello(site)).await.ok()?;
        let msg = read_frame::<CentralMsg, _>(&mut recv).await.ok()??;
        conn.close(0u32.into(), b"done");
        Some(matches!(msg, CentralMsg::Welcome(_)))
    };
    let ok = tokio::time::timeout(STEP, attempt).await.ok().flatten() == Some(true);
    let _ = tokio::time::timeout(STEP, ep.wait_idle()).await;
    ok
}

async fn until_welcomed_is(dir: &Path, quic: std::net::SocketAddr, want: bool) {
    for _ in 0..ATTEMPTS {
        if welcomed(dir, quic, "plant-2").await == want {
            return;
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        tokio::time::sleep(POLL).await;
    }
    panic!(
        "a new connection was never {}",
        if want { "welcomed" } else { "refused" }
    );
}

/// Goal: while central's resident memory is above `quic.memory_limit_mib`, new connections are
/// refused and live sessions go on; back under the limit, connections are accepted again.
/// Method: central with the smallest limit (32 MiB) in this process; a session is welcomed;
/// then the test touches 96 MiB so that the process is over the limit, polls (bounded) until a
/// new connection is refused, checks the live session still gets its ack, frees the memory and
/// polls (bounded) until a new connection is welcomed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_memory_limit_new_connections_are_refused_and_live_sessions_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    certs::create_ca(&dir, false).unwrap();
    certs::issue_central(&dir, &dir, certs::DEFAULT_CENTRAL_NAME, false).unwrap();
    for site in ["plant-1", "plant-2"] {
        certs::issue_site(&dir, site, &dir, false).unwrap();
    }
    let cfg = CentralConfig {
        data_dir: tmp.path().join("data"),
        api: ApiConfig {
            listen: "127.0.0.1:0".into(),
            tokens: vec![ApiClient {
                name: "admin".into(),
                role: Role::Admin,
                sha256: Redacted::new(sha256_hex("memory-test-token-0123456789")),
            }],
            token: None,
            max_body_bytes: 1 << 20,
        },
        quic: QuicConfig {
            memory_limit_mib: LIMIT_MIB,
            ..QuicConfig::with_defaults(
                "127.0.0.1:0",
                dir.join("ca.pem"),
                dir.join("central.pem"),
                dir.join("central.key"),
            )
        },
        allowance: AllowanceConfig::default(),
        health: Default::default(),
        log: Default::default(),
        renewal: Default::default(),
    };
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    let ready_path = cfg.ready_path();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(outpost_central::run::serve(cfg, async move {
        let _ = stop_rx.await;
    }));
    let ready: serde_json::Value = tokio::time::timeout(STEP, async {
        loop {
            if let Ok(b) = std::fs::read(&ready_path)
                && let Ok(v) = serde_json::from_slice(&b)
            {
                return v;
            }
            // Poll interval of the bounded wait around it, not a wait for a condition by itself.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("ready.json appears");
    let quic: std::net::SocketAddr = ready["quic"].as_str().unwrap().parse().unwrap();

    let ep = client_endpoint(&dir, "plant-1");
    let conn = tokio::time::timeout(STEP, ep.connect(quic, certs::DEFAULT_CENTRAL_NAME).unwrap())
        .await
        .unwrap()
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &hello("plant-1")).await.unwrap();
    let msg = tokio::time::timeout(STEP, read_frame::<CentralMsg, _>(&mut recv))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(msg, Some(CentralMsg::Welcome(_))), "{msg:?}");
    until_welcomed_is(&dir, quic, true).await;

    // Every page written, so that it counts in the resident set.
    let ballast = vec![1u8; BALLAST_MIB * 1024 * 1024];
    assert_eq!(ballast[ballast.len() / 2], 1);
    until_welcomed_is(&dir, quic, false).await;

    let event = EventEnvelope::new(
        "plant-1",
        1,
        "plant-1-scan-1",
        1_767_225_600_000,
        &EventBody::Milestone(Milestone {
            shipment_id: "SH-1".into(),
            milestone: MilestoneKind::Picked,
            scanner_id: "scanner-1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        }),
    );
    write_frame(&mut send, &AgentMsg::Events(vec![event]))
        .await
        .unwrap();
    let ack = loop {
        let msg = tokio::time::timeout(STEP, read_frame::<CentralMsg, _>(&mut recv))
            .await
            .expect("central answers the live session in time")
            .unwrap()
            .unwrap();
        if !matches!(msg, CentralMsg::Master(_)) {
            break msg;
        }
    };
    assert_eq!(
        ack,
        CentralMsg::Ack { through_seq: 1 },
        "the live session goes on"
    );

    drop(ballast);
    until_welcomed_is(&dir, quic, true).await;
    conn.close(0u32.into(), b"done");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("central stops in time")
        .unwrap()
        .expect("clean shutdown");
}
