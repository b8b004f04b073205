//! `GET /metrics` on real processes: central and two agents, writes at one site, a sync, then
//! each process's exposition is read by two parsers (the `prometheus-parse` crate and a strict
//! reader of the text format written here, which refuses any line the grammar does not allow and
//! any sample whose family has no TYPE) and specific figures are checked.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail, ensure};
use outpost_tests::*;
use serde_json::json;

/// A series: metric name and its labels, sorted.
type Series = (String, BTreeMap<String, String>);

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_name(s) && !s.contains(':')
}

fn parse_value(s: &str) -> Result<f64> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().with_context(|| format!("bad sample value {s:?}")),
    }
}

/// Parses `{k="v",...}` at the start of `s`; returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').context("labels open with {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let (name, r) = rest.split_once("=\"").context("label name=\"value\"")?;
        ensure!(is_label_name(name), "bad label name {name:?}");
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            let (i, c) = chars.next().context("unterminated label value")?;
            match c {
                '"' => break i,
                '\\' => match chars.next().context("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => bail!("bad escape \\{other}"),
                },
                '\n' => bail!("raw newline in a label value"),
                c => value.push(c),
            }
        };
        ensure!(
            labels.insert(name.to_string(), value).is_none(),
            "label {name} repeated"
        );
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// A strict reader of the Prometheus/OpenMetrics text format as the two processes emit it:
/// `# HELP`, `# TYPE`, `# UNIT` and a final `# EOF`; samples `name{labels} value`; every sample
/// belongs to a family with a TYPE declared before it (a counter's samples end in `_total`); no
/// series twice. Returns each series' value and each family's type.
fn parse_strict(text: &str) -> Result<(HashMap<Series, f64>, HashMap<String, String>)> {
    let mut types = HashMap::<String, String>::new();
    let mut samples = HashMap::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        ensure!(!eof, "{}: text after # EOF", at());
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next(), parts.next());
            let name = name.with_context(at)?;
            ensure!(is_name(name), "{}: bad metric name", at());
            match kind {
                Some("HELP") => {}
                Some("UNIT") => {
                    let unit = parts.next().with_context(at)?;
                    ensure!(name.ends_with(&format!("_{unit}")), "{}: unit", at());
                }
                Some("TYPE") => {
                    let t = parts.next().with_context(at)?;
                    ensure!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "unknown"
                        ]
                        .contains(&t),
                        "{}: bad type",
                        at()
                    );
                    ensure!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "{}: family declared twice",
                        at()
                    );
                }
                _ => bail!("{}: unknown comment line", at()),
            }
            continue;
        }
        ensure!(!line.is_empty(), "{}: empty line", at());
        let name_end = line.find(['{', ' ']).with_context(at)?;
        let name = &line[..name_end];
        ensure!(is_name(name), "{}: bad metric name", at());
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).with_context(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .with_context(at)?
            .split(' ')
            .filter(|f| !f.is_empty());
        let value = parse_value(fields.next().with_context(at)?).with_context(at)?;
        if let Some(ts) = fields.next() {
            parse_value(ts).with_context(at)?;
        }
        ensure!(fields.next().is_none(), "{}: trailing fields", at());
        let family_ok = match types.get(name).map(String::as_str) {
            Some("counter") => false,
            Some(_) => true,
            None => name
                .strip_suffix("_total")
                .is_some_and(|f| types.get(f).is_some_and(|t| t == "counter")),
        };
        ensure!(family_ok, "{}: sample without a TYPE'd family", at());
        ensure!(
            samples.insert((name.to_string(), labels), value).is_none(),
            "{}: series repeated",
            at()
        );
    }
    ensure!(eof, "the exposition must end with # EOF");
    Ok((samples, types))
}

/// Parses `text` with both parsers and checks that they agree on every sample.
fn parse_both(text: &str) -> Result<HashMap<Series, f64>> {
    let (strict, _) = parse_strict(text).with_context(|| format!("strict parse of:\n{text}"))?;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines)?;
    ensure!(
        scrape.samples.len() == strict.len(),
        "prometheus-parse read {} samples, the strict reader {}",
        scrape.samples.len(),
        strict.len()
    );
    for s in &scrape.samples {
        let labels: BTreeMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => bail!("unexpected sample kind {other:?}"),
        };
        let key = (s.metric.clone(), labels);
        let mine = strict
            .get(&key)
            .with_context(|| format!("{key:?} missing"))?;
        ensure!(*mine == v, "{key:?}: {mine} vs {v}");
    }
    Ok(strict)
}

