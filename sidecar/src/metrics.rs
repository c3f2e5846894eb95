//! Prometheus metrics served at `/metrics`. Handles for the hot path are
//! resolved once at startup, so recording a request costs a few atomic adds
//! and no label hashing.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub mod balance;
pub mod callers;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    status_class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub action: &'static str,
    pub policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthnLabels {
    /// `verified` or `refused`.
    pub result: &'static str,
    /// `jwt`, `api_key` or `both` when verified; the refusal's reason otherwise.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `namespace/name#index` of the TrafficPolicy route.
    pub route: String,
    /// The service the request went to.
    pub backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnRefusedLabels {
    pub listener: &'static str,
    /// `full`, `per_address` or `evicted`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolRefusedLabels {
    /// `not_http`, `head_timeout` or `cert_expired`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    /// `request` (the whole call's, then 504) or `try` (one try's).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

/// Latency buckets, 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Per-direction handles.
#[derive(Debug)]
pub struct DirMetrics {
    /// Indexed by status class: 1xx..5xx.
    requests: [Counter; 5],
    latency: Histogram,
    pub conns_open: Gauge,
    pub conns_total: Counter,
    pub bytes_read: Counter,
    pub bytes_written: Counter,
}

/// The sidecar's metrics.
#[derive(Debug)]
pub struct Metrics {
    pub cert_expiry: Gauge,
    pub cert_valid: Gauge,
    pub renewals: Counter,
    pub renewal_failures: Counter,
    pub control_plane_last_success: Gauge,
    pub directory_endpoints: Gauge,
    pub directory_refresh_failures: Counter,
    pub inbound: DirMetrics,
    pub outbound: DirMetrics,
    pub tls_failures: Family<TlsFailureLabels, Counter>,
    pub identity_mismatch: Counter,
    /// Inbound connections closed because of what the client sent first (or
    /// because the certificate an opaque stream was authorised with expired).
    pub protocol_refused: Family<ProtocolRefusedLabels, Counter>,
    /// Connections closed at accept by a listener's limits.
    pub conns_refused: Family<ConnRefusedLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub rate_limited: Family<PolicyLabels, Counter>,
    pub authn: Family<AuthnLabels, Counter>,
    pub routes: Family<RouteLabels, Counter>,
    /// Outbound calls or tries ended by a timeout.
    pub timeouts: Family<TimeoutLabels, Counter>,
    pub spans: crate::trace::SpanCounts,
    pub policy_revision: Gauge,
    pub policy_updated: Gauge,
    pub policy_nacks: Counter,
    pub policy_stream_connected: Gauge,
    /// Inbound requests the sidecar refused itself (policy, authentication, rate limit, validation).
    pub refused: Counter,
    /// Inbound requests per caller (the mesh graph's edges).
    pub callers: callers::Callers,
    /// Inbound latency counts per bucket of [`LATENCY_BUCKETS`], then +Inf
    /// (the histogram's, readable for the stats report).
    inbound_buckets: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS.len() + 1],
    requests: Family<RequestLabels, Counter>,
    latency: Family<DirLabels, Histogram>,
    conns_open: Family<DirLabels, Gauge>,
    conns_total: Family<DirLabels, Counter>,
    bytes_read: Family<DirLabels, Counter>,
    bytes_written: Family<DirLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<DirLabels, Histogram>::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        let conns_open = Family::<DirLabels, Gauge>::default();
        let conns_total = Family::<DirLabels, Counter>::default();
        let bytes_read = Family::<DirLabels, Counter>::default();
        let bytes_written = Family::<DirLabels, Counter>::default();
        let dir = |d: Direction| {
            let l = DirLabels { direction: d.as_str() };
            DirMetrics {
                requests: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                    .map(|c| requests.get_or_create(&RequestLabels { direction: d.as_str(), status_class: c }).clone()),
                latency: latency.get_or_create(&l).clone(),
                conns_open: conns_open.get_or_create(&l).clone(),
                conns_total: conns_total.get_or_create(&l).clone(),
                bytes_read: bytes_read.get_or_create(&l).clone(),
                bytes_written: bytes_written.get_or_create(&l).clone(),
            }
        };
        Self {
            cert_expiry: Gauge::default(),
            cert_valid: Gauge::default(),
            renewals: Counter::default(),
            renewal_failures: Counter::default(),
            control_plane_last_success: Gauge::default(),
            directory_endpoints: Gauge::default(),
            directory_refresh_failures: Counter::default(),
            inbound: dir(Direction::Inbound),
            outbound: dir(Direction::Outbound),
            tls_failures: Family::default(),
            identity_mismatch: Counter::default(),
            protocol_refused: Family::default(),
            conns_refused: Family::default(),
            decisions: Family::default(),
            rate_limited: Family::default(),
            authn: Family::default(),
            routes: Family::default(),
            timeouts: Family::default(),
            spans: crate::trace::SpanCounts::default(),
            policy_revision: Gauge::default(),
            policy_updated: Gauge::default(),
            policy_nacks: Counter::default(),
            policy_stream_connected: Gauge::default(),
            refused: Counter::default(),
            callers: callers::Callers::default(),
            inbound_buckets: Default::default(),
            requests,
            latency,
            conns_open,
            conns_total,
            bytes_read,
            bytes_written,
        }
    }
}

