//! Central's HTTP API for the ERP and operators (axum): master-data upserts, the event feed,
//! central's own order channel and the order lifecycle, the exception queue, dead letters,
//! reconciliation reports, the ledger view, the fleet view and health. I/O shell over the store
//! and the session registry; every error is the JSON shape `{"error": {"code", "message"}}` with
//! a stable code (some errors add fields beside those two).

// The handlers, by family; `crate::router` mounts them.
pub(crate) mod drills;
pub(crate) mod feed;
pub(crate) mod fleet;
pub(crate) mod master;
pub(crate) mod ops;
pub(crate) mod orders;
pub(crate) mod status;
pub mod views;

pub use outpost_protocol::secret::constant_time_eq;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

pub use orders::{IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_LEN};
pub use views::event_json;

use crate::config::{ApiClient, Role};
use crate::registry::Registry;
use crate::store::{ReadError, Store, StoreUnavailable};
pub use crate::timefmt::rfc3339_ms;

/// Most items in one master-data upsert: one request, one transaction; larger loads are split by
/// the caller so that a single commit stays short.
pub const MAX_MASTER_ITEMS: usize = 10_000;
/// `GET` route of the Prometheus metrics (`metrics.rs`); any role may read it.
pub const METRICS_ROUTE: &str = "/metrics";
/// Default page size of `GET /v1/events`.
pub const DEFAULT_EVENTS_LIMIT: u64 = 100;
/// Largest page of `GET /v1/events`: bounds one response to a few hundred KiB.
pub const MAX_EVENTS_LIMIT: u64 = 1_000;
/// Longest a request may take end to end (a full master upsert waits for one group commit).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most validation problems spelled out in one 422 message; the count of the rest is given.
pub const MAX_REPORTED_PROBLEMS: usize = 20;

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub clients: Arc<Clients>,
    /// Central's data directory (backups are written under it).
    pub data_dir: std::path::PathBuf,
}

impl ApiState {
    /// Runs a store read on tokio's blocking pool and maps its error: redb reads block (a page
    /// cache miss waits for the disk, a list scans up to a page of rows), so handlers never run
    /// them on the async workers that serve every other request and the sync sessions.
    pub async fn read<T, E, F>(&self, read: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        E: Into<ApiError> + Send + 'static,
        F: FnOnce(&Store) -> Result<T, E> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("the read task failed: {e}"),
                )
            })?
            .map_err(Into::into)
    }
}

/// Who made a request: the client's configured name and role (never its token). The
/// authentication layer puts it in the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    pub role: Role,
}

/// The API's clients as the authentication layer uses them: name, role and token hash.
pub struct Clients(Vec<(Caller, [u8; 32])>);

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(c, _)| c))
            .finish()
    }
}

impl Clients {
    /// From the validated `[[api.tokens]]`; clients whose hash does not parse are left out
    /// (`validate` refuses such a config).
    pub fn from_config(clients: &[ApiClient]) -> Clients {
        Clients(
            clients
                .iter()
                .filter_map(|c| {
                    let caller = Caller {
                        name: Arc::from(c.name.as_str()),
                        role: c.role,
                    };
                    c.hash_bytes().map(|h| (caller, h))
                })
                .collect(),
        )
    }

    /// Clients given by plain tokens (tests and tools that generate their own).
    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = (&'a str, Role, &'a str)>) -> Clients {
        Clients(
            tokens
                .into_iter()
                .map(|(name, role, token)| {
                    let hash = crate::config::parse_sha256_hex(&crate::config::sha256_hex(token))
                        .expect("sha256_hex gives 64 lower-case hex digits");
                    (
                        Caller {
                            name: Arc::from(name),
                            role,
                        },
                        hash,
                    )
                })
                .collect(),
        )
    }

    /// The client whose token hashes to the presented token's hash. Every client's hash is
    /// compared, in time independent of where hashes differ, so timing tells nothing about
    /// which client, if any, nearly matched.
    pub fn authenticate(&self, presented: &str) -> Option<&Caller> {
        let hash = outpost_protocol::secret::hash_token(presented.as_bytes());
        let mut found = None;
        for (caller, expected) in &self.0 {
            if constant_time_eq(&hash, expected) && found.is_none() {
                found = Some(caller);
            }
        }
        found
    }
}

