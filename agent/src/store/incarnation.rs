//! Adopting the incarnation of central's store named by a Welcome inside a write group: when
//! central was restored from a backup, every allowance drops to 0 and the applied master
//! revision goes back to where central resends from. Blocking I/O side (the writer's
//! transaction).

use std::collections::BTreeMap;

use outpost_protocol::{EventBody, EventEnvelope, LinePromise, Pool, SitePool};
use redb::ReadableTable;

use super::error::Fail;
use super::schema::{K_CENTRAL_INCARNATION, K_LAST_SEQ, K_MASTER_REV, Tables, parse_pool_key};
use super::types::IncarnationChange;

/// See `Store::adopt_central_incarnation`.
pub(super) fn adopt_incarnation(
    t: &mut Tables<'_>,
    incarnation: u64,
    master_from_rev: u64,
    hello_last_seq: u64,
) -> Result<IncarnationChange, Fail> {
    let previous = t.meta(K_CENTRAL_INCARNATION)?;
    if previous == incarnation {
        return Ok(IncarnationChange::Unchanged);
    }
    if previous == 0 {
        t.meta.insert(K_CENTRAL_INCARNATION, incarnation)?;
        return Ok(IncarnationChange::First);
    }
    // Every allowance, however many: the table holds one row per pool granted (hundreds to a
    // few thousand), and a partial reset would leave the site confirming on grants the restored
    // central does not know.
    let mut held = Vec::new();
    for row in t.allowances.iter()? {
        let (k, v) = row?;
        if v.value() != 0 {
            held.push((k.value().to_string(), v.value()));
        }
    }
    let (mut atp_dropped, mut credit_dropped) = (0i64, 0i64);
    for (k, v) in &held {
        match parse_pool_key(k) {
            Some(Pool::Credit { .. }) => credit_dropped = credit_dropped.saturating_add(*v),
            _ => atp_dropped = atp_dropped.saturating_add(*v),
        }
        t.allowances.insert(k.as_str(), 0)?;
    }
    // Orders confirmed after the Hello (while the Welcome was on its way) used the allowances
    // just dropped, yet central, which knows only the Hello's last seq, counts them against the
    // grants it made this session: the site owes their units from those grants.
    for (pool, owed) in owed_since(t, hello_last_seq)? {
        t.set_pool(&pool, SitePool { remaining: -owed })?;
    }
    let master_rev_before = t.meta(K_MASTER_REV)?;
    t.meta.insert(K_MASTER_REV, master_from_rev)?;
    t.meta.insert(K_CENTRAL_INCARNATION, incarnation)?;
    Ok(IncarnationChange::Changed {
        previous,
        allowances_dropped: held.len() as u64,
        atp_dropped,
        credit_dropped,
        master_rev_before,
    })
}

/// What the orders in the outbox after seq `after` confirmed, per pool: ATP units per SKU and
/// credit value per customer, as central counts an order's consumption.
fn owed_since(t: &Tables<'_>, after: u64) -> Result<BTreeMap<Pool, i64>, Fail> {
    let mut owed: BTreeMap<Pool, i64> = BTreeMap::new();
    let last = t.meta(K_LAST_SEQ)?;
    if after >= last {
        return Ok(owed);
    }
    for row in t.outbox.range(after + 1..=last)? {
        let (_, v) = row?;
        let Ok(env) = postcard::from_bytes::<EventEnvelope>(v.value()) else {
            continue;
        };
        let Ok(EventBody::Order(o)) = env.decode() else {
            continue;
        };
        for l in o
            .lines
            .iter()
            .filter(|l| l.promise == LinePromise::Confirmed)
        {
            let units = owed.entry(Pool::atp(&l.sku)).or_insert(0);
            *units = units.saturating_add(l.qty);
            let value = owed.entry(Pool::credit(&o.customer_id)).or_insert(0);
            *value = value.saturating_add(l.qty.saturating_mul(l.unit_price.units()));
        }
    }
    owed.retain(|_, q| *q > 0);
    Ok(owed)
}
