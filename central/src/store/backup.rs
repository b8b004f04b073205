//! Consistent online backup of central's store into a new redb file, and restore of such a file
//! onto an empty data directory under a new incarnation. I/O side (redb, files); blocking, so
//! callers on the async executor run it in `spawn_blocking`.
//!
//! Invariants: a backup is one read transaction's snapshot, so it holds every table as of one
//! commit (events with their high-water marks, ledger moves with their master changes); it
//! copies every table of the store (`with_every_table!`) and refuses a store holding a table it
//! does not know rather than leaving it out; it appears at its path only once complete and
//! durable (temp file, fsync, rename, fsync of the directory). A restored store never keeps the
//! backup's incarnation, so agents that talked to the old central notice the restore.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, Key, MultimapTableHandle, ReadTransaction, ReadableDatabase,
    ReadableTable, TableDefinition, TableHandle, Value, WriteTransaction,
};

use super::{
    META, META_BACKUP_TAKEN_MS, META_INCARNATION, META_RESTORED_AT_MS,
    META_RESTORED_FROM_BACKUP_MS, META_REVISION, META_SCHEMA, ReadError, SCHEMA_VERSION, Store,
    StoreUnavailable, new_incarnation, now_ms, with_every_table,
};

/// A backup written by `Store::backup_to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    pub path: PathBuf,
    /// Size of the backup file.
    pub bytes: u64,
    /// When its snapshot was taken (central's clock, ms since the Unix epoch).
    pub taken_ms: i64,
    /// Tables copied.
    pub tables: usize,
    /// Rows copied, over all tables.
    pub rows: u64,
}

/// A restored store: when its backup was taken and when it was restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreInfo {
    pub backup_taken_ms: i64,
    pub restored_at_ms: i64,
}

