//! The outbound side: the local app connects in plaintext to an explicit
//! upstream port (`--upstream 127.0.0.1:9001=orders.shop`). The protocol is
//! detected; HTTP requests go over the pooled HTTP/2 mTLS connection to a
//! sidecar of the service, opaque TCP over a dedicated mTLS connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::detect::{Prefixed, Protocol, detect};
use super::peer::{Peer, PeerClient, PeerError};
use super::tcp::{ConnGuard, Counted};
use super::{ALPN_HTTP1, ALPN_TCP, Body, Direction, ORIG_PROTO, PEER_IDENTITY, ProxyError, is_grpc, is_upgrade};
use crate::config::{Limits, Upstream};
use crate::directory::{Directory, LookupError};
use crate::metrics::Metrics;

/// How long to wait for the first chunk of an HTTP/1 chunked body before
/// forwarding, so a malformed first chunk is refused rather than forwarded.
const CHUNK_CHECK_WAIT: Duration = Duration::from_millis(20);

/// On a directory miss (a service or address this sidecar never asked
/// about), how long a connection or request waits for the control plane's answer.
const DIRECTORY_MISS_WAIT: Duration = Duration::from_secs(1);

/// Where an outbound connection goes.
#[derive(Debug, Clone)]
pub enum Dest {
    /// An explicit upstream: a sidecar of this service, from the directory.
    Service(Arc<str>),
    /// Transparent mode: the original destination, a meshed pod with this identity.
    Peer(Peer),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service(s) => f.write_str(s),
            Self::Peer(p) => write!(f, "{}", p.addr),
        }
    }
}

/// What transparent mode does with traffic to destinations outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Connect to the original destination in plaintext, as if there were no mesh.
    Passthrough,
    /// Close the connection.
    Deny,
}

/// Shared state of the outbound side.
#[derive(Debug)]
pub struct Outbound {
    pub directory: Arc<Directory>,
    pub peers: Arc<PeerClient>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub opaque_ports: Vec<u16>,
    pub access_log: bool,
    /// Share of requests logged.
    pub access_log_sampling: f64,
    pub egress: Egress,
    /// The policy in force: its routes pick where requests go.
    pub policy: crate::policy::PolicyState,
    /// Draws for weighted routes.
    pub draws: std::sync::atomic::AtomicU64,
    /// Spans, when an OTLP collector is configured.
    pub tracing: crate::trace::Tracing,
    /// This workload's certificate (its identity, for access logs).
    pub me: palisade_certs::tls::SvidStore,
}

