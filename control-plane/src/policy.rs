//! Policy on the control plane: applying resources to the store (validated
//! with the same code the sidecars use), simulating decisions, and
//! `MeshConfig.Stream`, which sends each sidecar a versioned snapshot of
//! what targets it (its policies, rate-limit shares, the directory, the trust
//! bundle) on every relevant change and records its ACKs and NACKs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use palisade_policy::resource::Scope;
use palisade_policy::{Enforcer, HeaderList, Headers as _, Inputs, Request as PolicyRequest, Resource};
use palisade_proto::limits;
use palisade_proto::v1::mesh_config_server::MeshConfig;
use palisade_proto::v1::{AppliedPolicy, DiscoveryRequest, Snapshot};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::store::StoreError;

/// Coalesces bursts of changes before snapshots are rebuilt.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// What the control plane knows of one proxy's policy sync (and, with a
/// replicated store, what each replica publishes of its own proxies).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    pub identity: String,
    /// Version last sent.
    pub sent: String,
    /// Version last ACKed.
    pub acked: String,
    /// The roots of the last sent snapshot's trust bundle ([`crate::ca::roots_key`]).
    #[serde(skip)]
    pub sent_roots: String,
    /// The roots of the trust bundle it last ACKed: a root rotation waits on them.
    #[serde(default)]
    pub acked_roots: String,
    pub last_nack: String,
    pub connected: bool,
    pub nacked: bool,
    /// The store's policy revision this proxy's snapshot was last computed
    /// from (sent, or found unchanged): `policy apply --wait` waits for it.
    pub evaluated: u64,
    /// The credentials generation (API keys, key sets) its snapshot was last
    /// computed from: `apikey create` and `revoke` wait for it.
    #[serde(skip)]
    pub credentials: u64,
    /// Which stream owns the entry: a reconnect's new stream takes it over,
    /// and the old stream closing late must not mark it disconnected.
    #[serde(skip)]
    pub stream: u64,
    /// When the change the last sent snapshot carries happened (for the
    /// push latency, observed at its ACK).
    #[serde(skip)]
    pub change_at: Option<std::time::Instant>,
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

/// Change notification and sync bookkeeping shared by the streams.
#[derive(Debug)]
pub struct Hub {
    /// Bumped when policies (or the replica counts their shares depend on) change.
    policies: tokio::sync::watch::Sender<u64>,
    /// Bumped when the directory changes (a proxy appeared, moved or left);
    /// certificate renewals do not.
    endpoints: tokio::sync::watch::Sender<u64>,
    /// The stored policies parsed once per revision, shared by every stream.
    parsed: Mutex<Option<Arc<Parsed>>>,
    /// Keyed by [`status_key`].
    pub status: Mutex<HashMap<String, SyncStatus>>,
    nonce: AtomicU64,
    /// Bumped when request credentials change (API keys, fetched key sets,
    /// the mesh's signing keys): it is part of the snapshot version.
    credentials: AtomicU64,
    /// Set on shutdown: every stream ends so the server can drain.
    pub closing: tokio::sync::watch::Sender<bool>,
    /// When the last change (policies, credentials, directory) happened.
    changed_at: Mutex<std::time::Instant>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            policies: tokio::sync::watch::channel(0).0,
            endpoints: tokio::sync::watch::channel(0).0,
            parsed: Mutex::default(),
            status: Mutex::default(),
            nonce: AtomicU64::new(1),
            credentials: AtomicU64::new(0),
            closing: tokio::sync::watch::channel(false).0,
            changed_at: Mutex::new(std::time::Instant::now()),
        }
    }
}

/// The stored policies at one revision, parsed once.
#[derive(Debug)]
pub struct Parsed {
    revision: u64,
    /// Each stored policy: its JSON, and what it parsed into (`None`: it does
    /// not parse, and goes where its target points so a NACK shows it).
    items: Vec<(String, Option<Vec<Resource>>)>,
}

impl Hub {
    /// Wakes every stream: policies changed.
    pub fn policies_changed(&self) {
        *self.changed_at.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        self.policies.send_modify(|v| *v += 1);
    }

