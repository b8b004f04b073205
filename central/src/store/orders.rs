//! The order lifecycle inside the writer's transaction: central's own sales channel, the ERP's
//! decisions, and operators resolving or replaying business exceptions. I/O side.

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocol::{
    ErpStatus, EscrowError, EventBody, EventEnvelope, LinePromise, MasterChange, Order, OrderLine,
    OrderStatusUpdate,
};
use redb::{ReadableTable, WriteTransaction};

use super::allowance::{Scope, eligible_sites, run_policy};
use super::ingest::check_against_master;
use super::records::{
    CentralData, CentralOrderRequest, Channel, ExceptionRecord, IdemRecord, OrderRecord,
    OrderState, Resolution, ResolutionAction,
};
use super::{
    ATP, ApplyError, CENTRAL_IDEM, EXCEPTIONS, META_LAST_CENTRAL_ORDER, META_REVISION, Outcome,
    PRICES, StoreOptions, StoreUnavailable, append_change, append_feed, decode_w, effective_price,
    encode, get_customer, get_order, get_pool, meta_get, next_id, put_order, put_pool,
};
use crate::checks::Reason;
use crate::ledger::LedgerKey;

/// Why central's channel did not take an order. Nothing was stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CentralOrderError {
    #[error("this Idempotency-Key was used with a different request")]
    KeyReused,
    #[error("unknown customer {0}")]
    UnknownCustomer(String),
    #[error("customer {0} is on credit hold")]
    CreditHold(String),
    #[error("unknown SKU {0}")]
    UnknownSku(String),
    #[error("no price for SKU {sku} (customer {customer}) and no list price")]
    NoPrice { sku: String, customer: String },
    #[error("insufficient ATP for {sku} at {site}: {free} free, {wanted} wanted")]
    InsufficientAtp {
        sku: String,
        site: String,
        free: i64,
        wanted: i64,
    },
    /// Amounts in money units (1/10,000).
    #[error(
        "insufficient credit for customer {customer}: {free} free, {wanted} wanted (money units)"
    )]
    InsufficientCredit {
        customer: String,
        free: i64,
        wanted: i64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
}

