//! Recording a shipment milestone inside a write group: shape checks, deduplication by event
//! id, and the record and outbox event it writes. Blocking I/O side (the writer's transaction).

use outpost_protocol::{EventBody, EventEnvelope, Milestone, validate_id, validate_text};

use redb::ReadableTable;

use super::error::{Fail, WriteError};
use super::schema::Tables;
use super::types::{MilestoneRecord, NewMilestone, Outcome};

/// Shape checks on a milestone. Event ids of the form `{site}-o{digits}` and `{site}-r{digits}`
/// are reserved: they are the ids of this site's orders and allowance returns, and event ids are
/// unique per site.
pub fn validate_new_milestone(site: &str, m: &NewMilestone) -> Result<(), WriteError> {
    let v = |e: outpost_protocol::ValidationError| WriteError::Validation(e.to_string());
    validate_id("event_id", &m.event_id).map_err(v)?;
    validate_id("shipment_id", &m.shipment_id).map_err(v)?;
    validate_id("scanner_id", &m.scanner_id).map_err(v)?;
    validate_text("at", &m.at).map_err(v)?;
    if humantime::parse_rfc3339_weak(&m.at).is_err() {
        return Err(WriteError::Validation(format!(
            "at: {:?} is not an RFC 3339 timestamp (e.g. 2026-11-26T10:00:00Z)",
            m.at.chars().take(40).collect::<String>()
        )));
    }
    if let Some(rest) = m
        .event_id
        .strip_prefix(site)
        .and_then(|r| r.strip_prefix("-o").or_else(|| r.strip_prefix("-r")))
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(WriteError::Validation(format!(
            "event_id: {:?} is reserved for this site's order and allowance-return ids",
            m.event_id
        )));
    }
    Ok(())
}

pub(super) fn record_milestone(
    t: &mut Tables<'_>,
    site: &str,
    req: &NewMilestone,
    at_ms: i64,
    trace_id: Option<&str>,
) -> Result<Outcome<MilestoneRecord>, Fail> {
    if let Some(g) = t.milestones.get(req.event_id.as_str())? {
        let rec: MilestoneRecord = postcard::from_bytes(g.value())?;
        if &rec.request != req {
            return Err(WriteError::EventIdReused(req.event_id.clone()).into());
        }
        return Ok(Outcome::Existing(rec));
    }
    validate_new_milestone(site, req)?;
    let seq = t.next_seq()?;
    let mut env = EventEnvelope::new(
        site,
        seq,
        &req.event_id,
        at_ms,
        &EventBody::Milestone(Milestone {
            shipment_id: req.shipment_id.clone(),
            milestone: req.milestone,
            scanner_id: req.scanner_id.clone(),
            at: req.at.clone(),
        }),
    );
    if let Some(id) = trace_id {
        env = env.with_trace_id(id);
    }
    tracing::debug!(
        trace_id = %env.trace_id,
        seq,
        event_id = %env.event_id,
        "milestone added to the outbox transaction"
    );
    let rec = MilestoneRecord {
        request: req.clone(),
        seq,
        trace_id: env.trace_id.clone(),
    };
    t.append_event(&env)?;
    t.milestones.insert(
        req.event_id.as_str(),
        postcard::to_allocvec(&rec)?.as_slice(),
    )?;
    Ok(Outcome::Created(rec))
}
