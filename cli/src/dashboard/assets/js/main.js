// Palisade dashboard: the event stream, routing between views, and start.

import { $, conn, parseData, renderConn, setControlPlane, shortName, state } from './core.js';
import { loadOverview, onOverview, renderGraph, setupGraphControls } from './graph.js';
import { loadWorkload, openWorkload, setupTap, stopTap } from './workload.js';
import { loadDecisions, scheduleDecisions, setupDecisions } from './decisions.js';
import { loadPolicies, setupPolicies } from './policies.js';
import { loadCerts, renderCerts } from './certs.js';

// ---------- event stream ----------
let events = null;
function startEvents() {
  events = new EventSource('api/events');
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

// ---------- routing ----------
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
