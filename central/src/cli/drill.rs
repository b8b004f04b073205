//! `outpost-central drill start|status|report|abort|list`: disaster-recovery drills from an
//! operator's terminal, over central's `/v1/drills` API. The rendering (`render_started`,
//! `render_status`, `render_list`) is pure: JSON and the time in, text out, every line at most
//! `TABLE_WIDTH` columns; `run` is the I/O shell (HTTP, stdout, the `--wait` poll loop).
//!
//! Requests are checked by central, not here (one set of rules: a missing `--sites` on an
//! isolation drill comes back as central's `validation` error and is printed as such).

use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::fleet::{TABLE_WIDTH, clean, colour_wanted, fit, human_duration};
use super::{CliError, Remote, call, table};

/// Default and largest `drill list --limit` (central's own default and maximum).
pub const DEFAULT_LIST_LIMIT: u64 = 20;
pub const MAX_LIST_LIMIT: u64 = 200;
/// How often `--wait` asks central about the drill.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Slack `--wait` gives central beyond the drill's planned cut and recovery timeout: the driver's
/// tick, the final report's read-back of central's records, a loaded machine.
const WAIT_MARGIN: Duration = Duration::from_secs(60);
/// How long `--wait` assumes a restore drill's cut may last (the operator restores central by
/// hand; the drill's timeline assumes an hour too).
const RESTORE_CUT_ALLOWANCE: Duration = Duration::from_secs(3600);
/// Site ids are cut to this many columns in tables, so a long id cannot push a line past the
/// width.
const MAX_SITE_COLUMNS: usize = 24;
/// The SITES column of `drill list`.
const MAX_SITES_COLUMNS: usize = 30;

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// A drill's kind as the operator types it (`central-outage`); central's JSON spells it with an
/// underscore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Central refuses the named sites' sync connections for the duration.
    Isolation,
    /// Central's QUIC listener goes away for the duration (every site is cut off).
    CentralOutage,
    /// Central takes a backup; you restore it onto an empty data directory and start central on
    /// it; the cut ends when the restored central starts (no --duration).
    CentralRestore,
}

impl KindArg {
    pub fn api_name(self) -> &'static str {
        match self {
            KindArg::Isolation => "isolation",
            KindArg::CentralOutage => "central_outage",
            KindArg::CentralRestore => "central_restore",
        }
    }
}

/// Why a `--duration`/`--recovery-timeout` value is refused (clap prints it).
#[derive(Debug, thiserror::Error)]
pub enum ParseSecsError {
    #[error("{0}")]
    Duration(#[from] humantime::DurationError),
    #[error("give whole seconds (e.g. 90s, 2m)")]
    Fraction,
}

/// `--duration 60s`: a humantime duration of whole seconds.
pub fn parse_secs(s: &str) -> Result<u64, ParseSecsError> {
    let d = humantime::parse_duration(s)?;
    if d.subsec_nanos() != 0 {
        return Err(ParseSecsError::Fraction);
    }
    Ok(d.as_secs())
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Sites to cut off, comma-separated (isolation only; the other kinds take every connected
    /// site).
    #[arg(long, value_delimiter = ',')]
    pub sites: Vec<String>,
    /// How long the cut lasts (30s, 5m); required for isolation and central-outage.
    #[arg(long, value_parser = parse_secs)]
    pub duration: Option<u64>,
    /// How long central waits after the cut for the sites to catch up before it reports the ones
    /// that did not (default 300s).
    #[arg(long, value_parser = parse_secs)]
    pub recovery_timeout: Option<u64>,
    /// A note kept with the drill (who, why).
    #[arg(long)]
    pub note: Option<String>,
    /// Wait until the drill completes, print its report, and exit 0 if it passed, 1 if not.
    #[arg(long)]
    pub wait: bool,
}

/// `outpost-central drill ...`.
#[derive(Debug, clap::Subcommand)]
pub enum DrillCmd {
    /// Start a drill (admin token): cut sites off, then report how they recovered.
    Start(StartArgs),
    /// The drill's phase, sites, times and live per-site figures (default: the active drill,
    /// else the newest); --json prints central's drill JSON.
    Status { id: Option<u64> },
    /// The drill's report as text (live while it runs, final once completed); --json for JSON.
    Report { id: u64 },
    /// End the drill's cut now (admin token); the drill then recovers and reports as usual.
    Abort { id: u64 },
    /// The newest drills: id, kind, phase, sites, start, result.
    List {
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT,
              value_parser = clap::value_parser!(u64).range(1..=MAX_LIST_LIMIT))]
        limit: u64,
    },
}

