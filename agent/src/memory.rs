//! This process's resident memory, read from the OS (`/proc` through sysinfo) for `/metrics`.
//! Blocking I/O side (one small `/proc` read); a leaf module shared by metrics and health.

use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};

/// This process's resident set size, read on its own (for `/metrics`; the heartbeat samples it
/// with the rest of its figures).
pub fn resident_memory_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut sys = System::new();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map(|p| p.memory())
}
