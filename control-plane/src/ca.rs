//! The mesh CA as the control plane runs it: the root certificates come
//! from, the roots every trust bundle carries, and live root rotation.
//!
//! A rotation moves through phases, each stored (with compare-and-swap) so
//! that any replica, and a restarted one, knows where it stands:
//!
//! | phase        | signs with | trust bundles | sidecars renew now unless they chain to |
//! |--------------|------------|---------------|------------------------------------------|
//! | `publishing` | old        | old + new     | (on schedule)                            |
//! | `reissuing`  | new        | old + new     | new                                      |
//! | `done`       | new        | new           | (on schedule)                            |
//! | `aborting`   | old        | old + new     | old                                      |
//! | `aborted`    | old        | old           | (on schedule)                            |
//!
//! The leader moves `publishing` to `reissuing` once every connected proxy
//! (on every replica) has ACKed a snapshot whose bundle holds the new root,
//! and `reissuing` to `done` once every connected proxy's certificate comes
//! from the new root. Only then is the old root dropped from the bundles, so
//! no certificate in use ever stops verifying. An abort before `done` runs the
//! same renewal back to the old root before the new one leaves the bundles.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use palisade_certs::tls::TrustBundle;
use palisade_certs::{CertificateAuthority, SecretPem, SvidInfo, TrustDomain};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::store::StoreError;
use palisade_cmd::unix_now;

/// How often the leader checks whether the current step is complete.
const DRIVE_EVERY: Duration = Duration::from_millis(500);
/// Proxies listed by name in a status, at most.
const LIST_WAITING: usize = 20;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Publishing,
    Reissuing,
    Done,
    Aborting,
    Aborted,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Publishing => "publishing",
            Phase::Reissuing => "reissuing",
            Phase::Done => "done",
            Phase::Aborting => "aborting",
            Phase::Aborted => "aborted",
        }
    }
    /// A rotation in this phase is over (a new one may start).
    pub fn finished(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted)
    }
}

/// A rotation as stored (public parts; the new root's key is kept beside it, sealed or 0600).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RotationRecord {
    pub phase: Phase,
    pub old_cert_pem: String,
    pub new_cert_pem: String,
    /// Unix seconds.
    pub started: u64,
    /// When the current phase began (unix seconds).
    pub since: u64,
    #[serde(default)]
    pub min_phase_secs: u64,
    /// Bumped on every write (the file home's compare-and-swap).
    #[serde(default)]
    pub seq: u64,
}

/// What a home holds: the CA record (the old root until `done`, the new one
/// after) and the rotation, with the new root's key while it is needed.
#[derive(Debug)]
pub struct Loaded {
    pub ca: CertificateAuthority,
    pub rotation: Option<(RotationRecord, Option<CertificateAuthority>)>,
    /// Compare-and-swap token of the rotation record.
    pub version: i64,
}

/// A write of the rotation record.
#[derive(Debug)]
pub struct Write<'a> {
    pub record: &'a RotationRecord,
    /// The new root with its key.
    pub new: &'a CertificateAuthority,
    /// Keep the new root's key beside the record (dropped at `done`, where it
    /// becomes the CA record, and at `aborted`).
    pub keep: bool,
    /// At `done`: the new root becomes the CA record.
    pub replace_ca: bool,
}

/// Where the CA and its rotation live: a data directory, or etcd.
pub trait CaHome: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Writes if the rotation record's token is still `expect`; `false` if another write came first.
    fn save(&self, expect: i64, w: Write<'_>) -> Result<bool, StoreError>;
    /// `Some(why)` when this CA cannot be rotated by the control plane.
    fn not_rotatable(&self) -> Option<String> {
        None
    }
}

pub use palisade_certs::ca::sha256_hex;

/// The roots of a bundle as one comparable string.
pub fn roots_key(roots: &[Vec<u8>]) -> String {
    roots.iter().map(|r| sha256_hex(r)).collect::<Vec<_>>().join(",")
}

