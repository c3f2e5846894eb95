//! Request credentials: any bytes as a bearer token, an API key or a JWKS
//! document get an answer, never a panic, and nothing forged verifies.
#![no_main]

use std::collections::HashMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use palisade_policy::authn::{Authenticator, Jwks, Outcome};
use palisade_policy::{HeaderList, Resource};

const POLICY: &str = r#"{"apiVersion": "palisade.dev/v1", "kind": "AuthenticationPolicy",
  "metadata": {"name": "f", "namespace": "fuzz"},
  "spec": {"target": {"identities": ["*"]}, "apiKeys": {"header": "x-api-key"},
    "jwt": [{"issuer": "https://idp", "audiences": ["a"], "claimsToHeaders": [{"claim": "sub", "header": "x-sub"}],
      "jwks": {"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "k1",
         "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "k2", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}}]}}"#;

static AUTHN: LazyLock<Authenticator> = LazyLock::new(|| {
    let resources = Resource::parse_json(POLICY).expect("invariant: the fuzz policy is valid");
    let Resource::AuthenticationPolicy { spec, .. } = &resources[0] else { unreachable!() };
    Authenticator::compile(&[spec], &HashMap::new(), &[]).expect("invariant: a policy targets")
});

fuzz_target!(|input: &[u8]| {
    let Some((mode, rest)) = input.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match mode % 3 {
        0 => {
            let _ = Jwks::parse(text);
        }
        1 => {
            let bearer = format!("Bearer {text}");
            let outcome = AUTHN.authenticate(&HeaderList(&[("authorization", &bearer)]), 1_800_000_000);
            assert!(!matches!(outcome, Outcome::Verified(_)), "a forged token verified");
        }
        _ => {
            let outcome = AUTHN.authenticate(&HeaderList(&[("x-api-key", text)]), 1_800_000_000);
            assert!(!matches!(outcome, Outcome::Verified(_)), "a guessed API key verified");
        }
    }
});
