// Palisade dashboard. Vanilla ES2020, no build step, no third-party code.
// Every value from the API may come from traffic (paths, identities, policy
// names, YAML): it only ever reaches the page through textContent and
// setAttribute, never as markup.
'use strict';
(() => {
  const SVGNS = 'http://www.w3.org/2000/svg';
  const DASH = '\u2013';
  const REASONS = ['deny', 'unauthenticated', 'invalid', 'rate_limited'];
  const REASON_LABEL = { deny: 'forbidden', unauthenticated: 'unauthenticated', invalid: 'invalid', rate_limited: 'rate limited' };
  const DECISION_MARK = { allow: '\u2713', deny: '\u2715', unauthenticated: '?', invalid: '!', rate_limited: '\u226B', unavailable: '!', error: '!' };
  const TAP_CAP = 500;
  const EDGE_ROWS = 200;
  const SOON_MS = 10 * 60 * 1000;

  const $ = (sel, root) => (root || document).querySelector(sel);

  // ---------- DOM helpers (no markup strings anywhere) ----------
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    append(e, kids);
    return e;
  }
  function svg(tag, attrs, ...kids) {
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
  function append(e, kids) {
    for (const k of kids) {
      if (k == null || k === false) continue;
      if (Array.isArray(k)) append(e, k);
      else if (k instanceof Node) e.appendChild(k);
      else e.appendChild(document.createTextNode(String(k)));
    }
  }
  const thead = (hs) => el('thead', {}, el('tr', {}, hs.map((h) => el('th', { scope: 'col', text: h }))));
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); return e; }
  function svgTitle(text) { return svg('title', { text }); }

  // ---------- formatting ----------
  const fmtNum = (v, d) => (v == null || !isFinite(v)) ? DASH : Number(v).toFixed(d);
  const fmtRps = (v) => (v == null || !isFinite(v)) ? DASH : fmtNum(v, v >= 100 ? 0 : v >= 10 ? 1 : 2) + ' req/s';
  const fmtPct = (f) => (f == null || !isFinite(f)) ? DASH : fmtNum(f * 100, f >= 0.9995 || f === 0 ? 0 : 1) + ' %';
  const fmtMs = (v) => (v == null || !isFinite(v)) ? DASH : fmtNum(v, v >= 100 ? 0 : 1) + ' ms';
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
  function fmtLeft(notAfter) {
    if (notAfter == null) return DASH;
    const left = notAfter - Date.now();
    return left >= 0 ? fmtDur(left) + ' left' : 'expired ' + fmtDur(left) + ' ago';
  }
  const two = (n) => String(n).padStart(2, '0');
  function fmtClock(ms) {
    const d = new Date(ms);
    return two(d.getHours()) + ':' + two(d.getMinutes()) + ':' + two(d.getSeconds());
  }
  function fmtDateTime(ms) {
    const d = new Date(ms);
    return d.getFullYear() + '-' + two(d.getMonth() + 1) + '-' + two(d.getDate()) + ' ' + fmtClock(ms);
  }
  function isoUTC(ms) { try { return new Date(ms).toISOString(); } catch (_) { return ''; } }
  // A <time> in the browser's zone, with UTC on hover.
  function timeEl(ms, full) {
    if (ms == null || !isFinite(ms)) return el('span', { class: 'muted', text: DASH });
    const iso = isoUTC(ms);
    return el('time', { datetime: iso, title: iso, text: full ? fmtDateTime(ms) : fmtClock(ms) });
  }
  function parseTime(t) {
    if (typeof t === 'number') return t;
    const v = Date.parse(t);
    return isNaN(v) ? null : v;
  }
  function shortName(id) {
    if (id === '') return 'plaintext (no mTLS)';
    if (!id) return DASH;
    const m = /\/sa\/([^/]+)$/.exec(id);
    return m ? m[1] : id;
  }
  function truncate(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + '\u2026' : s; }
  const wlHref = (id) => '#/workload/' + encodeURIComponent(id);
  function idLink(id, label) {
    if (id === '' || id == null) return el('span', { class: 'plain-caller', text: 'plaintext (no mTLS)' });
    return el('a', { href: wlHref(id), title: id, text: label || shortName(id) });
  }
  function reasonLabel(r) { return REASON_LABEL[r] || String(r); }
  function decisionBadge(d) {
    const dec = d || 'none';
    const label = dec === 'deny' ? 'forbidden' : dec === 'rate_limited' ? 'rate limited' : dec;
    return el('span', { class: 'badge dec-' + dec.replace(/[^a-z_]/g, ''), 'data-decision': dec, text: (DECISION_MARK[dec] || '\u2022') + ' ' + label });
  }
  function policyRule(p, r) {
    if (!p) return '(no policy: default deny)';
    return (r === '' || r == null) ? String(p) : p + ' rule ' + r;
  }
  function errText(e) { return e && e.message ? e.message : String(e); }

  // Live refreshes rebuild parts of the page: keep the keyboard focus on the
  // same thing (same link, row or node) across the rebuild.
  const FOCUS_ATTRS = ['href', 'data-id', 'data-kind', 'data-key', 'data-reason', 'data-policy', 'data-rule', 'data-to', 'data-from'];
  function withFocus(container, fn) {
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
  async function api(path, opts) {
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
  const conn = { es: false, esEverOpen: false, cp: true, cpError: null, cpSince: null };
  let events = null;
  function renderConn() {
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
  function setControlPlane(connected, error, at) {
    const was = conn.cp;
    conn.cp = !!connected;
    conn.cpError = error || null;
    if (!conn.cp && (was || !conn.cpSince)) conn.cpSince = at || Date.now();
    if (conn.cp) conn.cpSince = null;
    renderConn();
  }
  function parseData(ev) { try { return JSON.parse(ev.data); } catch (_) { return null; } }
  function startEvents() {
    events = new EventSource('/api/events');
    events.onopen = () => { conn.es = true; conn.esEverOpen = true; renderConn(); };
    events.onerror = () => {
      conn.es = false; conn.esEverOpen = true; renderConn();
      // the browser gives up for good on a non-stream answer (e.g. 401): try again later
      if (events.readyState === 2) { events.close(); setTimeout(startEvents, 5000); }
    };
    events.addEventListener('status', (ev) => {
      const d = parseData(ev); if (!d) return;
      setControlPlane(d.connected, d.error, d.at);
    });
    events.addEventListener('overview', (ev) => {
      const d = parseData(ev); if (!d) return;
      onOverview(d);
    });
    events.addEventListener('decision', () => { if (state.view === 'decisions') scheduleDecisions(300); });
    events.addEventListener('certs', (ev) => {
      const d = parseData(ev); if (!d) return;
      state.certs = d;
      if (state.view === 'certs') renderCerts();
    });
  }

  // ---------- state and routing ----------
  const state = {
    view: null, overview: null, workloadId: null, workload: null,
    decisions: null, selectedRule: null, policies: null, selectedPolicy: null, certs: null,
  };
  let viewTimer = null;

  function parseHash() {
    const h = location.hash.replace(/^#/, '');
    const m = /^\/workload\/(.*)$/.exec(h);
    if (m) {
      let id = m[1];
      try { id = decodeURIComponent(id); } catch (_) { /* keep raw */ }
      return { view: 'workload', id };
    }
    const v = h.replace(/^\//, '').split('/')[0];
    if (['graph', 'decisions', 'policies', 'certs'].includes(v)) return { view: v };
    return { view: 'graph' };
  }

  function route() {
    const r = parseHash();
    const prev = state.view;
    if (prev === 'workload' && (r.view !== 'workload' || r.id !== state.workloadId)) stopTap();
    if (viewTimer) { clearInterval(viewTimer); viewTimer = null; }
    state.view = r.view;
    for (const v of ['graph', 'workload', 'decisions', 'policies', 'certs']) {
      $('#view-' + v).hidden = v !== r.view;
    }
    for (const a of document.querySelectorAll('nav a[data-view]')) {
      if (a.getAttribute('data-view') === r.view) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const titles = { graph: 'Mesh graph', workload: 'Workload', decisions: 'Decisions', policies: 'Policies', certs: 'Certificates' };
    document.title = (r.view === 'workload' ? shortName(r.id) + ' \u2013 ' : titles[r.view] + ' \u2013 ') + 'Palisade dashboard';
    if (r.view === 'graph') {
      if (state.overview) renderGraph(); else loadOverview();
    } else if (r.view === 'workload') {
      openWorkload(r.id);
      viewTimer = setInterval(() => loadWorkload(false), 5000);
    } else if (r.view === 'decisions') {
      loadDecisions();
      viewTimer = setInterval(loadDecisions, 5000);
    } else if (r.view === 'policies') {
      loadPolicies();
      viewTimer = setInterval(loadPolicies, 10000);
    } else if (r.view === 'certs') {
      if (state.certs) renderCerts();
      loadCerts();
    }
    if (prev !== null && prev !== r.view) window.scrollTo(0, 0);
  }

  // ---------- overview / graph ----------
  async function loadOverview() {
    try {
      const d = await api('/api/overview');
      onOverview(d);
    } catch (e) {
      if (e.status === 401) showFatal('Not signed in: open the URL palisadectl dashboard printed (with its token).');
    }
  }
  function showFatal(msg) {
    const b = $('#conn-banner');
    clear(b); b.appendChild(el('div', { text: '! ' + msg })); b.className = 'lost'; b.hidden = false;
  }
  function onOverview(d) {
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

  function nodeState(n) {
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

  function edgeClasses(e) {
    const cls = ['edge'];
    const refused = totalRefused(e);
    if (refused > 0) cls.push('refused');
    if (e.mtls) cls.push('mtls'); else cls.push('plain');
    if (e.success_rate !== null && e.success_rate !== undefined && e.success_rate < 0.95 && (e.requests || 0) > 0) cls.push('errors');
    return cls;
  }
  function totalRefused(e) {
    const r = e.refused || {};
    let t = 0;
    for (const k of Object.keys(r)) t += Number(r[k]) || 0;
    return t;
  }
  function refusedText(e) {
    const r = e.refused || {};
    const parts = REASONS.filter((k) => (r[k] || 0) > 0).map((k) => r[k] + ' ' + reasonLabel(k));
    for (const k of Object.keys(r)) if (!REASONS.includes(k) && r[k] > 0) parts.push(r[k] + ' ' + k);
    return parts.length ? parts.join(', ') : 'none';
  }
  function edgeSummary(e) {
    return shortName(e.from) + ' \u2192 ' + shortName(e.to) + ': ' + fmtRps(e.rps) + ', ' + fmtPct(e.success_rate) + ' success, p99 ' + fmtMs(e.p99_ms) +
      ', refused: ' + refusedText(e) + ', mTLS ' + (e.mtls ? 'yes' : 'no');
  }

  function renderGraph() {
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
  const r1 = (v) => Math.round(v * 10) / 10;
  function cssEsc(s) { return (window.CSS && CSS.escape) ? CSS.escape(s || '') : String(s || '').replace(/["\\]/g, '\\$&'); }
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
  function setupGraphControls() {
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
        el('dt', { text: 'Success' }), el('dd', { text: fmtPct(e.success_rate) }),
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

  // ---------- workload ----------
  function openWorkload(id) {
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
  async function loadWorkload(first) {
    const id = state.workloadId;
    if (id === null) return;
    try {
      const d = await api('/api/workload?id=' + encodeURIComponent(id));
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
      el('thead', {}, el('tr', {}, [end === 'from' ? 'Caller' : 'Callee', 'Rate', 'Success', 'p99', 'Refused', 'mTLS'].map((h, i) => el('th', { scope: 'col', class: i > 0 && i < 5 ? 'num' : null, text: h })))), tb)));
    return box;
  }
  function fmtTick(v) { return Number.isInteger(v) ? String(v) : Math.abs(v) >= 10 ? v.toFixed(0) : Math.abs(v) >= 0.1 ? v.toFixed(1) : String(Number(v.toPrecision(2))); }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
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
    tap.es = new EventSource('/api/tap?to=' + encodeURIComponent(id));
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
  function stopTap() {
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
  function tapRow(d, withCaller) {
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
  function setupTap() {
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

  // ---------- decisions ----------
  let decTimer = null, decLoading = false;
  function scheduleDecisions(ms) {
    if (decTimer) return;
    decTimer = setTimeout(() => { decTimer = null; loadDecisions(); }, ms);
  }
  async function loadDecisions() {
    if (decLoading) { scheduleDecisions(300); return; }
    decLoading = true;
    try {
      const d = await api('/api/decisions');
      state.decisions = d;
      if (state.view === 'decisions') withFocus($('#view-decisions'), renderDecisions);
    } catch (e) {
      if (state.view === 'decisions' && !state.decisions) clear($('#decisions-chart-wrap')).appendChild(el('p', { class: 'error', text: '! Cannot load decisions: ' + errText(e) }));
    } finally { decLoading = false; }
  }
  const ruleKey = (r) => [r.reason, r.policy, r.rule, r.to].join('\u0000');
  function renderDecisions() {
    const d = state.decisions;
    const buckets = d.buckets || [];
    const total = buckets.reduce((s, b) => s + REASONS.reduce((t, k) => t + (b[k] || 0), 0), 0);
    $('#decisions-summary').textContent = total + ' refused request' + (total === 1 ? '' : 's') + ' in the last 15 min' +
      (d.since ? ' (since ' + fmtClock(d.since) + ')' : '') + (d.dropped ? '; ' + d.dropped + ' events dropped (too many to keep)' : '');
    const wrap = clear($('#decisions-chart-wrap'));
    wrap.appendChild(stackedChart(buckets, d.bucket_ms || 10000));
    wrap.appendChild(reasonLegend());
    const tb = clear($('#rules tbody'));
    const rules = d.rules || [];
    if (!rules.length) tb.appendChild(el('tr', { class: 'empty-row' }, el('td', { colspan: 6, class: 'muted', text: 'No refused request recorded yet.' })));
    for (const r of rules) {
      const tr = el('tr', { class: 'rule rsn-' + String(r.reason).replace(/[^a-z_]/g, ''), 'data-policy': r.policy || '', 'data-rule': r.rule == null ? '' : r.rule, 'data-reason': r.reason, 'data-to': r.to || '', tabindex: 0, role: 'button', 'aria-label': reasonLabel(r.reason) + ' by ' + policyRule(r.policy, r.rule) + ', ' + r.count + ' requests: show them' },
        el('td', {}, reasonBadge(r.reason)),
        el('td', { class: 'mono', text: r.policy ? r.policy : '(no policy: default deny)' }),
        el('td', { class: 'mono', text: r.policy ? (r.rule === '' || r.rule == null ? DASH : String(r.rule)) : DASH }),
        el('td', { title: r.to || '', text: shortName(r.to) }),
        el('td', { class: 'num', text: r.count + ' req' }),
        el('td', {}, timeEl(r.last)));
      if (state.selectedRule === ruleKey(r)) { tr.classList.add('selected'); tr.setAttribute('aria-selected', 'true'); }
      tb.appendChild(tr);
    }
    if (state.selectedRule) {
      const cur = rules.find((r) => ruleKey(r) === state.selectedRule);
      if (cur) renderRuleSamples(cur);
    }
  }
  function reasonBadge(r) {
    return el('span', { class: 'badge rsn rsn-' + String(r).replace(/[^a-z_]/g, ''), text: (DECISION_MARK[r] || '\u2022') + ' ' + reasonLabel(r) });
  }
  function reasonLegend() {
    const ul = el('ul', { class: 'legend' });
    for (const k of REASONS) {
      ul.appendChild(el('li', {}, (() => { const s = svg('svg', { width: 18, height: 14, 'aria-hidden': 'true' }, svg('rect', { x: 0, y: 0, width: 18, height: 14, class: 'bar bar-' + k, fill: 'url(#pat-' + k + ')' })); return s; })(), ' ' + reasonLabel(k)));
    }
    return ul;
  }
  function stackedChart(buckets, bucketMs) {
    const W = 1300, H = 250, ml = 52, mr = 12, mt = 12, mb = 36;
    const pw = W - ml - mr, ph = H - mt - mb;
    const s = svg('svg', { id: 'decisions-chart', class: 'chart-stacked', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'Refused requests per ' + Math.round(bucketMs / 1000) + ' s by reason over the last 15 minutes' });
    s.appendChild(patternDefs());
    const now = Date.now();
    const t1 = buckets.length ? buckets[buckets.length - 1].t + bucketMs : now;
    const t0 = Math.min(buckets.length ? buckets[0].t : t1, t1 - 15 * 60 * 1000);
    const span = Math.max(t1 - t0, bucketMs);
    const maxV = niceMax(Math.max(0, ...buckets.map((b) => REASONS.reduce((t, k) => t + (b[k] || 0), 0))));
    const X = (t) => ml + (t - t0) / span * pw, Y = (v) => mt + ph - v / maxV * ph;
    for (const v of [0, maxV / 2, maxV]) {
      s.appendChild(svg('line', { x1: ml, x2: ml + pw, y1: r1(Y(v)), y2: r1(Y(v)), class: 'grid' }));
      s.appendChild(svg('text', { x: ml - 4, y: r1(Y(v)), 'text-anchor': 'end', 'dominant-baseline': 'central', class: 'tick', text: fmtTick(v) }));
    }
    s.appendChild(svg('text', { x: 12, y: mt + ph / 2, 'text-anchor': 'middle', transform: 'rotate(-90 12 ' + (mt + ph / 2) + ')', class: 'axis-label', text: 'req / ' + Math.round(bucketMs / 1000) + ' s' }));
    const bw = Math.max(1, pw * bucketMs / span - 1);
    for (const b of buckets) {
      let acc = 0;
      const g = svg('g', { class: 'bucket', 'data-t': b.t });
      for (const k of REASONS) {
        const v = b[k] || 0;
        if (!v) continue;
        g.appendChild(svg('rect', { x: r1(X(b.t)), y: r1(Y(acc + v)), width: r1(bw), height: r1(Y(acc) - Y(acc + v)), class: 'bar bar-' + k, fill: 'url(#pat-' + k + ')' }));
        acc += v;
      }
      if (acc > 0) {
        g.appendChild(svgTitle(fmtClock(b.t) + ' (' + isoUTC(b.t) + '): ' + REASONS.filter((k) => b[k]).map((k) => b[k] + ' ' + reasonLabel(k)).join(', ')));
        s.appendChild(g);
      }
    }
    s.appendChild(svg('line', { x1: ml, x2: ml + pw, y1: mt + ph, y2: mt + ph, class: 'axis' }));
    // ticks every 5 minutes
    const step = 5 * 60 * 1000;
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
      s.appendChild(svg('line', { x1: r1(X(t)), x2: r1(X(t)), y1: mt + ph, y2: mt + ph + 4, class: 'axis' }));
      s.appendChild(svg('text', { x: r1(X(t)), y: mt + ph + 16, 'text-anchor': 'middle', class: 'tick', text: fmtClock(t).slice(0, 5) }));
    }
    s.appendChild(svg('text', { x: ml + pw / 2, y: H - 3, 'text-anchor': 'middle', class: 'axis-label', text: 'time (your zone)' }));
    if (!buckets.some((b) => REASONS.some((k) => b[k]))) s.appendChild(svg('text', { x: ml + pw / 2, y: mt + ph / 2, 'text-anchor': 'middle', class: 'nodata', text: 'no refused request in the last 15 minutes' }));
    return s;
  }
  function patternDefs() {
    const pat = (id, cls, shape) => svg('pattern', { id, width: 8, height: 8, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
      svg('rect', { width: 8, height: 8, class: cls }), shape);
    return svg('defs', {},
      pat('pat-deny', 'pf-deny', svg('line', { x1: 0, y1: 0, x2: 0, y2: 8, class: 'ps' })),
      pat('pat-unauthenticated', 'pf-unauthenticated', svg('circle', { cx: 4, cy: 4, r: 1.4, class: 'pd' })),
      pat('pat-invalid', 'pf-invalid', svg('path', { d: 'M0 4 H8 M4 0 V8', class: 'ps' })),
      pat('pat-rate_limited', 'pf-rate_limited', null));
  }
  function selectRule(tr) {
    const d = state.decisions;
    if (!d) return;
    const key = [tr.getAttribute('data-reason'), tr.getAttribute('data-policy'), tr.getAttribute('data-rule'), tr.getAttribute('data-to')].join('\u0000');
    const r = (d.rules || []).find((x) => ruleKey({ reason: x.reason, policy: x.policy || '', rule: x.rule == null ? '' : String(x.rule), to: x.to || '' }) === key);
    if (!r) return;
    state.selectedRule = ruleKey(r);
    for (const x of document.querySelectorAll('#rules tr.rule')) { x.classList.remove('selected'); x.removeAttribute('aria-selected'); }
    tr.classList.add('selected'); tr.setAttribute('aria-selected', 'true');
    const det = $('#rule-detail');
    clear(det);
    det.hidden = false;
    det.appendChild(el('h2', { id: 'h-rule-detail' }, reasonLabel(r.reason) + ' by ' + policyRule(r.policy, r.rule) + ' at ' + shortName(r.to)));
    det.appendChild(el('div', { id: 'rule-samples' }));
    det.appendChild(el('section', { id: 'explain', 'aria-live': 'polite' }, el('p', { class: 'muted', text: 'Explaining the newest request\u2026' })));
    renderRuleSamples(r);
    explainSample(r);
    det.scrollIntoView({ block: 'nearest' });
  }
  function renderRuleSamples(r) {
    const box = $('#rule-samples');
    if (!box) return;
    clear(box);
    const samples = r.samples || [];
    box.appendChild(el('h3', { text: 'Requests behind it (' + samples.length + ' newest of ' + r.count + ')' }));
    if (!samples.length) { box.appendChild(el('p', { class: 'muted', text: 'No sample kept.' })); return; }
    const tb = el('tbody');
    for (const s of samples) tb.appendChild(tapRow(s, true));
    box.appendChild(el('div', { class: 'table-wrap' }, el('table', { class: 'tap-table samples' },
      thead(['Time', 'Method', 'Path', 'Status', 'Latency', 'Decision', 'Policy / rule', 'Caller', 'Principal']), tb)));
  }
  async function explainSample(r) {
    const s = (r.samples || [])[0];
    const key = ruleKey(r);
    if (!s) { clear($('#explain')).appendChild(el('p', { class: 'muted', text: 'No request to explain.' })); return; }
    const q = new URLSearchParams({ from: s.caller || '', to: s.callee || r.to || '', method: s.method || 'GET', path: s.path || '/' });
    try {
      const x = await api('/api/explain?' + q.toString());
      if (state.selectedRule !== key) return;
      const box = clear($('#explain'));
      box.appendChild(el('h3', { text: 'Why: palisadectl authz check of the newest request' }));
      box.appendChild(el('p', { class: 'mono', text: (s.method || '') + ' ' + (s.path || '') + ' from ' + (s.caller ? s.caller : 'a plaintext caller') }));
      const dl = el('dl', { class: 'kv' },
        el('dt', { text: 'Decision' }), el('dd', { class: 'explain-decision' }, decisionBadge(x.decision)),
        el('dt', { text: 'Policy' }), el('dd', { class: 'mono explain-policy', text: x.policy || '(no policy: default deny)' }),
        el('dt', { text: 'Rule' }), el('dd', { class: 'mono explain-rule', text: x.rule == null || x.rule === '' ? DASH : String(x.rule) }),
        el('dt', { text: 'Reason' }), el('dd', { class: 'explain-reason', text: x.reason || DASH }));
      if (x.rate_limits && x.rate_limits.length) append(dl, [el('dt', { text: 'Rate limits' }), el('dd', {}, el('ul', { class: 'compact' }, x.rate_limits.map((t) => el('li', { text: t }))))]);
      if (x.cors) append(dl, [el('dt', { text: 'CORS' }), el('dd', { text: x.cors })]);
      box.appendChild(dl);
    } catch (e) {
      if (state.selectedRule !== key) return;
      clear($('#explain')).appendChild(el('p', { class: 'error', text: '! Cannot explain: ' + errText(e) }));
    }
  }
  function setupDecisions() {
    const tb = $('#rules tbody');
    tb.addEventListener('click', (evt) => { const tr = evt.target.closest('tr.rule'); if (tr) selectRule(tr); });
    tb.addEventListener('keydown', (evt) => {
      if (evt.key !== 'Enter' && evt.key !== ' ') return;
      const tr = evt.target.closest('tr.rule'); if (tr) { evt.preventDefault(); selectRule(tr); }
    });
  }

  // ---------- policies ----------
  async function loadPolicies() {
    try {
      const d = await api('/api/policies');
      state.policies = d;
      if (state.view === 'policies') withFocus($('#view-policies'), renderPolicies);
    } catch (e) {
      if (state.view === 'policies' && !state.policies) { const tb = clear($('#policies tbody')); tb.appendChild(el('tr', {}, el('td', { colspan: 5, class: 'error', text: '! Cannot load policies: ' + errText(e) }))); }
    }
  }
  function rolloutText(r) {
    r = r || {};
    const total = (r.synced || 0) + (r.pending || 0) + (r.rejected || 0) + (r.disconnected || 0);
    let t = (r.synced || 0) + '/' + total + ' synced';
    if (r.pending) t += ', ' + r.pending + ' pending';
    if (r.rejected) t += ', ' + r.rejected + ' rejected';
    if (r.disconnected) t += ', ' + r.disconnected + ' disconnected';
    return t;
  }
  function fillSelect(sel, values, allLabel) {
    const cur = sel.value;
    clear(sel);
    sel.appendChild(el('option', { value: '', text: allLabel }));
    for (const v of values) sel.appendChild(el('option', { value: v, text: v || '(cluster)' }));
    sel.value = values.includes(cur) ? cur : '';
  }
  function renderPolicies() {
    const d = state.policies;
    const pols = (d.policies || []).slice().sort((a, b) => a.kind.localeCompare(b.kind) || (a.namespace || '').localeCompare(b.namespace || '') || a.key.localeCompare(b.key));
    $('#policies-summary').textContent = pols.length + ' polic' + (pols.length === 1 ? 'y' : 'ies') + ' at revision ' + d.revision + ', ' + d.proxies + ' prox' + (d.proxies === 1 ? 'y' : 'ies') + ' connected';
    const kindSel = $('#policy-kind'), nsSel = $('#policy-ns');
    fillSelect(kindSel, [...new Set(pols.map((p) => p.kind))].sort(), 'all kinds');
    fillSelect(nsSel, [...new Set(pols.map((p) => p.namespace || ''))].sort(), 'all namespaces');
    const kind = kindSel.value, ns = nsSel.value;
    const tb = clear($('#policies tbody'));
    let shown = 0;
    for (const p of pols) {
      if (kind && p.kind !== kind) continue;
      if (ns && (p.namespace || '') !== ns) continue;
      shown++;
      const r = p.rollout || {};
      const bad = (r.rejected || 0) > 0;
      const tr = el('tr', { class: 'policy' + (bad ? ' rejected' : '') + (state.selectedPolicy === p.kind + '\u0000' + p.key ? ' selected' : ''), 'data-kind': p.kind, 'data-key': p.key, tabindex: 0, role: 'button', 'aria-label': p.kind + ' ' + p.key + ': show its YAML' },
        el('td', { text: p.kind }), el('td', { text: p.namespace || '(cluster)' }), el('td', { class: 'mono', text: p.key }),
        el('td', { class: 'num', text: p.revision }),
        el('td', { class: bad ? 'error-text' : (r.pending || r.disconnected) ? 'warn' : '', text: (bad ? '! ' : (r.pending || r.disconnected) ? '\u2026 ' : '\u2713 ') + rolloutText(r) }));
      tb.appendChild(tr);
    }
    if (!shown) tb.appendChild(el('tr', { class: 'empty-row' }, el('td', { colspan: 5, class: 'muted', text: pols.length ? 'No policy matches the filter.' : 'No policy yet.' })));
    if (state.selectedPolicy) {
      const p = pols.find((x) => x.kind + '\u0000' + x.key === state.selectedPolicy);
      if (p) showPolicy(p); else $('#policy-detail').hidden = true;
    }
  }
  function showPolicy(p) {
    $('#policy-detail').hidden = false;
    $('#policy-title').textContent = p.kind + ' ' + p.key + ' (revision ' + p.revision + ')';
    const pre = $('#policy-yaml');
    if (pre.textContent !== (p.yaml || '')) pre.textContent = p.yaml || '';
    const errs = clear($('#policy-errors'));
    const r = p.rollout || {};
    errs.appendChild(el('p', { text: 'Rollout: ' + rolloutText(r) }));
    if ((r.errors || []).length) {
      errs.appendChild(el('h3', { text: 'Rejected by' }));
      errs.appendChild(el('ul', { class: 'errors' }, r.errors.map((x) => el('li', { class: 'error-text' }, '! ', el('span', { class: 'mono', text: x.proxy }), ': ', x.error))));
    }
  }
  function selectPolicy(tr) {
    const key = tr.getAttribute('data-kind') + '\u0000' + tr.getAttribute('data-key');
    const p = ((state.policies && state.policies.policies) || []).find((x) => x.kind + '\u0000' + x.key === key);
    if (!p) return;
    state.selectedPolicy = key;
    for (const x of document.querySelectorAll('#policies tr.policy')) x.classList.remove('selected');
    tr.classList.add('selected');
    showPolicy(p);
    $('#policy-detail').scrollIntoView({ block: 'nearest' });
  }
  async function runPreview() {
    const btn = $('#preview-run');
    const out = clear($('#preview-result'));
    const text = $('#preview-input').value;
    if (!text.trim()) { out.appendChild(el('p', { class: 'error', text: '! Paste a policy first.' })); return; }
    btn.disabled = true;
    $('#preview-state').textContent = 'Replaying recent requests\u2026';
    try {
      const r = await fetch('/api/preview', {
        method: 'POST', credentials: 'same-origin', cache: 'no-store',
        headers: { 'Content-Type': 'application/json', 'X-Palisade-Dashboard': '1' },
        body: JSON.stringify({ yaml: text }),
      });
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      if (!r.ok) {
        out.appendChild(el('p', { class: 'error', role: 'alert', text: '! ' + ((body && body.error) || ('HTTP ' + r.status)) }));
        return;
      }
      renderPreview(out, body || {});
    } catch (e) {
      out.appendChild(el('p', { class: 'error', role: 'alert', text: '! ' + errText(e) }));
    } finally {
      btn.disabled = false;
      $('#preview-state').textContent = '';
    }
  }
  function renderPreview(out, d) {
    const changes = d.changes || [];
    out.appendChild(el('p', { class: 'summary', text: (d.requests_evaluated || 0) + ' requests evaluated over ' + (d.window_seconds || 0) + ' s: ' + (changes.length ? changes.length + ' decided differently' : 'none decided differently') }));
    if ((d.warnings || []).length) out.appendChild(el('ul', { class: 'warnings' }, d.warnings.map((w) => el('li', { class: 'warn', text: '\u26A0 ' + w }))));
    if (!changes.length) return;
    const tb = el('tbody');
    for (const c of changes) {
      tb.appendChild(el('tr', { class: 'change' },
        el('td', {}, idLink(c.from)), el('td', {}, idLink(c.to)),
        el('td', { class: 'mono', text: c.method }), el('td', { class: 'mono', text: c.path }),
        el('td', { class: 'beforeafter' }, decisionBadge(c.before), ' \u2192 ', decisionBadge(c.after)),
        el('td', { class: 'num', text: c.count + ' req' }),
        el('td', { class: 'mono', text: c.before_rule || DASH }), el('td', { class: 'mono', text: c.after_rule || DASH })));
    }
    out.appendChild(el('div', { class: 'table-wrap' }, el('table', { id: 'preview-changes' },
      thead(['From', 'To', 'Method', 'Path', 'Before \u2192 after', 'Count', 'Rule before', 'Rule after']), tb)));
  }
  function setupPolicies() {
    $('#policy-kind').addEventListener('change', () => { if (state.policies) renderPolicies(); });
    $('#policy-ns').addEventListener('change', () => { if (state.policies) renderPolicies(); });
    const tb = $('#policies tbody');
    tb.addEventListener('click', (evt) => { const tr = evt.target.closest('tr.policy'); if (tr) selectPolicy(tr); });
    tb.addEventListener('keydown', (evt) => {
      if (evt.key !== 'Enter' && evt.key !== ' ') return;
      const tr = evt.target.closest('tr.policy'); if (tr) { evt.preventDefault(); selectPolicy(tr); }
    });
    $('#preview-run').addEventListener('click', runPreview);
    $('#preview-input').addEventListener('keydown', (evt) => { if (evt.key === 'Enter' && (evt.ctrlKey || evt.metaKey)) { evt.preventDefault(); runPreview(); } });
  }

  // ---------- certificates ----------
  async function loadCerts() {
    try {
      state.certs = await api('/api/certs');
      if (state.view === 'certs') renderCerts();
    } catch (e) {
      if (state.view === 'certs' && !state.certs) clear($('#cert-phase')).appendChild(el('span', { class: 'error', text: '! Cannot load certificates: ' + errText(e) }));
    }
  }
  function renderCerts() {
    const c = state.certs;
    const ph = clear($('#cert-phase'));
    const phase = String(c.phase || 'none');
    ph.setAttribute('data-phase', phase);
    append(ph, [el('span', { class: 'phase phase-' + phase.replace(/[^a-z]/g, ''), text: phase }),
      c.detail ? el('span', { class: 'phase-detail', text: ' \u2014 ' + c.detail }) : null]);
    if (c.phase_since) append(ph, [el('br'), el('span', { class: 'muted' }, 'in this phase since ', timeEl(c.phase_since, true))]);
    if (c.started_at) append(ph, [el('br'), el('span', { class: 'muted' }, 'rotation started ', timeEl(c.started_at, true))]);
    const prog = $('#cert-progress');
    const waiting = c.waiting || 0, total = c.proxies || 0;
    if (phase === 'none') prog.textContent = 'No rotation in progress; ' + total + ' prox' + (total === 1 ? 'y' : 'ies') + ' connected.';
    else if (waiting > 0) prog.textContent = 'waiting for ' + waiting + ' of ' + total + ' proxies';
    else prog.textContent = 'all ' + total + ' proxies done';
    const wl = clear($('#cert-waiting'));
    for (const w of (c.waiting_for || []).slice(0, 50)) wl.appendChild(el('li', { class: 'mono', text: w }));
    if ((c.waiting_for || []).length > 50) wl.appendChild(el('li', { class: 'muted', text: '\u2026 and ' + (c.waiting_for.length - 50) + ' more' }));
    // roots
    const tb = clear($('#cert-roots tbody'));
    const fp = (r) => r && r.fingerprint;
    const roles = (r) => {
      const out = [];
      if (c.signing && fp(c.signing) === fp(r)) out.push('signing');
      if (c.old_root && fp(c.old_root) === fp(r)) out.push('old');
      if (c.new_root && fp(c.new_root) === fp(r)) out.push('new');
      return out.length ? out.join(', ') : 'trusted';
    };
    const bundle = (c.bundle || []).slice();
    if (c.signing && !bundle.some((r) => fp(r) === fp(c.signing))) bundle.unshift(c.signing);
    if (!bundle.length) tb.appendChild(el('tr', {}, el('td', { colspan: 5, class: 'muted', text: 'No root known.' })));
    for (const r of bundle) {
      const f = String(r.fingerprint || '');
      const short = f.length > 16 ? f.slice(0, 8) + '\u2026' + f.slice(-8) : f;
      const expSoon = r.not_after && r.not_after - Date.now() < 30 * 86400000;
      tb.appendChild(el('tr', { class: 'root', 'data-fingerprint': f },
        el('td', { text: roles(r) }), el('td', { class: 'mono', text: r.subject || '' }),
        el('td', { class: 'mono' }, el('abbr', { title: f, text: short })),
        el('td', {}, timeEl(r.not_before, true)),
        el('td', { class: expSoon ? 'warn' : '' }, timeEl(r.not_after, true), ' (' + fmtLeft(r.not_after) + ')')));
    }
    const wrap = clear($('#cert-timeline-wrap'));
    wrap.appendChild(expiryTimeline(c.expiries || []));
  }
  function expiryTimeline(exps) {
    const now = Date.now();
    const list = exps.slice().sort((a, b) => (a.not_after || 0) - (b.not_after || 0));
    const RH = 20, W = 1000, ml = 330, mr = 110, mt = 26, mb = 8;
    const H = mt + Math.max(list.length, 1) * RH + mb;
    const s = svg('svg', { id: 'cert-timeline', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'Certificate expiry of every proxy, soonest first' });
    if (!list.length) {
      s.appendChild(svg('text', { x: W / 2, y: mt + 8, 'text-anchor': 'middle', class: 'nodata', text: 'no proxy connected' }));
      return s;
    }
    const tmax = Math.max(now + 60000, ...list.map((e) => e.not_after || now));
    const tmin = Math.min(now, ...list.map((e) => e.not_after || now));
    const pw = W - ml - mr;
    const X = (t) => ml + (t - tmin) / Math.max(tmax - tmin, 1) * pw;
    // scale ticks
    for (let i = 0; i <= 4; i++) {
      const t = tmin + (tmax - tmin) * i / 4;
      s.appendChild(svg('line', { x1: r1(X(t)), x2: r1(X(t)), y1: mt - 4, y2: H - mb, class: 'grid' }));
      s.appendChild(svg('text', { x: r1(X(t)), y: mt - 8, 'text-anchor': i === 0 ? 'start' : i === 4 ? 'end' : 'middle', class: 'tick', text: fmtClock(t).slice(0, 5) }));
    }
    list.forEach((e, i) => {
      const y = mt + i * RH;
      const na = e.not_after;
      const soon = na !== null && na !== undefined && na - now < SOON_MS;
      const expired = na !== null && na !== undefined && na < now;
      const g = svg('g', { class: 'expiry' + (soon ? ' soon' : '') + (expired ? ' expired' : ''), 'data-identity': e.identity || '', 'data-addr': e.addr || '' });
      g.appendChild(svg('text', { x: 4, y: y + RH / 2, 'dominant-baseline': 'central', class: 'row-label', text: truncate(shortName(e.identity) + ' ' + (e.addr || ''), 44) }));
      if (na !== null && na !== undefined) {
        const x0 = X(Math.min(now, na)), x1 = X(Math.max(now, na));
        g.appendChild(svg('rect', { x: r1(x0), y: y + 5, width: r1(Math.max(x1 - x0, 1)), height: RH - 10, class: 'bar' }));
        g.appendChild(svg('circle', { cx: r1(X(na)), cy: y + RH / 2, r: 4, class: 'end' }));
        g.appendChild(svg('text', { x: W - mr + 6, y: y + RH / 2, 'dominant-baseline': 'central', class: 'left', text: (soon ? '\u25D4 ' : '') + fmtLeft(na) }));
      }
      g.appendChild(svgTitle((e.identity || '') + ' ' + (e.addr || '') + ': expires ' + (na ? fmtDateTime(na) + ' (' + isoUTC(na) + ' UTC), ' + fmtLeft(na) : 'unknown')));
      s.appendChild(g);
    });
    s.appendChild(svg('line', { x1: r1(X(now)), x2: r1(X(now)), y1: mt - 4, y2: H - mb, class: 'now' }));
    s.appendChild(svg('text', { x: r1(X(now)) + 3, y: H - mb - 2, class: 'now-label', text: 'now' }));
    return s;
  }

  // ---------- start ----------
  function start() {
    setupGraphControls();
    setupTap();
    setupDecisions();
    setupPolicies();
    window.addEventListener('hashchange', route);
    window.addEventListener('pagehide', () => { stopTap(); if (events) events.close(); });
    renderConn();
    startEvents();
    route();
    if (state.view !== 'graph') loadOverview();
    // keep "time left" and the graph's cert state fresh even without events
    setInterval(() => { if (state.view === 'certs' && state.certs) renderCerts(); }, 30000);
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start); else start();
})();
