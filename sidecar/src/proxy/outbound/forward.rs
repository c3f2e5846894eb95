//! Carrying one request to the peer sidecar: HTTP/1 framing checks, the
//! rewrite to HTTP/2 (absolute URI, hop-by-hop headers, the app's protocol
//! in ORIG_PROTO), a retry on a pooled connection found dead, and HTTP/1.1
//! upgrades on a dedicated connection.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{CHUNK_CHECK_WAIT, Dest, Outbound};
use crate::proxy::detect::Protocol;
use crate::proxy::peer::{Peer, PeerError};
use crate::proxy::{ALPN_HTTP1, Body, ORIG_PROTO, PEER_IDENTITY, ProxyError, is_upgrade};

impl Outbound {
    /// One request from the app to a sidecar of `dest` (or of the backend
    /// its route picks), over pooled HTTP/2 mTLS connections, tried as its
    /// route allows ([`super::attempt`]); returns the answer and the tries.
    pub(super) async fn forward(
        &self,
        mut req: Request<Incoming>,
        dest: &Dest,
        app: Protocol,
    ) -> (Result<Response<Body>, ProxyError>, u32) {
        if app == Protocol::Http1 && is_upgrade(&req) {
            return (Box::pin(self.upgrade(req, dest)).await, 1);
        }
        let prepared = async {
            check_framing(&req)?;
            if let Some(len) = content_length(&req)?
                && self.limits.max_request_body_bytes > 0
                && len > self.limits.max_request_body_bytes
            {
                return Err(ProxyError::TooLarge { limit: self.limits.max_request_body_bytes });
            }
            let chunked = req.headers().contains_key(TRANSFER_ENCODING);
            let (target, resilience) = match self.route(&mut req, dest)? {
                Some((backend, r)) => (backend.map_or_else(|| dest.clone(), Dest::Service), Some(r)),
                None => (dest.clone(), None),
            };
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
            Ok((parts, body, target, resilience))
        };
        let (parts, body, target, resilience) = match prepared.await {
            Ok(p) => p,
            Err(e) => return (Err(e), 0),
        };
        let grpc = crate::proxy::is_grpc(&parts.headers);
        let res = resilience.as_deref().unwrap_or(&super::attempt::NO_ROUTE);
        let called = self.call(parts, body, &target, res, grpc).await;
        let resp = called.result.map(|mut resp| {
            crate::proxy::strip_hop_by_hop(resp.headers_mut());
            *resp.version_mut() = if app == Protocol::Http1 { Version::HTTP_11 } else { Version::HTTP_2 };
            resp.map(|b| b.boxed_unsync())
        });
        (resp, called.attempts)
    }

    /// The pooled HTTP/2 connection to `peer`, or a new one (boxed: a
    /// request on a pooled connection does not carry the connect's state).
    pub(super) async fn sender(
        &self,
        peer: &Peer,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, ProxyError> {
        match self.peers.pooled(peer) {
            Some(s) => Ok(s),
            None => Ok(Box::pin(self.peers.h2(peer)).await?),
        }
    }

    /// Sends one try on `sender`. A pooled connection found dead before the
    /// request left (GOAWAY, reset) costs a new connection to the same
    /// peer, not a try.
    pub(super) async fn send(
        &self,
        sender: &mut hyper::client::conn::http2::SendRequest<Body>,
        peer: &Peer,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let _ = sender.ready().await;
        match sender.try_send_request(req).await {
            Ok(r) => Ok(r),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    tracing::debug!(dst.addr = %peer.addr, error = %e.error(), "pooled connection failed; sending on a new one");
                    self.peers.evict(peer);
                    let mut fresh = Box::pin(self.peers.h2(peer)).await?;
                    fresh.send_request(req).await.map_err(ProxyError::Upstream)
                }
                None => Err(ProxyError::Upstream(e.into_error())),
            },
        }
    }

    /// HTTP/1.1 Upgrade (WebSocket...): a dedicated mTLS connection speaking
    /// HTTP/1.1, then the two upgraded streams are spliced.
    async fn upgrade(&self, mut req: Request<Incoming>, dest: &Dest) -> Result<Response<Body>, ProxyError> {
        let target = match self.route(&mut req, dest)? {
            Some((Some(backend), _)) => Dest::Service(backend),
            _ => dest.clone(),
        };
        let (peer, flight) = self.choose(&target, None).await?;
        let tls = self.peers.connect(&peer, ALPN_HTTP1).await;
        let outcome = match &tls {
            Ok(_) => Some(crate::balance::Outcome::Success),
            Err(PeerError::Connect { .. } | PeerError::Timeout { .. }) => Some(crate::balance::Outcome::Unreachable),
            Err(_) => None,
        };
        if let (Some(f), Some(outcome)) = (flight, outcome) {
            self.balancer.finish(f, outcome, self.balancing().as_ref());
        }
        let tls = tls?;
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
    headers.remove(super::attempt::ATTEMPT);
    headers.remove(super::ATTEMPTS);
    if app == Protocol::Http1 {
        headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    *req.version_mut() = Version::HTTP_2;
    Ok(())
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
