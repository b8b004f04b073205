//! Allowance accounting (escrow, bounded counters): how much of a pool (a SKU's ATP at a site, or
//! a customer's credit) central may still grant, sell or must reclaim, and how much a site may
//! still confirm on its own. Pure state machines: no I/O, no clock. Central and the agent persist
//! these values in their stores and drive them through the same transitions.
//!
//! Central's view of one pool:
//! ```text
//! free = erp_available - in_transit - accepted_since_push - Σ outstanding[site]
//! ```
//! * `erp_available`: the ERP's last figure for the pool (ATP units, or the credit limit in money
//!   units), net of every order the ERP had accepted when it pushed it.
//! * `in_transit`: units confirmed through Outpost (consumed at a site and uploaded, or sold by
//!   central's own channel) that the ERP has not yet accepted or rejected.
//! * `accepted_since_push`: units the ERP accepted after its last push; its next push is net of
//!   them, so they are forgotten then.
//! * `outstanding[site]`: granted to the site and neither consumed (as far as central has heard)
//!   nor returned. Central's view lags the site's, always on the safe side: a site consumes only
//!   from what it holds, so the site's real remaining is never above central's `outstanding`.
//!
//! Invariant, kept by refusing grants and central sales beyond `free`: everything confirmed
//! through Outpost since the ERP's last push fits in the ERP's figure. When the ERP lowers its
//! figure below what is already granted, `free` goes negative: central grants and sells nothing
//! more and asks sites to return unused allowance (a reclaim is a request the site answers with
//! what it still has, never a unilateral decrement).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What an allowance is of.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Pool {
    /// ATP units of a SKU at the site that holds the allowance.
    Atp { sku: String },
    /// Credit of a customer, in `Money` units (1/10,000 of the currency unit).
    Credit { customer: String },
}

impl Pool {
    pub fn atp(sku: &str) -> Pool {
        Pool::Atp {
            sku: sku.to_string(),
        }
    }

    pub fn credit(customer: &str) -> Pool {
        Pool::Credit {
            customer: customer.to_string(),
        }
    }

    /// A stable text form for keys, logs and JSON: `atp:SKU` or `credit:CUSTOMER`.
    pub fn key(&self) -> String {
        match self {
            Pool::Atp { sku } => format!("atp:{sku}"),
            Pool::Credit { customer } => format!("credit:{customer}"),
        }
    }
}

/// A broken accounting rule: the event is still recorded (it happened at the site) and becomes a
/// business exception for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscrowError {
    #[error("site {site} consumed {consumed} but central knows of only {outstanding} outstanding")]
    Overrun {
        site: String,
        consumed: i64,
        outstanding: i64,
    },
    #[error("only {free} available, {wanted} asked")]
    Insufficient { free: i64, wanted: i64 },
    #[error("quantities must be positive, got {0}")]
    NonPositive(i64),
}

/// Central's accounting of one pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CentralPool {
    pub erp_available: i64,
    pub in_transit: i64,
    pub accepted_since_push: i64,
    pub outstanding: BTreeMap<String, i64>,
}

impl CentralPool {
    /// What central may still grant or sell. Negative when the ERP lowered its figure below what
    /// is already granted: then reclaims are due.
    pub fn free(&self) -> i64 {
        self.erp_available
            - self.in_transit
            - self.accepted_since_push
            - self.outstanding.values().sum::<i64>()
    }

    pub fn outstanding(&self, site: &str) -> i64 {
        self.outstanding.get(site).copied().unwrap_or(0)
    }

    /// The ERP pushed a new figure, net of everything it accepted before.
    pub fn handle_erp_push(&mut self, available: i64) {
        self.erp_available = available;
        self.accepted_since_push = 0;
    }

    /// Grants up to `wanted` to `site`; returns what was granted (possibly 0).
    pub fn grant(&mut self, site: &str, wanted: i64) -> i64 {
        let g = wanted.min(self.free()).max(0);
        if g > 0 {
            *self.outstanding.entry(site.to_string()).or_insert(0) += g;
        }
        g
    }

