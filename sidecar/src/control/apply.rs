//! What the config stream holds, and how an update is applied.
//!
//! The control plane sends named resources, each with a version (a digest
//! of its content): additions and changes, and removals. The sidecar keeps
//! them ([`Held`]) for as long as it runs, across streams: a reconnect's
//! Hello names them, and the control plane sends only the difference. An
//! update is merged into what is held, then applied type by type:
//!
//! - `policy`, `settings`, `api_keys`, `jwks` -> the policy engine's
//!   enforcer ([`crate::policy`]), compiled from all four together,
//! - `service`, `address` -> the [`Directory`],
//! - `trust_bundle` -> the roots every TLS verifier of this sidecar uses.
//!
//! A type that cannot be applied is NACKed and rolled back in what is held
//! too (what is held always describes what is in force): its previous
//! version stays in force, and the other types apply.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use palisade_certs::SpiffeId;
use palisade_certs::tls::TrustBundle;
use palisade_policy::ApiKey;
use palisade_proto::v1::resource::Body;
use palisade_proto::v1::{ConfigUpdate, Hello, Resource, ResourceVersion};
use rustls_pki_types::CertificateDer;

use crate::directory::{Changes, Directory};
use crate::metrics::Metrics;
use crate::policy::{CompileError, InForce, PolicyState, Sources};
use crate::proxy::peer::Peer;

/// A policy targeting this identity (`<kind>/<namespace>/<name>`), canonical JSON.
pub const POLICY: &str = "policy";
/// Mesh defaults and this sidecar's rate shares (`mesh`).
pub const SETTINGS: &str = "settings";
/// Hashes of the API keys this sidecar may accept (`api_keys`).
pub const API_KEYS: &str = "api_keys";
/// A JWT key set its policies name (by jwksUri or issuer).
pub const JWKS: &str = "jwks";
/// The roots to trust, and a root rotation's renew hint (`roots`).
pub const TRUST_BUNDLE: &str = "trust_bundle";
/// The endpoints of a subscribed service (`<sa>.<namespace>`).
pub const SERVICE: &str = "service";
/// The service at a subscribed address (an IP), `""` when none.
pub const ADDRESS: &str = "address";

/// The types the policy in force is compiled from, together.
const POLICY_TYPES: [&str; 4] = [POLICY, SETTINGS, API_KEYS, JWKS];

/// `(type, name)`.
type Key = (String, String);

