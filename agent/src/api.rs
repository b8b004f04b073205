//! The agent's local HTTP API (axum): reads from the store's cache and allowances, order and
//! milestone capture through the store writer (after an online allowance top-up when one would
//! help), JSON errors with stable codes. Async shell: handlers read redb directly (microseconds)
//! and await the writer for writes.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_protocol::{MilestoneKind, Pool};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::store::{
    MilestoneRecord, NewLine, NewMilestone, NewOrder, OrderRecord, ReadError, Store, WriteError,
    now_ms, rfc3339_millis,
};
use crate::sync::LinkState;
use crate::topup::TopUp;

pub use outpost_protocol::{IDEMPOTENCY_KEY_HEADER as IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_LEN};

/// Most requests handled at once; more wait for a slot. Far above what a site's scanners and
/// screens need, low enough to bound the memory and writer-queue pressure one client can cause.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 512;
/// Longest a request may take before it is answered 408 `timeout`. A write that commits after
/// that is still durable; the client's retry with the same key gets the original response.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub site: String,
    pub tokens: Arc<Vec<String>>,
    /// Whether the sync session with central is up and when central was last heard from (set by
    /// the sync task).
    pub link: Arc<LinkState>,
    /// Asks central for more allowance while an order waits; `None`: never ask.
    pub topup: Option<TopUp>,
    pub max_body_bytes: usize,
}

/// An error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_json", message)
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }

    fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Unavailable(_) => {
                tracing::error!(error = %e, "store read failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
            ReadError::Corrupt(_) => {
                tracing::error!(error = %e, "store read found a corrupt record");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
        let (status, code) = match &e {
            WriteError::Validation(_) => (unprocessable, "validation_failed"),
            WriteError::UnknownCustomer(_) => (unprocessable, "unknown_customer"),
            WriteError::UnknownSku(_) => (unprocessable, "unknown_sku"),
            WriteError::NoPrice { .. } => (unprocessable, "no_price"),
            WriteError::IdempotencyKeyReused => (unprocessable, "idempotency_key_reused"),
            WriteError::EventIdReused(_) => (unprocessable, "event_id_reused"),
            WriteError::OutboxFull(_) | WriteError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            WriteError::BadMasterBatch(_)
            | WriteError::AckBeyondLast { .. }
            | WriteError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "store write failed");
        }
        Self::new(status, code, e.to_string())
    }
}

/// A JSON body parsed with our error shape: over the limit → 413 `body_too_large`, anything
/// malformed (syntax, types, missing or unknown fields) → 400 `bad_json`. The content type is not
/// required: scanners and PLC gateways often omit it.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or_default();
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_json(rej.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_json(format!("invalid JSON body: {e}")))
    }
}

/// The configured body limit, passed to `JsonBody` for its error message.
#[derive(Clone, Copy)]
struct BodyLimit(usize);

/// The router with every route, the auth and body-limit layers and JSON fallbacks.
pub fn router(state: ApiState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/atp/{sku}", get(atp))
        .route("/v1/allowances", get(allowances))
        .route("/v1/prices/{sku}", get(price))
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{order_id}", get(get_order))
        .route(
            "/v1/shipments/{shipment_id}/milestones",
            post(record_milestone),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        // Outermost: authentication, then the declared-length check, both before any body byte
        // is read.
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::from_fn(json_timeout))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            MAX_IN_FLIGHT_REQUESTS,
        ))
        // One span per request (method, path), around everything else.
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The timeout layer answers with an empty 408; give it the JSON error shape.
async fn json_timeout(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status() == StatusCode::REQUEST_TIMEOUT {
        return ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took longer than {REQUEST_TIMEOUT:?}; retry with the same Idempotency-Key"),
        )
        .into_response();
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept this method",
    )
}

