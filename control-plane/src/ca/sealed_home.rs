//! The CA among the store's sealed secrets (`ca`, and `ca-rotation` with
//! the new root while it is needed): on etcd, shared by every replica and
//! rotated there. The first replica to start stores the operator's root
//! (`--ca-cert`/`--ca-key`) or generates one; the others load it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_certs::{CertificateAuthority, SecretPem, TrustDomain};
use serde::{Deserialize, Serialize};

use super::{CaHome, HomeError, Loaded, RotationRecord, Write};
use crate::store::sealed::{SecretHome, SecretWrite};

/// The CA record's name.
const CA: &str = "ca";
/// The rotation record's name.
const ROTATION: &str = "ca-rotation";
/// The secret records the CA keeps (a change of one is a change of the CA).
pub const SECRET_NAMES: [&str; 2] = [CA, ROTATION];

/// A CA as a secret record: its certificate and its key.
#[derive(Serialize, Deserialize)]
struct CaPem {
    cert_pem: String,
    key_pem: String,
}

impl CaPem {
    fn of(ca: &CertificateAuthority) -> Self {
        Self { cert_pem: ca.cert_pem(), key_pem: ca.key_pem().expose().to_string() }
    }

    fn to_bytes(&self) -> Result<Vec<u8>, HomeError> {
        serde_json::to_vec(self).map_err(HomeError::ca)
    }

    fn open(self, what: &str) -> Result<CertificateAuthority, HomeError> {
        CertificateAuthority::from_pem(&self.cert_pem, SecretPem::new(self.key_pem), None)
            .map_err(|e| HomeError::ca(format!("{what}: {e}")))
    }
}

/// The rotation record, with the new root while it is needed.
#[derive(Serialize, Deserialize)]
struct RotationValue {
    record: RotationRecord,
    new: Option<CaPem>,
}

/// [`CaHome`] on the store's sealed secrets.
#[derive(Debug)]
pub struct SealedHome {
    secrets: Arc<dyn SecretHome>,
    td: TrustDomain,
    validity: Duration,
    /// `--ca-cert`/`--ca-key`: stored by the first replica when the store holds no CA.
    seed: Option<(PathBuf, PathBuf)>,
}

impl SealedHome {
    pub fn new(
        secrets: Arc<dyn SecretHome>,
        td: &TrustDomain,
        validity: Duration,
        seed: Option<(PathBuf, PathBuf)>,
    ) -> Self {
        Self { secrets, td: td.clone(), validity, seed }
    }

    /// The CA in the store; the first call on an empty store puts the seed or a new root there.
    fn shared_ca(&self) -> Result<CertificateAuthority, HomeError> {
        for _ in 0..2 {
            if let Some(v) = self.secrets.get(CA)? {
                let pem: CaPem = serde_json::from_slice(&v.value).map_err(|e| {
                    HomeError::ca(format!("the CA record ({}) is unreadable: {e}", self.secrets.describe(CA)))
                })?;
                return pem.open(&format!("the CA in {}", self.secrets.describe(CA)));
            }
            let ca = match &self.seed {
                Some((cert, key)) => {
                    crate::pki::load_or_create_ca(Path::new("/nonexistent"), &self.td, Some((cert, key, None)))
                        .map_err(HomeError::ca)?
                }
                None => CertificateAuthority::generate(&self.td, self.validity).map_err(HomeError::ca)?,
            };
            // Only if no other replica made one meanwhile; else load the winner's.
            if self.secrets.put(Some((CA, 0)), vec![(CA, Some(CaPem::of(&ca).to_bytes()?))])? {
                let how = if self.seed.is_some() {
                    "stored the CA of --ca-cert/--ca-key"
                } else {
                    "generated the mesh's root CA and stored it"
                };
                tracing::info!(subject = %ca.info().subject, at = %self.secrets.describe(CA), "{how} (key sealed with --store-key-file); from now on the store's copy is the CA in force");
                return Ok(ca);
            }
        }
        Err(HomeError::ca(format!("the CA record ({}) kept changing", self.secrets.describe(CA))))
    }
}

impl CaHome for SealedHome {
    fn load(&self) -> Result<Loaded, HomeError> {
        let ca = self.shared_ca()?;
        let (rotation, version) = match self.secrets.get(ROTATION)? {
            Some(v) => {
                let value: RotationValue = serde_json::from_slice(&v.value).map_err(|e| {
                    HomeError::ca(format!(
                        "the CA rotation record ({}) is unreadable: {e}",
                        self.secrets.describe(ROTATION)
                    ))
                })?;
                let new = value.new.map(|n| n.open("the new root of the rotation")).transpose()?;
                (Some((value.record, new)), v.version)
            }
            None => (None, 0),
        };
        Ok(Loaded { ca, rotation, version })
    }