    fn changed_at(&self) -> std::time::Instant {
        *self.changed_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Request credentials changed: every stream rebuilds its snapshot, under
    /// a new version. Returns the new generation.
    pub fn credentials_changed(&self) -> u64 {
        let generation = self.credentials.fetch_add(1, Ordering::SeqCst) + 1;
        self.policies_changed();
        generation
    }

    /// Waits (up to `timeout`) until every connected proxy runs a snapshot
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

    /// Wakes every stream: the directory changed.
    pub fn endpoints_changed(&self) {
        *self.changed_at.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        self.endpoints.send_modify(|v| *v += 1);
    }

    /// The stored policies, parsed, at the store's current revision.
    fn parsed(&self, shared: &Shared) -> Arc<Parsed> {
        let mut cache = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        let current = shared.store.policy_revision();
        if let Some(p) = cache.as_ref().filter(|p| p.revision == current) {
            return p.clone();
        }
        let (revision, stored) = shared.store.policies();
        let items = stored
            .into_iter()
            .map(|p| {
                let parsed = Resource::parse_json(&p.json)
                    .map_err(|e| tracing::warn!(policy = %p.key, error = %e, "stored policy is invalid"))
                    .ok();
                (p.json, parsed)
            })
            .collect();
        let parsed = Arc::new(Parsed { revision, items });
        *cache = Some(parsed.clone());
        parsed
    }

    fn update(&self, key: &str, f: impl FnOnce(&mut SyncStatus)) {
        let mut all = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(key.to_string()).or_default());
    }

    /// Connected proxies per identity (the replica count for cluster-scope
    /// limits), here and, with a replicated store, on the other replicas.
    fn replicas(&self, shared: &Shared, identity: &str) -> u64 {
        let here = {
            let all = self.status.lock().unwrap_or_else(|p| p.into_inner());
            all.values().filter(|s| s.connected && s.identity == identity).count()
        };
        let there = remote_statuses(shared).into_iter().filter(|(_, s)| s.identity == identity).count();
        (here + there).max(1) as u64
    }

    /// This replica's connected proxies, as published for the others.
    pub(crate) fn published(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        let all = self.status.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .filter(|(_, s)| s.connected)
            .filter_map(|(k, s)| Some((k.clone(), serde_json::to_vec(&(k, s)).ok()?)))
            .collect()
    }
}

/// The other replicas' connected proxies, by status key.
pub(crate) fn remote_statuses(shared: &Shared) -> Vec<(String, SyncStatus)> {
    shared.store.remote_streams().iter().filter_map(|r| serde_json::from_slice(r).ok()).collect()
}

/// Parses and validates a document; maps errors to INVALID_ARGUMENT.
pub fn parse(document: &str) -> Result<Vec<Resource>, Status> {
    if document.trim().is_empty() {
        return Err(Status::invalid_argument("the document is empty"));
    }
    if document.len() > limits::MAX_DOCUMENT_BYTES {
        return Err(Status::invalid_argument(format!(
            "the document is {} bytes; the largest accepted is {} bytes (split it into several applies)",
            document.len(),
            limits::MAX_DOCUMENT_BYTES
        )));
    }
    let resources = palisade_policy::yaml::parse_text(document).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    for r in &resources {
        if !seen.insert((r.kind(), r.key())) {
            return Err(Status::invalid_argument(format!("{} {} appears twice in the document", r.kind(), r.key())));
        }
    }
    Ok(resources)
}

fn store_error(e: StoreError) -> Status {
    if let StoreError::Conflict { what } = e {
        return Status::aborted(what);
    }
    tracing::error!(error = %e, "policy store failed");
    Status::unavailable("cannot persist the change; see the control plane log")
}

fn diff(old: Option<&str>, new: &str) -> String {
    let pretty = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .map(|p| p + "\n")
            .unwrap_or_default()
    };
    let (old, new) = (old.map(pretty).unwrap_or_default(), pretty(new));
    similar::TextDiff::from_lines(&old, &new).unified_diff().context_radius(2).to_string()
}

/// Applies (or, with `dry_run`, only validates) a document.
pub(crate) fn apply(
    shared: &Shared,
    document: &str,
    dry_run: bool,
) -> Result<(u64, Vec<AppliedPolicy>, Vec<String>), Status> {
    let resources = parse(document)?;
    check_budget(shared, &resources)?;
    check_issuers(shared, &resources)?;
    let mut warnings = warnings(shared, &resources);
    warnings.extend(fetch_new_key_sets(shared, &resources));
    if dry_run {
        let (rev, stored) = shared.store.policies();
        let by_id: HashMap<_, _> = stored.iter().map(|p| ((p.kind.clone(), p.key.clone()), p.json.clone())).collect();
        let out = resources
            .iter()
            .map(|r| AppliedPolicy {
                kind: r.kind().into(),
                key: r.key(),
                revision: 0,
                change: "valid".into(),
                diff: diff(by_id.get(&(r.kind().to_string(), r.key())).map(String::as_str), &r.to_json()),
            })
            .collect();
        return Ok((rev, out, warnings));
    }
    let (rev, applied) = shared
        .store
        .apply_policies(resources.iter().map(|r| (r.kind().to_string(), r.key(), r.to_json())).collect())
        .map_err(store_error)?;
    let out: Vec<AppliedPolicy> = applied
        .into_iter()
        .map(|a| AppliedPolicy {
            diff: if a.change == "unchanged" { String::new() } else { diff(a.previous.as_deref(), &a.record.json) },
            kind: a.record.kind,
            key: a.record.key,
            revision: a.record.revision,
            change: a.change.into(),
        })
        .collect();
    for a in &out {
        if a.change != "unchanged" {
            tracing::info!(target: "audit", event = "policy_applied", kind = %a.kind, policy = %a.key, change = %a.change, revision = a.revision, "policy changed");
        }
    }
    shared.hub.policies_changed();
    Ok((rev, out, warnings))
}

