//! `TrafficPolicy`: what the callee's sidecar does to a request's and a
//! response's headers: request and response header rewriting (`set`, `add`,
//! `remove`, with the variables `${caller}`, `${principal}` and
//! `${request_id}`) and the security headers browsers rely on.
//!
//! The headers Palisade owns (`x-palisade-*`) and those that frame or route
//! a message (`host`, `content-length`, `transfer-encoding`, ...) cannot be
//! named: a policy can never forge an identity or break framing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::resource::{Target, reserved_header};

/// Header changes of one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Replace (or create) these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append a value (keeping any the message has).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Remove these headers (`server`, `x-powered-by`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// One security header: its value, set when the app did not set one
/// (`"max-age=31536000"`), or with `always: true` replacing the app's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    /// `true`: the recommended value; `false`: none.
    Flag(bool),
    /// This value, when the app did not set one.
    Value(String),
    /// This value, and whether it replaces the app's.
    Full {
        /// The value.
        value: String,
        /// Replace the app's value too.
        #[serde(default)]
        always: bool,
    },
}

/// `securityHeaders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecurityHeaders {
    /// `Strict-Transport-Security` (`true`: `max-age=31536000; includeSubDomains`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<Setting>,
    /// `X-Content-Type-Options` (`true`: `nosniff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type_options: Option<Setting>,
    /// `X-Frame-Options` (`true`: `DENY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_options: Option<Setting>,
    /// `Content-Security-Policy` (`true`: `default-src 'none'; frame-ancestors 'none'`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_security_policy: Option<Setting>,
    /// `Referrer-Policy` (`true`: `no-referrer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer_policy: Option<Setting>,
    /// `Permissions-Policy` (`true`: `camera=(), microphone=(), geolocation=()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions_policy: Option<Setting>,
    /// Remove headers that tell attackers what runs behind (`Server`,
    /// `X-Powered-By`, `X-AspNet-Version`, `X-AspNetMvc-Version`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remove_server_headers: bool,
}

/// `TrafficPolicy.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSpec {
    /// Workloads it applies to (the callee).
    pub target: Target,
    /// Changes to requests before the app receives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderOps>,
    /// Changes to responses before the caller receives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderOps>,
    /// Security headers added to responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_headers: Option<SecurityHeaders>,
    /// What requests must look like before the app sees them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
    /// Cross-origin requests from browsers (the Fetch standard's CORS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    /// Versioned routing, applied by the sidecar of the caller (the
    /// workloads `target` names), to the requests it sends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::route::Route>,
}

/// `cors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cors {
    /// Origins allowed: exact (`https://app.example.com`), one-label patterns
    /// (`https://*.example.com`), `null` only when named, or `*` (any
    /// origin, never with credentials).
    pub allow_origins: Vec<String>,
    /// Methods a cross-origin request may use (default: GET, HEAD, POST).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Request headers a cross-origin request may send.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Response headers the page may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Whether requests with cookies or HTTP authentication are allowed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_credentials: bool,
    /// Seconds a browser may cache a preflight's answer (default 600, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
}

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
    fn compile(policy: &str, c: &Cors) -> Self {
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

/// `validation`: requests that do not hold to it never reach the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Validation {
    /// Allowed methods (upper case); others get 405 with `Allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Allowed media types of a request body (`application/json`, `text/*`;
    /// parameters such as `charset` ignored); a body of another type gets 415.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_types: Vec<String>,
    /// Largest request body: a larger `Content-Length` gets 413 at once, and
    /// a streamed body is cut (413) when it passes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Most query parameters (`&`-separated); more get 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_query_params: Option<u32>,
    /// Longest query string in bytes; longer gets 414.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_query_bytes: Option<u32>,
    /// A JSON Schema request bodies must match (then any body must be
    /// JSON: another media type gets 415; a mismatch 400 with an RFC 9457
    /// problem). The body is read whole first, up to `maxBodyBytes`
    /// (default 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<serde_json::Value>,
    /// How paths are normalised before any decision (see `PathNormalization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<crate::path::Options>,
}

/// The body limit of requests whose JSON body a schema checks, when the
/// policy gives none.
pub const DEFAULT_SCHEMA_BODY_BYTES: u64 = 1 << 20;

