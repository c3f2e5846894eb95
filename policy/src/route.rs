//! `TrafficPolicy.routes`: versioned routing on the calling side. A route
//! matches the service the app called, a path prefix and exact header
//! values, and sends the request to one of its backends (by weight, for
//! canaries), optionally rewriting the path prefix.
//!
//! Routing is not an authorization decision: the backend's own sidecar
//! enforces its own policies on the request it receives (the real target).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Headers;
use crate::resource::spec::reserved_header;

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// What a request must look like (every field given must hold).
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    /// Where matching requests go; absent or empty: the called service
    /// itself (a route that only sets timeouts or retries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// Replaces the matched `pathPrefix` (`/v2/orders` with `pathPrefix:
    /// /v2/` and `rewritePrefix: /` becomes `/orders`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_prefix: Option<String>,
    /// The whole call, retries included (`2s`; default: the sidecar's
    /// `--response-timeout`); then 504 (gRPC `DEADLINE_EXCEEDED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// One try (`500ms`; default: none but the whole call's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Which failures are tried again, how often, within what budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::resilience::RetrySpec>,
}

/// `routes[].match`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    /// The service the app called (`orders.shop`); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A path prefix: `/v2/` (a plain prefix), or `/v2` (the segment
    /// `/v2` and anything below it, not `/v20`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Headers that must have exactly these values (`api-version: "2"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// `routes[].backends[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    /// `<service-account>.<namespace>`.
    pub service: String,
    /// Relative share of the requests (default 1; 0 sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Most backends in one route, and largest weight.
const MAX_BACKENDS: usize = 16;
const MAX_WEIGHT: u32 = 10_000;

/// Whether `s` is a service name, `<service-account>.<namespace>`.
pub fn service_ok(s: &str) -> bool {
    let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    s.len() <= 253 && s.rsplit_once('.').is_some_and(|(sa, ns)| ok(sa) && ok(ns))
}

fn prefix_ok(p: &str) -> bool {
    p.starts_with('/') && p.len() <= 1024 && !p.contains(['?', '#']) && crate::path::normalize(p).is_ok_and(|n| n == p)
}

/// Validates the routes; errors are `(field path, value, why)`.
pub(crate) fn validate(routes: &[Route]) -> Result<(), (String, String, String)> {
    let err = |f: String, v: &str, why: &str| Err((f, v.to_string(), why.to_string()));
    for (i, r) in routes.iter().enumerate() {
        let at = format!("spec.routes[{i}]");
        if let Some(s) = &r.matches.service
            && !service_ok(s)
        {
            return err(format!("{at}.match.service"), s, "must be a service, <service-account>.<namespace>");
        }
        if let Some(p) = &r.matches.path_prefix
            && !prefix_ok(p)
        {
            return err(
                format!("{at}.match.pathPrefix"),
                p,
                "must be a normalised path starting with / (no //, /./, /../, %-escapes, ? or #)",
            );
        }
        for (name, value) in &r.matches.headers {
            let name_ok = !name.is_empty()
                && name.len() <= 128
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
            if !name_ok || reserved_header(name) {
                return err(
                    format!("{at}.match.headers.{name}"),
                    name,
                    "must be a lower-case header name Palisade does not reserve",
                );
            }
            if value.len() > 1024 || !value.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
                return err(format!("{at}.match.headers.{name}"), value, "must be visible ASCII, at most 1024 bytes");
            }
        }
        if r.backends.len() > MAX_BACKENDS {
            return err(
                format!("{at}.backends"),
                &r.backends.len().to_string(),
                "must list at most 16 backends (none: the called service)",
            );
        }
        for (j, b) in r.backends.iter().enumerate() {
            if !service_ok(&b.service) {
                return err(
                    format!("{at}.backends[{j}].service"),
                    &b.service,
                    "must be a service, <service-account>.<namespace>",
                );
            }
            if b.weight.is_some_and(|w| w > MAX_WEIGHT) {
                return err(
                    format!("{at}.backends[{j}].weight"),
                    &b.weight.unwrap_or(0).to_string(),
                    "must be at most 10000",
                );
            }
        }
        if !r.backends.is_empty() && r.backends.iter().map(|b| b.weight.unwrap_or(1)).sum::<u32>() == 0 {
            return err(format!("{at}.backends"), "", "at least one backend must have a weight above 0");
        }
        if let Some(rw) = &r.rewrite_prefix {
            if r.matches.path_prefix.is_none() {
                return err(format!("{at}.rewritePrefix"), rw, "needs match.pathPrefix (the part it replaces)");
            }
            if !prefix_ok(rw) {
                return err(format!("{at}.rewritePrefix"), rw, "must be a normalised path starting with /");
            }
        }
        crate::resilience::validate_route(&at, r.timeout.as_ref(), r.per_try_timeout.as_ref(), r.retry.as_ref())?;
    }
    Ok(())
}

