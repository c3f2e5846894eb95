//! Header rewriting: `requestHeaders`, `responseHeaders` and
//! `securityHeaders` compiled into header operations, whose values are
//! templates filled in per request.

use super::{HeaderOps, Setting, TrafficSpec};

/// The variables a header value may use.
pub const VARIABLES: [&str; 3] = ["caller", "principal", "request_id"];

const LEAKS: [&str; 4] = ["server", "x-powered-by", "x-aspnet-version", "x-aspnetmvc-version"];

/// A header value template: text and `${variable}` parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Part {
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

pub(super) fn parse_template(v: &str) -> Result<Vec<Part>, String> {
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
    pub(super) fn literal(s: &str) -> Self {
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
