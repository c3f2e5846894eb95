//! The mesh directory as this sidecar knows it: service name
//! (`<service-account>.<namespace>`) -> peer sidecar endpoints with the
//! identity each must present, and address -> identity (the lookup key for
//! transparent interception, where the original destination is all we have).
//! Pushed by the control plane on the config stream ([`crate::control`]) when
//! it changes; the last good copy stays in use while the control plane is away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use palisade_certs::SpiffeId;

use crate::proxy::peer::Peer;

#[derive(Debug, Default)]
struct Snapshot {
    by_service: HashMap<String, Vec<Peer>>,
    by_addr: HashMap<SocketAddr, SpiffeId>,
    service_by_ip: HashMap<std::net::IpAddr, Arc<str>>,
    by_ip: HashMap<std::net::IpAddr, SpiffeId>,
    loaded: bool,
}

/// The directory.
#[derive(Debug)]
pub struct Directory {
    current: RwLock<Arc<Snapshot>>,
    next: AtomicUsize,
    /// Bumped on every received directory.
    version: tokio::sync::watch::Sender<u64>,
    /// Sidecars that could not be reached, and when: skipped for [`DOWN_FOR`]
    /// (a sidecar that died keeps its entry until its certificate expires).
    down: std::sync::Mutex<HashMap<SocketAddr, std::time::Instant>>,
}

/// How long an unreachable sidecar is skipped.
const DOWN_FOR: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for Directory {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            next: AtomicUsize::new(0),
            version: tokio::sync::watch::channel(0).0,
            down: std::sync::Mutex::default(),
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
    /// Whether a directory has been received from the control plane.
    pub fn loaded(&self) -> bool {
        *self.version.borrow() > 0
    }

    /// Picks a peer for `service`, round robin, passing over the ones found
    /// unreachable lately (unless all are).
    pub fn pick(&self, service: &str) -> Result<Peer, LookupError> {
        let snap = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        match snap.by_service.get(service) {
            Some(peers) if !peers.is_empty() => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let down = {
                    let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
                    down.retain(|_, at| at.elapsed() < DOWN_FOR);
                    down.keys().copied().collect::<Vec<_>>()
                };
                let up = (0..peers.len()).map(|k| &peers[(start + k) % peers.len()]).find(|p| !down.contains(&p.addr));
                Ok(up.unwrap_or(&peers[start % peers.len()]).clone())
            }
            _ if !snap.loaded => Err(LookupError::NotLoaded),
            _ => Err(LookupError::Unknown),
        }
    }

    /// Like [`pick`](Self::pick), but on a miss waits up to `wait` for the
    /// next directory the control plane pushes (it pushes one as soon as a
    /// sidecar registers), so the first call to a service that just
    /// registered does not fail.
    pub async fn pick_or_wait(&self, service: &str, wait: Duration) -> Result<Peer, LookupError> {
        let mut updates = self.version.subscribe();
        updates.mark_unchanged();
        match self.pick(service) {
            Ok(p) => Ok(p),
            Err(_) => {
                let _ = tokio::time::timeout(wait, updates.changed()).await;
                self.pick(service)
            }
        }
    }

    /// Marks a sidecar unreachable (nothing could be sent to it).
    pub fn mark_down(&self, addr: SocketAddr) {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, std::time::Instant::now());
    }

    /// The identity of the meshed pod at `ip` (transparent mode: the original
    /// destination's IP; its port is the app's, redirected by the pod's rules).
    pub fn identity_for_ip(&self, ip: std::net::IpAddr) -> Option<SpiffeId> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).by_ip.get(&ip).cloned()
    }

    /// The service of the meshed pod at `ip` (transparent mode).
    pub fn service_for_ip(&self, ip: std::net::IpAddr) -> Option<Arc<str>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).service_by_ip.get(&ip).cloned()
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
            snap.service_by_ip.insert(addr.ip(), service.as_str().into());
            snap.by_ip.insert(addr.ip(), identity.clone());
            snap.by_service.entry(service).or_default().push(Peer { addr, identity });
            n += 1;
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        self.version.send_modify(|v| *v += 1);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_miss_waits_for_the_next_pushed_directory() {
        let d = Arc::new(Directory::default());
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        d.replace([]);
        let d2 = d.clone();
        let pusher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            d2.replace([("web.shop".to_string(), id, "127.0.0.1:1".parse().unwrap())]);
        });
        let p = d.pick_or_wait("web.shop", Duration::from_secs(5)).await;
        assert!(p.is_ok(), "{p:?}");
        pusher.await.unwrap();
        let missing = d.pick_or_wait("db.shop", Duration::from_millis(20)).await;
        assert_eq!(missing, Err(LookupError::Unknown));
    }

    #[test]
    fn unreachable_sidecars_are_passed_over_unless_all_are() {
        let d = Directory::default();
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let (a, b): (SocketAddr, SocketAddr) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        d.replace([("b.a".to_string(), id.clone(), a), ("b.a".to_string(), id, b)]);
        d.mark_down(a);
        for _ in 0..4 {
            assert_eq!(d.pick("b.a").unwrap().addr, b);
        }
        d.mark_down(b);
        let both: std::collections::HashSet<_> = (0..4).map(|_| d.pick("b.a").unwrap().addr).collect();
        assert_eq!(both.len(), 2, "all down: round robin again");
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