/// An API error: status, stable machine-readable code and a human sentence, and optionally more
/// fields for machines (for instance the SKU and free quantity of an `insufficient_atp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Option<Map<String, Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }
    /// Adds the fields of `extra` (a JSON object) beside `code` and `message`.
    pub fn with(mut self, extra: Value) -> Self {
        if let Value::Object(m) = extra {
            self.extra = Some(m);
        }
        self
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }
    pub(crate) fn forbidden(caller: &Caller, needed: Role) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this route needs the {} role; client {:?} has the {} role",
                needed.as_str(),
                &*caller.name,
                caller.role.as_str()
            ),
        )
        .with(json!({"needed_role": needed.as_str()}))
    }
    fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }
    fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_json", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = self.extra.unwrap_or_default();
        err.insert("code".into(), json!(self.code));
        err.insert("message".into(), json!(self.message));
        let body = json!({ "error": err });
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreUnavailable> for ApiError {
    fn from(e: StoreUnavailable) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Unavailable(u) => u.into(),
            ReadError::Corrupt(m) => {
                tracing::error!(error = %m, "corrupt record in the store");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "a stored record could not be read",
                )
            }
        }
    }
}

/// A JSON body extractor whose rejections are API errors: 413 `body_too_large` when the body
/// exceeds the limit, 400 `bad_json` for anything unparsable, of the wrong type or with unknown
/// fields. The content type is not required: the body is JSON by contract.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body exceeds the configured limit (api.max_body_bytes)",
                )
            } else {
                ApiError::bad_json(format!("cannot read the request body: {}", rej.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_json(format!("invalid JSON body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::router;
    use outpost_protocol::Money;
    use outpost_protocol::{EventBody, EventEnvelope, Milestone, MilestoneKind};
    use tokio::net::TcpListener;

    const TOKEN: &str = "test-token-0123456789abcdef";

    struct Harness {
        base: String,
        client: reqwest::Client,
        store: Store,
        _dir: tempfile::TempDir,
    }

    async fn start(max_body: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("central.redb")).unwrap();
        let state = ApiState {
            store: store.clone(),
            data_dir: std::env::temp_dir(),
            registry: Arc::new(Registry::new()),
            clients: Arc::new(super::Clients::from_tokens([(
                "admin",
                crate::config::Role::Admin,
                TOKEN,
            )])),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state, max_body);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Harness {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            store,
            _dir: dir,
        }
    }

    impl Harness {
        fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
            self.client
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(TOKEN)
        }
    }

    async fn error_code(resp: reqwest::Response) -> (u16, String, String) {
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        (
            status,
            v["error"]["code"].as_str().unwrap().to_string(),
            v["error"]["message"].as_str().unwrap().to_string(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_or_wrong_token_is_401_even_for_unknown_routes() {
        let h = start(1 << 20).await;
        let no_token = h
            .client
            .get(format!("{}/v1/health", h.base))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(no_token).await.0, 401);
        let wrong = h
            .client
            .put(format!("{}/v1/master/prices", h.base))
            .bearer_auth("test-token-0123456789abcdeX")
            .body("[]")
            .send()
            .await
            .unwrap();
        let (s, code, _) = error_code(wrong).await;
        assert_eq!((s, code.as_str()), (401, "unauthorized"));
        let unknown = h
            .client
            .get(format!("{}/nope", h.base))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status().as_u16(), 401);
        let ok = h
            .req(reqwest::Method::GET, "/v1/health")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status().as_u16(), 200);
        let v: Value = ok.json().await.unwrap();
        assert_eq!(
            v,
            json!({"status": "ok", "revision": 0, "sites_connected": 0})
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        h.store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_body_is_413_json_and_nothing_is_stored() {
        let h = start(1024).await;
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"sku": format!("SKU-{i}"), "customer": null, "unit_price": "1.00", "currency": "EUR"}))
            .collect();
        let resp = h
            .req(reqwest::Method::PUT, "/v1/master/prices")
            .json(&items)
            .send()
            .await
            .unwrap();
        let (s, code, _) = error_code(resp).await;
        assert_eq!((s, code.as_str()), (413, "body_too_large"));
        assert_eq!(h.store.revision().unwrap(), 0);
        h.store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_items_are_422_naming_the_index_and_bad_json_is_400() {
        let h = start(1 << 20).await;
        let body = json!([
            {"sku": "BOLT-M8", "customer": null, "unit_price": "0.12", "currency": "EUR"},
            {"sku": "BOLT-M8", "customer": "C1", "unit_price": "0.10", "currency": "EUR"},
            {"sku": "bad sku!", "unit_price": "1", "currency": "EUR"},
            {"sku": "NUT-M8", "unit_price": "-1", "currency": "EUR"},
        ]);
        let resp = h
            .req(reqwest::Method::PUT, "/v1/master/prices")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (s, code, msg) = error_code(resp).await;
        assert_eq!((s, code.as_str()), (422, "validation_failed"));
        assert!(msg.contains("[2]") && msg.contains("[3]"), "{msg}");
        assert!(!msg.contains("[0]") && !msg.contains("[1]"), "{msg}");
        assert_eq!(h.store.revision().unwrap(), 0, "nothing stored on 422");

        let resp = h
            .req(reqwest::Method::PUT, "/v1/master/prices")
            .json(&json!([]))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(resp).await.1, "validation_failed");

        for bad in [
            "{not json",
            r#"[{"sku": "A", "unit_price": "1", "currency": "EUR", "extra": 1}]"#,
            r#"[{"sku": 5, "unit_price": "1", "currency": "EUR"}]"#,
        ] {
            let resp = h
                .req(reqwest::Method::PUT, "/v1/master/prices")
                .body(bad)
                .send()
                .await
                .unwrap();
            let (s, code, _) = error_code(resp).await;
            assert_eq!((s, code.as_str()), (400, "bad_json"), "{bad}");
        }

        let resp = h
            .req(reqwest::Method::PUT, "/v1/master/atp")
            .json(&json!([{"sku": "BOLT-M8", "site": "plant-1", "available": 40}]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = resp.json().await.unwrap();
        // The push also tops plant-1 up to the ATP target: one grant, revision 2.
        assert_eq!(
            v,
            json!({"revision": 2, "changes": 1, "grants": 1, "reclaims": 0})
        );

        let resp = h
            .req(reqwest::Method::DELETE, "/v1/master/atp")
            .send()
            .await
            .unwrap();
        let (s, code, _) = error_code(resp).await;
        assert_eq!((s, code.as_str()), (405, "method_not_allowed"));
        let resp = h
            .req(reqwest::Method::GET, "/v1/nope")
            .send()
            .await
            .unwrap();
        let (s, code, _) = error_code(resp).await;
        assert_eq!((s, code.as_str()), (404, "not_found"));
        h.store.close().await;
    }

    #[test]
    fn order_events_flatten_with_money_as_strings() {
        use crate::store::{Channel, StoredEvent};
        use outpost_protocol::{EventBody, LinePromise, Order, OrderLine};
        let e = StoredEvent {
            cursor: 7,
            site: "plant-1".into(),
            channel: Channel::Site,
            event: EventEnvelope::new(
                "plant-1",
                3,
                "plant-1-o3",
                -5,
                &EventBody::Order(Order {
                    order_id: "plant-1-o3".into(),
                    customer_id: "C-ACME".into(),
                    status: "partial".into(),
                    lines: vec![
                        OrderLine {
                            sku: "BOLT-M8".into(),
                            qty: 40,
                            unit_price: Money(1_000),
                            currency: "EUR".into(),
                            promise: LinePromise::Confirmed,
                        },
                        OrderLine {
                            sku: "NUT-M8".into(),
                            qty: 5,
                            unit_price: Money(500),
                            currency: "EUR".into(),
                            promise: LinePromise::PendingAllowance,
                        },
                    ],
                    master_rev: 9,
                    offline: true,
                }),
            ),
        };
        assert_eq!(
            event_json(&e),
            json!({
                "cursor": 7, "site": "plant-1", "seq": 3, "kind": "order", "id": "plant-1-o3",
                "site_time": "1970-01-01T00:00:00.000Z", "channel": "site",
                "trace_id": outpost_protocol::derived_trace_id("plant-1", 3, "plant-1-o3"),
                "order_id": "plant-1-o3", "customer_id": "C-ACME", "status": "uploaded",
                "promise_status": "partial", "offline": true, "master_rev": 9,
                "lines": [
                    {"sku": "BOLT-M8", "qty": 40, "unit_price": "0.10", "currency": "EUR",
                     "promise": "confirmed"},
                    {"sku": "NUT-M8", "qty": 5, "unit_price": "0.05", "currency": "EUR",
                     "promise": "pending_allowance"}
                ]
            })
        );
        assert_eq!(rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_paged_by_cursor_completely_and_flattened() {
        let h = start(1 << 20).await;
        let batch: Vec<EventEnvelope> = (1..=25)
            .map(|seq| {
                EventEnvelope::new(
                    "plant-1",
                    seq,
                    &format!("ev-{seq}"),
                    1_767_225_600_000,
                    &EventBody::Milestone(Milestone {
                        shipment_id: "SH-1".into(),
                        milestone: MilestoneKind::Loaded,
                        scanner_id: "scan-7".into(),
                        at: "2026-01-01T00:00:00Z".into(),
                    }),
                )
            })
            .collect();
        h.store.ingest("plant-1", batch).await.unwrap();

        let mut after = 0u64;
        let mut seqs = Vec::new();
        loop {
            let resp = h
                .req(
                    reqwest::Method::GET,
                    &format!("/v1/events?after={after}&limit=10"),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let v: Value = resp.json().await.unwrap();
            let events = v["events"].as_array().unwrap();
            let next = v["next"].as_u64().unwrap();
            if events.is_empty() {
                assert_eq!(next, after, "next stays at after when the page is empty");
                break;
            }
            assert!(events.len() <= 10);
            assert_eq!(next, events.last().unwrap()["cursor"].as_u64().unwrap());
            for e in events {
                seqs.push(e["seq"].as_u64().unwrap());
            }
            after = next;
        }
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>());

        let v: Value = h
            .req(reqwest::Method::GET, "/v1/events?limit=1")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["events"][0],
            json!({
                "cursor": 1, "site": "plant-1", "seq": 1, "kind": "milestone", "id": "ev-1",
                "site_time": "2026-01-01T00:00:00.000Z", "channel": "site", "shipment_id": "SH-1",
                "trace_id": outpost_protocol::derived_trace_id("plant-1", 1, "ev-1"),
                "milestone": "loaded", "scanner_id": "scan-7", "at": "2026-01-01T00:00:00Z"
            })
        );
        for bad in [
            "/v1/events?limit=0",
            "/v1/events?limit=1001",
            "/v1/events?after=x",
        ] {
            let resp = h.req(reqwest::Method::GET, bad).send().await.unwrap();
            assert_eq!(error_code(resp).await.1, "validation_failed", "{bad}");
        }
        let sites: Value = h
            .req(reqwest::Method::GET, "/v1/sites")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(sites[0]["site"], "plant-1");
        assert_eq!(sites[0]["acked_seq"], 25);
        assert_eq!(sites[0]["connected"], false);
        assert!(sites[0]["last_seen"].is_string());
        h.store.close().await;
    }
}
