//! Cross certificates: what they certify, and that rustls/webpki builds
//! the path through them when the old and new roots have the same name.

use std::time::{Duration, SystemTime};

use x509_parser::prelude::*;

use crate::ca::CertificateAuthority;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{root_store, verify_chain};

const DAY: Duration = Duration::from_secs(86400);

fn root(days: u64) -> CertificateAuthority {
    CertificateAuthority::generate(&TrustDomain::default(), DAY * days as u32).unwrap()
}

fn leaf(ca: &CertificateAuthority) -> rustls_pki_types::CertificateDer<'static> {
    let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    ca.issue_with_key(&id, &[], &[], Duration::from_secs(600)).unwrap().0.chain[0].clone()
}

fn verifies(chain: &[rustls_pki_types::CertificateDer<'static>], roots: &CertificateAuthority) -> bool {
    verify_chain(chain, &root_store(roots.trust_bundle()).unwrap(), SystemTime::now()).is_ok()
}

#[test]
fn a_cross_certificate_is_the_new_roots_key_and_name_signed_by_the_old_root() {
    let (old, new) = (root(40), root(400));
    let cross = old.cross_sign(&new.trust_bundle()[0]).unwrap();
    let (_, c) = X509Certificate::from_der(&cross).unwrap();
    let (_, o) = X509Certificate::from_der(&old.trust_bundle()[0]).unwrap();
    let (_, n) = X509Certificate::from_der(&new.trust_bundle()[0]).unwrap();
    assert_eq!(c.subject().as_raw(), n.subject().as_raw(), "the new root's name, byte for byte");
    assert_eq!(c.issuer().as_raw(), o.subject().as_raw());
    assert_eq!(c.public_key().raw, n.public_key().raw, "the new root's key");
    assert!(c.verify_signature(Some(o.public_key())).is_ok(), "signed by the old root's key");
    assert!(c.verify_signature(Some(n.public_key())).is_err());
    assert!(c.basic_constraints().unwrap().unwrap().value.ca);
    let ku = c.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
    assert_eq!(
        c.subject_alternative_name().unwrap().unwrap().value,
        n.subject_alternative_name().unwrap().unwrap().value
    );
    let ski = |x: &X509Certificate<'_>| {
        x.iter_extensions().find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
    };
    assert_eq!(ski(&c), ski(&n), "the new root's key identifier");
    assert!(c.validity().not_after <= o.validity().not_after, "never outlives the old root");
    assert!(c.validity().not_after < n.validity().not_after);
    assert_ne!(c.raw_serial(), n.raw_serial());
}

#[test]
fn a_client_with_only_the_old_root_verifies_the_new_roots_leaves_through_it() {
    let (r0, r1) = (root(400), root(400));
    assert_eq!(r0.info().subject, r1.info().subject, "generated roots share their name");
    let cross10 = r0.cross_sign(&r1.trust_bundle()[0]).unwrap();
    let l1 = leaf(&r1);
    assert!(!verifies(std::slice::from_ref(&l1), &r0), "without the cross certificate the old root does not verify it");
    assert!(verifies(&[l1.clone(), cross10.clone()], &r0), "webpki tries each same-named candidate");
    assert!(verifies(&[l1.clone(), cross10.clone()], &r1), "the new root alone still stops at itself");
    // The new root's holders never trust the old one through it.
    assert!(!verifies(&[leaf(&r0), cross10.clone()], &r1));

    // After a second rotation, the chain of cross certificates.
    let r2 = root(400);
    let cross21 = r1.cross_sign(&r2.trust_bundle()[0]).unwrap();
    let l2 = leaf(&r2);
    assert!(verifies(&[l2.clone(), cross21.clone(), cross10.clone()], &r0));
    assert!(verifies(&[l2.clone(), cross10.clone(), cross21.clone()], &r0), "in any order");
    assert!(verifies(&[l2.clone(), cross21.clone(), cross10.clone()], &r1));
    assert!(verifies(&[l2.clone(), cross21.clone(), cross10.clone()], &r2));
    assert!(!verifies(&[l2, cross21], &r0), "a missing link breaks it");
}

#[test]
fn only_a_ca_certificate_is_cross_signed() {
    let ca = root(400);
    let err = ca.cross_sign(&leaf(&ca)).unwrap_err().to_string();
    assert!(err.contains("is not a CA certificate"), "{err}");
    assert!(ca.cross_sign(&rustls_pki_types::CertificateDer::from(vec![1u8, 2, 3])).is_err());
}

/// An operator's CA: a root (another name) and an intermediate that signs.
fn operator(path_len: rcgen::BasicConstraints) -> (CertificateAuthority, CertificateAuthority) {
    let ca = |name: &str, bc| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(bc);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        p.not_after = (SystemTime::now() + DAY * 100).into();
        p
    };
    let (root_key, int_key) = (rcgen::KeyPair::generate().unwrap(), rcgen::KeyPair::generate().unwrap());
    let root =
        rcgen::CertifiedIssuer::self_signed(ca("Operator Root", rcgen::BasicConstraints::Unconstrained), root_key)
            .unwrap();
    let int = ca("Operator Intermediate", path_len).signed_by(&int_key, &*root).unwrap();
    let signing = CertificateAuthority::from_pem(
        &format!("{}{}", int.pem(), root.pem()),
        crate::SecretPem::new(int_key.serialize_pem()),
        None,
    )
    .unwrap();
    let root_only =
        CertificateAuthority::from_pem(&root.pem(), crate::SecretPem::new(root.key().serialize_pem()), None).unwrap();
    (signing, root_only)
}

#[test]
fn an_intermediate_cross_signs_and_its_chain_follows() {
    let (int, op_root) = operator(rcgen::BasicConstraints::Unconstrained);
    let new = root(400);
    let cross = int.cross_sign(&new.trust_bundle()[0]).unwrap();
    let intermediate = crate::ca::parse_pem_certs(&int.cert_pem()).unwrap()[0].clone();
    assert!(verifies(&[leaf(&new), cross.clone(), intermediate], &op_root));
    assert!(!verifies(&[leaf(&new), cross], &op_root), "not without the intermediate");

    let (pinned, _) = operator(rcgen::BasicConstraints::Constrained(0));
    let err = pinned.cross_sign(&new.trust_bundle()[0]).unwrap_err().to_string();
    assert!(err.contains("pathLenConstraint 0"), "{err}");
}
