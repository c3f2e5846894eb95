//! A recorded request as the control plane receives it from a sidecar:
//! any bytes are refused or give a sample within the limits, which the
//! preview evaluates before and after a policy change without a panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use palisade_policy::Resource;
use palisade_policy::preview::{Sample, limits, preview};

const POLICY: &str = r#"[{"apiVersion":"palisade.dev/v1","kind":"AuthorizationPolicy","metadata":{"name":"orders","namespace":"shop"},
 "spec":{"target":{"identities":["spiffe://cluster.local/ns/shop/sa/*"]},"action":"ALLOW",
 "rules":[{"from":[{"identities":["spiffe://cluster.local/ns/shop/sa/web"]}],"to":[{"methods":["GET"],"paths":["/api/*"]}],
 "when":[{"header":"x-tenant","values":["acme"]},{"claim":"scope","values":["orders.*"]}]}]}},
 {"apiVersion":"palisade.dev/v1","kind":"AuthorizationPolicy","metadata":{"name":"no-admin","namespace":"shop"},
 "spec":{"target":{"identities":["spiffe://cluster.local/ns/shop/sa/*"]},"action":"DENY","rules":[{"to":[{"paths":["/admin/*"]}]}]}}]"#;

static BEFORE: LazyLock<Vec<Resource>> = LazyLock::new(|| parse(POLICY));
static AFTER: LazyLock<Vec<Resource>> = LazyLock::new(|| parse(&POLICY.replace("\"GET\"", "\"GET\",\"POST\"")));

fn parse(json: &str) -> Vec<Resource> {
    let v: Vec<serde_json::Value> = serde_json::from_str(json).expect("invariant: valid JSON");
    v.iter().flat_map(|r| Resource::parse_json(&r.to_string()).expect("invariant: a valid policy")).collect()
}

fuzz_target!(|input: &[u8]| {
    if input.len() > limits::SAMPLE {
        return;
    }
    let Ok(mut s) = serde_json::from_slice::<Sample>(input) else { return };
    if s.check().is_err() {
        return;
    }
    assert!(s.path.starts_with('/') && s.path.len() <= limits::PATH && s.headers.len() <= limits::HEADERS);
    s.to = "spiffe://cluster.local/ns/shop/sa/orders".into();
    let p = preview(&BEFORE, &AFTER, false, &[(s, 3)]).expect("invariant: the policies compile");
    assert_eq!(p.requests_evaluated, 3);
    assert!(p.changes.len() <= 1);
    for c in &p.changes {
        assert_eq!(c.count, 3);
        assert_ne!(c.before, c.after);
    }
});
