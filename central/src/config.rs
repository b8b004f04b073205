//! Central's configuration: a TOML file plus `OUTPOST_*` environment overrides, validated as a
//! whole so that every problem is reported at once. Reads files; no sockets.

pub use outpost_protocol::secret::{
    MAX_CLIENT_NAME_LEN, MAX_TOKEN_LEN, MIN_TOKEN_LEN, parse_sha256_hex, sha256_hex,
    valid_client_name,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use outpost_protocol::config_reference::{self, EnvNaming};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default request body limit of the central API: a 10,000-item master-data upsert of a few
/// hundred bytes per item fits, a runaway client does not.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
/// Largest configurable body limit: beyond this one request could pin a large share of memory.
pub const MAX_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Default QUIC idle timeout: an outage is noticed within this.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 3_000;
/// Default QUIC keep-alive interval; must stay below the idle timeout.
pub const DEFAULT_KEEP_ALIVE_MS: u64 = 1_000;
/// Shortest sensible idle timeout: below this a loaded link flaps.
pub const MIN_IDLE_TIMEOUT_MS: u64 = 100;
/// Longest idle timeout: a dead peer must not hold a session slot for longer.
pub const MAX_IDLE_TIMEOUT_MS: u64 = 600_000;
/// Most API clients: each request hashes once and compares against every client.
pub const MAX_API_CLIENTS: usize = 256;
/// Default and bounds of `quic.max_connections`: a few hundred sites per central, with room for
/// reconnect overlap; each connection may hold up to its receive window in memory.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const MAX_MAX_CONNECTIONS: usize = 65_536;
/// Default of `quic.max_incoming`: handshakes quinn queues before central accepts or refuses
/// them; a flood of Initials is cut here.
pub const DEFAULT_MAX_INCOMING: usize = 256;
pub const MAX_MAX_INCOMING: usize = 65_536;
/// Default of `quic.incoming_buffer_bytes`: handshake data buffered per not-yet-accepted
/// connection (a few Initial packets).
pub const DEFAULT_INCOMING_BUFFER_BYTES: u64 = 64 * 1024;
/// Smallest per-connection incoming buffer: one full-size Initial datagram.
pub const MIN_INCOMING_BUFFER_BYTES: u64 = 1_200;
/// Default of `quic.incoming_buffer_total_bytes`: handshake data buffered for all
/// not-yet-accepted connections together.
pub const DEFAULT_INCOMING_BUFFER_TOTAL_BYTES: u64 = 16 * 1024 * 1024;
/// Largest incoming buffers (per connection, in total): beyond this a flood pins real memory.
pub const MAX_INCOMING_BUFFER_BYTES: u64 = 16 * 1024 * 1024;
pub const MAX_INCOMING_BUFFER_TOTAL_BYTES: u64 = 1024 * 1024 * 1024;
/// Default of `quic.max_bidi_streams`: the sync protocol uses one bidirectional stream per
/// connection (a reconnect is a new connection).
pub const DEFAULT_MAX_BIDI_STREAMS: u32 = 1;
pub const MAX_MAX_BIDI_STREAMS: u32 = 16;
/// Default of `quic.stream_receive_window_bytes`: two full frames (`MAX_FRAME_BYTES`) in flight.
pub const DEFAULT_STREAM_RECEIVE_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Default of `quic.receive_window_bytes` (all streams of a connection together).
pub const DEFAULT_RECEIVE_WINDOW_BYTES: u64 = 16 * 1024 * 1024;
/// Bounds of the receive windows: below 64 KiB uploads crawl; above 256 MiB one connection
/// could pin a large share of memory.
pub const MIN_RECEIVE_WINDOW_BYTES: u64 = 64 * 1024;
pub const MAX_RECEIVE_WINDOW_BYTES: u64 = 256 * 1024 * 1024;
/// Default of `quic.max_handshakes_per_ip`: handshakes in flight from one source address; a
/// site needs one, a NAT with many sites a few.
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 16;
/// Default of `quic.memory_limit_mib`: above this resident size central refuses new
/// connections (live sessions continue) until it is back under.
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 256;
/// Bounds of `quic.memory_limit_mib`: central itself needs some tens of MiB.
pub const MIN_MEMORY_LIMIT_MIB: u64 = 32;
pub const MAX_MEMORY_LIMIT_MIB: u64 = 1024 * 1024;
/// Prefix of environment variables that override config keys (`OUTPOST_API__LISTEN`).
pub const ENV_PREFIX: &str = "OUTPOST";
/// Separator of nested keys in environment variable names.
pub const ENV_SEPARATOR: &str = "__";
/// Default interval of the periodic allowance check (silent sites, missed top-ups).
pub const DEFAULT_RECLAIM_CHECK_SECS: u64 = 60;
/// Longest periodic check interval: a silent site is noticed within an hour of its deadline.
pub const MAX_RECLAIM_CHECK_SECS: u64 = 3_600;
/// Longest configurable silence before a reclaim: a year (beyond that, reclaim by hand).
pub const MAX_RECLAIM_SILENT_SECS: u64 = 365 * 86_400;

// The doc comments of this struct, the section structs and their fields are the configuration
// reference (`outpost-central config-reference`, deploy/CONFIG.md): each says what the key
// means, in which unit, and what `validate` accepts; fixed bounds go in
// `#[schemars(range(...))]` with the constants `validate` uses (the tests probe one past each).
// See `reference_markdown`.

/// The top level of the file. `[api]` and `[quic]` are required, `[allowance]`, `[health]`
/// and `[log]` optional; relative paths are resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    /// Directory of central's store (`central.redb`), `ready.json` and `backups/`; created at
    /// start if missing, refused if it is an existing file.
    #[schemars(example = "/var/lib/outpost-central")]
    pub data_dir: PathBuf,
    pub api: ApiConfig,
    pub quic: QuicConfig,
    #[serde(default)]
    pub allowance: AllowanceConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub renewal: RenewalConfig,
}

/// `[log]`: how log lines are written to stderr (the filter comes from `RUST_LOG`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people; `json` for log shippers: one object per line, event fields such as
    /// `trace_id`, `site`, `seq` at the top level, span fields under `span`/`spans`;
    /// `--log-json` forces JSON. Each ingested event is logged with its `trace_id` at debug
    /// (`RUST_LOG=info,outpost_central=debug`), exceptions and dead letters at info.
    pub format: LogFormat,
}

/// `[log] format`: `text` for people, `json` (one object per line, span fields such as
/// `trace_id` included) for log shippers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Default of `health.offline_after_secs`: three missed heartbeats at the agent's default
/// interval (5 s).
pub const DEFAULT_OFFLINE_AFTER_SECS: u64 = 15;
/// Default of `health.backlog_age_secs`: five minutes of unsynced data is worth a look.
pub const DEFAULT_BACKLOG_AGE_SECS: u64 = 300;
/// Default of `health.disk_free_min_pct`.
pub const DEFAULT_DISK_FREE_MIN_PCT: u64 = 10;
/// Default of `health.clock_offset_max_ms`: a minute off makes logs and `site_time` misleading.
pub const DEFAULT_CLOCK_OFFSET_MAX_MS: u64 = 60_000;
/// Default of `health.master_lag_max_secs`.
pub const DEFAULT_MASTER_LAG_MAX_SECS: u64 = 300;
/// Default of `health.outbox_events_max`: a day of a busy site's events.
pub const DEFAULT_OUTBOX_EVENTS_MAX: u64 = 100_000;
/// Most alert webhooks: each alert is POSTed to every one.
pub const MAX_WEBHOOKS: usize = 16;
/// Longest accepted duration thresholds: a week.
pub const MAX_HEALTH_SECS: u64 = 7 * 86_400;