/// Identities a policy names that can never match, or that no workload the
/// control plane knows has (registered proxies, join tokens): valid, but
/// most likely a mistake, so `apply` and `validate` say so.
fn warnings(shared: &Shared, resources: &[Resource]) -> Vec<String> {
    let td = shared.trust_domain.as_str();
    let known: std::collections::HashSet<String> = shared
        .store
        .proxies()
        .into_iter()
        .map(|p| p.identity)
        .chain(shared.store.tokens().into_iter().map(|t| t.identity))
        .collect();
    let mut out = Vec::new();
    for r in resources {
        for (path, pattern) in r.identity_patterns() {
            let glob = |s: &str| s.contains(['*', '?']);
            let named_td = pattern.strip_prefix("spiffe://").map(|rest| rest.split('/').next().unwrap_or_default());
            let msg = match named_td {
                Some(other) if !glob(other) && other != td => {
                    format!("{pattern:?} is in trust domain {other}, but this mesh's is {td}: it never matches")
                }
                _ if glob(pattern) => {
                    if known.iter().any(|k| wildmatch::WildMatch::new(pattern).matches(k)) || known.is_empty() {
                        continue;
                    }
                    format!(
                        "{pattern:?} matches no workload known to the control plane yet (registered proxies, join tokens)"
                    )
                }
                _ if known.contains(pattern) => continue,
                _ => format!(
                    "no workload known to the control plane has {pattern:?} (registered proxies, join tokens); a typo?"
                ),
            };
            out.push(format!("{} {}: {path}: {msg}", r.kind(), r.key()));
        }
    }
    // A policy naming thousands of future tenants must not get a reply of
    // megabytes: the first few say what is wrong, a count says how often.
    if out.len() > MAX_WARNINGS {
        let more = out.len() - MAX_WARNINGS;
        out.truncate(MAX_WARNINGS);
        out.push(format!("... and {more} more identities like these"));
    }
    out
}

/// A JWT issuer without keys must be the mesh's own (whose keys the control plane holds).
fn check_issuers(shared: &Shared, resources: &[Resource]) -> Result<(), Status> {
    let mesh = shared.oauth.as_ref().map(|o| o.issuer());
    for r in resources {
        let Resource::AuthenticationPolicy { spec, .. } = r else { continue };
        for (i, j) in spec.jwt.iter().enumerate() {
            if j.jwks.is_some() || j.jwks_uri.is_some() || Some(j.issuer.as_str()) == mesh {
                continue;
            }
            let why = match mesh {
                Some(m) => format!("only the mesh's own issuer ({m}) may leave them out"),
                None => "the mesh's token service is off (start the control plane with --oauth-listen to issue tokens)"
                    .to_string(),
            };
            return Err(Status::invalid_argument(format!(
                "{} {}: spec.jwt[{i}]: issuer {:?} has no keys: give jwks (inline) or jwksUri; {why}",
                r.kind(),
                r.key(),
                j.issuer
            )));
        }
    }
    Ok(())
}

/// Every `jwksUri` the stored policies name.
pub(crate) fn jwks_uris(shared: &Shared) -> Vec<String> {
    let mut out: Vec<String> = all_resources(shared).iter().flat_map(key_set_uris).collect();
    out.sort();
    out.dedup();
    out
}

fn key_set_uris(r: &Resource) -> Vec<String> {
    match r {
        Resource::AuthenticationPolicy { spec, .. } => spec.jwt.iter().filter_map(|j| j.jwks_uri.clone()).collect(),
        _ => Vec::new(),
    }
}

