//! The scenarios of `outpost-bench`: each starts its own fleet (central and one agent on a temp
//! dir), measures, and returns its figures. Every wait is bounded; processes stop on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Figure;
use super::load::{LoadResult, get_request, http_load, http_load_n, post_json};
use super::sys::{FsyncProbe, Usage, cpu_secs, fsync_probe, us};
use crate::{Api, Fleet, Proc, UdpProxy, health, wait_connected, wait_master};

/// Sizes and durations of a run.
#[derive(Clone, Copy, Debug)]
pub struct Cfg {
    pub short: bool,
}

impl Cfg {
    /// Length of one timed load measurement.
    pub fn measure(&self) -> Duration {
        if self.short {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }
    }
    fn backlog(&self) -> u64 {
        if self.short { 20_000 } else { 1_000_000 }
    }
    fn skus(&self) -> usize {
        if self.short { 1_000 } else { 100_000 }
    }
    fn customers(&self) -> usize {
        if self.short { 100 } else { 10_000 }
    }
}

const SITE: &str = "plant-1";
/// Central's largest master PUT (`MAX_MASTER_ITEMS` in central/src/api.rs).
const MASTER_CHUNK: usize = 10_000;
const POLL: Duration = Duration::from_millis(10);
/// A central QUIC address nothing listens on (the agent runs alone).
const NO_CENTRAL: &str = "127.0.0.1:9";

fn sku(i: usize) -> String {
    format!("SKU-{i:06}")
}
fn customer(i: usize) -> String {
    format!("C-{i:05}")
}

fn api_addr(p: &Proc) -> Result<SocketAddr> {
    p.ready.api.parse().context("api address")
}

/// Pushes `skus` SKUs (list price + ATP at `site`) and `customers` customers through central's
/// master API in chunks; returns the last revision.
pub async fn push_master(central: &Api, site: &str, skus: usize, customers: usize) -> Result<u64> {
    let mut rev = 0;
    let mut put = async |path: &str, items: Vec<Value>| -> Result<()> {
        for chunk in items.chunks(MASTER_CHUNK) {
            let r = central.put(path, &Value::Array(chunk.to_vec())).await?;
            if r.status != 200 {
                bail!("PUT {path} returned {}: {}", r.status, r.body);
            }
            rev = r.body["revision"].as_u64().context("revision")?;
        }
        Ok(())
    };
    put(
        "/v1/master/prices",
        (0..skus)
            .map(|i| json!({"sku": sku(i), "customer": null, "unit_price": "1.25", "currency": "EUR"}))
            .collect(),
    )
    .await?;
    put(
        "/v1/master/atp",
        (0..skus)
            .map(|i| json!({"sku": sku(i), "site": site, "available": 1000 + i % 1000}))
            .collect(),
    )
    .await?;
    put(
        "/v1/master/customers",
        (0..customers)
            .map(|i| json!({"id": customer(i), "name": format!("Customer {i}"), "credit_limit": "10000", "on_hold": false}))
            .collect(),
    )
    .await?;
    Ok(rev)
}

