// Brume dashboard: plain JavaScript over the hub's JSON API (no build step, no CDN).
//
// Pages are routed by the URL fragment (#/data, #/fleet, #/agent/<id>, #/modules,
// #/deployment/<id>) and keep their state in it, so a view can be bookmarked or shared.
// Everything the hub sends is untrusted text (agent ids, labels, stream names come from
// devices): it reaches the page only through textContent and attributes, never as HTML.
"use strict";

const RANGES = { "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800, "30d": 2592000 };
const NS = 1e9;

/** Creates an element: h("td", {class: "num"}, "42", child, ...). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Thrown when the hub wants a token (HTTP 401): the shell shows the login form. */
class NeedLogin extends Error {}

/** GET (or another method) of the API; throws an Error with the hub's message. The
 * session cookie goes along (same origin); the CSRF header marks the request as the
 * dashboard's own, which the hub requires for changes made with the cookie. */
async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = Object.assign({ Accept: "application/json", "x-brume-csrf": "1" }, o.headers || {});
  const res = await fetch(path, o);
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!res.ok) {
    const msg = body && body.error ? body.error : text;
    if (res.status === 401) throw new NeedLogin(msg);
    throw new Error(`${res.status} ${path}: ${msg}`);
  }
  return body;
}

function fmtTime(ms) {
  if (ms === null || ms === undefined) return "";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function ago(ms) {
  if (!ms) return "never";
  return `${fmtAge(Math.max(0, Math.round((Date.now() - ms) / 1000)))} ago`;
}

/** A duration in seconds, short: 45 s, 12 min, 3 h, 2 d. */
function fmtAge(s) {
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function fmtNum(v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? String(v) : v.toPrecision(6).replace(/\.?0+$/, "");
}

function fmtStep(ns) {
  const s = ns / NS;
  if (s % 86400 === 0) return `${s / 86400}d`;
  if (s % 3600 === 0) return `${s / 3600}h`;
  if (s % 60 === 0) return `${s / 60}m`;
  return `${s}s`;
}

// Bucket widths the dashboard asks for, in seconds: round times make readable axes, and
// whole seconds keep bucket starts (ns since the epoch) exact in JavaScript's doubles,
// whose spacing at today's timestamps is 256 ns.
const STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];

/** The smallest step of at least `min` seconds giving at most `buckets` buckets over `span` s. */
function niceStep(span, buckets, min) {
  const want = Math.max(min, span / buckets);
  return STEPS.find((s) => s >= want) || Math.ceil(want / 86400) * 86400;
}

/** The route and its parameters, from the fragment. */
function route() {
  const frag = location.hash.replace(/^#/, "") || "/data";
  const [path, query] = frag.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || "data", arg: parts[1], params: new URLSearchParams(query || "") };
}

function setParams(params) {
  const r = route();
  const base = "#/" + [r.page, r.arg].filter(Boolean).map(encodeURIComponent).join("/");
  history.replaceState(null, "", base + "?" + params.toString());
}

// Timers and connections of the page on screen; closed when the page changes.
let cleanups = [];
function onLeave(f) { cleanups.push(f); }
function leave() { cleanups.forEach((f) => { try { f(); } catch (_) { /* already closed */ } }); cleanups = []; }

function every(ms, f) {
  const t = setInterval(f, ms);
  onLeave(() => clearInterval(t));
}

function showError(where, e) {
  where.replaceChildren(h("p", { class: "error" }, e.message || String(e)));
}

// ---------------------------------------------------------------- data page

/** Download `text` as a file named `name`. */
function download(name, type, text) {
  const a = h("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

async function pageData(main) {
  const p = route().params;
  const state = {
    stream: p.get("stream") || "",
    field: p.get("field") || "value",
    range: p.get("range") || "1h",
    from: p.get("from"), // ms, custom range only
    to: p.get("to"),
    label: p.get("label") || "",
    view: p.get("view") || "chart",
    live: p.get("live") !== "0",
  };
  const save = () => {
    const q = new URLSearchParams();
    if (state.stream) q.set("stream", state.stream);
    if (state.field !== "value") q.set("field", state.field);
    q.set("range", state.range);
    if (state.range === "custom") { q.set("from", state.from); q.set("to", state.to); }
    if (state.label) q.set("label", state.label);
    if (state.view !== "chart") q.set("view", state.view);
    if (!state.live) q.set("live", "0");
    setParams(q);
  };

  const search = h("input", { type: "search", id: "stream-search", placeholder: "Filter: temp, plant/+/temp, plant/#" });
  const list = h("ul", { class: "streams", id: "stream-list" });
  const side = h("div", { class: "panel" }, h("h2", {}, "Streams"), search, list);
  const out = h("div", { class: "panel", id: "data-panel" });
  main.replaceChildren(h("div", { class: "layout" }, side, out));

  let streams = [];
  const drawList = () => {
    const f = search.value.trim();
    const wildcard = f.includes("+") || f.includes("#");
    const shown = streams.filter((s) => !f || wildcard || s.stream.includes(f));
    list.replaceChildren(...shown.map((s) => {
      const name = s.build ? `${s.stream} @${s.build.slice(0, 8)}` : s.stream;
      return h("li", {
        class: s.stream === state.stream && !s.build ? "selected" : null,
        "data-stream": s.stream,
        title: `${s.readings} readings, ${fmtTime(s.first_ts_ns / 1e6)} … ${fmtTime(s.last_ts_ns / 1e6)}`,
        onclick: () => { if (!s.build) { state.stream = s.stream; save(); drawList(); load(); } },
      }, h("span", {}, name), h("span", { class: "n" }, s.readings));
    }));
    if (!shown.length) list.append(h("li", { class: "muted" }, streams.length ? "no stream matches" : "no data yet"));
  };
  const loadStreams = async () => {
    const f = search.value.trim();
    const q = new URLSearchParams();
    if (f.includes("+") || f.includes("#")) q.set("match", f);
    // With agents chosen by label, only the streams those agents sent.
    if (state.label) q.set("label", state.label);
    try { streams = await api(`/api/v1/streams?${q}`); drawList(); } catch (e) { showError(list, e); }
  };
  search.addEventListener("input", () => { if (/[+#]/.test(search.value)) loadStreams(); else drawList(); });
  every(10000, loadStreams);
  await loadStreams();

  // Controls.
  const field = h("input", { id: "field", value: state.field, size: 10, title: "numeric field" });
  field.addEventListener("change", () => { state.field = field.value.trim() || "value"; save(); load(); });
  const label = h("input", { id: "label", value: state.label, size: 16, placeholder: "site:plant-1",
    title: "Combine the stream across the agents with this label (key:value): mean and p50/p95 of the agents' means" });
  label.addEventListener("change", () => { state.label = label.value.trim(); save(); loadStreams(); load(); });
  const rangeButtons = Object.keys(RANGES).map((r) => h("button", {
    "data-range": r, class: state.range === r ? "on" : null,
    onclick: () => { state.range = r; save(); load(); },
  }, r));
  const toLocal = (ms) => new Date(ms - new Date().getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  const fromIn = h("input", { type: "datetime-local", id: "from" });
  const toIn = h("input", { type: "datetime-local", id: "to" });
  const custom = h("button", { onclick: () => {
    const f = Date.parse(fromIn.value), t = Date.parse(toIn.value);
    if (!(f < t)) { alert("Custom range: the start must be before the end."); return; }
    state.range = "custom"; state.from = f; state.to = t; save(); load();
  } }, "Apply");
  const live = h("input", { type: "checkbox", id: "live", checked: state.live ? true : null });
  live.addEventListener("change", () => { state.live = live.checked; save(); load(); });
  const viewBtn = h("button", { id: "view-toggle", onclick: () => {
    state.view = state.view === "chart" ? "table" : "chart"; save(); render();
  } });
  const csvBtn = h("button", { id: "export-csv", onclick: () => exportCsv() }, "Export CSV");
  const jsonBtn = h("button", { id: "export-json", onclick: () => exportJson() }, "Export JSON");
  const title = h("h2", { id: "data-title" });
  const summary = h("div", { class: "summary", id: "data-summary" });
  const body = h("div", { id: "data-body" });
  out.replaceChildren(
    title,
    h("div", { class: "controls" }, h("label", {}, "field"), field, h("label", {}, "agents"), label, ...rangeButtons),
    h("div", { class: "controls" }, h("label", {}, "from"), fromIn, h("label", {}, "to"), toIn, custom,
      h("label", { for: "live" }, live, " live"), viewBtn, csvBtn, jsonBtn),
    summary, body);

  let result = null; // the last answer: {fleet, step_ns, from_ns, to_ns, buckets}
  let plot = null;
  let liveConn = null;
  onLeave(() => { if (plot) plot.destroy(); if (liveConn) liveConn.close(); });

  const columns = () => result.fleet
    ? ["start_ns", "agents", "count", "min", "max", "mean", "p50", "p95"]
    : ["start_ns", "count", "min", "max", "mean", "last"];

  function exportCsv() {
    if (!result) return;
    const cols = columns();
    const lines = [["start", ...cols].join(",")];
    for (const b of result.buckets) {
      lines.push([new Date(b.start_ns / 1e6).toISOString(), ...cols.map((c) => b[c])].map(csvCell).join(","));
    }
    download(`${state.stream.replace(/[^A-Za-z0-9_.-]+/g, "_")}-${state.field}.csv`, "text/csv", lines.join("\n") + "\n");
  }
  function exportJson() {
    if (!result) return;
    download(`${state.stream.replace(/[^A-Za-z0-9_.-]+/g, "_")}-${state.field}.json`, "application/json",
      JSON.stringify(result.raw, null, 2));
  }

  function render() {
    viewBtn.textContent = state.view === "chart" ? "Table" : "Chart";
    if (!result) return;
    const n = result.buckets.length;
    const what = result.fleet
      ? `${result.raw.agents === null ? "all agents" : `${result.raw.agents.length} agents with ${state.label}`}`
      : `source ${result.raw.source}`;
    summary.textContent = `${n} buckets of ${fmtStep(result.step_ns)}, ${fmtTime(result.from_ns / 1e6)} … ${fmtTime(result.to_ns / 1e6)}, ${what}`;
    if (state.view === "table") {
      if (plot) { plot.destroy(); plot = null; }
      const cols = columns();
      const rows = result.buckets.slice().reverse().map((b) => h("tr", {},
        h("td", {}, fmtTime(b.start_ns / 1e6)), ...cols.slice(1).map((c) => h("td", { class: "num" }, fmtNum(b[c])))));
      body.replaceChildren(h("div", { class: "tablewrap" }, h("table", { id: "data-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "start"), ...cols.slice(1).map((c) => h("th", { class: "num" }, c)))),
        h("tbody", {}, rows))));
      body.dataset.points = String(n);
      return;
    }
    drawChart();
  }

  function drawChart() {
    // x in seconds; a null between two buckets more than a step apart breaks the line,
    // so a gap in the data shows as a gap in the chart.
    const step = result.step_ns / NS;
    const xs = [], mins = [], maxs = [], means = [], p50 = [], p95 = [], counts = [];
    let prev = null;
    for (const b of result.buckets) {
      const x = b.start_ns / NS;
      if (prev !== null && x - prev > step) {
        xs.push(prev + step); [mins, maxs, means, p50, p95, counts].forEach((a) => a.push(null));
      }
      xs.push(x); mins.push(b.min); maxs.push(b.max); means.push(b.mean); counts.push(b.count);
      if (result.fleet) { p50.push(b.p50); p95.push(b.p95); }
      prev = x;
    }
    const series = [{},
      { label: "min", stroke: "rgba(45,108,223,0.35)", width: 1, points: { show: false } },
      { label: "max", stroke: "rgba(45,108,223,0.35)", width: 1, points: { show: false } },
      { label: "mean", stroke: "#2d6cdf", width: 2 }];
    const data = [xs, mins, maxs, means];
    if (result.fleet) {
      series.push({ label: "p50", stroke: "#1f8a4c", width: 1.5 }, { label: "p95", stroke: "#c0392b", width: 1.5 });
      data.push(p50, p95);
    }
    // Readings per bucket, off until its legend entry is clicked: it is noisy at fine steps.
    series.push({ label: "count", stroke: "#999", width: 1, scale: "count", show: false });
    data.push(counts);
    const width = Math.max(300, body.clientWidth || out.clientWidth - 30);
    const opts = {
      width, height: 360, series,
      bands: [{ series: [2, 1], fill: "rgba(45,108,223,0.12)" }],
      // The whole window asked for, not just the span with data: a gap at either end shows.
      scales: { x: { time: true, range: () => [result.from_ns / NS, result.to_ns / NS] } },
      axes: [{}, { label: state.field }, { side: 1, scale: "count", label: "count", grid: { show: false } }],
      legend: { live: true },
    };
    if (plot) plot.destroy();
    const el = h("div", { id: "chart" });
    body.replaceChildren(el);
    plot = new uPlot(opts, data, el);
    // For tests and for the curious: how many buckets the chart draws.
    el.dataset.points = String(means.filter((v) => v !== null).length);
    body.dataset.points = el.dataset.points;
  }

  function window_() {
    if (state.range === "custom" && state.from && state.to) return [Number(state.from), Number(state.to)];
    const now = Date.now();
    return [now - (RANGES[state.range] || 3600) * 1000, now];
  }

  async function load() {
    rangeButtons.forEach((b) => b.classList.toggle("on", b.dataset.range === state.range));
    if (liveConn) { liveConn.close(); liveConn = null; }
    if (!state.stream) {
      title.textContent = "Pick a stream";
      summary.textContent = "";
      body.replaceChildren(h("p", { class: "muted" }, "Streams the hub has stored are listed on the left."));
      return;
    }
    title.textContent = state.label ? `${state.stream} · ${state.field} · agents ${state.label}` : `${state.stream} · ${state.field}`;
    const [f, t] = window_();
    fromIn.value = toLocal(f); toIn.value = toLocal(t);
    // At most one bucket per two pixels: never more points than the chart can draw.
    const fleet = !!state.label;
    const buckets = Math.min(1000, Math.max(50, Math.floor((out.clientWidth || 800) / 2)));
    const step = niceStep((t - f) / 1000, buckets, fleet ? 60 : 1);
    const q = new URLSearchParams({ stream: state.stream, field: state.field,
      from: String(Math.floor(f) * 1e6), to: String(Math.ceil(t) * 1e6), step: fmtStep(step * NS) });
    if (fleet) q.append("label", state.label);
    const path = `/api/v1/${fleet ? "fleet/aggregate" : "aggregate"}?${q}`;
    try {
      const raw = await api(path);
      result = { fleet, raw, step_ns: raw.step_ns, from_ns: raw.from_ns, to_ns: raw.to_ns, buckets: raw.buckets };
      body.dataset.query = path; // what is drawn came from this request
    } catch (e) {
      result = null; summary.textContent = ""; showError(body, e); return;
    }
    render();
    if (state.live && state.range !== "custom") startLive(fleet);
  }

  /** Keeps the window sliding: server-sent buckets for a stream, a re-query for a fleet. */
  function startLive(fleet) {
    if (fleet) {
      const t = setInterval(load, 15000);
      liveConn = { close: () => clearInterval(t) };
      return;
    }
    const q = new URLSearchParams({ stream: state.stream, field: state.field, step: fmtStep(result.step_ns) });
    const es = new EventSource(`/api/v1/tail?${q}`);
    liveConn = es;
    let pending = false;
    es.addEventListener("bucket", (ev) => {
      const b = JSON.parse(ev.data);
      const span = (RANGES[state.range] || 3600) * NS;
      const bs = result.buckets;
      const i = bs.findIndex((x) => x.start_ns === b.start_ns);
      if (i >= 0) bs[i] = b; else { bs.push(b); bs.sort((x, y) => x.start_ns - y.start_ns); }
      result.to_ns = Math.max(result.to_ns, b.start_ns + result.step_ns);
      result.from_ns = result.to_ns - span;
      while (bs.length && bs[0].start_ns < result.from_ns) bs.shift();
      result.raw.buckets = bs;
      // Several buckets may arrive at once: draw once.
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; render(); }); }
    });
  }

  await load();
}

// ---------------------------------------------------------------- fleet pages

/** Presence, completeness and quarantine of every agent, joined by agent id. */
async function fleetRows() {
  const [presence, agents, quarantine] = await Promise.all([
    api("/api/v1/presence"), api("/api/v1/agents"), api("/api/v1/quarantine?limit=1000")]);
  const rows = new Map();
  const row = (id) => {
    if (!rows.has(id)) rows.set(id, { id, presence: null, epochs: [], quarantined: 0, quarantine: [] });
    return rows.get(id);
  };
  presence.forEach((p) => { row(p.agent_id).presence = p; });
  agents.forEach((a) => row(a.agent_id).epochs.push(a));
  quarantine.batches.forEach((q) => { const r = row(q.agent_id); r.quarantined += 1; r.quarantine.push(q); });
  return [...rows.values()].sort((a, b) => a.id.localeCompare(b.id));
}

function gapsOf(r) {
  const ranges = r.epochs.flatMap((e) => e.missing);
  return ranges.reduce((n, [lo, hi]) => n + (hi - lo + 1), 0);
}
function lossesOf(r) { return r.epochs.flatMap((e) => e.losses).reduce((n, l) => n + l.total, 0); }
function lastSeen(r) {
  return Math.max(r.presence ? r.presence.last_seen_ms : 0, ...r.epochs.map((e) => e.last_seen_ms || 0));
}

async function pageFleet(main) {
  const cards = h("div", { class: "cards" });
  const filter = h("input", { type: "search", id: "agent-filter", placeholder: "Filter by id or label (site=plant-1)" });
  const table = h("div", { class: "tablewrap" });
  main.replaceChildren(cards, h("div", { class: "controls" }, filter), table);
  let rows = [];
  const draw = () => {
    const f = filter.value.trim();
    const shown = rows.filter((r) => {
      if (!f) return true;
      const labels = r.presence ? Object.entries(r.presence.labels).map(([k, v]) => `${k}=${v}`) : [];
      return r.id.includes(f) || labels.some((l) => l.includes(f));
    });
    const online = rows.filter((r) => r.presence && r.presence.online).length;
    const card = (k, v, cls) => h("div", { class: "card" }, h("div", { class: `v ${cls || ""}` }, v), h("div", { class: "k" }, k));
    cards.replaceChildren(
      card("agents", rows.length), card("online", online, "online"), card("offline", rows.length - online, rows.length - online ? "offline" : ""),
      card("missing batches", rows.reduce((n, r) => n + gapsOf(r), 0)),
      card("quarantined", rows.reduce((n, r) => n + r.quarantined, 0)));
    const head = ["agent", "status", "last seen", "version", "platform", "labels", "store", "outbox", "backlog age", "batches", "missing", "lost", "quarantined"];
    table.replaceChildren(h("table", { id: "fleet-table" },
      h("thead", {}, h("tr", {}, head.map((c, i) => h("th", { class: i >= 6 ? "num" : null }, c)))),
      h("tbody", {}, shown.map((r) => {
        const p = r.presence;
        const labels = p ? Object.entries(p.labels).filter(([k]) => !k.startsWith("brume.")) : [];
        const platform = p ? [p.labels["brume.arch"], p.labels["brume.build"]].filter(Boolean).join(" ") : "";
        const gaps = gapsOf(r);
        return h("tr", { "data-agent": r.id },
          h("td", {}, h("a", { href: `#/agent/${encodeURIComponent(r.id)}` }, r.id)),
          h("td", { class: p ? (p.online ? "online" : "offline") : "muted", "data-status": p ? (p.online ? "online" : "offline") : "unknown" },
            p ? (p.online ? "online" : "offline") : "no presence"),
          h("td", { title: fmtTime(lastSeen(r)) }, ago(lastSeen(r))),
          h("td", {}, p ? p.version : ""),
          h("td", {}, platform),
          h("td", {}, labels.map(([k, v]) => h("span", { class: "pill" }, `${k}=${v}`))),
          h("td", { class: "num" }, p ? p.store_readings : ""),
          h("td", { class: "num", title: p ? `${p.outbox_readings} readings` : null }, p ? p.outbox_batches : ""),
          h("td", { class: `num ${p && p.backlog_age_s > 300 ? "warn" : ""}`, "data-backlog": p && p.backlog_age_s !== null ? p.backlog_age_s : null },
            p && p.backlog_age_s !== null && p.backlog_age_s !== undefined ? fmtAge(p.backlog_age_s) : ""),
          h("td", { class: "num" }, r.epochs.reduce((n, e) => n + e.batches, 0)),
          h("td", { class: `num ${gaps ? "warn" : ""}` }, gaps),
          h("td", { class: "num" }, lossesOf(r)),
          h("td", { class: `num ${r.quarantined ? "warn" : ""}` }, r.quarantined));
      }))));
    if (!rows.length) table.append(h("p", { class: "muted" }, "No agent has connected yet."));
  };
  const refresh = async () => {
    try { rows = await fleetRows(); draw(); } catch (e) { showError(table, e); }
  };
  filter.addEventListener("input", draw);
  every(5000, refresh);
  await refresh();
}

async function pageAgent(main, id) {
  const box = h("div", {});
  main.replaceChildren(h("p", {}, h("a", { href: "#/fleet" }, "← Fleet")), box);
  const refresh = async () => {
    let rows, control, builds, streams;
    try {
      [rows, control, builds, streams] = await Promise.all([fleetRows(), api("/api/v1/fleet/agents"), api("/api/v1/modules"),
        api(`/api/v1/streams?agent=${encodeURIComponent(id)}`)]);
    } catch (e) { showError(box, e); return; }
    const r = rows.find((x) => x.id === id);
    if (!r) { box.replaceChildren(h("p", { class: "error" }, `The hub knows no agent ${JSON.stringify(id)}.`)); return; }
    const p = r.presence;
    const c = control.find((x) => x.agent_id === id);
    const kv = (pairs) => h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const parts = [h("h2", { id: "agent-title" }, id, " ",
      h("span", { class: p && p.online ? "online" : "offline", "data-status": p ? (p.online ? "online" : "offline") : "unknown" },
        p ? (p.online ? "online" : "offline") : "no presence"))];
    if (p) {
      parts.push(kv([
        ["last seen", `${ago(p.last_seen_ms)} (${fmtTime(p.last_seen_ms)})`],
        ["version", p.version], ["uptime", `${p.uptime_s} s`], ["heartbeat", `${p.heartbeat_s} s`],
        ["labels", Object.entries(p.labels).map(([k, v]) => h("span", { class: "pill" }, `${k}=${v}`))],
        ["store", `${p.store_readings} readings`], ["outbox", `${p.outbox_batches} batches, ${p.outbox_readings} readings`],
        ["backlog age", p.backlog_age_s === null || p.backlog_age_s === undefined ? "none" : fmtAge(p.backlog_age_s)],
      ]));
      parts.push(h("h2", {}, "Modules running"), p.modules.length ? h("table", {},
        h("thead", {}, h("tr", {}, ["module", "build", "enabled", "failed batches", "last error"].map((x) => h("th", {}, x)))),
        h("tbody", {}, p.modules.map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, h("code", {}, m.sha256.slice(0, 12))),
          h("td", {}, m.enabled ? "yes" : "no"), h("td", { class: "num" }, m.batches_failed), h("td", { class: "error" }, m.last_error || "")))))
        : h("p", { class: "muted" }, "none"));
    }
    if (c) {
      parts.push(h("h2", {}, "Rollouts"), kv([["desired generation", c.desired_generation], ["reported generation", c.reported_generation],
        ["in sync", c.in_sync ? "yes" : "no"]]));
      if (c.modules.length) parts.push(h("table", {},
        h("thead", {}, h("tr", {}, ["module", "deployment", "phase", "wanted", "running", "ok / failed batches", "error"].map((x) => h("th", {}, x)))),
        h("tbody", {}, c.modules.map((m) => h("tr", {}, h("td", {}, m.name),
          h("td", {}, m.deployment ? h("a", { href: `#/deployment/${m.deployment}` }, `#${m.deployment}`) : ""),
          h("td", {}, m.phase), h("td", {}, m.wanted.version), h("td", {}, m.running ? m.running.version : ""),
          h("td", { class: "num" }, `${m.batches_ok} / ${m.batches_failed}`), h("td", { class: "error" }, m.error || ""))))));
    }
    parts.push(h("h2", {}, "Streams"), streams.length ? h("table", { id: "agent-streams" },
      h("thead", {}, h("tr", {}, ["stream", "readings", "first", "last"].map((x) => h("th", {}, x)))),
      h("tbody", {}, streams.map((s) => h("tr", {},
        h("td", {}, s.build ? `${s.stream} @${s.build.slice(0, 8)}` : h("a", { href: `#/data?stream=${encodeURIComponent(s.stream)}&range=24h` }, s.stream)),
        h("td", { class: "num" }, s.readings), h("td", {}, fmtTime(s.first_ts_ns / 1e6)), h("td", {}, fmtTime(s.last_ts_ns / 1e6))))))
      : h("p", { class: "muted" }, "none stored yet"));
    parts.push(h("h2", {}, "Completeness per epoch"), h("table", {},
      h("thead", {}, h("tr", {}, ["epoch", "batches", "readings", "watermark", "max seq", "missing", "missing since", "losses"].map((x) => h("th", {}, x)))),
      h("tbody", {}, r.epochs.map((e) => h("tr", {}, h("td", {}, h("code", {}, e.epoch)), h("td", { class: "num" }, e.batches),
        h("td", { class: "num" }, e.readings), h("td", { class: "num" }, e.watermark), h("td", { class: "num" }, e.max_seq),
        h("td", { class: e.missing.length ? "warn" : null }, e.missing.map(([lo, hi]) => lo === hi ? `${lo}` : `${lo}–${hi}`).join(", ")),
        h("td", {}, e.missing_since_ms ? ago(e.missing_since_ms) : ""),
        h("td", {}, e.losses.map((l) => `${l.stream}: ${l.total} ${l.reason}`).join(", ")))))));
    parts.push(h("h2", {}, "Quarantined batches"), r.quarantine.length ? h("table", { id: "quarantine-table" },
      h("thead", {}, h("tr", {}, ["id", "seq", "reason", "error", "bytes", "deliveries", "last received", ""].map((x) => h("th", {}, x)))),
      h("tbody", {}, r.quarantine.map((q) => h("tr", {}, h("td", {}, q.id), h("td", { class: "num" }, q.seq), h("td", {}, q.reason),
        h("td", { class: "error" }, q.error), h("td", { class: "num" }, q.bytes), h("td", { class: "num" }, q.deliveries),
        h("td", {}, fmtTime(q.last_received_ms)),
        h("td", {}, h("a", { href: `/api/v1/quarantine/${q.id}/payload`, download: `quarantine-${q.id}.bin` }, "payload"))))))
      : h("p", { class: "muted" }, "none"));
    parts.push(h("h2", {}, "Module builds that computed stored readings (lineage, whole fleet)"), builds.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["module", "version", "build", "agents", "readings"].map((x) => h("th", {}, x)))),
      h("tbody", {}, builds.map((b) => h("tr", {}, h("td", {}, b.name), h("td", {}, b.version), h("td", {}, h("code", {}, b.sha256.slice(0, 12))),
        h("td", { class: "num" }, b.agents), h("td", { class: "num" }, b.readings)))))
      : h("p", { class: "muted" }, "none"));
    box.replaceChildren(...parts);
  };
  every(5000, refresh);
  await refresh();
}

