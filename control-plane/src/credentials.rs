//! Request credentials the control plane manages: API keys and the OAuth
//! clients of the mesh's token service. Both are random 256-bit secrets,
//! returned once at creation and stored only as SHA-256 hashes; sidecars
//! receive the hashes of the API keys they may accept, nothing else.

use std::time::Duration;

use palisade_proto::v1::{
    ApiKeyHash, ApiKeyInfo, CreateApiKeyRequest, CreateApiKeyResponse, CreateOAuthClientRequest,
    CreateOAuthClientResponse, OAuthClientInfo,
};
use tonic::Status;

use crate::Shared;
use crate::oauth::random_b64;
use crate::store::{ApiKeyRecord, OAuthClientRecord, StoreError};
use palisade_cmd::{hex, unix_now};

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("invariant: the system RNG works");
    b
}

/// Longest API key lifetime.
const MAX_KEY_TTL: Duration = Duration::from_secs(365 * 86400);

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

fn store_error(e: StoreError) -> Status {
    tracing::error!(error = %e, "cannot store a credential");
    Status::unavailable("cannot persist the change; see the control plane log")
}

/// The public facts of an API key.
pub(crate) fn key_info(k: &ApiKeyRecord) -> ApiKeyInfo {
    ApiKeyInfo {
        name: k.name.clone(),
        principal: k.principal.clone(),
        namespace: k.namespace.clone(),
        created_at: palisade_proto::unix_timestamp(k.created_at),
        expires_at: (k.expires_at != 0).then(|| palisade_proto::unix_timestamp(k.expires_at)).flatten(),
        revoked: k.revoked,
    }
}

/// The public facts of an OAuth client.
pub(crate) fn client_info(c: &OAuthClientRecord) -> OAuthClientInfo {
    OAuthClientInfo {
        client_id: c.client_id.clone(),
        name: c.name.clone(),
        scopes: c.scopes.clone(),
        audiences: c.audiences.clone(),
        created_at: palisade_proto::unix_timestamp(c.created_at),
    }
}

/// Creates an API key; the key itself is in the response only.
pub(crate) fn create_api_key(shared: &Shared, req: CreateApiKeyRequest) -> Result<CreateApiKeyResponse, Status> {
    if !name_ok(&req.name) {
        return Err(Status::invalid_argument(format!(
            "name {:?}: use lowercase letters, digits, '-', '_' and '.', at most 63, starting with a letter or digit",
            req.name
        )));
    }
    if req.principal.is_empty() || req.principal.len() > 256 || req.principal.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "principal: name who the key's requests act as (e.g. team/ci); at most 256 characters",
        ));
    }
    if !req.namespace.is_empty() && !name_ok(&req.namespace) {
        return Err(Status::invalid_argument(format!("namespace {:?} is not a namespace name", req.namespace)));
    }
    let ttl = Duration::from_secs(req.ttl_seconds);
    if ttl > MAX_KEY_TTL {
        return Err(Status::invalid_argument("expires: at most 365 days"));
    }
    let key = format!("pal_{}", random_b64(32));
    let now = unix_now();
    let record = ApiKeyRecord {
        name: req.name.clone(),
        principal: req.principal,
        sha256: hex(&palisade_policy::authn::sha256(key.as_bytes())),
        namespace: req.namespace,
        created_at: now,
        expires_at: if req.ttl_seconds == 0 { 0 } else { now + req.ttl_seconds },
        revoked: false,
    };
    if !shared.store.put_api_key(record.clone()).map_err(store_error)? {
        return Err(Status::already_exists(format!(
            "an API key named {:?} exists (revoked keys keep their name); choose another name",
            req.name
        )));
    }
    tracing::info!(target: "audit", event = "api_key_created", name = %record.name, principal = %record.principal, namespace = %record.namespace, expires_at = record.expires_at, "API key created");
    Ok(CreateApiKeyResponse { key, info: Some(key_info(&record)) })
}

/// Revokes an API key: every sidecar refuses it once its next snapshot lands.
pub(crate) fn revoke_api_key(shared: &Shared, name: &str) -> Result<ApiKeyInfo, Status> {
    match shared.store.revoke_api_key(name).map_err(store_error)? {
        Some(k) => {
            tracing::info!(target: "audit", event = "api_key_revoked", name = %k.name, principal = %k.principal, "API key revoked");
            Ok(key_info(&k))
        }
        None => Err(Status::not_found(format!("no API key named {name:?}; list them with `palisadectl apikey list`"))),
    }
}

