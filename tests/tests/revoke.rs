//! Revocation and API roles at central, tested with real processes: an operator revokes a
//! connected site through the CLI, central closes its live connection and refuses it at every
//! Hello while the agent keeps answering writes into its outbox; reinstating it lets every write
//! through exactly once. The ERP's token is refused the operator routes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_tests::*;
use serde_json::{Value, json};

/// How fast a revocation must show: central closes the live connection and reports it.
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);
/// Limit on each CLI run.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Refused reconnect attempts to see before calling the site "not re-admitted": the agent
/// really retried and was really refused, more than once.
const REFUSALS_TO_SEE: usize = 3;

/// plant-1's row of `GET /v1/sites`.
async fn site_row(central: &Api, site: &str) -> Result<Value> {
    let r = central.get("/v1/sites").await?;
    if r.status != 200 {
        bail!("GET /v1/sites returned {}: {}", r.status, r.body);
    }
    r.body
        .as_array()
        .context("sites list")?
        .iter()
        .find(|s| s["site"] == site)
        .cloned()
        .with_context(|| format!("{site} not in {}", r.body))
}

/// Lines of central's log that record a refused Hello of a revoked site.
fn refusals_logged(central: &Proc) -> usize {
    std::fs::read_to_string(&central.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("revoked site refused"))
        .count()
}

fn cli(fleet: &Fleet, args: &[&str]) -> Result<CliOutput> {
    let fleet_json = fleet.path().join("fleet.json");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--fleet", fleet_json.to_str().context("utf-8 path")?]);
    run_cli("outpost-central", &all, CLI_TIMEOUT)
}

