//! The fleet alerts' interface, which both of central's stores implement: each change of a
//! site's health state stored under the next id (ids consecutive, so a reader paging `after` a
//! cursor never skips one), the oldest deleted beyond `MAX_ALERTS`.

use std::future::Future;

use crate::event_log::{LogReadError, blocking};
use crate::store::{Alert, NewAlert, Store};

/// The alerts of central's store.
pub trait AlertLog: Send + Sync {
    /// Stores `alert` under the next id, durably.
    fn record_alert(
        &self,
        alert: NewAlert,
    ) -> impl Future<Output = Result<Alert, LogReadError>> + Send;

    /// Alerts with an id above `after`, oldest first, at most `limit`.
    fn alerts(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Alert>, LogReadError>> + Send;
}

impl AlertLog for Store {
    async fn record_alert(&self, alert: NewAlert) -> Result<Alert, LogReadError> {
        Store::record_alert(self, alert)
            .await
            .map_err(|e| LogReadError(e.to_string()))
    }

    async fn alerts(&self, after: u64, limit: usize) -> Result<Vec<Alert>, LogReadError> {
        let s = self.clone();
        blocking(move || Store::alerts(&s, after, limit)).await
    }
}
