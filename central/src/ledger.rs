//! Central's allowance ledger across pools and sites: ledger keys, what an uploaded order
//! consumes, and the top-up and reclaim policy. Pure: no I/O, no clock; the store runs these
//! plans inside the transaction that triggered them and writes their grants and reclaims as
//! master changes in that same transaction.
//!
//! Invariant kept here (and checked by the tests below): a plan never grants more than a pool's
//! `free`, because every grant goes through `CentralPool::top_up`, applied to the pool in turn so
//! that each grant sees what the previous ones took.

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocol::{CentralPool, LinePromise, Order, Pool};
use serde::{Deserialize, Serialize};

/// One pool as central keeps it: ATP is per (SKU, site), credit per customer (shared by every
/// site, each holding its own allowance of it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LedgerKey {
    Atp { sku: String, site: String },
    Credit { customer: String },
}

impl LedgerKey {
    pub fn atp(sku: &str, site: &str) -> LedgerKey {
        LedgerKey::Atp {
            sku: sku.to_string(),
            site: site.to_string(),
        }
    }

    pub fn credit(customer: &str) -> LedgerKey {
        LedgerKey::Credit {
            customer: customer.to_string(),
        }
    }

    /// The central pool a site's `pool` draws on.
    pub fn for_site(site: &str, pool: &Pool) -> LedgerKey {
        match pool {
            Pool::Atp { sku } => LedgerKey::atp(sku, site),
            Pool::Credit { customer } => LedgerKey::credit(customer),
        }
    }

    /// The pool as a site sees it.
    pub fn pool(&self) -> Pool {
        match self {
            LedgerKey::Atp { sku, .. } => Pool::atp(sku),
            LedgerKey::Credit { customer } => Pool::credit(customer),
        }
    }

    /// The site an ATP pool belongs to; `None` for credit pools.
    pub fn site(&self) -> Option<&str> {
        match self {
            LedgerKey::Atp { site, .. } => Some(site),
            LedgerKey::Credit { .. } => None,
        }
    }

    /// Text form for JSON, logs and queries: `atp:SKU@site` or `credit:CUSTOMER`. Ids never
    /// contain `@`, so the form is unambiguous.
    pub fn text(&self) -> String {
        match self {
            LedgerKey::Atp { sku, site } => format!("atp:{sku}@{site}"),
            LedgerKey::Credit { customer } => format!("credit:{customer}"),
        }
    }

    /// Parses `text()`'s form. Ids are not validated here; lookups of invalid ids find nothing.
    pub fn parse(s: &str) -> Option<LedgerKey> {
        if let Some(rest) = s.strip_prefix("atp:") {
            let (sku, site) = rest.rsplit_once('@')?;
            (!sku.is_empty() && !site.is_empty()).then(|| LedgerKey::atp(sku, site))
        } else {
            let customer = s.strip_prefix("credit:")?;
            (!customer.is_empty()).then(|| LedgerKey::credit(customer))
        }
    }
}

/// How much allowance central aims to keep at each site.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Targets {
    /// ATP units per site per SKU.
    pub atp_units: i64,
    /// Fraction of a customer's credit limit (the credit pool's ERP figure) per site.
    pub credit_fraction: f64,
}

impl Targets {
    /// The allowance a site should hold of the pool `key`.
    pub fn target(&self, key: &LedgerKey, pool: &CentralPool) -> i64 {
        match key {
            LedgerKey::Atp { .. } => self.atp_units.max(0),
            LedgerKey::Credit { .. } => {
                // Credit limits are at most ~9.2e14 money units; f64 holds them to well under a
                // unit, and the floor keeps the target on the safe side.
                let t = (pool.erp_available.max(0) as f64 * self.credit_fraction).floor();
                if t.is_finite() && t > 0.0 {
                    t.min(i64::MAX as f64) as i64
                } else {
                    0
                }
            }
        }
    }
}

/// One grant or reclaim the policy decided on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub site: String,
    pub key: LedgerKey,
    pub qty: i64,
}

