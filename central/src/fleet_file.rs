//! The dev fleet's `fleet.json`: where central and each site of a fleet made by `dev init` are,
//! with their tokens and commands. Plain data shared by the dev tooling, the traffic simulator and
//! the operator CLI (binary side; no I/O here).

use serde::{Deserialize, Serialize};

/// Name of the fleet file in a dev fleet's directory.
pub const FLEET_FILE: &str = "fleet.json";

/// `fleet.json`: everything a test or a person needs to drive the dev fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    pub central: FleetCentral,
    pub sites: Vec<FleetSite>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCentral {
    /// `http://127.0.0.1:PORT` (port 0 when initialised with `--base-port 0`: the real port is
    /// in `data_dir/ready.json`).
    pub api: String,
    /// The `admin` client's bearer token (the CLI and most tests use it).
    pub token: String,
    /// The `erp` client's bearer token (master data, feed, orders; no operator routes).
    #[serde(default)]
    pub erp_token: String,
    /// `127.0.0.1:PORT` of the QUIC listener (same caveat for port 0).
    pub quic: String,
    pub command: Vec<String>,
    pub data_dir: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSite {
    pub id: String,
    pub api: String,
    /// The site's admin token (same as `tokens["admin"]`).
    pub token: String,
    /// One token per role of the agent's local API (`reader`, `scanner`, `order-entry`,
    /// `admin`), role → token. The site's config holds only their SHA-256 hashes.
    #[serde(default)]
    pub tokens: std::collections::BTreeMap<String, String>,
    pub command: Vec<String>,
    pub data_dir: String,
}
