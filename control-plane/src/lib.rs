//! The Palisade control plane: the mesh's certificate authority, workload
//! attestation (join tokens, Kubernetes TokenReview), and the gRPC API
//! (Identity, Admin, grpc.health.v1, server reflection) served over TLS with
//! its own SPIFFE identity.
//!
//! It is not in the data path: sidecars keep serving with their current
//! certificate while it is down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_certs::TrustDomain;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod admin;
pub mod attest;
mod background;
pub mod ca;
pub mod config;
mod conn;
mod credentials;
pub mod directory_guard;
pub mod discovery;
mod explain;
pub mod https;
pub mod identity;
pub mod jwks;
pub mod metrics;
pub mod oauth;
mod observe;
pub mod pki;
pub mod policy;
mod preview_record;
pub mod push;
mod serve;
mod state;
pub mod store;
mod telemetry;
pub mod webhook;

pub use config::Config;

use attest::Attestors;
use store::Store;

/// State shared by the gRPC services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) ca: Arc<ca::Authority>,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) cert_ttl: Duration,
    pub(crate) join_token_ttl: Duration,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) attestors: Attestors,
    pub(crate) hub: push::Hub,
    pub(crate) default_allow_authenticated: bool,
    /// The mesh's OAuth token service, when on.
    pub(crate) oauth: Option<Arc<oauth::TokenService>>,
    /// Key sets fetched for `jwksUri`.
    pub(crate) jwks: Arc<jwks::JwksCache>,
    /// Taps, recorded requests and stats from the sidecars.
    pub(crate) observe: Arc<observe::Observatory>,
    /// Who may put which inbound address in the directory.
    pub(crate) directory: directory_guard::DirectoryGuard,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data dir {path}: {source}{}", state::data_dir_fix(.path, *.runs_as))]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
        /// This process's effective uid and gid when access was refused:
        /// the directory (often a mounted volume) must be writable by them.
        runs_as: Option<(u32, u32)>,
    },
    #[error("data dir {path} is in use by another control plane (lock held on {path}/lock)")]
    Locked { path: std::path::PathBuf },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ca(#[from] ca::HomeError),
    #[error(transparent)]
    StoreKey(#[from] store::sealed::SealError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("Kubernetes attestation: {0}")]
    K8s(#[from] attest::k8s::K8sError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Tracing(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error(transparent)]
    OAuth(#[from] oauth::OAuthError),
    #[error("--jwks-ca-file: {0}")]
    JwksCa(#[from] jwks::RootsError),
}

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// The bound OAuth token service address, when on.
    pub oauth_addr: Option<SocketAddr>,
    /// Where the admin credential was written.
    pub admin: pki::AdminCredential,
    shutdown: watch::Sender<bool>,
    closing: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Stops everything else it started (accept loops, rotation, pruning).
    stop: tokio_util::sync::CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    _lock: std::fs::File,
}

impl Running {
    /// Stops accepting, lets in-flight calls finish, and returns.
    pub async fn shutdown(self) {
        // End the long-lived policy streams first, or draining would wait on them.
        let _ = self.closing.send(true);
        self.stop.cancel();
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
    }
}

/// Loads state and the CA, binds, and serves until [`Running::shutdown`].
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let lock = state::lock_data_dir(&cfg.data_dir)?;
    // Bind before touching any state, so a port conflict changes nothing on disk.
    let mut listeners = serve::Listeners::bind(&cfg).await?;
    if cfg.cert_ttl < Duration::from_secs(300) {
        tracing::warn!(cert_ttl = %humantime::format_duration(cfg.cert_ttl), "certificate TTL below 5 minutes: fine for tests, a heavy renewal load in production");
    }
    let (store, etcd) = state::open_store(&cfg).await?;
    let authority = state::open_ca(&cfg, etcd.as_ref()).await?;
    let view = authority.view();
    let admin = pki::ensure_admin_credential(&cfg.data_dir, &view.signing, &view.bundle_pem(), &cfg.trust_domain)?;
    let oauth = state::open_oauth(&cfg, &store, etcd.as_ref()).await?;
    let shared = state::shared(&cfg, store, authority, oauth)?;

    // Everything spawned from here on stops with `tasks.stop` and is waited for on shutdown.
    let tasks = background::Tasks::default();
    background::start(&tasks, &shared, cfg.data_dir.clone());
    let oauth_addr = serve::oauth(&mut listeners, &cfg, &shared, &tasks)?;
    serve::metrics(&mut listeners, &cfg, &tasks);
    serve::webhook(&mut listeners, &cfg, &shared, &tasks)?;
    let closing = shared.hub.closing.clone();
    let addr = listeners.grpc_addr;
    let grpc = serve::grpc(listeners.grpc, &cfg, shared, &tasks).await?;
    tracing::info!(listen = %addr, admin_credential = %admin.dir.display(), "control plane serving");
    Ok(Running {
        addr,
        oauth_addr,
        admin,
        shutdown: grpc.shutdown,
        closing,
        task: grpc.task,
        stop: tasks.stop,
        tracker: tasks.tracker,
        _lock: lock,
    })
}
