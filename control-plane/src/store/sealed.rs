//! The store's secrets: [`SecretHome`], the one place the control plane
//! keeps secret records (the CA's private key and its rotation, the OAuth
//! signing keys), in a private file of the data dir ([`FileSecrets`]) or
//! sealed in etcd ([`super::etcd::EtcdSecrets`]).
//!
//! What leaves the machine is sealed, envelope encryption: each secret is
//! sealed with a fresh data key (AES-256-GCM), and the data key is sealed
//! with the key-encryption key every replica reads from `--store-key-file`
//! (a Kubernetes Secret), never stored beside them. The key's id (the first
//! bytes of its SHA-256) is kept with each sealed value, so a replica with
//! another key says so instead of failing obscurely.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("--store-key-file {path}: {why}")]
    KeyFile { path: String, why: String },
    #[error("sealed with key {sealed_with}, but --store-key-file holds key {ours}: give every replica the same key")]
    OtherKey { sealed_with: String, ours: String },
    #[error("cannot open the sealed value (tampered with, or not sealed with this key)")]
    Open,
    #[error("no randomness")]
    Random,
}

/// The key-encryption key.
pub struct Kek {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

/// A sealed secret as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key-encryption key.
    pub kek: String,
    /// The data key, sealed with the key-encryption key (nonce then ciphertext, base64).
    pub dek: String,
    /// The secret, sealed with the data key (nonce then ciphertext, base64).
    pub data: String,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn seal_with(key: &LessSafeKey, plain: &[u8], aad: &str) -> Result<String, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).map_err(|_| SealError::Random)?;
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut buf)
        .map_err(|_| SealError::Random)?;
    Ok(B64.encode([&nonce[..], &buf].concat()))
}

fn open_with(key: &LessSafeKey, sealed: &str, aad: &str) -> Result<Vec<u8>, SealError> {
    let bytes = B64.decode(sealed).map_err(|_| SealError::Open)?;
    if bytes.len() < NONCE_LEN {
        return Err(SealError::Open);
    }
    let (nonce, ct) = bytes.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
    let mut buf = ct.to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf).map_err(|_| SealError::Open)?;
    Ok(plain.to_vec())
}

impl Kek {
    /// Reads the key: 32 random bytes in base64 (`openssl rand -base64 32`),
    /// from a file no one else may read (`private` says whether the file's
    /// mode is as strict as the CA key's; `pki::check_key_mode`).
    pub fn from_file(path: &Path, private: impl FnOnce(&Path) -> bool) -> Result<Self, SealError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |why: String| SealError::KeyFile { path: path.display().to_string(), why };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        // As strict as the CA key: the owner only, or a Kubernetes Secret
        // mounted root:fsGroup 0440 for this process's group.
        if !private(path) {
            return Err(err(format!(
                "mode {:o}: it must be readable by no one else (chmod 600; group read only for a group of this process, as Kubernetes fsGroup mounts give)",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let raw = B64
            .decode(text.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| err("must hold 32 random bytes in base64 (openssl rand -base64 32)".into()))?;
        Self::from_bytes(&raw).map_err(|_| err("unusable key".into()))
    }

    pub(crate) fn from_bytes(raw: &[u8]) -> Result<Self, SealError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, raw);
        let id = palisade_cmd::hex(&digest.as_ref()[..6]);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).map_err(|_| SealError::Open)?);
        Ok(Self { key, id })
    }

    /// Seals `plain` for the record named `what` (bound to it: a sealed
    /// value moved to another record does not open).
    pub fn seal(&self, plain: &[u8], what: &str) -> Result<Sealed, SealError> {
        let mut dek = [0u8; 32];
        SystemRandom::new().fill(&mut dek).map_err(|_| SealError::Random)?;
        let data_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek).map_err(|_| SealError::Random)?);
        Ok(Sealed {
            kek: self.id.clone(),
            dek: seal_with(&self.key, &dek, what)?,
            data: seal_with(&data_key, plain, what)?,
        })
    }

    /// Opens what [`Kek::seal`] sealed for `what`.
    pub fn open(&self, sealed: &Sealed, what: &str) -> Result<Vec<u8>, SealError> {
        if sealed.kek != self.id {
            return Err(SealError::OtherKey { sealed_with: sealed.kek.clone(), ours: self.id.clone() });
        }
        let dek = open_with(&self.key, &sealed.dek, what)?;
        let data_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek).map_err(|_| SealError::Open)?);
        open_with(&data_key, &sealed.data, what)
    }
}

/// A secret record as read: its plain bytes and its version, the token a
/// guarded write compares (0 stands for "absent").
#[derive(Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: i64,
}

impl std::fmt::Debug for Versioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Versioned").field("version", &self.version).finish_non_exhaustive()
    }
}

