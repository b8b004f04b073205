//! The security boundary, tested with real processes: dependency floors that close known advisories,
//! mutual-TLS negatives at the handshake (no client certificate, an expired certificate), and hostile
//! input on the agent's local API (very long ids, unicode edge cases, huge numbers, wrong types,
//! deeply nested JSON). A certificate from another CA and a certificate for site A sending events
//! for site B are covered in `identity.rs` (`a_certificate_from_another_ca_is_refused_at_the_handshake`,
//! `site_identity_comes_from_the_certificate`) and not repeated here.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use outpost_protocol::*;
use outpost_tests::quic_client::{
    client_config, client_config_without_certificate, open, read_cert, site_client_config,
};
use outpost_tests::*;
use serde_json::{Value, json};

/// Advisory floors: (crate, minimum version, why).
const FLOORS: &[(&str, [u64; 3], &str)] = &[
    (
        "quinn-proto",
        [0, 11, 18],
        "remote denial of service fixed in 0.11.18",
    ),
    ("rustls", [0, 23, 45], "TLS advisories fixed in 0.23.45"),
    (
        "rustls-webpki",
        [0, 103, 13],
        "certificate validation advisories fixed in 0.103.13",
    ),
];

/// Every `(name, version)` of `Cargo.lock`'s `[[package]]` entries.
fn locked_packages(lock: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name: Option<String> = None;
    for line in lock.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            name = None;
        } else if let Some(v) = line.strip_prefix("name = ") {
            name = Some(v.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("version = ")
            && let Some(n) = name.take()
        {
            out.push((n, v.trim_matches('"').to_string()));
        }
    }
    out
}

fn semver(v: &str) -> Option<[u64; 3]> {
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Goal: the lock file never resolves a crate below the version that fixed a known remote DoS or
/// TLS advisory. Method: parse the workspace's `Cargo.lock`; every locked version of each crate
/// (there may be several) must be at or above its floor, and each crate must be present, so that a
/// rename or a parse slip fails instead of passing vacuously.
#[test]
fn cargo_lock_respects_the_advisory_floors() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lock = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let pkgs = locked_packages(&lock);
    assert!(pkgs.len() > 50, "parsed only {} packages", pkgs.len());
    for (krate, floor, why) in FLOORS {
        let versions: Vec<_> = pkgs.iter().filter(|(n, _)| n == krate).collect();
        assert!(!versions.is_empty(), "{krate} is not in Cargo.lock");
        for (_, v) in versions {
            let got = semver(v).unwrap_or_else(|| panic!("unparsable version {v} of {krate}"));
            assert!(
                got >= *floor,
                "{krate} {v} is below {}.{}.{}: {why}; run `cargo update -p {krate}`",
                floor[0],
                floor[1],
                floor[2]
            );
        }
    }
    // The parser itself: a version below the floor is caught.
    let old = locked_packages("[[package]]\nname = \"rustls\"\nversion = \"0.23.44\"\n");
    assert!(semver(&old[0].1).unwrap() < [0, 23, 45]);
    Ok(())
}