/// `[health]`: when a site counts as degraded or offline, and where alerts are POSTed. Central
/// derives each site's state every second from its heartbeats (`[health] heartbeat_secs` in
/// the agent's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// A site not heard from this long (no heartbeat, no frame) is `offline`.
    #[schemars(range(min = 1, max = MAX_HEALTH_SECS))]
    pub offline_after_secs: u64,
    /// `degraded` (`backlog_too_old`) when a site's oldest unsynced event is this old.
    #[schemars(range(min = 1, max = MAX_HEALTH_SECS))]
    pub backlog_age_secs: u64,
    /// `degraded` (`disk_nearly_full`) when the filesystem of a site's store has less free
    /// space than this.
    #[schemars(range(min = 0, max = 100))]
    pub disk_free_min_pct: u64,
    /// `degraded` (`clock_offset_too_large`) when a site's clock is further off central's than
    /// this.
    #[schemars(range(min = 1, max = MAX_HEALTH_SECS * 1_000))]
    pub clock_offset_max_ms: u64,
    /// `degraded` (`master_lag_too_large`) when a site has been behind central's master
    /// revision this long.
    #[schemars(range(min = 1, max = MAX_HEALTH_SECS))]
    pub master_lag_max_secs: u64,
    /// `degraded` (`outbox_near_limit`) when a site's outbox holds this many events.
    #[schemars(extend("x-unit" = "events"), range(min = 1))]
    pub outbox_events_max: u64,
    /// `http://` or `https://` URLs that receive each alert as a JSON POST (5 s timeout, 4
    /// attempts with jittered backoff from 500 ms, a queue of 256 alerts that drops the oldest
    /// with a warning); at most 16.
    pub webhooks: Vec<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            offline_after_secs: DEFAULT_OFFLINE_AFTER_SECS,
            backlog_age_secs: DEFAULT_BACKLOG_AGE_SECS,
            disk_free_min_pct: DEFAULT_DISK_FREE_MIN_PCT,
            clock_offset_max_ms: DEFAULT_CLOCK_OFFSET_MAX_MS,
            master_lag_max_secs: DEFAULT_MASTER_LAG_MAX_SECS,
            outbox_events_max: DEFAULT_OUTBOX_EVENTS_MAX,
            webhooks: Vec::new(),
        }
    }
}

impl HealthConfig {
    /// The thresholds the derivation uses (validated: every product fits an i64).
    pub fn thresholds(&self) -> crate::health::Thresholds {
        let ms = |secs: u64| i64::try_from(secs.saturating_mul(1_000)).unwrap_or(i64::MAX);
        crate::health::Thresholds {
            offline_after_ms: ms(self.offline_after_secs),
            backlog_age_ms: ms(self.backlog_age_secs),
            disk_free_min_pct: self.disk_free_min_pct,
            clock_offset_max_ms: i64::try_from(self.clock_offset_max_ms).unwrap_or(i64::MAX),
            master_lag_max_ms: ms(self.master_lag_max_secs),
            outbox_events_max: self.outbox_events_max,
        }
    }

    fn validate(&self, problems: &mut Vec<String>) {
        for (key, v) in [
            ("health.offline_after_secs", self.offline_after_secs),
            ("health.backlog_age_secs", self.backlog_age_secs),
            ("health.master_lag_max_secs", self.master_lag_max_secs),
        ] {
            if !(1..=MAX_HEALTH_SECS).contains(&v) {
                problems.push(format!("{key}: must be 1..={MAX_HEALTH_SECS}, got {v}"));
            }
        }
        if self.disk_free_min_pct > 100 {
            problems.push(format!(
                "health.disk_free_min_pct: must be 0..=100, got {}",
                self.disk_free_min_pct
            ));
        }
        if !(1..=MAX_HEALTH_SECS * 1_000).contains(&self.clock_offset_max_ms) {
            problems.push(format!(
                "health.clock_offset_max_ms: must be 1..={}, got {}",
                MAX_HEALTH_SECS * 1_000,
                self.clock_offset_max_ms
            ));
        }
        if self.outbox_events_max == 0 {
            problems.push("health.outbox_events_max: must be at least 1".to_string());
        }
        if self.webhooks.len() > MAX_WEBHOOKS {
            problems.push(format!(
                "health.webhooks: at most {MAX_WEBHOOKS} URLs, got {}",
                self.webhooks.len()
            ));
        }
        for (i, url) in self.webhooks.iter().enumerate() {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => problems.push(format!(
                    "health.webhooks[{i}]: must be an http:// or https:// URL, got {url:?}"
                )),
            }
        }
    }
}

/// `[allowance]`: how much of each SKU's ATP and each customer's credit central escrows at
/// each site, so that the site can confirm orders on its own.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowanceConfig {
    /// ATP each site is topped up to, per SKU (within what the ERP figure leaves free).
    #[serde(default = "default_atp_target")]
    #[schemars(extend("x-unit" = "units"), range(min = 0, max = outpost_protocol::MAX_QTY))]
    pub atp_target: i64,
    /// Share of each customer's credit limit each site is topped up to.
    #[serde(default = "default_credit_target_fraction")]
    #[schemars(extend("x-unit" = "fraction"), range(min = 0.0, max = 1.0))]
    pub credit_target_fraction: f64,
    /// A site silent for longer than this is asked to return all its allowance. Must be above
    /// `allowance.reclaim_check_secs`: a connected site is marked as heard from at each check.
    #[serde(default = "default_reclaim_silent_secs")]
    #[schemars(range(min = 2, max = MAX_RECLAIM_SILENT_SECS))]
    pub reclaim_silent_secs: u64,
    /// How often central looks for silent sites and missed top-ups.
    #[serde(default = "default_reclaim_check_secs")]
    #[schemars(range(min = 1, max = MAX_RECLAIM_CHECK_SECS))]
    pub reclaim_check_secs: u64,
}

impl Default for AllowanceConfig {
    fn default() -> Self {
        AllowanceConfig {
            atp_target: default_atp_target(),
            credit_target_fraction: default_credit_target_fraction(),
            reclaim_silent_secs: default_reclaim_silent_secs(),
            reclaim_check_secs: default_reclaim_check_secs(),
        }
    }
}

impl AllowanceConfig {
    /// The policy the store applies.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            targets: crate::ledger::Targets {
                atp_units: self.atp_target,
                credit_fraction: self.credit_target_fraction,
            },
            reclaim_silent_secs: self.reclaim_silent_secs,
        }
    }
}

/// `[api]`: the HTTP API of the ERP integration, operators and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the HTTP API listens on, `ip:port`; port 0 picks an ephemeral port (the real one
    /// is in `ready.json`).
    #[schemars(example = "0.0.0.0:7600")]
    pub listen: String,
    /// The API's clients, one `[[api.tokens]]` table each, at least one and at most 256; central
    /// keeps only the SHA-256 of each token. File only: an array of tables cannot be written as
    /// an `OUTPOST_*` variable.
    #[serde(default)]
    #[schemars(extend("x-required" = true))]
    pub tokens: Vec<ApiClient>,
    /// Removed: the single plain-text token. Still read so that `check-config` refuses an old
    /// config with instructions (hash the token with `outpost-central hash-token` and list it
    /// as an `[[api.tokens]]` table) instead of "unknown field"; never used.
    #[serde(default, skip_serializing)]
    #[schemars(extend("deprecated" = true))]
    pub token: Option<Redacted>,
    /// Largest request body accepted: a 10,000-item master-data upsert of a few hundred bytes
    /// per item fits the default.
    #[serde(default = "default_max_body_bytes")]
    #[schemars(range(min = 1, max = MAX_MAX_BODY_BYTES))]
    pub max_body_bytes: u64,
}

