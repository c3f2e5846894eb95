//! Resources built once per content and shared by every stream that needs
//! them: each identity's policy view, the directory (one resource per
//! service and per answered address) and the trust bundle. A resource's
//! version is a digest of its content, so replicas agree on it and a
//! sidecar reconnecting elsewhere is sent only what differs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use palisade_policy::Resource as Policy;
use palisade_policy::resource::Scope;
use palisade_proto::v1::resource::Body;
use palisade_proto::v1::{ApiKeySet, Endpoint, MeshSettings, Resource, ServiceEndpoints, TrustBundle};

use super::Hub;
use crate::Shared;

pub(crate) const POLICY: &str = "policy";
pub(crate) const SETTINGS: &str = "settings";
pub(crate) const API_KEYS: &str = "api_keys";
pub(crate) const JWKS: &str = "jwks";
pub(crate) const TRUST_BUNDLE: &str = "trust_bundle";
pub(crate) const SERVICE: &str = "service";
pub(crate) const ADDRESS: &str = "address";

/// A short digest of `parts`, the version of the content they make up.
pub(crate) fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    palisade_cmd::hex(&ctx.finish().as_ref()[..8])
}

fn resource(kind: &str, name: &str, version: String, body: Body) -> Arc<Resource> {
    Arc::new(Resource { r#type: kind.into(), name: name.into(), version, body: Some(body) })
}

/// The stored policies at one revision, parsed once.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) revision: u64,
    /// Each stored policy: its name (`<kind>/<key>`), its JSON, and what it
    /// parsed into (`None`: it does not parse, and goes where its target
    /// points so a NACK shows it).
    pub(crate) items: Vec<(String, String, Option<Vec<Policy>>)>,
}

/// What one identity's sidecars run their policy engine on.
#[derive(Debug)]
pub(crate) struct PolicyView {
    /// `r<revision>`, or `r<revision>-c<generation>` once credentials changed.
    pub(crate) version: String,
    pub(crate) revision: u64,
    pub(crate) generation: u64,
    replicas: u64,
    /// Policies, settings, API keys and key sets, by (type, name).
    pub(crate) resources: Vec<Arc<Resource>>,
}

impl PolicyView {
    /// Whether `other` carries the same resources (versions aside).
    pub(crate) fn same_content(&self, other: &PolicyView) -> bool {
        self.resources.len() == other.resources.len()
            && self.resources.iter().zip(&other.resources).all(|(a, b)| a.name == b.name && a.version == b.version)
    }
}

/// The directory as resources.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    pub(crate) services: HashMap<String, Arc<Resource>>,
    /// The service at each IP (the first one, when a host runs several).
    pub(crate) by_ip: HashMap<IpAddr, String>,
}

impl Directory {
    /// The endpoints of `service`; an empty resource when it has none.
    pub(crate) fn service(&self, service: &str) -> Arc<Resource> {
        self.services
            .get(service)
            .cloned()
            .unwrap_or_else(|| resource(SERVICE, service, "none".into(), Body::Service(ServiceEndpoints::default())))
    }

    /// The service at `ip`, "" when none.
    pub(crate) fn address(&self, ip: IpAddr) -> Arc<Resource> {
        let service = self.by_ip.get(&ip).cloned().unwrap_or_default();
        let version = if service.is_empty() { "none".into() } else { digest([service.as_bytes()]) };
        resource(ADDRESS, &ip.to_string(), version, Body::AddressService(service))
    }

    /// The directory from `grouped` endpoints (sorted by address within a
    /// service); a service whose endpoints did not change keeps its
    /// resource from `old`, digest and all.
    fn build(old: &Directory, grouped: BTreeMap<Arc<str>, Vec<Endpoint>>) -> Self {
        let mut by_ip = HashMap::new();
        let mut services = HashMap::with_capacity(grouped.len());
        for (name, endpoints) in grouped {
            for e in &endpoints {
                if let Ok(addr) = e.address.parse::<std::net::SocketAddr>() {
                    by_ip.entry(addr.ip()).or_insert_with(|| name.to_string());
                }
            }
            let same = old.services.get(&*name).filter(|r| match &r.body {
                Some(Body::Service(s)) => s.endpoints == endpoints,
                _ => false,
            });
            let r = match same {
                Some(r) => r.clone(),
                None => {
                    let version = digest(endpoints.iter().flat_map(|e| [e.identity.as_bytes(), e.address.as_bytes()]));
                    resource(SERVICE, &name, version, Body::Service(ServiceEndpoints { endpoints }))
                }
            };
            services.insert(name.to_string(), r);
        }
        Self { services, by_ip }
    }

