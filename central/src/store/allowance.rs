//! The allowance side of the writer: runs the pure top-up and reclaim policy (`crate::ledger`)
//! over the pools a transaction touched and writes its grants and reclaims as master changes in
//! that same transaction; answers a site's allowance request; starts a session's reconciliation
//! report; runs the periodic check. I/O side (inside the store's write transaction).

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocol::{CentralPool, Grant, MasterChange, Pool, Reclaim, validate_pool};
use redb::{ReadableTable, WriteTransaction};

use super::alerts::{self, NewAlert};
use super::records::{LostRange, OpenReclaim, ReconReport};
use super::{
    ApplyError, LEDGER_ATP, LEDGER_CREDIT, LEDGER_SITES, LOST_RANGES, MAX_ALERTS,
    MAX_REPORTS_PER_SITE, META_INCARNATION, META_LAST_RECLAIM, META_REVISION, OPEN_RECLAIMS,
    Outcome, REPORTS, SITE_HWM, SITES, SiteRecord, StoreOptions, StoreUnavailable, append_change,
    decode_w, encode, get_customer, get_pool, meta_get, meta_old_grants_through, meta_set, next_id,
    put_pool, touch,
};
use crate::ledger::{LedgerKey, plan_reclaims, plan_top_ups};

/// Which pools a policy run looks at.
pub(crate) enum Scope {
    /// These pools (those an operation just moved).
    Pools(BTreeSet<LedgerKey>),
    /// Every pool that concerns the site: its ATP pools and every credit pool.
    Site(String),
    /// The whole ledger.
    All,
}

/// What a policy run wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub grants: usize,
    pub reclaims: usize,
}

/// The marks of a site's Hello that starting its session acts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HelloMarks {
    /// Highest seq the agent has assigned.
    pub last_seq: u64,
    /// Highest seq the agent has recorded as committed at central.
    pub acked_seq: u64,
    /// Lowest seq the agent still holds (`last_seq + 1` when it holds none).
    pub retained_from_seq: u64,
    /// The incarnation of central's store the agent last had a Welcome from (0: none).
    pub central_incarnation: u64,
    /// The master revision the agent has applied.
    pub master_rev: u64,
}

impl HelloMarks {
    /// The marks of an agent that has assigned seqs up to `last_seq`, holds them all and
    /// claims no acknowledgement or incarnation: a session that changes nothing but the usual.
    pub fn with_last_seq(last_seq: u64) -> Self {
        HelloMarks {
            last_seq,
            retained_from_seq: 1,
            ..HelloMarks::default()
        }
    }
}

impl From<&outpost_protocol::Hello> for HelloMarks {
    fn from(h: &outpost_protocol::Hello) -> Self {
        HelloMarks {
            last_seq: h.last_seq,
            acked_seq: h.acked_seq,
            retained_from_seq: h.retained_from_seq,
            central_incarnation: h.central_incarnation,
            master_rev: h.master_rev,
        }
    }
}

/// Reason recorded with a lost range and its alert.
pub const LOST_REASON: &str = "events_lost";

/// What a session needs for its Welcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionStart {
    /// The site's durable high-water mark (moved past a lost range, if one was recorded).
    pub acked_seq: u64,
    /// Number of the reconciliation report this session fills.
    pub session: u64,
    /// Central's revision after the session's top-ups.
    pub revision: u64,
    /// This store's incarnation (for the Welcome).
    pub incarnation: u64,
    /// The revision after which master changes are sent to the agent: the Hello's, or, when the
    /// agent last talked to another incarnation, the revision before this session's grants.
    pub master_from_rev: u64,
    /// The agent last talked to another incarnation of central: its allowances were zeroed.
    pub incarnation_changed: bool,
    /// Seqs recorded as lost in this session (first, last), if any.
    pub lost: Option<(u64, u64)>,
}

/// Central's answer to a site's `AllowanceRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowanceAnswer {
    pub granted: i64,
    /// Revision of the Grant change; 0 when nothing was granted.
    pub rev: u64,
    /// Why less than asked was granted; empty on a full grant.
    pub reason: String,
}

