//! HTTP tests of the API's security boundary against a real store and server: hashed clients
//! with roles (erp may not use operator routes: 403 `forbidden` before the body is read; no or a
//! wrong token: 401), site revocation and reinstatement as the fleet view shows them and as the
//! live session is told, and the fleet view's clock offsets. Also guards that the feed follows
//! sequence numbers, never the sites' clocks.

use std::sync::Arc;

use outpost_protocol::{EventBody, EventEnvelope, Milestone, MilestoneKind};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::router;
use crate::api::{ApiState, Clients};
use crate::config::Role;
use crate::registry::{EndSignal, Registry};
use crate::store::Store;

const ADMIN: &str = "admin-token-0123456789abcdef";
const ERP: &str = "erp-token-0123456789abcdef";
const MAX_BODY: usize = 4096;

struct Harness {
    base: String,
    client: reqwest::Client,
    store: Store,
    registry: Arc<Registry>,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("central.redb")).unwrap();
    let registry = Arc::new(Registry::new());
    let state = ApiState {
        store: store.clone(),
        data_dir: std::env::temp_dir(),
        registry: registry.clone(),
        clients: Arc::new(Clients::from_tokens([
            ("erp", Role::Erp, ERP),
            ("ops", Role::Admin, ADMIN),
        ])),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router(state, MAX_BODY))
            .await
            .unwrap()
    });
    Harness {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        store,
        registry,
        _dir: dir,
    }
}

impl Harness {
    async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn sites(&self) -> Vec<Value> {
        let (st, v) = self.call(Some(ERP), Method::GET, "/v1/sites", None).await;
        assert_eq!(st, 200, "{v}");
        v.as_array().unwrap().clone()
    }
}

