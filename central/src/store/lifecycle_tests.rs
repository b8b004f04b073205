//! Store tests of issue 3's behaviour, through the public store API on a real redb file:
//! ingest classification (dead letters, business exceptions), the exception queue, central's own
//! channel against escrowed ATP, ERP decisions, allowance requests, reclaims and reconciliation
//! reports.

use outpost_protocol::{
    AllowanceReturn, AtpRecord, CustomerRecord, ErpStatus, EventBody, EventEnvelope, LinePromise,
    MasterChange, Milestone, MilestoneKind, Money, Order, OrderLine, Pool, PriceRecord,
};

use super::*;
use crate::checks::Reason;

const SITE: &str = "plant-1";

fn price(sku: &str, customer: Option<&str>, units: i64) -> MasterChange {
    MasterChange::Price(PriceRecord {
        sku: sku.into(),
        customer: customer.map(Into::into),
        unit_price: Money(units),
        currency: "EUR".into(),
    })
}

fn atp(sku: &str, site: &str, available: i64) -> MasterChange {
    MasterChange::Atp(AtpRecord {
        sku: sku.into(),
        site: site.into(),
        available,
    })
}

fn customer(id: &str, limit_units: i64, on_hold: bool) -> MasterChange {
    MasterChange::Customer(CustomerRecord {
        id: id.into(),
        name: format!("Customer {id}"),
        credit_limit: Money(limit_units),
        on_hold,
    })
}

/// C-ACME (credit 1000.00, own BOLT price 0.10), C-HOLD (credit 1000.00), list prices BOLT 0.12
/// and NUT 0.05, ATP 100 of each at plant-1. The push tops plant-1 up: 20 of each SKU and
/// 200.00 of each customer's credit.
async fn seed(store: &Store) {
    store
        .upsert_master(vec![
            customer("C-ACME", 10_000_000, false),
            customer("C-HOLD", 10_000_000, false),
            price("BOLT-M8", None, 1200),
            price("BOLT-M8", Some("C-ACME"), 1000),
            price("NUT-M8", None, 500),
            atp("BOLT-M8", SITE, 100),
            atp("NUT-M8", SITE, 100),
        ])
        .await
        .unwrap();
}

fn order(
    seq: u64,
    customer: &str,
    lines: &[(&str, i64, i64, LinePromise)],
    offline: bool,
) -> EventEnvelope {
    let confirmed = lines.iter().filter(|l| l.3.is_confirmed()).count();
    let status = if confirmed == lines.len() {
        "confirmed"
    } else if confirmed == 0 {
        "pending"
    } else {
        "partial"
    };
    let id = format!("{SITE}-o{seq}");
    EventEnvelope::new(
        SITE,
        seq,
        &id,
        1_767_225_600_000 + seq as i64,
        &EventBody::Order(Order {
            order_id: id.clone(),
            customer_id: customer.into(),
            status: status.into(),
            lines: lines
                .iter()
                .map(|(sku, qty, price, promise)| OrderLine {
                    sku: sku.to_string(),
                    qty: *qty,
                    unit_price: Money(*price),
                    currency: "EUR".into(),
                    promise: *promise,
                })
                .collect(),
            master_rev: 7,
            offline,
        }),
    )
}

