//! The I/O side of drills: starting one (checks, marks, the durable record, the cut), aborting
//! it, resuming it after central restarts (a restore drill ends its cut here), and the driver
//! task that ends the cut on time, waits for recovery and computes the final report from
//! central's records.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::drill::{
    Drill, DrillBackup, DrillKind, DrillMarks, DrillRequest, Phase, SiteFindings,
    ValidateDrillError, report,
};
use crate::ledger::LedgerKey;
use crate::registry::Registry;
use crate::store::{LedgerFilter, Store, now_ms};

/// How often the driver looks at the active drill.
const TICK: Duration = Duration::from_millis(200);
/// How often the active drill's tracking is written to the store.
const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// Why a drill could not be started or changed (the API maps these to HTTP errors).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Invalid(#[from] ValidateDrillError),
    #[error("central has never heard of site {0:?}")]
    UnknownSite(String),
    #[error("drill {0} is in progress; abort it or wait for it to end")]
    InProgress(u64),
    #[error("no site is connected: a {0} drill needs at least one")]
    NoSites(&'static str),
    #[error("no drill {0}")]
    NotFound(u64),
    #[error("drill {0} is over")]
    Over(u64),
    #[error("central cannot record the drill: {0}")]
    Store(String),
    #[error("central cannot take the backup: {0}")]
    Backup(String),
}

/// Starts the drill `req` asks for. The record is durable before the cut takes effect; a restore
/// drill's backup (under `data_dir/backups`) holds the record in its cut-off phase, so that the
/// central restored from it knows the drill.
pub async fn start(
    store: &Store,
    registry: &Registry,
    data_dir: &Path,
    req: DrillRequest,
) -> Result<Drill, DrillError> {
    req.validate()?;
    let drills = registry.drills();
    if let Some(a) = drills.active() {
        return Err(DrillError::InProgress(a.id));
    }
    let sites: Vec<String> = match req.kind {
        DrillKind::Isolation => {
            let known: std::collections::BTreeSet<String> = store
                .sites()
                .map_err(|e| DrillError::Store(e.to_string()))?
                .into_iter()
                .map(|s| s.site)
                .chain(registry.snapshot().into_keys())
                .collect();
            if let Some(unknown) = req.sites.iter().find(|s| !known.contains(*s)) {
                return Err(DrillError::UnknownSite(unknown.clone()));
            }
            req.sites.clone()
        }
        DrillKind::CentralOutage | DrillKind::CentralRestore => {
            let mut live: Vec<String> = registry
                .snapshot()
                .into_iter()
                .filter(|(_, l)| l.connected)
                .map(|(s, _)| s)
                .collect();
            live.sort();
            if live.is_empty() {
                return Err(DrillError::NoSites(req.kind.as_str()));
            }
            live
        }
    };
    let marks = store
        .drill_marks()
        .map_err(|e| DrillError::Store(e.to_string()))?;
    let id = store
        .next_drill_id()
        .map_err(|e| DrillError::Store(e.to_string()))?;
    let mut drill = Drill::new(id, &req, sites, &marks, now_ms());
    // Installed before it is stored, so two concurrent starts cannot both run.
    drills
        .install(drill.clone())
        .map_err(DrillError::InProgress)?;
    let cleanup = |e: DrillError| {
        drills.finish(id);
        e
    };
    if let Err(e) = store.put_drill(drill.clone()).await {
        return Err(cleanup(DrillError::Store(e.to_string())));
    }
    match drill.kind {
        DrillKind::Isolation => {
            for site in &drill.sites {
                registry.cut_off(site);
            }
        }
        // `install` raised the outage signal: the QUIC loop closes its listener.
        DrillKind::CentralOutage => {}
        DrillKind::CentralRestore => {
            let dir = data_dir.join("backups");
            if let Err(e) = std::fs::create_dir_all(&dir) {
                return Err(cleanup(DrillError::Backup(format!(
                    "cannot create {}: {e}",
                    dir.display()
                ))));
            }
            let path = dir.join(format!("drill-{id}.redb"));
            let copy = store.clone();
            let taken = tokio::task::spawn_blocking(move || copy.backup_to(&path)).await;
            let info = match taken {
                Ok(Ok(i)) => i,
                Ok(Err(e)) => return Err(cleanup(DrillError::Backup(e.to_string()))),
                Err(e) => return Err(cleanup(DrillError::Backup(e.to_string()))),
            };
            drill.backup = Some(DrillBackup {
                path: info.path.display().to_string(),
                bytes: info.bytes,
                taken_ms: info.taken_ms,
            });
            let b = drill.backup.clone();
            drills.with_active(|d| d.backup = b);
            if let Err(e) = store.put_drill(drill.clone()).await {
                return Err(cleanup(DrillError::Store(e.to_string())));
            }
        }
    }
    tracing::warn!(
        drill = id,
        kind = drill.kind.as_str(),
        sites = ?drill.sites,
        cut_until_ms = ?drill.cut_until_ms,
        "disaster-recovery drill started"
    );
    Ok(drill)
}

/// Aborts drill `id`: the cut ends now; a recovering drill reports at once.
pub async fn abort(store: &Store, registry: &Registry, id: u64) -> Result<Drill, DrillError> {
    let now = now_ms();
    let changed = registry.drills().with_active(|d| {
        if d.id != id {
            return None;
        }
        d.aborted_ms.get_or_insert(now);
        match d.phase {
            Phase::CutOff => d.end_cut(now),
            Phase::Recovering => {
                // Reported at the driver's next look, with whatever caught up by then.
                let ended = d.cut_ended_ms.unwrap_or(now);
                d.recovery_timeout_ms = (now - ended).max(0);
            }
            Phase::Completed => {}
        }
        Some(d.clone())
    });
    match changed.flatten() {
        Some(d) => {
            tracing::warn!(drill = id, "disaster-recovery drill aborted");
            store
                .put_drill(d.clone())
                .await
                .map_err(|e| DrillError::Store(e.to_string()))?;
            Ok(d)
        }
        None => match store.drill(id) {
            Ok(Some(_)) => Err(DrillError::Over(id)),
            Ok(None) => Err(DrillError::NotFound(id)),
            Err(e) => Err(DrillError::Store(e.to_string())),
        },
    }
}