fn milestone(seq: u64, at_ms: i64) -> EventEnvelope {
    EventEnvelope::new(
        "plant-1",
        seq,
        &format!("ev-{seq}"),
        at_ms,
        &EventBody::Milestone(Milestone {
            shipment_id: "SH-1".into(),
            milestone: MilestoneKind::Loaded,
            scanner_id: "scan-1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        }),
    )
}

/// Goal: the erp role reaches its routes and nothing else; a refusal comes before the body is
/// read. Method: call every admin-only route with the erp token and a body larger than the body
/// limit (403, not 413), then the erp routes (2xx), then without and with a wrong token (401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erp_is_refused_admin_routes_before_the_body_is_read() {
    let h = start().await;
    let huge = "x".repeat(MAX_BODY * 4);
    for (method, path) in [
        (Method::POST, "/v1/exceptions/1/resolve"),
        (Method::POST, "/v1/exceptions/1/replay"),
        (Method::GET, "/v1/dead-letters"),
        (Method::GET, "/v1/ledger"),
        (Method::POST, "/v1/sites/plant-1/revoke"),
        (Method::DELETE, "/v1/sites/plant-1/revoke"),
        (Method::POST, "/v1/drills"),
        (Method::POST, "/v1/drills/1/abort"),
        (Method::POST, "/v1/backup"),
    ] {
        let (st, v) = h
            .call(Some(ERP), method.clone(), path, Some(huge.clone()))
            .await;
        assert_eq!(st, 403, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "forbidden", "{v}");
        assert_eq!(v["error"]["needed_role"], "admin", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("admin") && msg.contains("\"erp\""), "{msg}");
        assert!(!msg.contains(ERP), "the token is never echoed: {msg}");
    }
    assert!(
        h.store.revoked_sites().unwrap().is_empty(),
        "nothing revoked"
    );
    assert!(h.store.drills(10).unwrap().is_empty(), "no drill started");

    let prices =
        json!([{"sku": "BOLT-M8", "customer": null, "unit_price": "0.12", "currency": "EUR"}]);
    let (st, v) = h
        .call(
            Some(ERP),
            Method::PUT,
            "/v1/master/prices",
            Some(prices.to_string()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for path in [
        "/v1/master/revision",
        "/v1/events",
        "/v1/health",
        "/v1/sites",
        "/v1/exceptions",
        "/v1/sites/plant-1/reconciliations",
        "/v1/drills",
    ] {
        let (st, v) = h.call(Some(ERP), Method::GET, path, None).await;
        assert_eq!(st, 200, "{path}: {v}");
    }
    let (st, v) = h
        .call(Some(ERP), Method::GET, "/v1/exceptions/9", None)
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (st, v) = h
        .call(Some(ERP), Method::GET, "/v1/orders/nope", None)
        .await;
    assert_ne!(st, 403, "{v}");

    // Admin may use the operator routes.
    for path in ["/v1/dead-letters", "/v1/ledger"] {
        let (st, v) = h.call(Some(ADMIN), Method::GET, path, None).await;
        assert_eq!(st, 200, "{path}: {v}");
    }
    // No token, a wrong one, or a prefix of a real one: 401 everywhere, also on admin routes.
    for token in [None, Some("erp-token-0123456789abcdeX"), Some(&ERP[..20])] {
        for (method, path) in [
            (Method::GET, "/v1/health"),
            (Method::POST, "/v1/sites/plant-1/revoke"),
            (Method::GET, "/v1/nope"),
        ] {
            let (st, v) = h.call(token, method, path, Some(huge.clone())).await;
            assert_eq!(st, 401, "{path} with {token:?}: {v}");
            assert_eq!(v["error"]["code"], "unauthorized");
        }
    }
    h.store.close().await;
}

/// Goal: revoking puts the site on the deny list, ends its live session at once and shows in
/// the fleet view; reinstating undoes it. Method: a registered session stands in for a live
/// connection; revoke and reinstate over HTTP and look at the ticket and `GET /v1/sites`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_the_live_session_and_shows_in_the_fleet_view() {
    let h = start().await;
    let mut ticket = h.registry.register("plant-1");
    h.registry.set_clock_offset("plant-1", -7_200_000);
    let sites = h.sites().await;
    assert_eq!(sites[0]["site"], "plant-1");
    assert_eq!(sites[0]["connected"], true);
    assert_eq!(sites[0]["revoked"], false);
    assert_eq!(sites[0]["clock_offset_ms"], -7_200_000);

    let body = json!({"reason": "laptop stolen"}).to_string();
    let (st, v) = h
        .call(
            Some(ADMIN),
            Method::POST,
            "/v1/sites/plant-1/revoke",
            Some(body.clone()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["revoked"], true);
    assert_eq!(v["was_connected"], true);
    assert_eq!(ticket.end.try_recv(), Ok(EndSignal::Revoked));
    let sites = h.sites().await;
    assert_eq!(sites[0]["connected"], false);
    assert_eq!(sites[0]["revoked"], true);
    assert_eq!(sites[0]["revoked_reason"], "laptop stolen");
    assert!(sites[0]["revoked_at"].is_string());

    // A site that never connected may be revoked ahead of time; bad ids and bodies are refused.
    let (st, _) = h
        .call(
            Some(ADMIN),
            Method::POST,
            "/v1/sites/warehouse-9/revoke",
            Some("{}".into()),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = h
        .call(
            Some(ADMIN),
            Method::POST,
            "/v1/sites/bad%20id/revoke",
            Some("{}".into()),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (422, Some("validation_failed"))
    );
    let (st, v) = h
        .call(
            Some(ADMIN),
            Method::POST,
            "/v1/sites/plant-2/revoke",
            Some(r#"{"why": 1}"#.into()),
        )
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (400, Some("bad_json")));
    let listed: Vec<String> = h
        .sites()
        .await
        .iter()
        .filter(|s| s["revoked"] == true)
        .map(|s| s["site"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, vec!["plant-1", "warehouse-9"]);

    let (st, v) = h
        .call(
            Some(ADMIN),
            Method::DELETE,
            "/v1/sites/plant-1/revoke",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["was_revoked"], true);
    let sites = h.sites().await;
    assert_eq!(sites[0]["revoked"], false);
    assert_eq!(sites[0]["revoked_reason"], Value::Null);
    h.store.close().await;
}

/// Goal: guards against ordering or refusing events by the site's clock. Method: upload events
/// whose timestamps run backwards by hours (and one far in the future); the feed keeps them all,
/// in sequence order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_follows_sequence_numbers_not_site_clocks() {
    let h = start().await;
    let base = 1_767_225_600_000;
    let hour = 3_600_000;
    let batch: Vec<EventEnvelope> = vec![
        milestone(1, base),
        milestone(2, base - 5 * hour),
        milestone(3, base + 30 * 24 * hour),
        milestone(4, base - 48 * hour),
        milestone(5, 0),
    ];
    let out = h.store.ingest("plant-1", batch).await.unwrap();
    assert_eq!((out.stored, out.dead_letters, out.exceptions), (5, 0, 0));
    let (st, v) = h.call(Some(ERP), Method::GET, "/v1/events", None).await;
    assert_eq!(st, 200);
    let seqs: Vec<u64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    h.store.close().await;
}
