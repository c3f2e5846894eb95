//! Fail closed on every listener: connections that never ask for anything
//! (silent, or kept alive with HTTP/2 PINGs), opened from many source
//! addresses at once, cannot lock out what the listener is for. Operators
//! and sidecars still reach the control plane, a peer's mTLS connection
//! still reaches the sidecar, the kubelet's probes and scrapes still answer.
//!
//! Attackers bind 127.0.0.2 and up (distinct sources on loopback); the
//! legitimate clients come from 127.0.0.1. Counts are the listeners' default
//! limits or small flags, so each test runs in seconds.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_certs::TrustDomain;
use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, TrustBundle};
use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::dataplane::{WEB, pair};

/// The attacker's `i`-th source address: 127.0.0.2, 127.0.0.3, ...
fn attacker(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + i)
}

/// A TCP connection to 127.0.0.1:`port` from `src`, if the listener takes it.
async fn connect_from(src: Ipv4Addr, port: u16) -> Option<TcpStream> {
    let sock = TcpSocket::new_v4().ok()?;
    sock.bind(SocketAddr::from((src, 0))).ok()?;
    tokio::time::timeout(Duration::from_secs(2), sock.connect(SocketAddr::from(([127, 0, 0, 1], port))))
        .await
        .ok()?
        .ok()
}

/// `per_source` silent connections from each of `sources` attacker addresses, held.
async fn silent(sources: u8, per_source: usize, port: u16) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..sources {
        for _ in 0..per_source {
            held.extend(connect_from(attacker(i), port).await);
        }
    }
    held
}