#[derive(Clone, Debug, PartialEq)]
pub struct CentralOrderOutcome {
    pub order: OrderRecord,
    /// The same key and request were seen before: this is the original order, nothing new stored.
    pub replayed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DecideError {
    #[error("no such order")]
    NotFound,
    #[error("the order was already {}", .0.as_str())]
    AlreadyDecided(OrderState),
    #[error("the order is held as exception {0}; resolve the exception first")]
    InException(u64),
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
}

/// An operator's resolution of an exception.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveAction {
    Accept,
    Reject,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ExceptionOpError {
    #[error("no such exception")]
    NotFound,
    #[error("the exception was already resolved ({})", .0.action.as_str())]
    AlreadyResolved(Resolution),
    /// The replay failed again; the exception stays open with these (committed) reasons.
    #[error("the order still fails the checks")]
    StillFailing(Box<ExceptionRecord>),
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
}

/// Whether central knows `sku` at all (any price, or ATP at `site`), to tell an unknown SKU from
/// one without a price for this customer.
fn sku_known(txn: &WriteTransaction, sku: &str, site: &str) -> Result<bool, ApplyError> {
    if txn.open_table(ATP)?.get((sku, site))?.is_some() {
        return Ok(true);
    }
    let prices = txn.open_table(PRICES)?;
    let first = prices.range((sku, "")..)?.next().transpose()?;
    Ok(first.is_some_and(|(k, _)| k.value().0 == sku))
}

pub(super) fn central_order(
    txn: &WriteTransaction,
    key: &str,
    req: &CentralOrderRequest,
    now_ms: i64,
) -> Outcome<CentralOrderOutcome, CentralOrderError> {
    let seen = {
        let t = txn.open_table(CENTRAL_IDEM)?;
        let v = t.get(key)?;
        v.map(|v| decode_w::<IdemRecord>("idempotency record", v.value()))
            .transpose()?
    };
    if let Some(idem) = seen {
        return Ok(if idem.request == *req {
            Ok(CentralOrderOutcome {
                order: idem.order,
                replayed: true,
            })
        } else {
            Err(CentralOrderError::KeyReused)
        });
    }
    let Some(customer) = get_customer(txn, &req.customer_id)? else {
        return Ok(Err(CentralOrderError::UnknownCustomer(
            req.customer_id.clone(),
        )));
    };
    if customer.on_hold {
        return Ok(Err(CentralOrderError::CreditHold(customer.id)));
    }
    let mut lines = Vec::with_capacity(req.lines.len());
    let mut per_sku: BTreeMap<&str, i64> = BTreeMap::new();
    let mut value: i64 = 0;
    for (sku, qty) in &req.lines {
        let Some(price) = effective_price(txn, sku, &req.customer_id)? else {
            let e = if sku_known(txn, sku, &req.site)? {
                CentralOrderError::NoPrice {
                    sku: sku.clone(),
                    customer: req.customer_id.clone(),
                }
            } else {
                CentralOrderError::UnknownSku(sku.clone())
            };
            return Ok(Err(e));
        };
        let overflow = || CentralOrderError::Invalid("the order's value overflows".into());
        let units = per_sku.entry(sku).or_insert(0);
        *units = match units.checked_add(*qty) {
            Some(u) => u,
            None => return Ok(Err(overflow())),
        };
        value = match qty
            .checked_mul(price.unit_price.units())
            .and_then(|v| v.checked_add(value))
        {
            Some(v) => v,
            None => return Ok(Err(overflow())),
        };
        lines.push(OrderLine {
            sku: sku.clone(),
            qty: *qty,
            unit_price: price.unit_price,
            currency: price.currency,
            promise: LinePromise::Confirmed,
        });
    }
    // Every pool is checked before any is written: all or nothing.
    let mut sold = Vec::new();
    for (sku, qty) in &per_sku {
        let key = LedgerKey::atp(sku, &req.site);
        let mut pool = get_pool(txn, &key)?.unwrap_or_default();
        if let Err(e) = pool.sell(*qty) {
            let free = match e {
                EscrowError::Insufficient { free, .. } => free,
                _ => pool.free(),
            };
            return Ok(Err(CentralOrderError::InsufficientAtp {
                sku: sku.to_string(),
                site: req.site.clone(),
                free: free.max(0),
                wanted: *qty,
            }));
        }
        sold.push((key, pool, *qty));
    }
    if value > 0 {
        let key = LedgerKey::credit(&req.customer_id);
        let mut pool = get_pool(txn, &key)?.unwrap_or_default();
        if pool.sell(value).is_err() {
            return Ok(Err(CentralOrderError::InsufficientCredit {
                customer: req.customer_id.clone(),
                free: pool.free().max(0),
                wanted: value,
            }));
        }
        sold.push((key, pool, value));
    }
    let mut n = next_id(txn, META_LAST_CENTRAL_ORDER)?;
    // A site may be called "central" and use the same ids; skip any taken.
    while get_order(txn, &format!("central-o{n}"))?.is_some() {
        n = next_id(txn, META_LAST_CENTRAL_ORDER)?;
    }
    let order_id = format!("central-o{n}");
    let mut consumed = Vec::with_capacity(sold.len());
    for (key, pool, qty) in sold {
        put_pool(txn, &key, &pool)?;
        consumed.push((key, qty));
    }
    let master_rev = meta_get(txn, META_REVISION)?;
    let order = Order {
        order_id: order_id.clone(),
        customer_id: req.customer_id.clone(),
        status: "confirmed".into(),
        lines: lines.clone(),
        master_rev,
        offline: false,
    };
    let rec = OrderRecord {
        order_id: order_id.clone(),
        site: req.site.clone(),
        channel: Channel::Central,
        customer_id: req.customer_id.clone(),
        state: OrderState::Uploaded,
        reason: None,
        promise_status: "confirmed".into(),
        offline: false,
        master_rev,
        lines,
        consumed,
        seq: n,
        exception_id: None,
        site_time_ms: now_ms,
        received_ms: now_ms,
        decided_ms: None,
    };
    put_order(txn, &rec)?;
    let env = EventEnvelope::new(&req.site, n, &order_id, now_ms, &EventBody::Order(order));
    append_feed(txn, &req.site, Channel::Central, &env)?;
    let idem = IdemRecord {
        request: req.clone(),
        order: rec.clone(),
    };
    txn.open_table(CENTRAL_IDEM)?
        .insert(key, encode(&idem).as_slice())?;
    Ok(Ok(CentralOrderOutcome {
        order: rec,
        replayed: false,
    }))
}

/// Moves an order's confirmed units out of transit: accepted into the ERP's books, or rejected
/// and free again. Returns the pools released (on rejection) for a top-up.
fn settle(
    txn: &WriteTransaction,
    order: &OrderRecord,
    accepted: bool,
) -> Result<BTreeSet<LedgerKey>, ApplyError> {
    let mut released = BTreeSet::new();
    for (key, qty) in &order.consumed {
        if let Some(mut pool) = get_pool(txn, key)? {
            pool.handle_erp_decision(*qty, accepted);
            put_pool(txn, key, &pool)?;
            if !accepted {
                released.insert(key.clone());
            }
        }
    }
    Ok(released)
}

/// Tells the order's site about the decision (central's own orders have no site record to
/// update).
fn notify_site(
    txn: &WriteTransaction,
    order: &OrderRecord,
    status: ErpStatus,
) -> Result<(), ApplyError> {
    if order.channel == Channel::Site {
        append_change(
            txn,
            &MasterChange::OrderStatus(OrderStatusUpdate {
                site: order.site.clone(),
                order_id: order.order_id.clone(),
                status,
                reason: order.reason.clone(),
            }),
        )?;
    }
    Ok(())
}

fn top_up_released(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    released: BTreeSet<LedgerKey>,
    now_ms: i64,
) -> Result<(), ApplyError> {
    if released.is_empty() {
        return Ok(());
    }
    let sites = eligible_sites(txn, opts, now_ms)?;
    run_policy(
        txn,
        opts,
        Scope::Pools(released),
        &sites,
        &BTreeSet::new(),
        now_ms,
    )?;
    Ok(())
}

pub(super) fn decide(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    order_id: &str,
    status: ErpStatus,
    reason: Option<String>,
    now_ms: i64,
) -> Outcome<OrderRecord, DecideError> {
    let Some(mut order) = get_order(txn, order_id)? else {
        return Ok(Err(DecideError::NotFound));
    };
    if order.state == OrderState::Exception {
        return Ok(Err(DecideError::InException(
            order.exception_id.unwrap_or(0),
        )));
    }
    if order.state.is_decided() {
        return Ok(Err(DecideError::AlreadyDecided(order.state)));
    }
    let released = match status {
        ErpStatus::Accepted => settle(txn, &order, true)?,
        ErpStatus::Rejected => settle(txn, &order, false)?,
        ErpStatus::NeedsReview => BTreeSet::new(),
    };
    order.state = match status {
        ErpStatus::Accepted => OrderState::Accepted,
        ErpStatus::Rejected => OrderState::Rejected,
        ErpStatus::NeedsReview => OrderState::NeedsReview,
    };
    order.reason = reason;
    order.decided_ms = Some(now_ms);
    put_order(txn, &order)?;
    notify_site(txn, &order, status)?;
    top_up_released(txn, opts, released, now_ms)?;
    Ok(Ok(order))
}

fn get_exception(txn: &WriteTransaction, id: u64) -> Result<Option<ExceptionRecord>, ApplyError> {
    let t = txn.open_table(EXCEPTIONS)?;
    let v = t.get(id)?;
    v.map(|v| decode_w("exception", v.value())).transpose()
}

fn put_exception(txn: &WriteTransaction, e: &ExceptionRecord) -> Result<(), ApplyError> {
    txn.open_table(EXCEPTIONS)?
        .insert(e.id, encode(e).as_slice())?;
    Ok(())
}

/// The open exception `id` and its order, or why it cannot be acted on.
fn open_exception(
    txn: &WriteTransaction,
    id: u64,
) -> Result<Result<(ExceptionRecord, OrderRecord), ExceptionOpError>, ApplyError> {
    let Some(exc) = get_exception(txn, id)? else {
        return Ok(Err(ExceptionOpError::NotFound));
    };
    if let Some(r) = &exc.resolution {
        return Ok(Err(ExceptionOpError::AlreadyResolved(r.clone())));
    }
    let order = get_order(txn, &exc.order.order_id)?.ok_or_else(|| ApplyError::MissingOrder {
        id,
        order_id: exc.order.order_id.clone(),
    })?;
    Ok(Ok((exc, order)))
}

pub(super) fn resolve(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    id: u64,
    action: ResolveAction,
    reason: Option<String>,
    now_ms: i64,
) -> Outcome<ExceptionRecord, ExceptionOpError> {
    let (mut exc, mut order) = match open_exception(txn, id)? {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let released = match action {
        ResolveAction::Accept => {
            append_feed(txn, &exc.site, Channel::Site, &exc.event)?;
            order.state = OrderState::Uploaded;
            order.reason = reason.clone();
            BTreeSet::new()
        }
        ResolveAction::Reject => {
            let released = settle(txn, &order, false)?;
            order.state = OrderState::Rejected;
            order.reason = reason.clone();
            order.decided_ms = Some(now_ms);
            notify_site(txn, &order, ErpStatus::Rejected)?;
            released
        }
    };
    put_order(txn, &order)?;
    exc.resolution = Some(Resolution {
        action: match action {
            ResolveAction::Accept => ResolutionAction::Accept,
            ResolveAction::Reject => ResolutionAction::Reject,
        },
        reason,
        at_ms: now_ms,
    });
    put_exception(txn, &exc)?;
    top_up_released(txn, opts, released, now_ms)?;
    Ok(Ok(exc))
}

pub(super) fn replay(
    txn: &WriteTransaction,
    id: u64,
    now_ms: i64,
) -> Outcome<ExceptionRecord, ExceptionOpError> {
    let (mut exc, mut order) = match open_exception(txn, id)? {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let (checked, customer_on_hold) = check_against_master(txn, &exc.order)?;
    let mut reasons = checked.reasons;
    // An overrun is a fact about the allowance, not about master data: no replay clears it; an
    // operator accepts or rejects such an order.
    if exc.reasons.contains(&Reason::AllowanceOverrun) {
        reasons.push(Reason::AllowanceOverrun);
    }
    exc.site_data.lines = checked.lines;
    exc.central_data = CentralData {
        revision: meta_get(txn, META_REVISION)?,
        customer_on_hold,
    };
    if !reasons.is_empty() {
        exc.reasons = reasons;
        put_exception(txn, &exc)?;
        return Ok(Err(ExceptionOpError::StillFailing(Box::new(exc))));
    }
    // The reasons it was held for stay on record.
    append_feed(txn, &exc.site, Channel::Site, &exc.event)?;
    order.state = OrderState::Uploaded;
    put_order(txn, &order)?;
    exc.resolution = Some(Resolution {
        action: ResolutionAction::Replayed,
        reason: None,
        at_ms: now_ms,
    });
    put_exception(txn, &exc)?;
    Ok(Ok(exc))
}
