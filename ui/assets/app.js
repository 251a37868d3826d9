// trustmesh UI: one page, five views, plain DOM.
//
// Security: everything that comes from the API (SPIFFE IDs, paths, policy
// names, reasons) is attacker-influenced. It is only ever inserted with
// textContent, createTextNode or setAttribute; this file never assigns
// innerHTML/outerHTML, never calls insertAdjacentHTML, eval or new Function,
// and loads nothing from another host. All requests are relative to /ui/.

const API = "api/";
const SVGNS = "http://www.w3.org/2000/svg";
const VIEWS = ["identities", "ca", "access", "denials", "journal"];
const REFRESH_MS = { identities: 10000, ca: 30000, access: 5000, denials: 2000, journal: 15000 };

// ---------- small DOM helpers ----------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVGNS, tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function setAttrs(e, attrs) {
  if (!attrs) return;
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    e.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(e, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function clear(e) {
  while (e.firstChild) e.removeChild(e.firstChild);
}

function $(id) {
  return document.getElementById(id);
}

// Text with a line-break opportunity after each "/" (a <wbr>, no
// markup from the data), so SPIFFE IDs and service names wrap at path
// segments rather than mid-word.
function breakable(text) {
  const f = document.createDocumentFragment();
  const parts = String(text ?? "").split("/");
  parts.forEach((p, i) => {
    f.append(document.createTextNode(i < parts.length - 1 ? p + "/" : p));
    if (i < parts.length - 1) f.append(document.createElement("wbr"));
  });
  return f;
}

function hiddenText(text) {
  return el("span", { class: "visually-hidden" }, text);
}

// ---------- time ----------

let serverSkewMs = 0; // server clock minus browser clock, from /session

function serverNow() {
  return new Date(Date.now() + serverSkewMs);
}

function parseTime(s) {
  if (!s) return null;
  const d = new Date(s);
  if (Number.isNaN(d.getTime()) || d.getUTCFullYear() < 1971) return null;
  return d;
}

function fmtTime(d) {
  if (!d) return "—";
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z").replace("Z", " UTC");
}

function fmtDuration(ms) {
  const s = Math.round(Math.abs(ms) / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const h = Math.floor(m / 60);
  if (h < 48) return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
  const d = Math.floor(h / 24);
  if (d < 60) return `${d} days`;
  if (d < 730) return `${Math.round(d / 30.44)} months`;
  return `${(d / 365.25).toFixed(1)} years`;
}

function fmtRelative(d, now = serverNow()) {
  if (!d) return "";
  const diff = d.getTime() - now.getTime();
  if (Math.abs(diff) < 1000) return "now";
  return diff > 0 ? `in ${fmtDuration(diff)}` : `${fmtDuration(diff)} ago`;
}

// A <time> with the absolute UTC time and, below it, the relative time.
function timeCell(s, opts = {}) {
  const d = parseTime(s);
  if (!d) return el("span", { class: "muted" }, opts.none || "—");
  const rel = fmtRelative(d);
  const past = d.getTime() < serverNow().getTime();
  return el("span", { class: "when" },
    el("time", { datetime: d.toISOString() }, fmtTime(d)),
    el("span", { class: "rel" + (opts.warnPast && past ? " rel-past" : "") }, rel));
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function api(path, init = {}) {
  let resp;
  try {
    resp = await fetch(API + path, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json", ...(init.headers || {}) },
      method: init.method || "GET",
    });
  } catch (err) {
    throw new ApiError(0, "the server cannot be reached (" + err.message + ")");
  }
  let body = null;
  const text = await resp.text();
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!resp.ok) {
    let msg = body && typeof body.error === "string" ? body.error : resp.statusText || "request failed";
    if (resp.status === 401) msg = "you are not signed in to this UI (" + msg + "); reload the page to sign in";
    const ra = parseInt(resp.headers.get("Retry-After") || "", 10);
    throw new ApiError(resp.status, msg, Number.isFinite(ra) ? ra : null);
  }
  if (body === null || typeof body !== "object") throw new ApiError(resp.status, "the server sent no JSON");
  return body;
}

function list(v) {
  return Array.isArray(v) ? v : [];
}

// ---------- session ----------

const session = { csrf: "", loaded: false };

async function loadSession() {
  const s = await api("session");
  session.csrf = String(s.csrf_token || "");
  session.loaded = true;
  const now = parseTime(s.now);
  if (now) serverSkewMs = now.getTime() - Date.now();
  $("session-trust-domain").textContent = s.trust_domain || "—";
  $("session-replica").textContent = s.replica || "—";
  tickClock();
  return s;
}

function tickClock() {
  const d = serverNow();
  $("session-now").textContent = fmtTime(new Date(Math.floor(d.getTime() / 1000) * 1000));
}

// ---------- error and status slots ----------

function showError(view, err) {
  const slot = $(view + "-error");
  const msg = err ? `Could not load: ${err.message}` : "";
  if (slot.dataset.msg === msg) return;
  slot.dataset.msg = msg;
  clear(slot);
  if (err) slot.append(el("p", { class: "notice notice-error" }, msg));
}

function setMeta(view, text) {
  $(view + "-meta").textContent = text;
}

function markLoaded(view) {
  $(view).setAttribute("data-loaded", "true");
}

// ---------- status words ----------

const STATUS = {
  "on-time": { label: "on time", glyph: "✓", rank: 4 },
  late: { label: "late", glyph: "!", rank: 3 },
  "stopped-renewing": { label: "stopped renewing", glyph: "■", rank: 2 },
  lapsed: { label: "lapsed", glyph: "✕", rank: 1 },
  revoked: { label: "revoked", glyph: "⊘", rank: 0 },
};

function statusBadge(status, label) {
  const known = STATUS[status];
  const cls = known ? "status-" + status : "status-unknown";
  return el("span", { class: "badge " + cls },
    el("span", { class: "glyph", "aria-hidden": "true" }, known ? known.glyph : "?"),
    label || (known ? known.label : status || "unknown"));
}

const VERDICT = {
  allowed: { glyph: "✓", words: "allowed" },
  conditional: { glyph: "?", words: "conditional" },
  denied: { glyph: "✕", words: "denied" },
};

function verdictBadge(v) {
  const k = VERDICT[v] ? v : "unknown";
  return el("span", { class: "badge verdict-" + k },
    el("span", { class: "glyph", "aria-hidden": "true" }, VERDICT[v] ? VERDICT[v].glyph : "?"),
    VERDICT[v] ? VERDICT[v].words : String(v || "unknown"));
}

const STATE_WORDS = {
  active: "active",
  prepared: "prepared",
  retiring: "retiring",
  trusted: "trusted",
};

function stateBadge(state) {
  const k = STATE_WORDS[state] ? state : "unknown";
  return el("span", { class: "badge state-badge state-" + k }, STATE_WORDS[state] || String(state || "unknown"));
}

// ---------- identities ----------

const ids = {
  rows: [],
  sortKey: "spiffe_id",
  sortDir: "ascending",
  filterStatus: "",
};

function identityCompare(key) {
  switch (key) {
    case "status":
      return (a, b) => (STATUS[a.status]?.rank ?? 9) - (STATUS[b.status]?.rank ?? 9);
    case "expires":
    case "last_issued":
      return (a, b) => (parseTime(a[key])?.getTime() ?? 0) - (parseTime(b[key])?.getTime() ?? 0);
    case "renewals":
    case "late_renewals":
    case "lapses":
      return (a, b) => (Number(a[key]) || 0) - (Number(b[key]) || 0);
    default:
      return (a, b) => String(a[key] ?? "").localeCompare(String(b[key] ?? ""));
  }
}

async function loadIdentities() {
  const data = await api("identities");
  ids.rows = list(data.identities);
  const at = parseTime(data.at);
  setMeta("identities", at ? `Audit as of ${fmtTime(at)}` : "");
  renderIdentitySummary();
  renderIdentities();
  markLoaded("identities");
}

function renderIdentitySummary() {
  const ul = $("identities-summary");
  clear(ul);
  const counts = {};
  for (const r of ids.rows) counts[r.status] = (counts[r.status] || 0) + 1;
  const total = el("li", {}, el("button", {
    type: "button", class: "chip chip-all", "aria-pressed": ids.filterStatus === "" ? "true" : "false", "data-status": "",
  }, el("strong", {}, String(ids.rows.length)), " ", ids.rows.length === 1 ? "identity" : "identities"));
  ul.append(total);
  for (const st of ["on-time", "late", "stopped-renewing", "lapsed", "revoked"]) {
    const n = counts[st] || 0;
    ul.append(el("li", {}, el("button", {
      type: "button", class: "chip chip-status status-" + st + (n ? "" : " chip-zero"),
      "aria-pressed": ids.filterStatus === st ? "true" : "false", "data-status": st,
    }, el("span", { class: "glyph", "aria-hidden": "true" }, STATUS[st].glyph), el("strong", {}, String(n)), " ", STATUS[st].label)));
  }
}

function renderIdentities() {
  const q = $("identities-search").value.trim().toLowerCase();
  const cmp = identityCompare(ids.sortKey);
  const dir = ids.sortDir === "descending" ? -1 : 1;
  const rows = ids.rows
    .filter((r) => !ids.filterStatus || r.status === ids.filterStatus)
    .filter((r) => !q || [r.spiffe_id, r.serial, r.status, r.status_label].some((v) => String(v ?? "").toLowerCase().includes(q)))
    .sort((a, b) => dir * cmp(a, b) || String(a.spiffe_id).localeCompare(String(b.spiffe_id)));

  for (const th of document.querySelectorAll("#identities-table th[data-key]")) {
    th.setAttribute("aria-sort", th.dataset.key === ids.sortKey ? ids.sortDir : "none");
  }
  const tbody = document.querySelector("#identities-table tbody");
  clear(tbody);
  for (const r of rows) {
    tbody.append(el("tr", { "data-spiffe-id": r.spiffe_id, "data-status": r.status },
      el("td", { class: "id-cell" }, el("code", {}, breakable(r.spiffe_id))),
      el("td", {}, statusBadge(r.status, r.status_label)),
      el("td", {}, el("code", { class: "serial" }, r.serial || "—")),
      el("td", {}, timeCell(r.expires, { warnPast: true })),
      el("td", {}, timeCell(r.last_issued, { none: "never" })),
      el("td", { class: "num" }, String(r.renewals ?? 0)),
      el("td", { class: "num" + (r.late_renewals > 0 ? " num-warn" : "") }, String(r.late_renewals ?? 0)),
      el("td", { class: "num" + (r.lapses > 0 ? " num-bad" : "") }, String(r.lapses ?? 0))));
  }
  if (!rows.length) {
    const why = ids.rows.length ? "No identity matches the search." : "No workload identities yet: none has been issued by this CA.";
    tbody.append(el("tr", { class: "empty" }, el("td", { colspan: "8" }, why)));
  }
  const shown = rows.length === ids.rows.length ? `${rows.length} shown` : `${rows.length} of ${ids.rows.length} shown`;
  $("identities-count").textContent = shown;
}

function initIdentities() {
  $("identities-search").addEventListener("input", renderIdentities);
  for (const th of document.querySelectorAll("#identities-table th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      if (ids.sortKey === key) {
        ids.sortDir = ids.sortDir === "ascending" ? "descending" : "ascending";
      } else {
        ids.sortKey = key;
        ids.sortDir = "ascending";
      }
      renderIdentities();
    });
  }
  $("identities-summary").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-status]");
    if (!b) return;
    const st = b.dataset.status;
    ids.filterStatus = ids.filterStatus === st ? "" : st;
    for (const x of $("identities-summary").querySelectorAll("button[data-status]")) {
      x.setAttribute("aria-pressed", x.dataset.status === ids.filterStatus ? "true" : "false");
    }
    renderIdentities();
  });
}

