//! Central's durable store (redb): master data with its change log, the allowance ledger, the
//! global event feed, orders, the exception queue, dead letters, reconciliation reports, the
//! per-site high-water marks and the sites ever seen. I/O side: all writes go through one writer
//! thread that group-commits; reads open a read transaction directly.
//!
//! Invariants: a site's events, their effects (feed rows, orders, exceptions, dead letters,
//! ledger moves, report counters) and its high-water mark are written in the same transaction, so
//! after any crash the mark says exactly which events are applied, and a re-upload applies nothing
//! twice. Master changes get consecutive revisions in the transaction that updates the current
//! state tables; every ledger move that a site must learn of (grant, reclaim) is a master change
//! written in the transaction that moves the ledger.

mod alerts;
mod allowance;
mod backup;
mod counts;
mod drills;
mod ingest;
#[cfg(test)]
mod lifecycle_tests;
mod migrate;
mod orders;
mod records;
mod revoked;
mod schema3;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use outpost_protocol::session::IngestError;
use outpost_protocol::{CentralPool, EventEnvelope, MasterChange, Pool, ValidationError};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use alerts::{Alert, MAX_ALERTS, NewAlert};
pub use allowance::{AllowanceAnswer, HelloMarks, PolicyOutcome, SessionStart};
pub use backup::{
    BackupError, BackupInfo, RestoreError, RestoreInfo, RestoredStore, restore_store,
};
pub use counts::TableCounts;
pub use drills::{DrillMarks, HeldSeqs, MAX_DRILLS};
pub use migrate::{MigrateError, Migrated, OLDEST_MIGRATED_SCHEMA};
pub use orders::{
    CentralOrderError, CentralOrderOutcome, DecideError, ExceptionOpError, ResolveAction,
};
pub use records::{
    AllowanceUse, CentralData, CentralOrderRequest, Channel, DeadLetter, ExceptionRecord,
    LostRange, OpenReclaim, OrderRecord, OrderState, ReconReport, Resolution, ResolutionAction,
    SiteData,
};
pub use revoked::RevokedSite;

use crate::ledger::{LedgerKey, Targets};

/// Version of the table layout below. Bumped on any incompatible change; a store written by
/// another version is refused at open instead of being misread. Version 4 added the store's
/// incarnation, the lost ranges and the recovery fields of the reconciliation report.
pub const SCHEMA_VERSION: u64 = 4;
/// redb's page cache (its default is 1 GiB, which a growing feed would fill, pushing central
/// over `quic.memory_limit_mib`): the feed's tail, the sites' marks and master data stay hot;
/// older pages come from the OS page cache.
pub const CACHE_BYTES: usize = 128 * 1024 * 1024;
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
/// Reconciliation reports kept per site (the newest): a few months of daily reconnects, a few
/// kilobytes per site.
pub const MAX_REPORTS_PER_SITE: usize = 100;
/// Default ATP allowance per site per SKU.
pub const DEFAULT_ATP_TARGET: i64 = 20;
/// Default share of a customer's credit limit escrowed at each site.
pub const DEFAULT_CREDIT_TARGET_FRACTION: f64 = 0.2;
/// Default silence after which a site is asked to return all its allowance: a day.
pub const DEFAULT_RECLAIM_SILENT_SECS: u64 = 86_400;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// cursor -> postcard FeedRow
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
/// (site, sku) -> postcard CentralPool: the ATP pool of a SKU at a site
const LEDGER_ATP: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("ledger_atp");
/// customer -> postcard CentralPool: the customer's credit pool, in money units
const LEDGER_CREDIT: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_credit");
/// site -> 0: sites that hold or may get allowances (they connected, or the ERP gave them ATP)
const LEDGER_SITES: TableDefinition<&str, u64> = TableDefinition::new("ledger_sites");
/// (ledger key text, site) -> postcard OpenReclaim; at most one per site and pool
const OPEN_RECLAIMS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("open_reclaims");
/// order id -> postcard OrderRecord
const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
/// exception id -> postcard ExceptionRecord
const EXCEPTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("exceptions");
/// dead letter id -> postcard DeadLetter
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// (site, session) -> postcard ReconReport
const REPORTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("reports");
/// Idempotency-Key of central's order channel -> postcard IdemRecord
const CENTRAL_IDEM: TableDefinition<&str, &[u8]> = TableDefinition::new("central_idem");
/// (site, first lost seq) -> postcard LostRange: seqs a restored central had acknowledged before
/// its backup was taken and the site no longer holds.
const LOST_RANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("lost_ranges");

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

