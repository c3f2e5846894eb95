//! The admin HTTP server (plain HTTP, bind it to loopback or the pod IP):
//! `/live`, `/ready`, `/metrics` (Prometheus text) from anywhere; `/config`
//! (JSON, public data only), `/endpoints` (JSON: the balancer's view of the
//! services this sidecar calls) and `PUT /shutdown` from inside the pod only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Config;
use palisade_certs::tls::SvidStore;

/// What the admin server reads.
#[derive(Debug)]
pub struct AdminState {
    pub config: Config,
    pub svids: SvidStore,
    pub registry: Registry,
    /// The policy in force (ready needs a first snapshot).
    pub policy: crate::policy::PolicyState,
    /// The mesh directory (ready needs a first one: until then an app's
    /// first calls could not be told from calls leaving the mesh).
    pub directory: Arc<crate::directory::Directory>,
    /// Cancelled by `PUT /shutdown` to start draining.
    pub shutdown: CancellationToken,
    /// The roots this sidecar trusts (from the control plane).
    pub bundle: palisade_certs::tls::TrustBundle,
    /// Connection refusals are counted here.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What the balancer knows of the services this sidecar calls (`/endpoints`).
    pub balancer: Arc<crate::balance::Balancer>,
}

/// Most admin connections open at once (probes and scrapes need a few).
const MAX_CONNECTIONS: usize = 64;
/// Most from one address: the kubelet and a scraper need one or two each;
/// 8 addresses are needed to fill the listener.
const MAX_CONNECTIONS_PER_IP: usize = 8;
/// Places beyond the limit only 127.0.0.1 and ::1 may take: the pod's own
/// probes and an operator in the pod always get in.
const RESERVED_LOOPBACK: usize = 8;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `stop` is cancelled, through the shared accept loop (with a
/// small connection limit of its own, so a flood of admin connections cannot
/// starve the data path of descriptors).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken, tracker: TaskTracker) {
    // Per address too: the kubelet's probes must get through a flood from elsewhere.
    let limit = state.metrics.count_refusals(
        palisade_net::Limit::new("admin", MAX_CONNECTIONS)
            .per_ip(MAX_CONNECTIONS_PER_IP)
            .reserve_loopback(RESERVED_LOOPBACK)
            // The kubelet probes from the node's address, not loopback: when
            // full, the oldest connection is let go for a newcomer.
            .evict_oldest(),
    );
    palisade_net::serve(listener, limit, stop, tracker, move |tcp, src, slot| {
        let state = state.clone();
        async move {
            // A request comes at once or not at all, and HTTP/2 PINGs (h2c)
            // are not requests: a connection that only pings is idle.
            let io = palisade_net::IdleTimeout::new(tcp, IDLE_TIMEOUT, Some(slot))
                .first_byte_within(HEADER_TIMEOUT)
                .requests_only();
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, src, req)) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(16 * 1024);
            builder.http2().max_concurrent_streams(16);
            if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        }
    })
    .await;
}

/// Why a state-changing or local-only admin request is refused, if it is.
///
/// Only the pod itself may use them: the peer must be on loopback (the admin
/// port also listens on the pod IP for the kubelet). A browser on the node
/// must not reach them either: they need PUT (which a cross-origin page
/// cannot send without a preflight this server never answers), no `Origin`
/// header (browsers send one with every PUT), and a Host that is an IP or
/// `localhost` (DNS rebinding sends the attacker's name).
fn local_only(src: SocketAddr, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if !src.ip().is_loopback() {
        return Some(text(StatusCode::FORBIDDEN, "only from inside the pod (loopback)\n"));
    }
    if req.headers().contains_key(header::ORIGIN) {
        return Some(text(StatusCode::FORBIDDEN, "not from a browser\n"));
    }
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if name != "localhost" && name.parse::<std::net::IpAddr>().is_err() {
        return Some(text(StatusCode::FORBIDDEN, "Host must be an IP address or localhost\n"));
    }
    None
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn route(state: &AdminState, src: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/shutdown" {
        if let Some(refused) = local_only(src, &req) {
            tracing::warn!(target: "audit", decision = "deny", src.addr = %src, "admin /shutdown refused");
            return refused;
        }
        if req.method() != Method::PUT {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use PUT /shutdown (curl -X PUT http://127.0.0.1:4191/shutdown)\n",
            );
        }
        tracing::info!(src.addr = %src, "shutdown requested on the admin endpoint; draining");
        state.shutdown.cancel();
        return text(StatusCode::OK, "draining\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if state.shutdown.is_cancelled() => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n"),
        "/ready" => match (state.svids.valid(), state.policy.current(), state.directory.loaded()) {
            (Some(_), Some(_), true) => text(StatusCode::OK, "ready\n"),
            (None, _, _) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no valid workload certificate yet\n"),
            (_, None, _) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no policy from the control plane yet\n"),
            (_, _, false) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no service directory from the control plane yet\n")
            }
        },
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, out);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                    );
                    r
                }
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n"),
            }
        }
        "/config" => {
            if let Some(refused) = local_only(src, &req) {
                return refused;
            }
            let svid = state.svids.get();
            let now = SystemTime::now();
            let body = json!({
                "config": state.config,
                "identity": svid.as_ref().map(|s| s.id.to_string()),
                "cert_serial": svid.as_ref().map(|s| s.info.serial.clone()),
                "cert_not_before": svid.as_ref().map(|s| palisade_certs::svid::rfc3339::format(s.info.not_before)),
                "cert_not_after": svid.as_ref().map(|s| palisade_certs::svid::rfc3339::format(s.info.not_after)),
                "cert_valid": svid.as_ref().is_some_and(|s| s.is_valid_at(now)),
                "cert_chain_pem": svid.as_ref().map(|s| s.chain_pem()),
                "trust_bundle_sha256": state.bundle.der().iter().map(|c| palisade_certs::ca::sha256_hex(c)).collect::<Vec<_>>(),
                "policy_version": state.policy.current().map(|p| p.enforcer.version.clone()),
                "rate_limits": state.policy.current().map(|p| p.enforcer.describe_limits()),
                "authentication": state.policy.current().and_then(|p| p.enforcer.authenticator().map(|a| a.describe())),
                "version": env!("CARGO_PKG_VERSION"),
            });
            json_response(&body)
        }
        "/endpoints" => {
            if let Some(refused) = local_only(src, &req) {
                return refused;
            }
            json_response(&endpoints_json(state.balancer.snapshot()))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics, /config, /endpoints or PUT /shutdown\n",
        ),
    }
}

fn json_response(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::OK, serde_json::to_vec_pretty(body).unwrap_or_default());
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

/// `/endpoints`: every service this sidecar called, its endpoints as the
/// balancer sees them, its retries and its budget (the same bound as the
/// metrics': 1000 endpoints, 256 services; `omitted` counts the rest).
fn endpoints_json(snapshot: Vec<crate::balance::ServiceSnapshot>) -> serde_json::Value {
    use crate::metrics::balance::{MAX_ENDPOINTS, MAX_SERVICES, bounded};
    let (services, omitted) = bounded(snapshot, MAX_SERVICES, MAX_ENDPOINTS);
    json!({ "services": services, "omitted": omitted })
}