// ---------- CA ----------

const caState = { data: null };

async function loadCA() {
  caState.data = await api("ca");
  renderCA();
  markLoaded("ca");
}

function renderCA() {
  const data = caState.data;
  if (!data) return;
  const gens = list(data.generations).slice().sort((a, b) =>
    (a.role === b.role ? 0 : a.role === "root" ? -1 : 1) ||
    (parseTime(a.not_before)?.getTime() ?? 0) - (parseTime(b.not_before)?.getTime() ?? 0));
  const events = list(data.events);
  const expiries = list(data.next_expiries);

  const active = gens.filter((g) => g.state === "active");
  setMeta("ca", `${gens.length} certificate${gens.length === 1 ? "" : "s"} · ${events.length} CA event${events.length === 1 ? "" : "s"}`);

  const tbody = document.querySelector("#ca-generations tbody");
  clear(tbody);
  for (const g of gens) {
    tbody.append(el("tr", { "data-role": g.role, "data-state": g.state, "data-serial": g.serial },
      el("td", {}, g.role === "root" ? "root" : g.role === "intermediate" ? "intermediate" : String(g.role)),
      el("td", {}, stateBadge(g.state)),
      el("td", { class: "id-cell" }, g.subject || "—"),
      el("td", {}, el("code", { class: "serial" }, g.serial || "—")),
      el("td", {}, el("code", { class: "fingerprint" }, g.fingerprint || "—")),
      el("td", {}, timeCell(g.not_before)),
      el("td", {}, timeCell(g.not_after, { warnPast: true }))));
  }
  if (!gens.length) tbody.append(el("tr", { class: "empty" }, el("td", { colspan: "7" }, "No CA certificates are loaded.")));

  const ex = $("ca-expiries");
  clear(ex);
  for (const e of expiries) {
    ex.append(el("li", {}, el("span", { class: "what" }, e.what || "—"), " ", timeCell(e.at, { warnPast: true })));
  }
  if (!expiries.length) ex.append(el("li", { class: "muted" }, "Nothing is due to expire."));

  const ev = $("ca-events");
  clear(ev);
  for (const e of events.slice().reverse()) {
    ev.append(el("li", {},
      el("span", { class: "event-kind" }, e.kind || "event"), " ",
      timeCell(e.time),
      e.detail ? el("span", { class: "event-detail" }, e.detail) : null));
  }
  if (!events.length) ev.append(el("li", { class: "muted" }, "No CA event is recorded yet."));

  drawTimeline(gens, events, expiries, active);
}