/// What the control plane runs on now.
#[derive(Debug)]
pub struct View {
    pub signing: Arc<CertificateAuthority>,
    /// SHA-256 of the signing certificate.
    pub signing_sha: String,
    /// The roots every trust bundle carries.
    pub bundle: Vec<CertificateDer<'static>>,
    /// Sidecars whose certificate does not chain to one of these renew now.
    pub renew_unless: Vec<CertificateDer<'static>>,
    pub rotation: Option<RotationRecord>,
    version: i64,
    /// During a rotation: the old and the new CA.
    old: Option<Arc<CertificateAuthority>>,
    new: Option<Arc<CertificateAuthority>>,
}

impl View {
    fn from_loaded(l: Loaded) -> Self {
        let base = Arc::new(l.ca);
        let (record, new) = match l.rotation {
            Some((r, new)) => (Some(r), new.map(Arc::new)),
            None => (None, None),
        };
        let phase = record.as_ref().map(|r| r.phase);
        let both = |old: &CertificateAuthority, new: &CertificateAuthority| {
            let mut b = old.trust_bundle().to_vec();
            b.extend(new.trust_bundle().iter().filter(|r| !b.contains(r)).cloned().collect::<Vec<_>>());
            b
        };
        let (signing, bundle, renew_unless) = match (phase, &new) {
            (Some(Phase::Publishing), Some(n)) => (base.clone(), both(&base, n), vec![]),
            (Some(Phase::Reissuing), Some(n)) => (n.clone(), both(&base, n), n.trust_bundle().to_vec()),
            (Some(Phase::Aborting), Some(n)) => (base.clone(), both(&base, n), base.trust_bundle().to_vec()),
            _ => (base.clone(), base.trust_bundle().to_vec(), vec![]),
        };
        let signing_sha = sha256_hex(signing_cert(&signing).as_ref());
        Self { signing, signing_sha, bundle, renew_unless, rotation: record, version: l.version, old: Some(base), new }
    }

    pub fn bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| palisade_certs::ca::der_to_pem(c)).collect()
    }

    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        self.bundle.iter().map(|c| c.to_vec()).collect()
    }
}

/// The certificate a CA signs with (its root, for a generated CA).
fn signing_cert(ca: &CertificateAuthority) -> CertificateDer<'static> {
    palisade_certs::ca::parse_pem_certs(&ca.cert_pem())
        .ok()
        .and_then(|c| c.into_iter().next())
        .unwrap_or_else(|| ca.trust_bundle()[0].clone())
}

/// The CA in force, shared by the services, reloaded when it changes.
#[derive(Debug)]
pub struct Authority {
    home: Box<dyn CaHome>,
    view: RwLock<Arc<View>>,
    /// The roots the control plane's own TLS verifier trusts.
    pub trust: TrustBundle,
    changed: tokio::sync::watch::Sender<u64>,
    td: TrustDomain,
    /// Serialises this replica's writes (replicas race through compare-and-swap).
    writing: std::sync::Mutex<()>,
}

/// Why a rotation request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{0}")]
    Precondition(String),
    #[error("the rotation changed meanwhile (another replica wrote it); ask again")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot generate the new root: {0}")]
    Generate(String),
    #[error("{0}")]
    Invalid(String),
}

