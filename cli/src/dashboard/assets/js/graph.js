// Palisade dashboard: the overview and the mesh graph (layout, zoom and pan,
// search, the call panel and the table of calls).

import {
  $, api, append, clear, conn, cssEsc, DASH, EDGE_ROWS, el, fmtLeft, fmtMs, fmtPct, fmtRps, idLink, r1,
  reasonLabel, REASONS, setControlPlane, shortName, SOON_MS, state, svg, svgTitle, timeEl, truncate,
  withFocus, wlHref
} from './core.js';

// ---------- overview / graph ----------
export async function loadOverview() {
  try {
    const d = await api('api/overview');
    onOverview(d);
  } catch (e) {
    if (e.status === 401) showFatal('Not signed in: open the URL palisadectl dashboard printed (with its token).');
  }
}
function showFatal(msg) {
  const b = $('#conn-banner');
  clear(b); b.appendChild(el('div', { text: '! ' + msg })); b.className = 'lost'; b.hidden = false;
}
export function onOverview(d) {
  state.overview = d;
  if ('connected' in d) setControlPlane(d.connected, d.error, conn.cpSince || d.updated);
  const meta = $('#mesh-meta');
  clear(meta);
  append(meta, [
    el('span', { text: (d.trust_domain || '') }),
    el('span', { text: 'policy revision ' + (d.revision === undefined ? DASH : d.revision) }),
    d.updated ? el('span', {}, 'updated ', timeEl(d.updated)) : null,
  ]);
  const foot = $('#foot');
  clear(foot);
  foot.appendChild(el('span', { text: 'Palisade ' + (d.version || '') + ' \u00b7 traffic over the last ' + (d.window_seconds || 60) + ' s \u00b7 times in your zone (hover: UTC)' }));
  if (state.view === 'graph') withFocus($('#view-graph'), renderGraph);
}

const G = { layout: null, sig: '', vb: null, touched: false, selectedEdge: null, nodesById: new Map() };
const CELL_W = 236, CELL_H = 72, NODE_W = 150, NODE_H = 28, PAD = 14, HEAD = 26, GAP = 36;

export function nodeState(n) {
  const out = [];
  if (n.cert_not_after !== null && n.cert_not_after !== undefined && n.cert_not_after - Date.now() < SOON_MS) out.push('cert-soon');
  if ((n.pending || 0) + (n.nacked || 0) + (n.disconnected || 0) > 0) out.push('unsynced');
  if ((n.proxies || 0) === 0) out.push('caller-only');
  return out;
}

function computeLayout(nodes, hasPlain) {
  const groups = new Map();
  for (const n of nodes) {
    const ns = n.namespace || '(no namespace)';
    if (!groups.has(ns)) groups.set(ns, []);
    groups.get(ns).push(n);
  }
  const list = [];
  if (hasPlain) list.push({ ns: 'outside the mesh', special: true, nodes: [{ id: '', name: 'plaintext (no mTLS)', namespace: '', plain: true }] });
  for (const ns of [...groups.keys()].sort()) {
    const ns_nodes = groups.get(ns).slice().sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id) || a.id.localeCompare(b.id));
    list.push({ ns, nodes: ns_nodes });
  }
  let area = 0;
  for (const g of list) {
    const n = g.nodes.length;
    g.cols = Math.max(1, Math.min(n, Math.ceil(Math.sqrt(n * 1.8))));
    g.rows = Math.ceil(n / g.cols);
    g.w = g.cols * CELL_W + 2 * PAD - (CELL_W - NODE_W);
    g.h = HEAD + g.rows * CELL_H + PAD - (CELL_H - NODE_H);
    area += (g.w + GAP) * (g.h + GAP);
  }
  const maxW = list.reduce((m, g) => Math.max(m, g.w), 0);
  const rowW = Math.max(maxW, Math.sqrt(area) * 1.5, 3 * CELL_W);
  // shelf packing, in name order: deterministic for the same namespaces
  let x = 0, y = 0, shelf = 0, width = 0;
  const pos = new Map();
  for (const g of list) {
    if (x > 0 && x + g.w > rowW) { x = 0; y += shelf + GAP; shelf = 0; }
    g.x = x; g.y = y;
    x += g.w + GAP; shelf = Math.max(shelf, g.h); width = Math.max(width, g.x + g.w);
    g.nodes.forEach((n, i) => {
      const c = i % g.cols, r = Math.floor(i / g.cols);
      pos.set(n.id, { x: g.x + PAD + c * CELL_W, y: g.y + HEAD + r * CELL_H, w: NODE_W, h: NODE_H, node: n });
    });
  }
  return { groups: list, pos, width: Math.max(width, 1), height: Math.max(y + shelf, 1) };
}

