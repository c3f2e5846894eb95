//! The inbound side: peer sidecars connect with mTLS (their chain verified
//! against the trust bundle, their SPIFFE ID in our trust domain); in
//! PERMISSIVE mode plaintext clients are accepted too, as unauthenticated.
//! ALPN says what the connection carries: `h2` (multiplexed HTTP),
//! `http/1.1` (an upgrade), or opaque TCP. Requests reach the local app over
//! pooled connections, in the protocol the calling app spoke, with the
//! verified caller identity in `x-palisade-peer-identity`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use palisade_certs::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bytes::BytesMut;

use super::detect::{Detected, Prefixed, Protocol, detect_with};
use super::tcp::{ConnGuard, Counted};
use super::{
    ALPN_H2, ALPN_HTTP1, ALPN_TCP, Body, Direction, ORIG_PROTO, PEER_IDENTITY, ProxyError, REQUEST_PRINCIPAL,
    RequestHeaders, error_response, is_grpc, is_upgrade,
};
use crate::config::Limits;
use crate::metrics::{AuthnLabels, Metrics};
use palisade_policy::AuthnOutcome;

/// One local app port and its connections.
#[derive(Debug)]
pub struct AppTarget {
    pub addr: SocketAddr,
    authority: http::uri::Authority,
    pool: super::pool::AppPool,
}

impl AppTarget {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            authority: http::uri::Authority::try_from(addr.to_string().as_str())
                .expect("invariant: a SocketAddr is a valid authority"),
            pool: super::pool::AppPool::new(addr),
        }
    }
}

/// Places beyond the handshake limit only 127.0.0.1 and ::1 may take.
const RESERVED_LOOPBACK: usize = 8;

/// Where a connection goes once its handshake is done: peers with a
/// verified certificate and (PERMISSIVE) plaintext callers have budgets of
/// their own, so neither a flood of handshakes nor of plaintext connections
/// takes the places of the mesh's peers.
#[derive(Debug, Clone)]
struct Established {
    peers: palisade_net::Limit,
    plaintext: palisade_net::Limit,
}

/// The verified caller of one connection, worked out once per connection:
/// its identity as the policy subject and as the header value the app gets.
#[derive(Debug)]
pub struct Caller {
    pub id: SpiffeId,
    subject: String,
    header: HeaderValue,
    /// A connection may outlive the certificate it was opened with; requests
    /// on it are refused from then on.
    not_after: SystemTime,
}

impl Caller {
    fn from_certs(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> Option<Arc<Self>> {
        let (id, info) = palisade_certs::tls::peer_identity(certs)?;
        let subject = id.to_string();
        let header = HeaderValue::from_str(&subject).ok()?;
        Some(Arc::new(Self { id, subject, header, not_after: info.not_after }))
    }

    fn expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }
}

/// How the inbound side is set up (from the sidecar's flags).
#[derive(Debug, Clone)]
pub struct InboundOptions {
    /// Where inbound traffic is delivered.
    pub app: SocketAddr,
    /// Plaintext callers are accepted (as unauthenticated).
    pub permissive: bool,
    pub limits: Limits,
    /// App ports that carry opaque TCP (no detection).
    pub opaque_ports: Vec<u16>,
    /// App ports that carry only HTTP: anything else is refused.
    pub http_ports: Vec<u16>,
    pub access_log: bool,
    /// Share of requests logged.
    pub access_log_sampling: f64,
    /// In transparent mode, the original destination port picks the app port.
    pub transparent: bool,
    /// Spans, when an OTLP collector is configured.
    pub tracing: crate::trace::Tracing,
    /// Taps and preview recording.
    pub observe: Arc<crate::observe::Observe>,
}

/// Shared state of the inbound side.
pub struct Inbound {
    opts: InboundOptions,
    tls: tokio_rustls::TlsAcceptor,
    metrics: Arc<Metrics>,
    apps: std::sync::Mutex<std::collections::HashMap<u16, Arc<AppTarget>>>,
    /// The policy in force (none yet: not ready).
    policy: crate::policy::PolicyState,
    /// This workload's identity, for logs.
    svids: palisade_certs::tls::SvidStore,
    tracing: crate::trace::Tracing,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").field("opts", &self.opts).finish_non_exhaustive()
    }
}

impl Inbound {
    pub fn new(
        opts: InboundOptions,
        tls: rustls::ServerConfig,
        policy: crate::policy::PolicyState,
        svids: palisade_certs::tls::SvidStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        let app = opts.app;
        Self {
            tracing: opts.tracing.clone(),
            opts,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            metrics,
            apps: std::sync::Mutex::new(std::collections::HashMap::from([(app.port(), Arc::new(AppTarget::new(app)))])),
            policy,
            svids,
        }
    }

