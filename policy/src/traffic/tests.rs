use super::*;

#[test]
fn cors_allows_named_origins_and_never_reflects_others() {
    let c: Cors = serde_json::from_value(serde_json::json!({
        "allowOrigins": ["https://app.example.com", "https://*.example.org"],
        "allowMethods": ["GET", "PUT"], "allowHeaders": ["x-token"], "exposeHeaders": ["x-total"],
        "allowCredentials": true, "maxAge": 60}))
    .unwrap();
    let p = CorsPolicy::compile("shop/c", &c);
    assert!(p.allows("https://app.example.com") && p.allows("https://a.example.org"));
    for o in [
        "https://evil.com",
        "https://a.b.example.org",
        "https://example.org",
        "https://app.example.com.evil.com",
        "null",
        "http://app.example.com",
        "https://.example.org",
    ] {
        assert!(!p.allows(o), "{o}");
    }
    let pf = p.preflight("https://app.example.com", "PUT", Some("X-Token")).unwrap();
    assert!(pf.contains(&("access-control-allow-origin", "https://app.example.com".into())));
    assert!(pf.contains(&("access-control-allow-credentials", "true".into())));
    assert!(pf.contains(&("access-control-allow-headers", "x-token".into())));
    assert!(p.preflight("https://app.example.com", "DELETE", None).is_none());
    assert!(p.preflight("https://app.example.com", "PUT", Some("x-other")).is_none());
    assert!(p.actual("https://evil.com").is_none());
    let any: Cors = serde_json::from_value(serde_json::json!({"allowOrigins": ["*"]})).unwrap();
    let a = CorsPolicy::compile("shop/a", &any);
    assert_eq!(a.actual("https://x.test").unwrap()[0].1, "*");
    assert!(!a.allows("null"), "null only when named");
    let bad = spec(
        serde_json::json!({"target": {"identities": ["*"]}, "cors": {"allowOrigins": ["*"], "allowCredentials": true}}),
    );
    assert_eq!(validate(&bad).unwrap_err().0, "spec.cors.allowOrigins[0]");
    let bad = spec(serde_json::json!({"target": {"identities": ["*"]}, "cors": {"allowOrigins": ["https://*.*.com"]}}));
    assert_eq!(validate(&bad).unwrap_err().0, "spec.cors.allowOrigins[0]");
}

#[test]
fn validation_checks_method_media_type_and_length() {
    let s = spec(serde_json::json!({"target": {"identities": ["*"]},
        "validation": {"methods": ["GET", "POST"], "contentTypes": ["application/json", "text/*"], "maxBodyBytes": 100}}));
    validate(&s).unwrap();
    let c = Checks::compile(&[("shop/v".into(), &s)]);
    let head =
        |method, ct, len, body| Head { method, query: None, content_type: ct, content_length: len, has_body: body };
    assert_eq!(c.check(&head("GET", None, None, false)).unwrap().cap, Some(100));
    let e = c.check(&head("DELETE", None, None, false)).unwrap_err();
    assert_eq!((e.status, e.allow.as_deref()), (405, Some("GET, POST")));
    assert_eq!(c.check(&head("POST", Some("application/json; charset=utf-8"), Some(10), true)).unwrap().cap, Some(100));
    assert_eq!(c.check(&head("POST", Some("Text/Plain"), Some(10), true)).unwrap().cap, Some(100));
    assert_eq!(c.check(&head("POST", Some("application/xml"), Some(10), true)).unwrap_err().status, 415);
    assert_eq!(c.check(&head("POST", None, Some(10), true)).unwrap_err().status, 415);
    assert_eq!(c.check(&head("POST", Some("application/json"), Some(101), true)).unwrap_err().status, 413);
    let q = spec(
        serde_json::json!({"target": {"identities": ["*"]}, "validation": {"maxQueryParams": 2, "maxQueryBytes": 12}}),
    );
    let c = Checks::compile(&[("shop/q".into(), &q)]);
    let with = |query| Head { method: "GET", query: Some(query), ..Default::default() };
    assert_eq!(c.check(&with("a=1&b=2")), Ok(BodyRule::default()));
    assert_eq!(c.check(&with("a=1&b=2&c")).unwrap_err().status, 400);
    assert_eq!(c.check(&with("a=12345678901")).unwrap_err().status, 414);
    let bad = spec(serde_json::json!({"target": {"identities": ["*"]}, "validation": {"contentTypes": ["json"]}}));
    assert_eq!(validate(&bad).unwrap_err().0, "spec.validation.contentTypes[0]");
}

