//! Seeded chaos schedules over real processes: one fleet (central and two agents, each agent
//! behind its own fault-injecting UDP proxy) runs many short schedules of network and process
//! faults while a workload writes orders and milestones at both sites; after each schedule the
//! fleet heals and the test checks, against central's feed and exception queue, that every
//! acknowledged write arrived exactly once, no write of unknown outcome arrived twice, nothing
//! arrived that was never requested, no idempotency key was applied twice, no SKU was oversold,
//! and every outbox drained without restarting a live process.
//!
//! Knobs: `OUTPOST_CHAOS_SEED` (base seed; default `DEFAULT_SEED`, always printed),
//! `OUTPOST_CHAOS_SECS` (run schedules until that many seconds are spent, the long run) and
//! `OUTPOST_CHAOS_SCHEDULES` (number of schedules of a normal run, default 50). The seed fixes
//! each schedule's faults, their timing and the workload's choices; the processes are real, so
//! a replay re-runs the same schedules, not the same thread interleavings.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outpost_tests::proxy::Direction;
use outpost_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Base seed of a run unless `OUTPOST_CHAOS_SEED` says otherwise.
const DEFAULT_SEED: u64 = 20_261_127;
/// Schedules in a normal run (`cargo test`), sized to finish in about three minutes on 2 cores.
const DEFAULT_SCHEDULES: usize = 50;
/// Most schedules of any run, long ones included: a bound, not a target.
const MAX_SCHEDULES: usize = 100_000;
/// Workload clients per site, each posting one request at a time.
const CLIENTS_PER_SITE: usize = 2;
/// Pause between a client's requests, in ms (uniform): paces the workload at ~100 writes/s per
/// site, enough to keep uploads busy without growing the feed the checks read without bound.
const CLIENT_PAUSE_MS: std::ops::RangeInclusive<u64> = 8..=30;
/// A workload request that takes longer than this has an unknown outcome.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of the test's own health and feed reads.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most retries of a request whose outcome was unknown (a real client's bounded retry).
const MAX_RETRIES: u32 = 2;
/// Longest the workload may take to stop once told to (its requests are bounded above).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest every outbox may take to drain once the fleet has healed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest the central-kill fault waits for an agent's backlog to start draining.
const DRAIN_START_TIMEOUT: Duration = Duration::from_secs(2);
/// Sum of fault durations a schedule aims at (the brief: ~1–3 s of faults).
const FAULT_BUDGET_MS: u64 = 2_200;
/// Tag SKU: every order carries one line of it whose quantity is the request's unique number,
/// so an order found at central can be traced to its request even when the client never saw
/// the answer. No site has ATP of it, so the line is always pending and sells nothing.
const TAG_SKU: &str = "TAG-0";
/// ATP per site of each contested SKU (largest qty per line in parentheses in `SKUS`).
const SKUS: [(&str, i64, i64); 2] = [("GEAR-12T", 150, 3), ("PUMP-7", 40, 2)];
const MILESTONES: [&str; 5] = ["picked", "packed", "loaded", "departed", "delivered"];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The fleet.
// ---------------------------------------------------------------------------------------------

/// Where the workload sends a site's requests: `None` while that site's agent is down.
type ApiSlot = Arc<RwLock<Option<Api>>>;

struct Site {
    id: String,
    proxy: UdpProxy,
    proc: Option<Proc>,
    slot: ApiSlot,
}

/// Central, two agents behind their own proxies, and the env every (re)start uses.
struct Rig {
    fleet: Fleet,
    central: Option<Proc>,
    /// Central's ports, kept across restarts so proxies and the test's client stay valid.
    pinned: Ready,
    c: Api,
    central_env: Env,
    agent_env: Env,
    sites: Vec<Site>,
}

