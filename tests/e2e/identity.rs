//! The identity journey: control plane, join token, sidecar certificate,
//! renewal, control-plane outage and restart, secrets hygiene.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, SystemTime};

use palisade_tests::{ControlPlane, Sidecar, eventually};
use x509_parser::prelude::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn write_token(dir: &std::path::Path, name: &str, token: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, token).unwrap();
    p
}

#[tokio::test]
async fn sidecar_gets_an_x509_svid_with_a_join_token() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--cert-ttl", "1h"]).await.unwrap();

    // `token create` prints only the token on stdout.
    let token = cp.create_token(WEB, &["--ttl", "10m"]).unwrap();
    assert!(token.starts_with("pjt_") && !token.contains(char::is_whitespace), "{token:?}");
    let tok = write_token(tmp.path(), "token", &token);

    let sc = Sidecar::spawn("sidecar", &cp, tmp.path(), &["--join-token-file", tok.to_str().unwrap()]).unwrap();
    let cfg = sc.wait_ready().await.unwrap();
    assert_eq!(cfg["identity"], WEB);
    let not_after = ::time::OffsetDateTime::parse(
        cfg["cert_not_after"].as_str().unwrap(),
        &::time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ttl = not_after - ::time::OffsetDateTime::now_utc();
    assert!(ttl > ::time::Duration::minutes(59) && ttl <= ::time::Duration::minutes(60), "TTL {ttl}");

    // The chain from /config passes every X.509-SVID rule.
    let chain_pem = cfg["cert_chain_pem"].as_str().unwrap();
    let chain = palisade_certs::ca::parse_pem_certs(chain_pem).unwrap();
    assert_eq!(chain.len(), 1, "a root-signed leaf travels alone");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let uris: Vec<_> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![Some(WEB.to_string())], "exactly one SAN, the URI");
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca && bc.critical);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical, "key usage must be critical");
    assert!(ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "digitalSignature only");
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let serial = leaf.raw_serial();
    assert!(serial[0] & 0x80 == 0 && serial.iter().any(|b| *b != 0), "serial positive and non-zero");
    let nb = leaf.validity().not_before.timestamp();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - nb - 60).abs() <= 10, "notBefore backdated ~1 min: {}", now - nb);

    // openssl agrees, in strict mode, for both client and server use.
    let leaf_pem = write_token(tmp.path(), "leaf.pem", chain_pem);
    for purpose in ["sslclient", "sslserver"] {
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(cp.bundle())
            .arg(&leaf_pem)
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl verify -purpose {purpose}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The proxy is listed, with identity, address and expiry.
    let out = cp.ctl(&["proxies", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let proxies: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &proxies.as_array().unwrap()[0];
    assert_eq!(p["identity"], WEB);
    assert_eq!(p["attestation"], "token");
    assert_eq!(p["cert_serial"], cfg["cert_serial"]);
    assert!(p["inbound_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    let table = String::from_utf8(cp.ctl(&["proxies"]).stdout).unwrap();
    assert!(table.contains("IDENTITY") && table.contains(WEB), "{table}");

    // cert inspect, on the file and on the live control plane.
    let out = cp.ctl(&["cert", "inspect", leaf_pem.to_str().unwrap(), "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spiffe_id"], WEB);
    assert_eq!(v["chain_verified"], true);
    let out = cp.ctl(&["cert", "inspect", &format!("127.0.0.1:{}", cp.port)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("spiffe://cluster.local/palisade/control-plane")
            && text.contains("Verified:    yes"),
        "{text}"
    );

    // A single-use token is spent: a second sidecar with it is refused.
    let again = Sidecar::spawn("sidecar2", &cp, tmp.path(), &["--join-token-file", tok.to_str().unwrap()]).unwrap();
    eventually("second sidecar refused", Duration::from_secs(10), || async {
        again.proc.logs().contains("has been used up").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(again.get("/ready").await.unwrap().0, 503);

    // `check` passes.
    let out = cp.ctl(&["check"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // Secrets: key files 0600, no key or token in logs, /config or APIs.
    for key in [cp.data_dir.join("ca/ca-key.pem"), cp.admin_dir().join("key.pem")] {
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "{}", key.display());
    }
    let ca_key = std::fs::read_to_string(cp.data_dir.join("ca/ca-key.pem")).unwrap();
    let key_body: String = ca_key.lines().filter(|l| !l.starts_with("-----")).collect();
    let config_text = sc.get("/config").await.unwrap().1;
    for (what, text) in
        [("control plane log", cp.proc.logs()), ("sidecar log", sc.proc.logs()), ("/config", config_text.clone())]
    {
        assert!(!text.contains(&key_body[..40]), "CA key in {what}");
        assert!(!text.contains(&token), "join token in {what}");
        assert!(!text.contains("PRIVATE KEY"), "private key in {what}");
    }
    // The store is state.json (after a compaction) and its journal.
    let state: String = ["state.json", "state.journal"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(cp.data_dir.join(f)).ok())
        .collect();
    assert!(state.contains("certificate") || state.contains("token"), "the store was read: {state}");
    assert!(!state.contains(&token), "the store keeps only the token hash");
    // Every issuance is an audit event.
    assert!(cp.proc.logs().lines().any(|l| l.contains("audit") && l.contains("certificate_issued") && l.contains(WEB)));
}

#[tokio::test]
async fn sidecar_renews_a_10s_certificate_without_gaps() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--cert-ttl", "10s"]).await.unwrap();
    let token = cp.create_token(WEB, &[]).unwrap();
    let sc = Sidecar::spawn("sidecar", &cp, tmp.path(), &["--join-token", &token]).unwrap();
    sc.wait_ready().await.unwrap();
    let mut serials = std::collections::BTreeSet::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let cfg = sc.config().await.expect("admin endpoint answers");
        assert_eq!(cfg["cert_valid"], true, "gap in validity at {:?}", start.elapsed());
        assert_eq!(sc.get("/ready").await.unwrap().0, 200);
        serials.insert(cfg["cert_serial"].as_str().unwrap().to_string());
        if serials.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(serials.len() >= 3, "expected at least two renewals in 30s, saw serials {serials:?}");
    assert!(sc.metric("palisade_identity_renewals_total").await.unwrap() >= 3.0);
    // Renewals use mTLS with the current cert: the single-use token was spent once.
    let out = cp.ctl(&["proxies", "-o", "json"]);
    let proxies: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(proxies.as_array().unwrap().len(), 1, "renewals replace the record: {proxies}");
    assert_eq!(proxies[0]["attestation"], "renewal");
}

#[tokio::test]
async fn sidecar_survives_a_control_plane_outage_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cp = ControlPlane::start(&data, tmp.path(), &["--cert-ttl", "20s"]).await.unwrap();
    let ca_before = std::fs::read_to_string(cp.bundle()).unwrap();
    let token = cp.create_token(WEB, &[]).unwrap();
    let sc = Sidecar::spawn("sidecar", &cp, tmp.path(), &["--join-token", &token]).unwrap();
    let first = sc.wait_ready().await.unwrap();

    let status = cp.proc.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "control plane exits 0 on SIGTERM: {status}");
    // Renewal (at ~10s) fails; the sidecar keeps its valid cert and says so in /metrics.
    eventually("renewal failures in /metrics", Duration::from_secs(20), || async {
        (sc.metric("palisade_identity_renewal_failures_total").await? >= 1.0).then_some(())
    })
    .await
    .unwrap();
    let cfg = sc.config().await.unwrap();
    assert_eq!(cfg["cert_valid"], true);
    assert_eq!(cfg["cert_serial"], first["cert_serial"], "kept the current cert");
    assert_eq!(sc.get("/ready").await.unwrap().0, 200);

    // Same data dir, same port: same CA, and the renewal (mTLS, no token) is accepted.
    let cp2 = ControlPlane::start_on(cp.port, &data, tmp.path(), &["--cert-ttl", "20s"]).await.unwrap();
    assert_eq!(std::fs::read_to_string(cp2.bundle()).unwrap(), ca_before, "restart keeps the CA");
    let renewed = eventually("sidecar renews after the restart", Duration::from_secs(30), || async {
        let c = sc.config().await?;
        (c["cert_serial"] != first["cert_serial"] && c["cert_valid"] == true).then_some(c)
    })
    .await
    .unwrap();
    assert_eq!(renewed["identity"], WEB);
    let out = cp2.ctl(&["proxies", "-o", "json"]);
    let proxies: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(proxies[0]["attestation"], "renewal");
    assert_eq!(proxies[0]["cert_serial"], renewed["cert_serial"]);
}

#[tokio::test]
async fn bad_configuration_exits_64_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(palisade_tests::bin("palisade-control-plane"))
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--cert-ttl", "5s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert-ttl 5s: must be between 10s and 24h"));

    let out = Command::new(palisade_tests::bin("palisade-sidecar"))
        .args(["--ca-bundle", "/nonexistent.pem", "--join-token", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca-bundle /nonexistent.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bundle = tmp.path().join("b.pem");
    std::fs::write(&bundle, "not pem").unwrap();
    let out = Command::new(palisade_tests::bin("palisade-sidecar")).arg("--ca-bundle").arg(&bundle).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));

    // The inline form injected pods use: the same checks, named by its flag;
    // and neither form at all is a usage error too.
    let out = Command::new(palisade_tests::bin("palisade-sidecar"))
        .args(["--join-token", "x"])
        .env("PALISADE_CA_BUNDLE_PEM", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca-bundle-pem:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(palisade_tests::bin("palisade-sidecar")).args(["--join-token", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-bundle"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(palisade_tests::bin("palisadectl"))
        .args(["token", "list"])
        .env_remove("PALISADE_CREDENTIALS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PALISADE_CREDENTIALS"));
}
