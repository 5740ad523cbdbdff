/* rma-agent dashboard. Plain JS + SVG, no dependencies.
 *
 * First paint from GET /api/dashboard (state, 15 min of samples, recent events), then
 * live from the Server-Sent Events of GET /api/events: "state" every second, "sample"
 * every few seconds, "log" per event (with ids: the browser resumes with Last-Event-ID).
 * Everything from the network is inserted as text (worker names are chosen by workers).
 */
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const samples = [];
  const seenLog = new Set();
  let sampleS = 2;
  let lastState = null;
  let ringTimer = null;
  let firstRender = false;

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v);
    }
    for (const kid of kids) {
      if (kid === null || kid === undefined) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) el.setAttribute(k, v);
    }
    for (const kid of kids) if (kid) el.append(kid);
    return el;
  }

  const fmt = (v, d = 1, unit = "") =>
    v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d) + unit;
  const signed = (v) => (v >= 0 ? "+" : "−") + Math.abs(v).toFixed(3);
  const ago = (sec) => {
    if (sec === null || sec === undefined) return "–";
    if (sec < 90) return Math.round(sec) + " s";
    if (sec < 5400) return Math.round(sec / 60) + " min";
    return (sec / 3600).toFixed(1) + " h";
  };
  const hhmmss = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const slug = (x) => String(x).toLowerCase().replace(/[^a-z0-9]+/g, "-");

  function setConn(text, cls) {
    const el = $("conn");
    el.textContent = text;
    el.className = "pill " + cls;
  }

  // ------------------------------------------------------------------ glance
  function renderGlance(a) {
    $("agent-name").textContent = a.name + " (" + a.role + ")";
    document.title = "rma-agent · " + a.name;
    const tiles = [
      ["nodes", a.nodes], ["coordinators", a.coordinators], ["workers", a.workers],
      ["services", a.services], ["role", a.role], ["mode", a.mode || "–"],
      ["peers", a.peers], ["region", a.region || "–"], ["uptime", ago(a.uptime_s)],
      ["version", a.version],
      ["fleet versions", Object.entries(a.versions || {})
        .map(([v, n]) => (v || "v1 record") + " ×" + n).join(", ") || "–"],
    ];
    const cert = a.certificate;
    if (cert && cert.not_after) {
      const left = cert.not_after - Date.now() / 1000;
      tiles.push(["admission cert", (left > 0 ? "expires in " + ago(left) : "EXPIRED") +
        " · renewal " + cert.state + (cert.failures ? " (" + cert.failures + " failed)" : "")]);
    }
    $("tiles").replaceChildren(...tiles.map(([k, v]) =>
      h("div", {}, h("dt", { text: k }), h("dd", { text: String(v) }))));
    const r = $("readiness");
    r.replaceChildren(
      h("span", { class: "pill " + (a.ready ? "ok" : "bad"), text: a.ready ? "ready" : "not ready" }),
      a.ready ? " joined the network" : " " + (a.reasons || []).join("; "),
      h("span", { class: "dim", text: "  · node " + (a.node_id || "").slice(0, 16) + "…" }));
  }

  // ------------------------------------------------------------------ sparklines
  const SPARKS = [
    { key: "lookups_s", name: "lookups/s", color: "#58a6ff", d: 1 },
    { key: "routed_s", name: "routed requests/s", color: "#a371f7", d: 1, router: true },
    { key: "errors_s", name: "errors/s", color: "#f85149", d: 2 },
    { key: ["p50_ms", "p99_ms"], name: "lookup p50 / p99 ms", color: ["#3fb950", "#d29922"], d: 2 },
  ];

  function line(values, w, hgt, max, color) {
    const n = values.length;
    const pts = [];
    values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const x = n <= 1 ? w : (i / (n - 1)) * w;
      const y = hgt - 2 - (max > 0 ? (v / max) * (hgt - 4) : 0);
      pts.push(x.toFixed(1) + "," + y.toFixed(1));
    });
    return s("polyline", { points: pts.join(" "), stroke: color });
  }

  function renderSparks() {
    const W = 240, H = 44;
    const hasRouter = samples.length && samples[samples.length - 1].router;
    const cards = SPARKS.map((sp) => {
      const keys = Array.isArray(sp.key) ? sp.key : [sp.key];
      const colors = Array.isArray(sp.color) ? sp.color : [sp.color];
      const series = keys.map((k) => samples.map((x) => x[k]));
      const max = Math.max(0, ...series.flat().filter((v) => typeof v === "number"));
      const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
                             "aria-hidden": "true" },
                    s("line", { x1: 0, y1: H - 1, x2: W, y2: H - 1, stroke: "#2a3542" }),
                    ...series.map((vals, i) => line(vals, W, H, max, colors[i])));
      const last = samples.length ? samples[samples.length - 1] : {};
      let val = keys.map((k) => fmt(last[k], sp.d)).join(" / ");
      if (sp.router && !hasRouter) val = "no router";
      return h("div", { class: "spark" },
        h("span", { class: "name", text: sp.name }), h("span", { class: "val", text: val }),
        svg, h("span", { class: "dim barlabel",
                         text: "max " + fmt(max, sp.d) + " · " + samples.length + " samples" }));
    });
    $("sparks").replaceChildren(...cards);
  }

  // ------------------------------------------------------------------ services
  const PARTS = ["load", "gpu", "region", "latency", "age", "health"];

  function loadBar(w) {
    const cap = w.capacity || 0;
    const frac = cap > 0 ? Math.min(1, Math.max(0, w.load / cap)) : 1;
    const fill = h("span", { class: frac >= 0.9 ? "hot" : frac >= 0.6 ? "warm" : "" });
    fill.style.width = (frac * 100).toFixed(1) + "%";
    return h("div", {},
      h("div", { class: "bar", role: "img",
                 "aria-label": `load ${fmt(w.load, 1)} of ${fmt(cap, 0)}` }, fill),
      h("span", { class: "barlabel", text: `${fmt(w.load, 1)} / ${fmt(cap, 0)}` }));
  }

  function scoreCell(w) {
    const c = w.components || {};
    const pos = ["load", "gpu", "region"];
    const total = PARTS.reduce((a, k) => a + Math.abs(c[k] || 0), 0) || 1;
    const bar = h("div", { class: "parts", "aria-hidden": "true" });
    for (const k of PARTS) {
      const v = c[k] || 0;
      if (!v) continue;
      const seg = h("span", { class: "p-" + k, title: k + " " + signed(v) });
      seg.style.width = ((Math.abs(v) / total) * 100).toFixed(1) + "%";
      if (!pos.includes(k)) seg.style.opacity = "0.85";
      bar.append(seg);
    }
    const list = h("ul", { class: "partlist" },
      ...PARTS.filter((k) => k in c).map((k) => h("li", { text: k + " " + signed(c[k]) })));
    return h("div", {}, h("strong", { text: fmt(w.score, 3) }), bar, list);
  }

  // the router's own cost parts (agent/router/policy.py): what a routed request is sent by
  function routerCell(w) {
    const r = w.router;
    if (!r) return "–";
    const q = r.inflight === null ? "no load report" :
      `${r.inflight} running + ${r.queue} queued / ${r.capacity}`;
    const bits = [`mine ${r.outstanding}`, q,
                  (r.measured ? fmt(r.ewma_ms, 1, " ms") : "unmeasured")];
    if (r.hot) bits.push("full");
    if (r.penalty > 0) bits.push(`banned ${fmt(r.penalty, 1)} s`);
    if (r.retry_after > 0) bits.push(`Retry-After ${fmt(r.retry_after, 1)} s`);
    return h("div", { title: Object.entries(r).map(([k, v]) => `${k} ${v}`).join(", ") },
      h("strong", { text: fmt(r.cost, 1) }),
      h("ul", { class: "partlist" }, ...bits.map((b) => h("li", { text: b }))));
  }

  function stateCell(state) {
    return h("span", { class: "st-" + slug(state), text: state });
  }

  function td(label, cls, ...kids) {
    return h("td", { "data-label": label, class: cls }, ...kids);
  }

  function renderService(svc) {
    const head = h("tr", {}, ...["#", "worker", "state", "load", "GPU", "region", "latency",
                                  "age", "router cost", "score = parts"].map((t) =>
      h("th", { scope: "col", class: ["#", "latency", "age"].includes(t) ? "num" : null, text: t })));
    const rows = svc.workers.map((w) => h("tr", { "data-worker": w.name, "data-id": w.id },
      td("#", "num", String(w.rank)),
      td("worker", null, h("span", { class: "wname", text: w.name }),
         h("span", { class: "endpoint", text: w.endpoint +
                     (w.version ? " · rma-agent " + w.version : "") })),
      td("state", null, stateCell(w.state)),
      td("load", null, loadBar(w)),
      td("GPU", null, (w.gpu || "no GPU") + (w.gpu_memory_gb ? " " + fmt(w.gpu_memory_gb, 0) + " GB" : "")),
      td("region", null, w.region || "–"),
      td("latency", "num", w.latency_ms === null ? "unmeasured" : fmt(w.latency_ms, 1, " ms")),
      td("age", "num", ago(w.age_s)),
      td("router cost", null, routerCell(w)),
      td("score", null, scoreCell(w))));
    const excl = (svc.excluded || []).map((x) => h("tr", { class: "excluded", "data-worker": x.name,
                                                           "data-id": x.id },
      td("#", "num", "–"),
      td("worker", null, h("span", { class: "wname", text: x.name || x.id.slice(0, 12) })),
      td("state", null, stateCell(x.state === "-" ? "gone" : x.state)),
      td("load", null, x.load === null ? "–" : `${fmt(x.load, 1)} / ${fmt(x.capacity, 0)}`),
      td("GPU", null, x.gpu || "–"), td("region", null, x.region || "–"),
      td("latency", "num", "–"), td("age", "num", "–"), td("router cost", null, "–"),
      td("not offered", null, x.reason)));
    const count = svc.workers.length;
    return h("div", { class: "svc", id: "svc-" + slug(svc.name), "data-service": svc.name },
      h("h3", {}, svc.name + " ",
        h("span", { class: "dim", text: `${count} worker${count === 1 ? "" : "s"} offered` +
                    (excl.length ? `, ${svc.excluded_total || excl.length} not offered` : "") + ` · source ${svc.source || "–"}` })),
      count + excl.length === 0 ? h("p", { class: "empty", text: "no live workers" }) :
        h("div", { class: "tablewrap" },
          h("table", { class: "workers" }, h("thead", {}, head), h("tbody", {}, ...rows, ...excl))));
  }

  function renderServices(state) {
    const list = $("service-list");
    if (!state.services.length) {
      list.replaceChildren(h("p", { class: "empty", text: "no services announced yet" }));
    } else {
      list.replaceChildren(...state.services.map(renderService));
    }
    const w = state.weights || {};
    $("score-legend").textContent =
      `score = load (${w.free}×free capacity) + gpu (${w.gpu}×GPU class) + region (${w.region} if ` +
      `the caller's) − latency (${w.latency}×ms/(ms+50)) − age (${w.age}×age/max age); ` +
      "backed-off workers are not offered. A plain lookup draws #1 among the best three.";
    const sel = $("ring-service");
    const names = state.services.map((x) => x.name);
    const have = Array.from(sel.options).map((o) => o.value).filter(Boolean);
    if (names.join() !== have.join()) {
      const cur = sel.value;
      sel.replaceChildren(h("option", { value: "", text: "(no service)" }),
        ...names.map((n) => h("option", { value: n, text: n })));
      sel.value = names.includes(cur) ? cur : (cur === "" && names.length && !have.length ? names[0] : cur);
      if (!names.includes(sel.value)) sel.value = "";
      loadRing();
    }
  }

  function renderState(state) {
    lastState = state;
    renderGlance(state.agent);
    renderServices(state);
    if (!firstRender) {
      firstRender = true;
      performance.mark("rma-first-render");
      document.body.dataset.rendered = "1";
    }
  }

  // ------------------------------------------------------------------ ring
  const angle = (hex) => (parseInt(hex.slice(0, 8), 16) / 4294967296) * 2 * Math.PI - Math.PI / 2;
  const at = (hex, r) => [Math.cos(angle(hex)) * r, Math.sin(angle(hex)) * r];

  function renderRing(ring) {
    const R = 100;
    const svg = $("ring-svg");
    const kids = [s("title", { id: "ring-desc" }, document.createTextNode(
      `${ring.contacts.length} contacts of node ${ring.self.slice(0, 8)} on the XOR ring`))];
    kids.push(s("circle", { cx: 0, cy: 0, r: R, fill: "none", stroke: "#2a3542", "stroke-width": 1 }));
    const closest = new Set(ring.closest || []);
    if (ring.key) {
      const [kx, ky] = at(ring.key, R + 14);
      for (const id of ring.closest) {
        const [x, y] = at(id, R);
        kids.push(s("line", { x1: kx, y1: ky, x2: x, y2: y, stroke: "#d29922", "stroke-width": 0.6,
                              "stroke-opacity": 0.7 }));
      }
      kids.push(s("path", { d: `M${kx},${ky - 6} l5,9 l-10,0 z`, fill: "#d29922" },
        s("title", {}, document.createTextNode(`key of ${ring.service}: ${ring.key.slice(0, 12)}…`))));
    }
    const maxPrefix = Math.max(1, ...ring.contacts.map((c) => c.prefix));
    for (const c of ring.contacts) {
      const [x, y] = at(c.id, R);
      const hue = Math.round(200 - (c.prefix / maxPrefix) * 160);
      kids.push(s("circle", { cx: x, cy: y, r: closest.has(c.id) ? 4.5 : 3.2,
                              fill: `hsl(${hue} 70% 60%)`,
                              stroke: closest.has(c.id) ? "#d29922" : "none", "stroke-width": 1.5 },
        s("title", {}, document.createTextNode(
          `${c.id.slice(0, 12)}… ${c.ip}:${c.port} bucket ${c.bucket} (shared prefix ${c.prefix} bits)` +
          (c.worker ? " worker" : "")))));
    }
    for (const o of ring.others || []) {
      const [x, y] = at(o.id, R);
      kids.push(s("rect", { x: x - 3, y: y - 3, width: 6, height: 6, fill: "none", stroke: "#9aa7b4",
                            "stroke-width": 1.2 },
        s("title", {}, document.createTextNode(`${o.name} ${o.id.slice(0, 12)}… (worker, DHT client)`))));
    }
    const [sx, sy] = at(ring.self, R);
    kids.push(s("circle", { cx: sx, cy: sy, r: 6, fill: "#ffffff", stroke: closest.has(ring.self) ? "#d29922" : "#58a6ff",
                            "stroke-width": 2 },
      s("title", {}, document.createTextNode("this agent " + ring.self.slice(0, 12) + "…"))));
    kids.push(s("text", { x: 0, y: 4, "text-anchor": "middle", fill: "#9aa7b4", "font-size": 9 },
      document.createTextNode(`${ring.contacts.length} contacts · ${ring.buckets} bucket${ring.buckets === 1 ? "" : "s"}`)));
    svg.replaceChildren(...kids);
    const byBucket = {};
    for (const c of ring.contacts) byBucket[c.bucket] = (byBucket[c.bucket] || 0) + 1;
    $("ring-legend").textContent =
      `this agent (white) ${ring.self.slice(0, 8)}…, mode ${ring.mode}; contacts coloured by ` +
      `shared id prefix (blue: far, red: near)` +
      ((ring.others || []).length ? `; ${ring.others.length} workers outside the routing table (DHT clients, squares)` : "") +
      `. Buckets: ` +
      (Object.keys(byBucket).map((b) => `#${b}: ${byBucket[b]}`).join(", ") || "none") +
      (ring.key ? `. Key of ${ring.service} (triangle) and its ${ring.closest.length} closest known nodes (ringed):` : ".");
    $("ring-closest").replaceChildren(...(ring.closest || []).map((id) =>
      h("li", { text: id.slice(0, 12) + "…" + (id === ring.self ? " (this agent)" : "") })));
  }

  async function loadRing() {
    const svc = $("ring-service").value;
    try {
      const r = await fetch("/api/dashboard/ring" + (svc ? "?service=" + encodeURIComponent(svc) : ""));
      if (r.ok) renderRing(await r.json());
    } catch (e) { /* the connection pill already says when the agent is unreachable */ }
  }

  // ------------------------------------------------------------------ events
  function addLog(item, prepend) {
    const id = item.event_id;
    if (id !== undefined) {
      if (seenLog.has(id)) return;
      seenLog.add(id);
    }
    const li = h("li", { class: "k-" + slug(item.kind) },
      h("time", { datetime: new Date(item.t * 1000).toISOString(), text: hhmmss(item.t) }),
      h("span", { class: "kind", text: item.kind }), item.text);
    const ol = $("events");
    if (prepend) ol.prepend(li); else ol.append(li);
    while (ol.children.length > 200) ol.lastChild.remove();
  }

  // ------------------------------------------------------------------ wiring
  function connect() {
    const es = new EventSource("/api/events");
    es.onopen = () => setConn("live", "ok");
    es.onerror = () => setConn(es.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…", "bad");
    es.addEventListener("state", (e) => renderState(JSON.parse(e.data)));
    es.addEventListener("sample", (e) => {
      samples.push(JSON.parse(e.data));
      while (samples.length > (15 * 60) / sampleS) samples.shift();
      renderSparks();
    });
    es.addEventListener("log", (e) => {
      const item = JSON.parse(e.data);
      item.event_id = Number(e.lastEventId);
      addLog(item, true);
    });
  }

  async function start() {
    $("ring-service").addEventListener("change", loadRing);
    try {
      const r = await fetch("/api/dashboard");
      if (r.ok) {
        const d = await r.json();
        sampleS = d.sample_s || sampleS;
        samples.push(...d.samples);
        renderState(d.state);
        renderSparks();
        for (const item of d.log) addLog(item, true);
      }
    } catch (e) {
      setConn("agent unreachable", "bad");
    }
    renderSparks();
    connect();
    loadRing();
    ringTimer = setInterval(loadRing, 10000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
  window.rmaDashboard = { state: () => lastState, samples: () => samples.slice(), ringTimer: () => ringTimer };
})();
