//! Schema migration of central's store: at open, before the tables are initialised, a store of
//! the previous schema is rewritten to `SCHEMA_VERSION` in one durable write transaction; a store
//! of a newer schema, or of a schema older than this build migrates, is refused. I/O side (redb),
//! run on the opening thread before the writer starts.
//!
//! Invariants: a migration commits whole or not at all (one transaction: a failure leaves the
//! store at its old version, byte for byte); a row that does not decode exactly as the old schema
//! fails the migration rather than being guessed at; the old records are read through frozen
//! copies of their definitions (`schema3.rs`), never through the current types.

use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::de::DeserializeOwned;

use super::alerts::{ALERTS, Alert};
use super::drills::DRILLS;
use super::records::ReconReport;
use super::{
    LOST_RANGES, META, META_INCARNATION, META_SCHEMA, REPORTS, SCHEMA_VERSION, encode,
    new_incarnation, schema3,
};

/// The oldest schema this build migrates. Schema 3 is the one before `SCHEMA_VERSION` (4); an
/// older store is first opened with a build of its next schema.
pub const OLDEST_MIGRATED_SCHEMA: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "{path} has schema version {found}, newer than version {SCHEMA_VERSION} that this build of outpost-central reads: it was written by a newer build; run that build (or a newer one) on it"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error(
        "{path} has schema version {found}, older than version {OLDEST_MIGRATED_SCHEMA}, the oldest this build migrates (to version {SCHEMA_VERSION}): bring it to version {OLDEST_MIGRATED_SCHEMA} first with an older build that migrates it"
    )]
    TooOld { path: PathBuf, found: u64 },
    #[error("cannot read the schema version of {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error(
        "cannot migrate {path} from schema version {from} to {SCHEMA_VERSION}: {what} {key} does not decode as schema {from}: {detail}; the store is left at version {from}"
    )]
    Undecodable {
        path: PathBuf,
        from: u64,
        what: &'static str,
        key: String,
        detail: String,
    },
    #[error(
        "cannot migrate {path} from schema version {from} to {SCHEMA_VERSION}: {source}; the store is left at version {from}"
    )]
    Redb {
        path: PathBuf,
        from: u64,
        #[source]
        source: redb::Error,
    },
}

/// What a migration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migrated {
    pub from: u64,
    pub to: u64,
    /// Rows re-encoded in the new schema's format.
    pub rows_rewritten: u64,
}

/// A failure inside a migration step, before the path and versions are attached.
enum StepError {
    Redb(redb::Error),
    Undecodable {
        what: &'static str,
        key: String,
        detail: String,
    },
}

impl<E: Into<redb::Error>> From<E> for StepError {
    fn from(e: E) -> Self {
        StepError::Redb(e.into())
    }
}

/// Brings the store in `db` to `SCHEMA_VERSION`: nothing to do for a new store (no schema
/// recorded) or a current one; migrates a store of a version from `OLDEST_MIGRATED_SCHEMA` on in
/// one durable transaction; refuses any other version. `path` names the store in errors and logs.
pub fn migrate(db: &Database, path: &Path) -> Result<Option<Migrated>, MigrateError> {
    let found = {
        let redb_err = |source: redb::Error| MigrateError::Read {
            path: path.to_path_buf(),
            source,
        };
        let txn = db.begin_read().map_err(|e| redb_err(e.into()))?;
        match txn.open_table(META) {
            Ok(meta) => meta
                .get(META_SCHEMA)
                .map_err(|e| redb_err(e.into()))?
                .map(|g| g.value()),
            // A new, empty database: `init_tables` stamps the current schema.
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(redb_err(e.into())),
        }
    };
    let from = match found {
        None => return Ok(None),
        Some(v) if v == SCHEMA_VERSION => return Ok(None),
        Some(v) if v > SCHEMA_VERSION => {
            return Err(MigrateError::Newer {
                path: path.to_path_buf(),
                found: v,
            });
        }
        Some(v) if v < OLDEST_MIGRATED_SCHEMA => {
            return Err(MigrateError::TooOld {
                path: path.to_path_buf(),
                found: v,
            });
        }
        Some(v) => v,
    };
    let rows_rewritten = run_steps(db, from).map_err(|e| match e {
        StepError::Redb(source) => MigrateError::Redb {
            path: path.to_path_buf(),
            from,
            source,
        },
        StepError::Undecodable { what, key, detail } => MigrateError::Undecodable {
            path: path.to_path_buf(),
            from,
            what,
            key,
            detail,
        },
    })?;
    tracing::info!(
        path = %path.display(),
        from,
        to = SCHEMA_VERSION,
        rows_rewritten,
        "migrated central's store from schema version {from} to {SCHEMA_VERSION}"
    );
    Ok(Some(Migrated {
        from,
        to: SCHEMA_VERSION,
        rows_rewritten,
    }))
}

