// The cockpit's dashboard: plain DOM over the REST API, no framework, nothing from elsewhere.
// Every text goes in through textContent, never as HTML.

const TOKEN_KEY = "cockpit.token";
const SESSION = "/api/events/live/session";
const EVENT_TYPES = ["email", "telegram", "alarm", "eco", "generic"];
const KEEP_EVENTS = 300; // events held in the page
const HOLD_PAUSED = 1000; // events held back while paused

const $ = (selector) => document.querySelector(selector);
let token = localStorage.getItem(TOKEN_KEY) || "";

// -- small helpers ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const pad = (n) => String(n).padStart(2, "0");

function age(seconds) {
  const s = Math.round(seconds);
  if (s < 0) return "in " + age(-s).replace(/ ago$/, "");
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  if (s < 86400 * 60) return Math.floor(s / 86400) + " d ago";
  if (s < 86400 * 730) return Math.floor(s / (86400 * 30.44)) + " months ago";
  return Math.floor(s / (86400 * 365.25)) + " years ago";
}

// "11:36:05 · 3 min ago" today, "2016-03-04 11:36 · 9 y ago" another day
function timeText(epoch) {
  const d = new Date(epoch * 1000);
  const now = new Date();
  const today = d.toDateString() === now.toDateString();
  const clock = pad(d.getHours()) + ":" + pad(d.getMinutes());
  const shown = today ? clock + ":" + pad(d.getSeconds())
    : d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + clock;
  return shown + " · " + age(Date.now() / 1000 - epoch);
}

function timeEl(epoch) {
  if (epoch === null || epoch === undefined || epoch === "") return el("span", {class: "muted", text: "never"});
  return el("time", {datetime: new Date(epoch * 1000).toISOString(), "data-epoch": epoch, text: timeText(epoch)});
}

function refreshTimes() {
  for (const t of document.querySelectorAll("time[data-epoch]")) t.textContent = timeText(Number(t.dataset.epoch));
}

function duration(run) {
  if (!run.started) return "";
  const end = run.ended || Date.now() / 1000;
  const s = end - run.started;
  return s < 10 ? s.toFixed(1) + " s" : s < 120 ? Math.round(s) + " s" : Math.round(s / 60) + " min";
}

function stateEl(state, attrs = {}) {
  return el("span", {class: "state s-" + String(state).toLowerCase(), "data-field": "state", ...attrs, text: state});
}

let noticeTimer = null;
function notice(text) {
  const n = $("#notice");
  n.textContent = text;
  n.hidden = !text;
  clearTimeout(noticeTimer);
  if (text) noticeTimer = setTimeout(() => { n.hidden = true; }, 8000);
}

// Keep `container`'s children in the order of `items`, one per key: an existing child is
// updated in place (so a click or a selection survives a refresh), a new one is made.
function keyed(container, items, attr, keyOf, make, update) {
  const existing = new Map();
  for (const child of container.children) existing.set(child.getAttribute(attr), child);
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    let node = existing.get(key);
    if (node) { existing.delete(key); update(node, item); }
    else { node = make(item); node.setAttribute(attr, key); update(node, item); }
    const want = previous ? previous.nextSibling : container.firstChild;
    if (node !== want) container.insertBefore(node, want);
    previous = node;
  }
  for (const node of existing.values()) node.remove();
  if (!items.length && !container.children.length) container.dataset.empty = "none yet";
  else delete container.dataset.empty;
}

function fill(node, ...children) {
  node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// -- the API -------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  const init = {method, headers, credentials: "same-origin", cache: "no-store"};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  if (response.status !== 204) {
    try { data = await response.json(); } catch (_) { data = null; }
  }
  if (response.status === 401) {
    needLogin(data && data.error);
    throw new Unauthorized(data && data.error || "a token is needed");
  }
  if (!response.ok && !(path === "/api/health" && response.status === 503)) {
    throw new Error((data && data.error) || method + " " + path + " answered " + response.status);
  }
  return data;
}