fn spec(yaml_like: serde_json::Value) -> TrafficSpec {
    serde_json::from_value(yaml_like).unwrap()
}

#[test]
fn compiles_in_order_with_security_defaults_and_variables() {
    let s = spec(serde_json::json!({
        "target": {"identities": ["*"]},
        "requestHeaders": {"set": {"x-caller": "${caller} via ${principal}"}, "remove": ["x-debug"]},
        "responseHeaders": {"add": {"x-served-by": "orders"}},
        "securityHeaders": {"hsts": true, "frameOptions": "SAMEORIGIN", "contentSecurityPolicy": {"value": "default-src 'self'", "always": true}, "removeServerHeaders": true},
    }));
    validate(&s).unwrap();
    let r = Rewrites::compile(&[&s]);
    assert_eq!(r.request[0], Op::Remove("x-debug".into()));
    let Op::Set(name, t) = &r.request[1] else { panic!() };
    assert_eq!(name, "x-caller");
    let vars = Vars { caller: Some("spiffe://td/ns/a/sa/b"), principal: Some("idp/u"), request_id: None };
    assert_eq!(t.render(&vars), "spiffe://td/ns/a/sa/b via idp/u");
    assert!(r.request_uses(Var::Caller) && !r.request_uses(Var::RequestId));
    assert!(r.response.contains(&Op::Remove("server".into())));
    assert!(r.response.contains(&Op::Default(
        "strict-transport-security".into(),
        Template::literal("max-age=31536000; includeSubDomains")
    )));
    assert!(r.response.contains(&Op::Default("x-frame-options".into(), Template::literal("SAMEORIGIN"))));
    assert!(r.response.contains(&Op::Set("content-security-policy".into(), Template::literal("default-src 'self'"))));
    assert_eq!(r.response.last(), Some(&Op::Add("x-served-by".into(), Template::literal("orders"))));
}

#[test]
fn owned_and_framing_headers_and_bad_values_are_refused() {
    for (body, field) in [
        (
            serde_json::json!({"requestHeaders": {"set": {"x-palisade-peer-identity": "spiffe://evil"}}}),
            "spec.requestHeaders.set.x-palisade-peer-identity",
        ),
        (
            serde_json::json!({"requestHeaders": {"set": {"x-palisade-request-principal": "admin"}}}),
            "spec.requestHeaders.set.x-palisade-request-principal",
        ),
        (
            serde_json::json!({"responseHeaders": {"set": {"content-length": "0"}}}),
            "spec.responseHeaders.set.content-length",
        ),
        (serde_json::json!({"requestHeaders": {"remove": ["host"]}}), "spec.requestHeaders.remove[0]"),
        (serde_json::json!({"requestHeaders": {"add": {"x-a": "line\nbreak"}}}), "spec.requestHeaders.add.x-a"),
        (serde_json::json!({"requestHeaders": {"add": {"x-a": "${secret}"}}}), "spec.requestHeaders.add.x-a"),
        (serde_json::json!({"requestHeaders": {"add": {"x-a": "${caller"}}}), "spec.requestHeaders.add.x-a"),
        (serde_json::json!({"securityHeaders": {"hsts": ""}}), "spec.securityHeaders.hsts"),
    ] {
        let mut v = body;
        v["target"] = serde_json::json!({"identities": ["*"]});
        let (f, _, _) = validate(&spec(v)).unwrap_err();
        assert_eq!(f, field);
    }
}