/// Runs every step from `from` up to `SCHEMA_VERSION` and stamps the new version, in one
/// durable transaction (dropped uncommitted, so aborted, on any error). Returns the rows
/// rewritten.
fn run_steps(db: &Database, from: u64) -> Result<u64, StepError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let mut rewritten = 0;
    let mut version = from;
    while version < SCHEMA_VERSION {
        rewritten += match version {
            3 => step_3_to_4(&txn)?,
            v => unreachable!(
                "no migration step from schema {v}: OLDEST_MIGRATED_SCHEMA is checked before"
            ),
        };
        version += 1;
    }
    txn.open_table(META)?.insert(META_SCHEMA, SCHEMA_VERSION)?;
    txn.commit()?;
    Ok(rewritten)
}

/// Schema 3 → 4: the store gets an incarnation (drawn as for a new store: no agent has seen one
/// from it, so none notices a change), the new tables (lost ranges, drills), and reports and
/// alerts are re-encoded with the fields schema 4 appended.
fn step_3_to_4(txn: &WriteTransaction) -> Result<u64, StepError> {
    {
        let mut meta = txn.open_table(META)?;
        if meta.get(META_INCARNATION)?.is_none() {
            meta.insert(META_INCARNATION, new_incarnation())?;
        }
    }
    txn.open_table(LOST_RANGES)?;
    txn.open_table(DRILLS)?;

    // Alerts: no drill existed before schema 4, so no change of state was part of one.
    let mut alerts = Vec::new();
    for row in txn.open_table(ALERTS)?.iter()? {
        let (k, v) = row?;
        let old: schema3::Alert = decode_exact("alert", &k.value().to_string(), v.value())?;
        let new = Alert {
            id: old.id,
            site: old.site,
            from: old.from,
            to: old.to,
            reasons: old.reasons,
            at_ms: old.at_ms,
            drill_id: None,
        };
        alerts.push((k.value(), encode(&new)));
    }
    {
        let mut t = txn.open_table(ALERTS)?;
        for (k, v) in &alerts {
            t.insert(*k, v.as_slice())?;
        }
    }
    // Reports: a schema-3 central was never restored from a backup (it could not take one), so
    // no session lost or re-sent events or saw another incarnation. The Hello's acked seq was not
    // recorded; without a restore it is at most the mark at connect (equal unless an ack was
    // lost), which is the value kept.
    let mut reports = Vec::new();
    for row in txn.open_table(REPORTS)?.iter()? {
        let (k, v) = row?;
        let (site, session) = k.value();
        let old: schema3::ReconReport =
            decode_exact("report", &format!("{site}/{session}"), v.value())?;
        let new = ReconReport {
            site: old.site,
            session: old.session,
            connected_ms: old.connected_ms,
            dark_since_ms: old.dark_since_ms,
            hello_last_seq: old.hello_last_seq,
            hwm_at_connect: old.hwm_at_connect,
            events_uploaded: old.events_uploaded,
            duplicates_dropped: old.duplicates_dropped,
            orders_offline_confirmed: old.orders_offline_confirmed,
            orders_offline_pending: old.orders_offline_pending,
            orders_offline_partial: old.orders_offline_partial,
            exceptions_business: old.exceptions_business,
            dead_letters: old.dead_letters,
            caught_up_ms: old.caught_up_ms,
            hello_acked_seq: old.hwm_at_connect,
            reuploaded: 0,
            lost_from_seq: None,
            lost_through_seq: None,
            incarnation_changed: false,
        };
        reports.push(((site.to_string(), session), encode(&new)));
    }

    {
        let mut t = txn.open_table(REPORTS)?;
        for ((site, session), v) in &reports {
            t.insert((site.as_str(), *session), v.as_slice())?;
        }
    }
    Ok((alerts.len() + reports.len()) as u64)
}

