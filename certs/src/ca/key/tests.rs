//! Keys made by the real `openssl` CLI, in every form operators have.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::{ACCEPTED, KeyError, describe, load};
use crate::ca::CertificateAuthority;
use crate::{CaError, SecretPem, SpiffeId};

/// A scratch directory and the `openssl` CLI, or None (and SKIPPED) when
/// openssl is missing outside CI.
fn openssl() -> Option<tempfile::TempDir> {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() => Some(tempfile::tempdir().unwrap()),
        _ if std::env::var("CI").as_deref() == Ok("true") => panic!("openssl is needed for these tests"),
        _ => {
            println!("SKIPPED: no openssl CLI");
            None
        }
    }
}

/// Runs `openssl ARGS` in `dir`; panics with its stderr if it fails.
fn run(dir: &Path, args: &str) {
    let out = Command::new("openssl").args(args.split_whitespace()).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

/// The forms each generator writes, with the algorithm the key must load as.
const ACCEPTED_FORMS: &[(&str, &str, &str, &str)] = &[
    // (file, openssl command, expected first PEM label, algorithm)
    ("ecparam.pem", "ecparam -name prime256v1 -genkey -out ecparam.pem", "EC PARAMETERS", "EC P-256"),
    ("sec1-256.pem", "ecparam -name prime256v1 -genkey -noout -out sec1-256.pem", "EC PRIVATE KEY", "EC P-256"),
    ("sec1-384.pem", "ecparam -name secp384r1 -genkey -noout -out sec1-384.pem", "EC PRIVATE KEY", "EC P-384"),
    ("p8-256.pem", "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out p8-256.pem", "PRIVATE KEY", "EC P-256"),
    ("p8-384.pem", "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out p8-384.pem", "PRIVATE KEY", "EC P-384"),
    ("pkcs1-2048.pem", "genrsa -traditional -out pkcs1-2048.pem 2048", "RSA PRIVATE KEY", "RSA"),
    ("p8-rsa.pem", "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out p8-rsa.pem", "PRIVATE KEY", "RSA"),
    ("p8-ed.pem", "genpkey -algorithm ED25519 -out p8-ed.pem", "PRIVATE KEY", "Ed25519"),
];

#[test]
fn every_accepted_form_made_by_openssl_loads_with_the_algorithm_of_the_key() {
    let Some(tmp) = openssl() else { return };
    let dir = tmp.path();
    for (file, cmd, label, alg) in ACCEPTED_FORMS {
        run(dir, cmd);
        let pem = read(dir, file);
        assert!(pem.starts_with(&format!("-----BEGIN {label}-----")), "{cmd} wrote {pem:.40}");
        let key = load(&pem).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert_eq!(describe(&key), *alg, "{cmd}");
    }
    // The same P-384 key as SEC1 and re-exported as PKCS#8 is one key.
    run(dir, "pkcs8 -topk8 -nocrypt -in sec1-384.pem -out sec1-384-as-p8.pem");
    let (a, b) = (load(&read(dir, "sec1-384.pem")).unwrap(), load(&read(dir, "sec1-384-as-p8.pem")).unwrap());
    assert_eq!(a.public_key_raw(), b.public_key_raw());
    // `pkey -traditional` turns PKCS#8 into SEC1 / PKCS#1.
    run(dir, "pkey -in p8-256.pem -traditional -out trad-ec.pem");
    run(dir, "pkey -in p8-rsa.pem -traditional -out trad-rsa.pem");
    assert!(read(dir, "trad-ec.pem").starts_with("-----BEGIN EC PRIVATE KEY-----"));
    assert!(read(dir, "trad-rsa.pem").starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert_eq!(
        load(&read(dir, "trad-ec.pem")).unwrap().public_key_raw(),
        load(&read(dir, "p8-256.pem")).unwrap().public_key_raw()
    );
    assert_eq!(describe(&load(&read(dir, "trad-rsa.pem")).unwrap()), "RSA");
}

#[test]
fn a_pkcs1_key_is_wrapped_exactly_as_openssl_wraps_it() {
    let Some(tmp) = openssl() else { return };
    let dir = tmp.path();
    run(dir, "genrsa -traditional -out k.pem 2048");
    run(dir, "pkcs8 -topk8 -nocrypt -in k.pem -outform DER -out k.p8");
    let pkcs1 = pem::parse(read(dir, "k.pem")).unwrap();
    let wrapped = super::der::pkcs1_to_pkcs8(pkcs1.contents());
    assert_eq!(wrapped, std::fs::read(dir.join("k.p8")).unwrap());
}

#[test]
fn der_lengths_use_the_short_and_long_forms() {
    use super::der::tlv;
    assert_eq!(tlv(0x04, &[]), vec![0x04, 0x00]);
    assert_eq!(tlv(0x04, &[7; 0x7f])[..2], [0x04, 0x7f]);
    assert_eq!(tlv(0x04, &[7; 0x80])[..3], [0x04, 0x81, 0x80]);
    assert_eq!(tlv(0x04, &[7; 0x100])[..4], [0x04, 0x82, 0x01, 0x00]);
    assert_eq!(tlv(0x30, &[7; 0x1_0000])[..5], [0x30, 0x83, 0x01, 0x00, 0x00]);
    assert_eq!(tlv(0x30, &[7; 0x1_0000]).len(), 0x1_0000 + 5);
}

type IsRefusal = fn(&KeyError) -> bool;

/// Refusals of keys openssl makes: each says why and what is accepted.
#[test]
fn refused_keys_say_why_and_what_is_accepted() {
    let Some(tmp) = openssl() else { return };
    let dir = tmp.path();
    run(dir, "ecparam -name prime256v1 -genkey -noout -out ec.pem");
    // (openssl command, file, the refusal expected, a phrase its text has)
    let cases: &[(&str, &str, IsRefusal, &str)] = &[
        (
            "pkcs8 -topk8 -v2 aes-256-cbc -passout pass:secret -in ec.pem -out enc-p8.pem",
            "enc-p8.pem",
            |e| matches!(e, KeyError::Encrypted { .. }),
            "openssl pkey -in key.pem -out plain.pem",
        ),
        (
            "ec -aes256 -passout pass:secret -in ec.pem -out enc-legacy.pem",
            "enc-legacy.pem",
            |e| matches!(e, KeyError::Encrypted { .. }),
            "Proc-Type: 4,ENCRYPTED",
        ),
        (
            "genrsa -traditional -out rsa1024.pem 1024",
            "rsa1024.pem",
            |e| matches!(e, KeyError::RsaSize { bits: 1024 }),
            "1024 bits",
        ),
        (
            "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out rsa1024-p8.pem",
            "rsa1024-p8.pem",
            |e| matches!(e, KeyError::RsaSize { bits: 1024 }),
            "1024 bits",
        ),
        (
            "ecparam -name secp521r1 -genkey -noout -out p521.pem",
            "p521.pem",
            |e| matches!(e, KeyError::Curve { .. }),
            "P-521",
        ),
        (
            "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out p521-p8.pem",
            "p521-p8.pem",
            |e| matches!(e, KeyError::Curve { .. }),
            "P-521",
        ),
        (
            "ecparam -name secp256k1 -genkey -noout -out k1.pem",
            "k1.pem",
            |e| matches!(e, KeyError::Curve { .. }),
            "secp256k1",
        ),
        (
            "ecparam -name prime256v1 -genkey -noout -param_enc explicit -out explicit.pem",
            "explicit.pem",
            |e| matches!(e, KeyError::Curve { .. }),
            "named_curve",
        ),
        (
            "ec -no_public -in ec.pem -out nopub.pem",
            "nopub.pem",
            |e| matches!(e, KeyError::Malformed { .. }),
            "public key",
        ),
        ("genpkey -algorithm ED448 -out ed448.pem", "ed448.pem", |e| matches!(e, KeyError::Algorithm { .. }), "Ed448"),
        ("genpkey -algorithm RSA-PSS -out pss.pem", "pss.pem", |e| matches!(e, KeyError::Algorithm { .. }), "RSA-PSS"),
    ];
    for (cmd, file, is, says) in cases {
        run(dir, cmd);
        let pem = read(dir, file);
        let err = load(&pem).err().unwrap_or_else(|| panic!("{cmd}: accepted"));
        let text = err.to_string();
        assert!(is(&err), "{cmd}: {err:?}");
        assert!(text.contains(says) && text.contains(ACCEPTED), "{cmd}: {text}");
        assert_no_key_bytes(&pem, &text);
        assert_no_key_bytes(&pem, &format!("{err:?}"));
    }
}

/// Text that is not a usable key: garbage, truncation, other blocks.
#[test]
fn damaged_or_missing_keys_are_refused_without_panicking() {
    let Some(tmp) = openssl() else { return };
    let dir = tmp.path();
    run(dir, "ecparam -name prime256v1 -genkey -noout -out ec.pem");
    run(dir, "req -x509 -new -key ec.pem -subj /CN=x -days 1 -out cert.pem");
    let ec = read(dir, "ec.pem");
    let lines: Vec<&str> = ec.lines().collect();
    let cut_end = lines[..lines.len() - 1].join("\n");
    let cut_body = format!("{}\n{}\n", lines[..2].join("\n"), lines[lines.len() - 1]);
    let mut flipped = ec.clone().into_bytes();
    flipped[40] = if flipped[40] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let openssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "PEM blocks: none"),
        ("garbage", "not a key at all\n".into(), "PEM blocks: none"),
        ("a certificate", read(dir, "cert.pem"), "PEM blocks: CERTIFICATE"),
        ("no END line", cut_end, "truncated"),
        ("a cut body", cut_body, "malformed"),
        ("two keys", format!("{ec}{ec}"), "2 private keys"),
        ("OpenSSH", openssh.into(), "OPENSSH PRIVATE KEY"),
        (
            "a bad base64 char",
            ec.replacen("\n", "\n!", 2).replacen(
                "-----BEGIN EC PRIVATE KEY-----\n!",
                "-----BEGIN EC PRIVATE KEY-----\n",
                1,
            ),
            "unreadable",
        ),
        ("mismatched labels", ec.replace("END EC PRIVATE KEY", "END PRIVATE KEY"), "unreadable"),
    ];
    for (what, pem, says) in &cases {
        let err = load(pem).err().unwrap_or_else(|| panic!("{what}: accepted"));
        let text = err.to_string();
        assert!(text.contains(says) && text.contains(ACCEPTED), "{what}: {text}");
        assert_no_key_bytes(&ec, &text);
    }
    // A flipped bit inside the key is refused or, if it still parses, is another key.
    match load(&flipped) {
        Err(e) => assert!(e.to_string().contains(ACCEPTED), "{e}"),
        Ok(k) => assert_ne!(k.public_key_raw(), load(&ec).unwrap().public_key_raw()),
    }
}

