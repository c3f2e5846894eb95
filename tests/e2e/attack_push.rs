//! Attacks on the config stream (`MeshConfig.Subscribe`) by a workload
//! holding its own certificate: subscriptions that would grow the control
//! plane without bound, NACKs that would fill the audit log, another
//! stream's nonces, and a second stream for the same proxy.

use std::time::Duration;

use palisade_proto::v1::config_request::Kind;
use palisade_proto::v1::{ConfigRequest, Hello, Want};
use palisade_tests::{ControlPlane, config, eventually, grpc};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

async fn web_channel(cp: &ControlPlane) -> tonic::transport::Channel {
    let svid = crate::attack::workload_svid(cp, WEB).await;
    grpc::channel(&cp.addr, &std::fs::read_to_string(cp.bundle()).unwrap(), Some(svid)).await.unwrap()
}

fn addresses(stream: usize, n: usize) -> Want {
    Want { services: vec![], addresses: (0..n).map(|i| format!("10.{stream}.{}.{}", i / 250, i % 250 + 1)).collect() }
}

/// Finding F1: many streams of one identity, each asking for the most
/// addresses a stream may hold, stop at the identity's bound (65,536
/// subscriptions); a stream beyond it is answered without them.
#[tokio::test]
async fn attack_push_one_identity_cannot_subscribe_without_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let ch = web_channel(&cp).await;
    let mut granted = Vec::new();
    let mut held = Vec::new();
    for s in 0..18 {
        // Distinct keys (the address is not checked here: loopback), all web's.
        let hello = Hello {
            inbound_addr: format!("127.0.0.1:{}", 1000 + s),
            want: Some(addresses(s, 5000)),
            ..Default::default()
        };
        let (tx, mut updates) = config::subscribe_with(ch.clone(), hello).await;
        let first = tokio::time::timeout(Duration::from_secs(20), updates.message()).await.unwrap().unwrap().unwrap();
        granted.push(first.resources.iter().filter(|r| r.r#type == "address").count());
        held.push((tx, updates));
    }
    assert!(granted.iter().all(|g| *g <= 4095), "a stream holds at most 4,095: {granted:?}");
    let total: usize = granted.iter().sum();
    assert_eq!(total, 65_536, "the identity's bound: {granted:?}");
    assert_eq!(granted[17], 0, "beyond the bound, nothing: {granted:?}");
    assert!(cp.proc.logs().contains("config_subscriptions_full"));
    // Streams closing give their share back.
    held.truncate(10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hello = Hello { inbound_addr: "127.0.0.1:2000".into(), want: Some(addresses(40, 100)), ..Default::default() };
    let (_tx, mut updates) = config::subscribe_with(ch.clone(), hello).await;
    let first = tokio::time::timeout(Duration::from_secs(20), updates.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.resources.iter().filter(|r| r.r#type == "address").count(), 100);
}

/// Findings F2 and F3: a NACK is recorded and audited once, only for the
/// update its stream was sent, with its types and reasons cut; another
/// stream's nonce and a repeat are ignored.
#[tokio::test]
async fn attack_push_nacks_cannot_flood_the_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let ch = web_channel(&cp).await;
    let (tx_a, mut a) = config::subscribe(ch.clone(), "").await;
    let (_tx_b, mut b) = config::subscribe(ch.clone(), "127.0.0.1:9").await;
    let first_a = a.message().await.unwrap().unwrap();
    let first_b = b.message().await.unwrap().unwrap();
    // B's nonce on A's stream: ignored.
    tx_a.send(config::nack(first_b.nonce.clone(), [("policy".into(), "foreign-marker".into())])).await.unwrap();
    // A huge NACK of A's own update, then the same again 50 times.
    // About 3 MB: under the 4 MiB a message may hold.
    let huge: Vec<(String, String)> =
        (0..2000).map(|i| (format!("type-{i:05}-{}", "t".repeat(60)), "r".repeat(1400))).collect();
    for _ in 0..5 {
        tx_a.send(config::nack(first_a.nonce.clone(), huge.clone())).await.unwrap();
    }
    eventually("the NACK in the log", Duration::from_secs(10), || async {
        cp.proc.logs().contains("config_nack").then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = cp.proc.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("config_nack")).collect();
    assert_eq!(lines.len(), 1, "one NACK recorded once: {} lines", lines.len());
    assert!(lines[0].len() < 16 * 1024, "cut: {} bytes", lines[0].len());
    // The first 8 types of 2,000, sorted; the rest only counted.
    assert!(lines[0].contains("type-00007") && !lines[0].contains("type-00008"), "{}", lines[0]);
    assert!(!logs.contains("foreign-marker"), "another stream's nonce is not audited");
}

/// A second stream for the same proxy (identity and inbound address)
/// takes over: the first ends, so one proxy holds one stream.
#[tokio::test]
async fn attack_push_a_second_stream_for_one_proxy_replaces_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let ch = web_channel(&cp).await;
    let (_tx1, mut one) = config::subscribe(ch.clone(), "127.0.0.1:7").await;
    one.message().await.unwrap().unwrap();
    let (tx2, mut two) = config::subscribe(ch.clone(), "127.0.0.1:7").await;
    two.message().await.unwrap().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), one.message()).await.expect("the first stream ends");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    // A Want on the second still works.
    let w = Want { services: vec!["orders.shop".into()], addresses: vec![] };
    tx2.send(ConfigRequest { kind: Some(Kind::Want(w)) }).await.unwrap();
    let u = tokio::time::timeout(Duration::from_secs(10), two.message()).await.unwrap().unwrap().unwrap();
    assert!(u.resources.iter().any(|r| r.name == "orders.shop"), "{u:?}");
    // A malformed inbound address is refused.
    let hello = Hello { inbound_addr: "not-an-addr".into(), ..Default::default() };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ConfigRequest { kind: Some(Kind::Hello(hello)) }).await.unwrap();
    let refused = palisade_proto::v1::mesh_config_client::MeshConfigClient::new(ch.clone())
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match refused {
        Err(e) => assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}"),
        Ok(_) => panic!("a malformed inbound address was accepted"),
    }
}
