//! `GET /metrics`: central's figures in the Prometheus/OpenMetrics text format, fleet-wide and
//! per site. Nothing is counted twice: at each scrape `Snapshot::collect` reads what already
//! exists (the store's sites, high-water marks, deny list, revision and table lengths, the session
//! registry and its accept-refusal counts) and `render` turns that into text. Cardinality is
//! bounded by the number of known sites: one series set per site, none per order or event.
//! `site_figures` and `render` are pure; `collect` reads redb and this process's memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use crate::api::ApiState;
use crate::registry::SiteLiveness;
use crate::store::{ReadError, RevokedSite, StoredSite, TableCounts};

/// The content type of the exposition: OpenMetrics text, which Prometheus negotiates and parses.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One site's figures, as `GET /v1/sites` shows them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteFigures {
    pub site: String,
    pub connected: bool,
    /// The site's durable high-water mark: the highest seq central committed.
    pub acked_seq: u64,
    /// When central last heard from the site (Unix time, seconds); now while connected.
    pub last_seen_secs: Option<f64>,
    /// The site's clock minus central's, estimated at its last Hello since central started.
    pub clock_offset_secs: Option<f64>,
    pub revoked: bool,
}

/// Every figure of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Sorted by site id.
    pub sites: Vec<SiteFigures>,
    pub live_sessions: u64,
    pub master_revision: u64,
    pub tables: TableCounts,
    pub refused_connections: u64,
    pub refused_handshakes_per_ip: u64,
    pub refused_memory: u64,
    /// Site certificates signed for renewals, and renewal requests refused, since start.
    pub certs_renewed: u64,
    pub cert_renewals_refused: u64,
    /// When this process started serving its API (Unix time, seconds).
    pub start_time_secs: f64,
    pub resident_memory_bytes: Option<u64>,
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Every known site (stored, revoked or seen by the registry since start) with its figures, by
/// the same rules as `GET /v1/sites`: a connected site is being heard from now; otherwise the
/// later of the durable and the in-memory last contact.
pub fn site_figures(
    stored: Vec<StoredSite>,
    revoked: Vec<(String, RevokedSite)>,
    live: HashMap<String, SiteLiveness>,
    now: SystemTime,
) -> Vec<SiteFigures> {
    // site -> (figures, last contact)
    let mut rows = BTreeMap::<String, (SiteFigures, Option<SystemTime>)>::new();
    fn row(
        rows: &mut BTreeMap<String, (SiteFigures, Option<SystemTime>)>,
        site: String,
    ) -> &mut (SiteFigures, Option<SystemTime>) {
        rows.entry(site.clone()).or_insert_with(|| {
            let f = SiteFigures {
                site,
                ..SiteFigures::default()
            };
            (f, None)
        })
    }
    for s in stored {
        let r = row(&mut rows, s.site);
        r.0.acked_seq = s.hwm;
        r.1 = s
            .record
            .map(|rec| UNIX_EPOCH + Duration::from_millis(rec.last_seen_ms.max(0) as u64));
    }
    for (site, _) in revoked {
        row(&mut rows, site).0.revoked = true;
    }
    for (site, l) in live {
        let r = row(&mut rows, site);
        r.0.connected = l.connected;
        r.0.clock_offset_secs = l.clock_offset_ms.map(|ms| ms as f64 / 1000.0);
        let seen = if l.connected { Some(now) } else { l.last_seen };
        r.1 = r.1.max(seen);
    }
    rows.into_values()
        .map(|(mut f, seen)| {
            f.last_seen_secs = seen.map(unix_secs);
            f
        })
        .collect()
}

