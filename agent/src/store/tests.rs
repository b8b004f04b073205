//! Unit tests of the store: idempotency, group commit, crash recovery, retention, master
//! batches and allowances, on temporary files.

use super::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::testutil::{catalogue, grants};
use outpost_protocol::{AtpRecord, OrderStatusUpdate, Reclaim};
use outpost_protocol::{
    CustomerRecord, ErpStatus, EventBody, LinePromise, MasterChange, MilestoneKind, Money, Pool,
};

const SITE: &str = "plant-1";

fn open(dir: &Path) -> (Store, StoreWriter) {
    Store::open(&dir.join("agent.redb"), SITE).unwrap()
}

fn order(customer: &str, lines: &[(&str, i64)]) -> NewOrder {
    NewOrder {
        customer_id: customer.into(),
        lines: lines
            .iter()
            .map(|(s, q)| NewLine {
                sku: s.to_string(),
                qty: *q,
            })
            .collect(),
    }
}

fn milestone(id: &str, kind: MilestoneKind) -> NewMilestone {
    NewMilestone {
        event_id: id.into(),
        shipment_id: "SH-1".into(),
        milestone: kind,
        scanner_id: "scanner-7".into(),
        at: "2026-11-26T10:00:00Z".into(),
    }
}

/// Goal: the same Idempotency-Key with the same body gives back the same order; with another
/// body it is refused and nothing is stored.
#[tokio::test]
async fn idempotent_order_creation() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    assert!(store.apply_master(catalogue(0, 3)).await.unwrap());

    let o = order("ACME", &[("GEAR-12T", 2)]);
    let first = store
        .create_order("k1", o.clone(), 1_000, false)
        .await
        .unwrap();
    assert!(first.is_created());
    let first = first.into_inner();
    assert_eq!(first.order.order_id, "plant-1-o1");
    assert_eq!(first.order.lines[0].unit_price, Money::parse("11").unwrap());
    let again = store
        .create_order("k1", o.clone(), 2_000, false)
        .await
        .unwrap();
    assert_eq!(again, Outcome::Existing(first.clone()));

    let other = order("ACME", &[("GEAR-12T", 3)]);
    assert_eq!(
        store.create_order("k1", other, 3_000, false).await,
        Err(WriteError::IdempotencyKeyReused)
    );
    let m = store.marks().unwrap();
    assert_eq!((m.last_seq, m.outbox_depth()), (1, 1));
    assert_eq!(store.outbox_rows().unwrap(), 1);
    let (rec, synced) = store.order("plant-1-o1").unwrap().unwrap();
    assert_eq!(rec, first);
    assert!(!synced);
    let events = store.outbox_range(1..=1).unwrap();
    assert_eq!(events[0].event_id, "plant-1-o1");
    assert_eq!(events[0].at_ms, 1_000);
    writer.shutdown().await;
}

/// Goal: every refusal stores nothing: unknown customer, unknown SKU, SKU without a price
/// for this customer, bad shapes.
#[tokio::test]
async fn refused_orders_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    store.apply_master(catalogue(0, 3)).await.unwrap();
    let cases = [
        (order("NOBODY", &[("GEAR-12T", 1)]), "unknown customer"),
        (order("ACME", &[("NOPE", 1)]), "unknown SKU"),
        (order("ACME", &[("SPECIAL", 1)]), "no list price"),
        (order("ACME", &[("GEAR-12T", 0)]), "qty"),
        (order("ACME", &[]), "lines"),
        (order("bad id!", &[("GEAR-12T", 1)]), "customer_id"),
    ];
    for (i, (o, needle)) in cases.into_iter().enumerate() {
        let err = store
            .create_order(&format!("k{i}"), o, 1, false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(matches!(
        store
            .create_order("x", order("ACME", &[("NOPE", 1)]), 1, false)
            .await,
        Err(WriteError::UnknownSku(_))
    ));
    assert!(matches!(
        store
            .create_order("y", order("ACME", &[("SPECIAL", 1)]), 1, false)
            .await,
        Err(WriteError::NoPrice { .. })
    ));
    assert_eq!(store.marks().unwrap().last_seq, 0);
    assert_eq!(store.outbox_rows().unwrap(), 0);
    // A refused key is not consumed: it can be used for a valid order afterwards.
    let ok = store
        .create_order("k0", order("ACME", &[("GEAR-12T", 1)]), 1, false)
        .await
        .unwrap();
    assert!(ok.is_created());
    writer.shutdown().await;
}

/// Goal: a milestone event id is recorded once; the same body again returns the original,
/// another body under the same id is refused.
#[tokio::test]
async fn milestone_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let m = milestone("evt-1", MilestoneKind::Loaded);
    let first = store.record_milestone(m.clone(), 5).await.unwrap();
    assert!(first.is_created());
    let again = store.record_milestone(m.clone(), 6).await.unwrap();
    assert_eq!(again, Outcome::Existing(first.clone().into_inner()));
    let changed = milestone("evt-1", MilestoneKind::Departed);
    assert_eq!(
        store.record_milestone(changed, 7).await,
        Err(WriteError::EventIdReused("evt-1".into()))
    );
    let mut bad_time = milestone("evt-2", MilestoneKind::Picked);
    bad_time.at = "yesterday".into();
    assert!(matches!(
        store.record_milestone(bad_time, 8).await,
        Err(WriteError::Validation(_))
    ));
    let reserved = milestone("plant-1-o9", MilestoneKind::Picked);
    assert!(matches!(
        store.record_milestone(reserved, 8).await,
        Err(WriteError::Validation(_))
    ));
    assert_eq!(store.marks().unwrap().last_seq, 1);
    let ev = store.outbox_range(1..=1).unwrap();
    assert!(
        matches!(ev[0].decode(), Ok(EventBody::Milestone(x)) if x.milestone == MilestoneKind::Loaded)
    );
    writer.shutdown().await;
}