    /// Accepts until cancelled.
    ///
    /// A connection holds a place among the handshakes (per source address
    /// too) until it has proved a certificate, then moves to the peers'
    /// budget; what never gets there is let go at `--handshake-timeout`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, cancel: CancellationToken, tracker: TaskTracker) {
        let l = &self.opts.limits;
        let m = &self.metrics;
        let handshakes = m.count_refusals(
            palisade_net::Limit::new("inbound-handshake", l.max_handshakes)
                .per_ip(l.max_handshakes_per_ip)
                .reserve_loopback(RESERVED_LOOPBACK)
                // A full budget takes the oldest handshake back for a newer one.
                .evict_oldest(),
        );
        let established = Established {
            peers: m.count_refusals(
                palisade_net::Limit::new("inbound", l.max_connections).per_ip(l.max_connections_per_ip),
            ),
            plaintext: m.count_refusals(
                palisade_net::Limit::new("inbound-plaintext", l.max_connections).per_ip(l.max_connections_per_ip),
            ),
        };
        palisade_net::serve(listener, handshakes, cancel.clone(), tracker, move |tcp, src, slot| {
            self.clone().connection(tcp, src, slot, established.clone(), cancel.clone())
        })
        .await;
    }

    /// The app a connection is for: `--app`, or in transparent mode the same
    /// host at the connection's original destination port.
    fn app_for(&self, tcp: &TcpStream) -> Arc<AppTarget> {
        let port = if self.opts.transparent {
            let listener_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
            super::original_dst(tcp).map(|o| o.port()).filter(|p| *p != listener_port)
        } else {
            None
        };
        let port = port.unwrap_or(self.opts.app.port());
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.entry(port).or_insert_with(|| Arc::new(AppTarget::new(SocketAddr::new(self.opts.app.ip(), port)))).clone()
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        src: SocketAddr,
        handshaking: palisade_net::Slot,
        established: Established,
        cancel: CancellationToken,
    ) {
        let app = self.app_for(&tcp);
        let _guard = ConnGuard::new(self.metrics.clone(), Direction::Inbound);
        let _ = tcp.set_nodelay(true);
        // One deadline from accept for the first byte and the handshake.
        let deadline = tokio::time::Instant::now() + self.opts.limits.handshake_timeout;
        let mut first = [0u8; 1];
        let peek = async {
            tokio::select! {
                r = tcp.peek(&mut first) => r,
                _ = handshaking.evicted() => Ok(0),
            }
        };
        let is_tls = match tokio::time::timeout_at(deadline, peek).await {
            Ok(Ok(1)) => first[0] == 0x16,
            Err(_) => {
                self.metrics.tls_failure(Direction::Inbound, "timeout");
                return;
            }
            _ => return,
        };
        let io = Counted::new(tcp, self.metrics.clone(), Direction::Inbound);
        if !is_tls {
            if !self.opts.permissive {
                self.metrics.tls_failure(Direction::Inbound, "plaintext");
                tracing::warn!(target: "audit", decision = "deny", src.addr = %src, "plaintext connection refused (mTLS mode STRICT)");
                return;
            }
            // PERMISSIVE: a plaintext client, detected like any byte stream.
            let Some(_slot) = established.plaintext.try_take_for(src.ip()) else {
                tracing::warn!(src.addr = %src, "plaintext connection limit reached (--max-connections[-per-ip]); closing");
                return;
            };
            drop(handshaking);
            return Box::pin(self.stream(io, src, None, app, cancel)).await;
        }
        // The rest of a connection's state is allocated once it has sent a
        // first byte: an idle connection costs only this small future.
        Box::pin(self.secured(io, src, app, (handshaking, established.peers, deadline), cancel)).await;
    }

    async fn secured(
        self: Arc<Self>,
        io: Counted<TcpStream>,
        src: SocketAddr,
        app: Arc<AppTarget>,
        (handshaking, peers, deadline): (palisade_net::Slot, palisade_net::Limit, tokio::time::Instant),
        cancel: CancellationToken,
    ) {
        let accept = async {
            tokio::select! {
                r = self.tls.accept(io) => Some(r),
                _ = handshaking.evicted() => None,
            }
        };
        let tls = match tokio::time::timeout_at(deadline, accept).await {
            Ok(None) => return,
            Ok(Some(Ok(tls))) => tls,
            Ok(Some(Err(e))) => {
                let reason = handshake_reason(&e);
                self.metrics.tls_failure(Direction::Inbound, reason);
                tracing::warn!(target: "audit", decision = "deny", src.addr = %src, reason, error = %e, "inbound TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls_failure(Direction::Inbound, "timeout");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let Some(caller) = Caller::from_certs(session.peer_certificates()) else {
            // The verifier makes valid client certificates mandatory; this cannot pass it.
            return;
        };
        let Some(_slot) = peers.try_take_for(src.ip()) else {
            tracing::warn!(src.addr = %src, src.identity = %caller.id, "connection limit reached (--max-connections[-per-ip]); closing");
            return;
        };
        drop(handshaking);
        let result = match alpn.as_deref() {
            Some(ALPN_H2) => {
                let this = self.clone();
                super::serve::http2(TokioIo::new(tls), &self.opts.limits, cancel, move |req| {
                    this.clone().request(req, Some(caller.clone()), src, None, app.clone())
                })
                .await
            }
            Some(ALPN_HTTP1) => {
                let this = self.clone();
                let limits = &self.opts.limits;
                let io = super::h1guard::H1Guard::new(tls, limits.max_header_bytes, limits.max_headers);
                super::serve::http1(TokioIo::new(io), limits, cancel, move |req| {
                    this.clone().request(req, Some(caller.clone()), src, Some(Protocol::Http1), app.clone())
                })
                .await
            }
            // Whatever the calling sidecar decided, the bytes are looked at
            // again here: HTTP is served as HTTP (identity header, L7 policy,
            // framing guard, timeouts), never spliced past them.
            Some(ALPN_TCP) => return self.stream(tls, src, Some(caller), app, cancel).await,
            other => {
                tracing::warn!(src.addr = %src, src.identity = %caller.id, alpn = ?other.map(String::from_utf8_lossy), "unknown ALPN; closing");
                return;
            }
        };
        if let Err(e) = result {
            tracing::debug!(src.addr = %src, direction = "inbound", error = %e, "connection ended with an error");
        }
    }

    /// A byte stream from a caller (opaque TCP from a peer sidecar, or a
    /// plaintext client in PERMISSIVE mode): detected here.
    ///
    /// Fail closed: a client that speaks first must speak valid HTTP/1.1 or
    /// HTTP/2, or it is refused (400 and close); bytes are carried opaque
    /// only on a port declared opaque, or when the client stays silent and
    /// the app speaks first (a server-speaks-first protocol). The protocol
    /// is never the caller's choice.
    async fn stream<I>(
        self: Arc<Self>,
        mut io: I,
        src: SocketAddr,
        caller: Option<Arc<Caller>>,
        app: Arc<AppTarget>,
        cancel: CancellationToken,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let port = app.addr.port();
        if self.opts.opaque_ports.contains(&port) {
            return self.tcp(io, src, caller.as_deref(), &app, None).await;
        }
        let declared_http = self.opts.http_ports.contains(&port);
        let limits = &self.opts.limits;
        let mut buf = BytesMut::with_capacity(64);
        let first_wait = if declared_http { limits.header_read_timeout } else { limits.protocol_detect_timeout };
        let detected = match detect_with(&mut io, &mut buf, first_wait).await {
            Ok(Detected::TimedOut) if buf.is_empty() && !declared_http => {
                return self.first_speaker(io, buf, src, caller, app, cancel).await;
            }
            Ok(Detected::TimedOut) if !buf.is_empty() && !declared_http => {
                // The client spoke first: the whole start must come within
                // the header timeout, however slowly it is sent.
                let rest = limits.header_read_timeout.saturating_sub(first_wait);
                detect_with(&mut io, &mut buf, rest).await
            }
            other => other,
        };
        self.client_spoke(detected, io, buf, src, caller, app, cancel).await;
    }

    /// What a client that spoke first sent decides: HTTP is served, anything
    /// else is refused.
    #[allow(clippy::too_many_arguments)]
    async fn client_spoke<I>(
        self: Arc<Self>,
        detected: std::io::Result<Detected>,
        mut io: I,
        buf: BytesMut,
        src: SocketAddr,
        caller: Option<Arc<Caller>>,
        app: Arc<AppTarget>,
        cancel: CancellationToken,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let identity = caller.as_ref().map(|c| c.subject.as_str());
        let reason = match detected {
            Ok(Detected::Known(p @ (Protocol::Http1 | Protocol::Http2))) => {
                return self.serve_as(p, Prefixed::new(buf.freeze(), io), src, caller, app, cancel).await;
            }
            Err(_) => return,
            Ok(Detected::Eof) if buf.is_empty() => return,
            Ok(Detected::Known(Protocol::Opaque) | Detected::Eof) => "not_http",
            Ok(Detected::TimedOut) => "head_timeout",
        };
        self.metrics.protocol_refused(reason);
        tracing::info!(target: "audit", decision = "invalid", src.addr = %src, src.identity = ?identity, dst.addr = %app.addr, reason, first_bytes = ?String::from_utf8_lossy(&buf[..buf.len().min(32)]), "connection refused: the client spoke first and not valid HTTP/1.1 or HTTP/2 (declare the port with --opaque-port to carry another client-first protocol)");
        if reason == "not_http" {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncWriteExt::write_all(&mut io, super::BAD_REQUEST_CLOSE),
            )
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(&mut io)).await;
        }
    }

    /// A silent client: connect the app, and let whoever speaks first decide.
    async fn first_speaker<I>(
        self: Arc<Self>,
        mut io: I,
        mut buf: BytesMut,
        src: SocketAddr,
        caller: Option<Arc<Caller>>,
        app: Arc<AppTarget>,
        cancel: CancellationToken,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if !self.authorize_tcp(src, caller.as_deref(), &app) {
            return;
        }
        let app_conn = match TcpStream::connect(app.addr).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(src.addr = %src, dst.addr = %app.addr, error = %e, "app unreachable for TCP");
                return;
            }
        };
        let _ = app_conn.set_nodelay(true);
        // A server-speaks-first app greets at once; a connection on which
        // neither side has spoken by the header timeout is let go (a port
        // declared opaque is never detected, so it may stay silent).
        let silent = self.opts.limits.header_read_timeout.saturating_sub(self.opts.limits.protocol_detect_timeout);
        let client_spoke = tokio::time::timeout(silent, async {
            tokio::select! {
                r = tokio::io::AsyncReadExt::read_buf(&mut io, &mut buf) => Some(r),
                _ = app_conn.readable() => None,
            }
        })
        .await;
        match client_spoke {
            // The app spoke first: a server-speaks-first protocol, carried as it is.
            Ok(None) => {
                let io = Prefixed::new(buf.freeze(), io);
                self.tcp(io, src, caller.as_deref(), &app, Some(app_conn)).await;
            }
            Ok(Some(Ok(n))) if n > 0 => {
                drop(app_conn);
                // The client spoke first, late: the same rule as an early one.
                let detected = detect_with(&mut io, &mut buf, self.opts.limits.header_read_timeout).await;
                self.client_spoke(detected, io, buf, src, caller, app, cancel).await;
            }
            _ => {}
        }
    }

    /// Serves a detected stream.
    async fn serve_as<I>(
        self: Arc<Self>,
        proto: Protocol,
        io: I,
        src: SocketAddr,
        caller: Option<Arc<Caller>>,
        app: Arc<AppTarget>,
        cancel: CancellationToken,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let limits = &self.opts.limits;
        let result = match proto {
            Protocol::Opaque => return self.tcp(io, src, caller.as_deref(), &app, None).await,
            Protocol::Http1 => {
                let io = super::h1guard::H1Guard::new(io, limits.max_header_bytes, limits.max_headers);
                super::serve::http1(TokioIo::new(io), limits, cancel, move |req| {
                    this.clone().request(req, caller.clone(), src, Some(Protocol::Http1), app.clone())
                })
                .await
            }
            Protocol::Http2 => {
                super::serve::http2(TokioIo::new(io), limits, cancel, move |req| {
                    this.clone().request(req, caller.clone(), src, Some(Protocol::Http2), app.clone())
                })
                .await
            }
        };
        if let Err(e) = result {
            tracing::debug!(src.addr = %src, direction = "inbound", error = %e, "connection ended with an error");
        }
    }

    /// The L4 decision: only the caller and the port exist here. DENY rules
    /// that name HTTP fields match (deny errs on the side of denying); ALLOW
    /// rules that name them do not.
    fn authorize_tcp(&self, src: SocketAddr, caller: Option<&Caller>, app: &AppTarget) -> bool {
        let source = caller.map(|c| c.subject.as_str());
        let policy = self.policy.current();
        // Opaque TCP carries no request credential: where one is required, it is refused.
        if policy.as_ref().and_then(|p| p.enforcer.authenticator()).is_some_and(|a| a.required()) {
            self.metrics.authn.get_or_create(&AuthnLabels { result: "refused", reason: "missing_credential" }).inc();
            tracing::info!(target: "audit", decision = "unauthenticated", src.addr = %src, src.identity = ?source, reason = "an AuthenticationPolicy requires a request credential and opaque TCP carries none", "TCP connection refused");
            return false;
        }
        let verdict = policy.map(|p| {
            let d =
                p.enforcer.authorize(&palisade_policy::Request { source, port: app.addr.port(), ..Default::default() });
            p.count(&d);
            d
        });
        match verdict {
            Some(d) if d.verdict == palisade_policy::Verdict::Allow => true,
            other => {
                let reason = other.map(|d| d.reason()).unwrap_or_else(|| "no policy received yet (not ready)".into());
                tracing::info!(target: "audit", decision = "deny", src.addr = %src, src.identity = ?source, reason = %reason, "TCP connection refused");
                false
            }
        }
    }

    async fn tcp<I>(
        &self,
        mut io: I,
        src: SocketAddr,
        caller: Option<&Caller>,
        app_target: &AppTarget,
        connected: Option<TcpStream>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut app = match connected {
            Some(a) => a,
            None => {
                if !self.authorize_tcp(src, caller, app_target) {
                    return;
                }
                match TcpStream::connect(app_target.addr).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(src.addr = %src, src.identity = ?caller.map(|c| c.subject.as_str()), dst.addr = %app_target.addr, error = %e, "app unreachable for TCP");
                        return;
                    }
                }
            }
        };
        let _ = app.set_nodelay(true);
        let log = self.opts.access_log && super::access::sampled(self.opts.access_log_sampling);
        let tap = self.opts.observe.tapping();
        let entry = (log || tap).then(|| {
            let mut e = super::access::Entry::new("inbound", src);
            e.log = log;
            e.tap = tap.then(|| self.opts.observe.clone());
            e.caller = caller.map(|c| c.subject.to_string());
            e.callee = self.svids.get().map(|s| s.id.to_string());
            e
        });
        // An opaque connection is authorised once, with the caller's
        // certificate: it ends when that certificate expires.
        let lifetime =
            caller.map_or(Duration::MAX, |c| c.not_after.duration_since(SystemTime::now()).unwrap_or_default());
        let spliced = match tokio::time::timeout(lifetime, super::tcp::splice(&mut io, &mut app)).await {
            Ok(r) => r,
            Err(_) => {
                self.metrics.protocol_refused("cert_expired");
                tracing::info!(target: "audit", decision = "deny", src.addr = %src, src.identity = ?caller.map(|c| c.subject.as_str()), reason = "the certificate the connection was authorised with expired", "opaque TCP connection closed");
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "caller certificate expired"))
            }
        };
        match spliced {
            Ok((up, down)) => {
                if let Some(e) = entry {
                    e.bytes_in.store(up, std::sync::atomic::Ordering::Relaxed);
                    e.write(None, None, "allow", down);
                }
            }
            Err(err) => {
                tracing::debug!(src.addr = %src, error = %err, "inbound TCP stream ended with an error");
                if let Some(e) = entry {
                    e.write(None, None, "allow", 0);
                }
            }
        }
    }

    /// `conn_proto`: the protocol the connection itself speaks to us when it
    /// is the app's (plaintext or the upgrade path); `None` for sidecar HTTP/2,
    /// where ORIG_PROTO tells.
    async fn request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Option<Arc<Caller>>,
        src: SocketAddr,
        conn_proto: Option<Protocol>,
        app: Arc<AppTarget>,
    ) -> Response<Body> {
        let log = self.opts.access_log && super::access::sampled(self.opts.access_log_sampling);
        let tap = self.opts.observe.tapping();
        if !self.tracing.enabled() && !log && !tap {
            return self.handle(req, peer, src, conn_proto, app).await;
        }
        // A server span: a child of the caller sidecar's client span.
        use opentelemetry::KeyValue;
        // Cheap copies (reference-counted): strings are made only for a
        // span that records or a request that is logged.
        let (method, uri, host) = (req.method().clone(), req.uri().clone(), req.headers().get(HOST).cloned());
        let authority = || {
            uri.authority()
                .map(|a| a.to_string())
                .or_else(|| host.as_ref().and_then(|v| v.to_str().ok()).map(str::to_string))
        };
        let caller = || peer.as_ref().map(|c| c.subject.to_string());
        let callee = || self.svids.get().map(|s| s.id.to_string());
        let span = self.tracing.start_request(
            opentelemetry::trace::SpanKind::Server,
            method.as_str(),
            req.headers_mut(),
            || {
                let mut attrs = vec![
                    KeyValue::new("http.request.method", method.to_string()),
                    KeyValue::new("url.path", uri.path().to_string()),
                    KeyValue::new("url.scheme", "http"),
                    KeyValue::new("network.peer.address", src.ip().to_string()),
                    KeyValue::new("network.peer.port", i64::from(src.port())),
                    KeyValue::new("palisade.direction", "inbound"),
                ];
                attrs.extend(caller().map(|c| KeyValue::new("palisade.caller", c)));
                attrs.extend(callee().map(|c| KeyValue::new("palisade.callee", c)));
                attrs.extend(authority().map(|a| KeyValue::new("server.address", a)));
                attrs
            },
        );
        let entry = (log || tap).then(|| {
            let mut e = super::access::Entry::new("inbound", src);
            e.log = log;
            e.tap = tap.then(|| self.opts.observe.clone());
            e.caller = caller();
            e.callee = callee();
            e.method = method.to_string();
            e.authority = authority();
            e.path = uri.path().to_string();
            e.trace_id = span.trace_id();
            req.extensions_mut().insert(e.decided.clone());
            req.extensions_mut().insert(super::access::BytesIn(e.bytes_in.clone()));
            e
        });
        let resp = self.clone().handle(req, peer, src, conn_proto, app).await;
        let status = resp.status().as_u16();
        let decision = super::decision_of(status, resp.headers().contains_key("x-palisade-error"));
        if span.recording() {
            span.set(super::response_attributes(&resp, decision));
        }
        span.end(status, false);
        match entry {
            Some(e) => {
                let grpc = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
                resp.map(|b| super::access::Logged::wrap(b, e, status, grpc, decision))
            }
            None => resp,
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Option<Arc<Caller>>,
        src: SocketAddr,
        conn_proto: Option<Protocol>,
        app: Arc<AppTarget>,
    ) -> Response<Body> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let headers = req.headers_mut();
        // Never trust an identity header from outside.
        headers.remove(PEER_IDENTITY);
        if let Some(c) = &peer {
            headers.insert(PEER_IDENTITY, c.header.clone());
        }
        let orig = headers.remove(ORIG_PROTO);
        let app_proto = conn_proto.unwrap_or(if orig.as_ref().is_some_and(|v| v == "HTTP/1.1") {
            Protocol::Http1
        } else {
            Protocol::Http2
        });
        // Never trust a principal header from outside either.
        headers.remove(REQUEST_PRINCIPAL);
        let policy = self.policy.current();
        strip_underscore_aliases(req.headers_mut(), policy.as_ref().and_then(|p| p.enforcer.authenticator()));
        // One spelling per resource: policy decides on, and the app receives,
        // the normalised path, so no encoding walks around a rule.
        let path_options = policy.as_ref().map(|p| *p.enforcer.checks().path_options()).unwrap_or_default();
        if let Err(reason) = normalize_path(&mut req, &path_options) {
            tracing::info!(target: "audit", decision = "deny", src.addr = %src, src.identity = ?peer.as_deref().map(|c| c.subject.as_str()), http.method = %method, http.path = %path, reason, "request path refused");
            let resp = error_response(grpc, StatusCode::BAD_REQUEST, "bad request path");
            self.metrics.refused.inc();
            self.metrics.request(Direction::Inbound, resp.status().as_u16(), start.elapsed());
            return resp;
        }
        let upgrade = app_proto == Protocol::Http1 && is_upgrade(&req);
        // CORS: a browser's preflight is answered here (the app never sees
        // one); actual responses get their Access-Control-* headers below.
        let cors = policy.as_ref().and_then(|p| p.enforcer.cors());
        let origin = cors
            .and_then(|_| req.headers().get(http::header::ORIGIN))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(cors) = cors
            && let Some(origin) = origin.as_deref()
            && req.method() == http::Method::OPTIONS
            && let Some(asked) = req.headers().get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            let asked_headers =
                req.headers().get(http::header::ACCESS_CONTROL_REQUEST_HEADERS).and_then(|v| v.to_str().ok());
            let allowed = cors.preflight(origin, asked.to_str().unwrap_or_default(), asked_headers);
            if allowed.is_none() {
                tracing::info!(target: "audit", decision = "cors_refused", src.addr = %src, src.identity = ?peer.as_deref().map(|c| c.subject.as_str()), http.path = %path, origin, policy = %cors.policy, "CORS preflight not allowed");
            }
            let mut resp = Response::new(super::full(bytes::Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            let h = resp.headers_mut();
            for (name, value) in allowed.into_iter().flatten() {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
            h.insert(
                http::header::VARY,
                HeaderValue::from_static("Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            );
            // The response header changes (security headers...) apply to it too.
            if let Some(r) = policy.as_ref().map(|p| p.enforcer.rewrites()).filter(|r| !r.is_empty()) {
                let vars = palisade_policy::traffic::Vars {
                    caller: peer.as_deref().map(|c| c.subject.as_str()),
                    ..Default::default()
                };
                apply_header_ops(resp.headers_mut(), &r.response, &vars);
            }
            self.metrics.request(Direction::Inbound, resp.status().as_u16(), start.elapsed());
            return resp;
        }
        let refusal = self.enforce(policy.as_ref(), &mut req, peer.as_deref(), src, grpc, app.addr.port());
        // TrafficPolicy header changes: the request's now, the response's below.
        let rewrites = policy.as_ref().map(|p| p.enforcer.rewrites()).filter(|r| !r.is_empty());
        let request_id = rewrites.map(|r| request_id(req.headers(), r));
        let principal = rewrites
            .and_then(|_| req.headers().get(REQUEST_PRINCIPAL))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let vars = palisade_policy::traffic::Vars {
            caller: peer.as_deref().map(|c| c.subject.as_str()),
            principal: principal.as_deref(),
            request_id: request_id.as_ref().and_then(|r| r.as_deref()),
        };
        if let Some(mut refusal) = refusal {
            self.metrics.refused.inc();
            if let Some(r) = rewrites {
                apply_header_ops(refusal.headers_mut(), &r.response, &vars);
            }
            if let Some(c) = cors {
                cors_headers(refusal.headers_mut(), c, origin.as_deref());
            }
            self.metrics.request(Direction::Inbound, refusal.status().as_u16(), start.elapsed());
            return refusal;
        }
        if let Some(r) = rewrites {
            apply_header_ops(req.headers_mut(), &r.request, &vars);
        }
        // Boxed: the forward's state (the app call) is allocated once
        // instead of being moved with this future at every step.
        let mut resp = match Box::pin(self.forward(req, app_proto, upgrade, &app)).await {
            Ok(r) => r,
            Err(e @ (ProxyError::InvalidBody(_) | ProxyError::TooLarge { .. })) => {
                tracing::info!(target: "audit", decision = "invalid", src.addr = %src, src.identity = ?peer.as_deref().map(|c| c.subject.as_str()), http.method = %method, http.path = %path, reason = %e, "request refused by validation");
                self.metrics.refused.inc();
                e.response(grpc)
            }
            Err(e) => {
                tracing::warn!(direction = "inbound", src.addr = %src, src.identity = ?peer.as_deref().map(|c| c.subject.as_str()), http.method = %method, http.path = %path, error = %e, "request to the app failed");
                e.response(grpc)
            }
        };
        if let Some(r) = rewrites {
            apply_header_ops(resp.headers_mut(), &r.response, &vars);
        }
        if let Some(c) = cors {
            cors_headers(resp.headers_mut(), c, origin.as_deref());
        }
        self.metrics.request(Direction::Inbound, resp.status().as_u16(), start.elapsed());
        resp
    }

    /// Authentication, authorization, then rate limits; on success the
    /// request's credential headers are rewritten for the app. `Some` is the
    /// refusal to send back.
    fn enforce(
        &self,
        policy: Option<&Arc<crate::policy::InForce>>,
        req: &mut Request<Incoming>,
        peer: Option<&Caller>,
        src: SocketAddr,
        grpc: bool,
        app_port: u16,
    ) -> Option<Response<Body>> {
        // Our identity, for audit lines only (tracing evaluates fields only when logging).
        let me = || self.svids.get().map(|s| s.id.to_string()).unwrap_or_default();
        let source = peer.map(|c| c.subject.as_str());
        let (method, path) = (req.method().as_str(), req.uri().path());
        if peer.is_some_and(Caller::expired) {
            tracing::warn!(target: "audit", decision = "deny", src.addr = %src, src.identity = ?source, dst.identity = %me(), http.method = method, http.path = path, reason = "the caller's certificate expired after this connection was opened", "request refused");
            return Some(error_response(grpc, StatusCode::FORBIDDEN, "forbidden"));
        }
        let Some(policy) = policy else {
            // Not ready is not a policy decision: the caller may retry.
            tracing::info!(src.addr = %src, src.identity = ?source, http.method = method, http.path = path, "request refused: no policy received from the control plane yet (not ready)");
            let mut resp = error_response(grpc, StatusCode::SERVICE_UNAVAILABLE, "not ready");
            resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Some(resp);
        };
        // TrafficPolicy validation comes before authentication: malformed input is refused first.
        let checks = policy.enforcer.checks();
        if !checks.is_empty() {
            let h = req.headers();
            let ct = h.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let len = h.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            let has_body = !hyper::body::Body::is_end_stream(req.body());
            let head = palisade_policy::traffic::Head {
                method,
                query: req.uri().query(),
                content_type: ct,
                content_length: len,
                has_body,
            };
            match checks.check(&head) {
                Ok(rule) if rule.cap.is_some() || rule.schema => {
                    let schemas = rule.schema.then(|| policy.clone());
                    req.extensions_mut().insert(BodyCap { max: rule.cap.unwrap_or(u64::MAX), schemas });
                }
                Ok(_) => {}
                Err(invalid) => {
                    if let Some(slot) = req.extensions().get::<Arc<super::access::Decided>>() {
                        slot.set(invalid.policy.as_str().into(), None);
                    }
                    tracing::info!(target: "audit", decision = "invalid", src.addr = %src, src.identity = ?source, dst.identity = %me(), http.method = method, http.path = path, policy = %invalid.policy, reason = %invalid.reason, "request refused by validation");
                    let (status, message) = match invalid.status {
                        405 => (StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
                        415 => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported media type"),
                        414 => (StatusCode::URI_TOO_LONG, "request target too long"),
                        400 => (StatusCode::BAD_REQUEST, "too many query parameters"),
                        _ => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
                    };
                    let mut resp = error_response(grpc, status, message);
                    if let Some(allow) = invalid.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
                        resp.headers_mut().insert(http::header::ALLOW, allow);
                    }
                    return Some(resp);
                }
            }
        }
        let (method, path) = (req.method().as_str(), req.uri().path());
        let headers = RequestHeaders(req.headers());
        let auth = match policy.enforcer.authenticate(&headers, unix_now()) {
            AuthnOutcome::Anonymous => None,
            AuthnOutcome::Verified(a) => {
                let kind = match (a.api_key.is_some(), a.claims.is_empty()) {
                    (true, true) => "api_key",
                    (true, false) => "both",
                    _ => "jwt",
                };
                self.metrics.authn.get_or_create(&AuthnLabels { result: "verified", reason: kind }).inc();
                Some(a)
            }
            AuthnOutcome::Refused(f) => {
                self.metrics.authn.get_or_create(&AuthnLabels { result: "refused", reason: f.reason() }).inc();
                if let palisade_policy::AuthnFailure::UnknownKey(Some(uri)) = &f {
                    self.policy.request_refresh(uri);
                }
                tracing::info!(target: "audit", decision = "unauthenticated", src.addr = %src, src.identity = ?source, dst.identity = %me(), http.method = method, http.path = path, reason = f.reason(), "request credential refused");
                let mut resp = error_response(grpc, StatusCode::UNAUTHORIZED, "unauthenticated");
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static(f.challenge()));
                return Some(resp);
            }
        };
        let principal = auth.as_ref().and_then(|a| a.principal.as_deref());
        let host =
            req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(HOST).and_then(|v| v.to_str().ok()));
        let preq = palisade_policy::Request {
            source,
            method: Some(method),
            path: Some(path),
            port: app_port,
            host,
            headers: &headers,
            auth: auth.as_deref(),
        };
        let d = policy.enforcer.authorize(&preq);
        policy.count(&d);
        if self.opts.observe.recording() {
            self.opts.observe.record(&palisade_policy::preview::Sample::of(&preq, policy.enforcer.recorded()));
        }
        if let Some(slot) = req.extensions().get::<Arc<super::access::Decided>>()
            && let Some(p) = &d.policy
        {
            slot.set(p.clone(), d.rule);
        }
        let label = d.label();
        if label != "allow" {
            let policy = d.policy.as_deref().unwrap_or("default");
            tracing::info!(target: "audit", decision = label, src.addr = %src, src.identity = ?source, request.principal = ?principal, dst.identity = %me(), http.method = method, http.path = path, policy = %policy, rule = ?d.rule, reason = %d.reason(), "authorization decision");
        }
        if d.verdict == palisade_policy::Verdict::Deny {
            return Some(error_response(grpc, StatusCode::FORBIDDEN, "forbidden"));
        }
        if let Some(limited) = policy.enforcer.rate_limit(&preq, src.ip()) {
            if let Some(slot) = req.extensions().get::<Arc<super::access::Decided>>() {
                slot.set(limited.policy.clone(), None);
            }
            self.metrics
                .rate_limited
                .get_or_create(&crate::metrics::PolicyLabels { policy: limited.policy.to_string() })
                .inc();
            tracing::info!(target: "audit", decision = "rate_limited", src.addr = %src, src.identity = ?source, request.principal = ?principal, dst.identity = %me(), http.method = method, http.path = path, policy = %limited.policy, limit = %limited.limit, retry_after_ms = limited.outcome.retry_after.as_millis() as u64, "rate limited");
            return Some(rate_limited(grpc, &limited));
        }
        if let Some(authn) = policy.enforcer.authenticator() {
            rewrite_credentials(req.headers_mut(), authn, auth.as_deref());
        }
        None
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        app_proto: Protocol,
        upgrade: bool,
        app: &AppTarget,
    ) -> Result<Response<Body>, ProxyError> {
        if upgrade {
            return Box::pin(self.upgrade(req, app.addr)).await;
        }
        super::strip_hop_by_hop(req.headers_mut());
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
        super::strip_hop_by_hop(resp.headers_mut());
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
            tokio::spawn(super::outbound::splice_upgraded(caller_side, app_side));
        } else {
            super::no_upgrade(&mut resp);
        }
        Ok(resp.map(|b| b.boxed_unsync()))
    }
}

