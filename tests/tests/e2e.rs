//! End-to-end tests over real processes: central and agents are started as child processes from
//! the workspace's binaries, on loopback with ephemeral ports, with real redb files, real QUIC with
//! mutual TLS and real HTTP. Each test states its goal and method.

use std::collections::HashMap;

use anyhow::Result;
use outpost_tests::*;
use serde_json::{Value, json};

const SITES: [&str; 3] = ["plant-1", "plant-2", "warehouse-1"];

fn order(customer: &str, lines: &[(&str, i64)]) -> Value {
    json!({
        "customer_id": customer,
        "lines": lines.iter().map(|(s, q)| json!({"sku": s, "qty": q})).collect::<Vec<_>>(),
    })
}

fn milestone(event_id: &str, kind: &str) -> Value {
    json!({"event_id": event_id, "milestone": kind, "scanner_id": "scanner-7", "at": "2026-11-26T10:00:00Z"})
}

/// Counts feed entries per id for one site.
fn ids_by_count(feed: &[Value], site: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in feed.iter().filter(|e| e["site"] == site) {
        *m.entry(e["id"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    m
}

async fn health(a: &Api) -> Result<Value> {
    Ok(a.get("/v1/health").await?.body)
}

/// Goal: a site keeps taking orders and milestones while central is down, and after central
/// returns every acknowledged write is in central's feed exactly once.
/// Method: stop central (SIGTERM), post orders (some retried with the same key) and milestones
/// (some retried with the same event id), check all got 2xx and sit in the outbox; restart central
/// on the same ports; wait for the outbox to drain; read the whole feed and count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_works_through_central_outage_and_reconciles_exactly_once() -> Result<()> {
    let fleet = Fleet::init(3)?;
    let mut central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().expect("central quic address");
    let c = Api::new(&central);
    let agent = fleet.start_agent("plant-1", &quic, &[])?;
    let a = Api::new(&agent);
    let rev = push_demo_master(&c, &SITES).await?;
    wait_master(&a, rev).await?;

    let pinned = central.ready.clone();
    assert!(central.terminate()?, "central exits cleanly on SIGTERM");
    eventually(
        "agent notices central is gone",
        CONVERGE_TIMEOUT,
        || async { Ok((health(&a).await?["connected"] == false).then_some(())) },
    )
    .await?;

    let mut order_ids = Vec::new();
    for i in 0..25 {
        let key = format!("outage-order-{i}");
        let body = order("ACME", &[("GEAR-12T", 1 + i % 3), ("BOLT-M8", 10)]);
        let r = a.post("/v1/orders", &body, Some(&key)).await?;
        assert_eq!(r.status, 201, "{}", r.body);
        if i % 5 == 0 {
            // A client that timed out retries with the same key: same order, nothing new.
            let again = a.post("/v1/orders", &body, Some(&key)).await?;
            assert_eq!(again.status, 201);
            assert_eq!(again.body["order_id"], r.body["order_id"]);
        }
        order_ids.push(r.body["order_id"].as_str().expect("order_id").to_string());
    }
    let mut event_ids = Vec::new();
    for i in 0..25 {
        let id = format!("scan-{i}");
        let body = milestone(
            &id,
            ["picked", "packed", "loaded", "departed", "delivered"][i % 5],
        );
        let r = a
            .post(
                &format!("/v1/shipments/SH-{}/milestones", i / 5),
                &body,
                None,
            )
            .await?;
        assert_eq!(r.status, 201, "{}", r.body);
        if i % 4 == 0 {
            let again = a
                .post(
                    &format!("/v1/shipments/SH-{}/milestones", i / 5),
                    &body,
                    None,
                )
                .await?;
            assert_eq!(again.status, 200, "a repeated event id answers 200");
            assert_eq!(again.body, r.body);
        }
        event_ids.push(id);
    }
    let h = health(&a).await?;
    assert_eq!(
        h["outbox_depth"], 50,
        "all 50 writes wait in the outbox: {h}"
    );

    let central = fleet.start_central(Some(&pinned))?;
    let c = Api::new(&central);
    wait_drained(&a).await?;

    let feed = read_feed(&c).await?;
    let counts = ids_by_count(&feed, "plant-1");
    for id in order_ids.iter().chain(event_ids.iter()) {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} must be in the feed exactly once"
        );
    }
    assert_eq!(counts.len(), 50, "nothing in the feed that was not written");
    assert_eq!(feed.len(), 50);
    // Orders read back at the site are now marked as acknowledged by central.
    let o = a.get(&format!("/v1/orders/{}", order_ids[0])).await?;
    assert_eq!(o.status, 200);
    assert_eq!(o.body["synced"], true, "{}", o.body);
    assert_eq!(o.body["lifecycle"], "uploaded", "{}", o.body);
    // The feed is in a stable order and each cursor is unique.
    let cursors: Vec<u64> = feed
        .iter()
        .map(|e| e["cursor"].as_u64().expect("cursor"))
        .collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "cursors strictly increase"
    );
    let sites = c.get("/v1/sites").await?;
    let p1 = sites
        .body
        .as_array()
        .expect("sites")
        .iter()
        .find(|s| s["site"] == "plant-1")
        .cloned();
    assert_eq!(
        p1.as_ref().map(|s| s["acked_seq"].clone()),
        Some(json!(50)),
        "{}",
        sites.body
    );
    Ok(())
}

