//! End-to-end test of trace ids (issue 5): an order's W3C trace id is taken from the client's
//! `traceparent` (or made at the site), returned to the client, carried in the event envelope to
//! central's feed, and found in the JSON logs of both processes. Real processes, real QUIC + mTLS.

use std::path::Path;

use anyhow::{Context, Result, bail};
use outpost_tests::*;
use serde_json::{Value, json};

/// The client's trace (W3C's own example id).
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Debug for our crates, so the per-event store, upload and ingest lines are written.
const RUST_LOG: &str = "info,outpost_agent=debug,outpost_central=debug";

fn json_logs() -> Vec<(&'static str, String)> {
    vec![
        ("RUST_LOG", RUST_LOG.to_string()),
        ("OUTPOST_LOG__FORMAT", "json".to_string()),
    ]
}

/// Posts an order, with `traceparent` when given; returns the body and the `traceresponse`.
async fn post_order(
    a: &Api,
    key: &str,
    traceparent: Option<&str>,
) -> Result<(Value, Option<String>)> {
    let body = json!({"customer_id": "ACME", "lines": [{"sku": "GEAR-12T", "qty": 1}]});
    let mut rb = a
        .http
        .post(format!("{}/v1/orders", a.base))
        .bearer_auth(&a.token)
        .header("Idempotency-Key", key)
        .json(&body);
    if let Some(tp) = traceparent {
        rb = rb.header("traceparent", tp);
    }
    let r = rb.send().await?;
    if r.status().as_u16() != 201 {
        bail!(
            "POST /v1/orders returned {}: {}",
            r.status(),
            r.text().await?
        );
    }
    let header = r
        .headers()
        .get("traceresponse")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((r.json().await?, header))
}

/// Every JSON line of a process log (other lines, if any, are skipped).
fn json_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Whether a JSON log line carries `trace_id`: as an event field or in one of its spans.
fn carries(line: &Value, trace_id: &str) -> bool {
    line["trace_id"] == trace_id
        || line["span"]["trace_id"] == trace_id
        || line["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|sp| sp["trace_id"] == trace_id))
}

/// Waits (bounded) until `log` has a JSON line with `message` that carries `trace_id`.
async fn wait_log_line(log: &Path, message: &str, trace_id: &str) -> Result<Value> {
    eventually(
        &format!(
            "a log line {message:?} with trace {trace_id} in {}",
            log.display()
        ),
        CONVERGE_TIMEOUT,
        || async {
            Ok(json_lines(log)
                .into_iter()
                .find(|l| l["message"] == message && carries(l, trace_id)))
        },
    )
    .await
}

/// Goal: one order can be followed by its trace id from the client through the agent's and
/// central's logs into the event feed, whether the client sent a `traceparent` or not, and a
/// retry returns the original trace id.
/// Method: a one-site fleet with JSON logs at debug; post one order with a known `traceparent`
/// and one without (then retry it under another trace); wait until both are in central's feed;
/// check the feed items, the responses and both processes' JSON log lines for the trace ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_followed_by_its_trace_id_through_both_logs_and_the_feed() -> Result<()> {
    let fleet = Fleet::init(1)?;
    let central = fleet.start_central_with(None, &json_logs())?;
    let quic = central.ready.quic.clone().context("central quic address")?;
    let c = Api::new(&central);
    let agent = fleet.start_agent("plant-1", &quic, &json_logs())?;
    let a = Api::new(&agent);
    let rev = push_demo_master(&c, &["plant-1"]).await?;
    wait_master(&a, rev).await?;

    // With the client's trace: the order is recorded under it.
    let (given, header) = post_order(&a, "trace-given", Some(CLIENT_TRACEPARENT)).await?;
    assert_eq!(given["trace_id"], CLIENT_TRACE, "{given}");
    let header = header.context("traceresponse header")?;
    assert!(
        header.starts_with(&format!("00-{CLIENT_TRACE}-")),
        "{header}"
    );

    // Without one: a fresh, well-formed id, different from the client's.
    let (fresh, header) = post_order(&a, "trace-fresh", None).await?;
    let fresh_trace = fresh["trace_id"].as_str().context("trace_id")?.to_string();
    assert!(
        outpost_protocol::validate_trace_id(&fresh_trace).is_ok(),
        "{fresh}"
    );
    assert_ne!(fresh_trace, CLIENT_TRACE);
    assert!(
        header.is_some_and(|h| h.contains(&fresh_trace)),
        "traceresponse names the fresh trace"
    );
    // A retry under another (or a broken) trace is the same request: same order, same trace.
    let (retried, _) = post_order(&a, "trace-fresh", Some(CLIENT_TRACEPARENT)).await?;
    assert_eq!(retried["order_id"], fresh["order_id"]);
    assert_eq!(retried["trace_id"], fresh_trace.as_str());
    // An invalid traceparent is not an error: the trace restarts.
    let (broken, _) = post_order(&a, "trace-broken", Some("00-zz-00f067aa0ba902b7-01")).await?;
    let broken_trace = broken["trace_id"].as_str().context("trace_id")?;
    assert!(outpost_protocol::validate_trace_id(broken_trace).is_ok());

    let orders = [
        (given["order_id"].clone(), CLIENT_TRACE.to_string()),
        (fresh["order_id"].clone(), fresh_trace.clone()),
    ];
    let feed = eventually(
        "both orders in central's feed",
        CONVERGE_TIMEOUT,
        || async {
            let feed = read_feed(&c).await?;
            let all_in = orders
                .iter()
                .all(|(id, _)| feed.iter().any(|e| e["order_id"] == *id));
            Ok(all_in.then_some(feed))
        },
    )
    .await?;
    for (id, trace) in &orders {
        let item = feed
            .iter()
            .find(|e| e["order_id"] == *id)
            .context("feed item")?;
        assert_eq!(item["trace_id"], trace.as_str(), "{item}");
    }

    for (_, trace) in &orders {
        // The agent: the request (its span carries the trace), the outbox write, the upload.
        let captured = wait_log_line(&agent.log, "order captured", trace).await?;
        assert_eq!(captured["span"]["name"], "request", "{captured}");
        let stored =
            wait_log_line(&agent.log, "order added to the outbox transaction", trace).await?;
        assert_eq!(stored["trace_id"], trace.as_str(), "{stored}");
        wait_log_line(&agent.log, "event sent to central", trace).await?;
        // Central: the ingest, with the site and seq beside the trace.
        let ingested = wait_log_line(&central.log, "order ingested into the feed", trace).await?;
        assert_eq!(ingested["site"], "plant-1", "{ingested}");
        assert!(ingested["seq"].as_u64().is_some(), "{ingested}");
    }
    Ok(())
}
