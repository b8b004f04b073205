//! Order capture decisions: which lines of an order this site may confirm from its allowances,
//! why the others stay pending, and how much more allowance to ask central for. Pure: the store
//! loads the inputs and writes the result in the order's own transaction.

use std::collections::BTreeMap;

use outpost_protocol::{LinePromise, Money, OrderLine, Pool, SitePool};

/// Order status when every line is confirmed.
pub const STATUS_CONFIRMED: &str = "confirmed";
/// Order status when no line is confirmed.
pub const STATUS_PENDING: &str = "pending";
/// Order status when some lines are confirmed and some are pending.
pub const STATUS_PARTIAL: &str = "partial";

/// The outcome of capturing one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// One per line, in line order.
    pub promises: Vec<LinePromise>,
    /// Why each line got its promise, one human sentence per line, in line order.
    pub reasons: Vec<String>,
    /// Every pool the order consumed from, with what remains of it afterwards. Empty when nothing
    /// was confirmed.
    pub consumed: Vec<(Pool, SitePool)>,
    /// `confirmed`, `pending` or `partial`.
    pub status: &'static str,
}

/// Value of `qty` units at `unit_price`, in money units; `None` on overflow.
fn line_value(l: &OrderLine) -> Option<i64> {
    l.qty.checked_mul(l.unit_price.units())
}

/// Decides every line of an order for `customer` from the site's allowances `pools` (a pool
/// missing from the map has nothing left):
/// 1. a customer on hold gets nothing confirmed;
/// 2. each line is a candidate if the site's ATP allowance of its SKU still covers it (lines are
///    taken in order, so two lines of one SKU share the allowance);
/// 3. the candidates' total value must fit the customer's credit allowance, or every candidate
///    becomes pending credit and no ATP is consumed at all.
///
/// Every check runs on copies first; `consumed` is only the result of a decision that stands,
/// so nothing is ever half-applied.
pub fn plan_capture(
    customer: &str,
    on_hold: bool,
    lines: &[OrderLine],
    pools: &BTreeMap<Pool, SitePool>,
) -> Capture {
    let n = lines.len();
    if on_hold {
        let reason = format!("customer {customer} is on credit hold; pending review");
        return Capture {
            promises: vec![LinePromise::PendingHold; n],
            reasons: vec![reason; n],
            consumed: Vec::new(),
            status: STATUS_PENDING,
        };
    }
    let mut work = pools.clone();
    let mut promises = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut value: Option<i64> = Some(0);
    for l in lines {
        let pool = work.entry(Pool::atp(&l.sku)).or_default();
        let before = pool.remaining;
        if pool.try_consume(l.qty) {
            promises.push(LinePromise::Confirmed);
            reasons.push(format!(
                "confirmed from this site's allowance of {} ({} left)",
                l.sku, pool.remaining
            ));
            value = value.and_then(|v| line_value(l).and_then(|x| v.checked_add(x)));
        } else {
            promises.push(LinePromise::PendingAllowance);
            reasons.push(format!(
                "{} requested but this site's allowance of {} has {} left; pending until central \
                 confirms it",
                l.qty,
                l.sku,
                before.max(0)
            ));
        }
    }
    let candidates = promises.iter().filter(|p| p.is_confirmed()).count();
    if candidates > 0 {
        let credit_key = Pool::credit(customer);
        let credit = work.entry(credit_key).or_default();
        let credit_before = credit.remaining;
        // Free lines need no credit; an overflowing total can never fit.
        let fits = match value {
            Some(v) if v <= 0 => true,
            Some(v) => credit.try_consume(v),
            None => false,
        };
        if !fits {
            let shown = value.map_or_else(
                || "more than can be counted".into(),
                |v| Money(v).to_string(),
            );
            let reason = format!(
                "the lines this site could confirm are worth {shown} but its credit allowance \
                 for customer {customer} has {} left; pending credit review",
                Money(credit_before.max(0))
            );
            for (p, r) in promises.iter_mut().zip(reasons.iter_mut()) {
                if p.is_confirmed() {
                    *p = LinePromise::PendingCredit;
                    *r = reason.clone();
                }
            }
            // The ATP taken on the copies is simply not kept.
            work = pools.clone();
        }
    }
    let confirmed = promises.iter().filter(|p| p.is_confirmed()).count();
    let consumed = if confirmed == 0 {
        Vec::new()
    } else {
        work.into_iter()
            .filter(|(pool, after)| pools.get(pool).copied().unwrap_or_default() != *after)
            .collect()
    };
    let status = match confirmed {
        0 => STATUS_PENDING,
        c if c == n => STATUS_CONFIRMED,
        _ => STATUS_PARTIAL,
    };
    Capture {
        promises,
        reasons,
        consumed,
        status,
    }
}

