//! Central's sync server end to end, in process: a real QUIC + mutual TLS connection from a
//! test client holding a site certificate, real HTTP calls to the API. Checks the session
//! contract: Welcome with the durable mark, ack after commit, duplicate re-upload stored once,
//! a bad event dead-lettered without failing its batch, master push filtered per site (grants
//! included), allowance requests answered and their grant pushed, identity from the certificate,
//! supersede, clean shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_central::certs;
use outpost_central::config::{
    AllowanceConfig, ApiClient, ApiConfig, CentralConfig, QuicConfig, Redacted, Role, sha256_hex,
};
use outpost_protocol::io::{read_frame, write_frame};
use outpost_protocol::{
    ALPN, AgentMsg, CentralMsg, EventBody, EventEnvelope, Grant, Hello, MasterChange, Milestone,
    MilestoneKind, PROTOCOL_VERSION, Pool, RefuseCode,
};
use serde_json::{Value, json};

const TOKEN: &str = "sync-test-token-0123456789abcdef";
const STEP: Duration = Duration::from_secs(10);

struct Central {
    dir: tempfile::TempDir,
    api: String,
    quic: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), outpost_central::run::ServeError>>,
    http: reqwest::Client,
}

impl Central {
    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.api))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn put(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .put(format!("{}{path}", self.api))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.json().await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("central stops in time")
            .unwrap()
            .expect("clean shutdown");
        assert!(
            !self.dir.path().join("data/ready.json").exists(),
            "ready.json removed on clean shutdown"
        );
    }
}

