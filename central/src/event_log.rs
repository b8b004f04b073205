//! The event log's interface, which both of central's stores implement: an upload stores a
//! site's new events and moves the site's high-water mark in one transaction (a re-upload after
//! a lost ack is recognised by the mark and stored once), and the feed hands out committed events
//! in one total order that a reader pages through without ever skipping one.
//!
//! - `store::Store` (redb, embedded, one process): the feed cursor is assigned in the commit by
//!   the single writer.
//! - `pg::PgStore` (PostgreSQL, built for several central nodes once `serve` runs on it): the
//!   upload locks the site's row;
//!   feed positions are assigned after commit by one sequencer at a time.
//!
//! One conformance suite (`tests/tests/store_conformance.rs`) runs the same tests against both.
//! What an upload does with an order differs for now: the embedded store checks it against
//! master data (the exception queue) and books what it consumed of allowances; the PostgreSQL
//! store puts it in the feed as it is (docs/store.md, "Where it stands").

use std::future::Future;

use outpost_protocol::EventEnvelope;
use outpost_protocol::session::IngestError;

use crate::store::{IngestBatchError, Store};

/// What an upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uploaded {
    /// Events at or below the site's mark: stored by an earlier upload, skipped.
    pub duplicates: usize,
    /// New events stored.
    pub stored: usize,
    /// The site's high-water mark after the upload (what the ack may say).
    pub new_hwm: u64,
}

/// One event in the feed, at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedEntry {
    pub pos: u64,
    pub event: EventEnvelope,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The batch breaks the protocol (a gap, another site's event, too many); nothing was
    /// written.
    #[error(transparent)]
    Plan(#[from] IngestError),
    /// A seq this store cannot keep (PostgreSQL's bigint ends at 2^63 - 1); nothing was written.
    #[error("seq {0} is beyond what the store keeps (2^63 - 1)")]
    SeqOutOfRange(u64),
    /// The store could not commit; nothing was acknowledged.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct LogReadError(pub String);

/// The event log of central's store.
pub trait EventLog: Send + Sync {
    /// Stores the new events of `site`'s batch and moves its mark, in one durable transaction,
    /// and answers after the commit.
    fn upload(
        &self,
        site: &str,
        events: Vec<EventEnvelope>,
    ) -> impl Future<Output = Result<Uploaded, UploadError>> + Send;

    /// The site's durable high-water mark (0 for a site never heard from).
    fn site_hwm(&self, site: &str) -> impl Future<Output = Result<u64, LogReadError>> + Send;

    /// Up to `limit` events with a position greater than `after`, in position order.
    fn feed_after(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<FeedEntry>, LogReadError>> + Send;
}

/// Runs a read of the redb store on the blocking pool.
pub(crate) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, LogReadError>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogReadError(e.to_string()))?
        .map_err(|e| LogReadError(e.to_string()))
}

impl EventLog for Store {
    async fn upload(
        &self,
        site: &str,
        events: Vec<EventEnvelope>,
    ) -> Result<Uploaded, UploadError> {
        match self.ingest(site, events).await {
            Ok(o) => Ok(Uploaded {
                duplicates: o.duplicates,
                stored: o.stored,
                new_hwm: o.new_hwm,
            }),
            Err(IngestBatchError::Plan(e)) => Err(UploadError::Plan(e)),
            Err(IngestBatchError::Unavailable(e)) => Err(UploadError::Unavailable(e.0)),
        }
    }

    async fn site_hwm(&self, site: &str) -> Result<u64, LogReadError> {
        let (store, site) = (self.clone(), site.to_string());
        blocking(move || store.site_hwm(&site)).await
    }

    async fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, LogReadError> {
        let store = self.clone();
        let rows = blocking(move || store.events_after(after, limit)).await?;
        Ok(rows
            .into_iter()
            .map(|r| FeedEntry {
                pos: r.cursor,
                event: r.event,
            })
            .collect())
    }
}