/// A certificate for `site` issued by the fleet's own CA (re-read from `certs/ca.pem` and
/// `certs/ca.key`) whose validity ended yesterday.
fn expired_site_cert(fleet_dir: &std::path::Path, site: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    use rcgen::*;
    let ca_pem = String::from_utf8(read_cert(fleet_dir, "ca.pem")?)?;
    let ca_key = KeyPair::from_pem(&String::from_utf8(read_cert(fleet_dir, "ca.key")?)?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name.push(DnType::CommonName, site);
    leaf.subject_alt_names = vec![SanType::URI(identity::site_uri(site).try_into()?)];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    leaf.not_before = now - time::Duration::days(30);
    leaf.not_after = now - time::Duration::days(1);
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}

/// Opens a session with `cfg` and says hello as `site`; returns what central answered, or the
/// error that ended the attempt.
async fn try_hello(addr: SocketAddr, cfg: quinn::ClientConfig, site: &str) -> Result<CentralMsg> {
    let mut s = open(addr, cfg).await?;
    s.send(&quic_client::hello(site, PROTOCOL_VERSION, 0))
        .await?;
    s.recv().await
}

fn assert_refused(what: &str, r: Result<CentralMsg>, reason: &str) {
    match r {
        Ok(msg) => panic!("{what}: central answered with {msg:?}"),
        Err(e) => {
            let text = format!("{e:#}");
            eprintln!("{what}: refused as expected: {text}");
            assert!(
                !text.contains("timed out") && !text.contains("deadline"),
                "{what}: the refusal must be an explicit TLS/connection error, not a timeout: {text}"
            );
            assert!(
                text.contains(reason),
                "{what}: the error names {reason:?}: {text}"
            );
        }
    }
}

/// Goal: without a client certificate, or with an expired one issued by the fleet CA itself, there
/// is no session and nothing is stored. Method: a hand-rolled client tries each and must get an
/// explicit error (with TLS 1.3 the client's handshake may complete before the server rejects its
/// certificate, so the refusal is asserted on the first exchange); central's feed stays empty; the
/// site's valid certificate then gets a welcome (positive control, so the test can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_and_an_expired_certificate_are_refused() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let c = Api::new(&central);
    let addr: SocketAddr = central.ready.quic.clone().context("quic")?.parse()?;
    let ca = read_cert(fleet.path(), "ca.pem")?;

    assert_refused(
        "no client certificate",
        try_hello(addr, client_config_without_certificate(&ca)?, "plant-1").await,
        "no certificates",
    );

    let (cert, key) = expired_site_cert(fleet.path(), "plant-1")?;
    assert_refused(
        "expired certificate",
        try_hello(addr, client_config(&ca, &cert, &key)?, "plant-1").await,
        "expired",
    );

    assert!(
        read_feed(&c).await?.is_empty(),
        "nothing stored from refused sessions"
    );

    let good = try_hello(
        addr,
        site_client_config(fleet.path(), "plant-1")?,
        "plant-1",
    )
    .await?;
    assert!(
        matches!(good, CentralMsg::Welcome(_)),
        "positive control: {good:?}"
    );
    Ok(())
}

/// POSTs raw bytes with the agent's token; returns the status and the parsed JSON body (which must
/// be JSON: every error of the local API is `{"error": {"code", "message"}}`).
async fn post_raw(api: &Api, path: &str, body: Vec<u8>, idem: Option<&str>) -> Result<Resp> {
    let mut rb = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.token)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = idem {
        rb = rb.header("Idempotency-Key", k);
    }
    let r = rb.send().await?;
    let status = r.status().as_u16();
    let bytes = r.bytes().await?;
    let body = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "non-JSON answer {status} to {path}: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    Ok(Resp { status, body })
}

async fn last_seq(agent: &Api) -> Result<u64> {
    health(agent)
        .await?
        .get("last_seq")
        .and_then(Value::as_u64)
        .context("health has last_seq")
}