/// What happens to a request's body once its head passed validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyRule {
    /// The smallest body limit of the policies (a streamed body is read up
    /// to it, 413 past it).
    pub cap: Option<u64>,
    /// The body is read whole and checked against JSON Schemas.
    pub schema: bool,
}

/// Why a request failed a TrafficPolicy's validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// 405, 413 or 415.
    pub status: u16,
    /// For the audit log.
    pub reason: String,
    /// For 405: the methods allowed (the `Allow` header).
    pub allow: Option<String>,
}

/// What validation looks at in a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Head<'a> {
    /// The method.
    pub method: &'a str,
    /// The query string (after `?`).
    pub query: Option<&'a str>,
    /// `Content-Type`.
    pub content_type: Option<&'a str>,
    /// `Content-Length`.
    pub content_length: Option<u64>,
    /// Whether a body follows.
    pub has_body: bool,
}

/// The request checks of every TrafficPolicy that targets a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks {
    each: Vec<(String, Validation)>,
    schemas: Vec<(String, crate::schema::Schema)>,
    paths: crate::path::Options,
}

/// The media type of a `Content-Type` value, lower case, without parameters.
fn media_type(ct: &str) -> String {
    ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

impl Checks {
    /// Compiles `(policy key, spec)` pairs (already validated).
    pub fn compile(specs: &[(String, &TrafficSpec)]) -> Self {
        let each: Vec<(String, Validation)> =
            specs.iter().filter_map(|(k, s)| Some((k.clone(), s.validation.clone()?))).collect();
        let schemas = each
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), crate::schema::Schema::compile(v.json_schema.as_ref()?).ok()?)))
            .collect();
        let paths = crate::path::Options::strictest(each.iter().filter_map(|(_, v)| v.path_normalization.as_ref()));
        Self { each, schemas, paths }
    }

    /// Whether there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.each.is_empty()
    }

    /// How request paths are normalised (the strictest of the policies).
    pub fn path_options(&self) -> &crate::path::Options {
        &self.paths
    }

    /// Checks a JSON body against every schema (after [`check`](Self::check)
    /// asked for it with `BodyRule::schema`).
    pub fn check_body(&self, body: &[u8]) -> Result<(), crate::schema::Problem> {
        for (policy, schema) in &self.schemas {
            schema.check(policy, body)?;
        }
        Ok(())
    }

    /// Checks a request's head: its method, its query, its body's media
    /// type (when it has a body) and its declared length. `Ok` says what
    /// to do with the body.
    pub fn check(&self, head: &Head<'_>) -> Result<BodyRule, Invalid> {
        let Head { method, query, content_type, content_length, has_body } = *head;
        let mut cap: Option<u64> = None;
        let schema = has_body && !self.schemas.is_empty();
        if schema && !crate::schema::is_json(content_type) {
            return Err(Invalid {
                policy: self.schemas[0].0.clone(),
                status: 415,
                reason: "a JSON body is required (validation.jsonSchema)".into(),
                allow: None,
            });
        }
        for (policy, v) in &self.each {
            let invalid = |status, reason: String, allow| Invalid { policy: policy.clone(), status, reason, allow };
            if !v.methods.is_empty() && !v.methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
                return Err(invalid(405, format!("method {method} is not allowed"), Some(v.methods.join(", "))));
            }
            let q = query.unwrap_or_default();
            if let Some(max) = v.max_query_bytes
                && q.len() > max as usize
            {
                return Err(invalid(414, format!("a query of {} bytes is over the {max} byte limit", q.len()), None));
            }
            if let Some(max) = v.max_query_params {
                let n = q.split('&').filter(|p| !p.is_empty()).count();
                if n > max as usize {
                    return Err(invalid(400, format!("{n} query parameters are over the limit of {max}"), None));
                }
            }
            if has_body && !v.content_types.is_empty() {
                let mt = content_type.map(media_type).unwrap_or_default();
                let ok = v.content_types.iter().any(|want| {
                    let want = want.to_ascii_lowercase();
                    match want.strip_suffix("/*") {
                        Some(top) => mt.split('/').next() == Some(top) && mt.contains('/'),
                        None => want == mt,
                    }
                });
                if !ok {
                    return Err(invalid(415, format!("content type {mt:?} is not allowed"), None));
                }
            }
            if let Some(max) = v.max_body_bytes {
                if content_length.is_some_and(|l| l > max) {
                    return Err(invalid(
                        413,
                        format!("a body of {} bytes is over the {max} byte limit", content_length.unwrap_or(0)),
                        None,
                    ));
                }
                cap = Some(cap.map_or(max, |c| c.min(max)));
            }
        }
        if schema {
            let max = cap.unwrap_or(DEFAULT_SCHEMA_BODY_BYTES);
            if content_length.is_some_and(|l| l > max) {
                return Err(Invalid {
                    policy: self.schemas[0].0.clone(),
                    status: 413,
                    reason: format!("a JSON body over the {max} byte limit"),
                    allow: None,
                });
            }
            cap = Some(max);
        }
        Ok(BodyRule { cap, schema })
    }
}

