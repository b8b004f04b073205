//! Applying a master batch inside a write group: the revision check, prices, ATP, customers,
//! grants and reclaims of allowance (with the return event each reclaim owes), and the ERP's
//! decisions on orders. Blocking I/O side (the writer's transaction).

use std::collections::BTreeMap;

use outpost_protocol::{
    AllowanceReturn, EventBody, EventEnvelope, MasterBatch, MasterChange, Pool,
};

use redb::ReadableTable;

use super::error::{Fail, WriteError};
use super::schema::{K_AS_OF, K_LAST_SEQ, K_MASTER_REV, Tables};
use super::types::{OrderRecord, PriceValue};

/// Event id of the `AllowanceReturn` answering reclaim `reclaim_id`.
pub fn return_event_id(site: &str, reclaim_id: u64) -> String {
    format!("{site}-r{reclaim_id}")
}

/// What applying a master batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct MasterApplied {
    /// The batch was new (not stale) and its revision is now the applied one.
    pub(super) applied: bool,
    /// Outbox events were appended (answers to reclaims).
    pub(super) new_events: bool,
}

pub(super) fn apply_master(
    t: &mut Tables<'_>,
    site: &str,
    batch: &MasterBatch,
    at_ms: i64,
) -> Result<MasterApplied, Fail> {
    let rev = t.meta(K_MASTER_REV)?;
    if batch.through_rev <= rev {
        return Ok(MasterApplied::default());
    }
    let bad = |m: String| Fail::Reject(WriteError::BadMasterBatch(m));
    if batch.from_rev != rev {
        // A batch must continue exactly at the applied revision. Starting later would skip the
        // changes in between; starting earlier would apply some changes twice, and a grant
        // applied twice is allowance central never escrowed. The session is restarted instead
        // and central resends from the applied revision.
        return Err(bad(format!(
            "batch covers revisions after {} but this site has applied exactly {rev}",
            batch.from_rev
        )));
    }
    if batch.changes.len() > outpost_protocol::MAX_CHANGES_PER_FRAME {
        return Err(bad(format!("{} changes in one batch", batch.changes.len())));
    }
    // Check everything before writing anything, so a bad batch leaves no trace: shapes, and that
    // no grant overflows an allowance.
    let mut granted: BTreeMap<&Pool, i64> = BTreeMap::new();
    for (i, c) in batch.changes.iter().enumerate() {
        c.validate()
            .map_err(|e| bad(format!("change {i} is invalid: {e}")))?;
        if let MasterChange::Grant(g) = c
            && g.site == site
        {
            let have = match granted.get(&g.pool) {
                Some(v) => *v,
                None => t.pool(&g.pool)?.remaining,
            };
            let after = have
                .checked_add(g.qty)
                .ok_or_else(|| bad(format!("change {i}: grant overflows the allowance")))?;
            granted.insert(&g.pool, after);
        }
    }
    let mut new_events = false;
    for c in &batch.changes {
        // Central sends only this site's rows; another site's row would be wrong here.
        if !c.concerns(site) {
            continue;
        }
        match c {
            MasterChange::Price(p) => {
                let v = PriceValue {
                    unit_price: p.unit_price,
                    currency: p.currency.clone(),
                };
                let customer = p.customer.as_deref().unwrap_or("");
                t.prices.insert(
                    (p.sku.as_str(), customer),
                    postcard::to_allocvec(&v)?.as_slice(),
                )?;
            }
            MasterChange::Atp(a) => {
                t.atp.insert(a.sku.as_str(), a.available)?;
            }
            MasterChange::Customer(c) => {
                t.customers
                    .insert(c.id.as_str(), postcard::to_allocvec(c)?.as_slice())?;
            }
            MasterChange::Grant(g) => {
                let mut p = t.pool(&g.pool)?;
                p.handle_grant(g.qty);
                t.set_pool(&g.pool, p)?;
            }
            MasterChange::Reclaim(r) => {
                let mut p = t.pool(&r.pool)?;
                let returned = p.handle_reclaim(r.qty);
                t.set_pool(&r.pool, p)?;
                // The answer is owed whatever the outbox holds (it is tiny and central asks
                // rarely), so it bypasses the outbox limit: refusing it would stall master data.
                let seq = t.meta(K_LAST_SEQ)? + 1;
                let env = EventEnvelope::new(
                    site,
                    seq,
                    &return_event_id(site, r.reclaim_id),
                    at_ms,
                    &EventBody::AllowanceReturn(AllowanceReturn {
                        reclaim_id: r.reclaim_id,
                        pool: r.pool.clone(),
                        qty: returned,
                    }),
                );
                t.append_event(&env)?;
                new_events = true;
                tracing::info!(
                    reclaim_id = r.reclaim_id,
                    pool = %r.pool.key(),
                    asked = r.qty,
                    returned,
                    "allowance reclaimed"
                );
            }
            MasterChange::OrderStatus(o) => set_erp_status(t, o)?,
        }
    }
    t.meta.insert(K_MASTER_REV, batch.through_rev)?;
    t.meta.insert(K_AS_OF, u64::try_from(at_ms).unwrap_or(0))?;
    Ok(MasterApplied {
        applied: true,
        new_events,
    })
}

/// Records the ERP's decision on one of this site's orders. An order this site does not know
/// (one sold through central's own channel for this site, or a record lost to corruption) is
/// logged and skipped: failing here would stop all master data behind it.
fn set_erp_status(t: &mut Tables<'_>, o: &outpost_protocol::OrderStatusUpdate) -> Result<(), Fail> {
    let rec = match t.orders.get(o.order_id.as_str())? {
        Some(g) => postcard::from_bytes::<OrderRecord>(g.value()),
        None => {
            tracing::debug!(order.id = %o.order_id, "order status for an order not taken here");
            return Ok(());
        }
    };
    let mut rec = match rec {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(order.id = %o.order_id, error = %e, "order record is corrupt; status not recorded");
            return Ok(());
        }
    };
    rec.erp_status = Some(o.status);
    rec.erp_reason = o.reason.clone();
    t.orders
        .insert(o.order_id.as_str(), postcard::to_allocvec(&rec)?.as_slice())?;
    tracing::info!(order.id = %o.order_id, status = o.status.as_str(), "ERP decision recorded");
    Ok(())
}
