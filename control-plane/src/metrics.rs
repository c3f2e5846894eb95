//! The control plane's own metrics (`--metrics-listen`): certificates
//! issued and refused, policy streams (connected proxies), push latency
//! (a change to the proxy's ACK), NACKs, store latency, OAuth tokens and
//! Admin API use. Served as OpenMetrics text on a small plaintext HTTP
//! listener (GET /metrics only), with a connection limit and timeouts.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultReason {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerReason {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Every control-plane metric (one set per process).
#[derive(Debug)]
pub struct Metrics {
    pub certificates: Family<ResultReason, Counter>,
    pub policy_streams: Gauge,
    pub push_latency: Histogram,
    pub nacks: Counter,
    pub config_bytes: Counter,
    pub store_latency: Histogram,
    pub oauth_tokens: Family<ResultReason, Counter>,
    pub admin_requests: Family<ResultLabel, Counter>,
    pub spans: palisade_telemetry::SpanCounts,
    pub taps: Gauge,
    pub tap_events: Family<ResultLabel, Counter>,
    pub preview_samples: Gauge,
    pub preview_sample_bytes: Gauge,
    pub preview_samples_refused: Counter,
    pub leader: Gauge,
    pub ca_roots: Gauge,
    pub ca_rotation_waiting: Gauge,
    pub connections_refused: Family<ListenerReason, Counter>,
    registry: Registry,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let certificates = Family::<ResultReason, Counter>::default();
        let policy_streams = Gauge::default();
        let push_latency =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let nacks = Counter::default();
        let config_bytes = Counter::default();
        let store_latency =
            Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]);
        let oauth_tokens = Family::<ResultReason, Counter>::default();
        let admin_requests = Family::<ResultLabel, Counter>::default();
        let spans = palisade_telemetry::SpanCounts::default();
        let taps = Gauge::default();
        let tap_events = Family::<ResultLabel, Counter>::default();
        let preview_samples = Gauge::default();
        let preview_sample_bytes = Gauge::default();
        let preview_samples_refused = Counter::default();
        let leader = Gauge::default();
        let ca_roots = Gauge::default();
        let ca_rotation_waiting = Gauge::default();
        let connections_refused = Family::<ListenerReason, Counter>::default();
        let mut registry = Registry::with_prefix("palisade_cp");
        registry.register(
            "certificates",
            "Workload certificate requests, by result (issued, refused) and reason (attestation method, or the refusal's gRPC code)",
            certificates.clone(),
        );
        registry.register("policy_streams", "Open policy streams (connected proxies)", policy_streams.clone());
        registry.register(
            "push_latency_seconds",
            "From a change (policy apply, credentials, directory) to a proxy's ACK of the update that carries it",
            push_latency.clone(),
        );
        registry.register("config_nacks", "Config updates a sidecar rejected (part of)", nacks.clone());
        registry.register("config_sent_bytes", "Bytes of config updates sent to sidecars", config_bytes.clone());
        registry.register("store_operation_duration_seconds", "Store reads and writes", store_latency.clone());
        registry.register(
            "oauth_tokens",
            "Token service requests, by result (issued, refused) and reason",
            oauth_tokens.clone(),
        );
        registry.register("admin_requests", "Admin API calls, by result (authorized, refused)", admin_requests.clone());
        registry.register(
            "trace_spans",
            "gRPC call spans for the OTLP collector, by result: exported, dropped (queue full), failed",
            spans.0.clone(),
        );
        registry.register("taps", "Taps (palisadectl tap) running", taps.clone());
        registry.register(
            "tap_events",
            "Request lines from sidecars for taps, by result: delivered, dropped (the caller's buffer was full), refused (not the tap's)",
            tap_events.clone(),
        );
        registry.register(
            "preview_samples",
            "Recorded request shapes held for policy previews",
            preview_samples.clone(),
        );
        registry.register(
            "preview_sample_bytes",
            "Memory the recorded request shapes take (their JSON and a fixed overhead each), capped by --preview-memory-mib",
            preview_sample_bytes.clone(),
        );
        registry.register(
            "preview_samples_refused",
            "Recorded request shapes refused: malformed, oversized, beyond a report's 1024, or naming a callee other than the reporting sidecar",
            preview_samples_refused.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads (runs the singleton duties); a single control plane always leads",
            leader.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed by a listener's limits, by listener and reason: full, per_address (the source address holds its share), deadline (no certificate or request in time), requests (an anonymous connection's second call)",
            connections_refused.clone(),
        );
        registry.register(
            "ca_roots",
            "Roots in the trust bundles this replica hands out (2 while a root rotation is under way)",
            ca_roots.clone(),
        );
        registry.register(
            "ca_rotation_waiting",
            "Connected proxies the current root rotation step waits for (0 when none is under way)",
            ca_rotation_waiting.clone(),
        );
        Self {
            certificates,
            policy_streams,
            push_latency,
            nacks,
            config_bytes,
            store_latency,
            oauth_tokens,
            admin_requests,
            spans,
            taps,
            tap_events,
            preview_samples,
            preview_sample_bytes,
            preview_samples_refused,
            leader,
            ca_roots,
            ca_rotation_waiting,
            connections_refused,
            registry,
        }
    }

    /// Counts a certificate request's outcome.
    pub fn certificate(&self, result: &'static str, reason: &'static str) {
        self.certificates.get_or_create(&ResultReason { result, reason }).inc();
    }

    /// Counts a connection a listener's limits refused or cut.
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused.get_or_create(&ListenerReason { listener, reason }).inc();
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A gRPC code as a metric label.
pub fn code_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Internal => "internal",
        _ => "other",
    }
}

/// Most metrics connections at once.
const MAX_CONNECTIONS: usize = 32;
/// Most from one address: a scraper needs one, a few replicas of it a few;
/// 8 addresses are needed to fill the listener.
const MAX_CONNECTIONS_PER_IP: usize = 4;
/// A scraper sends its request at once; a silent connection is let go.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);

/// A limit whose refusals are counted in `palisade_cp_connections_refused`.
pub fn counted(limit: palisade_net::Limit) -> palisade_net::Limit {
    limit.on_refused(|listener, why| METRICS.refused(listener, why.as_str()))
}

/// Serves GET /metrics on `listener` until `stop`; `reserved` places beyond
/// the limit are for the host itself (127.0.0.1, ::1).
pub async fn serve(listener: TcpListener, reserved: usize, stop: CancellationToken, tracker: TaskTracker) {
    // Anyone can open one: when full, the oldest is let go for a newcomer (a
    // scraper reconnects; a silent flood only pushes out its own).
    let limit = palisade_net::Limit::new("metrics", MAX_CONNECTIONS)
        .per_ip(MAX_CONNECTIONS_PER_IP)
        .reserve_loopback(reserved)
        .evict_oldest();
    palisade_net::serve(listener, counted(limit), stop, tracker, move |tcp, _peer: SocketAddr, slot| async move {
        let io = palisade_net::IdleTimeout::new(tcp, Duration::from_secs(30), Some(slot))
            .first_byte_within(FIRST_BYTE_TIMEOUT);
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let (status, body) = if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                (StatusCode::OK, METRICS.text())
            } else {
                (StatusCode::NOT_FOUND, "GET /metrics\n".to_string())
            };
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            Ok::<_, std::convert::Infallible>(r)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5))
            .serve_connection(TokioIo::new(io), svc)
            .await;
    })
    .await;
}
