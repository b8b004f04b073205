//! Disaster-recovery drills on a real fleet (central + agents as processes, real QUIC), with the
//! traffic simulator driving the sites' local APIs throughout. Each drill's report, computed by
//! central from what happened, is checked against the simulator's own record: every request the
//! simulator got a 2xx for is at central exactly once, no discrepancy, nothing oversold, and a
//! recovery time for every site.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_tests::*;
use serde_json::{Value, json};

/// Longest a drill may take from its start to its completed report in these tests.
const DRILL_DEADLINE: Duration = Duration::from_secs(90);
/// Limit on each CLI run.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The traffic simulator as a child process, killed if the test ends early.
struct Traffic {
    child: Child,
    record: PathBuf,
    log: PathBuf,
}

impl Traffic {
    fn start(fleet: &Fleet, secs: u64) -> Result<Traffic> {
        let record = fleet.path().join("traffic.json");
        let log = fleet.path().join("logs").join("traffic.log");
        std::fs::create_dir_all(log.parent().context("log dir")?)?;
        let out = std::fs::File::create(&log)?;
        let child = hermetic(&mut Command::new(bin("outpost-central")))
            .args(["dev", "traffic", "--fleet"])
            .arg(fleet.path().join("fleet.json"))
            .args([
                "--duration",
                &format!("{secs}s"),
                "--orders-per-sec",
                "4",
                "--milestones-per-sec",
                "8",
                "--reads-per-sec",
                "8",
                "--retry-pct",
                "15",
                "--seed",
                "7",
                // The catalogue `push_demo_master` seeds.
                "--skus",
                "BOLT-M8,GEAR-12T",
                "--customers",
                "ACME,GLOBEX",
                "--quiet",
                "--record",
            ])
            .arg(&record)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Traffic { child, record, log })
    }

    /// Waits (bounded) for the simulator to finish its run and returns its record.
    fn finish(mut self, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!(
                        "traffic simulator exited with {st}: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("traffic simulator still running after {within:?}");
            }
            // Poll interval of the bounded wait around it, not a wait for a condition by itself.
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(serde_json::from_slice(&std::fs::read(&self.record)?)?)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a drill through the API and returns its id.
async fn start_drill(central: &Api, body: Value) -> Result<u64> {
    let r = central.post("/v1/drills", &body, None).await?;
    if r.status != 201 {
        bail!("POST /v1/drills returned {}: {}", r.status, r.body);
    }
    r.body["id"].as_u64().context("drill id")
}

/// Waits for drill `id` to complete and returns it.
async fn wait_completed(central: &Api, id: u64) -> Result<Value> {
    let done = eventually(&format!("drill {id} completed"), DRILL_DEADLINE, || async {
        let r = central.get(&format!("/v1/drills/{id}")).await?;
        Ok((r.body["phase"] == "completed").then_some(r.body))
    })
    .await;
    if done.is_err() {
        let r = central.get(&format!("/v1/drills/{id}")).await?;
        eprintln!("drill {id} as it stands: {:#}", r.body);
    }
    done
}

/// `site`'s state in the fleet view.
async fn fleet_state(central: &Api, site: &str) -> Result<String> {
    let r = central.get(&format!("/v1/fleet/{site}")).await?;
    if r.status != 200 {
        bail!("GET /v1/fleet/{site} returned {}: {}", r.status, r.body);
    }
    Ok(r.body["state"].as_str().unwrap_or("").to_string())
}

/// Every exception at central, all pages.
async fn all_exceptions(central: &Api) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut after = 0u64;
    for _ in 0..1_000 {
        let r = central
            .get(&format!(
                "/v1/exceptions?status=all&after={after}&limit=1000"
            ))
            .await?;
        if r.status != 200 {
            bail!("GET /v1/exceptions returned {}: {}", r.status, r.body);
        }
        let page = as_list(&r.body).context("exception list")?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = last["id"].as_u64().context("exception id")?;
        out.extend(page);
    }
    bail!("more than 1,000 pages of exceptions")
}

/// How many times each (site, event id) is at central: the feed's site events plus the exception
/// queue (an order lands in one or the other).
async fn held_at_central(central: &Api) -> Result<HashMap<(String, String), usize>> {
    let mut held = HashMap::new();
    for e in read_feed(central).await? {
        if e["channel"] != "site" {
            continue;
        }
        let key = (
            e["site"].as_str().context("site")?.to_string(),
            e["id"].as_str().context("id")?.to_string(),
        );
        *held.entry(key).or_insert(0) += 1;
    }
    for x in all_exceptions(central).await? {
        let key = (
            x["site"].as_str().context("site")?.to_string(),
            x["event_id"].as_str().context("event_id")?.to_string(),
        );
        *held.entry(key).or_insert(0) += 1;
    }
    Ok(held)
}

