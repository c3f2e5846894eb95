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
//!
//! A rotation also cross-signs the new root with the old one, so that pods
//! still carrying the old bundle in their spec verify the control plane
//! after `done` ([`cross`]).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use palisade_certs::tls::TrustBundle;
use palisade_certs::{CertificateAuthority, TrustDomain};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::store::sealed::SecretError;
use palisade_cmd::unix_now;

mod cross;
mod drive;
mod file_home;
mod sealed_home;
#[cfg(test)]
mod tests;

pub(crate) use drive::{drive, status};
pub use file_home::FileHome;
pub use sealed_home::{SECRET_NAMES, SealedHome, migrating};

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
    /// The new root cross-signed by the old one (then the old CA's
    /// intermediates), PEM; public. Served from `reissuing` on, and kept
    /// after `done`; empty if it could not be made.
    #[serde(default)]
    pub cross_pem: String,
    /// The cross certificates of earlier rotations (newest first, each a
    /// PEM like `cross_pem`), served as long as they are valid.
    #[serde(default)]
    pub earlier_cross_pem: Vec<String>,
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

/// Why the CA or its rotation could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("CA: {why}")]
    Ca { why: String },
}

impl HomeError {
    pub(crate) fn ca(why: impl std::fmt::Display) -> Self {
        Self::Ca { why: why.to_string() }
    }
}

/// Where the CA and its rotation live: the data directory's CA files
/// ([`FileHome`]), or the store's sealed secrets ([`SealedHome`]).
pub trait CaHome: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<Loaded, HomeError>;
    /// Writes if the rotation record's token is still `expect`; `false` if another write came first.
    fn save(&self, expect: i64, w: Write<'_>) -> Result<bool, HomeError>;
    /// `Some(why)` when this CA cannot be rotated by the control plane.
    fn not_rotatable(&self) -> Option<String> {
        None
    }
}

pub use palisade_certs::ca::sha256_hex;

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
    /// Cross certificates the control plane sends after each of its own
    /// certificates, for clients that trust only a retired root.
    pub cross: Vec<CertificateDer<'static>>,
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
        let cross = cross::served(record.as_ref(), SystemTime::now());
        Self {
            signing,
            signing_sha,
            bundle,
            renew_unless,
            cross,
            rotation: record,
            version: l.version,
            old: Some(base),
            new,
        }
    }

    pub fn bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| palisade_certs::ca::der_to_pem(c)).collect()
    }

    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        self.bundle.iter().map(|c| c.to_vec()).collect()
    }
}

/// The certificate a CA signs with (its root, for a generated CA).
pub(crate) fn signing_cert(ca: &CertificateAuthority) -> CertificateDer<'static> {
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
    Store(#[from] HomeError),
    #[error("cannot generate the new root: {0}")]
    Generate(String),
    #[error("{0}")]
    Invalid(String),
}

impl Authority {
    pub fn open(home: Box<dyn CaHome>, td: TrustDomain) -> Result<Self, HomeError> {
        let view = View::from_loaded(home.load()?);
        let trust = TrustBundle::new(&view.bundle).map_err(HomeError::ca)?;
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
    pub fn reload(&self) -> Result<bool, HomeError> {
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
            cross_pem: cross::make(&old, &new),
            earlier_cross_pem: cross::carried(view.rotation.as_ref(), SystemTime::now()),
            seq: view.rotation.as_ref().map(|r| r.seq + 1).unwrap_or(1),
        };
        self.write(&view, Write { record: &record, new: &new, keep: true, replace_ca: false })?;
        cross::audit(&record);
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

    pub(crate) fn step(&self, view: &View, r: RotationRecord, next: Phase) -> Result<(), RotateError> {
        let record = RotationRecord { phase: next, since: unix_now(), seq: r.seq + 1, ..r };
        let keep = matches!(next, Phase::Publishing | Phase::Reissuing | Phase::Aborting);
        let Some(new) = view.new.as_deref() else {
            return Err(RotateError::Precondition("the new root's key is missing from the store".into()));
        };
        self.write(view, Write { record: &record, new, keep, replace_ca: next == Phase::Done })
    }
}
