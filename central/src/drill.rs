//! Disaster-recovery drills on the real fleet: a planned cut (one site isolated, central's QUIC
//! listener gone, or central restored from a backup), then recovery, then a report computed from
//! what happened: events the sites accepted while cut off, the backlog and the age of its oldest
//! event, the time from reconnection to caught up, duplicates, exceptions, discrepancies between
//! what the sites acknowledged and what central holds, oversold units.
//!
//! The model (`Drill`, `SiteTrack`, `report`) is pure: times are passed in. `Drills` is the
//! in-process handle the QUIC sessions, the API, the health monitor and the drill driver share.

use std::collections::BTreeMap;
use std::sync::Mutex;

use outpost_protocol::{EventBody, EventEnvelope};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

mod report;

pub use report::{
    Discrepancy, Report, SiteFindings, SiteReport, discrepancies, render_text, report, sparkline,
};

/// Longest cut a drill may plan.
pub const MAX_CUT_SECS: u64 = 24 * 3600;
/// How long a drill waits, after the cut ends, for its sites to catch up before it reports the
/// ones that did not.
pub const DEFAULT_RECOVERY_TIMEOUT_SECS: u64 = 300;
pub const MAX_RECOVERY_TIMEOUT_SECS: u64 = 6 * 3600;
/// Most sites one drill cuts off by name.
pub const MAX_DRILL_SITES: usize = 1_000;
/// Most points of a site's backlog timeline in a report (finer tracking is thinned out to this,
/// keeping each window's maximum).
pub const MAX_TIMELINE_POINTS: usize = 600;
/// Most buckets a drill tracks per site: the backlog is counted at this resolution.
pub const MAX_BUCKETS: usize = 20_000;
/// Narrowest timeline bucket.
pub const MIN_BUCKET_MS: i64 = 250;
/// Discrepancies listed one by one per site (the count is always exact).
pub const MAX_DISCREPANCIES_LISTED: usize = 100;
/// Longest operator note on a drill.
pub const MAX_NOTE_LEN: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillKind {
    /// Central refuses the named sites' sync connections for the duration.
    Isolation,
    /// Central's QUIC listener goes away for the duration (every site is cut off).
    CentralOutage,
    /// Central takes a backup at the start; the operator then restores it onto an empty data
    /// directory and starts central on it. The cut ends when the restored central starts.
    CentralRestore,
}

impl DrillKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillKind::Isolation => "isolation",
            DrillKind::CentralOutage => "central_outage",
            DrillKind::CentralRestore => "central_restore",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The sites are cut off.
    CutOff,
    /// The cut is over; waiting for every site to reconnect and catch up.
    Recovering,
    /// Over; the report is final.
    Completed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::CutOff => "cut_off",
            Phase::Recovering => "recovering",
            Phase::Completed => "completed",
        }
    }
}

/// `POST /v1/drills`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillRequest {
    pub kind: DrillKind,
    /// Isolation: the sites to cut off (required). Other kinds: leave empty (every connected
    /// site takes part).
    #[serde(default)]
    pub sites: Vec<String>,
    /// How long the cut lasts (isolation and outage; required for them).
    #[serde(default)]
    pub duration_secs: Option<u64>,
    #[serde(default)]
    pub recovery_timeout_secs: Option<u64>,
    #[serde(default)]
    pub note: Option<String>,
}

/// Why a drill request is refused on its own (`DrillRequest::validate`); the text is the API's
/// 400 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidateDrillError {
    #[error("an isolation drill names the sites to cut off")]
    NoSites,
    #[error("a {} drill takes every connected site; leave `sites` empty", .0.as_str())]
    SitesGiven(DrillKind),
    #[error("at most {MAX_DRILL_SITES} sites per drill")]
    TooManySites,
    #[error("{0}")]
    SiteId(#[from] outpost_protocol::ValidationError),
    #[error("a site is named twice")]
    SiteTwice,
    #[error(
        "a central_restore drill has no duration: its cut ends when the restored central starts"
    )]
    RestoreDuration,
    #[error("duration_secs is required")]
    NoDuration,
    #[error("duration_secs must be 1..={MAX_CUT_SECS}")]
    Duration,
    #[error("recovery_timeout_secs must be 1..={MAX_RECOVERY_TIMEOUT_SECS}")]
    RecoveryTimeout,
    #[error("note is longer than {MAX_NOTE_LEN} characters")]
    NoteTooLong,
}

