//! The naive-outbox peer: "what most teams build first". An axum server (the agent's HTTP stack)
//! takes the agent's milestone request and writes it as one row of an SQLite outbox table, in
//! one transaction per request (WAL, `synchronous=FULL`, so each commit syncs the WAL), and
//! answers 201 only after the commit. One connection behind a mutex, used from tokio's blocking
//! pool: no group commit, which is the point of the comparison. Async shell around a blocking
//! store; in-process, on 127.0.0.1 with an ephemeral port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use axum::Router;
use axum::extract::{Json, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use outpost_protocol::MilestoneKind;
use rusqlite::{Connection, ErrorCode, params};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The route, the same as the agent's (`outpost_agent::api::MILESTONES_ROUTE`).
pub const MILESTONES_ROUTE: &str = "/v1/shipments/{shipment_id}/milestones";
/// File name of the outbox database inside the peer's directory.
pub const DB_FILE: &str = "outbox.sqlite";
/// Longest a stopping server may take to finish its open requests; it is aborted after that.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The outbox: `event_id` is UNIQUE, so SQLite keeps the same idempotency index the agent keeps
/// (the index whose random keys make ingest expensive, performance.md §0 finding 3).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    shipment_id TEXT NOT NULL,
    milestone TEXT NOT NULL,
    scanner_id TEXT NOT NULL,
    at TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
)";

const INSERT: &str =
    "INSERT INTO outbox (event_id, shipment_id, milestone, scanner_id, at, created_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The agent's milestone body, with the same validation (unknown fields and unknown milestone
/// kinds are refused by the JSON extractor).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MilestoneBody {
    event_id: String,
    milestone: MilestoneKind,
    scanner_id: String,
    at: String,
}

type Db = Arc<Mutex<Connection>>;

/// Opens (or creates) the outbox in `dir` with WAL and `synchronous=FULL`, checking that SQLite
/// took both settings.
pub fn open(dir: &Path) -> Result<Connection> {
    let path = dir.join(DB_FILE);
    let conn = Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("SQLite refused WAL mode (journal_mode is {mode:?})");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if sync != 2 {
        bail!("SQLite synchronous is {sync}, not FULL (2)");
    }
    conn.execute(SCHEMA, [])?;
    Ok(conn)
}

