//! In-memory registry of live sync sessions: which sites are connected now, when each was last
//! heard from, each site's clock offset as estimated at its last Hello, and the handle that lets
//! a newer session supersede an older one or a revocation end it. Pure in-process state shared by
//! the QUIC sessions and the HTTP API.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use outpost_protocol::Heartbeat;
use tokio::sync::oneshot;

use crate::health::{self, Beat};

/// Heartbeats kept per site for `GET /v1/fleet/{site}`: ten minutes at the agent's default
/// interval, a few tens of kilobytes per site.
pub const HEARTBEAT_HISTORY: usize = 120;

/// Why a live session must end now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndSignal {
    /// A newer session of the same site replaced this one.
    Superseded,
    /// An operator revoked the site.
    Revoked,
    /// A disaster-recovery drill cut the site off.
    Drill,
}

/// A session's ticket: it is the live one for its site until superseded, revoked or
/// unregistered.
#[derive(Debug)]
pub struct SessionTicket {
    pub id: u64,
    /// Fires when the session must end (a newer session replaced it, or the site was revoked).
    /// Closed without a value never happens while the ticket is live.
    pub end: oneshot::Receiver<EndSignal>,
}

#[derive(Debug)]
struct Live {
    id: u64,
    end: oneshot::Sender<EndSignal>,
}

#[derive(Debug, Default)]
struct Entry {
    live: Option<Live>,
    last_seen: Option<SystemTime>,
    clock_offset_ms: Option<i64>,
    /// The newest heartbeats, oldest first, at most `HEARTBEAT_HISTORY` (fleet health).
    beats: VecDeque<Beat>,
    /// When the site itself was last heard from (a Hello or any frame); unlike `last_seen`,
    /// not moved by the end of a session, which a killed agent's idle timeout causes.
    last_heard: Option<SystemTime>,
    session: Option<SessionInfo>,
}

/// What the latest session of a site negotiated and presented (fleet view).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Sync protocol version (ALPN).
    pub protocol_version: u16,
    /// End of the validity of the certificate the site presented (ms since the epoch).
    pub cert_not_after_ms: Option<i64>,
}

/// Connection state of one site, as reported by `GET /v1/sites`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteLiveness {
    pub connected: bool,
    pub last_seen: Option<SystemTime>,
    /// The site's clock minus central's, estimated at its last Hello since central started.
    pub clock_offset_ms: Option<i64>,
}