/// At startup: the newest drill, if still active, is resumed. A restore drill whose backup this
/// store was restored from ends its cut now (the restored central is up).
pub async fn resume(store: &Store, registry: &Registry) {
    let newest = match store.drills(1) {
        Ok(mut v) => v.pop(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the drills; none resumed");
            return;
        }
    };
    let Some(mut d) = newest.filter(Drill::is_active) else {
        return;
    };
    let now = now_ms();
    if d.kind == DrillKind::CentralRestore && d.phase == Phase::CutOff {
        match store.restored_info() {
            Ok(Some(r)) if r.restored_at_ms >= d.started_ms => {
                d.restored_ms = Some(r.restored_at_ms);
                d.end_cut(now);
                tracing::warn!(
                    drill = d.id,
                    "central restored from the drill's backup: recovery starts"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read how the store was restored"),
        }
    }
    tracing::warn!(
        drill = d.id,
        phase = d.phase.as_str(),
        "disaster-recovery drill resumed"
    );
    if let Err(e) = store.put_drill(d.clone()).await {
        tracing::error!(error = %e, "cannot record the resumed drill");
    }
    if let Err(id) = registry.drills().install(d) {
        tracing::error!(drill = id, "another drill is active; not resumed");
    }
}

/// Reads back from central's records what the final report checks, for every site of `d`.
fn findings(store: &Store, d: &Drill) -> Result<BTreeMap<String, SiteFindings>, String> {
    let marks = DrillMarks {
        feed_cursor: d.feed_cursor_at_start,
        last_exception: d.last_exception_at_start,
        last_dead_letter: d.last_dead_letter_at_start,
        hwms: BTreeMap::new(),
    };
    let mut out = BTreeMap::new();
    for site in &d.sites {
        let held = store.held_seqs(site, &marks).map_err(|e| e.to_string())?;
        let lost = store
            .lost_ranges(Some(site))
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|l| l.at_ms >= d.started_ms)
            .map(|l| (l.first_seq, l.last_seq))
            .collect();
        let filter = LedgerFilter {
            key: None,
            site: Some(site.clone()),
        };
        let oversold_units = store
            .ledger(&filter, usize::MAX)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|e| matches!(&e.key, LedgerKey::Atp { site: s, .. } if s == site))
            .map(|e| {
                let committed = e.pool.in_transit + e.pool.accepted_since_push;
                (committed - e.pool.erp_available).max(0)
            })
            .sum();
        out.insert(
            site.clone(),
            SiteFindings {
                held,
                lost,
                oversold_units,
            },
        );
    }
    Ok(out)
}

/// Drives the active drill until `stop`: ends the cut when it is due, completes the drill when
/// every site caught up (or the recovery timeout passed) with the report computed from central's
/// records, and keeps the record in the store current.
pub async fn run_driver(store: Store, registry: Arc<Registry>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_persist = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let drills = registry.drills();
        let Some(snapshot) = drills.active() else {
            continue;
        };
        let mut persist = last_persist.elapsed() >= PERSIST_EVERY;
        if snapshot.phase == Phase::CutOff
            && snapshot.cut_until_ms.is_some_and(|until| now >= until)
        {
            drills.with_active(|d| d.end_cut(now));
            tracing::warn!(drill = snapshot.id, "drill cut over: sites may reconnect");
            persist = true;
        }
        if snapshot.recovery_over(now) {
            // The read-back scans central's records since the start: off the async runtime.
            let (st, snap) = (store.clone(), snapshot.clone());
            let found = match tokio::task::spawn_blocking(move || findings(&st, &snap)).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    tracing::error!(drill = snapshot.id, error = %e, "cannot check the drill's records; retrying");
                    continue;
                }
                Err(e) => {
                    tracing::error!(drill = snapshot.id, error = %e, "the drill's check failed; retrying");
                    continue;
                }
            };
            // Completed in memory only once the report is stored: a failed write leaves the drill
            // recovering, and the next tick computes and stores it again.
            let Some(mut done) = drills.active().filter(|d| d.id == snapshot.id) else {
                continue;
            };
            done.phase = Phase::Completed;
            done.ended_ms = Some(now);
            done.report = Some(report(&done, Some(&found), now));
            match store.put_drill(done.clone()).await {
                Ok(()) => {
                    let r = done.report.as_ref();
                    tracing::warn!(
                        drill = done.id,
                        passed = r.is_some_and(|r| r.passed),
                        discrepancies = r.map_or(0, |r| r.discrepancies),
                        oversold_units = r.map_or(0, |r| r.oversold_units),
                        "disaster-recovery drill completed"
                    );
                    drills.finish(done.id);
                }
                Err(e) => {
                    tracing::error!(drill = done.id, error = %e, "cannot store the drill report; retrying")
                }
            }
            last_persist = tokio::time::Instant::now();
            continue;
        }
        if persist {
            if let Some(d) = drills.active()
                && let Err(e) = store.put_drill(d).await
            {
                tracing::warn!(error = %e, "cannot record the drill's progress");
            }
            last_persist = tokio::time::Instant::now();
        }
    }
    // Keep what was tracked for the next start.
    if let Some(d) = registry.drills().active() {
        let _ = store.put_drill(d).await;
    }
}
