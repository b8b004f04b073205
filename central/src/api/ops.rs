//! Operator routes of central's API: the exception queue (list, show, resolve, replay), dead
//! letters, per-site reconciliation reports, a read-only view of the allowance ledger and the
//! revocation of sites. I/O shell over the store and the session registry.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use outpost_protocol::identity::validate_site_id;
use outpost_protocol::validate_text;
use serde::Deserialize;
use serde_json::{Value, json};

use super::views::{dead_letter_json, exception_json, ledger_json, report_json};
use super::{ApiError, ApiJson, ApiState, Caller, rfc3339_ms};
use crate::ledger::LedgerKey;
use crate::store::{
    ExceptionFilter, ExceptionOpError, LedgerFilter, MAX_REPORTS_PER_SITE, ResolveAction,
};

/// Default page size of the exception and dead-letter lists.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Largest page of the exception and dead-letter lists: bounds one response to ~1 MiB.
pub const MAX_LIST_LIMIT: usize = 1_000;
/// Default and largest number of pools in one `GET /v1/ledger` answer.
pub const DEFAULT_LEDGER_LIMIT: usize = 1_000;
pub const MAX_LEDGER_LIMIT: usize = 10_000;

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    status: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveIn {
    action: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct LedgerQuery {
    pool: Option<String>,
    site: Option<String>,
    limit: Option<usize>,
}

pub(super) fn limit(q: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    let l = q.unwrap_or(default);
    if (1..=max).contains(&l) {
        Ok(l)
    } else {
        Err(ApiError::validation(format!(
            "limit must be 1..={max}, got {l}"
        )))
    }
}

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::validation(format!("bad query: {}", e.body_text())))
}

fn exception_id(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    path.ok()
        .and_then(|Path(id)| id.parse::<u64>().ok())
        .ok_or_else(|| ApiError::not_found("no such exception"))
}

fn exception_error(e: ExceptionOpError) -> ApiError {
    match e {
        ExceptionOpError::NotFound => ApiError::not_found("no such exception"),
        e @ ExceptionOpError::AlreadyResolved(_) => {
            ApiError::new(StatusCode::CONFLICT, "already_resolved", e.to_string())
        }
        ExceptionOpError::StillFailing(exc) => {
            let reasons: Vec<&str> = exc.reasons.iter().map(|r| r.as_str()).collect();
            ApiError::new(
                StatusCode::CONFLICT,
                "still_failing",
                format!(
                    "exception {} still fails the checks: {}",
                    exc.id,
                    reasons.join(", ")
                ),
            )
            .with(json!({"reasons": reasons, "exception": exception_json(&exc)}))
        }
        ExceptionOpError::Unavailable(u) => u.into(),
    }
}

