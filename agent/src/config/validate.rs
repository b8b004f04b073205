//! The agent's `validate`: every rule a loaded config must meet, each problem named by its key,
//! and the settings the agent runs with once it meets them all. Reads the TLS files the config
//! names (to check they load and name this site); no network.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use outpost_protocol::MAX_EVENTS_PER_BATCH;
use outpost_protocol::config_load::{Problem, Problems};
use outpost_protocol::identity;

use super::*;
use crate::store::{MAX_RETAIN_ACKED_EVENTS, MAX_RETAIN_ACKED_SECS, Retention};
use crate::tls;

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
    /// Central's addresses (`ip:port` or `host:port`), in the order they are tried; a host name
    /// is resolved at each connection attempt. Never empty.
    pub central_addrs: Vec<String>,
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

impl AgentConfig {
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
        } else if let Err(e) = outpost_protocol::identity::parse_central_addrs(&s.central_addr) {
            p.add("sync.central_addr", e.to_string());
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

        let problems = p.into_vec();
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
                    central_addrs: outpost_protocol::identity::parse_central_addrs(&s.central_addr)
                        .expect("checked above"),
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
        for (i, t) in tokens.iter().enumerate() {
            let key = |k: &str| format!("api.tokens[{i}].{k}");
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
