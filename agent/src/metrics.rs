//! `GET /metrics`: the agent's figures in the Prometheus/OpenMetrics text format. Nothing is
//! counted twice: at each scrape `Snapshot::collect` reads what already exists (the store's marks
//! and writer statistics, the link state, the API boundary's counters, the allowance table) and
//! `render` turns that snapshot into text. `render` is pure; `collect` reads redb (microseconds)
//! and `/proc/self/status` on the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use crate::api::ApiState;
use crate::counters::ApiCounters;
use crate::store::{ReadError, now_ms};

/// The content type of the exposition: OpenMetrics text, which Prometheus negotiates and parses.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every figure of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub site: String,
    pub outbox_events: u64,
    /// Acknowledged events still held for a central restored from a backup.
    pub outbox_retained_events: u64,
    pub last_seq: u64,
    pub acked_seq: u64,
    pub master_revision: u64,
    pub connected: bool,
    /// Seconds since central was last heard from (0 while connected); `None`: never heard.
    pub central_stale_secs: Option<u64>,
    /// Times the agent moved to another of central's addresses.
    pub central_address_switches: u64,
    pub writer_ops: u64,
    pub writer_commits: u64,
    pub writer_failed_groups: u64,
    pub store_reopens: u64,
    /// HTTP requests answered, and those answered 4xx or 5xx.
    pub api_requests: u64,
    pub api_errors: u64,
    pub api_unauthorized: u64,
    pub api_forbidden: u64,
    pub api_rate_limited: u64,
    pub api_connections_refused: u64,
    pub api_header_timeouts: u64,
    pub api_connections_open: u64,
    /// Remaining ATP allowance summed over every SKU (units).
    pub allowance_atp_units: i64,
    /// Remaining credit allowance summed over every customer (`Money` units, 1/10,000).
    pub allowance_credit_money: i64,
    /// When this process started serving its API (Unix time, seconds).
    pub start_time_secs: f64,
    /// Resident set size; `None` where `/proc/self/status` cannot be read.
    pub resident_memory_bytes: Option<u64>,
}

impl Snapshot {
    /// Reads the current figures. `started`: when the API was built, at process start.
    pub fn collect(
        state: &ApiState,
        counters: &ApiCounters,
        started: SystemTime,
    ) -> Result<Snapshot, ReadError> {
        let marks = state.store.marks()?;
        let (atp, credit) = state.store.allowance_totals()?;
        let stats = state.store.stats();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ok(Snapshot {
            site: state.site.clone(),
            outbox_events: marks.outbox_depth(),
            outbox_retained_events: marks.retained_acked(),
            last_seq: marks.last_seq,
            acked_seq: marks.acked_seq,
            master_revision: marks.master_rev,
            connected: state.link.is_connected(),
            central_stale_secs: state.link.stale_secs(now_ms()),
            central_address_switches: state.link.address_switches(),
            writer_ops: get(&stats.ops),
            writer_commits: get(&stats.commits),
            writer_failed_groups: get(&stats.failed_groups),
            store_reopens: get(&stats.reopens),
            api_requests: get(&counters.requests),
            api_errors: get(&counters.errors),
            api_unauthorized: get(&counters.unauthorized),
            api_forbidden: get(&counters.forbidden),
            api_rate_limited: get(&counters.rate_limited),
            api_connections_refused: get(&counters.connections_refused),
            api_header_timeouts: get(&counters.header_timeouts),
            api_connections_open: get(&counters.connections_open),
            allowance_atp_units: atp,
            allowance_credit_money: credit,
            start_time_secs: started
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            resident_memory_bytes: crate::memory::resident_memory_bytes(),
        })
    }
}

