// Palisade dashboard: policies, their rollout, and the preview of a change.

import { $, api, clear, DASH, decisionBadge, el, errText, idLink, state, thead, withFocus } from './core.js';

// ---------- policies ----------
export async function loadPolicies() {
  try {
    const d = await api('api/policies');
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
    const r = await fetch('api/preview', {
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
export function setupPolicies() {
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
