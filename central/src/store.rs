//! Central's durable store (redb): master data with its change log, the global event feed, the
//! per-site high-water marks and the sites ever seen. I/O side: all writes go through one writer
//! thread that group-commits; reads open a read transaction directly.
//!
//! Invariant: a site's events and its high-water mark are written in the same transaction, so
//! after any crash the mark says exactly which events are stored, and a re-upload stores nothing
//! twice. Master changes get consecutive revisions in the transaction that updates the current
//! state tables.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use outpost_protocol::session::{IngestError, plan_ingest};
use outpost_protocol::{EventEnvelope, MasterChange, ValidationError};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

/// Version of the table layout below. Bumped on any incompatible change; a store written by
/// another version is refused at open instead of being misread.
pub const SCHEMA_VERSION: u64 = 1;
/// Depth of the writer's queue. Producers wait when it is full (backpressure on HTTP handlers
/// and sync sessions) rather than growing memory.
pub const WRITE_QUEUE_DEPTH: usize = 4096;
/// Most operations committed in one transaction: enough to amortise one fsync over a burst,
/// few enough that one commit stays short.
pub const MAX_GROUP: usize = 256;
/// How long the writer waits for readers to drop the old handle before reopening the database
/// after a failed commit (reads take microseconds).
pub const REOPEN_WAIT: Duration = Duration::from_secs(2);
/// Longest a caller waits for the writer's answer before reporting the store unavailable.
pub const WRITE_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// cursor -> postcard (site, EventEnvelope)
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// site -> highest seq stored
const SITE_HWM: TableDefinition<&str, u64> = TableDefinition::new("site_hwm");
/// site -> postcard SiteRecord
const SITES: TableDefinition<&str, &[u8]> = TableDefinition::new("sites");
/// (sku, customer or "" for the list price) -> postcard PriceRecord
const PRICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("prices");
/// (sku, site) -> available
const ATP: TableDefinition<(&str, &str), i64> = TableDefinition::new("atp");
/// customer id -> postcard CustomerRecord
const CUSTOMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
/// revision -> postcard MasterChange
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

const META_SCHEMA: &str = "schema_version";
const META_REVISION: &str = "revision";
const META_NEXT_CURSOR: &str = "next_cursor";

/// When central first and last heard from a site (milliseconds since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// One event of the global feed.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub cursor: u64,
    pub site: String,
    pub event: EventEnvelope,
}

/// A site as stored: its record (if it ever connected) and its high-water mark.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSite {
    pub site: String,
    pub record: Option<SiteRecord>,
    pub hwm: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasterApplied {
    /// Revision of the last change written.
    pub revision: u64,
    pub changes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestOutcome {
    pub duplicates: usize,
    pub stored: usize,
    pub new_hwm: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("cannot initialise {path}: {source}")]
    Init {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("{path} has schema version {found}, this build reads version {SCHEMA_VERSION}")]
    SchemaVersion { path: PathBuf, found: u64 },
    #[error("cannot start the store writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The store cannot take writes right now (I/O error, reopening, shutting down).
#[derive(Debug, Clone, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreUnavailable(pub String);

#[derive(Debug, thiserror::Error)]
pub enum UpsertMasterError {
    /// Nothing was written; each entry is the item index and its problem.
    #[error("{} invalid item(s)", .0.len())]
    Invalid(Vec<(usize, ValidationError)>),
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
}

#[derive(Debug, thiserror::Error)]
pub enum IngestBatchError {
    /// The batch breaks the protocol; nothing was written.
    #[error(transparent)]
    Plan(#[from] IngestError),
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

impl From<redb::Error> for ReadError {
    fn from(e: redb::Error) -> Self {
        ReadError::Unavailable(StoreUnavailable(e.to_string()))
    }
}

macro_rules! read_err_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ReadError {
            fn from(e: $t) -> Self {
                ReadError::from(redb::Error::from(e))
            }
        }
    )*};
}
read_err_from!(redb::TransactionError, redb::TableError, redb::StorageError);

