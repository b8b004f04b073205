//! The deny list on PostgreSQL. A revocation commits with `NOTIFY outpost_revoked` (the site
//! as payload), so every node hears of it and can close the site's live session wherever it
//! is; the listener (`notify`) checks the list before passing a site on, so a notification by
//! anyone else closes nothing.

use super::{PgError, PgStore, commit, settle};
use crate::deny_list::DenyList;
use crate::event_log::LogReadError;
use crate::store::{RevokedSite, now_ms};

/// The channel a revocation's commit notifies, with the site as payload.
pub const REVOKED_CHANNEL: &str = "outpost_revoked";

fn entry(r: &tokio_postgres::Row) -> RevokedSite {
    RevokedSite {
        at_ms: r.get(0),
        reason: r.get(1),
    }
}

impl DenyList for PgStore {
    async fn revoke_site(&self, site: &str, reason: String) -> Result<RevokedSite, LogReadError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(PgError::from)?;
        // A repeated revoke keeps the first entry: the insert does nothing, the select reads it.
        txn.execute(
            "INSERT INTO revoked (site, at_ms, reason) VALUES ($1, $2, $3) \
             ON CONFLICT (site) DO NOTHING",
            &[&site, &now_ms(), &reason],
        )
        .await
        .map_err(PgError::from)?;
        let row = txn
            .query_one(
                "SELECT at_ms, reason FROM revoked WHERE site = $1",
                &[&site],
            )
            .await
            .map_err(PgError::from)?;
        txn.execute("SELECT pg_notify($1, $2)", &[&REVOKED_CHANNEL, &site])
            .await
            .map_err(PgError::from)?;
        let out = entry(&row);
        let committed = commit(txn, self.commit_limit()).await;
        settle(client, committed)?;
        Ok(out)
    }

    async fn reinstate_site(&self, site: &str) -> Result<Option<RevokedSite>, LogReadError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "DELETE FROM revoked WHERE site = $1 RETURNING at_ms, reason",
                &[&site],
            )
            .await
            .map_err(PgError::from)?;
        Ok(row.as_ref().map(entry))
    }

    async fn revoked_site(&self, site: &str) -> Result<Option<RevokedSite>, LogReadError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT at_ms, reason FROM revoked WHERE site = $1",
                &[&site],
            )
            .await
            .map_err(PgError::from)?;
        Ok(row.as_ref().map(entry))
    }

    async fn revoked_sites(&self) -> Result<Vec<(String, RevokedSite)>, LogReadError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT site, at_ms, reason FROM revoked ORDER BY site", &[])
            .await
            .map_err(PgError::from)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    RevokedSite {
                        at_ms: r.get(1),
                        reason: r.get(2),
                    },
                )
            })
            .collect())
    }
}
