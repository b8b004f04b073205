//! Disk faults: the agent's store on a small tmpfs that fills up. Writes past the full disk get a
//! clear JSON error and are not acknowledged, nothing acknowledged is lost, and the agent takes
//! writes again once space returns, without a restart.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_tests::*;
use serde_json::json;

/// Unmounts the tmpfs when dropped, even if the test failed half-way.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Result<Mount> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Mount(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) -> Result<()> {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()?;
        anyhow::ensure!(st.success(), "remount failed");
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Goal: a full disk never turns into a lost acknowledged write, and the agent recovers by itself.
/// Method: central is stopped so the outbox only grows; the agent's data directory is an 8 MiB
/// tmpfs; post milestones until one is refused (bounded in count and time) and check the refusal
/// is a JSON 503/507; grow the tmpfs; check writes succeed again on the same process; restart
/// central and check every acknowledged milestone is at central exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_loses_nothing_and_recovers() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let site = fleet.site("plant-1").clone();
    let mount = match Mount::tmpfs(&site.data_dir, "8m") {
        Ok(m) => m,
        Err(e) => {
            skip(
                "the full-disk test (tests/tests/disk.rs)",
                &format!(
                    "cannot mount a tmpfs on the agent's data directory, which needs root ({e})"
                ),
            );
            return Ok(());
        }
    };
    let mut central = fleet.start_central(None)?;
    let pinned = central.ready.clone();
    let quic = pinned.quic.clone().context("quic")?;
    let agent = fleet.start_agent("plant-1", &quic, &[])?;
    let a = Api::new(&agent);
    assert!(central.terminate()?);

    let mut acked: Vec<String> = Vec::new();
    let filler = "x".repeat(60);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refusal = None;
    for i in 0..200_000 {
        if Instant::now() > deadline {
            bail!("disk not full after {} writes in 120 s", acked.len());
        }
        let id = format!("fill-{i}");
        let body = json!({"event_id": id, "milestone": "picked", "scanner_id": filler, "at": "2026-11-26T10:00:00Z"});
        let r = a
            .post(&format!("/v1/shipments/SH-{i}/milestones"), &body, None)
            .await?;
        if r.status == 201 {
            acked.push(id);
        } else {
            refusal = Some(r);
            break;
        }
    }
    let r = refusal.context("never refused")?;
    assert!(
        r.status == 503 || r.status == 507,
        "full disk answers 503/507: {} {}",
        r.status,
        r.body
    );
    assert!(
        r.body["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{}",
        r.body
    );
    eprintln!(
        "disk full after {} acknowledged writes: {} {}",
        acked.len(),
        r.status,
        r.body
    );

    // Space returns: the same agent process takes writes again.
    mount.resize("64m")?;
    let after = eventually("writes succeed again", CONVERGE_TIMEOUT, || async {
        let body = json!({"event_id": "after-full", "milestone": "packed", "scanner_id": "s1", "at": "2026-11-26T10:00:00Z"});
        let r = a.post("/v1/shipments/SH-after/milestones", &body, None).await?;
        Ok((r.status == 201 || r.status == 200).then_some(r))
    })
    .await?;
    assert_eq!(after.body["event_id"], "after-full");
    acked.push("after-full".to_string());

    let central = fleet.start_central(Some(&pinned))?;
    let c = Api::new(&central);
    wait_drained(&a).await?;
    let feed = read_feed(&c).await?;
    let mut seen = HashSet::new();
    for e in &feed {
        let id = e["id"].as_str().unwrap_or_default().to_string();
        assert!(seen.insert(id.clone()), "{id} twice at central");
    }
    for id in &acked {
        assert!(seen.contains(id), "acknowledged {id} lost");
    }
    drop(agent);
    drop(mount);
    Ok(())
}
