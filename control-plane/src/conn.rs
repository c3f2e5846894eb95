//! The gRPC listener's connections: the shared accept loop with a
//! connection limit, the TLS handshake under a timeout off the accept loop, a
//! smaller budget and a short idle timeout for connections without a client
//! certificate (first-time joins), and the idle timeout for everyone else.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_net::{IdleTimeout, Limit, Slot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Idle timeout of a connection without a client certificate: it exists for
/// one Certify call.
const UNAUTHENTICATED_IDLE: Duration = Duration::from_secs(15);

/// The listener's limits.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Connections with a verified client certificate.
    pub(crate) authenticated: Limit,
    /// Handshakes in progress and connections without a certificate, in
    /// all and per source address: what anyone on the network can open.
    pub(crate) unauthenticated: Limit,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// One accepted, handshaken connection, holding its place under the limits.
#[derive(Debug)]
pub(crate) struct Conn(IdleTimeout<TlsStream<TcpStream>>);

/// Accepts until `stop`, handing handshaken connections to the gRPC server.
///
/// Until its handshake proves a client certificate, a connection holds a
/// place under the unauthenticated limit; once proven, it moves to the
/// authenticated one. A flood of anonymous connections therefore fills only
/// the anonymous budget (delaying first-time joins at worst), never the
/// places sidecars and operators use.
pub(crate) async fn accept(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: Limits,
    to_server: mpsc::Sender<io::Result<Conn>>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let unauthenticated = limits.unauthenticated.clone();
    palisade_net::serve(listener, unauthenticated, stop, tracker, move |tcp, src, slot| {
        let (acceptor, limits, to_server) = (acceptor.clone(), limits.clone(), to_server.clone());
        async move {
            if let Some(conn) = handshake(tcp, src, slot, &acceptor, &limits).await {
                let _ = to_server.send(Ok(conn)).await;
            }
        }
    })
    .await;
}

async fn handshake(
    tcp: TcpStream,
    src: SocketAddr,
    anonymous: Slot,
    acceptor: &tokio_rustls::TlsAcceptor,
    limits: &Limits,
) -> Option<Conn> {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(target: "audit", event = "tls_handshake_failed", src.addr = %src, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(src.addr = %src, "TLS handshake timed out");
            return None;
        }
    };
    let authenticated = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
    if !authenticated {
        return Some(Conn(IdleTimeout::new(tls, UNAUTHENTICATED_IDLE, Some(anonymous))));
    }
    let Some(slot) = limits.authenticated.try_take() else {
        tracing::warn!(src.addr = %src, "connection limit reached (--max-connections); closing");
        return None;
    };
    drop(anonymous);
    Some(Conn(IdleTimeout::new(tls, limits.idle_timeout, Some(slot))))
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