/// Checks that every request the simulator got a 2xx for is at central exactly once; returns how
/// many were checked, per kind.
fn check_exactly_once(
    record: &Value,
    held: &HashMap<(String, String), usize>,
) -> Result<HashMap<String, usize>> {
    let acked = record["acknowledged"]
        .as_array()
        .context("record.acknowledged")?;
    let mut per_kind = HashMap::new();
    let mut wrong = Vec::new();
    for a in acked {
        let site = a["site"].as_str().context("site")?.to_string();
        let id = a["id"].as_str().context("id")?.to_string();
        let kind = a["kind"].as_str().context("kind")?.to_string();
        let n = held.get(&(site.clone(), id.clone())).copied().unwrap_or(0);
        if n != 1 {
            wrong.push(format!("{site}/{kind}/{id}: held {n} times"));
        }
        *per_kind.entry(kind).or_insert(0) += 1;
    }
    if !wrong.is_empty() {
        bail!(
            "{} acknowledged requests not at central exactly once: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(20)]
        );
    }
    Ok(per_kind)
}

/// Checks each site's "accepted while cut off" figures against the simulator's record: the
/// simulator was the only client, so the acknowledged writes whose seqs fall in the range the
/// report names are exactly those events, by kind and by promise.
fn check_accepted_against_record(drill: &Value, record: &Value) -> Result<()> {
    let acked = record["acknowledged"].as_array().context("acknowledged")?;
    for s in drill["report"]["sites"]
        .as_array()
        .context("report.sites")?
    {
        let site = s["site"].as_str().context("site")?;
        let range = &s["cut_off_seqs"];
        let (from, through) = (
            range[0].as_u64().context("cut_off_seqs from")?,
            range[1].as_u64().context("cut_off_seqs through")?,
        );
        let (mut confirmed, mut pending, mut milestones) = (0u64, 0u64, 0u64);
        for a in acked {
            let seq = a["seq"].as_u64().context("seq")?;
            if a["site"] != site || seq < from || seq > through {
                continue;
            }
            match (a["kind"].as_str(), a["status"].as_str()) {
                (Some("milestone"), _) => milestones += 1,
                (Some("order"), Some("confirmed")) => confirmed += 1,
                (Some("order"), _) => pending += 1,
                _ => bail!("unexpected record entry {a}"),
            }
        }
        let want = &s["accepted_while_cut_off"];
        let got = json!({"orders_confirmed": confirmed, "orders_pending": pending, "milestones": milestones});
        for k in ["orders_confirmed", "orders_pending", "milestones"] {
            if want[k] != got[k] {
                bail!(
                    "{site} seqs {from}..={through}: report says {want}, simulator's record {got}"
                );
            }
        }
    }
    Ok(())
}

/// The checks every completed drill report must pass.
fn check_report(drill: &Value, sites: &[&str]) -> Result<()> {
    let r = &drill["report"];
    if r["final"] != true {
        bail!("report not final: {r}");
    }
    if r["discrepancies"] != 0 || r["oversold_units"] != 0 {
        bail!("discrepancies or oversold units: {r:#}");
    }
    if r["passed"] != true {
        bail!("drill did not pass: {r:#}");
    }
    let reported: Vec<&str> = r["sites"]
        .as_array()
        .context("report.sites")?
        .iter()
        .filter_map(|s| s["site"].as_str())
        .collect();
    for site in sites {
        let s = r["sites"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["site"] == *site))
            .with_context(|| format!("{site} not in report sites {reported:?}"))?;
        if !s["recovery_ms"].is_i64() || !s["reconnect_ms"].is_i64() {
            bail!("{site} has no recovery or reconnect time: {s:#}");
        }
        if s["discrepancy_count"] != 0 {
            bail!("{site} has discrepancies: {s:#}");
        }
        if s["backlog_timeline"]
            .as_array()
            .is_none_or(|t| t.is_empty())
        {
            bail!("{site} has no backlog timeline: {s:#}");
        }
    }
    Ok(())
}

