//! What [`Enforcer::decide`](crate::Enforcer::decide) returns: the
//! outcome, and its header changes as the sidecar applies them.

use std::sync::Arc;

use crate::authn::{Authenticated, Failure};
use crate::enforcer::{Enforcer, LimitInfo, Limited};
use crate::eval::Decision;
use crate::traffic::{BodyRule, Op, Vars};

use super::PRINCIPAL_HEADER;

/// Why the sidecar answers a request itself.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Malformed, or against a TrafficPolicy's validation.
    Invalid,
    /// A credential is required and missing or not valid.
    Unauthenticated,
    /// Authorization denied it.
    Forbidden,
    /// A rate limit refused it.
    RateLimited,
    /// No policy has arrived yet: the caller may retry.
    NotReady,
}

impl Refused {
    /// The decision's name in logs, tap and explanations.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Invalid => "invalid",
            Refused::Unauthenticated => "unauthenticated",
            Refused::Forbidden => "deny",
            Refused::RateLimited => "rate_limited",
            Refused::NotReady => "unavailable",
        }
    }
}

/// A refusal: what the caller is told, and why (for the audit log only).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The kind.
    pub kind: Refused,
    /// The HTTP status.
    pub status: u16,
    /// What the caller reads: short, never the reason.
    pub message: &'static str,
    /// Headers the answer carries (`Allow`, `WWW-Authenticate`, `Retry-After`, `RateLimit`).
    pub headers: Vec<(&'static str, String)>,
    /// Why, for the audit log and explanations.
    pub reason: String,
}

impl Refusal {
    /// An authorization refusal (403).
    pub(super) fn forbidden(reason: impl Into<String>) -> Self {
        Refusal {
            kind: Refused::Forbidden,
            status: 403,
            message: "forbidden",
            headers: Vec::new(),
            reason: reason.into(),
        }
    }
}

/// What happens to the request.
#[derive(Debug, Clone)]
pub enum Action {
    /// The sidecar answers it with a refusal (boxed: the rare path).
    Refuse(Box<Refusal>),
    /// A CORS preflight, answered 204 by the sidecar: with the headers that
    /// allow it, or none (the browser reads that as a refusal).
    Preflight {
        /// Whether the policy allows it.
        allowed: bool,
    },
    /// It goes to the app.
    Forward,
}

/// The request's credential.
#[derive(Debug, Clone, Default)]
pub enum Authn {
    /// No authentication ran (refused earlier, a preflight, or no policy asks for one).
    #[default]
    NotChecked,
    /// None presented, and none required.
    Anonymous,
    /// Verified.
    Verified(Arc<Authenticated>),
    /// Presented or required, and refused.
    Refused(Failure),
}

/// Everything decided about a request.
#[derive(Debug)]
pub struct Outcome<'e> {
    /// What happens to it.
    pub action: Action,
    /// The policy (and rule) that decided, when one did.
    pub policy: Option<Arc<str>>,
    /// The rule's index in that policy.
    pub rule: Option<usize>,
    /// The path's normal form, when it differs from the one received: the
    /// app receives this one.
    pub normal_path: Option<String>,
    /// The authorization decision, when the request reached it.
    pub decision: Option<Decision>,
    /// The credential.
    pub authn: Authn,
    /// What the body must hold to before it reaches the app (`None`: it streams through).
    pub body: Option<BodyRule>,
    /// The rate limit that refused it.
    pub limited: Option<Box<Limited>>,
    /// The rate limits that apply ([`Mode::Explain`] only).
    pub limits: Vec<LimitInfo>,
    /// A sample for policy previews ([`Mode::Enforce`] with `record`).
    pub sample: Option<Box<crate::preview::sample::Sample>>,
    /// The header changes, and what they are rendered with.
    pub(super) changes: Option<Box<Changes<'e>>>,
}

/// The header changes of an outcome, with their variables' values.
#[derive(Debug)]
pub(super) struct Changes<'e> {
    pub(super) enforcer: &'e Enforcer,
    pub(super) caller: Option<String>,
    pub(super) principal: Option<String>,
    pub(super) request_id: Option<String>,
    /// The CORS headers of the answer (`Some`: CORS is in force).
    pub(super) cors: Option<Vec<(&'static str, String)>>,
}

/// One header change, for the sidecar to apply to an HTTP header map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderOp<'a> {
    /// Remove every value.
    Remove(&'a str),
    /// Replace every value with this one.
    Set(&'a str, &'a str),
    /// Add a value.
    Append(&'a str, &'a str),
    /// Set only when the header is absent.
    Default(&'a str, &'a str),
}

const CORS_RESPONSE_HEADERS: [&str; 6] = [
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-expose-headers",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
];