function niceTicks(t0, t1) {
  const span = t1 - t0;
  const day = 86400000;
  const steps = [
    [3600000, "hour"], [6 * 3600000, "hour"], [day, "day"], [7 * day, "day"],
    [30 * day, "month"], [91 * day, "month"], [365 * day, "year"], [2 * 365 * day, "year"], [5 * 365 * day, "year"],
  ];
  let [step, unit] = steps[steps.length - 1];
  for (const [s, u] of steps) {
    if (span / s <= 8) { step = s; unit = u; break; }
  }
  const ticks = [];
  const start = new Date(t0);
  let d;
  if (unit === "year") d = new Date(Date.UTC(start.getUTCFullYear() + 1, 0, 1));
  else if (unit === "month") d = new Date(Date.UTC(start.getUTCFullYear(), start.getUTCMonth() + 1, 1));
  else d = new Date(Math.ceil(t0 / step) * step);
  const stepMonths = unit === "year" ? Math.max(12, Math.round(step / (365 * day)) * 12) : unit === "month" ? Math.max(1, Math.round(step / (30 * day))) : 0;
  while (d.getTime() <= t1 && ticks.length < 20) {
    ticks.push({ t: d.getTime(), label: tickLabel(d, unit) });
    if (stepMonths) d = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + stepMonths, 1));
    else d = new Date(d.getTime() + step);
  }
  return ticks;
}

function tickLabel(d, unit) {
  const iso = d.toISOString();
  if (unit === "year") return iso.slice(0, 4);
  if (unit === "month") return iso.slice(0, 7);
  if (unit === "day") return iso.slice(0, 10);
  return iso.slice(5, 10) + " " + iso.slice(11, 16);
}

function shortSerial(s) {
  s = String(s || "");
  return s.length > 10 ? "…" + s.slice(-8) : s;
}

function drawTimeline(gens, events, expiries, active) {
  const root = $("ca-timeline");
  for (const c of Array.from(root.childNodes)) {
    if (!(c.nodeName === "title" || c.nodeName === "desc")) root.removeChild(c);
  }
  const now = serverNow().getTime();
  const range = document.querySelector("input[name=ca-range]:checked")?.value || "all";
  const times = [now];
  for (const g of gens) {
    const nb = parseTime(g.not_before), na = parseTime(g.not_after);
    if (nb) times.push(nb.getTime());
    if (na) times.push(na.getTime());
  }
  for (const e of events) { const t = parseTime(e.time); if (t) times.push(t.getTime()); }
  let t0 = Math.min(...times), t1 = Math.max(...times);
  const day = 86400000;
  if (range === "year") { t0 = now - 365 * day; t1 = now + 365 * day; }
  if (range === "month") { t0 = now - 30 * day; t1 = now + 30 * day; }
  if (t1 - t0 < 3600000) { t0 -= 1800000; t1 += 1800000; }
  const pad = (t1 - t0) * 0.03;
  t0 -= pad; t1 += pad;

  const W = 960, labelW = 200, right = 24, top = 46, rowH = 34;
  const rows = gens.length;
  const eventsY = top + rows * rowH + 10;
  const H = eventsY + 46;
  root.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const x = (t) => labelW + ((t - t0) / (t1 - t0)) * (W - labelW - right);
  const clampX = (t) => Math.max(labelW, Math.min(W - right, x(t)));

  const g = svg("g", {});
  root.append(g);
  // Axis and grid.
  g.append(svg("rect", { class: "tl-bg", x: labelW, y: top - 6, width: W - labelW - right, height: rows * rowH + 58, rx: 4 }));
  for (const tk of niceTicks(t0, t1)) {
    const tx = x(tk.t);
    g.append(svg("line", { class: "tl-grid", x1: tx, x2: tx, y1: top - 6, y2: H - 4 }));
    g.append(svg("text", { class: "tl-tick", x: tx, y: top - 12, "text-anchor": "middle" }, tk.label));
  }
  // Bars.
  gens.forEach((gen, i) => {
    const y = top + i * rowH;
    const nb = parseTime(gen.not_before)?.getTime() ?? t0;
    const na = parseTime(gen.not_after)?.getTime() ?? t1;
    const rowG = svg("g", { class: "tl-row" });
    rowG.append(svg("text", { class: "tl-label", x: 8, y: y + rowH / 2 + 4 },
      svg("tspan", { class: "tl-role" }, gen.role === "root" ? "Root" : "Intermediate"),
      svg("tspan", { class: "tl-serial", dx: 6 }, shortSerial(gen.serial))));
    if (na >= t0 && nb <= t1) {
      const bx = clampX(nb), bw = Math.max(3, clampX(na) - bx);
      const bar = svg("rect", {
        class: "tl-bar state-" + (STATE_WORDS[gen.state] ? gen.state : "unknown") + (gen.role === "root" ? " tl-root" : ""),
        x: bx, y: y + 6, width: bw, height: rowH - 12, rx: 3,
      }, svg("title", {}, `${gen.role} ${gen.serial || ""}: ${gen.state}, valid ${fmtTime(parseTime(gen.not_before))} to ${fmtTime(parseTime(gen.not_after))}`));
      rowG.append(bar);
      const label = STATE_WORDS[gen.state] || String(gen.state || "");
      const inside = bw > 90;
      rowG.append(svg("text", {
        class: "tl-state" + (inside ? " tl-state-in state-" + (STATE_WORDS[gen.state] ? gen.state : "unknown") : ""),
        x: inside ? bx + 8 : Math.min(bx + bw + 6, W - right - 60), y: y + rowH / 2 + 4,
      }, label));
    } else {
      rowG.append(svg("text", { class: "tl-state", x: labelW + 8, y: y + rowH / 2 + 4 }, "outside this range"));
    }
    g.append(rowG);
  });
  if (!rows) g.append(svg("text", { class: "tl-state", x: labelW + 8, y: top + 20 }, "No CA certificates."));

  // Rotation events and next expiries.
  g.append(svg("text", { class: "tl-label", x: 8, y: eventsY + 14 }, svg("tspan", { class: "tl-role" }, "Rotations")));
  g.append(svg("text", { class: "tl-label", x: 8, y: eventsY + 34 }, svg("tspan", { class: "tl-role" }, "Next expiries")));
  if (!events.length) g.append(svg("text", { class: "tl-none", x: labelW + 10, y: eventsY + 14 }, "none yet"));
  for (const e of events) {
    const t = parseTime(e.time)?.getTime();
    if (t === undefined || t < t0 || t > t1) continue;
    const ex = x(t), ey = eventsY + 10;
    g.append(svg("path", { class: "tl-event", d: `M${ex} ${ey - 6}L${ex + 6} ${ey}L${ex} ${ey + 6}L${ex - 6} ${ey}Z` },
      svg("title", {}, `${e.kind || "event"} at ${fmtTime(parseTime(e.time))}${e.detail ? ": " + e.detail : ""}`)));
  }
  for (const e of expiries) {
    const t = parseTime(e.at)?.getTime();
    if (t === undefined || t < t0 || t > t1) continue;
    const ex = x(t), ey = eventsY + 30;
    g.append(svg("path", { class: "tl-expiry", d: `M${ex - 6} ${ey - 5}L${ex + 6} ${ey - 5}L${ex} ${ey + 6}Z` },
      svg("title", {}, `${e.what} expires ${fmtTime(parseTime(e.at))}`)));
  }
  // Now marker last, on top.
  if (now >= t0 && now <= t1) {
    const nx = x(now);
    g.append(svg("line", { class: "tl-now", x1: nx, x2: nx, y1: 18, y2: H - 2 }));
    g.append(svg("rect", { class: "tl-now-tag", x: nx - 18, y: 2, width: 36, height: 16, rx: 3 }));
    g.append(svg("text", { class: "tl-now-label", x: nx, y: 14, "text-anchor": "middle" }, "now"));
  }

  // Text alternative.
  const parts = [];
  const roots = gens.filter((x) => x.role === "root").length;
  parts.push(`${roots} root and ${gens.length - roots} intermediate certificate${gens.length - roots === 1 ? "" : "s"}.`);
  for (const a of active) parts.push(`Active ${a.role} ${a.serial} valid until ${fmtTime(parseTime(a.not_after))}.`);
  if (events.length) {
    const last = events[events.length - 1];
    parts.push(`${events.length} CA events (creation and rotations), the latest ${last.kind || "event"} at ${fmtTime(parseTime(last.time))}.`);
  } else {
    parts.push("No CA events.");
  }
  if (expiries.length) parts.push(`Next expiry: ${expiries[0].what} at ${fmtTime(parseTime(expiries[0].at))}.`);
  parts.push("The same data is in the generations table and the lists.");
  $("ca-timeline-desc").textContent = parts.join(" ");
}