const enc = encodeURIComponent;

// -- login -----------------------------------------------------------------------------------

let started = false;

function needLogin(message) {
  if (token) {
    localStorage.removeItem(TOKEN_KEY);
    token = "";
  }
  stopLive();
  started = false;
  $("#dashboard").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message && !/needs Authorization/.test(message) ? message : "";
  $("#token").focus();
}

async function begin() {
  try {
    await api("POST", SESSION); // also tells whether a token is needed, and whether it is right
  } catch (err) {
    if (err instanceof Unauthorized) return;
    // the cockpit is not reachable: show the page anyway, it says "disconnected" and retries
  }
  $("#login").hidden = true;
  $("#dashboard").hidden = false;
  if (!started) {
    started = true;
    openLive(false);
    tick();
  }
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("#token").value.trim();
  if (!token) return;
  localStorage.setItem(TOKEN_KEY, token);
  $("#login-error").textContent = "";
  begin();
});

// -- connection ------------------------------------------------------------------------------

let streamOk = false;
let busOk = null;

function showConnection() {
  const c = $("#connection");
  const ok = streamOk && busOk !== false;
  c.textContent = ok ? "live" : "disconnected";
  c.className = "pill " + (ok ? "ok" : "bad");
  c.title = ok ? "" : !streamOk ? "the live event stream is not connected" : "the bus is down";
}

// -- live events -----------------------------------------------------------------------------

let source = null;
let reopenTimer = null;
let paused = false;
const held = [];
const kept = []; // newest first
const seen = new Set();
const byGuid = new Map();

function stopLive() {
  if (source) source.close();
  source = null;
  streamOk = false;
  clearTimeout(reopenTimer);
  showConnection();
}

async function openLive(withSession) {
  clearTimeout(reopenTimer);
  if (withSession) {
    try {
      await api("POST", SESSION);
    } catch (err) {
      if (err instanceof Unauthorized) return;
      reopenTimer = setTimeout(() => openLive(true), 3000);
      return;
    }
  }
  if (source) source.close();
  const es = new EventSource("/api/events/live");
  source = es;
  es.onopen = () => {
    streamOk = true;
    showConnection();
    backfill();
  };
  es.onerror = () => {
    if (source !== es) return;
    streamOk = false;
    showConnection();
    // CONNECTING: the browser retries by itself. CLOSED: it was refused (its ticket expired, or a
    // 503): ask for a new ticket and open it again.
    if (es.readyState === EventSource.CLOSED) reopenTimer = setTimeout(() => openLive(true), 2000);
  };
  for (const type of EVENT_TYPES) {
    es.addEventListener(type, (msg) => {
      try { receive(JSON.parse(msg.data)); } catch (_) { /* not an event: left out */ }
    });
  }
}

// what was published while the stream was away comes from the durable log
async function backfill() {
  try {
    const data = await api("GET", "/api/events?limit=50");
    for (const event of data.events.slice().reverse()) receive(event);
  } catch (_) { /* shown by the connection state */ }
}

function receive(event) {
  if (!event || !event.guid || seen.has(event.guid)) return;
  seen.add(event.guid);
  if (paused) {
    held.push(event);
    if (held.length > HOLD_PAUSED) seen.delete(held.shift().guid);
    $("#held").textContent = held.length + " held";
    return;
  }
  keep(event);
}

function keep(event) {
  // newest first by epoch: a backfilled event goes below the newer live ones
  let at = 0;
  while (at < kept.length && (kept[at].epoch || 0) > (event.epoch || 0)) at++;
  kept.splice(at, 0, event);
  byGuid.set(event.guid, event);
  while (kept.length > KEEP_EVENTS) {
    const gone = kept.pop();
    byGuid.delete(gone.guid);
    seen.delete(gone.guid);
  }
  const type = $("#event-type").value;
  if (type && event.type !== type) return;
  const list = $("#events");
  const node = eventRow(event);
  // before the first shown event older than this one
  let next = null;
  for (const child of list.children) {
    const other = byGuid.get(child.dataset.guid);
    if (!other || (other.epoch || 0) <= (event.epoch || 0)) { next = child; break; }
  }
  list.insertBefore(node, next);
  while (list.children.length > KEEP_EVENTS) list.lastChild.remove();
  delete list.dataset.empty;
}

