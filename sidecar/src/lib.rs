//! The Palisade sidecar: obtains and renews the workload's SPIFFE identity
//! from the control plane, carries the workload's traffic over mTLS
//! (inbound and outbound listeners, HTTP/1.1, HTTP/2, gRPC and opaque TCP),
//! and serves the admin endpoint.
//!
//! Listeners resolve their certificate from one [`SvidStore`], so a renewal
//! takes effect on the next handshake without touching live connections.
//!
//! [`SvidStore`]: palisade_certs::tls::SvidStore

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_certs::tls::{PeerIdentity, SpiffeClientVerifier, SvidStore, TrustBundle};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod admin;
pub mod balance;
pub mod config;
pub mod control;
pub mod directory;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod proxy;
pub use palisade_telemetry as trace;

pub use config::Config;
use identity::IdentityClientTask;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("--ca-bundle: {0}")]
    Bundle(String),
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Bind { flag: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Tracing(String),
}

/// A running sidecar.
#[derive(Debug)]
pub struct Running {
    /// The bound admin address.
    pub admin_addr: SocketAddr,
    /// The bound inbound address.
    pub inbound_addr: SocketAddr,
    /// The workload certificate store.
    pub svids: SvidStore,
    /// Cancelled to start draining (SIGTERM or PUT /shutdown).
    pub shutdown: CancellationToken,
    /// Connections and in-flight requests.
    connections: TaskTracker,
    background: TaskTracker,
    background_stop: CancellationToken,
}

impl Running {
    /// Stops accepting, lets in-flight requests and connections finish for
    /// up to `deadline`, then stops everything. Returns whether all finished.
    pub async fn drain(self, deadline: Duration) -> bool {
        self.shutdown.cancel();
        self.connections.close();
        let clean = tokio::time::timeout(deadline, self.connections.wait()).await.is_ok();
        self.background_stop.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.background.wait()).await;
        clean
    }
}

async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { flag, addr, source })
}

