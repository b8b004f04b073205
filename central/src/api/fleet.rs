//! Fleet health routes: `GET /v1/fleet` (every site's state, reasons and latest signals),
//! `GET /v1/fleet/{site}` (the same with the heartbeat history) and `GET /v1/alerts`. Any role
//! may read them. I/O shell over the registry, the monitor's states and the store.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use outpost_protocol::identity::validate_site_id;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ops::{DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, limit, query};
use super::{ApiError, ApiState, rfc3339_ms};
use crate::fleet::alert_json;
use crate::fleet_health::SiteHealth;
use crate::health::{Beat, State as HealthState};
use crate::registry::SiteSignals;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AlertsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Per-second rate of a cumulative counter between two beats; `None` without two beats, or
/// when the counter went back (the agent restarted).
fn rate(prev: Option<&Beat>, cur: &Beat, counter: impl Fn(&Beat) -> u64) -> Option<f64> {
    let prev = prev?;
    let secs = (cur.heartbeat.agent_time_ms - prev.heartbeat.agent_time_ms) as f64 / 1000.0;
    let delta = counter(cur).checked_sub(counter(prev))?;
    (secs > 0.0).then(|| delta as f64 / secs)
}

/// One heartbeat with what central derives from it at `now`.
fn signals_json(prev: Option<&Beat>, b: &Beat, now: i64) -> Value {
    let h = &b.heartbeat;
    json!({
        "received_at": rfc3339_ms(b.received_ms),
        "agent_time": rfc3339_ms(h.agent_time_ms),
        "agent_version": h.agent_version,
        "uptime_secs": h.uptime_secs,
        "process_cpu_pct": h.process_cpu_pct,
        "process_rss_bytes": h.process_rss_bytes,
        "host_cpu_pct": h.host_cpu_pct,
        "host_mem_used_bytes": h.host_mem_used_bytes,
        "host_mem_total_bytes": h.host_mem_total_bytes,
        "disk_free_bytes": h.disk_free_bytes,
        "disk_total_bytes": h.disk_total_bytes,
        "disk_free_pct": b.disk_free_pct(),
        "store_file_bytes": h.store_file_bytes,
        "outbox_events": h.outbox_events,
        "outbox_bytes": h.outbox_bytes,
        "oldest_unsynced_at": h.oldest_unsynced_ms.map(rfc3339_ms),
        "backlog_age_ms": b.backlog_age_ms(now),
        "master_rev": h.master_rev,
        "central_rev": b.central_rev,
        "master_lag_revs": b.master_lag_revs(),
        "master_lag_ms": b.master_lag_ms(now),
        "master_applied_at": h.master_applied_ms.map(rfc3339_ms),
        "api_requests": h.api_requests,
        "api_errors": h.api_errors,
        "api_request_rate": rate(prev, b, |x| x.heartbeat.api_requests),
        "api_error_rate": rate(prev, b, |x| x.heartbeat.api_errors),
        "clock_offset_ms": b.clock_offset_ms,
    })
}

fn site_json(
    site: &str,
    health: Option<&SiteHealth>,
    signals: Option<&SiteSignals>,
    durable_last_seen_ms: Option<i64>,
    now: i64,
) -> Value {
    let (state, reasons, since) = match health {
        Some(h) => (
            h.state.as_str(),
            h.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            Some(rfc3339_ms(h.since_ms)),
        ),
        // Not derived yet (the monitor runs every second): say so rather than guess.
        None => ("unknown", Vec::new(), None),
    };
    let offline_since = match health.map(|h| h.state) {
        Some(HealthState::Offline { since_ms }) => since_ms.map(rfc3339_ms),
        _ => None,
    };
    let in_memory = signals.and_then(|s| s.liveness.last_seen.map(unix_ms));
    let last_seen = in_memory.max(durable_last_seen_ms);
    let latest = signals.and_then(|s| {
        let n = s.beats.len();
        let cur = s.beats.last()?;
        let prev = n.checked_sub(2).and_then(|i| s.beats.get(i));
        Some(signals_json(prev, cur, now))
    });
    json!({
        "site": site,
        "state": state,
        "reasons": reasons,
        "since": since,
        "offline_since": offline_since,
        "last_seen": last_seen.map(rfc3339_ms),
        "connected": signals.is_some_and(|s| s.liveness.connected),
        "protocol_version": signals.and_then(|s| s.session).map(|i| i.protocol_version),
        "certificate_expires_at": signals
            .and_then(|s| s.session)
            .and_then(|i| i.cert_not_after_ms)
            .map(rfc3339_ms),
        "signals": latest,
    })
}

async fn durable_last_seen(st: &ApiState) -> Result<BTreeMap<String, Option<i64>>, ApiError> {
    let sites = st.read(|s| s.sites()).await?;
    Ok(sites
        .into_iter()
        .map(|s| (s.site, s.record.map(|r| r.last_seen_ms)))
        .collect())
}

/// `GET /v1/fleet`: every known site, sorted by id.
pub(crate) async fn get_fleet(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let mut durable = durable_last_seen(&st).await?;
    let live = st.registry.latest_signals();
    let states = st.registry.fleet_health().states();
    for site in live.keys().chain(states.keys()) {
        durable.entry(site.clone()).or_insert(None);
    }
    let now = now_ms();
    let sites: Vec<Value> = durable
        .iter()
        .map(|(site, seen)| site_json(site, states.get(site), live.get(site), *seen, now))
        .collect();
    Ok(Json(json!({ "sites": sites })))
}

/// `GET /v1/fleet/{site}`: one site with its heartbeat history (oldest first).
pub(crate) async fn get_fleet_site(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let site = match path {
        Ok(Path(s)) if validate_site_id(&s).is_ok() => s,
        _ => return Err(ApiError::not_found("no such site")),
    };
    let durable = durable_last_seen(&st).await?;
    let signals = st.registry.site_signals(&site);
    let health = st.registry.fleet_health().state(&site);
    if signals.is_none() && health.is_none() && !durable.contains_key(&site) {
        return Err(ApiError::not_found("no such site"));
    }
    let now = now_ms();
    let mut out = site_json(
        &site,
        health.as_ref(),
        signals.as_ref(),
        durable.get(&site).copied().flatten(),
        now,
    );
    let beats = signals.map(|s| s.beats).unwrap_or_default();
    let history: Vec<Value> = beats
        .iter()
        .enumerate()
        .map(|(i, b)| signals_json(i.checked_sub(1).and_then(|j| beats.get(j)), b, now))
        .collect();
    out["history"] = Value::Array(history);
    Ok(Json(out))
}

/// `GET /v1/alerts?after=ID&limit=N`: health state changes, oldest first.
pub(crate) async fn list_alerts(
    State(st): State<ApiState>,
    q: Result<Query<AlertsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let limit = limit(q.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    let after = q.after.unwrap_or(0);
    let list = st.read(move |s| s.alerts(after, limit)).await?;
    Ok(Json(Value::Array(list.iter().map(alert_json).collect())))
}
