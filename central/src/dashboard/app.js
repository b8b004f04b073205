// Outpost fleet dashboard: plain JS, no framework, no third-party code. Reads central's JSON
// API (GET /v1/fleet, /v1/fleet/{site}, /v1/alerts) with a bearer token that the operator
// pastes once or passes in the URL fragment (#token=...); fragments never reach the server.
// The token is kept in sessionStorage (this tab only) and removed from the address bar.
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
      el("td", { "data-field": "reasons", text: (s.reasons || []).join(", ") }),
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
  const items = alerts.map((a) =>
    el(
      "li",
      { "data-alert": String(a.id), "data-site": a.site, "data-to": a.to },
      el("span", { class: "at", text: a.at }),
      el("strong", { text: a.site + " " }),
      a.from + " → ",
      badge(a.to),
      " " + (a.reasons || []).join(", "),
    ),
  );
  if (items.length === 0) items.push(el("li", { class: "muted", text: "no alerts" }));
  $("alerts").replaceChildren(...items);
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
    renderFleet(fleet);
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
  refresh().then(schedule);
});
