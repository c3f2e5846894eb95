//! JWTs: finding the token in a request, verifying it (RFC 7519, the way
//! RFC 8725 asks) and caching what verified.

use std::num::NonZeroUsize;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::jwks::{Alg, Jwk, Jwks};
use super::outcome::claim_values;
use super::{Authenticated, Authenticator, Failure, MAX_TOKEN_BYTES, count};
use crate::Headers;

/// Verified tokens remembered per token header, per workload.
pub(super) const CACHE_ENTRIES: NonZeroUsize = NonZeroUsize::new(1024).expect("invariant: non-zero");

/// Larger tokens are verified every time (bounds the cache's memory at
/// about 2 MiB a header).
const MAX_CACHED_TOKEN_BYTES: usize = 2048;

/// Keys tried for a token without `kid` (each try is a signature check).
const MAX_KEYLESS_TRIES: usize = 4;

#[derive(Debug)]
pub(super) struct Issuer {
    pub(super) iss: String,
    pub(super) audiences: Vec<String>,
    pub(super) algorithms: Vec<Alg>,
    pub(super) keys: Jwks,
    /// Where the keys come from (`jwksUri`), for refresh requests.
    pub(super) source: Option<Arc<str>>,
    pub(super) locations: Vec<(String, String)>,
    pub(super) forward_token: bool,
    pub(super) claims_to_headers: Vec<(String, String)>,
    pub(super) skew: u64,
    pub(super) typ: Option<String>,
}

/// A credential found in a request.
pub(super) struct Found<'a> {
    value: &'a str,
    location: usize,
}

impl Authenticator {
    pub(super) fn find_token<'h>(&self, headers: &'h dyn Headers) -> Result<Option<Found<'h>>, Failure> {
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

    pub(super) fn verify_cached(&self, found: Found<'_>, now: u64) -> Result<Arc<Authenticated>, Failure> {
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
pub(super) fn normalise_typ(t: &str) -> String {
    let t = t.to_ascii_lowercase();
    t.strip_prefix("application/").map(str::to_string).unwrap_or(t)
}
