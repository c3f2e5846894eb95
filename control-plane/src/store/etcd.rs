//! The replicated store (`--store etcd`): the control plane's state in etcd,
//! shared by every replica that points at the same cluster and prefix.
//!
//! Each record is one key under the prefix (`tokens/<sha256>`,
//! `proxies/<serial>`, `apikeys/<name>`, `oauth/<client id>`, and `ca`, its
//! private key sealed with `--store-key-file`: [`super::sealed`]), except the
//! policies, which are one document (`policies`) so that a document apply
//! stays all or nothing under one revision. Every read-modify-write is a
//! compare-and-swap on the key's etcd mod revision: two replicas can never
//! hand out the same policy revision or lose an update; an apply that
//! changes a resource another replica changed since it read it fails with a
//! conflict, one that touches other resources is retried on top.
//!
//! Reads are served from a cache that a watch on the prefix keeps current;
//! the watch also tells this replica what another replica changed (the
//! [`Change`]s behind [`super::Store::watch`]), so it pushes the change to
//! its own sidecars. The `Store` trait is synchronous: calls run on a small
//! runtime of the store's own, from the caller's blocking thread.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};

use super::*;

/// One etcd call, at most.
const CALL: Duration = Duration::from_secs(5);
/// Compare-and-swap attempts before giving up.
const ATTEMPTS: usize = 16;
/// Operations in one transaction, at most (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// What changed in the store (as the watch saw it, whichever replica wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Policies,
    /// API keys or OAuth clients.
    Credentials,
    /// Proxy records (the directory).
    Endpoints,
    Tokens,
    /// Another replica's connected sidecars (their sync state).
    Streams,
    /// The OAuth token service's signing keys (rotated by the leader).
    OAuthKeys,
    /// The CA or its rotation.
    Ca,
}

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// PEM files: the CA etcd's certificate chains to, and our client certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct PolicyDoc {
    revision: u64,
    policies: BTreeMap<String, PolicyRecord>,
}

#[derive(Debug, Default)]
struct Cache {
    state: State,
    /// Mod revision of each key, by full key.
    revs: HashMap<String, i64>,
    /// Other replicas' stream records, by full key.
    streams: BTreeMap<String, Vec<u8>>,
}

/// How long a replica's stream records outlive it (its etcd lease).
const PRESENCE_TTL: i64 = 10;

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

fn etcd_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd { why: e.to_string() }
}

async fn timed<T, E: std::fmt::Display>(f: impl Future<Output = Result<T, E>>) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL, f).await {
        Ok(r) => r.map_err(etcd_err),
        Err(_) => Err(StoreError::Etcd { why: format!("no answer within {}s", CALL.as_secs()) }),
    }
}

