//! `Identity.Certify`: CSR + attestation (or the current certificate, for a
//! renewal) -> X.509-SVID. Every refusal and every issuance is an `audit` event.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use palisade_certs::{CsrError, SpiffeId, ValidatedCsr};
use palisade_proto::v1::certify_request::Attestation;
use palisade_proto::v1::identity_server::Identity;
use palisade_proto::v1::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::attest::{AttestError, Attested};
use crate::directory_guard::{Allowed, Claim, DirectoryRefusal};
use crate::store::ProxyRecord;
use palisade_cmd::unix_now;

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    pub(crate) shared: Arc<Shared>,
}

/// Largest CSR accepted (a P-256 CSR is ~300 bytes).
const MAX_CSR_BYTES: usize = 16 * 1024;

fn refuse(status: Status, src: &str, claimed: &str) -> Status {
    crate::metrics::METRICS.certificate("refused", crate::metrics::code_label(status.code()));
    tracing::warn!(target: "audit", event = "certificate_refused", src.addr = %src, identity = %palisade_telemetry::Untrusted(claimed), code = ?status.code(), reason = %palisade_telemetry::Untrusted(status.message()), "refused a certificate request");
    status
}

/// A refused inbound address: the claim fails whole (no certificate), with
/// an audit line naming the identity, the address and why.
fn refuse_claim(e: DirectoryRefusal, src: &str, identity: &SpiffeId, addr: &str) -> Status {
    let status = match e {
        DirectoryRefusal::TooMany { .. } | DirectoryRefusal::RateLimited { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        DirectoryRefusal::NotSource { .. } | DirectoryRefusal::Held { .. } => Status::permission_denied(e.to_string()),
    };
    crate::metrics::METRICS.certificate("refused", crate::metrics::code_label(status.code()));
    tracing::warn!(target: "audit", event = "inbound_addr_refused", src.addr = %src, identity = %identity, inbound_addr = %addr, code = ?status.code(), reason = %status.message(), "refused an inbound address claim");
    status
}

fn attest_status(e: AttestError) -> Status {
    match e {
        AttestError::K8sDisabled => Status::failed_precondition(e.to_string()),
        AttestError::K8sUnavailable { .. } | AttestError::Store(_) => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(&self, req: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let peer_addr = req.remote_addr();
        let src = peer_addr.map(|a| a.to_string()).unwrap_or_default();
        let peer = req.peer_certs().and_then(|c| palisade_certs::tls::peer_identity(Some(&c)));
        let mut req = req.into_inner();
        let shared = &self.shared;
        let td = &shared.trust_domain;
        let claimed = peer.as_ref().map(|(id, _)| id.to_string()).unwrap_or_default();

        if req.csr_der.is_empty() || req.csr_der.len() > MAX_CSR_BYTES {
            return Err(refuse(
                Status::invalid_argument(format!(
                    "csr_der must hold a DER PKCS#10 request of 1..{MAX_CSR_BYTES} bytes"
                )),
                &src,
                &claimed,
            ));
        }
        let csr = ValidatedCsr::from_der(&req.csr_der)
            .map_err(|e| refuse(Status::invalid_argument(e.to_string()), &src, &claimed))?;
        for uri in csr.requested_uris() {
            if let Ok(id) = uri.parse::<SpiffeId>()
                && id.trust_domain() != td
            {
                return Err(refuse(
                    Status::permission_denied(format!(
                        "CSR asks for {uri} in foreign trust domain {}; this control plane issues identities in {td} only",
                        id.trust_domain()
                    )),
                    &src,
                    uri,
                ));
            }
        }
        if !req.inbound_addr.is_empty() {
            match crate::directory_guard::canonical_addr(&req.inbound_addr) {
                Some(addr) => req.inbound_addr = addr,
                None => {
                    return Err(refuse(
                        Status::invalid_argument(format!(
                            "inbound_addr {:?} is not HOST:PORT with an IP host",
                            req.inbound_addr
                        )),
                        &src,
                        &claimed,
                    ));
                }
            }
        }

        let (attested, replaces) = match req.attestation {
            Some(Attestation::JoinToken(token)) => {
                let a = shared
                    .attestors
                    .join_token
                    .attest(&token)
                    .await
                    .map_err(|e| refuse(attest_status(e), &src, &claimed))?;
                (a, None)
            }
            Some(Attestation::K8sServiceAccountToken(token)) => {
                let Some(k8s) = &shared.attestors.k8s else {
                    return Err(refuse(attest_status(AttestError::K8sDisabled), &src, &claimed));
                };
                (k8s.attest(&token).await.map_err(|e| refuse(attest_status(e), &src, &claimed))?, None)
            }
            None => match peer {
                // The TLS layer verified the chain and validity. The operator's
                // credential is re-certified under the root that signs, for its
                // own key and expiry (`palisadectl ca rotate`); otherwise only
                // workload identities may renew (not the control plane's certs).
                Some((id, info)) if id == td.admin() => return recertify_admin(shared, &csr, &id, &info, &src),
                Some((id, info)) if id.workload().is_some() && id.trust_domain() == td => {
                    (Attested { identity: id, method: "renewal", refund: None }, Some(info.serial))
                }
                Some((id, _)) => {
                    return Err(refuse(
                        Status::permission_denied(format!("{id} is not a workload identity and cannot renew")),
                        &src,
                        &claimed,
                    ));
                }
                None => {
                    return Err(refuse(
                        Status::unauthenticated(
                            "no attestation: send a join token or a Kubernetes ServiceAccount token, or renew over mTLS with a current certificate",
                        ),
                        &src,
                        &claimed,
                    ));
                }
            },
        };

        let identity = attested.identity.clone();
        // The address goes to every sidecar: it must be this caller's to name.
        let allowed = if req.inbound_addr.is_empty() {
            Allowed::default()
        } else {
            let identity_str = identity.to_string();
            // Only its identity's records and the address's matter: a claim
            // costs the same whatever the directory's size.
            let near = shared.store.proxies_near(&identity_str, &req.inbound_addr, replaces.as_deref());
            let claim = Claim {
                identity: &identity_str,
                addr: &req.inbound_addr,
                peer: peer_addr,
                replaces: replaces.as_deref(),
                rate_limited: attested.method != "token",
            };
            match shared.directory.admit(claim, &near, unix_now(), Instant::now()) {
                Ok(a) => a,
                Err(e) => {
                    if let Some(hash) = &attested.refund {
                        let _ = shared.store.refund_token(hash);
                    }
                    return Err(refuse_claim(e, &src, &identity, &req.inbound_addr));
                }
            }
        };
        let ca = shared.ca.view();
        let issued = match ca.signing.sign_csr(&csr, &identity, shared.cert_ttl) {
            Ok(c) => c,
            Err(e) => {
                if let Some(hash) = &attested.refund {
                    let _ = shared.store.refund_token(hash);
                }
                let status = match e {
                    palisade_certs::CaError::Csr(CsrError::IdentityMismatch { .. }) => {
                        Status::permission_denied(e.to_string())
                    }
                    palisade_certs::CaError::Csr(_) => Status::invalid_argument(e.to_string()),
                    _ => Status::internal("the CA could not sign the certificate; see the control plane log"),
                };
                if status.code() == tonic::Code::Internal {
                    tracing::error!(error = %e, identity = %identity, "signing failed");
                }
                return Err(refuse(status, &src, identity.to_string().as_str()));
            }
        };

        let info = &issued.info;
        let lifetime = info.not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let refresh_after = SystemTime::now() + lifetime / 2;
        let record = ProxyRecord {
            identity: identity.to_string(),
            inbound_addr: req.inbound_addr.clone(),
            peer_addr: src.clone(),
            cert_serial: info.serial.clone(),
            cert_not_after: unix_secs(info.not_after),
            last_seen: unix_now(),
            attestation: attested.method.to_string(),
            issuer: ca.signing_sha.clone(),
        };
        if allowed.take_over {
            tracing::warn!(target: "audit", event = "inbound_addr_taken_over", identity = %identity, inbound_addr = %req.inbound_addr, src.addr = %src, "a verified claim took over an address another identity's record held (its IP was reused)");
        }
        let take_over = allowed.take_over;
        match crate::store::blocking(&shared.store, move |s| s.upsert_proxy(record, replaces.as_deref(), take_over))
            .await
        {
            // A new endpoint, or one that moved: snapshots carry the directory.
            Ok(true) => shared.hub.endpoints_changed(),
            Ok(false) => {}
            // The certificate is still good; the record is best-effort.
            Err(e) => tracing::error!(error = %e, "cannot record the proxy"),
        }
        crate::metrics::METRICS.certificate("issued", attested.method);
        tracing::info!(
            target: "audit",
            event = "certificate_issued",
            identity = %identity,
            serial = %info.serial,
            not_after = %palisade_certs::svid::rfc3339::format(info.not_after),
            attestation = attested.method,
            src.addr = %src,
            "issued a workload certificate"
        );
        Ok(Response::new(CertifyResponse {
            cert_chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle_der: ca.bundle_der(),
            spiffe_id: identity.to_string(),
            not_before: Some(info.not_before.into()),
            not_after: Some(info.not_after.into()),
            refresh_after: Some(refresh_after.into()),
            serial: info.serial.clone(),
        }))
    }
}

/// An admin credential presented over mTLS, re-signed for the same key by
/// the root that signs now, valid no longer than it already was: a root rotation
/// does not lock out the operators whose credentials it did not write.
fn recertify_admin(
    shared: &Shared,
    csr: &ValidatedCsr,
    id: &SpiffeId,
    presented: &palisade_certs::SvidInfo,
    src: &str,
) -> Result<Response<CertifyResponse>, Status> {
    let view = shared.ca.view();
    // The CA that signs now: during `reissuing`, the new root.
    let issued = view.signing.recertify_csr(csr, id, presented.not_after).map_err(|e| {
        let status = match e {
            palisade_certs::CaError::Csr(_) => Status::invalid_argument(e.to_string()),
            _ => Status::failed_precondition("the credential cannot be re-certified (expired?)"),
        };
        refuse(status, src, &id.to_string())
    })?;
    let info = &issued.info;
    tracing::info!(
        target: "audit",
        event = "admin_recertified",
        identity = %id,
        serial = %info.serial,
        replaces = %presented.serial,
        not_after = %palisade_certs::svid::rfc3339::format(info.not_after),
        src.addr = %src,
        "re-certified an admin credential under the root that signs"
    );
    Ok(Response::new(CertifyResponse {
        cert_chain_der: issued.chain.iter().map(|c| c.to_vec()).collect(),
        trust_bundle_der: view.bundle_der(),
        spiffe_id: id.to_string(),
        not_before: Some(info.not_before.into()),
        not_after: Some(info.not_after.into()),
        refresh_after: Some(info.not_after.into()),
        serial: info.serial.clone(),
    }))
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}
