//! The peers of the benchmark, measured in the same run and on the same machine as Outpost: a
//! naive SQLite outbox behind axum (one durable transaction per request, driven by the same HTTP
//! load generator as the agent) and NATS JetStream with its file store (a child `nats-server`,
//! the official client). See the "Peers" section of BENCHMARKS.md. Async shell: servers on
//! loopback, temp dirs removed and processes stopped before `run` returns.
//!
//! (`peers/mod.rs` rather than `peers.rs` beside `peers/`, as `bench/mod.rs` does: the whole
//! module then lives in one folder.)

use std::path::Path;
use std::time::Duration;

use super::Figure;
use super::load::{http_load, post_json};
use super::scenarios::Cfg;
use super::sys::{fsync_probe, us};

pub mod nats;
pub mod sqlite;

/// Connections of the naive-outbox load, the same as the agent's ingest load.
pub const SQLITE_CONNS: usize = 64;
/// Warm-up before the naive-outbox load, the same as the agent's ingest scenario.
const WARM_UP: Duration = Duration::from_millis(300);

/// How long, or how much, each peer is driven.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    sqlite_duration: Duration,
    nats: nats::Sizes,
}

impl Sizes {
    fn new(short: bool) -> Sizes {
        if short {
            Sizes {
                sqlite_duration: Cfg { short }.measure(),
                nats: nats::Sizes {
                    pipelined: 20_000,
                    sequential: 2_000,
                    limit: Duration::from_secs(5),
                },
            }
        } else {
            Sizes {
                sqlite_duration: Cfg { short }.measure(),
                nats: nats::Sizes {
                    pipelined: 200_000,
                    sequential: 20_000,
                    limit: Duration::from_secs(10),
                },
            }
        }
    }
}

/// Runs both peers (short: seconds in all) and returns their figures, prefixed `peer.`.
pub async fn run(short: bool) -> Vec<Figure> {
    run_with(short, Path::new(nats::NATS_SERVER_BIN)).await
}

/// [`run`] with the `nats-server` binary to use (a bare name is looked up on `PATH`); a binary
/// that is not there skips the NATS peer with a figure saying so, never a failure.
pub async fn run_with(short: bool, nats_bin: &Path) -> Vec<Figure> {
    let sizes = Sizes::new(short);
    let mut out = Vec::new();
    out.extend(sqlite_figures(sizes.sqlite_duration).await);
    out.extend(nats_figures(nats_bin, sizes.nats).await);
    out
}

/// Outpost's durable-ingest figure (scenario `ingest`), the numerator of the ratios.
pub const OUTPOST_INGEST: &str = "ingest.c64.events_per_s";

/// Outpost ÷ peer ratios from the figures of one run that has both the `ingest` and the
/// `peers` scenarios (`peer.ratio.*`); a ratio whose two sides are not both there is left out.
/// The NATS ratio's goal is performance.md's: Outpost within 5× of JetStream while durable.
pub fn ratios<'a>(figures: impl IntoIterator<Item = &'a Figure>) -> Vec<Figure> {
    let figures: Vec<&Figure> = figures.into_iter().collect();
    let value = |name: &str| {
        figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let Some(outpost) = value(OUTPOST_INGEST) else {
        return Vec::new();
    };
    let pairs = [
        (
            "peer.ratio.outpost_over_sqlite",
            "peer.sqlite.ingest.c64.events_per_s",
            None,
            "Outpost durable ingest ÷ naive SQLite outbox, both over HTTP at 64 conns, both \
             acked after fsync",
        ),
        (
            "peer.ratio.outpost_over_nats_inflight256",
            "peer.nats.publish.inflight256.msg_per_s",
            Some(">= 0.2"),
            "Outpost durable ingest over HTTP ÷ JetStream publish with 256 acks in flight, \
             whose ack is not fsynced",
        ),
        (
            "peer.ratio.outpost_over_nats_inflight1",
            "peer.nats.publish.inflight1.msg_per_s",
            None,
            "Outpost durable ingest at 64 conns ÷ JetStream publish one at a time",
        ),
    ];
    let mut out = Vec::new();
    for (name, peer, goal, note) in pairs {
        if let Some(p) = value(peer) {
            let mut f = Figure::new(name, outpost / p, "×").note(note);
            if let Some(g) = goal {
                f = f.goal(g);
            }
            out.push(f);
        }
    }
    out
}

/// A figure that says a peer could not be measured, and why.
fn not_measured(name: &str, why: String) -> Figure {
    Figure::new(name, 0.0, "-").note(why)
}

/// A fresh temp dir for a peer's data, on the filesystem of the system temp dir.
fn temp_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir()
}