fn site_records(txn: &WriteTransaction) -> Result<BTreeMap<String, SiteRecord>, ApplyError> {
    let t = txn.open_table(SITES)?;
    let mut out = BTreeMap::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.insert(k.value().to_string(), decode_w("site", v.value())?);
    }
    Ok(out)
}

/// Sites not heard from for longer than `reclaim_silent_secs` (and not `connected` now). A site
/// central has never heard from is not silent: the ERP may know it before it first connects.
pub(crate) fn silent_sites(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    now_ms: i64,
    connected: &BTreeSet<String>,
) -> Result<BTreeSet<String>, ApplyError> {
    let limit_ms = i64::try_from(opts.reclaim_silent_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let cutoff = now_ms.saturating_sub(limit_ms);
    Ok(site_records(txn)?
        .into_iter()
        .filter(|(site, r)| r.last_seen_ms < cutoff && !connected.contains(site))
        .map(|(site, _)| site)
        .collect())
}

/// Sites that get top-ups: every site that connected or holds ATP, except silent ones.
pub(crate) fn eligible_sites(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    now_ms: i64,
) -> Result<BTreeSet<String>, ApplyError> {
    let silent = silent_sites(txn, opts, now_ms, &BTreeSet::new())?;
    let mut sites: BTreeSet<String> = site_records(txn)?.into_keys().collect();
    let t = txn.open_table(LEDGER_SITES)?;
    for row in t.iter()? {
        sites.insert(row?.0.value().to_string());
    }
    Ok(sites.difference(&silent).cloned().collect())
}

fn load_pools(
    txn: &WriteTransaction,
    scope: &Scope,
) -> Result<BTreeMap<LedgerKey, CentralPool>, ApplyError> {
    let mut out = BTreeMap::new();
    match scope {
        Scope::Pools(keys) => {
            for k in keys {
                if let Some(p) = get_pool(txn, k)? {
                    out.insert(k.clone(), p);
                }
            }
        }
        Scope::Site(_) | Scope::All => {
            let atp = txn.open_table(LEDGER_ATP)?;
            let site = match scope {
                Scope::Site(s) => Some(s.as_str()),
                _ => None,
            };
            let rows = match site {
                Some(s) => atp.range((s, "")..)?,
                None => atp.range::<(&str, &str)>(..)?,
            };
            for row in rows {
                let (k, v) = row?;
                let (s, sku) = k.value();
                if site.is_some_and(|want| want != s) {
                    break;
                }
                out.insert(LedgerKey::atp(sku, s), decode_w("pool", v.value())?);
            }
            let credit = txn.open_table(LEDGER_CREDIT)?;
            for row in credit.iter()? {
                let (k, v) = row?;
                out.insert(LedgerKey::credit(k.value()), decode_w("pool", v.value())?);
            }
        }
    }
    Ok(out)
}

/// Open reclaims of the given pools, (site, pool) -> quantity asked.
fn open_reclaims(
    txn: &WriteTransaction,
    keys: impl Iterator<Item = LedgerKey>,
) -> Result<BTreeMap<(String, LedgerKey), i64>, ApplyError> {
    let t = txn.open_table(OPEN_RECLAIMS)?;
    let mut out = BTreeMap::new();
    for key in keys {
        let text = key.text();
        for row in t.range((text.as_str(), "")..)? {
            let (k, v) = row?;
            let (pool_text, site) = k.value();
            if pool_text != text {
                break;
            }
            let r: OpenReclaim = decode_w("reclaim", v.value())?;
            out.insert((site.to_string(), key.clone()), r.qty);
        }
    }
    Ok(out)
}

/// Runs the reclaim and top-up policy over the pools in `scope` for `sites`, asking `silent`
/// sites for everything they hold, and writes each grant and reclaim as a master change.
pub(crate) fn run_policy(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    scope: Scope,
    sites: &BTreeSet<String>,
    silent: &BTreeSet<String>,
    now_ms: i64,
) -> Result<PolicyOutcome, ApplyError> {
    let mut ledger = load_pools(txn, &scope)?;
    if ledger.is_empty() {
        return Ok(PolicyOutcome::default());
    }
    let mut open = open_reclaims(txn, ledger.keys().cloned())?;
    let mut held = BTreeSet::new();
    for key in ledger.keys() {
        if let LedgerKey::Credit { customer } = key
            && get_customer(txn, customer)?.is_some_and(|c| c.on_hold)
        {
            held.insert(customer.clone());
        }
    }
    let mut outcome = PolicyOutcome::default();
    for m in plan_reclaims(&ledger, &open, silent) {
        let reclaim_id = next_id(txn, META_LAST_RECLAIM)?;
        append_change(
            txn,
            &MasterChange::Reclaim(Reclaim {
                reclaim_id,
                site: m.site.clone(),
                pool: m.key.pool(),
                qty: m.qty,
            }),
        )?;
        let rec = OpenReclaim {
            reclaim_id,
            qty: m.qty,
            at_ms: now_ms,
        };
        txn.open_table(OPEN_RECLAIMS)?.insert(
            (m.key.text().as_str(), m.site.as_str()),
            encode(&rec).as_slice(),
        )?;
        tracing::info!(site.id = %m.site, pool = %m.key.text(), qty = m.qty, reclaim_id, "reclaim sent");
        open.insert((m.site, m.key), m.qty);
        outcome.reclaims += 1;
    }
    let skip: BTreeSet<(String, LedgerKey)> = open.into_keys().collect();
    let grants = plan_top_ups(&mut ledger, &opts.targets, sites, &skip, &held);
    let mut changed = BTreeSet::new();
    for m in grants {
        append_change(
            txn,
            &MasterChange::Grant(Grant {
                site: m.site.clone(),
                pool: m.key.pool(),
                qty: m.qty,
            }),
        )?;
        tracing::debug!(site.id = %m.site, pool = %m.key.text(), qty = m.qty, "top-up granted");
        changed.insert(m.key);
        outcome.grants += 1;
    }
    for key in changed {
        put_pool(txn, &key, &ledger[&key])?;
    }
    Ok(outcome)
}

/// The site's newest reconciliation report, if any.
pub(crate) fn current_report(
    txn: &WriteTransaction,
    site: &str,
) -> Result<Option<ReconReport>, ApplyError> {
    let t = txn.open_table(REPORTS)?;
    let last = t.range((site, 0u64)..=(site, u64::MAX))?.next_back();
    match last {
        Some(row) => Ok(Some(decode_w("report", row?.1.value())?)),
        None => Ok(None),
    }
}

pub(crate) fn put_report(txn: &WriteTransaction, r: &ReconReport) -> Result<(), ApplyError> {
    let mut t = txn.open_table(REPORTS)?;
    t.insert((r.site.as_str(), r.session), encode(r).as_slice())?;
    Ok(())
}

pub(super) fn begin_session(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    site: &str,
    hello: HelloMarks,
    now_ms: i64,
) -> Outcome<SessionStart, StoreUnavailable> {
    let hwm_at_connect = {
        let t = txn.open_table(SITE_HWM)?;
        t.get(site)?.map(|g| g.value()).unwrap_or(0)
    };
    let dark_since_ms = {
        let t = txn.open_table(SITES)?;
        let v = t.get(site)?;
        match v {
            Some(v) => Some(decode_w::<SiteRecord>("site", v.value())?.last_seen_ms),
            None => None,
        }
    };
    // Central is behind what it acknowledged to the site: it was restored from a backup. The
    // site re-sends what it still holds; what it no longer holds is recorded as lost and the
    // mark moves past it, so the site is not stuck on a gap it can never fill.
    let mut hwm = hwm_at_connect;
    let mut lost = None;
    if hwm < hello.acked_seq {
        if hello.retained_from_seq > hwm + 1 {
            let first = hwm + 1;
            let last = hello.retained_from_seq - 1;
            record_lost(txn, site, first, last, now_ms)?;
            txn.open_table(SITE_HWM)?.insert(site, last)?;
            hwm = last;
            lost = Some((first, last));
        } else {
            tracing::info!(
                site.id = %site,
                hwm,
                agent_acked_seq = hello.acked_seq,
                retained_from_seq = hello.retained_from_seq,
                "central is behind what it acknowledged to the site (restored from a backup); the site re-sends from its retention"
            );
        }
    }
    let own = meta_get(txn, META_INCARNATION)?;
    let incarnation_changed = hello.central_incarnation != 0 && hello.central_incarnation != own;
    if incarnation_changed {
        // The agent drops every allowance when it sees a new incarnation; central forgets what
        // it (or the store it was restored from) had outstanding at the site, before the
        // session's top-ups grant afresh.
        zero_site_allowances(txn, site)?;
        // Every order up to the Hello's last seq was confirmed from what was just zeroed,
        // whichever session re-sends it.
        meta_set(txn, &meta_old_grants_through(site), hello.last_seq)?;
    }
    let rev_before_grants = meta_get(txn, META_REVISION)?;
    let session = current_report(txn, site)?.map_or(1, |r| r.session + 1);
    let report = ReconReport {
        site: site.to_string(),
        session,
        connected_ms: now_ms,
        dark_since_ms,
        hello_last_seq: hello.last_seq,
        hwm_at_connect,
        caught_up_ms: (hwm >= hello.last_seq).then_some(now_ms),
        hello_acked_seq: hello.acked_seq,
        lost_from_seq: lost.map(|l| l.0),
        lost_through_seq: lost.map(|l| l.1),
        incarnation_changed,
        ..ReconReport::default()
    };
    put_report(txn, &report)?;
    {
        let mut t = txn.open_table(REPORTS)?;
        let kept = t.range((site, 0u64)..=(site, u64::MAX))?.count();
        for _ in MAX_REPORTS_PER_SITE..kept {
            let oldest = t
                .range((site, 0u64)..=(site, u64::MAX))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().1);
            if let Some(n) = oldest {
                t.remove((site, n))?;
            }
        }
    }
    touch(txn, site, now_ms)?;
    txn.open_table(LEDGER_SITES)?.insert(site, 0)?;
    let sites = BTreeSet::from([site.to_string()]);
    run_policy(
        txn,
        opts,
        Scope::Site(site.to_string()),
        &sites,
        &BTreeSet::new(),
        now_ms,
    )?;
    Ok(Ok(SessionStart {
        acked_seq: hwm,
        session,
        revision: meta_get(txn, META_REVISION)?,
        incarnation: own,
        master_from_rev: if incarnation_changed {
            rev_before_grants
        } else {
            hello.master_rev
        },
        incarnation_changed,
        lost,
    }))
}

