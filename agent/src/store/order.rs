//! Taking an order inside a write group: shape checks, pricing, the capture decision against
//! the site's allowances, and the records and outbox event it writes, all in the group's
//! transaction. Blocking I/O side (redb tables of the writer's transaction).

use std::collections::BTreeMap;

use outpost_protocol::{
    CustomerRecord, EventBody, EventEnvelope, LinePromise, MAX_ORDER_LINES, MAX_QTY, Order,
    OrderLine, Pool, validate_id,
};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::error::{Fail, WriteError};
use super::schema::{K_MASTER_REV, Tables, lookup_price, sku_known};
use super::types::{NewOrder, OrderRecord, Outcome};
use crate::capture;

#[derive(Serialize, Deserialize)]
struct IdemRecord {
    /// Canonical encoding of the request the key was first used with.
    fingerprint: Vec<u8>,
    order_id: String,
}

/// The pools an order draws on: the ATP of each of its SKUs and the customer's credit.
pub(super) fn order_pools(customer: &str, lines: &[OrderLine]) -> Vec<Pool> {
    let mut pools: Vec<Pool> = lines.iter().map(|l| Pool::atp(&l.sku)).collect();
    pools.push(Pool::credit(customer));
    pools.sort();
    pools.dedup();
    pools
}

/// Shape checks on an order; domain checks (customer, prices) need the tables.
pub fn validate_new_order(o: &NewOrder) -> Result<(), WriteError> {
    let v = |e: outpost_protocol::ValidationError| WriteError::Validation(e.to_string());
    validate_id("customer_id", &o.customer_id).map_err(v)?;
    if o.lines.is_empty() || o.lines.len() > MAX_ORDER_LINES {
        return Err(WriteError::Validation(format!(
            "lines: an order has 1..={MAX_ORDER_LINES} lines, got {}",
            o.lines.len()
        )));
    }
    for (i, l) in o.lines.iter().enumerate() {
        validate_id("sku", &l.sku)
            .map_err(|e| WriteError::Validation(format!("lines[{i}].{e}")))?;
        if !(1..=MAX_QTY).contains(&l.qty) {
            return Err(WriteError::Validation(format!(
                "lines[{i}].qty must be 1..={MAX_QTY}, got {}",
                l.qty
            )));
        }
    }
    Ok(())
}

pub(super) fn create_order(
    t: &mut Tables<'_>,
    site: &str,
    key: &str,
    req: &NewOrder,
    at_ms: i64,
    offline: bool,
    trace_id: Option<&str>,
) -> Result<Outcome<OrderRecord>, Fail> {
    // The fingerprint is the request alone: a retry is the same request whether or not the link
    // was up, and gets the original answer without consuming anything again.
    let fingerprint = postcard::to_allocvec(req)?;
    if let Some(g) = t.idempotency.get(key)? {
        let idem: IdemRecord = postcard::from_bytes(g.value())?;
        if idem.fingerprint != fingerprint {
            return Err(WriteError::IdempotencyKeyReused.into());
        }
        let Some(o) = t.orders.get(idem.order_id.as_str())? else {
            return Err(WriteError::Corrupt(format!(
                "idempotency record points at missing order {}",
                idem.order_id
            ))
            .into());
        };
        return Ok(Outcome::Existing(postcard::from_bytes(o.value())?));
    }
    validate_new_order(req)?;
    let Some(c) = t.customers.get(req.customer_id.as_str())? else {
        return Err(WriteError::UnknownCustomer(req.customer_id.clone()).into());
    };
    let customer: CustomerRecord = postcard::from_bytes(c.value())?;
    drop(c);
    let mut lines = Vec::with_capacity(req.lines.len());
    for l in &req.lines {
        let Some(p) = lookup_price(&t.prices, &l.sku, &req.customer_id)? else {
            return Err(if sku_known(t, &l.sku)? {
                WriteError::NoPrice {
                    sku: l.sku.clone(),
                    customer: req.customer_id.clone(),
                }
            } else {
                WriteError::UnknownSku(l.sku.clone())
            }
            .into());
        };
        lines.push(OrderLine {
            sku: l.sku.clone(),
            qty: l.qty,
            unit_price: p.unit_price,
            currency: p.currency,
            promise: LinePromise::PendingAllowance,
        });
    }
    let mut pools = BTreeMap::new();
    for pool in order_pools(&req.customer_id, &lines) {
        let p = t.pool(&pool)?;
        pools.insert(pool, p);
    }
    let decided = capture::plan_capture(&req.customer_id, customer.on_hold, &lines, &pools);
    for (l, p) in lines.iter_mut().zip(&decided.promises) {
        l.promise = *p;
    }
    let seq = t.next_seq()?;
    let master_rev = t.meta(K_MASTER_REV)?;
    // Every check passed: from here on the operation only writes.
    for (pool, after) in &decided.consumed {
        t.set_pool(pool, *after)?;
    }
    let order = Order {
        order_id: format!("{site}-o{seq}"),
        customer_id: req.customer_id.clone(),
        status: decided.status.to_string(),
        lines,
        master_rev,
        offline,
    };
    let mut env = EventEnvelope::new(
        site,
        seq,
        &order.order_id,
        at_ms,
        &EventBody::Order(order.clone()),
    );
    if let Some(id) = trace_id {
        env = env.with_trace_id(id);
    }
    tracing::debug!(
        trace_id = %env.trace_id,
        seq,
        event_id = %env.event_id,
        "order added to the outbox transaction"
    );
    let record = OrderRecord {
        order,
        seq,
        at_ms,
        reasons: decided.reasons,
        erp_status: None,
        erp_reason: None,
        trace_id: env.trace_id.clone(),
    };
    t.append_event(&env)?;
    t.orders.insert(
        record.order.order_id.as_str(),
        postcard::to_allocvec(&record)?.as_slice(),
    )?;
    let idem = IdemRecord {
        fingerprint,
        order_id: record.order.order_id.clone(),
    };
    t.idempotency
        .insert(key, postcard::to_allocvec(&idem)?.as_slice())?;
    Ok(Outcome::Created(record))
}
