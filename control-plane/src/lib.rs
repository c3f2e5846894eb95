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
use palisade_certs::tls::{PeerIdentity, SpiffeClientVerifier, SvidStore};
use palisade_proto::limits;
use palisade_proto::v1::admin_server::AdminServer;
use palisade_proto::v1::discovery_server::DiscoveryServer;
use palisade_proto::v1::identity_server::IdentityServer;
use palisade_proto::v1::mesh_config_server::MeshConfigServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub mod admin;
pub mod attest;
pub mod ca;
pub mod config;
mod conn;
mod credentials;
pub mod directory_guard;
pub mod discovery;
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
pub mod store;
mod telemetry;
pub mod webhook;

pub use config::Config;

use attest::Attestors;
use attest::join_token::JoinTokenAttestor;
use store::{FileStore, Store};

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
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("data dir {path} is in use by another control plane (lock held on {path}/lock)")]
    Locked { path: std::path::PathBuf },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("Kubernetes attestation: {0}")]
    K8s(String),
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
    JwksCa(String),
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
    let data = &cfg.data_dir;
    std::fs::create_dir_all(data).map_err(|source| StartError::DataDir { path: data.clone(), source })?;
    // The data dir holds the CA key and token hashes: owner only.
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|source| StartError::DataDir { path: data.clone(), source })?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data.join("lock"))
        .map_err(|source| StartError::DataDir { path: data.clone(), source })?;
    if lock.try_lock().is_err() {
        return Err(StartError::Locked { path: data.clone() });
    }
    // Bind before touching any state, so a port conflict changes nothing on disk.
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|source| StartError::Bind { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: cfg.listen, source })?;
    // Every other port too: a conflict changes nothing, and once the gRPC port
    // accepts, so do they (connections wait in their backlogs until served).
    let bind_other = |addr: Option<SocketAddr>| async move {
        match addr {
            Some(addr) => TcpListener::bind(addr).await.map(Some).map_err(|source| StartError::Bind { addr, source }),
            None => Ok(None),
        }
    };
    let oauth_listener = bind_other(cfg.oauth_listen).await?;
    let metrics_listener = bind_other(cfg.metrics_listen).await?;
    let webhook_listener = bind_other(cfg.webhook_listen).await?;
    let td = cfg.trust_domain.clone();
    if cfg.cert_ttl < Duration::from_secs(300) {
        tracing::warn!(cert_ttl = %humantime::format_duration(cfg.cert_ttl), "certificate TTL below 5 minutes: fine for tests, a heavy renewal load in production");
    }
    let mut etcd_store: Option<Arc<store::etcd::EtcdStore>> = None;
    let store: Arc<dyn Store> = match cfg.store {
        config::StoreKind::File => Arc::new(FileStore::open(data)?),
        config::StoreKind::Etcd => {
            let opts = store::etcd::EtcdOptions {
                endpoints: cfg.etcd_endpoints.clone(),
                prefix: cfg.etcd_prefix.clone(),
                ca_file: cfg.etcd_ca_file.clone(),
                cert_file: cfg.etcd_cert_file.clone(),
                key_file: cfg.etcd_key_file.clone(),
                user: cfg.etcd_user.clone(),
                password_file: cfg.etcd_password_file.clone(),
            };
            let s = tokio::task::spawn_blocking(move || store::etcd::EtcdStore::open(&opts))
                .await
                .map_err(|e| store::StoreError::Etcd { why: e.to_string() })??;
            tracing::info!(endpoints = %cfg.etcd_endpoints.join(","), prefix = %cfg.etcd_prefix, "state in etcd");
            let s = Arc::new(s);
            if let (Some(from), Some(key_file)) = (&cfg.migrate_from, &cfg.store_key_file) {
                let kek = store::sealed::Kek::from_file(key_file)
                    .map_err(|e| store::StoreError::Etcd { why: e.to_string() })?;
                let (etcd, from) = (s.clone(), from.clone());
                let report = tokio::task::spawn_blocking(move || etcd.import(&from, &kek))
                    .await
                    .map_err(|e| store::StoreError::Etcd { why: e.to_string() })??;
                tracing::info!(target: "audit", event = "migrated", "{report}");
            }
            etcd_store = Some(s.clone());
            s
        }
    };
    let operator = cfg.ca_cert.as_deref().zip(cfg.ca_key.as_deref()).map(|(c, k)| (c, k, cfg.ca_bundle.as_deref()));
    let home: Box<dyn ca::CaHome> = match (&etcd_store, operator, &cfg.store_key_file) {
        // On etcd with a store key the CA lives in etcd, where it rotates; an
        // operator's root (no --ca-bundle) seeds it on the first start.
        (Some(etcd), op, Some(key_file)) if op.is_none_or(|(_, _, bundle)| bundle.is_none()) => {
            let kek =
                store::sealed::Kek::from_file(key_file).map_err(|e| store::StoreError::Etcd { why: e.to_string() })?;
            Box::new(store::etcd::EtcdCaHome {
                store: etcd.clone(),
                kek: Arc::new(kek),
                td: td.clone(),
                validity: pki::ROOT_VALIDITY,
                seed: op.map(|(c, k, _)| (c.to_path_buf(), k.to_path_buf())),
            })
        }
        (Some(_), None, None) => Box::new(ca::FileHome::new(
            data,
            &td,
            None,
            Some("each replica keeps its own CA in its data dir (no --store-key-file): give the replicas --store-key-file so that the CA lives in etcd, where it can be rotated".into()),
        )),
        _ => Box::new(ca::FileHome::new(data, &td, operator, None)),
    };
    let authority = {
        let td = td.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || ca::Authority::open(home, td))
                .await
                .map_err(|e| store::StoreError::Etcd { why: e.to_string() })??,
        )
    };
    let ca = authority.view().signing.clone();
    tracing::info!(ca = ?ca, trust_domain = %td, "CA ready");
    let admin = pki::ensure_admin_credential(data, &authority.view(), &td)?;

    let k8s = if cfg.k8s_attestation {
        let api_server =
            cfg.k8s_api_server.clone().or_else(attest::k8s::K8sConfig::in_cluster_api_server).ok_or_else(|| {
                StartError::K8s("no API server: pass --k8s-api-server or run in a pod (KUBERNETES_SERVICE_HOST)".into())
            })?;
        let k = attest::k8s::K8sAttestor::new(
            attest::k8s::K8sConfig {
                api_server,
                ca_file: cfg.k8s_ca_file.clone(),
                token_file: cfg.k8s_token_file.clone(),
                audience: cfg.k8s_audience.clone(),
            },
            td.clone(),
        )
        .map_err(StartError::K8s)?;
        Some(Arc::new(k) as Arc<dyn attest::Attestor>)
    } else {
        None
    };
    let oauth = match cfg.issuer_url() {
        Some(issuer) => {
            let settings =
                oauth::Settings { issuer, token_ttl: cfg.oauth_token_ttl, key_rotation: cfg.oauth_key_rotation };
            // On etcd the signing keys are shared by every replica, sealed like the CA.
            let home = match (&etcd_store, &cfg.store_key_file) {
                (Some(etcd), Some(key_file)) => {
                    let kek = store::sealed::Kek::from_file(key_file)
                        .map_err(|e| store::StoreError::Etcd { why: e.to_string() })?;
                    oauth::KeyHome::Etcd(etcd.clone(), Arc::new(kek))
                }
                _ => oauth::KeyHome::File(data.join("oauth-keys.json")),
            };
            let store = store.clone();
            Some(Arc::new(
                tokio::task::spawn_blocking(move || oauth::TokenService::open_at(home, settings, store))
                    .await
                    .map_err(|e| store::StoreError::Etcd { why: e.to_string() })??,
            ))
        }
        None => None,
    };
    let roots = jwks::load_roots(
        cfg.jwks_ca_file.as_deref().unwrap_or(std::path::Path::new("/etc/ssl/certs/ca-certificates.crt")),
        cfg.jwks_ca_file.is_some(),
    )
    .map_err(StartError::JwksCa)?;
    let jwks = Arc::new(jwks::JwksCache::new(roots, cfg.jwks_refresh, cfg.jwks_min_refresh_interval)?);
    let shared = Arc::new(Shared {
        ca: authority.clone(),
        trust_domain: td.clone(),
        cert_ttl: cfg.cert_ttl,
        join_token_ttl: cfg.join_token_ttl,
        store: store.clone(),
        attestors: Attestors {
            join_token: Arc::new(JoinTokenAttestor { store: store.clone() }),
            k8s,
            trust_domain: td.clone(),
        },
        hub: push::Hub::new(cfg.push_coalesce),
        observe: Arc::new(observe::Observatory::new(cfg.preview_window, cfg.preview_memory_mib << 20)),
        directory: directory_guard::DirectoryGuard::new(
            cfg.inbound_addr_check,
            cfg.max_addresses_per_identity,
            cfg.directory_changes_per_minute,
        ),
        default_allow_authenticated: cfg.default_policy == config::DefaultPolicy::AllowAuthenticated,
        oauth: oauth.clone(),
        jwks: jwks.clone(),
    });

    // Everything spawned from here on stops with `stop` and is waited for on shutdown.
    let stop = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let spawn = |fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! { _ = fut => {}, _ = stop.cancelled() => {} }
        });
    };

    // What other replicas change reaches this replica's sidecars too.
    if let Some(mut changes) = store.watch() {
        // And this replica's sidecars are known to the others.
        let publisher = shared.clone();
        spawn(Box::pin(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            let mut seen = u64::MAX;
            loop {
                tick.tick().await;
                if let Some(records) = publisher.hub.published(&mut seen) {
                    publisher.store.publish_streams(records);
                }
            }
        }));
        // Connected proxies per identity on the other replicas: cluster-scope
        // shares depend on them.
        let streams_changed = Arc::new(tokio::sync::Notify::new());
        {
            let (shared, changed) = (shared.clone(), streams_changed.clone());
            spawn(Box::pin(async move {
                loop {
                    changed.notified().await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let mut now = std::collections::HashMap::<String, usize>::new();
                    for (_, s) in push::remote_statuses(&shared) {
                        *now.entry(s.identity).or_default() += 1;
                    }
                    shared.hub.remote_counts(now);
                }
            }));
        }
        let shared = shared.clone();
        spawn(Box::pin(async move {
            use store::etcd::Change;
            loop {
                match changes.recv().await {
                    // Counted at most every 300 ms: a replica publishes its
                    // sidecars in batches, one watch event per record.
                    Ok(Change::Streams) => streams_changed.notify_one(),
                    Ok(Change::Policies) => shared.hub.policies_changed(),
                    Ok(Change::Credentials) => {
                        shared.hub.credentials_changed();
                    }
                    Ok(Change::Endpoints) => shared.hub.endpoints_changed(),
                    Ok(Change::Tokens) => {}
                    Ok(Change::Ca) => reload_ca(&shared).await,
                    Ok(Change::OAuthKeys) => {
                        // The leader rotated the shared signing keys: publish them here too.
                        if let Some(o) = shared.oauth.clone() {
                            match tokio::task::spawn_blocking(move || o.reload()).await {
                                Ok(Ok(())) => {
                                    shared.hub.credentials_changed();
                                }
                                Ok(Err(e)) => tracing::error!(error = %e, "cannot read the rotated OAuth signing keys"),
                                Err(_) => {}
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        reload_ca(&shared).await;
                        shared.hub.credentials_changed();
                        shared.hub.endpoints_changed();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }));
    }

    // Our own certificate, with the SPIFFE ID plus names for generic tools.
    let server_cert = SvidStore::new();
    let mut ips = vec![cfg.listen.ip()];
    if cfg.listen.ip().is_unspecified() || cfg.listen.ip().is_loopback() {
        ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    ips.dedup();
    pki::issue_server_cert(&ca, &td, &cfg.server_names, &ips, &server_cert)?;
    spawn(Box::pin(pki::rotate_server_cert(
        authority.clone(),
        td.clone(),
        cfg.server_names.clone(),
        ips,
        server_cert.clone(),
    )));
    // A rotation step (here or on another replica): the admin credential and
    // every sidecar's snapshot follow the CA in force.
    {
        let (shared, data, td) = (shared.clone(), data.clone(), td.clone());
        spawn(Box::pin(async move {
            let mut changed = shared.ca.subscribe();
            while changed.changed().await.is_ok() {
                let view = shared.ca.view();
                let (d, t) = (data.clone(), td.clone());
                if let Ok(Err(e)) =
                    tokio::task::spawn_blocking(move || pki::ensure_admin_credential(&d, &view, &t)).await
                {
                    tracing::error!(error = %e, "cannot rewrite the admin credential for the CA in force");
                }
                shared.hub.credentials_changed();
            }
        }));
    }
    // The singleton duties run on the leader (with one store of its own, this replica).
    let leading = store.leadership();
    crate::metrics::METRICS.leader.set(i64::from(leading.is_none()));
    if let Some(mut l) = leading.clone() {
        spawn(Box::pin(async move {
            loop {
                crate::metrics::METRICS.leader.set(i64::from(*l.borrow_and_update()));
                if l.changed().await.is_err() {
                    break;
                }
            }
        }));
    }
    spawn(Box::pin(ca::drive(shared.clone(), leading.clone())));
    // Changes reach the sidecars that need them, coalesced.
    spawn(Box::pin(push::run(shared.clone())));
    let prune_store = store.clone();
    spawn(Box::pin(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(600)).await;
            if leading.as_ref().is_some_and(|l| !*l.borrow()) {
                continue;
            }
            let cutoff = palisade_cmd::unix_now().saturating_sub(86400);
            if let Err(e) = store::blocking(&prune_store, move |s| s.prune(cutoff)).await {
                tracing::warn!(error = %e, "cannot prune old tokens and proxy records");
            }
        }
    }));

    // Key sets named by jwksUri: fetched when a policy names them, refreshed, pushed on change.
    let fetch_shared = shared.clone();
    spawn(Box::pin(async move {
        let mut policies = fetch_shared.hub.subscribe_policies();
        loop {
            let wanted = policy::jwks_uris(&fetch_shared);
            if fetch_shared.jwks.fetch_due(&wanted).await {
                fetch_shared.hub.credentials_changed();
            }
            let tick = fetch_shared.jwks.tick();
            tokio::select! {
                _ = fetch_shared.jwks.wait(tick) => {}
                _ = policies.changed() => {}
            }
        }
    }));
    let mut oauth_addr = None;
    if let (Some(listener), Some(service)) = (oauth_listener, oauth) {
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr: cfg.oauth_listen.unwrap_or(addr), source })?;
        oauth_addr = Some(addr);
        // Its certificate names the issuer's host too, so clients that trust the mesh CA verify it.
        let (mut names, mut ips) = (cfg.server_names.clone(), vec![addr.ip(), std::net::IpAddr::from([127, 0, 0, 1])]);
        let host = service.issuer().trim_start_matches("https://").split(['/', ':']).next().unwrap_or("").to_string();
        match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) if !host.is_empty() => names.push(host),
            Err(_) => {}
        }
        ips.retain(|ip| !ip.is_unspecified());
        ips.dedup();
        names.dedup();
        let cert = SvidStore::new();
        pki::issue_server_cert(&ca, &td, &names, &ips, &cert)?;
        spawn(Box::pin(pki::rotate_server_cert(authority.clone(), td.clone(), names, ips, cert.clone())));
        let mut tls = rustls::ServerConfig::builder_with_provider(palisade_certs::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(cert));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        palisade_certs::tls::no_resumption(&mut tls);
        let rotating = (service.clone(), shared.clone(), store.leadership());
        spawn(Box::pin(async move {
            let (service, shared, leading) = rotating;
            loop {
                tokio::time::sleep(service.check_interval()).await;
                // Replicas share the keys: the leader rotates them, the others reload.
                if leading.as_ref().is_some_and(|l| !*l.borrow()) {
                    continue;
                }
                let s = service.clone();
                let rotated = tokio::task::spawn_blocking(move || s.rotate_if_due(palisade_cmd::unix_now()))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                match rotated {
                    Ok(true) => {
                        shared.hub.credentials_changed();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "cannot rotate the OAuth signing key"),
                }
            }
        }));
        tracing::info!(listen = %addr, issuer = %service.issuer(), "OAuth token service serving POST /oauth2/token");
        let limits = https::Limits::oauth(&cfg);
        tracker.spawn(https::serve(
            "oauth",
            listener,
            Arc::new(tls),
            limits,
            stop.clone(),
            tracker.clone(),
            move |req, peer| service.clone().handle(req, peer),
        ));
    }

    // Client certs are optional (first Certify has none) but must verify when shown
    // (against the bundle in force: both roots during a rotation).
    let verifier = SpiffeClientVerifier::new(authority.trust.clone(), PeerIdentity::TrustDomain(td.clone()), false)?;
    let tls = palisade_certs::tls::server_config(verifier, Arc::new(server_cert), &[b"h2"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<IdentityServer<identity::IdentityService>>().await;
    health.set_serving::<AdminServer<admin::AdminService>>().await;
    health.set_serving::<MeshConfigServer<push::MeshConfigService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(palisade_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    // v1alpha too: older clients (grpcio-reflection, grpcurl's fallback) speak only it.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(palisade_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| StartError::Reflection(e.to_string()))?;

    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let (conn_tx, conn_rx) = mpsc::channel::<std::io::Result<conn::Conn>>(64);
    let limits = conn::Limits::new(&cfg);
    tracker.spawn(conn::accept(listener, acceptor, limits, conn_tx, stop.clone(), tracker.clone()));

    if let (Some(addr), Some(listener)) = (cfg.metrics_listen, metrics_listener) {
        tracing::info!(listen = %addr, "metrics served at /metrics");
        tracker.spawn(metrics::serve(listener, cfg.reserved_loopback_connections, stop.clone(), tracker.clone()));
    }
    let closing = shared.hub.closing.clone();
    if let (Some(addr), Some(listener)) = (cfg.webhook_listen, webhook_listener) {
        let webhook_cert = SvidStore::new();
        pki::issue_server_cert(&ca, &td, &cfg.webhook_names, &[], &webhook_cert)?;
        spawn(Box::pin(pki::rotate_server_cert(
            authority.clone(),
            td.clone(),
            cfg.webhook_names.clone(),
            vec![],
            webhook_cert.clone(),
        )));
        let mut tls = rustls::ServerConfig::builder_with_provider(palisade_certs::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(webhook_cert));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let inject = palisade_inject::Config {
            image: cfg.proxy_image.clone(),
            control_plane: cfg.inject_control_plane.clone(),
            native_sidecar: !cfg.classic_sidecar,
            trust_bundle_pem: String::new(),
            ..Default::default()
        };
        palisade_certs::tls::no_resumption(&mut tls);
        tracing::info!(listen = %addr, "admission webhook serving POST /mutate");
        let limits = https::Limits::webhook(&cfg);
        tracker.spawn(webhook::serve(
            listener,
            Arc::new(tls),
            inject,
            authority.clone(),
            limits,
            stop.clone(),
            tracker.clone(),
        ));
    }
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
        .add_service(reflection)
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
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let task = tokio::spawn(async move {
        let until = async move {
            let _ = shutdown_rx.changed().await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, until).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    tracing::info!(listen = %addr, admin_credential = %admin.dir.display(), "control plane serving");
    Ok(Running { addr, oauth_addr, admin, shutdown, closing, task, stop, tracker, _lock: lock })
}

/// Reads the CA again after another replica changed it (a rotation step).
async fn reload_ca(shared: &Arc<Shared>) {
    let s = shared.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.ca.reload()).await {
        tracing::error!(error = %e, "cannot read the CA from the store");
    }
}
