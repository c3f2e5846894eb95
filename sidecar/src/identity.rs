//! The workload identity client: generates a key in memory, sends a CSR to
//! the control plane, holds the certificate in an [`SvidStore`] (which TLS
//! listeners use as their resolver), renews at about half its lifetime with
//! jitter, and retries with exponential backoff while keeping the current
//! certificate for as long as it is valid.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade_certs::tls::{Svid, SvidStore, TrustBundle};
use palisade_certs::{SvidInfo, TrustDomain, WorkloadKey};
use palisade_proto::v1::CertifyRequest;
use palisade_proto::v1::certify_request::Attestation;
use palisade_proto::v1::identity_client::IdentityClient;
use rustls_pki_types::CertificateDer;

use crate::control::jitter;
use crate::metrics::Metrics;

/// First retry delay after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest delay between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Early renewals in a root rotation: spread over up to this at first,
/// doubling (to at most `EARLY_MAX`) while answers still come from the old root.
const EARLY_MIN: Duration = Duration::from_secs(2);
const EARLY_MAX: Duration = Duration::from_secs(30);
/// Timeout of one Certify call, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What proves our identity when we hold no valid certificate.
#[derive(Clone)]
pub enum Credential {
    JoinToken(String),
    JoinTokenFile(std::path::PathBuf),
    K8sTokenFile(std::path::PathBuf),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
            Self::JoinTokenFile(p) => write!(f, "JoinTokenFile({})", p.display()),
            Self::K8sTokenFile(p) => write!(f, "K8sTokenFile({})", p.display()),
        }
    }
}

impl Credential {
    fn attestation(&self) -> Result<Attestation, IdentityError> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| IdentityError::Credential(format!("cannot read {}: {e}", p.display())))
        };
        Ok(match self {
            Self::JoinToken(t) => Attestation::JoinToken(t.trim().to_string()),
            Self::JoinTokenFile(p) => Attestation::JoinToken(read(p)?),
            Self::K8sTokenFile(p) => Attestation::K8sServiceAccountToken(read(p)?),
        })
    }
}

