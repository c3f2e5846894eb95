//! The way to the app: the request in the app's protocol over a pooled
//! connection, its body checked where a TrafficPolicy asks, upgrades spliced.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{AppTarget, Inbound};
use crate::proxy::detect::Protocol;
use crate::proxy::{Body, ProxyError};

impl Inbound {
    pub(super) async fn forward(
        &self,
        mut req: Request<Incoming>,
        app_proto: Protocol,
        upgrade: bool,
        app: &AppTarget,
    ) -> Result<Response<Body>, ProxyError> {
        if upgrade {
            return Box::pin(self.upgrade(req, app.addr)).await;
        }
        crate::proxy::strip_hop_by_hop(req.headers_mut());
        let timeout = self.opts.limits.response_timeout;
        let timed_out = |_| ProxyError::AppTimeout(timeout);
        let mut req = capped(req, timeout).await?;
        let mut resp = if app_proto == Protocol::Http1 {
            // HTTP/1: Host carries the caller's authority.
            if !req.headers().contains_key(HOST)
                && let Some(a) = req.uri().authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(HOST, v);
            }
            // HTTP/1 to the app uses the origin form ("/path?query").
            let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
            *req.version_mut() = Version::HTTP_11;
            tokio::time::timeout(timeout, app.pool.send_h1(req)).await.map_err(timed_out)?.map_err(app_error)?
        } else {
            // HTTP/2: the URI keeps the caller's :authority; the connection goes to the app.
            if req.uri().scheme().is_none() {
                let mut parts = req.uri().clone().into_parts();
                parts.scheme = Some(Scheme::HTTP);
                if parts.authority.is_none() {
                    parts.authority = Some(app.authority.clone());
                }
                if parts.path_and_query.is_none() {
                    parts.path_and_query = Some(PathAndQuery::from_static("/"));
                }
                *req.uri_mut() =
                    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
            }
            *req.version_mut() = Version::HTTP_2;
            tokio::time::timeout(timeout, app.pool.send_h2(req)).await.map_err(timed_out)?.map_err(app_error)?
        };
        crate::proxy::strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }

    async fn upgrade(&self, mut req: Request<Incoming>, app: SocketAddr) -> Result<Response<Body>, ProxyError> {
        let unavailable = |e: String| ProxyError::AppUnavailable(e);
        let tcp = TcpStream::connect(app).await.map_err(|e| unavailable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| unavailable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let caller_side = hyper::upgrade::on(&mut req);
        // HTTP/1 requests carry the origin form to the app.
        let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
        let req = req.map(|b| b.boxed_unsync());
        let mut resp = sender.send_request(req).await.map_err(|e| ProxyError::AppFailed(e.to_string()))?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let app_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(crate::proxy::outbound::splice_upgraded(caller_side, app_side));
        } else {
            crate::proxy::no_upgrade(&mut resp);
        }
        Ok(resp.map(|b| b.boxed_unsync()))
    }
}

/// What TrafficPolicy validation asks of this request's body (set by the pipeline's outcome).
#[derive(Clone)]
pub(super) struct BodyCap {
    /// Largest body.
    pub(super) max: u64,
    /// The policy whose JSON Schemas the whole body is checked against.
    pub(super) schemas: Option<Arc<crate::policy::InForce>>,
}

/// The request with its body ready for the app: a body without a declared
/// length under a TrafficPolicy body limit, and any body a JSON Schema
/// checks, is read (up to the limit, within `timeout`) before it is
/// forwarded, so the app never gets a body cut short, an oversized one is
/// 413 and one that does not match the schema 400; any other body streams
/// through. Bodies are read only here, once the request is authorized: an
/// unauthorized caller never makes the sidecar hold a body.
async fn capped(mut req: Request<Incoming>, timeout: Duration) -> Result<Request<Body>, ProxyError> {
    let cap = req.extensions_mut().remove::<BodyCap>();
    let count = req.extensions_mut().remove::<crate::proxy::access::BytesIn>();
    let (parts, body) = req.into_parts();
    let body = match cap {
        Some(BodyCap { max, schemas })
            if (schemas.is_some() || !parts.headers.contains_key(http::header::CONTENT_LENGTH))
                && !hyper::body::Body::is_end_stream(&body) =>
        {
            let limit = usize::try_from(max).unwrap_or(usize::MAX);
            let bytes = match tokio::time::timeout(timeout, http_body_util::Limited::new(body, limit).collect()).await {
                Err(_) => return Err(ProxyError::BadRequest("the request body did not arrive in time")),
                Ok(Ok(c)) => c.to_bytes(),
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(ProxyError::TooLarge { limit: max });
                }
                Ok(Err(_)) => return Err(ProxyError::BadRequest("malformed request body")),
            };
            if let Some(policy) = schemas
                && let Err(problem) = policy.enforcer.checks().check_body(&bytes)
            {
                return Err(ProxyError::InvalidBody(Box::new(problem)));
            }
            // The app receives the bytes that were checked, unchanged.
            crate::proxy::full(bytes)
        }
        _ => body.boxed_unsync(),
    };
    let body = match count {
        Some(c) => crate::proxy::access::CountIn::wrap(body, c.0),
        None => body,
    };
    Ok(Request::from_parts(parts, body))
}

fn app_error(e: crate::proxy::pool::AppError) -> ProxyError {
    match e {
        crate::proxy::pool::AppError::Connect { .. } => ProxyError::AppUnavailable(e.to_string()),
        crate::proxy::pool::AppError::Http(_) => ProxyError::AppFailed(e.to_string()),
    }
}