fn gauge<N>(r: &mut Registry, name: &str, help: &str, v: N)
where
    ConstGauge<N>: prometheus_client::registry::Metric,
{
    r.register(name, help, ConstGauge::new(v));
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

/// The snapshot as OpenMetrics text. Every name carries the `outpost_agent_` prefix (the
/// standard `process_*` ones excepted), counters end in `_total`, units are in the names.
/// The only labels are `reason` (three values) and `build_info`'s `site` and `version` (one each).
pub fn render(s: &Snapshot) -> String {
    let mut root = Registry::default();
    let r = root.sub_registry_with_prefix("outpost_agent");
    let info: Family<[(&str, String); 2], Gauge> = Family::default();
    info.get_or_create(&[
        ("site", s.site.clone()),
        ("version", env!("CARGO_PKG_VERSION").to_string()),
    ])
    .set(1);
    r.register(
        "build_info",
        "The site this agent serves and its version",
        info,
    );
    gauge(
        r,
        "outbox_events",
        "Events stored in the outbox and not yet acknowledged by central",
        s.outbox_events,
    );
    gauge(
        r,
        "outbox_retained_events",
        "Events acknowledged by central and still kept for a central restored from a backup",
        s.outbox_retained_events,
    );
    gauge(
        r,
        "last_seq",
        "Sequence number of the newest event stored",
        s.last_seq,
    );
    gauge(
        r,
        "acked_seq",
        "Highest sequence number central has acknowledged",
        s.acked_seq,
    );
    gauge(
        r,
        "master_revision",
        "Master-data revision applied at this site",
        s.master_revision,
    );
    gauge(
        r,
        "link_connected",
        "1 while the sync session with central is up, else 0",
        u64::from(s.connected),
    );
    // Absent until central has ever been heard from: no made-up figure.
    if let Some(secs) = s.central_stale_secs {
        r.register_with_unit(
            "central_stale",
            "Seconds since central was last heard from (0 while connected)",
            Unit::Seconds,
            ConstGauge::new(secs),
        );
    }
    counter(
        r,
        "central_address_switches",
        "Times the agent moved to another of central's addresses ([sync] central_addr)",
        s.central_address_switches,
    );
    counter(
        r,
        "writer_ops",
        "Write operations answered by the store writer",
        s.writer_ops,
    );
    counter(
        r,
        "writer_commits",
        "Write transactions (groups) committed",
        s.writer_commits,
    );
    counter(
        r,
        "writer_failed_groups",
        "Write groups that failed as a whole",
        s.writer_failed_groups,
    );
    counter(
        r,
        "store_reopens",
        "Database reopens after a storage failure",
        s.store_reopens,
    );
    counter(r, "api_requests", "API requests answered", s.api_requests);
    counter(
        r,
        "api_request_errors",
        "API requests answered with a 4xx or 5xx status",
        s.api_errors,
    );
    let refused: Family<[(&str, &str); 1], Counter> = Family::default();
    for (reason, v) in [
        ("unauthorized", s.api_unauthorized),
        ("forbidden", s.api_forbidden),
        ("rate_limited", s.api_rate_limited),
    ] {
        refused.get_or_create(&[("reason", reason)]).inc_by(v);
    }
    r.register(
        "api_requests_refused",
        "API requests refused at the boundary (401 unauthorized, 403 forbidden, 429 rate_limited)",
        refused,
    );
    counter(
        r,
        "api_connections_refused",
        "API connections closed at once because api.max_connections were open",
        s.api_connections_refused,
    );
    counter(
        r,
        "api_header_timeouts",
        "API connections closed because request headers did not arrive in time",
        s.api_header_timeouts,
    );
    gauge(
        r,
        "api_connections_open",
        "API connections open now",
        s.api_connections_open,
    );
    gauge(
        r,
        "allowance_atp_units",
        "Remaining ATP allowance held by this site, summed over every SKU",
        s.allowance_atp_units,
    );
    gauge(
        r,
        "allowance_credit",
        "Remaining credit allowance held by this site, summed over every customer, in currency units",
        s.allowance_credit_money as f64 / 10_000.0,
    );
    root.register_with_unit(
        "process_start_time",
        "When this process started (Unix time)",
        Unit::Seconds,
        ConstGauge::new(s.start_time_secs),
    );
    if let Some(b) = s.resident_memory_bytes {
        root.register_with_unit(
            "process_resident_memory",
            "Resident memory of this process",
            Unit::Bytes,
            ConstGauge::new(b),
        );
    }
    let mut out = String::new();
    encode(&mut out, &root).expect("writing to a String cannot fail");
    out
}

/// `GET /metrics` (any role: it is a read like the other GETs).
pub async fn handler(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<ApiState>>,
    counters: std::sync::Arc<ApiCounters>,
    started: SystemTime,
) -> Result<axum::response::Response, crate::api::ApiError> {
    use axum::response::IntoResponse;
    let snapshot = Snapshot::collect(&state, &counters, started)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&snapshot),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Boundary, Clients};
    use crate::config::{ApiClient, Role};
    use crate::link::LinkState;
    use crate::router::router_with;
    use crate::store::{NewLine, NewOrder, Store};
    use crate::testutil::{catalogue, grants};
    use axum::body::Body;
    use axum::http::Request;
    use outpost_protocol::Pool;
    use std::sync::Arc;
    use tower::ServiceExt;

    fn snapshot() -> Snapshot {
        Snapshot {
            site: "plant-1".into(),
            outbox_events: 3,
            outbox_retained_events: 5,
            last_seq: 10,
            acked_seq: 7,
            master_revision: 42,
            connected: false,
            central_stale_secs: Some(12),
            central_address_switches: 13,
            writer_ops: 11,
            writer_commits: 9,
            writer_failed_groups: 1,
            store_reopens: 2,
            api_requests: 100,
            api_errors: 20,
            api_unauthorized: 4,
            api_forbidden: 5,
            api_rate_limited: 6,
            api_connections_refused: 7,
            api_header_timeouts: 8,
            api_connections_open: 2,
            allowance_atp_units: 50,
            allowance_credit_money: 1_234_500,
            start_time_secs: 1_700_000_000.5,
            resident_memory_bytes: Some(4096),
        }
    }

    /// Goal: every figure of a snapshot appears under its documented name, with the right type
    /// and unit. Method: render a snapshot of distinct values and look for each sample line and
    /// TYPE line.
    #[test]
    fn renders_every_figure_under_its_name_and_type() {
        let text = render(&snapshot());
        for line in [
            "outpost_agent_build_info{site=\"plant-1\",version=\"0.1.0\"} 1",
            "outpost_agent_outbox_events 3",
            "outpost_agent_last_seq 10",
            "outpost_agent_acked_seq 7",
            "outpost_agent_master_revision 42",
            "outpost_agent_link_connected 0",
            "outpost_agent_central_stale_seconds 12",
            "outpost_agent_central_address_switches_total 13",
            "outpost_agent_writer_ops_total 11",
            "outpost_agent_writer_commits_total 9",
            "outpost_agent_writer_failed_groups_total 1",
            "outpost_agent_store_reopens_total 2",
            "outpost_agent_api_requests_total 100",
            "outpost_agent_api_request_errors_total 20",
            "outpost_agent_api_requests_refused_total{reason=\"unauthorized\"} 4",
            "outpost_agent_api_requests_refused_total{reason=\"forbidden\"} 5",
            "outpost_agent_api_requests_refused_total{reason=\"rate_limited\"} 6",
            "outpost_agent_api_connections_refused_total 7",
            "outpost_agent_api_header_timeouts_total 8",
            "outpost_agent_api_connections_open 2",
            "outpost_agent_outbox_retained_events 5",
            "outpost_agent_allowance_atp_units 50",
            "outpost_agent_allowance_credit 123.45",
            "process_start_time_seconds 1700000000.5",
            "process_resident_memory_bytes 4096",
            "# TYPE outpost_agent_writer_commits counter",
            "# TYPE outpost_agent_outbox_events gauge",
            "# UNIT outpost_agent_central_stale_seconds seconds",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// Goal: a figure that does not exist yet is left out rather than made up. Method: render a
    /// snapshot that never heard from central and cannot read its memory.
    #[test]
    fn unknown_figures_are_absent() {
        let s = Snapshot {
            central_stale_secs: None,
            resident_memory_bytes: None,
            ..snapshot()
        };
        let text = render(&s);
        assert!(!text.contains("central_stale"), "{text}");
        assert!(!text.contains("process_resident_memory"), "{text}");
        assert!(text.contains("outpost_agent_outbox_events 3"));
    }

    /// Goal: `GET /metrics` reads the live figures, any role may scrape it and nobody without a
    /// token. Method: a store with a catalogue, allowances and two orders behind the real router;
    /// scrape as a reader, then without a token.
    #[tokio::test]
    async fn the_route_serves_live_figures_to_any_role_and_401_without_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
        store.apply_master(catalogue(0, 5)).await.unwrap();
        let allowance = [
            (Pool::atp("GEAR-12T"), 10),
            (Pool::atp("BOLT-M8"), 100),
            (Pool::credit("ACME"), 1_000_000),
        ];
        store.apply_master(grants(5, 6, &allowance)).await.unwrap();
        for i in 0..2 {
            let order = NewOrder {
                customer_id: "ACME".into(),
                lines: vec![NewLine {
                    sku: "GEAR-12T".into(),
                    qty: 1,
                }],
            };
            store
                .create_order(&format!("k{i}"), order, now_ms(), true)
                .await
                .unwrap();
        }
        let reader = ApiClient {
            name: "reader".into(),
            role: Role::Reader,
            sha256: crate::config::hash_token(b"reader-token-0123456789"),
            rate_per_sec: 1_000,
        };
        let state = ApiState {
            store: store.clone(),
            site: "plant-1".into(),
            link: Arc::new(LinkState::default()),
            topup: None,
            max_body_bytes: 65536,
        };
        let app = router_with(state, Boundary::new(Clients::new(vec![reader], 100)));

        let resp = app
            .clone()
            .oneshot(
                Request::get("/metrics")
                    .header("authorization", "Bearer reader-token-0123456789")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], CONTENT_TYPE);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        for line in [
            "outpost_agent_outbox_events 2",
            "outpost_agent_last_seq 2",
            "outpost_agent_acked_seq 0",
            "outpost_agent_master_revision 6",
            "outpost_agent_link_connected 0",
            // Two gears confirmed from the allowance: 10 + 100 - 2 units, and the gears' price
            // taken from ACME's credit.
            "outpost_agent_allowance_atp_units 108",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Credit (100.00) is taken by the confirmed lines' value, so less than 100 remains.
        let credit: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("outpost_agent_allowance_credit "))
            .expect("credit line")
            .parse()
            .unwrap();
        assert!((0.0..100.0).contains(&credit), "{text}");

        let resp = app
            .clone()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        let resp = app
            .oneshot(
                Request::get("/metrics")
                    .header("authorization", "Bearer reader-token-0123456789")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let refused = "outpost_agent_api_requests_refused_total{reason=\"unauthorized\"} 1";
        assert!(text.lines().any(|l| l == refused), "{text}");
        drop(store);
        writer.shutdown().await;
    }
}
