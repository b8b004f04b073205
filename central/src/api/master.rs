//! Master-data handlers: `PUT /v1/master/{prices,atp,customers}` (validated as a whole, applied
//! in one transaction) and `GET /v1/master/revision`. I/O shell over the store.

use axum::Json;
use axum::extract::State;
use outpost_protocol::{AtpRecord, CustomerRecord, MasterChange, Money, PriceRecord};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiState, MAX_MASTER_ITEMS, MAX_REPORTED_PROBLEMS};
use crate::store::UpsertMasterError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PriceIn {
    sku: String,
    #[serde(default)]
    customer: Option<String>,
    unit_price: Money,
    currency: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AtpIn {
    sku: String,
    site: String,
    available: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CustomerIn {
    id: String,
    name: String,
    credit_limit: Money,
    on_hold: bool,
}

pub(crate) async fn put_prices(
    State(st): State<ApiState>,
    ApiJson(items): ApiJson<Vec<PriceIn>>,
) -> Result<Json<Value>, ApiError> {
    let changes = items
        .into_iter()
        .map(|p| {
            MasterChange::Price(PriceRecord {
                sku: p.sku,
                customer: p.customer,
                unit_price: p.unit_price,
                currency: p.currency,
            })
        })
        .collect();
    upsert(&st, changes).await
}

pub(crate) async fn put_atp(
    State(st): State<ApiState>,
    ApiJson(items): ApiJson<Vec<AtpIn>>,
) -> Result<Json<Value>, ApiError> {
    let changes = items
        .into_iter()
        .map(|a| {
            MasterChange::Atp(AtpRecord {
                sku: a.sku,
                site: a.site,
                available: a.available,
            })
        })
        .collect();
    upsert(&st, changes).await
}

pub(crate) async fn put_customers(
    State(st): State<ApiState>,
    ApiJson(items): ApiJson<Vec<CustomerIn>>,
) -> Result<Json<Value>, ApiError> {
    let changes = items
        .into_iter()
        .map(|c| {
            MasterChange::Customer(CustomerRecord {
                id: c.id,
                name: c.name,
                credit_limit: c.credit_limit,
                on_hold: c.on_hold,
            })
        })
        .collect();
    upsert(&st, changes).await
}

fn describe_problems(problems: &[(usize, String)]) -> String {
    let mut parts: Vec<String> = problems
        .iter()
        .take(MAX_REPORTED_PROBLEMS)
        .map(|(i, p)| format!("[{i}]: {p}"))
        .collect();
    if problems.len() > MAX_REPORTED_PROBLEMS {
        parts.push(format!(
            "and {} more",
            problems.len() - MAX_REPORTED_PROBLEMS
        ));
    }
    parts.join("; ")
}

async fn upsert(st: &ApiState, changes: Vec<MasterChange>) -> Result<Json<Value>, ApiError> {
    if changes.is_empty() || changes.len() > MAX_MASTER_ITEMS {
        return Err(ApiError::validation(format!(
            "the body must be a JSON array of 1..={MAX_MASTER_ITEMS} items, got {}",
            changes.len()
        )));
    }
    let problems: Vec<(usize, String)> = changes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.validate().err().map(|e| (i, e.to_string())))
        .collect();
    if !problems.is_empty() {
        return Err(ApiError::validation(describe_problems(&problems)));
    }
    match st.store.upsert_master(changes).await {
        Ok(applied) => Ok(Json(json!({
            "revision": applied.revision,
            "changes": applied.changes,
            "grants": applied.grants,
            "reclaims": applied.reclaims,
        }))),
        Err(UpsertMasterError::Invalid(v)) => {
            let problems: Vec<_> = v.into_iter().map(|(i, e)| (i, e.to_string())).collect();
            Err(ApiError::validation(describe_problems(&problems)))
        }
        Err(UpsertMasterError::Unavailable(u)) => Err(u.into()),
    }
}

pub(crate) async fn get_revision(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"revision": st.store.revision()?})))
}
