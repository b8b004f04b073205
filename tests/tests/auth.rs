//! The agent's local API as a security boundary, over real processes (central + one agent from
//! `dev init`, real HTTP on loopback): each role's allowed and forbidden routes, 401 without a
//! valid token, a per-client rate limit with `Retry-After`, a client that trickles its headers
//! disconnected, the connection cap, and no token, token hash or private key in any log.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outpost_tests::*;
use serde_json::{Value, json};

const ROLES: [&str; 4] = ["reader", "scanner", "order-entry", "admin"];

/// Site plant-1's token for `role`, from fleet.json.
fn role_token(fleet: &Fleet, role: &str) -> Result<String> {
    fleet.fleet_json["sites"][0]["tokens"][role]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("fleet.json has no {role} token for plant-1"))
}

/// A client of `agent` presenting `token`, with a fresh connection for every request (so a
/// connection the agent closed while idle is never reused).
fn client(agent: &Proc, token: &str) -> Api {
    Api {
        base: format!("http://{}", agent.ready.api),
        token: token.to_string(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client"),
    }
}

fn milestone(event_id: &str) -> Value {
    json!({"event_id": event_id, "milestone": "picked", "scanner_id": "rf-1", "at": "2026-11-26T10:00:00Z"})
}

fn code(r: &Resp) -> &str {
    r.body["error"]["code"].as_str().unwrap_or("")
}

/// Every string in fleet.json under a key naming a token (central's `token`, each site's
/// `token` and `tokens` map...).
fn plaintext_tokens(v: &Value, out: &mut Vec<String>) {
    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Object(m) => m.values().for_each(|v| strings(v, out)),
            Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k.contains("token") {
                    strings(v, out);
                } else {
                    plaintext_tokens(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| plaintext_tokens(v, out)),
        _ => {}
    }
}

/// Every `sha256 = "..."` value in the fleet's TOML files.
fn configured_hashes(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            for line in std::fs::read_to_string(&path)?.lines() {
                if let Some(rest) = line.trim().strip_prefix("sha256")
                    && let Some(v) = rest.split('"').nth(1)
                {
                    out.push(v.to_string());
                }
            }
        }
    }
    Ok(out)
}

/// The body lines of every private key PEM under `certs/`.
fn key_pem_lines(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir.join("certs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "key") {
            for line in std::fs::read_to_string(&path)?.lines() {
                let line = line.trim();
                if !line.starts_with("-----") && line.len() >= 16 {
                    out.push(line.to_string());
                }
            }
        }
    }
    Ok(out)
}