/// One write of a guarded [`SecretHome::put`]: `Some` bytes, or `None` to delete.
pub type SecretWrite = (&'static str, Option<Vec<u8>>);

/// Where the control plane keeps secret records, by name. Values are
/// opaque bytes to the store (the CA and the token service give them
/// meaning); an implementation seals what it keeps off this machine.
pub trait SecretHome: Send + Sync + std::fmt::Debug {
    /// The record `name`, opened; `None` if there is none.
    fn get(&self, name: &str) -> Result<Option<Versioned>, SecretError>;
    /// Makes `writes` if the record `guard.0` is still at version `guard.1`
    /// (0: it must not exist); `false` if another writer came first (and
    /// nothing was written). On etcd the writes are one transaction; in
    /// files, made in order (a reader finishes what a crash interrupts).
    fn put(&self, guard: Option<(&str, i64)>, writes: Vec<SecretWrite>) -> Result<bool, SecretError>;
    /// Where `name` lives, for messages (a path, or `etcd:<key>`).
    fn describe(&self, name: &str) -> String;
}

/// Why a secret record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{at}: cannot {what}: {source}")]
    Io { at: String, what: &'static str, source: std::io::Error },
    #[error("{at}: {source}")]
    Seal { at: String, source: SealError },
    #[error("{at}: unreadable ({why})")]
    Corrupt { at: String, why: String },
    #[error("{at}: {source}")]
    Store { at: String, source: Box<super::StoreError> },
}

/// Secret records as files of a directory, one per name, mode 0600 (the
/// data dir is the owner's alone): the single-node home, and the home of a
/// replica that keeps its own secrets. The version of a record is a hash
/// of its bytes, compared under the data dir's lock: this process is the
/// only writer.
#[derive(Debug, Clone)]
pub struct FileSecrets {
    dir: PathBuf,
}

impl FileSecrets {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn version(bytes: &[u8]) -> i64 {
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut v = [0u8; 8];
        v.copy_from_slice(&d.as_ref()[..8]);
        // Never 0, which stands for "absent".
        (i64::from_be_bytes(v) & i64::MAX).max(1)
    }
}

impl SecretHome for FileSecrets {
    fn get(&self, name: &str) -> Result<Option<Versioned>, SecretError> {
        match std::fs::read(self.path(name)) {
            Ok(value) => Ok(Some(Versioned { version: Self::version(&value), value })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SecretError::Io { at: self.describe(name), what: "read", source }),
        }
    }

    fn put(&self, guard: Option<(&str, i64)>, writes: Vec<SecretWrite>) -> Result<bool, SecretError> {
        if let Some((name, expect)) = guard {
            let now = self.get(name)?.map(|v| v.version).unwrap_or(0);
            if now != expect {
                return Ok(false);
            }
        }
        for (name, value) in writes {
            let path = self.path(name);
            let io = |what, source| SecretError::Io { at: path.display().to_string(), what, source };
            match value {
                Some(v) => palisade_certs::files::write_atomic(&path, &v, 0o600).map_err(|e| io("write", e))?,
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", e)),
                    _ => {}
                },
            }
        }
        Ok(true)
    }

    fn describe(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_record() {
        let k = Kek::from_bytes(&[7u8; 32]).unwrap();
        let s = k.seal(b"-----BEGIN PRIVATE KEY-----", "ca").unwrap();
        assert!(!s.data.contains("PRIVATE") && !format!("{k:?}").contains('7'));
        assert_eq!(k.open(&s, "ca").unwrap(), b"-----BEGIN PRIVATE KEY-----");
        assert!(matches!(k.open(&s, "other"), Err(SealError::Open)), "bound to its record");
        let other = Kek::from_bytes(&[8u8; 32]).unwrap();
        assert!(matches!(other.open(&s, "ca"), Err(SealError::OtherKey { .. })));
        let mut tampered = s.clone();
        tampered.data.replace_range(20..24, "AAAA");
        assert!(matches!(k.open(&tampered, "ca"), Err(SealError::Open)));
        // Two seals of one value differ (fresh data keys and nonces).
        assert_ne!(k.seal(b"x", "ca").unwrap(), k.seal(b"x", "ca").unwrap());
    }

    #[test]
    fn key_files_must_be_private_and_32_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, B64.encode([1u8; 32])).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let private = |p: &Path| crate::pki::check_key_mode(p).is_ok();
        assert!(Kek::from_file(&f, private).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Kek::from_file(&f, private).is_ok());
        std::fs::write(&f, B64.encode([1u8; 16])).unwrap();
        assert!(Kek::from_file(&f, private).unwrap_err().to_string().contains("32 random bytes"));
    }

    #[test]
    fn file_secrets_are_private_and_written_only_at_the_version_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = FileSecrets::new(dir.path());
        assert!(home.get("k").unwrap().is_none());
        assert!(home.put(Some(("k", 0)), vec![("k", Some(b"s3cret".to_vec()))]).unwrap());
        assert!(!home.put(Some(("k", 0)), vec![("k", Some(b"two".to_vec()))]).unwrap(), "it exists now");
        let v = home.get("k").unwrap().unwrap();
        assert_eq!(v.value, b"s3cret");
        assert!(!format!("{v:?}").contains("s3cret"), "no secret in Debug");
        let mode = std::fs::metadata(dir.path().join("k")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            home.put(Some(("k", v.version)), vec![("k", Some(b"two".to_vec())), ("j", Some(b"x".to_vec()))]).unwrap()
        );
        assert!(!home.put(Some(("k", v.version)), vec![("k", None)]).unwrap(), "a stale version");
        let v = home.get("k").unwrap().unwrap();
        assert!(home.put(Some(("k", v.version)), vec![("k", None)]).unwrap());
        assert!(home.get("k").unwrap().is_none());
        assert_eq!(home.get("j").unwrap().unwrap().value, b"x");
    }
}
