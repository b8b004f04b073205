//! Traffic simulator for the dev fleet (`outpost-central dev traffic`, `dev up --traffic`):
//! drives each selected site's local API the way its plant floor does (order entry with
//! Idempotency-Key retries, scanners posting shipment milestones in order, screens reading ATP
//! and prices), paced per site, and writes a record of every acknowledged write for drills to
//! check against central. I/O shell (HTTP, files, signals, clock) around the pure `plan` and
//! `report` modules.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

use crate::fleet_file::{FLEET_FILE, Fleet, FleetSite};
use outpost_central::paths::READY_FILE;

pub mod plan;
pub mod report;

use plan::{Attempt, Catalogue, Ledger, Pacer, Recorded, SitePlan};
use report::SiteStats;

/// Requests in flight at once per site: a handful of clients' worth, far below the agent's
/// `MAX_IN_FLIGHT_REQUESTS`; a tick that finds them all busy is skipped and counted, so a slow
/// agent slows the simulator down instead of piling up connections.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;
/// Limit on each request: a floor client gives up after this long and (for orders) retries.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Acknowledged writes kept for the record: ~2 hours at the default rates on 30 sites, a few
/// hundred MB at most. Past it the run stops with an error instead of dropping entries.
pub const DEFAULT_MAX_ACKNOWLEDGED: usize = 2_000_000;
/// Highest rate per kind and site the flags accept.
pub const MAX_RATE_PER_SEC: f64 = 10_000.0;
/// How long the simulator waits for requests in flight after it stops issuing new ones;
/// long enough for an order's retries to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause before an order's retry (times the attempt number).
pub const RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between two turns of a site's driver (a rate-0 kind never wakes it).
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// The SKUs of the demo catalogue `dev up` seeds (`dev::demo_catalogue`).
pub const DEMO_SKUS: [&str; 4] = ["BOLT-M8", "NUT-M8", "GEAR-12T", "MOTOR-2KW"];
/// The customers of the demo catalogue `dev up` seeds (`C-GAMMA` is on credit hold, so some
/// orders come back pending).
pub const DEMO_CUSTOMERS: [&str; 3] = ["C-ACME", "C-BETA", "C-GAMMA"];

#[derive(Debug, Clone)]
pub struct TrafficOptions {
    /// Orders per second per site.
    pub orders_per_sec: f64,
    /// Milestones per second per site.
    pub milestones_per_sec: f64,
    /// ATP and price reads per second per site.
    pub reads_per_sec: f64,
    /// Chance, in percent, that an order that got a 2xx is sent again with the same key.
    pub retry_pct: u8,
    /// `None`: until stopped.
    pub duration: Option<Duration>,
    /// Where the record of acknowledged writes goes (written atomically at the end).
    pub record: Option<PathBuf>,
    /// Print the live line every this often to stderr; `None`: quiet.
    pub live_every: Option<Duration>,
    /// `None`: a random seed (printed).
    pub seed: Option<u64>,
    pub skus: Vec<String>,
    pub customers: Vec<String>,
    pub max_in_flight: usize,
    pub request_timeout: Duration,
    pub max_acknowledged: usize,
}