/// Goal: a master batch is applied together with its revision; a stale batch changes
/// nothing; a batch with a gap or an invalid change is refused whole.
#[tokio::test]
async fn master_batches_apply_with_their_revision_and_stale_ones_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    assert!(store.apply_master(catalogue(0, 6)).await.unwrap());
    assert_eq!(store.marks().unwrap().master_rev, 6);
    assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 6)));
    let p = store.price("GEAR-12T", Some("ACME")).unwrap().unwrap();
    assert_eq!(p.unit_price.to_string(), "11.00");
    let p = store.price("GEAR-12T", Some("GLOBEX")).unwrap().unwrap();
    assert_eq!(p.unit_price.to_string(), "12.50");
    assert_eq!(
        store
            .price("GEAR-12T", None)
            .unwrap()
            .unwrap()
            .unit_price
            .to_string(),
        "12.50"
    );
    assert_eq!(store.price("SPECIAL", None).unwrap(), None);
    assert_eq!(store.customer("ACME").unwrap().unwrap().name, "Acme Corp");

    // Stale: through_rev <= applied revision.
    let mut stale = catalogue(2, 6);
    if let MasterChange::Atp(a) = &mut stale.changes[3] {
        a.available = 1;
    }
    assert!(!store.apply_master(stale).await.unwrap());
    assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 6)));

    // A gap (from_rev beyond the applied revision) is refused and changes nothing.
    let gap = MasterBatch {
        from_rev: 8,
        through_rev: 9,
        changes: vec![],
    };
    assert!(matches!(
        store.apply_master(gap).await,
        Err(WriteError::BadMasterBatch(_))
    ));
    // One invalid change refuses the whole batch.
    let mut bad = catalogue(6, 12);
    if let MasterChange::Atp(a) = &mut bad.changes[3] {
        a.available = 2;
    }
    bad.changes.push(MasterChange::Atp(AtpRecord {
        sku: "".into(),
        site: SITE.into(),
        available: 1,
    }));
    assert!(store.apply_master(bad).await.is_err());
    assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 6)));
    assert_eq!(store.marks().unwrap().master_rev, 6);

    // An empty batch (changes for other sites filtered out) still moves the revision.
    let empty = MasterBatch {
        from_rev: 6,
        through_rev: 10,
        changes: vec![],
    };
    assert!(store.apply_master(empty).await.unwrap());
    assert_eq!(store.marks().unwrap().master_rev, 10);
    writer.shutdown().await;
}

/// Goal: an ack deletes exactly the acknowledged outbox rows past their retention (here all
/// of them: stored at 1 ms after the epoch, far beyond the default week), keeps the order
/// records (now marked synced), never moves back, and an ack beyond the last seq is refused.
#[tokio::test]
async fn ack_deletes_outbox_rows_and_depth_drops() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    store.apply_master(catalogue(0, 1)).await.unwrap();
    for i in 0..5 {
        store
            .create_order(
                &format!("k{i}"),
                order("ACME", &[("GEAR-12T", 1)]),
                1,
                false,
            )
            .await
            .unwrap();
    }
    assert_eq!(store.marks().unwrap().outbox_depth(), 5);
    assert_eq!(store.mark_acked(3).await.unwrap(), 3);
    let m = store.marks().unwrap();
    assert_eq!((m.acked_seq, m.outbox_depth()), (3, 2));
    assert_eq!(store.outbox_rows().unwrap(), 2);
    assert_eq!(store.outbox_range(4..=5).unwrap().len(), 2);
    assert!(store.outbox_range(3..=4).is_err(), "acked rows are gone");
    assert!(store.order("plant-1-o1").unwrap().unwrap().1, "synced");
    assert!(!store.order("plant-1-o4").unwrap().unwrap().1);
    assert_eq!(store.mark_acked(2).await.unwrap(), 3, "never goes back");
    assert!(matches!(
        store.mark_acked(9).await,
        Err(WriteError::AckBeyondLast { .. })
    ));
    writer.shutdown().await;
}