enum Op {
    Master {
        changes: Vec<MasterChange>,
        reply: oneshot::Sender<Result<MasterApplied, UpsertMasterError>>,
    },
    Ingest {
        site: String,
        events: Vec<EventEnvelope>,
        now_ms: i64,
        reply: oneshot::Sender<Result<IngestOutcome, IngestBatchError>>,
    },
    Touch {
        site: String,
        now_ms: i64,
        reply: oneshot::Sender<Result<(), StoreUnavailable>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// An op's result, held until the group's commit decides whether it is delivered.
enum Pending {
    Master(
        oneshot::Sender<Result<MasterApplied, UpsertMasterError>>,
        Result<MasterApplied, UpsertMasterError>,
    ),
    Ingest(
        oneshot::Sender<Result<IngestOutcome, IngestBatchError>>,
        Result<IngestOutcome, IngestBatchError>,
    ),
    Touch(oneshot::Sender<Result<(), StoreUnavailable>>),
    Shutdown(oneshot::Sender<()>),
}

impl Pending {
    fn deliver(self) {
        // A caller that gave up waiting dropped its receiver; nothing to do then.
        match self {
            Pending::Master(tx, r) => drop(tx.send(r)),
            Pending::Ingest(tx, r) => drop(tx.send(r)),
            Pending::Touch(tx) => drop(tx.send(Ok(()))),
            Pending::Shutdown(tx) => drop(tx.send(())),
        }
    }

    fn fail(self, why: &str) {
        let e = || StoreUnavailable(why.to_string());
        match self {
            Pending::Master(tx, _) => drop(tx.send(Err(e().into()))),
            Pending::Ingest(tx, _) => drop(tx.send(Err(e().into()))),
            Pending::Touch(tx) => drop(tx.send(Err(e()))),
            Pending::Shutdown(tx) => drop(tx.send(())),
        }
    }
}

impl Op {
    fn fail(self, why: &str) {
        let e = || StoreUnavailable(why.to_string());
        match self {
            Op::Master { reply, .. } => drop(reply.send(Err(e().into()))),
            Op::Ingest { reply, .. } => drop(reply.send(Err(e().into()))),
            Op::Touch { reply, .. } => drop(reply.send(Err(e()))),
            Op::Shutdown { reply } => drop(reply.send(())),
        }
    }
}

struct Shared {
    path: PathBuf,
    /// `None` while the writer is reopening after an I/O error, or after shutdown.
    db: RwLock<Option<Arc<Database>>>,
    revision: watch::Sender<u64>,
}

impl Shared {
    fn db(&self) -> Result<Arc<Database>, StoreUnavailable> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreUnavailable("the database is being reopened or closed".into()))
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .finish()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn corrupt(what: &str, e: postcard::Error) -> ReadError {
    ReadError::Corrupt(format!("{what}: {e}"))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding into a Vec cannot fail for these types")
}

impl Store {
    /// Opens (creating if missing) the store at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Store, OpenStoreError> {
        let db = Database::create(path).map_err(|source| OpenStoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let revision = init_tables(&db).map_err(|e| match e {
            InitError::Redb(source) => OpenStoreError::Init {
                path: path.to_path_buf(),
                source,
            },
            InitError::Schema(found) => OpenStoreError::SchemaVersion {
                path: path.to_path_buf(),
                found,
            },
        })?;
        let (rev_tx, _) = watch::channel(revision);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            revision: rev_tx,
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(writer_shared, rx))
            .map_err(OpenStoreError::Thread)?;
        Ok(Store {
            shared,
            tx,
            writer: Arc::new(Mutex::new(Some(handle))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Current revision, updated after each commit that wrote master changes.
    pub fn subscribe_revision(&self) -> watch::Receiver<u64> {
        self.shared.revision.subscribe()
    }

    async fn submit<T>(&self, op: Op, rx: oneshot::Receiver<T>) -> Result<T, StoreUnavailable> {
        if self.tx.send(op).await.is_err() {
            return Err(StoreUnavailable("the store is shut down".into()));
        }
        match tokio::time::timeout(WRITE_REPLY_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(StoreUnavailable("the store writer stopped".into())),
            Err(_) => Err(StoreUnavailable(
                "the store writer did not answer in time".into(),
            )),
        }
    }

    /// Validates every change (nothing is written if any is invalid), then writes them with
    /// consecutive revisions and updates the current state, in one durable transaction.
    pub async fn upsert_master(
        &self,
        changes: Vec<MasterChange>,
    ) -> Result<MasterApplied, UpsertMasterError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Op::Master { changes, reply }, rx).await?
    }

    /// Plans the batch against the site's durable high-water mark inside the write transaction,
    /// stores the new events and the new mark together, and answers after the commit.
    pub async fn ingest(
        &self,
        site: &str,
        events: Vec<EventEnvelope>,
    ) -> Result<IngestOutcome, IngestBatchError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Ingest {
            site: site.to_string(),
            events,
            now_ms: now_ms(),
            reply,
        };
        self.submit(op, rx).await?
    }

    /// Records that the site was seen now (creating its record on first contact).
    pub async fn touch_site(&self, site: &str) -> Result<(), StoreUnavailable> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Touch {
            site: site.to_string(),
            now_ms: now_ms(),
            reply,
        };
        self.submit(op, rx).await?
    }

    /// Stops the writer after the operations queued before this call, closes the database and
    /// waits for the writer thread to end. Later writes fail with `StoreUnavailable`.
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Shutdown { reply }).await.is_ok() {
            let _ = tokio::time::timeout(WRITE_REPLY_TIMEOUT, rx).await;
        }
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            match tokio::task::spawn_blocking(move || h.join()).await {
                Ok(Ok(())) => {}
                _ => tracing::error!("the store writer thread panicked"),
            }
        }
    }

    pub fn revision(&self) -> Result<u64, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0))
    }

    /// Durable high-water mark of `site` (0 if it never uploaded).
    pub fn site_hwm(&self, site: &str) -> Result<u64, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(SITE_HWM)?;
        Ok(t.get(site)?.map(|g| g.value()).unwrap_or(0))
    }

    /// Up to `limit` events with a cursor greater than `after`, in cursor order.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let (site, event): (String, EventEnvelope) =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("event", e))?;
            out.push(StoredEvent {
                cursor: k.value(),
                site,
                event,
            });
        }
        Ok(out)
    }

    /// Up to `max` changes with a revision greater than `after`, in revision order.
    pub fn changes_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, MasterChange)>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(CHANGES)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= max {
                break;
            }
            let (k, v) = row?;
            let change: MasterChange =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("change", e))?;
            out.push((k.value(), change));
        }
        Ok(out)
    }

    /// Every site that ever connected or uploaded, sorted by id.
    pub fn sites(&self) -> Result<Vec<StoredSite>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let records = txn.open_table(SITES)?;
        let hwms = txn.open_table(SITE_HWM)?;
        let mut map = std::collections::BTreeMap::<String, StoredSite>::new();
        for row in records.iter()? {
            let (k, v) = row?;
            let rec: SiteRecord =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("site", e))?;
            let site = k.value().to_string();
            map.insert(
                site.clone(),
                StoredSite {
                    site,
                    record: Some(rec),
                    hwm: 0,
                },
            );
        }
        for row in hwms.iter()? {
            let (k, v) = row?;
            let site = k.value().to_string();
            map.entry(site.clone())
                .or_insert(StoredSite {
                    site,
                    record: None,
                    hwm: 0,
                })
                .hwm = v.value();
        }
        Ok(map.into_values().collect())
    }

    /// Current price of `sku` for `customer` (`None`: the list price).
    pub fn price(
        &self,
        sku: &str,
        customer: Option<&str>,
    ) -> Result<Option<outpost_protocol::PriceRecord>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(PRICES)?;
        match t.get((sku, customer.unwrap_or("")))? {
            Some(v) => Ok(Some(
                postcard::from_bytes(v.value()).map_err(|e| corrupt("price", e))?,
            )),
            None => Ok(None),
        }
    }

    pub fn atp(&self, sku: &str, site: &str) -> Result<Option<i64>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(ATP)?;
        Ok(t.get((sku, site))?.map(|g| g.value()))
    }

    pub fn customer(
        &self,
        id: &str,
    ) -> Result<Option<outpost_protocol::CustomerRecord>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(CUSTOMERS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(
                postcard::from_bytes(v.value()).map_err(|e| corrupt("customer", e))?,
            )),
            None => Ok(None),
        }
    }
}

