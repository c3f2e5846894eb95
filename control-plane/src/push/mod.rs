//! The push path: what each sidecar runs on besides its certificate, sent
//! on `MeshConfig.Subscribe` as named, versioned resources, incrementally
//! and scoped to what that sidecar needs.
//!
//! - [`Hub`] takes change notices (policies, credentials, the directory,
//!   replica counts), and the [`engine`] turns each coalesced batch of them
//!   into the set of streams that must look again: the subscribers of the
//!   services that changed, the streams of the identities whose policy view
//!   changed, or all of them for the trust bundle.
//! - [`view`] builds resources once per content (a policy view per identity,
//!   the directory as one resource per service, the trust bundle) and
//!   shares them between streams.
//! - [`stream`] serves one sidecar: it diffs what the sidecar should hold
//!   against what it was sent and sends the difference; a slow stream is
//!   sent the latest state when it catches up, never a queue.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Shared;

mod engine;
mod stream;
pub(crate) mod view;

pub use stream::MeshConfigService;

/// The roots of a bundle as one comparable string (what a root rotation
/// compares an ACKed bundle against).
pub fn roots_key(roots: &[Vec<u8>]) -> String {
    roots.iter().map(|r| palisade_certs::ca::sha256_hex(r)).collect::<Vec<_>>().join(",")
}

/// What the control plane knows of one proxy's config sync (and, with a
/// replicated store, what each replica publishes of its own proxies).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    pub identity: String,
    /// Policy version last sent.
    pub sent: String,
    /// Policy version last ACKed.
    pub acked: String,
    /// The roots of the last sent trust bundle ([`roots_key`]).
    #[serde(skip)]
    pub sent_roots: String,
    /// The roots of the trust bundle it last ACKed: a root rotation waits on them.
    #[serde(default)]
    pub acked_roots: String,
    pub last_nack: String,
    pub connected: bool,
    pub nacked: bool,
    /// The store's policy revision this proxy's view was last computed
    /// from (sent, or found unchanged): `policy apply --wait` waits for it.
    pub evaluated: u64,
    /// The credentials generation (API keys, key sets, the CA) its view was
    /// last computed from: `apikey create` and `revoke` wait for it.
    #[serde(skip)]
    pub credentials: u64,
    /// Which stream owns the entry: a reconnect's new stream takes it over,
    /// and the old stream closing late must not mark it disconnected.
    #[serde(skip)]
    pub stream: u64,
    /// The nonce of the last update sent.
    #[serde(skip)]
    pub sent_nonce: String,
    /// The nonce last NACKed (a NACK is recorded once).
    #[serde(skip)]
    pub nacked_nonce: String,
    /// When the change the last sent update carries happened (for the
    /// push latency, observed at its ACK).
    #[serde(skip)]
    pub change_at: Option<Instant>,
}

/// The sync-status key of a proxy: its verified identity, then the inbound
/// address it registered. The identity comes from the client certificate,
/// so a workload can only ever touch its own entries.
pub fn status_key(identity: &str, inbound_addr: &str) -> String {
    format!("{identity} {inbound_addr}")
}

impl SyncStatus {
    pub fn state(&self) -> &'static str {
        match () {
            _ if !self.connected => "disconnected",
            _ if self.nacked => "nacked",
            _ if self.acked == self.sent => "synced",
            _ => "pending",
        }
    }
}

/// Most config streams one identity holds open (its replicas, each at
/// its own address, and reconnects overlapping); beyond, refused.
pub(crate) const MAX_STREAMS_PER_IDENTITY: usize = 1024;
/// Most subscriptions one identity's streams hold together: one workload
/// cannot grow the control plane's memory without bound by opening streams.
pub(crate) const MAX_SUBSCRIPTIONS_PER_IDENTITY: usize = 65_536;

/// What changed since the engine last looked.
#[derive(Debug, Default)]
struct Dirty {
    /// Policies changed: every identity's view is rebuilt.
    policies: bool,
    /// Credentials or the CA changed: views and the trust bundle are rebuilt.
    credentials: bool,
    /// The directory changed: it is rebuilt and diffed per service.
    endpoints: bool,
    /// Taps started or ended: every stream looks again.
    taps: bool,
    /// Identities whose replica count changed (cluster-scope rate shares).
    identities: HashSet<String>,
    /// When the oldest change in this batch happened.
    since: Option<Instant>,
}

/// One open stream, as the engine sees it.
#[derive(Debug)]
pub(crate) struct Handle {
    pub(crate) id: u64,
    pub(crate) identity: String,
    /// Its sync-status key: one stream per key, the newest.
    pub(crate) key: String,
    /// Ends the stream (a newer one took its key over).
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Set by the engine when something this stream holds may have changed.
    pub(crate) wake: tokio::sync::Notify,
    /// When the change it was woken for happened (for the push latency).
    pub(crate) since: Mutex<Option<Instant>>,
}

