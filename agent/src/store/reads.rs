//! Reads of the store, run on the caller's thread in one read transaction each: the marks, the
//! outbox, master data, allowances and orders. Blocking I/O side (redb, microseconds): the API
//! calls them from handlers, the sync task from where blocking is allowed.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use outpost_protocol::{CustomerRecord, EventEnvelope, LinePromise, OrderLine, Pool, SitePool};
use redb::{ReadableTable, ReadableTableMetadata};

use super::Store;
use super::error::{Fail, ReadError, WriteError, corrupt, storage};
use super::order::order_pools;
use super::schema::{
    ALLOWANCES, ATP, CUSTOMERS, IDEMPOTENCY, K_ACKED_SEQ, K_AS_OF, K_CENTRAL_INCARNATION,
    K_LAST_SEQ, K_MASTER_REV, META, ORDERS, OUTBOX, PRICES, as_of, lookup_price, parse_pool_key,
    read_meta_in,
};
use super::types::{AtpView, Marks, NewOrder, OrderRecord, OutboxSummary, PriceValue};
use crate::capture;

/// Most allowances listed by `allowances()`: one per SKU stocked and per customer, so a site has
/// hundreds to a few thousand; the cap bounds one response should central ever grant many more.
pub const MAX_ALLOWANCES_LISTED: usize = 10_000;

impl Store {
    pub fn marks(&self) -> Result<Marks, ReadError> {
        let txn = self.read_txn()?;
        let meta = txn.open_table(META).map_err(storage)?;
        let get = |k: &str| -> Result<u64, ReadError> {
            Ok(meta
                .get(k)
                .map_err(storage)?
                .map(|g| g.value())
                .unwrap_or(0))
        };
        let last_seq = get(K_LAST_SEQ)?;
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        let retained_from_seq = match outbox.first().map_err(storage)? {
            Some((k, _)) => k.value(),
            None => last_seq + 1,
        };
        Ok(Marks {
            master_rev: get(K_MASTER_REV)?,
            last_seq,
            acked_seq: get(K_ACKED_SEQ)?,
            retained_from_seq,
            central_incarnation: get(K_CENTRAL_INCARNATION)?,
        })
    }

    /// Unacknowledged rows in the outbox, counted one by one (equals `marks().outbox_depth()`;
    /// kept to check that, in tests: it walks the whole unacknowledged outbox).
    pub fn outbox_rows(&self) -> Result<u64, ReadError> {
        let txn = self.read_txn()?;
        let acked = read_meta_in(&txn, K_ACKED_SEQ)?;
        let t = txn.open_table(OUTBOX).map_err(storage)?;
        let mut n = 0;
        for row in t.range(acked + 1..).map_err(storage)? {
            row.map_err(storage)?;
            n += 1;
        }
        Ok(n)
    }

    /// Every row the outbox table holds: unacknowledged events and retained acknowledged ones.
    pub fn outbox_rows_held(&self) -> Result<u64, ReadError> {
        let txn = self.read_txn()?;
        let t = txn.open_table(OUTBOX).map_err(storage)?;
        t.len().map_err(storage)
    }

    /// The unacknowledged outbox, for the heartbeat: its events, their bytes on disk and when the
    /// oldest of them was stored. The bytes are the table's (keys, values and page overhead of
    /// the leaves; the walk visits each page once) pro rata of the unacknowledged rows among all
    /// rows held, so retained acknowledged events are not counted and no row is read for it.
    /// Reads one row only.
    pub fn outbox_summary(&self) -> Result<OutboxSummary, ReadError> {
        let txn = self.read_txn()?;
        let acked = read_meta_in(&txn, K_ACKED_SEQ)?;
        let last = read_meta_in(&txn, K_LAST_SEQ)?;
        let t = txn.open_table(OUTBOX).map_err(storage)?;
        let events = last.saturating_sub(acked);
        let held = t.len().map_err(storage)?;
        let stored = t.stats().map_err(storage)?.stored_bytes();
        let bytes = if held == 0 {
            0
        } else {
            let share = u128::from(stored) * u128::from(events.min(held)) / u128::from(held);
            u64::try_from(share).unwrap_or(u64::MAX)
        };
        let oldest_at_ms = match t.range(acked + 1..).map_err(storage)?.next() {
            Some(row) => {
                let (_, v) = row.map_err(storage)?;
                let e: EventEnvelope = postcard::from_bytes(v.value()).map_err(corrupt)?;
                Some(e.at_ms)
            }
            None => None,
        };
        Ok(OutboxSummary {
            events,
            bytes,
            oldest_at_ms,
        })
    }