/// Replaces the request's path with its normal form (`palisade_policy::path`);
/// `Err` is why the path is refused.
fn normalize_path<B>(req: &mut Request<B>, opts: &palisade_policy::path::Options) -> Result<(), &'static str> {
    let normal = match palisade_policy::path::normalize_with(req.uri().path(), opts) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(e) => return Err(e.reason()),
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| "unparsable_normal_path")?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| "unparsable_normal_path")?;
    Ok(())
}

/// The CORS headers of a response: the app's own Access-Control-* headers
/// are replaced by the policy's (so no origin is ever reflected that the
/// policy does not name), and `Vary: Origin` tells caches why.
fn cors_headers(h: &mut http::HeaderMap, cors: &palisade_policy::traffic::CorsPolicy, origin: Option<&str>) {
    for name in [
        http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
        http::header::ACCESS_CONTROL_ALLOW_METHODS,
        http::header::ACCESS_CONTROL_ALLOW_HEADERS,
        http::header::ACCESS_CONTROL_MAX_AGE,
    ] {
        h.remove(name);
    }
    for (name, value) in origin.and_then(|o| cors.actual(o)).into_iter().flatten() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    h.append(http::header::VARY, HeaderValue::from_static("Origin"));
}

/// What TrafficPolicy validation asks of this request's body (set by `enforce`).
#[derive(Clone)]
struct BodyCap {
    /// Largest body.
    max: u64,
    /// The policy whose JSON Schemas the whole body is checked against.
    schemas: Option<Arc<crate::policy::InForce>>,
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
    let count = req.extensions_mut().remove::<super::access::BytesIn>();
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
            super::full(bytes)
        }
        _ => body.boxed_unsync(),
    };
    let body = match count {
        Some(c) => super::access::CountIn::wrap(body, c.0),
        None => body,
    };
    Ok(Request::from_parts(parts, body))
}

