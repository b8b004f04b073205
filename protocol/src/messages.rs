//! Messages exchanged on the sync connection, and the site events and master-data records they
//! carry. Pure types with their semantic validation; encoding lives in `frame`.

use serde::{Deserialize, Serialize};

use crate::escrow::Pool;
use crate::money::Money;
// Re-exported so `outpost_protocol::ValidationError` and `messages::ValidationError` keep
// naming the same type; it lives in a leaf module so `trace` can use it without a cycle.
pub use crate::validation::{MAX_IDEMPOTENCY_KEY_LEN, ValidationError};

/// Longest identifier (SKU, customer, order, event, shipment, scanner id) accepted anywhere.
/// Long enough for any ERP key or UUID, short enough to keep index rows small.
pub const MAX_ID_LEN: usize = 64;
/// Most lines in one order. Larger orders are split by the ERP in practice; this bounds a frame.
pub const MAX_ORDER_LINES: usize = 100;
/// Most events in one `Events` frame. 1,000 events of a few hundred bytes stay far below
/// `MAX_FRAME_BYTES` even with full orders, and amortise one central commit over many events.
pub const MAX_EVENTS_PER_BATCH: usize = 1_000;
/// Most master-data changes in one `Master` frame (same reasoning as `MAX_EVENTS_PER_BATCH`).
pub const MAX_CHANGES_PER_FRAME: usize = 1_000;
/// Longest free-text field (customer name, refusal reason).
pub const MAX_TEXT_LEN: usize = 256;
/// Largest order line quantity: far above any real line, far below overflow in sums.
pub const MAX_QTY: i64 = 1_000_000_000;

/// Sent by the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message of a session.
    Hello(Hello),
    /// A contiguous run of outbox events in sequence order.
    Events(Vec<EventEnvelope>),
    /// Asks for more allowance of a pool now (an order is waiting); answered by `AllowanceReply`.
    AllowanceRequest {
        request_id: u64,
        pool: Pool,
        qty: i64,
    },
    /// The agent's health signals, sent every `[health] heartbeat_secs` on a live session.
    Heartbeat(Heartbeat),
    /// Protocol 4: asks central to sign a new certificate for this site's new key (a PKCS#10
    /// request in DER; the key itself never leaves the site). Central takes the site id from the
    /// session's certificate, never from the request. Answered by `Certificate` or
    /// `CertificateRefused`. Variants are only ever appended, so protocol 3 messages keep their
    /// encoding.
    RenewCertificate { csr_der: Vec<u8> },
}

/// What an agent reports about itself and its host (fleet health). Counters are cumulative
/// since the agent started (central derives rates from consecutive heartbeats); `None` where a
/// figure could not be read on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent's wall clock when it sent this, ms since the Unix epoch (clock offset).
    pub agent_time_ms: i64,
    pub agent_version: String,
    pub uptime_secs: u64,
    /// CPU of the agent process, percent of one core.
    pub process_cpu_pct: Option<f32>,
    pub process_rss_bytes: Option<u64>,
    /// CPU of the whole host, percent of all cores.
    pub host_cpu_pct: Option<f32>,
    pub host_mem_used_bytes: Option<u64>,
    pub host_mem_total_bytes: Option<u64>,
    /// Free and total space of the filesystem holding the store.
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    pub store_file_bytes: Option<u64>,
    /// Events in the outbox not yet acknowledged by central, and their encoded size.
    pub outbox_events: u64,
    pub outbox_bytes: u64,
    /// When the oldest unacknowledged event was stored (site clock, ms since the epoch): the
    /// age of the data at risk. `None` when the outbox is empty.
    pub oldest_unsynced_ms: Option<i64>,
    /// Master revision applied at the site.
    pub master_rev: u64,
    /// When that revision was applied (site clock, ms since the epoch), `None` if never.
    pub master_applied_ms: Option<i64>,
    /// Local API requests and error answers (4xx and 5xx) since the agent started.
    pub api_requests: u64,
    pub api_errors: u64,
}

