//! `--migrate-from`: a single-node install's state moved into an empty etcd prefix.

use std::path::Path;

use etcd_client::{Compare, CompareOp, GetOptions};
use serde::Serialize;

use super::cache::PolicyDoc;
use super::{EtcdSecrets, EtcdStore, TXN_OPS, etcd_err, timed};
use crate::store::sealed::{SecretHome, SecretWrite};
use crate::store::{FileStore, StoreError};

impl EtcdStore {
    /// Imports a single-node install's records (`DIR/state.json` and its
    /// journal) into an empty prefix, so it can grow into replicas; then
    /// `secrets` (name, plain bytes) sealed, as [`super::EtcdSecrets`]
    /// keeps them (the CA's, which the CA module reads from the install).
    /// Refuses a prefix that holds state. What it imported, for the log.
    pub fn import(&self, dir: &Path, secrets: &EtcdSecrets, sealed: Vec<SecretWrite>) -> Result<String, StoreError> {
        let marker = format!("{}migrated-from", self.prefix);
        let (client, prefix) = (self.client.clone(), self.prefix.clone());
        let p = prefix.clone();
        let existing = self.run(async move {
            let mut kv = client.kv_client();
            timed(kv.get(p, Some(GetOptions::new().with_prefix().with_keys_only()))).await
        })?;
        // The replicas' own bookkeeping (the lead, their sidecars) is not state.
        let state_keys = existing
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.strip_prefix(prefix.as_str()).map(str::to_string))
            .filter(|k| k != "leader" && !k.starts_with("streams/"))
            .count();
        if state_keys > 0 {
            return Err(StoreError::Conflict {
                what: format!(
                    "--migrate-from: etcd already holds {state_keys} keys of state under {}: the state was migrated (or this mesh started on etcd); start without --migrate-from",
                    self.prefix
                ),
            });
        }
        let file = FileStore::open(dir)?;
        let state = file.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Claim the prefix first: two replicas started with --migrate-from cannot both import.
        let claimed = self.txn(
            vec![Compare::create_revision(marker.as_str(), CompareOp::Equal, 0)],
            vec![(marker.clone(), dir.display().to_string().into_bytes())],
            vec![],
        )?;
        if !claimed {
            return Err(StoreError::Conflict { what: "--migrate-from: another replica is importing".into() });
        }
        fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
            serde_json::to_vec(v).map_err(etcd_err)
        }
        let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
        let doc = PolicyDoc { revision: state.policy_revision, policies: state.policies.clone() };
        puts.push((self.policies_key(), serde_json::to_vec(&doc).map_err(etcd_err)?));
        for (sha, t) in &state.tokens {
            puts.push((self.key("tokens", sha), json(t)?));
        }
        for (serial, p) in &state.proxies {
            puts.push((self.key("proxies", serial), json(p)?));
        }
        for (name, k) in &state.api_keys {
            puts.push((self.key("apikeys", name), json(k)?));
        }
        for (id, c) in &state.oauth_clients {
            puts.push((self.key("oauth", id), json(c)?));
            puts.push((self.key("oauth-names", &c.name), id.clone().into_bytes()));
        }
        for chunk in puts.chunks(TXN_OPS) {
            self.txn(vec![], chunk.to_vec(), vec![])?;
        }
        let secrets_imported = sealed.len();
        if !sealed.is_empty() && !secrets.put(None, sealed).map_err(|e| etcd_err(e.to_string()))? {
            return Err(StoreError::Conflict { what: "--migrate-from: the secrets changed meanwhile".into() });
        }
        use palisade_cmd::plural;
        Ok(format!(
            "imported {}: {} (revision {}), {}, {}, {}, {}, {}",
            dir.display(),
            plural(state.policies.len(), "policy", "policies"),
            state.policy_revision,
            plural(state.tokens.len(), "join token", "join tokens"),
            plural(state.proxies.len(), "proxy", "proxies"),
            plural(state.api_keys.len(), "API key", "API keys"),
            plural(state.oauth_clients.len(), "OAuth client", "OAuth clients"),
            plural(secrets_imported, "sealed secret", "sealed secrets"),
        ))
    }
}