/// Rows in the outbox in `dir` (opened afresh, so this reads what is on disk).
pub fn count_rows(dir: &Path) -> Result<u64> {
    let conn = open(dir)?;
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
    Ok(u64::try_from(n).expect("COUNT(*) is never negative"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What one insert transaction ended with.
enum Inserted {
    Created(i64),
    Duplicate,
}

/// One transaction for one event: BEGIN, INSERT, COMMIT (the commit syncs the WAL).
fn insert(db: &Db, shipment_id: &str, b: &MilestoneBody) -> rusqlite::Result<Inserted> {
    let mut conn = db.lock().unwrap_or_else(PoisonError::into_inner);
    let tx = conn.transaction()?;
    let res = tx.prepare_cached(INSERT)?.execute(params![
        b.event_id,
        shipment_id,
        b.milestone.as_str(),
        b.scanner_id,
        b.at,
        now_ms()
    ]);
    match res {
        Ok(_) => {
            let seq = tx.last_insert_rowid();
            tx.commit()?;
            Ok(Inserted::Created(seq))
        }
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            Ok(Inserted::Duplicate)
        }
        Err(e) => Err(e),
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

async fn record_milestone(
    State(db): State<Db>,
    UrlPath(shipment_id): UrlPath<String>,
    Json(body): Json<MilestoneBody>,
) -> Response {
    let res = tokio::task::spawn_blocking(move || {
        let r = insert(&db, &shipment_id, &body);
        (r, shipment_id, body)
    })
    .await;
    match res {
        Ok((Ok(Inserted::Created(seq)), shipment_id, b)) => (
            StatusCode::CREATED,
            Json(json!({
                "event_id": b.event_id,
                "shipment_id": shipment_id,
                "milestone": b.milestone,
                "scanner_id": b.scanner_id,
                "at": b.at,
                "seq": seq,
            })),
        )
            .into_response(),
        // Naive dedup: the UNIQUE index refuses the second insert; the client learns it was a
        // duplicate (the agent instead answers 200 with the original for an identical retry).
        Ok((Ok(Inserted::Duplicate), _, b)) => error(
            StatusCode::CONFLICT,
            "duplicate_event",
            format!("event {:?} is already in the outbox", b.event_id),
        ),
        Ok((Err(e), _, _)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage",
            format!("SQLite: {e}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("insert task: {e}"),
        ),
    }
}

/// A running naive-outbox server. Stop it with [`SqlitePeer::stop`]; dropping it stops it too
/// (without waiting).
pub struct SqlitePeer {
    pub addr: SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl SqlitePeer {
    /// Opens the outbox in `dir` and serves it on 127.0.0.1 with an ephemeral port.
    pub async fn start(dir: &Path) -> Result<SqlitePeer> {
        let conn = open(dir)?;
        let db: Db = Arc::new(Mutex::new(conn));
        let app = Router::new()
            .route(MILESTONES_ROUTE, post(record_milestone))
            .with_state(db);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(SqlitePeer {
            addr,
            dir: dir.to_path_buf(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The directory holding the outbox.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops accepting, lets open requests finish (bounded by [`STOP_TIMEOUT`]) and closes the
    /// database.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(STOP_TIMEOUT, &mut task).await {
            Ok(Ok(r)) => r.context("naive-outbox server"),
            Ok(Err(e)) => Err(anyhow!("naive-outbox server task: {e}")),
            Err(_) => {
                task.abort();
                Err(anyhow!(
                    "naive-outbox server did not stop within {STOP_TIMEOUT:?}"
                ))
            }
        }
    }
}

impl Drop for SqlitePeer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The body of milestone `{prefix}-{n}`, as the agent's ingest scenario sends it
/// (`scenarios::milestone_body`).
pub fn milestone_body(prefix: &str, n: u64) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{prefix}-{n}","milestone":"picked","scanner_id":"scanner-1","at":"2026-11-26T10:00:00Z"}}"#
    )
    .into_bytes()
}

/// The path of milestone number `n`'s shipment, as the agent's ingest scenario uses it.
pub fn milestone_path(n: u64) -> String {
    format!("/v1/shipments/SH-{}/milestones", n % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"event_id":"evt-1","milestone":"loaded","scanner_id":"s-1","at":"2026-11-26T10:00:00Z"}"#;

    async fn post(addr: SocketAddr, shipment: &str, body: &str) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/v1/shipments/{shipment}/milestones"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Goal: the naive outbox acks a new event with 201, refuses a second one with the same
    /// event id (the UNIQUE index), and keeps its rows and its index across a reopen. Method:
    /// real HTTP on loopback, stop, count rows from a fresh connection, start again on the
    /// same directory.
    #[tokio::test]
    async fn acks_dedups_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let peer = SqlitePeer::start(dir.path()).await.unwrap();
        let (st, v) = post(peer.addr, "SH-1", BODY).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(
            (v["seq"].as_i64(), v["shipment_id"].as_str()),
            (Some(1), Some("SH-1"))
        );
        let (st, v) = post(peer.addr, "SH-1", BODY).await;
        assert_eq!((st, v["code"].as_str()), (409, Some("duplicate_event")));
        let other = BODY.replace("evt-1", "evt-2");
        assert_eq!(post(peer.addr, "SH-2", &other).await.0, 201);
        // The agent's validation: unknown milestone kinds and unknown fields are refused.
        let bad = BODY
            .replace("loaded", "teleported")
            .replace("evt-1", "evt-3");
        assert!((400..500).contains(&post(peer.addr, "SH-1", &bad).await.0));
        let extra = BODY.replace("evt-1", "evt-3").replace("}", r#","x":1}"#);
        assert!((400..500).contains(&post(peer.addr, "SH-1", &extra).await.0));
        peer.stop().await.unwrap();

        assert_eq!(count_rows(dir.path()).unwrap(), 2);
        let peer = SqlitePeer::start(dir.path()).await.unwrap();
        assert_eq!(post(peer.addr, "SH-9", BODY).await.0, 409);
        let (st, v) = post(peer.addr, "SH-1", &BODY.replace("evt-1", "evt-4")).await;
        assert_eq!((st, v["seq"].as_i64()), (201, Some(3)));
        peer.stop().await.unwrap();
        assert_eq!(count_rows(dir.path()).unwrap(), 3);
    }

    /// Goal: the outbox really runs with WAL and `synchronous=FULL` (the settings the peer's
    /// figures claim), as read back from SQLite.
    #[test]
    fn opens_in_wal_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(dir.path()).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2));
    }

    #[test]
    fn bodies_match_the_agents_request() {
        let v: serde_json::Value = serde_json::from_slice(&milestone_body("bench", 7)).unwrap();
        assert_eq!(
            (v["event_id"].as_str(), v["milestone"].as_str()),
            (Some("bench-7"), Some("picked"))
        );
        assert_eq!(milestone_path(1007), "/v1/shipments/SH-7/milestones");
    }
}
