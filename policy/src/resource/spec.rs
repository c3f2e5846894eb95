//! The spec of each policy kind: `AuthorizationPolicy`, `RateLimitPolicy`
//! and `AuthenticationPolicy` (`TrafficPolicy`'s lives in [`crate::traffic`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ratelimit::Algorithm;

/// What an authorization policy does when a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// The request may pass (if no DENY matched).
    Allow,
    /// The request is refused.
    Deny,
    /// Dry run: evaluated, logged and counted, never enforced.
    Audit,
}

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Caller SPIFFE IDs (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Caller SPIFFE IDs that do not match (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_identities: Vec<String>,
    /// Caller namespaces (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Caller namespaces that do not match (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// `true`: matches only plaintext callers (PERMISSIVE mode); `false`: only authenticated ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
    /// Request principals (`<iss>/<sub>` of a verified JWT, or the principal
    /// of an API key), globs. The request must carry a verified credential.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Request principals that do not match (globs); a request without one matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Names of API keys (globs) the request must have been authenticated with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
    /// Names of API keys (globs) that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_api_keys: Vec<String>,
}

impl Source {
    /// Whether the entry names anything about the request's credential (as
    /// opposed to the calling workload).
    pub fn names_request_principal(&self) -> bool {
        !(self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.api_keys.is_empty()
            && self.not_api_keys.is_empty())
    }
}

/// What a request does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// HTTP methods, upper case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Paths: exact (`/health`), or globs (`/api/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Destination ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Hosts / authorities (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// A condition on a request header or on a claim of the verified token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Header name (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Claim of the verified JWT (`scope`, `tenant`, or a dotted path such
    /// as `realm.roles`). List-valued claims, and the space-separated
    /// `scope`/`scp` strings, match when any element does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// Accepted values (globs); the header or claim must be present with one of them.
    pub values: Vec<String>,
}

/// One authorization rule: all of its parts must match (each list: any entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Callers; empty: any caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Operations; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    /// Header conditions; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationSpec {
    /// Workloads it applies to.
    pub target: Target,
    /// ALLOW, DENY or AUDIT.
    pub action: Action,
    /// Rules; a policy with none matches nothing (ALLOW with no rules allows nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// Where a rate limit's quota lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each sidecar enforces the full quota.
    #[default]
    Sidecar,
    /// The control plane divides the quota among the target's ready replicas.
    Cluster,
}

/// The request match of a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitMatch {
    /// Paths (exact or globs); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Methods; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// One limit of a `RateLimitPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Name, unique in the policy (shown in `RateLimit-Policy`).
    pub name: String,
    /// Which requests count; absent: all.
    #[serde(default, rename = "match")]
    pub match_: LimitMatch,
    /// What requests are counted by (`identity` when absent).
    #[serde(default)]
    pub key: LimitKey,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Requests per period.
    pub rate: u64,
    /// The period (`1s`, `1m`...).
    pub period: String,
    /// Burst allowance (token/leaky bucket only).
    #[serde(default)]
    pub burst: u64,
    /// `sidecar` or `cluster`.
    #[serde(default)]
    pub scope: Scope,
}

/// What a rate limit counts requests by: one bucket per value.
///
/// Written as `identity`, `header:<name>`, `source_ip`, `principal`, `api_key` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
#[non_exhaustive]
pub enum LimitKey {
    /// The caller's verified SPIFFE ID (`unauthenticated` for plaintext callers).
    #[default]
    Identity,
    /// The value of a request header (name in lower case); absent: empty.
    Header(String),
    /// The caller's IP address.
    SourceIp,
    /// One bucket for every request.
    None,
    /// The request principal (`<iss>/<sub>` or an API key's principal;
    /// `anonymous` without one): per-client quotas.
    Principal,
    /// The name of the API key the request was authenticated with (`none` without one).
    ApiKey,
    /// Not a key: kept as written so validation can name it and the field.
    #[doc(hidden)]
    Unrecognised(String),
}

