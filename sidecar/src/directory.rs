//! The mesh directory as this sidecar knows it: service name
//! (`<service-account>.<namespace>`) -> peer sidecar endpoints with the
//! identity each must present, and address -> service and identity (the
//! lookup key for transparent interception, where the original destination
//! is all we have).
//!
//! It holds only what this sidecar asked for: the services it subscribed to
//! (declared upstreams, route backends, a first call) and the addresses it
//! looked up (transparent mode). A miss subscribes and waits about one round
//! trip for the control plane's answer ([`crate::control`] sends the wants on
//! the config stream); answers, "no endpoints" and "nothing meshed there"
//! included, are kept and kept current by the control plane. The last good
//! copy stays in use while the control plane is away.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use palisade_certs::SpiffeId;

/// A fast hasher for the maps read on every call.
pub(crate) type Fast = foldhash::fast::RandomState;
use palisade_proto::v1::Want;

use crate::proxy::peer::Peer;

/// Bound on the services and addresses one stream subscribes to, the
/// control plane's: it answers fewer than this many. Misses subscribe only
/// below it; beyond, a miss is answered from what is held. A workload
/// calling random addresses cannot grow the directory, nor what the control
/// plane tracks for it, without bound.
pub const MAX_SUBSCRIPTIONS: usize = 4096;

/// Lookup indexes over what is held, rebuilt after every update (small:
/// only subscribed services and addresses), read without the [`Held`] lock.
#[derive(Debug, Default)]
struct Index {
    /// Answered services; an empty list: the service has no endpoints now.
    /// Looked up on every call: hashed with foldhash, not SipHash (the
    /// keys are the directory's own, not an attacker's to collide).
    by_service: HashMap<String, Vec<Peer>, Fast>,
    by_addr: HashMap<SocketAddr, SpiffeId, Fast>,
    by_ip: HashMap<IpAddr, SpiffeId, Fast>,
    service_by_ip: HashMap<IpAddr, Arc<str>, Fast>,
    /// Answered addresses where nothing meshed is (egress rules apply).
    unmeshed: HashSet<IpAddr>,
    loaded: bool,
    /// Which build this is (the balancer resyncs a service when it changes).
    generation: u64,
}

/// What is held and what was asked for.
#[derive(Debug, Default)]
struct Held {
    /// Answered services and their endpoints.
    services: HashMap<String, Vec<Peer>>,
    /// Answered addresses: the service there, `None` when nothing meshed is.
    addresses: HashMap<IpAddr, Option<Arc<str>>>,
    subscribed_services: BTreeSet<String>,
    subscribed_addresses: BTreeSet<IpAddr>,
    /// Subscribed to since the config stream last took the wants.
    queued: Want,
    /// Whether reaching [`MAX_SUBSCRIPTIONS`] was logged.
    full_logged: bool,
}

impl Held {
    fn subscriptions(&self) -> usize {
        self.subscribed_services.len() + self.subscribed_addresses.len()
    }

    /// Room for one more on-demand subscription (logs once when full).
    fn room(&mut self) -> bool {
        if self.subscriptions() + 1 < MAX_SUBSCRIPTIONS {
            return true;
        }
        if !self.full_logged {
            self.full_logged = true;
            tracing::warn!(
                limit = MAX_SUBSCRIPTIONS,
                "directory subscription limit reached; calls to services and addresses not yet known fail (unknown service) or are treated as unmeshed"
            );
        }
        false
    }
}

/// One update's changes to the directory.
#[derive(Debug, Default)]
pub struct Changes {
    /// Services answered: their endpoints now (empty: none).
    pub services: Vec<(String, Vec<Peer>)>,
    /// Addresses answered: the service there, `None` when nothing meshed is.
    pub addresses: Vec<(IpAddr, Option<Arc<str>>)>,
    /// Services the control plane removed: dropped, and no longer
    /// subscribed (the next miss asks again).
    pub removed_services: Vec<String>,
    /// Addresses the control plane removed, likewise.
    pub removed_addresses: Vec<IpAddr>,
}