function initCA() {
  for (const r of document.querySelectorAll("input[name=ca-range]")) {
    r.addEventListener("change", renderCA);
  }
}

// ---------- access ----------

const acc = { data: null, from: "", to: "", version: "" };

function pairKey(from, to) {
  return from + "\u0000" + to;
}

async function loadAccess() {
  const data = await api("access");
  const version = `${data.policy_version}/${data.mesh_version}`;
  const changed = version !== acc.version || !acc.data;
  acc.data = { services: list(data.services), cells: list(data.cells) };
  acc.version = version;
  setMeta("access", `Policy version ${data.policy_version ?? "?"} · mesh version ${data.mesh_version ?? "?"}`);
  if (changed) renderAccess();
  markLoaded("access");
}

function serviceLabel(id) {
  return id || "unknown service";
}

function renderAccess() {
  if (!acc.data) return;
  const { services, cells } = acc.data;
  fillSelect($("access-from"), services.map((s) => s.id), "any caller", acc.from);
  const targets = services.filter((s) => s.kind !== "workload").map((s) => s.id);
  fillSelect($("access-to"), targets, "any service", acc.to);
  drawGraph(services, cells);
  renderAccessTable();
  applyAccessSelection();
}

function fillSelect(sel, ids, anyText, current) {
  const want = [""].concat(ids);
  const have = Array.from(sel.options).map((o) => o.value);
  if (want.length === have.length && want.every((v, i) => v === have[i])) {
    sel.value = current;
    return;
  }
  clear(sel);
  sel.append(el("option", { value: "" }, anyText));
  for (const id of ids) sel.append(el("option", { value: id }, id));
  if (current && !ids.includes(current)) sel.append(el("option", { value: current }, current + " (not in the mesh)"));
  sel.value = current;
}

// One edge per (caller, service): its verdict is the ports' verdict when
// they agree, else conditional (it depends on the port).
function pairs(cells) {
  const m = new Map();
  for (const c of cells) {
    const k = pairKey(c.from, c.to);
    let p = m.get(k);
    if (!p) { p = { from: c.from, to: c.to, cells: [] }; m.set(k, p); }
    p.cells.push(c);
  }
  for (const p of m.values()) {
    const vs = new Set(p.cells.map((c) => c.verdict));
    p.verdict = vs.size === 1 ? p.cells[0].verdict : "conditional";
    p.mixedPorts = vs.size > 1;
  }
  return Array.from(m.values());
}

function pairSummary(p) {
  const c = p.cells[0];
  if (p.mixedPorts) return `${p.from} to ${p.to}: depends on the port`;
  const who = c.policy ? ` by ${c.policy}${c.rule !== null && c.rule !== undefined ? " rule " + c.rule : ""}` : "";
  return `${p.from} to ${p.to}: ${VERDICT[c.verdict]?.words || c.verdict}${who}${c.reason ? " (" + c.reason + ")" : ""}`;
}

