//! JSON shapes of central's records in API responses: orders, exceptions, dead letters,
//! reconciliation reports and ledger entries. Pure rendering.

use outpost_protocol::{CentralPool, EventBody, Order, OrderLine};
use serde_json::{Map, Value, json};

use super::rfc3339_ms;
use crate::ledger::LedgerKey;
use crate::store::{
    DeadLetter, ExceptionRecord, LedgerEntry, OrderRecord, ReconReport, StoredEvent,
};

/// Order lines with each line's promise: `confirmed`, `pending_allowance`, `pending_credit` or
/// `pending_hold`.
pub fn lines_json(lines: &[OrderLine]) -> Value {
    Value::Array(
        lines
            .iter()
            .map(|l| {
                json!({
                    "sku": l.sku,
                    "qty": l.qty,
                    "unit_price": l.unit_price,
                    "currency": l.currency,
                    "promise": l.promise.as_str(),
                })
            })
            .collect(),
    )
}

/// The pool fields shared by ledger entries and allowance uses: `pool` as a site sees it
/// (`atp:SKU` / `credit:CUSTOMER`), `key` (central's: `atp:SKU@site`), and the SKU and site, or
/// the customer.
fn pool_fields(m: &mut Map<String, Value>, key: &LedgerKey) {
    m.insert("pool".into(), json!(key.pool().key()));
    m.insert("key".into(), json!(key.text()));
    match key {
        LedgerKey::Atp { sku, site } => {
            m.insert("sku".into(), json!(sku));
            m.insert("site".into(), json!(site));
        }
        LedgerKey::Credit { customer } => {
            m.insert("customer".into(), json!(customer));
            m.insert("site".into(), Value::Null);
        }
    }
}

/// One feed entry: the envelope's fields, then the body's fields flattened beside them. Orders
/// carry their lifecycle stage (`status: "uploaded"`: the feed holds an order once central has it
/// durably and it passed the checks), the site's promise (`promise_status`), the channel, and each
/// line's promise.
pub fn event_json(e: &StoredEvent) -> Value {
    let env = &e.event;
    let mut m = Map::new();
    m.insert("cursor".into(), json!(e.cursor));
    m.insert("site".into(), json!(e.site));
    m.insert("seq".into(), json!(env.seq));
    m.insert("id".into(), json!(env.event_id));
    m.insert("site_time".into(), json!(rfc3339_ms(env.at_ms)));
    m.insert("channel".into(), json!(e.channel.as_str()));
    // Validated at ingest: every event in the feed carries a well-formed trace id.
    m.insert("trace_id".into(), json!(env.trace_id));
    match env.decode() {
        Ok(EventBody::Order(o)) => {
            m.insert("kind".into(), json!("order"));
            m.insert("order_id".into(), json!(o.order_id));
            m.insert("customer_id".into(), json!(o.customer_id));
            m.insert("status".into(), json!("uploaded"));
            m.insert("promise_status".into(), json!(o.status));
            m.insert("offline".into(), json!(o.offline));
            m.insert("master_rev".into(), json!(o.master_rev));
            m.insert("lines".into(), lines_json(&o.lines));
        }
        Ok(EventBody::Milestone(ms)) => {
            m.insert("kind".into(), json!("milestone"));
            m.insert("shipment_id".into(), json!(ms.shipment_id));
            m.insert("milestone".into(), json!(ms.milestone.as_str()));
            m.insert("scanner_id".into(), json!(ms.scanner_id));
            m.insert("at".into(), json!(ms.at));
        }
        // Neither reaches the feed (returns go to the ledger, undecodable events to the dead
        // letters); rendered rather than hidden should a stored row ever be one.
        Ok(EventBody::AllowanceReturn(r)) => {
            m.insert("kind".into(), json!("allowance_return"));
            m.insert("reclaim_id".into(), json!(r.reclaim_id));
            m.insert("pool".into(), json!(r.pool.key()));
            m.insert("qty".into(), json!(r.qty));
        }
        Err(err) => {
            m.insert("kind".into(), json!("undecodable"));
            m.insert("error".into(), json!(err.to_string()));
        }
    }
    Value::Object(m)
}

pub fn order_json(o: &OrderRecord) -> Value {
    json!({
        "order_id": o.order_id,
        "site": o.site,
        "channel": o.channel.as_str(),
        "customer_id": o.customer_id,
        "status": o.state.as_str(),
        "reason": o.reason,
        "promise_status": o.promise_status,
        "offline": o.offline,
        "master_rev": o.master_rev,
        "seq": o.seq,
        "lines": lines_json(&o.lines),
        "exception_id": o.exception_id,
        "site_time": rfc3339_ms(o.site_time_ms),
        "received_at": rfc3339_ms(o.received_ms),
        "decided_at": o.decided_ms.map(rfc3339_ms),
    })
}

/// The 201 answer of central's own order channel.
pub fn central_order_json(o: &OrderRecord) -> Value {
    json!({
        "order_id": o.order_id,
        "status": "confirmed",
        "channel": o.channel.as_str(),
        "site": o.site,
        "customer_id": o.customer_id,
        "lines": lines_json(&o.lines),
        "master_rev": o.master_rev,
        "created_at": rfc3339_ms(o.received_ms),
    })
}

