//! Carrying one request to the peer sidecar: HTTP/1 framing checks, the
//! rewrite to HTTP/2 (absolute URI, hop-by-hop headers, the app's protocol
//! in ORIG_PROTO), a retry on a pooled connection found dead, and HTTP/1.1
//! upgrades on a dedicated connection.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{CHUNK_CHECK_WAIT, Dest, Outbound};
use crate::proxy::detect::Protocol;
use crate::proxy::{ALPN_HTTP1, Body, ORIG_PROTO, PEER_IDENTITY, ProxyError, is_upgrade};

impl Outbound {
    /// One request from the app to a sidecar of `dest` (or of the backend
    /// its route picks), over the pooled HTTP/2 mTLS connection.
    pub(super) async fn forward(
        &self,
        mut req: Request<Incoming>,
        dest: &Dest,
        app: Protocol,
    ) -> Result<Response<Body>, ProxyError> {
        if app == Protocol::Http1 && is_upgrade(&req) {
            return Box::pin(self.upgrade(req, dest)).await;
        }
        check_framing(&req)?;
        if let Some(len) = content_length(&req)?
            && self.limits.max_request_body_bytes > 0
            && len > self.limits.max_request_body_bytes
        {
            return Err(ProxyError::TooLarge { limit: self.limits.max_request_body_bytes });
        }
        let chunked = req.headers().contains_key(TRANSFER_ENCODING);
        let target = match self.route(&mut req, dest)? {
            Some(backend) => Dest::Service(backend),
            None => dest.clone(),
        };
        let mut peer = self.pick(&target).await?;

        to_h2(&mut req, dest, app)?;
        let (parts, body) = req.into_parts();
        let body = if app == Protocol::Http1 && chunked {
            Box::pin(crate::proxy::body::check_first_frame(body, CHUNK_CHECK_WAIT))
                .await
                .map_err(ProxyError::BadBody)?
        } else {
            body.boxed_unsync()
        };
        let body = match parts.extensions.get::<crate::proxy::access::BytesIn>() {
            Some(c) => crate::proxy::access::CountIn::wrap(body, c.0.clone()),
            None => body,
        };
        let req = Request::from_parts(parts, body);

        // A request that can be sent again safely (idempotent, no body) is
        // kept, so a pooled connection found dead only once the request was
        // on it (reset, GOAWAY, ping timeout) costs a retry, not a failure.
        let replay = replayable(&req);
        // The pooled connection without an await; opening one (TLS, HTTP/2
        // handshake) is boxed so a request on a pooled connection does not
        // carry its state.
        let mut sender = match self.peers.pooled(&peer) {
            Some(s) => s,
            None => Box::pin(self.connect_h2(&target, &mut peer)).await?,
        };
        let send = async {
            let _ = sender.ready().await;
            match sender.try_send_request(req).await {
                Ok(r) => Ok(r),
                Err(mut e) => {
                    let retry = match e.take_message() {
                        // It never left: always safe to send on a new connection.
                        Some(req) => req,
                        None => match replay {
                            // No answer came: an idempotent request without a body may go again.
                            Some(parts) => Request::from_parts(parts, crate::proxy::full(Bytes::new())),
                            _ => return Err(ProxyError::Upstream(e.into_error())),
                        },
                    };
                    tracing::debug!(dst.addr = %peer.addr, error = %e.error(), "pooled connection failed; retrying on a new one");
                    self.peers.evict(&peer);
                    let mut fresh = Box::pin(self.peers.h2(&peer)).await?;
                    fresh.send_request(retry).await.map_err(ProxyError::Upstream)
                }
            }
        };
        let mut resp = tokio::time::timeout(self.limits.response_timeout, send)
            .await
            .map_err(|_| ProxyError::Timeout(self.limits.response_timeout))??;
        crate::proxy::strip_hop_by_hop(resp.headers_mut());
        *resp.version_mut() = if app == Protocol::Http1 { Version::HTTP_11 } else { Version::HTTP_2 };
        Ok(resp.map(|b| b.boxed_unsync()))
    }

