//! The embedded file store: one JSON document in the data dir plus a
//! journal of the changes since, each synced before it is acknowledged, so
//! an accepted change survives a crash and a restart (see [`super::journal`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::journal::{Journal, Line, Op, ProxyIndex, Record, Table};
use super::{
    ApiKeyRecord, Applied, OAuthClientRecord, PolicyRecord, ProxyRecord, State, Store, StoreError, TokenRecord,
    TokenRefusal, put_policies, replaced_by, touched,
};

/// The embedded file store: `<data-dir>/state.json`, and the changes since
/// in `<data-dir>/state.journal`.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    pub(super) state: Mutex<State>,
    /// These two are locked only while holding `state`.
    journal: Mutex<Journal>,
    pub(super) index: Mutex<ProxyIndex>,
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
        let key = ApiKeyRecord::sample("ci");
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
