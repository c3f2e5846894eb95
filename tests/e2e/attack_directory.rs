//! The attack suite, part two: what a workload's own certificate can do to
//! state every sidecar shares. The directory (finding 4: a renewal naming
//! another workload's address pushed it out; new addresses without end
//! flooded every sidecar) and the record `policy preview` judges (finding 6:
//! a flood of fake samples displaced every real one and grew the control
//! plane). Real processes, real TLS, loopback; every loop bounded in count and time.

use std::time::{Duration, Instant};

use palisade_certs::WorkloadKey;
use palisade_certs::tls::Svid;
use palisade_proto::v1::certify_request::Attestation;
use palisade_proto::v1::identity_client::IdentityClient;
use palisade_proto::v1::{CertifyRequest, CertifyResponse, RecordedRequest, Report};
use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, eventually, free_port, grpc, rss_kb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::dataplane::{ORDERS, WEB, pair};

const EVIL: &str = "spiffe://cluster.local/ns/shop/sa/evil";

/// A channel to `cp`, presenting `client` if given.
async fn channel(cp: &ControlPlane, client: Option<Svid>) -> Channel {
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    grpc::channel(&cp.addr, &bundle, client).await.unwrap()
}

/// One Certify call on `ch`.
async fn certify(
    ch: &Channel,
    attestation: Option<Attestation>,
    inbound_addr: &str,
) -> (Result<CertifyResponse, tonic::Status>, WorkloadKey) {
    let ch = ch.clone();
    let key = WorkloadKey::generate().unwrap();
    let req = CertifyRequest { csr_der: key.csr_der(None).unwrap(), attestation, inbound_addr: inbound_addr.into() };
    (IdentityClient::new(ch).certify(req).await.map(|r| r.into_inner()), key)
}

/// A workload certificate for `identity` from a join token, registering no address.
async fn svid(cp: &ControlPlane, identity: &str) -> Svid {
    let token = cp.create_token(identity, &[]).unwrap();
    let (resp, key) = certify(&channel(cp, None).await, Some(Attestation::JoinToken(token)), "").await;
    let chain: Vec<_> = resp.unwrap().cert_chain_der.into_iter().map(rustls_pki_types::CertificateDer::from).collect();
    let (id, info) = palisade_certs::SvidInfo::parse_svid(&chain[0]).unwrap();
    Svid { certified: key.certified(chain).unwrap(), info, id }
}

