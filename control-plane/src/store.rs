//! State behind a store trait: join tokens (hashed) and proxy records. The
//! default is an embedded file store: one JSON document in the data dir,
//! rewritten atomically (temp file + fsync + rename) on every change, so an
//! accepted change survives a crash and a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub mod etcd;
pub mod sealed;

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
    /// The CA (its files, or a rotation record).
    #[error("CA: {why}")]
    Ca { why: String },
    /// Another replica changed what this call was changing.
    #[error("{what}")]
    Conflict { what: String },
}

/// A join token as stored: never the token itself, only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    /// Public handle: the first 12 hex digits of the hash.
    pub id: String,
    pub sha256: String,
    pub identity: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub revoked: bool,
}

/// A proxy that holds (or held) a certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProxyRecord {
    pub identity: String,
    pub inbound_addr: String,
    pub peer_addr: String,
    pub cert_serial: String,
    pub cert_not_after: u64,
    pub last_seen: u64,
    pub attestation: String,
    /// SHA-256 of the CA certificate that signed it (root rotation waits on it).
    #[serde(default)]
    pub issuer: String,
}

/// A stored policy resource (canonical JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyRecord {
    pub kind: String,
    /// `namespace/name`.
    pub key: String,
    /// The store revision that last changed it.
    pub revision: u64,
    pub json: String,
}

impl PolicyRecord {
    fn id(kind: &str, key: &str) -> String {
        format!("{kind}/{key}")
    }
}

/// An API key as stored: its SHA-256, never the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiKeyRecord {
    /// Unique name (what authorization rules match).
    pub name: String,
    pub principal: String,
    pub sha256: String,
    /// Only workloads in this namespace accept it; empty: any targeted workload.
    #[serde(default)]
    pub namespace: String,
    pub created_at: u64,
    /// 0: never expires.
    pub expires_at: u64,
    pub revoked: bool,
}

/// An OAuth client of the mesh's token service: its secret's SHA-256, never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OAuthClientRecord {
    pub client_id: String,
    pub name: String,
    pub secret_sha256: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub created_at: u64,
}

/// What applying one resource did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub record: PolicyRecord,
    /// "created", "updated" or "unchanged".
    pub change: &'static str,
    /// The JSON stored before, if any.
    pub previous: Option<String>,
}

/// What a token lookup found when it could not be used.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenRefusal {
    Unknown,
    Revoked(TokenRecord),
    Expired(TokenRecord),
    Exhausted(TokenRecord),
}

/// Persistent control-plane state. Implementations must make each call atomic.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// What other replicas change (a replicated store); `None`: only this process writes.
    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<etcd::Change>> {
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

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    tokens: BTreeMap<String, TokenRecord>,
    #[serde(default)]
    proxies: BTreeMap<String, ProxyRecord>,
    #[serde(default)]
    policies: BTreeMap<String, PolicyRecord>,
    #[serde(default)]
    policy_revision: u64,
    #[serde(default)]
    api_keys: BTreeMap<String, ApiKeyRecord>,
    #[serde(default)]
    oauth_clients: BTreeMap<String, OAuthClientRecord>,
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

/// The embedded file store (`<data-dir>/state.json`).
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    state: Mutex<State>,
}

