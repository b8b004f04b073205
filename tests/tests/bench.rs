//! Goal: `outpost-bench --short` runs every scenario to completion against real processes and
//! writes a JSON report with a figure for each scenario. No thresholds: CI machines (and debug
//! builds) are too noisy for performance gates; this only proves the harness works.

use std::time::Duration;

use outpost_tests::run_cli;
use serde_json::Value;

#[test]
fn short_benchmark_run_reports_every_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let out = run_cli(
        "outpost-bench",
        &["--short", "--json", json_path.to_str().unwrap()],
        Duration::from_secs(240),
    )
    .unwrap();
    assert!(
        out.success,
        "outpost-bench failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert!(
        report["machine"]["cores"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(report["date"].is_string());
    assert!(report["profile"].is_string());
    assert!(!report["fsync_probes"].as_array().unwrap().is_empty());
    let figure = |scenario: &str, name: &str| -> f64 {
        let figs = report["scenarios"][scenario]["figures"]
            .as_array()
            .unwrap_or_else(|| panic!("no figures for {scenario}: {report}"));
        figs.iter()
            .find(|f| f["name"] == name)
            .and_then(|f| f["value"].as_f64())
            .unwrap_or_else(|| panic!("no figure {name} in {scenario}: {figs:?}"))
    };
    // Figures that must be positive when the scenario ran at all.
    for (scenario, name) in [
        ("fsync", "fsync.start.p50"),
        ("read", "read.c1.p50"),
        ("read", "read.c64.req_per_s"),
        ("read", "read.agent.cpu_s"),
        ("ingest", "ingest.c64.events_per_s"),
        ("ingest", "ingest.c64.p99"),
        ("ingest", "ingest.c64_random_ids.events_per_s"),
        ("ingest", "ingest.fsync.p50"),
        ("drain", "drain.events_per_s_from_central_start"),
        ("drain", "drain.central_acked_seq"),
        ("outage", "outage.detect_secs"),
        ("outage", "outage.write_acked_secs_after_heal"),
        ("memory", "memory.agent_rss_mib"),
        ("memory", "memory.outbox_depth"),
        ("store", "store.redb.drain_events_per_s"),
    ] {
        let v = figure(scenario, name);
        assert!(v > 0.0, "{scenario}/{name} = {v}");
    }
    for (scenario, name) in [
        ("read", "read.c64.errors"),
        ("ingest", "ingest.c64.errors"),
        ("ingest", "ingest.c64_random_ids.errors"),
    ] {
        assert_eq!(figure(scenario, name), 0.0, "{scenario}/{name}");
    }
    // The PostgreSQL figures whenever its server is installed (.ci/test installs it; under CI
    // its absence fails the scenario).
    if outpost_tests::pg::pg_bindir().is_some() {
        for name in [
            "store.pg.drain_events_per_s",
            "store.pg.upload_ack_p99",
            "store.pg.grants_per_s_contended",
        ] {
            let v = figure("store", name);
            assert!(v > 0.0, "store/{name} = {v}");
        }
    }
    // The SQLite peer is always measured; the NATS peer whenever nats-server is installed
    // (.ci/test installs it; under CI its absence fails the test).
    assert!(
        figure("peers", "peer.sqlite.ingest.c64.events_per_s") > 0.0,
        "{report}"
    );
    let nats = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .any(|d| d.join("nats-server").is_file());
    if nats {
        assert!(
            figure("peers", "peer.nats.publish.inflight256.msg_per_s") > 0.0,
            "{report}"
        );
    } else {
        outpost_tests::skip(
            "the benchmark's NATS JetStream peer",
            outpost_tests::bench::peers::nats::INSTALL_HINT,
        );
    }
    // Stdout carries the table.
    assert!(out.stdout.contains("read.c64.req_per_s"), "{}", out.stdout);
}
