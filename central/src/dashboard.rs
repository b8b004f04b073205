//! The fleet dashboard: one HTML page, its script and its stylesheet, compiled into the binary
//! (no build step, nothing fetched from elsewhere) and served at `GET /` and `GET /assets/*`
//! without a bearer token: the files hold no data. The page's script reads the JSON API
//! (`/v1/fleet`, `/v1/fleet/{site}`, `/v1/alerts`, `/v1/drills`) with the token the operator
//! gives it, pasted or in the URL fragment (`#token=...`), which browsers never send to the
//! server. The page only reads: it shows drills but never starts or aborts one (an admin action
//! kept in the CLI and the API). I/O shell only; the API's routes and authentication are in
//! `api.rs`.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub const INDEX_HTML: &str = include_str!("dashboard/index.html");
pub const APP_JS: &str = include_str!("dashboard/app.js");
pub const APP_CSS: &str = include_str!("dashboard/app.css");

/// Route of the page; the summary of `dev up` prints it with `#token=...`.
pub const PAGE_ROUTE: &str = "/";

/// Everything comes from this origin; no inline script or style, no framing, no forms posted
/// elsewhere. The script only talks to the API on the same origin (`connect-src 'self'`).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; no-cache makes a browser revalidate after an upgrade.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The dashboard's routes. `router::router` merges them outside its authentication layer.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            PAGE_ROUTE,
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiState, Clients};
    use crate::config::Role;
    use crate::registry::Registry;
    use crate::router::router as api_router;
    use crate::store::Store;
    use std::sync::Arc;

    /// Goal: the page and its assets are served without a token, with their content types,
    /// `no-cache` and the CSP, while the API beside them still needs one; the page loads
    /// nothing from another origin and has no inline script or style.
    /// Method: the real API router on a loopback port, plain `reqwest` without a token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn page_and_assets_are_served_without_a_token_with_csp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("central.redb")).unwrap();
        let state = ApiState {
            store: store.clone(),
            data_dir: std::env::temp_dir(),
            registry: Arc::new(Registry::new()),
            clients: Arc::new(Clients::from_tokens([(
                "admin",
                Role::Admin,
                "test-token-0123456789abcdef",
            )])),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = api_router(state, 1 << 20);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http = reqwest::Client::new();

        for (path, ctype, body) in [
            ("/", "text/html; charset=utf-8", INDEX_HTML),
            ("/assets/app.js", "text/javascript; charset=utf-8", APP_JS),
            ("/assets/app.css", "text/css; charset=utf-8", APP_CSS),
        ] {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "{path}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], ctype, "{path}");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache", "{path}");
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.starts_with("default-src 'self';"), "{csp}");
            assert!(!csp.contains("unsafe"), "{csp}");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(r.text().await.unwrap(), body, "{path}");
        }
        // The API beside the page still needs a token, and so do unknown paths.
        for path in ["/v1/fleet", "/assets/nope.js", "/index.html"] {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 401, "{path}");
        }

        // Only local assets: every src/href is an absolute path on this origin, and there is
        // no inline script or style for the CSP to refuse.
        for attr in ["src=\"", "href=\""] {
            for part in INDEX_HTML.split(attr).skip(1) {
                let url = part.split('"').next().unwrap();
                assert!(
                    url.starts_with("/assets/") && !url.starts_with("//"),
                    "non-local asset {url:?}"
                );
            }
        }
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
        assert!(INDEX_HTML.contains("<script src=\"/assets/app.js\""));
        assert!(!INDEX_HTML.contains("<style") && !INDEX_HTML.contains(" style="));
        // Read-only: every request the script makes is a GET (fetch's default method).
        assert!(!APP_JS.contains("method:") && !APP_JS.contains("\"POST\""));
        assert!(INDEX_HTML.contains("outpost-central drill start"));
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            // The SVG namespace is a name, not something fetched.
            let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("http://") && !text.contains("https://"));
            assert!(!text.contains("@import") && !text.contains("eval("));
        }
        store.close().await;
    }
}