function drawGraph(services, cells) {
  const root = $("access-graph");
  for (const c of Array.from(root.childNodes)) {
    if (!(c.nodeName === "title" || c.nodeName === "desc")) root.removeChild(c);
  }
  const ps = pairs(cells);
  const n = services.length;
  const R = Math.max(140, Math.min(480, n * 26));
  const margin = 170;
  const W = 2 * (R + margin), H = 2 * (R + 70);
  root.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const cx = W / 2, cy = H / 2;
  const pos = new Map();
  const sorted = services.slice().sort((a, b) => String(a.id).localeCompare(String(b.id)));
  sorted.forEach((s, i) => {
    const a = n === 1 ? -Math.PI / 2 : -Math.PI / 2 + (2 * Math.PI * i) / n;
    pos.set(s.id, { x: n === 1 ? cx : cx + R * Math.cos(a), y: n === 1 ? cy : cy + R * Math.sin(a), a, s });
  });

  const defs = svg("defs", {});
  for (const v of ["allowed", "conditional", "denied"]) {
    defs.append(svg("marker", {
      id: "arrow-" + v, viewBox: "0 0 10 10", refX: "9", refY: "5", markerUnits: "userSpaceOnUse", markerWidth: "13", markerHeight: "13", orient: "auto-start-reverse",
    }, svg("path", { class: "arrow verdict-" + v, d: "M0 0L10 5L0 10Z" })));
  }
  root.append(defs);

  // Nodes shrink on a crowded circle so that neighbours do not overlap.
  const nodeR = n > 1 ? Math.max(7, Math.min(20, (Math.PI * R) / n * 0.55)) : 20;
  const edges = svg("g", { class: "edges", id: "access-edges" });
  root.append(edges);
  acc.graph = { ps, pos, nodeR, big: ps.length > MAX_DRAWN_PAIRS };
  drawEdges();

  const nodes = svg("g", { class: "nodes" });
  for (const { x, y, a, s } of pos.values()) {
    const ng = svg("g", { class: "node" + (s.kind === "workload" ? " node-workload" : ""), "data-id": s.id },
      svg("title", {}, `${s.id}${s.kind === "workload" ? " (caller only)" : ""}: ${list(s.identities).join(", ") || "no identities"}`));
    if (s.kind === "workload") {
      ng.append(svg("rect", { class: "node-shape", x: x - nodeR, y: y - nodeR, width: 2 * nodeR, height: 2 * nodeR, rx: 6 }));
    } else {
      ng.append(svg("circle", { class: "node-shape", cx: x, cy: y, r: nodeR }));
    }
    const lx = n === 1 ? x : x + Math.cos(a) * (nodeR + 10);
    const ly = n === 1 ? y + nodeR + 18 : y + Math.sin(a) * (nodeR + 14) + 4;
    const cos = n === 1 ? 0 : Math.cos(a);
    const anchor = Math.abs(cos) < 0.3 ? "middle" : cos > 0 ? "start" : "end";
    const belowish = n !== 1 && Math.sin(a) > 0.3;
    ng.append(svg("text", { class: "node-label", x: lx, y: belowish ? ly + 6 : ly - (Math.sin(a) < -0.3 ? 10 : 0), "text-anchor": anchor },
      svg("tspan", { class: "node-name", x: lx }, s.name || s.id),
      svg("tspan", { class: "node-ns", x: lx, dy: "1.2em" }, s.namespace || "")));
    ng.addEventListener("click", () => selectService(s.id));
    nodes.append(ng);
  }
  root.append(nodes);
  if (!n) {
    root.append(svg("text", { class: "tl-state", x: cx, y: cy, "text-anchor": "middle" }, "The mesh model has no services yet."));
  }

  const counts = { allowed: 0, conditional: 0, denied: 0 };
  for (const p of ps) if (counts[p.verdict] !== undefined) counts[p.verdict]++;
  $("access-graph-desc").textContent = n
    ? `${n} services and ${ps.length} caller-to-service pairs: ${counts.allowed} allowed, ${counts.conditional} conditional, ${counts.denied} denied. The table below lists every pair and port with its deciding policy.`
    : "The mesh model has no services yet.";
  applyEdgeFilter();
}

// A service calling itself: a small loop beside its node, clockwise along
// the circle (labels sit outside it, other edges inside).
function selfLoop(p, a, nodeR) {
  const v = VERDICT[p.verdict] ? p.verdict : "conditional";
  const t = a.a + Math.PI / 2; // tangent, clockwise
  const ux = Math.cos(t), uy = Math.sin(t);
  const ox = Math.cos(a.a), oy = Math.sin(a.a);
  const s1 = { x: a.x + ux * nodeR * 0.6 + ox * nodeR * 0.8, y: a.y + uy * nodeR * 0.6 + oy * nodeR * 0.8 };
  const s2 = { x: a.x + ux * nodeR * 0.6 - ox * nodeR * 0.8, y: a.y + uy * nodeR * 0.6 - oy * nodeR * 0.8 };
  const far = nodeR * 2.6;
  const c1 = { x: s1.x + ux * far + ox * nodeR * 1.2, y: s1.y + uy * far + oy * nodeR * 1.2 };
  const c2 = { x: s2.x + ux * far - ox * nodeR * 1.2, y: s2.y + uy * far - oy * nodeR * 1.2 };
  const f = (q) => `${q.x.toFixed(1)} ${q.y.toFixed(1)}`;
  const d = `M${f(s1)}C${f(c1)} ${f(c2)} ${f(s2)}`;
  const eg = svg("g", { class: "edge edge-self verdict-" + v, "data-from": p.from, "data-to": p.to, "data-verdict": p.verdict },
    svg("title", {}, pairSummary(p)),
    svg("path", { class: "edge-hit", d }),
    svg("path", { class: "edge-line verdict-" + v, d, "marker-end": `url(#arrow-${v})` }));
  if (v !== "allowed") {
    const m = { x: a.x + ux * (nodeR * 0.6 + far * 0.75), y: a.y + uy * (nodeR * 0.6 + far * 0.75) };
    eg.append(svg("circle", { class: "edge-mark-bg", cx: m.x, cy: m.y, r: 7 }));
    eg.append(svg("text", { class: "edge-mark verdict-" + v, x: m.x, y: m.y + 4, "text-anchor": "middle" }, v === "denied" ? "✕" : "?"));
  }
  eg.addEventListener("mouseenter", () => showPairDetail(p.from, p.to, true));
  eg.addEventListener("mouseleave", () => applyAccessSelection());
  eg.addEventListener("click", () => selectPair(p.from, p.to));
  return eg;
}

// Pairs beyond this are not all drawn at once: a graph of thousands of
// arrows is neither readable nor quick. Then only the pairs of the chosen
// caller or service are drawn, and the table still lists every cell.
const MAX_DRAWN_PAIRS = 400;

function drawEdges() {
  const g = acc.graph;
  const edges = $("access-edges");
  if (!g || !edges) return;
  clear(edges);
  g.drawnFor = acc.from + "\u0000" + acc.to;
  const { pos, nodeR } = g;
  let ps = g.ps;
  if (g.big) {
    ps = acc.from || acc.to ? ps.filter((p) => (!acc.from || p.from === acc.from) && (!acc.to || p.to === acc.to)) : [];
  }
  for (const p of ps) {
    const a = pos.get(p.from), b = pos.get(p.to);
    if (!a || !b) continue;
    if (p.from === p.to) {
      edges.append(selfLoop(p, a, nodeR));
      continue;
    }
    const dx = b.x - a.x, dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    // Bend to the right of the direction of travel, so A->B and B->A separate.
    const bend = Math.min(60, len * 0.18);
    const mx = (a.x + b.x) / 2 + (-dy / len) * bend;
    const my = (a.y + b.y) / 2 + (dx / len) * bend;
    const sa = shorten(a, { x: mx, y: my }, nodeR + 2);
    const sb = shorten(b, { x: mx, y: my }, nodeR + 6);
    const d = `M${sa.x.toFixed(1)} ${sa.y.toFixed(1)}Q${mx.toFixed(1)} ${my.toFixed(1)} ${sb.x.toFixed(1)} ${sb.y.toFixed(1)}`;
    const v = VERDICT[p.verdict] ? p.verdict : "conditional";
    const eg = svg("g", { class: "edge verdict-" + v, "data-from": p.from, "data-to": p.to, "data-verdict": p.verdict },
      svg("title", {}, pairSummary(p)),
      svg("path", { class: "edge-hit", d }),
      svg("path", { class: "edge-line verdict-" + v, d, "marker-end": `url(#arrow-${v})` }));
    // A mark in the middle of the curve: nothing for allowed, ? and ✕ otherwise.
    if (v !== "allowed") {
      const qx = 0.25 * sa.x + 0.5 * mx + 0.25 * sb.x, qy = 0.25 * sa.y + 0.5 * my + 0.25 * sb.y;
      eg.append(svg("circle", { class: "edge-mark-bg", cx: qx, cy: qy, r: 7 }));
      eg.append(svg("text", { class: "edge-mark verdict-" + v, x: qx, y: qy + 4, "text-anchor": "middle" }, v === "denied" ? "✕" : "?"));
    }
    eg.addEventListener("mouseenter", () => showPairDetail(p.from, p.to, true));
    eg.addEventListener("mouseleave", () => applyAccessSelection());
    eg.addEventListener("click", () => selectPair(p.from, p.to));
    edges.append(eg);
  }
  const note = $("access-graph-note");
  if (g.big && !acc.from && !acc.to) {
    note.textContent = `${g.ps.length} caller-to-service pairs are too many to draw at once: choose a caller or a service (above, or click a node) to draw its arrows. The table lists every one.`;
  } else if (g.big) {
    note.textContent = `Drawing the ${ps.length} pairs of the chosen ${acc.from && acc.to ? "caller and service" : acc.from ? "caller" : "service"} out of ${g.ps.length}.`;
  } else {
    note.textContent = "";
  }
  applyEdgeFilter();
}