async fn start_central() -> Central {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::create_ca(&certs_dir, false).unwrap();
    certs::issue_central(&certs_dir, &certs_dir, certs::DEFAULT_CENTRAL_NAME, false).unwrap();
    for site in ["plant-1", "plant-2"] {
        certs::issue_site(&certs_dir, site, &certs_dir, false).unwrap();
    }
    let cfg = CentralConfig {
        data_dir: dir.path().join("data"),
        api: ApiConfig {
            listen: "127.0.0.1:0".into(),
            tokens: vec![ApiClient {
                name: "admin".into(),
                role: Role::Admin,
                sha256: Redacted::new(sha256_hex(TOKEN)),
            }],
            token: None,
            max_body_bytes: 1 << 20,
        },
        quic: QuicConfig {
            idle_timeout_ms: 3000,
            keep_alive_ms: 500,
            ..QuicConfig::with_defaults(
                "127.0.0.1:0",
                certs_dir.join("ca.pem"),
                certs_dir.join("central.pem"),
                certs_dir.join("central.key"),
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
    let ready: Value = tokio::time::timeout(STEP, async {
        loop {
            if let Ok(b) = std::fs::read(&ready_path)
                && let Ok(v) = serde_json::from_slice::<Value>(&b)
            {
                return v;
            }
            // Poll interval of the bounded wait around it, not a wait for a condition by itself.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("ready.json appears");
    assert_eq!(ready["pid"], std::process::id());
    Central {
        api: format!("http://{}", ready["api"].as_str().unwrap()),
        quic: ready["quic"].as_str().unwrap().parse().unwrap(),
        dir,
        stop: Some(stop),
        task,
        http: reqwest::Client::new(),
    }
}

fn client_endpoint(ca_dir: &Path, cert_dir: &Path, site: &str) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs::load_certs(&ca_dir.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let chain = certs::load_certs(&cert_dir.join(format!("{site}.pem"))).unwrap();
    let key = certs::load_key(&cert_dir.join(format!("{site}.key"))).unwrap();
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

struct Agent {
    _ep: quinn::Endpoint,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Agent {
    async fn connect(central: &Central, site: &str) -> Agent {
        Self::connect_with(central, &central.certs(), site).await
    }

    async fn connect_with(central: &Central, cert_dir: &Path, site: &str) -> Agent {
        let ep = client_endpoint(&central.certs(), cert_dir, site);
        let conn = tokio::time::timeout(
            STEP,
            ep.connect(central.quic, certs::DEFAULT_CENTRAL_NAME)
                .unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Agent {
            _ep: ep,
            _conn: conn,
            send,
            recv,
        }
    }

    async fn send(&mut self, msg: AgentMsg) {
        write_frame(&mut self.send, &msg).await.unwrap();
    }

    async fn hello(&mut self, site: &str, master_rev: u64, last_seq: u64) -> CentralMsg {
        self.send(AgentMsg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            site: site.into(),
            master_rev,
            last_seq,
            agent_time_ms: 0,
            acked_seq: 0,
            retained_from_seq: 0,
            central_incarnation: 0,
        }))
        .await;
        self.recv().await
    }

    async fn recv(&mut self) -> CentralMsg {
        tokio::time::timeout(STEP, read_frame::<CentralMsg, _>(&mut self.recv))
            .await
            .expect("central answers in time")
            .expect("a well-formed frame")
            .expect("not end of stream")
    }
}

fn milestone(site: &str, seq: u64) -> EventEnvelope {
    EventEnvelope::new(
        site,
        seq,
        &format!("{site}-scan-{seq}"),
        1_767_225_600_000,
        &EventBody::Milestone(Milestone {
            shipment_id: "SH-1".into(),
            milestone: MilestoneKind::Picked,
            scanner_id: "scanner-1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        }),
    )
}

/// Reads Master frames until the agent is at `want`; returns the changes received.
async fn master_through(a: &mut Agent, mut at: u64, want: u64) -> Vec<MasterChange> {
    let mut got = Vec::new();
    while at < want {
        match a.recv().await {
            CentralMsg::Master(m) => {
                assert_eq!(m.from_rev, at, "batches are contiguous");
                at = m.through_rev;
                got.extend(m.changes);
            }
            other => panic!("expected Master, got {other:?}"),
        }
    }
    assert_eq!(at, want);
    got
}

fn expect_refuse(msg: CentralMsg, code: RefuseCode) {
    match msg {
        CentralMsg::Refuse(r) => assert_eq!(r.code, code, "{}", r.reason),
        other => panic!("expected Refuse {code:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_is_acked_after_commit_and_reupload_is_stored_once() {
    let central = start_central().await;
    let mut a = Agent::connect(&central, "plant-1").await;
    match a.hello("plant-1", 0, 3).await {
        CentralMsg::Welcome(w) => {
            assert_eq!(
                (w.acked_seq, w.master_rev, w.protocol_version),
                (0, 0, PROTOCOL_VERSION)
            )
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    let batch: Vec<_> = (1..=3).map(|s| milestone("plant-1", s)).collect();
    a.send(AgentMsg::Events(batch.clone())).await;
    assert_eq!(a.recv().await, CentralMsg::Ack { through_seq: 3 });
    // The ack means committed: the feed has the events now.
    let feed = central.get("/v1/events").await;
    assert_eq!(feed["events"].as_array().unwrap().len(), 3);
    // Lost ack: the agent re-sends the same batch plus one more; only the new one is stored.
    let mut again = batch;
    again.push(milestone("plant-1", 4));
    a.send(AgentMsg::Events(again)).await;
    assert_eq!(a.recv().await, CentralMsg::Ack { through_seq: 4 });
    a.send(AgentMsg::Events(vec![milestone("plant-1", 2)]))
        .await;
    assert_eq!(a.recv().await, CentralMsg::Ack { through_seq: 4 });
    let feed = central.get("/v1/events?limit=1000").await;
    let seqs: Vec<u64> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);

    let sites = central.get("/v1/sites").await;
    assert_eq!(sites[0]["site"], "plant-1");
    assert_eq!(sites[0]["connected"], true);
    assert_eq!(sites[0]["acked_seq"], 4);
    assert_eq!(central.get("/v1/health").await["sites_connected"], 1);

    // A reconnect is welcomed with the durable mark.
    drop(a);
    let mut b = Agent::connect(&central, "plant-1").await;
    match b.hello("plant-1", 0, 4).await {
        CentralMsg::Welcome(w) => assert_eq!(w.acked_seq, 4),
        other => panic!("expected Welcome, got {other:?}"),
    }
    // A gap is a protocol violation; nothing is stored.
    b.send(AgentMsg::Events(vec![milestone("plant-1", 9)]))
        .await;
    expect_refuse(b.recv().await, RefuseCode::ProtocolViolation);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_changes_are_pushed_filtered_per_site() {
    let central = start_central().await;
    central
        .put(
            "/v1/master/customers",
            json!([{"id": "C-1", "name": "Acme", "credit_limit": "1000", "on_hold": false}]),
        )
        .await;
    let mut a = Agent::connect(&central, "plant-1").await;
    // The connect tops plant-1 up to 20% of C-1's credit (a Grant at revision 2) before the
    // Welcome, which announces it.
    match a.hello("plant-1", 0, 0).await {
        CentralMsg::Welcome(w) => assert_eq!(w.master_rev, 2),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let got = master_through(&mut a, 0, 2).await;
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1],
        MasterChange::Grant(Grant {
            site: "plant-1".into(),
            pool: Pool::credit("C-1"),
            qty: 2_000_000
        })
    );
    // ATP (and the grants it causes) for another site is filtered out, but through_rev still
    // advances past it.
    let r = central
        .put(
            "/v1/master/atp",
            json!([
                {"sku": "BOLT-M8", "site": "plant-2", "available": 5},
                {"sku": "BOLT-M8", "site": "plant-1", "available": 40},
                {"sku": "NUT-M8", "site": "plant-2", "available": 7},
            ]),
        )
        .await;
    assert_eq!(
        r,
        json!({"revision": 8, "changes": 3, "grants": 3, "reclaims": 0})
    );
    let got = master_through(&mut a, 2, 8).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|c| c.concerns("plant-1") && !c.concerns("plant-2"))
    );
    assert_eq!(
        got[1],
        MasterChange::Grant(Grant {
            site: "plant-1".into(),
            pool: Pool::atp("BOLT-M8"),
            qty: 20
        })
    );
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowance_request_is_answered_and_its_grant_pushed() {
    // Goal: AllowanceRequest → one durable grant → AllowanceReply with the Grant's revision, and
    // the Grant itself arrives on the master stream right after, so the agent can confirm.
    let central = start_central().await;
    central
        .put(
            "/v1/master/atp",
            json!([{"sku": "BOLT-M8", "site": "plant-1", "available": 100}]),
        )
        .await;
    let mut a = Agent::connect(&central, "plant-1").await;
    match a.hello("plant-1", 0, 0).await {
        CentralMsg::Welcome(w) => assert_eq!(w.master_rev, 2),
        other => panic!("expected Welcome, got {other:?}"),
    }
    master_through(&mut a, 0, 2).await;
    a.send(AgentMsg::AllowanceRequest {
        request_id: 7,
        pool: Pool::atp("BOLT-M8"),
        qty: 30,
    })
    .await;
    assert_eq!(
        a.recv().await,
        CentralMsg::AllowanceReply {
            request_id: 7,
            granted: 30,
            rev: 3,
            reason: String::new()
        }
    );
    let got = master_through(&mut a, 2, 3).await;
    assert_eq!(
        got,
        vec![MasterChange::Grant(Grant {
            site: "plant-1".into(),
            pool: Pool::atp("BOLT-M8"),
            qty: 30
        })]
    );
    // 100 - 20 - 30 = 50 free: asking 80 gets 50 and says so; then nothing is left.
    a.send(AgentMsg::AllowanceRequest {
        request_id: 8,
        pool: Pool::atp("BOLT-M8"),
        qty: 80,
    })
    .await;
    match a.recv().await {
        CentralMsg::AllowanceReply {
            request_id: 8,
            granted: 50,
            rev: 4,
            reason,
        } => assert!(reason.contains("only 50"), "{reason}"),
        other => panic!("expected a partial grant, got {other:?}"),
    }
    master_through(&mut a, 3, 4).await;
    a.send(AgentMsg::AllowanceRequest {
        request_id: 9,
        pool: Pool::atp("BOLT-M8"),
        qty: 1,
    })
    .await;
    match a.recv().await {
        CentralMsg::AllowanceReply {
            request_id: 9,
            granted: 0,
            rev: 0,
            reason,
        } => assert!(reason.contains("only 0 free"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let ledger = central.get("/v1/ledger?pool=atp:BOLT-M8@plant-1").await;
    assert_eq!(ledger[0]["outstanding"]["plant-1"], 100);
    assert_eq!(ledger[0]["free"], 0);
    let reports = central.get("/v1/sites/plant-1/reconciliations").await;
    assert_eq!(reports.as_array().unwrap().len(), 1);
    assert_eq!(reports[0]["session"], 1);
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_dead_lettered_and_the_batch_acked() {
    let central = start_central().await;
    let mut a = Agent::connect(&central, "plant-1").await;
    assert!(matches!(
        a.hello("plant-1", 0, 3).await,
        CentralMsg::Welcome(_)
    ));
    let mut bad = milestone("plant-1", 2);
    bad.body = vec![0xff; 5];
    a.send(AgentMsg::Events(vec![
        milestone("plant-1", 1),
        bad,
        milestone("plant-1", 3),
    ]))
    .await;
    assert_eq!(a.recv().await, CentralMsg::Ack { through_seq: 3 });
    let feed = central.get("/v1/events").await;
    let seqs: Vec<u64> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 3]);
    let dead = central.get("/v1/dead-letters").await;
    assert_eq!(dead[0]["seq"], 2);
    assert_eq!(dead[0]["site"], "plant-1");
    assert!(dead[0]["reason"].as_str().unwrap().contains("malformed"));
    let r = central.get("/v1/sites/plant-1/reconciliations").await;
    assert_eq!(r[0]["events_uploaded"], 3);
    assert_eq!(r[0]["dead_letters"], 1);
    assert!(r[0]["caught_up_at"].is_string());
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_the_certificate() {
    let central = start_central().await;
    // plant-1's certificate claiming to be plant-2 in Hello.
    let mut a = Agent::connect(&central, "plant-1").await;
    expect_refuse(a.hello("plant-2", 0, 0).await, RefuseCode::WrongSite);

    // A correct Hello, then events claiming another site: refused, nothing stored.
    let mut b = Agent::connect(&central, "plant-1").await;
    assert!(matches!(
        b.hello("plant-1", 0, 1).await,
        CentralMsg::Welcome(_)
    ));
    b.send(AgentMsg::Events(vec![milestone("plant-2", 1)]))
        .await;
    expect_refuse(b.recv().await, RefuseCode::WrongSite);
    assert_eq!(central.get("/v1/events").await["events"], json!([]));

    // A certificate from another CA gets no session at all.
    let rogue = tempfile::tempdir().unwrap();
    certs::create_ca(rogue.path(), false).unwrap();
    certs::issue_site(rogue.path(), "plant-1", rogue.path(), false).unwrap();
    let ep = client_endpoint(&central.certs(), rogue.path(), "plant-1");
    let outcome: Result<Option<CentralMsg>, String> = tokio::time::timeout(STEP, async {
        let conn = ep
            .connect(central.quic, certs::DEFAULT_CENTRAL_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = AgentMsg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "rogue".into(),
            site: "plant-1".into(),
            master_rev: 0,
            last_seq: 0,
            agent_time_ms: 0,
            acked_seq: 0,
            retained_from_seq: 0,
            central_incarnation: 0,
        });
        write_frame(&mut send, &hello)
            .await
            .map_err(|e| e.to_string())?;
        read_frame::<CentralMsg, _>(&mut recv)
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .expect("the rogue attempt ends in time");
    // With TLS 1.3 the client may believe the handshake succeeded; what matters is that
    // central never answers it.
    if let Ok(Some(msg)) = outcome {
        panic!("a rogue certificate got an answer: {msg:?}");
    }
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_supersedes_the_old_and_shutdown_refuses_live_sessions() {
    let central = start_central().await;
    let mut old = Agent::connect(&central, "plant-2").await;
    assert!(matches!(
        old.hello("plant-2", 0, 0).await,
        CentralMsg::Welcome(_)
    ));
    let mut new = Agent::connect(&central, "plant-2").await;
    assert!(matches!(
        new.hello("plant-2", 0, 0).await,
        CentralMsg::Welcome(_)
    ));
    expect_refuse(old.recv().await, RefuseCode::Superseded);
    // The new one keeps working, and the site stays connected.
    new.send(AgentMsg::Events(vec![milestone("plant-2", 1)]))
        .await;
    assert_eq!(new.recv().await, CentralMsg::Ack { through_seq: 1 });
    // A window for the superseded session's teardown, which runs in the background, to wrongly
    // mark the site offline: the check below is of something that must NOT happen, so there is
    // no condition to wait on.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sites = central.get("/v1/sites").await;
    assert_eq!(sites[0]["connected"], true, "{sites}");

    let stopping = tokio::spawn(central.stop());
    expect_refuse(new.recv().await, RefuseCode::Unavailable);
    drop(new);
    stopping.await.unwrap();
}

fn order_event(seq: u64, customer: &str, price_units: i64) -> EventEnvelope {
    let id = format!("plant-1-o{seq}");
    EventEnvelope::new(
        "plant-1",
        seq,
        &id,
        1_767_225_600_000,
        &EventBody::Order(outpost_protocol::Order {
            order_id: id.clone(),
            customer_id: customer.into(),
            status: "confirmed".into(),
            lines: vec![outpost_protocol::OrderLine {
                sku: "BOLT-M8".into(),
                qty: 2,
                unit_price: outpost_protocol::Money(price_units),
                currency: "EUR".into(),
                promise: outpost_protocol::LinePromise::Confirmed,
            }],
            master_rev: 3,
            offline: true,
        }),
    )
}

/// Runs the built `outpost-central` binary; returns (exit code, stdout, stderr).
async fn cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_outpost-central"))
        .args(args)
        .env_remove("OUTPOST_CENTRAL_API")
        .env_remove("OUTPOST_CENTRAL_TOKEN")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_lists_shows_replays_and_resolves_exceptions() {
    // Goal: the `exceptions` and `reconciliations` subcommands work against a live central,
    // addressed both by --api/--token and by a fleet.json with port 0 (read from ready.json).
    let central = start_central().await;
    central
        .put(
            "/v1/master/prices",
            json!([{"sku": "BOLT-M8", "customer": null, "unit_price": "0.12", "currency": "EUR"}]),
        )
        .await;
    central
        .put(
            "/v1/master/customers",
            json!([{"id": "C-1", "name": "Acme", "credit_limit": "1000", "on_hold": false}]),
        )
        .await;
    central
        .put(
            "/v1/master/atp",
            json!([{"sku": "BOLT-M8", "site": "plant-1", "available": 100}]),
        )
        .await;
    let mut a = Agent::connect(&central, "plant-1").await;
    assert!(matches!(
        a.hello("plant-1", 0, 1).await,
        CentralMsg::Welcome(_)
    ));
    // The site quoted 0.11: a price change.
    a.send(AgentMsg::Events(vec![order_event(1, "C-1", 1100)]))
        .await;
    loop {
        match a.recv().await {
            CentralMsg::Ack { through_seq: 1 } => break,
            CentralMsg::Master(_) => {}
            other => panic!("expected Ack, got {other:?}"),
        }
    }

    let api = central.api.clone();
    let flags = ["--api", api.as_str(), "--token", TOKEN];
    let (code, out, err) = cli(&[&["exceptions", "list"][..], &flags[..]].concat()).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("ID"), "{out}");
    assert!(
        lines[1].contains("plant-1-o1") && lines[1].contains("price_changed"),
        "{out}"
    );

    let fleet = central.dir.path().join("fleet.json");
    std::fs::write(
        &fleet,
        json!({
            "central": {"api": "http://127.0.0.1:0", "token": TOKEN, "quic": "127.0.0.1:0",
                        "command": ["outpost-central"],
                        "data_dir": central.dir.path().join("data").to_str().unwrap()},
            "sites": []
        })
        .to_string(),
    )
    .unwrap();
    let fleet = fleet.to_str().unwrap().to_string();
    let (code, out, err) = cli(&["exceptions", "show", "1", "--fleet", &fleet]).await;
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["site_data"]["lines"][0]["site_unit_price"], "0.11");

    let (code, _, err) = cli(&["exceptions", "replay", "1", "--fleet", &fleet]).await;
    assert_eq!(code, 1);
    assert!(err.contains("still_failing"), "{err}");
    let (code, _, err) = cli(&["exceptions", "resolve", "1", "--fleet", &fleet]).await;
    assert_ne!(code, 0, "--accept or --reject is required: {err}");
    let (code, out, err) = cli(&[
        "exceptions",
        "resolve",
        "1",
        "--reject",
        "--reason",
        "wrong price",
        "--fleet",
        &fleet,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let resolved: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(resolved["resolution"]["action"], "reject");
    let (code, out, _) = cli(&["exceptions", "list", "--fleet", &fleet]).await;
    assert_eq!((code, out.as_str()), (0, "no exceptions\n"));
    let (code, out, _) = cli(&[
        "exceptions",
        "list",
        "--status",
        "all",
        "--json",
        "--fleet",
        &fleet,
    ])
    .await;
    assert_eq!(code, 0);
    let all: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all[0]["status"], "resolved");

    let (code, out, err) = cli(&["reconciliations", "plant-1", "--fleet", &fleet]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("SESSION"), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, _, err) = cli(&["exceptions", "list"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--fleet"), "{err}");
    central.stop().await;
}

/// Goal: a revocation ends the site's live session at once with `Refuse{Revoked}` and keeps it
/// out at every later Hello until reinstated; the Hello's clock gives the site's clock offset.
/// Method: a hand-rolled agent whose clock is two hours behind says Hello; revoke over HTTP; the
/// live session gets the refusal within a second; a new connection is refused at Hello; after
/// reinstating, a new connection is welcomed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_ends_the_live_session_and_refuses_hellos_until_reinstated() {
    let central = start_central().await;
    let two_hours_ms = 2 * 3_600 * 1_000;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut live = Agent::connect(&central, "plant-1").await;
    live.send(AgentMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        site: "plant-1".into(),
        master_rev: 0,
        last_seq: 0,
        agent_time_ms: now_ms - two_hours_ms,
        acked_seq: 0,
        retained_from_seq: 0,
        central_incarnation: 0,
    }))
    .await;
    assert!(matches!(live.recv().await, CentralMsg::Welcome(_)));
    let sites = central.get("/v1/sites").await;
    let offset = sites[0]["clock_offset_ms"].as_i64().expect("offset known");
    assert!(
        (offset + two_hours_ms).abs() < 2_000,
        "offset {offset} is about -2 h"
    );

    let revoke = |method: reqwest::Method| {
        central
            .http
            .request(method, format!("{}/v1/sites/plant-1/revoke", central.api))
            .bearer_auth(TOKEN)
            .json(&json!({"reason": "lost"}))
            .send()
    };
    let started = std::time::Instant::now();
    let resp = revoke(reqwest::Method::POST).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let r = tokio::time::timeout(Duration::from_secs(1), live.recv())
        .await
        .expect("the live session is refused within a second");
    expect_refuse(r, RefuseCode::Revoked);
    println!("revoked session refused after {:?}", started.elapsed());
    let sites = central.get("/v1/sites").await;
    assert_eq!(sites[0]["connected"], false, "{sites}");
    assert_eq!(sites[0]["revoked"], true, "{sites}");

    let mut again = Agent::connect(&central, "plant-1").await;
    expect_refuse(again.hello("plant-1", 0, 0).await, RefuseCode::Revoked);
    // Another site is not affected.
    let mut other = Agent::connect(&central, "plant-2").await;
    assert!(matches!(
        other.hello("plant-2", 0, 0).await,
        CentralMsg::Welcome(_)
    ));

    let resp = revoke(reqwest::Method::DELETE).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut back = Agent::connect(&central, "plant-1").await;
    assert!(matches!(
        back.hello("plant-1", 0, 0).await,
        CentralMsg::Welcome(_)
    ));
    drop((back, other));
    central.stop().await;
}
