//! The one request pipeline at the callee: [`Enforcer::decide`] takes what
//! the sidecar knows of a request before its body and returns everything
//! that is decided about it, in this order:
//!
//! 1. a caller whose certificate expired while its connection stayed open
//!    is refused (403);
//! 2. the path is put in its one normal form, or refused (400);
//! 3. a CORS preflight is answered here (204; the app never sees one);
//! 4. TrafficPolicy validation (405, 415, 414, 400, 413);
//! 5. authentication (401);
//! 6. authorization (403);
//! 7. rate limits (429);
//! 8. otherwise the request goes to the app, with the credential rewrite,
//!    the request and response header changes, the CORS response headers
//!    and the body check to run.
//!
//! The sidecar enforces an [`Outcome`] ([`Mode::Enforce`]); `authz check`
//! and `policy preview` explain one ([`Mode::Explain`]). Both run this code,
//! so an explanation cannot disagree with enforcement.

mod explain;
mod outcome;

pub use explain::Explanation;
pub use outcome::{Action, Authn, HeaderOp, Outcome, Refusal, Refused};

use std::net::IpAddr;
use std::sync::Arc;

use crate::authn::{Authenticated, Failure, Outcome as AuthnOutcome};
use crate::enforcer::{Enforcer, Limited};
use crate::eval::{Basis, Decision, Headers, Request, Verdict};
use crate::traffic::{Head, Var};

use outcome::Changes;

/// The header the app reads the verified request principal from (`<iss>/<sub>`
/// of a JWT, or an API key's principal); removed from every request first.
pub const PRINCIPAL_HEADER: &str = "x-palisade-request-principal";

/// What is known of a request before its body.
#[derive(Clone, Copy)]
pub struct RequestHead<'a> {
    /// The caller's verified SPIFFE ID (mutual TLS); `None` for plaintext.
    pub source: Option<&'a str>,
    /// The caller's certificate expired after its connection was opened.
    pub caller_expired: bool,
    /// The method.
    pub method: &'a str,
    /// The path as received (before normalisation), without the query.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    /// The authority (`:authority` or `Host`).
    pub host: Option<&'a str>,
    /// The workload port the request is for.
    pub port: u16,
    /// The request's headers.
    pub headers: &'a dyn Headers,
    /// `Content-Length`, when declared.
    pub content_length: Option<u64>,
    /// Whether a body follows.
    pub has_body: bool,
}

impl std::fmt::Debug for RequestHead<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers may carry credentials: never printed.
        f.debug_struct("RequestHead")
            .field("source", &self.source)
            .field("method", &self.method)
            .field("path", &self.path)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Whether a request is enforced or explained.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// The sidecar: the credential is verified from the headers at `now`
    /// (unix seconds), the request counts against the rate limits (keyed by
    /// `src_ip` where a limit says so), and with `record` a sample is kept
    /// for policy previews.
    Enforce {
        /// Unix seconds.
        now: u64,
        /// The caller's address.
        src_ip: IpAddr,
        /// Keep a preview sample.
        record: bool,
    },
    /// An explanation (`authz check`, `policy preview`): `given` is taken as
    /// the verified credential; without one, the credential the headers
    /// carry is verified as the sidecar would (at `now`), with the keys and
    /// key sets the enforcer was compiled with. Rate limits are listed, not
    /// counted.
    Explain {
        /// The credential, as if verified.
        given: Option<&'a Authenticated>,
        /// Unix seconds.
        now: u64,
    },
}

