//! Explanations, the control plane's side of `palisadectl authz check`,
//! `palisadectl route` and `policy preview`: thin adapters over the policy
//! engine's one decision (`Enforcer::decide`, `Enforcer::route_request`),
//! compiled for the workload from the policies in the store, so an
//! explanation is what that workload's sidecar would do.

use palisade_policy::resilience::Resilience;
use palisade_policy::{Enforcer, HeaderList, Headers as _, Inputs, Resource};
use tonic::Status;

use crate::Shared;
use crate::policy::{all_resources, check_issuers, parse};

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
    // The enforcer the target's sidecar runs, compiled the same way, with the
    // API keys and key sets it holds (a credential in `headers` is verified as
    // it would be); only the cluster-scope shares are left at the full quota
    // (they depend on replicas).
    let mut key_sets = std::collections::BTreeMap::new();
    for r in resources.iter().filter(|r| r.targets(&req.target)) {
        if let Resource::AuthenticationPolicy { spec, .. } = r {
            crate::push::view::key_sets_into(shared, spec, &mut key_sets);
        }
    }
    let jwks: std::collections::HashMap<String, String> = key_sets.into_iter().collect();
    let api_keys: Vec<palisade_policy::ApiKey> = crate::credentials::api_keys_for(shared, &req.target)
        .into_iter()
        .map(|k| palisade_policy::ApiKey {
            name: k.name,
            principal: k.principal,
            sha256: k.sha256,
            expires_at: k.expires_at,
        })
        .collect();
    let inputs = Inputs {
        version: "simulate",
        resources: &resources,
        default_allow_authenticated: shared.default_allow_authenticated,
        jwks: &jwks,
        api_keys: &api_keys,
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
    // As the sidecar's HTTP parser reads a request target: no fragment, then
    // the query apart.
    let target = req.path.split('#').next().unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    // A body is what `content-length` (above 0) or `transfer-encoding` says.
    let content_length = headers.first("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    let has_body = content_length.is_some_and(|n| n > 0) || headers.first("transfer-encoding").is_some();
    let head = palisade_policy::RequestHead {
        source: (!req.source.is_empty()).then_some(req.source.as_str()),
        caller_expired: false,
        method: &req.method,
        path,
        query,
        host: headers.first(":authority").or_else(|| headers.first("host")),
        port: u16::try_from(req.port).unwrap_or(0),
        headers: &headers,
        content_length,
        has_body,
    };
    let e = enforcer.explain(&head, given.as_ref(), palisade_cmd::unix_now());
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
    let method = if req.method.is_empty() { "GET" } else { req.method.as_str() };
    let balancing = Some(balancing_of(&enforcer));
    let Some(routed) = enforcer.route_request(&req.service, raw_path, &HeaderList(&pairs)).map_err(refused)? else {
        let path = palisade_policy::path::normalize(raw_path).map_err(refused)?;
        return Ok(palisade_proto::v1::SimulateRouteResponse {
            policy: String::new(),
            route: -1,
            backends: vec![palisade_proto::v1::RouteBackend { service: req.service.clone(), weight: 1 }],
            path: with_query(&path),
            reason: format!("no TrafficPolicy route of {} matches: the request goes to {}", req.source, req.service),
            resilience: Some(resilience_of(&Resilience::default(), method)),
            balancing,
        });
    };
    let route = routed.route;
    let mut backends: Vec<palisade_proto::v1::RouteBackend> = route
        .backends()
        .into_iter()
        .map(|(service, weight)| palisade_proto::v1::RouteBackend { service: service.to_string(), weight })
        .collect();
    let new_path = routed.rewritten.unwrap_or(routed.path);
    let total: u32 = backends.iter().map(|b| b.weight).sum();
    let split = if backends.is_empty() {
        // A route that names no backends (timeouts or retries only) keeps the called service.
        backends.push(palisade_proto::v1::RouteBackend { service: req.service.clone(), weight: 1 });
        format!("{} (the called service)", req.service)
    } else {
        backends
            .iter()
            .filter(|b| b.weight > 0)
            .map(|b| format!("{} {:.0}%", b.service, f64::from(b.weight) * 100.0 / f64::from(total.max(1))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(palisade_proto::v1::SimulateRouteResponse {
        policy: route.policy.to_string(),
        route: route.index as i64,
        backends,
        path: with_query(&new_path),
        reason: format!("TrafficPolicy {} route {} matches: {split}", route.policy, route.index),
        resilience: Some(resilience_of(&route.resilience, method)),
        balancing,
    })
}

fn human(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The timeouts and retries a request gets, for `method`.
fn resilience_of(r: &Resilience, method: &str) -> palisade_proto::v1::RouteResilience {
    let retry = &r.retry;
    palisade_proto::v1::RouteResilience {
        timeout: r.timeout.map(human).unwrap_or_default(),
        per_try_timeout: r.per_try_timeout.map(human).unwrap_or_default(),
        attempts: retry.attempts,
        retry_on: retry.on.names(),
        backoff: human(retry.backoff),
        max_backoff: human(retry.max_backoff),
        non_idempotent: retry.non_idempotent,
        method_retried: retry.retries_method(method),
        max_body_bytes: retry.max_body_bytes,
        budget_percent: retry.budget_percent,
        budget_min_per_second: retry.budget_min_per_second,
    }
}

/// How the caller balances and ejects endpoints.
fn balancing_of(enforcer: &Enforcer) -> palisade_proto::v1::RouteBalancing {
    let b = enforcer.balancing();
    palisade_proto::v1::RouteBalancing {
        policy: enforcer.balancing_policy().unwrap_or_default().to_string(),
        warmup: human(b.warmup),
        consecutive_failures: b.ejection.consecutive_failures,
        success_rate_min_requests: b.ejection.success_rate_min_requests,
        base_time: human(b.ejection.base_time),
        max_time: human(b.ejection.max_time),
        max_percent: b.ejection.max_percent,
    }
}