function clipToRect(cx, cy, dx, dy, hw, hh) {
  const ax = Math.abs(dx), ay = Math.abs(dy);
  if (ax < 1e-9 && ay < 1e-9) return [cx, cy];
  const t = Math.min(ax > 1e-9 ? hw / ax : Infinity, ay > 1e-9 ? hh / ay : Infinity);
  return [cx + dx * t, cy + dy * t];
}

export function edgeClasses(e) {
  const cls = ['edge'];
  const refused = totalRefused(e);
  if (refused > 0) cls.push('refused');
  if (e.mtls) cls.push('mtls'); else cls.push('plain');
  if (e.success_rate !== null && e.success_rate !== undefined && e.success_rate < 0.95 && (e.requests || 0) > 0) cls.push('errors');
  return cls;
}
export function totalRefused(e) {
  const r = e.refused || {};
  let t = 0;
  for (const k of Object.keys(r)) t += Number(r[k]) || 0;
  return t;
}
export function refusedText(e) {
  const r = e.refused || {};
  const parts = REASONS.filter((k) => (r[k] || 0) > 0).map((k) => r[k] + ' ' + reasonLabel(k));
  for (const k of Object.keys(r)) if (!REASONS.includes(k) && r[k] > 0) parts.push(r[k] + ' ' + k);
  return parts.length ? parts.join(', ') : 'none';
}
function edgeSummary(e) {
  return shortName(e.from) + ' \u2192 ' + shortName(e.to) + ': ' + fmtRps(e.rps) + ', ' + fmtPct(e.success_rate) + ' success, p99 ' + fmtMs(e.p99_ms) +
    ', refused: ' + refusedText(e) + ', mTLS ' + (e.mtls ? 'yes' : 'no');
}

