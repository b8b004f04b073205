//! The sync driver against scripted centrals over real QUIC on loopback, and its pure helpers.

use super::*;
use outpost_protocol::io::{read_frame, write_frame};
use outpost_protocol::session::agent::encode_batches;
use outpost_protocol::{AgentMsg, CentralMsg, EventEnvelope, Hello};

use crate::store::{NewMilestone, StoreWriter};
use crate::testutil::{Pki, catalogue, grants};
use crate::topup::TopUp;
use outpost_protocol::{
    EventBody, Grant, MasterChange, Milestone, MilestoneKind, PROTOCOL_VERSION, Pool, Welcome,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

const CENTRAL_NAME: &str = "central.outpost.local";

/// A scripted central: mTLS with the fleet CA, ALPN, one stream per connection.
fn fake_central(pki: &Pki) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let (cert, key) = pki.server(CENTRAL_NAME);
    let mut scfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    scfg.alpn_protocols = vec![outpost_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(scfg).unwrap();
    quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap()
}

fn settings(dir: &Path, pki: &Pki, central: SocketAddr) -> SyncSettings {
    pki.write_site_files(dir, "plant-1");
    SyncSettings {
        central_addrs: vec![central.to_string()],
        central_name: CENTRAL_NAME.into(),
        ca_cert: dir.join("ca.pem"),
        cert: dir.join("plant-1.pem"),
        key: dir.join("plant-1.key"),
        connect_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        batch_max_events: 4,
        window_events: 8,
        send_window_bytes: 1 << 20,
        receive_window_bytes: 1 << 20,
        protocol_version_max: PROTOCOL_VERSION,
        renew_before: Duration::ZERO,
    }
}

fn scan(id: &str) -> NewMilestone {
    NewMilestone {
        event_id: id.into(),
        shipment_id: "SH-1".into(),
        milestone: MilestoneKind::Picked,
        scanner_id: "scanner-1".into(),
        at: "2026-11-26T10:00:00Z".into(),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Accepts one session, checks the hello, welcomes with `acked`, pushes `master`, then acks
/// every contiguous batch until the agent closes or `stop` fires. Returns the seqs received.
async fn serve_session(
    ep: &quinn::Endpoint,
    acked: u64,
    master: Option<outpost_protocol::MasterBatch>,
    seen: Arc<std::sync::Mutex<Vec<u64>>>,
    stop_after: Option<u64>,
) -> quinn::Connection {
    let script = Script {
        acked,
        master,
        stop_after,
        ..Script::default()
    };
    let record = move |evs: &[EventEnvelope]| {
        seen.lock().unwrap().extend(evs.iter().map(|e| e.seq));
    };
    serve_scripted(ep, script, record).await.0
}

/// What a scripted central answers in one session.
struct Script {
    /// The Welcome's high-water mark.
    acked: u64,
    incarnation: u64,
    /// The Welcome's `master_from_rev`; `None`: the Hello's `master_rev`.
    master_from_rev: Option<u64>,
    /// Sent right after the Welcome.
    master: Option<outpost_protocol::MasterBatch>,
    /// Cut the link, unacked, once this seq has arrived.
    stop_after: Option<u64>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            acked: 0,
            incarnation: 1,
            master_from_rev: None,
            master: None,
            stop_after: None,
        }
    }
}

/// `serve_session` as scripted: `record` gets the new events of each batch (duplicates of
/// what central already holds left out). Returns the connection and the agent's Hello.
async fn serve_scripted(
    ep: &quinn::Endpoint,
    script: Script,
    record: impl Fn(&[EventEnvelope]) + Send + 'static,
) -> (quinn::Connection, Hello) {
    let conn = ep.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let hello: AgentMsg = read_frame(&mut recv).await.unwrap().unwrap();
    let AgentMsg::Hello(h) = hello else {
        panic!("expected hello")
    };
    assert_eq!(h.site, "plant-1");
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
    write_frame(
        &mut send,
        &CentralMsg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            central_version: "test".into(),
            acked_seq: script.acked,
            master_rev: 5,
            incarnation: script.incarnation,
            master_from_rev: script.master_from_rev.unwrap_or(h.master_rev),
        }),
    )
    .await
    .unwrap();
    if let Some(m) = script.master {
        write_frame(&mut send, &CentralMsg::Master(m))
            .await
            .unwrap();
    }
    let conn2 = conn.clone();
    let (acked, stop_after) = (script.acked, script.stop_after);
    tokio::spawn(async move {
        let mut hwm = acked;
        while let Ok(Some(AgentMsg::Events(batch))) = read_frame::<AgentMsg, _>(&mut recv).await {
            let plan = outpost_protocol::session::plan_ingest("plant-1", hwm, &batch).unwrap();
            record(&batch[plan.duplicates..]);
            hwm = plan.new_hwm;
            if stop_after.is_some_and(|s| hwm >= s) {
                // Drop the link without acking: the agent must resend after reconnecting.
                conn2.close(VarInt::from_u32(9), b"test cut");
                return;
            }
            if write_frame(&mut send, &CentralMsg::Ack { through_seq: hwm })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    (conn, h)
}

/// A sync client for `store` towards `central`, running until the returned sender fires.
fn start_client(
    dir: &Path,
    pki: &Pki,
    central: &quinn::Endpoint,
    store: &Store,
) -> (Arc<LinkState>, watch::Sender<bool>, JoinHandle<()>) {
    let link = Arc::new(LinkState::default());
    let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
    let client = SyncClient::new(
        settings(dir, pki, central.local_addr().unwrap()),
        "plant-1".into(),
        store.clone(),
        link.clone(),
        ask_rx,
    )
    .unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    (link, stop_tx, tokio::spawn(client.run(stop_rx)))
}

async fn stop_client(stop: watch::Sender<bool>, task: JoinHandle<()>) {
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("sync task stops on shutdown")
        .unwrap();
}

/// Goal: a central restored from a backup (its Welcome's mark below what it acknowledged)
/// receives the acknowledged events the agent retained again, with their original seqs and
/// event ids, and the agent's Hello tells it what it holds; guards against losing the events
/// central acknowledged after its backup.
/// Method: central acks all 20 events, the link is cut, the next central welcomes with 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_behind_its_acks_gets_the_retained_events_again() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let central = fake_central(&pki);
    let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
    for i in 0..20 {
        store
            .record_milestone(scan(&format!("e{i}")), now_ms())
            .await
            .unwrap();
    }
    let (link, stop, task) = start_client(dir.path(), &pki, &central, &store);
    let first = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = first.clone();
    let (c1, h1) = serve_scripted(&central, Script::default(), move |evs| {
        rec.lock().unwrap().extend(evs.iter().cloned())
    })
    .await;
    assert_eq!(
        (h1.acked_seq, h1.retained_from_seq, h1.central_incarnation),
        (0, 1, 0)
    );
    eventually("all acked", || store.marks().unwrap().acked_seq == 20).await;
    assert_eq!(store.marks().unwrap().outbox_depth(), 0);
    c1.close(VarInt::from_u32(9), b"central restored");

    let again = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = again.clone();
    let script = Script {
        acked: 5,
        ..Script::default()
    };
    let (_c2, h2) = serve_scripted(&central, script, move |evs| {
        rec.lock().unwrap().extend(evs.iter().cloned())
    })
    .await;
    assert_eq!(
        (h2.acked_seq, h2.retained_from_seq, h2.last_seq),
        (20, 1, 20),
        "the hello names the acked mark and the retained rows"
    );
    assert_eq!(h2.central_incarnation, 1);
    eventually("re-sent and acked", || again.lock().unwrap().len() == 15).await;
    let first = first.lock().unwrap().clone();
    let again = again.lock().unwrap().clone();
    assert_eq!(again, first[5..], "same seqs, event ids and bodies");
    eventually("acked again", || store.marks().unwrap().acked_seq == 20).await;
    assert!(link.is_connected());
    stop_client(stop, task).await;
    writer.shutdown().await;
}

/// Goal: when the events a lagging central needs were pruned, the agent refuses to go on
/// (`Diverged`) and says why, naming the retention keys, instead of silently skipping them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_behind_pruned_events_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let central = fake_central(&pki);
    let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
    // Stored at 1 ms after the epoch: past the default week as soon as they are acked.
    for i in 0..6 {
        store
            .record_milestone(scan(&format!("e{i}")), 1)
            .await
            .unwrap();
    }
    let (_link, stop, task) = start_client(dir.path(), &pki, &central, &store);
    let (c1, _) = serve_scripted(&central, Script::default(), |_| {}).await;
    eventually("all acked", || store.marks().unwrap().acked_seq == 6).await;
    assert_eq!(store.marks().unwrap().retained_acked(), 0);
    c1.close(VarInt::from_u32(9), b"central restored");

    let script = Script {
        acked: 2,
        ..Script::default()
    };
    let (c2, h2) = serve_scripted(&central, script, |_| {}).await;
    assert_eq!((h2.acked_seq, h2.retained_from_seq), (6, 7));
    let closed = tokio::time::timeout(Duration::from_secs(5), c2.closed())
        .await
        .unwrap();
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("expected the agent to close: {closed:?}")
    };
    assert_eq!(close.error_code, VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION));
    let reason = String::from_utf8_lossy(&close.reason).to_string();
    assert!(reason.contains("events 3..=6 were pruned"), "{reason}");
    assert!(reason.contains("retain_acked_secs"), "{reason}");
    assert_eq!(store.marks().unwrap().acked_seq, 6, "nothing rewound");
    stop_client(stop, task).await;
    writer.shutdown().await;
}

