//! Site records on PostgreSQL: the `sites` row that uploads lock also says when the site was
//! first and last heard from.

use super::{PgError, PgStore};
use crate::event_log::LogReadError;
use crate::site_registry::SiteRegistry;
use crate::store::{SiteRecord, StoredSite, now_ms};

impl SiteRegistry for PgStore {
    async fn touch_site(&self, site: &str) -> Result<(), LogReadError> {
        let client = self.client().await?;
        let now = now_ms();
        // One autocommit statement; its commit may wait for a synchronous standby, which the
        // server does not bound, so the wait is bounded here like every commit's.
        let touched = tokio::time::timeout(
            self.commit_limit(),
            client.execute(
                "INSERT INTO sites (site, first_seen_ms, last_seen_ms) VALUES ($1, $2, $2) \
                 ON CONFLICT (site) DO UPDATE \
                 SET last_seen_ms = GREATEST(sites.last_seen_ms, EXCLUDED.last_seen_ms)",
                &[&site, &now],
            ),
        )
        .await;
        match touched {
            Ok(r) => {
                r.map_err(PgError::from)?;
                Ok(())
            }
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(LogReadError(format!(
                    "recording contact with {site} was not confirmed within {:?}",
                    self.commit_limit()
                )))
            }
        }
    }

    async fn sites(&self) -> Result<Vec<StoredSite>, LogReadError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT site, first_seen_ms, last_seen_ms, hwm FROM sites ORDER BY site",
                &[],
            )
            .await
            .map_err(PgError::from)?;
        Ok(rows
            .iter()
            .map(|r| StoredSite {
                site: r.get(0),
                record: Some(SiteRecord {
                    first_seen_ms: r.get(1),
                    last_seen_ms: r.get(2),
                }),
                hwm: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
            })
            .collect())
    }
}
