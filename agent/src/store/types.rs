//! The store's values: what callers submit (orders, milestones), what it keeps and returns
//! (records, marks, outcomes), the outbox's limits and retention policy, and the wall-clock
//! helpers they are stamped with. Pure data, no I/O beyond reading the clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_protocol::{ErpStatus, MilestoneKind, Money, Order};
use serde::{Deserialize, Serialize};

/// Most events waiting in the outbox. Past this the agent refuses new writes (503) rather than
/// filling the disk: about 1.5 GB at 300 bytes an event, weeks of a busy site's traffic. Counts
/// unacknowledged events only: acknowledged ones kept for a restored central are bounded on their
/// own by `[outbox] retain_acked_max_events` (at most `MAX_RETAIN_ACKED_EVENTS`).
pub const MAX_OUTBOX_EVENTS: u64 = 5_000_000;
/// Default `[outbox] retain_acked_secs`: acknowledged events are kept a week, longer than the
/// usual time between central's backup and a restore from it being decided on.
pub const DEFAULT_RETAIN_ACKED_SECS: u64 = 7 * 24 * 3600;
/// Default `[outbox] retain_acked_max_events`: a million events (~300 MB at 300 bytes an event)
/// covers a week of a busy site while keeping the retained rows a fraction of the outbox limit.
pub const DEFAULT_RETAIN_ACKED_EVENTS: u64 = 1_000_000;
/// Largest accepted `retain_acked_secs`: a year. Older backups are not restored in practice.
pub const MAX_RETAIN_ACKED_SECS: u64 = 365 * 24 * 3600;
/// Largest accepted `retain_acked_max_events`: the disk taken by retained events stays within
/// what the outbox limit already allows for unacknowledged ones.
pub const MAX_RETAIN_ACKED_EVENTS: u64 = MAX_OUTBOX_EVENTS;

/// How long acknowledged events stay in the outbox (`[outbox] retain_acked_*`), so that a central
/// restored from a backup can take them again. A row is kept while both bounds allow it; 0 in
/// either keeps none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Acknowledged events stored (`at_ms`) longer ago than this are pruned.
    pub max_age_secs: u64,
    /// Only the newest this many acknowledged events are kept.
    pub max_events: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age_secs: DEFAULT_RETAIN_ACKED_SECS,
            max_events: DEFAULT_RETAIN_ACKED_EVENTS,
        }
    }
}

impl Retention {
    /// Keeps no acknowledged event (the behaviour before retention existed).
    pub const NONE: Retention = Retention {
        max_age_secs: 0,
        max_events: 0,
    };

    /// Whether the row `seq`, stored at `at_ms` (`None`: unreadable), is past its retention once
    /// central acknowledged everything through `acked`. Unacknowledged rows never are.
    pub fn expired(&self, seq: u64, at_ms: Option<i64>, acked: u64, now_ms: i64) -> bool {
        self.expired_by_seq(seq, acked) || (seq <= acked && self.expired_by_age(at_ms, now_ms))
    }

    /// What can be decided from the seq alone: acknowledged, and beyond the newest `max_events`
    /// (or nothing is retained at all).
    pub(super) fn expired_by_seq(&self, seq: u64, acked: u64) -> bool {
        seq <= acked
            && (self.max_events == 0 || self.max_age_secs == 0 || acked - seq >= self.max_events)
    }

    /// Stored longer ago than `max_age_secs`. An unreadable row can never be resent correctly:
    /// keeping it would only hold space.
    pub(super) fn expired_by_age(&self, at_ms: Option<i64>, now_ms: i64) -> bool {
        let Some(at_ms) = at_ms else { return true };
        let max_age_ms = i64::try_from(self.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        now_ms.saturating_sub(at_ms) > max_age_ms
    }
}

/// A price as cached: the amount and its currency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriceValue {
    pub unit_price: Money,
    pub currency: String,
}

/// An order as submitted to the API, before validation and pricing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewOrder {
    pub customer_id: String,
    pub lines: Vec<NewLine>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewLine {
    pub sku: String,
    pub qty: i64,
}

