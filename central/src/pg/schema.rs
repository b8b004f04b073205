//! Versioned schema of the PostgreSQL store. Each version is one SQL script; the missing ones
//! are applied in order in one transaction under an advisory lock, so that several central
//! nodes starting at once migrate the database exactly once, and a failed migration leaves it
//! as it was. `outpost_schema` holds the version; a database at a
//! version this build does not know is refused, never touched.

use super::PgOpenError;

/// Key of the advisory lock held while migrating.
const MIGRATE_LOCK: i64 = 7_601_001;

/// Version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[&str] = &[
    // 1: sites and their marks; the event log, in upload batches that get their feed positions
    //    after commit; the feed's head; allowance pools and each site's holding of them.
    r#"
    CREATE TABLE sites (
        site        text PRIMARY KEY,
        hwm         bigint NOT NULL DEFAULT 0 CHECK (hwm >= 0),
        last_seen_ms bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE batches (
        id          bigserial PRIMARY KEY,
        site        text NOT NULL REFERENCES sites (site),
        n           int NOT NULL CHECK (n > 0),
        received_ms bigint NOT NULL,
        feed_start  bigint UNIQUE
    );
    CREATE INDEX batches_unsequenced ON batches (id) WHERE feed_start IS NULL;
    CREATE TABLE events (
        site        text NOT NULL,
        seq         bigint NOT NULL CHECK (seq > 0),
        batch_id    bigint NOT NULL REFERENCES batches (id),
        idx         int NOT NULL CHECK (idx > 0),
        event_id    text NOT NULL,
        at_ms       bigint NOT NULL,
        body_schema int NOT NULL CHECK (body_schema >= 0),
        body        bytea NOT NULL,
        trace_id    text NOT NULL,
        PRIMARY KEY (site, seq),
        UNIQUE (batch_id, idx)
    );
    CREATE TABLE feed_head (
        id  int PRIMARY KEY CHECK (id = 1),
        pos bigint NOT NULL
    );
    INSERT INTO feed_head VALUES (1, 0);
    CREATE TABLE pools (
        pool    text PRIMARY KEY,
        total   bigint NOT NULL CHECK (total >= 0),
        granted bigint NOT NULL DEFAULT 0 CHECK (granted >= 0)
    );
    CREATE TABLE holdings (
        pool text NOT NULL REFERENCES pools (pool),
        site text NOT NULL,
        held bigint NOT NULL CHECK (held >= 0),
        PRIMARY KEY (pool, site)
    );
    "#,
    // 2: master data: the change log by revision, its head, and the current state by key.
    r#"
    CREATE TABLE master_head (
        id       int PRIMARY KEY CHECK (id = 1),
        revision bigint NOT NULL
    );
    INSERT INTO master_head VALUES (1, 0);
    CREATE TABLE changes (
        rev  bigint PRIMARY KEY,
        body bytea NOT NULL
    );
    CREATE TABLE prices (
        sku      text NOT NULL,
        customer text NOT NULL,
        body     bytea NOT NULL,
        rev      bigint NOT NULL,
        PRIMARY KEY (sku, customer)
    );
    CREATE TABLE customers (
        id   text PRIMARY KEY,
        body bytea NOT NULL,
        rev  bigint NOT NULL
    );
    CREATE TABLE atp (
        sku       text NOT NULL,
        site      text NOT NULL,
        available bigint NOT NULL,
        rev       bigint NOT NULL,
        PRIMARY KEY (sku, site)
    );
    "#,
    // 3: the deny list.
    r#"
    CREATE TABLE revoked (
        site   text PRIMARY KEY,
        at_ms  bigint NOT NULL,
        reason text NOT NULL
    );
    "#,
    // 4: fleet alerts, with consecutive ids taken under the head row's lock.
    r#"
    CREATE TABLE alerts_head (
        id      int PRIMARY KEY CHECK (id = 1),
        last_id bigint NOT NULL
    );
    INSERT INTO alerts_head VALUES (1, 0);
    CREATE TABLE alerts (
        id         bigint PRIMARY KEY,
        site       text NOT NULL,
        from_state text NOT NULL,
        to_state   text NOT NULL,
        reasons    text[] NOT NULL,
        at_ms      bigint NOT NULL,
        drill_id   bigint
    );
    "#,
    // 5: when a site was first heard from (the fleet view).
    r#"
    ALTER TABLE sites ADD COLUMN first_seen_ms bigint NOT NULL DEFAULT 0;
    UPDATE sites SET first_seen_ms = last_seen_ms;
    "#,
    // 6: dead letters, with consecutive ids taken under the head row's lock.
    r#"
    CREATE TABLE dead_letters_head (
        id      int PRIMARY KEY CHECK (id = 1),
        last_id bigint NOT NULL
    );
    INSERT INTO dead_letters_head VALUES (1, 0);
    CREATE TABLE dead_letters (
        id         bigint PRIMARY KEY,
        site       text NOT NULL,
        seq        bigint NOT NULL,
        event_id   text NOT NULL,
        reason     text NOT NULL,
        event      bytea NOT NULL,
        created_ms bigint NOT NULL
    );
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Brings the database to `SCHEMA_VERSION`, or refuses one that is newer.
pub(crate) async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), PgOpenError> {
    let err = |e: tokio_postgres::Error| PgOpenError::Migrate(super::PgError::from(e).0);
    let txn = client.transaction().await.map_err(err)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(err)?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS outpost_schema (
            id int PRIMARY KEY CHECK (id = 1),
            version int NOT NULL
        );
        INSERT INTO outpost_schema VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
    )
    .await
    .map_err(err)?;
    let found: i32 = txn
        .query_one("SELECT version FROM outpost_schema WHERE id = 1", &[])
        .await
        .map_err(err)?
        .get(0);
    if found < 0 {
        return Err(PgOpenError::Migrate(format!(
            "outpost_schema holds version {found}, which no build wrote"
        )));
    }
    if found > SCHEMA_VERSION {
        return Err(PgOpenError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, script) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        txn.batch_execute(script).await.map_err(err)?;
        let v = i as i32 + 1;
        txn.execute("UPDATE outpost_schema SET version = $1 WHERE id = 1", &[&v])
            .await
            .map_err(err)?;
    }
    txn.commit().await.map_err(err)?;
    Ok(())
}
