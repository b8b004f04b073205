//! Disaster-recovery drills as central keeps them: one JSON record per drill (its plan, phase,
//! per-site tracking and, once completed, its report), and the marks a drill starts from (feed
//! cursor, last exception and dead-letter ids, each site's high-water mark). I/O side (redb).

use std::collections::BTreeMap;
use std::ops::Bound;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{
    DEAD_LETTERS, EVENTS, EXCEPTIONS, META_LAST_DEAD_LETTER, META_LAST_EXCEPTION, META_NEXT_CURSOR,
    ReadError, SITE_HWM, Store, StoreUnavailable, decode, records,
};
use crate::drill::{Drill, DrillMarks, HeldSeqs};

/// drill id -> JSON `Drill`. JSON rather than postcard: a drill record is written a few times
/// per drill, read by operators for years, and gains fields as drills do.
pub(super) const DRILLS: TableDefinition<u64, &[u8]> = TableDefinition::new("drills");

/// Drills kept: the oldest are deleted beyond this.
pub const MAX_DRILLS: u64 = 1_000;

/// Most rows one discrepancy scan reads per table.
pub const MAX_SCAN_ROWS: usize = 5_000_000;

fn encode_json(d: &Drill) -> Vec<u8> {
    serde_json::to_vec(d).expect("a drill serialises")
}

impl Store {
    /// Stores `drill` under its id (insert or replace), deleting the oldest beyond `MAX_DRILLS`.
    pub async fn put_drill(&self, drill: Drill) -> Result<(), StoreUnavailable> {
        self.run(move |txn, _| {
            let mut t = txn.open_table(DRILLS)?;
            t.insert(drill.id, encode_json(&drill).as_slice())?;
            while t.len()? > MAX_DRILLS {
                let first = t.first()?.map(|(k, _)| k.value());
                let Some(k) = first else { break };
                t.remove(k)?;
            }
            Ok(Ok(()))
        })
        .await
    }

    /// The id the next drill gets.
    pub fn next_drill_id(&self) -> Result<u64, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(DRILLS)?;
        Ok(t.last()?.map_or(0, |(k, _)| k.value()) + 1)
    }

    pub fn drill(&self, id: u64) -> Result<Option<Drill>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(DRILLS)?;
        t.get(id)?
            .map(|v| {
                serde_json::from_slice(v.value())
                    .map_err(|e| ReadError::Corrupt(format!("stored drill {id}: {e}")))
            })
            .transpose()
    }

    /// The newest drills first, at most `limit`.
    pub fn drills(&self, limit: usize) -> Result<Vec<Drill>, ReadError> {
        let txn = self.read()?;
        let t = txn.open_table(DRILLS)?;
        let mut out = Vec::new();
        for row in t.iter()?.rev().take(limit) {
            let (k, v) = row?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| ReadError::Corrupt(format!("stored drill {}: {e}", k.value())))?,
            );
        }
        Ok(out)
    }

    /// Where the feed, exceptions, dead letters and every site's mark stand now (one snapshot).
    pub fn drill_marks(&self) -> Result<DrillMarks, ReadError> {
        let txn = self.read()?;
        let meta = txn.open_table(super::META)?;
        let get = |k: &str| -> Result<u64, ReadError> {
            Ok(meta.get(k)?.map(|g| g.value()).unwrap_or(0))
        };
        // The next cursor is the one the next row gets: rows at or above it are new.
        let feed_cursor = get(META_NEXT_CURSOR)?.max(1) - 1;
        let last_exception = get(META_LAST_EXCEPTION)?;
        let last_dead_letter = get(META_LAST_DEAD_LETTER)?;
        let mut hwms = BTreeMap::new();
        for row in txn.open_table(SITE_HWM)?.iter()? {
            let (k, v) = row?;
            hwms.insert(k.value().to_string(), v.value());
        }
        Ok(DrillMarks {
            feed_cursor,
            last_exception,
            last_dead_letter,
            hwms,
        })
    }

    /// Reads back which of `site`'s events central holds among the rows added after `marks`
    /// (feed, exception queue, dead letters), in one snapshot.
    pub fn held_seqs(&self, site: &str, marks: &DrillMarks) -> Result<HeldSeqs, ReadError> {
        let txn = self.read()?;
        let mut out = HeldSeqs::default();
        let feed = txn.open_table(EVENTS)?;
        for (n, row) in feed
            .range::<u64>((Bound::Excluded(marks.feed_cursor), Bound::Unbounded))?
            .enumerate()
        {
            if n >= MAX_SCAN_ROWS {
                out.truncated = true;
                break;
            }
            let (_, v) = row?;
            let r: records::FeedRow = decode("feed row", v.value())?;
            if r.site == site && r.channel == records::Channel::Site {
                *out.feed.entry(r.event.seq).or_insert(0) += 1;
            }
        }
        let exc = txn.open_table(EXCEPTIONS)?;
        for (n, row) in exc
            .range::<u64>((Bound::Excluded(marks.last_exception), Bound::Unbounded))?
            .enumerate()
        {
            if n >= MAX_SCAN_ROWS {
                out.truncated = true;
                break;
            }
            let (_, v) = row?;
            let r: records::ExceptionRecord = decode("exception", v.value())?;
            if r.site == site {
                *out.other.entry(r.seq).or_insert(0) += 1;
                let class = r
                    .reasons
                    .first()
                    .map_or("unknown", |c| c.as_str())
                    .to_string();
                *out.exception_classes.entry(class).or_insert(0) += 1;
            }
        }
        let dead = txn.open_table(DEAD_LETTERS)?;
        for (n, row) in dead
            .range::<u64>((Bound::Excluded(marks.last_dead_letter), Bound::Unbounded))?
            .enumerate()
        {
            if n >= MAX_SCAN_ROWS {
                out.truncated = true;
                break;
            }
            let (_, v) = row?;
            let r: records::DeadLetter = decode("dead letter", v.value())?;
            if r.site == site {
                *out.other.entry(r.seq).or_insert(0) += 1;
                out.dead_letters += 1;
            }
        }
        Ok(out)
    }
}