export function renderGraph() {
  const d = state.overview;
  const svgEl = $('#graph');
  const nodes = (d && d.nodes) || [];
  const edges = (d && d.edges) || [];
  const hasPlain = edges.some((e) => e.from === '');
  $('#graph-empty').hidden = nodes.length > 0 || hasPlain;
  const nsCount = new Set(nodes.map((n) => n.namespace || '')).size;
  $('#graph-summary').textContent = nodes.length + ' workload' + (nodes.length === 1 ? '' : 's') + ' in ' + nsCount + ' namespace' + (nsCount === 1 ? '' : 's') + ', ' + edges.length + ' call path' + (edges.length === 1 ? '' : 's');
  const sig = (hasPlain ? 'p|' : '') + nodes.map((n) => (n.namespace || '') + '\u0000' + n.id).sort().join('\u0001');
  if (sig !== G.sig || !G.layout) {
    G.layout = computeLayout(nodes, hasPlain);
    if (G.sig === '' || !G.touched) G.vb = null;
    G.sig = sig;
  }
  const L = G.layout;
  // remember focus across the redraw
  const active = document.activeElement;
  let refocus = null;
  if (active && svgEl.contains(active)) {
    refocus = active.classList.contains('node') ? '.node[data-id="' + cssEsc(active.getAttribute('data-id')) + '"]'
      : '.edge[data-from="' + cssEsc(active.getAttribute('data-from')) + '"][data-to="' + cssEsc(active.getAttribute('data-to')) + '"]';
  }
  clear(svgEl);
  svgEl.appendChild(svgDefs());
  const gGroups = svg('g', { class: 'groups' });
  for (const g of L.groups) {
    gGroups.appendChild(svg('g', { class: 'ns' + (g.special ? ' special' : ''), 'data-namespace': g.ns },
      svg('rect', { x: g.x, y: g.y, width: g.w, height: g.h, rx: 6 }),
      svg('text', { x: g.x + 8, y: g.y + 16, class: 'ns-label', text: truncate(g.ns, Math.max(8, Math.floor(g.w / 7.5))) }),
      svgTitle('namespace ' + g.ns + ' (' + g.nodes.length + ' workload' + (g.nodes.length === 1 ? '' : 's') + ')')));
  }
  svgEl.appendChild(gGroups);
  const gEdges = svg('g', { class: 'edges' });
  const pairs = new Set(edges.map((e) => e.from + '\u0000' + e.to));
  for (const e of edges) {
    const a = L.pos.get(e.from), b = L.pos.get(e.to);
    if (!a || !b) continue;
    const cls = edgeClasses(e);
    const g = svg('g', { class: cls.join(' '), 'data-from': e.from, 'data-to': e.to, tabindex: 0, role: 'button', 'aria-label': 'call ' + edgeSummary(e) });
    const marker = cls.includes('refused') ? 'url(#arrow-refused)' : cls.includes('errors') ? 'url(#arrow-err)' : 'url(#arrow)';
    let geom;
    if (e.from === e.to) {
      const x = a.x + a.w, y = a.y + 4;
      geom = 'M' + (x - 20) + ' ' + a.y + ' C ' + (x - 10) + ' ' + (y - 26) + ', ' + (x + 18) + ' ' + (y - 10) + ', ' + x + ' ' + (y + 8);
      g.appendChild(svg('path', { d: geom, class: 'hit' }));
      g.appendChild(svg('path', { d: geom, class: 'line', 'marker-end': marker }));
    } else {
      let ax = a.x + a.w / 2, ay = a.y + a.h / 2, bx = b.x + b.w / 2, by = b.y + b.h / 2;
      const dx = bx - ax, dy = by - ay, len = Math.hypot(dx, dy) || 1;
      if (pairs.has(e.to + '\u0000' + e.from)) { // two directions: keep them apart
        const ox = -dy / len * 5, oy = dx / len * 5;
        ax += ox; ay += oy; bx += ox; by += oy;
      }
      const [sx, sy] = clipToRect(ax, ay, dx, dy, a.w / 2 + 1, a.h / 2 + 1);
      const [tx, ty] = clipToRect(bx, by, -dx, -dy, b.w / 2 + 3, b.h / 2 + 3);
      geom = 'M' + r1(sx) + ' ' + r1(sy) + ' L' + r1(tx) + ' ' + r1(ty);
      g.appendChild(svg('path', { d: geom, class: 'hit' }));
      g.appendChild(svg('path', { d: geom, class: 'line', 'marker-end': marker }));
      if (cls.includes('refused') || cls.includes('errors')) {
        const mx = (sx + tx) / 2, my = (sy + ty) / 2;
        g.appendChild(svg('circle', { cx: r1(mx), cy: r1(my), r: 7, class: 'mark' }));
        g.appendChild(svg('text', { x: r1(mx), y: r1(my), class: 'mark-text', 'text-anchor': 'middle', 'dominant-baseline': 'central', text: cls.includes('refused') ? '\u2715' : '!' }));
      }
    }
    g.appendChild(svgTitle(edgeSummary(e)));
    if (G.selectedEdge && G.selectedEdge.from === e.from && G.selectedEdge.to === e.to) g.classList.add('selected');
    gEdges.appendChild(g);
  }
  svgEl.appendChild(gEdges);
  const gNodes = svg('g', { class: 'nodes' });
  G.nodesById = new Map();
  const byId = new Map(nodes.map((x) => [x.id, x]));
  for (const [id, p] of L.pos) {
    const n = (p.node.plain ? p.node : byId.get(id)) || p.node;
    const cls = ['node'].concat(n.plain ? ['plaintext'] : nodeState(n));
    const label = n.plain ? 'plaintext (no mTLS)' : (n.name || shortName(n.id));
    const tip = n.plain ? 'Callers without a mesh identity (plaintext, not mTLS)' : nodeTip(n);
    const g = svg('g', { class: cls.join(' '), 'data-id': id, tabindex: 0, role: n.plain ? 'img' : 'link', 'aria-label': tip });
    g.appendChild(svg('rect', { x: p.x, y: p.y, width: p.w, height: p.h, rx: 5 }));
    let badge = '';
    if (cls.includes('unsynced')) badge += '!';
    if (cls.includes('cert-soon')) badge += '\u25D4';
    const maxChars = badge ? 17 : 20;
    g.appendChild(svg('text', { x: p.x + 8, y: p.y + p.h / 2, 'dominant-baseline': 'central', class: 'label', text: truncate(label, maxChars) }));
    if (badge) g.appendChild(svg('text', { x: p.x + p.w - 6, y: p.y + p.h / 2, 'dominant-baseline': 'central', 'text-anchor': 'end', class: 'badge-text', text: badge }));
    g.appendChild(svgTitle(tip));
    gNodes.appendChild(g);
    G.nodesById.set(id, g);
  }
  svgEl.appendChild(gNodes);
  // namespace names on top, shown only when zoomed far out (CSS .far)
  const gFar = svg('g', { class: 'ns-far', 'aria-hidden': 'true' });
  for (const g of L.groups) gFar.appendChild(svg('text', { x: g.x + g.w / 2, y: g.y + g.h / 2, class: 'ns-label-far', 'text-anchor': 'middle', 'dominant-baseline': 'middle', text: g.ns }));
  svgEl.appendChild(gFar);
  if (!G.vb) fitView(); else applyView();
  applySearch(false);
  renderEdgeTable(edges);
  if (G.selectedEdge) {
    const cur = edges.find((e) => e.from === G.selectedEdge.from && e.to === G.selectedEdge.to);
    if (cur) showEdgePanel(cur);
  }
  if (refocus) { const f = svgEl.querySelector(refocus); if (f) f.focus({ preventScroll: true }); }
}
function nodeTip(n) {
  const parts = [n.id, (n.proxies || 0) + ' prox' + ((n.proxies || 0) === 1 ? 'y' : 'ies') + ' (' + (n.synced || 0) + ' synced, ' + (n.pending || 0) + ' pending, ' + (n.nacked || 0) + ' rejected, ' + (n.disconnected || 0) + ' disconnected)'];
  if (n.cert_not_after) parts.push('certificate: ' + fmtLeft(n.cert_not_after));
  parts.push(fmtRps(n.rps) + ', ' + fmtPct(n.success_rate) + ' success, p99 ' + fmtMs(n.p99_ms));
  if (n.policy_revision !== undefined && n.policy_revision !== null) parts.push('policy revision ' + n.policy_revision);
  return parts.join('; ');
}
function svgDefs() {
  const mk = (id, cls) => svg('marker', { id, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 11, markerHeight: 11, orient: 'auto-start-reverse', markerUnits: 'userSpaceOnUse' },
    svg('path', { d: 'M0 0 L10 5 L0 10 z', class: cls }));
  return svg('defs', {}, mk('arrow', 'arrow-ok'), mk('arrow-refused', 'arrow-refused'), mk('arrow-err', 'arrow-err'));
}