/// Validates the config, binds every listener, and starts serving.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let config::Validated { control_plane: addrs, roots, credential } = cfg.validate()?;
    let bundle = TrustBundle::new(&roots).map_err(|e| StartError::Bundle(e.to_string()))?;

    // Bind everything first: a port conflict fails the start, not a later request.
    let admin_listener = bind("--admin", cfg.admin).await?;
    let inbound_listener = bind("--inbound", cfg.inbound).await?;
    let outbound_listener = if cfg.transparent { Some(bind("--outbound", cfg.outbound).await?) } else { None };
    let mut upstream_listeners = Vec::new();
    for u in &cfg.upstreams {
        upstream_listeners.push((bind("--upstream", u.listen).await?, u.clone()));
    }
    let local =
        |l: &TcpListener, flag| l.local_addr().map_err(|source| StartError::Bind { flag, addr: cfg.admin, source });
    let admin_addr = local(&admin_listener, "--admin")?;
    let inbound_addr = local(&inbound_listener, "--inbound")?;

    let metrics = Arc::new(metrics::Metrics::default());
    let mut registry = Registry::with_prefix("palisade");
    metrics.register(&mut registry);
    let observe = Arc::new(observe::Observe::new(cfg.preview_record_rate));
    observe.metrics.register(&mut registry);
    // Read at scrape time, so recording a request costs no label lookup.
    let balancer = Arc::new(balance::Balancer::new(cfg.balance));
    registry.register_collector(Box::new(metrics::balance::BalancerCollector(balancer.clone())));
    let svids = SvidStore::new();
    let shutdown = CancellationToken::new();
    let background_stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let background = TaskTracker::new();

    let advertised = cfg.advertise.or((!cfg.inbound.ip().is_unspecified()).then_some(inbound_addr));
    let control = Arc::new(control::ControlPlane::new(addrs, cfg.trust_domain.clone(), bundle.clone(), svids.clone())?);
    let (renew_unless, renew_unless_rx) = tokio::sync::watch::channel(Vec::new());
    let identity = IdentityClientTask {
        renew_unless: renew_unless_rx,
        control: control.clone(),
        bundle: bundle.clone(),
        trust_domain: cfg.trust_domain.clone(),
        credential,
        inbound_addr: advertised.map(|a| a.to_string()).unwrap_or_default(),
        store: svids.clone(),
        metrics: metrics.clone(),
    };
    let directory = Arc::new(directory::Directory::default());
    // The declared upstreams' endpoints are asked for from the first stream on.
    directory.want_services(cfg.upstreams.iter().map(|u| u.service.clone()));

    // Inbound: client certificates are mandatory and must be SVIDs of our trust domain.
    let verifier =
        SpiffeClientVerifier::new(bundle.clone(), PeerIdentity::TrustDomain(cfg.trust_domain.clone()), true)?;
    let tls = palisade_certs::tls::server_config(
        verifier,
        Arc::new(svids.clone()),
        &[proxy::ALPN_H2, proxy::ALPN_HTTP1, proxy::ALPN_TCP],
    )?;
    let policy_state = policy::PolicyState::default();
    let tracing = match &cfg.otlp_endpoint {
        Some(endpoint) => trace::Tracing::start(
            &trace::Options {
                endpoint: endpoint.clone(),
                ca_file: cfg.otlp_ca_file.clone(),
                sampling: cfg.trace_sampling,
                service_name: cfg.trace_service_name.clone(),
            },
            metrics.spans.clone(),
        )
        .map_err(|e| StartError::Tracing(e.to_string()))?,
        None => trace::Tracing::default(),
    };
    let config_stream = control::ConfigStream {
        control,
        inbound_addr: advertised.map(|a| a.to_string()).unwrap_or_default(),
        bundle: bundle.clone(),
        policy: policy_state.clone(),
        directory: directory.clone(),
        metrics: metrics.clone(),
        balancer: balancer.clone(),
        observe: observe.clone(),
        report_interval: cfg.report_interval,
        renew_unless,
        held: Default::default(),
    };
    let inbound = proxy::inbound::Inbound::new(
        proxy::inbound::InboundOptions {
            app: cfg.app,
            permissive: cfg.permissive(),
            limits: cfg.limits.clone(),
            opaque_ports: cfg.opaque_ports.clone(),
            http_ports: cfg.http_ports.clone(),
            access_log: cfg.access_log,
            access_log_sampling: cfg.access_log_sampling,
            transparent: cfg.transparent,
            tracing: tracing.clone(),
            observe,
        },
        tls,
        policy_state.clone(),
        svids.clone(),
        metrics.clone(),
    );
    let inbound = Arc::new(inbound);
    let outbound = Arc::new(proxy::outbound::Outbound {
        directory: directory.clone(),
        peers: Arc::new(proxy::peer::PeerClient::new(
            svids.clone(),
            bundle.clone(),
            metrics.clone(),
            cfg.limits.peer_keepalive,
        )),
        metrics: metrics.clone(),
        limits: cfg.limits.clone(),
        opaque_ports: cfg.opaque_ports.clone(),
        access_log: cfg.access_log,
        access_log_sampling: cfg.access_log_sampling,
        egress: cfg.egress,
        policy: policy_state.clone(),
        draws: std::sync::atomic::AtomicU64::new(seed()),
        tracing: tracing.clone(),
        me: svids.clone(),
        balancer: balancer.clone(),
    });

    let state = Arc::new(admin::AdminState {
        config: cfg,
        svids: svids.clone(),
        policy: policy_state,
        directory,
        registry,
        shutdown: shutdown.clone(),
        bundle: bundle.clone(),
        metrics: metrics.clone(),
        balancer: balancer.clone(),
    });
    let stop = background_stop.clone();
    background.spawn(async move {
        tokio::select! { _ = config_stream.run() => {}, _ = stop.cancelled() => {} }
    });
    let stop = background_stop.clone();
    background.spawn(async move {
        tokio::select! { _ = identity.run() => {}, _ = stop.cancelled() => {} }
    });
    background.spawn(admin::serve(admin_listener, state, background_stop.clone(), background.clone()));
    background.spawn(inbound.serve(inbound_listener, shutdown.clone(), connections.clone()));
    if let Some(listener) = outbound_listener {
        background.spawn(outbound.clone().serve_transparent(listener, shutdown.clone(), connections.clone()));
    }
    for (listener, upstream) in upstream_listeners {
        background.spawn(outbound.clone().serve(listener, upstream, shutdown.clone(), connections.clone()));
    }
    tracing::info!(admin = %admin_addr, inbound = %inbound_addr, "sidecar started");
    Ok(Running { admin_addr, inbound_addr, svids, shutdown, connections, background, background_stop })
}

/// A seed for the route draws and replica choice, different in every process.
pub(crate) fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}