/// Why a type of an update was rejected. Its text is the reason the NACK
/// gives the control plane for that type.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An `address` resource whose name is not an IP address.
    #[error("address {name:?}: the name is not an IP address")]
    AddressName { name: String },
    /// A resource without the body its type carries.
    #[error("{kind} {name:?}: the resource does not carry a {kind} body")]
    MissingBody { kind: String, name: String },
    /// The trust bundle's roots cannot verify anything.
    #[error(transparent)]
    TrustBundle(#[from] palisade_certs::SvidError),
    /// The policy types do not compile together.
    #[error(transparent)]
    Policy(#[from] CompileError),
}

/// The types an update could not apply, and why: empty, ACK.
pub type Rejected = BTreeMap<String, ApplyError>;

/// A NACK's `rejected` field: each type rejected and the reason, as text.
pub fn nack_reasons(rejected: Rejected) -> HashMap<String, String> {
    rejected.into_iter().map(|(kind, e)| (kind, e.to_string())).collect()
}

/// The resources this sidecar holds, by type and name.
#[derive(Debug, Default)]
pub struct Held {
    resources: BTreeMap<Key, Resource>,
    /// The last policy compile failed (and no policy is in force yet, or
    /// the previous one stays): see [`Applier::apply`].
    policy_rejected: bool,
}

/// What merging one update did: the types it touched, and how to undo it.
#[derive(Debug, Default)]
struct Merged {
    touched: BTreeSet<String>,
    /// Each change in order, with what was held before (`None`: nothing).
    undo: Vec<(Key, Option<Resource>)>,
    /// Types of resources that could not be read, and why (not merged).
    rejected: Rejected,
}

impl Held {
    /// Type, name and version of every resource held, for a Hello.
    pub fn versions(&self) -> Vec<ResourceVersion> {
        self.resources
            .iter()
            .map(|((r#type, name), r)| ResourceVersion {
                r#type: r#type.clone(),
                name: name.clone(),
                version: r.version.clone(),
            })
            .collect()
    }

    /// Merges an update: removals, then additions and changes (each
    /// replacing what was held under its type and name).
    fn merge(&mut self, update: &ConfigUpdate) -> Merged {
        let mut merged = Merged::default();
        for r in &update.removed {
            let key = (r.r#type.clone(), r.name.clone());
            if let Some(old) = self.resources.remove(&key) {
                merged.touched.insert(key.0.clone());
                merged.undo.push((key, Some(old)));
            }
        }
        for r in &update.resources {
            match check(r) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(resource.type = %r.r#type, resource.name = %r.name, "ignoring a resource of a type this sidecar does not know");
                    continue;
                }
                Err(why) => {
                    merged.rejected.entry(r.r#type.clone()).or_insert(why);
                    continue;
                }
            }
            let key = (r.r#type.clone(), r.name.clone());
            merged.touched.insert(key.0.clone());
            let old = self.resources.insert(key.clone(), r.clone());
            merged.undo.push((key, old));
        }
        merged
    }

    /// Undoes what `merged` changed in resources of `types`.
    fn undo(&mut self, merged: &Merged, types: &[&str]) {
        for (key, old) in merged.undo.iter().rev().filter(|(k, _)| types.contains(&k.0.as_str())) {
            match old {
                Some(r) => self.resources.insert(key.clone(), r.clone()),
                None => self.resources.remove(key),
            };
        }
    }

    /// What the policy in force is compiled from: every policy-type
    /// resource held (policies in name order), at `version`.
    fn policy_sources(&self, version: String) -> Sources {
        let mut sources = Sources { version, ..Default::default() };
        for ((_, name), r) in &self.resources {
            match &r.body {
                Some(Body::PolicyJson(json)) => sources.policies_json.push(json.clone()),
                Some(Body::Settings(s)) => {
                    sources.default_allow_authenticated = s.default_allow_authenticated;
                    sources.rate_shares = s.rate_shares.clone();
                }
                Some(Body::ApiKeys(set)) => sources.api_keys.extend(set.keys.iter().map(|k| ApiKey {
                    name: k.name.clone(),
                    principal: k.principal.clone(),
                    sha256: k.sha256.clone(),
                    expires_at: k.expires_at,
                })),
                Some(Body::JwksJson(json)) => {
                    sources.jwks.insert(name.clone(), json.clone());
                }
                _ => {}
            }
        }
        sources
    }

    /// The trust bundle held, if any.
    fn trust_bundle(&self) -> Option<&palisade_proto::v1::TrustBundle> {
        self.resources.values().find_map(|r| match &r.body {
            Some(Body::TrustBundle(b)) if r.r#type == TRUST_BUNDLE => Some(b),
            _ => None,
        })
    }
}

/// Whether `r` carries the body its type does: `Ok(false)` for a type this
/// sidecar does not know (a newer control plane's), which is skipped. A
/// service or address without a body is the empty answer.
fn check(r: &Resource) -> Result<bool, ApplyError> {
    let fits = match (r.r#type.as_str(), &r.body) {
        (POLICY, Some(Body::PolicyJson(_)))
        | (SETTINGS, Some(Body::Settings(_)))
        | (API_KEYS, Some(Body::ApiKeys(_)))
        | (JWKS, Some(Body::JwksJson(_)))
        | (TRUST_BUNDLE, Some(Body::TrustBundle(_)))
        | (SERVICE, Some(Body::Service(_)) | None) => true,
        (ADDRESS, Some(Body::AddressService(_)) | None) => {
            if r.name.parse::<IpAddr>().is_err() {
                return Err(ApplyError::AddressName { name: r.name.clone() });
            }
            true
        }
        (POLICY | SETTINGS | API_KEYS | JWKS | TRUST_BUNDLE | SERVICE | ADDRESS, _) => false,
        _ => return Ok(false),
    };
    if fits { Ok(true) } else { Err(ApplyError::MissingBody { kind: r.r#type.clone(), name: r.name.clone() }) }
}

/// The directory's part of an update.
fn directory_changes(update: &ConfigUpdate) -> Changes {
    let mut changes = Changes::default();
    for r in &update.removed {
        match r.r#type.as_str() {
            SERVICE => changes.removed_services.push(r.name.clone()),
            ADDRESS => changes.removed_addresses.extend(r.name.parse::<IpAddr>().ok()),
            _ => {}
        }
    }
    for r in update.resources.iter().filter(|r| matches!(check(r), Ok(true))) {
        match (r.r#type.as_str(), &r.body) {
            (SERVICE, body) => {
                let endpoints = match body {
                    Some(Body::Service(s)) => s.endpoints.as_slice(),
                    _ => &[],
                };
                let peers = endpoints
                    .iter()
                    .filter_map(|e| Some(Peer { addr: e.address.parse().ok()?, identity: e.identity.parse().ok()? }))
                    .collect();
                changes.services.push((r.name.clone(), peers));
            }
            (ADDRESS, body) => {
                let Ok(ip) = r.name.parse::<IpAddr>() else { continue };
                let service = match body {
                    Some(Body::AddressService(s)) if !s.is_empty() => Some(Arc::from(s.as_str())),
                    _ => None,
                };
                changes.addresses.push((ip, service));
            }
            _ => {}
        }
    }
    changes
}

/// Everything an update configures (the config stream's parts).
#[derive(Debug)]
pub struct Applier<'a> {
    pub held: &'a Mutex<Held>,
    pub bundle: &'a TrustBundle,
    pub policy: &'a PolicyState,
    pub directory: &'a Directory,
    pub metrics: &'a Metrics,
    pub renew_unless: &'a tokio::sync::watch::Sender<Vec<CertificateDer<'static>>>,
}

impl Applier<'_> {
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream's first message: what is held, and every service and
    /// address subscribed to so far (those queued while no stream was open
    /// included).
    pub fn hello(&self, inbound_addr: &str) -> Hello {
        Hello {
            inbound_addr: inbound_addr.to_string(),
            capabilities: vec!["taps".into()],
            held: self.held().versions(),
            want: Some(self.directory.hello_want()),
        }
    }

    /// Applies an update's resources (its taps are the caller's), type by
    /// type. Returns the types rejected and why: empty, ACK.
    pub fn apply(&self, update: &ConfigUpdate, identity: &SpiffeId) -> Rejected {
        let mut held = self.held();
        let mut merged = held.merge(update);
        let mut rejected = std::mem::take(&mut merged.rejected);
        if merged.touched.contains(TRUST_BUNDLE)
            && let Err(e) = self.apply_bundle(&held)
        {
            held.undo(&merged, &[TRUST_BUNDLE]);
            rejected.insert(TRUST_BUNDLE.into(), e);
        }
        let endpoints = self.directory.update(directory_changes(update));
        self.metrics.directory_endpoints.set(endpoints as i64);

        // Compile when a policy type changed, and while no policy is in
        // force: with no policy for this identity at all, the settings alone
        // make the sidecar ready. Not after a rejected first policy, though:
        // the sidecar stays unready (fail closed) until the control plane
        // sends policies that compile, rather than enforce what is left.
        let previous = self.policy.current();
        let touched = POLICY_TYPES.iter().any(|t| merged.touched.contains(*t));
        if touched || (previous.is_none() && !held.policy_rejected) {
            let version = match (&update.policy_version, &previous) {
                (v, _) if !v.is_empty() => v.clone(),
                (_, Some(p)) => p.enforcer.version.clone(),
                (_, None) => String::new(),
            };
            let result = self.apply_policy(&held.policy_sources(version), identity, previous);
            held.policy_rejected = result.is_err();
            if let Err(e) = result {
                self.metrics.policy_nacks.inc();
                tracing::warn!(target: "audit", version = %update.policy_version, error = %e, "policy update rejected (NACK); the previous policy stays in force");
                held.undo(&merged, &POLICY_TYPES);
                rejected.insert(POLICY.into(), e);
            }
        }
        rejected
    }

    /// Replaces the roots with the bundle held (an empty one is ignored),
    /// and passes on its renew hint.
    fn apply_bundle(&self, held: &Held) -> Result<(), ApplyError> {
        let bundle = held.trust_bundle().cloned().unwrap_or_default();
        let renew: Vec<CertificateDer<'static>> =
            bundle.renew_unless_chains_to.into_iter().map(CertificateDer::from).collect();
        self.renew_unless.send_if_modified(|cur| {
            let changed = *cur != renew;
            *cur = renew;
            changed
        });
        let roots: Vec<CertificateDer<'static>> = bundle.roots_der.into_iter().map(CertificateDer::from).collect();
        if roots.is_empty() {
            return Ok(());
        }
        self.bundle.replace(&roots).map_err(|e| {
            tracing::warn!(error = %e, "ignoring an unusable trust bundle from the control plane");
            ApplyError::TrustBundle(e)
        })
    }

    fn apply_policy(
        &self,
        sources: &Sources,
        identity: &SpiffeId,
        previous: Option<Arc<InForce>>,
    ) -> Result<(), ApplyError> {
        let in_force = InForce::compile(sources, &identity.to_string(), previous.as_deref(), self.metrics)?;
        let changed = previous.as_ref().is_none_or(|p| p.enforcer.version != in_force.enforcer.version);
        // The services routes send to: their endpoints are then held before
        // the first routed request.
        self.directory.want_services(in_force.route_backends().iter().cloned());
        self.policy.set(in_force);
        // `r<revision>`, or `r<revision>-c<generation>` once credentials changed.
        let revision = sources.version.trim_start_matches('r').split('-').next().unwrap_or_default();
        self.metrics.policy_revision.set(revision.parse().unwrap_or(0));
        self.metrics
            .policy_updated
            .set(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0));
        if changed {
            tracing::info!(version = %sources.version, policies = sources.policies_json.len(), "policy applied");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
