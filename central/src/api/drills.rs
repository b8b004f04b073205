//! Disaster-recovery drill routes: start (admin), list, show with the live or final report,
//! the report as JSON or text, abort (admin). I/O shell over `crate::drill`.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiState, Caller, rfc3339_ms};
use crate::drill::{Drill, DrillRequest, render_text, report};
use crate::drill_driver::{self as driver, DrillError};
use crate::store::now_ms;

/// Default and largest number of drills in one `GET /v1/drills` answer.
pub const DEFAULT_DRILL_LIMIT: usize = 20;
pub const MAX_DRILL_LIMIT: usize = 200;

impl From<DrillError> for ApiError {
    fn from(e: DrillError) -> Self {
        let (status, code) = match &e {
            DrillError::Invalid(_) | DrillError::UnknownSite(_) => {
                (StatusCode::BAD_REQUEST, "validation")
            }
            DrillError::InProgress(_) => (StatusCode::CONFLICT, "drill_in_progress"),
            DrillError::NoSites(_) => (StatusCode::CONFLICT, "no_connected_sites"),
            DrillError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            DrillError::Over(_) => (StatusCode::CONFLICT, "drill_over"),
            DrillError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            DrillError::Backup(_) => (StatusCode::SERVICE_UNAVAILABLE, "backup_failed"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// A drill as JSON: its plan and phase, and its report (final once completed, live before).
pub fn drill_json(d: &Drill) -> Value {
    let r = match &d.report {
        Some(r) => r.clone(),
        None => report(d, None, now_ms()),
    };
    json!({
        "id": d.id,
        "kind": d.kind,
        "phase": d.phase,
        "sites": d.sites,
        "note": d.note,
        "started": rfc3339_ms(d.started_ms),
        "cut_until": d.cut_until_ms.map(rfc3339_ms),
        "cut_ended": d.cut_ended_ms.map(rfc3339_ms),
        "ended": d.ended_ms.map(rfc3339_ms),
        "aborted": d.aborted_ms.map(rfc3339_ms),
        "recovery_timeout_secs": d.recovery_timeout_ms / 1000,
        "backup": d.backup,
        "restored": d.restored_ms.map(rfc3339_ms),
        "report": r,
    })
}

/// The drill `id`: the active one from memory (its tracking is newer), else from the store.
fn find(st: &ApiState, id: u64) -> Result<Drill, ApiError> {
    if let Some(d) = st.registry.drills().active().filter(|d| d.id == id) {
        return Ok(d);
    }
    st.store
        .drill(id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no drill {id}")))
}

fn id_param(p: Result<Path<u64>, PathRejection>) -> Result<u64, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|_| ApiError::validation("the drill id must be a positive integer"))
}

/// `POST /v1/drills` (admin): starts a drill; 201 with the drill.
pub(crate) async fn start_drill(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    body: Result<ApiJson<DrillRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = body?;
    let d = driver::start(&st.store, &st.registry, &st.data_dir, req).await?;
    tracing::warn!(drill = d.id, client = %caller.name, "drill started by an operator");
    Ok((StatusCode::CREATED, Json(drill_json(&d))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
}

/// `GET /v1/drills`: the newest drills first.
pub(crate) async fn list_drills(
    State(st): State<ApiState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::validation(e.body_text()))?;
    let limit = q.limit.unwrap_or(DEFAULT_DRILL_LIMIT);
    if limit == 0 || limit > MAX_DRILL_LIMIT {
        return Err(ApiError::validation(format!(
            "limit must be 1..={MAX_DRILL_LIMIT}"
        )));
    }
    let active = st.registry.drills().active();
    let drills: Vec<Value> = st
        .read(move |s| s.drills(limit))
        .await?
        .into_iter()
        .map(|d| match &active {
            Some(a) if a.id == d.id => drill_json(a),
            _ => drill_json(&d),
        })
        .collect();
    Ok(Json(json!({
        "active": active.map(|a| a.id),
        "drills": drills,
    })))
}

/// `GET /v1/drills/{id}`.
pub(crate) async fn get_drill(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = id_param(id)?;
    Ok(Json(drill_json(&find(&st, id)?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportQuery {
    format: Option<String>,
}

/// `GET /v1/drills/{id}/report[?format=text]`: the report alone, as JSON or as text.
pub(crate) async fn get_report(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
    q: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = id_param(id)?;
    let Query(q) = q.map_err(|e| ApiError::validation(e.body_text()))?;
    let d = find(&st, id)?;
    let r = match &d.report {
        Some(r) => r.clone(),
        None => report(&d, None, now_ms()),
    };
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(r).into_response()),
        Some("text") => Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            render_text(&r),
        )
            .into_response()),
        Some(other) => Err(ApiError::validation(format!(
            "format must be json or text, not {other:?}"
        ))),
    }
}

/// `POST /v1/drills/{id}/abort` (admin): ends the cut now; the drill reports what happened.
pub(crate) async fn abort_drill(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = id_param(id)?;
    let d = driver::abort(&st.store, &st.registry, id).await?;
    tracing::warn!(drill = id, client = %caller.name, "drill aborted by an operator");
    Ok(Json(drill_json(&d)))
}
