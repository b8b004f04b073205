//! Central's store on PostgreSQL, built for several central nodes on one database: the event
//! log (uploads, the feed and its sequencer), master data with its revisions (and the wake-ups
//! of other nodes when one commits), and the escrow of allowances. Every guarantee is
//! one local transaction of the database, so any node may serve any site:
//!
//! - an upload locks the site's row (`SELECT … FOR UPDATE`), plans the batch against the mark
//!   with the same pure `plan_ingest` as the embedded store, inserts the new events (one
//!   `unnest` insert) and moves the mark, in one transaction: concurrent uploads of one site
//!   from several nodes are serialized, a re-upload is stored once;
//! - feed positions are assigned after commit by one sequencer at a time (`feed`): rows commit
//!   out of id order, so paging by the insert id could skip a row; paging by the position never
//!   does;
//! - a grant is a conditional update of the pool's row in the same transaction as the site's
//!   holding (`escrow`): the sum of grants never exceeds the pool, whichever nodes grant.
//!
//! Schema versions are applied in order under an advisory lock (`schema`); a database this build
//! does not know, a server older than PostgreSQL 13, a read-only server and an unreachable one
//! are each refused at open with their own error. The pool is bounded and every statement has a
//! timeout.
//!
//! - master changes are numbered under the head row's lock, so revisions commit in order; the
//!   commit notifies the other nodes (`master`, `notify`).
//!
//! Not yet behind this backend: orders (their business checks and exception queue) and the
//! ledger's policy (top-ups, reclaims), reconciliation reports, drills, lost ranges and the
//! incarnation. An uploaded order goes to the feed as it is.
//! `outpost-central serve` runs on the embedded store only; docs/store.md says where this backend
//! stands.

pub mod alerts;
mod dead_letters;
pub mod escrow;
pub mod feed;
pub mod master;
pub mod notify;
pub mod revoked;
pub mod schema;
pub mod sites;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::NoTls;

pub use feed::Sequencer;
pub use notify::Listener;

/// TCP keep-alive on every connection: first probe after this much silence.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;

/// Revocations queued per receiver; a receiver that falls further behind gets `Resync`.
pub const REVOCATION_QUEUE: usize = 1024;

/// Oldest server this store runs on (`server_version_num`).
pub const MIN_SERVER_VERSION: i32 = 130_000;

/// How to reach the database and how much of it to use.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// A libpq URL; several hosts (`postgresql://u@h1:5432,h2:5432/db`) are tried in turn, and
    /// `target_session_attrs=read-write` finds the primary after a failover.
    pub url: String,
    /// Most connections this node holds.
    pub pool_size: usize,
    /// Limit on each statement (`statement_timeout`), and on waiting for a connection.
    pub statement_timeout: Duration,
    /// Limit on opening one connection.
    pub connect_timeout: Duration,
}

impl PgOptions {
    pub fn new(url: &str) -> Self {
        PgOptions {
            url: url.to_string(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgOpenError {
    #[error("invalid PostgreSQL URL: {0}")]
    Url(String),
    #[error("pool size must be 1..=1000, got {0}")]
    PoolSize(usize),
    #[error("cannot reach PostgreSQL: {0}")]
    Unreachable(String),
    #[error(
        "the PostgreSQL server is version {found}; Outpost needs {MIN_SERVER_VERSION} or newer"
    )]
    ServerTooOld { found: i32 },
    #[error(
        "the PostgreSQL server is read-only (a standby, or default_transaction_read_only); point \
         central at the primary, or add target_session_attrs=read-write to the URL"
    )]
    ReadOnly,
    #[error(
        "the database has Outpost schema version {found}; this build knows up to {known}: upgrade \
         central before using this database"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error("cannot migrate the database schema: {0}")]
    Migrate(String),
    #[error(
        "synchronous_commit is off for this database or role: a commit would be answered before \
         it is on disk; set it to on (or remote_apply)"
    )]
    NotDurable,
}

/// A database error, in words for logs and refusals.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL: {0}")]
pub struct PgError(pub String);

/// A client error in words: the database's own message with its SQLSTATE, or the client's
/// summary followed by its cause ("error connecting to server: Connection refused").
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError(describe(&e))
    }
}

/// A pool error in words, with the connection error behind it.
fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe(e),
        deadpool_postgres::PoolError::Timeout(_) => {
            "timed out waiting for a database connection".to_string()
        }
        other => other.to_string(),
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        PgError(format!("no database connection: {}", describe_pool(&e)))
    }
}

/// Why a commit was not confirmed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    #[error(transparent)]
    Db(#[from] PgError),
    /// No answer within the limit: the transaction may have committed or not. Never answered
    /// as a success; the caller's retry is idempotent (the mark, the pool's figures).
    #[error(
        "the commit was not confirmed within {0:?} (a synchronous standby not answering?); \
         not answered as done"
    )]
    Unconfirmed(Duration),
}

impl From<CommitError> for PgError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Db(e) => e,
            other => PgError(other.to_string()),
        }
    }
}

