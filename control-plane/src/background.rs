//! The control plane's background tasks, each named for its duty: following
//! the other replicas, following the CA in force, the leader's singleton
//! duties (rotation steps, pruning, OAuth key rotation), the push engine,
//! key-set fetches and server certificate renewal. All stop with
//! [`Tasks::stop`] and are waited for on shutdown.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use palisade_certs::TrustDomain;
use palisade_certs::tls::SvidStore;
use tokio::sync::broadcast::error::RecvError;

use crate::store::{self, Change};
use crate::{Shared, ca, oauth, pki, policy, push};
use palisade_cmd::unix_now;

/// Where the background tasks run: stopped by `stop`, tracked by `tracker`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tasks {
    pub(crate) stop: tokio_util::sync::CancellationToken,
    pub(crate) tracker: tokio_util::task::TaskTracker,
}

impl Tasks {
    /// Runs `fut` until it ends or the control plane stops.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! { _ = fut => {}, _ = stop.cancelled() => {} }
        });
    }
}

/// Starts every background duty but the listeners'.
pub(crate) fn start(tasks: &Tasks, shared: &Arc<Shared>, data_dir: PathBuf) {
    follow_replicas(tasks, shared);
    tasks.spawn(follow_ca(shared.clone(), data_dir));
    // The singleton duties run on the leader (with one store of its own, this replica).
    let leading = shared.store.leadership();
    crate::metrics::METRICS.leader.set(i64::from(leading.is_none()));
    if let Some(l) = leading.clone() {
        tasks.spawn(leader_metric(l));
    }
    tasks.spawn(ca::drive(shared.clone(), leading.clone()));
    // Changes reach the sidecars that need them, coalesced.
    tasks.spawn(push::run(shared.clone()));
    tasks.spawn(prune(shared.store.clone(), leading.clone()));
    tasks.spawn(fetch_key_sets(shared.clone()));
    if let Some(service) = shared.oauth.clone() {
        tasks.spawn(rotate_oauth_keys(service, shared.clone(), leading));
    }
}

/// What other replicas change reaches this replica's sidecars too, and
/// this replica's sidecars are known to the others.
fn follow_replicas(tasks: &Tasks, shared: &Arc<Shared>) {
    let Some(changes) = shared.store.watch() else { return };
    tasks.spawn(publish_streams(shared.clone()));
    let streams_changed = Arc::new(tokio::sync::Notify::new());
    tasks.spawn(count_remote_streams(shared.clone(), streams_changed.clone()));
    tasks.spawn(apply_changes(shared.clone(), changes, streams_changed));
}

/// Publishes this replica's sidecars (their sync state) for the others.
async fn publish_streams(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let mut seen = u64::MAX;
    loop {
        tick.tick().await;
        if let Some(records) = shared.hub.published(&mut seen) {
            shared.store.publish_streams(records);
        }
    }
}

/// Connected proxies per identity on the other replicas (cluster-scope
/// shares depend on them), counted at most every 300 ms: a replica
/// publishes its sidecars in batches, one watch event per record.
async fn count_remote_streams(shared: Arc<Shared>, changed: Arc<tokio::sync::Notify>) {
    loop {
        changed.notified().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut now = std::collections::HashMap::<String, usize>::new();
        for (_, s) in push::remote_statuses(&shared) {
            *now.entry(s.identity).or_default() += 1;
        }
        shared.hub.remote_counts(now);
    }
}

/// Acts on what the store's watch saw another replica change.
async fn apply_changes(
    shared: Arc<Shared>,
    mut changes: tokio::sync::broadcast::Receiver<Change>,
    streams_changed: Arc<tokio::sync::Notify>,
) {
    loop {
        match changes.recv().await {
            Ok(Change::Streams) => streams_changed.notify_one(),
            Ok(Change::Policies) => shared.hub.policies_changed(),
            Ok(Change::Credentials) => {
                shared.hub.credentials_changed();
            }
            Ok(Change::Endpoints) => shared.hub.endpoints_changed(),
            Ok(Change::Tokens) => {}
            Ok(Change::Secret(name)) if ca::SECRET_NAMES.contains(&name.as_str()) => reload_ca(&shared).await,
            Ok(Change::Secret(name)) if name == oauth::KEYS_RECORD => reload_oauth_keys(&shared).await,
            Ok(Change::Secret(_)) => {}
            Err(RecvError::Lagged(_)) => {
                reload_ca(&shared).await;
                shared.hub.credentials_changed();
                shared.hub.endpoints_changed();
            }
            Err(RecvError::Closed) => break,
        }
    }
}

/// Reads the CA again after another replica changed it (a rotation step).
async fn reload_ca(shared: &Arc<Shared>) {
    let s = shared.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.ca.reload()).await {
        tracing::error!(error = %e, "cannot read the CA from the store");
    }
}

