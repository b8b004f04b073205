//! `outpost-central fleet status|watch|alerts`: fleet health for an operator's terminal. The
//! rendering (`fleet_rows`, `render_fleet`, `render_alerts`) is pure: JSON, a width and a colour
//! flag in, text out; `status`, `watch` and `alerts` are the I/O shell (HTTP, stdout, Ctrl-C).

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal as _, Write};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{CliError, Remote, call};

/// Every line `fleet status` and `fleet alerts` print fits a terminal this wide.
pub const TABLE_WIDTH: usize = 100;
/// The REASONS column keeps at least this many columns (or its natural width if smaller) while
/// wider columns are shrunk, so a long site id cannot squeeze the reasons out entirely.
const MIN_LAST_COLUMN: usize = 28;
/// Space between columns.
const GAP: &str = "  ";
/// Alerts asked of central per request (its own maximum `limit`).
const ALERTS_PAGE: usize = 1000;
/// Pages read at most when looking for the newest alerts: central keeps the newest 10,000, so 11
/// pages reach the end; the rest is slack for alerts stored while we read.
const MAX_ALERT_PAGES: usize = 20;
/// Default and largest `fleet alerts --limit`.
pub const DEFAULT_ALERTS_LIMIT: u64 = 20;
pub const MAX_ALERTS_LIMIT: u64 = 1000;

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
/// ANSI clear screen and cursor home, for `fleet watch` on a terminal.
const CLEAR: &str = "\x1b[2J\x1b[H";

/// One site's line in `fleet status`, taken from `GET /v1/fleet`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FleetRow {
    pub site: String,
    pub state: String,
    /// Events in the agent's outbox at its latest heartbeat.
    pub backlog: Option<u64>,
    /// Age of the oldest unsynced event.
    pub oldest_ms: Option<u64>,
    pub lag_revs: Option<u64>,
    pub lag_ms: Option<u64>,
    /// Time since central last heard from the site.
    pub last_seen_ago_ms: Option<u64>,
    pub version: Option<String>,
    pub reasons: Vec<String>,
}

fn ms(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_i64().map(|n| n.max(0) as u64))
}

