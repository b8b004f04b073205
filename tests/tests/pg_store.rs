//! Central's PostgreSQL store against real PostgreSQL servers started in temp directories: what
//! it refuses at open, escrow with three nodes granting at once, an acknowledged upload through
//! a crash of the server, uploads while the database is down, and a failover from a primary
//! SIGKILLed to its synchronous standby promoted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outpost_central::deny_list::DenyList;
use outpost_central::event_log::{EventLog, UploadError};
use outpost_central::master_log::MasterLog;
use outpost_central::pg::schema::SCHEMA_VERSION;
use outpost_central::pg::{PgOpenError, PgOptions, PgStore, Revocation};
use outpost_protocol::{MasterChange, Money, PriceRecord};
use outpost_tests::pg::PgCluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use outpost_tests::events::milestones as batch;

/// Options with short limits, so a test of a dead server does not wait long.
fn opts(url: &str) -> PgOptions {
    PgOptions {
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(5),
        pool_size: 8,
        ..PgOptions::new(url)
    }
}

async fn sql(url: &str, stmts: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    client.batch_execute(stmts).await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

/// Reads the feed until it holds `want` events (the sequencer numbers them after commit).
async fn feed_ids(store: &PgStore, want: usize) -> Result<BTreeMap<(String, u64), usize>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut counts = BTreeMap::new();
        let mut after = 0;
        loop {
            let page = store.feed_after(after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.pos;
            for e in &page {
                *counts
                    .entry((e.event.site.clone(), e.event.seq))
                    .or_insert(0) += 1;
            }
        }
        let total: usize = counts.values().sum();
        if total >= want || Instant::now() > deadline {
            return Ok(counts);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Goal: a database central cannot use is refused at open with an error that says why, and
/// changes nothing; three nodes opening a fresh database at once migrate it once. Method: a URL
/// that does not parse, a port where nothing listens, a database made read-only, one with
/// `synchronous_commit = off`, one whose schema version is from a newer build, and three
/// concurrent opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_refuses_what_it_cannot_use() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: open refusals")? else {
        return Ok(());
    };
    match PgStore::open(&opts("postgresql://u@127.0.0.1:notaport/db")).await {
        Err(PgOpenError::Url(_)) => {}
        other => bail!("a bad URL must be refused as such: {other:?}"),
    }
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let t = Instant::now();
    match PgStore::open(&opts(&format!(
        "postgresql://outpost@127.0.0.1:{dead}/postgres"
    )))
    .await
    {
        Err(e @ PgOpenError::Unreachable(_)) => {
            println!("unreachable: {e} ({:?})", t.elapsed());
            ensure!(e.to_string().starts_with("cannot reach PostgreSQL"));
        }
        other => bail!("a dead server must be refused as unreachable: {other:?}"),
    }

    let ro = pg.create_db("ro")?;
    sql(
        &pg.url(),
        "ALTER DATABASE ro SET default_transaction_read_only = on",
    )
    .await?;
    match PgStore::open(&opts(&ro)).await {
        Err(e @ PgOpenError::ReadOnly) => println!("read-only: {e}"),
        other => bail!("a read-only database must be refused: {other:?}"),
    }

    let lax = pg.create_db("lax")?;
    sql(&pg.url(), "ALTER DATABASE lax SET synchronous_commit = off").await?;
    match PgStore::open(&opts(&lax)).await {
        Err(e @ PgOpenError::NotDurable) => println!("not durable: {e}"),
        other => bail!("synchronous_commit=off must be refused: {other:?}"),
    }

    let newer = pg.create_db("newer")?;
    PgStore::open(&opts(&newer)).await?;
    sql(&newer, "UPDATE outpost_schema SET version = 99").await?;
    match PgStore::open(&opts(&newer)).await {
        Err(e @ PgOpenError::SchemaTooNew { found: 99, .. }) => println!("too new: {e}"),
        other => bail!("a newer schema must be refused: {other:?}"),
    }

    let fresh = pg.create_db("fresh")?;
    let opens: Vec<_> = (0..3)
        .map(|_| {
            let o = opts(&fresh);
            tokio::spawn(async move { PgStore::open(&o).await })
        })
        .collect();
    for o in opens {
        o.await??;
    }
    let (client, conn) = tokio_postgres::connect(&fresh, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let v: i32 = client
        .query_one("SELECT version FROM outpost_schema", &[])
        .await?
        .get(0);
    ensure!(v == SCHEMA_VERSION, "schema version {v}");
    let newer_v: i32 = {
        let (c, conn) = tokio_postgres::connect(&newer, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.query_one("SELECT version FROM outpost_schema", &[])
            .await?
            .get(0)
    };
    ensure!(
        newer_v == 99,
        "the newer database was left alone: {newer_v}"
    );
    Ok(())
}

/// Goal: with three central nodes granting and taking back allowances of the same pools at once,
/// no pool is ever granted beyond its total, and what the sites hold adds up to what the pools
/// say is granted. Method: three stores (three connection pools, as three nodes) on one
/// database; two pools of 400 units; six tasks draw random grants (1–25 units, more asked in
/// all than the pools hold) and returns; halfway, the ERP raises one pool by 100; the test
/// keeps its own account of what each grant and return answered and compares it with the
/// database at the end. Seed: `OUTPOST_ESCROW_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_granting_at_once_never_oversell() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: escrow across nodes")? else {
        return Ok(());
    };
    let seed: u64 = std::env::var("OUTPOST_ESCROW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_207);
    println!("seed {seed} (OUTPOST_ESCROW_SEED={seed} replays the draws)");
    let url = pg.create_db("escrow")?;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(PgStore::open(&opts(&url)).await?);
    }
    for pool in ["sku-1", "sku-2"] {
        nodes[0].set_pool_total(pool, 400).await?;
    }
    const OPS: usize = 250;
    // A watcher reads each pool's row while the grants run: never past its total, at any moment
    // (one row is read consistently).
    let (done_tx, done_rx) = watch::channel(false);
    let watcher = {
        let node = nodes[2].clone();
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !*done_rx.borrow() {
                for pool in ["sku-1", "sku-2"] {
                    let f = node.pool_figures(pool).await?.context("pool")?;
                    ensure!(
                        f.granted <= f.total,
                        "{pool} granted {} of {} mid-run",
                        f.granted,
                        f.total
                    );
                    reads += 1;
                }
            }
            Ok::<u64, anyhow::Error>(reads)
        })
    };
    let mut tasks = Vec::new();
    for t in 0..6usize {
        let node = nodes[t % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t as u64));
            // (pool, site) -> units held by the test's account; units asked for.
            let mut held: BTreeMap<(String, String), i64> = BTreeMap::new();
            let mut asked = 0i64;
            for i in 0..OPS {
                let pool = if rng.random_bool(0.5) {
                    "sku-1"
                } else {
                    "sku-2"
                };
                let site = format!("site-{}", rng.random_range(0..4));
                if t == 0 && i == OPS / 2 {
                    node.set_pool_total("sku-1", 500).await?;
                }
                if rng.random_bool(0.7) {
                    let want = rng.random_range(1..=25);
                    asked += want;
                    let got = node.grant(pool, &site, want).await?;
                    ensure!((0..=want).contains(&got), "granted {got} of {want}");
                    *held.entry((pool.to_string(), site)).or_insert(0) += got;
                } else {
                    let qty = rng.random_range(1..=25);
                    let back = node.give_back(pool, &site, qty).await?;
                    ensure!((0..=qty).contains(&back), "returned {back} of {qty}");
                    *held.entry((pool.to_string(), site)).or_insert(0) -= back;
                }
            }
            Ok::<_, anyhow::Error>((held, asked))
        }));
    }
    let mut account: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut asked = 0;
    for t in tasks {
        let (held, a) = t.await??;
        asked += a;
        for (k, v) in held {
            *account.entry(k).or_insert(0) += v;
        }
    }
    done_tx.send(true)?;
    let reads = watcher.await??;
    println!("the watcher read the pools {reads} times while the grants ran");
    let mut oversold = 0;
    for (pool, total) in [("sku-1", 500), ("sku-2", 400)] {
        let f = nodes[1].pool_figures(pool).await?.context("pool exists")?;
        let holdings = nodes[2].holdings(pool).await?;
        let sum: i64 = holdings.iter().map(|(_, h)| h).sum();
        println!(
            "{pool}: total {} granted {} held by sites {sum} ({holdings:?})",
            f.total, f.granted
        );
        ensure!(f.total == total);
        oversold += (f.granted - f.total).max(0);
        ensure!(
            sum == f.granted,
            "{pool}: sites hold {sum}, pool says {}",
            f.granted
        );
        for (site, h) in holdings {
            let mine = account
                .get(&(pool.to_string(), site.clone()))
                .copied()
                .unwrap_or(0);
            ensure!(h == mine, "{pool}/{site}: database {h}, answers {mine}");
        }
    }
    println!("asked {asked} units in all against 900; oversold {oversold}");
    ensure!(
        asked > 900,
        "the draws must ask for more than the pools hold"
    );
    ensure!(oversold == 0, "oversold {oversold} units");
    Ok(())
}

