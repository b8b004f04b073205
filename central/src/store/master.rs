//! The master-data upsert: validates the ERP's items, writes them with consecutive revisions
//! into the change log and the current state, and applies the reclaims and top-ups their new
//! figures call for, all in the writer's one transaction. I/O side (redb).

use outpost_protocol::MasterChange;
use redb::WriteTransaction;

use super::txn::{append_change, get_pool, meta_get, put_pool};
use super::{
    ATP, CUSTOMERS, LEDGER_SITES, META_REVISION, MasterApplied, Outcome, PRICES, StoreOptions,
    UpsertMasterError, allowance, encode,
};
use crate::ledger::LedgerKey;

/// Applies the ERP's items, then the reclaims and top-ups their new figures call for.
pub(super) fn apply_master(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    changes: &[MasterChange],
    now_ms: i64,
) -> Outcome<MasterApplied, UpsertMasterError> {
    if let Err(invalid) = crate::checks::validate_erp_changes(changes) {
        return Ok(Err(UpsertMasterError::Invalid(invalid)));
    }
    let mut touched = std::collections::BTreeSet::new();
    for change in changes {
        append_change(txn, change)?;
        match change {
            MasterChange::Price(p) => {
                let mut prices = txn.open_table(PRICES)?;
                let key = (p.sku.as_str(), p.customer.as_deref().unwrap_or(""));
                prices.insert(key, encode(p).as_slice())?;
            }
            MasterChange::Atp(a) => {
                txn.open_table(ATP)?
                    .insert((a.sku.as_str(), a.site.as_str()), a.available)?;
                txn.open_table(LEDGER_SITES)?.insert(a.site.as_str(), 0)?;
                let key = LedgerKey::atp(&a.sku, &a.site);
                let mut pool = get_pool(txn, &key)?.unwrap_or_default();
                pool.handle_erp_push(a.available);
                put_pool(txn, &key, &pool)?;
                touched.insert(key);
            }
            MasterChange::Customer(c) => {
                txn.open_table(CUSTOMERS)?
                    .insert(c.id.as_str(), encode(c).as_slice())?;
                let key = LedgerKey::credit(&c.id);
                let mut pool = get_pool(txn, &key)?.unwrap_or_default();
                pool.handle_erp_push(c.credit_limit.units());
                put_pool(txn, &key, &pool)?;
                touched.insert(key);
            }
            MasterChange::Grant(_) | MasterChange::Reclaim(_) | MasterChange::OrderStatus(_) => {
                unreachable!("refused above")
            }
        }
    }
    let sites = allowance::eligible_sites(txn, opts, now_ms)?;
    let moved = allowance::run_policy(
        txn,
        opts,
        allowance::Scope::Pools(touched),
        &sites,
        &Default::default(),
        now_ms,
    )?;
    Ok(Ok(MasterApplied {
        revision: meta_get(txn, META_REVISION)?,
        changes: changes.len(),
        grants: moved.grants,
        reclaims: moved.reclaims,
    }))
}