impl Outbound {
    /// Accepts on one upstream listener until cancelled.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        upstream: Upstream,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let opaque = self.opaque_ports.contains(&upstream.listen.port());
        let dest = Arc::new(Dest::Service(upstream.service.into()));
        let limit = self.limits.max_connections;
        palisade_net::serve(
            listener,
            palisade_net::Limit::new("outbound", limit),
            cancel.clone(),
            tracker,
            move |tcp, src, slot| {
                let conn = self.clone().connection(tcp, src, dest.clone(), opaque, cancel.clone());
                async move {
                    let _slot = slot;
                    conn.await
                }
            },
        )
        .await;
    }

    /// Transparent mode: connections the pod's iptables rules redirected
    /// here; the original destination (SO_ORIGINAL_DST) decides where they go.
    pub async fn serve_transparent(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let local = listener.local_addr().ok();
        let limit = self.limits.max_connections;
        palisade_net::serve(listener, palisade_net::Limit::new("outbound", limit), cancel.clone(), tracker, move |tcp, src, slot| {
            let this = self.clone();
            let cancel = cancel.clone();
            async move {
                let _slot = slot;
                let Some(orig) = super::original_dst(&tcp) else {
                    tracing::warn!(src.addr = %src, "no original destination: connect to an --upstream port, or redirect with `palisade-sidecar init`");
                    return;
                };
                if Some(orig) == local {
                    tracing::warn!(src.addr = %src, "refusing a connection addressed to the outbound listener itself (loop)");
                    return;
                }
                match this.directory.identity_for_ip_or_wait(orig.ip(), DIRECTORY_MISS_WAIT).await {
                    Some(identity) => {
                        let opaque = this.opaque_ports.contains(&orig.port());
                        let dest = Arc::new(Dest::Peer(Peer { addr: orig, identity }));
                        this.connection(tcp, src, dest, opaque, cancel).await;
                    }
                    None if this.egress == Egress::Deny => {
                        tracing::warn!(target: "audit", decision = "deny", src.addr = %src, dst.addr = %orig, "egress to an unmeshed destination refused (--egress deny)");
                    }
                    None => {
                        let _guard = ConnGuard::new(this.metrics.clone(), Direction::Outbound);
                        match TcpStream::connect(orig).await {
                            Ok(mut upstream) => {
                                let mut io = Counted::new(tcp, this.metrics.clone(), Direction::Outbound);
                                let _ = super::tcp::splice(&mut io, &mut upstream).await;
                            }
                            Err(e) => tracing::debug!(dst.addr = %orig, error = %e, "egress connect failed"),
                        }
                    }
                }
            }
        })
        .await;
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        src: SocketAddr,
        dest: Arc<Dest>,
        opaque: bool,
        cancel: CancellationToken,
    ) {
        let _guard = ConnGuard::new(self.metrics.clone(), Direction::Outbound);
        let _ = tcp.set_nodelay(true);
        let mut io = Counted::new(tcp, self.metrics.clone(), Direction::Outbound);
        let (proto, prefix) = if opaque {
            (Protocol::Opaque, bytes::Bytes::new())
        } else {
            match detect(&mut io, self.limits.protocol_detect_timeout).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(src.addr = %src, error = %e, "connection failed during detection");
                    return;
                }
            }
        };
        let io = Prefixed::new(prefix, io);
        // Allocated only now: a connection still in detection costs little.
        Box::pin(self.serve_as(proto, io, src, dest, cancel)).await;
    }

    async fn serve_as(
        self: Arc<Self>,
        proto: Protocol,
        io: Prefixed<Counted<TcpStream>>,
        src: SocketAddr,
        dest: Arc<Dest>,
        cancel: CancellationToken,
    ) {
        let result = match proto {
            Protocol::Opaque => return self.tcp(io, src, &dest).await,
            Protocol::Http1 => {
                let this = self.clone();
                let limits = self.limits.clone();
                let io = super::h1guard::H1Guard::new(io, limits.max_header_bytes, limits.max_headers);
                super::serve::http1(TokioIo::new(io), &limits, cancel, move |req| {
                    this.clone().request(req, dest.clone(), Protocol::Http1, src)
                })
                .await
            }
            Protocol::Http2 => {
                let this = self.clone();
                let limits = self.limits.clone();
                super::serve::http2(TokioIo::new(io), &limits, cancel, move |req| {
                    this.clone().request(req, dest.clone(), Protocol::Http2, src)
                })
                .await
            }
        };
        if let Err(e) = result {
            tracing::debug!(src.addr = %src, direction = "outbound", error = %e, "connection ended with an error");
        }
    }

    /// Opaque TCP: a dedicated mTLS connection, bytes spliced both ways.
    async fn tcp<I>(&self, mut io: I, src: SocketAddr, dest: &Dest)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let peer = match self.pick(dest).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(src.addr = %src, dst = %dest, error = %e, "outbound TCP refused");
                return;
            }
        };
        let mut tls = match self.peers.connect(&peer, ALPN_TCP).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(src.addr = %src, dst.addr = %peer.addr, dst.identity = %peer.identity, error = %e, "outbound TCP failed");
                return;
            }
        };
        match super::tcp::splice(&mut io, &mut tls).await {
            Ok((up, down)) => {
                tracing::debug!(src.addr = %src, dst.addr = %peer.addr, bytes_up = up, bytes_down = down, "TCP stream closed")
            }
            Err(e) => {
                tracing::debug!(src.addr = %src, dst.addr = %peer.addr, error = %e, "TCP stream ended with an error")
            }
        }
    }

    /// A new HTTP/2 connection to `peer`; when it cannot be reached at all
    /// (refused, timed out: nothing was sent), another sidecar of the same
    /// service is tried (3 in all), and the unreachable one is passed over
    /// for a while: a sidecar that died stays in the directory until its
    /// certificate expires.
    async fn connect_h2(
        &self,
        target: &Dest,
        peer: &mut Peer,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, ProxyError> {
        let mut attempt = 0;
        loop {
            match self.peers.h2(peer).await {
                Ok(s) => return Ok(s),
                Err(e @ (PeerError::Connect { .. } | PeerError::Timeout { .. }))
                    if attempt < 2 && matches!(target, Dest::Service(_)) =>
                {
                    self.directory.mark_down(peer.addr);
                    let next = self.pick(target).await?;
                    if next.addr == peer.addr {
                        return Err(e.into());
                    }
                    tracing::info!(dst = %target, unreachable = %peer.addr, next = %next.addr, error = %e, "peer sidecar unreachable; trying another");
                    *peer = next;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn pick(&self, dest: &Dest) -> Result<Peer, ProxyError> {
        let service = match dest {
            Dest::Peer(p) => return Ok(p.clone()),
            Dest::Service(s) => s,
        };
        self.directory.pick_or_wait(service, DIRECTORY_MISS_WAIT).await.map_err(|e| match e {
            LookupError::NotLoaded => ProxyError::NoDirectory,
            LookupError::Unknown => ProxyError::UnknownService(service.to_string()),
        })
    }

    /// The backend service a TrafficPolicy route sends this request to (the
    /// first route that matches the called service, path and headers), with
    /// the path rewritten when the route says so; `None` when no route
    /// matches. Routing decides where a request goes, not whether it may:
    /// the backend's sidecar enforces its own policy on what it receives.
    fn route<B>(&self, req: &mut Request<B>, dest: &Dest) -> Result<Option<Arc<str>>, ProxyError> {
        let Some(policy) = self.policy.current() else { return Ok(None) };
        let routes = policy.enforcer.routes();
        if routes.is_empty() {
            return Ok(None);
        }
        let service = match dest {
            Dest::Service(s) => s.clone(),
            Dest::Peer(p) => match self.directory.service_for_ip(p.addr.ip()) {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        if !routes.for_service(&service) {
            return Ok(None);
        }
        // Routes match the path as the callee will see it (normalised); a
        // path that cannot be normalised goes unrouted and the callee refuses it.
        let Ok(path) = palisade_policy::path::normalize(req.uri().path()) else { return Ok(None) };
        let Some(route) = routes.route(&service, &path, &super::RequestHeaders(req.headers())) else {
            return Ok(None);
        };
        let backend = route.pick(self.draw()).clone();
        if let Some(slot) = req.extensions().get::<Arc<super::access::Decided>>() {
            slot.set(route.policy.clone(), Some(route.index));
        }
        if let Some(new) = route.rewrite(&path) {
            let pq = match req.uri().query() {
                Some(q) => format!("{new}?{q}"),
                None => new,
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query =
                Some(PathAndQuery::try_from(pq).map_err(|_| ProxyError::BadRequest("invalid request target"))?);
            *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        }
        self.metrics
            .routes
            .get_or_create(&crate::metrics::RouteLabels {
                route: format!("{}#{}", route.policy, route.index),
                backend: backend.to_string(),
            })
            .inc();
        tracing::debug!(dst = %dest, route.policy = %route.policy, route.index = route.index, backend = %backend, "routed");
        Ok(Some(backend))
    }

    /// A uniform draw for a weighted route (splitmix64 over a counter: no
    /// lock, well spread, not for secrets).
    fn draw(&self) -> u32 {
        let mut z = self.draws.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 32) as u32
    }

    async fn request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        dest: Arc<Dest>,
        app: Protocol,
        src: SocketAddr,
    ) -> Response<Body> {
        let log = self.access_log && super::access::sampled(self.access_log_sampling);
        if !self.tracing.enabled() && !log {
            return self.handle(req, dest, app).await;
        }
        // A client span: a child of the app's traceparent, if it sent one.
        use opentelemetry::KeyValue;
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let span = self.tracing.start_request(
            opentelemetry::trace::SpanKind::Client,
            method.as_str(),
            req.headers_mut(),
            || {
                vec![
                    KeyValue::new("http.request.method", method.to_string()),
                    KeyValue::new("url.path", uri.path().to_string()),
                    KeyValue::new("server.address", dest.to_string()),
                    KeyValue::new("palisade.direction", "outbound"),
                ]
            },
        );
        let entry = log.then(|| {
            // src is the app's side of the connection; the destination is the callee.
            let mut e = super::access::Entry::new("outbound", src);
            e.caller = self.me.get().map(|s| s.id.to_string());
            e.callee = Some(match &*dest {
                Dest::Service(s) => s.to_string(),
                Dest::Peer(p) => p.identity.to_string(),
            });
            e.method = method.to_string();
            e.authority = authority_of(&req).flatten().map(|a| a.to_string());
            e.path = uri.path().to_string();
            e.trace_id = span.trace_id();
            req.extensions_mut().insert(e.decided.clone());
            req.extensions_mut().insert(super::access::BytesIn(e.bytes_in.clone()));
            e
        });
        let resp = self.clone().handle(req, dest, app).await;
        let status = resp.status().as_u16();
        let decision = super::decision_of(status, resp.headers().contains_key("x-palisade-error"));
        if span.recording() {
            span.set(super::response_attributes(&resp, decision));
        }
        span.end(status, true);
        match entry {
            Some(e) => {
                let grpc = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
                resp.map(|b| super::access::Logged::wrap(b, e, status, grpc, decision))
            }
            None => resp,
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, dest: Arc<Dest>, app: Protocol) -> Response<Body> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        // Boxed: the forward's state is allocated once instead of being
        // moved with this future at every step.
        let resp = match Box::pin(self.forward(req, &dest, app)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(direction = "outbound", dst = %dest, http.method = %method, http.path = %path, error = %e, "request failed");
                e.response(grpc)
            }
        };
        self.metrics.request(Direction::Outbound, resp.status().as_u16(), start.elapsed());
        resp
    }

    async fn forward(
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

        // Rewrite for HTTP/2: absolute URI (authority from Host), no
        // hop-by-hop headers, the app's version carried in ORIG_PROTO.
        let authority = authority_of(&req).unwrap_or_else(|| Authority::try_from(dest.to_string()).ok());
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = authority;
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        let headers = req.headers_mut();
        super::strip_hop_by_hop(headers);
        headers.remove(HOST);
        headers.remove(PEER_IDENTITY);
        headers.remove(ORIG_PROTO);
        if app == Protocol::Http1 {
            headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        *req.version_mut() = Version::HTTP_2;
        let (parts, body) = req.into_parts();
        let body = if app == Protocol::Http1 && chunked {
            Box::pin(super::body::check_first_frame(body, CHUNK_CHECK_WAIT)).await.map_err(ProxyError::BadBody)?
        } else {
            body.boxed_unsync()
        };
        let body = match parts.extensions.get::<super::access::BytesIn>() {
            Some(c) => super::access::CountIn::wrap(body, c.0.clone()),
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
                            Some(parts) => Request::from_parts(parts, super::full(Bytes::new())),
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
        super::strip_hop_by_hop(resp.headers_mut());
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
            super::no_upgrade(&mut resp);
        }
        Ok(resp.map(|b| b.boxed_unsync()))
    }
}

/// A copy of a request that may be sent again: an idempotent method and no body.
fn replayable(req: &Request<Body>) -> Option<http::request::Parts> {
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
            if let Err(e) = super::tcp::splice(&mut a, &mut b).await {
                tracing::debug!(error = %e, "upgraded stream ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// The request's authority: the URI's, else the Host header.
fn authority_of<B>(req: &Request<B>) -> Option<Option<Authority>> {
    if let Some(a) = req.uri().authority() {
        return Some(Some(a.clone()));
    }
    let host = req.headers().get(HOST)?;
    Some(Authority::try_from(host.as_bytes()).ok())
}

/// Refuses ambiguous HTTP/1 framing that must never be forwarded: both
/// Content-Length and Transfer-Encoding, or several Content-Length values.
fn check_framing<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let h = req.headers();
    if h.contains_key(TRANSFER_ENCODING) && h.contains_key(CONTENT_LENGTH) {
        return Err(ProxyError::BadRequest("both Content-Length and Transfer-Encoding"));
    }
    if h.get_all(CONTENT_LENGTH).iter().count() > 1 {
        return Err(ProxyError::BadRequest("several Content-Length headers"));
    }
    Ok(())
}

fn content_length<B>(req: &Request<B>) -> Result<Option<u64>, ProxyError> {
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
