//! `outpost-central fleet status|watch|alerts` against a real fleet: the built binary is run as
//! an operator would, with its output captured to files (so stdout is not a terminal). Every
//! wait is bounded.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use outpost_tests::{Api, CliOutput, Fleet, eventually, run_cli};
use serde_json::Value;

/// Longest the sites may take to be derived healthy: a few 1 s heartbeats and monitor ticks,
/// with slack for a loaded CI machine.
const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest one CLI run may take (`fleet watch --count 2 --interval 1` needs about a second).
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// The width every line must fit.
const WIDTH: usize = 100;

async fn cli(args: Vec<String>) -> Result<CliOutput> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli("outpost-central", &args, CLI_TIMEOUT)
    })
    .await?
}

fn check_plain_and_narrow(out: &CliOutput) -> Result<()> {
    ensure!(
        out.success,
        "failed: {}\nstdout:\n{}",
        out.stderr,
        out.stdout
    );
    ensure!(
        !out.stdout.contains('\u{1b}'),
        "ANSI codes without a terminal:\n{}",
        out.stdout
    );
    for line in out.stdout.lines() {
        ensure!(
            line.chars().count() <= WIDTH,
            "line wider than {WIDTH}: {line:?}"
        );
    }
    Ok(())
}

/// Goal: `fleet status` shows both sites healthy in a table that fits 100 columns without
/// colour codes when stdout is a file; `--json` is central's JSON; `fleet watch --count 2`
/// prints two tables; `fleet alerts` works in both forms.
/// Method: central with `disk_free_min_pct = 0` and two agents with 1 s heartbeats; wait
/// (bounded) for both healthy over the API, then run the built binary with `--api --token`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_status_watch_and_alerts_print_narrow_plain_tables() -> Result<()> {
    let fleet = Fleet::init(2)?;
    let central = fleet.start_central_with(
        None,
        // This host's own disk may be nearly full; that reason is unit-tested.
        &[("OUTPOST_HEALTH__DISK_FREE_MIN_PCT", "0".to_string())],
    )?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let beat = [("OUTPOST_HEALTH__HEARTBEAT_SECS", "1".to_string())];
    let _p1 = fleet.start_agent("plant-1", &quic, &beat)?;
    let _p2 = fleet.start_agent("plant-2", &quic, &beat)?;
    let c = Api::new(&central);
    eventually("both sites healthy", STATE_TIMEOUT, || async {
        let r = c.get("/v1/fleet").await?;
        let sites = r.body["sites"].as_array().cloned().unwrap_or_default();
        Ok((sites.len() == 2 && sites.iter().all(|s| s["state"] == "healthy")).then_some(()))
    })
    .await?;

    let remote = [
        "--api".to_string(),
        format!("http://{}", central.ready.api),
        "--token".to_string(),
        central.token.clone(),
    ];
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend(remote.iter().cloned());
        a
    };

    let status = cli(args(&["fleet", "status"])).await?;
    check_plain_and_narrow(&status)?;
    eprintln!("fleet status:\n{}", status.stdout);
    let lines: Vec<&str> = status.stdout.lines().collect();
    ensure!(
        lines.len() == 4,
        "header, 2 sites, summary:\n{}",
        status.stdout
    );
    ensure!(lines[0].starts_with("SITE"), "{}", status.stdout);
    for (line, site) in lines[1..3].iter().zip(["plant-1", "plant-2"]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            cells.first() == Some(&site) && cells.get(1) == Some(&"healthy"),
            "{line}"
        );
    }
    ensure!(
        lines[3] == "2 healthy, 0 degraded, 0 offline",
        "{}",
        status.stdout
    );

    let json = cli(args(&["fleet", "status", "--json"])).await?;
    ensure!(json.success, "{}", json.stderr);
    let v: Value = serde_json::from_str(&json.stdout).context("--json parses")?;
    ensure!(
        v["sites"].as_array().map(Vec::len) == Some(2),
        "{}",
        json.stdout
    );

    let watch = cli(args(&["fleet", "watch", "--count", "2", "--interval", "1"])).await?;
    check_plain_and_narrow(&watch)?;
    let stamps = watch
        .stdout
        .lines()
        .filter(|l| l.starts_with("--- "))
        .count();
    let tables = watch
        .stdout
        .lines()
        .filter(|l| l.starts_with("SITE"))
        .count();
    ensure!(stamps == 2 && tables == 2, "{}", watch.stdout);

    let alerts = cli(args(&["fleet", "alerts", "--limit", "5"])).await?;
    check_plain_and_narrow(&alerts)?;
    eprintln!("fleet alerts:\n{}", alerts.stdout);
    let alerts_json = cli(args(&["fleet", "alerts", "--json"])).await?;
    ensure!(alerts_json.success, "{}", alerts_json.stderr);
    let list: Value = serde_json::from_str(&alerts_json.stdout).context("alerts --json")?;
    ensure!(list.is_array(), "{list}");

    // A wrong token is central's refusal, reported with exit code 2 (not a table).
    let mut bad = args(&["fleet", "status"]);
    let last = bad.len() - 1;
    bad[last] = "not-the-token".into();
    let refused = cli(bad).await?;
    ensure!(
        !refused.success && refused.stderr.contains("401"),
        "{refused:?}"
    );
    Ok(())
}
