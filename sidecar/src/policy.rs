//! Policy in the sidecar: the last good snapshot from the control plane,
//! compiled for this workload (authorization rules and rate limiters), and
//! the client of `PolicyDiscovery.Stream` that keeps it current, ACKing what
//! it could apply and NACKing (and ignoring) what it could not.
//!
//! Until a first snapshot arrives there is no enforcer and inbound traffic is
//! refused (fail closed); once one has arrived, it stays in force while the
//! control plane is away.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, SvidStore, TrustBundle};
use palisade_policy::ratelimit::{Algorithm, Outcome, Quota, State};
use palisade_policy::resource::{Limit, Scope};
use palisade_policy::{Decision, Request, Resource, RuleSet};
use palisade_proto::channel::ControlPlaneAddr;
use palisade_proto::v1::policy_discovery_client::PolicyDiscoveryClient;
use palisade_proto::v1::{DiscoveryRequest, Snapshot};
use rustls_pki_types::CertificateDer;
use wildmatch::WildMatch;

use crate::directory::Directory;
use crate::metrics::Metrics;

/// Most keys one limit tracks; beyond, the least recently used key's bucket
/// is forgotten (bounded memory, and a caller inventing keys cannot reset
/// everyone else's buckets).
const MAX_KEYS: std::num::NonZeroUsize = std::num::NonZeroUsize::new(100_000).expect("invariant: non-zero");

/// What a rate limit is keyed on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Identity,
    Header(String),
    SourceIp,
    None,
}

#[derive(Debug)]
struct CompiledLimit {
    policy: String,
    name: String,
    methods: Vec<String>,
    paths: Vec<WildMatch>,
    key: Key,
    algorithm: Algorithm,
    quota: Quota,
    states: Mutex<lru::LruCache<String, State>>,
}

impl CompiledLimit {
    fn same_as(&self, other: &CompiledLimit) -> bool {
        self.policy == other.policy
            && self.name == other.name
            && self.algorithm == other.algorithm
            && self.quota == other.quota
            && self.key == other.key
    }
}

/// A refused request: which limit, and what to tell the caller.
#[derive(Debug, Clone)]
pub struct Limited {
    pub policy: String,
    pub limit: String,
    pub quota: Quota,
    pub outcome: Outcome,
}

/// A compiled snapshot.
#[derive(Debug)]
pub struct Enforcer {
    /// The control-plane version it came from.
    pub version: String,
    rules: RuleSet,
    limits: Vec<CompiledLimit>,
    origin: Instant,
}

impl Enforcer {
    /// Compiles a snapshot for `identity`, keeping the counters of limits
    /// that did not change from `previous`.
    pub fn compile(snap: &Snapshot, identity: &str, previous: Option<&Enforcer>) -> Result<Self, String> {
        let mut resources = Vec::new();
        for json in &snap.policies_json {
            resources.extend(Resource::parse_json(json).map_err(|e| e.to_string())?);
        }
        let rules = RuleSet::compile(&resources, identity, snap.default_allow_authenticated);
        let mut limits = Vec::new();
        for r in &resources {
            let Resource::RateLimitPolicy { spec, .. } = r else { continue };
            if !r.targets(identity) {
                continue;
            }
            for l in &spec.limits {
                limits.push(compile_limit(&r.key(), l, &snap.rate_shares)?);
            }
        }
        let origin = previous.map(|p| p.origin).unwrap_or_else(Instant::now);
        if let Some(prev) = previous {
            for l in &mut limits {
                if let Some(old) = prev.limits.iter().find(|o| o.same_as(l)) {
                    let states = std::mem::replace(
                        &mut *old.states.lock().unwrap_or_else(|p| p.into_inner()),
                        lru::LruCache::new(MAX_KEYS),
                    );
                    *l.states.get_mut().unwrap_or_else(|p| p.into_inner()) = states;
                }
            }
        }
        Ok(Self { version: snap.version.clone(), rules, limits, origin })
    }

    /// The compiled rate limits, for `/config`.
    pub fn describe_limits(&self) -> Vec<serde_json::Value> {
        self.limits
            .iter()
            .map(|l| {
                serde_json::json!({
                    "policy": l.policy, "name": l.name, "algorithm": l.algorithm, "rate": l.quota.rate,
                    "period": humantime::format_duration(l.quota.period).to_string(), "burst": l.quota.burst,
                    "keys": l.states.lock().map(|s| s.len()).unwrap_or(0),
                })
            })
            .collect()
    }

    /// The authorization decision.
    pub fn authorize(&self, req: &Request<'_>) -> Decision {
        self.rules.decide(req)
    }

