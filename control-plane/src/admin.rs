//! The `Admin` service: join tokens, proxies, status. Every call requires the
//! admin client certificate (`spiffe://<td>/palisade/admin`).

use std::sync::Arc;
use std::time::Duration;

use palisade_certs::SpiffeId;
use palisade_proto::v1::admin_server::Admin;
use palisade_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::attest::join_token;
use crate::store::TokenRecord;

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    pub(crate) shared: Arc<Shared>,
}

/// Most uses one join token may grant.
const MAX_TOKEN_USES: u32 = 10_000;
/// Longest join token lifetime.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);

fn token_info(t: &TokenRecord) -> JoinTokenInfo {
    JoinTokenInfo {
        id: t.id.clone(),
        identity: t.identity.clone(),
        created_at: palisade_proto::unix_timestamp(t.created_at),
        expires_at: palisade_proto::unix_timestamp(t.expires_at),
        uses_total: t.uses_total,
        uses_left: t.uses_left,
        revoked: t.revoked,
    }
}

/// Runs blocking work (store writes, parsing large documents) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// How long an API key change waits for the connected sidecars to run it.
const CREDENTIALS_PUSH_WAIT: Duration = Duration::from_secs(2);

impl AdminService {
    /// Pushes a credentials change and waits until the connected sidecars
    /// run it, so a key works (or is refused) everywhere once the call returns.
    async fn credentials_pushed(&self) {
        let generation = self.shared.hub.credentials_changed();
        if !self.shared.hub.settled(generation, CREDENTIALS_PUSH_WAIT).await {
            tracing::warn!(
                generation,
                "some sidecars have not applied the API key change yet; they will when they reconnect"
            );
        }
    }