impl Handle {
    fn poke(&self, since: Option<Instant>) {
        if let Some(at) = since {
            let mut s = self.since.lock().unwrap_or_else(|p| p.into_inner());
            if s.is_none_or(|old| at < old) {
                *s = Some(at);
            }
        }
        self.wake.notify_one();
    }
}

/// The open streams and what each subscribed to, for waking only the
/// ones a change concerns.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) streams: HashMap<u64, Arc<Handle>>,
    pub(crate) by_identity: HashMap<String, HashSet<u64>>,
    pub(crate) by_service: HashMap<String, HashSet<u64>>,
    pub(crate) by_ip: HashMap<IpAddr, HashSet<u64>>,
    /// The stream holding each sync-status key.
    by_key: HashMap<String, u64>,
    /// Subscriptions held by each identity's streams together.
    subs_by_identity: HashMap<String, usize>,
}

impl Registry {
    fn drop_stream(&mut self, h: &Handle, services: &HashSet<String>, ips: &HashSet<IpAddr>) {
        self.streams.remove(&h.id);
        if self.by_key.get(&h.key) == Some(&h.id) {
            self.by_key.remove(&h.key);
        }
        let held = services.len() + ips.len();
        if let Some(n) = self.subs_by_identity.get_mut(&h.identity) {
            *n = n.saturating_sub(held);
            if *n == 0 {
                self.subs_by_identity.remove(&h.identity);
            }
        }
        let prune = |m: &mut HashSet<u64>| {
            m.remove(&h.id);
            m.is_empty()
        };
        if self.by_identity.get_mut(&h.identity).is_some_and(prune) {
            self.by_identity.remove(&h.identity);
        }
        for s in services {
            if self.by_service.get_mut(s).is_some_and(prune) {
                self.by_service.remove(s);
            }
        }
        for ip in ips {
            if self.by_ip.get_mut(ip).is_some_and(prune) {
                self.by_ip.remove(ip);
            }
        }
    }
}

/// Change notices, the shared views and sync bookkeeping.
#[derive(Debug)]
pub struct Hub {
    /// Bumped when policies change (the key-set fetcher follows it).
    policies: tokio::sync::watch::Sender<u64>,
    dirty: Mutex<Dirty>,
    /// Wakes the engine.
    kick: tokio::sync::Notify,
    pub(crate) registry: Mutex<Registry>,
    /// Keyed by [`status_key`].
    pub status: Mutex<HashMap<String, SyncStatus>>,
    /// Bumped on every change to `status` (publishing skips when unchanged).
    status_changes: AtomicU64,
    pub(crate) nonce: AtomicU64,
    /// Bumped when request credentials or the CA change: part of the policy version.
    credentials: AtomicU64,
    /// Set on shutdown: every stream ends so the server can drain.
    pub closing: tokio::sync::watch::Sender<bool>,
    /// Connected proxies per identity on the other replicas.
    remote_counts: Mutex<HashMap<String, usize>>,
    pub(crate) views: view::Views,
    /// How long changes are gathered before they are pushed.
    pub(crate) coalesce: Duration,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(Duration::from_millis(100))
    }
}

impl Hub {
    pub fn new(coalesce: Duration) -> Self {
        Self {
            policies: tokio::sync::watch::channel(0).0,
            dirty: Mutex::default(),
            kick: tokio::sync::Notify::new(),
            registry: Mutex::default(),
            status: Mutex::default(),
            status_changes: AtomicU64::new(0),
            nonce: AtomicU64::new(1),
            credentials: AtomicU64::new(0),
            closing: tokio::sync::watch::channel(false).0,
            remote_counts: Mutex::default(),
            views: view::Views::default(),
            coalesce,
        }
    }

