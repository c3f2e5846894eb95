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
    });
    let _ = set.decide(&Request { source, port: 8080, ..Default::default() });
});