/// Records seqs `first..=last` of `site` as lost (durably, with an alert).
fn record_lost(
    txn: &WriteTransaction,
    site: &str,
    first: u64,
    last: u64,
    now_ms: i64,
) -> Result<(), ApplyError> {
    let range = LostRange {
        site: site.to_string(),
        first_seq: first,
        last_seq: last,
        at_ms: now_ms,
        reason: format!(
            "{LOST_REASON}: central was restored from a backup older than seq {last}, and the site no longer holds seqs {first}..={last} (its retention of acknowledged events is shorter than the backup's age)"
        ),
    };
    txn.open_table(LOST_RANGES)?
        .insert((site, first), encode(&range).as_slice())?;
    alerts::insert(
        txn,
        NewAlert {
            site: site.to_string(),
            from: "restored".into(),
            to: LOST_REASON.into(),
            reasons: vec![LOST_REASON.into(), format!("seq {first}..={last}")],
            at_ms: now_ms,
            drill_id: None,
        },
        MAX_ALERTS,
    )?;
    tracing::warn!(
        site.id = %site,
        first_seq = first,
        last_seq = last,
        lost = last - first + 1,
        "events lost: central was restored from a backup and the site no longer holds these seqs; the high-water mark moves past them"
    );
    Ok(())
}

/// Removes `site` from every pool's outstanding (its ATP pools and every credit pool) and
/// closes its open reclaims.
fn zero_site_allowances(txn: &WriteTransaction, site: &str) -> Result<(), ApplyError> {
    let mut pools = Vec::new();
    {
        let atp = txn.open_table(LEDGER_ATP)?;
        for row in atp.range((site, "")..)? {
            let (k, v) = row?;
            let (s, sku) = k.value();
            if s != site {
                break;
            }
            pools.push((
                LedgerKey::atp(sku, s),
                decode_w::<CentralPool>("pool", v.value())?,
            ));
        }
        let credit = txn.open_table(LEDGER_CREDIT)?;
        for row in credit.iter()? {
            let (k, v) = row?;
            pools.push((LedgerKey::credit(k.value()), decode_w("pool", v.value())?));
        }
    }
    let mut zeroed = 0usize;
    for (key, mut pool) in pools {
        if pool.outstanding.remove(site).is_some() {
            put_pool(txn, &key, &pool)?;
            zeroed += 1;
        }
    }
    let mut open = txn.open_table(OPEN_RECLAIMS)?;
    let mut closed = Vec::new();
    for row in open.iter()? {
        let (k, _) = row?;
        let (pool_text, s) = k.value();
        if s == site {
            closed.push(pool_text.to_string());
        }
    }
    for pool_text in &closed {
        open.remove((pool_text.as_str(), site))?;
    }
    tracing::warn!(
        site.id = %site,
        pools = zeroed,
        reclaims_closed = closed.len(),
        "the site last talked to another incarnation of central: its allowances are reset"
    );
    Ok(())
}