/// Goal: no acknowledged write is lost when the agent is killed with SIGKILL right after a burst.
/// Method: with central up (so the burst races with the upload), post 200 writes from 16
/// concurrent clients, SIGKILL the agent as soon as the last 2xx arrives, restart it on the same
/// data directory, wait for the outbox to drain, and check every acknowledged id is at central
/// exactly once and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_burst_loses_nothing_and_duplicates_nothing() -> Result<()> {
    let fleet = Fleet::init(3)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().expect("quic");
    let c = Api::new(&central);
    let mut agent = fleet.start_agent("plant-2", &quic, &[])?;
    let a = Api::new(&agent);
    let rev = push_demo_master(&c, &SITES).await?;
    wait_master(&a, rev).await?;

    let mut tasks = Vec::new();
    for worker in 0..16 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..13 {
                let n = worker * 13 + i;
                if n >= 200 {
                    break;
                }
                if n % 2 == 0 {
                    let r = a
                        .post(
                            "/v1/orders",
                            &order("ACME", &[("BOLT-M8", 5)]),
                            Some(&format!("burst-{n}")),
                        )
                        .await?;
                    anyhow::ensure!(r.status == 201, "order {n}: {} {}", r.status, r.body);
                    acked.push(r.body["order_id"].as_str().unwrap_or_default().to_string());
                } else {
                    let id = format!("burst-scan-{n}");
                    let r = a
                        .post(
                            &format!("/v1/shipments/SHB-{n}/milestones"),
                            &milestone(&id, "picked"),
                            None,
                        )
                        .await?;
                    anyhow::ensure!(r.status == 201, "milestone {n}: {} {}", r.status, r.body);
                    acked.push(id);
                }
            }
            Ok::<_, anyhow::Error>(acked)
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await??);
    }
    agent.kill9()?;
    assert_eq!(acked.len(), 200);

    let agent = fleet.start_agent("plant-2", &quic, &[])?;
    let a = Api::new(&agent);
    wait_drained(&a).await?;
    let h = health(&a).await?;
    assert_eq!(
        h["last_seq"], 200,
        "the restarted agent kept every acknowledged write: {h}"
    );

    let feed = read_feed(&c).await?;
    let counts = ids_by_count(&feed, "plant-2");
    for id in &acked {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} must be at central exactly once"
        );
    }
    assert_eq!(
        counts.len(),
        200,
        "nothing at central that was never acknowledged"
    );
    Ok(())
}

