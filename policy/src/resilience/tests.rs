use super::*;

#[test]
fn retry_on_parses_names_statuses_and_codes() {
    let on = RetryOn::parse(&["gateway-error".into(), "429".into(), "internal".into()]).unwrap();
    assert!(on.status(502) && on.status(429) && !on.status(500));
    assert!(on.grpc_code(13) && !on.grpc_code(14));
    assert!(!on.connect_failure);
    assert_eq!(on.names(), ["429", "502", "503", "504", "internal"]);
    let d = RetryOn::parse(&[]).unwrap();
    assert!(d.status(503) && !d.status(429) && d.grpc_code(14) && d.connect_failure);
    assert_eq!(RetryOn::parse(&["reset".into(), "600".into()]).unwrap_err().0, 1);
    assert_eq!(RetryOn::parse(&["bogus".into()]).unwrap_err().0, 0);
}

fn traffic(extra: serde_json::Value) -> crate::traffic::TrafficSpec {
    let mut v = serde_json::json!({"target": {"identities": ["*"]}});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::from_value(v).unwrap()
}

fn route(r: serde_json::Value) -> crate::traffic::TrafficSpec {
    let mut r = r;
    r.as_object_mut().unwrap().insert("match".into(), serde_json::json!({"service": "orders.shop"}));
    traffic(serde_json::json!({"routes": [{"match": {"service": "billing.shop"}}, r]}))
}

#[test]
fn bad_resilience_values_are_refused_with_field_paths() {
    use serde_json::json;
    let at = "spec.routes[1]";
    for (r, field, value) in [
        (json!({"timeout": "2 parsecs"}), "timeout", "2 parsecs"),
        (json!({"timeout": "0s"}), "timeout", "0s"),
        (json!({"timeout": "2h"}), "timeout", "2h"),
        (json!({"perTryTimeout": "1h1ms"}), "perTryTimeout", "1h1ms"),
        (json!({"timeout": "1s", "perTryTimeout": "2s"}), "perTryTimeout", "2s"),
        (json!({"retry": {"attempts": 0}}), "retry.attempts", "0"),
        (json!({"retry": {"attempts": 6}}), "retry.attempts", "6"),
        (json!({"retry": {"on": ["reset", "5xx", "poison"]}}), "retry.on[2]", "poison"),
        (json!({"retry": {"on": ["399"]}}), "retry.on[0]", "399"),
        (json!({"retry": {"on": []}}), "retry.on", "[]"),
        (json!({"retry": {"backoff": "0ms"}}), "retry.backoff", "0ms"),
        (json!({"retry": {"backoff": "11s"}}), "retry.backoff", "11s"),
        (json!({"retry": {"maxBackoff": "10s1ms"}}), "retry.maxBackoff", "10s1ms"),
        (json!({"retry": {"backoff": "1s", "maxBackoff": "500ms"}}), "retry.maxBackoff", "500ms"),
        (json!({"retry": {"maxBackoff": "10ms"}}), "retry.maxBackoff", "10ms"),
        (json!({"retry": {"maxBodyBytes": 1_048_577}}), "retry.maxBodyBytes", "1048577"),
        (json!({"retry": {"budget": {"percent": 101}}}), "retry.budget.percent", "101"),
        (json!({"retry": {"budget": {"minPerSecond": 1001}}}), "retry.budget.minPerSecond", "1001"),
    ] {
        let e = crate::traffic::validate(&route(r.clone())).unwrap_err();
        assert_eq!((e.0.as_str(), e.1.as_str()), (format!("{at}.{field}").as_str(), value), "{r}: {e:?}");
    }
    let at = "spec.balancing";
    for (b, field, value) in [
        (json!({"warmup": "10m1s"}), "warmup", "10m1s"),
        (json!({"warmup": "soon"}), "warmup", "soon"),
        (json!({"ejection": {"consecutiveFailures": 1001}}), "ejection.consecutiveFailures", "1001"),
        (json!({"ejection": {"successRateMinRequests": 100_001}}), "ejection.successRateMinRequests", "100001"),
        (json!({"ejection": {"baseTime": "99ms"}}), "ejection.baseTime", "99ms"),
        (json!({"ejection": {"baseTime": "1h1s"}}), "ejection.baseTime", "1h1s"),
        (json!({"ejection": {"maxTime": "24h1s"}}), "ejection.maxTime", "24h1s"),
        (json!({"ejection": {"baseTime": "1m", "maxTime": "30s"}}), "ejection.maxTime", "30s"),
        (json!({"ejection": {"maxTime": "5s"}}), "ejection.maxTime", "5s"),
        (json!({"ejection": {"maxPercent": 101}}), "ejection.maxPercent", "101"),
    ] {
        let e = crate::traffic::validate(&traffic(json!({"balancing": b.clone()}))).unwrap_err();
        assert_eq!((e.0.as_str(), e.1.as_str()), (format!("{at}.{field}").as_str(), value), "{b}: {e:?}");
    }
    // The edges are allowed.
    for r in [
        json!({"timeout": "1ms", "perTryTimeout": "1ms"}),
        json!({"timeout": "1h", "perTryTimeout": "1h"}),
        json!({"perTryTimeout": "5s"}),
        json!({"retry": {"attempts": 1, "on": ["429", "gateway-error"], "backoff": "10s", "maxBackoff": "10s"}}),
        json!({"retry": {"attempts": 5, "maxBodyBytes": 0, "budget": {"percent": 0, "minPerSecond": 0}}}),
        json!({"retry": {"maxBodyBytes": 1_048_576, "budget": {"percent": 100, "minPerSecond": 1000}}}),
    ] {
        crate::traffic::validate(&route(r.clone())).unwrap_or_else(|e| panic!("{r}: {e:?}"));
    }
    for b in [
        json!({"warmup": "0s", "ejection": {"consecutiveFailures": 0, "successRateMinRequests": 0, "maxPercent": 0}}),
        json!({"warmup": "10m", "ejection": {"consecutiveFailures": 1000, "successRateMinRequests": 100_000}}),
        json!({"ejection": {"baseTime": "100ms", "maxTime": "100ms", "maxPercent": 100}}),
        json!({"ejection": {"baseTime": "1h", "maxTime": "24h"}}),
    ] {
        crate::traffic::validate(&traffic(json!({"balancing": b.clone()}))).unwrap_or_else(|e| panic!("{b}: {e:?}"));
    }
}

