//! `outpost-bench`: starts a real central and agent on temp dirs and measures reads, durable
//! ingest, backlog drain, outage detection/recovery and memory (see BENCHMARKS.md).
//!
//! Usage: `cargo build --release --bins && target/release/outpost-bench [--short]
//! [--scenario NAME,...] [--json FILE]`. Scenarios: fsync, read, ingest, drain, outage, memory,
//! peers, store (central's redb and PostgreSQL stores side by side).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use outpost_tests::bench::scenarios::{self, Cfg};
use outpost_tests::bench::{Figure, peers, store, sys};
use serde_json::json;

const ALL: &[&str] = &[
    "fsync", "read", "ingest", "drain", "outage", "memory", "peers", "store",
];

struct Args {
    short: bool,
    scenarios: Vec<String>,
    json: Option<std::path::PathBuf>,
}

fn usage() -> String {
    format!(
        "usage: outpost-bench [--short] [--scenario NAME,...] [--json FILE]\nscenarios: {}",
        ALL.join(", ")
    )
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        short: false,
        scenarios: ALL.iter().map(|s| s.to_string()).collect(),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--short" => a.short = true,
            "--scenario" | "--scenarios" => {
                let v = it.next().context("--scenario needs a value")?;
                a.scenarios = v.split(',').map(|s| s.trim().to_string()).collect();
                for s in &a.scenarios {
                    if !ALL.contains(&s.as_str()) {
                        bail!("unknown scenario {s:?}\n{}", usage());
                    }
                }
            }
            "--json" => a.json = Some(it.next().context("--json needs a file")?.into()),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    Ok(a)
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        // Thousands separators.
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn verdict(f: &Figure) -> String {
    match f.met() {
        None => String::new(),
        Some(true) => "met".to_string(),
        Some(false) => {
            let goal: f64 = f
                .goal
                .as_deref()
                .and_then(|g| {
                    g.trim_start_matches(['<', '>', '=', ' ', '≤', '≥'])
                        .replace(',', "")
                        .parse()
                        .ok()
                })
                .unwrap_or(0.0);
            if goal > 0.0 && f.value > 0.0 {
                let r = if f.value > goal {
                    f.value / goal
                } else {
                    goal / f.value
                };
                format!("MISSED ({r:.1}x)")
            } else {
                "MISSED".to_string()
            }
        }
    }
}

fn print_table(rows: &[(String, Figure)]) {
    let w = rows
        .iter()
        .map(|(_, f)| f.name.len())
        .max()
        .unwrap_or(10)
        .max(6);
    println!(
        "{:<8} {:<w$} {:>14} {:<9} {:<10} met?/gap",
        "scenario", "figure", "value", "unit", "goal"
    );
    for (s, f) in rows {
        println!(
            "{:<8} {:<w$} {:>14} {:<9} {:<10} {}",
            s,
            f.name,
            fmt_value(f.value),
            f.unit,
            f.goal.as_deref().unwrap_or(""),
            verdict(f)
        );
    }
}

async fn run_one(name: &str, cfg: Cfg, probes: &mut Vec<serde_json::Value>) -> Result<Vec<Figure>> {
    match name {
        "fsync" => {
            let (p, figs) = scenarios::fsync("start")?;
            probes.push(json!({"when": "start", "probe": p.json()}));
            Ok(figs)
        }
        "read" => scenarios::read(cfg).await,
        "ingest" => scenarios::ingest(cfg).await,
        "drain" => scenarios::drain(cfg).await,
        "outage" => scenarios::outage(cfg).await,
        "memory" => scenarios::memory(cfg).await,
        "peers" => Ok(peers::run(cfg.short).await),
        "store" => store::run(cfg).await,
        other => bail!("unknown scenario {other}"),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cfg = Cfg { short: args.short };
    let started = Instant::now();
    let date = sys::now_rfc3339();
    let machine_at_start = sys::machine();
    let mut rows: Vec<(String, Figure)> = Vec::new();
    let mut results = serde_json::Map::new();
    let mut probes = Vec::new();
    let mut failed = Vec::new();
    for name in &args.scenarios {
        eprintln!("outpost-bench: running {name}...");
        let t = Instant::now();
        match rt.block_on(run_one(name, cfg, &mut probes)) {
            Ok(figs) => {
                for f in &figs {
                    if let Some(p) = f.name.strip_suffix(".fsync.p50") {
                        probes.push(json!({"when": format!("before {p}"), "p50_us": f.value}));
                    }
                }
                results.insert(
                    name.clone(),
                    json!({"secs": t.elapsed().as_secs_f64(), "figures": figs}),
                );
                rows.extend(figs.into_iter().map(|f| (name.clone(), f)));
            }
            Err(e) => {
                eprintln!("outpost-bench: scenario {name} failed: {e:#}");
                results.insert(
                    name.clone(),
                    json!({"secs": t.elapsed().as_secs_f64(), "error": format!("{e:#}"), "figures": []}),
                );
                failed.push(name.clone());
            }
        }
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    // Side by side: Outpost's durable ingest against each peer, from this same run.
    let ratios = outpost_tests::bench::peers::ratios(rows.iter().map(|(_, f)| f));
    if !ratios.is_empty() {
        results.insert("ratios".into(), json!({"figures": ratios}));
        rows.extend(ratios.into_iter().map(|f| ("ratios".to_string(), f)));
    }
    println!(
        "outpost-bench {} ({} build), {}; machine: {}",
        if args.short { "--short" } else { "full run" },
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        date,
        machine_at_start
    );
    print_table(&rows);
    let report = json!({
        "date": date,
        "git_rev": sys::git_rev(),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "short": args.short,
        "machine": machine_at_start,
        "loadavg_at_end": sys::machine()["loadavg_1_5_15"],
        "fsync_probes": probes,
        "total_secs": started.elapsed().as_secs_f64(),
        "scenarios": results,
    });
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    if !failed.is_empty() {
        bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}
