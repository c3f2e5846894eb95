//! One pipeline, one test per outcome: what the sidecar enforces and what
//! `authz check` explains come from the same call.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::eval::HeaderList;
use crate::test_util::parse_all;
use crate::{Inputs, Resource};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORIGIN: &str = "https://shop.example.com";
const IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn meta(kind: &str, name: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n"
    )
}

/// The browser walk-through's shape: GET and POST from web, CORS for the
/// shop's origin, validation to GET/POST JSON, an API key required, a limit.
fn mesh() -> Vec<Resource> {
    let text = [
        meta("AuthorizationPolicy", "orders")
            + "  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n      to: [{methods: [GET, POST], paths: [\"/orders*\"]}]\n",
        meta("TrafficPolicy", "orders-edge")
            + &format!("  cors: {{allowOrigins: [\"{ORIGIN}\"], allowMethods: [GET, POST], allowHeaders: [content-type]}}\n")
            + "  validation: {methods: [GET, POST], contentTypes: [application/json], maxBodyBytes: 1024}\n"
            + "  requestHeaders: {set: {x-caller: \"${caller}\"}}\n  responseHeaders: {set: {x-frame-options: DENY}}\n",
        meta("RateLimitPolicy", "orders-limit")
            + "  limits:\n    - {name: per-caller, algorithm: fixed_window, rate: 2, period: 1h, key: identity}\n",
    ]
    .join("---\n");
    parse_all(&text).unwrap()
}

fn with_authn(mut r: Vec<Resource>) -> Vec<Resource> {
    let text = meta("AuthenticationPolicy", "orders-api") + "  mode: required\n  apiKeys: {header: x-api-key}\n";
    r.extend(parse_all(&text).unwrap());
    r
}

fn enforcer(resources: &[Resource]) -> Enforcer {
    Enforcer::compile(Inputs { version: "t", resources, ..Inputs::none() }, ORDERS, None).unwrap()
}

fn head<'a>(method: &'a str, path: &'a str, headers: &'a HeaderList<'a>) -> RequestHead<'a> {
    RequestHead {
        source: Some(WEB),
        caller_expired: false,
        method,
        path,
        query: None,
        host: Some("orders.shop"),
        port: 8080,
        headers,
        content_length: None,
        has_body: false,
    }
}

const ENFORCE: Mode<'static> = Mode::Enforce { now: 1_800_000_000, src_ip: IP, record: false };

fn ops(o: &Outcome<'_>, request: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut f = |op: HeaderOp<'_>| out.push(format!("{op:?}"));
    if request {
        o.for_each_request_op(&mut f)
    } else {
        o.for_each_response_op(&mut f)
    }
    out
}

#[test]
fn a_preflight_is_answered_by_the_sidecar_and_explained_the_same() {
    let e = enforcer(&with_authn(mesh()));
    let h = HeaderList(&[("origin", ORIGIN), ("access-control-request-method", "POST")]);
    let o = e.decide(&head("OPTIONS", "/orders", &h), ENFORCE);
    assert!(matches!(o.action, Action::Preflight { allowed: true }), "{o:?}");
    let resp = ops(&o, false);
    assert!(resp.iter().any(|s| s.contains("access-control-allow-origin") && s.contains(ORIGIN)), "{resp:?}");
    assert!(resp.iter().any(|s| s.contains("x-frame-options")), "response changes apply to it too: {resp:?}");
    // The explanation (no credential given: it is not needed for a preflight).
    let x = e.explain(&head("OPTIONS", "/orders", &h), None, 1_800_000_000);
    assert_eq!(x.decision, "preflight", "{x:?}");
    assert_eq!(x.status, Some(204));
    assert!(x.cors.contains("preflight from https://shop.example.com allowed"), "{x:?}");
    // A foreign origin gets a 204 without the headers.
    let foreign = HeaderList(&[("origin", "https://evil.example"), ("access-control-request-method", "POST")]);
    let o = e.decide(&head("OPTIONS", "/orders", &foreign), ENFORCE);
    assert!(matches!(o.action, Action::Preflight { allowed: false }));
    assert!(!ops(&o, false).iter().any(|s| s.contains("allow-origin")));
}

#[test]
fn validation_refuses_before_authentication_with_the_status_and_allow_header() {
    let e = enforcer(&with_authn(mesh()));
    let o = e.decide(&head("DELETE", "/orders", &HeaderList(&[])), ENFORCE);
    let r = o.refusal().expect("refused");
    assert_eq!((r.kind, r.status, r.message), (Refused::Invalid, 405, "method not allowed"));
    assert!(r.headers.iter().any(|(n, v)| *n == "allow" && v.contains("POST")), "{r:?}");
    assert_eq!(o.policy.as_deref(), Some("shop/orders-edge"));
    assert!(matches!(o.authn, Authn::NotChecked), "validation comes before authentication");
    let x = e.explain(&head("DELETE", "/orders", &HeaderList(&[])), None, 1_800_000_000);
    assert_eq!((x.decision, x.status), ("invalid", Some(405)));
    assert!(x.reason.contains("TrafficPolicy shop/orders-edge refuses it with 405"), "{x:?}");
}

