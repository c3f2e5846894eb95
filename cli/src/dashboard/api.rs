//! The dashboard's JSON: what the control plane's Admin API says, put in the
//! shapes the page draws (docs/dashboard.md lists them).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::{
    ApplyPolicyRequest, CaRoot, CaStatus, EdgeStat, GetCaStatusRequest, GetStatusRequest, ListPoliciesRequest,
    ListProxiesRequest, PolicyRecord, ProxyInfo, SimulateRequest, StatRequest, WorkloadStat,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

pub(crate) type Admin = AdminClient<Channel>;

/// Unix milliseconds of a protobuf time (`null` when absent).
pub(crate) fn ms(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref().map_or(Value::Null, |t| json!(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000))
}

/// `(namespace, name)` of a Kubernetes-shaped SPIFFE ID
/// (`spiffe://<td>/ns/<ns>/sa/<sa>`); otherwise no namespace and the path.
pub(crate) fn split_id(id: &str) -> (String, String) {
    let path = id.strip_prefix("spiffe://").and_then(|r| r.split_once('/')).map_or(id, |(_, p)| p);
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["ns", ns, "sa", sa] => ((*ns).to_string(), (*sa).to_string()),
        _ if id.is_empty() => (String::new(), "plaintext (no mTLS)".into()),
        _ => (String::new(), path.to_string()),
    }
}

fn edge_json(e: &EdgeStat) -> Value {
    json!({
        "from": e.from, "to": e.to, "requests": e.requests, "rps": e.rps, "success_rate": e.success_rate,
        "p99_ms": e.p99_ms, "mtls": !e.from.is_empty(),
        "refused": {"deny": e.denied, "unauthenticated": e.unauthenticated, "invalid": e.invalid, "rate_limited": e.rate_limited},
    })
}

fn proxy_json(p: &ProxyInfo) -> Value {
    json!({
        "addr": p.inbound_addr, "cert_serial": p.cert_serial, "cert_not_after": ms(&p.cert_not_after),
        "last_seen": ms(&p.last_seen), "attestation": p.attestation, "sync_state": p.sync_state,
        "policy_version": p.policy_version, "policy_revision": p.policy_revision_evaluated, "last_nack": p.last_nack,
    })
}

/// A workload's node: its sidecars' state and its inbound traffic.
fn node_json(id: &str, proxies: &[&ProxyInfo], stat: Option<&WorkloadStat>) -> Value {
    let (namespace, name) = split_id(id);
    let count = |s: &str| proxies.iter().filter(|p| p.sync_state == s).count();
    let expiry = proxies.iter().filter_map(|p| ms(&p.cert_not_after).as_i64()).min();
    json!({
        "id": id, "name": name, "namespace": namespace, "proxies": proxies.len(),
        "synced": count("synced"), "pending": count("pending") + count(""), "nacked": count("nacked"),
        "disconnected": count("disconnected"), "cert_not_after": expiry,
        "policy_revision": proxies.iter().map(|p| p.policy_revision_evaluated).min(),
        "rps": stat.map_or(0.0, |s| s.rps), "success_rate": stat.map_or(1.0, |s| s.success_rate),
        "refused_rate": stat.map_or(0.0, |s| s.refused_rate), "p99_ms": stat.map_or(0.0, |s| s.p99_ms),
        "requests": stat.map_or(0, |s| s.requests),
    })
}

async fn proxies(c: &mut Admin) -> Result<Vec<ProxyInfo>> {
    Ok(c.list_proxies(ListProxiesRequest {}).await?.into_inner().proxies)
}

async fn stat(c: &mut Admin, identity: &str, series: bool) -> Result<palisade_proto::v1::StatResponse> {
    let req = StatRequest { identity: identity.to_string(), window_seconds: 60, series };
    Ok(c.stat(req).await?.into_inner())
}

