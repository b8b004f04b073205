//! Agent configuration: a TOML file plus `OUTPOST_*` environment overrides, checked as a whole so
//! that every problem is reported at once, each naming its key. Reads local files only (the config
//! and the certificates it names); no network.

pub use outpost_protocol::secret::{
    MAX_CLIENT_NAME_LEN, MAX_TOKEN_LEN, MIN_TOKEN_LEN, check_token, hash_token, parse_sha256_hex,
    to_hex, valid_client_name,
};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::MAX_EVENTS_PER_BATCH;
use outpost_protocol::config_reference::{self, EnvNaming};
use outpost_protocol::identity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::store::{
    DEFAULT_RETAIN_ACKED_EVENTS, DEFAULT_RETAIN_ACKED_SECS, MAX_RETAIN_ACKED_EVENTS,
    MAX_RETAIN_ACKED_SECS, Retention,
};
use crate::tls;

/// Prefix of environment variables that override config keys (`OUTPOST_SYNC__CENTRAL_ADDR`).
pub const ENV_PREFIX: &str = "OUTPOST";
/// Separator between nesting levels in an override's name (`SYNC__CENTRAL_ADDR` = `sync.central_addr`).
pub const ENV_SEPARATOR: &str = "__";

/// Default request body limit: an order of `MAX_ORDER_LINES` lines is a few KiB, so 64 KiB leaves
/// room for any legitimate request while keeping a hostile client from making us buffer much.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024;
/// Smallest accepted body limit: below this a full order could be refused.
pub const MIN_MAX_BODY_BYTES: u64 = 16 * 1024;
/// Largest accepted body limit: the local API never needs more, and each request is buffered.
pub const MAX_MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Most bearer tokens in one config (one per client system is plenty).
pub const MAX_TOKENS: usize = 256;
/// Bytes of randomness in a token made by `outpost-agent hash-token --generate` (256 bits).
pub const GENERATED_TOKEN_BYTES: usize = 32;
/// Default sustained requests per second per client: far above what a scanner or an order-entry
/// screen sends, low enough that one runaway client cannot monopolise the writer.
pub const DEFAULT_RATE_LIMIT_PER_SEC: u64 = 1_000;
/// Default burst per client: two seconds at the default rate, so a reconnecting client can catch up.
pub const DEFAULT_RATE_LIMIT_BURST: u64 = 2_000;
/// Largest accepted rate or burst: beyond this the limit would never bite on one site's hardware.
pub const MAX_RATE_LIMIT: u64 = 1_000_000;
/// Default time a client has to send a request's headers (and the longest an idle keep-alive
/// connection is kept): generous for a scanner on a bad Wi-Fi link, short against slow-loris.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Range of accepted header read timeouts: below 100 ms a loaded link fails spuriously; past a
/// minute a slow-loris client holds a connection slot for too long.
pub const HEADER_READ_TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=60_000;
/// Default most connections served at once; past it a new connection is closed at once.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1_024;
/// Largest accepted connection cap: beyond this the process's file descriptors run out first.
pub const MAX_MAX_CONNECTIONS: u64 = 65_536;
/// Longest site id this agent accepts: order ids are `{site}-o{seq}` and must fit
/// `outpost_protocol::MAX_ID_LEN` (64) with a 20-digit sequence number: 64 - 2 - 20 = 42.
pub const MAX_SITE_ID_LEN_FOR_ORDER_IDS: usize = 42;

/// Default QUIC connect timeout (handshake included).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Default QUIC keep-alive interval: well below the idle timeout so a healthy link never idles
/// out (four keep-alives per idle timeout ride out short loss bursts).
pub const DEFAULT_KEEP_ALIVE_MS: u64 = 500;
/// Default QUIC idle timeout: how quickly an outage is noticed. A keep-alive sent after the last
/// packet from central restarts QUIC's idle timer, so an outage is noticed within
/// keep-alive + idle timeout: 2.5 s with the defaults.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 2_000;
/// Default first reconnect delay (before jitter).
pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 100;
/// Default cap on the reconnect delay (before jitter): with full jitter the agent tries again
/// within a second of the link coming back, and a fleet reconnecting to a restarted central is
/// spread over that second.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 1_000;
/// Default QUIC send window and per-stream receive window: the bandwidth-delay product the sync
/// link can fill (8 MiB: 100 Mbit/s at 640 ms RTT, 1 Gbit/s at 64 ms). quinn's default stream
/// window (1.25 MB) would cap one stream at ~200 Mbit/s at 50 ms RTT.
pub const DEFAULT_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Range of accepted QUIC windows.
pub const WINDOW_BYTES_RANGE: std::ops::RangeInclusive<u64> = 64 * 1024..=256 * 1024 * 1024;
/// Default most events per `Events` frame.
pub const DEFAULT_BATCH_MAX_EVENTS: u64 = MAX_EVENTS_PER_BATCH as u64;
/// Default most events in flight (sent, not acknowledged).
pub const DEFAULT_WINDOW_EVENTS: u64 = 20_000;
/// Largest accepted window: bounds the memory central may need to hold for one session's frames
/// and the amount re-sent after a lost connection.
pub const MAX_WINDOW_EVENTS: u64 = 1_000_000;
/// Range of accepted timeouts and intervals, in milliseconds. Below 50 ms a loaded link times out
/// spuriously; above ten minutes an outage would go unnoticed for too long.
pub const TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 50..=600_000;
/// Largest accepted reconnect backoff cap: one hour.
pub const MAX_BACKOFF_MS: u64 = 3_600_000;
/// Default longest an order waits for central to grant more allowance: well under a second, so
/// a floor operator barely notices, yet several WAN round trips.
pub const DEFAULT_REQUEST_DEADLINE_MS: u64 = 300;
/// Range of accepted allowance request deadlines. Past five seconds an order capture would feel
/// hung; the site must keep working at local speed (guarantee 4).
pub const REQUEST_DEADLINE_RANGE_MS: std::ops::RangeInclusive<u64> = 1..=5_000;
/// Default seconds between two heartbeats on a live session: central notices a silent site
/// within a few beats, and a beat (a few hundred bytes) every 5 s costs nothing on any link.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 5;
/// Range of accepted heartbeat intervals: at most one beat a second (each one refreshes CPU,
/// memory and disk figures), at least one an hour.
pub const HEARTBEAT_RANGE_SECS: std::ops::RangeInclusive<u64> = 1..=3_600;

// The doc comments of this struct, the section structs and their fields are the configuration
// reference (`outpost-agent config-reference`, deploy/CONFIG.md): each says what the key means,
// in which unit, and what `validate` accepts; fixed bounds go in `#[schemars(range(...))]` with
// the constants `validate` uses (the tests probe one past each). See `reference_markdown`.

// Every field has a default so that all missing keys are reported together by `validate` rather
// than one at a time by the deserializer.

/// The top level of the file. `check-config` reports every missing or invalid key at once;
/// relative paths are resolved against the config file's directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This site's id: lower-case letters, digits and `-`, not starting with `-`, at most 42
    /// characters (order ids are `{site}-o{seq}` and must fit 64). Must be the site named in
    /// `sync.cert`: central takes the site from the certificate.
    #[schemars(extend("x-required" = true), example = "plant-1")]
    pub site_id: String,
    /// Directory of the agent's store (`agent.redb`) and `ready.json`; created at start if
    /// missing, refused if it is an existing file.
    #[schemars(extend("x-required" = true), example = "/var/lib/outpost-agent")]
    pub data_dir: PathBuf,
    pub api: ApiConfig,
    pub sync: SyncConfig,
    pub allowance: AllowanceConfig,
    pub health: HealthConfig,
    pub outbox: OutboxConfig,
    pub log: LogConfig,
}

/// `[outbox]`: how long acknowledged events are kept so that a central restored from a backup
/// can take them again. An event is kept while both bounds allow it; 0 in either keeps none.
/// Retained events do not count in `outbox_depth`, the heartbeat or the outbox limit;
/// `outpost_agent_outbox_retained_events` shows them.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// How long an event acknowledged by central stays in the outbox, counted from when it was
    /// stored; 0 keeps none.
    #[schemars(range(min = 0, max = MAX_RETAIN_ACKED_SECS))]
    pub retain_acked_secs: u64,
    /// Most acknowledged events kept (the newest); 0 keeps none.
    #[schemars(range(min = 0, max = MAX_RETAIN_ACKED_EVENTS))]
    pub retain_acked_max_events: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            retain_acked_secs: DEFAULT_RETAIN_ACKED_SECS,
            retain_acked_max_events: DEFAULT_RETAIN_ACKED_EVENTS,
        }
    }
}

/// `[log]`: how log lines are written to stderr (the filter comes from `RUST_LOG`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people; `json` for log shippers: one object per line, event fields at the top
    /// level, span fields under `span`/`spans`; `--log-json` forces JSON. A request's span
    /// carries its `trace_id`; the outbox write and the upload of each event are logged with it
    /// at debug (`RUST_LOG=info,outpost_agent=debug`).
    pub format: LogFormat,
}

/// `[log] format`: `text` for people, `json` (one object per line, span fields such as
/// `trace_id` included) for log shippers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[health]`: how often the agent reports its health signals to central.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between two heartbeats (CPU, memory, disk, outbox, master revision, API counts) on
    /// a live session, the first right after central's Welcome.
    #[schemars(range(min = *HEARTBEAT_RANGE_SECS.start(), max = *HEARTBEAT_RANGE_SECS.end()))]
    pub heartbeat_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
        }
    }
}