function summary(e) {
  switch (e.type) {
    case "email": return (e.from || "") + " — " + (e.subject || "(no subject)");
    case "alarm": return [e.status && e.status !== "firing" ? e.status : "", e.severity, e.service,
      e.method, e.msg].filter(Boolean).join(" · ");
    case "eco": return (e.app_name || "") + ": " + (e.error_msg || e.eco_type || "");
    case "telegram": return [e.io, e.action, e.args && e.args.msg].filter(Boolean).join(" · ");
    default: return (e.tags || []).join(", ") || JSON.stringify(e.args || {}).slice(0, 120);
  }
}

function storeLink(url) {
  try {
    const u = new URL(url, location.origin);
    return u.pathname.startsWith("/store/") ? u.pathname : null; // only this cockpit's own store
  } catch (_) { return null; }
}

function eventRow(e) {
  const links = [];
  if (e.type === "email") {
    for (const [name, url] of Object.entries(e.attachments || {})) {
      const href = storeLink(url);
      if (href) links.push(el("a", {class: "attachment", href, target: "_blank", rel: "noopener", text: "📎 " + name}));
    }
  }
  return el("li", {class: "row event", "data-guid": e.guid, "data-type": e.type, tabindex: 0},
    el("span", {class: "tag t-" + e.type, text: e.type}),
    timeEl(e.epoch),
    el("span", {class: "muted", text: e.source || ""}),
    el("span", {class: "grow", text: summary(e)}),
    ...links);
}

function renderEvents() {
  const type = $("#event-type").value;
  const list = $("#events");
  list.replaceChildren(...kept.filter((e) => !type || e.type === type).map(eventRow));
}

$("#event-type").addEventListener("change", renderEvents);
$("#pause").addEventListener("click", () => {
  paused = !paused;
  $("#pause").textContent = paused ? "Resume" : "Pause";
  $("#pause").classList.toggle("on", paused);
  if (!paused) {
    for (const event of held.splice(0)) keep(event);
    $("#held").textContent = "";
  }
});

function showJson(pre, value) {
  pre.textContent = JSON.stringify(value, null, 2);
  pre.hidden = false;
}

$("#events").addEventListener("click", (ev) => {
  if (ev.target.closest("a")) return; // an attachment link opens the file
  const row = ev.target.closest("[data-guid]");
  if (!row) return;
  for (const s of document.querySelectorAll("#events .selected")) s.classList.remove("selected");
  row.classList.add("selected");
  showJson($("#event-json"), byGuid.get(row.dataset.guid));
});

// -- services --------------------------------------------------------------------------------

async function refreshServices() {
  const {repos} = await api("GET", "/api/repos?limit=100");
  const lists = await Promise.all(repos.map((r) =>
    api("GET", "/api/repos/" + enc(r.name) + "/services?limit=200").then((d) => d.services)));
  const services = lists.flat();
  keyed($("#services"), services, "data-service", (s) => s.repo + "/" + s.key, serviceRow, updateService);
}

function serviceRow(s) {
  const row = el("li", {class: "row service"});
  updateService(row, s);
  return row;
}

function updateService(row, s) {
  const args = JSON.stringify(s.args || {});
  const sig = args + JSON.stringify(s.states);
  if (row.dataset.sig === sig) return;
  row.dataset.sig = sig;
  const actions = Object.entries(s.states || {}).map(([action, state]) =>
    el("span", {class: "action"},
      el("button", {type: "button", "data-action": action, text: action}),
      el("span", {class: "state s-" + state, "data-state-of": action, text: state})));
  fill(row,
    el("span", {class: "name"}, el("span", {class: "muted", text: s.repo + "/"}), s.key),
    el("code", {class: "args grow", text: args === "{}" ? "" : args}),
    el("span", {class: "actions"}, ...actions));
}