/// The leader rotated the shared OAuth signing keys: publish them here too.
async fn reload_oauth_keys(shared: &Arc<Shared>) {
    let Some(o) = shared.oauth.clone() else { return };
    match tokio::task::spawn_blocking(move || o.reload()).await {
        Ok(Ok(())) => {
            shared.hub.credentials_changed();
        }
        Ok(Err(e)) => tracing::error!(error = %e, "cannot read the rotated OAuth signing keys"),
        Err(_) => {}
    }
}

/// A rotation step (here or on another replica): the admin credential and
/// every sidecar's snapshot follow the CA in force.
async fn follow_ca(shared: Arc<Shared>, data_dir: PathBuf) {
    let mut changed = shared.ca.subscribe();
    while changed.changed().await.is_ok() {
        let view = shared.ca.view();
        let (d, t) = (data_dir.clone(), shared.trust_domain.clone());
        let admin = move || pki::ensure_admin_credential(&d, &view.signing, &view.bundle_pem(), &t);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(admin).await {
            tracing::error!(error = %e, "cannot rewrite the admin credential for the CA in force");
        }
        shared.hub.credentials_changed();
    }
}

async fn leader_metric(mut leading: tokio::sync::watch::Receiver<bool>) {
    loop {
        crate::metrics::METRICS.leader.set(i64::from(*leading.borrow_and_update()));
        if leading.changed().await.is_err() {
            break;
        }
    }
}

/// Whether this replica is not the leader now (alone, it always leads).
fn follower(leading: &Option<tokio::sync::watch::Receiver<bool>>) -> bool {
    leading.as_ref().is_some_and(|l| !*l.borrow())
}

/// The leader drops tokens and proxy records that ended a day ago.
async fn prune(store: Arc<dyn store::Store>, leading: Option<tokio::sync::watch::Receiver<bool>>) {
    loop {
        tokio::time::sleep(Duration::from_secs(600)).await;
        if follower(&leading) {
            continue;
        }
        let cutoff = unix_now().saturating_sub(86400);
        if let Err(e) = store::blocking(&store, move |s| s.prune(cutoff)).await {
            tracing::warn!(error = %e, "cannot prune old tokens and proxy records");
        }
    }
}

/// Key sets named by jwksUri: fetched when a policy names them, refreshed, pushed on change.
async fn fetch_key_sets(shared: Arc<Shared>) {
    let mut policies = shared.hub.subscribe_policies();
    loop {
        let wanted = policy::jwks_uris(&shared);
        if shared.jwks.fetch_due(&wanted).await {
            shared.hub.credentials_changed();
        }
        let tick = shared.jwks.tick();
        tokio::select! {
            _ = shared.jwks.wait(tick) => {}
            _ = policies.changed() => {}
        }
    }
}

/// Replicas share the OAuth signing keys: the leader rotates them, the others reload.
async fn rotate_oauth_keys(
    service: Arc<oauth::TokenService>,
    shared: Arc<Shared>,
    leading: Option<tokio::sync::watch::Receiver<bool>>,
) {
    loop {
        tokio::time::sleep(service.check_interval()).await;
        if follower(&leading) {
            continue;
        }
        let s = service.clone();
        let rotated = match tokio::task::spawn_blocking(move || s.rotate_if_due(unix_now())).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        match rotated {
            Ok(true) => {
                shared.hub.credentials_changed();
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot rotate the OAuth signing key"),
        }
    }
}

/// Reissues a server certificate of the control plane at half its
/// lifetime, and at once when the CA that signs changes (a root rotation).
pub(crate) async fn rotate_server_cert(
    ca: Arc<ca::Authority>,
    td: TrustDomain,
    names: Vec<String>,
    ips: Vec<IpAddr>,
    store: SvidStore,
) {
    let mut changed = ca.subscribe();
    // Reissued when the signing root or the cross certificates change.
    let served = |v: &ca::View| (v.signing_sha.clone(), v.cross.clone());
    let mut signer = served(&ca.view());
    let mut due = tokio::time::Instant::now() + pki::SERVER_CERT_TTL / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
                if served(&ca.view()) == signer {
                    continue;
                }
            }
        }
        let view = ca.view();
        match pki::issue_server_cert(&view.signing, &view.cross, &td, &names, &ips, &store) {
            Ok(()) => {
                tracing::info!("reissued the control plane's server certificate");
                signer = served(&view);
                due = tokio::time::Instant::now() + pki::SERVER_CERT_TTL / 2;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reissue the control plane's server certificate; retrying in 1m");
                due = tokio::time::Instant::now() + Duration::from_secs(60);
            }
        }
    }
}
