//! The API's security boundary, as axum middleware: hashed bearer tokens with roles, a token
//! bucket per client, the declared body length, the request timeout's JSON answer, and the
//! counts of what was refused. Async shell; `TokenBucket` is pure (the time is passed in).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use outpost_protocol::secret::constant_time_eq;

use super::error::{ApiError, BodyLimit};
use crate::config::{ApiClient, Role};
use crate::counters::ApiCounters;

/// Most requests handled at once; more wait for a slot. Far above what a site's scanners and
/// screens need, low enough to bound the memory and writer-queue pressure one client can cause.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 512;
/// Longest a request may take before it is answered 408 `timeout`. A write that commits after
/// that is still durable; the client's retry with the same key gets the original response.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `POST` route that creates orders (role `order-entry`).
pub const ORDERS_ROUTE: &str = "/v1/orders";
/// `POST` route that records shipment milestones (role `scanner`).
pub const MILESTONES_ROUTE: &str = "/v1/shipments/{shipment_id}/milestones";
/// `GET` route of the Prometheus metrics (`metrics.rs`); any role may read it.
pub const METRICS_ROUTE: &str = "/metrics";

/// The role a route needs, by method and matched route. Reads are open to every role; each write
/// is listed with its role, and any write not listed needs `admin`, so a write route added later
/// is closed until someone decides who may use it. (A method a route does not have never gets
/// here: the router answers 405 for every valid token, as it does for unknown paths with 404.)
pub fn needed_role(method: &Method, route: &str) -> Role {
    match (method, route) {
        (&Method::GET | &Method::HEAD, _) => Role::Reader,
        (&Method::POST, ORDERS_ROUTE) => Role::OrderEntry,
        (&Method::POST, MILESTONES_ROUTE) => Role::Scanner,
        _ => Role::Admin,
    }
}

/// A token bucket: `burst` requests at once, refilled at `rate` per second. Pure: the time is
/// passed in.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst as f64,
            last: now,
        }
    }

    /// Takes one request's token at `now`, or says how long until one is available.
    pub fn take(&mut self, now: Instant, rate_per_sec: u64, burst: u64) -> Result<(), Duration> {
        let rate = rate_per_sec.max(1) as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst as f64);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// The configured clients and one token bucket for each: memory is bounded by the config, not by
/// what callers send.
pub struct Clients {
    clients: Vec<ApiClient>,
    buckets: Vec<Mutex<TokenBucket>>,
    burst: u64,
}

impl Clients {
    pub fn new(clients: Vec<ApiClient>, burst: u64) -> Clients {
        let now = Instant::now();
        let buckets = clients
            .iter()
            .map(|_| Mutex::new(TokenBucket::full(burst, now)))
            .collect();
        Clients {
            clients,
            buckets,
            burst,
        }
    }

    pub fn get(&self, index: usize) -> Option<&ApiClient> {
        self.clients.get(index)
    }

    /// The client whose token the request presents (`Authorization: Bearer <token>`). The token
    /// is hashed once and compared with every configured hash in constant time, so the time
    /// taken says nothing about which hash, or how much of one, matched.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<usize> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim();
        if token.is_empty() || token.len() > crate::config::MAX_TOKEN_LEN {
            return None;
        }
        let presented = crate::config::hash_token(token.as_bytes());
        let mut found = None;
        for (i, c) in self.clients.iter().enumerate() {
            // Hashes are unique (config validation), so at most one matches.
            if constant_time_eq(&c.sha256, &presented) {
                found = Some(i);
            }
        }
        found
    }

    /// Takes one request from client `index`'s bucket at `now`.
    pub fn take(&self, index: usize, now: Instant) -> Result<(), Duration> {
        let rate = self.clients[index].rate_per_sec;
        let mut bucket = self.buckets[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bucket.take(now, rate, self.burst)
    }
}

/// The security boundary: who may call (with roles and rate limits) and what was refused.
#[derive(Clone)]
pub struct Boundary {
    pub clients: Arc<Clients>,
    /// Shared with `serve`, shown under `api` in `GET /v1/health`.
    pub counters: Arc<ApiCounters>,
}

impl Boundary {
    pub fn new(clients: Clients) -> Boundary {
        Boundary {
            clients: Arc::new(clients),
            counters: Arc::new(ApiCounters::default()),
        }
    }