impl From<String> for LimitKey {
    fn from(s: String) -> Self {
        match s.as_str() {
            "identity" => Self::Identity,
            "source_ip" => Self::SourceIp,
            "none" => Self::None,
            "principal" => Self::Principal,
            "api_key" => Self::ApiKey,
            other => match other.strip_prefix("header:") {
                Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) => {
                    Self::Header(h.to_ascii_lowercase())
                }
                _ => Self::Unrecognised(s),
            },
        }
    }
}

impl From<LimitKey> for String {
    fn from(k: LimitKey) -> Self {
        k.to_string()
    }
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Identity => f.write_str("identity"),
            Self::Header(h) => write!(f, "header:{h}"),
            Self::SourceIp => f.write_str("source_ip"),
            Self::None => f.write_str("none"),
            Self::Principal => f.write_str("principal"),
            Self::ApiKey => f.write_str("api_key"),
            Self::Unrecognised(s) => f.write_str(s),
        }
    }
}

/// `RateLimitPolicy.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Workloads it applies to.
    pub target: Target,
    /// Limits, checked in order.
    pub limits: Vec<Limit>,
}

/// Whether requests must carry a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthnMode {
    /// A request without a valid credential is refused (401).
    #[default]
    Required,
    /// A request without a credential passes unauthenticated (authorization
    /// decides); one with an invalid credential is still refused.
    Optional,
}

/// Where a token is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenHeader {
    /// Header name (case-insensitive).
    pub name: String,
    /// What precedes the token in the value (`Bearer ` for `Authorization`;
    /// compared without case); empty: the whole value.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// A claim copied into a request header for the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    /// The claim (top-level name, or a dotted path).
    pub claim: String,
    /// The header the app receives it in; any copy sent by the caller is removed first.
    pub header: String,
}

/// One JWT issuer a workload accepts tokens from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtIssuer {
    /// The exact `iss` tokens carry.
    pub issuer: String,
    /// Tokens must carry at least one of these in `aud`.
    pub audiences: Vec<String>,
    /// The issuer's keys, inline (a JWKS document: `{"keys": [...]}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// Where the control plane fetches the issuer's keys (https); sidecars
    /// never fetch, they receive the keys with their policy. Neither `jwks`
    /// nor `jwksUri`: the mesh's own OAuth issuer, whose keys the control
    /// plane holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Accepted signature algorithms (default: RS256, PS256, ES256, ES384, EdDSA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<String>,
    /// Where tokens are read (default: `Authorization: Bearer <token>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<TokenHeader>,
    /// Pass the token on to the app (default: removed before the app).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_token: bool,
    /// Claims given to the app as request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims_to_headers: Vec<ClaimToHeader>,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (default 60s, at most 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew: Option<String>,
    /// The `typ` header tokens must carry (e.g. `at+jwt`), when the issuer declares one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
}

/// Where API keys are read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeys {
    /// The header (default `x-api-key`); it never reaches the app.
    #[serde(default = "default_api_key_header")]
    pub header: String,
}

fn default_api_key_header() -> String {
    "x-api-key".into()
}

/// `AuthenticationPolicy.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthenticationSpec {
    /// Workloads it applies to.
    pub target: Target,
    /// `required` (default) or `optional`.
    #[serde(default)]
    pub mode: AuthnMode,
    /// JWT issuers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt: Vec<JwtIssuer>,
    /// API keys (created with `palisadectl apikey create`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeys>,
}

/// The JWS algorithms a JWT issuer may use: asymmetric only (never `none`,
/// never an HMAC algorithm, whose key would be the public one).
pub const JWT_ALGORITHMS: [&str; 5] = ["RS256", "PS256", "ES256", "ES384", "EdDSA"];

/// Longest clock skew an issuer may be given.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// SPIFFE IDs (globs: `*` matches within and across segments, `?` one character).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// Headers a policy may not have Palisade write: the identity headers
/// Palisade owns, and those that change how a request is routed or framed.
pub fn reserved_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("x-palisade-")
        || n.starts_with(':')
        || [
            "host",
            "authorization",
            "content-length",
            "transfer-encoding",
            "connection",
            "upgrade",
            "te",
            "trailer",
            "keep-alive",
            "proxy-authorization",
            "cookie",
        ]
        .contains(&n.as_str())
}
