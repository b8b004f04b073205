//! Disaster recovery of central, tested with real processes: an online backup taken through the
//! CLI while central serves, central SIGKILLed, `outpost-central restore` onto a new empty data
//! directory, central started there on the same ports. The agent notices the new incarnation and
//! re-sends what the restored central forgot from its retention of acknowledged events; what it
//! no longer holds is recorded as lost, with exact seqs and an alert, instead of the site being
//! stuck on a gap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_tests::*;
use serde_json::Value;

/// Limit on each CLI run (a backup of a small store takes milliseconds).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const SITE: &str = "plant-1";

fn cli(args: &[&str]) -> Result<CliOutput> {
    let out = run_cli("outpost-central", args, CLI_TIMEOUT)?;
    if !out.success {
        bail!(
            "outpost-central {args:?} failed:\n{}{}",
            out.stdout,
            out.stderr
        );
    }
    Ok(out)
}

async fn reports(central: &Api, site: &str) -> Result<Vec<Value>> {
    let r = central
        .get(&format!("/v1/sites/{site}/reconciliations"))
        .await?;
    if r.status != 200 {
        bail!("reconciliations returned {}: {}", r.status, r.body);
    }
    as_list(&r.body).context("reconciliations are a list")
}

async fn alerts(central: &Api) -> Result<Vec<Value>> {
    let r = central.get("/v1/alerts").await?;
    if r.status != 200 {
        bail!("alerts returned {}: {}", r.status, r.body);
    }
    as_list(&r.body).context("alerts are a list")
}

/// Central's fleet member with its data directory moved to `data_dir`.
fn central_on(fleet: &Fleet, data_dir: &Path) -> Member {
    Member {
        data_dir: data_dir.to_path_buf(),
        ..fleet.central.clone()
    }
}

/// What a scenario leaves for its assertions.
struct Restored {
    central: Api,
    _central_p: Proc,
    _agent_p: Proc,
    before: Vec<String>,
    after_backup: Vec<String>,
    after_restore: Vec<String>,
    restore_stdout: String,
}

/// 20 milestones acknowledged; `outpost-central backup --out FILE` through the CLI while
/// central serves; 30 more acknowledged (central acknowledged them after the backup); central
/// SIGKILLed; `outpost-central restore` onto a new empty data directory (refused first onto
/// the old one, which holds a store); central started there on the same ports; 10 more
/// milestones, and the agent's outbox drained again.
async fn backup_kill_restore(agent_env: &[(&str, String)]) -> Result<Restored> {
    let fleet = Fleet::init(1)?;
    let mut central_p = fleet.start_central_with(None, &fast_central_env())?;
    let central = Api::new(&central_p);
    let ports = central_p.ready.clone();
    let quic = ports.quic.clone().context("quic address")?;
    let mut env = fast_agent_env();
    env.extend(agent_env.iter().cloned());
    let agent_p = fleet.start_agent(SITE, &quic, &env)?;
    let agent = Api::new(&agent_p);
    wait_connected(&agent, true).await?;

    let before = post_milestones(&agent, "before", 20).await?;
    wait_drained(&agent).await?;
    let backup: PathBuf = fleet.path().join("central-backup.redb");
    let fleet_json = fleet.path().join("fleet.json");
    let out = cli(&[
        "backup",
        "--out",
        backup.to_str().context("utf-8")?,
        "--fleet",
        fleet_json.to_str().context("utf-8")?,
    ])?;
    println!("backup: {}", out.stdout.trim());
    assert!(backup.is_file(), "backup written: {}", out.stdout);
    let kept = std::fs::read_dir(fleet.central.data_dir.join("backups"))?.count();
    assert_eq!(kept, 1, "central keeps its own copy under data_dir/backups");

    let after_backup = post_milestones(&agent, "after-backup", 30).await?;
    wait_drained(&agent).await?;
    drop(central);
    central_p.kill9()?;

    let refused = run_cli(
        "outpost-central",
        &[
            "restore",
            "--from",
            backup.to_str().context("utf-8")?,
            "--data-dir",
            fleet.central.data_dir.to_str().context("utf-8")?,
        ],
        CLI_TIMEOUT,
    )?;
    assert!(
        !refused.success,
        "restore onto a data dir holding a store is refused"
    );
    assert!(
        refused.stderr.contains("empty data directory"),
        "{}",
        refused.stderr
    );
    let new_dir = fleet.path().join("central-restored");
    let restore = cli(&[
        "restore",
        "--from",
        backup.to_str().context("utf-8")?,
        "--data-dir",
        new_dir.to_str().context("utf-8")?,
    ])?;
    println!("restore:\n{}", restore.stdout);

    let mut env: Vec<(String, String)> = fast_central_env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.push(("OUTPOST_DATA_DIR".into(), new_dir.display().to_string()));
    env.push(("OUTPOST_API__LISTEN".into(), ports.api.clone()));
    env.push(("OUTPOST_QUIC__LISTEN".into(), quic.clone()));
    let central_p = Proc::start(
        &central_on(&fleet, &new_dir),
        &env,
        &fleet.path().join("logs"),
    )?;
    let central = Api::new(&central_p);
    let after_restore = post_milestones(&agent, "after-restore", 10).await?;
    wait_drained(&agent).await?;
    Ok(Restored {
        central,
        _central_p: central_p,
        _agent_p: agent_p,
        before,
        after_backup,
        after_restore,
        restore_stdout: restore.stdout,
    })
}