/// Fetches key sets an apply names for the first time, so the policy
/// arrives at the sidecars with its keys, and says when one cannot be had.
fn fetch_new_key_sets(shared: &Shared, resources: &[Resource]) -> Vec<String> {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return Vec::new() };
    let mut out = Vec::new();
    for uri in resources.iter().flat_map(key_set_uris) {
        if shared.jwks.get(&uri).is_some() {
            continue;
        }
        if let Err(e) = handle.block_on(shared.jwks.fetch(&uri)) {
            out.push(format!(
                "jwksUri {uri} cannot be fetched now ({e}); the control plane keeps trying, and tokens of its issuer are refused until it succeeds"
            ));
        }
    }
    out
}

/// Warnings returned by one apply or validate, at most.
const MAX_WARNINGS: usize = 20;

/// Refuses an apply after which the stored policies would not fit in a
/// sidecar's snapshot: every sidecar must always be able to receive what it
/// is sent, or it would keep enforcing a stale policy.
fn check_budget(shared: &Shared, resources: &[Resource]) -> Result<(), Status> {
    let (_, stored) = shared.store.policies();
    let mut sizes: HashMap<(String, String), usize> =
        stored.iter().map(|p| ((p.kind.clone(), p.key.clone()), p.json.len())).collect();
    for r in resources {
        sizes.insert((r.kind().to_string(), r.key()), r.to_json().len());
    }
    let total: usize = sizes.values().sum();
    if total > limits::MAX_POLICY_BYTES {
        return Err(Status::failed_precondition(format!(
            "after this apply the stored policies would total {total} bytes (compact JSON); the limit is {} bytes, \
             so that every sidecar's snapshot fits its {} byte message limit: delete or shrink policies first",
            limits::MAX_POLICY_BYTES,
            limits::MAX_SNAPSHOT_BYTES
        )));
    }
    Ok(())
}

/// All stored policies, parsed.
pub(crate) fn all_resources(shared: &Shared) -> Vec<Resource> {
    shared.hub.parsed(shared).items.iter().filter_map(|(_, r)| r.clone()).flatten().collect()
}

/// The preview API: what the document would change for the requests the
/// sidecars recorded in the window.
pub(crate) fn preview(shared: &Shared, document: &str) -> Result<palisade_proto::v1::PreviewPolicyResponse, Status> {
    let candidates = parse(document)?;
    check_issuers(shared, &candidates)?;
    let before = all_resources(shared);
    let mut after: Vec<Resource> = before
        .iter()
        .filter(|r| !candidates.iter().any(|c| c.kind() == r.kind() && c.key() == r.key()))
        .cloned()
        .collect();
    after.extend(candidates);
    let (samples, span) = shared.observe.samples();
    let p = palisade_policy::preview::preview(&before, &after, shared.default_allow_authenticated, &samples)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut warnings = p.warnings;
    if samples.is_empty() {
        warnings.push(format!(
            "no recorded traffic in the last {}: sidecars record requests as authorization sees them (--preview-record-rate) and report them every --report-interval",
            humantime::format_duration(shared.observe.window())
        ));
    }
    Ok(palisade_proto::v1::PreviewPolicyResponse {
        changes: p
            .changes
            .into_iter()
            .map(|c| palisade_proto::v1::PreviewChange {
                from: c.from,
                to: c.to,
                method: c.method,
                path: c.path,
                before: c.before.into(),
                after: c.after.into(),
                count: c.count,
                before_rule: c.before_rule,
                after_rule: c.after_rule,
            })
            .collect(),
        requests_evaluated: p.requests_evaluated,
        window_seconds: span.as_secs(),
        warnings,
    })
}

