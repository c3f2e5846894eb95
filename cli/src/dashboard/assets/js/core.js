// Palisade dashboard: shared DOM helpers, formatting, the API, the
// connection banner and the page state. Vanilla ES2020 modules, no build
// step, no third-party code.
// Every value from the API may come from traffic (paths, identities, policy
// names, YAML): it only ever reaches the page through textContent and
// setAttribute, never as markup.

const SVGNS = 'http://www.w3.org/2000/svg';
export const DASH = '\u2013';
export const REASONS = ['deny', 'unauthenticated', 'invalid', 'rate_limited'];
const REASON_LABEL = { deny: 'forbidden', unauthenticated: 'unauthenticated', invalid: 'invalid', rate_limited: 'rate limited' };
export const DECISION_MARK = { allow: '\u2713', deny: '\u2715', unauthenticated: '?', invalid: '!', rate_limited: '\u226B', unavailable: '!', error: '!' };
export const TAP_CAP = 500;
export const EDGE_ROWS = 200;
export const SOON_MS = 10 * 60 * 1000;

export const $ = (sel, root) => (root || document).querySelector(sel);

// ---------- DOM helpers (no markup strings anywhere) ----------
export function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  append(e, kids);
  return e;
}
export function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  setAttrs(e, attrs);
  append(e, kids);
  return e;
}
function setAttrs(e, attrs) {
  if (!attrs) return;
  for (const k of Object.keys(attrs)) {
    const v = attrs[k];
    if (v == null || v === false) continue;
    if (k === 'text') e.textContent = String(v);
    else if (k === 'class') e.setAttribute('class', v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
}
export function append(e, kids) {
  for (const k of kids) {
    if (k == null || k === false) continue;
    if (Array.isArray(k)) append(e, k);
    else if (k instanceof Node) e.appendChild(k);
    else e.appendChild(document.createTextNode(String(k)));
  }
}
export const thead = (hs) => el('thead', {}, el('tr', {}, hs.map((h) => el('th', { scope: 'col', text: h }))));
export function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); return e; }
export function svgTitle(text) { return svg('title', { text }); }

