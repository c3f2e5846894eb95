//! HTTP at the callee: the span and access-log wrapper, and the policy
//! pipeline's outcome enforced (`palisade_policy::Enforcer::decide`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use palisade_policy::{Action, Authn, Mode, Outcome, Refused};

use super::forward::BodyCap;
use super::{AppTarget, Caller, Inbound};
use crate::metrics::AuthnLabels;
use crate::proxy::detect::Protocol;
use crate::proxy::outbound::ATTEMPT;
use crate::proxy::respond;
use crate::proxy::{
    Body, ORIG_PROTO, PEER_IDENTITY, ProxyError, REQUEST_PRINCIPAL, RequestHeaders, is_grpc, is_upgrade,
};

impl Inbound {
    /// `conn_proto`: the protocol the connection itself speaks to us when it
    /// is the app's (plaintext or the upgrade path); `None` for sidecar HTTP/2,
    /// where ORIG_PROTO tells.
    pub(super) async fn request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Option<Arc<Caller>>,
        src: SocketAddr,
        conn_proto: Option<Protocol>,
        app: Arc<AppTarget>,
    ) -> Response<Body> {
        let log = self.opts.access_log && crate::proxy::access::sampled(self.opts.access_log_sampling);
        let tap = self.opts.observe.tapping();
        if !self.tracing.enabled() && !log && !tap {
            return self.handle(req, peer, src, conn_proto, app).await;
        }
        // A server span: a child of the caller sidecar's client span.
        use opentelemetry::KeyValue;
        // Cheap copies (reference-counted): strings are made only for a
        // span that records or a request that is logged.
        let (method, uri, host) = (req.method().clone(), req.uri().clone(), req.headers().get(HOST).cloned());
        let authority = || {
            uri.authority()
                .map(|a| a.to_string())
                .or_else(|| host.as_ref().and_then(|v| v.to_str().ok()).map(str::to_string))
        };
        let caller = || peer.as_ref().map(|c| c.subject.to_string());
        let callee = || self.svids.get().map(|s| s.id.to_string());
        let span = self.tracing.start_request(
            opentelemetry::trace::SpanKind::Server,
            method.as_str(),
            req.headers_mut(),
            || {
                let mut attrs = vec![
                    KeyValue::new("http.request.method", method.to_string()),
                    KeyValue::new("url.path", uri.path().to_string()),
                    KeyValue::new("url.scheme", "http"),
                    KeyValue::new("network.peer.address", src.ip().to_string()),
                    KeyValue::new("network.peer.port", i64::from(src.port())),
                    KeyValue::new("palisade.direction", "inbound"),
                ];
                attrs.extend(caller().map(|c| KeyValue::new("palisade.caller", c)));
                attrs.extend(callee().map(|c| KeyValue::new("palisade.callee", c)));
                attrs.extend(authority().map(|a| KeyValue::new("server.address", a)));
                attrs
            },
        );
        // Only a peer sidecar (mTLS) says which try this is; a plaintext caller's claim is ignored.
        let attempt = peer.as_ref().and_then(|_| attempt_of(req.headers()));
        let fill = |e: &mut crate::proxy::access::Entry| {
            e.attempt = attempt;
            e.log = log;
            e.tap = tap.then(|| self.opts.observe.clone());
            e.caller = caller();
            e.callee = callee();
            e.method = method.to_string();
            e.authority = authority();
            e.path = uri.path().to_string();
            e.trace_id = span.trace_id();
        };
        if tap && !log && !self.opts.observe.taps_allowed() {
            // Only refusals are tapped (as a dashboard's tap) and nothing is
            // logged: the line is made for a refusal only.
            let (start, time) = (Instant::now(), std::time::SystemTime::now());
            let decided = Arc::<crate::proxy::access::Decided>::default();
            req.extensions_mut().insert(decided.clone());
            let resp = self.clone().handle(req, peer.clone(), src, conn_proto, app).await;
            let by_sidecar = resp.headers().contains_key("x-palisade-error");
            let entry = (crate::proxy::decision_of(resp.status().as_u16(), by_sidecar) != "allow").then(|| {
                let mut e = crate::proxy::access::Entry::started("inbound", src, start, time);
                e.decided = decided;
                fill(&mut e);
                e
            });
            return crate::proxy::access::finish(resp, span, entry, false);
        }
        let entry = (log || tap).then(|| {
            let mut e = crate::proxy::access::Entry::new("inbound", src);
            fill(&mut e);
            req.extensions_mut().insert(e.decided.clone());
            req.extensions_mut().insert(crate::proxy::access::BytesIn(e.bytes_in.clone()));
            e
        });
        let resp = self.clone().handle(req, peer.clone(), src, conn_proto, app).await;
        crate::proxy::access::finish(resp, span, entry, false)
    }

    /// One request: the identity headers set, the one decision made, and
    /// its outcome enforced (answered here, or forwarded with its changes).
    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Option<Arc<Caller>>,
        src: SocketAddr,
        conn_proto: Option<Protocol>,
        app: Arc<AppTarget>,
    ) -> Response<Body> {
        let start = Instant::now();
        let from = peer.as_ref().map_or(&self.metrics.callers.plaintext, |c| &c.counts).clone();
        let grpc = is_grpc(req.headers());
        let headers = req.headers_mut();
        // Never trust an identity or principal header from outside.
        headers.remove(PEER_IDENTITY);
        if let Some(c) = &peer {
            headers.insert(PEER_IDENTITY, c.header.clone());
        }
        headers.remove(REQUEST_PRINCIPAL);
        // Between sidecars only: logged above, never the app's.
        headers.remove(ATTEMPT);
        headers.remove(crate::proxy::outbound::ATTEMPTS);
        let orig = headers.remove(ORIG_PROTO);
        let app_proto = conn_proto.unwrap_or(if orig.as_ref().is_some_and(|v| v == "HTTP/1.1") {
            Protocol::Http1
        } else {
            Protocol::Http2
        });
        let Some(policy) = self.policy.current() else {
            // Not ready is not a policy decision: the caller may retry.
            tracing::info!(src.addr = %src, src.identity = peer.as_deref().map(|c| c.subject.as_str()), http.method = %req.method(), http.path = req.uri().path(), "request refused: no policy received from the control plane yet (not ready)");
            let o = Outcome::not_ready();
            let r = o.refusal().expect("invariant: not ready is a refusal");
            self.metrics.inbound(&from, r.status, start.elapsed());
            return respond::refused(r, grpc);
        };
        strip_underscore_aliases(req.headers_mut(), policy.enforcer.authenticator());
        let outcome = {
            let headers = RequestHeaders(req.headers());
            let host =
                req.uri().authority().map(|a| a.as_str()).or_else(|| headers.0.get(HOST).and_then(|v| v.to_str().ok()));
            let head = palisade_policy::RequestHead {
                source: peer.as_deref().map(|c| c.subject.as_str()),
                caller_expired: peer.as_deref().is_some_and(Caller::expired),
                method: req.method().as_str(),
                path: req.uri().path(),
                query: req.uri().query(),
                host,
                port: app.addr.port(),
                headers: &headers,
                content_length: headers
                    .0
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
                has_body: !hyper::body::Body::is_end_stream(req.body()),
            };
            let mode = Mode::Enforce {
                now: palisade_cmd::unix_now(),
                src_ip: src.ip(),
                record: self.opts.observe.recording(),
            };
            let outcome = policy.enforcer.decide(&head, mode);
            self.account(&policy, &outcome, &req, src, peer.as_deref());
            outcome
        };
        if let Some(answer) = self.answered(&outcome, grpc, start, &from) {
            return answer;
        }
        if let Some(path) = &outcome.normal_path
            && !set_path(&mut req, path)
        {
            // The app must get the path the policy decided on, or nothing.
            tracing::info!(target: "audit", decision = "invalid", src.addr = %src, http.path = %path, reason = "unparsable_normal_path", "request path refused");
            self.metrics.refused.inc();
            from.refused(Refused::Invalid);
            self.metrics.inbound(&from, 400, start.elapsed());
            return crate::proxy::error_response(grpc, http::StatusCode::BAD_REQUEST, "bad request path");
        }
        outcome.for_each_request_op(|op| respond::apply(req.headers_mut(), op));
        if let Some(rule) = outcome.body {
            let schemas = rule.schema.then(|| policy.clone());
            req.extensions_mut().insert(BodyCap { max: rule.cap.unwrap_or(u64::MAX), schemas });
        }
        let upgrade = app_proto == Protocol::Http1 && is_upgrade(&req);
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        // Boxed: the forward's state (the app call) is allocated once
        // instead of being moved with this future at every step.
        let mut resp = match Box::pin(self.forward(req, app_proto, upgrade, &app)).await {
            Ok(r) => r,
            Err(e @ (ProxyError::InvalidBody(_) | ProxyError::TooLarge { .. })) => {
                tracing::info!(target: "audit", decision = "invalid", src.addr = %src, src.identity = peer.as_deref().map(|c| c.subject.as_str()), http.method = %method, http.path = %path, reason = %e, "request refused by validation");
                self.metrics.refused.inc();
                from.refused(Refused::Invalid);
                e.response(grpc)
            }
            Err(e) => {
                tracing::warn!(direction = "inbound", src.addr = %src, src.identity = peer.as_deref().map(|c| c.subject.as_str()), http.method = %method, http.path = %path, error = %e, "request to the app failed");
                e.response(grpc)
            }
        };
        outcome.for_each_response_op(|op| respond::apply(resp.headers_mut(), op));
        self.metrics.inbound(&from, resp.status().as_u16(), start.elapsed());
        resp
    }

    /// The sidecar's own answer, when the outcome is one (a refusal or a
    /// preflight), counted; `None`: the request goes to the app.
    fn answered(
        &self,
        outcome: &Outcome<'_>,
        grpc: bool,
        start: Instant,
        from: &crate::metrics::callers::FromCounts,
    ) -> Option<Response<Body>> {
        let resp = respond::answer(outcome, grpc)?;
        if let Some(r) = outcome.refusal() {
            self.metrics.refused.inc();
            from.refused(r.kind);
        }
        self.metrics.inbound(from, resp.status().as_u16(), start.elapsed());
        Some(resp)
    }

    /// What a decision leaves behind: counters, the preview sample, the
    /// access log's deciding policy, a key-set refresh, and the audit line.
    fn account(
        &self,
        policy: &crate::policy::InForce,
        o: &Outcome<'_>,
        req: &Request<Incoming>,
        src: SocketAddr,
        peer: Option<&Caller>,
    ) {
        if let Some(d) = &o.decision {
            policy.count(d);
        }
        if let Some(s) = &o.sample {
            self.opts.observe.record(s);
        }
        if let Some(slot) = req.extensions().get::<Arc<crate::proxy::access::Decided>>() {
            if let Some(p) = &o.policy {
                slot.set(p.clone(), o.rule);
            }
            if let Authn::Verified(a) = &o.authn {
                slot.set_client(a.principal.clone(), a.api_key.clone());
            }
        }
        match &o.authn {
            Authn::Verified(a) => {
                let kind = match (a.api_key.is_some(), a.claims.is_empty()) {
                    (true, true) => "api_key",
                    (true, false) => "both",
                    _ => "jwt",
                };
                self.metrics.authn.get_or_create(&AuthnLabels { result: "verified", reason: kind }).inc();
            }
            Authn::Refused(f) => {
                self.metrics.authn.get_or_create(&AuthnLabels { result: "refused", reason: f.reason() }).inc();
                if let palisade_policy::AuthnFailure::UnknownKey(Some(uri)) = f {
                    self.policy.request_refresh(uri);
                }
            }
            _ => {}
        }
        if let Some(l) = &o.limited {
            self.metrics
                .rate_limited
                .get_or_create(&crate::metrics::PolicyLabels { policy: l.policy.to_string() })
                .inc();
        }
        self.audit(o, req, src, peer);
    }

    /// The audit line of a decision that is not a plain allow.
    fn audit(&self, o: &Outcome<'_>, req: &Request<Incoming>, src: SocketAddr, peer: Option<&Caller>) {
        let label = o.label();
        if label == "allow" {
            return;
        }
        // Our identity (tracing evaluates fields only when logging).
        let me = || self.svids.get().map(|s| s.id.to_string()).unwrap_or_default();
        let source = peer.map(|c| c.subject.as_str());
        let (method, path) = (req.method().as_str(), req.uri().path());
        let principal = match &o.authn {
            Authn::Verified(a) => a.principal.as_deref(),
            _ => None,
        };
        let policy = o.policy.as_deref();
        let Some(r) = o.refusal() else {
            if let Action::Preflight { allowed: false } = o.action {
                tracing::info!(target: "audit", decision = "cors_refused", src.addr = %src, src.identity = source, http.path = path, origin = req.headers().get(http::header::ORIGIN).and_then(|v| v.to_str().ok()), policy, "CORS preflight not allowed");
            } else if let Some(d) = &o.decision {
                tracing::info!(target: "audit", decision = label, src.addr = %src, src.identity = source, request.principal = principal, dst.identity = %me(), http.method = method, http.path = path, policy = policy.unwrap_or("default"), rule = d.rule, reason = %d.reason(), "authorization decision");
            }
            return;
        };
        let reason = r.reason.as_str();
        match r.kind {
            Refused::Invalid => {
                tracing::info!(target: "audit", decision = label, src.addr = %src, src.identity = source, dst.identity = %me(), http.method = method, http.path = path, policy, reason, "request refused by validation")
            }
            Refused::Unauthenticated => {
                tracing::info!(target: "audit", decision = label, src.addr = %src, src.identity = source, dst.identity = %me(), http.method = method, http.path = path, reason, "request credential refused")
            }
            Refused::RateLimited => {
                let (limit, retry_after_ms) = o
                    .limited
                    .as_ref()
                    .map(|l| (l.limit.to_string(), l.outcome.retry_after.as_millis() as u64))
                    .unwrap_or_default();
                tracing::info!(target: "audit", decision = label, src.addr = %src, src.identity = source, request.principal = principal, dst.identity = %me(), http.method = method, http.path = path, policy, limit, retry_after_ms, "rate limited");
            }
            _ => {
                tracing::info!(target: "audit", decision = label, src.addr = %src, src.identity = source, request.principal = principal, dst.identity = %me(), http.method = method, http.path = path, policy = policy.unwrap_or("default"), rule = o.rule, reason, "authorization decision")
            }
        }
    }
}

