//! Order routes of central's API: its own sales channel (`POST /v1/orders`), an order's state
//! (`GET /v1/orders/{id}`) and the ERP's decision on it (`POST /v1/orders/{id}/status`). I/O
//! shell over the store.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost_protocol::{
    ErpStatus, MAX_ORDER_LINES, MAX_QTY, Money, identity::validate_site_id, validate_id,
    validate_text,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::views::{central_order_json, order_json};
use super::{ApiError, ApiJson, ApiState};
use crate::store::{CentralOrderError, CentralOrderRequest, DecideError};

pub use outpost_protocol::{IDEMPOTENCY_KEY_HEADER as IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_LEN};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CentralOrderIn {
    customer_id: String,
    site: String,
    lines: Vec<LineIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn {
    sku: String,
    qty: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DecisionIn {
    status: String,
    #[serde(default)]
    reason: Option<String>,
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

fn validate_order(o: &CentralOrderIn) -> Result<(), ApiError> {
    let mut problems = Vec::new();
    if let Err(e) = validate_id("customer_id", &o.customer_id) {
        problems.push(e.to_string());
    }
    if validate_site_id(&o.site).is_err() {
        problems.push("site must be a site id (lower-case letters, digits, '-')".to_string());
    }
    if o.lines.is_empty() || o.lines.len() > MAX_ORDER_LINES {
        problems.push(format!(
            "an order has 1..={MAX_ORDER_LINES} lines, got {}",
            o.lines.len()
        ));
    }
    for (i, l) in o.lines.iter().enumerate() {
        if let Err(e) = validate_id("sku", &l.sku) {
            problems.push(format!("lines[{i}]: {e}"));
        }
        if !(1..=MAX_QTY).contains(&l.qty) {
            problems.push(format!(
                "lines[{i}]: qty must be 1..={MAX_QTY}, got {}",
                l.qty
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::validation(problems.join("; ")))
    }
}

fn order_error(e: CentralOrderError) -> ApiError {
    let conflict = StatusCode::CONFLICT;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let msg = e.to_string();
    match e {
        CentralOrderError::KeyReused => ApiError::new(unprocessable, "idempotency_key_reused", msg),
        CentralOrderError::UnknownCustomer(_) => {
            ApiError::new(unprocessable, "unknown_customer", msg)
        }
        CentralOrderError::CreditHold(_) => ApiError::new(conflict, "credit_hold", msg),
        CentralOrderError::UnknownSku(_) => ApiError::new(unprocessable, "unknown_sku", msg),
        CentralOrderError::NoPrice { .. } => ApiError::new(unprocessable, "no_price", msg),
        CentralOrderError::InsufficientAtp {
            sku,
            site,
            free,
            wanted,
        } => ApiError::new(conflict, "insufficient_atp", msg).with(json!({
            "sku": sku, "site": site, "free": free, "wanted": wanted,
        })),
        CentralOrderError::InsufficientCredit {
            customer,
            free,
            wanted,
        } => ApiError::new(
            conflict,
            "insufficient_credit",
            format!(
                "insufficient credit for customer {customer}: {} free, {} wanted",
                Money(free),
                Money(wanted)
            ),
        )
        .with(json!({
            "customer_id": customer, "free": Money(free), "wanted": Money(wanted),
        })),
        CentralOrderError::Invalid(m) => ApiError::validation(m),
        CentralOrderError::Unavailable(u) => u.into(),
    }
}

/// `POST /v1/orders`: central's own channel. The key is checked before the body is parsed.
pub(crate) async fn post_order(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Result<ApiJson<CentralOrderIn>, ApiError>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let ApiJson(o) = body?;
    validate_order(&o)?;
    let req = CentralOrderRequest {
        customer_id: o.customer_id,
        site: o.site,
        lines: o.lines.into_iter().map(|l| (l.sku, l.qty)).collect(),
    };
    let out = st
        .store
        .central_order(&key, req)
        .await
        .map_err(order_error)?;
    if !out.replayed {
        tracing::info!(order.id = %out.order.order_id, site.id = %out.order.site, "central order confirmed");
    }
    Ok((StatusCode::CREATED, Json(central_order_json(&out.order))).into_response())
}

fn order_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) if validate_id("order_id", &id).is_ok() => Ok(id),
        _ => Err(ApiError::not_found("no such order")),
    }
}

/// `GET /v1/orders/{order_id}`
pub(crate) async fn get_order(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = order_id(path)?;
    match st.store.order(&id)? {
        Some(o) => Ok(Json(order_json(&o))),
        None => Err(ApiError::not_found("no such order")),
    }
}

/// `POST /v1/orders/{order_id}/status`: the ERP accepts, rejects or flags an order. A site's
/// order gets the decision pushed down to the site.
pub(crate) async fn post_status(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<DecisionIn>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let id = order_id(path)?;
    let ApiJson(d) = body?;
    let status = match d.status.as_str() {
        "accepted" => ErpStatus::Accepted,
        "rejected" => ErpStatus::Rejected,
        "needs_review" => ErpStatus::NeedsReview,
        other => {
            return Err(ApiError::validation(format!(
                "status must be accepted, rejected or needs_review, got {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    if let Some(r) = &d.reason {
        validate_text("reason", r).map_err(|e| ApiError::validation(e.to_string()))?;
    }
    match st.store.decide_order(&id, status, d.reason).await {
        Ok(o) => {
            tracing::info!(order.id = %id, status = status.as_str(), "ERP decision recorded");
            Ok(Json(order_json(&o)))
        }
        Err(DecideError::NotFound) => Err(ApiError::not_found("no such order")),
        Err(e @ DecideError::AlreadyDecided(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_decided",
            e.to_string(),
        )),
        Err(e @ DecideError::InException(id)) => {
            Err(
                ApiError::new(StatusCode::CONFLICT, "order_in_exception", e.to_string())
                    .with(json!({"exception_id": id})),
            )
        }
        Err(DecideError::Unavailable(u)) => Err(u.into()),
    }
}