/// `[allowance]`: how the agent asks central for more allowance while an order waits.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AllowanceConfig {
    /// Longest an order waits for central to grant more allowance (and for the granted
    /// revision) before its lines are captured as pending; short, so that the site keeps
    /// working at local speed.
    #[schemars(range(
        min = *REQUEST_DEADLINE_RANGE_MS.start(),
        max = *REQUEST_DEADLINE_RANGE_MS.end()
    ))]
    pub request_deadline_ms: u64,
}

impl Default for AllowanceConfig {
    fn default() -> Self {
        AllowanceConfig {
            request_deadline_ms: DEFAULT_REQUEST_DEADLINE_MS,
        }
    }
}

/// `[api]`: the local HTTP API that the site's own systems (scanners, order entry, readers)
/// call, and its limits. Refusals are counted under `api` in `GET /v1/health`.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the local API listens on, `ip:port`; port 0 picks an ephemeral port (the real
    /// one is in `ready.json`).
    #[schemars(extend("x-required" = true), example = "0.0.0.0:8080")]
    pub listen: String,
    /// The API's clients, one `[[api.tokens]]` table each, at least one and at most 256. File
    /// only: an array of tables cannot be written as an `OUTPOST_*` variable, and
    /// `OUTPOST_API__TOKENS` is refused; so is the old plain-text `tokens = ["..."]` form.
    #[serde(deserialize_with = "lenient_tokens")]
    #[schemars(with = "Vec<TokenConfig>", extend("x-required" = true))]
    pub tokens: Vec<TokenEntry>,
    /// Largest request body; a larger one gets 413 `body_too_large`.
    #[schemars(range(min = MIN_MAX_BODY_BYTES, max = MAX_MAX_BODY_BYTES))]
    pub max_body_bytes: u64,
    /// Sustained rate of each client's token bucket (a client's `rate_per_sec` overrides it);
    /// over it a request gets 429 `rate_limited` with `Retry-After`.
    #[schemars(extend("x-unit" = "requests/s"), range(min = 1, max = MAX_RATE_LIMIT))]
    pub rate_limit_per_sec: u64,
    /// Burst of each client's token bucket: requests a client may send at once before its
    /// sustained rate applies.
    #[schemars(extend("x-unit" = "requests"), range(min = 1, max = MAX_RATE_LIMIT))]
    pub rate_limit_burst: u64,
    /// A client must send a request's headers within this (against slow-loris clients); also
    /// how long an idle keep-alive connection is kept.
    #[schemars(range(
        min = *HEADER_READ_TIMEOUT_RANGE_MS.start(),
        max = *HEADER_READ_TIMEOUT_RANGE_MS.end()
    ))]
    pub header_read_timeout_ms: u64,
    /// Connections served at once; past it a new connection is closed at once, counted and
    /// warned about (at most one log line per 10 s).
    #[schemars(extend("x-unit" = "connections"), range(min = 1, max = MAX_MAX_CONNECTIONS))]
    pub max_connections: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: String::new(),
            tokens: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            rate_limit_per_sec: DEFAULT_RATE_LIMIT_PER_SEC,
            rate_limit_burst: DEFAULT_RATE_LIMIT_BURST,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl fmt::Debug for ApiConfig {
    /// Tokens and their hashes are secrets: only names and roles are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("tokens", &self.tokens)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("rate_limit_per_sec", &self.rate_limit_per_sec)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// One element of `api.tokens` as written. Deserialised leniently (untagged) so that `validate`
/// can say exactly what is wrong with each entry instead of failing the whole file.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenEntry {
    /// `[[api.tokens]]` with the expected keys and types.
    Client(TokenConfig),
    /// The old `tokens = ["plain"]` form: refused, the operator must hash the token.
    Plain(String),
    /// Anything else (unknown keys, wrong types); `validate` names the problems.
    Invalid(serde_json::Value),
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenEntry::Client(c) => c.fmt(f),
            TokenEntry::Plain(_) => f.write_str("<plain-text token redacted>"),
            TokenEntry::Invalid(_) => f.write_str("<invalid entry redacted>"),
        }
    }
}

/// Reads `api.tokens` whatever its shape, so that a mistake is reported by `validate` under its
/// key, and never by the deserializer, whose messages quote the value (a token, here).
fn lenient_tokens<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TokenEntry>, D::Error> {
    let entry =
        |v: serde_json::Value| serde_json::from_value(v.clone()).unwrap_or(TokenEntry::Invalid(v));
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(items) => items.into_iter().map(entry).collect(),
        // `tokens = "..."`: the old form with a single token.
        serde_json::Value::String(s) => vec![TokenEntry::Plain(s)],
        other => vec![TokenEntry::Invalid(other)],
    })
}

/// `[[api.tokens]]`: one client system allowed to call the local API, by name, role and the
/// SHA-256 of its bearer token; the agent keeps no token. `outpost-agent hash-token --generate
/// [--name N --role R]` makes a new token and prints its table; `echo -n TOKEN | outpost-agent
/// hash-token` hashes an existing one.
#[derive(Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// What logs show for this client (never the token): 1..=64 characters of `A-Z a-z 0-9 .
    /// _ -`, unique among the clients.
    #[schemars(example = &"scanners")]
    pub name: String,
    /// What the client may do: `reader` every `GET`; `scanner` also posts shipment milestones;
    /// `order-entry` also creates orders; `admin` everything. A route the role does not allow
    /// gets 403 `forbidden` before the body is read.
    #[schemars(extend("enum" = Role::ALL.map(Role::as_str)), example = &"scanner")]
    pub role: String,
    /// SHA-256 of the client's bearer token, 64 lower-case hex characters (`outpost-agent
    /// hash-token`); each client needs its own token. Never shown in logs or `Debug` output.
    #[schemars(
        extend("x-secret" = true),
        example = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    )]
    pub sha256: String,
    /// This client's own sustained rate, in place of `api.rate_limit_per_sec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        extend("x-unit" = "requests/s"),
        range(min = 1, max = MAX_RATE_LIMIT),
        example = 50
    )]
    pub rate_per_sec: Option<u64>,
}

impl fmt::Debug for TokenConfig {
    /// The hash identifies the token offline (a guessed token can be checked against it): redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("sha256", &"<redacted>")
            .field("rate_per_sec", &self.rate_per_sec)
            .finish()
    }
}

/// What a client may do on the local API. Each role includes `Reader`; `Admin` may do everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Every `GET`: stock, prices, customers, orders, health.
    Reader,
    /// Reader, plus posting shipment milestones.
    Scanner,
    /// Reader, plus creating orders.
    OrderEntry,
    /// Everything.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Reader, Role::Scanner, Role::OrderEntry, Role::Admin];

    /// The name used in configs, logs and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Scanner => "scanner",
            Role::OrderEntry => "order-entry",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether a client of this role may use a route that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self == Role::Admin || self == needed || needed == Role::Reader
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated client: its name, role, token hash and rate limit.
#[derive(Clone)]
pub struct ApiClient {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the bearer token.
    pub sha256: [u8; 32],
    /// Sustained requests per second (the client's override or `api.rate_limit_per_sec`).
    pub rate_per_sec: u64,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("rate_per_sec", &self.rate_per_sec)
            .finish_non_exhaustive()
    }
}

/// A new random token: `GENERATED_TOKEN_BYTES` bytes as lower-case hex.
pub fn generate_token() -> String {
    let bytes: [u8; GENERATED_TOKEN_BYTES] = rand::random();
    to_hex(&bytes)
}

/// Keys of a `[[api.tokens]]` table.
const TOKEN_KEYS: &[&str] = &["name", "role", "sha256", "rate_per_sec"];

/// The message for the old plain-text form (which names no token: it is a secret).
const PLAIN_TOKEN_MESSAGE: &str = "plain-text tokens are no longer accepted: hash each token with \
    `outpost-agent hash-token` and list it as an [[api.tokens]] table with name, role and sha256";