/// Tops up every site in `sites` to its target of every pool in `ledger` that concerns it (an ATP
/// pool concerns only its own site, a credit pool every site), within what is free, and applies
/// the grants to `ledger`. Pairs in `skip` (an open reclaim: central is asking that site to give
/// back, so it gives it nothing) and customers in `held` (on credit hold: a site never confirms
/// for them, so their credit is not escrowed) are left alone. Deterministic: pools in key order,
/// sites in name order.
pub fn plan_top_ups(
    ledger: &mut BTreeMap<LedgerKey, CentralPool>,
    targets: &Targets,
    sites: &BTreeSet<String>,
    skip: &BTreeSet<(String, LedgerKey)>,
    held: &BTreeSet<String>,
) -> Vec<Move> {
    let mut out = Vec::new();
    for (key, pool) in ledger.iter_mut() {
        let target = targets.target(key, pool);
        if target <= 0 {
            continue;
        }
        let mut grant_to = |site: &str, pool: &mut CentralPool| {
            if skip.contains(&(site.to_string(), key.clone())) {
                return;
            }
            let g = pool.top_up(site, target);
            if g > 0 {
                out.push(Move {
                    site: site.to_string(),
                    key: key.clone(),
                    qty: g,
                });
            }
        };
        match key {
            LedgerKey::Atp { site, .. } => {
                if sites.contains(site) {
                    grant_to(site, pool);
                }
            }
            LedgerKey::Credit { customer } => {
                if held.contains(customer) {
                    continue;
                }
                for site in sites {
                    grant_to(site, pool);
                }
            }
        }
    }
    out
}

/// The reclaims due in `ledger`: every outstanding allowance of a `silent` site, and, where a
/// pool's `free` is negative (the ERP lowered its figure below what is granted), enough from the
/// largest holders to bring it back to zero. What `open` reclaims already ask for counts toward
/// that, and a (site, pool) with an open reclaim is never asked again until it answers.
/// Reclaims are requests: nothing is taken from the ledger until a site returns it.
pub fn plan_reclaims(
    ledger: &BTreeMap<LedgerKey, CentralPool>,
    open: &BTreeMap<(String, LedgerKey), i64>,
    silent: &BTreeSet<String>,
) -> Vec<Move> {
    let mut out = Vec::new();
    for (key, pool) in ledger {
        let is_open = |site: &str| open.contains_key(&(site.to_string(), key.clone()));
        let mut asked: i64 = open
            .iter()
            .filter(|((_, k), _)| k == key)
            .map(|(_, q)| *q)
            .sum();
        let mut asked_sites = BTreeSet::new();
        for (site, have) in &pool.outstanding {
            if *have > 0 && silent.contains(site) && !is_open(site) {
                out.push(Move {
                    site: site.clone(),
                    key: key.clone(),
                    qty: *have,
                });
                asked += have;
                asked_sites.insert(site.clone());
            }
        }
        let mut due = -pool.free() - asked;
        if due <= 0 {
            continue;
        }
        let mut holders: Vec<(&String, &i64)> = pool
            .outstanding
            .iter()
            .filter(|(s, h)| **h > 0 && !is_open(s) && !asked_sites.contains(*s))
            .collect();
        holders.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (site, have) in holders {
            if due <= 0 {
                break;
            }
            let ask = due.min(*have);
            out.push(Move {
                site: site.clone(),
                key: key.clone(),
                qty: ask,
            });
            due -= ask;
        }
    }
    out
}