/// Goal: the first incarnation a Welcome names is recorded without touching allowances; the
/// same one again changes nothing; a new one (central restored) drops every allowance to 0
/// and sets the applied revision to `master_from_rev` before the session's first Master
/// frame, which then applies from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_central_incarnation_drops_allowances_before_master_data() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let central = fake_central(&pki);
    let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
    let gear = Pool::atp("GEAR-12T");
    store.apply_master(catalogue(0, 5)).await.unwrap();
    store
        .apply_master(grants(5, 8, &[(gear.clone(), 9)]))
        .await
        .unwrap();
    let (_link, stop, task) = start_client(dir.path(), &pki, &central, &store);
    let cut = |c: quinn::Connection| c.close(VarInt::from_u32(9), b"next session");

    for session in 0..2 {
        let (c, h) = serve_scripted(&central, Script::default(), |_| {}).await;
        assert_eq!(h.central_incarnation, session, "0 before the first Welcome");
        eventually("incarnation recorded", || {
            store.marks().unwrap().central_incarnation == 1
        })
        .await;
        cut(c);
    }
    assert_eq!(store.allowance(&gear).unwrap(), 9, "unchanged: kept");
    assert_eq!(store.marks().unwrap().master_rev, 8);

    let script = Script {
        incarnation: 2,
        master_from_rev: Some(3),
        master: Some(grants(3, 4, &[(gear.clone(), 2)])),
        ..Script::default()
    };
    let (_c, h) = serve_scripted(&central, script, |_| {}).await;
    assert_eq!((h.central_incarnation, h.master_rev), (1, 8));
    eventually("master resumed from 3", || {
        store.marks().unwrap().master_rev == 4
    })
    .await;
    assert_eq!(store.allowance(&gear).unwrap(), 2, "only the new grant");
    assert_eq!(store.marks().unwrap().central_incarnation, 2);
    stop_client(stop, task).await;
    writer.shutdown().await;
}

