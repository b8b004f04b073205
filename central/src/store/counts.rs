//! Sizes of central's growing tables for `GET /metrics`. Each is the table's stored length, read
//! in one read transaction without visiting its rows, so a scrape costs the same however large
//! the tables grow. I/O side (redb reads on the caller).

use redb::ReadableTableMetadata;

use super::{DEAD_LETTERS, EVENTS, EXCEPTIONS, ReadError, Store};

/// Rows in central's feed, exception and dead-letter tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Events in the ERP's feed.
    pub feed_events: u64,
    /// Exceptions stored, open and resolved (which are open needs a scan of every record).
    pub exceptions: u64,
    pub dead_letters: u64,
}

impl Store {
    pub fn table_counts(&self) -> Result<TableCounts, ReadError> {
        let txn = self.read()?;
        Ok(TableCounts {
            feed_events: txn.open_table(EVENTS)?.len()?,
            exceptions: txn.open_table(EXCEPTIONS)?.len()?,
            dead_letters: txn.open_table(DEAD_LETTERS)?.len()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_store_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("central.redb")).unwrap();
        assert_eq!(store.table_counts().unwrap(), TableCounts::default());
        store.close().await;
    }
}
