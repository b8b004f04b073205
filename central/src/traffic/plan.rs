//! The traffic simulator's pure core: what each site's clients send next (orders, shipment
//! milestones, reads), when a request is retried, how requests are paced, and the bookkeeping of
//! every acknowledged write. No sockets, no clock, no tokio: time comes in as `Duration`s since
//! the start, randomness from a seeded `StdRng`, so a seed replays a plan exactly.

use std::collections::HashMap;
use std::time::Duration;

use outpost_protocol::MilestoneKind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};

/// The five milestones of every shipment, in the order scanners record them.
pub const MILESTONES: [MilestoneKind; 5] = [
    MilestoneKind::Picked,
    MilestoneKind::Packed,
    MilestoneKind::Loaded,
    MilestoneKind::Departed,
    MilestoneKind::Delivered,
];
/// Shipments in progress at once per site: enough to interleave several scanners' work, few
/// enough that each shipment finishes within a run of a few seconds at the default rate.
pub const SHIPMENTS_PER_SITE: usize = 8;
/// Attempts at one milestone before the shipment is given up (and counted as abandoned): a
/// scanner does not retry forever, and a run must not livelock on one refused event.
pub const MAX_MILESTONE_ATTEMPTS: u32 = 5;
/// Attempts at one order (first try plus retries with the same Idempotency-Key).
pub const MAX_ORDER_ATTEMPTS: u32 = 3;
/// Most lines in a generated order.
pub const MAX_ORDER_LINES: usize = 3;
/// Largest quantity on a generated line: small, so a demo catalogue's ATP lasts a while.
pub const MAX_LINE_QTY: i64 = 5;
/// How far back a lagging pacer catches up: ticks older than this are dropped (and counted as
/// late) rather than sent in one burst.
pub const CATCH_UP_WINDOW: Duration = Duration::from_millis(100);

/// The SKUs and customers orders and reads are drawn from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    pub skus: Vec<String>,
    pub customers: Vec<String>,
}

/// One order as the client sends it, first time and on every retry.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRequest {
    /// The `Idempotency-Key`: unique per order in a run, the same on its retries.
    pub key: String,
    pub body: Value,
}

/// One milestone as the scanner sends it, first time and on every retry (same event id, same
/// body: the agent refuses a reused event id with a different body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilestoneRequest {
    pub shipment_id: String,
    pub event_id: String,
    pub milestone: MilestoneKind,
    pub scanner_id: String,
    /// RFC 3339, fixed when the event is first made.
    pub at: String,
}

impl MilestoneRequest {
    pub fn path(&self) -> String {
        format!("/v1/shipments/{}/milestones", self.shipment_id)
    }

    pub fn body(&self) -> Value {
        json!({
            "event_id": self.event_id,
            "milestone": self.milestone.as_str(),
            "scanner_id": self.scanner_id,
            "at": self.at,
        })
    }
}

/// A plant floor screen's read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadRequest {
    Atp { sku: String },
    Price { sku: String, customer: String },
}

impl ReadRequest {
    pub fn path(&self) -> String {
        match self {
            ReadRequest::Atp { sku } => format!("/v1/atp/{sku}"),
            ReadRequest::Price { sku, customer } => {
                format!("/v1/prices/{sku}?customer={customer}")
            }
        }
    }
}

/// How one attempt ended, as far as retry decisions care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx.
    Ok,
    /// No answer, or an answer that says "try again" (timeout, connection refused, 408, 429, 5xx):
    /// the outcome is unknown or the request was not taken, and the same request may be resent.
    Transient,
    /// A 4xx that a resend would get again.
    Permanent,
}

impl Attempt {
    /// Classifies an HTTP status.
    pub fn of_status(status: u16) -> Attempt {
        match status {
            200..=299 => Attempt::Ok,
            408 | 429 | 500..=599 => Attempt::Transient,
            _ => Attempt::Permanent,
        }
    }
}

#[derive(Debug, Clone)]
struct Shipment {
    id: String,
    scanner_id: String,
    /// Index into `MILESTONES` of the next milestone to record.
    step: usize,
    /// The event being sent (kept for resends until it is acknowledged).
    pending: Option<MilestoneRequest>,
    in_flight: bool,
    failures: u32,
}

