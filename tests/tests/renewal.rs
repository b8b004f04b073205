//! Site certificate renewal over the sync connection: the agent makes a new key, sends central a
//! signing request, installs the certificate central signs and uses it for its next connection,
//! without a restart, without ending the live session and without dropping a local API request.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use outpost_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request on an open HTTP/1.1 keep-alive connection; returns the status.
async fn keep_alive_get(conn: &mut TcpStream, path: &str, token: &str) -> Result<u16> {
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Bounded: a health answer is a few KiB.
    for _ in 0..1_000 {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await??;
        if n == 0 {
            bail!("the agent closed the keep-alive connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len: usize = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .context("content-length")?;
            if buf.len() >= head_end + 4 + len {
                let status: u16 = text[9..12].parse()?;
                return Ok(status);
            }
        }
    }
    bail!("no complete answer")
}

fn days_from_now(rfc3339: &Value) -> Result<i64> {
    let t = time::OffsetDateTime::parse(
        rfc3339.as_str().context("a date")?,
        &time::format_description::well_known::Rfc3339,
    )?;
    Ok((t - time::OffsetDateTime::now_utc()).whole_days())
}

fn connects(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("connected to central")
        .count()
}

/// Goal: a certificate due for renewal is renewed over the live session: new key made at the
/// site (the key file changes, stays 0600), new certificate from central's CA for 500 days
/// (central's `[renewal] site_validity_days`); the session that carried it goes on (one
/// connection in the agent's log, a write acknowledged over it afterwards), a keep-alive HTTP
/// connection opened before the renewal serves a request after it; and the next connection,
/// after central restarts, presents the new certificate (central's fleet view), with no restart
/// of the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_renewed_and_used_without_a_restart() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let certs = fleet.path().join("certs");
    let old_cert = std::fs::read_to_string(certs.join("plant-1.pem"))?;
    let old_key = std::fs::read_to_string(certs.join("plant-1.key"))?;
    let central_env = [
        ("OUTPOST_RENEWAL__SITE_VALIDITY_DAYS", "500".to_string()),
        ("OUTPOST_RENEWAL__MIN_INTERVAL_SECS", "0".to_string()),
    ];
    // Central is not up yet: the keep-alive connection is opened before any renewal can happen.
    let probe = fleet.start_central_with(None, &central_env)?;
    let ready = probe.ready.clone();
    let quic = ready.quic.clone().context("quic")?;
    let mut probe = probe;
    probe.terminate()?;
    let agent = fleet.start_agent(
        "plant-1",
        &quic,
        &[("OUTPOST_SYNC__RENEW_BEFORE_DAYS", "400".to_string())],
    )?;
    let aapi = Api::new(&agent);
    let mut conn = TcpStream::connect(&agent.ready.api).await?;
    assert_eq!(
        keep_alive_get(&mut conn, "/v1/health", &agent.token).await?,
        200
    );

    let mut central = fleet.start_central_with(Some(&ready), &central_env)?;
    let capi = Api::new(&central);
    let h = eventually(
        "the certificate renewed",
        Duration::from_secs(30),
        || async {
            let h = health(&aapi).await?;
            Ok((h["certificate"]["renewals"] == 1).then_some(h))
        },
    )
    .await?;
    assert_eq!(h["certificate"]["last_renewal_error"], Value::Null, "{h}");
    let left = days_from_now(&h["certificate"]["not_after"])?;
    ensure!((498..=500).contains(&left), "renewed for {left} days: {h}");
    // The first session presented the old certificate (a year).
    let site = capi.get("/v1/fleet/plant-1").await?.body;
    let first = days_from_now(&site["certificate_expires_at"])?;
    ensure!(
        (363..=365).contains(&first),
        "first session's certificate: {site}"
    );

    let new_cert = std::fs::read_to_string(certs.join("plant-1.pem"))?;
    let new_key = std::fs::read_to_string(certs.join("plant-1.key"))?;
    assert_ne!(new_cert, old_cert);
    assert_ne!(new_key, old_key, "a new key was made at the site");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(certs.join("plant-1.key"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // The key never went to central: it is in no file central wrote.
    let body: String = new_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for entry in std::fs::read_dir(fleet.path().join("logs"))? {
        let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        assert!(!text.contains(&body[..40]), "the key appears in a log");
    }

    // The session that carried the renewal goes on, and so does the HTTP connection.
    assert_eq!(
        keep_alive_get(&mut conn, "/v1/health", &agent.token).await?,
        200
    );
    let ids = post_milestones(&aapi, "after-renewal", 2).await?;
    wait_drained(&aapi).await?;
    assert_eq!(
        connects(&agent.log),
        1,
        "one session for the renewal and the writes"
    );
    let feed = read_feed(&capi).await?;
    for id in &ids {
        ensure!(
            feed.iter().any(|e| e["id"] == id.as_str()),
            "{id} not in the feed"
        );
    }

    // The next connection uses the renewed certificate, loaded without restarting the agent.
    central.terminate()?;
    wait_connected(&aapi, false).await?;
    let central = fleet.start_central_with(Some(&ready), &central_env)?;
    let capi = Api::new(&central);
    wait_connected(&aapi, true).await?;
    assert_eq!(connects(&agent.log), 2);
    let site = capi.get("/v1/fleet/plant-1").await?.body;
    let second = days_from_now(&site["certificate_expires_at"])?;
    ensure!(
        (498..=500).contains(&second),
        "second session's certificate: {site}"
    );
    // Not due any more: no second renewal.
    assert_eq!(health(&aapi).await?["certificate"]["renewals"], 1);
    assert_eq!(
        keep_alive_get(&mut conn, "/v1/health", &agent.token).await?,
        200
    );
    Ok(())
}

/// Goal: a central without the CA key refuses the renewal with the reason; the agent keeps its
/// certificate and its session, and says why in its health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_without_the_ca_key_refuses_and_the_site_keeps_its_certificate() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let certs = fleet.path().join("certs");
    let old_cert = std::fs::read_to_string(certs.join("plant-1.pem"))?;
    // `[renewal] ca_dir` pointed at a directory without the CA: check-config would refuse it,
    // so the key is removed from the configured directory after central started instead.
    let ca_copy = fleet.path().join("ca-copy");
    std::fs::create_dir_all(&ca_copy)?;
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(certs.join(f), ca_copy.join(f))?;
    }
    let central = fleet.start_central_with(
        None,
        &[("OUTPOST_RENEWAL__CA_DIR", ca_copy.display().to_string())],
    )?;
    std::fs::remove_file(ca_copy.join("ca.key"))?;
    let quic = central.ready.quic.clone().context("quic")?;
    let agent = fleet.start_agent(
        "plant-1",
        &quic,
        &[("OUTPOST_SYNC__RENEW_BEFORE_DAYS", "400".to_string())],
    )?;
    let aapi = Api::new(&agent);
    let h = eventually("the renewal refused", Duration::from_secs(30), || async {
        let h = health(&aapi).await?;
        Ok(h["certificate"]["last_renewal_error"]
            .as_str()
            .is_some()
            .then_some(h))
    })
    .await?;
    let why = h["certificate"]["last_renewal_error"]
        .as_str()
        .unwrap_or("");
    assert!(
        why.contains("central refused") && why.contains("CA"),
        "{why}"
    );
    assert_eq!(h["certificate"]["renewals"], 0);
    assert_eq!(h["connected"], true, "{h}");
    assert_eq!(
        std::fs::read_to_string(certs.join("plant-1.pem"))?,
        old_cert
    );
    let capi = Api::new(&central);
    let text = capi
        .http
        .get(format!("{}/metrics", capi.base))
        .bearer_auth(&capi.token)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        text.contains("outpost_central_certificate_renewals_refused_total 1"),
        "{text}"
    );
    Ok(())
}
