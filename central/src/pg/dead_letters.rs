//! Dead letters on PostgreSQL: events whose body cannot be decoded or validated, kept with the
//! reason under consecutive ids (taken under the head row's lock, so a reader paging after a
//! cursor never skips one), in the upload's transaction.

use outpost_protocol::EventEnvelope;

use super::{PgError, PgStore};
use crate::dead_letter_log::DeadLetterLog;
use crate::event_log::LogReadError;
use crate::store::DeadLetter;

/// Stores `dead` (event, reason) of `site` in the upload's transaction `txn`.
pub(super) async fn insert(
    txn: &deadpool_postgres::Transaction<'_>,
    site: &str,
    dead: &[(&EventEnvelope, String)],
    now_ms: i64,
) -> Result<(), PgError> {
    let last: i64 = txn
        .query_one(
            "SELECT last_id FROM dead_letters_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?
        .get(0);
    let mut ids = Vec::with_capacity(dead.len());
    let mut seqs = Vec::with_capacity(dead.len());
    let mut event_ids = Vec::with_capacity(dead.len());
    let mut reasons = Vec::with_capacity(dead.len());
    let mut envelopes = Vec::with_capacity(dead.len());
    for (i, (e, why)) in dead.iter().enumerate() {
        let id = last + 1 + i64::try_from(i).unwrap_or(i64::MAX);
        tracing::warn!(site.id = %site, seq = e.seq, dead_letter = id, reason = %why, "event dead-lettered");
        ids.push(id);
        seqs.push(
            i64::try_from(e.seq).map_err(|_| PgError(format!("seq {} out of range", e.seq)))?,
        );
        // The site's own string, bounded by the frame; kept whole for a replay.
        event_ids.push(e.event_id.as_str());
        reasons.push(why.as_str());
        envelopes.push(
            postcard::to_allocvec(*e).map_err(|err| PgError(format!("cannot encode: {err}")))?,
        );
    }
    txn.execute(
        "INSERT INTO dead_letters (id, site, seq, event_id, reason, event, created_ms) \
         SELECT i, $1, s, e, r, ev, $7 \
         FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bytea[]) \
         AS u(i, s, e, r, ev)",
        &[
            &site, &ids, &seqs, &event_ids, &reasons, &envelopes, &now_ms,
        ],
    )
    .await?;
    let new_last = last + i64::try_from(dead.len()).unwrap_or(i64::MAX);
    txn.execute(
        "UPDATE dead_letters_head SET last_id = $1 WHERE id = 1",
        &[&new_last],
    )
    .await?;
    Ok(())
}

impl DeadLetterLog for PgStore {
    async fn dead_letters(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, LogReadError> {
        let client = self.client().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT id, site, seq, event_id, reason, event, created_ms FROM dead_letters \
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &limit],
            )
            .await
            .map_err(PgError::from)?;
        rows.iter()
            .map(|r| {
                let event: EventEnvelope = postcard::from_bytes(r.get::<_, &[u8]>(5))
                    .map_err(|e| LogReadError(format!("stored dead letter is corrupt: {e}")))?;
                Ok(DeadLetter {
                    id: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                    site: r.get(1),
                    seq: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    event_id: r.get(3),
                    reason: r.get(4),
                    event,
                    created_ms: r.get(6),
                })
            })
            .collect()
    }
}