/// Connections the QUIC accept loop refused before their handshake, by reason, since central
/// started (`quic::run` counts them; `GET /metrics` shows them).
#[derive(Debug, Default)]
pub struct AcceptRefusals {
    /// `quic.max_connections` were open.
    pub connections: AtomicU64,
    /// The source address had `quic.max_handshakes_per_ip` handshakes in flight.
    pub handshakes_per_ip: AtomicU64,
    /// Central's resident memory was above `quic.memory_limit_mib`.
    pub memory: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<(u64, HashMap<String, Entry>)>,
    /// Kept here, beside the sessions, because the registry is what the QUIC side and the HTTP
    /// API already share.
    refusals: AcceptRefusals,
    /// The health monitor's derived states and webhook queue, here for the same reason.
    fleet: crate::fleet_health::FleetHealth,
    /// The disaster-recovery drill in progress, for the same reason.
    drills: crate::drill::Drills,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<String, Entry>)> {
        // The critical sections below cannot panic half-way; a poisoned lock still holds
        // consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a new session the live one for `site`; the previous live session, if any, is told
    /// that it was superseded.
    pub fn register(&self, site: &str) -> SessionTicket {
        let mut g = self.lock();
        g.0 += 1;
        let id = g.0;
        let (tx, rx) = oneshot::channel();
        let entry = g.1.entry(site.to_string()).or_default();
        if let Some(old) = entry.live.replace(Live { id, end: tx }) {
            let _ = old.end.send(EndSignal::Superseded);
        }
        entry.last_seen = Some(SystemTime::now());
        entry.last_heard = entry.last_seen;
        SessionTicket { id, end: rx }
    }

    /// `site` was revoked: its live session, if any, is told to end and the site shows as
    /// disconnected at once. Returns whether a session was live.
    pub fn revoke(&self, site: &str) -> bool {
        let mut g = self.lock();
        let Some(entry) = g.1.get_mut(site) else {
            return false;
        };
        match entry.live.take() {
            Some(live) => {
                let _ = live.end.send(EndSignal::Revoked);
                entry.last_seen = Some(SystemTime::now());
                true
            }
            None => false,
        }
    }

    /// A drill cut `site` off: its live session, if any, is told to end. Returns whether a
    /// session was live.
    pub fn cut_off(&self, site: &str) -> bool {
        let mut g = self.lock();
        let Some(entry) = g.1.get_mut(site) else {
            return false;
        };
        match entry.live.take() {
            Some(live) => {
                let _ = live.end.send(EndSignal::Drill);
                entry.last_seen = Some(SystemTime::now());
                true
            }
            None => false,
        }
    }

    /// The clock offset estimated at `site`'s latest Hello, if any.
    pub fn clock_offset(&self, site: &str) -> Option<i64> {
        self.lock().1.get(site).and_then(|e| e.clock_offset_ms)
    }

    /// Records what `site`'s new session negotiated and presented.
    pub fn set_session_info(&self, site: &str, info: SessionInfo) {
        let mut g = self.lock();
        g.1.entry(site.to_string()).or_default().session = Some(info);
    }

    /// Records the clock offset estimated from `site`'s latest Hello.
    pub fn set_clock_offset(&self, site: &str, offset_ms: i64) {
        let mut g = self.lock();
        g.1.entry(site.to_string()).or_default().clock_offset_ms = Some(offset_ms);
    }

    /// The session `id` of `site` ended. A superseded session's end leaves the newer one alone.
    pub fn unregister(&self, site: &str, id: u64) {
        let mut g = self.lock();
        if let Some(entry) = g.1.get_mut(site) {
            if entry.live.as_ref().is_some_and(|l| l.id == id) {
                entry.live = None;
            }
            entry.last_seen = Some(SystemTime::now());
        }
    }

    /// Central heard from `site` just now.
    pub fn touch(&self, site: &str) {
        let mut g = self.lock();
        let entry = g.1.entry(site.to_string()).or_default();
        entry.last_seen = Some(SystemTime::now());
        entry.last_heard = entry.last_seen;
    }

    pub fn snapshot(&self) -> HashMap<String, SiteLiveness> {
        let g = self.lock();
        g.1.iter()
            .map(|(site, e)| {
                (
                    site.clone(),
                    SiteLiveness {
                        connected: e.live.is_some(),
                        last_seen: e.last_seen,
                        clock_offset_ms: e.clock_offset_ms,
                    },
                )
            })
            .collect()
    }

    pub fn drills(&self) -> &crate::drill::Drills {
        &self.drills
    }

    pub fn accept_refusals(&self) -> &AcceptRefusals {
        &self.refusals
    }

    pub fn connected_count(&self) -> usize {
        self.lock().1.values().filter(|e| e.live.is_some()).count()
    }
}

/// A site's live state and heartbeats, for fleet health.
#[derive(Clone, Debug)]
pub struct SiteSignals {
    pub liveness: SiteLiveness,
    /// When the site was last heard from itself (see `Entry::last_heard`).
    pub last_heard: Option<SystemTime>,
    /// Oldest first; the last one is the latest.
    pub beats: Vec<Beat>,
    /// The latest session's protocol version and certificate, since central started.
    pub session: Option<SessionInfo>,
}

impl Registry {
    pub fn fleet_health(&self) -> &crate::fleet_health::FleetHealth {
        &self.fleet
    }