impl DrillRequest {
    /// Checks the request on its own (site names against the fleet are checked by the caller).
    pub fn validate(&self) -> Result<(), ValidateDrillError> {
        match self.kind {
            DrillKind::Isolation => {
                if self.sites.is_empty() {
                    return Err(ValidateDrillError::NoSites);
                }
            }
            DrillKind::CentralOutage | DrillKind::CentralRestore => {
                if !self.sites.is_empty() {
                    return Err(ValidateDrillError::SitesGiven(self.kind));
                }
            }
        }
        if self.sites.len() > MAX_DRILL_SITES {
            return Err(ValidateDrillError::TooManySites);
        }
        for s in &self.sites {
            outpost_protocol::validate_id("site", s)?;
        }
        let mut sorted = self.sites.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.sites.len() {
            return Err(ValidateDrillError::SiteTwice);
        }
        match (self.kind, self.duration_secs) {
            (DrillKind::CentralRestore, Some(_)) => {
                return Err(ValidateDrillError::RestoreDuration);
            }
            (DrillKind::CentralRestore, None) => {}
            (_, None) => return Err(ValidateDrillError::NoDuration),
            (_, Some(d)) if d == 0 || d > MAX_CUT_SECS => {
                return Err(ValidateDrillError::Duration);
            }
            _ => {}
        }
        if let Some(r) = self.recovery_timeout_secs
            && (r == 0 || r > MAX_RECOVERY_TIMEOUT_SECS)
        {
            return Err(ValidateDrillError::RecoveryTimeout);
        }
        if let Some(n) = &self.note
            && n.chars().count() > MAX_NOTE_LEN
        {
            return Err(ValidateDrillError::NoteTooLong);
        }
        Ok(())
    }
}

/// The backup a restore drill took at its start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillBackup {
    pub path: String,
    pub bytes: u64,
    pub taken_ms: i64,
}

/// Events the site accepted (stored and answered 2xx) while cut off, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub orders_confirmed: u64,
    pub orders_pending: u64,
    pub milestones: u64,
    pub other: u64,
}

impl Accepted {
    pub fn total(&self) -> u64 {
        self.orders_confirmed + self.orders_pending + self.milestones + self.other
    }
}

/// What central saw of one site during a drill.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteTrack {
    /// Central's durable mark for the site when the drill started.
    pub hwm_at_start: u64,
    /// Central's mark as last seen by the drill (moves with each ingest).
    pub hwm: u64,
    /// Sync connections refused because of the drill.
    pub refused_connections: u64,
    /// First session after the cut ended.
    pub reconnected_ms: Option<i64>,
    /// What the site had assigned when it reconnected (from its Hello): caught up once central
    /// holds everything through it.
    pub target_seq: Option<u64>,
    /// What central had acknowledged to the site before, from the Hello (a restored central
    /// takes the events after its own mark up to this again).
    pub hello_acked_seq: u64,
    pub caught_up_ms: Option<i64>,
    /// The site's last seq at its first session after the cut: the events after `hwm_at_start`
    /// up to it are the ones it accepted while cut off (by seq, not by clock).
    #[serde(default)]
    pub reconnect_seq: Option<u64>,
    pub accepted: Accepted,
    /// New events central stored during the drill.
    pub events_received: u64,
    /// Of those, the ones the site had already seen acknowledged (re-sent to a restored central).
    pub reuploaded: u64,
    pub duplicates_dropped: u64,
    /// Longest time an event spent only at the site (central's clock at receipt minus the
    /// event's time, corrected by the site's clock offset): the data at risk had this been a
    /// real outage.
    pub max_event_age_ms: i64,
    /// seqs of allowance returns (they go to the ledger, not the feed) for the discrepancy check.
    pub return_seqs: Vec<u64>,
    /// Backlog changes per timeline bucket: +1 in the bucket an event was stored in at the site,
    /// -1 in the one after central received it.
    pub backlog_delta: BTreeMap<usize, i64>,
}

