//! The master-data log's interface, which both of central's stores implement: the ERP's items
//! (prices, ATP, customers) validated whole and written with consecutive revisions in one
//! transaction, the change log read in revision order, the current state read by key, and the
//! current revision watched (each session wakes on a new one).
//!
//! - `store::Store` (redb): the single writer assigns revisions; it also runs the allowance
//!   policy on the new figures in the same transaction (grants and reclaims are revisions too).
//! - `pg::PgStore` (PostgreSQL): the head row's lock orders writers across nodes, so revisions
//!   commit in order; nodes learn of new ones by LISTEN/NOTIFY, with a poll behind it.
//!
//! The conformance suite (`tests/tests/store_conformance.rs`) runs the same tests on both.

use std::future::Future;

use outpost_protocol::{CustomerRecord, MasterChange, PriceRecord, ValidationError};

pub use crate::checks::validate_erp_changes;
use tokio::sync::watch;

use crate::event_log::{LogReadError, blocking};
use crate::store::{Store, UpsertMasterError};

/// What a master upsert wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasterWritten {
    /// Revision of the last change written.
    pub revision: u64,
    /// The ERP's items written.
    pub changes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// Items that are invalid (index, reason); nothing was written.
    #[error("{} invalid item(s), nothing written", .0.len())]
    Invalid(Vec<(usize, ValidationError)>),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The master-data log of central's store.
pub trait MasterLog: Send + Sync {
    /// Writes the ERP's items with consecutive revisions, in one durable transaction, after
    /// checking every one (`checks::validate_erp_changes`).
    fn upsert_master(
        &self,
        changes: Vec<MasterChange>,
    ) -> impl Future<Output = Result<MasterWritten, MasterError>> + Send;

    /// Up to `max` changes with a revision greater than `after`, in revision order.
    fn changes_after(
        &self,
        after: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<(u64, MasterChange)>, LogReadError>> + Send;

    /// The current price of `sku` (the customer's own, or the list price for `None`).
    fn price(
        &self,
        sku: &str,
        customer: Option<&str>,
    ) -> impl Future<Output = Result<Option<PriceRecord>, LogReadError>> + Send;

    fn customer(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<CustomerRecord>, LogReadError>> + Send;

    /// The current revision, updated after each commit that wrote master changes.
    fn watch_revision(&self) -> watch::Receiver<u64>;
}

impl MasterLog for Store {
    async fn upsert_master(
        &self,
        changes: Vec<MasterChange>,
    ) -> Result<MasterWritten, MasterError> {
        match Store::upsert_master(self, changes).await {
            Ok(a) => Ok(MasterWritten {
                revision: a.revision,
                changes: a.changes,
            }),
            Err(UpsertMasterError::Invalid(v)) => Err(MasterError::Invalid(v)),
            Err(e) => Err(MasterError::Unavailable(e.to_string())),
        }
    }

    async fn changes_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, MasterChange)>, LogReadError> {
        let s = self.clone();
        blocking(move || Store::changes_after(&s, after, max)).await
    }

    async fn price(
        &self,
        sku: &str,
        customer: Option<&str>,
    ) -> Result<Option<PriceRecord>, LogReadError> {
        let (s, sku, customer) = (self.clone(), sku.to_string(), customer.map(String::from));
        blocking(move || Store::price(&s, &sku, customer.as_deref())).await
    }

    async fn customer(&self, id: &str) -> Result<Option<CustomerRecord>, LogReadError> {
        let (s, id) = (self.clone(), id.to_string());
        blocking(move || Store::customer(&s, &id)).await
    }

    fn watch_revision(&self) -> watch::Receiver<u64> {
        self.subscribe_revision()
    }
}
