//! The enforcer beside its code: every rule field and every rate-limit key,
//! through the same `Enforcer` the sidecar runs and the control plane
//! explains with.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::eval::{Basis, HeaderList, Verdict};
use crate::test_util::parse_all;

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const INVOICES: &str = "spiffe://cluster.local/ns/billing/sa/invoices";
const IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn enforcer_with(yaml: &str, shares: &HashMap<String, u64>) -> Enforcer {
    let resources = parse_all(yaml).unwrap();
    let inputs = Inputs { version: "r1", resources: &resources, rate_shares: shares, ..Inputs::none() };
    Enforcer::compile(inputs, ORDERS, None).unwrap()
}

fn enforcer(yaml: &str) -> Enforcer {
    enforcer_with(yaml, &HashMap::new())
}

fn authz(rule: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  action: ALLOW\n  rules:\n    - {rule}\n"
    )
}

fn limit(fields: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: RateLimitPolicy\nmetadata: {{name: l, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  limits:\n    - {{name: x, algorithm: fixed_window, rate: 1, period: 1h, {fields}}}\n"
    )
}

fn http<'a>(source: Option<&'a str>, method: &'a str, path: &'a str, headers: &'a HeaderList<'a>) -> Request<'a> {
    Request {
        source,
        method: Some(method),
        path: Some(path),
        port: 8080,
        host: Some("orders.shop"),
        headers,
        auth: None,
    }
}

const NONE: HeaderList<'static> = HeaderList(&[]);

#[test]
fn every_rule_field_allows_what_it_names_and_nothing_else() {
    let tenant = HeaderList(&[("x-tenant", "acme")]);
    let base = http(Some(WEB), "GET", "/api/x", &NONE);
    // (rule, a request it allows, a request it does not)
    let cases: Vec<(&str, Request<'_>, Request<'_>)> = vec![
        (
            "from: [{identities: [\"spiffe://cluster.local/ns/shop/*\"]}]",
            base,
            Request { source: Some(INVOICES), ..base },
        ),
        (
            "from: [{notIdentities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]",
            Request { source: Some(INVOICES), ..base },
            base,
        ),
        ("from: [{namespaces: [\"shop\"]}]", base, Request { source: Some(INVOICES), ..base }),
        ("from: [{notNamespaces: [\"shop\"]}]", Request { source: Some(INVOICES), ..base }, base),
        ("from: [{unauthenticated: true}]", Request { source: None, ..base }, base),
        (
            "to: [{methods: [\"GET\"]}]",
            Request { method: Some("get"), ..base },
            Request { method: Some("POST"), ..base },
        ),
        (
            "to: [{methods: [\"*\"]}]",
            Request { method: Some("PROPFIND"), ..base },
            Request { method: None, path: None, ..base },
        ),
        ("to: [{paths: [\"/api/*\"]}]", base, Request { path: Some("/admin"), ..base }),
        ("to: [{paths: [\"/api/x\"]}]", base, Request { path: Some("/api/xy"), ..base }),
        ("to: [{ports: [8080]}]", base, Request { port: 9090, ..base }),
        ("to: [{hosts: [\"orders.*\"]}]", base, Request { host: Some("evil.example"), ..base }),
        ("when: [{header: \"x-tenant\", values: [\"ac*\"]}]", Request { headers: &tenant, ..base }, base),
    ];
    for (rule, yes, no) in cases {
        let e = enforcer(&authz(rule));
        let d = e.authorize(&yes);
        assert_eq!(
            (d.verdict, d.policy.as_deref(), d.rule),
            (Verdict::Allow, Some("shop/p"), Some(0)),
            "{rule}: {yes:?}"
        );
        assert_eq!(e.policies()[d.policy_id.unwrap()].as_ref(), "shop/p");
        let d = e.authorize(&no);
        assert_eq!((d.verdict, d.basis), (Verdict::Deny, Basis::NoAllowMatched), "{rule}: {no:?}");
    }
}

#[test]
fn every_rate_limit_key_counts_by_what_it_names() {
    let a = HeaderList(&[("x-user", "a")]);
    let b = HeaderList(&[("x-user", "b")]);
    let web = http(Some(WEB), "GET", "/x", &a);
    let cases: Vec<(&str, Request<'_>, IpAddr, Request<'_>, IpAddr)> = vec![
        // (key, first request, its ip, a second request in another bucket, its ip)
        ("identity", web, IP, Request { source: Some(INVOICES), ..web }, IP),
        ("header:X-User", web, IP, Request { headers: &b, ..web }, IP),
        ("source_ip", web, IP, web, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))),
    ];
    for (key, first, ip, other, other_ip) in cases {
        let e = enforcer(&limit(&format!("key: \"{key}\"")));
        assert!(e.rate_limit(&first, ip).is_none(), "{key}: the first request of the hour passes");
        let limited = e.rate_limit(&first, ip).unwrap_or_else(|| panic!("{key}: the second is limited"));
        assert_eq!((limited.policy.as_ref(), limited.limit.as_ref()), ("shop/l", "x"));
        assert!(e.rate_limit(&other, other_ip).is_none(), "{key}: another bucket");
    }
    // none: one bucket for everyone; unauthenticated callers share one identity bucket.
    let e = enforcer(&limit("key: none"));
    assert!(e.rate_limit(&web, IP).is_none());
    assert!(e.rate_limit(&Request { source: Some(INVOICES), ..web }, IP).is_some());
    let e = enforcer(&limit("key: identity"));
    assert!(e.rate_limit(&Request { source: None, ..web }, IP).is_none());
    assert!(e.rate_limit(&Request { source: None, ..web }, IP).is_some());
}

