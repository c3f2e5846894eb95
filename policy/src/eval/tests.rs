use super::*;

use crate::test_util::parse_all;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
static TENANT: HeaderList<'static> = HeaderList(&[("x-tenant", "acme")]);
static EVIL: HeaderList<'static> = HeaderList(&[("x-tenant", "evil")]);
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

fn policies(yaml: &str) -> Vec<Resource> {
    parse_all(yaml).unwrap()
}

fn get<'a>(source: Option<&'a str>, method: &'a str, path: &'a str) -> Request<'a> {
    Request { source, method: Some(method), path: Some(path), port: 8080, ..Default::default() }
}

const BASE: &str = r#"
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: web-reads-api, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://cluster.local/ns/shop/sa/web"]}]
      to: [{methods: ["GET"], paths: ["/api/*"], ports: [8080]}]
      when: [{header: "x-tenant", values: ["acme"]}]
"#;

#[test]
fn allow_requires_every_part_to_match() {
    let set = RuleSet::compile(&policies(BASE), ORDERS, false);
    let mut req = get(Some(WEB), "GET", "/api/items");
    req.headers = &TENANT;
    let d = set.decide(&req);
    assert_eq!((d.verdict, d.policy.as_deref(), d.rule), (Verdict::Allow, Some("shop/web-reads-api"), Some(0)));
    for (what, r) in [
        ("method", Request { method: Some("POST"), ..req }),
        ("path", Request { path: Some("/admin"), ..req }),
        ("port", Request { port: 9090, ..req }),
        ("header", Request { headers: &EVIL, ..req }),
        ("caller", Request { source: Some(ORDERS), ..req }),
        ("unauthenticated", Request { source: None, ..req }),
    ] {
        assert_eq!(set.decide(&r).verdict, Verdict::Deny, "{what}");
    }
    // Another workload is not targeted: mesh default.
    let other = RuleSet::compile(&policies(BASE), WEB, false);
    assert!(other.decide(&req).reason().contains("mesh default is deny"));
    let lenient = RuleSet::compile(&policies(BASE), WEB, true);
    assert_eq!(lenient.decide(&req).verdict, Verdict::Allow);
    assert_eq!(lenient.decide(&Request { source: None, ..req }).verdict, Verdict::Deny);
}

#[test]
fn deny_beats_allow_and_audit_is_reported_not_enforced() {
    let yaml = format!(
        "{BASE}---\n{}",
        r#"apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/*"]}
  action: DENY
  rules:
    - to: [{paths: ["/api/admin*"]}]
---
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: trial, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: AUDIT
  rules:
    - from: [{namespaces: ["billing"]}]
"#
    );
    let set = RuleSet::compile(&policies(&yaml), ORDERS, false);
    let mut req = get(Some(WEB), "GET", "/api/admin/users");
    req.headers = &TENANT;
    let d = set.decide(&req);
    assert_eq!((d.verdict, d.policy.as_deref()), (Verdict::Deny, Some("shop/no-admin")));
    let ok = Request { path: Some("/api/items"), ..req };
    let d = set.decide(&ok);
    assert_eq!(d.verdict, Verdict::Allow, "AUDIT never blocks");
    assert_eq!(d.label(), "audit_deny", "the trial policy would have denied web");
}

#[test]
fn namespaces_negations_and_unauthenticated_callers() {
    let yaml = r#"
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: mix, namespace: shop}
spec:
  target: {identities: ["*"]}
  action: ALLOW
  rules:
    - from: [{namespaces: ["shop"], notIdentities: ["spiffe://cluster.local/ns/shop/sa/legacy"]}]
    - from: [{unauthenticated: true}]
      to: [{paths: ["/healthz"]}]
