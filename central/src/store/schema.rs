//! The store's schema: its version, every redb table with what its rows hold, the meta keys,
//! and the creation of a new store's tables (or the check of an existing store's version). I/O
//! side (redb).

use redb::{Database, Durability, ReadableTable, TableDefinition};

/// Version of the table layout below. Bumped on any incompatible change; a store written by
/// another version is refused at open instead of being misread. Version 4 added the store's
/// incarnation, the lost ranges and the recovery fields of the reconciliation report.
pub const SCHEMA_VERSION: u64 = 4;

/// meta key (`META_*`) -> value
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// cursor -> postcard FeedRow
pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// site -> highest seq stored
pub(super) const SITE_HWM: TableDefinition<&str, u64> = TableDefinition::new("site_hwm");
/// site -> postcard SiteRecord
pub(super) const SITES: TableDefinition<&str, &[u8]> = TableDefinition::new("sites");
/// (sku, customer or "" for the list price) -> postcard PriceRecord
pub(super) const PRICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("prices");
/// (sku, site) -> available
pub(super) const ATP: TableDefinition<(&str, &str), i64> = TableDefinition::new("atp");
/// customer id -> postcard CustomerRecord
pub(super) const CUSTOMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
/// revision -> postcard MasterChange
pub(super) const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// (site, sku) -> postcard CentralPool: the ATP pool of a SKU at a site
pub(super) const LEDGER_ATP: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("ledger_atp");
/// customer -> postcard CentralPool: the customer's credit pool, in money units
pub(super) const LEDGER_CREDIT: TableDefinition<&str, &[u8]> =
    TableDefinition::new("ledger_credit");
/// site -> 0: sites that hold or may get allowances (they connected, or the ERP gave them ATP)
pub(super) const LEDGER_SITES: TableDefinition<&str, u64> = TableDefinition::new("ledger_sites");
/// (ledger key text, site) -> postcard OpenReclaim; at most one per site and pool
pub(super) const OPEN_RECLAIMS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("open_reclaims");
/// order id -> postcard OrderRecord
pub(super) const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
/// exception id -> postcard ExceptionRecord
pub(super) const EXCEPTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("exceptions");
/// dead letter id -> postcard DeadLetter
pub(super) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// (site, session) -> postcard ReconReport
pub(super) const REPORTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("reports");
/// Idempotency-Key of central's order channel -> postcard IdemRecord
pub(super) const CENTRAL_IDEM: TableDefinition<&str, &[u8]> = TableDefinition::new("central_idem");
/// (site, first lost seq) -> postcard LostRange: seqs a restored central had acknowledged before
/// its backup was taken and the site no longer holds.
pub(super) const LOST_RANGES: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("lost_ranges");

/// Calls `$m!` with every table of central's store. `init_tables` creates each one and the
/// backup copies each one; a table missing here is caught at backup time (the backup refuses a
/// source table it has no definition for) and by the backup's unit test.
macro_rules! with_every_table {
    ($m:ident) => {
        $m!(
            $crate::store::META,
            $crate::store::EVENTS,
            $crate::store::SITE_HWM,
            $crate::store::SITES,
            $crate::store::PRICES,
            $crate::store::ATP,
            $crate::store::CUSTOMERS,
            $crate::store::CHANGES,
            $crate::store::LEDGER_ATP,
            $crate::store::LEDGER_CREDIT,
            $crate::store::LEDGER_SITES,
            $crate::store::OPEN_RECLAIMS,
            $crate::store::ORDERS,
            $crate::store::EXCEPTIONS,
            $crate::store::DEAD_LETTERS,
            $crate::store::REPORTS,
            $crate::store::CENTRAL_IDEM,
            $crate::store::LOST_RANGES,
            $crate::store::revoked::REVOKED,
            $crate::store::alerts::ALERTS,
            $crate::store::drills::DRILLS
        )
    };
}
pub(crate) use with_every_table;

pub(super) const META_SCHEMA: &str = "schema_version";
pub(super) const META_REVISION: &str = "revision";
pub(super) const META_NEXT_CURSOR: &str = "next_cursor";
pub(super) const META_LAST_EXCEPTION: &str = "last_exception";
pub(super) const META_LAST_DEAD_LETTER: &str = "last_dead_letter";
pub(super) const META_LAST_RECLAIM: &str = "last_reclaim";
pub(super) const META_LAST_CENTRAL_ORDER: &str = "last_central_order";
/// Random non-zero id of this store, drawn when it is created and again when it is restored
/// from a backup (sent in every Welcome).
pub(super) const META_INCARNATION: &str = "incarnation";
/// Per site (`old_grants_through:SITE`): the last seq of the Hello in which the site last came
/// to this incarnation from another one. Its orders up to that seq were confirmed from grants
/// this incarnation zeroed; kept across sessions, since the site may re-send them in any later
/// one.
pub(super) fn meta_old_grants_through(site: &str) -> String {
    format!("old_grants_through:{site}")
}
/// When the backup this store was made from was taken (only in backups and restored stores).
pub(super) const META_BACKUP_TAKEN_MS: &str = "backup_taken_ms";
/// When a restored store was restored, and the backup time it was restored from.
pub(super) const META_RESTORED_FROM_BACKUP_MS: &str = "restored_from_backup_ms";
pub(super) const META_RESTORED_AT_MS: &str = "restored_at_ms";

pub(super) enum InitError {
    Redb(redb::Error),
    Schema(u64),
    Backup,
}

impl<E: Into<redb::Error>> From<E> for InitError {
    fn from(e: E) -> Self {
        InitError::Redb(e.into())
    }
}

/// A random non-zero incarnation (0 means "none" in a Hello).
pub(super) fn new_incarnation() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Creates the tables, stamps or checks the schema version (drawing the incarnation of a new
/// store), and returns the current revision.
pub(super) fn init_tables(db: &Database) -> Result<u64, InitError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let revision;
    {
        let mut meta = txn.open_table(META)?;
        let found = meta.get(META_SCHEMA)?.map(|g| g.value());
        match found {
            None => {
                meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => return Err(InitError::Schema(v)),
        }
        if meta.get(META_BACKUP_TAKEN_MS)?.is_some() && meta.get(META_RESTORED_AT_MS)?.is_none() {
            return Err(InitError::Backup);
        }
        revision = meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
        if meta.get(META_INCARNATION)?.is_none() {
            meta.insert(META_INCARNATION, new_incarnation())?;
        }
    }
    macro_rules! create_each {
        ($($t:path),*) => {$(
            txn.open_table($t)?;
        )*};
    }
    with_every_table!(create_each);
    txn.commit()?;
    Ok(revision)
}
