//! Compiled rule sets and the authorization decision.
//!
//! Order of evaluation at the callee: any matching DENY denies; if any ALLOW
//! policy targets the workload a request must match one of its rules;
//! otherwise the mesh default applies (deny, or allow authenticated callers).
//! AUDIT policies are evaluated as if they were ALLOW policies and reported
//! (would allow / would deny), never enforced.
//!
//! Rules whose callers are exact SPIFFE IDs are indexed by caller, so a
//! decision looks at the caller's own rules plus the few generic ones
//! (globs, namespaces, any caller), whatever the total number of rules.

use std::collections::HashMap;

use wildmatch::WildMatch;

/// A pattern of a rule: a glob, or, without `*` or `?`, an exact string,
/// compared without the glob matcher (most rules name exact identities and
/// paths, and this runs for every request).
#[derive(Debug, Clone)]
pub(crate) enum Pattern {
    Exact(String),
    Glob(WildMatch),
}

impl Pattern {
    pub(crate) fn new(s: &str) -> Self {
        if s.contains(['*', '?']) { Self::Glob(WildMatch::new(s)) } else { Self::Exact(s.to_string()) }
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => e == value,
            Self::Glob(g) => g.matches(value),
        }
    }
}

use crate::resource::{Action, Condition, Operation, Resource, Rule, Source};

/// A request's headers, read where they are (nothing is copied per request).
pub trait Headers {
    /// The first value of header `name` (given in lower case).
    fn first(&self, name: &str) -> Option<&str>;
    /// Whether any value of header `name` (lower case) satisfies `pred`.
    fn any(&self, name: &str, pred: &mut dyn FnMut(&str) -> bool) -> bool;
}

/// Headers as a list of `(lower-case name, value)` pairs.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderList<'a>(pub &'a [(&'a str, &'a str)]);

impl Headers for HeaderList<'_> {
    fn first(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
    fn any(&self, name: &str, pred: &mut dyn FnMut(&str) -> bool) -> bool {
        self.0.iter().any(|(n, v)| *n == name && pred(v))
    }
}

/// No headers (TCP connections).
pub static NO_HEADERS: HeaderList<'static> = HeaderList(&[]);

/// The request as the callee's sidecar sees it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The verified caller identity; `None` for plaintext (PERMISSIVE) callers.
    pub source: Option<&'a str>,
    /// HTTP method (`None` for TCP).
    pub method: Option<&'a str>,
    /// Path without query (`None` for TCP).
    pub path: Option<&'a str>,
    /// Destination port.
    pub port: u16,
    /// Host / authority.
    pub host: Option<&'a str>,
    /// Headers.
    pub headers: &'a dyn Headers,
    /// The verified request credential (JWT or API key), if any.
    pub auth: Option<&'a crate::authn::Authenticated>,
}

impl Default for Request<'_> {
    fn default() -> Self {
        Self { source: None, method: None, path: None, port: 0, host: None, headers: &NO_HEADERS, auth: None }
    }
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("source", &self.source)
            .field("method", &self.method)
            .field("path", &self.path)
            .field("port", &self.port)
            .field("host", &self.host)
            .field("principal", &self.auth.and_then(|a| a.principal.as_deref()))
            .finish_non_exhaustive()
    }
}

/// The enforced outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward.
    Allow,
    /// Refuse (403 / PERMISSION_DENIED / TCP close).
    Deny,
}

/// What a decision rests on (the reason text is built only when asked for:
/// deciding must not allocate on the request path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// A DENY rule matched.
    DenyRule,
    /// An ALLOW rule matched.
    AllowRule,
    /// ALLOW policies target the workload and none matched.
    NoAllowMatched,
    /// No ALLOW policy; the mesh default allows authenticated callers.
    DefaultAllowAuthenticated,
    /// No ALLOW policy; the mesh default denies.
    DefaultDeny,
}

/// A decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What is enforced.
    pub verdict: Verdict,
    /// `namespace/name` of the deciding policy, if one decided.
    pub policy: Option<std::sync::Arc<str>>,
    /// Its position in [`RuleSet::policies`] (for per-policy counters
    /// resolved when the rule set is compiled).
    pub policy_id: Option<usize>,
    /// Index of the deciding rule in that policy.
    pub rule: Option<usize>,
    /// What the decision rests on; see [`Decision::reason`].
    pub basis: Basis,
    /// AUDIT outcome: `Some(true)` would allow, `Some(false)` would deny.
    pub audit: Option<bool>,
}