/// The shipments a site's scanners are working on. Each goes through the five milestones
/// strictly in order: the next one is sent only after the previous one was acknowledged, so the
/// agent's seqs of one shipment's milestones increase in milestone order.
#[derive(Debug, Clone)]
pub struct Shipments {
    prefix: String,
    active: Vec<Shipment>,
    next_no: u64,
    pub completed: u64,
    pub abandoned: u64,
}

/// What a milestone's attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShipmentStep {
    /// Acknowledged; the shipment moves to its next milestone.
    Advanced,
    /// Acknowledged and it was `delivered`: the shipment is done and a new one takes its place.
    Completed,
    /// Failed; the same event is resent at a later tick.
    WillResend,
    /// Failed `MAX_MILESTONE_ATTEMPTS` times: the shipment is given up and replaced.
    Abandoned,
    /// No shipment is waiting for this event (a stale answer): ignored.
    Unknown,
}

impl Shipments {
    /// `prefix` makes shipment and event ids unique to a run and site (`SH-<run>-<site index>`).
    pub fn new(prefix: String, n: usize) -> Shipments {
        let mut s = Shipments {
            prefix,
            active: Vec::with_capacity(n),
            next_no: 1,
            completed: 0,
            abandoned: 0,
        };
        for _ in 0..n {
            let sh = s.fresh();
            s.active.push(sh);
        }
        s
    }

    fn fresh(&mut self) -> Shipment {
        let no = self.next_no;
        self.next_no += 1;
        Shipment {
            id: format!("{}-{no}", self.prefix),
            scanner_id: format!("rf-{}", no % 16 + 1),
            step: 0,
            pending: None,
            in_flight: false,
            failures: 0,
        }
    }

    /// The next milestone to send: one of the shipments not waiting for an answer, chosen at
    /// random; its pending event if it has one (a resend), else its next milestone stamped `at`.
    /// `None` when every shipment is waiting (the tick is skipped).
    pub fn poll_milestone(&mut self, rng: &mut StdRng, at: &str) -> Option<MilestoneRequest> {
        let idle: Vec<usize> = (0..self.active.len())
            .filter(|&i| !self.active[i].in_flight)
            .collect();
        if idle.is_empty() {
            return None;
        }
        let sh = &mut self.active[idle[rng.random_range(0..idle.len())]];
        let req = sh
            .pending
            .get_or_insert_with(|| {
                let milestone = MILESTONES[sh.step];
                MilestoneRequest {
                    shipment_id: sh.id.clone(),
                    event_id: format!("{}-{}", sh.id, milestone.as_str()),
                    milestone,
                    scanner_id: sh.scanner_id.clone(),
                    at: at.to_string(),
                }
            })
            .clone();
        sh.in_flight = true;
        Some(req)
    }

    /// Takes the outcome of sending `event_id`.
    pub fn handle_milestone(&mut self, event_id: &str, acked: bool) -> ShipmentStep {
        let Some(i) = self.active.iter().position(|s| {
            s.in_flight && s.pending.as_ref().is_some_and(|p| p.event_id == event_id)
        }) else {
            return ShipmentStep::Unknown;
        };
        let sh = &mut self.active[i];
        sh.in_flight = false;
        if acked {
            sh.pending = None;
            sh.failures = 0;
            sh.step += 1;
            if sh.step == MILESTONES.len() {
                self.completed += 1;
                self.active[i] = self.fresh();
                return ShipmentStep::Completed;
            }
            return ShipmentStep::Advanced;
        }
        sh.failures += 1;
        if sh.failures >= MAX_MILESTONE_ATTEMPTS {
            self.abandoned += 1;
            self.active[i] = self.fresh();
            return ShipmentStep::Abandoned;
        }
        ShipmentStep::WillResend
    }
}

/// What one site's clients do next. Deterministic for a given seed, run tag and site.
#[derive(Debug, Clone)]
pub struct SitePlan {
    site: String,
    run: String,
    rng: StdRng,
    catalogue: Catalogue,
    /// Chance, in percent, that a client resends an order it got a 2xx for (it timed out on its
    /// side and does not know).
    retry_pct: u8,
    next_order: u64,
    pub shipments: Shipments,
}

