// Palisade dashboard: a workload's page, its charts and its live tap.

import {
  $, api, clear, DASH, decisionBadge, el, errText, fmtClock, fmtDateTime, fmtLeft, fmtMs, fmtPct, fmtRps,
  fmtTick, idLink, niceMax, parseData, parseTime, policyRule, r1, shortName, SOON_MS, state, svg, svgTitle,
  TAP_CAP, thead, timeEl, truncate, withFocus
} from './core.js';
import { edgeClasses, nodeState, refusedText, totalRefused } from './graph.js';

// ---------- workload ----------
export function openWorkload(id) {
  if (id !== state.workloadId) {
    state.workloadId = id;
    state.workload = null;
    $('#h-workload').textContent = shortName(id);
    $('#wl-id').textContent = id;
    clear($('#wl-body')).appendChild(el('p', { class: 'muted', text: 'Loading\u2026' }));
    startTap(id);
  } else if (!tap.es) {
    startTap(id);
  }
  loadWorkload(true);
}
export async function loadWorkload(first) {
  const id = state.workloadId;
  if (id === null) return;
  try {
    const d = await api('api/workload?id=' + encodeURIComponent(id));
    if (state.view !== 'workload' || state.workloadId !== id) return;
    state.workload = d;
    withFocus($('#wl-body'), renderWorkload);
  } catch (e) {
    if (state.view !== 'workload' || state.workloadId !== id) return;
    if (first || !state.workload) {
      clear($('#wl-body')).appendChild(el('p', { class: 'error', text: '! ' + (e.status === 404 ? 'Unknown workload: ' : 'Cannot load this workload: ') + errText(e) }));
    }
  }
}
function renderWorkload() {
  const d = state.workload;
  const body = clear($('#wl-body'));
  const n = d.node || {};
  $('#h-workload').textContent = d.name || shortName(d.id);
  const stateCls = nodeState(n);
  body.appendChild(el('dl', { class: 'kv wide' },
    el('dt', { text: 'Identity' }), el('dd', { class: 'mono', text: d.id }),
    el('dt', { text: 'Namespace' }), el('dd', { text: d.namespace || DASH }),
    el('dt', { text: 'Certificate' }), el('dd', { class: stateCls.includes('cert-soon') ? 'warn' : '' },
      n.cert_not_after ? [timeEl(n.cert_not_after, true), ' (' + (stateCls.includes('cert-soon') ? '\u25D4 ' : '') + fmtLeft(n.cert_not_after) + ', earliest of its proxies)'] : DASH),
    el('dt', { text: 'Traffic (last window)' }), el('dd', { text: fmtRps(n.rps) + ', ' + fmtPct(n.success_rate) + ' success, p99 ' + fmtMs(n.p99_ms) + ', ' + fmtPct(n.refused_rate) + ' refused' }),
    el('dt', { text: 'Policy revision' }), el('dd', { text: n.policy_revision == null ? DASH : 'r' + n.policy_revision + ' (lowest evaluated among its proxies)' })));

  // proxies
  body.appendChild(el('h2', { id: 'h-proxies', text: 'Proxies (' + (d.proxies || []).length + ')' }));
  if (!(d.proxies || []).length) body.appendChild(el('p', { class: 'muted', text: 'No sidecar: this identity was only seen as a caller.' }));
  else {
    const tb = el('tbody');
    for (const p of d.proxies) {
      const soon = p.cert_not_after && p.cert_not_after - Date.now() < SOON_MS;
      const sync = p.sync_state || '';
      tb.appendChild(el('tr', { class: 'proxy', 'data-addr': p.addr },
        el('td', { class: 'mono', text: p.addr }),
        el('td', { class: soon ? 'warn' : '' }, timeEl(p.cert_not_after, true)),
        el('td', { class: soon ? 'warn' : '', text: (soon ? '\u25D4 ' : '') + fmtLeft(p.cert_not_after) }),
        el('td', { class: 'sync-' + sync.replace(/[^a-z_]/g, ''), text: (sync === 'synced' ? '\u2713 ' : '! ') + sync }),
        el('td', { text: (p.policy_version || '') + (p.policy_revision !== undefined && p.policy_revision !== null ? ' (revision ' + p.policy_revision + ')' : '') }),
        el('td', { class: p.last_nack ? 'error-text' : 'muted', text: p.last_nack ? '! ' + p.last_nack : 'none' }),
        el('td', {}, timeEl(p.last_seen))));
    }
    body.appendChild(el('div', { class: 'table-wrap' }, el('table', { id: 'wl-proxies', 'aria-labelledby': 'h-proxies' },
      thead(['Address', 'Certificate expires', 'Time left', 'Sync state', 'Policy revision', 'Last NACK', 'Last seen']), tb)));
  }

  // policies
  body.appendChild(el('h2', { id: 'h-wl-pol', text: 'Policies targeting it' }));
  if (!(d.policies || []).length) body.appendChild(el('p', { class: 'muted', text: 'No policy targets this workload.' }));
  else {
    const tb = el('tbody');
    const RUN = { all: '\u2713 all sidecars run it', some: '! some sidecars run it', none: '\u2715 no sidecar runs it yet' };
    for (const p of d.policies) {
      tb.appendChild(el('tr', { class: 'wl-policy', 'data-key': p.key },
        el('td', { text: p.kind }), el('td', { class: 'mono', text: p.key }), el('td', { class: 'num', text: p.revision }),
        el('td', { class: 'run-' + String(p.running).replace(/[^a-z]/g, ''), text: RUN[p.running] || String(p.running) })));
    }
    body.appendChild(el('div', { class: 'table-wrap' }, el('table', { id: 'wl-policies', 'aria-labelledby': 'h-wl-pol' },
      thead(['Kind', 'Key', 'Revision', 'Running']), tb)));
  }

  // charts
  body.appendChild(el('h2', { text: 'Last 15 minutes' }));
  const charts = el('div', { class: 'charts' });
  const series = d.series || [];
  charts.appendChild(lineChart(series, 'rps', 'Request rate', 'req/s', (v) => v, fmtTick));
  charts.appendChild(lineChart(series, 'success_rate', 'Success rate', '%', (v) => v * 100, fmtTick, [0, 100]));
  charts.appendChild(lineChart(series, 'p99_ms', 'p99 latency', 'ms', (v) => v, fmtTick));
  charts.appendChild(lineChart(series, 'refused_rate', 'Refused', '%', (v) => v * 100, fmtTick));
  body.appendChild(charts);

  // neighbours
  const nb = el('div', { class: 'two' });
  nb.appendChild(neighbourTable('Inbound: who calls it', 'wl-inbound', d.inbound || [], 'from'));
  nb.appendChild(neighbourTable('Outbound: what it calls', 'wl-outbound', d.outbound || [], 'to'));
  body.appendChild(nb);
}
function neighbourTable(title, id, edges, end) {
  const box = el('div', {});
  box.appendChild(el('h2', { id: 'h-' + id, text: title }));
  if (!edges.length) { box.appendChild(el('p', { class: 'muted', text: 'None in the last window.' })); return box; }
  const tb = el('tbody');
  for (const e of edges.slice().sort((a, b) => (b.rps || 0) - (a.rps || 0))) {
    const ref = totalRefused(e);
    tb.appendChild(el('tr', { class: edgeClasses(e).join(' '), 'data-id': e[end] },
      el('td', {}, idLink(e[end], e[end] ? shortName(e[end]) : null)),
      el('td', { class: 'num', text: fmtRps(e.rps) }), el('td', { class: 'num', text: fmtPct(e.success_rate) }),
      el('td', { class: 'num', text: fmtMs(e.p99_ms) }),
      el('td', { class: 'num' + (ref ? ' refused-cell' : ''), title: refusedText(e), text: ref ? '\u2715 ' + ref + ' req' : '0 req' }),
      el('td', { text: e.mtls ? 'yes' : '! no' })));
  }
  box.appendChild(el('div', { class: 'table-wrap' }, el('table', { id, 'aria-labelledby': 'h-' + id },
    el('thead', {}, el('tr', {}, [end === 'from' ? 'Caller' : 'Callee', 'Rate', 'Success (no 5xx)', 'p99', 'Refused', 'mTLS'].map((h, i) => el('th', { scope: 'col', class: i > 0 && i < 5 ? 'num' : null, text: h })))), tb)));
  return box;
}
function lineChart(series, metric, title, unit, conv, fmtTick, fixed) {
  const W = 320, H = 150, ml = 44, mr = 10, mt = 22, mb = 30;
  const pw = W - ml - mr, ph = H - mt - mb;
  const s = svg('svg', { class: 'chart', 'data-metric': metric, viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': title + ' in ' + unit + ' over the last 15 minutes' });
  s.appendChild(svg('text', { x: 4, y: 14, class: 'chart-title', text: title + ' (' + unit + ')' }));
  const pts = series.filter((p) => p && isFinite(p.t)).map((p) => ({ t: p.t, v: (p[metric] == null || !isFinite(p[metric])) ? null : conv(p[metric]) }));
  const vals = pts.filter((p) => p.v !== null).map((p) => p.v);
  const t1 = pts.length ? pts[pts.length - 1].t : Date.now();
  const t0 = pts.length > 1 ? pts[0].t : t1 - 15 * 60 * 1000;
  const span = Math.max(t1 - t0, 1);
  const [y0, y1] = fixed || [0, niceMax(Math.max(...vals, 0))];
  const X = (t) => ml + (t - t0) / span * pw, Y = (v) => mt + ph - (v - y0) / (y1 - y0 || 1) * ph;
  // axes and grid
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    s.appendChild(svg('line', { x1: ml, x2: ml + pw, y1: r1(Y(v)), y2: r1(Y(v)), class: 'grid' }));
    s.appendChild(svg('text', { x: ml - 4, y: r1(Y(v)), 'text-anchor': 'end', 'dominant-baseline': 'central', class: 'tick', text: fmtTick(v) }));
  }
  s.appendChild(svg('line', { x1: ml, x2: ml, y1: mt, y2: mt + ph, class: 'axis' }));
  s.appendChild(svg('line', { x1: ml, x2: ml + pw, y1: mt + ph, y2: mt + ph, class: 'axis' }));
  s.appendChild(svg('text', { x: ml, y: H - 14, class: 'tick', text: fmtClock(t0).slice(0, 5) }));
  s.appendChild(svg('text', { x: ml + pw, y: H - 14, 'text-anchor': 'end', class: 'tick', text: fmtClock(t1).slice(0, 5) }));
  s.appendChild(svg('text', { x: ml + pw / 2, y: H - 3, 'text-anchor': 'middle', class: 'axis-label', text: 'time (your zone)' }));
  s.appendChild(svg('text', { x: 10, y: mt + ph / 2, 'text-anchor': 'middle', transform: 'rotate(-90 10 ' + (mt + ph / 2) + ')', class: 'axis-label', text: unit }));
  if (!vals.length) {
    s.appendChild(svg('text', { x: ml + pw / 2, y: mt + ph / 2, 'text-anchor': 'middle', class: 'nodata', text: 'no data yet' }));
    return s;
  }
  let d = '', pen = false;
  for (const p of pts) {
    if (p.v === null) { pen = false; continue; }
    d += (pen ? ' L' : ' M') + r1(X(p.t)) + ' ' + r1(Y(Math.min(Math.max(p.v, y0), y1)));
    pen = true;
  }
  s.appendChild(svg('path', { d: d.trim(), class: 'series series-' + metric }));
  const last = pts.filter((p) => p.v !== null).pop();
  s.appendChild(svg('circle', { cx: r1(X(last.t)), cy: r1(Y(Math.min(Math.max(last.v, y0), y1))), r: 3, class: 'series-dot series-' + metric },
    svgTitle(fmtDateTime(last.t) + ': ' + fmtTick(last.v) + ' ' + unit)));
  return s;
}

// ---------- tap ----------
const tap = { es: null, paused: false, buffered: [], missed: 0, dropped: 0, id: null };
function startTap(id) {
  stopTap();
  tap.id = id; tap.paused = false; tap.buffered = []; tap.missed = 0; tap.dropped = 0;
  clear($('#tap tbody'));
  const btn = $('#tap-pause');
  btn.textContent = 'Pause'; btn.setAttribute('aria-pressed', 'false');
  tap.es = new EventSource('api/tap?to=' + encodeURIComponent(id));
  tap.es.addEventListener('tap', (ev) => {
    const d = parseData(ev); if (!d) return;
    if (tap.paused) {
      tap.buffered.push(d);
      if (tap.buffered.length > TAP_CAP) { tap.buffered.shift(); tap.missed++; }
      tapState();
      return;
    }
    addTapRow(d);
  });
  tap.es.addEventListener('dropped', (ev) => {
    const d = parseData(ev); if (!d) return;
    tap.dropped += Number(d.dropped) || 0;
    tapState();
  });
  tap.es.onopen = () => tapState();
  tap.es.onerror = () => tapState();
  tapState();
}
export function stopTap() {
  if (tap.es) { tap.es.close(); tap.es = null; }
}
function tapState() {
  const parts = [];
  if (tap.es) parts.push(tap.es.readyState === 1 ? 'streaming' : tap.es.readyState === 0 ? 'connecting\u2026' : 'closed');
  if (tap.paused) parts.push('paused: ' + (tap.buffered.length + tap.missed) + ' new while paused');
  if (tap.dropped) parts.push(tap.dropped + ' events dropped by the server (too fast)');
  const rows = $('#tap tbody').rows.length;
  parts.push(rows + ' row' + (rows === 1 ? '' : 's') + (rows >= TAP_CAP ? ' (newest ' + TAP_CAP + ' kept)' : ''));
  $('#tap-state').textContent = parts.join(' \u00b7 ');
}
function addTapRow(d) {
  const tb = $('#tap tbody');
  const row = tapRow(d, true);
  tb.insertBefore(row, tb.firstChild);
  while (tb.rows.length > TAP_CAP) tb.deleteRow(tb.rows.length - 1);
  applyTapFilter(row);
  tapState();
}
export function tapRow(d, withCaller) {
  const t = parseTime(d.time);
  const st = d.status;
  const cls = ['tap-row', 'dec-' + String(d.decision || 'none').replace(/[^a-z_]/g, '')];
  const stCls = st >= 500 ? 'st-5xx' : st >= 400 ? 'st-4xx' : '';
  return el('tr', { class: cls.join(' '), 'data-decision': d.decision || '' },
    el('td', {}, t === null ? String(d.time || '') : timeEl(t)),
    el('td', { class: 'mono', text: d.method || '' }),
    el('td', { class: 'mono path', title: d.path || '', text: truncate(d.path || '', 120) }),
    el('td', { class: 'num ' + stCls, text: (st >= 500 ? '! ' : '') + (st == null ? DASH : st) + (d.grpc_status ? ' (grpc ' + d.grpc_status + ')' : '') }),
    el('td', { class: 'num', text: fmtMs(d.duration_ms) }),
    el('td', {}, decisionBadge(d.decision), d.attempt ? ' (try ' + d.attempt + ')' : ''),
    el('td', { class: 'mono', text: d.decision === 'allow' && !d.policy ? DASH : policyRule(d.policy, d.rule) }),
    withCaller ? el('td', {}, idLink(d.caller === undefined ? '' : d.caller)) : null,
    el('td', { class: 'mono', text: d.principal || DASH }));
}
function applyTapFilter(only) {
  const q = $('#tap-filter').value.trim().toLowerCase();
  const rows = only ? [only] : Array.from($('#tap tbody').rows);
  for (const r of rows) r.hidden = q !== '' && !r.textContent.toLowerCase().includes(q);
}
export function setupTap() {
  $('#tap-filter').addEventListener('input', () => applyTapFilter(null));
  $('#tap-pause').addEventListener('click', () => {
    const b = $('#tap-pause');
    tap.paused = !tap.paused;
    b.setAttribute('aria-pressed', tap.paused ? 'true' : 'false');
    b.textContent = tap.paused ? 'Resume' : 'Pause';
    if (!tap.paused) {
      const pend = tap.buffered; tap.buffered = []; tap.missed = 0;
      for (const d of pend) addTapRow(d);
    }
    tapState();
  });
  $('#tap-clear').addEventListener('click', () => { clear($('#tap tbody')); tapState(); });
}
