//! The agent's durable store (redb): master-data cache, allowances, outbox, order, idempotency
//! and milestone records. Blocking I/O side: every write goes through one dedicated writer thread that groups
//! concurrent operations into one durable transaction (group commit) and answers each operation
//! only after that transaction committed; reads run directly on the caller's thread.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_protocol::{
    AllowanceReturn, CustomerRecord, ErpStatus, EventBody, EventEnvelope, LinePromise,
    MAX_ORDER_LINES, MAX_QTY, MasterBatch, MasterChange, Milestone, MilestoneKind, Money, Order,
    OrderLine, Pool, SitePool, validate_id, validate_text,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::capture;

/// Version of the table layout below. Bumped on any incompatible change; an agent refuses to open
/// a store written with another version instead of misreading it.
pub const SCHEMA_VERSION: u64 = 3;
/// Depth of the queue in front of the writer thread. When it is full, callers wait (the HTTP
/// request is simply slower); 4,096 is ~16 full groups, far more than a 2-core box produces
/// while one fsync is in flight.
pub const WRITE_QUEUE_DEPTH: usize = 4096;
/// Most operations committed in one transaction. Larger groups add latency for the first caller
/// and copy-on-write work, with little gain past a few hundred (see performance.md §4.2).
pub const MAX_GROUP: usize = 256;
/// Most events waiting in the outbox. Past this the agent refuses new writes (503) rather than
/// filling the disk: about 1.5 GB at 300 bytes an event, weeks of a busy site's traffic. Counts
/// unacknowledged events only: acknowledged ones kept for a restored central are bounded on their
/// own by `[outbox] retain_acked_max_events` (at most `MAX_RETAIN_ACKED_EVENTS`).
pub const MAX_OUTBOX_EVENTS: u64 = 5_000_000;
/// Default `[outbox] retain_acked_secs`: acknowledged events are kept a week, longer than the
/// usual time between central's backup and a restore from it being decided on.
pub const DEFAULT_RETAIN_ACKED_SECS: u64 = 7 * 24 * 3600;
/// Default `[outbox] retain_acked_max_events`: a million events (~300 MB at 300 bytes an event)
/// covers a week of a busy site while keeping the retained rows a fraction of the outbox limit.
pub const DEFAULT_RETAIN_ACKED_EVENTS: u64 = 1_000_000;
/// Largest accepted `retain_acked_secs`: a year. Older backups are not restored in practice.
pub const MAX_RETAIN_ACKED_SECS: u64 = 365 * 24 * 3600;
/// Largest accepted `retain_acked_max_events`: the disk taken by retained events stays within
/// what the outbox limit already allows for unacknowledged ones.
pub const MAX_RETAIN_ACKED_EVENTS: u64 = MAX_OUTBOX_EVENTS;
/// Most acknowledged rows pruned in one write transaction (shared by every ack and prune of a
/// group). A huge backlog acknowledged at once (or a lowered retention) is pruned over several
/// transactions instead of one that copies half the table; 10,000 rows keep a commit in the
/// milliseconds on an edge box.
pub const MAX_PRUNE_PER_STEP: usize = 10_000;
/// How often `run_pruner` removes acknowledged events past their retention when no ack does it
/// (a quiet site): age-based retention needs nothing finer than a minute.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// How often the writer tries to reopen the database after a failed commit before giving up
/// until the next group.
const REOPEN_ATTEMPTS: u32 = 20;
/// Pause between reopen attempts: readers may still hold the old handle for a moment.
const REOPEN_PAUSE: Duration = Duration::from_millis(25);
/// Most allowances listed by `allowances()`: one per SKU stocked and per customer, so a site has
/// hundreds to a few thousand; the cap bounds one response should central ever grant many more.
pub const MAX_ALLOWANCES_LISTED: usize = 10_000;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (sku, customer id or "" for the list price) → postcard `PriceValue`.
const PRICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("prices");
/// sku → available quantity at this site.
const ATP: TableDefinition<&str, i64> = TableDefinition::new("atp");
/// `Pool::key()` (`atp:SKU`, `credit:CUSTOMER`) → what remains of this site's allowance.
const ALLOWANCES: TableDefinition<&str, i64> = TableDefinition::new("allowances");
/// customer id → postcard `CustomerRecord`.
const CUSTOMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
/// seq → postcard `EventEnvelope`. Rows above `acked_seq` are the unacknowledged outbox; rows at
/// or below it are acknowledged events retained for a restored central (`Retention`). The rows
/// held are always one contiguous run from the first key to `last_seq`: pruning only removes
/// the oldest row, so a rewind needs only the first key to know what is held.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// order id → postcard `OrderRecord`; kept after the ack so the order can still be read.
const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
/// Idempotency-Key → postcard `IdemRecord`.
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// milestone event id → postcard `MilestoneRecord`.
const MILESTONES: TableDefinition<&str, &[u8]> = TableDefinition::new("milestones");

const K_SCHEMA: &str = "schema_version";
const K_MASTER_REV: &str = "master_rev";
const K_LAST_SEQ: &str = "last_seq";
const K_ACKED_SEQ: &str = "acked_seq";
/// When the last master batch was applied, in ms since the epoch (0: never).
const K_AS_OF: &str = "as_of_ms";
/// Incarnation of central's store named by the last Welcome (0: none yet).
const K_CENTRAL_INCARNATION: &str = "central_incarnation";

/// How long acknowledged events stay in the outbox (`[outbox] retain_acked_*`), so that a central
/// restored from a backup can take them again. A row is kept while both bounds allow it; 0 in
/// either keeps none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Acknowledged events stored (`at_ms`) longer ago than this are pruned.
    pub max_age_secs: u64,
    /// Only the newest this many acknowledged events are kept.
    pub max_events: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age_secs: DEFAULT_RETAIN_ACKED_SECS,
            max_events: DEFAULT_RETAIN_ACKED_EVENTS,
        }
    }
}

impl Retention {
    /// Keeps no acknowledged event (the behaviour before retention existed).
    pub const NONE: Retention = Retention {
        max_age_secs: 0,
        max_events: 0,
    };

    /// Whether the row `seq`, stored at `at_ms` (`None`: unreadable), is past its retention once
    /// central acknowledged everything through `acked`. Unacknowledged rows never are.
    pub fn expired(&self, seq: u64, at_ms: Option<i64>, acked: u64, now_ms: i64) -> bool {
        self.expired_by_seq(seq, acked) || (seq <= acked && self.expired_by_age(at_ms, now_ms))
    }

    /// What can be decided from the seq alone: acknowledged, and beyond the newest `max_events`
    /// (or nothing is retained at all).
    fn expired_by_seq(&self, seq: u64, acked: u64) -> bool {
        seq <= acked
            && (self.max_events == 0 || self.max_age_secs == 0 || acked - seq >= self.max_events)
    }

    /// Stored longer ago than `max_age_secs`. An unreadable row can never be resent correctly:
    /// keeping it would only hold space.
    fn expired_by_age(&self, at_ms: Option<i64>, now_ms: i64) -> bool {
        let Some(at_ms) = at_ms else { return true };
        let max_age_ms = i64::try_from(self.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        now_ms.saturating_sub(at_ms) > max_age_ms
    }
}

/// A price as cached: the amount and its currency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriceValue {
    pub unit_price: Money,
    pub currency: String,
}

/// An order as submitted to the API, before validation and pricing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewOrder {
    pub customer_id: String,
    pub lines: Vec<NewLine>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewLine {
    pub sku: String,
    pub qty: i64,
}

/// An order as stored and returned by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub order: Order,
    pub seq: u64,
    pub at_ms: i64,
    /// Why each line got its promise, in line order; stored so a retry reads the same words.
    pub reasons: Vec<String>,
    /// The ERP's decision, once central has sent it down (`None` until then).
    pub erp_status: Option<ErpStatus>,
    pub erp_reason: Option<String>,
    /// W3C trace id the order was recorded under (also in its outbox envelope); a retry of the
    /// request returns this one, not the retry's.
    pub trace_id: String,
}

impl OrderRecord {
    pub fn created_at(&self) -> String {
        rfc3339_millis(self.at_ms)
    }
}

/// The wall clock in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC (`2026-11-26T10:00:00.123Z`).
pub fn rfc3339_millis(at_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// A shipment milestone as submitted to the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewMilestone {
    pub event_id: String,
    pub shipment_id: String,
    pub milestone: MilestoneKind,
    pub scanner_id: String,
    pub at: String,
}

/// A milestone as stored: the request and the seq it was given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MilestoneRecord {
    pub request: NewMilestone,
    pub seq: u64,
    /// W3C trace id the milestone was recorded under (also in its outbox envelope).
    pub trace_id: String,
}

#[derive(Serialize, Deserialize)]
struct IdemRecord {
    /// Canonical encoding of the request the key was first used with.
    fingerprint: Vec<u8>,
    order_id: String,
}

/// Whether a write created something or found the identical earlier request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T> {
    Created(T),
    Existing(T),
}

impl<T> Outcome<T> {
    pub fn into_inner(self) -> T {
        match self {
            Outcome::Created(t) | Outcome::Existing(t) => t,
        }
    }

    pub fn is_created(&self) -> bool {
        matches!(self, Outcome::Created(_))
    }
}

/// Why a write was refused or failed. Every variant but `Unavailable` means nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Validation(String),
    #[error("unknown customer {0:?}")]
    UnknownCustomer(String),
    #[error("unknown SKU {0:?}")]
    UnknownSku(String),
    #[error("SKU {sku:?} has no list price and no price for customer {customer:?}")]
    NoPrice { sku: String, customer: String },
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("event id {0:?} was already used for a different milestone")]
    EventIdReused(String),
    #[error("the outbox holds {0} events, the most allowed; writes resume as central catches up")]
    OutboxFull(u64),
    #[error("master batch refused: {0}")]
    BadMasterBatch(String),
    #[error("central acknowledged seq {through} but the last local seq is {last}")]
    AckBeyondLast { through: u64, last: u64 },
    #[error("cannot rewind the acked mark forward, from {acked} to {to}")]
    RewindForward { to: u64, acked: u64 },
    #[error(
        "cannot rewind the acked mark from {acked} to {to}: the oldest event held is seq \
         {retained_from}, events before it were pruned ([outbox] retain_acked_secs and \
         retain_acked_max_events)"
    )]
    NotRetained {
        to: u64,
        acked: u64,
        retained_from: u64,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Why a read failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is already open (is another agent running on this data directory?)")]
    AlreadyOpen { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: redb::Error },
    #[error("{path} has schema version {found}, this agent reads version {SCHEMA_VERSION}")]
    SchemaVersion { path: PathBuf, found: u64 },
    #[error("cannot start the store writer thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot read the store: {0}")]
    Read(String),
}

/// The counters and marks shown by `GET /v1/health` and sent in the Hello, read in one
/// transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    pub master_rev: u64,
    pub last_seq: u64,
    pub acked_seq: u64,
    /// Lowest seq still held in the outbox, acknowledged or not; `last_seq + 1` when none is.
    pub retained_from_seq: u64,
    /// Incarnation of central's store named by the last Welcome (0: none yet).
    pub central_incarnation: u64,
}

impl Marks {
    /// Events not yet acknowledged by central (retained acknowledged ones are not counted).
    pub fn outbox_depth(&self) -> u64 {
        self.last_seq.saturating_sub(self.acked_seq)
    }

    /// Acknowledged events still held for a restored central.
    pub fn retained_acked(&self) -> u64 {
        (self.acked_seq + 1).saturating_sub(self.retained_from_seq)
    }
}

/// What one prune step removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Acknowledged rows deleted.
    pub rows: u64,
    /// The step stopped at `MAX_PRUNE_PER_STEP` with expired rows left: prune again.
    pub more: bool,
}

/// What adopting the incarnation named by a Welcome did (`Store::adopt_central_incarnation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncarnationChange {
    /// The same incarnation as before: nothing changed.
    Unchanged,
    /// None was recorded yet: it is now, nothing else changed.
    First,
    /// Central's store was replaced (restored from a backup): every allowance was dropped to 0
    /// and the applied master revision set to central's `master_from_rev`.
    Changed {
        previous: u64,
        /// Allowance rows that were above 0, and what they held summed per pool kind.
        allowances_dropped: u64,
        atp_dropped: i64,
        credit_dropped: i64,
        master_rev_before: u64,
    },
}