/// An order as stored and returned by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub order: Order,
    pub seq: u64,
    pub at_ms: i64,
    /// Why each line got its promise, in line order; stored so a retry reads the same words.
    pub reasons: Vec<String>,
    /// The ERP's decision, once central has sent it down (`None` until then).
    pub erp_status: Option<ErpStatus>,
    pub erp_reason: Option<String>,
    /// W3C trace id the order was recorded under (also in its outbox envelope); a retry of the
    /// request returns this one, not the retry's.
    pub trace_id: String,
}

impl OrderRecord {
    pub fn created_at(&self) -> String {
        rfc3339_millis(self.at_ms)
    }
}

/// The wall clock in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC (`2026-11-26T10:00:00.123Z`).
pub fn rfc3339_millis(at_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// A shipment milestone as submitted to the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewMilestone {
    pub event_id: String,
    pub shipment_id: String,
    pub milestone: MilestoneKind,
    pub scanner_id: String,
    pub at: String,
}

/// A milestone as stored: the request and the seq it was given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MilestoneRecord {
    pub request: NewMilestone,
    pub seq: u64,
    /// W3C trace id the milestone was recorded under (also in its outbox envelope).
    pub trace_id: String,
}

/// Whether a write created something or found the identical earlier request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T> {
    Created(T),
    Existing(T),
}

impl<T> Outcome<T> {
    pub fn into_inner(self) -> T {
        match self {
            Outcome::Created(t) | Outcome::Existing(t) => t,
        }
    }

    pub fn is_created(&self) -> bool {
        matches!(self, Outcome::Created(_))
    }
}

/// The counters and marks shown by `GET /v1/health` and sent in the Hello, read in one
/// transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    pub master_rev: u64,
    pub last_seq: u64,
    pub acked_seq: u64,
    /// Lowest seq still held in the outbox, acknowledged or not; `last_seq + 1` when none is.
    pub retained_from_seq: u64,
    /// Incarnation of central's store named by the last Welcome (0: none yet).
    pub central_incarnation: u64,
}

impl Marks {
    /// Events not yet acknowledged by central (retained acknowledged ones are not counted).
    pub fn outbox_depth(&self) -> u64 {
        self.last_seq.saturating_sub(self.acked_seq)
    }

    /// Acknowledged events still held for a restored central.
    pub fn retained_acked(&self) -> u64 {
        (self.acked_seq + 1).saturating_sub(self.retained_from_seq)
    }
}

/// What one prune step removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Acknowledged rows deleted.
    pub rows: u64,
    /// The step stopped at `MAX_PRUNE_PER_STEP` with expired rows left: prune again.
    pub more: bool,
}

/// What adopting the incarnation named by a Welcome did (`Store::adopt_central_incarnation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncarnationChange {
    /// The same incarnation as before: nothing changed.
    Unchanged,
    /// None was recorded yet: it is now, nothing else changed.
    First,
    /// Central's store was replaced (restored from a backup): every allowance was dropped to 0
    /// and the applied master revision set to central's `master_from_rev`.
    Changed {
        previous: u64,
        /// Allowance rows that were above 0, and what they held summed per pool kind.
        allowances_dropped: u64,
        atp_dropped: i64,
        credit_dropped: i64,
        master_rev_before: u64,
    },
}

/// The outbox at a glance (heartbeat signals): see `Store::outbox_summary`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxSummary {
    pub events: u64,
    pub bytes: u64,
    /// `at_ms` of the oldest unacknowledged event; `None` when the outbox is empty.
    pub oldest_at_ms: Option<i64>,
}

/// What `GET /v1/atp/{sku}` shows: the site's allowance and the ERP's figure for the SKU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtpView {
    /// Remaining allowance of the SKU at this site (0 if central never granted any).
    pub allowance: i64,
    /// The ERP's last ATP figure for this SKU at this site, if central ever sent one.
    pub erp_available: Option<i64>,
    pub master_rev: u64,
    /// When the last master batch was applied (ms since the epoch), if ever.
    pub as_of_ms: Option<i64>,
}
