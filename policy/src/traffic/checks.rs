//! `validation` compiled: the checks a request's head (method, query, media
//! type, length) and its JSON body must pass before the app sees them.

use super::{TrafficSpec, Validation};

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
