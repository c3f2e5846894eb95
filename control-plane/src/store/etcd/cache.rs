//! The cache every read is served from, and the watch that keeps it
//! current and tells this replica what the others changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use super::{Change, State, StoreError, timed};
use crate::store::PolicyRecord;

/// The top-level keys that are neither state records nor secrets.
const BOOKKEEPING: [&str; 3] = ["policies", "leader", "migrated-from"];

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct PolicyDoc {
    pub(super) revision: u64,
    pub(super) policies: BTreeMap<String, PolicyRecord>,
}

#[derive(Debug, Default)]
pub(super) struct Cache {
    pub(super) state: State,
    /// Mod revision of each key, by full key.
    pub(super) revs: HashMap<String, i64>,
    /// Other replicas' stream records, by full key.
    pub(super) streams: BTreeMap<String, Vec<u8>>,
}

/// Loads every key under the prefix into the cache; the revision read at.
pub(super) async fn load(client: &Client, prefix: &str, cache: &Mutex<Cache>) -> Result<i64, StoreError> {
    let mut kv = client.kv_client();
    let resp = timed(kv.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    *c = Cache::default();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).to_string();
        apply(&mut c, prefix, &key, Some(kv.value()), kv.mod_revision());
    }
    Ok(revision)
}

/// [`apply`], unless the cache already holds a later revision of the key: a
/// write's own answer or a read can arrive after the watch brought a newer
/// value, and must not undo it (the watch never sends that value again).
pub(super) fn apply_unless_older(
    c: &mut Cache,
    prefix: &str,
    key: &str,
    value: Option<&[u8]>,
    revision: i64,
) -> Option<Change> {
    if c.revs.get(key).is_some_and(|have| *have > revision) {
        return None;
    }
    apply(c, prefix, key, value, revision)
}

/// Puts one key's value (or its deletion) into the cache; what kind of change it was.
pub(super) fn apply(c: &mut Cache, prefix: &str, key: &str, value: Option<&[u8]>, revision: i64) -> Option<Change> {
    let rest = key.strip_prefix(prefix)?;
    let (section, id) = rest.split_once('/').unwrap_or((rest, ""));
    fn set<T: for<'de> Deserialize<'de>>(map: &mut BTreeMap<String, T>, id: &str, value: Option<&[u8]>) {
        match value.map(serde_json::from_slice::<T>) {
            Some(Ok(v)) => {
                map.insert(id.to_string(), v);
            }
            Some(Err(e)) => tracing::warn!(key = %id, error = %e, "unreadable record in etcd; ignored"),
            None => {
                map.remove(id);
            }
        }
    }
    let change = match section {
        "policies" => {
            let doc: PolicyDoc = value.and_then(|v| serde_json::from_slice(v).ok()).unwrap_or_default();
            c.state.policy_revision = doc.revision;
            c.state.policies = doc.policies;
            Change::Policies
        }
        "tokens" => {
            set(&mut c.state.tokens, id, value);
            Change::Tokens
        }
        "proxies" => {
            set(&mut c.state.proxies, id, value);
            Change::Endpoints
        }
        "apikeys" => {
            set(&mut c.state.api_keys, id, value);
            Change::Credentials
        }
        "oauth" => {
            set(&mut c.state.oauth_clients, id, value);
            Change::Credentials
        }
        // A sealed secret at the top (`ca`, `oauth-keys`): its holder reads it again.
        s if id.is_empty() && !rest.contains('/') && !BOOKKEEPING.contains(&s) => {
            return Some(Change::Secret(s.to_string()));
        }
        "streams" => {
            match value {
                Some(v) => c.streams.insert(key.to_string(), v.to_vec()),
                None => c.streams.remove(key),
            };
            return Some(Change::Streams);
        }
        _ => return None,
    };
    if value.is_some() {
        c.revs.insert(key.to_string(), revision);
    } else {
        c.revs.remove(key);
    }
    Some(change)
}

/// Keeps the cache current and tells this replica what changed; after a
/// lost watch (etcd restarted, history compacted) it loads everything again.
pub(super) async fn watch(
    client: Client,
    prefix: String,
    cache: Arc<Mutex<Cache>>,
    changes: tokio::sync::broadcast::Sender<Change>,
    mut revision: i64,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut w = client.watch_client();
        match w.watch(prefix.as_str(), Some(opts)).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(200);
                while let Ok(Some(resp)) = stream.message().await {
                    if resp.compact_revision() > 0 || resp.canceled() {
                        break;
                    }
                    let mut seen = Vec::new();
                    {
                        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key()).to_string();
                            let value = (ev.event_type() == etcd_client::EventType::Put).then(|| kv.value());
                            revision = revision.max(kv.mod_revision());
                            // A write of ours already in the cache is not news, and an
                            // event older than what the cache holds (our later write got
                            // there first) must not undo it.
                            if c.revs.get(&key).is_some_and(|have| *have >= kv.mod_revision()) {
                                continue;
                            }
                            if value.is_none() && !c.revs.contains_key(&key) && !c.streams.contains_key(&key) {
                                continue;
                            }
                            seen.extend(apply(&mut c, &prefix, &key, value, kv.mod_revision()));
                        }
                    }
                    seen.sort();
                    seen.dedup();
                    for c in seen {
                        let _ = changes.send(c);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "etcd watch failed; this replica may miss changes other replicas make until it is back")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        // Whatever happened meanwhile: read it all again.
        match load(&client, &prefix, &cache).await {
            Ok(r) => {
                revision = r;
                for c in [Change::Policies, Change::Credentials, Change::Endpoints, Change::Tokens] {
                    let _ = changes.send(c);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload the store from etcd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(revision: u64) -> Vec<u8> {
        serde_json::to_vec(&PolicyDoc { revision, policies: BTreeMap::new() }).unwrap()
    }

    #[test]
    fn a_late_answer_or_read_never_takes_the_cache_back() {
        let mut c = Cache::default();
        let key = "/p/policies";
        // The watch brought revision 7 before this replica's own write at 5 answered.
        apply(&mut c, "/p/", key, Some(&doc(3)), 7);
        assert_eq!(apply_unless_older(&mut c, "/p/", key, Some(&doc(2)), 5), None);
        assert_eq!((c.state.policy_revision, c.revs[key]), (3, 7), "the newer value stays");
        assert!(apply_unless_older(&mut c, "/p/", key, Some(&doc(4)), 8).is_some());
        assert_eq!((c.state.policy_revision, c.revs[key]), (4, 8));
        // A read that found the key gone at an older revision changes nothing either.
        assert_eq!(apply_unless_older(&mut c, "/p/", key, None, 6), None);
        assert_eq!(c.revs[key], 8);
    }
}
