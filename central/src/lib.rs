//! Outpost central coordinator library: configuration, the durable store, the allowance ledger
//! policy and business checks (pure), the event log's interface and its PostgreSQL store, the
//! ERP/operator HTTP API, the fleet dashboard page, the
//! QUIC sync server and fleet certificates. The binary (`main.rs`) adds the tools that are clients
//! of the server: the operator CLI, the dev fleet tooling and the traffic simulator.

pub mod alert_log;
pub mod api;
pub mod backup;
pub mod certs;
pub mod checks;
pub mod config;
pub mod dashboard;
pub mod dead_letter_log;
pub mod deny_list;
pub mod drill;
pub mod drill_driver;
pub mod event_log;
pub mod fleet;
pub mod fleet_health;
pub mod health;
pub mod ledger;
pub mod master_log;
pub mod memory;
pub mod metrics;
pub mod paths;
pub mod pg;
pub mod quic;
pub mod registry;
pub mod renewal;
pub mod router;
pub mod run;
pub mod site_registry;
pub mod store;
pub mod timefmt;

/// Version of this build, sent to agents in `Welcome`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