/// The body of a `picked` milestone with event id `id`.
fn milestone_body(id: &str) -> Vec<u8> {
    format!(r#"{{"event_id":"{id}","milestone":"picked","scanner_id":"scanner-1","at":"2026-11-26T10:00:00Z"}}"#)
        .into_bytes()
}

/// A request maker posting milestones `{prefix}-{n}` to the agent at `host` with `token`:
/// event ids in the order they are sent, as time-ordered ids (UUIDv7, ULID) would be.
fn milestone_requests(
    host: String,
    token: String,
    prefix: &'static str,
) -> impl Fn(u64) -> Vec<u8> {
    move |n| {
        post_json(
            &host,
            &format!("/v1/shipments/SH-{}/milestones", n % 1000),
            Some(&token),
            "",
            &milestone_body(&format!("{prefix}-{n:012}")),
        )
    }
}

/// Like `milestone_requests`, with random-looking 32-hex-digit event ids (as UUIDv4 would be):
/// each insert lands at a random place in the agent's event-id index.
fn random_id_milestone_requests(host: String, token: String) -> impl Fn(u64) -> Vec<u8> {
    fn mix(mut z: u64) -> u64 {
        // splitmix64: distinct inputs give distinct, well-spread outputs.
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    move |n| {
        let id = format!("{:016x}{:016x}", mix(n), mix(n ^ 0x5555_5555_5555_5555));
        post_json(
            &host,
            &format!("/v1/shipments/SH-{}/milestones", n % 1000),
            Some(&token),
            "",
            &milestone_body(&id),
        )
    }
}

/// A request maker alternating ATP and price reads over `skus` SKUs and `customers` customers.
fn read_requests(
    host: String,
    token: String,
    skus: usize,
    customers: usize,
) -> impl Fn(u64) -> Vec<u8> {
    move |n| {
        let i = (n / 2) as usize;
        let path = if n % 2 == 0 {
            format!("/v1/atp/{}", sku(i % skus))
        } else {
            format!(
                "/v1/prices/{}?customer={}",
                sku(i % skus),
                customer(i % customers)
            )
        };
        get_request(&host, &path, Some(&token))
    }
}

/// Latency figures of a load result (`{prefix}.p50` ...), in µs.
fn latency_figs(prefix: &str, r: &LoadResult, goals: [Option<&str>; 3], note: &str) -> Vec<Figure> {
    let mut out = Vec::new();
    for ((q, v), g) in [("p50", r.p50), ("p99", r.p99), ("p999", r.p999)]
        .into_iter()
        .zip(goals)
    {
        let mut f = Figure::new(format!("{prefix}.{q}"), us(v), "µs");
        if let Some(g) = g {
            f = f.goal(g);
        }
        if !note.is_empty() {
            f = f.note(note);
        }
        out.push(f);
    }
    out
}

fn errors_fig(prefix: &str, r: &LoadResult) -> Figure {
    let mut f = Figure::new(format!("{prefix}.errors"), r.errors as f64, "requests");
    if let Some(e) = &r.first_error {
        f = f.note(format!("first error: {e}"));
    }
    f
}

/// Polls `f` every `POLL` until it returns `Some`, for at most `limit`.
async fn poll_until<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        tokio::time::sleep(POLL).await;
    }
}

async fn health_field(agent: &Api, f: &str) -> Option<Value> {
    health(agent).await.ok().map(|h| h[f].clone())
}

/// CPU µs a process spent per operation between two `cpu_secs` samples.
fn cpu_per_op(name: &str, before: Option<f64>, after: Option<f64>, ops: u64) -> Figure {
    let v = match (before, after) {
        (Some(b), Some(a)) if ops > 0 => (a - b) * 1e6 / ops as f64,
        _ => 0.0,
    };
    Figure::new(name, v, "µs/op").note("process CPU (user+system) during the measurement ÷ operations; /proc tick resolution 10 ms")
}

fn probe(dir: &Path, figs: &mut Vec<Figure>, prefix: &str) -> Result<FsyncProbe> {
    let p = fsync_probe(dir).context("fsync probe")?;
    figs.extend(p.figures(&format!("{prefix}.fsync")));
    Ok(p)
}

/// A started fleet: central and one agent (`SITE`).
struct Rig {
    fleet: Fleet,
    usage: Usage,
}

impl Rig {
    fn new() -> Result<Rig> {
        Ok(Rig {
            fleet: Fleet::init(1)?,
            usage: Usage::default(),
        })
    }
    fn sample(&mut self, name: &str, p: &Proc) {
        self.usage.sample(name, p.ready.pid);
    }
    fn agent_dir(&self) -> std::path::PathBuf {
        self.fleet.site(SITE).data_dir.clone()
    }
}