/// Goal: client retries never create a second event, and a key reused for another request is
/// refused without storing anything.
/// Method: repeat an order with the same Idempotency-Key (same body, then a different body) and a
/// milestone with the same event id; check responses, the outbox depth and, after sync, the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_the_same_key_or_event_id_create_one_event() -> Result<()> {
    let fleet = Fleet::init(3)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().expect("quic");
    let c = Api::new(&central);
    let agent = fleet.start_agent("warehouse-1", &quic, &[])?;
    let a = Api::new(&agent);
    let rev = push_demo_master(&c, &SITES).await?;
    wait_master(&a, rev).await?;

    let body = order("ACME", &[("GEAR-12T", 2)]);
    let first = a.post("/v1/orders", &body, Some("key-1")).await?;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(
        first.body["lines"][0]["unit_price"], "11.00",
        "ACME's own price applies"
    );
    for _ in 0..3 {
        let again = a.post("/v1/orders", &body, Some("key-1")).await?;
        assert_eq!(again.status, 201);
        assert_eq!(again.body, first.body, "the original response is returned");
    }
    let other = a
        .post(
            "/v1/orders",
            &order("ACME", &[("GEAR-12T", 3)]),
            Some("key-1"),
        )
        .await?;
    assert_eq!(other.status, 422);
    assert_eq!(other.body["error"]["code"], "idempotency_key_reused");

    let m = milestone("evt-42", "loaded");
    let r1 = a.post("/v1/shipments/SH-9/milestones", &m, None).await?;
    assert_eq!(r1.status, 201, "{}", r1.body);
    let r2 = a.post("/v1/shipments/SH-9/milestones", &m, None).await?;
    assert_eq!((r2.status, &r2.body), (200, &r1.body));
    let changed = a
        .post(
            "/v1/shipments/SH-9/milestones",
            &milestone("evt-42", "departed"),
            None,
        )
        .await?;
    assert_eq!(changed.status, 422);
    assert_eq!(changed.body["error"]["code"], "event_id_reused");

    wait_drained(&a).await?;
    let h = health(&a).await?;
    assert_eq!(h["last_seq"], 2, "exactly two events were stored: {h}");
    let feed = read_feed(&c).await?;
    let counts = ids_by_count(&feed, "warehouse-1");
    assert_eq!(counts.len(), 2);
    assert_eq!(
        counts.get(first.body["order_id"].as_str().expect("id")),
        Some(&1)
    );
    assert_eq!(counts.get("evt-42"), Some(&1));
    let ms = feed
        .iter()
        .find(|e| e["id"] == "evt-42")
        .expect("milestone in feed");
    assert_eq!(ms["kind"], "milestone");
    assert_eq!(ms["milestone"], "loaded");
    assert_eq!(ms["shipment_id"], "SH-9");
    Ok(())
}

/// Goal: master data pushed to central is served by the agents, updates keep flowing, and after
/// an agent restart with central down it is still served from the agent's disk.
/// Method: push the demo catalogue, read ATP, prices and customers at two sites (ATP is per
/// site), change a price and see it arrive, then stop central, SIGKILL and restart the agent and
/// read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_data_reaches_agents_and_survives_restart_without_central() -> Result<()> {
    let fleet = Fleet::init(3)?;
    let mut central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().expect("quic");
    let c = Api::new(&central);
    let p1 = fleet.start_agent("plant-1", &quic, &[])?;
    let mut p2 = fleet.start_agent("plant-2", &quic, &[])?;
    let (a1, a2) = (Api::new(&p1), Api::new(&p2));
    let rev = push_demo_master(&c, &SITES).await?;
    let atp2 = json!([{"sku": "GEAR-12T", "site": "plant-2", "available": 7}]);
    let r = c.put("/v1/master/atp", &atp2).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let rev2 = r.body["revision"].as_u64().expect("revision");
    assert!(rev2 > rev, "revisions increase");
    wait_master(&a1, rev2).await?;
    wait_master(&a2, rev2).await?;

    // `erp_available` is the ERP's figure for the site; `available` is what the site may confirm
    // on its own (its allowance), never more than the ERP's figure.
    let atp = a1.get("/v1/atp/GEAR-12T").await?;
    assert_eq!(
        (atp.status, atp.body["erp_available"].clone()),
        (200, json!(40)),
        "{}",
        atp.body
    );
    assert_eq!(atp.body["available"], atp.body["allowance"], "{}", atp.body);
    assert!(
        atp.body["available"]
            .as_i64()
            .is_some_and(|n| (0..=40).contains(&n)),
        "{}",
        atp.body
    );
    let atp = a2.get("/v1/atp/GEAR-12T").await?;
    assert_eq!(
        atp.body["erp_available"], 7,
        "each site sees its own ATP: {}",
        atp.body
    );
    assert!(
        atp.body["available"]
            .as_i64()
            .is_some_and(|n| (0..=7).contains(&n)),
        "{}",
        atp.body
    );

    assert_eq!(a1.get("/v1/atp/NOPE").await?.status, 404);
    let list = a1.get("/v1/prices/GEAR-12T").await?;
    assert_eq!(list.body["unit_price"], "12.50", "{}", list.body);
    let acme = a1.get("/v1/prices/GEAR-12T?customer=ACME").await?;
    assert_eq!(acme.body["unit_price"], "11.00", "{}", acme.body);
    let other = a1.get("/v1/prices/GEAR-12T?customer=GLOBEX").await?;
    assert_eq!(
        other.body["unit_price"], "12.50",
        "no customer price: list price"
    );
    let cust = a1.get("/v1/customers/GLOBEX").await?;
    assert_eq!(cust.status, 200);
    assert_eq!(cust.body["on_hold"], true);
    assert_eq!(cust.body["credit_limit"], "1000.00");

    let r = c
        .put(
            "/v1/master/prices",
            &json!([{"sku": "GEAR-12T", "customer": null, "unit_price": 13.75, "currency": "EUR"}]),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_master(&a2, r.body["revision"].as_u64().expect("rev")).await?;
    assert_eq!(
        a2.get("/v1/prices/GEAR-12T").await?.body["unit_price"],
        "13.75"
    );

    assert!(central.terminate()?);
    let p2_allowance = a2.get("/v1/atp/GEAR-12T").await?.body["allowance"].clone();
    p2.kill9()?;
    let p2 = fleet.start_agent("plant-2", &quic, &[])?;
    let a2 = Api::new(&p2);
    let h = health(&a2).await?;
    assert_eq!(h["connected"], false);
    assert_eq!(h["master_rev"].as_u64(), r.body["revision"].as_u64(), "{h}");
    assert_eq!(
        a2.get("/v1/prices/GEAR-12T").await?.body["unit_price"],
        "13.75"
    );
    let atp = a2.get("/v1/atp/GEAR-12T").await?.body;
    assert_eq!(atp["erp_available"], 7, "{atp}");
    assert_eq!(
        atp["allowance"], p2_allowance,
        "the allowance survives the restart: {atp}"
    );
    assert_eq!(
        a2.get("/v1/customers/ACME").await?.body["name"],
        "Acme Corp"
    );
    // And the site still takes orders from its cache while central is down.
    let o = a2
        .post(
            "/v1/orders",
            &order("ACME", &[("GEAR-12T", 1)]),
            Some("offline-1"),
        )
        .await?;
    assert_eq!(o.status, 201, "{}", o.body);
    Ok(())
}