impl Decision {
    /// Why, for logs and `authz check`.
    pub fn reason(&self) -> String {
        let rule = |action: &str| {
            format!("{action} rule {} of {} matched", self.rule.unwrap_or(0), self.policy.as_deref().unwrap_or("?"))
        };
        match self.basis {
            Basis::DenyRule => rule("DENY"),
            Basis::AllowRule => rule("ALLOW"),
            Basis::NoAllowMatched => "ALLOW policies target this workload and none of their rules matched".into(),
            Basis::DefaultAllowAuthenticated => {
                "no ALLOW policy targets this workload; the mesh default allows authenticated callers".into()
            }
            Basis::DefaultDeny => "no ALLOW policy targets this workload; the mesh default is deny".into(),
        }
    }

    /// `allow`, `deny`, `audit_allow` or `audit_deny` (the names of `authz check`).
    pub fn label(&self) -> &'static str {
        match (self.verdict, self.audit) {
            (Verdict::Deny, _) => "deny",
            (Verdict::Allow, None) => "allow",
            (Verdict::Allow, Some(true)) => "audit_allow",
            (Verdict::Allow, Some(false)) => "audit_deny",
        }
    }
}

#[derive(Debug)]
struct CompiledRule {
    policy: std::sync::Arc<str>,
    policy_id: usize,
    index: usize,
    from: Vec<CompiledSource>,
    to: Vec<CompiledOp>,
    when: Vec<(When, Vec<Pattern>)>,
}

#[derive(Debug)]
enum When {
    Header(String),
    Claim(String),
}

#[derive(Debug)]
struct CompiledSource {
    identities: Vec<Pattern>,
    not_identities: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    unauthenticated: Option<bool>,
    request_principals: Vec<Pattern>,
    not_request_principals: Vec<Pattern>,
    api_keys: Vec<Pattern>,
    not_api_keys: Vec<Pattern>,
}

#[derive(Debug)]
struct CompiledOp {
    methods: Vec<String>,
    paths: Vec<Pattern>,
    ports: Vec<u16>,
    hosts: Vec<Pattern>,
}

/// Rules of one action, indexed by exact caller identity.
#[derive(Debug, Default)]
struct Index {
    rules: Vec<CompiledRule>,
    by_identity: HashMap<String, Vec<usize>>,
    generic: Vec<usize>,
    /// Whether any policy of this action targets the workload (even with no rules).
    present: bool,
    /// DENY rules match TCP connections even when they name HTTP fields.
    deny: bool,
}

/// The rules that apply to one workload, compiled.
#[derive(Debug, Default)]
pub struct RuleSet {
    deny: Index,
    allow: Index,
    audit: Index,
    /// Mesh default when no ALLOW policy targets the workload.
    default_allow_authenticated: bool,
    /// `namespace/name` of every policy compiled in, in order.
    policies: Vec<std::sync::Arc<str>>,
}

fn globs(v: &[String]) -> Vec<Pattern> {
    v.iter().map(|s| Pattern::new(s)).collect()
}

fn is_exact(s: &str) -> bool {
    !s.contains('*') && !s.contains('?')
}

/// The namespace of `spiffe://td/ns/<ns>/sa/<sa>`.
fn namespace_of(id: &str) -> Option<&str> {
    let mut it = id.strip_prefix("spiffe://")?.split('/');
    it.next()?;
    match (it.next(), it.next()) {
        (Some("ns"), Some(ns)) => Some(ns),
        _ => None,
    }
}