/// The variables a header value may use.
pub const VARIABLES: [&str; 3] = ["caller", "principal", "request_id"];

const LEAKS: [&str; 4] = ["server", "x-powered-by", "x-aspnet-version", "x-aspnetmvc-version"];

fn name_ok(h: &str) -> bool {
    !h.is_empty() && h.len() <= 128 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

/// A header value template: text and `${variable}` parts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// A variable of a header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// The caller's SPIFFE ID (empty for plaintext callers).
    Caller,
    /// The request principal (empty without a verified credential).
    Principal,
    /// The request's `x-request-id`, or a new one.
    RequestId,
}

fn parse_template(v: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = v;
    while let Some(i) = rest.find("${") {
        if i > 0 {
            parts.push(Part::Text(rest[..i].to_string()));
        }
        let end = rest[i..].find('}').ok_or("has `${` without a closing `}`")?;
        let var = match &rest[i + 2..i + end] {
            "caller" => Var::Caller,
            "principal" => Var::Principal,
            "request_id" => Var::RequestId,
            other => {
                return Err(format!(
                    "names the unknown variable {other:?}; use ${{caller}}, ${{principal}} or ${{request_id}}"
                ));
            }
        };
        parts.push(Part::Var(var));
        rest = &rest[i + end + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

fn value_ok(v: &str) -> bool {
    v.len() <= 4096 && v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Validates a spec; errors are `(field path, value, why)`.
pub(crate) fn validate(spec: &TrafficSpec) -> Result<(), (String, String, String)> {
    let err = |f: String, v: &str, why: &str| Err((f, v.to_string(), why.to_string()));
    for (dir, ops) in [("requestHeaders", &spec.request_headers), ("responseHeaders", &spec.response_headers)] {
        let Some(ops) = ops else { continue };
        for (kind, map) in [("set", &ops.set), ("add", &ops.add)] {
            for (name, value) in map {
                let f = format!("spec.{dir}.{kind}.{name}");
                if !name_ok(name) || reserved_header(name) {
                    return err(
                        f,
                        name,
                        "must be a header name Palisade does not reserve (x-palisade-*, host, content-length, ...)",
                    );
                }
                if !value_ok(value) {
                    return err(f, value, "must be visible ASCII, at most 4096 bytes");
                }
                if let Err(why) = parse_template(value) {
                    return err(f, value, &why);
                }
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            if !name_ok(name) || reserved_header(name) {
                return err(format!("spec.{dir}.remove[{i}]"), name, "must be a header name Palisade does not reserve");
            }
        }
    }
    if let Some(v) = &spec.validation {
        for (i, m) in v.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return err(
                    format!("spec.validation.methods[{i}]"),
                    m,
                    "must be an HTTP method in upper case (GET, POST, ...)",
                );
            }
        }
        for (i, ct) in v.content_types.iter().enumerate() {
            let ok = ct.split_once('/').is_some_and(|(t, s)| {
                let token = |x: &str| {
                    !x.is_empty() && x.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                };
                token(t) && (s == "*" || token(s))
            });
            if !ok {
                return err(
                    format!("spec.validation.contentTypes[{i}]"),
                    ct,
                    "must be a media type such as application/json, or text/*",
                );
            }
        }
        if let Some(schema) = &v.json_schema
            && let Err(why) = crate::schema::Schema::compile(schema)
        {
            let mut text = schema.to_string();
            if text.len() > 60 {
                let mut end = 60;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push('…');
            }
            return err("spec.validation.jsonSchema".into(), &text, &why);
        }
        if v.max_body_bytes == Some(0) {
            return err("spec.validation.maxBodyBytes".into(), "0", "must be at least 1 (leave it out for no limit)");
        }
    }
    if let Some(c) = &spec.cors {
        if c.allow_origins.is_empty() {
            return err("spec.cors.allowOrigins".into(), "", "must list at least one origin (or \"*\")");
        }
        for (i, o) in c.allow_origins.iter().enumerate() {
            let f = format!("spec.cors.allowOrigins[{i}]");
            if o == "*" {
                if c.allow_credentials {
                    return err(
                        f,
                        o,
                        "cannot be combined with allowCredentials: name the origins that may send credentials",
                    );
                }
                continue;
            }
            if o == "null" {
                continue;
            }
            let Some((scheme, host)) = o.split_once("://") else {
                return err(f, o, "must be an origin: scheme://host[:port], e.g. https://app.example.com");
            };
            let host_ok = !host.is_empty()
                && !host.contains(['/', '?', '#', '@', ' '])
                && (!host.contains('*')
                    || (host.starts_with("*.") && !host[2..].contains('*') && host[2..].contains('.')));
            if !["http", "https"].contains(&scheme) || !host_ok {
                return err(
                    f,
                    o,
                    "must be an origin: http(s)://host[:port], or https://*.example.com (the * is one label)",
                );
            }
        }
        for (i, m) in c.allow_methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return err(format!("spec.cors.allowMethods[{i}]"), m, "must be an HTTP method in upper case");
            }
        }
        for (list, field) in [(&c.allow_headers, "allowHeaders"), (&c.expose_headers, "exposeHeaders")] {
            for (i, h) in list.iter().enumerate() {
                if !name_ok(h) {
                    return err(format!("spec.cors.{field}[{i}]"), h, "must be a header name");
                }
            }
        }
        if c.max_age.is_some_and(|a| a > 86400) {
            return err(
                "spec.cors.maxAge".into(),
                &c.max_age.unwrap_or(0).to_string(),
                "must be at most 86400 (a day)",
            );
        }
    }
    crate::route::validate(&spec.routes)?;
    if let Some(sec) = &spec.security_headers {
        for (field, setting) in sec.settings() {
            let value = match setting {
                Setting::Flag(_) => continue,
                Setting::Value(v) | Setting::Full { value: v, .. } => v,
            };
            if value.is_empty() || !value_ok(value) {
                return err(format!("spec.securityHeaders.{field}"), value, "must be a non-empty visible ASCII value");
            }
        }
    }
    Ok(())
}

impl SecurityHeaders {
    fn settings(&self) -> Vec<(&'static str, &Setting)> {
        [
            ("hsts", &self.hsts),
            ("contentTypeOptions", &self.content_type_options),
            ("frameOptions", &self.frame_options),
            ("contentSecurityPolicy", &self.content_security_policy),
            ("referrerPolicy", &self.referrer_policy),
            ("permissionsPolicy", &self.permissions_policy),
        ]
        .into_iter()
        .filter_map(|(f, s)| s.as_ref().map(|s| (f, s)))
        .collect()
    }
}

/// One compiled header change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Replace or create.
    Set(String, Template),
    /// Append.
    Add(String, Template),
    /// Set only when the message has none.
    Default(String, Template),
    /// Remove.
    Remove(String),
}

