//! The resources, as operators write them (the field names are the API).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ratelimit::Algorithm;

/// Why a document is not a valid Palisade resource. Every variant names the
/// resource and the field, says what is wrong, and what would be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The text is not YAML/JSON of the expected shape (unknown field, wrong type...).
    #[error("{what}: {message}")]
    Parse {
        /// Which document or resource.
        what: String,
        /// What the parser said (names the field).
        message: String,
    },
    /// A field holds a value that is not allowed.
    #[error("{resource}: {field}: {value:?} {why}")]
    Invalid {
        /// `Kind namespace/name`.
        resource: String,
        /// Path of the field, e.g. `spec.rules[0].to[1].methods[0]`.
        field: String,
        /// The offending value.
        value: String,
        /// Why, and what is expected.
        why: String,
    },
}

/// `metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// DNS-label-like name.
    pub name: String,
    /// The namespace the policy belongs to.
    pub namespace: String,
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// SPIFFE IDs (globs: `*` matches within and across segments, `?` one character).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

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

/// Parses an issuer's `clockSkew` (default 60s).
pub fn parse_clock_skew(s: Option<&str>) -> Result<Duration, &'static str> {
    let Some(s) = s else { return Ok(Duration::from_secs(60)) };
    let d = humantime::parse_duration(s).map_err(|_| "is not a duration; use e.g. 30s or 2m")?;
    if d > MAX_CLOCK_SKEW {
        return Err("must be at most 5m");
    }
    Ok(d)
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

fn header_name_ok(h: &str) -> bool {
    !h.is_empty() && h.len() <= 128 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

/// A parsed, validated resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind")]
pub enum Resource {
    /// An authorization policy.
    AuthorizationPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: AuthorizationSpec,
    },
    /// A rate-limit policy.
    RateLimitPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: RateLimitSpec,
    },
    /// A request-authentication policy.
    AuthenticationPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: AuthenticationSpec,
    },
    /// A traffic policy (header rewriting, security headers).
    TrafficPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: Box<crate::traffic::TrafficSpec>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<serde_json::Value>,
    spec: Option<serde_json::Value>,
}

/// The policy kinds, as `kind:` spells them.
pub const KINDS: [&str; 4] = ["AuthorizationPolicy", "RateLimitPolicy", "AuthenticationPolicy", "TrafficPolicy"];

/// The kind a user meant, the way kubectl reads kinds: any case, singular or
/// plural (`authorizationpolicies`), or the short name (`ap`, `rlp`).
pub fn canonical_kind(s: &str) -> Option<&'static str> {
    let k = s.to_ascii_lowercase();
    match k.as_str() {
        "authorizationpolicy" | "authorizationpolicies" | "ap" => Some(KINDS[0]),
        "ratelimitpolicy" | "ratelimitpolicies" | "rlp" => Some(KINDS[1]),
        "authenticationpolicy" | "authenticationpolicies" | "authn" => Some(KINDS[2]),
        "trafficpolicy" | "trafficpolicies" | "tp" => Some(KINDS[3]),
        _ => None,
    }
}

