//! Where a request goes: the TrafficPolicy route that sends it to another
//! backend with its timeouts and retries, and the caller's balancing.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Request, Uri};

use palisade_policy::resilience::{Balancing, Resilience};

use super::{Dest, Outbound};
use crate::proxy::ProxyError;

/// The caller's balancing, held with the policy it comes from.
pub(super) struct BalancingRef(Option<Arc<crate::policy::InForce>>);

impl BalancingRef {
    pub(super) fn as_ref(&self) -> &Balancing {
        static DEFAULT: std::sync::LazyLock<Balancing> = std::sync::LazyLock::new(Balancing::default);
        self.0.as_ref().map_or(&*DEFAULT, |p| p.enforcer.balancing())
    }
}

impl Outbound {
    /// The caller's balancing (its TrafficPolicies', or the defaults).
    pub(super) fn balancing(&self) -> BalancingRef {
        BalancingRef(self.policy.current())
    }

    /// The TrafficPolicy route this request takes (the first that matches
    /// the called service, path and headers): the backend service it sends
    /// it to (`None`: the called one) and its timeouts and retries, with
    /// the path rewritten when the route says so; `None` when no route
    /// matches. Routing decides where a request goes, not whether it may:
    /// the backend's sidecar enforces its own policy on what it receives.
    pub(super) fn route<B>(
        &self,
        req: &mut Request<B>,
        dest: &Dest,
    ) -> Result<Option<(Option<Arc<str>>, Arc<Resilience>)>, ProxyError> {
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
        // No backends named: the called service itself.
        let backend = route.pick(self.draw()).cloned();
        let resilience = route.resilience.clone();
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
                backend: backend.as_deref().unwrap_or(&service).to_string(),
            })
            .inc();
        tracing::debug!(dst = %dest, route.policy = %route.policy, route.index = route.index, backend = ?backend, "routed");
        Ok(Some((backend, resilience)))
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
