//! The fleet dashboard in a real browser: central serves the page at `/`, headless Chromium
//! renders it against a running fleet (the page's own script fetches the JSON API with the token
//! from the URL fragment), and the test reads the rendered DOM. A screenshot of the page is left
//! in `target/test-artifacts/dashboard.png`. Without a Chromium binary the test skips through
//! `outpost_tests::skip` (a failure under `CI=true`): `.ci/test` installs Debian's `chromium`. Every wait
//! is bounded, and a Chromium that overruns its timeout is killed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outpost_tests::{Api, bin_dir, eventually, fast_agent_env, post_milestones};
use serde_json::{Value, json};

/// `[health] offline_after_secs` used here: short, so the test is quick.
const OFFLINE_AFTER_SECS: u64 = 3;
/// Longest the states below may take to appear at the API: the threshold plus the monitor's
/// tick, a heartbeat interval and slack for a loaded CI machine.
const STATE_TIMEOUT: Duration = Duration::from_secs(OFFLINE_AFTER_SECS + 12);
/// Longest one Chromium run may take (start, load, script, dump) before it is killed.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the rendered page may take to show what the API already says (a few page loads).
const PAGE_TIMEOUT: Duration = Duration::from_secs(90);
/// Virtual time Chromium gives the page before dumping it: the first refresh plus one more
/// (the page refreshes every 2 s). Virtual time stands still while a fetch is in flight.
const VIRTUAL_TIME_BUDGET_MS: u32 = 3_000;
/// Bytes of Chromium's stderr kept for failure messages.
const MAX_STDERR_BYTES: usize = 16 * 1024;
/// The drill's cut: long enough that a page rendered while the API says `drill` usually
/// finishes inside it (the assertion on that render only holds when the drill was still cutting
/// off once the render was done, so a slow machine skips it instead of failing).
const DRILL_CUT_SECS: u64 = 8;
/// How long the drill waits for plant-1 to catch up (it reconnects within a second: its backoff
/// is capped at 0.5 s).
const DRILL_RECOVERY_SECS: u64 = 60;
/// Longest the drill may take to complete: the cut, the recovery timeout and the final report.
const DRILL_TIMEOUT: Duration = Duration::from_secs(DRILL_CUT_SECS + DRILL_RECOVERY_SECS + 30);

/// The Chromium binary: `CHROMIUM` if set, else the first of the usual names on `PATH`.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs headless Chromium on `url` with `extra` arguments and returns its stdout. A fresh
/// profile directory per run, so runs never share state or a profile lock; killed (SIGKILL)
/// after `CHROMIUM_TIMEOUT`.
fn chromium(bin: &Path, url: &str, extra: &[String]) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let mut child = Command::new(bin)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--window-size=1280,800",
        ])
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    // Read both pipes on threads so a full pipe never stalls Chromium while we wait.
    let mut out = child.stdout.take().context("chromium stdout")?;
    let mut err = child.stderr.take().context("chromium stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        let from = s.len().saturating_sub(MAX_STDERR_BYTES);
        String::from_utf8_lossy(&s[from..]).to_string()
    });
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            bail!("chromium did not finish within {CHROMIUM_TIMEOUT:?}; killed. stderr:\n{stderr}");
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    ensure!(
        status.success(),
        "chromium exited with {status}; stderr:\n{stderr}"
    );
    Ok(stdout)
}

/// `chromium --dump-dom`, off the async runtime.
async fn dump_dom(bin: &Path, url: &str) -> Result<String> {
    let (bin, url) = (bin.to_path_buf(), url.to_string());
    tokio::task::spawn_blocking(move || chromium(&bin, &url, &["--dump-dom".to_string()])).await?
}

/// The `data-state` of the table row of `site` in a rendered DOM (`<tr data-site=".."
/// data-state="..">`, in that attribute order as the page writes them).
fn row_state(dom: &str, site: &str) -> Option<String> {
    let key = format!("<tr data-site=\"{site}\" data-state=\"");
    let rest = &dom[dom.find(&key)? + key.len()..];
    Some(rest[..rest.find('"')?].to_string())
}

