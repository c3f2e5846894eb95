//! Live root CA rotation (`palisadectl ca rotate`): under traffic through
//! real sidecars, with a sidecar joining mid-rotation, a control plane
//! SIGKILLed between steps, and an abort; no request fails, and at the end
//! every certificate and every bundle holds the new root only. A sidecar
//! that starts after `done` with the bundle of a pod made before the
//! rotation joins through the cross certificate the control plane serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, Svid, SvidStore, TrustBundle};
use palisade_certs::{CertificateAuthority, SecretPem, SpiffeId};
use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Proc, Sidecar, eventually, free_port};
use tokio::io::AsyncReadExt;

use crate::dataplane::{ORDERS, WEB};

const INVOICES: &str = "spiffe://cluster.local/ns/billing/sa/invoices";
const IDLE: &str = "spiffe://cluster.local/ns/batch/sa/idle";

fn status(cp: &ControlPlane) -> serde_json::Value {
    let out = cp.ctl(&["ca", "status", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

async fn phase_is(cp: &ControlPlane, phase: &str, within: Duration) -> serde_json::Value {
    eventually(&format!("the rotation to reach {phase}"), within, || async {
        let s = status(cp);
        (s["phase"] == phase).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", status(cp), cp.proc.logs()))
}

/// The CA in the control plane's data directory (generated there).
fn data_ca(cp: &ControlPlane) -> CertificateAuthority {
    let dir = cp.data_dir.join("ca");
    CertificateAuthority::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        SecretPem::new(std::fs::read_to_string(dir.join("ca-key.pem")).unwrap()),
        None,
    )
    .unwrap()
}

fn sha(ca: &CertificateAuthority) -> String {
    palisade_certs::ca::sha256_hex(&ca.trust_bundle()[0])
}

/// Whether a client certificate for `id` from `ca` gets a TLS session with
/// the sidecar at `addr` (whose own certificate must chain to `server_root`):
/// a refused client certificate ends the connection with an alert.
async fn accepted(addr: &str, ca: &CertificateAuthority, id: &str, server_root: &CertificateAuthority) -> bool {
    let id: SpiffeId = id.parse().unwrap();
    let (issued, key) = ca.issue_with_key(&id, &[], &[], Duration::from_secs(300)).unwrap();
    let certified = palisade_certs::csr::certified_key_from_pem(issued.chain.clone(), &key).unwrap();
    let store = SvidStore::new();
    store.set(Svid { certified, id, info: issued.info });
    let verifier = SpiffeServerVerifier::new(
        TrustBundle::new(server_root.trust_bundle()).unwrap(),
        PeerIdentity::TrustDomain(palisade_certs::TrustDomain::default()),
    );
    let mut cfg = palisade_certs::tls::client_config(verifier, Some(Arc::new(store))).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr: SocketAddr = addr.parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await else {
        return false;
    };
    // TLS 1.3: the server judges our certificate after the client finishes;
    // a refusal arrives as an alert, an acceptance as silence.
    let mut b = [0u8; 16];
    tokio::time::timeout(Duration::from_millis(800), tls.read(&mut b)).await.is_err()
}

/// Traffic through web's sidecar to orders every 20 ms, each request counted.
fn traffic(base: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match palisade_tests::http::get(&base, "/echo").await {
                Ok((200, _)) => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed)
    })
}

struct Mesh {
    orders: Sidecar,
    web: Sidecar,
    base: String,
    app: HttpApp,
}

async fn mesh(cp: &ControlPlane, dir: &std::path::Path) -> Mesh {
    let app = HttpApp::start().await;
    let orders = Sidecar::meshed("orders", cp, dir, ORDERS, &["--app", &app.addr.to_string()]).await.unwrap();
    let port = free_port();
    let web =
        Sidecar::meshed("web", cp, dir, WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")]).await.unwrap();
    let base = format!("127.0.0.1:{port}");
    eventually("web to reach orders", Duration::from_secs(10), || async {
        (palisade_tests::http::get(&base, "/echo").await.ok()?.0 == 200).then_some(())
    })
    .await
    .unwrap();
    Mesh { orders, web, base, app }
}

/// A sidecar container of a pod made before the rotation, restarted: the
/// same spec, so the trust bundle of that day (`bundle_pem`), not the
/// control plane's current one. Ready, or the test fails with its log.
async fn restarted_with(
    bundle_pem: &str,
    cp: &ControlPlane,
    dir: &std::path::Path,
    identity: &str,
    args: &[&str],
) -> Sidecar {
    let token = cp.create_token(identity, &[]).unwrap();
    let (admin, inbound) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut cmd = std::process::Command::new(palisade_tests::bin("palisade-sidecar"));
    cmd.env("PALISADE_CA_BUNDLE_PEM", bundle_pem)
        .args(["--control-plane", &cp.addr, "--join-token", &token, "--admin", &admin, "--inbound", &inbound])
        .args(args);
    let sc = Sidecar { proc: Proc::spawn("restarted", &mut cmd, dir).unwrap(), admin, inbound };
    sc.wait_ready().await.unwrap_or_else(|e| panic!("{e:#}\n{}", cp.proc.logs()));
    sc
}

/// The certificates the control plane's gRPC port sends to a client that
/// trusts only `roots`; `None` if that client cannot verify them.
async fn served_chain(cp: &ControlPlane, roots: &CertificateAuthority) -> Option<Vec<Vec<u8>>> {
    let verifier = SpiffeServerVerifier::new(
        TrustBundle::new(roots.trust_bundle()).unwrap(),
        PeerIdentity::Exact(palisade_certs::TrustDomain::default().control_plane()),
    );
    let cfg = palisade_certs::tls::client_config(verifier, None).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", cp.port)).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.ok()?;
    Some(tls.get_ref().1.peer_certificates()?.iter().map(|c| c.to_vec()).collect())
}

/// 2xx requests a sidecar has served (inbound) or sent (outbound).
async fn answered(sc: &Sidecar, direction: &str) -> f64 {
    let name = format!("palisade_requests_total{{direction=\"{direction}\",status_class=\"2xx\"}}");
    sc.metric(&name).await.unwrap_or(0.0)
}

/// Waits until `sc` has sent `n` answered requests: on a busy machine a
/// rotation can finish before the traffic the test counts has flowed.
async fn sent_at_least(sc: &Sidecar, n: f64) {
    eventually(&format!("{n} answered requests through the sidecar"), Duration::from_secs(30), || async {
        (answered(sc, "outbound").await >= n).then_some(())
    })
    .await
    .unwrap();
}

/// A sidecar's certificate chain (PEM) and the roots it trusts (SHA-256).
async fn sidecar_ca(sc: &Sidecar) -> (String, Vec<String>) {
    let c = sc.config().await.unwrap();
    let roots = c["trust_bundle_sha256"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    (c["cert_chain_pem"].as_str().unwrap().to_string(), roots)
}

fn chains_to(chain_pem: &str, ca: &CertificateAuthority) -> bool {
    let chain = palisade_certs::ca::parse_pem_certs(chain_pem).unwrap();
    let roots = palisade_certs::svid::root_store(ca.trust_bundle()).unwrap();
    palisade_certs::svid::verify_chain(&chain, &roots, std::time::SystemTime::now()).is_ok()
}

#[tokio::test]
async fn rotating_the_root_ca_under_traffic_fails_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &tmp.path().join("cp"),
        tmp.path(),
        &["--cert-ttl", "10s", "--default-policy", "allow-authenticated"],
    )
    .await
    .unwrap();
    let old = data_ca(&cp);
    let old_bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    let s = status(&cp);
    assert_eq!(s["phase"], "none", "{s}");
    assert_eq!(s["signing"]["sha256"], sha(&old));
    let m = mesh(&cp, tmp.path()).await;
    // A sidecar without traffic, frozen (SIGSTOP) while a step must wait for it.
    let idle = Sidecar::meshed("idle", &cp, tmp.path(), IDLE, &[]).await.unwrap();
    // With no rotation yet, the status still counts the connected proxies.
    eventually("the status to count 3 connected proxies", Duration::from_secs(10), || async {
        let out = cp.ctl(&["ca", "status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (status(&cp)["proxies"] == 3 && text.contains("proxies:    3 connected, 0 waited for")).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", status(&cp)));
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &idle.proc.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(m.base.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // One command drives it all.
    signal("-STOP");
    let rotate = tokio::process::Command::new(palisade_tests::bin("palisadectl"))
        .env("PALISADE_CONTROL_PLANE", &cp.addr)
        .env("PALISADE_CREDENTIALS", cp.admin_dir())
        .args(["ca", "rotate", "--generate", "--min-phase", "1s", "--timeout", "2m", "-o", "json"])
        .output();
    let rotate = tokio::spawn(rotate);
    let s = phase_is(&cp, "publishing", Duration::from_secs(10)).await;
    // The frozen sidecar cannot ACK the new bundle: the step waits for it, by name.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s2 = status(&cp);
    assert_eq!(s2["phase"], "publishing", "{s2}");
    assert_eq!(s2["waiting"], 1, "{s2}");
    assert!(s2["waiting_for"][0].as_str().unwrap().starts_with(IDLE), "{s2}");
    assert_eq!(s["bundle"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["signing"]["sha256"], sha(&old), "publishing still signs with the old root");
    let new_sha = s["new_root"]["sha256"].as_str().unwrap().to_string();
    // The webhook's and the admin credential's bundles carry both roots now.
    let admin_bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    assert_eq!(admin_bundle.matches("BEGIN CERTIFICATE").count(), 2, "{admin_bundle}");
    // A third sidecar joins in the middle of the rotation and calls orders too.
    let port = free_port();
    let invoices = Sidecar::meshed(
        "invoices",
        &cp,
        tmp.path(),
        INVOICES,
        &["--upstream", &format!("127.0.0.1:{port}=orders.shop")],
    )
    .await
    .unwrap();
    let load2 = traffic(format!("127.0.0.1:{port}"), stop.clone());
    signal("-CONT");
    // Certificates now come from the new root; frozen again before it renews
    // early, the idle sidecar holds the old root's retirement back.
    phase_is(&cp, "reissuing", Duration::from_secs(10)).await;
    signal("-STOP");
    let waits_for_idle = |s: &serde_json::Value| {
        s["waiting_for"].as_array().is_some_and(|w| w.iter().any(|w| w.as_str().unwrap_or("").starts_with(IDLE)))
    };
    let s2 = status(&cp);
    assert_eq!(s2["signing"]["sha256"], new_sha.as_str(), "{s2}");
    if waits_for_idle(&s2) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let s2 = status(&cp);
        assert_eq!(s2["phase"], "reissuing", "{s2}");
        assert!(waits_for_idle(&s2), "{s2}");
    } else {
        // It renewed in the moment between `reissuing` and the freeze (a
        // busy machine): the hold-back is shown in `publishing` above.
        eprintln!("the idle sidecar renewed before it was frozen again: {s2}");
    }
    signal("-CONT");

    let out = rotate.await.unwrap().unwrap();
    assert!(out.status.success(), "ca rotate: {}\n{}", String::from_utf8_lossy(&out.stderr), cp.proc.logs());
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["phase"], "done", "{done}");
    assert_eq!(done["signing"]["sha256"], new_sha.as_str());
    let bundle: Vec<_> = done["bundle"].as_array().unwrap().iter().map(|r| r["sha256"].clone()).collect();
    assert_eq!(bundle, vec![serde_json::Value::from(new_sha.clone())], "the old root is retired");

    // Every sidecar: its certificate from the new root only, its bundle the new root only.
    let new = data_ca(&cp);
    assert_eq!(sha(&new), new_sha, "the new root is the CA on disk");
    for sc in [&m.orders, &m.web, &invoices, &idle] {
        eventually("the sidecar to drop the old root", Duration::from_secs(10), || async {
            (sidecar_ca(sc).await.1 == vec![new_sha.clone()]).then_some(())
        })
        .await
        .unwrap();
        let (chain, _) = sidecar_ca(sc).await;
        assert!(chains_to(&chain, &new), "{chain}");
        assert!(!chains_to(&chain, &old), "{chain}");
    }
    // Keep traffic going over fresh connections: each renewal (10 s
    // certificates) reconnects the pooled peer connections, now under the
    // new root alone.
    let renewals = m.web.metric("palisade_identity_renewals_total").await.unwrap();
    eventually("web to renew once more", Duration::from_secs(20), || async {
        (m.web.metric("palisade_identity_renewals_total").await? > renewals).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    sent_at_least(&m.web, 210.0).await;
    sent_at_least(&invoices, 60.0).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    let (ok2, failed2) = load2.await.unwrap();
    assert!(failed.is_empty() && failed2.is_empty(), "failed: {failed:?} {failed2:?}");
    assert!(ok > 200 && ok2 > 50, "{ok} + {ok2} requests");
    eprintln!("rotation under traffic: {ok} + {ok2} requests, 0 failed");

    // A pod made before the rotation restarts its sidecar: the old bundle
    // verifies the control plane through the cross certificate (the new
    // root's key signed by the old one) sent after the control plane's own.
    let chain = served_chain(&cp, &old).await.expect("a client with the old root alone verifies the control plane");
    assert_eq!(chain.len(), 2, "the certificate, then the cross certificate");
    assert!(served_chain(&cp, &new).await.is_some());
    let port = free_port();
    let late = restarted_with(
        &old_bundle,
        &cp,
        tmp.path(),
        ORDERS,
        &["--app", &m.app.addr.to_string(), "--upstream", &format!("127.0.0.1:{port}=orders.shop")],
    )
    .await;
    eventually("the restarted sidecar to hold the new bundle", Duration::from_secs(10), || async {
        (sidecar_ca(&late).await.1 == vec![new_sha.clone()]).then_some(())
    })
    .await
    .unwrap();
    assert!(chains_to(&sidecar_ca(&late).await.0, &new));
    // It serves web's calls (round robin over both orders sidecars), and
    // calls orders.shop itself, over mTLS with new-root certificates.
    let late_base = format!("127.0.0.1:{port}");
    eventually("requests to and from the restarted sidecar", Duration::from_secs(15), || async {
        for base in [&m.base, &late_base, &m.base, &late_base] {
            if palisade_tests::http::get(base, "/echo").await.ok()?.0 != 200 {
                return None;
            }
        }
        (answered(&late, "inbound").await >= 1.0 && answered(&late, "outbound").await >= 1.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", late.proc.logs()));
    assert!(accepted(&late.inbound, &new, WEB, &new).await, "it trusts the new root");
    assert!(!accepted(&late.inbound, &old, WEB, &new).await, "and not the old one it started with");

    // The old root is gone: a certificate it signs is refused, one from the new root accepted.
    assert!(accepted(&m.orders.inbound, &new, WEB, &new).await, "a new-root certificate is accepted");
    assert!(!accepted(&m.orders.inbound, &old, WEB, &new).await, "an old-root certificate is refused");
    let admin_bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    assert_eq!(admin_bundle.matches("BEGIN CERTIFICATE").count(), 1);
    assert_eq!(palisade_certs::ca::parse_pem_certs(&admin_bundle).unwrap()[0], new.trust_bundle()[0]);
    // palisadectl works with the rewritten credential, and a second rotation may start.
    let out = cp.ctl(&["ca", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("phase:      done") && text.contains("the old root is retired"), "{text}");
    let logs = cp.proc.logs();
    for event in ["ca_rotation_started", "ca_cross_signed", "ca_rotation_step"] {
        assert!(logs.contains(event), "audit {event}: {logs}");
    }
    assert!(!logs.contains("BEGIN PRIVATE KEY") && !logs.contains("BEGIN EC PRIVATE KEY"));
}

/// SIGKILLed in the middle, the control plane resumes where it was; an
/// abort renews back to the old root before the new one leaves the bundles.
#[tokio::test]
async fn an_interrupted_rotation_resumes_and_an_aborted_one_restores_the_old_root() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--cert-ttl", "10s", "--default-policy", "allow-authenticated"];
    let dir = tmp.path().join("cp");
    let mut cp = ControlPlane::start(&dir, tmp.path(), &args).await.unwrap();
    let port = cp.port;
    let old = data_ca(&cp);
    let m = mesh(&cp, tmp.path()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(m.base.clone(), stop.clone());

    // To the operator's own root this time (the control plane generates one otherwise).
    let mine =
        CertificateAuthority::generate(&palisade_certs::TrustDomain::default(), Duration::from_secs(400 * 86400))
            .unwrap();
    let (root_file, key_file) = (tmp.path().join("new-root.pem"), tmp.path().join("new-root-key.pem"));
    std::fs::write(&root_file, mine.cert_pem()).unwrap();
    palisade_certs::files::write_secret(&key_file, mine.key_pem().expose()).unwrap();
    let (root_arg, key_arg) = (root_file.to_str().unwrap(), key_file.to_str().unwrap());
    let out = cp.ctl(&[
        "ca",
        "rotate",
        "--new-root",
        root_arg,
        "--new-root-key",
        key_arg,
        "--min-phase",
        "2s",
        "--no-wait",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(started["new_root"]["sha256"], sha(&mine));
    assert_eq!(started["phase"], "publishing");
    let again = cp.ctl(&["ca", "rotate", "--generate"]);
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("in progress (phase publishing)"), "{said}\n{}", cp.proc.logs());
    phase_is(&cp, "reissuing", Duration::from_secs(15)).await;
    // SIGKILL between steps, and start it again on the same data and port.
    cp.proc.child.kill().unwrap();
    let _ = cp.proc.child.wait();
    let cp = ControlPlane::start_on(port, &dir, tmp.path(), &args).await.unwrap();
    let s = status(&cp);
    assert!(s["phase"] == "reissuing" || s["phase"] == "done", "resumed where it was: {s}");
    let s = phase_is(&cp, "done", Duration::from_secs(30)).await;
    let first = data_ca(&cp);
    assert_eq!(s["signing"]["sha256"], sha(&first));
    assert_eq!(sha(&first), sha(&mine), "the operator's root is the CA now");
    assert_ne!(sha(&first), sha(&old));
    assert!(!cp.proc.logs().contains(mine.key_pem().expose().lines().nth(1).unwrap()), "the key is never logged");

    // A second rotation, aborted after certificates moved to its root (a
    // frozen sidecar holds the step open meanwhile).
    let idle = Sidecar::meshed("idle", &cp, tmp.path(), IDLE, &[]).await.unwrap();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &idle.proc.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    };
    let out = cp.ctl(&["ca", "rotate", "--generate", "--no-wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    phase_is(&cp, "reissuing", Duration::from_secs(15)).await;
    signal("-STOP");
    eventually("a sidecar to hold a certificate from the second new root", Duration::from_secs(15), || async {
        (!chains_to(&sidecar_ca(&m.orders).await.0, &first)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(status(&cp)["phase"], "reissuing");
    let out = cp.ctl(&["ca", "rotate", "--abort", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["phase"], "aborted", "{s}");
    for sc in [&m.orders, &m.web] {
        let (chain, _) = sidecar_ca(sc).await;
        assert!(chains_to(&chain, &first), "renewed back to the root in force: {chain}");
        eventually("the sidecar to drop the withdrawn root", Duration::from_secs(10), || async {
            (sidecar_ca(sc).await.1 == vec![sha(&first)]).then_some(())
        })
        .await
        .unwrap();
    }
    let again = cp.ctl(&["ca", "rotate", "--abort"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already aborted"));
    signal("-CONT");
    // The withdrawn root's cross certificate is not served; the first
    // rotation's is, and a sidecar with the bundle of before both joins.
    let chain = served_chain(&cp, &old).await.expect("the first root still verifies the control plane");
    assert_eq!(chain.len(), 2, "the certificate and the first rotation's cross certificate only");
    let leaf = rustls_pki_types::CertificateDer::from(chain[0].clone());
    assert!(chains_to(&palisade_certs::ca::der_to_pem(&leaf), &first), "signed by the root in force");
    let late = restarted_with(&old.trust_bundle_pem(), &cp, tmp.path(), INVOICES, &[]).await;
    eventually("the restarted sidecar to hold the bundle in force", Duration::from_secs(10), || async {
        (sidecar_ca(&late).await.1 == vec![sha(&first)]).then_some(())
    })
    .await
    .unwrap();

    sent_at_least(&m.web, 210.0).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    // The control plane was down for a moment; the data path never was.
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(ok > 200, "{ok} requests");
    eprintln!("interrupted and aborted rotations: {ok} requests, 0 failed");
}

/// A CA the operator gives by file is the operator's to rotate.
#[tokio::test]
async fn an_operator_ca_is_not_rotated_by_the_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = crate::replicas::shared_ca(tmp.path());
    let cp =
        ControlPlane::start(&tmp.path().join("cp"), tmp.path(), &["--ca-cert", &cert, "--ca-key", &key]).await.unwrap();
    let out = cp.ctl(&["ca", "rotate", "--generate"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FAILED_PRECONDITION") && err.contains("--ca-cert"), "{err}");
    assert_eq!(status(&cp)["phase"], "none");
    let out = cp.ctl(&["ca", "rotate", "--generate", "--abort"]);
    assert!(!out.status.success());
}

/// Two replicas on etcd, sidecars on each: the rotation started on one
/// replica reaches the sidecars of the other, and when the leading replica
/// is SIGKILLed in the middle, the survivor takes the lead and finishes it.
#[tokio::test]
async fn replicas_on_etcd_rotate_together_and_the_survivor_finishes_the_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_etcd, url, _)) = crate::replicas::etcd(&tmp.path().join("etcd"), tmp.path()).await else { return };
    let store_key = tmp.path().join("store.key");
    palisade_certs::files::write_secret(&store_key, &crate::replicas::base64_key(5)).unwrap();
    let (ma, mb) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let common = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        url.as_str(),
        "--store-key-file",
        store_key.to_str().unwrap(),
        "--default-policy",
        "allow-authenticated",
        "--cert-ttl",
        "10s",
    ];
    let mut cps = vec![
        ControlPlane::start(&tmp.path().join("a"), tmp.path(), &[&common[..], &["--metrics-listen", &ma]].concat())
            .await
            .unwrap(),
        ControlPlane::start(&tmp.path().join("b"), tmp.path(), &[&common[..], &["--metrics-listen", &mb]].concat())
            .await
            .unwrap(),
    ];
    let metrics = [ma, mb];
    let leader = eventually("a replica to lead", Duration::from_secs(15), || async {
        for (i, m) in metrics.iter().enumerate() {
            if crate::replicas::leads(m).await {
                return Some(i);
            }
        }
        None
    })
    .await
    .unwrap();
    let both = format!("{},{}", cps[0].addr, cps[1].addr);
    let app = HttpApp::start().await;
    // Each sidecar picks a replica at random and fails over to the other.
    let t = cps[0].create_token(ORDERS, &[]).unwrap();
    let orders = Sidecar::spawn(
        "orders",
        &cps[0],
        tmp.path(),
        &["--join-token", &t, "--control-plane", &both, "--app", &app.addr.to_string()],
    )
    .unwrap();
    orders.wait_ready().await.unwrap();
    let port = free_port();
    let t = cps[1].create_token(WEB, &[]).unwrap();
    let web = Sidecar::spawn(
        "web",
        &cps[1],
        tmp.path(),
        &["--join-token", &t, "--control-plane", &both, "--upstream", &format!("127.0.0.1:{port}=orders.shop")],
    )
    .unwrap();
    web.wait_ready().await.unwrap();
    let base = format!("127.0.0.1:{port}");
    eventually("web to reach orders", Duration::from_secs(10), || async {
        (palisade_tests::http::get(&base, "/echo").await.ok()?.0 == 200).then_some(())
    })
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(base, stop.clone());

    // Started on the replica that does not lead: the leader drives it.
    let follower = 1 - leader;
    let out = cps[follower].ctl(&["ca", "rotate", "--generate", "--min-phase", "2s", "--no-wait", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = phase_is(&cps[leader], "publishing", Duration::from_secs(5)).await;
    let new_sha = s["new_root"]["sha256"].as_str().unwrap().to_string();
    for cp in &cps {
        let b = std::fs::read_to_string(cp.bundle()).unwrap();
        assert_eq!(b.matches("BEGIN CERTIFICATE").count(), 2, "every replica publishes both roots");
    }
    eventually("the leader's metrics to show two roots", Duration::from_secs(5), || async {
        let m = palisade_tests::http::get(&metrics[leader], "/metrics").await.ok()?.1;
        m.lines().any(|l| l == "palisade_cp_ca_roots 2").then_some(())
    })
    .await
    .unwrap();
    phase_is(&cps[follower], "reissuing", Duration::from_secs(15)).await;
    // The leader dies in the middle of the step.
    let mut dead = cps.remove(leader);
    dead.proc.child.kill().unwrap();
    let _ = dead.proc.child.wait();
    let survivor = &cps[0];
    let s = phase_is(survivor, "done", Duration::from_secs(40)).await;
    assert!(crate::replicas::leads(&metrics[follower]).await, "the survivor leads");
    assert_eq!(s["signing"]["sha256"], new_sha.as_str());
    assert_eq!(s["bundle"].as_array().unwrap().len(), 1, "{s}");
    eventually("the survivor's metrics to show one root", Duration::from_secs(5), || async {
        let m = palisade_tests::http::get(&metrics[follower], "/metrics").await.ok()?.1;
        (m.lines().any(|l| l == "palisade_cp_ca_roots 1")
            && m.lines().any(|l| l == "palisade_cp_ca_rotation_waiting 0"))
        .then_some(())
    })
    .await
    .unwrap();
    for sc in [&orders, &web] {
        eventually("the sidecar to hold the new root only", Duration::from_secs(15), || async {
            let (chain, roots) = sidecar_ca(sc).await;
            let leaf = palisade_certs::ca::parse_pem_certs(&chain).ok()?;
            let info = palisade_certs::SvidInfo::parse(&leaf[0]).ok()?;
            let issued_by_new = s["signing"]["subject"].as_str() == Some(info.issuer.as_str());
            (roots == vec![new_sha.clone()] && issued_by_new).then_some(())
        })
        .await
        .unwrap();
    }
    // A fresh join through the survivor after the rotation.
    let t = survivor.create_token(INVOICES, &[]).unwrap();
    let joiner =
        Sidecar::spawn("invoices", survivor, tmp.path(), &["--join-token", &t, "--control-plane", &both]).unwrap();
    joiner.wait_ready().await.unwrap();
    assert_eq!(sidecar_ca(&joiner).await.1, vec![new_sha.clone()]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    sent_at_least(&web, 210.0).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(ok > 200, "{ok} requests");
    eprintln!("rotation across replicas, leader killed mid-rotation: {ok} requests, 0 failed");
}