impl Index {
    fn add(&mut self, policy: &std::sync::Arc<str>, policy_id: usize, index: usize, rule: &Rule) {
        let compiled = CompiledRule {
            policy: policy.clone(),
            policy_id,
            index,
            from: rule.from.iter().map(compile_source).collect(),
            to: rule.to.iter().map(compile_op).collect(),
            when: rule
                .when
                .iter()
                .map(|c: &Condition| {
                    let what = match (&c.header, &c.claim) {
                        (Some(h), _) => When::Header(h.to_ascii_lowercase()),
                        (None, claim) => When::Claim(claim.clone().unwrap_or_default()),
                    };
                    (what, globs(&c.values))
                })
                .collect(),
        };
        let id = self.rules.len();
        // Indexable: every `from` entry names only exact identities.
        let exact: Option<Vec<&String>> = if rule.from.is_empty() {
            None
        } else {
            rule.from
                .iter()
                .map(|s| {
                    let only_ids = s.not_identities.is_empty()
                        && s.namespaces.is_empty()
                        && s.not_namespaces.is_empty()
                        && s.unauthenticated.is_none()
                        && !s.names_request_principal()
                        && !s.identities.is_empty()
                        && s.identities.iter().all(|i| is_exact(i));
                    only_ids.then_some(&s.identities)
                })
                .collect::<Option<Vec<_>>>()
                .map(|v| v.into_iter().flatten().collect())
        };
        match exact {
            Some(ids) => {
                for i in ids {
                    let list = self.by_identity.entry(i.clone()).or_default();
                    if list.last() != Some(&id) {
                        list.push(id);
                    }
                }
            }
            None => self.generic.push(id),
        }
        self.rules.push(compiled);
    }

    /// The first matching rule, in policy then rule order.
    fn first_match(&self, req: &Request<'_>) -> Option<&CompiledRule> {
        let own = req.source.and_then(|s| self.by_identity.get(s)).map(Vec::as_slice).unwrap_or_default();
        let mut best: Option<usize> = None;
        for &i in own.iter().chain(self.generic.iter()) {
            if best.is_some_and(|b| b <= i) {
                continue;
            }
            if matches(&self.rules[i], req, self.deny) {
                best = Some(i);
            }
        }
        best.map(|i| &self.rules[i])
    }
}

fn compile_source(s: &Source) -> CompiledSource {
    CompiledSource {
        identities: globs(&s.identities),
        not_identities: globs(&s.not_identities),
        namespaces: globs(&s.namespaces),
        not_namespaces: globs(&s.not_namespaces),
        unauthenticated: s.unauthenticated,
        request_principals: globs(&s.request_principals),
        not_request_principals: globs(&s.not_request_principals),
        api_keys: globs(&s.api_keys),
        not_api_keys: globs(&s.not_api_keys),
    }
}

fn compile_op(o: &Operation) -> CompiledOp {
    CompiledOp { methods: o.methods.clone(), paths: globs(&o.paths), ports: o.ports.clone(), hosts: globs(&o.hosts) }
}

fn any_or_empty(list: &[Pattern], value: Option<&str>) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|g| g.matches(v)))
}

/// `l4`: a TCP connection judged by a DENY rule: request credentials cannot
/// exist there, and a DENY rule that names them still matches.
fn source_matches(s: &CompiledSource, req: &Request<'_>, l4: bool) -> bool {
    if let Some(want_unauth) = s.unauthenticated
        && want_unauth != req.source.is_none()
    {
        return false;
    }
    let ns = req.source.and_then(namespace_of);
    let workload = any_or_empty(&s.identities, req.source)
        && any_or_empty(&s.namespaces, ns)
        && !s.not_identities.iter().any(|g| req.source.is_some_and(|v| g.matches(v)))
        && !s.not_namespaces.iter().any(|g| ns.is_some_and(|v| g.matches(v)));
    if !workload || l4 {
        return workload;
    }
    let principal = req.auth.and_then(|a| a.principal.as_deref());
    let key = req.auth.and_then(|a| a.api_key.as_deref());
    any_or_empty(&s.request_principals, principal)
        && any_or_empty(&s.api_keys, key)
        && !s.not_request_principals.iter().any(|g| principal.is_some_and(|v| g.matches(v)))
        && !s.not_api_keys.iter().any(|g| key.is_some_and(|v| g.matches(v)))
}

fn condition_holds(what: &When, values: &[Pattern], req: &Request<'_>) -> bool {
    match what {
        When::Header(h) => req.headers.any(h, &mut |v| values.iter().any(|g| g.matches(v))),
        When::Claim(c) => req
            .auth
            .is_some_and(|a| crate::authn::claim_any(&a.claims, c, &mut |v| values.iter().any(|g| g.matches(v)))),
    }
}

