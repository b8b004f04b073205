//! Central's acknowledgements and what follows from them inside a write group: moving the
//! acked mark, pruning acknowledged events past their retention, rewinding the mark for a
//! restored central; and the pruner task that prunes a quiet site. Blocking I/O side (the
//! writer's transaction), plus one async task that only submits to the writer.

use std::time::Duration;

use outpost_protocol::EventEnvelope;
use redb::{ReadableTable, ReadableTableMetadata};
use tokio::sync::watch;

use super::Store;
use super::error::{Fail, WriteError};
use super::schema::{K_ACKED_SEQ, K_LAST_SEQ, Tables};
use super::types::{Pruned, Retention};

/// Most acknowledged rows pruned in one write transaction (shared by every ack and prune of a
/// group). A huge backlog acknowledged at once (or a lowered retention) is pruned over several
/// transactions instead of one that copies half the table; 10,000 rows keep a commit in the
/// milliseconds on an edge box.
pub const MAX_PRUNE_PER_STEP: usize = 10_000;
/// How often `run_pruner` removes acknowledged events past their retention when no ack does it
/// (a quiet site): age-based retention needs nothing finer than a minute.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Moves the acked mark to `through` (never back). Returns the mark afterwards and whether it
/// moved. The rows stay: `prune_acked` removes them once past their retention.
pub(super) fn mark_acked(t: &mut Tables<'_>, through: u64) -> Result<(u64, bool), Fail> {
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
pub(super) fn prune_acked(
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
pub(super) fn rewind_acked(t: &mut Tables<'_>, to: u64) -> Result<u64, Fail> {
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
