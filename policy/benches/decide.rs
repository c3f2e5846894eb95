//! One authorization decision with 10 and with 10,000 rules targeting the
//! workload: indexed by caller identity, the cost should not grow with the
//! number of rules. Run: `cargo bench -p palisade-policy`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_policy::{Request, Resource, RuleSet};

fn policy(rules: usize) -> Vec<Resource> {
    let mut yaml = String::from(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: many, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n",
    );
    for i in 0..rules {
        yaml.push_str(&format!(
            "    - from: [{{identities: [\"spiffe://cluster.local/ns/n{i}/sa/caller\"]}}]\n      to: [{{methods: [\"GET\"], paths: [\"/api/*\"]}}]\n"
        ));
    }
    // A few generic rules too (namespace globs, DENY), as real meshes have.
    yaml.push_str("---\napiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n  action: DENY\n  rules:\n    - from: [{namespaces: [\"untrusted-*\"]}]\n    - to: [{paths: [\"/admin/*\"]}]\n");
    let docs = serde_saphyr::from_multiple::<serde_json::Value>(&yaml).expect("invariant: valid YAML");
    Resource::from_values(docs).expect("invariant: the benchmark policy is valid")
}

fn bench(c: &mut Criterion) {
    for n in [10usize, 10_000] {
        let set = RuleSet::compile(&policy(n), "spiffe://cluster.local/ns/shop/sa/orders", false);
        let caller = format!("spiffe://cluster.local/ns/n{}/sa/caller", n - 1);
        let req = Request {
            source: Some(&caller),
            method: Some("GET"),
            path: Some("/api/items/42"),
            port: 8080,
            ..Default::default()
        };
        c.bench_function(&format!("decide/{n}_rules"), |b| b.iter(|| black_box(set.decide(black_box(&req)))));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
