//! Policy impact preview: what a candidate set of policies would decide for
//! requests the sidecars saw recently, beside what the policies in force
//! decide, with the one evaluator ([`Enforcer`]) the sidecars run.
//!
//! A sidecar records a [`Sample`] of a request as authorization saw it: the
//! caller, the operation, and of the headers and claims only those the
//! `when` conditions of its policies name ([`Enforcer::recorded`]), never a
//! credential header and never a body. The control plane keeps recent
//! samples and runs [`preview`] over them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Enforcer, HeaderList, Inputs, PolicyError, Request, Resource, Verdict};

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

/// One request's outcome under one set of policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `allow`, `deny`, `unauthenticated`, `invalid` or `preflight`.
    pub decision: &'static str,
    /// The deciding policy and rule, or why none decided.
    pub rule: String,
}

/// One group of requests whose decision would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Caller SPIFFE ID, empty for plaintext callers.
    pub from: String,
    /// Callee SPIFFE ID.
    pub to: String,
    /// HTTP method.
    pub method: String,
    /// Normalised path.
    pub path: String,
    /// The decision of the policies in force: allow, deny or unauthenticated.
    pub before: &'static str,
    /// The candidate's decision.
    pub after: &'static str,
    /// What decided before.
    pub before_rule: String,
    /// What decides after.
    pub after_rule: String,
    /// Requests recorded in the group.
    pub count: u64,
}

/// What a candidate set would change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// Largest group first.
    pub changes: Vec<Change>,
    /// Requests evaluated (samples times their counts).
    pub requests_evaluated: u64,
    /// What the evaluation could not see.
    pub warnings: Vec<String>,
}

/// One workload's policies, compiled for a preview.
struct Judge {
    enforcer: Enforcer,
    recorded: Recorded,
}

impl Judge {
    fn compile(resources: &[Resource], identity: &str, default_allow_authenticated: bool) -> Result<Self, PolicyError> {
        let inputs = Inputs { version: "preview", resources, default_allow_authenticated, ..Inputs::none() };
        let enforcer = Enforcer::compile(inputs, identity, None)?;
        let recorded = enforcer.recorded().clone();
        Ok(Self { enforcer, recorded })
    }

