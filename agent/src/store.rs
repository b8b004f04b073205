//! The agent's durable store (redb): master-data cache, allowances, outbox, order, idempotency
//! and milestone records. Blocking I/O side: every write goes through one dedicated writer thread that groups
//! concurrent operations into one durable transaction (group commit) and answers each operation
//! only after that transaction committed; reads run directly on the caller's thread.
//!
//! Layout: `types` (values and limits), `error`, `schema` (tables, opening), `writer` (the group
//! commit thread), one module per write operation (`order`, `milestone`, `master`, `acks`,
//! `incarnation`) and `reads`. This file holds the `Store` handle that submits to the writer.

use std::path::Path;
use std::sync::{Arc, RwLock};

use outpost_protocol::MasterBatch;
use redb::{Database, ReadableDatabase};
use tokio::sync::{Notify, mpsc, oneshot, watch};

mod acks;
mod error;
mod incarnation;
mod master;
mod milestone;
mod order;
mod reads;
mod schema;
mod types;
mod writer;

#[cfg(test)]
mod tests;

pub use acks::{MAX_PRUNE_PER_STEP, PRUNE_INTERVAL, run_pruner};
pub use error::{OpenStoreError, ReadError, ReadMetaError, WriteError};
pub use master::return_event_id;
pub use milestone::validate_new_milestone;
pub use order::validate_new_order;
pub use reads::MAX_ALLOWANCES_LISTED;
pub use schema::{CACHE_BYTES, SCHEMA_VERSION, parse_pool_key};
pub use types::{
    AtpView, DEFAULT_RETAIN_ACKED_EVENTS, DEFAULT_RETAIN_ACKED_SECS, IncarnationChange,
    MAX_OUTBOX_EVENTS, MAX_RETAIN_ACKED_EVENTS, MAX_RETAIN_ACKED_SECS, Marks, MilestoneRecord,
    NewLine, NewMilestone, NewOrder, OrderRecord, OutboxSummary, Outcome, PriceValue, Pruned,
    Retention, now_ms, rfc3339_millis,
};
pub use writer::{MAX_GROUP, StoreWriter, WRITE_QUEUE_DEPTH, WriterStats};

use error::{mismatch, storage};
use schema::{K_MASTER_REV, open_db, prepare_db, read_meta};
use writer::{Op, Opener, Reply, Shared, run_writer};

/// Handle to the store: cheap to clone; reads run on the caller, writes go to the writer thread.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
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
        let rev = read_meta(&db, K_MASTER_REV).map_err(OpenStoreError::ReadMeta)?;
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
    /// applied master revision becomes `master_from_rev` (central resends from there). Orders
    /// confirmed after `hello_last_seq` (the last seq the session's Hello named) drew on the
    /// dropped allowances, but the new central counts them against its new grants: their units
    /// are owed, so each pool they used starts below 0 and the new grants repay it first. Must
    /// run before any master batch of the session is applied.
    pub async fn adopt_central_incarnation(
        &self,
        incarnation: u64,
        master_from_rev: u64,
        hello_last_seq: u64,
    ) -> Result<IncarnationChange, WriteError> {
        match self
            .submit(|reply| Op::AdoptIncarnation {
                incarnation,
                master_from_rev,
                hello_last_seq,
                reply,
            })
            .await?
        {
            Reply::Incarnation(c) => Ok(c),
            _ => Err(mismatch()),
        }
    }
}
