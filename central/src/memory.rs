//! Central's own resident memory: sampled on a timer for `[quic] memory_limit_mib` (new
//! connections are refused above it) and read by `/metrics`. A leaf of the I/O side.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// How often central samples its own resident memory for `quic.memory_limit_mib`.
pub const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Central's own resident memory, sampled every `MEMORY_SAMPLE_INTERVAL` by `run_memory_sampler`.
#[derive(Debug, Default)]
pub struct MemoryGauge {
    rss_bytes: AtomicU64,
    over_limit: AtomicBool,
}

impl MemoryGauge {
    pub fn rss_bytes(&self) -> u64 {
        self.rss_bytes.load(Ordering::Relaxed)
    }
    pub fn over_limit(&self) -> bool {
        self.over_limit.load(Ordering::Relaxed)
    }
    pub fn record(&self, rss: u64, limit: u64) {
        self.rss_bytes.store(rss, Ordering::Relaxed);
        self.over_limit.store(rss > limit, Ordering::Relaxed);
    }
}

/// This process's resident set size (reads `/proc/self/statm` on Linux: microseconds, fine on
/// the executor). Shared by the memory limit and `/metrics`.
pub fn resident_memory_bytes() -> Option<u64> {
    use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};
    let pid = sysinfo::get_current_pid().ok()?;
    let mut sys = System::new();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map(|p| p.memory())
}

/// Samples this process's resident set size until `stop` turns true. A failed sample leaves the
/// previous figure (a gauge that cannot read memory never refuses connections by itself).
pub async fn run_memory_sampler(
    gauge: Arc<MemoryGauge>,
    limit_bytes: u64,
    mut stop: watch::Receiver<bool>,
) {
    if sysinfo::get_current_pid().is_err() {
        tracing::warn!("cannot find central's own pid; quic.memory_limit_mib is not enforced");
        return;
    }
    let mut tick = tokio::time::interval(MEMORY_SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_over = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let Some(rss) = resident_memory_bytes() else {
            continue;
        };
        gauge.record(rss, limit_bytes);
        let over = gauge.over_limit();
        if over != was_over {
            if over {
                tracing::warn!(
                    rss_mib = rss >> 20,
                    limit_mib = limit_bytes >> 20,
                    "memory above quic.memory_limit_mib: refusing new connections (live sessions continue)"
                );
            } else {
                tracing::info!(
                    rss_mib = rss >> 20,
                    limit_mib = limit_bytes >> 20,
                    "memory back under quic.memory_limit_mib: accepting connections"
                );
            }
            was_over = over;
        }
    }
}