/// `${request_id}`: the request's `x-request-id`, or a new one when a
/// request change names it (`None`: no change uses it).
fn request_id(h: &http::HeaderMap, r: &palisade_policy::traffic::Rewrites) -> Option<String> {
    if !r.request_uses(palisade_policy::traffic::Var::RequestId) {
        return None;
    }
    if let Some(v) = h.get("x-request-id").and_then(|v| v.to_str().ok()).filter(|v| v.len() <= 128) {
        return Some(v.to_string());
    }
    let mut id = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).ok()?;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Applies TrafficPolicy header changes (names and values were validated
/// when the policy was; a variable's value that is not a valid header value
/// leaves that header out).
fn apply_header_ops(
    h: &mut http::HeaderMap,
    ops: &[palisade_policy::traffic::Op],
    vars: &palisade_policy::traffic::Vars<'_>,
) {
    use palisade_policy::traffic::Op;
    for op in ops {
        let (name, template) = match op {
            Op::Remove(name) => {
                h.remove(name.as_str());
                continue;
            }
            Op::Set(n, t) | Op::Add(n, t) | Op::Default(n, t) => (n, t),
        };
        let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) else { continue };
        if matches!(op, Op::Default(..)) && h.contains_key(&name) {
            continue;
        }
        let Ok(value) = HeaderValue::from_str(&template.render(vars)) else { continue };
        if matches!(op, Op::Add(..)) {
            h.append(name, value);
        } else {
            h.insert(name, value);
        }
    }
}