const META_SCHEMA: &str = "schema_version";
const META_REVISION: &str = "revision";
const META_NEXT_CURSOR: &str = "next_cursor";
const META_LAST_EXCEPTION: &str = "last_exception";
const META_LAST_DEAD_LETTER: &str = "last_dead_letter";
const META_LAST_RECLAIM: &str = "last_reclaim";
const META_LAST_CENTRAL_ORDER: &str = "last_central_order";
/// Random non-zero id of this store, drawn when it is created and again when it is restored
/// from a backup (sent in every Welcome).
const META_INCARNATION: &str = "incarnation";
/// When the backup this store was made from was taken (only in backups and restored stores).
const META_BACKUP_TAKEN_MS: &str = "backup_taken_ms";
/// When a restored store was restored, and the backup time it was restored from.
const META_RESTORED_FROM_BACKUP_MS: &str = "restored_from_backup_ms";
const META_RESTORED_AT_MS: &str = "restored_at_ms";

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
    pub channel: Channel,
    pub event: EventEnvelope,
}

/// One pool of the ledger with the reclaims open on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    pub key: LedgerKey,
    pub pool: CentralPool,
    /// site -> quantity asked back and not yet answered.
    pub open_reclaims: BTreeMap<String, i64>,
}

/// The allowance policy the writer applies (from the config's `[allowance]` section).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoreOptions {
    pub targets: Targets,
    /// A site not heard from for longer than this is asked to return all its allowance, and gets
    /// no top-ups until it is heard from again.
    pub reclaim_silent_secs: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            targets: Targets {
                atp_units: DEFAULT_ATP_TARGET,
                credit_fraction: DEFAULT_CREDIT_TARGET_FRACTION,
            },
            reclaim_silent_secs: DEFAULT_RECLAIM_SILENT_SECS,
        }
    }
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
    /// Revision of the last change written (the ERP's items, then any grants and reclaims they
    /// caused).
    pub revision: u64,
    /// The ERP's items written.
    pub changes: usize,
    pub grants: usize,
    pub reclaims: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestOutcome {
    pub duplicates: usize,
    /// New events applied (to the feed, the exception queue, the dead letters or the ledger).
    pub stored: usize,
    pub new_hwm: u64,
    pub dead_letters: usize,
    pub exceptions: usize,
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
    /// Found by `init_tables` after `migrate` ran: not expected, since `migrate` migrates or
    /// refuses every version but this build's.
    #[error("{path} has schema version {found}, this build reads version {SCHEMA_VERSION}")]
    SchemaVersion { path: PathBuf, found: u64 },
    /// A store of another schema version that is not migrated: newer than this build, older
    /// than it migrates, or a migration that failed (the store is left as it was).
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A backup file opened as a store: it would keep the incarnation of the central it was
    /// taken from, so sites would not notice the restore.
    #[error(
        "{path} is a backup, not a store: put it in place with `outpost-central restore --from {path}`"
    )]
    UnrestoredBackup { path: PathBuf },
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

/// One write operation queued for the writer: a function run inside the group's transaction and
/// the channel its result goes back on once the group has committed.
trait Job: Send {
    /// Runs the operation in `txn`. On success its answer is held until the commit; a storage
    /// error aborts the whole group (the held answer then only serves to fail the caller).
    fn apply(self: Box<Self>, txn: &WriteTransaction, opts: &StoreOptions) -> Applied;
    /// Answers the caller with `StoreUnavailable` without running.
    fn fail(self: Box<Self>, why: &str);
}

/// An answer held until the group's commit decides whether it is delivered.
trait Held: Send {
    fn deliver(self: Box<Self>);
    fn fail(self: Box<Self>, why: &str);
}

enum Applied {
    Done(Box<dyn Held>),
    Broken(String, Box<dyn Held>),
}

