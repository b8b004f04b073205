//! The store's errors, one enum per kind of operation (write, read, open), and the failure of
//! one operation inside a write group. Pure types; the I/O that produces them is elsewhere.

use std::path::PathBuf;

use super::schema::SCHEMA_VERSION;

/// Why a write was refused or failed. Every variant but `Unavailable` means nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Validation(String),
    #[error("unknown customer {0:?}")]
    UnknownCustomer(String),
    #[error("unknown SKU {0:?}")]
    UnknownSku(String),
    #[error("SKU {sku:?} has no list price and no price for customer {customer:?}")]
    NoPrice { sku: String, customer: String },
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("event id {0:?} was already used for a different milestone")]
    EventIdReused(String),
    #[error("the outbox holds {0} events, the most allowed; writes resume as central catches up")]
    OutboxFull(u64),
    #[error("master batch refused: {0}")]
    BadMasterBatch(String),
    #[error("central acknowledged seq {through} but the last local seq is {last}")]
    AckBeyondLast { through: u64, last: u64 },
    #[error("cannot rewind the acked mark forward, from {acked} to {to}")]
    RewindForward { to: u64, acked: u64 },
    #[error(
        "cannot rewind the acked mark from {acked} to {to}: the oldest event held is seq \
         {retained_from}, events before it were pruned ([outbox] retain_acked_secs and \
         retain_acked_max_events)"
    )]
    NotRetained {
        to: u64,
        acked: u64,
        retained_from: u64,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Why a read failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Why a meta value could not be read while the store opened (`read_meta`). Each variant shows
/// redb's own message, as the store has always reported it.
#[derive(Debug, thiserror::Error)]
pub enum ReadMetaError {
    #[error(transparent)]
    Begin(#[from] redb::TransactionError),
    #[error(transparent)]
    Table(#[from] redb::TableError),
    #[error(transparent)]
    Get(#[from] redb::StorageError),
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is already open (is another agent running on this data directory?)")]
    AlreadyOpen { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: redb::Error },
    #[error("{path} has schema version {found}, this agent reads version {SCHEMA_VERSION}")]
    SchemaVersion { path: PathBuf, found: u64 },
    #[error("cannot start the store writer thread: {0}")]
    Thread(std::io::Error),
    /// The applied master revision, read while opening.
    #[error("cannot read the store: {0}")]
    ReadMeta(#[source] ReadMetaError),
    /// A read right after opening (the agent reads when the last master batch was applied).
    #[error("cannot read the store: {0}")]
    Read(#[source] ReadError),
}

/// Failure of one operation inside a group: a refusal (nothing written, the rest of the group
/// goes on) or a storage failure (the whole group is abandoned).
pub(super) enum Fail {
    Reject(WriteError),
    Storage(String),
}

impl From<redb::StorageError> for Fail {
    fn from(e: redb::StorageError) -> Self {
        Fail::Storage(e.to_string())
    }
}

impl From<postcard::Error> for Fail {
    /// Stored records are only decoded while an operation checks its inputs, before it writes,
    /// so a corrupt record fails that operation alone (retrying or reopening cannot fix it).
    fn from(e: postcard::Error) -> Self {
        Fail::Reject(WriteError::Corrupt(e.to_string()))
    }
}

impl From<WriteError> for Fail {
    fn from(e: WriteError) -> Self {
        Fail::Reject(e)
    }
}

pub(super) fn storage<E: std::fmt::Display>(e: E) -> ReadError {
    ReadError::Unavailable(e.to_string())
}

pub(super) fn corrupt<E: std::fmt::Display>(e: E) -> ReadError {
    ReadError::Corrupt(e.to_string())
}

pub(super) fn mismatch() -> WriteError {
    WriteError::Unavailable(
        "internal error: the writer answered with another operation's result".into(),
    )
}
