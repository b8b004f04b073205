//! The dead letters' interface, which both of central's stores implement: an uploaded event
//! whose body cannot be decoded or validated is kept with the reason under the next id, in the
//! upload's transaction, while the events around it are applied; readers page after an id.

use std::future::Future;

use crate::event_log::{LogReadError, blocking};
use crate::store::{DeadLetter, Store};

/// The dead letters of central's store.
pub trait DeadLetterLog: Send + Sync {
    /// Dead letters with an id above `after`, oldest first, at most `limit`.
    fn dead_letters(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, LogReadError>> + Send;
}

impl DeadLetterLog for Store {
    async fn dead_letters(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, LogReadError> {
        let s = self.clone();
        blocking(move || Store::dead_letters(&s, after, limit)).await
    }
}
