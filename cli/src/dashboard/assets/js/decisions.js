// Palisade dashboard: refused requests by deciding rule, and why.

import {
  $, api, append, clear, DASH, DECISION_MARK, decisionBadge, el, errText, fmtClock, fmtTick, isoUTC, niceMax,
  policyRule, r1, reasonLabel, REASONS, shortName, state, svg, svgTitle, thead, timeEl, withFocus
} from './core.js';
import { tapRow } from './workload.js';

// ---------- decisions ----------
let decTimer = null, decLoading = false;
export function scheduleDecisions(ms) {
  if (decTimer) return;
  decTimer = setTimeout(() => { decTimer = null; loadDecisions(); }, ms);
}
export async function loadDecisions() {
  if (decLoading) { scheduleDecisions(300); return; }
  decLoading = true;
  try {
    const d = await api('api/decisions');
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
      el('td', { class: 'mono', text: r.policy ? r.policy : noPolicy(r.reason) }),
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
// What decided a refusal that names no policy.
function noPolicy(reason) {
  if (reason === 'deny') return '(no ALLOW rule matched)';
  if (reason === 'unauthenticated') return '(credential missing or not valid)';
  return '(no deciding policy)';
}
async function explainSample(r) {
  const s = (r.samples || [])[0];
  const key = ruleKey(r);
  if (!s) { clear($('#explain')).appendChild(el('p', { class: 'muted', text: 'No request to explain.' })); return; }
  const q = new URLSearchParams({ from: s.caller || '', to: s.callee || r.to || '', method: s.method || 'GET', path: s.path || '/', principal: s.principal || '', api_key: s.api_key || '' });
  try {
    const x = await api('api/explain?' + q.toString());
    if (state.selectedRule !== key) return;
    const box = clear($('#explain'));
    box.appendChild(el('h3', { text: 'Why: palisadectl authz check of the newest request' }));
    box.appendChild(el('p', { class: 'mono', text: (s.method || '') + ' ' + (s.path || '') + ' from ' + (s.caller ? s.caller : 'a plaintext caller') }));
    const dl = el('dl', { class: 'kv' },
      el('dt', { text: 'Decision' }), el('dd', { class: 'explain-decision' }, decisionBadge(x.decision)),
      el('dt', { text: 'Policy' }), el('dd', { class: 'mono explain-policy', text: x.policy || noPolicy(x.decision) }),
      el('dt', { text: 'Rule' }), el('dd', { class: 'mono explain-rule', text: x.rule == null || x.rule === '' || x.rule < 0 ? DASH : String(x.rule) }),
      el('dt', { text: 'Reason' }), el('dd', { class: 'explain-reason', text: x.reason || DASH }));
    if (x.rate_limits && x.rate_limits.length) append(dl, [el('dt', { text: 'Rate limits' }), el('dd', {}, el('ul', { class: 'compact' }, x.rate_limits.map((t) => el('li', { text: t }))))]);
    if (x.cors) append(dl, [el('dt', { text: 'CORS' }), el('dd', { text: x.cors })]);
    box.appendChild(dl);
    // authz check sees the caller, method, path, principal and API key, not a
    // token's claims or a rate limit's state: say so when it reads otherwise.
    const agrees = x.decision === s.decision || (s.decision === 'rate_limited' && x.decision === 'allow');
    if (!agrees) {
      box.appendChild(el('p', { class: 'warn explain-caveat', role: 'note',
        text: '! The sidecar decided ' + reasonLabel(s.decision) + '; this explanation differs because authz check does not see everything the sidecar saw (a token\u2019s claims, a credential that did not verify, a rate limit\u2019s state).' }));
    }
  } catch (e) {
    if (state.selectedRule !== key) return;
    clear($('#explain')).appendChild(el('p', { class: 'error', text: '! Cannot explain: ' + errText(e) }));
  }
}
export function setupDecisions() {
  const tb = $('#rules tbody');
  tb.addEventListener('click', (evt) => { const tr = evt.target.closest('tr.rule'); if (tr) selectRule(tr); });
  tb.addEventListener('keydown', (evt) => {
    if (evt.key !== 'Enter' && evt.key !== ' ') return;
    const tr = evt.target.closest('tr.rule'); if (tr) { evt.preventDefault(); selectRule(tr); }
  });
}