/// Where central's records stood when a drill started (the store reads them; plain data here so
/// the store and the model share them without depending on each other's I/O).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrillMarks {
    /// Feed rows with a cursor above this arrived during the drill.
    pub feed_cursor: u64,
    pub last_exception: u64,
    pub last_dead_letter: u64,
    /// Each known site's durable high-water mark.
    pub hwms: BTreeMap<String, u64>,
}

/// What central holds of one site's events in a seq range, read back from the feed, the
/// exception queue and the dead letters (the drill report's discrepancy check).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldSeqs {
    /// seq -> how many feed rows carry it (more than one is a duplicate applied).
    pub feed: BTreeMap<u64, u32>,
    /// seqs in the exception queue or among the dead letters.
    pub other: BTreeMap<u64, u32>,
    /// Exception classes (primary reason) of the site's exceptions created after the mark.
    pub exception_classes: BTreeMap<String, u64>,
    pub dead_letters: u64,
    /// The scan stopped at its row bound before reaching the end.
    pub truncated: bool,
}

/// A disaster-recovery drill as central keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drill {
    pub id: u64,
    pub kind: DrillKind,
    pub sites: Vec<String>,
    #[serde(default)]
    pub note: Option<String>,
    pub phase: Phase,
    pub started_ms: i64,
    /// The planned end of the cut (isolation and outage).
    pub cut_until_ms: Option<i64>,
    pub cut_ended_ms: Option<i64>,
    pub recovery_timeout_ms: i64,
    pub ended_ms: Option<i64>,
    /// When an operator aborted it: the cut ended then.
    pub aborted_ms: Option<i64>,
    pub backup: Option<DrillBackup>,
    /// When the restored central started (restore drills).
    pub restored_ms: Option<i64>,
    /// Width of one timeline bucket.
    pub bucket_ms: i64,
    /// Marks at the start, for the discrepancy check.
    pub feed_cursor_at_start: u64,
    pub last_exception_at_start: u64,
    pub last_dead_letter_at_start: u64,
    pub tracks: BTreeMap<String, SiteTrack>,
    /// Set when the drill completed.
    pub report: Option<Report>,
}

impl Drill {
    /// A new drill from a validated request, starting at `now_ms` for `sites` whose marks are
    /// in `hwms`.
    pub fn new(
        id: u64,
        req: &DrillRequest,
        sites: Vec<String>,
        marks: &DrillMarks,
        now_ms: i64,
    ) -> Drill {
        let duration_ms = req.duration_secs.map(|s| s as i64 * 1000);
        let recovery_timeout_ms = req
            .recovery_timeout_secs
            .unwrap_or(DEFAULT_RECOVERY_TIMEOUT_SECS) as i64
            * 1000;
        // The timeline spans the cut and the recovery (a restore's cut is unknown in advance:
        // an hour is assumed for its width).
        let span = duration_ms.unwrap_or(3_600_000) + recovery_timeout_ms;
        let bucket_ms = (span / MAX_BUCKETS as i64).max(MIN_BUCKET_MS);
        let tracks = sites
            .iter()
            .map(|s| {
                let hwm = marks.hwms.get(s).copied().unwrap_or(0);
                (
                    s.clone(),
                    SiteTrack {
                        hwm_at_start: hwm,
                        hwm,
                        ..SiteTrack::default()
                    },
                )
            })
            .collect();
        Drill {
            id,
            kind: req.kind,
            sites,
            note: req.note.clone(),
            phase: Phase::CutOff,
            started_ms: now_ms,
            cut_until_ms: duration_ms.map(|d| now_ms + d),
            cut_ended_ms: None,
            recovery_timeout_ms,
            ended_ms: None,
            aborted_ms: None,
            backup: None,
            restored_ms: None,
            bucket_ms,
            feed_cursor_at_start: marks.feed_cursor,
            last_exception_at_start: marks.last_exception,
            last_dead_letter_at_start: marks.last_dead_letter,
            tracks,
            report: None,
        }
    }

    pub fn is_active(&self) -> bool {
        self.phase != Phase::Completed
    }

    /// Whether `site` is cut off by this drill right now (isolation: refused at Hello).
    pub fn isolates(&self, site: &str) -> bool {
        self.phase == Phase::CutOff
            && self.kind == DrillKind::Isolation
            && self.tracks.contains_key(site)
    }