impl<'e> Outcome<'e> {
    pub(super) fn new(action: Action) -> Self {
        Outcome {
            action,
            policy: None,
            rule: None,
            normal_path: None,
            decision: None,
            authn: Authn::NotChecked,
            body: None,
            limited: None,
            limits: Vec::new(),
            sample: None,
            changes: None,
        }
    }

    pub(super) fn refuse(kind: Refused, status: u16, message: &'static str, reason: impl Into<String>) -> Self {
        Self::new(Action::Refuse(Box::new(Refusal {
            kind,
            status,
            message,
            headers: Vec::new(),
            reason: reason.into(),
        })))
    }

    /// The answer while no policy has arrived: 503 with `Retry-After`, so
    /// callers retry rather than treat it as a decision.
    pub fn not_ready() -> Outcome<'static> {
        let mut o = Outcome::refuse(
            Refused::NotReady,
            503,
            "not ready",
            "no policy received from the control plane yet (not ready)",
        );
        if let Action::Refuse(r) = &mut o.action {
            r.headers.push(("retry-after", "1".into()));
        }
        o
    }

    /// The decision's name: `allow` (or `audit_allow`/`audit_deny` for an
    /// AUDIT rule), `preflight`, or the refusal's.
    pub fn label(&self) -> &'static str {
        match &self.action {
            Action::Refuse(r) => r.kind.label(),
            Action::Preflight { .. } => "preflight",
            Action::Forward => self.decision.as_ref().map_or("allow", Decision::label),
        }
    }

    /// The refusal, if the sidecar answers with one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.action {
            Action::Refuse(r) => Some(r),
            _ => None,
        }
    }

    /// The changes to the request before it goes to the app (forwarded
    /// requests only): what the app receives of the credential (never a
    /// claim header or principal the caller wrote, never an API key, the
    /// token only when the issuer says `forwardToken`; then the verified
    /// claims and principal), then the TrafficPolicies' request headers.
    pub fn for_each_request_op(&self, mut f: impl FnMut(HeaderOp<'_>)) {
        let (Action::Forward, Some(c)) = (&self.action, &self.changes) else { return };
        if let Some(authn) = c.enforcer.authenticator() {
            for name in authn.claim_headers().iter().chain(authn.api_key_headers()) {
                f(HeaderOp::Remove(name));
            }
            if let Authn::Verified(a) = &self.authn {
                if !a.claims.is_empty() && !a.forward_token {
                    // The token's own header (the verified JWT came from one of these).
                    for name in authn.credential_headers().filter(|n| !authn.api_key_headers().iter().any(|k| k == n)) {
                        f(HeaderOp::Remove(name));
                    }
                }
                for (name, value) in &a.claim_headers {
                    f(HeaderOp::Set(name, value));
                }
                if let Some(p) = a.principal.as_deref() {
                    f(HeaderOp::Set(PRINCIPAL_HEADER, p));
                }
            }
        }
        c.apply(&c.enforcer.rewrites().request, &mut f);
    }

    /// The changes to the answer, whoever gives it (the app, or the sidecar
    /// refusing or answering a preflight): the TrafficPolicies' response
    /// headers, and the CORS headers (the app's own Access-Control-*
    /// headers are replaced by the policy's, so no origin is ever reflected
    /// that the policy does not name).
    pub fn for_each_response_op(&self, mut f: impl FnMut(HeaderOp<'_>)) {
        let Some(c) = &self.changes else { return };
        if let Action::Preflight { .. } = self.action {
            for (name, value) in c.cors.iter().flatten() {
                f(HeaderOp::Set(name, value));
            }
            f(HeaderOp::Set("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"));
            c.apply(&c.enforcer.rewrites().response, &mut f);
            return;
        }
        c.apply(&c.enforcer.rewrites().response, &mut f);
        if let Some(cors) = &c.cors {
            for name in CORS_RESPONSE_HEADERS {
                f(HeaderOp::Remove(name));
            }
            for (name, value) in cors {
                f(HeaderOp::Set(name, value));
            }
            f(HeaderOp::Append("vary", "Origin"));
        }
    }
}

impl Changes<'_> {
    fn apply(&self, ops: &[Op], f: &mut impl FnMut(HeaderOp<'_>)) {
        if ops.is_empty() {
            return;
        }
        let vars = Vars {
            caller: self.caller.as_deref(),
            principal: self.principal.as_deref(),
            request_id: self.request_id.as_deref(),
        };
        for op in ops {
            match op {
                Op::Remove(name) => f(HeaderOp::Remove(name)),
                Op::Set(n, t) => f(HeaderOp::Set(n, &t.render(&vars))),
                Op::Add(n, t) => f(HeaderOp::Append(n, &t.render(&vars))),
                Op::Default(n, t) => f(HeaderOp::Default(n, &t.render(&vars))),
            }
        }
    }
}