impl Resource {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        let m = self.metadata();
        format!("{}/{}", m.namespace, m.name)
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Self::AuthorizationPolicy { metadata, .. }
            | Self::RateLimitPolicy { metadata, .. }
            | Self::AuthenticationPolicy { metadata, .. }
            | Self::TrafficPolicy { metadata, .. } => metadata,
        }
    }

    /// The workloads it applies to.
    pub fn target(&self) -> &Target {
        match self {
            Self::AuthorizationPolicy { spec, .. } => &spec.target,
            Self::RateLimitPolicy { spec, .. } => &spec.target,
            Self::AuthenticationPolicy { spec, .. } => &spec.target,
            Self::TrafficPolicy { spec, .. } => &spec.target,
        }
    }

    /// Whether this policy applies to the workload `identity`.
    pub fn targets(&self, identity: &str) -> bool {
        self.target().identities.iter().any(|g| wildmatch::WildMatch::new(g).matches(identity))
    }

    /// Every SPIFFE ID pattern the policy names, with its field path:
    /// the targets, and for authorization policies the callers of each rule.
    pub fn identity_patterns(&self) -> Vec<(String, &str)> {
        let (target, rules) = match self {
            Self::AuthorizationPolicy { spec, .. } => (&spec.target, spec.rules.as_slice()),
            _ => (self.target(), &[][..]),
        };
        let mut out: Vec<(String, &str)> = target
            .identities
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("spec.target.identities[{i}]"), g.as_str()))
            .collect();
        for (r, rule) in rules.iter().enumerate() {
            for (f, from) in rule.from.iter().enumerate() {
                for (name, list) in [("identities", &from.identities), ("notIdentities", &from.not_identities)] {
                    for (i, g) in list.iter().enumerate() {
                        out.push((format!("spec.rules[{r}].from[{f}].{name}[{i}]"), g.as_str()));
                    }
                }
            }
        }
        out
    }

    /// Canonical JSON (what the control plane stores and sends).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AuthorizationPolicy { .. } => "AuthorizationPolicy",
            Self::RateLimitPolicy { .. } => "RateLimitPolicy",
            Self::AuthenticationPolicy { .. } => "AuthenticationPolicy",
            Self::TrafficPolicy { .. } => "TrafficPolicy",
        }
    }

    /// Parses a JSON text (one resource, or an array of them) and validates each.
    /// YAML is turned into JSON values by the caller (see [`Resource::from_values`]),
    /// which keeps a YAML parser out of the sidecar.
    pub fn parse_json(text: &str) -> Result<Vec<Self>, PolicyError> {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Array(a)) => Self::from_values(a),
            Ok(v) => Self::from_values(vec![v]),
            Err(e) => Err(PolicyError::Parse { what: "JSON".into(), message: e.to_string() }),
        }
    }

    /// Validates already-parsed documents (empty ones are skipped).
    pub fn from_values(docs: Vec<serde_json::Value>) -> Result<Vec<Self>, PolicyError> {
        docs.into_iter().filter(|d| !d.is_null()).enumerate().map(|(i, d)| Self::from_value(d, i)).collect()
    }

    fn from_value(doc: serde_json::Value, index: usize) -> Result<Self, PolicyError> {
        let what = format!("document {}", index + 1);
        let env: Envelope = serde_json::from_value(doc)
            .map_err(|e| PolicyError::Parse { what: what.clone(), message: e.to_string() })?;
        let missing =
            |field: &str| PolicyError::Parse { what: what.clone(), message: format!("missing field `{field}`") };
        let kind = env.kind.ok_or_else(|| missing("kind"))?;
        let metadata: Metadata = serde_json::from_value(env.metadata.ok_or_else(|| missing("metadata"))?)
            .map_err(|e| PolicyError::Parse { what: what.clone(), message: format!("metadata: {e}") })?;
        let api_version = env.api_version.ok_or_else(|| missing("apiVersion"))?;
        let name = format!("{kind} {}/{}", metadata.namespace, metadata.name);
        let invalid = |field: &str, value: &str, why: &str| PolicyError::Invalid {
            resource: name.clone(),
            field: field.into(),
            value: value.into(),
            why: why.into(),
        };
        if api_version != crate::API_VERSION {
            return Err(invalid("apiVersion", &api_version, &format!("is not supported; use {}", crate::API_VERSION)));
        }
        let spec = env.spec.ok_or_else(|| invalid("spec", "", "is missing"))?;
        let spec_err = |e: serde_json::Error| PolicyError::Parse { what: name.clone(), message: format!("spec: {e}") };
        let resource = match kind.as_str() {
            "AuthorizationPolicy" => Self::AuthorizationPolicy {
                api_version,
                metadata,
                spec: serde_json::from_value(spec).map_err(spec_err)?,
            },
            "RateLimitPolicy" => {
                Self::RateLimitPolicy { api_version, metadata, spec: serde_json::from_value(spec).map_err(spec_err)? }
            }
            "AuthenticationPolicy" => Self::AuthenticationPolicy {
                api_version,
                metadata,
                spec: serde_json::from_value(spec).map_err(spec_err)?,
            },
            "TrafficPolicy" => {
                Self::TrafficPolicy { api_version, metadata, spec: serde_json::from_value(spec).map_err(spec_err)? }
            }
            other => {
                return Err(invalid(
                    "kind",
                    other,
                    "is not a Palisade policy kind; use AuthorizationPolicy, RateLimitPolicy, AuthenticationPolicy or TrafficPolicy",
                ));
            }
        };
        resource.validate()?;
        Ok(resource)
    }

    /// Checks every field; the first problem is returned with its path.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let name = format!("{} {}", self.kind(), self.key());
        let invalid = |field: String, value: &str, why: &str| PolicyError::Invalid {
            resource: name.clone(),
            field,
            value: value.into(),
            why: why.into(),
        };
        let m = self.metadata();
        for (field, v) in [("metadata.name", &m.name), ("metadata.namespace", &m.namespace)] {
            let ok = !v.is_empty()
                && v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-');
            if !ok {
                return Err(invalid(
                    field.into(),
                    v,
                    "must be a DNS label: lowercase letters, digits and '-', at most 63",
                ));
            }
        }
        let target = self.target();
        if target.identities.is_empty() {
            return Err(invalid(
                "spec.target.identities".into(),
                "",
                "must name at least one workload identity (globs allowed)",
            ));
        }
        for (i, id) in target.identities.iter().enumerate() {
            check_identity_glob(id).map_err(|why| invalid(format!("spec.target.identities[{i}]"), id, why))?;
        }
        match self {
            Self::AuthorizationPolicy { spec, .. } => {
                for (r, rule) in spec.rules.iter().enumerate() {
                    for (f, src) in rule.from.iter().enumerate() {
                        let base = format!("spec.rules[{r}].from[{f}]");
                        let empty = src.identities.is_empty()
                            && src.not_identities.is_empty()
                            && src.namespaces.is_empty()
                            && src.not_namespaces.is_empty()
                            && src.unauthenticated.is_none()
                            && !src.names_request_principal();
                        if empty {
                            return Err(invalid(
                                base,
                                "{}",
                                "is empty; name identities, namespaces, requestPrincipals, apiKeys or unauthenticated, or drop it to match any caller",
                            ));
                        }
                        for (list, field) in [
                            (&src.request_principals, "requestPrincipals"),
                            (&src.not_request_principals, "notRequestPrincipals"),
                            (&src.api_keys, "apiKeys"),
                            (&src.not_api_keys, "notApiKeys"),
                        ] {
                            for (i, p) in list.iter().enumerate() {
                                if p.is_empty() || p.len() > 512 || p.chars().any(char::is_control) {
                                    return Err(invalid(
                                        format!("{base}.{field}[{i}]"),
                                        p,
                                        "must be a non-empty pattern (requestPrincipals: <issuer>/<subject>, globs allowed)",
                                    ));
                                }
                            }
                        }
                        for (list, field) in [(&src.identities, "identities"), (&src.not_identities, "notIdentities")] {
                            for (i, id) in list.iter().enumerate() {
                                check_identity_glob(id)
                                    .map_err(|why| invalid(format!("{base}.{field}[{i}]"), id, why))?;
                            }
                        }
                        if src.unauthenticated == Some(true)
                            && !(src.identities.is_empty() && src.namespaces.is_empty())
                        {
                            return Err(invalid(
                                base,
                                "unauthenticated: true",
                                "cannot be combined with identities or namespaces: unauthenticated callers have none",
                            ));
                        }
                    }
                    for (t, op) in rule.to.iter().enumerate() {
                        check_operation(op, &format!("spec.rules[{r}].to[{t}]"))
                            .map_err(|(f, v, why)| invalid(f, &v, why))?;
                    }
                    for (w, c) in rule.when.iter().enumerate() {
                        let base = format!("spec.rules[{r}].when[{w}]");
                        match (&c.header, &c.claim) {
                            (Some(h), None) if !header_name_ok(h) => {
                                return Err(invalid(format!("{base}.header"), h, "must be an HTTP header name"));
                            }
                            (None, Some(claim)) if claim.is_empty() || claim.len() > 256 => {
                                return Err(invalid(format!("{base}.claim"), claim, "must name a claim"));
                            }
                            (Some(_), None) | (None, Some(_)) => {}
                            _ => {
                                return Err(invalid(
                                    base,
                                    "",
                                    "must name exactly one of header (a request header) or claim (of the verified token)",
                                ));
                            }
                        }
                        if c.values.is_empty() {
                            return Err(invalid(format!("{base}.values"), "", "must list at least one value"));
                        }
                    }
                }
            }
            Self::RateLimitPolicy { spec, .. } => {
                if spec.limits.is_empty() {
                    return Err(invalid("spec.limits".into(), "", "must hold at least one limit"));
                }
                let mut names = std::collections::HashSet::new();
                for (i, l) in spec.limits.iter().enumerate() {
                    let base = format!("spec.limits[{i}]");
                    if l.name.is_empty() || !names.insert(l.name.as_str()) {
                        return Err(invalid(
                            format!("{base}.name"),
                            &l.name,
                            "must be non-empty and unique in the policy",
                        ));
                    }
                    if l.rate == 0 {
                        return Err(invalid(format!("{base}.rate"), "0", "must be at least 1"));
                    }
                    let period =
                        parse_period(&l.period).map_err(|why| invalid(format!("{base}.period"), &l.period, why))?;
                    let _ = period;
                    let windowed = matches!(l.algorithm, Algorithm::FixedWindow | Algorithm::SlidingWindow);
                    if windowed && l.burst > 0 {
                        return Err(invalid(
                            format!("{base}.burst"),
                            &l.burst.to_string(),
                            "applies to token_bucket and leaky_bucket only; windows admit `rate` per period",
                        ));
                    }
                    if let LimitKey::Unrecognised(k) = &l.key {
                        return Err(invalid(
                            format!("{base}.key"),
                            k,
                            "must be identity, header:<name>, source_ip, principal, api_key or none",
                        ));
                    }
                    let op = Operation {
                        methods: l.match_.methods.clone(),
                        paths: l.match_.paths.clone(),
                        ..Default::default()
                    };
                    check_operation(&op, &format!("{base}.match")).map_err(|(f, v, why)| invalid(f, &v, why))?;
                }
            }
            Self::AuthenticationPolicy { spec, .. } => {
                validate_authn(spec).map_err(|(f, v, why)| invalid(f, &v, &why))?;
            }
            Self::TrafficPolicy { spec, .. } => {
                crate::traffic::validate(spec).map_err(|(f, v, why)| invalid(f, &v, &why))?;
            }
        }
        Ok(())
    }
}

