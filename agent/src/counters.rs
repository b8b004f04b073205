//! Counters of the local HTTP API's boundary (refusals, connections, requests), shared by the
//! API that bumps them, the health handler and heartbeat that show them, and `/metrics`. Pure
//! state (atomics), no I/O: a leaf module, so every layer above can read it.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

/// Counts of what the API boundary refused, shown under `api` in `GET /v1/health`.
#[derive(Debug, Default)]
pub struct ApiCounters {
    /// Requests without a valid bearer token (401).
    pub unauthorized: AtomicU64,
    /// Requests on a route the client's role may not use (403).
    pub forbidden: AtomicU64,
    /// Requests over the client's rate limit (429).
    pub rate_limited: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed because the request headers did not arrive in time (or an idle
    /// keep-alive connection timed out).
    pub header_timeouts: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// HTTP requests answered, and those answered 4xx or 5xx (reported in heartbeats).
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

impl ApiCounters {
    /// Adds one to `c`. Relaxed: each counter is read on its own, never to order other memory.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter as the JSON object shown under `api` in `GET /v1/health`.
    pub fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "unauthorized": get(&self.unauthorized),
            "forbidden": get(&self.forbidden),
            "rate_limited": get(&self.rate_limited),
            "connections_refused": get(&self.connections_refused),
            "header_timeouts": get(&self.header_timeouts),
            "connections_open": get(&self.connections_open),
            "requests": get(&self.requests),
            "errors": get(&self.errors),
        })
    }
}
