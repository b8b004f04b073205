//! Central's `validate`: every rule a loaded config must meet, each problem named by its key.
//! Looks at the files the config names (they must exist); no network.

use std::net::SocketAddr;

use outpost_protocol::config_load::{Problem, Problems};

use super::*;

impl CentralConfig {
    /// Every problem with the configuration, each naming its key. Empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        if self.data_dir.as_os_str().is_empty() {
            p.add("data_dir", "must not be empty");
        } else if self.data_dir.exists() && !self.data_dir.is_dir() {
            p.add(
                "data_dir",
                format!("{} exists and is not a directory", self.data_dir.display()),
            );
        }
        check_addr(&mut p, "api.listen", &self.api.listen);
        if self.api.token.is_some() {
            p.add(
                "api.token",
                "a plain-text token is no longer accepted; hash it with \
                 `outpost-central hash-token` (or make a new one with `hash-token --generate`) \
                 and list it as [[api.tokens]] with name, role (erp or admin) and sha256",
            );
        }
        self.validate_clients(&mut p);
        if !(1..=MAX_MAX_BODY_BYTES).contains(&self.api.max_body_bytes) {
            p.add(
                "api.max_body_bytes",
                format!(
                    "must be 1..={MAX_MAX_BODY_BYTES}, got {}",
                    self.api.max_body_bytes
                ),
            );
        }
        check_addr(&mut p, "quic.listen", &self.quic.listen);
        for (key, path) in [
            ("quic.ca_cert", &self.quic.ca_cert),
            ("quic.cert", &self.quic.cert),
            ("quic.key", &self.quic.key),
        ] {
            if !path.is_file() {
                p.add(key, format!("file not found: {}", path.display()));
            }
        }
        let idle = self.quic.idle_timeout_ms;
        if !(MIN_IDLE_TIMEOUT_MS..=MAX_IDLE_TIMEOUT_MS).contains(&idle) {
            p.add(
                "quic.idle_timeout_ms",
                format!("must be {MIN_IDLE_TIMEOUT_MS}..={MAX_IDLE_TIMEOUT_MS}, got {idle}"),
            );
        }
        let ka = self.quic.keep_alive_ms;
        if ka == 0 || ka >= idle {
            p.add(
                "quic.keep_alive_ms",
                format!("must be 1..{idle} (below quic.idle_timeout_ms), got {ka}"),
            );
        }
        self.quic.validate_limits(&mut p);
        self.allowance.validate(&mut p);
        self.health.validate(&mut p);
        self.renewal.validate(&mut p);
        p.into_vec()
    }

    fn validate_clients(&self, p: &mut Problems) {
        let clients = &self.api.tokens;
        if clients.is_empty() && self.api.token.is_none() {
            p.add(
                "api.tokens",
                "at least one client is required ([[api.tokens]] with name, role and sha256; \
                 see `outpost-central hash-token --generate`)",
            );
        }
        if clients.len() > MAX_API_CLIENTS {
            p.add(
                "api.tokens",
                format!("at most {MAX_API_CLIENTS} clients, got {}", clients.len()),
            );
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, c) in clients.iter().enumerate() {
            if !valid_client_name(&c.name) {
                p.add(
                    &format!("api.tokens[{i}].name"),
                    format!(
                        "must be 1..={MAX_CLIENT_NAME_LEN} characters of [A-Za-z0-9._-], got {:?}",
                        c.name.chars().take(80).collect::<String>()
                    ),
                );
            } else if !names.insert(c.name.as_str()) {
                p.add(
                    &format!("api.tokens[{i}].name"),
                    format!("{:?} is used by another client", c.name),
                );
            }
            match c.hash_bytes() {
                None => p.add(
                    &format!("api.tokens[{i}].sha256"),
                    "must be 64 lower-case hex digits (the SHA-256 of the token, from \
                     `outpost-central hash-token`)",
                ),
                Some(h) => {
                    if !hashes.insert(h) {
                        p.add(
                            &format!("api.tokens[{i}].sha256"),
                            "the same token is listed for another client",
                        );
                    }
                }
            }
        }
    }
}