/// The directory.
#[derive(Debug)]
pub struct Directory {
    current: RwLock<Arc<Index>>,
    held: Mutex<Held>,
    /// Bumped on every update received.
    version: tokio::sync::watch::Sender<u64>,
    /// Woken when a subscription is queued for the config stream.
    wants: tokio::sync::Notify,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            held: Mutex::default(),
            version: tokio::sync::watch::channel(0).0,
            wants: tokio::sync::Notify::new(),
        }
    }
}

/// Why no peer could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// No update received yet from the control plane.
    NotLoaded,
    /// The service has no registered sidecar.
    Unknown,
}

impl Directory {
    fn index(&self) -> Arc<Index> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether at least one update has been received from the control plane.
    pub fn loaded(&self) -> bool {
        *self.version.borrow() > 0
    }

    /// The first endpoint of `service` (for lookups: calls go where the
    /// balancer chooses among [`with_endpoints`](Self::with_endpoints)).
    /// Looks up only: see [`endpoint_or_wait`](Self::endpoint_or_wait) to
    /// subscribe on a miss.
    pub fn endpoint(&self, service: &str) -> Result<Peer, LookupError> {
        self.with_endpoints(service, |_, peers| peers[0].clone())
    }

    /// Hands `f` the endpoints of `service` and the generation of the
    /// directory they come from (the balancer chooses among them).
    pub fn with_endpoints<R>(&self, service: &str, f: impl FnOnce(u64, &[Peer]) -> R) -> Result<R, LookupError> {
        let index = self.index();
        match index.by_service.get(service) {
            Some(peers) if !peers.is_empty() => Ok(f(index.generation, peers)),
            _ if !index.loaded => Err(LookupError::NotLoaded),
            _ => Err(LookupError::Unknown),
        }
    }

    /// Waits up to `wait` for the endpoints of a service this sidecar does
    /// not hold yet (subscribing to it), as [`endpoint_or_wait`](Self::endpoint_or_wait) does.
    pub async fn await_service(&self, service: &str, wait: Duration) {
        let _ = self.endpoint_or_wait(service, wait).await;
    }

    /// Like [`endpoint`](Self::endpoint), but a service whose endpoints this
    /// sidecar does not hold yet is subscribed to, and the control plane's
    /// answer awaited for up to `wait`, so the first call to a service does
    /// not fail. An answer with no endpoints is [`LookupError::Unknown`].
    pub async fn endpoint_or_wait(&self, service: &str, wait: Duration) -> Result<Peer, LookupError> {
        if let Ok(peer) = self.endpoint(service) {
            return Ok(peer);
        }
        let mut updates = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            updates.borrow_and_update();
            // Answered with endpoints: done. Answered empty: the service may
            // be registering right now (its push is on the way), so wait for
            // the next update as before. Never asked: ask, then wait.
            match self.index().by_service.get(service) {
                Some(peers) if !peers.is_empty() => break,
                Some(_) => {}
                None if !self.subscribe_service(service) => break,
                None => {}
            }
            match tokio::time::timeout_at(deadline, updates.changed()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        self.endpoint(service)
    }

    /// The identity of the meshed pod at `ip` (transparent mode: the original
    /// destination's IP; its port is the app's, redirected by the pod's rules).
    pub fn identity_for_ip(&self, ip: IpAddr) -> Option<SpiffeId> {
        self.index().by_ip.get(&ip.to_canonical()).cloned()
    }

    /// Like [`identity_for_ip`](Self::identity_for_ip), but an address never
    /// looked up is subscribed to and the control plane's answer awaited for
    /// up to `wait` (then, when a service is there, that service's
    /// endpoints, which carry its identity). `None`: nothing meshed is there
    /// (an answer kept, so later connections do not wait), or no answer came.
    pub async fn identity_for_ip_or_wait(&self, ip: IpAddr, wait: Duration) -> Option<SpiffeId> {
        // The control plane names an IPv4 peer by its IPv4 address, never
        // its IPv4-mapped IPv6 spelling.
        let ip = ip.to_canonical();
        let mut updates = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            updates.borrow_and_update();
            let index = self.index();
            if let Some(id) = index.by_ip.get(&ip) {
                return Some(id.clone());
            }
            if index.unmeshed.contains(&ip) {
                return None;
            }
            let asked = match index.service_by_ip.get(&ip) {
                // A service with no endpoints now: no identity to present.
                Some(service) if index.by_service.contains_key(&**service) => return None,
                Some(service) => self.subscribe_service(service),
                None => self.subscribe_address(ip),
            };
            if !asked {
                return None;
            }
            match tokio::time::timeout_at(deadline, updates.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.identity_for_ip(ip),
            }
        }
    }