impl Enforcer {
    /// Decides a request: the one pipeline (see the module's documentation).
    pub fn decide<'e>(&'e self, head: &RequestHead<'_>, mode: Mode<'_>) -> Outcome<'e> {
        if head.caller_expired {
            return Outcome::refuse(
                Refused::Forbidden,
                403,
                "forbidden",
                "the caller's certificate expired after this connection was opened",
            );
        }
        let checks = self.checks();
        let normal = match crate::path::normalize_with(head.path, checks.path_options()) {
            Ok(p) => p,
            Err(e) => return Outcome::refuse(Refused::Invalid, 400, "bad request path", e.reason()),
        };
        let cors = self.cors();
        let origin = cors.and_then(|_| head.headers.first("origin"));
        // Methods match in any case everywhere (a DENY of DELETE also refuses
        // `delete`), so a preflight is any spelling of OPTIONS too.
        if let (Some(cors), Some(origin), true) = (cors, origin, head.method.eq_ignore_ascii_case("OPTIONS"))
            && let Some(asked) = head.headers.first("access-control-request-method")
        {
            let allowed = cors.preflight(origin, asked, head.headers.first("access-control-request-headers"));
            let mut o = Outcome::new(Action::Preflight { allowed: allowed.is_some() });
            o.policy = Some(cors.policy.as_str().into());
            o.changes = Some(Box::new(Changes {
                enforcer: self,
                caller: head.source.map(str::to_string),
                principal: None,
                request_id: None,
                cors: Some(allowed.unwrap_or_default()),
            }));
            return o;
        }
        let mut o = self.decide_request(head, &normal, mode);
        if let std::borrow::Cow::Owned(p) = normal {
            o.normal_path = Some(p);
        }
        if !self.rewrites().is_empty() || cors.is_some() || self.authenticator().is_some() {
            let principal = match &o.authn {
                Authn::Verified(a) if matches!(o.action, Action::Forward) => a.principal.clone(),
                _ => None,
            };
            let request_id = self.rewrites().request_uses(Var::RequestId).then(|| request_id(head, mode)).flatten();
            o.changes = Some(Box::new(Changes {
                enforcer: self,
                caller: head.source.map(str::to_string),
                principal,
                request_id,
                cors: cors.map(|c| origin.and_then(|o| c.actual(o)).unwrap_or_default()),
            }));
        }
        o
    }

    /// Steps 4 to 7, on the normalised path.
    fn decide_request<'e>(&'e self, head: &RequestHead<'_>, path: &str, mode: Mode<'_>) -> Outcome<'e> {
        let checks = self.checks();
        let mut body = None;
        if !checks.is_empty() {
            let h = Head {
                method: head.method,
                query: head.query,
                content_type: head.headers.first("content-type"),
                content_length: head.content_length,
                has_body: head.has_body,
            };
            match checks.check(&h) {
                Ok(rule) if rule.cap.is_some() || rule.schema => body = Some(rule),
                Ok(_) => {}
                Err(invalid) => {
                    let message = match invalid.status {
                        405 => "method not allowed",
                        415 => "unsupported media type",
                        414 => "request target too long",
                        400 => "too many query parameters",
                        _ => "request body too large",
                    };
                    let mut o = Outcome::refuse(Refused::Invalid, invalid.status, message, invalid.reason);
                    o.policy = Some(invalid.policy.into());
                    if let (Action::Refuse(r), Some(allow)) = (&mut o.action, invalid.allow) {
                        r.headers.push(("allow", allow));
                    }
                    return o;
                }
            }
        }
        let verified = match mode {
            Mode::Explain { given: Some(a), .. } => AuthnOutcome::Verified(Arc::new(a.clone())),
            Mode::Enforce { now, .. } | Mode::Explain { given: None, now } => self.authenticate(head.headers, now),
        };
        let authn = match verified {
            AuthnOutcome::Anonymous => Authn::Anonymous,
            AuthnOutcome::Verified(a) => Authn::Verified(a),
            AuthnOutcome::Refused(f) => {
                let reason = match (mode, &f) {
                    (Mode::Explain { .. }, Failure::Missing) => format!(
                        "AuthenticationPolicy {} requires a request credential and this request carries none",
                        self.authn_required_by().join(", ")
                    ),
                    _ => f.reason().to_string(),
                };
                let mut o = Outcome::refuse(Refused::Unauthenticated, 401, "unauthenticated", reason);
                if let Action::Refuse(r) = &mut o.action {
                    r.headers.push(("www-authenticate", f.challenge().into()));
                }
                if let (Mode::Explain { .. }, Failure::Missing) = (mode, &f) {
                    o.policy = self.authn_required_by().first().cloned();
                }
                o.authn = Authn::Refused(f);
                return o;
            }
        };
        let auth = match &authn {
            Authn::Verified(a) => Some(&**a),
            _ => None,
        };
        let req = Request {
            source: head.source,
            method: Some(head.method),
            path: Some(path),
            port: head.port,
            host: head.host,
            headers: head.headers,
            auth,
        };
        let d = self.authorize(&req);
        let mut o = Outcome::new(Action::Forward);
        if let Mode::Enforce { record: true, .. } = mode {
            o.sample = Some(Box::new(crate::preview::sample::Sample::of(&req, self.recorded())));
        }
        o.policy = d.policy.clone();
        o.rule = d.rule;
        match mode {
            Mode::Enforce { src_ip, .. } if d.verdict == Verdict::Allow => {
                if let Some(limited) = self.rate_limit(&req, src_ip) {
                    o.action = Action::Refuse(Box::new(rate_limited(&limited)));
                    o.policy = Some(limited.policy.clone());
                    o.rule = None;
                    o.limited = Some(Box::new(limited));
                }
            }
            Mode::Explain { .. } => o.limits = self.limits_for(&req),
            Mode::Enforce { .. } => {}
        }
        if d.verdict == Verdict::Deny {
            o.action = Action::Refuse(Box::new(Refusal::forbidden(d.reason())));
        }
        o.body = body.filter(|_| matches!(o.action, Action::Forward));
        o.decision = Some(d);
        o.authn = authn;
        o
    }

    /// Decides an opaque TCP connection, where only the caller and the port
    /// exist: DENY rules that name HTTP fields match (deny errs on the side
    /// of denying); ALLOW rules that name them do not; and where a request
    /// credential is required, it is refused (opaque TCP carries none).
    pub fn decide_connection(&self, source: Option<&str>, port: u16) -> Outcome<'_> {
        if self.authenticator().is_some_and(|a| a.required()) {
            let mut o = Outcome::refuse(
                Refused::Unauthenticated,
                401,
                "unauthenticated",
                "an AuthenticationPolicy requires a request credential and opaque TCP carries none",
            );
            o.authn = Authn::Refused(Failure::Missing);
            return o;
        }
        let d = self.authorize(&Request { source, port, ..Default::default() });
        let mut o = Outcome::new(Action::Forward);
        if d.verdict == Verdict::Deny {
            o.action = Action::Refuse(Box::new(Refusal::forbidden(d.reason())));
        }
        o.policy = d.policy.clone();
        o.rule = d.rule;
        o.decision = Some(d);
        o
    }
}