/// Renders `url` until every `(site, state)` row shows, or fails after `PAGE_TIMEOUT` with the
/// last DOM.
async fn wait_rendered(bin: &Path, url: &str, want: &[(&str, &str)]) -> Result<String> {
    let deadline = Instant::now() + PAGE_TIMEOUT;
    loop {
        let dom = dump_dom(bin, url).await?;
        if want
            .iter()
            .all(|(site, state)| row_state(&dom, site).as_deref() == Some(*state))
        {
            return Ok(dom);
        }
        if Instant::now() > deadline {
            bail!("the page did not show {want:?} within {PAGE_TIMEOUT:?}; last DOM:\n{dom}");
        }
        // Poll interval of the bounded wait (each poll runs a browser, hence not tighter).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn site_state(c: &Api, site: &str) -> Result<Value> {
    let r = c.get(&format!("/v1/fleet/{site}")).await?;
    ensure!(
        r.status == 200,
        "GET /v1/fleet/{site}: {} {}",
        r.status,
        r.body
    );
    Ok(r.body)
}

/// The part of a rendered DOM inside the drills panel (`<section id="drills">`).
fn drill_panel(dom: &str) -> Option<&str> {
    let from = dom.find("<section id=\"drills\"")?;
    let rest = &dom[from..];
    Some(&rest[..rest.find("</section>")?])
}

/// `GET /v1/drills/{id}`'s phase.
async fn drill_phase(c: &Api, id: u64) -> Result<String> {
    let r = c.get(&format!("/v1/drills/{id}")).await?;
    ensure!(
        r.status == 200,
        "GET /v1/drills/{id}: {} {}",
        r.status,
        r.body
    );
    Ok(r.body["phase"].as_str().unwrap_or("").to_string())
}

async fn wait_state(c: &Api, site: &str, state: &str) -> Result<()> {
    eventually(
        &format!("{site} {state} at the API"),
        STATE_TIMEOUT,
        || async { Ok((site_state(c, site).await?["state"] == state).then_some(())) },
    )
    .await
}

/// Goal: the dashboard works in a real browser: it shows every site with its state, a site
/// going offline shows as offline on the page, and the detail view draws the site's charts.
/// Method: central and two agents with 1 s heartbeats and `offline_after_secs = 3`; wait until
/// the API says both are healthy, render `/#token=...` in headless Chromium and read the
/// rows' `data-state`; render with a wrong token (the page asks for one); SIGKILL plant-2, wait until the API says offline, render again (with
/// plant-2's detail view open) and read the rows, the detail and the alert list; then run an
/// isolation drill on plant-1 (admin token, API): while the API says `drill`, the page shows the
/// site as `drill` (asserted when the drill was still cutting off after the render); once the
/// drill completed, the drills panel shows PASSED and its timeline chart, and alerts of the
/// drill carry its tag; save a screenshot of that page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_sites_and_a_site_going_offline() -> Result<()> {
    let Some(bin) = find_chromium() else {
        outpost_tests::skip(
            "the dashboard browser test (tests/tests/dashboard.rs)",
            "no chromium binary on PATH (apt-get install chromium, as `bash .ci/test` does, or set \
             CHROMIUM=path)",
        );
        return Ok(());
    };
    let fleet = outpost_tests::Fleet::init(2)?;
    let central = fleet.start_central_with(
        None,
        &[
            (
                "OUTPOST_HEALTH__OFFLINE_AFTER_SECS",
                OFFLINE_AFTER_SECS.to_string(),
            ),
            // This host's own disk may be nearly full; that reason is unit-tested.
            ("OUTPOST_HEALTH__DISK_FREE_MIN_PCT", "0".to_string()),
        ],
    )?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let c = Api::new(&central);
    let fast = [("OUTPOST_HEALTH__HEARTBEAT_SECS", "1".to_string())];
    // plant-1 takes part in a drill below: it reconnects quickly once the cut ends.
    let mut fast_sync = fast_agent_env();
    fast_sync.extend(fast.iter().cloned());
    let p1 = fleet.start_agent("plant-1", &quic, &fast_sync)?;
    let mut p2 = fleet.start_agent("plant-2", &quic, &fast)?;
    wait_state(&c, "plant-1", "healthy").await?;
    wait_state(&c, "plant-2", "healthy").await?;

    let url = format!("{}#token={}", central.url("/"), central.token);
    let dom = wait_rendered(
        &bin,
        &url,
        &[("plant-1", "healthy"), ("plant-2", "healthy")],
    )
    .await?;
    ensure!(dom.contains("id=\"summary\" data-loaded=\"true\""), "{dom}");
    ensure!(dom.contains("class=\"badge state-healthy\""), "{dom}");
    ensure!(
        !dom.contains(&central.token),
        "the token must leave the address bar and the page"
    );

    // A token central refuses: the page asks for one instead of showing data.
    let bad = dump_dom(
        &bin,
        &format!("{}#token=not-a-valid-token", central.url("/")),
    )
    .await?;
    ensure!(
        bad.contains("<form id=\"token-form\">"),
        "token form shown: {bad}"
    );
    ensure!(bad.contains("(401)"), "the banner names the 401: {bad}");
    ensure!(
        row_state(&bad, "plant-1").is_none(),
        "no data without a valid token: {bad}"
    );

    p2.kill9()?;
    wait_state(&c, "plant-2", "offline").await?;
    let detail_url = format!("{url}&site=plant-2");
    let dom = wait_rendered(
        &bin,
        &detail_url,
        &[("plant-1", "healthy"), ("plant-2", "offline")],
    )
    .await?;
    ensure!(dom.contains("class=\"badge state-offline\""), "{dom}");
    ensure!(dom.contains("not_heard_from"), "the reason shows: {dom}");
    ensure!(
        dom.contains("data-site=\"plant-2\" data-to=\"offline\""),
        "the alert list shows plant-2 going offline: {dom}"
    );
    for chart in [
        "outbox_events",
        "backlog_age_ms",
        "process_rss_bytes",
        "process_cpu_pct",
    ] {
        ensure!(
            dom.contains(&format!("data-chart=\"{chart}\"")),
            "chart {chart} in the detail view: {dom}"
        );
    }
    ensure!(dom.contains("<polyline"), "the charts are drawn: {dom}");

    // A disaster-recovery drill on plant-1, started as an operator would (admin token, API).
    let r = c
        .post(
            "/v1/drills",
            &json!({"kind": "isolation", "sites": ["plant-1"], "duration_secs": DRILL_CUT_SECS,
                    "recovery_timeout_secs": DRILL_RECOVERY_SECS, "note": "dashboard test"}),
            None,
        )
        .await?;
    ensure!(r.status == 201, "POST /v1/drills: {} {}", r.status, r.body);
    let id = r.body["id"].as_u64().context("drill id")?;
    // The plant keeps working while cut off: its backlog is what the drill's chart draws.
    post_milestones(&Api::new(&p1), "drill", 20).await?;
    wait_state(&c, "plant-1", "drill").await?;
    let during = dump_dom(&bin, &url).await?;
    if drill_phase(&c, id).await? == "cut_off" {
        // Rendered wholly inside the cut: the page shows what the API showed.
        ensure!(
            row_state(&during, "plant-1").as_deref() == Some("drill"),
            "plant-1 shows as drill during the drill: {during}"
        );
        ensure!(during.contains("class=\"badge state-drill\""), "{during}");
        let panel = drill_panel(&during).context("drills panel")?;
        ensure!(
            panel.contains(&format!("data-drill=\"{id}\""))
                && panel.contains("data-phase=\"cut_off\"")
                && panel.contains("ends in"),
            "the panel shows the active drill and its countdown: {panel}"
        );
    } else {
        eprintln!(
            "the drill's cut ended before the page was rendered; its `drill` row not checked"
        );
    }
    eventually("the drill completed", DRILL_TIMEOUT, || async {
        Ok((drill_phase(&c, id).await? == "completed").then_some(()))
    })
    .await?;
    let dom = wait_rendered(
        &bin,
        &detail_url,
        &[("plant-1", "healthy"), ("plant-2", "offline")],
    )
    .await?;
    let panel = drill_panel(&dom).context("drills panel")?;
    ensure!(
        panel.contains(&format!("data-drill=\"{id}\""))
            && panel.contains("data-phase=\"completed\""),
        "the panel shows the completed drill: {panel}"
    );
    ensure!(
        panel.contains("data-field=\"verdict\">PASSED<"),
        "the drill passed: {panel}"
    );
    ensure!(
        panel.contains("<svg") && panel.contains("data-chart=\"drill-timeline\""),
        "the timeline chart is drawn in the panel: {panel}"
    );
    ensure!(
        panel.contains("<tr data-site=\"plant-1\">"),
        "plant-1's figures: {panel}"
    );
    ensure!(
        panel.contains("outpost-central drill start"),
        "the panel says drills start from the CLI: {panel}"
    );
    // Alerts of the drill (plant-1 into and out of `drill`) are tagged with it, not incidents.
    let alerts = c.get("/v1/alerts?limit=1000").await?;
    let tagged = alerts.body.as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["drill_id"].as_u64() == Some(id) && x["site"] == "plant-1")
    });
    if tagged {
        ensure!(
            dom.contains(&format!("data-drill=\"{id}\"><span class=\"at\""))
                && dom.contains("class=\"tag-drill\""),
            "the drill's alerts carry its tag: {dom}"
        );
    }

    let artifacts = bin_dir()
        .parent()
        .context("target dir")?
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let b = bin.clone();
    tokio::task::spawn_blocking(move || chromium(&b, &detail_url, &[arg])).await??;
    let png = std::fs::read(&shot).with_context(|| format!("screenshot {}", shot.display()))?;
    ensure!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        shot.display()
    );
    println!("dashboard screenshot: {}", shot.display());
    Ok(())
}