$("#services").addEventListener("click", async (ev) => {
  const button = ev.target.closest("button[data-action]");
  if (!button) return;
  const key = button.closest("[data-service]").dataset.service;
  const [repo, service] = [key.slice(0, key.lastIndexOf("/")), key.slice(key.lastIndexOf("/") + 1)];
  const [role, name] = service.split("!");
  const action = button.dataset.action;
  button.disabled = true;
  try {
    const {run} = await api("POST", "/api/repos/" + enc(repo) + "/services/" + enc(role) + "/" + enc(name) +
      "/actions/" + enc(action));
    notice("started " + action + " on " + service);
    selectedRun = run;
    await Promise.all([refreshServices(), refreshRuns()]);
  } catch (err) {
    if (!(err instanceof Unauthorized)) notice(err.message);
  } finally {
    button.disabled = false;
  }
});

// -- runs ------------------------------------------------------------------------------------

let selectedRun = null;

async function refreshRuns() {
  const query = new URLSearchParams({limit: "50"});
  const repo = $("#runs-repo").value.trim();
  const service = $("#runs-service").value.trim();
  const state = $("#runs-state").value;
  if (repo) query.set("repo", repo);
  if (service) query.set("service", service);
  if (state) query.set("state", state);
  const {runs} = await api("GET", "/api/runs?" + query);
  keyed($("#runs"), runs, "data-run", (r) => r.id, runRow, updateRun);
  const shown = runs.find((r) => r.id === selectedRun);
  if (shown) showLog(shown);
}

function runRow(r) {
  const row = el("li", {class: "row run", tabindex: 0});
  updateRun(row, r);
  return row;
}

function updateRun(row, r) {
  const sig = r.state + r.ended + (r.state === "running" ? Date.now() : "");
  if (row.dataset.sig === sig) return;
  row.dataset.sig = sig;
  fill(row,
    stateEl(r.state),
    el("span", {class: "name"}, r.action, el("span", {class: "muted", text: " on " + (r.service || "the robot")})),
    el("span", {class: "muted", text: r.repo}),
    el("span", {class: "muted", title: "trigger", text: "⚡ " + r.trigger.kind + (r.trigger.event_type ? " " + r.trigger.event_type : "")}),
    r.started ? timeEl(r.started) : null,
    el("span", {class: "muted", title: "duration", text: duration(r)}));
  row.classList.toggle("selected", r.id === selectedRun);
}

function showLog(run) {
  const pre = $("#run-log");
  const text = run.log || "(no log yet)";
  if (pre.textContent !== text) pre.textContent = text;
  pre.hidden = false;
  pre.dataset.run = run.id;
}

$("#runs").addEventListener("click", async (ev) => {
  const row = ev.target.closest("[data-run]");
  if (!row) return;
  selectedRun = row.dataset.run;
  for (const s of document.querySelectorAll("#runs .selected")) s.classList.remove("selected");
  row.classList.add("selected");
  try { showLog(await api("GET", "/api/runs/" + enc(selectedRun))); } catch (err) { notice(err.message); }
});
for (const id of ["#runs-repo", "#runs-service", "#runs-state"]) {
  $(id).addEventListener(id === "#runs-state" ? "change" : "input", () => refreshRuns().catch(() => {}));
}

// -- error conditions and alarms -------------------------------------------------------------

const GROUPS = {
  ecos: {
    line: (g) => [g.app_name, g.error_msg || g.eco_type].filter(Boolean).join(": "),
    count: (g) => g.occurence,
    sort: (v) => v === "count" ? "occurence" : "last_time",
  },
  alarms: {
    line: (g) => [g.severity, g.service, g.method, g.msg].filter(Boolean).join(" · "),
    count: (g) => g.count,
    sort: (v) => v,
  },
};

