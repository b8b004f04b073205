//! Clock faults over real processes: agents run under libfaketime (`LD_PRELOAD`) with their wall
//! clock hours ahead of or behind central's, and jump back across a restart. Ordering and
//! deduplication must not depend on wall clocks (ARCHITECTURE.md, "Time"); central must report
//! each site's clock offset. Needs the Debian package `faketime` (`.ci/test` installs it;
//! `OUTPOST_LIBFAKETIME` points at another copy of the library); without it the tests skip
//! through `outpost_tests::skip`, which fails them under `CI=true`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use outpost_tests::*;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The clock skew applied to a site, in ms.
const SKEW_MS: i64 = 3 * 3_600_000;
/// How far a measured offset may be from the applied skew: process start-up, the round trip and
/// the test's own reads, with a wide margin.
const TOLERANCE_MS: i64 = 2 * 60_000;
const MILESTONES: [&str; 5] = ["picked", "packed", "loaded", "departed", "delivered"];

/// The preload library, or `None` after `outpost_tests::skip` (which fails the test under CI).
fn libfaketime() -> Option<PathBuf> {
    outpost_tests::libfaketime("the clock-fault tests")
}

/// Env that shifts an agent's wall clock by `offset` (libfaketime syntax, e.g. "+3h") while
/// leaving the monotonic clock alone, so its timers, timeouts and QUIC still run in real time.
fn faked(lib: &Path, offset: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME", offset.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        // The name libfaketime releases before 0.9.9 read.
        ("DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn ms_of(v: &Value) -> Result<i64> {
    let s = v.as_str().with_context(|| format!("timestamp: {v}"))?;
    let t = OffsetDateTime::parse(s, &Rfc3339).with_context(|| format!("RFC 3339: {s:?}"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Posts `n` writes to one agent, one at a time, alternating orders (each with an
/// Idempotency-Key, every third retried with it) and milestones (every fourth retried with the
/// same event id). Returns the ids central's feed will show, in submission order.
async fn write_some(a: &Api, prefix: &str, n: usize) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..n {
        if i % 2 == 0 {
            let body = json!({"customer_id": "ACME",
                              "lines": [{"sku": "BOLT-M8", "qty": 1 + i as i64 % 5}]});
            let key = format!("{prefix}-k{i}");
            let r = a.post("/v1/orders", &body, Some(&key)).await?;
            ensure!(r.status == 201, "order {key}: {} {}", r.status, r.body);
            if i % 3 == 0 {
                let again = a.post("/v1/orders", &body, Some(&key)).await?;
                ensure!(
                    again.status == 201 && again.body == r.body,
                    "a retry of {key} answers the original: {} {}",
                    again.status,
                    again.body
                );
            }
            ids.push(r.body["order_id"].as_str().context("order_id")?.to_string());
        } else {
            let id = format!("{prefix}-m{i}");
            let body = json!({"event_id": id, "milestone": MILESTONES[i % 5],
                              "scanner_id": "clock-scanner", "at": "2026-11-27T03:00:00Z"});
            let path = format!("/v1/shipments/SHT-{}/milestones", i / 4);
            let r = a.post(&path, &body, None).await?;
            ensure!(r.status == 201, "milestone {id}: {} {}", r.status, r.body);
            if i % 4 == 1 {
                let again = a.post(&path, &body, None).await?;
                ensure!(
                    again.status == 200 && again.body == r.body,
                    "a retry of {id} answers the original: {} {}",
                    again.status,
                    again.body
                );
            }
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Checks that `site`'s entries in the feed are exactly `ids`, once each, in submission order
/// by seq and by cursor, and returns each entry's `site_time` in ms.
fn check_order(feed: &[Value], site: &str, ids: &[String]) -> Result<Vec<i64>> {
    let mine: Vec<&Value> = feed.iter().filter(|e| e["site"] == site).collect();
    let got: Vec<&str> = mine
        .iter()
        .map(|e| e["id"].as_str().unwrap_or("?"))
        .collect();
    ensure!(
        got == ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "{site}: central's feed (cursor order) is {got:?}, submitted {ids:?}"
    );
    let seqs: Vec<u64> = mine
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect();
    ensure!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{site}: seqs in submission order strictly increase: {seqs:?}"
    );
    mine.iter().map(|e| ms_of(&e["site_time"])).collect()
}

/// Checks every `site_time` lies within `TOLERANCE_MS` of real time shifted by `skew_ms`, in
/// [from, to]: proof that the clock fault really applied to the process.
fn check_skewed(times: &[i64], skew_ms: i64, from: i64, to: i64, what: &str) -> Result<()> {
    for t in times {
        ensure!(
            *t >= from + skew_ms - TOLERANCE_MS && *t <= to + skew_ms + TOLERANCE_MS,
            "{what}: site_time {t} is not real time {from}..{to} shifted by {skew_ms} ms; is \
             libfaketime in effect?"
        );
    }
    Ok(())
}

/// The `clock_offset_ms` central reports for `site` in `GET /v1/sites`. Contract: one object per
/// site with `clock_offset_ms`, an integer (agent clock minus central clock, in ms, estimated
/// from the Hello's `agent_time_ms`) or null when unknown.
async fn clock_offset(c: &Api, site: &str) -> Result<Option<i64>> {
    let r = c.get("/v1/sites").await?;
    ensure!(r.status == 200, "GET /v1/sites: {} {}", r.status, r.body);
    let row = r
        .body
        .as_array()
        .and_then(|a| a.iter().find(|s| s["site"] == site))
        .with_context(|| format!("no row for {site} in GET /v1/sites: {}", r.body))?;
    let v = row
        .get("clock_offset_ms")
        .with_context(|| format!("GET /v1/sites has no clock_offset_ms for {site}: {row}"))?;
    match v {
        Value::Null => Ok(None),
        v => v
            .as_i64()
            .map(Some)
            .with_context(|| format!("clock_offset_ms is an integer or null: {row}")),
    }
}

/// Waits until central reports an offset for `site` within `TOLERANCE_MS` of `want_ms`.
async fn wait_offset(c: &Api, site: &str, want_ms: i64) -> Result<()> {
    let last = std::cell::Cell::new(None);
    let r = eventually(
        &format!("{site}'s clock_offset_ms near {want_ms}"),
        CONVERGE_TIMEOUT,
        || async {
            let got = clock_offset(c, site).await?;
            last.set(got);
            Ok(got
                .is_some_and(|o| (o - want_ms).abs() <= TOLERANCE_MS)
                .then_some(()))
        },
    )
    .await;
    r.with_context(|| format!("last clock_offset_ms of {site}: {:?}", last.get()))
}

/// Goal: a site whose wall clock is hours off still syncs, its events keep their submission
/// order at central whatever their timestamps say (also when its clock jumps six hours back
/// across a restart), retries still deduplicate, and central reports each site's clock offset.
/// Method: central on the real clock; plant-1's agent under libfaketime at +3 h, plant-2's on
/// the real clock. Post 30 writes at plant-1 and 10 at plant-2 (some retried), wait for the
/// outboxes to drain, check the feed (ids once each, in submission order by seq and cursor, and
/// `site_time` shifted by the skew, which proves the fault applied), and `clock_offset_ms` in
/// `GET /v1/sites` (+3 h and 0, ±2 min). Then restart plant-1 at -3 h on the same data
/// directory, post 30 more, and check again: the new events come after the old ones although
/// their timestamps are six hours earlier, and the offset now reads -3 h.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_site_clocks_keep_sync_order_and_are_reported() -> Result<()> {
    let Some(lib) = libfaketime() else {
        return Ok(());
    };
    let fleet = Fleet::init(2)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let c = Api::new(&central);
    let mut env = fast_agent_env();
    env.extend(faked(&lib, "+3h"));
    let mut ahead = fleet.start_agent("plant-1", &quic, &env)?;
    let control = fleet.start_agent("plant-2", &quic, &fast_agent_env())?;
    let (a1, a2) = (Api::new(&ahead), Api::new(&control));
    let rev = push_demo_master(&c, &["plant-1", "plant-2"]).await?;
    // Master data flows down to the skewed site too.
    wait_master(&a1, rev).await?;
    wait_master(&a2, rev).await?;

    let t0 = now_ms();
    let mut ids1 = write_some(&a1, "ahead", 30).await?;
    let ids2 = write_some(&a2, "control", 10).await?;
    let t1 = now_ms();
    wait_drained(&a1).await?;
    wait_drained(&a2).await?;
    let feed = read_feed(&c).await?;
    let times1 = check_order(&feed, "plant-1", &ids1)?;
    let times2 = check_order(&feed, "plant-2", &ids2)?;
    check_skewed(&times1, SKEW_MS, t0, t1, "plant-1 at +3h")?;
    check_skewed(&times2, 0, t0, t1, "plant-2 on the real clock")?;
    let offsets_ahead = (
        wait_offset(&c, "plant-1", SKEW_MS).await,
        wait_offset(&c, "plant-2", 0).await,
    );

    // The clock jumps six hours back across a restart on the same data directory.
    ensure!(ahead.terminate()?, "plant-1 exits cleanly on SIGTERM");
    drop(ahead);
    let mut env = fast_agent_env();
    env.extend(faked(&lib, "-3h"));
    let behind = fleet.start_agent("plant-1", &quic, &env)?;
    let a1 = Api::new(&behind);
    let t2 = now_ms();
    let more = write_some(&a1, "behind", 30).await?;
    let t3 = now_ms();
    wait_drained(&a1).await?;
    ids1.extend(more);
    let feed = read_feed(&c).await?;
    let times = check_order(&feed, "plant-1", &ids1)?;
    check_skewed(&times[30..], -SKEW_MS, t2, t3, "plant-1 at -3h")?;
    ensure!(
        times[30] < times[29] - SKEW_MS,
        "the later events carry timestamps hours earlier, yet come after in seq order"
    );
    ensure!(
        feed.len() == ids1.len() + ids2.len(),
        "nothing at central that was not written: {} entries for {} writes",
        feed.len(),
        ids1.len() + ids2.len()
    );
    let offset_behind = wait_offset(&c, "plant-1", -SKEW_MS).await;
    eprintln!(
        "clock: plant-1 +3h then -3h, plant-2 real clock: {} + {} writes in submission order; \
         clock_offset_ms now plant-1={:?} plant-2={:?}",
        ids1.len(),
        ids2.len(),
        clock_offset(&c, "plant-1").await.ok().flatten(),
        clock_offset(&c, "plant-2").await.ok().flatten(),
    );
    // The offset contract last, so a missing field does not hide the ordering results above.
    offsets_ahead.0.context("central reports plant-1 at +3h")?;
    offsets_ahead.1.context("central reports plant-2 at 0")?;
    offset_behind.context("central reports plant-1 at -3h after the restart")?;
    drop(behind);
    drop(control);
    Ok(())
}

/// Goal: an agent started with its clock hours off does not reject central's certificate or
/// the session (certificates are backdated by days), and reconnects after central restarts.
/// Method: plant-1 at -3 h and plant-2 at +3 h; both connect; stop central, restart it on the same
/// ports, and check both reconnect and upload a write made while central was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_sites_reconnect_after_central_restarts() -> Result<()> {
    let Some(lib) = libfaketime() else {
        return Ok(());
    };
    let fleet = Fleet::init(2)?;
    let mut central = fleet.start_central(None)?;
    let pinned = central.ready.clone();
    let quic = pinned.quic.clone().context("central quic")?;
    let mut agents = Vec::new();
    for (site, off) in [("plant-1", "-3h"), ("plant-2", "+3h")] {
        let mut env = fast_agent_env();
        env.extend(faked(&lib, off));
        agents.push((site, fleet.start_agent(site, &quic, &env)?));
    }
    let rev = push_demo_master(&Api::new(&central), &["plant-1", "plant-2"]).await?;
    for (_, p) in &agents {
        wait_master(&Api::new(p), rev).await?;
    }
    ensure!(central.terminate()?, "central exits cleanly on SIGTERM");
    let mut ids = Vec::new();
    for (site, p) in &agents {
        let a = Api::new(p);
        wait_connected(&a, false).await?;
        ids.push((*site, write_some(&a, &format!("{site}-offline"), 4).await?));
    }
    let central = fleet.start_central(Some(&pinned))?;
    let c = Api::new(&central);
    for (_, p) in &agents {
        wait_drained(&Api::new(p)).await?;
    }
    let feed = read_feed(&c).await?;
    for (site, ids) in &ids {
        check_order(&feed, site, ids)?;
    }
    Ok(())
}

/// Goal: an agent whose box boots with its clock reset far into the past (no real-time clock)
/// starts, takes writes, does not connect to central or trust certificate dates meanwhile and
/// says so in its health; once the clock is set right (NTP), without a restart, it connects and
/// delivers every write exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_reset_to_the_past_waits_for_sane_time_without_losing_writes() -> Result<()> {
    let Some(lib) = libfaketime() else {
        return Ok(());
    };
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let c = Api::new(&central);
    // libfaketime reads the shift from this file at every clock read, so the test can set the
    // clock right while the agent runs, like NTP would.
    let clock_file = fleet.path().join("faketime");
    std::fs::write(&clock_file, "-10000d\n")?; // about 27 years back: 1999
    let mut env = fast_agent_env();
    env.extend([
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", clock_file.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ("DONT_FAKE_MONOTONIC", "1".to_string()),
    ]);
    let agent = fleet.start_agent("plant-1", &quic, &env)?;
    let a = Api::new(&agent);
    let h = eventually(
        "the agent distrusts its clock",
        CONVERGE_TIMEOUT,
        || async {
            let h = health(&a).await?;
            Ok((h["clock"]["trusted"] == false).then_some(h))
        },
    )
    .await?;
    let why = h["clock"]["reason"].as_str().unwrap_or("");
    ensure!(
        why.contains("waiting for a sane clock") && why.contains("1999"),
        "health says why: {h}"
    );
    ensure!(h["connected"] == false, "{h}");
    let ids = post_milestones(&a, "rtc-reset", 5).await?;
    let h = health(&a).await?;
    ensure!(h["outbox_depth"] == 5 && h["connected"] == false, "{h}");

    std::fs::write(&clock_file, "+0\n")?;
    wait_drained(&a).await?;
    let h = health(&a).await?;
    ensure!(h["clock"]["trusted"] == true, "{h}");
    let feed = read_feed(&c).await?;
    for id in &ids {
        let n = feed.iter().filter(|e| e["id"] == id.as_str()).count();
        ensure!(n == 1, "{id} is in central's feed {n} times");
    }
    Ok(())
}