/// The mesh graph: every workload and the calls between them over the last minute.
pub(crate) async fn overview(c: &mut Admin) -> Result<Value> {
    let status = c.get_status(GetStatusRequest {}).await?.into_inner();
    let proxies = proxies(c).await?;
    let stats = stat(c, "", false).await?;
    let revision = c.list_policies(ListPoliciesRequest {}).await?.into_inner().revision;
    let mut by: BTreeMap<&str, Vec<&ProxyInfo>> = BTreeMap::new();
    for p in &proxies {
        by.entry(p.identity.as_str()).or_default().push(p);
    }
    for e in &stats.edges {
        for id in [&e.from, &e.to] {
            if !id.is_empty() && id != "*" {
                by.entry(id.as_str()).or_default();
            }
        }
    }
    let stat_of: HashMap<&str, &WorkloadStat> = stats.workloads.iter().map(|w| (w.identity.as_str(), w)).collect();
    let nodes: Vec<Value> = by.iter().map(|(id, ps)| node_json(id, ps, stat_of.get(id).copied())).collect();
    Ok(json!({
        "connected": true, "error": null, "updated": palisade_cmd::unix_now() * 1000,
        "trust_domain": status.trust_domain, "version": status.version, "revision": revision, "window_seconds": 60,
        "nodes": nodes, "edges": stats.edges.iter().map(edge_json).collect::<Vec<_>>(),
    }))
}

/// One workload's page; `None` when the mesh does not know it.
pub(crate) async fn workload(c: &mut Admin, id: &str) -> Result<Option<Value>> {
    let proxies: Vec<ProxyInfo> = proxies(c).await?.into_iter().filter(|p| p.identity == id).collect();
    // An exact ID: a glob's characters match only themselves here.
    let stats = stat(c, &id.replace(['*', '?'], "?"), true).await?;
    let edges: Vec<&EdgeStat> = stats.edges.iter().filter(|e| e.to == id || e.from == id).collect();
    if proxies.is_empty() && edges.is_empty() {
        return Ok(None);
    }
    let w = stats.workloads.iter().find(|w| w.identity == id);
    let policies = c.list_policies(ListPoliciesRequest {}).await?.into_inner().policies;
    let targeting: Vec<Value> = policies
        .iter()
        .filter(|r| parsed(r).is_some_and(|p| p.targets(id)))
        .map(|r| {
            let running =
                proxies.iter().filter(|p| p.sync_state == "synced" && p.policy_revision_evaluated >= r.revision);
            let n = running.count();
            let running = if n == proxies.len() && n > 0 {
                "all"
            } else if n > 0 {
                "some"
            } else {
                "none"
            };
            json!({"kind": r.kind, "key": r.key, "revision": r.revision, "running": running})
        })
        .collect();
    let now = palisade_cmd::unix_now() as f64 * 1000.0;
    let series: Vec<Value> = w
        .map_or(&[][..], |w| &w.series)
        .iter()
        .map(|p| {
            json!({
                "t": (now - p.ago_seconds * 1000.0) as i64, "requests": p.requests, "rps": p.rps,
                "success_rate": p.success_rate, "refused_rate": p.refused_rate, "p99_ms": p.p99_ms,
            })
        })
        .collect();
    let (namespace, name) = split_id(id);
    let refs: Vec<&ProxyInfo> = proxies.iter().collect();
    Ok(Some(json!({
        "id": id, "name": name, "namespace": namespace, "node": node_json(id, &refs, w),
        "proxies": proxies.iter().map(proxy_json).collect::<Vec<_>>(), "policies": targeting, "series": series,
        "inbound": edges.iter().filter(|e| e.to == id).map(|e| edge_json(e)).collect::<Vec<_>>(),
        "outbound": edges.iter().filter(|e| e.from == id).map(|e| edge_json(e)).collect::<Vec<_>>(),
    })))
}

fn parsed(r: &PolicyRecord) -> Option<palisade_policy::Resource> {
    palisade_policy::Resource::parse_json(&r.json).ok()?.into_iter().next()
}

/// Every policy with its YAML and its rollout over the sidecars it targets.
pub(crate) async fn policies(c: &mut Admin) -> Result<Value> {
    let list = c.list_policies(ListPoliciesRequest {}).await?.into_inner();
    let proxies = proxies(c).await?;
    let out: Vec<Value> = list
        .policies
        .iter()
        .map(|r| {
            let p = parsed(r);
            let targeted: Vec<&ProxyInfo> =
                proxies.iter().filter(|x| p.as_ref().is_some_and(|p| p.targets(&x.identity))).collect();
            let state = |x: &ProxyInfo| match x.sync_state.as_str() {
                "synced" if x.policy_revision_evaluated >= r.revision => "synced",
                "nacked" => "rejected",
                "disconnected" => "disconnected",
                _ => "pending",
            };
            let n = |s: &str| targeted.iter().filter(|x| state(x) == s).count();
            let errors: Vec<Value> = targeted
                .iter()
                .filter(|x| state(x) == "rejected")
                .take(20)
                .map(|x| json!({"proxy": format!("{} {}", x.identity, x.inbound_addr), "error": x.last_nack}))
                .collect();
            let (namespace, name) = r.key.split_once('/').unwrap_or(("", &r.key));
            let yaml = serde_json::from_str::<Value>(&r.json)
                .ok()
                .and_then(|v| serde_saphyr::to_string(&v).ok())
                .unwrap_or_else(|| r.json.clone());
            json!({
                "kind": r.kind, "key": r.key, "namespace": namespace, "name": name, "revision": r.revision, "yaml": yaml,
                "rollout": {"targeted": targeted.len(), "synced": n("synced"), "pending": n("pending"),
                            "rejected": n("rejected"), "disconnected": n("disconnected"), "errors": errors},
            })
        })
        .collect();
    Ok(json!({"revision": list.revision, "proxies": proxies.len(), "policies": out}))
}

