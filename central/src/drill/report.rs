//! A drill's report: what the sites accepted while cut off, their backlog over time, how long
//! each took to catch up, and the discrepancies between what they acknowledged and what central
//! holds; as data (`Report`, served as JSON) and as text for people. Pure: the findings read back
//! from the store and the time are passed in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    Accepted, Drill, DrillKind, HeldSeqs, MAX_BUCKETS, MAX_DISCREPANCIES_LISTED,
    MAX_TIMELINE_POINTS, Phase, SiteTrack,
};

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
    pub held: HeldSeqs,
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