    fn bucket(&self, at_ms: i64) -> usize {
        let i = (at_ms - self.started_ms).max(0) / self.bucket_ms;
        (i as usize).min(MAX_BUCKETS)
    }

    /// Ends the cut at `now_ms` (planned end, abort, or the restored central starting).
    pub fn end_cut(&mut self, now_ms: i64) {
        if self.phase == Phase::CutOff {
            self.phase = Phase::Recovering;
            self.cut_ended_ms = Some(now_ms);
        }
    }

    /// A session of `site` was admitted at `now_ms` with the Hello's marks; `hwm` is central's
    /// mark it resumes from.
    pub fn on_connect(
        &mut self,
        site: &str,
        hello_last_seq: u64,
        hello_acked_seq: u64,
        hwm: u64,
        now_ms: i64,
    ) {
        let recovering = self.phase == Phase::Recovering;
        let Some(t) = self.tracks.get_mut(site) else {
            return;
        };
        t.hwm = hwm;
        if !recovering {
            return;
        }
        if t.reconnected_ms.is_none() {
            t.reconnected_ms = Some(now_ms);
            t.hello_acked_seq = hello_acked_seq;
            t.reconnect_seq = Some(hello_last_seq);
        }
        // A site that drops and reconnects before it caught up is caught up once central holds
        // what it had at the latest of its reconnections.
        if t.caught_up_ms.is_none() {
            t.target_seq = Some(t.target_seq.unwrap_or(0).max(hello_last_seq));
            if hwm >= hello_last_seq {
                t.caught_up_ms = Some(now_ms);
            }
        }
    }

    /// `site`'s session was refused because of the drill.
    pub fn on_refused(&mut self, site: &str) {
        if let Some(t) = self.tracks.get_mut(site) {
            t.refused_connections += 1;
        }
    }

    /// Central committed `batch` from `site` at `now_ms`, moving its mark to `new_hwm`; the
    /// site's clock runs `clock_offset_ms` ahead of central's.
    pub fn on_ingest(
        &mut self,
        site: &str,
        batch: &[EventEnvelope],
        new_hwm: u64,
        clock_offset_ms: i64,
        now_ms: i64,
    ) {
        let recv_bucket = self.bucket(now_ms);
        let started = self.started_ms;
        let bucket_ms = self.bucket_ms;
        let Some(t) = self.tracks.get_mut(site) else {
            return;
        };
        let before = t.hwm;
        for e in batch {
            if e.seq <= before {
                t.duplicates_dropped += 1;
                continue;
            }
            t.events_received += 1;
            if e.seq <= t.hello_acked_seq {
                t.reuploaded += 1;
            }
            let at = e.at_ms.saturating_sub(clock_offset_ms);
            let age = now_ms.saturating_sub(at).max(0);
            t.max_event_age_ms = t.max_event_age_ms.max(age);
            let at_bucket = {
                let i = (at - started).max(0) / bucket_ms;
                (i as usize).min(MAX_BUCKETS)
            };
            // Held at the site in every bucket from the one it was stored in to the one central
            // received it in: an event that came and went within one bucket still counts.
            if at_bucket <= recv_bucket {
                *t.backlog_delta.entry(at_bucket).or_insert(0) += 1;
                *t.backlog_delta.entry(recv_bucket + 1).or_insert(0) -= 1;
            }
            // Accepted while cut off: held by the site when it came back, and not yet at central
            // when the drill started. By seq, so no clock decides it.
            let during_cut = e.seq > t.hwm_at_start && t.reconnect_seq.is_some_and(|r| e.seq <= r);
            match e.decode() {
                Ok(EventBody::Order(o)) => {
                    if during_cut {
                        if o.lines.iter().all(|l| l.promise.is_confirmed()) {
                            t.accepted.orders_confirmed += 1;
                        } else {
                            t.accepted.orders_pending += 1;
                        }
                    }
                }
                Ok(EventBody::Milestone(_)) => {
                    if during_cut {
                        t.accepted.milestones += 1;
                    }
                }
                Ok(EventBody::AllowanceReturn(_)) => {
                    if t.return_seqs.len() < 100_000 {
                        t.return_seqs.push(e.seq);
                    }
                    if during_cut {
                        t.accepted.other += 1;
                    }
                }
                Err(_) => {
                    if during_cut {
                        t.accepted.other += 1;
                    }
                }
            }
        }
        t.hwm = t.hwm.max(new_hwm);
        if t.caught_up_ms.is_none()
            && let Some(target) = t.target_seq
            && t.hwm >= target
        {
            t.caught_up_ms = Some(now_ms);
        }
    }

