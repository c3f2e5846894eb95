//! Policy in the sidecar: the last good snapshot from the control plane,
//! compiled for this workload by the policy engine (`palisade_policy::Enforcer`:
//! all policy meaning lives there), and the client of `PolicyDiscovery.Stream`
//! that keeps it current, ACKing what it could apply and NACKing (and
//! ignoring) what it could not.
//!
//! Until a first snapshot arrives there is no enforcer and inbound traffic is
//! refused (fail closed); once one has arrived, it stays in force while the
//! control plane is away.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, SvidStore, TrustBundle};
use palisade_policy::{Decision, Enforcer, Inputs, Resource};
use palisade_proto::channel::ControlPlaneAddr;
use palisade_proto::v1::policy_discovery_client::PolicyDiscoveryClient;
use palisade_proto::v1::{DiscoveryRequest, Snapshot};
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::CertificateDer;

use crate::directory::Directory;
use crate::metrics::{DecisionLabels, Metrics};

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
}

impl InForce {
    /// Compiles a snapshot for `identity`, keeping the counters of limits
    /// that did not change from `previous`.
    pub fn compile(
        snap: &Snapshot,
        identity: &str,
        previous: Option<&InForce>,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let mut resources = Vec::new();
        for json in &snap.policies_json {
            resources.extend(Resource::parse_json(json).map_err(|e| e.to_string())?);
        }
        let inputs = Inputs {
            version: &snap.version,
            resources: &resources,
            default_allow_authenticated: snap.default_allow_authenticated,
            rate_shares: &snap.rate_shares,
        };
        let enforcer = Enforcer::compile(inputs, identity, previous.map(|p| &p.enforcer)).map_err(|e| e.to_string())?;
        let counters = |policy: &str| {
            ["allow", "deny", "audit_allow", "audit_deny"].map(|action| {
                metrics.decisions.get_or_create(&DecisionLabels { action, policy: policy.to_string() }).clone()
            })
        };
        let by_policy = enforcer.policies().iter().map(|p| counters(p)).collect();
        Ok(Self { enforcer, by_policy, default: counters("default") })
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

/// `d` give or take a quarter, so sidecars that lost the control plane
/// together do not come back in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    let spread = d / 2;
    d - d / 4 + spread.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

/// The policy in force, swapped atomically.
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    current: Arc<RwLock<Option<Arc<InForce>>>>,
}

impl PolicyState {
    pub fn current(&self) -> Option<Arc<InForce>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, e: InForce) {
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
            let reply = match InForce::compile(&snap, &identity, previous.as_deref(), &self.metrics) {
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
                    let changed = previous.as_ref().is_none_or(|p| p.enforcer.version != enforcer.enforcer.version);
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