/// Goal: against a scripted central over real QUIC + mTLS, the agent uploads its whole
/// outbox in order within the window, records acks durably, applies master data with its
/// revision, uploads new events as they are committed, survives a cut link by resuming from
/// central's mark, and reports `connected` accordingly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_acks_master_and_resumes_after_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let central = fake_central(&pki);
    let addr = central.local_addr().unwrap();
    let (store, writer): (Store, StoreWriter) =
        Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
    for i in 0..30 {
        store
            .record_milestone(scan(&format!("e{i}")), 1)
            .await
            .unwrap();
    }
    let link = Arc::new(LinkState::default());
    let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
    let client = SyncClient::new(
        settings(dir.path(), &pki, addr),
        "plant-1".into(),
        store.clone(),
        link.clone(),
        ask_rx,
    )
    .unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(client.run(stop_rx));

    // First session: central has nothing; it cuts the link once 12 events arrived, unacked.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _c1 = serve_session(&central, 0, Some(catalogue(0, 5)), seen.clone(), Some(12)).await;
    eventually("master applied", || store.marks().unwrap().master_rev == 5).await;
    assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 5)));
    eventually("first batches", || seen.lock().unwrap().len() >= 12).await;

    // Second session: central says it durably has 10 of them; the agent resends from 11.
    let seen2 = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _c2 = serve_session(&central, 10, None, seen2.clone(), None).await;
    eventually("outbox drained", || store.marks().unwrap().acked_seq == 30).await;
    assert_eq!(*seen2.lock().unwrap(), (11..=30).collect::<Vec<_>>());
    assert!(link.is_connected());
    assert_eq!(store.outbox_rows().unwrap(), 0);

    // A new local commit is uploaded without any polling delay.
    store.record_milestone(scan("late"), 2).await.unwrap();
    eventually("new event acked", || store.marks().unwrap().acked_seq == 31).await;
    assert_eq!(seen2.lock().unwrap().last(), Some(&31));

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("sync task stops on shutdown")
        .unwrap();
    assert!(!link.is_connected());
    writer.shutdown().await;
}