/// `[sync]`: the QUIC link to central with mutual TLS: where central is, this site's
/// certificate, and the link's timers, batches and windows.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Central's QUIC address: `ip:port` or `host:port` with a non-zero port; a host name is
    /// resolved at each connection attempt.
    #[schemars(extend("x-required" = true), example = "central.example.net:7601")]
    pub central_addr: String,
    /// The name central's certificate must carry (a DNS name or an IP address).
    #[schemars(extend("x-required" = true), example = "central.example.net")]
    pub central_name: String,
    /// The fleet CA certificate (PEM) that central's certificate must chain to.
    #[schemars(extend("x-required" = true), example = "/etc/outpost/ca.pem")]
    pub ca_cert: PathBuf,
    /// This site's certificate (PEM), issued by the fleet CA (`outpost-central certs site`); it
    /// must name this `site_id`.
    #[schemars(extend("x-required" = true), example = "/etc/outpost/plant-1.pem")]
    pub cert: PathBuf,
    /// The private key of `sync.cert` (PEM; keep it readable by the agent only).
    #[schemars(extend("x-required" = true), example = "/etc/outpost/plant-1.key")]
    pub key: PathBuf,
    /// Limit on resolving central's address, on one connection attempt and on the hello
    /// exchange. Once a session has measured the link's RTT, later attempts get 10 RTTs (at
    /// least 1 s, at most this), so a link that comes back is used within about a second.
    #[schemars(range(min = *TIMEOUT_RANGE_MS.start(), max = *TIMEOUT_RANGE_MS.end()))]
    pub connect_timeout_ms: u64,
    /// QUIC keep-alive interval; must be below `sync.idle_timeout_ms`. An outage is noticed
    /// within keep-alive + idle timeout (a keep-alive sent after central's last packet restarts
    /// QUIC's idle timer): 2.5 s with the defaults; raise both on links with long loss bursts.
    #[schemars(range(min = *TIMEOUT_RANGE_MS.start(), max = *TIMEOUT_RANGE_MS.end()))]
    pub keep_alive_ms: u64,
    /// QUIC idle timeout: with no packet from central for this long the connection is closed
    /// and the agent reconnects.
    #[schemars(range(min = *TIMEOUT_RANGE_MS.start(), max = *TIMEOUT_RANGE_MS.end()))]
    pub idle_timeout_ms: u64,
    /// First reconnect delay; the cap doubles with each failed attempt up to
    /// `sync.backoff_max_ms`, and each delay is drawn uniformly below its cap (full jitter).
    #[schemars(range(min = 1, max = MAX_BACKOFF_MS))]
    pub backoff_initial_ms: u64,
    /// Cap on the reconnect delay (before jitter); at least `sync.backoff_initial_ms`.
    #[schemars(range(min = 1, max = MAX_BACKOFF_MS))]
    pub backoff_max_ms: u64,
    /// Most events per `Events` frame uploaded to central.
    #[schemars(range(min = 1, max = DEFAULT_BATCH_MAX_EVENTS))]
    pub batch_max_events: u64,
    /// Most events in flight (sent, not yet acknowledged by central); at least
    /// `sync.batch_max_events`.
    #[schemars(range(min = 1, max = MAX_WINDOW_EVENTS))]
    pub window_events: u64,
    /// QUIC send window of the connection (the upload). Size it to the link's bandwidth × RTT:
    /// 8 MiB fills 100 Mbit/s at 640 ms; central's `quic.stream_receive_window_bytes` bounds
    /// the upload the same way.
    #[schemars(range(min = *WINDOW_BYTES_RANGE.start(), max = *WINDOW_BYTES_RANGE.end()))]
    pub send_window_bytes: u64,
    /// QUIC receive window of the stream and of the connection (master data from central);
    /// sized like `sync.send_window_bytes`.
    #[schemars(range(min = *WINDOW_BYTES_RANGE.start(), max = *WINDOW_BYTES_RANGE.end()))]
    pub receive_window_bytes: u64,
    /// Newest sync protocol version the agent offers central (ALPN). This build speaks its own
    /// version and the one before and settles on the newest one central also speaks, so leave
    /// it at the default; lower it only to hold a site on the previous version.
    #[schemars(
        extend("x-unit" = "version"),
        range(
            min = outpost_protocol::MIN_PROTOCOL_VERSION,
            max = outpost_protocol::PROTOCOL_VERSION
        )
    )]
    pub protocol_version_max: u16,
    /// Renew the site certificate over the sync connection once it expires within this many
    /// days: the agent makes a new key, sends central a signing request (the key never leaves
    /// the site) and installs the new certificate without a restart. 0 turns renewal off.
    /// Needs central's `[renewal] ca_dir` and protocol 4.
    #[schemars(extend("x-unit" = "days"), range(min = 0, max = MAX_RENEW_BEFORE_DAYS))]
    pub renew_before_days: u64,
}

/// Default of `sync.renew_before_days`: a month before expiry leaves weeks for retries and
/// for an operator to notice a site that cannot renew.
pub const DEFAULT_RENEW_BEFORE_DAYS: u64 = 30;
/// Most days before expiry a renewal may start: ten years.
pub const MAX_RENEW_BEFORE_DAYS: u64 = 3_650;

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            central_addr: String::new(),
            central_name: String::new(),
            ca_cert: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            keep_alive_ms: DEFAULT_KEEP_ALIVE_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            backoff_initial_ms: DEFAULT_BACKOFF_INITIAL_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
            batch_max_events: DEFAULT_BATCH_MAX_EVENTS,
            window_events: DEFAULT_WINDOW_EVENTS,
            send_window_bytes: DEFAULT_WINDOW_BYTES,
            receive_window_bytes: DEFAULT_WINDOW_BYTES,
            protocol_version_max: outpost_protocol::PROTOCOL_VERSION,
            renew_before_days: DEFAULT_RENEW_BEFORE_DAYS,
        }
    }
}

/// A validated configuration, in the types the agent runs with.
#[derive(Clone)]
pub struct Settings {
    pub site_id: String,
    pub data_dir: PathBuf,
    pub api: ApiSettings,
    pub sync: SyncSettings,
    pub allowance: AllowanceSettings,
    pub health: HealthSettings,
    /// `[outbox]`: retention of acknowledged events.
    pub retention: Retention,
    pub log_format: LogFormat,
}

#[derive(Clone, Debug)]
pub struct HealthSettings {
    /// Time between two heartbeats on a live session.
    pub heartbeat: Duration,
}

#[derive(Clone, Debug)]
pub struct AllowanceSettings {
    /// Longest an order waits for central's answer and the granted revision.
    pub request_deadline: Duration,
}

#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub listen: SocketAddr,
    /// Every configured client (Debug shows names and roles only).
    pub clients: Vec<ApiClient>,
    pub max_body_bytes: usize,
    /// Burst of every client's token bucket.
    pub rate_limit_burst: u64,
    /// Longest a client may take to send a request's headers; also the idle keep-alive limit.
    pub header_read_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
}

#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// `ip:port` or `host:port`; a host name is resolved at each connection attempt.
    pub central_addr: String,
    pub central_name: String,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub connect_timeout: Duration,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub batch_max_events: u64,
    pub window_events: u64,
    pub send_window_bytes: u64,
    pub receive_window_bytes: u64,
    pub protocol_version_max: u16,
    /// `Duration::ZERO`: no renewal.
    pub renew_before: Duration,
}

impl Settings {
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("agent.redb")
    }

    pub fn ready_path(&self) -> PathBuf {
        self.data_dir.join("ready.json")
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("site_id", &self.site_id)
            .field("data_dir", &self.data_dir)
            .field("api", &self.api)
            .field("sync", &self.sync)
            .field("allowance", &self.allowance)
            .field("health", &self.health)
            .field("retention", &self.retention)
            .finish()
    }
}

/// One problem with one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("config {path} is invalid:\n{}", list(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl LoadConfigError {
    /// Every problem, one per line, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadConfigError::Read { source, .. } => vec![source.to_string()],
            LoadConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
        }
    }
}

const ROOT_KEYS: &[&str] = &[
    "site_id",
    "data_dir",
    "api",
    "sync",
    "allowance",
    "health",
    "outbox",
    "log",
];
const ALLOWANCE_KEYS: &[&str] = &["request_deadline_ms"];
const LOG_KEYS: &[&str] = &["format"];
const HEALTH_KEYS: &[&str] = &["heartbeat_secs"];
const OUTBOX_KEYS: &[&str] = &["retain_acked_secs", "retain_acked_max_events"];
const API_KEYS: &[&str] = &[
    "listen",
    "tokens",
    "max_body_bytes",
    "rate_limit_per_sec",
    "rate_limit_burst",
    "header_read_timeout_ms",
    "max_connections",
];
const SYNC_KEYS: &[&str] = &[
    "central_addr",
    "central_name",
    "ca_cert",
    "cert",
    "key",
    "connect_timeout_ms",
    "keep_alive_ms",
    "idle_timeout_ms",
    "backoff_initial_ms",
    "backoff_max_ms",
    "batch_max_events",
    "window_events",
    "send_window_bytes",
    "receive_window_bytes",
    "protocol_version_max",
    "renew_before_days",
];

/// How `load` names environment overrides: `OUTPOST_SYNC__CONNECT_TIMEOUT_MS`.
pub const ENV_NAMING: EnvNaming<'static> = EnvNaming {
    prefix: ENV_PREFIX,
    separator: ENV_SEPARATOR,
};

/// The configuration reference of the agent's config file, as Markdown, generated from
/// `AgentConfig`'s doc comments, defaults and ranges: `outpost-agent config-reference` prints
/// it, and deploy/CONFIG.md holds it (tests/tests/config_reference.rs keeps the two equal).
pub fn reference_markdown() -> String {
    let schema = schemars::schema_for!(AgentConfig);
    config_reference::render(
        "outpost-agent: `<site>.toml`",
        "The site agent's config, one file per site, given as `outpost-agent run --config FILE`; \
         `outpost-agent check-config --config FILE` names every problem by its key. Any key but \
         an array can be overridden by the environment variable shown (`OUTPOST_`, then the \
         key's path in upper case with `__` between a section and its key); an unknown \
         `OUTPOST_*` variable is refused as an unknown key.",
        schema.as_value(),
        ENV_NAMING,
    )
}