/// A request maker posting milestones `{prefix}-{n}` to the naive outbox at `host`.
fn milestone_requests(host: String, prefix: &'static str) -> impl Fn(u64) -> Vec<u8> {
    move |n| {
        post_json(
            &host,
            &sqlite::milestone_path(n),
            None,
            "",
            &sqlite::milestone_body(prefix, n),
        )
    }
}

/// The naive outbox under the agent's ingest load: the same warm-up (16 connections for
/// 300 ms), then [`SQLITE_CONNS`] connections for `duration`, unique event ids.
async fn sqlite_figures(duration: Duration) -> Vec<Figure> {
    const NAME: &str = "peer.sqlite";
    let dir = match temp_dir("outpost-peer-sqlite-") {
        Ok(d) => d,
        Err(e) => return vec![not_measured(NAME, format!("not measured: temp dir: {e}"))],
    };
    let peer = match sqlite::SqlitePeer::start(dir.path()).await {
        Ok(p) => p,
        Err(e) => return vec![not_measured(NAME, format!("not measured: {e:#}"))],
    };
    let host = peer.addr.to_string();
    let warm = http_load(
        peer.addr,
        16,
        WARM_UP,
        milestone_requests(host.clone(), "warm"),
    )
    .await;
    let mut figs = Vec::new();
    let fsync = match fsync_probe(dir.path()) {
        Ok(p) => {
            figs.extend(p.figures(&format!("{NAME}.fsync")));
            p.describe()
        }
        Err(e) => format!("fsync probe failed: {e}"),
    };
    let load = http_load(
        peer.addr,
        SQLITE_CONNS,
        duration,
        milestone_requests(host, "bench"),
    )
    .await;
    let stopped = peer.stop().await;
    let acked = (warm.requests - warm.errors) + (load.requests - load.errors);
    let rows = sqlite::count_rows(dir.path());
    let mut note = format!(
        "naive outbox: axum + SQLite {}, WAL, synchronous=FULL, one transaction per request, \
         one connection behind a mutex, no auth; {SQLITE_CONNS} conns, unique event ids, \
         ack after commit; {fsync}",
        rusqlite::version()
    );
    if let Err(e) = stopped {
        note.push_str(&format!("; stop: {e:#}"));
    }
    match rows {
        Ok(r) if r == acked => {}
        Ok(r) => note.push_str(&format!("; {r} rows on disk for {acked} acks")),
        Err(e) => note.push_str(&format!("; rows not counted: {e:#}")),
    }
    let p = format!("{NAME}.ingest.c{SQLITE_CONNS}");
    figs.push(Figure::new(format!("{p}.events_per_s"), load.ok_per_s(), "events/s").note(&note));
    for (q, v) in [("p50", load.p50), ("p99", load.p99), ("p999", load.p999)] {
        figs.push(
            Figure::new(format!("{p}.{q}"), us(v), "µs").note("ack latency: 201 after commit"),
        );
    }
    let mut errors = Figure::new(format!("{p}.errors"), load.errors as f64, "requests");
    if let Some(e) = &load.first_error {
        errors = errors.note(format!("first error: {e}"));
    }
    figs.push(errors);
    figs
}