/// Decodes `bytes` as `T`, requiring every byte to be used: a row of another layout that happens
/// to start like `T` is refused, not truncated.
fn decode_exact<T: DeserializeOwned>(
    what: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StepError> {
    let undecodable = |detail: String| StepError::Undecodable {
        what,
        key: key.to_string(),
        detail,
    };
    let (v, rest) = postcard::take_from_bytes(bytes).map_err(|e| undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(undecodable(format!(
            "{} bytes left over after the record",
            rest.len()
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use redb::{ReadableDatabase, TableHandle};

    use super::*;
    use crate::checks::Reason;
    use crate::ledger::LedgerKey;
    use crate::store::records::{Channel, OrderState};
    use crate::store::tests::ev;
    use crate::store::{HelloMarks, OpenStoreError, Store};

    const SITE: &str = "plant-1";

    /// A copy of the schema-3 fixture in a temp dir (the fixture itself is never opened: opening
    /// migrates in place).
    fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/central-schema3.redb");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("central.redb");
        std::fs::copy(&fixture, &path).unwrap();
        (dir, path)
    }

    fn meta(path: &Path, key: &str) -> Option<u64> {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(META).unwrap();
        t.get(key).unwrap().map(|g| g.value())
    }

    fn set_schema(path: &Path, version: u64) {
        let db = Database::open(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(META_SCHEMA, version)
            .unwrap();
        txn.commit().unwrap();
    }

    /// Alert rows and report rows as stored: (key, bytes).
    type RawRows = (Vec<(u64, Vec<u8>)>, Vec<((String, u64), Vec<u8>)>);

    /// Every row of the alerts and reports tables, as stored bytes.
    fn raw_rows(path: &Path) -> RawRows {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let alerts = txn
            .open_table(ALERTS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value(), v.value().to_vec())
            })
            .collect();
        let reports = txn
            .open_table(REPORTS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                let (site, session) = k.value();
                ((site.to_string(), session), v.value().to_vec())
            })
            .collect();
        (alerts, reports)
    }

    /// Checks everything the fixture holds (see tests/fixtures/README.md), through the current
    /// store's reads.
    fn assert_fixture_data(store: &Store) {
        assert_eq!(store.revision().unwrap(), 28);
        let feed: Vec<(u64, Channel, u64, String)> = store
            .events_after(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| {
                assert_eq!(e.site, SITE);
                (e.cursor, e.channel, e.event.seq, e.event.event_id)
            })
            .collect();
        let site = |cursor, seq, id: &str| (cursor, Channel::Site, seq, id.to_string());
        assert_eq!(
            feed,
            vec![
                site(1, 1, "plant-1-o1"),
                site(2, 2, "plant-1-o2"),
                site(3, 3, "scan-1"),
                site(4, 4, "scan-2"),
                site(5, 5, "plant-1-o5"),
                site(6, 6, "scan-3"),
                site(7, 7, "plant-1-o7"),
                (8, Channel::Central, 1, "central-o1".to_string()),
                site(9, 8, "plant-1-o8"),
                site(10, 9, "scan-4"),
            ]
        );
        assert_eq!(store.site_hwm(SITE).unwrap(), 10);
        let sites = store.sites().unwrap();
        assert_eq!(sites.len(), 1);
        assert!(sites[0].record.is_some());

        let o1 = store.order("plant-1-o1").unwrap().unwrap();
        assert_eq!(
            (o1.state, o1.seq, o1.lines.len()),
            (OrderState::Accepted, 1, 1)
        );
        for id in ["plant-1-o2", "plant-1-o5", "plant-1-o7", "plant-1-o8"] {
            let o = store.order(id).unwrap().unwrap();
            assert_eq!(
                (o.state, o.channel),
                (OrderState::Uploaded, Channel::Site),
                "{id}"
            );
        }
        let o10 = store.order("plant-1-o10").unwrap().unwrap();
        assert_eq!(
            (o10.state, o10.offline, o10.exception_id),
            (OrderState::Exception, true, Some(1))
        );
        let c1 = store.order("central-o1").unwrap().unwrap();
        assert_eq!((c1.channel, c1.site.as_str()), (Channel::Central, SITE));

        let e = store.exception(1).unwrap().unwrap();
        assert_eq!((e.seq, e.event_id.as_str()), (10, "plant-1-o10"));
        assert_eq!(e.reasons, vec![Reason::PriceChanged]);
        assert!(e.is_open());
        assert!(store.exception(2).unwrap().is_none());
        assert!(store.dead_letters(0, 10).unwrap().is_empty());

        let bolt = store
            .pool(&LedgerKey::atp("BOLT-M8", SITE))
            .unwrap()
            .unwrap();
        assert_eq!((bolt.erp_available, bolt.outstanding[SITE]), (5000, 20));
        let motor = store
            .pool(&LedgerKey::atp("MOTOR-2KW", SITE))
            .unwrap()
            .unwrap();
        assert_eq!(motor.outstanding[SITE], 9);
        let gear = store
            .pool(&LedgerKey::atp("GEAR-12T", SITE))
            .unwrap()
            .unwrap();
        assert_eq!(gear.outstanding[SITE], 20);
        assert!(store.pool(&LedgerKey::credit("C-GAMMA")).unwrap().is_some());

        let alerts = store.alerts(0, 10).unwrap();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(
            (a.id, a.site.as_str(), a.from.as_str(), a.to.as_str()),
            (1, SITE, "healthy", "offline")
        );
        assert_eq!(
            (a.reasons.clone(), a.drill_id),
            (vec!["not_heard_from".to_string()], None)
        );
    }

    /// The reports of the fixture's three sessions, newest first, as migrated.
    fn assert_fixture_reports(reports: &[ReconReport]) {
        let figures: Vec<_> = reports
            .iter()
            .map(|r| {
                // What schema 4 appended: no restore ever happened to a schema-3 store.
                assert_eq!(r.hello_acked_seq, r.hwm_at_connect, "session {}", r.session);
                assert_eq!(r.reuploaded, 0);
                assert_eq!((r.lost_from_seq, r.lost_through_seq), (None, None));
                assert!(!r.incarnation_changed);
                assert!(r.caught_up_ms.is_some());
                (
                    r.session,
                    r.hello_last_seq,
                    r.hwm_at_connect,
                    r.events_uploaded,
                    r.orders_offline_confirmed,
                    r.exceptions_business,
                )
            })
            .collect();
        assert_eq!(
            figures,
            vec![(3, 10, 9, 1, 1, 1), (2, 7, 7, 2, 0, 0), (1, 0, 0, 7, 0, 0)]
        );
        assert_eq!(reports[2].dark_since_ms, None);
        assert!(reports[1].dark_since_ms.is_some());
    }

    /// Goal: a store written by the schema-3 build opens with this build, is migrated to schema 4
    /// (incarnation drawn, new tables, reports and alerts re-encoded) and reads back exactly the
    /// data it held; it takes new sessions, events and master data; reopening it changes
    /// nothing. Method: a copy of the fixture made by the b0dd4bf binaries.
    #[tokio::test]
    async fn the_schema_3_fixture_is_migrated_and_reads_back_its_data() {
        let (_dir, path) = fixture_copy();
        assert_eq!(meta(&path, META_SCHEMA), Some(3));
        assert_eq!(meta(&path, META_INCARNATION), None);

        let store = Store::open(&path).unwrap();
        let incarnation = store.incarnation().unwrap();
        assert_ne!(incarnation, 0);
        assert_fixture_data(&store);
        assert_fixture_reports(&store.reports(SITE, 10).unwrap());
        assert!(store.lost_ranges(None).unwrap().is_empty());
        assert_eq!(store.next_drill_id().unwrap(), 1);

        // The agent that last talked to the schema-3 central never saw an incarnation (0): it is
        // not taken for a restore, and it uploads what it took since.
        let hello = HelloMarks {
            last_seq: 12,
            acked_seq: 10,
            retained_from_seq: 11,
            central_incarnation: 0,
            master_rev: 28,
        };
        let start = store.begin_session(SITE, hello).await.unwrap();
        assert_eq!((start.acked_seq, start.session), (10, 4));
        assert_eq!(
            (start.incarnation, start.incarnation_changed, start.lost),
            (incarnation, false, None)
        );
        let out = store
            .ingest(SITE, vec![ev(SITE, 11), ev(SITE, 12)])
            .await
            .unwrap();
        assert_eq!((out.stored, out.new_hwm), (2, 12));
        let r = &store.reports(SITE, 1).unwrap()[0];
        assert_eq!((r.session, r.events_uploaded, r.reuploaded), (4, 2, 0));
        let applied = store
            .upsert_master(vec![outpost_protocol::MasterChange::Atp(
                outpost_protocol::AtpRecord {
                    sku: "GEAR-12T".into(),
                    site: SITE.into(),
                    available: 200,
                },
            )])
            .await
            .unwrap();
        assert!(applied.revision > 28);
        store.close().await;

        // Reopening: already at schema 4, nothing to migrate; the incarnation stays.
        let db = Database::open(&path).unwrap();
        assert_eq!(migrate(&db, &path).unwrap(), None);
        drop(db);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.incarnation().unwrap(), incarnation);
        assert_eq!(store.site_hwm(SITE).unwrap(), 12);
        assert_eq!(store.reports(SITE, 10).unwrap().len(), 4);
        assert_fixture_reports(&store.reports(SITE, 10).unwrap()[1..]);
        store.close().await;
        assert_eq!(meta(&path, META_SCHEMA), Some(SCHEMA_VERSION));
    }

    /// Goal: the migration says what it did (from, to, rows rewritten: 3 reports and 1 alert)
    /// and a second run does nothing; the store is durably at schema 4 with the new tables.
    #[test]
    fn the_migration_rewrites_the_changed_rows_once() {
        let (_dir, path) = fixture_copy();
        let db = Database::open(&path).unwrap();
        let done = migrate(&db, &path).unwrap();
        assert_eq!(
            done,
            Some(Migrated {
                from: 3,
                to: SCHEMA_VERSION,
                rows_rewritten: 4
            })
        );
        assert_eq!(migrate(&db, &path).unwrap(), None);
        let txn = db.begin_read().unwrap();
        let tables: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect();
        assert!(tables.iter().any(|t| t == "lost_ranges"));
        assert!(tables.iter().any(|t| t == "drills"));
        drop(txn);
        drop(db);
        assert_eq!(meta(&path, META_SCHEMA), Some(SCHEMA_VERSION));
        assert!(meta(&path, META_INCARNATION).is_some_and(|i| i != 0));
    }

    /// Goal: a store written by a newer build is refused, unchanged, with an error naming both
    /// versions and what to do.
    #[tokio::test]
    async fn a_store_newer_than_this_build_is_refused() {
        let (_dir, path) = fixture_copy();
        Store::open(&path).unwrap().close().await;
        set_schema(&path, SCHEMA_VERSION + 1);
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(&err, OpenStoreError::Migrate(MigrateError::Newer { found, .. }) if *found == SCHEMA_VERSION + 1),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
            "{text}"
        );
        assert!(
            text.contains(&format!("version {SCHEMA_VERSION} that this build")),
            "{text}"
        );
        assert!(text.contains("newer build"), "{text}");
        assert_eq!(meta(&path, META_SCHEMA), Some(SCHEMA_VERSION + 1));
    }

    /// Goal: a store older than the oldest schema this build migrates is refused, unchanged,
    /// naming that oldest version.
    #[test]
    fn a_store_older_than_the_oldest_migrated_schema_is_refused() {
        let (_dir, path) = fixture_copy();
        set_schema(&path, OLDEST_MIGRATED_SCHEMA - 1);
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(
                &err,
                OpenStoreError::Migrate(MigrateError::TooOld { found: 2, .. })
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "older than version {OLDEST_MIGRATED_SCHEMA}, the oldest this build migrates"
            )),
            "{text}"
        );
        assert_eq!(meta(&path, META_SCHEMA), Some(2));
    }

    /// Goal: the migration is atomic: when it fails after it has already rewritten rows in its
    /// transaction, the store is left exactly at schema 3 (no incarnation, no new table, the
    /// alerts' old bytes) and the error names the row. Method: the fixture with its session-2
    /// report replaced by bytes that do not decode; alerts are rewritten before reports.
    #[test]
    fn a_failed_migration_leaves_the_store_at_schema_3() {
        let (_dir, path) = fixture_copy();
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(REPORTS)
                .unwrap()
                .insert((SITE, 2u64), [0xffu8; 3].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let before = raw_rows(&path);
        let err = Store::open(&path).unwrap_err();
        match &err {
            OpenStoreError::Migrate(MigrateError::Undecodable {
                from, what, key, ..
            }) => {
                assert_eq!((*from, *what, key.as_str()), (3, "report", "plant-1/2"));
            }
            other => panic!("expected an undecodable report, got {other:?}"),
        }
        assert!(err.to_string().contains("left at version 3"), "{err}");
        assert_eq!(meta(&path, META_SCHEMA), Some(3));
        assert_eq!(meta(&path, META_INCARNATION), None);
        assert_eq!(raw_rows(&path), before);
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(
            txn.list_tables()
                .unwrap()
                .all(|t| t.name() != "lost_ranges" && t.name() != "drills")
        );
    }

    /// Goal: a schema-3 row is read only if it is exactly a schema-3 record: a schema-4 row (the
    /// old fields followed by the appended ones) is refused, not truncated.
    #[test]
    fn a_row_with_bytes_left_over_is_not_a_schema_3_row() {
        let new = ReconReport {
            site: SITE.into(),
            session: 1,
            hello_acked_seq: 5,
            ..ReconReport::default()
        };
        let bytes = encode(&new);
        assert!(matches!(
            decode_exact::<schema3::ReconReport>("report", "plant-1/1", &bytes),
            Err(StepError::Undecodable { .. })
        ));
        let old = encode(&(
            SITE,
            1u64,
            0i64,
            None::<i64>,
            0u64,
            0u64,
            0u64,
            0u64,
            0u64,
            0u64,
            0u64,
            0u64,
            0u64,
            None::<i64>,
        ));
        let r: schema3::ReconReport = decode_exact("report", "plant-1/1", &old).ok().unwrap();
        assert_eq!((r.site.as_str(), r.session), (SITE, 1));
    }
}
