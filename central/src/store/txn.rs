//! Helpers shared by the write operations, run inside the writer's transaction: meta counters,
//! the change log and the feed, pools, orders, customers and prices, a site's last contact. I/O
//! side (redb).

use redb::{ReadableTable, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use outpost_protocol::{CentralPool, EventEnvelope, MasterChange};

use super::{
    ApplyError, CHANGES, CUSTOMERS, Channel, EVENTS, LEDGER_ATP, LEDGER_CREDIT, META,
    META_NEXT_CURSOR, META_REVISION, ORDERS, OrderRecord, PRICES, SITES, SiteRecord, encode,
    records,
};
use crate::ledger::LedgerKey;

pub(super) fn meta_get(txn: &WriteTransaction, key: &str) -> Result<u64, ApplyError> {
    let meta = txn.open_table(META)?;
    Ok(meta.get(key)?.map(|g| g.value()).unwrap_or(0))
}

pub(super) fn meta_set(txn: &WriteTransaction, key: &str, v: u64) -> Result<(), ApplyError> {
    let mut meta = txn.open_table(META)?;
    meta.insert(key, v)?;
    Ok(())
}

/// Takes the next number of the counter `key` (1, 2, ...).
pub(super) fn next_id(txn: &WriteTransaction, key: &str) -> Result<u64, ApplyError> {
    let id = meta_get(txn, key)? + 1;
    meta_set(txn, key, id)?;
    Ok(id)
}

/// Appends `change` to the change log with the next revision; returns that revision.
pub(super) fn append_change(
    txn: &WriteTransaction,
    change: &MasterChange,
) -> Result<u64, ApplyError> {
    let rev = next_id(txn, META_REVISION)?;
    let mut log = txn.open_table(CHANGES)?;
    log.insert(rev, encode(change).as_slice())?;
    Ok(rev)
}

/// Appends an event to the global feed under the next cursor; returns the cursor.
pub(super) fn append_feed(
    txn: &WriteTransaction,
    site: &str,
    channel: Channel,
    event: &EventEnvelope,
) -> Result<u64, ApplyError> {
    let cursor = meta_get(txn, META_NEXT_CURSOR)?.max(1);
    meta_set(txn, META_NEXT_CURSOR, cursor + 1)?;
    let row = records::FeedRow {
        site: site.to_string(),
        channel,
        event: event.clone(),
    };
    let mut t = txn.open_table(EVENTS)?;
    t.insert(cursor, encode(&row).as_slice())?;
    Ok(cursor)
}

/// `records::FeedRow` by reference: the same encoding, without cloning the envelope.
#[derive(Serialize)]
pub(super) struct FeedRowRef<'a> {
    site: &'a str,
    channel: Channel,
    event: &'a EventEnvelope,
}

/// Appends `events` to the feed under consecutive cursors: the cursor and the feed table are
/// read and written once for the run, not once per event (the drain of a large backlog is
/// mostly milestones).
pub(super) fn append_feed_run(
    txn: &WriteTransaction,
    site: &str,
    channel: Channel,
    events: &[&EventEnvelope],
) -> Result<(), ApplyError> {
    if events.is_empty() {
        return Ok(());
    }
    let first = meta_get(txn, META_NEXT_CURSOR)?.max(1);
    {
        let mut t = txn.open_table(EVENTS)?;
        for (i, event) in events.iter().enumerate() {
            let row = FeedRowRef {
                site,
                channel,
                event,
            };
            t.insert(first + i as u64, encode(&row).as_slice())?;
        }
    }
    meta_set(txn, META_NEXT_CURSOR, first + events.len() as u64)?;
    Ok(())
}

/// Decodes a record read inside the writer. A record this build cannot read is a broken
/// invariant of the store; the group is aborted rather than acting on a guess.
pub(super) fn decode_w<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ApplyError> {
    postcard::from_bytes(bytes).map_err(|source| ApplyError::Corrupt {
        what: what.to_string(),
        source,
    })
}

pub(super) fn get_pool(
    txn: &WriteTransaction,
    key: &LedgerKey,
) -> Result<Option<CentralPool>, ApplyError> {
    match key {
        LedgerKey::Atp { sku, site } => {
            let t = txn.open_table(LEDGER_ATP)?;
            let v = t.get((site.as_str(), sku.as_str()))?;
            v.map(|v| decode_w("pool", v.value())).transpose()
        }
        LedgerKey::Credit { customer } => {
            let t = txn.open_table(LEDGER_CREDIT)?;
            let v = t.get(customer.as_str())?;
            v.map(|v| decode_w("pool", v.value())).transpose()
        }
    }
}

pub(super) fn put_pool(
    txn: &WriteTransaction,
    key: &LedgerKey,
    pool: &CentralPool,
) -> Result<(), ApplyError> {
    match key {
        LedgerKey::Atp { sku, site } => {
            let mut t = txn.open_table(LEDGER_ATP)?;
            t.insert((site.as_str(), sku.as_str()), encode(pool).as_slice())?;
        }
        LedgerKey::Credit { customer } => {
            let mut t = txn.open_table(LEDGER_CREDIT)?;
            t.insert(customer.as_str(), encode(pool).as_slice())?;
        }
    }
    Ok(())
}

pub(super) fn get_order(
    txn: &WriteTransaction,
    order_id: &str,
) -> Result<Option<OrderRecord>, ApplyError> {
    let t = txn.open_table(ORDERS)?;
    let v = t.get(order_id)?;
    v.map(|v| decode_w("order", v.value())).transpose()
}

pub(super) fn put_order(txn: &WriteTransaction, order: &OrderRecord) -> Result<(), ApplyError> {
    let mut t = txn.open_table(ORDERS)?;
    t.insert(order.order_id.as_str(), encode(order).as_slice())?;
    Ok(())
}

pub(super) fn get_customer(
    txn: &WriteTransaction,
    id: &str,
) -> Result<Option<outpost_protocol::CustomerRecord>, ApplyError> {
    let t = txn.open_table(CUSTOMERS)?;
    let v = t.get(id)?;
    v.map(|v| decode_w("customer", v.value())).transpose()
}

/// Central's effective price of `sku` for `customer`: the customer's own, else the list price.
pub(super) fn effective_price(
    txn: &WriteTransaction,
    sku: &str,
    customer: &str,
) -> Result<Option<outpost_protocol::PriceRecord>, ApplyError> {
    let t = txn.open_table(PRICES)?;
    let v = match t.get((sku, customer))? {
        Some(v) => Some(v),
        None => t.get((sku, ""))?,
    };
    v.map(|v| decode_w("price", v.value())).transpose()
}

pub(super) fn touch(txn: &WriteTransaction, site: &str, now_ms: i64) -> Result<(), ApplyError> {
    let mut t = txn.open_table(SITES)?;
    let first = match t.get(site)? {
        Some(v) => postcard::from_bytes::<SiteRecord>(v.value())
            .map(|r| r.first_seen_ms)
            .unwrap_or(now_ms),
        None => now_ms,
    };
    let rec = SiteRecord {
        first_seen_ms: first,
        last_seen_ms: now_ms,
    };
    t.insert(site, encode(&rec).as_slice())?;
    Ok(())
}