impl Default for TrafficOptions {
    fn default() -> Self {
        TrafficOptions {
            orders_per_sec: 5.0,
            milestones_per_sec: 10.0,
            reads_per_sec: 20.0,
            retry_pct: 10,
            duration: None,
            record: None,
            live_every: Some(Duration::from_secs(1)),
            seed: None,
            skus: DEMO_SKUS.iter().map(|s| s.to_string()).collect(),
            customers: DEMO_CUSTOMERS.iter().map(|s| s.to_string()).collect(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_acknowledged: DEFAULT_MAX_ACKNOWLEDGED,
        }
    }
}

impl TrafficOptions {
    /// Every problem with the options, at once.
    pub fn validate(&self) -> Result<(), TrafficError> {
        let mut problems = Vec::new();
        for (flag, r) in [
            ("--orders-per-sec", self.orders_per_sec),
            ("--milestones-per-sec", self.milestones_per_sec),
            ("--reads-per-sec", self.reads_per_sec),
        ] {
            if !(0.0..=MAX_RATE_PER_SEC).contains(&r) {
                problems.push(format!("{flag} must be 0..={MAX_RATE_PER_SEC}, got {r}"));
            }
        }
        if self.retry_pct > 100 {
            problems.push(format!(
                "--retry-pct must be 0..=100, got {}",
                self.retry_pct
            ));
        }
        if self.skus.is_empty() || self.skus.iter().any(|s| !url_safe(s)) {
            problems.push("--skus must list at least one SKU of [A-Za-z0-9._:-]".into());
        }
        if self.customers.is_empty() || self.customers.iter().any(|s| !url_safe(s)) {
            problems
                .push("--customers must list at least one customer id of [A-Za-z0-9._:-]".into());
        }
        if self.max_in_flight == 0 {
            problems.push("the in-flight limit must be at least 1".into());
        }
        if self.duration == Some(Duration::ZERO) {
            problems.push("--duration must be longer than 0".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TrafficError::Options(problems))
        }
    }
}

/// Ids go into URL paths as they are.
fn url_safe(s: &str) -> bool {
    outpost_protocol::validate_id("id", s).is_ok()
}

/// One site to drive: where its API is and a token per role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub site: String,
    /// `http://127.0.0.1:PORT`.
    pub api: String,
    pub reader: String,
    pub scanner: String,
    pub order_entry: String,
}