/// The simulate API's decision for one request.
pub(crate) fn simulate(
    shared: &Shared,
    req: &palisade_proto::v1::SimulateRequest,
) -> Result<palisade_proto::v1::SimulateResponse, Status> {
    palisade_certs::SpiffeId::parse_workload(&req.target)
        .map_err(|e| Status::invalid_argument(format!("target: {e}")))?;
    if !req.source.is_empty() {
        palisade_certs::SpiffeId::parse_workload(&req.source)
            .map_err(|e| Status::invalid_argument(format!("source: {e}")))?;
    }
    let resources = all_resources(shared);
    // The enforcer the target's sidecar runs, compiled the same way; only the
    // cluster-scope shares are left at the full quota (they depend on replicas).
    let inputs = Inputs {
        version: "simulate",
        resources: &resources,
        default_allow_authenticated: shared.default_allow_authenticated,
        ..Inputs::none()
    };
    let enforcer = Enforcer::compile(inputs, &req.target, None).map_err(|e| Status::internal(e.to_string()))?;
    let headers: Vec<(String, String)> = req.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let headers = HeaderList(&pairs);
    let mut claims = serde_json::Map::new();
    for (k, v) in &req.claims {
        // A JSON value (`["a","b"]`, `3`), or else the text itself.
        let value = serde_json::from_str::<serde_json::Value>(v)
            .ok()
            .filter(|v| !v.is_string())
            .unwrap_or_else(|| serde_json::Value::String(v.clone()));
        claims.insert(k.clone(), value);
    }
    let given = (!req.principal.is_empty() || !req.api_key.is_empty() || !claims.is_empty()).then(|| {
        palisade_policy::Authenticated::given(
            (!req.principal.is_empty()).then(|| req.principal.clone()),
            (!req.api_key.is_empty()).then(|| req.api_key.clone()),
            claims,
        )
    });
    // The sidecar decides on the normalised path (per the workload's TrafficPolicies).
    let raw_path = req.path.split('?').next().unwrap_or_default();
    let path = match palisade_policy::path::normalize_with(raw_path, enforcer.checks().path_options()) {
        Ok(p) => p,
        Err(e) => {
            return Ok(palisade_proto::v1::SimulateResponse {
                decision: "invalid".into(),
                rule: -1,
                reason: format!("the sidecar refuses this path with 400: {e}"),
                ..Default::default()
            });
        }
    };
    let preq = PolicyRequest {
        source: (!req.source.is_empty()).then_some(req.source.as_str()),
        method: (!req.method.is_empty()).then_some(req.method.as_str()),
        path: (!req.path.is_empty()).then_some(&*path),
        port: u16::try_from(req.port).unwrap_or(0),
        host: None,
        headers: &headers,
        auth: given.as_ref(),
    };
    // TrafficPolicy validation comes before authentication.
    let query = req.path.split_once('?').map(|(_, q)| q);
    let content_type = headers.first("content-type");
    let head = palisade_policy::traffic::Head {
        method: &req.method,
        query,
        content_type,
        content_length: None,
        has_body: content_type.is_some(),
    };
    if let Err(invalid) = enforcer.checks().check(&head) {
        return Ok(palisade_proto::v1::SimulateResponse {
            decision: "invalid".into(),
            policy: invalid.policy.clone(),
            rule: -1,
            reason: format!("TrafficPolicy {} refuses it with {}: {}", invalid.policy, invalid.status, invalid.reason),
            ..Default::default()
        });
    }
    // Authentication comes first: where a credential is required and the
    // request carries none, the sidecar answers 401 before any rule.
    let required_by: Vec<String> = resources
        .iter()
        .filter(|r| r.targets(&req.target))
        .filter_map(|r| match r {
            Resource::AuthenticationPolicy { spec, .. }
                if spec.mode == palisade_policy::resource::AuthnMode::Required =>
            {
                Some(r.key())
            }
            _ => None,
        })
        .collect();
    if given.is_none() && !required_by.is_empty() {
        return Ok(palisade_proto::v1::SimulateResponse {
            decision: "unauthenticated".into(),
            policy: required_by[0].clone(),
            rule: -1,
            reason: format!(
                "AuthenticationPolicy {} requires a request credential and this request carries none (401); \
                 give --principal or --api-key to check one that does",
                required_by.join(", ")
            ),
            ..Default::default()
        });
    }
    let d = enforcer.authorize(&preq);
    let rate_limits = enforcer.limits_for(&preq).iter().map(ToString::to_string).collect();
    let vars = palisade_policy::traffic::Vars {
        caller: preq.source,
        principal: given.as_ref().and_then(|g| g.principal.as_deref()),
        request_id: Some("<x-request-id>"),
    };
    let rewrites = enforcer.rewrites();
    let cors = match (enforcer.cors(), headers.first("origin")) {
        (Some(c), Some(origin)) => {
            let preflight = req
                .method
                .eq_ignore_ascii_case("OPTIONS")
                .then(|| headers.first("access-control-request-method"))
                .flatten();
            let answer = match preflight {
                Some(m) => c.preflight(origin, m, headers.first("access-control-request-headers")),
                None => c.actual(origin),
            };
            let what = if preflight.is_some() { "preflight" } else { "request" };
            match answer {
                Some(h) => format!(
                    "{what} from {origin} allowed by {}: {}",
                    c.policy,
                    h.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; ")
                ),
                None => format!(
                    "{what} from {origin} not allowed by {} (no Access-Control-* headers: the browser blocks it)",
                    c.policy
                ),
            }
        }
        (Some(c), None) => format!("{} has CORS; give --header origin=... to check a browser's request", c.policy),
        _ => String::new(),
    };
    Ok(palisade_proto::v1::SimulateResponse {
        decision: d.label().into(),
        policy: d.policy.as_deref().unwrap_or_default().to_string(),
        rule: d.rule.map(|r| r as i64).unwrap_or(-1),
        reason: d.reason(),
        rate_limits,
        request_changes: rewrites.request.iter().map(|op| op.describe(&vars)).collect(),
        response_changes: rewrites.response.iter().map(|op| op.describe(&vars)).collect(),
        cors,
    })
}

