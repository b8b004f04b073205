//! The traffic simulator's counters and how they are shown: the live line, the summary tables
//! and each site's counters in the record file. Pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use super::plan::Histogram;

/// Widest live line: fits a 100-column terminal.
pub const MAX_LIVE_COLUMNS: usize = 100;

/// Counters of one kind of request at one site.
#[derive(Debug, Clone, Default)]
pub struct KindStats {
    /// Requests sent (every attempt).
    pub sent: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Failed attempts plus answers that break the contract (a retry's different order id).
    pub errors: u64,
    /// `errors` by class: `timeout`, `connect`, `request`, `<status>[ <code>]`, `id_mismatch`...
    pub error_classes: BTreeMap<String, u64>,
    /// Latency of 2xx answers.
    pub latency: Histogram,
}

impl KindStats {
    pub fn record_ok(&mut self, latency: Duration) {
        self.ok += 1;
        self.latency.record(latency);
    }

    pub fn record_error(&mut self, class: &str) {
        self.errors += 1;
        *self.error_classes.entry(class.to_string()).or_insert(0) += 1;
    }

    fn json(&self) -> serde_json::Map<String, Value> {
        let ms = |q| {
            self.latency
                .quantile(q)
                .map(|d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0)
        };
        let v = json!({
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "error_classes": self.error_classes,
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("json! of an object literal"),
        }
    }
}

/// Counters of one site.
#[derive(Debug, Clone, Default)]
pub struct SiteStats {
    pub orders: KindStats,
    pub milestones: KindStats,
    pub reads: KindStats,
    /// Distinct orders acknowledged, by the status of their first answer.
    pub orders_new: u64,
    pub confirmed: u64,
    pub partial: u64,
    pub pending: u64,
    /// Orders resent with the same Idempotency-Key.
    pub retries: u64,
    pub shipments_completed: u64,
    pub shipments_abandoned: u64,
    /// Ticks not sent because the site's in-flight cap was reached (or every shipment was
    /// waiting for an answer).
    pub skipped_ticks: u64,
    /// Ticks dropped because the driver fell behind by more than the catch-up window.
    pub late_ticks: u64,
    /// Requests still in flight when the drain timed out (outcome unknown to the simulator).
    pub aborted: u64,
}

impl SiteStats {
    /// Counts an order's first acknowledgement by its status.
    pub fn count_new_order(&mut self, status: &str) {
        self.orders_new += 1;
        match status {
            "confirmed" => self.confirmed += 1,
            "partial" => self.partial += 1,
            _ => self.pending += 1,
        }
    }

    pub fn add(&mut self, o: &SiteStats) {
        for (a, b) in [
            (&mut self.orders, &o.orders),
            (&mut self.milestones, &o.milestones),
            (&mut self.reads, &o.reads),
        ] {
            a.sent += b.sent;
            a.ok += b.ok;
            a.errors += b.errors;
            for (k, v) in &b.error_classes {
                *a.error_classes.entry(k.clone()).or_insert(0) += v;
            }
        }
        self.orders_new += o.orders_new;
        self.confirmed += o.confirmed;
        self.partial += o.partial;
        self.pending += o.pending;
        self.retries += o.retries;
        self.shipments_completed += o.shipments_completed;
        self.shipments_abandoned += o.shipments_abandoned;
        self.skipped_ticks += o.skipped_ticks;
        self.late_ticks += o.late_ticks;
        self.aborted += o.aborted;
    }

