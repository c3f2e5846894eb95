//! The incremental, scoped config protocol (`MeshConfig.Subscribe`), spoken
//! by simulated sidecars against the real control plane: what a stream is
//! sent first, additions and removals, subscriptions on demand by service
//! and by address, a NACK of one type, a reconnect sent only the
//! difference, coalescing, and a few hundred sidecars each sent what they
//! need and not the mesh. Scale figures come from `palisade-bench push`.

use std::collections::HashMap;
use std::time::Duration;

use palisade_certs::WorkloadKey;
use palisade_certs::tls::Svid;
use palisade_proto::v1::certify_request::Attestation;
use palisade_proto::v1::config_request::Kind;
use palisade_proto::v1::identity_client::IdentityClient;
use palisade_proto::v1::resource::Body;
use palisade_proto::v1::{
    ApplyPolicyRequest, CertifyRequest, ConfigRequest, ConfigUpdate, GetPolicyRequest, Hello, ResourceVersion, Want,
};
use palisade_tests::{ControlPlane, config, eventually, grpc};
use tonic::Streaming;
use tonic::transport::Channel;

const TD: &str = "spiffe://cluster.local/ns/shop/sa/";

/// A certificate for `sa` (registering `addr`), with `token`.
async fn join(cp: &ControlPlane, token: &str, addr: &str) -> Svid {
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let ch = grpc::channel(&cp.addr, &bundle, None).await.unwrap();
    let resp = IdentityClient::new(ch)
        .certify(CertifyRequest {
            csr_der: key.csr_der(None).unwrap(),
            attestation: Some(Attestation::JoinToken(token.into())),
            inbound_addr: addr.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let chain: Vec<_> = resp.cert_chain_der.into_iter().map(rustls_pki_types::CertificateDer::from).collect();
    let (id, info) = palisade_certs::SvidInfo::parse_svid(&chain[0]).unwrap();
    Svid { certified: key.certified(chain).unwrap(), info, id }
}

async fn channel(cp: &ControlPlane, svid: Svid) -> Channel {
    grpc::channel(&cp.addr, &std::fs::read_to_string(cp.bundle()).unwrap(), Some(svid)).await.unwrap()
}

async fn next(updates: &mut Streaming<ConfigUpdate>) -> ConfigUpdate {
    tokio::time::timeout(Duration::from_secs(10), updates.message())
        .await
        .expect("an update within 10 s")
        .unwrap()
        .expect("the stream is open")
}

/// No update arrives for a while (nothing this sidecar holds changed).
async fn quiet(updates: &mut Streaming<ConfigUpdate>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(800), updates.message()).await {
        panic!("an update nobody needed: {m:?}");
    }
}

fn names(u: &ConfigUpdate) -> Vec<String> {
    let mut n: Vec<String> = u.resources.iter().map(|r| format!("{}/{}", r.r#type, r.name)).collect();
    n.sort();
    n
}

fn endpoints(u: &ConfigUpdate, service: &str) -> Option<Vec<String>> {
    u.resources.iter().find(|r| r.r#type == "service" && r.name == service).map(|r| match &r.body {
        Some(Body::Service(s)) => s.endpoints.iter().map(|e| e.address.clone()).collect(),
        other => panic!("a service resource with {other:?}"),
    })
}

fn want(services: &[&str], addresses: &[&str]) -> Want {
    Want {
        services: services.iter().map(|s| s.to_string()).collect(),
        addresses: addresses.iter().map(|s| s.to_string()).collect(),
    }
}

fn policy(name: &str, target: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  target: {{identities: [\"{target}\"]}}\n  action: ALLOW\n  rules:\n    - from: [{{namespaces: [\"shop\"]}}]\n"
    )
}

#[tokio::test]
async fn config_is_incremental_scoped_and_resumable() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--push-coalesce", "300ms"]).await.unwrap();
    let web_token = cp.create_token(&format!("{TD}web"), &["--uses", "4"]).unwrap();
    let orders_token = cp.create_token(&format!("{TD}orders"), &["--uses", "4"]).unwrap();
    let mut admin =
        palisade_proto::v1::admin_client::AdminClient::new(channel(&cp, crate::attack::admin_svid(&cp)).await);

    // web calls orders: its first update holds the bundle, the settings and
    // orders' endpoints (none yet: an answer, not a silence).
    let web = channel(&cp, join(&cp, &web_token, "10.1.0.1:4143").await).await;
    let hello =
        Hello { inbound_addr: "10.1.0.1:4143".into(), want: Some(want(&["orders.shop"], &[])), ..Default::default() };
    let (tx, mut web_updates) = config::subscribe_with(web.clone(), hello).await;
    let first = next(&mut web_updates).await;
    assert!(!first.nonce.is_empty());
    assert_eq!(names(&first), ["service/orders.shop", "settings/mesh", "trust_bundle/roots"], "{first:?}");
    assert_eq!(endpoints(&first, "orders.shop"), Some(vec![]));
    tx.send(config::ack(first.nonce.clone())).await.unwrap();
    let mut held: HashMap<(String, String), String> =
        first.resources.iter().map(|r| ((r.r#type.clone(), r.name.clone()), r.version.clone())).collect();

    // A sidecar that calls nothing is not told when orders appears.
    let other = join(&cp, &web_token, "10.1.0.9:4143").await;
    let (_other_tx, mut other_updates) = config::subscribe(channel(&cp, other).await, "10.1.0.9:4143").await;
    next(&mut other_updates).await;

    // orders appears: web is sent orders' endpoints, and nothing else.
    let orders = channel(&cp, join(&cp, &orders_token, "10.1.0.2:4143").await).await;
    let u = next(&mut web_updates).await;
    assert_eq!(names(&u), ["service/orders.shop"], "{u:?}");
    assert_eq!(endpoints(&u, "orders.shop"), Some(vec!["10.1.0.2:4143".to_string()]));
    assert!(prost::Message::encoded_len(&u) < 1024, "an endpoint change is small: {u:?}");
    tx.send(config::ack(u.nonce.clone())).await.unwrap();
    for r in &u.resources {
        held.insert((r.r#type.clone(), r.name.clone()), r.version.clone());
    }
    quiet(&mut other_updates).await;

    // On demand: a service and an address, each answered.
    tx.send(ConfigRequest { kind: Some(Kind::Want(want(&["db.shop"], &[]))) }).await.unwrap();
    let u = next(&mut web_updates).await;
    assert_eq!(names(&u), ["service/db.shop"]);
    assert_eq!(endpoints(&u, "db.shop"), Some(vec![]));
    tx.send(ConfigRequest { kind: Some(Kind::Want(want(&[], &["10.1.0.2", "10.1.0.77"]))) }).await.unwrap();
    let u = next(&mut web_updates).await;
    assert_eq!(names(&u), ["address/10.1.0.2", "address/10.1.0.77"]);
    let at =
        |ip: &str| u.resources.iter().find(|r| r.name == ip).and_then(|r| r.body.clone()).expect("an address answer");
    assert_eq!(at("10.1.0.2"), Body::AddressService("orders.shop".into()));
    assert_eq!(at("10.1.0.77"), Body::AddressService(String::new()), "nothing meshed there");
    // Invalid names are ignored, never echoed.
    tx.send(ConfigRequest { kind: Some(Kind::Want(want(&["../etc", "UPPER.case"], &["not-an-ip"]))) }).await.unwrap();
    quiet(&mut web_updates).await;

    // A policy for web: added, then removed; orders' sidecar is not told.
    let (_orders_tx, mut orders_updates) = config::subscribe(orders, "10.1.0.2:4143").await;
    next(&mut orders_updates).await;
    admin.apply_policy(ApplyPolicyRequest { document: policy("web-in", &format!("{TD}web")) }).await.unwrap();
    let u = next(&mut web_updates).await;
    assert_eq!(names(&u), ["policy/AuthorizationPolicy/shop/web-in"], "{u:?}");
    assert!(u.policy_version.starts_with('r'), "{u:?}");
    quiet(&mut orders_updates).await;
    // web rejects it: its NACK names the type, and shows in `proxies`.
    tx.send(config::nack(u.nonce.clone(), [("policy".into(), "cannot compile".into())])).await.unwrap();
    let shown = eventually("the NACK in proxies", Duration::from_secs(10), || async {
        let out = String::from_utf8_lossy(&cp.ctl(&["proxies", "-o", "json"]).stdout).into_owned();
        out.contains("policy: cannot compile").then_some(out)
    })
    .await
    .unwrap();
    assert!(shown.contains("nacked"), "{shown}");
    let deleted = GetPolicyRequest { kind: "AuthorizationPolicy".into(), key: "shop/web-in".into() };
    admin.delete_policy(deleted).await.unwrap();
    let u = next(&mut web_updates).await;
    assert!(u.resources.is_empty(), "{u:?}");
    assert_eq!(u.removed.len(), 1, "{u:?}");
    assert_eq!(
        (u.removed[0].r#type.as_str(), u.removed[0].name.as_str()),
        ("policy", "AuthorizationPolicy/shop/web-in")
    );
    tx.send(config::ack(u.nonce.clone())).await.unwrap();

    // Coalescing: three policies applied together arrive together.
    for n in ["a", "b", "c"] {
        admin.apply_policy(ApplyPolicyRequest { document: policy(n, &format!("{TD}web")) }).await.unwrap();
    }
    let mut got = Vec::new();
    let mut updates = 0;
    while got.len() < 3 {
        let u = next(&mut web_updates).await;
        updates += 1;
        got.extend(names(&u));
        tx.send(config::ack(u.nonce.clone())).await.unwrap();
    }
    assert!(updates <= 2, "three changes in one window: {updates} updates ({got:?})");
    for n in ["a", "b", "c"] {
        let p = GetPolicyRequest { kind: "AuthorizationPolicy".into(), key: format!("shop/{n}") };
        admin.delete_policy(p).await.unwrap();
    }
    let u = next(&mut web_updates).await;
    assert_eq!(u.removed.len(), 3, "{u:?}");
    drop((tx, web_updates));

    // Reconnect saying what it holds: only the difference comes. Here web
    // holds an old version of orders' endpoints and a service it no longer wants.
    held.insert(("service".into(), "orders.shop".into()), "stale".into());
    held.insert(("service".into(), "gone.shop".into()), "v1".into());
    let hello = Hello {
        inbound_addr: "10.1.0.1:4143".into(),
        held: held
            .iter()
            .map(|((t, n), v)| ResourceVersion { r#type: t.clone(), name: n.clone(), version: v.clone() })
            .collect(),
        want: Some(want(&["orders.shop"], &[])),
        ..Default::default()
    };
    let (_tx, mut again) = config::subscribe_with(web, hello).await;
    let u = next(&mut again).await;
    assert_eq!(names(&u), ["service/orders.shop"], "{u:?}");
    assert_eq!(u.removed.len(), 1, "{u:?}");
    assert_eq!(u.removed[0].name, "gone.shop");
}

/// A few hundred sidecars of 60 services, each subscribed to one other
/// service: every one is sent its own service's endpoints as they appear,
/// and what each receives does not grow with the mesh.
#[tokio::test]
async fn each_of_300_sidecars_is_sent_what_it_needs_not_the_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    let mut admin =
        palisade_proto::v1::admin_client::AdminClient::new(channel(&cp, crate::attack::admin_svid(&cp)).await);
    let (n, services) = (300usize, 60usize);
    let mut tokens = Vec::new();
    for k in 0..services {
        let req =
            palisade_proto::v1::CreateJoinTokenRequest { identity: format!("{TD}s{k}"), ttl_seconds: 600, uses: 10 };
        tokens.push(admin.create_join_token(req).await.unwrap().into_inner().token);
    }
    let received = std::sync::Arc::new(std::sync::Mutex::new(vec![(0usize, 0usize, Vec::<String>::new()); n]));
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (cp_addr, bundle, token, received, permits) =
            (cp.addr.clone(), bundle.clone(), tokens[i % services].clone(), received.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let permit = permits.acquire_owned().await.unwrap();
            let addr = format!("10.2.{}.{}:4143", i / 250, i % 250 + 1);
            let key = WorkloadKey::generate().unwrap();
            let ch = grpc::channel(&cp_addr, &bundle, None).await.unwrap();
            let resp = IdentityClient::new(ch)
                .certify(CertifyRequest {
                    csr_der: key.csr_der(None).unwrap(),
                    attestation: Some(Attestation::JoinToken(token)),
                    inbound_addr: addr.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let chain: Vec<_> = resp.cert_chain_der.into_iter().map(rustls_pki_types::CertificateDer::from).collect();
            let (id, info) = palisade_certs::SvidInfo::parse_svid(&chain[0]).unwrap();
            let svid = Svid { certified: key.certified(chain).unwrap(), info, id };
            let ch = grpc::channel(&cp_addr, &bundle, Some(svid)).await.unwrap();
            let calls = format!("s{}.shop", (i % services + 1) % services);
            let hello = Hello { inbound_addr: addr, want: Some(want(&[&calls], &[])), ..Default::default() };
            let (tx, mut updates) = config::subscribe_with(ch, hello).await;
            drop(permit);
            while let Ok(Some(u)) = updates.message().await {
                {
                    let mut r = received.lock().unwrap();
                    r[i].0 += prost::Message::encoded_len(&u);
                    r[i].1 += 1;
                    r[i].2.extend(names(&u));
                    if let Some(e) = endpoints(&u, &calls) {
                        r[i].2.push(format!("endpoints {}", e.len()));
                    }
                }
                if tx.send(config::ack(u.nonce)).await.is_err() {
                    break;
                }
            }
        }));
    }
    // Every sidecar ends up with its callee's 5 endpoints.
    eventually("every sidecar to hold its callee's 5 endpoints", Duration::from_secs(120), || async {
        let r = received.lock().unwrap();
        r.iter().all(|(_, _, names)| names.last().is_some_and(|l| l == "endpoints 5")).then_some(())
    })
    .await
    .unwrap();
    let r = received.lock().unwrap().clone();
    for (i, (bytes, updates, names)) in r.iter().enumerate() {
        let foreign: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with("service/") && **n != format!("service/s{}.shop", (i % services + 1) % services))
            .collect();
        assert!(foreign.is_empty(), "sidecar {i} was sent services it does not call: {foreign:?}");
        // The bundle, the settings, and its callee's endpoints as each of 5 appeared.
        assert!(*updates <= 7, "sidecar {i}: {updates} updates: {names:?}");
        assert!(*bytes < 8 * 1024, "sidecar {i} was sent {bytes} bytes for 300 sidecars");
    }
    for t in tasks {
        t.abort();
    }
}