    #[cfg(test)]
    fn of(endpoints: Vec<Endpoint>) -> Self {
        let mut grouped: BTreeMap<Arc<str>, Vec<Endpoint>> = BTreeMap::new();
        for e in endpoints {
            grouped.entry(e.service.as_str().into()).or_default().push(e);
        }
        Self::build(&Directory::default(), grouped)
    }

    /// The services and IPs whose resources differ between `self` and `new`.
    fn changes(&self, new: &Directory) -> (HashSet<String>, HashSet<IpAddr>) {
        let mut services: HashSet<String> = new
            .services
            .iter()
            .filter(|(k, v)| self.services.get(*k).is_none_or(|o| o.version != v.version))
            .map(|(k, _)| k.clone())
            .collect();
        services.extend(self.services.keys().filter(|k| !new.services.contains_key(*k)).cloned());
        let mut ips: HashSet<IpAddr> =
            new.by_ip.iter().filter(|(k, v)| self.by_ip.get(*k) != Some(v)).map(|(k, _)| *k).collect();
        ips.extend(self.by_ip.keys().filter(|k| !new.by_ip.contains_key(*k)));
        (services, ips)
    }
}

/// The shared views, rebuilt on change.
#[derive(Debug, Default)]
pub(crate) struct Views {
    parsed: Mutex<Option<Arc<Parsed>>>,
    policy: Mutex<HashMap<String, Arc<PolicyView>>>,
    directory: RwLock<Arc<Directory>>,
    /// Identity -> its service name (`None`: not a workload).
    service_names: Mutex<HashMap<String, Option<Arc<str>>>>,
    bundle: Mutex<Option<Arc<Resource>>>,
}

impl Views {
    /// The stored policies, parsed, at the store's current revision.
    pub(crate) fn parsed(&self, shared: &Shared) -> Arc<Parsed> {
        let mut cache = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        let current = shared.store.policy_revision();
        if let Some(p) = cache.as_ref().filter(|p| p.revision == current) {
            return p.clone();
        }
        let (revision, stored) = shared.store.policies();
        let items = stored
            .into_iter()
            .map(|p| {
                let parsed = Policy::parse_json(&p.json)
                    .map_err(|e| tracing::warn!(policy = %p.key, error = %e, "stored policy is invalid"))
                    .ok();
                (format!("{}/{}", p.kind, p.key), p.json, parsed)
            })
            .collect();
        let parsed = Arc::new(Parsed { revision, items });
        *cache = Some(parsed.clone());
        parsed
    }

    /// The policy view of `identity`, rebuilt when policies, credentials or
    /// its replica count changed since it was built.
    pub(crate) fn policy(&self, shared: &Shared, hub: &Hub, identity: &str) -> Arc<PolicyView> {
        let parsed = self.parsed(shared);
        let generation = hub.generation();
        let replicas = hub.replicas(identity);
        if let Some(v) = self.policy.lock().unwrap_or_else(|p| p.into_inner()).get(identity)
            && v.revision == parsed.revision
            && v.generation == generation
            && v.replicas == replicas
        {
            return v.clone();
        }
        let v = Arc::new(build_policy(shared, &parsed, identity, generation, replicas));
        self.policy.lock().unwrap_or_else(|p| p.into_inner()).insert(identity.to_string(), v.clone());
        v
    }

