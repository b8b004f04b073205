//! Fleet health end to end: real central and agents, heartbeats over QUIC, states derived by
//! central's monitor, alerts in its store, `GET /v1/fleet`, `/v1/fleet/{site}`, `/v1/alerts`,
//! and an alert webhook received by a tiny HTTP listener in the test. Every wait is bounded.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use outpost_tests::{Api, Fleet, eventually};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// `[health] offline_after_secs` used here: short, so the test is quick.
const OFFLINE_AFTER_SECS: u64 = 3;
/// Longest the states below may take to appear: the threshold plus the monitor's tick, a
/// heartbeat interval and slack for a loaded CI machine.
const STATE_TIMEOUT: Duration = Duration::from_secs(OFFLINE_AFTER_SECS + 12);

fn fast_agent() -> Vec<(&'static str, String)> {
    vec![("OUTPOST_HEALTH__HEARTBEAT_SECS", "1".to_string())]
}

async fn fleet_site(c: &Api, site: &str) -> Result<Value> {
    let r = c.get(&format!("/v1/fleet/{site}")).await?;
    ensure!(
        r.status == 200,
        "GET /v1/fleet/{site}: {} {}",
        r.status,
        r.body
    );
    Ok(r.body)
}

async fn wait_state(c: &Api, site: &str, state: &str) -> Result<Value> {
    eventually(&format!("{site} {state}"), STATE_TIMEOUT, || async {
        let s = fleet_site(c, site).await?;
        Ok((s["state"] == state).then_some(s))
    })
    .await
}

async fn alerts(c: &Api) -> Result<Vec<Value>> {
    let r = c.get("/v1/alerts?limit=1000").await?;
    ensure!(r.status == 200, "GET /v1/alerts: {} {}", r.status, r.body);
    Ok(r.body.as_array().context("alerts array")?.clone())
}

fn has_alert(list: &[Value], site: &str, from: &str, to: &str) -> bool {
    list.iter()
        .any(|a| a["site"] == site && a["from"] == from && a["to"] == to)
}

/// A one-route HTTP server: answers every request 200 and passes each JSON body on. Reads at
/// most 64 KiB per request; each connection is bounded by a timeout.
async fn webhook_receiver() -> Result<(String, mpsc::Receiver<Value>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(tokio::time::timeout(Duration::from_secs(10), async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.ok()?;
                    if n == 0 || buf.len() > 64 * 1024 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let body: Value = serde_json::from_slice(&buf[end + 4..end + 4 + len]).ok()?;
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    let _ = tx.send(body).await;
                    return Some(());
                }
            }));
        }
    });
    Ok((url, rx))
}

