//! Where a request goes: the sidecar picked for a destination, a new
//! HTTP/2 connection with failover to another sidecar of the service, and
//! the TrafficPolicy route that sends a request to another backend.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Request, Uri};

use super::{DIRECTORY_MISS_WAIT, Dest, Outbound};
use crate::directory::LookupError;
use crate::proxy::peer::{Peer, PeerError};
use crate::proxy::{Body, ProxyError};

impl Outbound {
    /// A new HTTP/2 connection to `peer`; when it cannot be reached at all
    /// (refused, timed out: nothing was sent), another sidecar of the same
    /// service is tried (3 in all), and the unreachable one is passed over
    /// for a while: a sidecar that died stays in the directory until its
    /// certificate expires.
    pub(super) async fn connect_h2(
        &self,
        target: &Dest,
        peer: &mut Peer,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, ProxyError> {
        let mut attempt = 0;
        loop {
            match self.peers.h2(peer).await {
                Ok(s) => return Ok(s),
                Err(e @ (PeerError::Connect { .. } | PeerError::Timeout { .. }))
                    if attempt < 2 && matches!(target, Dest::Service(_)) =>
                {
                    self.directory.mark_down(peer.addr);
                    let next = self.pick(target).await?;
                    if next.addr == peer.addr {
                        return Err(e.into());
                    }
                    tracing::info!(dst = %target, unreachable = %peer.addr, next = %next.addr, error = %e, "peer sidecar unreachable; trying another");
                    *peer = next;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) async fn pick(&self, dest: &Dest) -> Result<Peer, ProxyError> {
        let service = match dest {
            Dest::Peer(p) => return Ok(p.clone()),
            Dest::Service(s) => s,
        };
        self.directory.pick_or_wait(service, DIRECTORY_MISS_WAIT).await.map_err(|e| match e {
            LookupError::NotLoaded => ProxyError::NoDirectory,
            LookupError::Unknown => ProxyError::UnknownService(service.to_string()),
        })
    }

    /// The backend service a TrafficPolicy route sends this request to (the
    /// first route that matches the called service, path and headers), with
    /// the path rewritten when the route says so; `None` when no route
    /// matches. Routing decides where a request goes, not whether it may:
    /// the backend's sidecar enforces its own policy on what it receives.
    pub(super) fn route<B>(&self, req: &mut Request<B>, dest: &Dest) -> Result<Option<Arc<str>>, ProxyError> {
        let Some(policy) = self.policy.current() else { return Ok(None) };
        let routes = policy.enforcer.routes();
        if routes.is_empty() {
            return Ok(None);
        }
        let service = match dest {
            Dest::Service(s) => s.clone(),
            Dest::Peer(p) => match self.directory.service_for_ip(p.addr.ip()) {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        // Routes match the path as the callee will see it (normalised); a
        // path that cannot be normalised goes unrouted and the callee refuses it.
        let headers = crate::proxy::RequestHeaders(req.headers());
        let Ok(Some(routed)) = policy.enforcer.route_request(&service, req.uri().path(), &headers) else {
            return Ok(None);
        };
        let route = routed.route;
        let backend = route.pick(self.draw()).clone();
        if let Some(slot) = req.extensions().get::<Arc<crate::proxy::access::Decided>>() {
            slot.set(route.policy.clone(), Some(route.index));
        }
        if let Some(new) = routed.rewritten {
            let pq = match req.uri().query() {
                Some(q) => format!("{new}?{q}"),
                None => new,
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query =
                Some(PathAndQuery::try_from(pq).map_err(|_| ProxyError::BadRequest("invalid request target"))?);
            *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        }
        self.metrics
            .routes
            .get_or_create(&crate::metrics::RouteLabels {
                route: format!("{}#{}", route.policy, route.index),
                backend: backend.to_string(),
            })
            .inc();
        tracing::debug!(dst = %dest, route.policy = %route.policy, route.index = route.index, backend = %backend, "routed");
        Ok(Some(backend))
    }

    /// A uniform draw for a weighted route (splitmix64 over a counter: no
    /// lock, well spread, not for secrets).
    pub(super) fn draw(&self) -> u32 {
        let mut z = self.draws.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 32) as u32
    }
}
