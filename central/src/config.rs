//! Central's configuration: a TOML file plus `OUTPOST_*` environment overrides, validated as a
//! whole so that every problem is reported at once. Reads files; no sockets.

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
/// Shortest accepted bearer token: 16 characters is 64 bits of hex, the floor for a shared secret.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest accepted bearer token: keeps the header small and the comparison cheap.
pub const MAX_TOKEN_LEN: usize = 256;
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
    /// Bearer token of the ERP / operators.
    pub token: String,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
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
        let token = &self.api.token;
        if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN {
            problems.push(format!(
                "api.token: must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} characters, got {}",
                token.len()
            ));
        } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
            problems.push("api.token: must be printable ASCII without spaces".to_string());
        }
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
        problems
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
token = "0123456789abcdef0123456789abcdef"

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
