//! Root rotation through its phases, on the file home.

use std::time::Duration;

use palisade_certs::{CertificateAuthority, TrustDomain};

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
