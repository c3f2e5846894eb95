//! An operator-provided CA: leaves chain to the operator's root, whatever
//! form openssl gave its key (SEC1, PKCS#1, PKCS#8), in the layout of a
//! cert-manager Secret too; a damaged or encrypted key stops the control
//! plane with a message that says why and what is accepted.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use palisade_tests::{ControlPlane, Proc, Sidecar};

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

/// Runs the ```sh blocks of docs/operations/ca.md in `dir`, as a reader would.
fn run_ca_page(dir: &Path) {
    let page = std::fs::read_to_string(palisade_tests::repo_root().join("docs/operations/ca.md")).unwrap();
    let blocks: Vec<&str> = page.split("```sh\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert!(blocks.len() >= 3, "the page's openssl blocks");
    let script = format!("set -euo pipefail\n{}", blocks.concat());
    let out = Command::new("bash").arg("-c").arg(&script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// `openssl verify` of `leaf` (PEM) against `root`, with `untrusted` intermediates.
fn openssl_verify(dir: &Path, root: &Path, untrusted: Option<&Path>, leaf: &str) {
    let leaf_file = dir.join("leaf.pem");
    std::fs::write(&leaf_file, leaf).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"]).arg(root);
        if let Some(u) = untrusted {
            cmd.arg("-untrusted").arg(u);
        }
        let out = cmd.arg(&leaf_file).output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn cas_made_as_the_ca_page_shows_sign_certificates_openssl_verifies() {
    if Command::new("openssl").arg("version").output().is_err() {
        return palisade_tests::skip("operator_ca", "openssl is not installed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    run_ca_page(dir);
    assert!(
        std::fs::read_to_string(dir.join("ec-root/tls.key")).unwrap().starts_with("-----BEGIN EC PRIVATE KEY-----")
    );
    assert!(
        std::fs::read_to_string(dir.join("rsa-root/tls.key")).unwrap().starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
    let path = |p: &str| dir.join(p).to_str().unwrap().to_string();
    // (name, flags, the root leaves chain to, the intermediate they carry, the CA's signature)
    let cases = [
        (
            "ec-root",
            vec!["--ca-cert".to_string(), path("ec-root/tls.crt"), "--ca-key".into(), path("ec-root/tls.key")],
            "ec-root/tls.crt",
            None,
            "ecdsa-with-SHA256",
        ),
        (
            "rsa-root",
            vec!["--ca-dir".to_string(), path("rsa-root")],
            "rsa-root/tls.crt",
            None,
            "sha256WithRSAEncryption",
        ),
        // The manifests' flags on a cert-manager Secret of an intermediate: ca.crt is the bundle.
        (
            "mesh-ca",
            vec!["--ca-cert".to_string(), path("mesh-ca/tls.crt"), "--ca-key".into(), path("mesh-ca/tls.key")],
            "rsa-root/tls.crt",
            Some("mesh-ca/tls.crt"),
            "ecdsa-with-SHA384",
        ),
    ];
    for (name, flags, root, intermediate, signature) in cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cp = ControlPlane::start(&dir.join(format!("{name}-data")), dir, &flags).await.unwrap();
        let root_pem = std::fs::read_to_string(dir.join(root)).unwrap();
        assert_eq!(
            std::fs::read_to_string(cp.bundle()).unwrap().trim(),
            root_pem.trim(),
            "{name}: the bundle is the root"
        );
        let token = cp.create_token("spiffe://cluster.local/ns/shop/sa/web", &[]).unwrap();
        // The sidecar checks the control plane's certificate, signed by this CA, with rustls.
        let sc = Sidecar::spawn(&format!("sidecar-{name}"), &cp, dir, &["--join-token", &token]).unwrap();
        let cfg = sc.wait_ready().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let chain = palisade_certs::ca::parse_pem_certs(cfg["cert_chain_pem"].as_str().unwrap()).unwrap();
        assert_eq!(chain.len(), 1 + usize::from(intermediate.is_some()), "{name}: leaf, then any intermediate");
        let leaf = palisade_certs::ca::der_to_pem(&chain[0]);
        openssl_verify(dir, &dir.join(root), intermediate.map(|i| dir.join(i)).as_deref(), &leaf);
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(dir.join("leaf.pem"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&text.stdout).contains(signature), "{name}: signed with {signature}");
    }
}

#[tokio::test]
async fn a_damaged_or_encrypted_ca_key_stops_the_control_plane_saying_what_is_accepted() {
    if Command::new("openssl").arg("version").output().is_err() {
        return palisade_tests::skip("operator_ca", "openssl is not installed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let openssl = |args: &str| {
        let out = Command::new("openssl").args(args.split_whitespace()).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl("ecparam -name prime256v1 -genkey -noout -out key.pem");
    openssl(
        "req -x509 -new -key key.pem -subj /CN=root -days 2 -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign -out root.pem",
    );
    openssl("pkcs8 -topk8 -v2 aes-256-cbc -passout pass:secret -in key.pem -out encrypted.pem");
    openssl("ec -aes256 -passout pass:secret -in key.pem -out legacy.pem");
    let key = std::fs::read_to_string(dir.join("key.pem")).unwrap();
    let lines: Vec<&str> = key.lines().collect();
    let variants = [
        ("truncated.pem", lines[..lines.len() - 1].join("\n"), "is the file truncated?"),
        ("cut.pem", format!("{}\n{}\n", lines[..2].join("\n"), lines[lines.len() - 1]), "malformed"),
        ("garbage.pem", "\u{0}\u{1}garbage\u{ff}".to_string(), "no private key found (PEM blocks: none)"),
        ("encrypted.pem", std::fs::read_to_string(dir.join("encrypted.pem")).unwrap(), "openssl pkey -in key.pem"),
        ("legacy.pem", std::fs::read_to_string(dir.join("legacy.pem")).unwrap(), "Proc-Type: 4,ENCRYPTED"),
    ];
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for (file, pem, says) in variants {
        palisade_certs::files::write_secret(&dir.join(file), &pem).unwrap();
        let mut cmd = Command::new(palisade_tests::bin("palisade-control-plane"));
        cmd.arg("--data-dir").arg(dir.join(format!("{file}-data"))).args(["--listen", "127.0.0.1:0", "--ca-cert"]);
        cmd.arg(dir.join("root.pem")).arg("--ca-key").arg(dir.join(file));
        let mut p = Proc::spawn(file, &mut cmd, dir).unwrap();
        let status = p.wait_exit(Duration::from_secs(20)).unwrap();
        let logs = p.logs();
        assert_eq!(status.code(), Some(1), "{file}: {logs}");
        assert!(!logs.contains("panicked"), "{file}: {logs}");
        let named = format!("CA from {}: CA private key is invalid", dir.join(file).display());
        assert!(logs.contains(&named) && logs.contains(says), "{file}: {logs}");
        assert!(logs.contains("accepted: unencrypted PEM, EC P-256/P-384 in SEC1 or PKCS#8, RSA 2048-4096"), "{logs}");
        for i in (0..body.len() - 12).step_by(6) {
            assert!(!logs.contains(&body[i..i + 12]), "{file}: key bytes in the output");
        }
    }
    // A self-signed root whose key is not accepted: named as such, not as "no root".
    openssl("genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out p521.pem");
    openssl(
        "req -x509 -new -key p521.pem -subj /CN=root521 -days 2 -addext basicConstraints=critical,CA:TRUE \
         -addext keyUsage=critical,keyCertSign,cRLSign -out root521.pem",
    );
    let mut cmd = Command::new(palisade_tests::bin("palisade-control-plane"));
    cmd.arg("--data-dir").arg(dir.join("p521-data")).args(["--listen", "127.0.0.1:0", "--ca-cert"]);
    cmd.arg(dir.join("root521.pem")).arg("--ca-key").arg(dir.join("p521.pem"));
    let mut p = Proc::spawn("p521", &mut cmd, dir).unwrap();
    let status = p.wait_exit(Duration::from_secs(20)).unwrap();
    let logs = p.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("EC keys on P-521 (secp521r1) are not supported"), "{logs}");
    assert!(logs.contains("accepted: unencrypted PEM, EC P-256/P-384") && !logs.contains("no trust bundle"), "{logs}");
    // --ca-dir replaces the three flags; both at once is a usage error.
    let out = Command::new(palisade_tests::bin("palisade-control-plane"))
        .arg("--data-dir")
        .arg(dir.join("x"))
        .args(["--ca-dir", "/nonexistent", "--ca-cert", "/nonexistent", "--ca-key", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
}