/// The outbox at a glance (heartbeat signals): see `Store::outbox_summary`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxSummary {
    pub events: u64,
    pub bytes: u64,
    /// `at_ms` of the oldest unacknowledged event; `None` when the outbox is empty.
    pub oldest_at_ms: Option<i64>,
}

/// What `GET /v1/atp/{sku}` shows: the site's allowance and the ERP's figure for the SKU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtpView {
    /// Remaining allowance of the SKU at this site (0 if central never granted any).
    pub allowance: i64,
    /// The ERP's last ATP figure for this SKU at this site, if central ever sent one.
    pub erp_available: Option<i64>,
    pub master_rev: u64,
    /// When the last master batch was applied (ms since the epoch), if ever.
    pub as_of_ms: Option<i64>,
}

/// Writer statistics, for tests and diagnostics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Operations answered (whatever their result).
    pub ops: AtomicU64,
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Groups that failed as a whole (storage error or failed commit).
    pub failed_groups: AtomicU64,
    /// Database reopens after a failure.
    pub reopens: AtomicU64,
}

enum Op {
    CreateOrder {
        key: String,
        order: NewOrder,
        at_ms: i64,
        offline: bool,
        trace_id: Option<String>,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    RecordMilestone {
        milestone: NewMilestone,
        at_ms: i64,
        trace_id: Option<String>,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    ApplyMaster {
        batch: MasterBatch,
        at_ms: i64,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    MarkAcked {
        through: u64,
        now_ms: i64,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    Prune {
        now_ms: i64,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    RewindAcked {
        to: u64,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    AdoptIncarnation {
        incarnation: u64,
        master_from_rev: u64,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    Shutdown,
}

enum Reply {
    Order(Outcome<OrderRecord>),
    Milestone(Outcome<MilestoneRecord>),
    Master(bool),
    Acked(u64),
    Pruned(Pruned),
    Rewound(u64),
    Incarnation(IncarnationChange),
}

/// Opens the database file (and prepares its tables); called at start and after a failure.
type Opener = Box<dyn Fn() -> Result<Database, OpenStoreError> + Send + Sync>;

struct Shared {
    opener: Opener,
    site: String,
    retention: Retention,
    /// `None` while the writer reopens the database after a failure; readers then get
    /// `Unavailable`. An `Arc` so that a reader's handle outlives a swap without blocking it.
    db: RwLock<Option<Arc<Database>>>,
    /// Woken after a commit that added outbox events.
    new_events: Notify,
    /// The applied master revision, published after each commit that moved it.
    master_rev: watch::Sender<u64>,
    stats: WriterStats,
}

/// Handle to the store: cheap to clone; reads run on the caller, writes go to the writer thread.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

/// Owns the writer thread; `shutdown` stops it after the operations already queued.
pub struct StoreWriter {
    tx: mpsc::Sender<Op>,
    handle: std::thread::JoinHandle<()>,
}

fn storage<E: std::fmt::Display>(e: E) -> ReadError {
    ReadError::Unavailable(e.to_string())
}

fn corrupt<E: std::fmt::Display>(e: E) -> ReadError {
    ReadError::Corrupt(e.to_string())
}

impl Store {
    /// Opens (or creates) the store at `path` for site `site` and starts the writer thread;
    /// acknowledged events are retained by the default `Retention`.
    pub fn open(path: &Path, site: &str) -> Result<(Store, StoreWriter), OpenStoreError> {
        Self::open_with_retention(path, site, Retention::default())
    }

    /// `open`, retaining acknowledged events by `retention` (`[outbox]` in the config).
    pub fn open_with_retention(
        path: &Path,
        site: &str,
        retention: Retention,
    ) -> Result<(Store, StoreWriter), OpenStoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| OpenStoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let path = path.to_path_buf();
        Self::open_with(site, retention, Box::new(move || open_db(&path)))
    }

    /// Opens the store on a custom redb storage backend (simulated disks that lose unsynced
    /// writes, in tests). `make` is called again whenever the writer reopens the database;
    /// `name` only names the store in errors.
    pub fn open_on_backend<B, F>(
        site: &str,
        name: &Path,
        make: F,
    ) -> Result<(Store, StoreWriter), OpenStoreError>
    where
        B: redb::StorageBackend,
        F: Fn() -> std::io::Result<B> + Send + Sync + 'static,
    {
        let name = name.to_path_buf();
        Self::open_with(
            site,
            Retention::default(),
            Box::new(move || {
                let open_err = |source: redb::Error| OpenStoreError::Open {
                    path: name.clone(),
                    source,
                };
                let backend = make().map_err(|e| open_err(redb::StorageError::from(e).into()))?;
                let db = Database::builder()
                    .create_with_backend(backend)
                    .map_err(|e| open_err(e.into()))?;
                prepare_db(db, &name)
            }),
        )
    }

    /// `open` with a custom opener (tests inject storage faults through it).
    fn open_with(
        site: &str,
        retention: Retention,
        opener: Opener,
    ) -> Result<(Store, StoreWriter), OpenStoreError> {
        let db = opener()?;
        let rev = read_meta(&db, K_MASTER_REV).map_err(|e| OpenStoreError::Read(e.to_string()))?;
        let shared = Arc::new(Shared {
            opener,
            site: site.to_string(),
            retention,
            db: RwLock::new(Some(Arc::new(db))),
            new_events: Notify::new(),
            master_rev: watch::Sender::new(rev),
            stats: WriterStats::default(),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(writer_shared, rx))
            .map_err(OpenStoreError::Thread)?;
        Ok((
            Store {
                shared,
                tx: tx.clone(),
            },
            StoreWriter { tx, handle },
        ))
    }

    pub fn site(&self) -> &str {
        &self.shared.site
    }

    pub fn stats(&self) -> &WriterStats {
        &self.shared.stats
    }

    /// How long acknowledged events are kept.
    pub fn retention(&self) -> Retention {
        self.shared.retention
    }

    /// Woken (one permit) after each commit that added outbox events.
    pub fn new_events(&self) -> &Notify {
        &self.shared.new_events
    }

    /// Follows the applied master revision (updated only after the commit that applied it).
    pub fn master_rev_watch(&self) -> watch::Receiver<u64> {
        self.shared.master_rev.subscribe()
    }

    fn db(&self) -> Result<Arc<Database>, ReadError> {
        let slot = self
            .shared
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.clone()
            .ok_or_else(|| ReadError::Unavailable("the database is being reopened".into()))
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction, ReadError> {
        self.db()?.begin_read().map_err(storage)
    }

    async fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Reply, WriteError>>) -> Op,
    ) -> Result<Reply, WriteError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || WriteError::Unavailable("the store writer has stopped".into());
        self.tx.send(make(reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Stores an order under an idempotency key, confirming the lines the site's allowances cover
    /// and consuming them in the same transaction, or returns the order first stored under the
    /// key (consuming nothing more). `offline`: the site was not connected to central.
    pub async fn create_order(
        &self,
        key: &str,
        order: NewOrder,
        at_ms: i64,
        offline: bool,
    ) -> Result<Outcome<OrderRecord>, WriteError> {
        self.create_order_traced(key, order, at_ms, offline, None)
            .await
    }

    /// `create_order` under the request's W3C trace id (`None`: one derived from the event's
    /// identity). The trace id is not part of the idempotency fingerprint: a retry under another
    /// trace is the same request and gets the original order, trace id included.
    pub async fn create_order_traced(
        &self,
        key: &str,
        order: NewOrder,
        at_ms: i64,
        offline: bool,
        trace_id: Option<String>,
    ) -> Result<Outcome<OrderRecord>, WriteError> {
        let key = key.to_string();
        match self
            .submit(|reply| Op::CreateOrder {
                key,
                order,
                at_ms,
                offline,
                trace_id,
                reply,
            })
            .await?
        {
            Reply::Order(o) => Ok(o),
            _ => Err(mismatch()),
        }
    }

    /// Stores a milestone, or returns the one stored earlier under the same event id.
    pub async fn record_milestone(
        &self,
        milestone: NewMilestone,
        at_ms: i64,
    ) -> Result<Outcome<MilestoneRecord>, WriteError> {
        self.record_milestone_traced(milestone, at_ms, None).await
    }

    /// `record_milestone` under the request's W3C trace id (`None`: one derived from the event's
    /// identity); a retry gets the original trace id.
    pub async fn record_milestone_traced(
        &self,
        milestone: NewMilestone,
        at_ms: i64,
        trace_id: Option<String>,
    ) -> Result<Outcome<MilestoneRecord>, WriteError> {
        match self
            .submit(|reply| Op::RecordMilestone {
                milestone,
                at_ms,
                trace_id,
                reply,
            })
            .await?
        {
            Reply::Milestone(m) => Ok(m),
            _ => Err(mismatch()),
        }
    }

    /// Applies a master batch and its revision in one transaction, now. `Ok(false)`: the batch
    /// was stale (`through_rev` not above the applied revision) and changed nothing.
    pub async fn apply_master(&self, batch: MasterBatch) -> Result<bool, WriteError> {
        self.apply_master_at(batch, now_ms()).await
    }

    /// `apply_master`, recording `at_ms` as the time of the data (`as_of`).
    pub async fn apply_master_at(
        &self,
        batch: MasterBatch,
        at_ms: i64,
    ) -> Result<bool, WriteError> {
        match self
            .submit(|reply| Op::ApplyMaster {
                batch,
                at_ms,
                reply,
            })
            .await?
        {
            Reply::Master(applied) => Ok(applied),
            _ => Err(mismatch()),
        }
    }

    /// Records that central committed every event through `through`: moves `acked_seq` (never
    /// back) and prunes acknowledged rows past their retention, at most `MAX_PRUNE_PER_STEP` per
    /// transaction (the rest at the next ack or prune). Returns the acked mark afterwards.
    pub async fn mark_acked(&self, through: u64) -> Result<u64, WriteError> {
        self.mark_acked_at(through, now_ms()).await
    }

    /// `mark_acked`, judging the age of retained events against `now_ms`.
    pub async fn mark_acked_at(&self, through: u64, now_ms: i64) -> Result<u64, WriteError> {
        match self
            .submit(|reply| Op::MarkAcked {
                through,
                now_ms,
                reply,
            })
            .await?
        {
            Reply::Acked(a) => Ok(a),
            _ => Err(mismatch()),
        }
    }

    /// One bounded step of pruning acknowledged rows past their retention (see `run_pruner`).
    pub async fn prune_acked(&self) -> Result<Pruned, WriteError> {
        self.prune_acked_at(now_ms()).await
    }

    /// `prune_acked`, judging ages against `now_ms`.
    pub async fn prune_acked_at(&self, now_ms: i64) -> Result<Pruned, WriteError> {
        match self.submit(|reply| Op::Prune { now_ms, reply }).await? {
            Reply::Pruned(p) => Ok(p),
            _ => Err(mismatch()),
        }
    }

    /// Sets `acked_seq` back to `to`, so that events `to+1..=acked_seq` are uploaded again (to a
    /// central restored from a backup, whose mark is `to`). Refused with `NotRetained` unless
    /// every one of those rows is still held, and with `RewindForward` if `to` is above the mark.
    /// Returns the mark before the rewind.
    pub async fn rewind_acked(&self, to: u64) -> Result<u64, WriteError> {
        match self.submit(|reply| Op::RewindAcked { to, reply }).await? {
            Reply::Rewound(from) => Ok(from),
            _ => Err(mismatch()),
        }
    }

    /// Records the incarnation of central's store named by a Welcome. When one was recorded
    /// before and differs, central's store was replaced (restored from a backup) and may not know
    /// the grants this site holds: in the same transaction every allowance drops to 0 and the
    /// applied master revision becomes `master_from_rev` (central resends from there). Must run
    /// before any master batch of the session is applied.
    pub async fn adopt_central_incarnation(
        &self,
        incarnation: u64,
        master_from_rev: u64,
    ) -> Result<IncarnationChange, WriteError> {
        match self
            .submit(|reply| Op::AdoptIncarnation {
                incarnation,
                master_from_rev,
                reply,
            })
            .await?
        {
            Reply::Incarnation(c) => Ok(c),
            _ => Err(mismatch()),
        }
    }

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

/// Prunes acknowledged events past their retention every `every` (`PRUNE_INTERVAL` in the
/// agent), step after step while a step reports more, until `shutdown` turns true. Acks prune
/// too; this covers a quiet site, whose retained events age without any ack. A failed step is
/// logged and retried at the next tick (the writer reopens the store by itself).
pub async fn run_pruner(store: Store, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            match store.prune_acked().await {
                Ok(p) => {
                    if p.rows > 0 {
                        tracing::debug!(rows = p.rows, more = p.more, "acknowledged events pruned");
                    }
                    if !p.more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning acknowledged events failed");
                    break;
                }
            }
        }
    }
}

fn as_of(ms: u64) -> Option<i64> {
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

/// The pools an order draws on: the ATP of each of its SKUs and the customer's credit.
fn order_pools(customer: &str, lines: &[OrderLine]) -> Vec<Pool> {
    let mut pools: Vec<Pool> = lines.iter().map(|l| Pool::atp(&l.sku)).collect();
    pools.push(Pool::credit(customer));
    pools.sort();
    pools.dedup();
    pools
}

fn read_meta_in(txn: &redb::ReadTransaction, k: &str) -> Result<u64, ReadError> {
    let meta = txn.open_table(META).map_err(storage)?;
    Ok(meta
        .get(k)
        .map_err(storage)?
        .map(|g| g.value())
        .unwrap_or(0))
}

fn read_meta(db: &Database, k: &str) -> Result<u64, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let meta = txn.open_table(META).map_err(|e| e.to_string())?;
    Ok(meta
        .get(k)
        .map_err(|e| e.to_string())?
        .map(|g| g.value())
        .unwrap_or(0))
}

fn mismatch() -> WriteError {
    WriteError::Unavailable(
        "internal error: the writer answered with another operation's result".into(),
    )
}

impl StoreWriter {
    /// Stops the writer after every operation queued so far, closes the database and waits for
    /// the thread. Operations submitted afterwards fail with `Unavailable`.
    pub async fn shutdown(self) {
        let _ = self.tx.send(Op::Shutdown).await;
        drop(self.tx);
        let handle = self.handle;
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
}

/// redb's page cache (its default is 1 GiB). The agent's RSS is mostly this cache plus the
/// process itself; hot master data and the outbox's tail fit, and pages beyond it are read from
/// the OS page cache (a few µs).
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

fn open_db(path: &Path) -> Result<Database, OpenStoreError> {
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
fn prepare_db(db: Database, path: &Path) -> Result<Database, OpenStoreError> {
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

/// Failure of one operation inside a group: a refusal (nothing written, the rest of the group
/// goes on) or a storage failure (the whole group is abandoned).
enum Fail {
    Reject(WriteError),
    Storage(String),
}

impl From<redb::StorageError> for Fail {
    fn from(e: redb::StorageError) -> Self {
        Fail::Storage(e.to_string())
    }
}

impl From<postcard::Error> for Fail {
    /// Stored records are only decoded while an operation checks its inputs, before it writes,
    /// so a corrupt record fails that operation alone (retrying or reopening cannot fix it).
    fn from(e: postcard::Error) -> Self {
        Fail::Reject(WriteError::Corrupt(e.to_string()))
    }
}

impl From<WriteError> for Fail {
    fn from(e: WriteError) -> Self {
        Fail::Reject(e)
    }
}

/// Every table, opened once per group.
struct Tables<'txn> {
    meta: Table<'txn, &'static str, u64>,
    prices: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    atp: Table<'txn, &'static str, i64>,
    allowances: Table<'txn, &'static str, i64>,
    customers: Table<'txn, &'static str, &'static [u8]>,
    outbox: Table<'txn, u64, &'static [u8]>,
    orders: Table<'txn, &'static str, &'static [u8]>,
    idempotency: Table<'txn, &'static str, &'static [u8]>,
    milestones: Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
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

    fn meta(&self, k: &str) -> Result<u64, Fail> {
        Ok(self.meta.get(k)?.map(|g| g.value()).unwrap_or(0))
    }

    /// The next sequence number, refusing when the outbox is full.
    fn next_seq(&self) -> Result<u64, Fail> {
        let last = self.meta(K_LAST_SEQ)?;
        let acked = self.meta(K_ACKED_SEQ)?;
        let depth = last.saturating_sub(acked);
        if depth >= MAX_OUTBOX_EVENTS {
            return Err(WriteError::OutboxFull(depth).into());
        }
        Ok(last + 1)
    }

    fn pool(&self, pool: &Pool) -> Result<SitePool, Fail> {
        let remaining = self
            .allowances
            .get(pool.key().as_str())?
            .map(|g| g.value())
            .unwrap_or(0);
        Ok(SitePool { remaining })
    }

    fn set_pool(&mut self, pool: &Pool, p: SitePool) -> Result<(), Fail> {
        self.allowances.insert(pool.key().as_str(), p.remaining)?;
        Ok(())
    }

    fn append_event(&mut self, env: &EventEnvelope) -> Result<(), Fail> {
        let bytes = postcard::to_allocvec(env)?;
        self.outbox.insert(env.seq, bytes.as_slice())?;
        self.meta.insert(K_LAST_SEQ, env.seq)?;
        Ok(())
    }
}

fn lookup_price<T: ReadableTable<(&'static str, &'static str), &'static [u8]>>(
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
fn sku_known(t: &Tables<'_>, sku: &str) -> Result<bool, Fail> {
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

/// Shape checks on an order; domain checks (customer, prices) need the tables.
pub fn validate_new_order(o: &NewOrder) -> Result<(), WriteError> {
    let v = |e: outpost_protocol::ValidationError| WriteError::Validation(e.to_string());
    validate_id("customer_id", &o.customer_id).map_err(v)?;
    if o.lines.is_empty() || o.lines.len() > MAX_ORDER_LINES {
        return Err(WriteError::Validation(format!(
            "lines: an order has 1..={MAX_ORDER_LINES} lines, got {}",
            o.lines.len()
        )));
    }
    for (i, l) in o.lines.iter().enumerate() {
        validate_id("sku", &l.sku)
            .map_err(|e| WriteError::Validation(format!("lines[{i}].{e}")))?;
        if !(1..=MAX_QTY).contains(&l.qty) {
            return Err(WriteError::Validation(format!(
                "lines[{i}].qty must be 1..={MAX_QTY}, got {}",
                l.qty
            )));
        }
    }
    Ok(())
}

/// Event id of the `AllowanceReturn` answering reclaim `reclaim_id`.
pub fn return_event_id(site: &str, reclaim_id: u64) -> String {
    format!("{site}-r{reclaim_id}")
}

/// Shape checks on a milestone. Event ids of the form `{site}-o{digits}` and `{site}-r{digits}`
/// are reserved: they are the ids of this site's orders and allowance returns, and event ids are
/// unique per site.
pub fn validate_new_milestone(site: &str, m: &NewMilestone) -> Result<(), WriteError> {
    let v = |e: outpost_protocol::ValidationError| WriteError::Validation(e.to_string());
    validate_id("event_id", &m.event_id).map_err(v)?;
    validate_id("shipment_id", &m.shipment_id).map_err(v)?;
    validate_id("scanner_id", &m.scanner_id).map_err(v)?;
    validate_text("at", &m.at).map_err(v)?;
    if humantime::parse_rfc3339_weak(&m.at).is_err() {
        return Err(WriteError::Validation(format!(
            "at: {:?} is not an RFC 3339 timestamp (e.g. 2026-11-26T10:00:00Z)",
            m.at.chars().take(40).collect::<String>()
        )));
    }
    if let Some(rest) = m
        .event_id
        .strip_prefix(site)
        .and_then(|r| r.strip_prefix("-o").or_else(|| r.strip_prefix("-r")))
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(WriteError::Validation(format!(
            "event_id: {:?} is reserved for this site's order and allowance-return ids",
            m.event_id
        )));
    }
    Ok(())
}

fn create_order(
    t: &mut Tables<'_>,
    site: &str,
    key: &str,
    req: &NewOrder,
    at_ms: i64,
    offline: bool,
    trace_id: Option<&str>,
) -> Result<Outcome<OrderRecord>, Fail> {
    // The fingerprint is the request alone: a retry is the same request whether or not the link
    // was up, and gets the original answer without consuming anything again.
    let fingerprint = postcard::to_allocvec(req)?;
    if let Some(g) = t.idempotency.get(key)? {
        let idem: IdemRecord = postcard::from_bytes(g.value())?;
        if idem.fingerprint != fingerprint {
            return Err(WriteError::IdempotencyKeyReused.into());
        }
        let Some(o) = t.orders.get(idem.order_id.as_str())? else {
            return Err(WriteError::Corrupt(format!(
                "idempotency record points at missing order {}",
                idem.order_id
            ))
            .into());
        };
        return Ok(Outcome::Existing(postcard::from_bytes(o.value())?));
    }
    validate_new_order(req)?;
    let Some(c) = t.customers.get(req.customer_id.as_str())? else {
        return Err(WriteError::UnknownCustomer(req.customer_id.clone()).into());
    };
    let customer: CustomerRecord = postcard::from_bytes(c.value())?;
    drop(c);
    let mut lines = Vec::with_capacity(req.lines.len());
    for l in &req.lines {
        let Some(p) = lookup_price(&t.prices, &l.sku, &req.customer_id)? else {
            return Err(if sku_known(t, &l.sku)? {
                WriteError::NoPrice {
                    sku: l.sku.clone(),
                    customer: req.customer_id.clone(),
                }
            } else {
                WriteError::UnknownSku(l.sku.clone())
            }
            .into());
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
    for pool in order_pools(&req.customer_id, &lines) {
        let p = t.pool(&pool)?;
        pools.insert(pool, p);
    }
    let decided = capture::plan_capture(&req.customer_id, customer.on_hold, &lines, &pools);
    for (l, p) in lines.iter_mut().zip(&decided.promises) {
        l.promise = *p;
    }
    let seq = t.next_seq()?;
    let master_rev = t.meta(K_MASTER_REV)?;
    // Every check passed: from here on the operation only writes.
    for (pool, after) in &decided.consumed {
        t.set_pool(pool, *after)?;
    }
    let order = Order {
        order_id: format!("{site}-o{seq}"),
        customer_id: req.customer_id.clone(),
        status: decided.status.to_string(),
        lines,
        master_rev,
        offline,
    };
    let mut env = EventEnvelope::new(
        site,
        seq,
        &order.order_id,
        at_ms,
        &EventBody::Order(order.clone()),
    );
    if let Some(id) = trace_id {
        env = env.with_trace_id(id);
    }
    tracing::debug!(
        trace_id = %env.trace_id,
        seq,
        event_id = %env.event_id,
        "order added to the outbox transaction"
    );
    let record = OrderRecord {
        order,
        seq,
        at_ms,
        reasons: decided.reasons,
        erp_status: None,
        erp_reason: None,
        trace_id: env.trace_id.clone(),
    };
    t.append_event(&env)?;
    t.orders.insert(
        record.order.order_id.as_str(),
        postcard::to_allocvec(&record)?.as_slice(),
    )?;
    let idem = IdemRecord {
        fingerprint,
        order_id: record.order.order_id.clone(),
    };
    t.idempotency
        .insert(key, postcard::to_allocvec(&idem)?.as_slice())?;
    Ok(Outcome::Created(record))
}

fn record_milestone(
    t: &mut Tables<'_>,
    site: &str,
    req: &NewMilestone,
    at_ms: i64,
    trace_id: Option<&str>,
) -> Result<Outcome<MilestoneRecord>, Fail> {
    if let Some(g) = t.milestones.get(req.event_id.as_str())? {
        let rec: MilestoneRecord = postcard::from_bytes(g.value())?;
        if &rec.request != req {
            return Err(WriteError::EventIdReused(req.event_id.clone()).into());
        }
        return Ok(Outcome::Existing(rec));
    }
    validate_new_milestone(site, req)?;
    let seq = t.next_seq()?;
    let mut env = EventEnvelope::new(
        site,
        seq,
        &req.event_id,
        at_ms,
        &EventBody::Milestone(Milestone {
            shipment_id: req.shipment_id.clone(),
            milestone: req.milestone,
            scanner_id: req.scanner_id.clone(),
            at: req.at.clone(),
        }),
    );
    if let Some(id) = trace_id {
        env = env.with_trace_id(id);
    }
    tracing::debug!(
        trace_id = %env.trace_id,
        seq,
        event_id = %env.event_id,
        "milestone added to the outbox transaction"
    );
    let rec = MilestoneRecord {
        request: req.clone(),
        seq,
        trace_id: env.trace_id.clone(),
    };
    t.append_event(&env)?;
    t.milestones.insert(
        req.event_id.as_str(),
        postcard::to_allocvec(&rec)?.as_slice(),
    )?;
    Ok(Outcome::Created(rec))
}

/// What applying a master batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MasterApplied {
    /// The batch was new (not stale) and its revision is now the applied one.
    applied: bool,
    /// Outbox events were appended (answers to reclaims).
    new_events: bool,
}

fn apply_master(
    t: &mut Tables<'_>,
    site: &str,
    batch: &MasterBatch,
    at_ms: i64,
) -> Result<MasterApplied, Fail> {
    let rev = t.meta(K_MASTER_REV)?;
    if batch.through_rev <= rev {
        return Ok(MasterApplied::default());
    }
    let bad = |m: String| Fail::Reject(WriteError::BadMasterBatch(m));
    if batch.from_rev != rev {
        // A batch must continue exactly at the applied revision. Starting later would skip the
        // changes in between; starting earlier would apply some changes twice, and a grant
        // applied twice is allowance central never escrowed. The session is restarted instead
        // and central resends from the applied revision.
        return Err(bad(format!(
            "batch covers revisions after {} but this site has applied exactly {rev}",
            batch.from_rev
        )));
    }
    if batch.changes.len() > outpost_protocol::MAX_CHANGES_PER_FRAME {
        return Err(bad(format!("{} changes in one batch", batch.changes.len())));
    }
    // Check everything before writing anything, so a bad batch leaves no trace: shapes, and that
    // no grant overflows an allowance.
    let mut granted: BTreeMap<&Pool, i64> = BTreeMap::new();
    for (i, c) in batch.changes.iter().enumerate() {
        c.validate()
            .map_err(|e| bad(format!("change {i} is invalid: {e}")))?;
        if let MasterChange::Grant(g) = c
            && g.site == site
        {
            let have = match granted.get(&g.pool) {
                Some(v) => *v,
                None => t.pool(&g.pool)?.remaining,
            };
            let after = have
                .checked_add(g.qty)
                .ok_or_else(|| bad(format!("change {i}: grant overflows the allowance")))?;
            granted.insert(&g.pool, after);
        }
    }
    let mut new_events = false;
    for c in &batch.changes {
        // Central sends only this site's rows; another site's row would be wrong here.
        if !c.concerns(site) {
            continue;
        }
        match c {
            MasterChange::Price(p) => {
                let v = PriceValue {
                    unit_price: p.unit_price,
                    currency: p.currency.clone(),
                };
                let customer = p.customer.as_deref().unwrap_or("");
                t.prices.insert(
                    (p.sku.as_str(), customer),
                    postcard::to_allocvec(&v)?.as_slice(),
                )?;
            }
            MasterChange::Atp(a) => {
                t.atp.insert(a.sku.as_str(), a.available)?;
            }
            MasterChange::Customer(c) => {
                t.customers
                    .insert(c.id.as_str(), postcard::to_allocvec(c)?.as_slice())?;
            }
            MasterChange::Grant(g) => {
                let mut p = t.pool(&g.pool)?;
                p.handle_grant(g.qty);
                t.set_pool(&g.pool, p)?;
            }
            MasterChange::Reclaim(r) => {
                let mut p = t.pool(&r.pool)?;
                let returned = p.handle_reclaim(r.qty);
                t.set_pool(&r.pool, p)?;
                // The answer is owed whatever the outbox holds (it is tiny and central asks
                // rarely), so it bypasses the outbox limit: refusing it would stall master data.
                let seq = t.meta(K_LAST_SEQ)? + 1;
                let env = EventEnvelope::new(
                    site,
                    seq,
                    &return_event_id(site, r.reclaim_id),
                    at_ms,
                    &EventBody::AllowanceReturn(AllowanceReturn {
                        reclaim_id: r.reclaim_id,
                        pool: r.pool.clone(),
                        qty: returned,
                    }),
                );
                t.append_event(&env)?;
                new_events = true;
                tracing::info!(
                    reclaim_id = r.reclaim_id,
                    pool = %r.pool.key(),
                    asked = r.qty,
                    returned,
                    "allowance reclaimed"
                );
            }
            MasterChange::OrderStatus(o) => set_erp_status(t, o)?,
        }
    }
    t.meta.insert(K_MASTER_REV, batch.through_rev)?;
    t.meta.insert(K_AS_OF, u64::try_from(at_ms).unwrap_or(0))?;
    Ok(MasterApplied {
        applied: true,
        new_events,
    })
}

/// Records the ERP's decision on one of this site's orders. An order this site does not know
/// (one sold through central's own channel for this site, or a record lost to corruption) is
/// logged and skipped: failing here would stop all master data behind it.
fn set_erp_status(t: &mut Tables<'_>, o: &outpost_protocol::OrderStatusUpdate) -> Result<(), Fail> {
    let rec = match t.orders.get(o.order_id.as_str())? {
        Some(g) => postcard::from_bytes::<OrderRecord>(g.value()),
        None => {
            tracing::debug!(order.id = %o.order_id, "order status for an order not taken here");
            return Ok(());
        }
    };
    let mut rec = match rec {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(order.id = %o.order_id, error = %e, "order record is corrupt; status not recorded");
            return Ok(());
        }
    };
    rec.erp_status = Some(o.status);
    rec.erp_reason = o.reason.clone();
    t.orders
        .insert(o.order_id.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
    tracing::info!(order.id = %o.order_id, status = o.status.as_str(), "ERP decision recorded");
    Ok(())
}

/// Moves the acked mark to `through` (never back). Returns the mark afterwards and whether it
/// moved. The rows stay: `prune_acked` removes them once past their retention.
fn mark_acked(t: &mut Tables<'_>, through: u64) -> Result<(u64, bool), Fail> {
    let acked = t.meta(K_ACKED_SEQ)?;
    if through <= acked {
        return Ok((acked, false));
    }
    let last = t.meta(K_LAST_SEQ)?;
    if through > last {
        return Err(WriteError::AckBeyondLast { through, last }.into());
    }
    t.meta.insert(K_ACKED_SEQ, through)?;
    Ok((through, true))
}

/// Deletes acknowledged rows past their retention, oldest first, at most `budget` of them
/// (decremented). Stops at the first row to keep, so the rows held stay one contiguous run: a
/// row older than the age bound behind a younger one (the site's clock stepped back) waits for
/// it. Only storage errors fail it: an unreadable acknowledged row is pruned like an expired one.
fn prune_acked(
    t: &mut Tables<'_>,
    retention: &Retention,
    now_ms: i64,
    budget: &mut usize,
) -> Result<Pruned, redb::StorageError> {
    let acked = t.meta.get(K_ACKED_SEQ)?.map(|g| g.value()).unwrap_or(0);
    let mut rows = 0;
    loop {
        let next = match t.outbox.first()? {
            Some((k, v)) => {
                let seq = k.value();
                // The envelope is decoded only when the seq alone does not decide.
                let expired = seq <= acked
                    && (retention.expired_by_seq(seq, acked) || {
                        let at_ms = postcard::from_bytes::<EventEnvelope>(v.value())
                            .map(|e| e.at_ms)
                            .ok();
                        if at_ms.is_none() {
                            tracing::warn!(seq, "acknowledged outbox row is unreadable; pruned");
                        }
                        retention.expired_by_age(at_ms, now_ms)
                    });
                expired.then_some(seq)
            }
            None => None,
        };
        let Some(seq) = next else {
            return Ok(Pruned { rows, more: false });
        };
        if *budget == 0 {
            return Ok(Pruned { rows, more: true });
        }
        t.outbox.remove(seq)?;
        *budget -= 1;
        rows += 1;
    }
}

/// Sets the acked mark back to `to`, checking that rows `to+1..=acked` are all held. Returns the
/// mark before.
fn rewind_acked(t: &mut Tables<'_>, to: u64) -> Result<u64, Fail> {
    let acked = t.meta(K_ACKED_SEQ)?;
    if to > acked {
        return Err(WriteError::RewindForward { to, acked }.into());
    }
    if to == acked {
        return Ok(acked);
    }
    let last = t.meta(K_LAST_SEQ)?;
    let first = t.outbox.first()?.map(|(k, _)| k.value());
    let retained_from = first.unwrap_or(last + 1);
    // The rows held are one run from the first key to `last_seq`: checked from the other side
    // (the row count) before trusting the first key alone.
    let held = t.outbox.len()?;
    let expected = (last + 1).saturating_sub(retained_from);
    if held != expected {
        return Err(WriteError::Corrupt(format!(
            "the outbox holds {held} rows but seqs {retained_from}..={last} are {expected}"
        ))
        .into());
    }
    if retained_from > to + 1 {
        return Err(WriteError::NotRetained {
            to,
            acked,
            retained_from,
        }
        .into());
    }
    t.meta.insert(K_ACKED_SEQ, to)?;
    Ok(acked)
}

/// See `Store::adopt_central_incarnation`.
fn adopt_incarnation(
    t: &mut Tables<'_>,
    incarnation: u64,
    master_from_rev: u64,
) -> Result<IncarnationChange, Fail> {
    let previous = t.meta(K_CENTRAL_INCARNATION)?;
    if previous == incarnation {
        return Ok(IncarnationChange::Unchanged);
    }
    if previous == 0 {
        t.meta.insert(K_CENTRAL_INCARNATION, incarnation)?;
        return Ok(IncarnationChange::First);
    }
    // Every allowance, however many: the table holds one row per pool granted (hundreds to a
    // few thousand), and a partial reset would leave the site confirming on grants the restored
    // central does not know.
    let mut held = Vec::new();
    for row in t.allowances.iter()? {
        let (k, v) = row?;
        if v.value() != 0 {
            held.push((k.value().to_string(), v.value()));
        }
    }
    let (mut atp_dropped, mut credit_dropped) = (0i64, 0i64);
    for (k, v) in &held {
        match parse_pool_key(k) {
            Some(Pool::Credit { .. }) => credit_dropped = credit_dropped.saturating_add(*v),
            _ => atp_dropped = atp_dropped.saturating_add(*v),
        }
        t.allowances.insert(k.as_str(), 0)?;
    }
    let master_rev_before = t.meta(K_MASTER_REV)?;
    t.meta.insert(K_MASTER_REV, master_from_rev)?;
    t.meta.insert(K_CENTRAL_INCARNATION, incarnation)?;
    Ok(IncarnationChange::Changed {
        previous,
        allowances_dropped: held.len() as u64,
        atp_dropped,
        credit_dropped,
        master_rev_before,
    })
}

type Pending = (
    oneshot::Sender<Result<Reply, WriteError>>,
    Result<Reply, WriteError>,
);

fn run_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Op>) {
    while let Some(first) = rx.blocking_recv() {
        let mut ops = Vec::with_capacity(MAX_GROUP);
        let mut stop = matches!(first, Op::Shutdown);
        if !stop {
            ops.push(first);
        }
        while !stop && ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(Op::Shutdown) => stop = true,
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        if !ops.is_empty() {
            execute_group(&shared, ops);
        }
        if stop {
            break;
        }
    }
    // Operations still queued after a shutdown are dropped: their callers get `Unavailable`.
    rx.close();
    let db = shared
        .db
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(db) = db.and_then(|db| Arc::try_unwrap(db).ok())
        && let Err(e) = db.close()
    {
        tracing::warn!(error = %e, "closing the store failed");
    }
}

fn execute_group(shared: &Shared, ops: Vec<Op>) {
    let n = ops.len() as u64;
    match run_group(shared, ops) {
        Ok(GroupDone {
            pending,
            new_events,
            committed,
            master_rev,
            master_rev_reset,
        }) => {
            if committed {
                shared.stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            // Published before the replies: whoever waits for a revision sees it no later than
            // the caller that applied it.
            if let Some(rev) = master_rev_reset {
                shared.master_rev.send_replace(rev);
            }
            if let Some(rev) = master_rev {
                shared.master_rev.send_if_modified(|cur| {
                    let moved = rev > *cur;
                    if moved {
                        *cur = rev;
                    }
                    moved
                });
            }
            for (reply, result) in pending {
                let _ = reply.send(result);
            }
            if new_events {
                shared.new_events.notify_one();
            }
        }
        Err((replies, reason)) => {
            shared.stats.failed_groups.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %reason, ops = n, "store write failed; every operation in the group gets store_unavailable");
            for reply in replies {
                let _ = reply.send(Err(WriteError::Unavailable(reason.clone())));
            }
            reopen(shared);
        }
    }
    shared.stats.ops.fetch_add(n, Ordering::Relaxed);
}

type GroupFailure = (Vec<oneshot::Sender<Result<Reply, WriteError>>>, String);

/// A group that went through: each operation's result, to be sent now that it is durable.
struct GroupDone {
    pending: Vec<Pending>,
    /// Outbox events were added (the sync task is woken).
    new_events: bool,
    /// A transaction was committed (false when every operation was a refusal or a repeat).
    committed: bool,
    /// The master revision this group applied, if it applied any.
    master_rev: Option<u64>,
    /// The master revision after a change of central's incarnation set it (possibly lower than
    /// before), published as is.
    master_rev_reset: Option<u64>,
}

/// Runs every operation of a group in one write transaction and commits it once. On success,
/// returns each operation's result (to be sent only now, after the commit) and whether outbox
/// events were added; on a storage failure, every reply sender with the reason.
fn run_group(shared: &Shared, ops: Vec<Op>) -> Result<GroupDone, GroupFailure> {
    let mut pending: Vec<Pending> = Vec::with_capacity(ops.len());
    let senders = |pending: Vec<Pending>, rest: Vec<Op>| -> Vec<_> {
        pending
            .into_iter()
            .map(|(s, _)| s)
            .chain(rest.into_iter().filter_map(op_reply))
            .collect()
    };
    let db = match current_db(shared) {
        Some(db) => db,
        None => {
            return Err((
                senders(pending, ops),
                "the database could not be reopened".into(),
            ));
        }
    };
    let mut txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => return Err((senders(pending, ops), e.to_string())),
    };
    if let Err(e) = txn.set_durability(Durability::Immediate) {
        return Err((senders(pending, ops), e.to_string()));
    }
    let mut new_events = false;
    let mut wrote = false;
    let mut master_rev = None;
    let mut master_rev_reset = None;
    // Shared by every ack and prune of the group: one transaction prunes a bounded number.
    let mut prune_budget = MAX_PRUNE_PER_STEP;
    {
        let mut tables = match Tables::open(&txn) {
            Ok(t) => t,
            Err(e) => return Err((senders(pending, ops), e.to_string())),
        };
        let mut iter = ops.into_iter();
        while let Some(op) = iter.next() {
            let (reply, result) = match op {
                Op::CreateOrder {
                    key,
                    order,
                    at_ms,
                    offline,
                    trace_id,
                    reply,
                } => {
                    let r = create_order(
                        &mut tables,
                        &shared.site,
                        &key,
                        &order,
                        at_ms,
                        offline,
                        trace_id.as_deref(),
                    );
                    if matches!(r, Ok(Outcome::Created(_))) {
                        new_events = true;
                        wrote = true;
                    }
                    (reply, r.map(Reply::Order))
                }
                Op::RecordMilestone {
                    milestone,
                    at_ms,
                    trace_id,
                    reply,
                } => {
                    let r = record_milestone(
                        &mut tables,
                        &shared.site,
                        &milestone,
                        at_ms,
                        trace_id.as_deref(),
                    );
                    if matches!(r, Ok(Outcome::Created(_))) {
                        new_events = true;
                        wrote = true;
                    }
                    (reply, r.map(Reply::Milestone))
                }
                Op::ApplyMaster {
                    batch,
                    at_ms,
                    reply,
                } => {
                    let r = apply_master(&mut tables, &shared.site, &batch, at_ms);
                    if let Ok(done) = &r
                        && done.applied
                    {
                        wrote = true;
                        new_events |= done.new_events;
                        master_rev = Some(batch.through_rev);
                        if let Some(reset) = &mut master_rev_reset {
                            // Applied after a reset in the same group: publish where it ended.
                            *reset = batch.through_rev;
                            master_rev = None;
                        }
                    }
                    (reply, r.map(|done| Reply::Master(done.applied)))
                }
                Op::MarkAcked {
                    through,
                    now_ms,
                    reply,
                } => {
                    let r = mark_acked(&mut tables, through).and_then(|(acked, moved)| {
                        let pruned =
                            prune_acked(&mut tables, &shared.retention, now_ms, &mut prune_budget)?;
                        Ok((acked, moved || pruned.rows > 0))
                    });
                    wrote |= matches!(r, Ok((_, true)));
                    (reply, r.map(|(acked, _)| Reply::Acked(acked)))
                }
                Op::Prune { now_ms, reply } => {
                    let r = prune_acked(&mut tables, &shared.retention, now_ms, &mut prune_budget)
                        .map_err(Fail::from);
                    wrote |= matches!(r, Ok(p) if p.rows > 0);
                    (reply, r.map(Reply::Pruned))
                }
                Op::RewindAcked { to, reply } => {
                    let r = rewind_acked(&mut tables, to);
                    wrote |= matches!(r, Ok(from) if from != to);
                    (reply, r.map(Reply::Rewound))
                }
                Op::AdoptIncarnation {
                    incarnation,
                    master_from_rev,
                    reply,
                } => {
                    let r = adopt_incarnation(&mut tables, incarnation, master_from_rev);
                    if let Ok(change) = &r {
                        wrote |= *change != IncarnationChange::Unchanged;
                        if matches!(change, IncarnationChange::Changed { .. }) {
                            master_rev_reset = Some(master_from_rev);
                            master_rev = None;
                        }
                    }
                    (reply, r.map(Reply::Incarnation))
                }
                Op::Shutdown => continue,
            };
            match result {
                Ok(v) => pending.push((reply, Ok(v))),
                Err(Fail::Reject(e)) => pending.push((reply, Err(e))),
                Err(Fail::Storage(reason)) => {
                    let mut all = senders(std::mem::take(&mut pending), iter.collect());
                    all.push(reply);
                    return Err((all, reason));
                }
            }
        }
    }
    if !wrote {
        // Only refusals and repeats: nothing to make durable.
        if let Err(e) = txn.abort() {
            return Err((senders(pending, Vec::new()), e.to_string()));
        }
        return Ok(GroupDone {
            pending,
            new_events: false,
            committed: false,
            master_rev: None,
            master_rev_reset: None,
        });
    }
    match txn.commit() {
        Ok(()) => Ok(GroupDone {
            pending,
            new_events,
            committed: true,
            master_rev,
            master_rev_reset,
        }),
        Err(e) => Err((senders(pending, Vec::new()), e.to_string())),
    }
}

fn op_reply(op: Op) -> Option<oneshot::Sender<Result<Reply, WriteError>>> {
    match op {
        Op::CreateOrder { reply, .. }
        | Op::RecordMilestone { reply, .. }
        | Op::ApplyMaster { reply, .. }
        | Op::MarkAcked { reply, .. }
        | Op::Prune { reply, .. }
        | Op::RewindAcked { reply, .. }
        | Op::AdoptIncarnation { reply, .. } => Some(reply),
        Op::Shutdown => None,
    }
}

/// The open database, reopening it first if a previous failure closed it.
fn current_db(shared: &Shared) -> Option<Arc<Database>> {
    let current = shared
        .db
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if current.is_some() {
        return current;
    }
    reopen(shared);
    shared
        .db
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// redb refuses further use of a handle after an I/O error, so after a failed group the writer
/// drops the handle and opens the file again (which also runs redb's recovery).
fn reopen(shared: &Shared) {
    let old = shared
        .db
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    drop(old);
    for attempt in 1..=REOPEN_ATTEMPTS {
        match (shared.opener)() {
            Ok(db) => {
                *shared
                    .db
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(db));
                shared.stats.reopens.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(attempt, "store reopened after a failure");
                return;
            }
            Err(e) => {
                tracing::error!(attempt, error = %e, "store reopen failed");
                std::thread::sleep(REOPEN_PAUSE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{catalogue, grants};
    use outpost_protocol::{AtpRecord, OrderStatusUpdate, Reclaim};

    const SITE: &str = "plant-1";

    fn open(dir: &Path) -> (Store, StoreWriter) {
        Store::open(&dir.join("agent.redb"), SITE).unwrap()
    }

    fn order(customer: &str, lines: &[(&str, i64)]) -> NewOrder {
        NewOrder {
            customer_id: customer.into(),
            lines: lines
                .iter()
                .map(|(s, q)| NewLine {
                    sku: s.to_string(),
                    qty: *q,
                })
                .collect(),
        }
    }

    fn milestone(id: &str, kind: MilestoneKind) -> NewMilestone {
        NewMilestone {
            event_id: id.into(),
            shipment_id: "SH-1".into(),
            milestone: kind,
            scanner_id: "scanner-7".into(),
            at: "2026-11-26T10:00:00Z".into(),
        }
    }

    /// Goal: the same Idempotency-Key with the same body gives back the same order; with another
    /// body it is refused and nothing is stored.
    #[tokio::test]
    async fn idempotent_order_creation() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        assert!(store.apply_master(catalogue(0, 3)).await.unwrap());

        let o = order("ACME", &[("GEAR-12T", 2)]);
        let first = store
            .create_order("k1", o.clone(), 1_000, false)
            .await
            .unwrap();
        assert!(first.is_created());
        let first = first.into_inner();
        assert_eq!(first.order.order_id, "plant-1-o1");
        assert_eq!(first.order.lines[0].unit_price, Money::parse("11").unwrap());
        let again = store
            .create_order("k1", o.clone(), 2_000, false)
            .await
            .unwrap();
        assert_eq!(again, Outcome::Existing(first.clone()));

        let other = order("ACME", &[("GEAR-12T", 3)]);
        assert_eq!(
            store.create_order("k1", other, 3_000, false).await,
            Err(WriteError::IdempotencyKeyReused)
        );
        let m = store.marks().unwrap();
        assert_eq!((m.last_seq, m.outbox_depth()), (1, 1));
        assert_eq!(store.outbox_rows().unwrap(), 1);
        let (rec, synced) = store.order("plant-1-o1").unwrap().unwrap();
        assert_eq!(rec, first);
        assert!(!synced);
        let events = store.outbox_range(1..=1).unwrap();
        assert_eq!(events[0].event_id, "plant-1-o1");
        assert_eq!(events[0].at_ms, 1_000);
        writer.shutdown().await;
    }

    /// Goal: every refusal stores nothing: unknown customer, unknown SKU, SKU without a price
    /// for this customer, bad shapes.
    #[tokio::test]
    async fn refused_orders_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 3)).await.unwrap();
        let cases = [
            (order("NOBODY", &[("GEAR-12T", 1)]), "unknown customer"),
            (order("ACME", &[("NOPE", 1)]), "unknown SKU"),
            (order("ACME", &[("SPECIAL", 1)]), "no list price"),
            (order("ACME", &[("GEAR-12T", 0)]), "qty"),
            (order("ACME", &[]), "lines"),
            (order("bad id!", &[("GEAR-12T", 1)]), "customer_id"),
        ];
        for (i, (o, needle)) in cases.into_iter().enumerate() {
            let err = store
                .create_order(&format!("k{i}"), o, 1, false)
                .await
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        assert!(matches!(
            store
                .create_order("x", order("ACME", &[("NOPE", 1)]), 1, false)
                .await,
            Err(WriteError::UnknownSku(_))
        ));
        assert!(matches!(
            store
                .create_order("y", order("ACME", &[("SPECIAL", 1)]), 1, false)
                .await,
            Err(WriteError::NoPrice { .. })
        ));
        assert_eq!(store.marks().unwrap().last_seq, 0);
        assert_eq!(store.outbox_rows().unwrap(), 0);
        // A refused key is not consumed: it can be used for a valid order afterwards.
        let ok = store
            .create_order("k0", order("ACME", &[("GEAR-12T", 1)]), 1, false)
            .await
            .unwrap();
        assert!(ok.is_created());
        writer.shutdown().await;
    }

    /// Goal: a milestone event id is recorded once; the same body again returns the original,
    /// another body under the same id is refused.
    #[tokio::test]
    async fn milestone_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let m = milestone("evt-1", MilestoneKind::Loaded);
        let first = store.record_milestone(m.clone(), 5).await.unwrap();
        assert!(first.is_created());
        let again = store.record_milestone(m.clone(), 6).await.unwrap();
        assert_eq!(again, Outcome::Existing(first.clone().into_inner()));
        let changed = milestone("evt-1", MilestoneKind::Departed);
        assert_eq!(
            store.record_milestone(changed, 7).await,
            Err(WriteError::EventIdReused("evt-1".into()))
        );
        let mut bad_time = milestone("evt-2", MilestoneKind::Picked);
        bad_time.at = "yesterday".into();
        assert!(matches!(
            store.record_milestone(bad_time, 8).await,
            Err(WriteError::Validation(_))
        ));
        let reserved = milestone("plant-1-o9", MilestoneKind::Picked);
        assert!(matches!(
            store.record_milestone(reserved, 8).await,
            Err(WriteError::Validation(_))
        ));
        assert_eq!(store.marks().unwrap().last_seq, 1);
        let ev = store.outbox_range(1..=1).unwrap();
        assert!(
            matches!(ev[0].decode(), Ok(EventBody::Milestone(x)) if x.milestone == MilestoneKind::Loaded)
        );
        writer.shutdown().await;
    }

    /// Goal: a master batch is applied together with its revision; a stale batch changes
    /// nothing; a batch with a gap or an invalid change is refused whole.
    #[tokio::test]
    async fn master_batches_apply_with_their_revision_and_stale_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        assert!(store.apply_master(catalogue(0, 6)).await.unwrap());
        assert_eq!(store.marks().unwrap().master_rev, 6);
        assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 6)));
        let p = store.price("GEAR-12T", Some("ACME")).unwrap().unwrap();
        assert_eq!(p.unit_price.to_string(), "11.00");
        let p = store.price("GEAR-12T", Some("GLOBEX")).unwrap().unwrap();
        assert_eq!(p.unit_price.to_string(), "12.50");
        assert_eq!(
            store
                .price("GEAR-12T", None)
                .unwrap()
                .unwrap()
                .unit_price
                .to_string(),
            "12.50"
        );
        assert_eq!(store.price("SPECIAL", None).unwrap(), None);
        assert_eq!(store.customer("ACME").unwrap().unwrap().name, "Acme Corp");

        // Stale: through_rev <= applied revision.
        let mut stale = catalogue(2, 6);
        if let MasterChange::Atp(a) = &mut stale.changes[3] {
            a.available = 1;
        }
        assert!(!store.apply_master(stale).await.unwrap());
        assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 6)));

        // A gap (from_rev beyond the applied revision) is refused and changes nothing.
        let gap = MasterBatch {
            from_rev: 8,
            through_rev: 9,
            changes: vec![],
        };
        assert!(matches!(
            store.apply_master(gap).await,
            Err(WriteError::BadMasterBatch(_))
        ));
        // One invalid change refuses the whole batch.
        let mut bad = catalogue(6, 12);
        if let MasterChange::Atp(a) = &mut bad.changes[3] {
            a.available = 2;
        }
        bad.changes.push(MasterChange::Atp(AtpRecord {
            sku: "".into(),
            site: SITE.into(),
            available: 1,
        }));
        assert!(store.apply_master(bad).await.is_err());
        assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 6)));
        assert_eq!(store.marks().unwrap().master_rev, 6);

        // An empty batch (changes for other sites filtered out) still moves the revision.
        let empty = MasterBatch {
            from_rev: 6,
            through_rev: 10,
            changes: vec![],
        };
        assert!(store.apply_master(empty).await.unwrap());
        assert_eq!(store.marks().unwrap().master_rev, 10);
        writer.shutdown().await;
    }

    /// Goal: an ack deletes exactly the acknowledged outbox rows past their retention (here all
    /// of them: stored at 1 ms after the epoch, far beyond the default week), keeps the order
    /// records (now marked synced), never moves back, and an ack beyond the last seq is refused.
    #[tokio::test]
    async fn ack_deletes_outbox_rows_and_depth_drops() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 1)).await.unwrap();
        for i in 0..5 {
            store
                .create_order(
                    &format!("k{i}"),
                    order("ACME", &[("GEAR-12T", 1)]),
                    1,
                    false,
                )
                .await
                .unwrap();
        }
        assert_eq!(store.marks().unwrap().outbox_depth(), 5);
        assert_eq!(store.mark_acked(3).await.unwrap(), 3);
        let m = store.marks().unwrap();
        assert_eq!((m.acked_seq, m.outbox_depth()), (3, 2));
        assert_eq!(store.outbox_rows().unwrap(), 2);
        assert_eq!(store.outbox_range(4..=5).unwrap().len(), 2);
        assert!(store.outbox_range(3..=4).is_err(), "acked rows are gone");
        assert!(store.order("plant-1-o1").unwrap().unwrap().1, "synced");
        assert!(!store.order("plant-1-o4").unwrap().unwrap().1);
        assert_eq!(store.mark_acked(2).await.unwrap(), 3, "never goes back");
        assert!(matches!(
            store.mark_acked(9).await,
            Err(WriteError::AckBeyondLast { .. })
        ));
        writer.shutdown().await;
    }

    /// Goal: everything committed survives closing and reopening the store.
    #[tokio::test]
    async fn reopen_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, writer) = open(dir.path());
            store.apply_master(catalogue(0, 4)).await.unwrap();
            store
                .create_order("k", order("ACME", &[("GEAR-12T", 1)]), 1, false)
                .await
                .unwrap();
            store
                .record_milestone(milestone("e1", MilestoneKind::Picked), 2)
                .await
                .unwrap();
            store.mark_acked(1).await.unwrap();
            drop(store);
            writer.shutdown().await;
        }
        let (store, writer) = open(dir.path());
        assert_eq!(
            store.marks().unwrap(),
            Marks {
                master_rev: 4,
                last_seq: 2,
                acked_seq: 1,
                // Row 1, stored at 1 ms after the epoch, was past the age bound at its ack.
                retained_from_seq: 2,
                central_incarnation: 0,
            }
        );
        assert_eq!(store.outbox_rows().unwrap(), 1);
        assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 4)));
        assert!(store.order("plant-1-o1").unwrap().is_some());
        // The idempotency and milestone records survived too.
        let again = store
            .create_order("k", order("ACME", &[("GEAR-12T", 1)]), 9, false)
            .await
            .unwrap();
        assert!(!again.is_created());
        let m = store
            .record_milestone(milestone("e1", MilestoneKind::Picked), 9)
            .await
            .unwrap();
        assert!(!m.is_created());
        // Sequence numbers continue after the reopen.
        let next = store
            .create_order("k2", order("ACME", &[("GEAR-12T", 1)]), 9, false)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next.seq, 3);
        writer.shutdown().await;
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, writer) = open(dir.path());
        assert!(matches!(
            Store::open(&dir.path().join("agent.redb"), SITE),
            Err(OpenStoreError::AlreadyOpen { .. })
        ));
        writer.shutdown().await;
    }

    /// Goal: group commit. Many concurrent writers from several tasks all succeed, get distinct
    /// sequence numbers, and the writer needs fewer transactions than operations.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_into_fewer_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 1)).await.unwrap();
        let commits_before = store.stats().commits.load(Ordering::Relaxed);
        const TASKS: usize = 8;
        const PER_TASK: usize = 50;
        let mut set = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let store = store.clone();
            set.spawn(async move {
                let mut inner = tokio::task::JoinSet::new();
                for i in 0..PER_TASK {
                    let store = store.clone();
                    inner.spawn(async move {
                        if i % 2 == 0 {
                            store
                                .create_order(
                                    &format!("t{t}-{i}"),
                                    order("ACME", &[("GEAR-12T", 1)]),
                                    1,
                                    false,
                                )
                                .await
                                .map(|o| o.into_inner().seq)
                        } else {
                            store
                                .record_milestone(
                                    milestone(&format!("t{t}-e{i}"), MilestoneKind::Packed),
                                    1,
                                )
                                .await
                                .map(|m| m.into_inner().seq)
                        }
                    });
                }
                let mut seqs = Vec::new();
                while let Some(r) = inner.join_next().await {
                    seqs.push(r.unwrap().unwrap());
                }
                seqs
            });
        }
        let mut seqs = Vec::new();
        while let Some(r) = set.join_next().await {
            seqs.extend(r.unwrap());
        }
        seqs.sort_unstable();
        let total = (TASKS * PER_TASK) as u64;
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "distinct, gap-free seqs"
        );
        let commits = store.stats().commits.load(Ordering::Relaxed) - commits_before;
        assert!(
            commits < total,
            "{commits} commits for {total} operations: no grouping happened"
        );
        assert_eq!(store.marks().unwrap().last_seq, total);
        writer.shutdown().await;
    }

    /// A file backend whose writes and syncs fail while `fail` is set, like a disk that fills
    /// up or goes away. Locking is left unsupported (redb then uses exclusive-writer mode).
    #[derive(Debug)]
    struct FlakyBackend {
        inner: redb::backends::FileBackend,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FlakyBackend {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                Err(std::io::Error::other("injected I/O failure"))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for FlakyBackend {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    /// Goal: a failed commit answers every operation of its group with `Unavailable` (no 2xx
    /// for anything not durable), the writer reopens the database, and once the disk works
    /// again writes resume with nothing lost and nothing half-written.
    /// Method: a backend that fails writes on demand.
    #[tokio::test]
    async fn failed_commit_is_unavailable_then_the_writer_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, f) = (path.clone(), fail.clone());
        let opener: Opener = Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(|e| OpenStoreError::CreateDir {
                    path: p.clone(),
                    source: e,
                })?;
            let backend = FlakyBackend {
                inner: redb::backends::FileBackend::new(file).map_err(|e| {
                    OpenStoreError::Open {
                        path: p.clone(),
                        source: e.into(),
                    }
                })?,
                fail: f.clone(),
            };
            let db = Database::builder()
                .create_with_backend(backend)
                .map_err(|e| OpenStoreError::Open {
                    path: p.clone(),
                    source: e.into(),
                })?;
            prepare_db(db, &p)
        });
        let (store, writer) = Store::open_with(SITE, Retention::default(), opener).unwrap();
        let first = store
            .record_milestone(milestone("ok-1", MilestoneKind::Picked), 1)
            .await
            .unwrap();
        assert!(first.is_created());

        fail.store(true, Ordering::SeqCst);
        let failing = store
            .record_milestone(milestone("lost", MilestoneKind::Picked), 2)
            .await;
        assert!(
            matches!(failing, Err(WriteError::Unavailable(_))),
            "{failing:?}"
        );
        assert!(store.stats().failed_groups.load(Ordering::Relaxed) >= 1);
        fail.store(false, Ordering::SeqCst);

        // The writer recovers by itself: the next write succeeds and continues the sequence.
        let mut next = None;
        for _ in 0..50 {
            match store
                .record_milestone(milestone("ok-2", MilestoneKind::Packed), 3)
                .await
            {
                Ok(o) => {
                    next = Some(o.into_inner());
                    break;
                }
                Err(WriteError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        let next = next.expect("writes resume after the disk recovers");
        assert_eq!(next.seq, 2, "the failed write left no trace");
        assert!(store.stats().reopens.load(Ordering::Relaxed) >= 1);
        assert_eq!(store.marks().unwrap().last_seq, 2);
        // The failed milestone can be submitted again: nothing of it was stored.
        let retry = store
            .record_milestone(milestone("lost", MilestoneKind::Picked), 4)
            .await
            .unwrap();
        assert!(retry.is_created());
        drop(store);
        writer.shutdown().await;

        // And everything acknowledged is on disk, through a plain reopen.
        let (store, writer) = open(dir.path());
        assert_eq!(store.marks().unwrap().last_seq, 3);
        assert_eq!(store.outbox_rows().unwrap(), 3);
        writer.shutdown().await;
    }

    fn decoded(store: &Store, seq: u64) -> EventBody {
        store.outbox_range(seq..=seq).unwrap()[0].decode().unwrap()
    }

    fn promises(r: &OrderRecord) -> Vec<LinePromise> {
        r.order.lines.iter().map(|l| l.promise).collect()
    }

    /// Goal: a site cut off with an ATP allowance of A confirms exactly A units over several
    /// orders and captures the rest as pending allowance, per line, with reasons; the allowance
    /// and the uploaded event agree with the response.
    #[tokio::test]
    async fn capture_confirms_exactly_up_to_the_allowance() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 5)).await.unwrap();
        let a = 7;
        let allowance = [
            (Pool::atp("GEAR-12T"), a),
            (Pool::credit("ACME"), 100_000_000),
        ];
        store.apply_master(grants(5, 6, &allowance)).await.unwrap();
        let mut confirmed = 0;
        let mut pending = 0;
        for i in 0..5 {
            let o = order("ACME", &[("GEAR-12T", 2), ("GEAR-12T", 1)]);
            let r = store
                .create_order(&format!("k{i}"), o, 1, true)
                .await
                .unwrap()
                .into_inner();
            for (l, reason) in r.order.lines.iter().zip(&r.reasons) {
                match l.promise {
                    LinePromise::Confirmed => confirmed += l.qty,
                    LinePromise::PendingAllowance => {
                        assert!(reason.contains("allowance of GEAR-12T"), "{reason}");
                        pending += l.qty;
                    }
                    p => panic!("unexpected {p:?}"),
                }
            }
            assert!(r.order.offline);
            assert_eq!(r.order.master_rev, 6);
            let EventBody::Order(sent) = decoded(&store, r.seq) else {
                panic!("order event expected")
            };
            assert_eq!(sent, r.order, "the uploaded order is the one answered");
        }
        assert_eq!((confirmed, pending), (a, 15 - a));
        assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 0);
        // Orders 1-2 fit (6 units), order 3 gets its 2-unit line pending and its 1-unit line
        // confirmed (the 7th unit), orders 4-5 are entirely pending.
        let statuses: Vec<String> = (1..=5)
            .map(|s| {
                store
                    .order(&format!("plant-1-o{s}"))
                    .unwrap()
                    .unwrap()
                    .0
                    .order
                    .status
            })
            .collect();
        assert_eq!(
            statuses,
            ["confirmed", "confirmed", "partial", "pending", "pending"]
        );
        writer.shutdown().await;
    }

    /// Goal: the credit allowance bounds the value confirmed; a customer on hold gets every line
    /// pending_hold; in both cases no allowance is consumed.
    #[tokio::test]
    async fn credit_allowance_and_credit_hold_bound_confirmation() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 5)).await.unwrap();
        // 30.00 of credit: two gears at 11.00 fit, three do not.
        let allowance = [
            (Pool::atp("GEAR-12T"), 100),
            (Pool::credit("ACME"), 300_000),
        ];
        store.apply_master(grants(5, 6, &allowance)).await.unwrap();
        let r = store
            .create_order("c1", order("ACME", &[("GEAR-12T", 3)]), 1, false)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(promises(&r), [LinePromise::PendingCredit]);
        assert!(r.reasons[0].contains("worth 33.00"), "{}", r.reasons[0]);
        assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 100);
        let r = store
            .create_order("c2", order("ACME", &[("GEAR-12T", 2)]), 1, false)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(promises(&r), [LinePromise::Confirmed]);
        assert_eq!(store.allowance(&Pool::credit("ACME")).unwrap(), 80_000);
        assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 98);

        let hold = MasterBatch {
            from_rev: 6,
            through_rev: 7,
            changes: vec![MasterChange::Customer(CustomerRecord {
                id: "ACME".into(),
                name: "Acme Corp".into(),
                credit_limit: Money::parse("50000").unwrap(),
                on_hold: true,
            })],
        };
        store.apply_master(hold).await.unwrap();
        let r = store
            .create_order(
                "c3",
                order("ACME", &[("GEAR-12T", 1), ("GEAR-12T", 1)]),
                1,
                false,
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(promises(&r), [LinePromise::PendingHold; 2]);
        assert_eq!(r.order.status, "pending");
        assert!(r.reasons.iter().all(|x| x.contains("credit hold")));
        assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 98);
        assert_eq!(store.allowance(&Pool::credit("ACME")).unwrap(), 80_000);
        writer.shutdown().await;
    }

    /// Goal: a replayed Idempotency-Key returns the original order, promises included, and
    /// consumes nothing more, even after new allowance arrived; two copies of one request in the
    /// same group consume once.
    #[tokio::test]
    async fn replayed_keys_consume_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 5)).await.unwrap();
        let allowance = [
            (Pool::atp("GEAR-12T"), 3),
            (Pool::credit("ACME"), 100_000_000),
        ];
        store.apply_master(grants(5, 6, &allowance)).await.unwrap();
        let o = order("ACME", &[("GEAR-12T", 2), ("GEAR-12T", 2)]);
        let first = store.create_order("k", o.clone(), 1, true).await.unwrap();
        assert!(first.is_created());
        let first = first.into_inner();
        assert_eq!(
            promises(&first),
            [LinePromise::Confirmed, LinePromise::PendingAllowance]
        );
        assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 1);
        store
            .apply_master(grants(6, 7, &[(Pool::atp("GEAR-12T"), 10)]))
            .await
            .unwrap();
        let again = store.create_order("k", o.clone(), 2, false).await.unwrap();
        assert_eq!(again, Outcome::Existing(first));
        assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 11);
        assert_eq!(store.marks().unwrap().last_seq, 1);

        // The same new request twice, concurrently: one order, one consumption.
        let (a, b) = tokio::join!(
            store.create_order("k2", order("ACME", &[("GEAR-12T", 4)]), 3, false),
            store.create_order("k2", order("ACME", &[("GEAR-12T", 4)]), 3, false)
        );
        assert_eq!(a.unwrap().into_inner(), b.unwrap().into_inner());
        assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 7);
        assert_eq!(store.marks().unwrap().last_seq, 2);
        writer.shutdown().await;
    }

    /// Goal: grants and reclaims are applied with their revision; a reclaim returns exactly
    /// min(asked, remaining) and answers with an AllowanceReturn event in the same transaction;
    /// a repeated (stale) batch applies nothing twice, an overlapping one is refused.
    #[tokio::test]
    async fn grants_and_reclaims_apply_with_their_revision() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let mut rev = store.master_rev_watch();
        let gear = Pool::atp("GEAR-12T");
        let g = grants(0, 3, &[(gear.clone(), 5), (gear.clone(), 4)]);
        assert!(
            store
                .apply_master_at(g.clone(), 1_700_000_000_000)
                .await
                .unwrap()
        );
        assert_eq!(store.allowance(&gear).unwrap(), 9);
        assert_eq!(*rev.borrow_and_update(), 3, "the revision is published");
        assert_eq!(store.as_of_ms().unwrap(), Some(1_700_000_000_000));
        // The same batch again is stale: nothing is granted twice.
        assert!(!store.apply_master(g).await.unwrap());
        assert_eq!(store.allowance(&gear).unwrap(), 9);
        // A batch overlapping the applied revision is refused whole.
        let overlap = grants(2, 4, &[(gear.clone(), 1)]);
        assert!(matches!(
            store.apply_master(overlap).await,
            Err(WriteError::BadMasterBatch(_))
        ));
        // Another site's grant is not ours.
        let mut other = grants(3, 4, &[(gear.clone(), 100)]);
        if let MasterChange::Grant(g) = &mut other.changes[0] {
            g.site = "plant-2".into();
        }
        store.apply_master(other).await.unwrap();
        assert_eq!(store.allowance(&gear).unwrap(), 9);

        let reclaim = |id: u64, pool: &Pool, qty: i64| {
            MasterChange::Reclaim(Reclaim {
                reclaim_id: id,
                site: SITE.into(),
                pool: pool.clone(),
                qty,
            })
        };
        let credit = Pool::credit("NOBODY");
        let batch = MasterBatch {
            from_rev: 4,
            through_rev: 6,
            changes: vec![
                reclaim(17, &gear, 6),
                reclaim(18, &gear, 6),
                reclaim(19, &credit, 1),
            ],
        };
        assert!(store.apply_master(batch.clone()).await.unwrap());
        assert_eq!(store.allowance(&gear).unwrap(), 0);
        assert_eq!(
            store.marks().unwrap(),
            Marks {
                master_rev: 6,
                last_seq: 3,
                acked_seq: 0,
                retained_from_seq: 1,
                central_incarnation: 0,
            }
        );
        let returned: Vec<(u64, i64)> = (1..=3)
            .map(|seq| {
                let env = &store.outbox_range(seq..=seq).unwrap()[0];
                let EventBody::AllowanceReturn(r) = env.decode().unwrap() else {
                    panic!("allowance return expected")
                };
                assert_eq!(env.event_id, format!("plant-1-r{}", r.reclaim_id));
                (r.reclaim_id, r.qty)
            })
            .collect();
        assert_eq!(
            returned,
            [(17, 6), (18, 3), (19, 0)],
            "min(asked, remaining)"
        );
        // Replayed: no second answer.
        assert!(!store.apply_master(batch).await.unwrap());
        assert_eq!(store.marks().unwrap().last_seq, 3);
        writer.shutdown().await;
    }

    /// Goal: the ERP's decision reaches the order record; a decision about an order this site
    /// does not have is skipped without failing the batch; a grant that would overflow refuses
    /// the batch whole.
    #[tokio::test]
    async fn order_status_updates_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 5)).await.unwrap();
        let r = store
            .create_order("k", order("ACME", &[("GEAR-12T", 1)]), 1, false)
            .await
            .unwrap()
            .into_inner();
        let status = |id: &str, st: ErpStatus, reason: Option<&str>| {
            MasterChange::OrderStatus(OrderStatusUpdate {
                site: SITE.into(),
                order_id: id.into(),
                status: st,
                reason: reason.map(Into::into),
            })
        };
        let batch = MasterBatch {
            from_rev: 5,
            through_rev: 7,
            changes: vec![
                status("central-o1", ErpStatus::Accepted, None),
                status(
                    &r.order.order_id,
                    ErpStatus::Rejected,
                    Some("no stock at the DC"),
                ),
            ],
        };
        assert!(store.apply_master(batch).await.unwrap());
        let (got, _) = store.order(&r.order.order_id).unwrap().unwrap();
        assert_eq!(got.erp_status, Some(ErpStatus::Rejected));
        assert_eq!(got.erp_reason.as_deref(), Some("no stock at the DC"));
        assert_eq!(got.order, r.order, "the promise itself is unchanged");
        assert_eq!(store.marks().unwrap().master_rev, 7);

        let gear = Pool::atp("GEAR-12T");
        store
            .apply_master(grants(7, 8, &[(gear.clone(), i64::MAX)]))
            .await
            .unwrap();
        assert!(matches!(
            store.apply_master(grants(8, 9, &[(gear.clone(), 1)])).await,
            Err(WriteError::BadMasterBatch(_))
        ));
        assert_eq!(store.allowance(&gear).unwrap(), i64::MAX);
        writer.shutdown().await;
    }

    fn open_retaining(dir: &Path, retention: Retention) -> (Store, StoreWriter) {
        Store::open_with_retention(&dir.join("agent.redb"), SITE, retention).unwrap()
    }

    /// `n` milestones stored at `at_ms`, written concurrently so the writer groups them.
    async fn fill(store: &Store, from: usize, n: usize, at_ms: i64) {
        let mut set = tokio::task::JoinSet::new();
        for i in from..from + n {
            let store = store.clone();
            set.spawn(async move {
                store
                    .record_milestone(milestone(&format!("e{i}"), MilestoneKind::Picked), at_ms)
                    .await
                    .unwrap();
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }

    const DAY_MS: i64 = 86_400_000;

    /// Goal: acknowledged rows are kept up to `max_events` (the newest ones), and depth, the
    /// heartbeat summary and `outbox_rows` keep counting unacknowledged events only.
    /// Method: 10 events, retention of 3, ack through 8.
    #[tokio::test]
    async fn acked_rows_are_retained_by_count_and_depth_counts_unacked_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open_retaining(
            dir.path(),
            Retention {
                max_age_secs: 3600,
                max_events: 3,
            },
        );
        let t0 = now_ms();
        for i in 0..10 {
            store
                .record_milestone(milestone(&format!("e{i}"), MilestoneKind::Picked), t0 + i)
                .await
                .unwrap();
        }
        let before = store.outbox_summary().unwrap();
        assert_eq!((before.events, before.oldest_at_ms), (10, Some(t0)));
        assert_eq!(store.mark_acked_at(8, t0 + 10).await.unwrap(), 8);
        let m = store.marks().unwrap();
        assert_eq!(
            (m.outbox_depth(), m.retained_from_seq, m.retained_acked()),
            (2, 6, 3)
        );
        assert_eq!(store.outbox_rows().unwrap(), 2, "unacknowledged rows");
        assert_eq!(store.outbox_rows_held().unwrap(), 5, "seqs 6..=10");
        let ids: Vec<String> = store
            .outbox_range(6..=10)
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(ids, ["e5", "e6", "e7", "e8", "e9"]);
        assert!(store.outbox_range(5..=6).is_err(), "seq 5 was pruned");
        let sum = store.outbox_summary().unwrap();
        assert_eq!(sum.events, 2);
        assert_eq!(
            sum.oldest_at_ms,
            Some(t0 + 8),
            "the oldest unacknowledged, seq 9"
        );
        assert!(
            sum.bytes > 0 && sum.bytes < before.bytes,
            "{sum:?} {before:?}"
        );
        // Acking the rest keeps the newest three acknowledged rows, and the summary is empty.
        store.mark_acked_at(10, t0 + 10).await.unwrap();
        let m = store.marks().unwrap();
        assert_eq!((m.outbox_depth(), m.retained_from_seq), (0, 8));
        assert_eq!(store.outbox_rows().unwrap(), 0);
        let sum = store.outbox_summary().unwrap();
        assert_eq!((sum.events, sum.bytes, sum.oldest_at_ms), (0, 0, None));
        writer.shutdown().await;
    }

    /// Goal: acknowledged rows older than `max_age_secs` are pruned, by the ack and later by a
    /// prune step; unacknowledged rows are never pruned however old; `Retention::NONE` keeps
    /// nothing acknowledged (the behaviour before retention).
    #[tokio::test]
    async fn acked_rows_are_retained_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open_retaining(
            dir.path(),
            Retention {
                max_age_secs: 60,
                max_events: 1_000,
            },
        );
        let t0 = 1_700_000_000_000;
        fill(&store, 0, 5, t0).await;
        fill(&store, 5, 5, t0 + 100_000).await;
        // At t0 + 120 s, seqs 1..=5 are 120 s old, 6..=8 are 20 s old, 9..=10 unacknowledged.
        store.mark_acked_at(8, t0 + 120_000).await.unwrap();
        let m = store.marks().unwrap();
        assert_eq!((m.retained_from_seq, m.outbox_depth()), (6, 2));
        // Nothing expired yet: nothing pruned, nothing written.
        assert_eq!(
            store.prune_acked_at(t0 + 150_000).await.unwrap(),
            Pruned::default()
        );
        // A year later, the acknowledged rows go and the unacknowledged ones stay.
        let p = store.prune_acked_at(t0 + 365 * DAY_MS).await.unwrap();
        assert_eq!(
            p,
            Pruned {
                rows: 3,
                more: false
            }
        );
        let m = store.marks().unwrap();
        assert_eq!((m.retained_from_seq, m.outbox_depth()), (9, 2));
        assert_eq!(store.outbox_range(9..=10).unwrap().len(), 2);
        writer.shutdown().await;

        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open_retaining(dir.path(), Retention::NONE);
        fill(&store, 0, 4, now_ms()).await;
        store.mark_acked(3).await.unwrap();
        let m = store.marks().unwrap();
        assert_eq!((m.retained_from_seq, m.retained_acked()), (4, 0));
        assert_eq!(store.outbox_rows_held().unwrap(), 1);
        writer.shutdown().await;
    }

    /// Goal: pruning is bounded per write transaction, by an ack as by a prune step, and goes on
    /// at the next one; a prune step says when it left expired rows behind.
    /// Method: 12,345 fresh events acked at once (none expired), then prunes far in the future;
    /// then as many again, acked when already expired.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pruning_is_bounded_per_transaction() {
        const N: usize = 12_345;
        let rest = (N - MAX_PRUNE_PER_STEP) as u64;
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let t0 = now_ms();
        fill(&store, 0, N, t0).await;
        store.mark_acked_at(N as u64, t0).await.unwrap();
        assert_eq!(store.outbox_rows_held().unwrap(), N as u64, "all retained");
        let later = t0 + 8 * DAY_MS;
        let p = store.prune_acked_at(later).await.unwrap();
        assert_eq!(
            p,
            Pruned {
                rows: MAX_PRUNE_PER_STEP as u64,
                more: true
            }
        );
        let p = store.prune_acked_at(later).await.unwrap();
        assert_eq!(
            p,
            Pruned {
                rows: rest,
                more: false
            }
        );
        assert_eq!(store.outbox_rows_held().unwrap(), 0);

        fill(&store, N, N, t0).await;
        store.mark_acked_at(2 * N as u64, later).await.unwrap();
        let m = store.marks().unwrap();
        assert_eq!(m.outbox_depth(), 0);
        assert_eq!(m.retained_acked(), rest, "the ack pruned one step's worth");
        // The next ack (even a repeated one) continues.
        store.mark_acked_at(2 * N as u64, later).await.unwrap();
        assert_eq!(store.marks().unwrap().retained_acked(), 0);
        writer.shutdown().await;
    }

    /// Goal: on a quiet site (no ack) the pruner task removes retained events once they age
    /// out, and stops on shutdown.
    #[tokio::test]
    async fn the_pruner_prunes_without_acks_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        fill(&store, 0, 3, 1).await;
        // Acked "at" 1 ms after the epoch: young then, a week old by now.
        store.mark_acked_at(3, 1).await.unwrap();
        assert_eq!(store.marks().unwrap().retained_acked(), 3);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_pruner(
            store.clone(),
            Duration::from_millis(10),
            stop_rx,
        ));
        for _ in 0..500 {
            if store.outbox_rows_held().unwrap() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.marks().unwrap().retained_acked(), 0);
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the pruner stops on shutdown")
            .unwrap();
        writer.shutdown().await;
    }

    /// Goal: the acked mark can be rewound only over rows still held: the rewound events are
    /// unacknowledged again with their original seqs and event ids; a rewind past the pruned
    /// rows or forward is refused and changes nothing.
    #[tokio::test]
    async fn rewind_is_allowed_only_over_retained_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open_retaining(
            dir.path(),
            Retention {
                max_age_secs: 3600,
                max_events: 3,
            },
        );
        fill(&store, 0, 10, now_ms()).await;
        let ids = |from: u64, to: u64| -> Vec<String> {
            store
                .outbox_range(from..=to)
                .unwrap()
                .into_iter()
                .map(|e| e.event_id)
                .collect()
        };
        let original = ids(1, 10);
        store.mark_acked(10).await.unwrap();
        assert_eq!(store.marks().unwrap().retained_from_seq, 8);
        assert_eq!(
            store.rewind_acked(5).await,
            Err(WriteError::NotRetained {
                to: 5,
                acked: 10,
                retained_from: 8
            })
        );
        assert_eq!(
            store.rewind_acked(11).await,
            Err(WriteError::RewindForward { to: 11, acked: 10 })
        );
        assert_eq!(
            store.marks().unwrap().acked_seq,
            10,
            "refusals change nothing"
        );
        assert_eq!(store.rewind_acked(7).await.unwrap(), 10);
        let m = store.marks().unwrap();
        assert_eq!(
            (m.acked_seq, m.outbox_depth(), m.retained_acked()),
            (7, 3, 0)
        );
        assert_eq!(store.outbox_rows().unwrap(), 3);
        assert_eq!(ids(8, 10), original[7..10]);
        assert_eq!(
            store.rewind_acked(7).await.unwrap(),
            7,
            "to the mark: no-op"
        );
        // The rewound rows are unacknowledged again: no prune touches them.
        assert_eq!(
            store.prune_acked_at(now_ms() + 365 * DAY_MS).await.unwrap(),
            Pruned::default()
        );
        assert_eq!(store.marks().unwrap().retained_from_seq, 8);
        // Acked again, they are retained again.
        store.mark_acked(10).await.unwrap();
        assert_eq!(store.marks().unwrap().retained_from_seq, 8);
        writer.shutdown().await;
    }

    /// Goal: the first incarnation is recorded without touching anything; the same one again
    /// changes nothing; a different one drops every allowance to 0 and sets the applied revision
    /// to central's `master_from_rev` (published, even though lower), in one operation, after
    /// which master data resumes from there.
    #[tokio::test]
    async fn a_new_central_incarnation_drops_allowances_and_resets_the_revision() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let gear = Pool::atp("GEAR-12T");
        let credit = Pool::credit("ACME");
        store.apply_master(catalogue(0, 5)).await.unwrap();
        store
            .apply_master(grants(5, 8, &[(gear.clone(), 7), (credit.clone(), 500)]))
            .await
            .unwrap();
        let mut rev = store.master_rev_watch();
        assert_eq!(
            store.adopt_central_incarnation(41, 8).await.unwrap(),
            IncarnationChange::First
        );
        assert_eq!(store.marks().unwrap().central_incarnation, 41);
        assert_eq!(
            store.adopt_central_incarnation(41, 2).await.unwrap(),
            IncarnationChange::Unchanged
        );
        assert_eq!(store.allowance(&gear).unwrap(), 7);
        assert_eq!(store.marks().unwrap().master_rev, 8);

        let change = store.adopt_central_incarnation(42, 6).await.unwrap();
        assert_eq!(
            change,
            IncarnationChange::Changed {
                previous: 41,
                allowances_dropped: 2,
                atp_dropped: 7,
                credit_dropped: 500,
                master_rev_before: 8,
            }
        );
        assert_eq!(store.allowance(&gear).unwrap(), 0);
        assert_eq!(store.allowance(&credit).unwrap(), 0);
        let m = store.marks().unwrap();
        assert_eq!((m.master_rev, m.central_incarnation), (6, 42));
        assert_eq!(
            *rev.borrow_and_update(),
            6,
            "the lower revision is published"
        );
        // Master data resumes from central's revision: its grants apply again.
        assert!(
            store
                .apply_master(grants(6, 7, &[(gear.clone(), 2)]))
                .await
                .unwrap()
        );
        assert_eq!(store.allowance(&gear).unwrap(), 2);
        writer.shutdown().await;
    }

    /// Goal: after shutdown, writes fail with `Unavailable` instead of hanging.
    #[tokio::test]
    async fn writes_after_shutdown_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        writer.shutdown().await;
        assert!(matches!(
            store
                .record_milestone(milestone("e", MilestoneKind::Picked), 1)
                .await,
            Err(WriteError::Unavailable(_))
        ));
    }
}
