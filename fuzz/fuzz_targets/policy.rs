//! Policy parsing and validation: any text either fails with an error or
//! yields resources that serialise and parse back to the same thing, compile
//! for a workload, and decide a request without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_policy::{HeaderList, Request, Resource, RuleSet};

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let Ok(resources) = Resource::parse_json(text) else { return };
    for r in &resources {
        let again = Resource::parse_json(&r.to_json()).expect("what validated serialises into something valid");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].to_json(), r.to_json(), "round trip is stable");
    }
    let workload = "spiffe://cluster.local/ns/shop/sa/orders";
    let set = RuleSet::compile(&resources, workload, false);
    let source = Some("spiffe://cluster.local/ns/shop/sa/web");
    let headers = HeaderList(&[("x-tenant", "acme")]);
    let _ = set.decide(&Request {
        source,
        method: Some("GET"),
        path: Some("/api/x"),
        port: 8080,
        host: None,
        headers: &headers,
        auth: None,
    });
    let _ = set.decide(&Request { source, port: 8080, ..Default::default() });
    // With a verified request credential, and through the whole enforcer
    // (authentication compiled from any AuthenticationPolicy in the input).
    let claims = serde_json::json!({"scope": "a b", "roles": ["x"], "n": {"k": 1}});
    let auth = palisade_policy::Authenticated::given(
        Some("https://idp/u".into()),
        Some("ci".into()),
        claims.as_object().cloned().unwrap_or_default(),
    );
    let _ =
        set.decide(&Request { source, method: Some("POST"), path: Some("/"), auth: Some(&auth), ..Default::default() });
    let inputs = palisade_policy::Inputs { resources: &resources, ..palisade_policy::Inputs::none() };
    if let Ok(e) = palisade_policy::Enforcer::compile(inputs, workload, None) {
        let _ = e.authenticate(&headers, 1_800_000_000);
    }
});