/// Config overrides for a process (`OUTPOST_*` keys).
type Env = Vec<(&'static str, String)>;

/// Session timing for the chaos fleet: an outage ends a session within ~1 s and a healed link
/// is used again within ~0.3 s, so a schedule's faults reach the sessions they are aimed at.
fn chaos_env() -> (Env, Env) {
    let mut central = fast_central_env();
    central.extend([
        ("OUTPOST_QUIC__IDLE_TIMEOUT_MS", "1000".to_string()),
        ("OUTPOST_QUIC__KEEP_ALIVE_MS", "250".to_string()),
        ("OUTPOST_ALLOWANCE__ATP_TARGET", "8".to_string()),
    ]);
    let mut agent = fast_agent_env();
    agent.extend([
        ("OUTPOST_SYNC__IDLE_TIMEOUT_MS", "1000".to_string()),
        ("OUTPOST_SYNC__KEEP_ALIVE_MS", "250".to_string()),
        ("OUTPOST_SYNC__BACKOFF_MAX_MS", "300".to_string()),
        // Small batches, one in flight: a backlog drains in many commit/ack round trips, so a
        // kill of central 0–50 ms into a drain lands inside it (or between a commit and its ack).
        ("OUTPOST_SYNC__BATCH_MAX_EVENTS", "5".to_string()),
        ("OUTPOST_SYNC__WINDOW_EVENTS", "5".to_string()),
        // An order waits at most 100 ms for more allowance (on a dead link not yet noticed, it
        // waits all of it), so the workload keeps writing through partitions.
        ("OUTPOST_ALLOWANCE__REQUEST_DEADLINE_MS", "100".to_string()),
    ]);
    (central, agent)
}

impl Rig {
    async fn start(seed: u64) -> Result<Rig> {
        let (central_env, agent_env) = chaos_env();
        let fleet = tokio::task::block_in_place(|| Fleet::init(2))?;
        let central = tokio::task::block_in_place(|| fleet.start_central_with(None, &central_env))?;
        let pinned = central.ready.clone();
        let quic = pinned.quic.clone().context("central quic address")?;
        let c = Api::with_timeout(&central, PROBE_TIMEOUT);
        let mut sites = Vec::new();
        for (i, m) in fleet.sites.iter().enumerate() {
            let upstream: std::net::SocketAddr = quic.parse().context("central quic address")?;
            let proxy = UdpProxy::start(upstream, seed.wrapping_add(i as u64)).await?;
            sites.push(Site {
                id: m.id.clone(),
                proxy,
                proc: None,
                slot: Arc::new(RwLock::new(None)),
            });
        }
        let mut rig = Rig {
            fleet,
            central: Some(central),
            pinned,
            c,
            central_env,
            agent_env,
            sites,
        };
        for i in 0..rig.sites.len() {
            rig.start_agent(i)?;
        }
        Ok(rig)
    }

    fn start_agent(&mut self, i: usize) -> Result<()> {
        let addr = self.sites[i].proxy.addr().to_string();
        let id = self.sites[i].id.clone();
        let p =
            tokio::task::block_in_place(|| self.fleet.start_agent(&id, &addr, &self.agent_env))?;
        *self.sites[i].slot.write().expect("slot lock") =
            Some(Api::with_timeout(&p, REQUEST_TIMEOUT));
        self.sites[i].proc = Some(p);
        Ok(())
    }

    fn kill_agent(&mut self, i: usize) -> Result<()> {
        *self.sites[i].slot.write().expect("slot lock") = None;
        let mut p = self.sites[i].proc.take().context("agent running")?;
        p.kill9()
    }

    fn start_central(&mut self) -> Result<()> {
        let p = tokio::task::block_in_place(|| {
            self.fleet
                .start_central_with(Some(&self.pinned), &self.central_env)
        })?;
        self.central = Some(p);
        Ok(())
    }

    fn probe(&self, i: usize) -> Option<Api> {
        self.sites[i]
            .proc
            .as_ref()
            .map(|p| Api::with_timeout(p, PROBE_TIMEOUT))
    }

    fn heal(&self) {
        for s in &self.sites {
            s.proxy.heal();
        }
    }

    /// Pids of the running processes: central first, then each agent (0 when down).
    fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.central)
            .chain(self.sites.iter().map(|s| &s.proc))
            .map(|p| p.as_ref().map_or(0, |p| p.child.id()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Schedules.
// ---------------------------------------------------------------------------------------------

/// One fault of a schedule. Network faults hold for `ms` and are then lifted, unless `stack`
/// keeps them on until the schedule's end (so later faults combine with them).
#[derive(Clone, Debug)]
enum Fault {
    Partition {
        sites: Vec<usize>,
        ms: u64,
        stack: bool,
    },
    OneWay {
        sites: Vec<usize>,
        dir: Direction,
        pct: u32,
        ms: u64,
        stack: bool,
    },
    Loss {
        sites: Vec<usize>,
        pct: u32,
        ms: u64,
        stack: bool,
    },
    Delay {
        sites: Vec<usize>,
        delay_ms: u64,
        jitter_ms: u64,
        ms: u64,
        stack: bool,
    },
    Duplicate {
        sites: Vec<usize>,
        pct: u32,
        ms: u64,
        stack: bool,
    },
    Flap {
        sites: Vec<usize>,
        half_ms: u64,
        ms: u64,
        stack: bool,
    },
    /// SIGKILL of the agent while its clients post; restarted after `down_ms` on the same data
    /// directory, or (`None`) left down until the schedule ends.
    KillAgent { site: usize, down_ms: Option<u64> },
    /// Partition every site for `backlog_ms` so outboxes fill, heal, wait until `watch`'s backlog
    /// starts draining, SIGKILL central `after_ms` later, restart it on the same data directory
    /// and ports after `down_ms`.
    KillCentral {
        watch: usize,
        backlog_ms: u64,
        after_ms: u64,
        down_ms: u64,
    },
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Partition { .. } => "partition",
            Fault::OneWay {
                dir: Direction::Up, ..
            } => "oneway_up",
            Fault::OneWay {
                dir: Direction::Down,
                ..
            } => "oneway_down",
            Fault::Loss { .. } => "loss",
            Fault::Delay { .. } => "delay_jitter",
            Fault::Duplicate { .. } => "duplication",
            Fault::Flap { .. } => "flapping",
            Fault::KillAgent { .. } => "kill_agent",
            Fault::KillCentral { .. } => "kill_central",
        }
    }

    /// Roughly how long the fault takes to run, for the schedule's budget.
    fn cost_ms(&self) -> u64 {
        match self {
            Fault::Partition { ms, .. }
            | Fault::OneWay { ms, .. }
            | Fault::Loss { ms, .. }
            | Fault::Delay { ms, .. }
            | Fault::Duplicate { ms, .. }
            | Fault::Flap { ms, .. } => *ms,
            Fault::KillAgent { down_ms, .. } => 150 + down_ms.unwrap_or(0),
            Fault::KillCentral {
                backlog_ms,
                down_ms,
                ..
            } => backlog_ms + 300 + down_ms,
        }
    }
}

fn draw_sites(rng: &mut StdRng, n: usize) -> Vec<usize> {
    if rng.random_bool(0.3) {
        (0..n).collect()
    } else {
        vec![rng.random_range(0..n)]
    }
}

/// Draws one schedule: one to five faults, at most one kill of central, about
/// `FAULT_BUDGET_MS` of fault time in all.
fn draw_schedule(rng: &mut StdRng, n_sites: usize) -> Vec<Fault> {
    let mut faults = Vec::new();
    let mut spent = 0;
    let mut central_killed = false;
    let budget = rng.random_range(FAULT_BUDGET_MS / 2..=FAULT_BUDGET_MS);
    while faults.is_empty() || (spent < budget && faults.len() < 5) {
        let stack = rng.random_bool(0.3);
        let ms = rng.random_range(150..=900);
        let f = match rng.random_range(0..100) {
            0..14 => Fault::Partition {
                sites: draw_sites(rng, n_sites),
                // Sometimes longer than the 1 s idle timeout, so the session ends.
                ms: rng.random_range(200..=1_500),
                stack,
            },
            14..28 => Fault::OneWay {
                sites: draw_sites(rng, n_sites),
                dir: if rng.random_bool(0.5) {
                    Direction::Up
                } else {
                    Direction::Down
                },
                pct: *[50, 90, 100].get(rng.random_range(0..3)).expect("in range"),
                ms,
                stack,
            },
            28..40 => Fault::Loss {
                sites: draw_sites(rng, n_sites),
                pct: rng.random_range(5..=40),
                ms,
                stack,
            },
            40..52 => Fault::Delay {
                sites: draw_sites(rng, n_sites),
                delay_ms: rng.random_range(1..=40),
                jitter_ms: rng.random_range(5..=80),
                ms,
                stack,
            },
            52..62 => Fault::Duplicate {
                sites: draw_sites(rng, n_sites),
                pct: rng.random_range(10..=50),
                ms,
                stack,
            },
            62..72 => Fault::Flap {
                sites: draw_sites(rng, n_sites),
                half_ms: rng.random_range(50..=300),
                ms,
                stack,
            },
            72..88 => Fault::KillAgent {
                site: rng.random_range(0..n_sites),
                down_ms: rng.random_bool(0.7).then(|| rng.random_range(30..=400)),
            },
            _ if !central_killed => {
                central_killed = true;
                Fault::KillCentral {
                    watch: rng.random_range(0..n_sites),
                    backlog_ms: rng.random_range(400..=1_200),
                    after_ms: rng.random_range(0..=50),
                    // At least 150 ms: every ack the dead central sent has arrived by then,
                    // even through a stacked delay, before the agent's acked_seq is read.
                    down_ms: rng.random_range(150..=400),
                }
            }
            _ => continue,
        };
        spent += f.cost_ms();
        faults.push(f);
    }
    faults
}

/// What running one fault did, for the schedule's line.
fn describe(f: &Fault, sites: &[Site], note: &str) -> String {
    let names = |v: &[usize]| {
        v.iter()
            .map(|i| sites[*i].id.as_str())
            .collect::<Vec<_>>()
            .join("+")
    };
    let stacked = |s: bool| if s { ",stacked" } else { "" };
    match f {
        Fault::Partition {
            sites: v,
            ms,
            stack,
        } => {
            format!("partition({} {ms}ms{})", names(v), stacked(*stack))
        }
        Fault::OneWay {
            sites: v,
            dir,
            pct,
            ms,
            stack,
        } => format!(
            "oneway_{}({} {pct}% {ms}ms{})",
            if *dir == Direction::Up { "up" } else { "down" },
            names(v),
            stacked(*stack)
        ),
        Fault::Loss {
            sites: v,
            pct,
            ms,
            stack,
        } => {
            format!("loss({} {pct}% {ms}ms{})", names(v), stacked(*stack))
        }
        Fault::Delay {
            sites: v,
            delay_ms,
            jitter_ms,
            ms,
            stack,
        } => format!(
            "delay({} {delay_ms}+0..{jitter_ms}ms for {ms}ms{})",
            names(v),
            stacked(*stack)
        ),
        Fault::Duplicate {
            sites: v,
            pct,
            ms,
            stack,
        } => {
            format!("duplication({} {pct}% {ms}ms{})", names(v), stacked(*stack))
        }
        Fault::Flap {
            sites: v,
            half_ms,
            ms,
            stack,
        } => format!(
            "flapping({} every {half_ms}ms for {ms}ms{})",
            names(v),
            stacked(*stack)
        ),
        Fault::KillAgent { site, down_ms } => format!(
            "kill_agent({} {}{note})",
            sites[*site].id,
            down_ms.map_or("down to the end".to_string(), |d| format!("down {d}ms"))
        ),
        Fault::KillCentral {
            after_ms, down_ms, ..
        } => format!("kill_central({after_ms}ms into drain, down {down_ms}ms{note})"),
    }
}

/// Sets (`on`) or lifts a network fault on its proxies.
fn apply_net(f: &Fault, sites: &[Site], on: bool) {
    let each = |v: &[usize], g: &dyn Fn(&UdpProxy)| {
        for i in v {
            g(&sites[*i].proxy);
        }
    };
    match f {
        Fault::Partition { sites: v, .. } => each(v, &|p| p.partition(on)),
        Fault::OneWay {
            sites: v, dir, pct, ..
        } => each(v, &|p| p.set_oneway_loss(*dir, if on { *pct } else { 0 })),
        Fault::Loss { sites: v, pct, .. } => each(v, &|p| p.set_loss(if on { *pct } else { 0 })),
        Fault::Delay {
            sites: v,
            delay_ms,
            jitter_ms,
            ..
        } => each(v, &|p| {
            if on {
                p.set_delay(*delay_ms, *jitter_ms)
            } else {
                p.set_delay(0, 0)
            }
        }),
        Fault::Duplicate { sites: v, pct, .. } => {
            each(v, &|p| p.set_duplication(if on { *pct } else { 0 }))
        }
        Fault::Flap {
            sites: v, half_ms, ..
        } => each(v, &|p| p.set_flapping(if on { *half_ms } else { 0 })),
        Fault::KillAgent { .. } | Fault::KillCentral { .. } => {}
    }
}

/// Evidence of where a kill of central fell: `acked` is the watched agent's acked_seq once
/// central was dead; if the first session after the restart (number `session + 1`) found
/// central's high-water mark above it, central had committed events whose ack never arrived.
#[derive(Clone, Copy, Debug)]
struct CommitProbe {
    site: usize,
    session: u64,
    acked: u64,
}

/// The newest session number of a site's reconciliation reports at central.
async fn newest_session(c: &Api, site: &str) -> Option<u64> {
    let r = c
        .get(&format!("/v1/sites/{site}/reconciliations?limit=1"))
        .await
        .ok()?;
    as_list(&r.body)?.first()?["session"].as_u64()
}

/// Reads `probe`'s outcome: the high-water mark central found when the next session began,
/// minus what the agent had been acknowledged (`None` if that session is not in the reports).
async fn committed_without_ack(c: &Api, site: &str, probe: &CommitProbe) -> Option<u64> {
    let r = c
        .get(&format!("/v1/sites/{site}/reconciliations?limit=100"))
        .await
        .ok()?;
    let next = as_list(&r.body)?
        .into_iter()
        .find(|x| x["session"].as_u64() == Some(probe.session + 1))?;
    Some(next["hwm_at_connect"].as_u64()?.saturating_sub(probe.acked))
}

/// Reads an agent's outbox depth, `None` if it does not answer.
async fn depth(a: &Api) -> Option<u64> {
    health(a).await.ok()?["outbox_depth"].as_u64()
}

/// Runs one fault against the rig. Returns a note for the schedule's line.
async fn run_fault(rig: &mut Rig, w: &Workload, f: &Fault, t: &mut Totals) -> Result<String> {
    *t.faults.entry(f.kind()).or_insert(0) += 1;
    match f {
        Fault::Partition { ms, stack, .. }
        | Fault::OneWay { ms, stack, .. }
        | Fault::Loss { ms, stack, .. }
        | Fault::Delay { ms, stack, .. }
        | Fault::Duplicate { ms, stack, .. }
        | Fault::Flap { ms, stack, .. } => {
            apply_net(f, &rig.sites, true);
            // The fault's duration: the workload runs against it meanwhile.
            tokio::time::sleep(Duration::from_millis(*ms)).await;
            if !stack {
                apply_net(f, &rig.sites, false);
            }
            Ok(String::new())
        }
        Fault::KillAgent { site, down_ms } => {
            // The drawn site, or the other one if it is already down.
            let Some(i) = (0..rig.sites.len())
                .map(|k| (site + k) % rig.sites.len())
                .find(|i| rig.sites[*i].proc.is_some())
            else {
                return Ok(", skipped: no agent up".to_string());
            };
            // Mid-write: wait (bounded) until one of its clients has a request in flight.
            let deadline = Instant::now() + Duration::from_millis(300);
            while w.in_flight[i].load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if w.in_flight[i].load(Ordering::SeqCst) > 0 {
                t.agent_kills_mid_write += 1;
            }
            rig.kill_agent(i)?;
            t.agent_kills += 1;
            let mut note = if i == *site {
                String::new()
            } else {
                format!(", hit {} instead", rig.sites[i].id)
            };
            if let Some(d) = down_ms {
                // The agent's drawn downtime: the fault itself, not a wait for a condition.
                tokio::time::sleep(Duration::from_millis(*d)).await;
                rig.start_agent(i)?;
                t.agent_restarts += 1;
            } else {
                note.push_str(", restarted at heal");
            }
            Ok(note)
        }
        Fault::KillCentral {
            watch,
            backlog_ms,
            after_ms,
            down_ms,
        } => {
            if rig.central.is_none() {
                return Ok(", skipped: central down".to_string());
            }
            for s in &rig.sites {
                s.proxy.partition(true);
            }
            // The outage during which the backlog builds.
            tokio::time::sleep(Duration::from_millis(*backlog_ms)).await;
            let watched = (0..rig.sites.len())
                .map(|k| (watch + k) % rig.sites.len())
                .find(|i| rig.sites[*i].proc.is_some());
            let probe = watched.and_then(|i| rig.probe(i));
            let before = match &probe {
                Some(a) => depth(a).await,
                None => None,
            };
            for s in &rig.sites {
                s.proxy.partition(false);
            }
            // Poll tightly (and boundedly) for the first acknowledged batch.
            let mut started = false;
            if let (Some(a), Some(d0)) = (&probe, before) {
                let deadline = Instant::now() + DRAIN_START_TIMEOUT;
                while Instant::now() < deadline {
                    if depth(a).await.is_some_and(|d| d < d0) {
                        started = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            // The fault's timing: 0–50 ms into the drain. Meanwhile, the watched site's newest
            // session at central, so the next one (with the restarted central) can be found.
            let kill_at = Instant::now() + Duration::from_millis(*after_ms);
            let session = match watched {
                Some(i) => newest_session(&rig.c, &rig.sites[i].id).await,
                None => None,
            };
            tokio::time::sleep_until(kill_at.into()).await;
            rig.central.take().context("central running")?.kill9()?;
            t.central_kills += 1;
            let at_kill = match &probe {
                Some(a) => depth(a).await,
                None => None,
            };
            if started && at_kill.is_some_and(|d| d > 0) {
                t.central_kills_mid_drain += 1;
            }
            // Central's drawn downtime: the fault itself, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(*down_ms)).await;
            // What the agent knows central acknowledged; central is dead, so this is final.
            let acked = match &probe {
                Some(a) => health(a).await.ok().and_then(|h| h["acked_seq"].as_u64()),
                None => None,
            };
            if let (Some(site), Some(session), Some(acked)) = (watched, session, acked) {
                t.commit_probes.push(CommitProbe {
                    site,
                    session,
                    acked,
                });
            }
            rig.start_central()?;
            t.central_restarts += 1;
            let note = format!(
                ", backlog {} -> {} at kill{}",
                before.map_or("?".to_string(), |d| d.to_string()),
                at_kill.map_or("?".to_string(), |d| d.to_string()),
                if started { "" } else { ", drain not seen" }
            );
            Ok(note)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The workload.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// A 2xx answer.
    Ok,
    /// A definite refusal: a 4xx other than 408 (timeout) and 429.
    Failed,
    /// No answer (connection error, timeout, agent killed), a 408, a 429 or a 5xx.
    Unknown,
}

#[derive(Clone, Debug)]
enum Write {
    /// An order: `tag` is the quantity of its `TAG_SKU` line, unique per request.
    Order { tag: u64, key: String, body: Value },
    Milestone {
        event_id: String,
        shipment: String,
        kind: &'static str,
    },
}

impl Write {
    /// The idempotency key (orders) or event id (milestones): one write per key.
    fn key(&self) -> &str {
        match self {
            Write::Order { key, .. } => key,
            Write::Milestone { event_id, .. } => event_id,
        }
    }
}

/// One logical write of the workload and what its client learned.
#[derive(Clone, Debug)]
struct Req {
    schedule: usize,
    site: usize,
    write: Write,
    outcome: Outcome,
    /// The first 2xx answer.
    answer: Option<Value>,
    /// A deliberate reuse of another write's key with a different body (expected 422).
    conflict: bool,
    /// The first attempt's outcome was unknown and a retry with the same key got the answer.
    resolved: bool,
}

struct Workload {
    stop: AtomicBool,
    /// Requests in flight per site, so an agent is killed mid-write.
    in_flight: Vec<AtomicU64>,
    next_tag: AtomicU64,
    retries: AtomicU64,
    /// Broken promises seen by the clients themselves (a retry answered differently...).
    problems: std::sync::Mutex<Vec<String>>,
}

fn order_body(rng: &mut StdRng, tag: u64) -> Value {
    let customer = if rng.random_bool(0.9) {
        "ACME"
    } else {
        "GLOBEX"
    };
    let mut lines = Vec::new();
    for (sku, _, max) in SKUS {
        if lines.is_empty() || rng.random_bool(0.3) {
            lines.push(json!({"sku": sku, "qty": rng.random_range(1..=max)}));
        }
    }
    if rng.random_bool(0.5) {
        lines.reverse();
    }
    lines.push(json!({"sku": TAG_SKU, "qty": tag}));
    json!({"customer_id": customer, "lines": lines})
}

fn milestone_body(event_id: &str, kind: &str) -> Value {
    json!({"event_id": event_id, "milestone": kind, "scanner_id": "chaos-scanner",
           "at": "2026-11-27T03:00:00Z"})
}

fn classify(r: &Result<Resp>) -> Outcome {
    match r {
        Ok(r) if (200..300).contains(&r.status) => Outcome::Ok,
        Ok(r) if (400..500).contains(&r.status) && r.status != 408 && r.status != 429 => {
            Outcome::Failed
        }
        _ => Outcome::Unknown,
    }
}

async fn send(work: &Workload, site: usize, slot: &ApiSlot, w: &Write) -> Result<Resp> {
    let api = slot
        .read()
        .expect("slot lock")
        .clone()
        .context("agent down")?;
    work.in_flight[site].fetch_add(1, Ordering::SeqCst);
    let r = post(&api, w).await;
    work.in_flight[site].fetch_sub(1, Ordering::SeqCst);
    r
}

async fn post(api: &Api, w: &Write) -> Result<Resp> {
    match w {
        Write::Order { key, body, .. } => api.post("/v1/orders", body, Some(key)).await,
        Write::Milestone {
            event_id,
            shipment,
            kind,
        } => {
            api.post(
                &format!("/v1/shipments/{shipment}/milestones"),
                &milestone_body(event_id, kind),
                None,
            )
            .await
        }
    }
}

/// One client of one site: posts until told to stop, one request at a time.
async fn client(
    w: Arc<Workload>,
    slot: ApiSlot,
    schedule: usize,
    site: usize,
    site_id: String,
    mut rng: StdRng,
) -> Vec<Req> {
    let mut out: Vec<Req> = Vec::new();
    // Bounded in count as well as by the stop flag.
    for _ in 0..10_000 {
        if w.stop.load(Ordering::SeqCst) {
            break;
        }
        // A client's drawn pause between requests: workload pacing, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(rng.random_range(CLIENT_PAUSE_MS))).await;
        if slot.read().expect("slot lock").is_none() {
            continue;
        }
        let tag = w.next_tag.fetch_add(1, Ordering::SeqCst);
        let roll = rng.random_range(0..100);
        // A deliberate conflict: an earlier acknowledged write's key with another body.
        let acked: Vec<&Req> = out
            .iter()
            .filter(|r| r.outcome == Outcome::Ok && !r.conflict)
            .collect();
        let earlier = (!acked.is_empty()).then(|| acked[rng.random_range(0..acked.len())]);
        let (write, conflict) = match (roll, earlier) {
            (0..4, Some(e)) => match &e.write {
                Write::Order { key, .. } => (
                    Write::Order {
                        tag,
                        key: key.clone(),
                        body: order_body(&mut rng, tag),
                    },
                    true,
                ),
                Write::Milestone {
                    event_id,
                    shipment,
                    kind,
                } => (
                    Write::Milestone {
                        event_id: event_id.clone(),
                        shipment: shipment.clone(),
                        kind: MILESTONES
                            .iter()
                            .copied()
                            .find(|k| k != kind)
                            .expect("another milestone kind"),
                    },
                    true,
                ),
            },
            (0..60, _) => (
                Write::Order {
                    tag,
                    key: format!("chaos-{site_id}-k{tag}"),
                    body: order_body(&mut rng, tag),
                },
                false,
            ),
            _ => (
                Write::Milestone {
                    event_id: format!("chaos-{site_id}-m{tag}"),
                    shipment: format!("SHC-{}", tag % 97),
                    kind: MILESTONES[rng.random_range(0..MILESTONES.len())],
                },
                false,
            ),
        };
        let r = send(&w, site, &slot, &write).await;
        let mut req = Req {
            schedule,
            site,
            outcome: classify(&r),
            answer: r
                .ok()
                .filter(|r| (200..300).contains(&r.status))
                .map(|r| r.body),
            write,
            conflict,
            resolved: false,
        };
        if !req.conflict && req.outcome == Outcome::Failed {
            w.problems.lock().expect("problems lock").push(format!(
                "{} was refused although nothing is wrong with it",
                req.write.key()
            ));
        }
        if req.conflict && req.outcome == Outcome::Ok {
            w.problems.lock().expect("problems lock").push(format!(
                "key {} reused with another body was accepted: {:?}",
                req.write.key(),
                req.answer
            ));
        }
        // Retries with the same key, as real clients do: some acknowledged writes once at once
        // (the answer must be the original), unknown ones until answered (bounded).
        let mut tries = 0;
        loop {
            let again = match req.outcome {
                Outcome::Ok => tries == 0 && rng.random_bool(0.1),
                Outcome::Unknown => tries < MAX_RETRIES && rng.random_bool(0.5),
                Outcome::Failed => false,
            };
            if req.conflict || w.stop.load(Ordering::SeqCst) || !again {
                break;
            }
            tries += 1;
            w.retries.fetch_add(1, Ordering::Relaxed);
            if req.outcome == Outcome::Unknown {
                // A real client's pause before retrying an unknown outcome: part of the workload.
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..=150))).await;
            }
            let again = send(&w, site, &slot, &req.write).await;
            match (classify(&again), &req.answer, again) {
                (Outcome::Ok, Some(first), Ok(a)) => {
                    if *first != a.body {
                        w.problems.lock().expect("problems lock").push(format!(
                            "retry of {} answered {} but the first answer was {first}",
                            req.write.key(),
                            a.body
                        ));
                    }
                    break;
                }
                (Outcome::Ok, None, Ok(a)) => {
                    req.outcome = Outcome::Ok;
                    req.answer = Some(a.body);
                    req.resolved = true;
                }
                (Outcome::Failed, _, Ok(a)) => {
                    w.problems.lock().expect("problems lock").push(format!(
                        "retry of {} with the same body was refused: {} {}",
                        req.write.key(),
                        a.status,
                        a.body
                    ));
                    break;
                }
                _ => {}
            }
        }
        out.push(req);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Central's view and the checks.
// ---------------------------------------------------------------------------------------------

/// Everything central holds, read incrementally from its feed.
#[derive(Default)]
struct CentralView {
    after: u64,
    feed: Vec<Value>,
    /// Highest seq seen per site in feed order (each new entry must be above it).
    last_seq: HashMap<String, u64>,
    seq_problems: Vec<String>,
}

impl CentralView {
    async fn refresh(&mut self, c: &Api) -> Result<()> {
        let (new, next) = read_feed_after(c, self.after).await?;
        for e in &new {
            let site = e["site"].as_str().unwrap_or("?").to_string();
            let seq = e["seq"].as_u64().unwrap_or(0);
            let last = self.last_seq.entry(site.clone()).or_insert(0);
            if seq <= *last && self.seq_problems.len() < 20 {
                self.seq_problems.push(format!(
                    "{site}: feed entry with seq {seq} after seq {last}: {e}"
                ));
            }
            *last = (*last).max(seq);
        }
        self.feed.extend(new);
        self.after = next;
        Ok(())
    }
}

/// The tag of an order as central shows it (its `TAG_SKU` line's quantity).
fn tag_of(lines: &Value) -> Option<u64> {
    lines
        .as_array()?
        .iter()
        .find(|l| l["sku"] == TAG_SKU)
        .and_then(|l| l["qty"].as_u64())
}

fn promises(lines: &Value) -> Vec<String> {
    lines
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| l["promise"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A write as central holds it.
#[derive(Clone, Debug)]
struct AtCentral {
    site: String,
    /// `order_id` for orders, `id` (the event id) for milestones.
    id: String,
    seq: u64,
    /// Milestone kind, or the order's line promises.
    detail: Vec<String>,
    lines: Value,
}

/// Figures of one check, cumulative over the run.
#[derive(Default, Debug)]
struct Verdict {
    ok: u64,
    failed: u64,
    unknown: u64,
    unknown_applied: u64,
    lost: u64,
    duplicated: u64,
    unrequested: u64,
    refused_applied: u64,
    oversold: i64,
    problems: Vec<String>,
}

impl Verdict {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 30 {
            self.problems.push(p);
        }
    }
}

/// What the fleet holds once every outbox drained: central's feed, exception queue and dead
/// letters, and what each site still holds in escrow per (SKU, site).
struct Holdings<'a> {
    feed: &'a [Value],
    seq_problems: &'a [String],
    exceptions: Vec<Value>,
    dead: Vec<Value>,
    held: BTreeMap<(String, String), i64>,
}

/// Reads the holdings and judges them.
async fn check(
    rig: &Rig,
    view: &CentralView,
    reqs: &[Req],
    atp: &BTreeMap<(String, String), i64>,
) -> Result<Verdict> {
    let site_ids: Vec<String> = rig.sites.iter().map(|s| s.id.clone()).collect();
    let dead = rig.c.get("/v1/dead-letters").await?;
    ensure!(
        dead.status == 200,
        "dead letters: {} {}",
        dead.status,
        dead.body
    );
    let mut held = BTreeMap::new();
    for (sku, site) in atp.keys() {
        let i = site_ids.iter().position(|s| s == site).expect("known site");
        let a = rig.probe(i).context("every agent is up at check time")?;
        held.insert((sku.clone(), site.clone()), allowance(&a, sku).await?);
    }
    let h = Holdings {
        feed: &view.feed,
        seq_problems: &view.seq_problems,
        exceptions: exceptions(&rig.c, "all").await?,
        dead: as_list(&dead.body).context("dead letters are a list")?,
        held,
    };
    Ok(judge(&site_ids, &h, reqs, atp))
}

/// The invariants, judged from the requests and the holdings (pure, so it is tested below).
fn judge(
    site_ids: &[String],
    h: &Holdings,
    reqs: &[Req],
    atp: &BTreeMap<(String, String), i64>,
) -> Verdict {
    let mut v = Verdict::default();
    // Everything central holds: the feed plus the exception queue.
    let mut orders: HashMap<u64, Vec<AtCentral>> = HashMap::new();
    let mut milestones: HashMap<String, Vec<AtCentral>> = HashMap::new();
    for e in h.feed {
        let at = AtCentral {
            site: e["site"].as_str().unwrap_or("?").to_string(),
            id: e["order_id"]
                .as_str()
                .or_else(|| e["id"].as_str())
                .unwrap_or("?")
                .to_string(),
            seq: e["seq"].as_u64().unwrap_or(0),
            detail: if e["kind"] == "order" {
                promises(&e["lines"])
            } else {
                vec![e["milestone"].as_str().unwrap_or("?").to_string()]
            },
            lines: e["lines"].clone(),
        };
        match e["kind"].as_str() {
            Some("order") => match tag_of(&e["lines"]) {
                Some(tag) => orders.entry(tag).or_default().push(at),
                None => {
                    v.unrequested += 1;
                    v.problem(format!("an order without a tag line at central: {e}"));
                }
            },
            Some("milestone") => milestones.entry(at.id.clone()).or_default().push(at),
            _ => {
                v.unrequested += 1;
                v.problem(format!("unexpected feed entry: {e}"));
            }
        }
    }
    for x in &h.exceptions {
        v.problem(format!(
            "no business exception can arise here (prices and holds never change): {x}"
        ));
        if let Some(tag) = tag_of(&x["event"]["lines"]) {
            orders.entry(tag).or_default().push(AtCentral {
                site: x["site"].as_str().unwrap_or("?").to_string(),
                id: exception_order_id(x).unwrap_or("?").to_string(),
                seq: x["seq"].as_u64().unwrap_or(0),
                detail: promises(&x["event"]["lines"]),
                lines: x["event"]["lines"].clone(),
            });
        }
    }
    for d in &h.dead {
        v.problem(format!("dead letter: {d}"));
    }
    for p in h.seq_problems {
        v.problem(p.clone());
    }

    // Per key (idempotency key or event id): the requests made with it.
    let mut by_key: HashMap<(usize, &str), Vec<&Req>> = HashMap::new();
    let mut tags: HashSet<u64> = HashSet::new();
    for r in reqs {
        by_key.entry((r.site, r.write.key())).or_default().push(r);
        match r.outcome {
            Outcome::Ok => v.ok += 1,
            Outcome::Failed => v.failed += 1,
            Outcome::Unknown => v.unknown += 1,
        }
        if let Write::Order { tag, .. } = &r.write {
            tags.insert(*tag);
        }
    }
    for ((site, key), group) in &by_key {
        let site_id = &site_ids[*site];
        // Central's copies of this key's writes.
        let mut found: Vec<(&Req, &AtCentral)> = Vec::new();
        for r in group {
            match &r.write {
                Write::Order { tag, .. } => {
                    for at in orders.get(tag).into_iter().flatten() {
                        found.push((r, at));
                    }
                }
                Write::Milestone { event_id, kind, .. } => {
                    // The event id is shared by the group: attribute each copy to the request
                    // whose content it carries.
                    for at in milestones.get(event_id).into_iter().flatten() {
                        if at.detail.first().map(String::as_str) == Some(*kind) {
                            found.push((r, at));
                        }
                    }
                }
            }
        }
        for (r, at) in &found {
            if at.site != *site_id {
                v.unrequested += 1;
                v.problem(format!(
                    "{key} was written at {site_id} but central has it from {}",
                    at.site
                ));
            }
            if r.outcome == Outcome::Failed {
                v.refused_applied += 1;
                v.problem(format!(
                    "{key}: a write refused with a 4xx is at central: {at:?}"
                ));
            }
            if r.outcome == Outcome::Unknown {
                v.unknown_applied += 1;
            }
        }
        if let Some(Write::Milestone { event_id, .. }) = group.first().map(|r| &r.write) {
            let copies = milestones.get(event_id).map_or(0, Vec::len);
            if copies > found.len() {
                v.unrequested += (copies - found.len()) as u64;
                v.problem(format!(
                    "{key} at central with content no request had: {:?}",
                    milestones.get(event_id)
                ));
            }
        }
        if found.len() > 1 {
            v.duplicated += found.len() as u64 - 1;
            v.problem(format!(
                "{key} at {site_id} applied {} times: {:?}",
                found.len(),
                found.iter().map(|(_, a)| a).collect::<Vec<_>>()
            ));
        }
        for r in group.iter().filter(|r| r.outcome == Outcome::Ok) {
            let mine: Vec<&AtCentral> = found
                .iter()
                .filter(|(q, _)| std::ptr::eq(*q, *r))
                .map(|(_, a)| *a)
                .collect();
            let Some(at) = mine.first() else {
                v.lost += 1;
                v.problem(format!(
                    "{key} at {site_id} (schedule {}) got a 2xx but is not at central: {:?}",
                    r.schedule, r.answer
                ));
                continue;
            };
            let answer = r.answer.as_ref().expect("a 2xx has an answer");
            let want_seq = match &r.write {
                Write::Order { .. } => answer["order_id"]
                    .as_str()
                    .and_then(|id| id.rsplit_once("-o"))
                    .and_then(|(_, s)| s.parse().ok()),
                Write::Milestone { .. } => answer["seq"].as_u64(),
            };
            let same = match &r.write {
                Write::Order { .. } => {
                    Some(at.id.as_str()) == answer["order_id"].as_str()
                        && at.detail == promises(&answer["lines"])
                }
                Write::Milestone { .. } => true,
            };
            if !same || want_seq != Some(at.seq) {
                v.problem(format!(
                    "{key} at {site_id}: central holds {at:?}, the site answered {answer}"
                ));
            }
        }
    }
    // Central holds nothing that was never requested.
    for (tag, ats) in &orders {
        if !tags.contains(tag) {
            v.unrequested += ats.len() as u64;
            v.problem(format!(
                "order tag {tag} at central was never requested: {ats:?}"
            ));
        }
    }
    let event_ids: HashSet<&str> = reqs
        .iter()
        .filter_map(|r| match &r.write {
            Write::Milestone { event_id, .. } => Some(event_id.as_str()),
            Write::Order { .. } => None,
        })
        .collect();
    for (id, ats) in &milestones {
        if !event_ids.contains(id.as_str()) {
            v.unrequested += ats.len() as u64;
            v.problem(format!(
                "milestone {id} at central was never requested: {ats:?}"
            ));
        }
    }

    // Oversold: confirmed units per (SKU, site) at central, and what the site still holds in
    // escrow on top, against the ATP.
    let mut sold: BTreeMap<(String, String), i64> = BTreeMap::new();
    for at in orders.values().flatten() {
        for l in at.lines.as_array().into_iter().flatten() {
            if l["promise"] == "confirmed" {
                let sku = l["sku"].as_str().unwrap_or("?").to_string();
                *sold.entry((sku, at.site.clone())).or_insert(0) += l["qty"].as_i64().unwrap_or(0);
            }
        }
    }
    for ((sku, site), n) in &sold {
        if !atp.contains_key(&(sku.clone(), site.clone())) {
            v.oversold += n;
            v.problem(format!(
                "{n} units of {sku} confirmed at {site}, which has no ATP of it"
            ));
        }
    }
    for ((sku, site), limit) in atp {
        let n = sold.get(&(sku.clone(), site.clone())).copied().unwrap_or(0);
        v.oversold += (n - limit).max(0);
        let held = h
            .held
            .get(&(sku.clone(), site.clone()))
            .copied()
            .unwrap_or(0);
        if n + held > *limit {
            v.problem(format!(
                "{sku}@{site}: {n} confirmed + {held} still escrowed at the site > ATP {limit}"
            ));
        }
    }
    if v.oversold > 0 {
        v.problem(format!("oversold {} units", v.oversold));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Totals {
    faults: BTreeMap<&'static str, u64>,
    agent_kills: u64,
    /// Agent kills with a client's request in flight.
    agent_kills_mid_write: u64,
    agent_restarts: u64,
    central_kills: u64,
    central_kills_mid_drain: u64,
    /// One per central kill whose watched site could be read: see `CommitProbe`.
    commit_probes: Vec<CommitProbe>,
    /// Kills that fell after a commit and before the agent got its ack, and the events so
    /// committed without an ack.
    commits_without_ack: u64,
    events_committed_without_ack: u64,
    central_restarts: u64,
}

/// Goal: under any mix of partitions, one-way and random loss, delay with jitter (reordering),
/// duplication, flapping links, SIGKILLs of agents mid-write and SIGKILLs of central a few ms
/// into a drain, every write a client got a 2xx for reaches central exactly once, a write whose
/// outcome the client never learned reaches it at most once, nothing else reaches it, no
/// idempotency key is applied twice, no SKU is oversold, and every outbox drains once the fleet
/// heals, without restarting any process that was not killed.
/// Method: one fleet (central, 2 agents each behind a `UdpProxy`), then N seeded schedules (see
/// the module doc for the knobs). Each schedule runs 2 clients per site (orders with
/// Idempotency-Keys and a tag line, milestones with event ids; some retried with the same key,
/// a few reusing a key with another body, which must be refused) while its faults run one
/// after another; then the clients stop, every proxy heals, only killed processes restart, every
/// outbox drains (bounded), and the invariants are checked over everything written so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_chaos_schedules_keep_writes_exactly_once() -> Result<()> {
    let seed = env_u64("OUTPOST_CHAOS_SEED").unwrap_or(DEFAULT_SEED);
    let secs = env_u64("OUTPOST_CHAOS_SECS");
    let replay = format!(
        "OUTPOST_CHAOS_SEED={seed}{} cargo test -p outpost-tests --test chaos -- --nocapture",
        secs.map_or(String::new(), |s| format!(" OUTPOST_CHAOS_SECS={s}"))
    );
    eprintln!("chaos: seed {seed} (replay: {replay})");
    let r = chaos_run(seed, secs).await;
    if let Err(e) = &r {
        eprintln!("chaos FAILED with seed {seed}: {e:#}\nreplay with: {replay}");
    }
    r.with_context(|| format!("chaos seed {seed}; replay with: {replay}"))
}

async fn chaos_run(seed: u64, secs: Option<u64>) -> Result<()> {
    let (max_schedules, budget) = match secs {
        Some(s) => (MAX_SCHEDULES, Duration::from_secs(s)),
        None => (
            env_u64("OUTPOST_CHAOS_SCHEDULES").map_or(DEFAULT_SCHEDULES, |n| n as usize),
            // A bound for the normal run, far above its expected ~3 minutes.
            Duration::from_secs(900),
        ),
    };
    let started = Instant::now();
    let mut rig = Rig::start(seed).await?;
    let ids: Vec<String> = rig.sites.iter().map(|s| s.id.clone()).collect();

    // The catalogue: contested SKUs with ATP per site, and the tag SKU nobody has ATP of.
    let mut atp = BTreeMap::new();
    let mut atp_rows = Vec::new();
    for s in &ids {
        for (sku, n, _) in SKUS {
            atp.insert((sku.to_string(), s.clone()), n);
            atp_rows.push(json!({"sku": sku, "site": s, "available": n}));
        }
        atp_rows.push(json!({"sku": TAG_SKU, "site": s, "available": 0}));
    }
    let catalogue = [
        (
            "/v1/master/prices",
            json!([
                {"sku": "GEAR-12T", "customer": null, "unit_price": "12.50", "currency": "EUR"},
                {"sku": "PUMP-7", "customer": null, "unit_price": "80.00", "currency": "EUR"},
                {"sku": TAG_SKU, "customer": null, "unit_price": "0.01", "currency": "EUR"},
            ]),
        ),
        (
            "/v1/master/customers",
            json!([
                {"id": "ACME", "name": "Acme Corp", "credit_limit": "1000000", "on_hold": false},
                {"id": "GLOBEX", "name": "Globex", "credit_limit": "1000", "on_hold": true},
            ]),
        ),
        ("/v1/master/atp", Value::Array(atp_rows)),
    ];
    let mut rev = 0;
    for (path, body) in &catalogue {
        let r = rig.c.put(path, body).await?;
        ensure!(r.status == 200, "PUT {path}: {} {}", r.status, r.body);
        rev = r.body["revision"].as_u64().context("revision")?;
    }
    for (i, id) in ids.iter().enumerate() {
        let a = rig.probe(i).context("agent up")?;
        wait_master(&a, rev).await?;
        for (sku, _, _) in SKUS {
            eventually(
                &format!("an allowance of {sku} at {id}"),
                CONVERGE_TIMEOUT,
                || async { Ok((allowance(&a, sku).await? > 0).then_some(())) },
            )
            .await?;
        }
    }
    eprintln!("chaos: fleet up in {:.1}s", started.elapsed().as_secs_f64());

    let work = Arc::new(Workload {
        stop: AtomicBool::new(false),
        in_flight: rig.sites.iter().map(|_| AtomicU64::new(0)).collect(),
        next_tag: AtomicU64::new(1),
        retries: AtomicU64::new(0),
        problems: std::sync::Mutex::new(Vec::new()),
    });
    let mut reqs: Vec<Req> = Vec::new();
    let mut view = CentralView::default();
    let mut t = Totals::default();
    let mut last = Verdict::default();
    let mut done = 0;
    for n in 0..max_schedules {
        if started.elapsed() > budget {
            break;
        }
        let s_started = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let faults = draw_schedule(&mut rng, rig.sites.len());
        let pids_before = rig.pids();

        // The workload, against whatever state the faults leave the sites in.
        work.stop.store(false, Ordering::SeqCst);
        let mut clients = Vec::new();
        for (i, s) in rig.sites.iter().enumerate() {
            for k in 0..CLIENTS_PER_SITE {
                clients.push(tokio::spawn(client(
                    work.clone(),
                    s.slot.clone(),
                    n,
                    i,
                    s.id.clone(),
                    StdRng::seed_from_u64(rng.random::<u64>() ^ k as u64),
                )));
            }
        }
        // The workload runs alone for a drawn moment before the first fault (schedule pacing).
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..=200))).await;
        let mut lines = Vec::new();
        let mut killed_agents: HashSet<usize> = HashSet::new();
        let mut central_killed = false;
        for f in &faults {
            match f {
                Fault::KillAgent { .. } => {
                    let before: Vec<bool> = rig.sites.iter().map(|s| s.proc.is_some()).collect();
                    let note = run_fault(&mut rig, &work, f, &mut t).await?;
                    for (i, up) in before.iter().enumerate() {
                        // Killed now (down, or up with another pid).
                        if *up && rig.pids()[i + 1] != pids_before[i + 1] {
                            killed_agents.insert(i);
                        }
                    }
                    lines.push(describe(f, &rig.sites, &note));
                }
                Fault::KillCentral { .. } => {
                    let note = run_fault(&mut rig, &work, f, &mut t).await?;
                    central_killed |= rig.pids()[0] != pids_before[0];
                    lines.push(describe(f, &rig.sites, &note));
                }
                _ => {
                    run_fault(&mut rig, &work, f, &mut t).await?;
                    lines.push(describe(f, &rig.sites, ""));
                }
            }
        }
        // A last stretch of workload after the faults, before the clients stop (pacing).
        tokio::time::sleep(Duration::from_millis(100)).await;
        work.stop.store(true, Ordering::SeqCst);
        let mut written = 0;
        for c in clients {
            let got = tokio::time::timeout(STOP_TIMEOUT, c)
                .await
                .context("a workload client did not stop in time")??;
            written += got.len();
            reqs.extend(got);
        }

        // Heal: lift every fault, restart only what this schedule killed.
        rig.heal();
        if rig.central.is_none() {
            rig.start_central()?;
            t.central_restarts += 1;
        }
        for i in 0..rig.sites.len() {
            if rig.sites[i].proc.is_none() {
                rig.start_agent(i)?;
                t.agent_restarts += 1;
            }
        }
        // Nothing that was not killed was restarted, and nothing died on its own.
        let pids_after = rig.pids();
        ensure!(
            central_killed || pids_after[0] == pids_before[0],
            "schedule {n}: central changed pid without being killed"
        );
        for i in 0..rig.sites.len() {
            ensure!(
                killed_agents.contains(&i) || pids_after[i + 1] == pids_before[i + 1],
                "schedule {n}: agent {} changed pid without being killed",
                ids[i]
            );
        }
        if let Some(c) = rig.central.as_mut() {
            ensure!(
                c.is_running(),
                "schedule {n}: central died on its own:\n{}",
                c.log_tail()
            );
        }
        for s in rig.sites.iter_mut() {
            let p = s.proc.as_mut().context("agent up after heal")?;
            ensure!(
                p.is_running(),
                "schedule {n}: agent {} died on its own:\n{}",
                s.id,
                p.log_tail()
            );
        }

        // Every outbox drains (bounded), without any further restart.
        let drain_started = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let a = rig.probe(i).context("agent up")?;
            let r = eventually(&format!("{id} drained"), DRAIN_TIMEOUT, || async {
                let h = health(&a).await?;
                Ok((h["outbox_depth"].as_u64() == Some(0) && h["connected"] == true).then_some(()))
            })
            .await;
            if let Err(e) = r {
                let tail = rig.sites[i]
                    .proc
                    .as_ref()
                    .map(Proc::log_tail)
                    .unwrap_or_default();
                bail!(
                    "schedule {n} ({}): {e:#}; agent log:\n{tail}",
                    lines.join(", ")
                );
            }
        }
        let drain = drain_started.elapsed();
        ensure!(
            rig.pids() == pids_after,
            "schedule {n}: a process was restarted while draining"
        );

        view.refresh(&rig.c).await?;
        for p in std::mem::take(&mut t.commit_probes) {
            match committed_without_ack(&rig.c, &ids[p.site], &p).await {
                Some(0) => {}
                Some(n) => {
                    t.commits_without_ack += 1;
                    t.events_committed_without_ack += n;
                    lines.push(format!(
                        "(the kill fell after central committed {n} events of {} and before \
                         their ack)",
                        ids[p.site]
                    ));
                }
                None => lines.push(format!(
                    "(no session of {} after the kill found)",
                    ids[p.site]
                )),
            }
        }
        let mut verdict = check(&rig, &view, &reqs, &atp).await?;
        for p in work.problems.lock().expect("problems lock").iter() {
            verdict.problem(p.clone());
        }
        let (ok, failed, unknown) =
            reqs.iter()
                .filter(|r| r.schedule == n)
                .fold((0, 0, 0), |(o, f, u), r| match r.outcome {
                    Outcome::Ok => (o + 1, f, u),
                    Outcome::Failed => (o, f + 1, u),
                    Outcome::Unknown => (o, f, u + 1),
                });
        println!(
            "chaos schedule {}/{}: [{}] writes {written} (ok {ok}, failed {failed}, unknown \
             {unknown}; {} unknown at central so far) drain {:.1}s time {:.1}s",
            n + 1,
            if secs.is_some() {
                "-".to_string()
            } else {
                max_schedules.to_string()
            },
            lines.join(", "),
            verdict.unknown_applied,
            drain.as_secs_f64(),
            s_started.elapsed().as_secs_f64(),
        );
        done = n + 1;
        if !verdict.problems.is_empty() {
            bail!(
                "schedule {} of seed {seed} broke an invariant ({}): lost {} duplicated {} \
                 unrequested {} refused_applied {} oversold {}:\n{}",
                n + 1,
                lines.join(", "),
                verdict.lost,
                verdict.duplicated,
                verdict.unrequested,
                verdict.refused_applied,
                verdict.oversold,
                verdict.problems.join("\n")
            );
        }
        last = verdict;
    }

    let mut faults = String::new();
    for (k, n) in &t.faults {
        let _ = write!(
            faults,
            "{}{k}={n}",
            if faults.is_empty() { "" } else { " " }
        );
    }
    let (mut dropped, mut duplicated) = (0, 0);
    for s in &rig.sites {
        let st = s.proxy.stats();
        dropped += st.dropped;
        duplicated += st.duplicated;
    }
    let resolved = reqs.iter().filter(|r| r.resolved).count();
    // Events central received again after it had committed them (an ack lost to a kill or to
    // the network), as its reconciliation reports count them: dropped as duplicates.
    let mut resent = 0;
    for id in &ids {
        let r = rig
            .c
            .get(&format!("/v1/sites/{id}/reconciliations"))
            .await?;
        for rep in as_list(&r.body).unwrap_or_default() {
            resent += rep["duplicates_dropped"].as_u64().unwrap_or(0);
        }
    }
    println!(
        "chaos final: seed={seed} schedules={done} writes={} ok={} failed={} unknown={} \
         (unknown at central {}, unknown then answered by a retry {resolved}) retries={} \
         lost={} duplicated={} unrequested={} refused_applied={} oversold={} kills agent={} \
         ({} mid-write) central={} ({} mid-drain, {} between a commit and its ack: {} events \
         committed unacknowledged, each applied once) faults: {faults} datagrams dropped={dropped} \
         duplicated={duplicated} resent_and_dropped_at_central={resent} feed={} elapsed={:.1}s",
        reqs.len(),
        last.ok,
        last.failed,
        last.unknown,
        last.unknown_applied,
        work.retries.load(Ordering::Relaxed),
        last.lost,
        last.duplicated,
        last.unrequested,
        last.refused_applied,
        last.oversold,
        t.agent_kills,
        t.agent_kills_mid_write,
        t.central_kills,
        t.central_kills_mid_drain,
        t.commits_without_ack,
        t.events_committed_without_ack,
        view.feed.len(),
        started.elapsed().as_secs_f64(),
    );
    ensure!(done > 0, "no schedule ran");
    ensure!(last.ok > 0, "the workload produced acknowledged writes");
    ensure!(
        t.agent_kills_mid_write > 0 && t.central_kills > 0,
        "the schedules killed no agent mid-write ({}) or no central ({}): the faults did not happen",
        t.agent_kills_mid_write,
        t.central_kills
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The checks themselves can fail.
// ---------------------------------------------------------------------------------------------

fn feed_order(site: &str, seq: u64, tag: u64, gear: i64) -> Value {
    json!({"kind": "order", "site": site, "seq": seq, "order_id": format!("{site}-o{seq}"),
           "lines": [{"sku": "GEAR-12T", "qty": gear, "promise": "confirmed"},
                     {"sku": TAG_SKU, "qty": tag, "promise": "pending_allowance"}]})
}

fn ok_order(tag: u64, key: &str, seq: u64, gear: i64) -> Req {
    Req {
        schedule: 0,
        site: 0,
        write: Write::Order {
            tag,
            key: key.to_string(),
            body: json!({}),
        },
        outcome: Outcome::Ok,
        answer: Some(json!({"order_id": format!("plant-1-o{seq}"), "lines": [
            {"sku": "GEAR-12T", "qty": gear, "promise": "confirmed"},
            {"sku": TAG_SKU, "qty": tag, "promise": "pending_allowance"}]})),
        conflict: false,
        resolved: false,
    }
}

/// Judges `feed` against `reqs` with an ATP of 5 GEAR-12T at plant-1.
fn judged(feed: &[Value], reqs: &[Req]) -> Verdict {
    let h = Holdings {
        feed,
        seq_problems: &[],
        exceptions: Vec::new(),
        dead: Vec::new(),
        held: BTreeMap::new(),
    };
    let atp = BTreeMap::from([(("GEAR-12T".to_string(), "plant-1".to_string()), 5)]);
    judge(
        &["plant-1".to_string(), "plant-2".to_string()],
        &h,
        reqs,
        &atp,
    )
}

/// Goal: the chaos checks are not vacuous: each invariant's breach is caught and counted.
/// Method: a consistent pair of requests and feed is judged clean; then one breach at a time
/// (a lost write, a duplicate, an unrequested order, a refused write applied, an oversold SKU,
/// a milestone with another kind) must be reported with its count.
#[test]
fn the_checks_catch_each_breach() {
    let reqs = vec![ok_order(1, "k1", 1, 2), ok_order(2, "k2", 2, 3)];
    let feed = vec![
        feed_order("plant-1", 1, 1, 2),
        feed_order("plant-1", 2, 2, 3),
    ];
    let clean = judged(&feed, &reqs);
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!((clean.ok, clean.oversold), (2, 0));

    let lost = judged(&feed[..1], &reqs);
    assert_eq!(lost.lost, 1, "{:?}", lost.problems);

    let twice = [feed.clone(), vec![feed_order("plant-1", 3, 2, 3)]].concat();
    let v = judged(&twice, &reqs);
    assert_eq!(v.duplicated, 1, "{:?}", v.problems);

    let extra = [feed.clone(), vec![feed_order("plant-1", 3, 99, 0)]].concat();
    let v = judged(&extra, &reqs);
    assert_eq!(v.unrequested, 1, "{:?}", v.problems);

    let wrong_site = vec![feed[0].clone(), feed_order("plant-2", 1, 2, 0)];
    let v = judged(&wrong_site, &reqs);
    assert_eq!(v.unrequested, 1, "{:?}", v.problems);

    let mut refused = ok_order(3, "k1", 0, 0);
    refused.outcome = Outcome::Failed;
    refused.answer = None;
    refused.conflict = true;
    let with_refused = [reqs.clone(), vec![refused]].concat();
    let applied = [feed.clone(), vec![feed_order("plant-1", 3, 3, 0)]].concat();
    let v = judged(&applied, &with_refused);
    assert_eq!(
        (v.refused_applied, v.duplicated),
        (1, 1),
        "{:?}",
        v.problems
    );

    let mut unknown = ok_order(4, "k4", 0, 0);
    unknown.outcome = Outcome::Unknown;
    unknown.answer = None;
    let with_unknown = [reqs.clone(), vec![unknown]].concat();
    let v = judged(&feed, &with_unknown);
    assert!(
        v.problems.is_empty(),
        "an unknown write may be absent: {:?}",
        v.problems
    );
    let once = [feed.clone(), vec![feed_order("plant-1", 3, 4, 0)]].concat();
    let v = judged(&once, &with_unknown);
    assert!(
        v.problems.is_empty() && v.unknown_applied == 1,
        "{:?}",
        v.problems
    );
    let twice = [once.clone(), vec![feed_order("plant-1", 4, 4, 0)]].concat();
    assert_eq!(judged(&twice, &with_unknown).duplicated, 1);

    let oversold = vec![
        feed_order("plant-1", 1, 1, 2),
        feed_order("plant-1", 2, 2, 4),
    ];
    let mut reqs_over = reqs.clone();
    reqs_over[1] = ok_order(2, "k2", 2, 4);
    let v = judged(&oversold, &reqs_over);
    assert_eq!(v.oversold, 1, "{:?}", v.problems);

    let ms = Req {
        schedule: 0,
        site: 0,
        write: Write::Milestone {
            event_id: "m1".to_string(),
            shipment: "S".to_string(),
            kind: "picked",
        },
        outcome: Outcome::Ok,
        answer: Some(json!({"seq": 3})),
        conflict: false,
        resolved: false,
    };
    let with_ms = [reqs.clone(), vec![ms]].concat();
    let entry = |kind: &str| json!({"kind": "milestone", "site": "plant-1", "seq": 3, "id": "m1", "milestone": kind});
    let good = [feed.clone(), vec![entry("picked")]].concat();
    assert!(judged(&good, &with_ms).problems.is_empty());
    let other = [feed.clone(), vec![entry("packed")]].concat();
    let v = judged(&other, &with_ms);
    assert_eq!((v.lost, v.unrequested), (1, 1), "{:?}", v.problems);
}