enum InitError {
    Redb(redb::Error),
    Schema(u64),
}

impl<E: Into<redb::Error>> From<E> for InitError {
    fn from(e: E) -> Self {
        InitError::Redb(e.into())
    }
}

/// Creates the tables, stamps or checks the schema version, and returns the current revision.
fn init_tables(db: &Database) -> Result<u64, InitError> {
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
        revision = meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0);
        txn.open_table(EVENTS)?;
        txn.open_table(SITE_HWM)?;
        txn.open_table(SITES)?;
        txn.open_table(PRICES)?;
        txn.open_table(ATP)?;
        txn.open_table(CUSTOMERS)?;
        txn.open_table(CHANGES)?;
    }
    txn.commit()?;
    Ok(revision)
}

/// The writer thread: takes one op, drains what else is queued (up to `MAX_GROUP`), executes them
/// in one transaction, commits once, then answers each op.
fn run_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Op>) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let shutdown = group.iter().any(|op| matches!(op, Op::Shutdown { .. }));
        execute_group(&shared, group);
        if shutdown {
            break;
        }
    }
    rx.close();
    while let Ok(op) = rx.try_recv() {
        op.fail("the store is shut down");
    }
    let db = shared.db.write().unwrap_or_else(|p| p.into_inner()).take();
    drop(db);
}

