// The dashboard's client: renders each snapshot the server sends (first
// from /api/snapshot, then live over server-sent events), no reloads.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function ms(v) { return Number.isFinite(v) ? v.toFixed(1) + " ms" : "–"; }
function pct(v) { return Number.isFinite(v) ? (v * 100).toFixed(1) + "%" : "–"; }
function rate(v) { return v >= 0.99 ? "ok" : v >= 0.9 ? "warn" : "fail"; }

// The latest probe results by service, for the services' rows.
let probesBy = new Map();

function probeCell(name) {
  const list = probesBy.get(name) || [];
  if (!list.length) return el("td", { class: "note" }, "–");
  const say = (o) => !o ? "not run" : o.ok ? `ok ${ms(o.latency_ms)}` : "FAIL";
  const worst = list.some((p) => p.status === "fail") ? "fail" : list.some((p) => p.status === "warn") ? "warn" : "ok";
  return el("td", { class: worst, "data-probe-service": name, title: list.map((p) => p.detail).join("\n") },
    list.map((p) => `${say(p.mesh)} · ${say(p.direct)}`).join("; "));
}

function probes(rows) {
  probesBy = new Map();
  for (const p of rows) {
    if (!probesBy.has(p.authority)) probesBy.set(p.authority, []);
    probesBy.get(p.authority).push(p);
  }
  const outcome = (o) => !o ? el("td", {}, "not run yet")
    : el("td", { class: o.ok ? "ok" : "fail" }, o.ok ? `ok in ${ms(o.latency_ms)}` : `failed: ${o.error || "?"}`);
  $("#probes tbody").replaceChildren(...rows.map((p) => el("tr", { "data-probe": p.probe, "data-probe-status": p.status },
    el("th", { scope: "row" }, p.probe), el("td", {}, p.kind), el("td", {}, p.authority || "–"),
    outcome(p.mesh), outcome(p.direct),
    el("td", { class: p.status }, el("span", { class: "badge" }, p.status === "ok" ? "ok" : p.status.toUpperCase()), ` ${p.detail}`))));
  $("#no-probes").hidden = rows.length > 0;
}

function services(rows) {
  const body = $("#services tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr", { "data-service": r.name, "data-rps": r.rps.toFixed(3) });
    tr.append(
      el("th", { scope: "row" }, r.name),
      el("td", { class: rate(r.success_rate) }, pct(r.success_rate)),
      el("td", { class: "rps" }, r.rps.toFixed(1)),
      el("td", {}, ms(r.p50_ms)),
      el("td", {}, ms(r.p95_ms)),
      el("td", {}, ms(r.p99_ms)),
      el("td", {}, pct(r.mtls_share)),
      el("td", {}, String(r.denied)),
      el("td", {}, String(r.rate_limited)),
      probeCell(r.name),
    );
    return tr;
  }));
  $("#no-services").hidden = rows.length > 0;
}

// The per-route rows of the chosen service (all by default); clicking a
// service's row chooses it.
let chosen = new URLSearchParams(location.search).get("service") || "";
let lastRoutes = [];

function routes(rows, names) {
  lastRoutes = rows;
  const select = $("#service-filter");
  const options = ["", ...names];
  if ([...select.options].map((o) => o.value).join() !== options.join()) {
    select.replaceChildren(...options.map((n) => el("option", { value: n }, n || "all")));
  }
  select.value = chosen;
  $("#routes tbody").replaceChildren(...rows.filter((r) => !chosen || r.service === chosen).map((r) =>
    el("tr", { "data-route": r.route, "data-route-service": r.service },
      el("td", {}, r.service), el("td", {}, r.route),
      el("td", { class: rate(r.success_rate) }, pct(r.success_rate)),
      el("td", {}, r.rps.toFixed(1)), el("td", {}, ms(r.p50_ms)), el("td", {}, ms(r.p99_ms)),
      el("td", {}, String(r.denied)), el("td", {}, String(r.rate_limited)))));
}

