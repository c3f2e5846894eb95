//! The control plane's own PKI on disk: the CA (generated on first start or
//! the operator's), the admin credential for palisadectl, and the control
//! plane's server certificate, reissued before it expires.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use palisade_certs::ca::parse_pem_certs;
use palisade_certs::csr::certified_key_from_pem;
use palisade_certs::files::{write_public, write_secret};
use palisade_certs::tls::{Svid, SvidStore};
use palisade_certs::{CaError, CertificateAuthority, SecretPem, SvidInfo, TrustDomain};
use rustls_pki_types::CertificateDer;

/// Lifetime of a generated root CA.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// Lifetime of the admin credential (capped by the CA's).
pub const ADMIN_VALIDITY: Duration = Duration::from_secs(90 * 86400);
/// The admin credential is reissued on start when less than this is left.
const ADMIN_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86400);
/// Lifetime of the control plane's server certificate; it is reissued at half.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("CA from {path}: {source}")]
    Ca { path: PathBuf, source: CaError },
    #[error("{0}")]
    Issue(#[from] CaError),
    #[error(
        "CA key file {path} has mode {mode:o}; it must be readable by no one else (chmod 600; group read only for a group of this process, as Kubernetes fsGroup mounts give)"
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("admin credential: {0}")]
    Key(#[from] palisade_certs::CsrError),
}

fn read(path: &Path, what: &'static str) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { what, path: path.to_path_buf(), source })
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let r = if secret { write_secret(path, contents) } else { write_public(path, contents) };
    r.map_err(|source| PkiError::Io { what: "write", path: path.to_path_buf(), source })
}

