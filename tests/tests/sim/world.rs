//! One simulated fleet: central and a few agents, each on its own simulated disk, joined by the
//! simulated network, driven tick by tick from one seed.
//!
//! What runs is the product's own code: the sync sessions are the protocol's state machines
//! (`AgentSession`, `CentralSession`), the very ones the agent's and central's drivers run; the
//! agent's store (order capture against allowances, idempotency, outbox, acks, retention, master
//! data, incarnations); central's store (session start and top-ups, ingest, feed, exception
//! queue, allowance ledger with reclaims, master log, ERP decisions, restore from a backup);
//! redb itself on a disk that loses unsynced writes; the protocol's frames. What is replaced is
//! the I/O around the machines: QUIC streams become `net::Conn`, and `drive.rs` carries out the
//! machines' requests on the stores the way the drivers do, with no session logic of its own.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_agent::store as agent_store;
use outpost_central::ledger::Targets;
use outpost_central::store as central_store;
use outpost_protocol::session::agent::AgentSession;
use outpost_protocol::session::central::CentralSession;
use outpost_protocol::{
    AtpRecord, CustomerRecord, EventBody, LinePromise, MasterChange, MilestoneKind, Money,
    PriceRecord,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::disk::Disk;
use super::net::{Conn, IDLE_TIMEOUT_MS, LinkFaults};

/// One step of simulated time.
pub const TICK_MS: u64 = 10;
/// Most ticks spent healing and draining after the workload before the run counts as stuck.
const DRAIN_TICKS: u64 = 6_000;
const SKUS: [(&str, &str); 2] = [("SKU-A", "10.00"), ("SKU-B", "25.00")];
/// (customer, credit limit): C2's limit is tight, so its credit escrow binds.
const CUSTOMERS: [(&str, &str); 2] = [("C1", "100000.00"), ("C2", "300.00")];
/// Simulated wall clock at tick 0 (ms since the epoch).
pub(super) const EPOCH_MS: i64 = 1_800_000_000_000;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub sites: usize,
    /// Ticks of workload and faults before everything heals.
    pub steps: u64,
    /// A broken variant: fsync does nothing on every disk.
    pub lie_fsync: bool,
    /// A broken variant: central's session machine acknowledges a batch before its commit
    /// (the machine's test-only switch), and central is sometimes killed in between.
    pub ack_before_commit: bool,
    /// Central's machine is lost once and restored from a backup image taken earlier.
    pub restore: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            sites: 2,
            steps: 400,
            lie_fsync: false,
            ack_before_commit: false,
            // A quarter of the seeds lose central's machine and restore it from a backup.
            restore: seed % 4 == 3,
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
    pub heartbeats: u64,
    pub asks: u64,
    pub asks_answered: u64,
    pub asks_late: u64,
    pub atp_lowered: u64,
    pub returns: u64,
    pub erp_accepted: u64,
    pub erp_rejected: u64,
    pub restores: u64,
    pub rewinds: u64,
    /// Sessions in which central was behind what it had acknowledged without a restore: it
    /// acknowledged events it had not committed.
    pub acks_forgotten: u64,
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
        self.heartbeats += o.heartbeats;
        self.asks += o.asks;
        self.asks_answered += o.asks_answered;
        self.asks_late += o.asks_late;
        self.atp_lowered += o.atp_lowered;
        self.returns += o.returns;
        self.erp_accepted += o.erp_accepted;
        self.erp_rejected += o.erp_rejected;
        self.restores += o.restores;
        self.rewinds += o.rewinds;
        self.acks_forgotten += o.acks_forgotten;
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
    /// Orders the ERP rejected (their units went back to central's pool): (site, order id).
    pub rejected: std::collections::BTreeSet<(String, String)>,
    /// Per (site, pool): units granted by central, confirmed and returned by the site, and
    /// held by the site at the end. `None` when central was restored from a backup (its log
    /// then lacks the grants made after the backup).
    pub conservation: Option<Vec<Conservation>>,
}

/// One pool's accounts at one site, at the end of a run.
#[derive(Clone, Debug)]
pub struct Conservation {
    pub site: String,
    pub pool: String,
    pub granted: i64,
    pub confirmed: i64,
    pub returned: i64,
    pub held: i64,
    /// What central's ledger says the site holds (the same figure, seen from central).
    pub central_outstanding: Option<i64>,
}