/// Why one attempt to get a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Connect(#[from] palisade_proto::channel::ChannelError),
    #[error("control plane refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("attestation credential: {0}")]
    Credential(String),
    #[error("control plane answer is unusable: {0}")]
    BadResponse(String),
    #[error("key: {0}")]
    Key(#[from] palisade_certs::CsrError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Drives certification and renewal.
#[derive(Debug, Clone)]
pub struct IdentityClientTask {
    /// The one way to the control plane (renewals ride its shared channel).
    pub control: Arc<crate::control::ControlPlane>,
    /// Roots to verify an issued chain against before using it.
    pub bundle: TrustBundle,
    pub trust_domain: TrustDomain,
    pub credential: Credential,
    pub inbound_addr: String,
    pub store: SvidStore,
    pub metrics: Arc<Metrics>,
    /// During a root rotation, the roots our certificate must chain to; if
    /// it does not, renew now rather than at half its lifetime.
    pub renew_unless: tokio::sync::watch::Receiver<Vec<CertificateDer<'static>>>,
}

impl IdentityClientTask {
    /// Runs forever: certify, sleep until renewal, renew; back off on failure.
    pub async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut early = EARLY_MIN;
        loop {
            let wait = match self.certify_once().await {
                Ok(svid) => {
                    backoff = BACKOFF_MIN;
                    let wait = renewal_delay(&svid.info, SystemTime::now());
                    tracing::info!(
                        identity = %svid.id,
                        serial = %svid.info.serial,
                        not_after = %palisade_certs::svid::rfc3339::format(svid.info.not_after),
                        renew_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())),
                        "obtained workload certificate"
                    );
                    self.install(svid);
                    if !self.rotated_away(&self.renew_unless.borrow()) {
                        early = EARLY_MIN;
                    }
                    wait
                }
                Err(e) => {
                    self.metrics.renewal_failures.inc();
                    let current = self.store.valid();
                    let left = current.as_ref().map(|s| s.info.time_left(SystemTime::now()));
                    match left {
                        Some(left) => {
                            tracing::warn!(error = %e, cert_time_left = %humantime::format_duration(Duration::from_secs(left.as_secs())), retry_in = ?backoff, "certificate renewal failed; keeping the current certificate")
                        }
                        None => match (&e, &self.credential) {
                            (
                                IdentityError::Refused { code: tonic::Code::Unauthenticated, .. },
                                Credential::JoinTokenFile(f),
                            ) => {
                                tracing::error!(error = %e, retry_in = ?backoff, fix = %format!("write a new token (palisadectl token create) into {}: it is read again on every attempt", f.display()), "cannot obtain a workload certificate")
                            }
                            _ => {
                                tracing::error!(error = %e, retry_in = ?backoff, "cannot obtain a workload certificate")
                            }
                        },
                    }
                    // While the current cert is valid, retry at least three
                    // times before it expires, whatever the backoff says.
                    let cap = left.map(|l| (l / 3).max(BACKOFF_MIN)).unwrap_or(BACKOFF_MAX);
                    let wait = jitter(backoff.min(cap), 0.2);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                }
            };
            self.refresh_validity_gauge();
            let mut renew_unless = self.renew_unless.clone();
            // Wake early enough to notice expiry in the gauge.
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if self.rotated_away(&renew_unless.borrow_and_update()) {
                    // Spread the renewals of a whole mesh over a few seconds; a
                    // replica that has not seen the rotation yet answers from
                    // the old root, so back off between tries, but never past
                    // the renewal the certificate's lifetime calls for.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let delay = jitter(early, 1.0).max(Duration::from_millis(50)).min(left);
                    early = (early * 2).min(EARLY_MAX);
                    tracing::info!(renew_in = ?delay, "the mesh's root is rotating and our certificate is from another root: renewing early");
                    tokio::time::sleep(delay).await;
                    break;
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                let step = (deadline - now).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(step) => {}
                    _ = renew_unless.changed() => {}
                }
                self.refresh_validity_gauge();
            }
        }
    }

    /// Whether a rotation asks for a certificate from another root than ours.
    fn rotated_away(&self, roots: &[CertificateDer<'static>]) -> bool {
        let Some(current) = self.store.valid() else { return false };
        if roots.is_empty() {
            return false;
        }
        match palisade_certs::svid::root_store(roots) {
            Ok(store) => {
                palisade_certs::svid::verify_chain(&current.certified.cert, &store, SystemTime::now()).is_err()
            }
            Err(_) => false,
        }
    }

    fn refresh_validity_gauge(&self) {
        self.metrics.cert_valid.set(i64::from(self.store.valid().is_some()));
    }

    fn install(&self, svid: Svid) {
        self.metrics.renewals.inc();
        self.metrics.cert_expiry.set(unix(svid.info.not_after) as i64);
        self.metrics.control_plane_last_success.set(unix(SystemTime::now()) as i64);
        self.store.set(svid);
    }

    /// One Certify call: renewal over mTLS if we hold a valid cert, else attestation.
    pub async fn certify_once(&self) -> Result<Svid, IdentityError> {
        let current = self.store.valid();
        let attestation = match current {
            Some(_) => None,
            None => Some(self.credential.attestation()?),
        };
        // Renewals go over the shared channel, which presents the certificate
        // we hold now; a first attestation goes over a connection without one.
        let channel = match current {
            Some(_) => self.control.channel().await?,
            None => None,
        };
        let channel = match channel {
            Some(c) => c,
            None => self.control.anonymous().await?,
        };
        let key = WorkloadKey::generate()?;
        let csr = key.csr_der(current.as_ref().map(|s| &s.id))?;
        let mut client = IdentityClient::new(channel);
        let call =
            client.certify(CertifyRequest { csr_der: csr, attestation, inbound_addr: self.inbound_addr.clone() });
        let resp = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => {
                if s.code() == tonic::Code::Unavailable {
                    self.control.reset().await;
                } else if current.is_none() {
                    // A first attestation refused: the next attempt asks
                    // another replica (a lagging one may not know the token yet).
                    self.control.failover();
                }
                return Err(IdentityError::Refused { code: s.code(), message: s.message().to_string() });
            }
            Err(_) => {
                self.control.reset().await;
                return Err(IdentityError::Refused {
                    code: tonic::Code::DeadlineExceeded,
                    message: "no answer".into(),
                });
            }
        };

        let chain: Vec<CertificateDer<'static>> = resp.cert_chain_der.into_iter().map(CertificateDer::from).collect();
        let bundle: Vec<CertificateDer<'static>> =
            resp.trust_bundle_der.into_iter().map(CertificateDer::from).collect();
        let leaf = chain.first().ok_or_else(|| IdentityError::BadResponse("empty certificate chain".into()))?;
        let (id, info) = SvidInfo::parse_svid(leaf).map_err(|e| IdentityError::BadResponse(e.to_string()))?;
        if id.trust_domain() != &self.trust_domain || id.workload().is_none() {
            return Err(IdentityError::BadResponse(format!(
                "issued identity {id} is not a workload identity in {}",
                self.trust_domain
            )));
        }
        if let Some(cur) = &current
            && cur.id != id
        {
            return Err(IdentityError::BadResponse(format!("renewal changed our identity from {} to {id}", cur.id)));
        }
        let roots = palisade_certs::svid::root_store(&bundle).map_err(|e| IdentityError::BadResponse(e.to_string()))?;
        palisade_certs::svid::verify_chain(&chain, &roots, SystemTime::now())
            .map_err(|e| IdentityError::BadResponse(e.to_string()))?;
        let certified = key.certified(chain)?;
        certified
            .keys_match()
            .map_err(|e| IdentityError::BadResponse(format!("certificate is not for our key: {e}")))?;
        // The bundle itself is replaced from one place only: the config stream.
        Ok(Svid { certified, info, id })
    }
}

/// Renew at 50% of the lifetime, ±10% jitter so replicas do not renew in step.
fn renewal_delay(info: &SvidInfo, now: SystemTime) -> Duration {
    // Measured from now, not notBefore: notBefore is backdated for clock skew.
    let left = info.time_left(now);
    jitter(left / 2, 0.2)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(100), 0.2);
            assert!(d >= Duration::from_secs(90) && d <= Duration::from_secs(110), "{d:?}");
        }
    }
}