/// `${request_id}`: the request's `x-request-id`, or a new one; in an
/// explanation, a placeholder.
fn request_id(head: &RequestHead<'_>, mode: Mode<'_>) -> Option<String> {
    if let Mode::Explain { .. } = mode {
        return Some("<x-request-id>".into());
    }
    if let Some(v) = head.headers.first("x-request-id").filter(|v| v.len() <= 128) {
        return Some(v.to_string());
    }
    let mut id = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).ok()?;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// The 429 answer's headers: `Retry-After` and the RateLimit headers.
fn rate_limited(limited: &Limited) -> Refusal {
    let secs = |d: std::time::Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let policy = format!("\"{}\";q={};w={}", limited.limit, limited.quota.rate, secs(limited.quota.period).max(1));
    let state =
        format!("\"{}\";r={};t={}", limited.limit, limited.outcome.remaining, secs(limited.outcome.reset_after));
    Refusal {
        kind: Refused::RateLimited,
        status: 429,
        message: "rate limited",
        headers: vec![
            ("retry-after", secs(limited.outcome.retry_after).max(1).to_string()),
            ("ratelimit-policy", policy),
            ("ratelimit", state),
        ],
        reason: format!("limit {} of {} is spent", limited.limit, limited.policy),
    }
}

/// What decided, in words (previews group requests by it).
pub fn basis_text(d: &Decision) -> String {
    let policy = d.policy.as_deref().unwrap_or("?");
    match d.basis {
        Basis::DenyRule => format!("{policy} DENY rule {}", d.rule.unwrap_or(0)),
        Basis::AllowRule => format!("{policy} ALLOW rule {}", d.rule.unwrap_or(0)),
        Basis::NoAllowMatched => "no ALLOW rule matched".into(),
        Basis::DefaultAllowAuthenticated => "mesh default: allow authenticated".into(),
        Basis::DefaultDeny => "mesh default: deny".into(),
    }
}

#[cfg(test)]
mod tests;