#[test]
fn a_route_compiles_its_timeouts_and_retries_with_defaults() {
    let spec = traffic(serde_json::json!({"routes": [
        {"match": {"service": "orders.shop"}, "timeout": "2s", "perTryTimeout": "500ms",
         "retry": {"attempts": 3, "on": ["5xx", "429"], "backoff": "50ms", "nonIdempotent": true,
                   "maxBodyBytes": 1024, "budget": {"percent": 10}}},
        {"match": {"service": "billing.shop"}, "retry": {"backoff": "1s"}},
        {"match": {"service": "stock.shop"}},
    ]}));
    crate::traffic::validate(&spec).unwrap();
    let c = crate::route::Routes::compile(&[("shop/r".into(), &spec.routes)]);
    let none = crate::HeaderList(&[]);
    let r = c.route("orders.shop", "/", &none).unwrap();
    assert_eq!(r.pick(7), None, "no backends: the called service");
    let res = &*r.resilience;
    assert_eq!((res.timeout, res.per_try_timeout), (Some(Duration::from_secs(2)), Some(Duration::from_millis(500))));
    let want = Retry {
        attempts: 3,
        on: RetryOn::parse(&["5xx".into(), "429".into()]).unwrap(),
        backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(250),
        non_idempotent: true,
        max_body_bytes: 1024,
        budget_percent: 10,
        budget_min_per_second: 10,
    };
    assert_eq!(res.retry, want);
    assert!(res.retry.on.status(500) && res.retry.on.status(429) && !res.retry.on.connect_failure);
    assert!(res.retry.retries_method("POST"));
    // A backoff above the default maxBackoff raises it.
    let r = c.route("billing.shop", "/", &none).unwrap();
    assert_eq!(
        (r.resilience.retry.backoff, r.resilience.retry.max_backoff),
        (Duration::from_secs(1), Duration::from_secs(1))
    );
    assert_eq!(r.resilience.retry.attempts, 2);
    // A route without retry gets the defaults: 2 tries, idempotent methods, the default conditions.
    let r = c.route("stock.shop", "/", &none).unwrap();
    assert_eq!(*r.resilience, Resilience::default());
    assert_eq!(r.resilience.timeout, None);
    let d = &r.resilience.retry;
    assert_eq!(
        (d.attempts, d.backoff, d.max_backoff, d.max_body_bytes),
        (2, Duration::from_millis(25), Duration::from_millis(250), 65536)
    );
    assert_eq!(d.on.names(), ["connect-failure", "reset", "try-timeout", "503", "unavailable"]);
    assert!(d.retries_method("GET") && d.retries_method("PUT") && d.retries_method("DELETE"));
    assert!(!d.retries_method("POST") && !d.retries_method("PATCH"));
    let once = Retry { attempts: 1, non_idempotent: true, ..Retry::default() };
    assert!(!once.retries_method("GET"), "one attempt retries nothing");
}