/// A storage error inside the transaction: the group is aborted.
struct Broken(String);

impl<E: Into<redb::Error>> From<E> for Broken {
    fn from(e: E) -> Self {
        Broken(e.into().to_string())
    }
}

fn execute_group(shared: &Shared, group: Vec<Op>) {
    let db = match current_or_reopen(shared) {
        Ok(db) => db,
        Err(why) => {
            for op in group {
                op.fail(&why);
            }
            return;
        }
    };
    let mut txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => {
            let why = format!("cannot begin a write transaction: {e}");
            tracing::error!(error = %e, "store write failed");
            for op in group {
                op.fail(&why);
            }
            drop(db);
            reopen(shared);
            return;
        }
    };
    if let Err(e) = txn.set_durability(Durability::Immediate) {
        // Immediate is the only durability this store uses; failing to set it is a broken build.
        for op in group {
            op.fail(&format!("cannot set durability: {e}"));
        }
        return;
    }
    let mut pending = Vec::with_capacity(group.len());
    let mut new_revision = None;
    let mut broken: Option<String> = None;
    let mut rest = group.into_iter();
    for op in rest.by_ref() {
        let step = match op {
            Op::Master { changes, reply } => apply_master(&txn, &changes).map(|r| {
                if let Ok(applied) = &r {
                    new_revision = Some(applied.revision);
                }
                Pending::Master(reply, r)
            }),
            Op::Ingest {
                site,
                events,
                now_ms,
                reply,
            } => apply_ingest(&txn, &site, &events, now_ms).map(|r| Pending::Ingest(reply, r)),
            Op::Touch {
                site,
                now_ms,
                reply,
            } => touch(&txn, &site, now_ms).map(|()| Pending::Touch(reply)),
            Op::Shutdown { reply } => Ok(Pending::Shutdown(reply)),
        };
        match step {
            Ok(p) => pending.push(p),
            Err(Broken(why)) => {
                broken = Some(why);
                break;
            }
        }
    }
    if let Some(why) = broken {
        tracing::error!(error = %why, "store write failed; the group is aborted");
        let why = format!("write failed: {why}");
        drop(txn);
        for p in pending {
            p.fail(&why);
        }
        for op in rest {
            op.fail(&why);
        }
        drop(db);
        reopen(shared);
        return;
    }
    match txn.commit() {
        Ok(()) => {
            if let Some(rev) = new_revision {
                shared.revision.send_replace(rev);
            }
            for p in pending {
                p.deliver();
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed; reopening the database");
            let why = format!("commit failed: {e}");
            for p in pending {
                p.fail(&why);
            }
            drop(db);
            reopen(shared);
        }
    }
}

fn current_or_reopen(shared: &Shared) -> Result<Arc<Database>, String> {
    if let Ok(db) = shared.db() {
        return Ok(db);
    }
    reopen(shared);
    shared.db().map_err(|e| e.0)
}