/// What an API client may do: `admin` everything, `erp` the ERP integration's routes (master
/// data, the event feed, orders, reads of exceptions and sites, health).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Erp,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Erp => "erp",
            Role::Admin => "admin",
        }
    }

    /// Whether a client with this role may use a route that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        matches!((self, needed), (Role::Admin, _) | (Role::Erp, Role::Erp))
    }
}

/// `[[api.tokens]]`: one client of central's API, by name, role and the SHA-256 of its bearer
/// token. `outpost-central hash-token --generate [--name N --role erp|admin]` makes a new token
/// and prints its table; `echo -n TOKEN | outpost-central hash-token` hashes an existing one.
/// Its `Debug` output never shows the hash.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    /// 1..=64 characters of `[A-Za-z0-9._-]`, unique; logs name the client, never the token.
    #[schemars(example = &"erp")]
    pub name: String,
    /// What the client may do: `erp` the ERP integration's routes (master data, the event
    /// feed, orders, reads of exceptions and sites, health); `admin` every route. A route the
    /// role does not allow gets 403 `forbidden` before the body is read.
    #[schemars(example = Role::Erp)]
    pub role: Role,
    /// 64 lower-case hex digits: the SHA-256 of the bearer token (`outpost-central
    /// hash-token`); each client needs its own token. Never shown in logs or `Debug` output.
    #[serde(skip_serializing)]
    #[schemars(
        extend("x-secret" = true),
        example = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
    )]
    pub sha256: Redacted,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// The hash as bytes; `None` unless it is 64 lower-case hex digits (`validate` reports that).
    pub fn hash_bytes(&self) -> Option<[u8; 32]> {
        parse_sha256_hex(self.sha256.expose())
    }
}

/// A secret-ish string (a token hash, or a removed plain token) that `Debug` never prints.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Redacted(String);

impl Redacted {
    pub fn new(s: impl Into<String>) -> Self {
        Redacted(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `[quic]`: the QUIC sync server the agents connect to, with mutual TLS, and its limits.
/// Refused connections are counted in `outpost_central_quic_connections_refused_total`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    /// Address (UDP) the sync server listens on, `ip:port`; port 0 picks an ephemeral port (the
    /// real one is in `ready.json`).
    #[schemars(example = "0.0.0.0:7601")]
    pub listen: String,
    /// The fleet CA (PEM): agents must present a certificate signed by it.
    #[schemars(example = "/etc/outpost/ca.pem")]
    pub ca_cert: PathBuf,
    /// Central's server certificate chain (PEM), from `outpost-central certs central`.
    #[schemars(example = "/etc/outpost/central.pem")]
    pub cert: PathBuf,
    /// The private key of `quic.cert` (PEM; keep it readable by central only).
    #[schemars(example = "/etc/outpost/central.key")]
    pub key: PathBuf,
    /// QUIC idle timeout: a connection silent this long is closed, so a dead link is noticed
    /// within it.
    #[serde(default = "default_idle_timeout_ms")]
    #[schemars(range(min = MIN_IDLE_TIMEOUT_MS, max = MAX_IDLE_TIMEOUT_MS))]
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive interval; must be below `quic.idle_timeout_ms`.
    #[serde(default = "default_keep_alive_ms")]
    #[schemars(range(min = 1, max = MAX_IDLE_TIMEOUT_MS - 1))]
    pub keep_alive_ms: u64,
    /// Most live agent connections; more are refused at the handshake.
    #[serde(default = "default_max_connections")]
    #[schemars(extend("x-unit" = "connections"), range(min = 1, max = MAX_MAX_CONNECTIONS))]
    pub max_connections: usize,
    /// Handshakes quinn queues before central accepts or refuses them
    /// (`ServerConfig::max_incoming`); a flood of Initials is cut here.
    #[serde(default = "default_max_incoming")]
    #[schemars(extend("x-unit" = "handshakes"), range(min = 1, max = MAX_MAX_INCOMING))]
    pub max_incoming: usize,
    /// Handshake bytes buffered per not-yet-accepted connection (a few Initial packets).
    #[serde(default = "default_incoming_buffer_bytes")]
    #[schemars(range(min = MIN_INCOMING_BUFFER_BYTES, max = MAX_INCOMING_BUFFER_BYTES))]
    pub incoming_buffer_bytes: u64,
    /// Handshake bytes buffered for all not-yet-accepted connections together; at least
    /// `quic.incoming_buffer_bytes`.
    #[serde(default = "default_incoming_buffer_total_bytes")]
    #[schemars(range(min = MIN_INCOMING_BUFFER_BYTES, max = MAX_INCOMING_BUFFER_TOTAL_BYTES))]
    pub incoming_buffer_total_bytes: u64,
    /// Bidirectional streams an agent may have open at once (the protocol uses one per
    /// connection). Unidirectional streams and datagrams are always refused.
    #[serde(default = "default_max_bidi_streams")]
    #[schemars(extend("x-unit" = "streams"), range(min = 1, max = MAX_MAX_BIDI_STREAMS))]
    pub max_bidi_streams: u32,
    /// Bytes an agent may send on its stream ahead of central reading them (two full frames
    /// by default).
    #[serde(default = "default_stream_receive_window_bytes")]
    #[schemars(range(min = MIN_RECEIVE_WINDOW_BYTES, max = MAX_RECEIVE_WINDOW_BYTES))]
    pub stream_receive_window_bytes: u64,
    /// Bytes an agent may send on a connection (all its streams) ahead of central reading
    /// them; at least `quic.stream_receive_window_bytes`.
    #[serde(default = "default_receive_window_bytes")]
    #[schemars(range(min = MIN_RECEIVE_WINDOW_BYTES, max = MAX_RECEIVE_WINDOW_BYTES))]
    pub receive_window_bytes: u64,
    /// Handshakes in flight from one source IP address; more are refused. At most
    /// `quic.max_incoming`; a site needs one, a NAT with many sites a few.
    #[serde(default = "default_max_handshakes_per_ip")]
    #[schemars(extend("x-unit" = "handshakes"), range(min = 1, max = MAX_MAX_INCOMING))]
    pub max_handshakes_per_ip: usize,
    /// Central samples its own resident memory every 500 ms; above this it refuses new
    /// connections (with a rate-limited warning) while live sessions go on.
    #[serde(default = "default_memory_limit_mib")]
    #[schemars(range(min = MIN_MEMORY_LIMIT_MIB, max = MAX_MEMORY_LIMIT_MIB))]
    pub memory_limit_mib: u64,
    /// Newest sync protocol version central offers agents in the TLS handshake (ALPN). This
    /// build speaks its own version and the one before; leave it at the default unless a fleet
    /// must stay on the previous version while central is upgraded. Agents settle on the newest
    /// version both sides offer.
    #[serde(default = "default_protocol_version_max")]
    #[schemars(
        extend("x-unit" = "version"),
        range(
            min = outpost_protocol::MIN_PROTOCOL_VERSION,
            max = outpost_protocol::PROTOCOL_VERSION
        )
    )]
    pub protocol_version_max: u16,
}