    /// The service of the meshed pod at `ip` (transparent mode).
    pub fn service_for_ip(&self, ip: IpAddr) -> Option<Arc<str>> {
        self.index().service_by_ip.get(&ip.to_canonical()).cloned()
    }

    /// The identity expected at `addr`.
    pub fn identity_at(&self, addr: &SocketAddr) -> Option<SpiffeId> {
        self.index().by_addr.get(addr).cloned()
    }

    /// Subscribes to `services` whatever the number of subscriptions: the
    /// declared upstreams and the backends of this workload's routes, which
    /// configuration bounds.
    pub fn want_services<S: Into<String>>(&self, services: impl IntoIterator<Item = S>) {
        let mut held = self.held();
        let mut queued = false;
        for service in services {
            let service = service.into();
            if held.subscribed_services.insert(service.clone()) {
                held.queued.services.push(service);
                queued = true;
            }
        }
        drop(held);
        if queued {
            self.wants.notify_one();
        }
    }

    /// Subscribes to `service` on demand; false when the limit is reached.
    fn subscribe_service(&self, service: &str) -> bool {
        let mut held = self.held();
        if held.subscribed_services.contains(service) {
            return true;
        }
        if !held.room() {
            return false;
        }
        held.subscribed_services.insert(service.to_string());
        held.queued.services.push(service.to_string());
        drop(held);
        self.wants.notify_one();
        true
    }

    /// Subscribes to `ip` on demand; false when the limit is reached.
    fn subscribe_address(&self, ip: IpAddr) -> bool {
        let mut held = self.held();
        if held.subscribed_addresses.contains(&ip) {
            return true;
        }
        if !held.room() {
            return false;
        }
        held.subscribed_addresses.insert(ip);
        held.queued.addresses.push(ip.to_string());
        drop(held);
        self.wants.notify_one();
        true
    }

    /// Every subscription, for a new stream's Hello (the control plane
    /// knows none of them); what was queued is in it, so the queue empties.
    pub fn hello_want(&self) -> Want {
        let mut held = self.held();
        held.queued = Want::default();
        Want {
            services: held.subscribed_services.iter().cloned().collect(),
            addresses: held.subscribed_addresses.iter().map(|ip| ip.to_string()).collect(),
        }
    }

    /// The subscriptions made since the last call (or Hello), for the open
    /// stream; `None` when there are none.
    pub fn take_wants(&self) -> Option<Want> {
        let want = std::mem::take(&mut self.held().queued);
        (!want.services.is_empty() || !want.addresses.is_empty()).then_some(want)
    }

    /// Completes when a subscription may have been queued since the last
    /// [`take_wants`](Self::take_wants).
    pub async fn wants_queued(&self) {
        self.wants.notified().await
    }

    /// Applies one update's changes (an update with none still counts: the
    /// directory is then loaded) and rebuilds the indexes. Returns the
    /// number of endpoints held.
    pub fn update(&self, changes: Changes) -> usize {
        let mut held = self.held();
        for service in changes.removed_services {
            held.services.remove(&service);
            held.subscribed_services.remove(&service);
        }
        for ip in changes.removed_addresses {
            held.addresses.remove(&ip);
            held.subscribed_addresses.remove(&ip);
        }
        // An answer nobody asked for (the control plane may send a
        // service with the address that named it) is kept like any other.
        for (service, peers) in changes.services {
            held.subscribed_services.insert(service.clone());
            held.services.insert(service, peers);
        }
        for (ip, service) in changes.addresses {
            held.subscribed_addresses.insert(ip);
            held.addresses.insert(ip, service);
        }
        let (mut index, endpoints) = build(&held);
        index.generation = *self.version.borrow() + 1;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
        drop(held);
        self.version.send_modify(|v| *v += 1);
        endpoints
    }
}