impl Op {
    /// What it does to one message, for explanations (`authz check`).
    pub fn describe(&self, vars: &Vars<'_>) -> String {
        match self {
            Self::Set(n, t) => format!("set {n}: {}", t.render(vars)),
            Self::Add(n, t) => format!("add {n}: {}", t.render(vars)),
            Self::Default(n, t) => format!("set {n}: {} (unless the app set it)", t.render(vars)),
            Self::Remove(n) => format!("remove {n}"),
        }
    }
}

/// A header value, with variables filled in per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

/// Per-request values of the variables.
#[derive(Debug, Clone, Copy, Default)]
pub struct Vars<'a> {
    /// The caller's SPIFFE ID.
    pub caller: Option<&'a str>,
    /// The request principal.
    pub principal: Option<&'a str>,
    /// The request id.
    pub request_id: Option<&'a str>,
}

impl Template {
    fn literal(s: &str) -> Self {
        Self(vec![Part::Text(s.to_string())])
    }

    /// Whether it uses `var`.
    pub fn uses(&self, var: Var) -> bool {
        self.0.contains(&Part::Var(var))
    }

    /// The value for one request.
    pub fn render(&self, vars: &Vars<'_>) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(Var::Caller) => out.push_str(vars.caller.unwrap_or_default()),
                Part::Var(Var::Principal) => out.push_str(vars.principal.unwrap_or_default()),
                Part::Var(Var::RequestId) => out.push_str(vars.request_id.unwrap_or_default()),
            }
        }
        out
    }
}