/// The simulate-route API: which route the caller's sidecar takes.
pub(crate) fn simulate_route(
    shared: &Shared,
    req: &palisade_proto::v1::SimulateRouteRequest,
) -> Result<palisade_proto::v1::SimulateRouteResponse, Status> {
    palisade_certs::SpiffeId::parse_workload(&req.source)
        .map_err(|e| Status::invalid_argument(format!("source: {e}")))?;
    if !palisade_policy::route::service_ok(&req.service) {
        return Err(Status::invalid_argument("service: expected <service-account>.<namespace>"));
    }
    let resources = all_resources(shared);
    let inputs = Inputs { version: "simulate", resources: &resources, ..Inputs::none() };
    let enforcer = Enforcer::compile(inputs, &req.source, None).map_err(|e| Status::internal(e.to_string()))?;
    let raw = if req.path.is_empty() { "/" } else { req.path.as_str() };
    let (raw_path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    let path = palisade_policy::path::normalize(raw_path)
        .map_err(|e| Status::invalid_argument(format!("path: {e} (the callee's sidecar refuses it with 400)")))?;
    let headers: Vec<(String, String)> = req.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let with_query = |p: &str| match query {
        Some(q) => format!("{p}?{q}"),
        None => p.to_string(),
    };
    let Some(route) = enforcer.routes().route(&req.service, &path, &HeaderList(&pairs)) else {
        return Ok(palisade_proto::v1::SimulateRouteResponse {
            policy: String::new(),
            route: -1,
            backends: vec![palisade_proto::v1::RouteBackend { service: req.service.clone(), weight: 1 }],
            path: with_query(&path),
            reason: format!("no TrafficPolicy route of {} matches: the request goes to {}", req.source, req.service),
        });
    };
    let backends: Vec<palisade_proto::v1::RouteBackend> = route
        .backends()
        .into_iter()
        .map(|(service, weight)| palisade_proto::v1::RouteBackend { service: service.to_string(), weight })
        .collect();
    let new_path = route.rewrite(&path).unwrap_or_else(|| path.to_string());
    let total: u32 = backends.iter().map(|b| b.weight).sum();
    let split = backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| format!("{} {:.0}%", b.service, f64::from(b.weight) * 100.0 / f64::from(total.max(1))))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(palisade_proto::v1::SimulateRouteResponse {
        policy: route.policy.to_string(),
        route: route.index as i64,
        backends,
        path: with_query(&new_path),
        reason: format!("TrafficPolicy {} route {} matches: {split}", route.policy, route.index),
    })
}

/// The MeshConfig service.
#[derive(Debug, Clone)]
pub struct MeshConfigService {
    pub(crate) shared: Arc<Shared>,
}