/// Goal: revoking a connected site closes its connection within seconds and keeps it out while
/// revoked, without losing any of its writes; reinstating it lets them all through exactly once.
/// Method: one agent connected and uploading; `outpost-central sites revoke plant-1` through the
/// CLI; poll central's fleet view (disconnected and revoked within 5 s); post writes to the agent
/// (2xx, kept in its outbox); wait until central's log shows several refused reconnect attempts
/// and check nothing got through; check the erp token on the operator routes; then
/// `sites reinstate plant-1` and wait for the outbox to drain; count every id in the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_is_cut_off_keeps_its_writes_and_delivers_them_once_reinstated() -> Result<()>
{
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic address")?;
    let c = Api::new(&central);
    let erp = Api {
        token: fleet.fleet_json["central"]["erp_token"]
            .as_str()
            .context("fleet.json has central.erp_token")?
            .to_string(),
        ..c.clone()
    };
    let agent = fleet.start_agent("plant-1", &quic, &fast_agent_env())?;
    let a = Api::new(&agent);
    wait_connected(&a, true).await?;
    let before = post_milestones(&a, "before", 5).await?;
    wait_drained(&a).await?;
    let row = site_row(&c, "plant-1").await?;
    assert_eq!(row["connected"], true, "{row}");
    assert_eq!(row["revoked"], false, "{row}");
    assert!(row["clock_offset_ms"].is_i64(), "offset estimated: {row}");

    // Revoke through the CLI (admin token from fleet.json).
    let started = Instant::now();
    let out = cli(
        &fleet,
        &["sites", "revoke", "plant-1", "--reason", "decommissioned"],
    )?;
    assert!(out.success, "revoke failed: {}{}", out.stdout, out.stderr);
    let row = eventually(
        "central shows plant-1 revoked and disconnected",
        REVOKE_DEADLINE,
        || async {
            let row = site_row(&c, "plant-1").await?;
            Ok((row["connected"] == false && row["revoked"] == true).then_some(row))
        },
    )
    .await?;
    let cut_off_after = started.elapsed();
    assert_eq!(row["revoked_reason"], "decommissioned", "{row}");
    assert!(row["revoked_at"].is_string(), "{row}");
    wait_connected(&a, false).await?;
    println!("revoke: central showed plant-1 disconnected and revoked after {cut_off_after:?}");

    // The site keeps working: writes are answered and kept.
    let during = post_milestones(&a, "during", 20).await?;
    let h = health(&a).await?;
    assert_eq!(h["outbox_depth"], 20, "writes wait in the outbox: {h}");

    // Not re-admitted: the agent keeps trying and is refused each time.
    let refusals_at_revoke = refusals_logged(&central);
    let refused = eventually(
        "the agent's reconnect attempts are refused",
        CONVERGE_TIMEOUT,
        || async {
            let n = refusals_logged(&central) - refusals_at_revoke;
            Ok((n >= REFUSALS_TO_SEE).then_some(n))
        },
    )
    .await?;
    let row = site_row(&c, "plant-1").await?;
    assert_eq!(row["connected"], false, "{row}");
    assert_eq!(row["acked_seq"], 5, "nothing uploaded while revoked: {row}");
    let h = health(&a).await?;
    assert_eq!(h["outbox_depth"], 20, "{h}");
    assert_eq!(h["connected"], false, "{h}");
    let list = cli(&fleet, &["sites", "list"])?;
    assert!(list.success, "{}", list.stderr);
    assert!(
        list.stdout.contains("plant-1") && list.stdout.contains("decommissioned"),
        "{}",
        list.stdout
    );
    println!("revoke: {refused} reconnect attempts refused while revoked");

    // Roles: the ERP's token may not use operator routes; no token is 401.
    for (method, path) in [
        ("POST", "/v1/sites/plant-1/revoke"),
        ("DELETE", "/v1/sites/plant-1/revoke"),
        ("POST", "/v1/exceptions/1/resolve"),
        ("GET", "/v1/ledger"),
    ] {
        let body = json!({"action": "accept", "reason": "x"});
        let r = match method {
            "POST" => erp.post(path, &body, None).await?,
            "GET" => erp.get(path).await?,
            _ => {
                let resp = erp
                    .http
                    .delete(format!("{}{path}", erp.base))
                    .bearer_auth(&erp.token)
                    .send()
                    .await?;
                Resp {
                    status: resp.status().as_u16(),
                    body: resp.json().await?,
                }
            }
        };
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "forbidden", "{}", r.body);
    }
    let prices =
        json!([{"sku": "BOLT-M8", "customer": null, "unit_price": "0.12", "currency": "EUR"}]);
    let r = erp.put("/v1/master/prices", &prices).await?;
    assert_eq!(r.status, 200, "erp may push master data: {}", r.body);
    let r = erp.get("/v1/events?limit=1").await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let anon = Api {
        token: String::new(),
        ..c.clone()
    };
    for path in ["/v1/sites", "/v1/master/revision"] {
        let r = anon.get(path).await?;
        assert_eq!(r.status, 401, "{path}: {}", r.body);
    }
    assert_eq!(
        site_row(&c, "plant-1").await?["revoked"],
        true,
        "the erp token changed nothing"
    );

    // Reinstate: the agent comes back and delivers everything exactly once.
    let out = cli(&fleet, &["sites", "reinstate", "plant-1"])?;
    assert!(
        out.success,
        "reinstate failed: {}{}",
        out.stdout, out.stderr
    );
    let started = Instant::now();
    wait_drained(&a).await?;
    println!(
        "revoke: outbox drained {:?} after reinstating",
        started.elapsed()
    );
    let row = site_row(&c, "plant-1").await?;
    assert_eq!(row["revoked"], false, "{row}");
    assert_eq!(row["connected"], true, "{row}");
    let feed = read_feed(&c).await?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in feed.iter().filter(|e| e["site"] == "plant-1") {
        *counts
            .entry(e["id"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    for id in before.iter().chain(&during) {
        assert_eq!(counts.get(id), Some(&1), "{id} exactly once in the feed");
    }
    assert_eq!(counts.len(), 25, "nothing else in the feed: {counts:?}");
    Ok(())
}
