//! Outpost central coordinator library: configuration, the durable store, the allowance ledger
//! policy and business checks (pure), the ERP/operator HTTP API, the fleet dashboard page and the
//! CLI client, the QUIC sync server, fleet certificates and the dev fleet tooling. `main.rs` is a
//! thin CLI over these modules.

pub mod api;
pub mod backup;
pub mod certs;
pub mod checks;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod dev;
pub mod drill;
pub mod fleet;
pub mod health;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod paths;
pub mod quic;
pub mod registry;
pub mod renewal;
pub mod run;
pub mod store;
pub mod timefmt;
pub mod traffic;

/// Version of this build, sent to agents in `Welcome`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