/// The snapshot for one sidecar, and the store policy revision it reflects.
fn build_snapshot(shared: &Shared, identity: &str, hub: &Hub) -> (Snapshot, u64, u64) {
    let parsed = hub.parsed(shared);
    let mut policies_json = Vec::new();
    let mut rate_shares = HashMap::new();
    let mut jwks = HashMap::new();
    let mut wants_api_keys = false;
    for (json, resources) in &parsed.items {
        let Some(resources) = resources else {
            // A stored resource this version cannot read (written by a newer
            // control plane, or by hand): send it where its target points, so the
            // sidecar's NACK makes the problem visible, rather than drop it silently.
            let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            let targeted = v["spec"]["target"]["identities"].as_array().is_some_and(|ids| {
                ids.iter().filter_map(|i| i.as_str()).any(|g| wildmatch::WildMatch::new(g).matches(identity))
            });
            if targeted {
                policies_json.push(json.clone());
            }
            continue;
        };
        let mut targeted = false;
        for r in resources.iter().filter(|r| r.targets(identity)) {
            targeted = true;
            if let Resource::AuthenticationPolicy { spec, .. } = r {
                wants_api_keys |= spec.api_keys.is_some();
                for j in &spec.jwt {
                    if let Some(uri) = &j.jwks_uri {
                        if let Some(set) = shared.jwks.get(uri) {
                            jwks.insert(uri.clone(), set);
                        }
                    } else if j.jwks.is_none()
                        && let Some(o) = shared.oauth.as_ref().filter(|o| o.issuer() == j.issuer)
                    {
                        jwks.insert(j.issuer.clone(), o.jwks_json());
                    }
                }
            }
            if let Resource::RateLimitPolicy { spec, .. } = r {
                for l in spec.limits.iter().filter(|l| l.scope == Scope::Cluster) {
                    // The quota divided among the ready replicas, rounded up.
                    rate_shares
                        .insert(format!("{}/{}", r.key(), l.name), l.rate.div_ceil(hub.replicas(shared, identity)));
                }
            }
        }
        if targeted {
            policies_json.push(json.clone());
        }
    }
    let generation = hub.credentials.load(Ordering::SeqCst);
    let ca = shared.ca.view();
    let version =
        if generation == 0 { format!("r{}", parsed.revision) } else { format!("r{}-c{generation}", parsed.revision) };
    let snapshot = Snapshot {
        version,
        nonce: String::new(),
        policies_json,
        endpoints: crate::discovery::endpoints(shared),
        trust_bundle_der: ca.bundle_der(),
        renew_unless_chains_to: ca.renew_unless.iter().map(|c| c.to_vec()).collect(),
        default_allow_authenticated: shared.default_allow_authenticated,
        rate_shares,
        api_keys: if wants_api_keys { crate::credentials::api_keys_for(shared, identity) } else { Vec::new() },
        jwks,
        taps: Vec::new(),
    };
    (snapshot, parsed.revision, generation)
}

/// Whether two snapshots carry the same content (versions and nonces aside).
fn same_content(a: &Snapshot, b: &Snapshot) -> bool {
    a.policies_json == b.policies_json
        && a.endpoints == b.endpoints
        && a.rate_shares == b.rate_shares
        && a.trust_bundle_der == b.trust_bundle_der
        && a.renew_unless_chains_to == b.renew_unless_chains_to
        && a.default_allow_authenticated == b.default_allow_authenticated
        && a.api_keys == b.api_keys
        && a.jwks == b.jwks
}

type SnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<Snapshot, Status>>;

#[tonic::async_trait]
impl MeshConfig for MeshConfigService {
    type StreamStream = SnapshotStream;