/// The 429 answer, with `Retry-After` and the RateLimit headers.
fn rate_limited(grpc: bool, limited: &palisade_policy::Limited) -> Response<Body> {
    let mut resp = error_response(grpc, StatusCode::TOO_MANY_REQUESTS, "rate limited");
    let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let h = resp.headers_mut();
    let policy_hdr = format!("\"{}\";q={};w={}", limited.limit, limited.quota.rate, secs(limited.quota.period).max(1));
    let state_hdr =
        format!("\"{}\";r={};t={}", limited.limit, limited.outcome.remaining, secs(limited.outcome.reset_after));
    for (name, value) in [
        ("retry-after", secs(limited.outcome.retry_after).max(1).to_string()),
        ("ratelimit-policy", policy_hdr),
        ("ratelimit", state_hdr),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    resp
}

/// Drops headers whose names hold `_` and that a server reading `_` as `-`
/// (CGI's `HTTP_X_PALISADE_PEER_IDENTITY`, some frameworks) would take for a
/// header the sidecar sets or strips: `x_palisade_peer_identity`, or a claim
/// or API key header spelt with underscores.
fn strip_underscore_aliases(h: &mut http::HeaderMap, authn: Option<&palisade_policy::authn::Authenticator>) {
    let aliases: Vec<http::HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .filter(|k| {
            let dashed = k.as_str().replace('_', "-");
            dashed.starts_with("x-palisade-")
                || authn.is_some_and(|a| {
                    a.claim_headers().iter().chain(a.api_key_headers()).any(|n| n.eq_ignore_ascii_case(&dashed))
                })
        })
        .cloned()
        .collect();
    for name in aliases {
        h.remove(name);
    }
}

/// What the app receives of a request's credentials: never a copy of a
/// claim header or a principal the caller wrote, never an API key, the token
/// only when the issuer says `forwardToken`; then the verified claims and
/// principal.
fn rewrite_credentials(
    h: &mut http::HeaderMap,
    authn: &palisade_policy::authn::Authenticator,
    auth: Option<&palisade_policy::Authenticated>,
) {
    for name in authn.claim_headers().iter().chain(authn.api_key_headers()) {
        h.remove(name.as_str());
    }
    let Some(a) = auth else { return };
    if !a.claims.is_empty() && !a.forward_token {
        // The token's own header (the verified JWT came from one of these).
        for name in authn.credential_headers().filter(|n| !authn.api_key_headers().iter().any(|k| k == n)) {
            h.remove(name);
        }
    }
    for (name, value) in &a.claim_headers {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            h.insert(n, v);
        }
    }
    if let Some(p) = a.principal.as_deref().and_then(|p| HeaderValue::from_str(p).ok()) {
        h.insert(REQUEST_PRINCIPAL, p);
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn app_error(e: super::pool::AppError) -> ProxyError {
    match e {
        super::pool::AppError::Connect { .. } => ProxyError::AppUnavailable(e.to_string()),
        super::pool::AppError::Http(_) => ProxyError::AppFailed(e.to_string()),
    }
}

/// A low-cardinality reason for a failed handshake.
fn handshake_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => "no_client_cert",
        Some(Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            "expired"
        }
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => "unknown_issuer",
        Some(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)) => "bad_identity",
        Some(Error::InvalidCertificate(_)) => "bad_cert",
        Some(Error::PeerIncompatible(_) | Error::NoApplicationProtocol) => "incompatible",
        Some(_) => "protocol",
        None => "io",
    }
}
