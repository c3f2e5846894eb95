//! The gRPC listener's connections, in three budgets so that what anyone on
//! the network can open never crowds out sidecars and operators:
//!
//! - handshakes in progress (`--max-unauthenticated-connections`, per
//!   address too), each for `--handshake-timeout` at most;
//! - connections that finished their handshake without a client
//!   certificate (first joins, `--max-anonymous-connections`, per address
//!   too): a few calls each, closed `--anonymous-deadline` after accept
//!   whatever they send (PINGs do not extend it);
//! - connections with a verified client certificate (`--max-connections`),
//!   with the idle timeout that the server's PINGs keep live clients under.
//!
//! Each budget also has a few places only 127.0.0.1 and ::1 can take
//! (`--reserved-loopback-connections`), for an operator on the host.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_net::{IdleTimeout, Limit, Slot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{METRICS, counted};

/// Calls an anonymous connection may carry. A first join needs one Certify;
/// gRPC libraries share one connection among channels with the same target
/// and credentials (grpc-core's subchannel pool), so a tool's second or
/// third call must not meet a closed socket (UNAVAILABLE, not retried). The
/// absolute deadline, not this count, is what bounds an anonymous holder.
const ANONYMOUS_CALLS: u32 = 4;

/// The listener's limits.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Handshakes in progress: what anyone on the network can open.
    pub(crate) handshakes: Limit,
    /// Handshaken connections without a client certificate.
    pub(crate) anonymous: Limit,
    /// Connections with a verified client certificate.
    pub(crate) authenticated: Limit,
    pub(crate) handshake_timeout: Duration,
    pub(crate) anonymous_deadline: Duration,
    pub(crate) idle_timeout: Duration,
}

impl Limits {
    /// The limits the flags set.
    pub(crate) fn new(cfg: &crate::Config) -> Self {
        let reserved = cfg.reserved_loopback_connections;
        Self {
            handshakes: counted(
                Limit::new("control-plane-handshake", cfg.max_unauthenticated_connections)
                    .per_ip(cfg.max_unauthenticated_connections_per_ip)
                    .reserve_loopback(reserved)
                    .evict_oldest(),
            ),
            anonymous: counted(
                Limit::new("control-plane-anonymous", cfg.max_anonymous_connections)
                    .per_ip(cfg.max_anonymous_connections_per_ip)
                    .reserve_loopback(reserved)
                    .evict_oldest(),
            ),
            authenticated: counted(Limit::new("control-plane", cfg.max_connections).reserve_loopback(reserved)),
            handshake_timeout: cfg.handshake_timeout,
            anonymous_deadline: cfg.anonymous_deadline,
            idle_timeout: cfg.idle_timeout,
        }
    }
}

/// One accepted, handshaken connection, holding its place under the limits.
#[derive(Debug)]
pub(crate) struct Conn {
    io: IdleTimeout<TlsStream<TcpStream>>,
    /// Without a client certificate (its cut-offs are counted).
    anonymous: bool,
}