    async fn stream(&self, req: Request<Streaming<DiscoveryRequest>>) -> Result<Response<SnapshotStream>, Status> {
        let td = &self.shared.trust_domain;
        let identity = match req.peer_certs().and_then(|c| palisade_certs::tls::peer_identity(Some(&c))) {
            Some((id, _)) if id.trust_domain() == td && id.workload().is_some() => id.to_string(),
            _ => {
                return Err(Status::unauthenticated(
                    "policy snapshots are served to workload certificates of this mesh only",
                ));
            }
        };
        let src = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream must start with the sidecar's inbound address"))?;
        let key = status_key(&identity, &first.inbound_addr);
        // Taps go only to sidecars that understand taps-only snapshots: an
        // older one would read one as a snapshot without policies.
        let taps_ok = first.capabilities.iter().any(|c| c == "taps");
        let shared = self.shared.clone();
        let hub = &shared.hub;
        let stream_id = hub.nonce.fetch_add(1, Ordering::Relaxed);
        hub.update(&key, |s| {
            *s = SyncStatus { identity: identity.clone(), connected: true, stream: stream_id, ..Default::default() };
        });
        hub.policies_changed(); // replica counts may change cluster-scope shares
        crate::metrics::METRICS.policy_streams.inc();
        tracing::info!(src.addr = %src, src.identity = %identity, proxy = %palisade_telemetry::Untrusted(&key), "sidecar subscribed to policy");

        let (tx, rx) = mpsc::channel(4);
        let sender_shared = shared.clone();
        let (sender_key, sender_identity) = (key.clone(), identity.clone());
        tokio::spawn(async move {
            let hub = &sender_shared.hub;
            let mut policies = hub.policies.subscribe();
            let mut endpoints = hub.endpoints.subscribe();
            let mut closing = hub.closing.subscribe();
            let mut taps = sender_shared.observe.taps_changed.subscribe();
            let mut last: Option<Snapshot> = None;
            loop {
                let (mut snap, evaluated, generation) = build_snapshot(&sender_shared, &sender_identity, hub);
                if taps_ok {
                    snap.taps = sender_shared.observe.taps_for(&sender_identity);
                }
                let taps_changed = last.as_ref().is_some_and(|l| l.taps != snap.taps);
                if last.as_ref().is_some_and(|l| same_content(l, &snap)) {
                    if taps_changed {
                        // Only the taps changed: they go alone, unversioned and unanswered.
                        let only = Snapshot { taps: snap.taps.clone(), ..Default::default() };
                        if tx.send(Ok(only)).await.is_err() {
                            break;
                        }
                        if let Some(l) = last.as_mut() {
                            l.taps = snap.taps;
                        }
                    }
                    // Nothing this sidecar sees changed.
                    hub.update(&sender_key, |s| {
                        if s.stream == stream_id {
                            s.evaluated = evaluated;
                            s.credentials = generation;
                        }
                    });
                } else if prost::Message::encoded_len(&snap) > limits::MAX_SNAPSHOT_BYTES {
                    // Apply keeps policies under budget; endpoints alone could still grow past it.
                    tracing::error!(proxy = %palisade_telemetry::Untrusted(&sender_key), size = prost::Message::encoded_len(&snap), limit = limits::MAX_SNAPSHOT_BYTES, "snapshot too large for the sidecar; not sent (it keeps its last policy)");
                    last = Some(snap);
                } else {
                    snap.nonce = hub.nonce.fetch_add(1, Ordering::Relaxed).to_string();
                    let version = snap.version.clone();
                    let roots = crate::ca::roots_key(&snap.trust_bundle_der);
                    let change_at = hub.changed_at();
                    if tx.send(Ok(snap.clone())).await.is_err() {
                        break;
                    }
                    hub.update(&sender_key, |s| {
                        if s.stream == stream_id {
                            s.sent = version;
                            s.sent_roots = roots;
                            s.evaluated = evaluated;
                            s.credentials = generation;
                            s.change_at = Some(change_at);
                        }
                    });
                    last = Some(snap);
                }
                tokio::select! {
                    r = policies.changed() => if r.is_err() { break },
                    r = endpoints.changed() => if r.is_err() { break },
                    r = taps.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                    _ = closing.changed() => break,
                }
                // Coalesce a burst of changes into one snapshot.
                tokio::time::sleep(DEBOUNCE).await;
                policies.mark_unchanged();
                endpoints.mark_unchanged();
                taps.mark_unchanged();
            }
        });
        let recv_shared = shared.clone();
        tokio::spawn(async move {
            let hub = &recv_shared.hub;
            loop {
                match inbound.message().await {
                    Ok(Some(m)) if !m.jwks_refresh.is_empty() => {
                        // A sidecar saw a `kid` its key sets lack: fetch them again (rate limited).
                        for uri in m.jwks_refresh.iter().take(16) {
                            recv_shared.jwks.request_refresh(uri);
                        }
                    }
                    Ok(Some(m)) if m.nonce.is_empty() => {
                        // A report, not an answer: tap lines, recorded requests, stats.
                        let observe = &recv_shared.observe;
                        if !m.tap_events.is_empty() {
                            observe.deliver(&identity, &key, &m.tap_events);
                        }
                        if !m.recorded.is_empty() {
                            observe.record(&identity, &m.recorded);
                        }
                        if let Some(stats) = m.stats {
                            observe.stats_report(&identity, &key, stats);
                        }
                    }
                    Ok(Some(m)) if m.error.is_empty() => hub.update(&key, |s| {
                        if s.stream == stream_id {
                            if m.version == s.sent
                                && let Some(at) = s.change_at.take()
                            {
                                crate::metrics::METRICS.push_latency.observe(at.elapsed().as_secs_f64());
                            }
                            if m.version == s.sent {
                                s.acked_roots = s.sent_roots.clone();
                            }
                            s.acked = m.version;
                            s.nacked = false;
                        }
                    }),
                    Ok(Some(m)) => {
                        let types: Vec<&String> = m.rejected.keys().collect();
                        crate::metrics::METRICS.nacks.inc();
                        tracing::warn!(target: "audit", event = "config_nack", proxy = %palisade_telemetry::Untrusted(&key), src.identity = %identity, version = %palisade_telemetry::Untrusted(&m.version), rejected = ?types, error = %palisade_telemetry::Untrusted(&m.error), "sidecar rejected part of a config snapshot");
                        hub.update(&key, |s| {
                            if s.stream == stream_id {
                                s.nacked = true;
                                s.last_nack = m.error;
                            }
                        });
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            hub.update(&key, |s| {
                if s.stream == stream_id {
                    s.connected = false;
                }
            });
            hub.policies_changed();
            crate::metrics::METRICS.policy_streams.dec();
            tracing::info!(proxy = %palisade_telemetry::Untrusted(&key), "sidecar policy stream closed");
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
