//! One call from the app, tried as its route allows: an endpoint chosen by
//! the balancer for each try, a per-try and a whole-call deadline (504 when
//! the call's passes), and a retry of the failures the route names, for
//! idempotent methods unless it says otherwise, with a jittered backoff,
//! while the service's retry budget allows. Every try is a new request for
//! the callee's sidecar, which decides its policy again.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use palisade_policy::resilience::{Balancing, Resilience};
use tokio::time::Instant;

use super::{DIRECTORY_MISS_WAIT, Dest, Outbound};
use crate::balance::{InFlight, Outcome, Service};
use crate::directory::LookupError;
use crate::proxy::peer::{Peer, PeerError};
use crate::proxy::replay::{Keeper, keep};
use crate::proxy::{Body, ProxyError};

/// Between sidecars: which try of a call this request is (absent: the first).
pub const ATTEMPT: http::HeaderName = http::HeaderName::from_static("x-palisade-attempt");

/// Tries of one call that could not reach an endpoint at all (nothing was
/// sent), whatever the route's `attempts`: the balancer picks another.
const CONNECT_TRIES: u32 = 3;

pub(super) static NO_ROUTE: LazyLock<Resilience> = LazyLock::new(Resilience::default);

/// What a request can be sent again with.
enum Again {
    /// No body: nothing to keep.
    Empty,
    Kept(Keeper),
    /// Not retried once sent (a method the route does not retry, or no retries).
    No,
}

/// How a call ended: its answer or error, and the tries it took.
pub(super) struct Called {
    pub result: Result<Response<Incoming>, ProxyError>,
    pub attempts: u32,
}

