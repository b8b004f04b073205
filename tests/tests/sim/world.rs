//! One simulated fleet: central and a few agents, each on its own simulated disk, joined by the
//! simulated network, driven tick by tick from one seed.
//!
//! What runs is the product's own code: the agent's store (`outpost_agent::store::Store`: order
//! capture against allowances, idempotency, outbox, acks, master data), central's store
//! (`outpost_central::store::Store`: session start and top-ups, ingest planning and
//! de-duplication, feed, exception queue, allowance ledger, master log), redb itself on a disk
//! that loses unsynced writes, the protocol's frames, `Uploader` and `check_hello`. What is
//! replaced is the transport (QUIC streams become `net::Conn`) and the few lines of session glue
//! in `agent/src/sync.rs` and `central/src/quic.rs` that move messages between the two, which
//! are written out here step for step.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_agent::store as agent_store;
use outpost_central::ledger::Targets;
use outpost_central::store as central_store;
use outpost_protocol::session::{Uploader, check_hello};
use outpost_protocol::{
    AgentMsg, AtpRecord, CentralMsg, CustomerRecord, EventBody, FrameDecoder, Hello, LinePromise,
    MAX_CHANGES_PER_FRAME, MasterBatch, MasterChange, MilestoneKind, Money, PROTOCOL_VERSION,
    PriceRecord, Refuse, RefuseCode, Welcome, encode,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;

use super::disk::Disk;
use super::net::{Conn, IDLE_TIMEOUT_MS, LinkFaults};

/// One step of simulated time.
pub const TICK_MS: u64 = 10;
/// Most ticks spent healing and draining after the workload before the run counts as stuck.
const DRAIN_TICKS: u64 = 6_000;
/// Events in flight per session and per frame (small, so windows and batches matter).
const WINDOW: u64 = 16;
const BATCH: u64 = 4;
const SKUS: [(&str, &str); 2] = [("SKU-A", "10.00"), ("SKU-B", "25.00")];
/// (customer, credit limit): C2's limit is tight, so its credit escrow binds.
const CUSTOMERS: [(&str, &str); 2] = [("C1", "100000.00"), ("C2", "300.00")];
/// Simulated wall clock at tick 0 (ms since the epoch).
const EPOCH_MS: i64 = 1_800_000_000_000;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub sites: usize,
    /// Ticks of workload and faults before everything heals.
    pub steps: u64,
    /// A broken variant: fsync does nothing on every disk.
    pub lie_fsync: bool,
    /// A broken variant: central acknowledges a batch before committing it.
    pub ack_before_commit: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            sites: 2,
            steps: 400,
            lie_fsync: false,
            ack_before_commit: false,
        }
    }
}

/// An order's promises as (sku, qty, confirmed), line by line.
pub type Promised = Vec<(String, i64, bool)>;

/// What a client saw for one logical request (one idempotency key or milestone event id),
/// over all its attempts.
#[derive(Clone, Debug)]
pub struct Request {
    pub site: usize,
    pub kind: Kind,
    /// Every 2xx answer: the order id, or `seq:N` for a milestone.
    pub acks: Vec<String>,
    /// The promises of the first 2xx order answer: (sku, qty, confirmed).
    pub promised: Option<Promised>,
    pub failed: u32,
    pub unknown: u32,
}

#[derive(Clone, Debug)]
pub enum Kind {
    Order {
        key: String,
        order: agent_store::NewOrder,
    },
    Milestone(agent_store::NewMilestone),
}

impl Kind {
    pub fn id(&self) -> &str {
        match self {
            Kind::Order { key, .. } => key,
            Kind::Milestone(m) => &m.event_id,
        }
    }
}

/// Counts of what happened in one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
    pub retries: u64,
    pub agent_crashes: u64,
    pub central_crashes: u64,
    pub cuts_mid_commit: u64,
    pub crashes_before_reply: u64,
    pub crashes_before_ack: u64,
    pub partitions: u64,
    pub one_way: u64,
    pub loss: u64,
    pub latency: u64,
    pub flaps: u64,
    pub connections: u64,
    pub superseded: u64,
    pub drain_ticks: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.attempts += o.attempts;
        self.ok += o.ok;
        self.failed += o.failed;
        self.unknown += o.unknown;
        self.retries += o.retries;
        self.agent_crashes += o.agent_crashes;
        self.central_crashes += o.central_crashes;
        self.cuts_mid_commit += o.cuts_mid_commit;
        self.crashes_before_reply += o.crashes_before_reply;
        self.crashes_before_ack += o.crashes_before_ack;
        self.partitions += o.partitions;
        self.one_way += o.one_way;
        self.loss += o.loss;
        self.latency += o.latency;
        self.flaps += o.flaps;
        self.connections += o.connections;
        self.superseded += o.superseded;
        self.drain_ticks = self.drain_ticks.max(o.drain_ticks);
    }
}