/// Whether the peer closed `s` within `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Speaks HTTP/2 on `io` and sends a PING every 200 ms, asking for nothing
/// else, until the server closes the connection; returns how long it stayed open.
async fn ping_until_closed<T>(io: T, opened: Instant) -> Duration
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok((send, mut conn)) = h2::client::handshake(io).await else {
        return opened.elapsed();
    };
    let Some(mut pings) = conn.ping_pong() else {
        return opened.elapsed();
    };
    let driver = tokio::spawn(conn);
    // 60 s at most: far beyond any deadline the server should set.
    for _ in 0..300 {
        if driver.is_finished() || pings.ping(h2::Ping::opaque()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(send);
    driver.abort();
    opened.elapsed()
}

/// A TLS client for the control plane's gRPC port with no client certificate.
fn anonymous_tls(cp: &ControlPlane) -> tokio_rustls::TlsConnector {
    let roots = palisade_certs::ca::parse_pem_certs(&std::fs::read_to_string(cp.bundle()).unwrap()).unwrap();
    let verifier = SpiffeServerVerifier::new(
        TrustBundle::new(&roots).unwrap(),
        PeerIdentity::Exact(TrustDomain::default().control_plane()),
    );
    let mut cfg = palisade_certs::tls::client_config(verifier, None).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One counter of the control plane's `/metrics`.
async fn cp_metric(metrics: &str, series: &str) -> f64 {
    let (_, text) = palisade_tests::http::get(metrics, "/metrics").await.unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// Finding 2: anonymous TLS connections kept alive with HTTP/2 PINGs, from
/// many addresses (each within its per-address share), no longer fill the
/// places operators and sidecars need: they get a small budget of their
/// own and an absolute deadline that PINGs do not extend. Handshakes that
/// stall fill only the handshake budget, and the host itself still gets in.
#[tokio::test]
async fn anonymous_connections_cannot_lock_operators_and_sidecars_out() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &[
            "--max-unauthenticated-connections",
            "64",
            "--max-unauthenticated-connections-per-ip",
            "8",
            "--metrics-listen",
            &metrics,
        ],
    )
    .await
    .unwrap();
    assert!(cp.ctl(&["check"]).status.success());

    // 8 addresses x 8 anonymous connections, each pinging every 200 ms.
    let tls = anonymous_tls(&cp);
    let mut attack = JoinSet::new();
    let opened = Instant::now();
    for i in 0..8 {
        for _ in 0..8 {
            let (tls, port) = (tls.clone(), cp.port);
            attack.spawn(async move {
                let tcp = connect_from(attacker(i), port).await?;
                let name = rustls_pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
                let stream = tls.connect(name, tcp).await.ok()?;
                Some(ping_until_closed(stream, opened).await)
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let check = cp.ctl(&["check"]);
    assert!(check.status.success(), "an operator is locked out: {}", String::from_utf8_lossy(&check.stderr));
    cp.create_token(WEB, &[]).expect("token create works during the attack");
    let sc = Sidecar::meshed("web", &cp, tmp.path(), WEB, &[]).await.expect("a sidecar joins during the attack");
    assert_eq!(sc.config().await.unwrap()["cert_valid"], true);

    // Every anonymous connection is closed by the deadline (10 s from accept
    // by default), however often it pings.
    let mut open_for = Vec::new();
    let all_closed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(r) = attack.join_next().await {
            open_for.extend(r.unwrap());
        }
    })
    .await;
    assert!(all_closed.is_ok(), "pinging anonymous connections were still open 20 s later");
    let longest = open_for.iter().max().copied().unwrap_or_default();
    assert!(longest < Duration::from_secs(13), "an anonymous connection stayed {longest:?}");
    let refused = cp_metric(
        &metrics,
        "palisade_cp_connections_refused_total{listener=\"control-plane-anonymous\",reason=\"per_address\"}",
    )
    .await;
    assert!(refused >= 1.0, "refusals are counted: {refused}");

    // Handshakes that never end fill the handshake budget (64); the host's
    // own address still gets a place, and sidecars keep their connections.
    let stalled = silent(8, 8, cp.port).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let check = cp.ctl(&["check"]);
    assert!(check.status.success(), "the host is locked out: {}", String::from_utf8_lossy(&check.stderr));
    assert_eq!(sc.get("/ready").await.map(|r| r.0), Some(200));
    drop(stalled);
}

/// Finding 3, the control plane: the OAuth token service, the webhook and
/// the metrics listener each keep a place for others when one address (or
/// a few) fills them with connections that say nothing.
#[tokio::test]
async fn control_plane_https_and_metrics_listeners_keep_a_place_for_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (oauth, webhook, metrics) = (free_port(), free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &[
            "--oauth-listen",
            &format!("127.0.0.1:{oauth}"),
            "--webhook-listen",
            &format!("127.0.0.1:{webhook}"),
            "--metrics-listen",
            &metrics_addr,
        ],
    )
    .await
    .unwrap();
    let out = cp.ctl(&["oauth", "client", "create", "--name", "svc", "--scopes", "read", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let basic = format!("{}:{}", client["client_id"].as_str().unwrap(), client["client_secret"].as_str().unwrap());
    let cacert = cp.bundle().to_str().unwrap().to_string();
    let url = format!("https://127.0.0.1:{oauth}/oauth2/token");
    let token = || {
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--cacert", &cacert, "-u", &basic, "-d", "grant_type=client_credentials", &url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(token(), "200");

    // OAuth: 1,100 silent connections from one address (the limit is 1,024).
    let held = silent(1, 1100, oauth).await;
    assert_eq!(token(), "200", "the token service is locked out by one address");
    drop(held);

    // Webhook: 300 from one address (the limit is 256).
    let ca = std::fs::read_to_string(cp.bundle()).unwrap();
    let held = silent(1, 300, webhook).await;
    let (code, body) =
        crate::kube::post(webhook, &ca, crate::kube::review("u1", crate::kube::pod_of_deployment(), true)).await;
    assert_eq!(code, 200, "the webhook is locked out by one address: {body}");
    drop(held);

    // Metrics: 40 silent connections from 5 addresses (the limit is 32).
    let mut held = silent(5, 8, metrics).await;
    let got = palisade_tests::http::get(&metrics_addr, "/metrics").await;
    assert_eq!(got.as_ref().map(|r| r.0).ok(), Some(200), "metrics locked out: {got:?}");
    let text = got.unwrap().1;
    for listener in ["oauth", "webhook", "metrics"] {
        let series = format!("palisade_cp_connections_refused_total{{listener=\"{listener}\",reason=\"per_address\"}}");
        assert!(text.contains(&series), "{series} missing from /metrics");
    }
    // A connection that sends nothing is let go well before the idle timeout (30 s).
    let started = Instant::now();
    assert!(closed(&mut held[0], Duration::from_secs(10)).await, "a silent metrics connection stays open");
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
}

/// Finding 3, the sidecar: h2c connections that only PING, from a few
/// addresses, leave `/live`, `/ready` and `/metrics` answering; a flood of
/// silent connections on the inbound port leaves a place for a real peer's
/// mTLS connection.
#[tokio::test]
async fn sidecar_admin_and_inbound_keep_a_place_for_probes_and_peers() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &["--max-connections", "100"], &[]).await;

    // Admin: 5 addresses x 16 h2c connections that only PING (the limit is 64).
    let admin: SocketAddr = p.server.admin.parse().unwrap();
    let mut pinging = JoinSet::new();
    let opened = Instant::now();
    for i in 0..5 {
        for _ in 0..16 {
            pinging.spawn(async move {
                let tcp = connect_from(attacker(i), admin.port()).await?;
                Some(ping_until_closed(tcp, opened).await)
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(p.server.get(path).await.map(|r| r.0), Some(200), "{path} does not answer");
    }
    pinging.abort_all();

    // Inbound: 150 silent connections from one address (--max-connections 100);
    // the client sidecar has no pooled connection yet, so its request needs a new one.
    let inbound: u16 = p.server.inbound.rsplit(':').next().unwrap().parse().unwrap();
    let held = silent(1, 150, inbound).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = eventually("a request through a new mTLS connection", Duration::from_secs(3), || async {
        let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.ok()?;
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        (out.get(9..12) == Some(b"200")).then_some(())
    })
    .await;
    assert!(status.is_ok(), "a peer's connection is refused while one address holds the inbound port");
    let metrics = p.server.get("/metrics").await.unwrap().1;
    assert!(
        metrics.contains("palisade_connections_refused_total{listener=\"admin\",reason=\"per_address\"}")
            && metrics
                .contains("palisade_connections_refused_total{listener=\"inbound-handshake\",reason=\"per_address\"}"),
        "refusals are counted: {metrics}"
    );
    drop(held);
}

/// Finding 2, from many addresses: stalled TLS handshakes (connections that
/// send nothing), each address within its share, fill the handshake budget;
/// a client on yet another address (not the host, which has a reserve)
/// still completes its handshake, because a full budget takes the oldest
/// handshake back for the newcomer. The same on a sidecar's inbound port.
#[tokio::test]
async fn stalled_handshakes_from_many_addresses_only_push_out_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &["--max-unauthenticated-connections", "32", "--max-unauthenticated-connections-per-ip", "4"],
    )
    .await
    .unwrap();
    let port: u16 = cp.addr.rsplit(':').next().unwrap().parse().unwrap();
    // 12 addresses x 4 stalled handshakes: 48 for 32 places.
    let mut held = silent(12, 4, port).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tls = anonymous_tls(&cp);
    for round in 0..5 {
        let tcp = connect_from(Ipv4Addr::new(127, 0, 0, 200), port).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let done = tokio::time::timeout(Duration::from_secs(3), tls.connect(name, tcp)).await;
        assert!(matches!(done, Ok(Ok(_))), "round {round}: a handshake from another address failed: {done:?}");
        held.extend(silent(12, 1, port).await);
    }
    let mut evicted = 0;
    for s in &mut held {
        evicted += usize::from(closed(s, Duration::from_millis(10)).await);
    }
    assert!(evicted >= 5, "the oldest stalled handshakes were let go ({evicted})");

    // A sidecar's inbound port: a client on another address still gets the
    // server's side of a handshake (its certificate, within seconds).
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &["--max-handshakes", "32", "--max-handshakes-per-ip", "4"], &[]).await;
    let inbound: u16 = p.server.inbound.rsplit(':').next().unwrap().parse().unwrap();
    let _held = silent(12, 4, inbound).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let roots = palisade_certs::ca::parse_pem_certs(&std::fs::read_to_string(p.cp.bundle()).unwrap()).unwrap();
    let verifier =
        SpiffeServerVerifier::new(TrustBundle::new(&roots).unwrap(), PeerIdentity::TrustDomain(TrustDomain::default()));
    let cfg = palisade_certs::tls::client_config(verifier, None).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = connect_from(Ipv4Addr::new(127, 0, 0, 200), inbound).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let done = tokio::time::timeout(Duration::from_secs(3), tls.connect(name, tcp)).await;
    assert!(matches!(done, Ok(Ok(_))), "the inbound port let a handshake from another address through: {done:?}");
}

/// GET `path` on 127.0.0.1:`port` from `src` over plain HTTP/1.1; the status.
async fn get_from(src: Ipv4Addr, port: u16, path: &str) -> Option<u16> {
    let mut s = connect_from(src, port).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    std::str::from_utf8(out.get(9..12)?).ok()?.parse().ok()
}

/// Finding 3, from another host: the kubelet probes a sidecar's admin port
/// and Prometheus scrapes the control plane from their own addresses, not
/// loopback. Silent connections from more addresses than the per-address
/// shares can keep out fill those listeners; a probe from yet another
/// address still gets its answer (the oldest connection is let go for it).
#[tokio::test]
async fn probes_from_another_host_get_through_a_full_listener() {
    let app = HttpApp::start().await;
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let p = pair(app.addr, &["--metrics-listen", &metrics], &[], &[]).await;
    let admin: SocketAddr = p.server.admin.parse().unwrap();
    let probe = Ipv4Addr::new(127, 0, 0, 201);
    // 10 addresses x 8 for the admin port's 64 places; 11 x 4 for the metrics port's 32.
    let _admin_flood = silent(10, 8, admin.port()).await;
    let _metrics_flood = silent(11, 4, metrics_port).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for path in ["/live", "/ready"] {
        assert_eq!(get_from(probe, admin.port(), path).await, Some(200), "{path} from the node's address");
    }
    assert_eq!(get_from(probe, metrics_port, "/metrics").await, Some(200), "a scrape from another host");
    let text = p.server.get("/metrics").await.unwrap().1;
    assert!(text.contains("palisade_connections_refused_total{listener=\"admin\",reason=\"evicted\"}"), "{text}");
}