/// Goal: everything committed survives closing and reopening the store.
#[tokio::test]
async fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, writer) = open(dir.path());
        store.apply_master(catalogue(0, 4)).await.unwrap();
        store
            .create_order("k", order("ACME", &[("GEAR-12T", 1)]), 1, false)
            .await
            .unwrap();
        store
            .record_milestone(milestone("e1", MilestoneKind::Picked), 2)
            .await
            .unwrap();
        store.mark_acked(1).await.unwrap();
        drop(store);
        writer.shutdown().await;
    }
    let (store, writer) = open(dir.path());
    assert_eq!(
        store.marks().unwrap(),
        Marks {
            master_rev: 4,
            last_seq: 2,
            acked_seq: 1,
            // Row 1, stored at 1 ms after the epoch, was past the age bound at its ack.
            retained_from_seq: 2,
            central_incarnation: 0,
        }
    );
    assert_eq!(store.outbox_rows().unwrap(), 1);
    assert_eq!(store.atp("GEAR-12T").unwrap(), Some((40, 4)));
    assert!(store.order("plant-1-o1").unwrap().is_some());
    // The idempotency and milestone records survived too.
    let again = store
        .create_order("k", order("ACME", &[("GEAR-12T", 1)]), 9, false)
        .await
        .unwrap();
    assert!(!again.is_created());
    let m = store
        .record_milestone(milestone("e1", MilestoneKind::Picked), 9)
        .await
        .unwrap();
    assert!(!m.is_created());
    // Sequence numbers continue after the reopen.
    let next = store
        .create_order("k2", order("ACME", &[("GEAR-12T", 1)]), 9, false)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.seq, 3);
    writer.shutdown().await;
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, writer) = open(dir.path());
    assert!(matches!(
        Store::open(&dir.path().join("agent.redb"), SITE),
        Err(OpenStoreError::AlreadyOpen { .. })
    ));
    writer.shutdown().await;
}

/// Goal: group commit. Many concurrent writers from several tasks all succeed, get distinct
/// sequence numbers, and the writer needs fewer transactions than operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_grouped_into_fewer_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    store.apply_master(catalogue(0, 1)).await.unwrap();
    let commits_before = store.stats().commits.load(Ordering::Relaxed);
    const TASKS: usize = 8;
    const PER_TASK: usize = 50;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let store = store.clone();
        set.spawn(async move {
            let mut inner = tokio::task::JoinSet::new();
            for i in 0..PER_TASK {
                let store = store.clone();
                inner.spawn(async move {
                    if i % 2 == 0 {
                        store
                            .create_order(
                                &format!("t{t}-{i}"),
                                order("ACME", &[("GEAR-12T", 1)]),
                                1,
                                false,
                            )
                            .await
                            .map(|o| o.into_inner().seq)
                    } else {
                        store
                            .record_milestone(
                                milestone(&format!("t{t}-e{i}"), MilestoneKind::Packed),
                                1,
                            )
                            .await
                            .map(|m| m.into_inner().seq)
                    }
                });
            }
            let mut seqs = Vec::new();
            while let Some(r) = inner.join_next().await {
                seqs.push(r.unwrap().unwrap());
            }
            seqs
        });
    }
    let mut seqs = Vec::new();
    while let Some(r) = set.join_next().await {
        seqs.extend(r.unwrap());
    }
    seqs.sort_unstable();
    let total = (TASKS * PER_TASK) as u64;
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "distinct, gap-free seqs"
    );
    let commits = store.stats().commits.load(Ordering::Relaxed) - commits_before;
    assert!(
        commits < total,
        "{commits} commits for {total} operations: no grouping happened"
    );
    assert_eq!(store.marks().unwrap().last_seq, total);
    writer.shutdown().await;
}