/// Goal: every site reports healthy with its signals filled; a killed agent is `offline`
/// within the configured time with an alert (also POSTed to the webhook), and `healthy` again
/// after a restart with another alert.
/// Method: a 3-site fleet with 1 s heartbeats and `offline_after_secs = 3`, a webhook to a
/// listener in this test; SIGKILL plant-2, poll `GET /v1/fleet/plant-2`, check the alerts and
/// the webhook; restart plant-2 and poll again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_goes_offline_with_an_alert_and_comes_back_healthy() -> Result<()> {
    let fleet = Fleet::init(3)?;
    let (hook_url, mut hooks) = webhook_receiver().await?;
    let cfg = &fleet.central.config;
    let text = std::fs::read_to_string(cfg)? + &format!("\n[health]\nwebhooks = [{hook_url:?}]\n");
    std::fs::write(cfg, text)?;
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
    let _p1 = fleet.start_agent("plant-1", &quic, &fast_agent())?;
    let mut p2 = fleet.start_agent("plant-2", &quic, &fast_agent())?;
    let _w1 = fleet.start_agent("warehouse-1", &quic, &fast_agent())?;

    let all = eventually("all sites healthy with signals", STATE_TIMEOUT, || async {
        let r = c.get("/v1/fleet").await?;
        ensure!(r.status == 200, "GET /v1/fleet: {} {}", r.status, r.body);
        let sites = r.body["sites"].as_array().context("sites")?.clone();
        let ready = sites.len() == 3
            && sites.iter().all(|s| {
                s["state"] == "healthy"
                    && s["connected"] == true
                    && s["signals"]["disk_total_bytes"].is_u64()
            });
        Ok(ready.then_some(sites))
    })
    .await?;
    for s in &all {
        let sig = &s["signals"];
        for key in [
            "agent_version",
            "uptime_secs",
            "process_rss_bytes",
            "host_mem_total_bytes",
            "disk_free_bytes",
            "store_file_bytes",
            "outbox_events",
            "master_rev",
            "central_rev",
            "api_requests",
            "clock_offset_ms",
        ] {
            ensure!(!sig[key].is_null(), "{key} missing in {s}");
        }
        ensure!(s["reasons"] == json!([]), "{s}");
        ensure!(
            sig["clock_offset_ms"].as_i64().unwrap_or(i64::MAX).abs() < 5_000,
            "{s}"
        );
    }
    // The history fills with one beat a second.
    eventually("plant-1 history", STATE_TIMEOUT, || async {
        let s = fleet_site(&c, "plant-1").await?;
        let n = s["history"].as_array().map_or(0, Vec::len);
        Ok((n >= 2 && !s["signals"]["api_request_rate"].is_null()).then_some(()))
    })
    .await?;
    // The fleet list derives the same rates (it keeps the last two beats per site).
    eventually("rates in the fleet list", STATE_TIMEOUT, || async {
        let v = c.get("/v1/fleet").await?;
        let ok = v.status == 200
            && v.body["sites"].as_array().is_some_and(|sites| {
                sites
                    .iter()
                    .any(|s| s["site"] == "plant-1" && s["signals"]["api_request_rate"].is_number())
            });
        Ok(ok.then_some(()))
    })
    .await?;

    let killed = Instant::now();
    p2.kill9()?;
    let off = wait_state(&c, "plant-2", "offline").await?;
    let took = killed.elapsed();
    println!(
        "health figures: SIGKILLed agent shown offline after {:.2} s \
         (offline_after_secs={OFFLINE_AFTER_SECS}, heartbeat 1 s)",
        took.as_secs_f64()
    );
    ensure!(
        took <= Duration::from_secs(OFFLINE_AFTER_SECS + 5),
        "offline after {took:?}"
    );
    ensure!(off["reasons"] == json!(["not_heard_from"]), "{off}");
    ensure!(off["offline_since"].is_string(), "{off}");
    let list = alerts(&c).await?;
    ensure!(
        has_alert(&list, "plant-2", "healthy", "offline"),
        "alerts: {list:?}"
    );
    // The others stay healthy.
    ensure!(fleet_site(&c, "plant-1").await?["state"] == "healthy");
    let hook = tokio::time::timeout(STATE_TIMEOUT, async {
        while let Some(v) = hooks.recv().await {
            if v["site"] == "plant-2" && v["to"] == "offline" {
                return Some(v);
            }
        }
        None
    })
    .await
    .context("webhook within the timeout")?
    .context("webhook receiver ended")?;
    ensure!(hook["from"] == "healthy" && hook["id"].is_u64(), "{hook}");

    let _p2 = fleet.start_agent("plant-2", &quic, &fast_agent())?;
    wait_state(&c, "plant-2", "healthy").await?;
    let list = alerts(&c).await?;
    ensure!(
        has_alert(&list, "plant-2", "offline", "healthy"),
        "alerts: {list:?}"
    );
    let ids: Vec<u64> = list.iter().filter_map(|a| a["id"].as_u64()).collect();
    ensure!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let after = ids.first().copied().unwrap_or(0);
    let rest = c.get(&format!("/v1/alerts?after={after}")).await?;
    ensure!(rest.body.as_array().map(Vec::len) == Some(ids.len() - 1));
    let bad = c.get("/v1/alerts?limit=0").await?;
    ensure!(bad.status == 422, "{}", bad.body);
    let none = c.get("/v1/fleet/no-such-site").await?;
    ensure!(none.status == 404, "{}", none.body);
    Ok(())
}

/// Goal: a backlog built while the link was down is reported: the first heartbeat after the
/// reconnect (sent before the upload starts) shows the outbox, and central derives `degraded`
/// with `outbox_near_limit` until a later heartbeat shows it drained.
/// Method: run plant-1 against an address where no central listens, post 10 milestones, stop
/// it, start it against central with `outbox_events_max = 5` and 5 s heartbeats, and poll
/// `GET /v1/fleet/plant-1` until degraded; then until healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_over_the_outbox_threshold_is_degraded_with_the_reason() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central_with(
        None,
        &[
            ("OUTPOST_HEALTH__OUTBOX_EVENTS_MAX", "5".to_string()),
            // This host's own disk may be nearly full; that reason is unit-tested.
            ("OUTPOST_HEALTH__DISK_FREE_MIN_PCT", "0".to_string()),
        ],
    )?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let c = Api::new(&central);

    // Nothing listens on UDP port 9 of loopback (discard): the agent keeps retrying.
    let mut offline = fleet.start_agent("plant-1", "127.0.0.1:9", &[])?;
    let a = Api::new(&offline);
    for i in 0..10 {
        let body = json!({"event_id": format!("scan-{i}"), "milestone": "picked", "scanner_id": "scanner-7", "at": "2026-11-26T10:00:00Z"});
        let r = a
            .post(&format!("/v1/shipments/SH-{i}/milestones"), &body, None)
            .await?;
        ensure!(r.status == 201, "{} {}", r.status, r.body);
    }
    ensure!(offline.terminate()?, "the agent stops cleanly");

    let _agent = fleet.start_agent(
        "plant-1",
        &quic,
        &[("OUTPOST_HEALTH__HEARTBEAT_SECS", "5".to_string())],
    )?;
    let degraded = wait_state(&c, "plant-1", "degraded").await?;
    ensure!(
        degraded["reasons"] == json!(["outbox_near_limit"]),
        "{degraded}"
    );
    let history = degraded["history"].as_array().context("history")?;
    ensure!(
        history.iter().any(|b| b["outbox_events"] == 10),
        "{degraded}"
    );
    let healthy = wait_state(&c, "plant-1", "healthy").await?;
    ensure!(healthy["signals"]["outbox_events"] == 0, "{healthy}");
    Ok(())
}
