//! The event feed handler: `GET /v1/events?after=&limit=`, pages of the ERP's feed in cursor
//! order. I/O shell over the store.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::views::event_json;
use super::{ApiError, ApiState, DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT};

#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    after: Option<u64>,
    limit: Option<u64>,
}

pub(crate) async fn get_events(
    State(st): State<ApiState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::validation(format!(
            "after and limit must be non-negative integers: {}",
            e.body_text()
        ))
    })?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS_LIMIT);
    if !(1..=MAX_EVENTS_LIMIT).contains(&limit) {
        return Err(ApiError::validation(format!(
            "limit must be 1..={MAX_EVENTS_LIMIT}, got {limit}"
        )));
    }
    let events = st
        .read(move |s| s.events_after(after, limit as usize))
        .await?;
    let next = events.last().map(|e| e.cursor).unwrap_or(after);
    let events: Vec<Value> = events.iter().map(event_json).collect();
    Ok(Json(json!({"events": events, "next": next})))
}