impl Target {
    /// The site's targets from its fleet.json entry: each role's token (the admin token for a
    /// role a fleet file predating per-role tokens lacks).
    pub fn new(site: &FleetSite, api: String) -> Target {
        let role = |r: &str| site.tokens.get(r).unwrap_or(&site.token).clone();
        Target {
            site: site.id.clone(),
            api: api.trim_end_matches('/').to_string(),
            reader: role("reader"),
            scanner: role("scanner"),
            order_entry: role("order-entry"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("invalid options:\n  {}", .0.join("\n  "))]
    Options(Vec<String>),
    // The I/O errors are shown in the message and not chained as a source, so `{:#}` does not
    // print them twice.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("site {site} is not running (no {ready}: {error}); start the fleet with `dev up`")]
    NotRunning {
        site: String,
        ready: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not valid: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("no site {site:?} in the fleet (it has: {known})")]
    UnknownSite { site: String, known: String },
    #[error("the fleet has no sites to drive")]
    NoSites,
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("cannot write the record {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "the record reached its limit of {cap} acknowledged writes; the run was stopped{}",
        .record.as_ref().map(|p| format!(" and {} holds every one of them", p.display())).unwrap_or_default()
    )]
    RecordFull { cap: usize, record: Option<PathBuf> },
}

/// The sites of `fleet` (fleet.json or its directory) named in `only` (every site when empty),
/// with each API's real address: from the site's `ready.json` when fleet.json has port 0.
pub fn targets_from_fleet(fleet: &Path, only: &[String]) -> Result<Vec<Target>, TrafficError> {
    let file = if fleet.is_dir() {
        fleet.join(FLEET_FILE)
    } else {
        fleet.to_path_buf()
    };
    let bytes = std::fs::read(&file).map_err(|error| TrafficError::Read {
        path: file.clone(),
        error,
    })?;
    let fleet: Fleet = serde_json::from_slice(&bytes).map_err(|e| TrafficError::Format {
        path: file.clone(),
        detail: e.to_string(),
    })?;
    let known = || {
        fleet
            .sites
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let selected: Vec<&FleetSite> =
        if only.is_empty() {
            fleet.sites.iter().collect()
        } else {
            only.iter()
                .map(|id| {
                    fleet.sites.iter().find(|s| &s.id == id).ok_or_else(|| {
                        TrafficError::UnknownSite {
                            site: id.clone(),
                            known: known(),
                        }
                    })
                })
                .collect::<Result<_, _>>()?
        };
    if selected.is_empty() {
        return Err(TrafficError::NoSites);
    }
    selected
        .into_iter()
        .map(|s| Ok(Target::new(s, site_api(s)?)))
        .collect()
}

/// A site's API base URL; an ephemeral port (`:0` in fleet.json) is read from its ready file.
fn site_api(s: &FleetSite) -> Result<String, TrafficError> {
    if !s.api.ends_with(":0") {
        return Ok(s.api.clone());
    }
    let ready = Path::new(&s.data_dir).join(READY_FILE);
    let bytes = std::fs::read(&ready).map_err(|error| TrafficError::NotRunning {
        site: s.id.clone(),
        ready: ready.clone(),
        error,
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| TrafficError::Format {
        path: ready.clone(),
        detail: e.to_string(),
    })?;
    let addr = v["api"].as_str().ok_or_else(|| TrafficError::Format {
        path: ready.clone(),
        detail: "no \"api\" address".into(),
    })?;
    Ok(format!("http://{addr}"))
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    Signal,
    RecordFull,
}

impl StopReason {
    fn as_str(self) -> &'static str {
        match self {
            StopReason::Duration => "duration",
            StopReason::Signal => "signal",
            StopReason::RecordFull => "record_full",
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
// No caller reads it yet: `run` prints the summary and writes the record itself, and the report
// stays the value a run returns for callers that want the figures (it lived in the library).
#[allow(dead_code)]
pub struct TrafficReport {
    pub seed: u64,
    pub run: String,
    pub stopped_by: StopReason,
    pub sites: Vec<(String, SiteStats)>,
    pub acknowledged: usize,
    pub record: Option<PathBuf>,
}

/// A run in the background (`dev up --traffic`): `stop` ends it like Ctrl-C would.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<TrafficReport, TrafficError>>,
}

impl Running {
    /// Stops issuing, waits for the run to drain and write its record, and returns its result.
    pub async fn stop(self) -> Result<TrafficReport, TrafficError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Starts `run` in a task; `Running::stop` ends it.
pub fn spawn(targets: Vec<Target>, opts: TrafficOptions) -> Running {
    let (tx, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        run(targets, opts, stop).await
    });
    Running { stop: tx, task }
}

/// What every request task of a site shares.
struct SiteCtx {
    index: u16,
    target: Target,
    http: reqwest::Client,
    plan: Mutex<SitePlan>,
    stats: Mutex<SiteStats>,
    ledger: Arc<Mutex<Ledger>>,
    /// Set when the ledger passes its soft cap: the run stops.
    full: Arc<Notify>,
    /// Set when the run stops: no new retries.
    stopping: Arc<AtomicBool>,
}

/// Drives `targets` until `opts.duration` passes, `stop` completes or the record is full; then
/// stops issuing, waits (at most `DRAIN_TIMEOUT`) for requests in flight, prints the summary to
/// stdout and writes the record. A full record is an error, after the record is written.
pub async fn run(
    targets: Vec<Target>,
    opts: TrafficOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<TrafficReport, TrafficError> {
    opts.validate()?;
    if targets.is_empty() {
        return Err(TrafficError::NoSites);
    }
    let seed = opts.seed.unwrap_or_else(rand::random);
    let run_tag = format!("{:08x}", rand::random::<u32>());
    let started = SystemTime::now();
    let catalogue = Catalogue {
        skus: opts.skus.clone(),
        customers: opts.customers.clone(),
    };
    // Room above the soft cap for every request that can be in flight when it is reached: each
    // adds at most one entry (an order's retries share its key).
    let headroom = targets.len() * opts.max_in_flight;
    let ledger = Arc::new(Mutex::new(Ledger::new(
        targets.iter().map(|t| t.site.clone()).collect(),
        opts.max_acknowledged.saturating_sub(headroom).max(1),
    )));
    let full = Arc::new(Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));
    let mut ctxs = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let http = reqwest::Client::builder()
            .timeout(opts.request_timeout)
            .connect_timeout(opts.request_timeout)
            .pool_max_idle_per_host(opts.max_in_flight)
            .build()
            .map_err(TrafficError::Client)?;
        ctxs.push(Arc::new(SiteCtx {
            index: u16::try_from(i).expect("fleet files hold far fewer than 65536 sites"),
            target: t.clone(),
            http,
            plan: Mutex::new(SitePlan::new(
                &t.site,
                i,
                &run_tag,
                seed,
                catalogue.clone(),
                opts.retry_pct,
            )),
            stats: Mutex::new(SiteStats::default()),
            ledger: ledger.clone(),
            full: full.clone(),
            stopping: stopping.clone(),
        }));
    }
    eprintln!(
        "traffic: {} site(s) ({}), seed {seed}, run {run_tag}, per site {}/s orders, \
         {}/s milestones, {}/s reads, {}% retries{}",
        targets.len(),
        targets
            .iter()
            .map(|t| t.site.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        opts.orders_per_sec,
        opts.milestones_per_sec,
        opts.reads_per_sec,
        opts.retry_pct,
        opts.duration
            .map(|d| format!(", for {}", humantime::format_duration(d)))
            .unwrap_or_default(),
    );

    let start = tokio::time::Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut drivers = JoinSet::new();
    for ctx in &ctxs {
        drivers.spawn(drive_site(
            ctx.clone(),
            opts.clone(),
            start,
            stop_rx.clone(),
        ));
    }

    let deadline = opts.duration.map(|d| start + d);
    let live_every = opts.live_every.unwrap_or(Duration::from_secs(3600));
    let mut live = tokio::time::interval_at(start + live_every, live_every);
    live.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prev = (start, SiteStats::default());
    tokio::pin!(stop);
    let stopped_by = loop {
        tokio::select! {
            _ = &mut stop => break StopReason::Signal,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => break StopReason::Duration,
            _ = full.notified() => break StopReason::RecordFull,
            now = live.tick() => {
                if opts.live_every.is_some() {
                    let total = totals(&ctxs);
                    eprintln!("{}", report::live_line(now - start, &total, &prev.1, now - prev.0));
                    prev = (now, total);
                }
            }
        }
    };
    stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    // Each driver drains its own requests within DRAIN_TIMEOUT; the outer bound is a backstop.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(5), async {
        while drivers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        drivers.abort_all();
    }
    let ended = SystemTime::now();

    let sites: Vec<(String, SiteStats)> = ctxs
        .iter()
        .map(|c| {
            let mut s = c.stats.lock().expect("stats lock").clone();
            let plan = c.plan.lock().expect("plan lock");
            s.shipments_completed = plan.shipments.completed;
            s.shipments_abandoned = plan.shipments.abandoned;
            (c.target.site.clone(), s)
        })
        .collect();
    let ledger = ledger.lock().expect("ledger lock");
    println!(
        "\ntraffic ran {:.1} s (stopped by {}), seed {seed}, run {run_tag}, {} acknowledged writes\n",
        ended
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64(),
        stopped_by.as_str(),
        ledger.len()
    );
    print!("{}", report::summary(&sites));
    if let Some(path) = &opts.record {
        write_record(
            path, started, ended, seed, &run_tag, stopped_by, &sites, &ledger,
        )?;
        println!("\nrecord: {}", path.display());
    }
    if stopped_by == StopReason::RecordFull {
        return Err(TrafficError::RecordFull {
            cap: opts.max_acknowledged,
            record: opts.record.clone(),
        });
    }
    Ok(TrafficReport {
        seed,
        run: run_tag,
        stopped_by,
        sites,
        acknowledged: ledger.len(),
        record: opts.record.clone(),
    })
}

fn totals(ctxs: &[Arc<SiteCtx>]) -> SiteStats {
    let mut t = SiteStats::default();
    for c in ctxs {
        t.add(&c.stats.lock().expect("stats lock"));
    }
    t
}

/// The record file: written to a temporary file beside it, synced, then renamed over it, so a
/// reader sees the whole record or none.
#[allow(clippy::too_many_arguments)]
fn write_record(
    path: &Path,
    started: SystemTime,
    ended: SystemTime,
    seed: u64,
    run: &str,
    stopped_by: StopReason,
    sites: &[(String, SiteStats)],
    ledger: &Ledger,
) -> Result<(), TrafficError> {
    use serde::Serialize;
    use std::io::Write;

    #[derive(Serialize)]
    struct Record<'a> {
        started: String,
        ended: String,
        seed: u64,
        run: &'a str,
        stopped_by: &'static str,
        sites: serde_json::Map<String, Value>,
        acknowledged: AckList<'a>,
    }
    struct AckList<'a>(&'a Ledger);
    impl Serialize for AckList<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.entries().iter().map(|a| self.0.json(a)))
        }
    }

    let record = Record {
        started: humantime::format_rfc3339_millis(started).to_string(),
        ended: humantime::format_rfc3339_millis(ended).to_string(),
        seed,
        run,
        stopped_by: stopped_by.as_str(),
        sites: sites
            .iter()
            .map(|(site, s)| (site.clone(), s.json()))
            .collect(),
        acknowledged: AckList(ledger),
    };
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |error| TrafficError::Write { path: p, error }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "traffic.json".into());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let file = std::fs::File::create(&tmp).map_err(err(&tmp))?;
    let mut w = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut w, &record).map_err(|e| TrafficError::Write {
        path: tmp.clone(),
        error: e.into(),
    })?;
    w.write_all(b"\n").map_err(err(&tmp))?;
    let file = w.into_inner().map_err(|e| err(&tmp)(e.into_error()))?;
    file.sync_all().map_err(err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(err(path))?;
    Ok(())
}

