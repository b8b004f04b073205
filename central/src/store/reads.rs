//! The store's reads: master data, the feed, sites and their marks, orders, exceptions, dead
//! letters, reports and the ledger, each in its own read transaction (never through the writer).
//! Blocking (redb): async callers run them on the blocking pool. I/O side.

use std::ops::Bound;

use redb::{ReadTransaction, ReadableDatabase, ReadableTable};
use serde::de::DeserializeOwned;

use std::collections::BTreeMap;

use outpost_protocol::{CentralPool, MasterChange};

use super::{
    ATP, CHANGES, CUSTOMERS, DEAD_LETTERS, DeadLetter, EVENTS, EXCEPTIONS, ExceptionRecord,
    LEDGER_ATP, LEDGER_CREDIT, LOST_RANGES, LedgerEntry, LostRange, META, META_REVISION,
    OPEN_RECLAIMS, ORDERS, OpenReclaim, OrderRecord, PRICES, REPORTS, ReadError, ReconReport,
    SITE_HWM, SITES, SiteRecord, Store, StoredEvent, StoredSite, corrupt, records,
};
use crate::ledger::LedgerKey;

impl Store {
    /// A read transaction on the current database handle.
    pub(super) fn read(&self) -> Result<ReadTransaction, ReadError> {
        let db = self.shared.db()?;
        Ok(db.begin_read()?)
    }