    /// HTTP/1.1 Upgrade (WebSocket...): a dedicated mTLS connection speaking
    /// HTTP/1.1, then the two upgraded streams are spliced.
    async fn upgrade(&self, mut req: Request<Incoming>, dest: &Dest) -> Result<Response<Body>, ProxyError> {
        let peer = match self.route(&mut req, dest)? {
            Some(backend) => self.pick(&Dest::Service(backend)).await?,
            None => self.pick(dest).await?,
        };
        let tls = self.peers.connect(&peer, ALPN_HTTP1).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(ProxyError::Upstream)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let client_side = hyper::upgrade::on(&mut req);
        req.headers_mut().remove(PEER_IDENTITY);
        req.headers_mut().remove(ORIG_PROTO);
        let req = req.map(|b| b.boxed_unsync());
        let mut resp = tokio::time::timeout(self.limits.response_timeout, sender.send_request(req))
            .await
            .map_err(|_| ProxyError::Timeout(self.limits.response_timeout))?
            .map_err(ProxyError::Upstream)?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let server_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice_upgraded(client_side, server_side));
        } else {
            crate::proxy::no_upgrade(&mut resp);
        }
        Ok(resp.map(|b| b.boxed_unsync()))
    }
}

/// Rewrites a request of the app for HTTP/2 between sidecars: an absolute
/// URI (authority from Host, else the destination), no hop-by-hop headers
/// and no identity header of the app's, the app's version in ORIG_PROTO.
pub(super) fn to_h2<B>(req: &mut Request<B>, dest: &Dest, app: Protocol) -> Result<(), ProxyError> {
    let authority = authority_of(req).unwrap_or_else(|| Authority::try_from(dest.to_string()).ok());
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    let headers = req.headers_mut();
    crate::proxy::strip_hop_by_hop(headers);
    headers.remove(HOST);
    headers.remove(PEER_IDENTITY);
    headers.remove(ORIG_PROTO);
    if app == Protocol::Http1 {
        headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// A copy of a request that may be sent again: an idempotent method and no body.
pub(super) fn replayable(req: &Request<Body>) -> Option<http::request::Parts> {
    use http_body::Body as _;
    let idempotent = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy.into_parts().0)
}

/// Splices two upgraded HTTP/1.1 connections.
pub async fn splice_upgraded(a: hyper::upgrade::OnUpgrade, b: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(a, b) {
        Ok((a, b)) => {
            let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
            if let Err(e) = crate::proxy::tcp::splice(&mut a, &mut b).await {
                tracing::debug!(error = %e, "upgraded stream ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// The request's authority: the URI's, else the Host header.
pub(super) fn authority_of<B>(req: &Request<B>) -> Option<Option<Authority>> {
    if let Some(a) = req.uri().authority() {
        return Some(Some(a.clone()));
    }
    let host = req.headers().get(HOST)?;
    Some(Authority::try_from(host.as_bytes()).ok())
}

/// Refuses ambiguous HTTP/1 framing that must never be forwarded: both
/// Content-Length and Transfer-Encoding, or several Content-Length values.
pub(super) fn check_framing<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let h = req.headers();
    if h.contains_key(TRANSFER_ENCODING) && h.contains_key(CONTENT_LENGTH) {
        return Err(ProxyError::BadRequest("both Content-Length and Transfer-Encoding"));
    }
    if h.get_all(CONTENT_LENGTH).iter().count() > 1 {
        return Err(ProxyError::BadRequest("several Content-Length headers"));
    }
    Ok(())
}

pub(super) fn content_length<B>(req: &Request<B>) -> Result<Option<u64>, ProxyError> {
    match req.headers().get(CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or(ProxyError::BadRequest("invalid Content-Length")),
    }
}