/// Loads `path`, applies the process environment's `OUTPOST_*` overrides, resolves relative paths
/// against the config file's directory and validates everything.
pub fn load(path: &Path) -> Result<Settings, LoadConfigError> {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")))
        .collect();
    load_with_env(path, env)
}

/// `load` with an explicit environment (tests use this instead of mutating the process's).
pub fn load_with_env(
    path: &Path,
    env: BTreeMap<String, String>,
) -> Result<Settings, LoadConfigError> {
    let read_err = |source| LoadConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |problems| LoadConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let merged = config::Config::builder()
        .add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        )
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator(ENV_SEPARATOR)
                .try_parsing(true)
                .source(Some(env.clone().into_iter().collect())),
        )
        .build()
        .map_err(read_err)?;

    // Client tokens are an array of tables, which an environment variable cannot express; the old
    // comma-separated plain-text form must not slip in this way either.
    let tokens_var = format!("{ENV_PREFIX}_API{ENV_SEPARATOR}TOKENS");
    if env.keys().any(|k| k.eq_ignore_ascii_case(&tokens_var)) {
        return Err(invalid(vec![Problem {
            key: "api.tokens".into(),
            message: format!(
                "cannot be set from the environment ({tokens_var}): list each client as an \
                 [[api.tokens]] table (name, role, sha256) in the config file; hash tokens with \
                 `outpost-agent hash-token`"
            ),
        }]));
    }

    let unknown = unknown_keys(&merged);
    let mut cfg: AgentConfig = match merged.try_deserialize() {
        Ok(cfg) => cfg,
        Err(e) => {
            let mut problems = unknown;
            if problems.is_empty() {
                problems.push(Problem {
                    key: "(file)".into(),
                    message: e.to_string(),
                });
            }
            return Err(invalid(problems));
        }
    };
    if !unknown.is_empty() {
        return Err(invalid(unknown));
    }
    let base = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    cfg.resolve_paths(&base);
    cfg.validate().map_err(invalid)
}

/// Keys present in the merged sources that the config does not know, all of them, by full name.
fn unknown_keys(merged: &config::Config) -> Vec<Problem> {
    let mut out = Vec::new();
    let Ok(root) = merged
        .clone()
        .try_deserialize::<BTreeMap<String, config::Value>>()
    else {
        return out;
    };
    for (k, v) in root {
        let known: Option<&[&str]> = match k.as_str() {
            "api" => Some(API_KEYS),
            "sync" => Some(SYNC_KEYS),
            "allowance" => Some(ALLOWANCE_KEYS),
            "health" => Some(HEALTH_KEYS),
            "outbox" => Some(OUTBOX_KEYS),
            "log" => Some(LOG_KEYS),
            _ => None,
        };
        if !ROOT_KEYS.contains(&k.as_str()) {
            out.push(Problem {
                key: k,
                message: "unknown key".into(),
            });
            continue;
        }
        if let (Some(known), Ok(table)) = (known, v.into_table()) {
            for sub in table.keys() {
                if !known.contains(&sub.as_str()) {
                    out.push(Problem {
                        key: format!("{k}.{sub}"),
                        message: "unknown key".into(),
                    });
                }
            }
        }
    }
    out
}