/// Goal: each role gets exactly its routes on a real agent: reader every GET and no write,
/// scanner milestones but not orders, order-entry orders but not milestones, admin both; a
/// forbidden write is 403 `forbidden` and stores nothing; no token or a wrong one is 401. Then
/// no log of the fleet holds a plaintext token, a configured hash or a private key line.
/// Method: `dev init` one site; start central and the agent (agent logging at debug, the most it
/// ever says); push master data; call every route with every role's token, plus no token and a
/// wrong one; compare the agent's `last_seq` before and after the forbidden writes; stop both
/// processes (SIGTERM, so logs are complete) and search every log file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_scope_routes_and_no_secret_reaches_the_logs() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let mut central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let c = Api::new(&central);
    let mut agent = fleet.start_agent("plant-1", &quic, &[("RUST_LOG", "debug".to_string())])?;
    let admin_api = client(&agent, &role_token(&fleet, "admin")?);
    let rev = push_demo_master(&c, &["plant-1"]).await?;
    wait_master(&admin_api, rev).await?;

    let api = |role: &str| -> Result<Api> { Ok(client(&agent, &role_token(&fleet, role)?)) };
    let (reader, scanner, orders, admin) = (
        api("reader")?,
        api("scanner")?,
        api("order-entry")?,
        api("admin")?,
    );

    // Reads: every role.
    for (role, a) in [
        ("reader", &reader),
        ("scanner", &scanner),
        ("order-entry", &orders),
        ("admin", &admin),
    ] {
        for path in [
            "/v1/health",
            "/v1/atp/GEAR-12T",
            "/v1/allowances",
            "/v1/customers/ACME",
            "/v1/prices/GEAR-12T?customer=ACME",
        ] {
            let r = a.get(path).await?;
            assert_eq!(r.status, 200, "{role} GET {path}: {}", r.body);
        }
    }

    // Forbidden writes: 403, nothing stored.
    let before = health(&admin).await?["last_seq"]
        .as_u64()
        .context("last_seq")?;
    let order_body = json!({"customer_id": "ACME", "lines": [{"sku": "GEAR-12T", "qty": 1}]});
    for (role, a) in [("reader", &reader), ("scanner", &scanner)] {
        let r = a
            .post("/v1/orders", &order_body, Some("forbidden-1"))
            .await?;
        assert_eq!(
            (r.status, code(&r)),
            (403, "forbidden"),
            "{role}: {}",
            r.body
        );
        let msg = r.body["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains("order-entry"), "names the role needed: {msg}");
    }
    for (role, a) in [("reader", &reader), ("order-entry", &orders)] {
        let r = a
            .post("/v1/shipments/SH-1/milestones", &milestone("scan-x"), None)
            .await?;
        assert_eq!(
            (r.status, code(&r)),
            (403, "forbidden"),
            "{role}: {}",
            r.body
        );
        let msg = r.body["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains("scanner"), "names the role needed: {msg}");
    }
    let h = health(&admin).await?;
    assert_eq!(
        h["last_seq"].as_u64(),
        Some(before),
        "no forbidden write stored: {h}"
    );
    assert_eq!(h["api"]["forbidden"], 4, "{h}");
    // The key the scanner was refused under is still free: the order-entry client's order with
    // it is new (201, a new sequence number), not a replay of anything.
    let r = orders
        .post("/v1/orders", &order_body, Some("forbidden-1"))
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["seq"].as_u64(), Some(before + 1), "{}", r.body);

    // Allowed writes.
    let r = scanner
        .post("/v1/shipments/SH-1/milestones", &milestone("scan-1"), None)
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = admin
        .post("/v1/orders", &order_body, Some("admin-1"))
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = admin
        .post("/v1/shipments/SH-1/milestones", &milestone("scan-2"), None)
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    // Unknown routes answer as before for a valid token.
    assert_eq!(reader.get("/v1/nowhere").await?.status, 404);

    // No token, a wrong token, another scheme: 401.
    let r = admin
        .http
        .get(format!("{}/v1/health", admin.base))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    let wrong = client(&agent, "wrong-token-wrong-token-wrong-token");
    let r = wrong.post("/v1/orders", &order_body, Some("w-1")).await?;
    assert_eq!((r.status, code(&r)), (401, "unauthorized"), "{}", r.body);
    let r = admin
        .http
        .get(format!("{}/v1/health", admin.base))
        .header("authorization", format!("Basic {}", admin.token))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    let h = health(&admin).await?;
    assert_eq!(h["api"]["unauthorized"], 3, "{h}");
    assert_eq!(h["last_seq"].as_u64(), Some(before + 4), "{h}");

    assert!(agent.terminate()?, "agent exits cleanly");
    assert!(central.terminate()?, "central exits cleanly");

    let mut tokens = Vec::new();
    plaintext_tokens(&fleet.fleet_json, &mut tokens);
    assert!(
        tokens.len() >= 6,
        "central's token and the site's admin token and four role tokens: {tokens:?}"
    );
    let hashes = configured_hashes(fleet.path())?;
    assert!(
        hashes.iter().filter(|h| h.len() == 64).count() >= 4,
        "the site's four hashes: {hashes:?}"
    );
    let keys = key_pem_lines(fleet.path())?;
    assert!(!keys.is_empty(), "private keys found under certs/");
    let logs = fleet.path().join("logs");
    let mut read = 0;
    for entry in std::fs::read_dir(&logs)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        read += 1;
        for t in &tokens {
            assert!(
                !text.contains(t.as_str()),
                "{} holds a token",
                path.display()
            );
        }
        for h in &hashes {
            assert!(
                !text.contains(h.as_str()),
                "{} holds a token hash",
                path.display()
            );
        }
        for k in &keys {
            assert!(
                !text.contains(k.as_str()),
                "{} holds a private key line",
                path.display()
            );
        }
    }
    assert!(read >= 2, "the agent's and central's logs were read");
    // What the agent does log instead: client names and roles.
    let agent_log = std::fs::read_to_string(&agent.log)?;
    for role in ROLES {
        assert!(
            agent_log.contains(&format!("{role} ({role})")),
            "the agent lists its clients by name and role: {}",
            agent.log_tail()
        );
    }
    assert!(
        agent_log.contains("refused: the client's role does not allow this route"),
        "{}",
        agent.log_tail()
    );
    Ok(())
}

