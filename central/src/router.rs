//! The HTTP router: mounts every handler (`api::*`, `backup`, `metrics`, `dashboard`) behind the
//! API's boundary layers (bearer-token authentication and role checks, body limit, request
//! timeout, JSON errors). The top of the HTTP side: handlers never import it. I/O shell (axum).

use std::time::SystemTime;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::api::{
    ApiError, ApiState, Caller, METRICS_ROUTE, REQUEST_TIMEOUT, drills, feed, fleet, master, ops,
    orders, status,
};
use crate::config::Role;
use crate::{backup, dashboard, metrics};

#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod roles_tests;

/// The API router with its layers: JSON errors outermost, then the request timeout, then
/// authentication (for every route but the dashboard's static files), then the body limit that
/// the extractors enforce. Routes are split by the role they need: the ERP's (which admin may use
/// too) and admin's only, whose role check runs before any body is read.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    let started = SystemTime::now();
    let admin_only = Router::new()
        .route("/v1/exceptions/{id}/resolve", post(ops::resolve_exception))
        .route("/v1/exceptions/{id}/replay", post(ops::replay_exception))
        .route("/v1/dead-letters", get(ops::list_dead_letters))
        .route("/v1/ledger", get(ops::get_ledger))
        .route(
            "/v1/sites/{site}/revoke",
            post(ops::revoke_site).delete(ops::reinstate_site),
        )
        .route("/v1/drills/{id}/abort", post(drills::abort_drill))
        .route(backup::BACKUP_ROUTE, post(backup::post_backup))
        .route_layer(middleware::from_fn(require_admin));
    Router::new()
        .route("/v1/master/prices", put(master::put_prices))
        .route("/v1/master/atp", put(master::put_atp))
        .route("/v1/master/customers", put(master::put_customers))
        .route("/v1/master/revision", get(master::get_revision))
        .route("/v1/events", get(feed::get_events))
        .route("/v1/sites", get(status::get_sites))
        .route("/v1/health", get(status::get_health))
        .route("/v1/fleet", get(fleet::get_fleet))
        .route("/v1/fleet/{site}", get(fleet::get_fleet_site))
        .route("/v1/alerts", get(fleet::list_alerts))
        // Starting a drill needs admin: the role check runs in the handler's route layer below.
        .route(
            "/v1/drills",
            get(drills::list_drills)
                .post(drills::start_drill)
                .route_layer(middleware::from_fn(require_admin_for_post)),
        )
        .route("/v1/drills/{id}", get(drills::get_drill))
        .route("/v1/drills/{id}/report", get(drills::get_report))
        // Any role may scrape, like the other reads.
        .route(
            METRICS_ROUTE,
            get(move |s: State<ApiState>| metrics::handler(s, started)),
        )
        .route("/v1/orders", post(orders::post_order))
        .route("/v1/orders/{order_id}", get(orders::get_order))
        .route("/v1/orders/{order_id}/status", post(orders::post_status))
        .route("/v1/exceptions", get(ops::list_exceptions))
        .route("/v1/exceptions/{id}", get(ops::get_exception))
        .route(
            "/v1/sites/{site}/reconciliations",
            get(ops::list_reconciliations),
        )
        .merge(admin_only)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        // The dashboard's static files hold no data: merged outside the token check (its
        // script sends the token with each API call).
        .merge(dashboard::router())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// Checks the bearer token before anything else runs, so that an unauthenticated body is never
/// read, and records who is calling (`Caller`) for the role checks and the handlers.
async fn require_token(State(st): State<ApiState>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let caller = presented.and_then(|t| st.clients.authenticate(t)).cloned();
    match caller {
        Some(c) => {
            tracing::debug!(client = %c.name, role = c.role.as_str(), method = %req.method(), path = %req.uri().path(), "request");
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}

/// Refuses (403, before the body is read) callers whose role does not allow admin routes. Runs
/// as a route layer, so only on matched admin routes and after `require_token`.
async fn require_admin(req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role.allows(Role::Admin) => next.run(req).await,
        Some(c) => {
            tracing::info!(client = %c.name, role = c.role.as_str(), method = %req.method(), path = %req.uri().path(), "forbidden: the route needs the admin role");
            ApiError::forbidden(c, Role::Admin).into_response()
        }
        // require_token runs first on every route; without a caller nothing is allowed.
        None => ApiError::unauthorized().into_response(),
    }
}

/// `require_admin` for writes only: on a route that any role may read but only admin may
/// change (drills).
async fn require_admin_for_post(req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::POST {
        require_admin(req, next).await
    } else {
        next.run(req).await
    }
}

/// Gives responses that some layer produced without a body (timeouts, axum's own rejections)
/// the JSON error shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let code = match status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::REQUEST_TIMEOUT => "timeout",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            s if s.is_server_error() => "internal",
            _ => "bad_request",
        };
        let mut out = ApiError::new(
            status,
            code,
            status.canonical_reason().unwrap_or("error").to_string(),
        )
        .into_response();
        if let Some(allow) = resp.headers().get(header::ALLOW) {
            out.headers_mut().insert(header::ALLOW, allow.clone());
        }
        return out;
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