impl Metrics {
    pub fn dir(&self, d: Direction) -> &DirMetrics {
        match d {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }

    /// Records one answered request.
    pub fn request(&self, d: Direction, status: u16, elapsed: Duration) {
        let m = self.dir(d);
        let class = (status / 100).clamp(1, 5) as usize - 1;
        m.requests[class].inc();
        let secs = elapsed.as_secs_f64();
        m.latency.observe(secs);
        if d == Direction::Inbound {
            let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
            self.inbound_buckets[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Records one answered inbound request, also as its caller's.
    pub fn inbound(&self, from: &callers::FromCounts, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.inbound.requests[class].inc();
        let secs = elapsed.as_secs_f64();
        self.inbound.latency.observe(secs);
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.inbound_buckets[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        from.answered(class, i);
    }

    /// Inbound responses by status class, latency counts per bucket, and the buckets' bounds.
    pub fn inbound_stats(&self) -> (Vec<u64>, Vec<u64>, Vec<f64>) {
        let classes = self.inbound.requests.iter().map(Counter::get).collect();
        let buckets = self.inbound_buckets.iter().map(|b| b.load(std::sync::atomic::Ordering::Relaxed)).collect();
        (classes, buckets, LATENCY_BUCKETS.to_vec())
    }

    /// Counts a failed TLS handshake.
    pub fn tls_failure(&self, d: Direction, reason: &'static str) {
        self.tls_failures.get_or_create(&TlsFailureLabels { direction: d.as_str(), reason }).inc();
    }

    pub fn timeout(&self, kind: &'static str) {
        self.timeouts.get_or_create(&TimeoutLabels { kind }).inc();
    }

    pub fn protocol_refused(&self, reason: &'static str) {
        self.protocol_refused.get_or_create(&ProtocolRefusedLabels { reason }).inc();
    }

    /// `limit`, counting its refusals in `palisade_connections_refused_total`.
    pub fn count_refusals(&self, limit: palisade_net::Limit) -> palisade_net::Limit {
        let family = self.conns_refused.clone();
        limit.on_refused(move |listener, why| {
            family.get_or_create(&ConnRefusedLabels { listener, reason: why.as_str() }).inc();
        })
    }

    /// Registers every metric under the `palisade_` prefix.
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "identity_cert_expiry_timestamp_seconds",
            "Unix time at which the current workload certificate expires",
            self.cert_expiry.clone(),
        );
        reg.register(
            "identity_cert_valid",
            "1 while the sidecar holds a currently valid certificate",
            self.cert_valid.clone(),
        );
        reg.register(
            "identity_renewals",
            "Certificates obtained from the control plane (first one included)",
            self.renewals.clone(),
        );
        reg.register(
            "identity_renewal_failures",
            "Failed attempts to obtain or renew a certificate",
            self.renewal_failures.clone(),
        );
        reg.register(
            "control_plane_last_success_timestamp_seconds",
            "Unix time of the last successful call to the control plane",
            self.control_plane_last_success.clone(),
        );
        reg.register(
            "directory_endpoints",
            "Endpoints in the last directory received",
            self.directory_endpoints.clone(),
        );
        reg.register(
            "directory_refresh_failures",
            "Failed directory refreshes (the last good directory stays in use)",
            self.directory_refresh_failures.clone(),
        );
        reg.register("requests", "HTTP requests answered, by direction and status class", self.requests.clone());
        reg.register("request_duration_seconds", "Time to response headers, by direction", self.latency.clone());
        reg.register("tcp_connections_open", "TCP connections open, by direction", self.conns_open.clone());
        reg.register("tcp_connections", "TCP connections accepted, by direction", self.conns_total.clone());
        reg.register("tcp_read_bytes", "Bytes read from accepted connections, by direction", self.bytes_read.clone());
        reg.register(
            "tcp_write_bytes",
            "Bytes written to accepted connections, by direction",
            self.bytes_written.clone(),
        );
        reg.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by direction and reason",
            self.tls_failures.clone(),
        );
        reg.register(
            "policy_decisions",
            "Authorization decisions other than a plain allow by default, by action and policy",
            self.decisions.clone(),
        );
        reg.register("rate_limited_requests", "Requests refused by a rate limit, by policy", self.rate_limited.clone());
        reg.register(
            "trace_spans",
            "Request spans for the OTLP collector, by result: exported, dropped (queue full), failed (export refused or timed out)",
            self.spans.0.clone(),
        );
        reg.register(
            "routed_requests",
            "Outgoing requests a TrafficPolicy route sent, by route and backend service",
            self.routes.clone(),
        );
        reg.register(
            "request_authentications",
            "Request credentials (JWT, API key) checked, by result and reason (credential kind when verified)",
            self.authn.clone(),
        );
        reg.register(
            "outbound_timeouts",
            "Outbound calls (kind=request, answered 504) and tries (kind=try) ended by their timeout",
            self.timeouts.clone(),
        );
        reg.register(
            "policy_revision",
            "Control-plane revision of the policy snapshot in force",
            self.policy_revision.clone(),
        );
        reg.register(
            "policy_last_update_timestamp_seconds",
            "Unix time the last snapshot was applied",
            self.policy_updated.clone(),
        );
        reg.register(
            "policy_nacks",
            "Policy snapshots rejected (the previous stayed in force)",
            self.policy_nacks.clone(),
        );
        reg.register(
            "policy_stream_connected",
            "1 while the policy stream to the control plane is open",
            self.policy_stream_connected.clone(),
        );
        reg.register(
            "refused_requests",
            "Inbound requests the sidecar refused itself (policy, authentication, rate limit, validation)",
            self.refused.clone(),
        );
        reg.register(
            "identity_mismatch",
            "Outbound connections refused because the peer's SPIFFE ID differed from the directory's",
            self.identity_mismatch.clone(),
        );
        reg.register(
            "connections_refused",
            "Connections closed at accept by a listener's limits (listener: inbound-handshake, inbound, inbound-plaintext, admin; reason: full, per_address, evicted)",
            self.conns_refused.clone(),
        );
        reg.register(
            "inbound_protocol_refused",
            "Inbound connections closed for what the client sent first (not_http, head_timeout) or at the expiry of the certificate an opaque stream was authorised with (cert_expired)",
            self.protocol_refused.clone(),
        );
    }
}

/// Which side of the sidecar a connection or request is on (metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}
