//! An operator-provided intermediate CA: leaves chain to the operator's root.

use std::process::Command;

use palisade_tests::{ControlPlane, Sidecar};

#[tokio::test]
async fn control_plane_signs_with_an_operator_intermediate() {
    let tmp = tempfile::tempdir().unwrap();
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "Operator Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let root = rcgen::CertifiedIssuer::self_signed(p, root_key).unwrap();
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "Operator Intermediate");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    let int = p.signed_by(&int_key, &*root).unwrap();
    let cert_file = tmp.path().join("ca.pem");
    std::fs::write(&cert_file, format!("{}{}", int.pem(), root.pem())).unwrap();
    let key_file = tmp.path().join("ca-key.pem");
    palisade_certs::files::write_secret(&key_file, &int_key.serialize_pem()).unwrap();

    // A world-readable key is refused.
    let loose = tmp.path().join("loose-key.pem");
    palisade_certs::files::write_atomic(&loose, int_key.serialize_pem().as_bytes(), 0o644).unwrap();
    let out = Command::new(palisade_tests::bin("palisade-control-plane"))
        .arg("--data-dir")
        .arg(tmp.path().join("d0"))
        .arg("--ca-cert")
        .arg(&cert_file)
        .arg("--ca-key")
        .arg(&loose)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &["--ca-cert", cert_file.to_str().unwrap(), "--ca-key", key_file.to_str().unwrap()],
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(cp.bundle()).unwrap().trim(),
        root.pem().trim(),
        "the bundle is the operator's root"
    );
    assert!(!cp.data_dir.join("ca/ca-key.pem").exists(), "the operator's key is not copied");

    let token = cp.create_token("spiffe://cluster.local/ns/shop/sa/web", &[]).unwrap();
    let sc = Sidecar::spawn("sidecar", &cp, tmp.path(), &["--join-token", &token]).unwrap();
    let cfg = sc.wait_ready().await.unwrap();
    let chain_pem = cfg["cert_chain_pem"].as_str().unwrap();
    let chain = palisade_certs::ca::parse_pem_certs(chain_pem).unwrap();
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    let leaf = tmp.path().join("leaf.pem");
    std::fs::write(&leaf, palisade_certs::ca::der_to_pem(&chain[0])).unwrap();
    let inter = tmp.path().join("int.pem");
    std::fs::write(&inter, int.pem()).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(cp.bundle())
            .arg("-untrusted")
            .arg(&inter)
            .arg(&leaf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