fn milestone(seq: u64) -> EventEnvelope {
    EventEnvelope::new(
        SITE,
        seq,
        &format!("scan-{seq}"),
        1_767_225_600_000,
        &EventBody::Milestone(Milestone {
            shipment_id: "SH-1".into(),
            milestone: MilestoneKind::Packed,
            scanner_id: "scanner-1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        }),
    )
}

fn open_store(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("central.redb")).unwrap()
}

fn pool(store: &Store, key: &LedgerKey) -> CentralPool {
    store.pool(key).unwrap().expect("pool exists")
}

fn bolt() -> LedgerKey {
    LedgerKey::atp("BOLT-M8", SITE)
}

fn feed_ids(store: &Store) -> Vec<String> {
    store
        .events_after(0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.event.event_id)
        .collect()
}

const C: LinePromise = LinePromise::Confirmed;
const P: LinePromise = LinePromise::PendingAllowance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_mid_batch_is_dead_lettered_and_the_rest_applied() {
    // Goal: one malformed and one unknown-schema event in the middle of a batch never fail it:
    // both are dead-lettered with their reason, the events after them are applied, and the
    // high-water mark moves past all of them.
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    let mut malformed = order(3, "C-ACME", &[("BOLT-M8", 1, 1000, C)], false);
    malformed.body.truncate(3);
    let mut future = milestone(4);
    future.schema = 99;
    let batch = vec![
        milestone(1),
        order(2, "C-ACME", &[("BOLT-M8", 5, 1000, C)], false),
        malformed,
        future,
        order(5, "C-ACME", &[("BOLT-M8", 2, 1000, C)], false),
        milestone(6),
    ];
    let out = store.ingest(SITE, batch).await.unwrap();
    assert_eq!(
        (out.stored, out.new_hwm, out.dead_letters, out.exceptions),
        (6, 6, 2, 0)
    );
    assert_eq!(store.site_hwm(SITE).unwrap(), 6);
    assert_eq!(
        feed_ids(&store),
        vec!["scan-1", "plant-1-o2", "plant-1-o5", "scan-6"]
    );
    let dead = store.dead_letters(0, 100).unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!((dead[0].seq, dead[1].seq), (3, 4));
    assert!(dead[0].reason.contains("malformed"), "{}", dead[0].reason);
    assert!(
        dead[1].reason.contains("schema version 99"),
        "{}",
        dead[1].reason
    );
    // Both orders consumed their units; the site was topped up again after the batch.
    let p = pool(&store, &bolt());
    assert_eq!((p.in_transit, p.outstanding(SITE)), (7, 20));
    assert_eq!(
        store.order("plant-1-o5").unwrap().unwrap().state,
        OrderState::Uploaded
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_changes_and_holds_become_exceptions_with_the_sites_data() {
    // Goal: while the site was offline, central's price and the customer's hold changed; the
    // uploaded orders are held (not in the feed) with the prices, revision and allowance the site
    // used next to central's, and the order is counted in the ledger anyway.
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    store
        .upsert_master(vec![
            price("BOLT-M8", Some("C-ACME"), 900),
            customer("C-HOLD", 10_000_000, true),
        ])
        .await
        .unwrap();
    let batch = vec![
        order(1, "C-ACME", &[("BOLT-M8", 4, 1000, C)], true),
        order(2, "C-HOLD", &[("NUT-M8", 3, 500, C)], true),
        order(3, "C-ACME", &[("GADGET-1", 1, 100, P)], true),
        order(4, "C-ACME", &[("NUT-M8", 1, 500, C)], true),
    ];
    let out = store.ingest(SITE, batch).await.unwrap();
    assert_eq!(out.exceptions, 3);
    assert_eq!(feed_ids(&store), vec!["plant-1-o4"]);
    let open = store.exceptions(ExceptionFilter::Open, 0, 100).unwrap();
    let reasons: Vec<Vec<Reason>> = open.iter().map(|e| e.reasons.clone()).collect();
    assert_eq!(
        reasons,
        vec![
            vec![Reason::PriceChanged],
            vec![Reason::CreditHold],
            vec![Reason::UnknownSku]
        ]
    );
    let pc = &open[0];
    assert_eq!(pc.site_data.master_rev, 7);
    assert_eq!(pc.site_data.lines[0].site_unit_price, Money(1000));
    assert_eq!(pc.site_data.lines[0].central_unit_price, Some(Money(900)));
    assert_eq!(pc.site_data.allowance[0].pool, bolt());
    assert_eq!(pc.site_data.allowance[0].consumed, 4);
    assert_eq!(pc.site_data.allowance[0].outstanding_before, 20);
    assert_eq!(pc.central_data.customer_on_hold, Some(false));
    assert_eq!(open[1].central_data.customer_on_hold, Some(true));
    let o1 = store.order("plant-1-o1").unwrap().unwrap();
    assert_eq!(
        (o1.state, o1.exception_id),
        (OrderState::Exception, Some(1))
    );
    assert_eq!(pool(&store, &bolt()).in_transit, 4, "counted while held");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_and_replay_move_exceptions_out_of_the_queue() {
    // Goal: accept puts the order in the feed; reject releases its units and tells the site with
    // an OrderStatus change; replay fails (and stays open) until master data is fixed, then
    // passes into the feed; a resolved exception cannot be resolved again.
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    store
        .upsert_master(vec![
            price("BOLT-M8", Some("C-ACME"), 900),
            customer("C-HOLD", 10_000_000, true),
        ])
        .await
        .unwrap();
    let batch = vec![
        order(1, "C-ACME", &[("BOLT-M8", 4, 1000, C)], true),
        order(2, "C-HOLD", &[("NUT-M8", 3, 500, C)], true),
        order(3, "C-ACME", &[("GADGET-1", 1, 100, P)], true),
    ];
    store.ingest(SITE, batch).await.unwrap();

    // Reject the held customer's order: units back, site told.
    let nut = LedgerKey::atp("NUT-M8", SITE);
    let credit = LedgerKey::credit("C-HOLD");
    assert_eq!(pool(&store, &nut).in_transit, 3);
    assert_eq!(pool(&store, &credit).in_transit, 1500);
    let rev = store.revision().unwrap();
    let r = store
        .resolve_exception(2, ResolveAction::Reject, Some("customer on hold".into()))
        .await
        .unwrap();
    assert_eq!(
        r.resolution.as_ref().unwrap().action,
        ResolutionAction::Reject
    );
    assert_eq!(
        (
            pool(&store, &nut).in_transit,
            pool(&store, &credit).in_transit
        ),
        (0, 0)
    );
    let o2 = store.order("plant-1-o2").unwrap().unwrap();
    assert_eq!(o2.state, OrderState::Rejected);
    let pushed = store.changes_after(rev, 100).unwrap();
    assert!(
        pushed
            .iter()
            .any(|(_, c)| matches!(c, MasterChange::OrderStatus(s)
            if s.site == SITE && s.order_id == "plant-1-o2" && s.status == ErpStatus::Rejected
               && s.reason.as_deref() == Some("customer on hold"))),
        "{pushed:?}"
    );
    assert!(matches!(
        store
            .resolve_exception(2, ResolveAction::Accept, None)
            .await,
        Err(ExceptionOpError::AlreadyResolved(_))
    ));

    // Replay the price change: still failing, then fixed.
    match store.replay_exception(1).await {
        Err(ExceptionOpError::StillFailing(e)) => assert_eq!(e.reasons, vec![Reason::PriceChanged]),
        other => panic!("expected StillFailing, got {other:?}"),
    }
    assert!(store.exception(1).unwrap().unwrap().is_open());
    store
        .upsert_master(vec![price("BOLT-M8", Some("C-ACME"), 1000)])
        .await
        .unwrap();
    let e = store.replay_exception(1).await.unwrap();
    assert_eq!(e.resolution.unwrap().action, ResolutionAction::Replayed);
    assert_eq!(
        store.order("plant-1-o1").unwrap().unwrap().state,
        OrderState::Uploaded
    );

    // Accept the unknown SKU as is.
    store
        .resolve_exception(
            3,
            ResolveAction::Accept,
            Some("new SKU, ERP knows it".into()),
        )
        .await
        .unwrap();
    assert_eq!(feed_ids(&store), vec!["plant-1-o1", "plant-1-o3"]);
    assert!(
        store
            .exceptions(ExceptionFilter::Open, 0, 100)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .exceptions(ExceptionFilter::Resolved, 0, 100)
            .unwrap()
            .len(),
        3
    );
    assert!(matches!(
        store.replay_exception(99).await,
        Err(ExceptionOpError::NotFound)
    ));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirming_beyond_the_grant_is_an_overrun_exception() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    let out = store
        .ingest(
            SITE,
            vec![order(1, "C-ACME", &[("BOLT-M8", 25, 1000, C)], true)],
        )
        .await
        .unwrap();
    assert_eq!(out.exceptions, 1);
    let e = store.exception(1).unwrap().unwrap();
    assert_eq!(e.reasons, vec![Reason::AllowanceOverrun]);
    assert_eq!(e.site_data.allowance[0].outstanding_before, 20);
    let p = pool(&store, &bolt());
    assert_eq!(p.in_transit, 25, "an overrun is still counted");
    // No replay clears an overrun.
    assert!(matches!(
        store.replay_exception(1).await,
        Err(ExceptionOpError::StillFailing(_))
    ));
    store.close().await;
}

fn central_req(site: &str, lines: &[(&str, i64)]) -> CentralOrderRequest {
    CentralOrderRequest {
        customer_id: "C-ACME".into(),
        site: site.into(),
        lines: lines.iter().map(|(s, q)| (s.to_string(), *q)).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_sales_only_take_what_is_not_escrowed() {
    // Goal: ATP 30 at plant-1 with 20 escrowed there leaves 10 for central's channel: 15 is
    // refused (naming the SKU and the free 10) with nothing stored, 10 is sold, and the same key
    // gives the same order.
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    store
        .upsert_master(vec![atp("BOLT-M8", SITE, 30)])
        .await
        .unwrap();
    assert_eq!(pool(&store, &bolt()).free(), 10);
    match store
        .central_order("k1", central_req(SITE, &[("BOLT-M8", 15)]))
        .await
    {
        Err(CentralOrderError::InsufficientAtp {
            sku, free, wanted, ..
        }) => {
            assert_eq!((sku.as_str(), free, wanted), ("BOLT-M8", 10, 15))
        }
        other => panic!("expected InsufficientAtp, got {other:?}"),
    }
    // All or nothing: a fitting line does not go through when another does not.
    assert!(
        store
            .central_order("k1", central_req(SITE, &[("NUT-M8", 1), ("BOLT-M8", 11)]))
            .await
            .is_err()
    );
    assert_eq!(pool(&store, &LedgerKey::atp("NUT-M8", SITE)).in_transit, 0);
    let ok = store
        .central_order("k1", central_req(SITE, &[("BOLT-M8", 10)]))
        .await
        .unwrap();
    assert!(!ok.replayed);
    assert_eq!(ok.order.order_id, "central-o1");
    assert_eq!(ok.order.lines[0].unit_price, Money(1000), "customer price");
    let p = pool(&store, &bolt());
    assert_eq!((p.free(), p.in_transit, p.outstanding(SITE)), (0, 10, 20));
    assert_eq!(
        pool(&store, &LedgerKey::credit("C-ACME")).in_transit,
        10_000
    );
    let again = store
        .central_order("k1", central_req(SITE, &[("BOLT-M8", 10)]))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.order.order_id, "central-o1");
    assert!(matches!(
        store
            .central_order("k1", central_req(SITE, &[("BOLT-M8", 9)]))
            .await,
        Err(CentralOrderError::KeyReused)
    ));
    // An allowance request finds nothing free either.
    let a = store
        .allowance_request(SITE, Pool::atp("BOLT-M8"), 5)
        .await
        .unwrap();
    assert_eq!((a.granted, a.rev), (0, 0));
    assert!(a.reason.contains("only 0 free"), "{}", a.reason);
    let feed = store.events_after(0, 10).unwrap();
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0].channel, Channel::Central);
    assert_eq!(feed[0].site, SITE);
    assert!(matches!(
        store
            .central_order("k2", central_req(SITE, &[("NOPE-1", 1)]))
            .await,
        Err(CentralOrderError::UnknownSku(_))
    ));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erp_decisions_settle_units_once_and_reach_the_site() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    store
        .ingest(
            SITE,
            vec![
                order(1, "C-ACME", &[("BOLT-M8", 5, 1000, C)], false),
                order(2, "C-ACME", &[("BOLT-M8", 3, 1000, C)], false),
            ],
        )
        .await
        .unwrap();
    assert_eq!(pool(&store, &bolt()).in_transit, 8);
    let rev = store.revision().unwrap();
    let o = store
        .decide_order("plant-1-o1", ErpStatus::Accepted, None)
        .await
        .unwrap();
    assert_eq!(o.state, OrderState::Accepted);
    let p = pool(&store, &bolt());
    assert_eq!((p.in_transit, p.accepted_since_push), (3, 5));
    assert!(matches!(
        store
            .decide_order("plant-1-o1", ErpStatus::Rejected, None)
            .await,
        Err(DecideError::AlreadyDecided(OrderState::Accepted))
    ));
    store
        .decide_order(
            "plant-1-o2",
            ErpStatus::NeedsReview,
            Some("check terms".into()),
        )
        .await
        .unwrap();
    store
        .decide_order("plant-1-o2", ErpStatus::Rejected, Some("no stock".into()))
        .await
        .unwrap();
    let p = pool(&store, &bolt());
    assert_eq!((p.in_transit, p.accepted_since_push), (0, 5));
    let statuses: Vec<(String, ErpStatus)> = store
        .changes_after(rev, 100)
        .unwrap()
        .into_iter()
        .filter_map(|(_, c)| match c {
            MasterChange::OrderStatus(s) => Some((s.order_id, s.status)),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("plant-1-o1".into(), ErpStatus::Accepted),
            ("plant-1-o2".into(), ErpStatus::NeedsReview),
            ("plant-1-o2".into(), ErpStatus::Rejected)
        ]
    );
    assert!(matches!(
        store.decide_order("nope", ErpStatus::Accepted, None).await,
        Err(DecideError::NotFound)
    ));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowance_requests_grant_what_is_free_as_a_grant_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    let mut rev_rx = store.subscribe_revision();
    rev_rx.borrow_and_update();
    let a = store
        .allowance_request(SITE, Pool::atp("BOLT-M8"), 50)
        .await
        .unwrap();
    assert_eq!((a.granted, a.reason.as_str()), (50, ""));
    assert_eq!(a.rev, store.revision().unwrap());
    assert!(rev_rx.has_changed().unwrap(), "the revision watch fires");
    let (_, change) = store.changes_after(a.rev - 1, 1).unwrap().remove(0);
    assert_eq!(
        change,
        MasterChange::Grant(outpost_protocol::Grant {
            site: SITE.into(),
            pool: Pool::atp("BOLT-M8"),
            qty: 50
        })
    );
    // 100 - 20 (top-up) - 50 = 30 left: a request for 40 gets 30.
    let b = store
        .allowance_request(SITE, Pool::atp("BOLT-M8"), 40)
        .await
        .unwrap();
    assert_eq!(b.granted, 30);
    assert!(b.reason.contains("only 30"), "{}", b.reason);
    assert_eq!(pool(&store, &bolt()).free(), 0);
    // Refusals write nothing.
    let rev = store.revision().unwrap();
    for (p, q) in [
        (Pool::atp("BOLT-M8"), 1),
        (Pool::atp("UNKNOWN-1"), 1),
        (Pool::atp("BOLT-M8"), 0),
    ] {
        let r = store.allowance_request(SITE, p, q).await.unwrap();
        assert_eq!((r.granted, r.rev), (0, 0), "{}", r.reason);
        assert!(!r.reason.is_empty());
    }
    store
        .upsert_master(vec![customer("C-ACME", 10_000_000, true)])
        .await
        .unwrap();
    let held = store
        .allowance_request(SITE, Pool::credit("C-ACME"), 1)
        .await
        .unwrap();
    assert!(held.reason.contains("hold"), "{}", held.reason);
    assert!(
        store.revision().unwrap() > rev,
        "only the customer push wrote"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_atp_and_silence_send_reclaims_that_returns_close() {
    // Goal: a lower ERP figure asks for exactly the shortfall, once; the site's return closes the
    // reclaim; a site silent for too long is asked for everything.
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        reclaim_silent_secs: 60,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&dir.path().join("central.redb"), opts).unwrap();
    seed(&store).await;
    store
        .begin_session(SITE, super::HelloMarks::with_last_seq(0))
        .await
        .unwrap();
    let applied = store
        .upsert_master(vec![atp("BOLT-M8", SITE, 12)])
        .await
        .unwrap();
    assert_eq!((applied.grants, applied.reclaims), (0, 1));
    let entry = store
        .ledger(
            &LedgerFilter {
                key: Some(bolt()),
                site: None,
            },
            1,
        )
        .unwrap()
        .remove(0);
    assert_eq!(entry.pool.free(), -8);
    assert_eq!(entry.open_reclaims.get(SITE), Some(&8));
    let reclaim = store
        .changes_after(applied.revision - 1, 1)
        .unwrap()
        .remove(0)
        .1;
    let MasterChange::Reclaim(r) = reclaim else {
        panic!("expected a Reclaim, got {reclaim:?}");
    };
    assert_eq!((r.site.as_str(), r.qty), (SITE, 8));
    // Lower again: the open reclaim stays the only one for that site and pool.
    let again = store
        .upsert_master(vec![atp("BOLT-M8", SITE, 10)])
        .await
        .unwrap();
    assert_eq!(again.reclaims, 0);
    // The site returns 8 (it had not used them): outstanding 12, still 2 over: a new reclaim.
    let ret = EventEnvelope::new(
        SITE,
        1,
        "return-1",
        0,
        &EventBody::AllowanceReturn(AllowanceReturn {
            reclaim_id: r.reclaim_id,
            pool: Pool::atp("BOLT-M8"),
            qty: 8,
        }),
    );
    store.ingest(SITE, vec![ret]).await.unwrap();
    let entry = store
        .ledger(
            &LedgerFilter {
                key: Some(bolt()),
                site: None,
            },
            1,
        )
        .unwrap()
        .remove(0);
    assert_eq!(entry.pool.outstanding(SITE), 12);
    assert_eq!(entry.open_reclaims.get(SITE), Some(&2));
    assert!(feed_ids(&store).is_empty(), "returns are not in the feed");

    // Silence: two minutes later without contact, everything still held is asked back.
    let later = now_ms() + 120_000;
    let out = store.periodic(vec![], later).await.unwrap();
    assert!(out.reclaims >= 2, "{out:?}");
    let nut = store
        .ledger(
            &LedgerFilter {
                key: Some(LedgerKey::atp("NUT-M8", SITE)),
                site: None,
            },
            1,
        )
        .unwrap()
        .remove(0);
    assert_eq!(nut.open_reclaims.get(SITE), Some(&20));
    // A connected site is never silent.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Store::open_with(&dir2.path().join("central.redb"), opts).unwrap();
    seed(&store2).await;
    store2
        .begin_session(SITE, super::HelloMarks::with_last_seq(0))
        .await
        .unwrap();
    let out = store2.periodic(vec![SITE.into()], later).await.unwrap();
    assert_eq!(out.reclaims, 0);
    store.close().await;
    store2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_gets_a_reconciliation_report_with_its_counts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    let first = store
        .begin_session(SITE, super::HelloMarks::with_last_seq(5))
        .await
        .unwrap();
    assert_eq!((first.session, first.acked_seq), (1, 0));
    let mut bad = milestone(4);
    bad.body.clear();
    let batch = vec![
        order(1, "C-ACME", &[("BOLT-M8", 2, 1000, C)], true),
        order(
            2,
            "C-ACME",
            &[("BOLT-M8", 2, 1000, C), ("NUT-M8", 500, 500, P)],
            true,
        ),
        order(3, "C-ACME", &[("NUT-M8", 500, 500, P)], true),
    ];
    store.ingest(SITE, batch.clone()).await.unwrap();
    let r = store.reports(SITE, 10).unwrap().remove(0);
    assert_eq!(r.caught_up_ms, None, "3 of 5 uploaded");
    // A re-upload of 1..=3 plus the rest: 3 duplicates dropped, 2 new (one dead letter).
    let mut rest = batch;
    rest.push(bad);
    rest.push(order(5, "C-HOLD", &[("GADGET-9", 1, 1, P)], false));
    store.ingest(SITE, rest).await.unwrap();
    let r = store.reports(SITE, 10).unwrap().remove(0);
    assert_eq!(r.session, 1);
    assert_eq!(r.dark_since_ms, None, "first contact");
    assert_eq!((r.hello_last_seq, r.hwm_at_connect), (5, 0));
    assert_eq!((r.events_uploaded, r.duplicates_dropped), (5, 3));
    assert_eq!(
        (
            r.orders_offline_confirmed,
            r.orders_offline_pending,
            r.orders_offline_partial
        ),
        (1, 2, 1)
    );
    assert_eq!((r.exceptions_business, r.dead_letters), (1, 1));
    assert!(r.caught_up_ms.is_some_and(|c| c >= r.connected_ms));

    let second = store
        .begin_session(SITE, super::HelloMarks::with_last_seq(5))
        .await
        .unwrap();
    assert_eq!((second.session, second.acked_seq), (2, 5));
    let reports = store.reports(SITE, 10).unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0].session, 2, "newest first");
    assert!(reports[0].dark_since_ms.is_some());
    assert_eq!(reports[0].caught_up_ms, Some(reports[0].connected_ms));
    store.close().await;
}

/// Goal (regression): after a restore, orders the site confirmed from the old incarnation's
/// grants (re-sent from its retention, or taken before it saw the new incarnation) move their
/// units in transit without consuming what the new incarnation granted (the site holds that in
/// full) and are not overrun exceptions; an order confirmed after that Hello beyond the new grant
/// still is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_confirmed_under_an_earlier_incarnation_are_not_overruns() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    let hello = super::HelloMarks {
        last_seq: 2,
        acked_seq: 1,
        retained_from_seq: 1,
        central_incarnation: store.incarnation().unwrap() ^ 1,
        master_rev: 0,
    };
    let start = store.begin_session(SITE, hello).await.unwrap();
    assert!(start.incarnation_changed);
    // Zeroed and topped up afresh: 20 of BOLT, as the site now holds after the new grants.
    assert_eq!(pool(&store, &bolt()).outstanding(SITE), 20);
    let out = store
        .ingest(
            SITE,
            vec![
                order(1, "C-ACME", &[("BOLT-M8", 15, 1000, C)], true),
                order(2, "C-ACME", &[("BOLT-M8", 15, 1000, C)], true),
            ],
        )
        .await
        .unwrap();
    assert_eq!(out.exceptions, 0);
    let p = pool(&store, &bolt());
    assert_eq!((p.outstanding(SITE), p.in_transit), (20, 30));
    let out = store
        .ingest(
            SITE,
            vec![order(3, "C-ACME", &[("BOLT-M8", 25, 1000, C)], true)],
        )
        .await
        .unwrap();
    assert_eq!(
        out.exceptions, 1,
        "confirmed after the Hello beyond the new grant"
    );
    let e = store.exception(1).unwrap().unwrap();
    assert_eq!(
        (e.seq, e.reasons.clone()),
        (3, vec![Reason::AllowanceOverrun])
    );
    assert_eq!(e.site_data.allowance[0].outstanding_before, 20);
    assert_eq!(
        pool(&store, &bolt()).in_transit,
        55,
        "every unit is counted"
    );
    let r = &store.reports(SITE, 1).unwrap()[0];
    assert_eq!(r.reuploaded, 1);
    store.close().await;
}

