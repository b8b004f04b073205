//! Messages exchanged on the sync connection, and the site events and master-data records they
//! carry. Pure types with their semantic validation; encoding lives in `frame`.

use serde::{Deserialize, Serialize};

use crate::money::Money;

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
}

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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    pub central_version: String,
    /// Highest sequence number of this site committed at central (its high-water mark).
    pub acked_seq: u64,
    /// Central's current master revision.
    pub master_rev: u64,
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

/// One master-data upsert, owned by central and fed from the ERP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MasterChange {
    Price(PriceRecord),
    Atp(AtpRecord),
    Customer(CustomerRecord),
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
    pub body: EventBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventBody {
    Order(Order),
    Milestone(Milestone),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub status: String,
    pub lines: Vec<OrderLine>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub qty: i64,
    pub unit_price: Money,
    pub currency: String,
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

/// A field of a message or record that breaks a documented limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("{field} must be 1..={max} characters of [A-Za-z0-9._:-], got {len}")]
    BadId {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} is out of range: {detail}")]
    OutOfRange { field: &'static str, detail: String },
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
                crate::identity::validate_site_id(&a.site).map_err(|_| ValidationError::BadId {
                    field: "site",
                    len: a.site.len(),
                    max: crate::identity::MAX_SITE_ID_LEN,
                })?;
                if !(0..=MAX_QTY).contains(&a.available) {
                    return Err(ValidationError::OutOfRange {
                        field: "available",
                        detail: format!("must be 0..={MAX_QTY}"),
                    });
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

    /// Whether this change is delivered to `site`: ATP only to the site it is for.
    pub fn concerns(&self, site: &str) -> bool {
        match self {
            MasterChange::Atp(a) => a.site == site,
            _ => true,
        }
    }
}

impl EventEnvelope {
    /// Semantic checks central applies to every uploaded event before storing it.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_id("event_id", &self.event_id)?;
        if self.seq == 0 {
            return Err(ValidationError::OutOfRange {
                field: "seq",
                detail: "sequence numbers start at 1".into(),
            });
        }
        match &self.body {
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
        }
    }
}