/// How much more of each pool the site would need to confirm every line of the order: the ATP
/// shortfall per SKU (all lines of a SKU together) and the credit shortfall for the whole order's
/// value. Empty for a customer on hold (nothing would be confirmed anyway).
pub fn shortfalls(
    customer: &str,
    on_hold: bool,
    lines: &[OrderLine],
    pools: &BTreeMap<Pool, SitePool>,
) -> Vec<(Pool, i64)> {
    if on_hold {
        return Vec::new();
    }
    let have = |p: &Pool| pools.get(p).map_or(0, |s| s.remaining.max(0));
    let mut demand: BTreeMap<&str, i64> = BTreeMap::new();
    let mut value: i64 = 0;
    for l in lines {
        let d = demand.entry(l.sku.as_str()).or_insert(0);
        *d = d.saturating_add(l.qty);
        value = value.saturating_add(line_value(l).unwrap_or(i64::MAX));
    }
    let mut out: Vec<(Pool, i64)> = demand
        .into_iter()
        .filter_map(|(sku, want)| {
            let pool = Pool::atp(sku);
            let short = want - have(&pool);
            (short > 0).then_some((pool, short))
        })
        .collect();
    let credit = Pool::credit(customer);
    let short = value - have(&credit);
    if short > 0 {
        out.push((credit, short));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sku: &str, qty: i64, price: &str) -> OrderLine {
        OrderLine {
            sku: sku.into(),
            qty,
            unit_price: Money::parse(price).unwrap(),
            currency: "EUR".into(),
            promise: LinePromise::PendingAllowance,
        }
    }

    fn pools(items: &[(Pool, i64)]) -> BTreeMap<Pool, SitePool> {
        items
            .iter()
            .map(|(p, r)| (p.clone(), SitePool { remaining: *r }))
            .collect()
    }

    fn remaining(c: &Capture, p: &Pool) -> Option<i64> {
        c.consumed
            .iter()
            .find(|(q, _)| q == p)
            .map(|(_, s)| s.remaining)
    }

    /// Goal: with an allowance of A, lines are confirmed in order exactly while they fit and the
    /// rest are pending allowance, each with a reason naming the SKU.
    #[test]
    fn confirms_exactly_up_to_the_allowance() {
        let p = pools(&[(Pool::atp("G"), 10), (Pool::credit("C"), 1_000_000_000)]);
        let lines = [
            line("G", 4, "1"),
            line("G", 6, "1"),
            line("G", 1, "1"),
            line("H", 1, "1"),
        ];
        let c = plan_capture("C", false, &lines, &p);
        use LinePromise::*;
        assert_eq!(
            c.promises,
            [Confirmed, Confirmed, PendingAllowance, PendingAllowance]
        );
        assert_eq!(c.status, STATUS_PARTIAL);
        assert_eq!(remaining(&c, &Pool::atp("G")), Some(0));
        assert_eq!(
            remaining(&c, &Pool::credit("C")),
            Some(1_000_000_000 - 100_000)
        );
        assert!(
            c.reasons[2].contains("allowance of G has 0 left"),
            "{}",
            c.reasons[2]
        );
        assert!(
            c.reasons[3].contains("allowance of H has 0 left"),
            "{}",
            c.reasons[3]
        );
        assert!(c.reasons[0].starts_with("confirmed"));
    }

    /// Goal: the credit allowance bounds the value confirmed; when the candidates do not fit,
    /// none of them is confirmed and no ATP is consumed.
    #[test]
    fn credit_bounds_the_confirmed_value_and_undoes_atp() {
        // 3 × 10.00 = 30.00 against 29.99 of credit.
        let p = pools(&[(Pool::atp("G"), 10), (Pool::credit("C"), 299_900)]);
        let c = plan_capture("C", false, &[line("G", 3, "10"), line("G", 20, "10")], &p);
        assert_eq!(
            c.promises,
            [LinePromise::PendingCredit, LinePromise::PendingAllowance]
        );
        assert_eq!(c.status, STATUS_PENDING);
        assert!(
            c.consumed.is_empty(),
            "nothing half-applied: {:?}",
            c.consumed
        );
        assert!(c.reasons[0].contains("worth 30.00") && c.reasons[0].contains("29.99 left"));
        // Exactly enough credit confirms.
        let p = pools(&[(Pool::atp("G"), 10), (Pool::credit("C"), 300_000)]);
        let c = plan_capture("C", false, &[line("G", 3, "10")], &p);
        assert_eq!(c.status, STATUS_CONFIRMED);
        assert_eq!(remaining(&c, &Pool::credit("C")), Some(0));
        assert_eq!(remaining(&c, &Pool::atp("G")), Some(7));
        // No credit allowance at all: pending credit.
        let p = pools(&[(Pool::atp("G"), 10)]);
        let c = plan_capture("C", false, &[line("G", 1, "0.01")], &p);
        assert_eq!(c.promises, [LinePromise::PendingCredit]);
    }

    #[test]
    fn on_hold_is_pending_hold_and_consumes_nothing() {
        let p = pools(&[(Pool::atp("G"), 10), (Pool::credit("C"), 1_000_000)]);
        let c = plan_capture("C", true, &[line("G", 1, "1"), line("H", 2, "1")], &p);
        assert_eq!(c.promises, [LinePromise::PendingHold; 2]);
        assert_eq!(c.status, STATUS_PENDING);
        assert!(c.consumed.is_empty());
        assert!(c.reasons[0].contains("credit hold"));
        assert!(shortfalls("C", true, &[line("G", 99, "1")], &p).is_empty());
    }

    /// Goal: overflowing values never confirm and never panic.
    #[test]
    fn huge_values_do_not_overflow() {
        let p = pools(&[(Pool::atp("G"), i64::MAX), (Pool::credit("C"), i64::MAX)]);
        let big = line("G", 1_000_000_000, "922337203685477");
        let c = plan_capture("C", false, &[big.clone(), big.clone()], &p);
        assert_eq!(c.status, STATUS_PENDING);
        assert!(c.consumed.is_empty());
        let s = shortfalls("C", false, &[big.clone(), big], &p);
        assert!(s.iter().all(|(_, q)| *q > 0));
    }

    #[test]
    fn shortfalls_sum_lines_per_sku_and_the_order_value() {
        // 9 units at 1.00 = 9.00 (90,000 money units) against 5.00 of credit.
        let p = pools(&[(Pool::atp("G"), 5), (Pool::credit("C"), 50_000)]);
        let lines = [line("G", 4, "1"), line("G", 3, "1"), line("H", 2, "1")];
        assert_eq!(
            shortfalls("C", false, &lines, &p),
            vec![
                (Pool::atp("G"), 2),
                (Pool::atp("H"), 2),
                (Pool::credit("C"), 40_000)
            ]
        );
        // Enough of everything: nothing to ask for.
        let p = pools(&[(Pool::atp("G"), 7), (Pool::credit("C"), 70_000)]);
        assert!(shortfalls("C", false, &[line("G", 7, "1")], &p).is_empty());
    }
}
