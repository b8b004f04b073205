//! The agent's config file as data: every key with its doc comment (the configuration reference
//! is generated from them), type, default and documented range, and the limits `validate` applies.
//! Pure: no I/O.

use std::fmt;
use std::path::PathBuf;

use outpost_protocol::MAX_EVENTS_PER_BATCH;
use outpost_protocol::config_load::ENV_NAMING;
use outpost_protocol::config_reference;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::to_hex;
use crate::store::{
    DEFAULT_RETAIN_ACKED_EVENTS, DEFAULT_RETAIN_ACKED_SECS, MAX_RETAIN_ACKED_EVENTS,
    MAX_RETAIN_ACKED_SECS,
};

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

// Every field has a default, so that a missing key is reported by `validate` ("is required")
// together with every other problem of the file.

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
    #[schemars(extend("x-required" = true))]
    pub tokens: Vec<TokenConfig>,
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

/// A new random token: `GENERATED_TOKEN_BYTES` bytes as lower-case hex.
pub fn generate_token() -> String {
    let bytes: [u8; GENERATED_TOKEN_BYTES] = rand::random();
    to_hex(&bytes)
}

/// `[sync]`: the QUIC link to central with mutual TLS: where central is, this site's
/// certificate, and the link's timers, batches and windows.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Central's QUIC address: `ip:port` or `host:port` with a non-zero port; a host name is
    /// resolved at each connection attempt. Up to 16 addresses of the same central (for
    /// instance over the plant's WAN and over a backup line) are listed separated by commas:
    /// the agent uses one at a time, moves to the next when an attempt fails or the link is
    /// lost, and backs off only after a whole round of failed attempts.
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