function shorten(p, toward, by) {
  const dx = toward.x - p.x, dy = toward.y - p.y;
  const l = Math.hypot(dx, dy) || 1;
  return { x: p.x + (dx / l) * by, y: p.y + (dy / l) * by };
}

// Beyond this many cells the table shows the chosen caller's or service's
// rows (or the first ones) until "Show all" is pressed: thousands of rows
// take the browser seconds to lay out.
const MAX_TABLE_ROWS = 500;

function renderAccessTable() {
  const cells = acc.data.cells;
  const key = acc.from + "\u0000" + acc.to;
  const limited = cells.length > MAX_TABLE_ROWS && !acc.showAll;
  let shown = cells;
  if (limited) {
    if (acc.from || acc.to) shown = cells.filter((c) => (!acc.from || c.from === acc.from) && (!acc.to || c.to === acc.to));
    shown = shown.slice(0, MAX_TABLE_ROWS);
  }
  acc.tableFor = limited ? key : null;
  const tbody = document.querySelector("#access-table tbody");
  clear(tbody);
  for (const c of shown) {
    const conds = list(c.conditions);
    tbody.append(el("tr", { "data-from": c.from, "data-to": c.to, "data-port": String(c.port), "data-verdict": c.verdict },
      el("td", {}, el("code", {}, c.from)),
      el("td", {}, el("code", {}, c.to)),
      el("td", { class: "num" }, c.port ? String(c.port) : "every port"),
      el("td", {}, verdictBadge(c.verdict)),
      el("td", {}, policyText(c)),
      el("td", {}, el("span", {}, c.reason || ""),
        conds.length ? el("ul", { class: "conditions" }, conds.map((x) => el("li", {}, x))) : null)));
  }
  if (!cells.length) tbody.append(el("tr", { class: "empty" }, el("td", { colspan: "6" }, "No callers or services in the mesh model.")));
  $("access-table-note").textContent = limited
    ? `Showing ${shown.length} of ${cells.length} cells${acc.from || acc.to ? ", those of the chosen caller or service" : ""}. Choose a caller or a service above to see theirs.`
    : "";
  $("access-show-all").hidden = !limited;
  $("access-show-all").textContent = `Show all ${cells.length} cells`;
}

function policyText(c) {
  if (!c.policy) return el("span", { class: "muted" }, "none");
  return el("span", {}, el("code", {}, c.policy), c.rule !== null && c.rule !== undefined ? ` rule ${c.rule}` : "");
}

function selectPair(from, to) {
  acc.from = from || "";
  acc.to = to || "";
  const q = new URLSearchParams();
  if (acc.from) q.set("from", acc.from);
  if (acc.to) q.set("to", acc.to);
  const qs = q.toString();
  history.replaceState(null, "", "#access" + (qs ? "?" + qs : ""));
  $("access-from").value = acc.from;
  $("access-to").value = acc.to;
  applyAccessSelection();
}

function selectService(id) {
  const svc = acc.data?.services.find((s) => s.id === id);
  if (svc && svc.kind === "workload") selectPair(id, "");
  else selectPair("", id);
}

function applyEdgeFilter() {
  const shown = new Set(Array.from(document.querySelectorAll("#access-pick .checks input:checked")).map((i) => i.value));
  for (const e of document.querySelectorAll("#access-graph .edge")) {
    e.classList.toggle("filtered", !shown.has(e.getAttribute("data-verdict")));
  }
}

function applyAccessSelection() {
  const { from, to } = acc;
  if (acc.data && acc.tableFor !== null && acc.tableFor !== undefined && acc.tableFor !== from + "\u0000" + to) renderAccessTable();
  if (acc.graph && acc.graph.big && acc.graph.drawnFor !== from + "\u0000" + to) {
    acc.graph.drawnFor = from + "\u0000" + to;
    drawEdges();
  }
  const any = from || to;
  const match = (f, t) => (!from || f === from) && (!to || t === to);
  for (const e of document.querySelectorAll("#access-graph .edge")) {
    const m = match(e.getAttribute("data-from"), e.getAttribute("data-to"));
    e.classList.toggle("selected", !!any && m);
    e.classList.toggle("dim", !!any && !m);
  }
  for (const nd of document.querySelectorAll("#access-graph .node")) {
    const id = nd.getAttribute("data-id");
    nd.classList.toggle("selected", id === from || id === to);
  }
  let first = null;
  for (const tr of document.querySelectorAll("#access-table tbody tr[data-from]")) {
    const m = !!any && match(tr.getAttribute("data-from"), tr.getAttribute("data-to"));
    tr.classList.toggle("selected", m);
    if (m && !first) first = tr;
  }
  showPairDetail(from, to, false);
}

function showPairDetail(from, to, hover) {
  const box = $("access-detail");
  clear(box);
  if (!acc.data) return;
  if (!from && !to) {
    box.append(el("p", { class: "muted" }, "Choose a caller and a service above, or point at an arrow."));
    return;
  }
  const cells = acc.data.cells.filter((c) => (!from || c.from === from) && (!to || c.to === to));
  box.append(el("p", { class: "pair-head" },
    el("code", {}, from || "any caller"), el("span", { class: "arrow-word" }, " → "), el("code", {}, to || "any service"),
    hover ? el("span", { class: "muted" }, " (pointer)") : null));
  if (!cells.length) {
    box.append(el("p", {}, "No cell matches: one of them is not in the mesh model."));
    return;
  }
  if (from && to) {
    const dl = el("ul", { class: "detail-cells" });
    for (const c of cells) {
      dl.append(el("li", {},
        el("div", { class: "detail-line" }, el("strong", {}, c.port ? `port ${c.port}${portName(c.to, c.port)}` : "every port"), " ", verdictBadge(c.verdict)),
        el("div", {}, "Decided by ", policyText(c)),
        c.reason ? el("div", { class: "muted" }, c.reason) : null,
        list(c.conditions).length ? el("ul", { class: "conditions" }, list(c.conditions).map((x) => el("li", {}, x))) : null));
    }
    box.append(dl);
    return;
  }
  const counts = { allowed: 0, conditional: 0, denied: 0 };
  for (const c of cells) if (counts[c.verdict] !== undefined) counts[c.verdict]++;
  box.append(el("p", {}, `${cells.length} cells: ${counts.allowed} allowed, ${counts.conditional} conditional, ${counts.denied} denied.`));
  const ul = el("ul", { class: "detail-cells compact" });
  for (const p of pairs(cells)) {
    const other = from ? p.to : p.from;
    ul.append(el("li", {}, el("a", { href: `#access?from=${encodeURIComponent(p.from)}&to=${encodeURIComponent(p.to)}` }, other), " ", verdictBadge(p.verdict)));
  }
  box.append(ul);
}