impl FileStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path: path.clone(), source })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(Self { path, state: Mutex::new(state) })
    }

    /// Applies `f` to the state and persists it; on a write error the
    /// in-memory change is rolled back, so memory never runs ahead of disk.
    /// Changes the state and writes it (one serialisation, one atomic
    /// write); a failed write leaves the state as it was. It blocks on the
    /// disk: async callers run it with `spawn_blocking` (see [`blocking`]).
    fn mutate<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, StoreError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = guard.clone();
        let out = f(&mut guard);
        let bytes = serde_json::to_vec_pretty(&*guard).unwrap_or_default();
        if let Err(source) = palisade_certs::files::write_atomic(&self.path, &bytes, 0o600) {
            *guard = before;
            return Err(StoreError::Write { path: self.path.clone(), source });
        }
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Store for FileStore {
    fn policies(&self) -> (u64, Vec<PolicyRecord>) {
        self.read(|s| (s.policy_revision, s.policies.values().cloned().collect()))
    }

    fn policy_revision(&self) -> u64 {
        self.read(|s| s.policy_revision)
    }

    fn apply_policies(&self, resources: Vec<(String, String, String)>) -> Result<(u64, Vec<Applied>), StoreError> {
        let changed = self.read(|s| {
            resources
                .iter()
                .any(|(k, key, json)| s.policies.get(&PolicyRecord::id(k, key)).is_none_or(|p| &p.json != json))
        });
        let apply = |s: &mut State| {
            let revision = if changed { s.policy_revision + 1 } else { s.policy_revision };
            s.policy_revision = revision;
            (revision, put_policies(&mut s.policies, revision, resources))
        };
        if changed {
            self.mutate(apply)
        } else {
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            Ok(apply(&mut guard))
        }
    }

    fn delete_policy(&self, kind: &str, key: &str) -> Result<Option<u64>, StoreError> {
        let id = PolicyRecord::id(kind, key);
        if !self.read(|s| s.policies.contains_key(&id)) {
            return Ok(None);
        }
        self.mutate(|s| {
            s.policies.remove(&id);
            s.policy_revision += 1;
            Some(s.policy_revision)
        })
    }

    fn put_api_key(&self, k: ApiKeyRecord) -> Result<bool, StoreError> {
        if self.read(|s| s.api_keys.contains_key(&k.name)) {
            return Ok(false);
        }
        self.mutate(|s| s.api_keys.insert(k.name.clone(), k).is_none())
    }

    fn api_keys(&self) -> Vec<ApiKeyRecord> {
        self.read(|s| s.api_keys.values().cloned().collect())
    }

    fn revoke_api_key(&self, name: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        if !self.read(|s| s.api_keys.contains_key(name)) {
            return Ok(None);
        }
        self.mutate(|s| {
            s.api_keys.get_mut(name).map(|k| {
                k.revoked = true;
                k.clone()
            })
        })
    }

    fn put_oauth_client(&self, c: OAuthClientRecord) -> Result<bool, StoreError> {
        if self.read(|s| s.oauth_clients.values().any(|o| o.name == c.name)) {
            return Ok(false);
        }
        self.mutate(|s| s.oauth_clients.insert(c.client_id.clone(), c).is_none())
    }

    fn oauth_clients(&self) -> Vec<OAuthClientRecord> {
        self.read(|s| s.oauth_clients.values().cloned().collect())
    }

    fn delete_oauth_client(&self, client_id: &str) -> Result<Option<OAuthClientRecord>, StoreError> {
        if !self.read(|s| s.oauth_clients.contains_key(client_id)) {
            return Ok(None);
        }
        self.mutate(|s| s.oauth_clients.remove(client_id))
    }

    fn put_token(&self, t: TokenRecord) -> Result<(), StoreError> {
        self.mutate(|s| {
            s.tokens.insert(t.sha256.clone(), t);
        })
    }

    fn tokens(&self) -> Vec<TokenRecord> {
        self.read(|s| s.tokens.values().cloned().collect())
    }

    fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        if !self.read(|s| s.tokens.values().any(|t| t.id == id)) {
            return Ok(None);
        }
        self.mutate(|s| {
            s.tokens.values_mut().find(|t| t.id == id).map(|t| {
                t.revoked = true;
                t.clone()
            })
        })
    }

    fn consume_token(&self, sha256: &str, now: u64) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let check = self.read(|s| match s.tokens.get(sha256) {
            None => Err(TokenRefusal::Unknown),
            Some(t) if t.revoked => Err(TokenRefusal::Revoked(t.clone())),
            Some(t) if t.expires_at <= now => Err(TokenRefusal::Expired(t.clone())),
            Some(t) if t.uses_left == 0 => Err(TokenRefusal::Exhausted(t.clone())),
            Some(_) => Ok(()),
        });
        if let Err(r) = check {
            return Ok(Err(r));
        }
        // Check and decrement under one lock acquisition inside mutate.
        self.mutate(|s| match s.tokens.get_mut(sha256) {
            Some(t) if !t.revoked && t.expires_at > now && t.uses_left > 0 => {
                t.uses_left -= 1;
                Ok(t.clone())
            }
            Some(t) => Err(TokenRefusal::Exhausted(t.clone())),
            None => Err(TokenRefusal::Unknown),
        })
    }

    fn refund_token(&self, sha256: &str) -> Result<(), StoreError> {
        self.mutate(|s| {
            if let Some(t) = s.tokens.get_mut(sha256) {
                t.uses_left = (t.uses_left + 1).min(t.uses_total);
            }
        })
    }

    fn upsert_proxy(&self, p: ProxyRecord, replaces_serial: Option<&str>, take_over: bool) -> Result<bool, StoreError> {
        self.mutate(|s| {
            let before = touched(s.proxies.values(), &p);
            if let Some(old) = replaces_serial {
                s.proxies.remove(old);
            }
            if !p.inbound_addr.is_empty() {
                s.proxies.retain(|_, old| !replaced_by(old, &p, take_over));
            }
            s.proxies.insert(p.cert_serial.clone(), p.clone());
            before != touched(s.proxies.values(), &p)
        })
    }

    fn proxies(&self) -> Vec<ProxyRecord> {
        self.read(|s| s.proxies.values().cloned().collect())
    }

    fn prune(&self, cutoff: u64) -> Result<(), StoreError> {
        let stale = self.read(|s| {
            s.tokens.values().any(|t| t.expires_at < cutoff) || s.proxies.values().any(|p| p.cert_not_after < cutoff)
        });
        if !stale {
            return Ok(());
        }
        self.mutate(|s| {
            s.tokens.retain(|_, t| t.expires_at >= cutoff);
            s.proxies.retain(|_, p| p.cert_not_after >= cutoff);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_versioned_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let p = |json: &str| vec![("AuthorizationPolicy".to_string(), "shop/a".to_string(), json.to_string())];
        let (r1, a) = store.apply_policies(p("{\"v\":1}")).unwrap();
        assert_eq!((r1, a[0].change), (1, "created"));
        let (r2, a) = store.apply_policies(p("{\"v\":1}")).unwrap();
        assert_eq!((r2, a[0].change), (1, "unchanged"));
        let (r3, a) = store.apply_policies(p("{\"v\":2}")).unwrap();
        assert_eq!((r3, a[0].change, a[0].previous.as_deref()), (2, "updated", Some("{\"v\":1}")));
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(reopened.policies().0, 2);
        assert_eq!(reopened.delete_policy("AuthorizationPolicy", "shop/a").unwrap(), Some(3));
        assert_eq!(reopened.delete_policy("AuthorizationPolicy", "shop/a").unwrap(), None);
        assert!(FileStore::open(dir.path()).unwrap().policies().1.is_empty());
    }

    fn token(uses: u32) -> TokenRecord {
        TokenRecord {
            id: "abc".into(),
            sha256: "h".into(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            created_at: 0,
            expires_at: 100,
            uses_total: uses,
            uses_left: uses,
            revoked: false,
        }
    }

    #[test]
    fn tokens_are_consumed_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.put_token(token(1)).unwrap();
        assert!(store.consume_token("h", 10).unwrap().is_ok());
        assert!(matches!(store.consume_token("h", 10).unwrap(), Err(TokenRefusal::Exhausted(_))));
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(reopened.tokens()[0].uses_left, 0);
        assert!(matches!(reopened.consume_token("nope", 10).unwrap(), Err(TokenRefusal::Unknown)));
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.put_token(token(5)).unwrap();
        assert!(matches!(store.consume_token("h", 100).unwrap(), Err(TokenRefusal::Expired(_))));
        store.revoke_token("abc").unwrap().unwrap();
        assert!(matches!(store.consume_token("h", 10).unwrap(), Err(TokenRefusal::Revoked(_))));
    }

    #[test]
    fn api_keys_and_oauth_clients_are_unique_revocable_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let key = ApiKeyRecord {
            name: "ci".into(),
            principal: "team/ci".into(),
            sha256: "ab".into(),
            namespace: String::new(),
            created_at: 1,
            expires_at: 0,
            revoked: false,
        };
        assert!(store.put_api_key(key.clone()).unwrap());
        assert!(!store.put_api_key(key).unwrap(), "names are unique");
        assert!(store.revoke_api_key("ci").unwrap().unwrap().revoked);
        assert!(store.revoke_api_key("nope").unwrap().is_none());
        let client = OAuthClientRecord {
            client_id: "c1".into(),
            name: "billing".into(),
            secret_sha256: "cd".into(),
            scopes: vec!["a".into()],
            audiences: vec![],
            created_at: 1,
        };
        assert!(store.put_oauth_client(client.clone()).unwrap());
        assert!(!store.put_oauth_client(OAuthClientRecord { client_id: "c2".into(), ..client }).unwrap());
        let reopened = FileStore::open(dir.path()).unwrap();
        assert!(reopened.api_keys()[0].revoked);
        assert_eq!(reopened.oauth_clients().len(), 1);
        assert!(reopened.delete_oauth_client("c1").unwrap().is_some());
        assert!(reopened.oauth_clients().is_empty());
    }

    #[test]
    fn a_record_on_an_address_is_replaced_by_its_own_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let rec = |identity: &str, serial: &str| ProxyRecord {
            identity: identity.into(),
            inbound_addr: "127.0.0.1:4143".into(),
            peer_addr: String::new(),
            cert_serial: serial.into(),
            cert_not_after: 100,
            last_seen: 0,
            attestation: "token".into(),
            issuer: String::new(),
        };
        assert!(store.upsert_proxy(rec("orders", "o1"), None, false).unwrap(), "a new endpoint");
        // A restart of orders on its address: replaced, the directory unchanged.
        assert!(!store.upsert_proxy(rec("orders", "o2"), None, false).unwrap());
        // web at the same address never removes orders' record without a takeover.
        store.upsert_proxy(rec("web", "w1"), None, false).unwrap();
        let held: Vec<String> = store.proxies().into_iter().map(|p| p.cert_serial).collect();
        assert_eq!(held, ["o2", "w1"]);
        assert!(store.upsert_proxy(rec("web", "w2"), Some("w1"), true).unwrap());
        let held: Vec<String> = store.proxies().into_iter().map(|p| p.cert_serial).collect();
        assert_eq!(held, ["w2"]);
    }

    #[test]
    fn corrupt_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        let err = FileStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