async function refreshGroups(kind) {
  const sort = GROUPS[kind].sort($("#" + kind + "-sort").value);
  const data = await api("GET", "/api/" + kind + "?limit=50&sort=" + sort);
  keyed($("#" + kind), data[kind], "data-group", (g) => g.id, (g) => groupRow(kind, g), (n, g) => updateGroup(kind, n, g));
}

function groupRow(kind, g) {
  const row = el("li", {class: "row group"});
  updateGroup(kind, row, g);
  return row;
}

function updateGroup(kind, row, g) {
  const sig = JSON.stringify([g.state, g.last_time, g.acked, GROUPS[kind].count(g), g.msg, g.error_msg]);
  if (row.dataset.sig === sig && row.dataset.day === new Date().toDateString()) return;
  row.dataset.sig = sig;
  row.dataset.day = new Date().toDateString();
  const ended = g.state === "CLOSED" || g.state === "closed" || g.state === "resolved";
  const button = (what, label) => el("button", {type: "button", "data-do": what, text: label});
  fill(row,
    stateEl(g.state),
    el("span", {class: "count", title: "occurrences", text: "×" + GROUPS[kind].count(g)}),
    el("span", {class: "grow", text: GROUPS[kind].line(g)}),
    timeEl(g.last_time),
    g.acked ? el("span", {class: "muted", text: "acked by " + g.acked.by}) : null,
    el("span", {class: "buttons"},
      button("ack", "Ack"), button("close", "Close"), button("reopen", "Reopen"), button("silence", "Silence")));
  row.classList.toggle("ended", ended);
}

async function groupAction(kind, ev) {
  const button = ev.target.closest("button[data-do]");
  if (!button) return;
  const row = button.closest("[data-group]");
  const id = row.dataset.group;
  const what = button.dataset.do;
  button.disabled = true;
  try {
    if (what === "silence") {
      const select = $("#silence-duration");
      const seconds = Number(select ? select.value : 3600) || 3600;
      await api("POST", "/api/silences", {matchers: {id}, duration: seconds,
        comment: "from the dashboard", created_by: "dashboard"});
      notice("silenced for " + (select ? select.selectedOptions[0].textContent : "1 h"));
      refreshSilences().catch(() => {});
    } else {
      const group = await api("POST", "/api/" + kind + "/" + id + "/" + what, {by: "dashboard"});
      updateGroup(kind, row, group); // the answer is the group as it is now
    }
  } catch (err) {
    if (!(err instanceof Unauthorized)) notice(err.message);
  } finally {
    button.disabled = false;
  }
}

for (const kind of Object.keys(GROUPS)) {
  $("#" + kind).addEventListener("click", (ev) => groupAction(kind, ev));
  $("#" + kind + "-sort").addEventListener("change", () => refreshGroups(kind).catch(() => {}));
}

// -- silences and heartbeats -----------------------------------------------------------------

async function refreshSilences() {
  const {silences} = await api("GET", "/api/silences");
  keyed($("#silences"), silences, "data-silence", (s) => s.id, () => el("li", {class: "row silence"}), (row, s) => {
    if (row.dataset.state === s.state) return;
    row.dataset.state = s.state;
    const matchers = Object.entries(s.matchers).map(([k, v]) => k + "=" + v).join(", ");
    fill(row,
      stateEl(s.state),
      el("code", {class: "grow", text: matchers}),
      s.comment ? el("span", {class: "muted", text: s.comment}) : null,
      el("span", {}, s.state === "expired" ? "ended " : s.state === "pending" ? "starts " : "ends ",
        timeEl(s.state === "pending" ? s.starts : s.ends)),
      s.state === "expired" ? null : el("button", {type: "button", "data-expire": s.id, text: "Expire"}));
  });
}