/// Goal: bad input at either API gets a clear JSON error with a stable code and stores nothing.
/// Method: send unauthenticated, oversized, malformed and invalid requests; check codes and that
/// the agent's sequence and central's revision did not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_change_nothing() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().expect("quic");
    let c = Api::new(&central);
    let agent = fleet.start_agent("plant-1", &quic, &[])?;
    let a = Api::new(&agent);
    let rev = push_demo_master(&c, &["plant-1"]).await?;
    wait_master(&a, rev).await?;

    let anon = Api {
        token: "wrong".into(),
        ..a.clone()
    };
    let r = anon.get("/v1/health").await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    let r = anon
        .post("/v1/orders", &order("ACME", &[("BOLT-M8", 1)]), Some("k"))
        .await?;
    assert_eq!(r.status, 401);
    let no_header = a.http.get(format!("{}/v1/health", a.base)).send().await?;
    assert_eq!(no_header.status().as_u16(), 401);

    let cases: Vec<(Value, Option<&str>, u16, &str)> = vec![
        (
            order("ACME", &[("BOLT-M8", 1)]),
            None,
            400,
            "missing_idempotency_key",
        ),
        (
            order("NOBODY", &[("BOLT-M8", 1)]),
            Some("k1"),
            422,
            "unknown_customer",
        ),
        (
            order("ACME", &[("NOPE", 1)]),
            Some("k2"),
            422,
            "unknown_sku",
        ),
        (
            order("ACME", &[("BOLT-M8", 0)]),
            Some("k3"),
            422,
            "validation_failed",
        ),
        (
            order("ACME", &[("BOLT-M8", -4)]),
            Some("k4"),
            422,
            "validation_failed",
        ),
        (order("ACME", &[]), Some("k5"), 422, "validation_failed"),
        (json!({"customer_id": "ACME"}), Some("k6"), 400, "bad_json"),
        (
            json!({"customer_id": "ACME", "lines": [], "extra": 1}),
            Some("k7"),
            400,
            "bad_json",
        ),
    ];
    for (body, key, status, code) in cases {
        let r = a.post("/v1/orders", &body, key).await?;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {}",
            r.body
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let bad_ms = json!({"event_id": "e1", "milestone": "teleported", "scanner_id": "s", "at": "2026-01-01T00:00:00Z"});
    let r = a
        .post("/v1/shipments/SH-1/milestones", &bad_ms, None)
        .await?;
    assert!(r.status == 400 || r.status == 422, "{}", r.body);
    let bad_time =
        json!({"event_id": "e2", "milestone": "picked", "scanner_id": "s", "at": "yesterday"});
    let r = a
        .post("/v1/shipments/SH-1/milestones", &bad_time, None)
        .await?;
    assert_eq!(r.status, 422, "{}", r.body);

    let big = json!({"customer_id": "ACME", "lines": [{"sku": "x".repeat(200_000), "qty": 1}]});
    let r = a.post("/v1/orders", &big, Some("big")).await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );

    let raw = a
        .http
        .post(format!("{}/v1/orders", a.base))
        .bearer_auth(&a.token)
        .header("Idempotency-Key", "raw")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(raw.status().as_u16(), 400);
    let v: Value = raw.json().await?;
    assert_eq!(v["error"]["code"], "bad_json");

    let h = health(&a).await?;
    assert_eq!(h["last_seq"], 0, "no 4xx stored anything: {h}");
    assert_eq!(a.get("/v1/nowhere").await?.status, 404);

    // Central: same rules.
    let anon_c = Api {
        token: "nope".into(),
        ..c.clone()
    };
    assert_eq!(anon_c.get("/v1/events").await?.status, 401);
    let r = c
        .put("/v1/master/prices", &json!([{"sku": "OK-1", "customer": null, "unit_price": "1", "currency": "EUR"},
                                           {"sku": "", "customer": null, "unit_price": "1", "currency": "EUR"}]))
        .await?;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "validation_failed");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains('1'),
        "names the index: {}",
        r.body
    );
    let r = c
        .put(
            "/v1/master/atp",
            &json!([{"sku": "A", "site": "plant-1", "available": -1}]),
        )
        .await?;
    assert_eq!(r.status, 422);
    let huge: Vec<Value> = (0..60_000)
        .map(|i| json!({"sku": format!("SKU-{i}"), "customer": null, "unit_price": "1.00", "currency": "EUR"}))
        .collect();
    let r = c.put("/v1/master/prices", &Value::Array(huge)).await?;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(
        c.get("/v1/master/revision").await?.body["revision"].as_u64(),
        Some(rev),
        "nothing stored"
    );
    Ok(())
}

