//! The agent's local HTTP API (axum): reads from the store's cache and allowances, order and
//! milestone capture through the store writer (after an online allowance top-up when one would
//! help), JSON errors with stable codes. The security boundary is here too: hashed bearer tokens
//! with roles, a token bucket per client, and the accept loop (`serve`) that caps connections and
//! drops clients that trickle their headers. Async shell: handlers read redb directly
//! (microseconds) and await the writer for writes.

use outpost_protocol::secret::constant_time_eq;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_protocol::{MilestoneKind, Pool};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{ApiClient, Role};
use crate::link::LinkState;
use crate::store::{
    MilestoneRecord, NewLine, NewMilestone, NewOrder, OrderRecord, ReadError, Store, WriteError,
    now_ms, rfc3339_millis,
};
use crate::topup::TopUp;

pub use outpost_protocol::{IDEMPOTENCY_KEY_HEADER as IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY_LEN};

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
/// Least time between two warnings about refused connections; the ones in between are counted.
pub const REFUSED_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not about one connection (out of file descriptors), so
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

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
struct Gate {
    boundary: Boundary,
    max_body_bytes: usize,
}

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
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn json(&self) -> serde_json::Value {
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

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub site: String,
    /// Whether the sync session with central is up and when central was last heard from (set by
    /// the sync task).
    pub link: Arc<LinkState>,
    /// Asks central for more allowance while an order waits; `None`: never ask.
    pub topup: Option<TopUp>,
    pub max_body_bytes: usize,
}

/// An error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_json", message)
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }

    fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Unavailable(_) => {
                tracing::error!(error = %e, "store read failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
            ReadError::Corrupt(_) => {
                tracing::error!(error = %e, "store read found a corrupt record");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
        let (status, code) = match &e {
            WriteError::Validation(_) => (unprocessable, "validation_failed"),
            WriteError::UnknownCustomer(_) => (unprocessable, "unknown_customer"),
            WriteError::UnknownSku(_) => (unprocessable, "unknown_sku"),
            WriteError::NoPrice { .. } => (unprocessable, "no_price"),
            WriteError::IdempotencyKeyReused => (unprocessable, "idempotency_key_reused"),
            WriteError::EventIdReused(_) => (unprocessable, "event_id_reused"),
            WriteError::OutboxFull(_) | WriteError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            WriteError::BadMasterBatch(_)
            | WriteError::AckBeyondLast { .. }
            | WriteError::RewindForward { .. }
            | WriteError::NotRetained { .. }
            | WriteError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "store write failed");
        }
        Self::new(status, code, e.to_string())
    }
}

/// A JSON body parsed with our error shape: over the limit → 413 `body_too_large`, anything
/// malformed (syntax, types, missing or unknown fields) → 400 `bad_json`. The content type is not
/// required: scanners and PLC gateways often omit it.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or_default();
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_json(rej.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_json(format!("invalid JSON body: {e}")))
    }
}

/// The configured body limit, passed to `JsonBody` for its error message.
#[derive(Clone, Copy)]
struct BodyLimit(usize);

/// The authenticated client of a request: its index in `Clients`.
#[derive(Clone, Copy)]
struct Caller(usize);

/// The router with every route, the boundary's layers (authentication, rate limit, roles,
/// declared length), the body limit, timeouts and JSON fallbacks. Only `boundary`'s clients may
/// call.
pub fn router_with(state: ApiState, boundary: Boundary) -> Router {
    let limit = state.max_body_bytes;
    // Behind one `Arc`: the middleware clones its state for every request.
    let gate = Arc::new(Gate {
        boundary: boundary.clone(),
        max_body_bytes: limit,
    });
    let counters = boundary.counters.clone();
    let metrics_counters = boundary.counters.clone();
    let started = std::time::SystemTime::now();
    Router::new()
        .route(
            "/v1/health",
            get(move |s: State<Arc<ApiState>>| health(s, counters.clone())),
        )
        // A read like the others: any valid token may scrape it.
        .route(
            METRICS_ROUTE,
            get(move |s: State<Arc<ApiState>>| {
                crate::metrics::handler(s, metrics_counters.clone(), started)
            }),
        )
        .route("/v1/atp/{sku}", get(atp))
        .route("/v1/allowances", get(allowances))
        .route("/v1/prices/{sku}", get(price))
        .route("/v1/customers/{id}", get(customer))
        .route(ORDERS_ROUTE, post(create_order))
        .route("/v1/orders/{order_id}", get(get_order))
        .route(MILESTONES_ROUTE, post(record_milestone))
        // Matched routes only (unknown paths keep their 404): the caller's role, then the
        // declared length, both before any body byte is read.
        .route_layer(middleware::from_fn_with_state(gate.clone(), authorize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        // Every request, routed or not: authentication, then the client's rate limit.
        .layer(middleware::from_fn_with_state(gate, guard))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        // One semaphore for the whole API (a per-route limit would multiply it), inside the
        // timeout: a request waiting for a slot gets the JSON 408 like a slow one.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            MAX_IN_FLIGHT_REQUESTS,
        ))
        .layer(middleware::from_fn(json_timeout))
        .layer(middleware::from_fn_with_state(
            boundary.counters.clone(),
            count_requests,
        ))
        // One span per request (method, path, and the client's name and role once known),
        // around everything else. The query string is left out: it is the caller's data. Reads
        // get it at debug level: they log nothing at info, and at tens of thousands of reads a
        // second formatting a span's fields is a good part of a read's cost.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &Request| {
                if req.method() == axum::http::Method::GET {
                    tracing::debug_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        client = tracing::field::Empty,
                        role = tracing::field::Empty,
                        trace_id = tracing::field::Empty,
                    )
                } else {
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        client = tracing::field::Empty,
                        role = tracing::field::Empty,
                        // Set by the handlers that record an event (orders, milestones).
                        trace_id = tracing::field::Empty,
                    )
                }
            }),
        )
        // Behind one `Arc`: axum clones the state for every request.
        .with_state(Arc::new(state))
}

/// Limits of the accept loop.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Longest a client may take to send a request's headers; hyper also applies it to an idle
    /// keep-alive connection waiting for its next request.
    pub header_read_timeout: Duration,
    /// Most connections served at once; past it a new connection is closed at once.
    pub max_connections: usize,
}

