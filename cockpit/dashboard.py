"""The dashboard at ``/``: one self-contained page (no CDN, no build step) over the REST API.

It shows the bus and service health, the live event stream (SSE), recent runs, error
conditions and alarms. When the API needs a token, the page asks for it once and keeps it
in the browser's localStorage; live events then come from a fetch() stream, since
EventSource cannot send an Authorization header.
"""
from __future__ import annotations

PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Cockpit</title>
<style>
  :root { --bg:#0f1419; --panel:#182029; --text:#d8dee6; --muted:#7d8a99; --ok:#3fb950; --bad:#f85149; --warn:#d29922; --accent:#58a6ff; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui, sans-serif; background:var(--bg); color:var(--text); }
  header { display:flex; align-items:center; gap:1rem; padding:.75rem 1.25rem; background:var(--panel); border-bottom:1px solid #26313d; }
  header h1 { font-size:1.1rem; margin:0; }
  header a { color:var(--accent); text-decoration:none; margin-left:auto; }
  main { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap:1rem; padding:1rem 1.25rem; }
  section { background:var(--panel); border:1px solid #26313d; border-radius:6px; padding:.75rem 1rem; min-width:0; }
  section h2 { font-size:.95rem; margin:0 0 .5rem; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
  table { width:100%; border-collapse:collapse; font-size:13px; }
  td, th { text-align:left; padding:.25rem .4rem; border-bottom:1px solid #222c36; vertical-align:top; overflow-wrap:anywhere; }
  th { color:var(--muted); font-weight:normal; }
  .pill { display:inline-block; padding:0 .45rem; border-radius:999px; font-size:12px; background:#26313d; }
  .ok { color:var(--ok); } .bad, .error, .timeout { color:var(--bad); } .running, .new, .ALERT { color:var(--warn); }
  #events { max-height:420px; overflow:auto; }
  #token { display:none; gap:.5rem; align-items:center; }
  input { background:#0f1419; color:var(--text); border:1px solid #26313d; border-radius:4px; padding:.25rem .5rem; }
  .muted { color:var(--muted); }
</style>
</head>
<body>
<header>
  <h1>Cockpit</h1>
  <span id="status" class="pill">...</span>
  <form id="token"><label for="tok">API token</label><input id="tok" type="password" autocomplete="off"><button>Use</button></form>
  <a href="/api/docs">API docs</a>
</header>
<main>
  <section><h2>Health</h2><table id="health"><tbody></tbody></table></section>
  <section><h2>Live events</h2><div id="events"><table><thead><tr><th>time</th><th>type</th><th>source</th><th>summary</th></tr></thead><tbody></tbody></table></div></section>
  <section><h2>Recent runs</h2><table id="runs"><thead><tr><th>started</th><th>service</th><th>action</th><th>state</th></tr></thead><tbody></tbody></table></section>
  <section><h2>Error conditions</h2><table id="ecos"><thead><tr><th>last</th><th>app</th><th>error</th><th>count</th><th>state</th></tr></thead><tbody></tbody></table></section>
  <section><h2>Alarms</h2><table id="alarms"><thead><tr><th>last</th><th>service</th><th>message</th><th>count</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const token = () => localStorage.getItem("cockpit.token") || "";
const headers = () => token() ? {"Authorization": "Bearer " + token()} : {};
const text = (v) => document.createTextNode(v === undefined || v === null ? "" : String(v));
const when = (s) => s ? new Date(s * 1000).toLocaleTimeString() : "";

function row(tbody, cells, cls) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => { const td = document.createElement("td"); td.appendChild(text(c)); if (cls && cls[i]) td.className = cls[i]; tr.appendChild(td); });
  tbody.appendChild(tr);
  return tr;
}

async function api(path) {
  const r = await fetch(path, {headers: headers()});
  if (r.status === 401) { document.getElementById("token").style.display = "flex"; throw new Error("token needed"); }
  if (r.status === 404) return null;
  return r.json();
}

function summary(e) {
  switch (e.type) {
    case "email": return (e.from || "") + ": " + (e.subject || "");
    case "alarm": return e.service + " " + (e.method || "") + ": " + (e.msg || "");
    case "eco": return (e.app_name || "") + ": " + (e.error_msg || "");
    case "telegram": return e.io + " " + e.action + (e.args && e.args.msg ? ": " + e.args.msg : "");
    default: return (e.tags || []).join(", ");
  }
}

function showEvent(e) {
  const tbody = document.querySelector("#events tbody");
  const tr = row(tbody, [when(e.epoch), e.type, e.source, summary(e)]);
  tbody.insertBefore(tr, tbody.firstChild);
  while (tbody.rows.length > 200) tbody.deleteRow(-1);
}

async function refresh() {
  try {
    const h = await fetch("/api/health").then(r => r.json());
    const st = document.getElementById("status");
    st.textContent = h.status; st.className = "pill " + (h.status === "ok" ? "ok" : "bad");
    const tb = document.querySelector("#health tbody"); tb.innerHTML = "";
    row(tb, ["bus", h.bus.kind + " (" + h.bus.state + ")"], [null, h.bus.ok ? "ok" : "bad"]);
    Object.entries(h.services || {}).forEach(([name, s]) => row(tb, [name, s.state || (s.ok === false ? "down" : "ok")], [null, s.ok === false ? "bad" : "ok"]));
    const runs = await api("/api/runs?limit=15");
    if (runs) { const t = document.querySelector("#runs tbody"); t.innerHTML = ""; runs.runs.forEach(r => row(t, [when(r.started), r.service, r.action, r.state], [null, null, null, r.state])); }
    const ecos = await api("/api/ecos?limit=15");
    if (ecos) { const t = document.querySelector("#ecos tbody"); t.innerHTML = ""; ecos.ecos.forEach(g => row(t, [when(g.last_time), g.app_name, g.error_msg, g.occurence, g.state], [null, null, null, null, g.state])); }
    const alarms = await api("/api/alarms?limit=15");
    if (alarms) { const t = document.querySelector("#alarms tbody"); t.innerHTML = ""; alarms.alarms.forEach(g => row(t, [when(g.last_time), g.service, g.msg, g.count])); }
  } catch (err) { /* shown through the status pill on the next round */ }
}

async function live() {
  // fetch() rather than EventSource: it can carry the Authorization header
  try {
    const r = await fetch("/api/events/live", {headers: headers()});
    if (r.status === 401) { document.getElementById("token").style.display = "flex"; return; }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\\n\\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        const data = chunk.split("\\n").filter(l => l.startsWith("data:")).map(l => l.slice(5).trim()).join("\\n");
        if (data) { try { showEvent(JSON.parse(data)); } catch (e) {} }
      }
    }
  } catch (err) {}
  setTimeout(live, 2000);
}

document.getElementById("token").addEventListener("submit", (ev) => {
  ev.preventDefault(); localStorage.setItem("cockpit.token", document.getElementById("tok").value);
  document.getElementById("token").style.display = "none"; refresh(); live();
});
api("/api/events?limit=50").then(r => { if (r) r.events.slice().reverse().forEach(showEvent); }).catch(() => {});
refresh(); setInterval(refresh, 5000); live();
</script>
</body>
</html>
"""