    /// Forgets the views of identities no stream serves any more.
    pub(crate) fn retain_identities(&self, live: impl Fn(&str) -> bool) {
        self.policy.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| live(k));
    }

    /// The directory as last built.
    pub(crate) fn directory(&self) -> Arc<Directory> {
        self.directory.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds the directory from the store (the proxies with a valid
    /// certificate and an inbound address); returns what changed.
    pub(crate) fn rebuild_directory(&self, shared: &Shared) -> (HashSet<String>, HashSet<IpAddr>) {
        let now = palisade_cmd::unix_now();
        let mut grouped: BTreeMap<Arc<str>, Vec<Endpoint>> = BTreeMap::new();
        {
            // An identity's service name, parsed once.
            let mut names = self.service_names.lock().unwrap_or_else(|p| p.into_inner());
            shared.store.visit_proxies(&mut |p| {
                if p.cert_not_after <= now || p.inbound_addr.is_empty() {
                    return;
                }
                let name = match names.get(&p.identity) {
                    Some(n) => n.clone(),
                    None => {
                        let n = p.identity.parse::<palisade_certs::SpiffeId>().ok().and_then(|id| {
                            id.workload().map(|(ns, sa)| Arc::<str>::from(format!("{sa}.{ns}").as_str()))
                        });
                        if names.len() >= 1 << 20 {
                            names.clear();
                        }
                        names.insert(p.identity.clone(), n.clone());
                        n
                    }
                };
                if let Some(name) = name {
                    let e = Endpoint {
                        service: name.to_string(),
                        identity: p.identity.clone(),
                        address: p.inbound_addr.clone(),
                    };
                    grouped.entry(name).or_default().push(e);
                }
            });
        }
        for list in grouped.values_mut() {
            list.sort_by(|a, b| a.address.cmp(&b.address));
            list.dedup_by(|a, b| a.address == b.address);
        }
        let mut cur = self.directory.write().unwrap_or_else(|p| p.into_inner());
        let new = Directory::build(&cur, grouped);
        let changes = cur.changes(&new);
        if !changes.0.is_empty() || !changes.1.is_empty() {
            *cur = Arc::new(new);
        }
        changes
    }

    /// The trust bundle in force, and the rotation's renew hint.
    pub(crate) fn bundle(&self, shared: &Shared) -> Arc<Resource> {
        let mut cache = self.bundle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = cache.as_ref() {
            return b.clone();
        }
        let ca = shared.ca.view();
        let roots_der = ca.bundle_der();
        let renew: Vec<Vec<u8>> = ca.renew_unless.iter().map(|c| c.to_vec()).collect();
        let version =
            digest(roots_der.iter().map(Vec::as_slice).chain([&b"|"[..]]).chain(renew.iter().map(Vec::as_slice)));
        let body = Body::TrustBundle(TrustBundle { roots_der, renew_unless_chains_to: renew });
        let b = resource(TRUST_BUNDLE, "roots", version, body);
        *cache = Some(b.clone());
        b
    }

    /// The CA may have changed: the bundle is built again when next asked.
    pub(crate) fn forget_bundle(&self) {
        *self.bundle.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The key sets an AuthenticationPolicy's issuers need, as its sidecars get
/// them: fetched ones by `jwksUri`, the mesh issuer's own by its `iss`.
pub(crate) fn key_sets_into(
    shared: &Shared,
    spec: &palisade_policy::resource::AuthenticationSpec,
    out: &mut BTreeMap<String, String>,
) {
    for j in &spec.jwt {
        if let Some(uri) = &j.jwks_uri {
            if let Some(set) = shared.jwks.get(uri) {
                out.insert(uri.clone(), set);
            }
        } else if j.jwks.is_none()
            && let Some(o) = shared.oauth.as_ref().filter(|o| o.issuer() == j.issuer)
        {
            out.insert(j.issuer.clone(), o.jwks_json());
        }
    }
}

/// What targets `identity`: its policies, the settings with its rate
/// shares, the API keys and key sets its policies need.
fn build_policy(shared: &Shared, parsed: &Parsed, identity: &str, generation: u64, replicas: u64) -> PolicyView {
    let mut resources = Vec::new();
    let mut rate_shares = BTreeMap::new();
    let mut jwks = BTreeMap::new();
    let mut wants_api_keys = false;
    for (name, json, policies) in &parsed.items {
        let Some(policies) = policies else {
            // A stored resource this version cannot read (written by a newer
            // control plane, or by hand): send it where its target points, so the
            // sidecar's NACK makes the problem visible, rather than drop it silently.
            let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            let targeted = v["spec"]["target"]["identities"].as_array().is_some_and(|ids| {
                ids.iter().filter_map(|i| i.as_str()).any(|g| wildmatch::WildMatch::new(g).matches(identity))
            });
            if targeted {
                resources.push(resource(POLICY, name, digest([json.as_bytes()]), Body::PolicyJson(json.clone())));
            }
            continue;
        };
        let mut targeted = false;
        for r in policies.iter().filter(|r| r.targets(identity)) {
            targeted = true;
            if let Policy::AuthenticationPolicy { spec, .. } = r {
                wants_api_keys |= spec.api_keys.is_some();
                key_sets_into(shared, spec, &mut jwks);
            }
            if let Policy::RateLimitPolicy { spec, .. } = r {
                for l in spec.limits.iter().filter(|l| l.scope == Scope::Cluster) {
                    // The quota divided among the ready replicas, rounded up.
                    rate_shares.insert(format!("{}/{}", r.key(), l.name), l.rate.div_ceil(replicas));
                }
            }
        }
        if targeted {
            resources.push(resource(POLICY, name, digest([json.as_bytes()]), Body::PolicyJson(json.clone())));
        }
    }
    let default_allow = shared.default_allow_authenticated;
    let shares: Vec<String> = rate_shares.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let version = digest([&[u8::from(default_allow)][..]].into_iter().chain(shares.iter().map(|s| s.as_bytes())));
    let settings =
        MeshSettings { default_allow_authenticated: default_allow, rate_shares: rate_shares.into_iter().collect() };
    resources.push(resource(SETTINGS, "mesh", version, Body::Settings(settings)));
    if wants_api_keys {
        let keys = crate::credentials::api_keys_for(shared, identity);
        let flat: Vec<String> =
            keys.iter().map(|k| format!("{}|{}|{}|{}", k.name, k.principal, k.sha256, k.expires_at)).collect();
        let version = digest(flat.iter().map(|s| s.as_bytes()));
        resources.push(resource(API_KEYS, API_KEYS, version, Body::ApiKeys(ApiKeySet { keys })));
    }
    for (name, set) in jwks {
        resources.push(resource(JWKS, &name, digest([set.as_bytes()]), Body::JwksJson(set)));
    }
    let version =
        if generation == 0 { format!("r{}", parsed.revision) } else { format!("r{}-c{generation}", parsed.revision) };
    PolicyView { version, revision: parsed.revision, generation, replicas, resources }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(service: &str, addr: &str) -> Endpoint {
        Endpoint { service: service.into(), identity: format!("spiffe://td/ns/x/sa/{service}"), address: addr.into() }
    }

    #[test]
    fn directory_changes_are_per_service_and_per_address() {
        let a = Directory::of(vec![ep("a.x", "10.0.0.1:1"), ep("a.x", "10.0.0.2:1"), ep("b.x", "10.0.0.3:1")]);
        let b = Directory::of(vec![ep("a.x", "10.0.0.1:1"), ep("a.x", "10.0.0.2:1"), ep("c.x", "10.0.0.4:1")]);
        let (services, ips) = a.changes(&b);
        assert_eq!(services, HashSet::from(["b.x".to_string(), "c.x".to_string()]));
        assert_eq!(ips.len(), 2, "{ips:?}");
        assert!(a.changes(&a).0.is_empty());
        assert_eq!(a.service("a.x").version, b.service("a.x").version, "same content, same version");
        assert_eq!(a.service("zz.x").version, "none");
        assert_eq!(b.address("10.0.0.4".parse().unwrap()).body, Some(Body::AddressService("c.x".into())));
        assert_eq!(b.address("10.9.9.9".parse().unwrap()).body, Some(Body::AddressService(String::new())));
    }

    #[test]
    fn digests_separate_their_parts() {
        assert_ne!(digest([&b"ab"[..], b"c"]), digest([&b"a"[..], b"bc"]));
        assert_eq!(digest([&b"x"[..]]).len(), 16);
    }
}