    /// The site's counters in the record file.
    pub fn json(&self) -> Value {
        let mut orders = self.orders.json();
        for (k, v) in [
            ("new", self.orders_new),
            ("confirmed", self.confirmed),
            ("partial", self.partial),
            ("pending", self.pending),
            ("retries", self.retries),
        ] {
            orders.insert(k.into(), json!(v));
        }
        let mut milestones = self.milestones.json();
        milestones.insert(
            "shipments_completed".into(),
            json!(self.shipments_completed),
        );
        milestones.insert(
            "shipments_abandoned".into(),
            json!(self.shipments_abandoned),
        );
        json!({
            "orders": orders,
            "milestones": milestones,
            "reads": self.reads.json(),
            "skipped_ticks": self.skipped_ticks,
            "late_ticks": self.late_ticks,
            "aborted": self.aborted,
        })
    }
}

/// `503 store_unavailable` → `503`: the live line shows status codes, the summary the codes.
fn short_class(class: &str) -> &str {
    class.split(' ').next().unwrap_or(class)
}

/// The live line: elapsed time, each kind's 2xx per second since the last line (`prev`, `dt`
/// ago), and the run's totals of 2xx, errors by class and retries; at most
/// `MAX_LIVE_COLUMNS` wide.
pub fn live_line(elapsed: Duration, now: &SiteStats, prev: &SiteStats, dt: Duration) -> String {
    let secs = dt.as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    let mut classes: BTreeMap<&str, u64> = BTreeMap::new();
    for k in [&now.orders, &now.milestones, &now.reads] {
        for (c, n) in &k.error_classes {
            *classes.entry(short_class(c)).or_insert(0) += n;
        }
    }
    let mut classes: Vec<(&str, u64)> = classes.into_iter().collect();
    classes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let errors = now.orders.errors + now.milestones.errors + now.reads.errors;
    let ok = now.orders.ok + now.milestones.ok + now.reads.ok;
    let mut line = format!(
        "t={}s orders {:.1}/s milestones {:.1}/s reads {:.1}/s | 2xx {ok} errors {errors}",
        elapsed.as_secs(),
        rate(now.orders.ok, prev.orders.ok),
        rate(now.milestones.ok, prev.milestones.ok),
        rate(now.reads.ok, prev.reads.ok),
    );
    if !classes.is_empty() {
        let list: Vec<String> = classes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let _ = write!(line, " ({})", list.join(", "));
    }
    let _ = write!(line, " retries {}", now.retries);
    truncate(line, MAX_LIVE_COLUMNS)
}

/// Cuts `s` to `max` characters, ending in `...` when cut.
fn truncate(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        return s;
    }
    let mut t: String = s.chars().take(max.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

fn ms(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) => {
            let ms = d.as_secs_f64() * 1e3;
            if ms < 10.0 {
                format!("{ms:.1}")
            } else {
                format!("{ms:.0}")
            }
        }
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(header.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned())
    {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            // The site column is left-aligned, numbers right-aligned.
            if i == 0 {
                let _ = write!(l, "{c:<w$}  ");
            } else {
                let _ = write!(l, "{c:>w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    out
}

/// The end-of-run summary: per site, the orders' outcomes, milestones and reads, their
/// latencies (p50/p99 of 2xx answers, in ms) and the errors by class; a total row when there
/// is more than one site.
pub fn summary(sites: &[(String, SiteStats)]) -> String {
    let mut rows = Vec::new();
    let mut lat = Vec::new();
    let mut total = SiteStats::default();
    for (site, s) in sites {
        total.add(s);
        rows.push(count_row(site, s));
        let pq = |k: &KindStats| {
            format!(
                "{}/{}",
                ms(k.latency.quantile(0.5)),
                ms(k.latency.quantile(0.99))
            )
        };
        lat.push(vec![
            site.clone(),
            pq(&s.orders),
            pq(&s.milestones),
            pq(&s.reads),
        ]);
    }
    if sites.len() > 1 {
        rows.push(count_row("total", &total));
    }
    let mut out = table(
        &[
            "SITE",
            "ORDERS_OK",
            "NEW",
            "CONFIRMED",
            "PARTIAL",
            "PENDING",
            "ERRORS",
            "RETRIES",
            "MS_OK",
            "MS_ERR",
            "READS_OK",
            "READS_ERR",
        ],
        &rows,
    );
    out.push('\n');
    out.push_str(&table(
        &[
            "SITE",
            "ORDERS p50/p99 ms",
            "MILESTONES p50/p99 ms",
            "READS p50/p99 ms",
        ],
        &lat,
    ));
    let mut errors = String::new();
    for (site, s) in sites {
        for (kind, k) in [
            ("orders", &s.orders),
            ("milestones", &s.milestones),
            ("reads", &s.reads),
        ] {
            if k.error_classes.is_empty() {
                continue;
            }
            let list: Vec<String> = k
                .error_classes
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            let _ = writeln!(errors, "  {site} {kind}: {}", list.join(", "));
        }
        if s.skipped_ticks + s.late_ticks + s.aborted > 0 {
            let _ = writeln!(
                errors,
                "  {site}: {} ticks skipped (in-flight cap), {} late, {} requests aborted",
                s.skipped_ticks, s.late_ticks, s.aborted
            );
        }
    }
    if !errors.is_empty() {
        out.push_str("\nerrors and skipped work:\n");
        out.push_str(&errors);
    }
    out
}

fn count_row(site: &str, s: &SiteStats) -> Vec<String> {
    [
        s.orders.ok,
        s.orders_new,
        s.confirmed,
        s.partial,
        s.pending,
        s.orders.errors,
        s.retries,
        s.milestones.ok,
        s.milestones.errors,
        s.reads.ok,
        s.reads.errors,
    ]
    .iter()
    .map(u64::to_string)
    .fold(vec![site.to_string()], |mut v, c| {
        v.push(c);
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> SiteStats {
        let mut s = SiteStats::default();
        for _ in 0..50 {
            s.orders.record_ok(Duration::from_millis(3));
        }
        for _ in 0..100 {
            s.milestones.record_ok(Duration::from_millis(2));
        }
        for _ in 0..200 {
            s.reads.record_ok(Duration::from_micros(500));
        }
        s.orders.record_error("timeout");
        s.orders.record_error("timeout");
        s.milestones.record_error("503 store_unavailable");
        s.retries = 6;
        s.count_new_order("confirmed");
        s.count_new_order("pending");
        s
    }

    #[test]
    fn live_line_shows_rates_errors_and_retries_within_100_columns() {
        let now = stats();
        let line = live_line(
            Duration::from_secs(12),
            &now,
            &SiteStats::default(),
            Duration::from_secs(10),
        );
        assert_eq!(
            line,
            "t=12s orders 5.0/s milestones 10.0/s reads 20.0/s | 2xx 350 errors 3 \
             (timeout 2, 503 1) retries 6"
        );
        let mut many = now.clone();
        for i in 0..40 {
            many.reads.record_error(&format!("{} code", 400 + i));
        }
        let line = live_line(Duration::from_secs(1), &many, &now, Duration::from_secs(1));
        assert!(line.chars().count() <= MAX_LIVE_COLUMNS, "{line}");
        assert!(line.ends_with("..."), "{line}");
    }

    #[test]
    fn summary_has_a_row_per_site_a_total_and_the_error_classes() {
        let s = stats();
        let text = summary(&[("plant-1".into(), s.clone()), ("plant-2".into(), s)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SITE"), "{text}");
        assert!(lines[1].starts_with("plant-1"), "{text}");
        assert!(lines[3].starts_with("total"), "{text}");
        assert!(lines[3].contains(" 100 "), "{text}");
        assert!(text.contains("plant-2 orders: timeout 2"), "{text}");
        assert!(text.contains("503 store_unavailable 1"), "{text}");
        assert!(text.contains("3.1/3.1"), "{text}");
        let j = stats().json();
        assert_eq!(j["orders"]["ok"], 50);
        assert_eq!(j["orders"]["confirmed"], 1);
        assert_eq!(j["orders"]["error_classes"]["timeout"], 2);
        assert_eq!(j["reads"]["errors"], 0);
        assert!(j["reads"]["p50_ms"].as_f64().unwrap() < 1.0);
    }
}
