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

use serde::Serialize;

use crate::{Enforcer, HeaderList, Inputs, PolicyError, Resource, Verdict};

pub(crate) mod sample;

pub use sample::{Recorded, Sample, decision_matches, limits};

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
    // Requests of one group may have been decided by different rules: all
    // are named, in order (not whichever sample came first).
    let mut groups: HashMap<Key, (BTreeSet<String>, BTreeSet<String>, u64)> = HashMap::new();
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
            let g = groups.entry(key).or_default();
            g.0.insert(b.rule);
            g.1.insert(a.rule);
            g.2 += count;
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
            before_rule: before_rule.into_iter().collect::<Vec<_>>().join("; "),
            after_rule: after_rule.into_iter().collect::<Vec<_>>().join("; "),
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
    use crate::Request;
    use serde_json::{Map, Value};

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
    fn a_group_decided_by_several_rules_names_them_all_whatever_the_order() {
        let before = policy("  - when: [{header: x-a, values: [\"1\"]}]\n  - to: [{methods: [GET]}]\n");
        let after = policy("  - to: [{methods: [POST]}]\n");
        let mut tagged = sample(Some(WEB), "GET", "/a");
        tagged.headers.insert("x-a".into(), "1".into());
        let plain = sample(Some(WEB), "GET", "/a");
        for samples in [vec![(tagged.clone(), 1), (plain.clone(), 1)], vec![(plain, 1), (tagged, 1)]] {
            let p = preview(&before, &after, false, &samples).unwrap();
            assert_eq!(p.changes.len(), 1, "{p:?}");
            assert_eq!(p.changes[0].before_rule, "shop/orders ALLOW rule 0; shop/orders ALLOW rule 1");
            assert_eq!(p.changes[0].count, 2);
        }
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