/// Goal: hostile input on the local API is refused with a 4xx and a machine-readable code, stores
/// nothing, and never takes the process down. Method: a real agent gets orders and milestones with
/// very long ids, unicode edge cases (NUL, bidi override, lone surrogate escapes, non-characters),
/// huge numbers (1e30, 2^63, i64::MAX, i64::MIN), wrong types and JSON nested 10,000 deep; after each, the
/// answer must be 4xx with `error.code`, the site's `last_seq` unchanged and `/v1/health` answering.
/// A valid milestone and a valid order at the end must each raise `last_seq` (positive control
/// for the "nothing stored" check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_local_api_input_is_refused_and_stores_nothing() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("quic")?;
    let agent = fleet.start_agent("plant-1", &quic, &[])?;
    let a = Api::new(&agent);
    // Real master data, so that refusals come from input validation, not from unknown SKUs.
    let rev = push_demo_master(&Api::new(&central), &["plant-1"]).await?;
    wait_master(&a, rev).await?;
    let before = last_seq(&a).await?;

    let long = "x".repeat(20_000);
    let order = |customer: Value, sku: Value, qty: Value| {
        serde_json::to_vec(&json!({"customer_id": customer, "lines": [{"sku": sku, "qty": qty}]}))
            .unwrap()
    };
    let milestone = |event_id: &str| {
        serde_json::to_vec(&json!({
            "event_id": event_id,
            "milestone": "picked",
            "scanner_id": "scan-1",
            "at": "2026-01-01T00:00:00Z",
        }))
        .unwrap()
    };
    let nested = format!(
        "{{\"customer_id\":{}1{},\"lines\":[]}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let orders: Vec<(&str, Vec<u8>)> = vec![
        (
            "very long customer id",
            order(json!(long), json!("BOLT-M8"), json!(1)),
        ),
        ("very long sku", order(json!("ACME"), json!(long), json!(1))),
        (
            "NUL in id",
            order(json!("C\u{0}1"), json!("BOLT-M8"), json!(1)),
        ),
        (
            "bidi override in id",
            order(json!("C\u{202e}1"), json!("BOLT-M8"), json!(1)),
        ),
        (
            "non-character in id",
            order(json!("C\u{fffe}"), json!("BOLT-M8"), json!(1)),
        ),
        (
            "emoji and combining marks in sku",
            order(json!("ACME"), json!("S\u{301}\u{1f600}"), json!(1)),
        ),
        ("empty id", order(json!(""), json!("BOLT-M8"), json!(1))),
        (
            "lone surrogate escape",
            br#"{"customer_id":"\ud800","lines":[{"sku":"BOLT-M8","qty":1}]}"#.to_vec(),
        ),
        (
            "invalid UTF-8",
            b"{\"customer_id\":\"\xff\xfe\",\"lines\":[]}".to_vec(),
        ),
        (
            "qty 1e30",
            order(json!("ACME"), json!("BOLT-M8"), json!(1e30)),
        ),
        (
            "qty 2^63",
            br#"{"customer_id":"ACME","lines":[{"sku":"BOLT-M8","qty":9223372036854775808}]}"#
                .to_vec(),
        ),
        (
            "qty i64::MAX",
            order(json!("ACME"), json!("BOLT-M8"), json!(i64::MAX)),
        ),
        (
            "qty i64::MIN",
            order(json!("ACME"), json!("BOLT-M8"), json!(i64::MIN)),
        ),
        ("qty 0", order(json!("ACME"), json!("BOLT-M8"), json!(0))),
        (
            "qty negative",
            order(json!("ACME"), json!("BOLT-M8"), json!(-5)),
        ),
        (
            "qty fractional",
            order(json!("ACME"), json!("BOLT-M8"), json!(1.5)),
        ),
        (
            "qty as a string",
            order(json!("ACME"), json!("BOLT-M8"), json!("3")),
        ),
        (
            "customer id as a number",
            order(json!(5), json!("BOLT-M8"), json!(1)),
        ),
        (
            "lines as an object",
            br#"{"customer_id":"ACME","lines":{"sku":"BOLT-M8"}}"#.to_vec(),
        ),
        ("no lines", br#"{"customer_id":"ACME","lines":[]}"#.to_vec()),
        (
            "unknown field",
            br#"{"customer_id":"ACME","lines":[],"admin":true}"#.to_vec(),
        ),
        ("top-level array", b"[1,2,3]".to_vec()),
        ("top-level null", b"null".to_vec()),
        (
            "truncated JSON",
            br#"{"customer_id":"ACME","lines":[{"sku""#.to_vec(),
        ),
        ("deeply nested JSON", nested.into_bytes()),
    ];
    let mut cases = 0;
    for (what, body) in orders {
        let r = post_raw(&a, "/v1/orders", body, Some(&format!("sec-{cases}"))).await?;
        check_refused(what, &r);
        cases += 1;
    }
    let long_key = "k".repeat(10_000);
    let r = post_raw(
        &a,
        "/v1/orders",
        order(json!("ACME"), json!("BOLT-M8"), json!(1)),
        Some(&long_key),
    )
    .await?;
    check_refused("very long idempotency key", &r);

    let long_shipment = format!("/v1/shipments/{}/milestones", "s".repeat(5_000));
    let milestone_cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("very long shipment id", long_shipment, milestone("ev-1")),
        ("very long event id", "/v1/shipments/S1/milestones".into(), milestone(&long)),
        ("bidi override in event id", "/v1/shipments/S1/milestones".into(), milestone("e\u{202e}1")),
        (
            "unknown milestone",
            "/v1/shipments/S1/milestones".into(),
            br#"{"event_id":"e1","milestone":"teleported","scanner_id":"s","at":"2026-01-01T00:00:00Z"}"#.to_vec(),
        ),
        (
            "timestamp as a huge number",
            "/v1/shipments/S1/milestones".into(),
            br#"{"event_id":"e1","milestone":"picked","scanner_id":"s","at":1e308}"#.to_vec(),
        ),
        (
            "percent-encoded NUL in shipment id",
            "/v1/shipments/S%001/milestones".into(),
            milestone("ev-2"),
        ),
    ];
    for (what, path, body) in milestone_cases {
        let r = post_raw(&a, &path, body, Some("sec-m")).await?;
        check_refused(what, &r);
        cases += 1;
    }
    assert_eq!(
        last_seq(&a).await?,
        before,
        "nothing stored after {cases} hostile requests"
    );
    assert_eq!(
        health(&a).await?["site"],
        json!("plant-1"),
        "agent still up"
    );

    // Positive control: a valid milestone is stored and moves last_seq.
    let r = post_raw(
        &a,
        "/v1/shipments/S1/milestones",
        milestone("ev-ok"),
        Some("sec-ok"),
    )
    .await?;
    assert!(r.status / 100 == 2, "valid milestone accepted: {r:?}");
    assert_eq!(last_seq(&a).await?, before + 1);
    let r = post_raw(
        &a,
        "/v1/orders",
        order(json!("ACME"), json!("BOLT-M8"), json!(1)),
        Some("sec-order-ok"),
    )
    .await?;
    assert!(r.status / 100 == 2, "valid order accepted: {r:?}");
    assert_eq!(last_seq(&a).await?, before + 2);
    Ok(())
}