/// Reads the rows from a `GET /v1/fleet` answer; `now` turns `last_seen` into an age.
pub fn fleet_rows(fleet: &Value, now: SystemTime) -> Vec<FleetRow> {
    let sites = fleet["sites"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    sites
        .iter()
        .map(|s| {
            let sig = &s["signals"];
            let last_seen_ago_ms = s["last_seen"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .map(|t| {
                    now.duration_since(t)
                        .unwrap_or(Duration::ZERO)
                        .as_millis()
                        .try_into()
                        .unwrap_or(u64::MAX)
                });
            FleetRow {
                site: s["site"].as_str().unwrap_or("?").to_string(),
                state: s["state"].as_str().unwrap_or("unknown").to_string(),
                backlog: sig["outbox_events"].as_u64(),
                oldest_ms: ms(&sig["backlog_age_ms"]),
                lag_revs: sig["master_lag_revs"].as_u64(),
                lag_ms: ms(&sig["master_lag_ms"]),
                last_seen_ago_ms,
                version: sig["agent_version"].as_str().map(str::to_string),
                reasons: s["reasons"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// A duration in its largest whole unit: `0s`, `3s`, `5m`, `2h`, `3d` (hours up to two days).
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Text from central or an agent made safe to print and to measure: anything but printable
/// ASCII becomes `?`, so one char is one terminal column and an agent-reported string cannot
/// carry terminal escapes. (ASCII-only instead of a unicode-width table: site ids and reason
/// codes are ASCII anyway.)
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// `s` cut to `w` columns, ending in `…` when cut. `s` is `clean` (or our own ASCII/`…`/`→`).
pub(crate) fn fit(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(w - 1).collect();
    out.push('…');
    out
}

fn cols(s: &str) -> usize {
    s.chars().count()
}

/// Lays out `rows` under `header` so that no line is wider than `width`: the last column gets
/// what is left; while that is less than `MIN_LAST_COLUMN` (or its natural width), the widest
/// other column shrinks, down to its header's width. Cells that do not fit end in `…`.
/// `paint(row, col)` may give an ANSI colour for a cell; it is applied only when `colour`.
fn fit_table(
    header: &[&str],
    rows: &[Vec<String>],
    width: usize,
    colour: bool,
    paint: impl Fn(usize, usize) -> Option<&'static str>,
) -> String {
    let n = header.len();
    assert!(
        n >= 1 && rows.iter().all(|r| r.len() == n),
        "rows match the header"
    );
    let mut widths: Vec<usize> = header.iter().map(|h| cols(h)).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(cols(c));
        }
    }
    let last_natural = widths[n - 1];
    let want_last = last_natural.min(MIN_LAST_COLUMN);
    let fixed = |w: &[usize]| w[..n - 1].iter().sum::<usize>() + GAP.len() * (n - 1);
    // Each step shrinks one column by one, so this ends within the sum of the widths.
    while fixed(&widths) + want_last > width {
        let Some(i) = (0..n - 1)
            .filter(|&i| widths[i] > cols(header[i]))
            .max_by_key(|&i| widths[i])
        else {
            break;
        };
        widths[i] -= 1;
    }
    widths[n - 1] = last_natural.min(width.saturating_sub(fixed(&widths)));

    let mut out = String::new();
    let header_cells: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let lines = std::iter::once((None, &header_cells))
        .chain(rows.iter().enumerate().map(|(i, r)| (Some(i), r)));
    for (row, cells) in lines {
        let mut line = String::new();
        for (col, (cell, &w)) in cells.iter().zip(&widths).enumerate() {
            let text = fit(cell, w);
            let pad = if col + 1 == n { 0 } else { w - cols(&text) };
            let code = match row {
                _ if !colour => None,
                None => Some(BOLD),
                Some(r) => paint(r, col),
            };
            match code {
                Some(c) => line.push_str(&format!("{c}{text}{RESET}")),
                None => line.push_str(&text),
            }
            line.push_str(&" ".repeat(pad));
            if col + 1 < n {
                line.push_str(GAP);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The ANSI colour of a state: healthy green, degraded yellow, offline red, unknown dim.
fn state_colour(state: &str) -> Option<&'static str> {
    match state {
        "healthy" => Some("\x1b[32m"),
        "degraded" => Some("\x1b[33m"),
        "offline" => Some("\x1b[31m"),
        "unknown" => Some("\x1b[2m"),
        _ => None,
    }
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// `fleet status`'s table: one line per site, then a summary line. No line is wider than
/// `width` columns (for `width` ≥ the headers' own width); ANSI colour codes appear only when
/// `colour` is set.
pub fn render_fleet(rows: &[FleetRow], width: usize, colour: bool) -> String {
    if rows.is_empty() {
        return "no sites known to central yet\n".into();
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let lag = match (r.lag_revs, r.lag_ms) {
                (Some(revs), Some(ms)) => Some(format!("{revs}/{}", human_duration(ms))),
                (Some(revs), None) => Some(revs.to_string()),
                (None, Some(ms)) => Some(human_duration(ms)),
                (None, None) => None,
            };
            vec![
                clean(&r.site),
                clean(&r.state),
                or_dash(r.backlog.map(|n| n.to_string())),
                or_dash(r.oldest_ms.map(human_duration)),
                or_dash(lag),
                or_dash(
                    r.last_seen_ago_ms
                        .map(|ms| format!("{} ago", human_duration(ms))),
                ),
                or_dash(r.version.as_deref().map(clean)),
                if r.reasons.is_empty() {
                    String::new()
                } else {
                    clean(&r.reasons.join(","))
                },
            ]
        })
        .collect();
    let header = [
        "SITE",
        "STATE",
        "BACKLOG",
        "OLDEST",
        "LAG",
        "LAST SEEN",
        "VERSION",
        "REASONS",
    ];
    let mut out = fit_table(&header, &cells, width, colour, |row, col| {
        (col == 1).then(|| state_colour(&rows[row].state)).flatten()
    });
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *counts.entry(r.state.as_str()).or_default() += 1;
    }
    let mut summary: Vec<String> = ["healthy", "degraded", "offline"]
        .iter()
        .map(|s| format!("{} {s}", counts.remove(s).unwrap_or(0)))
        .collect();
    summary.extend(counts.iter().map(|(s, n)| format!("{n} {}", clean(s))));
    out.push_str(&fit(&summary.join(", "), width));
    out.push('\n');
    out
}

/// `fleet alerts`' table: time, site, state change and reasons, one line per alert in the
/// order given, each at most `width` columns.
pub fn render_alerts(list: &[Value], width: usize) -> String {
    if list.is_empty() {
        return "no alerts\n".into();
    }
    let text = |v: &Value| clean(v.as_str().unwrap_or("-"));
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            let mut reasons: Vec<String> = a["reasons"]
                .as_array()
                .map(|r| r.iter().map(text).collect())
                .unwrap_or_default();
            // A change into or out of a drill was planned, not an incident: say so first.
            if let Some(id) = a["drill_id"].as_u64() {
                reasons.insert(0, format!("drill {id}"));
            }
            vec![
                text(&a["at"]),
                text(&a["site"]),
                format!("{} → {}", text(&a["from"]), text(&a["to"])),
                reasons.join(","),
            ]
        })
        .collect();
    fit_table(
        &["AT", "SITE", "CHANGE", "REASONS"],
        &rows,
        width,
        false,
        |_, _| None,
    )
}

/// Whether to colour: stdout is a terminal and `NO_COLOR` is unset or empty (no-color.org).
pub fn colour_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

async fn fleet_text(remote: &Remote, json: bool, colour: bool) -> Result<String, CliError> {
    let v = call(remote, "/v1/fleet", None).await?;
    Ok(if json {
        pretty(&v)
    } else {
        render_fleet(&fleet_rows(&v, SystemTime::now()), TABLE_WIDTH, colour)
    })
}

/// `fleet status`: the table (or central's JSON, pretty) on `out`.
pub async fn status(remote: &Remote, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let text = fleet_text(remote, json, colour_wanted()).await?;
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

/// `fleet watch`: prints the table every `interval` until Ctrl-C, or `count` times. On a
/// terminal the screen is cleared first; every table follows a timestamp line. A failed
/// refresh is shown in place of the table and the watch goes on (central may be restarting);
/// the result is the last refresh's.
pub async fn watch(
    remote: &Remote,
    json: bool,
    interval: Duration,
    count: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let terminal = std::io::stdout().is_terminal();
    let colour = colour_wanted();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut last = Ok(());
    let mut shown = 0u64;
    loop {
        let fetched = tokio::select! {
            r = fleet_text(remote, json, colour) => r,
            _ = &mut ctrl_c => return last,
        };
        let mut page = String::new();
        if terminal {
            page.push_str(CLEAR);
        }
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now());
        page.push_str(&format!(
            "--- {stamp} (every {}s) ---\n",
            interval.as_secs()
        ));
        match &fetched {
            Ok(text) => page.push_str(text),
            Err(e) => page.push_str(&format!("error: {e}\n")),
        }
        last = fetched.map(|_| ());
        if out
            .write_all(page.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return last;
        }
        shown += 1;
        if count.is_some_and(|n| shown >= n) {
            return last;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut ctrl_c => return last,
        }
    }
}

/// The newest `limit` alerts, oldest first: central lists alerts oldest first by id, so this
/// pages through them (at most `MAX_ALERT_PAGES` requests) keeping the last `limit`.
pub async fn recent_alerts(remote: &Remote, limit: u64) -> Result<Vec<Value>, CliError> {
    let limit = usize::try_from(limit.min(MAX_ALERTS_LIMIT)).unwrap_or(1);
    let mut keep = VecDeque::with_capacity(limit);
    let mut after = 0;
    for _ in 0..MAX_ALERT_PAGES {
        let page = call(
            remote,
            &format!("/v1/alerts?after={after}&limit={ALERTS_PAGE}"),
            None,
        )
        .await?;
        let items = page.as_array().cloned().unwrap_or_default();
        let Some(next) = items.last().and_then(|a| a["id"].as_u64()) else {
            break;
        };
        let full = items.len() == ALERTS_PAGE;
        after = next;
        for a in items {
            keep.push_back(a);
            if keep.len() > limit {
                keep.pop_front();
            }
        }
        if !full {
            break;
        }
    }
    Ok(keep.into())
}

/// `fleet alerts`: the newest `limit` alerts as a table, or as central's JSON items.
pub async fn alerts(
    remote: &Remote,
    limit: u64,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let list = recent_alerts(remote, limit).await?;
    let text = if json {
        pretty(&Value::Array(list))
    } else {
        render_alerts(&list, TABLE_WIDTH)
    };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(site: &str, state: &str) -> FleetRow {
        FleetRow {
            site: site.into(),
            state: state.into(),
            backlog: Some(12),
            oldest_ms: Some(3_000),
            lag_revs: Some(2),
            lag_ms: Some(300_000),
            last_seen_ago_ms: Some(1_500),
            version: Some("0.1.0".into()),
            reasons: vec![],
        }
    }

    fn widest(s: &str) -> usize {
        s.lines().map(|l| l.chars().count()).max().unwrap_or(0)
    }

    #[test]
    fn durations_use_the_largest_whole_unit() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(999), "0s");
        assert_eq!(human_duration(3_000), "3s");
        assert_eq!(human_duration(59_999), "59s");
        assert_eq!(human_duration(60_000), "1m");
        assert_eq!(human_duration(5 * 60_000 + 59_000), "5m");
        assert_eq!(human_duration(2 * 3_600_000), "2h");
        assert_eq!(human_duration(47 * 3_600_000), "47h");
        assert_eq!(human_duration(3 * 86_400_000), "3d");
        assert_eq!(
            human_duration(u64::MAX),
            format!("{}d", u64::MAX / 1000 / 86_400)
        );
    }

    /// Goal: every line fits 100 columns whatever central sends. Method: a site id, a version
    /// and reasons far longer than the columns, and non-ASCII text, rendered at width 100.
    #[test]
    fn lines_fit_the_width_with_long_site_ids_versions_and_reasons() {
        let mut long = row(&"plant-with-a-very-long-name-".repeat(4), "degraded");
        long.reasons = vec![
            "backlog_too_old".into(),
            "outbox_near_limit".into(),
            "disk_nearly_full".into(),
            "clock_offset_too_large".into(),
            "master_lag_too_large".into(),
        ];
        long.version = Some("1.2.3-rc.4+build.with.a.long.suffix.ünïcødé\u{1b}[31m".into());
        long.backlog = Some(u64::MAX);
        let rows = vec![
            row("plant-1", "healthy"),
            long,
            row("warehouse-1", "offline"),
        ];
        let t = render_fleet(&rows, TABLE_WIDTH, false);
        assert!(widest(&t) <= TABLE_WIDTH, "{t}");
        assert_eq!(t.lines().count(), 5, "{t}");
        assert!(t.lines().nth(2).unwrap().contains('…'), "{t}");
        assert!(t.contains("REASONS"), "{t}");
        assert!(t.contains("backlog_too_old"), "{t}");
        assert!(
            !t.contains('\u{1b}'),
            "agent text cannot carry escapes: {t}"
        );
        assert!(
            t.lines()
                .all(|l| l.chars().all(|c| c.is_ascii() || c == '…'))
        );
        // Narrower widths are honoured too, down to the headers' own width.
        for width in [60, 80, 120] {
            let t = render_fleet(&rows, width, false);
            assert!(widest(&t) <= width, "width {width}:\n{t}");
        }
        // Short rows keep their natural widths: nothing is cut.
        let t = render_fleet(&[row("plant-1", "healthy")], TABLE_WIDTH, false);
        assert!(!t.contains('…'), "{t}");
        let line = t.lines().nth(1).unwrap();
        for cell in ["plant-1", "healthy", "12", "3s", "2/5m", "1s ago", "0.1.0"] {
            assert!(line.contains(cell), "{cell} in {line}");
        }
    }

    #[test]
    fn colour_codes_only_when_asked_and_only_around_the_state() {
        let rows = vec![
            row("a", "healthy"),
            row("b", "degraded"),
            row("c", "offline"),
            row("d", "unknown"),
        ];
        let plain = render_fleet(&rows, TABLE_WIDTH, false);
        assert!(!plain.contains('\u{1b}'), "{plain}");
        let coloured = render_fleet(&rows, TABLE_WIDTH, true);
        for code in [
            "\x1b[32mhealthy",
            "\x1b[33mdegraded",
            "\x1b[31moffline",
            "\x1b[2munknown",
        ] {
            assert!(coloured.contains(code), "{code:?} in {coloured:?}");
        }
        // Stripped of its codes, the coloured table is the plain one: padding is unchanged.
        let mut stripped = coloured.clone();
        for code in [
            "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[2m", "\x1b[1m", RESET,
        ] {
            stripped = stripped.replace(code, "");
        }
        assert_eq!(stripped, plain);
        assert!(
            plain.ends_with("1 healthy, 1 degraded, 1 offline, 1 unknown\n"),
            "{plain}"
        );
    }

    #[test]
    fn an_empty_fleet_says_so() {
        assert_eq!(
            render_fleet(&[], TABLE_WIDTH, true),
            "no sites known to central yet\n"
        );
        assert_eq!(render_alerts(&[], TABLE_WIDTH), "no alerts\n");
        assert!(fleet_rows(&json!({"sites": []}), SystemTime::now()).is_empty());
    }

    #[test]
    fn rows_are_read_from_the_fleet_answer() {
        let now = humantime::parse_rfc3339("2026-11-27T04:00:10Z").unwrap();
        let v = json!({"sites": [
            {"site": "plant-1", "state": "degraded", "reasons": ["backlog_too_old"],
             "last_seen": "2026-11-27T04:00:07.500Z", "connected": true,
             "signals": {"outbox_events": 40, "backlog_age_ms": 125000, "master_lag_revs": 0,
                         "master_lag_ms": null, "agent_version": "0.1.0"}},
            {"site": "plant-2", "state": "unknown", "reasons": [], "last_seen": null,
             "signals": null}
        ]});
        let rows = fleet_rows(&v, now);
        assert_eq!(
            rows[0],
            FleetRow {
                site: "plant-1".into(),
                state: "degraded".into(),
                backlog: Some(40),
                oldest_ms: Some(125_000),
                lag_revs: Some(0),
                lag_ms: None,
                last_seen_ago_ms: Some(2_500),
                version: Some("0.1.0".into()),
                reasons: vec!["backlog_too_old".into()],
            }
        );
        assert_eq!(
            rows[1],
            FleetRow {
                site: "plant-2".into(),
                state: "unknown".into(),
                ..Default::default()
            }
        );
        let t = render_fleet(&rows, TABLE_WIDTH, false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[1].contains("2m") && lines[1].contains("2s ago"),
            "{t}"
        );
        assert!(lines[2].contains(" - "), "{t}");
        assert_eq!(lines[3], "0 healthy, 1 degraded, 0 offline, 1 unknown");
    }

    #[test]
    fn alerts_show_the_change_and_fit_the_width() {
        let list = vec![
            json!({"id": 1, "site": "plant-2", "from": "healthy", "to": "offline",
                   "reasons": ["not_heard_from"], "at": "2026-11-27T04:00:00.000Z"}),
            json!({"id": 2, "site": "x".repeat(80), "from": "offline", "to": "degraded",
                   "reasons": ["backlog_too_old", "outbox_near_limit", "disk_nearly_full"],
                   "at": "2026-11-27T04:00:05.000Z"}),
        ];
        let t = render_alerts(&list, TABLE_WIDTH);
        assert!(widest(&t) <= TABLE_WIDTH, "{t}");
        assert!(
            t.lines().nth(1).unwrap().contains("healthy → offline"),
            "{t}"
        );
        assert!(t.lines().nth(1).unwrap().contains("not_heard_from"), "{t}");
        assert!(t.lines().nth(2).unwrap().contains("backlog_too_old"), "{t}");
    }

    /// Goal: a change into or out of a drill names the drill.
    #[test]
    fn drill_alerts_name_their_drill() {
        let list = vec![
            json!({"id": 3, "site": "plant-1", "from": "healthy", "to": "drill",
                   "reasons": [], "at": "2026-11-27T04:00:00.000Z", "drill_id": 7}),
            json!({"id": 4, "site": "plant-1", "from": "healthy", "to": "offline",
                   "reasons": ["not_heard_from"], "at": "2026-11-27T04:00:09.000Z",
                   "drill_id": null}),
        ];
        let t = render_alerts(&list, TABLE_WIDTH);
        assert!(t.lines().nth(1).unwrap().contains("drill 7"), "{t}");
        assert!(!t.lines().nth(2).unwrap().contains("drill"), "{t}");
    }
}
