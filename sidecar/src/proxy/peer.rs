//! Connections to peer sidecars: mTLS with this workload's certificate,
//! checking that the peer presents exactly the identity the directory
//! expects. HTTP is multiplexed over one pooled HTTP/2 connection per peer;
//! opaque TCP and HTTP/1.1 upgrades get dedicated connections (by ALPN).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_certs::SpiffeId;
use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, SvidStore, TrustBundle};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::metrics::Metrics;
use crate::proxy::{ALPN_H2, Body, Direction};

/// Timeout for TCP connect plus TLS handshake to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a peer connection failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {addr}: timed out")]
    Timeout { addr: SocketAddr },
    #[error("peer {addr} did not present the expected identity {expected}")]
    IdentityMismatch { addr: SocketAddr, expected: SpiffeId },
    #[error("TLS with {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("this sidecar holds no valid certificate yet")]
    NoCertificate,
    #[error("HTTP/2 with {addr}: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
}

/// A peer sidecar: where, and who it must be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: SpiffeId,
}

/// A client TLS config is specific to the identity expected and the ALPN.
type ConfigKey = (SpiffeId, &'static [u8]);

/// A pooled connection and the certificate of ours it was opened with.
type Pooled = (http2::SendRequest<Body>, Arc<palisade_certs::tls::Svid>);

/// The client side of sidecar-to-sidecar connections.
#[derive(Debug)]
pub struct PeerClient {
    svids: SvidStore,
    bundle: TrustBundle,
    metrics: Arc<Metrics>,
    /// rustls configs per (identity, ALPN), kept for session resumption.
    configs: Mutex<HashMap<ConfigKey, Arc<rustls::ClientConfig>>>,
    /// Per peer: the connection, and the certificate of ours it was opened with.
    pool: Mutex<HashMap<Peer, Pooled>>,
    /// HTTP/2 PING interval on pooled connections.
    keepalive: Duration,
}

impl PeerClient {
    pub fn new(svids: SvidStore, bundle: TrustBundle, metrics: Arc<Metrics>, keepalive: Duration) -> Self {
        Self { svids, bundle, metrics, configs: Mutex::default(), pool: Mutex::default(), keepalive }
    }

    fn config(&self, id: &SpiffeId, alpn: &'static [u8]) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(&(id.clone(), alpn)) {
            return Ok(c.clone());
        }
        let verifier = SpiffeServerVerifier::new(self.bundle.clone(), PeerIdentity::Exact(id.clone()));
        let mut cfg = palisade_certs::tls::client_config(verifier, Some(Arc::new(self.svids.clone())))?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let cfg = Arc::new(cfg);
        configs.insert((id.clone(), alpn), cfg.clone());
        Ok(cfg)
    }

    /// A new mTLS connection to `peer` negotiating `alpn`.
    pub async fn connect(&self, peer: &Peer, alpn: &'static [u8]) -> Result<TlsStream<TcpStream>, PeerError> {
        if self.svids.valid().is_none() {
            return Err(PeerError::NoCertificate);
        }
        let addr = peer.addr;
        let cfg = self.config(&peer.identity, alpn).map_err(|e| PeerError::Tls { addr, reason: e.to_string() })?;
        let connect = async {
            let tcp = TcpStream::connect(addr).await.map_err(|source| PeerError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::IpAddress(addr.ip().into());
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| {
                let mismatch = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
                    )
                });
                if mismatch {
                    self.metrics.identity_mismatch.inc();
                    tracing::warn!(target: "audit", decision = "deny", dst.addr = %addr, dst.identity = %peer.identity, "peer sidecar presented an unexpected identity");
                    PeerError::IdentityMismatch { addr, expected: peer.identity.clone() }
                } else {
                    self.metrics.tls_failure(Direction::Outbound, "handshake");
                    PeerError::Tls { addr, reason: e.to_string() }
                }
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect).await.map_err(|_| PeerError::Timeout { addr })?
    }

    /// The pooled HTTP/2 connection to `peer`, opened if needed.
    pub async fn h2(&self, peer: &Peer) -> Result<http2::SendRequest<Body>, PeerError> {
        if let Some(s) = self.pooled(peer) {
            return Ok(s);
        }
        // Taken before the handshake: if a renewal lands during it, the
        // connection is only replaced once more than needed.
        let ours = self.svids.valid().ok_or(PeerError::NoCertificate)?;
        let tls = self.connect(peer, ALPN_H2).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Idle pooled connections are pinged too, so one that died
            // quietly (peer gone, NAT state lost) is found and dropped before
            // a request is put on it.
            .keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive.min(Duration::from_secs(5)))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| PeerError::Http { addr: peer.addr, source })?;
        let addr = peer.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(dst.addr = %addr, error = %e, "peer connection ended");
            }
        });
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.clone(), (sender.clone(), ours));
        Ok(sender)
    }

    /// The pooled HTTP/2 connection to `peer`, if there is a usable one.
    pub fn pooled(&self, peer: &Peer) -> Option<http2::SendRequest<Body>> {
        let current = self.svids.get();
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        match pool.get(peer) {
            // A connection opened with a certificate we have since renewed is
            // replaced: the peer refuses requests once that certificate has
            // expired, and it must never be carried that far. Requests in
            // flight on it finish; it closes when they have.
            Some((s, ours)) if !s.is_closed() && current.as_ref().is_some_and(|c| Arc::ptr_eq(c, ours)) => {
                Some(s.clone())
            }
            Some(_) => {
                pool.remove(peer);
                None
            }
            None => None,
        }
    }

    /// Forgets a pooled connection that failed.
    pub fn evict(&self, peer: &Peer) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).remove(peer);
    }
}