fn check_refused(what: &str, r: &Resp) {
    assert!(
        (400..500).contains(&r.status),
        "{what}: expected a 4xx, got {} {}",
        r.status,
        r.body
    );
    let code = r.body["error"]["code"].as_str().unwrap_or("");
    eprintln!("{what}: {} {code}", r.status);
    assert!(
        !code.is_empty(),
        "{what}: the error carries a code: {}",
        r.body
    );
}

/// A client config for plant-1 that offers 0-RTT whenever it holds a ticket allowing it.
fn early_data_client(fleet_dir: &std::path::Path) -> Result<quinn::ClientConfig> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &read_cert(fleet_dir, "ca.pem")?[..]) {
        roots.add(c?)?;
    }
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &read_cert(fleet_dir, "plant-1.pem")?[..])
            .collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut &read_cert(fleet_dir, "plant-1.key")?[..])?
            .context("key")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = true;
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    Ok(quinn::ClientConfig::new(std::sync::Arc::new(q)))
}

/// A stand-in server with central's certificate and the fleet CA that *does* allow 0-RTT
/// (`max_early_data_size = u32::MAX`), to show the client below can get 0-RTT when offered.
fn early_data_server(fleet_dir: &std::path::Path) -> Result<quinn::Endpoint> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &read_cert(fleet_dir, "ca.pem")?[..]) {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &read_cert(fleet_dir, "central.pem")?[..])
            .collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut &read_cert(fleet_dir, "central.key")?[..])?
            .context("key")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = u32::MAX;
    let q = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let ep = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(q)),
        "127.0.0.1:0".parse()?,
    )?;
    let acceptor = ep.clone();
    tokio::spawn(async move {
        while let Some(inc) = acceptor.accept().await {
            tokio::spawn(async move {
                if let Ok(c) = inc.await {
                    // Answer one stream so the client knows the handshake (and its session
                    // ticket) went through, then hold the connection until the client closes.
                    if let Ok((mut send, mut recv)) = c.accept_bi().await {
                        let _ = recv.read_to_end(64).await;
                        let _ = send.write_all(b"ok").await;
                        let _ = send.finish();
                    }
                    c.closed().await;
                }
            });
        }
    });
    Ok(ep)
}