/// Compares in time independent of where the first difference is (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(headers: &HeaderMap, tokens: &[String]) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let token = token.trim().as_bytes();
    // Check every configured token so the time taken does not say which one matched.
    tokens
        .iter()
        .fold(false, |ok, t| constant_time_eq(t.as_bytes(), token) | ok)
}

/// Bearer authentication and the declared body length, checked before the body is read.
async fn guard(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    if !authorized(req.headers(), &state.tokens) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
        .into_response();
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return ApiError::too_large(state.max_body_bytes).into_response();
    }
    req.extensions_mut().insert(BodyLimit(state.max_body_bytes));
    next.run(req).await
}

/// A path id; anything that is not a valid id cannot exist, so it is a 404 on reads.
fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = p.map_err(|e| ApiError::not_found(e.body_text()))?;
    Ok(id)
}

#[derive(Serialize)]
struct Health {
    site: String,
    connected: bool,
    outbox_depth: u64,
    master_rev: u64,
    last_seq: u64,
    acked_seq: u64,
    stale_secs: Option<u64>,
}

async fn health(State(s): State<ApiState>) -> Result<axum::Json<Health>, ApiError> {
    let m = s.store.marks()?;
    Ok(axum::Json(Health {
        site: s.site.clone(),
        connected: s.link.is_connected(),
        outbox_depth: m.outbox_depth(),
        master_rev: m.master_rev,
        last_seq: m.last_seq,
        acked_seq: m.acked_seq,
        stale_secs: s.link.stale_secs(now_ms()),
    }))
}

async fn atp(
    State(s): State<ApiState>,
    sku: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let sku = path_id(sku)?;
    let Some(v) = s.store.atp_view(&sku)? else {
        return Err(ApiError::not_found(format!("no ATP for SKU {sku:?}")));
    };
    // What the site can confirm on its own is its allowance, not the ERP's figure: the rest of
    // the ERP's ATP may be escrowed for other sites or sold by central.
    Ok(axum::Json(json!({
        "sku": sku,
        "available": v.allowance,
        "allowance": v.allowance,
        "erp_available": v.erp_available,
        "master_rev": v.master_rev,
        "as_of": v.as_of_ms.map(rfc3339_millis),
        "stale_secs": s.link.stale_secs(now_ms()),
    }))
    .into_response())
}

fn pool_json(pool: &Pool, remaining: i64) -> serde_json::Value {
    match pool {
        Pool::Atp { sku } => json!({
            "pool": pool.key(),
            "kind": "atp",
            "sku": sku,
            "remaining": remaining,
        }),
        // Credit is kept in money units; `amount` is the same figure as a decimal string.
        Pool::Credit { customer } => json!({
            "pool": pool.key(),
            "kind": "credit",
            "customer": customer,
            "remaining": remaining,
            "amount": outpost_protocol::Money(remaining),
        }),
    }
}

