//! The daemons' logic through their libraries: a control plane and two
//! sidecars started in this test's runtime ([`palisade_tests::inproc`]),
//! with real TLS and the mesh's own PKI. The data path, policy pushed
//! through the Admin API, and the control stream client's reconnect, each
//! in well under the time one process takes to start.

use std::time::{Duration, Instant};

use palisade_tests::eventually;
use palisade_tests::inproc::{Mesh, WEB, get_via};

/// A DENY of web's calls to orders, or (`deny = false`) the same policy
/// updated to deny only another caller.
fn gate(deny_web: bool) -> String {
    let caller = if deny_web { WEB } else { "spiffe://cluster.local/ns/shop/sa/billing" };
    format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: gate, namespace: shop}}\nspec:\n  target: {{identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}}\n  action: DENY\n  rules:\n    - from: [{{identities: [\"{caller}\"]}}]\n"
    )
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_request_reaches_the_app_with_the_callers_identity() {
    let started = Instant::now();
    let mesh = Mesh::start(&["--default-policy", "allow-authenticated"]).await.unwrap();
    let (status, body) = mesh.get("/echo?via=inproc").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["headers"]["x-palisade-peer-identity"], WEB, "{v}");
    assert_eq!(v["uri"], "/echo?via=inproc");
    assert_eq!(v["version"], "HTTP/1.1", "the app gets the protocol the caller spoke");
    assert_eq!(mesh.app.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        mesh.callee.metric("palisade_requests_total{direction=\"inbound\",status_class=\"2xx\"}").await.unwrap() >= 1.0
    );
    // A mesh started and a request carried, without a process: seconds at most.
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(mesh.callee.drain(Duration::from_secs(5)).await, "an idle sidecar drains at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_policy_applied_through_the_admin_api_denies_then_allows() {
    let mesh = Mesh::start(&["--default-policy", "allow-authenticated", "--push-coalesce", "10ms"]).await.unwrap();
    assert_eq!(mesh.get("/echo").await.unwrap().0, 200);

    mesh.cp.apply(&gate(true)).await.unwrap();
    let body = mesh.until_status("/echo", 403, Duration::from_secs(10)).await.unwrap();
    assert!(!body.contains("x-palisade-peer-identity"), "a denied request never reaches the app: {body}");
    let reached = mesh.app.requests.load(std::sync::atomic::Ordering::SeqCst);

    // The same policy, updated: web is no longer the caller it denies.
    mesh.cp.apply(&gate(false)).await.unwrap();
    let body = mesh.until_status("/echo", 200, Duration::from_secs(10)).await.unwrap();
    assert_eq!(json(&body)["headers"]["x-palisade-peer-identity"], WEB);
    assert_eq!(
        mesh.app.requests.load(std::sync::atomic::Ordering::SeqCst),
        reached + 1,
        "denied requests never arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_sidecar_keeps_its_policy_without_the_control_plane_and_reconnects() {
    let mut mesh = Mesh::start(&["--default-policy", "allow-authenticated", "--push-coalesce", "10ms"]).await.unwrap();
    mesh.cp.apply(&gate(true)).await.unwrap();
    mesh.until_status("/echo", 403, Duration::from_secs(10)).await.unwrap();
    let connected = "palisade_policy_stream_connected";
    assert_eq!(mesh.callee.metric(connected).await, Some(1.0));

    // The control plane goes away: both sidecars notice, and keep serving
    // with what they held (the deny stays in force, the caller still routes).
    mesh.cp.stop().await;
    eventually("the sidecars see the stream lost", Duration::from_secs(10), || async {
        (mesh.callee.metric(connected).await? == 0.0 && mesh.caller.metric(connected).await? == 0.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(mesh.get("/echo").await.unwrap().0, 403, "the policy held stays in force");
    assert_eq!(mesh.callee.get("/ready").await.map(|r| r.0), Some(200), "still ready without the control plane");

    // Back on the same dir and port: the streams reopen by themselves, and
    // what changed meanwhile (here: after) reaches the sidecars.
    mesh.cp.restart().await.unwrap();
    eventually("the sidecars reconnect", Duration::from_secs(20), || async {
        (mesh.callee.metric(connected).await? == 1.0 && mesh.caller.metric(connected).await? == 1.0).then_some(())
    })
    .await
    .unwrap();
    mesh.cp.apply(&gate(false)).await.unwrap();
    let body = mesh.until_status("/echo", 200, Duration::from_secs(10)).await.unwrap();
    assert_eq!(json(&body)["headers"]["x-palisade-peer-identity"], WEB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_a_draining_sidecar_finishes_what_is_in_flight_and_takes_nothing_new() {
    let mesh = Mesh::start(&["--default-policy", "allow-authenticated"]).await.unwrap();
    let requests = mesh.app.requests.clone();
    let slow = tokio::spawn(get_via(mesh.port, "/slow?ms=500"));
    eventually("the slow request reaches the app", Duration::from_secs(5), || async {
        (requests.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();

    let started = Instant::now();
    assert!(mesh.callee.drain(Duration::from_secs(5)).await, "the in-flight request finished within the deadline");
    assert!(started.elapsed() >= Duration::from_millis(200), "drain waited for it: {:?}", started.elapsed());
    assert_eq!(slow.await.unwrap().unwrap(), (200, "slow done".to_string()));

    let (status, body) = get_via(mesh.port, "/echo").await.unwrap();
    assert_ne!(status, 200, "a drained sidecar takes no new request: {body}");
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}
