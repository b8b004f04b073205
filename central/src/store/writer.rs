//! The store's writer: one thread that takes queued write operations, runs a group of them in
//! one redb write transaction, commits once (group commit: one fsync for the group) and only
//! then answers each caller; on a storage error it aborts the group and reopens the database.
//! I/O side (redb, its own thread).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot, watch};

use super::txn::meta_get;
use super::{MAX_GROUP, META_REVISION, REOPEN_WAIT, StoreOptions, StoreUnavailable};

/// One write operation queued for the writer: a function run inside the group's transaction and
/// the channel its result goes back on once the group has committed.
pub(super) trait Job: Send {
    /// Runs the operation in `txn`. On success its answer is held until the commit; a storage
    /// error aborts the whole group (the held answer then only serves to fail the caller).
    fn apply(self: Box<Self>, txn: &WriteTransaction, opts: &StoreOptions) -> Applied;
    /// Answers the caller with `StoreUnavailable` without running.
    fn fail(self: Box<Self>, why: &str);
}

/// An answer held until the group's commit decides whether it is delivered.
pub(super) trait Held: Send {
    fn deliver(self: Box<Self>);
    fn fail(self: Box<Self>, why: &str);
}

pub(super) enum Applied {
    Done(Box<dyn Held>),
    Broken(String, Box<dyn Held>),
}

/// Result of an operation inside the transaction: `Err(ApplyError)` is a storage error (the group is
/// aborted); the inner `Result` is the caller's answer.
pub(super) type Outcome<T, E> = Result<Result<T, E>, ApplyError>;

pub(super) type JobFn<T, E> =
    Box<dyn FnOnce(&WriteTransaction, &StoreOptions) -> Outcome<T, E> + Send>;

pub(super) struct TxJob<T, E> {
    pub(super) run: JobFn<T, E>,
    pub(super) reply: oneshot::Sender<Result<T, E>>,
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
            Err(e) => Applied::Broken(
                e.to_string(),
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

pub(super) enum Op {
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
pub(super) type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

pub(super) struct Shared {
    pub(super) path: PathBuf,
    pub(super) opener: Opener,
    pub(super) opts: StoreOptions,
    /// `None` while the writer is reopening after an I/O error, or after shutdown.
    pub(super) db: RwLock<Option<Arc<Database>>>,
    pub(super) revision: watch::Sender<u64>,
}

impl Shared {
    pub(super) fn db(&self) -> Result<Arc<Database>, StoreUnavailable> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreUnavailable("the database is being reopened or closed".into()))
    }
}

/// The writer thread: takes one op, drains what else is queued (up to `MAX_GROUP`), executes them
/// in one transaction, commits once, then answers each op.
pub(super) fn run_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Op>) {
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

/// Why an operation could not be applied inside the group's write transaction: a storage
/// error or a record that does not decode. The whole group is aborted and every caller in it is
/// answered `StoreUnavailable` with this text.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApplyError {
    #[error("{0}")]
    Storage(Box<redb::Error>),
    #[error("stored {what} is corrupt: {source}")]
    Corrupt {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("exception {id} refers to order {order_id} which is not stored")]
    MissingOrder { id: u64, order_id: String },
}

// Every redb error type converts, so `?` works on any redb call inside an operation.
impl<E: Into<redb::Error>> From<E> for ApplyError {
    fn from(e: E) -> Self {
        ApplyError::Storage(Box::new(e.into()))
    }
}

fn execute_group(shared: &Shared, group: Vec<Op>) {
    let db = match current_or_reopen(shared) {
        Ok(db) => db,
        Err(e) => {
            for op in group {
                op.fail(&e.0);
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
            Err(e) => {
                broken = Some(e.to_string());
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

fn current_or_reopen(shared: &Shared) -> Result<Arc<Database>, StoreUnavailable> {
    if let Ok(db) = shared.db() {
        return Ok(db);
    }
    reopen(shared);
    shared.db()
}

/// Drops the (poisoned) handle and opens the file again. redb refuses a second handle on the same
/// file, so readers' clones are waited for, bounded by `REOPEN_WAIT`.
pub(super) fn reopen(shared: &Shared) {
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