impl SitePlan {
    /// `site_index` is the site's place in the run (ids stay short whatever the site's name);
    /// `run` is a short tag unique to the run, so a second run against the same fleet never
    /// reuses an Idempotency-Key or event id.
    pub fn new(
        site: &str,
        site_index: usize,
        run: &str,
        seed: u64,
        catalogue: Catalogue,
        retry_pct: u8,
    ) -> SitePlan {
        assert!(
            !catalogue.skus.is_empty() && !catalogue.customers.is_empty(),
            "the options are validated before a plan is made"
        );
        // Each site its own stream, derived from the run's seed.
        let site_seed = seed ^ (site_index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        SitePlan {
            site: site.to_string(),
            run: run.to_string(),
            rng: StdRng::seed_from_u64(site_seed),
            catalogue,
            retry_pct: retry_pct.min(100),
            next_order: 1,
            shipments: Shipments::new(format!("SH-{run}-{site_index}"), SHIPMENTS_PER_SITE),
        }
    }

    /// A new order: a fresh Idempotency-Key, a random customer, 1..=`MAX_ORDER_LINES` distinct
    /// SKUs with small quantities.
    pub fn next_order(&mut self) -> OrderRequest {
        let n = self.next_order;
        self.next_order += 1;
        let key = format!("{}-{}-{n}", self.site, self.run);
        let customer = self.pick_customer();
        let mut skus = self.catalogue.skus.clone();
        let lines = self.rng.random_range(1..=MAX_ORDER_LINES.min(skus.len()));
        let lines: Vec<Value> = (0..lines)
            .map(|_| {
                let sku = skus.swap_remove(self.rng.random_range(0..skus.len()));
                json!({"sku": sku, "qty": self.rng.random_range(1..=MAX_LINE_QTY)})
            })
            .collect();
        OrderRequest {
            key,
            body: json!({"customer_id": customer, "lines": lines}),
        }
    }

    /// Whether to send the same order again (same key, same body) after attempt number
    /// `attempts` (1-based) ended as `outcome`: always after a transient failure, with
    /// probability `retry_pct` after a first 2xx, never after a permanent refusal, and never
    /// beyond `MAX_ORDER_ATTEMPTS`.
    pub fn order_retry(&mut self, attempts: u32, outcome: Attempt) -> bool {
        if attempts >= MAX_ORDER_ATTEMPTS {
            return false;
        }
        match outcome {
            Attempt::Transient => true,
            Attempt::Ok => attempts == 1 && self.rng.random_bool(f64::from(self.retry_pct) / 100.0),
            Attempt::Permanent => false,
        }
    }

    /// A screen's read: ATP or a customer's price of a random SKU, half and half.
    pub fn next_read(&mut self) -> ReadRequest {
        let sku = self.catalogue.skus[self.rng.random_range(0..self.catalogue.skus.len())].clone();
        if self.rng.random_bool(0.5) {
            ReadRequest::Atp { sku }
        } else {
            ReadRequest::Price {
                sku,
                customer: self.pick_customer(),
            }
        }
    }

    /// See `Shipments::poll_milestone`.
    pub fn poll_milestone(&mut self, at: &str) -> Option<MilestoneRequest> {
        self.shipments.poll_milestone(&mut self.rng, at)
    }

    /// See `Shipments::handle_milestone`.
    pub fn handle_milestone(&mut self, event_id: &str, acked: bool) -> ShipmentStep {
        self.shipments.handle_milestone(event_id, acked)
    }

    fn pick_customer(&mut self) -> String {
        let c = &self.catalogue.customers;
        c[self.rng.random_range(0..c.len())].clone()
    }
}

/// Paces one kind of request at `rate` per second without bursts: tick `k` is due at `k / rate`
/// seconds after the start. A driver that falls behind catches up at most `CATCH_UP_WINDOW`'s
/// worth of ticks at once; older ones are dropped and counted as late.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    /// Ticks handed out or dropped so far.
    done: u64,
}

/// Ticks due at one poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    /// To send now.
    pub send: u64,
    /// Dropped: they were due longer than `CATCH_UP_WINDOW` ago.
    pub late: u64,
}

impl Pacer {
    /// `rate` requests per second; 0 (or less) sends nothing.
    pub fn new(rate: f64) -> Pacer {
        Pacer {
            rate: if rate.is_finite() { rate.max(0.0) } else { 0.0 },
            done: 0,
        }
    }

    fn ticks_by(&self, elapsed: Duration) -> u64 {
        if self.rate <= 0.0 {
            return 0;
        }
        // Tick 0 is due at once; tick k at k/rate.
        (elapsed.as_secs_f64() * self.rate).floor() as u64 + 1
    }

