//! Deterministic simulation of the fleet: the product's session machines (`AgentSession`,
//! `CentralSession`) and the agents' and central's real stores on simulated disks that lose
//! unsynced writes at a power cut, joined by a simulated network with partitions, one-way
//! partitions, loss, latency ranges and flapping links, with host crashes and restarts, ATP
//! lowered mid-run (reclaims and returns), allowance requests with deadlines, ERP decisions,
//! heartbeats, and, in a quarter of the seeds, central restored from an online backup; all
//! driven from one seed (see `sim/world.rs` for what is real and what is simulated, and
//! `sim/drive.rs` for how the machines are driven). A Jepsen-style "set" checker
//! (`sim/check.rs`) then requires: every acknowledged request at central exactly once, nothing
//! at central nobody asked for, no idempotency key applied twice, no oversell, central never
//! behind an ack it gave unless restored, and every unit of every pool accounted for
//! (granted = confirmed + returned + held, and held as central's ledger has it).
//!
//! - `OUTPOST_SIM_SEEDS=N` runs N seeds instead of 1,000 (the long run), from
//!   `OUTPOST_SIM_BASE` (default 0).
//! - `OUTPOST_SIM_SEED=S cargo test -p outpost-tests --test sim replay -- --nocapture` replays
//!   one seed and prints everything it found.

mod sim {
    pub mod check;
    pub mod disk;
    pub mod drive;
    pub mod net;
    pub mod world;
}

use std::time::Instant;

use sim::check::{Verdict, check};
use sim::world::{SimConfig, Stats, run};

/// Seeds that once failed, kept as regression tests (each was fixed, then added here).
const REGRESSION_SEEDS: &[u64] = &[
    // The run ended before a site applied the top-up central granted while ingesting its last
    // batch (the drain now waits for master data too).
    414,
    // After a restore, the ERP re-sent an ATP figure that ignored an order it had accepted; an
    // order confirmed between a site's Hello and its adoption of the new incarnation.
    783,
];

/// Seeds in the normal test run.
const DEFAULT_SEEDS: u64 = 1_000;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

struct Batch {
    stats: Stats,
    verdict: Verdict,
    /// (seed, what the checker found).
    failures: Vec<(u64, Verdict)>,
}

/// Which broken variant to run, if any.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Correct,
    LyingFsync,
    AckBeforeCommit,
}

fn run_seeds(seeds: Vec<u64>, variant: Variant) -> Batch {
    let rt = runtime();
    let mut b = Batch {
        stats: Stats::default(),
        verdict: Verdict::default(),
        failures: Vec::new(),
    };
    for seed in seeds {
        let mut cfg = SimConfig::new(seed);
        cfg.lie_fsync = variant == Variant::LyingFsync;
        cfg.ack_before_commit = variant == Variant::AckBeforeCommit;
        let out = rt.block_on(run(cfg));
        let v = check(&out);
        b.stats.add(&out.stats);
        b.verdict.add(&v);
        if !v.passed() {
            b.failures.push((seed, v));
        }
    }
    b
}

/// Runs `seeds` on two threads (the machine's cores) and merges the results.
fn run_parallel(seeds: Vec<u64>, variant: Variant) -> Batch {
    let (a, b): (Vec<u64>, Vec<u64>) = seeds.iter().partition(|s| *s % 2 == 0);
    let other = std::thread::spawn(move || run_seeds(b, variant));
    let mut mine = run_seeds(a, variant);
    let theirs = other.join().expect("simulation thread");
    mine.stats.add(&theirs.stats);
    mine.verdict.add(&theirs.verdict);
    mine.failures.extend(theirs.failures);
    mine.failures.sort_by_key(|(s, _)| *s);
    mine
}

fn summary(label: &str, n: usize, b: &Batch, secs: f64) -> String {
    let (s, v) = (&b.stats, &b.verdict);
    format!(
        "{label}: seeds={n} failed_seeds={} time={secs:.1}s | requests ok={} failed={} \
         unknown_resolved={} attempts={} retries={} at_central={} | lost={} duplicated={} \
         unrequested={} key_reapplied={} oversold={} promise_mismatch={} unconserved={} \
         pools_checked={} | agent_crashes={} central_crashes={} power_cuts_mid_commit={} \
         crashes_before_reply={} crashes_before_ack={} partitions={} one_way={} loss={} \
         latency={} flaps={} connections={} superseded={} | heartbeats={} asks={} \
         asks_answered={} asks_late={} atp_lowered={} returns={} erp_accepted={} \
         erp_rejected={} restores={} rewinds={} acks_forgotten={} | max_drain_ms={}",
        b.failures.len(),
        v.ok_requests,
        v.failed_requests,
        v.unknown_resolved,
        s.attempts,
        s.retries,
        v.at_central,
        v.lost,
        v.duplicated,
        v.unrequested,
        v.key_reapplied,
        v.oversold,
        v.promise_mismatch,
        v.unconserved,
        v.pools_checked,
        s.agent_crashes,
        s.central_crashes,
        s.cuts_mid_commit,
        s.crashes_before_reply,
        s.crashes_before_ack,
        s.partitions,
        s.one_way,
        s.loss,
        s.latency,
        s.flaps,
        s.connections,
        s.superseded,
        s.heartbeats,
        s.asks,
        s.asks_answered,
        s.asks_late,
        s.atp_lowered,
        s.returns,
        s.erp_accepted,
        s.erp_rejected,
        s.restores,
        s.rewinds,
        s.acks_forgotten,
        s.drain_ticks * sim::world::TICK_MS,
    )
}