/// Result of an operation inside the transaction: `Err(Broken)` is a storage error (the group is
/// aborted); the inner `Result` is the caller's answer.
type Outcome<T, E> = Result<Result<T, E>, Broken>;

type JobFn<T, E> = Box<dyn FnOnce(&WriteTransaction, &StoreOptions) -> Outcome<T, E> + Send>;

struct TxJob<T, E> {
    run: JobFn<T, E>,
    reply: oneshot::Sender<Result<T, E>>,
}

struct HeldReply<T, E> {
    reply: oneshot::Sender<Result<T, E>>,
    result: Option<Result<T, E>>,
}

impl<T: Send + 'static, E: From<StoreUnavailable> + Send + 'static> Held for HeldReply<T, E> {
    fn deliver(self: Box<Self>) {
        // A caller that gave up waiting dropped its receiver; nothing to do then.
        if let Some(r) = self.result {
            drop(self.reply.send(r));
        }
    }

    fn fail(self: Box<Self>, why: &str) {
        drop(
            self.reply
                .send(Err(StoreUnavailable(why.to_string()).into())),
        );
    }
}

impl<T: Send + 'static, E: From<StoreUnavailable> + Send + 'static> Job for TxJob<T, E> {
    fn apply(self: Box<Self>, txn: &WriteTransaction, opts: &StoreOptions) -> Applied {
        let TxJob { run, reply } = *self;
        match run(txn, opts) {
            Ok(result) => Applied::Done(Box::new(HeldReply {
                reply,
                result: Some(result),
            })),
            Err(Broken(why)) => Applied::Broken(
                why,
                Box::new(HeldReply::<T, E> {
                    reply,
                    result: None,
                }),
            ),
        }
    }

    fn fail(self: Box<Self>, why: &str) {
        drop(
            self.reply
                .send(Err(StoreUnavailable(why.to_string()).into())),
        );
    }
}

enum Op {
    Job(Box<dyn Job>),
    Shutdown { reply: oneshot::Sender<()> },
}

struct HeldShutdown(oneshot::Sender<()>);

impl Held for HeldShutdown {
    fn deliver(self: Box<Self>) {
        let _ = self.0.send(());
    }
    fn fail(self: Box<Self>, _why: &str) {
        let _ = self.0.send(());
    }
}

impl Op {
    fn fail(self, why: &str) {
        match self {
            Op::Job(j) => j.fail(why),
            Op::Shutdown { reply } => drop(reply.send(())),
        }
    }
}

/// Opens the database again (the writer reopens it after an I/O error).
type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