/// Goal: an upload that was answered is in the database after the server crashes, and the mark
/// with it. Method: 100 events uploaded; the server stopped in immediate mode (no checkpoint,
/// as a crash); started again; a new store reads the mark and the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_upload_survives_a_server_crash() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: crash durability")? else {
        return Ok(());
    };
    let store = PgStore::open(&opts(&pg.url())).await?;
    for b in 0..4u64 {
        store
            .upload("plant-1", batch("plant-1", b * 25 + 1..=b * 25 + 25))
            .await?;
    }
    pg.stop_immediate()?;
    pg.restart()?;
    let store = PgStore::open(&opts(&pg.url())).await?;
    ensure!(store.site_hwm("plant-1").await? == 100);
    let (stop, stopped) = watch::channel(false);
    let _seq = store.spawn_sequencer(stopped);
    let ids = feed_ids(&store, 100).await?;
    ensure!(ids.len() == 100 && ids.values().all(|n| *n == 1), "{ids:?}");
    drop(stop);
    Ok(())
}

/// Goal: while the database is down an upload is refused with a reason (so the agent backs off
/// and re-sends), never answered; once it is back, the re-sent batch is stored exactly once.
/// Method: 10 events stored; the server stopped; the next batch refused within the connect
/// limit; the server started again; the same batch re-sent with an overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_refused_while_the_database_is_down() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: database down")? else {
        return Ok(());
    };
    let store = PgStore::open(&opts(&pg.url())).await?;
    store.upload("plant-1", batch("plant-1", 1..=10)).await?;
    pg.stop_immediate()?;
    let t = Instant::now();
    match store.upload("plant-1", batch("plant-1", 11..=20)).await {
        Err(e @ UploadError::Unavailable(_)) => println!("refused in {:?}: {e}", t.elapsed()),
        other => bail!("an upload with the database down must be refused: {other:?}"),
    }
    ensure!(t.elapsed() < Duration::from_secs(30), "refused promptly");
    pg.restart()?;
    let u = store.upload("plant-1", batch("plant-1", 5..=20)).await?;
    ensure!(
        (u.duplicates, u.stored, u.new_hwm) == (6, 10, 20),
        "the re-sent batch stores its new tail once: {u:?}"
    );
    Ok(())
}

