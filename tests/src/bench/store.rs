//! The `store` scenario: central's two stores side by side, in process, through the event log's
//! interface: a backlog drained as full batches from 8 sites at once (events/s, ack p99 per
//! batch, and for PostgreSQL the lag of the feed sequencer), and allowance grants per second
//! with three PostgreSQL nodes contending for one pool. The PostgreSQL server is a private
//! cluster in a temp directory with `fsync` and `synchronous_commit` on.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_central::event_log::EventLog;
use outpost_central::pg::{PgOptions, PgStore};
use outpost_central::store::Store;
use outpost_protocol::{EventEnvelope, MAX_EVENTS_PER_BATCH};
use tokio::sync::watch;

use super::Figure;
use super::hist::Hist;
use super::scenarios::Cfg;
use super::sys::ms;
use crate::events::milestones;
use crate::pg::PgCluster;

/// Sites uploading at once.
const SITES: u64 = 8;
/// Tasks granting at once per PostgreSQL node, three nodes.
const GRANTERS_PER_NODE: usize = 4;

fn backlog(cfg: Cfg) -> u64 {
    if cfg.short { 40_000 } else { 1_000_000 }
}

/// Uploads `n` events from `SITES` sites in full batches, each site's batches one after the
/// other and the sites at once. Returns the elapsed time and the per-batch ack latencies.
async fn drain<L: EventLog + Clone + 'static>(log: &L, n: u64) -> Result<(Duration, Hist)> {
    let per_site = n / SITES;
    let batch = MAX_EVENTS_PER_BATCH as u64;
    // Events are made before the clock starts: only the store is timed.
    let mut work = Vec::new();
    for s in 0..SITES {
        let site = format!("site-{s}");
        let batches: Vec<Vec<EventEnvelope>> = (0..per_site.div_ceil(batch))
            .map(|b| {
                let first = b * batch + 1;
                let last = ((b + 1) * batch).min(per_site);
                milestones(&site, first..=last)
            })
            .collect();
        work.push((site, batches));
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (site, batches) in work {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Hist::new();
            for b in batches {
                let t = Instant::now();
                let u = log.upload(&site, b).await?;
                h.record(t.elapsed());
                if u.stored == 0 {
                    bail!("{site}: a batch stored nothing: {u:?}");
                }
            }
            Ok::<Hist, anyhow::Error>(h)
        }));
    }
    let mut hist = Hist::new();
    for t in tasks {
        hist.merge(&t.await??);
    }
    Ok((t0.elapsed(), hist))
}

/// Reads the whole feed in pages of 1,000 (what the ERP does); returns events per second.
async fn read_feed<L: EventLog>(log: &L, n: u64) -> Result<Figure> {
    let t0 = Instant::now();
    let (mut after, mut read) = (0u64, 0u64);
    while read < n {
        let page = log.feed_after(after, 1000).await?;
        let Some(last) = page.last() else {
            bail!("the feed ended after {read} of {n} events");
        };
        after = last.pos;
        read += page.len() as u64;
    }
    Ok(Figure::new(
        "feed_read_events_per_s",
        n as f64 / t0.elapsed().as_secs_f64(),
        "events/s",
    )
    .note("the whole feed in pages of 1,000, one reader"))
}

fn named(prefix: &str, mut f: Figure) -> Figure {
    f.name = format!("store.{prefix}.{}", f.name);
    f
}

fn drain_figures(
    prefix: &str,
    n: u64,
    took: Duration,
    h: &Hist,
    goal: Option<&str>,
) -> Vec<Figure> {
    let mut rate = Figure::new(
        format!("store.{prefix}.drain_events_per_s"),
        n as f64 / took.as_secs_f64(),
        "events/s",
    )
    .note(format!(
        "{n} events, {SITES} sites at once, batches of {MAX_EVENTS_PER_BATCH}, one transaction each"
    ));
    if let Some(g) = goal {
        rate = rate.goal(g);
    }
    vec![
        rate,
        Figure::new(
            format!("store.{prefix}.upload_ack_p50"),
            ms(h.quantile(0.5)),
            "ms",
        ),
        Figure::new(
            format!("store.{prefix}.upload_ack_p99"),
            ms(h.quantile(0.99)),
            "ms",
        )
        .note("one batch of 1,000 events, from the call to the answer after the commit"),
    ]
}

