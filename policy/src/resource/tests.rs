use crate::test_util::parse_all;

fn err(yaml: &str) -> String {
    parse_all(yaml).unwrap_err().to_string()
}

#[test]
fn the_design_example_parses_in_yaml_and_json() {
    let yaml = r#"
apiVersion: palisade.dev/v1
kind: RateLimitPolicy
metadata: {name: web-limit, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  limits:
    - name: per-caller
      match: {paths: ["/api/*"], methods: ["GET", "POST"]}
      key: identity
      algorithm: token_bucket
      rate: 100
      period: 1m
      burst: 20
      scope: sidecar
"#;
    let r = parse_all(yaml).unwrap();
    assert_eq!(r[0].key(), "shop/web-limit");
    let json = serde_json::to_string(&r[0]).unwrap();
    assert!(json.contains("\"kind\":\"RateLimitPolicy\""));
}

#[test]
fn errors_name_the_resource_the_field_and_the_fix() {
    let head = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n";
    let e = err(&format!("{head}spec:\n  target: {{identities: [\"x\"]}}\n  action: ALLOW\n"));
    assert!(e.contains("AuthorizationPolicy shop/p: spec.target.identities[0]: \"x\" must be a SPIFFE ID"), "{e}");
    let e = err(&format!("{head}spec:\n  target: {{identities: [\"*\"]}}\n  action: ALLOW\n  bogus: 1\n"));
    assert!(e.contains("spec.bogus: unknown field, expected one of"), "{e}");
    let e = err(&format!("{head}spec:\n  target: {{identities: [\"*\"]}}\n  action: MAYBE\n"));
    assert!(e.contains("MAYBE"), "{e}");
    let e = err(&format!(
        "{head}spec:\n  target: {{identities: [\"*\"]}}\n  action: ALLOW\n  rules:\n    - to: [{{methods: [\"get\"]}}]\n"
    ));
    assert!(e.contains("spec.rules[0].to[0].methods[0]: \"get\" is not an HTTP method"), "{e}");
    let e =
        err("apiVersion: palisade.dev/v2\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {}\n");
    assert!(e.contains("apiVersion: \"palisade.dev/v2\" is not supported"), "{e}");
    let e = err("apiVersion: palisade.dev/v1\nkind: Gateway\nmetadata: {name: p, namespace: shop}\nspec: {}\n");
    assert!(e.contains("kind: \"Gateway\" is not a Palisade policy kind"), "{e}");
    let rl = "apiVersion: palisade.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: r, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n  limits:\n";
    let e = err(&format!("{rl}    - {{name: a, algorithm: fixed_window, rate: 10, period: 1s, burst: 5}}\n"));
    assert!(e.contains("spec.limits[0].burst"), "{e}");
    let e = err(&format!("{rl}    - {{name: a, algorithm: token_bucket, rate: 10, period: soon}}\n"));
    assert!(e.contains("spec.limits[0].period: \"soon\" is not a duration"), "{e}");
    let e = err(&format!("{rl}    - {{name: a, algorithm: token_bucket, rate: 10, period: 1s, key: cookie}}\n"));
    assert!(e.contains("spec.limits[0].key"), "{e}");
    let e = err(&format!("{rl}    - {{name: a, algorithm: token_bucket, rate: 0, period: 1s}}\n"));
    assert!(e.contains("spec.limits[0].rate: \"0\" must be at least 1"), "{e}");
    let e = err(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: Bad_Name, namespace: shop}\nspec: {target: {identities: [\"*\"]}, action: DENY}\n",
    );
    assert!(e.contains("metadata.name"), "{e}");
}

#[test]
fn the_shipped_examples_are_valid() {
    let dirs = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo"),
    ];
    let mut n = 0;
    for dir in dirs {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                n += parse_all(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
            }
        }
    }
    assert!(n >= 5, "found {n} resources");
}

#[test]
fn authentication_policies_are_validated_with_field_paths() {
    let head = "apiVersion: palisade.dev/v1\nkind: AuthenticationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n";
    let ok = parse_all(&format!(
        "{head}  mode: optional\n  apiKeys: {{header: x-api-key}}\n  jwt:\n    - issuer: https://idp.example\n      audiences: [orders]\n      jwksUri: https://idp.example/jwks.json\n      claimsToHeaders: [{{claim: tenant, header: x-tenant}}]\n      typ: at+jwt\n"
    ))
    .unwrap();
    assert_eq!(ok[0].kind(), "AuthenticationPolicy");
    let cases = [
        ("", "spec: \"\" names no credential"),
        ("  jwt: [{issuer: i, audiences: []}]\n", "spec.jwt[0].audiences"),
        ("  jwt: [{issuer: i, audiences: [a], jwksUri: http://idp/jwks}]\n", "spec.jwt[0].jwksUri"),
        (
            "  jwt: [{issuer: i, audiences: [a], algorithms: [HS256]}]\n",
            "spec.jwt[0].algorithms[0]: \"HS256\" is not accepted",
        ),
        ("  jwt: [{issuer: i, audiences: [a], algorithms: [none]}]\n", "spec.jwt[0].algorithms[0]"),
        ("  jwt: [{issuer: i, audiences: [a], jwks: {keys: []}}]\n", "spec.jwt[0].jwks"),
        (
            "  jwt: [{issuer: i, audiences: [a], claimsToHeaders: [{claim: sub, header: x-palisade-peer-identity}]}]\n",
            "spec.jwt[0].claimsToHeaders[0].header",
        ),
        ("  jwt: [{issuer: i, audiences: [a], clockSkew: 1h}]\n", "spec.jwt[0].clockSkew"),
        ("  jwt: [{issuer: i, audiences: [a]}, {issuer: i, audiences: [b]}]\n", "spec.jwt[1].issuer"),
        ("  apiKeys: {header: authorization}\n", "spec.apiKeys.header"),
        ("  mode: sometimes\n  apiKeys: {}\n", "sometimes"),
    ];
    for (body, want) in cases {
        let e = err(&format!("{head}{body}"));
        assert!(e.contains(want), "{body}: {e}");
    }
    let authz = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n  action: ALLOW\n  rules:\n";
    let e = err(&format!("{authz}    - when: [{{header: x, claim: tier, values: [a]}}]\n"));
    assert!(e.contains("spec.rules[0].when[0]") && e.contains("exactly one"), "{e}");
    let e = err(&format!("{authz}    - from: [{{requestPrincipals: [\"\"]}}]\n"));
    assert!(e.contains("spec.rules[0].from[0].requestPrincipals[0]"), "{e}");
    assert!(parse_all(&format!("{authz}    - from: [{{apiKeys: [ci], requestPrincipals: [\"https://idp/*\"]}}]\n      when: [{{claim: scope, values: [read]}}]\n")).is_ok());
}

#[test]
fn periods_skews_and_reserved_headers_have_their_bounds() {
    use std::time::Duration;

    use crate::resource::{parse_clock_skew, parse_period, reserved_header};

    assert_eq!(parse_period("1m"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_period("24h"), Ok(Duration::from_secs(86400)));
    for bad in ["25h", "0s", "soon"] {
        assert!(parse_period(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_clock_skew(None), Ok(Duration::from_secs(60)));
    assert_eq!(parse_clock_skew(Some("5m")), Ok(Duration::from_secs(300)));
    assert_eq!(parse_clock_skew(Some("6m")), Err("must be at most 5m"));
    for h in ["X-Palisade-Peer-Identity", "Host", "content-length", ":authority", "Cookie", "Authorization"] {
        assert!(reserved_header(h), "{h}");
    }
    for h in ["x-request-id", "x-api-key", "server"] {
        assert!(!reserved_header(h), "{h}");
    }
}

#[test]
fn a_misspelt_field_is_named_by_its_exact_path_in_every_kind() {
    let doc = |kind: &str, spec: &str| {
        format!(
            "apiVersion: palisade.dev/v1\nkind: {kind}\nmetadata: {{name: p, namespace: shop}}\nspec:\n  target: {{identities: [\"*\"]}}\n{spec}"
        )
    };
    let authz = |s: &str| doc("AuthorizationPolicy", &format!("  action: ALLOW\n{s}"));
    let limits = |s: &str| {
        doc(
            "RateLimitPolicy",
            &format!("  limits:\n    - {{name: a, algorithm: token_bucket, rate: 1, period: 1s, {s}}}\n"),
        )
    };
    let authn = |s: &str| doc("AuthenticationPolicy", s);
    let traffic = |s: &str| doc("TrafficPolicy", s);
    let cases = [
        (
            authz("  rules:\n    - form: [{identities: [\"*\"]}]\n"),
            "AuthorizationPolicy shop/p: spec.rules[0].form: unknown field, expected one of `from`, `to`, `when`",
        ),
        (
            authz("  rules:\n    - from: [{identites: [\"*\"]}]\n"),
            "spec.rules[0].from[0].identites: unknown field, expected one of",
        ),
        (
            authz("  rules:\n    - to: [{method: [GET]}]\n"),
            "spec.rules[0].to[0].method: unknown field, expected one of `methods`",
        ),
        (authz("  rules:\n    - when: [{heder: x, values: [a]}]\n"), "spec.rules[0].when[0].heder: unknown field"),
        (authz("  rules:\n    - to: [{ports: [http]}]\n"), "spec.rules[0].to[0].ports[0]: invalid type"),
        (
            doc("AuthorizationPolicy", "  action: ALLOW\n  rule: []\n"),
            "spec.rule: unknown field, expected one of `target`, `action`, `rules`",
        ),
        (limits("match: {path: [/x]}"), "spec.limits[0].match.path: unknown field, expected `paths` or `methods`"),
        (limits("sope: cluster"), "spec.limits[0].sope: unknown field"),
        (authn("  apiKeys: {headr: x-api-key}\n"), "spec.apiKeys.headr: unknown field, expected `header`"),
        (authn("  jwt: [{issuer: i, audiences: [a], jwksURI: https://i/j}]\n"), "spec.jwt[0].jwksURI: unknown field"),
        (
            authn("  jwt: [{issuer: i, audiences: [a], claimsToHeaders: [{claims: a, header: x-a}]}]\n"),
            "spec.jwt[0].claimsToHeaders[0].claims: unknown field",
        ),
        (
            authn("  jwt: [{issuer: i, audiences: [a], fromHeaders: [{nme: x}]}]\n"),
            "spec.jwt[0].fromHeaders[0].nme: unknown field",
        ),
        (
            traffic("  requestHeaders: {sett: {a: b}}\n"),
            "spec.requestHeaders.sett: unknown field, expected one of `set`, `add`, `remove`",
        ),
        (traffic("  securityHeaders: {hst: true}\n"), "spec.securityHeaders.hst: unknown field"),
        (traffic("  cors: {allowOrigin: [\"*\"]}\n"), "spec.cors.allowOrigin: unknown field"),
        (traffic("  validation: {maxBody: 10}\n"), "spec.validation.maxBody: unknown field"),
        (
            traffic("  routes: [{backends: [{service: a.shop, wieght: 1}]}]\n"),
            "spec.routes[0].backends[0].wieght: unknown field, expected `service` or `weight`",
        ),
        (
            traffic("  routes: [{match: {prefix: /v2}, backends: [{service: a.shop}]}]\n"),
            "spec.routes[0].match.prefix: unknown field",
        ),
        (
            doc("TrafficPolicy", "").replace("target: {identities", "target: {identity"),
            "spec.target.identity: unknown field, expected `identities`",
        ),
        (
            doc("AuthorizationPolicy", "  action: ALLOW\n").replace("namespace: shop", "namespace: shop, label: x"),
            "metadata.label: unknown field",
        ),
    ];
    for (yaml, want) in cases {
        let e = err(&yaml);
        assert!(e.contains(want), "want {want:?} in:\n{e}\nfrom:\n{yaml}");
    }
}