/// `read`: ATP/price reads over the agent's HTTP API at 1 and 64 connections.
pub async fn read(cfg: Cfg) -> Result<Vec<Figure>> {
    let mut rig = Rig::new()?;
    let central = rig.fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let agent = rig.fleet.start_agent(SITE, &quic, &[])?;
    let (skus, custs) = (1_000, 100);
    let rev = push_master(&Api::new(&central), SITE, skus, custs).await?;
    let a = Api::new(&agent);
    wait_master(&a, rev).await?;
    let check = a
        .get(&format!("/v1/prices/{}?customer={}", sku(1), customer(1)))
        .await?;
    if check.status != 200 {
        bail!("price read returned {}: {}", check.status, check.body);
    }
    let addr = api_addr(&agent)?;
    let mk = || read_requests(agent.ready.api.clone(), agent.token.clone(), skus, custs);
    // Warm-up: connections, caches, allocator.
    http_load(addr, 8, Duration::from_millis(300), mk()).await;
    let mut figs = Vec::new();
    let c1 = http_load(addr, 1, cfg.measure(), mk()).await;
    let note = format!(
        "1 keep-alive connection, {:.1} s, ATP and price reads alternating",
        c1.elapsed.as_secs_f64()
    );
    figs.push(Figure::new("read.c1.req_per_s", c1.ok_per_s(), "req/s"));
    figs.extend(latency_figs(
        "read.c1",
        &c1,
        [Some("<= 100"), None, None],
        &note,
    ));
    figs.push(errors_fig("read.c1", &c1));
    let cpu0 = cpu_secs(agent.ready.pid);
    let c64 = http_load(addr, 64, cfg.measure(), mk()).await;
    let cpu1 = cpu_secs(agent.ready.pid);
    let note = "64 keep-alive connections, load generator on the same cores";
    figs.push(
        Figure::new("read.c64.req_per_s", c64.ok_per_s(), "req/s")
            .goal(">= 60000")
            .note(note),
    );
    figs.extend(latency_figs(
        "read.c64",
        &c64,
        [None, Some("<= 1500"), None],
        note,
    ));
    figs.push(errors_fig("read.c64", &c64));
    figs.push(cpu_per_op(
        "read.c64.agent_cpu_us_per_req",
        cpu0,
        cpu1,
        c64.requests,
    ));
    rig.sample("central", &central);
    rig.sample("agent", &agent);
    figs.extend(rig.usage.figures("read"));
    Ok(figs)
}

/// `ingest`: durable milestone ingest over HTTP at 64 connections, central not running.
pub async fn ingest(cfg: Cfg) -> Result<Vec<Figure>> {
    let mut rig = Rig::new()?;
    let agent = rig.fleet.start_agent(SITE, NO_CENTRAL, &[])?;
    let a = Api::new(&agent);
    let r = a
        .post(
            "/v1/shipments/SH-0/milestones",
            &crate::picked_milestone("warm-0"),
            None,
        )
        .await?;
    if r.status / 100 != 2 {
        bail!("milestone post returned {}: {}", r.status, r.body);
    }
    let addr = api_addr(&agent)?;
    http_load(
        addr,
        16,
        Duration::from_millis(300),
        milestone_requests(agent.ready.api.clone(), agent.token.clone(), "warm"),
    )
    .await;
    let mut figs = Vec::new();
    let p = probe(&rig.agent_dir(), &mut figs, "ingest")?;
    let cpu0 = cpu_secs(agent.ready.pid);
    let r = http_load(
        addr,
        64,
        cfg.measure(),
        milestone_requests(agent.ready.api.clone(), agent.token.clone(), "bench"),
    )
    .await;
    let cpu1 = cpu_secs(agent.ready.pid);
    let note = format!(
        "64 conns, unique time-ordered event ids, ack after fsync, central NOT running; {}",
        p.describe()
    );
    figs.push(
        Figure::new("ingest.c64.events_per_s", r.ok_per_s(), "events/s")
            .goal(">= 30000")
            .note(&note),
    );
    figs.extend(latency_figs(
        "ingest.c64",
        &r,
        [None, Some("<= 5000"), None],
        &note,
    ));
    figs.push(errors_fig("ingest.c64", &r));
    figs.push(cpu_per_op(
        "ingest.c64.agent_cpu_us_per_event",
        cpu0,
        cpu1,
        r.requests,
    ));
    // The same load with random event ids (clients using UUIDv4), for the cost of scattered
    // inserts into the event-id index (the store already holds the ordered run above).
    let cpu0 = cpu_secs(agent.ready.pid);
    let r = http_load(
        addr,
        64,
        cfg.measure(),
        random_id_milestone_requests(agent.ready.api.clone(), agent.token.clone()),
    )
    .await;
    let cpu1 = cpu_secs(agent.ready.pid);
    let note = format!(
        "as ingest.c64 with random 32-hex-digit event ids; {}",
        p.describe()
    );
    figs.push(
        Figure::new(
            "ingest.c64_random_ids.events_per_s",
            r.ok_per_s(),
            "events/s",
        )
        .note(&note),
    );
    figs.extend(latency_figs(
        "ingest.c64_random_ids",
        &r,
        [None, None, None],
        &note,
    ));
    figs.push(errors_fig("ingest.c64_random_ids", &r));
    figs.push(cpu_per_op(
        "ingest.c64_random_ids.agent_cpu_us_per_event",
        cpu0,
        cpu1,
        r.requests,
    ));
    rig.sample("agent", &agent);
    figs.extend(rig.usage.figures("ingest"));
    Ok(figs)
}

