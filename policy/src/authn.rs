//! Request authentication, the first step of every decision: JWTs (RFC 7519)
//! verified the way RFC 8725 asks, and API keys, compiled from the
//! `AuthenticationPolicy` resources that target a workload.
//!
//! JWT rules enforced here:
//! - an allowlist of asymmetric algorithms per issuer (RS256, PS256, ES256,
//!   ES384, EdDSA): `none` and HMAC algorithms never verify anything;
//! - the key comes only from the issuer's key set, which the control plane
//!   pushed: `kid` picks it, and the key's own type (and `alg`, when the JWK
//!   names one) must fit the token's algorithm. Header parameters that point
//!   elsewhere (`jku`, `x5u`, `jwk`, `x5c`) are ignored; `crit` is refused;
//! - `iss` exact, `aud` must hold one of the policy's audiences, `exp`
//!   required, `nbf` and `iat` checked, all with the issuer's clock skew;
//! - a size limit on the token, strict base64url (no padding, no stray bits).
//!
//! Verified tokens are cached (bounded, keyed by the token itself, compared
//! whole) until they expire, so a client that reuses its token costs a
//! lookup: no hash an attacker could collide, no signature check.
//! API keys are known only by their SHA-256: the sidecar never holds a key.
//!
//! Signatures are checked with `ring`, the crypto library the TLS stack
//! already uses: one crypto stack in the binary, no second RSA implementation.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Map, Value};

use jwks::Jwk;
pub use jwks::{Alg, Jwks, MAX_JWKS_BYTES, MAX_JWKS_KEYS};

use crate::Headers;
use crate::resource::{AuthenticationSpec, AuthnMode, JWT_ALGORITHMS, parse_clock_skew};

/// The largest token accepted, in bytes (an access token is a few hundred).
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Verified tokens remembered per token header, per workload.
const CACHE_ENTRIES: NonZeroUsize = NonZeroUsize::new(1024).expect("invariant: non-zero");

/// Larger tokens are verified every time (bounds the cache's memory at
/// about 2 MiB a header).
const MAX_CACHED_TOKEN_BYTES: usize = 2048;

/// Keys tried for a token without `kid` (each try is a signature check).
const MAX_KEYLESS_TRIES: usize = 4;

