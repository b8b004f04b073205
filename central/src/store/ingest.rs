//! Ingest of an uploaded batch inside the writer's transaction: each new event is classified on
//! its own (dead letter, business exception, feed, ledger), the high-water mark moves past all
//! of them, the session's reconciliation report is updated and the site is topped up. I/O side.

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocol::session::plan_ingest;
use outpost_protocol::{AllowanceReturn, EscrowError, EventBody, EventEnvelope, Order};
use redb::{ReadableTable, WriteTransaction};

use super::allowance::{Scope, current_report, put_report, run_policy};
use super::records::{
    AllowanceUse, CentralData, Channel, DeadLetter, ExceptionRecord, OpenReclaim, OrderRecord,
    OrderState, SiteData,
};
use super::{
    ApplyError, DEAD_LETTERS, EXCEPTIONS, IngestBatchError, IngestOutcome, META_LAST_DEAD_LETTER,
    META_LAST_EXCEPTION, META_REVISION, OPEN_RECLAIMS, Outcome, SITE_HWM, StoreOptions,
    append_feed, append_feed_run, decode_w, effective_price, encode, get_customer, get_order,
    get_pool, meta_get, meta_old_grants_through, next_id, put_order, put_pool, touch,
};
use crate::checks::{Reason, check_order};
use crate::ledger::{LedgerKey, order_consumption};

/// What happened to one uploaded order.
enum OrderFate {
    Feed,
    Exception,
    DeadLetter(String),
}

/// Per-batch counters for the reconciliation report.
#[derive(Default)]
struct Counts {
    dead_letters: u64,
    exceptions: u64,
    offline_confirmed: u64,
    offline_pending: u64,
    offline_partial: u64,
}

/// The event's trace id for a log line, or `"invalid"`: a peer's malformed value (it could be
/// megabytes long) is never copied into the log.
fn loggable_trace_id(env: &EventEnvelope) -> &str {
    if outpost_protocol::validate_trace_id(&env.trace_id).is_ok() {
        &env.trace_id
    } else {
        "invalid"
    }
}

/// The event id for a log line, or `"invalid"` for a peer's malformed value, like the trace id.
fn loggable_event_id(env: &EventEnvelope) -> &str {
    if outpost_protocol::validate_id("event_id", &env.event_id).is_ok() {
        &env.event_id
    } else {
        "invalid"
    }
}