function portName(service, port) {
  const s = acc.data?.services.find((x) => x.id === service);
  const p = s && list(s.ports).find((x) => x.port === port);
  if (!p) return "";
  const bits = [p.name, p.protocol].filter(Boolean);
  return bits.length ? ` (${bits.join(", ")})` : "";
}

function initAccess() {
  $("access-from").addEventListener("change", () => selectPair($("access-from").value, acc.to));
  $("access-to").addEventListener("change", () => selectPair(acc.from, $("access-to").value));
  $("access-clear").addEventListener("click", () => selectPair("", ""));
  $("access-show-all").addEventListener("click", () => {
    acc.showAll = true;
    renderAccessTable();
    applyAccessSelection();
  });
  $("access-pick").addEventListener("submit", (e) => e.preventDefault());
  for (const c of document.querySelectorAll("#access-pick .checks input")) c.addEventListener("change", applyEdgeFilter);
  // A pointer click on a row selects its pair (keyboard users have the selects).
  document.querySelector("#access-table tbody").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-from]");
    if (tr) selectPair(tr.getAttribute("data-from"), tr.getAttribute("data-to"));
  });
}

// ---------- denials ----------

const den = { first: true, paused: false };

async function loadDenials(auto) {
  if (auto && den.paused) return;
  const data = await api("denials?limit=200");
  const rows = list(data.denials);
  const notice = $("denials-notice");
  const msgs = [];
  if (data.logging === false) msgs.push("Decision logging is off on this replica, so it records no denials. Turn decision logging on to see them here.");
  if (Number(data.dropped) > 0) msgs.push(`${data.dropped} denials were dropped before they could be recorded.`);
  const key = msgs.join("|");
  if (notice.dataset.msg !== key) {
    notice.dataset.msg = key;
    clear(notice);
    for (const m of msgs) notice.append(el("p", { class: "notice" }, m));
  }
  setMeta("denials", `Replica ${data.replica || "unknown"} · ${rows.length} shown`);
  $("denials-replica").textContent = data.replica || "unknown";
  renderDenials(rows);
  markLoaded("denials");
}

function endpoint(svc, side) {
  const s = side || {};
  return el("div", { class: "endpoint" },
    svc ? el("code", { class: "svc" }, svc) : el("span", { class: "muted" }, "unknown service"),
    s.principal ? el("code", { class: "principal" }, breakable(s.principal)) : null,
    s.address ? el("span", { class: "addr" }, s.address) : null);
}

function denialRow(d) {
  const from = d.from_service || "", to = d.to_service || "";
  const q = new URLSearchParams();
  if (from) q.set("from", from);
  if (to) q.set("to", to);
  const req = [d.method, d.host].filter(Boolean).join(" ");
  return el("tr", { "data-decision-id": d.decision_id },
    el("td", {}, timeCell(d.time)),
    el("td", {}, endpoint(from, d.source)),
    el("td", {}, endpoint(to, d.destination)),
    el("td", { class: "req" }, req ? el("div", {}, req) : null, d.path ? el("code", { class: "path" }, d.path) : null),
    el("td", {}, d.policy ? el("code", { class: "policy-name" }, d.policy) : el("span", { class: "muted" }, "no policy"),
      d.rule !== null && d.rule !== undefined && d.rule !== "" ? el("div", {}, `rule ${d.rule}`) : null,
      d.action ? el("div", { class: "muted" }, d.action) : null),
    el("td", {}, d.reason || ""),
    el("td", {}, el("a", { href: "#access" + (q.toString() ? "?" + q.toString() : "") }, "Access", hiddenText(` from ${from || "unknown"} to ${to || "unknown"}`))));
}

function renderDenials(rows) {
  const tbody = document.querySelector("#denials-table tbody");
  const want = new Set(rows.map((d) => String(d.decision_id)));
  const have = new Map();
  for (const tr of Array.from(tbody.children)) {
    const id = tr.getAttribute("data-decision-id");
    if (id === null || !want.has(id)) tbody.removeChild(tr);
    else have.set(id, tr);
  }
  // Keep existing rows in place (focus inside them survives a refresh);
  // insert new ones before the next row that already exists.
  let next = null;
  for (let i = rows.length - 1; i >= 0; i--) {
    const id = String(rows[i].decision_id);
    let tr = have.get(id);
    if (!tr) {
      tr = denialRow(rows[i]);
      if (!den.first) tr.classList.add("fresh");
      tbody.insertBefore(tr, next);
    }
    next = tr;
  }
  den.first = false;
  if (!rows.length) {
    tbody.append(el("tr", { class: "empty" }, el("td", { colspan: "7" }, "No denials recorded on this replica.")));
  }
  // Relative times age while rows stay.
  for (const t of tbody.querySelectorAll("time")) {
    const rel = t.parentNode.querySelector(".rel");
    if (rel) rel.textContent = fmtRelative(new Date(t.getAttribute("datetime")));
  }
}

// ---------- journal ----------

const jr = { busy: false, retryUntil: 0, retryTimer: null };

async function loadJournal() {
  const data = await api("journal");
  const dl = $("journal-summary");
  clear(dl);
  const cp = data.checkpoint || {};
  const w = data.witness || {};
  const kv = (k, ...v) => { dl.append(el("div", {}, el("dt", {}, k), el("dd", {}, ...v))); };
  kv("Entries", String(data.size ?? 0));
  kv("Checkpoint covers", cp.size !== undefined ? `${cp.size} entries` : "no checkpoint yet");
  kv("Root hash", cp.root_hash ? el("code", { class: "hash" }, cp.root_hash) : el("span", { class: "muted" }, "—"));
  kv("Witness", w.configured ? el("span", {}, el("code", {}, w.target || "configured"), " ", witnessBadge(w.state))
    : el("span", { class: "muted" }, "none configured: checkpoints are signed by this CA only"));
  kv("Last verification", data.last_verify ? verifySummary(data.last_verify) : el("span", { class: "muted" }, "not run since this replica started"));
  $("journal-checkpoint").textContent = cp.text || "No signed checkpoint yet.";
  setMeta("journal", `${data.size ?? 0} entries`);
  markLoaded("journal");
}