// ---------------------------------------------------------------- modules and rollouts

async function pageModules(main) {
  const box = h("div", {});
  main.replaceChildren(box);
  const refresh = async () => {
    let registry, deployments;
    try { [registry, deployments] = await Promise.all([api("/api/v1/registry/modules"), api("/api/v1/deployments")]); } catch (e) { showError(box, e); return; }
    const moduleSel = h("select", { id: "deploy-module" }, registry.map((m) => h("option", { value: `${m.name}\u0000${m.version}` }, `${m.name} ${m.version}`)));
    const selector = h("input", { id: "deploy-selector", placeholder: "site=plant-1, brume.arch=aarch64", size: 30 });
    const waves = h("input", { id: "deploy-waves", placeholder: "1, 10%, 100%", size: 14 });
    const probation = h("input", { id: "deploy-probation", placeholder: "30s", size: 6, title: "how long a wave runs without failure before the next starts" });
    const config = h("input", { id: "deploy-config", placeholder: '{"limit": 30}', size: 18, title: "the module's config, JSON" });
    const msg = h("span", { class: "summary" });
    const deploy = h("button", { onclick: async () => {
      const [name, version] = moduleSel.value.split("\u0000");
      const sel = {};
      for (const kv of selector.value.split(",").map((s) => s.trim()).filter(Boolean)) {
        const i = kv.indexOf("=");
        if (i < 1) { msg.textContent = `selector ${JSON.stringify(kv)} is not key=value`; return; }
        sel[kv.slice(0, i).trim()] = kv.slice(i + 1).trim();
      }
      const body = { module: name, version, selector: sel };
      if (probation.value.trim()) body.probation = probation.value.trim();
      if (config.value.trim()) {
        try { body.config = JSON.parse(config.value); } catch (e) { msg.textContent = `config is not JSON: ${e.message}`; return; }
      }
      if (waves.value.trim()) body.waves = waves.value.split(",").map((s) => s.trim()).filter(Boolean);
      try {
        const d = await api("/api/v1/deployments", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
        location.hash = `#/deployment/${d.id}`;
      } catch (e) { msg.textContent = e.message; }
    } }, "Deploy");
    box.replaceChildren(
      h("h2", {}, "Registry"),
      registry.length ? h("table", { id: "registry-table" },
        h("thead", {}, h("tr", {}, ["module", "version", "sha256", "size", "signed by", "uploaded"].map((x) => h("th", {}, x)))),
        h("tbody", {}, registry.map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, m.version), h("td", {}, h("code", {}, m.sha256.slice(0, 16))),
          h("td", { class: "num" }, m.size), h("td", {}, m.key_id || ""), h("td", {}, fmtTime(m.uploaded_ms))))))
        : h("p", { class: "muted" }, "No module uploaded yet: cloud-hub module upload --help."),
      registry.length ? h("div", { class: "controls" }, h("label", {}, "deploy"), moduleSel, h("label", {}, "to agents with"), selector,
        h("label", {}, "config"), config, h("label", {}, "waves"), waves, h("label", {}, "probation"), probation, deploy, msg) : "",
      h("h2", {}, "Deployments"),
      deployments.length ? h("table", { id: "deployments-table" },
        h("thead", {}, h("tr", {}, ["id", "module", "state", "wave", "agents", "reason", "created"].map((x) => h("th", {}, x)))),
        h("tbody", {}, deployments.slice().reverse().map((d) => h("tr", {},
          h("td", {}, h("a", { href: `#/deployment/${d.id}` }, `#${d.id}`)), h("td", {}, `${d.module} ${d.version}`),
          h("td", {}, d.state), h("td", {}, `${d.wave + 1} / ${d.waves.length}`),
          h("td", {}, Object.entries(d.agents || {}).map(([k, v]) => h("span", { class: "pill" }, `${k} ${v}`))),
          h("td", { class: "error" }, d.reason || ""), h("td", {}, fmtTime(d.created_ms))))))
        : h("p", { class: "muted" }, "No deployment yet."));
  };
  every(5000, refresh);
  await refresh();
}