fn default_protocol_version_max() -> u16 {
    outpost_protocol::PROTOCOL_VERSION
}

/// Default of `renewal.site_validity_days`.
pub const DEFAULT_SITE_VALIDITY_DAYS: u64 = crate::certs::LEAF_VALIDITY_DAYS as u64;
/// Most days a renewed site certificate is valid: ten years, the CA's own lifetime.
pub const MAX_SITE_VALIDITY_DAYS: u64 = crate::certs::CA_VALIDITY_DAYS as u64;
/// Default of `renewal.min_interval_secs`: an hour between two certificates for one site.
pub const DEFAULT_RENEWAL_MIN_INTERVAL_SECS: u64 = 3_600;
pub const MAX_RENEWAL_MIN_INTERVAL_SECS: u64 = 30 * 86_400;

/// `[renewal]`: site certificates renewed over the sync connection. A site generates a new key
/// when its certificate nears expiry (`[sync] renew_before_days` at the agent) and sends a
/// signing request; central signs a certificate for the site named by the session's verified
/// certificate. Counted in `outpost_central_certificates_renewed_total` and
/// `outpost_central_certificate_renewals_refused_total`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewalConfig {
    /// Directory holding the fleet CA's `ca.pem` and `ca.key` (`outpost-central certs ca`),
    /// readable by central. Not set: renewal requests are refused with that reason, and sites
    /// must be re-enrolled (`outpost-central sites add`) before their certificates expire.
    /// Keep the directory readable by central's user only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = "/etc/outpost/central/ca")]
    pub ca_dir: Option<PathBuf>,
    /// How long a renewed site certificate is valid (from one day before it is signed).
    #[serde(default = "default_site_validity_days")]
    #[schemars(extend("x-unit" = "days"), range(min = 1, max = MAX_SITE_VALIDITY_DAYS))]
    pub site_validity_days: u64,
    /// Least time between two certificates signed for one site; requests sooner are refused
    /// (the agent asks again later). Bounds what a site with a stolen key could do.
    #[serde(default = "default_renewal_min_interval_secs")]
    #[schemars(range(min = 0, max = MAX_RENEWAL_MIN_INTERVAL_SECS))]
    pub min_interval_secs: u64,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        RenewalConfig {
            ca_dir: None,
            site_validity_days: DEFAULT_SITE_VALIDITY_DAYS,
            min_interval_secs: DEFAULT_RENEWAL_MIN_INTERVAL_SECS,
        }
    }
}

fn default_site_validity_days() -> u64 {
    DEFAULT_SITE_VALIDITY_DAYS
}
fn default_renewal_min_interval_secs() -> u64 {
    DEFAULT_RENEWAL_MIN_INTERVAL_SECS
}

fn default_atp_target() -> i64 {
    crate::store::DEFAULT_ATP_TARGET
}
fn default_credit_target_fraction() -> f64 {
    crate::store::DEFAULT_CREDIT_TARGET_FRACTION
}
fn default_reclaim_silent_secs() -> u64 {
    crate::store::DEFAULT_RECLAIM_SILENT_SECS
}
fn default_reclaim_check_secs() -> u64 {
    DEFAULT_RECLAIM_CHECK_SECS
}
fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}
fn default_idle_timeout_ms() -> u64 {
    DEFAULT_IDLE_TIMEOUT_MS
}
fn default_keep_alive_ms() -> u64 {
    DEFAULT_KEEP_ALIVE_MS
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_incoming() -> usize {
    DEFAULT_MAX_INCOMING
}
fn default_incoming_buffer_bytes() -> u64 {
    DEFAULT_INCOMING_BUFFER_BYTES
}
fn default_incoming_buffer_total_bytes() -> u64 {
    DEFAULT_INCOMING_BUFFER_TOTAL_BYTES
}
fn default_max_bidi_streams() -> u32 {
    DEFAULT_MAX_BIDI_STREAMS
}
fn default_stream_receive_window_bytes() -> u64 {
    DEFAULT_STREAM_RECEIVE_WINDOW_BYTES
}
fn default_receive_window_bytes() -> u64 {
    DEFAULT_RECEIVE_WINDOW_BYTES
}
fn default_max_handshakes_per_ip() -> usize {
    DEFAULT_MAX_HANDSHAKES_PER_IP
}
fn default_memory_limit_mib() -> u64 {
    DEFAULT_MEMORY_LIMIT_MIB
}

impl QuicConfig {
    /// A config with the given addresses and files and every limit at its default.
    pub fn with_defaults(listen: &str, ca_cert: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        QuicConfig {
            listen: listen.to_string(),
            ca_cert,
            cert,
            key,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            keep_alive_ms: DEFAULT_KEEP_ALIVE_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_incoming: DEFAULT_MAX_INCOMING,
            incoming_buffer_bytes: DEFAULT_INCOMING_BUFFER_BYTES,
            incoming_buffer_total_bytes: DEFAULT_INCOMING_BUFFER_TOTAL_BYTES,
            max_bidi_streams: DEFAULT_MAX_BIDI_STREAMS,
            stream_receive_window_bytes: DEFAULT_STREAM_RECEIVE_WINDOW_BYTES,
            receive_window_bytes: DEFAULT_RECEIVE_WINDOW_BYTES,
            max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP,
            memory_limit_mib: DEFAULT_MEMORY_LIMIT_MIB,
            protocol_version_max: outpost_protocol::PROTOCOL_VERSION,
        }
    }

    /// The limits' problems, each naming its key.
    fn validate_limits(&self, problems: &mut Vec<String>) {
        let mut range = |key: &str, v: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&v) {
                problems.push(format!("quic.{key}: must be {lo}..={hi}, got {v}"));
            }
        };
        range(
            "max_connections",
            self.max_connections as u64,
            1,
            MAX_MAX_CONNECTIONS as u64,
        );
        range(
            "max_incoming",
            self.max_incoming as u64,
            1,
            MAX_MAX_INCOMING as u64,
        );
        range(
            "incoming_buffer_bytes",
            self.incoming_buffer_bytes,
            MIN_INCOMING_BUFFER_BYTES,
            MAX_INCOMING_BUFFER_BYTES,
        );
        range(
            "incoming_buffer_total_bytes",
            self.incoming_buffer_total_bytes,
            self.incoming_buffer_bytes,
            MAX_INCOMING_BUFFER_TOTAL_BYTES,
        );
        range(
            "max_bidi_streams",
            u64::from(self.max_bidi_streams),
            1,
            u64::from(MAX_MAX_BIDI_STREAMS),
        );
        range(
            "stream_receive_window_bytes",
            self.stream_receive_window_bytes,
            MIN_RECEIVE_WINDOW_BYTES,
            MAX_RECEIVE_WINDOW_BYTES,
        );
        range(
            "receive_window_bytes",
            self.receive_window_bytes,
            self.stream_receive_window_bytes,
            MAX_RECEIVE_WINDOW_BYTES,
        );
        range(
            "max_handshakes_per_ip",
            self.max_handshakes_per_ip as u64,
            1,
            self.max_incoming as u64,
        );
        range(
            "memory_limit_mib",
            self.memory_limit_mib,
            MIN_MEMORY_LIMIT_MIB,
            MAX_MEMORY_LIMIT_MIB,
        );
        range(
            "protocol_version_max",
            u64::from(self.protocol_version_max),
            u64::from(outpost_protocol::MIN_PROTOCOL_VERSION),
            u64::from(outpost_protocol::PROTOCOL_VERSION),
        );
    }
}

