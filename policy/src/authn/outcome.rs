//! What authentication made of a request: the verified credential, or why
//! it was refused.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::api_key::ApiKeyEntry;

/// Why a request's credential was refused. The caller learns only that its
/// token is invalid (or missing); the reason goes to the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// No credential, and the policy requires one.
    Missing,
    /// Not a well-formed token (or several credentials of one kind).
    Malformed,
    /// Larger than [`MAX_TOKEN_BYTES`](super::MAX_TOKEN_BYTES).
    TooLarge,
    /// An algorithm the issuer is not allowed (`none`, HMAC, or not listed).
    Algorithm,
    /// `iss` names no issuer the policy accepts.
    UnknownIssuer,
    /// No key of the issuer's set has the token's `kid` (or fits it); the
    /// value is where the set comes from, for a refresh.
    UnknownKey(Option<Arc<str>>),
    /// The signature does not verify.
    BadSignature,
    /// `exp` is past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iat` is in the future.
    IssuedInFuture,
    /// `aud` holds none of the policy's audiences.
    Audience,
    /// `typ` is not what the issuer declares.
    Type,
    /// No API key with this hash.
    UnknownApiKey,
    /// The API key expired.
    ExpiredApiKey,
    /// A token and an API key that name different principals: one request
    /// acts as one principal, so neither is taken.
    PrincipalConflict,
}

impl Failure {
    /// A short, stable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing_credential",
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Algorithm => "algorithm_not_allowed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::Audience => "wrong_audience",
            Self::Type => "wrong_type",
            Self::UnknownApiKey => "unknown_api_key",
            Self::ExpiredApiKey => "expired_api_key",
            Self::PrincipalConflict => "principal_conflict",
        }
    }

    /// Every reason, for metrics that start at zero.
    pub const REASONS: [&'static str; 15] = [
        "missing_credential",
        "malformed",
        "too_large",
        "algorithm_not_allowed",
        "unknown_issuer",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "wrong_audience",
        "wrong_type",
        "unknown_api_key",
        "expired_api_key",
        "principal_conflict",
    ];

    /// The `WWW-Authenticate` value (RFC 6750 section 3): a request with no
    /// credential gets the challenge alone, a bad one `invalid_token` and
    /// nothing an attacker could learn from.
    pub fn challenge(&self) -> &'static str {
        match self {
            Self::Missing => "Bearer realm=\"palisade\"",
            _ => "Bearer realm=\"palisade\", error=\"invalid_token\"",
        }
    }
}

/// A request whose credential verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// The request principal: `<iss>/<sub>` of the token, or the API key's principal.
    pub principal: Option<String>,
    /// The API key's name, when one was used.
    pub api_key: Option<Arc<str>>,
    /// The verified token's claims (empty for API keys).
    pub claims: Map<String, Value>,
    /// Headers the app receives, from `claimsToHeaders`.
    pub claim_headers: Vec<(String, String)>,
    /// Whether the token header goes on to the app (`forwardToken`).
    pub forward_token: bool,
    /// Unix seconds the token stops being valid (`exp`); 0 for API keys.
    pub expires_at: u64,
    pub(super) not_before: u64,
}

impl Authenticated {
    /// A request principal given by hand (`authz check --principal`), with claims.
    pub fn given(principal: Option<String>, api_key: Option<String>, claims: Map<String, Value>) -> Self {
        Self {
            principal,
            api_key: api_key.map(Into::into),
            claims,
            claim_headers: Vec::new(),
            forward_token: false,
            expires_at: 0,
            not_before: 0,
        }
    }

    /// The value(s) of claim `name` (a top-level name, or a dotted path when
    /// no top-level claim has that name), as strings: list elements one by
    /// one, the space-separated `scope`/`scp` strings split into scopes.
    pub fn claim_values(&self, name: &str) -> Vec<String> {
        claim_values(&self.claims, name)
    }
}

/// Whether any value of claim `name` (as [`Authenticated::claim_values`]
/// reads it) satisfies `pred`, without copying the strings.
pub(crate) fn claim_any(claims: &Map<String, Value>, name: &str, pred: &mut dyn FnMut(&str) -> bool) -> bool {
    let mut scalar = |v: &Value| match v {
        Value::String(s) => pred(s),
        Value::Number(n) => pred(&n.to_string()),
        Value::Bool(b) => pred(if *b { "true" } else { "false" }),
        _ => false,
    };
    match claim_at(claims, name) {
        Some(Value::String(s)) if name == "scope" || name == "scp" => s.split(' ').filter(|s| !s.is_empty()).any(pred),
        Some(Value::Array(a)) => a.iter().any(scalar),
        Some(v) => scalar(v),
        None => false,
    }
}

fn claim_at<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

pub(super) fn claim_values(claims: &Map<String, Value>, name: &str) -> Vec<String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match claim_at(claims, name) {
        Some(Value::String(s)) if name == "scope" || name == "scp" => {
            s.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect()
        }
        Some(Value::Array(a)) => a.iter().filter_map(scalar).collect(),
        Some(v) => scalar(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// What authentication made of a request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// No credential and none required (or no policy asks for one).
    Anonymous,
    /// The credential verified.
    Verified(Arc<Authenticated>),
    /// Refused: 401.
    Refused(Failure),
}

impl Outcome {
    pub(super) fn with_key(self, k: &ApiKeyEntry) -> Self {
        match self {
            Self::Verified(a) => {
                let mut a = Arc::unwrap_or_clone(a);
                a.api_key = Some(k.name.clone());
                if a.principal.is_none() {
                    a.principal = Some(k.principal.clone());
                }
                Self::Verified(Arc::new(a))
            }
            other => other,
        }
    }
}
