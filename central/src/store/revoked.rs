//! The deny list of revoked sites: a site on it is refused at Hello and its live connection is
//! closed. A revocation is central's decision, independent of the site's certificate (which
//! stays valid until it expires): it takes effect at once and is undone by reinstating the
//! site. I/O side (redb), through the store's writer like every other write.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{ApplyError, ReadError, Store, StoreUnavailable, decode, encode, now_ms};

/// site -> postcard RevokedSite
pub(super) const REVOKED: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_sites");

/// Why and when a site was revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedSite {
    /// Milliseconds since the Unix epoch (central's clock).
    pub at_ms: i64,
    pub reason: String,
}

impl Store {
    /// Puts `site` on the deny list (durably), or returns its existing entry unchanged: a repeated
    /// revoke keeps the first reason and time. The caller then ends the site's live session.
    pub async fn revoke_site(
        &self,
        site: &str,
        reason: String,
    ) -> Result<RevokedSite, StoreUnavailable> {
        let site = site.to_string();
        let now = now_ms();
        self.run(move |txn, _| revoke(txn, &site, reason, now).map(Ok))
            .await
    }

    /// Takes `site` off the deny list; returns the entry it had, if any.
    pub async fn reinstate_site(
        &self,
        site: &str,
    ) -> Result<Option<RevokedSite>, StoreUnavailable> {
        let site = site.to_string();
        self.run(move |txn, _| reinstate(txn, &site).map(Ok)).await
    }

    /// The deny-list entry of `site`, if it is revoked.
    pub fn revoked_site(&self, site: &str) -> Result<Option<RevokedSite>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(REVOKED)?;
        t.get(site)?
            .map(|v| decode("revoked site", v.value()))
            .transpose()
    }

    /// Every revoked site, sorted by id.
    pub fn revoked_sites(&self) -> Result<Vec<(String, RevokedSite)>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(REVOKED)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode("revoked site", v.value())?));
        }
        Ok(out)
    }
}

fn revoke(
    txn: &WriteTransaction,
    site: &str,
    reason: String,
    now_ms: i64,
) -> Result<RevokedSite, ApplyError> {
    let mut t = txn.open_table(REVOKED)?;
    if let Some(v) = t.get(site)?
        && let Ok(existing) = postcard::from_bytes::<RevokedSite>(v.value())
    {
        return Ok(existing);
    }
    let entry = RevokedSite {
        at_ms: now_ms,
        reason,
    };
    t.insert(site, encode(&entry).as_slice())?;
    Ok(entry)
}

fn reinstate(txn: &WriteTransaction, site: &str) -> Result<Option<RevokedSite>, ApplyError> {
    let mut t = txn.open_table(REVOKED)?;
    let old = t.remove(site)?;
    // An unreadable entry is removed all the same: reinstating must always work.
    Ok(old.and_then(|v| postcard::from_bytes(v.value()).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revocations_are_durable_idempotent_and_undone_by_reinstating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("central.redb");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.revoked_site("plant-1").unwrap(), None);
        let first = store
            .revoke_site("plant-1", "laptop stolen".into())
            .await
            .unwrap();
        assert_eq!(first.reason, "laptop stolen");
        let again = store.revoke_site("plant-1", "other".into()).await.unwrap();
        assert_eq!(again, first, "a repeated revoke keeps the first entry");
        store.revoke_site("plant-2", String::new()).await.unwrap();
        store.close().await;

        let store = Store::open(&path).unwrap();
        let list = store.revoked_sites().unwrap();
        assert_eq!(
            list.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
            vec!["plant-1", "plant-2"]
        );
        assert_eq!(store.revoked_site("plant-1").unwrap(), Some(first.clone()));
        assert_eq!(store.reinstate_site("plant-1").await.unwrap(), Some(first));
        assert_eq!(store.reinstate_site("plant-1").await.unwrap(), None);
        assert_eq!(store.revoked_site("plant-1").unwrap(), None);
        assert_eq!(store.revoked_sites().unwrap().len(), 1);
        store.close().await;
    }
}
