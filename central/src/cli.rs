//! Operator CLI client of central's HTTP API (`outpost-central exceptions ...`,
//! `outpost-central reconciliations SITE`, `outpost-central sites ...`, `fleet ...` in `fleet.rs`, `drill ...` in `drill.rs`): finds central (flags or
//! the dev fleet's files), calls the API and renders answers as tables; and `hash-token`, which
//! turns a bearer token into the SHA-256 that `[[api.tokens]]` holds. I/O shell (files, HTTP), in
//! the binary: a client of the server library, never used by it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::fleet_file::{FLEET_FILE, Fleet};
use outpost_central::paths::READY_FILE;

pub mod backup;
pub mod drill;
pub mod fleet;
pub mod sites;

/// Limit on each CLI request: an operator waits this long at most.
pub const CLI_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where central's API is and the token it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Base URL, e.g. `http://127.0.0.1:7600`.
    pub api: String,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("say where central is: --api URL --token T, or --fleet DIR/fleet.json")]
    NoTarget,
    #[error("--token is required with --api (or use --fleet)")]
    NoToken,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("request to central failed: {0}")]
    Http(#[from] reqwest::Error),
    /// Central answered with an error.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

/// Works out central's address and token: explicit flags win; otherwise `fleet` (the dev
/// fleet's `fleet.json`, or its directory). With port 0 in `fleet.json` (an ephemeral fleet), the
/// real address comes from central's `ready.json` in its data directory.
pub fn resolve_remote(
    api: Option<String>,
    token: Option<String>,
    fleet: Option<&Path>,
) -> Result<Remote, CliError> {
    let (fleet_api, fleet_token) = match fleet {
        Some(p) => {
            let (a, t) = from_fleet(p)?;
            (Some(a), Some(t))
        }
        None => (None, None),
    };
    let api = api.or(fleet_api).ok_or(CliError::NoTarget)?;
    let token = token.or(fleet_token).ok_or(CliError::NoToken)?;
    let api = if api.contains("://") {
        api
    } else {
        format!("http://{api}")
    };
    Ok(Remote {
        api: api.trim_end_matches('/').to_string(),
        token,
    })
}

fn from_fleet(path: &Path) -> Result<(String, String), CliError> {
    let file = if path.is_dir() {
        path.join(FLEET_FILE)
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).map_err(|source| CliError::Read {
        path: file.clone(),
        source,
    })?;
    let fleet: Fleet = serde_json::from_slice(&bytes).map_err(|e| CliError::Format {
        path: file.clone(),
        detail: e.to_string(),
    })?;
    let mut api = fleet.central.api.clone();
    if api.ends_with(":0") {
        let ready = Path::new(&fleet.central.data_dir).join(READY_FILE);
        let bytes = std::fs::read(&ready).map_err(|source| CliError::Read {
            path: ready.clone(),
            source,
        })?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| CliError::Format {
            path: ready.clone(),
            detail: e.to_string(),
        })?;
        let addr = v["api"].as_str().ok_or_else(|| CliError::Format {
            path: ready.clone(),
            detail: "no \"api\" address".into(),
        })?;
        api = format!("http://{addr}");
    }
    Ok((api, fleet.central.token))
}

/// Calls central: `GET` when `body` is `None`, else `POST` with the JSON body. A non-2xx answer
/// becomes `CliError::Api` with central's error code and message.
pub async fn call(remote: &Remote, path: &str, body: Option<Value>) -> Result<Value, CliError> {
    let method = match body {
        None => reqwest::Method::GET,
        Some(_) => reqwest::Method::POST,
    };
    call_method(remote, method, path, body).await
}

/// Calls central with `method` and an optional JSON body; errors as for `call`.
pub async fn call_method(
    remote: &Remote,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, CliError> {
    let client = reqwest::Client::builder()
        .timeout(CLI_REQUEST_TIMEOUT)
        .build()?;
    let url = format!("{}{path}", remote.api);
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.bearer_auth(&remote.token).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        Ok(v)
    } else {
        Err(api_error(status.as_u16(), &v))
    }
}