/// What `restore_store` put in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredStore {
    pub path: PathBuf,
    pub bytes: u64,
    pub info: RestoreInfo,
    /// The new incarnation drawn for the restored store.
    pub incarnation: u64,
    /// The master revision the backup holds: the ERP must re-send what changed after the
    /// backup's time.
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Unavailable(#[from] StoreUnavailable),
    #[error("cannot copy the store: {0}")]
    Copy(#[from] redb::Error),
    #[error("cannot create the backup database {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    /// A table in the store that the backup has no definition for: a new table was not added
    /// to `with_every_table!`. Refused rather than silently left out of the backup.
    #[error(
        "the store holds table {0:?}, which the backup does not know (not in with_every_table!)"
    )]
    UnknownTable(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

macro_rules! redb_into {
    ($err:ident, $($t:ty),*) => {$(
        impl From<$t> for $err {
            fn from(e: $t) -> Self {
                $err::from(redb::Error::from(e))
            }
        }
    )*};
}
redb_into!(
    BackupError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "{path} already exists: restore goes onto an empty data directory (move the current store away first)"
    )]
    NotEmpty { path: PathBuf },
    #[error("cannot read the backup {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("{path} is not a backup of central's store: {detail}")]
    NotABackup { path: PathBuf, detail: String },
    #[error(
        "{path} has schema version {found}, this build reads version {SCHEMA_VERSION} (restore it with the build that took it)"
    )]
    SchemaVersion { path: PathBuf, found: u64 },
    #[error("cannot restore the backup {path}: {source}")]
    Redb {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Fsyncs `tmp`, renames it to `path` and fsyncs the directory, so that `path` is either absent
/// or complete after a crash.
fn publish(tmp: &Path, path: &Path) -> std::io::Result<u64> {
    let f = std::fs::File::open(tmp)?;
    f.sync_all()?;
    let bytes = f.metadata()?.len();
    drop(f);
    std::fs::rename(tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(bytes)
}

/// Copies every row of `def` from the snapshot into the backup's transaction.
fn copy_table<K: Key + 'static, V: Value + 'static>(
    src: &ReadTransaction,
    dst: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64, BackupError> {
    let from = src.open_table(def)?;
    let mut to = dst.open_table(def)?;
    let mut rows = 0;
    for row in from.iter()? {
        let (k, v) = row?;
        to.insert(k.value(), v.value())?;
        rows += 1;
    }
    Ok(rows)
}

/// Names of every table the store defines.
pub(crate) fn known_tables() -> BTreeSet<&'static str> {
    let mut names = BTreeSet::new();
    macro_rules! name_each {
        ($($t:path),*) => {$(
            names.insert($t.name());
        )*};
    }
    with_every_table!(name_each);
    names
}

/// Writes every table of the snapshot `src` into a new database at `tmp`, stamped with
/// `taken_ms`, committed durably; returns (tables, rows).
fn write_copy(
    src: &ReadTransaction,
    tmp: &Path,
    taken_ms: i64,
) -> Result<(usize, u64), BackupError> {
    let known = known_tables();
    for table in src.list_tables()? {
        if !known.contains(table.name()) {
            return Err(BackupError::UnknownTable(table.name().to_string()));
        }
    }
    if let Some(table) = src.list_multimap_tables()?.next() {
        return Err(BackupError::UnknownTable(table.name().to_string()));
    }
    let db = Database::create(tmp).map_err(|source| BackupError::Create {
        path: tmp.to_path_buf(),
        source,
    })?;
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let mut tables = 0;
    let mut rows = 0;
    macro_rules! copy_each {
        ($($t:path),*) => {$(
            rows += copy_table(src, &txn, $t)?;
            tables += 1;
        )*};
    }
    with_every_table!(copy_each);
    {
        // A backup is marked as one (a store refuses to open it until it is restored) and
        // carries no restore of its own: its source may itself have been restored.
        let mut meta = txn.open_table(META)?;
        meta.insert(META_BACKUP_TAKEN_MS, u64::try_from(taken_ms).unwrap_or(0))?;
        meta.remove(META_RESTORED_AT_MS)?;
        meta.remove(META_RESTORED_FROM_BACKUP_MS)?;
    }
    txn.commit()?;
    drop(db);
    Ok((tables, rows))
}

impl Store {
    /// Writes a consistent copy of the whole store to `path` while central keeps serving: one
    /// read transaction's snapshot, every table copied into a new database at a temporary path
    /// next to `path`, committed durably, fsynced and renamed into place. The copy records when
    /// it was taken (`backup_taken_ms`). Blocking; writes go on meanwhile (the snapshot keeps
    /// the pages it reads alive until it ends).
    pub fn backup_to(&self, path: &Path) -> Result<BackupInfo, BackupError> {
        let tmp = with_suffix(path, ".tmp");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BackupError::Io { path, source }
        };
        remove_if_present(&tmp).map_err(io(&tmp))?;
        let db = self.shared.db()?;
        let src = db.begin_read()?;
        let taken_ms = now_ms();
        let copied = write_copy(&src, &tmp, taken_ms);
        drop(src);
        drop(db);
        let (tables, rows) = match copied {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let bytes = publish(&tmp, path).map_err(io(path))?;
        tracing::info!(path = %path.display(), bytes, tables, rows, taken_ms, "backup written");
        Ok(BackupInfo {
            path: path.to_path_buf(),
            bytes,
            taken_ms,
            tables,
            rows,
        })
    }

    /// This store's incarnation: drawn when it was created, and again when it was restored.
    pub fn incarnation(&self) -> Result<u64, ReadError> {
        let txn = self.read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(META_INCARNATION)?.map(|g| g.value()).unwrap_or(0))
    }

    /// When the backup this store was restored from was taken and when it was restored;
    /// `None` for a store that was never restored.
    pub fn restored_info(&self) -> Result<Option<RestoreInfo>, ReadError> {
        let txn = self.read()?;
        let meta = txn.open_table(META)?;
        let taken = meta.get(META_RESTORED_FROM_BACKUP_MS)?.map(|g| g.value());
        let at = meta.get(META_RESTORED_AT_MS)?.map(|g| g.value());
        Ok(match (taken, at) {
            (Some(t), Some(a)) => Some(RestoreInfo {
                backup_taken_ms: i64::try_from(t).unwrap_or(i64::MAX),
                restored_at_ms: i64::try_from(a).unwrap_or(i64::MAX),
            }),
            _ => None,
        })
    }
}

/// Puts the backup at `backup` in place as the store at `store_path`, which must not exist yet:
/// copies it next to `store_path`, checks that it is a complete backup of this schema, draws a
/// new incarnation and records the backup's time and now as its restore, commits durably, then
/// fsyncs, renames into place and fsyncs the directory. The backup file itself is not modified.
pub fn restore_store(backup: &Path, store_path: &Path) -> Result<RestoredStore, RestoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io { path, source }
    };
    if store_path.exists() {
        return Err(RestoreError::NotEmpty {
            path: store_path.to_path_buf(),
        });
    }
    if let Some(dir) = store_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = with_suffix(store_path, ".restore.tmp");
    remove_if_present(&tmp).map_err(io(&tmp))?;
    std::fs::copy(backup, &tmp).map_err(io(backup))?;
    let stamped = stamp_restore(backup, &tmp);
    let (info, incarnation, revision) = match stamped {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let bytes = publish(&tmp, store_path).map_err(io(store_path))?;
    Ok(RestoredStore {
        path: store_path.to_path_buf(),
        bytes,
        info,
        incarnation,
        revision,
    })
}

