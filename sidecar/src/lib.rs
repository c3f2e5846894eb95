//! The Palisade sidecar: obtains and renews the workload's SPIFFE identity
//! from the control plane and serves the admin endpoint. The data path
//! (inbound/outbound listeners) builds on the same [`SvidStore`]: listeners
//! resolve their certificate from it, so a renewal takes effect on the next
//! handshake without touching live connections.
//!
//! [`SvidStore`]: palisade_certs::tls::SvidStore

use std::net::SocketAddr;
use std::sync::Arc;

use palisade_certs::tls::{SvidStore, TrustBundle};
use palisade_proto::channel::ControlPlaneAddr;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod admin;
pub mod config;
pub mod identity;
pub mod metrics;

pub use config::Config;
use identity::{Credential, IdentityClientTask};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("--ca-bundle: {0}")]
    Bundle(String),
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Bind { flag: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// A running sidecar.
#[derive(Debug)]
pub struct Running {
    /// The bound admin address.
    pub admin_addr: SocketAddr,
    /// The workload certificate store.
    pub svids: SvidStore,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Validates the config, binds the admin port and starts the identity client.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    cfg.validate()?;
    let addr = ControlPlaneAddr::parse(&cfg.control_plane).map_err(config::ConfigError::from)?;
    let pem = std::fs::read_to_string(&cfg.ca_bundle).map_err(|e| StartError::Bundle(e.to_string()))?;
    let roots = palisade_certs::ca::parse_pem_certs(&pem).map_err(StartError::Bundle)?;
    let bundle = TrustBundle::new(&roots).map_err(|e| StartError::Bundle(e.to_string()))?;
    let credential = match (&cfg.join_token, &cfg.join_token_file, &cfg.k8s_token_file) {
        (Some(t), _, _) => Credential::JoinToken(t.clone()),
        (None, Some(p), _) => Credential::JoinTokenFile(p.clone()),
        (None, None, Some(p)) => Credential::K8sTokenFile(p.clone()),
        (None, None, None) => return Err(config::ConfigError::NoAttestation.into()),
    };

    let metrics = Arc::new(metrics::Metrics::default());
    let mut registry = Registry::with_prefix("palisade");
    metrics.register(&mut registry);
    let svids = SvidStore::new();

    let admin_listener = TcpListener::bind(cfg.admin).await.map_err(|source| StartError::Bind {
        flag: "--admin",
        addr: cfg.admin,
        source,
    })?;
    let admin_addr =
        admin_listener.local_addr().map_err(|source| StartError::Bind { flag: "--admin", addr: cfg.admin, source })?;

    let inbound_addr = if cfg.inbound.ip().is_unspecified() { String::new() } else { cfg.inbound.to_string() };
    let identity = IdentityClientTask {
        addr,
        bundle,
        trust_domain: cfg.trust_domain.clone(),
        credential,
        inbound_addr,
        store: svids.clone(),
        metrics,
    };
    let (stop, stop_rx) = watch::channel(false);
    let state = Arc::new(admin::AdminState { config: cfg, svids: svids.clone(), registry });
    let tasks = vec![tokio::spawn(identity.run()), tokio::spawn(admin::serve(admin_listener, state, stop_rx))];
    tracing::info!(admin = %admin_addr, "sidecar started");
    Ok(Running { admin_addr, svids, stop, tasks })
}