pub(super) struct AgentHost {
    pub name: String,
    pub disk: Disk,
    pub store: Option<agent_store::Store>,
    pub writer: Option<agent_store::StoreWriter>,
    pub restart_at: Option<u64>,
    pub conn: Option<u64>,
    /// The live session's machine (the product's `AgentSession`).
    pub session: Option<AgentSession>,
    /// Whether central's incarnation changed in the current session (a rewind is then due to a
    /// restore; otherwise central lost what it acknowledged).
    pub incarnation_changed: bool,
    pub next_attempt: u64,
    pub faults: LinkFaults,
}

pub(super) struct CentralHost {
    pub disk: Disk,
    pub store: Option<central_store::Store>,
    pub restart_at: Option<u64>,
    /// conn → its session machine (the product's `CentralSession`).
    pub sessions: BTreeMap<u64, CentralSession>,
    /// site → its registered connection (the registry: a newer one supersedes it).
    pub live: BTreeMap<usize, u64>,
    /// A power cut is armed on central's disk.
    pub armed: bool,
    /// A backup image of central's store, taken at some point of the run.
    pub backup: Option<Vec<u8>>,
    /// Central's machine is lost and comes back from `backup` at the next restart.
    pub restore_pending: bool,
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

pub(super) struct Sim {
    pub cfg: SimConfig,
    pub rng: StdRng,
    pub now: u64,
    /// Virtual time 0 as an `Instant` for the machines' deadlines.
    pub base: std::time::Instant,
    pub agents: Vec<AgentHost>,
    pub central: CentralHost,
    pub conns: BTreeMap<u64, Conn>,
    pub next_conn: u64,
    heals: Vec<(u64, usize, Heal)>,
    pub requests: Vec<Request>,
    /// Index into `requests` by (site, id).
    by_id: BTreeMap<(usize, String), usize>,
    next_id: u64,
    pub stats: Stats,
    pub problems: Vec<String>,
    /// The ATP first published per (sku, site): the cap on confirmed units.
    pub atp: BTreeMap<(String, String), i64>,
    /// The ATP the ERP publishes now (lowered during the run).
    pub erp_atp: BTreeMap<(String, String), i64>,
    /// Confirmed units of (sku, site) the ERP accepted since it published `erp_atp` for it:
    /// its figure now is `erp_atp` less these (every figure it sends is net of what it
    /// accepted, as central's ledger expects).
    pub erp_accepted: BTreeMap<(String, String), i64>,
    /// The ERP's own book of decisions, (site, order id) → accepted: it decides an order once,
    /// and re-sends these to a central restored from a backup.
    pub erp_decided: BTreeMap<(String, String), bool>,
    /// Decisions still to re-send to a restored central (their orders may not be back yet).
    pub erp_redecide: Vec<(String, String)>,
    pub rejected: std::collections::BTreeSet<(String, String)>,
}

pub(super) fn store_opts() -> central_store::StoreOptions {
    central_store::StoreOptions {
        targets: Targets {
            atp_units: 6,
            credit_fraction: 0.2,
        },
        reclaim_silent_secs: 86_400,
    }
}

pub(super) fn open_agent(
    name: &str,
    disk: &Disk,
) -> Result<(agent_store::Store, agent_store::StoreWriter), String> {
    let d = disk.clone();
    agent_store::Store::open_on_backend(name, Path::new(name), move || Ok(d.backend()))
        .map_err(|e| format!("agent {name}: store did not open after a crash: {e}"))
}

pub(super) fn open_central(disk: &Disk) -> Result<central_store::Store, String> {
    let d = disk.clone();
    central_store::Store::open_on_backend(Path::new("central"), store_opts(), move || {
        Ok(d.backend())
    })
    .map_err(|e| format!("central: store did not open after a crash: {e}"))
}

pub(super) fn money(s: &str) -> Money {
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
            session: None,
            incarnation_changed: false,
            next_attempt: 0,
            faults: LinkFaults::default(),
        });
    }
    let mut sim = Sim {
        rng,
        now: 0,
        base: std::time::Instant::now(),
        agents,
        central: CentralHost {
            disk: central_disk,
            store: Some(central),
            restart_at: None,
            sessions: BTreeMap::new(),
            live: BTreeMap::new(),
            armed: false,
            backup: None,
            restore_pending: false,
        },
        conns: BTreeMap::new(),
        next_conn: 1,
        heals: Vec::new(),
        requests: Vec::new(),
        by_id: BTreeMap::new(),
        next_id: 1,
        stats: Stats::default(),
        problems: Vec::new(),
        erp_atp: atp.clone(),
        erp_accepted: BTreeMap::new(),
        erp_decided: BTreeMap::new(),
        erp_redecide: Vec::new(),
        atp,
        rejected: Default::default(),
        cfg,
    };
    for step in 0..sim.cfg.steps {
        sim.now += TICK_MS;
        sim.faults();
        sim.restarts().await;
        sim.client().await;
        sim.erp(step).await;
        sim.network().await;
    }
    sim.heal_everything();
    sim.restarts().await;
    sim.resolve_unknowns().await;
    let mut drained = false;
    for t in 0..DRAIN_TICKS {
        sim.now += TICK_MS;
        sim.restarts().await;
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

    pub(super) fn crash_agent(&mut self, site: usize) {
        self.stats.agent_crashes += 1;
        let a = &mut self.agents[site];
        a.disk.cut();
        // The process is gone: its store handles go with it (the writer thread finds a dead
        // disk and stops on its own).
        a.store = None;
        a.writer = None;
        a.session = None;
        if let Some(c) = a.conn.take()
            && let Some(conn) = self.conns.get_mut(&c)
        {
            conn.agent_open = false;
        }
        let a = &mut self.agents[site];
        a.restart_at = Some(self.now + self.rng.random_range(50..=2_000));
    }

    pub(super) fn crash_central(&mut self) {
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

    /// Brings crashed hosts back on what their disks kept (central, once, on a backup).
    async fn restarts(&mut self) {
        let now = self.now;
        if self.central.restart_at.is_some_and(|t| t <= now) {
            self.central.restart_at = None;
            let image = match self.restored_image() {
                Some(image) => image,
                None => self.central.disk.crash_image(&mut self.rng),
            };
            let disk = Disk::from_image(image, self.cfg.lie_fsync);
            match open_central(&disk) {
                Ok(s) => {
                    self.central.store = Some(s);
                    self.central.disk = disk;
                    if std::mem::take(&mut self.central.restore_pending) {
                        // The ERP resends what it published after the backup (deploy/README.md).
                        self.erp_resend().await;
                    }
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
        let offline = !self.agents[site]
            .session
            .as_ref()
            .is_some_and(|s| s.is_live());
        if let Kind::Order { order, .. } = &self.requests[idx].kind
            && !offline
            && faults
            && self.rng.random_bool(0.3)
        {
            // The order needs more than the site holds: ask central now, with the capture's
            // deadline (the answer is used if it comes in time; the grant stays either way).
            let sku = order.lines[0].sku.clone();
            let qty = order.lines[0].qty;
            self.ask(site, &sku, qty);
        }
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
            self.agent_tick(site).await;
        }
        self.central_tick().await;
        self.conns.retain(|_, c| !c.is_dead());
    }

    /// The next frame for central on `conn`, if one is due and central's end is open.
    pub(super) fn due_up(&mut self, conn: u64) -> Option<Vec<u8>> {
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

    pub(super) fn send_up(&mut self, conn: u64, frame: Vec<u8>) {
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&conn)
            && c.agent_open
        {
            let at = self.agents[c.site].faults.arrival(now, &mut self.rng);
            c.up.push(at, frame);
        }
    }

    pub(super) fn send_down(&mut self, conn: u64, frame: Vec<u8>) {
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&conn)
            && c.central_open
        {
            let at = self.agents[c.site].faults.arrival(now, &mut self.rng);
            c.down.push(at, frame);
        }
    }

    pub(super) fn close_agent_end(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.agent_open = false;
            let site = c.site;
            let a = &mut self.agents[site];
            if a.conn == Some(conn) {
                a.conn = None;
                a.session = None;
                // Capped backoff with jitter before the next attempt.
                a.next_attempt = self.now + self.rng.random_range(50..=500);
            }
        }
    }

    pub(super) fn close_central_end(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.central_open = false;
            self.central.sessions.remove(&conn);
            if self.central.live.get(&c.site) == Some(&conn) {
                self.central.live.remove(&c.site);
            }
        }
    }

    /// Power cut or crash: whether a store call just killed central.
    pub(super) fn central_died(&mut self) -> bool {
        if self.central.store.is_some() && self.central.disk.is_dead() {
            self.crash_central();
            return true;
        }
        false
    }

    /// Every site's events are at central and acknowledged, and every site has applied
    /// central's master log through its revision: the grants central made while ingesting the
    /// last batches (top-ups) and any reclaims are at the site, so the pool accounts compare
    /// two sides that have heard everything from each other.
    fn drained(&self) -> bool {
        let Some(central) = &self.central.store else {
            return false;
        };
        let Ok(rev) = central.revision() else {
            return false;
        };
        self.agents.iter().all(|a| {
            let Some(store) = &a.store else { return false };
            match (store.marks(), central.site_hwm(&a.name)) {
                (Ok(m), Ok(hwm)) => {
                    m.acked_seq == m.last_seq && hwm == m.last_seq && m.master_rev == rev
                }
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
        let conservation = if self.stats.restores > 0 {
            None
        } else {
            Some(self.conservation())
        };
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
            rejected: self.rejected,
            conservation,
        }
    }

    /// Each site's accounts per pool: grants from central's change log, confirmations and
    /// returns from what central holds of the site's events, and what the site holds now.
    fn conservation(&mut self) -> Vec<Conservation> {
        let mut rows: BTreeMap<(String, String), Conservation> = BTreeMap::new();
        let Some(central) = &self.central.store else {
            return Vec::new();
        };
        fn row<'a>(
            rows: &'a mut BTreeMap<(String, String), Conservation>,
            site: &str,
            pool: &str,
        ) -> &'a mut Conservation {
            rows.entry((site.to_string(), pool.to_string()))
                .or_insert_with(|| Conservation {
                    site: site.to_string(),
                    pool: pool.to_string(),
                    granted: 0,
                    confirmed: 0,
                    returned: 0,
                    held: 0,
                    central_outstanding: None,
                })
        }
        match central.changes_after(0, 10_000_000) {
            Ok(changes) => {
                for (_, c) in changes {
                    if let MasterChange::Grant(g) = c {
                        row(&mut rows, &g.site, &g.pool.key()).granted += g.qty;
                    }
                }
            }
            Err(e) => self.problems.push(format!("central's log unreadable: {e}")),
        }
        // The site's side: its own outbox (every event is retained in a run) and allowances.
        for a in &self.agents {
            let Some(store) = &a.store else { continue };
            let events = store.marks().map_err(|e| e.to_string()).and_then(|m| {
                if m.retained_from_seq > 1 {
                    return Err(format!("outbox pruned below seq {}", m.retained_from_seq));
                }
                store
                    .outbox_range(1..=m.last_seq)
                    .map_err(|e| e.to_string())
            });
            let events = match events {
                Ok(e) => e,
                Err(e) => {
                    self.problems
                        .push(format!("{}: outbox unreadable: {e}", a.name));
                    continue;
                }
            };
            for e in events {
                match e.decode() {
                    Ok(EventBody::Order(o)) => {
                        for l in o
                            .lines
                            .iter()
                            .filter(|l| matches!(l.promise, LinePromise::Confirmed))
                        {
                            let atp = outpost_protocol::Pool::atp(&l.sku).key();
                            row(&mut rows, &a.name, &atp).confirmed += l.qty;
                            let credit = outpost_protocol::Pool::credit(&o.customer_id).key();
                            row(&mut rows, &a.name, &credit).confirmed +=
                                l.qty * l.unit_price.units();
                        }
                    }
                    Ok(EventBody::AllowanceReturn(r)) => {
                        self.stats.returns += 1;
                        row(&mut rows, &a.name, &r.pool.key()).returned += r.qty;
                    }
                    Ok(EventBody::Milestone(_)) => {}
                    Err(err) => self
                        .problems
                        .push(format!("{}: outbox event: {err}", a.name)),
                }
            }
            match store.allowances() {
                Ok((held, _)) => {
                    for (pool, qty) in held {
                        row(&mut rows, &a.name, &pool.key()).held += qty;
                        // Central's side: what its ledger says the site holds.
                        let key = outpost_central::ledger::LedgerKey::for_site(&a.name, &pool);
                        if let Ok(Some(p)) = central.pool(&key) {
                            row(&mut rows, &a.name, &pool.key()).central_outstanding =
                                Some(p.outstanding(&a.name));
                        }
                    }
                }
                Err(e) => self
                    .problems
                    .push(format!("{}: allowances unreadable: {e}", a.name)),
            }
        }
        rows.into_values().collect()
    }
}
