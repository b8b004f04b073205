//! The store's on-disk layout (redb): table definitions, meta keys and the schema version;
//! opening a file and preparing its tables; the `Tables` view one write group works through, and
//! small readers of the meta table. Blocking I/O side.

use std::path::Path;

use outpost_protocol::{EventEnvelope, Pool, SitePool};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};

use super::error::{Fail, OpenStoreError, ReadError, ReadMetaError, WriteError, storage};
use super::types::{MAX_OUTBOX_EVENTS, PriceValue};

/// Version of the table layout below. Bumped on any incompatible change; an agent refuses to open
/// a store written with another version instead of misreading it.
pub const SCHEMA_VERSION: u64 = 3;

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (sku, customer id or "" for the list price) → postcard `PriceValue`.
pub(super) const PRICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("prices");
/// sku → available quantity at this site.
pub(super) const ATP: TableDefinition<&str, i64> = TableDefinition::new("atp");
/// `Pool::key()` (`atp:SKU`, `credit:CUSTOMER`) → what remains of this site's allowance.
pub(super) const ALLOWANCES: TableDefinition<&str, i64> = TableDefinition::new("allowances");
/// customer id → postcard `CustomerRecord`.
pub(super) const CUSTOMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
/// seq → postcard `EventEnvelope`. Rows above `acked_seq` are the unacknowledged outbox; rows at
/// or below it are acknowledged events retained for a restored central (`Retention`). The rows
/// held are always one contiguous run from the first key to `last_seq`: pruning only removes
/// the oldest row, so a rewind needs only the first key to know what is held.
pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// order id → postcard `OrderRecord`; kept after the ack so the order can still be read.
pub(super) const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
/// Idempotency-Key → postcard `IdemRecord`.
pub(super) const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// milestone event id → postcard `MilestoneRecord`.
pub(super) const MILESTONES: TableDefinition<&str, &[u8]> = TableDefinition::new("milestones");

pub(super) const K_SCHEMA: &str = "schema_version";
pub(super) const K_MASTER_REV: &str = "master_rev";
pub(super) const K_LAST_SEQ: &str = "last_seq";
pub(super) const K_ACKED_SEQ: &str = "acked_seq";
/// When the last master batch was applied, in ms since the epoch (0: never).
pub(super) const K_AS_OF: &str = "as_of_ms";
/// Incarnation of central's store named by the last Welcome (0: none yet).
pub(super) const K_CENTRAL_INCARNATION: &str = "central_incarnation";

/// redb's page cache (its default is 1 GiB). The agent's RSS is mostly this cache plus the
/// process itself; hot master data and the outbox's tail fit, and pages beyond it are read from
/// the OS page cache (a few µs).
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

pub(super) fn open_db(path: &Path) -> Result<Database, OpenStoreError> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenStoreError::AlreadyOpen {
                path: path.to_path_buf(),
            },
            e => OpenStoreError::Open {
                path: path.to_path_buf(),
                source: e.into(),
            },
        })?;
    prepare_db(db, path)
}