pub(super) fn apply_ingest(
    txn: &WriteTransaction,
    opts: &StoreOptions,
    site: &str,
    events: &[EventEnvelope],
    now_ms: i64,
) -> Outcome<IngestOutcome, IngestBatchError> {
    let hwm = {
        let t = txn.open_table(SITE_HWM)?;
        t.get(site)?.map(|g| g.value()).unwrap_or(0)
    };
    let plan = match plan_ingest(site, hwm, events) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e.into())),
    };
    let fresh = &events[plan.duplicates..];
    // The revision the business checks ran against (grants written below come after it).
    let revision = meta_get(txn, META_REVISION)?;
    let mut touched = BTreeSet::new();
    let mut counts = Counts::default();
    // After a restore, the site re-sends (and may still send) orders confirmed from allowances
    // that the old incarnation of central granted and this one zeroed at the start of the
    // session in which the site came to it: every seq up to the site's last at that Hello. Their
    // units go in transit, but they do not consume what this incarnation granted since (the site
    // holds that in full). The mark is kept for the site, not the session: the session can end
    // before the re-upload does, and the next one names this incarnation already.
    let old_grants_through = meta_get(txn, &meta_old_grants_through(site))?;
    let ctx = OrderContext {
        revision,
        now_ms,
        old_grants_through,
    };
    // Consecutive milestones go to the feed together (one cursor update for the run); the run
    // is written before any other event, so feed order stays sequence order.
    let mut run: Vec<&EventEnvelope> = Vec::new();
    for env in fresh {
        let trace_id = loggable_trace_id(env);
        let body = env.decode();
        if !matches!(body, Ok(EventBody::Milestone(_))) {
            append_feed_run(txn, site, Channel::Site, &run)?;
            run.clear();
        }
        match body {
            Err(e) => {
                let why = e.to_string();
                tracing::info!(
                    trace_id,
                    site,
                    seq = env.seq,
                    event_id = %loggable_event_id(env),
                    reason = %why,
                    "event dead-lettered"
                );
                dead_letter(txn, site, env, why, now_ms)?;
                counts.dead_letters += 1;
            }
            Ok(EventBody::Milestone(_)) => {
                tracing::debug!(
                    trace_id,
                    site,
                    seq = env.seq,
                    event_id = %env.event_id,
                    "milestone ingested into the feed"
                );
                run.push(env);
            }
            Ok(EventBody::AllowanceReturn(r)) => {
                tracing::debug!(
                    trace_id,
                    site,
                    seq = env.seq,
                    event_id = %env.event_id,
                    "allowance return ingested"
                );
                // A return the site made to the incarnation of central it talked to before a
                // restore gave back allowance this incarnation zeroed at the session's start:
                // the site holds this incarnation's grants in full, so nothing shrinks.
                if env.seq <= ctx.old_grants_through {
                    tracing::info!(
                        site,
                        seq = env.seq,
                        "allowance return to the previous incarnation of central ignored"
                    );
                } else {
                    apply_return(txn, site, env.seq, &r, &mut touched)?;
                }
            }
            Ok(EventBody::Order(o)) => {
                match ingest_order(txn, site, env, &o, &ctx, &mut touched)? {
                    OrderFate::DeadLetter(why) => {
                        tracing::info!(
                            trace_id,
                            site,
                            seq = env.seq,
                            event_id = %env.event_id,
                            reason = %why,
                            "order dead-lettered"
                        );
                        dead_letter(txn, site, env, why, now_ms)?;
                        counts.dead_letters += 1;
                        continue;
                    }
                    OrderFate::Exception => {
                        tracing::info!(
                            trace_id,
                            site,
                            seq = env.seq,
                            event_id = %env.event_id,
                            "order ingested into the exception queue"
                        );
                        counts.exceptions += 1;
                    }
                    OrderFate::Feed => tracing::debug!(
                        trace_id,
                        site,
                        seq = env.seq,
                        event_id = %env.event_id,
                        "order ingested into the feed"
                    ),
                }
                if o.offline {
                    let confirmed = o.lines.iter().filter(|l| l.promise.is_confirmed()).count();
                    if confirmed == o.lines.len() {
                        counts.offline_confirmed += 1;
                    } else {
                        counts.offline_pending += 1;
                        if confirmed > 0 {
                            counts.offline_partial += 1;
                        }
                    }
                }
            }
        }
    }
    append_feed_run(txn, site, Channel::Site, &run)?;
    if !fresh.is_empty() {
        txn.open_table(SITE_HWM)?.insert(site, plan.new_hwm)?;
        touch(txn, site, now_ms)?;
    }
    if let Some(mut r) = current_report(txn, site)? {
        r.events_uploaded += fresh.len() as u64;
        r.reuploaded += fresh.iter().filter(|e| e.seq <= r.hello_acked_seq).count() as u64;
        r.duplicates_dropped += plan.duplicates as u64;
        r.dead_letters += counts.dead_letters;
        r.exceptions_business += counts.exceptions;
        r.orders_offline_confirmed += counts.offline_confirmed;
        r.orders_offline_pending += counts.offline_pending;
        r.orders_offline_partial += counts.offline_partial;
        if r.caught_up_ms.is_none() && plan.new_hwm >= r.hello_last_seq {
            r.caught_up_ms = Some(now_ms);
        }
        put_report(txn, &r)?;
    }
    if !touched.is_empty() {
        let sites = BTreeSet::from([site.to_string()]);
        run_policy(
            txn,
            opts,
            Scope::Pools(touched),
            &sites,
            &BTreeSet::new(),
            now_ms,
        )?;
    }
    Ok(Ok(IngestOutcome {
        duplicates: plan.duplicates,
        stored: fresh.len(),
        new_hwm: plan.new_hwm,
        dead_letters: counts.dead_letters as usize,
        exceptions: counts.exceptions as usize,
    }))
}

fn dead_letter(
    txn: &WriteTransaction,
    site: &str,
    env: &EventEnvelope,
    reason: String,
    now_ms: i64,
) -> Result<(), ApplyError> {
    let id = next_id(txn, META_LAST_DEAD_LETTER)?;
    tracing::warn!(site.id = %site, seq = env.seq, dead_letter = id, reason = %reason, "event dead-lettered");
    let d = DeadLetter {
        id,
        site: site.to_string(),
        seq: env.seq,
        event_id: env.event_id.clone(),
        reason,
        event: env.clone(),
        created_ms: now_ms,
    };
    txn.open_table(DEAD_LETTERS)?
        .insert(id, encode(&d).as_slice())?;
    Ok(())
}

/// The site gave up unused allowance (its answer to a reclaim): central's view of what it holds
/// shrinks by that much and the reclaim is closed.
fn apply_return(
    txn: &WriteTransaction,
    site: &str,
    seq: u64,
    r: &AllowanceReturn,
    touched: &mut BTreeSet<LedgerKey>,
) -> Result<(), ApplyError> {
    let key = LedgerKey::for_site(site, &r.pool);
    if let Some(mut pool) = get_pool(txn, &key)? {
        pool.handle_returned(site, r.qty);
        put_pool(txn, &key, &pool)?;
        touched.insert(key.clone());
    }
    let text = key.text();
    let mut t = txn.open_table(OPEN_RECLAIMS)?;
    let open = t
        .get((text.as_str(), site))?
        .map(|v| decode_w::<OpenReclaim>("reclaim", v.value()))
        .transpose()?;
    match open {
        Some(o) if o.reclaim_id == r.reclaim_id => {
            t.remove((text.as_str(), site))?;
            tracing::info!(site.id = %site, pool = %text, reclaim_id = r.reclaim_id, asked = o.qty, returned = r.qty, "reclaim answered");
        }
        _ => {
            tracing::warn!(site.id = %site, seq, pool = %text, reclaim_id = r.reclaim_id, "allowance returned for a reclaim that is not open");
        }
    }
    Ok(())
}

