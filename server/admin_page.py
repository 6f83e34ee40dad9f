"""The admin listener's HTML status page (``GET /`` on ``server.admin.port``).

Owns the page only: it draws ``/status`` once a second (counts, events per second as a small
chart, disconnects by reason, subscriptions). No external resources; the admin listener serves
it with a Content-Security-Policy that allows nothing else.
"""

from __future__ import annotations

__all__ = ["STATUS_PAGE"]

#: seconds between two reads of /status
REFRESH_SECONDS = 1

STATUS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>PyPubSub status</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .5em} h2{font-size:1.05em;margin:1.2em 0 .4em}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.6em} .card span{color:#666}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td.n{text-align:right} #state.ok{color:#080} #state.bad{color:#b00}
canvas{background:#fff;border:1px solid #ddd;border-radius:6px}
</style></head>
<body>
<h1>PyPubSub <span id="version"></span> &mdash; <span id="state">loading</span></h1>
<div class="cards">
 <div class="card"><b id="subscribers">-</b><span>subscribers</span></div>
 <div class="card"><b id="eps">-</b><span>events / s</span></div>
 <div class="card"><b id="published">-</b><span>events published</span></div>
 <div class="card"><b id="deliveries">-</b><span>deliveries</span></div>
 <div class="card"><b id="backlog">-</b><span>events in backlog</span></div>
 <div class="card"><b id="uptime">-</b><span>uptime</span></div>
</div>
<h2>Events per second (last 2 minutes)</h2>
<canvas id="chart" width="600" height="120"></canvas>
<h2>Disconnects</h2><table><tbody id="disconnects"></tbody></table>
<h2>Subscribers by transport</h2><table><tbody id="transports"></tbody></table>
<h2>Subscriptions</h2>
<table><thead><tr><th>topics</th><th>transport</th><th>streams</th></tr></thead>
<tbody id="subs"></tbody></table>
<p id="subsnote"></p>
<h2>Plugins</h2><table><tbody id="plugins"></tbody></table>
<p><a href="/metrics">/metrics</a> &middot; <a href="/status">/status</a> &middot;
<a href="/healthz">/healthz</a> &middot; <a href="/readyz">/readyz</a>
&middot; updated <span id="updated">never</span></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const samples = [];  // [time, events_published_total]
const rates = [];
let prev = null;
function rows(tbody, entries) {
  tbody.replaceChildren(...entries.map((cells) => {
    const tr = document.createElement("tr");
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      td.textContent = String(c);
      if (i > 0 && typeof c === "number") td.className = "n";
      tr.appendChild(td);
    });
    return tr;
  }));
}
function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}
function draw() {
  const c = $("chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(1, ...rates);
  g.strokeStyle = "#36c"; g.lineWidth = 2; g.beginPath();
  rates.forEach((r, i) => {
    const x = c.width - (rates.length - 1 - i) * (c.width / 120);
    const y = c.height - 4 - (r / max) * (c.height - 20);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke(); g.fillStyle = "#666"; g.fillText("max " + max.toFixed(1) + "/s", 4, 12);
}
async function refresh() {
  let s;
  try {
    const r = await fetch("/status", {cache: "no-store"});
    s = await r.json();
  } catch (e) {
    $("state").textContent = "unreachable"; $("state").className = "bad"; return;
  }
  const m = s.metrics;
  $("version").textContent = s.version;
  $("state").textContent = s.draining ? "draining" : (s.ready ? "ready" : "not ready: " + s.unready_reason);
  $("state").className = s.ready ? "ok" : "bad";
  $("subscribers").textContent = s.subscribers;
  $("published").textContent = m.events_published_total || 0;
  $("deliveries").textContent = m.deliveries_total || 0;
  $("backlog").textContent = s.backlog.events;
  $("uptime").textContent = duration(s.uptime_seconds);
  const pub = m.events_published_total || 0;
  if (prev) {
    const dt = s.time - prev[0];
    if (dt > 0) rates.push(Math.max(0, (pub - prev[1]) / dt));
    if (rates.length > 120) rates.shift();
    $("eps").textContent = rates.length ? rates[rates.length - 1].toFixed(1) : "-";
  }
  prev = [s.time, pub];
  draw();
  rows($("disconnects"), Object.entries(m.disconnects_total || {}));
  rows($("transports"), Object.entries(m.subscribers || {}).filter((kv) => kv[1] > 0));
  rows($("subs"), s.subscriptions.map((x) => [x.topics, x.transport, x.count]));
  $("subsnote").textContent = s.subscriptions_total > s.subscriptions_listed
    ? "the " + s.subscriptions_listed + " largest of " + s.subscriptions_total + " shown" : "";
  rows($("plugins"), Object.entries(s.plugins).map((kv) => [kv[0], JSON.stringify(kv[1])]));
  $("updated").textContent = new Date(s.time * 1000).toLocaleTimeString();
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}
refresh();
setInterval(refresh, REFRESH_MS);
</script>
</body></html>
""".replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))
