//! The checker, in the style of Jepsen's "set" workload: every request the clients sent is
//! ok, failed or unknown; at the end, central's contents must match exactly.

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocol::{EventBody, LinePromise};

use super::world::{Kind, Outcome, Promised};

/// The figures of one checked run; any non-zero count below `ok_requests` is a violation.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub ok_requests: u64,
    pub failed_requests: u64,
    pub unknown_resolved: u64,
    pub at_central: u64,
    /// ok requests missing at central.
    pub lost: u64,
    /// Requests (or ids) present at central more than once.
    pub duplicated: u64,
    /// Orders or milestones at central that no client asked for.
    pub unrequested: u64,
    /// Idempotency keys or milestone ids that got two different answers (applied twice, or
    /// lost and taken again).
    pub key_reapplied: u64,
    /// Units confirmed beyond the ATP the ERP published, summed over (SKU, site), plus credit
    /// confirmed beyond a customer's limit (in whole currency units).
    pub oversold: i64,
    /// Orders whose promises at central differ from what the site answered.
    pub promise_mismatch: u64,
    /// (site, pool) accounts where granted != confirmed + returned + held, in units.
    pub unconserved: i64,
    /// Pools whose accounts were checked (0 when central was restored from a backup).
    pub pools_checked: u64,
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unrequested == 0
            && self.key_reapplied == 0
            && self.oversold == 0
            && self.promise_mismatch == 0
            && self.unconserved == 0
            && self.problems.is_empty()
    }

    pub fn add(&mut self, o: &Verdict) {
        self.ok_requests += o.ok_requests;
        self.failed_requests += o.failed_requests;
        self.unknown_resolved += o.unknown_resolved;
        self.at_central += o.at_central;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.unrequested += o.unrequested;
        self.key_reapplied += o.key_reapplied;
        self.oversold += o.oversold;
        self.promise_mismatch += o.promise_mismatch;
        self.unconserved += o.unconserved;
        self.pools_checked += o.pools_checked;
    }
}

const MAX_LISTED: usize = 12;

pub fn check(out: &Outcome) -> Verdict {
    let mut v = Verdict {
        problems: out.problems.iter().take(MAX_LISTED).cloned().collect(),
        ..Verdict::default()
    };
    let note = |v: &mut Verdict, p: String| {
        if v.problems.len() < MAX_LISTED {
            v.problems.push(p);
        }
    };
    if out.dead_letters > 0 {
        note(
            &mut v,
            format!("{} events dead-lettered at central", out.dead_letters),
        );
    }

    // What central holds, counted by (site, id).
    let mut held: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut orders_at_central: BTreeMap<(String, String), Promised> = BTreeMap::new();
    for (site, body) in &out.at_central {
        let id = match body {
            EventBody::Order(o) => {
                orders_at_central.insert(
                    (site.clone(), o.order_id.clone()),
                    o.lines
                        .iter()
                        .map(|l| {
                            (
                                l.sku.clone(),
                                l.qty,
                                matches!(l.promise, LinePromise::Confirmed),
                            )
                        })
                        .collect(),
                );
                o.order_id.clone()
            }
            EventBody::Milestone(m) => m.shipment_id.clone(),
            // Answers to reclaims, not client requests: checked by the pool accounts below.
            EventBody::AllowanceReturn(_) => {
                continue;
            }
        };
        v.at_central += 1;
        *held.entry((site.clone(), id)).or_insert(0) += 1;
    }
    for ((site, id), n) in &held {
        if *n > 1 {
            v.duplicated += u64::from(*n - 1);
            note(
                &mut v,
                format!("{id} is at central {n} times (from {site})"),
            );
        }
    }

    // Every ok request exactly once; every id at central asked for.
    let mut asked: BTreeSet<(String, String)> = BTreeSet::new();
    for r in &out.requests {
        let site = out.site_names[r.site].clone();
        if r.acks.is_empty() {
            v.failed_requests += 1;
            continue;
        }
        v.ok_requests += 1;
        if r.unknown > 0 {
            v.unknown_resolved += 1;
        }
        let first = &r.acks[0];
        if r.acks.iter().any(|a| a != first) {
            v.key_reapplied += 1;
            note(
                &mut v,
                format!(
                    "{} at {site} was answered with different results: {:?}",
                    r.kind.id(),
                    r.acks
                ),
            );
        }
        // The id central files it under: the order id, or the milestone's shipment.
        let central_id = match &r.kind {
            Kind::Order { .. } => first.clone(),
            Kind::Milestone(m) => m.shipment_id.clone(),
        };
        let key = (site.clone(), central_id.clone());
        if held.get(&key).copied().unwrap_or(0) == 0 {
            v.lost += 1;
            note(
                &mut v,
                format!(
                    "{} acknowledged by {site} as {first} is not at central",
                    r.kind.id()
                ),
            );
        }
        if let (Kind::Order { .. }, Some(promised)) = (&r.kind, &r.promised)
            && let Some(there) = orders_at_central.get(&key)
            && there != promised
        {
            v.promise_mismatch += 1;
            note(
                &mut v,
                format!("{central_id}: site answered {promised:?}, central holds {there:?}"),
            );
        }
        asked.insert(key);
    }
    for key in held.keys() {
        if !asked.contains(key) {
            v.unrequested += 1;
            note(
                &mut v,
                format!("{} at central was never acknowledged to a client", key.1),
            );
        }
    }

    // Nothing promised beyond the ERP's figures.
    let mut units: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut value: BTreeMap<String, i64> = BTreeMap::new();
    for (site, body) in &out.at_central {
        if let EventBody::Order(o) = body {
            // The ERP rejected it: its units went back to central's pool and may be sold again.
            if out.rejected.contains(&(site.clone(), o.order_id.clone())) {
                continue;
            }
            for l in &o.lines {
                if matches!(l.promise, LinePromise::Confirmed) {
                    *units.entry((l.sku.clone(), site.clone())).or_insert(0) += l.qty;
                    *value.entry(o.customer_id.clone()).or_insert(0) +=
                        l.qty * out.prices.get(&l.sku).copied().unwrap_or(0);
                }
            }
        }
    }
    for (k, sold) in &units {
        let limit = out.atp.get(k).copied().unwrap_or(0);
        if *sold > limit {
            v.oversold += sold - limit;
            note(
                &mut v,
                format!("{} at {}: {sold} confirmed > ATP {limit}", k.0, k.1),
            );
        }
    }
    for (customer, used) in &value {
        let limit = out.credit.get(customer).copied().unwrap_or(0);
        if *used > limit {
            v.oversold += (used - limit) / 10_000;
            note(
                &mut v,
                format!("{customer}: confirmed value {used} > credit limit {limit} (units)"),
            );
        }
    }

    // Every unit a site was granted is confirmed in an order, returned, or still held.
    if let Some(accounts) = &out.conservation {
        for a in accounts {
            v.pools_checked += 1;
            let accounted = a.confirmed + a.returned + a.held;
            if a.central_outstanding.is_some_and(|c| c != a.held) {
                v.unconserved += (a.central_outstanding.unwrap_or(0) - a.held).abs();
                note(
                    &mut v,
                    format!(
                        "{} {}: the site holds {}, central's ledger says {:?}",
                        a.site, a.pool, a.held, a.central_outstanding
                    ),
                );
            }
            if a.granted != accounted {
                v.unconserved += (a.granted - accounted).abs();
                note(
                    &mut v,
                    format!(
                        "{} {}: granted {} != confirmed {} + returned {} + held {}",
                        a.site, a.pool, a.granted, a.confirmed, a.returned, a.held
                    ),
                );
            }
        }
    }
    v
}