/// The header changes of every TrafficPolicy that targets a workload, in
/// policy order (a later `set` of the same header wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrites {
    /// Applied to requests before the app.
    pub request: Vec<Op>,
    /// Applied to responses (the app's, and the sidecar's own refusals).
    pub response: Vec<Op>,
}

impl Rewrites {
    /// Compiles the specs (already validated).
    pub fn compile(specs: &[&TrafficSpec]) -> Self {
        let mut out = Self::default();
        let ops = |ops: &HeaderOps, into: &mut Vec<Op>| {
            for name in &ops.remove {
                into.push(Op::Remove(name.to_ascii_lowercase()));
            }
            for (name, v) in &ops.set {
                into.push(Op::Set(name.to_ascii_lowercase(), Template(parse_template(v).unwrap_or_default())));
            }
            for (name, v) in &ops.add {
                into.push(Op::Add(name.to_ascii_lowercase(), Template(parse_template(v).unwrap_or_default())));
            }
        };
        for spec in specs {
            if let Some(r) = &spec.request_headers {
                ops(r, &mut out.request);
            }
            if let Some(sec) = &spec.security_headers {
                if sec.remove_server_headers {
                    out.response.extend(LEAKS.iter().map(|h| Op::Remove((*h).to_string())));
                }
                let defaults = [
                    ("strict-transport-security", &sec.hsts, "max-age=31536000; includeSubDomains"),
                    ("x-content-type-options", &sec.content_type_options, "nosniff"),
                    ("x-frame-options", &sec.frame_options, "DENY"),
                    (
                        "content-security-policy",
                        &sec.content_security_policy,
                        "default-src 'none'; frame-ancestors 'none'",
                    ),
                    ("referrer-policy", &sec.referrer_policy, "no-referrer"),
                    ("permissions-policy", &sec.permissions_policy, "camera=(), microphone=(), geolocation=()"),
                ];
                for (name, setting, recommended) in defaults {
                    let name = name.to_string();
                    match setting {
                        None | Some(Setting::Flag(false)) => {}
                        Some(Setting::Flag(true)) => {
                            out.response.push(Op::Default(name, Template::literal(recommended)))
                        }
                        Some(Setting::Value(v)) | Some(Setting::Full { value: v, always: false }) => {
                            out.response.push(Op::Default(name, Template::literal(v)))
                        }
                        Some(Setting::Full { value, always: true }) => {
                            out.response.push(Op::Set(name, Template::literal(value)))
                        }
                    }
                }
            }
            if let Some(r) = &spec.response_headers {
                ops(r, &mut out.response);
            }
        }
        out
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }

    /// Whether any request change uses `var` (so the caller computes it only then).
    pub fn request_uses(&self, var: Var) -> bool {
        self.request.iter().any(|op| match op {
            Op::Set(_, t) | Op::Add(_, t) | Op::Default(_, t) => t.uses(var),
            Op::Remove(_) => false,
        })
    }
}

/// The CORS policy in force: the first TrafficPolicy (in `namespace/name`
/// order) that has one.
pub fn compile_cors(specs: &[(String, &TrafficSpec)]) -> Option<CorsPolicy> {
    specs.iter().find_map(|(k, s)| s.cors.as_ref().map(|c| CorsPolicy::compile(k, c)))
}

#[cfg(test)]
mod tests {
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
        let bad =
            spec(serde_json::json!({"target": {"identities": ["*"]}, "cors": {"allowOrigins": ["https://*.*.com"]}}));
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
        assert_eq!(
            c.check(&head("POST", Some("application/json; charset=utf-8"), Some(10), true)).unwrap().cap,
            Some(100)
        );
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
        assert!(
            r.response.contains(&Op::Set("content-security-policy".into(), Template::literal("default-src 'self'")))
        );
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
}