#[test]
fn cors_preflight_answers_an_allowed_request_and_refuses_each_mismatch() {
    let c: Cors = serde_json::from_value(serde_json::json!({
        "allowOrigins": ["https://app.example.com"], "allowHeaders": ["Content-Type", "x-token"],
        "exposeHeaders": ["x-total", "x-page"]}))
    .unwrap();
    let p = CorsPolicy::compile("shop/c", &c);
    // The defaults: GET, HEAD and POST, cached 600 s, no credentials.
    let pf = p.preflight("https://app.example.com", "POST", Some("content-type, X-Token")).unwrap();
    assert_eq!(
        pf,
        vec![
            ("access-control-allow-origin", "https://app.example.com".to_string()),
            ("access-control-allow-methods", "GET, HEAD, POST".to_string()),
            ("access-control-max-age", "600".to_string()),
            ("access-control-allow-headers", "content-type, x-token".to_string()),
        ]
    );
    let pf = p.preflight("https://app.example.com", "GET", None).unwrap();
    assert!(
        !pf.iter().any(|(h, _)| *h == "access-control-allow-headers" || *h == "access-control-allow-credentials"),
        "{pf:?}"
    );
    // Each mismatch alone is a refusal.
    assert_eq!(p.preflight("https://evil.example.com", "GET", None), None);
    assert_eq!(p.preflight("https://app.example.com", "PUT", None), None);
    assert_eq!(p.preflight("https://app.example.com", "GET", Some("x-token, authorization")), None);
    assert_eq!(
        p.actual("https://app.example.com").unwrap(),
        vec![
            ("access-control-allow-origin", "https://app.example.com".to_string()),
            ("access-control-expose-headers", "x-total, x-page".to_string()),
        ]
    );
    // `*` answers `*`, except to an origin it also names, which gets itself back.
    let c: Cors = serde_json::from_value(serde_json::json!({
        "allowOrigins": ["*", "https://app.example.com"], "allowMethods": ["DELETE"], "maxAge": 30}))
    .unwrap();
    let p = CorsPolicy::compile("shop/any", &c);
    let pf = p.preflight("https://x.test", "DELETE", None).unwrap();
    assert!(pf.contains(&("access-control-allow-origin", "*".into())), "{pf:?}");
    assert!(pf.contains(&("access-control-max-age", "30".into())), "{pf:?}");
    assert_eq!(p.preflight("https://x.test", "GET", None), None, "allowMethods replaces the defaults");
    assert_eq!(p.actual("https://app.example.com").unwrap()[0].1, "https://app.example.com");
}

#[test]
fn header_ops_render_per_request_and_describe_themselves() {
    let s = spec(serde_json::json!({"target": {"identities": ["*"]},
        "requestHeaders": {"set": {"x-trace": "req-${request_id}"}, "add": {"x-who": "${caller}|${principal}"}, "remove": ["X-Debug"]},
        "securityHeaders": {"contentTypeOptions": true}}));
    validate(&s).unwrap();
    let r = Rewrites::compile(&[&s]);
    let vars = Vars { caller: Some("spiffe://td/ns/a/sa/b"), principal: None, request_id: Some("r1") };
    let described: Vec<String> = r.request.iter().map(|op| op.describe(&vars)).collect();
    // Removals first, then sets, then adds; a missing variable renders empty.
    assert_eq!(described, ["remove x-debug", "set x-trace: req-r1", "add x-who: spiffe://td/ns/a/sa/b|"]);
    let described: Vec<String> = r.response.iter().map(|op| op.describe(&vars)).collect();
    assert_eq!(described, ["set x-content-type-options: nosniff (unless the app set it)"]);
    assert!(r.request_uses(Var::RequestId) && r.request_uses(Var::Principal));
    // A later policy's set comes after an earlier one's, so it wins.
    let later =
        spec(serde_json::json!({"target": {"identities": ["*"]}, "requestHeaders": {"set": {"x-trace": "fixed"}}}));
    let r = Rewrites::compile(&[&s, &later]);
    assert_eq!(r.request.last().map(|op| op.describe(&Vars::default())).as_deref(), Some("set x-trace: fixed"));
    assert!(Rewrites::compile(&[]).is_empty() && !r.is_empty());
}