async fn allowances(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let (pools, truncated) = s.store.allowances()?;
    let m = s.store.marks()?;
    let list: Vec<_> = pools.iter().map(|(p, r)| pool_json(p, *r)).collect();
    Ok(axum::Json(json!({
        "master_rev": m.master_rev,
        "as_of": s.store.as_of_ms()?.map(rfc3339_millis),
        "stale_secs": s.link.stale_secs(now_ms()),
        "allowances": list,
        "truncated": truncated,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct PriceQuery {
    customer: Option<String>,
}

async fn price(
    State(s): State<ApiState>,
    sku: Result<Path<String>, PathRejection>,
    q: Result<Query<PriceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let sku = path_id(sku)?;
    let Query(q) = q.map_err(|e| ApiError::validation(e.body_text()))?;
    let customer = q.customer.filter(|c| !c.is_empty());
    let Some(p) = s.store.price(&sku, customer.as_deref())? else {
        return Err(ApiError::not_found(format!("no price for SKU {sku:?}")));
    };
    Ok(axum::Json(json!({
        "sku": sku,
        "customer": customer,
        "unit_price": p.unit_price,
        "currency": p.currency,
    }))
    .into_response())
}

async fn customer(
    State(s): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id)?;
    let Some(c) = s.store.customer(&id)? else {
        return Err(ApiError::not_found(format!("no customer {id:?}")));
    };
    Ok(axum::Json(json!({
        "id": c.id,
        "name": c.name,
        "credit_limit": c.credit_limit,
        "on_hold": c.on_hold,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderRequest {
    customer_id: String,
    lines: Vec<LineRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest {
    sku: String,
    qty: i64,
}

#[derive(Serialize)]
struct LineResponse<'a> {
    sku: &'a str,
    qty: i64,
    unit_price: outpost_protocol::Money,
    currency: &'a str,
    promise: &'static str,
    reason: &'a str,
}

#[derive(Serialize)]
struct OrderResponse<'a> {
    order_id: &'a str,
    status: &'a str,
    customer_id: &'a str,
    lines: Vec<LineResponse<'a>>,
    seq: u64,
    created_at: String,
    offline: bool,
    master_rev: u64,
    erp_status: Option<&'static str>,
    erp_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    synced: Option<bool>,
    /// Where the order is in its life: `captured` (only here), `uploaded` (central has it
    /// durably), then the ERP's `accepted`, `rejected` or `needs_review`.
    #[serde(skip_serializing_if = "Option::is_none")]
    lifecycle: Option<&'static str>,
}

/// How an order is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OrderView {
    /// The answer to `POST /v1/orders`, first time or retried: the order as it was captured, so
    /// a retry gets exactly the original response (no ERP decision, no sync state).
    Captured,
    /// `GET /v1/orders/{id}`: the order now, with the ERP's decision and whether central has it.
    Current { synced: bool },
}

fn order_json(r: &OrderRecord, view: OrderView) -> serde_json::Value {
    let lines = r
        .order
        .lines
        .iter()
        .enumerate()
        .map(|(i, l)| LineResponse {
            sku: &l.sku,
            qty: l.qty,
            unit_price: l.unit_price,
            currency: &l.currency,
            promise: l.promise.as_str(),
            reason: r.reasons.get(i).map_or("", String::as_str),
        })
        .collect();
    let (erp_status, erp_reason, synced) = match view {
        OrderView::Captured => (None, None, None),
        OrderView::Current { synced } => (
            r.erp_status.map(|s| s.as_str()),
            r.erp_reason.as_deref(),
            Some(synced),
        ),
    };
    serde_json::to_value(OrderResponse {
        order_id: &r.order.order_id,
        status: &r.order.status,
        customer_id: &r.order.customer_id,
        lines,
        seq: r.seq,
        created_at: r.created_at(),
        offline: r.order.offline,
        master_rev: r.order.master_rev,
        erp_status,
        erp_reason,
        synced,
        lifecycle: synced.map(|up| match (erp_status, up) {
            (Some(decided), _) => decided,
            (None, true) => "uploaded",
            (None, false) => "captured",
        }),
    })
    .unwrap_or_default()
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "POST /v1/orders requires an Idempotency-Key header",
        ));
    };
    outpost_protocol::parse_idempotency_key(v.as_bytes())
        .map_err(|e| ApiError::validation(e.to_string()))
}

async fn create_order(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: JsonBody<OrderRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let JsonBody(req) = body;
    let order = NewOrder {
        customer_id: req.customer_id,
        lines: req
            .lines
            .into_iter()
            .map(|l| NewLine {
                sku: l.sku,
                qty: l.qty,
            })
            .collect(),
    };
    top_up_for(&s, &key, &order).await;
    // Whether the site could reach central when it took the order, for central's reconciliation.
    let offline = !s.link.is_connected();
    let outcome = s.store.create_order(&key, order, now_ms(), offline).await?;
    let created = outcome.is_created();
    let rec = outcome.into_inner();
    if created {
        tracing::info!(
            order.id = %rec.order.order_id,
            seq = rec.seq,
            status = %rec.order.status,
            offline,
            "order captured"
        );
    }
    // A retry gets the original response, status included.
    Ok((
        StatusCode::CREATED,
        axum::Json(order_json(&rec, OrderView::Captured)),
    )
        .into_response())
}

/// While central is reachable, asks it for whatever allowance the order lacks, within the
/// configured deadline. Best effort: any failure just leaves lines pending. The writer re-checks
/// everything in the order's transaction, so a race with other orders cannot oversell. A retry
/// of a stored order asks for nothing: its answer is already decided.
async fn top_up_for(s: &ApiState, key: &str, order: &NewOrder) {
    let Some(topup) = &s.topup else { return };
    if !s.link.is_connected() || crate::store::validate_new_order(order).is_err() {
        return;
    }
    match s.store.has_order_key(key) {
        Ok(false) => {}
        Ok(true) => return,
        Err(e) => {
            tracing::debug!(error = %e, "no top-up: cannot read the store");
            return;
        }
    }
    let needs = match s.store.shortfalls(order) {
        Ok(n) if !n.is_empty() => n,
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(error = %e, "no top-up: cannot read the store");
            return;
        }
    };
    let started = std::time::Instant::now();
    let out = topup.request(needs).await;
    tracing::debug!(
        asked = out.asked,
        granted = out.granted,
        timed_out = out.timed_out,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "allowance top-up"
    );
}

async fn get_order(
    State(s): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id)?;
    let Some((rec, synced)) = s.store.order(&id)? else {
        return Err(ApiError::not_found(format!("no order {id:?}")));
    };
    Ok(axum::Json(order_json(&rec, OrderView::Current { synced })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MilestoneRequest {
    event_id: String,
    milestone: MilestoneKind,
    scanner_id: String,
    at: String,
}

fn milestone_json(r: &MilestoneRecord) -> serde_json::Value {
    json!({
        "event_id": r.request.event_id,
        "shipment_id": r.request.shipment_id,
        "milestone": r.request.milestone,
        "scanner_id": r.request.scanner_id,
        "at": r.request.at,
        "seq": r.seq,
    })
}

async fn record_milestone(
    State(s): State<ApiState>,
    shipment_id: Result<Path<String>, PathRejection>,
    body: JsonBody<MilestoneRequest>,
) -> Result<Response, ApiError> {
    let Path(shipment_id) = shipment_id.map_err(|e| ApiError::validation(e.body_text()))?;
    let JsonBody(req) = body;
    let m = NewMilestone {
        event_id: req.event_id,
        shipment_id,
        milestone: req.milestone,
        scanner_id: req.scanner_id,
        at: req.at,
    };
    let outcome = s.store.record_milestone(m, now_ms()).await?;
    let status = if outcome.is_created() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(milestone_json(&outcome.into_inner()))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreWriter;
    use crate::testutil::{catalogue, grants};
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use outpost_protocol::{
        CustomerRecord, ErpStatus, MasterBatch, MasterChange, Money, OrderStatusUpdate,
    };
    use serde_json::Value;
    use tower::ServiceExt;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    struct Fixture {
        app: Router,
        store: Store,
        writer: Option<StoreWriter>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
            store.apply_master(catalogue(0, 5)).await.unwrap();
            // 10 gears and 100.00 of ACME's credit for this site.
            let allowance = [
                (Pool::atp("GEAR-12T"), 10),
                (Pool::credit("ACME"), 1_000_000),
            ];
            store.apply_master(grants(5, 6, &allowance)).await.unwrap();
            let app = router(ApiState {
                store: store.clone(),
                site: "plant-1".into(),
                tokens: Arc::new(vec![TOKEN.to_string()]),
                link: Arc::new(LinkState::default()),
                topup: None,
                max_body_bytes: 65536,
            });
            Fixture {
                app,
                store,
                writer: Some(writer),
                _dir: dir,
            }
        }

        async fn send(&self, req: HttpRequest<Body>) -> (u16, Value) {
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let v = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&bytes)));
            (status, v)
        }

        async fn get(&self, path: &str) -> (u16, Value) {
            self.send(
                HttpRequest::get(path)
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
        }

        async fn post(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
            let mut b = HttpRequest::post(path)
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json");
            if let Some(k) = key {
                b = b.header("idempotency-key", k);
            }
            self.send(b.body(Body::from(body.to_string())).unwrap())
                .await
        }

        async fn last_seq(&self) -> u64 {
            self.store.marks().unwrap().last_seq
        }

        async fn close(mut self) {
            if let Some(w) = self.writer.take() {
                w.shutdown().await;
            }
        }
    }

    fn code(v: &Value) -> &str {
        v["error"]["code"].as_str().unwrap_or("")
    }

    /// Goal: no token or a wrong one is 401 JSON on every route, known or not, before any body
    /// is looked at.
    #[tokio::test]
    async fn unauthorized_without_a_valid_token() {
        let f = Fixture::new().await;
        let (st, v) = f
            .send(HttpRequest::get("/v1/health").body(Body::empty()).unwrap())
            .await;
        assert_eq!((st, code(&v)), (401, "unauthorized"));
        let (st, v) = f
            .send(
                HttpRequest::post("/v1/orders")
                    .header("authorization", "Bearer wrong-token-wrong-token")
                    .header("content-length", "999999999")
                    .body(Body::from("{"))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            (st, code(&v)),
            (401, "unauthorized"),
            "auth before the body"
        );
        let (st, _) = f
            .send(
                HttpRequest::get("/nowhere")
                    .header("authorization", format!("Basic {TOKEN}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(st, 401);
        let (st, v) = f.get("/v1/health").await;
        assert_eq!(st, 200);
        assert_eq!(v["site"], "plant-1");
        assert_eq!(v["connected"], false);
        assert_eq!(v["master_rev"], 6);
        f.close().await;
    }

    /// Goal: a body over the limit is refused with 413 JSON, whether its length is declared or
    /// it is streamed, and nothing is stored.
    #[tokio::test]
    async fn over_the_limit_is_413_json() {
        let f = Fixture::new().await;
        let big = format!(
            r#"{{"customer_id":"ACME","lines":[{{"sku":"{}","qty":1}}]}}"#,
            "x".repeat(100_000)
        );
        let (st, v) = f.post("/v1/orders", &big, Some("k")).await;
        assert_eq!((st, code(&v)), (413, "body_too_large"));
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: a chunked body without a declared length is cut off at the limit by the extractor,
    /// over a real socket, with the same 413 JSON.
    #[tokio::test]
    async fn chunked_body_over_the_limit_is_413_json() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = Fixture::new().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = f.app.clone();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
             idempotency-key: k\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 8192];
        for _ in 0..16 {
            let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
            c.extend_from_slice(&chunk);
            c.extend_from_slice(b"\r\n");
            if sock.write_all(&c).await.is_err() {
                break; // the server may answer and close before the whole body is sent
            }
        }
        let _ = sock.write_all(b"0\r\n\r\n").await;
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            sock.read_to_end(&mut resp),
        )
        .await;
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("\"body_too_large\""), "{text}");
        server.abort();
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: malformed JSON, wrong types, missing and unknown fields are 400 `bad_json`; a
    /// missing key is 400 `missing_idempotency_key`; nothing is stored.
    #[tokio::test]
    async fn bad_json_and_missing_key() {
        let f = Fixture::new().await;
        let good = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1}]}"#;
        let (st, v) = f.post("/v1/orders", good, None).await;
        assert_eq!((st, code(&v)), (400, "missing_idempotency_key"));
        for body in [
            "{not json",
            r#"{"customer_id":"ACME"}"#,
            r#"{"customer_id":"ACME","lines":[],"extra":1}"#,
            r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":"one"}]}"#,
            r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1.5}]}"#,
        ] {
            let (st, v) = f.post("/v1/orders", body, Some("k")).await;
            assert_eq!((st, code(&v)), (400, "bad_json"), "{body}: {v}");
            assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        }
        let (st, v) = f
            .post(
                "/v1/shipments/SH-1/milestones",
                r#"{"event_id":"e1","milestone":"teleported","scanner_id":"s","at":"2026-01-01T00:00:00Z"}"#,
                None,
            )
            .await;
        assert_eq!((st, code(&v)), (400, "bad_json"));
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: semantic refusals are 422 with their own codes, and store nothing.
    #[tokio::test]
    async fn validation_and_unknown_references_are_422() {
        let f = Fixture::new().await;
        let cases = [
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":0}]}"#,
                "validation_failed",
            ),
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":-4}]}"#,
                "validation_failed",
            ),
            (r#"{"customer_id":"ACME","lines":[]}"#, "validation_failed"),
            (
                r#"{"customer_id":"NOBODY","lines":[{"sku":"GEAR-12T","qty":1}]}"#,
                "unknown_customer",
            ),
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"NOPE","qty":1}]}"#,
                "unknown_sku",
            ),
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"SPECIAL","qty":1}]}"#,
                "no_price",
            ),
        ];
        for (i, (body, expected)) in cases.into_iter().enumerate() {
            let (st, v) = f.post("/v1/orders", body, Some(&format!("k{i}"))).await;
            assert_eq!((st, code(&v)), (422, expected), "{body}: {v}");
        }
        let long_key = "k".repeat(129);
        let good = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1}]}"#;
        let (st, v) = f.post("/v1/orders", good, Some(&long_key)).await;
        assert_eq!((st, code(&v)), (422, "validation_failed"));
        let (st, v) = f
            .post(
                "/v1/shipments/SH-1/milestones",
                r#"{"event_id":"e2","milestone":"picked","scanner_id":"s","at":"yesterday"}"#,
                None,
            )
            .await;
        assert_eq!((st, code(&v)), (422, "validation_failed"));
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: the order round trip: 201 with priced lines, a retry gets the same response, a
    /// different body under the key is refused, and the order reads back with `synced`.
    #[tokio::test]
    async fn order_capture_and_retry() {
        let f = Fixture::new().await;
        let body = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":2}]}"#;
        let (st, first) = f.post("/v1/orders", body, Some("key-1")).await;
        assert_eq!(st, 201, "{first}");
        assert_eq!(first["order_id"], "plant-1-o1");
        assert_eq!(first["status"], "confirmed");
        assert_eq!(first["lines"][0]["unit_price"], "11.00");
        assert_eq!(first["lines"][0]["currency"], "EUR");
        assert_eq!(first["lines"][0]["promise"], "confirmed");
        assert!(
            first["lines"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("8 left")
        );
        assert_eq!(first["seq"], 1);
        assert_eq!(first["offline"], true, "no link to central in this fixture");
        assert_eq!(first["master_rev"], 6);
        assert!(first["erp_status"].is_null() && first["erp_reason"].is_null());
        assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
        // Same body, different formatting: the same request.
        let spaced = r#"{ "lines": [ {"qty": 2, "sku": "GEAR-12T"} ], "customer_id": "ACME" }"#;
        let (st, again) = f.post("/v1/orders", spaced, Some("key-1")).await;
        assert_eq!((st, &again), (201, &first));
        let other = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":3}]}"#;
        let (st, v) = f.post("/v1/orders", other, Some("key-1")).await;
        assert_eq!((st, code(&v)), (422, "idempotency_key_reused"));
        let (st, o) = f.get("/v1/orders/plant-1-o1").await;
        assert_eq!(st, 200);
        assert_eq!(o["synced"], false);
        assert_eq!(o["lifecycle"], "captured", "not yet at central: {o}");
        assert_eq!(o["lines"], first["lines"]);
        f.store.mark_acked(1).await.unwrap();
        assert_eq!(f.get("/v1/orders/plant-1-o1").await.1["synced"], true);
        assert_eq!(f.get("/v1/orders/plant-1-o9").await.0, 404);
        assert_eq!(f.last_seq().await, 1);
        f.close().await;
    }

    #[tokio::test]
    async fn milestone_capture_and_retry() {
        let f = Fixture::new().await;
        let m = r#"{"event_id":"evt-42","milestone":"loaded","scanner_id":"scanner-7","at":"2026-11-26T10:00:00Z"}"#;
        let (st, first) = f.post("/v1/shipments/SH-9/milestones", m, None).await;
        assert_eq!(st, 201, "{first}");
        assert_eq!(first["shipment_id"], "SH-9");
        assert_eq!(first["milestone"], "loaded");
        assert_eq!(first["seq"], 1);
        let (st, again) = f.post("/v1/shipments/SH-9/milestones", m, None).await;
        assert_eq!((st, &again), (200, &first));
        let changed = m.replace("loaded", "departed");
        let (st, v) = f
            .post("/v1/shipments/SH-9/milestones", &changed, None)
            .await;
        assert_eq!((st, code(&v)), (422, "event_id_reused"));
        // Same event id on another shipment is a different body too.
        let (st, v) = f.post("/v1/shipments/SH-10/milestones", m, None).await;
        assert_eq!((st, code(&v)), (422, "event_id_reused"));
        assert_eq!(f.last_seq().await, 1);
        f.close().await;
    }

    /// Goal: a customer's own price wins; otherwise the list price, echoing the customer asked.
    #[tokio::test]
    async fn prices_customer_versus_list() {
        let f = Fixture::new().await;
        let (st, v) = f.get("/v1/prices/GEAR-12T?customer=ACME").await;
        assert_eq!(st, 200);
        assert_eq!(
            (v["unit_price"].as_str(), v["customer"].as_str()),
            (Some("11.00"), Some("ACME"))
        );
        let (_, v) = f.get("/v1/prices/GEAR-12T?customer=GLOBEX").await;
        assert_eq!(
            (v["unit_price"].as_str(), v["customer"].as_str()),
            (Some("12.50"), Some("GLOBEX"))
        );
        let (_, v) = f.get("/v1/prices/GEAR-12T").await;
        assert_eq!(v["unit_price"], "12.50");
        assert!(v["customer"].is_null());
        assert_eq!(v["currency"], "EUR");
        assert_eq!(f.get("/v1/prices/SPECIAL").await.0, 404);
        assert_eq!(
            f.get("/v1/prices/SPECIAL?customer=GLOBEX").await.1["unit_price"],
            "5.00"
        );
        assert_eq!(f.get("/v1/prices/NOPE").await.0, 404);
        let (st, v) = f.get("/v1/atp/GEAR-12T").await;
        assert_eq!(
            (st, v["available"].as_i64(), v["master_rev"].as_u64()),
            (200, Some(10), Some(6)),
            "available is the site's allowance: {v}"
        );
        assert_eq!(v["erp_available"], 40);
        assert_eq!(f.get("/v1/atp/NOPE").await.0, 404);
        let (st, v) = f.get("/v1/customers/ACME").await;
        assert_eq!(
            (st, v["name"].as_str(), v["credit_limit"].as_str()),
            (200, Some("Acme Corp"), Some("50000.00"))
        );
        assert_eq!(v["on_hold"], false);
        assert_eq!(f.get("/v1/customers/NOBODY").await.0, 404);
        f.close().await;
    }

    /// Goal: an order beyond the allowance answers per line (promise + reason) and as a whole
    /// (status, offline); the allowance and ATP views show what is left, the ERP figure, the
    /// revision and its age; the ERP's decision shows on GET while a retried POST still gets
    /// the original response.
    #[tokio::test]
    async fn partial_orders_allowances_and_erp_status() {
        let f = Fixture::new().await;
        // 10 gears allowed: 6 fit, the next 6 do not (4 left), 3 fit. 9 × 11.00 = 99.00 fits
        // the 100.00 of credit.
        let body = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":6},{"sku":"GEAR-12T","qty":6},{"sku":"GEAR-12T","qty":3}]}"#;
        let (st, first) = f.post("/v1/orders", body, Some("p-1")).await;
        assert_eq!(st, 201, "{first}");
        assert_eq!(first["status"], "partial");
        let promises: Vec<&str> = first["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["promise"].as_str().unwrap())
            .collect();
        assert_eq!(promises, ["confirmed", "pending_allowance", "confirmed"]);
        let reason = first["lines"][1]["reason"].as_str().unwrap();
        assert!(reason.contains("has 4 left"), "{reason}");
        assert_eq!(first["offline"], true);
        assert!(first.get("synced").is_none());

        let (st, v) = f.get("/v1/atp/GEAR-12T").await;
        assert_eq!(st, 200);
        assert_eq!(
            (v["available"].as_i64(), v["allowance"].as_i64()),
            (Some(1), Some(1))
        );
        assert_eq!(v["erp_available"], 40);
        assert!(v["as_of"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v["stale_secs"].is_null(), "never heard from central: {v}");
        let (st, v) = f.get("/v1/allowances").await;
        assert_eq!(st, 200);
        let list = v["allowances"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{v}");
        assert_eq!(
            (&list[0]["pool"], &list[0]["kind"], &list[0]["remaining"]),
            (&json!("atp:GEAR-12T"), &json!("atp"), &json!(1))
        );
        assert_eq!(
            (&list[1]["pool"], &list[1]["remaining"], &list[1]["amount"]),
            (&json!("credit:ACME"), &json!(10_000), &json!("1.00"))
        );

        let decision = MasterBatch {
            from_rev: 6,
            through_rev: 7,
            changes: vec![MasterChange::OrderStatus(OrderStatusUpdate {
                site: "plant-1".into(),
                order_id: "plant-1-o1".into(),
                status: ErpStatus::NeedsReview,
                reason: Some("line 2 pending".into()),
            })],
        };
        f.store.apply_master(decision).await.unwrap();
        let (_, o) = f.get("/v1/orders/plant-1-o1").await;
        assert_eq!(o["erp_status"], "needs_review");
        assert_eq!(o["erp_reason"], "line 2 pending");
        assert_eq!(o["lines"], first["lines"]);
        let (st, again) = f.post("/v1/orders", body, Some("p-1")).await;
        assert_eq!(
            (st, &again),
            (201, &first),
            "a retry gets the original response"
        );

        // A customer on hold: every line pending_hold, nothing consumed.
        let hold = MasterBatch {
            from_rev: 7,
            through_rev: 8,
            changes: vec![MasterChange::Customer(CustomerRecord {
                id: "ACME".into(),
                name: "Acme Corp".into(),
                credit_limit: Money::parse("50000").unwrap(),
                on_hold: true,
            })],
        };
        f.store.apply_master(hold).await.unwrap();
        let one = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1}]}"#;
        let (_, v) = f.post("/v1/orders", one, Some("p-2")).await;
        assert_eq!(v["status"], "pending");
        assert_eq!(v["lines"][0]["promise"], "pending_hold");
        assert_eq!(f.get("/v1/atp/GEAR-12T").await.1["available"], 1);
        f.close().await;
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_json() {
        let f = Fixture::new().await;
        let (st, v) = f.get("/v1/nowhere").await;
        assert_eq!((st, code(&v)), (404, "not_found"));
        let (st, v) = f.post("/v1/health", "{}", None).await;
        assert_eq!((st, code(&v)), (405, "method_not_allowed"));
        f.close().await;
    }
}