impl AgentConfig {
    /// Makes every relative path absolute against `base` (the config file's directory), so the
    /// agent does not depend on the directory it was started from.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.sync.ca_cert,
            &mut self.sync.cert,
            &mut self.sync.key,
        ] {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks everything and returns the settings to run with, or every problem found.
    pub fn validate(&self) -> Result<Settings, Vec<Problem>> {
        let mut p = Problems::default();

        if self.site_id.is_empty() {
            p.add("site_id", "is required");
        } else if let Err(e) = identity::validate_site_id(&self.site_id) {
            p.add("site_id", e);
        } else if self.site_id.len() > MAX_SITE_ID_LEN_FOR_ORDER_IDS {
            p.add(
                "site_id",
                format!(
                    "must be at most {MAX_SITE_ID_LEN_FOR_ORDER_IDS} characters so that order ids fit"
                ),
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            p.add("data_dir", "is required");
        } else if self.data_dir.exists() && !self.data_dir.is_dir() {
            p.add(
                "data_dir",
                format!("{} exists and is not a directory", self.data_dir.display()),
            );
        }

        let listen = match self.api.listen.parse::<SocketAddr>() {
            _ if self.api.listen.is_empty() => {
                p.add("api.listen", "is required");
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                p.add(
                    "api.listen",
                    format!("invalid socket address {:?}", self.api.listen),
                );
                None
            }
        };
        let clients = self.check_tokens(&mut p);
        let rate = |p: &mut Problems, key: &str, v: u64| {
            if !(1..=MAX_RATE_LIMIT).contains(&v) {
                p.add(key, format!("must be 1..={MAX_RATE_LIMIT}, got {v}"));
            }
        };
        rate(
            &mut p,
            "api.rate_limit_per_sec",
            self.api.rate_limit_per_sec,
        );
        rate(&mut p, "api.rate_limit_burst", self.api.rate_limit_burst);
        if !HEADER_READ_TIMEOUT_RANGE_MS.contains(&self.api.header_read_timeout_ms) {
            p.add(
                "api.header_read_timeout_ms",
                format!(
                    "must be {}..={} ms, got {}",
                    HEADER_READ_TIMEOUT_RANGE_MS.start(),
                    HEADER_READ_TIMEOUT_RANGE_MS.end(),
                    self.api.header_read_timeout_ms
                ),
            );
        }
        if !(1..=MAX_MAX_CONNECTIONS).contains(&self.api.max_connections) {
            p.add(
                "api.max_connections",
                format!(
                    "must be 1..={MAX_MAX_CONNECTIONS}, got {}",
                    self.api.max_connections
                ),
            );
        }
        if !(MIN_MAX_BODY_BYTES..=MAX_MAX_BODY_BYTES).contains(&self.api.max_body_bytes) {
            p.add(
                "api.max_body_bytes",
                format!(
                    "must be {MIN_MAX_BODY_BYTES}..={MAX_MAX_BODY_BYTES}, got {}",
                    self.api.max_body_bytes
                ),
            );
        }

        let s = &self.sync;
        if s.central_addr.is_empty() {
            p.add("sync.central_addr", "is required");
        } else if !outpost_protocol::identity::valid_host_port(&s.central_addr) {
            p.add(
                "sync.central_addr",
                format!("invalid socket address {:?}", s.central_addr),
            );
        }
        if s.central_name.is_empty() {
            p.add("sync.central_name", "is required");
        } else if rustls_pki_types::ServerName::try_from(s.central_name.as_str()).is_err() {
            p.add(
                "sync.central_name",
                format!("{:?} is not a valid DNS name or IP address", s.central_name),
            );
        }
        self.check_tls_files(&mut p);

        let ms = |p: &mut Problems, key: &str, v: u64| {
            if !TIMEOUT_RANGE_MS.contains(&v) {
                p.add(
                    key,
                    format!(
                        "must be {}..={} ms, got {v}",
                        TIMEOUT_RANGE_MS.start(),
                        TIMEOUT_RANGE_MS.end()
                    ),
                );
            }
        };
        ms(&mut p, "sync.connect_timeout_ms", s.connect_timeout_ms);
        ms(&mut p, "sync.keep_alive_ms", s.keep_alive_ms);
        ms(&mut p, "sync.idle_timeout_ms", s.idle_timeout_ms);
        if s.keep_alive_ms >= s.idle_timeout_ms {
            p.add(
                "sync.keep_alive_ms",
                format!(
                    "must be below sync.idle_timeout_ms ({}), or a healthy link idles out",
                    s.idle_timeout_ms
                ),
            );
        }
        if !(1..=MAX_BACKOFF_MS).contains(&s.backoff_initial_ms) {
            p.add(
                "sync.backoff_initial_ms",
                format!("must be 1..={MAX_BACKOFF_MS}"),
            );
        }
        if s.backoff_max_ms < s.backoff_initial_ms || s.backoff_max_ms > MAX_BACKOFF_MS {
            p.add(
                "sync.backoff_max_ms",
                format!("must be sync.backoff_initial_ms..={MAX_BACKOFF_MS}"),
            );
        }
        let (lo, hi) = (
            outpost_protocol::MIN_PROTOCOL_VERSION,
            outpost_protocol::PROTOCOL_VERSION,
        );
        if !(lo..=hi).contains(&s.protocol_version_max) {
            p.add(
                "sync.protocol_version_max",
                format!(
                    "must be {lo}..={hi} (the versions this build speaks), got {}",
                    s.protocol_version_max
                ),
            );
        }
        if s.renew_before_days > MAX_RENEW_BEFORE_DAYS {
            p.add(
                "sync.renew_before_days",
                format!(
                    "must be 0..={MAX_RENEW_BEFORE_DAYS}, got {}",
                    s.renew_before_days
                ),
            );
        }
        for (key, v) in [
            ("sync.send_window_bytes", s.send_window_bytes),
            ("sync.receive_window_bytes", s.receive_window_bytes),
        ] {
            if !WINDOW_BYTES_RANGE.contains(&v) {
                p.add(
                    key,
                    format!(
                        "must be {}..={} bytes, got {v}",
                        WINDOW_BYTES_RANGE.start(),
                        WINDOW_BYTES_RANGE.end()
                    ),
                );
            }
        }
        if !(1..=DEFAULT_BATCH_MAX_EVENTS).contains(&s.batch_max_events) {
            p.add(
                "sync.batch_max_events",
                format!("must be 1..={MAX_EVENTS_PER_BATCH}"),
            );
        }
        if s.window_events < s.batch_max_events.max(1) || s.window_events > MAX_WINDOW_EVENTS {
            p.add(
                "sync.window_events",
                format!("must be sync.batch_max_events..={MAX_WINDOW_EVENTS}"),
            );
        }

        let deadline_ms = self.allowance.request_deadline_ms;
        if !REQUEST_DEADLINE_RANGE_MS.contains(&deadline_ms) {
            p.add(
                "allowance.request_deadline_ms",
                format!(
                    "must be {}..={} ms, got {deadline_ms}",
                    REQUEST_DEADLINE_RANGE_MS.start(),
                    REQUEST_DEADLINE_RANGE_MS.end()
                ),
            );
        }

        let heartbeat_secs = self.health.heartbeat_secs;
        if !HEARTBEAT_RANGE_SECS.contains(&heartbeat_secs) {
            p.add(
                "health.heartbeat_secs",
                format!(
                    "must be {}..={} s, got {heartbeat_secs}",
                    HEARTBEAT_RANGE_SECS.start(),
                    HEARTBEAT_RANGE_SECS.end()
                ),
            );
        }

        let o = &self.outbox;
        if o.retain_acked_secs > MAX_RETAIN_ACKED_SECS {
            p.add(
                "outbox.retain_acked_secs",
                format!(
                    "must be 0..={MAX_RETAIN_ACKED_SECS} s (0 keeps no acknowledged event), got {}",
                    o.retain_acked_secs
                ),
            );
        }
        if o.retain_acked_max_events > MAX_RETAIN_ACKED_EVENTS {
            p.add(
                "outbox.retain_acked_max_events",
                format!(
                    "must be 0..={MAX_RETAIN_ACKED_EVENTS} (0 keeps no acknowledged event), got {}",
                    o.retain_acked_max_events
                ),
            );
        }

        let problems = p.0;
        match listen {
            Some(listen) if problems.is_empty() => Ok(Settings {
                site_id: self.site_id.clone(),
                data_dir: self.data_dir.clone(),
                api: ApiSettings {
                    listen,
                    clients,
                    max_body_bytes: usize::try_from(self.api.max_body_bytes)
                        .expect("bounded by MAX_MAX_BODY_BYTES"),
                    rate_limit_burst: self.api.rate_limit_burst,
                    header_read_timeout: Duration::from_millis(self.api.header_read_timeout_ms),
                    max_connections: usize::try_from(self.api.max_connections)
                        .expect("bounded by MAX_MAX_CONNECTIONS"),
                },
                sync: SyncSettings {
                    central_addr: s.central_addr.clone(),
                    central_name: s.central_name.clone(),
                    ca_cert: s.ca_cert.clone(),
                    cert: s.cert.clone(),
                    key: s.key.clone(),
                    connect_timeout: Duration::from_millis(s.connect_timeout_ms),
                    keep_alive: Duration::from_millis(s.keep_alive_ms),
                    idle_timeout: Duration::from_millis(s.idle_timeout_ms),
                    backoff_initial: Duration::from_millis(s.backoff_initial_ms),
                    backoff_max: Duration::from_millis(s.backoff_max_ms),
                    batch_max_events: s.batch_max_events,
                    window_events: s.window_events,
                    send_window_bytes: s.send_window_bytes,
                    receive_window_bytes: s.receive_window_bytes,
                    protocol_version_max: s.protocol_version_max,
                    renew_before: Duration::from_secs(
                        s.renew_before_days.min(MAX_RENEW_BEFORE_DAYS) * 86_400,
                    ),
                },
                allowance: AllowanceSettings {
                    request_deadline: Duration::from_millis(deadline_ms),
                },
                health: HealthSettings {
                    heartbeat: Duration::from_secs(heartbeat_secs),
                },
                retention: Retention {
                    max_age_secs: o.retain_acked_secs,
                    max_events: o.retain_acked_max_events,
                },
                log_format: self.log.format,
            }),
            _ => Err(problems),
        }
    }

    /// Checks every `[[api.tokens]]` entry, naming each problem by `api.tokens[i].key`, and returns
    /// the clients (complete only when no problem was added). Messages never quote a token or a
    /// hash: `check-config` output ends up in logs.
    fn check_tokens(&self, p: &mut Problems) -> Vec<ApiClient> {
        let tokens = &self.api.tokens;
        if tokens.is_empty() {
            p.add(
                "api.tokens",
                "at least one [[api.tokens]] client (name, role, sha256) is required",
            );
        } else if tokens.len() > MAX_TOKENS {
            p.add("api.tokens", format!("at most {MAX_TOKENS} tokens"));
        }
        let roles = Role::ALL.map(Role::as_str).join(", ");
        let mut clients: Vec<ApiClient> = Vec::new();
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut hashes: BTreeMap<[u8; 32], usize> = BTreeMap::new();
        for (i, entry) in tokens.iter().enumerate() {
            let key = |k: &str| format!("api.tokens[{i}].{k}");
            let t = match entry {
                TokenEntry::Client(t) => t,
                TokenEntry::Plain(_) => {
                    p.add(&format!("api.tokens[{i}]"), PLAIN_TOKEN_MESSAGE);
                    continue;
                }
                TokenEntry::Invalid(v) => {
                    check_invalid_token_entry(p, i, v);
                    continue;
                }
            };
            let mut ok = true;
            if !valid_client_name(&t.name) {
                ok = false;
                p.add(
                    &key("name"),
                    format!(
                        "must be 1..={MAX_CLIENT_NAME_LEN} characters of A-Z a-z 0-9 . _ -, got {:?}",
                        t.name
                    ),
                );
            } else if let Some(first) = names.insert(&t.name, i) {
                ok = false;
                p.add(
                    &key("name"),
                    format!("{:?} is also the name of api.tokens[{first}]", t.name),
                );
            }
            let role = Role::parse(&t.role);
            if role.is_none() {
                ok = false;
                p.add(
                    &key("role"),
                    format!("must be one of {roles}, got {:?}", t.role),
                );
            }
            let hash = parse_sha256_hex(&t.sha256);
            match hash {
                None => {
                    ok = false;
                    p.add(
                        &key("sha256"),
                        format!(
                            "must be 64 lower-case hex characters (the SHA-256 of the token, from \
                             `outpost-agent hash-token`), got {} characters",
                            t.sha256.len()
                        ),
                    );
                }
                Some(h) => {
                    if let Some(first) = hashes.insert(h, i) {
                        ok = false;
                        p.add(
                            &key("sha256"),
                            format!(
                                "is the same as api.tokens[{first}].sha256: each client needs its own token"
                            ),
                        );
                    }
                }
            }
            if let Some(r) = t.rate_per_sec
                && !(1..=MAX_RATE_LIMIT).contains(&r)
            {
                ok = false;
                p.add(
                    &key("rate_per_sec"),
                    format!("must be 1..={MAX_RATE_LIMIT}, got {r}"),
                );
            }
            if let (true, Some(role), Some(sha256)) = (ok, role, hash) {
                clients.push(ApiClient {
                    name: t.name.clone(),
                    role,
                    sha256,
                    rate_per_sec: t.rate_per_sec.unwrap_or(self.api.rate_limit_per_sec),
                });
            }
        }
        clients
    }

    /// The CA, certificate and key must be readable PEM, and the certificate must name this site:
    /// central takes the site from the certificate, so a mismatch would be refused at every
    /// connection. Better to say so before starting.
    fn check_tls_files(&self, p: &mut Problems) {
        let s = &self.sync;
        for (key, path) in [
            ("sync.ca_cert", &s.ca_cert),
            ("sync.cert", &s.cert),
            ("sync.key", &s.key),
        ] {
            if path.as_os_str().is_empty() {
                p.add(key, "is required");
            }
        }
        if !s.ca_cert.as_os_str().is_empty()
            && let Err(e) = tls::read_certs(&s.ca_cert)
        {
            p.add("sync.ca_cert", e);
        }
        if !s.cert.as_os_str().is_empty() {
            match tls::read_certs(&s.cert) {
                Err(e) => p.add("sync.cert", e),
                Ok(chain) => match identity::site_id_from_cert_der(chain[0].as_ref()) {
                    Err(e) => p.add("sync.cert", e),
                    Ok(id) if !self.site_id.is_empty() && id != self.site_id => p.add(
                        "sync.cert",
                        format!(
                            "the certificate is for site {id:?} but site_id is {:?}",
                            self.site_id
                        ),
                    ),
                    Ok(_) => {}
                },
            }
        }
        if !s.key.as_os_str().is_empty()
            && let Err(e) = tls::read_key(&s.key)
        {
            p.add("sync.key", e);
        }
    }
}

/// Names what is wrong with an `api.tokens` entry that is neither a string nor a well-formed table:
/// unknown keys, missing keys, values of the wrong type. Values are never quoted.
fn check_invalid_token_entry(p: &mut Problems, i: usize, v: &serde_json::Value) {
    let Some(table) = v.as_object() else {
        p.add(
            &format!("api.tokens[{i}]"),
            "must be an [[api.tokens]] table with name, role and sha256",
        );
        return;
    };
    let mut named = false;
    for k in table.keys() {
        if !TOKEN_KEYS.contains(&k.as_str()) {
            named = true;
            p.add(&format!("api.tokens[{i}].{k}"), "unknown key");
        }
    }
    for k in ["name", "role", "sha256"] {
        match table.get(k) {
            None => {
                named = true;
                p.add(&format!("api.tokens[{i}].{k}"), "is required");
            }
            Some(v) if !v.is_string() => {
                named = true;
                p.add(&format!("api.tokens[{i}].{k}"), "must be a string");
            }
            Some(_) => {}
        }
    }
    if let Some(r) = table.get("rate_per_sec")
        && !r.is_u64()
    {
        named = true;
        p.add(
            &format!("api.tokens[{i}].rate_per_sec"),
            format!("must be an integer 1..={MAX_RATE_LIMIT}"),
        );
    }
    if !named {
        p.add(
            &format!("api.tokens[{i}]"),
            "must be an [[api.tokens]] table with name, role and sha256",
        );
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: &str, message: impl fmt::Display) {
        self.0.push(Problem {
            key: key.to_string(),
            message: message.to_string(),
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::Pki;

    /// The admin token of `write_config`'s file.
    pub(crate) const TEST_TOKEN: &str = "0123456789abcdef0123456789abcdef";

    pub(crate) fn write_config(dir: &Path, pki: &Pki, site: &str, extra_sync: &str) -> PathBuf {
        let text = format!(
            r#"
site_id = "{site}"
data_dir = "data/{site}"

[api]
listen = "127.0.0.1:0"

[[api.tokens]]
name = "test-admin"
role = "admin"
sha256 = "{hash}"

[sync]
central_addr = "127.0.0.1:7601"
central_name = "central.outpost.local"
ca_cert = "certs/ca.pem"
cert = "certs/{site}.pem"
key = "certs/{site}.key"
{extra_sync}
"#,
            hash = to_hex(&hash_token(TEST_TOKEN.as_bytes()))
        );
        pki.write_site_files(&dir.join("certs"), site);
        let path = dir.join(format!("{site}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Goal: the documented example parses, defaults apply and relative paths are resolved
    /// against the config file's directory (not the working directory).
    #[test]
    fn valid_example_parses_with_defaults_and_resolved_paths() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        let s = load_with_env(&path, BTreeMap::new()).unwrap();
        assert_eq!(s.site_id, "plant-1");
        assert_eq!(s.data_dir, dir.path().join("data/plant-1"));
        assert_eq!(s.sync.ca_cert, dir.path().join("certs/ca.pem"));
        assert_eq!(s.api.max_body_bytes, 65536);
        assert_eq!(s.sync.idle_timeout, Duration::from_millis(2000));
        assert_eq!(s.sync.batch_max_events, 1000);
        assert_eq!(s.sync.window_events, 20_000);
        assert_eq!(s.api.listen.port(), 0);
        assert_eq!(s.store_path(), dir.path().join("data/plant-1/agent.redb"));
        assert_eq!(s.allowance.request_deadline, Duration::from_millis(300));
    }

    /// Goal: `[allowance] request_deadline_ms` is optional, read from the file or the
    /// environment, and refused outside 1..=5000 by its key.
    #[test]
    fn allowance_deadline_is_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        let text =
            std::fs::read_to_string(&path).unwrap() + "\n[allowance]\nrequest_deadline_ms = 750\n";
        std::fs::write(&path, &text).unwrap();
        let s = load_with_env(&path, BTreeMap::new()).unwrap();
        assert_eq!(s.allowance.request_deadline, Duration::from_millis(750));
        for bad in ["0", "5001"] {
            let env: BTreeMap<String, String> = [(
                "OUTPOST_ALLOWANCE__REQUEST_DEADLINE_MS".to_string(),
                bad.to_string(),
            )]
            .into();
            let all = load_with_env(&path, env).unwrap_err().problems().join("\n");
            assert!(
                all.contains("allowance.request_deadline_ms: must be 1..=5000"),
                "{all}"
            );
        }
        std::fs::write(&path, text.replace("request_deadline_ms", "deadline")).unwrap();
        let all = load_with_env(&path, BTreeMap::new())
            .unwrap_err()
            .problems()
            .join("\n");
        assert!(all.contains("allowance.deadline: unknown key"), "{all}");
    }

    /// Goal: `[log] format` defaults to text, is read from the file and the environment, and an
    /// unknown format is refused.
    #[test]
    fn log_format_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        let s = load_with_env(&path, BTreeMap::new()).unwrap();
        assert_eq!(s.log_format, LogFormat::Text);
        let env = |v: &str| -> BTreeMap<String, String> {
            [("OUTPOST_LOG__FORMAT".to_string(), v.to_string())].into()
        };
        assert_eq!(
            load_with_env(&path, env("json")).unwrap().log_format,
            LogFormat::Json
        );
        assert!(load_with_env(&path, env("xml")).is_err());
        let path = write_config(dir.path(), &pki, "plant-1", "[log]\nformat = \"json\"\n");
        assert_eq!(
            load_with_env(&path, BTreeMap::new()).unwrap().log_format,
            LogFormat::Json
        );
    }

    /// Goal: `[health] heartbeat_secs` defaults to 5, is read from the environment, and is
    /// refused outside 1..=3600 by its key.
    #[test]
    fn heartbeat_interval_is_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        let s = load_with_env(&path, BTreeMap::new()).unwrap();
        assert_eq!(s.health.heartbeat, Duration::from_secs(5));
        let env = |v: &str| -> BTreeMap<String, String> {
            [("OUTPOST_HEALTH__HEARTBEAT_SECS".to_string(), v.to_string())].into()
        };
        let s = load_with_env(&path, env("1")).unwrap();
        assert_eq!(s.health.heartbeat, Duration::from_secs(1));
        for bad in ["0", "3601"] {
            let all = load_with_env(&path, env(bad))
                .unwrap_err()
                .problems()
                .join("\n");
            assert!(
                all.contains("health.heartbeat_secs: must be 1..=3600"),
                "{all}"
            );
        }
    }

    /// Goal: `[outbox] retain_acked_*` default to a week and a million events, are read from the
    /// file and the environment, accept 0 (keep none), and are refused above their maxima by key.
    #[test]
    fn outbox_retention_is_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        let s = load_with_env(&path, BTreeMap::new()).unwrap();
        assert_eq!(
            s.retention,
            Retention {
                max_age_secs: 604_800,
                max_events: 1_000_000
            }
        );
        let text = std::fs::read_to_string(&path).unwrap()
            + "\n[outbox]\nretain_acked_secs = 3600\nretain_acked_max_events = 0\n";
        std::fs::write(&path, &text).unwrap();
        let s = load_with_env(&path, BTreeMap::new()).unwrap();
        assert_eq!(
            s.retention,
            Retention {
                max_age_secs: 3600,
                max_events: 0
            }
        );
        let env: BTreeMap<String, String> = [
            ("OUTPOST_OUTBOX__RETAIN_ACKED_SECS", "0"),
            ("OUTPOST_OUTBOX__RETAIN_ACKED_MAX_EVENTS", "25"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = load_with_env(&path, env).unwrap();
        assert_eq!(
            s.retention,
            Retention {
                max_age_secs: 0,
                max_events: 25
            }
        );
        let env: BTreeMap<String, String> = [
            ("OUTPOST_OUTBOX__RETAIN_ACKED_SECS", "31536001"),
            ("OUTPOST_OUTBOX__RETAIN_ACKED_MAX_EVENTS", "5000001"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let all = load_with_env(&path, env).unwrap_err().problems().join("\n");
        assert!(
            all.contains("outbox.retain_acked_secs: must be 0..=31536000"),
            "{all}"
        );
        assert!(
            all.contains("outbox.retain_acked_max_events: must be 0..=5000000"),
            "{all}"
        );
        std::fs::write(&path, text.replace("retain_acked_secs", "keep_secs")).unwrap();
        let all = load_with_env(&path, BTreeMap::new())
            .unwrap_err()
            .problems()
            .join("\n");
        assert!(all.contains("outbox.keep_secs: unknown key"), "{all}");
    }

    /// Goal: a broken config reports every problem at once, each by its key.
    /// Method: break many keys in one file and check each one is named.
    #[test]
    fn bad_config_lists_every_problem_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        pki.write_site_files(&dir.path().join("certs"), "plant-1");
        let text = r#"
site_id = "Plant_1"
data_dir = "data"

[api]
listen = "localhost"
tokens = []
max_body_bytes = 10

[sync]
central_addr = "x"
central_name = ""
ca_cert = "certs/missing.pem"
cert = "certs/plant-1.pem"
key = "certs/plant-1.key"
keep_alive_ms = 5000
idle_timeout_ms = 3000
batch_max_events = 5000
window_events = 10
send_window_bytes = 1000
receive_window_bytes = 1000000000
"#;
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let err = load_with_env(&path, BTreeMap::new()).unwrap_err();
        let problems = err.problems();
        let all = problems.join("\n");
        for key in [
            "site_id:",
            "api.listen:",
            "api.tokens:",
            "api.max_body_bytes:",
            "sync.central_addr: invalid socket address \"x\"",
            "sync.central_name:",
            "sync.ca_cert:",
            "sync.keep_alive_ms:",
            "sync.batch_max_events:",
            "sync.window_events:",
            "sync.send_window_bytes:",
            "sync.receive_window_bytes:",
        ] {
            assert!(all.contains(key), "{key} missing from:\n{all}");
        }
        // The certificate names plant-1, which is not the (invalid) site_id.
        assert!(all.contains("sync.cert:"), "{all}");
    }

    #[test]
    fn unknown_and_missing_keys_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "site_id = \"plant-1\"\nbogus = 1\n[api]\nlisten = \"127.0.0.1:1\"\ncolour = \"red\"\n[sync]\nspeed = 3\n",
        )
        .unwrap();
        let all = load_with_env(&path, BTreeMap::new())
            .unwrap_err()
            .problems()
            .join("\n");
        for key in [
            "bogus: unknown key",
            "api.colour: unknown key",
            "sync.speed: unknown key",
        ] {
            assert!(all.contains(key), "{key} missing from:\n{all}");
        }
        let path2 = dir.path().join("d.toml");
        std::fs::write(&path2, "site_id = \"plant-1\"\n").unwrap();
        let all = load_with_env(&path2, BTreeMap::new())
            .unwrap_err()
            .problems()
            .join("\n");
        for key in [
            "data_dir: is required",
            "api.listen: is required",
            "api.tokens:",
            "sync.central_addr: is required",
            "sync.central_name: is required",
            "sync.ca_cert: is required",
            "sync.cert: is required",
            "sync.key: is required",
        ] {
            assert!(all.contains(key), "{key} missing from:\n{all}");
        }
    }

    /// Goal: `OUTPOST_*` variables override file keys, nested with `__`.
    #[test]
    fn env_overrides_apply() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        let env: BTreeMap<String, String> = [
            ("OUTPOST_SYNC__CENTRAL_ADDR", "127.0.0.1:9000"),
            ("OUTPOST_SYNC__IDLE_TIMEOUT_MS", "5000"),
            ("OUTPOST_API__LISTEN", "127.0.0.1:7777"),
            ("OUTPOST_API__RATE_LIMIT_PER_SEC", "5"),
            ("OUTPOST_API__RATE_LIMIT_BURST", "7"),
            ("OUTPOST_API__HEADER_READ_TIMEOUT_MS", "500"),
            ("OUTPOST_API__MAX_CONNECTIONS", "8"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = load_with_env(&path, env).unwrap();
        assert_eq!(s.sync.central_addr, "127.0.0.1:9000");
        assert_eq!(s.sync.idle_timeout, Duration::from_millis(5000));
        assert_eq!(s.api.listen.port(), 7777);
        assert_eq!(s.api.clients.len(), 1);
        assert_eq!(
            s.api.clients[0].rate_per_sec, 5,
            "the default follows the env"
        );
        assert_eq!(s.api.rate_limit_burst, 7);
        assert_eq!(s.api.header_read_timeout, Duration::from_millis(500));
        assert_eq!(s.api.max_connections, 8);

        // Tokens are TOML-only; the old comma-separated form is refused with a reason.
        let tokens: BTreeMap<String, String> = [(
            "OUTPOST_API__TOKENS".to_string(),
            "aaaaaaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbbbbbb".to_string(),
        )]
        .into();
        let all = load_with_env(&path, tokens)
            .unwrap_err()
            .problems()
            .join("\n");
        assert!(
            all.contains("api.tokens: cannot be set from the environment"),
            "{all}"
        );
        assert!(
            !all.contains("aaaaaaaaaaaaaaaaaaaa"),
            "no token echoed: {all}"
        );

        let bad: BTreeMap<String, String> =
            [("OUTPOST_SYNC__CENTRAL_ADDR".to_string(), "nope".to_string())].into();
        let all = load_with_env(&path, bad).unwrap_err().problems().join("\n");
        assert!(all.contains("sync.central_addr"), "{all}");
    }

    /// Writes `write_config`'s file with `tokens` (TOML) in place of its `[[api.tokens]]` table.
    fn with_tokens(dir: &Path, pki: &Pki, tokens: &str) -> PathBuf {
        let path = write_config(dir, pki, "plant-1", "");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find("[[api.tokens]]").unwrap();
        let end = text.find("[sync]").unwrap();
        let text = format!("{}{tokens}\n{}", &text[..start], &text[end..]);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Goal: hashed, role-scoped clients load with their names, roles, hashes and rate limits; the
    /// API limits have their documented defaults; Debug output never shows a hash or a token.
    #[test]
    fn clients_load_with_roles_and_defaults_and_debug_redacts_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let h1 = to_hex(&hash_token(b"scanner-token-0123456789"));
        let h2 = to_hex(&hash_token(b"orders-token-0123456789"));
        let path = with_tokens(
            dir.path(),
            &pki,
            &format!(
                "[[api.tokens]]\nname = \"scanners\"\nrole = \"scanner\"\nsha256 = \"{h1}\"\nrate_per_sec = 50\n\n\
                 [[api.tokens]]\nname = \"erp.orders_1\"\nrole = \"order-entry\"\nsha256 = \"{h2}\"\n"
            ),
        );
        let s = load_with_env(&path, BTreeMap::new()).unwrap();
        let c = &s.api.clients;
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].name.as_str(), c[0].role), ("scanners", Role::Scanner));
        assert_eq!(c[0].rate_per_sec, 50);
        assert_eq!(c[0].sha256, hash_token(b"scanner-token-0123456789"));
        assert_eq!(
            (c[1].name.as_str(), c[1].role),
            ("erp.orders_1", Role::OrderEntry)
        );
        assert_eq!(c[1].rate_per_sec, DEFAULT_RATE_LIMIT_PER_SEC);
        assert_eq!(s.api.rate_limit_burst, 2_000);
        assert_eq!(s.api.header_read_timeout, Duration::from_millis(5_000));
        assert_eq!(s.api.max_connections, 1_024);
        let dbg = format!("{s:?}");
        assert!(
            dbg.contains("scanners") && dbg.contains("OrderEntry"),
            "{dbg}"
        );
        assert!(!dbg.contains(&h1) && !dbg.contains(&h2), "{dbg}");
        let raw: AgentConfig = toml_like(
            &std::fs::read_to_string(&path).unwrap(),
            &dir.path().join("x.toml"),
        );
        let dbg = format!("{raw:?}");
        assert!(dbg.contains("scanners") && !dbg.contains(&h1), "{dbg}");
    }

    /// Parses a config file's text as `AgentConfig` (no validation), through the same reader.
    fn toml_like(text: &str, path: &Path) -> AgentConfig {
        std::fs::write(path, text).unwrap();
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    /// Goal: the old `tokens = ["plain"]` form is refused, telling the operator to hash tokens with
    /// `outpost-agent hash-token`, without echoing the token.
    #[test]
    fn plain_text_tokens_are_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        // The old form sits in `[api]` itself, in place of the tables.
        let path = with_tokens(dir.path(), &pki, "");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\ntokens = [\"0123456789abcdef0123456789abcdef\"]",
        );
        std::fs::write(&path, text).unwrap();
        let all = load_with_env(&path, BTreeMap::new())
            .unwrap_err()
            .problems()
            .join("\n");
        assert!(
            all.contains("api.tokens[0]: plain-text tokens are no longer accepted"),
            "{all}"
        );
        assert!(all.contains("outpost-agent hash-token"), "{all}");
        assert!(!all.contains("0123456789abcdef0123456789abcdef"), "{all}");
        // A bare string (not even a list) is the same mistake, reported the same way.
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "tokens = [\"0123456789abcdef0123456789abcdef\"]",
            "tokens = \"0123456789abcdef0123456789abcdef\"",
        );
        std::fs::write(&path, text).unwrap();
        let all = load_with_env(&path, BTreeMap::new())
            .unwrap_err()
            .problems()
            .join("\n");
        assert!(
            all.contains("api.tokens[0]: plain-text tokens are no longer accepted"),
            "{all}"
        );
        assert!(!all.contains("0123456789abcdef0123456789abcdef"), "{all}");
    }

    /// Goal: every problem of every client entry is reported at once by its key, and no hash or
    /// token is quoted. Method: one file with a bad name, a duplicate name, an unknown role, a
    /// short hash, a duplicate hash, a zero rate, an unknown key and a missing key.
    #[test]
    fn every_token_problem_is_listed_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let h = to_hex(&hash_token(b"some-token-0123456789"));
        let upper = h.to_uppercase();
        let path = with_tokens(
            dir.path(),
            &pki,
            &format!(
                "[[api.tokens]]\nname = \"bad name!\"\nrole = \"reader\"\nsha256 = \"{h}\"\n\
                 [[api.tokens]]\nname = \"a\"\nrole = \"superuser\"\nsha256 = \"{upper}\"\n\
                 [[api.tokens]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{h}\"\nrate_per_sec = 0\n\
                 [[api.tokens]]\nname = \"b\"\nrole = \"admin\"\ntoken = \"x\"\n"
            ),
        );
        let env: BTreeMap<String, String> = [
            ("OUTPOST_API__RATE_LIMIT_BURST", "0"),
            ("OUTPOST_API__HEADER_READ_TIMEOUT_MS", "10"),
            ("OUTPOST_API__MAX_CONNECTIONS", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let all = load_with_env(&path, env).unwrap_err().problems().join("\n");
        for key in [
            "api.tokens[0].name: must be 1..=64 characters",
            "api.tokens[1].role: must be one of reader, scanner, order-entry, admin",
            "api.tokens[1].sha256: must be 64 lower-case hex characters",
            "api.tokens[2].name: \"a\" is also the name of api.tokens[1]",
            "api.tokens[2].sha256: is the same as api.tokens[0].sha256",
            "api.tokens[2].rate_per_sec: must be 1..=",
            "api.tokens[3].token: unknown key",
            "api.tokens[3].sha256: is required",
            "api.rate_limit_burst: must be 1..=",
            "api.header_read_timeout_ms: must be 100..=60000 ms",
            "api.max_connections: must be 1..=",
        ] {
            assert!(all.contains(key), "{key} missing from:\n{all}");
        }
        assert!(
            !all.contains(&h) && !all.contains(&upper),
            "no hash quoted: {all}"
        );
    }

    /// Goal: the hashing helpers agree with the SHA-256 test vector and round-trip through hex.
    #[test]
    fn token_hashing_and_hex() {
        assert_eq!(
            to_hex(&hash_token(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let h = hash_token(b"0123456789abcdef");
        assert_eq!(parse_sha256_hex(&to_hex(&h)), Some(h));
        assert_eq!(parse_sha256_hex(&to_hex(&h).to_uppercase()), None);
        assert_eq!(parse_sha256_hex("ab"), None);
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789abcdef 0123").is_err());
        let t = generate_token();
        assert_eq!(t.len(), 64);
        assert!(check_token(&t).is_ok());
        assert_ne!(t, generate_token());
        for (role, needed, ok) in [
            (Role::Reader, Role::Reader, true),
            (Role::Reader, Role::Scanner, false),
            (Role::Scanner, Role::Scanner, true),
            (Role::Scanner, Role::OrderEntry, false),
            (Role::OrderEntry, Role::OrderEntry, true),
            (Role::OrderEntry, Role::Scanner, false),
            (Role::OrderEntry, Role::Admin, false),
            (Role::Admin, Role::Scanner, true),
            (Role::Admin, Role::Admin, true),
        ] {
            assert_eq!(role.allows(needed), ok, "{role} for {needed}");
        }
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn certificate_for_another_site_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        pki.write_site_files(&dir.path().join("certs2"), "plant-2");
        let env: BTreeMap<String, String> = [(
            "OUTPOST_SYNC__CERT".to_string(),
            dir.path().join("certs2/plant-2.pem").display().to_string(),
        )]
        .into();
        let all = load_with_env(&path, env).unwrap_err().problems().join("\n");
        assert!(
            all.contains("sync.cert: the certificate is for site \"plant-2\""),
            "{all}"
        );
    }

    /// The agent's config schema, as the reference is rendered from it.
    fn schema() -> serde_json::Value {
        schemars::schema_for!(AgentConfig).to_value()
    }

    /// An environment variable's text for a documented value (strings unquoted).
    fn env_text(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// Writes a config document (the file's shape as JSON) as a TOML file.
    fn write_toml(path: &Path, doc: &serde_json::Value) {
        std::fs::write(path, toml::to_string(doc).unwrap()).unwrap();
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

    /// Points a config document's data directory and certificate files at `dir`'s (the
    /// documented examples name a production layout).
    fn use_test_files(doc: &mut serde_json::Value, dir: &Path) {
        let s = |p: PathBuf| serde_json::Value::String(p.display().to_string());
        doc["data_dir"] = s(dir.join("data"));
        doc["sync"]["ca_cert"] = s(dir.join("certs/ca.pem"));
        doc["sync"]["cert"] = s(dir.join("certs/plant-1.pem"));
        doc["sync"]["key"] = s(dir.join("certs/plant-1.key"));
    }

    /// Goal: the reference describes every key fully: a meaning, a unit for every number that
    /// agrees with the key's suffix, an example for every required key.
    #[test]
    fn reference_describes_every_key() {
        let problems = config_reference::check(&schema());
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        let md = reference_markdown();
        for key in [
            "`sync.connect_timeout_ms` | `3000` (3 s) | ms | 50..=600000 | `OUTPOST_SYNC__CONNECT_TIMEOUT_MS`",
            "`site_id` | required, e.g. `\"plant-1\"`",
            "`api.tokens[i].sha256` | required, secret |",
            "`api.tokens` | required | — |  | file only |",
        ] {
            assert!(md.contains(key), "{key} missing from:\n{md}");
        }
    }

    /// Goal: every documented default loads and validates, writing it out means the same as
    /// leaving the key out, and every environment variable the reference names sets its key.
    /// Method: a file setting every key to its documented default (required keys to their
    /// example); a file with only the required keys; and a file with only the file-only keys
    /// (the client tables) plus every other key as its `OUTPOST_*` variable. All three must load
    /// to the same settings.
    #[test]
    fn every_documented_default_and_variable_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        pki.write_site_files(&dir.path().join("certs"), "plant-1");
        let schema = schema();

        let mut full = config_reference::example_document(&schema, false);
        use_test_files(&mut full, dir.path());
        let full_path = dir.path().join("full.toml");
        write_toml(&full_path, &full);
        let from_full = load_with_env(&full_path, BTreeMap::new())
            .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&full_path).unwrap()));

        let mut required = config_reference::example_document(&schema, true);
        use_test_files(&mut required, dir.path());
        let required_path = dir.path().join("required.toml");
        write_toml(&required_path, &required);
        let from_required = load_with_env(&required_path, BTreeMap::new()).unwrap();
        // Keys without a default (a client's `rate_per_sec`) were set to their example: only the
        // defaults are compared.
        let mut defaults = full.clone();
        for key in config_reference::tables(&schema)
            .iter()
            .flat_map(|t| &t.keys)
            .filter(|k| !k.required && k.default.as_ref().is_none_or(|d| d.is_null()))
        {
            remove_key(&mut defaults, &key.path);
        }
        let defaults_path = dir.path().join("defaults.toml");
        write_toml(&defaults_path, &defaults);
        let from_defaults = load_with_env(&defaults_path, BTreeMap::new()).unwrap();
        assert_eq!(format!("{from_defaults:?}"), format!("{from_required:?}"));
        assert_eq!(from_defaults.log_format, from_required.log_format);

        let mut env = BTreeMap::new();
        let mut file_only = serde_json::Map::new();
        for table in config_reference::tables(&schema) {
            for key in table.keys.iter().filter(|k| !k.removed) {
                let path: Vec<&str> = key.path.iter().map(String::as_str).collect();
                let value = full.pointer(&format!("/{}", path.join("/")));
                match (key.env_settable, value) {
                    (true, Some(v)) => {
                        env.insert(ENV_NAMING.var(&path), env_text(v));
                    }
                    (false, Some(v)) if path.len() == 2 => {
                        let section = file_only
                            .entry(path[0])
                            .or_insert_with(|| serde_json::json!({}));
                        section[path[1]] = v.clone();
                    }
                    _ => {}
                }
            }
        }
        assert!(
            env.contains_key("OUTPOST_SYNC__CONNECT_TIMEOUT_MS"),
            "{env:?}"
        );
        let env_path = dir.path().join("env.toml");
        write_toml(&env_path, &serde_json::Value::Object(file_only));
        let from_env = load_with_env(&env_path, env).unwrap();
        assert_eq!(format!("{from_full:?}"), format!("{from_env:?}"));
        assert_eq!(from_full.log_format, from_env.log_format);
    }

    /// Goal: the ranges the reference shows are the ones `validate` enforces. Method: for every
    /// key with a documented bound, set it one past the bound through its `OUTPOST_*` variable
    /// over a valid file, and check that the problem names the key.
    #[test]
    fn documented_ranges_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let path = write_config(dir.path(), &pki, "plant-1", "");
        let mut probed = 0;
        for table in config_reference::tables(&schema()) {
            for key in table.keys.iter().filter(|k| k.env_settable && !k.removed) {
                let path_parts: Vec<&str> = key.path.iter().map(String::as_str).collect();
                let var = ENV_NAMING.var(&path_parts);
                for outside in config_reference::outside_values(key) {
                    let env: BTreeMap<String, String> = [(var.clone(), outside.clone())].into();
                    let all = match load_with_env(&path, env) {
                        Ok(_) => String::new(),
                        Err(e) => e.problems().join("\n"),
                    };
                    let dotted = key.dotted();
                    assert!(
                        all.lines().any(|l| l.starts_with(&format!("{dotted}:"))),
                        "{var}={outside} (outside the documented range) is not refused by \
                         {dotted}:\n{all}"
                    );
                    probed += 1;
                }
            }
        }
        assert!(probed >= 20, "only {probed} bounds probed");
    }

    #[test]
    fn host_port_forms() {
        for ok in ["127.0.0.1:1", "[::1]:7601", "central.example.net:7601"] {
            assert!(outpost_protocol::identity::valid_host_port(ok), "{ok}");
        }
        for bad in ["x", "x:0", ":1", "a b:1", "host:99999"] {
            assert!(!outpost_protocol::identity::valid_host_port(bad), "{bad}");
        }
    }
}