/// Accepts until `stop`, handing handshaken connections to the gRPC server.
///
/// A connection holds a place among the handshakes until its handshake ends;
/// then it moves to the authenticated or the anonymous budget, or is closed
/// if that one is full.
pub(crate) async fn accept(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: Limits,
    to_server: mpsc::Sender<io::Result<Conn>>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let handshakes = limits.handshakes.clone();
    palisade_net::serve(listener, handshakes, stop, tracker, move |tcp, src, slot| {
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
    handshaking: Slot,
    acceptor: &tokio_rustls::TlsAcceptor,
    limits: &Limits,
) -> Option<Conn> {
    let accepted = Instant::now();
    let _ = tcp.set_nodelay(true);
    // A full budget takes the oldest handshake back for a newer one: a flood
    // of stalled handshakes then only pushes out its own.
    let accept = async {
        tokio::select! {
            r = acceptor.accept(tcp) => Some(r),
            _ = handshaking.evicted() => None,
        }
    };
    let tls = match tokio::time::timeout(limits.handshake_timeout, accept).await {
        Ok(None) => {
            tracing::debug!(src.addr = %src, "handshake place taken back for a newer connection");
            return None;
        }
        Ok(Some(Ok(tls))) => tls,
        Ok(Some(Err(e))) => {
            tracing::info!(target: "audit", event = "tls_handshake_failed", src.addr = %src, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            METRICS.refused(limits.handshakes.name(), "deadline");
            tracing::debug!(src.addr = %src, "TLS handshake timed out");
            return None;
        }
    };
    let authenticated = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
    if !authenticated {
        let Some(slot) = limits.anonymous.admit(src.ip()).await else {
            tracing::debug!(src.addr = %src, "anonymous connection limit reached (--max-anonymous-connections[-per-ip]); closing");
            return None;
        };
        drop(handshaking);
        // An absolute deadline from accept, and a few calls: a first join needs
        // no more, and nothing the peer sends (PINGs) keeps it open longer.
        let io = IdleTimeout::new(tls, limits.anonymous_deadline, Some(slot))
            .deadline(accepted + limits.anonymous_deadline)
            .max_requests(ANONYMOUS_CALLS);
        return Some(Conn { io, anonymous: true });
    }
    let Some(slot) = limits.authenticated.try_take_for(src.ip()) else {
        tracing::warn!(src.addr = %src, "connection limit reached (--max-connections); closing");
        return None;
    };
    drop(handshaking);
    Some(Conn { io: IdleTimeout::new(tls, limits.idle_timeout, Some(slot)), anonymous: false })
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.get_ref().connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &r
            && self.anonymous
        {
            match e.kind() {
                io::ErrorKind::TimedOut => METRICS.refused("control-plane-anonymous", "deadline"),
                io::ErrorKind::PermissionDenied => METRICS.refused("control-plane-anonymous", "requests"),
                _ => {}
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_three_budgets_are_apart_and_the_host_keeps_a_place_in_each() {
        let cfg = crate::Config::try_parse_from([
            "palisade-control-plane",
            "--data-dir",
            "/nonexistent",
            "--max-unauthenticated-connections",
            "4",
            "--max-unauthenticated-connections-per-ip",
            "2",
            "--max-anonymous-connections",
            "2",
            "--max-anonymous-connections-per-ip",
            "1",
            "--max-connections",
            "2",
            "--reserved-loopback-connections",
            "1",
        ])
        .unwrap();
        assert_eq!(cfg.anonymous_deadline, Duration::from_secs(10), "the documented default");
        let l = Limits::new(&cfg);
        // Handshakes from two addresses fill their budget, two each at most.
        let handshakes: Vec<Slot> =
            ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"].map(|a| l.handshakes.try_take_for(ip(a)).unwrap()).into();
        assert!(l.handshakes.try_take_for(ip("10.0.0.1")).is_none(), "per address");
        assert!(l.handshakes.try_take_for(ip("10.0.0.3")).is_none(), "full");
        let local = l.handshakes.try_take_for(ip("127.0.0.1")).expect("the host's reserved place");
        // Anonymous connections fill only theirs, one per address.
        let anonymous = l.anonymous.try_take_for(ip("10.0.0.1")).unwrap();
        assert!(l.anonymous.try_take_for(ip("10.0.0.1")).is_none());
        let other = l.anonymous.try_take_for(ip("10.0.0.2")).unwrap();
        assert!(l.anonymous.try_take_for(ip("10.0.0.3")).is_none());
        // Sidecars and operators still find their places.
        let authenticated: Vec<Slot> = (0..2).map(|_| l.authenticated.try_take_for(ip("10.0.0.1")).unwrap()).collect();
        drop((handshakes, local, anonymous, other, authenticated));
    }

    #[test]
    fn anonymous_limits_and_deadline_are_checked() {
        for args in [
            &["--anonymous-deadline", "0s"][..],
            &["--anonymous-deadline", "2h"],
            &["--max-anonymous-connections", "0"],
            &["--max-anonymous-connections-per-ip", "0"],
            &["--reserved-loopback-connections", "5000"],
        ] {
            let cfg = crate::Config::try_parse_from(
                ["palisade-control-plane", "--data-dir", "/nonexistent"].into_iter().chain(args.iter().copied()),
            )
            .unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(args[0]), "{args:?}: {e}");
        }
    }
}