/// Writes `n` milestones straight into the (stopped) agent's store, 256 in flight.
async fn fill_store(path: &Path, n: u64) -> Result<Duration> {
    use outpost_agent::store::{NewMilestone, Store};
    let t = Instant::now();
    let (store, writer) =
        Store::open(path, SITE).map_err(|e| anyhow::anyhow!("open store: {e}"))?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let workers = 256u64;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let store = store.clone();
        set.spawn(async move {
            let mut i = w;
            while i < n {
                let m = NewMilestone {
                    event_id: format!("bd-{i}"),
                    shipment_id: format!("SH-{}", i % 1000),
                    milestone: outpost_protocol::MilestoneKind::Picked,
                    scanner_id: "scanner-1".to_string(),
                    at: "2026-11-26T10:00:00Z".to_string(),
                };
                store
                    .record_milestone(m, now_ms)
                    .await
                    .map_err(|e| anyhow::anyhow!("record_milestone: {e}"))?;
                i += workers;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    drop(store);
    writer.shutdown().await;
    Ok(t.elapsed())
}

/// `drain`: a backlog in the agent's outbox while central is down, then central starts.
pub async fn drain(cfg: Cfg) -> Result<Vec<Figure>> {
    let n = cfg.backlog();
    let mut rig = Rig::new()?;
    let mut figs = Vec::new();
    // First contact (registration, master) with central up, then both stop.
    let mut central = rig.fleet.start_central(None)?;
    let pinned = central.ready.clone();
    let quic = pinned.quic.clone().context("central quic")?;
    let mut agent = rig.fleet.start_agent(SITE, &quic, &[])?;
    wait_connected(&Api::new(&agent), true).await?;
    rig.sample("agent", &agent);
    agent.terminate()?;
    rig.sample("central", &central);
    central.terminate()?;
    let store_path = rig.agent_dir().join("agent.redb");
    if !store_path.exists() {
        bail!("agent store not at {}", store_path.display());
    }
    let fill = fill_store(&store_path, n).await?;
    figs.push(
        Figure::new(
            "drain.fill_events_per_s",
            n as f64 / fill.as_secs_f64(),
            "events/s",
        )
        .note("in-process Store::record_milestone, 256 in flight, agent stopped (context only)"),
    );
    let agent = rig.fleet.start_agent(SITE, &quic, &[])?;
    let a = Api::new(&agent);
    let depth = health_field(&a, "outbox_depth")
        .await
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if depth < n {
        bail!("outbox depth {depth} after filling {n}");
    }
    let p = probe(&rig.agent_dir(), &mut figs, "drain")?;
    let agent_cpu0 = cpu_secs(agent.ready.pid);
    let t0 = Instant::now();
    let central = rig.fleet.start_central(Some(&pinned))?;
    let central_up = t0.elapsed();
    let limit = if cfg.short {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(180)
    };
    let reconnect = std::cell::Cell::new(None);
    let done = poll_until("outbox drained", limit, || async {
        let h = health(&a).await.ok()?;
        if reconnect.get().is_none() && h["connected"] == Value::Bool(true) {
            reconnect.set(Some(t0.elapsed()));
        }
        (h["outbox_depth"].as_u64() == Some(0)).then(|| t0.elapsed())
    })
    .await?;
    let reconnect = reconnect.get().unwrap_or(done);
    figs.push(cpu_per_op(
        "drain.agent_cpu_us_per_event",
        agent_cpu0,
        cpu_secs(agent.ready.pid),
        n,
    ));
    figs.push(
        cpu_per_op(
            "drain.central_cpu_us_per_event",
            Some(0.0),
            cpu_secs(central.ready.pid),
            n,
        )
        .note("central's whole CPU since its start (start-up included) ÷ events"),
    );
    let c = Api::new(&central);
    let sites = c.get("/v1/sites").await?;
    let acked = crate::as_list(&sites.body)
        .unwrap_or_default()
        .iter()
        .find(|s| s["site"] == SITE)
        .and_then(|s| s["acked_seq"].as_u64())
        .unwrap_or(0);
    let note = format!(
        "{n} events, central started at t0 (ready after {:.2} s); {}",
        central_up.as_secs_f64(),
        p.describe()
    );
    let from_rc = done.saturating_sub(reconnect).as_secs_f64().max(1e-6);
    figs.push(
        Figure::new("drain.secs_from_central_start", done.as_secs_f64(), "s")
            .goal("<= 5")
            .note(&note),
    );
    figs.push(
        Figure::new(
            "drain.events_per_s_from_central_start",
            n as f64 / done.as_secs_f64(),
            "events/s",
        )
        .goal(">= 300000")
        .note(&note),
    );
    figs.push(
        Figure::new(
            "drain.reconnect_secs_after_central_start",
            reconnect.as_secs_f64(),
            "s",
        )
        .note("agent /v1/health connected=true, polled every 10 ms"),
    );
    figs.push(Figure::new("drain.secs_from_reconnect", from_rc, "s"));
    figs.push(
        Figure::new(
            "drain.events_per_s_from_reconnect",
            n as f64 / from_rc,
            "events/s",
        )
        .goal(">= 300000")
        .note(&note),
    );
    figs.push(
        Figure::new("drain.central_acked_seq", acked as f64, "seq")
            .note("central GET /v1/sites acked_seq after the agent's outbox emptied"),
    );
    rig.sample("agent", &agent);
    rig.sample("central", &central);
    figs.extend(rig.usage.figures("drain"));
    Ok(figs)
}

/// `outage`: partition the agent's link (UDP proxy), time detection, heal, time recovery.
pub async fn outage(cfg: Cfg) -> Result<Vec<Figure>> {
    let mut rig = Rig::new()?;
    let central = rig.fleet.start_central(None)?;
    let upstream: SocketAddr = central
        .ready
        .quic
        .clone()
        .context("central quic")?
        .parse()?;
    let proxy = UdpProxy::start(upstream, 1).await?;
    // Default sync settings: no fast_agent_env.
    let agent = rig
        .fleet
        .start_agent(SITE, &proxy.addr().to_string(), &[])?;
    let a = Api::new(&agent);
    wait_connected(&a, true).await?;
    let limit = Duration::from_secs(30);
    let t0 = Instant::now();
    proxy.partition(true);
    let detect = poll_until("connected=false", limit, || async {
        (health_field(&a, "connected").await? == Value::Bool(false)).then(|| t0.elapsed())
    })
    .await?;
    let w = a
        .post(
            "/v1/shipments/SH-outage/milestones",
            &crate::picked_milestone("outage-1"),
            None,
        )
        .await?;
    if w.status / 100 != 2 {
        bail!("write during partition returned {}: {}", w.status, w.body);
    }
    // Stay cut off a while longer so the reconnect backoff grows as in a real outage.
    tokio::time::sleep(if cfg.short {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    })
    .await;
    let held = t0.elapsed();
    let t1 = Instant::now();
    proxy.heal();
    let conn = std::cell::Cell::new(None);
    let acked = poll_until("write acknowledged", limit, || async {
        let h = health(&a).await.ok()?;
        if conn.get().is_none() && h["connected"] == Value::Bool(true) {
            conn.set(Some(t1.elapsed()));
        }
        (h["connected"] == Value::Bool(true) && h["outbox_depth"].as_u64() == Some(0))
            .then(|| t1.elapsed())
    })
    .await?;
    let conn = conn.get().unwrap_or(acked);
    let note = format!(
        "default [sync] config, UDP proxy partition held {:.1} s, health polled every 10 ms",
        held.as_secs_f64()
    );
    let mut figs = vec![
        Figure::new("outage.detect_secs", detect.as_secs_f64(), "s")
            .goal("<= 3")
            .note(&note),
        Figure::new("outage.reconnect_secs_after_heal", conn.as_secs_f64(), "s")
            .goal("<= 1")
            .note(&note),
        Figure::new(
            "outage.write_acked_secs_after_heal",
            acked.as_secs_f64(),
            "s",
        )
        .goal("<= 1")
        .note("a milestone written during the partition: agent outbox_depth back to 0"),
    ];
    rig.sample("agent", &agent);
    rig.sample("central", &central);
    figs.extend(rig.usage.figures("outage"));
    Ok(figs)
}

/// `memory`: agent RSS with a large master cache and a large outbox.
pub async fn memory(cfg: Cfg) -> Result<Vec<Figure>> {
    let (skus, custs, n) = (cfg.skus(), cfg.customers(), cfg.backlog());
    let mut rig = Rig::new()?;
    // 1. Master data through central, applied by the agent.
    let mut central = rig.fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let mut agent = rig.fleet.start_agent(SITE, &quic, &[])?;
    let a = Api::new(&agent);
    let t = Instant::now();
    let rev = push_master(&Api::new(&central), SITE, skus, custs).await?;
    wait_master(&a, rev).await?;
    let master_secs = t.elapsed();
    let rss = |pid: u32, f: &str| super::sys::status_mib(pid, f).unwrap_or(0.0);
    let mut figs = vec![
        Figure::new(
            "memory.master_push_and_sync_secs",
            master_secs.as_secs_f64(),
            "s",
        )
        .note(format!(
            "{skus} SKUs (price + ATP), {custs} customers, PUT in chunks of {MASTER_CHUNK}"
        )),
        Figure::new(
            "memory.agent_peak_rss_master_apply_mib",
            rss(agent.ready.pid, "VmHWM"),
            "MiB",
        )
        .goal("<= 64")
        .note("VmHWM of the agent that received and applied the master data"),
    ];
    rig.sample("agent", &agent);
    agent.terminate()?;
    rig.sample("central", &central);
    central.terminate()?;
    // 2. The outbox: `n` events written straight into the stopped agent's store.
    let fill = fill_store(&rig.agent_dir().join("agent.redb"), n).await?;
    figs.push(
        Figure::new(
            "memory.fill_events_per_s",
            n as f64 / fill.as_secs_f64(),
            "events/s",
        )
        .note("in-process Store::record_milestone, 256 in flight (context only)"),
    );
    // 3. The agent restarted with central down: every SKU read once, then writes for a while.
    let agent = rig.fleet.start_agent(SITE, NO_CENTRAL, &[])?;
    let a = Api::new(&agent);
    let addr = api_addr(&agent)?;
    let reads = http_load_n(
        addr,
        16,
        2 * skus as u64,
        Duration::from_secs(120),
        read_requests(agent.ready.api.clone(), agent.token.clone(), skus, custs),
    )
    .await;
    let writes = http_load(
        addr,
        64,
        cfg.measure(),
        milestone_requests(agent.ready.api.clone(), agent.token.clone(), "mem"),
    )
    .await;
    let depth = health_field(&a, "outbox_depth")
        .await
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let note = format!(
        "{skus} SKUs, {custs} customers cached, outbox depth {depth}; after reading every SKU's \
         ATP and price once and {} more writes at 64 conns (central down)",
        writes.requests
    );
    let pid = agent.ready.pid;
    figs.push(Figure::new("memory.outbox_depth", depth as f64, "events"));
    figs.push(
        Figure::new("memory.agent_rss_mib", rss(pid, "VmRSS"), "MiB")
            .goal("<= 64")
            .note(&note),
    );
    figs.push(
        Figure::new("memory.agent_peak_rss_mib", rss(pid, "VmHWM"), "MiB")
            .goal("<= 64")
            .note("VmHWM of the restarted agent (start-up over the full store, reads, writes)"),
    );
    figs.push(errors_fig("memory.reads", &reads));
    figs.push(errors_fig("memory.writes", &writes));
    rig.sample("agent", &agent);
    figs.extend(rig.usage.figures("memory"));
    Ok(figs)
}

/// The `fsync` scenario: the probe, on the filesystem of the fleets' temp dirs.
pub fn fsync(label: &str) -> Result<(FsyncProbe, Vec<Figure>)> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-bench-fsync")
        .tempdir()?;
    let p = fsync_probe(dir.path())?;
    let figs = p.figures(&format!("fsync.{label}"));
    Ok((p, figs))
}
