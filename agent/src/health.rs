//! The agent's health signals (fleet health): samples the process, the host, the disk holding
//! the store, the outbox and the API counters into a `Heartbeat` for central. Blocking reads
//! (`/proc`, `statvfs`, redb): call `HealthProbe::sample` from `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use outpost_protocol::Heartbeat;
use sysinfo::{Disks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::counters::ApiCounters;
use crate::store::{Store, now_ms};

/// What a heartbeat needs to read, kept between beats: CPU figures are the usage since the
/// previous refresh, so the same `System` must be refreshed each time.
pub struct HealthProbe {
    sys: System,
    disks: Disks,
    pid: Option<Pid>,
    started: Instant,
    store: Store,
    store_path: PathBuf,
    api: Arc<ApiCounters>,
}

impl HealthProbe {
    /// `store_path`: the store's file (its size, and the filesystem whose free space counts).
    pub fn new(store: Store, store_path: PathBuf, api: Arc<ApiCounters>) -> Self {
        HealthProbe {
            sys: System::new(),
            disks: Disks::new(),
            pid: sysinfo::get_current_pid().ok(),
            started: Instant::now(),
            store,
            store_path,
            api,
        }
    }

    /// One heartbeat. Figures that cannot be read on this host are `None`; a store that cannot
    /// be read leaves the outbox figures from `marks` only (0 bytes, no age) rather than no beat.
    pub fn sample(&mut self) -> Heartbeat {
        let (process_cpu_pct, process_rss_bytes) = match self.pid {
            Some(pid) => {
                self.sys.refresh_processes_specifics(
                    ProcessesToUpdate::Some(&[pid]),
                    false,
                    ProcessRefreshKind::nothing().with_cpu().with_memory(),
                );
                match self.sys.process(pid) {
                    Some(p) => (Some(p.cpu_usage()), Some(p.memory())),
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let host_mem_total_bytes = Some(self.sys.total_memory()).filter(|t| *t > 0);
        let host_mem_used_bytes = host_mem_total_bytes.map(|_| self.sys.used_memory());
        // Mounts change rarely but do change (a USB disk, a remount): refresh the list each beat,
        // which is one read of the mount table and one statvfs per mount.
        self.disks.refresh(true);
        let disk = store_disk(&self.disks, &self.store_path);
        let store_file_bytes = std::fs::metadata(&self.store_path).ok().map(|m| m.len());
        let marks = self.store.marks().unwrap_or_default();
        let outbox = self.store.outbox_summary().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the outbox for the heartbeat");
            crate::store::OutboxSummary {
                events: marks.outbox_depth(),
                ..Default::default()
            }
        });
        let master_applied_ms = self.store.as_of_ms().ok().flatten();
        Heartbeat {
            agent_time_ms: now_ms(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            process_cpu_pct,
            process_rss_bytes,
            host_cpu_pct: Some(self.sys.global_cpu_usage()),
            host_mem_used_bytes,
            host_mem_total_bytes,
            disk_free_bytes: disk.map(|d| d.0),
            disk_total_bytes: disk.map(|d| d.1),
            store_file_bytes,
            outbox_events: outbox.events,
            outbox_bytes: outbox.bytes,
            oldest_unsynced_ms: outbox.oldest_at_ms,
            master_rev: marks.master_rev,
            master_applied_ms,
            api_requests: self.api.requests.load(Ordering::Relaxed),
            api_errors: self.api.errors.load(Ordering::Relaxed),
        }
    }
}

/// Where this site's own certificate stands, as the agent can tell by itself. Central refuses an
/// expired (or not yet valid) client certificate at every connection attempt, which from here
/// looks like any failed handshake; only a new enrolment cures it, so it is said plainly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateState {
    Valid,
    Expired,
    NotYetValid,
}

/// Pure: the state of a certificate valid from `not_before` to `not_after` at `now` (seconds).
pub fn certificate_state(not_before: i64, not_after: i64, now: i64) -> CertificateState {
    if now > not_after {
        CertificateState::Expired
    } else if now < not_before {
        CertificateState::NotYetValid
    } else {
        CertificateState::Valid
    }
}

/// Reads this site's certificate (`sync.cert`) and logs an error naming the dates and the cure
/// when it has expired or is not yet valid. `None` when it cannot be read (check-config says why).
pub fn check_own_certificate(cert: &Path, site: &str) -> Option<CertificateState> {
    let chain = crate::tls::read_certs(cert).ok()?;
    let (not_before, not_after) = crate::tls::cert_validity(chain.first()?.as_ref()).ok()?;
    let state = certificate_state(not_before, not_after, now_ms() / 1000);
    let at = |secs: i64| crate::store::rfc3339_millis(secs.saturating_mul(1000));
    match state {
        CertificateState::Valid => {}
        CertificateState::Expired => tracing::error!(
            cert = %cert.display(),
            not_after = %at(not_after),
            "this site's certificate has EXPIRED: central refuses every connection until the \
             site is enrolled again (`outpost-central sites add {site} --force ...`, then \
             `outpost-agent enroll BUNDLE --force` here); orders and milestones are still taken \
             into the outbox and are delivered once it connects"
        ),
        CertificateState::NotYetValid => tracing::error!(
            cert = %cert.display(),
            not_before = %at(not_before),
            "this site's certificate is NOT YET VALID by this machine's clock: central may refuse \
             the connection; check the clock"
        ),
    }
    Some(state)
}

/// Free and total bytes of the filesystem holding `path`: the mount point that is the longest
/// prefix of it.
fn store_disk(disks: &Disks, path: &Path) -> Option<(u64, u64)> {
    let path = std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .ok()?;
    disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.available_space(), d.total_space()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewMilestone;
    use outpost_protocol::MilestoneKind;

    /// Goal: a heartbeat fills every figure this host can give: the store's file and disk, the
    /// outbox with its oldest event, the API counters, and the process's own memory.
    #[test]
    fn certificate_states() {
        assert_eq!(certificate_state(10, 20, 15), CertificateState::Valid);
        assert_eq!(certificate_state(10, 20, 20), CertificateState::Valid);
        assert_eq!(certificate_state(10, 20, 21), CertificateState::Expired);
        assert_eq!(certificate_state(10, 20, 9), CertificateState::NotYetValid);
    }

    #[tokio::test]
    async fn a_sample_fills_the_signals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let (store, writer) = Store::open(&path, "plant-1").unwrap();
        let api = Arc::new(ApiCounters::default());
        api.requests.store(7, Ordering::Relaxed);
        api.errors.store(2, Ordering::Relaxed);
        let mut probe = HealthProbe::new(store.clone(), path.clone(), api);
        let empty = probe.sample();
        assert_eq!(empty.outbox_events, 0);
        assert_eq!(empty.oldest_unsynced_ms, None);
        for i in 0..3 {
            let m = NewMilestone {
                event_id: format!("e{i}"),
                shipment_id: "SH-1".into(),
                milestone: MilestoneKind::Picked,
                scanner_id: "scanner-1".into(),
                at: "2026-11-26T10:00:00Z".into(),
            };
            // The second argument is the event's `at_ms`: the oldest is the first one stored.
            store.record_milestone(m, 1_000 + i).await.unwrap();
        }
        let hb = probe.sample();
        assert_eq!(hb.outbox_events, 3);
        assert!(hb.outbox_bytes > 0);
        assert_eq!(hb.oldest_unsynced_ms, Some(1_000));
        assert_eq!((hb.api_requests, hb.api_errors), (7, 2));
        assert!(hb.store_file_bytes.unwrap() > 0);
        let (free, total) = (hb.disk_free_bytes.unwrap(), hb.disk_total_bytes.unwrap());
        assert!(free <= total && total > 0);
        assert!(hb.process_rss_bytes.unwrap() > 0);
        assert!(hb.host_mem_total_bytes.unwrap() >= hb.host_mem_used_bytes.unwrap());
        assert_eq!(hb.master_applied_ms, None);
        drop(probe);
        drop(store);
        writer.shutdown().await;
    }
}
