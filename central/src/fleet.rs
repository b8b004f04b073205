//! Fleet health monitor: every `MONITOR_INTERVAL` derives each known site's state (the pure
//! `health::derive`) from the registry's heartbeats and liveness and the store's sites, keeps
//! the states for the API, records an alert in the store on each change and hands it to the
//! webhook sender. Async shell (store, clock, HTTP client).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::fleet_health::{FleetHealth, SiteHealth};
use crate::health::{self, Inputs, Reason, State, Thresholds};
use crate::registry::Registry;
use crate::store::{Alert, NewAlert, Store, StoreUnavailable};

/// How often states are derived: an offline site is noticed within this after its threshold.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one webhook POST may take.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per alert and URL; the delay doubles from `WEBHOOK_BACKOFF` between them (with
/// full jitter).
pub const WEBHOOK_ATTEMPTS: u32 = 4;
pub const WEBHOOK_BACKOFF: Duration = Duration::from_millis(500);

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

/// Derives every known site's state at `now_ms`: the sites in the store and those in the
/// registry. Pure apart from the reads it is given.
pub fn derive_all(
    stored_last_seen: &HashMap<String, Option<i64>>,
    registry: &Registry,
    now_ms: i64,
    t: &Thresholds,
) -> HashMap<String, (State, Vec<Reason>)> {
    let live = registry.latest_signals();
    let mut sites: Vec<&String> = stored_last_seen.keys().chain(live.keys()).collect();
    sites.sort();
    sites.dedup();
    sites
        .into_iter()
        .map(|site| {
            let signals = live.get(site);
            // The registry knows best while central runs; the store's last contact (which a
            // session's end also moves) only for sites not heard from since central started.
            let last_heard_ms = match signals {
                Some(s) => s.last_heard.map(unix_ms),
                None => stored_last_seen.get(site).copied().flatten(),
            };
            let inputs = Inputs {
                last_heard_ms,
                latest: signals.and_then(|s| s.beats.last()),
            };
            (site.clone(), health::derive(&inputs, now_ms, t))
        })
        .collect()
}

/// The monitor task: derives states every `MONITOR_INTERVAL` until `stop` turns true.
pub async fn run_monitor(
    store: Store,
    registry: std::sync::Arc<Registry>,
    thresholds: Thresholds,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(MONITOR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The drill each site was last part of, to mark the alert of its way out of the drill.
    let mut last_drill: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        // A redb read blocks: it runs on the blocking pool, not on the async workers.
        let reader = store.clone();
        let read = tokio::task::spawn_blocking(move || reader.sites()).await;
        let stored: HashMap<String, Option<i64>> = match read {
            Ok(Ok(sites)) => sites
                .into_iter()
                .map(|s| (s.site, s.record.map(|r| r.last_seen_ms)))
                .collect(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health monitor cannot read the sites; using live sessions only");
                HashMap::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "health monitor's read of the sites failed; using live sessions only");
                HashMap::new()
            }
        };
        let now = now_ms();
        let mut derived = derive_all(&stored, &registry, now, &thresholds);
        // A site in a disaster-recovery drill shows as `drill`, not as an incident; the reasons
        // underneath are kept for the record.
        let mut in_drill = HashMap::new();
        for (site, (state, _)) in derived.iter_mut() {
            if let Some(id) = registry.drills().site_drill(site) {
                *state = State::Drill;
                in_drill.insert(site.clone(), id);
                last_drill.insert(site.clone(), id);
            }
        }
        publish(
            registry.fleet_health(),
            &store,
            derived,
            &in_drill,
            &last_drill,
            now,
        )
        .await;
    }
}

/// Where the monitor records its alerts: the store in production, a scripted sink in tests.
pub trait AlertSink {
    fn store_alert(
        &self,
        alert: NewAlert,
    ) -> impl std::future::Future<Output = Result<Alert, StoreUnavailable>> + Send;
}

impl AlertSink for Store {
    async fn store_alert(&self, alert: NewAlert) -> Result<Alert, StoreUnavailable> {
        self.record_alert(alert).await
    }
}