    /// Applies the rate limits in order; the first that refuses wins.
    pub fn rate_limit(&self, req: &Request<'_>, src_ip: IpAddr) -> Option<Limited> {
        if self.limits.is_empty() {
            return None;
        }
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for l in &self.limits {
            let method_ok = palisade_policy::eval::method_matches(&l.methods, req.method);
            let path_ok = l.paths.is_empty() || req.path.is_some_and(|p| l.paths.iter().any(|g| g.matches(p)));
            if !(method_ok && path_ok) {
                continue;
            }
            let key = match &l.key {
                Key::Identity => req.source.unwrap_or("unauthenticated").to_string(),
                Key::Header(h) => {
                    req.headers.iter().find(|(n, _)| n == h).map(|(_, v)| v.to_string()).unwrap_or_default()
                }
                Key::SourceIp => src_ip.to_string(),
                Key::None => String::new(),
            };
            let mut states = l.states.lock().unwrap_or_else(|p| p.into_inner());
            let state = states.get_or_insert_mut(key, || l.algorithm.initial(&l.quota, now));
            let outcome = l.algorithm.check(&l.quota, state, now);
            if !outcome.allowed {
                return Some(Limited { policy: l.policy.clone(), limit: l.name.clone(), quota: l.quota, outcome });
            }
        }
        None
    }
}

fn compile_limit(policy: &str, l: &Limit, shares: &HashMap<String, u64>) -> Result<CompiledLimit, String> {
    let period =
        palisade_policy::resource::parse_period(&l.period).map_err(|e| format!("{policy}/{}: period {e}", l.name))?;
    let rate = match l.scope {
        // This replica's share of the cluster quota, as the control plane divided it.
        Scope::Cluster => *shares.get(&format!("{policy}/{}", l.name)).unwrap_or(&l.rate),
        Scope::Sidecar => l.rate,
    };
    let key = match l.key.as_str() {
        "identity" => Key::Identity,
        "source_ip" => Key::SourceIp,
        "none" => Key::None,
        other => match other.strip_prefix("header:") {
            Some(h) => Key::Header(h.to_ascii_lowercase()),
            None => return Err(format!("{policy}/{}: unknown key {other:?}", l.name)),
        },
    };
    Ok(CompiledLimit {
        policy: policy.to_string(),
        name: l.name.clone(),
        methods: l.match_.methods.clone(),
        paths: l.match_.paths.iter().map(|p| WildMatch::new(p)).collect(),
        key,
        algorithm: l.algorithm,
        quota: Quota { rate: rate.max(1), period, burst: l.burst },
        states: Mutex::new(lru::LruCache::new(MAX_KEYS)),
    })
}

/// `d` give or take a quarter, so sidecars that lost the control plane
/// together do not come back in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    let spread = d / 2;
    d - d / 4 + spread.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

/// The enforcer in force, swapped atomically.
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    current: Arc<RwLock<Option<Arc<Enforcer>>>>,
}

impl PolicyState {
    pub fn current(&self) -> Option<Arc<Enforcer>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, e: Enforcer) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(e));
    }
}

/// Keeps the policy stream open.
#[derive(Debug)]
pub struct PolicyClient {
    pub addr: ControlPlaneAddr,
    pub bundle: TrustBundle,
    pub svids: SvidStore,
    pub trust_domain: palisade_certs::TrustDomain,
    pub inbound_addr: String,
    pub state: PolicyState,
    pub directory: Arc<Directory>,
    pub metrics: Arc<Metrics>,
}