    /// Every token as an admin client named `token-N` (1-based), with the default rate limit:
    /// for in-process tests and tools that hold plain tokens.
    pub fn admin_tokens(tokens: &[&str]) -> Boundary {
        let clients = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ApiClient {
                name: format!("token-{}", i + 1),
                role: Role::Admin,
                sha256: crate::config::hash_token(t.as_bytes()),
                rate_per_sec: crate::config::DEFAULT_RATE_LIMIT_PER_SEC,
            })
            .collect();
        Boundary::new(Clients::new(
            clients,
            crate::config::DEFAULT_RATE_LIMIT_BURST,
        ))
    }
}

/// What the boundary's middleware needs.
#[derive(Clone)]
pub(crate) struct Gate {
    pub(crate) boundary: Boundary,
    pub(crate) max_body_bytes: usize,
}

/// The authenticated client of a request: its index in `Clients`.
#[derive(Clone, Copy)]
struct Caller(usize);

/// Counts every answered request, and the 4xx and 5xx answers among them.
pub(crate) async fn count_requests(
    State(counters): State<Arc<ApiCounters>>,
    req: Request,
    next: Next,
) -> Response {
    let resp = next.run(req).await;
    ApiCounters::bump(&counters.requests);
    if resp.status().is_client_error() || resp.status().is_server_error() {
        ApiCounters::bump(&counters.errors);
    }
    resp
}

/// The timeout layer answers with an empty 408; give it the JSON error shape.
pub(crate) async fn json_timeout(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status() == StatusCode::REQUEST_TIMEOUT {
        let mut resp = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took longer than {REQUEST_TIMEOUT:?}; retry with the same Idempotency-Key"),
        )
        .into_response();
        // The request's body may be partly unread: this connection is not reused.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    resp
}

/// Bearer authentication (401) and the client's rate limit (429), before anything else. Logs
/// name the client and its role, never the token or its hash.
pub(crate) async fn guard(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let mut resp = guard_inner(gate, req, next).await;
    // A request refused before its body was read (all of it) leaves the rest of the body on the
    // connection, and hyper closes such a connection after the response. Say so in the response,
    // or a client may send its next request on a connection that is about to close.
    let early = [
        StatusCode::UNAUTHORIZED,
        StatusCode::FORBIDDEN,
        StatusCode::PAYLOAD_TOO_LARGE,
        StatusCode::TOO_MANY_REQUESTS,
    ];
    if has_body && early.contains(&resp.status()) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn guard_inner(gate: Arc<Gate>, mut req: Request, next: Next) -> Response {
    let state = &gate.boundary;
    let Some(index) = state.clients.authenticate(req.headers()) else {
        ApiCounters::bump(&state.counters.unauthorized);
        tracing::debug!("refused: missing or invalid bearer token");
        return ApiError::unauthorized().into_response();
    };
    let client = state
        .clients
        .get(index)
        .expect("authenticate returns a valid index");
    let span = tracing::Span::current();
    span.record("client", client.name.as_str());
    span.record("role", client.role.as_str());
    if let Err(wait) = state.clients.take(index, Instant::now()) {
        ApiCounters::bump(&state.counters.rate_limited);
        let secs = (wait.as_secs_f64().ceil() as u64).max(1);
        tracing::debug!(client = %client.name, role = %client.role, retry_after_secs = secs, "rate limited");
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "client {:?} is over its limit of {} requests per second; retry after {secs} s",
                client.name, client.rate_per_sec
            ),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    req.extensions_mut().insert(Caller(index));
    req.extensions_mut().insert(BodyLimit(gate.max_body_bytes));
    next.run(req).await
}

/// On matched routes: the caller's role must allow the route (403 `forbidden` otherwise), and the
/// declared body length must be within the limit (413), both before any body byte is read.
pub(crate) async fn authorize(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    let state = &gate.boundary;
    let caller = req
        .extensions()
        .get::<Caller>()
        .and_then(|c| state.clients.get(c.0));
    let Some(client) = caller else {
        // `guard` runs first on every request; without it nobody gets in.
        return ApiError::unauthorized().into_response();
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path(), MatchedPath::as_str);
    let needed = needed_role(req.method(), route);
    if !client.role.allows(needed) {
        ApiCounters::bump(&state.counters.forbidden);
        tracing::info!(
            client = %client.name,
            role = %client.role,
            needed = %needed,
            method = %req.method(),
            route,
            "refused: the client's role does not allow this route"
        );
        let message = if needed == Role::Admin {
            format!(
                "{} {route} needs the admin role; client {:?} has the {} role",
                req.method(),
                client.name,
                client.role
            )
        } else {
            format!(
                "{} {route} needs the {needed} or admin role; client {:?} has the {} role",
                req.method(),
                client.name,
                client.role
            )
        };
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response();
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > gate.max_body_bytes as u64) {
        return ApiError::too_large(gate.max_body_bytes).into_response();
    }
    next.run(req).await
}