/// Checks an order against central's master data. The effective price per SKU for the order's
/// customer and the customer record are looked up here; the checks themselves are pure.
pub(super) fn check_against_master(
    txn: &WriteTransaction,
    order: &Order,
) -> Result<(crate::checks::Checked, Option<bool>), ApplyError> {
    let mut prices = BTreeMap::new();
    for l in &order.lines {
        if !prices.contains_key(&l.sku) {
            prices.insert(
                l.sku.clone(),
                effective_price(txn, &l.sku, &order.customer_id)?,
            );
        }
    }
    let customer = get_customer(txn, &order.customer_id)?;
    let checked = check_order(order, &prices, customer.as_ref());
    Ok((checked, customer.map(|c| c.on_hold)))
}

/// What every order of one uploaded batch is checked with.
struct OrderContext {
    /// The revision the business checks run against.
    revision: u64,
    now_ms: i64,
    /// Orders with a seq up to this were confirmed from an earlier incarnation's grants.
    old_grants_through: u64,
}

fn ingest_order(
    txn: &WriteTransaction,
    site: &str,
    env: &EventEnvelope,
    order: &Order,
    ctx: &OrderContext,
    touched: &mut BTreeSet<LedgerKey>,
) -> Result<OrderFate, ApplyError> {
    let (revision, now_ms) = (ctx.revision, ctx.now_ms);
    if let Some(existing) = get_order(txn, &order.order_id)? {
        return Ok(OrderFate::DeadLetter(format!(
            "order id {} is already taken by an order of {} ({} channel)",
            order.order_id,
            existing.site,
            existing.channel.as_str()
        )));
    }
    let consumed = match order_consumption(site, order) {
        Ok(c) => c,
        Err(why) => return Ok(OrderFate::DeadLetter(why)),
    };
    // The site promised its confirmed lines: they are counted whatever else is wrong.
    let mut uses = Vec::with_capacity(consumed.len());
    let mut overrun = false;
    for (key, qty) in &consumed {
        let mut pool = get_pool(txn, key)?.unwrap_or_default();
        let before = pool.outstanding(site);
        if env.seq <= ctx.old_grants_through {
            // Confirmed from a grant of an earlier incarnation, which this ledger no longer
            // counts as outstanding (the site dropped it too): only the units in transit move.
            pool.in_transit += *qty;
        } else if let Err(EscrowError::Overrun { .. }) = pool.handle_consumed(site, *qty) {
            overrun = true;
        }
        put_pool(txn, key, &pool)?;
        touched.insert(key.clone());
        uses.push(AllowanceUse {
            pool: key.clone(),
            consumed: *qty,
            outstanding_before: before,
        });
    }
    let (checked, customer_on_hold) = check_against_master(txn, order)?;
    let mut reasons = checked.reasons;
    if overrun {
        reasons.push(Reason::AllowanceOverrun);
    }
    let exception_id = if reasons.is_empty() {
        append_feed(txn, site, Channel::Site, env)?;
        None
    } else {
        let id = next_id(txn, META_LAST_EXCEPTION)?;
        tracing::info!(
            site.id = %site,
            order.id = %order.order_id,
            exception = id,
            reasons = ?reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            "order held as a business exception"
        );
        let exc = ExceptionRecord {
            id,
            site: site.to_string(),
            seq: env.seq,
            event_id: env.event_id.clone(),
            event: env.clone(),
            order: order.clone(),
            reasons,
            site_data: SiteData {
                master_rev: order.master_rev,
                lines: checked.lines,
                allowance: uses,
            },
            central_data: CentralData {
                revision,
                customer_on_hold,
            },
            created_ms: now_ms,
            resolution: None,
        };
        txn.open_table(EXCEPTIONS)?
            .insert(id, encode(&exc).as_slice())?;
        Some(id)
    };
    let rec = OrderRecord {
        order_id: order.order_id.clone(),
        site: site.to_string(),
        channel: Channel::Site,
        customer_id: order.customer_id.clone(),
        state: if exception_id.is_some() {
            OrderState::Exception
        } else {
            OrderState::Uploaded
        },
        reason: None,
        promise_status: order.status.clone(),
        offline: order.offline,
        master_rev: order.master_rev,
        lines: order.lines.clone(),
        consumed,
        seq: env.seq,
        exception_id,
        site_time_ms: env.at_ms,
        received_ms: now_ms,
        decided_ms: None,
    };
    put_order(txn, &rec)?;
    Ok(if exception_id.is_some() {
        OrderFate::Exception
    } else {
        OrderFate::Feed
    })
}
