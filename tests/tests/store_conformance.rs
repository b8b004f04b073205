//! One conformance suite for central's event log (`outpost_central::event_log::EventLog`),
//! master-data log (`outpost_central::master_log::MasterLog`), deny list
//! (`outpost_central::deny_list::DenyList`), alerts (`outpost_central::alert_log::AlertLog`), site
//! registry (`outpost_central::site_registry::SiteRegistry`) and dead letters
//! (`outpost_central::dead_letter_log::DeadLetterLog`), run against both stores: the embedded redb store and the PostgreSQL store on a private cluster
//! started in a temp directory. Each test states the contract, then runs the same body on each.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outpost_central::alert_log::AlertLog;
use outpost_central::dead_letter_log::DeadLetterLog;
use outpost_central::deny_list::DenyList;
use outpost_central::event_log::{EventLog, FeedEntry, UploadError};
use outpost_central::master_log::{MasterError, MasterLog};
use outpost_central::pg::{PgOptions, PgStore, Sequencer};
use outpost_central::site_registry::SiteRegistry;
use outpost_central::store::{NewAlert, Store};
use outpost_protocol::session::IngestError;
use outpost_protocol::{CustomerRecord, Grant, MasterChange, Money, Pool, PriceRecord};
use outpost_tests::pg::PgCluster;
use tokio::sync::watch;

/// Patience for the feed to show what was uploaded (the PostgreSQL sequencer numbers events
/// within about 50 ms of their commit).
const FEED_TIMEOUT: Duration = Duration::from_secs(60);

use outpost_tests::events::milestones as batch;