// ui's witness states: "not configured", "no export yet",
// "exported size N at T", "failing since T: ERR".
function witnessBadge(state) {
  const s = String(state || "unknown");
  let cls = "status-late", glyph = "!";
  if (/^(exported|ok\b)/i.test(s)) { cls = "status-on-time"; glyph = "✓"; }
  if (/^fail/i.test(s)) { cls = "status-lapsed"; glyph = "✕"; }
  return el("span", { class: "badge badge-wrap " + cls }, el("span", { class: "glyph", "aria-hidden": "true" }, glyph), s);
}

function verifySummary(r) {
  const at = parseTime(r.at);
  const fs = list(r.findings);
  if (r.ok) return el("span", {}, el("span", { class: "badge status-on-time" }, el("span", { class: "glyph", "aria-hidden": "true" }, "✓"), "verified"), ` ${r.checked} entries${at ? ", " + fmtRelative(at) : ""}`);
  return el("span", {}, el("span", { class: "badge status-lapsed" }, el("span", { class: "glyph", "aria-hidden": "true" }, "✕"), "failed"), ` ${fs.length} finding${fs.length === 1 ? "" : "s"}${at ? ", " + fmtRelative(at) : ""}`);
}

function showVerify(...nodes) {
  const box = $("verify-result");
  clear(box);
  append(box, nodes);
}

async function verifyNow() {
  if (jr.busy) return;
  jr.busy = true;
  const btn = $("verify-now");
  btn.disabled = true;
  btn.textContent = "Verifying…";
  showVerify(el("p", {}, "Verifying the journal…"));
  try {
    if (!session.loaded) await loadSession();
    let r;
    try {
      r = await postVerify();
    } catch (err) {
      if (err.status !== 403) throw err;
      await loadSession(); // the token may have changed (a restart); try once more
      r = await postVerify();
    }
    const fs = list(r.findings);
    const at = parseTime(r.at);
    if (r.ok) {
      showVerify(el("p", { class: "result result-ok" }, el("span", { class: "glyph", "aria-hidden": "true" }, "✓"),
        `The journal verifies: ${r.checked} entries checked${at ? " at " + fmtTime(at) : ""}, no findings.`));
    } else {
      showVerify(
        el("p", { class: "result result-bad" }, el("span", { class: "glyph", "aria-hidden": "true" }, "✕"),
          `The journal does not verify: ${fs.length} finding${fs.length === 1 ? "" : "s"} after checking ${r.checked} entries${at ? " at " + fmtTime(at) : ""}.`),
        el("ol", { class: "findings" }, fs.map((f) => el("li", {},
          el("strong", {}, f.index === null || f.index === undefined ? "Journal" : `Entry ${f.index}`), ": ", f.detail || "")))
      );
    }
    loadJournal().catch((err) => showError("journal", err));
  } catch (err) {
    if (err.status === 429) {
      const secs = err.retryAfter ?? 10;
      jr.retryUntil = Date.now() + secs * 1000;
      showVerify(el("p", { class: "result result-wait" },
        `The journal was verified moments ago. To keep the server responsive, verification runs at most once every few seconds; try again in ${secs} s.`));
    } else if (err.status === 403) {
      showVerify(el("p", { class: "result result-bad" }, `The server refused the request: ${err.message}. Reload the page and try again.`));
    } else {
      showVerify(el("p", { class: "result result-bad" }, `Verification could not run: ${err.message}`));
    }
  } finally {
    jr.busy = false;
    btn.textContent = "Verify now";
    const wait = jr.retryUntil - Date.now();
    if (wait > 0) {
      clearTimeout(jr.retryTimer);
      jr.retryTimer = setTimeout(() => { btn.disabled = false; }, wait);
    } else {
      btn.disabled = false;
    }
  }
}

function postVerify() {
  return api("journal/verify", { method: "POST", headers: { "X-Trustmesh-CSRF": session.csrf } });
}

function initDenials() {
  const b = $("denials-pause");
  b.addEventListener("click", () => {
    den.paused = !den.paused;
    b.setAttribute("aria-pressed", den.paused ? "true" : "false");
    b.textContent = den.paused ? "Resume updates" : "Pause updates";
    $("denials-live").textContent = den.paused ? "Updates paused." : "Updates every 2 seconds.";
    if (!den.paused) refresh("denials");
  });
}

function initJournal() {
  $("verify-now").addEventListener("click", verifyNow);
}

// ---------- routing and refresh ----------

const LOADERS = { identities: loadIdentities, ca: loadCA, access: loadAccess, denials: loadDenials, journal: loadJournal };
const inflight = {};
let current = "";
let timer = null;

function parseHash() {
  let h = location.hash.slice(1).split("?")[0];
  try {
    h = decodeURIComponent(h);
  } catch {
    h = "";
  }
  const qi = location.hash.indexOf("?");
  const params = new URLSearchParams(qi >= 0 ? location.hash.slice(qi + 1) : "");
  return { view: VIEWS.includes(h) ? h : "identities", params };
}

async function refresh(view, auto) {
  if (inflight[view]) return;
  inflight[view] = true;
  try {
    await LOADERS[view](auto);
    showError(view, null);
  } catch (err) {
    showError(view, err);
  } finally {
    inflight[view] = false;
  }
}

function route(moveFocus) {
  const { view, params } = parseHash();
  if (view === "access") {
    acc.from = params.get("from") || "";
    acc.to = params.get("to") || "";
    $("access-from").value = acc.from;
    $("access-to").value = acc.to;
    applyAccessSelection();
  }
  const changed = view !== current;
  for (const v of VIEWS) $(v).hidden = v !== view;
  for (const a of document.querySelectorAll("nav[aria-label=Views] a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${$(view + "-h").textContent} · trustmesh`;
  if (!changed) return;
  current = view;
  // The hash names the section, so the browser has scrolled to it; show
  // the page from the top (header and nav) instead, and move focus to the
  // view's heading when the user chose the view.
  window.scrollTo(0, 0);
  if (moveFocus) $(view + "-h").focus({ preventScroll: true });
  clearInterval(timer);
  refresh(view);
  timer = setInterval(() => refresh(current, true), REFRESH_MS[view]);
}

function start() {
  initIdentities();
  initCA();
  initAccess();
  initDenials();
  initJournal();
  window.addEventListener("hashchange", () => route(true));
  // A click on the link of the view already shown moves focus to it too.
  for (const a of document.querySelectorAll("nav[aria-label=Views] a")) {
    a.addEventListener("click", () => {
      if (a.getAttribute("href") === location.hash) $(a.dataset.view + "-h").focus();
    });
  }
  setInterval(tickClock, 1000);
  loadSession().catch((err) => {
    $("session-replica").textContent = "unavailable";
    for (const v of VIEWS) showError(v, err);
  });
  route(false);
}

start();