/// What the checker reads at the end: the requests, central's contents, the bounds.
pub struct Outcome {
    pub requests: Vec<Request>,
    pub site_names: Vec<String>,
    /// Every order and milestone central holds (feed and exception queue): (site, body).
    pub at_central: Vec<(String, EventBody)>,
    pub dead_letters: usize,
    /// (sku, site) → ATP the ERP published.
    pub atp: BTreeMap<(String, String), i64>,
    /// customer → (credit limit units, unit price units per sku)
    pub credit: BTreeMap<String, i64>,
    pub prices: BTreeMap<String, i64>,
    /// Problems seen while running (protocol refusals that must not happen, stores that did
    /// not reopen, a run that did not drain).
    pub problems: Vec<String>,
    pub stats: Stats,
}

struct AgentHost {
    name: String,
    disk: Disk,
    store: Option<agent_store::Store>,
    writer: Option<agent_store::StoreWriter>,
    restart_at: Option<u64>,
    conn: Option<u64>,
    uploader: Option<Uploader>,
    next_attempt: u64,
    faults: LinkFaults,
}

struct CentralHost {
    disk: Disk,
    store: Option<central_store::Store>,
    restart_at: Option<u64>,
    /// conn → master revision the agent holds, once its Hello was accepted.
    sessions: BTreeMap<u64, u64>,
    /// site → its live connection.
    live: BTreeMap<usize, u64>,
    /// A power cut is armed on central's disk.
    armed: bool,
}

/// A fault that ends at a given time.
#[derive(Clone, Copy, Debug)]
enum Heal {
    Partition,
    Up,
    Down,
    Loss,
    Latency,
    Flap,
}

struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    now: u64,
    agents: Vec<AgentHost>,
    central: CentralHost,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    heals: Vec<(u64, usize, Heal)>,
    requests: Vec<Request>,
    /// Index into `requests` by (site, id).
    by_id: BTreeMap<(usize, String), usize>,
    next_id: u64,
    stats: Stats,
    problems: Vec<String>,
    atp: BTreeMap<(String, String), i64>,
}

fn store_opts() -> central_store::StoreOptions {
    central_store::StoreOptions {
        targets: Targets {
            atp_units: 6,
            credit_fraction: 0.2,
        },
        reclaim_silent_secs: 86_400,
    }
}

fn open_agent(
    name: &str,
    disk: &Disk,
) -> Result<(agent_store::Store, agent_store::StoreWriter), String> {
    let d = disk.clone();
    agent_store::Store::open_on_backend(name, Path::new(name), move || Ok(d.backend()))
        .map_err(|e| format!("agent {name}: store did not open after a crash: {e}"))
}

fn open_central(disk: &Disk) -> Result<central_store::Store, String> {
    let d = disk.clone();
    central_store::Store::open_on_backend(Path::new("central"), store_opts(), move || {
        Ok(d.backend())
    })
    .map_err(|e| format!("central: store did not open after a crash: {e}"))
}

fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, String> {
    let mut d = FrameDecoder::new();
    d.push(frame);
    match d.poll_frame::<T>() {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err("incomplete frame".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    encode(msg).expect("simulated messages fit in a frame")
}

fn money(s: &str) -> Money {
    Money::parse(s).expect("valid amount")
}

/// Runs one seed and returns what the checker needs.
pub async fn run(cfg: SimConfig) -> Outcome {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let central_disk = Disk::new(cfg.lie_fsync);
    let central = open_central(&central_disk).expect("a new central store opens");
    let mut atp = BTreeMap::new();
    let mut changes = Vec::new();
    for (sku, price) in SKUS {
        changes.push(MasterChange::Price(PriceRecord {
            sku: sku.into(),
            customer: None,
            unit_price: money(price),
            currency: "EUR".into(),
        }));
    }
    for (id, limit) in CUSTOMERS {
        changes.push(MasterChange::Customer(CustomerRecord {
            id: id.into(),
            name: format!("Customer {id}"),
            credit_limit: money(limit),
            on_hold: false,
        }));
    }
    let names: Vec<String> = (1..=cfg.sites).map(|i| format!("plant-{i}")).collect();
    for name in &names {
        for (sku, _) in SKUS {
            let available = rng.random_range(5..=40);
            atp.insert((sku.to_string(), name.clone()), available);
            changes.push(MasterChange::Atp(AtpRecord {
                sku: sku.into(),
                site: name.clone(),
                available,
            }));
        }
    }
    central
        .upsert_master(changes)
        .await
        .expect("the catalogue is valid");
    let mut agents = Vec::new();
    for name in &names {
        let disk = Disk::new(cfg.lie_fsync);
        let (store, writer) = open_agent(name, &disk).expect("a new agent store opens");
        agents.push(AgentHost {
            name: name.clone(),
            disk,
            store: Some(store),
            writer: Some(writer),
            restart_at: None,
            conn: None,
            uploader: None,
            next_attempt: 0,
            faults: LinkFaults::default(),
        });
    }
    let mut sim = Sim {
        rng,
        now: 0,
        agents,
        central: CentralHost {
            disk: central_disk,
            store: Some(central),
            restart_at: None,
            sessions: BTreeMap::new(),
            live: BTreeMap::new(),
            armed: false,
        },
        conns: BTreeMap::new(),
        next_conn: 1,
        heals: Vec::new(),
        requests: Vec::new(),
        by_id: BTreeMap::new(),
        next_id: 1,
        stats: Stats::default(),
        problems: Vec::new(),
        atp,
        cfg,
    };
    for _ in 0..sim.cfg.steps {
        sim.now += TICK_MS;
        sim.faults();
        sim.restarts();
        sim.client().await;
        sim.network().await;
    }
    sim.heal_everything();
    sim.restarts();
    sim.resolve_unknowns().await;
    let mut drained = false;
    for t in 0..DRAIN_TICKS {
        sim.now += TICK_MS;
        sim.restarts();
        sim.network().await;
        if sim.drained() {
            sim.stats.drain_ticks = t;
            drained = true;
            break;
        }
    }
    if !drained {
        let marks: Vec<String> = sim
            .agents
            .iter()
            .map(|a| match a.store.as_ref().map(|s| s.marks()) {
                Some(Ok(m)) => format!("{}: acked {} of {}", a.name, m.acked_seq, m.last_seq),
                _ => format!("{}: down", a.name),
            })
            .collect();
        sim.problems.push(format!(
            "not drained {} s after everything healed: {}",
            DRAIN_TICKS * TICK_MS / 1000,
            marks.join(", ")
        ));
    }
    sim.finish().await
}

impl Sim {
    fn site_of(&self, conn: u64) -> Option<usize> {
        self.conns.get(&conn).map(|c| c.site)
    }

    // ----- faults -------------------------------------------------------------------------

    fn faults(&mut self) {
        let now = self.now;
        let due: Vec<_> = self
            .heals
            .iter()
            .copied()
            .filter(|(at, _, _)| *at <= now)
            .collect();
        self.heals.retain(|(at, _, _)| *at > now);
        for (_, site, h) in due {
            let f = &mut self.agents[site].faults;
            match h {
                Heal::Partition => {
                    f.up_blocked = false;
                    f.down_blocked = false;
                }
                Heal::Up => f.up_blocked = false,
                Heal::Down => f.down_blocked = false,
                Heal::Loss => f.loss_pct = 0,
                Heal::Latency => f.latency_ms = (1, 5),
                Heal::Flap => f.flap = None,
            }
        }
        if !self.rng.random_bool(0.03) {
            return;
        }
        let site = self.rng.random_range(0..self.agents.len());
        let until = now + self.rng.random_range(100..=3_000);
        match self.rng.random_range(0..10) {
            0 | 1 => {
                let f = &mut self.agents[site].faults;
                f.up_blocked = true;
                f.down_blocked = true;
                self.heals.push((until, site, Heal::Partition));
                self.stats.partitions += 1;
            }
            2 => {
                let up = self.rng.random_bool(0.5);
                let f = &mut self.agents[site].faults;
                if up {
                    f.up_blocked = true;
                } else {
                    f.down_blocked = true;
                }
                self.heals
                    .push((until, site, if up { Heal::Up } else { Heal::Down }));
                self.stats.one_way += 1;
            }
            3 => {
                self.agents[site].faults.loss_pct = self.rng.random_range(10..=60);
                self.heals.push((until, site, Heal::Loss));
                self.stats.loss += 1;
            }
            4 => {
                let lo = self.rng.random_range(1..=30);
                let hi = lo + self.rng.random_range(0..=400);
                self.agents[site].faults.latency_ms = (lo, hi);
                self.heals.push((until, site, Heal::Latency));
                self.stats.latency += 1;
            }
            5 => {
                let period = self.rng.random_range(100..=600);
                self.agents[site].faults.flap = Some((period, now));
                self.heals.push((until, site, Heal::Flap));
                self.stats.flaps += 1;
            }
            6 | 7 => {
                if self.agents[site].store.is_some() {
                    self.crash_agent(site);
                }
            }
            8 => {
                if self.central.store.is_some() {
                    self.crash_central();
                }
            }
            _ => {
                // A power cut somewhere in central's next few I/O calls: mid-commit, between a
                // commit and its ack, or while reading.
                if self.central.store.is_some() && !self.central.armed {
                    let ops = self.rng.random_range(0..60);
                    self.central.disk.arm(ops);
                    self.central.armed = true;
                }
            }
        }
    }

    fn heal_everything(&mut self) {
        self.heals.clear();
        for a in &mut self.agents {
            a.faults = LinkFaults::default();
            if a.store.is_none() {
                a.restart_at = Some(self.now);
            }
        }
        self.central.disk.disarm();
        self.central.armed = false;
        if self.central.store.is_none() {
            self.central.restart_at = Some(self.now);
        }
    }

    fn crash_agent(&mut self, site: usize) {
        self.stats.agent_crashes += 1;
        let a = &mut self.agents[site];
        a.disk.cut();
        // The process is gone: its store handles go with it (the writer thread finds a dead
        // disk and stops on its own).
        a.store = None;
        a.writer = None;
        a.uploader = None;
        if let Some(c) = a.conn.take()
            && let Some(conn) = self.conns.get_mut(&c)
        {
            conn.agent_open = false;
        }
        let a = &mut self.agents[site];
        a.restart_at = Some(self.now + self.rng.random_range(50..=2_000));
    }

    fn crash_central(&mut self) {
        self.stats.central_crashes += 1;
        self.central.disk.cut();
        self.central.store = None;
        self.central.armed = false;
        self.central.sessions.clear();
        self.central.live.clear();
        for c in self.conns.values_mut() {
            c.central_open = false;
        }
        self.central.restart_at = Some(self.now + self.rng.random_range(50..=2_000));
    }

    /// Brings crashed hosts back on what their disks kept.
    fn restarts(&mut self) {
        let now = self.now;
        if self.central.restart_at.is_some_and(|t| t <= now) {
            self.central.restart_at = None;
            let image = self.central.disk.crash_image(&mut self.rng);
            let disk = Disk::from_image(image, self.cfg.lie_fsync);
            match open_central(&disk) {
                Ok(s) => {
                    self.central.store = Some(s);
                    self.central.disk = disk;
                }
                Err(e) => {
                    self.problems.push(e);
                    // Stays down: the run will not drain and says so.
                    self.central.disk = disk;
                    self.central.restart_at = None;
                }
            }
        }
        for i in 0..self.agents.len() {
            if self.agents[i].restart_at.is_none_or(|t| t > now) {
                continue;
            }
            self.agents[i].restart_at = None;
            let image = self.agents[i].disk.crash_image(&mut self.rng);
            let disk = Disk::from_image(image, self.cfg.lie_fsync);
            match open_agent(&self.agents[i].name, &disk) {
                Ok((s, w)) => {
                    let a = &mut self.agents[i];
                    a.store = Some(s);
                    a.writer = Some(w);
                    a.next_attempt = now;
                }
                Err(e) => self.problems.push(e),
            }
            self.agents[i].disk = disk;
        }
    }

    // ----- clients ------------------------------------------------------------------------

    async fn client(&mut self) {
        if !self.rng.random_bool(0.35) {
            return;
        }
        let site = self.rng.random_range(0..self.agents.len());
        let order = self.rng.random_bool(0.5);
        // Real clients retry after a timeout or an error, with the same key.
        let earlier: Vec<usize> = self
            .requests
            .iter()
            .enumerate()
            .filter(|(_, r)| r.site == site && matches!(r.kind, Kind::Order { .. }) == order)
            .map(|(i, _)| i)
            .collect();
        let idx = if !earlier.is_empty() && self.rng.random_bool(0.15) {
            self.stats.retries += 1;
            earlier[self.rng.random_range(0..earlier.len())]
        } else {
            let n = self.next_id;
            self.next_id += 1;
            let kind = if order {
                let customer = CUSTOMERS[self.rng.random_range(0..CUSTOMERS.len())].0;
                let lines = (0..self.rng.random_range(1..=2))
                    .map(|_| agent_store::NewLine {
                        sku: SKUS[self.rng.random_range(0..SKUS.len())].0.to_string(),
                        qty: self.rng.random_range(1..=6),
                    })
                    .collect();
                Kind::Order {
                    key: format!("k{n}"),
                    order: agent_store::NewOrder {
                        customer_id: customer.into(),
                        lines,
                    },
                }
            } else {
                Kind::Milestone(agent_store::NewMilestone {
                    event_id: format!("m{n}"),
                    shipment_id: format!("sh{n}"),
                    milestone: MilestoneKind::Picked,
                    scanner_id: "scanner-1".into(),
                    at: "2027-01-15T08:00:00Z".into(),
                })
            };
            self.by_id
                .insert((site, kind.id().to_string()), self.requests.len());
            self.requests.push(Request {
                site,
                kind,
                acks: Vec::new(),
                promised: None,
                failed: 0,
                unknown: 0,
            });
            self.requests.len() - 1
        };
        self.attempt(idx, true).await;
    }

    /// One attempt of request `idx` at its site. `faults`: power cuts and crashes may strike.
    async fn attempt(&mut self, idx: usize, faults: bool) {
        self.stats.attempts += 1;
        let site = self.requests[idx].site;
        let Some(store) = self.agents[site].store.clone() else {
            // Connection refused: the agent is down, nothing can have happened.
            self.requests[idx].failed += 1;
            self.stats.failed += 1;
            return;
        };
        let cut = faults && self.rng.random_bool(0.04);
        if cut {
            let ops = self.rng.random_range(0..40);
            self.agents[site].disk.arm(ops);
        }
        let at_ms = EPOCH_MS + self.now as i64;
        let offline = self.agents[site].uploader.is_none();
        let answer: Result<(String, Option<Promised>), agent_store::WriteError> =
            match self.requests[idx].kind.clone() {
                Kind::Order { key, order } => store
                    .create_order(&key, order, at_ms, offline)
                    .await
                    .map(|o| {
                        let r = o.into_inner();
                        let lines = r
                            .order
                            .lines
                            .iter()
                            .map(|l| {
                                (
                                    l.sku.clone(),
                                    l.qty,
                                    matches!(l.promise, LinePromise::Confirmed),
                                )
                            })
                            .collect();
                        (r.order.order_id, Some(lines))
                    }),
                Kind::Milestone(m) => store
                    .record_milestone(m, at_ms)
                    .await
                    .map(|o| (format!("seq:{}", o.into_inner().seq), None)),
            };
        drop(store);
        if self.agents[site].disk.is_dead() {
            // The power went during the request: the client's connection dropped.
            self.stats.cuts_mid_commit += 1;
            self.requests[idx].unknown += 1;
            self.stats.unknown += 1;
            self.crash_agent(site);
            return;
        }
        self.agents[site].disk.disarm();
        match answer {
            Ok((id, lines)) => {
                if faults && self.rng.random_bool(0.02) {
                    // Committed, then killed before the answer left the process.
                    self.stats.crashes_before_reply += 1;
                    self.requests[idx].unknown += 1;
                    self.stats.unknown += 1;
                    self.crash_agent(site);
                    return;
                }
                let r = &mut self.requests[idx];
                r.acks.push(id);
                if r.promised.is_none() {
                    r.promised = lines;
                }
                self.stats.ok += 1;
            }
            // A failed commit is ambiguous to the client (503): counted as unknown.
            Err(agent_store::WriteError::Unavailable(_) | agent_store::WriteError::Corrupt(_)) => {
                self.requests[idx].unknown += 1;
                self.stats.unknown += 1;
            }
            // The site has not received the catalogue yet: a definite refusal (422).
            Err(
                agent_store::WriteError::UnknownCustomer(_)
                | agent_store::WriteError::UnknownSku(_)
                | agent_store::WriteError::NoPrice { .. },
            ) => {
                self.requests[idx].failed += 1;
                self.stats.failed += 1;
            }
            Err(e) => {
                self.problems.push(format!(
                    "{}: request {} refused: {e}",
                    self.agents[site].name,
                    self.requests[idx].kind.id()
                ));
                self.requests[idx].failed += 1;
                self.stats.failed += 1;
            }
        }
    }

    /// After the faults, a client that never got an answer retries with the same key.
    async fn resolve_unknowns(&mut self) {
        for idx in 0..self.requests.len() {
            if self.requests[idx].acks.is_empty() && self.requests[idx].unknown > 0 {
                self.attempt(idx, false).await;
            }
        }
    }

    // ----- network ------------------------------------------------------------------------

    async fn network(&mut self) {
        let now = self.now;
        // Keep-alives and idle timeouts.
        let mut closed_agent_ends = Vec::new();
        let mut closed_central_ends = Vec::new();
        for c in self.conns.values_mut() {
            let f = &self.agents[c.site].faults;
            if c.central_open && f.down_open(now) {
                c.agent_heard = now;
            }
            if c.agent_open && f.up_open(now) {
                c.central_heard = now;
            }
            if c.agent_open && now - c.agent_heard > IDLE_TIMEOUT_MS {
                closed_agent_ends.push(c.id);
            }
            if c.central_open && now - c.central_heard > IDLE_TIMEOUT_MS {
                closed_central_ends.push(c.id);
            }
        }
        for id in closed_agent_ends {
            self.close_agent_end(id);
        }
        for id in closed_central_ends {
            self.close_central_end(id);
        }

        // Deliveries, connection by connection in id order.
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            while let Some(f) = self.due_up(id) {
                self.central_receive(id, &f).await;
            }
            while let Some(f) = self.due_down(id) {
                self.agent_receive(id, &f).await;
            }
        }

        for site in 0..self.agents.len() {
            self.agent_connect(site);
            self.agent_send(site);
        }
        self.central_push();
        self.conns.retain(|_, c| !c.is_dead());
    }

    /// The next frame for central on `conn`, if one is due and central's end is open.
    fn due_up(&mut self, conn: u64) -> Option<Vec<u8>> {
        let c = self.conns.get_mut(&conn)?;
        let open = c.central_open && self.agents[c.site].faults.up_open(self.now);
        c.up.pop_due(self.now, open)
    }

    /// The next frame for the agent on `conn`, if one is due and the agent's end is open.
    fn due_down(&mut self, conn: u64) -> Option<Vec<u8>> {
        let c = self.conns.get_mut(&conn)?;
        let open = c.agent_open && self.agents[c.site].faults.down_open(self.now);
        c.down.pop_due(self.now, open)
    }

    fn send_up(&mut self, conn: u64, msg: &AgentMsg) {
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&conn)
            && c.agent_open
        {
            let at = self.agents[c.site].faults.arrival(now, &mut self.rng);
            c.up.push(at, frame(msg));
        }
    }

    fn send_down(&mut self, conn: u64, msg: &CentralMsg) {
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&conn)
            && c.central_open
        {
            let at = self.agents[c.site].faults.arrival(now, &mut self.rng);
            c.down.push(at, frame(msg));
        }
    }

    fn close_agent_end(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.agent_open = false;
            let site = c.site;
            let a = &mut self.agents[site];
            if a.conn == Some(conn) {
                a.conn = None;
                a.uploader = None;
                // Capped backoff with jitter before the next attempt.
                a.next_attempt = self.now + self.rng.random_range(50..=500);
            }
        }
    }

    fn close_central_end(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.central_open = false;
            self.central.sessions.remove(&conn);
            if self.central.live.get(&c.site) == Some(&conn) {
                self.central.live.remove(&c.site);
            }
        }
    }

    fn refuse(&mut self, conn: u64, code: RefuseCode, reason: String) {
        self.send_down(conn, &CentralMsg::Refuse(Refuse { code, reason }));
        self.close_central_end(conn);
    }

    // ----- agent side (agent/src/sync.rs) -------------------------------------------------

    fn agent_connect(&mut self, site: usize) {
        let now = self.now;
        let a = &self.agents[site];
        if a.store.is_none() || a.conn.is_some() || now < a.next_attempt {
            return;
        }
        let Ok(marks) = a.store.as_ref().map(|s| s.marks()).transpose() else {
            return;
        };
        let Some(marks) = marks else { return };
        // The handshake needs both directions and a listening central.
        if !(a.faults.up_open(now) && a.faults.down_open(now) && self.central.store.is_some()) {
            let a = &mut self.agents[site];
            a.next_attempt = now + self.rng.random_range(200..=1_000);
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.stats.connections += 1;
        self.conns.insert(id, Conn::new(id, site, now));
        self.agents[site].conn = Some(id);
        let hello = AgentMsg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "sim".into(),
            site: self.agents[site].name.clone(),
            master_rev: marks.master_rev,
            last_seq: marks.last_seq,
            agent_time_ms: EPOCH_MS + now as i64,
            acked_seq: marks.acked_seq,
            retained_from_seq: marks.retained_from_seq,
            central_incarnation: marks.central_incarnation,
        });
        self.send_up(id, &hello);
    }

    fn agent_send(&mut self, site: usize) {
        let a = &mut self.agents[site];
        let (Some(store), Some(conn), Some(up)) = (a.store.clone(), a.conn, a.uploader.as_mut())
        else {
            return;
        };
        let Ok(marks) = store.marks() else { return };
        let mut frames = Vec::new();
        while let Some(range) = up.poll_send(marks.last_seq) {
            match store.outbox_range(range.clone()) {
                Ok(events) if !events.is_empty() => {
                    let through = events.last().map_or(*range.end(), |e| e.seq);
                    frames.push(AgentMsg::Events(events));
                    up.handle_sent(through);
                }
                Ok(_) => {
                    self.problems.push(format!(
                        "{}: outbox range {range:?} is empty below last_seq {}",
                        a.name, marks.last_seq
                    ));
                    break;
                }
                Err(_) => break,
            }
        }
        for f in frames {
            self.send_up(conn, &f);
        }
    }

    async fn agent_receive(&mut self, conn: u64, f: &[u8]) {
        let Some(site) = self.site_of(conn) else {
            return;
        };
        if self.agents[site].conn != Some(conn) {
            // An old connection's end was already closed by the agent.
            return;
        }
        let Some(store) = self.agents[site].store.clone() else {
            return;
        };
        let name = self.agents[site].name.clone();
        let msg: CentralMsg = match decode(f) {
            Ok(m) => m,
            Err(e) => {
                self.problems
                    .push(format!("{name}: undecodable frame: {e}"));
                self.close_agent_end(conn);
                return;
            }
        };
        match msg {
            CentralMsg::Welcome(Welcome {
                acked_seq,
                incarnation,
                master_from_rev,
                ..
            }) => {
                // As converse() does, before any Master frame. Central is never restored from a
                // backup here, so its incarnation must never change.
                match store
                    .adopt_central_incarnation(incarnation, master_from_rev)
                    .await
                {
                    Ok(agent_store::IncarnationChange::Changed { previous, .. }) => {
                        self.problems.push(format!(
                            "{name}: central's incarnation changed from {previous} to \
                             {incarnation} without a restore"
                        ));
                        self.close_agent_end(conn);
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        self.close_agent_end(conn);
                        return;
                    }
                }
                let Ok(marks) = store.marks() else {
                    self.close_agent_end(conn);
                    return;
                };
                if acked_seq < marks.acked_seq {
                    self.problems.push(format!(
                        "{name}: central's mark {acked_seq} is behind the ack it gave ({}): \
                         central lost acknowledged events",
                        marks.acked_seq
                    ));
                    self.close_agent_end(conn);
                    return;
                }
                let mut up = Uploader::new(WINDOW, BATCH);
                if let Err(e) = up.handle_welcome(acked_seq, marks.last_seq) {
                    self.problems.push(format!("{name}: {e}"));
                    self.close_agent_end(conn);
                    return;
                }
                if store.mark_acked(acked_seq).await.is_err() {
                    self.close_agent_end(conn);
                    return;
                }
                self.agents[site].uploader = Some(up);
            }
            CentralMsg::Ack { through_seq } => {
                let Some(up) = self.agents[site].uploader.as_mut() else {
                    self.problems
                        .push(format!("{name}: Ack before Welcome on conn {conn}"));
                    self.close_agent_end(conn);
                    return;
                };
                match up.handle_ack(through_seq) {
                    Ok(true) => {
                        if store.mark_acked(through_seq).await.is_err() {
                            self.close_agent_end(conn);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.problems.push(format!("{name}: {e}"));
                        self.close_agent_end(conn);
                    }
                }
            }
            CentralMsg::Master(batch) => match store.apply_master(batch).await {
                Ok(_) => {}
                Err(agent_store::WriteError::BadMasterBatch(e)) => {
                    self.problems
                        .push(format!("{name}: master batch refused: {e}"));
                    self.close_agent_end(conn);
                }
                Err(_) => self.close_agent_end(conn),
            },
            CentralMsg::Refuse(r) => {
                if !matches!(r.code, RefuseCode::Superseded | RefuseCode::Unavailable) {
                    self.problems
                        .push(format!("{name}: refused: {:?} {}", r.code, r.reason));
                }
                self.close_agent_end(conn);
            }
            CentralMsg::AllowanceReply { .. }
            | CentralMsg::Certificate { .. }
            | CentralMsg::CertificateRefused { .. } => {}
        }
    }

    // ----- central side (central/src/quic.rs) ---------------------------------------------

    /// After a store call: a power cut that struck during it kills central.
    fn central_died(&mut self) -> bool {
        if self.central.store.is_some() && self.central.disk.is_dead() {
            self.crash_central();
            return true;
        }
        false
    }

    async fn central_receive(&mut self, conn: u64, f: &[u8]) {
        let Some(site) = self.site_of(conn) else {
            return;
        };
        let Some(store) = self.central.store.clone() else {
            return;
        };
        let name = self.agents[site].name.clone();
        let msg: AgentMsg = match decode(f) {
            Ok(m) => m,
            Err(e) => {
                self.problems
                    .push(format!("central: undecodable frame from {name}: {e}"));
                self.refuse(conn, RefuseCode::ProtocolViolation, e);
                return;
            }
        };
        match msg {
            AgentMsg::Hello(h) => {
                // The certificate says who is calling; the Hello must agree.
                if let Err(r) = check_hello(&name, PROTOCOL_VERSION, &h) {
                    self.refuse(conn, r.code, r.reason);
                    return;
                }
                if let Some(old) = self.central.live.insert(site, conn)
                    && old != conn
                {
                    self.stats.superseded += 1;
                    self.refuse(
                        old,
                        RefuseCode::Superseded,
                        "a newer connection from this site replaced this one".into(),
                    );
                    self.central.live.insert(site, conn);
                }
                let start = store
                    .begin_session(&name, central_store::HelloMarks::from(&h))
                    .await;
                let rev = store.revision();
                if self.central_died() {
                    return;
                }
                match (start, rev) {
                    (Ok(start), Ok(rev)) => {
                        self.send_down(
                            conn,
                            &CentralMsg::Welcome(Welcome {
                                protocol_version: PROTOCOL_VERSION,
                                central_version: "sim".into(),
                                acked_seq: start.acked_seq,
                                master_rev: rev,
                                incarnation: start.incarnation,
                                master_from_rev: start.master_from_rev,
                            }),
                        );
                        self.central.sessions.insert(conn, start.master_from_rev);
                    }
                    _ => self.refuse(conn, RefuseCode::Unavailable, "store unavailable".into()),
                }
            }
            AgentMsg::Events(batch) => {
                if !self.central.sessions.contains_key(&conn) {
                    self.refuse(
                        conn,
                        RefuseCode::ProtocolViolation,
                        "events before Hello".into(),
                    );
                    return;
                }
                if self.cfg.ack_before_commit {
                    let through_seq = batch.last().map_or(0, |e| e.seq);
                    self.send_down(conn, &CentralMsg::Ack { through_seq });
                    if self.rng.random_bool(0.05) {
                        self.stats.crashes_before_ack += 1;
                        self.crash_central();
                        return;
                    }
                }
                let result = store.ingest(&name, batch).await;
                if self.central_died() {
                    return;
                }
                match result {
                    Ok(_) if self.cfg.ack_before_commit => {}
                    Ok(out) => {
                        if self.rng.random_bool(0.01) {
                            // Committed, killed before the Ack left.
                            self.stats.crashes_before_ack += 1;
                            self.crash_central();
                            return;
                        }
                        self.send_down(
                            conn,
                            &CentralMsg::Ack {
                                through_seq: out.new_hwm,
                            },
                        );
                    }
                    Err(central_store::IngestBatchError::Plan(e)) => {
                        self.problems
                            .push(format!("central refused a batch from {name}: {e}"));
                        self.refuse(conn, RefuseCode::ProtocolViolation, e.to_string());
                    }
                    Err(central_store::IngestBatchError::Unavailable(e)) => {
                        self.refuse(conn, RefuseCode::Unavailable, e.to_string());
                    }
                }
            }
            // The simulation runs no renewals.
            AgentMsg::AllowanceRequest { .. }
            | AgentMsg::Heartbeat(_)
            | AgentMsg::RenewCertificate { .. } => {}
        }
    }

    /// Sends each session the master changes it lacks, one frame per turn.
    fn central_push(&mut self) {
        let Some(store) = self.central.store.clone() else {
            return;
        };
        let Ok(rev) = store.revision() else { return };
        let sessions: Vec<(u64, u64)> = self
            .central
            .sessions
            .iter()
            .map(|(c, r)| (*c, *r))
            .collect();
        for (conn, agent_rev) in sessions {
            if agent_rev >= rev {
                continue;
            }
            let Some(site) = self.site_of(conn) else {
                continue;
            };
            let name = self.agents[site].name.clone();
            let Ok(scanned) = store.changes_after(agent_rev, MAX_CHANGES_PER_FRAME) else {
                continue;
            };
            let through = scanned.last().map_or(rev, |(r, _)| *r);
            let changes: Vec<MasterChange> = scanned
                .into_iter()
                .filter(|(_, c)| c.concerns(&name))
                .map(|(_, c)| c)
                .collect();
            self.send_down(
                conn,
                &CentralMsg::Master(MasterBatch {
                    from_rev: agent_rev,
                    through_rev: through,
                    changes,
                }),
            );
            self.central.sessions.insert(conn, through);
        }
        self.central_died();
    }

    fn drained(&self) -> bool {
        let Some(central) = &self.central.store else {
            return false;
        };
        self.agents.iter().all(|a| {
            let Some(store) = &a.store else { return false };
            match (store.marks(), central.site_hwm(&a.name)) {
                (Ok(m), Ok(hwm)) => m.acked_seq == m.last_seq && hwm == m.last_seq,
                _ => false,
            }
        })
    }

    async fn finish(mut self) -> Outcome {
        let mut at_central = Vec::new();
        let mut dead_letters = 0;
        if let Some(store) = &self.central.store {
            match store.events_after(0, 1_000_000) {
                Ok(events) => {
                    for e in events {
                        match e.event.decode() {
                            Ok(b) => at_central.push((e.site.clone(), b)),
                            Err(err) => self.problems.push(format!("feed event: {err}")),
                        }
                    }
                }
                Err(e) => self.problems.push(format!("central feed unreadable: {e}")),
            }
            match store.exceptions(central_store::ExceptionFilter::All, 0, 1_000_000) {
                Ok(list) => {
                    for x in list {
                        at_central.push((x.site.clone(), EventBody::Order(x.order)));
                    }
                }
                Err(e) => self.problems.push(format!("exceptions unreadable: {e}")),
            }
            dead_letters = store.dead_letters(0, 1_000_000).map_or(0, |d| d.len());
        }
        let mut credit = BTreeMap::new();
        for (id, limit) in CUSTOMERS {
            credit.insert(id.to_string(), money(limit).units());
        }
        let mut prices = BTreeMap::new();
        for (sku, p) in SKUS {
            prices.insert(sku.to_string(), money(p).units());
        }
        // Stop the stores' writer threads before the next seed.
        for a in &mut self.agents {
            a.store = None;
            if let Some(w) = a.writer.take() {
                w.shutdown().await;
            }
        }
        if let Some(c) = self.central.store.take() {
            c.close().await;
        }
        Outcome {
            requests: self.requests,
            site_names: self.agents.iter().map(|a| a.name.clone()).collect(),
            at_central,
            dead_letters,
            atp: self.atp,
            credit,
            prices,
            problems: self.problems,
            stats: self.stats,
        }
    }
}