/// Creates every table and checks (or, on a new file, writes) the schema version.
pub(super) fn prepare_db(db: Database, path: &Path) -> Result<Database, OpenStoreError> {
    let open_err = |e: redb::Error| OpenStoreError::Open {
        path: path.to_path_buf(),
        source: e,
    };
    let mut txn = db.begin_write().map_err(|e| open_err(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| open_err(e.into()))?;
    let found = {
        // Creating every table up front lets readers open them without a "does not exist" case.
        let mut meta = txn.open_table(META).map_err(|e| open_err(e.into()))?;
        txn.open_table(PRICES).map_err(|e| open_err(e.into()))?;
        txn.open_table(ATP).map_err(|e| open_err(e.into()))?;
        txn.open_table(ALLOWANCES).map_err(|e| open_err(e.into()))?;
        txn.open_table(CUSTOMERS).map_err(|e| open_err(e.into()))?;
        txn.open_table(OUTBOX).map_err(|e| open_err(e.into()))?;
        txn.open_table(ORDERS).map_err(|e| open_err(e.into()))?;
        txn.open_table(IDEMPOTENCY)
            .map_err(|e| open_err(e.into()))?;
        txn.open_table(MILESTONES).map_err(|e| open_err(e.into()))?;
        let found = meta
            .get(K_SCHEMA)
            .map_err(|e| open_err(e.into()))?
            .map(|g| g.value());
        if found.is_none() {
            meta.insert(K_SCHEMA, SCHEMA_VERSION)
                .map_err(|e| open_err(e.into()))?;
        }
        found
    };
    if let Some(found) = found
        && found != SCHEMA_VERSION
    {
        return Err(OpenStoreError::SchemaVersion {
            path: path.to_path_buf(),
            found,
        });
    }
    txn.commit().map_err(|e| open_err(e.into()))?;
    Ok(db)
}

/// Every table, opened once per group.
pub(super) struct Tables<'txn> {
    pub(super) meta: Table<'txn, &'static str, u64>,
    pub(super) prices: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    pub(super) atp: Table<'txn, &'static str, i64>,
    pub(super) allowances: Table<'txn, &'static str, i64>,
    pub(super) customers: Table<'txn, &'static str, &'static [u8]>,
    pub(super) outbox: Table<'txn, u64, &'static [u8]>,
    pub(super) orders: Table<'txn, &'static str, &'static [u8]>,
    pub(super) idempotency: Table<'txn, &'static str, &'static [u8]>,
    pub(super) milestones: Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    pub(super) fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(Tables {
            meta: txn.open_table(META)?,
            prices: txn.open_table(PRICES)?,
            atp: txn.open_table(ATP)?,
            allowances: txn.open_table(ALLOWANCES)?,
            customers: txn.open_table(CUSTOMERS)?,
            outbox: txn.open_table(OUTBOX)?,
            orders: txn.open_table(ORDERS)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
            milestones: txn.open_table(MILESTONES)?,
        })
    }

    pub(super) fn meta(&self, k: &str) -> Result<u64, Fail> {
        Ok(self.meta.get(k)?.map(|g| g.value()).unwrap_or(0))
    }

    /// The next sequence number, refusing when the outbox is full.
    pub(super) fn next_seq(&self) -> Result<u64, Fail> {
        let last = self.meta(K_LAST_SEQ)?;
        let acked = self.meta(K_ACKED_SEQ)?;
        let depth = last.saturating_sub(acked);
        if depth >= MAX_OUTBOX_EVENTS {
            return Err(WriteError::OutboxFull(depth).into());
        }
        Ok(last + 1)
    }

    pub(super) fn pool(&self, pool: &Pool) -> Result<SitePool, Fail> {
        let remaining = self
            .allowances
            .get(pool.key().as_str())?
            .map(|g| g.value())
            .unwrap_or(0);
        Ok(SitePool { remaining })
    }

    pub(super) fn set_pool(&mut self, pool: &Pool, p: SitePool) -> Result<(), Fail> {
        self.allowances.insert(pool.key().as_str(), p.remaining)?;
        Ok(())
    }

    pub(super) fn append_event(&mut self, env: &EventEnvelope) -> Result<(), Fail> {
        let bytes = postcard::to_allocvec(env)?;
        self.outbox.insert(env.seq, bytes.as_slice())?;
        self.meta.insert(K_LAST_SEQ, env.seq)?;
        Ok(())
    }
}

pub(super) fn lookup_price<T: ReadableTable<(&'static str, &'static str), &'static [u8]>>(
    prices: &T,
    sku: &str,
    customer: &str,
) -> Result<Option<PriceValue>, Fail> {
    if !customer.is_empty()
        && let Some(g) = prices.get((sku, customer))?
    {
        return Ok(Some(postcard::from_bytes(g.value())?));
    }
    match prices.get((sku, ""))? {
        Some(g) => Ok(Some(postcard::from_bytes(g.value())?)),
        None => Ok(None),
    }
}

/// Whether any price (list or customer) or ATP row mentions `sku`.
pub(super) fn sku_known(t: &Tables<'_>, sku: &str) -> Result<bool, Fail> {
    if t.atp.get(sku)?.is_some() {
        return Ok(true);
    }
    let mut range = t.prices.range((sku, "")..)?;
    match range.next() {
        Some(row) => {
            let (k, _) = row?;
            Ok(k.value().0 == sku)
        }
        None => Ok(false),
    }
}

pub(super) fn as_of(ms: u64) -> Option<i64> {
    (ms > 0).then(|| i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The inverse of `Pool::key()`. SKUs and customer ids may contain `:`, so only the first one
/// separates the kind.
pub fn parse_pool_key(k: &str) -> Option<Pool> {
    match k.split_once(':')? {
        ("atp", sku) => Some(Pool::atp(sku)),
        ("credit", customer) => Some(Pool::credit(customer)),
        _ => None,
    }
}

pub(super) fn read_meta_in(txn: &redb::ReadTransaction, k: &str) -> Result<u64, ReadError> {
    let meta = txn.open_table(META).map_err(storage)?;
    Ok(meta
        .get(k)
        .map_err(storage)?
        .map(|g| g.value())
        .unwrap_or(0))
}

/// One meta value (0 when absent), read in a transaction of its own while the store opens.
pub(super) fn read_meta(db: &Database, k: &str) -> Result<u64, ReadMetaError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    Ok(meta.get(k)?.map(|g| g.value()).unwrap_or(0))
}
