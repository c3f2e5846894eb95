use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::json;

use super::*;
use crate::HeaderList;
use crate::resource::{ApiKeys, AuthenticationSpec, ClaimToHeader, JwtIssuer, Target};

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://issuer.example";

struct Signer {
    es: EcdsaKeyPair,
    ed: Ed25519KeyPair,
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

impl Signer {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pk = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let es = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pk.as_ref(), &rng).unwrap();
        let pk = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(pk.as_ref()).unwrap();
        Self { es, ed }
    }

    fn jwks(&self) -> serde_json::Value {
        let p = self.es.public_key().as_ref();
        json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "es", "use": "sig", "x": b64(&p[1..33]), "y": b64(&p[33..65])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(self.ed.public_key().as_ref())},
            {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
        ]})
    }

    fn token(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig = match header["alg"].as_str() {
            Some("EdDSA") => self.ed.sign(input.as_bytes()).as_ref().to_vec(),
            _ => self.es.sign(&SystemRandom::new(), input.as_bytes()).unwrap().as_ref().to_vec(),
        };
        format!("{input}.{}", b64(&sig))
    }

    fn good(&self) -> String {
        self.token(json!({"alg": "ES256", "kid": "es", "typ": "JWT"}), claims())
    }
}

fn claims() -> serde_json::Value {
    json!({"iss": ISS, "sub": "client-7", "aud": ["orders", "other"], "exp": NOW + 600, "iat": NOW - 5,
           "scope": "orders.read orders.write", "tenant": "acme", "roles": ["a", "b"], "nested": {"team": "blue"}})
}

fn issuer(jwks: serde_json::Value) -> JwtIssuer {
    JwtIssuer {
        issuer: ISS.into(),
        audiences: vec!["orders".into()],
        jwks: Some(jwks),
        jwks_uri: None,
        algorithms: vec![],
        from_headers: vec![],
        forward_token: false,
        claims_to_headers: vec![ClaimToHeader { claim: "tenant".into(), header: "x-tenant".into() }],
        clock_skew: None,
        typ: None,
    }
}

fn spec(jwt: Vec<JwtIssuer>, mode: AuthnMode, api_keys: bool) -> AuthenticationSpec {
    AuthenticationSpec {
        target: Target { identities: vec!["*".into()] },
        mode,
        jwt,
        api_keys: api_keys.then(|| ApiKeys { header: "x-api-key".into() }),
    }
}