/// A file backend whose writes and syncs fail while `fail` is set, like a disk that fills
/// up or goes away. Locking is left unsupported (redb then uses exclusive-writer mode).
#[derive(Debug)]
struct FlakyBackend {
    inner: redb::backends::FileBackend,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyBackend {
    fn check(&self) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            Err(std::io::Error::other("injected I/O failure"))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FlakyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

/// Goal: a failed commit answers every operation of its group with `Unavailable` (no 2xx
/// for anything not durable), the writer reopens the database, and once the disk works
/// again writes resume with nothing lost and nothing half-written.
/// Method: a backend that fails writes on demand.
#[tokio::test]
async fn failed_commit_is_unavailable_then_the_writer_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, f) = (path.clone(), fail.clone());
    let opener: Opener = Box::new(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| OpenStoreError::CreateDir {
                path: p.clone(),
                source: e,
            })?;
        let backend = FlakyBackend {
            inner: redb::backends::FileBackend::new(file).map_err(|e| OpenStoreError::Open {
                path: p.clone(),
                source: e.into(),
            })?,
            fail: f.clone(),
        };
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| OpenStoreError::Open {
                path: p.clone(),
                source: e.into(),
            })?;
        prepare_db(db, &p)
    });
    let (store, writer) = Store::open_with(SITE, Retention::default(), opener).unwrap();
    let first = store
        .record_milestone(milestone("ok-1", MilestoneKind::Picked), 1)
        .await
        .unwrap();
    assert!(first.is_created());

    fail.store(true, Ordering::SeqCst);
    let failing = store
        .record_milestone(milestone("lost", MilestoneKind::Picked), 2)
        .await;
    assert!(
        matches!(failing, Err(WriteError::Unavailable(_))),
        "{failing:?}"
    );
    assert!(store.stats().failed_groups.load(Ordering::Relaxed) >= 1);
    fail.store(false, Ordering::SeqCst);

    // The writer recovers by itself: the next write succeeds and continues the sequence.
    let mut next = None;
    for _ in 0..50 {
        match store
            .record_milestone(milestone("ok-2", MilestoneKind::Packed), 3)
            .await
        {
            Ok(o) => {
                next = Some(o.into_inner());
                break;
            }
            Err(WriteError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let next = next.expect("writes resume after the disk recovers");
    assert_eq!(next.seq, 2, "the failed write left no trace");
    assert!(store.stats().reopens.load(Ordering::Relaxed) >= 1);
    assert_eq!(store.marks().unwrap().last_seq, 2);
    // The failed milestone can be submitted again: nothing of it was stored.
    let retry = store
        .record_milestone(milestone("lost", MilestoneKind::Picked), 4)
        .await
        .unwrap();
    assert!(retry.is_created());
    drop(store);
    writer.shutdown().await;

    // And everything acknowledged is on disk, through a plain reopen.
    let (store, writer) = open(dir.path());
    assert_eq!(store.marks().unwrap().last_seq, 3);
    assert_eq!(store.outbox_rows().unwrap(), 3);
    writer.shutdown().await;
}

fn decoded(store: &Store, seq: u64) -> EventBody {
    store.outbox_range(seq..=seq).unwrap()[0].decode().unwrap()
}

fn promises(r: &OrderRecord) -> Vec<LinePromise> {
    r.order.lines.iter().map(|l| l.promise).collect()
}

/// Goal: a site cut off with an ATP allowance of A confirms exactly A units over several
/// orders and captures the rest as pending allowance, per line, with reasons; the allowance
/// and the uploaded event agree with the response.
#[tokio::test]
async fn capture_confirms_exactly_up_to_the_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    store.apply_master(catalogue(0, 5)).await.unwrap();
    let a = 7;
    let allowance = [
        (Pool::atp("GEAR-12T"), a),
        (Pool::credit("ACME"), 100_000_000),
    ];
    store.apply_master(grants(5, 6, &allowance)).await.unwrap();
    let mut confirmed = 0;
    let mut pending = 0;
    for i in 0..5 {
        let o = order("ACME", &[("GEAR-12T", 2), ("GEAR-12T", 1)]);
        let r = store
            .create_order(&format!("k{i}"), o, 1, true)
            .await
            .unwrap()
            .into_inner();
        for (l, reason) in r.order.lines.iter().zip(&r.reasons) {
            match l.promise {
                LinePromise::Confirmed => confirmed += l.qty,
                LinePromise::PendingAllowance => {
                    assert!(reason.contains("allowance of GEAR-12T"), "{reason}");
                    pending += l.qty;
                }
                p => panic!("unexpected {p:?}"),
            }
        }
        assert!(r.order.offline);
        assert_eq!(r.order.master_rev, 6);
        let EventBody::Order(sent) = decoded(&store, r.seq) else {
            panic!("order event expected")
        };
        assert_eq!(sent, r.order, "the uploaded order is the one answered");
    }
    assert_eq!((confirmed, pending), (a, 15 - a));
    assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 0);
    // Orders 1-2 fit (6 units), order 3 gets its 2-unit line pending and its 1-unit line
    // confirmed (the 7th unit), orders 4-5 are entirely pending.
    let statuses: Vec<String> = (1..=5)
        .map(|s| {
            store
                .order(&format!("plant-1-o{s}"))
                .unwrap()
                .unwrap()
                .0
                .order
                .status
        })
        .collect();
    assert_eq!(
        statuses,
        ["confirmed", "confirmed", "partial", "pending", "pending"]
    );
    writer.shutdown().await;
}

/// Goal: the credit allowance bounds the value confirmed; a customer on hold gets every line
/// pending_hold; in both cases no allowance is consumed.
#[tokio::test]
async fn credit_allowance_and_credit_hold_bound_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    store.apply_master(catalogue(0, 5)).await.unwrap();
    // 30.00 of credit: two gears at 11.00 fit, three do not.
    let allowance = [
        (Pool::atp("GEAR-12T"), 100),
        (Pool::credit("ACME"), 300_000),
    ];
    store.apply_master(grants(5, 6, &allowance)).await.unwrap();
    let r = store
        .create_order("c1", order("ACME", &[("GEAR-12T", 3)]), 1, false)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promises(&r), [LinePromise::PendingCredit]);
    assert!(r.reasons[0].contains("worth 33.00"), "{}", r.reasons[0]);
    assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 100);
    let r = store
        .create_order("c2", order("ACME", &[("GEAR-12T", 2)]), 1, false)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promises(&r), [LinePromise::Confirmed]);
    assert_eq!(store.allowance(&Pool::credit("ACME")).unwrap(), 80_000);
    assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 98);

    let hold = MasterBatch {
        from_rev: 6,
        through_rev: 7,
        changes: vec![MasterChange::Customer(CustomerRecord {
            id: "ACME".into(),
            name: "Acme Corp".into(),
            credit_limit: Money::parse("50000").unwrap(),
            on_hold: true,
        })],
    };
    store.apply_master(hold).await.unwrap();
    let r = store
        .create_order(
            "c3",
            order("ACME", &[("GEAR-12T", 1), ("GEAR-12T", 1)]),
            1,
            false,
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promises(&r), [LinePromise::PendingHold; 2]);
    assert_eq!(r.order.status, "pending");
    assert!(r.reasons.iter().all(|x| x.contains("credit hold")));
    assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 98);
    assert_eq!(store.allowance(&Pool::credit("ACME")).unwrap(), 80_000);
    writer.shutdown().await;
}