// viewBox zoom and pan
function fitView() {
  const L = G.layout;
  const m = 20;
  G.vb = { x: -m, y: -m, w: L.width + 2 * m, h: L.height + 2 * m };
  const wrap = $('#graph-wrap');
  const ar = (wrap.clientWidth || 900) / (wrap.clientHeight || 560);
  if (G.vb.w / G.vb.h < ar) { const nw = G.vb.h * ar; G.vb.x -= (nw - G.vb.w) / 2; G.vb.w = nw; }
  else { const nh = G.vb.w / ar; G.vb.y -= (nh - G.vb.h) / 2; G.vb.h = nh; }
  // a small mesh is not blown up: at most 1 unit a pixel (+ 20 %)
  const minW = (wrap.clientWidth || 900) / 1.2;
  if (G.vb.w < minW) { const f = minW / G.vb.w; G.vb.x -= G.vb.w * (f - 1) / 2; G.vb.y -= G.vb.h * (f - 1) / 2; G.vb.w *= f; G.vb.h *= f; }
  applyView();
}
function applyView() {
  const v = G.vb, s = $('#graph');
  s.setAttribute('viewBox', r1(v.x) + ' ' + r1(v.y) + ' ' + r1(v.w) + ' ' + r1(v.h));
  const scale = (s.clientWidth || 900) / v.w;
  s.classList.toggle('far', scale < 0.45);
  s.classList.toggle('very-far', scale < 0.2);
}
function zoom(factor, cx, cy) {
  if (!G.vb) return;
  const v = G.vb;
  const nw = Math.min(Math.max(v.w * factor, 100), Math.max(G.layout.width, G.layout.height) * 4 + 400);
  const f = nw / v.w;
  if (cx === undefined) { cx = v.x + v.w / 2; cy = v.y + v.h / 2; }
  v.x = cx - (cx - v.x) * f; v.y = cy - (cy - v.y) * f; v.w *= f; v.h *= f;
  G.touched = true;
  applyView();
}
function clientToSvg(evt) {
  const s = $('#graph'), r = s.getBoundingClientRect(), v = G.vb;
  // preserveAspectRatio xMidYMid meet
  const scale = Math.min(r.width / v.w, r.height / v.h);
  const ox = (r.width - v.w * scale) / 2, oy = (r.height - v.h * scale) / 2;
  return [v.x + (evt.clientX - r.left - ox) / scale, v.y + (evt.clientY - r.top - oy) / scale];
}
function centerOn(id, zoomIn) {
  const p = G.layout && G.layout.pos.get(id);
  if (!p || !G.vb) return;
  const v = G.vb;
  if (zoomIn && v.w > 900) { const f = 900 / v.w; v.w *= f; v.h *= f; }
  v.x = p.x + p.w / 2 - v.w / 2; v.y = p.y + p.h / 2 - v.h / 2;
  G.touched = true;
  applyView();
}
export function setupGraphControls() {
  $('#zoom-in').addEventListener('click', () => zoom(1 / 1.4));
  $('#zoom-out').addEventListener('click', () => zoom(1.4));
  $('#zoom-fit').addEventListener('click', () => { G.touched = false; if (G.layout) fitView(); });
  const s = $('#graph');
  s.addEventListener('wheel', (evt) => {
    if (!G.vb) return;
    evt.preventDefault();
    const [cx, cy] = clientToSvg(evt);
    zoom(Math.exp(Math.max(-1, Math.min(1, evt.deltaY / 300))), cx, cy);
  }, { passive: false });
  let drag = null;
  s.addEventListener('pointerdown', (evt) => {
    if (evt.button !== 0 || !G.vb || evt.target.closest('.node, .edge')) return;
    drag = { x: evt.clientX, y: evt.clientY, vx: G.vb.x, vy: G.vb.y, moved: false };
    s.setPointerCapture(evt.pointerId);
  });
  s.addEventListener('pointermove', (evt) => {
    if (!drag) return;
    const r = s.getBoundingClientRect();
    const scale = Math.min(r.width / G.vb.w, r.height / G.vb.h);
    const dx = (evt.clientX - drag.x) / scale, dy = (evt.clientY - drag.y) / scale;
    if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
    G.vb.x = drag.vx - dx; G.vb.y = drag.vy - dy; G.touched = true;
    applyView();
  });
  const end = (evt) => { if (drag) { try { s.releasePointerCapture(evt.pointerId); } catch (_) { /* released */ } drag = null; } };
  s.addEventListener('pointerup', end);
  s.addEventListener('pointercancel', end);
  const activate = (target) => {
    const node = target.closest('.node');
    if (node) {
      const id = node.getAttribute('data-id');
      if (id) location.hash = wlHref(id); // the plaintext node has no page
      return true;
    }
    const edge = target.closest('.edge');
    if (edge) {
      const from = edge.getAttribute('data-from'), to = edge.getAttribute('data-to');
      const e = ((state.overview && state.overview.edges) || []).find((x) => x.from === from && x.to === to);
      if (e) {
        G.selectedEdge = { from, to };
        for (const x of s.querySelectorAll('.edge.selected')) x.classList.remove('selected');
        edge.classList.add('selected');
        showEdgePanel(e);
      }
      return true;
    }
    return false;
  };
  s.addEventListener('click', (evt) => { activate(evt.target); });
  s.addEventListener('keydown', (evt) => {
    if (evt.key === 'Enter' || evt.key === ' ') { if (activate(evt.target)) evt.preventDefault(); }
    else if (evt.key === '+' || evt.key === '=') { zoom(1 / 1.4); evt.preventDefault(); }
    else if (evt.key === '-') { zoom(1.4); evt.preventDefault(); }
  });
  window.addEventListener('resize', () => { if (state.view === 'graph' && G.layout && !G.touched) fitView(); });
  const search = $('#graph-search');
  search.addEventListener('input', () => applySearch(true));
  search.addEventListener('change', () => applySearch(false));
  search.addEventListener('keydown', (evt) => {
    if (evt.key === 'Enter') { const first = $('#graph-matches button'); if (first) { first.click(); evt.preventDefault(); } }
  });
}
function applySearch(userTyped) {
  const q = $('#graph-search').value.trim().toLowerCase();
  const s = $('#graph');
  const list = $('#graph-matches');
  clear(list);
  for (const x of s.querySelectorAll('.node.match')) x.classList.remove('match');
  if (!q) {
    s.classList.remove('searching');
    list.hidden = true;
    $('#graph-match-count').textContent = '';
    return;
  }
  const nodes = ((state.overview && state.overview.nodes) || []).filter((n) =>
    (n.id || '').toLowerCase().includes(q) || (n.name || '').toLowerCase().includes(q) || (n.namespace || '').toLowerCase().includes(q));
  s.classList.add('searching');
  for (const n of nodes) { const g = G.nodesById.get(n.id); if (g) g.classList.add('match'); }
  $('#graph-match-count').textContent = nodes.length + ' match' + (nodes.length === 1 ? '' : 'es');
  const shown = nodes.slice(0, 50);
  for (const n of shown) {
    const b = el('button', { type: 'button', class: 'match-item', 'data-id': n.id, title: n.id },
      el('span', { class: 'mname', text: n.name || shortName(n.id) }), ' ', el('span', { class: 'muted', text: n.namespace || '' }));
    b.addEventListener('click', () => {
      centerOn(n.id, true);
      const g = G.nodesById.get(n.id);
      if (g) g.focus({ preventScroll: true });
    });
    list.appendChild(el('li', {}, b));
  }
  if (nodes.length > shown.length) list.appendChild(el('li', { class: 'muted', text: '\u2026 and ' + (nodes.length - shown.length) + ' more: refine the search' }));
  list.hidden = false;
  if (userTyped && nodes.length === 1) centerOn(nodes[0].id, true);
}
function showEdgePanel(e) {
  const p = $('#graph-panel');
  clear(p);
  const r = e.refused || {};
  const refusedRows = REASONS.map((k) => el('tr', {}, el('th', { scope: 'row', text: reasonLabel(k) }), el('td', { class: 'num', text: (r[k] || 0) + ' req' })));
  append(p, [
    el('h2', { text: 'Call' }),
    el('p', { class: 'edge-ends' }, idLink(e.from), ' \u2192 ', idLink(e.to)),
    el('dl', { class: 'kv' },
      el('dt', { text: 'Rate' }), el('dd', { text: fmtRps(e.rps) + ' (' + (e.requests || 0) + ' req)' }),
      el('dt', { text: 'Success (no 5xx)' }), el('dd', { text: fmtPct(e.success_rate) }),
      el('dt', { text: 'p99 latency' }), el('dd', { text: fmtMs(e.p99_ms) }),
      el('dt', { text: 'mTLS' }), el('dd', { class: e.mtls ? 'yes' : 'no', text: e.mtls ? '\u2713 yes' : '! no (plaintext)' })),
    el('h3', { text: 'Refused (' + totalRefused(e) + ')' }),
    el('table', { class: 'compact' }, el('tbody', {}, refusedRows)),
  ]);
  if (totalRefused(e) > 0) p.appendChild(el('p', {}, el('a', { href: '#/decisions', text: 'See the deciding rules \u2192' })));
}
function renderEdgeTable(edges) {
  const tb = $('#edge-table tbody');
  clear(tb);
  const sorted = edges.slice().sort((a, b) => (b.rps || 0) - (a.rps || 0) || (a.from + a.to).localeCompare(b.from + b.to));
  const shown = sorted.slice(0, EDGE_ROWS);
  $('#edge-table-note').textContent = edges.length > EDGE_ROWS ? 'The ' + EDGE_ROWS + ' busiest of ' + edges.length + ' call paths, by rate.' : (edges.length ? '' : 'No traffic in the last window.');
  for (const e of shown) {
    const ref = totalRefused(e);
    tb.appendChild(el('tr', { class: edgeClasses(e).join(' '), 'data-from': e.from, 'data-to': e.to },
      el('td', {}, idLink(e.from)), el('td', {}, idLink(e.to)),
      el('td', { class: 'num', text: fmtRps(e.rps) }),
      el('td', { class: 'num', text: fmtPct(e.success_rate) }),
      el('td', { class: 'num', text: fmtMs(e.p99_ms) }),
      el('td', { class: 'num' + (ref > 0 ? ' refused-cell' : ''), title: refusedText(e), text: ref > 0 ? '\u2715 ' + ref + ' req' : '0 req' }),
      el('td', { text: e.mtls ? 'yes' : '! no' })));
  }
}
