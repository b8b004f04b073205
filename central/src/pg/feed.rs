//! The feed: events get their feed position after they commit, from one sequencer at a time.
//!
//! An event's insert id is taken when its transaction inserts it, but transactions commit in
//! another order, so a reader paging by id could pass an id whose row commits a moment later.
//! The sequencer numbers committed rows that have no position yet, in id order, continuing from
//! `feed_head`, in one transaction; positions are gapless and only ever appended, so a reader
//! paging by position never skips an event. Any node may run it: the head's row lock and an
//! advisory lock make one pass at a time, and a node that finds the lock taken leaves the pass to
//! the holder.

use std::time::Duration;

use outpost_protocol::EventEnvelope;
use tokio::sync::watch;

use super::{PgError, PgStore};
use crate::event_log::{FeedEntry, LogReadError};

/// Most events numbered in one pass (bounded work per transaction).
pub const SEQUENCE_BATCH: i64 = 50_000;
/// How often the sequencer looks for events committed by other nodes.
pub const SEQUENCE_POLL: Duration = Duration::from_millis(50);
/// Key of the advisory lock of a sequencer pass.
const SEQUENCER_LOCK: i64 = 7_601_002;

impl PgStore {
    /// One sequencer pass: numbers up to `SEQUENCE_BATCH` committed events that have no feed
    /// position. Returns how many it numbered (0 when another node is numbering).
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
        let n = txn
            .execute(
                "WITH todo AS ( \
                     SELECT id, $1::bigint + row_number() OVER (ORDER BY id) AS pos \
                     FROM (SELECT id FROM events WHERE feed_pos IS NULL ORDER BY id LIMIT $2) t \
                 ) \
                 UPDATE events e SET feed_pos = todo.pos FROM todo WHERE e.id = todo.id",
                &[&head, &SEQUENCE_BATCH],
            )
            .await?;
        if n > 0 {
            let n_i = i64::try_from(n).unwrap_or(i64::MAX);
            txn.execute("UPDATE feed_head SET pos = pos + $1 WHERE id = 1", &[&n_i])
                .await?;
        }
        txn.commit().await?;
        Ok(n)
    }

    /// Runs sequencer passes until `shutdown` turns true: at once after a local upload, and
    /// every `SEQUENCE_POLL` for other nodes' uploads. A failed pass is logged and retried.
    pub fn spawn_sequencer(&self, mut shutdown: watch::Receiver<bool>) -> Sequencer {
        let store = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match store.sequence_once().await {
                    // A full batch: more may be waiting.
                    Ok(n) if n >= SEQUENCE_BATCH as u64 => continue,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "feed sequencer pass failed; retrying"),
                }
                tokio::select! {
                    _ = store.uploaded.notified() => {}
                    _ = tokio::time::sleep(SEQUENCE_POLL) => {}
                    _ = shutdown.changed() => {}
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
                "SELECT feed_pos, site, seq, event_id, at_ms, body_schema, body, trace_id \
                 FROM events WHERE feed_pos > $1 ORDER BY feed_pos LIMIT $2",
                &[&after, &limit],
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
                    schema: u16::try_from(r.get::<_, i16>(5)).unwrap_or(0),
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
