//! The fleet health monitor's published results: each site's derived state and the queue of
//! alerts waiting for the webhook sender, with its counters. Plain in-process state shared by the
//! monitor (the only writer), the webhook sender and the API, kept in the registry; no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::health::{Reason, State};
use crate::store::Alert;

/// Alerts waiting for the webhook sender; past it the oldest is dropped (with a warning and
/// `webhook_dropped`): alerts stay in the store and `GET /v1/alerts` regardless.
pub const WEBHOOK_QUEUE: usize = 256;

/// A site's derived state, as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteHealth {
    pub state: State,
    pub reasons: Vec<Reason>,
    /// When the site entered this state (central's clock, ms); for a state first seen at
    /// central's start, that start.
    pub since_ms: i64,
}

/// The monitor's results and the webhook sender's queue and counters, shared with the API.
#[derive(Debug, Default)]
pub struct FleetHealth {
    states: Mutex<HashMap<String, SiteHealth>>,
    queue: Mutex<VecDeque<Alert>>,
    queued: Notify,
    /// Webhook deliveries that succeeded, that failed after every attempt, and alerts dropped
    /// from a full queue.
    pub webhook_sent: AtomicU64,
    pub webhook_failed: AtomicU64,
    pub webhook_dropped: AtomicU64,
}

impl FleetHealth {
    pub fn states(&self) -> HashMap<String, SiteHealth> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn state(&self, site: &str) -> Option<SiteHealth> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(site)
            .cloned()
    }

    /// Replaces the published states (the health monitor is their only writer).
    pub fn publish(&self, states: HashMap<String, SiteHealth>) {
        *self.states.lock().unwrap_or_else(|p| p.into_inner()) = states;
    }

    /// Queues `alert` for the webhook sender, dropping the oldest beyond `WEBHOOK_QUEUE`.
    pub fn enqueue(&self, alert: Alert) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= WEBHOOK_QUEUE
            && let Some(old) = q.pop_front()
        {
            self.webhook_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(alert.id = old.id, site.id = %old.site, "webhook queue full; dropping the oldest alert");
        }
        q.push_back(alert);
        drop(q);
        self.queued.notify_one();
    }

    /// Waits until an alert may have been queued (`dequeue` says whether one was).
    pub async fn queued(&self) {
        self.queued.notified().await
    }

    /// The oldest queued alert, if any.
    pub fn dequeue(&self) -> Option<Alert> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: u64) -> Alert {
        Alert {
            id,
            site: "plant-1".into(),
            from: "healthy".into(),
            to: "offline".into(),
            reasons: vec!["not_heard_from".into()],
            at_ms: 1_000,
            drill_id: None,
        }
    }

    /// Goal: a full webhook queue drops the oldest alert and counts it.
    #[test]
    fn a_full_queue_drops_the_oldest() {
        let fleet = FleetHealth::default();
        for id in 1..=WEBHOOK_QUEUE as u64 + 1 {
            fleet.enqueue(alert(id));
        }
        assert_eq!(fleet.webhook_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(fleet.dequeue().map(|a| a.id), Some(2));
    }
}
