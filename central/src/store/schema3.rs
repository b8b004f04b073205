//! Frozen copies of the records of central's store schema 3 whose encoding changed in schema 4,
//! read only by the migration (`migrate.rs`). Pure data definitions: no I/O.
//!
//! FROZEN: these are the definitions as of commit b0dd4bf (the last schema-3 build). They describe
//! bytes already on disk in schema-3 stores and must never change, not even to add a field or
//! reorder one: postcard encodes fields by position, so any edit would misread those stores.
//! Records that schema 4 left unchanged (orders, exceptions, dead letters, pools, the feed, ...)
//! are not copied here; the current types read them.

use serde::Deserialize;

/// `records::ReconReport` of schema 3 (schema 4 appended `hello_acked_seq`, `reuploaded`,
/// `lost_from_seq`, `lost_through_seq` and `incarnation_changed`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(super) struct ReconReport {
    pub site: String,
    pub session: u64,
    pub connected_ms: i64,
    pub dark_since_ms: Option<i64>,
    pub hello_last_seq: u64,
    pub hwm_at_connect: u64,
    pub events_uploaded: u64,
    pub duplicates_dropped: u64,
    pub orders_offline_confirmed: u64,
    pub orders_offline_pending: u64,
    pub orders_offline_partial: u64,
    pub exceptions_business: u64,
    pub dead_letters: u64,
    pub caught_up_ms: Option<i64>,
}

/// `alerts::Alert` of schema 3 (schema 4 appended `drill_id`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(super) struct Alert {
    pub id: u64,
    pub site: String,
    pub from: String,
    pub to: String,
    pub reasons: Vec<String>,
    pub at_ms: i64,
}