    fn mark(&self, f: impl FnOnce(&mut Dirty)) {
        {
            let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut d);
            d.since.get_or_insert_with(Instant::now);
        }
        self.kick.notify_one();
    }

    /// Policies changed.
    pub fn policies_changed(&self) {
        self.mark(|d| d.policies = true);
        self.policies.send_modify(|v| *v += 1);
    }

    /// Request credentials (API keys, fetched key sets, the mesh's signing
    /// keys) or the CA changed: views are rebuilt under a new version.
    /// Returns the new generation.
    pub fn credentials_changed(&self) -> u64 {
        let generation = self.credentials.fetch_add(1, Ordering::SeqCst) + 1;
        self.mark(|d| d.credentials = true);
        generation
    }

    pub(crate) fn generation(&self) -> u64 {
        self.credentials.load(Ordering::SeqCst)
    }

    /// The directory changed (a proxy appeared, moved or left).
    pub fn endpoints_changed(&self) {
        self.mark(|d| d.endpoints = true);
    }

    /// Taps started or ended.
    pub(crate) fn taps_changed(&self) {
        self.mark(|d| d.taps = true);
    }

    /// The number of connected proxies of `identity` changed.
    fn replicas_changed(&self, identity: &str) {
        self.mark(|d| {
            d.identities.insert(identity.to_string());
        });
    }

    /// The other replicas' connected proxies per identity, as published:
    /// the identities whose count changed have their views rebuilt.
    pub(crate) fn remote_counts(&self, now: HashMap<String, usize>) {
        let changed: Vec<String> = {
            let mut old = self.remote_counts.lock().unwrap_or_else(|p| p.into_inner());
            let changed = now
                .iter()
                .filter(|(k, v)| old.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .chain(old.keys().filter(|k| !now.contains_key(*k)).cloned())
                .collect();
            *old = now;
            changed
        };
        for id in changed {
            self.replicas_changed(&id);
        }
    }

    /// Waits (up to `timeout`) until every connected proxy runs a view
    /// computed at credentials generation `generation` or later; `false` if
    /// some did not in time.
    pub async fn settled(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let done = {
                let all = self.status.lock().unwrap_or_else(|p| p.into_inner());
                all.values().filter(|s| s.connected).all(|s| s.credentials >= generation && s.acked == s.sent)
            };
            if done {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A receiver that sees every policy change.
    pub fn subscribe_policies(&self) -> tokio::sync::watch::Receiver<u64> {
        self.policies.subscribe()
    }

    pub(crate) fn update(&self, key: &str, f: impl FnOnce(&mut SyncStatus)) {
        let mut all = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(key.to_string()).or_default());
        self.status_changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Connected proxies of `identity` here and on the other replicas (the
    /// replica count for cluster-scope limits).
    pub(crate) fn replicas(&self, identity: &str) -> u64 {
        let here =
            self.registry.lock().unwrap_or_else(|p| p.into_inner()).by_identity.get(identity).map_or(0, |s| s.len());
        let there = self.remote_counts.lock().unwrap_or_else(|p| p.into_inner()).get(identity).copied().unwrap_or(0);
        (here + there).max(1) as u64
    }

    /// This replica's connected proxies, as published for the others;
    /// `None` when nothing changed since `seen` (which it updates).
    pub(crate) fn published(&self, seen: &mut u64) -> Option<std::collections::BTreeMap<String, Vec<u8>>> {
        let now = self.status_changes.load(Ordering::Relaxed);
        if std::mem::replace(seen, now) == now {
            return None;
        }
        let all = self.status.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .filter(|(_, s)| s.connected)
            .filter_map(|(k, s)| Some((k.clone(), serde_json::to_vec(&(k, s)).ok()?)))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into()
    }

    /// Registers a stream: it takes its key over from an older stream
    /// (a sidecar that reconnected; that one ends). `false`: the identity
    /// holds [`MAX_STREAMS_PER_IDENTITY`] streams already.
    pub(crate) fn join(&self, h: Arc<Handle>) -> bool {
        {
            let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = r.by_key.get(&h.key).and_then(|id| r.streams.get(id)) {
                old.cancel.cancel();
            }
            let open = r.by_identity.get(&h.identity).map_or(0, |s| s.len());
            let replacing = r.by_key.contains_key(&h.key);
            if open >= MAX_STREAMS_PER_IDENTITY && !replacing {
                return false;
            }
            r.by_identity.entry(h.identity.clone()).or_default().insert(h.id);
            r.by_key.insert(h.key.clone(), h.id);
            r.streams.insert(h.id, h.clone());
        }
        self.replicas_changed(&h.identity);
        true
    }

    /// Reserves up to `n` subscriptions for `identity`'s streams; returns how many it may add.
    pub(crate) fn reserve(&self, identity: &str, n: usize) -> usize {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let used = r.subs_by_identity.entry(identity.to_string()).or_default();
        let granted = n.min(MAX_SUBSCRIPTIONS_PER_IDENTITY.saturating_sub(*used));
        *used += granted;
        granted
    }

    /// Unregisters a stream and what it subscribed to.
    pub(crate) fn leave(&self, h: &Handle, services: &HashSet<String>, ips: &HashSet<IpAddr>) {
        self.registry.lock().unwrap_or_else(|p| p.into_inner()).drop_stream(h, services, ips);
        self.replicas_changed(&h.identity);
    }

    /// Records new subscriptions of stream `id`.
    pub(crate) fn subscribe(&self, id: u64, services: &[String], ips: &[IpAddr]) {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for s in services {
            r.by_service.entry(s.clone()).or_default().insert(id);
        }
        for ip in ips {
            r.by_ip.entry(*ip).or_default().insert(id);
        }
    }
}

/// The other replicas' connected proxies, by status key.
pub(crate) fn remote_statuses(shared: &Shared) -> Vec<(String, SyncStatus)> {
    shared.store.remote_streams().iter().filter_map(|r| serde_json::from_slice(r).ok()).collect()
}

/// Runs the engine until the control plane stops.
pub(crate) async fn run(shared: Arc<Shared>) {
    engine::run(shared).await
}
