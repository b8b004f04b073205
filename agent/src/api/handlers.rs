//! The API's handlers: health, ATP, allowances, prices and customers read from the store's
//! cache; orders (after an online allowance top-up when one would help) and milestones captured
//! through the store writer, with their W3C trace. Async shell: reads hit redb directly
//! (microseconds), writes await the writer. The router (`crate::router`) mounts them.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost_protocol::{IDEMPOTENCY_KEY_HEADER as IDEMPOTENCY_KEY, MilestoneKind, Pool};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::{ApiError, JsonBody};
use super::state::ApiState;
use crate::counters::ApiCounters;
use crate::store::{
    MilestoneRecord, NewLine, NewMilestone, NewOrder, OrderRecord, now_ms, rfc3339_millis,
};

/// A path id; anything that is not a valid id cannot exist, so it is a 404 on reads.
fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = p.map_err(|e| ApiError::not_found(e.body_text()))?;
    Ok(id)
}

#[derive(Serialize)]
pub(crate) struct Health {
    site: String,
    connected: bool,
    outbox_depth: u64,
    master_rev: u64,
    last_seq: u64,
    acked_seq: u64,
    /// Incarnation of central's store named by the last Welcome (0: none yet).
    central_incarnation: u64,
    stale_secs: Option<u64>,
    /// What the API boundary refused (401, 403, 429, connections) since the agent started.
    api: serde_json::Value,
    /// Sync protocol version of the latest session with central (`None` before the first).
    protocol_version: Option<u16>,
    /// The central address of the current or last connection attempt (one of
    /// `[sync] central_addr`), and how often the agent moved to another one.
    central_addr: Option<String>,
    central_address_switches: u64,
    /// `trusted`, or `untrusted` with the reason: the agent does not connect to central (nor
    /// renew its certificate) while the wall clock is before a sane date.
    clock: serde_json::Value,
    /// The site certificate's expiry and its renewals over the sync connection.
    certificate: serde_json::Value,
}

pub(crate) async fn health(
    State(s): State<Arc<ApiState>>,
    counters: Arc<ApiCounters>,
) -> Result<axum::Json<Health>, ApiError> {
    let m = s.store.marks()?;
    Ok(axum::Json(Health {
        site: s.site.clone(),
        connected: s.link.is_connected(),
        outbox_depth: m.outbox_depth(),
        master_rev: m.master_rev,
        last_seq: m.last_seq,
        acked_seq: m.acked_seq,
        central_incarnation: m.central_incarnation,
        stale_secs: s.link.stale_secs(now_ms()),
        api: counters.json(),
        protocol_version: s.link.protocol_version(),
        central_addr: s.link.central_addr(),
        central_address_switches: s.link.address_switches(),
        clock: match s.link.clock_untrusted() {
            None => json!({ "trusted": true }),
            Some(reason) => json!({ "trusted": false, "reason": reason }),
        },
        certificate: {
            let c = s.link.certificate();
            json!({
                "not_after": c.not_after.map(|t| rfc3339_millis(t.saturating_mul(1000))),
                "expires_in_days": c.not_after.map(|t| (t - now_ms() / 1000).div_euclid(86_400)),
                "renewals": c.renewals,
                "renewed_at": c.renewed_at_ms.map(rfc3339_millis),
                "last_renewal_error": c.last_error,
            })
        },
    }))
}

pub(crate) async fn atp(
    State(s): State<Arc<ApiState>>,
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

pub(crate) async fn allowances(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
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
pub(crate) struct PriceQuery {
    customer: Option<String>,
}

pub(crate) async fn price(
    State(s): State<Arc<ApiState>>,
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

pub(crate) async fn customer(
    State(s): State<Arc<ApiState>>,
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
pub(crate) struct OrderRequest {
    customer_id: String,
    lines: Vec<LineRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LineRequest {
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
    /// W3C trace id the order was recorded under.
    trace_id: &'a str,
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
        trace_id: &r.trace_id,
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

/// The trace a request's event is recorded under: the client's `traceparent` when it is valid,
/// else a fresh random id (W3C: an invalid header restarts the trace, it is not an error). The
/// request's span gets it, so every line logged about the request carries it.
fn request_trace_id(headers: &HeaderMap) -> String {
    let id = headers
        .get(outpost_protocol::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(outpost_protocol::parse_traceparent)
        .unwrap_or_else(|| outpost_protocol::trace_id_from_bytes(rand::random()));
    tracing::Span::current().record("trace_id", id.as_str());
    id
}

/// Adds the `traceresponse` header naming the trace the event was recorded under (on a retry,
/// the original request's) and records it on the request's span.
fn with_trace(mut resp: Response, trace_id: &str) -> Response {
    tracing::Span::current().record("trace_id", trace_id);
    let value = outpost_protocol::traceparent(trace_id, rand::random());
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut()
            .insert(outpost_protocol::TRACERESPONSE_HEADER, v);
    }
    resp
}

pub(crate) async fn create_order(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: JsonBody<OrderRequest>,
) -> Result<Response, ApiError> {
    let trace_id = request_trace_id(&headers);
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
    let outcome = s
        .store
        .create_order_traced(&key, order, now_ms(), offline, Some(trace_id))
        .await?;
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
    // A retry gets the original response, status and trace id included.
    let resp = (
        StatusCode::CREATED,
        axum::Json(order_json(&rec, OrderView::Captured)),
    )
        .into_response();
    Ok(with_trace(resp, &rec.trace_id))
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

pub(crate) async fn get_order(
    State(s): State<Arc<ApiState>>,
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
pub(crate) struct MilestoneRequest {
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
        "trace_id": r.trace_id,
    })
}

pub(crate) async fn record_milestone(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    shipment_id: Result<Path<String>, PathRejection>,
    body: JsonBody<MilestoneRequest>,
) -> Result<Response, ApiError> {
    let trace_id = request_trace_id(&headers);
    let Path(shipment_id) = shipment_id.map_err(|e| ApiError::validation(e.body_text()))?;
    let JsonBody(req) = body;
    let m = NewMilestone {
        event_id: req.event_id,
        shipment_id,
        milestone: req.milestone,
        scanner_id: req.scanner_id,
        at: req.at,
    };
    let outcome = s
        .store
        .record_milestone_traced(m, now_ms(), Some(trace_id))
        .await?;
    let created = outcome.is_created();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let rec = outcome.into_inner();
    if created {
        tracing::info!(
            event.id = %rec.request.event_id,
            seq = rec.seq,
            milestone = ?rec.request.milestone,
            "milestone captured"
        );
    }
    let resp = (status, axum::Json(milestone_json(&rec))).into_response();
    Ok(with_trace(resp, &rec.trace_id))
}