/// Goal: central killed with SIGKILL as a backlog starts draining (where exactly the kill lands,
/// before a commit, inside one or between a commit and its ack, varies from run to run) loses
/// nothing and applies nothing twice once it is back.
/// Method: build a backlog of 3,000 milestones with central down, start central and SIGKILL it
/// as soon as the agent's session is up (three rounds, 0, 3 and 6 ms later), restart it on the
/// same ports and data directory, and check the feed holds each acknowledged milestone exactly
/// once. The outbox depth at each kill is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_killed_mid_drain_applies_each_event_once() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let mut central = fleet.start_central(None)?;
    let pinned = central.ready.clone();
    let quic = pinned.quic.clone().expect("quic");
    // A short backoff cap so the agent reconnects promptly after each restart of central.
    let agent = fleet.start_agent(
        "plant-1",
        &quic,
        &[("OUTPOST_SYNC__BACKOFF_MAX_MS", "100".to_string())],
    )?;
    let a = Api::new(&agent);
    assert!(central.terminate()?);

    const TOTAL: usize = 3_000;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..TOTAL).step_by(8) {
                let id = format!("drain-{i}");
                let r = a
                    .post(
                        &format!("/v1/shipments/SHD-{i}/milestones"),
                        &milestone(&id, "loaded"),
                        None,
                    )
                    .await?;
                anyhow::ensure!(r.status == 201, "{}: {} {}", id, r.status, r.body);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(health(&a).await?["outbox_depth"], TOTAL as u64);

    let mut kills = Vec::new();
    let mut depth = TOTAL as u64;
    for round in 0..3 {
        let mut c = fleet.start_central(Some(&pinned))?;
        // Kill as soon as the drain is seen to start (or the agent reports the session), polling
        // tightly and boundedly; later rounds wait a little longer into the drain.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let h = health(&a).await?;
            let d = h["outbox_depth"].as_u64().unwrap_or(depth);
            if d < depth || h["connected"] == true || std::time::Instant::now() > deadline {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(round * 3)).await; // the fault's timing
        c.kill9()?;
        depth = health(&a).await?["outbox_depth"].as_u64().unwrap_or(depth);
        kills.push(depth);
    }
    eprintln!("outbox depth after each SIGKILL of central: {kills:?}");

    let central = fleet.start_central(Some(&pinned))?;
    let c = Api::new(&central);
    wait_drained(&a).await?;
    let feed = read_feed(&c).await?;
    let counts = ids_by_count(&feed, "plant-1");
    assert_eq!(
        counts.len(),
        TOTAL,
        "every acknowledged milestone is at central"
    );
    assert!(counts.values().all(|n| *n == 1), "none applied twice");
    assert_eq!(feed.len(), TOTAL);
    Ok(())
}