fn authn(s: &Signer) -> Authenticator {
    let spec = spec(vec![issuer(s.jwks())], AuthnMode::Required, true);
    let keys = vec![
        ApiKey { name: "ci".into(), principal: "team/ci".into(), sha256: hex(&sha256(b"pal_good")), expires_at: 0 },
        ApiKey { name: "old".into(), principal: "team/old".into(), sha256: hex(&sha256(b"pal_old")), expires_at: NOW },
    ];
    Authenticator::compile(&[&spec], &HashMap::new(), &keys).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn bearer(a: &Authenticator, token: &str) -> Outcome {
    let v = format!("Bearer {token}");
    a.authenticate(&HeaderList(&[("authorization", &v)]), NOW)
}

fn refused(o: Outcome) -> &'static str {
    match o {
        Outcome::Refused(f) => f.reason(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_good_token_verifies_and_gives_principal_claims_and_headers() {
    let s = Signer::new();
    let a = authn(&s);
    let Outcome::Verified(v) = bearer(&a, &s.good()) else { panic!() };
    assert_eq!(v.principal.as_deref(), Some("https://issuer.example/client-7"));
    assert_eq!(v.claim_values("scope"), ["orders.read", "orders.write"]);
    assert_eq!(v.claim_values("roles"), ["a", "b"]);
    assert_eq!(v.claim_values("nested.team"), ["blue"]);
    assert_eq!(v.claim_headers, [("x-tenant".to_string(), "acme".to_string())]);
    assert!(!v.forward_token);
    // EdDSA, and the scheme in any case.
    let t = s.token(json!({"alg": "EdDSA", "kid": "ed"}), claims());
    let v = format!("bEaReR {t}");
    assert!(matches!(a.authenticate(&HeaderList(&[("authorization", &v)]), NOW), Outcome::Verified(_)));
    // No kid: the keys that fit the algorithm are tried.
    let t = s.token(json!({"alg": "ES256"}), claims());
    assert!(matches!(bearer(&a, &t), Outcome::Verified(_)));
}

#[test]
fn the_rfc8725_attack_set_is_refused() {
    let s = Signer::new();
    let a = authn(&s);
    let good = s.good();
    let (h, p, sig) = {
        let mut it = good.split('.');
        (it.next().unwrap().to_string(), it.next().unwrap().to_string(), it.next().unwrap().to_string())
    };
    // alg none, with and without a signature.
    let none_h = b64(br#"{"alg":"none","kid":"es"}"#);
    assert_eq!(refused(bearer(&a, &format!("{none_h}.{p}."))), "algorithm_not_allowed");
    assert_eq!(refused(bearer(&a, &format!("{none_h}.{p}.{sig}"))), "algorithm_not_allowed");
    // HS256 keyed with the issuer's public key (the classic confusion).
    let hs_h = b64(br#"{"alg":"HS256","kid":"es"}"#);
    let pubkey = s.es.public_key().as_ref().to_vec();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &pubkey);
    let mac = ring::hmac::sign(&key, format!("{hs_h}.{p}").as_bytes());
    assert_eq!(refused(bearer(&a, &format!("{hs_h}.{p}.{}", b64(mac.as_ref())))), "algorithm_not_allowed");
    // Tampered payload under the original signature.
    let mut c = claims();
    c["sub"] = json!("admin");
    let tampered = format!("{h}.{}.{sig}", b64(c.to_string().as_bytes()));
    assert_eq!(refused(bearer(&a, &tampered)), "bad_signature");
    // An unknown kid, and a key of the wrong type for the algorithm.
    assert_eq!(refused(bearer(&a, &s.token(json!({"alg": "ES256", "kid": "nope"}), claims()))), "unknown_key");
    assert_eq!(refused(bearer(&a, &s.token(json!({"alg": "ES256", "kid": "ed"}), claims()))), "unknown_key");
    // jku / x5u / jwk pointing at an attacker's key: ignored, so the attacker's signature fails.
    let attacker = Signer::new();
    let forged = attacker.token(
        json!({"alg": "ES256", "kid": "es", "jku": "https://evil.example/jwks.json", "x5u": "https://evil.example/c",
               "jwk": attacker.jwks()["keys"][0].clone()}),
        claims(),
    );
    assert_eq!(refused(bearer(&a, &forged)), "bad_signature");
    // Time: expired (past the 60 s skew), not yet valid, issued in the future.
    let with = |k: &str, v: serde_json::Value| {
        let mut c = claims();
        c[k] = v;
        s.token(json!({"alg": "ES256", "kid": "es"}), c)
    };
    assert_eq!(refused(bearer(&a, &with("exp", json!(NOW - 61)))), "expired");
    assert!(matches!(bearer(&a, &with("exp", json!(NOW - 30))), Outcome::Verified(_)), "within skew");
    assert_eq!(refused(bearer(&a, &with("nbf", json!(NOW + 120)))), "not_yet_valid");
    assert_eq!(refused(bearer(&a, &with("iat", json!(NOW + 120)))), "issued_in_future");
    assert_eq!(refused(bearer(&a, &with("exp", json!("tomorrow")))), "malformed");
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(refused(bearer(&a, &s.token(json!({"alg": "ES256", "kid": "es"}), c))), "malformed");
    // Wrong issuer, wrong audience, no sub.
    assert_eq!(refused(bearer(&a, &with("iss", json!("https://issuer.example/")))), "unknown_issuer");
    assert_eq!(refused(bearer(&a, &with("aud", json!("payments")))), "wrong_audience");
    assert_eq!(refused(bearer(&a, &with("aud", json!([])))), "wrong_audience");
    assert_eq!(refused(bearer(&a, &with("sub", json!(7)))), "malformed");
    // crit names an extension nobody here understands.
    assert_eq!(
        refused(bearer(&a, &s.token(json!({"alg": "ES256", "kid": "es", "crit": ["exp"]}), claims()))),
        "malformed"
    );
    // Oversized, padded, two parts, garbage.
    assert_eq!(refused(bearer(&a, &"a".repeat(MAX_TOKEN_BYTES + 1))), "too_large");
    assert_eq!(refused(bearer(&a, &format!("{h}=.{p}.{sig}"))), "malformed");
    assert_eq!(refused(bearer(&a, &format!("{h}.{p}"))), "malformed");
    assert_eq!(refused(bearer(&a, "\u{0}\u{1}..")), "malformed");
    // Two Authorization headers.
    let v = format!("Bearer {good}");
    let twice = HeaderList(&[("authorization", &v), ("authorization", &v)]);
    assert_eq!(refused(a.authenticate(&twice, NOW)), "malformed");
    // And the good one still passes.
    assert!(matches!(bearer(&a, &good), Outcome::Verified(_)));
}

#[test]
fn a_cached_token_is_still_refused_once_it_expires() {
    let s = Signer::new();
    let a = authn(&s);
    let mut c = claims();
    c["exp"] = json!(NOW + 10);
    let t = s.token(json!({"alg": "ES256", "kid": "es"}), c);
    assert!(matches!(bearer(&a, &t), Outcome::Verified(_)));
    assert!(matches!(bearer(&a, &t), Outcome::Verified(_)), "from the cache");
    let v = format!("Bearer {t}");
    let later = a.authenticate(&HeaderList(&[("authorization", &v)]), NOW + 10 + 61);
    assert_eq!(refused(later), "expired");
}

#[test]
fn issuer_options_algorithms_type_and_headers() {
    let s = Signer::new();
    let mut i = issuer(s.jwks());
    i.algorithms = vec!["EdDSA".into()];
    i.typ = Some("at+jwt".into());
    i.from_headers = vec![crate::resource::TokenHeader { name: "x-token".into(), prefix: String::new() }];
    i.forward_token = true;
    let a = Authenticator::compile(&[&spec(vec![i], AuthnMode::Required, false)], &HashMap::new(), &[]).unwrap();
    let es = s.token(json!({"alg": "ES256", "kid": "es", "typ": "at+jwt"}), claims());
    let ed = s.token(json!({"alg": "EdDSA", "kid": "ed", "typ": "application/at+jwt"}), claims());
    let ed_jwt = s.token(json!({"alg": "EdDSA", "kid": "ed", "typ": "JWT"}), claims());
    let auth = |t: &str| a.authenticate(&HeaderList(&[("x-token", t)]), NOW);
    assert_eq!(refused(auth(&es)), "algorithm_not_allowed");
    assert_eq!(refused(auth(&ed_jwt)), "wrong_type");
    let Outcome::Verified(v) = auth(&ed) else { panic!() };
    assert!(v.forward_token);
    // A token in the default header is not this issuer's: missing.
    assert_eq!(refused(bearer(&a, &ed)), "missing_credential");
}

#[test]
fn modes_and_api_keys() {
    let s = Signer::new();
    let a = authn(&s);
    assert_eq!(refused(a.authenticate(&HeaderList(&[]), NOW)), "missing_credential");
    // Basic credentials for the app are not a bearer token.
    assert_eq!(refused(a.authenticate(&HeaderList(&[("authorization", "Basic dTpw")]), NOW)), "missing_credential");
    let Outcome::Verified(v) = a.authenticate(&HeaderList(&[("x-api-key", "pal_good")]), NOW) else { panic!() };
    assert_eq!((v.principal.as_deref(), v.api_key.as_deref()), (Some("team/ci"), Some("ci")));
    assert_eq!(refused(a.authenticate(&HeaderList(&[("x-api-key", "pal_bad")]), NOW)), "unknown_api_key");
    assert_eq!(refused(a.authenticate(&HeaderList(&[("x-api-key", "pal_old")]), NOW)), "expired_api_key");
    let two = HeaderList(&[("x-api-key", "pal_good"), ("x-api-key", "pal_good")]);
    assert_eq!(refused(a.authenticate(&two, NOW)), "malformed");
    // Both, for two different principals: refused (one request acts as one
    // principal, or a DENY on either would be walked around with the other).
    let v2 = format!("Bearer {}", s.good());
    let both = HeaderList(&[("authorization", &v2), ("x-api-key", "pal_good")]);
    assert_eq!(refused(a.authenticate(&both, NOW)), "principal_conflict");
    // A bad key spoils a good token.
    let both = HeaderList(&[("authorization", &v2), ("x-api-key", "nope")]);
    assert_eq!(refused(a.authenticate(&both, NOW)), "unknown_api_key");
    // Optional: nothing passes as anonymous, a bad credential is still refused.
    let opt = spec(vec![issuer(s.jwks())], AuthnMode::Optional, false);
    let a = Authenticator::compile(&[&opt], &HashMap::new(), &[]).unwrap();
    assert!(matches!(a.authenticate(&HeaderList(&[]), NOW), Outcome::Anonymous));
    assert_eq!(refused(bearer(&a, "x.y.z")), "malformed");
}

#[test]
fn key_sets_are_checked() {
    assert!(Jwks::parse(r#"{"keys": []}"#).unwrap_err().contains("no usable signing key"));
    assert!(Jwks::parse(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap_err().contains("no usable"));
    assert!(Jwks::parse(r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}"#).unwrap_err().contains("bits"));
    assert!(
        Jwks::parse(r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"}]}"#)
            .unwrap_err()
            .contains("private key")
    );
    assert!(Jwks::parse("[]").unwrap_err().contains("not a JWKS"));
    let s = Signer::new();
    assert_eq!(Jwks::parse(&s.jwks().to_string()).unwrap().len(), 2);
    // A key set fetched from jwksUri arrives by URI; until it does, no key: every token is refused.
    let mut i = issuer(s.jwks());
    i.jwks = None;
    i.jwks_uri = Some("https://idp.example/jwks".into());
    let sp = spec(vec![i], AuthnMode::Required, false);
    let a = Authenticator::compile(&[&sp], &HashMap::new(), &[]).unwrap();
    assert_eq!(bearer(&a, &s.good()).refusal(), Some(Failure::UnknownKey(Some("https://idp.example/jwks".into()))));
    let fetched = HashMap::from([("https://idp.example/jwks".to_string(), s.jwks().to_string())]);
    let a = Authenticator::compile(&[&sp], &fetched, &[]).unwrap();
    assert!(matches!(bearer(&a, &s.good()), Outcome::Verified(_)));
}

impl Outcome {
    fn refusal(self) -> Option<Failure> {
        match self {
            Outcome::Refused(f) => Some(f),
            _ => None,
        }
    }
}