/// How a drill command ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `start --wait`: the drill completed and passed.
    Passed,
    /// `start --wait`: the drill completed and failed.
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum DrillCliError {
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error(
        "drill {id} did not complete within {waited}; follow it with `outpost-central drill \
         status {id}`"
    )]
    WaitTimeout { id: u64, waited: String },
    #[error("central's answer has no {0}")]
    Answer(&'static str),
}

/// The body of `POST /v1/drills`.
pub fn start_body(a: &StartArgs) -> Value {
    json!({
        "kind": a.kind.api_name(),
        "sites": a.sites,
        "duration_secs": a.duration,
        "recovery_timeout_secs": a.recovery_timeout,
        "note": a.note,
    })
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v[key].as_str()
}

/// `2026-11-27T12:00:05.123Z` as `12:00:05 UTC` (central's timestamps are UTC).
fn clock(rfc: &str) -> String {
    match rfc.get(11..19) {
        Some(t) if rfc.len() > 19 && rfc.as_bytes()[10] == b'T' => format!("{t} UTC"),
        _ => clean(rfc),
    }
}

/// `2026-11-27T12:00:05.123Z` as `2026-11-27 12:00:05`.
fn date_time(rfc: &str) -> String {
    match (rfc.get(..10), rfc.get(11..19)) {
        (Some(d), Some(t)) => format!("{d} {t}"),
        _ => clean(rfc),
    }
}

/// Milliseconds from `now` to `rfc` (negative when past).
fn until_ms(rfc: &str, now: SystemTime) -> Option<i64> {
    let t = humantime::parse_rfc3339(rfc).ok()?;
    Some(match t.duration_since(now) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    })
}

fn secs(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn sites_of(d: &Value) -> Vec<String> {
    d["sites"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(clean).collect())
        .unwrap_or_default()
}

/// The sites joined with `, `, cut to `w` columns with the count kept visible.
fn sites_line(sites: &[String], w: usize) -> String {
    let all = sites.join(", ");
    if all.chars().count() <= w {
        return all;
    }
    let tail = format!(" ({} sites)", sites.len());
    format!("{}{tail}", fit(&all, w.saturating_sub(tail.len())))
}

/// PASSED, FAILED, or `-` while the drill runs (the report is final once it completed).
fn verdict(d: &Value) -> &'static str {
    let r = &d["report"];
    if r["final"] != Value::Bool(true) {
        "-"
    } else if r["passed"] == Value::Bool(true) {
        "PASSED"
    } else {
        "FAILED"
    }
}

