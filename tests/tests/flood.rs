//! Central under a QUIC flood from one address, tested with real processes: while one UDP
//! address floods central's QUIC port with handshakes that present no client certificate and
//! with junk datagrams, a real agent's uploads still reach the feed, and central's resident
//! memory stays under its configured `quic.memory_limit_mib`. Prints the figures.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_tests::quic_client::{client_config_without_certificate, read_cert};
use outpost_tests::*;
use serde_json::json;

/// The memory limit central runs with in this test.
const MEMORY_LIMIT_MIB: u64 = 192;
/// Handshakes central lets one address have in flight in this test (the rest are refused).
const MAX_HANDSHAKES_PER_IP: usize = 8;
/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(5);
/// Handshake attempts in flight at once from the flooding socket, and at most in total.
const HANDSHAKE_CONCURRENCY: usize = 64;
const MAX_HANDSHAKES: u64 = 20_000;
/// Limit on one flooding handshake (connect, open a stream, read).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Junk datagrams: size, per burst, burst interval (at most 40,000 datagrams/s; sleep granularity
/// makes it less, the count sent is printed), and a total cap.
const JUNK_SIZE: usize = 1_200;
const JUNK_BURST: usize = 200;
const JUNK_INTERVAL: Duration = Duration::from_millis(5);
const MAX_JUNK: u64 = 1_000_000;
/// Milestones the agent uploads during the flood, and how long they may take to reach the feed.
const MILESTONES: usize = 200;
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);
/// The flooding address: another loopback address, so that the agent (127.0.0.1) is a different
/// source for central's per-address limit, as a real site would be.
const FLOOD_IP: &str = "127.0.0.2";
/// How often central's RSS is sampled from /proc.
const RSS_SAMPLE: Duration = Duration::from_millis(50);

/// Resident set size of `pid` in bytes, from /proc/PID/status (`VmRSS`).
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[derive(Default)]
struct HandshakeStats {
    attempted: AtomicU64,
    /// Refused by central before the handshake (CONNECTION_REFUSED).
    refused: AtomicU64,
    /// Failed otherwise: certificate required, closed, timed out.
    failed: AtomicU64,
    /// Got a stream answer: must stay 0 without a client certificate.
    admitted: AtomicU64,
}

/// One handshake without a client certificate, driven until central ends it.
async fn one_handshake(
    endpoint: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    stats: Arc<HandshakeStats>,
) {
    stats.attempted.fetch_add(1, Ordering::Relaxed);
    let attempt = async {
        let conn = endpoint
            .connect_with(cfg, addr, "central.outpost.local")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // With TLS 1.3 the client may finish before central rejects the missing certificate:
        // the refusal shows on the first stream operation.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"not a frame")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match recv.read(&mut buf).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("stream finished".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
        Ok(Ok(())) => stats.admitted.fetch_add(1, Ordering::Relaxed),
        Ok(Err(e)) if e.to_lowercase().contains("refused") => {
            stats.refused.fetch_add(1, Ordering::Relaxed)
        }
        _ => stats.failed.fetch_add(1, Ordering::Relaxed),
    };
}

/// Floods `addr` with handshakes from one UDP socket until `until`, `HANDSHAKE_CONCURRENCY` in
/// flight, at most `MAX_HANDSHAKES`.
async fn handshake_flood(
    addr: SocketAddr,
    cfg: quinn::ClientConfig,
    until: Instant,
    stats: Arc<HandshakeStats>,
) -> Result<()> {
    let endpoint = quinn::Endpoint::client(format!("{FLOOD_IP}:0").parse()?)?;
    let mut inflight = tokio::task::JoinSet::new();
    while Instant::now() < until && stats.attempted.load(Ordering::Relaxed) < MAX_HANDSHAKES {
        if inflight.len() >= HANDSHAKE_CONCURRENCY {
            inflight.join_next().await;
            continue;
        }
        inflight.spawn(one_handshake(
            endpoint.clone(),
            cfg.clone(),
            addr,
            stats.clone(),
        ));
    }
    // Every attempt is bounded by HANDSHAKE_TIMEOUT.
    while inflight.join_next().await.is_some() {}
    endpoint.close(0u32.into(), b"flood over");
    Ok(())
}

/// Sends junk datagrams to `addr` from one socket until `until` (bounded by `MAX_JUNK`): random
/// bytes, half of them dressed as QUIC v1 Initial packets so central must try to open them.
fn junk_flood(addr: SocketAddr, until: Instant) -> Result<u64> {
    let sock = UdpSocket::bind(format!("{FLOOD_IP}:0"))?;
    let mut sent = 0u64;
    let mut buf = vec![0u8; JUNK_SIZE];
    while Instant::now() < until && sent < MAX_JUNK {
        for _ in 0..JUNK_BURST {
            rand::fill(&mut buf[..]);
            if sent.is_multiple_of(2) {
                // Long header, Initial, version 1, 8-byte connection ids.
                buf[0] = 0xc0 | (buf[0] & 0x0f);
                buf[1..5].copy_from_slice(&1u32.to_be_bytes());
                buf[5] = 8;
                buf[14] = 8;
            }
            // A full socket buffer drops datagrams: that is what a flood is.
            if sock.send_to(&buf, addr).is_ok() {
                sent += 1;
            }
        }
        // The flood's pacing (the stimulus), not a wait for a condition.
        std::thread::sleep(JUNK_INTERVAL);
    }
    Ok(sent)
}