// The chosen service's endpoints, as discovery gives them to proxies.
function endpoints() {
  const box = $("#endpoints-box");
  box.hidden = !chosen;
  if (!chosen) return;
  $("#endpoints-title").textContent = `Endpoints of ${chosen}`;
  fetch(`/api/endpoints?service=${encodeURIComponent(chosen)}`)
    .then((r) => r.ok ? r.json() : r.text().then((t) => Promise.reject(new Error(t))))
    .then((v) => {
      $("#endpoints-note").textContent = !v.exists
        ? "No discovery backend knows this name: proxies resolve it with DNS."
        : v.endpoints.length ? "" : "Known, but no endpoints now.";
      $("#endpoints tbody").replaceChildren(...v.endpoints.map((e) => el("tr", { "data-endpoint": e.addr },
        el("td", {}, e.addr), el("td", {}, String(e.weight)),
        el("td", {}, e.identity || "not meshed"), el("td", {}, e.protocol_hint || "–"))));
    })
    .catch((err) => { $("#endpoints-note").textContent = `Cannot ask the control plane: ${err.message}`; });
}

// The live tap of the chosen service: the proxies' /tap, filtered by the
// server and paced to what a page can draw. `?tap=N` starts it at once
// and stops after N requests (for headless browsers).
const TAP_ROWS = 100;
const tapLimit = Number(new URLSearchParams(location.search).get("tap")) || 0;
let tap = null;

function tapStop(why) {
  if (tap) tap.close();
  tap = null;
  $("#tap-toggle").textContent = "Start";
  if (why) $("#tap-status").textContent = why;
}

function tapStart() {
  tapStop();
  const form = new FormData($("#tap-form"));
  const q = new URLSearchParams({ service: chosen });
  for (const [k, v] of form) if (v) q.set(k, v);
  const body = $("#tap tbody");
  body.replaceChildren();
  let seen = 0;
  let skipped = 0;
  tap = new EventSource(`/api/tap?${q}`);
  $("#tap-toggle").textContent = "Stop";
  $("#tap-status").textContent = "opening…";
  tap.addEventListener("open", (m) => {
    const o = JSON.parse(m.data);
    $("#tap-status").textContent = `tapping ${o.tapped} proxies` + (o.skipped.length ? ` (skipped: ${o.skipped.join("; ")})` : "");
  });
  tap.addEventListener("skipped", (m) => { skipped += JSON.parse(m.data).skipped; });
  tap.addEventListener("lost", (m) => { skipped += JSON.parse(m.data).lost; });
  tap.addEventListener("ended", () => tapStop("every proxy's tap ended"));
  tap.onmessage = (m) => {
    const e = JSON.parse(m.data);
    seen += 1;
    const status = e.grpc_status !== undefined ? `${e.status} · grpc ${e.grpc_status}` : String(e.status || "–");
    body.prepend(el("tr", { "data-tap": e.path, class: e.success ? "" : "failed" },
      el("td", {}, new Date().toLocaleTimeString()), el("td", {}, e.workload), el("td", {}, e.direction),
      el("td", {}, e.method), el("td", {}, e.path),
      el("td", { class: e.success ? "ok" : "fail" }, status), el("td", {}, ms(e.latency_ms)),
      el("td", {}, e.peer_id || (e.tls ? "?" : "not meshed"))));
    while (body.rows.length > TAP_ROWS) body.deleteRow(-1);
    $("#tap-status").textContent = `${seen} requests` + (skipped ? ` (${skipped} more not shown: too fast to draw)` : "");
    if (tapLimit && seen >= tapLimit) tapStop(`${seen} requests · paused after ${tapLimit}`);
  };
  tap.onerror = () => { if (tap) $("#tap-status").textContent = "tap interrupted; retrying…"; };
}

$("#tap-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (tap) tapStop("stopped"); else tapStart();
});

function choose(service) {
  chosen = service;
  routes(lastRoutes, [...$("#service-filter").options].map((o) => o.value).filter(Boolean));
  endpoints();
  if (tap) tapStart();
}

