//! The agent's local HTTP API (axum): reads from the store's cache and allowances, order and
//! milestone capture through the store writer (after an online allowance top-up when one would
//! help), JSON errors with stable codes. The security boundary is here too: hashed bearer tokens
//! with roles, a token bucket per client, and the accept loop (`serve`) that caps connections and
//! drops clients that trickle their headers. Async shell: handlers read redb directly
//! (microseconds) and await the writer for writes.
//!
//! Layout: `state` and `error` below everything; `boundary` (authentication, roles, rate and
//! body limits), `serve` (the accept loop) and `handlers` above them. The router that mounts the
//! handlers behind the boundary is `crate::router`, above this module: nothing here imports it.

pub mod boundary;
pub mod error;
pub mod handlers;
pub mod serve;
pub mod state;

pub use crate::counters::ApiCounters;
pub use boundary::{
    Boundary, Clients, MAX_IN_FLIGHT_REQUESTS, METRICS_ROUTE, MILESTONES_ROUTE, ORDERS_ROUTE,
    REQUEST_TIMEOUT, TokenBucket, needed_role,
};
pub use error::{ApiError, JsonBody};
pub use serve::{REFUSED_WARN_INTERVAL, ServeLimits, serve};
pub use state::ApiState;

pub use outpost_protocol::{IDEMPOTENCY_KEY_HEADER as IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_LEN};
