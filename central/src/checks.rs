//! Business checks of an uploaded order against central's current master data: the reasons an
//! order goes to the exception queue instead of the feed, and the prices the site used next to
//! central's; and the check of a master-data batch from the ERP. Pure: the store looks the
//! master data up and passes it in.

use std::collections::BTreeMap;

use outpost_protocol::{
    CustomerRecord, LinePromise, MasterChange, Money, Order, PriceRecord, ValidationError,
};
use serde::{Deserialize, Serialize};

/// Why an order is a business exception. Several may hold; the first in this order is the
/// primary one (`Reason::ORDER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    /// A line's SKU has no price at central (neither for the customer nor a list price).
    UnknownSku,
    /// Central has no such customer.
    UnknownCustomer,
    /// The customer is on credit hold at central and the site confirmed a line.
    CreditHold,
    /// A line's unit price (or currency) differs from central's current price.
    PriceChanged,
    /// The site confirmed more than central had granted it.
    AllowanceOverrun,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownSku => "unknown_sku",
            Reason::UnknownCustomer => "unknown_customer",
            Reason::CreditHold => "credit_hold",
            Reason::PriceChanged => "price_changed",
            Reason::AllowanceOverrun => "allowance_overrun",
        }
    }
}

/// One line's price as the site used it and as central has it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinePrices {
    pub sku: String,
    pub site_unit_price: Money,
    pub site_currency: String,
    /// `None` when central has no price for the SKU.
    pub central_unit_price: Option<Money>,
    pub central_currency: Option<String>,
}

/// The outcome of the master-data checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Sorted, without duplicates; empty when the order passes.
    pub reasons: Vec<Reason>,
    pub lines: Vec<LinePrices>,
}

/// Checks a batch from the ERP: only prices, ATP and customers, each valid. Every invalid item
/// is reported (index, reason); the batch is written only if there is none.
pub fn validate_erp_changes(changes: &[MasterChange]) -> Result<(), Vec<(usize, ValidationError)>> {
    let invalid: Vec<_> = changes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            MasterChange::Price(_) | MasterChange::Atp(_) | MasterChange::Customer(_) => {
                c.validate().err().map(|e| (i, e))
            }
            // Grants, reclaims and order statuses are central's own changes, written only in the
            // transaction that moves the ledger or the order they are about.
            _ => Some((
                i,
                ValidationError::OutOfRange {
                    field: "change",
                    detail: "only prices, ATP and customers come from the ERP".into(),
                },
            )),
        })
        .collect();
    if invalid.is_empty() {
        Ok(())
    } else {
        Err(invalid)
    }
}

/// Checks `order` against central's effective price per SKU for the order's customer (the
/// customer's own price, else the list price; `None` if neither) and central's customer record.
pub fn check_order(
    order: &Order,
    prices: &BTreeMap<String, Option<PriceRecord>>,
    customer: Option<&CustomerRecord>,
) -> Checked {
    let mut reasons = Vec::new();
    let mut lines = Vec::with_capacity(order.lines.len());
    for l in &order.lines {
        let central = prices.get(&l.sku).and_then(Option::as_ref);
        match central {
            None => reasons.push(Reason::UnknownSku),
            Some(p) if p.unit_price != l.unit_price || p.currency != l.currency => {
                reasons.push(Reason::PriceChanged)
            }
            Some(_) => {}
        }
        lines.push(LinePrices {
            sku: l.sku.clone(),
            site_unit_price: l.unit_price,
            site_currency: l.currency.clone(),
            central_unit_price: central.map(|p| p.unit_price),
            central_currency: central.map(|p| p.currency.clone()),
        });
    }
    let any_confirmed = order
        .lines
        .iter()
        .any(|l| l.promise == LinePromise::Confirmed);
    match customer {
        None => reasons.push(Reason::UnknownCustomer),
        Some(c) if c.on_hold && any_confirmed => reasons.push(Reason::CreditHold),
        Some(_) => {}
    }
    reasons.sort();
    reasons.dedup();
    Checked { reasons, lines }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::OrderLine;

    fn order(lines: Vec<(&str, i64, LinePromise)>) -> Order {
        Order {
            order_id: "plant-1-o1".into(),
            customer_id: "C1".into(),
            status: "confirmed".into(),
            lines: lines
                .into_iter()
                .map(|(sku, price, promise)| OrderLine {
                    sku: sku.into(),
                    qty: 1,
                    unit_price: Money(price),
                    currency: "EUR".into(),
                    promise,
                })
                .collect(),
            master_rev: 7,
            offline: true,
        }
    }

    fn price(sku: &str, units: i64) -> (String, Option<PriceRecord>) {
        (
            sku.to_string(),
            Some(PriceRecord {
                sku: sku.into(),
                customer: None,
                unit_price: Money(units),
                currency: "EUR".into(),
            }),
        )
    }

    fn customer(on_hold: bool) -> CustomerRecord {
        CustomerRecord {
            id: "C1".into(),
            name: "Acme".into(),
            credit_limit: Money(1_000_000),
            on_hold,
        }
    }

    #[test]
    fn a_matching_order_passes() {
        let prices = BTreeMap::from([price("A", 1200)]);
        let c = customer(false);
        let got = check_order(
            &order(vec![("A", 1200, LinePromise::Confirmed)]),
            &prices,
            Some(&c),
        );
        assert_eq!(got.reasons, vec![]);
        assert_eq!(got.lines[0].central_unit_price, Some(Money(1200)));
    }

    #[test]
    fn every_reason_is_found_and_ordered() {
        let prices = BTreeMap::from([price("A", 1100), ("B".to_string(), None)]);
        let held = customer(true);
        let o = order(vec![
            ("A", 1200, LinePromise::Confirmed),
            ("B", 500, LinePromise::PendingAllowance),
        ]);
        let got = check_order(&o, &prices, Some(&held));
        assert_eq!(
            got.reasons,
            vec![Reason::UnknownSku, Reason::CreditHold, Reason::PriceChanged]
        );
        assert_eq!(got.lines[0].site_unit_price, Money(1200));
        assert_eq!(got.lines[0].central_unit_price, Some(Money(1100)));
        assert_eq!(got.lines[1].central_unit_price, None);
        assert_eq!(
            check_order(&o, &prices, None).reasons,
            vec![
                Reason::UnknownSku,
                Reason::UnknownCustomer,
                Reason::PriceChanged
            ]
        );
    }

    #[test]
    fn a_hold_matters_only_when_the_site_confirmed_something() {
        let prices = BTreeMap::from([price("A", 1200)]);
        let held = customer(true);
        let pending = order(vec![("A", 1200, LinePromise::PendingHold)]);
        assert_eq!(check_order(&pending, &prices, Some(&held)).reasons, vec![]);
        let confirmed = order(vec![("A", 1200, LinePromise::Confirmed)]);
        assert_eq!(
            check_order(&confirmed, &prices, Some(&held)).reasons,
            vec![Reason::CreditHold]
        );
    }
}
