//! The [`Enforcer`]: every policy that applies to one workload, compiled for
//! it (authorization rules and rate limiters), and the one place a decision
//! about a request is made. The sidecar runs it on every request; the
//! control plane and `palisadectl authz check` run the same code to explain
//! what a sidecar would do, so the two can never disagree.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::eval::Pattern;

use crate::authn::{Authenticator, Outcome as AuthnOutcome};
use crate::eval::method_matches;
use crate::ratelimit::{Algorithm, Outcome, Quota, State};
use crate::resource::AuthenticationSpec;
use crate::resource::{Limit, LimitKey, Scope, parse_period};
use crate::{Decision, PolicyError, Request, Resource, RuleSet, Verdict};

/// Most keys one limit tracks; beyond, the least recently used key's bucket
/// is forgotten (bounded memory, and a caller inventing keys cannot reset
/// everyone else's buckets).
pub const MAX_KEYS: NonZeroUsize = NonZeroUsize::new(100_000).expect("invariant: non-zero");

/// What an enforcer is compiled from: the policies a workload's sidecar
/// received, and the control plane's division of cluster-scope quotas.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The snapshot's version (shown in `/config`).
    pub version: &'a str,
    /// The policies (those that do not target the workload are skipped).
    pub resources: &'a [Resource],
    /// Mesh default when no ALLOW policy targets the workload.
    pub default_allow_authenticated: bool,
    /// `namespace/name/limit` -> this replica's share of a cluster-scope quota.
    pub rate_shares: &'a HashMap<String, u64>,
    /// JWT key sets the control plane holds for issuers named by `jwksUri`
    /// (keyed by the URI) or without keys (the mesh's own issuer, keyed by `iss`).
    pub jwks: &'a HashMap<String, String>,
    /// The API keys this workload may accept (hashes only).
    pub api_keys: &'a [crate::ApiKey],
}

static NO_SHARES: std::sync::LazyLock<HashMap<String, u64>> = std::sync::LazyLock::new(HashMap::new);
static NO_JWKS: std::sync::LazyLock<HashMap<String, String>> = std::sync::LazyLock::new(HashMap::new);

impl Inputs<'static> {
    /// Nothing: no policies, deny by default, no shares, keys or key sets
    /// (fill in what you have with `..Inputs::none()`).
    pub fn none() -> Self {
        Self {
            version: "",
            resources: &[],
            default_allow_authenticated: false,
            rate_shares: &NO_SHARES,
            jwks: &NO_JWKS,
            api_keys: &[],
        }
    }
}

#[derive(Debug)]
struct CompiledLimit {
    policy: Arc<str>,
    name: Arc<str>,
    methods: Vec<String>,
    paths: Vec<Pattern>,
    key: LimitKey,
    algorithm: Algorithm,
    quota: Quota,
    scope: Scope,
    states: Mutex<lru::LruCache<String, State>>,
}

impl CompiledLimit {
    /// The same limit (its counters carry over a recompile).
    fn same_as(&self, other: &CompiledLimit) -> bool {
        self.policy == other.policy
            && self.name == other.name
            && self.algorithm == other.algorithm
            && self.quota == other.quota
            && self.key == other.key
    }

    fn applies(&self, req: &Request<'_>) -> bool {
        method_matches(&self.methods, req.method)
            && (self.paths.is_empty() || req.path.is_some_and(|p| self.paths.iter().any(|g| g.matches(p))))
    }

    fn key_of(&self, req: &Request<'_>, src_ip: IpAddr) -> String {
        match &self.key {
            LimitKey::Identity => req.source.unwrap_or("unauthenticated").to_string(),
            LimitKey::Header(h) => req.headers.first(h).unwrap_or_default().to_string(),
            LimitKey::SourceIp => src_ip.to_string(),
            LimitKey::Principal => req.auth.and_then(|a| a.principal.as_deref()).unwrap_or("anonymous").to_string(),
            LimitKey::ApiKey => req.auth.and_then(|a| a.api_key.as_deref()).unwrap_or("none").to_string(),
            LimitKey::None | LimitKey::Unrecognised(_) => String::new(),
        }
    }
}