/// The kinds of request a driver paces.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Order,
    Milestone,
    Read,
}

/// One site's driver: hands out each kind's ticks as they fall due, each to a task holding one
/// of the site's in-flight permits (a tick with none free is skipped); on stop, waits for its
/// tasks (at most `DRAIN_TIMEOUT`, then aborts them and counts them).
async fn drive_site(
    ctx: Arc<SiteCtx>,
    opts: TrafficOptions,
    start: tokio::time::Instant,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(opts.max_in_flight));
    let mut pacers = [
        (Kind::Order, Pacer::new(opts.orders_per_sec)),
        (Kind::Milestone, Pacer::new(opts.milestones_per_sec)),
        (Kind::Read, Pacer::new(opts.reads_per_sec)),
    ];
    let mut tasks = JoinSet::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let elapsed = start.elapsed();
        for (kind, pacer) in pacers.iter_mut() {
            let due = pacer.poll(elapsed);
            let mut skipped = 0;
            for _ in 0..due.send {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                let ctx = ctx.clone();
                match *kind {
                    Kind::Order => {
                        let req = ctx.plan.lock().expect("plan lock").next_order();
                        tasks.spawn(async move {
                            order(&ctx, req).await;
                            drop(permit);
                        });
                    }
                    Kind::Milestone => {
                        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
                        let Some(req) = ctx.plan.lock().expect("plan lock").poll_milestone(&at)
                        else {
                            skipped += 1;
                            continue;
                        };
                        tasks.spawn(async move {
                            milestone(&ctx, req).await;
                            drop(permit);
                        });
                    }
                    Kind::Read => {
                        let req = ctx.plan.lock().expect("plan lock").next_read();
                        tasks.spawn(async move {
                            read(&ctx, req).await;
                            drop(permit);
                        });
                    }
                }
            }
            if skipped + due.late > 0 {
                let mut s = ctx.stats.lock().expect("stats lock");
                s.skipped_ticks += skipped;
                s.late_ticks += due.late;
            }
        }
        while tasks.try_join_next().is_some() {}
        let next = pacers
            .iter()
            .filter_map(|(_, p)| p.next_due())
            .min()
            .map_or(start.elapsed() + IDLE_WAIT, |d| {
                d.min(start.elapsed() + IDLE_WAIT)
            });
        tokio::select! {
            _ = tokio::time::sleep_until(start + next) => {}
            _ = stop.changed() => {}
        }
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let n = tasks.len() as u64;
        tasks.abort_all();
        ctx.stats.lock().expect("stats lock").aborted += n;
    }
}

