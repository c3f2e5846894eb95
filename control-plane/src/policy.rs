//! Policy on the control plane: applying resources to the store (validated
//! with the same code the sidecars use), previews and simulated decisions.
//! Sending policies to the sidecars is the push path's ([`crate::push`]).

use std::collections::HashMap;

use palisade_policy::Resource;
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
        out.push(format!("... and {} like these", palisade_cmd::plural(more, "more identity", "more identities")));
    }
    out
}

/// A JWT issuer without keys must be the mesh's own (whose keys the control plane holds).
pub(crate) fn check_issuers(shared: &Shared, resources: &[Resource]) -> Result<(), Status> {
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