/// Goal: the first heartbeat of a session goes out right after the Welcome and before any
/// event, so it shows the backlog built while offline; later ones follow every interval.
/// Method: 5 events in the outbox, a scripted central that reads the frames in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_heartbeat_precedes_the_upload() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let central = fake_central(&pki);
    let addr = central.local_addr().unwrap();
    let path = dir.path().join("agent.redb");
    let (store, writer) = Store::open(&path, "plant-1").unwrap();
    for i in 0..5 {
        store
            .record_milestone(scan(&format!("e{i}")), 1_000 + i)
            .await
            .unwrap();
    }
    let link = Arc::new(LinkState::default());
    let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
    let probe = HealthProbe::new(
        store.clone(),
        path,
        Arc::new(crate::api::ApiCounters::default()),
    );
    let client = SyncClient::new(
        settings(dir.path(), &pki, addr),
        "plant-1".into(),
        store.clone(),
        link.clone(),
        ask_rx,
    )
    .unwrap()
    .with_heartbeat(Duration::from_millis(200), probe);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(client.run(stop_rx));

    let conn = central.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let Some(AgentMsg::Hello(_)) = read_frame(&mut recv).await.unwrap() else {
        panic!("expected hello")
    };
    let welcome = CentralMsg::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        central_version: "test".into(),
        acked_seq: 0,
        master_rev: 0,
        incarnation: 1,
        master_from_rev: 0,
    });
    write_frame(&mut send, &welcome).await.unwrap();
    let first: AgentMsg = read_frame(&mut recv).await.unwrap().unwrap();
    let AgentMsg::Heartbeat(hb) = first else {
        panic!("expected a heartbeat first, got {first:?}")
    };
    assert_eq!(hb.outbox_events, 5);
    assert_eq!(hb.oldest_unsynced_ms, Some(1_000));
    // Events follow (not acked here), then the next heartbeat within a bounded number of
    // frames.
    let mut beats = 0;
    for _ in 0..20 {
        match read_frame::<AgentMsg, _>(&mut recv).await.unwrap().unwrap() {
            AgentMsg::Heartbeat(_) => {
                beats += 1;
                break;
            }
            AgentMsg::Events(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(beats, 1, "a second heartbeat follows");
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    writer.shutdown().await;
}

/// Goal: a refusal ends the session and the agent retries with backoff; an unreachable
/// central leaves `connected` false and the agent keeps trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sessions_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let central = fake_central(&pki);
    let addr = central.local_addr().unwrap();
    let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
    let link = Arc::new(LinkState::default());
    let (_ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
    let client = SyncClient::new(
        settings(dir.path(), &pki, addr),
        "plant-1".into(),
        store.clone(),
        link.clone(),
        ask_rx,
    )
    .unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(client.run(stop_rx));
    for _ in 0..3 {
        let conn = central.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let _hello: AgentMsg = read_frame(&mut recv).await.unwrap().unwrap();
        write_frame(
            &mut send,
            &CentralMsg::Refuse(Refuse {
                code: RefuseCode::Superseded,
                reason: "test".into(),
            }),
        )
        .await
        .unwrap();
        let _ = send.finish();
        assert!(!link.is_connected());
    }
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    writer.shutdown().await;
}

/// A scripted central for the top-up tests: welcomes, acks every batch, and answers each
/// `AllowanceRequest` with a grant of all that was asked, the reply first and the grant's
/// master change a moment later (so the agent must wait for the revision, not only the
/// reply), or, when `answer` is false, never answers. Records every request.
async fn allowance_central(
    ep: quinn::Endpoint,
    answer: bool,
    asked: Arc<std::sync::Mutex<Vec<(Pool, i64)>>>,
) {
    let conn = ep.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let Some(AgentMsg::Hello(h)) = read_frame(&mut recv).await.unwrap() else {
        panic!("expected hello")
    };
    let mut rev = h.master_rev;
    let welcome = CentralMsg::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        central_version: "test".into(),
        acked_seq: 0,
        master_rev: rev,
        incarnation: 1,
        master_from_rev: h.master_rev,
    });
    write_frame(&mut send, &welcome).await.unwrap();
    let mut hwm = 0;
    while let Ok(Some(msg)) = read_frame::<AgentMsg, _>(&mut recv).await {
        match msg {
            AgentMsg::Heartbeat(_) | AgentMsg::RenewCertificate { .. } => {}
            AgentMsg::Events(batch) => {
                let plan = outpost_protocol::session::plan_ingest("plant-1", hwm, &batch).unwrap();
                hwm = plan.new_hwm;
                let ack = CentralMsg::Ack { through_seq: hwm };
                if write_frame(&mut send, &ack).await.is_err() {
                    return;
                }
            }
            AgentMsg::AllowanceRequest {
                request_id,
                pool,
                qty,
            } => {
                asked.lock().unwrap().push((pool.clone(), qty));
                if !answer {
                    continue;
                }
                rev += 1;
                let reply = CentralMsg::AllowanceReply {
                    request_id,
                    granted: qty,
                    rev,
                    reason: "granted".into(),
                };
                write_frame(&mut send, &reply).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
                let grant = CentralMsg::Master(outpost_protocol::MasterBatch {
                    from_rev: rev - 1,
                    through_rev: rev,
                    changes: vec![MasterChange::Grant(Grant {
                        site: "plant-1".into(),
                        pool,
                        qty,
                    })],
                });
                write_frame(&mut send, &grant).await.unwrap();
            }
            AgentMsg::Hello(_) => panic!("a second hello"),
        }
    }
}