/// Reads the whole feed in pages of `page`, until it holds `want` events or the time is up.
async fn read_feed<L: EventLog>(log: &L, want: usize, page: usize) -> Result<Vec<FeedEntry>> {
    let deadline = Instant::now() + FEED_TIMEOUT;
    let mut out: Vec<FeedEntry> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.pos);
        let rows = log.feed_after(after, page).await?;
        let got = rows.len();
        out.extend(rows);
        if out.len() >= want {
            return Ok(out);
        }
        if got == 0 {
            if Instant::now() > deadline {
                bail!("the feed holds {} events, expected {want}", out.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Every (site, seq) in `feed` once, positions strictly increasing.
fn check_feed(feed: &[FeedEntry], want: &BTreeMap<String, u64>) -> Result<()> {
    let mut seen = HashSet::new();
    for w in feed.windows(2) {
        ensure!(
            w[0].pos < w[1].pos,
            "positions not increasing: {} then {}",
            w[0].pos,
            w[1].pos
        );
    }
    for e in feed {
        ensure!(
            seen.insert((e.event.site.clone(), e.event.seq)),
            "{} seq {} twice in the feed",
            e.event.site,
            e.event.seq
        );
        ensure!(e.event.event_id == format!("{}-e{}", e.event.site, e.event.seq));
    }
    let total: u64 = want.values().sum();
    ensure!(
        seen.len() as u64 == total,
        "feed holds {} events, expected {total}",
        seen.len()
    );
    for (site, n) in want {
        for seq in 1..=*n {
            ensure!(
                seen.contains(&(site.clone(), seq)),
                "{site} seq {seq} missing"
            );
        }
    }
    Ok(())
}

/// A store of each kind, for one test.
enum Backend {
    Redb {
        store: Store,
        _dir: tempfile::TempDir,
    },
    Pg {
        store: PgStore,
        _sequencer: Sequencer,
        _stop: watch::Sender<bool>,
        _cluster: PgCluster,
    },
}

async fn backends(what: &str) -> Result<Vec<Backend>> {
    let dir = tempfile::tempdir()?;
    let redb = Store::open(&dir.path().join("central.redb"))?;
    let mut out = vec![Backend::Redb {
        store: redb,
        _dir: dir,
    }];
    if let Some(cluster) = PgCluster::start(what)? {
        let store = PgStore::open(&PgOptions::new(&cluster.url())).await?;
        let (stop, stopped) = watch::channel(false);
        let seq = store.spawn_sequencer(stopped);
        out.push(Backend::Pg {
            store,
            _sequencer: seq,
            _stop: stop,
            _cluster: cluster,
        });
    }
    Ok(out)
}

/// Runs `body` on each backend, naming the one that failed.
macro_rules! on_each {
    ($what:expr, |$log:ident| $body:expr) => {{
        for b in backends($what).await? {
            match &b {
                Backend::Redb { store: s, .. } => {
                    let $log = s.clone();
                    $body.await.context("redb store")?;
                    println!("{}: redb ok", $what);
                }
                Backend::Pg { store: s, .. } => {
                    let $log = s.clone();
                    $body.await.context("PostgreSQL store")?;
                    println!("{}: PostgreSQL ok", $what);
                }
            }
            if let Backend::Redb { store: s, .. } = b {
                s.close().await;
            }
        }
        Ok(())
    }};
}

/// Goal: an upload stores its events and moves the mark together; a re-upload after a lost ack
/// stores nothing twice, and a batch that overlaps the mark stores only its new tail.
async fn reupload<L: EventLog>(log: L) -> Result<()> {
    let a = log.upload("plant-1", batch("plant-1", 1..=5)).await?;
    ensure!((a.duplicates, a.stored, a.new_hwm) == (0, 5, 5), "{a:?}");
    let b = log.upload("plant-1", batch("plant-1", 1..=5)).await?;
    ensure!((b.duplicates, b.stored, b.new_hwm) == (5, 0, 5), "{b:?}");
    let c = log.upload("plant-1", batch("plant-1", 4..=8)).await?;
    ensure!((c.duplicates, c.stored, c.new_hwm) == (2, 3, 8), "{c:?}");
    ensure!(log.site_hwm("plant-1").await? == 8);
    ensure!(log.site_hwm("never-seen").await? == 0);
    let feed = read_feed(&log, 8, 3).await?;
    check_feed(&feed, &BTreeMap::from([("plant-1".to_string(), 8)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reupload_is_stored_once() -> Result<()> {
    on_each!("a re-upload is stored once", |log| reupload(log))
}

/// Goal: a batch with a gap or another site's event is refused whole, and changes nothing.
async fn refusals<L: EventLog>(log: L) -> Result<()> {
    log.upload("plant-1", batch("plant-1", 1..=3)).await?;
    match log.upload("plant-1", batch("plant-1", 5..=6)).await {
        Err(UploadError::Plan(IngestError::Gap {
            expected: 4,
            got: 5,
        })) => {}
        other => bail!("a gap must be refused: {other:?}"),
    }
    let mut foreign = batch("plant-1", 4..=5);
    foreign[1].site = "plant-2".into();
    match log.upload("plant-1", foreign).await {
        Err(UploadError::Plan(IngestError::ForeignSite { .. })) => {}
        other => bail!("another site's event must be refused: {other:?}"),
    }
    ensure!(log.site_hwm("plant-1").await? == 3);
    ensure!(log.site_hwm("plant-2").await? == 0);
    // The batch after the refused ones continues at the mark.
    let ok = log.upload("plant-1", batch("plant-1", 4..=4)).await?;
    ensure!(ok.new_hwm == 4);
    let feed = read_feed(&log, 4, 100).await?;
    let after = log
        .feed_after(feed.last().map_or(0, |e| e.pos), 100)
        .await?;
    ensure!(after.is_empty(), "nothing beyond the 4 events: {after:?}");
    check_feed(&feed, &BTreeMap::from([("plant-1".to_string(), 4)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_change_nothing() -> Result<()> {
    on_each!("refused batches change nothing", |log| refusals(log))
}

/// Goal: uploads of one site racing each other (a site reconnected to another node while its
/// old session still commits) are serialized: each event is stored once, the mark ends at the
/// last seq. Method: 6 tasks upload overlapping prefixes of one site's 300 events at once.
async fn racing_uploads<L: EventLog + Clone + 'static>(log: L) -> Result<()> {
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut stored = 0;
            for end in [50 + t * 10, 150 + t * 20, 300] {
                let start = end.saturating_sub(120).max(1);
                // A batch must continue at the mark or overlap it: re-read the mark and upload
                // from there when the planned start is past it.
                let hwm = log.site_hwm("plant-1").await?;
                let from = start.min(hwm + 1);
                // The mark only moves forward, so the batch still overlaps or continues it.
                stored += log
                    .upload("plant-1", batch("plant-1", from..=end))
                    .await?
                    .stored;
            }
            Ok::<usize, anyhow::Error>(stored)
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await??;
    }
    let hwm = log.site_hwm("plant-1").await?;
    let feed = read_feed(&log, hwm as usize, 1000).await?;
    ensure!(
        stored as u64 == hwm,
        "tasks stored {stored} events, the mark is {hwm}"
    );
    ensure!(hwm >= 200, "the last uploads reach far: mark {hwm}");
    check_feed(&feed, &BTreeMap::from([("plant-1".to_string(), hwm)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_uploads_of_one_site_store_each_event_once() -> Result<()> {
    on_each!("racing uploads of one site", |log| racing_uploads(log))
}

/// Goal: a reader paging through the feed while many sites upload at once never skips an event
/// and never sees one twice, though transactions commit out of order. Method: 8 sites upload
/// 30 batches of 25 events each concurrently; a reader pages with a small page from the start
/// meanwhile, until it holds all 6,000.
async fn no_skips<L: EventLog + Clone + 'static>(log: L) -> Result<()> {
    const SITES: u64 = 8;
    const BATCHES: u64 = 30;
    const PER: u64 = 25;
    let want = (SITES * BATCHES * PER) as usize;
    let reader = {
        let log = log.clone();
        tokio::spawn(async move { read_feed(&log, want, 37).await })
    };
    let mut writers = Vec::new();
    for s in 0..SITES {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            let site = format!("site-{s}");
            for b in 0..BATCHES {
                let first = b * PER + 1;
                log.upload(&site, batch(&site, first..=first + PER - 1))
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let feed = reader.await??;
    let expect: BTreeMap<String, u64> = (0..SITES)
        .map(|s| (format!("site-{s}"), BATCHES * PER))
        .collect();
    check_feed(&feed, &expect)?;
    // Positions are dense: what a reader paged is exactly 1..=want.
    ensure!(
        feed.first().map(|e| e.pos) == Some(1) && feed.last().map(|e| e.pos) == Some(want as u64),
        "positions run from {:?} to {:?}",
        feed.first().map(|e| e.pos),
        feed.last().map(|e| e.pos)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_skips_an_event_committed_out_of_order() -> Result<()> {
    on_each!("a reader never skips an event", |log| no_skips(log))
}

fn price(sku: &str, customer: Option<&str>, units: i64) -> MasterChange {
    MasterChange::Price(PriceRecord {
        sku: sku.into(),
        customer: customer.map(Into::into),
        unit_price: Money(units),
        currency: "EUR".into(),
    })
}

fn customer(id: &str, limit: i64) -> MasterChange {
    MasterChange::Customer(CustomerRecord {
        id: id.into(),
        name: format!("Customer {id}"),
        credit_limit: Money(limit),
        on_hold: false,
    })
}

/// Goal: the ERP's items get consecutive revisions in the order given, the change log reads them
/// back in that order page by page, the current state holds the newest of each key, an invalid
/// batch writes nothing (every bad item named), and the watched revision follows each commit.
async fn master<L: MasterLog>(log: L) -> Result<()> {
    let mut watch = log.watch_revision();
    let start = *watch.borrow_and_update();
    ensure!(start == 0, "a new store starts at revision 0, not {start}");
    let a = log
        .upsert_master(vec![
            price("SKU-1", None, 100),
            price("SKU-1", Some("C-1"), 90),
            customer("C-1", 50_000),
        ])
        .await?;
    ensure!((a.revision, a.changes) == (3, 3), "{a:?}");
    tokio::time::timeout(FEED_TIMEOUT, watch.wait_for(|r| *r >= 3)).await??;
    let b = log.upsert_master(vec![price("SKU-1", None, 120)]).await?;
    ensure!(b.revision == 4, "{b:?}");
    let grant = MasterChange::Grant(Grant {
        site: "plant-1".into(),
        pool: Pool::Atp {
            sku: "SKU-1".into(),
        },
        qty: 5,
    });
    match log
        .upsert_master(vec![price("SKU-2", None, 1), price("", None, 1), grant])
        .await
    {
        Err(MasterError::Invalid(bad)) => {
            let idx: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
            ensure!(idx == [1, 2], "items 1 and 2 named: {bad:?}");
        }
        other => bail!("an invalid batch must be refused whole: {other:?}"),
    }
    ensure!(
        log.price("SKU-2", None).await?.is_none(),
        "nothing of it written"
    );
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = log.changes_after(after, 2).await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        seen.extend(page);
    }
    let revs: Vec<u64> = seen.iter().map(|(r, _)| *r).collect();
    ensure!(revs == [1, 2, 3, 4], "revisions {revs:?}");
    ensure!(seen[3].1 == price("SKU-1", None, 120));
    let list = log.price("SKU-1", None).await?.context("list price")?;
    ensure!(list.unit_price == Money(120), "newest list price: {list:?}");
    let own = log
        .price("SKU-1", Some("C-1"))
        .await?
        .context("own price")?;
    ensure!(own.unit_price == Money(90));
    ensure!(log.customer("C-1").await?.map(|c| c.credit_limit) == Some(Money(50_000)));
    tokio::time::timeout(FEED_TIMEOUT, watch.wait_for(|r| *r >= 4)).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_revisions_are_consecutive_and_watched() -> Result<()> {
    on_each!("master revisions", |log| master(log))
}

/// Goal: a revocation is kept, a repeated one keeps the first entry, reinstating returns the
/// entry and takes the site off, and the list reads sorted.
async fn deny_list<L: DenyList>(log: L) -> Result<()> {
    ensure!(log.revoked_site("plant-1").await?.is_none());
    let first = log.revoke_site("plant-2", "laptop stolen".into()).await?;
    ensure!(first.reason == "laptop stolen");
    let again = log.revoke_site("plant-2", "other".into()).await?;
    ensure!(
        again == first,
        "a repeated revoke keeps the first entry: {again:?}"
    );
    log.revoke_site("plant-1", "audit".into()).await?;
    let all: Vec<String> = log
        .revoked_sites()
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    ensure!(all == ["plant-1", "plant-2"], "{all:?}");
    ensure!(log.reinstate_site("plant-2").await? == Some(first));
    ensure!(log.revoked_site("plant-2").await?.is_none());
    ensure!(
        log.reinstate_site("plant-2").await?.is_none(),
        "nothing left to reinstate"
    );
    ensure!(log.revoked_site("plant-1").await?.map(|r| r.reason) == Some("audit".into()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deny_list_keeps_the_first_revocation() -> Result<()> {
    on_each!("the deny list", |log| deny_list(log))
}

fn new_alert(site: &str, to: &str, drill_id: Option<u64>) -> NewAlert {
    NewAlert {
        site: site.into(),
        from: "healthy".into(),
        to: to.into(),
        reasons: vec!["not_heard_from".into(), "backlog".into()],
        at_ms: 1_700_000_000_000,
        drill_id,
    }
}

/// Goal: alerts recorded at once by several writers (nodes) get ids 1..=n without a gap, read
/// back whole and in id order, page by page after a cursor.
async fn alerts<L: AlertLog + Clone + 'static>(log: L) -> Result<()> {
    ensure!(log.alerts(0, 10).await?.is_empty());
    let mut tasks = Vec::new();
    for t in 0..3 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let drill = (i % 5 == 0).then_some(7);
                log.record_alert(new_alert(&format!("site-{t}"), "offline", drill))
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = log.alerts(after, 7).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        all.extend(page);
    }
    let ids: Vec<u64> = all.iter().map(|a| a.id).collect();
    ensure!(ids == (1..=60).collect::<Vec<u64>>(), "ids {ids:?}");
    let first = &all[0];
    ensure!(
        first.reasons == ["not_heard_from", "backlog"] && first.to == "offline",
        "{first:?}"
    );
    ensure!(all.iter().filter(|a| a.drill_id == Some(7)).count() == 12);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_get_consecutive_ids_from_concurrent_writers() -> Result<()> {
    on_each!("alerts", |log| alerts(log))
}

/// Goal: the registry lists every site heard from (by a Hello or an upload), sorted, with its
/// mark; a later contact moves `last_seen` and keeps `first_seen`.
async fn registry<L: SiteRegistry + EventLog>(log: L) -> Result<()> {
    ensure!(log.sites().await?.is_empty());
    log.touch_site("plant-2").await?;
    let first = log.sites().await?;
    let rec = first[0].record.context("a record")?;
    log.upload("plant-1", batch("plant-1", 1..=3)).await?;
    // The next contact must fall in a later millisecond of central's clock (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(1);
    while outpost_central::store::now_ms() <= rec.last_seen_ms && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    log.touch_site("plant-2").await?;
    let sites = log.sites().await?;
    let names: Vec<&str> = sites.iter().map(|s| s.site.as_str()).collect();
    ensure!(names == ["plant-1", "plant-2"], "{names:?}");
    ensure!(sites[0].hwm == 3 && sites[1].hwm == 0, "{sites:?}");
    let again = sites[1].record.context("a record")?;
    ensure!(
        again.first_seen_ms == rec.first_seen_ms,
        "{again:?} vs {rec:?}"
    );
    ensure!(
        again.last_seen_ms > rec.last_seen_ms,
        "{again:?} vs {rec:?}"
    );
    let p1 = sites[0].record.context("an upload records contact")?;
    ensure!(p1.first_seen_ms <= p1.last_seen_ms);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_lists_every_site_heard_from() -> Result<()> {
    on_each!("the site registry", |log| registry(log))
}

/// Goal: one bad event never blocks the batch: it takes its place in the sequence, goes to the
/// dead letters with its reason and the whole envelope, and the events around it reach the feed;
/// a re-upload dead-letters nothing twice.
async fn bad_event<L: EventLog + DeadLetterLog>(log: L) -> Result<()> {
    let mut events = batch("plant-1", 1..=4);
    events[1].body = vec![0xff, 0xff, 0xff];
    events[2].schema = 999;
    let u = log.upload("plant-1", events.clone()).await?;
    ensure!((u.duplicates, u.stored, u.new_hwm) == (0, 4, 4), "{u:?}");
    let dead = log.dead_letters(0, 10).await?;
    let seqs: Vec<u64> = dead.iter().map(|d| d.seq).collect();
    ensure!(seqs == [2, 3], "dead letters {seqs:?}");
    ensure!(dead[0].event == events[1] && dead[1].event == events[2]);
    ensure!(
        dead.iter()
            .all(|d| !d.reason.is_empty() && d.site == "plant-1")
    );
    ensure!(dead[1].id > dead[0].id);
    ensure!(
        log.dead_letters(dead[0].id, 10).await?.len() == 1,
        "paged after a cursor"
    );
    let feed = read_feed(&log, 2, 100).await?;
    let fed: Vec<u64> = feed.iter().map(|e| e.event.seq).collect();
    ensure!(fed == [1, 4], "the feed holds the good events: {fed:?}");
    let again = log.upload("plant-1", events).await?;
    ensure!(again.duplicates == 4 && again.stored == 0, "{again:?}");
    ensure!(
        log.dead_letters(0, 10).await?.len() == 2,
        "nothing dead-lettered twice"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_is_dead_lettered_and_never_blocks_the_batch() -> Result<()> {
    on_each!("a bad event mid-batch", |log| bad_event(log))
}
