//! State behind a store trait: join tokens (hashed) and proxy records. The
//! default is an embedded file store: one JSON document in the data dir plus
//! a journal of the changes since, each synced before it is acknowledged, so
//! an accepted change survives a crash and a restart (see [`journal`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub mod etcd;
mod journal;
pub mod sealed;

use journal::{Journal, Line, Op, ProxyIndex, Record, Table};

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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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

/// The embedded file store: `<data-dir>/state.json`, and the changes since
/// in `<data-dir>/state.journal`.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    state: Mutex<State>,
    /// These two are locked only while holding `state`.
    journal: Mutex<Journal>,
    index: Mutex<ProxyIndex>,
}

impl FileStore {
    /// Opens (or creates) the store in `dir`: `state.json`, then the journal replayed over it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("state.json");
        let (mut state, size) = match std::fs::read(&path) {
            Ok(bytes) => (
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path: path.clone(), source })?,
                bytes.len() as u64,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), 0),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let journal = Journal::replay(dir.join("state.journal"), &mut state, size)?;
        let index = ProxyIndex::of(&state.proxies);
        Ok(Self { path, state: Mutex::new(state), journal: Mutex::new(journal), index: Mutex::new(index) })
    }

    /// Makes the change `plan` computes from the state (its ops, and what
    /// the call returns): the ops are appended to the journal and synced,
    /// then applied, so memory never runs ahead of disk and a failed write
    /// leaves the state as it was. No ops, no write. It blocks on the disk:
    /// async callers run it with `spawn_blocking` (see [`blocking`]).
    fn mutate<T>(&self, plan: impl FnOnce(&State) -> (Vec<Op>, T)) -> Result<T, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (ops, out) = plan(&state);
        if ops.is_empty() {
            return Ok(out);
        }
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let line = Line { ops };
        journal.append(&line)?;
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        for op in line.ops {
            index.follow(&state.proxies, &op);
            op.apply(&mut state);
        }
        journal.compact_if_due(&state, &self.path);
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn put(r: Record) -> Vec<Op> {
    vec![Op::Put(r)]
}

fn delete(table: Table, key: &str) -> Op {
    Op::Delete { table, key: key.to_string() }
}

impl Store for FileStore {
    fn policies(&self) -> (u64, Vec<PolicyRecord>) {
        self.read(|s| (s.policy_revision, s.policies.values().cloned().collect()))
    }

    fn policy_revision(&self) -> u64 {
        self.read(|s| s.policy_revision)
    }

    fn apply_policies(&self, resources: Vec<(String, String, String)>) -> Result<(u64, Vec<Applied>), StoreError> {
        self.mutate(|s| {
            // Applied to copies of the records named, not to the state.
            let revision = s.policy_revision + 1;
            let mut named: BTreeMap<String, PolicyRecord> = resources
                .iter()
                .map(|(kind, key, _)| PolicyRecord::id(kind, key))
                .filter_map(|id| s.policies.get(&id).map(|p| (id, p.clone())))
                .collect();
            let applied = put_policies(&mut named, revision, resources);
            if applied.iter().all(|a| a.change == "unchanged") {
                return (Vec::new(), (s.policy_revision, applied));
            }
            let mut ops: Vec<Op> = named
                .into_iter()
                .filter(|(id, p)| s.policies.get(id) != Some(p))
                .map(|(_, p)| Op::Put(Record::Policy(p)))
                .collect();
            ops.push(Op::PolicyRevision(revision));
            (ops, (revision, applied))
        })
    }

    fn delete_policy(&self, kind: &str, key: &str) -> Result<Option<u64>, StoreError> {
        let id = PolicyRecord::id(kind, key);
        self.mutate(|s| {
            if !s.policies.contains_key(&id) {
                return (Vec::new(), None);
            }
            let revision = s.policy_revision + 1;
            (vec![delete(Table::Policies, &id), Op::PolicyRevision(revision)], Some(revision))
        })
    }

    fn put_api_key(&self, k: ApiKeyRecord) -> Result<bool, StoreError> {
        self.mutate(
            |s| if s.api_keys.contains_key(&k.name) { (Vec::new(), false) } else { (put(Record::ApiKey(k)), true) },
        )
    }

    fn api_keys(&self) -> Vec<ApiKeyRecord> {
        self.read(|s| s.api_keys.values().cloned().collect())
    }

    fn revoke_api_key(&self, name: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.mutate(|s| match s.api_keys.get(name) {
            None => (Vec::new(), None),
            Some(k) => {
                let k = ApiKeyRecord { revoked: true, ..k.clone() };
                (put(Record::ApiKey(k.clone())), Some(k))
            }
        })
    }

    fn put_oauth_client(&self, c: OAuthClientRecord) -> Result<bool, StoreError> {
        self.mutate(|s| {
            if s.oauth_clients.values().any(|o| o.name == c.name) {
                return (Vec::new(), false);
            }
            let new = !s.oauth_clients.contains_key(&c.client_id);
            (put(Record::OAuthClient(c)), new)
        })
    }

    fn oauth_clients(&self) -> Vec<OAuthClientRecord> {
        self.read(|s| s.oauth_clients.values().cloned().collect())
    }

    fn delete_oauth_client(&self, client_id: &str) -> Result<Option<OAuthClientRecord>, StoreError> {
        self.mutate(|s| match s.oauth_clients.get(client_id) {
            None => (Vec::new(), None),
            Some(c) => (vec![delete(Table::OAuthClients, client_id)], Some(c.clone())),
        })
    }

    fn put_token(&self, t: TokenRecord) -> Result<(), StoreError> {
        self.mutate(|_| (put(Record::Token(t)), ()))
    }

    fn tokens(&self) -> Vec<TokenRecord> {
        self.read(|s| s.tokens.values().cloned().collect())
    }

    fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.mutate(|s| match s.tokens.values().find(|t| t.id == id) {
            None => (Vec::new(), None),
            Some(t) => {
                let t = TokenRecord { revoked: true, ..t.clone() };
                (put(Record::Token(t.clone())), Some(t))
            }
        })
    }

    fn consume_token(&self, sha256: &str, now: u64) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        // Checked and taken under one lock.
        self.mutate(|s| match s.tokens.get(sha256) {
            None => (Vec::new(), Err(TokenRefusal::Unknown)),
            Some(t) if t.revoked => (Vec::new(), Err(TokenRefusal::Revoked(t.clone()))),
            Some(t) if t.expires_at <= now => (Vec::new(), Err(TokenRefusal::Expired(t.clone()))),
            Some(t) if t.uses_left == 0 => (Vec::new(), Err(TokenRefusal::Exhausted(t.clone()))),
            Some(t) => {
                let t = TokenRecord { uses_left: t.uses_left - 1, ..t.clone() };
                (put(Record::Token(t.clone())), Ok(t))
            }
        })
    }

    fn refund_token(&self, sha256: &str) -> Result<(), StoreError> {
        self.mutate(|s| match s.tokens.get(sha256) {
            Some(t) if (t.uses_left + 1).min(t.uses_total) != t.uses_left => {
                (put(Record::Token(TokenRecord { uses_left: (t.uses_left + 1).min(t.uses_total), ..t.clone() })), ())
            }
            _ => (Vec::new(), ()),
        })
    }

    fn upsert_proxy(&self, p: ProxyRecord, replaces_serial: Option<&str>, take_over: bool) -> Result<bool, StoreError> {
        self.mutate(|s| {
            // Only records of p's identity or at p's address matter to
            // `touched` and `replaced_by`: found by the index, not a scan.
            let near = self.index.lock().unwrap_or_else(|e| e.into_inner()).near(&s.proxies, &p);
            let before = touched(near.iter().map(|(_, o)| *o), &p);
            let mut gone: BTreeSet<&str> =
                near.iter().filter(|(_, o)| replaced_by(o, &p, take_over)).map(|(k, _)| k.as_str()).collect();
            gone.extend(replaces_serial.filter(|k| s.proxies.contains_key(*k)));
            // p itself goes under its serial, replacing what is there.
            gone.remove(p.cert_serial.as_str());
            let kept = near.iter().filter(|(k, _)| !gone.contains(k.as_str()) && **k != p.cert_serial);
            let changed = before != touched(kept.map(|(_, o)| *o).chain([&p]), &p);
            let mut ops: Vec<Op> = gone.into_iter().map(|k| delete(Table::Proxies, k)).collect();
            ops.push(Op::Put(Record::Proxy(p)));
            (ops, changed)
        })
    }

    fn proxies(&self) -> Vec<ProxyRecord> {
        self.read(|s| s.proxies.values().cloned().collect())
    }

    fn visit_proxies(&self, f: &mut dyn FnMut(&ProxyRecord)) {
        self.read(|s| s.proxies.values().for_each(f))
    }

    fn proxies_near(&self, identity: &str, addr: &str, serial: Option<&str>) -> Vec<ProxyRecord> {
        let probe = ProxyRecord { identity: identity.into(), inbound_addr: addr.into(), ..Default::default() };
        self.read(|s| {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let mut near: Vec<ProxyRecord> =
                index.near(&s.proxies, &probe).into_iter().map(|(_, p)| p.clone()).collect();
            if let Some(p) =
                serial.and_then(|k| s.proxies.get(k)).filter(|p| !near.iter().any(|n| n.cert_serial == p.cert_serial))
            {
                near.push(p.clone());
            }
            near
        })
    }

    fn prune(&self, cutoff: u64) -> Result<(), StoreError> {
        self.mutate(|s| {
            let tokens = s.tokens.iter().filter(|(_, t)| t.expires_at < cutoff).map(|(k, _)| delete(Table::Tokens, k));
            let proxies =
                s.proxies.iter().filter(|(_, p)| p.cert_not_after < cutoff).map(|(k, _)| delete(Table::Proxies, k));
            (tokens.chain(proxies).collect(), ())
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
    fn a_claim_is_checked_against_its_identity_and_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let rec = |identity: &str, addr: &str, serial: &str| ProxyRecord {
            identity: identity.into(),
            inbound_addr: addr.into(),
            cert_serial: serial.into(),
            cert_not_after: 100,
            ..Default::default()
        };
        for (id, addr, serial) in [("a", "10.0.0.1:1", "a1"), ("a", "10.0.0.2:1", "a2"), ("b", "10.0.0.3:1", "b1")] {
            store.upsert_proxy(rec(id, addr, serial), None, false).unwrap();
        }
        store.upsert_proxy(rec("c", "", "c1"), None, false).unwrap();
        let serials = |v: Vec<ProxyRecord>| {
            let mut s: Vec<String> = v.into_iter().map(|p| p.cert_serial).collect();
            s.sort();
            s
        };
        assert_eq!(serials(store.proxies_near("a", "10.0.0.3:1", None)), ["a1", "a2", "b1"]);
        assert_eq!(serials(store.proxies_near("z", "", Some("c1"))), ["c1"]);
        assert!(store.proxies_near("z", "10.9.9.9:1", None).is_empty());
        // The trait's default (other stores) agrees.
        let all = store.proxies();
        let default: Vec<ProxyRecord> =
            all.into_iter().filter(|p| p.identity == "a" || p.inbound_addr == "10.0.0.3:1").collect();
        assert_eq!(serials(default), ["a1", "a2", "b1"]);
    }

    #[test]
    fn corrupt_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        let err = FileStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