/// A request a rate limit refused: which limit, and what to tell the caller.
#[derive(Debug, Clone)]
pub struct Limited {
    /// `namespace/name` of the policy.
    pub policy: Arc<str>,
    /// The limit's name.
    pub limit: Arc<str>,
    /// Its numbers (this replica's share for cluster scope).
    pub quota: Quota,
    /// The check's outcome (retry after, remaining, reset).
    pub outcome: Outcome,
}

/// A rate limit that applies to a request, for explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitInfo {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// The limit's name.
    pub name: String,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Requests per period (this replica's share for cluster scope).
    pub rate: u64,
    /// The period.
    pub period: Duration,
    /// Burst allowance.
    pub burst: u64,
    /// What requests are counted by.
    pub key: LimitKey,
    /// Where the quota lives.
    pub scope: Scope,
}

impl std::fmt::Display for LimitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithm = serde_json::to_value(self.algorithm).ok();
        let scope = serde_json::to_value(self.scope).ok();
        write!(
            f,
            "{}/{}: {}/{} {} key={} burst={} scope={}",
            self.policy,
            self.name,
            self.rate,
            humantime::format_duration(self.period),
            algorithm.as_ref().and_then(|v| v.as_str()).unwrap_or_default(),
            self.key,
            self.burst,
            scope.as_ref().and_then(|v| v.as_str()).unwrap_or_default(),
        )
    }
}

/// Every policy that applies to one workload, compiled: authorization, then
/// rate limits (then, as they come, the next kinds).
#[derive(Debug)]
pub struct Enforcer {
    /// The snapshot version it came from.
    pub version: String,
    authn: Option<Authenticator>,
    /// `namespace/name` of the AuthenticationPolicies that require a credential.
    authn_required_by: Vec<Arc<str>>,
    rewrites: crate::traffic::Rewrites,
    checks: crate::traffic::Checks,
    cors: Option<crate::traffic::CorsPolicy>,
    routes: crate::route::Routes,
    balancing: crate::resilience::Balancing,
    /// `namespace/name` of the TrafficPolicy `balancing` comes from.
    balancing_from: Option<Arc<str>>,
    rules: RuleSet,
    limits: Vec<CompiledLimit>,
    recorded: crate::preview::sample::Recorded,
    origin: Instant,
}

