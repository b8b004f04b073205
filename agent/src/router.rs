//! The agent's HTTP router, assembled at the top of the API: every route with its handler (the
//! API's in `api`, `/metrics` in `metrics`), the boundary's middleware, body limit, timeouts and
//! JSON fallbacks. Async shell; it only wires, and no handler module imports it.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};

use crate::api::boundary::{Gate, authorize, count_requests, guard, json_timeout};
use crate::api::error::{method_not_allowed, not_found};
use crate::api::handlers::{
    allowances, atp, create_order, customer, get_order, health, price, record_milestone,
};
use crate::api::{
    ApiState, Boundary, MAX_IN_FLIGHT_REQUESTS, METRICS_ROUTE, MILESTONES_ROUTE, ORDERS_ROUTE,
    REQUEST_TIMEOUT,
};

#[cfg(test)]
mod tests;

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
