// Palisade dashboard: the root rotation and every proxy's certificate expiry.

import {
  $, api, append, clear, el, errText, fmtClock, fmtDateTime, fmtLeft, isoUTC, r1, shortName, SOON_MS, state,
  svg, svgTitle, timeEl, truncate
} from './core.js';

// ---------- certificates ----------
export async function loadCerts() {
  try {
    state.certs = await api('api/certs');
    if (state.view === 'certs') renderCerts();
  } catch (e) {
    if (state.view === 'certs' && !state.certs) clear($('#cert-phase')).appendChild(el('span', { class: 'error', text: '! Cannot load certificates: ' + errText(e) }));
  }
}
export function renderCerts() {
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