/// Sent by central.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CentralMsg {
    /// The hello was accepted.
    Welcome(Welcome),
    /// The session is refused or ended; the connection closes after it.
    Refuse(Refuse),
    /// Every event of this site with `seq <= through_seq` is committed durably at central.
    Ack { through_seq: u64 },
    /// Master-data changes after `from_rev` up to and including `through_rev` that concern this
    /// site (changes for other sites are left out, so `changes` may be empty).
    Master(MasterBatch),
    /// Answer to `AllowanceRequest`. A grant (`granted > 0`) is also a master change with
    /// revision `rev`; the agent confirms against it only once it has applied that revision.
    AllowanceReply {
        request_id: u64,
        granted: i64,
        rev: u64,
        reason: String,
    },
    /// Protocol 4: the certificate signed for a `RenewCertificate` request, as PEM (leaf first).
    Certificate { chain_pem: String },
    /// Protocol 4: central will not sign (no CA key configured, a bad request, too soon since
    /// the last one). The agent keeps its current certificate and asks again later.
    CertificateRefused { reason: String },
}

/// Largest certificate signing request accepted (DER): a few hundred bytes in practice.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_version: String,
    /// The site the agent believes it is. Central checks it against the certificate and refuses a
    /// mismatch; identity itself is only ever taken from the certificate.
    pub site: String,
    /// Master revision applied in the agent's store.
    pub master_rev: u64,
    /// Highest sequence number the agent has assigned so far (0 if none).
    pub last_seq: u64,
    /// The agent's wall clock when it sent the Hello, in ms since the Unix epoch. Central
    /// compares it with its own clock to estimate the site's clock offset (fleet health); it is
    /// never used to order or accept events.
    pub agent_time_ms: i64,
    /// Highest seq this agent has recorded as committed at central (from central's acks).
    /// A central whose own high-water mark is lower lost what it acknowledged (it was restored
    /// from a backup): it takes the events after its mark again.
    pub acked_seq: u64,
    /// Lowest seq the agent still holds: acknowledged events are kept for a retention period
    /// (`[outbox] retain_acked_*`) so that a restored central can take them again, then the
    /// unacknowledged ones. `last_seq + 1` when it holds none. Seqs below it can no longer be
    /// resent: a restored central whose mark is below it records them as lost.
    pub retained_from_seq: u64,
    /// The incarnation of central's store this agent last had a Welcome from (0: none yet).
    pub central_incarnation: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    pub central_version: String,
    /// Highest sequence number of this site committed at central (its high-water mark).
    pub acked_seq: u64,
    /// Central's current master revision.
    pub master_rev: u64,
    /// Identifies central's store: drawn when it is created and again when it is restored from
    /// a backup. An agent that sees it change knows central may have forgotten grants and master
    /// revisions it had sent: it drops its allowances and takes `master_from_rev` as its revision.
    pub incarnation: u64,
    /// The revision after which central sends master changes in this session: the Hello's
    /// `master_rev`, or, when the incarnation changed, central's revision before this session's
    /// grants (the agent drops its allowances and starts from here).
    pub master_from_rev: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// The peer speaks a protocol version this side does not.
    IncompatibleVersion,
    /// The hello or an event names a site other than the certificate's.
    WrongSite,
    /// The peer broke the protocol (bad frame, sequence gap, oversized batch...).
    ProtocolViolation,
    /// A newer connection from the same site replaced this one.
    Superseded,
    /// Central is shutting down or cannot serve right now; retry later.
    Unavailable,
    /// An operator at central revoked this site: it is refused until reinstated. The agent keeps
    /// its outbox and keeps retrying. (Last, so that the encodings of the codes above stay.)
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refuse {
    pub code: RefuseCode,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MasterBatch {
    pub from_rev: u64,
    pub through_rev: u64,
    pub changes: Vec<MasterChange>,
}

/// One master-data change, owned by central: ERP data, allowance grants and reclaims, and the
/// ERP's decisions on a site's orders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MasterChange {
    Price(PriceRecord),
    Atp(AtpRecord),
    Customer(CustomerRecord),
    /// Adds `qty` to `site`'s allowance of `pool`.
    Grant(Grant),
    /// Asks `site` to return up to `qty` of unused allowance of `pool`; the site answers with an
    /// `AllowanceReturn` event carrying the same `reclaim_id`.
    Reclaim(Reclaim),
    /// The ERP's decision on one of `site`'s orders.
    OrderStatus(OrderStatusUpdate),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub site: String,
    pub pool: Pool,
    pub qty: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reclaim {
    pub reclaim_id: u64,
    pub site: String,
    pub pool: Pool,
    pub qty: i64,
}

/// Where an order stands after it left the site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErpStatus {
    Accepted,
    Rejected,
    NeedsReview,
}