impl Outbound {
    /// Carries one call to `target`.
    pub(super) async fn call(
        &self,
        parts: http::request::Parts,
        body: Body,
        target: &Dest,
        res: &Resilience,
        grpc: bool,
    ) -> Called {
        let balancing = self.balancing();
        let balancing = balancing.as_ref();
        let retry = &res.retry;
        let limit = res.timeout.unwrap_or(self.limits.response_timeout);
        let total = match grpc.then(|| grpc_timeout(&parts.headers)).flatten() {
            Some(g) => g.min(limit),
            None => limit,
        };
        let shortened = total < limit;
        let started = Instant::now();
        let deadline = started + total;
        // The same rule `palisadectl route` explains.
        let (body, again) = if !retry.retries_method(parts.method.as_str()) {
            (body, Again::No)
        } else if hyper::body::Body::is_end_stream(&body) {
            (body, Again::Empty)
        } else {
            let (b, k) = keep(body, retry.max_body_bytes);
            (b, Again::Kept(k))
        };
        let service = self.budget_service(target);
        service.budget.deposit(started.into_std());

        let mut first = Some((parts, body));
        let mut template: Option<Template> = None;
        let (mut attempt, mut unreachable) = (0u32, 0u32);
        let mut avoid: Option<SocketAddr> = None;
        let mut backoff = retry.backoff;
        let mut at_start = true;
        loop {
            attempt += 1;
            let chosen = match target {
                Dest::Service(name) => self.choose_in(name, &service, balancing, avoid).await,
                Dest::Peer(p) => Ok((p.clone(), None)),
            };
            let (peer, flight) = match chosen {
                Ok(p) => p,
                Err(e) => return Called { result: Err(e), attempts: attempt },
            };
            let now = if std::mem::take(&mut at_start) { started } else { Instant::now() };
            let try_deadline = res.per_try_timeout.map_or(deadline, |t| (now + t).min(deadline));
            let try_for = try_deadline.saturating_duration_since(now);

            // Connect first: a request that never left can always go elsewhere.
            let sender = match tokio::time::timeout_at(try_deadline, self.sender(&peer)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ProxyError::Peer(PeerError::Timeout { addr: peer.addr })),
            };
            let mut sender = match sender {
                Ok(s) => s,
                Err(e) => {
                    // Nothing was sent. An endpoint not reached (refused, timed
                    // out, a TLS or HTTP/2 handshake that failed, another
                    // identity) is ejected and another tried; no certificate of
                    // ours yet, or the request's own short deadline, is not its fault.
                    let ours = matches!(e, ProxyError::Peer(PeerError::NoCertificate))
                        || (shortened && Instant::now() >= deadline);
                    match ours {
                        false => self.settle(flight, Outcome::Unreachable, balancing),
                        true => drop(flight),
                    }
                    let down = !ours;
                    unreachable += 1;
                    let retryable = down && retry.on.connect_failure && unreachable < CONNECT_TRIES;
                    if retryable && Instant::now() < deadline && self.spend(&service, res) {
                        tracing::info!(dst = %target, unreachable = %peer.addr, error = %e, "peer sidecar unreachable; trying another");
                        avoid = Some(peer.addr);
                        attempt -= 1;
                        continue;
                    }
                    return Called { result: Err(e), attempts: attempt.max(1) };
                }
            };

            let mut req = match first.take() {
                Some((parts, body)) => {
                    if !matches!(again, Again::No) {
                        template = Some(Template::of(&parts));
                    }
                    Request::from_parts(parts, body)
                }
                None => {
                    let body = match &again {
                        Again::Empty => crate::proxy::full(bytes::Bytes::new()),
                        Again::Kept(k) => match k.replay() {
                            Some(b) => b,
                            None => unreachable!("checked before retrying"),
                        },
                        Again::No => unreachable!("never retried once sent"),
                    };
                    let Some(t) = &template else { unreachable!("set on the first try") };
                    t.request(body)
                }
            };
            if attempt > 1 {
                req.headers_mut().insert(ATTEMPT, HeaderValue::from(attempt));
            }
            let sent = tokio::time::timeout_at(try_deadline, self.send(&mut sender, &peer, req)).await;
            let (outcome, retryable, result) = match sent {
                Ok(Ok(resp)) => {
                    let (failed, retryable) = judge(&resp, res, grpc);
                    (if failed { Outcome::Failure } else { Outcome::Success }, retryable, Ok(resp))
                }
                Ok(Err(e)) => (Outcome::Failure, retry.on.reset, Err(e)),
                Err(_) if Instant::now() >= deadline => {
                    // The route's or the sidecar's timeout: the endpoint was too
                    // slow. A deadline the request set itself (grpc-timeout)
                    // shorter than that says nothing of the endpoint.
                    match shortened {
                        false => self.settle(flight, Outcome::Failure, balancing),
                        true => drop(flight),
                    }
                    self.metrics.timeout("request");
                    return Called { result: Err(ProxyError::Timeout(total)), attempts: attempt };
                }
                Err(_) => {
                    self.metrics.timeout("try");
                    (Outcome::Failure, retry.on.try_timeout, Err(ProxyError::Timeout(try_for)))
                }
            };
            self.settle(flight, outcome, balancing);
            let can = retryable
                && attempt < retry.attempts
                && match &again {
                    Again::Empty => true,
                    Again::Kept(k) => k.replay().is_some(),
                    Again::No => false,
                };
            if !can {
                return Called { result, attempts: attempt };
            }
            let pause = jitter(backoff);
            if Instant::now() + pause >= deadline || !self.spend(&service, res) {
                return Called { result, attempts: attempt };
            }
            tracing::debug!(dst = %target, endpoint = %peer.addr, attempt, "retrying");
            drop(result);
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(retry.max_backoff);
            avoid = Some(peer.addr);
        }
    }

    /// Takes a retry from the service's budget (counted either way).
    fn spend(&self, service: &Service, res: &Resilience) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let ok = service.budget.withdraw(res.retry.budget_percent, res.retry.budget_min_per_second);
        if ok {
            service.retries.fetch_add(1, Relaxed);
        } else {
            service.retries_refused.fetch_add(1, Relaxed);
            tracing::debug!(service = %service.name, "retry budget spent; not retrying");
        }
        ok
    }

    fn settle(&self, flight: Option<InFlight>, outcome: Outcome, balancing: &Balancing) {
        if let Some(f) = flight {
            self.balancer.finish(f, outcome, balancing);
        }
    }

    /// The service whose budget a call to `target` draws on.
    fn budget_service(&self, target: &Dest) -> Arc<Service> {
        match target {
            Dest::Service(s) => self.balancer.service(s),
            Dest::Peer(p) => match self.directory.service_for_ip(p.addr.ip()) {
                Some(s) => self.balancer.service(&s),
                None => self.balancer.service(&p.identity.to_string()),
            },
        }
    }

    /// The endpoint a try goes to: the balancer's choice among the
    /// service's, or the transparent destination itself.
    pub(super) async fn choose(
        &self,
        target: &Dest,
        avoid: Option<SocketAddr>,
    ) -> Result<(Peer, Option<InFlight>), ProxyError> {
        match target {
            Dest::Peer(p) => Ok((p.clone(), None)),
            Dest::Service(name) => {
                let balancing = self.balancing();
                self.choose_in(name, &self.balancer.service(name), balancing.as_ref(), avoid).await
            }
        }
    }

    /// [`choose`](Self::choose) for a service whose state the caller holds.
    async fn choose_in(
        &self,
        name: &str,
        service: &Arc<Service>,
        balancing: &Balancing,
        avoid: Option<SocketAddr>,
    ) -> Result<(Peer, Option<InFlight>), ProxyError> {
        let pick = |generation, peers: &[Peer]| self.balancer.pick(service, peers, generation, balancing, avoid);
        let picked = match self.directory.with_endpoints(name, pick) {
            Ok(p) => Ok(p),
            // Not held yet: subscribe, and wait a moment for the answer.
            Err(_) => {
                self.directory.await_service(name, DIRECTORY_MISS_WAIT).await;
                self.directory.with_endpoints(name, pick)
            }
        };
        let (chosen, gone) = picked.map_err(|e| match e {
            LookupError::NotLoaded => ProxyError::NoDirectory,
            LookupError::Unknown => ProxyError::UnknownService(name.to_string()),
        })?;
        // Endpoints that left drain: their connections close once idle.
        for p in &gone {
            self.peers.evict(p);
        }
        let endpoint = chosen.ok_or_else(|| ProxyError::UnknownService(name.to_string()))?;
        let peer = endpoint.peer.clone();
        Ok((peer, Some(self.balancer.start(service, endpoint))))
    }
}

/// Whether an answer counts as the endpoint's failure, and whether the
/// route retries it.
fn judge(resp: &Response<Incoming>, res: &Resilience, grpc: bool) -> (bool, bool) {
    let status = resp.status().as_u16();
    // A trailers-only gRPC answer carries its status in the headers.
    let code = match grpc {
        true => resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<u32>().ok()),
        false => None,
    };
    // INTERNAL from a sidecar is about the request (too large, malformed), not the endpoint.
    let ours = || resp.headers().contains_key("x-palisade-error");
    let failed = status >= 500 || code.is_some_and(|c| c == 14 || (c == 13 && !ours()));
    let retryable = res.retry.on.status(status) || code.is_some_and(|c| res.retry.on.grpc_code(c));
    (failed, retryable)
}

/// A backoff drawn between half and all of `d`.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// The deadline of a gRPC request (`grpc-timeout`), if it has a well-formed one.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    palisade_net::deadline::grpc_timeout(headers.get("grpc-timeout")?.as_bytes())
}

/// What a request is sent again with: everything but its body and extensions.
struct Template {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Template {
    fn of(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn request(&self, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}
