//! Fleet health derivation: a site's state (`healthy`, `degraded` with reasons, `offline` since
//! when, `drill`) from its latest heartbeat, its connection and the time. Pure: no sockets, no
//! storage, no clock (`now_ms` is passed in), so every boundary is tested without a fleet.

use outpost_protocol::Heartbeat;
use serde::{Deserialize, Serialize};

/// A site's health state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Healthy,
    Degraded,
    /// Nothing heard from the site for `offline_after`; `since_ms`: when it was last heard
    /// from (`None`: never since central's store began).
    Offline {
        since_ms: Option<i64>,
    },
    /// The site takes part in a disaster-recovery drill in progress: a planned exercise, not an
    /// incident. Set by the health monitor over what `derive` found, never derived here.
    Drill,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Degraded => "degraded",
            State::Offline { .. } => "offline",
            State::Drill => "drill",
        }
    }
}

/// Why a site is not healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Nothing heard for `offline_after` (the state is then `offline`).
    NotHeardFrom,
    /// The oldest unacknowledged event is older than `backlog_age`.
    BacklogTooOld,
    /// The outbox holds at least `outbox_events_max` events.
    OutboxNearLimit,
    /// Free space of the store's filesystem is below `disk_free_min_pct`.
    DiskNearlyFull,
    /// The site's clock is further than `clock_offset_max_ms` from central's.
    ClockOffsetTooLarge,
    /// The site has been behind central's master revision for longer than `master_lag_max`.
    MasterLagTooLarge,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::NotHeardFrom => "not_heard_from",
            Reason::BacklogTooOld => "backlog_too_old",
            Reason::OutboxNearLimit => "outbox_near_limit",
            Reason::DiskNearlyFull => "disk_nearly_full",
            Reason::ClockOffsetTooLarge => "clock_offset_too_large",
            Reason::MasterLagTooLarge => "master_lag_too_large",
        }
    }
}

/// When a signal makes a site degraded or offline (`[health]` in central's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub offline_after_ms: i64,
    pub backlog_age_ms: i64,
    pub disk_free_min_pct: u64,
    pub clock_offset_max_ms: i64,
    pub master_lag_max_ms: i64,
    pub outbox_events_max: u64,
}

/// One heartbeat as central received it, with what central derived on arrival.
#[derive(Clone, Debug, PartialEq)]
pub struct Beat {
    /// Central's clock when the heartbeat arrived (ms since the epoch).
    pub received_ms: i64,
    pub heartbeat: Heartbeat,
    /// The site's clock minus central's, estimated from this heartbeat.
    pub clock_offset_ms: i64,
    /// Central's master revision when the heartbeat arrived.
    pub central_rev: u64,
    /// Since when (central's clock) the site has been behind central's revision without
    /// interruption, as seen by heartbeats; `None` when it was caught up at this beat.
    pub behind_since_ms: Option<i64>,
}

impl Beat {
    /// Master revisions the site is behind central.
    pub fn master_lag_revs(&self) -> u64 {
        self.central_rev.saturating_sub(self.heartbeat.master_rev)
    }

    /// Age of the oldest unacknowledged event at `now_ms`: its age on the site's clock when
    /// the heartbeat was sent, plus the time since it arrived.
    pub fn backlog_age_ms(&self, now_ms: i64) -> Option<i64> {
        let oldest = self.heartbeat.oldest_unsynced_ms?;
        let at_send = self.heartbeat.agent_time_ms.saturating_sub(oldest).max(0);
        Some(at_send.saturating_add(now_ms.saturating_sub(self.received_ms).max(0)))
    }

    /// How long the site has been behind central's revision, at `now_ms`.
    pub fn master_lag_ms(&self, now_ms: i64) -> Option<i64> {
        self.behind_since_ms
            .map(|since| now_ms.saturating_sub(since).max(0))
    }

    /// Free space of the store's filesystem in percent, if the site could read it.
    pub fn disk_free_pct(&self) -> Option<f64> {
        let free = self.heartbeat.disk_free_bytes?;
        let total = self.heartbeat.disk_total_bytes.filter(|t| *t > 0)?;
        Some(free as f64 * 100.0 / total as f64)
    }
}

/// What the derivation looks at for one site.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// When central last heard anything from the site (any frame, or the session's start or
    /// end), central's clock; `None`: never.
    pub last_heard_ms: Option<i64>,
    /// The latest heartbeat, if any arrived since central started.
    pub latest: Option<&'a Beat>,
}