/// Drops the (poisoned) handle and opens the file again. redb refuses a second handle on the same
/// file, so readers' clones are waited for, bounded by `REOPEN_WAIT`.
fn reopen(shared: &Shared) {
    let old = shared.db.write().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(mut arc) = old {
        let deadline = Instant::now() + REOPEN_WAIT;
        loop {
            match Arc::try_unwrap(arc) {
                Ok(db) => {
                    drop(db);
                    break;
                }
                Err(still_shared) => {
                    if Instant::now() >= deadline {
                        tracing::warn!("readers still hold the old database handle");
                        drop(still_shared);
                        break;
                    }
                    arc = still_shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    match Database::create(&shared.path) {
        Ok(db) => {
            tracing::info!(path = %shared.path.display(), "store reopened");
            *shared.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot reopen the store; writes fail until it can");
        }
    }
}

fn meta_get(txn: &WriteTransaction, key: &str) -> Result<u64, Broken> {
    let meta = txn.open_table(META)?;
    Ok(meta.get(key)?.map(|g| g.value()).unwrap_or(0))
}

fn meta_set(txn: &WriteTransaction, key: &str, v: u64) -> Result<(), Broken> {
    let mut meta = txn.open_table(META)?;
    meta.insert(key, v)?;
    Ok(())
}

type Applied<T, E> = Result<Result<T, E>, Broken>;

fn apply_master(
    txn: &WriteTransaction,
    changes: &[MasterChange],
) -> Applied<MasterApplied, UpsertMasterError> {
    let invalid: Vec<_> = changes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.validate().err().map(|e| (i, e)))
        .collect();
    if !invalid.is_empty() {
        return Ok(Err(UpsertMasterError::Invalid(invalid)));
    }
    let mut rev = meta_get(txn, META_REVISION)?;
    {
        let mut log = txn.open_table(CHANGES)?;
        let mut prices = txn.open_table(PRICES)?;
        let mut atp = txn.open_table(ATP)?;
        let mut customers = txn.open_table(CUSTOMERS)?;
        for change in changes {
            rev += 1;
            log.insert(rev, encode(change).as_slice())?;
            match change {
                MasterChange::Price(p) => {
                    let key = (p.sku.as_str(), p.customer.as_deref().unwrap_or(""));
                    prices.insert(key, encode(p).as_slice())?;
                }
                MasterChange::Atp(a) => {
                    atp.insert((a.sku.as_str(), a.site.as_str()), a.available)?;
                }
                MasterChange::Customer(c) => {
                    customers.insert(c.id.as_str(), encode(c).as_slice())?;
                }
            }
        }
    }
    meta_set(txn, META_REVISION, rev)?;
    Ok(Ok(MasterApplied {
        revision: rev,
        changes: changes.len(),
    }))
}

fn apply_ingest(
    txn: &WriteTransaction,
    site: &str,
    events: &[EventEnvelope],
    now_ms: i64,
) -> Applied<IngestOutcome, IngestBatchError> {
    let hwm = {
        let t = txn.open_table(SITE_HWM)?;
        t.get(site)?.map(|g| g.value()).unwrap_or(0)
    };
    let plan = match plan_ingest(site, hwm, events) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e.into())),
    };
    let fresh = &events[plan.duplicates..];
    if !fresh.is_empty() {
        let mut cursor = meta_get(txn, META_NEXT_CURSOR)?.max(1);
        {
            let mut t = txn.open_table(EVENTS)?;
            for e in fresh {
                t.insert(cursor, encode(&(site, e)).as_slice())?;
                cursor += 1;
            }
        }
        meta_set(txn, META_NEXT_CURSOR, cursor)?;
        let mut t = txn.open_table(SITE_HWM)?;
        t.insert(site, plan.new_hwm)?;
        touch(txn, site, now_ms)?;
    }
    Ok(Ok(IngestOutcome {
        duplicates: plan.duplicates,
        stored: fresh.len(),
        new_hwm: plan.new_hwm,
    }))
}