/// Goal: with a synchronous standby, SIGKILL of the primary and promotion of the standby lose no
/// answered upload, and the store (given both hosts, `target_session_attrs=read-write`) serves
/// again on its own. Method: primary plus a standby made with pg_basebackup and made
/// synchronous; four sites upload continuously and record what was answered; the primary's
/// postmaster is SIGKILLed and the standby promoted; uploads go on (a refused one is re-sent, as
/// an agent does); the new primary's feed holds every answered event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_synchronous_standby_loses_no_answered_upload() -> Result<()> {
    let Some(primary) = PgCluster::start("PostgreSQL store: failover")? else {
        return Ok(());
    };
    let standby = PgCluster::standby_of(&primary)?;
    // Only once the standby runs: set earlier, every commit would wait for a standby.
    sql(
        &primary.url(),
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
    )
    .await?;
    sql(&primary.url(), "SELECT pg_reload_conf()").await?;
    // The standby is synchronous once the primary says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, conn) = tokio_postgres::connect(&primary.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                &[],
            )
            .await?
            .get(0);
        if n == 1 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the standby never became synchronous"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!(
        "postgresql://outpost@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let store = PgStore::open(&opts(&url)).await?;
    let (stop_tx, stop) = watch::channel(false);
    let mut writers = Vec::new();
    for s in 0..4 {
        let store = store.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let site = format!("site-{s}");
            // Highest seq answered, and when an upload was last refused / first answered again.
            let mut answered = 0u64;
            let mut last_refused: Option<Instant> = None;
            let mut back_after_refusal: Option<Instant> = None;
            let deadline = Instant::now() + Duration::from_secs(90);
            while !*stop.borrow() && Instant::now() < deadline {
                let from = answered + 1;
                match store.upload(&site, batch(&site, from..=from + 9)).await {
                    Ok(u) => {
                        answered = u.new_hwm;
                        if last_refused.is_some() && back_after_refusal.is_none() {
                            back_after_refusal = Some(Instant::now());
                        }
                    }
                    Err(UploadError::Unavailable(_)) => {
                        last_refused = Some(Instant::now());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            Ok::<_, anyhow::Error>((site, answered, back_after_refusal))
        }));
    }
    // Let the writers run, then lose the primary's machine.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    primary.kill9()?;
    standby.promote()?;
    println!("standby promoted {:?} after the kill", killed.elapsed());
    // Uploads must be answered again on the new primary.
    let served = Instant::now();
    loop {
        match store.upload("probe", batch("probe", 1..=1)).await {
            Ok(_) => break,
            Err(e) => {
                ensure!(
                    served.elapsed() < Duration::from_secs(30),
                    "not serving 30 s after the promotion: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    println!("serving again {:?} after the kill", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(true)?;
    let mut want = 1usize; // the probe
    let mut sites = Vec::new();
    let mut interrupted = 0;
    for w in writers {
        let (site, answered, back) = w.await??;
        want += answered as usize;
        sites.push((site, answered));
        interrupted += usize::from(back.is_some());
    }
    println!("{interrupted} of 4 writers had an upload refused by the failover and carried on");
    ensure!(
        interrupted > 0,
        "the kill interrupted no writer: the test did not test a failover under load"
    );
    let (seq_stop, seq_stopped) = watch::channel(false);
    let _seq = store.spawn_sequencer(seq_stopped);
    let ids = feed_ids(&store, want).await?;
    let mut marks = 1usize; // the probe
    for (site, answered) in &sites {
        // An upload refused because the primary died after its commit may be on the standby:
        // the mark may be past what was answered, never short of it.
        let mark = store.site_hwm(site).await?;
        ensure!(
            mark >= *answered,
            "{site}: answered through {answered}, the new primary's mark is {mark}"
        );
        marks += mark as usize;
        for seq in 1..=mark {
            ensure!(
                ids.get(&(site.clone(), seq)) == Some(&1),
                "{site} seq {seq}: {:?} times in the new primary's feed",
                ids.get(&(site.clone(), seq))
            );
        }
    }
    let total: usize = ids.values().sum();
    ensure!(
        total == marks,
        "feed holds {total}, the marks say {marks} (answered {want})"
    );
    println!("answered {sites:?}; all {want} in the new primary's feed exactly once");
    drop(seq_stop);
    Ok(())
}

fn price(sku: &str, units: i64) -> MasterChange {
    MasterChange::Price(PriceRecord {
        sku: sku.into(),
        customer: None,
        unit_price: Money(units),
        currency: "EUR".into(),
    })
}

/// Goal: master changes written by three nodes at once get consecutive revisions, each change
/// once and each batch's changes together in its order; every node learns of the others'
/// revisions through the database, within about a notification (LISTEN/NOTIFY), not its poll.
/// Method: three stores on one database, each with its listener, whose poll is set to an hour so
/// that only a notification can deliver a revision; 3 × 20 batches of 3 prices written
/// concurrently; the change log read back; then one node writes and each other node's watched
/// revision must show it (within 10 s; the time is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_write_master_data_in_order_and_hear_of_each_other() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: master data across nodes")? else {
        return Ok(());
    };
    let mut nodes = Vec::new();
    let (stop, stopped) = watch::channel(false);
    let mut listeners = Vec::new();
    for _ in 0..3 {
        let n = PgStore::open(&opts(&pg.url())).await?;
        listeners.push(n.spawn_listener_polling(stopped.clone(), Duration::from_secs(3600)));
        nodes.push(n);
    }
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..20 {
                let batch: Vec<MasterChange> = (0..3)
                    .map(|k| price(&format!("N{i}-B{b:02}-K{k}"), 1))
                    .collect();
                node.upsert_master(batch).await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let log = nodes[0].changes_after(0, 1000).await?;
    let revs: Vec<u64> = log.iter().map(|(r, _)| *r).collect();
    ensure!(
        revs == (1..=180).collect::<Vec<u64>>(),
        "revisions {revs:?}"
    );
    for chunk in log.chunks(3) {
        let skus: Vec<String> = chunk
            .iter()
            .map(|(_, c)| match c {
                MasterChange::Price(p) => p.sku.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        let stem = &skus[0][..skus[0].len() - 1];
        ensure!(
            skus.iter()
                .enumerate()
                .all(|(k, s)| *s == format!("{stem}{k}")),
            "a batch's changes stay together and in order: {skus:?}"
        );
    }

    // Wake-ups: node 0 writes; nodes 1 and 2 must see the revision well before their poll.
    let mut w1 = nodes[1].watch_revision();
    let mut w2 = nodes[2].watch_revision();
    for w in [&mut w1, &mut w2] {
        tokio::time::timeout(Duration::from_secs(10), w.wait_for(|r| *r >= 180)).await??;
    }
    let t = Instant::now();
    let wrote = nodes[0].upsert_master(vec![price("WAKE", 2)]).await?;
    let mut took = Vec::new();
    for w in [&mut w1, &mut w2] {
        tokio::time::timeout(
            Duration::from_secs(10),
            w.wait_for(|r| *r >= wrote.revision),
        )
        .await
        .context("a node did not hear of the revision: LISTEN/NOTIFY is not working")??;
        took.push(t.elapsed());
    }
    println!(
        "other nodes heard of revision {} after {took:?}",
        wrote.revision
    );
    drop(stop);
    drop(listeners);
    Ok(())
}

/// Goal: a commit the synchronous standby does not confirm is neither answered nor left hanging
/// (the server does not bound that wait): it is refused after the store's limit, and the re-sent
/// batch is stored once. Method: `synchronous_standby_names` names a standby that does not
/// exist, so every commit waits; the limit is 1 s; the upload must come back refused within
/// 30 s, not answered. The standby requirement lifted, the re-sent batch finds the events
/// already there (committed locally meanwhile) and stores nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_standby_has_not_confirmed_is_not_answered() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: unconfirmed commit")? else {
        return Ok(());
    };
    let o = PgOptions {
        statement_timeout: Duration::from_secs(1),
        ..opts(&pg.url())
    };
    let store = PgStore::open(&o).await?;
    store.upload("plant-1", batch("plant-1", 1..=5)).await?;
    sql(&pg.url(), "CREATE TABLE probe (n int)").await?;
    sql(
        &pg.url(),
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
    )
    .await?;
    sql(&pg.url(), "SELECT pg_reload_conf()").await?;
    // The server applies the setting a moment after the reload: wait until a commit waits.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        let commit = c.batch_execute("INSERT INTO probe VALUES (1)");
        let waited = tokio::time::timeout(Duration::from_millis(500), commit)
            .await
            .is_err();
        drop(c);
        driver.abort();
        if waited {
            break;
        }
        ensure!(Instant::now() < deadline, "commits never started waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let up = tokio::time::timeout(
        Duration::from_secs(30),
        store.upload("plant-1", batch("plant-1", 6..=15)),
    )
    .await
    .context("the upload hung on the unconfirmed commit")?;
    match up {
        Err(e @ UploadError::Unavailable(_)) => println!("refused after {:?}: {e}", t.elapsed()),
        other => bail!("an unconfirmed commit must not be answered: {other:?}"),
    }
    sql(&pg.url(), "ALTER SYSTEM RESET synchronous_standby_names").await?;
    sql(&pg.url(), "SELECT pg_reload_conf()").await?;
    let u = store.upload("plant-1", batch("plant-1", 6..=15)).await?;
    println!("re-sent: {u:?}");
    ensure!(u.new_hwm == 15 && u.duplicates + u.stored == 10, "{u:?}");
    ensure!(store.site_hwm("plant-1").await? == 15);
    Ok(())
}

/// Goal: a site revoked through one node is known to every other node at once, so whichever
/// holds its live session can close it; a NOTIFY from anyone else for a site that is not on the
/// list closes nothing. Method: three stores with listeners (polls an hour long); every node's
/// revocation stream after its start-up resync must yield the site revoked on node 0;
/// then a bare `NOTIFY outpost_revoked, 'plant-9'` (not revoked) followed by a real revocation
/// of plant-3: the streams yield plant-3 and never plant-9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_node() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: revocations across nodes")? else {
        return Ok(());
    };
    let (stop, stopped) = watch::channel(false);
    let mut nodes = Vec::new();
    let mut streams = Vec::new();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        let n = PgStore::open(&opts(&pg.url())).await?;
        let mut s = n.revocations();
        listeners.push(n.spawn_listener_polling(stopped.clone(), Duration::from_secs(3600)));
        // The listener says Resync once it listens: from then on nothing is missed.
        let first = tokio::time::timeout(Duration::from_secs(10), s.next()).await?;
        ensure!(first == Some(Revocation::Resync), "{first:?}");
        streams.push(s);
        nodes.push(n);
    }
    let t = Instant::now();
    nodes[0].revoke_site("plant-1", "stolen".into()).await?;
    // Every node, the one that revoked included: its listener hears its own commit.
    for s in streams.iter_mut() {
        let got = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .context("a node did not hear of the revocation")?;
        ensure!(got == Some(Revocation::Site("plant-1".into())), "{got:?}");
    }
    println!("every node heard of the revocation after {:?}", t.elapsed());
    sql(&pg.url(), "NOTIFY outpost_revoked, 'plant-9'").await?;
    nodes[2].revoke_site("plant-3", "audit".into()).await?;
    for s in streams.iter_mut() {
        let got = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .context("a node did not hear of the revocation")?;
        ensure!(
            got == Some(Revocation::Site("plant-3".into())),
            "a forged notification must close nothing: {got:?}"
        );
    }
    drop(stop);
    drop(listeners);
    Ok(())
}

