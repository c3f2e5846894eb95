//! The file store's journal (`<data-dir>/state.journal`, mode 0600): the
//! changes since `state.json` was written, one JSON line each, appended and
//! synced before the change reaches memory. A change costs its own size,
//! not the state's; once the journal outgrows `state.json`, compaction
//! writes the whole state there and empties the journal. Ops are absolute
//! (put, delete, set), so replaying lines that a compaction already wrote
//! into `state.json` (a crash before the journal was emptied) changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ApiKeyRecord, OAuthClientRecord, PolicyRecord, ProxyRecord, State, StoreError, TokenRecord};

/// The journal may grow to this (or to the size of `state.json`, if larger)
/// before a compaction.
const COMPACT_MIN: u64 = 4 << 20;

/// A whole record, put under the key its map keeps it by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Record {
    Token(TokenRecord),
    Proxy(ProxyRecord),
    Policy(PolicyRecord),
    ApiKey(ApiKeyRecord),
    OAuthClient(OAuthClientRecord),
}

/// One of the state's maps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Table {
    Tokens,
    Proxies,
    Policies,
    ApiKeys,
    OAuthClients,
}

/// One absolute change to the state: applying it again changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Op {
    Put(Record),
    Delete { table: Table, key: String },
    PolicyRevision(u64),
}

impl Op {
    pub(super) fn apply(self, s: &mut State) {
        match self {
            Op::Put(Record::Token(t)) => {
                s.tokens.insert(t.sha256.clone(), t);
            }
            Op::Put(Record::Proxy(p)) => {
                s.proxies.insert(p.cert_serial.clone(), p);
            }
            Op::Put(Record::Policy(p)) => {
                s.policies.insert(PolicyRecord::id(&p.kind, &p.key), p);
            }
            Op::Put(Record::ApiKey(k)) => {
                s.api_keys.insert(k.name.clone(), k);
            }
            Op::Put(Record::OAuthClient(c)) => {
                s.oauth_clients.insert(c.client_id.clone(), c);
            }
            Op::Delete { table: Table::Tokens, key } => {
                s.tokens.remove(&key);
            }
            Op::Delete { table: Table::Proxies, key } => {
                s.proxies.remove(&key);
            }
            Op::Delete { table: Table::Policies, key } => {
                s.policies.remove(&key);
            }
            Op::Delete { table: Table::ApiKeys, key } => {
                s.api_keys.remove(&key);
            }
            Op::Delete { table: Table::OAuthClients, key } => {
                s.oauth_clients.remove(&key);
            }
            Op::PolicyRevision(r) => s.policy_revision = r,
        }
    }
}

/// `state.proxies`' keys by identity and by inbound address, so an upsert
/// finds the records it can replace without reading them all. Never stored:
/// built on open, then kept in step with each op.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ProxyIndex {
    by_identity: BTreeMap<String, BTreeSet<String>>,
    by_addr: BTreeMap<String, BTreeSet<String>>,
}

impl ProxyIndex {
    pub(super) fn of(proxies: &BTreeMap<String, ProxyRecord>) -> Self {
        let mut index = Self::default();
        proxies.iter().for_each(|(key, p)| index.add(key, p));
        index
    }