/// The site's state and, unless healthy, why. Reasons come sorted and without duplicates.
///
/// A site not heard from for `offline_after` is offline, connected or not: a killed agent's
/// connection stays open at central until the QUIC idle timeout, and a live session sends a
/// heartbeat every few seconds. Otherwise the latest heartbeat's signals are compared with the
/// thresholds; a site that is heard from but never sent a heartbeat is healthy (nothing says
/// otherwise).
pub fn derive(inputs: &Inputs<'_>, now_ms: i64, t: &Thresholds) -> (State, Vec<Reason>) {
    let silent = match inputs.last_heard_ms {
        Some(at) => now_ms.saturating_sub(at) >= t.offline_after_ms,
        None => true,
    };
    if silent {
        return (
            State::Offline {
                since_ms: inputs.last_heard_ms,
            },
            vec![Reason::NotHeardFrom],
        );
    }
    let mut reasons = Vec::new();
    if let Some(b) = inputs.latest {
        if b.backlog_age_ms(now_ms)
            .is_some_and(|age| age >= t.backlog_age_ms)
        {
            reasons.push(Reason::BacklogTooOld);
        }
        if b.heartbeat.outbox_events >= t.outbox_events_max {
            reasons.push(Reason::OutboxNearLimit);
        }
        if b.disk_free_pct()
            .is_some_and(|pct| pct < t.disk_free_min_pct as f64)
        {
            reasons.push(Reason::DiskNearlyFull);
        }
        if b.clock_offset_ms.unsigned_abs() > t.clock_offset_max_ms.unsigned_abs() {
            reasons.push(Reason::ClockOffsetTooLarge);
        }
        if b.master_lag_ms(now_ms)
            .is_some_and(|lag| lag >= t.master_lag_max_ms)
        {
            reasons.push(Reason::MasterLagTooLarge);
        }
    }
    reasons.sort();
    reasons.dedup();
    if reasons.is_empty() {
        (State::Healthy, reasons)
    } else {
        (State::Degraded, reasons)
    }
}