struct Shared {
    path: PathBuf,
    opener: Opener,
    opts: StoreOptions,
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

pub fn now_ms() -> i64 {
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
    /// Opens (creating if missing) the store at `path` with the default allowance policy and
    /// starts its writer thread.
    pub fn open(path: &Path) -> Result<Store, OpenStoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Opens (creating if missing) the store at `path` and starts its writer thread, which applies
    /// the allowance policy `opts`.
    pub fn open_with(path: &Path, opts: StoreOptions) -> Result<Store, OpenStoreError> {
        let file = path.to_path_buf();
        Self::open_with_opener(
            path,
            opts,
            Box::new(move || {
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .create(&file)
            }),
        )
    }

    /// Opens the store on a custom redb storage backend (simulated disks that lose unsynced
    /// writes, in tests). `make` is called again whenever the writer reopens the database;
    /// `path` only names the store in errors and logs.
    pub fn open_on_backend<B, F>(
        path: &Path,
        opts: StoreOptions,
        make: F,
    ) -> Result<Store, OpenStoreError>
    where
        B: redb::StorageBackend,
        F: Fn() -> std::io::Result<B> + Send + Sync + 'static,
    {
        Self::open_with_opener(
            path,
            opts,
            Box::new(move || {
                let backend = make().map_err(|e| redb::DatabaseError::Storage(e.into()))?;
                Database::builder().create_with_backend(backend)
            }),
        )
    }

    fn open_with_opener(
        path: &Path,
        opts: StoreOptions,
        opener: Opener,
    ) -> Result<Store, OpenStoreError> {
        let db = opener().map_err(|source| OpenStoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // A store of the previous schema is brought to this one first; `init_tables` then finds
        // the current version (or none, for a new store).
        migrate::migrate(&db, path)?;
        let revision = init_tables(&db).map_err(|e| match e {
            InitError::Redb(source) => OpenStoreError::Init {
                path: path.to_path_buf(),
                source,
            },
            InitError::Schema(found) => OpenStoreError::SchemaVersion {
                path: path.to_path_buf(),
                found,
            },
            InitError::Backup => OpenStoreError::UnrestoredBackup {
                path: path.to_path_buf(),
            },
        })?;
        let (rev_tx, _) = watch::channel(revision);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            opener,
            opts,
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

    pub fn options(&self) -> &StoreOptions {
        &self.shared.opts
    }

    /// Current revision, updated after each commit that wrote master changes (ERP data, grants,
    /// reclaims, order statuses).
    pub fn subscribe_revision(&self) -> watch::Receiver<u64> {
        self.shared.revision.subscribe()
    }

    /// Queues `run` for the writer and waits for its answer, which comes only after the group it
    /// ran in has committed.
    async fn run<T, E>(
        &self,
        run: impl FnOnce(&WriteTransaction, &StoreOptions) -> Outcome<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreUnavailable> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = TxJob {
            run: Box::new(run),
            reply,
        };
        if self.tx.send(Op::Job(Box::new(job))).await.is_err() {
            return Err(StoreUnavailable("the store is shut down".into()).into());
        }
        match tokio::time::timeout(WRITE_REPLY_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StoreUnavailable("the store writer stopped".into()).into()),
            Err(_) => {
                Err(StoreUnavailable("the store writer did not answer in time".into()).into())
            }
        }
    }

    /// Validates every change (nothing is written if any is invalid), then writes them with
    /// consecutive revisions, updates the current state and the ledger, and writes the grants
    /// and reclaims the new figures call for, in one durable transaction. Only ERP data (prices,
    /// ATP, customers) is accepted here.
    pub async fn upsert_master(
        &self,
        changes: Vec<MasterChange>,
    ) -> Result<MasterApplied, UpsertMasterError> {
        let now = now_ms();
        self.run(move |txn, opts| apply_master(txn, opts, &changes, now))
            .await
    }

    /// Plans the batch against the site's durable high-water mark inside the write transaction,
    /// applies each new event (feed, exception queue, dead letters, ledger), moves the mark,
    /// updates the session's reconciliation report and tops the site up, and answers after the
    /// commit. One bad event never fails the batch: it is dead-lettered.
    pub async fn ingest(
        &self,
        site: &str,
        events: Vec<EventEnvelope>,
    ) -> Result<IngestOutcome, IngestBatchError> {
        let site = site.to_string();
        let now = now_ms();
        self.run(move |txn, opts| ingest::apply_ingest(txn, opts, &site, &events, now))
            .await
    }

    /// Records that the site was seen now (creating its record on first contact).
    pub async fn touch_site(&self, site: &str) -> Result<(), StoreUnavailable> {
        let site = site.to_string();
        let now = now_ms();
        self.run(move |txn, _| touch(txn, &site, now).map(Ok)).await
    }

    /// A site's session was welcomed. In one transaction: when central is behind what it
    /// acknowledged to the site (restored from a backup), records the seqs the site no longer
    /// holds as lost (with an alert) and moves the mark past them; when the site last talked to
    /// another incarnation of this store, zeroes what the site holds of every pool; records the
    /// start of its reconciliation report and the contact; tops the site up. Returns what the
    /// Welcome needs.
    pub async fn begin_session(
        &self,
        site: &str,
        hello: HelloMarks,
    ) -> Result<SessionStart, StoreUnavailable> {
        let site = site.to_string();
        let now = now_ms();
        self.run(move |txn, opts| allowance::begin_session(txn, opts, &site, hello, now))
            .await
    }

    /// A site asks for `qty` more of `pool` now: grants what is free (at most `qty`) as a Grant
    /// change, durably, and says how much and at which revision.
    pub async fn allowance_request(
        &self,
        site: &str,
        pool: Pool,
        qty: i64,
    ) -> Result<AllowanceAnswer, StoreUnavailable> {
        let site = site.to_string();
        self.run(move |txn, _| allowance::request(txn, &site, &pool, qty))
            .await
    }

    /// The periodic check at `now_ms`: records that `connected` sites are being heard from, asks
    /// sites silent for too long to return their allowance, and tops every eligible site up.
    pub async fn periodic(
        &self,
        connected: Vec<String>,
        now_ms: i64,
    ) -> Result<PolicyOutcome, StoreUnavailable> {
        self.run(move |txn, opts| allowance::periodic(txn, opts, &connected, now_ms))
            .await
    }

    /// An order through central's own channel: sells every line from the (SKU, site) pool and
    /// its value from the customer's credit pool, all or nothing, under an idempotency key.
    pub async fn central_order(
        &self,
        idempotency_key: &str,
        request: CentralOrderRequest,
    ) -> Result<CentralOrderOutcome, CentralOrderError> {
        let key = idempotency_key.to_string();
        let now = now_ms();
        self.run(move |txn, _| orders::central_order(txn, &key, &request, now))
            .await
    }

    /// The ERP's decision on an order.
    pub async fn decide_order(
        &self,
        order_id: &str,
        status: outpost_protocol::ErpStatus,
        reason: Option<String>,
    ) -> Result<OrderRecord, DecideError> {
        let id = order_id.to_string();
        let now = now_ms();
        self.run(move |txn, opts| orders::decide(txn, opts, &id, status, reason, now))
            .await
    }

    /// An operator resolves an open exception: accept (the order enters the feed) or reject
    /// (its units are released and the site is told).
    pub async fn resolve_exception(
        &self,
        id: u64,
        action: ResolveAction,
        reason: Option<String>,
    ) -> Result<ExceptionRecord, ExceptionOpError> {
        let now = now_ms();
        self.run(move |txn, opts| orders::resolve(txn, opts, id, action, reason, now))
            .await
    }

    /// Re-runs the business checks of an open exception against current master data: passes →
    /// the order enters the feed and the exception is resolved; fails → it stays open with the new
    /// reasons (`ExceptionOpError::StillFailing`, committed).
    pub async fn replay_exception(&self, id: u64) -> Result<ExceptionRecord, ExceptionOpError> {
        let now = now_ms();
        self.run(move |txn, _| orders::replay(txn, id, now)).await
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

    fn read(&self) -> Result<ReadTransaction, ReadError> {
        let db = self.shared.db()?;
        Ok(db.begin_read()?)
    }

    pub fn revision(&self) -> Result<u64, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0))
    }

