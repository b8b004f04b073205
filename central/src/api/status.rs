//! Status handlers: `GET /v1/sites` (each site's connection, last contact, acked seq, clock
//! offset and revocation) and `GET /v1/health`. I/O shell over the store and the registry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, ApiState};
use crate::timefmt::{MAX_RFC3339_MS, rfc3339_ms};

fn rfc3339(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(MAX_RFC3339_MS as u128) as i64)
        .unwrap_or(0);
    rfc3339_ms(ms)
}

/// One row of `GET /v1/sites` while it is being assembled.
#[derive(Default)]
struct SiteRow {
    connected: bool,
    seen: Option<SystemTime>,
    hwm: u64,
    clock_offset_ms: Option<i64>,
    revoked: Option<crate::store::RevokedSite>,
}

pub(crate) async fn get_sites(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let (stored, revoked) = st
        .read(|s| Ok::<_, crate::store::ReadError>((s.sites()?, s.revoked_sites()?)))
        .await?;
    let live = st.registry.snapshot();
    let mut rows = std::collections::BTreeMap::<String, SiteRow>::new();
    for s in stored {
        let seen = s
            .record
            .map(|r| UNIX_EPOCH + Duration::from_millis(r.last_seen_ms.max(0) as u64));
        let row = rows.entry(s.site).or_default();
        row.seen = seen;
        row.hwm = s.hwm;
    }
    for (site, r) in revoked {
        rows.entry(site).or_default().revoked = Some(r);
    }
    let now = SystemTime::now();
    for (site, l) in live {
        let row = rows.entry(site).or_default();
        row.connected = l.connected;
        row.clock_offset_ms = l.clock_offset_ms;
        // A connected site is being heard from now (QUIC keep-alives prove it); otherwise the
        // later of the durable and the in-memory last contact.
        let seen = if l.connected { Some(now) } else { l.last_seen };
        row.seen = row.seen.max(seen);
    }
    let out: Vec<Value> = rows
        .into_iter()
        .map(|(site, r)| {
            json!({
                "site": site,
                "connected": r.connected,
                "last_seen": r.seen.map(rfc3339),
                "acked_seq": r.hwm,
                "clock_offset_ms": r.clock_offset_ms,
                "revoked": r.revoked.is_some(),
                "revoked_reason": r.revoked.as_ref().map(|x| x.reason.clone()),
                "revoked_at": r.revoked.as_ref().map(|x| rfc3339_ms(x.at_ms)),
            })
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

pub(crate) async fn get_health(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({
        "status": "ok",
        "revision": st.store.revision()?,
        "sites_connected": st.registry.connected_count(),
    })))
}