impl QuicConfig {
    /// The limits' problems, each naming its key.
    fn validate_limits(&self, p: &mut Problems) {
        let mut range = |key: &str, v: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&v) {
                p.add(
                    &format!("quic.{key}"),
                    format!("must be {lo}..={hi}, got {v}"),
                );
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

impl AllowanceConfig {
    fn validate(&self, p: &mut Problems) {
        if !(0..=outpost_protocol::MAX_QTY).contains(&self.atp_target) {
            p.add(
                "allowance.atp_target",
                format!(
                    "must be 0..={}, got {}",
                    outpost_protocol::MAX_QTY,
                    self.atp_target
                ),
            );
        }
        let fraction = self.credit_target_fraction;
        if !(fraction.is_finite() && (0.0..=1.0).contains(&fraction)) {
            p.add(
                "allowance.credit_target_fraction",
                format!("must be 0.0..=1.0, got {fraction}"),
            );
        }
        if !(1..=MAX_RECLAIM_CHECK_SECS).contains(&self.reclaim_check_secs) {
            p.add(
                "allowance.reclaim_check_secs",
                format!(
                    "must be 1..={MAX_RECLAIM_CHECK_SECS}, got {}",
                    self.reclaim_check_secs
                ),
            );
        }
        // A connected site is marked as heard from at each check; a silence shorter than the
        // check interval would reclaim from sites that are connected and idle.
        if self.reclaim_silent_secs <= self.reclaim_check_secs
            || self.reclaim_silent_secs > MAX_RECLAIM_SILENT_SECS
        {
            p.add(
                "allowance.reclaim_silent_secs",
                format!(
                    "must be above allowance.reclaim_check_secs ({}) and at most \
                     {MAX_RECLAIM_SILENT_SECS}, got {}",
                    self.reclaim_check_secs, self.reclaim_silent_secs
                ),
            );
        }
    }
}

impl HealthConfig {
    fn validate(&self, p: &mut Problems) {
        for (key, v) in [
            ("health.offline_after_secs", self.offline_after_secs),
            ("health.backlog_age_secs", self.backlog_age_secs),
            ("health.master_lag_max_secs", self.master_lag_max_secs),
        ] {
            if !(1..=MAX_HEALTH_SECS).contains(&v) {
                p.add(key, format!("must be 1..={MAX_HEALTH_SECS}, got {v}"));
            }
        }
        if self.disk_free_min_pct > 100 {
            p.add(
                "health.disk_free_min_pct",
                format!("must be 0..=100, got {}", self.disk_free_min_pct),
            );
        }
        if !(1..=MAX_HEALTH_SECS * 1_000).contains(&self.clock_offset_max_ms) {
            p.add(
                "health.clock_offset_max_ms",
                format!(
                    "must be 1..={}, got {}",
                    MAX_HEALTH_SECS * 1_000,
                    self.clock_offset_max_ms
                ),
            );
        }
        if self.outbox_events_max == 0 {
            p.add("health.outbox_events_max", "must be at least 1");
        }
        if self.webhooks.len() > MAX_WEBHOOKS {
            p.add(
                "health.webhooks",
                format!("at most {MAX_WEBHOOKS} URLs, got {}", self.webhooks.len()),
            );
        }
        for (i, url) in self.webhooks.iter().enumerate() {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => p.add(
                    &format!("health.webhooks[{i}]"),
                    format!("must be an http:// or https:// URL, got {url:?}"),
                ),
            }
        }
    }
}

impl RenewalConfig {
    fn validate(&self, p: &mut Problems) {
        if !(1..=MAX_SITE_VALIDITY_DAYS).contains(&self.site_validity_days) {
            p.add(
                "renewal.site_validity_days",
                format!(
                    "must be 1..={MAX_SITE_VALIDITY_DAYS}, got {}",
                    self.site_validity_days
                ),
            );
        }
        if self.min_interval_secs > MAX_RENEWAL_MIN_INTERVAL_SECS {
            p.add(
                "renewal.min_interval_secs",
                format!(
                    "must be 0..={MAX_RENEWAL_MIN_INTERVAL_SECS}, got {}",
                    self.min_interval_secs
                ),
            );
        }
        if let Some(dir) = &self.ca_dir {
            for f in [crate::certs::CA_CERT_FILE, crate::certs::CA_KEY_FILE] {
                if !dir.join(f).is_file() {
                    p.add(
                        "renewal.ca_dir",
                        format!("file not found: {}", dir.join(f).display()),
                    );
                }
            }
        }
    }
}

fn check_addr(p: &mut Problems, key: &str, value: &str) {
    if value.parse::<SocketAddr>().is_err() {
        p.add(
            key,
            format!(
                "invalid socket address {:?} (expected ip:port)",
                value.chars().take(80).collect::<String>()
            ),
        );
    }
}
