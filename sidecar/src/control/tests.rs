use std::sync::atomic::Ordering;

use super::*;

fn bundle() -> TrustBundle {
    let td = TrustDomain::new("cluster.local").unwrap();
    let ca = palisade_certs::CertificateAuthority::generate(&td, Duration::from_secs(3600)).unwrap();
    TrustBundle::new(ca.trust_bundle()).unwrap()
}

fn control(addrs: &[&str]) -> ControlPlane {
    palisade_certs::install_default_provider();
    let addrs = addrs.iter().map(|a| ControlPlaneAddr::parse(a).unwrap()).collect();
    ControlPlane::new(addrs, TrustDomain::new("cluster.local").unwrap(), bundle(), SvidStore::new()).unwrap()
}

#[test]
fn failover_tries_the_next_replica_and_wraps_around() {
    let cp = control(&["https://10.0.0.1:7700", "https://10.0.0.2:7700", "https://10.0.0.3:7700"]);
    let first = cp.next.load(Ordering::Relaxed);
    assert!(first < 3, "the first replica tried is one of them: {first}");
    let mut seen = vec![first];
    for _ in 0..3 {
        cp.failover();
        seen.push(cp.next.load(Ordering::Relaxed));
    }
    assert_eq!(seen, [first, (first + 1) % 3, (first + 2) % 3, first], "every replica in turn, then the first again");

    let one = control(&["https://10.0.0.1:7700"]);
    one.failover();
    assert_eq!(one.next.load(Ordering::Relaxed), 0, "a single replica stays the one tried");
}

#[tokio::test]
async fn an_ip_is_its_own_replica_and_a_name_is_each_of_its_addresses() {
    let ip = ControlPlaneAddr::parse("https://10.0.0.1:7700").unwrap();
    let same: Vec<String> = resolve(&ip).await.iter().map(ToString::to_string).collect();
    assert_eq!(same, [ip.to_string()]);
    let name = ControlPlaneAddr::parse("https://localhost:7700").unwrap();
    let found = resolve(&name).await;
    assert!(!found.is_empty());
    for a in &found {
        let addr: std::net::IpAddr = a.host.parse().unwrap_or_else(|_| panic!("{a} is not an address"));
        assert!(addr.is_loopback(), "{a}");
        assert_eq!(a.port, 7700);
    }
}

#[tokio::test]
async fn without_a_certificate_there_is_no_stream_channel() {
    let cp = control(&["https://127.0.0.1:1"]);
    assert!(cp.channel().await.unwrap().is_none(), "nothing is dialled before the first certificate");
}

#[tokio::test]
async fn an_unreachable_control_plane_is_an_error_naming_it() {
    let cp = control(&["https://127.0.0.1:1"]);
    let e = cp.anonymous().await.unwrap_err();
    let text = StreamError::from(e).to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

#[test]
fn a_refused_stream_reads_as_its_grpc_status() {
    let e = StreamError::from(tonic::Status::permission_denied("not a workload certificate"));
    assert!(matches!(e, StreamError::Status { code: tonic::Code::PermissionDenied, .. }));
    assert_eq!(e.to_string(), "PermissionDenied: not a workload certificate");
}

#[test]
fn the_first_retry_is_spread_within_its_window() {
    for _ in 0..100 {
        assert!(spread(FIRST_RETRY_SPREAD) < FIRST_RETRY_SPREAD);
    }
}