    /// Tops `site` up to `target` outstanding, within what is free; returns the grant.
    pub fn top_up(&mut self, site: &str, target: i64) -> i64 {
        let have = self.outstanding(site);
        if have >= target {
            return 0;
        }
        self.grant(site, target - have)
    }

    /// A confirmed order line from `site` arrived. It is counted whatever happens (the site has
    /// promised it); an overrun means the site confirmed more than central ever granted it.
    pub fn handle_consumed(&mut self, site: &str, qty: i64) -> Result<(), EscrowError> {
        if qty <= 0 {
            return Err(EscrowError::NonPositive(qty));
        }
        let have = self.outstanding(site);
        self.in_transit += qty;
        let left = have - qty;
        if left > 0 {
            self.outstanding.insert(site.to_string(), left);
        } else {
            self.outstanding.remove(site);
        }
        if qty > have {
            return Err(EscrowError::Overrun {
                site: site.to_string(),
                consumed: qty,
                outstanding: have,
            });
        }
        Ok(())
    }

    /// `site` returned `qty` of unused allowance (its answer to a reclaim).
    pub fn handle_returned(&mut self, site: &str, qty: i64) {
        let left = (self.outstanding(site) - qty.max(0)).max(0);
        if left > 0 {
            self.outstanding.insert(site.to_string(), left);
        } else {
            self.outstanding.remove(site);
        }
    }

    /// Central's own sales channel: all or nothing, from what is free.
    pub fn sell(&mut self, qty: i64) -> Result<(), EscrowError> {
        if qty <= 0 {
            return Err(EscrowError::NonPositive(qty));
        }
        let free = self.free();
        if qty > free {
            return Err(EscrowError::Insufficient { free, wanted: qty });
        }
        self.in_transit += qty;
        Ok(())
    }

    /// The ERP decided on confirmed units: accepted (now in its books) or rejected (free again).
    pub fn handle_erp_decision(&mut self, qty: i64, accepted: bool) {
        let q = qty.clamp(0, self.in_transit);
        self.in_transit -= q;
        if accepted {
            self.accepted_since_push += q;
        }
    }

    /// How much to ask each site to return so that `free` is no longer negative, largest holders
    /// first. Empty when nothing is due.
    pub fn reclaims_due(&self) -> Vec<(String, i64)> {
        let mut due = -self.free();
        let mut out = Vec::new();
        if due <= 0 {
            return out;
        }
        let mut holders: Vec<(&String, &i64)> = self.outstanding.iter().collect();
        holders.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (site, have) in holders {
            if due <= 0 {
                break;
            }
            let ask = due.min(*have);
            if ask > 0 {
                out.push((site.clone(), ask));
                due -= ask;
            }
        }
        out
    }
}

/// A site's accounting of one pool: what it may still confirm on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitePool {
    pub remaining: i64,
}

impl SitePool {
    pub fn handle_grant(&mut self, qty: i64) {
        self.remaining += qty.max(0);
    }

    /// Consumes `qty` if it fits; returns whether it did.
    pub fn try_consume(&mut self, qty: i64) -> bool {
        if qty > 0 && qty <= self.remaining {
            self.remaining -= qty;
            true
        } else {
            false
        }
    }