// The actions the hub accepts in each deployment state (others answer 409).
const ACTIONS = { rolling: ["pause", "abort", "rollback"], paused: ["resume", "abort", "rollback"], done: ["rollback"] };

async function pageDeployment(main, id) {
  const box = h("div", {});
  main.replaceChildren(h("p", {}, h("a", { href: "#/modules" }, "← Modules")), box);
  const refresh = async () => {
    let d;
    try { d = await api(`/api/v1/deployments/${encodeURIComponent(id)}`); } catch (e) { showError(box, e); return; }
    const msg = h("span", { class: "summary" });
    const act = (action) => h("button", { class: action === "pause" || action === "resume" ? null : "danger", "data-action": action, onclick: async () => {
      const reason = prompt(`${action} deployment #${d.id}: reason (recorded with it)`, "");
      if (reason === null) return;
      try {
        await api(`/api/v1/deployments/${d.id}/${action}`, { method: "POST", body: JSON.stringify({ reason }), headers: { "Content-Type": "application/json" } });
        refresh();
      } catch (e) { msg.textContent = e.message; }
    } }, action);
    const kv = (pairs) => h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    box.replaceChildren(
      h("h2", {}, `Deployment #${d.id}: ${d.module} ${d.version} — `, h("span", { id: "deployment-state", "data-state": d.state }, d.state)),
      kv([["wave", `${d.wave + 1} of ${d.waves.join(", ")}`], ["selector", JSON.stringify(d.selector)],
        ["probation", `${d.probation_s} s`], ["shadow", d.shadow ? "yes" : "no"], ["reason", d.reason || ""],
        ["agents", Object.entries(d.agents || {}).map(([k, v]) => `${k} ${v}`).join(", ")],
        ["updated", fmtTime(d.updated_ms)]]),
      h("div", { class: "controls" }, (ACTIONS[d.state] || []).map(act), msg),
      h("h2", {}, "Agents"),
      h("table", { id: "progress-table" },
        h("thead", {}, h("tr", {}, ["agent", "wave", "phase", "online", "running", "canary: inputs → outputs (was)", "drift", "error"].map((x) => h("th", {}, x)))),
        h("tbody", {}, (d.agent_progress || []).map((a) => h("tr", {},
          h("td", {}, h("a", { href: `#/agent/${encodeURIComponent(a.agent_id)}` }, a.agent_id)), h("td", { class: "num" }, a.wave + 1),
          h("td", {}, a.phase), h("td", { class: a.online ? "online" : "offline" }, a.online ? "online" : "offline"),
          h("td", {}, a.running ? a.running.version : ""),
          h("td", {}, a.shadow ? `${a.shadow.inputs} → ${a.shadow.outputs} (${a.shadow.running_outputs})` : ""),
          h("td", {}, a.shadow && a.shadow.max_mean_drift_pct !== null ? `${fmtNum(a.shadow.max_mean_drift_pct)} %` : ""),
          h("td", { class: "error" }, a.error || (a.shadow && a.shadow.last_error) || ""))))));
  };
  every(5000, refresh);
  await refresh();
}

