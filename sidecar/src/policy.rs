//! Policy in the sidecar: the last good policies from the control plane
//! (delivered by [`crate::control`]), compiled for this workload by the
//! policy engine (`palisade_policy::Enforcer`: all policy meaning lives
//! there), and swapped atomically for the data path.
//!
//! Until a first update arrives there is no enforcer and inbound traffic is
//! refused (fail closed); once one has arrived, it stays in force while the
//! control plane is away.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use palisade_policy::{ApiKey, Decision, Enforcer, Inputs, PolicyError, Resource};
use prometheus_client::metrics::counter::Counter;

use crate::metrics::{DecisionLabels, Metrics};

/// What the policy in force is compiled from: every resource of the policy
/// types the sidecar holds ([`crate::control::apply`] gathers them).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The control plane's policy revision (`r<revision>`, or
    /// `r<revision>-c<generation>`), shown in `/config`.
    pub version: String,
    /// The policies that target this workload, canonical JSON each, in a
    /// stable order (by name), so the same set always compiles the same.
    pub policies_json: Vec<String>,
    /// Mesh default when no ALLOW policy targets the workload.
    pub default_allow_authenticated: bool,
    /// `namespace/name/limit` -> this replica's share of a cluster-scope quota.
    pub rate_shares: HashMap<String, u64>,
    /// JWT key sets, by jwksUri (or by issuer for the mesh's own).
    pub jwks: HashMap<String, String>,
    /// Hashes of the API keys this sidecar may accept.
    pub api_keys: Vec<ApiKey>,
}

/// Why the policies the control plane sent cannot be put in force (the
/// config stream NACKs them with this text; the previous policy stays).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// One of the policies does not parse.
    #[error(transparent)]
    Parse(PolicyError),
    /// They parse, but do not compile together for this workload.
    #[error(transparent)]
    Compile(PolicyError),
}

/// The policy in force: the engine's [`Enforcer`] for this workload, and the
/// decision counters it feeds, resolved once when it was compiled (deciding
/// a request then costs no label string and no metric lookup).
#[derive(Debug)]
pub struct InForce {
    pub enforcer: Enforcer,
    /// Per policy (indexed by a decision's `policy_id`), then for decisions
    /// no policy made: counters for allow, deny, audit_allow, audit_deny.
    by_policy: Vec<[Counter; 4]>,
    default: [Counter; 4],
    /// The services this workload's routes send requests to.
    route_backends: Vec<String>,
}

impl InForce {
    /// Compiles `sources` for `identity`, keeping the counters of limits
    /// that did not change from `previous`.
    pub fn compile(
        sources: &Sources,
        identity: &str,
        previous: Option<&InForce>,
        metrics: &Metrics,
    ) -> Result<Self, CompileError> {
        let mut resources = Vec::new();
        for json in &sources.policies_json {
            resources.extend(Resource::parse_json(json).map_err(CompileError::Parse)?);
        }
        let inputs = Inputs {
            version: &sources.version,
            resources: &resources,
            default_allow_authenticated: sources.default_allow_authenticated,
            rate_shares: &sources.rate_shares,
            jwks: &sources.jwks,
            api_keys: &sources.api_keys,
        };
        let enforcer =
            Enforcer::compile(inputs, identity, previous.map(|p| &p.enforcer)).map_err(CompileError::Compile)?;
        let counters = |policy: &str| {
            ["allow", "deny", "audit_allow", "audit_deny"].map(|action| {
                metrics.decisions.get_or_create(&DecisionLabels { action, policy: policy.to_string() }).clone()
            })
        };
        let by_policy = enforcer.policies().iter().map(|p| counters(p)).collect();
        let route_backends = route_backends(&resources, identity);
        Ok(Self { enforcer, by_policy, default: counters("default"), route_backends })
    }

    /// The services the routes of this workload send requests to, so the
    /// directory can hold their endpoints before the first routed request.
    pub fn route_backends(&self) -> &[String] {
        &self.route_backends
    }

    /// Counts a decision.
    pub fn count(&self, d: &Decision) {
        let slot = match d.label() {
            "allow" => 0,
            "deny" => 1,
            "audit_allow" => 2,
            _ => 3,
        };
        let set = d.policy_id.and_then(|i| self.by_policy.get(i)).unwrap_or(&self.default);
        set[slot].inc();
    }
}

