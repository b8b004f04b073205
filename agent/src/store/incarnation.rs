//! Adopting the incarnation of central's store named by a Welcome inside a write group: when
//! central was restored from a backup, every allowance drops to 0 and the applied master
//! revision goes back to where central resends from. Blocking I/O side (the writer's
//! transaction).

use outpost_protocol::Pool;
use redb::ReadableTable;

use super::error::Fail;
use super::schema::{K_CENTRAL_INCARNATION, K_MASTER_REV, Tables, parse_pool_key};
use super::types::IncarnationChange;

/// See `Store::adopt_central_incarnation`.
pub(super) fn adopt_incarnation(
    t: &mut Tables<'_>,
    incarnation: u64,
    master_from_rev: u64,
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
