//! The admin HTTP server (plain HTTP, bind it to loopback or the pod IP):
//! `/live`, `/ready`, `/metrics` (Prometheus text), `/config` (JSON, public data only).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    /// Cancelled by `POST /shutdown` to start draining.
    pub shutdown: CancellationToken,
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/shutdown" {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST /shutdown\n");
        }
        tracing::info!("shutdown requested on the admin endpoint; draining");
        state.shutdown.cancel();
        return text(StatusCode::OK, "draining\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if state.shutdown.is_cancelled() => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n"),
        "/ready" => match (state.svids.valid(), state.policy.current()) {
            (Some(_), Some(_)) => text(StatusCode::OK, "ready\n"),
            (None, _) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no valid workload certificate yet\n"),
            (_, None) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no policy from the control plane yet\n"),
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
                "policy_version": state.policy.current().map(|p| p.version.clone()),
                "rate_limits": state.policy.current().map(|p| p.describe_limits()),
                "version": env!("CARGO_PKG_VERSION"),
            });
            let mut r = text(StatusCode::OK, serde_json::to_vec_pretty(&body).unwrap_or_default());
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /live, /ready, /metrics, /config or POST /shutdown\n"),
    }
}