#[test]
fn a_path_without_a_normal_form_is_invalid_and_one_with_is_decided_on_it() {
    let e = enforcer(&mesh());
    let o = e.decide(&head("GET", "/orders/%2F..", &HeaderList(&[])), ENFORCE);
    let r = o.refusal().expect("refused");
    assert_eq!((r.kind, r.status), (Refused::Invalid, 400));
    assert_eq!(o.policy, None);
    let o = e.decide(&head("GET", "/x/../orders//1", &HeaderList(&[])), ENFORCE);
    assert_eq!(o.normal_path.as_deref(), Some("/orders/1"));
    assert!(matches!(o.action, Action::Forward), "{o:?}");
}

#[test]
fn a_missing_credential_is_unauthenticated_with_a_challenge_and_the_reason_stays_inside() {
    let e = enforcer(&with_authn(mesh()));
    let o = e.decide(&head("GET", "/orders", &HeaderList(&[])), ENFORCE);
    let r = o.refusal().expect("refused");
    assert_eq!((r.kind, r.status, r.message), (Refused::Unauthenticated, 401, "unauthenticated"));
    assert!(r.headers.iter().any(|(n, _)| *n == "www-authenticate"));
    assert!(matches!(o.authn, Authn::Refused(_)));
    let x = e.explain(&head("GET", "/orders", &HeaderList(&[])), None, 1_800_000_000);
    assert_eq!(x.decision, "unauthenticated");
    assert!(x.reason.starts_with("AuthenticationPolicy shop/orders-api requires a request credential"), "{x:?}");
    // A verified key reaches authorization, and the app gets its principal, never the key.
    let h = HeaderList(&[("x-api-key", "pal_not_a_key")]);
    let o = e.decide(&head("GET", "/orders", &h), ENFORCE);
    assert_eq!(o.refusal().map(|r| r.kind), Some(Refused::Unauthenticated), "an unknown key is refused");
    // Given a principal, the explanation goes on to authorization.
    let given = Authenticated::given(Some("acme".into()), None, Default::default());
    assert_eq!(e.explain(&head("GET", "/orders", &HeaderList(&[])), Some(&given), 1_800_000_000).decision, "allow");
}

#[test]
fn authorization_denies_with_the_rule_and_allows_with_the_changes() {
    let e = enforcer(&mesh());
    let o = e.decide(&RequestHead { source: None, ..head("GET", "/orders", &HeaderList(&[])) }, ENFORCE);
    let r = o.refusal().expect("refused");
    assert_eq!((r.kind, r.status, r.message), (Refused::Forbidden, 403, "forbidden"));
    assert!(o.decision.is_some());
    let h = HeaderList(&[("origin", ORIGIN), ("content-type", "application/json")]);
    let o = e.decide(&RequestHead { has_body: true, ..head("POST", "/orders", &h) }, ENFORCE);
    assert!(matches!(o.action, Action::Forward), "{o:?}");
    assert_eq!((o.policy.as_deref(), o.rule), (Some("shop/orders"), Some(0)));
    assert_eq!(o.body.and_then(|b| b.cap), Some(1024), "the body check is part of the outcome");
    assert_eq!(ops(&o, true), vec![format!("Set(\"x-caller\", \"{WEB}\")")]);
    let resp = ops(&o, false);
    assert!(
        resp.contains(&"Remove(\"access-control-allow-origin\")".to_string()),
        "the app's CORS headers go: {resp:?}"
    );
    assert!(resp.contains(&format!("Set(\"access-control-allow-origin\", \"{ORIGIN}\")")), "{resp:?}");
    assert!(resp.contains(&"Append(\"vary\", \"Origin\")".to_string()), "{resp:?}");
}

#[test]
fn rate_limits_refuse_when_enforced_and_are_listed_when_explained() {
    let e = enforcer(&mesh());
    let h = HeaderList(&[]);
    for _ in 0..2 {
        assert!(matches!(e.decide(&head("GET", "/orders", &h), ENFORCE).action, Action::Forward));
    }
    let o = e.decide(&head("GET", "/orders", &h), ENFORCE);
    let r = o.refusal().expect("refused");
    assert_eq!((r.kind, r.status), (Refused::RateLimited, 429));
    assert!(r.headers.iter().any(|(n, _)| *n == "retry-after"));
    assert_eq!(o.policy.as_deref(), Some("shop/orders-limit"));
    // Explaining counts nothing, however often.
    for _ in 0..5 {
        let x = e.explain(&head("GET", "/orders", &h), None, 1_800_000_000);
        assert_eq!(x.decision, "allow");
        assert_eq!(x.rate_limits.len(), 1, "{x:?}");
    }
}