fn validate_authn(spec: &AuthenticationSpec) -> Result<(), (String, String, String)> {
    let err = |f: String, v: &str, why: &str| Err((f, v.to_string(), why.to_string()));
    if spec.jwt.is_empty() && spec.api_keys.is_none() {
        return err(
            "spec".into(),
            "",
            "names no credential; give jwt (issuers) and/or apiKeys, or delete the policy to stop authenticating",
        );
    }
    if let Some(k) = &spec.api_keys
        && (!header_name_ok(&k.header) || reserved_header(&k.header))
    {
        return err(
            "spec.apiKeys.header".into(),
            &k.header,
            "must be an HTTP header name Palisade does not reserve (e.g. x-api-key)",
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (i, j) in spec.jwt.iter().enumerate() {
        let base = format!("spec.jwt[{i}]");
        if j.issuer.is_empty() || j.issuer.len() > 512 || j.issuer.chars().any(char::is_control) {
            return err(format!("{base}.issuer"), &j.issuer, "must be the exact `iss` of the issuer's tokens");
        }
        if !seen.insert(j.issuer.as_str()) {
            return err(format!("{base}.issuer"), &j.issuer, "appears twice; list each issuer once");
        }
        if j.audiences.is_empty() {
            return err(
                format!("{base}.audiences"),
                "",
                "must list at least one audience: a token for another API must not be accepted here",
            );
        }
        for (a, aud) in j.audiences.iter().enumerate() {
            if aud.is_empty() {
                return err(format!("{base}.audiences[{a}]"), aud, "must not be empty");
            }
        }
        match (&j.jwks, &j.jwks_uri) {
            (Some(_), Some(_)) => {
                return err(format!("{base}.jwks"), "", "and jwksUri are both given; keep one");
            }
            (Some(jwks), None) => {
                if let Err(why) = crate::authn::Jwks::parse(&jwks.to_string()) {
                    return err(format!("{base}.jwks"), "", &why);
                }
            }
            (None, Some(uri)) => {
                let ok = uri.strip_prefix("https://").is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
                    && uri.len() <= 2048
                    && !uri.chars().any(|c| c.is_whitespace() || c.is_control());
                if !ok {
                    return err(format!("{base}.jwksUri"), uri, "must be an https:// URL");
                }
            }
            (None, None) => {}
        }
        for (a, alg) in j.algorithms.iter().enumerate() {
            if !JWT_ALGORITHMS.contains(&alg.as_str()) {
                return err(
                    format!("{base}.algorithms[{a}]"),
                    alg,
                    "is not accepted; use RS256, PS256, ES256, ES384 or EdDSA (never none or an HMAC algorithm)",
                );
            }
        }
        for (h, th) in j.from_headers.iter().enumerate() {
            if !header_name_ok(&th.name) || th.name.to_ascii_lowercase().starts_with("x-palisade-") {
                return err(format!("{base}.fromHeaders[{h}].name"), &th.name, "must be an HTTP header name");
            }
        }
        for (c, ch) in j.claims_to_headers.iter().enumerate() {
            if ch.claim.is_empty() || ch.claim.len() > 256 {
                return err(format!("{base}.claimsToHeaders[{c}].claim"), &ch.claim, "must name a claim");
            }
            if !header_name_ok(&ch.header) || reserved_header(&ch.header) {
                return err(
                    format!("{base}.claimsToHeaders[{c}].header"),
                    &ch.header,
                    "must be an HTTP header name Palisade does not reserve (x-palisade-*, host, authorization...)",
                );
            }
        }
        if let Err(why) = parse_clock_skew(j.clock_skew.as_deref()) {
            return err(format!("{base}.clockSkew"), j.clock_skew.as_deref().unwrap_or_default(), why);
        }
        if let Some(t) = &j.typ
            && (t.is_empty() || t.len() > 64)
        {
            return err(format!("{base}.typ"), t, "must be a media type such as at+jwt");
        }
    }
    Ok(())
}

/// Parses a limit period: `1s`..`24h`.
pub fn parse_period(s: &str) -> Result<Duration, &'static str> {
    let d = humantime::parse_duration(s).map_err(|_| "is not a duration; use e.g. 1s, 1m or 1h")?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(86400) {
        return Err("must be between 1ms and 24h");
    }
    Ok(d)
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

fn check_operation(op: &Operation, base: &str) -> Result<(), (String, String, &'static str)> {
    for (i, m) in op.methods.iter().enumerate() {
        if !METHODS.contains(&m.as_str()) && m != "*" {
            return Err((
                format!("{base}.methods[{i}]"),
                m.clone(),
                "is not an HTTP method (upper case: GET, POST, ...)",
            ));
        }
    }
    for (i, p) in op.paths.iter().enumerate() {
        if !p.starts_with('/') && p != "*" {
            return Err((
                format!("{base}.paths[{i}]"),
                p.clone(),
                "must start with '/' (exact path or glob such as /api/*)",
            ));
        }
    }
    for (i, port) in op.ports.iter().enumerate() {
        if *port == 0 {
            return Err((format!("{base}.ports[{i}]"), "0".into(), "must be 1-65535"));
        }
    }
    Ok(())
}

fn check_identity_glob(id: &str) -> Result<(), &'static str> {
    if id == "*" {
        return Ok(());
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Err("must be a SPIFFE ID or glob: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>");
    };
    if rest.is_empty() || rest.contains("//") || rest.chars().any(|c| c.is_whitespace()) {
        return Err("is not a valid SPIFFE ID pattern");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
