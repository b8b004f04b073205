// Outpost fleet dashboard: plain JS, no framework, no third-party code. Reads central's JSON
// API (GET /v1/fleet, /v1/fleet/{site}, /v1/alerts, /v1/drills) with a bearer token that the operator
// pastes once or passes in the URL fragment (#token=...); fragments never reach the server.
// The token is kept in sessionStorage (this tab only) and removed from the address bar.
// Read-only: drills are shown, never started or aborted here (that stays an admin action in the
// CLI and the API).
"use strict";

const REFRESH_MS = 2000;
const FETCH_TIMEOUT_MS = 5000;
const TOKEN_KEY = "outpost.central.token";
// Alerts kept in memory for the list (newest first); older ones stay in central's store.
const MAX_ALERTS = 200;
// Pages of alerts read per refresh while catching up (1000 each).
const MAX_ALERT_PAGES = 20;

const $ = (id) => document.getElementById(id);

let selected = null;
let alerts = [];
let alertCursor = 0;
let lastOk = null;
let timer = null;
// The drill shown in the Drills panel (the active one, else the newest), from GET /v1/drills.
let drill = null;

function hashParams() {
  return new URLSearchParams(location.hash.replace(/^#/, ""));
}

function setHash(params) {
  const s = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (s ? "#" + s : ""));
}

function takeTokenFromHash() {
  const p = hashParams();
  const t = p.get("token");
  if (t) {
    sessionStorage.setItem(TOKEN_KEY, t.trim());
    p.delete("token");
    setHash(p);
  }
  selected = p.get("site");
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function getJson(path) {
  const ctl = new AbortController();
  const t = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  try {
    const r = await fetch(path, {
      headers: { Authorization: "Bearer " + (token() || ""), Accept: "application/json" },
      cache: "no-store",
      signal: ctl.signal,
    });
    let body = null;
    try {
      body = await r.json();
    } catch (_) {
      body = null;
    }
    if (!r.ok) {
      const msg = body && body.error ? body.error.code + ": " + body.error.message : "HTTP " + r.status;
      throw new HttpError(r.status, msg);
    }
    return body;
  } finally {
    clearTimeout(t);
  }
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return ms + " ms";
  const s = Math.round(ms / 1000);
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " m " + (s % 60) + " s";
  const h = Math.floor(m / 60);
  if (h < 48) return h + " h " + (m % 60) + " m";
  return Math.floor(h / 24) + " d " + (h % 24) + " h";
}

function ago(iso) {
  if (!iso) return "never";
  const ms = Date.now() - Date.parse(iso);
  return ms < 1000 ? "just now" : duration(ms) + " ago";
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function badge(state) {
  const s = state || "unknown";
  return el("span", { class: "badge state-" + s, "data-field": "state", text: s });
}

function showBanner(text) {
  const b = $("banner");
  if (text) {
    b.textContent = text;
    b.hidden = false;
  } else {
    b.hidden = true;
    b.textContent = "";
  }
}

function askToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token-form").hidden = false;
  showBanner(message);
  $("token-input").focus();
}

// A site in the active drill says which drill, so that its state reads as planned.
function reasonsText(s) {
  const reasons = (s.reasons || []).join(", ");
  if (s.state === "drill" && drill && drill.phase !== "completed" && (drill.sites || []).includes(s.site)) {
    return "drill " + drill.id + (reasons ? " · " + reasons : "");
  }
  return reasons;
}

function renderFleet(fleet) {
  const body = $("fleet-rows");
  const rows = [];
  const counts = {};
  for (const s of fleet.sites) {
    counts[s.state] = (counts[s.state] || 0) + 1;
    const sig = s.signals || {};
    const lag =
      sig.master_lag_revs === null || sig.master_lag_revs === undefined
        ? "–"
        : sig.master_lag_revs + " rev" + (sig.master_lag_ms ? " / " + duration(sig.master_lag_ms) : "");
    const tr = el(
      "tr",
      { "data-site": s.site, "data-state": s.state, class: s.site === selected ? "selected" : null },
      el("td", { "data-field": "site", text: s.site }),
      el("td", {}, badge(s.state)),
      el("td", { "data-field": "reasons", text: reasonsText(s) }),
      el("td", { class: "num", "data-field": "outbox_events", text: sig.outbox_events ?? "–" }),
      el("td", { class: "num", "data-field": "backlog_age", text: duration(sig.backlog_age_ms) }),
      el("td", { class: "num", "data-field": "master_lag", text: lag }),
      el("td", { "data-field": "last_seen", title: s.last_seen || "", text: s.connected ? "connected" : ago(s.last_seen) }),
      el("td", { "data-field": "version", text: sig.agent_version || "–" }),
    );
    tr.addEventListener("click", () => select(s.site));
    rows.push(tr);
  }
  if (rows.length === 0) {
    rows.push(el("tr", {}, el("td", { colspan: "8", class: "muted", text: "no sites known yet" })));
  }
  body.replaceChildren(...rows);
  const summary = $("summary");
  summary.textContent =
    fleet.sites.length + " site(s): " +
    Object.entries(counts).map(([k, v]) => v + " " + k).join(", ");
  summary.setAttribute("data-loaded", "true");
}

const CHARTS = [
  ["outbox_events", "outbox events", (v) => String(v)],
  ["backlog_age_ms", "oldest unsynced", duration],
  ["process_rss_bytes", "process RSS", bytes],
  ["process_cpu_pct", "process CPU", (v) => v.toFixed(1) + " %"],
];

function sparkline(values) {
  const W = 180;
  const H = 40;
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const pts = values.map((v, i) => [i, v]).filter(([, v]) => typeof v === "number");
  if (pts.length > 0) {
    const max = Math.max(...pts.map(([, v]) => v));
    const min = Math.min(0, ...pts.map(([, v]) => v));
    const span = max - min || 1;
    const n = Math.max(values.length - 1, 1);
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute(
      "points",
      pts.map(([i, v]) => ((i / n) * (W - 2) + 1).toFixed(1) + "," + (H - 2 - ((v - min) / span) * (H - 4)).toFixed(1)).join(" "),
    );
    svg.append(line);
  }
  return svg;
}

function renderDetail(site) {
  $("detail").hidden = false;
  $("detail").setAttribute("data-site", site.site);
  $("detail-site").textContent = site.site;
  const b = $("detail-state");
  b.textContent = site.state;
  b.className = "badge state-" + site.state;
  const history = site.history || [];
  const sig = site.signals || {};
  $("detail-meta").textContent =
    (site.reasons && site.reasons.length ? "reasons: " + site.reasons.join(", ") + " · " : "") +
    "since " + (site.since || "–") + " · last seen " + ago(site.last_seen) +
    " · version " + (sig.agent_version || "–") + " · " + history.length + " heartbeat(s)";
  const charts = CHARTS.map(([key, label, fmt]) => {
    const values = history.map((h) => h[key]);
    const last = values.length ? values[values.length - 1] : null;
    return el(
      "div",
      { class: "chart", "data-chart": key },
      el("div", { class: "label", text: label + " " }, el("span", { class: "value", text: last === null || last === undefined ? "–" : fmt(last) })),
      sparkline(values),
    );
  });
  $("charts").replaceChildren(...charts);
}

function renderAlerts() {
  const items = alerts.map((a) => {
    const inDrill = a.drill_id !== null && a.drill_id !== undefined;
    if (inDrill) {
      // Part of a planned drill: no incident colours, and the drill it belongs to.
      return el(
        "li",
        { class: "alert-drill", "data-alert": String(a.id), "data-site": a.site, "data-to": a.to, "data-drill": String(a.drill_id) },
        el("span", { class: "at", text: a.at }),
        el("strong", { text: a.site + " " }),
        a.from + " → " + a.to + " ",
        el("span", { class: "tag-drill", title: "a planned disaster-recovery drill, not an incident", text: "drill " + a.drill_id }),
        " " + (a.reasons || []).join(", "),
      );
    }
    return el(
      "li",
      { "data-alert": String(a.id), "data-site": a.site, "data-to": a.to },
      el("span", { class: "at", text: a.at }),
      el("strong", { text: a.site + " " }),
      a.from + " → ",
      badge(a.to),
      " " + (a.reasons || []).join(", "),
    );
  });
  if (items.length === 0) items.push(el("li", { class: "muted", text: "no alerts" }));
  $("alerts").replaceChildren(...items);
}

const SVG_NS = "http://www.w3.org/2000/svg";
// Series colours of the drill timeline come from the stylesheet (.series-0 ... .series-5).
const SERIES = 6;
// Sites shown one by one in the timeline's legend and lines; the rest are summed up in words.
const MAX_TIMELINE_SITES = 12;

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function seconds(ms) {
  if (ms === null || ms === undefined) return "–";
  return (ms / 1000).toFixed(1) + " s";
}

function clockOf(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "–";
}

function acceptedTotal(a) {
  if (!a) return 0;
  return (a.orders_confirmed || 0) + (a.orders_pending || 0) + (a.milestones || 0) + (a.other || 0);
}

// "cut ends in 12 s" while cut off (kept current by the 1 s ticker), else how the cut went.
function cutText(d) {
  if (d.phase === "cut_off") {
    if (!d.cut_until) return "cut off until the restored central starts";
    const left = Date.parse(d.cut_until) - Date.now();
    return "cut off; ends in " + (left > 0 ? duration(left) : "a moment") + " (at " + clockOf(d.cut_until) + ")";
  }
  const r = d.report || {};
  return "cut ended " + clockOf(d.cut_ended) + (r.cut_ms !== null && r.cut_ms !== undefined ? " after " + seconds(r.cut_ms) : "");
}

function tickCountdown() {
  const c = document.querySelector("#drill [data-field=countdown]");
  if (c && drill) c.textContent = cutText(drill);
}

function verdictOf(r) {
  if (!r || !r.final) return ["live", "in progress (live figures; discrepancies are checked at the end)"];
  return r.passed ? ["pass", "PASSED"] : ["fail", "FAILED"];
}

// Backlog depth over the drill, one polyline per site: x = bucket index × bucket_ms from
// timeline_start, y = events only at the site. Axis labels in seconds from the start.
function timelineChart(r) {
  const W = 640;
  const H = 180;
  const L = 44;
  const R = 12;
  const T = 20;
  const B = 30;
  const sites = (r.sites || []).slice(0, MAX_TIMELINE_SITES);
  const points = Math.max(1, ...sites.map((s) => (s.backlog_timeline || []).length));
  const bucket = r.bucket_ms || 1000;
  const spanMs = Math.max(1, (points - 1) * bucket);
  const max = Math.max(1, ...sites.flatMap((s) => s.backlog_timeline || []));
  const x = (ms) => L + (ms / spanMs) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const svg = svgEl("svg", {
    class: "timeline",
    "data-chart": "drill-timeline",
    width: W,
    height: H,
    viewBox: "0 0 " + W + " " + H,
    role: "img",
    "aria-label": "backlog depth per site over the drill",
  });
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.append(svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const v of [0, max]) {
    svg.append(svgEl("text", { class: "tick", x: L - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)));
  }
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    const ms = f * spanMs;
    const tx = x(ms).toFixed(1);
    const anchor = f === 0 ? "start" : f === 1 ? "end" : "middle";
    svg.append(svgEl("line", { class: "tickmark", x1: tx, y1: H - B, x2: tx, y2: H - B + 4 }));
    svg.append(svgEl("text", { class: "tick", x: tx, y: H - B + 16, "text-anchor": anchor }, ms < 10000 ? seconds(ms) : duration(ms)));
  }
  svg.append(svgEl("text", { class: "axis-label", x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle" }, "time since the drill started at " + clockOf(r.timeline_start)));
  svg.append(svgEl("text", { class: "axis-label", x: 2, y: 10 }, "events"));
  if (r.cut_ms !== null && r.cut_ms !== undefined && r.cut_ms <= spanMs) {
    const cx = x(r.cut_ms).toFixed(1);
    svg.append(svgEl("line", { class: "cut-end", x1: cx, y1: T, x2: cx, y2: H - B }));
    // Right of the line, or left of it near the chart's right edge.
    const right = x(r.cut_ms) < W - R - 60;
    const lx = (x(r.cut_ms) + (right ? 3 : -3)).toFixed(1);
    svg.append(svgEl("text", { class: "tick", x: lx, y: T - 6, "text-anchor": right ? "start" : "end" }, "cut ends"));
  }
  sites.forEach((s, i) => {
    const tl = s.backlog_timeline || [];
    if (tl.length === 0) return;
    const pts = tl.map((v, k) => x(k * bucket).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    svg.append(svgEl("polyline", { class: "series series-" + (i % SERIES), "data-site": s.site, points: pts }));
  });
  const legend = el(
    "div",
    { class: "legend" },
    ...sites.map((s, i) => el("span", { class: "legend-item" }, el("span", { class: "swatch series-" + (i % SERIES) }), s.site)),
  );
  if ((r.sites || []).length > sites.length) legend.append(el("span", { class: "muted", text: " and " + (r.sites.length - sites.length) + " more" }));
  return el("div", { class: "chart timeline-chart" }, el("div", { class: "label", text: "backlog depth (events only at the site) over the drill" }), svg, legend);
}

function exceptionsText(s) {
  const parts = Object.entries(s.exceptions || {}).map(([k, v]) => k + " " + v);
  if (s.dead_letters) parts.push("dead letters " + s.dead_letters);
  return parts.length ? parts.join(", ") : "none";
}

function drillSiteRow(s) {
  const a = s.accepted_while_cut_off || {};
  const acceptedTitle =
    "orders " + (a.orders_confirmed || 0) + " confirmed, " + (a.orders_pending || 0) + " pending; milestones " +
    (a.milestones || 0) + "; other " + (a.other || 0);
  return el(
    "tr",
    { "data-site": s.site },
    el("td", { "data-field": "site", text: s.site }),
    el("td", { class: "num", "data-field": "accepted", title: acceptedTitle, text: String(acceptedTotal(a)) }),
    el("td", { class: "num", "data-field": "peak_backlog", title: s.peak_backlog_at || "", text: String(s.peak_backlog ?? 0) }),
    el("td", { class: "num", "data-field": "oldest_event_age", text: seconds(s.oldest_event_age_ms) }),
    el("td", { class: "num", "data-field": "refused", text: String(s.refused_connections ?? 0) }),
    el("td", { class: "num", "data-field": "reconnect", title: s.reconnected || "", text: s.reconnected ? seconds(s.reconnect_ms) : "not yet" }),
    el("td", { class: "num", "data-field": "recovery", title: s.caught_up || "", text: s.caught_up ? seconds(s.recovery_ms) : "not yet" }),
    el("td", { class: "num", "data-field": "events", text: (s.events_received ?? 0) + " / " + (s.reuploaded ?? 0) + " / " + (s.duplicates_dropped ?? 0) }),
    el("td", { "data-field": "exceptions", text: exceptionsText(s) }),
    el("td", { class: "num" + (s.discrepancy_count ? " bad" : ""), "data-field": "discrepancies", text: String(s.discrepancy_count ?? 0) }),
    el("td", { class: "num" + (s.oversold_units ? " bad" : ""), "data-field": "oversold", text: String(s.oversold_units ?? 0) }),
  );
}

function renderDrill(d) {
  const box = $("drill");
  if (!d) {
    box.setAttribute("data-drill", "none");
    box.replaceChildren(el("p", { class: "muted", text: "no drill has run yet" }));
    return;
  }
  const r = d.report || {};
  const [cls, verdict] = verdictOf(r);
  box.setAttribute("data-drill", String(d.id));
  box.setAttribute("data-phase", d.phase);
  const head = el(
    "div",
    { class: "drill-head" },
    el("strong", { text: "Drill " + d.id + " " }),
    el("span", { "data-field": "kind", text: d.kind + (d.aborted ? " (aborted)" : "") + " " }),
    el("span", { class: "badge phase-" + d.phase, "data-field": "phase", text: d.phase.replace("_", " ") }),
    " ",
    el("span", { class: "verdict verdict-" + cls, "data-field": "verdict", text: verdict }),
  );
  const sites = d.sites || [];
  const meta = el(
    "div",
    { class: "drill-meta" },
    el("div", { text: "sites: " + (sites.length ? sites.join(", ") : "–") }),
    el("div", { "data-field": "countdown", text: cutText(d) }),
    el("div", {
      text:
        "started " + clockOf(d.started) + " · recovery timeout " + duration((d.recovery_timeout_secs || 0) * 1000) +
        (d.ended ? " · ended " + clockOf(d.ended) : ""),
    }),
  );
  if (d.note) meta.append(el("div", { text: "note: " + d.note }));
  if (d.backup && d.backup.path) meta.append(el("div", { text: "backup: " + d.backup.path + " (" + bytes(d.backup.bytes) + ")" }));
  if (r.final) {
    meta.append(
      el("div", {
        text:
          (r.events_accepted_while_cut_off ?? 0) + " event(s) accepted while cut off · " + (r.discrepancies ?? 0) +
          " discrepancies · " + (r.oversold_units ?? 0) + " units oversold · longest recovery " + seconds(r.max_recovery_ms) +
          " · oldest event at risk " + seconds(r.max_oldest_event_age_ms),
      }),
    );
  }
  const table = el(
    "table",
    { class: "drill-sites" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ...[
          ["site", ""],
          ["accepted while cut off", "orders, milestones and other events the site took while cut off"],
          ["peak backlog", "most events held only at the site"],
          ["oldest event", "age of the oldest event when central received it (the RPO of a real outage)"],
          ["refused", "sync connections central refused because of the drill"],
          ["reconnect", "from the end of the cut to the site's first session"],
          ["recovery", "from reconnection to central holding everything the site had"],
          ["received / re-sent / dup.", "events central received / re-sent from the site's retention / duplicates dropped"],
          ["exceptions", "exceptions by class, and dead letters"],
          ["discrepancies", "seqs the site acknowledged that central does not hold exactly once"],
          ["oversold", "units confirmed beyond what was available"],
        ].map(([t, title]) => el("th", { title: title || null, text: t })),
      ),
    ),
    el("tbody", {}, ...(r.sites || []).map(drillSiteRow)),
  );
  const children = [head, meta, table];
  const listed = (r.sites || []).flatMap((s) => (s.discrepancies || []).map((x) => [s.site, x]));
  if (listed.length) {
    children.push(
      el(
        "ul",
        { class: "discrepancies" },
        ...listed.map(([site, x]) =>
          el("li", { "data-site": site, text: site + ": " + x.kind + " seq " + x.from_seq + (x.through_seq !== x.from_seq ? "…" + x.through_seq : "") }),
        ),
      ),
    );
  }
  if ((r.sites || []).length) children.push(timelineChart(r));
  box.replaceChildren(...children);
}

// The active drill, else the newest. A central without drills (older version) just shows none.
async function refreshDrill() {
  let list;
  try {
    list = await getJson("/v1/drills?limit=1");
  } catch (e) {
    if (e instanceof HttpError && e.status === 404) {
      drill = null;
      return;
    }
    throw e;
  }
  let d = (list.drills || [])[0] || null;
  if (list.active !== null && list.active !== undefined && (!d || d.id !== list.active)) {
    d = await getJson("/v1/drills/" + list.active);
  }
  drill = d;
}

async function refreshAlerts() {
  for (let page = 0; page < MAX_ALERT_PAGES; page++) {
    const list = await getJson("/v1/alerts?limit=1000&after=" + alertCursor);
    for (const a of list) alerts.unshift(a);
    if (list.length > 0) alertCursor = list[list.length - 1].id;
    if (alerts.length > MAX_ALERTS) alerts.length = MAX_ALERTS;
    if (list.length < 1000) break;
  }
}

async function refresh() {
  if (!token()) {
    // Asked already: keep the banner that says why (a refused token, say).
    if ($("token-form").hidden) askToken("Paste a central API token to see the fleet.");
    return;
  }
  try {
    const fleet = await getJson("/v1/fleet");
    await refreshDrill();
    renderFleet(fleet);
    renderDrill(drill);
    await refreshAlerts();
    renderAlerts();
    if (selected) {
      try {
        renderDetail(await getJson("/v1/fleet/" + encodeURIComponent(selected)));
      } catch (e) {
        if (e instanceof HttpError && e.status === 404) {
          select(null);
        } else {
          throw e;
        }
      }
    }
    lastOk = new Date();
    $("updated").textContent = "updated " + lastOk.toLocaleTimeString();
    showBanner(null);
  } catch (e) {
    if (e instanceof HttpError && e.status === 401) {
      askToken("Central refused the token (401). Paste a valid token.");
      return;
    }
    const when = lastOk ? "; showing data from " + lastOk.toLocaleTimeString() : "";
    showBanner("Cannot refresh: " + (e.name === "AbortError" ? "timed out" : e.message) + when);
  }
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(async () => {
    await refresh();
    schedule();
  }, REFRESH_MS);
}

function select(site) {
  selected = site;
  const p = hashParams();
  if (site) p.set("site", site);
  else p.delete("site");
  setHash(p);
  if (!site) $("detail").hidden = true;
  for (const tr of document.querySelectorAll("#fleet-rows tr")) {
    tr.classList.toggle("selected", tr.getAttribute("data-site") === site);
  }
  if (site) refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromHash();
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token-input").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $("token-input").value = "";
    $("token-form").hidden = true;
    showBanner(null);
    refresh();
  });
  $("forget-token").addEventListener("click", () => askToken("Token forgotten."));
  $("detail-close").addEventListener("click", () => select(null));
  window.addEventListener("hashchange", () => {
    takeTokenFromHash();
    select(selected);
  });
  setInterval(tickCountdown, 1000);
  refresh().then(schedule);
});
