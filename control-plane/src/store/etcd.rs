//! The replicated store (`--store etcd`): the control plane's state in etcd,
//! shared by every replica that points at the same cluster and prefix.
//!
//! Each record is one key under the prefix (`tokens/<sha256>`,
//! `proxies/<serial>`, `apikeys/<name>`, `oauth/<client id>`, and the sealed
//! secrets at the top, `ca` or `oauth-keys`: [`secrets`]), except the
//! policies, which are one document (`policies`) so that a document apply
//! stays all or nothing under one revision. Every read-modify-write is a
//! compare-and-swap on the key's etcd mod revision: two replicas can never
//! hand out the same policy revision or lose an update; an apply that
//! changes a resource another replica changed since it read it fails with a
//! conflict, one that touches other resources is retried on top.
//!
//! Reads are served from a cache that a watch on the prefix keeps current;
//! the watch also tells this replica what another replica changed (the
//! [`Change`]s behind [`super::Store::watch`]; [`cache`]), so it pushes the change to
//! its own sidecars. The `Store` trait is synchronous: calls run on a small
//! runtime of the store's own, from the caller's blocking thread.
//!
//! Beside the state, the replicas keep their own bookkeeping here: who
//! leads ([`lease`]) and which sidecars each serves ([`sync`]). A
//! single-node install's state moves in with [`migrate`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{Change, State, StoreError};

mod cache;
mod lease;
mod migrate;
mod records;
mod secrets;
mod sync;
#[cfg(test)]
mod tests;

use cache::Cache;
pub use secrets::EtcdSecrets;

/// One etcd call, at most.
pub(super) const CALL: Duration = Duration::from_secs(5);
/// Compare-and-swap attempts before giving up.
pub(super) const ATTEMPTS: usize = 16;
/// Operations in one transaction, at most (etcd's default limit is 128).
pub(super) const TXN_OPS: usize = 100;

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// PEM files: the CA etcd's certificate chains to, and our client certificate and key.
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<std::path::PathBuf>,
}

/// The etcd store.
pub struct EtcdStore {
    /// Always `Some` but in `drop`.
    rt: Option<tokio::runtime::Runtime>,
    /// This replica's id: its stream records live under `streams/<replica>/`.
    replica: String,
    /// The stream records this replica wants published (by status key).
    presence: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// Whether this replica leads (runs the singleton duties).
    leader: tokio::sync::watch::Sender<bool>,
    client: Client,
    prefix: String,
    cache: Arc<Mutex<Cache>>,
    changes: tokio::sync::broadcast::Sender<Change>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

pub(super) fn etcd_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd { why: e.to_string() }
}

pub(super) async fn timed<T, E: std::fmt::Display>(f: impl Future<Output = Result<T, E>>) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL, f).await {
        Ok(r) => r.map_err(etcd_err),
        Err(_) => Err(StoreError::Etcd { why: format!("no answer within {}s", CALL.as_secs()) }),
    }
}

/// An etcd call, tried again (3 times in all, 200 and 400 ms apart) when it
/// fails: a member that just died is left for another.
pub(super) async fn retried<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    mut call: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let mut last = None;
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200) * attempt).await;
        }
        match timed(call()).await {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| etcd_err("no attempt")))
}