"#;
    let set = RuleSet::compile(&policies(yaml), ORDERS, false);
    assert_eq!(set.decide(&get(Some(WEB), "GET", "/x")).verdict, Verdict::Allow);
    assert_eq!(set.decide(&get(Some("spiffe://cluster.local/ns/shop/sa/legacy"), "GET", "/x")).verdict, Verdict::Deny);
    assert_eq!(set.decide(&get(Some("spiffe://cluster.local/ns/other/sa/web"), "GET", "/x")).verdict, Verdict::Deny);
    assert_eq!(set.decide(&get(None, "GET", "/healthz")).verdict, Verdict::Allow);
    assert_eq!(set.decide(&get(None, "GET", "/x")).verdict, Verdict::Deny);
    // TCP: only L4 fields exist; a rule with HTTP fields cannot match.
    let tcp = Request { source: None, port: 5432, ..Default::default() };
    assert_eq!(set.decide(&tcp).verdict, Verdict::Deny);
}

#[test]
fn ten_thousand_exact_rules_are_indexed() {
    let mut yaml = String::from(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: many, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n  action: ALLOW\n  rules:\n",
    );
    for i in 0..10_000 {
        yaml.push_str(&format!("    - from: [{{identities: [\"spiffe://cluster.local/ns/n{i}/sa/s\"]}}]\n"));
    }
    let set = RuleSet::compile(&policies(&yaml), ORDERS, false);
    assert_eq!(set.allow.generic.len(), 0);
    assert_eq!(set.allow.by_identity.len(), 10_000);
    let d = set.decide(&get(Some("spiffe://cluster.local/ns/n9999/sa/s"), "GET", "/"));
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, Some(9999)));
}

#[test]
fn deny_rules_with_http_fields_match_tcp_connections_allow_rules_do_not() {
    let yaml = r#"apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: DENY
  rules:
    - from: [{identities: ["spiffe://cluster.local/ns/shop/sa/web"]}]
      to: [{methods: ["GET"], paths: ["/admin/*"], ports: [8080]}]
      when: [{header: "x-tenant", values: ["acme"]}]
---
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: ALLOW
  rules:
    - to: [{methods: ["GET"], paths: ["/api/*"]}]
"#;
    let set = RuleSet::compile(&policies(yaml), ORDERS, false);
    let tcp = |source, port| Request { source, port, ..Default::default() };
    let d = set.decide(&tcp(Some(WEB), 8080));
    assert_eq!((d.verdict, d.basis, d.policy.as_deref()), (Verdict::Deny, Basis::DenyRule, Some("shop/no-admin")));
    // The DENY rule's caller and port still have to match.
    let d = set.decide(&tcp(Some(ORDERS), 8080));
    assert_eq!((d.verdict, d.basis), (Verdict::Deny, Basis::NoAllowMatched), "the ALLOW rule names HTTP fields");
    assert_eq!(set.decide(&tcp(Some(WEB), 9090)).basis, Basis::NoAllowMatched);
    // HTTP requests are matched on every field as before.
    let mut req = get(Some(WEB), "GET", "/api/x");
    assert_eq!(set.decide(&req).verdict, Verdict::Allow);
    req.path = Some("/admin/x");
    assert_eq!(set.decide(&req).basis, Basis::NoAllowMatched, "no x-tenant header: the DENY rule does not match");
    req.headers = &TENANT;
    assert_eq!(set.decide(&req).basis, Basis::DenyRule);
}

#[test]
fn methods_match_without_case_and_star_matches_any() {
    let yaml = BASE.replace("[\"GET\"]", "[\"*\"]");
    let set = RuleSet::compile(&policies(BASE), ORDERS, false);
    let mut req = get(Some(WEB), "gEt", "/api/items");
    req.headers = &TENANT;
    assert_eq!(set.decide(&req).verdict, Verdict::Allow);
    let star = RuleSet::compile(&policies(&yaml), ORDERS, false);
    assert_eq!(star.decide(&Request { method: Some("PROPFIND"), ..req }).verdict, Verdict::Allow);
    assert!(method_matches(&["*".into()], Some("DELETE")));
    assert!(!method_matches(&["*".into()], None), "a TCP connection has no method");
}
