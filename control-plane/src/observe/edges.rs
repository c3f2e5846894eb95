//! The mesh graph's edges: each callee sidecar's per-caller counters (its
//! stats reports' `inbound_from`, counted since it started) turned into
//! deltas and summed per (caller, callee workload) in 30 s steps over the
//! last 15 minutes. Bounded: at most [`MAX_EDGES`] edges; a sidecar's
//! callers at most [`MAX_FROM`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use palisade_proto::v1::{EdgeStat, InboundFrom, StatPoint};
use wildmatch::WildMatch;

use super::quantile;

/// The length of a step.
pub(crate) const STEP: Duration = Duration::from_secs(30);
/// Steps kept: 15 minutes.
pub(crate) const STEPS: u64 = 30;
/// Edges kept, at most; a new edge past it is not counted.
const MAX_EDGES: usize = 50_000;
/// Callers kept from one report, at most (the sidecar sends 256, `""` and `*`).
pub(crate) const MAX_FROM: usize = 258;

/// Counts of one step.
#[derive(Clone, Default)]
struct Counts {
    classes: [u64; 5],
    refused: [u64; 4],
    /// Per latency bucket of the reports' bounds, then +Inf.
    buckets: Vec<u32>,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        for (a, b) in self.classes.iter_mut().zip(o.classes) {
            *a += b;
        }
        for (a, b) in self.refused.iter_mut().zip(o.refused) {
            *a += b;
        }
        if self.buckets.len() < o.buckets.len() {
            self.buckets.resize(o.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a = a.saturating_add(*b);
        }
    }

    fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }

    fn refused(&self) -> u64 {
        self.refused.iter().sum()
    }

    fn p99_ms(&self, bounds: &[f64]) -> f64 {
        let b: Vec<u64> = self.buckets.iter().map(|c| u64::from(*c)).collect();
        quantile(0.99, &b, bounds) * 1e3
    }
}

/// `cur - last` per counter; everything in `cur` when a counter went down
/// (the sidecar restarted) or the caller is new.
fn delta(cur: &InboundFrom, last: Option<&InboundFrom>) -> Counts {
    let restarted = last.is_none_or(|l| {
        l.status_classes.iter().zip(&cur.status_classes).any(|(l, c)| c < l)
            || l.refused.iter().zip(&cur.refused).any(|(l, c)| c < l)
            || l.latency_buckets.len() != cur.latency_buckets.len()
    });
    let d = |c: &[u64], l: Option<&[u64]>, i: usize| {
        let c = c.get(i).copied().unwrap_or(0);
        if restarted { c } else { c.saturating_sub(l.and_then(|l| l.get(i)).copied().unwrap_or(0)) }
    };
    let classes = last.map(|x| x.status_classes.as_slice());
    let refused = last.map(|x| x.refused.as_slice());
    let buckets = last.map(|x| x.latency_buckets.as_slice());
    Counts {
        classes: std::array::from_fn(|i| d(&cur.status_classes, classes, i)),
        refused: std::array::from_fn(|i| d(&cur.refused, refused, i)),
        buckets: (0..cur.latency_buckets.len())
            .map(|i| u32::try_from(d(&cur.latency_buckets, buckets, i)).unwrap_or(u32::MAX))
            .collect(),
    }
}

/// Whether a report's caller entry is well formed.
pub(crate) fn valid(f: &InboundFrom, buckets: usize) -> bool {
    f.status_classes.len() == 5
        && f.refused.len() == 4
        && f.latency_buckets.len() == buckets
        && f.caller.len() <= 2048
        && !f.caller.chars().any(char::is_control)
}

/// Every edge's steps.
pub(crate) struct Edges {
    start: Instant,
    /// (caller, callee) → (step number, counts), oldest first.
    steps: HashMap<(String, String), VecDeque<(u64, Counts)>>,
    bounds: Vec<f64>,
    /// The step [`Edges::expire`] last ran in.
    expired: Option<u64>,
}

