//! CORS (the Fetch standard's cross-origin requests): the `cors` field
//! compiled into the answers to preflights and to actual requests.

use super::{Cors, TrafficSpec};

/// An allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginRule {
    Exact(String),
    /// `scheme://*.` + suffix (one label where the `*` is).
    OneLabel {
        prefix: String,
        suffix: String,
    },
}

/// The CORS behaviour compiled for a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsPolicy {
    /// `namespace/name` of the policy it came from.
    pub policy: String,
    any: bool,
    origins: Vec<OriginRule>,
    methods: Vec<String>,
    headers: Vec<String>,
    expose: String,
    credentials: bool,
    max_age: u64,
}

impl CorsPolicy {
    pub(super) fn compile(policy: &str, c: &Cors) -> Self {
        let mut origins = Vec::new();
        let mut any = false;
        for o in &c.allow_origins {
            if o == "*" {
                any = true;
            } else if let Some((scheme, rest)) = o.split_once("://*.") {
                origins.push(OriginRule::OneLabel {
                    prefix: format!("{scheme}://"),
                    suffix: format!(".{}", rest.to_ascii_lowercase()),
                });
            } else {
                origins.push(OriginRule::Exact(o.to_ascii_lowercase()));
            }
        }
        let methods = if c.allow_methods.is_empty() {
            vec!["GET".into(), "HEAD".into(), "POST".into()]
        } else {
            c.allow_methods.clone()
        };
        Self {
            policy: policy.to_string(),
            any,
            origins,
            methods,
            headers: c.allow_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            expose: c.expose_headers.join(", "),
            credentials: c.allow_credentials,
            max_age: c.max_age.unwrap_or(600),
        }
    }

    /// Whether `origin` (the request's `Origin` header) is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        let o = origin.to_ascii_lowercase();
        if o == "null" {
            return self.origins.iter().any(|r| *r == OriginRule::Exact("null".into()));
        }
        self.any
            || self.origins.iter().any(|r| match r {
                OriginRule::Exact(e) => *e == o,
                OriginRule::OneLabel { prefix, suffix } => o
                    .strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                    .is_some_and(|label| !label.is_empty() && !label.contains(['.', '/', ':', '@'])),
            })
    }

    /// `Access-Control-Allow-Origin` for an allowed origin: the origin itself,
    /// or `*` for any origin without credentials.
    fn allow_origin(&self, origin: &str) -> String {
        if self.any
            && !self.credentials
            && !self.origins.iter().any(|r| matches!(r, OriginRule::Exact(e) if e.eq_ignore_ascii_case(origin)))
        {
            "*".to_string()
        } else {
            origin.to_string()
        }
    }

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`):
    /// the headers of a 204 that allows it, or `None` (a 204 without them,
    /// which the browser reads as a refusal).
    pub fn preflight(
        &self,
        origin: &str,
        method: &str,
        request_headers: Option<&str>,
    ) -> Option<Vec<(&'static str, String)>> {
        if !self.allows(origin) || !self.methods.iter().any(|m| m == method) {
            return None;
        }
        let asked: Vec<String> = request_headers
            .unwrap_or_default()
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if asked.iter().any(|h| !self.headers.contains(h)) {
            return None;
        }
        let mut out = vec![
            ("access-control-allow-origin", self.allow_origin(origin)),
            ("access-control-allow-methods", self.methods.join(", ")),
            ("access-control-max-age", self.max_age.to_string()),
        ];
        if !asked.is_empty() {
            out.push(("access-control-allow-headers", asked.join(", ")));
        }
        if self.credentials {
            out.push(("access-control-allow-credentials", "true".into()));
        }
        Some(out)
    }

    /// The CORS headers of an actual response to `origin` (`None`: not allowed).
    pub fn actual(&self, origin: &str) -> Option<Vec<(&'static str, String)>> {
        if !self.allows(origin) {
            return None;
        }
        let mut out = vec![("access-control-allow-origin", self.allow_origin(origin))];
        if self.credentials {
            out.push(("access-control-allow-credentials", "true".into()));
        }
        if !self.expose.is_empty() {
            out.push(("access-control-expose-headers", self.expose.clone()));
        }
        Some(out)
    }
}

/// The CORS policy in force: the first TrafficPolicy (in `namespace/name`
/// order) that has one.
pub fn compile_cors(specs: &[(String, &TrafficSpec)]) -> Option<CorsPolicy> {
    specs.iter().find_map(|(k, s)| s.cors.as_ref().map(|c| CorsPolicy::compile(k, c)))
}