/// An agent (store, sync client, API with online top-up) connected to `allowance_central`.
struct TopUpRig {
    app: axum::Router,
    store: Store,
    writer: StoreWriter,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    asked: Arc<std::sync::Mutex<Vec<(Pool, i64)>>>,
    _central: quinn::Endpoint,
    _dir: tempfile::TempDir,
}

impl TopUpRig {
    /// The site holds 3 gears and 100.00 of ACME's credit.
    async fn start(answer: bool, deadline: Duration) -> TopUpRig {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let central = fake_central(&pki);
        let addr = central.local_addr().unwrap();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(allowance_central(central.clone(), answer, asked.clone()));
        let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
        store.apply_master(catalogue(0, 5)).await.unwrap();
        let allowance = [
            (Pool::atp("GEAR-12T"), 3),
            (Pool::credit("ACME"), 1_000_000),
        ];
        store.apply_master(grants(5, 6, &allowance)).await.unwrap();
        let link = Arc::new(LinkState::default());
        let (ask_tx, ask_rx) = mpsc::channel(crate::topup::ASK_QUEUE_DEPTH);
        let client = SyncClient::new(
            settings(dir.path(), &pki, addr),
            "plant-1".into(),
            store.clone(),
            link.clone(),
            ask_rx,
        )
        .unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(client.run(stop_rx));
        let topup = TopUp::new(ask_tx, deadline, store.master_rev_watch(), link.clone());
        let app = crate::router::router_with(
            crate::api::ApiState {
                store: store.clone(),
                site: "plant-1".into(),
                link: link.clone(),
                topup: Some(topup),
                max_body_bytes: 65536,
            },
            crate::api::Boundary::admin_tokens(&[TOKEN]),
        );
        eventually("connected", || link.is_connected()).await;
        assert_eq!(link.stale_secs(now_ms()), Some(0));
        TopUpRig {
            app,
            store,
            writer,
            stop,
            task,
            asked,
            _central: central,
            _dir: dir,
        }
    }

