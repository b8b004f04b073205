//! Outpost site agent as a library: configuration, durable store, local HTTP API and the sync
//! client, wired together by `run`. The binary in `main.rs` is a thin CLI over this.

pub mod api;
pub mod capture;
pub mod config;
pub mod counters;
pub mod enroll;
pub mod health;
pub mod link;
pub mod memory;
pub mod metrics;
pub mod router;
pub mod run;
pub mod store;
pub mod sync;
pub mod tls;
pub mod topup;

#[cfg(test)]
mod testutil;

pub use config::{LoadConfigError, Settings};
pub use run::{RunError, run};