/// `GET /v1/exceptions?status=open|resolved|all&after=ID&limit=N` (default open), oldest first.
pub(crate) async fn list_exceptions(
    State(st): State<ApiState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let filter = match q.status.as_deref().unwrap_or("open") {
        "open" => ExceptionFilter::Open,
        "resolved" => ExceptionFilter::Resolved,
        "all" => ExceptionFilter::All,
        other => {
            return Err(ApiError::validation(format!(
                "status must be open, resolved or all, got {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let limit = limit(q.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    let after = q.after.unwrap_or(0);
    let list = st.read(move |s| s.exceptions(filter, after, limit)).await?;
    Ok(Json(Value::Array(
        list.iter().map(exception_json).collect(),
    )))
}

/// `GET /v1/exceptions/{id}`
pub(crate) async fn get_exception(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = exception_id(path)?;
    match st.store.exception(id)? {
        Some(e) => Ok(Json(exception_json(&e))),
        None => Err(ApiError::not_found("no such exception")),
    }
}

/// `POST /v1/exceptions/{id}/resolve` `{"action":"accept"|"reject","reason"}`; a rejection
/// needs a reason (the site's floor screen shows it).
pub(crate) async fn resolve_exception(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<ResolveIn>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let id = exception_id(path)?;
    let ApiJson(r) = body?;
    let action = match r.action.as_str() {
        "accept" => ResolveAction::Accept,
        "reject" => ResolveAction::Reject,
        other => {
            return Err(ApiError::validation(format!(
                "action must be accept or reject, got {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    if let Some(reason) = &r.reason {
        validate_text("reason", reason).map_err(|e| ApiError::validation(e.to_string()))?;
    }
    if action == ResolveAction::Reject && r.reason.as_deref().is_none_or(|s| s.trim().is_empty()) {
        return Err(ApiError::validation("a rejection needs a reason"));
    }
    let exc = st
        .store
        .resolve_exception(id, action, r.reason)
        .await
        .map_err(exception_error)?;
    tracing::info!(exception = id, action = %r.action, "exception resolved");
    Ok(Json(exception_json(&exc)))
}

/// `POST /v1/exceptions/{id}/replay`: 200 with the resolved exception when the order now passes;
/// 409 `still_failing` (with the new reasons) when it does not.
pub(crate) async fn replay_exception(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = exception_id(path)?;
    let exc = st
        .store
        .replay_exception(id)
        .await
        .map_err(exception_error)?;
    tracing::info!(exception = id, "exception replayed and passed");
    Ok(Json(exception_json(&exc)))
}

/// `GET /v1/dead-letters?after=ID&limit=N`, oldest first.
pub(crate) async fn list_dead_letters(
    State(st): State<ApiState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let limit = limit(q.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    let after = q.after.unwrap_or(0);
    let list = st.read(move |s| s.dead_letters(after, limit)).await?;
    Ok(Json(Value::Array(
        list.iter().map(dead_letter_json).collect(),
    )))
}

/// `GET /v1/sites/{site}/reconciliations?limit=N`, newest first.
pub(crate) async fn list_reconciliations(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let site = match path {
        Ok(Path(s)) if validate_site_id(&s).is_ok() => s,
        _ => return Err(ApiError::not_found("no such site")),
    };
    let q = query(q)?;
    let limit = limit(q.limit, MAX_REPORTS_PER_SITE, MAX_REPORTS_PER_SITE)?;
    let list = st.read(move |s| s.reports(&site, limit)).await?;
    Ok(Json(Value::Array(list.iter().map(report_json).collect())))
}

/// `GET /v1/ledger?pool=atp:SKU@site|credit:CUSTOMER` (one pool), `?pool=atp:SKU&site=S`,
/// `?site=S` (that site's ATP pools and every credit pool), or everything (bounded by `limit`).
pub(crate) async fn get_ledger(
    State(st): State<ApiState>,
    q: Result<Query<LedgerQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let limit = limit(q.limit, DEFAULT_LEDGER_LIMIT, MAX_LEDGER_LIMIT)?;
    let bad_pool = |p: &str| {
        ApiError::validation(format!(
            "pool must be atp:SKU@site, atp:SKU with site=..., or credit:CUSTOMER; got {:?}",
            p.chars().take(80).collect::<String>()
        ))
    };
    let key = match q.pool.as_deref() {
        None => None,
        Some(p) => match (LedgerKey::parse(p), &q.site) {
            (Some(k @ LedgerKey::Credit { .. }), _) => Some(k),
            (Some(k @ LedgerKey::Atp { .. }), None) => Some(k),
            (Some(_), Some(_)) => return Err(bad_pool(p)),
            (None, Some(site)) => match p.strip_prefix("atp:") {
                Some(sku) if !sku.is_empty() => Some(LedgerKey::atp(sku, site)),
                _ => return Err(bad_pool(p)),
            },
            (None, None) => return Err(bad_pool(p)),
        },
    };
    let filter = LedgerFilter {
        site: if key.is_some() { None } else { q.site },
        key,
    };
    let entries = st.read(move |s| s.ledger(&filter, limit)).await?;
    Ok(Json(Value::Array(
        entries.iter().map(ledger_json).collect(),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeIn {
    #[serde(default)]
    reason: Option<String>,
}

fn site_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(s)) if validate_site_id(&s).is_ok() => Ok(s),
        _ => Err(ApiError::validation(
            "the site id must be a valid site id (as in the site's certificate)",
        )),
    }
}

/// `POST /v1/sites/{site}/revoke` `{"reason": "..."}` (admin): puts the site on the deny list,
/// durably, then closes its live connection; it is refused at every Hello until reinstated. Its
/// agent keeps its outbox and retries. Revoking a revoked site changes nothing.
pub(crate) async fn revoke_site(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<RevokeIn>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let site = site_param(path)?;
    let ApiJson(r) = body?;
    let reason = r.reason.unwrap_or_default();
    validate_text("reason", &reason).map_err(|e| ApiError::validation(e.to_string()))?;
    let entry = st.store.revoke_site(&site, reason).await?;
    // After the commit: a session that starts from now on finds the entry, and the live one is
    // told here.
    let was_connected = st.registry.revoke(&site);
    tracing::warn!(site.id = %site, reason = %entry.reason, client = %caller.name, was_connected, "site revoked");
    Ok(Json(json!({
        "site": site,
        "revoked": true,
        "reason": entry.reason,
        "revoked_at": rfc3339_ms(entry.at_ms),
        "was_connected": was_connected,
    })))
}

/// `DELETE /v1/sites/{site}/revoke` (admin): takes the site off the deny list; its agent is
/// admitted at its next reconnect attempt.
pub(crate) async fn reinstate_site(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let site = site_param(path)?;
    let old = st.store.reinstate_site(&site).await?;
    tracing::warn!(site.id = %site, client = %caller.name, was_revoked = old.is_some(), "site reinstated");
    Ok(Json(json!({
        "site": site,
        "revoked": false,
        "was_revoked": old.is_some(),
    })))
}
