//! The mutating admission webhook: AdmissionReview v1 over HTTPS at
//! `POST /mutate`, answered with the JSONPatch that injects Palisade
//! (the same code as `palisadectl inject`). Bad input gets a clear
//! `allowed: false` or HTTP 400, never a crash.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest AdmissionReview accepted (the API server sends well under this).
const MAX_BODY: usize = 4 << 20;

fn reply(status: StatusCode, ct: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

async fn handle(req: Request<Incoming>, cfg: Arc<palisade_inject::Config>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/mutate" {
        return reply(StatusCode::NOT_FOUND, "text/plain", b"not found; the webhook is POST /mutate\n".to_vec());
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"use POST\n".to_vec());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("cannot read the request: {e}\n").into_bytes(),
            );
        }
    };
    let review: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return reply(StatusCode::BAD_REQUEST, "text/plain", format!("not an AdmissionReview: {e}\n").into_bytes());
        }
    };
    match palisade_inject::admission_review(&review, &cfg) {
        Ok(resp) => {
            let injected = resp["response"]["patch"].is_string();
            let name = review["request"]["object"]["metadata"]["name"]
                .as_str()
                .or(review["request"]["object"]["metadata"]["generateName"].as_str())
                .unwrap_or("");
            tracing::info!(target: "audit", event = "admission", namespace = %review["request"]["namespace"].as_str().unwrap_or(""), pod = %name, injected, dry_run = review["request"]["dryRun"].as_bool().unwrap_or(false), "admission review answered");
            reply(StatusCode::OK, "application/json", serde_json::to_vec(&resp).unwrap_or_default())
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n").into_bytes()),
    }
}

/// The webhook listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// A webhook connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves the webhook on `listener` with `tls` until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: Arc<palisade_inject::Config>,
    limits: Limits,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limit = palisade_net::Limit::new("webhook", limits.max_connections);
    palisade_net::serve(listener, limit, stop, tracker, move |tcp, peer: SocketAddr, slot| {
        let (acceptor, cfg) = (acceptor.clone(), cfg.clone());
        async move {
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                _ => {
                    tracing::debug!(src.addr = %peer, "webhook TLS handshake failed");
                    return;
                }
            };
            let io = palisade_net::IdleTimeout::new(tls, IDLE_TIMEOUT, Some(slot));
            let svc = hyper::service::service_fn(move |req| {
                let cfg = cfg.clone();
                async move { Ok::<_, Infallible>(handle(req, cfg).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
            builder.http2().max_concurrent_streams(64);
            let _ = builder.serve_connection(TokioIo::new(io), svc).await;
        }
    })
    .await;
}
