//! Consistent online backup of central's store: the `POST /v1/backup` handler (writes the backup
//! under `<data_dir>/backups`, keeps the newest `MAX_KEPT_BACKUPS`, streams the file back) and the
//! names of the files it keeps. I/O shell over `store::Store::backup_to` (in `store/backup.rs`);
//! the CLI's download and restore are the binary's `cli/backup.rs`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::Response;

use crate::api::{ApiError, ApiState};
use crate::store::{BackupError, BackupInfo};

/// Route of the online backup (admin role only).
pub const BACKUP_ROUTE: &str = "/v1/backup";
/// Directory under the data directory that `POST /v1/backup` writes into.
pub const BACKUPS_DIR: &str = "backups";
/// Backups kept under `BACKUPS_DIR`: the newest ones; older ones are removed after each new
/// backup. Each is a full copy of the store, so this bounds their disk use to a few stores; the
/// operator's own copies (downloaded by the CLI) are the archive.
pub const MAX_KEPT_BACKUPS: usize = 5;
/// Name of the store file in a data directory (as `CentralConfig::store_path`).
pub const STORE_FILE: &str = "central.redb";
/// Response headers describing the backup streamed back.
pub const HEADER_TAKEN_MS: &str = "x-outpost-backup-taken-ms";
pub const HEADER_TABLES: &str = "x-outpost-backup-tables";
pub const HEADER_ROWS: &str = "x-outpost-backup-rows";

/// One backup at a time: a second request while one runs is refused (409) rather than queued,
/// since each holds a read snapshot and writes a full copy.
static RUNNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Name of the backup file `POST /v1/backup` writes for a snapshot taken at `taken_ms`.
pub fn backup_file_name(taken_ms: i64) -> String {
    format!("backup-{taken_ms}.redb")
}

/// The time in a backup file name written by `POST /v1/backup`, or `None` for other files.
pub fn parse_backup_name(name: &str) -> Option<i64> {
    name.strip_prefix("backup-")?
        .strip_suffix(".redb")?
        .parse()
        .ok()
}

/// Removes the oldest backups in `dir` beyond `keep`; returns how many were removed.
pub fn prune_backups(dir: &Path, keep: usize) -> std::io::Result<usize> {
    let mut found: Vec<(i64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(ms) = entry.file_name().to_str().and_then(parse_backup_name) {
            found.push((ms, entry.path()));
        }
    }
    found.sort();
    let excess = found.len().saturating_sub(keep);
    for (_, path) in &found[..excess] {
        std::fs::remove_file(path)?;
    }
    Ok(excess)
}

fn backup_error(e: BackupError) -> ApiError {
    match e {
        BackupError::Unavailable(u) => u.into(),
        other => {
            tracing::error!(error = %other, "backup failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backup_failed",
                other.to_string(),
            )
        }
    }
}

/// Writes a backup into `dir` (created if missing) under its time, and prunes the old ones.
fn write_backup(st: &ApiState, dir: &Path) -> Result<BackupInfo, BackupError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BackupError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let pending = dir.join(format!("pending-{now}.redb"));
    let mut info = st.store.backup_to(&pending)?;
    // Named after the snapshot's own time (a few ms after `now`).
    let path = dir.join(backup_file_name(info.taken_ms));
    std::fs::rename(&pending, &path).map_err(io(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    info.path = path;
    match prune_backups(dir, MAX_KEPT_BACKUPS) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, kept = MAX_KEPT_BACKUPS, "old backups removed"),
        Err(e) => tracing::warn!(error = %e, dir = %dir.display(), "cannot remove old backups"),
    }
    Ok(info)
}

/// `POST /v1/backup` (admin): writes a consistent backup of the live store to
/// `<data_dir>/backups/backup-<taken_ms>.redb` and streams it back as
/// `application/octet-stream` with its `Content-Length` and the backup's time, table and row
/// counts in `x-outpost-backup-*` headers.
pub async fn post_backup(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let Ok(guard) = RUNNING.try_lock() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "backup_in_progress",
            "a backup is already being written; retry when it is done",
        ));
    };
    let dir = st.data_dir.join(BACKUPS_DIR);
    let started = Instant::now();
    let task_st = st.clone();
    let info = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        write_backup(&task_st, &dir)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "backup_failed",
            format!("the backup task failed: {e}"),
        )
    })?
    .map_err(backup_error)?;
    tracing::info!(
        path = %info.path.display(),
        bytes = info.bytes,
        tables = info.tables,
        rows = info.rows,
        taken_ms = info.taken_ms,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "backup taken through the API"
    );
    let file = tokio::fs::File::open(&info.path).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "backup_failed",
            format!("cannot read back {}: {e}", info.path.display()),
        )
    })?;
    let name = backup_file_name(info.taken_ms);
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, info.bytes)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .header(HEADER_TAKEN_MS, info.taken_ms)
        .header(HEADER_TABLES, info.tables)
        .header(HEADER_ROWS, info.rows)
        .body(body)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot build the response: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_names_round_trip_and_other_files_are_ignored() {
        assert_eq!(
            parse_backup_name(&backup_file_name(1_700_000_000_123)),
            Some(1_700_000_000_123)
        );
        assert_eq!(parse_backup_name("pending-5.redb"), None);
        assert_eq!(parse_backup_name("backup-5.redb.tmp"), None);
    }
}