    /// The records of `p`'s identity or at its address: all that an upsert
    /// of `p` can replace or change.
    pub(super) fn near<'a>(
        &self,
        proxies: &'a BTreeMap<String, ProxyRecord>,
        p: &ProxyRecord,
    ) -> Vec<(&'a String, &'a ProxyRecord)> {
        let at_addr = if p.inbound_addr.is_empty() { None } else { self.by_addr.get(&p.inbound_addr) };
        let keys: BTreeSet<&String> = self.by_identity.get(&p.identity).into_iter().chain(at_addr).flatten().collect();
        keys.into_iter().filter_map(|key| proxies.get_key_value(key)).collect()
    }

    /// Follows `op`, before it is applied to `proxies`.
    pub(super) fn follow(&mut self, proxies: &BTreeMap<String, ProxyRecord>, op: &Op) {
        let key = match op {
            Op::Put(Record::Proxy(p)) => &p.cert_serial,
            Op::Delete { table: Table::Proxies, key } => key,
            _ => return,
        };
        if let Some(old) = proxies.get(key) {
            self.remove(key, old);
        }
        if let Op::Put(Record::Proxy(p)) = op {
            self.add(key, p);
        }
    }

    fn add(&mut self, key: &str, p: &ProxyRecord) {
        self.by_identity.entry(p.identity.clone()).or_default().insert(key.to_string());
        self.by_addr.entry(p.inbound_addr.clone()).or_default().insert(key.to_string());
    }

    fn remove(&mut self, key: &str, p: &ProxyRecord) {
        for (map, field) in [(&mut self.by_identity, &p.identity), (&mut self.by_addr, &p.inbound_addr)] {
            if let Some(keys) = map.get_mut(field) {
                keys.remove(key);
                if keys.is_empty() {
                    map.remove(field);
                }
            }
        }
    }
}

/// One journal line: the ops of one change, applied together.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Line {
    pub(super) ops: Vec<Op>,
}

/// The open journal. Only the store's mutations touch it, under its lock.
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    /// Opened on the first append: opening a store writes nothing.
    file: Option<File>,
    /// The length of the whole lines, where the next one goes.
    len: u64,
    /// The file may hold bytes past `len` (a torn or failed append): they
    /// are cut before the next append, which must not follow them.
    trim: bool,
    /// The size of `state.json` when last read or written.
    base: u64,
    /// Compact once the journal is longer.
    compact_at: u64,
}

impl Journal {
    /// Applies the journal at `path` to `state` (read from a `state.json`
    /// of `base` bytes). A torn last line, a crash while it was appended
    /// (so never acknowledged), is dropped and cut away; a bad line before
    /// the last is corruption.
    pub(super) fn replay(path: PathBuf, state: &mut State, base: u64) -> Result<Self, StoreError> {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let mut len = 0;
        let mut torn = false;
        let mut lines = bytes.split_inclusive(|&b| b == b'\n').enumerate().peekable();
        while let Some((n, raw)) = lines.next() {
            match serde_json::from_slice::<Line>(raw) {
                Ok(line) if raw.ends_with(b"\n") => line.ops.into_iter().for_each(|op| op.apply(state)),
                Err(e) if lines.peek().is_some() => {
                    let source = <serde_json::Error as serde::de::Error>::custom(format_args!("line {}: {e}", n + 1));
                    return Err(StoreError::Corrupt { path, source });
                }
                _ => {
                    tracing::warn!(path = %path.display(), line = n + 1, bytes = raw.len(), "dropping the torn last line of the store's journal (a crash while it was written; that change was never acknowledged)");
                    torn = true;
                    break;
                }
            }
            len += raw.len() as u64;
        }
        let mut journal = Self { path, file: None, len, trim: torn, base, compact_at: base.max(COMPACT_MIN) };
        if torn && let Err(e) = journal.cut() {
            tracing::warn!(path = %journal.path.display(), error = %e, "cannot cut the torn line off the store's journal yet; the next change will");
        }
        Ok(journal)
    }

    /// Appends `line` and syncs it. On an error the journal holds what it
    /// held before (or is cut back to it before the next append).
    pub(super) fn append(&mut self, line: &Line) -> Result<(), StoreError> {
        let written = serde_json::to_vec(line).map_err(io::Error::other).and_then(|mut buf| {
            buf.push(b'\n');
            self.write_at_end(&buf).map(|()| buf.len() as u64)
        });
        match written {
            Ok(n) => {
                self.len += n;
                Ok(())
            }
            Err(source) => {
                self.trim = true;
                let _ = self.cut();
                Err(StoreError::Write { path: self.path.clone(), source })
            }
        }
    }

    fn write_at_end(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.trim {
            self.cut()?;
        }
        let len = self.len;
        let file = self.file()?;
        file.write_all_at(buf, len)?;
        file.sync_data()
    }

