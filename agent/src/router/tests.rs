//! Tests of the assembled HTTP API, through the router and the accept loop: authentication,
//! roles, rate and body limits, slow clients, and every route's answers.

use super::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::api::*;
use crate::config::{ApiClient, Role};
use crate::link::LinkState;
use crate::store::Store;
use crate::store::StoreWriter;
use crate::testutil::{catalogue, grants};
use axum::body::Body;
use axum::http::Method;
use axum::http::Request as HttpRequest;
use outpost_protocol::Pool;
use outpost_protocol::{
    CustomerRecord, ErpStatus, MasterBatch, MasterChange, Money, OrderStatusUpdate,
};
use serde_json::Value;
use serde_json::json;
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
    let (stop, server, counters) = spawn_serve(listener, f.app.clone(), 2, Duration::from_secs(30));
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
