//! HTTP tests of issue 3's routes against a real store and server: central's order channel,
//! ERP decisions, the exception queue, dead letters, reconciliation reports and the ledger view,
//! with their exact JSON shapes and error codes.

use std::sync::Arc;

use outpost_protocol::{EventBody, EventEnvelope, LinePromise, Money, Order, OrderLine};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::router;
use crate::api::ApiState;
use crate::registry::Registry;
use crate::store::Store;

const TOKEN: &str = "test-token-0123456789abcdef";

struct Harness {
    base: String,
    client: reqwest::Client,
    store: Store,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("central.redb")).unwrap();
    let state = ApiState {
        store: store.clone(),
        data_dir: std::env::temp_dir(),
        registry: Arc::new(Registry::new()),
        clients: Arc::new(crate::api::Clients::from_tokens([(
            "admin",
            crate::config::Role::Admin,
            TOKEN,
        )])),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state, 1 << 20)).await.unwrap() });
    Harness {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        store,
        _dir: dir,
    }
}

impl Harness {
    /// Sends a request; returns the status and the JSON body.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with(method, path, body, None).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn seed(&self, bolt_atp: i64) {
        for (path, body) in [
            (
                "/v1/master/customers",
                json!([
                    {"id": "C-ACME", "name": "Acme", "credit_limit": "1000.00", "on_hold": false},
                    {"id": "C-BETA", "name": "Beta", "credit_limit": "1000.00", "on_hold": false},
                ]),
            ),
            (
                "/v1/master/prices",
                json!([
                    {"sku": "BOLT-M8", "customer": null, "unit_price": "0.12", "currency": "EUR"},
                    {"sku": "BOLT-M8", "customer": "C-ACME", "unit_price": "0.10", "currency": "EUR"},
                ]),
            ),
            (
                "/v1/master/atp",
                json!([{"sku": "BOLT-M8", "site": "plant-1", "available": bolt_atp}]),
            ),
        ] {
            let (st, v) = self.call(Method::PUT, path, Some(body)).await;
            assert_eq!(st, 200, "{v}");
        }
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn site_order(seq: u64, customer: &str, qty: i64, price: i64, offline: bool) -> EventEnvelope {
    let id = format!("plant-1-o{seq}");
    EventEnvelope::new(
        "plant-1",
        seq,
        &id,
        1_767_225_600_000,
        &EventBody::Order(Order {
            order_id: id.clone(),
            customer_id: customer.into(),
            status: "confirmed".into(),
            lines: vec![OrderLine {
                sku: "BOLT-M8".into(),
                qty,
                unit_price: Money(price),
                currency: "EUR".into(),
                promise: LinePromise::Confirmed,
            }],
            master_rev: 4,
            offline,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_orders_compete_with_grants_and_get_erp_decisions() {
    let h = start().await;
    // ATP 30 at plant-1, 20 of it escrowed there by the push: 10 left for central's channel.
    h.seed(30).await;
    let body = json!({"customer_id": "C-ACME", "site": "plant-1", "lines": [{"sku": "BOLT-M8", "qty": 15}]});
    let (st, v) = h.call(Method::POST, "/v1/orders", Some(body.clone())).await;
    assert_eq!((st, code(&v)), (400, "missing_idempotency_key"));
    let (st, v) = h
        .call_with(Method::POST, "/v1/orders", Some(body), Some("k-1"))
        .await;
    assert_eq!((st, code(&v)), (409, "insufficient_atp"), "{v}");
    assert_eq!(v["error"]["sku"], "BOLT-M8");
    assert_eq!(v["error"]["free"], 10);
    assert!(v["error"]["message"].as_str().unwrap().contains("BOLT-M8"));

    let body = json!({"customer_id": "C-ACME", "site": "plant-1", "lines": [{"sku": "BOLT-M8", "qty": 10}]});
    let (st, created) = h
        .call_with(Method::POST, "/v1/orders", Some(body.clone()), Some("k-1"))
        .await;
    assert_eq!(st, 201, "{created}");
    assert_eq!(created["order_id"], "central-o1");
    assert_eq!(created["status"], "confirmed");
    assert_eq!(created["channel"], "central");
    assert_eq!(created["site"], "plant-1");
    assert_eq!(
        created["lines"],
        json!([{"sku": "BOLT-M8", "qty": 10, "unit_price": "0.10", "currency": "EUR", "promise": "confirmed"}])
    );
    let (st, again) = h
        .call_with(Method::POST, "/v1/orders", Some(body), Some("k-1"))
        .await;
    assert_eq!(
        (st, &again),
        (201, &created),
        "same key, same body, same answer"
    );
    let other = json!({"customer_id": "C-ACME", "site": "plant-1", "lines": [{"sku": "BOLT-M8", "qty": 1}]});
    let (st, v) = h
        .call_with(Method::POST, "/v1/orders", Some(other), Some("k-1"))
        .await;
    assert_eq!((st, code(&v)), (422, "idempotency_key_reused"));
    for (bad, want) in [
        (
            json!({"customer_id": "C-NOPE", "site": "plant-1", "lines": [{"sku": "BOLT-M8", "qty": 1}]}),
            "unknown_customer",
        ),
        (
            json!({"customer_id": "C-ACME", "site": "plant-1", "lines": [{"sku": "WHAT-1", "qty": 1}]}),
            "unknown_sku",
        ),
        (
            json!({"customer_id": "C-ACME", "site": "plant-1", "lines": []}),
            "validation_failed",
        ),
        (
            json!({"customer_id": "C-ACME", "site": "Plant 1", "lines": [{"sku": "BOLT-M8", "qty": 1}]}),
            "validation_failed",
        ),
    ] {
        let (st, v) = h
            .call_with(Method::POST, "/v1/orders", Some(bad), Some("k-2"))
            .await;
        assert_eq!((st, code(&v)), (422, want), "{v}");
    }

    let (st, o) = h.call(Method::GET, "/v1/orders/central-o1", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        (o["status"].as_str(), o["channel"].as_str()),
        (Some("uploaded"), Some("central"))
    );
    let (_, feed) = h.call(Method::GET, "/v1/events", None).await;
    let e = &feed["events"][0];
    assert_eq!(
        (e["kind"].as_str(), e["channel"].as_str()),
        (Some("order"), Some("central"))
    );
    assert_eq!(
        (e["site"].as_str(), e["promise_status"].as_str()),
        (Some("plant-1"), Some("confirmed"))
    );

    let (st, ledger) = h
        .call(Method::GET, "/v1/ledger?pool=atp:BOLT-M8@plant-1", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        ledger,
        json!([{"pool": "atp:BOLT-M8", "key": "atp:BOLT-M8@plant-1", "sku": "BOLT-M8",
                "site": "plant-1", "erp_available": 30, "in_transit": 10, "accepted_since_push": 0,
                "outstanding": {"plant-1": 20}, "free": 0, "open_reclaims": {}}])
    );
    let (_, same) = h
        .call(
            Method::GET,
            "/v1/ledger?pool=atp:BOLT-M8&site=plant-1",
            None,
        )
        .await;
    assert_eq!(same, ledger);
    let (_, all) = h.call(Method::GET, "/v1/ledger", None).await;
    assert_eq!(
        all.as_array().unwrap().len(),
        3,
        "one ATP and two credit pools: {all}"
    );
    assert_eq!(all[1]["pool"], "credit:C-ACME");
    assert_eq!(all[1]["site"], Value::Null);
    let (st, v) = h.call(Method::GET, "/v1/ledger?pool=bogus", None).await;
    assert_eq!((st, code(&v)), (422, "validation_failed"));

    let status = |s: &str| json!({"status": s, "reason": "ERP says so"});
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/orders/central-o1/status",
            Some(status("accepted")),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("accepted"), Some("ERP says so"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/orders/central-o1/status",
            Some(status("rejected")),
        )
        .await;
    assert_eq!((st, code(&v)), (409, "already_decided"));
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/orders/nope-1/status",
            Some(status("accepted")),
        )
        .await;
    assert_eq!((st, code(&v)), (404, "not_found"));
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/orders/central-o1/status",
            Some(status("maybe")),
        )
        .await;
    assert_eq!((st, code(&v)), (422, "validation_failed"));
    let (_, ledger) = h
        .call(Method::GET, "/v1/ledger?pool=atp:BOLT-M8@plant-1", None)
        .await;
    assert_eq!(
        (
            ledger[0]["in_transit"].as_i64(),
            ledger[0]["accepted_since_push"].as_i64()
        ),
        (Some(0), Some(10))
    );
    h.store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exception_queue_over_http() {
    let h = start().await;
    h.seed(100).await;
    // While plant-1 was offline the ERP cut Acme's price and put Beta on hold.
    h.call(
        Method::PUT,
        "/v1/master/prices",
        Some(json!([{"sku": "BOLT-M8", "customer": "C-ACME", "unit_price": "0.09", "currency": "EUR"}])),
    )
    .await;
    h.call(
        Method::PUT,
        "/v1/master/customers",
        Some(json!([{"id": "C-BETA", "name": "Beta", "credit_limit": "1000.00", "on_hold": true}])),
    )
    .await;
    let mut bad = site_order(3, "C-ACME", 1, 1000, true);
    bad.schema = 42;
    h.store
        .begin_session("plant-1", crate::store::HelloMarks::with_last_seq(3))
        .await
        .unwrap();
    h.store
        .ingest(
            "plant-1",
            vec![
                site_order(1, "C-ACME", 4, 1000, true),
                site_order(2, "C-BETA", 2, 1200, true),
                bad,
            ],
        )
        .await
        .unwrap();

    let (st, list) = h.call(Method::GET, "/v1/exceptions", None).await;
    assert_eq!(st, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let e = &list[0];
    assert_eq!(e["id"], 1);
    assert_eq!(e["site"], "plant-1");
    assert_eq!(e["seq"], 1);
    assert_eq!(e["event_id"], "plant-1-o1");
    assert_eq!(e["class"], "business");
    assert_eq!(e["reasons"], json!(["price_changed"]));
    assert_eq!(e["status"], "open");
    assert_eq!(e["event"]["order_id"], "plant-1-o1");
    assert_eq!(e["event"]["offline"], true);
    assert_eq!(e["site_data"]["master_rev"], 4);
    assert_eq!(
        e["site_data"]["lines"],
        json!([{"sku": "BOLT-M8", "site_unit_price": "0.10", "site_currency": "EUR",
                "central_unit_price": "0.09", "central_currency": "EUR"}])
    );
    assert_eq!(e["site_data"]["allowance"][0]["pool"], "atp:BOLT-M8");
    assert_eq!(e["site_data"]["allowance"][0]["consumed"], 4);
    assert_eq!(e["site_data"]["allowance"][0]["outstanding_before"], 20);
    assert_eq!(e["resolution"], Value::Null);
    assert!(e["created_at"].is_string());
    // Beta's credit was never escrowed at plant-1 (on hold when the site connected), so its
    // confirmed line is an overrun too; the hold is the primary reason.
    assert_eq!(
        list[1]["reasons"],
        json!(["credit_hold", "allowance_overrun"])
    );
    assert_eq!(list[1]["reason"], "credit_hold");

    let (st, one) = h.call(Method::GET, "/v1/exceptions/1", None).await;
    assert_eq!((st, &one), (200, e));
    for missing in ["/v1/exceptions/99", "/v1/exceptions/abc"] {
        let (st, v) = h.call(Method::GET, missing, None).await;
        assert_eq!((st, code(&v)), (404, "not_found"));
    }
    let (st, o) = h.call(Method::GET, "/v1/orders/plant-1-o1", None).await;
    assert_eq!(
        (st, o["status"].as_str(), o["exception_id"].as_u64()),
        (200, Some("exception"), Some(1))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/orders/plant-1-o1/status",
            Some(json!({"status": "accepted"})),
        )
        .await;
    assert_eq!((st, code(&v)), (409, "order_in_exception"));

    // Replay fails until the price is put back, then passes into the feed.
    let (st, v) = h.call(Method::POST, "/v1/exceptions/1/replay", None).await;
    assert_eq!((st, code(&v)), (409, "still_failing"));
    assert_eq!(v["error"]["reasons"], json!(["price_changed"]));
    h.call(
        Method::PUT,
        "/v1/master/prices",
        Some(json!([{"sku": "BOLT-M8", "customer": "C-ACME", "unit_price": "0.10", "currency": "EUR"}])),
    )
    .await;
    let (st, v) = h.call(Method::POST, "/v1/exceptions/1/replay", None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["resolution"]["action"].as_str()),
        (Some("resolved"), Some("replayed"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/exceptions/1/resolve",
            Some(json!({"action": "accept"})),
        )
        .await;
    assert_eq!((st, code(&v)), (409, "already_resolved"));

    // Rejecting needs a reason; then the order is rejected with it.
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/exceptions/2/resolve",
            Some(json!({"action": "reject"})),
        )
        .await;
    assert_eq!((st, code(&v)), (422, "validation_failed"));
    let (st, v) = h
        .call(
            Method::POST,
            "/v1/exceptions/2/resolve",
            Some(json!({"action": "reject", "reason": "customer on credit hold"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["resolution"]["action"], "reject");
    let (_, o) = h.call(Method::GET, "/v1/orders/plant-1-o2", None).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("rejected"), Some("customer on credit hold"))
    );

    let (_, open) = h.call(Method::GET, "/v1/exceptions", None).await;
    assert_eq!(open, json!([]));
    let (_, all) = h.call(Method::GET, "/v1/exceptions?status=all", None).await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (st, v) = h
        .call(Method::GET, "/v1/exceptions?status=maybe", None)
        .await;
    assert_eq!((st, code(&v)), (422, "validation_failed"));
    let (_, feed) = h.call(Method::GET, "/v1/events", None).await;
    let ids: Vec<&str> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["plant-1-o1"]);

    let (st, dead) = h.call(Method::GET, "/v1/dead-letters", None).await;
    assert_eq!(st, 200);
    assert_eq!(dead.as_array().unwrap().len(), 1);
    assert_eq!(
        (dead[0]["id"].as_u64(), dead[0]["seq"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(dead[0]["event_id"], "plant-1-o3");
    assert_eq!(dead[0]["class"], "permanent");
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("schema version 42")
    );

    let (st, reports) = h
        .call(Method::GET, "/v1/sites/plant-1/reconciliations", None)
        .await;
    assert_eq!(st, 200);
    let r = &reports[0];
    assert_eq!(r["session"], 1);
    assert_eq!(r["dark_since"], Value::Null);
    assert_eq!(
        (r["hello_last_seq"].as_u64(), r["hwm_at_connect"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(r["events_uploaded"], 3);
    assert_eq!(r["orders_offline_confirmed"], 2);
    assert_eq!(r["exceptions_business"], 2);
    assert_eq!(r["dead_letters"], 1);
    assert_eq!(r["exceptions"], json!({"business": 2, "permanent": 1}));
    assert!(r["catch_up_ms"].is_u64());
    let (st, v) = h
        .call(Method::GET, "/v1/sites/plant-9/reconciliations", None)
        .await;
    assert_eq!((st, v), (200, json!([])));
    h.store.close().await;
}
