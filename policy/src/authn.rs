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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

mod api_key;
mod jwks;
mod jwt;
mod outcome;
#[cfg(test)]
mod tests;

pub use api_key::{ApiKey, sha256};
use api_key::{ApiKeyEntry, unhex};
pub use jwks::{Alg, Jwks, MAX_JWKS_BYTES, MAX_JWKS_KEYS};
use jwt::{CACHE_ENTRIES, Issuer, normalise_typ};
pub(crate) use outcome::claim_any;
pub use outcome::{Authenticated, Failure, Outcome};

use crate::Headers;
use crate::resource::{AuthenticationSpec, AuthnMode, JWT_ALGORITHMS, parse_clock_skew};

/// The largest token accepted, in bytes (an access token is a few hundred).
pub const MAX_TOKEN_BYTES: usize = 8192;

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
            // One request, one principal: a token and a key for two
            // different principals would let a rule on either be walked around.
            (Some(v), Some(k)) if v.principal.as_deref() != Some(k.principal.as_str()) => {
                Outcome::Refused(Failure::PrincipalConflict)
            }
            (Some(v), Some(k)) => Outcome::Verified(v).with_key(k),
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