impl ErpStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ErpStatus::Accepted => "accepted",
            ErpStatus::Rejected => "rejected",
            ErpStatus::NeedsReview => "needs_review",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderStatusUpdate {
    pub site: String,
    pub order_id: String,
    pub status: ErpStatus,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriceRecord {
    pub sku: String,
    /// `None` for the list price, else a customer-specific price.
    pub customer: Option<String>,
    pub unit_price: Money,
    pub currency: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AtpRecord {
    pub sku: String,
    pub site: String,
    pub available: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustomerRecord {
    pub id: String,
    pub name: String,
    pub credit_limit: Money,
    pub on_hold: bool,
}

/// Schema version of `EventBody` written by this build. Central dead-letters an event whose
/// schema it does not know instead of failing the batch it came in.
pub const EVENT_SCHEMA: u16 = 1;

/// A site event as stored in the agent's outbox and at central.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub site: String,
    /// Per-site sequence number, assigned in the transaction that stored the event; starts at 1.
    pub seq: u64,
    /// Unique per site: the order id for orders, the client's event id for milestones.
    pub event_id: String,
    /// The site's wall clock when the event was stored, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Schema version of `body`.
    pub schema: u16,
    /// The postcard-encoded `EventBody`. Opaque to framing, so that one malformed or unknown
    /// event is dead-lettered on its own while the events around it are applied.
    pub body: Vec<u8>,
    /// W3C trace id (32 lower-case hex characters) the event was recorded under at the site: the
    /// client's `traceparent` or a fresh one. Last, so the fields above keep their positions.
    pub trace_id: String,
}

/// Why an event cannot be applied at all (a permanent failure: dead-lettered with the reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDecodeError {
    #[error("unknown event schema version {0} (this build knows {EVENT_SCHEMA})")]
    UnknownSchema(u16),
    #[error("malformed event body: {0}")]
    Malformed(String),
    #[error("invalid event: {0}")]
    Invalid(#[from] ValidationError),
}

impl EventEnvelope {
    /// Builds an envelope around `body` in the current schema, under a trace id derived from the
    /// event's identity (`derived_trace_id`); callers that serve a request set the request's trace
    /// with `with_trace_id`. Deriving rather than leaving it empty keeps every envelope valid.
    pub fn new(site: &str, seq: u64, event_id: &str, at_ms: i64, body: &EventBody) -> Self {
        EventEnvelope {
            site: site.to_string(),
            seq,
            event_id: event_id.to_string(),
            at_ms,
            schema: EVENT_SCHEMA,
            body: postcard::to_allocvec(body).expect("encoding an in-memory event cannot fail"),
            trace_id: crate::trace::derived_trace_id(site, seq, event_id),
        }
    }

    /// The same envelope recorded under `trace_id`.
    pub fn with_trace_id(mut self, trace_id: &str) -> Self {
        self.trace_id = trace_id.to_string();
        self
    }

    /// Decodes and validates the body. Trailing bytes are refused like in frames.
    pub fn decode(&self) -> Result<EventBody, EventDecodeError> {
        if self.schema != EVENT_SCHEMA {
            return Err(EventDecodeError::UnknownSchema(self.schema));
        }
        let (body, rest): (EventBody, _) = postcard::take_from_bytes(&self.body)
            .map_err(|e| EventDecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(EventDecodeError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        self.validate_body(&body)?;
        Ok(body)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventBody {
    Order(Order),
    Milestone(Milestone),
    /// The site's answer to a reclaim: it gave up `qty` of unused allowance of `pool`.
    AllowanceReturn(AllowanceReturn),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllowanceReturn {
    pub reclaim_id: u64,
    pub pool: Pool,
    pub qty: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    /// `confirmed` (every line), `pending` (no line) or `partial`.
    pub status: String,
    pub lines: Vec<OrderLine>,
    /// Master revision of the data the site priced and checked the order with.
    pub master_rev: u64,
    /// Whether the site was disconnected from central when it took the order.
    pub offline: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub qty: i64,
    pub unit_price: Money,
    pub currency: String,
    /// Whether the site promised this line, and if not, why.
    pub promise: LinePromise,
}

/// The site's promise for one order line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinePromise {
    /// Within the site's allowance (and the customer's credit allowance): confirmed.
    Confirmed,
    /// Beyond the site's ATP allowance, and no more could be had from central in time.
    PendingAllowance,
    /// Beyond the customer's credit allowance: pending credit review.
    PendingCredit,
    /// The customer is on credit hold: never confirmed.
    PendingHold,
}

impl LinePromise {
    pub fn is_confirmed(self) -> bool {
        self == LinePromise::Confirmed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LinePromise::Confirmed => "confirmed",
            LinePromise::PendingAllowance => "pending_allowance",
            LinePromise::PendingCredit => "pending_credit",
            LinePromise::PendingHold => "pending_hold",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MilestoneKind {
    Picked,
    Packed,
    Loaded,
    Departed,
    Delivered,
}

impl MilestoneKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MilestoneKind::Picked => "picked",
            MilestoneKind::Packed => "packed",
            MilestoneKind::Loaded => "loaded",
            MilestoneKind::Departed => "departed",
            MilestoneKind::Delivered => "delivered",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Milestone {
    pub shipment_id: String,
    pub milestone: MilestoneKind,
    pub scanner_id: String,
    /// When the scanner recorded it, as the scanner sent it (RFC 3339).
    pub at: String,
}

/// HTTP header carrying a client's idempotency key on `POST /v1/orders` (agent and central).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Checks an `Idempotency-Key` header value: 1..=`MAX_IDEMPOTENCY_KEY_LEN` printable ASCII
/// characters. Returns it as a string.
pub fn parse_idempotency_key(raw: &[u8]) -> Result<String, ValidationError> {
    let ok = (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&raw.len())
        && raw.iter().all(|b| (0x20..=0x7e).contains(b));
    if !ok {
        return Err(ValidationError::BadIdempotencyKey);
    }
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// Checks an identifier: 1..=`MAX_ID_LEN` characters from `[A-Za-z0-9._:-]`.
pub fn validate_id(field: &'static str, s: &str) -> Result<(), ValidationError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadId {
            field,
            len: s.len(),
            max: MAX_ID_LEN,
        })
    }
}

pub fn validate_text(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.len() > MAX_TEXT_LEN {
        return Err(ValidationError::TooLong {
            field,
            max: MAX_TEXT_LEN,
        });
    }
    Ok(())
}

/// Checks an ISO 4217-style currency code: three ASCII upper-case letters.
pub fn validate_currency(s: &str) -> Result<(), ValidationError> {
    if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            field: "currency",
            detail: format!("{s:?} is not a three-letter upper-case code"),
        })
    }
}

fn validate_site(site: &str) -> Result<(), ValidationError> {
    crate::identity::validate_site_id(site).map_err(|_| ValidationError::BadId {
        field: "site",
        len: site.len(),
        max: crate::identity::MAX_SITE_ID_LEN,
    })
}

/// Checks the key of a pool (a SKU or a customer id).
pub fn validate_pool(pool: &Pool) -> Result<(), ValidationError> {
    match pool {
        Pool::Atp { sku } => validate_id("sku", sku),
        Pool::Credit { customer } => validate_id("customer", customer),
    }
}

/// Allowance quantities: ATP units, or credit in money units (up to ~922 trillion).
fn validate_amount(field: &'static str, v: i64) -> Result<(), ValidationError> {
    if v < 0 {
        return Err(ValidationError::OutOfRange {
            field,
            detail: "must not be negative".into(),
        });
    }
    Ok(())
}

impl MasterChange {
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            MasterChange::Price(p) => {
                validate_id("sku", &p.sku)?;
                if let Some(c) = &p.customer {
                    validate_id("customer", c)?;
                }
                validate_currency(&p.currency)?;
                if p.unit_price.is_negative() {
                    return Err(ValidationError::OutOfRange {
                        field: "unit_price",
                        detail: "must not be negative".into(),
                    });
                }
                Ok(())
            }
            MasterChange::Atp(a) => {
                validate_id("sku", &a.sku)?;
                validate_site(&a.site)?;
                if !(0..=MAX_QTY).contains(&a.available) {
                    return Err(ValidationError::OutOfRange {
                        field: "available",
                        detail: format!("must be 0..={MAX_QTY}"),
                    });
                }
                Ok(())
            }
            MasterChange::Grant(g) => {
                validate_site(&g.site)?;
                validate_pool(&g.pool)?;
                validate_amount("qty", g.qty)
            }
            MasterChange::Reclaim(r) => {
                validate_site(&r.site)?;
                validate_pool(&r.pool)?;
                validate_amount("qty", r.qty)
            }
            MasterChange::OrderStatus(o) => {
                validate_site(&o.site)?;
                validate_id("order_id", &o.order_id)?;
                if let Some(r) = &o.reason {
                    validate_text("reason", r)?;
                }
                Ok(())
            }
            MasterChange::Customer(c) => {
                validate_id("id", &c.id)?;
                validate_text("name", &c.name)?;
                if c.credit_limit.is_negative() {
                    return Err(ValidationError::OutOfRange {
                        field: "credit_limit",
                        detail: "must not be negative".into(),
                    });
                }
                Ok(())
            }
        }
    }

    /// Whether this change is delivered to `site`: ATP, grants, reclaims and order statuses
    /// only to the site they are for.
    pub fn concerns(&self, site: &str) -> bool {
        match self {
            MasterChange::Atp(a) => a.site == site,
            MasterChange::Grant(g) => g.site == site,
            MasterChange::Reclaim(r) => r.site == site,
            MasterChange::OrderStatus(o) => o.site == site,
            MasterChange::Price(_) | MasterChange::Customer(_) => true,
        }
    }
}

impl EventEnvelope {
    /// Semantic checks central applies to every uploaded event before storing it.
    pub fn validate_body(&self, body: &EventBody) -> Result<(), ValidationError> {
        validate_id("event_id", &self.event_id)?;
        crate::trace::validate_trace_id(&self.trace_id)?;
        if self.seq == 0 {
            return Err(ValidationError::OutOfRange {
                field: "seq",
                detail: "sequence numbers start at 1".into(),
            });
        }
        match body {
            EventBody::Order(o) => {
                validate_id("order_id", &o.order_id)?;
                validate_id("customer_id", &o.customer_id)?;
                validate_id("status", &o.status)?;
                if o.lines.is_empty() || o.lines.len() > MAX_ORDER_LINES {
                    return Err(ValidationError::OutOfRange {
                        field: "lines",
                        detail: format!("an order has 1..={MAX_ORDER_LINES} lines"),
                    });
                }
                for l in &o.lines {
                    validate_id("sku", &l.sku)?;
                    validate_currency(&l.currency)?;
                    if !(1..=MAX_QTY).contains(&l.qty) {
                        return Err(ValidationError::OutOfRange {
                            field: "qty",
                            detail: format!("must be 1..={MAX_QTY}"),
                        });
                    }
                }
                Ok(())
            }
            EventBody::Milestone(m) => {
                validate_id("shipment_id", &m.shipment_id)?;
                validate_id("scanner_id", &m.scanner_id)?;
                validate_text("at", &m.at)
            }
            EventBody::AllowanceReturn(r) => {
                validate_pool(&r.pool)?;
                if !(0..=MAX_QTY).contains(&r.qty) {
                    return Err(ValidationError::OutOfRange {
                        field: "qty",
                        detail: format!("must be 0..={MAX_QTY}"),
                    });
                }
                Ok(())
            }
        }
    }
}
