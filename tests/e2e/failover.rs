//! A sidecar given several control-plane replicas spreads across them and,
//! when the one it uses dies, moves to another: its config stream and its
//! renewals go on there.
//!
//! The two control planes here share one operator root but not a store
//! (each has its own file store: the replicated store is issue 16's next
//! step), so the join token is known to one of them only, and the other
//! learns of the proxy when it renews there.

use std::time::Duration;

use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Sidecar, eventually};

use crate::dataplane::ORDERS;

fn synced_on(cp: &ControlPlane) -> bool {
    let out = cp.ctl(&["proxies", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array().is_some_and(|a| a.iter().any(|p| p["identity"] == ORDERS && p["sync_state"] == "synced"))
}

#[tokio::test]
async fn a_sidecar_moves_to_another_control_plane_replica_and_keeps_renewing() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = crate::replicas::shared_ca(tmp.path());
    let args = [
        "--ca-cert",
        cert.as_str(),
        "--ca-key",
        key.as_str(),
        "--cert-ttl",
        "10s",
        "--default-policy",
        "allow-authenticated",
    ];
    let mut a = ControlPlane::start(&tmp.path().join("a"), tmp.path(), &args).await.unwrap();
    let b = ControlPlane::start(&tmp.path().join("b"), tmp.path(), &args).await.unwrap();

    let app = HttpApp::start().await;
    let token = a.create_token(ORDERS, &[]).unwrap();
    let sc = Sidecar::spawn(
        "orders",
        &a,
        tmp.path(),
        &["--join-token", &token, "--control-plane", &b.addr, "--app", &app.addr.to_string()],
    )
    .unwrap();
    sc.wait_ready().await.unwrap();
    // Only a knows the token: wherever it tried first, it joined through a, and stays there.
    eventually("the config stream on replica a", Duration::from_secs(10), || async { synced_on(&a).then_some(()) })
        .await
        .unwrap();

    // a dies without a goodbye.
    let renewals = sc.metric("palisade_identity_renewals_total").await.unwrap();
    a.proc.child.kill().unwrap();
    let _ = a.proc.child.wait();
    eventually("the sidecar to renew through replica b and stream from it", Duration::from_secs(30), || async {
        let renewed = sc.metric("palisade_identity_renewals_total").await? > renewals;
        (renewed && synced_on(&b)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", sc.proc.logs()));
    assert_eq!(sc.metric("palisade_identity_cert_valid").await, Some(1.0));
    assert_eq!(sc.metric("palisade_policy_stream_connected").await, Some(1.0));
    assert_eq!(sc.get("/ready").await.map(|r| r.0), Some(200));
    let logs = sc.proc.logs();
    assert!(logs.contains("connected to a control-plane replica"), "{logs}");

    // Addresses are checked: too many, or one that is not https.
    let out = std::process::Command::new(palisade_tests::bin("palisade-sidecar"))
        .args(["--control-plane", "http://127.0.0.1:1", "--ca-bundle"])
        .arg(b.bundle())
        .args(["--join-token", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--control-plane"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let many = vec!["https://127.0.0.1:1"; 17].join(",");
    let out = std::process::Command::new(palisade_tests::bin("palisade-sidecar"))
        .args(["--control-plane", &many, "--ca-bundle"])
        .arg(b.bundle())
        .args(["--join-token", "x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("17 addresses given; give 1 to 16"));
}