    /// Ranges of seqs recorded as lost (of `site`, or of every site), by site and first seq.
    pub fn lost_ranges(&self, site: Option<&str>) -> Result<Vec<LostRange>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(LOST_RANGES)?;
        let rows = match site {
            Some(s) => t.range((s, 0u64)..=(s, u64::MAX))?,
            None => t.range::<(&str, u64)>(..)?,
        };
        let mut out = Vec::new();
        for row in rows {
            let (_, v) = row?;
            out.push(decode("lost range", v.value())?);
        }
        Ok(out)
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
            let r: records::FeedRow =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("event", e))?;
            out.push(StoredEvent {
                cursor: k.value(),
                site: r.site,
                channel: r.channel,
                event: r.event,
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

    pub fn order(&self, order_id: &str) -> Result<Option<OrderRecord>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(ORDERS)?;
        t.get(order_id)?
            .map(|v| decode("order", v.value()))
            .transpose()
    }

    pub fn exception(&self, id: u64) -> Result<Option<ExceptionRecord>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(EXCEPTIONS)?;
        t.get(id)?
            .map(|v| decode("exception", v.value()))
            .transpose()
    }

    /// Up to `limit` exceptions with an id greater than `after` matching `filter`, in id order
    /// (oldest first: the queue's order).
    pub fn exceptions(
        &self,
        filter: ExceptionFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ExceptionRecord>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(EXCEPTIONS)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            let e: ExceptionRecord = decode("exception", v.value())?;
            let keep = match filter {
                ExceptionFilter::Open => e.is_open(),
                ExceptionFilter::Resolved => !e.is_open(),
                ExceptionFilter::All => true,
            };
            if keep {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Up to `limit` dead letters with an id greater than `after`, in id order.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(DEAD_LETTERS)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            out.push(decode("dead letter", v.value())?);
        }
        Ok(out)
    }

    /// The newest `limit` reconciliation reports of `site`, newest first.
    pub fn reports(&self, site: &str, limit: usize) -> Result<Vec<ReconReport>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(REPORTS)?;
        let mut out = Vec::new();
        for row in t.range((site, 0u64)..=(site, u64::MAX))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            out.push(decode("report", v.value())?);
        }
        Ok(out)
    }

    /// One pool of the ledger (`None` if central never heard of it).
    pub fn pool(&self, key: &LedgerKey) -> Result<Option<CentralPool>, ReadError> {
        Ok(self
            .ledger(
                &LedgerFilter {
                    key: Some(key.clone()),
                    site: None,
                },
                1,
            )?
            .pop()
            .map(|e| e.pool))
    }

    /// Up to `limit` pools of the ledger matching `filter` with their open reclaims: ATP pools in
    /// (site, SKU) order, then credit pools in customer order.
    pub fn ledger(
        &self,
        filter: &LedgerFilter,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, ReadError> {
        let txn = self.read()?;
        let atp = txn.open_table(LEDGER_ATP)?;
        let credit = txn.open_table(LEDGER_CREDIT)?;
        let mut pools: Vec<(LedgerKey, CentralPool)> = Vec::new();
        match &filter.key {
            Some(key @ LedgerKey::Atp { sku, site }) => {
                if let Some(v) = atp.get((site.as_str(), sku.as_str()))? {
                    pools.push((key.clone(), decode("pool", v.value())?));
                }
            }
            Some(key @ LedgerKey::Credit { customer }) => {
                if let Some(v) = credit.get(customer.as_str())? {
                    pools.push((key.clone(), decode("pool", v.value())?));
                }
            }
            None => {
                let rows = match &filter.site {
                    Some(site) => atp.range((site.as_str(), "")..)?,
                    None => atp.range::<(&str, &str)>(..)?,
                };
                for row in rows {
                    if pools.len() >= limit {
                        break;
                    }
                    let (k, v) = row?;
                    let (site, sku) = k.value();
                    if filter.site.as_deref().is_some_and(|s| s != site) {
                        break;
                    }
                    pools.push((LedgerKey::atp(sku, site), decode("pool", v.value())?));
                }
                for row in credit.iter()? {
                    if pools.len() >= limit {
                        break;
                    }
                    let (k, v) = row?;
                    pools.push((LedgerKey::credit(k.value()), decode("pool", v.value())?));
                }
            }
        }
        let open = txn.open_table(OPEN_RECLAIMS)?;
        let mut out = Vec::with_capacity(pools.len());
        for (key, pool) in pools {
            let text = key.text();
            let mut open_reclaims = BTreeMap::new();
            for row in open.range((text.as_str(), "")..)? {
                let (k, v) = row?;
                let (pool_text, site) = k.value();
                if pool_text != text {
                    break;
                }
                let r: OpenReclaim = decode("reclaim", v.value())?;
                open_reclaims.insert(site.to_string(), r.qty);
            }
            out.push(LedgerEntry {
                key,
                pool,
                open_reclaims,
            });
        }
        Ok(out)
    }
}

