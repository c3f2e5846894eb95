//! The mesh directory as this sidecar knows it: service name
//! (`<service-account>.<namespace>`) -> peer sidecar endpoints with the
//! identity each must present, and address -> identity (the lookup key for
//! transparent interception, where the original destination is all we have).
//! Refreshed from the control plane; the last good copy stays in use while
//! the control plane is away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use palisade_certs::SpiffeId;
use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, SvidStore, TrustBundle};
use palisade_proto::channel::ControlPlaneAddr;
use palisade_proto::v1::ListEndpointsRequest;
use palisade_proto::v1::discovery_client::DiscoveryClient;
use tonic::transport::Channel;

use crate::metrics::Metrics;
use crate::proxy::peer::Peer;

#[derive(Debug, Default)]
struct Snapshot {
    by_service: HashMap<String, Vec<Peer>>,
    by_addr: HashMap<SocketAddr, SpiffeId>,
    by_ip: HashMap<std::net::IpAddr, SpiffeId>,
    loaded: bool,
}

/// The directory.
#[derive(Debug)]
pub struct Directory {
    current: RwLock<Arc<Snapshot>>,
    next: AtomicUsize,
    /// Asks the refresh loop for an early refresh (a lookup missed).
    refresh_now: tokio::sync::Notify,
    /// Bumped on every received directory.
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            next: AtomicUsize::new(0),
            refresh_now: tokio::sync::Notify::new(),
            version: tokio::sync::watch::channel(0).0,
        }
    }
}

/// Why no peer could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// No directory received yet from the control plane.
    NotLoaded,
    /// The service has no registered sidecar.
    Unknown,
}

impl Directory {
    /// Picks a peer for `service`, round robin.
    pub fn pick(&self, service: &str) -> Result<Peer, LookupError> {
        let snap = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        match snap.by_service.get(service) {
            Some(peers) if !peers.is_empty() => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % peers.len();
                Ok(peers[i].clone())
            }
            _ if !snap.loaded => Err(LookupError::NotLoaded),
            _ => Err(LookupError::Unknown),
        }
    }

    /// Like [`pick`](Self::pick), but on a miss asks for an immediate refresh
    /// and waits up to `wait` for it, so the first call to a service that
    /// just registered does not fail.
    pub async fn pick_or_refresh(&self, service: &str, wait: Duration) -> Result<Peer, LookupError> {
        match self.pick(service) {
            Ok(p) => Ok(p),
            Err(_) => {
                let mut updates = self.version.subscribe();
                updates.mark_unchanged();
                self.refresh_now.notify_one();
                let _ = tokio::time::timeout(wait, updates.changed()).await;
                self.pick(service)
            }
        }
    }

    /// The identity of the meshed pod at `ip` (transparent mode: the original
    /// destination's IP; its port is the app's, redirected by the pod's rules).
    pub fn identity_for_ip(&self, ip: std::net::IpAddr) -> Option<SpiffeId> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).by_ip.get(&ip).cloned()
    }

    /// The identity expected at `addr`.
    pub fn identity_at(&self, addr: &SocketAddr) -> Option<SpiffeId> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).by_addr.get(addr).cloned()
    }

    /// Replaces the directory with a newly received one.
    pub fn replace(&self, endpoints: impl IntoIterator<Item = (String, SpiffeId, SocketAddr)>) -> usize {
        let mut snap = Snapshot { loaded: true, ..Default::default() };
        let mut n = 0;
        for (service, identity, addr) in endpoints {
            snap.by_addr.insert(addr, identity.clone());
            snap.by_ip.insert(addr.ip(), identity.clone());
            snap.by_service.entry(service).or_default().push(Peer { addr, identity });
            n += 1;
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        self.version.send_modify(|v| *v += 1);
        n
    }
}

/// Polls the control plane for the directory.
#[derive(Debug)]
pub struct DirectoryClient {
    pub addr: ControlPlaneAddr,
    pub bundle: TrustBundle,
    pub svids: SvidStore,
    pub trust_domain: palisade_certs::TrustDomain,
    pub directory: Arc<Directory>,
    pub metrics: Arc<Metrics>,
    pub refresh: Duration,
}

impl DirectoryClient {
    pub async fn run(self) {
        let mut channel: Option<Channel> = None;
        let mut failures = 0u32;
        loop {
            // Without a certificate the control plane will not answer; wait for one.
            if self.svids.valid().is_some() {
                match self.refresh_once(&mut channel).await {
                    Ok(n) => {
                        tracing::debug!(endpoints = n, "directory refreshed");
                        if failures > 0 {
                            tracing::info!(endpoints = n, "directory refresh recovered");
                        }
                        failures = 0;
                        self.metrics.directory_endpoints.set(n as i64);
                    }
                    Err(e) => {
                        channel = None;
                        failures += 1;
                        self.metrics.directory_refresh_failures.inc();
                        // Log the first failure and then every 30th, not every tick.
                        if failures == 1 || failures.is_multiple_of(30) {
                            tracing::warn!(error = %e, failures, "directory refresh failed; keeping the last good directory");
                        }
                    }
                }
            }
            let wait = if self.svids.valid().is_some() { self.refresh } else { Duration::from_millis(100) };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.directory.refresh_now.notified() => {}
            }
        }
    }

    async fn refresh_once(&self, channel: &mut Option<Channel>) -> Result<usize, String> {
        let ch = match channel {
            Some(c) => c.clone(),
            None => {
                let verifier = SpiffeServerVerifier::new(
                    self.bundle.clone(),
                    PeerIdentity::Exact(self.trust_domain.control_plane()),
                );
                let tls = palisade_certs::tls::client_config(verifier, Some(Arc::new(self.svids.clone())))
                    .map_err(|e| e.to_string())?;
                let c = palisade_proto::channel::connect(&self.addr, Arc::new(tls), Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string())?;
                *channel = Some(c.clone());
                c
            }
        };
        let resp = DiscoveryClient::new(ch)
            .list_endpoints(ListEndpointsRequest {})
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let entries = resp.endpoints.into_iter().filter_map(|e| {
            let id: SpiffeId = e.identity.parse().ok()?;
            let addr: SocketAddr = e.address.parse().ok()?;
            Some((e.service, id, addr))
        });
        Ok(self.directory.replace(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_miss_triggers_a_refresh_and_waits_for_it() {
        let d = Arc::new(Directory::default());
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        d.replace([]);
        let d2 = d.clone();
        let refresher = tokio::spawn(async move {
            d2.refresh_now.notified().await;
            d2.replace([("web.shop".to_string(), id, "127.0.0.1:1".parse().unwrap())]);
        });
        let p = d.pick_or_refresh("web.shop", Duration::from_secs(5)).await;
        assert!(p.is_ok(), "{p:?}");
        refresher.await.unwrap();
    }

    #[test]
    fn picks_round_robin_and_reports_unknown() {
        let d = Directory::default();
        assert_eq!(d.pick("web.shop"), Err(LookupError::NotLoaded));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        d.replace([("web.shop".to_string(), id.clone(), a), ("web.shop".to_string(), id.clone(), b)]);
        let picks: std::collections::HashSet<_> = (0..4).map(|_| d.pick("web.shop").unwrap().addr).collect();
        assert_eq!(picks.len(), 2);
        assert_eq!(d.pick("db.shop"), Err(LookupError::Unknown));
        assert_eq!(d.identity_at(&a), Some(id));
    }
}