    /// Every site reconnected and caught up.
    pub fn all_caught_up(&self) -> bool {
        self.tracks.values().all(|t| t.caught_up_ms.is_some())
    }

    /// Whether the recovery is over at `now_ms`: every site caught up, or the timeout passed.
    pub fn recovery_over(&self, now_ms: i64) -> bool {
        match (self.phase, self.cut_ended_ms) {
            (Phase::Recovering, Some(ended)) => {
                self.all_caught_up() || now_ms >= ended + self.recovery_timeout_ms
            }
            _ => false,
        }
    }
}

/// The drill in progress, shared by the QUIC sessions, the API, the health monitor and the
/// driver. At most one drill runs at a time.
#[derive(Debug)]
pub struct Drills {
    active: Mutex<Option<Drill>>,
    /// True while an outage drill holds central's QUIC listener down.
    outage: watch::Sender<bool>,
    /// Bumped whenever the active drill changes phase (the driver and API wait on it).
    changed: watch::Sender<u64>,
}

impl Default for Drills {
    fn default() -> Self {
        Drills {
            active: Mutex::new(None),
            outage: watch::channel(false).0,
            changed: watch::channel(0).0,
        }
    }
}

impl Drills {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Drill>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the active drill.
    pub fn active(&self) -> Option<Drill> {
        self.lock().clone()
    }

