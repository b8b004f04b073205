//! The feed: events get their feed position after they commit, from one sequencer at a time.
//!
//! An upload's insert id is taken when its transaction inserts it, but transactions commit in
//! another order, so a reader paging by id could pass an id whose rows commit a moment later.
//! The sequencer numbers committed upload batches that have no position yet, in id order,
//! continuing from `feed_head`, in one transaction: a batch of n events gets `feed_start`, and
//! its events the positions `feed_start + 1 ..= feed_start + n` in their order in the batch.
//! Positions are gapless and only ever appended, so a reader paging by position never skips an
//! event, and the sequencer's work is one row per batch, not per event. Any node may run it: the
//! head's row lock and an advisory lock make one pass at a time, and a node that finds the lock
//! taken leaves the pass to the holder.

use std::time::Duration;

use outpost_protocol::EventEnvelope;
use tokio::sync::watch;

use super::{PgError, PgStore};
use crate::event_log::{FeedEntry, LogReadError};

/// Most upload batches numbered in one pass (bounded work per transaction).
pub const SEQUENCE_BATCH: i64 = 5_000;
/// How often the sequencer looks for events committed by other nodes.
pub const SEQUENCE_POLL: Duration = Duration::from_millis(50);
/// Most events of one batch (`MAX_EVENTS_PER_BATCH`): the first batch a page needs starts at
/// most this far before the page's cursor.
const MAX_BATCH: i64 = outpost_protocol::MAX_EVENTS_PER_BATCH as i64;
/// Longest pause between sequencer passes while they fail (the database is down).
pub const SEQUENCE_RETRY_MAX: Duration = Duration::from_secs(5);
/// Key of the advisory lock of a sequencer pass.
const SEQUENCER_LOCK: i64 = 7_601_002;

impl PgStore {
    /// One sequencer pass: numbers up to `SEQUENCE_BATCH` committed upload batches that have no
    /// feed position. Returns how many batches it numbered (0 when another node is numbering).
    pub async fn sequence_once(&self) -> Result<u64, PgError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let locked: bool = txn
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&SEQUENCER_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(0);
        }
        let head: i64 = txn
            .query_one("SELECT pos FROM feed_head WHERE id = 1 FOR UPDATE", &[])
            .await?
            .get(0);
        let rows = txn
            .query(
                "WITH todo AS ( \
                     SELECT id, $1::bigint + sum(n) OVER (ORDER BY id) - n AS start \
                     FROM (SELECT id, n FROM batches WHERE feed_start IS NULL \
                           ORDER BY id LIMIT $2) t \
                 ) \
                 UPDATE batches b SET feed_start = todo.start FROM todo WHERE b.id = todo.id \
                 RETURNING b.n",
                &[&head, &SEQUENCE_BATCH],
            )
            .await?;
        let events: i64 = rows.iter().map(|r| i64::from(r.get::<_, i32>(0))).sum();
        if events > 0 {
            txn.execute(
                "UPDATE feed_head SET pos = pos + $1 WHERE id = 1",
                &[&events],
            )
            .await?;
        }
        txn.commit().await?;
        Ok(rows.len() as u64)
    }

    /// Runs sequencer passes until `shutdown` turns true (or its sender is gone): at once after
    /// a local upload, and every `SEQUENCE_POLL` for other nodes' uploads. A failed pass is
    /// retried after a pause that doubles up to `SEQUENCE_RETRY_MAX`, logged once per run of
    /// failures.
    pub fn spawn_sequencer(&self, mut shutdown: watch::Receiver<bool>) -> Sequencer {
        let store = self.clone();
        let task = tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                let pause = match store.sequence_once().await {
                    // A full batch: more may be waiting.
                    Ok(n) if n >= SEQUENCE_BATCH as u64 => continue,
                    Ok(_) => {
                        if failures > 0 {
                            tracing::info!(failures, "feed sequencer passes succeed again");
                        }
                        failures = 0;
                        SEQUENCE_POLL
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 {
                            tracing::warn!(error = %e, "feed sequencer pass failed; retrying");
                        }
                        (SEQUENCE_POLL * 2u32.saturating_pow(failures.min(8)))
                            .min(SEQUENCE_RETRY_MAX)
                    }
                };
                tokio::select! {
                    _ = store.uploaded.notified(), if failures == 0 => {}
                    _ = tokio::time::sleep(pause) => {}
                    r = shutdown.changed() => {
                        if r.is_err() {
                            break;
                        }
                    }
                }
                if *shutdown.borrow() {
                    break;
                }
            }
        });
        Sequencer { task }
    }

    /// Up to `limit` events with a feed position greater than `after`, in position order.
    pub(crate) async fn feed_page(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<FeedEntry>, LogReadError> {
        let client = self.client().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT b.feed_start + e.idx, e.site, e.seq, e.event_id, e.at_ms, \
                        e.body_schema, e.body, e.trace_id \
                 FROM batches b JOIN events e ON e.batch_id = b.id \
                 WHERE b.feed_start > $1::bigint - $3::bigint AND b.feed_start + b.n > $1::bigint \
                   AND b.feed_start + e.idx > $1::bigint \
                 ORDER BY b.feed_start, e.idx LIMIT $2",
                &[&after, &limit, &MAX_BATCH],
            )
            .await
            .map_err(PgError::from)?;
        Ok(rows
            .iter()
            .map(|r| FeedEntry {
                pos: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                event: EventEnvelope {
                    site: r.get(1),
                    seq: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    event_id: r.get(3),
                    at_ms: r.get(4),
                    schema: u16::try_from(r.get::<_, i32>(5)).unwrap_or(0),
                    body: r.get(6),
                    trace_id: r.get(7),
                },
            })
            .collect())
    }
}

/// The running sequencer task; stops with its shutdown signal, or when dropped.
pub struct Sequencer {
    task: tokio::task::JoinHandle<()>,
}

impl Sequencer {
    /// Waits for the task to end (after its shutdown signal).
    pub async fn join(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for Sequencer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