fn describe(failures: &[(u64, Verdict)]) -> String {
    failures
        .iter()
        .take(10)
        .map(|(seed, v)| {
            format!(
                "  seed {seed}: lost={} duplicated={} unrequested={} key_reapplied={} \
                 oversold={} promise_mismatch={}\n    {}\n    replay: OUTPOST_SIM_SEED={seed} \
                 cargo test -p outpost-tests --test sim replay -- --nocapture",
                v.lost,
                v.duplicated,
                v.unrequested,
                v.key_reapplied,
                v.oversold,
                v.promise_mismatch,
                v.problems.join("\n    ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Goal: over 1,000 seeds of faults (or `OUTPOST_SIM_SEEDS`), nothing acknowledged is lost,
/// nothing is applied twice, nothing appears that nobody asked for, nothing is oversold, and
/// every site drains once the faults heal. Method: the simulation above, one seed after another
/// on two threads; the figures are printed; each failing seed is listed with its replay command.
#[test]
fn thousand_seeds_lose_nothing_duplicate_nothing_oversell_nothing() {
    let base = env_u64("OUTPOST_SIM_BASE").unwrap_or(0);
    let n = env_u64("OUTPOST_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let seeds: Vec<u64> = (base..base + n).collect();
    let started = Instant::now();
    let b = run_parallel(seeds, Variant::Correct);
    let line = summary(
        "simulation",
        n as usize,
        &b,
        started.elapsed().as_secs_f64(),
    );
    println!("{line} base_seed={base}");
    assert!(
        b.failures.is_empty(),
        "{} of {n} seeds failed the checker:\n{}",
        b.failures.len(),
        describe(&b.failures)
    );
    assert!(
        b.verdict.ok_requests > 0 && b.stats.agent_crashes > 0 && b.stats.central_crashes > 0,
        "the workload or the faults did not happen: {line}"
    );
}

/// Goal: the checker can fail. Method: the same simulation with an fsync that reports success
/// and makes nothing durable; after power cuts, acknowledged requests must go missing (or the
/// stores must not reopen), and the checker must say so for some seeds.
#[test]
fn an_fsync_that_does_nothing_is_caught() {
    let seeds: Vec<u64> = (0..60).collect();
    let started = Instant::now();
    let b = run_parallel(seeds, Variant::LyingFsync);
    println!(
        "{}",
        summary(
            "broken variant (fsync does nothing)",
            60,
            &b,
            started.elapsed().as_secs_f64()
        )
    );
    if let Some((seed, v)) = b.failures.first() {
        println!(
            "first caught at seed {seed}: {}",
            v.problems.first().cloned().unwrap_or_default()
        );
    }
    assert!(
        b.failures.len() >= 5,
        "the checker caught only {} of 60 seeds with a lying fsync",
        b.failures.len()
    );
}

/// Goal: the checker catches the classic edge-buffer bug, an ack sent before the commit, in the
/// product's own session machine. Method: `CentralSession`'s test-only switch
/// (`broken-variants`) queues each batch's Ack before asking for the commit; the simulation
/// sends frames before carrying out requests and sometimes kills central in between. The agent
/// records the ack; the next central it meets is behind that ack without having been restored,
/// which the checker must report (the agent's retention then resends the events, so they are
/// not lost, but central acknowledged what it had not committed).
#[test]
fn an_ack_before_the_commit_is_caught() {
    let seeds: Vec<u64> = (0..60).collect();
    let started = Instant::now();
    let b = run_parallel(seeds, Variant::AckBeforeCommit);
    println!(
        "{}",
        summary(
            "broken variant (ack before commit)",
            60,
            &b,
            started.elapsed().as_secs_f64()
        )
    );
    if let Some((seed, v)) = b.failures.first() {
        println!(
            "first caught at seed {seed}: {}",
            v.problems.first().cloned().unwrap_or_default()
        );
    }
    assert!(
        b.stats.acks_forgotten > 0 && b.failures.len() >= 5,
        "the checker caught only {} of 60 seeds acking before commit (acks forgotten {})",
        b.failures.len(),
        b.stats.acks_forgotten
    );
}

/// Goal: a seed is a complete description of a run, so any failure can be replayed. Method: run
/// one seed twice and compare everything the checker and the counters saw.
#[test]
fn a_seed_replays_exactly() {
    let rt = runtime();
    let first = rt.block_on(run(SimConfig::new(42)));
    let second = rt.block_on(run(SimConfig::new(42)));
    let fingerprint = |o: &sim::world::Outcome| {
        format!(
            "{:?} {:?} {:?}",
            o.stats,
            o.requests
                .iter()
                .map(|r| (r.kind.id().to_string(), r.acks.clone(), r.failed, r.unknown))
                .collect::<Vec<_>>(),
            o.at_central
        )
    };
    assert!(
        first.stats.attempts > 0,
        "seed 42 ran no requests: {:?}",
        first.stats
    );
    assert_eq!(fingerprint(&first), fingerprint(&second));
}

/// Replays `OUTPOST_SIM_SEED` (printing everything), or the kept regression seeds.
#[test]
fn replay() {
    let seeds: Vec<u64> = match env_u64("OUTPOST_SIM_SEED") {
        Some(s) => vec![s],
        None => REGRESSION_SEEDS.to_vec(),
    };
    let rt = runtime();
    for seed in seeds {
        let out = rt.block_on(run(SimConfig::new(seed)));
        let v = check(&out);
        println!("seed {seed}: {:?}\n{v:#?}", out.stats);
        assert!(v.passed(), "seed {seed} failed: {v:#?}");
    }
}