    /// Installs `d` as the active drill (a new one, or one resumed after a restart) and applies
    /// its cut. Refused when another drill is active.
    pub fn install(&self, d: Drill) -> Result<(), u64> {
        let mut g = self.lock();
        if let Some(a) = g.as_ref()
            && a.id != d.id
        {
            return Err(a.id);
        }
        let outage = d.kind == DrillKind::CentralOutage && d.phase == Phase::CutOff;
        *g = Some(d);
        drop(g);
        self.outage.send_replace(outage);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Runs `f` on the active drill; returns its result, or `None` when no drill is active.
    pub fn with_active<R>(&self, f: impl FnOnce(&mut Drill) -> R) -> Option<R> {
        let mut g = self.lock();
        let r = g.as_mut().map(f);
        let outage = g
            .as_ref()
            .is_some_and(|d| d.kind == DrillKind::CentralOutage && d.phase == Phase::CutOff);
        drop(g);
        self.outage.send_if_modified(|o| {
            let was = *o;
            *o = outage;
            was != outage
        });
        r
    }

    /// The drill is over: it is no longer active.
    pub fn finish(&self, id: u64) {
        let mut g = self.lock();
        if g.as_ref().is_some_and(|d| d.id == id) {
            *g = None;
        }
        drop(g);
        self.outage.send_replace(false);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The id of the active drill `site` takes part in (the fleet view shows it as `drill`).
    pub fn site_drill(&self, site: &str) -> Option<u64> {
        self.lock()
            .as_ref()
            .filter(|d| d.tracks.contains_key(site))
            .map(|d| d.id)
    }

    /// Why `site`'s sync connection is refused now, if a drill cuts it off; counts the refusal.
    pub fn refusal(&self, site: &str) -> Option<String> {
        let mut g = self.lock();
        let d = g.as_mut()?;
        if !d.isolates(site) {
            return None;
        }
        d.on_refused(site);
        Some(format!(
            "cut off by disaster-recovery drill {} until {}",
            d.id,
            d.cut_until_ms
                .map_or_else(|| "it ends".into(), crate::timefmt::rfc3339_ms)
        ))
    }

    pub fn on_connect(
        &self,
        site: &str,
        hello_last_seq: u64,
        hello_acked_seq: u64,
        hwm: u64,
        now_ms: i64,
    ) {
        if let Some(d) = self.lock().as_mut() {
            d.on_connect(site, hello_last_seq, hello_acked_seq, hwm, now_ms);
        }
    }

    pub fn on_ingest(
        &self,
        site: &str,
        batch: &[EventEnvelope],
        new_hwm: u64,
        clock_offset_ms: i64,
        now_ms: i64,
    ) {
        let mut g = self.lock();
        if let Some(d) = g.as_mut()
            && d.tracks.contains_key(site)
        {
            d.on_ingest(site, batch, new_hwm, clock_offset_ms, now_ms);
        }
    }

    /// True while an outage drill holds the QUIC listener down.
    pub fn outage(&self) -> watch::Receiver<bool> {
        self.outage.subscribe()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::{Milestone, MilestoneKind};

    fn milestone(seq: u64, at_ms: i64) -> EventEnvelope {
        let body = EventBody::Milestone(Milestone {
            shipment_id: "S-1".into(),
            milestone: MilestoneKind::Picked,
            scanner_id: "scan-1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        });
        EventEnvelope::new("plant-1", seq, &format!("e-{seq}"), at_ms, &body)
    }

    fn isolation(now: i64) -> Drill {
        let req = DrillRequest {
            kind: DrillKind::Isolation,
            sites: vec!["plant-1".into()],
            duration_secs: Some(10),
            recovery_timeout_secs: Some(30),
            note: None,
        };
        req.validate().unwrap();
        let marks = DrillMarks {
            hwms: [("plant-1".to_string(), 4)].into(),
            ..DrillMarks::default()
        };
        Drill::new(1, &req, vec!["plant-1".into()], &marks, now)
    }

    /// Goal: requests are checked kind by kind.
    #[test]
    fn requests_are_validated() {
        let ok = DrillRequest {
            kind: DrillKind::CentralOutage,
            sites: vec![],
            duration_secs: Some(5),
            recovery_timeout_secs: None,
            note: None,
        };
        assert!(ok.validate().is_ok());
        let mut r = ok.clone();
        r.duration_secs = None;
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("duration_secs")
        );
        let mut r = ok.clone();
        r.sites = vec!["plant-1".into()];
        assert!(r.validate().is_err());
        let mut r = ok.clone();
        r.kind = DrillKind::Isolation;
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("names the sites")
        );
        r.sites = vec!["a".into(), "a".into()];
        assert!(r.validate().unwrap_err().to_string().contains("twice"));
        let mut r = ok.clone();
        r.kind = DrillKind::CentralRestore;
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("no duration")
        );
        r.duration_secs = None;
        assert!(r.validate().is_ok());
        let mut r = ok;
        r.duration_secs = Some(MAX_CUT_SECS + 1);
        assert!(r.validate().is_err());
    }

    /// Goal: the report is computed from what was tracked: events accepted while cut off, the
    /// backlog peak and timeline, reconnection and recovery times, the age of the oldest event.
    #[test]
    fn a_drill_reports_what_happened() {
        let t0 = 1_000_000;
        let mut d = isolation(t0);
        assert!(d.isolates("plant-1"));
        assert!(!d.isolates("plant-2"));
        // Five milestones stored at the site 1..5 s into the cut.
        let events: Vec<_> = (5..=9)
            .map(|s| milestone(s, t0 + (s as i64 - 4) * 1000))
            .collect();
        d.end_cut(t0 + 10_000);
        assert!(!d.isolates("plant-1"));
        d.on_connect("plant-1", 9, 4, 4, t0 + 10_500);
        assert!(!d.recovery_over(t0 + 10_600));
        d.on_ingest("plant-1", &events[..3], 7, 0, t0 + 10_700);
        assert!(d.tracks["plant-1"].caught_up_ms.is_none());
        // A re-sent batch overlapping the first: two duplicates.
        d.on_ingest("plant-1", &events[1..], 9, 0, t0 + 10_900);
        assert!(d.recovery_over(t0 + 10_901));
        d.phase = Phase::Completed;
        d.ended_ms = Some(t0 + 11_000);
        let held = HeldSeqs {
            feed: (5..=9).map(|s| (s, 1)).collect(),
            ..HeldSeqs::default()
        };
        let findings = BTreeMap::from([(
            "plant-1".to_string(),
            SiteFindings {
                held,
                ..SiteFindings::default()
            },
        )]);
        let r = report(&d, Some(&findings), t0 + 11_000);
        let s = &r.sites[0];
        assert_eq!(s.accepted_while_cut_off.milestones, 5);
        assert_eq!(s.duplicates_dropped, 2);
        assert_eq!(s.events_received, 5);
        assert_eq!(s.peak_backlog, 5);
        assert_eq!(s.reconnect_ms, Some(500));
        assert_eq!(s.recovery_ms, Some(400));
        assert_eq!(s.caught_up_through_seq, Some(9));
        // The first event was stored at t0+1s and received at t0+10.7s.
        assert_eq!(s.oldest_event_age_ms, 9_700);
        assert_eq!(s.discrepancy_count, 0);
        assert!(r.passed, "{r:?}");
        assert_eq!(*s.backlog_timeline.last().unwrap(), 0);
        let text = render_text(&r);
        assert!(text.contains("PASSED"), "{text}");
        assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
    }

    /// Goal: a seq the site acknowledged but central does not hold, one held twice, and a site
    /// that did not catch up are each reported, and the drill fails.
    #[test]
    fn discrepancies_are_listed_and_fail_the_drill() {
        let t0 = 1_000_000;
        let mut d = isolation(t0);
        d.end_cut(t0 + 10_000);
        d.on_connect("plant-1", 12, 4, 4, t0 + 10_100);
        let events: Vec<_> = (5..=10).map(|s| milestone(s, t0 + 2_000)).collect();
        d.on_ingest("plant-1", &events, 10, 0, t0 + 10_200);
        d.phase = Phase::Completed;
        d.ended_ms = Some(t0 + 40_000);
        let mut feed: BTreeMap<u64, u32> = [5u64, 6, 8, 9, 10].iter().map(|s| (*s, 1)).collect();
        feed.insert(9, 2);
        let findings = BTreeMap::from([(
            "plant-1".to_string(),
            SiteFindings {
                held: HeldSeqs {
                    feed,
                    ..HeldSeqs::default()
                },
                ..SiteFindings::default()
            },
        )]);
        let r = report(&d, Some(&findings), t0 + 40_000);
        let s = &r.sites[0];
        let kinds: Vec<_> = s
            .discrepancies
            .iter()
            .map(|x| (x.kind.as_str(), x.from_seq, x.through_seq))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("missing", 7, 7),
                ("duplicated", 9, 9),
                ("not_caught_up", 11, 12)
            ]
        );
        assert_eq!(s.discrepancy_count, 4);
        assert!(!r.passed);
        assert!(render_text(&r).contains("FAILED"));
    }

