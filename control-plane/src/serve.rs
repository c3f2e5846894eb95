//! The control plane's listeners: bound first (a port conflict changes
//! nothing on disk), then served once the state is open: the gRPC API, the
//! OAuth token service, the admission webhook and the metrics.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use palisade_certs::tls::{PeerIdentity, SpiffeClientVerifier, SvidStore};
use palisade_proto::limits;
use palisade_proto::v1::admin_server::AdminServer;
use palisade_proto::v1::discovery_server::DiscoveryServer;
use palisade_proto::v1::identity_server::IdentityServer;
use palisade_proto::v1::mesh_config_server::MeshConfigServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::background::{Tasks, rotate_server_cert};
use crate::{
    Config, Shared, StartError, admin, conn, discovery, https, identity, metrics, pki, push, telemetry, webhook,
};

/// Every port the control plane serves, bound.
#[derive(Debug)]
pub(crate) struct Listeners {
    pub(crate) grpc: TcpListener,
    pub(crate) grpc_addr: SocketAddr,
    oauth: Option<TcpListener>,
    metrics: Option<TcpListener>,
    webhook: Option<TcpListener>,
}

impl Listeners {
    /// Binds them all: once the gRPC port accepts, so do the others
    /// (connections wait in their backlogs until served).
    pub(crate) async fn bind(cfg: &Config) -> Result<Self, StartError> {
        let bind_err = |addr| move |source| StartError::Bind { addr, source };
        let grpc = TcpListener::bind(cfg.listen).await.map_err(bind_err(cfg.listen))?;
        let grpc_addr = grpc.local_addr().map_err(bind_err(cfg.listen))?;
        let other = |addr: Option<SocketAddr>| async move {
            match addr {
                Some(addr) => TcpListener::bind(addr).await.map(Some).map_err(bind_err(addr)),
                None => Ok(None),
            }
        };
        Ok(Self {
            grpc,
            grpc_addr,
            oauth: other(cfg.oauth_listen).await?,
            metrics: other(cfg.metrics_listen).await?,
            webhook: other(cfg.webhook_listen).await?,
        })
    }
}

/// A server certificate of the control plane, kept fresh by a background task.
fn server_cert(shared: &Shared, tasks: &Tasks, names: Vec<String>, ips: Vec<IpAddr>) -> Result<SvidStore, StartError> {
    let cert = SvidStore::new();
    let view = shared.ca.view();
    pki::issue_server_cert(&view.signing, &view.cross, &shared.trust_domain, &names, &ips, &cert)?;
    tasks.spawn(rotate_server_cert(shared.ca.clone(), shared.trust_domain.clone(), names, ips, cert.clone()));
    Ok(cert)
}

/// TLS for an HTTPS listener without client certificates.
fn https_tls(cert: SvidStore) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(palisade_certs::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    palisade_certs::tls::no_resumption(&mut tls);
    Ok(Arc::new(tls))
}

/// Serves the OAuth token service, when on; its bound address.
pub(crate) fn oauth(
    listeners: &mut Listeners,
    cfg: &Config,
    shared: &Arc<Shared>,
    tasks: &Tasks,
) -> Result<Option<SocketAddr>, StartError> {
    let (Some(listener), Some(service)) = (listeners.oauth.take(), shared.oauth.clone()) else { return Ok(None) };
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr: cfg.oauth_listen.unwrap_or(listeners.grpc_addr), source })?;
    // Its certificate names the issuer's host too, so clients that trust the mesh CA verify it.
    let (mut names, mut ips) = (cfg.server_names.clone(), vec![addr.ip(), IpAddr::from([127, 0, 0, 1])]);
    let host = service.issuer().trim_start_matches("https://").split(['/', ':']).next().unwrap_or("").to_string();
    match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => ips.push(ip),
        Err(_) if !host.is_empty() => names.push(host),
        Err(_) => {}
    }
    ips.retain(|ip| !ip.is_unspecified());
    ips.dedup();
    names.dedup();
    let tls = https_tls(server_cert(shared, tasks, names, ips)?)?;
    tracing::info!(listen = %addr, issuer = %service.issuer(), "OAuth token service serving POST /oauth2/token");
    tasks.tracker.spawn(https::serve(
        "oauth",
        listener,
        tls,
        https::Limits::oauth(cfg),
        tasks.stop.clone(),
        tasks.tracker.clone(),
        move |req, peer| service.clone().handle(req, peer),
    ));
    Ok(Some(addr))
}

/// Serves the metrics, when on.
pub(crate) fn metrics(listeners: &mut Listeners, cfg: &Config, tasks: &Tasks) {
    if let (Some(addr), Some(listener)) = (cfg.metrics_listen, listeners.metrics.take()) {
        tracing::info!(listen = %addr, "metrics served at /metrics");
        tasks.tracker.spawn(metrics::serve(
            listener,
            cfg.reserved_loopback_connections,
            tasks.stop.clone(),
            tasks.tracker.clone(),
        ));
    }
}