    /// The ticks due by `elapsed` since the start that were not handed out yet.
    pub fn poll(&mut self, elapsed: Duration) -> Due {
        let due = self.ticks_by(elapsed).saturating_sub(self.done);
        let window = ((CATCH_UP_WINDOW.as_secs_f64() * self.rate).ceil() as u64).max(1);
        let send = due.min(window);
        self.done += due;
        Due {
            send,
            late: due - send,
        }
    }

    /// When the next tick is due (since the start); `None` when the rate is 0.
    pub fn next_due(&self) -> Option<Duration> {
        if self.rate <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(self.done as f64 / self.rate))
    }
}

/// Latencies in log-spaced buckets (each 10% wider than the one before, from 100 µs; the last
/// bucket holds everything beyond ~2 minutes): constant memory however long the run, quantiles
/// within 10%.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const HIST_BASE_US: f64 = 100.0;
const HIST_RATIO: f64 = 1.1;
const HIST_BUCKETS: usize = 150;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; HIST_BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    fn bucket(d: Duration) -> usize {
        let us = d.as_secs_f64() * 1e6;
        if us <= HIST_BASE_US {
            return 0;
        }
        let i = ((us / HIST_BASE_US).ln() / HIST_RATIO.ln()).ceil() as usize;
        i.min(HIST_BUCKETS - 1)
    }

    fn upper(i: usize) -> Duration {
        Duration::from_secs_f64(HIST_BASE_US * HIST_RATIO.powi(i as i32) / 1e6)
    }

    pub fn record(&mut self, d: Duration) {
        self.counts[Self::bucket(d)] += 1;
        self.total += 1;
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::upper(i));
            }
        }
        Some(Self::upper(HIST_BUCKETS - 1))
    }
}

/// What kind of write an acknowledged entry is, with what the agent answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckKind {
    Order {
        key: Box<str>,
        order_id: Box<str>,
        status: Box<str>,
    },
    Milestone {
        event_id: Box<str>,
        shipment: Box<str>,
        milestone: MilestoneKind,
    },
}

/// One acknowledged write: a 2xx the agent sent, with the seq it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub site: u16,
    pub kind: AckKind,
    pub seq: u64,
}

/// How the ledger took an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The first 2xx for this key or event id: a new entry.
    New,
    /// A later 2xx with the same answer (a retry): no new entry.
    Repeat,
    /// A later 2xx with a different order id or seq: the agent broke idempotency. The entry
    /// keeps the first answer.
    Mismatch { first_id: String, first_seq: u64 },
}

/// Every acknowledged write of a run, once per site and key (orders) or event id (milestones),
/// in the order the answers arrived. Bounded: past `soft_cap` entries it reports itself full so
/// the run stops; the room above it is for the requests already in flight, so no answer is
/// ever dropped.
#[derive(Debug, Clone)]
pub struct Ledger {
    sites: Vec<String>,
    entries: Vec<Ack>,
    index: HashMap<(u16, bool, Box<str>), usize>,
    soft_cap: usize,
}

impl Ledger {
    /// `soft_cap`: entries after which `is_full` says to stop.
    pub fn new(sites: Vec<String>, soft_cap: usize) -> Ledger {
        assert!(
            sites.len() <= usize::from(u16::MAX),
            "the number of sites is bounded by the fleet file's limit"
        );
        Ledger {
            sites,
            entries: Vec::new(),
            index: HashMap::new(),
            soft_cap,
        }
    }

