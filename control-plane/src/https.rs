//! The control plane's small HTTPS listeners (the admission webhook, the
//! OAuth token service): TLS with a handshake timeout, a connection limit
//! (per source address too, with a reserve for the host itself), a first
//! request within the handshake timeout, an idle timeout that HTTP/2 PINGs
//! do not extend, bounded header reads, then a handler per request.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Most from one source address, so one client cannot take every place.
    pub max_connections_per_ip: usize,
    /// Places beyond the limit only 127.0.0.1 and ::1 may take.
    pub reserved_loopback: usize,
    /// From accept to a complete handshake, and from there to the first request byte.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// The OAuth token service's: API clients come from many addresses; 64
    /// from one covers a busy client's pool and needs 16 addresses to fill.
    pub fn oauth(cfg: &crate::Config) -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_ip: 64,
            reserved_loopback: cfg.reserved_loopback_connections,
            handshake_timeout: cfg.handshake_timeout,
        }
    }

    /// The admission webhook's: its one client is the API server (a few
    /// replicas, a handful of connections each); 32 from one address needs
    /// 8 addresses to fill.
    pub fn webhook(cfg: &crate::Config) -> Self {
        Self {
            max_connections: 256,
            max_connections_per_ip: 32,
            reserved_loopback: cfg.reserved_loopback_connections,
            handshake_timeout: cfg.handshake_timeout,
        }
    }
}

/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A small response.
pub fn reply(status: StatusCode, ct: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

/// Serves `handler` on `listener` with `tls` until `stop`.
pub async fn serve<H, Fut>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    stop: CancellationToken,
    tracker: TaskTracker,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limit = palisade_net::Limit::new(name, limits.max_connections)
        .per_ip(limits.max_connections_per_ip)
        .reserve_loopback(limits.reserved_loopback)
        // Anyone can open one: when full, the oldest is let go for a newcomer.
        .evict_oldest();
    palisade_net::serve(listener, crate::metrics::counted(limit), stop, tracker, move |tcp, peer: SocketAddr, slot| {
        let (acceptor, handler) = (acceptor.clone(), handler.clone());
        async move {
            let accept = async {
                tokio::select! {
                    r = acceptor.accept(tcp) => Some(r),
                    _ = slot.evicted() => None,
                }
            };
            let tls = match tokio::time::timeout(limits.handshake_timeout, accept).await {
                Ok(Some(Ok(t))) => t,
                _ => {
                    tracing::debug!(src.addr = %peer, listener = name, "TLS handshake failed");
                    return;
                }
            };
            // Requests are short: a connection kept open by PINGs alone is idle.
            let io = palisade_net::IdleTimeout::new(tls, IDLE_TIMEOUT, Some(slot))
                .first_byte_within(limits.handshake_timeout)
                .requests_only();
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req, peer).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
            builder.http2().max_concurrent_streams(64);
            let _ = builder.serve_connection(TokioIo::new(io), svc).await;
        }
    })
    .await;
}