fn proxies(cp: &ControlPlane) -> Vec<serde_json::Value> {
    let out = cp.ctl(&["proxies", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// The status of `GET /echo` to orders through the client sidecar's upstream port.
async fn get_orders(port: u16) -> u16 {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return 0 };
    let _ = s.write_all(b"GET /echo HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Finding 4: with web's certificate, a renewal naming orders' address is
/// refused (orders stays listed and reachable); a flood of new addresses
/// adds a handful at most (rate limited per caller); and however it joins,
/// an identity holds at most --max-addresses-per-identity addresses.
#[tokio::test]
async fn a_workload_can_neither_take_nor_flood_the_directory() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    assert_eq!(get_orders(p.port).await, 200);
    let web = channel(&p.cp, Some(svid(&p.cp, WEB).await)).await;

    // A renewal naming orders' address.
    let (r, _) = certify(&web, None, &p.server.inbound).await;
    let Err(err) = r else { panic!("web was handed a certificate registering orders' address") };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(&format!("is held by {ORDERS}")), "{}", err.message());
    let logs = p.cp.proc.logs();
    assert!(logs.lines().any(|l| l.contains("inbound_addr_refused") && l.contains(&p.server.inbound)), "{logs}");
    let listed = proxies(&p.cp);
    assert!(
        listed.iter().any(|x| x["identity"] == ORDERS && x["inbound_addr"] == p.server.inbound.as_str()),
        "orders stays in the directory: {listed:?}"
    );
    // Another spelling of the same address is the same address.
    let port = p.server.inbound.rsplit(':').next().unwrap();
    for spelling in [format!("127.0.0.1:0{port}"), format!("[::ffff:127.0.0.1]:{port}")] {
        let (r, _) = certify(&web, None, &spelling).await;
        assert_eq!(r.map(|_| ()).unwrap_err().code(), Code::PermissionDenied, "{spelling}");
    }
    // Repeated, as the attack did: every call refused, every request answered.
    for _ in 0..10 {
        let (r, _) = certify(&web, None, &p.server.inbound).await;
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(get_orders(p.port).await, 200);
    }

    // A thousand renewals, each naming a new address.
    let started = Instant::now();
    let (mut ok, mut limited) = (0, 0);
    for i in 0..1000u32 {
        let addr = format!("127.0.0.2:{}", 20_000 + i);
        match certify(&web, None, &addr).await.0 {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(e.message().contains("--directory-changes-per-minute"), "{}", e.message());
                limited += 1;
            }
            Err(e) => panic!("unexpected refusal: {e:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    assert!(ok <= 10, "{ok} new addresses accepted in a burst (10 a minute allowed)");
    assert_eq!(ok + limited, 1000);
    let listed = proxies(&p.cp);
    let web_addrs = listed.iter().filter(|x| x["identity"] == WEB && x["inbound_addr"] != "").count();
    assert!(web_addrs <= 11, "{web_addrs} addresses for web (its sidecar's and at most 10 more)");
    assert!(listed.iter().any(|x| x["identity"] == ORDERS && x["inbound_addr"] == p.server.inbound.as_str()));
    for _ in 0..10 {
        assert_eq!(get_orders(p.port).await, 200);
    }

    // Joins (not rate limited: a token's uses are) stop at the per-identity bound.
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--max-addresses-per-identity", "3"])
        .await
        .unwrap();
    let token = cp.create_token(EVIL, &["--uses", "10"]).unwrap();
    let mut codes = Vec::new();
    for i in 0..5 {
        let attestation = Some(Attestation::JoinToken(token.clone()));
        // A join on a connection of its own, as a sidecar makes it.
        let (r, _) = certify(&channel(&cp, None).await, attestation, &format!("127.0.0.3:{}", 30_000 + i)).await;
        codes.push(r.map(|_| Code::Ok).unwrap_or_else(|e| {
            assert!(e.message().contains("--max-addresses-per-identity"), "{}", e.message());
            e.code()
        }));
    }
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::Ok, Code::ResourceExhausted, Code::ResourceExhausted]);
    let tokens: serde_json::Value = serde_json::from_slice(&cp.ctl(&["token", "list", "-o", "json"]).stdout).unwrap();
    assert_eq!(tokens[0]["uses_left"], 7, "refused joins give their use back: {tokens}");
    assert_eq!(proxies(&cp).len(), 3);
}

/// A sample as a sidecar reports it (`to` set: a forged callee).
fn sample(from: &str, to: Option<&str>, path: &str, headers: usize) -> RecordedRequest {
    let mut v = serde_json::json!({"from": from, "method": "GET", "path": path, "port": 80});
    if let Some(to) = to {
        v["to"] = to.into();
    }
    if headers > 0 {
        let h: serde_json::Map<String, serde_json::Value> =
            (0..headers).map(|i| (format!("x-pad-{i}"), "v".repeat(250).into())).collect();
        v["headers"] = h.into();
    }
    RecordedRequest { sample_json: v.to_string(), count: 1 }
}

const CANDIDATE: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-web, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]}]\n---\napiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: marker, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/evil\"]}\n  action: DENY\n  rules: [{to: [{paths: [\"/marker/*\"]}]}]\n";