/// Goal: a replayed Idempotency-Key returns the original order, promises included, and
/// consumes nothing more, even after new allowance arrived; two copies of one request in the
/// same group consume once.
#[tokio::test]
async fn replayed_keys_consume_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    store.apply_master(catalogue(0, 5)).await.unwrap();
    let allowance = [
        (Pool::atp("GEAR-12T"), 3),
        (Pool::credit("ACME"), 100_000_000),
    ];
    store.apply_master(grants(5, 6, &allowance)).await.unwrap();
    let o = order("ACME", &[("GEAR-12T", 2), ("GEAR-12T", 2)]);
    let first = store.create_order("k", o.clone(), 1, true).await.unwrap();
    assert!(first.is_created());
    let first = first.into_inner();
    assert_eq!(
        promises(&first),
        [LinePromise::Confirmed, LinePromise::PendingAllowance]
    );
    assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 1);
    store
        .apply_master(grants(6, 7, &[(Pool::atp("GEAR-12T"), 10)]))
        .await
        .unwrap();
    let again = store.create_order("k", o.clone(), 2, false).await.unwrap();
    assert_eq!(again, Outcome::Existing(first));
    assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 11);
    assert_eq!(store.marks().unwrap().last_seq, 1);

    // The same new request twice, concurrently: one order, one consumption.
    let (a, b) = tokio::join!(
        store.create_order("k2", order("ACME", &[("GEAR-12T", 4)]), 3, false),
        store.create_order("k2", order("ACME", &[("GEAR-12T", 4)]), 3, false)
    );
    assert_eq!(a.unwrap().into_inner(), b.unwrap().into_inner());
    assert_eq!(store.allowance(&Pool::atp("GEAR-12T")).unwrap(), 7);
    assert_eq!(store.marks().unwrap().last_seq, 2);
    writer.shutdown().await;
}

/// Goal: grants and reclaims are applied with their revision; a reclaim returns exactly
/// min(asked, remaining) and answers with an AllowanceReturn event in the same transaction;
/// a repeated (stale) batch applies nothing twice, an overlapping one is refused.
#[tokio::test]
async fn grants_and_reclaims_apply_with_their_revision() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let mut rev = store.master_rev_watch();
    let gear = Pool::atp("GEAR-12T");
    let g = grants(0, 3, &[(gear.clone(), 5), (gear.clone(), 4)]);
    assert!(
        store
            .apply_master_at(g.clone(), 1_700_000_000_000)
            .await
            .unwrap()
    );
    assert_eq!(store.allowance(&gear).unwrap(), 9);
    assert_eq!(*rev.borrow_and_update(), 3, "the revision is published");
    assert_eq!(store.as_of_ms().unwrap(), Some(1_700_000_000_000));
    // The same batch again is stale: nothing is granted twice.
    assert!(!store.apply_master(g).await.unwrap());
    assert_eq!(store.allowance(&gear).unwrap(), 9);
    // A batch overlapping the applied revision is refused whole.
    let overlap = grants(2, 4, &[(gear.clone(), 1)]);
    assert!(matches!(
        store.apply_master(overlap).await,
        Err(WriteError::BadMasterBatch(_))
    ));
    // Another site's grant is not ours.
    let mut other = grants(3, 4, &[(gear.clone(), 100)]);
    if let MasterChange::Grant(g) = &mut other.changes[0] {
        g.site = "plant-2".into();
    }
    store.apply_master(other).await.unwrap();
    assert_eq!(store.allowance(&gear).unwrap(), 9);

    let reclaim = |id: u64, pool: &Pool, qty: i64| {
        MasterChange::Reclaim(Reclaim {
            reclaim_id: id,
            site: SITE.into(),
            pool: pool.clone(),
            qty,
        })
    };
    let credit = Pool::credit("NOBODY");
    let batch = MasterBatch {
        from_rev: 4,
        through_rev: 6,
        changes: vec![
            reclaim(17, &gear, 6),
            reclaim(18, &gear, 6),
            reclaim(19, &credit, 1),
        ],
    };
    assert!(store.apply_master(batch.clone()).await.unwrap());
    assert_eq!(store.allowance(&gear).unwrap(), 0);
    assert_eq!(
        store.marks().unwrap(),
        Marks {
            master_rev: 6,
            last_seq: 3,
            acked_seq: 0,
            retained_from_seq: 1,
            central_incarnation: 0,
        }
    );
    let returned: Vec<(u64, i64)> = (1..=3)
        .map(|seq| {
            let env = &store.outbox_range(seq..=seq).unwrap()[0];
            let EventBody::AllowanceReturn(r) = env.decode().unwrap() else {
                panic!("allowance return expected")
            };
            assert_eq!(env.event_id, format!("plant-1-r{}", r.reclaim_id));
            (r.reclaim_id, r.qty)
        })
        .collect();
    assert_eq!(
        returned,
        [(17, 6), (18, 3), (19, 0)],
        "min(asked, remaining)"
    );
    // Replayed: no second answer.
    assert!(!store.apply_master(batch).await.unwrap());
    assert_eq!(store.marks().unwrap().last_seq, 3);
    writer.shutdown().await;
}