/// What an order's confirmed lines consumed at `site`: ATP units per SKU and the credit value
/// (quantity times the site's unit price, in money units) of the customer's pool. Pending lines
/// consumed nothing. Errs when the value overflows (no real order gets near).
pub fn order_consumption(site: &str, order: &Order) -> Result<Vec<(LedgerKey, i64)>, String> {
    let mut atp: BTreeMap<&str, i64> = BTreeMap::new();
    let mut value: i64 = 0;
    for line in order
        .lines
        .iter()
        .filter(|l| l.promise == LinePromise::Confirmed)
    {
        let units = atp.entry(line.sku.as_str()).or_insert(0);
        *units = units
            .checked_add(line.qty)
            .ok_or_else(|| format!("quantity of {} overflows", line.sku))?;
        let v = line
            .qty
            .checked_mul(line.unit_price.units())
            .ok_or_else(|| format!("value of the {} line overflows", line.sku))?;
        value = value
            .checked_add(v)
            .ok_or_else(|| "order value overflows".to_string())?;
    }
    let mut out: Vec<(LedgerKey, i64)> = atp
        .into_iter()
        .map(|(sku, q)| (LedgerKey::atp(sku, site), q))
        .collect();
    if value > 0 {
        out.push((LedgerKey::credit(&order.customer_id), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::{Money, OrderLine};
    use proptest::prelude::*;

    fn sites(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn pool(erp: i64) -> CentralPool {
        let mut p = CentralPool::default();
        p.handle_erp_push(erp);
        p
    }

    const TARGETS: Targets = Targets {
        atp_units: 20,
        credit_fraction: 0.2,
    };

    #[test]
    fn keys_round_trip_through_text() {
        for k in [
            LedgerKey::atp("BOLT-M8", "plant-1"),
            LedgerKey::credit("C:1"),
        ] {
            assert_eq!(LedgerKey::parse(&k.text()), Some(k.clone()));
        }
        assert_eq!(LedgerKey::parse("atp:X"), None);
        assert_eq!(LedgerKey::parse("atp:@s"), None);
        assert_eq!(LedgerKey::parse("credit:"), None);
        assert_eq!(LedgerKey::parse("other:x"), None);
        assert_eq!(
            LedgerKey::for_site("plant-2", &Pool::atp("A")),
            LedgerKey::atp("A", "plant-2")
        );
        assert_eq!(
            LedgerKey::for_site("plant-2", &Pool::credit("C")).pool(),
            Pool::credit("C")
        );
    }

    #[test]
    fn atp_pools_are_topped_up_only_for_their_own_site_and_credit_for_every_site() {
        let mut ledger = BTreeMap::from([
            (LedgerKey::atp("A", "plant-1"), pool(100)),
            (LedgerKey::atp("A", "plant-2"), pool(5)),
            (LedgerKey::credit("C1"), pool(1_000)),
            (LedgerKey::credit("C2"), pool(1_000)),
        ]);
        let held = BTreeSet::from(["C2".to_string()]);
        let moves = plan_top_ups(
            &mut ledger,
            &TARGETS,
            &sites(&["plant-1", "plant-2"]),
            &BTreeSet::new(),
            &held,
        );
        let got: Vec<(String, String, i64)> = moves
            .iter()
            .map(|m| (m.site.clone(), m.key.text(), m.qty))
            .collect();
        assert_eq!(
            got,
            vec![
                ("plant-1".into(), "atp:A@plant-1".into(), 20),
                ("plant-2".into(), "atp:A@plant-2".into(), 5),
                ("plant-1".into(), "credit:C1".into(), 200),
                ("plant-2".into(), "credit:C1".into(), 200),
            ]
        );
        assert_eq!(ledger[&LedgerKey::atp("A", "plant-2")].free(), 0);
        // A second run at target grants nothing.
        let again = plan_top_ups(
            &mut ledger,
            &TARGETS,
            &sites(&["plant-1", "plant-2"]),
            &BTreeSet::new(),
            &held,
        );
        assert_eq!(again, vec![]);
    }

    #[test]
    fn an_open_reclaim_blocks_top_ups_of_that_site_and_pool() {
        let mut ledger = BTreeMap::from([(LedgerKey::credit("C1"), pool(1_000))]);
        let skip = BTreeSet::from([("plant-1".to_string(), LedgerKey::credit("C1"))]);
        let moves = plan_top_ups(
            &mut ledger,
            &TARGETS,
            &sites(&["plant-1", "plant-2"]),
            &skip,
            &BTreeSet::new(),
        );
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].site, "plant-2");
    }

    #[test]
    fn reclaims_cover_the_shortfall_once_and_silent_sites_entirely() {
        let mut p = pool(100);
        p.grant("a", 50);
        p.grant("b", 30);
        p.grant("c", 10);
        p.handle_erp_push(40); // free = 40 - 90 = -50
        let key = LedgerKey::atp("A", "x");
        let ledger = BTreeMap::from([(key.clone(), p)]);
        let plan = plan_reclaims(&ledger, &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(
            plan,
            vec![Move {
                site: "a".into(),
                key: key.clone(),
                qty: 50
            }]
        );
        // With a's reclaim of 50 open, nothing more is due.
        let open = BTreeMap::from([(("a".to_string(), key.clone()), 50)]);
        assert_eq!(plan_reclaims(&ledger, &open, &BTreeSet::new()), vec![]);
        // With a's reclaim open for only 20, the other 30 come from the next largest holder.
        let open = BTreeMap::from([(("a".to_string(), key.clone()), 20)]);
        let plan = plan_reclaims(&ledger, &open, &BTreeSet::new());
        assert_eq!(
            plan,
            vec![Move {
                site: "b".into(),
                key: key.clone(),
                qty: 30
            }]
        );
        // A silent site is asked for everything, which counts toward the shortfall.
        let silent = BTreeSet::from(["c".to_string()]);
        let plan = plan_reclaims(&ledger, &BTreeMap::new(), &silent);
        let got: Vec<(&str, i64)> = plan.iter().map(|m| (m.site.as_str(), m.qty)).collect();
        assert_eq!(got, vec![("c", 10), ("a", 40)]);
    }

    #[test]
    fn consumption_sums_confirmed_lines_only() {
        let line = |sku: &str, qty, price, promise| OrderLine {
            sku: sku.into(),
            qty,
            unit_price: Money(price),
            currency: "EUR".into(),
            promise,
        };
        let order = Order {
            order_id: "o1".into(),
            customer_id: "C1".into(),
            status: "partial".into(),
            lines: vec![
                line("A", 2, 1_000, LinePromise::Confirmed),
                line("A", 3, 1_000, LinePromise::Confirmed),
                line("B", 7, 5_000, LinePromise::PendingAllowance),
            ],
            master_rev: 3,
            offline: true,
        };
        assert_eq!(
            order_consumption("plant-1", &order).unwrap(),
            vec![
                (LedgerKey::atp("A", "plant-1"), 5),
                (LedgerKey::credit("C1"), 5_000)
            ]
        );
        let mut huge = order.clone();
        huge.lines[0].unit_price = Money(i64::MAX);
        assert!(order_consumption("plant-1", &huge).is_err());
    }

    #[derive(Clone, Debug)]
    enum Step {
        TopUp(Vec<usize>),
        Consume(usize, i64),
        Push(i64),
        Sell(i64),
    }

    proptest! {
        /// Whatever the sequence of top-ups, consumption, ERP pushes and central sales, a plan
        /// never grants beyond `free`; `free` goes negative only through an ERP push, and the
        /// reclaims then due bring it back to zero when answered (as far as allowance is left).
        #[test]
        fn grants_never_exceed_free(
            erp in 0i64..500,
            steps in proptest::collection::vec(prop_oneof![
                proptest::collection::vec(0usize..4, 0..4).prop_map(Step::TopUp),
                (0usize..4, 1i64..30).prop_map(|(s, q)| Step::Consume(s, q)),
                (0i64..500).prop_map(Step::Push),
                (1i64..50).prop_map(Step::Sell),
            ], 1..100),
        ) {
            let names = ["s0", "s1", "s2", "s3"];
            let key = LedgerKey::credit("C");
            let mut ledger = BTreeMap::from([(key.clone(), pool(erp))]);
            for st in steps {
                let p = ledger.get_mut(&key).unwrap();
                match st {
                    Step::TopUp(idx) => {
                        let before = ledger[&key].free();
                        let set: BTreeSet<String> = idx.iter().map(|i| names[*i].to_string()).collect();
                        let moves = plan_top_ups(&mut ledger, &TARGETS, &set, &BTreeSet::new(), &BTreeSet::new());
                        let granted: i64 = moves.iter().map(|m| m.qty).sum();
                        prop_assert!(granted <= before.max(0), "granted {granted} of {before} free");
                        prop_assert!(moves.iter().all(|m| m.qty > 0));
                        prop_assert_eq!(ledger[&key].free(), before - granted);
                    }
                    Step::Consume(s, q) => {
                        let have = p.outstanding(names[s]);
                        if have >= q { p.handle_consumed(names[s], q).unwrap(); }
                    }
                    Step::Push(v) => {
                        p.handle_erp_push(v);
                        // Answer every reclaim in full: free is back to zero unless what is
                        // already confirmed exceeds the new figure (nothing left to take back).
                        for m in plan_reclaims(&ledger, &BTreeMap::new(), &BTreeSet::new()) {
                            ledger.get_mut(&key).unwrap().handle_returned(&m.site, m.qty);
                        }
                        let p = &ledger[&key];
                        prop_assert!(p.free() >= 0 || p.outstanding.is_empty(), "{p:?}");
                    }
                    Step::Sell(q) => {
                        let before = p.free();
                        if p.sell(q).is_ok() { prop_assert!(q <= before); }
                    }
                }
            }
        }
    }
}