fn print_site_lines(label: &str, drill: &Value) {
    for s in drill["report"]["sites"].as_array().into_iter().flatten() {
        let a = &s["accepted_while_cut_off"];
        eprintln!(
            "{label}: {} accepted cut off: orders {}+{} pending, milestones {} | peak backlog {} | oldest {} ms | reconnect {} ms | recovery {} ms | received {} dups {} | exceptions {}",
            s["site"],
            a["orders_confirmed"],
            a["orders_pending"],
            a["milestones"],
            s["peak_backlog"],
            s["oldest_event_age_ms"],
            s["reconnect_ms"],
            s["recovery_ms"],
            s["events_received"],
            s["duplicates_dropped"],
            s["exceptions"]
        );
    }
}

/// Goal: an isolation drill and a central outage drill, run while the traffic simulator drives
/// both sites, report what happened with zero discrepancies and zero oversold units, a recovery
/// time per site, the sites as `drill` (not as an incident) meanwhile, and alerts marked with
/// the drill; and every request the simulator got a 2xx for is at central exactly once.
/// Method: 2 sites; the simulator runs for the whole test (orders with same-key retries,
/// milestones in shipment order, ATP and price reads); isolation of plant-1 for 6 s, then an
/// outage of central's QUIC listener for 5 s; each drill is followed through the API to its
/// final report; the simulator's record is then checked against central's feed and exception
/// queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_and_outage_drills_with_traffic() -> Result<()> {
    let fleet = Fleet::init(2)?;
    let central_p = fleet.start_central_with(None, &fast_central_env())?;
    let central = Api::new(&central_p);
    let quic = central_p.ready.quic.clone().context("quic address")?;
    let mut agents = Vec::new();
    for site in ["plant-1", "plant-2"] {
        agents.push(fleet.start_agent(site, &quic, &fast_agent_env())?);
    }
    let apis: Vec<Api> = agents.iter().map(Api::new).collect();
    let rev = push_demo_master(&central, &["plant-1", "plant-2"]).await?;
    for a in &apis {
        wait_master(a, rev).await?;
        wait_connected(a, true).await?;
    }

    let traffic = Traffic::start(&fleet, 40)?;
    let started = Instant::now();
    // Traffic is flowing before the first drill.
    eventually(
        "traffic reaches central",
        Duration::from_secs(20),
        || async { Ok((read_feed(&central).await?.len() >= 20).then_some(())) },
    )
    .await?;

    // Isolation of plant-1.
    let id = start_drill(
        &central,
        json!({"kind": "isolation", "sites": ["plant-1"], "duration_secs": 6, "note": "test"}),
    )
    .await?;
    wait_connected(&apis[0], false).await?;
    eventually(
        "plant-1 shown as drill",
        Duration::from_secs(10),
        || async { Ok((fleet_state(&central, "plant-1").await? == "drill").then_some(())) },
    )
    .await?;
    if fleet_state(&central, "plant-2").await? == "drill" {
        bail!("plant-2 is not part of the isolation drill");
    }
    // A second drill is refused while one runs.
    let r = central
        .post(
            "/v1/drills",
            &json!({"kind": "central_outage", "duration_secs": 5}),
            None,
        )
        .await?;
    if r.status != 409 || r.body["error"]["code"] != "drill_in_progress" {
        bail!("second drill: {} {}", r.status, r.body);
    }
    let isolation = wait_completed(&central, id).await?;
    print_site_lines("isolation", &isolation);
    check_report(&isolation, &["plant-1"])?;
    let s = &isolation["report"]["sites"][0];
    let accepted = &s["accepted_while_cut_off"];
    let n_cut = accepted["milestones"].as_u64().unwrap_or(0)
        + accepted["orders_confirmed"].as_u64().unwrap_or(0)
        + accepted["orders_pending"].as_u64().unwrap_or(0);
    if n_cut == 0 || s["peak_backlog"].as_i64().unwrap_or(0) <= 0 {
        bail!("the isolated site accepted nothing while cut off: {s:#}");
    }
    if s["refused_connections"].as_u64().unwrap_or(0) == 0 {
        bail!("plant-1 never tried to reconnect while isolated: {s:#}");
    }
    // The state changes into and out of the drill are alerts marked with it (the way out is
    // recorded at the health monitor's next look, within a second or two).
    eventually(
        &format!("an alert of plant-1 marked with drill {id}"),
        Duration::from_secs(10),
        || async {
            let alerts = central.get("/v1/alerts").await?.body;
            let list = as_list(&alerts).context("alerts list")?;
            Ok(list
                .iter()
                .any(|a| a["site"] == "plant-1" && a["drill_id"] == id)
                .then_some(()))
        },
    )
    .await?;

    // Central's QUIC listener goes away for 5 s.
    let id = start_drill(
        &central,
        json!({"kind": "central_outage", "duration_secs": 5}),
    )
    .await?;
    for a in &apis {
        wait_connected(a, false).await?;
    }
    let outage = wait_completed(&central, id).await?;
    print_site_lines("outage", &outage);
    check_report(&outage, &["plant-1", "plant-2"])?;

    // The record covers the whole run; once the outboxes drain, central must hold each 2xx once.
    let remaining = Duration::from_secs(40).saturating_sub(started.elapsed());
    let within = remaining + Duration::from_secs(30);
    let record = tokio::task::spawn_blocking(move || traffic.finish(within)).await??;
    for a in &apis {
        wait_drained(a).await?;
    }
    let held = held_at_central(&central).await?;
    let per_kind = check_exactly_once(&record, &held)?;
    check_accepted_against_record(&isolation, &record)?;
    check_accepted_against_record(&outage, &record)?;
    eprintln!("simulator 2xx checked at central exactly once: {per_kind:?}");
    for kind in ["order", "milestone"] {
        if per_kind.get(kind).copied().unwrap_or(0) == 0 {
            bail!("the simulator got no 2xx for any {kind}");
        }
    }
    // Central holds nothing the simulator was not answered for (besides its retries' keys).
    let acked: std::collections::HashSet<(String, String)> = record["acknowledged"]
        .as_array()
        .context("acknowledged")?
        .iter()
        .filter_map(|a| {
            Some((
                a["site"].as_str()?.to_string(),
                a["id"].as_str()?.to_string(),
            ))
        })
        .collect();
    let extra: Vec<_> = held.keys().filter(|k| !acked.contains(*k)).collect();
    if !extra.is_empty() {
        bail!(
            "central holds {} events the simulator got no 2xx for: {:?}",
            extra.len(),
            &extra[..extra.len().min(10)]
        );
    }
    Ok(())
}

