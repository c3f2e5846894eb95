//! The inbound side: peer sidecars connect with mTLS (their chain verified
//! against the trust bundle, their SPIFFE ID in our trust domain); in
//! PERMISSIVE mode plaintext clients are accepted too, as unauthenticated.
//! ALPN says what the connection carries: `h2` (multiplexed HTTP),
//! `http/1.1` (an upgrade), or opaque TCP. Requests reach the local app over
//! pooled connections, in the protocol the calling app spoke, with the
//! verified caller identity in `x-palisade-peer-identity`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use hyper_util::rt::TokioIo;
use palisade_certs::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bytes::BytesMut;

use super::detect::{Detected, Prefixed, Protocol, detect_with};
use super::tcp::{ConnGuard, Counted};
use super::{ALPN_H2, ALPN_HTTP1, ALPN_TCP, Direction};
use crate::config::Limits;
use crate::metrics::Metrics;

mod forward;
mod requests;
mod tcp;

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
    /// This caller's inbound counters (the mesh graph's edge).
    counts: Arc<crate::metrics::callers::FromCounts>,
}

impl Caller {
    fn from_certs(
        certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
        callers: &crate::metrics::callers::Callers,
    ) -> Option<Arc<Self>> {
        let (id, info) = palisade_certs::tls::peer_identity(certs)?;
        let subject = id.to_string();
        let header = HeaderValue::from_str(&subject).ok()?;
        let counts = callers.of(&subject);
        Some(Arc::new(Self { id, subject, header, not_after: info.not_after, counts }))
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
        let Some(caller) = Caller::from_certs(session.peer_certificates(), &self.metrics.callers) else {
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
                tracing::warn!(src.addr = %src, src.identity = %caller.id, alpn = other.map(String::from_utf8_lossy).as_deref(), "unknown ALPN; closing");
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
        tracing::info!(target: "audit", decision = "invalid", src.addr = %src, src.identity = identity, dst.addr = %app.addr, reason, first_bytes = ?String::from_utf8_lossy(&buf[..buf.len().min(32)]), "connection refused: the client spoke first and not valid HTTP/1.1 or HTTP/2 (declare the port with --opaque-port to carry another client-first protocol)");
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