    fn save(&self, expect: i64, w: Write<'_>) -> Result<bool, HomeError> {
        let value = RotationValue { record: w.record.clone(), new: w.keep.then(|| CaPem::of(w.new)) };
        let mut writes = vec![(ROTATION, Some(serde_json::to_vec(&value).map_err(HomeError::ca)?))];
        if w.replace_ca {
            // One write: the record says done exactly when the new root is the CA.
            writes.push((CA, Some(CaPem::of(w.new).to_bytes()?)));
        }
        Ok(self.secrets.put(Some((ROTATION, expect)), writes)?)
    }
}

/// What `--migrate-from DIR` moves into the store's secrets: the install's
/// generated CA (`DIR/ca/`), if it has one, with its last (finished)
/// rotation, whose cross certificates pods made before it still need.
/// Refuses an install whose root rotation is half done (its new root would
/// be left behind).
pub fn migrating(dir: &Path) -> Result<Vec<SecretWrite>, HomeError> {
    let last = std::fs::read(dir.join("ca/rotation.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<RotationRecord>(&b).ok());
    if let Some(r) = last.as_ref().filter(|r| !r.phase.finished()) {
        return Err(HomeError::ca(format!(
            "--migrate-from {}: a root CA rotation is in progress there (phase {}); let it finish (palisadectl ca status) or abort it, then migrate",
            dir.display(),
            r.phase.name()
        )));
    }
    let ca_dir = dir.join("ca");
    match (std::fs::read_to_string(ca_dir.join("ca.pem")), std::fs::read_to_string(ca_dir.join("ca-key.pem"))) {
        (Ok(cert_pem), Ok(key_pem)) => {
            let mut writes = vec![(CA, Some(CaPem { cert_pem, key_pem }.to_bytes()?))];
            if let Some(record) = last {
                let value = RotationValue { record, new: None };
                writes.push((ROTATION, Some(serde_json::to_vec(&value).map_err(HomeError::ca)?)));
            }
            Ok(writes)
        }
        // An operator CA: every replica is given --ca-cert and --ca-key.
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Authority, Phase};
    use crate::store::sealed::FileSecrets;

    #[test]
    fn a_sealed_home_keeps_one_ca_and_walks_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let secrets: Arc<dyn SecretHome> = Arc::new(FileSecrets::new(dir.path()));
        let home = || Box::new(SealedHome::new(secrets.clone(), &td, Duration::from_secs(365 * 86400), None));
        let a = Authority::open(home(), td.clone()).unwrap();
        let b = Authority::open(home(), td.clone()).unwrap();
        let old = a.view().signing_sha.clone();
        assert_eq!(b.view().signing_sha, old, "the second loads the first one's CA");
        a.start(Duration::ZERO, None).unwrap();
        assert!(b.reload().unwrap(), "b sees the rotation");
        let v = b.view();
        assert_eq!((v.rotation.as_ref().unwrap().phase, v.bundle.len()), (Phase::Publishing, 2));
        // Both race for the next step: one wins, the other is told.
        let va = a.view();
        b.step(&v, v.rotation.clone().unwrap(), Phase::Reissuing).unwrap();
        assert!(a.step(&va, va.rotation.clone().unwrap(), Phase::Reissuing).is_err(), "a stale write");
        let v = b.view();
        b.step(&v, v.rotation.clone().unwrap(), Phase::Done).unwrap();
        let fresh = Authority::open(home(), td.clone()).unwrap();
        assert_ne!(fresh.view().signing_sha, old, "the new root is the CA record now");
        assert_eq!(fresh.view().bundle.len(), 1);
    }

    #[test]
    fn a_migration_keeps_the_last_rotations_cross_certificate() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let td = TrustDomain::new("cluster.local").unwrap();
        let files =
            Authority::open(Box::new(crate::ca::FileHome::new(from.path(), &td, None, None)), td.clone()).unwrap();
        files.start(Duration::ZERO, None).unwrap();
        assert!(migrating(from.path()).unwrap_err().to_string().contains("in progress"));
        for next in [Phase::Reissuing, Phase::Done] {
            let v = files.view();
            files.step(&v, v.rotation.clone().unwrap(), next).unwrap();
        }
        let secrets: Arc<dyn SecretHome> = Arc::new(FileSecrets::new(to.path()));
        assert!(secrets.put(None, migrating(from.path()).unwrap()).unwrap());
        let home = SealedHome::new(secrets, &td, Duration::from_secs(365 * 86400), None);
        let sealed = Authority::open(Box::new(home), td).unwrap();
        assert_eq!(sealed.view().signing_sha, files.view().signing_sha);
        assert_eq!(sealed.view().cross, files.view().cross);
        assert_eq!(sealed.view().cross.len(), 1);
    }
}