/// Commits `txn`, waiting at most `limit` for the confirmation. With a synchronous standby,
/// COMMIT waits until the standby has the transaction, and the server does not bound that wait
/// (`statement_timeout` does not apply to it): a standby that stopped answering would hold the
/// upload forever. Past the limit the commit counts as unconfirmed: refused, never answered as
/// done, and the caller's retry is idempotent.
pub(crate) async fn commit(
    txn: deadpool_postgres::Transaction<'_>,
    limit: Duration,
) -> Result<(), CommitError> {
    match tokio::time::timeout(limit, txn.commit()).await {
        Ok(r) => Ok(r.map_err(PgError::from)?),
        Err(_) => Err(CommitError::Unconfirmed(limit)),
    }
}

/// Revocations heard by this node (`PgStore::revocations`).
pub struct RevocationStream(broadcast::Receiver<Revocation>);

impl RevocationStream {
    /// The next revocation; `None` once the store is gone.
    pub async fn next(&mut self) -> Option<Revocation> {
        match self.0.recv().await {
            Ok(r) => Some(r),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Revocation::Resync),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// The end of a commit on `client`: a connection whose commit went unconfirmed is closed
/// instead of going back to the pool (its session state is unknown).
pub(crate) fn settle(
    client: deadpool_postgres::Object,
    r: Result<(), CommitError>,
) -> Result<(), PgError> {
    if let Err(CommitError::Unconfirmed(_)) = &r {
        drop(deadpool_postgres::Object::take(client));
    }
    Ok(r?)
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// How long a commit may wait for its confirmation (the statement timeout).
    commit_limit: Duration,
    /// How to open a connection outside the pool (the revision listener's).
    config: Arc<tokio_postgres::Config>,
    /// Woken by each local upload, so the sequencer runs at once instead of at its next poll.
    uploaded: Arc<Notify>,
    /// The newest master revision this node knows of: its own commits, and other nodes' through
    /// the listener (`notify`).
    revision: Arc<watch::Sender<u64>>,
    /// Revocations heard by the listener, checked against the list (`revocations`).
    revoked: broadcast::Sender<Revocation>,
}

/// What the listener tells the sessions of this node about the deny list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// This site was revoked (on any node): close its live session here, if there is one.
    Site(String),
    /// Notifications may have been missed (the listening connection was lost, or this receiver
    /// fell behind): check every live session against the list.
    Resync,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PgStore {
    /// Connects, checks the server (reachable, new enough, writable) and brings the schema to
    /// this build's version.
    pub async fn open(opts: &PgOptions) -> Result<PgStore, PgOpenError> {
        if !(1..=1000).contains(&opts.pool_size) {
            return Err(PgOpenError::PoolSize(opts.pool_size));
        }
        let mut cfg: tokio_postgres::Config = opts
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgOpenError::Url(e.to_string()))?;
        cfg.connect_timeout(opts.connect_timeout);
        cfg.application_name("outpost-central");
        // Kept with what the URL's own `options` say (a search_path, say).
        let ours = format!(
            "-c statement_timeout={} -c lock_timeout={}",
            opts.statement_timeout.as_millis(),
            opts.statement_timeout.as_millis()
        );
        let options = match cfg.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
            _ => ours,
        };
        cfg.options(options);
        // A lost host or a partition, not only a closed socket, ends a connection within
        // seconds instead of the kernel's many minutes.
        cfg.keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(opts.statement_timeout + opts.connect_timeout);
        let config = Arc::new(cfg.clone());
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(opts.pool_size)
            .wait_timeout(Some(opts.statement_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| PgOpenError::Url(e.to_string()))?;
        let mut client = pool
            .get()
            .await
            .map_err(|e| PgOpenError::Unreachable(describe_pool(&e)))?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int, \
                 current_setting('transaction_read_only') = 'on' OR pg_is_in_recovery(), \
                 current_setting('synchronous_commit')",
                &[],
            )
            .await
            .map_err(|e| PgOpenError::Unreachable(PgError::from(e).0))?;
        let (version, read_only, sync_commit): (i32, bool, String) =
            (row.get(0), row.get(1), row.get(2));
        if version < MIN_SERVER_VERSION {
            return Err(PgOpenError::ServerTooOld { found: version });
        }
        if read_only {
            return Err(PgOpenError::ReadOnly);
        }
        if sync_commit == "off" {
            return Err(PgOpenError::NotDurable);
        }
        schema::migrate(&mut client).await?;
        let head: i64 = client
            .query_one("SELECT revision FROM master_head WHERE id = 1", &[])
            .await
            .map_err(|e| PgOpenError::Unreachable(PgError::from(e).0))?
            .get(0);
        drop(client);
        Ok(PgStore {
            pool,
            commit_limit: opts.statement_timeout,
            config,
            uploaded: Arc::new(Notify::new()),
            revision: Arc::new(watch::Sender::new(u64::try_from(head).unwrap_or(0))),
            revoked: broadcast::channel(REVOCATION_QUEUE).0,
        })
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        Ok(self.pool.get().await?)
    }

    /// Revocations this node hears of while its listener runs (`spawn_listener`). A receiver
    /// that lags gets `Revocation::Resync` instead of the sites it missed.
    pub fn revocations(&self) -> RevocationStream {
        RevocationStream(self.revoked.subscribe())
    }

    /// How long a commit may wait for its confirmation.
    pub(crate) fn commit_limit(&self) -> Duration {
        self.commit_limit
    }

    /// Connections open and idle, and the bound.
    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }
}