#[test]
fn an_expired_caller_is_refused_first_and_not_ready_says_retry() {
    let e = enforcer(&mesh());
    let h = HeaderList(&[("origin", ORIGIN), ("access-control-request-method", "POST")]);
    let o = e.decide(&RequestHead { caller_expired: true, ..head("OPTIONS", "/orders", &h) }, ENFORCE);
    assert_eq!(o.refusal().map(|r| (r.kind, r.status)), Some((Refused::Forbidden, 403)));
    let o = Outcome::not_ready();
    let r = o.refusal().unwrap();
    assert_eq!((r.kind, r.status), (Refused::NotReady, 503));
    assert!(r.headers.contains(&("retry-after", "1".into())));
}

#[test]
fn a_connection_is_decided_on_its_caller_and_port_and_refused_where_a_credential_is_required() {
    // The ALLOW rule names methods and paths: a connection carries none, so it does not match.
    let e = enforcer(&mesh());
    let o = e.decide_connection(Some(WEB), 8080);
    assert_eq!(o.refusal().map(|r| r.kind), Some(Refused::Forbidden), "{o:?}");
    let text = meta("AuthorizationPolicy", "tcp")
        + "  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n";
    let tcp = parse_all(&text).unwrap();
    assert!(matches!(enforcer(&tcp).decide_connection(Some(WEB), 8080).action, Action::Forward));
    let e = enforcer(&with_authn(tcp));
    let o = e.decide_connection(Some(WEB), 8080);
    assert_eq!(o.refusal().map(|r| r.kind), Some(Refused::Unauthenticated), "opaque TCP carries no credential");
}

#[test]
fn a_verified_key_reaches_the_app_as_its_principal_never_as_the_key() {
    let hex: String = crate::authn::sha256(b"pal_good").iter().map(|b| format!("{b:02x}")).collect();
    let keys = [crate::ApiKey { name: "ci".into(), principal: "team/ci".into(), sha256: hex, expires_at: 0 }];
    let resources = with_authn(mesh());
    let e = Enforcer::compile(
        Inputs { version: "t", resources: &resources, api_keys: &keys, ..Inputs::none() },
        ORDERS,
        None,
    )
    .unwrap();
    let h = HeaderList(&[("x-api-key", "pal_good"), (PRINCIPAL_HEADER, "forged")]);
    let o = e.decide(&head("GET", "/orders", &h), ENFORCE);
    assert!(matches!(o.action, Action::Forward), "{o:?}");
    assert!(matches!(&o.authn, Authn::Verified(a) if a.principal.as_deref() == Some("team/ci")));
    let ops = ops(&o, true);
    assert!(ops.contains(&"Remove(\"x-api-key\")".to_string()), "{ops:?}");
    assert!(ops.contains(&format!("Set(\"{PRINCIPAL_HEADER}\", \"team/ci\")")), "{ops:?}");
}

#[test]
fn an_explanation_verifies_the_credential_its_headers_carry_as_the_sidecar_does() {
    let text = meta("AuthenticationPolicy", "keys") + "  mode: optional\n  apiKeys: {header: x-api-key}\n";
    let mut resources = mesh();
    resources.extend(parse_all(&text).unwrap());
    let e = enforcer(&resources);
    let bad = HeaderList(&[("x-api-key", "pal_revoked_or_made_up")]);
    let x = e.explain(&head("GET", "/orders", &bad), None, 1_800_000_000);
    assert_eq!((x.decision, x.status), ("unauthenticated", Some(401)), "{x:?}");
    assert_eq!(e.decide(&head("GET", "/orders", &bad), ENFORCE).label(), "unauthenticated");
    // A lower-case `options` preflight is a preflight on both sides too.
    let h = HeaderList(&[("origin", ORIGIN), ("access-control-request-method", "POST")]);
    assert_eq!(e.explain(&head("options", "/orders", &h), None, 1_800_000_000).decision, "preflight");
    assert_eq!(e.decide(&head("options", "/orders", &h), ENFORCE).label(), "preflight");
}

#[test]
fn the_outcome_stays_small_as_it_is_moved_on_every_request() {
    // The rare parts (a refusal, a sample, a limit, header changes) are boxed.
    assert!(std::mem::size_of::<Outcome<'_>>() <= 256, "{}", std::mem::size_of::<Outcome<'_>>());
}