    /// The caller must present the admin certificate; returns its facts.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(SpiffeId, palisade_certs::SvidInfo), Status> {
        let src = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        match req.peer_certs().and_then(|c| palisade_certs::tls::peer_identity(Some(&c))) {
            Some((id, info)) if id == self.shared.trust_domain.admin() => {
                crate::metrics::METRICS
                    .admin_requests
                    .get_or_create(&crate::metrics::ResultLabel { result: "authorized" })
                    .inc();
                Ok((id, info))
            }
            Some((id, _)) => {
                crate::metrics::METRICS
                    .admin_requests
                    .get_or_create(&crate::metrics::ResultLabel { result: "refused" })
                    .inc();
                tracing::warn!(target: "audit", event = "admin_denied", src.addr = %src, src.identity = %id, "Admin API call without the admin identity");
                Err(Status::permission_denied(format!(
                    "{id} may not use the Admin API; use the admin credential from <data-dir>/admin/"
                )))
            }
            None => {
                crate::metrics::METRICS
                    .admin_requests
                    .get_or_create(&crate::metrics::ResultLabel { result: "refused" })
                    .inc();
                tracing::warn!(target: "audit", event = "admin_denied", src.addr = %src, "Admin API call without a client certificate");
                Err(Status::unauthenticated(
                    "the Admin API requires the admin client certificate; point palisadectl --credentials at <data-dir>/admin/",
                ))
            }
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let td = &self.shared.trust_domain;
        let identity = SpiffeId::parse_workload(&req.identity).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if identity.trust_domain() != td {
            return Err(Status::invalid_argument(format!(
                "identity {identity} is in trust domain {}, but this control plane issues identities in {td}",
                identity.trust_domain()
            )));
        }
        let ttl = match req.ttl_seconds {
            0 => self.shared.join_token_ttl,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument("ttl must be at most 30 days (720h)"));
        }
        let uses = req.uses.max(1);
        if uses > MAX_TOKEN_USES {
            return Err(Status::invalid_argument(format!("uses must be at most {MAX_TOKEN_USES}")));
        }
        let (store, id) = (self.shared.store.clone(), identity.clone());
        let token = blocking(move || join_token::create(store.as_ref(), &id, ttl, uses)).await.map_err(|e| {
            tracing::error!(error = %e, "cannot store a join token");
            Status::unavailable("cannot persist the token; see the control plane log")
        })?;
        tracing::info!(target: "audit", event = "join_token_created", token.id = %token.record.id, identity = %identity, uses, ttl_s = ttl.as_secs(), "created a join token");
        Ok(Response::new(CreateJoinTokenResponse { info: Some(token_info(&token.record)), token: token.secret }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<ListJoinTokensRequest>,
    ) -> Result<Response<ListJoinTokensResponse>, Status> {
        self.authorize(&req)?;
        let mut tokens: Vec<_> = self.shared.store.tokens().iter().map(token_info).collect();
        tokens.sort_by(|a, b| {
            a.created_at
                .as_ref()
                .map(|t| t.seconds)
                .cmp(&b.created_at.as_ref().map(|t| t.seconds))
                .then(a.id.cmp(&b.id))
        });
        Ok(Response::new(ListJoinTokensResponse { tokens }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<RevokeJoinTokenRequest>,
    ) -> Result<Response<RevokeJoinTokenResponse>, Status> {
        self.authorize(&req)?;
        let id = req.into_inner().id;
        let store = self.shared.store.clone();
        let revoke = id.clone();
        match blocking(move || store.revoke_token(&revoke)).await {
            Ok(Some(t)) => {
                tracing::info!(target: "audit", event = "join_token_revoked", token.id = %id, identity = %t.identity, "revoked a join token");
                Ok(Response::new(RevokeJoinTokenResponse { info: Some(token_info(&t)) }))
            }
            Ok(None) => {
                Err(Status::not_found(format!("no join token with id {id:?}; list them with `palisadectl token list`")))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot revoke a join token");
                Err(Status::unavailable("cannot persist the revocation; see the control plane log"))
            }
        }
    }

    async fn list_proxies(&self, req: Request<ListProxiesRequest>) -> Result<Response<ListProxiesResponse>, Status> {
        self.authorize(&req)?;
        let mut status = self.shared.hub.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Proxies connected to other replicas (a replicated store), where this one has no word of its own.
        for (key, s) in crate::push::remote_statuses(&self.shared) {
            let here = status.get(&key).is_some_and(|l| l.connected);
            if !here {
                status.insert(key, s);
            }
        }
        let mut proxies: Vec<ProxyInfo> = self
            .shared
            .store
            .proxies()
            .into_iter()
            .map(|p| {
                let sync =
                    status.get(&crate::push::status_key(&p.identity, &p.inbound_addr)).cloned().unwrap_or_default();
                ProxyInfo {
                    policy_version: sync.acked.clone(),
                    sync_state: if sync.identity.is_empty() { String::new() } else { sync.state().to_string() },
                    last_nack: sync.last_nack.clone(),
                    policy_revision_evaluated: sync.evaluated,
                    identity: p.identity,
                    inbound_addr: p.inbound_addr,
                    peer_addr: p.peer_addr,
                    cert_serial: p.cert_serial,
                    cert_not_after: palisade_proto::unix_timestamp(p.cert_not_after),
                    last_seen: palisade_proto::unix_timestamp(p.last_seen),
                    attestation: p.attestation,
                }
            })
            .collect();
        proxies.sort_by(|a, b| a.identity.cmp(&b.identity).then(a.inbound_addr.cmp(&b.inbound_addr)));
        Ok(Response::new(ListProxiesResponse { proxies }))
    }

    async fn get_status(&self, req: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        let (caller, caller_info) = self.authorize(&req)?;
        let view = self.shared.ca.view();
        let ca = view.signing.info();
        Ok(Response::new(GetStatusResponse {
            trust_domain: self.shared.trust_domain.to_string(),
            ca_subject: ca.subject.clone(),
            ca_not_after: Some(ca.not_after.into()),
            trust_bundle_der: view.bundle_der(),
            cert_ttl_seconds: self.shared.cert_ttl.as_secs(),
            caller_identity: caller.to_string(),
            caller_cert_not_after: Some(caller_info.not_after.into()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            oauth_issuer: self.shared.oauth.as_ref().map(|o| o.issuer().to_string()).unwrap_or_default(),
        }))
    }

    async fn apply_policy(&self, req: Request<ApplyPolicyRequest>) -> Result<Response<ApplyPolicyResponse>, Status> {
        self.authorize(&req)?;
        // Parsing, validating and writing the store block: off the async threads.
        let (shared, document) = (self.shared.clone(), req.into_inner().document);
        let (_, applied, warnings) = blocking(move || crate::policy::apply(&shared, &document, false)).await?;
        Ok(Response::new(ApplyPolicyResponse { applied, warnings }))
    }

    async fn validate_policy(&self, req: Request<ApplyPolicyRequest>) -> Result<Response<ApplyPolicyResponse>, Status> {
        self.authorize(&req)?;
        let (shared, document) = (self.shared.clone(), req.into_inner().document);
        let (_, applied, warnings) = blocking(move || crate::policy::apply(&shared, &document, true)).await?;
        Ok(Response::new(ApplyPolicyResponse { applied, warnings }))
    }

    async fn get_policy(&self, req: Request<GetPolicyRequest>) -> Result<Response<PolicyRecord>, Status> {
        self.authorize(&req)?;
        let r = policy_ref(req.into_inner())?;
        self.shared
            .store
            .policies()
            .1
            .into_iter()
            .find(|p| p.kind == r.kind && p.key == r.key)
            .map(|p| Response::new(PolicyRecord { kind: p.kind, key: p.key, revision: p.revision, json: p.json }))
            .ok_or_else(|| {
                Status::not_found(format!("no {} {}; list them with `palisadectl policy list`", r.kind, r.key))
            })
    }

    async fn list_policies(&self, req: Request<ListPoliciesRequest>) -> Result<Response<ListPoliciesResponse>, Status> {
        self.authorize(&req)?;
        let (revision, all) = self.shared.store.policies();
        let policies = all
            .into_iter()
            .map(|p| PolicyRecord { kind: p.kind, key: p.key, revision: p.revision, json: p.json })
            .collect();
        Ok(Response::new(ListPoliciesResponse { policies, revision }))
    }

    async fn delete_policy(&self, req: Request<GetPolicyRequest>) -> Result<Response<DeletePolicyResponse>, Status> {
        self.authorize(&req)?;
        let r = policy_ref(req.into_inner())?;
        let (store, kind, key) = (self.shared.store.clone(), r.kind.clone(), r.key.clone());
        match blocking(move || store.delete_policy(&kind, &key)).await {
            Ok(Some(revision)) => {
                tracing::info!(target: "audit", event = "policy_deleted", kind = %r.kind, policy = %r.key, revision, "policy deleted");
                self.shared.hub.policies_changed();
                Ok(Response::new(DeletePolicyResponse { revision }))
            }
            Ok(None) => {
                Err(Status::not_found(format!("no {} {}; list them with `palisadectl policy list`", r.kind, r.key)))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot delete a policy");
                Err(Status::unavailable("cannot persist the deletion; see the control plane log"))
            }
        }
    }

    type TapStream = tokio_stream::wrappers::ReceiverStream<Result<TapEvent, Status>>;

    async fn tap(&self, req: Request<TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        let (by, _) = self.authorize(&req)?;
        let rx = self.shared.observe.start_tap(req.get_ref(), &by.to_string())?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn preview_policy(
        &self,
        req: Request<ApplyPolicyRequest>,
    ) -> Result<Response<PreviewPolicyResponse>, Status> {
        self.authorize(&req)?;
        let (shared, document) = (self.shared.clone(), req.into_inner().document);
        Ok(Response::new(blocking(move || crate::explain::preview(&shared, &document)).await?))
    }

    async fn rotate_ca(&self, req: Request<RotateCaRequest>) -> Result<Response<CaStatus>, Status> {
        let (caller, _) = self.authorize(&req)?;
        let mut req = req.into_inner();
        const MAX_MIN_PHASE: u64 = 86400;
        if req.min_phase_seconds > MAX_MIN_PHASE {
            return Err(Status::invalid_argument(format!("min_phase_seconds: at most {MAX_MIN_PHASE}")));
        }
        let shared = self.shared.clone();
        let given = !req.new_root_cert_pem.is_empty() || !req.new_root_key_pem.is_empty();
        const MAX_PEM: usize = 64 * 1024;
        if req.new_root_cert_pem.len() > MAX_PEM || req.new_root_key_pem.len() > MAX_PEM {
            return Err(Status::invalid_argument(format!(
                "new_root_cert_pem, new_root_key_pem: at most {MAX_PEM} bytes"
            )));
        }
        let result = match (req.generate, given, req.abort) {
            (true, false, false) | (false, true, false) => {
                let new = if given {
                    let key = palisade_certs::SecretPem::new(std::mem::take(&mut req.new_root_key_pem));
                    // The message names the certificate or key problem, never the key.
                    let ca = palisade_certs::CertificateAuthority::from_pem(&req.new_root_cert_pem, key, None)
                        .map_err(|e| Status::invalid_argument(format!("the new root: {e}")))?;
                    Some(ca)
                } else {
                    None
                };
                let min = Duration::from_secs(req.min_phase_seconds);
                blocking(move || shared.ca.start(min, new)).await
            }
            (false, false, true) => blocking(move || shared.ca.abort()).await,
            _ => {
                return Err(Status::invalid_argument(
                    "set exactly one of generate, new_root_cert_pem (with new_root_key_pem) and abort",
                ));
            }
        };
        result.map_err(|e| match e {
            crate::ca::RotateError::Precondition(m) => Status::failed_precondition(m),
            crate::ca::RotateError::Conflict => Status::aborted(e.to_string()),
            crate::ca::RotateError::Store(e) => {
                tracing::error!(error = %e, "cannot store the CA rotation");
                Status::unavailable("cannot persist the rotation; see the control plane log")
            }
            crate::ca::RotateError::Generate(m) => Status::internal(m),
            crate::ca::RotateError::Invalid(m) => Status::invalid_argument(m),
        })?;
        tracing::info!(target: "audit", event = if req.abort { "ca_rotation_abort_requested" } else { "ca_rotation_requested" }, src.identity = %caller, "root CA rotation requested");
        // The view changed here: push the new bundle now, not at the next tick.
        self.shared.hub.credentials_changed();
        Ok(Response::new(crate::ca::status(&self.shared)))
    }

    async fn get_ca_status(&self, req: Request<GetCaStatusRequest>) -> Result<Response<CaStatus>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(crate::ca::status(&self.shared)))
    }

    async fn stat(&self, req: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let window = match req.window_seconds {
            0 => 60,
            w @ 1..=600 => w,
            _ => return Err(Status::invalid_argument("window_seconds: at most 600")),
        };
        if req.identity.len() > 1024 {
            return Err(Status::invalid_argument("identity: at most 1024 characters"));
        }
        let window = Duration::from_secs(u64::from(window));
        let mut workloads = self.shared.observe.stat(&req.identity, window);
        if req.series {
            self.shared.observe.add_series(&mut workloads);
        }
        let edges = self.shared.observe.edges(&req.identity, window);
        Ok(Response::new(StatResponse { workloads, edges }))
    }

    async fn simulate(&self, req: Request<SimulateRequest>) -> Result<Response<SimulateResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(crate::explain::simulate(&self.shared, &req.into_inner())?))
    }

    async fn simulate_route(
        &self,
        req: Request<SimulateRouteRequest>,
    ) -> Result<Response<SimulateRouteResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(crate::explain::simulate_route(&self.shared, &req.into_inner())?))
    }

    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        self.authorize(&req)?;
        let (shared, req) = (self.shared.clone(), req.into_inner());
        let created = blocking(move || crate::credentials::create_api_key(&shared, req)).await?;
        self.credentials_pushed().await;
        Ok(Response::new(created))
    }

    async fn list_api_keys(&self, req: Request<ListApiKeysRequest>) -> Result<Response<ListApiKeysResponse>, Status> {
        self.authorize(&req)?;
        let keys = self.shared.store.api_keys().iter().map(crate::credentials::key_info).collect();
        Ok(Response::new(ListApiKeysResponse { keys }))
    }

    async fn revoke_api_key(&self, req: Request<RevokeApiKeyRequest>) -> Result<Response<ApiKeyInfo>, Status> {
        self.authorize(&req)?;
        let (shared, name) = (self.shared.clone(), req.into_inner().name);
        let revoked = blocking(move || crate::credentials::revoke_api_key(&shared, &name)).await?;
        self.credentials_pushed().await;
        Ok(Response::new(revoked))
    }

    async fn create_o_auth_client(
        &self,
        req: Request<CreateOAuthClientRequest>,
    ) -> Result<Response<CreateOAuthClientResponse>, Status> {
        self.authorize(&req)?;
        let (shared, req) = (self.shared.clone(), req.into_inner());
        Ok(Response::new(blocking(move || crate::credentials::create_oauth_client(&shared, req)).await?))
    }

    async fn list_o_auth_clients(
        &self,
        req: Request<ListOAuthClientsRequest>,
    ) -> Result<Response<ListOAuthClientsResponse>, Status> {
        self.authorize(&req)?;
        let clients = self.shared.store.oauth_clients().iter().map(crate::credentials::client_info).collect();
        Ok(Response::new(ListOAuthClientsResponse { clients }))
    }

    async fn delete_o_auth_client(
        &self,
        req: Request<DeleteOAuthClientRequest>,
    ) -> Result<Response<OAuthClientInfo>, Status> {
        self.authorize(&req)?;
        let (shared, id) = (self.shared.clone(), req.into_inner().client_id);
        Ok(Response::new(blocking(move || crate::credentials::delete_oauth_client(&shared, &id)).await?))
    }
}

/// A policy reference as users type it: the kind in any case, plural or
/// short (`authorizationpolicy`, `ap`), and the key as `NAMESPACE/NAME`.
fn policy_ref(r: GetPolicyRequest) -> Result<GetPolicyRequest, Status> {
    let kind = palisade_policy::canonical_kind(&r.kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown policy kind {:?}; use {} (any case; plural and short names ap, rlp, authn, tp work too)",
            r.kind,
            palisade_policy::KINDS.join(" or ")
        ))
    })?;
    match r.key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(GetPolicyRequest { kind: kind.to_string(), key: r.key })
        }
        _ => {
            Err(Status::invalid_argument(format!("policy key {:?} is not NAMESPACE/NAME, e.g. shop/web-reads", r.key)))
        }
    }
}