/// How one request ended.
enum Outcome {
    /// 2xx with its JSON body.
    Ok(Value),
    /// Anything else, with its class for the counters.
    Failed { class: String, attempt: Attempt },
}

/// Sends one request and classifies the answer.
async fn send(rb: reqwest::RequestBuilder) -> Outcome {
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return transport_failure(&e),
    };
    let status = resp.status().as_u16();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return transport_failure(&e),
    };
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match Attempt::of_status(status) {
        Attempt::Ok => Outcome::Ok(json),
        attempt => {
            let class = match json["error"]["code"].as_str() {
                Some(code) => format!("{status} {code}"),
                None => status.to_string(),
            };
            Outcome::Failed { class, attempt }
        }
    }
}

fn transport_failure(e: &reqwest::Error) -> Outcome {
    let class = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    Outcome::Failed {
        class: class.into(),
        attempt: Attempt::Transient,
    }
}

/// An order: sent, then resent with the same key and body while the plan says so. Each 2xx goes
/// to the ledger; a 2xx naming another order (or seq) than the key's first is an error.
async fn order(ctx: &SiteCtx, req: plan::OrderRequest) {
    let url = format!("{}/v1/orders", ctx.target.api);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let t0 = Instant::now();
        let rb = ctx
            .http
            .post(&url)
            .bearer_auth(&ctx.target.order_entry)
            .header(outpost_protocol::IDEMPOTENCY_KEY_HEADER, &req.key)
            .json(&req.body);
        ctx.stats.lock().expect("stats lock").orders.sent += 1;
        let outcome = send(rb).await;
        let latency = t0.elapsed();
        let attempt = match outcome {
            Outcome::Ok(body) => {
                let id = body["order_id"].as_str();
                let seq = body["seq"].as_u64();
                let status = body["status"].as_str().unwrap_or("unknown");
                let mut stats = ctx.stats.lock().expect("stats lock");
                stats.orders.record_ok(latency);
                match (id, seq) {
                    (Some(id), Some(seq)) => {
                        let (recorded, full) = {
                            let mut l = ctx.ledger.lock().expect("ledger lock");
                            let r = l.handle_order(ctx.index, &req.key, id, seq, status);
                            (r, l.is_full())
                        };
                        match recorded {
                            Recorded::New => stats.count_new_order(status),
                            Recorded::Repeat => {}
                            Recorded::Mismatch {
                                first_id,
                                first_seq,
                            } => {
                                stats.orders.record_error("id_mismatch");
                                eprintln!(
                                    "traffic: {} Idempotency-Key {} answered order {id} (seq \
                                     {seq}) after {first_id} (seq {first_seq})",
                                    ctx.target.site, req.key
                                );
                            }
                        }
                        if full {
                            ctx.full.notify_one();
                        }
                    }
                    _ => stats.orders.record_error("bad_answer"),
                }
                Attempt::Ok
            }
            Outcome::Failed { class, attempt } => {
                ctx.stats
                    .lock()
                    .expect("stats lock")
                    .orders
                    .record_error(&class);
                attempt
            }
        };
        if ctx.stopping.load(Ordering::SeqCst)
            || !ctx
                .plan
                .lock()
                .expect("plan lock")
                .order_retry(attempts, attempt)
        {
            return;
        }
        ctx.stats.lock().expect("stats lock").retries += 1;
        tokio::time::sleep(RETRY_DELAY * attempts).await;
    }
}