/// Goal: the ERP's decision reaches the order record; a decision about an order this site
/// does not have is skipped without failing the batch; a grant that would overflow refuses
/// the batch whole.
#[tokio::test]
async fn order_status_updates_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    store.apply_master(catalogue(0, 5)).await.unwrap();
    let r = store
        .create_order("k", order("ACME", &[("GEAR-12T", 1)]), 1, false)
        .await
        .unwrap()
        .into_inner();
    let status = |id: &str, st: ErpStatus, reason: Option<&str>| {
        MasterChange::OrderStatus(OrderStatusUpdate {
            site: SITE.into(),
            order_id: id.into(),
            status: st,
            reason: reason.map(Into::into),
        })
    };
    let batch = MasterBatch {
        from_rev: 5,
        through_rev: 7,
        changes: vec![
            status("central-o1", ErpStatus::Accepted, None),
            status(
                &r.order.order_id,
                ErpStatus::Rejected,
                Some("no stock at the DC"),
            ),
        ],
    };
    assert!(store.apply_master(batch).await.unwrap());
    let (got, _) = store.order(&r.order.order_id).unwrap().unwrap();
    assert_eq!(got.erp_status, Some(ErpStatus::Rejected));
    assert_eq!(got.erp_reason.as_deref(), Some("no stock at the DC"));
    assert_eq!(got.order, r.order, "the promise itself is unchanged");
    assert_eq!(store.marks().unwrap().master_rev, 7);

    let gear = Pool::atp("GEAR-12T");
    store
        .apply_master(grants(7, 8, &[(gear.clone(), i64::MAX)]))
        .await
        .unwrap();
    assert!(matches!(
        store.apply_master(grants(8, 9, &[(gear.clone(), 1)])).await,
        Err(WriteError::BadMasterBatch(_))
    ));
    assert_eq!(store.allowance(&gear).unwrap(), i64::MAX);
    writer.shutdown().await;
}

fn open_retaining(dir: &Path, retention: Retention) -> (Store, StoreWriter) {
    Store::open_with_retention(&dir.join("agent.redb"), SITE, retention).unwrap()
}

/// `n` milestones stored at `at_ms`, written concurrently so the writer groups them.
async fn fill(store: &Store, from: usize, n: usize, at_ms: i64) {
    let mut set = tokio::task::JoinSet::new();
    for i in from..from + n {
        let store = store.clone();
        set.spawn(async move {
            store
                .record_milestone(milestone(&format!("e{i}"), MilestoneKind::Picked), at_ms)
                .await
                .unwrap();
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

const DAY_MS: i64 = 86_400_000;

/// Goal: acknowledged rows are kept up to `max_events` (the newest ones), and depth, the
/// heartbeat summary and `outbox_rows` keep counting unacknowledged events only.
/// Method: 10 events, retention of 3, ack through 8.
#[tokio::test]
async fn acked_rows_are_retained_by_count_and_depth_counts_unacked_only() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open_retaining(
        dir.path(),
        Retention {
            max_age_secs: 3600,
            max_events: 3,
        },
    );
    let t0 = now_ms();
    for i in 0..10 {
        store
            .record_milestone(milestone(&format!("e{i}"), MilestoneKind::Picked), t0 + i)
            .await
            .unwrap();
    }
    let before = store.outbox_summary().unwrap();
    assert_eq!((before.events, before.oldest_at_ms), (10, Some(t0)));
    assert_eq!(store.mark_acked_at(8, t0 + 10).await.unwrap(), 8);
    let m = store.marks().unwrap();
    assert_eq!(
        (m.outbox_depth(), m.retained_from_seq, m.retained_acked()),
        (2, 6, 3)
    );
    assert_eq!(store.outbox_rows().unwrap(), 2, "unacknowledged rows");
    assert_eq!(store.outbox_rows_held().unwrap(), 5, "seqs 6..=10");
    let ids: Vec<String> = store
        .outbox_range(6..=10)
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids, ["e5", "e6", "e7", "e8", "e9"]);
    assert!(store.outbox_range(5..=6).is_err(), "seq 5 was pruned");
    let sum = store.outbox_summary().unwrap();
    assert_eq!(sum.events, 2);
    assert_eq!(
        sum.oldest_at_ms,
        Some(t0 + 8),
        "the oldest unacknowledged, seq 9"
    );
    assert!(
        sum.bytes > 0 && sum.bytes < before.bytes,
        "{sum:?} {before:?}"
    );
    // Acking the rest keeps the newest three acknowledged rows, and the summary is empty.
    store.mark_acked_at(10, t0 + 10).await.unwrap();
    let m = store.marks().unwrap();
    assert_eq!((m.outbox_depth(), m.retained_from_seq), (0, 8));
    assert_eq!(store.outbox_rows().unwrap(), 0);
    let sum = store.outbox_summary().unwrap();
    assert_eq!((sum.events, sum.bytes, sum.oldest_at_ms), (0, 0, None));
    writer.shutdown().await;
}

/// Goal: acknowledged rows older than `max_age_secs` are pruned, by the ack and later by a
/// prune step; unacknowledged rows are never pruned however old; `Retention::NONE` keeps
/// nothing acknowledged (the behaviour before retention).
#[tokio::test]
async fn acked_rows_are_retained_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open_retaining(
        dir.path(),
        Retention {
            max_age_secs: 60,
            max_events: 1_000,
        },
    );
    let t0 = 1_700_000_000_000;
    fill(&store, 0, 5, t0).await;
    fill(&store, 5, 5, t0 + 100_000).await;
    // At t0 + 120 s, seqs 1..=5 are 120 s old, 6..=8 are 20 s old, 9..=10 unacknowledged.
    store.mark_acked_at(8, t0 + 120_000).await.unwrap();
    let m = store.marks().unwrap();
    assert_eq!((m.retained_from_seq, m.outbox_depth()), (6, 2));
    // Nothing expired yet: nothing pruned, nothing written.
    assert_eq!(
        store.prune_acked_at(t0 + 150_000).await.unwrap(),
        Pruned::default()
    );
    // A year later, the acknowledged rows go and the unacknowledged ones stay.
    let p = store.prune_acked_at(t0 + 365 * DAY_MS).await.unwrap();
    assert_eq!(
        p,
        Pruned {
            rows: 3,
            more: false
        }
    );
    let m = store.marks().unwrap();
    assert_eq!((m.retained_from_seq, m.outbox_depth()), (9, 2));
    assert_eq!(store.outbox_range(9..=10).unwrap().len(), 2);
    writer.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open_retaining(dir.path(), Retention::NONE);
    fill(&store, 0, 4, now_ms()).await;
    store.mark_acked(3).await.unwrap();
    let m = store.marks().unwrap();
    assert_eq!((m.retained_from_seq, m.retained_acked()), (4, 0));
    assert_eq!(store.outbox_rows_held().unwrap(), 1);
    writer.shutdown().await;
}

/// Goal: pruning is bounded per write transaction, by an ack as by a prune step, and goes on
/// at the next one; a prune step says when it left expired rows behind.
/// Method: 12,345 fresh events acked at once (none expired), then prunes far in the future;
/// then as many again, acked when already expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_is_bounded_per_transaction() {
    const N: usize = 12_345;
    let rest = (N - MAX_PRUNE_PER_STEP) as u64;
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let t0 = now_ms();
    fill(&store, 0, N, t0).await;
    store.mark_acked_at(N as u64, t0).await.unwrap();
    assert_eq!(store.outbox_rows_held().unwrap(), N as u64, "all retained");
    let later = t0 + 8 * DAY_MS;
    let p = store.prune_acked_at(later).await.unwrap();
    assert_eq!(
        p,
        Pruned {
            rows: MAX_PRUNE_PER_STEP as u64,
            more: true
        }
    );
    let p = store.prune_acked_at(later).await.unwrap();
    assert_eq!(
        p,
        Pruned {
            rows: rest,
            more: false
        }
    );
    assert_eq!(store.outbox_rows_held().unwrap(), 0);

    fill(&store, N, N, t0).await;
    store.mark_acked_at(2 * N as u64, later).await.unwrap();
    let m = store.marks().unwrap();
    assert_eq!(m.outbox_depth(), 0);
    assert_eq!(m.retained_acked(), rest, "the ack pruned one step's worth");
    // The next ack (even a repeated one) continues.
    store.mark_acked_at(2 * N as u64, later).await.unwrap();
    assert_eq!(store.marks().unwrap().retained_acked(), 0);
    writer.shutdown().await;
}