impl Edges {
    pub(crate) fn new() -> Self {
        Self { start: Instant::now(), steps: HashMap::new(), bounds: Vec::new(), expired: None }
    }

    fn step(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_secs() / STEP.as_secs()
    }

    /// Adds what a callee sidecar counted since its last report (`last`:
    /// that report's callers; `None` for its first, which is only the base:
    /// a sidecar reports once as it connects).
    pub(crate) fn add(
        &mut self,
        callee: &str,
        cur: &[InboundFrom],
        last: Option<&[InboundFrom]>,
        bounds: &[f64],
        now: Instant,
    ) {
        let Some(last) = last else { return };
        if self.bounds != bounds {
            self.bounds = bounds.to_vec();
        }
        let step = self.step(now);
        for f in cur {
            let d = delta(f, last.iter().find(|p| p.caller == f.caller));
            if d.requests() == 0 && d.refused() == 0 {
                continue;
            }
            let key = (f.caller.clone(), callee.to_string());
            if !self.steps.contains_key(&key) && self.steps.len() >= MAX_EDGES {
                continue;
            }
            let q = self.steps.entry(key).or_default();
            match q.back_mut() {
                Some((s, c)) if *s == step => c.add(&d),
                _ => q.push_back((step, d)),
            }
        }
    }

    /// Drops steps older than 15 minutes, and edges left empty: once per
    /// step (sidecars' reports call it; 10,000 sidecars send 1,000 a second).
    pub(crate) fn expire(&mut self, now: Instant) {
        let step = self.step(now);
        if self.expired == Some(step) {
            return;
        }
        self.expired = Some(step);
        let oldest = step.saturating_sub(STEPS - 1);
        self.steps.retain(|_, q| {
            while q.front().is_some_and(|(s, _)| *s < oldest) {
                q.pop_front();
            }
            !q.is_empty()
        });
    }