/// Goal (regression): the session that saw the site change incarnation can end before the site
/// re-sent what it confirmed from the old incarnation's grants (a dropped link, central
/// restarting); re-sent in a later session (whose Hello names this incarnation), those orders
/// still move their units in transit only and do not consume the new grants, which the site
/// holds in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_grant_orders_resent_in_a_later_session_do_not_consume_new_grants() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    seed(&store).await;
    let own = store.incarnation().unwrap();
    let hello = super::HelloMarks {
        last_seq: 2,
        acked_seq: 1,
        retained_from_seq: 1,
        central_incarnation: own ^ 1,
        master_rev: 0,
    };
    let start = store.begin_session(SITE, hello).await.unwrap();
    assert!(start.incarnation_changed);
    assert_eq!(pool(&store, &bolt()).outstanding(SITE), 20);
    // The link drops before the re-upload; the next Hello names this incarnation.
    let again = super::HelloMarks {
        last_seq: 2,
        acked_seq: 0,
        retained_from_seq: 1,
        central_incarnation: own,
        master_rev: start.revision,
    };
    let next = store.begin_session(SITE, again).await.unwrap();
    assert!(!next.incarnation_changed);
    let out = store
        .ingest(
            SITE,
            vec![
                order(1, "C-ACME", &[("BOLT-M8", 15, 1000, C)], true),
                order(2, "C-ACME", &[("BOLT-M8", 15, 1000, C)], true),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        out.exceptions, 0,
        "confirmed from the old incarnation's grants"
    );
    let p = pool(&store, &bolt());
    assert_eq!((p.outstanding(SITE), p.in_transit), (20, 30));
    store.close().await;
}