/// Goal: a client over its rate limit gets 429 `rate_limited` with a whole-second
/// `Retry-After` of at least 1, while another client is unaffected, and the rejections are
/// counted in the health JSON. Method: start the agent with 5 requests per second and a burst of
/// 5 (environment overrides); send the reader's requests back to back (at most 50) until one is
/// refused; the scanner's request right after is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_and_others_do_not() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let agent = fleet.start_agent(
        "plant-1",
        &quic,
        &[
            ("OUTPOST_API__RATE_LIMIT_PER_SEC", "5".to_string()),
            ("OUTPOST_API__RATE_LIMIT_BURST", "5".to_string()),
        ],
    )?;
    let reader = client(&agent, &role_token(&fleet, "reader")?);
    let started = Instant::now();
    let mut refused = None;
    let mut served = 0;
    for _ in 0..50 {
        let r = reader
            .http
            .get(format!("{}/v1/atp/GEAR-12T", reader.base))
            .bearer_auth(&reader.token)
            .send()
            .await?;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        served += 1;
    }
    let r = refused.context("no 429 within 50 back-to-back requests")?;
    // 5 at once plus what 5 per second refilled meanwhile.
    let allowed = 5 + (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (5..=allowed).contains(&served),
        "{served} served before the limit"
    );
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .context("Retry-After")?
        .to_str()?
        .parse()?;
    assert!(retry >= 1, "Retry-After {retry}");
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");

    let scanner = client(&agent, &role_token(&fleet, "scanner")?);
    let h = scanner.get("/v1/health").await?;
    assert_eq!(h.status, 200, "another client is not limited: {}", h.body);
    assert!(
        h.body["api"]["rate_limited"].as_u64() >= Some(1),
        "{}",
        h.body
    );
    Ok(())
}

/// Sends `head` one byte per `every` until the peer closes the connection (EOF or an error on
/// read or write) or `limit` passes; returns how long the connection lasted, `None` if it was
/// still open at `limit`.
fn trickle_until_closed(
    mut sock: TcpStream,
    head: &[u8],
    every: Duration,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    sock.set_read_timeout(Some(every)).ok()?;
    let mut buf = [0u8; 256];
    // The head, then an endless header value: never a complete request, never a bad one.
    for byte in head.iter().chain(std::iter::repeat(&b'a')) {
        if started.elapsed() > limit {
            return None;
        }
        if sock.write_all(&[*byte]).is_err() {
            return Some(started.elapsed());
        }
        match sock.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Whether the peer closes `sock` (EOF or reset) within `within`.
fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Goal: a client that trickles a request's headers is disconnected once the header read
/// timeout passes, while a normal request on another connection is served meanwhile; with
/// `max_connections` connections open, a new one is closed at once, and after they go a request
/// is served again. Method: the agent with `header_read_timeout_ms = 500`; a raw TCP client
/// sends a partial request line and headers one byte per 50 ms (on a blocking thread) while a
/// normal GET runs; then the agent restarted with `max_connections = 8` (and the default 5 s
/// header timeout, so only the cap can close a connection quickly): 8 idle connections, a 9th
/// that must be closed within a second, then the 8 dropped and a GET polled (bounded) to 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_connections_are_capped() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic")?;
    let reader_token = role_token(&fleet, "reader")?;

    let mut agent = fleet.start_agent(
        "plant-1",
        &quic,
        &[("OUTPOST_API__HEADER_READ_TIMEOUT_MS", "500".to_string())],
    )?;
    let addr = agent.ready.api.clone();
    let sock = TcpStream::connect(&addr)?;
    let head = format!(
        "GET /v1/health HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {reader_token}\r\nx-slow: "
    );
    let slow = std::thread::spawn(move || {
        trickle_until_closed(
            sock,
            head.as_bytes(),
            Duration::from_millis(50),
            Duration::from_secs(10),
        )
    });
    let reader = client(&agent, &reader_token);
    let r = reader.get("/v1/health").await?;
    assert_eq!(
        r.status, 200,
        "a normal request is served meanwhile: {}",
        r.body
    );
    let lasted = slow
        .join()
        .map_err(|_| anyhow::anyhow!("trickling thread panicked"))?
        .context("the trickling client was still connected after 10 s")?;
    assert!(
        lasted >= Duration::from_millis(450) && lasted <= Duration::from_millis(500 + 2_500),
        "disconnected after {lasted:?}, timeout 500 ms"
    );
    let h = reader.get("/v1/health").await?;
    assert!(
        h.body["api"]["header_timeouts"].as_u64() >= Some(1),
        "{}",
        h.body
    );
    assert!(agent.terminate()?, "agent exits cleanly");

    let agent = fleet.start_agent(
        "plant-1",
        &quic,
        &[("OUTPOST_API__MAX_CONNECTIONS", "8".to_string())],
    )?;
    let addr = agent.ready.api.clone();
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(&addr))
        .collect::<std::io::Result<_>>()?;
    let mut ninth = TcpStream::connect(&addr)?;
    assert!(
        closed_within(&mut ninth, Duration::from_secs(1)),
        "the connection past the cap is closed at once"
    );
    drop(idle);
    let reader = client(&agent, &reader_token);
    let h = eventually(
        "a request served after the idle connections went",
        Duration::from_secs(10),
        || async {
            let r = reader.get("/v1/health").await?;
            Ok((r.status == 200).then_some(r.body))
        },
    )
    .await?;
    assert!(h["api"]["connections_refused"].as_u64() >= Some(1), "{h}");
    let log = std::fs::read_to_string(&agent.log)?;
    assert!(
        log.contains("connection refused: too many open connections"),
        "{}",
        agent.log_tail()
    );
    Ok(())
}