    pub fn revision(&self) -> Result<u64, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(META_REVISION)?.map(|g| g.value()).unwrap_or(0))
    }

    /// Ranges of seqs recorded as lost (of `site`, or of every site), by site and first seq.
    pub fn lost_ranges(&self, site: Option<&str>) -> Result<Vec<LostRange>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(LOST_RANGES)?;
        let rows = match site {
            Some(s) => t.range((s, 0u64)..=(s, u64::MAX))?,
            None => t.range::<(&str, u64)>(..)?,
        };
        let mut out = Vec::new();
        for row in rows {
            let (_, v) = row?;
            out.push(decode("lost range", v.value())?);
        }
        Ok(out)
    }

    /// Durable high-water mark of `site` (0 if it never uploaded).
    pub fn site_hwm(&self, site: &str) -> Result<u64, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(SITE_HWM)?;
        Ok(t.get(site)?.map(|g| g.value()).unwrap_or(0))
    }

    /// Up to `limit` events with a cursor greater than `after`, in cursor order.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let r: records::FeedRow =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("event", e))?;
            out.push(StoredEvent {
                cursor: k.value(),
                site: r.site,
                channel: r.channel,
                event: r.event,
            });
        }
        Ok(out)
    }

    /// Up to `max` changes with a revision greater than `after`, in revision order.
    pub fn changes_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, MasterChange)>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(CHANGES)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= max {
                break;
            }
            let (k, v) = row?;
            let change: MasterChange =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("change", e))?;
            out.push((k.value(), change));
        }
        Ok(out)
    }

    /// Every site that ever connected or uploaded, sorted by id.
    pub fn sites(&self) -> Result<Vec<StoredSite>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let records = txn.open_table(SITES)?;
        let hwms = txn.open_table(SITE_HWM)?;
        let mut map = std::collections::BTreeMap::<String, StoredSite>::new();
        for row in records.iter()? {
            let (k, v) = row?;
            let rec: SiteRecord =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("site", e))?;
            let site = k.value().to_string();
            map.insert(
                site.clone(),
                StoredSite {
                    site,
                    record: Some(rec),
                    hwm: 0,
                },
            );
        }
        for row in hwms.iter()? {
            let (k, v) = row?;
            let site = k.value().to_string();
            map.entry(site.clone())
                .or_insert(StoredSite {
                    site,
                    record: None,
                    hwm: 0,
                })
                .hwm = v.value();
        }
        Ok(map.into_values().collect())
    }

    /// Current price of `sku` for `customer` (`None`: the list price).
    pub fn price(
        &self,
        sku: &str,
        customer: Option<&str>,
    ) -> Result<Option<outpost_protocol::PriceRecord>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(PRICES)?;
        match t.get((sku, customer.unwrap_or("")))? {
            Some(v) => Ok(Some(
                postcard::from_bytes(v.value()).map_err(|e| corrupt("price", e))?,
            )),
            None => Ok(None),
        }
    }

    pub fn atp(&self, sku: &str, site: &str) -> Result<Option<i64>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(ATP)?;
        Ok(t.get((sku, site))?.map(|g| g.value()))
    }

    pub fn customer(
        &self,
        id: &str,
    ) -> Result<Option<outpost_protocol::CustomerRecord>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read()?;
        let t = txn.open_table(CUSTOMERS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(
                postcard::from_bytes(v.value()).map_err(|e| corrupt("customer", e))?,
            )),
            None => Ok(None),
        }
    }

    pub fn order(&self, order_id: &str) -> Result<Option<OrderRecord>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(ORDERS)?;
        t.get(order_id)?
            .map(|v| decode("order", v.value()))
            .transpose()
    }

    pub fn exception(&self, id: u64) -> Result<Option<ExceptionRecord>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(EXCEPTIONS)?;
        t.get(id)?
            .map(|v| decode("exception", v.value()))
            .transpose()
    }

    /// Up to `limit` exceptions with an id greater than `after` matching `filter`, in id order
    /// (oldest first: the queue's order).
    pub fn exceptions(
        &self,
        filter: ExceptionFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ExceptionRecord>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(EXCEPTIONS)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            let e: ExceptionRecord = decode("exception", v.value())?;
            let keep = match filter {
                ExceptionFilter::Open => e.is_open(),
                ExceptionFilter::Resolved => !e.is_open(),
                ExceptionFilter::All => true,
            };
            if keep {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Up to `limit` dead letters with an id greater than `after`, in id order.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(DEAD_LETTERS)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((Bound::Excluded(after), Bound::Unbounded))? {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            out.push(decode("dead letter", v.value())?);
        }
        Ok(out)
    }

    /// The newest `limit` reconciliation reports of `site`, newest first.
    pub fn reports(&self, site: &str, limit: usize) -> Result<Vec<ReconReport>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(REPORTS)?;
        let mut out = Vec::new();
        for row in t.range((site, 0u64)..=(site, u64::MAX))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row?;
            out.push(decode("report", v.value())?);
        }
        Ok(out)
    }

    /// One pool of the ledger (`None` if central never heard of it).
    pub fn pool(&self, key: &LedgerKey) -> Result<Option<CentralPool>, ReadError> {
        Ok(self
            .ledger(
                &LedgerFilter {
                    key: Some(key.clone()),
                    site: None,
                },
                1,
            )?
            .pop()
            .map(|e| e.pool))
    }

    /// Up to `limit` pools of the ledger matching `filter` with their open reclaims: ATP pools in
    /// (site, SKU) order, then credit pools in customer order.
    pub fn ledger(
        &self,
        filter: &LedgerFilter,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, ReadError> {
        let txn = self.read()?;
        let atp = txn.open_table(LEDGER_ATP)?;
        let credit = txn.open_table(LEDGER_CREDIT)?;
        let mut pools: Vec<(LedgerKey, CentralPool)> = Vec::new();
        match &filter.key {
            Some(key @ LedgerKey::Atp { sku, site }) => {
                if let Some(v) = atp.get((site.as_str(), sku.as_str()))? {
                    pools.push((key.clone(), decode("pool", v.value())?));
                }
            }
            Some(key @ LedgerKey::Credit { customer }) => {
                if let Some(v) = credit.get(customer.as_str())? {
                    pools.push((key.clone(), decode("pool", v.value())?));
                }
            }
            None => {
                let rows = match &filter.site {
                    Some(site) => atp.range((site.as_str(), "")..)?,
                    None => atp.range::<(&str, &str)>(..)?,
                };
                for row in rows {
                    if pools.len() >= limit {
                        break;
                    }
                    let (k, v) = row?;
                    let (site, sku) = k.value();
                    if filter.site.as_deref().is_some_and(|s| s != site) {
                        break;
                    }
                    pools.push((LedgerKey::atp(sku, site), decode("pool", v.value())?));
                }
                for row in credit.iter()? {
                    if pools.len() >= limit {
                        break;
                    }
                    let (k, v) = row?;
                    pools.push((LedgerKey::credit(k.value()), decode("pool", v.value())?));
                }
            }
        }
        let open = txn.open_table(OPEN_RECLAIMS)?;
        let mut out = Vec::with_capacity(pools.len());
        for (key, pool) in pools {
            let text = key.text();
            let mut open_reclaims = BTreeMap::new();
            for row in open.range((text.as_str(), "")..)? {
                let (k, v) = row?;
                let (pool_text, site) = k.value();
                if pool_text != text {
                    break;
                }
                let r: OpenReclaim = decode("reclaim", v.value())?;
                open_reclaims.insert(site.to_string(), r.qty);
            }
            out.push(LedgerEntry {
                key,
                pool,
                open_reclaims,
            });
        }
        Ok(out)
    }
}

/// Which exceptions to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionFilter {
    Open,
    Resolved,
    All,
}

/// Which pools to list: one by key, or the ATP pools of a site (plus every credit pool), or all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerFilter {
    pub key: Option<LedgerKey>,
    pub site: Option<String>,
}

pub(super) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ReadError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(what, e))
}