/// The error for a non-2xx answer: the API's `{"error": {"code", "message"}}`, or the body as
/// it came.
pub fn api_error(status: u16, body: &Value) -> CliError {
    CliError::Api {
        status,
        code: body["error"]["code"]
            .as_str()
            .unwrap_or("unknown")
            .to_string(),
        message: body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string()),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders rows as a left-aligned table with a header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
    out
}

/// The exception list as a table.
pub fn exceptions_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let reasons: Vec<String> = e["reasons"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default();
            vec![
                text(&e["id"]),
                text(&e["site"]),
                text(&e["seq"]),
                text(&e["order_id"]),
                reasons.join(","),
                text(&e["status"]),
                text(&e["created_at"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no exceptions\n".into();
    }
    table(
        &["ID", "SITE", "SEQ", "ORDER", "REASONS", "STATUS", "CREATED"],
        &rows,
    )
}

/// The fleet view (`GET /v1/sites`) as a table.
pub fn sites_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            vec![
                text(&s["site"]),
                text(&s["connected"]),
                text(&s["last_seen"]),
                text(&s["acked_seq"]),
                text(&s["clock_offset_ms"]),
                if s["revoked"] == Value::Bool(true) {
                    format!(
                        "since {} ({})",
                        text(&s["revoked_at"]),
                        text(&s["revoked_reason"])
                    )
                } else {
                    "no".into()
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no sites\n".into();
    }
    table(
        &[
            "SITE",
            "CONNECTED",
            "LAST_SEEN",
            "ACKED_SEQ",
            "CLOCK_OFFSET_MS",
            "REVOKED",
        ],
        &rows,
    )
}

/// Why `hash-token` refuses the token it read; printed after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum ReadTokenError {
    #[error("cannot read the token from stdin: {0}")]
    Read(#[source] std::io::Error),
    #[error("the token must be {min}..={max} characters, got {got}")]
    Length { min: usize, max: usize, got: usize },
    #[error("the token must be printable ASCII without spaces")]
    NotPrintable,
}

/// Reads a bearer token from `input` for `hash-token`: the first line, without its line end.
/// Refuses tokens central would not accept as a shared secret.
pub fn read_token(mut input: impl std::io::Read) -> Result<String, ReadTokenError> {
    use std::io::Read as _;
    let mut buf = String::new();
    input
        .by_ref()
        .take(outpost_central::config::MAX_TOKEN_LEN as u64 + 2)
        .read_to_string(&mut buf)
        .map_err(ReadTokenError::Read)?;
    let token = buf.lines().next().unwrap_or("");
    let min = outpost_central::config::MIN_TOKEN_LEN;
    let max = outpost_central::config::MAX_TOKEN_LEN;
    if !(min..=max).contains(&token.len()) {
        return Err(ReadTokenError::Length {
            min,
            max,
            got: token.len(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ReadTokenError::NotPrintable);
    }
    Ok(token.to_string())
}

/// The `[[api.tokens]]` entry for a client.
pub fn client_toml(name: &str, role: outpost_central::config::Role, token: &str) -> String {
    format!(
        "[[api.tokens]]\nname = {}\nrole = \"{}\"\nsha256 = \"{}\"\n",
        toml::Value::String(name.to_string()),
        role.as_str(),
        outpost_central::config::sha256_hex(token)
    )
}

/// A site's reconciliation reports as a table, newest first.
pub fn reconciliations_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                text(&r["session"]),
                text(&r["connected_at"]),
                text(&r["dark_since"]),
                text(&r["events_uploaded"]),
                text(&r["duplicates_dropped"]),
                text(&r["orders_offline_confirmed"]),
                text(&r["orders_offline_pending"]),
                text(&r["exceptions_business"]),
                text(&r["dead_letters"]),
                text(&r["catch_up_ms"]),
                text(&r["reuploaded"]),
                match (r["lost_from_seq"].as_u64(), r["lost_through_seq"].as_u64()) {
                    (Some(a), Some(b)) => format!("{a}..={b}"),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no reconciliation reports\n".into();
    }
    table(
        &[
            "SESSION",
            "CONNECTED",
            "DARK_SINCE",
            "UPLOADED",
            "DUPLICATES",
            "OFFLINE_CONFIRMED",
            "OFFLINE_PENDING",
            "EXCEPTIONS",
            "DEAD_LETTERS",
            "CATCH_UP_MS",
            "REUPLOADED",
            "LOST",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_win_and_a_zero_port_fleet_reads_ready_json() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("central");
        std::fs::create_dir_all(&data).unwrap();
        let fleet = json!({
            "central": {"api": "http://127.0.0.1:0", "token": "fleet-token", "quic": "127.0.0.1:0",
                        "command": ["x"], "data_dir": data.to_str().unwrap()},
            "sites": []
        });
        std::fs::write(dir.path().join(FLEET_FILE), fleet.to_string()).unwrap();
        // No ready.json yet: a clear error naming the file.
        let err = resolve_remote(None, None, Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains(READY_FILE), "{err}");
        std::fs::write(
            data.join(READY_FILE),
            r#"{"pid":1,"api":"127.0.0.1:4567","quic":"127.0.0.1:4568"}"#,
        )
        .unwrap();
        let r = resolve_remote(None, None, Some(&dir.path().join(FLEET_FILE))).unwrap();
        assert_eq!(
            r,
            Remote {
                api: "http://127.0.0.1:4567".into(),
                token: "fleet-token".into()
            }
        );
        let r = resolve_remote(
            Some("127.0.0.1:9/".into()),
            Some("t".into()),
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(r.api, "http://127.0.0.1:9");
        assert_eq!(r.token, "t");
        assert!(matches!(
            resolve_remote(None, None, None),
            Err(CliError::NoTarget)
        ));
        assert!(matches!(
            resolve_remote(Some("http://x".into()), None, None),
            Err(CliError::NoToken)
        ));
    }

    #[test]
    fn tables_have_a_header_and_one_row_per_item() {
        let list = json!([
            {"id": 1, "site": "plant-1", "seq": 4, "order_id": "plant-1-o4",
             "reasons": ["price_changed", "credit_hold"], "status": "open",
             "created_at": "2026-01-01T00:00:00.000Z"}
        ]);
        let t = exceptions_table(&list);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].contains("price_changed,credit_hold"), "{t}");
        assert_eq!(exceptions_table(&json!([])), "no exceptions\n");
        let r = reconciliations_table(&json!([{"session": 2, "dark_since": null}]));
        assert!(r.lines().nth(1).unwrap().starts_with("2 "), "{r}");
        let t = sites_table(&json!([
            {"site": "plant-1", "connected": false, "last_seen": null, "acked_seq": 3,
             "clock_offset_ms": null, "revoked": true, "revoked_reason": "stolen",
             "revoked_at": "2026-01-01T00:00:00.000Z"},
            {"site": "plant-2", "connected": true, "last_seen": null, "acked_seq": 0,
             "clock_offset_ms": -12, "revoked": false}
        ]));
        assert!(t.lines().nth(1).unwrap().contains("stolen"), "{t}");
        assert!(t.lines().nth(2).unwrap().contains("-12"), "{t}");
        assert_eq!(sites_table(&json!([])), "no sites\n");
    }

    #[test]
    fn hash_token_reads_one_line_and_refuses_weak_tokens() {
        assert_eq!(
            read_token("0123456789abcdef\n".as_bytes()).unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(
            read_token("0123456789abcdef\r\n".as_bytes()).unwrap(),
            "0123456789abcdef"
        );
        assert!(read_token("short\n".as_bytes()).is_err());
        assert!(read_token("has a space in it ok\n".as_bytes()).is_err());
        assert!(read_token("x".repeat(1000).as_bytes()).is_err());
        let snippet = client_toml("erp", outpost_central::config::Role::Erp, "test");
        assert!(snippet.contains("role = \"erp\""), "{snippet}");
        assert!(
            snippet.contains("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
            "{snippet}"
        );
        let parsed: toml::Table = snippet.parse().unwrap();
        assert_eq!(parsed["api"]["tokens"][0]["name"].as_str(), Some("erp"));
    }
}
