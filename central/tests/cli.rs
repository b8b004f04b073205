//! Runs the built `outpost-central` binary: `dev init` writes a complete fleet and
//! `check-config` accepts what it wrote (and rejects a broken config, naming every key).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn central() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost-central"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dev_init_writes_the_fleet_and_check_config_accepts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::path::absolute(tmp.path()).unwrap();
    let out = central()
        .args(["dev", "init", "--dir"])
        .arg(&dir)
        .args([
            "--sites",
            "3",
            "--base-port",
            "0",
            "--agent-bin",
            "/bin/true",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dev init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let fleet: Value =
        serde_json::from_slice(&std::fs::read(dir.join("fleet.json")).unwrap()).unwrap();
    let ids: Vec<&str> = fleet["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["plant-1", "plant-2", "warehouse-1"]);
    assert_eq!(fleet["central"]["api"], "http://127.0.0.1:0");
    assert_eq!(fleet["central"]["quic"], "127.0.0.1:0");
    assert_eq!(fleet["central"]["token"].as_str().unwrap().len(), 64);

    let central_cmd = strings(&fleet["central"]["command"]);
    assert!(Path::new(&central_cmd[0]).is_absolute());
    assert!(Path::new(&central_cmd[0]).is_file());
    assert_eq!(central_cmd[1..3], ["serve", "--config"]);
    assert_eq!(Path::new(&central_cmd[3]), dir.join("central.toml"));
    assert!(Path::new(&fleet["central"]["data_dir"].as_str().unwrap()).is_dir());

    for site in fleet["sites"].as_array().unwrap() {
        let id = site["id"].as_str().unwrap();
        let cmd = strings(&site["command"]);
        assert_eq!(cmd[0], "/bin/true");
        assert_eq!(cmd[1..3], ["run", "--config"]);
        assert_eq!(Path::new(&cmd[3]), dir.join(format!("{id}.toml")));
        assert!(Path::new(&cmd[3]).is_file());
        assert_eq!(site["api"], "http://127.0.0.1:0");
        assert_eq!(site["token"].as_str().unwrap().len(), 64);
        assert!(Path::new(site["data_dir"].as_str().unwrap()).is_dir());
        for ext in ["pem", "key"] {
            assert!(dir.join("certs").join(format!("{id}.{ext}")).is_file());
        }
    }

    let check = central()
        .args(["check-config", "--config"])
        .arg(&central_cmd[3])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check-config failed: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("config OK"));

    // A second init without --force refuses to overwrite the fleet.
    let again = central()
        .args(["dev", "init", "--dir"])
        .arg(&dir)
        .args(["--agent-bin", "/bin/true"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("central.toml");
    std::fs::write(
        &path,
        "data_dir = \"data\"\n[api]\nlisten = \"x\"\ntoken = \"t\"\n[quic]\nlisten = \"y\"\n\
         ca_cert = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n",
    )
    .unwrap();
    let out = central()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "api.listen",
        "api.token",
        "quic.listen",
        "quic.ca_cert",
        "quic.cert",
        "quic.key",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

/// Goal: `fleet status` says clearly when central cannot be reached and exits 2, so scripts can
/// tell it from a table. Method: point it at a loopback port where nothing listens (TCP 9).
#[test]
fn fleet_status_exits_2_when_central_is_unreachable() {
    let out = central()
        .env_remove("OUTPOST_CENTRAL_API")
        .env_remove("OUTPOST_CENTRAL_TOKEN")
        .args([
            "fleet",
            "status",
            "--api",
            "http://127.0.0.1:9",
            "--token",
            "t",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("request to central failed"), "{err}");
    assert!(out.stdout.is_empty());
    let none = central()
        .env_remove("OUTPOST_CENTRAL_API")
        .env_remove("OUTPOST_CENTRAL_TOKEN")
        .args(["fleet", "status"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("--api URL --token T"));
}