/// A milestone: sent once; the shipment resends the same event at a later tick if it failed.
async fn milestone(ctx: &SiteCtx, req: plan::MilestoneRequest) {
    let t0 = Instant::now();
    let rb = ctx
        .http
        .post(format!("{}{}", ctx.target.api, req.path()))
        .bearer_auth(&ctx.target.scanner)
        .json(&req.body());
    ctx.stats.lock().expect("stats lock").milestones.sent += 1;
    let outcome = send(rb).await;
    let latency = t0.elapsed();
    let acked = match outcome {
        Outcome::Ok(body) => {
            let mut stats = ctx.stats.lock().expect("stats lock");
            stats.milestones.record_ok(latency);
            match body["seq"].as_u64() {
                Some(seq) => {
                    let (recorded, full) = {
                        let mut l = ctx.ledger.lock().expect("ledger lock");
                        let r = l.handle_milestone(
                            ctx.index,
                            &req.event_id,
                            &req.shipment_id,
                            req.milestone,
                            seq,
                        );
                        (r, l.is_full())
                    };
                    if let Recorded::Mismatch { first_seq, .. } = recorded {
                        stats.milestones.record_error("seq_mismatch");
                        eprintln!(
                            "traffic: {} event {} answered seq {seq} after seq {first_seq}",
                            ctx.target.site, req.event_id
                        );
                    }
                    if full {
                        ctx.full.notify_one();
                    }
                    true
                }
                None => {
                    stats.milestones.record_error("bad_answer");
                    false
                }
            }
        }
        Outcome::Failed { class, .. } => {
            ctx.stats
                .lock()
                .expect("stats lock")
                .milestones
                .record_error(&class);
            false
        }
    };
    ctx.plan
        .lock()
        .expect("plan lock")
        .handle_milestone(&req.event_id, acked);
}