    pub fn entries(&self) -> &[Ack] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.soft_cap
    }

    fn handle(&mut self, site: u16, is_order: bool, key: &str, ack: Ack) -> Recorded {
        let idx_key = (site, is_order, Box::<str>::from(key));
        if let Some(&i) = self.index.get(&idx_key) {
            let first = &self.entries[i];
            let (first_id, new_id) = match (&first.kind, &ack.kind) {
                (AckKind::Order { order_id: a, .. }, AckKind::Order { order_id: b, .. }) => {
                    (a.as_ref(), b.as_ref())
                }
                (
                    AckKind::Milestone { event_id: a, .. },
                    AckKind::Milestone { event_id: b, .. },
                ) => (a.as_ref(), b.as_ref()),
                _ => unreachable!("the index key includes the kind"),
            };
            if first_id == new_id && first.seq == ack.seq {
                return Recorded::Repeat;
            }
            return Recorded::Mismatch {
                first_id: first_id.to_string(),
                first_seq: first.seq,
            };
        }
        self.index.insert(idx_key, self.entries.len());
        self.entries.push(ack);
        Recorded::New
    }

    /// A 2xx to `POST /v1/orders` with `key`: new, a repeat of the same order, or a mismatch.
    pub fn handle_order(
        &mut self,
        site: u16,
        key: &str,
        order_id: &str,
        seq: u64,
        status: &str,
    ) -> Recorded {
        let ack = Ack {
            site,
            kind: AckKind::Order {
                key: key.into(),
                order_id: order_id.into(),
                status: status.into(),
            },
            seq,
        };
        self.handle(site, true, key, ack)
    }

    /// A 2xx to `POST /v1/shipments/{id}/milestones` for `event_id`.
    pub fn handle_milestone(
        &mut self,
        site: u16,
        event_id: &str,
        shipment: &str,
        milestone: MilestoneKind,
        seq: u64,
    ) -> Recorded {
        let ack = Ack {
            site,
            kind: AckKind::Milestone {
                event_id: event_id.into(),
                shipment: shipment.into(),
                milestone,
            },
            seq,
        };
        self.handle(site, false, event_id, ack)
    }
}

/// One entry of the record file's `acknowledged` list.
#[derive(Debug, Serialize)]
pub struct AckJson<'a> {
    pub site: &'a str,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub milestone: Option<&'static str>,
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a str>,
}