// ---------------------------------------------------------------- shell

async function hubStatus() {
  const el = document.getElementById("hub-status");
  try {
    const res = await fetch("/readyz");
    const r = await res.json();
    el.textContent = `broker ${r.mqtt} · store ${r.store}`;
    el.className = res.ok ? "online" : "offline";
  } catch (e) {
    el.textContent = "hub unreachable";
    el.className = "offline";
  }
}

/** The login form: the token is sent once, to POST /api/v1/session, which keeps it in an
 * HttpOnly cookie (never readable by this script afterwards). */
function pageLogin(main, why) {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", placeholder: "brume_…", size: 50 });
  const err = h("p", { class: "error", id: "login-error" });
  const form = h("form", {
    id: "login",
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        await api("/api/v1/session", { method: "POST", body: JSON.stringify({ token: input.value.trim() }), headers: { "Content-Type": "application/json" } });
        input.value = "";
        await sessionBar();
        show();
      } catch (e) { err.textContent = e.message; }
    },
  }, h("label", {}, "API token ", input), " ", h("button", { type: "submit" }, "Log in"));
  main.replaceChildren(h("h1", {}, "Log in"),
    h("p", { class: "muted" }, why || "This hub needs an API token with the read scope (cloud-hub token)."), form, err);
  document.body.dataset.ready = "login";
  input.focus();
}

