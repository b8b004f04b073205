//! Tests of central's config: loading, every problem reported by its key, the documented
//! defaults, variables and ranges. Temporary files only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use outpost_protocol::config_reference;

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
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
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
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
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
    // An unknown role is named by its key like any other problem (it used to stop the load as
    // an unreadable file).
    std::fs::write(&path, VALID.replace("role = \"erp\"", "role = \"root\"")).unwrap();
    let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
    assert_eq!(
        err.problems(),
        ["api.tokens[0].role: must be one of erp, admin"],
        "{err}"
    );
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
        format!("{VALID}max_connections = 10\nmax_handshakes_per_ip = 2\nmemory_limit_mib = 192\n"),
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
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
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
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
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
        format!(
            "{VALID}\n[health]\nbacklog_age_secs = 60\nwebhooks = [\"http://127.0.0.1:9/hook\"]\n"
        ),
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
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
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
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
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
    // After the last table: a key of [quic].
    std::fs::write(&path, format!("{VALID}\nsurprise = 1\n")).unwrap();
    let err = CentralConfig::load_with_env(&path, Some(HashMap::new())).unwrap_err();
    assert_eq!(err.problems(), ["quic.surprise: unknown key"], "{err}");
}

/// Goal: unknown keys and a value out of range are reported together, each by its key (the
/// loader used to stop at the first unknown key). Method: a valid file with an unknown top-level
/// key, an unknown key set by a variable, and a variable one past a bound.
#[test]
fn unknown_keys_and_a_bad_value_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    write_pems(dir.path());
    let path = dir.path().join("central.toml");
    std::fs::write(&path, format!("retention_days = 3\n{VALID}")).unwrap();
    let env = HashMap::from([
        ("OUTPOST_QUIC__MAX_CONNECTIONS".to_string(), "0".to_string()),
        ("OUTPOST_HEALTH__COLOR".to_string(), "red".to_string()),
    ]);
    let err = CentralConfig::load_with_env(&path, Some(env)).unwrap_err();
    assert_eq!(
        err.problems(),
        [
            "health.color: unknown key (OUTPOST_HEALTH__COLOR)",
            "retention_days: unknown key",
            "quic.max_connections: must be 1..=65536, got 0",
        ],
        "{err}"
    );
    let text = err.to_string();
    assert_eq!(
        text.lines().count(),
        4,
        "a heading, then one problem per line: {text}"
    );
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
    let from_required = CentralConfig::load_with_env(&required_path, Some(HashMap::new())).unwrap();
    let mut defaults = full.clone();
    for key in config_reference::tables(&schema)
        .iter()
        .flat_map(|t| &t.keys)
        .filter(|k| !k.required && k.default.as_ref().is_none_or(|d| d.is_null()))
    {
        remove_key(&mut defaults, &key.path);
    }
    let defaults_path = write_doc(dir.path(), "defaults.toml", &defaults);
    let from_defaults = CentralConfig::load_with_env(&defaults_path, Some(HashMap::new())).unwrap();
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
                    Err(e) => e.problems(),
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