$("#silences").addEventListener("click", async (ev) => {
  const button = ev.target.closest("button[data-expire]");
  if (!button) return;
  button.disabled = true;
  try {
    await api("DELETE", "/api/silences/" + button.dataset.expire);
    await refreshSilences();
  } catch (err) {
    if (!(err instanceof Unauthorized)) notice(err.message);
    button.disabled = false;
  }
});

$("#silence-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const matchers = {};
  for (const part of $("#silence-matchers").value.split(",")) {
    const at = part.indexOf("=");
    if (at < 1) { if (part.trim()) { notice("a matcher is name=glob: " + part.trim()); return; } continue; }
    matchers[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  try {
    await api("POST", "/api/silences", {matchers, duration: Number($("#silence-form-duration").value),
      comment: $("#silence-comment").value, created_by: "dashboard"});
    $("#silence-matchers").value = "";
    $("#silence-comment").value = "";
    await refreshSilences();
  } catch (err) {
    if (!(err instanceof Unauthorized)) notice(err.message);
  }
});

async function refreshHeartbeats() {
  const {heartbeats} = await api("GET", "/api/heartbeats?limit=200");
  keyed($("#heartbeats"), heartbeats, "data-heartbeat", (h) => h.name, () => el("li", {class: "row"}), (row, h) => {
    fill(row, stateEl(h.state), el("span", {class: "name grow", text: h.name}),
      el("span", {}, "last beat ", timeEl(h.last_beat)),
      el("span", {class: "muted", text: "within " + Math.round(h.timeout) + " s"}));
  });
}

// -- health ----------------------------------------------------------------------------------

const SKIP = new Set(["ok", "state", "kind"]);

function details(part) {
  return Object.entries(part)
    .filter(([k, v]) => !SKIP.has(k) && v !== null && typeof v !== "object")
    .slice(0, 6)
    .map(([k, v]) => k + " " + (typeof v === "number" && v > 1e9 && v < 1e10 ? timeText(v) : v))
    .join(" · ");
}

async function refreshHealth() {
  let h;
  try {
    h = await api("GET", "/api/health");
  } catch (err) {
    busOk = false;
    showConnection();
    fill($("#health"), el("li", {class: "row", "data-part": "bus"}, stateEl("unreachable"), el("span", {text: err.message})));
    throw err;
  }
  const wasDown = busOk === false;
  busOk = !!h.bus.ok;
  showConnection();
  // the stream may have outlived a bus outage on a dead subscription: open it anew
  if (wasDown && busOk && started) openLive(true);
  const parts = [["bus", h.bus], ...Object.entries(h.services || {})];
  if (h.version) parts.push(["version", {ok: true, state: h.version}]);
  keyed($("#health"), parts, "data-part", ([name]) => name, () => el("li", {class: "row part"}), (row, [name, p]) => {
    const ok = p.ok !== false;
    fill(row, stateEl(p.state || (ok ? "ok" : "down"), {class: "state " + (ok ? "s-ok" : "s-error")}),
      el("span", {class: "name", text: name.replace(/_/g, " ")}),
      el("span", {class: "muted grow", text: (p.kind ? p.kind + " · " : "") + details(p)}));
  });
}

// -- the rounds ------------------------------------------------------------------------------

const busy = new Set();
function round(name, work) {
  if (busy.has(name)) return;
  busy.add(name);
  work().catch((err) => { if (!(err instanceof Unauthorized)) console.debug(name, err.message); })
    .finally(() => busy.delete(name));
}

let ticks = 0;
function tick() {
  if (!started) return;
  round("health", refreshHealth);
  round("runs", refreshRuns);
  round("services", refreshServices);
  round("ecos", () => refreshGroups("ecos"));
  round("alarms", () => refreshGroups("alarms"));
  if (ticks % 3 === 0) {
    round("silences", refreshSilences);
    round("heartbeats", refreshHeartbeats);
    refreshTimes();
  }
  ticks++;
  setTimeout(tick, 2000);
}

begin();
