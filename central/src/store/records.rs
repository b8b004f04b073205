//! Records central keeps about orders, exceptions, dead letters, reconciliation reports and
//! reclaims, as stored (postcard) and returned by the store's reads. Plain data.

use outpost_protocol::{EventEnvelope, Order, OrderLine};
use serde::{Deserialize, Serialize};

use crate::checks::{LinePrices, Reason};
use crate::ledger::LedgerKey;

/// Where an order was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    /// At a site, uploaded by its agent.
    Site,
    /// Through central's own order API (`POST /v1/orders` at central).
    Central,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Site => "site",
            Channel::Central => "central",
        }
    }
}

/// One row of the global feed: an event as the site sent it (for central's own orders, an
/// envelope central built), with the channel it came through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedRow {
    pub site: String,
    pub channel: Channel,
    pub event: EventEnvelope,
}

/// Where an order stands at central.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderState {
    /// Central has it durably and it is in the feed; the ERP has not decided yet.
    Uploaded,
    /// Held in the exception queue, not in the feed.
    Exception,
    Accepted,
    Rejected,
    NeedsReview,
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Uploaded => "uploaded",
            OrderState::Exception => "exception",
            OrderState::Accepted => "accepted",
            OrderState::Rejected => "rejected",
            OrderState::NeedsReview => "needs_review",
        }
    }

    /// Accepted and rejected are final: the order's units have left `in_transit`.
    pub fn is_decided(self) -> bool {
        matches!(self, OrderState::Accepted | OrderState::Rejected)
    }
}

/// An order known to central, from a site or from central's own channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub order_id: String,
    /// The site that took (or, for central's channel, fulfils) the order.
    pub site: String,
    pub channel: Channel,
    pub customer_id: String,
    pub state: OrderState,
    /// The ERP's or operator's reason for the current state, if any.
    pub reason: Option<String>,
    /// The site's promise for the whole order: `confirmed`, `partial` or `pending`.
    pub promise_status: String,
    pub offline: bool,
    pub master_rev: u64,
    pub lines: Vec<OrderLine>,
    /// What the confirmed lines took from each pool; released or accepted on the ERP's decision.
    pub consumed: Vec<(LedgerKey, i64)>,
    /// Site sequence number (for central's channel, its order number).
    pub seq: u64,
    pub exception_id: Option<u64>,
    /// The site's clock when it took the order (ms since the Unix epoch).
    pub site_time_ms: i64,
    /// When central stored it.
    pub received_ms: i64,
    pub decided_ms: Option<i64>,
}

/// How much of a pool an order took, against what the site held as far as central knew.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowanceUse {
    pub pool: LedgerKey,
    pub consumed: i64,
    pub outstanding_before: i64,
}

/// The data the site used for an order, next to central's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteData {
    /// Master revision the site priced and checked the order with.
    pub master_rev: u64,
    pub lines: Vec<LinePrices>,
    pub allowance: Vec<AllowanceUse>,
}

/// Central's data when the order was last checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CentralData {
    pub revision: u64,
    /// `None` when central does not know the customer.
    pub customer_on_hold: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResolutionAction {
    /// Accepted as is by an operator: the order entered the feed.
    Accept,
    /// Rejected by an operator: its units were released and the site told.
    Reject,
    /// Passed the checks again after master data was fixed: the order entered the feed.
    Replayed,
}

impl ResolutionAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolutionAction::Accept => "accept",
            ResolutionAction::Reject => "reject",
            ResolutionAction::Replayed => "replayed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub action: ResolutionAction,
    pub reason: Option<String>,
    pub at_ms: i64,
}

/// A business exception: an uploaded order held for an operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExceptionRecord {
    pub id: u64,
    pub site: String,
    pub seq: u64,
    pub event_id: String,
    /// The event exactly as uploaded; it enters the feed as is on accept or replay.
    pub event: EventEnvelope,
    pub order: Order,
    /// Every reason found at the last check, primary first.
    pub reasons: Vec<Reason>,
    pub site_data: SiteData,
    pub central_data: CentralData,
    pub created_ms: i64,
    pub resolution: Option<Resolution>,
}

impl ExceptionRecord {
    pub fn is_open(&self) -> bool {
        self.resolution.is_none()
    }
}

/// An event that cannot be applied at all (malformed, unknown schema, invalid): kept with the
/// reason, never in the feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub site: String,
    pub seq: u64,
    pub event_id: String,
    pub reason: String,
    pub event: EventEnvelope,
    pub created_ms: i64,
}

/// What happened in one session of a site, from its Welcome until it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconReport {
    pub site: String,
    /// Per-site session number, from 1.
    pub session: u64,
    pub connected_ms: i64,
    /// When central last heard from the site before this connect; `None` on first contact.
    pub dark_since_ms: Option<i64>,
    /// The site's last assigned seq, from its Hello.
    pub hello_last_seq: u64,
    /// Central's durable high-water mark at connect.
    pub hwm_at_connect: u64,
    pub events_uploaded: u64,
    pub duplicates_dropped: u64,
    /// Orders taken while disconnected (`offline: true`) with every line confirmed.
    pub orders_offline_confirmed: u64,
    /// Orders taken while disconnected with at least one line pending.
    pub orders_offline_pending: u64,
    /// Of those pending, the ones that also had confirmed lines.
    pub orders_offline_partial: u64,
    pub exceptions_business: u64,
    pub dead_letters: u64,
    /// When the high-water mark reached `hello_last_seq`.
    pub caught_up_ms: Option<i64>,
    /// The highest seq the site had recorded as committed at central, from its Hello. Above
    /// `hwm_at_connect` when central was restored from a backup.
    pub hello_acked_seq: u64,
    /// Events stored in this session that central had acknowledged before (seq at most
    /// `hello_acked_seq`): re-sent from the site's retention after a restore.
    pub reuploaded: u64,
    /// Seqs the site acknowledged before central's restore and no longer holds: recorded as
    /// lost at the session's start, the high-water mark moved past them.
    pub lost_from_seq: Option<u64>,
    pub lost_through_seq: Option<u64>,
    /// The site last talked to another incarnation of central's store: its allowances were
    /// reset and master changes resumed from central's revision.
    pub incarnation_changed: bool,
}

/// Seqs of a site that a restored central had acknowledged and that the site no longer held when
/// it reconnected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRange {
    pub site: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// When central found out (central's clock, ms since the Unix epoch).
    pub at_ms: i64,
    pub reason: String,
}

/// A reclaim sent to a site and not yet answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReclaim {
    pub reclaim_id: u64,
    pub qty: i64,
    pub at_ms: i64,
}

/// A request to central's own order channel, as compared for idempotency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CentralOrderRequest {
    pub customer_id: String,
    pub site: String,
    pub lines: Vec<(String, i64)>,
}

/// An idempotency record of central's channel: the request and the order it created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct IdemRecord {
    pub request: CentralOrderRequest,
    pub order: OrderRecord,
}