impl Authority {
    pub fn open(home: Box<dyn CaHome>, td: TrustDomain) -> Result<Self, StoreError> {
        let view = View::from_loaded(home.load()?);
        let trust = TrustBundle::new(&view.bundle).map_err(|e| StoreError::Ca { why: e.to_string() })?;
        Ok(Self {
            home,
            view: RwLock::new(Arc::new(view)),
            trust,
            changed: tokio::sync::watch::channel(0).0,
            td,
            writing: std::sync::Mutex::new(()),
        })
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wakes on every change of the view.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reads the home again (blocking); `true` if the view changed.
    pub fn reload(&self) -> Result<bool, StoreError> {
        let next = View::from_loaded(self.home.load()?);
        let mut cur = self.view.write().unwrap_or_else(|p| p.into_inner());
        let same = cur.version == next.version
            && cur.rotation == next.rotation
            && cur.signing_sha == next.signing_sha
            && cur.bundle == next.bundle;
        if same {
            return Ok(false);
        }
        // Trust the new bundle before anything is signed under it.
        if let Err(e) = self.trust.replace(&next.bundle) {
            tracing::error!(error = %e, "the rotated trust bundle is unusable; keeping the previous one");
            return Ok(false);
        }
        tracing::info!(target: "audit", event = "ca_changed", phase = next.rotation.as_ref().map(|r| r.phase.name()).unwrap_or("none"), signing = %next.signing_sha, roots = next.bundle.len(), "the CA in force changed");
        *cur = Arc::new(next);
        drop(cur);
        self.changed.send_modify(|v| *v += 1);
        Ok(true)
    }

    fn write(&self, view: &View, w: Write<'_>) -> Result<(), RotateError> {
        let _g = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if !self.home.save(view.version, w)? {
            let _ = self.reload();
            return Err(RotateError::Conflict);
        }
        self.reload()?;
        Ok(())
    }

    /// Starts a rotation to `new` (the operator's root), or to a freshly
    /// generated root (blocking).
    pub fn start(&self, min_phase: Duration, new: Option<CertificateAuthority>) -> Result<(), RotateError> {
        if let Some(why) = self.home.not_rotatable() {
            return Err(RotateError::Precondition(why));
        }
        let view = self.view();
        if let Some(r) = view.rotation.as_ref().filter(|r| !r.phase.finished()) {
            return Err(RotateError::Precondition(format!(
                "a rotation is in progress (phase {}); wait for it (palisadectl ca status) or abort it (palisadectl ca rotate --abort)",
                r.phase.name()
            )));
        }
        let old = view.old.clone().unwrap_or_else(|| view.signing.clone());
        let validity = old
            .info()
            .not_after
            .duration_since(old.info().not_before)
            .unwrap_or(crate::pki::ROOT_VALIDITY)
            .max(crate::pki::ROOT_VALIDITY);
        let new = match new {
            Some(n) => {
                self.check_new_root(&n, &old)?;
                n
            }
            None => {
                CertificateAuthority::generate(&self.td, validity).map_err(|e| RotateError::Generate(e.to_string()))?
            }
        };
        let now = unix_now();
        let record = RotationRecord {
            phase: Phase::Publishing,
            old_cert_pem: old.cert_pem(),
            new_cert_pem: new.cert_pem(),
            started: now,
            since: now,
            min_phase_secs: min_phase.as_secs(),
            seq: view.rotation.as_ref().map(|r| r.seq + 1).unwrap_or(1),
        };
        self.write(&view, Write { record: &record, new: &new, keep: true, replace_ca: false })?;
        tracing::info!(target: "audit", event = "ca_rotation_started", new_root = %sha256_hex(&signing_cert(&new)), old_root = %sha256_hex(&signing_cert(&old)), "root CA rotation started: the new root is published in every trust bundle");
        Ok(())
    }

    /// An operator's new root must be a root (self-signed: intermediates
    /// would need a bundle of their own), of this trust domain when it names
    /// one, valid for a while yet, and not the root in force.
    fn check_new_root(&self, new: &CertificateAuthority, old: &CertificateAuthority) -> Result<(), RotateError> {
        let bad = |why: String| Err(RotateError::Invalid(format!("the new root: {why}")));
        let cert = signing_cert(new);
        if new.trust_bundle().len() != 1 || new.trust_bundle()[0] != cert {
            return bad("must be a self-signed root CA certificate (rotate to an intermediate by giving the control plane --ca-cert/--ca-bundle instead)".into());
        }
        if old.trust_bundle().contains(&cert) {
            return bad("is the root in force already".into());
        }
        let left = new.info().time_left(SystemTime::now());
        if left < Duration::from_secs(30 * 86400) {
            return bad(format!(
                "expires in {}; give one valid for at least 30 days",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            ));
        }
        for uri in &new.info().uri_sans {
            if let Some(td) = uri.strip_prefix("spiffe://")
                && td.trim_end_matches('/') != self.td.to_string()
            {
                return bad(format!("names trust domain {td}; this mesh is {}", self.td));
            }
        }
        Ok(())
    }

    /// Aborts the rotation in progress (blocking).
    pub fn abort(&self) -> Result<(), RotateError> {
        let view = self.view();
        let Some(r) = view.rotation.clone() else {
            return Err(RotateError::Precondition("no rotation to abort".into()));
        };
        let next = match r.phase {
            Phase::Publishing => Phase::Aborted,
            Phase::Reissuing => Phase::Aborting,
            Phase::Aborting => return Ok(()),
            Phase::Done => {
                return Err(RotateError::Precondition(
                    "the rotation is done: the old root is retired and cannot come back (start a new rotation)".into(),
                ));
            }
            Phase::Aborted => return Err(RotateError::Precondition("the rotation is already aborted".into())),
        };
        self.step(&view, r, next)?;
        tracing::info!(target: "audit", event = "ca_rotation_aborted", phase = next.name(), "root CA rotation aborted");
        Ok(())
    }

    fn step(&self, view: &View, r: RotationRecord, next: Phase) -> Result<(), RotateError> {
        let record = RotationRecord { phase: next, since: unix_now(), seq: r.seq + 1, ..r };
        let keep = matches!(next, Phase::Publishing | Phase::Reissuing | Phase::Aborting);
        let Some(new) = view.new.as_deref() else {
            return Err(RotateError::Precondition("the new root's key is missing from the store".into()));
        };
        self.write(view, Write { record: &record, new, keep, replace_ca: next == Phase::Done })
    }
}

/// The connected proxies the current step waits for, and how many are connected.
fn waiting(shared: &Shared, view: &View) -> (usize, Vec<String>, String) {
    let Some(r) = view.rotation.as_ref() else { return (0, vec![], String::new()) };
    let mut connected: Vec<(String, crate::push::SyncStatus)> = {
        let all = shared.hub.status.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter(|(_, s)| s.connected).map(|(k, s)| (k.clone(), s.clone())).collect()
    };
    connected.extend(crate::push::remote_statuses(shared));
    connected.sort_by(|a, b| a.0.cmp(&b.0));
    connected.dedup_by(|a, b| a.0 == b.0);
    let total = connected.len();
    let root_sha = |pem: &str| {
        palisade_certs::ca::parse_pem_certs(pem).ok().and_then(|c| c.first().map(|c| sha256_hex(c))).unwrap_or_default()
    };
    let (new_sha, old_sha) = (root_sha(&r.new_cert_pem), root_sha(&r.old_cert_pem));
    let (list, detail): (Vec<String>, String) = match r.phase {
        Phase::Publishing => (
            connected.into_iter().filter(|(_, s)| !s.acked_roots.contains(&new_sha)).map(|(k, _)| k).collect(),
            "waiting for every connected proxy to ACK a trust bundle with the new root".into(),
        ),
        Phase::Reissuing | Phase::Aborting => {
            let want = if r.phase == Phase::Reissuing { &new_sha } else { &old_sha };
            let proxies = shared.store.proxies();
            let list = connected
                .into_iter()
                .filter(|(k, s)| {
                    let addr = k.split_once(' ').map(|(_, a)| a).unwrap_or("");
                    !proxies.iter().any(|p| p.identity == s.identity && p.inbound_addr == addr && &p.issuer == want)
                })
                .map(|(k, _)| k)
                .collect();
            let root = if r.phase == Phase::Reissuing { "new" } else { "old" };
            (list, format!("waiting for every connected proxy to renew its certificate from the {root} root"))
        }
        Phase::Done => (vec![], "the old root is retired".into()),
        Phase::Aborted => (vec![], "the new root was withdrawn; the old root is in force".into()),
    };
    (total, list, detail)
}

/// The status `palisadectl ca status` shows.
pub(crate) fn status(shared: &Shared) -> palisade_proto::v1::CaStatus {
    let view = shared.ca.view();
    let root = |der: &[u8]| {
        let info = SvidInfo::parse(&CertificateDer::from(der.to_vec())).ok();
        palisade_proto::v1::CaRoot {
            subject: info.as_ref().map(|i| i.subject.clone()).unwrap_or_default(),
            sha256: sha256_hex(der),
            not_after: info.map(|i| i.not_after.into()),
        }
    };
    let first = |pem: &str| palisade_certs::ca::parse_pem_certs(pem).ok().and_then(|c| c.first().map(|c| root(c)));
    let (proxies, waiting_for, detail) = waiting(shared, &view);
    let r = view.rotation.as_ref();
    let mut detail = detail;
    if let Some(r) = r.filter(|r| !r.phase.finished() && r.min_phase_secs > 0) {
        let left = (r.since + r.min_phase_secs).saturating_sub(unix_now());
        if left > 0 {
            detail = format!("{detail}; and {left}s more of --min-phase");
        }
    }
    let at = |secs: u64| Some(prost_types::Timestamp { seconds: secs as i64, nanos: 0 });
    palisade_proto::v1::CaStatus {
        phase: r.map(|r| r.phase.name()).unwrap_or("none").into(),
        signing: Some(root(&signing_cert(&view.signing))),
        bundle: view.bundle.iter().map(|c| root(c)).collect(),
        old_root: r.and_then(|r| first(&r.old_cert_pem)),
        new_root: r.and_then(|r| first(&r.new_cert_pem)),
        started_at: r.and_then(|r| at(r.started)),
        phase_since: r.and_then(|r| at(r.since)),
        proxies: proxies as u32,
        waiting: waiting_for.len() as u32,
        waiting_for: waiting_for.into_iter().take(LIST_WAITING).collect(),
        detail,
        min_phase_seconds: r.map(|r| r.min_phase_secs).unwrap_or(0),
        bundle_pem: view.bundle_pem(),
    }
}

/// The leader's part: moves a rotation on when its step is complete.
pub(crate) async fn drive(shared: Arc<Shared>, leading: Option<tokio::sync::watch::Receiver<bool>>) {
    loop {
        tokio::time::sleep(DRIVE_EVERY).await;
        if leading.as_ref().is_some_and(|l| !*l.borrow()) {
            crate::metrics::METRICS.ca_roots.set(shared.ca.view().bundle.len() as i64);
            continue;
        }
        let view = shared.ca.view();
        crate::metrics::METRICS.ca_roots.set(view.bundle.len() as i64);
        let Some(r) = view.rotation.clone().filter(|r| !r.phase.finished()) else {
            crate::metrics::METRICS.ca_rotation_waiting.set(0);
            continue;
        };
        let (_, waiting_for, _) = waiting(&shared, &view);
        crate::metrics::METRICS.ca_rotation_waiting.set(waiting_for.len() as i64);
        if !waiting_for.is_empty() || (r.min_phase_secs > 0 && unix_now() <= r.since + r.min_phase_secs) {
            continue;
        }
        let next = match r.phase {
            Phase::Publishing => Phase::Reissuing,
            Phase::Reissuing => Phase::Done,
            Phase::Aborting => Phase::Aborted,
            Phase::Done | Phase::Aborted => continue,
        };
        let s = shared.clone();
        let result = tokio::task::spawn_blocking(move || s.ca.step(&view, r, next)).await;
        match result {
            Ok(Ok(())) => {
                tracing::info!(target: "audit", event = "ca_rotation_step", phase = next.name(), "root CA rotation moved on")
            }
            Ok(Err(RotateError::Conflict)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot move the root CA rotation on; retrying"),
            Err(_) => {}
        }
    }
}

/// The CA in a data directory: `ca/ca.pem` and `ca/ca-key.pem` (0600), and
/// during a rotation `ca/rotation.json` and `ca/next-key.pem` (0600).
#[derive(Debug)]
pub struct FileHome {
    dir: PathBuf,
    /// A CA given by --ca-cert/--ca-key, or one per replica: not rotated here.
    fixed: Option<String>,
    operator: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    td: TrustDomain,
}

impl FileHome {
    /// The data directory's CA (generated on first start), or the operator's.
    pub fn new(
        data_dir: &Path,
        td: &TrustDomain,
        operator: Option<(&Path, &Path, Option<&Path>)>,
        fixed: Option<String>,
    ) -> Self {
        let fixed = fixed.or_else(|| {
            operator.map(|_| {
                "the CA comes from --ca-cert/--ca-key: rotate it by giving the control plane a new CA (with --ca-bundle holding both roots until every certificate is renewed), or keep the CA in the store instead".to_string()
            })
        });
        Self {
            dir: data_dir.join("ca"),
            fixed,
            operator: operator.map(|(c, k, b)| (c.to_path_buf(), k.to_path_buf(), b.map(Path::to_path_buf))),
            td: td.clone(),
        }
    }

    fn rotation_path(&self) -> PathBuf {
        self.dir.join("rotation.json")
    }
    fn next_key_path(&self) -> PathBuf {
        self.dir.join("next-key.pem")
    }

    fn io(what: &'static str, path: &Path, e: std::io::Error) -> StoreError {
        StoreError::Ca { why: format!("cannot {what} {}: {e}", path.display()) }
    }
}

impl CaHome for FileHome {
    fn load(&self) -> Result<Loaded, StoreError> {
        let pki = |e: crate::pki::PkiError| StoreError::Ca { why: e.to_string() };
        let record: Option<RotationRecord> = match std::fs::read(self.rotation_path()) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| StoreError::Ca {
                why: format!("{} is unreadable: {e}", self.rotation_path().display()),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Self::io("read", &self.rotation_path(), e)),
        };
        let next_key = match std::fs::read_to_string(self.next_key_path()) {
            Ok(k) => Some(SecretPem::new(k)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Self::io("read", &self.next_key_path(), e)),
        };
        let new = match (&record, next_key) {
            (Some(r), Some(k)) => Some(
                CertificateAuthority::from_pem(&r.new_cert_pem, k, None)
                    .map_err(|e| StoreError::Ca { why: format!("the new root of the rotation: {e}") })?,
            ),
            _ => None,
        };
        // `done` is written first; a crash before the CA files followed is finished here.
        if let (Some(r), Some(n)) = (&record, &new)
            && r.phase == Phase::Done
            && self.operator.is_none()
        {
            write_ca_files(&self.dir, n)?;
            let _ = std::fs::remove_file(self.next_key_path());
        }
        let operator = self.operator.as_ref().map(|(c, k, b)| (c.as_path(), k.as_path(), b.as_deref()));
        let ca = crate::pki::load_or_create_ca(self.dir.parent().unwrap_or(Path::new(".")), &self.td, operator)
            .map_err(pki)?;
        let version = record.as_ref().map(|r| r.seq as i64).unwrap_or(0);
        let new = new.filter(|_| record.as_ref().is_some_and(|r| r.phase != Phase::Done));
        Ok(Loaded { ca, rotation: record.map(|r| (r, new)), version })
    }

    fn save(&self, expect: i64, w: Write<'_>) -> Result<bool, StoreError> {
        let current = match std::fs::read(self.rotation_path()) {
            Ok(b) => serde_json::from_slice::<RotationRecord>(&b).map(|r| r.seq as i64).unwrap_or(-1),
            Err(_) => 0,
        };
        if current != expect {
            return Ok(false);
        }
        if w.keep || w.replace_ca {
            palisade_certs::files::write_secret(&self.next_key_path(), w.new.key_pem().expose())
                .map_err(|e| Self::io("write", &self.next_key_path(), e))?;
        }
        let json = serde_json::to_vec_pretty(w.record).map_err(|e| StoreError::Ca { why: e.to_string() })?;
        palisade_certs::files::write_atomic(&self.rotation_path(), &json, 0o600)
            .map_err(|e| Self::io("write", &self.rotation_path(), e))?;
        if w.replace_ca {
            // The record says done; now the files (a crash here is finished by `load`).
            write_ca_files(&self.dir, w.new)?;
        }
        if !w.keep {
            let _ = std::fs::remove_file(self.next_key_path());
        }
        Ok(true)
    }

    fn not_rotatable(&self) -> Option<String> {
        self.fixed.clone()
    }
}

fn write_ca_files(dir: &Path, ca: &CertificateAuthority) -> Result<(), StoreError> {
    let io = |p: PathBuf, e: std::io::Error| FileHome::io("write", &p, e);
    // Key first: a certificate without its key would be unusable on the next start.
    palisade_certs::files::write_secret(&dir.join("ca-key.pem"), ca.key_pem().expose())
        .map_err(|e| io(dir.join("ca-key.pem"), e))?;
    palisade_certs::files::write_public(&dir.join("ca.pem"), &ca.cert_pem()).map_err(|e| io(dir.join("ca.pem"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn a_file_rotation_walks_its_phases_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Authority::open(Box::new(FileHome::new(dir.path(), &td(), None, None)), td()).unwrap();
        let a = open();
        let old = a.view().signing_sha.clone();
        assert!(a.view().rotation.is_none());
        a.start(Duration::ZERO, None).unwrap();
        let v = a.view();
        assert_eq!(v.rotation.as_ref().unwrap().phase, Phase::Publishing);
        assert_eq!(v.signing_sha, old, "publishing signs with the old root");
        assert_eq!(v.bundle.len(), 2);
        assert!(a.start(Duration::ZERO, None).unwrap_err().to_string().contains("in progress"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca/next-key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A restart in the middle finds the same phase and both roots.
        drop(a);
        let a = open();
        let v = a.view();
        let r = v.rotation.clone().unwrap();
        assert_eq!((r.phase, v.bundle.len()), (Phase::Publishing, 2));
        a.step(&v, r, Phase::Reissuing).unwrap();
        let v = a.view();
        assert_ne!(v.signing_sha, old, "reissuing signs with the new root");
        assert_eq!(v.renew_unless.len(), 1);
        let new = v.signing_sha.clone();
        let r = v.rotation.clone().unwrap();
        a.step(&v, r, Phase::Done).unwrap();
        let v = a.view();
        assert_eq!((v.bundle.len(), v.signing_sha.clone()), (1, new.clone()));
        assert!(!dir.path().join("ca/next-key.pem").exists(), "the key is in ca-key.pem now");
        drop(a);
        let a = open();
        assert_eq!(a.view().signing_sha, new, "the new root is the CA after a restart");
        assert_eq!(a.view().rotation.as_ref().unwrap().phase, Phase::Done);
        assert!(a.abort().unwrap_err().to_string().contains("retired"));
    }

    #[test]
    fn an_abort_renews_back_before_the_new_root_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(Box::new(FileHome::new(dir.path(), &td(), None, None)), td()).unwrap();
        let old = a.view().signing_sha.clone();
        a.start(Duration::ZERO, None).unwrap();
        a.abort().unwrap();
        assert_eq!(a.view().rotation.as_ref().unwrap().phase, Phase::Aborted, "nothing was signed by the new root");
        assert_eq!(a.view().bundle.len(), 1);
        a.start(Duration::ZERO, None).unwrap();
        let v = a.view();
        a.step(&v, v.rotation.clone().unwrap(), Phase::Reissuing).unwrap();
        a.abort().unwrap();
        let v = a.view();
        assert_eq!(v.rotation.as_ref().unwrap().phase, Phase::Aborting);
        assert_eq!((v.signing_sha.clone(), v.bundle.len()), (old.clone(), 2), "back to the old root, both trusted");
        a.step(&v, v.rotation.clone().unwrap(), Phase::Aborted).unwrap();
        assert_eq!((a.view().signing_sha.clone(), a.view().bundle.len()), (old, 1));
    }

    #[test]
    fn an_operators_new_root_must_be_a_fresh_root_of_this_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(Box::new(FileHome::new(dir.path(), &td(), None, None)), td()).unwrap();
        let v = a.view();
        let same = CertificateAuthority::from_pem(&v.signing.cert_pem(), v.signing.key_pem().clone(), None).unwrap();
        assert!(a.start(Duration::ZERO, Some(same)).unwrap_err().to_string().contains("in force already"));
        let foreign = TrustDomain::new("other.example").unwrap();
        let other = CertificateAuthority::generate(&foreign, Duration::from_secs(365 * 86400)).unwrap();
        assert!(a.start(Duration::ZERO, Some(other)).unwrap_err().to_string().contains("trust domain other.example"));
        let short = CertificateAuthority::generate(&td(), Duration::from_secs(86400)).unwrap();
        assert!(a.start(Duration::ZERO, Some(short)).unwrap_err().to_string().contains("at least 30 days"));
        assert!(a.view().rotation.is_none(), "nothing started");
        let good = CertificateAuthority::generate(&td(), Duration::from_secs(365 * 86400)).unwrap();
        let sha = sha256_hex(&good.trust_bundle()[0]);
        a.start(Duration::ZERO, Some(good)).unwrap();
        let v = a.view();
        assert_eq!(v.bundle.len(), 2);
        assert_eq!(sha256_hex(&v.bundle[1]), sha);
    }

    #[test]
    fn an_operator_ca_is_not_rotated_here() {
        let dir = tempfile::tempdir().unwrap();
        let home = FileHome::new(dir.path(), &td(), None, Some("fixed".into()));
        let a = Authority::open(Box::new(home), td()).unwrap();
        assert_eq!(a.start(Duration::ZERO, None).unwrap_err().to_string(), "fixed");
    }
}
