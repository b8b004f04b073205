//! Fleet alerts on PostgreSQL: ids taken under the head row's lock, so they commit in id order
//! whichever node records one (a reader paging by id never skips an alert), and the oldest
//! deleted beyond `MAX_ALERTS` in the same transaction.

use super::{PgError, PgStore, commit, settle};
use crate::alert_log::AlertLog;
use crate::event_log::LogReadError;
use crate::store::{Alert, MAX_ALERTS, NewAlert};

impl AlertLog for PgStore {
    async fn record_alert(&self, a: NewAlert) -> Result<Alert, LogReadError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(PgError::from)?;
        let last: i64 = txn
            .query_one(
                "SELECT last_id FROM alerts_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(PgError::from)?
            .get(0);
        let id = last + 1;
        let drill = a.drill_id.and_then(|d| i64::try_from(d).ok());
        txn.execute(
            "INSERT INTO alerts (id, site, from_state, to_state, reasons, at_ms, drill_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&id, &a.site, &a.from, &a.to, &a.reasons, &a.at_ms, &drill],
        )
        .await
        .map_err(PgError::from)?;
        txn.execute("UPDATE alerts_head SET last_id = $1 WHERE id = 1", &[&id])
            .await
            .map_err(PgError::from)?;
        let keep_from = id - i64::try_from(MAX_ALERTS).unwrap_or(i64::MAX) + 1;
        txn.execute("DELETE FROM alerts WHERE id < $1", &[&keep_from])
            .await
            .map_err(PgError::from)?;
        let committed = commit(txn, self.commit_limit()).await;
        settle(client, committed)?;
        Ok(a.with_id(u64::try_from(id).unwrap_or(0)))
    }

    async fn alerts(&self, after: u64, limit: usize) -> Result<Vec<Alert>, LogReadError> {
        let client = self.client().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT id, site, from_state, to_state, reasons, at_ms, drill_id FROM alerts \
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &limit],
            )
            .await
            .map_err(PgError::from)?;
        Ok(rows
            .iter()
            .map(|r| Alert {
                id: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                site: r.get(1),
                from: r.get(2),
                to: r.get(3),
                reasons: r.get(4),
                at_ms: r.get(5),
                drill_id: r
                    .get::<_, Option<i64>>(6)
                    .and_then(|d| u64::try_from(d).ok()),
            })
            .collect())
    }
}
