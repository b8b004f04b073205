//! The agent's store as the previous release left it: a copy of `tests/fixtures/agent-schema3.redb`
//! (written by the `outpost-agent` of commit b0dd4bf, agent schema 3, which this build still
//! reads) opened with the current store through its public API.

use std::path::PathBuf;

use outpost_agent::store::{NewMilestone, Outcome, Store};
use outpost_protocol::{ErpStatus, MilestoneKind, Pool};

const SITE: &str = "plant-1";

/// A copy of the fixture in a temp dir: opening a store may write to it, the fixture must stay
/// as the old build left it.
fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agent-schema3.redb");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.redb");
    std::fs::copy(&fixture, &path).unwrap();
    (dir, path)
}

/// Goal: the current build reads a store written by the previous release: its marks, the two
/// events still in its outbox (taken while central was down), its orders with their ERP status
/// and promises, its allowances; and it takes new writes after them. Method: the figures of
/// tests/fixtures/README.md, read through the public store API.
#[tokio::test]
async fn the_previous_releases_store_is_read_and_written() {
    let (_dir, path) = fixture_copy();
    let (store, writer) = Store::open(&path, SITE).unwrap();

    let marks = store.marks().unwrap();
    assert_eq!(
        (marks.last_seq, marks.acked_seq, marks.master_rev),
        (12, 10, 28)
    );
    assert_eq!(marks.outbox_depth(), 2);
    assert_eq!(
        marks.retained_from_seq, 11,
        "the old build kept no acknowledged event"
    );
    assert_eq!(
        marks.central_incarnation, 0,
        "the old central had no incarnation"
    );

    let outbox = store.outbox_range(11..=12).unwrap();
    let ids: Vec<(u64, &str, &str)> = outbox
        .iter()
        .map(|e| (e.seq, e.site.as_str(), e.event_id.as_str()))
        .collect();
    assert_eq!(ids, vec![(11, SITE, "plant-1-o11"), (12, SITE, "scan-5")]);

    let (o1, o1_synced) = store.order("plant-1-o1").unwrap().unwrap();
    assert_eq!((o1.seq, o1.erp_status), (1, Some(ErpStatus::Accepted)));
    assert!(o1_synced);
    assert_eq!(o1.order.customer_id, "C-ACME");
    let (o7, _) = store.order("plant-1-o7").unwrap().unwrap();
    assert_eq!(
        (o7.order.customer_id.as_str(), o7.order.status.as_str()),
        ("C-GAMMA", "pending")
    );
    let (o10, o10_synced) = store.order("plant-1-o10").unwrap().unwrap();
    assert!(o10.order.offline && o10_synced);
    let (o11, o11_synced) = store.order("plant-1-o11").unwrap().unwrap();
    assert!(o11.order.offline && !o11_synced);
    assert_eq!((o11.seq, o11.order.lines.len()), (11, 1));
    assert!(store.order("plant-1-o12").unwrap().is_none());

    let atp = |sku: &str| Pool::Atp { sku: sku.into() };
    assert_eq!(store.allowance(&atp("BOLT-M8")).unwrap(), 15);
    assert_eq!(store.allowance(&atp("GEAR-12T")).unwrap(), 20);
    assert_eq!(store.allowance(&atp("MOTOR-2KW")).unwrap(), 9);
    let (pools, truncated) = store.allowances().unwrap();
    assert_eq!((pools.len(), truncated), (5, false));

    // New writes go after the old ones.
    let m = NewMilestone {
        event_id: "scan-6".into(),
        shipment_id: "SH-3".into(),
        milestone: MilestoneKind::Packed,
        scanner_id: "rf-12".into(),
        at: "2026-11-26T10:06:00Z".into(),
    };
    let rec = match store.record_milestone(m, 1_795_775_700_000).await.unwrap() {
        Outcome::Created(r) => r,
        Outcome::Existing(r) => panic!("scan-6 is new, got an existing record {r:?}"),
    };
    assert_eq!(rec.seq, 13);
    writer.shutdown().await;
    drop(store);

    let (store, writer) = Store::open(&path, SITE).unwrap();
    let marks = store.marks().unwrap();
    assert_eq!((marks.last_seq, marks.acked_seq), (13, 10));
    assert_eq!(store.outbox_range(11..=13).unwrap().len(), 3);
    writer.shutdown().await;
}