/// The preview's changes, once the control plane took in everything up to `marker`.
async fn preview_after(cp: &ControlPlane, file: &str, marker: &str) -> Vec<serde_json::Value> {
    eventually(&format!("the control plane to take in the reports up to {marker}"), Duration::from_secs(60), || async {
        let out = cp.ctl(&["policy", "preview", "-f", file, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let changes = v["changes"].as_array()?.clone();
        changes.iter().any(|c| c["path"] == marker).then_some(changes)
    })
    .await
    .unwrap()
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Finding 6: a workload's flood of fake samples (102,400 shapes, some
/// naming orders as callee) leaves the real samples orders' sidecar
/// reported deciding the preview; 24,000 samples of 6 KB leave the record
/// within its memory cap and the control plane within a bounded growth.
#[tokio::test]
async fn a_flood_of_fake_samples_cannot_blind_policy_preview() {
    let app = HttpApp::start().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let p = pair(app.addr, &["--metrics-listen", &metrics], &["--report-interval", "1s"], &[]).await;
    let file = p.tmp.path().join("candidate.yaml");
    std::fs::write(&file, CANDIDATE).unwrap();
    let file = file.to_str().unwrap();
    for _ in 0..5 {
        assert_eq!(get_orders(p.port).await, 200);
    }
    let real = |changes: &[serde_json::Value]| {
        changes
            .iter()
            .find(|c| c["from"] == WEB && c["to"] == ORDERS && c["path"] == "/echo")
            .map(|c| c["count"].clone())
    };
    let changes = eventually("orders' samples to decide the preview", Duration::from_secs(20), || async {
        let out = p.cp.ctl(&["policy", "preview", "-f", file, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let changes = v["changes"].as_array()?.clone();
        real(&changes).is_some().then_some(changes)
    })
    .await
    .unwrap();
    assert_eq!(real(&changes), Some(5.into()), "{changes:?}");

    // evil's certificate, on a config stream of its own.
    let bundle = std::fs::read_to_string(p.cp.bundle()).unwrap();
    let ch = grpc::channel(&p.cp.addr, &bundle, Some(svid(&p.cp, EVIL).await)).await.unwrap();
    let (tx, mut snaps) = palisade_tests::config::subscribe(ch, "127.0.0.1:1").await;
    snaps.message().await.unwrap().unwrap();
    let started = Instant::now();
    for m in 0..100 {
        let recorded = (0..1024)
            .map(|i| {
                // Every fourth names orders as its callee: refused, never counted.
                let to = (i % 4 == 0).then_some(ORDERS);
                sample(WEB, to, &format!("/flood/{m}/{i}"), 0)
            })
            .collect();
        tx.send(palisade_tests::config::report(Report { recorded, ..Default::default() })).await.unwrap();
    }
    tx.send(palisade_tests::config::report(Report {
        recorded: vec![sample(WEB, None, "/marker/1", 0)],
        ..Default::default()
    }))
    .await
    .unwrap();
    let changes = preview_after(&p.cp, file, "/marker/1").await;
    assert_eq!(real(&changes), Some(5.into()), "orders' real samples still decide: {changes:?}");
    assert!(changes.iter().all(|c| c["to"] != ORDERS || c["path"] == "/echo"), "no forged sample counts for orders");
    assert!(started.elapsed() < Duration::from_secs(90));

    // Big samples: 24,000 of 6 KB, 500 a message (under the 4 MiB a message).
    let pid = p.cp.proc.child.id();
    let before = rss_kb(pid);
    for m in 0..48 {
        let recorded = (0..500).map(|i| sample(WEB, None, &format!("/big/{m}/{i}/{}", "p".repeat(1900)), 16)).collect();
        tx.send(palisade_tests::config::report(Report { recorded, ..Default::default() })).await.unwrap();
    }
    let marker = vec![sample(WEB, None, "/marker/2", 0), sample(WEB, Some(ORDERS), "/forged", 0)];
    tx.send(palisade_tests::config::report(Report { recorded: marker, ..Default::default() })).await.unwrap();
    // The forged sample is the 25,601st refused: all reports are in.
    eventually("the big samples to be taken in", Duration::from_secs(60), || async {
        let refused = metric(&reqwest_metrics(&metrics).await, "palisade_cp_preview_samples_refused_total")?;
        (refused >= 25_601.0).then_some(())
    })
    .await
    .unwrap();
    // 144 MB of samples went in; the record holds 32 MiB of them.
    let grown_mb = rss_kb(pid).saturating_sub(before) / 1024;
    assert!(grown_mb < 120, "the control plane grew by {grown_mb} MB");
    let changes = preview_after(&p.cp, file, "/marker/2").await;
    assert_eq!(real(&changes), Some(5.into()), "{changes:?}");
    let body = reqwest_metrics(&metrics).await;
    let bytes = metric(&body, "palisade_cp_preview_sample_bytes").expect("the record's memory is counted");
    assert!(bytes <= 32.0 * 1024.0 * 1024.0, "{bytes} bytes held (cap 32 MiB)");
    let refused = metric(&body, "palisade_cp_preview_samples_refused_total").unwrap_or(0.0);
    assert!(refused >= 25_600.0, "forged callees are refused and counted: {refused}");
    drop(tx);
}

/// GET /metrics from the control plane's metrics listener.
async fn reqwest_metrics(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
