//! Attestation: how a workload proves its identity for a first certificate.
//! Two attestors sit behind one trait: join tokens created by an operator,
//! and Kubernetes ServiceAccount tokens checked with a TokenReview.
//! (Renewals need no attestor: the current certificate, verified by mTLS,
//! is the proof.)

use std::sync::Arc;

use palisade_certs::{SpiffeId, TrustDomain};

pub mod join_token;
pub mod k8s;

/// Why an attestation was refused. Messages go to the caller: they name the
/// problem and the fix, never the secret.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("join token is not known to this control plane; create one with `palisadectl token create`")]
    UnknownToken,
    #[error("join token {id} was revoked; create a new one with `palisadectl token create`")]
    RevokedToken { id: String },
    #[error("join token {id} expired at {expired_at}; create a new one with `palisadectl token create`")]
    ExpiredToken { id: String, expired_at: String },
    #[error(
        "join token {id} has been used up ({uses} of {}); create a new one with `palisadectl token create`",
        palisade_cmd::plural(.uses, "use", "uses")
    )]
    ExhaustedToken { id: String, uses: u32 },
    #[error("Kubernetes attestation is not enabled on this control plane (start it with --k8s-attestation)")]
    K8sDisabled,
    #[error("Kubernetes rejected the ServiceAccount token: {reason}")]
    K8sRejected { reason: String },
    #[error("Kubernetes ServiceAccount token is for {username:?}, which is not a service account")]
    K8sNotServiceAccount { username: String },
    #[error("cannot reach the Kubernetes API for a TokenReview: {reason}")]
    K8sUnavailable { reason: String },
    #[error("state store failed: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// The attested identity and a way to undo a consumed credential.
#[derive(Debug)]
pub struct Attested {
    pub identity: SpiffeId,
    /// "token" or "k8s".
    pub method: &'static str,
    /// Token hash to refund if issuance fails after the use was taken.
    pub refund: Option<String>,
}

/// An attestation method.
#[async_trait::async_trait]
pub trait Attestor: Send + Sync + std::fmt::Debug {
    /// Checks `credential` and returns the identity it proves.
    async fn attest(&self, credential: &str) -> Result<Attested, AttestError>;
}

/// Attestors the control plane runs with.
#[derive(Debug, Clone)]
pub struct Attestors {
    pub join_token: Arc<dyn Attestor>,
    pub k8s: Option<Arc<dyn Attestor>>,
    pub trust_domain: TrustDomain,
}
