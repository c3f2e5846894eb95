//! What a sidecar records of a request for policy previews ([`Sample`]),
//! which names it records ([`Recorded`]), and the bounds on both.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Request, Resource};

/// Size limits of one sample: a sidecar does not record a request beyond
/// them, and the control plane refuses a sample beyond them.
pub mod limits {
    /// Longest path.
    pub const PATH: usize = 2048;
    /// Longest host, method, principal or API key name.
    pub const SHORT: usize = 512;
    /// Most headers.
    pub const HEADERS: usize = 16;
    /// Longest header value.
    pub const HEADER_VALUE: usize = 256;
    /// Longest claims object (JSON).
    pub const CLAIMS: usize = 2048;
    /// Longest sample (JSON).
    pub const SAMPLE: usize = 8192;
}

/// Headers never recorded, whatever a policy names: credentials.
const NEVER: [&str; 4] = ["authorization", "proxy-authorization", "cookie", "set-cookie"];

/// A request's authorization attributes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Sample {
    /// Caller SPIFFE ID; `None` for a plaintext caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Callee SPIFFE ID (set by the control plane from the reporting sidecar's certificate).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub to: String,
    /// HTTP method.
    pub method: String,
    /// The normalised path, without query.
    pub path: String,
    /// The app port.
    pub port: u16,
    /// Host / authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Headers named by a policy's conditions (lower-case names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The verified request principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The name of the API key the request was made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Claims named by a policy's conditions (by the name the condition uses).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub claims: Map<String, Value>,
}

impl Sample {
    /// What a sidecar records of a request authorization saw: of its
    /// headers and claims, only those `recorded` names.
    pub fn of(req: &Request<'_>, recorded: &Recorded) -> Self {
        let headers =
            recorded.headers.iter().filter_map(|h| req.headers.first(h).map(|v| (h.clone(), v.to_string()))).collect();
        let claims = req
            .auth
            .map(|a| {
                recorded
                    .claims
                    .iter()
                    .filter_map(|c| {
                        let values = a.claim_values(c);
                        (!values.is_empty()).then(|| (c.clone(), values.into_iter().map(Value::String).collect()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            from: req.source.map(str::to_string),
            to: String::new(),
            method: req.method.unwrap_or_default().to_string(),
            path: req.path.unwrap_or_default().to_string(),
            port: req.port,
            host: req.host.map(str::to_string),
            headers,
            principal: req.auth.and_then(|a| a.principal.clone()),
            api_key: req.auth.and_then(|a| a.api_key.as_deref().map(str::to_string)),
            claims,
        }
    }

    /// Whether it is within [`limits`].
    pub fn check(&self) -> Result<(), &'static str> {
        let short = |s: &Option<String>| s.as_ref().is_none_or(|s| s.len() <= limits::SHORT);
        if self.path.len() > limits::PATH || !self.path.starts_with('/') {
            return Err("path");
        }
        if self.method.is_empty() || self.method.len() > 32 || self.to.len() > limits::SHORT {
            return Err("method");
        }
        if !short(&self.from) || !short(&self.host) || !short(&self.principal) || !short(&self.api_key) {
            return Err("field too long");
        }
        if self.headers.len() > limits::HEADERS
            || self.headers.iter().any(|(k, v)| k.len() > 64 || v.len() > limits::HEADER_VALUE)
        {
            return Err("headers");
        }
        if self.claims.len() > limits::HEADERS || Value::Object(self.claims.clone()).to_string().len() > limits::CLAIMS
        {
            return Err("claims");
        }
        // No request a sidecar serves carries control characters in these
        // (hyper refuses them): a sample that does was made up, and would
        // reach an operator's terminal through `policy preview`.
        let control = |s: &str| s.chars().any(char::is_control);
        let optional = [&self.from, &self.host, &self.principal, &self.api_key];
        if control(&self.path)
            || control(&self.method)
            || control(&self.to)
            || optional.iter().any(|s| s.as_deref().is_some_and(control))
            || self.headers.iter().any(|(k, v)| control(k) || control(v))
        {
            return Err("control character");
        }
        Ok(())
    }
}

/// Whether a request's decision (`allow`, `deny`, `unauthenticated`,
/// `rate_limited`, `invalid`, `error`, `unavailable`) passes a tap's
/// decision filter: empty passes all, `deny` every refusal, others their own.
pub fn decision_matches(filter: &str, decision: &str) -> bool {
    match filter {
        "" => true,
        "deny" => decision != "allow",
        f => f == decision,
    }
}

/// The header and claim names a workload's policies' conditions name: what
/// its sidecar records of a request, beside the caller and the operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Header names, lower case.
    pub headers: BTreeSet<String>,
    /// Claim names (top-level or dotted paths).
    pub claims: BTreeSet<String>,
}

impl Recorded {
    /// Names the authorization policies targeting `identity` use in
    /// conditions, less `credentials` (the headers credentials are read
    /// from) and the headers never recorded.
    pub fn compile<'a>(resources: &[Resource], identity: &str, credentials: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = Self::default();
        for r in resources.iter().filter(|r| r.targets(identity)) {
            let Resource::AuthorizationPolicy { spec, .. } = r else { continue };
            for c in spec.rules.iter().flat_map(|rule| &rule.when) {
                if let Some(h) = &c.header {
                    out.headers.insert(h.to_ascii_lowercase());
                }
                if let Some(name) = &c.claim {
                    out.claims.insert(name.clone());
                }
            }
        }
        for h in credentials.into_iter().chain(NEVER) {
            out.headers.remove(&h.to_ascii_lowercase());
        }
        out
    }
}
