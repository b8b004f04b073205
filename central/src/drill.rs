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

pub mod driver;

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

impl DrillRequest {
    /// Checks the request on its own (site names against the fleet are checked by the caller).
    pub fn validate(&self) -> Result<(), String> {
        match self.kind {
            DrillKind::Isolation => {
                if self.sites.is_empty() {
                    return Err("an isolation drill names the sites to cut off".into());
                }
            }
            DrillKind::CentralOutage | DrillKind::CentralRestore => {
                if !self.sites.is_empty() {
                    return Err(format!(
                        "a {} drill takes every connected site; leave `sites` empty",
                        self.kind.as_str()
                    ));
                }
            }
        }
        if self.sites.len() > MAX_DRILL_SITES {
            return Err(format!("at most {MAX_DRILL_SITES} sites per drill"));
        }
        for s in &self.sites {
            outpost_protocol::validate_id("site", s).map_err(|e| e.to_string())?;
        }
        let mut sorted = self.sites.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.sites.len() {
            return Err("a site is named twice".into());
        }
        match (self.kind, self.duration_secs) {
            (DrillKind::CentralRestore, Some(_)) => {
                return Err(
                    "a central_restore drill has no duration: its cut ends when the restored \
                     central starts"
                        .into(),
                );
            }
            (DrillKind::CentralRestore, None) => {}
            (_, None) => return Err("duration_secs is required".into()),
            (_, Some(d)) if d == 0 || d > MAX_CUT_SECS => {
                return Err(format!("duration_secs must be 1..={MAX_CUT_SECS}"));
            }
            _ => {}
        }
        if let Some(r) = self.recovery_timeout_secs
            && (r == 0 || r > MAX_RECOVERY_TIMEOUT_SECS)
        {
            return Err(format!(
                "recovery_timeout_secs must be 1..={MAX_RECOVERY_TIMEOUT_SECS}"
            ));
        }
        if let Some(n) = &self.note
            && n.chars().count() > MAX_NOTE_LEN
        {
            return Err(format!("note is longer than {MAX_NOTE_LEN} characters"));
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
        marks: &crate::store::DrillMarks,
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

/// A range of seqs with something wrong, in the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discrepancy {
    /// `missing` (acknowledged by the site, not held by central), `duplicated` (in the feed more
    /// than once), `lost` (central recorded that the site could no longer resend them),
    /// `not_caught_up` (still only at the site when the drill ended), `unverified` (the check
    /// hit its row bound).
    pub kind: String,
    pub from_seq: u64,
    pub through_seq: u64,
}

/// What the report's I/O side read back from central's records for one site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteFindings {
    pub held: crate::store::HeldSeqs,
    /// Ranges central recorded as lost (a restored central behind the site's retention).
    pub lost: Vec<(u64, u64)>,
    /// Units confirmed beyond what the ERP had available, summed over the site's ATP pools.
    pub oversold_units: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    pub site: String,
    pub cut_off_from: String,
    pub cut_off_until: Option<String>,
    pub accepted_while_cut_off: Accepted,
    /// The seqs those are: after central's mark at the start, through what the site had when
    /// it came back (`None` until it did).
    pub cut_off_seqs: Option<(u64, u64)>,
    pub refused_connections: u64,
    /// Most events held only at the site during one timeline bucket (at least 250 ms wide).
    pub peak_backlog: i64,
    pub peak_backlog_at: Option<String>,
    /// Age of the oldest event when central received it: the RPO a real outage would have had.
    pub oldest_event_age_ms: i64,
    pub reconnected: Option<String>,
    /// From the end of the cut to the site's first session.
    pub reconnect_ms: Option<i64>,
    pub caught_up: Option<String>,
    /// From reconnection to central holding everything the site had at reconnection.
    pub recovery_ms: Option<i64>,
    pub caught_up_through_seq: Option<u64>,
    pub events_received: u64,
    pub reuploaded: u64,
    pub duplicates_dropped: u64,
    pub exceptions: BTreeMap<String, u64>,
    pub dead_letters: u64,
    pub discrepancy_count: u64,
    pub discrepancies: Vec<Discrepancy>,
    pub oversold_units: i64,
    /// Backlog depth per timeline bucket, from the drill's start.
    pub backlog_timeline: Vec<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub drill_id: u64,
    pub kind: DrillKind,
    pub phase: Phase,
    /// Computed at the end of the drill (false: a live view while it runs, without the
    /// discrepancy check).
    pub r#final: bool,
    pub aborted: bool,
    pub started: String,
    pub cut_ended: Option<String>,
    pub ended: Option<String>,
    pub cut_ms: Option<i64>,
    pub timeline_start: String,
    /// Width of one point of each site's `backlog_timeline`.
    pub bucket_ms: i64,
    pub sites: Vec<SiteReport>,
    pub events_accepted_while_cut_off: u64,
    pub discrepancies: u64,
    pub oversold_units: i64,
    pub max_recovery_ms: Option<i64>,
    pub max_oldest_event_age_ms: i64,
    /// Every site caught up, no discrepancy, nothing oversold.
    pub passed: bool,
}

fn rfc(ms: i64) -> String {
    crate::timefmt::rfc3339_ms(ms)
}

/// Consecutive runs of `seqs` (sorted) as inclusive ranges.
fn runs(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some((_, to)) if *to + 1 == s => *to = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// The discrepancies of one site: every seq the site acknowledged after the drill's start
/// (through what it had at reconnection, or central's mark if higher) must be held by central
/// exactly once.
pub fn discrepancies(t: &SiteTrack, f: &SiteFindings) -> (u64, Vec<Discrepancy>) {
    let mut list = Vec::new();
    let mut count = 0u64;
    let through = t.target_seq.unwrap_or(0).max(t.hwm);
    let lost: Vec<(u64, u64)> = f.lost.clone();
    let is_lost = |s: u64| lost.iter().any(|(a, b)| (*a..=*b).contains(&s));
    let returns: std::collections::BTreeSet<u64> = t.return_seqs.iter().copied().collect();
    let first = t.hwm_at_start + 1;
    let held_through = t.hwm;
    let missing = (first..=held_through.min(through)).filter(|s| {
        !f.held.feed.contains_key(s)
            && !f.held.other.contains_key(s)
            && !returns.contains(s)
            && !is_lost(*s)
    });
    for (a, b) in runs(missing) {
        count += b - a + 1;
        list.push(Discrepancy {
            kind: "missing".into(),
            from_seq: a,
            through_seq: b,
        });
    }
    let dups = f
        .held
        .feed
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect::<Vec<_>>();
    for (a, b) in runs(dups) {
        count += b - a + 1;
        list.push(Discrepancy {
            kind: "duplicated".into(),
            from_seq: a,
            through_seq: b,
        });
    }
    for &(a, b) in &lost {
        count += b.saturating_sub(a) + 1;
        list.push(Discrepancy {
            kind: "lost".into(),
            from_seq: a,
            through_seq: b,
        });
    }
    if through > held_through {
        count += through - held_through;
        list.push(Discrepancy {
            kind: "not_caught_up".into(),
            from_seq: held_through + 1,
            through_seq: through,
        });
    }
    if f.held.truncated {
        count += 1;
        list.push(Discrepancy {
            kind: "unverified".into(),
            from_seq: first,
            through_seq: through,
        });
    }
    list.sort_by_key(|d| (d.from_seq, d.kind.clone()));
    list.truncate(MAX_DISCREPANCIES_LISTED);
    (count, list)
}

/// The report of `d` at `now_ms`: final when `findings` (read back from central's records) are
/// given, a live view otherwise.
pub fn report(d: &Drill, findings: Option<&BTreeMap<String, SiteFindings>>, now_ms: i64) -> Report {
    let end_ms = d.ended_ms.unwrap_or(now_ms);
    let points = (((end_ms - d.started_ms).max(0) / d.bucket_ms) as usize + 1).min(MAX_BUCKETS + 1);
    // Buckets per report point.
    let per = points.div_ceil(MAX_TIMELINE_POINTS);
    let mut sites = Vec::new();
    for (site, t) in &d.tracks {
        let mut timeline = Vec::with_capacity(points);
        let mut depth = 0i64;
        let (mut peak, mut peak_at) = (0i64, None);
        for i in 0..points {
            depth += t.backlog_delta.get(&i).copied().unwrap_or(0);
            timeline.push(depth);
            if depth > peak {
                peak = depth;
                peak_at = Some(d.started_ms + i as i64 * d.bucket_ms);
            }
        }
        // Thin out to at most MAX_TIMELINE_POINTS, keeping each window's maximum.
        if per > 1 {
            timeline = timeline
                .chunks(per)
                .map(|c| c.iter().copied().max().unwrap_or(0))
                .collect();
        }
        let f = findings.and_then(|m| m.get(site));
        let (discrepancy_count, discrepancies) = match f {
            Some(f) => discrepancies(t, f),
            None => (0, Vec::new()),
        };
        let cut_end = d.cut_ended_ms;
        sites.push(SiteReport {
            site: site.clone(),
            cut_off_from: rfc(d.started_ms),
            cut_off_until: cut_end.map(rfc),
            accepted_while_cut_off: t.accepted.clone(),
            cut_off_seqs: t.reconnect_seq.map(|r| (t.hwm_at_start + 1, r)),
            refused_connections: t.refused_connections,
            peak_backlog: peak,
            peak_backlog_at: peak_at.map(rfc),
            oldest_event_age_ms: t.max_event_age_ms,
            reconnected: t.reconnected_ms.map(rfc),
            reconnect_ms: t.reconnected_ms.zip(cut_end).map(|(r, c)| (r - c).max(0)),
            caught_up: t.caught_up_ms.map(rfc),
            recovery_ms: t
                .caught_up_ms
                .zip(t.reconnected_ms)
                .map(|(c, r)| (c - r).max(0)),
            caught_up_through_seq: t.caught_up_ms.and(t.target_seq),
            events_received: t.events_received,
            reuploaded: t.reuploaded,
            duplicates_dropped: t.duplicates_dropped,
            exceptions: f
                .map(|f| f.held.exception_classes.clone())
                .unwrap_or_default(),
            dead_letters: f.map_or(0, |f| f.held.dead_letters),
            discrepancy_count,
            discrepancies,
            oversold_units: f.map_or(0, |f| f.oversold_units),
            backlog_timeline: timeline,
        });
    }
    let discrepancies: u64 = sites.iter().map(|s| s.discrepancy_count).sum();
    let oversold_units: i64 = sites.iter().map(|s| s.oversold_units).sum();
    let all_caught_up = sites.iter().all(|s| s.caught_up.is_some());
    Report {
        drill_id: d.id,
        kind: d.kind,
        phase: d.phase,
        r#final: findings.is_some(),
        aborted: d.aborted_ms.is_some(),
        started: rfc(d.started_ms),
        cut_ended: d.cut_ended_ms.map(rfc),
        ended: d.ended_ms.map(rfc),
        cut_ms: d.cut_ended_ms.map(|e| e - d.started_ms),
        timeline_start: rfc(d.started_ms),
        bucket_ms: d.bucket_ms * per as i64,
        events_accepted_while_cut_off: sites.iter().map(|s| s.accepted_while_cut_off.total()).sum(),
        discrepancies,
        oversold_units,
        max_recovery_ms: sites.iter().filter_map(|s| s.recovery_ms).max(),
        max_oldest_event_age_ms: sites
            .iter()
            .map(|s| s.oldest_event_age_ms)
            .max()
            .unwrap_or(0),
        passed: findings.is_some() && all_caught_up && discrepancies == 0 && oversold_units == 0,
        sites,
    }
}

fn secs(ms: i64) -> String {
    if ms.abs() < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

fn opt_secs(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_string(), secs)
}

/// The report as text for people (the CLI prints it), lines of at most 100 columns.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let verdict = if !r.r#final {
        "IN PROGRESS (live figures; discrepancies are checked at the end)"
    } else if r.passed {
        "PASSED"
    } else {
        "FAILED"
    };
    let _ = writeln!(
        o,
        "Drill {}: {}{}",
        r.drill_id,
        r.kind.as_str(),
        if r.aborted { " (aborted)" } else { "" }
    );
    let _ = writeln!(o, "  result             {verdict}");
    let _ = writeln!(o, "  phase              {}", r.phase.as_str());
    let _ = writeln!(o, "  started            {}", r.started);
    let _ = writeln!(
        o,
        "  cut ended          {}{}",
        r.cut_ended.as_deref().unwrap_or("-"),
        r.cut_ms
            .map(|m| format!(" (cut off for {})", secs(m)))
            .unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "  ended              {}",
        r.ended.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        o,
        "  totals             {} events accepted while cut off, {} discrepancies, {} units oversold",
        r.events_accepted_while_cut_off, r.discrepancies, r.oversold_units
    );
    let _ = writeln!(
        o,
        "                     longest recovery {}, oldest event at risk {}",
        opt_secs(r.max_recovery_ms),
        secs(r.max_oldest_event_age_ms)
    );
    for s in &r.sites {
        let a = &s.accepted_while_cut_off;
        let _ = writeln!(o);
        let _ = writeln!(o, "{}", s.site);
        let _ = writeln!(
            o,
            "  accepted cut off   orders {} confirmed, {} pending; milestones {}; other {}",
            a.orders_confirmed, a.orders_pending, a.milestones, a.other
        );
        let _ = writeln!(
            o,
            "  peak backlog       {} events{}",
            s.peak_backlog,
            s.peak_backlog_at
                .as_deref()
                .map(|t| format!(" at {t}"))
                .unwrap_or_default(),
        );
        let _ = writeln!(
            o,
            "  oldest event       {} old when central received it (the RPO of a real outage)",
            secs(s.oldest_event_age_ms)
        );
        let _ = writeln!(
            o,
            "  reconnected        {} ({} after the cut ended)",
            s.reconnected.as_deref().unwrap_or("not yet"),
            opt_secs(s.reconnect_ms)
        );
        let _ = writeln!(
            o,
            "  recovery           {} from reconnection to caught up{}",
            opt_secs(s.recovery_ms),
            s.caught_up_through_seq
                .map(|q| format!(" (through seq {q})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            o,
            "  events             {} received, {} re-sent from the site's retention, {} duplicates dropped",
            s.events_received, s.reuploaded, s.duplicates_dropped
        );
        let exc = if s.exceptions.is_empty() {
            "none".to_string()
        } else {
            s.exceptions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            o,
            "  exceptions         {exc}; dead letters {}",
            s.dead_letters
        );
        let _ = writeln!(o, "  discrepancies      {}", s.discrepancy_count);
        for d in &s.discrepancies {
            let _ = writeln!(o, "    {} seq {}..={}", d.kind, d.from_seq, d.through_seq);
        }
        let _ = writeln!(o, "  oversold units     {}", s.oversold_units);
        let _ = writeln!(
            o,
            "  backlog            {}",
            sparkline(&s.backlog_timeline, 60)
        );
    }
    o
}

/// A one-line chart of `values` squeezed into at most `width` characters.
pub fn sparkline(values: &[i64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() {
        return String::new();
    }
    let per = values.len().div_ceil(width.max(1));
    let cols: Vec<i64> = values
        .chunks(per)
        .map(|c| c.iter().copied().max().unwrap_or(0))
        .collect();
    let max = cols.iter().copied().max().unwrap_or(0).max(1);
    cols.iter()
        .map(|v| BARS[((v.max(&0) * 7) / max) as usize])
        .collect()
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
            d.cut_until_ms.map_or_else(|| "it ends".into(), rfc)
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
    use crate::store::{DrillMarks, HeldSeqs};
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
        assert!(r.validate().unwrap_err().contains("duration_secs"));
        let mut r = ok.clone();
        r.sites = vec!["plant-1".into()];
        assert!(r.validate().is_err());
        let mut r = ok.clone();
        r.kind = DrillKind::Isolation;
        assert!(r.validate().unwrap_err().contains("names the sites"));
        r.sites = vec!["a".into(), "a".into()];
        assert!(r.validate().unwrap_err().contains("twice"));
        let mut r = ok.clone();
        r.kind = DrillKind::CentralRestore;
        assert!(r.validate().unwrap_err().contains("no duration"));
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