async fn nats_figures(bin: &Path, sizes: nats::Sizes) -> Vec<Figure> {
    const NAME: &str = "peer.nats";
    let Some(bin) = nats::find_binary(bin) else {
        eprintln!("peers: skipping NATS JetStream: {}", nats::INSTALL_HINT);
        return vec![not_measured(
            NAME,
            format!("skipped: {}", nats::INSTALL_HINT),
        )];
    };
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let r = match nats::run(&bin, &std::env::temp_dir(), sizes).await {
        Ok(r) => r,
        Err(e) => return vec![not_measured(NAME, format!("not measured: {e:#}"))],
    };
    let caveat = format!(
        "{version}, file store, async-nats; the ack is NOT fsynced (sync_interval defaults to \
         2 min), so this is not a durable equal"
    );
    let mut out = Vec::new();
    for (label, p) in [("inflight256", &r.pipelined), ("inflight1", &r.sequential)] {
        let name = format!("{NAME}.publish.{label}");
        out.push(
            Figure::new(format!("{name}.msg_per_s"), p.per_s(), "msg/s").note(format!(
                "{} acked {}-byte events in {:.2} s; {caveat}",
                p.acked,
                nats::PAYLOAD_BYTES,
                p.elapsed.as_secs_f64()
            )),
        );
        out.push(
            Figure::new(format!("{name}.p50"), us(p.p50), "µs").note("publish-to-ack latency"),
        );
        out.push(Figure::new(format!("{name}.p99"), us(p.p99), "µs"));
    }
    out.push(
        Figure::new(format!("{NAME}.drain.msg_per_s"), r.drain.per_s(), "msg/s").note(format!(
            "{} of {} messages through a durable pull consumer, batches of 1000, AckPolicy::All",
            r.drain.drained,
            r.pipelined.acked + r.sequential.acked
        )),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: ratios divide Outpost's ingest figure by each peer's, and leave out the ones whose
    /// sides are missing (a skipped NATS peer, a run without `ingest`).
    #[test]
    fn ratios_need_both_sides() {
        let outpost = Figure::new(OUTPOST_INGEST, 40_000.0, "events/s");
        let sqlite = Figure::new("peer.sqlite.ingest.c64.events_per_s", 8_000.0, "events/s");
        let skipped = Figure::new("peer.nats", 0.0, "-");
        let r = ratios([&outpost, &sqlite, &skipped]);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].name.as_str(), r[0].value),
            ("peer.ratio.outpost_over_sqlite", 5.0)
        );
        let nats = Figure::new(
            "peer.nats.publish.inflight256.msg_per_s",
            200_000.0,
            "msg/s",
        );
        let r = ratios([&outpost, &sqlite, &nats]);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!((r[1].value, r[1].met()), (0.2, Some(true)));
        assert!(ratios([&sqlite, &nats]).is_empty());
    }

    /// Goal: without `nats-server` the run still measures the SQLite peer and reports the NATS
    /// peer as skipped with the install hint, instead of failing. Method: a short run with a
    /// binary path that does not exist.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_run_skips_nats_when_the_binary_is_absent() {
        let figures = run_with(true, Path::new("/nonexistent/bin/nats-server")).await;
        let nats = figures
            .iter()
            .find(|f| f.name == "peer.nats")
            .expect("a figure for the skipped peer");
        let note = nats.note.as_deref().unwrap_or("");
        assert!(note.contains("apt-get install nats-server"), "{note}");
        assert!(!figures.iter().any(|f| f.name.starts_with("peer.nats.")));
        let ev = figures
            .iter()
            .find(|f| f.name == "peer.sqlite.ingest.c64.events_per_s")
            .expect("the SQLite peer was measured");
        assert!(ev.value > 0.0, "{ev:?}");
        let errors = figures
            .iter()
            .find(|f| f.name == "peer.sqlite.ingest.c64.errors")
            .expect("an errors figure");
        assert_eq!(errors.value, 0.0, "{errors:?}");
    }
}
