//! Uploads: a site's batch stored and its mark moved in one transaction, under the site's row
//! lock.

use outpost_protocol::EventEnvelope;
use outpost_protocol::session::plan_ingest;

use super::{PgError, PgStore};
use crate::event_log::{EventLog, FeedEntry, LogReadError, UploadError, Uploaded};
use crate::store::now_ms;

impl From<PgError> for UploadError {
    fn from(e: PgError) -> Self {
        UploadError::Unavailable(e.0)
    }
}

impl From<PgError> for LogReadError {
    fn from(e: PgError) -> Self {
        LogReadError(e.0)
    }
}

fn seq_i64(seq: u64) -> Result<i64, UploadError> {
    i64::try_from(seq).map_err(|_| UploadError::SeqOutOfRange(seq))
}

impl PgStore {
    async fn upload_batch(
        &self,
        site: &str,
        events: &[EventEnvelope],
    ) -> Result<Uploaded, UploadError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(PgError::from)?;
        let now = now_ms();
        // One statement creates the site's row on first contact and locks it (an upsert's
        // update takes the row lock until the commit). That serializes uploads of this site
        // across nodes: a second one waits here, then reads the mark the first one committed.
        let hwm: i64 = txn
            .query_one(
                "INSERT INTO sites (site, first_seen_ms, last_seen_ms) VALUES ($1, $2, $2) \
                 ON CONFLICT (site) DO UPDATE \
                 SET last_seen_ms = GREATEST(sites.last_seen_ms, EXCLUDED.last_seen_ms) \
                 RETURNING hwm",
                &[&site, &now],
            )
            .await
            .map_err(PgError::from)?
            .get(0);
        let hwm = u64::try_from(hwm).unwrap_or(0);
        let plan = plan_ingest(site, hwm, events)?;
        let fresh = &events[plan.duplicates..];
        // One bad event never blocks the batch: an event whose body cannot be decoded or
        // validated takes its place in the sequence (the mark moves past it) and goes to the
        // dead letters with the reason; the others go to the feed.
        let mut new: Vec<&EventEnvelope> = Vec::with_capacity(fresh.len());
        let mut dead: Vec<(&EventEnvelope, String)> = Vec::new();
        for e in fresh {
            match e.decode() {
                Ok(_) => new.push(e),
                Err(why) => dead.push((e, why.to_string())),
            }
        }
        if !dead.is_empty() {
            super::dead_letters::insert(&txn, site, &dead, now).await?;
        }
        if !new.is_empty() {
            let n = i32::try_from(new.len()).unwrap_or(i32::MAX);
            let batch_id: i64 = txn
                .query_one(
                    "INSERT INTO batches (site, n, received_ms) VALUES ($1, $2, $3) RETURNING id",
                    &[&site, &n, &now],
                )
                .await
                .map_err(PgError::from)?
                .get(0);
            let mut seqs = Vec::with_capacity(new.len());
            let mut ids = Vec::with_capacity(new.len());
            let mut ats = Vec::with_capacity(new.len());
            let mut schemas = Vec::with_capacity(new.len());
            let mut bodies: Vec<&[u8]> = Vec::with_capacity(new.len());
            let mut traces = Vec::with_capacity(new.len());
            for e in &new {
                seqs.push(seq_i64(e.seq)?);
                ids.push(e.event_id.as_str());
                ats.push(e.at_ms);
                schemas.push(i32::from(e.schema));
                bodies.push(&e.body);
                traces.push(e.trace_id.as_str());
            }
            // One statement for the batch; `idx` (1..=n, the order among the batch's feed
            // events) places each event in the feed once the sequencer numbers the batch.
            txn.execute(
                "INSERT INTO events (site, seq, batch_id, idx, event_id, at_ms, body_schema, \
                 body, trace_id) \
                 SELECT $1, s, $2, o::int, i, a, sc, b, t \
                 FROM unnest($3::bigint[], $4::text[], $5::bigint[], $6::int[], \
                 $7::bytea[], $8::text[]) WITH ORDINALITY AS u(s, i, a, sc, b, t, o)",
                &[
                    &site, &batch_id, &seqs, &ids, &ats, &schemas, &bodies, &traces,
                ],
            )
            .await
            .map_err(PgError::from)?;
        }
        let new_hwm = seq_i64(plan.new_hwm)?;
        txn.execute(
            "UPDATE sites SET hwm = $2 WHERE site = $1",
            &[&site, &new_hwm],
        )
        .await
        .map_err(PgError::from)?;
        let committed = super::commit(txn, self.commit_limit()).await;
        super::settle(client, committed)?;
        if !new.is_empty() {
            self.uploaded.notify_one();
        }
        Ok(Uploaded {
            duplicates: plan.duplicates,
            stored: fresh.len(),
            new_hwm: plan.new_hwm,
        })
    }
}

impl EventLog for PgStore {
    async fn upload(
        &self,
        site: &str,
        events: Vec<EventEnvelope>,
    ) -> Result<Uploaded, UploadError> {
        self.upload_batch(site, &events).await
    }

    async fn site_hwm(&self, site: &str) -> Result<u64, LogReadError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT hwm FROM sites WHERE site = $1", &[&site])
            .await
            .map_err(PgError::from)?;
        Ok(row
            .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0))
            .unwrap_or(0))
    }

    async fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, LogReadError> {
        self.feed_page(after, limit).await
    }
}