/// The hashes of the keys a workload may accept: live keys of its namespace, or of none.
pub(crate) fn api_keys_for(shared: &Shared, identity: &str) -> Vec<ApiKeyHash> {
    let ns = identity.split("/ns/").nth(1).and_then(|r| r.split('/').next()).unwrap_or("");
    let now = unix_now();
    let mut out: Vec<ApiKeyHash> = shared
        .store
        .api_keys()
        .into_iter()
        .filter(|k| !k.revoked && (k.expires_at == 0 || k.expires_at > now))
        .filter(|k| k.namespace.is_empty() || k.namespace == ns)
        .map(|k| ApiKeyHash { name: k.name, principal: k.principal, sha256: k.sha256, expires_at: k.expires_at })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Creates an OAuth client; the secret is in the response only.
pub(crate) fn create_oauth_client(
    shared: &Shared,
    req: CreateOAuthClientRequest,
) -> Result<CreateOAuthClientResponse, Status> {
    if shared.oauth.is_none() {
        return Err(Status::failed_precondition(
            "the mesh's token service is off: start the control plane with --oauth-listen HOST:PORT",
        ));
    }
    if !name_ok(&req.name) {
        return Err(Status::invalid_argument(format!(
            "name {:?}: use lowercase letters, digits, '-', '_' and '.', at most 63",
            req.name
        )));
    }
    // RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    let scope_ok = |s: &String| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
    };
    if req.scopes.len() > 32 || !req.scopes.iter().all(scope_ok) {
        return Err(Status::invalid_argument(
            "scopes: at most 32, each printable ASCII without spaces, quotes or backslashes",
        ));
    }
    let aud_ok = |a: &String| !a.is_empty() && a.len() <= 256 && !a.chars().any(|c| c.is_control() || c == ' ');
    if req.audiences.len() > 16 || !req.audiences.iter().all(aud_ok) {
        return Err(Status::invalid_argument("audiences: at most 16, each without spaces"));
    }
    let secret = format!("pcs_{}", random_b64(32));
    let record = OAuthClientRecord {
        // Not a secret: hex, so that logs and tools show it plainly.
        client_id: format!("pc-{}", hex(&random_bytes::<10>())),
        name: req.name.clone(),
        secret_sha256: hex(&palisade_policy::authn::sha256(secret.as_bytes())),
        scopes: req.scopes,
        audiences: req.audiences,
        created_at: unix_now(),
    };
    if !shared.store.put_oauth_client(record.clone()).map_err(store_error)? {
        return Err(Status::already_exists(format!(
            "an OAuth client named {:?} exists; choose another name",
            req.name
        )));
    }
    tracing::info!(target: "audit", event = "oauth_client_created", client_id = %record.client_id, name = %record.name, scopes = ?record.scopes, audiences = ?record.audiences, "OAuth client created");
    Ok(CreateOAuthClientResponse {
        client_id: record.client_id.clone(),
        client_secret: secret,
        info: Some(client_info(&record)),
    })
}

/// Deletes an OAuth client by id or name: its secret stops working at once
/// (tokens it already holds live until they expire).
pub(crate) fn delete_oauth_client(shared: &Shared, id_or_name: &str) -> Result<OAuthClientInfo, Status> {
    let id = shared
        .store
        .oauth_clients()
        .into_iter()
        .find(|c| c.client_id == id_or_name || c.name == id_or_name)
        .map(|c| c.client_id)
        .ok_or_else(|| {
            Status::not_found(format!("no OAuth client {id_or_name:?}; list them with `palisadectl oauth client list`"))
        })?;
    match shared.store.delete_oauth_client(&id).map_err(store_error)? {
        Some(c) => {
            tracing::info!(target: "audit", event = "oauth_client_deleted", client_id = %c.client_id, name = %c.name, "OAuth client deleted");
            Ok(client_info(&c))
        }
        None => Err(Status::not_found(format!("no OAuth client {id_or_name:?}"))),
    }
}
