//! Agent configuration: a TOML file plus `OUTPOST_*` environment overrides, checked as a whole so
//! that every problem is reported at once, each naming its key. Reads local files only (the config
//! and the certificates it names); no network.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::MAX_EVENTS_PER_BATCH;
use outpost_protocol::identity;
use serde::{Deserialize, Serialize};

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
/// Shortest bearer token: 16 characters of a random hex token is 64 bits, the least we accept.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest bearer token, to keep header sizes bounded.
pub const MAX_TOKEN_LEN: usize = 256;
/// Most bearer tokens in one config (one per client system is plenty).
pub const MAX_TOKENS: usize = 256;
/// Longest site id this agent accepts: order ids are `{site}-o{seq}` and must fit
/// `outpost_protocol::MAX_ID_LEN` (64) with a 20-digit sequence number: 64 - 2 - 20 = 42.
pub const MAX_SITE_ID_LEN_FOR_ORDER_IDS: usize = 42;

/// Default QUIC connect timeout (handshake included).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Default QUIC keep-alive interval: well below the idle timeout so a healthy link never idles out.
pub const DEFAULT_KEEP_ALIVE_MS: u64 = 1_000;
/// Default QUIC idle timeout: how quickly an outage is noticed.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 3_000;
/// Default first reconnect delay (before jitter).
pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 100;
/// Default cap on the reconnect delay (before jitter).
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 2_000;
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

/// The config file as written (`[api]`, `[sync]`). Every field has a default so that all missing
/// keys are reported together by `validate` rather than one at a time by the deserializer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub site_id: String,
    pub data_dir: PathBuf,
    pub api: ApiConfig,
    pub sync: SyncConfig,
    pub allowance: AllowanceConfig,
}

/// `[allowance]`: how the agent asks central for more allowance while an order waits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowanceConfig {
    pub request_deadline_ms: u64,
}

impl Default for AllowanceConfig {
    fn default() -> Self {
        AllowanceConfig {
            request_deadline_ms: DEFAULT_REQUEST_DEADLINE_MS,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: String,
    pub tokens: Vec<String>,
    pub max_body_bytes: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: String::new(),
            tokens: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

impl fmt::Debug for ApiConfig {
    /// Tokens are secrets: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    pub central_addr: String,
    pub central_name: String,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub connect_timeout_ms: u64,
    pub keep_alive_ms: u64,
    pub idle_timeout_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub batch_max_events: u64,
    pub window_events: u64,
}

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
}

#[derive(Clone, Debug)]
pub struct AllowanceSettings {
    /// Longest an order waits for central's answer and the granted revision.
    pub request_deadline: Duration,
}

#[derive(Clone)]
pub struct ApiSettings {
    pub listen: SocketAddr,
    pub tokens: Vec<String>,
    pub max_body_bytes: usize,
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
            .field("api.listen", &self.api.listen)
            .field(
                "api.tokens",
                &format_args!("[{} redacted]", self.api.tokens.len()),
            )
            .field("api.max_body_bytes", &self.api.max_body_bytes)
            .field("sync", &self.sync)
            .field("allowance", &self.allowance)
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

const ROOT_KEYS: &[&str] = &["site_id", "data_dir", "api", "sync", "allowance"];
const ALLOWANCE_KEYS: &[&str] = &["request_deadline_ms"];
const API_KEYS: &[&str] = &["listen", "tokens", "max_body_bytes"];
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
];

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
                .list_separator(",")
                .with_list_parse_key("api.tokens")
                .source(Some(env.into_iter().collect())),
        )
        .build()
        .map_err(read_err)?;

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
        if self.api.tokens.is_empty() {
            p.add("api.tokens", "at least one token is required");
        } else if self.api.tokens.len() > MAX_TOKENS {
            p.add("api.tokens", format!("at most {MAX_TOKENS} tokens"));
        }
        for (i, t) in self.api.tokens.iter().enumerate() {
            if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&t.len())
                || !t.bytes().all(|b| b.is_ascii_graphic())
            {
                p.add(
                    &format!("api.tokens[{i}]"),
                    format!(
                        "must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} visible ASCII characters (no spaces)"
                    ),
                );
            }
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
        } else if !valid_host_port(&s.central_addr) {
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

        let problems = p.0;
        match listen {
            Some(listen) if problems.is_empty() => Ok(Settings {
                site_id: self.site_id.clone(),
                data_dir: self.data_dir.clone(),
                api: ApiSettings {
                    listen,
                    tokens: self.api.tokens.clone(),
                    max_body_bytes: usize::try_from(self.api.max_body_bytes)
                        .expect("bounded by MAX_MAX_BODY_BYTES"),
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
                },
                allowance: AllowanceSettings {
                    request_deadline: Duration::from_millis(deadline_ms),
                },
            }),
            _ => Err(problems),
        }
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

/// `ip:port`, `[ipv6]:port` or `host:port` with a non-zero port.
fn valid_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    port_ok && host_ok
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

    pub(crate) fn write_config(dir: &Path, pki: &Pki, site: &str, extra_sync: &str) -> PathBuf {
        let text = format!(
            r#"
site_id = "{site}"
data_dir = "data/{site}"

[api]
listen = "127.0.0.1:0"
tokens = ["0123456789abcdef0123456789abcdef"]

[sync]
central_addr = "127.0.0.1:7601"
central_name = "central.outpost.local"
ca_cert = "certs/ca.pem"
cert = "certs/{site}.pem"
key = "certs/{site}.key"
{extra_sync}
"#
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
        assert_eq!(s.sync.idle_timeout, Duration::from_millis(3000));
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
            (
                "OUTPOST_API__TOKENS",
                "aaaaaaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbbbbbb",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = load_with_env(&path, env).unwrap();
        assert_eq!(s.sync.central_addr, "127.0.0.1:9000");
        assert_eq!(s.sync.idle_timeout, Duration::from_millis(5000));
        assert_eq!(s.api.listen.port(), 7777);
        assert_eq!(s.api.tokens.len(), 2);

        let bad: BTreeMap<String, String> =
            [("OUTPOST_SYNC__CENTRAL_ADDR".to_string(), "nope".to_string())].into();
        let all = load_with_env(&path, bad).unwrap_err().problems().join("\n");
        assert!(all.contains("sync.central_addr"), "{all}");
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

    #[test]
    fn host_port_forms() {
        for ok in ["127.0.0.1:1", "[::1]:7601", "central.example.net:7601"] {
            assert!(valid_host_port(ok), "{ok}");
        }
        for bad in ["x", "x:0", ":1", "a b:1", "host:99999"] {
            assert!(!valid_host_port(bad), "{bad}");
        }
    }
}