/// One tick's publication of the derived states. The monitor is the only writer of the
/// published states: it reads them, stores an alert for each site whose state changed, and only
/// then publishes, so an API reader or a webhook never sees a new state whose alert is not in the
/// store. A site whose alert cannot be stored keeps its previous published state, so the next
/// tick finds the same change and stores the alert again (a retry every `MONITOR_INTERVAL` until
/// the store takes it) instead of losing it.
pub async fn publish(
    fleet: &FleetHealth,
    alerts: &impl AlertSink,
    derived: HashMap<String, (State, Vec<Reason>)>,
    in_drill: &HashMap<String, u64>,
    last_drill: &HashMap<String, u64>,
    now: i64,
) {
    let mut states = fleet.states();
    let mut changes = Vec::new();
    for (site, (state, reasons)) in derived {
        match states.get_mut(&site) {
            // The first state seen for a site (central just started, or a new site) is the
            // baseline: nothing changed.
            None => {
                states.insert(
                    site,
                    SiteHealth {
                        state,
                        reasons,
                        since_ms: now,
                    },
                );
            }
            Some(h) if h.state.as_str() != state.as_str() => {
                // Into a drill, or out of one: part of the drill.
                let drill_id = in_drill.get(&site).copied().or_else(|| {
                    (h.state == State::Drill)
                        .then(|| last_drill.get(&site).copied())
                        .flatten()
                });
                let alert = NewAlert {
                    site: site.clone(),
                    from: h.state.as_str().to_string(),
                    to: state.as_str().to_string(),
                    reasons: reasons.iter().map(|r| r.as_str().to_string()).collect(),
                    at_ms: now,
                    drill_id,
                };
                let health = SiteHealth {
                    state,
                    reasons,
                    since_ms: now,
                };
                changes.push((alert, health));
            }
            Some(h) => {
                h.state = state;
                h.reasons = reasons;
            }
        }
    }
    for (change, health) in changes {
        let site = change.site.clone();
        match alerts.store_alert(change).await {
            Ok(alert) => {
                // Logged once the alert is stored, so a change retried over several ticks is
                // logged once.
                tracing::warn!(site.id = %site, alert.id = alert.id, from = %alert.from, to = %alert.to, reasons = ?alert.reasons, "site health changed");
                states.insert(site, health);
                fleet.enqueue(alert);
            }
            Err(e) => {
                tracing::warn!(site.id = %site, error = %e, "cannot record a health alert; the site keeps its published state and the change is retried at the next tick");
            }
        }
    }
    fleet.publish(states);
}

/// The webhook sender: POSTs each queued alert as JSON to every URL, with a timeout per POST
/// and bounded retries with backoff, until `stop` turns true.
pub async fn run_webhooks(
    registry: std::sync::Arc<Registry>,
    urls: Vec<String>,
    mut stop: watch::Receiver<bool>,
) {
    let fleet = registry.fleet_health();
    let client = match reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; alerts are not POSTed");
            return;
        }
    };
    loop {
        let alert = loop {
            if let Some(a) = fleet.dequeue() {
                break a;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = fleet.queued() => {}
            }
        };
        let body = alert_json(&alert);
        for url in &urls {
            let mut delay = WEBHOOK_BACKOFF;
            let mut attempt = 1;
            loop {
                let result = client.post(url).json(&body).send().await;
                let error = match result {
                    Ok(r) if r.status().is_success() => None,
                    Ok(r) => Some(format!("answered {}", r.status())),
                    Err(e) => Some(e.to_string()),
                };
                let Some(error) = error else {
                    fleet.webhook_sent.fetch_add(1, Ordering::Relaxed);
                    break;
                };
                if attempt >= WEBHOOK_ATTEMPTS {
                    fleet.webhook_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%url, alert.id = alert.id, %error, attempts = attempt, "webhook delivery failed; giving up on this alert");
                    break;
                }
                tracing::debug!(%url, alert.id = alert.id, %error, attempt, "webhook delivery failed; retrying");
                let pause = delay.mul_f64(rand::random::<f64>());
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                delay = delay.saturating_mul(2);
                attempt += 1;
            }
        }
    }
}