/// Whether `method` is one of `methods` (`*` is any). Methods compare
/// without case: an app that reads `get` as GET must not let `get` past a
/// rule written for GET.
pub fn method_matches(methods: &[String], method: Option<&str>) -> bool {
    methods.is_empty() || method.is_some_and(|m| methods.iter().any(|x| x == "*" || x.eq_ignore_ascii_case(m)))
}

/// `l4`: the request is a TCP connection and the rule a DENY rule. HTTP
/// fields (methods, paths, hosts, headers) cannot be checked on a byte
/// stream; a DENY rule that names them still matches (deny errs on the side
/// of denying), while an ALLOW rule that names them never does.
fn op_matches(o: &CompiledOp, req: &Request<'_>, l4: bool) -> bool {
    let http = l4
        || (method_matches(&o.methods, req.method)
            && any_or_empty(&o.paths, req.path)
            && any_or_empty(&o.hosts, req.host));
    http && (o.ports.is_empty() || o.ports.contains(&req.port))
}

fn matches(r: &CompiledRule, req: &Request<'_>, deny: bool) -> bool {
    let l4 = deny && req.is_tcp();
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, req, l4)))
        && (r.to.is_empty() || r.to.iter().any(|o| op_matches(o, req, l4)))
        && (l4 || r.when.iter().all(|(what, vals)| condition_holds(what, vals, req)))
}

impl Request<'_> {
    /// Whether this is a TCP connection (no HTTP fields at all).
    pub fn is_tcp(&self) -> bool {
        self.method.is_none() && self.path.is_none()
    }
}

impl RuleSet {
    /// Compiles the authorization policies among `resources` that target `workload`.
    pub fn compile(resources: &[Resource], workload: &str, default_allow_authenticated: bool) -> Self {
        let mut set = RuleSet { default_allow_authenticated, ..Default::default() };
        set.deny.deny = true;
        let mut sorted: Vec<&Resource> = resources.iter().collect();
        sorted.sort_by_key(|r| r.key());
        for r in sorted {
            let Resource::AuthorizationPolicy { spec, .. } = r else { continue };
            if !spec.target.identities.iter().any(|g| Pattern::new(g).matches(workload)) {
                continue;
            }
            let index = match spec.action {
                Action::Deny => &mut set.deny,
                Action::Allow => &mut set.allow,
                Action::Audit => &mut set.audit,
            };
            index.present = true;
            let key: std::sync::Arc<str> = r.key().into();
            let id = set.policies.len();
            set.policies.push(key.clone());
            for (i, rule) in spec.rules.iter().enumerate() {
                index.add(&key, id, i, rule);
            }
        }
        set
    }

    /// `namespace/name` of every authorization policy compiled in; a
    /// decision's `policy_id` indexes this.
    pub fn policies(&self) -> &[std::sync::Arc<str>] {
        &self.policies
    }

    /// Decides one request.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let audit = self.audit.present.then(|| self.audit.first_match(req).is_some());
        let decided = |verdict, r: &CompiledRule, basis| Decision {
            verdict,
            policy: Some(r.policy.clone()),
            policy_id: Some(r.policy_id),
            rule: Some(r.index),
            basis,
            audit,
        };
        if let Some(r) = self.deny.first_match(req) {
            return decided(Verdict::Deny, r, Basis::DenyRule);
        }
        if self.allow.present {
            return match self.allow.first_match(req) {
                Some(r) => decided(Verdict::Allow, r, Basis::AllowRule),
                None => Decision {
                    verdict: Verdict::Deny,
                    policy: None,
                    policy_id: None,
                    rule: None,
                    basis: Basis::NoAllowMatched,
                    audit,
                },
            };
        }
        let (verdict, basis) = if self.default_allow_authenticated && req.source.is_some() {
            (Verdict::Allow, Basis::DefaultAllowAuthenticated)
        } else {
            (Verdict::Deny, Basis::DefaultDeny)
        };
        Decision { verdict, policy: None, policy_id: None, rule: None, basis, audit }
    }
}

#[cfg(test)]
mod tests;