/// A compiled route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRoute {
    /// `namespace/name` of the policy.
    pub policy: Arc<str>,
    /// Its index in the policy's `routes`.
    pub index: usize,
    service: Option<String>,
    prefix: Option<String>,
    headers: Vec<(String, String)>,
    /// `(service, cumulative weight)`; empty: the called service.
    backends: Vec<(Arc<str>, u32)>,
    rewrite: Option<String>,
    /// Its timeouts and retry policy.
    pub resilience: Arc<crate::resilience::Resilience>,
}

impl CompiledRoute {
    /// Whether a request to `service` for `path` with `headers` takes this route.
    pub fn matches(&self, service: &str, path: &str, headers: &dyn Headers) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.prefix.as_deref().is_none_or(|p| prefix_matches(p, path))
            && self.headers.iter().all(|(n, v)| headers.any(n, &mut |x| x == v))
    }

    /// The backend for a random draw `r` (uniform over `u32`); `None`: the
    /// route names no backends, the request goes to the called service.
    pub fn pick(&self, r: u32) -> Option<&Arc<str>> {
        let total = self.backends.last()?.1.max(1);
        let x = ((u64::from(r) * u64::from(total)) >> 32) as u32;
        let i = self.backends.iter().position(|b| x < b.1).unwrap_or(0);
        Some(&self.backends[i].0)
    }

    /// The backends and their weights (empty: the called service).
    pub fn backends(&self) -> Vec<(Arc<str>, u32)> {
        let mut prev = 0;
        self.backends
            .iter()
            .map(|(s, c)| {
                let w = c - prev;
                prev = *c;
                (s.clone(), w)
            })
            .collect()
    }

    /// The path the backend receives (`path` without its query), when
    /// this route rewrites it.
    pub fn rewrite(&self, path: &str) -> Option<String> {
        let (prefix, to) = (self.prefix.as_deref()?, self.rewrite.as_deref()?);
        let rest = &path[prefix.trim_end_matches('/').len().min(path.len())..];
        let out = format!("{}{rest}", to.trim_end_matches('/'));
        Some(if out.is_empty() { "/".into() } else { out })
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// Every route of the TrafficPolicies that target a calling workload, in
/// policy order, then route order: the first that matches is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes(Vec<CompiledRoute>);

impl Routes {
    /// Compiles `(policy key, routes)` pairs (already validated).
    pub fn compile(specs: &[(String, &[Route])]) -> Self {
        let mut out = Vec::new();
        for (policy, routes) in specs {
            let policy: Arc<str> = policy.as_str().into();
            for (index, r) in routes.iter().enumerate() {
                let mut acc = 0;
                let backends = r
                    .backends
                    .iter()
                    .map(|b| {
                        acc += b.weight.unwrap_or(1);
                        (Arc::from(b.service.as_str()), acc)
                    })
                    .collect();
                out.push(CompiledRoute {
                    policy: policy.clone(),
                    index,
                    service: r.matches.service.clone(),
                    prefix: r.matches.path_prefix.clone(),
                    headers: r.matches.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    backends,
                    rewrite: r.rewrite_prefix.clone(),
                    resilience: Arc::new(crate::resilience::Resilience::compile(
                        r.timeout.as_ref(),
                        r.per_try_timeout.as_ref(),
                        r.retry.as_ref(),
                    )),
                });
            }
        }
        Self(out)
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any route may apply to requests for `service`.
    pub fn for_service(&self, service: &str) -> bool {
        self.0.iter().any(|r| r.service.as_deref().is_none_or(|s| s == service))
    }

    /// The route a request to `service` for `path` (normalised, without
    /// its query) takes, if any.
    pub fn route(&self, service: &str, path: &str, headers: &dyn Headers) -> Option<&CompiledRoute> {
        self.0.iter().find(|r| r.matches(service, path, headers))
    }
}

/// Where a caller's request goes: the route it takes, the path it was
/// matched on, and the path the backend receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed<'e> {
    /// The route.
    pub route: &'e CompiledRoute,
    /// The normalised path the route matched.
    pub path: String,
    /// The path the backend receives, when the route rewrites it.
    pub rewritten: Option<String>,
}

impl crate::Enforcer {
    /// The caller side's one routing decision (the sidecar routes with it and
    /// `palisadectl route` explains it): the first route of this workload's
    /// TrafficPolicies that matches the called `service`, the request's
    /// normalised `path` (without its query) and `headers`. `Ok(None)`: no
    /// route matches; `Err`: the path has no normal form (the callee refuses
    /// it; it goes unrouted).
    pub fn route_request(
        &self,
        service: &str,
        path: &str,
        headers: &dyn Headers,
    ) -> Result<Option<Routed<'_>>, crate::path::PathError> {
        let routes = self.routes();
        if routes.is_empty() || !routes.for_service(service) {
            return Ok(None);
        }
        let path = crate::path::normalize(path)?;
        Ok(routes.route(service, &path, headers).map(|route| Routed {
            route,
            rewritten: route.rewrite(&path),
            path: path.into_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HeaderList;

    fn routes(v: serde_json::Value) -> Vec<Route> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn first_matching_route_wins_and_weights_split() {
        let rs = routes(serde_json::json!([
            {"match": {"service": "orders.shop", "headers": {"api-version": "2"}}, "backends": [{"service": "orders-v2.shop"}]},
            {"match": {"service": "orders.shop", "pathPrefix": "/v2/"}, "backends": [{"service": "orders-v2.shop"}], "rewritePrefix": "/"},
            {"match": {"service": "orders.shop", "pathPrefix": "/api"},
             "backends": [{"service": "orders.shop", "weight": 90}, {"service": "orders-v2.shop", "weight": 10}]},
        ]));
        validate(&rs).unwrap();
        let c = Routes::compile(&[("shop/r".into(), &rs)]);
        let none = HeaderList(&[]);
        let v2 = HeaderList(&[("api-version", "2")]);
        assert_eq!(c.route("orders.shop", "/x", &v2).unwrap().index, 0);
        assert!(c.route("orders.shop", "/x", &none).is_none());
        assert!(c.route("billing.shop", "/v2/x", &none).is_none());
        let r = c.route("orders.shop", "/v2/orders/7", &none).unwrap();
        assert_eq!((r.index, r.rewrite("/v2/orders/7").as_deref()), (1, Some("/orders/7")));
        assert!(c.route("orders.shop", "/api2", &none).is_none(), "segment-aware prefix");
        let r = c.route("orders.shop", "/api/x", &none).unwrap();
        assert_eq!(r.index, 2);
        assert_eq!(r.pick(0).map(|s| &**s), Some("orders.shop"));
        assert_eq!(r.pick(u32::MAX).map(|s| &**s), Some("orders-v2.shop"));
        let v2_share = (0..1000u32)
            .filter(|i| r.pick(i.wrapping_mul(4_294_967)).is_some_and(|s| &**s == "orders-v2.shop"))
            .count();
        assert!((90..=110).contains(&v2_share), "{v2_share}");
        assert_eq!(r.backends()[1].1, 10);
    }

    #[test]
    fn rewrites_keep_segments() {
        let rs = routes(serde_json::json!([
            {"match": {"pathPrefix": "/v2"}, "backends": [{"service": "a.b"}], "rewritePrefix": "/api/v2"},
            {"match": {"pathPrefix": "/old"}, "backends": [{"service": "a.b"}], "rewritePrefix": "/"},
        ]));
        let c = Routes::compile(&[("ns/p".into(), &rs)]);
        let none = HeaderList(&[]);
        assert_eq!(c.route("x.y", "/v2/x", &none).unwrap().rewrite("/v2/x").unwrap(), "/api/v2/x");
        assert_eq!(c.route("x.y", "/v2", &none).unwrap().rewrite("/v2").unwrap(), "/api/v2");
        assert_eq!(c.route("x.y", "/old", &none).unwrap().rewrite("/old").unwrap(), "/");
        assert_eq!(c.route("x.y", "/old/a", &none).unwrap().rewrite("/old/a").unwrap(), "/a");
    }

    #[test]
    fn bad_routes_are_refused_with_field_paths() {
        for (v, field) in [
            (
                serde_json::json!([{"backends": vec![serde_json::json!({"service": "a.b"}); 17]}]),
                "spec.routes[0].backends",
            ),
            (serde_json::json!([{"backends": [{"service": "nodot"}]}]), "spec.routes[0].backends[0].service"),
            (serde_json::json!([{"backends": [{"service": "a.b", "weight": 0}]}]), "spec.routes[0].backends"),
            (
                serde_json::json!([{"backends": [{"service": "a.b", "weight": 10001}]}]),
                "spec.routes[0].backends[0].weight",
            ),
            (
                serde_json::json!([{"match": {"pathPrefix": "/a/../b"}, "backends": [{"service": "a.b"}]}]),
                "spec.routes[0].match.pathPrefix",
            ),
            (
                serde_json::json!([{"match": {"pathPrefix": "v2"}, "backends": [{"service": "a.b"}]}]),
                "spec.routes[0].match.pathPrefix",
            ),
            (
                serde_json::json!([{"match": {"headers": {"x-palisade-peer-identity": "x"}}, "backends": [{"service": "a.b"}]}]),
                "spec.routes[0].match.headers.x-palisade-peer-identity",
            ),
            (
                serde_json::json!([{"backends": [{"service": "a.b"}], "rewritePrefix": "/"}]),
                "spec.routes[0].rewritePrefix",
            ),
            (
                serde_json::json!([{"match": {"service": "a b"}, "backends": [{"service": "a.b"}]}]),
                "spec.routes[0].match.service",
            ),
        ] {
            assert_eq!(validate(&routes(v)).unwrap_err().0, field);
        }
    }
}