    /// Answers a reclaim of `asked`: returns (and gives up) what is still unused, at most `asked`.
    /// Nothing is returned while the pool is negative (units it owes after a restore of central).
    pub fn handle_reclaim(&mut self, asked: i64) -> i64 {
        let r = asked.clamp(0, self.remaining.max(0));
        self.remaining -= r;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grants_stop_at_free_and_sales_compete() {
        let mut p = CentralPool::default();
        p.handle_erp_push(100);
        assert_eq!(p.top_up("a", 40), 40);
        assert_eq!(p.top_up("b", 40), 40);
        assert_eq!(p.free(), 20);
        assert!(p.sell(25).is_err(), "central may not sell what is escrowed");
        p.sell(20).unwrap();
        assert_eq!(p.top_up("c", 40), 0);
        p.handle_consumed("a", 10).unwrap();
        assert_eq!(p.outstanding("a"), 30);
        assert_eq!(p.free(), 0);
    }

    #[test]
    fn lowering_atp_asks_for_returns_and_never_decrements_by_itself() {
        let mut p = CentralPool::default();
        p.handle_erp_push(100);
        p.grant("a", 60);
        p.grant("b", 30);
        p.handle_erp_push(50);
        assert_eq!(p.free(), -40);
        assert_eq!(p.reclaims_due(), vec![("a".to_string(), 40)]);
        assert_eq!(
            p.outstanding("a"),
            60,
            "a reclaim is a request, not a decrement"
        );
        p.handle_returned("a", 25);
        assert_eq!(p.free(), -15);
        assert_eq!(p.grant("c", 5), 0);
    }

    #[test]
    fn an_overrun_is_reported_and_still_counted() {
        let mut p = CentralPool::default();
        p.handle_erp_push(10);
        p.grant("a", 5);
        assert!(matches!(
            p.handle_consumed("a", 7),
            Err(EscrowError::Overrun { .. })
        ));
        assert_eq!(p.in_transit, 7);
        assert_eq!(p.outstanding("a"), 0);
    }

    #[test]
    fn erp_decisions_move_units_out_of_transit() {
        let mut p = CentralPool::default();
        p.handle_erp_push(10);
        p.sell(4).unwrap();
        p.handle_erp_decision(4, true);
        assert_eq!((p.in_transit, p.accepted_since_push, p.free()), (0, 4, 6));
        p.handle_erp_push(6); // the ERP now counts the 4 itself
        assert_eq!(p.free(), 6);
        p.sell(3).unwrap();
        p.handle_erp_decision(3, false);
        assert_eq!(p.free(), 6, "a rejected sale frees its units");
    }

    /// Goal: a site pool that owes units (negative after a restore of central) returns nothing
    /// to a reclaim, confirms nothing, and is repaid by grants first.
    #[test]
    fn a_pool_that_owes_units_returns_and_confirms_nothing() {
        let mut s = SitePool { remaining: -3 };
        assert_eq!(s.handle_reclaim(5), 0);
        assert_eq!(s.remaining, -3);
        assert!(!s.try_consume(1));
        s.handle_grant(4);
        assert_eq!(s.remaining, 1);
        assert_eq!(s.handle_reclaim(5), 1);
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// Site `s` takes an order of `q` units from its own allowance.
        SiteOrder(usize, i64),
        /// Site `s` uploads what it consumed so far (its link is up).
        Upload(usize),
        /// Central tops site `s` up to `t`, if the link is up.
        TopUp(usize, i64),
        /// Central's own channel sells `q`.
        CentralSale(i64),
        /// Central asks for reclaims and reachable sites answer.
        Reclaim,
        /// Site `s`'s link goes down or up.
        Toggle(usize),
        /// The ERP lowers its figure by `q` (stock written off), so reclaims fall due.
        ErpLower(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..3, 1i64..15).prop_map(|(s, q)| Step::SiteOrder(s, q)),
            (0usize..3).prop_map(Step::Upload),
            (0usize..3, 0i64..40).prop_map(|(s, t)| Step::TopUp(s, t)),
            (1i64..20).prop_map(Step::CentralSale),
            Just(Step::Reclaim),
            (0usize..3).prop_map(Step::Toggle),
            (1i64..30).prop_map(Step::ErpLower),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Simulation of three sites and central's channel against one pool whose ATP the ERP
        /// only lowers, links going up and down: whatever the order of events, the units
        /// confirmed anywhere never exceed the first ATP, no upload ever overruns, a site refuses only an order that does not
        /// fit, and every unit is accounted for, from both sides: each unit granted to a site is
        /// confirmed there, returned or still held, and central's outstanding for the site is
        /// exactly what it holds plus what it has not yet reported.
        #[test]
        fn confirmed_never_exceeds_atp(atp in 0i64..200, steps in proptest::collection::vec(step(), 1..400)) {
            let sites = ["a", "b", "c"];
            let mut central = CentralPool::default();
            central.handle_erp_push(atp);
            let mut erp = atp;
            let mut local = [SitePool::default(); 3];
            let mut unuploaded = [0i64; 3];
            let mut returned_unuploaded = [0i64; 3];
            let mut up = [true; 3];
            let mut granted = [0i64; 3];
            let mut site_confirmed = [0i64; 3];
            let mut returned = [0i64; 3];
            let mut confirmed = 0i64;
            let mut ordered_at_sites = 0i64;
            let mut pending = 0i64;
            for st in steps {
                match st {
                    Step::SiteOrder(s, q) => {
                        ordered_at_sites += q;
                        let held = local[s].remaining;
                        if local[s].try_consume(q) {
                            confirmed += q;
                            site_confirmed[s] += q;
                            unuploaded[s] += q;
                        } else {
                            prop_assert!(q > held, "site {s} refused {q} units while holding {held}");
                            pending += q;
                        }
                    }
                    Step::Upload(s) => if up[s] {
                        if unuploaded[s] > 0 {
                            prop_assert!(central.handle_consumed(sites[s], unuploaded[s]).is_ok());
                            unuploaded[s] = 0;
                        }
                        central.handle_returned(sites[s], returned_unuploaded[s]);
                        returned_unuploaded[s] = 0;
                    },
                    // Central's view is stale while consumption is not uploaded: still safe.
                    Step::TopUp(s, t) => if up[s] {
                        let g = central.top_up(sites[s], t);
                        granted[s] += g;
                        local[s].handle_grant(g);
                    },
                    Step::CentralSale(q) => if central.sell(q).is_ok() {
                        confirmed += q;
                    },
                    Step::Reclaim => {
                        for (site, ask) in central.reclaims_due() {
                            let s = sites.iter().position(|x| *x == site).expect("known site");
                            if up[s] {
                                let r = local[s].handle_reclaim(ask);
                                prop_assert!((0..=ask).contains(&r), "returned {r} of {ask} asked");
                                returned[s] += r;
                                returned_unuploaded[s] += r;
                            }
                        }
                    }
                    Step::Toggle(s) => up[s] = !up[s],
                    Step::ErpLower(q) => {
                        erp = (erp - q).max(0);
                        central.handle_erp_push(erp);
                    }
                }
                prop_assert!(confirmed <= atp, "oversold: {confirmed} > {atp}");
                for s in 0..3 {
                    // The site never holds more than central believes it holds.
                    prop_assert!(local[s].remaining <= central.outstanding(sites[s]));
                    // Every unit granted is accounted for at the site...
                    prop_assert_eq!(
                        granted[s],
                        site_confirmed[s] + returned[s] + local[s].remaining,
                        "site {}: granted = confirmed + returned + held", s
                    );
                    // ...and central's outstanding is the same units seen from its side.
                    prop_assert_eq!(
                        central.outstanding(sites[s]),
                        local[s].remaining + unuploaded[s] + returned_unuploaded[s],
                        "site {}: outstanding = held + consumed and returned not yet reported", s
                    );
                }
                // In transit at central: every confirmed unit central has heard of.
                prop_assert_eq!(central.in_transit, confirmed - unuploaded.iter().sum::<i64>());
            }
            // Every order a site took is either confirmed there or pending.
            prop_assert_eq!(ordered_at_sites, site_confirmed.iter().sum::<i64>() + pending);
        }
    }
}