$("#service-filter").addEventListener("change", (e) => choose(e.target.value));
$("#services tbody").addEventListener("click", (e) => {
  const row = e.target.closest("tr[data-service]");
  if (row) choose(row.dataset.service);
});
endpoints();
// Filters in the address fill the form: a tap can be linked to.
for (const [k, v] of new URLSearchParams(location.search)) {
  const field = $("#tap-form").elements[k];
  if (field && field.type === "checkbox") field.checked = v === "1";
  else if (field && k !== "service") field.value = v;
}
if (tapLimit && chosen) tapStart();

// Services on a circle, a line per edge labelled with its success rate.
function topology(edges, rows) {
  const names = new Set(rows.map((r) => r.name));
  for (const e of edges) { names.add(e.src); names.add(e.dst); }
  // A workload calling out is named without its port; one node per host.
  const key = (n) => n.replace(/:\d+$/, "");
  const nodes = [...new Set([...names].map(key))].sort();
  const [w, h] = [800, 460];
  const r = Math.min(w, h) / 2 - 60;
  const pos = new Map(nodes.map((n, i) => {
    const a = (2 * Math.PI * i) / Math.max(nodes.length, 1) - Math.PI / 2;
    return [n, [w / 2 + r * Math.cos(a), h / 2 + r * Math.sin(a)]];
  }));
  const defs = svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "28", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#4d4d57" })));
  const lines = edges.map((e) => {
    const [a, b] = [pos.get(key(e.src)), pos.get(key(e.dst))];
    if (!a || !b) return svg("g");
    const label = `${pct(e.success_rate)}${e.secured ? " · mTLS" : ""}`;
    return svg("g", { class: "edge", "data-src": e.src, "data-dst": e.dst },
      svg("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], "marker-end": "url(#arrow)" }),
      svg("text", { x: (a[0] + b[0]) / 2, y: (a[1] + b[1]) / 2 - 4 }, label),
      svg("title", {}, `${e.src} → ${e.dst}: ${pct(e.success_rate)} success, ${e.rps.toFixed(1)} rps, client ${e.client_id || "unauthenticated"}, server ${e.server_id || "unauthenticated"}`));
  });
  const circles = nodes.map((n) => {
    const [x, y] = pos.get(n);
    return svg("g", { class: "node", "data-node": n }, svg("circle", { cx: x, cy: y, r: 22 }), svg("text", { x, y: y + 40 }, n));
  });
  $("#topology").replaceChildren(defs, ...lines, ...circles);
  $("#edges tbody").replaceChildren(...edges.map((e) => el("tr", {},
    el("td", {}, e.src), el("td", {}, e.dst),
    el("td", { class: rate(e.success_rate) }, pct(e.success_rate)),
    el("td", {}, e.rps.toFixed(1)),
    el("td", {}, e.client_id || "–"), el("td", {}, e.server_id || "–"))));
}

function checks(list) {
  $("#checks").replaceChildren(...list.map((c) => el("li", { class: c.status, "data-check": c.name },
    el("span", { class: "badge" }, c.status === "ok" ? "ok" : c.status.toUpperCase()), ` ${c.section} · ${c.name}: ${c.detail}`,
    ...(c.hint ? [el("br"), `→ ${c.hint}`] : []))));
}

function render(s) {
  $("#window").textContent = s.window_seconds.toFixed(0);
  probes(s.probes || []);
  $("#source").textContent = s.source;
  services(s.services);
  routes(s.routes || [], s.services.map((r) => r.name));
  topology(s.edges, s.services);
  if (s.checks) checks(s.checks);
  $("#status").textContent = s.error
    ? `no figures: ${s.error}`
    : `live · updated ${new Date(s.at * 1000).toLocaleTimeString()}`;
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

// `?updates=N` stops listening after N live updates: a page that is
// never done loading cannot be captured by a headless browser.
const limit = Number(new URLSearchParams(location.search).get("updates")) || Infinity;
let live = 0;
fetch("/api/snapshot").then((r) => r.json()).then(render).catch(() => {});
const events = new EventSource("/events");
events.onmessage = (m) => {
  render(JSON.parse(m.data));
  live += 1;
  if (live >= limit) {
    events.close();
    $("#status").textContent += ` · paused after ${live} updates`;
  }
};
events.onerror = () => { if (live < limit) $("#status").textContent = "reconnecting…"; };
