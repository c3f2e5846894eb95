//! The storage layer: the control plane's records behind the [`Store`]
//! trait (join tokens (hashed), proxy records, policies, API keys, OAuth
//! clients) and its sealed secrets behind [`sealed::SecretHome`]. The
//! default is an embedded file store ([`FileStore`]: a JSON document and a
//! journal in the data dir); `--store etcd` shares them between replicas
//! ([`etcd::EtcdStore`]).
//!
//! The store knows records and bytes, not what the CA, the policy engine or
//! the token service make of them: those modules depend on it, never the
//! reverse.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub mod etcd;
mod journal;
pub mod sealed;

mod file;
mod records;

pub use file::FileStore;
pub use records::*;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt: {source}; restore it from a backup or move it away to start empty")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("cannot write state file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("etcd: {why}")]
    Etcd { why: String },
    /// Another replica changed what this call was changing.
    #[error("{what}")]
    Conflict { what: String },
}

/// What changed in the store (as a replicated store's watch saw it, whichever replica wrote).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Policies,
    /// API keys or OAuth clients.
    Credentials,
    /// Proxy records (the directory).
    Endpoints,
    Tokens,
    /// Another replica's connected sidecars (their sync state).
    Streams,
    /// The sealed secret of this name (see [`sealed::SecretHome`]) changed.
    Secret(String),
}

/// Persistent control-plane state. Implementations must make each call atomic.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// What other replicas change (a replicated store); `None`: only this process writes.
    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        None
    }
    /// Whether this replica leads, when several share the store; `None`:
    /// it is alone, and always leads.
    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
    /// Publishes this replica's connected sidecars (status key -> record)
    /// for the other replicas; a single-process store has none.
    fn publish_streams(&self, _records: BTreeMap<String, Vec<u8>>) {}
    /// The other replicas' published records.
    fn remote_streams(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }
    fn put_token(&self, t: TokenRecord) -> Result<(), StoreError>;
    fn tokens(&self) -> Vec<TokenRecord>;
    /// Marks a token revoked by id; `None` if unknown.
    fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Atomically checks a token by hash and takes one use.
    fn consume_token(&self, sha256: &str, now: u64) -> Result<Result<TokenRecord, TokenRefusal>, StoreError>;
    /// Gives back a use taken by `consume_token` when issuance failed afterwards.
    fn refund_token(&self, sha256: &str) -> Result<(), StoreError>;
    /// Records a proxy's certificate: inserts `p`, drops the record a
    /// renewal supersedes (`replaces_serial`) and the identity's other
    /// records on the same inbound address (a restart). Another identity's
    /// record on that address is dropped only with `take_over` (a verified
    /// reused IP, see `directory_guard`). Returns whether the directory
    /// changed (a new endpoint, or one that moved), which a renewal does not.
    fn upsert_proxy(&self, p: ProxyRecord, replaces_serial: Option<&str>, take_over: bool) -> Result<bool, StoreError>;
    fn proxies(&self) -> Vec<ProxyRecord>;
    /// Calls `f` with every proxy record, without copying them (the
    /// directory is rebuilt from them on every coalesced change).
    fn visit_proxies(&self, f: &mut dyn FnMut(&ProxyRecord)) {
        self.proxies().iter().for_each(f)
    }
    /// The records of `identity`, at `addr`, or with serial `serial`: what
    /// a directory claim is checked against (not the whole directory).
    fn proxies_near(&self, identity: &str, addr: &str, serial: Option<&str>) -> Vec<ProxyRecord> {
        // A scan without copies: only the matches are cloned.
        let mut near = Vec::new();
        self.visit_proxies(&mut |p| {
            if p.identity == identity
                || (!addr.is_empty() && p.inbound_addr == addr)
                || Some(p.cert_serial.as_str()) == serial
            {
                near.push(p.clone());
            }
        });
        near
    }

    /// Drops tokens and proxy records that ended before `cutoff`.
    fn prune(&self, cutoff: u64) -> Result<(), StoreError>;
    /// All policies and the current policy revision.
    fn policies(&self) -> (u64, Vec<PolicyRecord>);
    /// The current policy revision alone (cheap).
    fn policy_revision(&self) -> u64;
    /// Stores `(kind, key, json)` resources atomically under one new revision
    /// (no new revision if nothing changed).
    fn apply_policies(&self, resources: Vec<(String, String, String)>) -> Result<(u64, Vec<Applied>), StoreError>;
    /// Deletes a policy; the new revision, or `None` if it did not exist.
    fn delete_policy(&self, kind: &str, key: &str) -> Result<Option<u64>, StoreError>;
    /// Adds an API key; `false` if one with that name exists (revoked or not).
    fn put_api_key(&self, k: ApiKeyRecord) -> Result<bool, StoreError>;
    fn api_keys(&self) -> Vec<ApiKeyRecord>;
    /// Marks a key revoked; `None` if unknown.
    fn revoke_api_key(&self, name: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Adds an OAuth client; `false` if one with that name exists.
    fn put_oauth_client(&self, c: OAuthClientRecord) -> Result<bool, StoreError>;
    fn oauth_clients(&self) -> Vec<OAuthClientRecord>;
    /// Deletes a client by id; `None` if unknown.
    fn delete_oauth_client(&self, client_id: &str) -> Result<Option<OAuthClientRecord>, StoreError>;
}

/// Puts `(kind, key, json)` resources into `policies` at `revision` (the
/// unchanged ones keep theirs), saying what each apply did.
fn put_policies(
    policies: &mut BTreeMap<String, PolicyRecord>,
    revision: u64,
    resources: Vec<(String, String, String)>,
) -> Vec<Applied> {
    resources
        .into_iter()
        .map(|(kind, key, json)| {
            let id = PolicyRecord::id(&kind, &key);
            let previous = policies.get(&id).map(|p| p.json.clone());
            let change = match &previous {
                None => "created",
                Some(old) if *old == json => "unchanged",
                Some(_) => "updated",
            };
            let record = if change == "unchanged" {
                policies[&id].clone()
            } else {
                let r = PolicyRecord { kind, key, revision, json };
                policies.insert(id, r.clone());
                r
            };
            Applied { record, change, previous }
        })
        .collect()
}

/// Whether `p` (at its inbound address) replaces `old`: the same identity's
/// record there (a restart), or another's when taking the address over.
fn replaced_by(old: &ProxyRecord, p: &ProxyRecord, take_over: bool) -> bool {
    !p.inbound_addr.is_empty() && old.inbound_addr == p.inbound_addr && (take_over || old.identity == p.identity)
}

/// The directory entries an upsert of `p` can change: its identity's
/// addresses and whoever is at its address.
fn touched<'a>(
    proxies: impl Iterator<Item = &'a ProxyRecord>,
    p: &ProxyRecord,
) -> std::collections::BTreeSet<(String, String)> {
    proxies
        .filter(|o| !o.inbound_addr.is_empty() && (o.identity == p.identity || o.inbound_addr == p.inbound_addr))
        .map(|o| (o.identity.clone(), o.inbound_addr.clone()))
        .collect()
}

/// Runs a store call off the async threads: the file store writes and
/// fsyncs under its lock, which must not stall the runtime.
pub async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> T + Send + 'static,
) -> T {
    let store = store.clone();
    let timed = move || {
        let start = std::time::Instant::now();
        let v = f(store.as_ref());
        crate::metrics::METRICS.store_latency.observe(start.elapsed().as_secs_f64());
        v
    };
    match tokio::task::spawn_blocking(timed).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
