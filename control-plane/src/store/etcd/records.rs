//! The [`Store`] calls on etcd: reads from the cache, writes as
//! compare-and-swap transactions.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp};

use super::cache::PolicyDoc;
use super::{ATTEMPTS, Change, EtcdStore, TXN_OPS, etcd_err};
use crate::store::{
    ApiKeyRecord, Applied, OAuthClientRecord, PolicyRecord, ProxyRecord, Store, StoreError, TokenRecord, TokenRefusal,
    put_policies, replaced_by, touched,
};

impl Store for EtcdStore {
    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
    }

    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.leader.subscribe())
    }

    fn publish_streams(&self, records: BTreeMap<String, Vec<u8>>) {
        *self.presence.lock().unwrap_or_else(|p| p.into_inner()) = records;
    }

    fn remote_streams(&self) -> Vec<Vec<u8>> {
        let ours = format!("{}streams/{}/", self.prefix, self.replica);
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.streams.iter().filter(|(k, _)| !k.starts_with(&ours)).map(|(_, v)| v.clone()).collect()
    }

    fn policies(&self) -> (u64, Vec<PolicyRecord>) {
        self.read(|s| (s.policy_revision, s.policies.values().cloned().collect()))
    }

    fn policy_revision(&self) -> u64 {
        self.read(|s| s.policy_revision)
    }

    fn apply_policies(&self, resources: Vec<(String, String, String)>) -> Result<(u64, Vec<Applied>), StoreError> {
        let key = self.policies_key();
        // What this apply saw each resource as when it began: another
        // replica changing one of them meanwhile is a conflict.
        let seen: Vec<Option<String>> = self.read(|s| {
            resources.iter().map(|(k, n, _)| s.policies.get(&PolicyRecord::id(k, n)).map(|p| p.json.clone())).collect()
        });
        for attempt in 0..ATTEMPTS {
            let rev = if attempt == 0 { self.rev(&key) } else { self.refresh(&key)? };
            let mut state = self.read(|s| PolicyDoc { revision: s.policy_revision, policies: s.policies.clone() });
            for ((kind, name, _), before) in resources.iter().zip(&seen) {
                let now = state.policies.get(&PolicyRecord::id(kind, name)).map(|p| &p.json);
                if now != before.as_ref() {
                    return Err(StoreError::Conflict {
                        what: format!(
                            "{kind} {name} was changed by another apply (now at revision {}) while this one ran: review it (policy get) and apply again",
                            state.revision
                        ),
                    });
                }
            }
            let changed = resources
                .iter()
                .any(|(k, n, json)| state.policies.get(&PolicyRecord::id(k, n)).is_none_or(|p| &p.json != json));
            let revision = if changed { state.revision + 1 } else { state.revision };
            let out = put_policies(&mut state.policies, revision, resources.clone());
            if !changed {
                return Ok((revision, out));
            }
            state.revision = revision;
            let doc = serde_json::to_vec(&state).map_err(etcd_err)?;
            if self.txn(
                vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)],
                vec![(key.clone(), doc)],
                vec![],
            )? {
                return Ok((revision, out));
            }
        }
        Err(StoreError::Conflict { what: "the policies kept changing under this replica; apply again".into() })
    }

    fn delete_policy(&self, kind: &str, name: &str) -> Result<Option<u64>, StoreError> {
        let id = PolicyRecord::id(kind, name);
        self.cas(
            &self.policies_key(),
            |s| Some(PolicyDoc { revision: s.policy_revision, policies: s.policies.clone() }),
            |doc| {
                let mut doc = doc.unwrap_or_default();
                if doc.policies.remove(&id).is_none() {
                    return (None, None);
                }
                doc.revision += 1;
                let r = doc.revision;
                (Some(doc), Some(r))
            },
        )
    }

    fn put_api_key(&self, k: ApiKeyRecord) -> Result<bool, StoreError> {
        let key = self.key("apikeys", &k.name);
        let json = serde_json::to_vec(&k).map_err(etcd_err)?;
        self.txn(vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)], vec![(key, json)], vec![])
    }

    fn api_keys(&self) -> Vec<ApiKeyRecord> {
        self.read(|s| s.api_keys.values().cloned().collect())
    }

    fn revoke_api_key(&self, name: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let n = name.to_string();
        self.cas(
            &self.key("apikeys", name),
            move |s| s.api_keys.get(&n).cloned(),
            |k| match k {
                Some(mut k) => {
                    k.revoked = true;
                    (Some(k.clone()), Some(k))
                }
                None => (None, None),
            },
        )
    }

    fn put_oauth_client(&self, c: OAuthClientRecord) -> Result<bool, StoreError> {
        // Names are unique: a name key is created with the client, in one transaction.
        let name_key = self.key("oauth-names", &c.name);
        let key = self.key("oauth", &c.client_id);
        let json = serde_json::to_vec(&c).map_err(etcd_err)?;
        self.txn(
            vec![Compare::create_revision(name_key.as_str(), CompareOp::Equal, 0)],
            vec![(name_key, c.client_id.clone().into_bytes()), (key, json)],
            vec![],
        )
    }

    fn oauth_clients(&self) -> Vec<OAuthClientRecord> {
        self.read(|s| s.oauth_clients.values().cloned().collect())
    }

    fn delete_oauth_client(&self, client_id: &str) -> Result<Option<OAuthClientRecord>, StoreError> {
        let Some(c) = self.read(|s| s.oauth_clients.get(client_id).cloned()) else { return Ok(None) };
        let deleted = self.txn(vec![], vec![], vec![self.key("oauth", client_id), self.key("oauth-names", &c.name)])?;
        Ok(deleted.then_some(c))
    }

    fn put_token(&self, t: TokenRecord) -> Result<(), StoreError> {
        let key = self.key("tokens", &t.sha256);
        let json = serde_json::to_vec(&t).map_err(etcd_err)?;
        self.txn(vec![], vec![(key, json)], vec![]).map(|_| ())
    }

    fn tokens(&self) -> Vec<TokenRecord> {
        self.read(|s| s.tokens.values().cloned().collect())
    }

    fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let Some(sha) = self.read(|s| s.tokens.values().find(|t| t.id == id).map(|t| t.sha256.clone())) else {
            return Ok(None);
        };
        let s2 = sha.clone();
        self.cas(
            &self.key("tokens", &sha),
            move |s| s.tokens.get(&s2).cloned(),
            |t| match t {
                Some(mut t) => {
                    t.revoked = true;
                    (Some(t.clone()), Some(t))
                }
                None => (None, None),
            },
        )
    }

    fn consume_token(&self, sha256: &str, now: u64) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let key = self.key("tokens", sha256);
        // Always the freshest: another replica may have just taken the last use.
        self.refresh(&key)?;
        let sha = sha256.to_string();
        self.cas(
            &key,
            move |s| s.tokens.get(&sha).cloned(),
            |t| match t {
                None => (None, Err(TokenRefusal::Unknown)),
                Some(t) if t.revoked => (None, Err(TokenRefusal::Revoked(t))),
                Some(t) if t.expires_at <= now => (None, Err(TokenRefusal::Expired(t))),
                Some(t) if t.uses_left == 0 => (None, Err(TokenRefusal::Exhausted(t))),
                Some(mut t) => {
                    t.uses_left -= 1;
                    (Some(t.clone()), Ok(t))
                }
            },
        )
    }

    fn refund_token(&self, sha256: &str) -> Result<(), StoreError> {
        let sha = sha256.to_string();
        self.cas(
            &self.key("tokens", sha256),
            move |s| s.tokens.get(&sha).cloned(),
            |t| match t {
                Some(mut t) => {
                    t.uses_left = (t.uses_left + 1).min(t.uses_total);
                    (Some(t), ())
                }
                None => (None, ()),
            },
        )
    }

    fn upsert_proxy(&self, p: ProxyRecord, replaces_serial: Option<&str>, take_over: bool) -> Result<bool, StoreError> {
        let (moved, stale) = self.read(|s| {
            // The record this renewal supersedes, and those `p` replaces at its address.
            let stale: Vec<String> = s
                .proxies
                .iter()
                .filter(|(serial, old)| Some(serial.as_str()) == replaces_serial || replaced_by(old, &p, take_over))
                .map(|(serial, _)| serial.clone())
                .filter(|serial| *serial != p.cert_serial)
                .collect();
            let before = touched(s.proxies.values(), &p);
            let kept = s.proxies.iter().filter(|(k, _)| !stale.contains(k)).map(|(_, v)| v);
            let after = touched(kept.chain(std::iter::once(&p)), &p);
            (before != after, stale)
        });
        let json = serde_json::to_vec(&p).map_err(etcd_err)?;
        let deletes = stale.iter().take(TXN_OPS).map(|serial| self.key("proxies", serial)).collect();
        self.txn(vec![], vec![(self.key("proxies", &p.cert_serial), json)], deletes)?;
        Ok(moved)
    }

    fn proxies(&self) -> Vec<ProxyRecord> {
        self.read(|s| s.proxies.values().cloned().collect())
    }

    fn visit_proxies(&self, f: &mut dyn FnMut(&ProxyRecord)) {
        self.read(|s| s.proxies.values().for_each(f))
    }

    fn prune(&self, cutoff: u64) -> Result<(), StoreError> {
        let stale: Vec<String> = self.read(|s| {
            s.tokens
                .iter()
                .filter(|(_, t)| t.expires_at < cutoff)
                .map(|(k, _)| self.key("tokens", k))
                .chain(s.proxies.iter().filter(|(_, p)| p.cert_not_after < cutoff).map(|(k, _)| self.key("proxies", k)))
                .collect()
        });
        for chunk in stale.chunks(TXN_OPS) {
            self.txn(vec![], vec![], chunk.to_vec())?;
        }
        Ok(())
    }
}