    /// The ERP's ATP figure for `sku` at this site, with the master revision it reflects.
    pub fn atp(&self, sku: &str) -> Result<Option<(i64, u64)>, ReadError> {
        let txn = self.read_txn()?;
        let atp = txn.open_table(ATP).map_err(storage)?;
        let Some(v) = atp.get(sku).map_err(storage)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let meta = txn.open_table(META).map_err(storage)?;
        let rev = meta
            .get(K_MASTER_REV)
            .map_err(storage)?
            .map(|g| g.value())
            .unwrap_or(0);
        Ok(Some((v, rev)))
    }

    /// The site's allowance of `sku` and the ERP's figure for it; `None` if central never sent
    /// either for this SKU.
    pub fn atp_view(&self, sku: &str) -> Result<Option<AtpView>, ReadError> {
        let txn = self.read_txn()?;
        let erp = txn.open_table(ATP).map_err(storage)?;
        let erp_available = erp.get(sku).map_err(storage)?.map(|g| g.value());
        let allowances = txn.open_table(ALLOWANCES).map_err(storage)?;
        let allowance = allowances
            .get(Pool::atp(sku).key().as_str())
            .map_err(storage)?
            .map(|g| g.value());
        if erp_available.is_none() && allowance.is_none() {
            return Ok(None);
        }
        let meta = txn.open_table(META).map_err(storage)?;
        let get = |k: &str| -> Result<u64, ReadError> {
            Ok(meta
                .get(k)
                .map_err(storage)?
                .map(|g| g.value())
                .unwrap_or(0))
        };
        Ok(Some(AtpView {
            allowance: allowance.unwrap_or(0),
            erp_available,
            master_rev: get(K_MASTER_REV)?,
            as_of_ms: as_of(get(K_AS_OF)?),
        }))
    }

    /// When the last master batch was applied, if ever (ms since the epoch).
    pub fn as_of_ms(&self) -> Result<Option<i64>, ReadError> {
        let txn = self.read_txn()?;
        let meta = txn.open_table(META).map_err(storage)?;
        Ok(as_of(
            meta.get(K_AS_OF)
                .map_err(storage)?
                .map(|g| g.value())
                .unwrap_or(0),
        ))
    }