/// What `drill start` prints: the id, what happens now, and how to follow it.
pub fn render_started(d: &Value) -> String {
    let id = d["id"].as_u64().unwrap_or(0);
    let sites = sites_of(d);
    let who = sites_line(&sites, 60);
    let who = if who.is_empty() {
        "no site".to_string()
    } else {
        who
    };
    let until = str_of(d, "cut_until").map(clock);
    let mut o = String::new();
    match str_of(d, "kind") {
        Some("central_restore") => {
            let backup = &d["backup"];
            let path = backup["path"].as_str().map(clean);
            o.push_str(&format!(
                "drill {id} started: central_restore for {who}\n\
                 central took a backup: {} ({} bytes)\n\
                 the sites are cut off until the restored central starts; now:\n\
                 \x20 1. stop central\n\
                 \x20 2. outpost-central restore --from {} --data-dir EMPTY_DIR\n\
                 \x20 3. start central on it (OUTPOST_DATA_DIR=EMPTY_DIR outpost-central serve\n\
                 \x20    --config central.toml, same addresses); the drill resumes there\n",
                path.as_deref().unwrap_or("?"),
                backup["bytes"].as_u64().unwrap_or(0),
                path.as_deref().unwrap_or("BACKUP"),
            ));
        }
        Some("central_outage") => {
            o.push_str(&format!(
                "drill {id} started: central_outage; central's sync listener is down until {}\n\
                 sites taking part: {who}\n",
                until.as_deref().unwrap_or("-")
            ));
        }
        _ => {
            o.push_str(&format!(
                "drill {id} started: {who} {} cut off until {}\n",
                if sites.len() == 1 { "is" } else { "are" },
                until.as_deref().unwrap_or("-")
            ));
        }
    }
    if let Some(n) = d["recovery_timeout_secs"].as_u64() {
        o.push_str(&format!(
            "then central waits up to {} for the sites to catch up and reports\n",
            human_duration(n * 1000)
        ));
    }
    o.push_str(&format!(
        "follow with `outpost-central drill status {id}`\n"
    ));
    o
}