fn site_order_json(o: &Order, at_ms: i64) -> Value {
    json!({
        "order_id": o.order_id,
        "customer_id": o.customer_id,
        "status": o.status,
        "offline": o.offline,
        "master_rev": o.master_rev,
        "lines": lines_json(&o.lines),
        "site_time": rfc3339_ms(at_ms),
    })
}

pub fn exception_json(e: &ExceptionRecord) -> Value {
    let allowance: Vec<Value> = e
        .site_data
        .allowance
        .iter()
        .map(|u| {
            let mut m = Map::new();
            pool_fields(&mut m, &u.pool);
            m.insert("consumed".into(), json!(u.consumed));
            m.insert("outstanding_before".into(), json!(u.outstanding_before));
            Value::Object(m)
        })
        .collect();
    let lines: Vec<Value> = e
        .site_data
        .lines
        .iter()
        .map(|l| {
            json!({
                "sku": l.sku,
                "site_unit_price": l.site_unit_price,
                "site_currency": l.site_currency,
                "central_unit_price": l.central_unit_price,
                "central_currency": l.central_currency,
            })
        })
        .collect();
    json!({
        "id": e.id,
        "site": e.site,
        "seq": e.seq,
        "event_id": e.event_id,
        "order_id": e.order.order_id,
        "class": "business",
        "reasons": e.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "reason": e.reasons.first().map(|r| r.as_str()),
        "status": if e.is_open() { "open" } else { "resolved" },
        "event": site_order_json(&e.order, e.event.at_ms),
        "site_data": {
            "master_rev": e.site_data.master_rev,
            "lines": lines,
            "allowance": allowance,
        },
        "central_data": {
            "revision": e.central_data.revision,
            "customer_known": e.central_data.customer_on_hold.is_some(),
            "customer_on_hold": e.central_data.customer_on_hold,
        },
        "created_at": rfc3339_ms(e.created_ms),
        "resolution": e.resolution.as_ref().map(|r| json!({
            "action": r.action.as_str(),
            "reason": r.reason,
            "at": rfc3339_ms(r.at_ms),
        })),
    })
}

pub fn dead_letter_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id,
        "site": d.site,
        "seq": d.seq,
        "event_id": d.event_id,
        "class": "permanent",
        "reason": d.reason,
        "schema": d.event.schema,
        "body_bytes": d.event.body.len(),
        // A malformed trace id may be why the event is here; only a valid one is echoed.
        "trace_id": outpost_protocol::validate_trace_id(&d.event.trace_id)
            .is_ok()
            .then_some(&d.event.trace_id),
        "site_time": rfc3339_ms(d.event.at_ms),
        "created_at": rfc3339_ms(d.created_ms),
    })
}

pub fn report_json(r: &ReconReport) -> Value {
    json!({
        "site": r.site,
        "session": r.session,
        "connected_at": rfc3339_ms(r.connected_ms),
        "dark_since": r.dark_since_ms.map(rfc3339_ms),
        "dark_secs": r.dark_since_ms.map(|d| (r.connected_ms - d).max(0) / 1000),
        "hello_last_seq": r.hello_last_seq,
        "hwm_at_connect": r.hwm_at_connect,
        "backlog_at_connect": r.hello_last_seq.saturating_sub(r.hwm_at_connect),
        "events_uploaded": r.events_uploaded,
        "duplicates_dropped": r.duplicates_dropped,
        "orders_offline_confirmed": r.orders_offline_confirmed,
        "orders_offline_pending": r.orders_offline_pending,
        "orders_offline_partial": r.orders_offline_partial,
        "exceptions_business": r.exceptions_business,
        "dead_letters": r.dead_letters,
        "exceptions": {"business": r.exceptions_business, "permanent": r.dead_letters},
        "caught_up_at": r.caught_up_ms.map(rfc3339_ms),
        "catch_up_ms": r.caught_up_ms.map(|c| (c - r.connected_ms).max(0)),
        "hello_acked_seq": r.hello_acked_seq,
        "reuploaded": r.reuploaded,
        "lost_from_seq": r.lost_from_seq,
        "lost_through_seq": r.lost_through_seq,
        "incarnation_changed": r.incarnation_changed,
    })
}

fn pool_json(m: &mut Map<String, Value>, p: &CentralPool) {
    m.insert("erp_available".into(), json!(p.erp_available));
    m.insert("in_transit".into(), json!(p.in_transit));
    m.insert("accepted_since_push".into(), json!(p.accepted_since_push));
    m.insert("outstanding".into(), json!(p.outstanding));
    m.insert("free".into(), json!(p.free()));
}

/// A ledger entry. Credit pools count money units (1/10,000 of the currency unit).
pub fn ledger_json(e: &LedgerEntry) -> Value {
    let mut m = Map::new();
    pool_fields(&mut m, &e.key);
    pool_json(&mut m, &e.pool);
    m.insert("open_reclaims".into(), json!(e.open_reclaims));
    Value::Object(m)
}