impl Enforcer {
    /// Compiles `inputs` for the workload `identity`, keeping the counters
    /// of limits that did not change from `previous`.
    pub fn compile(inputs: Inputs<'_>, identity: &str, previous: Option<&Enforcer>) -> Result<Self, PolicyError> {
        let rules = RuleSet::compile(inputs.resources, identity, inputs.default_allow_authenticated);
        let authn_specs: Vec<&AuthenticationSpec> = inputs
            .resources
            .iter()
            .filter(|r| r.targets(identity))
            .filter_map(|r| match r {
                Resource::AuthenticationPolicy { spec, .. } => Some(spec),
                _ => None,
            })
            .collect();
        let authn = Authenticator::compile(&authn_specs, inputs.jwks, inputs.api_keys);
        let authn_required_by = inputs
            .resources
            .iter()
            .filter(|r| r.targets(identity))
            .filter(|r| {
                matches!(r, Resource::AuthenticationPolicy { spec, .. } if spec.mode == crate::resource::AuthnMode::Required)
            })
            .map(|r| Arc::from(r.key()))
            .collect();
        let recorded = crate::preview::sample::Recorded::compile(
            inputs.resources,
            identity,
            authn.iter().flat_map(|a| a.credential_headers().chain(a.claim_headers().iter().map(String::as_str))),
        );
        let mut traffic: Vec<&Resource> = inputs
            .resources
            .iter()
            .filter(|r| matches!(r, Resource::TrafficPolicy { .. }) && r.targets(identity))
            .collect();
        traffic.sort_by_key(|r| r.key());
        let traffic_specs: Vec<&crate::traffic::TrafficSpec> = traffic
            .iter()
            .filter_map(|r| match r {
                Resource::TrafficPolicy { spec, .. } => Some(&**spec),
                _ => None,
            })
            .collect();
        let rewrites = crate::traffic::Rewrites::compile(&traffic_specs);
        let keyed: Vec<(String, &crate::traffic::TrafficSpec)> =
            traffic.iter().map(|r| r.key()).zip(traffic_specs.iter().copied()).collect();
        let checks = crate::traffic::Checks::compile(&keyed);
        let cors = crate::traffic::compile_cors(&keyed);
        let routes: Vec<(String, &[crate::route::Route])> =
            keyed.iter().map(|(k, s)| (k.clone(), s.routes.as_slice())).collect();
        let routes = crate::route::Routes::compile(&routes);
        // The first TrafficPolicy (in `namespace/name` order, as routes) that says how to balance.
        let first = keyed.iter().find_map(|(k, s)| Some((k, s.balancing.as_ref()?)));
        let balancing = first.map(|(_, b)| crate::resilience::Balancing::compile(b)).unwrap_or_default();
        let balancing_from = first.map(|(k, _)| Arc::from(k.as_str()));
        let mut limits = Vec::new();
        for r in inputs.resources {
            let Resource::RateLimitPolicy { spec, .. } = r else { continue };
            if !r.targets(identity) {
                continue;
            }
            let policy: Arc<str> = r.key().into();
            for l in &spec.limits {
                limits.push(compile_limit(&policy, l, inputs.rate_shares)?);
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
        Ok(Self {
            version: inputs.version.to_string(),
            authn,
            authn_required_by,
            rewrites,
            checks,
            cors,
            routes,
            balancing,
            balancing_from,
            rules,
            limits,
            recorded,
            origin,
        })
    }

    /// Authenticates a request's credential (`now`: unix seconds). Without
    /// an `AuthenticationPolicy` every request is anonymous.
    pub fn authenticate(&self, headers: &dyn crate::Headers, now: u64) -> AuthnOutcome {
        match &self.authn {
            Some(a) => a.authenticate(headers, now),
            None => AuthnOutcome::Anonymous,
        }
    }

    /// The header changes TrafficPolicies ask for (policy order).
    pub fn rewrites(&self) -> &crate::traffic::Rewrites {
        &self.rewrites
    }

    /// The CORS policy in force, if a TrafficPolicy has one.
    pub fn cors(&self) -> Option<&crate::traffic::CorsPolicy> {
        self.cors.as_ref()
    }

    /// The routes of this workload's outgoing requests (`routes`).
    pub fn routes(&self) -> &crate::route::Routes {
        &self.routes
    }

    /// How this workload balances its calls and ejects endpoints (the first
    /// TrafficPolicy targeting it with `balancing`, else the defaults).
    pub fn balancing(&self) -> &crate::resilience::Balancing {
        &self.balancing
    }

    /// `namespace/name` of the TrafficPolicy [`balancing`](Self::balancing)
    /// comes from (`None`: the defaults).
    pub fn balancing_policy(&self) -> Option<&str> {
        self.balancing_from.as_deref()
    }

    /// The request checks TrafficPolicies ask for (`validation`).
    pub fn checks(&self) -> &crate::traffic::Checks {
        &self.checks
    }

    /// What the sidecar records of a request for policy previews: the
    /// header and claim names the authorization policies' conditions use.
    pub fn recorded(&self) -> &crate::preview::sample::Recorded {
        &self.recorded
    }

    /// `namespace/name` of the AuthenticationPolicies that require a credential.
    pub fn authn_required_by(&self) -> &[Arc<str>] {
        &self.authn_required_by
    }

    /// The request authentication in force, if a policy asks for one.
    pub fn authenticator(&self) -> Option<&Authenticator> {
        self.authn.as_ref()
    }

    /// The authorization decision.
    ///
    /// Where a TrafficPolicy keeps encoded slashes (`encodedSlashes: keep`),
    /// a path holding one must be allowed under both readings: as one
    /// segment (`/admin%2Fx`) and as the app may decode it (`/admin/x`), so
    /// keeping them never walks around a rule.
    pub fn authorize(&self, req: &Request<'_>) -> Decision {
        let d = self.rules.decide(req);
        if d.verdict == Verdict::Deny || self.checks.path_options().encoded_slashes != crate::path::Encoded::Keep {
            return d;
        }
        let Some(path) = req.path.filter(|p| p.contains('%')) else { return d };
        let decoded = path.replace("%2F", "/").replace("%5C", "/");
        if decoded == path {
            return d;
        }
        let alt = crate::path::normalize(&decoded).map(|p| p.into_owned()).unwrap_or(decoded);
        let other = self.rules.decide(&Request { path: Some(&alt), ..*req });
        if other.verdict == Verdict::Deny { other } else { d }
    }

    /// `namespace/name` of every authorization policy in force; a decision's
    /// `policy_id` indexes this.
    pub fn policies(&self) -> &[Arc<str>] {
        self.rules.policies()
    }

    /// Applies the rate limits in order; the first that refuses wins.
    pub fn rate_limit(&self, req: &Request<'_>, src_ip: IpAddr) -> Option<Limited> {
        if self.limits.is_empty() {
            return None;
        }
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for l in self.limits.iter().filter(|l| l.applies(req)) {
            let key = l.key_of(req, src_ip);
            let mut states = l.states.lock().unwrap_or_else(|p| p.into_inner());
            let state = states.get_or_insert_mut(key, || l.algorithm.initial(&l.quota, now));
            let outcome = l.algorithm.check(&l.quota, state, now);
            if !outcome.allowed {
                return Some(Limited { policy: l.policy.clone(), limit: l.name.clone(), quota: l.quota, outcome });
            }
        }
        None
    }

    /// The rate limits that apply to `req`, without counting it.
    pub fn limits_for(&self, req: &Request<'_>) -> Vec<LimitInfo> {
        self.limits.iter().filter(|l| l.applies(req)).map(info).collect()
    }

    /// The compiled rate limits with how many keys each tracks (`/config`).
    pub fn describe_limits(&self) -> Vec<serde_json::Value> {
        self.limits
            .iter()
            .map(|l| {
                serde_json::json!({
                    "policy": &*l.policy, "name": &*l.name, "algorithm": l.algorithm, "rate": l.quota.rate,
                    "period": humantime::format_duration(l.quota.period).to_string(), "burst": l.quota.burst,
                    "keys": l.states.lock().map(|s| s.len()).unwrap_or(0),
                })
            })
            .collect()
    }
}

fn info(l: &CompiledLimit) -> LimitInfo {
    LimitInfo {
        policy: l.policy.to_string(),
        name: l.name.to_string(),
        algorithm: l.algorithm,
        rate: l.quota.rate,
        period: l.quota.period,
        burst: l.quota.burst,
        key: l.key.clone(),
        scope: l.scope,
    }
}

fn compile_limit(policy: &Arc<str>, l: &Limit, shares: &HashMap<String, u64>) -> Result<CompiledLimit, PolicyError> {
    let invalid = |field: &str, value: String, why: &str| PolicyError::Invalid {
        resource: format!("RateLimitPolicy {policy}"),
        field: format!("limit {}.{field}", l.name),
        value,
        why: why.into(),
    };
    let period = parse_period(&l.period).map_err(|why| invalid("period", l.period.clone(), why))?;
    if let LimitKey::Unrecognised(k) = &l.key {
        return Err(invalid(
            "key",
            k.clone(),
            "must be identity, header:<name>, source_ip, principal, api_key or none",
        ));
    }
    let rate = match l.scope {
        // This replica's share of the cluster quota, as the control plane divided it.
        Scope::Cluster => *shares.get(&format!("{policy}/{}", l.name)).unwrap_or(&l.rate),
        Scope::Sidecar => l.rate,
    };
    Ok(CompiledLimit {
        policy: policy.clone(),
        name: l.name.as_str().into(),
        methods: l.match_.methods.clone(),
        paths: l.match_.paths.iter().map(|p| Pattern::new(p)).collect(),
        key: l.key.clone(),
        algorithm: l.algorithm,
        quota: Quota { rate: rate.max(1), period, burst: l.burst },
        scope: l.scope,
        states: Mutex::new(lru::LruCache::new(MAX_KEYS)),
    })
}

#[cfg(test)]
mod tests;
