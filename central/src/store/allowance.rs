//! The allowance side of the writer: runs the pure top-up and reclaim policy (`crate::ledger`)
//! over the pools a transaction touched and writes its grants and reclaims as master changes in
//! that same transaction; answers a site's allowance request; starts a session's reconciliation
//! report; runs the periodic check. I/O side (inside the store's write transaction).

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocol::{CentralPool, Grant, MasterChange, Pool, Reclaim, validate_pool};
use redb::{ReadableTable, WriteTransaction};

use super::records::{OpenReclaim, ReconReport};
use super::{
    Broken, LEDGER_ATP, LEDGER_CREDIT, LEDGER_SITES, MAX_REPORTS_PER_SITE, META_LAST_RECLAIM,
    META_REVISION, OPEN_RECLAIMS, Outcome, REPORTS, SITE_HWM, SITES, SiteRecord, StoreOptions,
    StoreUnavailable, append_change, decode_w, encode, get_customer, get_pool, meta_get, next_id,
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

/// What a session needs for its Welcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionStart {
    /// The site's durable high-water mark.
    pub acked_seq: u64,
    /// Number of the reconciliation report this session fills.
    pub session: u64,
    /// Central's revision after the session's top-ups.
    pub revision: u64,
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

fn site_records(txn: &WriteTransaction) -> Result<BTreeMap<String, SiteRecord>, Broken> {
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
) -> Result<BTreeSet<String>, Broken> {
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
) -> Result<BTreeSet<String>, Broken> {
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
) -> Result<BTreeMap<LedgerKey, CentralPool>, Broken> {
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
) -> Result<BTreeMap<(String, LedgerKey), i64>, Broken> {
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
) -> Result<PolicyOutcome, Broken> {
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
) -> Result<Option<ReconReport>, Broken> {
    let t = txn.open_table(REPORTS)?;
    let last = t.range((site, 0u64)..=(site, u64::MAX))?.next_back();
    match last {
        Some(row) => Ok(Some(decode_w("report", row?.1.value())?)),
        None => Ok(None),
    }
}

pub(crate) fn put_report(txn: &WriteTransaction, r: &ReconReport) -> Result<(), Broken> {
    let mut t = txn.open_table(REPORTS)?;
    t.insert((r.site.as_str(), r.session), encode(r).as_slice())?;
    Ok(())
}

pub(super) fn begin_session(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    site: &str,
    hello_last_seq: u64,
    now_ms: i64,
) -> Outcome<SessionStart, StoreUnavailable> {
    let hwm = {
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
    let session = current_report(txn, site)?.map_or(1, |r| r.session + 1);
    let report = ReconReport {
        site: site.to_string(),
        session,
        connected_ms: now_ms,
        dark_since_ms,
        hello_last_seq,
        hwm_at_connect: hwm,
        caught_up_ms: (hwm >= hello_last_seq).then_some(now_ms),
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
    }))
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