    /// Goal: one drill at a time; isolation refusals are counted; outage drills hold the
    /// listener signal only while cut off.
    #[test]
    fn the_handle_runs_one_drill_and_signals_outages() {
        let h = Drills::default();
        let d = isolation(0);
        h.install(d.clone()).unwrap();
        let mut other = d.clone();
        other.id = 2;
        assert_eq!(h.install(other), Err(1));
        assert!(h.refusal("plant-1").is_some());
        assert!(h.refusal("plant-2").is_none());
        assert_eq!(h.active().unwrap().tracks["plant-1"].refused_connections, 1);
        assert_eq!(h.site_drill("plant-1"), Some(1));
        h.finish(1);
        assert!(h.active().is_none());

        let req = DrillRequest {
            kind: DrillKind::CentralOutage,
            sites: vec![],
            duration_secs: Some(5),
            recovery_timeout_secs: None,
            note: None,
        };
        let d = Drill::new(3, &req, vec!["plant-1".into()], &DrillMarks::default(), 0);
        let outage = h.outage();
        h.install(d).unwrap();
        assert!(*outage.borrow());
        h.with_active(|d| d.end_cut(5_000));
        assert!(!*outage.borrow());
    }

    #[test]
    fn sparkline_scales_to_the_maximum() {
        assert_eq!(sparkline(&[0, 4, 8, 0], 10), "▁▄█▁");
        assert_eq!(sparkline(&[1; 100], 10).chars().count(), 10);
    }
}
