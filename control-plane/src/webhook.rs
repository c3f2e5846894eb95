//! The mutating admission webhook: AdmissionReview v1 over HTTPS at
//! `POST /mutate`, answered with the JSONPatch that injects Palisade
//! (the same code as `palisadectl inject`). Bad input gets a clear
//! `allowed: false` or HTTP 400, never a crash.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest AdmissionReview accepted (the API server sends well under this).
const MAX_BODY: usize = 4 << 20;

use crate::https::reply;

async fn handle(
    req: Request<Incoming>,
    cfg: Arc<palisade_inject::Config>,
    ca: Arc<crate::ca::Authority>,
) -> Response<Full<Bytes>> {
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
    // Pods get the bundle in force (both roots during a rotation).
    let cfg = palisade_inject::Config { trust_bundle_pem: ca.view().bundle_pem(), ..(*cfg).clone() };
    match palisade_inject::admission_review(&review, &cfg) {
        Ok(resp) => {
            let injected = resp["response"]["patch"].is_string();
            let name = review["request"]["object"]["metadata"]["name"]
                .as_str()
                .or(review["request"]["object"]["metadata"]["generateName"].as_str())
                .unwrap_or("");
            tracing::info!(target: "audit", event = "admission", namespace = %palisade_telemetry::Untrusted(review["request"]["namespace"].as_str().unwrap_or("")), pod = %palisade_telemetry::Untrusted(name), injected, dry_run = review["request"]["dryRun"].as_bool().unwrap_or(false), "admission review answered");
            reply(StatusCode::OK, "application/json", serde_json::to_vec(&resp).unwrap_or_default())
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n").into_bytes()),
    }
}

/// Serves the webhook on `listener` with `tls` until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: palisade_inject::Config,
    ca: Arc<crate::ca::Authority>,
    limits: crate::https::Limits,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let cfg = Arc::new(cfg);
    crate::https::serve("webhook", listener, tls, limits, stop, tracker, move |req, _peer| {
        handle(req, cfg.clone(), ca.clone())
    })
    .await;
}