/// How `load` names environment overrides: `OUTPOST_QUIC__IDLE_TIMEOUT_MS`.
pub const ENV_NAMING: EnvNaming<'static> = EnvNaming {
    prefix: ENV_PREFIX,
    separator: ENV_SEPARATOR,
};

/// The configuration reference of central's config file, as Markdown, generated from
/// `CentralConfig`'s doc comments, defaults and ranges: `outpost-central config-reference`
/// prints it, and deploy/CONFIG.md holds it (tests/tests/config_reference.rs keeps the two
/// equal).
pub fn reference_markdown() -> String {
    let schema = schemars::schema_for!(CentralConfig);
    config_reference::render(
        "outpost-central: `central.toml`",
        "Central's config, given as `outpost-central serve --config FILE`; `outpost-central \
         check-config --config FILE` names every problem by its key and also loads the TLS \
         files. Any key but an array can be overridden by the environment variable shown \
         (`OUTPOST_`, then the key's path in upper case with `__` between a section and its \
         key); an unknown `OUTPOST_*` variable is refused as an unknown key.",
        schema.as_value(),
        ENV_NAMING,
    )
}

#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error("config {path} is invalid:\n  {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl CentralConfig {
    /// Reads `path`, applies the process environment's `OUTPOST_*` overrides, resolves relative
    /// paths against the file's directory and validates the result.
    pub fn load(path: &Path) -> Result<CentralConfig, LoadConfigError> {
        Self::load_with_env(path, None)
    }

    /// As `load`, with the environment given explicitly (`None`: the process environment). Tests
    /// use this because edition 2024 makes `set_var` unsafe.
    pub fn load_with_env(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<CentralConfig, LoadConfigError> {
        let read_err = |source| LoadConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator(ENV_SEPARATOR)
            .source(env);
        let mut cfg: CentralConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(env)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(read_err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(LoadConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Makes every relative path absolute against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.quic.ca_cert,
            &mut self.quic.cert,
            &mut self.quic.key,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = &mut self.renewal.ca_dir
            && p.is_relative()
            && !p.as_os_str().is_empty()
        {
            *p = base.join(&*p);
        }
    }

    /// Every problem with the configuration, each naming its key. Empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.data_dir.as_os_str().is_empty() {
            problems.push("data_dir: must not be empty".to_string());
        } else if self.data_dir.exists() && !self.data_dir.is_dir() {
            problems.push(format!(
                "data_dir: {} exists and is not a directory",
                self.data_dir.display()
            ));
        }
        check_addr(&mut problems, "api.listen", &self.api.listen);
        if self.api.token.is_some() {
            problems.push(
                "api.token: a plain-text token is no longer accepted; hash it with \
                 `outpost-central hash-token` (or make a new one with `hash-token --generate`) \
                 and list it as [[api.tokens]] with name, role (erp or admin) and sha256"
                    .to_string(),
            );
        }
        self.validate_clients(&mut problems);
        if !(1..=MAX_MAX_BODY_BYTES).contains(&self.api.max_body_bytes) {
            problems.push(format!(
                "api.max_body_bytes: must be 1..={MAX_MAX_BODY_BYTES}, got {}",
                self.api.max_body_bytes
            ));
        }
        check_addr(&mut problems, "quic.listen", &self.quic.listen);
        for (key, p) in [
            ("quic.ca_cert", &self.quic.ca_cert),
            ("quic.cert", &self.quic.cert),
            ("quic.key", &self.quic.key),
        ] {
            if !p.is_file() {
                problems.push(format!("{key}: file not found: {}", p.display()));
            }
        }
        let idle = self.quic.idle_timeout_ms;
        if !(MIN_IDLE_TIMEOUT_MS..=MAX_IDLE_TIMEOUT_MS).contains(&idle) {
            problems.push(format!(
                "quic.idle_timeout_ms: must be {MIN_IDLE_TIMEOUT_MS}..={MAX_IDLE_TIMEOUT_MS}, got {idle}"
            ));
        }
        let ka = self.quic.keep_alive_ms;
        if ka == 0 || ka >= idle {
            problems.push(format!(
                "quic.keep_alive_ms: must be 1..{idle} (below quic.idle_timeout_ms), got {ka}"
            ));
        }
        self.quic.validate_limits(&mut problems);
        let a = &self.allowance;
        if !(0..=outpost_protocol::MAX_QTY).contains(&a.atp_target) {
            problems.push(format!(
                "allowance.atp_target: must be 0..={}, got {}",
                outpost_protocol::MAX_QTY,
                a.atp_target
            ));
        }
        if !(a.credit_target_fraction.is_finite()
            && (0.0..=1.0).contains(&a.credit_target_fraction))
        {
            problems.push(format!(
                "allowance.credit_target_fraction: must be 0.0..=1.0, got {}",
                a.credit_target_fraction
            ));
        }
        if !(1..=MAX_RECLAIM_CHECK_SECS).contains(&a.reclaim_check_secs) {
            problems.push(format!(
                "allowance.reclaim_check_secs: must be 1..={MAX_RECLAIM_CHECK_SECS}, got {}",
                a.reclaim_check_secs
            ));
        }
        // A connected site is marked as heard from at each check; a silence shorter than the
        // check interval would reclaim from sites that are connected and idle.
        if a.reclaim_silent_secs <= a.reclaim_check_secs
            || a.reclaim_silent_secs > MAX_RECLAIM_SILENT_SECS
        {
            problems.push(format!(
                "allowance.reclaim_silent_secs: must be above allowance.reclaim_check_secs ({}) and at most {MAX_RECLAIM_SILENT_SECS}, got {}",
                a.reclaim_check_secs, a.reclaim_silent_secs
            ));
        }
        self.health.validate(&mut problems);
        let r = &self.renewal;
        if !(1..=MAX_SITE_VALIDITY_DAYS).contains(&r.site_validity_days) {
            problems.push(format!(
                "renewal.site_validity_days: must be 1..={MAX_SITE_VALIDITY_DAYS}, got {}",
                r.site_validity_days
            ));
        }
        if r.min_interval_secs > MAX_RENEWAL_MIN_INTERVAL_SECS {
            problems.push(format!(
                "renewal.min_interval_secs: must be 0..={MAX_RENEWAL_MIN_INTERVAL_SECS}, got {}",
                r.min_interval_secs
            ));
        }
        if let Some(dir) = &r.ca_dir {
            for f in [crate::certs::CA_CERT_FILE, crate::certs::CA_KEY_FILE] {
                if !dir.join(f).is_file() {
                    problems.push(format!(
                        "renewal.ca_dir: file not found: {}",
                        dir.join(f).display()
                    ));
                }
            }
        }
        problems
    }

    fn validate_clients(&self, problems: &mut Vec<String>) {
        let clients = &self.api.tokens;
        if clients.is_empty() && self.api.token.is_none() {
            problems.push(
                "api.tokens: at least one client is required ([[api.tokens]] with name, role \
                 and sha256; see `outpost-central hash-token --generate`)"
                    .to_string(),
            );
        }
        if clients.len() > MAX_API_CLIENTS {
            problems.push(format!(
                "api.tokens: at most {MAX_API_CLIENTS} clients, got {}",
                clients.len()
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, c) in clients.iter().enumerate() {
            if !valid_client_name(&c.name) {
                problems.push(format!(
                    "api.tokens[{i}].name: must be 1..={MAX_CLIENT_NAME_LEN} characters of \
                     [A-Za-z0-9._-], got {:?}",
                    c.name.chars().take(80).collect::<String>()
                ));
            } else if !names.insert(c.name.as_str()) {
                problems.push(format!(
                    "api.tokens[{i}].name: {:?} is used by another client",
                    c.name
                ));
            }
            match c.hash_bytes() {
                None => problems.push(format!(
                    "api.tokens[{i}].sha256: must be 64 lower-case hex digits (the SHA-256 of \
                     the token, from `outpost-central hash-token`)"
                )),
                Some(h) => {
                    if !hashes.insert(h) {
                        problems.push(format!(
                            "api.tokens[{i}].sha256: the same token is listed for another client"
                        ));
                    }
                }
            }
        }
    }

    pub fn api_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.api.listen.parse()
    }

    pub fn quic_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.quic.listen.parse()
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("central.redb")
    }

    pub fn ready_path(&self) -> PathBuf {
        self.data_dir.join(crate::paths::READY_FILE)
    }
}