impl EtcdStore {
    /// Connects, loads everything under the prefix, and starts watching it.
    pub fn open(opts: &EtcdOptions) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(etcd_err)?;
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(CALL)
            .with_timeout(CALL)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(user) = &opts.user {
            let path = opts.password_file.as_ref().ok_or_else(|| etcd_err("--etcd-user needs --etcd-password-file"))?;
            let password = std::fs::read_to_string(path)
                .map_err(|e| etcd_err(format!("--etcd-password-file {}: {e}", path.display())))?;
            connect = connect.with_user(user.clone(), password.trim_end().to_string());
        }
        if opts.ca_file.is_some() || opts.cert_file.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &opts.ca_file {
                let pem = std::fs::read(ca).map_err(|e| etcd_err(format!("--etcd-ca-file {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&opts.cert_file, &opts.key_file) {
                let c =
                    std::fs::read(cert).map_err(|e| etcd_err(format!("--etcd-cert-file {}: {e}", cert.display())))?;
                let k = std::fs::read(key).map_err(|e| etcd_err(format!("--etcd-key-file {}: {e}", key.display())))?;
                tls = tls.identity(etcd_client::Identity::from_pem(c, k));
            }
            connect = connect.with_tls(tls);
        }
        let endpoints = opts.endpoints.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(timed(Client::connect(endpoints, Some(connect))).await);
        });
        let client = rx
            .recv()
            .map_err(etcd_err)?
            .map_err(|e| etcd_err(format!("cannot reach etcd at {}: {e}", opts.endpoints.join(","))))?;
        let (changes, _) = tokio::sync::broadcast::channel(256);
        let mut id = [0u8; 6];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| etcd_err("no randomness"))?;
        let replica: String = palisade_cmd::hex(&id);
        let store = Self {
            rt: Some(rt),
            replica,
            presence: Arc::default(),
            leader: tokio::sync::watch::channel(false).0,
            client,
            prefix: opts.prefix.clone(),
            cache: Arc::default(),
            changes,
        };
        let revision = store.run({
            let (client, prefix, cache) = (store.client.clone(), store.prefix.clone(), store.cache.clone());
            async move { cache::load(&client, &prefix, &cache).await }
        })?;
        store.runtime().spawn(sync::publish(
            store.client.clone(),
            format!("{}streams/{}/", store.prefix, store.replica),
            store.presence.clone(),
        ));
        store.runtime().spawn(lease::lead(
            store.client.clone(),
            format!("{}leader", store.prefix),
            store.replica.clone(),
            store.leader.clone(),
        ));
        store.runtime().spawn(cache::watch(
            store.client.clone(),
            store.prefix.clone(),
            store.cache.clone(),
            store.changes.clone(),
            revision,
        ));
        Ok(store)
    }

    pub(super) fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("invariant: the runtime is taken only on drop")
    }

    /// Runs `f` on the store's runtime and waits for it (from a blocking thread).
    pub(super) fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime().spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().expect("invariant: the store runtime lives as long as the store")
    }

    pub(super) fn key(&self, section: &str, id: &str) -> String {
        format!("{}{section}/{id}", self.prefix)
    }

    pub(super) fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.cache.lock().unwrap_or_else(|p| p.into_inner()).state)
    }

    pub(super) fn rev(&self, key: &str) -> i64 {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).revs.get(key).copied().unwrap_or(0)
    }

    /// Runs a transaction; `Ok(false)` when its comparisons failed. What
    /// it wrote reaches the cache through the watch, and at once here.
    pub(super) fn txn(
        &self,
        compares: Vec<Compare>,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<bool, StoreError> {
        let client = self.client.clone();
        let ops: Vec<TxnOp> = deletes
            .iter()
            .map(|k| TxnOp::delete(k.clone(), None))
            .chain(puts.iter().map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None)))
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = self.run(async move {
            retried(|| {
                let (mut kv, txn) = (client.kv_client(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
        })?;
        if !resp.succeeded() {
            return Ok(false);
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for k in &deletes {
            cache::apply_unless_older(&mut cache, &self.prefix, k, None, revision);
        }
        for (k, v) in &puts {
            cache::apply_unless_older(&mut cache, &self.prefix, k, Some(v), revision);
        }
        Ok(true)
    }

    /// Reads one key from etcd (not the cache) into the cache: its value's
    /// mod revision after.
    pub(super) fn refresh(&self, key: &str) -> Result<i64, StoreError> {
        let (client, k) = (self.client.clone(), key.to_string());
        let resp = self.run(async move {
            retried(|| {
                let (mut kv, k) = (client.kv_client(), k.clone());
                async move { kv.get(k, None).await }
            })
            .await
        })?;
        // The revision the read saw the store at: a key the cache holds at a
        // later one (the watch got there first) stays as it is.
        let read_at = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match resp.kvs().first() {
            Some(kv) => {
                cache::apply_unless_older(&mut cache, &self.prefix, key, Some(kv.value()), kv.mod_revision());
            }
            None => {
                cache::apply_unless_older(&mut cache, &self.prefix, key, None, read_at);
            }
        }
        // The caller compares against what the cache now holds.
        Ok(cache.revs.get(key).copied().unwrap_or(0))
    }

    /// Read-modify-write of one record with compare-and-swap, retried on
    /// conflict: `f` sees the freshest value and returns the new one (or
    /// `None` to leave it) and what to answer.
    pub(super) fn cas<R: Serialize + for<'de> Deserialize<'de>, T>(
        &self,
        key: &str,
        get: impl Fn(&State) -> Option<R>,
        f: impl Fn(Option<R>) -> (Option<R>, T),
    ) -> Result<T, StoreError> {
        for attempt in 0..ATTEMPTS {
            let rev = if attempt == 0 { self.rev(key) } else { self.refresh(key)? };
            let (new, out) = f(self.read(&get));
            let Some(new) = new else { return Ok(out) };
            let json = serde_json::to_vec(&new).map_err(etcd_err)?;
            if self.txn(
                vec![Compare::mod_revision(key, CompareOp::Equal, rev)],
                vec![(key.to_string(), json)],
                vec![],
            )? {
                return Ok(out);
            }
        }
        Err(StoreError::Conflict { what: format!("{key} kept changing under this replica; try again") })
    }

    pub(super) fn policies_key(&self) -> String {
        format!("{}policies", self.prefix)
    }

    /// One key's value and mod revision, from etcd (not the cache).
    pub(super) fn get_raw(&self, name: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let (client, key) = (self.client.clone(), format!("{}{name}", self.prefix));
        let found = self.run(async move {
            retried(|| {
                let (mut kv, key) = (client.kv_client(), key.clone());
                async move { kv.get(key, None).await }
            })
            .await
        })?;
        Ok(found.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropped where blocking is not allowed (the server's last task): stop without waiting.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