#[test]
fn a_limit_applies_only_to_the_requests_it_matches() {
    let e = enforcer(&limit("key: none, match: {methods: [\"*\"], paths: [\"/api/*\"]}"));
    let get = http(Some(WEB), "GET", "/api/x", &NONE);
    assert_eq!(e.limits_for(&get).len(), 1, "a '*' method matches");
    assert!(e.limits_for(&Request { path: Some("/other"), ..get }).is_empty());
    assert!(e.limits_for(&Request::default()).is_empty(), "TCP connections are not rate limited");
    let e = enforcer(&limit("key: none, match: {methods: [\"POST\"]}"));
    assert!(e.rate_limit(&Request { method: Some("post"), ..get }, IP).is_none());
    assert!(e.rate_limit(&Request { method: Some("post"), ..get }, IP).is_some(), "case does not dodge it");
    assert!(e.rate_limit(&get, IP).is_none(), "GET is not counted");
}

#[test]
fn cluster_scope_uses_this_replicas_share_and_counters_survive_a_recompile() {
    let yaml = limit("key: none, scope: cluster").replace("rate: 1,", "rate: 10,");
    let shares = HashMap::from([("shop/l/x".to_string(), 4)]);
    let e = enforcer_with(&yaml, &shares);
    let get = http(Some(WEB), "GET", "/x", &NONE);
    assert_eq!(e.limits_for(&get)[0].rate, 4);
    assert_eq!(e.limits_for(&get)[0].to_string(), "shop/l/x: 4/1h fixed_window key=none burst=0 scope=cluster");
    for _ in 0..4 {
        assert!(e.rate_limit(&get, IP).is_none());
    }
    let resources = parse_all(&yaml).unwrap();
    let inputs = Inputs { version: "r2", resources: &resources, rate_shares: &shares, ..Inputs::none() };
    let again = Enforcer::compile(inputs, ORDERS, Some(&e)).unwrap();
    assert!(again.rate_limit(&get, IP).is_some(), "the used quota carries over an unchanged limit");
}

#[test]
fn other_workloads_policies_are_left_out() {
    let yaml = authz("from: [{namespaces: [\"*\"]}]").replace(ORDERS, INVOICES);
    let e = enforcer(&yaml);
    assert!(e.policies().is_empty());
    assert_eq!(e.authorize(&http(Some(WEB), "GET", "/", &NONE)).basis, Basis::DefaultDeny);
}

#[test]
fn request_principals_api_keys_and_claims_in_rules_and_limits() {
    let yaml = format!(
        "{}---\n{}",
        authz(&format!(
            "{{from: [{{identities: [\"{WEB}\"], requestPrincipals: [\"https://idp/*\"]}}], when: [{{claim: scope, values: [\"orders.write\"]}}]}}\n    - {{from: [{{apiKeys: [\"ci-*\"]}}], to: [{{methods: [GET]}}]}}"
        )),
        limit("key: principal")
    );
    let e = enforcer(&yaml);
    let claims = |scope: &str| serde_json::json!({"scope": scope}).as_object().unwrap().clone();
    let jwt = crate::Authenticated::given(Some("https://idp/c1".into()), None, claims("orders.read orders.write"));
    let reader = crate::Authenticated::given(Some("https://idp/c2".into()), None, claims("orders.read"));
    let key = crate::Authenticated::given(Some("team/ci".into()), Some("ci-main".into()), Default::default());
    let with = |auth, source, method| Request { auth: Some(auth), ..http(source, method, "/x", &NONE) };
    // Workload AND principal AND claim.
    assert_eq!(e.authorize(&with(&jwt, Some(WEB), "POST")).verdict, Verdict::Allow);
    assert_eq!(e.authorize(&with(&jwt, Some(INVOICES), "POST")).verdict, Verdict::Deny, "another workload");
    assert_eq!(e.authorize(&with(&reader, Some(WEB), "POST")).verdict, Verdict::Deny, "scope missing");
    assert_eq!(e.authorize(&http(Some(WEB), "POST", "/x", &NONE)).verdict, Verdict::Deny, "no credential");
    // An API key by name, from any workload.
    assert_eq!(e.authorize(&with(&key, Some(INVOICES), "GET")).rule, Some(1));
    assert_eq!(e.authorize(&with(&key, Some(INVOICES), "POST")).verdict, Verdict::Deny);
    // Per-principal quota: one each.
    assert!(e.rate_limit(&with(&jwt, Some(WEB), "GET"), IP).is_none());
    assert!(e.rate_limit(&with(&jwt, Some(WEB), "GET"), IP).is_some());
    assert!(e.rate_limit(&with(&reader, Some(WEB), "GET"), IP).is_none(), "another client's own bucket");
}

#[test]
fn a_deny_naming_principals_holds_for_tcp_and_not_principals_catches_anonymous() {
    let yaml = format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: d, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  action: DENY\n  rules:\n    - from: [{{notRequestPrincipals: [\"*\"]}}]\n      to: [{{paths: [\"/admin/*\"]}}]\n"
    );
    let e = enforcer(&yaml);
    let tcp = Request { source: Some(WEB), port: 8080, ..Default::default() };
    assert_eq!(e.authorize(&tcp).verdict, Verdict::Deny);
    assert_eq!(e.authorize(&http(Some(WEB), "GET", "/admin/x", &NONE)).basis, crate::eval::Basis::DenyRule);
    let p = crate::Authenticated::given(Some("https://idp/c1".into()), None, Default::default());
    let d = e.authorize(&Request { auth: Some(&p), ..http(Some(WEB), "GET", "/admin/x", &NONE) });
    assert_ne!(d.basis, crate::eval::Basis::DenyRule);
}