    /// Edges from or into workloads matching `filter` over the last `window`.
    pub(crate) fn window(&self, filter: Option<&WildMatch>, window: Duration, now: Instant) -> Vec<EdgeStat> {
        let since = self.step(now.checked_sub(window).unwrap_or(self.start));
        let span = window.min(now.saturating_duration_since(self.start)).as_secs_f64().max(1.0);
        let mut out: Vec<EdgeStat> = self
            .steps
            .iter()
            .filter(|((from, to), _)| filter.is_none_or(|g| g.matches(to) || g.matches(from)))
            .filter_map(|((from, to), q)| {
                let mut sum = Counts::default();
                q.iter().filter(|(s, _)| *s >= since).for_each(|(_, c)| sum.add(c));
                let requests = sum.requests();
                (requests > 0 || sum.refused() > 0).then(|| EdgeStat {
                    from: from.clone(),
                    to: to.clone(),
                    requests,
                    rps: requests as f64 / span,
                    success_rate: if requests == 0 { 1.0 } else { 1.0 - sum.classes[4] as f64 / requests as f64 },
                    p99_ms: sum.p99_ms(&self.bounds),
                    denied: sum.refused[0],
                    unauthenticated: sum.refused[1],
                    invalid: sum.refused[2],
                    rate_limited: sum.refused[3],
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.to, &a.from).cmp(&(&b.to, &b.from)));
        out
    }

    /// One workload's inbound requests in 30 s steps over the last 15
    /// minutes, oldest first.
    pub(crate) fn series(&self, workload: &str, now: Instant) -> Vec<StatPoint> {
        let last = self.step(now);
        let first = last.saturating_sub(STEPS - 1);
        let mut sums = vec![Counts::default(); usize::try_from(last - first + 1).unwrap_or(0)];
        for ((_, to), q) in &self.steps {
            if to != workload {
                continue;
            }
            for (s, c) in q.iter().filter(|(s, _)| *s >= first) {
                if let Some(sum) = usize::try_from(s - first).ok().and_then(|i| sums.get_mut(i)) {
                    sum.add(c);
                }
            }
        }
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        sums.iter()
            .enumerate()
            .map(|(i, c)| {
                let begins = (first + i as u64) as f64 * STEP.as_secs_f64();
                // The current step has lasted only until now.
                let secs = (elapsed - begins).clamp(1.0, STEP.as_secs_f64());
                let requests = c.requests();
                StatPoint {
                    ago_seconds: elapsed - begins,
                    requests,
                    rps: requests as f64 / secs,
                    success_rate: if requests == 0 { 1.0 } else { 1.0 - c.classes[4] as f64 / requests as f64 },
                    refused_rate: if requests == 0 { 0.0 } else { c.refused() as f64 / requests as f64 },
                    p99_ms: c.p99_ms(&self.bounds),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(caller: &str, ok: u64, failed: u64, denied: u64) -> InboundFrom {
        let mut buckets = vec![0; 3];
        buckets[1] = ok + failed;
        InboundFrom {
            caller: caller.into(),
            status_classes: vec![0, ok, 0, denied, failed],
            refused: vec![denied, 0, 0, 0],
            latency_buckets: buckets,
        }
    }

    #[test]
    fn reports_become_edges_and_series_and_restarts_count_from_zero() {
        let mut e = Edges::new();
        let t0 = e.start;
        let bounds = [0.001, 0.01];
        let callee = "spiffe://td/ns/shop/sa/orders";
        let r1 = vec![from("spiffe://td/ns/shop/sa/web", 10, 0, 0)];
        e.add(callee, &r1, None, &bounds, t0);
        assert!(e.window(None, Duration::from_secs(60), t0).is_empty(), "a first report is the base");
        let r2 = vec![from("spiffe://td/ns/shop/sa/web", 100, 10, 5), from("", 3, 0, 3)];
        e.add(callee, &r2, Some(&r1), &bounds, t0 + Duration::from_secs(10));
        let w = e.window(None, Duration::from_secs(60), t0 + Duration::from_secs(20));
        assert_eq!(w.len(), 2, "{w:?}");
        let web = w.iter().find(|x| x.from.ends_with("/web")).unwrap();
        assert_eq!((web.requests, web.denied), (100 + 10 + 5 - 10, 5));
        assert!((web.success_rate - (1.0 - 10.0 / 105.0)).abs() < 1e-9);
        assert!(web.p99_ms > 1.0 && web.p99_ms <= 10.0, "{}", web.p99_ms);
        let plain = w.iter().find(|x| x.from.is_empty()).unwrap();
        assert_eq!((plain.requests, plain.denied), (6, 3), "a first sight of a caller counts whole");
        // The sidecar restarted: its counters went down.
        let r3 = vec![from("spiffe://td/ns/shop/sa/web", 4, 0, 0)];
        e.add(callee, &r3, Some(&r2), &bounds, t0 + Duration::from_secs(40));
        let s = e.series(callee, t0 + Duration::from_secs(45));
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].requests, 105 + 6);
        assert_eq!(s[1].requests, 4);
        assert!((s[0].refused_rate - 8.0 / 111.0).abs() < 1e-9);
        // Fifteen minutes later it is gone.
        let later = t0 + Duration::from_secs(16 * 60);
        e.expire(later);
        assert!(e.window(None, Duration::from_secs(600), later).is_empty());
        assert!(e.series(callee, later).iter().all(|p| p.requests == 0));
    }

    #[test]
    fn malformed_callers_are_refused() {
        assert!(valid(&from("spiffe://a", 1, 0, 0), 3));
        assert!(!valid(&from("spiffe://a\n", 1, 0, 0), 3));
        assert!(!valid(&from("spiffe://a", 1, 0, 0), 4));
        let mut f = from("x", 1, 0, 0);
        f.refused.push(1);
        assert!(!valid(&f, 3));
    }
}