fn check_addr(problems: &mut Vec<String>, key: &str, value: &str) {
    if value.parse::<SocketAddr>().is_err() {
        problems.push(format!(
            "{key}: invalid socket address {:?} (expected ip:port)",
            value.chars().take(80).collect::<String>()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pems(dir: &Path) {
        for f in ["ca.pem", "central.pem", "central.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
    }

    const VALID: &str = r#"
data_dir = "data"

[api]
listen = "127.0.0.1:7600"

[[api.tokens]]
name = "erp"
role = "erp"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

[[api.tokens]]
name = "ops.admin-1"
role = "admin"
sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"

[quic]
listen = "127.0.0.1:7601"
ca_cert = "ca.pem"
cert = "central.pem"
key = "central.key"
"#;

    #[test]
    fn valid_config_parses_with_defaults_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(&path, VALID).unwrap();
        let cfg = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap();
        assert_eq!(cfg.data_dir, dir.path().join("data"));
        assert_eq!(cfg.quic.ca_cert, dir.path().join("ca.pem"));
        assert_eq!(cfg.api.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(cfg.quic.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS);
        assert_eq!(cfg.api_addr().unwrap().port(), 7600);
        assert_eq!(cfg.allowance, AllowanceConfig::default());
        assert_eq!(cfg.allowance.atp_target, 20);
        assert_eq!(cfg.allowance.credit_target_fraction, 0.2);
        assert_eq!(cfg.allowance.reclaim_silent_secs, 86_400);
        assert_eq!(
            cfg.quic,
            QuicConfig::with_defaults(
                "127.0.0.1:7601",
                dir.path().join("ca.pem"),
                dir.path().join("central.pem"),
                dir.path().join("central.key"),
            )
        );
        assert_eq!(cfg.api.tokens.len(), 2);
        assert_eq!(cfg.api.tokens[0].role, Role::Erp);
        assert_eq!(cfg.api.tokens[1].name, "ops.admin-1");
        assert_eq!(cfg.api.tokens[1].role, Role::Admin);
        assert_eq!(
            cfg.api.tokens[0].hash_bytes(),
            parse_sha256_hex(&sha256_hex("test"))
        );
    }

    #[test]
    fn hashes_never_show_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(&path, VALID).unwrap();
        let cfg = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap();
        let shown = format!("{cfg:?} {cfg:#?}");
        assert!(shown.contains("ops.admin-1"), "names are shown: {shown}");
        for client in &cfg.api.tokens {
            let h = client.sha256.expose();
            assert!(!shown.contains(h), "hash {h} leaked into {shown}");
            assert!(!shown.contains(&h[..16]), "hash prefix leaked into {shown}");
        }
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(!json.contains("9f86d0818"), "{json}");
    }

    #[test]
    fn the_old_plain_token_is_refused_with_instructions() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        let old = VALID.split("[[api.tokens]]").next().unwrap().replace(
            "[api]\n",
            "[api]\ntoken = \"0123456789abcdef0123456789abcdef\"\n",
        );
        std::fs::write(&path, format!("{old}\n[quic]\nlisten = \"127.0.0.1:7601\"\nca_cert = \"ca.pem\"\ncert = \"central.pem\"\nkey = \"central.key\"\n")).unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        let LoadConfigError::Invalid { problems, .. } = err else {
            panic!("expected validation problems, got {err}");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("api.token:"), "{problems:?}");
        assert!(problems[0].contains("hash-token"), "{problems:?}");
        assert!(
            !problems[0].contains("0123456789abcdef"),
            "the token is not echoed: {problems:?}"
        );
    }

    #[test]
    fn api_clients_are_validated_by_index() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        let good = sha256_hex("a-good-token-0123456789");
        std::fs::write(
            &path,
            format!(
                r#"
data_dir = "data"
[api]
listen = "127.0.0.1:7600"
[[api.tokens]]
name = "erp"
role = "erp"
sha256 = "{good}"
[[api.tokens]]
name = "erp"
role = "admin"
sha256 = "{upper}"
[[api.tokens]]
name = "bad name!"
role = "admin"
sha256 = "{good}"
[[api.tokens]]
name = ""
role = "erp"
sha256 = "abc"
[quic]
listen = "127.0.0.1:7601"
ca_cert = "ca.pem"
cert = "central.pem"
key = "central.key"
"#,
                upper = good.to_uppercase()
            ),
        )
        .unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        let LoadConfigError::Invalid { problems, .. } = err else {
            panic!("expected validation problems, got {err}");
        };
        for key in [
            "api.tokens[1].name:",
            "api.tokens[1].sha256:",
            "api.tokens[2].name:",
            "api.tokens[2].sha256:",
            "api.tokens[3].name:",
            "api.tokens[3].sha256:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "no problem reported for {key}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(!problems.iter().any(|p| p.contains(&good)), "{problems:?}");

        // No client at all, and an unknown role.
        std::fs::write(
            &path,
            "data_dir = \"data\"\n[api]\nlisten = \"127.0.0.1:7600\"\n[quic]\nlisten = \"127.0.0.1:7601\"\nca_cert = \"ca.pem\"\ncert = \"central.pem\"\nkey = \"central.key\"\n",
        )
        .unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        assert!(
            err.to_string().contains("api.tokens: at least one"),
            "{err}"
        );
        std::fs::write(&path, VALID.replace("role = \"erp\"", "role = \"root\"")).unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        assert!(matches!(err, LoadConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn roles_allow_what_they_should() {
        assert!(Role::Admin.allows(Role::Admin));
        assert!(Role::Admin.allows(Role::Erp));
        assert!(Role::Erp.allows(Role::Erp));
        assert!(!Role::Erp.allows(Role::Admin));
        assert_eq!(
            sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(parse_sha256_hex(&"A".repeat(64)), None);
        assert_eq!(parse_sha256_hex("00"), None);
        assert_eq!(parse_sha256_hex(&"0f".repeat(32)), Some([0x0f; 32]));
    }

    #[test]
    fn quic_limits_are_read_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(
            &path,
            format!(
                "{VALID}max_connections = 10\nmax_handshakes_per_ip = 2\nmemory_limit_mib = 192\n"
            ),
        )
        .unwrap();
        let cfg = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap();
        assert_eq!(cfg.quic.max_connections, 10);
        assert_eq!(cfg.quic.max_handshakes_per_ip, 2);
        assert_eq!(cfg.quic.memory_limit_mib, 192);
        assert_eq!(cfg.quic.max_bidi_streams, 1);
        let env = HashMap::from([(
            "OUTPOST_QUIC__MEMORY_LIMIT_MIB".to_string(),
            "300".to_string(),
        )]);
        let cfg = CentralConfig::load_with_env(&path, Some(env)).unwrap();
        assert_eq!(cfg.quic.memory_limit_mib, 300);

        std::fs::write(
            &path,
            format!(
                "{VALID}max_connections = 0\nmax_incoming = 4\nincoming_buffer_bytes = 100\n\
                 incoming_buffer_total_bytes = 50\nmax_bidi_streams = 0\n\
                 stream_receive_window_bytes = 1024\nreceive_window_bytes = 512\n\
                 max_handshakes_per_ip = 5\nmemory_limit_mib = 1\n"
            ),
        )
        .unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        let LoadConfigError::Invalid { problems, .. } = err else {
            panic!("expected validation problems, got {err}");
        };
        for key in [
            "quic.max_connections:",
            "quic.incoming_buffer_bytes:",
            "quic.incoming_buffer_total_bytes:",
            "quic.max_bidi_streams:",
            "quic.stream_receive_window_bytes:",
            "quic.receive_window_bytes:",
            "quic.max_handshakes_per_ip:",
            "quic.memory_limit_mib:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "no problem reported for {key}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 8, "{problems:?}");
    }

    #[test]
    fn allowance_section_is_read_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(
            &path,
            format!("{VALID}\n[allowance]\natp_target = 5\ncredit_target_fraction = 0.5\nreclaim_silent_secs = 120\n"),
        )
        .unwrap();
        let cfg = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap();
        assert_eq!(cfg.allowance.atp_target, 5);
        assert_eq!(cfg.allowance.credit_target_fraction, 0.5);
        assert_eq!(cfg.allowance.reclaim_silent_secs, 120);
        assert_eq!(cfg.allowance.reclaim_check_secs, DEFAULT_RECLAIM_CHECK_SECS);
        let env = HashMap::from([(
            "OUTPOST_ALLOWANCE__CREDIT_TARGET_FRACTION".to_string(),
            "0.25".to_string(),
        )]);
        let cfg = CentralConfig::load_with_env(&path, Some(env)).unwrap();
        assert_eq!(cfg.allowance.credit_target_fraction, 0.25);

        std::fs::write(
            &path,
            format!("{VALID}\n[allowance]\natp_target = -1\ncredit_target_fraction = 1.5\nreclaim_silent_secs = 30\nreclaim_check_secs = 0\n"),
        )
        .unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        let LoadConfigError::Invalid { problems, .. } = err else {
            panic!("expected validation problems, got {err}");
        };
        for key in [
            "allowance.atp_target:",
            "allowance.credit_target_fraction:",
            "allowance.reclaim_check_secs:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "no problem reported for {key}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    /// Goal: `[health]` is optional with documented defaults, read from the file and the
    /// environment, and every bad key is reported at once by name.
    #[test]
    fn health_section_is_read_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(&path, VALID).unwrap();
        let cfg = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap();
        assert_eq!(cfg.health, HealthConfig::default());
        assert_eq!(cfg.health.thresholds().offline_after_ms, 15_000);
        assert_eq!(cfg.health.thresholds().outbox_events_max, 100_000);
        std::fs::write(
            &path,
            format!("{VALID}\n[health]\nbacklog_age_secs = 60\nwebhooks = [\"http://127.0.0.1:9/hook\"]\n"),
        )
        .unwrap();
        let env = HashMap::from([(
            "OUTPOST_HEALTH__OFFLINE_AFTER_SECS".to_string(),
            "3".to_string(),
        )]);
        let cfg = CentralConfig::load_with_env(&path, Some(env)).unwrap();
        assert_eq!(cfg.health.offline_after_secs, 3);
        assert_eq!(cfg.health.backlog_age_secs, 60);
        assert_eq!(
            cfg.health.webhooks,
            vec!["http://127.0.0.1:9/hook".to_string()]
        );

        std::fs::write(
            &path,
            format!("{VALID}\n[health]\noffline_after_secs = 0\nbacklog_age_secs = 0\nmaster_lag_max_secs = 0\ndisk_free_min_pct = 101\nclock_offset_max_ms = 0\noutbox_events_max = 0\nwebhooks = [\"ftp://x\", \"nope\"]\n"),
        )
        .unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        let LoadConfigError::Invalid { problems, .. } = err else {
            panic!("expected validation problems, got {err}");
        };
        for key in [
            "health.offline_after_secs:",
            "health.backlog_age_secs:",
            "health.master_lag_max_secs:",
            "health.disk_free_min_pct:",
            "health.clock_offset_max_ms:",
            "health.outbox_events_max:",
            "health.webhooks[0]:",
            "health.webhooks[1]:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "no problem reported for {key}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 8, "{problems:?}");
    }

    #[test]
    fn broken_config_lists_every_problem_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("central.toml");
        std::fs::write(
            &path,
            r#"
data_dir = "data"
[api]
listen = "nowhere"
token = "short"
max_body_bytes = 0
[quic]
listen = "127.0.0.1:x"
ca_cert = "missing-ca.pem"
cert = "missing.pem"
key = "missing.key"
idle_timeout_ms = 1000
keep_alive_ms = 5000
"#,
        )
        .unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        let LoadConfigError::Invalid { problems, .. } = err else {
            panic!("expected validation problems, got {err}");
        };
        for key in [
            "api.listen:",
            "api.token:",
            "api.max_body_bytes:",
            "quic.listen:",
            "quic.ca_cert:",
            "quic.cert:",
            "quic.key:",
            "quic.keep_alive_ms:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "no problem reported for {key}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 8, "{problems:?}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(&path, format!("{VALID}\nsurprise = 1\n")).unwrap();
        let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
        assert!(matches!(err, LoadConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains("surprise"), "{err}");
    }

    /// Central's config schema, as the reference is rendered from it.
    fn schema() -> serde_json::Value {
        schemars::schema_for!(CentralConfig).to_value()
    }

    /// An environment variable's text for a documented value (strings unquoted).
    fn env_text(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// The test's own files for the keys whose documented example names a production path that
    /// validation checks (`write_pems` files plus the CA key), by JSON pointer.
    fn test_paths(dir: &Path) -> Vec<(&'static str, serde_json::Value)> {
        std::fs::write(dir.join(crate::certs::CA_KEY_FILE), "x").unwrap();
        let s = |p: PathBuf| serde_json::Value::String(p.display().to_string());
        vec![
            ("/data_dir", s(dir.join("data"))),
            ("/quic/ca_cert", s(dir.join("ca.pem"))),
            ("/quic/cert", s(dir.join("central.pem"))),
            ("/quic/key", s(dir.join("central.key"))),
            ("/renewal/ca_dir", s(dir.to_path_buf())),
        ]
    }

    /// Writes a config document (the file's shape as JSON) as a TOML file, with its paths
    /// pointed at `dir`'s files (`test_paths`).
    fn write_doc(dir: &Path, name: &str, doc: &serde_json::Value) -> PathBuf {
        let mut doc = doc.clone();
        for (pointer, value) in test_paths(dir) {
            if let Some(v) = doc.pointer_mut(pointer) {
                *v = value;
            }
        }
        let path = dir.join(name);
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
        path
    }

    /// Removes the key at `path` from a config document (`tokens[i]` meaning every element).
    fn remove_key(doc: &mut serde_json::Value, path: &[String]) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        match first.strip_suffix("[i]") {
            Some(array) => {
                if let Some(items) = doc.get_mut(array).and_then(|a| a.as_array_mut()) {
                    for item in items {
                        remove_key(item, rest);
                    }
                }
            }
            None if rest.is_empty() => {
                if let Some(obj) = doc.as_object_mut() {
                    obj.remove(first);
                }
            }
            None => {
                if let Some(next) = doc.get_mut(first) {
                    remove_key(next, rest);
                }
            }
        }
    }

    /// Goal: the reference describes every key fully: a meaning, a unit for every number that
    /// agrees with the key's suffix, an example for every required key.
    #[test]
    fn reference_describes_every_key() {
        let problems = config_reference::check(&schema());
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        let md = reference_markdown();
        for key in [
            "`quic.idle_timeout_ms` | `3000` (3 s) | ms | 100..=600000 | `OUTPOST_QUIC__IDLE_TIMEOUT_MS`",
            "`data_dir` | required, e.g. `\"/var/lib/outpost-central\"`",
            "`api.tokens[i].sha256` | required, secret |",
            "`api.token` | removed |",
            "`api.tokens[i].role` | required, e.g. `\"erp\"` | — | `\"erp\"`, `\"admin\"` |",
            "`health.webhooks` | `[]` | — |  | file only |",
            "`allowance.credit_target_fraction` | `0.2` | fraction | 0.0..=1.0 |",
        ] {
            assert!(md.contains(key), "{key} missing from:\n{md}");
        }
    }

    /// Goal: every documented default loads and validates, writing it out means the same as
    /// leaving the key out, and every environment variable the reference names sets its key.
    /// Method: a file setting every key to its documented default (required keys to their
    /// example); a file with only the required keys; and a file with only the file-only keys
    /// (client tables, webhooks) plus every other key as its `OUTPOST_*` variable. All three
    /// must load to the same config.
    #[test]
    fn every_documented_default_and_variable_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let schema = schema();
        let full = config_reference::example_document(&schema, false);
        let full_path = write_doc(dir.path(), "full.toml", &full);
        let from_full = CentralConfig::load_with_env(&full_path, Some(HashMap::new()))
            .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&full_path).unwrap()));

        let required = config_reference::example_document(&schema, true);
        assert!(required.get("health").is_none(), "{required}");
        let required_path = write_doc(dir.path(), "required.toml", &required);
        let from_required =
            CentralConfig::load_with_env(&required_path, Some(HashMap::new())).unwrap();
        let mut defaults = full.clone();
        for key in config_reference::tables(&schema)
            .iter()
            .flat_map(|t| &t.keys)
            .filter(|k| !k.required && k.default.as_ref().is_none_or(|d| d.is_null()))
        {
            remove_key(&mut defaults, &key.path);
        }
        let defaults_path = write_doc(dir.path(), "defaults.toml", &defaults);
        let from_defaults =
            CentralConfig::load_with_env(&defaults_path, Some(HashMap::new())).unwrap();
        assert_eq!(from_defaults, from_required);

        // Every scalar as its variable, over a file of the file-only keys; paths must be the
        // test's files, as `write_doc` sets them in the other files.
        let paths = test_paths(dir.path());
        let mut env = HashMap::new();
        let mut file_only = serde_json::json!({});
        for table in config_reference::tables(&schema) {
            for key in table.keys.iter().filter(|k| !k.removed) {
                let path: Vec<&str> = key.path.iter().map(String::as_str).collect();
                let Some(value) = full.pointer(&format!("/{}", path.join("/"))) else {
                    continue;
                };
                let pointer = format!("/{}", path.join("/"));
                let value = paths
                    .iter()
                    .find(|(p, _)| *p == pointer)
                    .map_or_else(|| value.clone(), |(_, v)| v.clone());
                if key.env_settable {
                    env.insert(ENV_NAMING.var(&path), env_text(&value));
                } else if let [section, name] = path.as_slice() {
                    if file_only.get(*section).is_none() {
                        file_only[*section] = serde_json::json!({});
                    }
                    file_only[*section][*name] = value;
                }
            }
        }
        assert!(
            env.contains_key("OUTPOST_QUIC__MEMORY_LIMIT_MIB"),
            "{env:?}"
        );
        let env_path = dir.path().join("env.toml");
        std::fs::write(&env_path, toml::to_string(&file_only).unwrap()).unwrap();
        let from_env = CentralConfig::load_with_env(&env_path, Some(env)).unwrap();
        assert_eq!(from_env, from_full);

        // A list cannot be set from the environment: the reference says "file only".
        std::fs::write(&full_path, VALID).unwrap();
        let webhooks = HashMap::from([(
            "OUTPOST_HEALTH__WEBHOOKS".to_string(),
            "http://127.0.0.1:9/hook".to_string(),
        )]);
        assert!(CentralConfig::load_with_env(&full_path, Some(webhooks)).is_err());
    }

    /// Goal: the ranges the reference shows are the ones `validate` enforces. Method: for every
    /// key with a documented bound, set it one past the bound through its `OUTPOST_*` variable
    /// over a valid file, and check that a problem names the key.
    #[test]
    fn documented_ranges_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(&path, VALID).unwrap();
        let mut probed = 0;
        for table in config_reference::tables(&schema()) {
            for key in table.keys.iter().filter(|k| k.env_settable && !k.removed) {
                let parts: Vec<&str> = key.path.iter().map(String::as_str).collect();
                let var = ENV_NAMING.var(&parts);
                let dotted = key.dotted();
                for outside in config_reference::outside_values(key) {
                    let env = HashMap::from([(var.clone(), outside.clone())]);
                    let problems = match CentralConfig::load_with_env(&path, Some(env)) {
                        Ok(_) => Vec::new(),
                        Err(LoadConfigError::Invalid { problems, .. }) => problems,
                        Err(e) => vec![e.to_string()],
                    };
                    assert!(
                        problems
                            .iter()
                            .any(|p| p.starts_with(&format!("{dotted}:"))),
                        "{var}={outside} (outside the documented range) is not refused by \
                         {dotted}: {problems:?}"
                    );
                    probed += 1;
                }
            }
        }
        assert!(probed >= 25, "only {probed} bounds probed");
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let dir = tempfile::tempdir().unwrap();
        write_pems(dir.path());
        let path = dir.path().join("central.toml");
        std::fs::write(&path, VALID).unwrap();
        let env = HashMap::from([
            (
                "OUTPOST_API__LISTEN".to_string(),
                "127.0.0.1:9100".to_string(),
            ),
            (
                "OUTPOST_QUIC__IDLE_TIMEOUT_MS".to_string(),
                "5000".to_string(),
            ),
            (
                "OUTPOST_DATA_DIR".to_string(),
                "/var/lib/outpost".to_string(),
            ),
        ]);
        let cfg = CentralConfig::load_with_env(&path, Some(env)).unwrap();
        assert_eq!(cfg.api.listen, "127.0.0.1:9100");
        assert_eq!(cfg.quic.idle_timeout_ms, 5000);
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/outpost"));
    }
}