    async fn order(&self, key: &str, qty: i64) -> serde_json::Value {
        use tower::ServiceExt;
        let body =
            format!(r#"{{"customer_id":"ACME","lines":[{{"sku":"GEAR-12T","qty":{qty}}}]}}"#);
        let req = axum::http::Request::post("/v1/orders")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("idempotency-key", key)
            .body(axum::body::Body::from(body))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
        drop(self.app);
        drop(self.store);
        self.writer.shutdown().await;
    }
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Goal: online, an order beyond the site's allowance asks central for exactly the
/// shortfall and is confirmed once the grant's revision is applied; a retry asks nothing.
/// Method: a scripted central over real QUIC that grants what is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_top_up_confirms_beyond_the_allowance() {
    // A generous deadline: this test is about the outcome, not the speed.
    let rig = TopUpRig::start(true, Duration::from_secs(5)).await;
    let v = rig.order("t-1", 5).await;
    assert_eq!(v["status"], "confirmed", "{v}");
    assert_eq!(v["lines"][0]["promise"], "confirmed");
    assert_eq!(v["offline"], false);
    assert_eq!(v["master_rev"], 7, "captured against the granted revision");
    assert_eq!(*rig.asked.lock().unwrap(), [(Pool::atp("GEAR-12T"), 2)]);
    assert_eq!(rig.store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 0);
    let again = rig.order("t-1", 5).await;
    assert_eq!(again, v);
    assert_eq!(
        rig.asked.lock().unwrap().len(),
        1,
        "a retry asks for nothing"
    );
    rig.stop().await;
}

/// Goal: online, when central never answers, the order comes back pending (never
/// confirmed, never lost) once the request deadline passes. The elapsed-time check is only
/// an upper bound with generous slack (a hang would fail it), not a timing goal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_top_up_leaves_the_order_pending_within_the_deadline() {
    let deadline = Duration::from_millis(300);
    let rig = TopUpRig::start(false, deadline).await;
    let started = std::time::Instant::now();
    let v = rig.order("t-2", 5).await;
    let took = started.elapsed();
    assert_eq!(v["status"], "pending", "{v}");
    assert_eq!(v["lines"][0]["promise"], "pending_allowance");
    assert_eq!(v["offline"], false);
    assert!(took < deadline + Duration::from_secs(3), "took {took:?}");
    eventually("request seen", || rig.asked.lock().unwrap().len() == 1).await;
    assert_eq!(rig.store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 3);
    rig.stop().await;
}

/// Goal: `stale_secs` is 0 while connected, counts from the last time central was heard
/// from otherwise (never moving back), and is unknown if central was never heard from.
#[test]
fn a_clock_before_the_floor_or_the_certificate_is_not_trusted() {
    assert!(clock_sane(TIME_FLOOR_UNIX, None).is_ok());
    let why = clock_sane(946_684_800, None).unwrap_err().to_string(); // 2000-01-01
    assert!(
        why.contains("2000-01-01") && why.contains("waiting for a sane clock"),
        "{why}"
    );
    let cert = CertInfo {
        not_before: TIME_FLOOR_UNIX + 86_400,
        not_after: TIME_FLOOR_UNIX + 400 * 86_400,
        site: "plant-1".into(),
    };
    let why = clock_sane(TIME_FLOOR_UNIX + 3_600, Some(&cert))
        .unwrap_err()
        .to_string();
    assert!(why.contains("certificate"), "{why}");
    assert!(clock_sane(TIME_FLOOR_UNIX + 2 * 86_400, Some(&cert)).is_ok());
}