fn cli(fleet: &Fleet, args: &[&str]) -> Result<CliOutput> {
    run_cli("outpost-central", args, CLI_TIMEOUT).inspect(|o| {
        if !o.success {
            eprintln!(
                "{args:?} failed in {}: {}",
                fleet.path().display(),
                o.stderr
            );
        }
    })
}

/// A copy of central's fleet member whose data directory is `data_dir`.
fn central_on(fleet: &Fleet, data_dir: &Path) -> Member {
    Member {
        data_dir: data_dir.to_path_buf(),
        ..fleet.central.clone()
    }
}

/// Goal: central restored from the drill's backup onto an empty data directory loses no event it
/// had acknowledged after the backup: the site re-sends them from its retention, and the drill's
/// report counts them, with no discrepancy.
/// Method: 20 milestones acknowledged; a central_restore drill takes the backup; 30 more
/// acknowledged; central SIGKILLed; `outpost-central restore` onto a new empty data directory;
/// central started on it (same ports); 10 more milestones; the drill completes; every one of
/// the 60 is in the feed exactly once and the report says 30 were re-sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_restore_drill_loses_no_acknowledged_event() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let mut central_p = fleet.start_central_with(None, &fast_central_env())?;
    let central = Api::new(&central_p);
    let ports = central_p.ready.clone();
    let quic = ports.quic.clone().context("quic address")?;
    let agent_p = fleet.start_agent("plant-1", &quic, &fast_agent_env())?;
    let agent = Api::new(&agent_p);
    wait_connected(&agent, true).await?;

    let mut ids = post_milestones(&agent, "before", 20).await?;
    wait_drained(&agent).await?;
    let r = central
        .post("/v1/drills", &json!({"kind": "central_restore"}), None)
        .await?;
    if r.status != 201 {
        bail!("POST /v1/drills returned {}: {}", r.status, r.body);
    }
    let id = r.body["id"].as_u64().context("id")?;
    let backup = r.body["backup"]["path"]
        .as_str()
        .context("backup path")?
        .to_string();
    ids.extend(post_milestones(&agent, "after-backup", 30).await?);
    // Central acknowledged these 30 after the backup was taken.
    wait_drained(&agent).await?;
    central_p.kill9()?;

    let new_dir = fleet.path().join("central-restored");
    let out = cli(
        &fleet,
        &[
            "restore",
            "--from",
            &backup,
            "--data-dir",
            new_dir.to_str().context("utf-8")?,
        ],
    )?;
    if !out.success {
        bail!("restore failed: {}{}", out.stdout, out.stderr);
    }
    let member = central_on(&fleet, &new_dir);
    let mut env: Vec<(String, String)> = fast_central_env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.push(("OUTPOST_DATA_DIR".into(), new_dir.display().to_string()));
    env.push(("OUTPOST_API__LISTEN".into(), ports.api.clone()));
    env.push(("OUTPOST_QUIC__LISTEN".into(), quic.clone()));
    let restored_p = Proc::start(&member, &env, &fleet.path().join("logs"))?;
    let restored = Api::new(&restored_p);
    ids.extend(post_milestones(&agent, "after-restore", 10).await?);
    wait_drained(&agent).await?;

    let drill = wait_completed(&restored, id).await?;
    print_site_lines("restore", &drill);
    check_report(&drill, &["plant-1"])?;
    let s = &drill["report"]["sites"][0];
    if s["reuploaded"] != 30 {
        bail!("expected 30 events re-sent from the site's retention: {s:#}");
    }
    let held = held_at_central(&restored).await?;
    let wrong: Vec<_> = ids
        .iter()
        .filter(|id| held.get(&("plant-1".to_string(), (*id).clone())) != Some(&1))
        .collect();
    if !wrong.is_empty() || held.len() != ids.len() {
        bail!(
            "after the restore central holds {} events, {} acknowledged ones not exactly once: {:?}",
            held.len(),
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        );
    }
    let text = cli(
        &fleet,
        &[
            "drill",
            "report",
            &id.to_string(),
            "--api",
            &restored.base,
            "--token",
            &restored.token,
        ],
    )?;
    eprintln!("{}", text.stdout);
    Ok(())
}