/// Goal: central restored from a backup loses no event it acknowledged after the backup: the
/// site re-sends them from its retention, each reaches the feed exactly once, writes after the
/// restore arrive too, and the reconciliation report counts the re-sent events, with no loss.
/// Method: `backup_kill_restore` with the agent's default retention (a week, a million events);
/// then the feed, the reports and the alerts of the restored central.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_central_gets_back_every_acknowledged_event_from_the_site() -> Result<()> {
    let r = backup_kill_restore(&[]).await?;
    assert!(
        r.restore_stdout.contains("ERP must re-send"),
        "{}",
        r.restore_stdout
    );
    let all: Vec<&String> = r
        .before
        .iter()
        .chain(&r.after_backup)
        .chain(&r.after_restore)
        .collect();
    let counts = eventually("every event at central", CONVERGE_TIMEOUT, || async {
        let c = feed_counts(&r.central, SITE).await?;
        Ok((c.len() >= all.len()).then_some(c))
    })
    .await?;
    let wrong: Vec<_> = all
        .iter()
        .filter(|id| counts.get(id.as_str()) != Some(&1))
        .collect();
    assert!(
        wrong.is_empty() && counts.len() == all.len(),
        "{} events in the feed, {} not exactly once: {:?}",
        counts.len(),
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );

    let reports = reports(&r.central, SITE).await?;
    let reuploaded: u64 = reports
        .iter()
        .map(|x| x["reuploaded"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        reuploaded, 30,
        "re-sent from the site's retention: {reports:#?}"
    );
    assert!(
        reports.iter().all(|x| x["lost_from_seq"].is_null()),
        "no loss: {reports:#?}"
    );
    assert!(
        reports
            .iter()
            .any(|x| x["incarnation_changed"] == true && x["hello_acked_seq"] == 50),
        "the first session after the restore saw the new incarnation: {reports:#?}"
    );
    let lost_alerts: Vec<_> = alerts(&r.central)
        .await?
        .into_iter()
        .filter(|a| a["to"] == "events_lost")
        .collect();
    assert!(lost_alerts.is_empty(), "{lost_alerts:#?}");
    Ok(())
}

/// Goal: when the site no longer holds events the restored central had forgotten (its
/// retention is shorter than the backup's age), the loss is recorded with the exact seqs and an
/// alert, and the site is not stuck: its later writes arrive.
/// Method: `backup_kill_restore` with the agent keeping no acknowledged event
/// (`[outbox] retain_acked_max_events = 0`): seqs 21..=50 are lost; the feed holds the other
/// 30 events exactly once, the report shows the lost range, `/v1/alerts` an `events_lost` alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_beyond_the_sites_retention_is_recorded_and_the_site_goes_on() -> Result<()> {
    let r = backup_kill_restore(&[("OUTPOST_OUTBOX__RETAIN_ACKED_MAX_EVENTS", "0".into())]).await?;
    let kept: Vec<&String> = r.before.iter().chain(&r.after_restore).collect();
    let counts = eventually("the kept events at central", CONVERGE_TIMEOUT, || async {
        let c = feed_counts(&r.central, SITE).await?;
        Ok((c.len() >= kept.len()).then_some(c))
    })
    .await?;
    let wrong: Vec<_> = kept
        .iter()
        .filter(|id| counts.get(id.as_str()) != Some(&1))
        .collect();
    assert!(wrong.is_empty(), "not exactly once: {wrong:?}");
    assert_eq!(
        counts.len(),
        kept.len(),
        "the lost events cannot be in the feed"
    );
    assert!(r.after_backup.iter().all(|id| !counts.contains_key(id)));

    let reports = reports(&r.central, SITE).await?;
    let lost: Vec<(u64, u64)> = reports
        .iter()
        .filter_map(|x| {
            Some((
                x["lost_from_seq"].as_u64()?,
                x["lost_through_seq"].as_u64()?,
            ))
        })
        .collect();
    assert_eq!(lost, vec![(21, 50)], "{reports:#?}");
    let lost_alerts: Vec<_> = alerts(&r.central)
        .await?
        .into_iter()
        .filter(|a| a["to"] == "events_lost" && a["site"] == SITE)
        .collect();
    assert_eq!(lost_alerts.len(), 1, "{lost_alerts:#?}");
    let reasons = lost_alerts[0]["reasons"].to_string();
    assert!(reasons.contains("seq 21..=50"), "{reasons}");
    Ok(())
}
