//! What the sidecars report on their config streams, and the Admin API
//! calls built on it:
//!
//! - **taps** (`Admin.Tap`): an operator's tap goes down the streams of the
//!   sidecars whose identity it selects; the lines they send up are checked
//!   against the tap again (a sidecar can only report requests to itself)
//!   and handed to the operator's stream, bounded, dropping what does not
//!   fit. A tap ends when its caller goes away, after `max` lines, or after
//!   [`TAP_LIFETIME`].
//! - **recorded requests** (`Admin.PreviewPolicy`): samples of recent
//!   requests per workload, kept for `--preview-window` in a bounded,
//!   fairly shared record ([`crate::preview_record`]), evaluated by
//!   `palisade_policy::preview`.
//! - **stats** (`Admin.Stat`): each sidecar's cumulative inbound counters,
//!   kept for ten minutes; rates and percentiles come from their differences.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade_policy::preview::Sample;
use palisade_proto::v1::{
    CalledService, CallerView, EdgeStat, InboundFrom, RecordedRequest, StatReport, TapEvent, TapRecord, TapRequest,
    TapSpec, WorkloadStat,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use wildmatch::WildMatch;

mod edges;

/// Taps running at once, at most.
pub(crate) const MAX_TAPS: usize = 16;
/// Lines waiting for one tap's caller, at most (beyond: dropped, counted).
const TAP_BUFFER: usize = 1024;
/// A tap ends after this long whatever its caller does.
pub(crate) const TAP_LIFETIME: Duration = Duration::from_secs(3600);
/// One reported line, at most.
const MAX_LINE: usize = 16 * 1024;
/// Records taken from one report message, at most.
const MAX_PER_MESSAGE: usize = 1024;
/// How long stats reports are kept.
const STATS_KEPT: Duration = Duration::from_secs(600);

struct Tap {
    to: Option<WildMatch>,
    spec: TapSpec,
    max: u64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    tx: mpsc::Sender<Result<TapEvent, Status>>,
    end: CancellationToken,
}

struct ProxyStats {
    identity: String,
    /// The counters of each report (without their `called`).
    reports: VecDeque<(Instant, StatReport)>,
    /// The called services of the latest report only (a view, not counters).
    called: Vec<CalledService>,
    /// The latest report's inbound counts per caller (for the edges' deltas).
    inbound_from: Option<Vec<InboundFrom>>,
}

/// Called services kept from one report, at most (the sidecar sends no more).
const MAX_CALLED_SERVICES: usize = 64;
/// Endpoints kept from one report, at most, all services together.
const MAX_CALLED_ENDPOINTS: usize = 256;

/// A report's called services within the bounds, without entries whose
/// text is too long or holds control characters (they are printed).
fn checked_called(mut called: Vec<CalledService>) -> Vec<CalledService> {
    let printable = |s: &str, max: usize| s.len() <= max && !s.chars().any(char::is_control);
    called.retain(|c| printable(&c.service, 512));
    called.truncate(MAX_CALLED_SERVICES);
    let mut room = MAX_CALLED_ENDPOINTS;
    for c in &mut called {
        let before = c.endpoints.len();
        c.endpoints.retain(|e| printable(&e.addr, 64) && printable(&e.identity, 2048));
        let keep = c.endpoints.len().min(room);
        c.endpoints.truncate(keep);
        room -= keep;
        let dropped = u32::try_from(before - keep).unwrap_or(u32::MAX);
        c.endpoints_omitted = c.endpoints_omitted.saturating_add(dropped);
        for e in &mut c.endpoints {
            e.latency_ms = e.latency_ms.filter(|l| l.is_finite() && *l >= 0.0);
        }
    }
    called
}

/// Taps, recorded requests and stats.
pub(crate) struct Observatory {
    window: Duration,
    next: AtomicU64,
    taps: Mutex<HashMap<u64, Tap>>,
    /// Bumped when the taps change: every stream sends its sidecar's.
    pub(crate) taps_changed: tokio::sync::watch::Sender<u64>,
    record: crate::preview_record::PreviewRecord,
    stats: Mutex<HashMap<String, ProxyStats>>,
    edges: Mutex<edges::Edges>,
}

impl std::fmt::Debug for Observatory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observatory").field("window", &self.window).finish_non_exhaustive()
    }
}

fn glob(s: &str) -> Option<WildMatch> {
    (!s.is_empty()).then(|| WildMatch::new(s))
}

