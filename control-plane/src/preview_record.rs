//! The record `policy preview` judges: request samples the sidecars
//! report, kept for `--preview-window`, per reporting identity.
//!
//! A report comes from a workload certificate, so a compromised workload can
//! send anything. The record therefore
//!
//! - keeps only samples of requests *to* the reporter (a sample naming
//!   another callee is refused and counted, never re-labelled);
//! - shares the space fairly: when full (entries or bytes), the identity
//!   holding the most gives up its oldest samples, so a flood displaces only
//!   the flooder's own, and an identity within its fair share keeps all of its;
//! - caps its memory (`--preview-memory-mib`, counted as the samples' JSON
//!   size plus a fixed overhead each) and shows it in
//!   `palisade_cp_preview_samples` and `palisade_cp_preview_sample_bytes`.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use palisade_policy::preview::Sample;
use palisade_proto::v1::RecordedRequest;

/// Samples kept, at most (entries).
pub(crate) const MAX_SAMPLES: usize = 100_000;
/// Records taken from one report message, at most.
const MAX_PER_MESSAGE: usize = 1024;
/// What an entry costs beside its JSON (the struct, the queue slot).
const ENTRY_OVERHEAD: usize = 160;

struct Entry {
    at: Instant,
    /// The sample's shape, keyed-hashed once: previews merge by it without
    /// serialising every sample again.
    shape: u64,
    sample: Sample,
    count: u64,
    bytes: usize,
}

#[derive(Default)]
struct Share {
    entries: VecDeque<Entry>,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    shares: HashMap<String, Share>,
    entries: usize,
    bytes: usize,
}

impl Inner {
    fn pop_oldest(&mut self, identity: &str) -> bool {
        let Some(share) = self.shares.get_mut(identity) else { return false };
        let Some(e) = share.entries.pop_front() else { return false };
        share.bytes -= e.bytes;
        self.entries -= 1;
        self.bytes -= e.bytes;
        true
    }
}

/// Recorded request samples, per reporting identity, bounded.
pub(crate) struct PreviewRecord {
    window: Duration,
    max_bytes: usize,
    max_entries: usize,
    hasher: std::hash::RandomState,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PreviewRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviewRecord").field("window", &self.window).field("max_bytes", &self.max_bytes).finish()
    }
}

/// How a report's samples fared.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub(crate) kept: usize,
    /// Malformed, oversized, or about another callee.
    pub(crate) refused: usize,
}

impl PreviewRecord {
    pub(crate) fn new(window: Duration, max_bytes: usize) -> Self {
        Self::with_limits(window, max_bytes, MAX_SAMPLES)
    }

    fn with_limits(window: Duration, max_bytes: usize, max_entries: usize) -> Self {
        Self {
            window,
            max_bytes: max_bytes.max(1),
            max_entries: max_entries.max(1),
            hasher: std::hash::RandomState::new(),
            inner: Mutex::default(),
        }
    }

    /// Keeps the samples a sidecar of `identity` reported.
    pub(crate) fn record(&self, identity: &str, recorded: &[RecordedRequest]) -> Recorded {
        self.record_at(identity, recorded, Instant::now())
    }

    fn record_at(&self, identity: &str, recorded: &[RecordedRequest], now: Instant) -> Recorded {
        let mut out = Recorded::default();
        let mut fresh = Vec::new();
        for r in recorded.iter().take(MAX_PER_MESSAGE) {
            match parse(identity, r) {
                Some(s) => {
                    let shape = self.hasher.hash_one(serde_json::to_string(&s).unwrap_or_default());
                    fresh.push(Entry { at: now, shape, sample: s, count: r.count.min(1 << 32), bytes: cost(r) });
                }
                None => out.refused += 1,
            }
        }
        out.refused += recorded.len().saturating_sub(MAX_PER_MESSAGE);
        out.kept = fresh.len();
        if out.refused > 0 {
            crate::metrics::METRICS.preview_samples_refused.inc_by(out.refused as u64);
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !fresh.is_empty() {
            let inner = &mut *inner;
            let share = inner.shares.entry(identity.to_string()).or_default();
            for e in fresh {
                share.bytes += e.bytes;
                inner.bytes += e.bytes;
                inner.entries += 1;
                share.entries.push_back(e);
            }
        }
        self.expire(&mut inner, now);
        self.evict(&mut inner);
        crate::metrics::METRICS.preview_samples.set(inner.entries as i64);
        crate::metrics::METRICS.preview_sample_bytes.set(inner.bytes as i64);
        out
    }

    /// Drops what is older than the window.
    fn expire(&self, inner: &mut Inner, now: Instant) {
        let old: Vec<String> = inner
            .shares
            .iter()
            .filter(|(_, s)| s.entries.front().is_some_and(|e| now.duration_since(e.at) > self.window))
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            while inner.shares[&id].entries.front().is_some_and(|e| now.duration_since(e.at) > self.window) {
                inner.pop_oldest(&id);
            }
        }
        inner.shares.retain(|_, s| !s.entries.is_empty());
    }

    /// While over a limit, the identity holding the most gives up its oldest.
    fn evict(&self, inner: &mut Inner) {
        loop {
            let by_bytes = inner.bytes > self.max_bytes;
            if !by_bytes && inner.entries <= self.max_entries {
                break;
            }
            let size = |s: &Share| if by_bytes { s.bytes } else { s.entries.len() };
            // The largest share, and the next largest: evict from the first
            // down to the second (or until within the limits) in one go.
            let (mut top, mut top_size, mut second) = (None::<&String>, 0, 0);
            for (id, s) in &inner.shares {
                let n = size(s);
                if n > top_size {
                    second = top_size;
                    (top, top_size) = (Some(id), n);
                } else if n > second {
                    second = n;
                }
            }
            let Some(top) = top.cloned() else { break };
            // At least one goes each round, so the loop ends.
            if !inner.pop_oldest(&top) {
                break;
            }
            loop {
                let over = if by_bytes { inner.bytes > self.max_bytes } else { inner.entries > self.max_entries };
                if !over || inner.shares.get(&top).map_or(0, size) <= second || !inner.pop_oldest(&top) {
                    break;
                }
            }
            if inner.shares.get(&top).is_some_and(|s| s.entries.is_empty()) {
                inner.shares.remove(&top);
            }
        }
    }

