//! The store's writer thread (group commit): it takes queued operations, runs up to
//! `MAX_GROUP` of them in one write transaction, commits once, and only then answers each one;
//! after a failed commit it reopens the database. Blocking I/O side: a dedicated thread, never
//! the async runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use outpost_protocol::MasterBatch;
use redb::{Database, Durability};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::acks::{MAX_PRUNE_PER_STEP, mark_acked, prune_acked, rewind_acked};
use super::error::{Fail, OpenStoreError, WriteError};
use super::incarnation::adopt_incarnation;
use super::master::apply_master;
use super::milestone::record_milestone;
use super::order::create_order;
use super::schema::Tables;
use super::types::{
    IncarnationChange, MilestoneRecord, NewMilestone, NewOrder, OrderRecord, Outcome, Pruned,
    Retention,
};

/// Depth of the queue in front of the writer thread. When it is full, callers wait (the HTTP
/// request is simply slower); 4,096 is ~16 full groups, far more than a 2-core box produces
/// while one fsync is in flight.
pub const WRITE_QUEUE_DEPTH: usize = 4096;
/// Most operations committed in one transaction. Larger groups add latency for the first caller
/// and copy-on-write work, with little gain past a few hundred (see performance.md §4.2).
pub const MAX_GROUP: usize = 256;
/// How often the writer tries to reopen the database after a failed commit before giving up
/// until the next group.
const REOPEN_ATTEMPTS: u32 = 20;
/// Pause between reopen attempts: readers may still hold the old handle for a moment.
const REOPEN_PAUSE: Duration = Duration::from_millis(25);

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

pub(super) enum Op {
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
        hello_last_seq: u64,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    },
    Shutdown,
}

pub(super) enum Reply {
    Order(Outcome<OrderRecord>),
    Milestone(Outcome<MilestoneRecord>),
    Master(bool),
    Acked(u64),
    Pruned(Pruned),
    Rewound(u64),
    Incarnation(IncarnationChange),
}

/// Opens the database file (and prepares its tables); called at start and after a failure.
pub(super) type Opener = Box<dyn Fn() -> Result<Database, OpenStoreError> + Send + Sync>;

pub(super) struct Shared {
    pub(super) opener: Opener,
    pub(super) site: String,
    pub(super) retention: Retention,
    /// `None` while the writer reopens the database after a failure; readers then get
    /// `Unavailable`. An `Arc` so that a reader's handle outlives a swap without blocking it.
    pub(super) db: RwLock<Option<Arc<Database>>>,
    /// Woken after a commit that added outbox events.
    pub(super) new_events: Notify,
    /// The applied master revision, published after each commit that moved it.
    pub(super) master_rev: watch::Sender<u64>,
    pub(super) stats: WriterStats,
}

/// Owns the writer thread; `shutdown` stops it after the operations already queued.
pub struct StoreWriter {
    pub(super) tx: mpsc::Sender<Op>,
    pub(super) handle: std::thread::JoinHandle<()>,
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

type Pending = (
    oneshot::Sender<Result<Reply, WriteError>>,
    Result<Reply, WriteError>,
);

pub(super) fn run_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Op>) {
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
    pub(super) new_events: bool,
    /// A transaction was committed (false when every operation was a refusal or a repeat).
    committed: bool,
    /// The master revision this group applied, if it applied any.
    pub(super) master_rev: Option<u64>,
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
                    hello_last_seq,
                    reply,
                } => {
                    let r = adopt_incarnation(
                        &mut tables,
                        incarnation,
                        master_from_rev,
                        hello_last_seq,
                    );
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