/// Checks the copy at `tmp` (of `backup`) and stamps it as restored under a new incarnation.
fn stamp_restore(backup: &Path, tmp: &Path) -> Result<(RestoreInfo, u64, u64), RestoreError> {
    let redb_err = |source: redb::Error| RestoreError::Redb {
        path: backup.to_path_buf(),
        source,
    };
    let not_backup = |detail: String| RestoreError::NotABackup {
        path: backup.to_path_buf(),
        detail,
    };
    let db = Database::open(tmp).map_err(|source| RestoreError::Open {
        path: backup.to_path_buf(),
        source,
    })?;
    let (taken, old_incarnation, revision) = {
        let txn = db.begin_read().map_err(|e| redb_err(e.into()))?;
        let meta = match txn.open_table(META) {
            Ok(m) => m,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Err(not_backup("it has no meta table".into()));
            }
            Err(e) => return Err(redb_err(e.into())),
        };
        let get = |key: &str| -> Result<Option<u64>, RestoreError> {
            Ok(meta
                .get(key)
                .map_err(|e| redb_err(e.into()))?
                .map(|g| g.value()))
        };
        match get(META_SCHEMA)? {
            Some(v) if v == SCHEMA_VERSION => {}
            Some(found) => {
                return Err(RestoreError::SchemaVersion {
                    path: backup.to_path_buf(),
                    found,
                });
            }
            None => return Err(not_backup("it has no schema version".into())),
        }
        let Some(taken) = get(META_BACKUP_TAKEN_MS)? else {
            return Err(not_backup(
                "it records no backup time (a store file, not a backup taken by `outpost-central backup`)".into(),
            ));
        };
        let old = get(META_INCARNATION)?.unwrap_or(0);
        let revision = get(META_REVISION)?.unwrap_or(0);
        let present: BTreeSet<String> = txn
            .list_tables()
            .map_err(|e| redb_err(e.into()))?
            .map(|t| t.name().to_string())
            .collect();
        if let Some(missing) = known_tables().into_iter().find(|t| !present.contains(*t)) {
            return Err(not_backup(format!("table {missing:?} is missing")));
        }
        (taken, old, revision)
    };
    let restored_at_ms = now_ms();
    let incarnation = loop {
        let i = new_incarnation();
        if i != old_incarnation {
            break i;
        }
    };
    let write = || -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(META_INCARNATION, incarnation)?;
            meta.insert(META_RESTORED_FROM_BACKUP_MS, taken)?;
            meta.insert(
                META_RESTORED_AT_MS,
                u64::try_from(restored_at_ms).unwrap_or(0),
            )?;
        }
        txn.commit()?;
        Ok(())
    };
    write().map_err(redb_err)?;
    drop(db);
    Ok((
        RestoreInfo {
            backup_taken_ms: i64::try_from(taken).unwrap_or(i64::MAX),
            restored_at_ms,
        },
        incarnation,
        revision,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::ev;
    use crate::store::{EVENTS, HelloMarks, META_NEXT_CURSOR, NewAlert, OpenStoreError, SITE_HWM};
    use outpost_protocol::{AtpRecord, MasterChange};
    use redb::{ReadOnlyDatabase, ReadableTableMetadata};

    fn table_names(txn: &ReadTransaction) -> BTreeSet<String> {
        txn.list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect()
    }

    /// Fills every kind of record the tests can reach through the store's API.
    async fn populate(store: &Store) {
        store
            .upsert_master(vec![MasterChange::Atp(AtpRecord {
                sku: "BOLT-M8".into(),
                site: "plant-1".into(),
                available: 40,
            })])
            .await
            .unwrap();
        store
            .ingest("plant-1", (1..=5).map(|s| ev("plant-1", s)).collect())
            .await
            .unwrap();
        // A restored-central session that finds seqs 6..=7 lost fills the lost ranges.
        store
            .begin_session(
                "plant-1",
                HelloMarks {
                    last_seq: 9,
                    acked_seq: 9,
                    retained_from_seq: 8,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        store
            .record_alert(NewAlert {
                site: "plant-1".into(),
                from: "healthy".into(),
                to: "offline".into(),
                reasons: vec![],
                at_ms: 1,
                drill_id: None,
            })
            .await
            .unwrap();
        store.revoke_site("plant-9", "test".into()).await.unwrap();
    }

    /// Goal: a backup copies every table of the store (compared with redb's own list of the
    /// source's tables, so a table created anywhere but missing from `with_every_table!` fails
    /// here) and every row, and is taken from one snapshot while the writer keeps committing.
    /// Method: a task ingests one event per commit for another site during the backup; in the
    /// backup, that site's feed rows must match its high-water mark and the feed cursor (they
    /// are committed together), and the live store must have gone on past the snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backup_is_a_consistent_copy_of_every_table_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("central.redb")).unwrap();
        populate(&store).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    store
                        .ingest("plant-2", vec![ev("plant-2", seq)])
                        .await
                        .unwrap();
                }
                seq
            })
        };
        while store.site_hwm("plant-2").unwrap() < 20 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let path = dir.path().join("backups").join("b.redb");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let info = {
            let (store, path) = (store.clone(), path.clone());
            tokio::task::spawn_blocking(move || store.backup_to(&path))
                .await
                .unwrap()
                .unwrap()
        };
        // Let the writer commit past the snapshot before stopping it.
        let at_backup = store.site_hwm("plant-2").unwrap();
        while store.site_hwm("plant-2").unwrap() < at_backup + 5 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.await.unwrap();
        assert!(!with_suffix(&path, ".tmp").exists());
        assert_eq!(info.bytes, std::fs::metadata(&path).unwrap().len());

        let src_db = store.shared.db().unwrap();
        let src = src_db.begin_read().unwrap();
        let copy_db = ReadOnlyDatabase::open(&path).unwrap();
        let copy = copy_db.begin_read().unwrap();
        let (src_tables, copy_tables) = (table_names(&src), table_names(&copy));
        let missing: Vec<_> = src_tables.difference(&copy_tables).collect();
        assert!(missing.is_empty(), "tables not in the backup: {missing:?}");
        assert_eq!(info.tables, copy_tables.len());
        assert_eq!(
            copy_tables
                .iter()
                .map(String::as_str)
                .collect::<BTreeSet<_>>(),
            known_tables()
        );
        // Every table other than the ones the writer kept changing holds the same rows.
        let (src_lost, copy_lost) = (
            src.open_table(crate::store::LOST_RANGES).unwrap(),
            copy.open_table(crate::store::LOST_RANGES).unwrap(),
        );
        assert_eq!(src_lost.len().unwrap(), 1);
        assert_eq!(copy_lost.len().unwrap(), 1);
        assert_eq!(
            copy.open_table(crate::store::alerts::ALERTS)
                .unwrap()
                .len()
                .unwrap(),
            2,
            "the lost range's alert and the recorded one"
        );
        // One snapshot: plant-2's feed rows, its mark and the next cursor agree.
        let hwm = copy
            .open_table(SITE_HWM)
            .unwrap()
            .get("plant-2")
            .unwrap()
            .unwrap()
            .value();
        let events = copy.open_table(EVENTS).unwrap();
        let plant2 = events
            .iter()
            .unwrap()
            .filter(|r| {
                let row: crate::store::records::FeedRow =
                    postcard::from_bytes(r.as_ref().unwrap().1.value()).unwrap();
                row.site == "plant-2"
            })
            .count() as u64;
        assert_eq!(plant2, hwm);
        let next_cursor = copy
            .open_table(META)
            .unwrap()
            .get(META_NEXT_CURSOR)
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(next_cursor, events.len().unwrap() + 1);
        assert!(
            hwm >= 20 && hwm < written,
            "snapshot {hwm}, written {written}"
        );
        let taken = copy
            .open_table(META)
            .unwrap()
            .get(META_BACKUP_TAKEN_MS)
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(taken as i64, info.taken_ms);
        let rows: u64 = info.rows;
        assert!(rows > hwm + 5, "rows {rows}");
        drop((src, src_db));
        store.close().await;
    }

    /// Goal: a table the backup has no definition for is refused, never left out silently.
    #[tokio::test]
    async fn backup_refuses_a_table_it_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("central.redb");
        Store::open(&path).unwrap().close().await;
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let t: TableDefinition<u64, u64> = TableDefinition::new("surprise");
            txn.open_table(t).unwrap().insert(1, 1).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let out = dir.path().join("b.redb");
        match store.backup_to(&out) {
            Err(BackupError::UnknownTable(t)) => assert_eq!(t, "surprise"),
            other => panic!("expected UnknownTable, got {other:?}"),
        }
        assert!(!out.exists());
        assert!(!with_suffix(&out, ".tmp").exists());
        store.close().await;
    }

    /// Goal: restore puts a backup in place under a new incarnation with its restore times,
    /// refuses a data directory that already holds a store and a file that is not a backup,
    /// and a backup cannot be opened as a store by mistake (it would keep the old incarnation).
    #[tokio::test]
    async fn restore_draws_a_new_incarnation_and_refuses_a_non_empty_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let live_path = dir.path().join("live").join("central.redb");
        std::fs::create_dir_all(live_path.parent().unwrap()).unwrap();
        let store = Store::open(&live_path).unwrap();
        populate(&store).await;
        let incarnation = store.incarnation().unwrap();
        assert_ne!(incarnation, 0);
        assert_eq!(store.restored_info().unwrap(), None);
        let backup = dir.path().join("b.redb");
        let info = store.backup_to(&backup).unwrap();
        store.close().await;

        assert!(matches!(
            Store::open(&backup),
            Err(OpenStoreError::UnrestoredBackup { .. })
        ));
        // The live store's own data directory holds a store: refused, nothing touched.
        assert!(matches!(
            restore_store(&backup, &live_path),
            Err(RestoreError::NotEmpty { .. })
        ));
        // A store file is not a backup.
        let empty_dir = dir.path().join("other");
        assert!(matches!(
            restore_store(&live_path, &empty_dir.join("central.redb")),
            Err(RestoreError::NotABackup { .. })
        ));
        assert!(!empty_dir.join("central.redb").exists());

        let target = dir.path().join("restored").join("central.redb");
        let restored = restore_store(&backup, &target).unwrap();
        assert_eq!(restored.info.backup_taken_ms, info.taken_ms);
        assert_ne!(restored.incarnation, incarnation);
        assert_ne!(restored.incarnation, 0);
        assert!(!with_suffix(&target, ".restore.tmp").exists());
        let store = Store::open(&target).unwrap();
        assert_eq!(store.incarnation().unwrap(), restored.incarnation);
        assert_eq!(store.restored_info().unwrap(), Some(restored.info));
        assert!(restored.info.restored_at_ms >= info.taken_ms);
        assert_eq!(store.site_hwm("plant-1").unwrap(), 7);
        assert_eq!(store.lost_ranges(Some("plant-1")).unwrap().len(), 1);
        // A backup of a restored store is again a plain backup, restorable once more.
        let again = dir.path().join("b2.redb");
        store.backup_to(&again).unwrap();
        store.close().await;
        assert!(matches!(
            Store::open(&again),
            Err(OpenStoreError::UnrestoredBackup { .. })
        ));
        let third = restore_store(&again, &dir.path().join("r2").join("central.redb")).unwrap();
        assert_ne!(third.incarnation, restored.incarnation);
    }
}