#[test]
fn balancing_compiles_with_defaults_and_the_first_policy_decides() {
    let b: BalancingSpec =
        serde_json::from_value(serde_json::json!({"warmup": "0s", "ejection": {"baseTime": "10m", "maxPercent": 20}}))
            .unwrap();
    let c = Balancing::compile(&b);
    assert_eq!(c.warmup, Duration::ZERO);
    assert_eq!((c.ejection.base_time, c.ejection.max_time), (Duration::from_secs(600), Duration::from_secs(600)));
    assert_eq!(
        (c.ejection.consecutive_failures, c.ejection.success_rate_min_requests, c.ejection.max_percent),
        (5, 20, 20)
    );
    let d = Balancing::compile(&BalancingSpec::default());
    assert_eq!(d, Balancing::default());
    assert_eq!(
        (d.warmup, d.ejection.max_time, d.ejection.max_percent),
        (Duration::from_secs(10), Duration::from_secs(300), 50)
    );

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    let policy = |name: &str, target: &str, balancing: &str| {
        format!(
            "apiVersion: palisade.dev/v1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  target: {{identities: [\"{target}\"]}}\n{balancing}"
        )
    };
    let yaml = [
        policy("c", WEB, "  balancing: {warmup: 3s}\n"),
        policy("a", WEB, "  routes: [{match: {service: orders.shop}, timeout: 2s}]\n"),
        policy("b", WEB, "  balancing: {warmup: 1s, ejection: {consecutiveFailures: 0}}\n"),
        policy("a0", "spiffe://cluster.local/ns/shop/sa/other", "  balancing: {warmup: 9s}\n"),
    ]
    .join("---\n");
    let resources = crate::test_util::parse_all(&yaml).unwrap();
    let inputs = crate::Inputs { resources: &resources, ..crate::Inputs::none() };
    let e = crate::Enforcer::compile(inputs, WEB, None).unwrap();
    let b = e.balancing();
    assert_eq!((b.warmup, b.ejection.consecutive_failures), (Duration::from_secs(1), 0), "shop/b comes first");
    assert_eq!(e.balancing_policy(), Some("shop/b"));
    let routed = e.route_request("orders.shop", "/x", &crate::HeaderList(&[])).unwrap().unwrap();
    assert_eq!((routed.route.pick(0), routed.route.resilience.timeout), (None, Some(Duration::from_secs(2))));
    let none =
        crate::Enforcer::compile(crate::Inputs { resources: &resources[1..2], ..crate::Inputs::none() }, WEB, None)
            .unwrap();
    assert_eq!(*none.balancing(), Balancing::default());
    assert_eq!(none.balancing_policy(), None);
    // The whole resource names the field and its value.
    let bad = policy("x", WEB, "  balancing: {ejection: {maxPercent: 150}}\n");
    let e = crate::test_util::parse_all(&bad).unwrap_err().to_string();
    assert!(e.contains("spec.balancing.ejection.maxPercent") && e.contains("150"), "{e}");
}