impl Ledger {
    /// An entry as the record file shows it.
    pub fn json<'a>(&'a self, a: &'a Ack) -> AckJson<'a> {
        let site = self.sites[usize::from(a.site)].as_str();
        match &a.kind {
            AckKind::Order {
                key,
                order_id,
                status,
            } => AckJson {
                site,
                kind: "order",
                key: Some(key),
                id: order_id,
                shipment: None,
                milestone: None,
                seq: a.seq,
                status: Some(status),
            },
            AckKind::Milestone {
                event_id,
                shipment,
                milestone,
            } => AckJson {
                site,
                kind: "milestone",
                key: None,
                id: event_id,
                shipment: Some(shipment),
                milestone: Some(milestone.as_str()),
                seq: a.seq,
                status: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Catalogue {
        Catalogue {
            skus: vec!["A".into(), "B".into(), "C".into()],
            customers: vec!["X".into(), "Y".into()],
        }
    }

    fn plan(seed: u64, retry_pct: u8) -> SitePlan {
        SitePlan::new("plant-1", 0, "r1", seed, catalogue(), retry_pct)
    }

    /// Goal: every shipment's milestones go out strictly picked → delivered, each exactly once
    /// acknowledged, with interleaving across shipments. Method: drive a plan for many ticks
    /// with random acks and failures (seeded), answering out of order, and check per shipment.
    #[test]
    fn shipments_send_milestones_strictly_in_order() {
        for seed in 0..20u64 {
            let mut p = plan(seed, 0);
            let mut answers = StdRng::seed_from_u64(seed + 1000);
            let mut acked: HashMap<String, Vec<MilestoneKind>> = HashMap::new();
            let mut sent_ids: HashMap<String, MilestoneRequest> = HashMap::new();
            let mut in_flight: Vec<MilestoneRequest> = Vec::new();
            let mut interleaved = false;
            for tick in 0..5_000 {
                if let Some(m) = p.poll_milestone(&format!("t{tick}")) {
                    // A resend is the same event, byte for byte.
                    if let Some(prev) = sent_ids.get(&m.event_id) {
                        assert_eq!(prev, &m, "seed {seed}");
                    }
                    sent_ids.insert(m.event_id.clone(), m.clone());
                    in_flight.push(m);
                }
                if in_flight.len() > 1 {
                    interleaved = true;
                }
                // Answer a random one of those in flight.
                if !in_flight.is_empty() && answers.random_bool(0.7) {
                    let m = in_flight.swap_remove(answers.random_range(0..in_flight.len()));
                    let ok = answers.random_bool(0.8);
                    let step = p.handle_milestone(&m.event_id, ok);
                    assert_ne!(step, ShipmentStep::Unknown);
                    if ok {
                        acked
                            .entry(m.shipment_id.clone())
                            .or_default()
                            .push(m.milestone);
                    }
                }
            }
            assert!(interleaved, "seed {seed}: shipments interleave");
            assert!(p.shipments.completed > 10, "seed {seed}");
            for (sh, ms) in &acked {
                assert_eq!(ms.as_slice(), &MILESTONES[..ms.len()], "seed {seed} {sh}");
            }
            // A stale answer is ignored.
            assert_eq!(p.handle_milestone("nope", true), ShipmentStep::Unknown);
        }
    }

    /// Goal: a shipment whose milestone keeps failing is given up after MAX_MILESTONE_ATTEMPTS.
    #[test]
    fn a_failing_shipment_is_abandoned() {
        let mut s = Shipments::new("SH-r-0".into(), 1);
        let mut rng = StdRng::seed_from_u64(1);
        let first = s.poll_milestone(&mut rng, "t").unwrap();
        assert_eq!(first.event_id, "SH-r-0-1-picked");
        assert!(
            s.poll_milestone(&mut rng, "t").is_none(),
            "the only one is in flight"
        );
        for i in 1..MAX_MILESTONE_ATTEMPTS {
            assert_eq!(
                s.handle_milestone(&first.event_id, false),
                ShipmentStep::WillResend
            );
            let again = s.poll_milestone(&mut rng, "later").unwrap();
            assert_eq!(again, first, "attempt {i} resends the same event");
        }
        assert_eq!(
            s.handle_milestone(&first.event_id, false),
            ShipmentStep::Abandoned
        );
        assert_eq!(s.abandoned, 1);
        let next = s.poll_milestone(&mut rng, "t").unwrap();
        assert_eq!(next.event_id, "SH-r-0-2-picked");
    }

    /// Goal: order keys are unique, retries reuse the key and body, and the retry policy holds.
    #[test]
    fn orders_have_unique_keys_and_retries_reuse_them() {
        let mut p = plan(7, 100);
        let mut keys = std::collections::HashSet::new();
        for _ in 0..1000 {
            let o = p.next_order();
            assert!(keys.insert(o.key.clone()), "{}", o.key);
            assert!(o.key.len() <= outpost_protocol::MAX_IDEMPOTENCY_KEY_LEN);
            let lines = o.body["lines"].as_array().unwrap();
            assert!((1..=MAX_ORDER_LINES).contains(&lines.len()));
            let skus: std::collections::HashSet<_> =
                lines.iter().map(|l| l["sku"].as_str().unwrap()).collect();
            assert_eq!(skus.len(), lines.len(), "distinct SKUs per order");
        }
        // retry_pct 100: a first 2xx is always resent, once; transient failures are resent
        // up to the attempt limit; permanent ones never.
        assert!(p.order_retry(1, Attempt::Ok));
        assert!(!p.order_retry(2, Attempt::Ok));
        assert!(p.order_retry(1, Attempt::Transient));
        assert!(p.order_retry(MAX_ORDER_ATTEMPTS - 1, Attempt::Transient));
        assert!(!p.order_retry(MAX_ORDER_ATTEMPTS, Attempt::Transient));
        assert!(!p.order_retry(1, Attempt::Permanent));
        let mut never = plan(7, 0);
        assert!((0..1000).all(|_| !never.order_retry(1, Attempt::Ok)));
        // About retry_pct of first answers are resent.
        let mut some = plan(9, 10);
        let n = (0..10_000)
            .filter(|_| some.order_retry(1, Attempt::Ok))
            .count();
        assert!((800..1200).contains(&n), "{n}");
        assert_eq!(Attempt::of_status(201), Attempt::Ok);
        assert_eq!(Attempt::of_status(503), Attempt::Transient);
        assert_eq!(Attempt::of_status(429), Attempt::Transient);
        assert_eq!(Attempt::of_status(422), Attempt::Permanent);
    }

    /// Goal: a seed replays the same plan.
    #[test]
    fn a_seed_replays_the_plan() {
        let run = |seed| {
            let mut p = plan(seed, 30);
            (0..50)
                .map(|i| {
                    format!(
                        "{:?}{:?}{:?}{}",
                        p.next_order(),
                        p.next_read(),
                        p.poll_milestone(&i.to_string()),
                        p.order_retry(1, Attempt::Ok)
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let reads = {
            let mut p = plan(1, 0);
            (0..200).map(|_| p.next_read().path()).collect::<Vec<_>>()
        };
        assert!(reads.iter().any(|r| r.starts_with("/v1/atp/")));
        assert!(reads.iter().any(|r| r.contains("?customer=")));
    }

    /// Goal: the pacer hands out `rate` ticks per second, evenly, and never bursts more than
    /// the catch-up window after a stall.
    #[test]
    fn pacing_math() {
        let mut p = Pacer::new(10.0);
        assert_eq!(p.next_due(), Some(Duration::ZERO));
        let mut sent = 0;
        // Poll every 10 ms for 10 s: 101 ticks (0 s through 10 s inclusive), at most 1 at a time.
        for ms in (0..=10_000).step_by(10) {
            let d = p.poll(Duration::from_millis(ms));
            assert!(d.send <= 1 && d.late == 0, "{ms}: {d:?}");
            sent += d.send;
        }
        assert_eq!(sent, 101);
        assert_eq!(p.next_due(), Some(Duration::from_millis(10_100)));
        // A 2 s stall: one window's worth (1 tick at 10/s) goes out, the rest is late.
        let d = p.poll(Duration::from_millis(12_000));
        assert_eq!(d, Due { send: 1, late: 19 });
        // A fast rate catches up 100 ms worth.
        let mut fast = Pacer::new(1000.0);
        fast.poll(Duration::ZERO);
        assert_eq!(
            fast.poll(Duration::from_secs(1)),
            Due {
                send: 100,
                late: 900
            }
        );
        // Fractional rates and zero.
        let mut slow = Pacer::new(0.5);
        assert_eq!(slow.poll(Duration::ZERO).send, 1);
        assert_eq!(slow.poll(Duration::from_millis(1_999)).send, 0);
        assert_eq!(slow.poll(Duration::from_millis(2_000)).send, 1);
        let mut off = Pacer::new(0.0);
        assert_eq!(off.poll(Duration::from_secs(100)), Due::default());
        assert_eq!(off.next_due(), None);
    }

    /// Goal: one entry per key, retries do not duplicate, a different answer for the same key
    /// is a mismatch, and orders and milestones do not share a key space.
    #[test]
    fn ledger_bookkeeping() {
        let mut l = Ledger::new(vec!["plant-1".into(), "plant-2".into()], 4);
        assert_eq!(
            l.handle_order(0, "k1", "plant-1-o1", 1, "confirmed"),
            Recorded::New
        );
        assert_eq!(
            l.handle_order(0, "k1", "plant-1-o1", 1, "confirmed"),
            Recorded::Repeat
        );
        assert_eq!(
            l.handle_order(0, "k1", "plant-1-o9", 9, "confirmed"),
            Recorded::Mismatch {
                first_id: "plant-1-o1".into(),
                first_seq: 1
            }
        );
        // Same key at another site is another order.
        assert_eq!(
            l.handle_order(1, "k1", "plant-2-o1", 1, "pending"),
            Recorded::New
        );
        let picked = MilestoneKind::Picked;
        assert_eq!(
            l.handle_milestone(0, "k1", "SH-1", picked, 2),
            Recorded::New
        );
        assert_eq!(
            l.handle_milestone(0, "k1", "SH-1", picked, 2),
            Recorded::Repeat
        );
        assert!(matches!(
            l.handle_milestone(0, "k1", "SH-1", picked, 3),
            Recorded::Mismatch { first_seq: 2, .. }
        ));
        assert_eq!(l.len(), 3);
        assert!(!l.is_full());
        assert_eq!(
            l.handle_milestone(1, "e2", "SH-2", picked, 2),
            Recorded::New
        );
        assert!(l.is_full());
        let j = serde_json::to_value(l.json(&l.entries()[0])).unwrap();
        assert_eq!(
            j,
            json!({"site": "plant-1", "kind": "order", "key": "k1", "id": "plant-1-o1",
                   "seq": 1, "status": "confirmed"})
        );
        let j = serde_json::to_value(l.json(&l.entries()[2])).unwrap();
        assert_eq!(
            j,
            json!({"site": "plant-1", "kind": "milestone", "id": "k1", "shipment": "SH-1",
                   "milestone": "picked", "seq": 2})
        );
    }

    #[test]
    fn histogram_quantiles_are_within_ten_percent() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_secs_f64() * 1e3;
        let p99 = h.quantile(0.99).unwrap().as_secs_f64() * 1e3;
        assert!((50.0..=55.0).contains(&p50), "{p50}");
        assert!((99.0..=109.0).contains(&p99), "{p99}");
        h.record(Duration::from_secs(100_000));
        h.record(Duration::ZERO);
        assert_eq!(h.count(), 102);
    }
}