/// The indexes over what is held, and the number of endpoints.
fn build(held: &Held) -> (Index, usize) {
    let mut index = Index { loaded: true, ..Default::default() };
    let mut endpoints = 0;
    for (service, peers) in &held.services {
        let name: Arc<str> = service.as_str().into();
        for p in peers {
            index.by_addr.insert(p.addr, p.identity.clone());
            index.by_ip.insert(p.addr.ip(), p.identity.clone());
            index.service_by_ip.insert(p.addr.ip(), name.clone());
        }
        endpoints += peers.len();
        index.by_service.insert(service.clone(), peers.clone());
    }
    // What the endpoints say wins over an address's answer: a sidecar
    // registered there is called over mTLS, never in plaintext.
    for (ip, service) in &held.addresses {
        if index.by_ip.contains_key(ip) {
            continue;
        }
        match service {
            None => {
                index.unmeshed.insert(*ip);
            }
            Some(service) => {
                index.service_by_ip.insert(*ip, service.clone());
                // Every endpoint of a service presents its one identity.
                if let Some(p) = held.services.get(&**service).and_then(|peers| peers.first()) {
                    index.by_ip.insert(*ip, p.identity.clone());
                }
            }
        }
    }
    (index, endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: &str, addr: &str) -> Peer {
        Peer { addr: addr.parse().unwrap(), identity: identity.parse().unwrap() }
    }

    fn answer(d: &Directory, service: &str, peers: Vec<Peer>) {
        d.update(Changes { services: vec![(service.into(), peers)], ..Default::default() });
    }

    /// The next wants the directory queues for the stream.
    async fn next_want(d: &Directory) -> Want {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(w) = d.take_wants() {
                    return w;
                }
                d.wants_queued().await;
            }
        })
        .await
        .expect("a want within 10s")
    }

    #[tokio::test]
    async fn a_miss_subscribes_and_waits_for_that_services_answer() {
        let d = Arc::new(Directory::default());
        d.update(Changes::default());
        let d2 = d.clone();
        let call = tokio::spawn(async move { d2.endpoint_or_wait("web.shop", Duration::from_secs(10)).await });
        assert_eq!(next_want(&d).await, Want { services: vec!["web.shop".into()], addresses: vec![] });
        // Another service's answer does not end the wait.
        answer(&d, "db.shop", vec![peer("spiffe://td/ns/shop/sa/db", "127.0.0.1:2")]);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!call.is_finished(), "the call waits for web.shop's own answer");
        answer(&d, "web.shop", vec![peer("spiffe://td/ns/shop/sa/web", "127.0.0.1:1")]);
        let p = call.await.unwrap();
        assert_eq!(p.map(|p| p.addr), Ok("127.0.0.1:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn an_empty_answer_is_unknown_and_asked_once() {
        let d = Arc::new(Directory::default());
        d.update(Changes::default());
        let d2 = d.clone();
        // An empty answer waits out `wait` for the service to register.
        let call = tokio::spawn(async move { d2.endpoint_or_wait("gone.shop", Duration::from_millis(300)).await });
        assert_eq!(next_want(&d).await.services, ["gone.shop"]);
        answer(&d, "gone.shop", vec![]);
        assert_eq!(call.await.unwrap(), Err(LookupError::Unknown));
        assert_eq!(d.endpoint_or_wait("gone.shop", Duration::from_millis(50)).await, Err(LookupError::Unknown));
        assert_eq!(d.take_wants(), None, "an answered service is not asked for again");
    }

    #[tokio::test]
    async fn a_service_registering_during_the_wait_is_found() {
        let d = Arc::new(Directory::default());
        d.update(Changes::default());
        d.want_services(["late.shop"]);
        answer(&d, "late.shop", vec![]);
        let d2 = d.clone();
        let call = tokio::spawn(async move { d2.endpoint_or_wait("late.shop", Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let identity: SpiffeId = "spiffe://td/ns/shop/sa/late".parse().unwrap();
        answer(&d, "late.shop", vec![Peer { addr: "127.0.0.1:7".parse().unwrap(), identity }]);
        assert_eq!(call.await.unwrap().map(|p| p.addr), Ok("127.0.0.1:7".parse().unwrap()));
    }

    #[tokio::test]
    async fn before_any_update_a_miss_is_not_loaded() {
        let d = Directory::default();
        assert!(!d.loaded());
        assert_eq!(d.endpoint_or_wait("web.shop", Duration::ZERO).await, Err(LookupError::NotLoaded));
        d.update(Changes::default());
        assert!(d.loaded());
        assert_eq!(d.endpoint_or_wait("web.shop", Duration::ZERO).await, Err(LookupError::Unknown));
    }

    #[tokio::test]
    async fn an_address_miss_subscribes_and_a_negative_answer_is_kept() {
        let d = Arc::new(Directory::default());
        d.update(Changes::default());
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let d2 = d.clone();
        let call = tokio::spawn(async move { d2.identity_for_ip_or_wait(ip, Duration::from_secs(10)).await });
        assert_eq!(next_want(&d).await, Want { services: vec![], addresses: vec!["10.0.0.9".into()] });
        d.update(Changes { addresses: vec![(ip, None)], ..Default::default() });
        assert_eq!(call.await.unwrap(), None);
        assert_eq!(d.identity_for_ip_or_wait(ip, Duration::from_secs(10)).await, None);
        assert_eq!(d.take_wants(), None, "an unmeshed address is not asked for again");
    }

    #[tokio::test]
    async fn an_address_answer_leads_to_its_services_identity() {
        let d = Arc::new(Directory::default());
        d.update(Changes::default());
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let d2 = d.clone();
        let call = tokio::spawn(async move { d2.identity_for_ip_or_wait(ip, Duration::from_secs(10)).await });
        assert_eq!(next_want(&d).await.addresses, ["10.0.0.7"]);
        d.update(Changes { addresses: vec![(ip, Some("web.shop".into()))], ..Default::default() });
        assert_eq!(next_want(&d).await.services, ["web.shop"]);
        answer(&d, "web.shop", vec![peer("spiffe://td/ns/shop/sa/web", "10.0.0.7:4143")]);
        assert_eq!(call.await.unwrap(), Some("spiffe://td/ns/shop/sa/web".parse().unwrap()));
        assert_eq!(d.service_for_ip(ip).as_deref(), Some("web.shop"));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(d.identity_for_ip_or_wait(mapped, Duration::from_secs(10)).await, d.identity_for_ip(ip));
        assert_eq!(d.take_wants(), None, "an IPv4-mapped spelling is the same address");
    }

    #[test]
    fn subscriptions_are_bounded_but_declared_services_are_not() {
        let d = Directory::default();
        for i in 0..MAX_SUBSCRIPTIONS - 1 {
            assert!(d.subscribe_address(IpAddr::from([10, 1, (i >> 8) as u8, i as u8])));
        }
        assert!(!d.subscribe_address("10.2.0.1".parse().unwrap()));
        assert!(!d.subscribe_service("web.shop"));
        d.want_services(["orders.shop"]);
        let hello = d.hello_want();
        assert_eq!(hello.services, ["orders.shop"]);
        assert_eq!(hello.addresses.len(), MAX_SUBSCRIPTIONS - 1);
    }

    #[test]
    fn a_removed_service_is_dropped_and_asked_again_on_the_next_miss() {
        let d = Directory::default();
        answer(&d, "web.shop", vec![peer("spiffe://td/ns/shop/sa/web", "127.0.0.1:1")]);
        d.update(Changes { removed_services: vec!["web.shop".into()], ..Default::default() });
        assert_eq!(d.endpoint("web.shop"), Err(LookupError::Unknown));
        assert!(d.subscribe_service("web.shop"));
        assert_eq!(d.take_wants().map(|w| w.services), Some(vec!["web.shop".to_string()]));
    }

    #[test]
    fn lists_every_endpoint_and_reports_unknown() {
        let d = Directory::default();
        assert_eq!(d.endpoint("web.shop"), Err(LookupError::NotLoaded));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        answer(
            &d,
            "web.shop",
            vec![
                peer("spiffe://cluster.local/ns/shop/sa/web", "127.0.0.1:1"),
                peer("spiffe://cluster.local/ns/shop/sa/web", "127.0.0.1:2"),
            ],
        );
        assert_eq!(d.with_endpoints("web.shop", |_, peers| peers.len()), Ok(2));
        assert_eq!(d.endpoint("db.shop"), Err(LookupError::Unknown));
        assert_eq!(d.identity_at(&a), Some(id.clone()));
        assert_eq!(d.identity_for_ip(a.ip()), Some(id));
    }
}
