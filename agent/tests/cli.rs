//! The `outpost-agent` binary as an operator runs it: `check-config` on good and broken files,
//! and `run` with central unreachable (ready file, local API, clean exit on SIGTERM).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outpost-agent")
}

/// Writes a fleet CA and plant-1's certificate and key into `dir/certs`.
fn write_certs(dir: &Path) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut site = CertificateParams::new(Vec::<String>::new()).unwrap();
    site.subject_alt_names = vec![SanType::URI("urn:outpost:site:plant-1".try_into().unwrap())];
    site.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = site.signed_by(&key, &issuer).unwrap();
    std::fs::write(certs.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(certs.join("plant-1.pem"), cert.pem()).unwrap();
    std::fs::write(certs.join("plant-1.key"), key.serialize_pem()).unwrap();
}

/// A valid config with relative paths (resolved against the file's directory).
fn write_config(dir: &Path, central_addr: &str) -> PathBuf {
    write_certs(dir);
    let path = dir.join("plant-1.toml");
    std::fs::write(
        &path,
        format!(
            r#"site_id = "plant-1"
data_dir = "data/plant-1"

[api]
listen = "127.0.0.1:0"

[[api.tokens]]
name = "floor-admin"
role = "admin"
sha256 = "{hash}"

[sync]
central_addr = "{central_addr}"
central_name = "central.outpost.local"
ca_cert = "certs/ca.pem"
cert = "certs/plant-1.pem"
key = "certs/plant-1.key"
connect_timeout_ms = 500
backoff_max_ms = 200
"#,
            hash =
                outpost_agent::config::to_hex(&outpost_agent::config::hash_token(TOKEN.as_bytes()))
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:7601");
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        // Run from elsewhere: relative paths must resolve against the config's directory.
        .current_dir("/")
        .env_remove("OUTPOST_SYNC__CENTRAL_ADDR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("config OK"), "{stdout}");
}

#[test]
fn check_config_names_every_bad_key_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:7601");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1:0", "not-an-address")
        .replace(
            "central.outpost.local\"",
            "central.outpost.local\"\nmystery = 1",
        );
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        // An override is checked like the file itself.
        .env("OUTPOST_SYNC__IDLE_TIMEOUT_MS", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("sync.mystery"), "{all}");
    // Unknown keys are reported before values are checked; fix it and see the rest.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\nmystery = 1", "");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("OUTPOST_SYNC__IDLE_TIMEOUT_MS", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = String::from_utf8_lossy(&out.stderr);
    for key in ["api.listen", "sync.idle_timeout_ms", "sync.keep_alive_ms"] {
        assert!(all.contains(key), "{key} not named in:\n{all}");
    }
    assert!(!all.contains("config OK"));
}

#[test]
fn check_config_on_a_missing_file_exits_1() {
    let out = Command::new(bin())
        .args(["check-config", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

fn http_get(addr: &str, path: &str, token: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Goal: with central unreachable the agent still comes up, writes its ready file with the real
/// port, serves its API reporting `connected: false`, and on SIGTERM exits 0 and removes the
/// ready file.
#[test]
fn runs_without_central_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on (UDP): connection attempts time out and are retried.
    let cfg = write_config(dir.path(), "127.0.0.1:9");
    let ready = dir.path().join("data/plant-1/ready.json");
    std::fs::create_dir_all(ready.parent().unwrap()).unwrap();
    std::fs::write(&ready, "{\"pid\": 1, \"api\": \"stale\"}").unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let api = loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["pid"].as_u64() == Some(u64::from(child.id()))
        {
            break v["api"].as_str().unwrap().to_string();
        }
        assert!(child.try_wait().unwrap().is_none(), "agent exited early");
        assert!(Instant::now() < deadline, "no ready file");
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!api.ends_with(":0"), "the real port is published: {api}");
    let (status, body) = http_get(&api, "/v1/health", TOKEN);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connected"], false);
    assert_eq!(v["site"], "plant-1");
    assert_eq!(http_get(&api, "/v1/health", "wrong-token-wrong").0, 401);

    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent did not exit within 15 s of SIGTERM");
        }
        // Poll interval of the bounded wait around it, not a wait for a condition by itself.
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(!ready.exists(), "ready file removed on clean shutdown");
    assert!(log.contains("listening"), "{log}");
    assert!(
        log.contains("floor-admin (admin)"),
        "clients by name and role: {log}"
    );
    let hash = outpost_agent::config::to_hex(&outpost_agent::config::hash_token(TOKEN.as_bytes()));
    assert!(
        !log.contains(TOKEN) && !log.contains(&hash),
        "no secret in the log: {log}"
    );
}

/// Runs `outpost-agent hash-token ARGS` with `stdin` as standard input.
fn hash_token_cli(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(bin())
        .arg("hash-token")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Goal: `hash-token` prints the SHA-256 of the trimmed token from stdin, refuses a short one,
/// and `--generate` prints a new token with a `[[api.tokens]]` table that the config accepts
/// and that holds the token's hash, not the token.
#[test]
fn hash_token_hashes_stdin_and_generates_loadable_tables() {
    let out = hash_token_cli(&[], "abcdefghijklmnopqrstuvwxyz\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "71c480df93d6ae2f1efad1447c66c9525e316218cf51fc8d9ed832f2daf18b73"
    );
    let out = hash_token_cli(&[], "  too-short \n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("16..=256"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty());

    let out = hash_token_cli(
        &["--generate", "--name", "scanners", "--role", "scanner"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("token line")
        .to_string();
    assert_eq!(token.len(), 64);
    let table = &text[text.find("[[api.tokens]]").expect("table")..];
    assert!(!table.contains(&token), "the table holds the hash only");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:7601");
    let base = std::fs::read_to_string(&cfg).unwrap();
    let at = base.find("[sync]").unwrap();
    std::fs::write(&cfg, format!("{}{table}\n{}", &base[..at], &base[at..])).unwrap();
    let check = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let out = hash_token_cli(&[], &token);
    assert!(table.contains(String::from_utf8_lossy(&out.stdout).trim()));
    let out = hash_token_cli(&["--generate", "--role", "root"], "");
    assert_eq!(out.status.code(), Some(1));
}
