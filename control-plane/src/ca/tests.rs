//! Root rotation through its phases, on the file home.

use std::time::{Duration, SystemTime};

use palisade_certs::{CertificateAuthority, TrustDomain};
use rustls_pki_types::CertificateDer;

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

/// A leaf from the CA that signs now, as the control plane serves it: its
/// chain then the cross certificates.
fn served_chain(a: &Authority) -> Vec<CertificateDer<'static>> {
    let v = a.view();
    let (issued, _) = v.signing.issue_with_key(&td().control_plane(), &[], &[], Duration::from_secs(600)).unwrap();
    issued.chain.into_iter().chain(v.cross.iter().cloned()).collect()
}

fn verifies(chain: &[CertificateDer<'static>], root: &CertificateDer<'static>) -> bool {
    let roots = palisade_certs::svid::root_store(std::slice::from_ref(root)).unwrap();
    palisade_certs::svid::verify_chain(chain, &roots, SystemTime::now()).is_ok()
}

fn to_done(a: &Authority) {
    a.start(Duration::ZERO, None).unwrap();
    for next in [Phase::Reissuing, Phase::Done] {
        let v = a.view();
        a.step(&v, v.rotation.clone().unwrap(), next).unwrap();
    }
}

#[test]
fn the_old_bundle_verifies_the_control_plane_through_the_cross_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Authority::open(Box::new(FileHome::new(dir.path(), &td(), None, None)), td()).unwrap();
    let a = open();
    let r0 = a.view().bundle[0].clone();
    assert!(a.view().cross.is_empty(), "no rotation, no cross certificate");
    a.start(Duration::ZERO, None).unwrap();
    assert!(a.view().cross.is_empty(), "publishing signs with the old root: nothing to cross");
    let v = a.view();
    a.step(&v, v.rotation.clone().unwrap(), Phase::Reissuing).unwrap();
    assert_eq!(a.view().cross.len(), 1);
    assert!(verifies(&served_chain(&a), &r0), "reissuing: the old root verifies a new-root certificate");
    let v = a.view();
    a.step(&v, v.rotation.clone().unwrap(), Phase::Done).unwrap();
    drop(a);
    let a = open();
    let r1 = a.view().bundle[0].clone();
    assert_ne!(r1, r0);
    assert!(verifies(&served_chain(&a), &r0), "done, and after a restart: still");
    assert!(verifies(&served_chain(&a), &r1));

    // A second rotation chains them: R2 by R1, R1 by R0.
    to_done(&a);
    assert_eq!(a.view().cross.len(), 2);
    assert!(verifies(&served_chain(&a), &r0));
    assert!(verifies(&served_chain(&a), &r1));
    let r2 = a.view().bundle[0].clone();

    // An aborted one serves no cross certificate for its root, and keeps the earlier ones.
    a.start(Duration::ZERO, None).unwrap();
    let v = a.view();
    a.step(&v, v.rotation.clone().unwrap(), Phase::Reissuing).unwrap();
    assert_eq!(a.view().cross.len(), 3);
    a.abort().unwrap();
    let v = a.view();
    a.step(&v, v.rotation.clone().unwrap(), Phase::Aborted).unwrap();
    assert_eq!(a.view().cross.len(), 2, "the withdrawn root's cross certificate is gone");
    assert!(verifies(&served_chain(&a), &r0));
    assert_eq!(a.view().bundle, vec![r2.clone()]);
    // At most KEEP, the oldest dropped first.
    to_done(&a);
    to_done(&a);
    assert_eq!(a.view().cross.len(), cross::KEEP);
    assert!(!verifies(&served_chain(&a), &r0), "R1 by R0 fell off the end");
    assert!(verifies(&served_chain(&a), &r2));
}

#[test]
fn the_sealed_home_keeps_the_cross_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let secrets: std::sync::Arc<dyn crate::store::sealed::SecretHome> =
        std::sync::Arc::new(crate::store::sealed::FileSecrets::new(dir.path()));
    let home = || Box::new(SealedHome::new(secrets.clone(), &td(), Duration::from_secs(365 * 86400), None));
    let a = Authority::open(home(), td()).unwrap();
    let r0 = a.view().bundle[0].clone();
    to_done(&a);
    let fresh = Authority::open(home(), td()).unwrap();
    assert_eq!(fresh.view().cross.len(), 1);
    assert!(verifies(&served_chain(&fresh), &r0));
}

/// `palisadectl install --generate-ca`'s root, given by file with
/// --ca-seed: planted in the data dir once, rotated there, and the file is
/// not read back over the rotated root.
#[test]
fn a_seed_root_is_planted_once_and_rotates_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let seed = CertificateAuthority::generate(&td(), Duration::from_secs(86400)).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, seed.cert_pem()).unwrap();
    palisade_certs::files::write_secret(&key, seed.key_pem().expose()).unwrap();
    let data = dir.path().join("data");
    let open = || Authority::open(Box::new(FileHome::seeded(&data, &td(), &cert, &key)), td()).unwrap();
    let a = open();
    let seed_sha = sha256_hex(signing_cert(&seed).as_ref());
    assert_eq!(a.view().signing_sha, seed_sha, "the seed signs");
    assert!(data.join("ca/ca.pem").exists() && data.join("ca/ca-key.pem").exists());
    to_done(&a);
    let rotated = a.view().signing_sha.clone();
    assert_ne!(rotated, seed_sha);
    drop(a);
    let a = open();
    assert_eq!(a.view().signing_sha, rotated, "after a restart the rotated root stays in force, not the seed");
    // An intermediate is not a seed.
    let inter = tempfile::tempdir().unwrap();
    let issued = seed.issue_with_key(&td().control_plane(), &[], &[], Duration::from_secs(600)).unwrap();
    let (leaf_cert, leaf_key) = (inter.path().join("c.pem"), inter.path().join("k.pem"));
    std::fs::write(&leaf_cert, palisade_certs::ca::der_to_pem(&issued.0.chain[0])).unwrap();
    palisade_certs::files::write_secret(&leaf_key, issued.1.expose()).unwrap();
    let err = Authority::open(Box::new(FileHome::seeded(inter.path(), &td(), &leaf_cert, &leaf_key)), td());
    assert!(err.is_err());
}