fn refused(reason: String) -> Outcome<AllowanceAnswer, StoreUnavailable> {
    Ok(Ok(AllowanceAnswer {
        granted: 0,
        rev: 0,
        reason,
    }))
}

pub(super) fn request(
    txn: &WriteTransaction,
    site: &str,
    pool: &Pool,
    qty: i64,
) -> Outcome<AllowanceAnswer, StoreUnavailable> {
    if let Err(e) = validate_pool(pool) {
        return refused(format!("invalid pool: {e}"));
    }
    if qty <= 0 {
        return refused(format!("quantity must be positive, got {qty}"));
    }
    let key = LedgerKey::for_site(site, pool);
    let Some(mut p) = get_pool(txn, &key)? else {
        return refused(format!("central has no ERP figure for {}", pool.key()));
    };
    if let LedgerKey::Credit { customer } = &key
        && get_customer(txn, customer)?.is_some_and(|c| c.on_hold)
    {
        return refused(format!("customer {customer} is on credit hold"));
    }
    let free = p.free().max(0);
    let granted = p.grant(site, qty);
    if granted == 0 {
        return refused(format!("only {free} free"));
    }
    put_pool(txn, &key, &p)?;
    let rev = append_change(
        txn,
        &MasterChange::Grant(Grant {
            site: site.to_string(),
            pool: pool.clone(),
            qty: granted,
        }),
    )?;
    let reason = if granted < qty {
        format!("only {granted} free")
    } else {
        String::new()
    };
    Ok(Ok(AllowanceAnswer {
        granted,
        rev,
        reason,
    }))
}

