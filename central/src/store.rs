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
mod master;
mod migrate;
mod orders;
mod reads;
mod records;
mod revoked;
mod schema;
mod schema3;
mod txn;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use outpost_protocol::session::IngestError;
use outpost_protocol::{CentralPool, EventEnvelope, MasterChange, Pool, ValidationError};
use redb::{Database, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use alerts::{Alert, MAX_ALERTS, NewAlert};
pub use allowance::{AllowanceAnswer, HelloMarks, PolicyOutcome, SessionStart};
pub use backup::{
    BackupError, BackupInfo, RestoreError, RestoreInfo, RestoredStore, restore_store,
};
pub use counts::TableCounts;
pub use drills::MAX_DRILLS;
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

use master::apply_master;
use reads::decode;
pub use reads::{ExceptionFilter, LedgerFilter};
pub use schema::SCHEMA_VERSION;
// Every operation module names the tables, meta keys and write helpers as `super::X`.
use schema::*;
use txn::*;
use writer::{ApplyError, Op, Opener, Outcome, Shared, TxJob, run_writer};

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
