//! The balancer's view as Prometheus metrics, read from
//! [`Balancer::snapshot`] at scrape time: the data path records nothing
//! here (no label hashing per request), a scrape costs one snapshot.
//!
//! Label cardinality is bounded: at most [`MAX_SERVICES`] services and
//! [`MAX_ENDPOINTS`] endpoints in all are exported (services in name order,
//! endpoints in address order); what is left out is counted in
//! `palisade_endpoints_omitted`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use prometheus_client::metrics::MetricType;

use crate::balance::{Balancer, EndpointSnapshot, ServiceSnapshot};

/// Services exported, at most.
pub const MAX_SERVICES: usize = 256;
/// Endpoints exported, at most, all services together.
pub const MAX_ENDPOINTS: usize = 1000;

/// At most `max_services` services and `max_endpoints` endpoints of
/// `snapshot` (a service whose endpoints are cut keeps those that fit), and
/// how many endpoints were left out.
pub fn bounded(
    mut snapshot: Vec<ServiceSnapshot>,
    max_services: usize,
    max_endpoints: usize,
) -> (Vec<ServiceSnapshot>, usize) {
    let mut omitted: usize = snapshot.iter().skip(max_services).map(|s| s.endpoints.len()).sum();
    snapshot.truncate(max_services);
    let mut room = max_endpoints;
    for s in &mut snapshot {
        let keep = s.endpoints.len().min(room);
        omitted += s.endpoints.len() - keep;
        s.endpoints.truncate(keep);
        room -= keep;
    }
    (snapshot, omitted)
}

/// Exports what [`Balancer::snapshot`] holds, on each scrape.
#[derive(Debug)]
pub struct BalancerCollector(pub Arc<Balancer>);

impl Collector for BalancerCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (services, omitted) = bounded(self.0.snapshot(), MAX_SERVICES, MAX_ENDPOINTS);
        // One descriptor per metric, then a sample per endpoint (or service).
        type Value = fn(&EndpointSnapshot) -> Option<Sample>;
        let (gauge, counter) = (MetricType::Gauge, MetricType::Counter);
        let per_endpoint: [(&str, &str, MetricType, Value); 6] = [
            ("endpoint_requests_in_flight", "Requests (or connections) in flight to the endpoint", gauge, |e| {
                Some(Sample::Int(i64::from(e.in_flight)))
            }),
            (
                "endpoint_latency_ewma_seconds",
                "Peak-EWMA latency of the endpoint as the balancer estimates it (absent until it answered)",
                gauge,
                |e| e.latency_ms.map(|ms| Sample::Gauge(ms / 1e3)),
            ),
            ("endpoint_ejected", "1 while the endpoint is ejected from balancing", gauge, |e| {
                Some(Sample::Int(i64::from(e.ejected_for_ms > 0)))
            }),
            ("endpoint_ejections", "Times the endpoint was ejected from balancing", counter, |e| {
                Some(Sample::Counter(e.ejections))
            }),
            ("endpoint_requests", "Requests (tries) sent to the endpoint and finished", counter, |e| {
                Some(Sample::Counter(e.requests))
            }),
            (
                "endpoint_failures",
                "Requests to the endpoint that failed (5xx, reset, timeout, unreachable)",
                counter,
                |e| Some(Sample::Counter(e.failures)),
            ),
        ];
        for (name, help, kind, value) in per_endpoint {
            let mut m = enc.encode_descriptor(name, help, None, kind)?;
            for s in &services {
                for e in &s.endpoints {
                    if let Some(v) = value(e) {
                        let labels = [
                            ("service", s.service.clone()),
                            ("endpoint", e.addr.to_string()),
                            ("identity", e.identity.clone()),
                        ];
                        v.encode(&mut m, &labels)?;
                    }
                }
            }
        }
        type ServiceValue = fn(&ServiceSnapshot) -> Sample;
        let per_service: [(&str, &str, MetricType, ServiceValue); 3] = [
            ("retries", "Retries sent to the service", counter, |s| Sample::Counter(s.retries)),
            ("retries_refused", "Retries not sent because the service's retry budget was spent", counter, |s| {
                Sample::Counter(s.retries_refused)
            }),
            ("retry_budget_remaining", "Retries the service's budget allows now", gauge, |s| {
                Sample::Int(i64::try_from(s.budget.left).unwrap_or(i64::MAX))
            }),
        ];
        for (name, help, kind, value) in per_service {
            let mut m = enc.encode_descriptor(name, help, None, kind)?;
            for s in &services {
                value(s).encode(&mut m, &[("service", s.service.clone())])?;
            }
        }
        let omitted = ConstGauge::new(omitted as i64);
        let m = enc.encode_descriptor(
            "endpoints_omitted",
            "Endpoints left out of the endpoint metrics by their bound (1000 endpoints, 256 services)",
            None,
            omitted.metric_type(),
        )?;
        omitted.encode(m)?;
        let kept = ConstGauge::new(crate::proxy::replay::kept_total() as i64);
        let m = enc.encode_descriptor(
            "retry_kept_bytes",
            "Bytes of request bodies kept to send again, across all calls in flight (at most 32 MiB)",
            None,
            kept.metric_type(),
        )?;
        kept.encode(m)
    }
}

