//! Policy on the control plane: applying resources to the store (validated
//! with the same code the sidecars use), previews and simulated decisions.
//! Sending policies to the sidecars is the push path's ([`crate::push`]).

use std::collections::HashMap;

use palisade_policy::{Enforcer, HeaderList, Headers as _, Inputs, Resource};
use palisade_proto::limits;
use palisade_proto::v1::AppliedPolicy;
use tonic::Status;

use crate::Shared;
use crate::store::StoreError;

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
    shared.hub.views.parsed(shared).items.iter().filter_map(|(_, _, r)| r.clone()).flatten().collect()
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
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path.as_str(), None),
    };
    let content_type = headers.first("content-type");
    let head = palisade_policy::RequestHead {
        source: (!req.source.is_empty()).then_some(req.source.as_str()),
        caller_expired: false,
        method: &req.method,
        path,
        query,
        host: None,
        port: u16::try_from(req.port).unwrap_or(0),
        headers: &headers,
        content_length: None,
        has_body: content_type.is_some(),
    };
    let e = enforcer.explain(&head, given.as_ref());
    Ok(palisade_proto::v1::SimulateResponse {
        decision: e.decision.into(),
        policy: e.policy,
        rule: e.rule.map(|r| r as i64).unwrap_or(-1),
        reason: e.reason,
        rate_limits: e.rate_limits,
        request_changes: e.request_changes,
        response_changes: e.response_changes,
        cors: e.cors,
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
    let headers: Vec<(String, String)> = req.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let with_query = |p: &str| match query {
        Some(q) => format!("{p}?{q}"),
        None => p.to_string(),
    };
    let refused = |e: palisade_policy::path::PathError| {
        Status::invalid_argument(format!("path: {e} (the callee's sidecar refuses it with 400)"))
    };
    let Some(routed) = enforcer.route_request(&req.service, raw_path, &HeaderList(&pairs)).map_err(refused)? else {
        let path = palisade_policy::path::normalize(raw_path).map_err(refused)?;
        return Ok(palisade_proto::v1::SimulateRouteResponse {
            policy: String::new(),
            route: -1,
            backends: vec![palisade_proto::v1::RouteBackend { service: req.service.clone(), weight: 1 }],
            path: with_query(&path),
            reason: format!("no TrafficPolicy route of {} matches: the request goes to {}", req.source, req.service),
        });
    };
    let route = routed.route;
    let backends: Vec<palisade_proto::v1::RouteBackend> = route
        .backends()
        .into_iter()
        .map(|(service, weight)| palisade_proto::v1::RouteBackend { service: service.to_string(), weight })
        .collect();
    let new_path = routed.rewritten.unwrap_or(routed.path);
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