/// The backend services of the routes of the TrafficPolicies that target
/// `identity`: the ones the enforcer compiles (`Routes` does not list its
/// backends, so they are read from the same resources, with the same filter).
fn route_backends(resources: &[Resource], identity: &str) -> Vec<String> {
    let mut out = BTreeSet::new();
    for r in resources {
        if let Resource::TrafficPolicy { spec, .. } = r
            && r.targets(identity)
        {
            out.extend(spec.routes.iter().flat_map(|route| route.backends.iter().map(|b| b.service.clone())));
        }
    }
    out.into_iter().collect()
}

/// The policy in force, swapped atomically.
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    current: Arc<RwLock<Option<Arc<InForce>>>>,
    refresh: Arc<KeySetRefresh>,
}

/// Key sets (by jwksUri) in which a token's `kid` was missing, for the
/// control plane to fetch again; asked at most once per URI per interval.
#[derive(Debug, Default)]
pub struct KeySetRefresh {
    pending: std::sync::Mutex<std::collections::HashMap<String, (bool, std::time::Instant)>>,
    pub notify: tokio::sync::Notify,
}

/// Least time between two refresh requests for one key set.
const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl KeySetRefresh {
    /// The URIs to ask about now.
    pub fn take(&self) -> Vec<String> {
        let mut all = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        all.iter_mut()
            .filter(|(_, (due, _))| *due)
            .map(|(k, (due, _))| {
                *due = false;
                k.clone()
            })
            .collect()
    }
}

impl PolicyState {
    /// Asks the control plane to fetch `uri` again (rate limited).
    pub fn request_refresh(&self, uri: &str) {
        let mut all = self.refresh.pending.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() > 64 && !all.contains_key(uri) {
            return;
        }
        let now = std::time::Instant::now();
        let e = all.entry(uri.to_string()).or_insert((false, now - REFRESH_INTERVAL));
        if now - e.1 >= REFRESH_INTERVAL {
            *e = (true, now);
            drop(all);
            self.refresh.notify.notify_one();
        }
    }

    /// The refresh requests, for the config stream.
    pub fn refresh(&self) -> &KeySetRefresh {
        &self.refresh
    }

    pub fn current(&self) -> Option<Arc<InForce>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(crate) fn set(&self, e: InForce) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn routes(name: &str, target: &str, backend: &str) -> String {
        format!(
            r#"{{"apiVersion":"palisade.dev/v1","kind":"TrafficPolicy","metadata":{{"name":"{name}","namespace":"shop"}},"spec":{{"target":{{"identities":["{target}"]}},"routes":[{{"match":{{"service":"orders.shop"}},"backends":[{{"service":"{backend}"}}]}}]}}}}"#
        )
    }

    fn sources(policies: Vec<String>) -> Sources {
        Sources { version: "r7".into(), policies_json: policies, ..Default::default() }
    }

    #[test]
    fn a_policy_that_does_not_parse_is_a_parse_error() {
        let e = InForce::compile(&sources(vec!["{not json".into()]), WEB, None, &Metrics::default()).unwrap_err();
        assert!(matches!(e, CompileError::Parse(_)), "{e:?}");
        assert!(!e.to_string().is_empty());
    }

    #[test]
    fn only_the_routes_that_target_this_workload_are_subscribed() {
        let mine = routes("mine", WEB, "orders-v2.shop");
        let theirs = routes("theirs", "spiffe://cluster.local/ns/shop/sa/db", "orders-v3.shop");
        let in_force = InForce::compile(&sources(vec![mine, theirs]), WEB, None, &Metrics::default()).unwrap();
        assert_eq!(in_force.enforcer.version, "r7");
        assert_eq!(in_force.route_backends(), ["orders-v2.shop"]);
    }

    #[test]
    fn the_policy_state_swaps_what_is_in_force() {
        let state = PolicyState::default();
        assert!(state.current().is_none(), "nothing in force before the first update (fail closed)");
        state.set(InForce::compile(&sources(vec![]), WEB, None, &Metrics::default()).unwrap());
        assert_eq!(state.current().map(|p| p.enforcer.version.clone()).as_deref(), Some("r7"));
    }

    #[test]
    fn a_key_set_refresh_is_asked_once_per_interval() {
        let state = PolicyState::default();
        state.request_refresh("https://idp.example/jwks");
        state.request_refresh("https://idp.example/jwks");
        assert_eq!(state.refresh().take(), ["https://idp.example/jwks"]);
        assert!(state.refresh().take().is_empty(), "taken once");
        state.request_refresh("https://idp.example/jwks");
        assert!(state.refresh().take().is_empty(), "not again within {REFRESH_INTERVAL:?}");
    }
}