pub(super) fn periodic(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    connected: &[String],
    now_ms: i64,
) -> Outcome<PolicyOutcome, StoreUnavailable> {
    let connected: BTreeSet<String> = connected.iter().cloned().collect();
    for site in &connected {
        touch(txn, site, now_ms)?;
        txn.open_table(LEDGER_SITES)?.insert(site.as_str(), 0)?;
    }
    let silent = silent_sites(txn, opts, now_ms, &connected)?;
    let sites = eligible_sites(txn, opts, now_ms)?;
    let out = run_policy(txn, opts, Scope::All, &sites, &silent, now_ms)?;
    Ok(Ok(out))
}

#[cfg(test)]
mod tests {
    use outpost_protocol::{AtpRecord, CustomerRecord, MasterChange, Money};

    use super::*;
    use crate::store::tests::ev;
    use crate::store::{LedgerFilter, Store};

    const SITE: &str = "plant-1";

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("central.redb")).unwrap()
    }

    async fn atp(store: &Store, available: i64) {
        store
            .upsert_master(vec![MasterChange::Atp(AtpRecord {
                sku: "BOLT-M8".into(),
                site: SITE.into(),
                available,
            })])
            .await
            .unwrap();
    }

    fn outstanding(store: &Store, key: &LedgerKey) -> i64 {
        store.pool(key).unwrap().unwrap().outstanding(SITE)
    }

    /// Goal: a central behind what it acknowledged, whose site still holds everything after
    /// its mark, records no loss; the re-sent events count as re-uploaded.
    #[tokio::test]
    async fn behind_but_retained_loses_nothing_and_counts_the_reupload() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .ingest(SITE, (1..=3).map(|s| ev(SITE, s)).collect())
            .await
            .unwrap();
        let hello = HelloMarks {
            last_seq: 8,
            acked_seq: 6,
            retained_from_seq: 4,
            ..HelloMarks::default()
        };
        let start = store.begin_session(SITE, hello).await.unwrap();
        assert_eq!((start.acked_seq, start.lost), (3, None));
        assert!(!start.incarnation_changed);
        assert!(store.lost_ranges(None).unwrap().is_empty());
        assert!(store.alerts(0, 10).unwrap().is_empty());
        store
            .ingest(SITE, (4..=8).map(|s| ev(SITE, s)).collect())
            .await
            .unwrap();
        let r = &store.reports(SITE, 1).unwrap()[0];
        assert_eq!(
            (r.hello_acked_seq, r.reuploaded, r.events_uploaded),
            (6, 3, 5)
        );
        assert_eq!((r.lost_from_seq, r.lost_through_seq), (None, None));
        assert!(r.caught_up_ms.is_some());
        store.close().await;
    }

    /// Goal: seqs the site acknowledged and no longer holds are recorded as lost (durably, with
    /// exact seqs, an alert and in the report) and the mark moves past them, so the site is
    /// not stuck on a gap; what it still holds is taken again.
    #[tokio::test]
    async fn behind_with_a_gap_records_the_lost_range_and_moves_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .ingest(SITE, (1..=3).map(|s| ev(SITE, s)).collect())
            .await
            .unwrap();
        let hello = HelloMarks {
            last_seq: 10,
            acked_seq: 8,
            retained_from_seq: 7,
            ..HelloMarks::default()
        };
        let start = store.begin_session(SITE, hello).await.unwrap();
        assert_eq!((start.acked_seq, start.lost), (6, Some((4, 6))));
        assert_eq!(store.site_hwm(SITE).unwrap(), 6);
        let lost = store.lost_ranges(Some(SITE)).unwrap();
        assert_eq!(lost.len(), 1);
        assert_eq!((lost[0].first_seq, lost[0].last_seq), (4, 6));
        assert!(lost[0].reason.starts_with(LOST_REASON));
        assert!(store.lost_ranges(Some("plant-2")).unwrap().is_empty());
        let alerts = store.alerts(0, 10).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            (alerts[0].site.as_str(), alerts[0].to.as_str()),
            (SITE, LOST_REASON)
        );
        // The site re-sends from its retention: 7 and 8 were acknowledged before, 9 and 10 new.
        store
            .ingest(SITE, (7..=10).map(|s| ev(SITE, s)).collect())
            .await
            .unwrap();
        let r = &store.reports(SITE, 1).unwrap()[0];
        assert_eq!((r.lost_from_seq, r.lost_through_seq), (Some(4), Some(6)));
        assert_eq!(
            (r.hwm_at_connect, r.reuploaded, r.events_uploaded),
            (3, 2, 4)
        );
        // Next session: nothing behind any more, nothing recorded twice.
        let again = HelloMarks {
            last_seq: 10,
            acked_seq: 10,
            retained_from_seq: 7,
            ..HelloMarks::default()
        };
        let start = store.begin_session(SITE, again).await.unwrap();
        assert_eq!((start.acked_seq, start.lost), (10, None));
        assert_eq!(store.lost_ranges(None).unwrap().len(), 1);
        store.close().await;
    }

    /// Goal: a site that last talked to another incarnation has its outstanding zeroed in every
    /// pool (and its open reclaims closed) before the session's top-ups, and master changes
    /// resume from the revision before those grants, so the agent (which dropped its
    /// allowances) receives exactly the new grants.
    #[tokio::test]
    async fn incarnation_change_zeroes_the_site_before_its_top_ups() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let own = store.incarnation().unwrap();
        store
            .begin_session(SITE, HelloMarks::with_last_seq(0))
            .await
            .unwrap();
        atp(&store, 40).await;
        store
            .upsert_master(vec![MasterChange::Customer(CustomerRecord {
                id: "C1".into(),
                name: "Acme".into(),
                credit_limit: Money(10_000_000),
                on_hold: false,
            })])
            .await
            .unwrap();
        let (atp_key, credit_key) = (LedgerKey::atp("BOLT-M8", SITE), LedgerKey::credit("C1"));
        assert_eq!(outstanding(&store, &atp_key), 20);
        assert_eq!(outstanding(&store, &credit_key), 2_000_000);
        // The ERP lowers ATP below what is granted: a reclaim of 10 opens on the site.
        atp(&store, 10).await;
        let entry = store
            .ledger(
                &LedgerFilter {
                    key: Some(atp_key.clone()),
                    site: None,
                },
                1,
            )
            .unwrap();
        assert_eq!(entry[0].open_reclaims.get(SITE), Some(&10));
        let before = store.revision().unwrap();

        let hello = HelloMarks {
            central_incarnation: own ^ 1,
            master_rev: 999,
            ..HelloMarks::with_last_seq(0)
        };
        let start = store.begin_session(SITE, hello).await.unwrap();
        assert!(start.incarnation_changed);
        assert_eq!(start.incarnation, own);
        assert_eq!(start.master_from_rev, before);
        // Zeroed first, then topped up from what is free: 10 of ATP, the full credit target.
        assert_eq!(outstanding(&store, &atp_key), 10);
        assert_eq!(outstanding(&store, &credit_key), 2_000_000);
        let entry = store
            .ledger(
                &LedgerFilter {
                    key: Some(atp_key.clone()),
                    site: None,
                },
                1,
            )
            .unwrap();
        assert!(entry[0].open_reclaims.is_empty());
        let grants: Vec<(String, i64)> = store
            .changes_after(start.master_from_rev, 100)
            .unwrap()
            .into_iter()
            .map(|(_, c)| match c {
                MasterChange::Grant(g) => (g.pool.key(), g.qty),
                other => panic!("only grants after master_from_rev, got {other:?}"),
            })
            .collect();
        assert_eq!(
            grants,
            vec![
                ("atp:BOLT-M8".to_string(), 10),
                ("credit:C1".to_string(), 2_000_000)
            ]
        );
        assert_eq!(start.revision, before + 2);
        assert!(store.reports(SITE, 1).unwrap()[0].incarnation_changed);
        store.close().await;
    }

    /// Goal: the same incarnation (or none yet) changes nothing: master changes resume from
    /// the Hello's revision and what the site holds stays as is.
    #[tokio::test]
    async fn same_incarnation_keeps_allowances_and_the_agents_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let own = store.incarnation().unwrap();
        store
            .begin_session(SITE, HelloMarks::with_last_seq(0))
            .await
            .unwrap();
        atp(&store, 40).await;
        let key = LedgerKey::atp("BOLT-M8", SITE);
        let rev = store.revision().unwrap();
        for incarnation in [own, 0] {
            let hello = HelloMarks {
                central_incarnation: incarnation,
                master_rev: 1,
                ..HelloMarks::with_last_seq(0)
            };
            let start = store.begin_session(SITE, hello).await.unwrap();
            assert!(!start.incarnation_changed);
            assert_eq!(start.master_from_rev, 1);
            assert_eq!(outstanding(&store, &key), 20);
            assert_eq!(store.revision().unwrap(), rev, "no new grants");
        }
        store.close().await;
    }
}