impl Snapshot {
    /// Reads the current figures. `started`: when the API was built, at process start.
    pub fn collect(state: &ApiState, started: SystemTime) -> Result<Snapshot, ReadError> {
        let sites = site_figures(
            state.store.sites()?,
            state.store.revoked_sites()?,
            state.registry.snapshot(),
            SystemTime::now(),
        );
        let refusals = state.registry.accept_refusals();
        Ok(Snapshot {
            sites,
            live_sessions: state.registry.connected_count() as u64,
            master_revision: state.store.revision()?,
            tables: state.store.table_counts()?,
            refused_connections: refusals.connections.load(Ordering::Relaxed),
            refused_handshakes_per_ip: refusals.handshakes_per_ip.load(Ordering::Relaxed),
            refused_memory: refusals.memory.load(Ordering::Relaxed),
            certs_renewed: crate::renewal::RENEWED.load(Ordering::Relaxed),
            cert_renewals_refused: crate::renewal::REFUSED.load(Ordering::Relaxed),
            start_time_secs: unix_secs(started),
            resident_memory_bytes: crate::memory::resident_memory_bytes(),
        })
    }
}

type SiteLabel = [(&'static str, String); 1];

/// The snapshot as OpenMetrics text. Every name carries the `outpost_central_` prefix (the
/// standard `process_*` ones excepted), counters end in `_total`, units are in the names. The
/// only labels are `site` (one value per known site) and `reason` (three values).
pub fn render(s: &Snapshot) -> String {
    let mut root = Registry::default();
    let r = root.sub_registry_with_prefix("outpost_central");
    let connected: Family<SiteLabel, Gauge> = Family::default();
    let acked: Family<SiteLabel, Gauge> = Family::default();
    let revoked: Family<SiteLabel, Gauge> = Family::default();
    let last_seen: Family<SiteLabel, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let offset: Family<SiteLabel, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    for f in &s.sites {
        let label = [("site", f.site.clone())];
        connected.get_or_create(&label).set(i64::from(f.connected));
        acked
            .get_or_create(&label)
            .set(i64::try_from(f.acked_seq).unwrap_or(i64::MAX));
        revoked.get_or_create(&label).set(i64::from(f.revoked));
        if let Some(t) = f.last_seen_secs {
            last_seen.get_or_create(&label).set(t);
        }
        if let Some(o) = f.clock_offset_secs {
            offset.get_or_create(&label).set(o);
        }
    }
    r.register(
        "site_connected",
        "1 while the site has a live sync session, else 0",
        connected,
    );
    r.register(
        "site_acked_seq",
        "The site's high-water mark: the highest sequence number central committed",
        acked,
    );
    r.register_with_unit(
        "site_last_seen_timestamp",
        "When central last heard from the site (Unix time; now while connected)",
        Unit::Seconds,
        last_seen,
    );
    r.register_with_unit(
        "site_clock_offset",
        "The site's clock minus central's, estimated at its last Hello since central started",
        Unit::Seconds,
        offset,
    );
    r.register(
        "site_revoked",
        "1 while the site is on central's deny list, else 0",
        revoked,
    );
    r.register(
        "sites",
        "Sites central knows of (stored, revoked or seen since start)",
        ConstGauge::new(s.sites.len() as u64),
    );
    r.register(
        "live_sessions",
        "Live sync sessions",
        ConstGauge::new(s.live_sessions),
    );
    r.register(
        "master_revision",
        "Revision of the newest master-data change",
        ConstGauge::new(s.master_revision),
    );
    r.register(
        "feed_events",
        "Events in the ERP's feed",
        ConstGauge::new(s.tables.feed_events),
    );
    r.register(
        "exceptions",
        "Exceptions stored, open and resolved",
        ConstGauge::new(s.tables.exceptions),
    );
    r.register(
        "dead_letters",
        "Dead letters stored",
        ConstGauge::new(s.tables.dead_letters),
    );
    let refused: Family<[(&str, &str); 1], Counter> = Family::default();
    for (reason, v) in [
        ("max_connections", s.refused_connections),
        ("handshakes_per_ip", s.refused_handshakes_per_ip),
        ("memory_limit", s.refused_memory),
    ] {
        refused.get_or_create(&[("reason", reason)]).inc_by(v);
    }
    r.register(
        "quic_connections_refused",
        "QUIC connections refused before their handshake, by the limit that refused them",
        refused,
    );
    let renewed = Counter::<u64>::default();
    renewed.inc_by(s.certs_renewed);
    r.register(
        "certificates_renewed",
        "Site certificates signed for a renewal over the sync connection",
        renewed,
    );
    let renewals_refused = Counter::<u64>::default();
    renewals_refused.inc_by(s.cert_renewals_refused);
    r.register(
        "certificate_renewals_refused",
        "Certificate renewal requests refused (no CA key, bad request, too soon)",
        renewals_refused,
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

/// `GET /metrics` (any role, like the other reads).
pub async fn handler(
    axum::extract::State(state): axum::extract::State<ApiState>,
    started: SystemTime,
) -> Result<axum::response::Response, crate::api::ApiError> {
    use axum::response::IntoResponse;
    let snapshot = Snapshot::collect(&state, started)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&snapshot),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry as Sessions;
    use crate::store::{SiteRecord, Store};
    use std::sync::Arc;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Goal: every known site gets one row, whatever told central of it, with `GET /v1/sites`'s
    /// rules for last contact. Method: a stored site, a revoked one that never uploaded, a
    /// connected one only in the registry; compare the rows.
    #[test]
    fn every_known_site_gets_one_row() {
        let stored = vec![StoredSite {
            site: "plant-1".into(),
            record: Some(SiteRecord {
                first_seen_ms: 1_000,
                last_seen_ms: 50_000,
            }),
            hwm: 25,
        }];
        let revoked = vec![(
            "plant-2".to_string(),
            RevokedSite {
                at_ms: 0,
                reason: "stolen".into(),
            },
        )];
        let live = HashMap::from([
            (
                "plant-1".to_string(),
                SiteLiveness {
                    connected: false,
                    last_seen: Some(at(40)),
                    clock_offset_ms: Some(-1_500),
                },
            ),
            (
                "warehouse-1".to_string(),
                SiteLiveness {
                    connected: true,
                    last_seen: Some(at(10)),
                    clock_offset_ms: None,
                },
            ),
        ]);
        let rows = site_figures(stored, revoked, live, at(100));
        assert_eq!(
            rows,
            vec![
                SiteFigures {
                    site: "plant-1".into(),
                    connected: false,
                    acked_seq: 25,
                    last_seen_secs: Some(50.0),
                    clock_offset_secs: Some(-1.5),
                    revoked: false,
                },
                SiteFigures {
                    site: "plant-2".into(),
                    revoked: true,
                    ..SiteFigures::default()
                },
                SiteFigures {
                    site: "warehouse-1".into(),
                    connected: true,
                    last_seen_secs: Some(100.0),
                    ..SiteFigures::default()
                },
            ]
        );
    }

    /// Goal: each figure appears under its documented name, per site where it is per site, and
    /// unknown figures are absent. Method: render a snapshot of distinct values; look for lines.
    #[test]
    fn renders_fleet_and_per_site_figures() {
        let s = Snapshot {
            sites: vec![
                SiteFigures {
                    site: "plant-1".into(),
                    connected: true,
                    acked_seq: 25,
                    last_seen_secs: Some(1_700_000_000.0),
                    clock_offset_secs: Some(-1.5),
                    revoked: false,
                },
                SiteFigures {
                    site: "plant-2".into(),
                    revoked: true,
                    ..SiteFigures::default()
                },
            ],
            live_sessions: 1,
            master_revision: 9,
            tables: TableCounts {
                feed_events: 30,
                exceptions: 2,
                dead_letters: 1,
            },
            refused_connections: 3,
            refused_handshakes_per_ip: 4,
            refused_memory: 5,
            certs_renewed: 6,
            cert_renewals_refused: 7,
            start_time_secs: 1_600_000_000.0,
            resident_memory_bytes: None,
        };
        let text = render(&s);
        for line in [
            "outpost_central_site_connected{site=\"plant-1\"} 1",
            "outpost_central_site_connected{site=\"plant-2\"} 0",
            "outpost_central_site_acked_seq{site=\"plant-1\"} 25",
            "outpost_central_site_acked_seq{site=\"plant-2\"} 0",
            "outpost_central_site_last_seen_timestamp_seconds{site=\"plant-1\"} 1700000000.0",
            "outpost_central_site_clock_offset_seconds{site=\"plant-1\"} -1.5",
            "outpost_central_site_revoked{site=\"plant-1\"} 0",
            "outpost_central_site_revoked{site=\"plant-2\"} 1",
            "outpost_central_certificates_renewed_total 6",
            "outpost_central_certificate_renewals_refused_total 7",
            "outpost_central_sites 2",
            "outpost_central_live_sessions 1",
            "outpost_central_master_revision 9",
            "outpost_central_feed_events 30",
            "outpost_central_exceptions 2",
            "outpost_central_dead_letters 1",
            "outpost_central_quic_connections_refused_total{reason=\"max_connections\"} 3",
            "outpost_central_quic_connections_refused_total{reason=\"handshakes_per_ip\"} 4",
            "outpost_central_quic_connections_refused_total{reason=\"memory_limit\"} 5",
            "process_start_time_seconds 1600000000.0",
            "# TYPE outpost_central_quic_connections_refused counter",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Unknown figures are left out, not made up.
        assert!(!text.contains("last_seen_timestamp_seconds{site=\"plant-2\"}"));
        assert!(!text.contains("clock_offset_seconds{site=\"plant-2\"}"));
        assert!(!text.contains("process_resident_memory_bytes"));
    }

    /// Goal: the route reads the live store and registry, for any role, and refuses callers
    /// without a token. Method: ingest a batch for one site, register a session for another,
    /// count a refusal, then scrape through the real router as an `erp` client and without a
    /// token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_route_serves_live_figures_to_any_role_and_401_without_a_token() {
        use outpost_protocol::{EventBody, EventEnvelope, Milestone, MilestoneKind};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("central.redb")).unwrap();
        let batch: Vec<EventEnvelope> = (1..=3)
            .map(|seq| {
                EventEnvelope::new(
                    "plant-1",
                    seq,
                    &format!("ev-{seq}"),
                    1_767_225_600_000,
                    &EventBody::Milestone(Milestone {
                        shipment_id: "SH-1".into(),
                        milestone: MilestoneKind::Loaded,
                        scanner_id: "scan-7".into(),
                        at: "2026-01-01T00:00:00Z".into(),
                    }),
                )
            })
            .collect();
        store.ingest("plant-1", batch).await.unwrap();
        let sessions = Arc::new(Sessions::new());
        let _ticket = sessions.register("plant-2");
        sessions
            .accept_refusals()
            .memory
            .fetch_add(2, Ordering::Relaxed);
        let state = ApiState {
            store: store.clone(),
            data_dir: std::env::temp_dir(),
            registry: sessions,
            clients: Arc::new(crate::api::Clients::from_tokens([(
                "erp",
                crate::config::Role::Erp,
                "erp-token-0123456789abcdef",
            )])),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = crate::router::router(state, 1 << 20);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http = reqwest::Client::new();
        let resp = http
            .get(format!("http://{addr}/metrics"))
            .bearer_auth("erp-token-0123456789abcdef")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], CONTENT_TYPE);
        let text = resp.text().await.unwrap();
        for line in [
            "outpost_central_site_acked_seq{site=\"plant-1\"} 3",
            "outpost_central_site_connected{site=\"plant-1\"} 0",
            "outpost_central_site_connected{site=\"plant-2\"} 1",
            "outpost_central_sites 2",
            "outpost_central_live_sessions 1",
            "outpost_central_feed_events 3",
            "outpost_central_dead_letters 0",
            "outpost_central_quic_connections_refused_total{reason=\"memory_limit\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("process_resident_memory_bytes ")),
            "{text}"
        );
        let resp = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        store.close().await;
    }
}