/// Goal: an aborted drill ends its cut at once and still reports (marked aborted, nothing lost);
/// bad requests change nothing; a finished drill cannot be aborted again.
/// Method: one site; a request without sites and one naming an unknown site (400, no drill
/// stored); an isolation drill planned for 10 minutes; 5 milestones while cut off; abort; the
/// drill completes within a minute, aborted and passed; a second abort is 409, an unknown id 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_drill_ends_its_cut_at_once_and_reports() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central_p = fleet.start_central_with(None, &fast_central_env())?;
    let central = Api::new(&central_p);
    let quic = central_p.ready.quic.clone().context("quic address")?;
    let agent_p = fleet.start_agent("plant-1", &quic, &fast_agent_env())?;
    let agent = Api::new(&agent_p);
    wait_connected(&agent, true).await?;

    for body in [
        json!({"kind": "isolation", "duration_secs": 60}),
        json!({"kind": "isolation", "sites": ["plant-9"], "duration_secs": 60}),
        json!({"kind": "isolation", "sites": ["plant-1"], "duration_secs": 0}),
        json!({"kind": "meteor", "duration_secs": 60}),
    ] {
        let r = central.post("/v1/drills", &body, None).await?;
        if r.status != 400 {
            bail!("{body} answered {} {}", r.status, r.body);
        }
    }
    let listed = central.get("/v1/drills").await?;
    if listed.body["drills"]
        .as_array()
        .is_none_or(|d| !d.is_empty())
    {
        bail!("a refused request stored a drill: {}", listed.body);
    }

    let id = start_drill(
        &central,
        json!({"kind": "isolation", "sites": ["plant-1"], "duration_secs": 600}),
    )
    .await?;
    wait_connected(&agent, false).await?;
    post_milestones(&agent, "cut", 5).await?;
    let aborted_at = Instant::now();
    let r = central
        .post(&format!("/v1/drills/{id}/abort"), &json!({}), None)
        .await?;
    if r.status != 200 || r.body["aborted"].is_null() {
        bail!("abort answered {} {}", r.status, r.body);
    }
    let drill = wait_completed(&central, id).await?;
    if aborted_at.elapsed() > Duration::from_secs(60) {
        bail!(
            "the aborted drill took {:?} to complete",
            aborted_at.elapsed()
        );
    }
    print_site_lines("aborted", &drill);
    check_report(&drill, &["plant-1"])?;
    let r = &drill["report"];
    if r["aborted"] != true || r["sites"][0]["accepted_while_cut_off"]["milestones"] != 5 {
        bail!("aborted report: {r:#}");
    }
    let again = central
        .post(&format!("/v1/drills/{id}/abort"), &json!({}), None)
        .await?;
    if again.status != 409 || again.body["error"]["code"] != "drill_over" {
        bail!("second abort: {} {}", again.status, again.body);
    }
    let missing = central.get("/v1/drills/999").await?;
    if missing.status != 404 {
        bail!("unknown drill: {} {}", missing.status, missing.body);
    }
    Ok(())
}