    /// The one pipeline's decision about a recorded request, as the
    /// sidecar would make it (the credential taken as verified).
    fn decide(&self, s: &Sample) -> Outcome {
        let authenticated = s.principal.is_some() || s.api_key.is_some() || !s.claims.is_empty();
        let auth = authenticated
            .then(|| crate::Authenticated::given(s.principal.clone(), s.api_key.clone(), s.claims.clone()));
        let pairs: Vec<(&str, &str)> = s.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let headers = HeaderList(&pairs);
        let head = crate::RequestHead {
            source: s.from.as_deref(),
            caller_expired: false,
            method: &s.method,
            path: &s.path,
            query: None,
            host: s.host.as_deref(),
            port: s.port,
            headers: &headers,
            content_length: None,
            has_body: false,
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let o = self.enforcer.decide(&head, crate::Mode::Explain { given: auth.as_ref(), now });
        let rule = match (&o.action, &o.decision) {
            (crate::Action::Refuse(r), _) if r.kind == crate::Refused::Unauthenticated => {
                "an AuthenticationPolicy requires a credential".into()
            }
            (crate::Action::Refuse(r), None) => match &o.policy {
                Some(p) => format!("{p}: {}", r.reason),
                None => r.reason.clone(),
            },
            (crate::Action::Preflight { .. }, _) => "a CORS preflight, answered by the sidecar".into(),
            (_, Some(d)) => crate::decide::basis_text(d),
            (_, None) => String::new(),
        };
        let decision = match (&o.action, &o.decision) {
            (crate::Action::Forward, Some(d)) if d.verdict == Verdict::Allow => "allow",
            _ => o.label(),
        };
        Outcome { decision, rule }
    }
}

/// Evaluates `samples` (each with how many requests it stands for) under
/// `before` and `after`, and groups the requests whose decision differs by
/// caller, callee, method and path.
pub fn preview(
    before: &[Resource],
    after: &[Resource],
    default_allow_authenticated: bool,
    samples: &[(Sample, u64)],
) -> Result<Preview, PolicyError> {
    let mut by_target: BTreeMap<&str, Vec<&(Sample, u64)>> = BTreeMap::new();
    for s in samples {
        by_target.entry(s.0.to.as_str()).or_default().push(s);
    }
    let mut out = Preview::default();
    type Key = (String, String, String, String, &'static str, &'static str);
    let mut groups: HashMap<Key, (String, String, u64)> = HashMap::new();
    for (target, samples) in by_target {
        let old = Judge::compile(before, target, default_allow_authenticated)?;
        let new = Judge::compile(after, target, default_allow_authenticated)?;
        for h in new.recorded.headers.difference(&old.recorded.headers) {
            out.warnings.push(format!(
                "{target}: the candidate names header {h:?}, which its sidecars do not record (no policy in force names it): requests are evaluated as if it were absent"
            ));
        }
        for c in new.recorded.claims.difference(&old.recorded.claims) {
            out.warnings.push(format!(
                "{target}: the candidate names claim {c:?}, which its sidecars do not record (no policy in force names it): requests are evaluated as if it were absent"
            ));
        }
        for (s, count) in samples {
            out.requests_evaluated += count;
            let (b, a) = (old.decide(s), new.decide(s));
            if b.decision == a.decision {
                continue;
            }
            let key = (
                s.from.clone().unwrap_or_default(),
                s.to.clone(),
                s.method.clone(),
                s.path.clone(),
                b.decision,
                a.decision,
            );
            groups.entry(key).or_insert_with(|| (b.rule, a.rule, 0)).2 += count;
        }
    }
    out.changes = groups
        .into_iter()
        .map(|((from, to, method, path, before, after), (before_rule, after_rule, count))| Change {
            from,
            to,
            method,
            path,
            before,
            after,
            before_rule,
            after_rule,
            count,
        })
        .collect();
    out.changes.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| (&a.to, &a.from, &a.path, &a.method).cmp(&(&b.to, &b.from, &b.path, &b.method)))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_control_characters_are_refused() {
        let ok: Sample = serde_json::from_str(r#"{"method":"GET","path":"/a","port":80}"#).unwrap();
        assert!(ok.check().is_ok());
        for bad in [
            r#"{"method":"GET","path":"/a\nFORGED","port":80}"#,
            r#"{"method":"GET","path":"/a\u001b[31m","port":80}"#,
            r#"{"method":"GE\rT","path":"/a","port":80}"#,
            r#"{"method":"GET","path":"/a","port":80,"headers":{"x":"a\nb"}}"#,
        ] {
            let s: Sample = serde_json::from_str(bad).unwrap();
            assert_eq!(s.check(), Err("control character"), "{bad}");
        }
    }

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn policy(rules: &str) -> Vec<Resource> {
        crate::test_util::parse_all(&format!(
            "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: orders, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  action: ALLOW\n  rules:\n{rules}"
        ))
        .unwrap()
    }

    fn sample(from: Option<&str>, method: &str, path: &str) -> Sample {
        Sample {
            from: from.map(str::to_string),
            to: ORDERS.into(),
            method: method.into(),
            path: path.into(),
            port: 8080,
            ..Default::default()
        }
    }

    #[test]
    fn flips_are_grouped_and_counted_with_the_deciding_rules() {
        let before = policy(&format!("  - from: [{{identities: [\"{WEB}\"]}}]\n"));
        let after = policy(&format!("  - from: [{{identities: [\"{WEB}\"]}}]\n    to: [{{methods: [GET]}}]\n"));
        let samples = vec![
            (sample(Some(WEB), "GET", "/a"), 5),
            (sample(Some(WEB), "POST", "/a"), 3),
            (sample(Some(WEB), "POST", "/a"), 2),
            (sample(None, "GET", "/a"), 4),
        ];
        let p = preview(&before, &after, false, &samples).unwrap();
        assert_eq!(p.requests_evaluated, 14);
        assert_eq!(p.changes.len(), 1, "{p:?}");
        let c = &p.changes[0];
        assert_eq!((c.from.as_str(), c.method.as_str(), c.before, c.after, c.count), (WEB, "POST", "allow", "deny", 5));
        assert_eq!(c.before_rule, "shop/orders ALLOW rule 0");
        assert_eq!(c.after_rule, "no ALLOW rule matched");
        // The reverse change flips them back.
        let back = preview(&after, &before, false, &samples).unwrap();
        assert_eq!((back.changes[0].before, back.changes[0].after), ("deny", "allow"));
    }

    #[test]
    fn conditions_decide_on_recorded_headers_and_unrecorded_names_are_warned_about() {
        let before = policy("  - when: [{header: x-tenant, values: [acme]}]\n");
        let after = policy("  - when: [{header: x-tenant, values: [acme]}, {header: x-env, values: [prod]}]\n");
        let mut s = sample(Some(WEB), "GET", "/");
        s.headers.insert("x-tenant".into(), "acme".into());
        let p = preview(&before, &after, false, &[(s, 1)]).unwrap();
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].contains("\"x-env\""), "{:?}", p.warnings);
    }

    #[test]
    fn credential_headers_are_never_recorded() {
        let r = policy(
            "  - when: [{header: Authorization, values: ['*']}, {header: x-api-key, values: ['*']}, {header: x-tenant, values: [a]}, {claim: scope, values: [read]}]\n",
        );
        let rec = Recorded::compile(&r, ORDERS, ["x-api-key"]);
        assert_eq!(rec.headers.into_iter().collect::<Vec<_>>(), vec!["x-tenant".to_string()]);
        assert_eq!(rec.claims.into_iter().collect::<Vec<_>>(), vec!["scope".to_string()]);
    }

    #[test]
    fn a_sample_holds_only_the_recorded_headers_and_claims_and_decides_alike() {
        let rules = policy("  - when: [{header: x-tenant, values: [acme]}, {claim: scope, values: [orders.read]}]\n");
        let enforcer =
            Enforcer::compile(Inputs { version: "t", resources: &rules, ..Inputs::none() }, ORDERS, None).unwrap();
        let mut claims = Map::new();
        claims.insert("scope".into(), Value::String("profile orders.read".into()));
        claims.insert("email".into(), Value::String("a@b.c".into()));
        let auth = crate::Authenticated::given(Some("https://idp/alice".into()), None, claims);
        let pairs = [("x-tenant", "acme"), ("x-request-id", "1234"), ("authorization", "Bearer secret")];
        let headers = HeaderList(&pairs);
        let req = Request {
            source: Some(WEB),
            method: Some("GET"),
            path: Some("/o"),
            port: 80,
            host: Some("orders"),
            headers: &headers,
            auth: Some(&auth),
        };
        let s = Sample::of(&req, enforcer.recorded());
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("secret") && !json.contains("1234") && !json.contains("a@b.c"), "{json}");
        assert_eq!(enforcer.authorize(&req).verdict, Verdict::Allow);
        let s = Sample { to: ORDERS.into(), ..s };
        let p = preview(
            &rules,
            &policy("  - from: [{identities: [\"spiffe://cluster.local/ns/x/sa/nobody\"]}]\n"),
            false,
            &[(s, 1)],
        )
        .unwrap();
        assert_eq!((p.changes[0].before, p.changes[0].after), ("allow", "deny"), "{p:?}");
    }

    #[test]
    fn samples_beyond_the_limits_are_refused() {
        let mut s = sample(Some(WEB), "GET", "/");
        assert!(s.check().is_ok());
        s.path = format!("/{}", "a".repeat(limits::PATH));
        assert!(s.check().is_err());
        let mut s = sample(Some(WEB), "GET", "relative");
        assert!(s.check().is_err());
        s.path = "/".into();
        s.headers = (0..20).map(|i| (format!("h{i}"), "v".into())).collect();
        assert!(s.check().is_err());
        assert!(serde_json::from_str::<Sample>(r#"{"method":"GET","path":"/","port":1,"body":"x"}"#).is_err());
    }
}