/// Goal: on a quiet site (no ack) the pruner task removes retained events once they age
/// out, and stops on shutdown.
#[tokio::test]
async fn the_pruner_prunes_without_acks_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    fill(&store, 0, 3, 1).await;
    // Acked "at" 1 ms after the epoch: young then, a week old by now.
    store.mark_acked_at(3, 1).await.unwrap();
    assert_eq!(store.marks().unwrap().retained_acked(), 3);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_pruner(
        store.clone(),
        Duration::from_millis(10),
        stop_rx,
    ));
    for _ in 0..500 {
        if store.outbox_rows_held().unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.marks().unwrap().retained_acked(), 0);
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the pruner stops on shutdown")
        .unwrap();
    writer.shutdown().await;
}

/// Goal: the acked mark can be rewound only over rows still held: the rewound events are
/// unacknowledged again with their original seqs and event ids; a rewind past the pruned
/// rows or forward is refused and changes nothing.
#[tokio::test]
async fn rewind_is_allowed_only_over_retained_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open_retaining(
        dir.path(),
        Retention {
            max_age_secs: 3600,
            max_events: 3,
        },
    );
    fill(&store, 0, 10, now_ms()).await;
    let ids = |from: u64, to: u64| -> Vec<String> {
        store
            .outbox_range(from..=to)
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect()
    };
    let original = ids(1, 10);
    store.mark_acked(10).await.unwrap();
    assert_eq!(store.marks().unwrap().retained_from_seq, 8);
    assert_eq!(
        store.rewind_acked(5).await,
        Err(WriteError::NotRetained {
            to: 5,
            acked: 10,
            retained_from: 8
        })
    );
    assert_eq!(
        store.rewind_acked(11).await,
        Err(WriteError::RewindForward { to: 11, acked: 10 })
    );
    assert_eq!(
        store.marks().unwrap().acked_seq,
        10,
        "refusals change nothing"
    );
    assert_eq!(store.rewind_acked(7).await.unwrap(), 10);
    let m = store.marks().unwrap();
    assert_eq!(
        (m.acked_seq, m.outbox_depth(), m.retained_acked()),
        (7, 3, 0)
    );
    assert_eq!(store.outbox_rows().unwrap(), 3);
    assert_eq!(ids(8, 10), original[7..10]);
    assert_eq!(
        store.rewind_acked(7).await.unwrap(),
        7,
        "to the mark: no-op"
    );
    // The rewound rows are unacknowledged again: no prune touches them.
    assert_eq!(
        store.prune_acked_at(now_ms() + 365 * DAY_MS).await.unwrap(),
        Pruned::default()
    );
    assert_eq!(store.marks().unwrap().retained_from_seq, 8);
    // Acked again, they are retained again.
    store.mark_acked(10).await.unwrap();
    assert_eq!(store.marks().unwrap().retained_from_seq, 8);
    writer.shutdown().await;
}