/// Replaces the request's path with its normal form, keeping the query;
/// `false` if the result does not parse (the request must then be refused).
fn set_path<B>(req: &mut Request<B>, normal: &str) -> bool {
    let pq = match req.uri().query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal.to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    let Ok(pq) = PathAndQuery::try_from(pq) else { return false };
    parts.path_and_query = Some(pq);
    match Uri::from_parts(parts) {
        Ok(uri) => {
            *req.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// Which try of its call a request is, as the caller's sidecar numbers it.
fn attempt_of(h: &http::HeaderMap) -> Option<u32> {
    h.get(ATTEMPT)?.to_str().ok()?.parse().ok()
}

/// Drops headers whose names hold `_` and that a server reading `_` as `-`
/// (CGI's `HTTP_X_PALISADE_PEER_IDENTITY`, some frameworks) would take for a
/// header the sidecar sets or strips: `x_palisade_peer_identity`, or a claim
/// or API key header spelt with underscores.
fn strip_underscore_aliases(h: &mut http::HeaderMap, authn: Option<&palisade_policy::authn::Authenticator>) {
    let aliases: Vec<http::HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .filter(|k| {
            let dashed = k.as_str().replace('_', "-");
            dashed.starts_with("x-palisade-")
                || authn.is_some_and(|a| {
                    a.claim_headers().iter().chain(a.api_key_headers()).any(|n| n.eq_ignore_ascii_case(&dashed))
                })
        })
        .cloned()
        .collect();
    for name in aliases {
        h.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underscore_aliases_of_palisade_headers_are_dropped_and_others_kept() {
        let mut h = http::HeaderMap::new();
        for (k, v) in
            [("x_palisade_peer_identity", "spiffe://evil"), ("x_custom", "1"), ("x-palisade-peer-identity", "ok")]
        {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), http::HeaderValue::from_static(v));
        }
        strip_underscore_aliases(&mut h, None);
        assert!(h.get("x_palisade_peer_identity").is_none(), "an alias of an identity header never reaches the app");
        assert_eq!(h["x_custom"], "1");
        assert_eq!(h["x-palisade-peer-identity"], "ok", "only underscore spellings are dropped here");
    }

    #[test]
    fn the_normal_path_replaces_the_received_one_and_keeps_the_query() {
        let mut req = Request::builder().uri("http://orders/a/../b//c?x=1&y=2").body(()).unwrap();
        assert!(set_path(&mut req, "/b/c"));
        assert_eq!(req.uri().to_string(), "http://orders/b/c?x=1&y=2");
        let mut req = Request::builder().uri("/a").body(()).unwrap();
        assert!(!set_path(&mut req, "/a b"), "a path that does not parse is refused, not passed on as received");
        assert_eq!(req.uri(), "/a");
    }
}