    /// The samples of the window, merged by shape, and how far back they go.
    pub(crate) fn samples(&self) -> (Vec<(Sample, u64)>, Duration) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut merged: HashMap<u64, (Sample, u64)> = HashMap::new();
        let mut oldest = now;
        for e in inner.shares.values().flat_map(|s| &s.entries).filter(|e| now.duration_since(e.at) <= self.window) {
            oldest = oldest.min(e.at);
            merged.entry(e.shape).or_insert_with(|| (e.sample.clone(), 0)).1 += e.count;
        }
        (merged.into_values().collect(), now.duration_since(oldest))
    }
}

/// What a sample costs in the record.
fn cost(r: &RecordedRequest) -> usize {
    r.sample_json.len() + ENTRY_OVERHEAD
}

/// A well-formed sample of a request to `identity`.
fn parse(identity: &str, r: &RecordedRequest) -> Option<Sample> {
    if r.sample_json.len() > palisade_policy::preview::limits::SAMPLE || r.count == 0 {
        return None;
    }
    let mut s = serde_json::from_str::<Sample>(&r.sample_json).ok()?;
    s.check().ok()?;
    // A sidecar sees requests to itself only: the callee is its certificate's.
    if !s.to.is_empty() && s.to != identity {
        return None;
    }
    s.to = identity.to_string();
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "spiffe://td/ns/x/sa/me";
    const FLOOD: &str = "spiffe://td/ns/x/sa/flood";

    fn sample(path: &str, to: &str) -> RecordedRequest {
        let to = if to.is_empty() { String::new() } else { format!(r#""to":"{to}","#) };
        RecordedRequest {
            sample_json: format!(r#"{{"from":"spiffe://td/ns/a/sa/b",{to}"method":"GET","path":"{path}","port":80}}"#),
            count: 1,
        }
    }

    #[test]
    fn samples_about_another_callee_are_refused_not_relabelled() {
        let r = PreviewRecord::new(Duration::from_secs(60), 1 << 20);
        let got = r.record(
            ME,
            &[
                sample("/a", ""),
                sample("/b", ME),
                sample("/c", "spiffe://td/ns/x/sa/other"),
                RecordedRequest { sample_json: r#"{"method":"GET","path":"/","port":1,"body":"x"}"#.into(), count: 1 },
                RecordedRequest { sample_json: "not json".into(), count: 1 },
                RecordedRequest { count: 0, ..sample("/d", "") },
            ],
        );
        assert_eq!(got, Recorded { kept: 2, refused: 4 });
        let (s, _) = r.samples();
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|(s, n)| s.to == ME && *n == 1 && s.path != "/c"));
    }

    #[test]
    fn a_flood_displaces_only_the_flooders_own_samples() {
        let r = PreviewRecord::with_limits(Duration::from_secs(60), usize::MAX, 100);
        let mine: Vec<_> = (0..20).map(|i| sample(&format!("/mine/{i}"), "")).collect();
        r.record(ME, &mine);
        for round in 0..50 {
            let flood: Vec<_> = (0..64).map(|i| sample(&format!("/flood/{round}/{i}"), "")).collect();
            r.record(FLOOD, &flood);
        }
        let (s, _) = r.samples();
        assert_eq!(s.len(), 100, "the record stays full, no more");
        assert_eq!(s.iter().filter(|(s, _)| s.to == ME).count(), 20, "within its fair share: all kept");
        // Two flooders split what is left; `me` keeps its 20 still.
        let other = "spiffe://td/ns/x/sa/other";
        for round in 0..10 {
            let flood: Vec<_> = (0..64).map(|i| sample(&format!("/o/{round}/{i}"), "")).collect();
            r.record(other, &flood);
        }
        let (s, _) = r.samples();
        let count = |id: &str| s.iter().filter(|(s, _)| s.to == id).count();
        assert_eq!(count(ME), 20);
        assert!(count(FLOOD).abs_diff(count(other)) <= 1, "{} vs {}", count(FLOOD), count(other));
    }

    #[test]
    fn memory_is_capped_and_counted() {
        let cap = 64 * 1024;
        let r = PreviewRecord::new(Duration::from_secs(60), cap);
        let pad = "p".repeat(1500);
        let big: Vec<_> = (0..200).map(|i| sample(&format!("/{pad}/{i}"), "")).collect();
        r.record(FLOOD, &big);
        r.record(ME, &[sample("/small", "")]);
        let inner = r.inner.lock().unwrap();
        assert!(inner.bytes <= cap, "{} bytes held", inner.bytes);
        assert_eq!(inner.bytes, inner.shares.values().map(|s| s.bytes).sum::<usize>());
        assert_eq!(inner.shares[ME].entries.len(), 1, "the small reporter is not displaced");
    }

    #[test]
    fn samples_leave_with_the_window() {
        let r = PreviewRecord::new(Duration::from_secs(60), 1 << 20);
        let t0 = Instant::now();
        r.record_at(ME, &[sample("/old", "")], t0);
        r.record_at(FLOOD, &[sample("/new", "")], t0 + Duration::from_secs(61));
        let inner = r.inner.lock().unwrap();
        assert!(!inner.shares.contains_key(ME));
        assert_eq!(inner.entries, 1);
    }
}