    /// Writes the whole state to `state_path` and empties the journal once
    /// the journal outgrows max(4 MiB, `state.json`): one rewrite per
    /// state's worth of lines keeps the cost of a change independent of the
    /// state's size. A failure is only logged (the changes are safe in the
    /// journal), and retried after as many lines again.
    pub(super) fn compact_if_due(&mut self, state: &State, state_path: &Path) {
        if self.len <= self.compact_at {
            return;
        }
        let compacted = serde_json::to_vec(state).map_err(io::Error::other).and_then(|bytes| {
            palisade_certs::files::write_atomic(state_path, &bytes, 0o600)?;
            // The rename must be durable before the journal is emptied
            // (`write_atomic` does not report a failed directory sync).
            sync_dir(state_path)?;
            self.base = bytes.len() as u64;
            self.clear()
        });
        if let Err(e) = compacted {
            tracing::warn!(path = %state_path.display(), error = %e, "cannot compact the store's journal into the state file; the changes stay in the journal");
        }
        self.compact_at = self.len + self.base.max(COMPACT_MIN);
    }

    /// Empties the journal, once `state.json` holds all its changes.
    fn clear(&mut self) -> io::Result<()> {
        self.len = 0;
        self.trim = true;
        self.cut()
    }

    /// Cuts the file back to its whole lines.
    fn cut(&mut self) -> io::Result<()> {
        let len = self.len;
        let file = self.file()?;
        file.set_len(len)?;
        file.sync_all()?;
        self.trim = false;
        Ok(())
    }

    fn file(&mut self) -> io::Result<&File> {
        let file = match self.file.take() {
            Some(file) => file,
            None => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&self.path)?;
                // `mode` is filtered by the umask on create; make it exact.
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                // A new file's name must be durable too.
                sync_dir(&self.path)?;
                file
            }
        };
        Ok(self.file.insert(file))
    }
}