/// `policy preview` of a candidate; `Err(message)` when it is not a valid policy.
/// The candidate is read as `palisadectl policy preview -f` reads a file.
pub(crate) async fn preview(c: &mut Admin, yaml: &str) -> Result<std::result::Result<Value, String>> {
    let resources = match palisade_policy::yaml::parse_text(yaml) {
        Ok(r) if r.is_empty() => return Ok(Err("the candidate holds no resource".into())),
        Ok(r) => r,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let document = serde_json::to_string(&resources)?;
    match c.preview_policy(ApplyPolicyRequest { document }).await {
        Ok(p) => {
            let p = p.into_inner();
            let changes: Vec<Value> = p.changes.iter().map(|c| json!({
                "from": c.from, "to": c.to, "method": c.method, "path": c.path, "before": c.before, "after": c.after,
                "count": c.count, "before_rule": c.before_rule, "after_rule": c.after_rule,
            })).collect();
            Ok(Ok(json!({"changes": changes, "requests_evaluated": p.requests_evaluated,
                          "window_seconds": p.window_seconds, "warnings": p.warnings})))
        }
        Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(Err(s.message().to_string())),
        Err(s) => Err(s.into()),
    }
}

/// The `authz check` explanation of one request.
pub(crate) async fn explain(c: &mut Admin, q: &HashMap<String, String>) -> Result<Value> {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let req = SimulateRequest {
        source: get("from"),
        target: get("to"),
        method: if get("method").is_empty() { "GET".into() } else { get("method") },
        path: if get("path").is_empty() { "/".into() } else { get("path") },
        // As if the request's credential verified again (the tap names its
        // principal and API key; a token's claims are not in it).
        principal: get("principal"),
        api_key: get("api_key"),
        ..Default::default()
    };
    let r = c.simulate(req).await?.into_inner();
    Ok(json!({"decision": r.decision, "policy": r.policy, "rule": r.rule, "reason": r.reason,
              "rate_limits": r.rate_limits, "cors": r.cors}))
}

fn root_json(r: &Option<CaRoot>) -> Value {
    r.as_ref()
        .map_or(Value::Null, |r| json!({"subject": r.subject, "fingerprint": r.sha256, "not_after": ms(&r.not_after)}))
}

/// The roots, the rotation, and every sidecar's certificate expiry, soonest first.
pub(crate) async fn certs(c: &mut Admin) -> Result<Value> {
    let s: CaStatus = c.get_ca_status(GetCaStatusRequest {}).await?.into_inner();
    let mut expiries: Vec<Value> = proxies(c)
        .await?
        .iter()
        .map(|p| json!({"identity": p.identity, "addr": p.inbound_addr, "not_after": ms(&p.cert_not_after)}))
        .collect();
    expiries.sort_by_key(|e| e["not_after"].as_i64().unwrap_or(i64::MAX));
    Ok(json!({
        "phase": s.phase, "detail": s.detail, "started_at": ms(&s.started_at), "phase_since": ms(&s.phase_since),
        "proxies": s.proxies, "waiting": s.waiting, "waiting_for": s.waiting_for,
        "signing": root_json(&s.signing), "old_root": root_json(&s.old_root), "new_root": root_json(&s.new_root),
        "bundle": s.bundle.iter().map(|r| root_json(&Some(r.clone()))).collect::<Vec<_>>(), "expiries": expiries,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn identities_split_into_namespace_and_name() {
        use super::split_id;
        assert_eq!(split_id("spiffe://td/ns/shop/sa/orders"), ("shop".into(), "orders".into()));
        assert_eq!(split_id("spiffe://td/workload/x"), (String::new(), "workload/x".into()));
        assert_eq!(split_id(""), (String::new(), "plaintext (no mTLS)".into()));
    }
}