fn touch(txn: &WriteTransaction, site: &str, now_ms: i64) -> Result<(), Broken> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::{
        AtpRecord, CustomerRecord, EventBody, Milestone, MilestoneKind, Money, PriceRecord,
    };

    pub(crate) fn ev(site: &str, seq: u64) -> EventEnvelope {
        EventEnvelope {
            site: site.into(),
            seq,
            event_id: format!("{site}-e{seq}"),
            at_ms: 1_700_000_000_000 + seq as i64,
            body: EventBody::Milestone(Milestone {
                shipment_id: "S1".into(),
                milestone: MilestoneKind::Picked,
                scanner_id: "scan-1".into(),
                at: "2026-01-01T00:00:00Z".into(),
            }),
        }
    }

    fn price(sku: &str, customer: Option<&str>, units: i64) -> MasterChange {
        MasterChange::Price(PriceRecord {
            sku: sku.into(),
            customer: customer.map(Into::into),
            unit_price: Money(units),
            currency: "EUR".into(),
        })
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("central.redb")).unwrap()
    }

    async fn close(store: Store) {
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ingest_stores_events_and_hwm_together_and_reingest_stores_nothing() {
        // Goal: the plan is applied as one unit and a re-upload (lost ack) is recognised.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let batch: Vec<_> = (1..=5).map(|s| ev("plant-1", s)).collect();
        let out = store.ingest("plant-1", batch.clone()).await.unwrap();
        assert_eq!(
            out,
            IngestOutcome {
                duplicates: 0,
                stored: 5,
                new_hwm: 5
            }
        );
        assert_eq!(store.site_hwm("plant-1").unwrap(), 5);
        assert_eq!(store.events_after(0, 100).unwrap().len(), 5);

        let again = store.ingest("plant-1", batch).await.unwrap();
        assert_eq!(
            again,
            IngestOutcome {
                duplicates: 5,
                stored: 0,
                new_hwm: 5
            }
        );
        // Overlapping re-upload: 4..=7 stores only 6 and 7.
        let overlap: Vec<_> = (4..=7).map(|s| ev("plant-1", s)).collect();
        let out = store.ingest("plant-1", overlap).await.unwrap();
        assert_eq!(
            out,
            IngestOutcome {
                duplicates: 2,
                stored: 2,
                new_hwm: 7
            }
        );
        let all = store.events_after(0, 100).unwrap();
        let seqs: Vec<u64> = all.iter().map(|e| e.event.seq).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
        assert!(all.iter().all(|e| e.site == "plant-1"));

        // A gap is refused and stores nothing.
        let gap = vec![ev("plant-1", 9)];
        assert!(matches!(
            store.ingest("plant-1", gap).await,
            Err(IngestBatchError::Plan(IngestError::Gap { .. }))
        ));
        // A foreign event is refused and stores nothing.
        let foreign = vec![ev("plant-2", 8)];
        assert!(matches!(
            store.ingest("plant-1", foreign).await,
            Err(IngestBatchError::Plan(IngestError::ForeignSite { .. }))
        ));
        assert_eq!(store.site_hwm("plant-1").unwrap(), 7);
        assert_eq!(store.events_after(0, 100).unwrap().len(), 7);
        close(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn feed_paging_is_stable_and_complete_across_sites() {
        // Goal: paging by cursor returns each event exactly once, in cursor order, whatever the
        // page size, while events from several sites interleave.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        for round in 0..5u64 {
            for site in ["plant-1", "plant-2", "warehouse-1"] {
                let batch: Vec<_> = (round * 3 + 1..=round * 3 + 3)
                    .map(|s| ev(site, s))
                    .collect();
                store.ingest(site, batch).await.unwrap();
            }
        }
        let total = 45;
        for page in [1usize, 7, 45, 100] {
            let mut after = 0;
            let mut seen = Vec::new();
            loop {
                let got = store.events_after(after, page).unwrap();
                if got.is_empty() {
                    break;
                }
                assert!(got.len() <= page);
                for e in &got {
                    assert!(e.cursor > after, "cursor order");
                    after = e.cursor;
                    seen.push((e.site.clone(), e.event.seq));
                }
            }
            assert_eq!(seen.len(), total, "page size {page}");
            let mut dedup = seen.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), total, "duplicates with page size {page}");
            for site in ["plant-1", "plant-2", "warehouse-1"] {
                let seqs: Vec<u64> = seen
                    .iter()
                    .filter(|(s, _)| s == site)
                    .map(|(_, q)| *q)
                    .collect();
                assert_eq!(
                    seqs,
                    (1..=15).collect::<Vec<_>>(),
                    "per-site order for {site}"
                );
            }
        }
        // Same query, same answer.
        assert_eq!(
            store.events_after(10, 5).unwrap(),
            store.events_after(10, 5).unwrap()
        );
        close(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn master_upserts_get_consecutive_revisions_and_update_current_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut rev_rx = store.subscribe_revision();
        assert_eq!(*rev_rx.borrow_and_update(), 0);
        let a = store
            .upsert_master(vec![
                price("BOLT-M8", None, 1200),
                price("BOLT-M8", Some("C1"), 1000),
            ])
            .await
            .unwrap();
        assert_eq!(
            a,
            MasterApplied {
                revision: 2,
                changes: 2
            }
        );
        let b = store
            .upsert_master(vec![
                MasterChange::Atp(AtpRecord {
                    sku: "BOLT-M8".into(),
                    site: "plant-1".into(),
                    available: 40,
                }),
                MasterChange::Customer(CustomerRecord {
                    id: "C1".into(),
                    name: "Acme".into(),
                    credit_limit: Money(10_000_000),
                    on_hold: false,
                }),
                price("BOLT-M8", None, 1300),
            ])
            .await
            .unwrap();
        assert_eq!(
            b,
            MasterApplied {
                revision: 5,
                changes: 3
            }
        );
        assert_eq!(*rev_rx.borrow_and_update(), 5);
        assert_eq!(store.revision().unwrap(), 5);
        let revs: Vec<u64> = store
            .changes_after(0, 100)
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(revs, vec![1, 2, 3, 4, 5]);
        assert_eq!(store.changes_after(3, 1).unwrap()[0].0, 4);
        assert_eq!(
            store.price("BOLT-M8", None).unwrap().unwrap().unit_price,
            Money(1300)
        );
        assert_eq!(
            store
                .price("BOLT-M8", Some("C1"))
                .unwrap()
                .unwrap()
                .unit_price,
            Money(1000)
        );
        assert_eq!(store.atp("BOLT-M8", "plant-1").unwrap(), Some(40));
        assert!(store.customer("C1").unwrap().is_some());

        // An invalid item rejects the whole upsert: nothing written, revision unchanged.
        let bad = store
            .upsert_master(vec![price("OK-1", None, 1), price("bad sku", None, 1)])
            .await;
        match bad {
            Err(UpsertMasterError::Invalid(v)) => assert_eq!(v[0].0, 1),
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert_eq!(store.revision().unwrap(), 5);
        assert!(store.price("OK-1", None).unwrap().is_none());
        close(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_are_group_committed_without_loss() {
        // Goal: many concurrent ops through the one writer each get their own correct answer.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.upsert_master(vec![price(&format!("SKU-{i}"), None, i)])
                    .await
            }));
        }
        let mut revs = Vec::new();
        for t in tasks {
            revs.push(t.await.unwrap().unwrap().revision);
        }
        revs.sort();
        assert_eq!(revs, (1..=64).collect::<Vec<_>>());
        close(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .upsert_master(vec![price("GEAR-12T", None, 145_000)])
            .await
            .unwrap();
        store
            .ingest("plant-1", (1..=3).map(|s| ev("plant-1", s)).collect())
            .await
            .unwrap();
        store.touch_site("warehouse-1").await.unwrap();
        close(store).await;
        // After close, writes are refused rather than lost silently.
        let store = open(&dir);
        assert_eq!(store.revision().unwrap(), 1);
        assert_eq!(store.site_hwm("plant-1").unwrap(), 3);
        assert_eq!(store.events_after(0, 10).unwrap().len(), 3);
        let sites: Vec<String> = store.sites().unwrap().into_iter().map(|s| s.site).collect();
        assert_eq!(sites, vec!["plant-1", "warehouse-1"]);
        assert_eq!(*store.subscribe_revision().borrow(), 1);
        // New events continue the cursor sequence.
        store
            .ingest("plant-1", vec![ev("plant-1", 4)])
            .await
            .unwrap();
        let cursors: Vec<u64> = store
            .events_after(0, 10)
            .unwrap()
            .iter()
            .map(|e| e.cursor)
            .collect();
        assert_eq!(cursors, vec![1, 2, 3, 4]);
        let closed = store.clone();
        close(store).await;
        assert!(closed.touch_site("x").await.is_err());
    }

    #[test]
    fn a_store_of_another_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("central.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(META_SCHEMA, 99)
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(
            Store::open(&path),
            Err(OpenStoreError::SchemaVersion { found: 99, .. })
        ));
    }
}
