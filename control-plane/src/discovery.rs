//! `Discovery.ListEndpoints`: the directory of sidecar inbound addresses and
//! the identity each must present, built from the proxies that registered an
//! inbound address when they certified and still hold a valid certificate.

use std::sync::Arc;

use palisade_certs::SpiffeId;
use palisade_proto::v1::discovery_server::Discovery;
use palisade_proto::v1::{Endpoint, ListEndpointsRequest, ListEndpointsResponse};
use tonic::{Request, Response, Status};

use crate::Shared;
use palisade_cmd::unix_now;

/// The Discovery service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    async fn list_endpoints(
        &self,
        req: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let td = &self.shared.trust_domain;
        match req.peer_certs().and_then(|c| palisade_certs::tls::peer_identity(Some(&c))) {
            Some((id, _)) if id.trust_domain() == td && (id.workload().is_some() || id == td.admin()) => {}
            _ => {
                return Err(Status::unauthenticated(
                    "the directory is served to workload certificates of this mesh only",
                ));
            }
        }
        Ok(Response::new(ListEndpointsResponse { endpoints: endpoints(&self.shared) }))
    }
}

/// The directory: sidecars with a valid certificate and an inbound address.
pub(crate) fn endpoints(shared: &Shared) -> Vec<Endpoint> {
    let now = unix_now();
    let mut endpoints: Vec<Endpoint> = shared
        .store
        .proxies()
        .into_iter()
        .filter(|p| p.cert_not_after > now && !p.inbound_addr.is_empty())
        .filter_map(|p| {
            let id: SpiffeId = p.identity.parse().ok()?;
            let (ns, sa) = id.workload()?;
            Some(Endpoint { service: format!("{sa}.{ns}"), identity: p.identity.clone(), address: p.inbound_addr })
        })
        .collect();
    endpoints.sort_by(|a, b| (&a.service, &a.address).cmp(&(&b.service, &b.address)));
    endpoints.dedup_by(|a, b| a.service == b.service && a.address == b.address);
    endpoints
}