/** Who is logged in, with a log-out button; empty when the API is open. */
async function sessionBar() {
  const el = document.getElementById("session");
  try {
    const s = await api("/api/v1/session");
    if (s.open) { el.replaceChildren(); return; }
    el.replaceChildren(h("span", { id: "session-name" }, `${s.name} (${s.scopes.join(", ")})`), " ",
      h("button", { id: "logout", onclick: async () => {
        await api("/api/v1/session", { method: "DELETE" }).catch(() => {});
        await sessionBar();
        show();
      } }, "Log out"));
  } catch (_) { el.replaceChildren(); }
}

async function show() {
  leave();
  const r = route();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active",
    a.dataset.page === r.page || (r.page === "agent" && a.dataset.page === "fleet") || (r.page === "deployment" && a.dataset.page === "modules")));
  const main = document.getElementById("main");
  main.replaceChildren();
  const pages = { data: pageData, fleet: pageFleet, agent: pageAgent, modules: pageModules, deployment: pageDeployment };
  const page = pages[r.page];
  if (!page) { main.append(h("p", { class: "error" }, `No page ${JSON.stringify(r.page)}.`)); return; }
  // Pages load parts in the background and show their errors in place: ask first whether
  // the hub wants a token this browser does not have.
  try { await api("/api/v1/session"); } catch (e) {
    if (e instanceof NeedLogin) { pageLogin(main); return; }
  }
  try { await page(main, r.arg); } catch (e) {
    if (e instanceof NeedLogin) { leave(); pageLogin(main, e.message); return; }
    showError(main, e);
  }
  document.body.dataset.ready = r.page;
}

window.addEventListener("hashchange", show);
hubStatus();
sessionBar();
setInterval(hubStatus, 10000);
show();
