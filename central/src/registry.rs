//! In-memory registry of live sync sessions: which sites are connected now, when each was last
//! heard from, and the handle that lets a newer session supersede an older one. Pure in-process
//! state shared by the QUIC sessions and the HTTP API.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::oneshot;

/// A session's ticket: it is the live one for its site until superseded or unregistered.
#[derive(Debug)]
pub struct SessionTicket {
    pub id: u64,
    /// Fires (or closes) when a newer session of the same site has replaced this one.
    pub superseded: oneshot::Receiver<()>,
}

#[derive(Debug)]
struct Live {
    id: u64,
    supersede: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct Entry {
    live: Option<Live>,
    last_seen: Option<SystemTime>,
}

/// Connection state of one site, as reported by `GET /v1/sites`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteLiveness {
    pub connected: bool,
    pub last_seen: Option<SystemTime>,
}

#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<(u64, HashMap<String, Entry>)>,
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
        if let Some(old) = entry.live.replace(Live { id, supersede: tx }) {
            let _ = old.supersede.send(());
        }
        entry.last_seen = Some(SystemTime::now());
        SessionTicket { id, superseded: rx }
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
        g.1.entry(site.to_string()).or_default().last_seen = Some(SystemTime::now());
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
                    },
                )
            })
            .collect()
    }

    pub fn connected_count(&self) -> usize {
        self.lock().1.values().filter(|e| e.live.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_session_supersedes_the_old_one_and_the_old_end_does_not_disconnect_the_new() {
        let r = Registry::new();
        let mut a = r.register("plant-1");
        assert!(a.superseded.try_recv().is_err(), "not superseded yet");
        let mut b = r.register("plant-1");
        assert!(a.superseded.try_recv().is_ok(), "old session told");
        r.unregister("plant-1", a.id);
        assert_eq!(r.connected_count(), 1);
        assert!(r.snapshot()["plant-1"].connected);
        r.unregister("plant-1", b.id);
        assert!(b.superseded.try_recv().is_err());
        let snap = r.snapshot();
        assert!(!snap["plant-1"].connected);
        assert!(snap["plant-1"].last_seen.is_some());
    }
}
