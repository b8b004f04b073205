//! The local fleet command: `outpost-central dev up` starts central and three agents as separate
//! processes, seeds demo master data that reaches the sites, and stops everything on Ctrl-C.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_tests::*;
use serde_json::Value;

fn alive(pid: u64) -> bool {
    // A reaped process has no /proc entry; a zombie still shows state Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_none_or(|st| st != "Z"),
        Err(_) => false,
    }
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Goal: one command brings up a working fleet and Ctrl-C takes it down cleanly.
/// Method: run `dev up` on an empty directory with ephemeral ports; wait for fleet.json and every
/// ready file; check the seeded catalogue is served at each site and that a site's order reaches
/// central's feed; send SIGINT; check `dev up` exits 0 and every child process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_runs_a_fleet_until_ctrl_c() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("outpost-devup").tempdir()?;
    let log = std::fs::File::create(dir.path().join("dev-up.log"))?;
    let mut up = hermetic(&mut Command::new(bin("outpost-central")))
        .args(["dev", "up", "--dir"])
        .arg(dir.path().join("fleet"))
        .args(["--base-port", "0", "--agent-bin"])
        .arg(bin("outpost-agent"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    // If the test fails half-way, Ctrl-C the fleet so no process outlives the test.
    let guard = InterruptOnDrop(up.id());

    let fleet_path = dir.path().join("fleet").join("fleet.json");
    let deadline = Instant::now() + READY_TIMEOUT * 2;
    let (fleet, readies) = loop {
        if let Some(st) = up.try_wait()? {
            bail!("dev up exited early: {st}");
        }
        if let Some(f) = read_json(&fleet_path) {
            let mut dirs = vec![
                f["central"]["data_dir"]
                    .as_str()
                    .context("data_dir")?
                    .to_string(),
            ];
            for s in f["sites"].as_array().context("sites")? {
                dirs.push(s["data_dir"].as_str().context("data_dir")?.to_string());
            }
            let readies: Vec<Value> = dirs
                .iter()
                .filter_map(|d| read_json(&Path::new(d).join("ready.json")))
                .collect();
            if readies.len() == dirs.len() {
                break (f, readies);
            }
        }
        if Instant::now() > deadline {
            bail!("fleet not up in time");
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ids: Vec<&str> = fleet["sites"]
        .as_array()
        .context("sites")?
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, ["plant-1", "plant-2", "warehouse-1"]);
    let pids: Vec<u64> = readies.iter().filter_map(|r| r["pid"].as_u64()).collect();
    assert_eq!(
        pids.len(),
        4,
        "central and three agents, each its own process"
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let central = Api {
        base: format!("http://{}", readies[0]["api"].as_str().context("api")?),
        token: fleet["central"]["token"]
            .as_str()
            .context("token")?
            .to_string(),
        http: http.clone(),
    };
    for (i, site) in fleet["sites"]
        .as_array()
        .context("sites")?
        .iter()
        .enumerate()
    {
        let a = Api {
            base: format!("http://{}", readies[i + 1]["api"].as_str().context("api")?),
            token: site["token"].as_str().context("token")?.to_string(),
            http: http.clone(),
        };
        // The demo catalogue is seeded through central and must reach every site.
        let ok = eventually("seeded ATP at the site", CONVERGE_TIMEOUT, || async {
            let r = a.get("/v1/health").await?;
            Ok(
                (r.body["master_rev"].as_u64().unwrap_or(0) > 0 && r.body["connected"] == true)
                    .then_some(r),
            )
        })
        .await?;
        assert_eq!(ok.status, 200);
        if i == 0 {
            // The catalogue is pushed in several revisions (prices, customers, ATP), which may
            // reach the site in more than one Master frame: wait for the ATP itself.
            let sku = "GEAR-12T";
            let atp = eventually(
                "the demo SKU's ATP at the site",
                CONVERGE_TIMEOUT,
                || async {
                    let r = a.get(&format!("/v1/atp/{sku}")).await?;
                    Ok((r.status == 200).then_some(r))
                },
            )
            .await?;
            assert_eq!(atp.status, 200, "demo SKU {sku} is seeded: {}", atp.body);
        }
    }
    let sites = central.get("/v1/sites").await?;
    assert_eq!(
        sites.body.as_array().map(Vec::len),
        Some(3),
        "{}",
        sites.body
    );

    // Central dies: the fleet keeps running and the site keeps taking orders.
    let central_pid = readies[0]["pid"].as_u64().context("pid")?;
    assert!(
        Command::new("kill")
            .args(["-KILL", &central_pid.to_string()])
            .status()?
            .success()
    );
    let site = &fleet["sites"][0];
    let a = Api {
        base: format!("http://{}", readies[1]["api"].as_str().context("api")?),
        token: site["token"].as_str().context("token")?.to_string(),
        http: http.clone(),
    };
    eventually("site notices central is gone", CONVERGE_TIMEOUT, || async {
        Ok((a.get("/v1/health").await?.body["connected"] == false).then_some(()))
    })
    .await?;
    let body =
        serde_json::json!({"customer_id": "C-ACME", "lines": [{"sku": "GEAR-12T", "qty": 2}]});
    let o = a
        .post("/v1/orders", &body, Some("while-central-down"))
        .await?;
    assert_eq!(o.status, 201, "{}", o.body);
    assert!(
        up.try_wait()?.is_none(),
        "dev up keeps the rest of the fleet running"
    );

    // The operator restarts central by hand where the agents expect it; the order arrives.
    let pinned = Ready {
        pid: 0,
        api: readies[0]["api"].as_str().context("api")?.to_string(),
        quic: readies[0]["quic"].as_str().map(str::to_string),
    };
    let f = Fleet {
        dir: tempfile::tempdir()?,
        central: member(&fleet["central"], "central")?,
        sites: Vec::new(),
        fleet_json: fleet.clone(),
    };
    let restarted = f.start_central(Some(&pinned))?;
    let order_id = o.body["order_id"].as_str().context("order_id")?.to_string();
    eventually(
        "order written while central was down reaches the feed",
        CONVERGE_TIMEOUT,
        || async {
            let feed = read_feed(&central).await?;
            Ok(feed
                .iter()
                .any(|e| e["id"] == order_id.as_str())
                .then_some(()))
        },
    )
    .await?;
    drop(restarted);

    // Ctrl-C.
    let st = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()?;
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = up.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            bail!("dev up did not exit within 30 s of SIGINT");
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "dev up exits 0 on Ctrl-C: {status}");
    // Every process dev up started is gone (central was already killed above).
    for pid in pids {
        let gone = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < gone {
            // Poll interval of the bounded wait around it, not a wait for a condition by itself.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!alive(pid), "child {pid} still running after dev up exited");
    }
    std::mem::forget(guard); // dev up has exited and been reaped; its pid must not be signalled.
    Ok(())
}

/// Sends SIGINT to `dev up` when dropped, which makes it stop its children.
struct InterruptOnDrop(u32);
impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.to_string()])
            .status();
    }
}