fn get(m: &HashMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.get(&(name.to_string(), labels))
        .copied()
        .with_context(|| {
            format!(
                "no sample {name}{{{labels:?}}}",
                labels = labels_of(m, name)
            )
        })
}

fn labels_of(m: &HashMap<Series, f64>, name: &str) -> Vec<BTreeMap<String, String>> {
    m.keys()
        .filter(|(n, _)| n == name)
        .map(|(_, l)| l.clone())
        .collect()
}

/// `GET /metrics` with the client's token (or none): status, content type and body.
async fn scrape(api: &Api, token: bool) -> Result<(u16, String, String)> {
    let mut rb = api.http.get(format!("{}/metrics", api.base));
    if token {
        rb = rb.bearer_auth(&api.token);
    }
    let r = rb.send().await?;
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((status, ct, r.text().await?))
}

/// Goal: both processes expose `/metrics` in a format a Prometheus parser reads, with the figures
/// that describe what just happened, one series set per site at central, and no access without
/// a token. Method: central and two agents; 8 writes at plant-1 (5 orders, 3 milestones) synced
/// until the outbox drains; scrape each agent and central, parse, check the figures; then scrape
/// without a token (401) and see the refusal counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_tell_what_happened_on_both_processes() -> Result<()> {
    let fleet = Fleet::init(2)?;
    let central = fleet.start_central(None)?;
    let quic = central.ready.quic.clone().context("central quic address")?;
    let c = Api::new(&central);
    let ids: Vec<String> = fleet.sites.iter().map(|s| s.id.clone()).collect();
    let agents: Vec<Proc> = ids
        .iter()
        .map(|id| fleet.start_agent(id, &quic, &[]))
        .collect::<Result<_>>()?;
    let apis: Vec<Api> = agents.iter().map(Api::new).collect();
    let site_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rev = push_demo_master(&c, &site_refs).await?;
    for a in &apis {
        wait_master(a, rev).await?;
        wait_connected(a, true).await?;
    }

    let a = &apis[0];
    let writes = 8u64;
    for i in 0..5 {
        let body = json!({"customer_id": "ACME", "lines": [{"sku": "GEAR-12T", "qty": 1}]});
        let r = a.post("/v1/orders", &body, Some(&format!("m-{i}"))).await?;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    for i in 0..3 {
        let body = json!({"event_id": format!("scan-{i}"), "milestone": "loaded",
            "scanner_id": "scanner-7", "at": "2026-11-26T10:00:00Z"});
        let r = a.post("/v1/shipments/SH-1/milestones", &body, None).await?;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    wait_drained(a).await?;

    // The agent that wrote.
    let (status, ct, text) = scrape(a, true).await?;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let m = parse_both(&text)?;
    assert_eq!(get(&m, "outpost_agent_outbox_events", &[])?, 0.0, "drained");
    assert_eq!(get(&m, "outpost_agent_last_seq", &[])?, writes as f64);
    assert_eq!(get(&m, "outpost_agent_acked_seq", &[])?, writes as f64);
    assert_eq!(get(&m, "outpost_agent_link_connected", &[])?, 1.0);
    assert_eq!(get(&m, "outpost_agent_central_stale_seconds", &[])?, 0.0);
    assert!(get(&m, "outpost_agent_master_revision", &[])? >= rev as f64);
    assert!(get(&m, "outpost_agent_writer_commits_total", &[])? >= 1.0);
    assert!(get(&m, "outpost_agent_writer_ops_total", &[])? >= writes as f64);
    assert_eq!(
        get(&m, "outpost_agent_writer_failed_groups_total", &[])?,
        0.0
    );
    assert!(get(&m, "outpost_agent_allowance_atp_units", &[])? > 0.0);
    assert!(get(&m, "outpost_agent_api_connections_open", &[])? >= 1.0);
    let build = labels_of(&m, "outpost_agent_build_info");
    assert_eq!(build.len(), 1);
    assert_eq!(build[0]["site"], ids[0]);
    assert!(get(&m, "process_start_time_seconds", &[])? > 1.6e9);
    assert!(get(&m, "process_resident_memory_bytes", &[])? > 0.0);
    let unauthorized = [("reason", "unauthorized")];
    let before = get(
        &m,
        "outpost_agent_api_requests_refused_total",
        &unauthorized,
    )?;
    let errors_before = get(&m, "outpost_agent_api_request_errors_total", &[])?;
    assert!(get(&m, "outpost_agent_api_requests_total", &[])? >= writes as f64);

    // No token: 401, and counted.
    let (status, _, _) = scrape(a, false).await?;
    assert_eq!(status, 401);
    let m = parse_both(&scrape(a, true).await?.2)?;
    assert_eq!(
        get(
            &m,
            "outpost_agent_api_requests_refused_total",
            &unauthorized
        )?,
        before + 1.0
    );
    assert!(get(&m, "outpost_agent_api_request_errors_total", &[])? >= errors_before + 1.0);

    // The agent that did not write.
    let m = parse_both(&scrape(&apis[1], true).await?.2)?;
    assert_eq!(get(&m, "outpost_agent_outbox_events", &[])?, 0.0);
    assert_eq!(get(&m, "outpost_agent_acked_seq", &[])?, 0.0);
    assert_eq!(get(&m, "outpost_agent_link_connected", &[])?, 1.0);

    // Central: one series set per site, fleet-wide figures.
    let (status, ct, text) = scrape(&c, true).await?;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let m = parse_both(&text)?;
    for id in &ids {
        let site = [("site", id.as_str())];
        assert_eq!(
            get(&m, "outpost_central_site_connected", &site)?,
            1.0,
            "{id}"
        );
        assert_eq!(get(&m, "outpost_central_site_revoked", &site)?, 0.0, "{id}");
        let seen = get(
            &m,
            "outpost_central_site_last_seen_timestamp_seconds",
            &site,
        )?;
        assert!(seen > 1.6e9, "{id}: {seen}");
        get(&m, "outpost_central_site_clock_offset_seconds", &site)?;
    }
    let acked = |id: &str| get(&m, "outpost_central_site_acked_seq", &[("site", id)]);
    assert_eq!(acked(&ids[0])?, writes as f64);
    assert_eq!(acked(&ids[1])?, 0.0);
    assert_eq!(
        labels_of(&m, "outpost_central_site_connected").len(),
        ids.len(),
        "one series per site, nothing else"
    );
    assert_eq!(get(&m, "outpost_central_sites", &[])?, ids.len() as f64);
    assert_eq!(
        get(&m, "outpost_central_live_sessions", &[])?,
        ids.len() as f64
    );
    assert!(get(&m, "outpost_central_master_revision", &[])? >= rev as f64);
    let feed = get(&m, "outpost_central_feed_events", &[])?;
    let exceptions = get(&m, "outpost_central_exceptions", &[])?;
    assert_eq!(
        feed + exceptions,
        writes as f64,
        "every write reached central"
    );
    assert_eq!(get(&m, "outpost_central_dead_letters", &[])?, 0.0);
    for reason in ["max_connections", "handshakes_per_ip", "memory_limit"] {
        let v = get(
            &m,
            "outpost_central_quic_connections_refused_total",
            &[("reason", reason)],
        )?;
        assert_eq!(v, 0.0, "{reason}");
    }
    assert!(get(&m, "process_resident_memory_bytes", &[])? > 0.0);
    // No per-order or per-event label anywhere.
    for (name, labels) in m.keys() {
        for k in labels.keys() {
            assert!(
                ["site", "reason", "version"].contains(&k.as_str()),
                "{name} has an unexpected label {k}"
            );
        }
    }
    let (status, _, _) = scrape(&c, false).await?;
    assert_eq!(status, 401);
    Ok(())
}

/// The strict reader refuses what the grammar does not allow (so that its passing means
/// something).
#[test]
fn the_strict_reader_refuses_malformed_expositions() {
    let good = "# TYPE a counter\na_total{x=\"1\"} 2\n# TYPE b gauge\nb 1.5\n# EOF\n";
    let (m, _) = parse_strict(good).unwrap();
    assert_eq!(m.len(), 2);
    for bad in [
        "b 1\n# EOF\n",                                 // no TYPE
        "# TYPE a counter\na 1\n# EOF\n",               // counter sample without _total
        "# TYPE b gauge\nb{x=\"1} 1\n# EOF\n",          // unterminated label value
        "# TYPE b gauge\nb{1x=\"1\"} 1\n# EOF\n",       // bad label name
        "# TYPE b gauge\nb one\n# EOF\n",               // bad value
        "# TYPE b gauge\nb 1\nb 2\n# EOF\n",            // series repeated
        "# TYPE b gauge\nb 1\n",                        // no EOF
        "# TYPE b gauge\n# TYPE b gauge\nb 1\n# EOF\n", // family twice
        "# TYPE 9b gauge\n9b 1\n# EOF\n",               // bad metric name
    ] {
        assert!(parse_strict(bad).is_err(), "accepted: {bad:?}");
    }
}