impl PolicyClient {
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.svids.valid().is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let mut received = false;
            let result = self.session(&mut received).await;
            self.metrics.policy_stream_connected.set(0);
            // Start over quickly only after a stream that delivered: a stream
            // that opens and then fails on every snapshot backs off like a
            // refused connection.
            if received {
                backoff = Duration::from_millis(200);
            }
            let wait = jitter(backoff);
            match result {
                Ok(()) => tracing::info!(retry_in = ?wait, "policy stream closed by the control plane; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "policy stream failed; keeping the last good policy")
                }
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn session(&self, received: &mut bool) -> Result<(), String> {
        let verifier =
            SpiffeServerVerifier::new(self.bundle.clone(), PeerIdentity::Exact(self.trust_domain.control_plane()));
        let tls = palisade_certs::tls::client_config(verifier, Some(Arc::new(self.svids.clone())))
            .map_err(|e| e.to_string())?;
        let channel = palisade_proto::channel::connect(&self.addr, Arc::new(tls), Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(DiscoveryRequest { inbound_addr: self.inbound_addr.clone(), ..Default::default() })
            .await
            .map_err(|e| e.to_string())?;
        let mut client =
            PolicyDiscoveryClient::new(channel).max_decoding_message_size(palisade_proto::limits::MAX_SNAPSHOT_BYTES);
        let mut snapshots = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        self.metrics.policy_stream_connected.set(1);
        while let Some(snap) = snapshots.message().await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? {
            let identity = self.svids.get().map(|s| s.id.to_string()).unwrap_or_default();
            let previous = self.state.current();
            let reply = match Enforcer::compile(&snap, &identity, previous.as_deref()) {
                Ok(enforcer) => {
                    self.directory.replace(
                        snap.endpoints.iter().filter_map(|e| {
                            Some((e.service.clone(), e.identity.parse().ok()?, e.address.parse().ok()?))
                        }),
                    );
                    let roots: Vec<CertificateDer<'static>> =
                        snap.trust_bundle_der.iter().cloned().map(CertificateDer::from).collect();
                    if !roots.is_empty()
                        && let Err(e) = self.bundle.replace(&roots)
                    {
                        tracing::warn!(error = %e, "ignoring an unusable trust bundle from the control plane");
                    }
                    let changed = previous.as_ref().is_none_or(|p| p.version != enforcer.version);
                    self.state.set(enforcer);
                    self.metrics.policy_revision.set(snap.version.trim_start_matches('r').parse().unwrap_or(0));
                    self.metrics
                        .policy_updated
                        .set(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0));
                    if changed {
                        tracing::info!(version = %snap.version, policies = snap.policies_json.len(), "policy snapshot applied");
                    }
                    *received = true;
                    DiscoveryRequest { nonce: snap.nonce, version: snap.version, ..Default::default() }
                }
                Err(e) => {
                    self.metrics.policy_nacks.inc();
                    tracing::warn!(target: "audit", version = %snap.version, error = %e, "policy snapshot rejected (NACK); the previous policy stays in force");
                    DiscoveryRequest { nonce: snap.nonce, version: snap.version, error: e, ..Default::default() }
                }
            };
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enforcer(limit: &str) -> Enforcer {
        let json = format!(
            r#"{{"apiVersion":"palisade.dev/v1","kind":"RateLimitPolicy","metadata":{{"name":"l","namespace":"shop"}},
            "spec":{{"target":{{"identities":["*"]}},"limits":[{limit}]}}}}"#
        );
        let snap = Snapshot { version: "r1".into(), policies_json: vec![json], ..Default::default() };
        Enforcer::compile(&snap, "spiffe://cluster.local/ns/shop/sa/orders", None).unwrap()
    }

    fn req<'a>(method: &'a str, headers: Vec<(&'a str, &'a str)>) -> Request<'a> {
        Request { method: Some(method), path: Some("/x"), headers, ..Default::default() }
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_star_method_limit_applies_to_every_method() {
        let e = enforcer(
            r#"{"name":"all","match":{"methods":["*"]},"key":"none","algorithm":"fixed_window","rate":1,"period":"1h","burst":0}"#,
        );
        assert!(e.rate_limit(&req("GET", vec![]), IP).is_none());
        let limited = e.rate_limit(&req("post", vec![]), IP).expect("the second request of the hour is limited");
        assert_eq!(limited.limit, "all");
        let upper = enforcer(
            r#"{"name":"gets","match":{"methods":["GET"]},"key":"none","algorithm":"fixed_window","rate":1,"period":"1h","burst":0}"#,
        );
        assert!(upper.rate_limit(&req("GET", vec![]), IP).is_none());
        assert!(upper.rate_limit(&req("get", vec![]), IP).is_some(), "method case does not dodge a limit");
    }

    #[test]
    fn inventing_keys_evicts_idle_buckets_not_active_ones() {
        let e = enforcer(
            r#"{"name":"per-tenant","key":"header:x-tenant","algorithm":"fixed_window","rate":1,"period":"1h","burst":0}"#,
        );
        assert!(e.rate_limit(&req("GET", vec![("x-tenant", "victim")]), IP).is_none());
        let keys: Vec<String> = (0..MAX_KEYS.get() + 10).map(|i| format!("k{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            let _ = e.rate_limit(&req("GET", vec![("x-tenant", k)]), IP);
            if i % 1000 == 0 {
                // The victim keeps calling: its bucket stays, and so does its limit.
                assert!(e.rate_limit(&req("GET", vec![("x-tenant", "victim")]), IP).is_some(), "key {i}");
            }
        }
        assert_eq!(e.limits[0].states.lock().unwrap().len(), MAX_KEYS.get(), "memory stays bounded");
        assert!(e.rate_limit(&req("GET", vec![("x-tenant", "victim")]), IP).is_some());
    }
}