/// An API key as the control plane sends it: its hash, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The key's name (what `apiKeys` in authorization rules match).
    pub name: String,
    /// The principal requests made with it act as.
    pub principal: String,
    /// SHA-256 of the key, hex.
    pub sha256: String,
    /// Unix seconds after which it is refused; 0: never.
    pub expires_at: u64,
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Why a request's credential was refused. The caller learns only that its
/// token is invalid (or missing); the reason goes to the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// No credential, and the policy requires one.
    Missing,
    /// Not a well-formed token (or several credentials of one kind).
    Malformed,
    /// Larger than [`MAX_TOKEN_BYTES`].
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
        }
    }

    /// Every reason, for metrics that start at zero.
    pub const REASONS: [&'static str; 14] = [
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
    not_before: u64,
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

fn claim_values(claims: &Map<String, Value>, name: &str) -> Vec<String> {
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

#[derive(Debug)]
struct Issuer {
    iss: String,
    audiences: Vec<String>,
    algorithms: Vec<Alg>,
    keys: Jwks,
    /// Where the keys come from (`jwksUri`), for refresh requests.
    source: Option<Arc<str>>,
    locations: Vec<(String, String)>,
    forward_token: bool,
    claims_to_headers: Vec<(String, String)>,
    skew: u64,
    typ: Option<String>,
}

/// The authentication the policies targeting one workload ask for.
#[derive(Debug)]
pub struct Authenticator {
    required: bool,
    issuers: Vec<Issuer>,
    /// `(header, prefix)` pairs tokens are read from, lower case.
    locations: Vec<(String, String)>,
    api_key_headers: Vec<String>,
    api_keys: HashMap<[u8; 32], ApiKeyEntry>,
    /// Every header a claim may be copied into: removed from every request first.
    claim_headers: Vec<String>,
    /// Verified tokens, one cache per entry of `locations`.
    cache: Vec<Mutex<lru::LruCache<Box<str>, Arc<Authenticated>>>>,
}

#[derive(Debug)]
struct ApiKeyEntry {
    name: Arc<str>,
    principal: String,
    expires_at: u64,
}

/// A credential found in a request.
struct Found<'a> {
    value: &'a str,
    location: usize,
}

impl Authenticator {
    /// Compiles the authentication policies that target a workload.
    /// `jwks`: key sets the control plane fetched, by `jwksUri` (or by
    /// issuer, for the mesh's own); `api_keys`: the keys this workload may
    /// accept. `None` when no policy asks for authentication.
    pub fn compile(specs: &[&AuthenticationSpec], jwks: &HashMap<String, String>, api_keys: &[ApiKey]) -> Option<Self> {
        if specs.is_empty() {
            return None;
        }
        let mut a = Authenticator {
            required: specs.iter().any(|s| s.mode == AuthnMode::Required),
            issuers: Vec::new(),
            locations: Vec::new(),
            api_key_headers: Vec::new(),
            api_keys: HashMap::new(),
            claim_headers: Vec::new(),
            cache: Vec::new(),
        };
        for spec in specs {
            if let Some(k) = &spec.api_keys {
                let h = k.header.to_ascii_lowercase();
                if !a.api_key_headers.contains(&h) {
                    a.api_key_headers.push(h);
                }
            }
            for j in &spec.jwt {
                if a.issuers.iter().any(|i| i.iss == j.issuer) {
                    continue;
                }
                let (keys, source) = match (&j.jwks, &j.jwks_uri) {
                    (Some(inline), _) => (Jwks::parse(&inline.to_string()).unwrap_or_default(), None),
                    (None, Some(uri)) => {
                        (jwks.get(uri).and_then(|t| Jwks::parse(t).ok()).unwrap_or_default(), Some(uri.as_str().into()))
                    }
                    (None, None) => (jwks.get(&j.issuer).and_then(|t| Jwks::parse(t).ok()).unwrap_or_default(), None),
                };
                let algorithms: Vec<Alg> = if j.algorithms.is_empty() {
                    JWT_ALGORITHMS.iter().filter_map(|s| Alg::parse(s)).collect()
                } else {
                    j.algorithms.iter().filter_map(|s| Alg::parse(s)).collect()
                };
                let locations: Vec<(String, String)> = if j.from_headers.is_empty() {
                    vec![("authorization".into(), "bearer ".into())]
                } else {
                    j.from_headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.prefix.to_ascii_lowercase()))
                        .collect()
                };
                for l in &locations {
                    if !a.locations.contains(l) {
                        a.locations.push(l.clone());
                    }
                }
                let claims_to_headers: Vec<(String, String)> =
                    j.claims_to_headers.iter().map(|c| (c.claim.clone(), c.header.to_ascii_lowercase())).collect();
                for (_, h) in &claims_to_headers {
                    if !a.claim_headers.contains(h) {
                        a.claim_headers.push(h.clone());
                    }
                }
                a.issuers.push(Issuer {
                    iss: j.issuer.clone(),
                    audiences: j.audiences.clone(),
                    algorithms,
                    keys,
                    source,
                    locations,
                    forward_token: j.forward_token,
                    claims_to_headers,
                    skew: parse_clock_skew(j.clock_skew.as_deref()).unwrap_or(Duration::from_secs(60)).as_secs(),
                    typ: j.typ.as_deref().map(normalise_typ),
                });
            }
        }
        a.cache = a.locations.iter().map(|_| Mutex::new(lru::LruCache::new(CACHE_ENTRIES))).collect();
        if !a.api_key_headers.is_empty() {
            for k in api_keys {
                if let Some(hash) = unhex(&k.sha256) {
                    a.api_keys.insert(
                        hash,
                        ApiKeyEntry {
                            name: k.name.as_str().into(),
                            principal: k.principal.clone(),
                            expires_at: k.expires_at,
                        },
                    );
                }
            }
        }
        Some(a)
    }

    /// Whether a request must carry a valid credential (`mode: required`).
    pub fn required(&self) -> bool {
        self.required
    }

    /// Headers that must never reach the app from the caller: the claim
    /// headers (Palisade writes them), and the credentials it consumed.
    pub fn claim_headers(&self) -> &[String] {
        &self.claim_headers
    }

    /// The headers credentials are read from (token headers, API-key headers).
    pub fn credential_headers(&self) -> impl Iterator<Item = &str> {
        self.locations.iter().map(|(h, _)| h.as_str()).chain(self.api_key_headers.iter().map(String::as_str))
    }

    /// The API-key headers (never forwarded to the app).
    pub fn api_key_headers(&self) -> &[String] {
        &self.api_key_headers
    }

    /// How many API keys and issuer keys it holds (`/config`).
    pub fn describe(&self) -> Value {
        serde_json::json!({
            "mode": if self.required { "required" } else { "optional" },
            "issuers": self.issuers.iter().map(|i| serde_json::json!({
                "issuer": i.iss, "audiences": i.audiences, "keys": i.keys.len(),
                "jwksUri": i.source.as_deref(),
            })).collect::<Vec<_>>(),
            "apiKeyHeaders": self.api_key_headers,
            "apiKeys": self.api_keys.len(),
        })
    }

    /// Authenticates a request at `now` (unix seconds).
    pub fn authenticate(&self, headers: &dyn Headers, now: u64) -> Outcome {
        let token = match self.find_token(headers) {
            Ok(t) => t,
            Err(f) => return Outcome::Refused(f),
        };
        let key = match self.find_api_key(headers, now) {
            Ok(k) => k,
            Err(f) => return Outcome::Refused(f),
        };
        let verified = match token {
            None => None,
            Some(found) => match self.verify_cached(found, now) {
                Ok(v) => Some(v),
                Err(f) => return Outcome::Refused(f),
            },
        };
        match (verified, key) {
            (None, None) if self.required => Outcome::Refused(Failure::Missing),
            (None, None) => Outcome::Anonymous,
            (Some(v), None) => Outcome::Verified(v),
            (None, Some(k)) => {
                Outcome::Verified(Arc::new(Authenticated::given(Some(k.principal.clone()), None, Map::new())))
                    .with_key(k)
            }
            (Some(v), Some(k)) => Outcome::Verified(v).with_key(k),
        }
    }

    fn find_token<'h>(&self, headers: &'h dyn Headers) -> Result<Option<Found<'h>>, Failure> {
        let mut found: Option<Found<'h>> = None;
        for (i, (name, prefix)) in self.locations.iter().enumerate() {
            if count(headers, name) > 1 {
                return Err(Failure::Malformed);
            }
            let Some(v) = headers.first(name) else { continue };
            let token = if prefix.is_empty() {
                Some(v)
            } else {
                v.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &v[prefix.len()..])
            };
            // Another scheme in `Authorization` (Basic for the app) is not ours to judge.
            let Some(token) = token else { continue };
            let token = token.trim();
            match &found {
                Some(f) if f.value != token => return Err(Failure::Malformed),
                Some(_) => {}
                None => found = Some(Found { value: token, location: i }),
            }
        }
        Ok(found)
    }

    fn find_api_key(&self, headers: &dyn Headers, now: u64) -> Result<Option<&ApiKeyEntry>, Failure> {
        let mut presented: Option<&str> = None;
        for h in &self.api_key_headers {
            if count(headers, h) > 1 {
                return Err(Failure::Malformed);
            }
            if let Some(v) = headers.first(h) {
                if presented.is_some_and(|p| p != v) {
                    return Err(Failure::Malformed);
                }
                presented = Some(v);
            }
        }
        let Some(key) = presented else { return Ok(None) };
        if key.is_empty() || key.len() > 256 {
            return Err(Failure::UnknownApiKey);
        }
        match self.api_keys.get(&sha256(key.trim().as_bytes())) {
            None => Err(Failure::UnknownApiKey),
            Some(e) if e.expires_at != 0 && e.expires_at <= now => Err(Failure::ExpiredApiKey),
            Some(e) => Ok(Some(e)),
        }
    }

    fn verify_cached(&self, found: Found<'_>, now: u64) -> Result<Arc<Authenticated>, Failure> {
        if found.value.len() > MAX_TOKEN_BYTES {
            return Err(Failure::TooLarge);
        }
        // One cache per header: an issuer accepts tokens only from its own headers.
        let cache = &self.cache[found.location];
        let hit = cache.lock().unwrap_or_else(|p| p.into_inner()).get(found.value).cloned();
        if let Some(a) = hit {
            // The time checks again (the rest cannot change while this enforcer lives).
            if a.expires_at <= now {
                cache.lock().unwrap_or_else(|p| p.into_inner()).pop(found.value);
                return Err(Failure::Expired);
            }
            if a.not_before > now {
                return Err(Failure::NotYetValid);
            }
            return Ok(a);
        }
        let token = found.value;
        let a = Arc::new(self.verify(found, now)?);
        if token.len() <= MAX_CACHED_TOKEN_BYTES {
            cache.lock().unwrap_or_else(|p| p.into_inner()).put(token.into(), a.clone());
        }
        Ok(a)
    }

    fn verify(&self, found: Found<'_>, now: u64) -> Result<Authenticated, Failure> {
        let token = found.value;
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(Failure::Malformed);
        };
        let header: JoseHeader = decode_json(h64)?;
        let claims: Map<String, Value> = decode_json(p64)?;
        let sig = URL_SAFE_NO_PAD.decode(s64).map_err(|_| Failure::Malformed)?;
        if header.crit.is_some() {
            return Err(Failure::Malformed);
        }
        let alg = Alg::parse(&header.alg).ok_or(Failure::Algorithm)?;
        let Some(Value::String(iss)) = claims.get("iss") else { return Err(Failure::UnknownIssuer) };
        let issuer = self.issuers.iter().find(|i| &i.iss == iss).ok_or(Failure::UnknownIssuer)?;
        let (loc_name, loc_prefix) = &self.locations[found.location];
        if !issuer.locations.iter().any(|(n, p)| n == loc_name && p == loc_prefix) {
            return Err(Failure::UnknownIssuer);
        }
        if !issuer.algorithms.contains(&alg) {
            return Err(Failure::Algorithm);
        }
        if let Some(want) = &issuer.typ
            && header.typ.as_deref().map(normalise_typ).as_deref() != Some(want.as_str())
        {
            return Err(Failure::Type);
        }
        let candidates: Vec<&Jwk> = issuer
            .keys
            .keys
            .iter()
            .filter(|k| k.key.fits(alg) && k.alg.is_none_or(|a| a == alg))
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .collect();
        let unknown = || Failure::UnknownKey(issuer.source.clone());
        if candidates.is_empty() || (header.kid.is_none() && candidates.len() > MAX_KEYLESS_TRIES) {
            return Err(unknown());
        }
        let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        if !candidates.iter().any(|k| k.key.verify(alg, signed, &sig)) {
            return Err(Failure::BadSignature);
        }
        // The signature holds: now the claims.
        let skew = issuer.skew;
        let exp = numeric(claims.get("exp")).ok_or(Failure::Malformed)?;
        if exp.saturating_add(skew) <= now {
            return Err(Failure::Expired);
        }
        let nbf = match claims.get("nbf") {
            None => 0,
            some => numeric(some).ok_or(Failure::Malformed)?,
        };
        if nbf > now.saturating_add(skew) {
            return Err(Failure::NotYetValid);
        }
        if let Some(iat) = claims.get("iat") {
            let iat = numeric(Some(iat)).ok_or(Failure::Malformed)?;
            if iat > now.saturating_add(skew) {
                return Err(Failure::IssuedInFuture);
            }
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => issuer.audiences.contains(a),
            Some(Value::Array(list)) => {
                list.iter().any(|a| a.as_str().is_some_and(|a| issuer.audiences.iter().any(|w| w == a)))
            }
            _ => false,
        };
        if !aud_ok {
            return Err(Failure::Audience);
        }
        let Some(Value::String(sub)) = claims.get("sub") else { return Err(Failure::Malformed) };
        if sub.is_empty() || sub.chars().any(char::is_control) {
            return Err(Failure::Malformed);
        }
        let principal = format!("{iss}/{sub}");
        let mut claim_headers = Vec::new();
        for (claim, header) in &issuer.claims_to_headers {
            let values = claim_values(&claims, claim);
            // Header values must be visible ASCII; anything else is not copied.
            let v = values.join(",");
            if !values.is_empty() && v.len() <= 1024 && v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                claim_headers.push((header.clone(), v));
            }
        }
        Ok(Authenticated {
            principal: Some(principal),
            api_key: None,
            claims,
            claim_headers,
            forward_token: issuer.forward_token,
            expires_at: exp.saturating_add(skew),
            not_before: nbf.saturating_sub(skew),
        })
    }
}

impl Outcome {
    fn with_key(self, k: &ApiKeyEntry) -> Self {
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

/// How many values header `name` has.
fn count(headers: &dyn Headers, name: &str) -> usize {
    let mut n = 0;
    headers.any(name, &mut |_| {
        n += 1;
        false
    });
    n
}

#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<Value>,
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, Failure> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| Failure::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| Failure::Malformed)
}

/// A NumericDate (seconds, possibly fractional) as whole seconds.
fn numeric(v: Option<&Value>) -> Option<u64> {
    let n = v?.as_number()?;
    n.as_u64().or_else(|| n.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
}

/// `application/at+jwt` and `at+jwt` are the same type (RFC 7515 section 4.1.9).
fn normalise_typ(t: &str) -> String {
    let t = t.to_ascii_lowercase();
    t.strip_prefix("application/").map(str::to_string).unwrap_or(t)
}

mod jwks;
#[cfg(test)]
mod tests;
