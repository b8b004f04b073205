//! Master data on PostgreSQL: the ERP's items written with consecutive revisions under the
//! head row's lock (so revisions commit in order whichever node writes), the current state by
//! key, and each ATP figure and credit limit as the total of its escrow pool, all in one
//! transaction. The commit notifies every node (`NOTIFY outpost_revision`).
//!
//! Not yet on this backend: the allowance policy that the embedded store runs on new figures
//! (top-ups and reclaims as further revisions).

use outpost_protocol::{CustomerRecord, MasterChange, PriceRecord};
use tokio::sync::watch;

use super::{PgError, PgStore};
use crate::checks::validate_erp_changes;
use crate::event_log::LogReadError;
use crate::master_log::{MasterError, MasterLog, MasterWritten};

/// The channel a commit of master changes notifies, with the new revision as payload.
pub const REVISION_CHANNEL: &str = "outpost_revision";

impl From<PgError> for MasterError {
    fn from(e: PgError) -> Self {
        MasterError::Unavailable(e.0)
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, PgError> {
    postcard::to_allocvec(v).map_err(|e| PgError(format!("cannot encode: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, LogReadError> {
    postcard::from_bytes(b).map_err(|e| LogReadError(format!("stored {what} is corrupt: {e}")))
}

/// Escrow pool of an ATP figure or a credit limit.
pub fn atp_pool(sku: &str, site: &str) -> String {
    format!("atp/{sku}/{site}")
}

pub fn credit_pool(customer: &str) -> String {
    format!("credit/{customer}")
}

impl PgStore {
    async fn write_master(&self, changes: &[MasterChange]) -> Result<MasterWritten, MasterError> {
        validate_erp_changes(changes).map_err(MasterError::Invalid)?;
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(PgError::from)?;
        // Held until the commit: the next writer, on any node, numbers after this one commits.
        let head: i64 = txn
            .query_one(
                "SELECT revision FROM master_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(PgError::from)?
            .get(0);
        let mut rev = head;
        for change in changes {
            rev += 1;
            txn.execute(
                "INSERT INTO changes (rev, body) VALUES ($1, $2)",
                &[&rev, &encode(change)?],
            )
            .await
            .map_err(PgError::from)?;
            let (pool, total) = match change {
                MasterChange::Price(p) => {
                    txn.execute(
                        "INSERT INTO prices (sku, customer, body, rev) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (sku, customer) DO UPDATE \
                         SET body = EXCLUDED.body, rev = EXCLUDED.rev",
                        &[
                            &p.sku,
                            &p.customer.as_deref().unwrap_or(""),
                            &encode(p)?,
                            &rev,
                        ],
                    )
                    .await
                    .map_err(PgError::from)?;
                    continue;
                }
                MasterChange::Atp(a) => {
                    txn.execute(
                        "INSERT INTO atp (sku, site, available, rev) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (sku, site) DO UPDATE \
                         SET available = EXCLUDED.available, rev = EXCLUDED.rev",
                        &[&a.sku, &a.site, &a.available, &rev],
                    )
                    .await
                    .map_err(PgError::from)?;
                    (atp_pool(&a.sku, &a.site), a.available)
                }
                MasterChange::Customer(c) => {
                    txn.execute(
                        "INSERT INTO customers (id, body, rev) VALUES ($1, $2, $3) \
                         ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, rev = EXCLUDED.rev",
                        &[&c.id, &encode(c)?, &rev],
                    )
                    .await
                    .map_err(PgError::from)?;
                    (credit_pool(&c.id), c.credit_limit.units())
                }
                // Refused by `validate_erp_changes` above.
                MasterChange::Grant(_)
                | MasterChange::Reclaim(_)
                | MasterChange::OrderStatus(_) => {
                    continue;
                }
            };
            txn.execute(
                "INSERT INTO pools (pool, total) VALUES ($1, $2) \
                 ON CONFLICT (pool) DO UPDATE SET total = EXCLUDED.total",
                &[&pool, &total.max(0)],
            )
            .await
            .map_err(PgError::from)?;
        }
        txn.execute("UPDATE master_head SET revision = $1 WHERE id = 1", &[&rev])
            .await
            .map_err(PgError::from)?;
        // Delivered to every listening node at the commit, not before.
        txn.execute(
            "SELECT pg_notify($1, $2)",
            &[&REVISION_CHANNEL, &rev.to_string()],
        )
        .await
        .map_err(PgError::from)?;
        txn.commit().await.map_err(PgError::from)?;
        let revision = u64::try_from(rev).unwrap_or(0);
        self.saw_revision(revision);
        Ok(MasterWritten {
            revision,
            changes: changes.len(),
        })
    }

    /// The head revision as stored.
    pub async fn revision(&self) -> Result<u64, PgError> {
        let client = self.client().await?;
        let r: i64 = client
            .query_one("SELECT revision FROM master_head WHERE id = 1", &[])
            .await?
            .get(0);
        Ok(u64::try_from(r).unwrap_or(0))
    }
}

impl MasterLog for PgStore {
    async fn upsert_master(
        &self,
        changes: Vec<MasterChange>,
    ) -> Result<MasterWritten, MasterError> {
        self.write_master(&changes).await
    }

    async fn changes_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, MasterChange)>, LogReadError> {
        let client = self.client().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT rev, body FROM changes WHERE rev > $1 ORDER BY rev LIMIT $2",
                &[&after, &max],
            )
            .await
            .map_err(PgError::from)?;
        rows.iter()
            .map(|r| {
                let rev = u64::try_from(r.get::<_, i64>(0)).unwrap_or(0);
                Ok((rev, decode("change", r.get::<_, &[u8]>(1))?))
            })
            .collect()
    }

    async fn price(
        &self,
        sku: &str,
        customer: Option<&str>,
    ) -> Result<Option<PriceRecord>, LogReadError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT body FROM prices WHERE sku = $1 AND customer = $2",
                &[&sku, &customer.unwrap_or("")],
            )
            .await
            .map_err(PgError::from)?;
        row.map(|r| decode("price", r.get::<_, &[u8]>(0)))
            .transpose()
    }

    async fn customer(&self, id: &str) -> Result<Option<CustomerRecord>, LogReadError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT body FROM customers WHERE id = $1", &[&id])
            .await
            .map_err(PgError::from)?;
        row.map(|r| decode("customer", r.get::<_, &[u8]>(0)))
            .transpose()
    }

    fn watch_revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}