/// Goal: the first incarnation is recorded without touching anything; the same one again
/// changes nothing; a different one drops every allowance to 0 and sets the applied revision
/// to central's `master_from_rev` (published, even though lower), in one operation, after
/// which master data resumes from there.
#[tokio::test]
async fn a_new_central_incarnation_drops_allowances_and_resets_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let gear = Pool::atp("GEAR-12T");
    let credit = Pool::credit("ACME");
    store.apply_master(catalogue(0, 5)).await.unwrap();
    store
        .apply_master(grants(5, 8, &[(gear.clone(), 7), (credit.clone(), 500)]))
        .await
        .unwrap();
    let mut rev = store.master_rev_watch();
    assert_eq!(
        store.adopt_central_incarnation(41, 8, 0).await.unwrap(),
        IncarnationChange::First
    );
    assert_eq!(store.marks().unwrap().central_incarnation, 41);
    assert_eq!(
        store.adopt_central_incarnation(41, 2, 0).await.unwrap(),
        IncarnationChange::Unchanged
    );
    assert_eq!(store.allowance(&gear).unwrap(), 7);
    assert_eq!(store.marks().unwrap().master_rev, 8);

    let change = store.adopt_central_incarnation(42, 6, 0).await.unwrap();
    assert_eq!(
        change,
        IncarnationChange::Changed {
            previous: 41,
            allowances_dropped: 2,
            atp_dropped: 7,
            credit_dropped: 500,
            master_rev_before: 8,
        }
    );
    assert_eq!(store.allowance(&gear).unwrap(), 0);
    assert_eq!(store.allowance(&credit).unwrap(), 0);
    let m = store.marks().unwrap();
    assert_eq!((m.master_rev, m.central_incarnation), (6, 42));
    assert_eq!(
        *rev.borrow_and_update(),
        6,
        "the lower revision is published"
    );
    // Master data resumes from central's revision: its grants apply again.
    assert!(
        store
            .apply_master(grants(6, 7, &[(gear.clone(), 2)]))
            .await
            .unwrap()
    );
    assert_eq!(store.allowance(&gear).unwrap(), 2);
    writer.shutdown().await;
}

/// Goal (regression): an order confirmed after the session's Hello and before its Welcome named
/// a new incarnation drew on the allowances being dropped, while the restored central, which
/// knows only the Hello's last seq, counts it against the grants it makes this session; the site
/// owes those units, so the new grants repay them before anything can be confirmed again (the
/// site and central's ledger then agree, and no unit is promised twice). Orders up to the
/// Hello's seq owe nothing: central counts them as old grants.
#[tokio::test]
async fn orders_after_the_hello_are_owed_from_a_new_incarnations_grants() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let gear = Pool::atp("GEAR-12T");
    let credit = Pool::credit("ACME");
    store.apply_master(catalogue(0, 5)).await.unwrap();
    store
        .apply_master(grants(
            5,
            8,
            &[(gear.clone(), 7), (credit.clone(), 5_000_000)],
        ))
        .await
        .unwrap();
    store.adopt_central_incarnation(41, 8, 0).await.unwrap();
    // Before the Hello (seq 1): 2 confirmed; after it (seq 2): 3 confirmed at 11.00.
    for (key, qty) in [("k1", 2), ("k2", 3)] {
        let o = store
            .create_order(key, order("ACME", &[("GEAR-12T", qty)]), 1, false)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(o.order.lines[0].promise, LinePromise::Confirmed);
    }
    assert_eq!(store.allowance(&gear).unwrap(), 2);
    let hello_last_seq = 1;
    let change = store
        .adopt_central_incarnation(42, 6, hello_last_seq)
        .await
        .unwrap();
    assert!(matches!(change, IncarnationChange::Changed { .. }));
    assert_eq!(
        store.allowance(&gear).unwrap(),
        -3,
        "seq 2's units are owed"
    );
    assert_eq!(store.allowance(&credit).unwrap(), -330_000);
    // Central granted 4 and counts seq 2's 3 against them: it says the site holds 1.
    store
        .apply_master(grants(
            6,
            7,
            &[(gear.clone(), 4), (credit.clone(), 330_000)],
        ))
        .await
        .unwrap();
    assert_eq!(store.allowance(&gear).unwrap(), 1);
    assert_eq!(store.allowance(&credit).unwrap(), 0);
    let o = store
        .create_order("k3", order("ACME", &[("GEAR-12T", 2)]), 1, false)
        .await
        .unwrap()
        .into_inner();
    assert_ne!(o.order.lines[0].promise, LinePromise::Confirmed);
    writer.shutdown().await;
}

/// Goal: after shutdown, writes fail with `Unavailable` instead of hanging.
#[tokio::test]
async fn writes_after_shutdown_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    writer.shutdown().await;
    assert!(matches!(
        store
            .record_milestone(milestone("e", MilestoneKind::Picked), 1)
            .await,
        Err(WriteError::Unavailable(_))
    ));
}
