//! Inbound requests counted per caller, for the mesh graph's edges: each
//! connection resolves its caller's counters once, so a request costs a few
//! atomic adds. At most [`MAX_CALLERS`] callers are told apart; later ones
//! share the `*` entry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use palisade_policy::Refused;
use palisade_proto::v1::InboundFrom;

/// Callers told apart, at most (a report carries no more, plus `""` and `*`).
pub const MAX_CALLERS: usize = 256;

/// One caller's inbound requests since the sidecar started.
#[derive(Debug, Default)]
pub struct FromCounts {
    classes: [AtomicU64; 5],
    /// deny, unauthenticated, invalid, rate_limited.
    refused: [AtomicU64; 4],
    buckets: [AtomicU64; super::LATENCY_BUCKETS.len() + 1],
}

impl FromCounts {
    pub(super) fn answered(&self, class: usize, bucket: usize) {
        self.classes[class].fetch_add(1, Relaxed);
        self.buckets[bucket].fetch_add(1, Relaxed);
    }

    /// A request the sidecar refused itself (not ready is not a refusal by policy).
    pub fn refused(&self, kind: Refused) {
        let i = match kind {
            Refused::Forbidden => 0,
            Refused::Unauthenticated => 1,
            Refused::Invalid => 2,
            Refused::RateLimited => 3,
            _ => return,
        };
        self.refused[i].fetch_add(1, Relaxed);
    }

    fn report(&self, caller: &str) -> Option<InboundFrom> {
        let load = |a: &[AtomicU64]| a.iter().map(|c| c.load(Relaxed)).collect::<Vec<u64>>();
        let status_classes = load(&self.classes);
        let refused = load(&self.refused);
        if status_classes.iter().all(|c| *c == 0) && refused.iter().all(|c| *c == 0) {
            return None;
        }
        Some(InboundFrom { caller: caller.to_string(), status_classes, refused, latency_buckets: load(&self.buckets) })
    }
}

/// Every caller's counters.
#[derive(Debug, Default)]
pub struct Callers {
    by_id: RwLock<HashMap<Arc<str>, Arc<FromCounts>, crate::directory::Fast>>,
    /// Callers without mTLS (the pod's own app, or a plaintext port).
    pub plaintext: Arc<FromCounts>,
    /// Callers past [`MAX_CALLERS`].
    overflow: Arc<FromCounts>,
}

impl Callers {
    /// The counters of a caller (a connection asks once).
    pub fn of(&self, caller: &str) -> Arc<FromCounts> {
        if let Some(c) = self.by_id.read().unwrap_or_else(|p| p.into_inner()).get(caller) {
            return c.clone();
        }
        let mut all = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = all.get(caller) {
            return c.clone();
        }
        if all.len() >= MAX_CALLERS {
            return self.overflow.clone();
        }
        all.entry(Arc::from(caller)).or_default().clone()
    }

    /// The callers that sent anything, for the stats report.
    pub fn report(&self) -> Vec<InboundFrom> {
        let all = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<InboundFrom> = all.iter().filter_map(|(id, c)| c.report(id)).collect();
        out.sort_by(|a, b| a.caller.cmp(&b.caller));
        out.extend(self.plaintext.report(""));
        out.extend(self.overflow.report("*"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_counted_apart_up_to_the_bound() {
        let c = Callers::default();
        let a = c.of("spiffe://td/ns/a/sa/x");
        assert!(Arc::ptr_eq(&a, &c.of("spiffe://td/ns/a/sa/x")));
        a.answered(1, 3);
        a.refused(Refused::Forbidden);
        a.refused(Refused::NotReady);
        c.plaintext.answered(4, 0);
        let r = c.report();
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].caller, "spiffe://td/ns/a/sa/x");
        assert_eq!(r[0].status_classes, [0, 1, 0, 0, 0]);
        assert_eq!(r[0].refused, [1, 0, 0, 0]);
        assert_eq!(r[0].latency_buckets[3], 1);
        assert_eq!(r[1].caller, "");
        for i in 0..MAX_CALLERS + 10 {
            c.of(&format!("spiffe://td/ns/n/sa/{i}")).answered(1, 0);
        }
        let r = c.report();
        assert_eq!(r.len(), MAX_CALLERS + 2, "the bound, the plaintext entry and `*`");
        let rest = r.iter().find(|f| f.caller == "*").unwrap();
        assert_eq!(rest.status_classes[1], 11, "callers past the bound share `*`");
    }
}