/// An etcd call, tried again (3 times in all, 200 and 400 ms apart) when it
/// fails: a member that just died is left for another.
async fn retried<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
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
        let replica: String = id.iter().map(|b| format!("{b:02x}")).collect();
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
            async move { load(&client, &prefix, &cache).await }
        })?;
        store.runtime().spawn(publish(
            store.client.clone(),
            format!("{}streams/{}/", store.prefix, store.replica),
            store.presence.clone(),
        ));
        store.runtime().spawn(lead(
            store.client.clone(),
            format!("{}leader", store.prefix),
            store.replica.clone(),
            store.leader.clone(),
        ));
        store.runtime().spawn(watch(
            store.client.clone(),
            store.prefix.clone(),
            store.cache.clone(),
            store.changes.clone(),
            revision,
        ));
        Ok(store)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("invariant: the runtime is taken only on drop")
    }

    /// Runs `f` on the store's runtime and waits for it (from a blocking thread).
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime().spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().expect("invariant: the store runtime lives as long as the store")
    }

    fn key(&self, section: &str, id: &str) -> String {
        format!("{}{section}/{id}", self.prefix)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.cache.lock().unwrap_or_else(|p| p.into_inner()).state)
    }

    fn rev(&self, key: &str) -> i64 {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).revs.get(key).copied().unwrap_or(0)
    }

    /// Runs a transaction; `Ok(false)` when its comparisons failed. What
    /// it wrote reaches the cache through the watch, and at once here.
    fn txn(
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
            apply(&mut cache, &self.prefix, k, None, revision);
        }
        for (k, v) in &puts {
            apply(&mut cache, &self.prefix, k, Some(v), revision);
        }
        Ok(true)
    }

    /// Reads one key from etcd (not the cache) into the cache: its value's
    /// mod revision after.
    fn refresh(&self, key: &str) -> Result<i64, StoreError> {
        let (client, k) = (self.client.clone(), key.to_string());
        let resp = self.run(async move {
            retried(|| {
                let (mut kv, k) = (client.kv_client(), k.clone());
                async move { kv.get(k, None).await }
            })
            .await
        })?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match resp.kvs().first() {
            Some(kv) => {
                apply(&mut cache, &self.prefix, key, Some(kv.value()), kv.mod_revision());
                Ok(kv.mod_revision())
            }
            None => {
                apply(&mut cache, &self.prefix, key, None, 0);
                Ok(0)
            }
        }
    }

    /// Read-modify-write of one record with compare-and-swap, retried on
    /// conflict: `f` sees the freshest value and returns the new one (or
    /// `None` to leave it) and what to answer.
    fn cas<R: Serialize + for<'de> Deserialize<'de>, T>(
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

    fn policies_key(&self) -> String {
        format!("{}policies", self.prefix)
    }

    /// Imports a single-node install's state (`DIR/state.json`, and its
    /// generated CA from `DIR/ca/`, sealed with `kek`) into an empty prefix,
    /// so it can grow into replicas. Refuses a prefix that holds state.
    pub fn import(&self, dir: &Path, kek: &super::sealed::Kek) -> Result<String, StoreError> {
        // A root rotation half done would leave its new root behind.
        if let Ok(b) = std::fs::read(dir.join("ca/rotation.json"))
            && let Ok(r) = serde_json::from_slice::<crate::ca::RotationRecord>(&b)
            && !r.phase.finished()
        {
            return Err(etcd_err(format!(
                "--migrate-from {}: a root CA rotation is in progress there (phase {}); let it finish (palisadectl ca status) or abort it, then migrate",
                dir.display(),
                r.phase.name()
            )));
        }
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
        let file = super::FileStore::open(dir)?;
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
        let ca_dir = dir.join("ca");
        let ca = match (
            std::fs::read_to_string(ca_dir.join("ca.pem")),
            std::fs::read_to_string(ca_dir.join("ca-key.pem")),
        ) {
            (Ok(cert_pem), Ok(key_pem)) => {
                let key = kek.seal(key_pem.as_bytes(), "ca").map_err(etcd_err)?;
                puts.push((
                    format!("{}ca", self.prefix),
                    serde_json::to_vec(&serde_json::json!({"cert_pem": cert_pem, "key": key})).map_err(etcd_err)?,
                ));
                "its generated CA"
            }
            _ => "no generated CA (an operator CA: give --ca-cert and --ca-key to every replica)",
        };
        for chunk in puts.chunks(TXN_OPS) {
            self.txn(vec![], chunk.to_vec(), vec![])?;
        }
        Ok(format!(
            "imported {}: {} policies (revision {}), {} join tokens, {} proxies, {} API keys, {} OAuth clients, {ca}",
            dir.display(),
            state.policies.len(),
            state.policy_revision,
            state.tokens.len(),
            state.proxies.len(),
            state.api_keys.len(),
            state.oauth_clients.len()
        ))
    }

    /// A secret record (`<prefix><name>`), opened with `kek`; `None` if absent.
    pub fn get_sealed(&self, name: &str, kek: &super::sealed::Kek) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((value, _)) = self.get_raw(name)? else { return Ok(None) };
        let sealed: super::sealed::Sealed = serde_json::from_slice(&value).map_err(etcd_err)?;
        kek.open(&sealed, name).map(Some).map_err(|e| etcd_err(format!("{name} in etcd: {e}")))
    }

    /// Seals and stores a secret record; with `create`, only if none exists
    /// (`false`: another replica made it first).
    pub fn put_sealed(
        &self,
        name: &str,
        plain: &[u8],
        kek: &super::sealed::Kek,
        create: bool,
    ) -> Result<bool, StoreError> {
        let key = format!("{}{name}", self.prefix);
        let sealed = serde_json::to_vec(&kek.seal(plain, name).map_err(etcd_err)?).map_err(etcd_err)?;
        let compares =
            if create { vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)] } else { Vec::new() };
        self.txn(compares, vec![(key, sealed)], vec![])
    }

    /// The mesh CA every replica signs with, kept in etcd with its key
    /// sealed by `kek`: the first replica to start stores `seed` (the
    /// operator's CA) or generates one, the others (and later starts) load it.
    pub fn shared_ca(
        &self,
        td: &palisade_certs::TrustDomain,
        kek: &super::sealed::Kek,
        validity: Duration,
        seed: Option<&dyn Fn() -> Result<palisade_certs::CertificateAuthority, StoreError>>,
    ) -> Result<palisade_certs::CertificateAuthority, StoreError> {
        let key = format!("{}ca", self.prefix);
        for _ in 0..2 {
            if let Some((value, _)) = self.get_raw("ca")? {
                let rec: CaRecord = serde_json::from_slice(&value)
                    .map_err(|e| etcd_err(format!("the CA record in etcd ({key}) is unreadable: {e}")))?;
                return rec.open(kek, "ca");
            }
            let ca = match seed {
                Some(seed) => seed()?,
                None => palisade_certs::CertificateAuthority::generate(td, validity).map_err(etcd_err)?,
            };
            let json = serde_json::to_vec(&CaRecord::seal(&ca, kek, "ca")?).map_err(etcd_err)?;
            // Only if no other replica made one meanwhile; else load the winner's.
            if self.txn(
                vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)],
                vec![(key.clone(), json)],
                vec![],
            )? {
                let how = if seed.is_some() {
                    "stored the CA of --ca-cert/--ca-key"
                } else {
                    "generated the mesh's root CA and stored it"
                };
                tracing::info!(subject = %ca.info().subject, "{how} in etcd (key sealed with --store-key-file); from now on etcd's copy is the CA in force");
                return Ok(ca);
            }
        }
        Err(StoreError::Conflict { what: "the CA record in etcd kept changing".into() })
    }

    /// One key's value and mod revision, from etcd (not the cache).
    fn get_raw(&self, name: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
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

/// A CA in etcd: its certificate, and its key sealed.
#[derive(Serialize, Deserialize)]
struct CaRecord {
    cert_pem: String,
    key: super::sealed::Sealed,
}

impl CaRecord {
    fn seal(
        ca: &palisade_certs::CertificateAuthority,
        kek: &super::sealed::Kek,
        name: &str,
    ) -> Result<Self, StoreError> {
        Ok(Self { cert_pem: ca.cert_pem(), key: kek.seal(ca.key_pem().expose().as_bytes(), name).map_err(etcd_err)? })
    }
    fn open(&self, kek: &super::sealed::Kek, name: &str) -> Result<palisade_certs::CertificateAuthority, StoreError> {
        let pem = kek.open(&self.key, name).map_err(|e| etcd_err(format!("the CA in etcd: {e}")))?;
        let pem = String::from_utf8(pem).map_err(|_| etcd_err("the CA key in etcd is not PEM"))?;
        palisade_certs::CertificateAuthority::from_pem(&self.cert_pem, palisade_certs::SecretPem::new(pem), None)
            .map_err(|e| etcd_err(format!("the CA in etcd: {e}")))
    }
}

/// The rotation record in etcd, with the new root (key sealed) while it is needed.
#[derive(Serialize, Deserialize)]
struct RotationValue {
    record: crate::ca::RotationRecord,
    new: Option<CaRecord>,
}

/// The CA shared by the replicas, in etcd (`<prefix>ca`, `<prefix>ca-rotation`).
#[derive(Debug)]
pub struct EtcdCaHome {
    pub store: Arc<EtcdStore>,
    pub kek: Arc<super::sealed::Kek>,
    pub td: palisade_certs::TrustDomain,
    pub validity: Duration,
    /// `--ca-cert`/`--ca-key`: stored in etcd by the first replica when etcd holds no CA.
    pub seed: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl crate::ca::CaHome for EtcdCaHome {
    fn load(&self) -> Result<crate::ca::Loaded, StoreError> {
        let seed = self.seed.as_ref().map(|(cert, key)| {
            move || {
                crate::pki::load_or_create_ca(Path::new("/nonexistent"), &self.td, Some((cert, key, None)))
                    .map_err(|e| StoreError::Ca { why: e.to_string() })
            }
        });
        let seed_fn = seed.as_ref().map(|f| f as &dyn Fn() -> Result<palisade_certs::CertificateAuthority, StoreError>);
        let ca = self.store.shared_ca(&self.td, &self.kek, self.validity, seed_fn)?;
        let (rotation, version) = match self.store.get_raw("ca-rotation")? {
            Some((value, rev)) => {
                let v: RotationValue = serde_json::from_slice(&value)
                    .map_err(|e| etcd_err(format!("the CA rotation record in etcd is unreadable: {e}")))?;
                let new = v.new.map(|n| n.open(&self.kek, "ca-rotation")).transpose()?;
                (Some((v.record, new)), rev)
            }
            None => (None, 0),
        };
        Ok(crate::ca::Loaded { ca, rotation, version })
    }

    fn save(&self, expect: i64, w: crate::ca::Write<'_>) -> Result<bool, StoreError> {
        let (rkey, ckey) = (format!("{}ca-rotation", self.store.prefix), format!("{}ca", self.store.prefix));
        let value = RotationValue {
            record: w.record.clone(),
            new: if w.keep { Some(CaRecord::seal(w.new, &self.kek, "ca-rotation")?) } else { None },
        };
        let mut puts = vec![(rkey.clone(), serde_json::to_vec(&value).map_err(etcd_err)?)];
        if w.replace_ca {
            // One transaction: the record says done exactly when the new root is the CA.
            puts.push((ckey, serde_json::to_vec(&CaRecord::seal(w.new, &self.kek, "ca")?).map_err(etcd_err)?));
        }
        self.store.txn(vec![Compare::mod_revision(rkey.as_str(), CompareOp::Equal, expect)], puts, vec![])
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

/// Keeps this replica's stream records in etcd under a lease: what
/// `presence` holds is published (and what it no longer holds deleted)
/// within half a second; if the replica dies the lease ends and etcd
/// deletes them within [`PRESENCE_TTL`] seconds.
async fn publish(client: Client, prefix: String, presence: Arc<Mutex<BTreeMap<String, Vec<u8>>>>) {
    loop {
        let mut c = client.clone();
        let lease = match timed(c.lease_grant(PRESENCE_TTL, None)).await {
            Ok(l) => l.id(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish this replica's sidecars to etcd; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok((mut keeper, mut acks)) = timed(c.lease_keep_alive(lease)).await else { continue };
        let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        let mut renewed = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if renewed.elapsed() >= Duration::from_secs(3) {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(CALL, acks.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => renewed = tokio::time::Instant::now(),
                    _ => break,
                }
            }
            let want = presence.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut ops: Vec<TxnOp> = Vec::new();
            for (k, v) in &want {
                if published.get(k) != Some(v) {
                    let key = format!("{prefix}{}", hex(k));
                    ops.push(TxnOp::put(key, v.clone(), Some(etcd_client::PutOptions::new().with_lease(lease))));
                }
            }
            for k in published.keys().filter(|k| !want.contains_key(*k)) {
                ops.push(TxnOp::delete(format!("{prefix}{}", hex(k)), None));
            }
            if ops.is_empty() {
                continue;
            }
            let mut kv = client.kv_client();
            let mut ok = true;
            for chunk in ops.chunks(TXN_OPS) {
                ok &= timed(kv.txn(Txn::new().and_then(chunk.to_vec()))).await.is_ok();
            }
            if ok {
                published = want;
            }
        }
        // The lease is lost (etcd away too long): a new one, everything published again.
        tracing::warn!("this replica's etcd lease lapsed; publishing its sidecars again");
    }
}

/// How long a dead leader keeps the lead (its lease).
const LEADER_TTL: i64 = 5;

/// Runs for the lead: the replica whose leased `leader` key exists leads
/// while it keeps the lease alive; when it dies the key goes with its
/// lease and another takes it within about [`LEADER_TTL`] seconds.
async fn lead(client: Client, key: String, replica: String, leader: tokio::sync::watch::Sender<bool>) {
    loop {
        let mut c = client.clone();
        let lease = match retried(|| {
            let mut c = client.clone();
            async move { c.lease_grant(LEADER_TTL, None).await }
        })
        .await
        {
            Ok(l) => l.id(),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let put = TxnOp::put(key.as_str(), replica.as_bytes(), Some(etcd_client::PutOptions::new().with_lease(lease)));
        let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([put]);
        let won = retried(|| {
            let (mut kv, txn) = (client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
        .is_ok_and(|r| r.succeeded());
        if !won {
            let _ = timed(c.lease_revoke(lease)).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let Ok((mut keeper, mut acks)) = timed(c.lease_keep_alive(lease)).await else { continue };
        tracing::info!(replica = %replica, "this replica leads (singleton duties: pruning)");
        leader.send_replace(true);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(CALL, acks.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                _ => break,
            }
        }
        leader.send_replace(false);
        tracing::warn!(replica = %replica, "this replica lost the lead (its etcd lease lapsed)");
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Loads every key under the prefix into the cache; the revision read at.
async fn load(client: &Client, prefix: &str, cache: &Mutex<Cache>) -> Result<i64, StoreError> {
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

/// Puts one key's value (or its deletion) into the cache; what kind of change it was.
fn apply(c: &mut Cache, prefix: &str, key: &str, value: Option<&[u8]>, revision: i64) -> Option<Change> {
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
        "oauth-keys" => return Some(Change::OAuthKeys),
        "ca" | "ca-rotation" => return Some(Change::Ca),
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
async fn watch(
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
                    seen.sort_by_key(|c| *c as u8);
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
                .filter(|(serial, old)| {
                    Some(serial.as_str()) == replaces_serial || super::replaced_by(old, &p, take_over)
                })
                .map(|(serial, _)| serial.clone())
                .filter(|serial| *serial != p.cert_serial)
                .collect();
            let before = super::touched(s.proxies.values(), &p);
            let kept = s.proxies.iter().filter(|(k, _)| !stale.contains(k)).map(|(_, v)| v);
            let after = super::touched(kept.chain(std::iter::once(&p)), &p);
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