const DECISIONS: [&str; 7] = ["allow", "deny", "unauthenticated", "rate_limited", "invalid", "error", "unavailable"];

impl Observatory {
    pub(crate) fn new(window: Duration, preview_max_bytes: usize) -> Self {
        Self {
            window,
            next: AtomicU64::new(1),
            taps: Mutex::default(),
            taps_changed: tokio::sync::watch::channel(0).0,
            record: crate::preview_record::PreviewRecord::new(window, preview_max_bytes),
            stats: Mutex::default(),
            edges: Mutex::new(edges::Edges::new()),
        }
    }

    /// Starts a tap; the receiver is the caller's stream. It ends (the
    /// sender is dropped) on `max`, on [`TAP_LIFETIME`], or when the caller goes away.
    pub(crate) fn start_tap(
        self: &std::sync::Arc<Self>,
        req: &TapRequest,
        by: &str,
    ) -> Result<mpsc::Receiver<Result<TapEvent, Status>>, Status> {
        for (field, v) in [("to", &req.to), ("from", &req.from), ("path", &req.path)] {
            if v.len() > 1024 || v.chars().any(char::is_control) {
                return Err(Status::invalid_argument(format!("{field}: at most 1024 printable characters")));
            }
        }
        if !req.path.is_empty() && !req.path.starts_with(['/', '*']) {
            return Err(Status::invalid_argument("path: a path or glob starting with / (e.g. /api/*)"));
        }
        if !req.decision.is_empty() && !DECISIONS.contains(&req.decision.as_str()) {
            return Err(Status::invalid_argument(format!("decision: one of {}", DECISIONS.join(", "))));
        }
        let (tx, rx) = mpsc::channel(TAP_BUFFER);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let end = CancellationToken::new();
        {
            let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
            if taps.len() >= MAX_TAPS {
                return Err(Status::resource_exhausted(format!(
                    "{MAX_TAPS} taps are running; stop one first (each ends when its palisadectl goes away)"
                )));
            }
            let spec = TapSpec { id, from: req.from.clone(), path: req.path.clone(), decision: req.decision.clone() };
            taps.insert(
                id,
                Tap {
                    to: glob(&req.to),
                    spec,
                    max: req.max,
                    delivered: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                    tx: tx.clone(),
                    end: end.clone(),
                },
            );
            crate::metrics::METRICS.taps.set(taps.len() as i64);
        }
        tracing::info!(target: "audit", event = "tap_started", tap = id, by = %by, to = %req.to, from = %req.from, path = %req.path, decision = %req.decision, max = req.max, "tap started");
        self.taps_changed.send_modify(|v| *v += 1);
        let this = self.clone();
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = tx.closed() => "the caller went away",
                _ = end.cancelled() => "its maximum was reached",
                _ = tokio::time::sleep(TAP_LIFETIME) => "it ran for an hour",
            };
            drop(tx);
            this.end_tap(id, why);
        });
        Ok(rx)
    }

    fn end_tap(&self, id: u64, why: &str) {
        let removed = {
            let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
            let t = taps.remove(&id);
            crate::metrics::METRICS.taps.set(taps.len() as i64);
            t
        };
        if let Some(t) = removed {
            tracing::info!(target: "audit", event = "tap_ended", tap = id, delivered = t.delivered.load(Ordering::Relaxed), dropped = t.dropped.load(Ordering::Relaxed), "tap ended: {why}");
            self.taps_changed.send_modify(|v| *v += 1);
        }
    }

    /// The taps the sidecars of `identity` must report to.
    pub(crate) fn taps_for(&self, identity: &str) -> Vec<TapSpec> {
        let taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<TapSpec> = taps
            .values()
            .filter(|t| t.to.as_ref().is_none_or(|g| g.matches(identity)))
            .map(|t| t.spec.clone())
            .collect();
        out.sort_by_key(|t| t.id);
        out
    }

    /// Hands lines a sidecar of `identity` (proxy `proxy`) reported to their taps.
    pub(crate) fn deliver(&self, identity: &str, proxy: &str, records: &[TapRecord]) {
        let count = |result| crate::metrics::METRICS.tap_events.get_or_create(&crate::metrics::ResultLabel { result });
        let taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        for r in records.iter().take(MAX_PER_MESSAGE) {
            if r.json.is_empty() {
                // Only drops: the tapper learns of them.
                for t in r.tap_ids.iter().take(MAX_TAPS).filter_map(|id| taps.get(id)) {
                    if t.to.as_ref().is_none_or(|g| g.matches(identity)) {
                        let total =
                            t.dropped.fetch_add(r.dropped.min(1 << 32), Ordering::Relaxed) + r.dropped.min(1 << 32);
                        let _ = t.tx.try_send(Ok(TapEvent { json: String::new(), dropped: total }));
                    }
                }
                continue;
            }
            let Some(mut line) = parse_line(&r.json) else {
                count("refused").inc();
                continue;
            };
            // The sidecar's certificate says who the callee is.
            line.insert("callee".into(), identity.into());
            line.insert("proxy".into(), proxy.into());
            let field = |k: &str| line.get(k).and_then(|v| v.as_str());
            let mut json = None;
            for id in r.tap_ids.iter().take(MAX_TAPS) {
                let Some(t) = taps.get(id) else { continue };
                let wanted = t.to.as_ref().is_none_or(|g| g.matches(identity))
                    && glob(&t.spec.from).is_none_or(|g| field("caller").is_some_and(|c| g.matches(c)))
                    && glob(&t.spec.path).is_none_or(|g| field("path").is_some_and(|p| g.matches(p)))
                    && palisade_policy::preview::decision_matches(
                        &t.spec.decision,
                        field("decision").unwrap_or_default(),
                    );
                if !wanted {
                    count("refused").inc();
                    continue;
                }
                if t.max > 0 && t.delivered.load(Ordering::Relaxed) >= t.max {
                    continue;
                }
                let json = json.get_or_insert_with(|| serde_json::Value::Object(line.clone()).to_string()).clone();
                let event = TapEvent { json, dropped: t.dropped.load(Ordering::Relaxed) };
                match t.tx.try_send(Ok(event)) {
                    Ok(()) => {
                        count("delivered").inc();
                        if t.max > 0 && t.delivered.fetch_add(1, Ordering::Relaxed) + 1 >= t.max {
                            t.end.cancel();
                        }
                    }
                    Err(_) => {
                        count("dropped").inc();
                        t.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Keeps the samples a sidecar of `identity` recorded.
    pub(crate) fn record(&self, identity: &str, recorded: &[RecordedRequest]) {
        self.record.record(identity, recorded);
    }

    /// The samples of the window, merged by shape, and how far back they go.
    pub(crate) fn samples(&self) -> (Vec<(Sample, u64)>, Duration) {
        self.record.samples()
    }

    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// Keeps a sidecar's stats report.
    pub(crate) fn stats_report(&self, identity: &str, proxy: &str, report: StatReport) {
        if report.status_classes.len() != 5
            || report.latency_buckets.len() > 64
            || report.latency_buckets.len() != report.bounds_seconds.len() + 1
            || !report.bounds_seconds.windows(2).all(|w| w[0] < w[1])
        {
            return;
        }
        let mut report = report;
        let called = checked_called(std::mem::take(&mut report.called));
        let mut from = std::mem::take(&mut report.inbound_from);
        from.truncate(edges::MAX_FROM);
        from.retain(|f| edges::valid(f, report.latency_buckets.len()));
        let mut all = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let e = all.entry(proxy.to_string()).or_insert_with(|| ProxyStats {
            identity: identity.to_string(),
            reports: VecDeque::new(),
            called: Vec::new(),
            inbound_from: None,
        });
        if !from.is_empty() || e.inbound_from.as_ref().is_some_and(|f| !f.is_empty()) {
            let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
            edges.add(identity, &from, e.inbound_from.as_deref(), &report.bounds_seconds, now);
            edges.expire(now);
        }
        e.inbound_from = Some(from);
        e.reports.push_back((now, report));
        e.called = called;
        while e.reports.front().is_some_and(|(at, _)| now.duration_since(*at) > STATS_KEPT) || e.reports.len() > 3600 {
            e.reports.pop_front();
        }
        all.retain(|_, p| p.reports.back().is_some_and(|(at, _)| now.duration_since(*at) <= STATS_KEPT));
    }

    /// Calls between workloads (from or into those matching `identity`) over the last `window`.
    pub(crate) fn edges(&self, identity: &str, window: Duration) -> Vec<EdgeStat> {
        let edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        edges.window(glob(identity).as_ref(), window, Instant::now())
    }

    /// Each workload's last 15 minutes in 30 s steps.
    pub(crate) fn add_series(&self, workloads: &mut [WorkloadStat]) {
        let edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for w in workloads {
            w.series = edges.series(&w.identity, now);
        }
    }

    /// Per-workload traffic over the last `window`.
    pub(crate) fn stat(&self, identity: &str, window: Duration) -> Vec<WorkloadStat> {
        let filter = glob(identity);
        let all = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        #[derive(Default)]
        struct Sum {
            proxies: u32,
            requests: u64,
            failed: u64,
            refused: u64,
            rps: f64,
            buckets: Vec<u64>,
            bounds: Vec<f64>,
            span: f64,
            callers: Vec<CallerView>,
        }
        let mut by: HashMap<&str, Sum> = HashMap::new();
        for (key, p) in all.iter() {
            if filter.as_ref().is_some_and(|g| !g.matches(&p.identity)) {
                continue;
            }
            let Some((last_at, last)) = p.reports.back() else { continue };
            if now.duration_since(*last_at) > window {
                continue;
            }
            // The report at or just before the window's start (the first kept otherwise).
            let first = p
                .reports
                .iter()
                .rev()
                .find(|(at, _)| now.duration_since(*at) >= window)
                .or_else(|| p.reports.front())
                .filter(|(at, _)| at < last_at);
            let s = by.entry(p.identity.as_str()).or_default();
            s.proxies += 1;
            if !p.called.is_empty() {
                s.callers.push(CallerView {
                    proxy: proxy_name(key),
                    services: p.called.clone(),
                    age_seconds: now.duration_since(*last_at).as_secs_f64(),
                });
            }
            let Some((first_at, first)) = first else { continue };
            // Counters that went down: the sidecar restarted; count from zero.
            let restarted = last.status_classes.iter().zip(&first.status_classes).any(|(l, f)| l < f)
                || first.bounds_seconds != last.bounds_seconds;
            let zero = StatReport::default();
            let first = if restarted { &zero } else { first };
            let delta = |l: &[u64], f: &[u64], i: usize| {
                l.get(i).copied().unwrap_or(0).saturating_sub(f.get(i).copied().unwrap_or(0))
            };
            let requests: u64 = (0..5).map(|i| delta(&last.status_classes, &first.status_classes, i)).sum();
            let secs = last_at.duration_since(*first_at).as_secs_f64().max(0.001);
            s.requests += requests;
            s.failed += delta(&last.status_classes, &first.status_classes, 4);
            s.refused += last.refused.saturating_sub(first.refused);
            s.rps += requests as f64 / secs;
            s.span = s.span.max(secs);
            if s.buckets.is_empty() {
                s.buckets = vec![0; last.latency_buckets.len()];
                s.bounds = last.bounds_seconds.clone();
            }
            if s.bounds == last.bounds_seconds {
                for (i, b) in s.buckets.iter_mut().enumerate() {
                    *b += delta(&last.latency_buckets, &first.latency_buckets, i);
                }
            }
        }
        let mut out: Vec<WorkloadStat> = by
            .into_iter()
            .map(|(identity, mut s)| {
                s.callers.sort_by(|a, b| a.proxy.cmp(&b.proxy));
                let share = |n: u64| if s.requests == 0 { 0.0 } else { n as f64 / s.requests as f64 };
                let q = |q: f64| quantile(q, &s.buckets, &s.bounds) * 1e3;
                WorkloadStat {
                    identity: identity.to_string(),
                    proxies: s.proxies,
                    requests: s.requests,
                    rps: s.rps,
                    success_rate: if s.requests == 0 { 1.0 } else { 1.0 - share(s.failed) },
                    refused_rate: share(s.refused),
                    p50_ms: q(0.5),
                    p95_ms: q(0.95),
                    p99_ms: q(0.99),
                    window_seconds: s.span,
                    callers: s.callers,
                    series: Vec::new(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

/// A sidecar as `stat` names it: its inbound address (its key is
/// `<identity> <inbound address>`).
fn proxy_name(key: &str) -> String {
    match key.rsplit_once(' ') {
        Some((_, addr)) if !addr.is_empty() => addr.to_string(),
        _ => "(no inbound address)".to_string(),
    }
}

fn parse_line(json: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    if json.len() > MAX_LINE {
        return None;
    }
    match serde_json::from_str(json) {
        Ok(serde_json::Value::Object(m)) if m.get("decision").is_some_and(|d| d.is_string()) => Some(m),
        _ => None,
    }
}

/// The `q` quantile of a histogram (counts per bucket, the last +Inf),
/// interpolated within its bucket as Prometheus' histogram_quantile does.
pub(crate) fn quantile(q: f64, buckets: &[u64], bounds: &[f64]) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n > 0 && (seen + n) as f64 >= rank {
            let Some(upper) = bounds.get(i) else { return bounds.last().copied().unwrap_or(0.0) };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            return lower + (upper - lower) * ((rank - seen as f64) / *n as f64);
        }
        seen += n;
    }
    bounds.last().copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let bounds = [0.001, 0.01, 0.1];
        assert_eq!(quantile(0.5, &[0, 0, 0, 0], &bounds), 0.0);
        // 10 in (0, 1ms], 10 in (1ms, 10ms]: the median is at 1ms, p75 half way up the second.
        assert!((quantile(0.5, &[10, 10, 0, 0], &bounds) - 0.001).abs() < 1e-9);
        assert!((quantile(0.75, &[10, 10, 0, 0], &bounds) - 0.0055).abs() < 1e-9);
        // Beyond the last bound: the last bound.
        assert_eq!(quantile(0.99, &[0, 0, 0, 5], &bounds), 0.1);
    }

    #[test]
    fn stat_shows_each_callers_latest_view_of_its_endpoints() {
        use palisade_proto::v1::CalledEndpoint;
        let o = Observatory::new(Duration::from_secs(60), 1 << 20);
        let report = |requests: u64, endpoints: usize| StatReport {
            status_classes: vec![0, requests, 0, 0, 0],
            latency_buckets: vec![0, 0],
            bounds_seconds: vec![0.1],
            refused: 0,
            called: vec![CalledService {
                service: "orders.shop".into(),
                endpoints: (0..endpoints)
                    .map(|i| CalledEndpoint {
                        addr: format!("10.0.{}.{}:4143", i / 250, i % 250),
                        identity: "spiffe://td/ns/shop/sa/orders".into(),
                        requests,
                        latency_ms: Some(f64::NAN),
                        ..Default::default()
                    })
                    .collect(),
                retries: requests,
                ..Default::default()
            }],
            inbound_from: Vec::new(),
        };
        let web = "spiffe://td/ns/shop/sa/web";
        o.stats_report(web, &format!("{web} 10.1.0.5:4143"), report(1, 2));
        o.stats_report(web, &format!("{web} 10.1.0.5:4143"), report(7, 3));
        // A view past the bound is cut to it.
        o.stats_report(web, &format!("{web} 10.1.0.6:4143"), report(1, 300));
        let stats = o.stat("", Duration::from_secs(60));
        assert_eq!(stats.len(), 1);
        let callers = &stats[0].callers;
        assert_eq!(callers.iter().map(|c| c.proxy.as_str()).collect::<Vec<_>>(), ["10.1.0.5:4143", "10.1.0.6:4143"]);
        let latest = &callers[0].services[0];
        assert_eq!((latest.retries, latest.endpoints.len(), latest.endpoints[0].requests), (7, 3, 7));
        assert_eq!(latest.endpoints[0].latency_ms, None, "a latency that is not a number is dropped");
        let cut = &callers[1].services[0];
        assert_eq!((cut.endpoints.len(), cut.endpoints_omitted), (MAX_CALLED_ENDPOINTS, 300 - 256));
        // The history keeps counters only.
        let all = o.stats.lock().unwrap();
        assert!(all.values().all(|p| p.reports.iter().all(|(_, r)| r.called.is_empty())));
        drop(all);
        assert!(o.stat("spiffe://td/ns/other/*", Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn recorded_requests_are_kept_for_their_reporter_only() {
        let o = Observatory::new(Duration::from_secs(60), 1 << 20);
        let good = r#"{"from":"spiffe://td/ns/a/sa/b","method":"GET","path":"/","port":80}"#;
        let other =
            r#"{"from":"spiffe://td/ns/a/sa/b","to":"spiffe://td/ns/x/sa/other","method":"GET","path":"/","port":80}"#;
        o.record(
            "spiffe://td/ns/x/sa/me",
            &[
                RecordedRequest { sample_json: good.into(), count: 3 },
                RecordedRequest { sample_json: other.into(), count: 5 },
            ],
        );
        let (s, _) = o.samples();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].0.to.as_str(), s[0].1), ("spiffe://td/ns/x/sa/me", 3));
    }
}