/// No 12-character run of the key's base64 body appears in `text`.
fn assert_no_key_bytes(pem: &str, text: &str) {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----") && !l.contains(':')).collect();
    for i in (0..body.len().saturating_sub(12)).step_by(4) {
        assert!(!text.contains(&body[i..i + 12]), "key bytes in: {text}");
    }
}

/// A root made by `openssl req -x509` with `key`.
fn openssl_root(dir: &Path, key: &str, name: &str) -> PathBuf {
    run(
        dir,
        &format!(
            "req -x509 -new -key {key} -subj /CN={name} -days 2 -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign -out {name}.crt"
        ),
    );
    dir.join(format!("{name}.crt"))
}

#[test]
fn a_ca_of_each_key_form_issues_leaves_that_openssl_and_webpki_verify() {
    let Some(tmp) = openssl() else { return };
    let dir = tmp.path();
    let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    for (file, cmd, _, alg) in ACCEPTED_FORMS.iter().filter(|f| f.0 != "ecparam.pem") {
        run(dir, cmd);
        let root = openssl_root(dir, file, &file.replace(".pem", ""));
        let ca = CertificateAuthority::from_pem(
            &std::fs::read_to_string(&root).unwrap(),
            SecretPem::new(read(dir, file)),
            None,
        )
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(ca.key_pem().expose().starts_with("-----BEGIN PRIVATE KEY-----"), "kept as PKCS#8");
        assert!(!format!("{ca:?}").contains(&read(dir, file).lines().nth(1).unwrap()[..16]));
        let (leaf, _) = ca.issue_with_key(&id, &[], &[], Duration::from_secs(600)).unwrap();
        let roots = crate::svid::root_store(ca.trust_bundle()).unwrap();
        crate::svid::verify_chain(&leaf.chain, &roots, SystemTime::now()).unwrap_or_else(|e| panic!("{alg}: {e}"));
        let leaf_file = dir.join("leaf.pem");
        std::fs::write(&leaf_file, leaf.chain_pem()).unwrap();
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
            .arg(&root)
            .arg(&leaf_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{alg}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&leaf_file).output().unwrap();
        let want = match *alg {
            "EC P-256" => "ecdsa-with-SHA256",
            "EC P-384" => "ecdsa-with-SHA384",
            "RSA" => "sha256WithRSAEncryption",
            _ => "ED25519",
        };
        assert!(String::from_utf8_lossy(&text.stdout).contains(want), "{alg} signs with {want}");
    }
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_naming_both() {
    let Some(tmp) = openssl() else { return };
    let dir = tmp.path();
    run(dir, "ecparam -name prime256v1 -genkey -noout -out a.pem");
    run(dir, "genrsa -traditional -out b.pem 2048");
    let root = openssl_root(dir, "a.pem", "a");
    let err = CertificateAuthority::from_pem(
        &std::fs::read_to_string(root).unwrap(),
        SecretPem::new(read(dir, "b.pem")),
        None,
    )
    .unwrap_err();
    assert!(matches!(&err, CaError::KeyPem { source: KeyError::Mismatch { .. } }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("certificate: EC P-256, key: RSA") && text.contains(ACCEPTED), "{text}");
}

#[test]
fn a_self_signed_root_with_a_key_not_accepted_is_refused_naming_the_key_not_the_chain() {
    let Some(tmp) = openssl() else { return };
    let dir = tmp.path();
    let cases = [
        (
            "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out p521.pem",
            "p521.pem",
            "EC keys on P-521 (secp521r1) are not supported",
        ),
        ("genrsa -traditional -out rsa1024.pem 1024", "rsa1024.pem", "an RSA key of 1024 bits is not supported"),
    ];
    for (cmd, file, says) in cases {
        run(dir, cmd);
        // Its own signature cannot be checked here (ring verifies neither):
        // the search for a root alone would find none.
        let root = std::fs::read_to_string(openssl_root(dir, file, &file.replace(".pem", ""))).unwrap();
        let err = CertificateAuthority::from_pem(&root, SecretPem::new(read(dir, file)), None).unwrap_err();
        let named =
            matches!(&err, CaError::KeyPem { source: KeyError::Curve { .. } | KeyError::RsaSize { bits: 1024 } });
        assert!(named, "{cmd}: {err:?}");
        let text = err.to_string();
        assert!(text.contains(says) && text.contains(ACCEPTED), "{cmd}: {text}");
        // The same with the root given as the trust bundle too.
        let err = CertificateAuthority::from_pem(&root, SecretPem::new(read(dir, file)), Some(&root)).unwrap_err();
        assert!(err.to_string().contains(says), "{cmd} with a bundle: {err}");
    }
}
