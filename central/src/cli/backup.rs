//! `outpost-central backup` and `outpost-central restore`: downloads a backup from central's
//! `POST /v1/backup` (temporary file, fsync, rename), and puts a backup in place as the store of
//! an empty data directory, with the summaries the CLI prints. I/O shell (HTTP, files) over
//! `outpost_central::backup` and `outpost_central::store::restore_store`; binary side.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost_central::backup::{BACKUP_ROUTE, HEADER_TAKEN_MS};
use outpost_central::store::{RestoreError, RestoredStore, restore_store};
use outpost_central::timefmt::rfc3339_ms;

use super::{CliError, Remote};

/// Limit on downloading a backup with the CLI: a backup streams a whole store, much longer than
/// an ordinary API call may take.
pub const BACKUP_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A backup downloaded by the CLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    /// When central took the snapshot (from its `x-outpost-backup-taken-ms` header).
    pub taken_ms: Option<i64>,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Remote(#[from] CliError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the backup was cut short: {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
}

impl From<reqwest::Error> for DownloadError {
    fn from(e: reqwest::Error) -> Self {
        DownloadError::Remote(CliError::Http(e))
    }
}

/// `outpost-central backup --out FILE`: asks central for a backup and writes it to `out`
/// (temporary file next to it, fsync, rename, fsync of the directory), checking its length.
pub async fn download(remote: &Remote, out: &Path) -> Result<Downloaded, DownloadError> {
    use tokio::io::AsyncWriteExt;
    let started = Instant::now();
    let client = reqwest::Client::builder()
        .timeout(BACKUP_DOWNLOAD_TIMEOUT)
        .build()?;
    let mut resp = client
        .post(format!("{}{BACKUP_ROUTE}", remote.api))
        .bearer_auth(&remote.token)
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        return Err(super::api_error(status.as_u16(), &v).into());
    }
    let expected = resp.content_length();
    let taken_ms = resp
        .headers()
        .get(HEADER_TAKEN_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = out.with_file_name(name);
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DownloadError::Write { path, source }
    };
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(write_err(&tmp))?;
    let mut bytes = 0u64;
    let copied: Result<(), DownloadError> = async {
        while let Some(chunk) = resp.chunk().await? {
            file.write_all(&chunk).await.map_err(write_err(&tmp))?;
            bytes += chunk.len() as u64;
        }
        if let Some(expected) = expected
            && expected != bytes
        {
            return Err(DownloadError::Truncated {
                expected,
                got: bytes,
            });
        }
        file.sync_all().await.map_err(write_err(&tmp))?;
        Ok(())
    }
    .await;
    drop(file);
    if let Err(e) = copied {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, out).await.map_err(write_err(out))?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err(dir))?;
    Ok(Downloaded {
        path: out.to_path_buf(),
        bytes,
        taken_ms,
        elapsed: started.elapsed(),
    })
}

/// What the CLI prints after a download.
pub fn download_summary(d: &Downloaded) -> String {
    let taken = d.taken_ms.map_or("unknown".to_string(), rfc3339_ms);
    format!(
        "backup written to {} ({} bytes, snapshot taken {taken}, {:.1} s)\n",
        d.path.display(),
        d.bytes,
        d.elapsed.as_secs_f64()
    )
}

/// `outpost-central restore`: puts the backup `from` in place as the store of `data_dir`, which
/// must not hold one yet (see `store::restore_store`).
pub fn restore(from: &Path, store_path: &Path) -> Result<RestoredStore, RestoreError> {
    let restored = restore_store(from, store_path)?;
    tracing::info!(
        from = %from.display(),
        store = %restored.path.display(),
        backup_taken_ms = restored.info.backup_taken_ms,
        incarnation = restored.incarnation,
        "store restored from a backup"
    );
    Ok(restored)
}

