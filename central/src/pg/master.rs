//! Master data on PostgreSQL: the ERP's items written with consecutive revisions under the
//! head row's lock (so revisions commit in order whichever node writes), the current state by
//! key, and each ATP figure and credit limit as the total of its escrow pool, all in one
//! transaction. The commit notifies every node (`NOTIFY outpost_revision`).
//!
//! Not yet on this backend: the allowance policy that the embedded store runs on new figures
//! (top-ups and reclaims as further revisions).

use std::collections::BTreeMap;

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
        // One statement per table, whatever the batch's size (up to the API's 10,000 items):
        // the head row's lock, which every other writer waits for, is held for a handful of
        // round trips. Within a batch the last item of each key wins, as applied in order.
        let mut revs = Vec::with_capacity(changes.len());
        let mut bodies = Vec::with_capacity(changes.len());
        let mut prices: BTreeMap<(&str, &str), (Vec<u8>, i64)> = BTreeMap::new();
        let mut customers: BTreeMap<&str, (Vec<u8>, i64)> = BTreeMap::new();
        let mut atp: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
        let mut pools: BTreeMap<String, i64> = BTreeMap::new();
        let mut rev = head;
        for change in changes {
            rev += 1;
            revs.push(rev);
            bodies.push(encode(change)?);
            match change {
                MasterChange::Price(p) => {
                    let key = (p.sku.as_str(), p.customer.as_deref().unwrap_or(""));
                    prices.insert(key, (encode(p)?, rev));
                }
                MasterChange::Atp(a) => {
                    atp.insert((a.sku.as_str(), a.site.as_str()), (a.available, rev));
                    pools.insert(atp_pool(&a.sku, &a.site), a.available.max(0));
                }
                MasterChange::Customer(c) => {
                    customers.insert(c.id.as_str(), (encode(c)?, rev));
                    pools.insert(credit_pool(&c.id), c.credit_limit.units().max(0));
                }
                // Refused by `validate_erp_changes` above.
                MasterChange::Grant(_)
                | MasterChange::Reclaim(_)
                | MasterChange::OrderStatus(_) => {}
            }
        }
        let db = |e: tokio_postgres::Error| MasterError::from(PgError::from(e));
        txn.execute(
            "INSERT INTO changes (rev, body) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
            &[&revs, &bodies],
        )
        .await
        .map_err(db)?;
        if !prices.is_empty() {
            let (keys, vals): (Vec<_>, Vec<_>) = prices.into_iter().unzip();
            let (skus, custs): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
            let (blobs, prevs): (Vec<Vec<u8>>, Vec<i64>) = vals.into_iter().unzip();
            txn.execute(
                "INSERT INTO prices (sku, customer, body, rev) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[]) \
                 ON CONFLICT (sku, customer) DO UPDATE SET body = EXCLUDED.body, rev = EXCLUDED.rev",
                &[&skus, &custs, &blobs, &prevs],
            )
            .await
            .map_err(db)?;
        }
        if !customers.is_empty() {
            let (ids, vals): (Vec<&str>, Vec<_>) = customers.into_iter().unzip();
            let (blobs, crevs): (Vec<Vec<u8>>, Vec<i64>) = vals.into_iter().unzip();
            txn.execute(
                "INSERT INTO customers (id, body, rev) \
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[]) \
                 ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, rev = EXCLUDED.rev",
                &[&ids, &blobs, &crevs],
            )
            .await
            .map_err(db)?;
        }
        if !atp.is_empty() {
            let (keys, vals): (Vec<_>, Vec<_>) = atp.into_iter().unzip();
            let (skus, sites): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
            let (avail, arevs): (Vec<i64>, Vec<i64>) = vals.into_iter().unzip();
            txn.execute(
                "INSERT INTO atp (sku, site, available, rev) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
                 ON CONFLICT (sku, site) DO UPDATE \
                 SET available = EXCLUDED.available, rev = EXCLUDED.rev",
                &[&skus, &sites, &avail, &arevs],
            )
            .await
            .map_err(db)?;
        }
        if !pools.is_empty() {
            let (names, totals): (Vec<String>, Vec<i64>) = pools.into_iter().unzip();
            txn.execute(
                "INSERT INTO pools (pool, total) SELECT * FROM unnest($1::text[], $2::bigint[]) \
                 ON CONFLICT (pool) DO UPDATE SET total = EXCLUDED.total",
                &[&names, &totals],
            )
            .await
            .map_err(db)?;
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
        let committed = super::commit(txn, self.commit_limit()).await;
        super::settle(client, committed)?;
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