/// A CA key file must be readable only by this process. Mode 0600/0400 is
/// that; so is group read (0440/0640) when the group is one this process
/// is in and the file belongs to root or to us: that is how Kubernetes
/// mounts a Secret with `fsGroup` (root:fsGroup, mode 0440 whatever
/// `defaultMode` says), and only the pod's own processes hold that group.
/// Group write or execute and any bit for others are refused.
pub(crate) fn check_key_mode(path: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta =
        std::fs::metadata(path).map_err(|source| PkiError::Io { what: "stat", path: path.to_path_buf(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    let refuse = || Err(PkiError::KeyMode { path: path.to_path_buf(), mode });
    if mode & 0o007 != 0 || mode & 0o030 != 0 {
        return refuse();
    }
    if mode & 0o040 != 0 {
        let ids = process_ids();
        let owner_ok = meta.uid() == 0 || Some(meta.uid()) == ids.uid;
        if !owner_ok || !ids.groups.contains(&meta.gid()) {
            return refuse();
        }
        tracing::info!(path = %path.display(), mode = format!("{mode:o}"), gid = meta.gid(), "CA key is readable by this process's group (a Kubernetes fsGroup mount); accepted");
    }
    Ok(())
}

/// This process's effective user and every group it holds (effective and
/// supplementary), from /proc/self/status.
struct ProcessIds {
    uid: Option<u32>,
    groups: Vec<u32>,
}

fn process_ids() -> ProcessIds {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default()
    };
    // "Uid:/Gid:" list real, effective, saved, filesystem ids.
    let uid = field("Uid:").get(1).copied();
    let mut groups = field("Groups:");
    groups.extend(field("Gid:").get(1));
    ProcessIds { uid, groups }
}

/// The operator's CA files with the roots to trust resolved: a cert-manager
/// `Certificate` Secret holds tls.crt (the CA, maybe followed by its
/// parents), tls.key and ca.crt (the issuing root). When tls.crt holds no
/// root and no bundle was given, the ca.crt beside it is the bundle; when
/// it holds its root (a self-signed CA), nothing changes, so such a root
/// still seeds the store on etcd and rotates there.
pub fn operator_ca(mut ca: crate::config::OperatorCa) -> crate::config::OperatorCa {
    if ca.bundle.is_some() || ca.cert.file_name().is_none_or(|n| n != "tls.crt") {
        return ca;
    }
    let root = ca.cert.with_file_name("ca.crt");
    let holds_root = std::fs::read_to_string(&ca.cert)
        .ok()
        .and_then(|pem| parse_pem_certs(&pem).ok())
        .is_some_and(|certs| certs.iter().any(|c| palisade_certs::ca::is_self_signed(c)));
    if !holds_root && root.is_file() {
        tracing::info!(cert = %ca.cert.display(), bundle = %root.display(), "the CA certificate holds no root: trusting the ca.crt beside it (a cert-manager Secret)");
        ca.bundle = Some(root);
    }
    ca
}

/// Loads the operator's CA, or the one in `<data>/ca/`, or generates and saves a new root.
pub fn load_or_create_ca(
    data_dir: &Path,
    td: &TrustDomain,
    operator: Option<(&Path, &Path, Option<&Path>)>,
) -> Result<CertificateAuthority, PkiError> {
    if let Some((cert, key, bundle)) = operator {
        check_key_mode(key)?;
        let bundle_pem = bundle.map(|b| read(b, "read")).transpose()?;
        return CertificateAuthority::from_pem(
            &read(cert, "read")?,
            SecretPem::new(read(key, "read")?),
            bundle_pem.as_deref(),
        )
        .map_err(|source| {
            // Name the file at fault: the key's for a key error.
            let path = if matches!(source, CaError::KeyPem { .. }) { key } else { cert };
            PkiError::Ca { path: path.to_path_buf(), source }
        });
    }
    let dir = data_dir.join("ca");
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    if cert_path.exists() {
        check_key_mode(&key_path)?;
        return CertificateAuthority::from_pem(
            &read(&cert_path, "read")?,
            SecretPem::new(read(&key_path, "read")?),
            None,
        )
        .map_err(|source| PkiError::Ca { path: cert_path, source });
    }
    std::fs::create_dir_all(&dir).map_err(|source| PkiError::Io { what: "create", path: dir.clone(), source })?;
    let ca = CertificateAuthority::generate(td, ROOT_VALIDITY)?;
    // Key first: a cert without its key would be unusable on the next start.
    write(&key_path, ca.key_pem().expose(), true)?;
    write(&cert_path, &ca.cert_pem(), false)?;
    tracing::info!(subject = %ca.info().subject, not_after = %palisade_certs::svid::rfc3339::format(ca.info().not_after), path = %cert_path.display(), "generated a new root CA");
    Ok(ca)
}

/// Paths of the admin credential.
#[derive(Debug, Clone)]
pub struct AdminCredential {
    pub dir: PathBuf,
}

impl AdminCredential {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

/// Ensures `<data>/admin/` holds a valid admin credential for this CA,
/// issuing one if it is missing, expiring soon, from another CA, or (during
/// a root rotation) not from the root that signs now or with another bundle.
/// `ca` is the CA that signs now, `bundle_pem` the roots in force.
pub fn ensure_admin_credential(
    data_dir: &Path,
    ca: &CertificateAuthority,
    bundle_pem: &str,
    td: &TrustDomain,
) -> Result<AdminCredential, PkiError> {
    let cred = AdminCredential { dir: data_dir.join("admin") };
    let reusable = (|| {
        let chain = parse_pem_certs(&std::fs::read_to_string(cred.cert()).ok()?).ok()?;
        let bundle_now = std::fs::read_to_string(cred.ca()).ok()?;
        let roots = palisade_certs::svid::root_store(ca.trust_bundle()).ok()?;
        palisade_certs::svid::verify_chain(&chain, &roots, SystemTime::now()).ok()?;
        let (id, info) = SvidInfo::parse_svid(&chain[0]).ok()?;
        let fresh =
            info.time_left(SystemTime::now()) > ADMIN_RENEW_BEFORE.min(ca.info().time_left(SystemTime::now()) / 2);
        let key_ok = cred.key().exists();
        (id == td.admin() && fresh && key_ok && bundle_now == bundle_pem).then_some(())
    })();
    if reusable.is_some() {
        return Ok(cred);
    }
    std::fs::create_dir_all(&cred.dir).map_err(|source| PkiError::Io {
        what: "create",
        path: cred.dir.clone(),
        source,
    })?;
    let ttl = ADMIN_VALIDITY.min(ca.info().time_left(SystemTime::now()));
    // A credential is renewed for the key it has: palisadectl, reading
    // cert.pem then key.pem while they are rewritten (a root rotation's
    // steps), would otherwise pair a new certificate with the old key.
    let kept = std::fs::read_to_string(cred.key()).ok().map(SecretPem::new).and_then(|key| {
        let issued = ca.issue_for_key(&td.admin(), &[], &[], ttl, &key).ok()?;
        Some((issued, key))
    });
    let renewed = kept.is_some();
    let (issued, key) = match kept {
        Some(k) => k,
        None => ca.issue_with_key(&td.admin(), &[], &[], ttl)?,
    };
    // The key last: whoever waits for it (scripts, tests) then finds all three.
    write(&cred.ca(), bundle_pem, false)?;
    write(&cred.cert(), &issued.chain_pem(), false)?;
    if !renewed {
        write(&cred.key(), key.expose(), true)?;
    }
    tracing::info!(dir = %cred.dir.display(), identity = %td.admin(), not_after = %palisade_certs::svid::rfc3339::format(issued.info.not_after), "wrote the admin credential for palisadectl");
    Ok(cred)
}

/// Issues the control plane's server certificate into `store`; its chain
/// ends with `cross` (the root rotations' cross certificates, for clients
/// that trust only a retired root; see `ca::cross`).
pub fn issue_server_cert(
    ca: &CertificateAuthority,
    cross: &[CertificateDer<'static>],
    td: &TrustDomain,
    names: &[String],
    ips: &[IpAddr],
    store: &SvidStore,
) -> Result<(), PkiError> {
    let (issued, key) = ca.issue_with_key(&td.control_plane(), names, ips, SERVER_CERT_TTL)?;
    let chain = issued.chain.iter().chain(cross).cloned().collect();
    let certified = certified_key_from_pem(chain, &key)?;
    store.set(Svid { certified, id: td.control_plane(), info: issued.info });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_with(dir: &Path, mode: u32, gid: Option<u32>) -> PathBuf {
        let p = dir.join(format!("key-{mode:o}-{gid:?}"));
        std::fs::write(&p, "k").unwrap();
        if let Some(g) = gid {
            std::os::unix::fs::chown(&p, None, Some(g)).unwrap();
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn the_admin_credential_is_reissued_for_the_key_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::default();
        let (old, new) = (
            CertificateAuthority::generate(&td, ROOT_VALIDITY).unwrap(),
            CertificateAuthority::generate(&td, ROOT_VALIDITY).unwrap(),
        );
        let cred = ensure_admin_credential(dir.path(), &old, &old.trust_bundle_pem(), &td).unwrap();
        let key = std::fs::read_to_string(cred.key()).unwrap();
        let cert = std::fs::read_to_string(cred.cert()).unwrap();
        ensure_admin_credential(dir.path(), &new, &new.trust_bundle_pem(), &td).unwrap();
        assert_ne!(std::fs::read_to_string(cred.cert()).unwrap(), cert, "reissued from the new root");
        assert_eq!(std::fs::read_to_string(cred.key()).unwrap(), key, "for the same key");
        let chain = parse_pem_certs(&std::fs::read_to_string(cred.cert()).unwrap()).unwrap();
        let roots = palisade_certs::svid::root_store(new.trust_bundle()).unwrap();
        assert!(palisade_certs::svid::verify_chain(&chain, &roots, SystemTime::now()).is_ok());
        let pair = certified_key_from_pem(chain, &SecretPem::new(key)).unwrap();
        assert!(pair.keys_match().is_ok());
        // An unreadable key is replaced.
        std::fs::write(cred.key(), "not a key").unwrap();
        ensure_admin_credential(dir.path(), &old, &old.trust_bundle_pem(), &td).unwrap();
        assert!(std::fs::read_to_string(cred.key()).unwrap().contains("PRIVATE KEY"));
    }

    #[test]
    fn ca_key_must_be_readable_by_this_process_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ours = process_ids();
        let own_group = *ours.groups.first().expect("a process has a group");
        for mode in [0o600, 0o400] {
            assert!(check_key_mode(&key_with(dir.path(), mode, None)).is_ok(), "{mode:o}");
        }
        // Kubernetes Secret with fsGroup: group read for a group we hold.
        for mode in [0o440, 0o640] {
            assert!(check_key_mode(&key_with(dir.path(), mode, Some(own_group))).is_ok(), "{mode:o}");
        }
        // Others, group write, or any group bit when the group is not ours.
        for mode in [0o604, 0o644, 0o444, 0o660, 0o470, 0o450] {
            let err = check_key_mode(&key_with(dir.path(), mode, Some(own_group))).unwrap_err().to_string();
            assert!(err.contains(&format!("has mode {mode:o}")), "{mode:o}: {err}");
        }
        if ours.uid == Some(0) {
            let foreign = (1..65000).find(|g| !ours.groups.contains(g)).unwrap();
            let p = key_with(dir.path(), 0o440, Some(foreign));
            assert!(check_key_mode(&p).is_err(), "group {foreign} is not ours");
        } else {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root, where a foreign group can be set");
        }
    }

    #[test]
    fn a_cert_manager_ca_crt_is_the_bundle_only_of_a_tls_crt_without_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::default();
        let root = CertificateAuthority::generate(&td, Duration::from_secs(3600)).unwrap();
        let id = td.workload("ns", "sa").unwrap();
        let (issued, _) = root.issue_with_key(&id, &[], &[], Duration::from_secs(600)).unwrap();
        let ca = |cert: &str, bundle: Option<&str>| {
            let d = dir.path();
            operator_ca(crate::config::OperatorCa {
                cert: d.join(cert),
                key: d.join("tls.key"),
                bundle: bundle.map(|b| d.join(b)),
            })
            .bundle
        };
        std::fs::write(dir.path().join("ca.crt"), root.cert_pem()).unwrap();
        // An intermediate (here any certificate that is not a root) in tls.crt: ca.crt is its bundle.
        std::fs::write(dir.path().join("tls.crt"), issued.chain_pem()).unwrap();
        assert_eq!(ca("tls.crt", None), Some(dir.path().join("ca.crt")));
        assert_eq!(ca("tls.crt", Some("mine.pem")), Some(dir.path().join("mine.pem")), "--ca-bundle wins");
        std::fs::write(dir.path().join("other.crt"), issued.chain_pem()).unwrap();
        assert_eq!(ca("other.crt", None), None, "only in the Secret's layout");
        // A root in tls.crt is its own bundle, as before (it may seed etcd).
        std::fs::write(dir.path().join("tls.crt"), root.cert_pem()).unwrap();
        assert_eq!(ca("tls.crt", None), None);
        std::fs::remove_file(dir.path().join("ca.crt")).unwrap();
        std::fs::write(dir.path().join("tls.crt"), issued.chain_pem()).unwrap();
        assert_eq!(ca("tls.crt", None), None, "no ca.crt, nothing to add");
    }
}