/// Since when the site has been behind central, given the previous beat's value.
pub fn behind_since(
    previous: Option<i64>,
    agent_rev: u64,
    central_rev: u64,
    now_ms: i64,
) -> Option<i64> {
    if agent_rev >= central_rev {
        None
    } else {
        Some(previous.unwrap_or(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn thresholds() -> Thresholds {
        Thresholds {
            offline_after_ms: 15_000,
            backlog_age_ms: 300_000,
            disk_free_min_pct: 10,
            clock_offset_max_ms: 60_000,
            master_lag_max_ms: 300_000,
            outbox_events_max: 100,
        }
    }

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            agent_time_ms: NOW,
            agent_version: "0.1.0".into(),
            uptime_secs: 10,
            process_cpu_pct: Some(1.0),
            process_rss_bytes: Some(10 << 20),
            host_cpu_pct: Some(5.0),
            host_mem_used_bytes: Some(1 << 30),
            host_mem_total_bytes: Some(4 << 30),
            disk_free_bytes: Some(50),
            disk_total_bytes: Some(100),
            store_file_bytes: Some(1 << 20),
            outbox_events: 0,
            outbox_bytes: 0,
            oldest_unsynced_ms: None,
            master_rev: 7,
            master_applied_ms: Some(NOW - 1_000),
            api_requests: 10,
            api_errors: 0,
        }
    }

    fn beat(hb: Heartbeat) -> Beat {
        Beat {
            received_ms: NOW,
            heartbeat: hb,
            clock_offset_ms: 0,
            central_rev: 7,
            behind_since_ms: None,
        }
    }

    fn at(b: &Beat, now: i64) -> (State, Vec<Reason>) {
        let inputs = Inputs {
            last_heard_ms: Some(b.received_ms),
            latest: Some(b),
        };
        derive(&inputs, now, &thresholds())
    }

    #[test]
    fn a_site_with_good_signals_is_healthy() {
        assert_eq!(at(&beat(heartbeat()), NOW), (State::Healthy, vec![]));
        let never_beat = Inputs {
            last_heard_ms: Some(NOW),
            latest: None,
        };
        assert_eq!(derive(&never_beat, NOW, &thresholds()).0, State::Healthy);
    }

    /// Goal: offline exactly when nothing was heard for `offline_after`, with the time it was
    /// last heard from; a site never heard from is offline since never.
    #[test]
    fn offline_after_the_silence_threshold() {
        let b = beat(heartbeat());
        assert_eq!(at(&b, NOW + 14_999).0, State::Healthy);
        assert_eq!(
            at(&b, NOW + 15_000),
            (
                State::Offline {
                    since_ms: Some(NOW)
                },
                vec![Reason::NotHeardFrom]
            )
        );
        let never = Inputs {
            last_heard_ms: None,
            latest: None,
        };
        assert_eq!(
            derive(&never, NOW, &thresholds()).0,
            State::Offline { since_ms: None }
        );
    }

    /// Goal: the backlog's age counts the site's clock up to the heartbeat plus central's time
    /// since, and flips at the threshold.
    #[test]
    fn backlog_age_at_the_boundary() {
        let mut hb = heartbeat();
        hb.oldest_unsynced_ms = Some(NOW - 290_000);
        hb.outbox_events = 3;
        let b = beat(hb);
        assert_eq!(b.backlog_age_ms(NOW + 5_000), Some(295_000));
        assert_eq!(at(&b, NOW + 9_999).0, State::Healthy);
        assert_eq!(
            at(&b, NOW + 10_000),
            (State::Degraded, vec![Reason::BacklogTooOld])
        );
    }

    #[test]
    fn outbox_limit_disk_and_clock_at_their_boundaries() {
        let mut hb = heartbeat();
        hb.outbox_events = 99;
        assert_eq!(at(&beat(hb.clone()), NOW).0, State::Healthy);
        hb.outbox_events = 100;
        assert_eq!(at(&beat(hb), NOW).1, vec![Reason::OutboxNearLimit]);

        let mut hb = heartbeat();
        hb.disk_free_bytes = Some(10);
        assert_eq!(
            at(&beat(hb.clone()), NOW).0,
            State::Healthy,
            "10% is not below 10%"
        );
        hb.disk_free_bytes = Some(9);
        assert_eq!(at(&beat(hb.clone()), NOW).1, vec![Reason::DiskNearlyFull]);
        hb.disk_total_bytes = None;
        assert_eq!(
            at(&beat(hb), NOW).0,
            State::Healthy,
            "unknown disk says nothing"
        );

        for (offset, healthy) in [
            (60_000, true),
            (-60_000, true),
            (60_001, false),
            (-60_001, false),
        ] {
            let mut b = beat(heartbeat());
            b.clock_offset_ms = offset;
            let (state, reasons) = at(&b, NOW);
            assert_eq!(state == State::Healthy, healthy, "{offset}");
            if !healthy {
                assert_eq!(reasons, vec![Reason::ClockOffsetTooLarge]);
            }
        }
    }

    /// Goal: master lag counts from the first heartbeat that found the site behind, and
    /// several reasons are reported together, sorted.
    #[test]
    fn master_lag_and_several_reasons() {
        assert_eq!(behind_since(None, 7, 7, NOW), None);
        assert_eq!(behind_since(None, 6, 7, NOW), Some(NOW));
        assert_eq!(behind_since(Some(NOW - 5), 6, 9, NOW), Some(NOW - 5));
        let mut hb = heartbeat();
        hb.master_rev = 5;
        hb.outbox_events = 500;
        let mut b = beat(hb);
        b.behind_since_ms = Some(NOW - 299_999);
        assert_eq!(b.master_lag_revs(), 2);
        assert_eq!(at(&b, NOW).1, vec![Reason::OutboxNearLimit]);
        assert_eq!(
            at(&b, NOW + 1),
            (
                State::Degraded,
                vec![Reason::OutboxNearLimit, Reason::MasterLagTooLarge]
            )
        );
    }

    #[test]
    fn states_and_reasons_serialise_as_stable_codes() {
        assert_eq!(
            serde_json::to_value(State::Offline { since_ms: Some(5) }).unwrap(),
            serde_json::json!({"state": "offline", "since_ms": 5})
        );
        assert_eq!(
            serde_json::to_value(Reason::OutboxNearLimit).unwrap(),
            serde_json::json!("outbox_near_limit")
        );
        for r in [
            Reason::NotHeardFrom,
            Reason::BacklogTooOld,
            Reason::DiskNearlyFull,
        ] {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::json!(r.as_str())
            );
        }
    }
}
