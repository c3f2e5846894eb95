//! The records the store keeps: what each table holds, as stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A join token as stored: never the token itself, only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    /// Public handle: the first 12 hex digits of the hash.
    pub id: String,
    pub sha256: String,
    pub identity: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub revoked: bool,
}

/// A proxy that holds (or held) a certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProxyRecord {
    pub identity: String,
    pub inbound_addr: String,
    pub peer_addr: String,
    pub cert_serial: String,
    pub cert_not_after: u64,
    pub last_seen: u64,
    pub attestation: String,
    /// SHA-256 of the CA certificate that signed it (root rotation waits on it).
    #[serde(default)]
    pub issuer: String,
}

/// A stored policy resource (canonical JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyRecord {
    pub kind: String,
    /// `namespace/name`.
    pub key: String,
    /// The store revision that last changed it.
    pub revision: u64,
    pub json: String,
}

impl PolicyRecord {
    pub(super) fn id(kind: &str, key: &str) -> String {
        format!("{kind}/{key}")
    }
}

/// An API key as stored: its SHA-256, never the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiKeyRecord {
    /// Unique name (what authorization rules match).
    pub name: String,
    pub principal: String,
    pub sha256: String,
    /// Only workloads in this namespace accept it; empty: any targeted workload.
    #[serde(default)]
    pub namespace: String,
    pub created_at: u64,
    /// 0: never expires.
    pub expires_at: u64,
    pub revoked: bool,
}

/// An OAuth client of the mesh's token service: its secret's SHA-256, never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OAuthClientRecord {
    pub client_id: String,
    pub name: String,
    pub secret_sha256: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub created_at: u64,
}

/// What applying one resource did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub record: PolicyRecord,
    /// "created", "updated" or "unchanged".
    pub change: &'static str,
    /// The JSON stored before, if any.
    pub previous: Option<String>,
}

/// What a token lookup found when it could not be used.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenRefusal {
    Unknown,
    Revoked(TokenRecord),
    Expired(TokenRecord),
    Exhausted(TokenRecord),
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct State {
    #[serde(default)]
    pub(super) tokens: BTreeMap<String, TokenRecord>,
    #[serde(default)]
    pub(super) proxies: BTreeMap<String, ProxyRecord>,
    #[serde(default)]
    pub(super) policies: BTreeMap<String, PolicyRecord>,
    #[serde(default)]
    pub(super) policy_revision: u64,
    #[serde(default)]
    pub(super) api_keys: BTreeMap<String, ApiKeyRecord>,
    #[serde(default)]
    pub(super) oauth_clients: BTreeMap<String, OAuthClientRecord>,
}

#[cfg(test)]
impl ApiKeyRecord {
    /// A live key `name` for `team/ci`, for the stores' tests.
    pub(crate) fn sample(name: &str) -> Self {
        ApiKeyRecord {
            name: name.into(),
            principal: "team/ci".into(),
            sha256: "ab".into(),
            namespace: String::new(),
            created_at: 1,
            expires_at: 0,
            revoked: false,
        }
    }
}
