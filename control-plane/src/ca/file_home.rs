//! The CA in a data directory, as files.

use std::path::{Path, PathBuf};

use palisade_certs::{CertificateAuthority, SecretPem, TrustDomain};

use super::{CaHome, HomeError, Loaded, Phase, RotationRecord, Write};

/// The CA in a data directory: `ca/ca.pem` and `ca/ca-key.pem` (0600), and
/// during a rotation `ca/rotation.json` and `ca/next-key.pem` (0600).
#[derive(Debug)]
pub struct FileHome {
    dir: PathBuf,
    /// A CA given by --ca-cert/--ca-key, or one per replica: not rotated here.
    fixed: Option<String>,
    operator: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    /// A self-signed root (--ca-cert/--ca-key with --ca-seed) copied into the
    /// data directory on the first start, then kept and rotated there.
    seed: Option<(PathBuf, PathBuf)>,
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
            seed: None,
            td: td.clone(),
        }
    }

    /// The data directory's CA, seeded on the first start from the
    /// self-signed root `cert` and its `key` (--ca-seed), rotatable.
    pub fn seeded(data_dir: &Path, td: &TrustDomain, cert: &Path, key: &Path) -> Self {
        Self { seed: Some((cert.to_path_buf(), key.to_path_buf())), ..Self::new(data_dir, td, None, None) }
    }

    /// On the first start, the seed becomes the data directory's CA; later,
    /// the data directory's (perhaps rotated since) stays in force.
    fn plant_seed(&self) -> Result<(), HomeError> {
        let Some((cert, key)) = &self.seed else { return Ok(()) };
        let seed = crate::pki::load_or_create_ca(Path::new("/nonexistent"), &self.td, Some((cert, key, None)))
            .map_err(HomeError::ca)?;
        let root = super::signing_cert(&seed);
        if !palisade_certs::ca::is_self_signed(&root) {
            return Err(HomeError::ca(format!(
                "--ca-seed: {} is not a self-signed root (an intermediate is the operator's to rotate: drop --ca-seed)",
                cert.display()
            )));
        }
        let planted = self.dir.join("ca.pem");
        match std::fs::read_to_string(&planted) {
            Ok(pem) if pem.trim() == seed.cert_pem().trim() => {}
            Ok(_) => {
                tracing::info!(seed = %cert.display(), ca = %planted.display(), "the data dir's CA is in force: --ca-cert only seeded it on the first start, and a rotation has replaced it since (or the seed changed)")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.dir).map_err(|e| Self::io("create", &self.dir, e))?;
                write_ca_files(&self.dir, &seed)?;
                tracing::info!(seed = %cert.display(), ca = %planted.display(), "seeded the data dir's CA from --ca-cert/--ca-key; from now on it is kept and rotated there");
            }
            Err(e) => return Err(Self::io("read", &planted, e)),
        }
        Ok(())
    }

    fn rotation_path(&self) -> PathBuf {
        self.dir.join("rotation.json")
    }
    fn next_key_path(&self) -> PathBuf {
        self.dir.join("next-key.pem")
    }

    fn io(what: &'static str, path: &Path, e: std::io::Error) -> HomeError {
        HomeError::ca(format!("cannot {what} {}: {e}", path.display()))
    }
}

impl CaHome for FileHome {
    fn load(&self) -> Result<Loaded, HomeError> {
        let pki = |e: crate::pki::PkiError| HomeError::ca(e);
        self.plant_seed()?;
        let record: Option<RotationRecord> = match std::fs::read(self.rotation_path()) {
            Ok(b) => Some(
                serde_json::from_slice(&b)
                    .map_err(|e| HomeError::ca(format!("{} is unreadable: {e}", self.rotation_path().display())))?,
            ),
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
                    .map_err(|e| HomeError::ca(format!("the new root of the rotation: {e}")))?,
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

    fn save(&self, expect: i64, w: Write<'_>) -> Result<bool, HomeError> {
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
        let json = serde_json::to_vec_pretty(w.record).map_err(HomeError::ca)?;
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

fn write_ca_files(dir: &Path, ca: &CertificateAuthority) -> Result<(), HomeError> {
    let io = |p: PathBuf, e: std::io::Error| FileHome::io("write", &p, e);
    // Key first: a certificate without its key would be unusable on the next start.
    palisade_certs::files::write_secret(&dir.join("ca-key.pem"), ca.key_pem().expose())
        .map_err(|e| io(dir.join("ca-key.pem"), e))?;
    palisade_certs::files::write_public(&dir.join("ca.pem"), &ca.cert_pem()).map_err(|e| io(dir.join("ca.pem"), e))
}