    /// What remains of this site's allowance of `pool` (0 if none was ever granted).
    pub fn allowance(&self, pool: &Pool) -> Result<i64, ReadError> {
        let txn = self.read_txn()?;
        let t = txn.open_table(ALLOWANCES).map_err(storage)?;
        Ok(t.get(pool.key().as_str())
            .map_err(storage)?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    /// Every allowance this site holds, in key order, at most `MAX_ALLOWANCES_LISTED`; the flag
    /// says whether more were left out.
    pub fn allowances(&self) -> Result<(Vec<(Pool, i64)>, bool), ReadError> {
        let txn = self.read_txn()?;
        let t = txn.open_table(ALLOWANCES).map_err(storage)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(storage)? {
            if out.len() == MAX_ALLOWANCES_LISTED {
                return Ok((out, true));
            }
            let (k, v) = row.map_err(storage)?;
            let pool = parse_pool_key(k.value())
                .ok_or_else(|| ReadError::Corrupt(format!("bad allowance key {:?}", k.value())))?;
            out.push((pool, v.value()));
        }
        Ok((out, false))
    }

    /// What remains of every allowance this site holds, summed per pool kind: `(atp, credit)`
    /// (units of SKUs, and `Money` units of credit). One pass over the table, however many pools.
    pub fn allowance_totals(&self) -> Result<(i64, i64), ReadError> {
        let txn = self.read_txn()?;
        let t = txn.open_table(ALLOWANCES).map_err(storage)?;
        let (mut atp, mut credit) = (0i64, 0i64);
        for row in t.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            match parse_pool_key(k.value()) {
                Some(Pool::Atp { .. }) => atp = atp.saturating_add(v.value()),
                Some(Pool::Credit { .. }) => credit = credit.saturating_add(v.value()),
                None => {
                    return Err(ReadError::Corrupt(format!(
                        "bad allowance key {:?}",
                        k.value()
                    )));
                }
            }
        }
        Ok((atp, credit))
    }

    /// Whether an order was already stored under this idempotency key.
    pub fn has_order_key(&self, key: &str) -> Result<bool, ReadError> {
        let txn = self.read_txn()?;
        let t = txn.open_table(IDEMPOTENCY).map_err(storage)?;
        Ok(t.get(key).map_err(storage)?.is_some())
    }

    /// How much more allowance the site would need to confirm every line of `order` now (see
    /// `capture::shortfalls`). Empty when the order would be refused anyway (unknown customer,
    /// missing price): the writer reports that.
    pub fn shortfalls(&self, order: &NewOrder) -> Result<Vec<(Pool, i64)>, ReadError> {
        let txn = self.read_txn()?;
        let customers = txn.open_table(CUSTOMERS).map_err(storage)?;
        let Some(g) = customers.get(order.customer_id.as_str()).map_err(storage)? else {
            return Ok(Vec::new());
        };
        let customer: CustomerRecord = postcard::from_bytes(g.value()).map_err(corrupt)?;
        let prices = txn.open_table(PRICES).map_err(storage)?;
        let allowances = txn.open_table(ALLOWANCES).map_err(storage)?;
        let mut lines = Vec::with_capacity(order.lines.len());
        for l in &order.lines {
            let price = lookup_price(&prices, &l.sku, &order.customer_id).map_err(|e| match e {
                Fail::Storage(s) => ReadError::Unavailable(s),
                Fail::Reject(e) => ReadError::Corrupt(e.to_string()),
            })?;
            let Some(p) = price else {
                return Ok(Vec::new());
            };
            lines.push(OrderLine {
                sku: l.sku.clone(),
                qty: l.qty,
                unit_price: p.unit_price,
                currency: p.currency,
                promise: LinePromise::PendingAllowance,
            });
        }
        let mut pools = BTreeMap::new();
        for pool in order_pools(&order.customer_id, &lines) {
            let left = allowances
                .get(pool.key().as_str())
                .map_err(storage)?
                .map(|g| g.value())
                .unwrap_or(0);
            pools.insert(pool, SitePool { remaining: left });
        }
        Ok(capture::shortfalls(
            &order.customer_id,
            customer.on_hold,
            &lines,
            &pools,
        ))
    }

    /// The price of `sku` for `customer` if one exists, else the list price.
    pub fn price(
        &self,
        sku: &str,
        customer: Option<&str>,
    ) -> Result<Option<PriceValue>, ReadError> {
        let txn = self.read_txn()?;
        let prices = txn.open_table(PRICES).map_err(storage)?;
        lookup_price(&prices, sku, customer.unwrap_or("")).map_err(|e| match e {
            Fail::Storage(s) => ReadError::Unavailable(s),
            Fail::Reject(WriteError::Corrupt(s)) => ReadError::Corrupt(s),
            Fail::Reject(e) => ReadError::Corrupt(e.to_string()),
        })
    }

    pub fn customer(&self, id: &str) -> Result<Option<CustomerRecord>, ReadError> {
        let txn = self.read_txn()?;
        let t = txn.open_table(CUSTOMERS).map_err(storage)?;
        let Some(g) = t.get(id).map_err(storage)? else {
            return Ok(None);
        };
        postcard::from_bytes(g.value()).map(Some).map_err(corrupt)
    }

    /// An order and whether central has acknowledged it (`seq <= acked_seq`).
    pub fn order(&self, order_id: &str) -> Result<Option<(OrderRecord, bool)>, ReadError> {
        let txn = self.read_txn()?;
        let orders = txn.open_table(ORDERS).map_err(storage)?;
        let Some(g) = orders.get(order_id).map_err(storage)? else {
            return Ok(None);
        };
        let rec: OrderRecord = postcard::from_bytes(g.value()).map_err(corrupt)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let acked = meta
            .get(K_ACKED_SEQ)
            .map_err(storage)?
            .map(|g| g.value())
            .unwrap_or(0);
        let synced = rec.seq <= acked;
        Ok(Some((rec, synced)))
    }

    /// The outbox events in `range`, in sequence order. A missing row is corruption: rows are
    /// only pruned from the oldest held, at or below `acked_seq`, and callers ask only for rows
    /// above it (after a rewind, rows retained for that purpose).
    pub fn outbox_range(
        &self,
        range: RangeInclusive<u64>,
    ) -> Result<Vec<EventEnvelope>, ReadError> {
        let txn = self.read_txn()?;
        let t = txn.open_table(OUTBOX).map_err(storage)?;
        let mut out = Vec::with_capacity(
            usize::try_from(range.end().saturating_sub(*range.start()) + 1).unwrap_or(0),
        );
        let mut expected = *range.start();
        for row in t.range(range.clone()).map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            if k.value() != expected {
                return Err(ReadError::Corrupt(format!(
                    "outbox row {expected} is missing (found {})",
                    k.value()
                )));
            }
            out.push(postcard::from_bytes(v.value()).map_err(corrupt)?);
            expected += 1;
        }
        if expected != range.end() + 1 {
            return Err(ReadError::Corrupt(format!(
                "outbox rows {expected}..={} are missing",
                range.end()
            )));
        }
        Ok(out)
    }
}
