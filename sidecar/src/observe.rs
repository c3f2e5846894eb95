//! What the sidecar tells the control plane about its traffic, on the
//! config stream ([`crate::control`]):
//!
//! - **taps** (`palisadectl tap`): the control plane sends the taps that
//!   select this workload; the access-log line of each inbound request that
//!   matches one goes up, at most [`TAP_RATE`] a second per tap, through a
//!   bounded queue (what does not fit is dropped, counted, and reported
//!   per tap within a second). Off unless a
//!   tap runs; the taps end with the stream.
//! - **recorded requests** (`palisadectl policy preview`): up to
//!   `--preview-record-rate` requests a second, as authorization saw them
//!   ([`Sample`]: no body, no credential), counted by shape and sent every
//!   `--report-interval`.
//! - **stats** (`palisadectl stat`): the inbound counters, and the
//!   balancer's view of the services this sidecar calls (bounded), every
//!   `--report-interval`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use palisade_policy::preview::Sample;
use palisade_proto::v1::{CalledEndpoint, CalledService, RecordedRequest, StatReport, TapRecord, TapSpec};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use wildmatch::WildMatch;

/// Tap events one sidecar sends per tap per second, at most.
pub const TAP_RATE: u32 = 100;
/// Tap events waiting for the stream, at most.
const QUEUE: usize = 256;
/// Request shapes held between two reports, at most.
const SHAPES: usize = 1024;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The metrics of taps and recording.
#[derive(Debug, Default)]
pub struct ObserveMetrics {
    taps: Gauge,
    tap_events: Family<ResultLabels, Counter>,
    samples: Family<ResultLabels, Counter>,
}

impl ObserveMetrics {
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register("taps_active", "Taps (palisadectl tap) running on this sidecar", self.taps.clone());
        reg.register(
            "tap_events",
            "Requests sent to taps, by result: sent, dropped (over the rate or the queue)",
            self.tap_events.clone(),
        );
        reg.register(
            "preview_samples",
            "Requests recorded for policy previews, by result: recorded, dropped (over the size limits or the shape budget)",
            self.samples.clone(),
        );
    }
}

struct Tap {
    id: u64,
    from: Option<WildMatch>,
    path: Option<WildMatch>,
    decision: String,
    /// Events in the current second, and which second.
    second: AtomicU64,
    sent: AtomicU32,
    /// Lines dropped since the last one sent.
    dropped: AtomicU64,
}

impl Tap {
    fn matches(&self, line: &Line<'_>) -> bool {
        let from_ok = self.from.as_ref().is_none_or(|g| line.caller.is_some_and(|c| g.matches(c)));
        let path_ok = self.path.as_ref().is_none_or(|g| line.path.is_some_and(|p| g.matches(p)));
        from_ok && path_ok && palisade_policy::preview::decision_matches(&self.decision, line.decision)
    }

    /// Whether one more event fits this second.
    fn admit(&self, now: u64) -> bool {
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.sent.store(0, Ordering::Relaxed);
        }
        self.sent.fetch_add(1, Ordering::Relaxed) < TAP_RATE
    }
}

/// What a tap filters on, of a finished request.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    pub caller: Option<&'a str>,
    pub path: Option<&'a str>,
    pub decision: &'a str,
}

/// Taps, recording and stats of one sidecar.
pub struct Observe {
    start: Instant,
    taps: RwLock<Arc<[Tap]>>,
    tapping: AtomicBool,
    /// Whether a tap may want allowed requests (not only refusals).
    allowed_tapped: AtomicBool,
    queue: Mutex<Vec<TapRecord>>,
    pub wake: tokio::sync::Notify,
    record_rate: u32,
    second: AtomicU64,
    recorded_this_second: AtomicU32,
    shapes: Mutex<HashMap<String, u64>>,
    pub metrics: ObserveMetrics,
}

impl std::fmt::Debug for Observe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe")
            .field("tapping", &self.tapping)
            .field("record_rate", &self.record_rate)
            .finish_non_exhaustive()
    }
}

impl Observe {
    pub fn new(record_rate: u32) -> Self {
        Self {
            start: Instant::now(),
            taps: RwLock::new(Arc::from(Vec::new())),
            tapping: AtomicBool::new(false),
            allowed_tapped: AtomicBool::new(false),
            queue: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            record_rate,
            second: AtomicU64::new(0),
            recorded_this_second: AtomicU32::new(0),
            shapes: Mutex::default(),
            metrics: ObserveMetrics::default(),
        }
    }