/// Goal: with three nodes each uploading and each running the feed sequencer, a reader paging
/// the feed meanwhile sees every committed event exactly once, at dense positions 1..=n, and
/// each site's events in seq order. Method: three stores (three pools) on one database, each
/// with its sequencer; 6 sites (two per node) upload 40 batches of 25 concurrently; a reader on
/// a fourth store pages with a page of 53 until it has all 6,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sequencing_nodes_never_skip_or_repeat_a_feed_position() -> Result<()> {
    let Some(pg) = PgCluster::start("PostgreSQL store: sequencers on several nodes")? else {
        return Ok(());
    };
    let (stop, stopped) = watch::channel(false);
    let mut nodes = Vec::new();
    let mut sequencers = Vec::new();
    for _ in 0..3 {
        let n = PgStore::open(&opts(&pg.url())).await?;
        sequencers.push(n.spawn_sequencer(stopped.clone()));
        nodes.push(n);
    }
    const BATCHES: u64 = 40;
    const PER: u64 = 25;
    let want = 6 * BATCHES * PER;
    let reader = PgStore::open(&opts(&pg.url())).await?;
    let read = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen: Vec<(u64, String, u64)> = Vec::new();
        while (seen.len() as u64) < want {
            ensure!(Instant::now() < deadline, "read {} of {want}", seen.len());
            let after = seen.last().map_or(0, |e| e.0);
            let page = reader.feed_after(after, 53).await?;
            if page.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen.extend(page.into_iter().map(|e| (e.pos, e.event.site, e.event.seq)));
        }
        Ok::<_, anyhow::Error>(seen)
    });
    let mut writers = Vec::new();
    for s in 0..6usize {
        let node = nodes[s % 3].clone();
        writers.push(tokio::spawn(async move {
            let site = format!("site-{s}");
            for b in 0..BATCHES {
                let first = b * PER + 1;
                node.upload(&site, batch(&site, first..=first + PER - 1))
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let seen = read.await??;
    let positions: Vec<u64> = seen.iter().map(|e| e.0).collect();
    ensure!(
        positions == (1..=want).collect::<Vec<u64>>(),
        "positions are not exactly 1..={want}"
    );
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for (_, site, seq) in &seen {
        let n = next.entry(site.clone()).or_insert(1);
        ensure!(*seq == *n, "{site}: seq {seq} where {n} was due");
        *n += 1;
    }
    println!("{want} events from 6 sites through 3 sequencing nodes, each once, in order");
    drop(stop);
    drop(sequencers);
    Ok(())
}