/// Serves the admission webhook, when on.
pub(crate) fn webhook(
    listeners: &mut Listeners,
    cfg: &Config,
    shared: &Arc<Shared>,
    tasks: &Tasks,
) -> Result<(), StartError> {
    let (Some(addr), Some(listener)) = (cfg.webhook_listen, listeners.webhook.take()) else { return Ok(()) };
    let tls = https_tls(server_cert(shared, tasks, cfg.webhook_names.clone(), vec![])?)?;
    let inject = palisade_inject::Config {
        image: cfg.proxy_image.clone(),
        control_plane: cfg.inject_control_plane.clone(),
        native_sidecar: !cfg.classic_sidecar,
        trust_bundle_pem: String::new(),
        ..Default::default()
    };
    tracing::info!(listen = %addr, "admission webhook serving POST /mutate");
    tasks.tracker.spawn(webhook::serve(
        listener,
        tls,
        inject,
        shared.ca.clone(),
        https::Limits::webhook(cfg),
        tasks.stop.clone(),
        tasks.tracker.clone(),
    ));
    Ok(())
}

/// The gRPC server, serving until `shutdown` says so.
#[derive(Debug)]
pub(crate) struct Grpc {
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) task: JoinHandle<()>,
}

/// Serves the gRPC API (Identity, Discovery, MeshConfig, Admin, health,
/// reflection) over TLS with the control plane's SPIFFE identity.
pub(crate) async fn grpc(
    listener: TcpListener,
    cfg: &Config,
    shared: Arc<Shared>,
    tasks: &Tasks,
) -> Result<Grpc, StartError> {
    // Our own certificate, with the SPIFFE ID plus names for generic tools.
    let mut ips = vec![cfg.listen.ip()];
    if cfg.listen.ip().is_unspecified() || cfg.listen.ip().is_loopback() {
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    ips.dedup();
    let cert = server_cert(&shared, tasks, cfg.server_names.clone(), ips)?;
    // Client certs are optional (first Certify has none) but must verify when shown
    // (against the bundle in force: both roots during a rotation).
    let td = shared.trust_domain.clone();
    let verifier = SpiffeClientVerifier::new(shared.ca.trust.clone(), PeerIdentity::TrustDomain(td), false)?;
    let tls = palisade_certs::tls::server_config(verifier, Arc::new(cert), &[b"h2"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<IdentityServer<identity::IdentityService>>().await;
    health.set_serving::<AdminServer<admin::AdminService>>().await;
    health.set_serving::<MeshConfigServer<push::MeshConfigService>>().await;
    let reflection = |builder: tonic_reflection::server::Builder<'static>| {
        builder
            .register_encoded_file_descriptor_set(palisade_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    // v1alpha too: older clients (grpcio-reflection, grpcurl's fallback) speak only it.
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| StartError::Reflection(e.to_string()))?;

    let (conn_tx, conn_rx) = mpsc::channel::<std::io::Result<conn::Conn>>(64);
    tasks.tracker.spawn(conn::accept(
        listener,
        acceptor,
        conn::Limits::new(cfg),
        conn_tx,
        tasks.stop.clone(),
        tasks.tracker.clone(),
    ));
    let tracing = match &cfg.otlp_endpoint {
        Some(endpoint) => palisade_telemetry::Tracing::start(
            &palisade_telemetry::Options {
                endpoint: endpoint.clone(),
                ca_file: cfg.otlp_ca_file.clone(),
                sampling: cfg.trace_sampling,
                service_name: "palisade-control-plane".into(),
            },
            metrics::METRICS.spans.clone(),
        )
        .map_err(|e| StartError::Tracing(e.to_string()))?,
        None => palisade_telemetry::Tracing::default(),
    };
    let router = tonic::transport::Server::builder()
        .layer(telemetry::TraceLayer(tracing))
        .timeout(Duration::from_secs(30))
        // Pings keep live clients talking, so the idle timeout finds dead ones.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(256))
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(IdentityServer::new(identity::IdentityService { shared: shared.clone() }))
        .add_service(DiscoveryServer::new(discovery::DiscoveryService { shared: shared.clone() }))
        .add_service(
            MeshConfigServer::new(push::MeshConfigService { shared: shared.clone() })
                .max_encoding_message_size(limits::MAX_SNAPSHOT_BYTES),
        )
        .add_service(
            AdminServer::new(admin::AdminService { shared })
                .max_decoding_message_size(limits::MAX_ADMIN_MESSAGE_BYTES)
                .max_encoding_message_size(limits::MAX_ADMIN_MESSAGE_BYTES),
        );
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let task = tokio::spawn(async move {
        let until = async move {
            let _ = shutdown_rx.changed().await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, until).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    Ok(Grpc { shutdown, task })
}