/// A screen's read.
async fn read(ctx: &SiteCtx, req: plan::ReadRequest) {
    let t0 = Instant::now();
    let rb = ctx
        .http
        .get(format!("{}{}", ctx.target.api, req.path()))
        .bearer_auth(&ctx.target.reader);
    ctx.stats.lock().expect("stats lock").reads.sent += 1;
    let outcome = send(rb).await;
    let latency = t0.elapsed();
    let mut stats = ctx.stats.lock().expect("stats lock");
    match outcome {
        Outcome::Ok(_) => stats.reads.record_ok(latency),
        Outcome::Failed { class, .. } => stats.reads.record_error(&class),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_report_every_problem_at_once() {
        TrafficOptions::default().validate().unwrap();
        let bad = TrafficOptions {
            orders_per_sec: -1.0,
            reads_per_sec: f64::NAN,
            retry_pct: 101,
            skus: vec![],
            customers: vec!["has space".into()],
            duration: Some(Duration::ZERO),
            ..TrafficOptions::default()
        };
        let TrafficError::Options(problems) = bad.validate().unwrap_err() else {
            panic!("options error")
        };
        assert_eq!(problems.len(), 6, "{problems:?}");
    }

    #[test]
    fn demo_defaults_match_the_catalogue_dev_up_seeds() {
        let (customers, prices, _) = crate::dev::demo_catalogue(&["plant-1".into()]);
        for c in DEMO_CUSTOMERS {
            assert!(
                customers.as_array().unwrap().iter().any(|x| x["id"] == c),
                "{c}"
            );
        }
        for s in DEMO_SKUS {
            assert!(
                prices.as_array().unwrap().iter().any(|x| x["sku"] == s),
                "{s}"
            );
        }
    }

    #[test]
    fn targets_use_each_roles_token_and_ready_files_for_port_0() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = crate::dev::init(&crate::dev::InitOptions {
            dir: dir.path().to_path_buf(),
            sites: 2,
            base_port: 0,
            force: false,
            agent_bin: Some(PathBuf::from("/bin/true")),
        })
        .unwrap();
        // No ready file yet: a clear error naming it.
        let err = targets_from_fleet(dir.path(), &[]).unwrap_err();
        assert!(err.to_string().contains(READY_FILE), "{err}");
        for s in &fleet.sites {
            std::fs::write(
                Path::new(&s.data_dir).join(READY_FILE),
                r#"{"pid":1,"api":"127.0.0.1:4567"}"#,
            )
            .unwrap();
        }
        let t = targets_from_fleet(&dir.path().join(FLEET_FILE), &["plant-2".into()]).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].site, "plant-2");
        assert_eq!(t[0].api, "http://127.0.0.1:4567");
        assert_eq!(t[0].reader, fleet.sites[1].tokens["reader"]);
        assert_eq!(t[0].scanner, fleet.sites[1].tokens["scanner"]);
        assert_eq!(t[0].order_entry, fleet.sites[1].tokens["order-entry"]);
        let err = targets_from_fleet(dir.path(), &["dc-1".into()]).unwrap_err();
        assert!(err.to_string().contains("plant-1, plant-2"), "{err}");
    }

    /// Goal: the record is written whole and parses, with one entry per key.
    #[test]
    fn the_record_is_written_atomically_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("traffic.json");
        std::fs::write(&path, "old").unwrap();
        let mut l = Ledger::new(vec!["plant-1".into()], 10);
        l.handle_order(0, "k", "plant-1-o1", 1, "confirmed");
        l.handle_order(0, "k", "plant-1-o1", 1, "confirmed");
        l.handle_milestone(0, "e", "SH", outpost_protocol::MilestoneKind::Picked, 2);
        let now = SystemTime::now();
        let sites = vec![("plant-1".to_string(), SiteStats::default())];
        write_record(&path, now, now, 7, "abcd", StopReason::Signal, &sites, &l).unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["acknowledged"].as_array().unwrap().len(), 2);
        assert_eq!(v["acknowledged"][0]["key"], "k");
        assert_eq!(v["stopped_by"], "signal");
        assert!(v["sites"]["plant-1"]["orders"].is_object());
        humantime::parse_rfc3339(v["started"].as_str().unwrap()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }
}
