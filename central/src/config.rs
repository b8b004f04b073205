//! Central's configuration: a TOML file plus `OUTPOST_*` environment overrides, validated as a
//! whole so that every problem is reported at once. Reads files; no sockets.

pub use outpost_protocol::secret::{
    MAX_CLIENT_NAME_LEN, MAX_TOKEN_LEN, MIN_TOKEN_LEN, parse_sha256_hex, sha256_hex,
    valid_client_name,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    /// Holds `central.redb` and `ready.json`.
    pub data_dir: PathBuf,
    pub api: ApiConfig,
    pub quic: QuicConfig,
    /// Optional: the allowance policy (defaults below).
    #[serde(default)]
    pub allowance: AllowanceConfig,
    /// Optional: fleet health thresholds and alert webhooks (defaults below).
    #[serde(default)]
    pub health: HealthConfig,
    /// Optional: how log lines are written (`text` by default).
    #[serde(default)]
    pub log: LogConfig,
}

/// `[log]`: how log lines are written to stderr (the filter comes from `RUST_LOG`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `[log] format`: `text` for people, `json` (one object per line, span fields such as
/// `trace_id` included) for log shippers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// `[health]`: when a site counts as degraded or offline, and where alerts are POSTed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub offline_after_secs: u64,
    pub backlog_age_secs: u64,
    pub disk_free_min_pct: u64,
    pub clock_offset_max_ms: u64,
    pub master_lag_max_secs: u64,
    pub outbox_events_max: u64,
    /// `http://` or `https://` URLs that receive each alert as a JSON POST.
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

/// How central escrows ATP and credit at the sites.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowanceConfig {
    /// ATP units each site is topped up to, per SKU (within what the ERP figure leaves free).
    #[serde(default = "default_atp_target")]
    pub atp_target: i64,
    /// Share of each customer's credit limit each site is topped up to (0.0..=1.0).
    #[serde(default = "default_credit_target_fraction")]
    pub credit_target_fraction: f64,
    /// A site silent for longer than this is asked to return all its allowance.
    #[serde(default = "default_reclaim_silent_secs")]
    pub reclaim_silent_secs: u64,
    /// How often central looks for silent sites and missed top-ups.
    #[serde(default = "default_reclaim_check_secs")]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port`; port 0 picks an ephemeral port (reported in the ready file).
    pub listen: String,
    /// The API's clients (`[[api.tokens]]`): each a name, a role and the SHA-256 of its bearer
    /// token. Central never stores a token itself.
    #[serde(default)]
    pub tokens: Vec<ApiClient>,
    /// The removed single plain-text token. Still parsed so that an old config is refused with
    /// a message saying what to do instead of "unknown field"; never used.
    #[serde(default, skip_serializing)]
    pub token: Option<Redacted>,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
}

/// What an API client may do: `admin` everything, `erp` the ERP integration's routes (master
/// data, the event feed, orders, reads of exceptions and sites, health).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// One API client (`[[api.tokens]]`). Its `Debug` output never shows the hash.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    /// 1..=64 characters of `[A-Za-z0-9._-]`, unique; logs name the client, never the token.
    pub name: String,
    pub role: Role,
    /// 64 lower-case hex digits: the SHA-256 of the bearer token (`outpost-central hash-token`).
    #[serde(skip_serializing)]
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
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    pub listen: String,
    /// Fleet CA: clients must present a certificate signed by it.
    pub ca_cert: PathBuf,
    /// Central's server certificate (chain) and key, PEM.
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// Most live agent connections; more are refused at the handshake.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Handshakes quinn queues before central accepts or refuses them (`max_incoming`).
    #[serde(default = "default_max_incoming")]
    pub max_incoming: usize,
    /// Handshake bytes buffered per not-yet-accepted connection (`incoming_buffer_size`).
    #[serde(default = "default_incoming_buffer_bytes")]
    pub incoming_buffer_bytes: u64,
    /// Handshake bytes buffered for all not-yet-accepted connections (`incoming_buffer_size_total`).
    #[serde(default = "default_incoming_buffer_total_bytes")]
    pub incoming_buffer_total_bytes: u64,
    /// Bidirectional streams an agent may have open at once (the protocol uses one).
    /// Unidirectional streams and datagrams are always refused.
    #[serde(default = "default_max_bidi_streams")]
    pub max_bidi_streams: u32,
    /// Bytes an agent may send on one stream ahead of central reading them.
    #[serde(default = "default_stream_receive_window_bytes")]
    pub stream_receive_window_bytes: u64,
    /// Bytes an agent may send on a connection ahead of central reading them.
    #[serde(default = "default_receive_window_bytes")]
    pub receive_window_bytes: u64,
    /// Handshakes in flight from one source IP address; more are refused.
    #[serde(default = "default_max_handshakes_per_ip")]
    pub max_handshakes_per_ip: usize,
    /// Resident memory (MiB) above which central refuses new connections; live sessions go on.
    #[serde(default = "default_memory_limit_mib")]
    pub memory_limit_mib: u64,
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
    }
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
        self.data_dir.join(crate::run::READY_FILE)
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