/// `drill status`: one block with the drill's phase, sites, times and per-site live figures,
/// each line at most `TABLE_WIDTH` columns; `colour` paints the verdict.
pub fn render_status(d: &Value, now: SystemTime, colour: bool) -> String {
    let id = d["id"].as_u64().unwrap_or(0);
    let phase = str_of(d, "phase").unwrap_or("?");
    let r = &d["report"];
    let mut lines: Vec<String> = Vec::new();
    lines.push(format!(
        "drill {id}: {}{}",
        clean(str_of(d, "kind").unwrap_or("?")),
        if d["aborted"].is_string() {
            " (aborted)"
        } else {
            ""
        }
    ));
    let label = |l: &str, v: String| format!("  {l:<12} {v}");
    lines.push(label("phase", clean(phase)));
    lines.push(label("sites", sites_line(&sites_of(d), TABLE_WIDTH - 15)));
    if let Some(n) = str_of(d, "note") {
        lines.push(label("note", fit(&clean(n), TABLE_WIDTH - 15)));
    }
    lines.push(label(
        "started",
        str_of(d, "started").map_or("-".into(), |t| format!("{} UTC", date_time(t))),
    ));
    let cut = match (str_of(d, "cut_ended"), str_of(d, "cut_until")) {
        (Some(ended), _) => format!(
            "ended {}{}",
            clock(ended),
            r["cut_ms"]
                .as_i64()
                .map(|m| format!(" after {}", secs(m)))
                .unwrap_or_default()
        ),
        (None, Some(until)) => match until_ms(until, now) {
            Some(ms) if ms > 0 => format!("until {} (in {})", clock(until), secs(ms)),
            _ => format!("until {}", clock(until)),
        },
        (None, None) if str_of(d, "kind") == Some("central_restore") => {
            "until the restored central starts".into()
        }
        (None, None) => "-".into(),
    };
    lines.push(label("cut", cut));
    if let Some(b) = d["backup"]["path"].as_str() {
        lines.push(label("backup", fit(&clean(b), TABLE_WIDTH - 15)));
    }
    let recovery = d["recovery_timeout_secs"]
        .as_u64()
        .map(|n| format!("timeout {}", human_duration(n * 1000)))
        .unwrap_or_else(|| "-".into());
    lines.push(label("recovery", recovery));
    lines.push(label("ended", str_of(d, "ended").map_or("-".into(), clock)));
    let v = verdict(d);
    let result = match v {
        "-" => "in progress (live figures; discrepancies are checked at the end)".to_string(),
        _ => {
            let painted = match (colour, v) {
                (true, "PASSED") => format!("{GREEN}{v}{RESET}"),
                (true, _) => format!("{RED}{v}{RESET}"),
                _ => v.to_string(),
            };
            format!(
                "{painted}: {} accepted while cut off, {} discrepancies, {} units oversold",
                r["events_accepted_while_cut_off"].as_u64().unwrap_or(0),
                r["discrepancies"].as_u64().unwrap_or(0),
                r["oversold_units"].as_i64().unwrap_or(0)
            )
        }
    };
    lines.push(label("result", result));

    let rows: Vec<Vec<String>> = r["sites"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let a = &s["accepted_while_cut_off"];
            let accepted: u64 = ["orders_confirmed", "orders_pending", "milestones", "other"]
                .iter()
                .filter_map(|k| a[*k].as_u64())
                .sum();
            let reconnected = match (s["reconnect_ms"].as_i64(), s["reconnected"].as_str()) {
                (Some(ms), _) => format!("after {}", secs(ms)),
                (None, Some(t)) => clock(t),
                (None, None) => "not yet".into(),
            };
            let caught_up = match (s["recovery_ms"].as_i64(), s["caught_up"].as_str()) {
                (Some(ms), _) => format!("in {}", secs(ms)),
                (None, Some(t)) => clock(t),
                (None, None) => "not yet".into(),
            };
            vec![
                fit(&clean(s["site"].as_str().unwrap_or("?")), MAX_SITE_COLUMNS),
                accepted.to_string(),
                s["peak_backlog"].as_i64().unwrap_or(0).to_string(),
                secs(s["oldest_event_age_ms"].as_i64().unwrap_or(0)),
                s["refused_connections"].as_u64().unwrap_or(0).to_string(),
                reconnected,
                caught_up,
                s["discrepancy_count"].as_u64().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    let mut out = String::new();
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    if !rows.is_empty() {
        out.push('\n');
        let t = table(
            &[
                "SITE",
                "ACCEPTED",
                "PEAK",
                "OLDEST",
                "REFUSED",
                "RECONNECTED",
                "CAUGHT UP",
                "DISCREP",
            ],
            &rows,
        );
        for l in t.lines() {
            out.push_str(&fit(l, TABLE_WIDTH));
            out.push('\n');
        }
    }
    out
}

/// `drill list`: one line per drill of a `GET /v1/drills` answer, newest first.
pub fn render_list(v: &Value) -> String {
    let active = v["active"].as_u64();
    let rows: Vec<Vec<String>> = v["drills"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|d| {
            let id = d["id"].as_u64().unwrap_or(0);
            let sites = sites_of(d);
            vec![
                format!("{id}{}", if Some(id) == active { "*" } else { "" }),
                clean(str_of(d, "kind").unwrap_or("?")),
                clean(str_of(d, "phase").unwrap_or("?")),
                if sites.is_empty() {
                    "-".into()
                } else {
                    sites_line(&sites, MAX_SITES_COLUMNS)
                },
                str_of(d, "started").map_or("-".into(), date_time),
                verdict(d).to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no drills yet\n".into();
    }
    let mut out = table(
        &["ID", "KIND", "PHASE", "SITES", "STARTED (UTC)", "RESULT"],
        &rows,
    );
    if active.is_some() {
        out.push_str("* active\n");
    }
    out
}

/// How long `--wait` waits for the drill `d` (just started) to complete.
pub fn wait_bound(d: &Value) -> Duration {
    let recovery = Duration::from_secs(d["recovery_timeout_secs"].as_u64().unwrap_or(0));
    let cut = match (
        str_of(d, "cut_until").and_then(|u| humantime::parse_rfc3339(u).ok()),
        str_of(d, "started").and_then(|s| humantime::parse_rfc3339(s).ok()),
    ) {
        (Some(until), Some(started)) => until.duration_since(started).unwrap_or_default(),
        _ => RESTORE_CUT_ALLOWANCE,
    };
    cut + recovery + WAIT_MARGIN
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// The drill `status` shows: `id`, else the active one, else the newest; `None` when central
/// has run none.
async fn drill_for_status(remote: &Remote, id: Option<u64>) -> Result<Option<Value>, CliError> {
    if let Some(id) = id {
        return call(remote, &format!("/v1/drills/{id}"), None)
            .await
            .map(Some);
    }
    let list = call(remote, "/v1/drills?limit=1", None).await?;
    if let Some(active) = list["active"].as_u64() {
        return call(remote, &format!("/v1/drills/{active}"), None)
            .await
            .map(Some);
    }
    Ok(list["drills"].as_array().and_then(|a| a.first()).cloned())
}

/// Polls the drill until it completed (bounded by `wait_bound`), telling `progress` about each
/// change of phase. Central being unreachable for a while (a restore drill restarts it) is
/// waited out; any other refusal ends the wait.
async fn wait_completed(
    remote: &Remote,
    started: &Value,
    progress: &mut dyn Write,
) -> Result<Value, DrillCliError> {
    let id = started["id"].as_u64().ok_or(DrillCliError::Answer("id"))?;
    let bound = wait_bound(started);
    let deadline = Instant::now() + bound;
    let mut phase = str_of(started, "phase").unwrap_or("").to_string();
    let mut unreachable = false;
    let _ = writeln!(
        progress,
        "waiting for drill {id} to complete (at most {})",
        human_duration(bound.as_millis() as u64)
    );
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        match call(remote, &format!("/v1/drills/{id}"), None).await {
            Ok(d) => {
                unreachable = false;
                let now = str_of(&d, "phase").unwrap_or("");
                if now != phase {
                    phase = now.to_string();
                    let _ = writeln!(progress, "drill {id}: {}", clean(&phase));
                }
                if phase == "completed" {
                    return Ok(d);
                }
            }
            Err(CliError::Http(e)) => {
                if !unreachable {
                    let _ = writeln!(progress, "central unreachable ({e}); still waiting");
                    unreachable = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            return Err(DrillCliError::WaitTimeout {
                id,
                waited: human_duration(bound.as_millis() as u64),
            });
        }
    }
}

/// Runs one `drill` command against `remote`, printing to `out` (and `--wait`'s progress to
/// stderr).
pub async fn run(
    remote: &Remote,
    json: bool,
    cmd: DrillCmd,
    out: &mut dyn Write,
) -> Result<Outcome, DrillCliError> {
    // A closed pipe (`| head`) is not an error worth reporting: writes to `out` are not checked.
    match cmd {
        DrillCmd::Start(a) => {
            let d = call(remote, "/v1/drills", Some(start_body(&a))).await?;
            // With --json --wait, stdout is one JSON document: the completed drill.
            let started = match (json, a.wait) {
                (true, false) => pretty(&d),
                (true, true) => {
                    let _ = writeln!(std::io::stderr(), "{}", render_started(&d).trim_end());
                    String::new()
                }
                (false, _) => render_started(&d),
            };
            let _ = out.write_all(started.as_bytes());
            if !a.wait {
                return Ok(Outcome::Done);
            }
            let _ = out.flush();
            let done = wait_completed(remote, &d, &mut std::io::stderr()).await?;
            let id = done["id"].as_u64().ok_or(DrillCliError::Answer("id"))?;
            let text = if json {
                pretty(&done)
            } else {
                let r = call(remote, &format!("/v1/drills/{id}/report?format=text"), None).await?;
                match r {
                    Value::String(s) => s,
                    other => pretty(&other),
                }
            };
            if !json {
                let _ = out.write_all(b"\n");
            }
            let _ = out.write_all(text.as_bytes());
            Ok(if done["report"]["passed"] == Value::Bool(true) {
                Outcome::Passed
            } else {
                Outcome::Failed
            })
        }
        DrillCmd::Status { id } => {
            let text = match drill_for_status(remote, id).await? {
                Some(d) if json => pretty(&d),
                Some(d) => render_status(&d, SystemTime::now(), colour_wanted()),
                None if json => "null\n".into(),
                None => "no drills yet\n".into(),
            };
            let _ = out.write_all(text.as_bytes());
            Ok(Outcome::Done)
        }
        DrillCmd::Report { id } => {
            let text = if json {
                pretty(&call(remote, &format!("/v1/drills/{id}/report"), None).await?)
            } else {
                match call(remote, &format!("/v1/drills/{id}/report?format=text"), None).await? {
                    Value::String(s) => s,
                    other => pretty(&other),
                }
            };
            let _ = out.write_all(text.as_bytes());
            Ok(Outcome::Done)
        }
        DrillCmd::Abort { id } => {
            let d = call(remote, &format!("/v1/drills/{id}/abort"), Some(json!({}))).await?;
            let text = if json {
                pretty(&d)
            } else {
                format!(
                    "drill {id} aborted: the cut ended; central now waits for the sites to \
                     catch up and reports\nfollow with `outpost-central drill status {id}`\n"
                )
            };
            let _ = out.write_all(text.as_bytes());
            Ok(Outcome::Done)
        }
        DrillCmd::List { limit } => {
            let v = call(remote, &format!("/v1/drills?limit={limit}"), None).await?;
            let text = if json { pretty(&v) } else { render_list(&v) };
            let _ = out.write_all(text.as_bytes());
            Ok(Outcome::Done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widest(s: &str) -> usize {
        s.lines().map(|l| l.chars().count()).max().unwrap_or(0)
    }

    fn site_report(site: &str, done: bool) -> Value {
        json!({
            "site": site,
            "accepted_while_cut_off": {"orders_confirmed": 2, "orders_pending": 1,
                                       "milestones": 10, "other": 0},
            "refused_connections": 3,
            "peak_backlog": 13,
            "oldest_event_age_ms": 2500,
            "reconnected": if done { json!("2026-11-27T12:01:00.400Z") } else { Value::Null },
            "reconnect_ms": if done { json!(400) } else { Value::Null },
            "caught_up": if done { json!("2026-11-27T12:01:00.700Z") } else { Value::Null },
            "recovery_ms": if done { json!(300) } else { Value::Null },
            "discrepancy_count": 0,
            "backlog_timeline": [0, 5, 13, 0],
        })
    }

    fn drill(phase: &str, done: bool) -> Value {
        json!({
            "id": 3, "kind": "isolation", "phase": phase,
            "sites": ["plant-1", "dc-1"], "note": null,
            "started": "2026-11-27T12:00:00.000Z",
            "cut_until": "2026-11-27T12:01:00.000Z",
            "cut_ended": if done { json!("2026-11-27T12:01:00.000Z") } else { Value::Null },
            "ended": if done { json!("2026-11-27T12:01:02.000Z") } else { Value::Null },
            "aborted": null,
            "recovery_timeout_secs": 300,
            "backup": null, "restored": null,
            "report": {
                "final": done, "passed": done, "cut_ms": if done { json!(60000) } else { Value::Null },
                "events_accepted_while_cut_off": 26, "discrepancies": 0, "oversold_units": 0,
                "sites": [site_report("plant-1", done), site_report("dc-1", done)],
            }
        })
    }

    #[test]
    fn kinds_map_to_the_api_and_durations_are_whole_seconds() {
        assert_eq!(KindArg::CentralOutage.api_name(), "central_outage");
        assert_eq!(parse_secs("60s").ok(), Some(60));
        assert_eq!(parse_secs("2m").ok(), Some(120));
        assert!(parse_secs("1500ms").is_err());
        assert!(parse_secs("soon").is_err());
        let a = StartArgs {
            kind: KindArg::CentralRestore,
            sites: vec![],
            duration: None,
            recovery_timeout: Some(60),
            note: Some("q4".into()),
            wait: false,
        };
        assert_eq!(
            start_body(&a),
            json!({"kind": "central_restore", "sites": [], "duration_secs": null,
                   "recovery_timeout_secs": 60, "note": "q4"})
        );
    }

    #[test]
    fn start_says_what_happens_and_how_to_follow() {
        let t = render_started(&drill("cut_off", false));
        assert!(
            t.contains("plant-1, dc-1 are cut off until 12:01:00 UTC"),
            "{t}"
        );
        assert!(t.contains("outpost-central drill status 3"), "{t}");
        let mut r = drill("cut_off", false);
        r["kind"] = json!("central_restore");
        r["cut_until"] = Value::Null;
        r["backup"] = json!({"path": "/var/lib/outpost/backups/b-1.redb", "bytes": 4096,
                             "taken_ms": 0});
        let t = render_started(&r);
        assert!(
            t.contains("restore --from /var/lib/outpost/backups/b-1.redb --data-dir EMPTY_DIR"),
            "{t}"
        );
        assert!(t.contains("stop central"), "{t}");
        assert!(widest(&t) <= TABLE_WIDTH, "{t}");
    }

    /// Goal: the status block shows the phase, the countdown of the cut and each site's live
    /// figures while the drill runs, and the verdict once it completed; within 100 columns even
    /// with long site ids; colour only when asked.
    #[test]
    fn status_shows_live_figures_then_the_verdict() {
        let now = humantime::parse_rfc3339("2026-11-27T12:00:18Z").unwrap();
        let live = render_status(&drill("cut_off", false), now, false);
        assert!(live.contains("phase        cut_off"), "{live}");
        assert!(
            live.contains("until 12:01:00 UTC (in 42.0s)"),
            "countdown: {live}"
        );
        assert!(live.contains("in progress"), "{live}");
        let row = live.lines().find(|l| l.starts_with("plant-1")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[..5], ["plant-1", "13", "13", "2.5s", "3"], "{live}");
        assert!(row.contains("not yet"), "{row}");

        let done = render_status(&drill("completed", true), now, false);
        assert!(done.contains("result       PASSED: 26 accepted"), "{done}");
        assert!(done.contains("ended 12:01:00 UTC after 60.0s"), "{done}");
        assert!(
            done.contains("after 0.4s") && done.contains("in 0.3s"),
            "{done}"
        );
        assert!(!done.contains('\u{1b}'));
        let coloured = render_status(&drill("completed", true), now, true);
        assert!(coloured.contains("\x1b[32mPASSED\x1b[0m"), "{coloured:?}");

        let mut long = drill("recovering", false);
        long["sites"] = json!(
            (0..40)
                .map(|i| format!("plant-with-a-long-name-{i}"))
                .collect::<Vec<_>>()
        );
        long["report"]["sites"][0]["site"] = json!("x".repeat(150));
        long["note"] = json!("n".repeat(300));
        let t = render_status(&long, now, false);
        assert!(widest(&t) <= TABLE_WIDTH, "{t}");
        assert!(t.contains("(40 sites)"), "{t}");
    }

    #[test]
    fn list_shows_one_line_per_drill_with_its_result() {
        let mut failed = drill("completed", true);
        failed["id"] = json!(2);
        failed["report"]["passed"] = json!(false);
        let v = json!({"active": 3, "drills": [drill("cut_off", false), failed,
                                               {"id": 1, "kind": "central_outage",
                                                "phase": "completed", "sites": [],
                                                "started": "2026-11-26T08:00:00.000Z",
                                                "report": {"final": true, "passed": true}}]});
        let t = render_list(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID"), "{t}");
        assert!(
            lines[1].starts_with("3*") && lines[1].ends_with(" -"),
            "{t}"
        );
        assert!(lines[1].contains("2026-11-27 12:00:00"), "{t}");
        assert!(lines[2].ends_with("FAILED"), "{t}");
        assert!(lines[3].ends_with("PASSED"), "{t}");
        assert_eq!(lines[4], "* active");
        assert!(widest(&t) <= TABLE_WIDTH, "{t}");
        assert_eq!(
            render_list(&json!({"active": null, "drills": []})),
            "no drills yet\n"
        );
    }

    #[test]
    fn the_wait_is_bounded_by_cut_recovery_and_margin() {
        assert_eq!(
            wait_bound(&drill("cut_off", false)),
            Duration::from_secs(60 + 300) + WAIT_MARGIN
        );
        let mut r = drill("cut_off", false);
        r["cut_until"] = Value::Null;
        assert_eq!(
            wait_bound(&r),
            RESTORE_CUT_ALLOWANCE + Duration::from_secs(300) + WAIT_MARGIN
        );
    }
}