/// At most one log line per interval; counts the ones it held back.
struct LogEvery {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    fn new(interval: Duration) -> LogEvery {
        LogEvery {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last line)` when a line may be logged at `now`.
    fn tick(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Resolves once shutdown is asked for (`true`) or nobody can ask any more (sender dropped).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Errors of `accept` that concern only the connection being accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` turns true (or its sender is dropped),
/// then stops accepting, lets every connection finish its in-flight request (idle ones close at
/// once) and returns when all are closed. At most `limits.max_connections` connections are open
/// at once: past it a new connection is closed as soon as it is accepted, counted, and warned
/// about at most once per `REFUSED_WARN_INTERVAL`. A client that has not sent a request's headers
/// within `limits.header_read_timeout` is disconnected (slow-loris). Errors of one connection
/// never end the loop.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ServeLimits,
    counters: Arc<ApiCounters>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    let mut refused_log = LogEvery::new(REFUSED_WARN_INTERVAL);
    let mut accept_log = LogEvery::new(REFUSED_WARN_INTERVAL);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            // Reap finished connections so the set stays as small as the open connections.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if let Some(held) = accept_log.tick(Instant::now()) {
                    tracing::warn!(error = %e, similar_errors_not_logged = held, "accept failed");
                }
                tokio::select! {
                    _ = stopped(&mut shutdown) => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ApiCounters::bump(&counters.connections_refused);
            if let Some(held) = refused_log.tick(Instant::now()) {
                tracing::warn!(
                    %peer,
                    max_connections = limits.max_connections,
                    refused_not_logged = held,
                    "connection refused: too many open connections"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                app.clone().oneshot(req)
            });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let mut stop = shutdown.clone();
        let counters = counters.clone();
        let header_read_timeout = limits.header_read_timeout;
        let span = tracing::info_span!("connection", %peer);
        conns.spawn(tracing::Instrument::instrument(
            async move {
                counters.connections_open.fetch_add(1, Ordering::Relaxed);
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stopped(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                // The slot first: a count of 0 open means every slot is free again.
                drop(slot);
                counters.connections_open.fetch_sub(1, Ordering::Relaxed);
                match result {
                    Ok(()) => {}
                    Err(e) if e.is_timeout() => {
                        ApiCounters::bump(&counters.header_timeouts);
                        tracing::debug!(
                            "connection closed: no complete request headers within {header_read_timeout:?}"
                        );
                    }
                    Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
                }
            },
            span,
        ));
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Counts every answered request, and the 4xx and 5xx answers among them.
async fn count_requests(
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
async fn json_timeout(req: Request, next: Next) -> Response {
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

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept this method",
    )
}

/// Bearer authentication (401) and the client's rate limit (429), before anything else. Logs
/// name the client and its role, never the token or its hash.
async fn guard(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
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
async fn authorize(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
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

/// A path id; anything that is not a valid id cannot exist, so it is a 404 on reads.
fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = p.map_err(|e| ApiError::not_found(e.body_text()))?;
    Ok(id)
}

#[derive(Serialize)]
struct Health {
    site: String,
    connected: bool,
    outbox_depth: u64,
    master_rev: u64,
    last_seq: u64,
    acked_seq: u64,
    /// Incarnation of central's store named by the last Welcome (0: none yet).
    central_incarnation: u64,
    stale_secs: Option<u64>,
    /// What the API boundary refused (401, 403, 429, connections) since the agent started.
    api: serde_json::Value,
    /// Sync protocol version of the latest session with central (`None` before the first).
    protocol_version: Option<u16>,
    /// `trusted`, or `untrusted` with the reason: the agent does not connect to central (nor
    /// renew its certificate) while the wall clock is before a sane date.
    clock: serde_json::Value,
    /// The site certificate's expiry and its renewals over the sync connection.
    certificate: serde_json::Value,
}

async fn health(
    State(s): State<Arc<ApiState>>,
    counters: Arc<ApiCounters>,
) -> Result<axum::Json<Health>, ApiError> {
    let m = s.store.marks()?;
    Ok(axum::Json(Health {
        site: s.site.clone(),
        connected: s.link.is_connected(),
        outbox_depth: m.outbox_depth(),
        master_rev: m.master_rev,
        last_seq: m.last_seq,
        acked_seq: m.acked_seq,
        central_incarnation: m.central_incarnation,
        stale_secs: s.link.stale_secs(now_ms()),
        api: counters.json(),
        protocol_version: s.link.protocol_version(),
        clock: match s.link.clock_untrusted() {
            None => json!({ "trusted": true }),
            Some(reason) => json!({ "trusted": false, "reason": reason }),
        },
        certificate: {
            let c = s.link.certificate();
            json!({
                "not_after": c.not_after.map(|t| rfc3339_millis(t.saturating_mul(1000))),
                "expires_in_days": c.not_after.map(|t| (t - now_ms() / 1000).div_euclid(86_400)),
                "renewals": c.renewals,
                "renewed_at": c.renewed_at_ms.map(rfc3339_millis),
                "last_renewal_error": c.last_error,
            })
        },
    }))
}

async fn atp(
    State(s): State<Arc<ApiState>>,
    sku: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let sku = path_id(sku)?;
    let Some(v) = s.store.atp_view(&sku)? else {
        return Err(ApiError::not_found(format!("no ATP for SKU {sku:?}")));
    };
    // What the site can confirm on its own is its allowance, not the ERP's figure: the rest of
    // the ERP's ATP may be escrowed for other sites or sold by central.
    Ok(axum::Json(json!({
        "sku": sku,
        "available": v.allowance,
        "allowance": v.allowance,
        "erp_available": v.erp_available,
        "master_rev": v.master_rev,
        "as_of": v.as_of_ms.map(rfc3339_millis),
        "stale_secs": s.link.stale_secs(now_ms()),
    }))
    .into_response())
}

fn pool_json(pool: &Pool, remaining: i64) -> serde_json::Value {
    match pool {
        Pool::Atp { sku } => json!({
            "pool": pool.key(),
            "kind": "atp",
            "sku": sku,
            "remaining": remaining,
        }),
        // Credit is kept in money units; `amount` is the same figure as a decimal string.
        Pool::Credit { customer } => json!({
            "pool": pool.key(),
            "kind": "credit",
            "customer": customer,
            "remaining": remaining,
            "amount": outpost_protocol::Money(remaining),
        }),
    }
}

async fn allowances(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let (pools, truncated) = s.store.allowances()?;
    let m = s.store.marks()?;
    let list: Vec<_> = pools.iter().map(|(p, r)| pool_json(p, *r)).collect();
    Ok(axum::Json(json!({
        "master_rev": m.master_rev,
        "as_of": s.store.as_of_ms()?.map(rfc3339_millis),
        "stale_secs": s.link.stale_secs(now_ms()),
        "allowances": list,
        "truncated": truncated,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct PriceQuery {
    customer: Option<String>,
}

async fn price(
    State(s): State<Arc<ApiState>>,
    sku: Result<Path<String>, PathRejection>,
    q: Result<Query<PriceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let sku = path_id(sku)?;
    let Query(q) = q.map_err(|e| ApiError::validation(e.body_text()))?;
    let customer = q.customer.filter(|c| !c.is_empty());
    let Some(p) = s.store.price(&sku, customer.as_deref())? else {
        return Err(ApiError::not_found(format!("no price for SKU {sku:?}")));
    };
    Ok(axum::Json(json!({
        "sku": sku,
        "customer": customer,
        "unit_price": p.unit_price,
        "currency": p.currency,
    }))
    .into_response())
}

async fn customer(
    State(s): State<Arc<ApiState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id)?;
    let Some(c) = s.store.customer(&id)? else {
        return Err(ApiError::not_found(format!("no customer {id:?}")));
    };
    Ok(axum::Json(json!({
        "id": c.id,
        "name": c.name,
        "credit_limit": c.credit_limit,
        "on_hold": c.on_hold,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderRequest {
    customer_id: String,
    lines: Vec<LineRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest {
    sku: String,
    qty: i64,
}

#[derive(Serialize)]
struct LineResponse<'a> {
    sku: &'a str,
    qty: i64,
    unit_price: outpost_protocol::Money,
    currency: &'a str,
    promise: &'static str,
    reason: &'a str,
}

#[derive(Serialize)]
struct OrderResponse<'a> {
    order_id: &'a str,
    status: &'a str,
    customer_id: &'a str,
    lines: Vec<LineResponse<'a>>,
    seq: u64,
    created_at: String,
    offline: bool,
    master_rev: u64,
    erp_status: Option<&'static str>,
    erp_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    synced: Option<bool>,
    /// Where the order is in its life: `captured` (only here), `uploaded` (central has it
    /// durably), then the ERP's `accepted`, `rejected` or `needs_review`.
    #[serde(skip_serializing_if = "Option::is_none")]
    lifecycle: Option<&'static str>,
    /// W3C trace id the order was recorded under.
    trace_id: &'a str,
}

/// How an order is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OrderView {
    /// The answer to `POST /v1/orders`, first time or retried: the order as it was captured, so
    /// a retry gets exactly the original response (no ERP decision, no sync state).
    Captured,
    /// `GET /v1/orders/{id}`: the order now, with the ERP's decision and whether central has it.
    Current { synced: bool },
}

fn order_json(r: &OrderRecord, view: OrderView) -> serde_json::Value {
    let lines = r
        .order
        .lines
        .iter()
        .enumerate()
        .map(|(i, l)| LineResponse {
            sku: &l.sku,
            qty: l.qty,
            unit_price: l.unit_price,
            currency: &l.currency,
            promise: l.promise.as_str(),
            reason: r.reasons.get(i).map_or("", String::as_str),
        })
        .collect();
    let (erp_status, erp_reason, synced) = match view {
        OrderView::Captured => (None, None, None),
        OrderView::Current { synced } => (
            r.erp_status.map(|s| s.as_str()),
            r.erp_reason.as_deref(),
            Some(synced),
        ),
    };
    serde_json::to_value(OrderResponse {
        order_id: &r.order.order_id,
        status: &r.order.status,
        customer_id: &r.order.customer_id,
        lines,
        seq: r.seq,
        created_at: r.created_at(),
        offline: r.order.offline,
        master_rev: r.order.master_rev,
        erp_status,
        erp_reason,
        synced,
        lifecycle: synced.map(|up| match (erp_status, up) {
            (Some(decided), _) => decided,
            (None, true) => "uploaded",
            (None, false) => "captured",
        }),
        trace_id: &r.trace_id,
    })
    .unwrap_or_default()
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "POST /v1/orders requires an Idempotency-Key header",
        ));
    };
    outpost_protocol::parse_idempotency_key(v.as_bytes())
        .map_err(|e| ApiError::validation(e.to_string()))
}

/// The trace a request's event is recorded under: the client's `traceparent` when it is valid,
/// else a fresh random id (W3C: an invalid header restarts the trace, it is not an error). The
/// request's span gets it, so every line logged about the request carries it.
fn request_trace_id(headers: &HeaderMap) -> String {
    let id = headers
        .get(outpost_protocol::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(outpost_protocol::parse_traceparent)
        .unwrap_or_else(|| outpost_protocol::trace_id_from_bytes(rand::random()));
    tracing::Span::current().record("trace_id", id.as_str());
    id
}

/// Adds the `traceresponse` header naming the trace the event was recorded under (on a retry,
/// the original request's) and records it on the request's span.
fn with_trace(mut resp: Response, trace_id: &str) -> Response {
    tracing::Span::current().record("trace_id", trace_id);
    let value = outpost_protocol::traceparent(trace_id, rand::random());
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut()
            .insert(outpost_protocol::TRACERESPONSE_HEADER, v);
    }
    resp
}

async fn create_order(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: JsonBody<OrderRequest>,
) -> Result<Response, ApiError> {
    let trace_id = request_trace_id(&headers);
    let key = idempotency_key(&headers)?;
    let JsonBody(req) = body;
    let order = NewOrder {
        customer_id: req.customer_id,
        lines: req
            .lines
            .into_iter()
            .map(|l| NewLine {
                sku: l.sku,
                qty: l.qty,
            })
            .collect(),
    };
    top_up_for(&s, &key, &order).await;
    // Whether the site could reach central when it took the order, for central's reconciliation.
    let offline = !s.link.is_connected();
    let outcome = s
        .store
        .create_order_traced(&key, order, now_ms(), offline, Some(trace_id))
        .await?;
    let created = outcome.is_created();
    let rec = outcome.into_inner();
    if created {
        tracing::info!(
            order.id = %rec.order.order_id,
            seq = rec.seq,
            status = %rec.order.status,
            offline,
            "order captured"
        );
    }
    // A retry gets the original response, status and trace id included.
    let resp = (
        StatusCode::CREATED,
        axum::Json(order_json(&rec, OrderView::Captured)),
    )
        .into_response();
    Ok(with_trace(resp, &rec.trace_id))
}

/// While central is reachable, asks it for whatever allowance the order lacks, within the
/// configured deadline. Best effort: any failure just leaves lines pending. The writer re-checks
/// everything in the order's transaction, so a race with other orders cannot oversell. A retry
/// of a stored order asks for nothing: its answer is already decided.
async fn top_up_for(s: &ApiState, key: &str, order: &NewOrder) {
    let Some(topup) = &s.topup else { return };
    if !s.link.is_connected() || crate::store::validate_new_order(order).is_err() {
        return;
    }
    match s.store.has_order_key(key) {
        Ok(false) => {}
        Ok(true) => return,
        Err(e) => {
            tracing::debug!(error = %e, "no top-up: cannot read the store");
            return;
        }
    }
    let needs = match s.store.shortfalls(order) {
        Ok(n) if !n.is_empty() => n,
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(error = %e, "no top-up: cannot read the store");
            return;
        }
    };
    let started = std::time::Instant::now();
    let out = topup.request(needs).await;
    tracing::debug!(
        asked = out.asked,
        granted = out.granted,
        timed_out = out.timed_out,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "allowance top-up"
    );
}

async fn get_order(
    State(s): State<Arc<ApiState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id)?;
    let Some((rec, synced)) = s.store.order(&id)? else {
        return Err(ApiError::not_found(format!("no order {id:?}")));
    };
    Ok(axum::Json(order_json(&rec, OrderView::Current { synced })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MilestoneRequest {
    event_id: String,
    milestone: MilestoneKind,
    scanner_id: String,
    at: String,
}

fn milestone_json(r: &MilestoneRecord) -> serde_json::Value {
    json!({
        "event_id": r.request.event_id,
        "shipment_id": r.request.shipment_id,
        "milestone": r.request.milestone,
        "scanner_id": r.request.scanner_id,
        "at": r.request.at,
        "seq": r.seq,
        "trace_id": r.trace_id,
    })
}

async fn record_milestone(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    shipment_id: Result<Path<String>, PathRejection>,
    body: JsonBody<MilestoneRequest>,
) -> Result<Response, ApiError> {
    let trace_id = request_trace_id(&headers);
    let Path(shipment_id) = shipment_id.map_err(|e| ApiError::validation(e.body_text()))?;
    let JsonBody(req) = body;
    let m = NewMilestone {
        event_id: req.event_id,
        shipment_id,
        milestone: req.milestone,
        scanner_id: req.scanner_id,
        at: req.at,
    };
    let outcome = s
        .store
        .record_milestone_traced(m, now_ms(), Some(trace_id))
        .await?;
    let created = outcome.is_created();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let rec = outcome.into_inner();
    if created {
        tracing::info!(
            event.id = %rec.request.event_id,
            seq = rec.seq,
            milestone = ?rec.request.milestone,
            "milestone captured"
        );
    }
    let resp = (status, axum::Json(milestone_json(&rec))).into_response();
    Ok(with_trace(resp, &rec.trace_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreWriter;
    use crate::testutil::{catalogue, grants};
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use outpost_protocol::{
        CustomerRecord, ErpStatus, MasterBatch, MasterChange, Money, OrderStatusUpdate,
    };
    use serde_json::Value;
    use tower::ServiceExt;

    /// The admin client's token: the fixture's requests use it unless a test says otherwise.
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    const READER: &str = "reader-token-0123456789";
    const SCANNER: &str = "scanner-token-0123456789";
    const ORDERS: &str = "orders-token-0123456789";

    /// One client per role, named after its role, each with `rate` requests per second.
    fn clients(rate: u64) -> Vec<ApiClient> {
        [
            (TOKEN, Role::Admin),
            (READER, Role::Reader),
            (SCANNER, Role::Scanner),
            (ORDERS, Role::OrderEntry),
        ]
        .into_iter()
        .map(|(token, role)| ApiClient {
            name: role.as_str().to_string(),
            role,
            sha256: crate::config::hash_token(token.as_bytes()),
            rate_per_sec: rate,
        })
        .collect()
    }

    struct Fixture {
        app: Router,
        store: Store,
        writer: Option<StoreWriter>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        async fn new() -> Fixture {
            Fixture::with_rate(1_000, 2_000).await
        }

        async fn with_rate(rate: u64, burst: u64) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let (store, writer) = Store::open(&dir.path().join("agent.redb"), "plant-1").unwrap();
            store.apply_master(catalogue(0, 5)).await.unwrap();
            // 10 gears and 100.00 of ACME's credit for this site.
            let allowance = [
                (Pool::atp("GEAR-12T"), 10),
                (Pool::credit("ACME"), 1_000_000),
            ];
            store.apply_master(grants(5, 6, &allowance)).await.unwrap();
            let state = ApiState {
                store: store.clone(),
                site: "plant-1".into(),
                link: Arc::new(LinkState::default()),
                topup: None,
                max_body_bytes: 65536,
            };
            let app = router_with(state, Boundary::new(Clients::new(clients(rate), burst)));
            Fixture {
                app,
                store,
                writer: Some(writer),
                _dir: dir,
            }
        }

        async fn send(&self, req: HttpRequest<Body>) -> (u16, Value) {
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let v = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&bytes)));
            (status, v)
        }

        async fn get(&self, path: &str) -> (u16, Value) {
            self.get_as(TOKEN, path).await
        }

        async fn get_as(&self, token: &str, path: &str) -> (u16, Value) {
            self.send(
                HttpRequest::get(path)
                    .header("authorization", format!("Bearer {token}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
        }

        async fn post(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
            self.post_as(TOKEN, path, body, key).await
        }

        async fn post_as(
            &self,
            token: &str,
            path: &str,
            body: &str,
            key: Option<&str>,
        ) -> (u16, Value) {
            let mut b = HttpRequest::post(path)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json");
            if let Some(k) = key {
                b = b.header("idempotency-key", k);
            }
            self.send(b.body(Body::from(body.to_string())).unwrap())
                .await
        }

        async fn last_seq(&self) -> u64 {
            self.store.marks().unwrap().last_seq
        }

        async fn close(mut self) {
            if let Some(w) = self.writer.take() {
                w.shutdown().await;
            }
        }
    }

    fn code(v: &Value) -> &str {
        v["error"]["code"].as_str().unwrap_or("")
    }

    /// Goal: no token or a wrong one is 401 JSON on every route, known or not, before any body
    /// is looked at.
    #[tokio::test]
    async fn unauthorized_without_a_valid_token() {
        let f = Fixture::new().await;
        let (st, v) = f
            .send(HttpRequest::get("/v1/health").body(Body::empty()).unwrap())
            .await;
        assert_eq!((st, code(&v)), (401, "unauthorized"));
        let (st, v) = f
            .send(
                HttpRequest::post("/v1/orders")
                    .header("authorization", "Bearer wrong-token-wrong-token")
                    .header("content-length", "999999999")
                    .body(Body::from("{"))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            (st, code(&v)),
            (401, "unauthorized"),
            "auth before the body"
        );
        let (st, _) = f
            .send(
                HttpRequest::get("/nowhere")
                    .header("authorization", format!("Basic {TOKEN}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(st, 401);
        let (st, v) = f.get("/v1/health").await;
        assert_eq!(st, 200);
        assert_eq!(v["site"], "plant-1");
        assert_eq!(v["connected"], false);
        assert_eq!(v["master_rev"], 6);
        f.close().await;
    }

    const ORDER: &str = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1}]}"#;
    const MILESTONE: &str =
        r#"{"event_id":"e-1","milestone":"picked","scanner_id":"s","at":"2026-01-01T00:00:00Z"}"#;

    /// Goal: each role gets exactly its routes: reader every GET, scanner milestones, order-entry
    /// orders, admin everything; a forbidden write is 403 `forbidden` naming the role needed,
    /// decided before the body is read (a huge declared length is still 403), and stores
    /// nothing; unknown routes (404) and methods (405) answer as before for every valid token.
    #[tokio::test]
    async fn roles_allow_their_routes_and_forbid_the_rest() {
        let f = Fixture::new().await;
        for token in [READER, SCANNER, ORDERS, TOKEN] {
            for path in [
                "/v1/health",
                "/v1/atp/GEAR-12T",
                "/v1/allowances",
                "/v1/customers/ACME",
            ] {
                assert_eq!(f.get_as(token, path).await.0, 200, "{path}");
            }
            let (st, v) = f.get_as(token, "/v1/nowhere").await;
            assert_eq!((st, code(&v)), (404, "not_found"));
            let (st, v) = f.post_as(token, "/v1/nowhere", "{}", None).await;
            assert_eq!((st, code(&v)), (404, "not_found"));
        }
        for (token, role) in [(READER, "reader"), (SCANNER, "scanner")] {
            let (st, v) = f.post_as(token, "/v1/orders", ORDER, Some("k1")).await;
            assert_eq!((st, code(&v)), (403, "forbidden"), "{role}: {v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("order-entry") && msg.contains(role), "{msg}");
        }
        for token in [READER, ORDERS] {
            let (st, v) = f
                .post_as(token, "/v1/shipments/SH-1/milestones", MILESTONE, None)
                .await;
            assert_eq!((st, code(&v)), (403, "forbidden"), "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("scanner"));
        }
        // Before the body: a declared length far over the limit is still 403, not 413.
        let (st, v) = f
            .send(
                HttpRequest::post("/v1/orders")
                    .header("authorization", format!("Bearer {SCANNER}"))
                    .header("content-length", "999999999")
                    .body(Body::from("{"))
                    .unwrap(),
            )
            .await;
        assert_eq!((st, code(&v)), (403, "forbidden"));
        // Refused before its body was read: the connection is not to be reused. A refused
        // request without a body leaves the connection clean.
        let refused = |token: &str, body: &'static str| {
            let mut b =
                HttpRequest::post("/v1/orders").header("authorization", format!("Bearer {token}"));
            if !body.is_empty() {
                b = b.header("content-length", body.len().to_string());
            }
            f.app.clone().oneshot(b.body(Body::from(body)).unwrap())
        };
        let resp = refused(SCANNER, ORDER).await.unwrap();
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()["connection"], "close");
        let resp = refused("wrong-token-wrong-token", ORDER).await.unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["connection"], "close");
        let resp = refused(SCANNER, "").await.unwrap();
        assert_eq!(resp.status(), 403);
        assert!(resp.headers().get("connection").is_none());
        // A method a route does not have stays 405 for every role, as before.
        for token in [READER, ORDERS, TOKEN] {
            let (st, v) = f.post_as(token, "/v1/health", "{}", None).await;
            assert_eq!((st, code(&v)), (405, "method_not_allowed"));
        }
        assert_eq!(
            f.last_seq().await,
            0,
            "nothing stored by a forbidden request"
        );

        let (st, v) = f.post_as(ORDERS, "/v1/orders", ORDER, Some("k1")).await;
        assert_eq!(st, 201, "{v}");
        let (st, v) = f
            .post_as(SCANNER, "/v1/shipments/SH-1/milestones", MILESTONE, None)
            .await;
        assert_eq!(st, 201, "{v}");
        let (st, _) = f.post("/v1/orders", ORDER, Some("k2")).await;
        assert_eq!(st, 201, "admin may create orders");
        let m2 = MILESTONE.replace("e-1", "e-2");
        assert_eq!(
            f.post("/v1/shipments/SH-1/milestones", &m2, None).await.0,
            201
        );
        assert_eq!(f.last_seq().await, 4);
        let (_, h) = f.get("/v1/health").await;
        assert_eq!(h["api"]["forbidden"], 7, "{h}");
        f.close().await;
    }

    /// Goal: a client over its rate gets 429 `rate_limited` with a whole-second `Retry-After` of
    /// at least 1; other clients are unaffected; rejections are counted in the health JSON.
    #[tokio::test]
    async fn over_the_rate_limit_is_429_with_retry_after() {
        let f = Fixture::with_rate(1, 3).await;
        for _ in 0..3 {
            assert_eq!(f.get_as(READER, "/v1/atp/GEAR-12T").await.0, 200);
        }
        let resp = f
            .app
            .clone()
            .oneshot(
                HttpRequest::get("/v1/atp/GEAR-12T")
                    .header("authorization", format!("Bearer {READER}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1, "{retry}");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(code(&v), "rate_limited");
        let (st, h) = f.get_as(SCANNER, "/v1/health").await;
        assert_eq!(st, 200, "another client is not affected");
        assert_eq!(h["api"]["rate_limited"], 1, "{h}");
        f.close().await;
    }

    /// Goal: the bucket allows `burst` at once, then `rate` per second, and says how long to wait.
    #[test]
    fn token_bucket_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(2, t0);
        assert!(b.take(t0, 4, 2).is_ok());
        assert!(b.take(t0, 4, 2).is_ok());
        let wait = b.take(t0, 4, 2).unwrap_err();
        assert!((wait.as_secs_f64() - 0.25).abs() < 1e-6, "{wait:?}");
        assert!(b.take(t0 + Duration::from_millis(250), 4, 2).is_ok());
        assert!(b.take(t0 + Duration::from_millis(250), 4, 2).is_err());
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later, 4, 2).is_ok());
        assert!(b.take(later, 4, 2).is_ok());
        assert!(b.take(later, 4, 2).is_err());
        // A clock that seems to go back never adds tokens.
        assert!(b.take(t0, 4, 2).is_err());
    }

    /// Goal: the table of roles per route: reads for all, each write for its role, others admin.
    #[test]
    fn needed_roles() {
        assert_eq!(
            needed_role(&Method::GET, "/v1/orders/{order_id}"),
            Role::Reader
        );
        assert_eq!(needed_role(&Method::HEAD, "/v1/health"), Role::Reader);
        assert_eq!(needed_role(&Method::POST, ORDERS_ROUTE), Role::OrderEntry);
        assert_eq!(needed_role(&Method::POST, MILESTONES_ROUTE), Role::Scanner);
        assert_eq!(needed_role(&Method::PUT, ORDERS_ROUTE), Role::Admin);
        assert_eq!(needed_role(&Method::POST, "/v1/health"), Role::Admin);
    }

    /// Starts `serve` on `listener`; keep the returned sender alive as long as the server.
    fn spawn_serve(
        listener: tokio::net::TcpListener,
        app: Router,
        max_connections: usize,
        header_read_timeout: Duration,
    ) -> (
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<std::io::Result<()>>,
        Arc<ApiCounters>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let limits = ServeLimits {
            header_read_timeout,
            max_connections,
        };
        let counters = Arc::new(ApiCounters::default());
        let server = tokio::spawn(serve(listener, app, limits, counters.clone(), rx));
        (tx, server, counters)
    }

    /// Reads until EOF or error; `true` when the peer closed (or reset) within `within`.
    async fn closed_within(sock: &mut tokio::net::TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Goal: over a real socket, a client that trickles its headers is disconnected after the
    /// header read timeout while another connection is served; past `max_connections` a new
    /// connection is closed at once, and once a slot frees a request is served again; shutdown
    /// ends the loop. Method: two servers on real sockets, raw TCP clients, bounded waits.
    #[tokio::test]
    async fn serve_drops_slow_headers_and_caps_connections() {
        use tokio::io::AsyncWriteExt;
        let f = Fixture::new().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, server, counters) =
            spawn_serve(listener, f.app.clone(), 2, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let get = format!(
            "GET /v1/health HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
        );
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(get.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut ok, &mut resp),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            resp.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&resp)
        );
        assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "closed after {took:?}");

        assert_eq!(counters.header_timeouts.load(Ordering::Relaxed), 1);

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();

        // Two idle connections fill the slots; a third is closed at once (the header read
        // timeout is far longer, so only the cap can close it).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, server, counters) =
            spawn_serve(listener, f.app.clone(), 2, Duration::from_secs(30));
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut c, Duration::from_secs(5)).await,
            "over the cap"
        );
        assert_eq!(counters.connections_refused.load(Ordering::Relaxed), 1);
        drop((a, b));
        let mut served = false;
        for _ in 0..100 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut resp = Vec::new();
            if s.write_all(get.as_bytes()).await.is_ok()
                && tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut resp),
                )
                .await
                .is_ok()
                && resp.starts_with(b"HTTP/1.1 200")
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            served,
            "a request is served once the idle connections are gone"
        );
        // Shutdown closes an idle connection at once (it does not wait for its header timeout)
        // and stops accepting.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(closed_within(&mut idle, Duration::from_secs(1)).await);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        f.close().await;
    }

    /// Goal: a body over the limit is refused with 413 JSON, whether its length is declared or
    /// it is streamed, and nothing is stored.
    #[tokio::test]
    async fn over_the_limit_is_413_json() {
        let f = Fixture::new().await;
        let big = format!(
            r#"{{"customer_id":"ACME","lines":[{{"sku":"{}","qty":1}}]}}"#,
            "x".repeat(100_000)
        );
        let (st, v) = f.post("/v1/orders", &big, Some("k")).await;
        assert_eq!((st, code(&v)), (413, "body_too_large"));
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: a chunked body without a declared length is cut off at the limit by the extractor,
    /// over a real socket, with the same 413 JSON.
    #[tokio::test]
    async fn chunked_body_over_the_limit_is_413_json() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = Fixture::new().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, server, _) = spawn_serve(listener, f.app.clone(), 16, Duration::from_secs(5));
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
             idempotency-key: k\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 8192];
        for _ in 0..16 {
            let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
            c.extend_from_slice(&chunk);
            c.extend_from_slice(b"\r\n");
            if sock.write_all(&c).await.is_err() {
                break; // the server may answer and close before the whole body is sent
            }
        }
        let _ = sock.write_all(b"0\r\n\r\n").await;
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            sock.read_to_end(&mut resp),
        )
        .await;
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("\"body_too_large\""), "{text}");
        server.abort();
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: malformed JSON, wrong types, missing and unknown fields are 400 `bad_json`; a
    /// missing key is 400 `missing_idempotency_key`; nothing is stored.
    #[tokio::test]
    async fn bad_json_and_missing_key() {
        let f = Fixture::new().await;
        let good = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1}]}"#;
        let (st, v) = f.post("/v1/orders", good, None).await;
        assert_eq!((st, code(&v)), (400, "missing_idempotency_key"));
        for body in [
            "{not json",
            r#"{"customer_id":"ACME"}"#,
            r#"{"customer_id":"ACME","lines":[],"extra":1}"#,
            r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":"one"}]}"#,
            r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1.5}]}"#,
        ] {
            let (st, v) = f.post("/v1/orders", body, Some("k")).await;
            assert_eq!((st, code(&v)), (400, "bad_json"), "{body}: {v}");
            assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        }
        let (st, v) = f
            .post(
                "/v1/shipments/SH-1/milestones",
                r#"{"event_id":"e1","milestone":"teleported","scanner_id":"s","at":"2026-01-01T00:00:00Z"}"#,
                None,
            )
            .await;
        assert_eq!((st, code(&v)), (400, "bad_json"));
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: semantic refusals are 422 with their own codes, and store nothing.
    #[tokio::test]
    async fn validation_and_unknown_references_are_422() {
        let f = Fixture::new().await;
        let cases = [
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":0}]}"#,
                "validation_failed",
            ),
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":-4}]}"#,
                "validation_failed",
            ),
            (r#"{"customer_id":"ACME","lines":[]}"#, "validation_failed"),
            (
                r#"{"customer_id":"NOBODY","lines":[{"sku":"GEAR-12T","qty":1}]}"#,
                "unknown_customer",
            ),
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"NOPE","qty":1}]}"#,
                "unknown_sku",
            ),
            (
                r#"{"customer_id":"ACME","lines":[{"sku":"SPECIAL","qty":1}]}"#,
                "no_price",
            ),
        ];
        for (i, (body, expected)) in cases.into_iter().enumerate() {
            let (st, v) = f.post("/v1/orders", body, Some(&format!("k{i}"))).await;
            assert_eq!((st, code(&v)), (422, expected), "{body}: {v}");
        }
        let long_key = "k".repeat(129);
        let good = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1}]}"#;
        let (st, v) = f.post("/v1/orders", good, Some(&long_key)).await;
        assert_eq!((st, code(&v)), (422, "validation_failed"));
        let (st, v) = f
            .post(
                "/v1/shipments/SH-1/milestones",
                r#"{"event_id":"e2","milestone":"picked","scanner_id":"s","at":"yesterday"}"#,
                None,
            )
            .await;
        assert_eq!((st, code(&v)), (422, "validation_failed"));
        assert_eq!(f.last_seq().await, 0);
        f.close().await;
    }

    /// Goal: the order round trip: 201 with priced lines, a retry gets the same response, a
    /// different body under the key is refused, and the order reads back with `synced`.
    #[tokio::test]
    async fn order_capture_and_retry() {
        let f = Fixture::new().await;
        let body = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":2}]}"#;
        let (st, first) = f.post("/v1/orders", body, Some("key-1")).await;
        assert_eq!(st, 201, "{first}");
        assert_eq!(first["order_id"], "plant-1-o1");
        assert_eq!(first["status"], "confirmed");
        assert_eq!(first["lines"][0]["unit_price"], "11.00");
        assert_eq!(first["lines"][0]["currency"], "EUR");
        assert_eq!(first["lines"][0]["promise"], "confirmed");
        assert!(
            first["lines"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("8 left")
        );
        assert_eq!(first["seq"], 1);
        assert_eq!(first["offline"], true, "no link to central in this fixture");
        assert_eq!(first["master_rev"], 6);
        assert!(first["erp_status"].is_null() && first["erp_reason"].is_null());
        assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
        // Same body, different formatting: the same request.
        let spaced = r#"{ "lines": [ {"qty": 2, "sku": "GEAR-12T"} ], "customer_id": "ACME" }"#;
        let (st, again) = f.post("/v1/orders", spaced, Some("key-1")).await;
        assert_eq!((st, &again), (201, &first));
        let other = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":3}]}"#;
        let (st, v) = f.post("/v1/orders", other, Some("key-1")).await;
        assert_eq!((st, code(&v)), (422, "idempotency_key_reused"));
        let (st, o) = f.get("/v1/orders/plant-1-o1").await;
        assert_eq!(st, 200);
        assert_eq!(o["synced"], false);
        assert_eq!(o["lifecycle"], "captured", "not yet at central: {o}");
        assert_eq!(o["lines"], first["lines"]);
        f.store.mark_acked(1).await.unwrap();
        assert_eq!(f.get("/v1/orders/plant-1-o1").await.1["synced"], true);
        assert_eq!(f.get("/v1/orders/plant-1-o9").await.0, 404);
        assert_eq!(f.last_seq().await, 1);
        f.close().await;
    }

    #[tokio::test]
    async fn milestone_capture_and_retry() {
        let f = Fixture::new().await;
        let m = r#"{"event_id":"evt-42","milestone":"loaded","scanner_id":"scanner-7","at":"2026-11-26T10:00:00Z"}"#;
        let (st, first) = f.post("/v1/shipments/SH-9/milestones", m, None).await;
        assert_eq!(st, 201, "{first}");
        assert_eq!(first["shipment_id"], "SH-9");
        assert_eq!(first["milestone"], "loaded");
        assert_eq!(first["seq"], 1);
        let (st, again) = f.post("/v1/shipments/SH-9/milestones", m, None).await;
        assert_eq!((st, &again), (200, &first));
        let changed = m.replace("loaded", "departed");
        let (st, v) = f
            .post("/v1/shipments/SH-9/milestones", &changed, None)
            .await;
        assert_eq!((st, code(&v)), (422, "event_id_reused"));
        // Same event id on another shipment is a different body too.
        let (st, v) = f.post("/v1/shipments/SH-10/milestones", m, None).await;
        assert_eq!((st, code(&v)), (422, "event_id_reused"));
        assert_eq!(f.last_seq().await, 1);
        f.close().await;
    }

    /// Goal: a milestone is recorded under the client's `traceparent` (answer, `traceresponse`
    /// header and outbox envelope agree), a retry keeps it, and a malformed header restarts the
    /// trace instead of failing the request.
    #[tokio::test]
    async fn milestones_take_the_clients_trace_or_a_fresh_one() {
        const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
        let f = Fixture::new().await;
        let post = |event_id: &str, traceparent: &str| {
            HttpRequest::post("/v1/shipments/SH-1/milestones")
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json")
                .header("traceparent", traceparent)
                .body(Body::from(format!(
                    r#"{{"event_id":"{event_id}","milestone":"loaded","scanner_id":"s-1","at":"2026-11-26T10:00:00Z"}}"#
                )))
                .unwrap()
        };
        let resp = f
            .app
            .clone()
            .oneshot(post("ev-1", &format!("00-{TID}-00f067aa0ba902b7-01")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let header = resp.headers()["traceresponse"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(header.starts_with(&format!("00-{TID}-")), "{header}");
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["trace_id"], TID);
        assert_eq!(f.store.outbox_range(1..=1).unwrap()[0].trace_id, TID);

        // The retry comes under another trace and gets the original one.
        let (st, again) = f.send(post("ev-1", "garbage")).await;
        assert_eq!((st, &again["trace_id"]), (200, &json!(TID)));

        // A malformed header: a fresh valid trace, not an error.
        let (st, v) = f
            .send(post("ev-2", &format!("00-{TID}-0000000000000000-01")))
            .await;
        assert_eq!(st, 201, "{v}");
        let fresh = v["trace_id"].as_str().unwrap();
        assert!(outpost_protocol::validate_trace_id(fresh).is_ok());
        assert_ne!(fresh, TID);
        assert_eq!(f.store.outbox_range(2..=2).unwrap()[0].trace_id, fresh);
        f.close().await;
    }

    /// Goal: a customer's own price wins; otherwise the list price, echoing the customer asked.
    #[tokio::test]
    async fn prices_customer_versus_list() {
        let f = Fixture::new().await;
        let (st, v) = f.get("/v1/prices/GEAR-12T?customer=ACME").await;
        assert_eq!(st, 200);
        assert_eq!(
            (v["unit_price"].as_str(), v["customer"].as_str()),
            (Some("11.00"), Some("ACME"))
        );
        let (_, v) = f.get("/v1/prices/GEAR-12T?customer=GLOBEX").await;
        assert_eq!(
            (v["unit_price"].as_str(), v["customer"].as_str()),
            (Some("12.50"), Some("GLOBEX"))
        );
        let (_, v) = f.get("/v1/prices/GEAR-12T").await;
        assert_eq!(v["unit_price"], "12.50");
        assert!(v["customer"].is_null());
        assert_eq!(v["currency"], "EUR");
        assert_eq!(f.get("/v1/prices/SPECIAL").await.0, 404);
        assert_eq!(
            f.get("/v1/prices/SPECIAL?customer=GLOBEX").await.1["unit_price"],
            "5.00"
        );
        assert_eq!(f.get("/v1/prices/NOPE").await.0, 404);
        let (st, v) = f.get("/v1/atp/GEAR-12T").await;
        assert_eq!(
            (st, v["available"].as_i64(), v["master_rev"].as_u64()),
            (200, Some(10), Some(6)),
            "available is the site's allowance: {v}"
        );
        assert_eq!(v["erp_available"], 40);
        assert_eq!(f.get("/v1/atp/NOPE").await.0, 404);
        let (st, v) = f.get("/v1/customers/ACME").await;
        assert_eq!(
            (st, v["name"].as_str(), v["credit_limit"].as_str()),
            (200, Some("Acme Corp"), Some("50000.00"))
        );
        assert_eq!(v["on_hold"], false);
        assert_eq!(f.get("/v1/customers/NOBODY").await.0, 404);
        f.close().await;
    }

    /// Goal: an order beyond the allowance answers per line (promise + reason) and as a whole
    /// (status, offline); the allowance and ATP views show what is left, the ERP figure, the
    /// revision and its age; the ERP's decision shows on GET while a retried POST still gets
    /// the original response.
    #[tokio::test]
    async fn partial_orders_allowances_and_erp_status() {
        let f = Fixture::new().await;
        // 10 gears allowed: 6 fit, the next 6 do not (4 left), 3 fit. 9 × 11.00 = 99.00 fits
        // the 100.00 of credit.
        let body = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":6},{"sku":"GEAR-12T","qty":6},{"sku":"GEAR-12T","qty":3}]}"#;
        let (st, first) = f.post("/v1/orders", body, Some("p-1")).await;
        assert_eq!(st, 201, "{first}");
        assert_eq!(first["status"], "partial");
        let promises: Vec<&str> = first["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["promise"].as_str().unwrap())
            .collect();
        assert_eq!(promises, ["confirmed", "pending_allowance", "confirmed"]);
        let reason = first["lines"][1]["reason"].as_str().unwrap();
        assert!(reason.contains("has 4 left"), "{reason}");
        assert_eq!(first["offline"], true);
        assert!(first.get("synced").is_none());

        let (st, v) = f.get("/v1/atp/GEAR-12T").await;
        assert_eq!(st, 200);
        assert_eq!(
            (v["available"].as_i64(), v["allowance"].as_i64()),
            (Some(1), Some(1))
        );
        assert_eq!(v["erp_available"], 40);
        assert!(v["as_of"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v["stale_secs"].is_null(), "never heard from central: {v}");
        let (st, v) = f.get("/v1/allowances").await;
        assert_eq!(st, 200);
        let list = v["allowances"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{v}");
        assert_eq!(
            (&list[0]["pool"], &list[0]["kind"], &list[0]["remaining"]),
            (&json!("atp:GEAR-12T"), &json!("atp"), &json!(1))
        );
        assert_eq!(
            (&list[1]["pool"], &list[1]["remaining"], &list[1]["amount"]),
            (&json!("credit:ACME"), &json!(10_000), &json!("1.00"))
        );

        let decision = MasterBatch {
            from_rev: 6,
            through_rev: 7,
            changes: vec![MasterChange::OrderStatus(OrderStatusUpdate {
                site: "plant-1".into(),
                order_id: "plant-1-o1".into(),
                status: ErpStatus::NeedsReview,
                reason: Some("line 2 pending".into()),
            })],
        };
        f.store.apply_master(decision).await.unwrap();
        let (_, o) = f.get("/v1/orders/plant-1-o1").await;
        assert_eq!(o["erp_status"], "needs_review");
        assert_eq!(o["erp_reason"], "line 2 pending");
        assert_eq!(o["lines"], first["lines"]);
        let (st, again) = f.post("/v1/orders", body, Some("p-1")).await;
        assert_eq!(
            (st, &again),
            (201, &first),
            "a retry gets the original response"
        );

        // A customer on hold: every line pending_hold, nothing consumed.
        let hold = MasterBatch {
            from_rev: 7,
            through_rev: 8,
            changes: vec![MasterChange::Customer(CustomerRecord {
                id: "ACME".into(),
                name: "Acme Corp".into(),
                credit_limit: Money::parse("50000").unwrap(),
                on_hold: true,
            })],
        };
        f.store.apply_master(hold).await.unwrap();
        let one = r#"{"customer_id":"ACME","lines":[{"sku":"GEAR-12T","qty":1}]}"#;
        let (_, v) = f.post("/v1/orders", one, Some("p-2")).await;
        assert_eq!(v["status"], "pending");
        assert_eq!(v["lines"][0]["promise"], "pending_hold");
        assert_eq!(f.get("/v1/atp/GEAR-12T").await.1["available"], 1);
        f.close().await;
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_json() {
        let f = Fixture::new().await;
        let (st, v) = f.get("/v1/nowhere").await;
        assert_eq!((st, code(&v)), (404, "not_found"));
        let (st, v) = f.post("/v1/health", "{}", None).await;
        assert_eq!((st, code(&v)), (405, "method_not_allowed"));
        f.close().await;
    }
}
