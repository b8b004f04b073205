//! Fleet health alerts: one record per change of a site's health state (site, from, to,
//! reasons, when), kept newest-first up to `MAX_ALERTS`. I/O side (redb), written through the
//! store's writer like every other write.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{ApplyError, ReadError, Store, StoreUnavailable, decode, encode};

/// alert id -> postcard Alert; ids increase by one from 1.
pub(super) const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");

/// Alerts kept: the oldest are deleted beyond this. Ten thousand state changes are months of a
/// large fleet's history at a few hundred bytes each.
pub const MAX_ALERTS: u64 = 10_000;

/// A change of a site's health state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub id: u64,
    pub site: String,
    /// State codes (`healthy`, `degraded`, `offline`, `drill`).
    pub from: String,
    pub to: String,
    /// Reason codes of the new state (empty when healthy).
    pub reasons: Vec<String>,
    /// Central's clock, ms since the Unix epoch.
    pub at_ms: i64,
    /// The disaster-recovery drill the site was part of when its state changed: the change was
    /// planned, not an incident.
    pub drill_id: Option<u64>,
}

/// An alert before it has its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAlert {
    pub site: String,
    pub from: String,
    pub to: String,
    pub reasons: Vec<String>,
    pub at_ms: i64,
    pub drill_id: Option<u64>,
}

impl NewAlert {
    /// The alert stored under `id`.
    pub fn with_id(self, id: u64) -> Alert {
        Alert {
            id,
            site: self.site,
            from: self.from,
            to: self.to,
            reasons: self.reasons,
            at_ms: self.at_ms,
            drill_id: self.drill_id,
        }
    }
}

impl Store {
    /// Stores `alert` under the next id, deleting the oldest beyond `MAX_ALERTS`.
    pub async fn record_alert(&self, alert: NewAlert) -> Result<Alert, StoreUnavailable> {
        self.run(move |txn, _| insert(txn, alert, MAX_ALERTS).map(Ok))
            .await
    }

    /// Alerts with an id above `after`, oldest first, at most `limit`.
    pub fn alerts(&self, after: u64, limit: usize) -> Result<Vec<Alert>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(ALERTS)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)?.take(limit) {
            let (_, v) = row?;
            out.push(decode("alert", v.value())?);
        }
        Ok(out)
    }
}

/// Inserts `a` and deletes the oldest alerts beyond `max`.
pub(super) fn insert(txn: &WriteTransaction, a: NewAlert, max: u64) -> Result<Alert, ApplyError> {
    let mut t = txn.open_table(ALERTS)?;
    let id = t.last()?.map_or(0, |(k, _)| k.value()) + 1;
    let alert = a.with_id(id);
    t.insert(id, encode(&alert).as_slice())?;
    // At most one over the bound per insert, so this removes one row (or a few after the bound
    // was lowered).
    while t.len()? > max {
        if t.pop_first()?.is_none() {
            break;
        }
    }
    Ok(alert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(site: &str, to: &str) -> NewAlert {
        NewAlert {
            site: site.into(),
            from: "healthy".into(),
            to: to.into(),
            reasons: vec!["not_heard_from".into()],
            at_ms: 5,
            drill_id: None,
        }
    }

    /// Goal: alerts get increasing ids, survive a reopen and are listed after a cursor.
    #[tokio::test]
    async fn alerts_are_durable_and_listed_by_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("central.redb");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.alerts(0, 10).unwrap(), vec![]);
        let a = store.record_alert(new("plant-1", "offline")).await.unwrap();
        let b = store
            .record_alert(new("plant-2", "degraded"))
            .await
            .unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        store.close().await;
        let store = Store::open(&path).unwrap();
        assert_eq!(store.alerts(0, 10).unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(store.alerts(1, 10).unwrap(), vec![b]);
        assert_eq!(store.alerts(0, 1).unwrap(), vec![a]);
        let c = store.record_alert(new("plant-1", "healthy")).await.unwrap();
        assert_eq!(c.id, 3);
        store.close().await;
    }

    /// Goal: the table keeps only the newest `max` alerts and ids keep increasing past the
    /// deleted ones.
    #[tokio::test]
    async fn only_the_newest_alerts_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("central.redb")).unwrap();
        for _ in 0..5 {
            store
                .run(|txn, _| {
                    insert(txn, new("plant-1", "offline"), 3).map(Ok::<_, StoreUnavailable>)
                })
                .await
                .unwrap();
        }
        let ids: Vec<u64> = store.alerts(0, 10).unwrap().iter().map(|a| a.id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
        store.close().await;
    }
}