    /// Whether any tap runs (one load: the data path asks on every request).
    pub fn tapping(&self) -> bool {
        self.tapping.load(Ordering::Relaxed)
    }

    /// Whether a running tap may want allowed requests; when none does
    /// (a tap of refusals, as `palisadectl dashboard` holds), an allowed
    /// request's line is never made.
    pub fn taps_allowed(&self) -> bool {
        self.allowed_tapped.load(Ordering::Relaxed)
    }

    /// Replaces the taps (an empty list ends them all).
    pub fn set_taps(&self, specs: &[TapSpec]) {
        let glob = |s: &str| (!s.is_empty()).then(|| WildMatch::new(s));
        let taps: Vec<Tap> = specs
            .iter()
            .map(|s| Tap {
                id: s.id,
                from: glob(&s.from),
                path: glob(&s.path),
                decision: s.decision.clone(),
                second: AtomicU64::new(0),
                sent: AtomicU32::new(0),
                dropped: AtomicU64::new(0),
            })
            .collect();
        let ids: Vec<u64> = taps.iter().map(|t| t.id).collect();
        let changed = {
            let current = self.taps.read().unwrap_or_else(|p| p.into_inner());
            current.iter().map(|t| t.id).collect::<Vec<_>>() != ids
        };
        if !changed {
            return;
        }
        if !ids.is_empty() {
            tracing::info!(taps = ?ids, "tap started: requests matching it are reported to the control plane");
        } else {
            tracing::info!("no tap runs");
        }
        self.metrics.taps.set(taps.len() as i64);
        let allowed = taps.iter().any(|t| palisade_policy::preview::decision_matches(&t.decision, "allow"));
        self.allowed_tapped.store(allowed, Ordering::Relaxed);
        self.tapping.store(!taps.is_empty(), Ordering::Relaxed);
        *self.taps.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(taps);
        if ids.is_empty() {
            self.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Offers a finished request to the taps; `json` makes its line, once,
    /// if some tap wants it.
    pub fn offer(&self, line: Line<'_>, json: impl FnOnce() -> String) {
        self.offer_at(self.start.elapsed().as_secs(), line, json);
    }

    /// [`Observe::offer`] in second `now` of the sidecar's life.
    fn offer_at(&self, now: u64, line: Line<'_>, json: impl FnOnce() -> String) {
        let taps = self.taps.read().unwrap_or_else(|p| p.into_inner()).clone();
        let dropped = |n: u64| self.metrics.tap_events.get_or_create(&ResultLabels { result: "dropped" }).inc_by(n);
        let mut admitted: Vec<&Tap> = Vec::new();
        for t in taps.iter().filter(|t| t.matches(&line)) {
            if t.admit(now) {
                admitted.push(t);
            } else {
                t.dropped.fetch_add(1, Ordering::Relaxed);
                dropped(1);
            }
        }
        if admitted.is_empty() {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= QUEUE {
            for t in &admitted {
                t.dropped.fetch_add(1, Ordering::Relaxed);
            }
            dropped(1);
            return;
        }
        // Drops go up per tap on their own ([`Observe::take_drops`]).
        q.push(TapRecord { tap_ids: admitted.iter().map(|t| t.id).collect(), json: json(), dropped: 0 });
        drop(q);
        self.metrics.tap_events.get_or_create(&ResultLabels { result: "sent" }).inc();
        self.wake.notify_one();
    }

    /// Drops not yet reported, each tap's in a record of its own (without a line).
    pub fn take_drops(&self) -> Vec<TapRecord> {
        let taps = self.taps.read().unwrap_or_else(|p| p.into_inner()).clone();
        taps.iter()
            .filter_map(|t| {
                let n = t.dropped.swap(0, Ordering::Relaxed);
                (n > 0).then(|| TapRecord { tap_ids: vec![t.id], json: String::new(), dropped: n })
            })
            .collect()
    }

    /// The tap events waiting.
    pub fn take_events(&self) -> Vec<TapRecord> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether this request is recorded (`--preview-record-rate`).
    pub fn recording(&self) -> bool {
        if self.record_rate == 0 {
            return false;
        }
        let now = self.start.elapsed().as_secs();
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.recorded_this_second.store(0, Ordering::Relaxed);
        }
        self.recorded_this_second.fetch_add(1, Ordering::Relaxed) < self.record_rate
    }

    /// Records a request's sample.
    pub fn record(&self, sample: &Sample) {
        let label = |result| ResultLabels { result };
        let json = match sample.check() {
            Ok(()) => {
                serde_json::to_string(sample).ok().filter(|j| j.len() <= palisade_policy::preview::limits::SAMPLE)
            }
            Err(_) => None,
        };
        let kept = json.is_some_and(|json| {
            let mut shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
            let full = shapes.len() >= SHAPES;
            match shapes.get_mut(&json) {
                Some(n) => {
                    *n += 1;
                    true
                }
                None if !full => {
                    shapes.insert(json, 1);
                    true
                }
                None => false,
            }
        });
        self.metrics.samples.get_or_create(&label(if kept { "recorded" } else { "dropped" })).inc();
    }

    /// The shapes recorded since the last call.
    pub fn take_recorded(&self) -> Vec<RecordedRequest> {
        let shapes = std::mem::take(&mut *self.shapes.lock().unwrap_or_else(|p| p.into_inner()));
        shapes.into_iter().map(|(sample_json, count)| RecordedRequest { sample_json, count }).collect()
    }
}

/// The inbound counters and the balancer's view of the called services
/// (bounded), for `palisadectl stat`.
pub fn stat_report(m: &crate::metrics::Metrics, balancer: &crate::balance::Balancer) -> StatReport {
    let (classes, buckets, bounds) = m.inbound_stats();
    StatReport {
        status_classes: classes,
        latency_buckets: buckets,
        bounds_seconds: bounds,
        refused: m.refused.get(),
        called: called(balancer.snapshot()),
        inbound_from: m.callers.report(),
    }
}

/// Services in a report, at most (the control plane drops reports beyond).
pub const REPORT_SERVICES: usize = 64;
/// Endpoints in a report, at most, all services together.
pub const REPORT_ENDPOINTS: usize = 256;

/// A balancer snapshot as a report carries it: at most [`REPORT_SERVICES`]
/// services and [`REPORT_ENDPOINTS`] endpoints (services in name order;
/// a service's endpoints cut by the bound are counted in `endpoints_omitted`).
fn called(snapshot: Vec<crate::balance::ServiceSnapshot>) -> Vec<CalledService> {
    let full: Vec<usize> = snapshot.iter().take(REPORT_SERVICES).map(|s| s.endpoints.len()).collect();
    let (kept, _) = crate::metrics::balance::bounded(snapshot, REPORT_SERVICES, REPORT_ENDPOINTS);
    kept.into_iter()
        .zip(full)
        .map(|(s, n)| CalledService {
            endpoints_omitted: u32::try_from(n - s.endpoints.len()).unwrap_or(u32::MAX),
            service: s.service,
            endpoints: s
                .endpoints
                .into_iter()
                .map(|e| CalledEndpoint {
                    addr: e.addr.to_string(),
                    identity: e.identity,
                    in_flight: e.in_flight,
                    latency_ms: e.latency_ms,
                    ejected_for_ms: e.ejected_for_ms,
                    ejections: e.ejections,
                    requests: e.requests,
                    failures: e.failures,
                })
                .collect(),
            retries: s.retries,
            retries_refused: s.retries_refused,
            budget_left: s.budget.left,
            budget_requests: s.budget.requests,
            budget_retries: s.budget.retries,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: u64, from: &str, path: &str, decision: &str) -> TapSpec {
        TapSpec { id, from: from.into(), path: path.into(), decision: decision.into() }
    }

    #[test]
    fn only_taps_of_refusals_spare_allowed_requests_their_line() {
        let o = Observe::new(0);
        o.set_taps(&[spec(1, "", "", "deny"), spec(2, "", "", "rate_limited")]);
        assert!(o.tapping() && !o.taps_allowed());
        for wants_allowed in ["", "allow"] {
            o.set_taps(&[spec(1, "", "", "deny"), spec(3, "", "", wants_allowed)]);
            assert!(o.taps_allowed(), "{wants_allowed:?}");
        }
        o.set_taps(&[]);
        assert!(!o.tapping() && !o.taps_allowed());
    }

    #[test]
    fn taps_filter_and_are_bounded_per_second() {
        let o = Observe::new(0);
        assert!(!o.tapping());
        o.set_taps(&[spec(1, "spiffe://td/ns/a/*", "/api/*", "deny"), spec(2, "", "", "")]);
        assert!(o.tapping());
        let line = |caller, path, decision| Line { caller, path, decision };
        o.offer_at(0, line(Some("spiffe://td/ns/a/sa/x"), Some("/api/v"), "rate_limited"), || "a".into());
        o.offer_at(0, line(Some("spiffe://td/ns/b/sa/x"), Some("/api/v"), "deny"), || "b".into());
        o.offer_at(0, line(None, Some("/api/v"), "deny"), || "c".into());
        let ev = o.take_events();
        assert_eq!(
            ev.iter().map(|e| (e.json.as_str(), e.tap_ids.clone())).collect::<Vec<_>>(),
            vec![("a", vec![1, 2]), ("b", vec![2]), ("c", vec![2])]
        );
        // Tap 2 had 3 this second: 97 more fit; the next second, 100 again.
        for _ in 0..(TAP_RATE + 50) {
            o.offer_at(0, line(None, None, "allow"), || "x".into());
        }
        assert_eq!(o.take_events().len() as u32, TAP_RATE - 3);
        for _ in 0..(TAP_RATE + 50) {
            o.offer_at(1, line(None, None, "allow"), || "x".into());
        }
        let events = o.take_events();
        assert_eq!(events.len() as u32, TAP_RATE);
        assert!(events.iter().all(|e| e.dropped == 0));
        // Drops go up per tap, on their own: 53 in second 0, 50 in second 1.
        let drops = o.take_drops();
        assert_eq!(
            (drops.len(), drops[0].tap_ids.clone(), drops[0].dropped, drops[0].json.as_str()),
            (1, vec![2], 103, "")
        );
        assert!(o.take_drops().is_empty());
        o.set_taps(&[]);
        assert!(!o.tapping());
    }

    #[test]
    fn a_report_carries_the_called_services_bounded() {
        use crate::balance::{Balancer, Mode};
        let b = Balancer::new(Mode::PeakEwma);
        let cfg = palisade_policy::resilience::Balancing::default();
        let id: palisade_certs::spiffe::SpiffeId = "spiffe://td/ns/shop/sa/orders".parse().expect("id");
        let peers = |n: usize, base: usize| -> Vec<crate::proxy::peer::Peer> {
            (0..n)
                .map(|i| crate::proxy::peer::Peer {
                    addr: format!("10.0.{base}.{}:4143", i + 1).parse().expect("addr"),
                    identity: id.clone(),
                })
                .collect()
        };
        let orders = b.service("orders");
        let ps = peers(2, 0);
        let (ep, _) = b.pick(&orders, &ps, 1, &cfg, Some(ps[1].addr));
        let f = b.start(&orders, ep.expect("an endpoint"));
        b.finish(f, crate::balance::Outcome::Success, &cfg);
        orders.retries.fetch_add(4, Ordering::Relaxed);
        let m = crate::metrics::Metrics::default();
        let r = stat_report(&m, &b);
        assert_eq!(r.called.len(), 1);
        let c = &r.called[0];
        assert_eq!((c.service.as_str(), c.retries, c.endpoints.len(), c.endpoints_omitted), ("orders", 4, 2, 0));
        let e = &c.endpoints[0];
        assert_eq!(
            (e.addr.as_str(), e.identity.as_str(), e.requests, e.failures),
            ("10.0.0.1:4143", id.to_string().as_str(), 1, 0)
        );
        assert!(
            e.latency_ms.is_some() && c.endpoints[1].latency_ms.is_none(),
            "only the one that answered has a latency"
        );
        assert_eq!(c.budget_requests, 0, "no call went through the budget");

        // Past the bound: the endpoints that do not fit are counted, services beyond dropped.
        for n in 0..REPORT_SERVICES + 5 {
            let s = b.service(&format!("svc{n:03}"));
            let _ = b.pick(&s, &peers(10, n % 200 + 1), 1, &cfg, None);
        }
        let r = stat_report(&m, &b);
        assert_eq!(r.called.len(), REPORT_SERVICES);
        let sent: usize = r.called.iter().map(|c| c.endpoints.len()).sum();
        assert_eq!(sent, REPORT_ENDPOINTS);
        assert!(r.called.iter().any(|c| c.endpoints_omitted == 10), "a service cut off entirely says so");
    }

    #[test]
    fn recording_counts_shapes_within_budget() {
        let o = Observe::new(3);
        assert_eq!((0..10).filter(|_| o.recording()).count(), 3);
        let s = Sample { method: "GET".into(), path: "/a".into(), port: 80, ..Default::default() };
        o.record(&s);
        o.record(&s);
        o.record(&Sample { path: "no-slash".into(), ..s.clone() });
        let r = o.take_recorded();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].count, 2);
        assert!(o.take_recorded().is_empty());
    }
}