    /// Records a heartbeat of `site` that arrived at `received_ms` (central's clock), with the
    /// clock offset estimated from it and central's revision then; the site counts as heard
    /// from. Returns the beat as recorded.
    pub fn record_heartbeat(
        &self,
        site: &str,
        heartbeat: Heartbeat,
        received_ms: i64,
        clock_offset_ms: i64,
        central_rev: u64,
    ) -> Beat {
        let mut g = self.lock();
        let entry = g.1.entry(site.to_string()).or_default();
        let previous = entry.beats.back().and_then(|b| b.behind_since_ms);
        let beat = Beat {
            received_ms,
            behind_since_ms: health::behind_since(
                previous,
                heartbeat.master_rev,
                central_rev,
                received_ms,
            ),
            heartbeat,
            clock_offset_ms,
            central_rev,
        };
        if entry.beats.len() >= HEARTBEAT_HISTORY {
            entry.beats.pop_front();
        }
        entry.beats.push_back(beat.clone());
        entry.clock_offset_ms = Some(clock_offset_ms);
        entry.last_seen = Some(SystemTime::now());
        entry.last_heard = entry.last_seen;
        beat
    }

    /// Every site the registry knows, with its liveness and its latest heartbeat only.
    /// Every site's liveness and its last two heartbeats (two, so that rates can be derived).
    pub fn latest_signals(&self) -> HashMap<String, SiteSignals> {
        self.signals(|_| true, 2)
    }

    /// One site's liveness and its heartbeat history.
    pub fn site_signals(&self, site: &str) -> Option<SiteSignals> {
        self.signals(|s| s == site, HEARTBEAT_HISTORY).remove(site)
    }

    fn signals(&self, keep: impl Fn(&str) -> bool, beats: usize) -> HashMap<String, SiteSignals> {
        let g = self.lock();
        g.1.iter()
            .filter(|(site, _)| keep(site))
            .map(|(site, e)| {
                let skip = e.beats.len().saturating_sub(beats);
                (
                    site.clone(),
                    SiteSignals {
                        liveness: SiteLiveness {
                            connected: e.live.is_some(),
                            last_seen: e.last_seen,
                            clock_offset_ms: e.clock_offset_ms,
                        },
                        last_heard: e.last_heard,
                        beats: e.beats.iter().skip(skip).cloned().collect(),
                        session: e.session,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_session_supersedes_the_old_one_and_the_old_end_does_not_disconnect_the_new() {
        let r = Registry::new();
        let mut a = r.register("plant-1");
        assert!(a.end.try_recv().is_err(), "not superseded yet");
        let mut b = r.register("plant-1");
        assert_eq!(
            a.end.try_recv(),
            Ok(EndSignal::Superseded),
            "old session told"
        );
        r.unregister("plant-1", a.id);
        assert_eq!(r.connected_count(), 1);
        assert!(r.snapshot()["plant-1"].connected);
        r.unregister("plant-1", b.id);
        assert!(b.end.try_recv().is_err());
        let snap = r.snapshot();
        assert!(!snap["plant-1"].connected);
        assert!(snap["plant-1"].last_seen.is_some());
    }

    #[test]
    fn revoking_ends_the_live_session_and_keeps_the_clock_offset() {
        let r = Registry::new();
        assert!(!r.revoke("plant-1"), "nothing live to end");
        let mut a = r.register("plant-1");
        r.set_clock_offset("plant-1", -7_200_000);
        assert!(r.revoke("plant-1"));
        assert_eq!(a.end.try_recv(), Ok(EndSignal::Revoked));
        let snap = r.snapshot();
        assert!(!snap["plant-1"].connected, "disconnected at once");
        assert_eq!(snap["plant-1"].clock_offset_ms, Some(-7_200_000));
        // The revoked session's own end does not disturb a later one.
        let b = r.register("plant-1");
        r.unregister("plant-1", a.id);
        assert!(r.snapshot()["plant-1"].connected);
        r.unregister("plant-1", b.id);
        assert!(!r.revoke("plant-1"));
        assert!(!r.snapshot().contains_key("plant-2"));
    }
}
