//! The outbound side: the local app connects in plaintext to an explicit
//! upstream port (`--upstream 127.0.0.1:9001=orders.shop`). The protocol is
//! detected; HTTP requests go over the pooled HTTP/2 mTLS connection to a
//! sidecar of the service, opaque TCP over a dedicated mTLS connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::detect::{Prefixed, Protocol, detect};
use super::peer::{Peer, PeerClient};
use super::tcp::{ConnGuard, Counted};
use super::{ALPN_TCP, Body, Direction, is_grpc};
use crate::config::{Limits, Upstream};
use crate::directory::Directory;
use crate::metrics::Metrics;

mod attempt;
mod forward;
mod route;
#[cfg(test)]
mod tests;

pub use attempt::{ATTEMPT, grpc_timeout};
use forward::authority_of;
pub use forward::splice_upgraded;

/// How long to wait for the first chunk of an HTTP/1 chunked body before
/// forwarding, so a malformed first chunk is refused rather than forwarded.
const CHUNK_CHECK_WAIT: Duration = Duration::from_millis(20);

/// On the answer to the app: how many tries the call took (absent: one).
pub const ATTEMPTS: http::HeaderName = http::HeaderName::from_static("x-palisade-attempts");

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

pub use crate::config::Egress;

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
    /// Which endpoint of a service each call goes to.
    pub balancer: Arc<crate::balance::Balancer>,
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
        // Balanced by connection: the endpoint with fewer open (weighted by
        // its connect latency) of two drawn; one unreachable is ejected and
        // another tried.
        let mut avoid = None;
        let mut tls = None;
        for _ in 0..3 {
            let (peer, flight) = match self.choose(dest, avoid).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(src.addr = %src, dst = %dest, error = %e, "outbound TCP refused");
                    return;
                }
            };
            match self.peers.connect(&peer, ALPN_TCP).await {
                Ok(t) => {
                    // The connect is the latency sample; the connection stays
                    // counted in flight while it is open.
                    let open = flight.as_ref().map(|f| self.balancer.again(f));
                    if let Some(f) = flight {
                        self.balancer.finish(f, crate::balance::Outcome::Success, self.balancing().as_ref());
                    }
                    tls = Some((t, peer, open));
                    break;
                }
                Err(e) => {
                    tracing::warn!(src.addr = %src, dst.addr = %peer.addr, dst.identity = %peer.identity, error = %e, "outbound TCP failed");
                    let down =
                        matches!(e, super::peer::PeerError::Connect { .. } | super::peer::PeerError::Timeout { .. });
                    if let Some(f) = flight.filter(|_| down) {
                        self.balancer.finish(f, crate::balance::Outcome::Unreachable, self.balancing().as_ref());
                    }
                    if !down || matches!(dest, Dest::Peer(_)) {
                        return;
                    }
                    avoid = Some(peer.addr);
                }
            }
        }
        let Some((mut tls, peer, _open)) = tls else { return };
        match super::tcp::splice(&mut io, &mut tls).await {
            Ok((up, down)) => {
                tracing::debug!(src.addr = %src, dst.addr = %peer.addr, bytes_up = up, bytes_down = down, "TCP stream closed")
            }
            Err(e) => {
                tracing::debug!(src.addr = %src, dst.addr = %peer.addr, error = %e, "TCP stream ended with an error")
            }
        }
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
        super::access::finish(resp, span, entry, true)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, dest: Arc<Dest>, app: Protocol) -> Response<Body> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        // Boxed: the forward's state is allocated once instead of being
        // moved with this future at every step.
        let (resp, attempts) = Box::pin(self.forward(req, &dest, app)).await;
        let (mut resp, error) = match resp {
            Ok(r) => (r, None),
            Err(e) => {
                tracing::warn!(direction = "outbound", dst = %dest, http.method = %method, http.path = %path, attempts, error = %e, "request failed");
                (e.response(grpc), Some(e.reason()))
            }
        };
        // Palisade's to say, never the callee's.
        resp.headers_mut().remove(ATTEMPTS);
        if attempts > 1 {
            resp.headers_mut().insert(ATTEMPTS, http::HeaderValue::from(attempts));
        }
        // For the access-log line (the response's extensions stay in this process).
        resp.extensions_mut().insert(super::access::CallNote { attempts, error });
        self.metrics.request(Direction::Outbound, resp.status().as_u16(), start.elapsed());
        resp
    }
}