/// What the CLI prints after a restore: what was restored and what happens next.
pub fn restore_summary(from: &Path, r: &RestoredStore) -> String {
    let taken = rfc3339_ms(r.info.backup_taken_ms);
    format!(
        "restored {from} into {store} ({bytes} bytes)\n\
         \x20 backup taken:         {taken}\n\
         \x20 master revision:      {rev}\n\
         \x20 new incarnation:      {inc:#018x}\n\
         \n\
         what happens next:\n\
         \x20 1. start central on this data directory with its usual addresses.\n\
         \x20 2. each site reconnects and re-sends the events it still holds after central's\n\
         \x20    restored high-water mark (its retention of acknowledged events must cover the\n\
         \x20    time since {taken}); events a site no longer holds are recorded as lost, with an\n\
         \x20    alert and in its reconciliation report.\n\
         \x20 3. each site's allowances are reset on its first contact and topped up afresh.\n\
         \x20 4. the ERP must re-send the master data (prices, ATP, customers) it changed after\n\
         \x20    {taken}, and its decisions on orders since then.\n",
        from = from.display(),
        store = r.path.display(),
        bytes = r.bytes,
        rev = r.revision,
        inc = r.incarnation,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use outpost_central::api::{ApiState, Clients};
    use outpost_central::backup::{
        BACKUPS_DIR, MAX_KEPT_BACKUPS, STORE_FILE, backup_file_name, parse_backup_name,
    };
    use outpost_central::config::Role;
    use outpost_central::registry::Registry;
    use outpost_central::router::router;
    use outpost_central::store::Store;

    const ADMIN: &str = "admin-token-0123456789abcdef";

    fn milestone(seq: u64) -> outpost_protocol::EventEnvelope {
        use outpost_protocol::{EventBody, EventEnvelope, Milestone, MilestoneKind};
        EventEnvelope::new(
            "plant-1",
            seq,
            &format!("plant-1-e{seq}"),
            1_700_000_000_000,
            &EventBody::Milestone(Milestone {
                shipment_id: "S1".into(),
                milestone: MilestoneKind::Picked,
                scanner_id: "scan-1".into(),
                at: "2026-01-01T00:00:00Z".into(),
            }),
        )
    }
    const ERP: &str = "erp-token-0123456789abcdef";

    /// Goal: `POST /v1/backup` is admin-only, writes the backup under the data directory's
    /// backups/ (keeping the newest `MAX_KEPT_BACKUPS`) and streams exactly that file; the CLI
    /// download writes it whole, and it restores into a store with the same data.
    /// Method: a real router on a loopback port, a real store in a temp data directory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backup_route_streams_the_backup_and_the_download_restores() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let store = Store::open(&data_dir.join(STORE_FILE)).unwrap();
        store
            .ingest("plant-1", (1..=4).map(milestone).collect())
            .await
            .unwrap();
        let state = ApiState {
            store: store.clone(),
            registry: Arc::new(Registry::new()),
            clients: Arc::new(Clients::from_tokens([
                ("erp", Role::Erp, ERP),
                ("ops", Role::Admin, ADMIN),
            ])),
            data_dir: data_dir.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(state, 4096)).await.unwrap() });
        let remote = |token: &str| Remote {
            api: format!("http://{addr}"),
            token: token.to_string(),
        };

        let out = dir.path().join("dl").join("central-backup.redb");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        match download(&remote(ERP), &out).await {
            Err(DownloadError::Remote(CliError::Api { status: 403, .. })) => {}
            other => panic!("expected 403, got {other:?}"),
        }
        assert!(!out.exists());

        let d = download(&remote(ADMIN), &out).await.unwrap();
        let kept: Vec<_> = std::fs::read_dir(data_dir.join(BACKUPS_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let taken = d.taken_ms.unwrap();
        assert_eq!(
            kept[0],
            data_dir.join(BACKUPS_DIR).join(backup_file_name(taken))
        );
        assert_eq!(
            std::fs::read(&kept[0]).unwrap(),
            std::fs::read(&out).unwrap()
        );
        assert_eq!(d.bytes, std::fs::metadata(&out).unwrap().len());
        assert!(download_summary(&d).contains("bytes"));

        for _ in 0..MAX_KEPT_BACKUPS + 1 {
            // Distinct snapshot times name distinct files.
            tokio::time::sleep(Duration::from_millis(3)).await;
            download(&remote(ADMIN), &out).await.unwrap();
        }
        let mut names: Vec<i64> = std::fs::read_dir(data_dir.join(BACKUPS_DIR))
            .unwrap()
            .filter_map(|e| parse_backup_name(e.unwrap().file_name().to_str().unwrap()))
            .collect();
        names.sort();
        assert_eq!(names.len(), MAX_KEPT_BACKUPS);
        assert!(names[0] > taken, "the oldest backups were removed");
        store.close().await;

        let target = dir.path().join("restored");
        let r = restore(&out, &target.join(STORE_FILE)).unwrap();
        assert!(restore_summary(&out, &r).contains(&rfc3339_ms(r.info.backup_taken_ms)));
        let restored = Store::open(&target.join(STORE_FILE)).unwrap();
        assert_eq!(restored.site_hwm("plant-1").unwrap(), 4);
        assert_eq!(restored.restored_info().unwrap(), Some(r.info));
        restored.close().await;
    }
}