/// An alert as JSON (API and webhooks).
pub fn alert_json(a: &Alert) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "site": a.site,
        "from": a.from,
        "to": a.to,
        "reasons": a.reasons,
        "at": crate::timefmt::rfc3339_ms(a.at_ms),
        "at_ms": a.at_ms,
        "drill_id": a.drill_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn alert(id: u64) -> Alert {
        Alert {
            id,
            site: "plant-1".into(),
            from: "healthy".into(),
            to: "offline".into(),
            reasons: vec!["not_heard_from".into()],
            at_ms: 1_000,
            drill_id: None,
        }
    }

    /// A sink that refuses its first `failures` alerts and records, for each alert it is given,
    /// the state an API reader saw for the site at that moment.
    struct ScriptedSink {
        fleet: Arc<FleetHealth>,
        failures: Mutex<u32>,
        stored: Mutex<Vec<Alert>>,
        published_while_storing: Mutex<Vec<Option<&'static str>>>,
    }

    impl AlertSink for ScriptedSink {
        async fn store_alert(&self, a: NewAlert) -> Result<Alert, StoreUnavailable> {
            let seen = self.fleet.state(&a.site).map(|h| h.state.as_str());
            self.published_while_storing.lock().unwrap().push(seen);
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(StoreUnavailable("write failed: disk full".into()));
            }
            let mut stored = self.stored.lock().unwrap();
            let alert = a.with_id(stored.len() as u64 + 1);
            stored.push(alert.clone());
            Ok(alert)
        }
    }

    /// Goal: a site's new state is published only after its alert is stored, and an alert the
    /// store refuses is not lost but stored at a later tick. Guards against publishing first
    /// (an API reader would see a change the alert list lacks) and against dropping the alert
    /// on a failed write (the change would never be alerted).
    /// Method: drive `publish` tick by tick over a scripted sink that fails its first write and
    /// records what was published at each write.
    #[tokio::test]
    async fn a_state_is_published_only_after_its_alert_is_stored_and_a_failed_alert_is_retried() {
        let fleet = Arc::new(FleetHealth::default());
        let sink = ScriptedSink {
            fleet: fleet.clone(),
            failures: Mutex::new(1),
            stored: Mutex::new(Vec::new()),
            published_while_storing: Mutex::new(Vec::new()),
        };
        let none = HashMap::new();
        let tick = |state: State, reasons: Vec<Reason>| {
            HashMap::from([("plant-1".to_string(), (state, reasons))])
        };
        let offline = || State::Offline { since_ms: Some(0) };

        // Baseline: no alert.
        publish(
            &fleet,
            &sink,
            tick(State::Healthy, vec![]),
            &none,
            &none,
            1_000,
        )
        .await;
        assert_eq!(fleet.state("plant-1").unwrap().state, State::Healthy);

        // The change's alert fails: the old state stays published, nothing is queued.
        let down = vec![Reason::NotHeardFrom];
        publish(
            &fleet,
            &sink,
            tick(offline(), down.clone()),
            &none,
            &none,
            2_000,
        )
        .await;
        assert_eq!(fleet.state("plant-1").unwrap().state, State::Healthy);
        assert!(sink.stored.lock().unwrap().is_empty());
        assert_eq!(fleet.dequeue(), None);

        // The next tick stores the alert, then publishes the state.
        publish(&fleet, &sink, tick(offline(), down), &none, &none, 3_000).await;
        let stored = sink.stored.lock().unwrap().clone();
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!((&*stored[0].from, &*stored[0].to), ("healthy", "offline"));
        let h = fleet.state("plant-1").unwrap();
        assert_eq!((h.state.as_str(), h.since_ms), ("offline", 3_000));
        assert_eq!(fleet.dequeue().map(|a| a.id), Some(1));
        assert_eq!(
            *sink.published_while_storing.lock().unwrap(),
            vec![Some("healthy"), Some("healthy")],
            "the new state was visible before its alert was stored"
        );
    }

    /// Goal: a webhook that fails is retried with backoff and the alert's JSON is delivered.
    /// Method: a listener answers the first POST 500 and the second 200; the sender must count
    /// one delivery and no failure.
    #[tokio::test]
    async fn a_failed_webhook_is_retried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = bodies.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut sock, _)) = listener.accept().await {
                n += 1;
                let mut buf = vec![0u8; 16 * 1024];
                let mut len = 0;
                // The request is small: read until the JSON body's closing brace.
                while !buf[..len].ends_with(b"}") {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => len += k,
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..len]).to_string());
                let status = if n == 1 {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let resp =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = sock.write_all(resp.as_bytes()).await;
            }
        });
        let registry = Arc::new(Registry::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_webhooks(registry.clone(), vec![url], stop_rx));
        registry.fleet_health().enqueue(alert(7));
        let fleet = registry.fleet_health();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fleet.webhook_sent.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "no delivery in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fleet.webhook_failed.load(Ordering::Relaxed), 0);
        let bodies = bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 2, "{bodies:?}");
        assert!(bodies[1].contains(r#""to":"offline""#), "{}", bodies[1]);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