enum Sample {
    Int(i64),
    Gauge(f64),
    Counter(u64),
}

impl Sample {
    fn encode<const N: usize>(
        &self,
        m: &mut prometheus_client::encoding::MetricEncoder<'_>,
        labels: &[(&'static str, String); N],
    ) -> Result<(), std::fmt::Error> {
        let fam = m.encode_family(labels)?;
        match self {
            Self::Int(v) => ConstGauge::new(*v).encode(fam),
            Self::Gauge(v) => ConstGauge::new(*v).encode(fam),
            Self::Counter(v) => ConstCounter::new(*v).encode(fam),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use palisade_policy::resilience::Balancing;

    use super::*;
    use crate::balance::{Mode, Outcome};
    use crate::proxy::peer::Peer;

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

    fn peers(n: usize) -> Vec<Peer> {
        (0..n)
            .map(|i| Peer {
                addr: format!("10.0.0.{}:4143", i + 1).parse().expect("addr"),
                identity: ORDERS.parse().expect("id"),
            })
            .collect()
    }

    fn scrape(b: &Arc<Balancer>) -> String {
        let mut reg = prometheus_client::registry::Registry::with_prefix("palisade");
        reg.register_collector(Box::new(BalancerCollector(b.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).expect("encode");
        out
    }

    #[test]
    fn a_scrape_shows_each_endpoint_and_service() {
        let b = Arc::new(Balancer::new(Mode::PeakEwma));
        let s = b.service("orders.shop");
        let ps = peers(2);
        let cfg = Balancing { warmup: Duration::ZERO, ..Balancing::default() };
        // A failure on .1, a success on .2 (each chosen by avoiding the other).
        for (avoid, outcome) in [(&ps[1], Outcome::Failure), (&ps[0], Outcome::Success)] {
            let (ep, _) = b.pick(&s, &ps, 1, &cfg, Some(avoid.addr));
            let f = b.start(&s, ep.expect("an endpoint"));
            b.finish(f, outcome, &cfg);
        }
        // One still in flight on .1.
        let (ep, _) = b.pick(&s, &ps, 1, &cfg, Some(ps[1].addr));
        let _flight = b.start(&s, ep.expect("an endpoint"));
        s.retries.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        s.retries_refused.fetch_add(2, std::sync::atomic::Ordering::Relaxed);

        let text = scrape(&b);
        let l1 = format!(r#"{{service="orders.shop",endpoint="10.0.0.1:4143",identity="{ORDERS}"}}"#);
        let l2 = format!(r#"{{service="orders.shop",endpoint="10.0.0.2:4143",identity="{ORDERS}"}}"#);
        for line in [
            format!("palisade_endpoint_requests_in_flight{l1} 1"),
            format!("palisade_endpoint_requests_in_flight{l2} 0"),
            format!("palisade_endpoint_requests_total{l1} 1"),
            format!("palisade_endpoint_failures_total{l1} 1"),
            format!("palisade_endpoint_failures_total{l2} 0"),
            format!("palisade_endpoint_ejected{l2} 0"),
            format!("palisade_endpoint_ejections_total{l2} 0"),
            r#"palisade_retries_total{service="orders.shop"} 3"#.to_string(),
            r#"palisade_retries_refused_total{service="orders.shop"} 2"#.to_string(),
            "palisade_endpoints_omitted 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("# TYPE palisade_endpoint_requests counter"), "{text}");
        assert!(text.contains("# TYPE palisade_retry_budget_remaining gauge"), "{text}");
        assert!(text.contains("# TYPE palisade_retry_kept_bytes gauge"), "{text}");
        assert!(text.contains(&format!("palisade_endpoint_latency_ewma_seconds{l2} ")), "{text}");
        assert!(text.contains(r#"palisade_retry_budget_remaining{service="orders.shop"} "#), "{text}");
    }

    #[test]
    fn exported_endpoints_are_bounded() {
        let b = Arc::new(Balancer::new(Mode::RoundRobin));
        let cfg = Balancing::default();
        for n in 0..3 {
            let s = b.service(&format!("svc{n}"));
            let _ = b.pick(&s, &peers(5), 1, &cfg, None);
        }
        let (kept, omitted) = bounded(b.snapshot(), 2, 7);
        assert_eq!(kept.iter().map(|s| s.endpoints.len()).collect::<Vec<_>>(), [5, 2]);
        assert_eq!(omitted, 3 + 5);
        let (kept, omitted) = bounded(b.snapshot(), MAX_SERVICES, MAX_ENDPOINTS);
        assert_eq!((kept.len(), omitted), (3, 0));
    }
}