/// Syncs the directory holding `path`, making a new name in it durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::store::{ApiKeyRecord, FileStore, Store};

    fn token(sha256: &str, uses: u32) -> TokenRecord {
        TokenRecord {
            id: format!("id-{sha256}"),
            sha256: sha256.into(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            created_at: 0,
            expires_at: 100,
            uses_total: uses,
            uses_left: uses,
            revoked: false,
        }
    }

    fn proxy(i: usize, serial: &str) -> ProxyRecord {
        ProxyRecord {
            identity: format!("spiffe://cluster.local/ns/shop/sa/svc-{i}"),
            inbound_addr: format!("10.0.{}.{}:4143", i / 250, i % 250),
            peer_addr: String::new(),
            cert_serial: serial.into(),
            cert_not_after: 1_000,
            last_seen: 0,
            attestation: "token".into(),
            issuer: "ab".repeat(32),
        }
    }

    /// The whole state, to compare stores.
    fn dump(store: &FileStore) -> serde_json::Value {
        serde_json::to_value(&*store.state.lock().unwrap()).unwrap()
    }

    fn assert_index_in_step(store: &FileStore) {
        let state = store.state.lock().unwrap();
        assert_eq!(*store.index.lock().unwrap(), ProxyIndex::of(&state.proxies));
    }

    fn journal_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("state.journal")).map_or(0, |m| m.len())
    }

    /// Changes of every kind, some undone or redone, so order matters.
    fn churn(store: &FileStore) {
        let policy = |v: u32| vec![("AuthorizationPolicy".to_string(), "shop/a".to_string(), format!("{{\"v\":{v}}}"))];
        store.put_token(token("h1", 2)).unwrap();
        store.put_token(token("h2", 1)).unwrap();
        store.consume_token("h1", 10).unwrap().unwrap();
        store.consume_token("h1", 10).unwrap().unwrap();
        store.refund_token("h1").unwrap();
        store.revoke_token("id-h2").unwrap().unwrap();
        store.apply_policies(policy(1)).unwrap();
        store.apply_policies(policy(2)).unwrap();
        store.delete_policy("AuthorizationPolicy", "shop/a").unwrap().unwrap();
        store.apply_policies(policy(1)).unwrap();
        store.upsert_proxy(proxy(1, "p1"), None, false).unwrap();
        store.upsert_proxy(proxy(2, "p2"), None, false).unwrap();
        store.upsert_proxy(proxy(1, "p1b"), Some("p1"), false).unwrap();
        store.upsert_proxy(ProxyRecord { cert_not_after: 5, ..proxy(3, "p3") }, None, false).unwrap();
        let key = ApiKeyRecord::sample("ci");
        store.put_api_key(key.clone()).unwrap();
        store.revoke_api_key("ci").unwrap().unwrap();
        store.put_api_key(ApiKeyRecord { name: "ops".into(), ..key }).unwrap();
        let client = OAuthClientRecord {
            client_id: "c1".into(),
            name: "billing".into(),
            secret_sha256: "cd".into(),
            scopes: vec!["a".into()],
            audiences: vec![],
            created_at: 1,
        };
        store.put_oauth_client(client.clone()).unwrap();
        store.delete_oauth_client("c1").unwrap().unwrap();
        store.put_oauth_client(OAuthClientRecord { client_id: "c2".into(), ..client }).unwrap();
        store.prune(10).unwrap();
    }

    /// Applies big policies until a compaction writes `state.json`.
    fn fill_past_compaction(store: &FileStore, dir: &Path) {
        let pad = "x".repeat(64 << 10);
        for v in 0..100 {
            let json = format!("{{\"v\":{v},\"pad\":\"{pad}\"}}");
            store.apply_policies(vec![("AuthorizationPolicy".into(), "shop/big".into(), json)]).unwrap();
            if dir.join("state.json").exists() {
                return;
            }
        }
        panic!("no compaction after 6 MiB of changes");
    }

    #[test]
    fn changes_survive_reopen_from_the_journal_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        churn(&store);
        assert!(!dir.path().join("state.json").exists(), "no compaction yet");
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&reopened), dump(&store));
        assert_index_in_step(&store);
        assert_eq!(reopened.tokens().iter().map(|t| t.uses_left).collect::<Vec<_>>(), [1, 1]);
        assert_eq!(reopened.policies().0, 4);
        let serials: Vec<String> = reopened.proxies().into_iter().map(|p| p.cert_serial).collect();
        assert_eq!(serials, ["p1b", "p2"], "replaced and pruned records stay gone");
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.journal");
        let store = FileStore::open(dir.path()).unwrap();
        churn(&store);
        let kept = dump(&store);
        let whole = std::fs::read(&path).unwrap();
        // A crash mid-append: half a line, or a line of garbage.
        for torn in [&b"{\"ops\":[{\"put\":{\"tok"[..], b"\0\0\0\0", b"{not json\n"] {
            std::fs::write(&path, [&whole[..], torn].concat()).unwrap();
            let reopened = FileStore::open(dir.path()).unwrap();
            assert_eq!(dump(&reopened), kept);
            assert_eq!(std::fs::read(&path).unwrap(), whole, "cut away");
        }
        let reopened = FileStore::open(dir.path()).unwrap();
        reopened.put_token(token("h3", 1)).unwrap();
        assert_eq!(FileStore::open(dir.path()).unwrap().tokens().len(), 3);
    }

    #[test]
    fn a_bad_line_before_the_last_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.journal");
        churn(&FileStore::open(dir.path()).unwrap());
        let whole = std::fs::read(&path).unwrap();
        let first = whole.iter().position(|&b| b == b'\n').unwrap() + 1;
        std::fs::write(&path, [&whole[..first], b"{not json\n", &whole[first..]].concat()).unwrap();
        let err = FileStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("state.journal") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn compaction_writes_the_state_file_and_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        churn(&store);
        fill_past_compaction(&store, dir.path());
        assert_eq!(journal_len(dir.path()), 0);
        let on_disk: State = serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(serde_json::to_value(&on_disk).unwrap(), dump(&store), "state.json alone holds everything");
        assert_eq!(dump(&FileStore::open(dir.path()).unwrap()), dump(&store));
        // Changes after it go to the journal again, over the new base.
        store.consume_token("h1", 10).unwrap().unwrap();
        assert!(journal_len(dir.path()) > 0);
        assert_eq!(dump(&FileStore::open(dir.path()).unwrap()), dump(&store));
    }

    #[test]
    fn replaying_lines_the_state_file_already_holds_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        churn(&store);
        // A crash between compaction's two steps: state.json written (here
        // pretty-printed, as older versions wrote it), the journal not emptied.
        let state = serde_json::to_vec_pretty(&*store.state.lock().unwrap()).unwrap();
        palisade_certs::files::write_atomic(&dir.path().join("state.json"), &state, 0o600).unwrap();
        assert!(journal_len(dir.path()) > 0);
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&reopened), dump(&store));
        reopened.consume_token("h1", 10).unwrap().unwrap();
        assert_eq!(dump(&FileStore::open(dir.path()).unwrap()), dump(&reopened));
    }

    #[test]
    fn both_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
        // A journal left with a looser mode is tightened.
        std::fs::write(dir.path().join("state.journal"), b"").unwrap();
        std::fs::set_permissions(dir.path().join("state.journal"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.put_token(token("h1", 1)).unwrap();
        assert_eq!(mode("state.journal"), 0o600);
        fill_past_compaction(&store, dir.path());
        assert_eq!((mode("state.json"), mode("state.journal")), (0o600, 0o600));
    }

    #[test]
    fn a_failed_write_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.journal");
        FileStore::open(dir.path()).unwrap().put_token(token("h1", 1)).unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        // A directory where the journal goes: unwritable, even for root.
        std::fs::rename(&path, dir.path().join("aside")).unwrap();
        std::fs::create_dir(&path).unwrap();
        let before = dump(&store);
        assert!(matches!(store.consume_token("h1", 10), Err(StoreError::Write { .. })));
        assert!(matches!(store.prune(u64::MAX), Err(StoreError::Write { .. })));
        assert_eq!(dump(&store), before);
        std::fs::remove_dir(&path).unwrap();
        std::fs::rename(dir.path().join("aside"), &path).unwrap();
        store.consume_token("h1", 10).unwrap().unwrap();
        assert_eq!(dump(&FileStore::open(dir.path()).unwrap()), dump(&store));
    }

    #[test]
    fn a_failed_append_is_cut_away_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.journal");
        let line = |sha256: &str| Line { ops: vec![Op::Put(Record::Token(token(sha256, 1)))] };
        let mut journal = Journal::replay(path.clone(), &mut State::default(), 0).unwrap();
        journal.append(&line("a")).unwrap();
        // A partial line written, then the write fails (a read-only handle).
        let mut partial = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        partial.write_all(&[b'{'; 1000]).unwrap();
        journal.file = Some(File::open(&path).unwrap());
        assert!(matches!(journal.append(&line("b")), Err(StoreError::Write { .. })));
        journal.file = None;
        journal.append(&line("c")).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), journal.len, "nothing after the last line");
        let mut state = State::default();
        Journal::replay(path, &mut state, 0).unwrap();
        assert_eq!(state.tokens.keys().collect::<Vec<_>>(), ["a", "c"]);
    }

    #[test]
    fn the_bytes_a_change_writes_do_not_grow_with_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut cost = BTreeMap::new();
        for i in 1..=10_000 {
            let before = journal_len(dir.path());
            store.upsert_proxy(proxy(i, &format!("{i:032x}")), None, false).unwrap();
            cost.insert(i, journal_len(dir.path()) - before);
        }
        assert!(!dir.path().join("state.json").exists(), "one journal line each, no rewrite");
        assert_index_in_step(&store);
        let (first, last) = (cost[&100], cost[&10_000]);
        assert!(last * 2 <= first * 3, "the 10,000th upsert wrote {last} bytes, the 100th {first}");
        let state = serde_json::to_vec(&*store.state.lock().unwrap()).unwrap().len() as u64;
        assert!(state > 1000 * last, "rewriting the state ({state} bytes) would cost 1000 lines");
    }
}
