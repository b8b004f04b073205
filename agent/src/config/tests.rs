//! Tests of the agent's config: loading, every problem reported by its key, the documented
//! defaults, variables and ranges. Temporary files only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocol::config_reference;

use super::*;
use crate::store::Retention;
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

/// Goal: unknown keys and a value out of range are reported together, each by its key (the
/// loader used to stop at the unknown keys and never reach `validate`). Method: a valid file with
/// an unknown key in a section and one set by a variable, and a variable one past a bound.
#[test]
fn unknown_keys_and_a_bad_value_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let path = write_config(dir.path(), &pki, "plant-1", "retry_forever = true\n");
    let env: BTreeMap<String, String> = [
        ("OUTPOST_API__COLOUR", "red"),
        ("OUTPOST_API__MAX_CONNECTIONS", "65537"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let problems = load_with_env(&path, env).unwrap_err().problems();
    assert_eq!(
        problems,
        [
            "api.colour: unknown key (OUTPOST_API__COLOUR)",
            "sync.retry_forever: unknown key",
            "api.max_connections: must be 1..=65536, got 65537",
        ],
    );
    let text = load_with_env(&path, BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        text.ends_with("is invalid:\n  sync.retry_forever: unknown key"),
        "{text}"
    );
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
        (
            "OUTPOST_SYNC__CENTRAL_ADDR",
            "127.0.0.1:9000, central-b.example:9000",
        ),
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
    assert_eq!(
        s.sync.central_addrs,
        ["127.0.0.1:9000", "central-b.example:9000"]
    );
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