/// Runs the scenario. Without PostgreSQL's server binaries it fails with the install hint.
pub async fn run(cfg: Cfg) -> Result<Vec<Figure>> {
    let n = backlog(cfg);
    let mut figs = Vec::new();

    let dir = tempfile::tempdir()?;
    let redb = Store::open(&dir.path().join("central.redb"))?;
    let (took, h) = drain(&redb, n).await?;
    figs.extend(drain_figures("redb", n, took, &h, None));
    figs.push(named("redb", read_feed(&redb, n).await?));
    redb.close().await;

    let Some(pg) = PgCluster::start("outpost-bench store scenario")? else {
        bail!(
            "the store scenario needs PostgreSQL's server binaries (Debian package `postgresql`)"
        );
    };
    let store = PgStore::open(&PgOptions::new(&pg.url())).await?;
    let (stop, stopped) = watch::channel(false);
    let sequencer = store.spawn_sequencer(stopped);
    let (took, h) = drain(&store, n).await?;
    let uploaded = Instant::now();
    figs.extend(drain_figures("pg", n, took, &h, Some(">= 100000")));
    // The feed is complete when the sequencer has numbered every event.
    let deadline = uploaded + Duration::from_secs(120);
    loop {
        let tail = store.feed_after(n - 1, 1).await?;
        if !tail.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the sequencer had not numbered {n} events 120 s after the uploads");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    figs.push(
        Figure::new(
            "store.pg.feed_complete_after_upload",
            ms(uploaded.elapsed()),
            "ms",
        )
        .note("from the last upload's answer until the sequencer numbered every event"),
    );
    figs.push(
        Figure::new(
            "store.pg.drain_to_feed_events_per_s",
            n as f64 / (took + uploaded.elapsed()).as_secs_f64(),
            "events/s",
        )
        .note("uploads plus sequencing: the rate at which events become readable in the feed"),
    );
    figs.push(named("pg", read_feed(&store, n).await?));
    let _ = stop.send(true);
    sequencer.join().await;

    figs.extend(grants(&pg, cfg).await?);
    Ok(figs)
}

/// Grants of one unit each from one pool, by `GRANTERS_PER_NODE` tasks on each of three nodes
/// (connection pools), for the measurement time: grants/s and p99.
async fn grants(pg: &PgCluster, cfg: Cfg) -> Result<Vec<Figure>> {
    let url = pg.create_db("grants")?;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(PgStore::open(&PgOptions::new(&url)).await?);
    }
    nodes[0].set_pool_total("hot-sku", i64::MAX / 2).await?;
    let until = Instant::now() + cfg.measure();
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for t in 0..GRANTERS_PER_NODE {
            let node = node.clone();
            let site = format!("site-{i}-{t}");
            tasks.push(tokio::spawn(async move {
                let mut h = Hist::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let got = node.grant("hot-sku", &site, 1).await?;
                    h.record(t.elapsed());
                    if got != 1 {
                        bail!("granted {got} of 1 from a pool with room");
                    }
                }
                Ok::<Hist, anyhow::Error>(h)
            }));
        }
    }
    let t0 = Instant::now();
    let mut hist = Hist::new();
    for t in tasks {
        hist.merge(&t.await??);
    }
    let took = t0.elapsed();
    let granted = nodes[1]
        .pool_figures("hot-sku")
        .await?
        .context("pool")?
        .granted;
    if granted as u64 != hist.count() {
        bail!(
            "the pool says {granted} granted, the tasks got {}",
            hist.count()
        );
    }
    Ok(vec![
        Figure::new(
            "store.pg.grants_per_s_contended",
            hist.count() as f64 / took.as_secs_f64(),
            "grants/s",
        )
        .note(format!(
            "one pool, 3 nodes x {GRANTERS_PER_NODE} tasks, 1 unit each, one transaction each"
        )),
        Figure::new("store.pg.grant_p99", ms(hist.quantile(0.99)), "ms"),
    ])
}
