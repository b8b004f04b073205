//! `outpost-central drill start|status|report|list` against a real one-site fleet: the built
//! binary is run as an operator would, with its output captured to files (so stdout is not a
//! terminal). Every wait is bounded.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use outpost_tests::{Api, CliOutput, Fleet, eventually, fast_agent_env, run_cli, wait_connected};
use serde_json::{Value, json};

/// Milestones posted at the site while it is cut off.
const MILESTONES: usize = 10;
/// Longest `drill start --wait` may take: the 2 s cut, the agent's reconnection (its backoff is
/// capped at 0.5 s), the catch-up and the final report, with slack for a loaded CI machine.
/// The CLI's own bound (cut + recovery timeout + margin) is longer; this one fails first.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest any other CLI run may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the drill may take to show as active after the CLI was started.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The width every line must fit.
const WIDTH: usize = 100;

async fn cli(args: Vec<String>, timeout: Duration) -> Result<CliOutput> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli("outpost-central", &args, timeout)
    })
    .await?
}

fn check_narrow(out: &CliOutput) -> Result<()> {
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

/// The value after `label` on the report line that starts with it (`  recovery   0.3 s ...`).
fn report_line<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(label))
        .map(|l| l[label.len()..].trim())
}

/// Goal: an operator runs an isolation drill from the CLI and gets a report that adds up: the
/// site accepted every milestone while cut off, reconnected and caught up, and the drill passed
/// (exit 0); the drill is listed, its status parses as JSON, and a bad request prints central's
/// validation error with a non-zero exit code.
/// Method: central and one agent with fast reconnection; run `drill start --kind isolation
/// --sites plant-1 --duration 2s --wait` in the background; once central says the drill is
/// active, post 10 milestones to the agent's API at once; then read the CLI's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolation_drill_run_from_the_cli_reports_and_passes() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central_with(
        None,
        // This host's own disk may be nearly full; that reason is unit-tested.
        &[("OUTPOST_HEALTH__DISK_FREE_MIN_PCT", "0".to_string())],
    )?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let mut env = fast_agent_env();
    env.push(("OUTPOST_HEALTH__HEARTBEAT_SECS", "1".to_string()));
    let agent = fleet.start_agent("plant-1", &quic, &env)?;
    let c = Api::new(&central);
    let a = Api::new(&agent);
    wait_connected(&a, true).await?;

    let remote = [
        "--api".to_string(),
        format!("http://{}", central.ready.api),
        "--token".to_string(),
        central.token.clone(),
    ];
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(remote.iter().cloned());
        v
    };

    // A request central refuses: its validation error, and no drill.
    let bad = cli(
        args(&["drill", "start", "--kind", "isolation", "--duration", "2s"]),
        CLI_TIMEOUT,
    )
    .await?;
    ensure!(!bad.success, "isolation without --sites must fail: {bad:?}");
    ensure!(
        bad.stderr.contains("400 validation") && bad.stderr.contains("names the sites"),
        "central's validation error is printed: {bad:?}"
    );

    let start = tokio::spawn(cli(
        args(&[
            "drill",
            "start",
            "--kind",
            "isolation",
            "--sites",
            "plant-1",
            "--duration",
            "2s",
            "--recovery-timeout",
            "60s",
            "--note",
            "drill_cli test",
            "--wait",
        ]),
        WAIT_TIMEOUT,
    ));
    let id = eventually("the drill active at central", ACTIVE_TIMEOUT, || async {
        let r = c.get("/v1/drills").await?;
        Ok(r.body["active"].as_u64())
    })
    .await?;
    // Posted all at once, so that they are stored at the site well inside the 2 s cut.
    let posts: Vec<_> = (0..MILESTONES)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                let body = json!({"event_id": format!("drill-m-{i}"), "milestone": "picked",
                                  "scanner_id": "rf-1", "at": "2026-11-26T10:00:00Z"});
                a.post(&format!("/v1/shipments/SH-D{i}/milestones"), &body, None)
                    .await
            })
        })
        .collect();
    for p in posts {
        let r = p.await??;
        ensure!(r.status == 201, "milestone: {} {}", r.status, r.body);
    }

    let out = start.await??;
    eprintln!(
        "drill start --wait:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    ensure!(
        out.success,
        "the drill passed (exit 0): {}\n{}",
        out.stdout,
        out.stderr
    );
    check_narrow(&out)?;
    ensure!(
        out.stdout
            .contains(&format!("drill {id} started: plant-1 is cut off until")),
        "{}",
        out.stdout
    );
    ensure!(
        report_line(&out.stdout, "result") == Some("PASSED"),
        "{}",
        out.stdout
    );
    let accepted = report_line(&out.stdout, "accepted cut off").context("accepted line")?;
    ensure!(
        accepted.contains(&format!("milestones {MILESTONES};")),
        "the {MILESTONES} milestones were accepted while cut off: {}",
        out.stdout
    );
    let recovery = report_line(&out.stdout, "recovery").context("recovery line")?;
    ensure!(
        recovery.ends_with(')')
            && (recovery.contains(" s from reconnection to caught up")
                || recovery.contains(" ms from reconnection to caught up")),
        "a recovery time: {}",
        out.stdout
    );
    ensure!(
        report_line(&out.stdout, "discrepancies") == Some("0"),
        "{}",
        out.stdout
    );

    let list = cli(args(&["drill", "list"]), CLI_TIMEOUT).await?;
    ensure!(list.success, "{list:?}");
    check_narrow(&list)?;
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{id} ")))
        .with_context(|| format!("drill {id} listed:\n{}", list.stdout))?;
    for cell in ["isolation", "completed", "plant-1", "PASSED"] {
        ensure!(row.contains(cell), "{cell} in {row}");
    }

    let status = cli(args(&["drill", "status", "--json"]), CLI_TIMEOUT).await?;
    ensure!(status.success, "{status:?}");
    let v: Value = serde_json::from_str(&status.stdout).context("status --json parses")?;
    ensure!(
        v["id"].as_u64() == Some(id) && v["phase"] == "completed",
        "{v}"
    );
    ensure!(v["report"]["passed"] == true, "{v}");

    let text = cli(args(&["drill", "status", &id.to_string()]), CLI_TIMEOUT).await?;
    ensure!(text.success, "{text:?}");
    eprintln!("drill status {id}:\n{}", text.stdout);
    check_narrow(&text)?;
    ensure!(text.stdout.contains("PASSED"), "{}", text.stdout);

    let report = cli(args(&["drill", "report", &id.to_string()]), CLI_TIMEOUT).await?;
    ensure!(report.success, "{report:?}");
    check_narrow(&report)?;
    ensure!(
        report_line(&report.stdout, "result") == Some("PASSED"),
        "{}",
        report.stdout
    );

    // A drill that does not exist: central's 404, exit code 2.
    let missing = cli(args(&["drill", "report", "999"]), CLI_TIMEOUT).await?;
    ensure!(
        !missing.success && missing.stderr.contains("404 not_found"),
        "{missing:?}"
    );
    Ok(())
}