#[test]
fn stale_secs_counts_from_the_last_frame() {
    let link = LinkState::new(None);
    assert_eq!(link.stale_secs(1_000_000), None);
    link.heard(1_000_000);
    link.heard(900_000);
    assert_eq!(link.stale_secs(1_061_999), Some(61));
    link.set_connected(true);
    assert_eq!(link.stale_secs(5_000_000), Some(0));
    link.set_connected(false);
    assert_eq!(link.stale_secs(1_002_000), Some(2));
    assert_eq!(LinkState::new(Some(10_000)).stale_secs(20_000), Some(10));
}

/// Goal: an attempt gets ten round trips of the last link, at least a second, never more
/// than the configured connect timeout.
#[test]
fn attempts_are_shortened_by_a_known_rtt_within_bounds() {
    let cap = Duration::from_secs(3);
    assert_eq!(
        attempt_timeout(cap, None),
        cap,
        "no RTT known: the configured timeout"
    );
    assert_eq!(
        attempt_timeout(cap, Some(Duration::from_micros(300))),
        MIN_ATTEMPT_TIMEOUT,
        "a fast link: tried again every second"
    );
    assert_eq!(
        attempt_timeout(cap, Some(Duration::from_millis(200))),
        Duration::from_secs(2),
        "ten round trips"
    );
    assert_eq!(
        attempt_timeout(cap, Some(Duration::from_millis(600))),
        cap,
        "never beyond the configured timeout"
    );
    assert_eq!(
        attempt_timeout(Duration::from_millis(500), Some(Duration::from_micros(300))),
        Duration::from_millis(500),
        "a configured timeout below the floor wins"
    );
}

/// Goal: the n-th delay is uniform in [0, min(cap, initial·2^n)].
#[test]
fn backoff_is_capped_exponential_with_full_jitter() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(2000));
    let ceilings: Vec<u128> = (0..8)
        .map(|_| {
            let c = b.ceiling().as_millis();
            assert!(b.next_delay(0.999_999).as_millis() <= c);
            c
        })
        .collect();
    assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    assert_eq!(
        b.next_delay(0.0),
        Duration::ZERO,
        "full jitter reaches zero"
    );
    for _ in 0..100 {
        b.next_delay(0.5);
    }
    assert_eq!(b.ceiling(), Duration::from_millis(2000), "no overflow");
    b.reset();
    assert_eq!(b.ceiling(), Duration::from_millis(100));
}

fn big_event(seq: u64, bytes: usize) -> EventEnvelope {
    EventEnvelope::new(
        "plant-1",
        seq,
        &format!("e{seq}"),
        0,
        &EventBody::Milestone(Milestone {
            shipment_id: "S".into(),
            milestone: MilestoneKind::Picked,
            scanner_id: "s".into(),
            at: "x".repeat(bytes),
        }),
    )
}

/// Goal: a batch whose frame would exceed the frame limit is split, in order, and every
/// event is carried exactly once.
#[test]
fn oversized_batches_are_split_in_order() {
    let events: Vec<_> = (1..=10).map(|s| big_event(s, 1024 * 1024)).collect();
    let frames = encode_batches(&events).unwrap();
    assert!(frames.len() > 1);
    let mut seqs = Vec::new();
    for (through, f) in &frames {
        assert!(f.len() - 4 <= outpost_protocol::MAX_FRAME_BYTES);
        let msg: AgentMsg = outpost_protocol::decode_body(&f[4..]).unwrap();
        let AgentMsg::Events(evs) = msg else { panic!() };
        assert_eq!(evs.last().unwrap().seq, *through);
        seqs.extend(evs.iter().map(|e| e.seq));
    }
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let small: Vec<_> = (1..=3).map(|s| big_event(s, 10)).collect();
    assert_eq!(encode_batches(&small).unwrap().len(), 1);
}
