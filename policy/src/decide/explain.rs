//! Explanations of the one pipeline's outcome, for `palisadectl authz check`.

use crate::authn::Authenticated;
use crate::enforcer::Enforcer;
use crate::traffic::Vars;

use super::{Action, Mode, Refused, RequestHead};

/// What the callee's sidecar would do with a request, in words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Explanation {
    /// The decision: `allow` (`audit_allow`, `audit_deny`), `deny`,
    /// `invalid`, `unauthenticated`, or `preflight`.
    pub decision: &'static str,
    /// The status the sidecar answers itself with; `None` when the app answers.
    pub status: Option<u16>,
    /// The deciding policy, if one decided.
    pub policy: String,
    /// The deciding rule's index.
    pub rule: Option<usize>,
    /// Why.
    pub reason: String,
    /// The rate limits that apply.
    pub rate_limits: Vec<String>,
    /// The TrafficPolicy changes to the request the app receives.
    pub request_changes: Vec<String>,
    /// The TrafficPolicy changes to the answer.
    pub response_changes: Vec<String>,
    /// What CORS does with it, if CORS is in force.
    pub cors: String,
}

impl Enforcer {
    /// Explains [`Enforcer::decide`] for a request whose credential is
    /// `given` (as if verified; `None`: the one its headers carry, verified
    /// at `now`).
    pub fn explain(&self, head: &RequestHead<'_>, given: Option<&Authenticated>, now: u64) -> Explanation {
        let o = self.decide(head, Mode::Explain { given, now });
        let mut e = Explanation {
            decision: o.label(),
            policy: o.policy.as_deref().unwrap_or_default().to_string(),
            rule: o.rule,
            rate_limits: o.limits.iter().map(ToString::to_string).collect(),
            ..Default::default()
        };
        e.reason = match &o.action {
            Action::Refuse(r) => {
                e.status = Some(r.status);
                match r.kind {
                    Refused::Invalid if o.policy.is_none() => {
                        format!("the sidecar refuses this path with {}: {}", r.status, r.reason)
                    }
                    Refused::Invalid => {
                        format!("TrafficPolicy {} refuses it with {}: {}", e.policy, r.status, r.reason)
                    }
                    Refused::Unauthenticated => {
                        format!("{} ({}); give --principal or --api-key to check one that does", r.reason, r.status)
                    }
                    _ => r.reason.clone(),
                }
            }
            Action::Preflight { allowed } => {
                e.status = Some(204);
                let verb = if *allowed { "allows" } else { "does not allow" };
                format!(
                    "a CORS preflight: the sidecar answers it 204 itself (the app never sees it); {} {verb} it",
                    e.policy
                )
            }
            Action::Forward => o.decision.as_ref().map(|d| d.reason()).unwrap_or_default(),
        };
        let vars = Vars {
            caller: head.source,
            principal: given.and_then(|g| g.principal.as_deref()),
            request_id: Some("<x-request-id>"),
        };
        let rewrites = self.rewrites();
        if matches!(o.action, Action::Forward) {
            e.request_changes = rewrites.request.iter().map(|op| op.describe(&vars)).collect();
        }
        e.response_changes = rewrites.response.iter().map(|op| op.describe(&vars)).collect();
        e.cors = self.describe_cors(head);
        e
    }

    fn describe_cors(&self, head: &RequestHead<'_>) -> String {
        let Some(c) = self.cors() else { return String::new() };
        let Some(origin) = head.headers.first("origin") else {
            return format!("{} has CORS; give --header origin=... to check a browser's request", c.policy);
        };
        let preflight = head
            .method
            .eq_ignore_ascii_case("OPTIONS")
            .then(|| head.headers.first("access-control-request-method"))
            .flatten();
        let answer = match preflight {
            Some(m) => c.preflight(origin, m, head.headers.first("access-control-request-headers")),
            None => c.actual(origin),
        };
        let what = if preflight.is_some() { "preflight" } else { "request" };
        match answer {
            Some(h) => format!(
                "{what} from {origin} allowed by {}: {}",
                c.policy,
                h.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; ")
            ),
            None => format!(
                "{what} from {origin} not allowed by {} (no Access-Control-* headers: the browser blocks it)",
                c.policy
            ),
        }
    }
}
