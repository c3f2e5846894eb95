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

use crate::resource::spec::Target;

mod checks;
mod cors;
mod rewrites;
#[cfg(test)]
mod tests;
mod validate;

pub use checks::{BodyRule, Checks, DEFAULT_SCHEMA_BODY_BYTES, Head, Invalid};
pub use cors::{CorsPolicy, compile_cors};
pub use rewrites::{Op, Rewrites, Template, VARIABLES, Var, Vars};
pub(crate) use validate::validate;

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
    /// How the targeted (calling) workloads balance their calls over a
    /// service's endpoints and eject failing ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancing: Option<crate::resilience::BalancingSpec>,
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