/// Goal: a flood of certificate-less handshakes and junk datagrams from one address neither
/// starves a real site nor grows central's memory past its configured limit.
/// Method: central with `quic.memory_limit_mib = 192` and 8 handshakes per address; one agent
/// connected; for 5 s flood central's QUIC port from 127.0.0.2 (one quinn client socket with up
/// to 64 handshakes in flight, one raw UDP socket sending up to 40k junk datagrams/s) while 200
/// milestones are posted to the agent; wait (bounded) until all 200 are in central's feed;
/// sample central's RSS from /proc throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_flood_from_one_address_does_not_starve_sites_or_grow_memory() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central_with(
        None,
        &[
            (
                "OUTPOST_QUIC__MEMORY_LIMIT_MIB",
                MEMORY_LIMIT_MIB.to_string(),
            ),
            (
                "OUTPOST_QUIC__MAX_HANDSHAKES_PER_IP",
                MAX_HANDSHAKES_PER_IP.to_string(),
            ),
        ],
    )?;
    let quic: SocketAddr = central
        .ready
        .quic
        .clone()
        .context("central quic address")?
        .parse()?;
    let c = Api::new(&central);
    let agent = fleet.start_agent("plant-1", &quic.to_string(), &[])?;
    let a = Api::new(&agent);
    wait_connected(&a, true).await?;

    // RSS sampler: runs until told to stop; bounded by the test's own deadlines.
    let pid = central.child.id();
    let baseline = rss_bytes(pid).context("central's RSS is readable")?;
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss_bytes(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                    samples += 1;
                }
                // The sampling interval of the RSS probe, which runs until told to stop.
                tokio::time::sleep(RSS_SAMPLE).await;
            }
            samples
        })
    };

    let ca = read_cert(fleet.path(), "ca.pem")?;
    let cfg = client_config_without_certificate(&ca)?;
    let start = Instant::now();
    let until = start + FLOOD;
    let stats = Arc::new(HandshakeStats::default());
    let handshakes = tokio::spawn(handshake_flood(quic, cfg, until, stats.clone()));
    let junk = tokio::task::spawn_blocking(move || junk_flood(quic, until));

    // The site's work during the flood.
    let mut ids = Vec::with_capacity(MILESTONES);
    for i in 0..MILESTONES {
        let id = format!("flood-{i}");
        let body = json!({"event_id": id, "milestone": "loaded", "scanner_id": "scanner-1",
                          "at": "2026-11-26T10:00:00Z"});
        let r = a
            .post(
                &format!("/v1/shipments/SH-{}/milestones", i / 10),
                &body,
                None,
            )
            .await?;
        if r.status / 100 != 2 {
            bail!("milestone {id}: {} {}", r.status, r.body);
        }
        ids.push(id);
    }
    let posted_after = start.elapsed();
    let delivered = eventually(
        "all 200 milestones in central's feed",
        DELIVERY_DEADLINE,
        || async {
            let feed = read_feed(&c).await?;
            let n = feed
                .iter()
                .filter(|e| e["site"] == "plant-1" && e["kind"] == "milestone")
                .count();
            Ok((n >= MILESTONES).then_some(feed))
        },
    )
    .await?;
    let delivered_after = start.elapsed();
    handshakes.await??;
    let junk_sent = junk.await??;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await?;

    let mut got: Vec<&str> = delivered
        .iter()
        .filter(|e| e["site"] == "plant-1")
        .filter_map(|e| e["id"].as_str())
        .collect();
    got.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(got, want, "every milestone exactly once");

    let peak = peak.load(Ordering::Relaxed);
    let attempted = stats.attempted.load(Ordering::Relaxed);
    let refused = stats.refused.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    let admitted = stats.admitted.load(Ordering::Relaxed);
    let limit_warnings = std::fs::read_to_string(&central.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("max_handshakes_per_ip"))
        .count();
    println!(
        "flood: {attempted} handshakes attempted without a client certificate \
         ({refused} refused before the handshake, {failed} failed, {admitted} admitted); \
         {junk_sent} junk datagrams sent; {limit_warnings} rate-limited refusal warnings logged"
    );
    println!(
        "flood: central RSS baseline {:.1} MiB, peak {:.1} MiB (limit {MEMORY_LIMIT_MIB} MiB, \
         {samples} samples); 200 milestones posted in {posted_after:?}, all in the feed after \
         {delivered_after:?}",
        baseline as f64 / 1048576.0,
        peak as f64 / 1048576.0,
    );
    assert_eq!(
        admitted, 0,
        "no connection without a certificate gets a session"
    );
    assert!(
        attempted > 100,
        "the flood really ran: {attempted} handshakes"
    );
    assert!(
        refused > 0,
        "quic.max_handshakes_per_ip refused none of {attempted} handshakes from one address"
    );
    assert!(
        junk_sent > 10_000,
        "the flood really ran: {junk_sent} datagrams"
    );
    assert!(
        peak < MEMORY_LIMIT_MIB * 1024 * 1024,
        "central's RSS peaked at {peak} bytes, above {MEMORY_LIMIT_MIB} MiB"
    );
    let h = health(&a).await?;
    assert_eq!(h["connected"], true, "the site is still connected: {h}");
    Ok(())
}
