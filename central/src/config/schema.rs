//! Central's config file as data: every key with its doc comment (the configuration reference
//! is generated from them), type, default and documented range, and the limits `validate`
//! applies. Pure: no I/O.

use std::net::SocketAddr;
use std::path::PathBuf;

use outpost_protocol::config_load::ENV_NAMING;
use outpost_protocol::config_reference;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::parse_sha256_hex;

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
}

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

impl CentralConfig {
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
