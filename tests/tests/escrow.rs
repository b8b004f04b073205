//! Promising offline without overselling, over real processes: allowances (escrow) at the sites
//! against central's own sales channel, partitions through a fault-injecting UDP proxy, SIGKILLed
//! agents, business exceptions and their resolution, dead letters, and reconciliation reports.
//! Each test states its goal and method.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outpost_protocol::{
    AgentMsg, CentralMsg, EventBody, EventEnvelope, LinePromise, Money, Order, OrderLine,
    PROTOCOL_VERSION,
};
use outpost_tests::quic_client::{hello, milestone_event, open, site_client_config};
use outpost_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest a CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// A central, its sites' agents, and one proxy per site between the agent and central.
struct Rig {
    fleet: Fleet,
    central: Proc,
    c: Api,
    proxies: HashMap<String, UdpProxy>,
    agents: HashMap<String, Proc>,
    agent_env: Vec<(&'static str, String)>,
}

impl Rig {
    /// Lays out a fleet of `sites` sites and starts everything, each agent behind its own proxy.
    async fn start(
        sites: usize,
        central_env: &[(&'static str, String)],
        agent_env: &[(&'static str, String)],
        seed: u64,
    ) -> Result<Rig> {
        let fleet = tokio::task::block_in_place(|| Fleet::init(sites))?;
        let mut cenv = fast_central_env();
        cenv.extend(central_env.iter().cloned());
        let central = tokio::task::block_in_place(|| fleet.start_central_with(None, &cenv))?;
        let quic = central.ready.quic.clone().context("central quic address")?;
        let ids: Vec<String> = fleet.sites.iter().map(|s| s.id.clone()).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let proxies = proxies_for(&quic, &refs, seed).await?;
        let mut env = fast_agent_env();
        env.extend(agent_env.iter().cloned());
        let c = Api::new(&central);
        let mut rig = Rig {
            fleet,
            central,
            c,
            proxies,
            agents: HashMap::new(),
            agent_env: env,
        };
        for id in &ids {
            let p = rig.spawn_agent(id)?;
            rig.agents.insert(id.clone(), p);
        }
        Ok(rig)
    }

    fn spawn_agent(&self, site: &str) -> Result<Proc> {
        let addr = self.proxies[site].addr().to_string();
        tokio::task::block_in_place(|| self.fleet.start_agent(site, &addr, &self.agent_env))
    }

    fn site_ids(&self) -> Vec<String> {
        self.fleet.sites.iter().map(|s| s.id.clone()).collect()
    }

    fn api(&self, site: &str) -> Api {
        Api::new(&self.agents[site])
    }

    fn proxy(&self, site: &str) -> &UdpProxy {
        &self.proxies[site]
    }

    /// SIGKILLs a site's agent and starts it again on the same data directory and proxy.
    fn restart(&mut self, site: &str) -> Result<()> {
        let mut old = self.agents.remove(site).context("agent running")?;
        old.kill9()?;
        drop(old);
        let p = self.spawn_agent(site)?;
        self.agents.insert(site.to_string(), p);
        Ok(())
    }
}

/// Prices, customers and ATP for the tests. Customers: ACME (ample credit, own GEAR price),
/// INITECH (credit `initech_credit`), GLOBEX (on hold).
fn catalogue(atp: &[(&str, &str, i64)], initech_credit: &str) -> [(&'static str, Value); 3] {
    let prices = json!([
        {"sku": "BOLT-M8", "customer": null, "unit_price": "0.25", "currency": "EUR"},
        {"sku": "GEAR-12T", "customer": null, "unit_price": "12.50", "currency": "EUR"},
        {"sku": "GEAR-12T", "customer": "ACME", "unit_price": "11.00", "currency": "EUR"},
        {"sku": "PUMP-7", "customer": null, "unit_price": "80.00", "currency": "EUR"},
    ]);
    let customers = json!([
        {"id": "ACME", "name": "Acme Corp", "credit_limit": "50000", "on_hold": false},
        {"id": "INITECH", "name": "Initech", "credit_limit": initech_credit, "on_hold": false},
        {"id": "GLOBEX", "name": "Globex", "credit_limit": "1000", "on_hold": true},
    ]);
    let atp: Vec<Value> = atp
        .iter()
        .map(|(sku, site, n)| json!({"sku": sku, "site": site, "available": n}))
        .collect();
    // ATP last: the top-up that follows it covers the ATP and the credit pools.
    [
        ("/v1/master/prices", prices),
        ("/v1/master/customers", customers),
        ("/v1/master/atp", Value::Array(atp)),
    ]
}

/// Unit price in money units of the catalogue above.
fn unit_price(sku: &str, customer: &str) -> i64 {
    match (sku, customer) {
        ("GEAR-12T", "ACME") => 110_000,
        ("GEAR-12T", _) => 125_000,
        ("BOLT-M8", _) => 2_500,
        ("PUMP-7", _) => 800_000,
        _ => panic!("no price for {sku}"),
    }
}

async fn push(c: &Api, data: &[(&str, Value)]) -> Result<u64> {
    let mut rev = 0;
    for (path, body) in data {
        let r = c.put(path, body).await?;
        ensure!(r.status == 200, "PUT {path}: {} {}", r.status, r.body);
        rev = r.body["revision"].as_u64().context("revision")?;
    }
    Ok(rev)
}

/// Waits until the agent has central's master data through `rev`, holds an allowance of every
/// SKU in `skus`, and holds credit allowances for ACME and INITECH.
async fn settle(a: &Api, rev: u64, skus: &[&str]) -> Result<()> {
    wait_master(a, rev).await?;
    for sku in skus {
        eventually(
            &format!("an allowance of {sku}"),
            CONVERGE_TIMEOUT,
            || async { Ok((allowance(a, sku).await? > 0).then_some(())) },
        )
        .await?;
    }
    eventually("credit allowances", CONVERGE_TIMEOUT, || async {
        let r = a.get("/v1/allowances").await?;
        let text = r.body.to_string();
        Ok((r.status == 200 && text.contains("ACME") && text.contains("INITECH")).then_some(()))
    })
    .await
}

fn order(customer: &str, lines: &[(&str, i64)]) -> Value {
    json!({
        "customer_id": customer,
        "lines": lines.iter().map(|(s, q)| json!({"sku": s, "qty": q})).collect::<Vec<_>>(),
    })
}

/// One line of an order as the site answered it.
#[derive(Clone, Debug, PartialEq)]
struct Line {
    sku: String,
    qty: i64,
    promise: String,
}

impl Line {
    fn confirmed(&self) -> bool {
        self.promise == LinePromise::Confirmed.as_str()
    }
}

const PROMISES: [LinePromise; 4] = [
    LinePromise::Confirmed,
    LinePromise::PendingAllowance,
    LinePromise::PendingCredit,
    LinePromise::PendingHold,
];

/// Checks the shape of an order answer against its request and returns its lines: one line per
/// requested line, a known promise each, a reason on every pending line, and an order `status`
/// that agrees with the lines.
fn lines_of(resp: &Value, req: &Value) -> Result<Vec<Line>> {
    let got = resp["lines"].as_array().context("lines")?;
    let asked = req["lines"].as_array().context("request lines")?;
    ensure!(got.len() == asked.len(), "one answer per line: {resp}");
    let mut out = Vec::new();
    for (g, a) in got.iter().zip(asked) {
        let l = Line {
            sku: g["sku"].as_str().context("sku")?.to_string(),
            qty: g["qty"].as_i64().context("qty")?,
            promise: g["promise"].as_str().context("promise")?.to_string(),
        };
        ensure!(
            l.sku == a["sku"].as_str().unwrap_or("") && Some(l.qty) == a["qty"].as_i64(),
            "line {l:?} answers {a}"
        );
        ensure!(
            PROMISES.iter().any(|p| p.as_str() == l.promise),
            "unknown promise {:?} in {resp}",
            l.promise
        );
        if !l.confirmed() {
            ensure!(
                g["reason"].as_str().is_some_and(|r| !r.trim().is_empty()),
                "a pending line says why: {g}"
            );
        }
        out.push(l);
    }
    let n_conf = out.iter().filter(|l| l.confirmed()).count();
    let want = match n_conf {
        0 => "pending",
        n if n == out.len() => "confirmed",
        _ => "partial",
    };
    ensure!(
        resp["status"] == want,
        "order status must be {want}: {resp}"
    );
    Ok(out)
}

/// Promise names per line, for comparing an order's views.
fn promises(v: &Value) -> Vec<String> {
    v["lines"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| l["promise"].as_str().unwrap_or("<none>").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Feed entries that are orders, by id.
fn feed_orders(feed: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut m: HashMap<String, Vec<Value>> = HashMap::new();
    for e in feed.iter().filter(|e| e["kind"] == "order") {
        let id = e["order_id"]
            .as_str()
            .or_else(|| e["id"].as_str())
            .unwrap_or("")
            .to_string();
        m.entry(id).or_default().push(e.clone());
    }
    m
}

fn parse_time(v: &Value) -> Result<OffsetDateTime> {
    let s = v.as_str().with_context(|| format!("timestamp: {v}"))?;
    OffsetDateTime::parse(s, &Rfc3339).with_context(|| format!("RFC 3339 timestamp {s:?}"))
}

fn money(v: &Value) -> Result<i64> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => bail!("not an amount: {v}"),
    };
    Ok(Money::parse(&s)?.units())
}

async fn dead_letters(c: &Api) -> Result<Vec<Value>> {
    let r = c.get("/v1/dead-letters").await?;
    ensure!(r.status == 200, "dead letters: {} {}", r.status, r.body);
    as_list(&r.body).with_context(|| format!("dead letters are a list: {}", r.body))
}

async fn reconciliations(c: &Api, site: &str) -> Result<Vec<Value>> {
    let r = c.get(&format!("/v1/sites/{site}/reconciliations")).await?;
    ensure!(r.status == 200, "reconciliations: {} {}", r.status, r.body);
    as_list(&r.body).with_context(|| format!("reconciliations are a list: {}", r.body))
}

fn seed_from_env() -> u64 {
    std::env::var("OUTPOST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(rand::random)
}

// ---------------------------------------------------------------------------------------------
// a. Randomized: several sites and central's channel against the same ATP.
// ---------------------------------------------------------------------------------------------

const RANDOM_SKUS: [(&str, i64, i64); 3] = [
    // (sku, ATP per site, largest qty per order line)
    ("GEAR-12T", 30, 6),
    ("BOLT-M8", 60, 15),
    ("PUMP-7", 12, 3),
];
/// INITECH's credit limit in whole euros: small, so its credit is contested too.
const INITECH_CREDIT: i64 = 400;

struct SiteOrder {
    site: String,
    key: String,
    body: Value,
    resp: Value,
    lines: Vec<Line>,
}

struct CentralOrder {
    site: String,
    customer: String,
    order_id: String,
    lines: Vec<(String, i64)>,
}

#[derive(Default)]
struct Tally {
    partitions: u32,
    heals: u32,
    restarts: u32,
    retries: u32,
    central_refused: u32,
    offline_orders: u32,
}

fn pick<'a, T>(rng: &mut StdRng, v: &'a [T]) -> &'a T {
    &v[rng.random_range(0..v.len())]
}

/// Goal: whatever the interleaving of site orders, central-channel sales, partitions and agent
/// crashes, no (SKU, site) pool is ever oversold, no customer's credit is exceeded, every order a
/// client got a 2xx for reaches central exactly once, and no line a site reported pending is
/// confirmed anywhere later.
/// Method: central (allowance target 8 per site and SKU) and 3 agents, each behind its own UDP
/// proxy; ATP for 3 SKUs per site; a seeded random run (seed from `OUTPOST_SEED` or random,
/// always printed; `OUTPOST_LONG=1` gives 6x the steps and stock and 10x the time) of: orders at
/// random sites (random customer, lines and quantities, fresh Idempotency-Keys, some retried at
/// once and some much later, also after restarts), central-channel orders for random sites,
/// partitions started and healed at random (sometimes waiting until the site notices), seeded
/// datagram loss, SIGKILL + restart of random agents, and reads of a site's ATP view. At the end
/// every partition heals, every outbox drains, and the test checks the invariants from the
/// clients' 2xx answers against central's feed, exception queue and dead letters, and against
/// each site's own view, then prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_sites_and_central_channel_never_oversell() -> Result<()> {
    let seed = seed_from_env();
    eprintln!("escrow randomized test: seed {seed} (rerun with OUTPOST_SEED={seed})");
    let r = randomized_run(seed).await;
    if r.is_err() {
        eprintln!("escrow randomized test FAILED with seed {seed}");
    }
    r.with_context(|| format!("seed {seed}"))
}

async fn randomized_run(seed: u64) -> Result<()> {
    let long = std::env::var("OUTPOST_LONG").is_ok_and(|v| v == "1");
    // A long run gets proportionally more stock, so that the pools stay contested (rather than
    // sold out) for most of it.
    let (max_steps, budget, stock) = if long {
        (3_000, Duration::from_secs(400), 6)
    } else {
        (500, Duration::from_secs(40), 1)
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rig = Rig::start(
        3,
        &[("OUTPOST_ALLOWANCE__ATP_TARGET", "8".to_string())],
        &[],
        seed,
    )
    .await?;
    let sites = rig.site_ids();
    let mut atp: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut atp_items = Vec::new();
    for s in &sites {
        for (sku, n, _) in RANDOM_SKUS {
            atp.insert((sku.to_string(), s.clone()), n * stock);
            atp_items.push((sku, s.as_str(), n * stock));
        }
    }
    let initech_credit = (INITECH_CREDIT * stock).to_string();
    let rev = push(&rig.c, &catalogue(&atp_items, &initech_credit)).await?;
    let skus: Vec<&str> = RANDOM_SKUS.iter().map(|s| s.0).collect();
    for s in &sites {
        settle(&rig.api(s), rev, &skus).await?;
    }

    let started = Instant::now();
    let mut site_orders: Vec<SiteOrder> = Vec::new();
    let mut central_orders: Vec<CentralOrder> = Vec::new();
    let mut t = Tally::default();
    let mut steps = 0;
    for step in 0..max_steps {
        if started.elapsed() > budget {
            break;
        }
        steps += 1;
        let roll = rng.random_range(0..100);
        match roll {
            0..55 => {
                let site = pick(&mut rng, &sites).clone();
                let customer = match rng.random_range(0..100) {
                    0..55 => "ACME",
                    55..90 => "INITECH",
                    _ => "GLOBEX",
                };
                let first = rng.random_range(0..RANDOM_SKUS.len());
                let n = rng.random_range(1..=2);
                let lines: Vec<(&str, i64)> = (0..n)
                    .map(|i| {
                        let (sku, _, max) = RANDOM_SKUS[(first + i) % RANDOM_SKUS.len()];
                        (sku, rng.random_range(1..=max))
                    })
                    .collect();
                let body = order(customer, &lines);
                let key = format!("rnd-{seed:x}-{step}");
                let a = rig.api(&site);
                let r = a.post("/v1/orders", &body, Some(&key)).await?;
                ensure!(r.status == 201, "order at {site}: {} {}", r.status, r.body);
                let parsed = lines_of(&r.body, &body)?;
                for (l, (sku, _)) in parsed.iter().zip(&lines) {
                    ensure!(
                        r.body["lines"]
                            .as_array()
                            .and_then(|ls| ls.iter().find(|x| x["sku"] == *sku))
                            .map(|x| money(&x["unit_price"]))
                            .transpose()?
                            == Some(unit_price(sku, customer)),
                        "site priced {sku} for {customer} as in the catalogue: {}",
                        r.body
                    );
                    if customer == "GLOBEX" {
                        ensure!(
                            l.promise == LinePromise::PendingHold.as_str(),
                            "a customer on hold is never confirmed: {}",
                            r.body
                        );
                    }
                }
                if r.body["offline"] == true {
                    t.offline_orders += 1;
                }
                if rng.random_bool(0.15) {
                    let again = a.post("/v1/orders", &body, Some(&key)).await?;
                    ensure!(
                        again.status == 201 && again.body == r.body,
                        "a retry with the same key answers the original: {} {} vs {}",
                        again.status,
                        again.body,
                        r.body
                    );
                    t.retries += 1;
                }
                site_orders.push(SiteOrder {
                    site,
                    key,
                    body,
                    resp: r.body,
                    lines: parsed,
                });
            }
            55..60 if !site_orders.is_empty() => {
                // A client retrying long after (possibly across agent restarts and reconnects).
                let o = &site_orders[rng.random_range(0..site_orders.len())];
                let r = rig
                    .api(&o.site)
                    .post("/v1/orders", &o.body, Some(&o.key))
                    .await?;
                ensure!(
                    r.status == 201 && r.body == o.resp,
                    "late retry of {} at {}: {} {} vs {}",
                    o.key,
                    o.site,
                    r.status,
                    r.body,
                    o.resp
                );
                t.retries += 1;
            }
            60..75 => {
                let site = pick(&mut rng, &sites).clone();
                let customer = if rng.random_bool(0.6) {
                    "ACME"
                } else {
                    "INITECH"
                };
                let (sku, _, max) = *pick(&mut rng, &RANDOM_SKUS);
                let qty = rng.random_range(1..=max);
                let body = json!({"customer_id": customer, "site": site,
                                  "lines": [{"sku": sku, "qty": qty}]});
                let key = format!("central-{seed:x}-{step}");
                let r = rig.c.post("/v1/orders", &body, Some(&key)).await?;
                match r.status {
                    201 => {
                        let order_id = r.body["order_id"]
                            .as_str()
                            .context("central order_id")?
                            .to_string();
                        ensure!(
                            order_id.starts_with("central-o") && r.body["status"] == "confirmed",
                            "central channel answer: {}",
                            r.body
                        );
                        ensure!(r.body["site"] == site.as_str(), "{}", r.body);
                        if rng.random_bool(0.1) {
                            let again = rig.c.post("/v1/orders", &body, Some(&key)).await?;
                            ensure!(
                                again.status == 201 && again.body == r.body,
                                "central retry answers the original: {} {}",
                                again.status,
                                again.body
                            );
                            t.retries += 1;
                        }
                        central_orders.push(CentralOrder {
                            site,
                            customer: customer.to_string(),
                            order_id,
                            lines: vec![(sku.to_string(), qty)],
                        });
                    }
                    409 => {
                        let code = r.body["error"]["code"].as_str().unwrap_or("");
                        ensure!(
                            code == "insufficient_atp" || code == "insufficient_credit",
                            "central refusal code: {}",
                            r.body
                        );
                        t.central_refused += 1;
                    }
                    s => bail!("central order: {s} {}", r.body),
                }
            }
            75..78 => {
                // Lossy link: QUIC recovers, allowance requests may miss their deadline.
                let site = pick(&mut rng, &sites).clone();
                let pct = *pick(&mut rng, &[0, 0, 5, 10, 20]);
                rig.proxy(&site).set_loss(pct);
            }
            78..87 => {
                let site = pick(&mut rng, &sites).clone();
                let p = rig.proxy(&site);
                let cut = !p.is_partitioned();
                p.partition(cut);
                if cut {
                    t.partitions += 1;
                } else {
                    t.heals += 1;
                }
                if rng.random_bool(0.5) {
                    wait_connected(&rig.api(&site), !cut).await?;
                }
            }
            87..93 => {
                let site = pick(&mut rng, &sites).clone();
                rig.restart(&site)?;
                t.restarts += 1;
            }
            _ => {
                let site = pick(&mut rng, &sites).clone();
                let (sku, n, _) = *pick(&mut rng, &RANDOM_SKUS);
                let n = n * stock;
                let v = rig.api(&site).get(&format!("/v1/atp/{sku}")).await?;
                ensure!(v.status == 200, "{}", v.body);
                ensure!(
                    v.body["available"] == v.body["allowance"]
                        && v.body["allowance"]
                            .as_i64()
                            .is_some_and(|x| (0..=n).contains(&x))
                        && v.body["erp_available"] == n,
                    "ATP view at {site}: {}",
                    v.body
                );
            }
        }
    }
    let run_time = started.elapsed();

    // Heal everything and let every outbox drain.
    for s in &sites {
        rig.proxy(s).partition(false);
        rig.proxy(s).set_loss(0);
    }
    for s in &sites {
        wait_drained(&rig.api(s)).await?;
    }
    let feed = read_feed(&rig.c).await?;
    let by_id = feed_orders(&feed);
    let excs = exceptions(&rig.c, "all").await?;
    let dead = dead_letters(&rig.c).await?;

    // Exactly once: each 2xx order is in central once (feed + exception queue), nothing else is.
    let mut exc_ids: HashMap<String, usize> = HashMap::new();
    for x in &excs {
        *exc_ids
            .entry(exception_order_id(x).unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    for o in &site_orders {
        let id = o.resp["order_id"].as_str().context("order_id")?;
        let n = by_id.get(id).map_or(0, Vec::len) + exc_ids.get(id).copied().unwrap_or(0);
        ensure!(
            n == 1,
            "site order {id} is at central {n} times (feed + exceptions)"
        );
    }
    for o in &central_orders {
        let n = by_id.get(&o.order_id).map_or(0, Vec::len);
        ensure!(
            n == 1,
            "central order {} is in the feed {n} times",
            o.order_id
        );
        let e = &by_id[&o.order_id][0];
        ensure!(
            e["channel"] == "central" && e["site"] == o.site.as_str(),
            "central-channel feed entry names the channel and fulfilling site: {e}"
        );
    }
    let known: usize = site_orders.len() + central_orders.len();
    ensure!(
        by_id.len() + exc_ids.len() == known && by_id.values().all(|v| v.len() == 1),
        "central holds {} feed orders and {} exceptions for {known} orders clients got a 2xx for",
        by_id.len(),
        exc_ids.len()
    );
    ensure!(
        excs.is_empty(),
        "no business exception can arise in this run (prices and holds never change): {excs:#?}"
    );
    ensure!(dead.is_empty(), "no dead letters: {dead:#?}");

    // Pending stays pending: central's feed and the site's own view agree with the 2xx answer.
    for o in &site_orders {
        let id = o.resp["order_id"].as_str().context("order_id")?;
        let want = promises(&o.resp);
        let at_central = promises(&by_id[id][0]);
        ensure!(
            at_central == want,
            "{id}: central's feed has promises {at_central:?}, the site answered {want:?}"
        );
        let v = rig.api(&o.site).get(&format!("/v1/orders/{id}")).await?;
        ensure!(v.status == 200, "{id} at {}: {}", o.site, v.body);
        ensure!(
            promises(&v.body) == want && v.body["synced"] == true,
            "{id}: the site now shows {} but answered {want:?}",
            v.body
        );
    }

    // The bounds, from the answers and from the sites' remaining allowances.
    let mut confirmed: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut credit: BTreeMap<String, i64> = BTreeMap::new();
    let (mut site_conf_units, mut pending_units) = (0, 0);
    for o in &site_orders {
        let customer = o.body["customer_id"].as_str().unwrap_or("");
        for l in &o.lines {
            if l.confirmed() {
                *confirmed
                    .entry((l.sku.clone(), o.site.clone()))
                    .or_insert(0) += l.qty;
                *credit.entry(customer.to_string()).or_insert(0) +=
                    l.qty * unit_price(&l.sku, customer);
                site_conf_units += l.qty;
            } else {
                pending_units += l.qty;
            }
        }
    }
    let mut central_units = 0;
    for o in &central_orders {
        for (sku, qty) in &o.lines {
            *confirmed.entry((sku.clone(), o.site.clone())).or_insert(0) += qty;
            *credit.entry(o.customer.clone()).or_insert(0) += qty * unit_price(sku, &o.customer);
            central_units += qty;
        }
    }
    let mut oversold = 0;
    let mut problems = Vec::new();
    for ((sku, site), limit) in &atp {
        let sold = confirmed
            .get(&(sku.clone(), site.clone()))
            .copied()
            .unwrap_or(0);
        let held = allowance(&rig.api(site), sku).await?;
        oversold += (sold - limit).max(0);
        if sold + held > *limit {
            problems.push(format!(
                "{sku}@{site}: {sold} confirmed + {held} still escrowed at the site > ATP {limit}"
            ));
        }
    }
    for (customer, limit) in [("ACME", "50000"), ("INITECH", initech_credit.as_str())] {
        let used = credit.get(customer).copied().unwrap_or(0);
        let limit = Money::parse(limit)?.units();
        if used > limit {
            problems.push(format!(
                "{customer}: confirmed value {} > credit limit {}",
                Money(used),
                Money(limit)
            ));
        }
    }
    let atp_total: i64 = atp.values().sum();
    println!(
        "escrow figures: seed={seed} steps={steps} time={:.1}s orders={} (site {}, central {}, \
         central refused {}) confirmed_units={} (site {site_conf_units}, central {central_units}) \
         pending_units={pending_units} atp_units={atp_total} oversold_units={oversold} \
         offline_orders={} partitions={} heals={} restarts={} retries={}",
        run_time.as_secs_f64(),
        site_orders.len() + central_orders.len(),
        site_orders.len(),
        central_orders.len(),
        t.central_refused,
        site_conf_units + central_units,
        t.offline_orders,
        t.partitions,
        t.heals,
        t.restarts,
        t.retries,
    );
    ensure!(oversold == 0, "oversold {oversold} units");
    ensure!(problems.is_empty(), "bounds broken: {problems:#?}");
    ensure!(
        site_conf_units > 0 && pending_units > 0,
        "the run exercised both confirmed and pending lines"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// b. A site cut off with allowance A.
// ---------------------------------------------------------------------------------------------

/// Goal: a site cut off from central confirms exactly up to its allowance A and captures the rest
/// as pending, saying why per line; central later shows the same promises; back online it gets
/// more allowance on demand, and central's own channel sells exactly what is left, no more.
/// Method: central with an allowance target of 7, one agent behind a proxy, ATP 40 GEAR; read A
/// from `GET /v1/atp/GEAR-12T`; partition and wait until the agent notices; place orders adding
/// up to 2A+4 units (one over-sized order in the middle, one partial, one for a customer on
/// hold) and compare each line with a greedy model; heal, drain, and compare the feed; then order
/// beyond the allowance online (granted on demand), sell the exact remainder through central's
/// channel (one unit more is refused), and check a further site order beyond its allowance stays
/// pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_site_confirms_exactly_its_allowance() -> Result<()> {
    const TARGET: i64 = 7;
    const ERP_GEAR: i64 = 40;
    let rig = Rig::start(
        1,
        &[("OUTPOST_ALLOWANCE__ATP_TARGET", TARGET.to_string())],
        &[("OUTPOST_ALLOWANCE__REQUEST_DEADLINE_MS", "3000".to_string())],
        1,
    )
    .await?;
    let site = "plant-1";
    let a = rig.api(site);
    let rev = push(
        &rig.c,
        &catalogue(
            &[("GEAR-12T", site, ERP_GEAR), ("BOLT-M8", site, 10_000)],
            "5000",
        ),
    )
    .await?;
    settle(&a, rev, &["GEAR-12T", "BOLT-M8"]).await?;
    wait_allowance(&a, "GEAR-12T", TARGET).await?;
    wait_allowance(&a, "BOLT-M8", TARGET).await?;
    let view = a.get("/v1/atp/GEAR-12T").await?.body;
    assert_eq!(view["available"], TARGET, "{view}");
    assert_eq!(view["erp_available"], ERP_GEAR, "{view}");
    assert_eq!(view["stale_secs"], 0, "fresh while connected: {view}");
    assert!(view["master_rev"].as_u64().is_some(), "{view}");
    parse_time(&view["as_of"])?;

    rig.proxy(site).partition(true);
    wait_connected(&a, false).await?;
    let big_a = allowance(&a, "GEAR-12T").await?;
    let bolt_a = allowance(&a, "BOLT-M8").await?;
    assert_eq!(big_a, TARGET, "the cut-off site still holds its allowance");

    let plan: Vec<(&str, Vec<(&str, i64)>)> = vec![
        ("ACME", vec![("GEAR-12T", big_a - 2)]),
        ("ACME", vec![("GEAR-12T", big_a + 1)]),
        ("ACME", vec![("GEAR-12T", 1), ("BOLT-M8", bolt_a + 5)]),
        ("ACME", vec![("GEAR-12T", 1)]),
        ("ACME", vec![("GEAR-12T", 1)]),
        ("GLOBEX", vec![("GEAR-12T", 1)]),
        ("ACME", vec![("GEAR-12T", 2)]),
    ];
    let mut left: HashMap<&str, i64> = [("GEAR-12T", big_a), ("BOLT-M8", bolt_a)].into();
    let mut placed = Vec::new();
    let (mut gear_confirmed, mut gear_ordered) = (0, 0);
    for (i, (customer, lines)) in plan.iter().enumerate() {
        let body = order(customer, lines);
        let key = format!("cut-off-{i}");
        let r = a.post("/v1/orders", &body, Some(&key)).await?;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.body["offline"], true, "taken while cut off: {}", r.body);
        let got = lines_of(&r.body, &body)?;
        for (l, (sku, qty)) in got.iter().zip(lines) {
            let rem = left.get_mut(sku).expect("sku in model");
            let want = if *customer == "GLOBEX" {
                LinePromise::PendingHold
            } else if *qty <= *rem {
                *rem -= qty;
                LinePromise::Confirmed
            } else {
                LinePromise::PendingAllowance
            };
            assert_eq!(
                l.promise,
                want.as_str(),
                "order {i} line {sku}x{qty}: {}",
                r.body
            );
            if *sku == "GEAR-12T" {
                gear_ordered += qty;
                if l.confirmed() {
                    gear_confirmed += qty;
                }
            }
        }
        placed.push((key, body, r.body));
    }
    assert_eq!(
        gear_confirmed, big_a,
        "confirmed exactly the allowance offline"
    );
    assert!(gear_ordered > big_a, "more was ordered than allowed");
    let statuses: Vec<&str> = placed
        .iter()
        .map(|p| p.2["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        [
            "confirmed",
            "pending",
            "partial",
            "confirmed",
            "pending",
            "pending",
            "pending"
        ]
    );
    // A retry while cut off answers the original.
    let again = a
        .post("/v1/orders", &placed[1].1, Some(&placed[1].0))
        .await?;
    assert_eq!((again.status, &again.body), (201, &placed[1].2));
    let view = a.get("/v1/atp/GEAR-12T").await?.body;
    assert_eq!(
        (view["available"].as_i64(), view["allowance"].as_i64()),
        (Some(0), Some(0)),
        "{view}"
    );
    assert_eq!(view["erp_available"], ERP_GEAR, "{view}");
    eventually(
        "stale_secs grows while cut off",
        CONVERGE_TIMEOUT,
        || async {
            let v = a.get("/v1/atp/GEAR-12T").await?.body;
            Ok((v["stale_secs"].as_u64().unwrap_or(0) >= 1).then_some(()))
        },
    )
    .await?;

    rig.proxy(site).partition(false);
    wait_drained(&a).await?;
    let feed = read_feed(&rig.c).await?;
    let by_id = feed_orders(&feed);
    for (_, _, resp) in &placed {
        let id = resp["order_id"].as_str().context("order_id")?;
        let entries = by_id.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(entries.len(), 1, "{id} in the feed once");
        assert_eq!(
            promises(&entries[0]),
            promises(resp),
            "{id}: central shows the site's per-line promises: {}",
            entries[0]
        );
        assert_eq!(entries[0]["status"], "uploaded", "{}", entries[0]);
        let v = a.get(&format!("/v1/orders/{id}")).await?.body;
        assert_eq!(
            promises(&v),
            promises(resp),
            "{id} unchanged at the site: {v}"
        );
        assert_eq!(v["synced"], true, "{v}");
    }

    // Central tops the site up again as its confirmed orders arrive.
    wait_allowance(&a, "GEAR-12T", TARGET).await?;
    // Online, beyond the allowance: the agent asks central and confirms.
    let beyond = order("ACME", &[("GEAR-12T", TARGET + 3)]);
    let r = a.post("/v1/orders", &beyond, Some("online-beyond")).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        (r.body["offline"].clone(), promises(&r.body)),
        (json!(false), vec!["confirmed".to_string()]),
        "online, a shortfall is granted on demand: {}",
        r.body
    );
    let site_confirmed = big_a + TARGET + 3;
    wait_drained(&a).await?;
    wait_allowance(&a, "GEAR-12T", TARGET).await?;

    // Central's channel competes for what is left: ATP - confirmed at the site - escrowed there.
    let free = ERP_GEAR - site_confirmed - TARGET;
    assert!(free > 0, "test arithmetic: {free}");
    let sell = |qty: i64| {
        json!({"customer_id": "ACME", "site": site,
               "lines": [{"sku": "GEAR-12T", "qty": qty}]})
    };
    let r = rig
        .c
        .post("/v1/orders", &sell(free + 1), Some("c-1"))
        .await?;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "insufficient_atp", "{}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("GEAR-12T") && msg.contains(&free.to_string()),
        "names the SKU and what is free: {msg}"
    );
    let r = rig.c.post("/v1/orders", &sell(free), Some("c-2")).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "confirmed");
    let central_id = r.body["order_id"].as_str().context("order_id")?.to_string();
    let again = rig.c.post("/v1/orders", &sell(free), Some("c-2")).await?;
    assert_eq!((again.status, &again.body), (201, &r.body), "same key");
    let r = rig.c.post("/v1/orders", &sell(1), Some("c-3")).await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("insufficient_atp")),
        "{}",
        r.body
    );
    // Nothing is free at central now: beyond its allowance the site captures pending.
    let r = a
        .post(
            "/v1/orders",
            &order("ACME", &[("GEAR-12T", TARGET + 1)]),
            Some("online-nothing-free"),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(promises(&r.body), ["pending_allowance"], "{}", r.body);
    assert_eq!(allowance(&a, "GEAR-12T").await?, TARGET, "nothing consumed");

    let feed = read_feed(&rig.c).await?;
    let central_entry = feed_orders(&feed)
        .remove(&central_id)
        .context("central order in the feed")?;
    assert_eq!(central_entry.len(), 1);
    assert_eq!(
        central_entry[0]["channel"], "central",
        "{}",
        central_entry[0]
    );
    assert_eq!(central_entry[0]["site"], site, "{}", central_entry[0]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// c. Business exceptions: price change and credit hold while a site is offline.
// ---------------------------------------------------------------------------------------------

/// Goal: a price change and a credit hold made at central while a site is offline turn the
/// site's orders into business exceptions carrying the data the site used, and operators can
/// accept, reject and replay them; an ERP decision flows down to the site.
/// Method: one agent behind a proxy; partition; at central raise ACME's GEAR price and put
/// INITECH on hold; at the site take two ACME GEAR orders (old price), one INITECH order and one
/// unaffected ACME BOLT order; heal and drain. Check the queue (reasons, site and central prices,
/// master revision), the CLI's `show`, that only the clean order is in the feed; accept one
/// (→ feed), reject one (→ `erp_status` rejected at the site), replay the held one (still failing,
/// then passing once the hold is lifted); post an ERP status for the clean order and see it at
/// the site; check the 409s for repeated decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_price_change_and_credit_hold_become_exceptions_that_resolve() -> Result<()> {
    let rig = Rig::start(1, &[], &[], 2).await?;
    let site = "plant-1";
    let a = rig.api(site);
    let c = &rig.c;
    let rev = push(
        c,
        &catalogue(&[("GEAR-12T", site, 40), ("BOLT-M8", site, 10_000)], "5000"),
    )
    .await?;
    settle(&a, rev, &["GEAR-12T", "BOLT-M8"]).await?;

    rig.proxy(site).partition(true);
    wait_connected(&a, false).await?;
    let site_rev = health(&a).await?["master_rev"]
        .as_u64()
        .context("master_rev")?;
    let r = c
        .put(
            "/v1/master/prices",
            &json!([{"sku": "GEAR-12T", "customer": "ACME",
                     "unit_price": "11.50", "currency": "EUR"}]),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let initech = |hold: bool| {
        let mut v = json!([{"id": "INITECH", "name": "Initech", "credit_limit": "5000"}]);
        v[0]["on_hold"] = json!(hold);
        v
    };
    let r = c.put("/v1/master/customers", &initech(true)).await?;
    assert_eq!(r.status, 200, "{}", r.body);

    let mut ids = HashMap::new();
    for (name, body) in [
        ("accept", order("ACME", &[("GEAR-12T", 2)])),
        ("reject", order("ACME", &[("GEAR-12T", 1)])),
        ("held", order("INITECH", &[("GEAR-12T", 1)])),
        ("clean", order("ACME", &[("BOLT-M8", 10)])),
    ] {
        let r = a.post("/v1/orders", &body, Some(name)).await?;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(
            promises(&r.body),
            ["confirmed"],
            "the site confirms from its own data: {}",
            r.body
        );
        assert_eq!(r.body["erp_status"], Value::Null, "{}", r.body);
        ids.insert(name, r.body);
    }
    let oid = |n: &str| ids[n]["order_id"].as_str().unwrap_or("").to_string();

    rig.proxy(site).partition(false);
    wait_drained(&a).await?;
    let open_list = exceptions(c, "open").await?;
    let default_list = c.get("/v1/exceptions").await?;
    assert_eq!(
        default_list.body,
        Value::Array(open_list.clone()),
        "open is the default"
    );
    let mut by_order: HashMap<String, Value> = HashMap::new();
    for x in &open_list {
        by_order.insert(exception_order_id(x).unwrap_or("").to_string(), x.clone());
    }
    let mut got: Vec<&String> = by_order.keys().collect();
    got.sort();
    let mut want = vec![oid("accept"), oid("reject"), oid("held")];
    want.sort();
    assert_eq!(
        got.into_iter().cloned().collect::<Vec<_>>(),
        want,
        "{open_list:#?}"
    );
    for (name, reason) in [
        ("accept", "price_changed"),
        ("reject", "price_changed"),
        ("held", "credit_hold"),
    ] {
        let x = &by_order[&oid(name)];
        assert_eq!(x["class"], "business", "{x}");
        assert_eq!(x["status"], "open", "{x}");
        assert_eq!(x["site"], site, "{x}");
        assert_eq!(x["seq"], ids[name]["seq"], "{x}");
        assert_eq!(x["reasons"], json!([reason]), "{x}");
        assert_eq!(
            x["site_data"]["master_rev"].as_u64(),
            Some(site_rev),
            "the revision the site priced with: {x}"
        );
        assert!(
            !x["site_data"]["allowance"].is_null(),
            "the allowance the site used: {x}"
        );
        assert_eq!(x["event"]["order_id"], oid(name).as_str(), "{x}");
        let line = x["site_data"]["lines"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["sku"] == "GEAR-12T"))
            .with_context(|| format!("site_data line for GEAR-12T: {x}"))?;
        let (site_price, central_price) = (
            money(&line["site_unit_price"])?,
            money(&line["central_unit_price"])?,
        );
        if reason == "price_changed" {
            assert_eq!(
                (site_price, central_price),
                (110_000, 115_000),
                "11.00 at the site, 11.50 at central: {x}"
            );
        } else {
            assert_eq!((site_price, central_price), (125_000, 125_000), "{x}");
        }
        let id = id_text(&x["id"]).context("exception id")?;
        let one = c.get(&format!("/v1/exceptions/{id}")).await?;
        assert_eq!(one.status, 200, "{}", one.body);
        assert_eq!(one.body["id"], x["id"]);
        assert_eq!(one.body["reasons"], x["reasons"]);
    }
    let feed = read_feed(c).await?;
    let in_feed = feed_orders(&feed);
    assert_eq!(
        in_feed.get(&oid("clean")).map(Vec::len),
        Some(1),
        "the clean order went straight to the feed"
    );
    for n in ["accept", "reject", "held"] {
        assert!(!in_feed.contains_key(&oid(n)), "{n} is held back");
    }
    assert!(dead_letters(c).await?.is_empty());

    let xid = |n: &str| id_text(&by_order[&oid(n)]["id"]).unwrap_or_default();
    let api = format!("http://{}", rig.central.ready.api);
    let show = run_cli(
        "outpost-central",
        &[
            "exceptions",
            "show",
            &xid("accept"),
            "--api",
            &api,
            "--token",
            &c.token,
        ],
        CLI_TIMEOUT,
    )?;
    assert!(show.success, "exceptions show: {show:?}");
    assert!(show.stdout.contains(&oid("accept")), "{show:?}");
    let list = run_cli(
        "outpost-central",
        &["exceptions", "list", "--api", &api, "--token", &c.token],
        CLI_TIMEOUT,
    )?;
    assert!(list.success, "exceptions list: {list:?}");

    // Accept as is: into the feed.
    let r = c
        .post(
            &format!("/v1/exceptions/{}/resolve", xid("accept")),
            &json!({"action": "accept", "reason": "honour the quote"}),
            None,
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = c
        .post(
            &format!("/v1/exceptions/{}/resolve", xid("accept")),
            &json!({"action": "accept", "reason": "again"}),
            None,
        )
        .await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("already_resolved")),
        "{}",
        r.body
    );
    // Reject: the site learns it.
    let r = c
        .post(
            &format!("/v1/exceptions/{}/resolve", xid("reject")),
            &json!({"action": "reject", "reason": "quote expired"}),
            None,
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let rejected = oid("reject");
    let seen = eventually("rejection reaches the site", CONVERGE_TIMEOUT, || async {
        let v = a.get(&format!("/v1/orders/{rejected}")).await?.body;
        Ok((v["erp_status"] == "rejected").then_some(v))
    })
    .await?;
    assert!(
        seen["erp_reason"]
            .as_str()
            .is_some_and(|r| r.contains("quote expired")),
        "{seen}"
    );
    assert_eq!(seen["lifecycle"], "rejected", "{seen}");
    // Replay while the hold is still on: still failing, still open.
    let r = c
        .post(
            &format!("/v1/exceptions/{}/replay", xid("held")),
            &json!({}),
            None,
        )
        .await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("still_failing")),
        "{}",
        r.body
    );
    let x = c
        .get(&format!("/v1/exceptions/{}", xid("held")))
        .await?
        .body;
    assert_eq!(x["status"], "open", "{x}");
    assert_eq!(x["reasons"], json!(["credit_hold"]), "{x}");
    // Fix the master data, replay: into the feed.
    let r = c.put("/v1/master/customers", &initech(false)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = c
        .post(
            &format!("/v1/exceptions/{}/replay", xid("held")),
            &json!({}),
            None,
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);

    let feed = read_feed(c).await?;
    let in_feed = feed_orders(&feed);
    for (n, want) in [("accept", 1), ("held", 1), ("clean", 1), ("reject", 0)] {
        assert_eq!(
            in_feed.get(&oid(n)).map_or(0, Vec::len),
            want,
            "{n} in the feed {want} times"
        );
        if let Some(e) = in_feed.get(&oid(n)) {
            assert_eq!(e[0]["status"], "uploaded", "{n}: {}", e[0]);
        }
    }
    assert!(exceptions(c, "open").await?.is_empty(), "none left open");
    let resolved = exceptions(c, "resolved").await?;
    assert_eq!(resolved.len(), 3, "{resolved:#?}");
    for (n, action) in [
        ("accept", "accept"),
        ("reject", "reject"),
        ("held", "replayed"),
    ] {
        let x = resolved
            .iter()
            .find(|x| exception_order_id(x) == Some(oid(n).as_str()))
            .with_context(|| format!("{n} among the resolved"))?;
        assert_eq!(x["status"], "resolved", "{x}");
        assert!(
            x["resolution"].to_string().contains(action),
            "{n} was resolved by {action}: {x}"
        );
    }

    // The ERP's decision on a clean order flows down to the site.
    let clean = oid("clean");
    let r = c
        .post(
            &format!("/v1/orders/{clean}/status"),
            &json!({"status": "accepted"}),
            None,
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually("accepted reaches the site", CONVERGE_TIMEOUT, || async {
        let v = a.get(&format!("/v1/orders/{clean}")).await?.body;
        Ok((v["erp_status"] == "accepted").then_some(()))
    })
    .await?;
    let r = c
        .post(
            &format!("/v1/orders/{clean}/status"),
            &json!({"status": "rejected", "reason": "changed our mind"}),
            None,
        )
        .await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("already_decided")),
        "{}",
        r.body
    );
    let r = c
        .post(
            "/v1/orders/no-such-order/status",
            &json!({"status": "accepted"}),
            None,
        )
        .await?;
    assert_eq!(r.status, 404, "{}", r.body);

    let reports = reconciliations(c, site).await?;
    let after_outage = reports
        .iter()
        .find(|r| r["events_uploaded"].as_u64().unwrap_or(0) > 0)
        .with_context(|| format!("a report of the upload: {reports:#?}"))?;
    assert_eq!(after_outage["exceptions_business"], 3, "{after_outage:#}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// d. Dead letters.
// ---------------------------------------------------------------------------------------------

fn pending_order_event(seq: u64, id: &str, qty: i64) -> EventEnvelope {
    EventEnvelope::new(
        "plant-1",
        seq,
        id,
        1_764_000_000_000,
        &EventBody::Order(Order {
            order_id: id.into(),
            customer_id: "ACME".into(),
            status: "pending".into(),
            lines: vec![OrderLine {
                sku: "GEAR-12T".into(),
                qty,
                unit_price: Money(110_000),
                currency: "EUR".into(),
                promise: LinePromise::PendingAllowance,
            }],
            master_rev: 1,
            offline: true,
        }),
    )
}

/// Goal: one malformed, unknown-schema or invalid event in the middle of a batch is dead-lettered
/// with its reason and the events after it are applied; the batch is acknowledged through its
/// last event and a re-upload adds nothing.
/// Method: a hand-rolled QUIC client with plant-1's certificate sends [milestone, corrupt body,
/// milestone] and [pending order, schema 99, order with qty 0, milestone], then re-sends the last
/// three of those (as after a lost ack) with one new milestone; expect Acks through 3, 7 and 8;
/// check the feed, `GET /v1/dead-letters` (each bad event once), the site's acked seq and the
/// session's reconciliation report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_mid_batch_is_dead_lettered_and_the_rest_applied() -> Result<()> {
    let fleet = tokio::task::block_in_place(|| Fleet::init(1))?;
    let central = tokio::task::block_in_place(|| fleet.start_central(None))?;
    let c = Api::new(&central);
    push_demo_master(&c, &["plant-1"]).await?;
    let addr = central.ready.quic.clone().context("quic")?.parse()?;
    let mut s = open(addr, site_client_config(fleet.path(), "plant-1")?).await?;
    s.send(&hello("plant-1", PROTOCOL_VERSION, 8)).await?;
    let CentralMsg::Welcome(w) = s.recv_skipping_master().await? else {
        bail!("no welcome");
    };
    assert_eq!(w.acked_seq, 0);

    let mut corrupt = milestone_event("plant-1", 2, "bad-2");
    corrupt.body.truncate(3);
    let mut future = milestone_event("plant-1", 5, "future-5");
    future.schema = 99;
    let invalid = pending_order_event(6, "invalid-6", 0);
    for e in [&corrupt, &future, &invalid] {
        assert!(e.decode().is_err(), "test precondition: {} is bad", e.seq);
    }
    let batch1 = vec![
        milestone_event("plant-1", 1, "good-1"),
        corrupt,
        milestone_event("plant-1", 3, "good-3"),
    ];
    let batch2 = vec![
        pending_order_event(4, "good-4", 2),
        future,
        invalid,
        milestone_event("plant-1", 7, "good-7"),
    ];
    // A re-upload after a "lost ack": the tail of batch 2 again (dead letters included) and one
    // new event.
    let mut batch3 = batch2[1..].to_vec();
    batch3.push(milestone_event("plant-1", 8, "good-8"));
    for (batch, through) in [(&batch1, 3), (&batch2, 7), (&batch3, 8)] {
        s.send(&AgentMsg::Events(batch.clone())).await?;
        match s.recv_skipping_master().await? {
            CentralMsg::Ack { through_seq } => assert_eq!(through_seq, through),
            other => panic!("expected an ack through {through}, got {other:?}"),
        }
    }

    let feed = read_feed(&c).await?;
    let got: Vec<(u64, String)> = feed
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap_or(0),
                e["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, "good-1".to_string()),
            (3, "good-3".to_string()),
            (4, "good-4".to_string()),
            (7, "good-7".to_string()),
            (8, "good-8".to_string())
        ],
        "{feed:#?}"
    );
    let order = feed.iter().find(|e| e["id"] == "good-4").expect("order");
    assert_eq!(promises(order), ["pending_allowance"], "{order}");
    let dead = dead_letters(&c).await?;
    let mut got: Vec<(u64, String)> = dead
        .iter()
        .map(|d| {
            (
                d["seq"].as_u64().unwrap_or(0),
                d["event_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (2, "bad-2".to_string()),
            (5, "future-5".to_string()),
            (6, "invalid-6".to_string())
        ],
        "each bad event dead-lettered once: {dead:#?}"
    );
    for d in &dead {
        assert_eq!(d["site"], "plant-1", "{d}");
        assert!(
            d["reason"].as_str().is_some_and(|r| !r.trim().is_empty()),
            "{d}"
        );
        assert!(!d["id"].is_null(), "{d}");
    }
    let schema = dead.iter().find(|d| d["seq"] == 5).expect("seq 5");
    let why = schema["reason"].as_str().unwrap_or("");
    assert!(
        why.contains("99") || why.contains("schema"),
        "names the schema: {why}"
    );
    let sites = c.get("/v1/sites").await?.body;
    assert_eq!(sites[0]["acked_seq"], 8, "{sites}");
    let reports = reconciliations(&c, "plant-1").await?;
    let r = reports.first().context("a report for the session")?;
    assert_eq!(r["dead_letters"], 3, "{r:#}");
    assert_eq!(r["duplicates_dropped"], 3, "{r:#}");
    assert!(
        !r["caught_up_at"].is_null(),
        "hwm reached hello.last_seq: {r:#}"
    );
    s.conn.close(0u32.into(), b"done");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// e. Reconciliation report.
// ---------------------------------------------------------------------------------------------

/// Goal: a site's reconnect after an outage produces a reconciliation report that counts what
/// happened offline: events uploaded, confirmed and pending offline orders, no duplicates or
/// exceptions, when the site went dark and came back, and how long catching up took.
/// Method: central (allowance target 5), one agent behind a proxy; partition; take 4 orders
/// within the allowance, SIGKILL and restart the agent while still cut off, take 2 pending orders
/// (beyond allowance; customer on hold) and 2 milestones; heal and drain; compare the newest
/// report with what the test did and the wall-clock times it saw; read it through the CLI too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_after_an_outage_is_reported() -> Result<()> {
    let mut rig = Rig::start(
        1,
        &[("OUTPOST_ALLOWANCE__ATP_TARGET", "5".to_string())],
        &[],
        3,
    )
    .await?;
    let site = "plant-1";
    let rev = push(
        &rig.c,
        &catalogue(&[("GEAR-12T", site, 40), ("BOLT-M8", site, 10_000)], "5000"),
    )
    .await?;
    let a = rig.api(site);
    settle(&a, rev, &["GEAR-12T", "BOLT-M8"]).await?;
    wait_allowance(&a, "GEAR-12T", 5).await?;

    let cut_at = OffsetDateTime::now_utc();
    rig.proxy(site).partition(true);
    wait_connected(&a, false).await?;
    let mut confirmed = 0;
    let mut pending = 0;
    let place = |a: Api, key: String, body: Value, want: &'static str| async move {
        let r = a.post("/v1/orders", &body, Some(&key)).await?;
        ensure!(r.status == 201, "{}", r.body);
        ensure!(r.body["offline"] == true, "{}", r.body);
        ensure!(
            r.body["status"] == want,
            "{key}: {want} expected: {}",
            r.body
        );
        Ok::<_, anyhow::Error>(())
    };
    for i in 0..3 {
        place(
            a.clone(),
            format!("rec-c{i}"),
            order("ACME", &[("GEAR-12T", 1)]),
            "confirmed",
        )
        .await?;
        confirmed += 1;
    }
    place(
        a.clone(),
        "rec-c3".into(),
        order("ACME", &[("BOLT-M8", 2)]),
        "confirmed",
    )
    .await?;
    confirmed += 1;
    rig.restart(site)?;
    let a = rig.api(site);
    assert_eq!(
        health(&a).await?["connected"],
        false,
        "still cut off after restart"
    );
    place(
        a.clone(),
        "rec-p0".into(),
        order("ACME", &[("GEAR-12T", 5)]),
        "pending",
    )
    .await?;
    pending += 1;
    place(
        a.clone(),
        "rec-p1".into(),
        order("GLOBEX", &[("BOLT-M8", 1)]),
        "pending",
    )
    .await?;
    pending += 1;
    for i in 0..2 {
        let m = json!({"event_id": format!("rec-m{i}"), "milestone": "loaded",
                       "scanner_id": "scanner-1", "at": "2026-11-26T10:00:00Z"});
        let r = a.post("/v1/shipments/SH-R/milestones", &m, None).await?;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let events = confirmed + pending + 2;
    assert_eq!(health(&a).await?["outbox_depth"], events);

    let healed_at = OffsetDateTime::now_utc();
    rig.proxy(site).partition(false);
    wait_drained(&a).await?;
    let reports = eventually("a caught-up report", CONVERGE_TIMEOUT, || async {
        let rs = reconciliations(&rig.c, site).await?;
        Ok(rs
            .first()
            .is_some_and(|r| !r["caught_up_at"].is_null() && !r["dark_since"].is_null())
            .then_some(rs))
    })
    .await?;
    let r = &reports[0];
    assert_eq!(r["events_uploaded"], events, "{r:#}");
    assert_eq!(r["orders_offline_confirmed"], confirmed, "{r:#}");
    assert_eq!(r["orders_offline_pending"], pending, "{r:#}");
    assert_eq!(r["duplicates_dropped"], 0, "{r:#}");
    assert_eq!(r["exceptions_business"], 0, "{r:#}");
    assert_eq!(r["dead_letters"], 0, "{r:#}");
    assert!(r["catch_up_ms"].as_u64().is_some(), "{r:#}");
    // Timestamps may be whole seconds; central may date "dark" from when it noticed the silence.
    let slack = time::Duration::seconds(2);
    let notice = time::Duration::milliseconds(FAST_IDLE_TIMEOUT_MS as i64);
    let dark = parse_time(&r["dark_since"])?;
    let back = parse_time(&r["connected_at"])?;
    let caught = parse_time(&r["caught_up_at"])?;
    assert!(
        dark <= cut_at + notice + slack,
        "dark since {dark}, cut at {cut_at}"
    );
    assert!(dark < back, "{r:#}");
    assert!(
        back >= healed_at - slack,
        "back at {back}, healed at {healed_at}"
    );
    assert!(back <= caught, "{r:#}");
    let oldest = reports.last().expect("non-empty");
    assert!(reports.len() >= 2, "one report per session: {reports:#?}");
    assert!(
        oldest["dark_since"].is_null(),
        "the first session had no dark period: {oldest:#}"
    );

    let fleet_json = rig.fleet.path().join("fleet.json");
    let out = run_cli(
        "outpost-central",
        &[
            "reconciliations",
            site,
            "--fleet",
            fleet_json.to_str().context("utf-8 path")?,
        ],
        CLI_TIMEOUT,
    )?;
    assert!(out.success, "reconciliations CLI: {out:?}");
    assert!(!out.stdout.trim().is_empty(), "{out:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// f. Reclaim when the ERP lowers ATP.
// ---------------------------------------------------------------------------------------------

/// Goal: when the ERP lowers a site's ATP below what central has granted, central asks the site
/// for unused allowance and the site returns only what it has not used: what it confirmed while
/// cut off stands (no exception, no overrun), its allowance never goes negative, nothing is
/// granted or sold while central is over-committed, and a later raise tops the site up again.
/// Method: allowance target 7, ATP 40; partition; confirm 5 offline (2 left); the ERP lowers ATP
/// to 4 at central; heal and drain; expect the allowance to reach 0 (2 returned, not 3), the
/// order unchanged at the site and once in the feed, no exceptions, central's channel and an
/// online site order refused more; then the ERP raises ATP to 20 and the site gets 7 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinking_atp_reclaims_only_unused_allowance() -> Result<()> {
    let rig = Rig::start(
        1,
        &[("OUTPOST_ALLOWANCE__ATP_TARGET", "7".to_string())],
        &[],
        4,
    )
    .await?;
    let site = "plant-1";
    let a = rig.api(site);
    let c = &rig.c;
    let rev = push(
        c,
        &catalogue(&[("GEAR-12T", site, 40), ("BOLT-M8", site, 10_000)], "5000"),
    )
    .await?;
    settle(&a, rev, &["GEAR-12T", "BOLT-M8"]).await?;
    wait_allowance(&a, "GEAR-12T", 7).await?;

    rig.proxy(site).partition(true);
    wait_connected(&a, false).await?;
    let r = a
        .post(
            "/v1/orders",
            &order("ACME", &[("GEAR-12T", 5)]),
            Some("before-shrink"),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(promises(&r.body), ["confirmed"], "{}", r.body);
    let id = r.body["order_id"].as_str().context("order_id")?.to_string();
    assert_eq!(allowance(&a, "GEAR-12T").await?, 2);
    let atp = |n: i64| json!([{"sku": "GEAR-12T", "site": site, "available": n}]);
    let p = c.put("/v1/master/atp", &atp(4)).await?;
    assert_eq!(p.status, 200, "{}", p.body);

    rig.proxy(site).partition(false);
    wait_drained(&a).await?;
    wait_allowance(&a, "GEAR-12T", 0).await?;
    // The site's answer to the reclaim is an outbox event; let it reach central too.
    wait_drained(&a).await?;
    let view = a.get("/v1/atp/GEAR-12T").await?.body;
    assert_eq!(view["erp_available"], 4, "{view}");
    assert_eq!(view["available"], 0, "{view}");
    let v = a.get(&format!("/v1/orders/{id}")).await?.body;
    assert_eq!(promises(&v), ["confirmed"], "a confirmation stands: {v}");
    let feed = read_feed(c).await?;
    let entries = feed_orders(&feed).remove(&id).unwrap_or_default();
    assert_eq!(entries.len(), 1, "{feed:#?}");
    assert_eq!(promises(&entries[0]), ["confirmed"]);
    let excs = exceptions(c, "all").await?;
    assert!(excs.is_empty(), "no overrun: {excs:#?}");

    let r = c
        .post(
            "/v1/orders",
            &json!({"customer_id": "ACME", "site": site, "lines": [{"sku": "GEAR-12T", "qty": 1}]}),
            Some("central-after-shrink"),
        )
        .await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("insufficient_atp")),
        "{}",
        r.body
    );
    let r = a
        .post(
            "/v1/orders",
            &order("ACME", &[("GEAR-12T", 1)]),
            Some("site-after-shrink"),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(promises(&r.body), ["pending_allowance"], "{}", r.body);
    assert_eq!(allowance(&a, "GEAR-12T").await?, 0);

    let p = c.put("/v1/master/atp", &atp(20)).await?;
    assert_eq!(p.status, 200, "{}", p.body);
    wait_allowance(&a, "GEAR-12T", 7).await?;
    Ok(())
}
