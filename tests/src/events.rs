//! Site events as an agent uploads them, for tests and benchmarks of central's stores.

use std::ops::RangeInclusive;

use outpost_protocol::{EventBody, EventEnvelope, Milestone, MilestoneKind};

/// A `picked` milestone of `site` at `seq`, with event id `{site}-e{seq}`.
pub fn milestone(site: &str, seq: u64) -> EventEnvelope {
    EventEnvelope::new(
        site,
        seq,
        &format!("{site}-e{seq}"),
        1_700_000_000_000 + seq as i64,
        &EventBody::Milestone(Milestone {
            shipment_id: format!("SH-{site}"),
            milestone: MilestoneKind::Picked,
            scanner_id: "scan-1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        }),
    )
}

/// Milestones of `site` for each seq of `seqs`, in order: one upload batch.
pub fn milestones(site: &str, seqs: RangeInclusive<u64>) -> Vec<EventEnvelope> {
    seqs.map(|s| milestone(site, s)).collect()
}