/// Connects twice with the same client config (so the second attempt holds the first's session
/// ticket) and returns whether the second connection could send 0-RTT data.
async fn second_connection_gets_0rtt(
    addr: SocketAddr,
    cfg: quinn::ClientConfig,
    first_exchange: impl AsyncFnOnce(&quinn::Connection) -> Result<()>,
) -> Result<bool> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = tokio::time::timeout(
        quic_client::STEP,
        endpoint.connect_with(cfg.clone(), addr, "central.outpost.local")?,
    )
    .await??;
    first_exchange(&conn).await?;
    conn.close(0u32.into(), b"done");
    let connecting = endpoint.connect_with(cfg, addr, "central.outpost.local")?;
    let zero_rtt = match connecting.into_0rtt() {
        Ok((conn, accepted)) => {
            // 0-RTT was offered; whether the server took it is `accepted`.
            let accepted = tokio::time::timeout(quic_client::STEP, accepted).await?;
            conn.close(0u32.into(), b"done");
            accepted
        }
        Err(connecting) => {
            // No ticket allowing early data: a full handshake, which must still succeed
            // (the refusal of 0-RTT is not a refusal of the site).
            let conn = tokio::time::timeout(quic_client::STEP, connecting).await??;
            conn.close(0u32.into(), b"done");
            false
        }
    };
    endpoint.wait_idle().await;
    Ok(zero_rtt)
}

/// Goal: central never accepts 0-RTT (early data is replayable: a captured `Events` frame could be
/// replayed). Method: a client with early data enabled connects to central, completes a hello and
/// welcome (so it holds central's session ticket), and reconnects: it must not be able to send
/// 0-RTT, while the reconnect itself succeeds. Positive control: the same client against a
/// stand-in server that allows early data does get 0-RTT accepted, so the assertion can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_is_never_accepted_by_central() -> Result<()> {
    let fleet = Fleet::init(1)?;

    let control = early_data_server(fleet.path())?;
    let got = second_connection_gets_0rtt(
        control.local_addr()?,
        early_data_client(fleet.path())?,
        async |c: &quinn::Connection| {
            let (mut send, mut recv) = c.open_bi().await?;
            send.write_all(b"hi").await?;
            send.finish()?;
            tokio::time::timeout(quic_client::STEP, recv.read_to_end(64)).await??;
            Ok(())
        },
    )
    .await?;
    assert!(
        got,
        "positive control: a server allowing early data accepts 0-RTT"
    );

    let central = fleet.start_central(None)?;
    let addr: SocketAddr = central.ready.quic.clone().context("quic")?.parse()?;
    let got = second_connection_gets_0rtt(
        addr,
        early_data_client(fleet.path())?,
        async |c: &quinn::Connection| {
            let (mut send, mut recv) = c.open_bi().await?;
            outpost_protocol::io::write_frame(
                &mut send,
                &quic_client::hello("plant-1", PROTOCOL_VERSION, 0),
            )
            .await?;
            let msg: Option<CentralMsg> = tokio::time::timeout(
                quic_client::STEP,
                outpost_protocol::io::read_frame(&mut recv),
            )
            .await??;
            anyhow::ensure!(
                matches!(msg, Some(CentralMsg::Welcome(_))),
                "no welcome: {msg:?}"
            );
            Ok(())
        },
    )
    .await?;
    assert!(!got, "central accepted 0-RTT data");
    Ok(())
}