export const r1 = (v) => Math.round(v * 10) / 10;
export function cssEsc(s) { return (window.CSS && CSS.escape) ? CSS.escape(s || '') : String(s || '').replace(/["\\]/g, '\\$&'); }

// ---------- formatting ----------
const fmtNum = (v, d) => (v == null || !isFinite(v)) ? DASH : Number(v).toFixed(d);
export const fmtRps = (v) => (v == null || !isFinite(v)) ? DASH : fmtNum(v, v >= 100 ? 0 : v >= 10 ? 1 : 2) + ' req/s';
export const fmtPct = (f) => (f == null || !isFinite(f)) ? DASH : fmtNum(f * 100, f >= 0.9995 || f === 0 ? 0 : 1) + ' %';
export const fmtMs = (v) => (v == null || !isFinite(v)) ? DASH : fmtNum(v, v >= 100 ? 0 : 1) + ' ms';
function fmtDur(ms) {
  let s = Math.round(Math.abs(ms) / 1000);
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (d > 0) return d + ' d ' + h + ' h';
  if (h > 0) return h + ' h ' + m + ' m';
  if (m > 0) return m + ' m ' + s + ' s';
  return s + ' s';
}
export function fmtLeft(notAfter) {
  if (notAfter == null) return DASH;
  const left = notAfter - Date.now();
  return left >= 0 ? fmtDur(left) + ' left' : 'expired ' + fmtDur(left) + ' ago';
}
const two = (n) => String(n).padStart(2, '0');
export function fmtClock(ms) {
  const d = new Date(ms);
  return two(d.getHours()) + ':' + two(d.getMinutes()) + ':' + two(d.getSeconds());
}
export function fmtDateTime(ms) {
  const d = new Date(ms);
  return d.getFullYear() + '-' + two(d.getMonth() + 1) + '-' + two(d.getDate()) + ' ' + fmtClock(ms);
}
export function isoUTC(ms) { try { return new Date(ms).toISOString(); } catch (_) { return ''; } }
// A <time> in the browser's zone, with UTC on hover.
export function timeEl(ms, full) {
  if (ms == null || !isFinite(ms)) return el('span', { class: 'muted', text: DASH });
  const iso = isoUTC(ms);
  return el('time', { datetime: iso, title: iso, text: full ? fmtDateTime(ms) : fmtClock(ms) });
}
export function parseTime(t) {
  if (typeof t === 'number') return t;
  const v = Date.parse(t);
  return isNaN(v) ? null : v;
}
export function shortName(id) {
  if (id === '') return 'plaintext (no mTLS)';
  if (!id) return DASH;
  const m = /\/sa\/([^/]+)$/.exec(id);
  return m ? m[1] : id;
}
export function truncate(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + '\u2026' : s; }
export const wlHref = (id) => '#/workload/' + encodeURIComponent(id);
export function idLink(id, label) {
  if (id === '' || id == null) return el('span', { class: 'plain-caller', text: 'plaintext (no mTLS)' });
  return el('a', { href: wlHref(id), title: id, text: label || shortName(id) });
}
export function reasonLabel(r) { return REASON_LABEL[r] || String(r); }
export function decisionBadge(d) {
  const dec = d || 'none';
  const label = dec === 'deny' ? 'forbidden' : dec === 'rate_limited' ? 'rate limited' : dec;
  return el('span', { class: 'badge dec-' + dec.replace(/[^a-z_]/g, ''), 'data-decision': dec, text: (DECISION_MARK[dec] || '\u2022') + ' ' + label });
}
export function policyRule(p, r) {
  if (!p) return '(no deciding policy)';
  return (r === '' || r == null) ? String(p) : p + ' rule ' + r;
}
export function errText(e) { return e && e.message ? e.message : String(e); }

export function fmtTick(v) { return Number.isInteger(v) ? String(v) : Math.abs(v) >= 10 ? v.toFixed(0) : Math.abs(v) >= 0.1 ? v.toFixed(1) : String(Number(v.toPrecision(2))); }
export function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// Live refreshes rebuild parts of the page: keep the keyboard focus on the
// same thing (same link, row or node) across the rebuild.
const FOCUS_ATTRS = ['href', 'data-id', 'data-kind', 'data-key', 'data-reason', 'data-policy', 'data-rule', 'data-to', 'data-from'];
export function withFocus(container, fn) {
  const a = document.activeElement;
  let sel = null;
  if (a && a !== container && container.contains(a)) {
    sel = a.id ? '#' + cssEsc(a.id) : a.localName + FOCUS_ATTRS.filter((n) => a.hasAttribute(n)).map((n) => '[' + n + '="' + cssEsc(a.getAttribute(n)) + '"]').join('');
  }
  fn();
  if (sel) {
    let f = null;
    try { f = container.querySelector(sel); } catch (_) { f = null; }
    if (f && f !== document.activeElement) f.focus({ preventScroll: true });
  }
}

// ---------- API ----------
export async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: 'same-origin', cache: 'no-store' }, opts || {}));
  let body = null;
  const ct = r.headers.get('content-type') || '';
  if (ct.includes('json')) { try { body = await r.json(); } catch (_) { body = null; } } else { body = { error: (await r.text()).slice(0, 500) }; }
  if (!r.ok) {
    const e = new Error((body && body.error) || ('HTTP ' + r.status));
    e.status = r.status; e.body = body;
    throw e;
  }
  return body;
}

// ---------- connection state ----------
export const conn = { es: false, esEverOpen: false, cp: true, cpError: null, cpSince: null };
export function renderConn() {
  const status = $('#conn-status');
  const banner = $('#conn-banner');
  const lines = [];
  if (!conn.cp) {
    let msg = conn.cpError ? String(conn.cpError) : '';
    msg = msg.replace(/^control plane unreachable:?\s*/i, '');
    lines.push('! control plane unreachable' + (conn.cpSince ? ' since ' + fmtClock(conn.cpSince) : '') + (msg ? ': ' + msg : '') + ' \u2014 the data shown may be stale.');
  }
  if (!conn.es && conn.esEverOpen) lines.push('! dashboard connection lost \u2014 is palisadectl dashboard still running? Reconnecting\u2026');
  if (lines.length) {
    clear(banner);
    for (const l of lines) banner.appendChild(el('div', { text: l }));
    banner.className = 'lost';
    banner.hidden = false;
  } else {
    clear(banner);
    banner.className = '';
    banner.hidden = true;
  }
  let cls, text;
  if (conn.es && conn.cp) { cls = 'live'; text = 'live'; }
  else if (!conn.esEverOpen && conn.cp) { cls = 'connecting'; text = 'connecting'; }
  else if (!conn.es) { cls = 'lost'; text = 'offline'; }
  else { cls = 'lost'; text = 'control plane unreachable'; }
  status.className = 'conn-status ' + cls;
  status.textContent = text;
}
export function setControlPlane(connected, error, at) {
  const was = conn.cp;
  conn.cp = !!connected;
  conn.cpError = error || null;
  if (!conn.cp && (was || !conn.cpSince)) conn.cpSince = at || Date.now();
  if (conn.cp) conn.cpSince = null;
  renderConn();
}
export function parseData(ev) { try { return JSON.parse(ev.data); } catch (_) { return null; } }

// ---------- state ----------
export const state = {
  view: null, overview: null, workloadId: null, workload: null,
  decisions: null, selectedRule: null, policies: null, selectedPolicy: null, certs: null,
};