/// Which exceptions to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionFilter {
    Open,
    Resolved,
    All,
}

/// Which pools to list: one by key, or the ATP pools of a site (plus every credit pool), or all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerFilter {
    pub key: Option<LedgerKey>,
    pub site: Option<String>,
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ReadError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(what, e))
}

enum InitError {
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
fn new_incarnation() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Creates the tables, stamps or checks the schema version (drawing the incarnation of a new
/// store), and returns the current revision.
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
    let rev_before = *shared.revision.borrow();
    let mut pending: Vec<Box<dyn Held>> = Vec::with_capacity(group.len());
    let mut broken: Option<String> = None;
    let mut rest = group.into_iter();
    for op in rest.by_ref() {
        match op {
            Op::Job(job) => match job.apply(&txn, &shared.opts) {
                Applied::Done(held) => pending.push(held),
                Applied::Broken(why, held) => {
                    pending.push(held);
                    broken = Some(why);
                    break;
                }
            },
            Op::Shutdown { reply } => pending.push(Box::new(HeldShutdown(reply))),
        }
    }
    // Any op may have written master changes (ERP data, grants, reclaims, order statuses); the
    // revision is announced once the commit made them durable.
    let new_revision = match broken {
        Some(_) => None,
        None => match meta_get(&txn, META_REVISION) {
            Ok(rev) => (rev > rev_before).then_some(rev),
            Err(Broken(why)) => {
                broken = Some(why);
                None
            }
        },
    };
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
    match (shared.opener)() {
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

/// Takes the next number of the counter `key` (1, 2, ...).
fn next_id(txn: &WriteTransaction, key: &str) -> Result<u64, Broken> {
    let id = meta_get(txn, key)? + 1;
    meta_set(txn, key, id)?;
    Ok(id)
}

/// Appends `change` to the change log with the next revision; returns that revision.
fn append_change(txn: &WriteTransaction, change: &MasterChange) -> Result<u64, Broken> {
    let rev = next_id(txn, META_REVISION)?;
    let mut log = txn.open_table(CHANGES)?;
    log.insert(rev, encode(change).as_slice())?;
    Ok(rev)
}

/// Appends an event to the global feed under the next cursor; returns the cursor.
fn append_feed(
    txn: &WriteTransaction,
    site: &str,
    channel: Channel,
    event: &EventEnvelope,
) -> Result<u64, Broken> {
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
struct FeedRowRef<'a> {
    site: &'a str,
    channel: Channel,
    event: &'a EventEnvelope,
}

/// Appends `events` to the feed under consecutive cursors: the cursor and the feed table are
/// read and written once for the run, not once per event (the drain of a large backlog is
/// mostly milestones).
fn append_feed_run(
    txn: &WriteTransaction,
    site: &str,
    channel: Channel,
    events: &[&EventEnvelope],
) -> Result<(), Broken> {
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
fn decode_w<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, Broken> {
    postcard::from_bytes(bytes).map_err(|e| Broken(format!("stored {what} is corrupt: {e}")))
}

fn get_pool(txn: &WriteTransaction, key: &LedgerKey) -> Result<Option<CentralPool>, Broken> {
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

fn put_pool(txn: &WriteTransaction, key: &LedgerKey, pool: &CentralPool) -> Result<(), Broken> {
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

fn get_order(txn: &WriteTransaction, order_id: &str) -> Result<Option<OrderRecord>, Broken> {
    let t = txn.open_table(ORDERS)?;
    let v = t.get(order_id)?;
    v.map(|v| decode_w("order", v.value())).transpose()
}

fn put_order(txn: &WriteTransaction, order: &OrderRecord) -> Result<(), Broken> {
    let mut t = txn.open_table(ORDERS)?;
    t.insert(order.order_id.as_str(), encode(order).as_slice())?;
    Ok(())
}

fn get_customer(
    txn: &WriteTransaction,
    id: &str,
) -> Result<Option<outpost_protocol::CustomerRecord>, Broken> {
    let t = txn.open_table(CUSTOMERS)?;
    let v = t.get(id)?;
    v.map(|v| decode_w("customer", v.value())).transpose()
}

/// Central's effective price of `sku` for `customer`: the customer's own, else the list price.
fn effective_price(
    txn: &WriteTransaction,
    sku: &str,
    customer: &str,
) -> Result<Option<outpost_protocol::PriceRecord>, Broken> {
    let t = txn.open_table(PRICES)?;
    let v = match t.get((sku, customer))? {
        Some(v) => Some(v),
        None => t.get((sku, ""))?,
    };
    v.map(|v| decode_w("price", v.value())).transpose()
}

/// Applies the ERP's items, then the reclaims and top-ups their new figures call for.
fn apply_master(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    changes: &[MasterChange],
    now_ms: i64,
) -> Outcome<MasterApplied, UpsertMasterError> {
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
    if !invalid.is_empty() {
        return Ok(Err(UpsertMasterError::Invalid(invalid)));
    }
    let mut touched = std::collections::BTreeSet::new();
    for change in changes {
        append_change(txn, change)?;
        match change {
            MasterChange::Price(p) => {
                let mut prices = txn.open_table(PRICES)?;
                let key = (p.sku.as_str(), p.customer.as_deref().unwrap_or(""));
                prices.insert(key, encode(p).as_slice())?;
            }
            MasterChange::Atp(a) => {
                txn.open_table(ATP)?
                    .insert((a.sku.as_str(), a.site.as_str()), a.available)?;
                txn.open_table(LEDGER_SITES)?.insert(a.site.as_str(), 0)?;
                let key = LedgerKey::atp(&a.sku, &a.site);
                let mut pool = get_pool(txn, &key)?.unwrap_or_default();
                pool.handle_erp_push(a.available);
                put_pool(txn, &key, &pool)?;
                touched.insert(key);
            }
            MasterChange::Customer(c) => {
                txn.open_table(CUSTOMERS)?
                    .insert(c.id.as_str(), encode(c).as_slice())?;
                let key = LedgerKey::credit(&c.id);
                let mut pool = get_pool(txn, &key)?.unwrap_or_default();
                pool.handle_erp_push(c.credit_limit.units());
                put_pool(txn, &key, &pool)?;
                touched.insert(key);
            }
            MasterChange::Grant(_) | MasterChange::Reclaim(_) | MasterChange::OrderStatus(_) => {
                unreachable!("refused above")
            }
        }
    }
    let sites = allowance::eligible_sites(txn, opts, now_ms)?;
    let moved = allowance::run_policy(
        txn,
        opts,
        allowance::Scope::Pools(touched),
        &sites,
        &Default::default(),
        now_ms,
    )?;
    Ok(Ok(MasterApplied {
        revision: meta_get(txn, META_REVISION)?,
        changes: changes.len(),
        grants: moved.grants,
        reclaims: moved.reclaims,
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
        EventEnvelope::new(
            site,
            seq,
            &format!("{site}-e{seq}"),
            1_700_000_000_000 + seq as i64,
            &EventBody::Milestone(Milestone {
                shipment_id: "S1".into(),
                milestone: MilestoneKind::Picked,
                scanner_id: "scan-1".into(),
                at: "2026-01-01T00:00:00Z".into(),
            }),
        )
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
                new_hwm: 5,
                dead_letters: 0,
                exceptions: 0,
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
                new_hwm: 5,
                dead_letters: 0,
                exceptions: 0,
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
                new_hwm: 7,
                dead_letters: 0,
                exceptions: 0,
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
                changes: 2,
                grants: 0,
                reclaims: 0,
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
        // The ATP push tops plant-1 up to the ATP target (20 of 40) and the customer push tops
        // every known site (plant-1, known from its ATP) up to 20% of the credit limit of
        // 1000.00: two grants after the three ERP items.
        assert_eq!(
            b,
            MasterApplied {
                revision: 7,
                changes: 3,
                grants: 2,
                reclaims: 0,
            }
        );
        assert_eq!(*rev_rx.borrow_and_update(), 7);
        assert_eq!(store.revision().unwrap(), 7);
        let log = store.changes_after(0, 100).unwrap();
        let revs: Vec<u64> = log.iter().map(|c| c.0).collect();
        assert_eq!(revs, vec![1, 2, 3, 4, 5, 6, 7]);
        assert!(matches!(&log[5].1, MasterChange::Grant(g) if g.qty == 20 && g.site == "plant-1"));
        assert!(matches!(&log[6].1, MasterChange::Grant(g) if g.qty == 2_000_000));
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
        // Central's own changes never come in through the ERP path.
        let grant = MasterChange::Grant(outpost_protocol::Grant {
            site: "plant-1".into(),
            pool: Pool::atp("BOLT-M8"),
            qty: 1,
        });
        assert!(matches!(
            store.upsert_master(vec![grant]).await,
            Err(UpsertMasterError::Invalid(_))
        ));
        assert_eq!(store.revision().unwrap(), 7);
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
            Err(OpenStoreError::Migrate(MigrateError::Newer {
                found: 99,
                ..
            }))
        ));
    }
}
