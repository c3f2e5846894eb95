//! The attack suite: one test per hole an outside attack found, and per
//! class (protocol-detection downgrade, smuggling on every HTTP/1 path,
//! session resumption, connection floods on every listener, the admin
//! endpoint from a browser, oversized policies, sync-status spoofing, not
//! ready answered as a decision). Real processes, real TLS, loopback only;
//! every loop is bounded in count and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, Svid, SvidStore, TrustBundle};
use palisade_certs::{TrustDomain, WorkloadKey};
use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port, grpc, rss_kb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::dataplane::{ORDERS, WEB, pair};

/// Sends `bytes` (after `delay`), returns what comes back until EOF or 5 s.
async fn send(port: u16, delay: Duration, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::time::sleep(delay).await;
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Applies YAML with palisadectl and waits until `sidecar` runs it.
async fn apply(cp: &ControlPlane, dir: &std::path::Path, sidecar: &Sidecar, yaml: &str) {
    let f = dir.join(format!("p{}.yaml", free_port()));
    std::fs::write(&f, yaml).unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "-o", "json"]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = format!("r{}", v[0]["revision"]);
    eventually("the sidecar runs the new policy", Duration::from_secs(5), || async {
        (sidecar.config().await?["policy_version"] == want.as_str()).then_some(())
    })
    .await
    .unwrap();
}

const DENY_ADMIN: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules:\n    - to: [{paths: [\"/admin/*\"]}]\n    - to: [{methods: [\"GET\"], paths: [\"/private/*\"]}]\n";

/// Finding 1: bytes the client sidecar did not recognise as HTTP (late, lower
/// case, leading CRLF) are still HTTP at the server sidecar: L7 policy,
/// identity header, framing guard and header timeout all apply.
#[tokio::test]
async fn protocol_detection_cannot_be_walked_around() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &["--header-read-timeout", "2s"], &["--protocol-detect-timeout", "200ms"]).await;
    apply(&p.cp, p.tmp.path(), &p.server, DENY_ADMIN).await;
    let late = Duration::from_millis(500);
    let req = b"GET /admin/secret HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&send(p.port, Duration::ZERO, req).await), 403, "baseline");
    assert_eq!(status(&send(p.port, late, req).await), 403, "sent after the client's detection gave up");
    let lower = b"get /admin/secret HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&send(p.port, Duration::ZERO, lower).await), 403, "lower-case method");
    assert_eq!(status(&send(p.port, late, lower).await), 403, "late and lower-case");
    let private = b"get /private/x HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&send(p.port, late, private).await), 403, "a rule for GET also stops get");
    let crlf = b"\r\n\r\nGET /admin/secret HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&send(p.port, Duration::ZERO, crlf).await), 403, "leading empty lines");
    let long = format!("{} /admin/secret HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n", "GET".repeat(40));
    let resp = send(p.port, late, long.as_bytes()).await;
    assert!(resp.is_empty() || status(&resp) == 403, "an over-long method is no way past: {resp:?}");
    assert_eq!(app.requests.load(Ordering::SeqCst), 0, "none reached the app");

    // The identity header cannot be delivered by sending late.
    let spoof = b"GET /echo HTTP/1.1\r\nHost: orders\r\nx-palisade-peer-identity: spiffe://cluster.local/ns/shop/sa/admin\r\nConnection: close\r\n\r\n";
    let resp = send(p.port, late, spoof).await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert!(resp.contains(WEB) && !resp.contains("sa/admin"), "the app sees the verified caller only: {resp}");

    // A slow client holding a partial head is cut off by the server's header timeout.
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    tokio::time::sleep(late).await;
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: orders\r\n").await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "the connection must be closed, not held");
    assert!(started.elapsed() < Duration::from_secs(8), "closed after about the header timeout");
}

/// Finding 1, L4: a DENY rule that names HTTP fields refuses TCP
/// connections; an ALLOW rule that names them does not let them in.
#[tokio::test]
async fn tcp_connections_meet_deny_rules_with_http_fields() {
    let echo = palisade_tests::apps::tcp_echo().await;
    let p = pair(echo, &[], &["--opaque-port", &echo.port().to_string()], &[]).await;
    let tcp = |port: u16| async move {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"\x00\x01binary").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    };
    assert_eq!(tcp(p.port).await, b"echo:\x00\x01binary", "allowed by the mesh default");
    apply(&p.cp, p.tmp.path(), &p.server, DENY_ADMIN).await;
    assert!(tcp(p.port).await.is_empty(), "a DENY rule naming paths refuses a TCP connection");
    let out = p.cp.ctl(&["policy", "delete", "AuthorizationPolicy", "shop/no-admin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    apply(&p.cp, p.tmp.path(), &p.server, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-api, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n      to: [{paths: [\"/api/*\"]}]\n").await;
    assert!(tcp(p.port).await.is_empty(), "an ALLOW rule naming paths never matches a TCP connection");
    apply(&p.cp, p.tmp.path(), &p.server, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-api, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n").await;
    assert_eq!(tcp(p.port).await, b"echo:\x00\x01binary");
}

/// Finding 7: the smuggling corpus on every HTTP/1 path (the app's side of
/// the client sidecar, PERMISSIVE plaintext at the server sidecar, and bytes
/// the client carried as opaque TCP): 400 and close, nothing after reaches the app.
#[tokio::test]
async fn smuggling_corpus_is_refused_on_every_http1_path() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &["--mtls-mode", "permissive"], &["--protocol-detect-timeout", "100ms"]).await;
    apply(&p.cp, p.tmp.path(), &p.server, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n  action: ALLOW\n  rules:\n    - from: [{unauthenticated: true}]\n    - from: [{namespaces: [\"*\"]}]\n").await;
    let inbound: u16 = p.server.inbound.rsplit(':').next().unwrap().parse().unwrap();
    let corpus: &[(&str, &str)] = &[
        (
            "CL+TE",
            "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "TE+CL",
            "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        ),
        ("two CL", "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"),
        ("TE not chunked", "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        (
            "chunk size overflow",
            "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        ),
        ("bad chunk size", "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"),
        (
            "lone Upgrade",
            "GET /hello HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nPOST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("CONNECT", "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n"),
        ("bare LF", "GET /hello HTTP/1.1\nHost: x\n\n"),
        ("two Host", "GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("no Host", "GET /hello HTTP/1.1\r\n\r\n"),
        ("space before colon", "GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\n"),
        ("obs-fold", "GET /hello HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n"),
    ];
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for (path, port, delay) in [
        ("outbound", p.port, Duration::ZERO),
        ("carried as TCP", p.port, Duration::from_millis(300)),
        ("inbound plaintext", inbound, Duration::ZERO),
    ] {
        for (name, bad) in corpus {
            let before = app.requests.load(Ordering::SeqCst);
            let input = format!("GET /hello HTTP/1.1\r\nHost: x\r\n\r\n{bad}{smuggled}");
            let resp = send(port, delay, input.as_bytes()).await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{path}/{name}: the good request first: {resp:?}");
            assert!(resp.contains("HTTP/1.1 400"), "{path}/{name}: refused with 400: {resp:?}");
            let reached = app.requests.load(Ordering::SeqCst) - before;
            // A lone Upgrade header is no upgrade: that request is legitimate.
            let legitimate = if *name == "lone Upgrade" { 2 } else { 1 };
            assert_eq!(reached, legitimate, "{path}/{name}: only the good requests reach the app");
        }
    }
}

/// Reads the admin credential as a client certificate resolver.
pub(crate) fn admin_svid(cp: &ControlPlane) -> Svid {
    palisade_tests::inproc::admin_svid(&cp.admin_dir()).unwrap()
}

/// One TLS connection with `cfg`; returns how the handshake went.
async fn handshake(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Option<rustls::HandshakeKind> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    let kind = tls.get_ref().1.handshake_kind();
    // Read briefly so any session ticket the server sends is taken in.
    let mut b = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_millis(300), tls.read(&mut b)).await;
    kind
}

/// Finding 2: servers that authenticate clients never resume a session, so
/// a certificate is checked, for validity too, on every connection.
#[tokio::test]
async fn client_authenticated_servers_never_resume_sessions() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let bundle = std::fs::read_to_string(p.cp.bundle()).unwrap();
    let roots = palisade_certs::ca::parse_pem_certs(&bundle).unwrap();
    let store = SvidStore::new();
    store.set(admin_svid(&p.cp));
    for (what, addr, expect) in [
        ("control plane", format!("127.0.0.1:{}", p.cp.port), TrustDomain::default().control_plane()),
        ("sidecar inbound", p.server.inbound.clone(), ORDERS.parse().unwrap()),
    ] {
        let verifier = SpiffeServerVerifier::new(TrustBundle::new(&roots).unwrap(), PeerIdentity::Exact(expect));
        let mut cfg = palisade_certs::tls::client_config(verifier, Some(Arc::new(store.clone()))).unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        let addr: SocketAddr = addr.parse().unwrap();
        for i in 0..3 {
            let kind = handshake(addr, cfg.clone()).await;
            assert_eq!(kind, Some(rustls::HandshakeKind::Full), "{what}: connection {i} must be a full handshake");
        }
    }
}

/// Open descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Opens `n` TCP connections to `port` from the loopback address `src`, and holds them.
async fn flood(src: &str, port: u16, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), sock.connect(([127, 0, 0, 1], port).into())).await
        {
            held.push(s);
        }
    }
    held
}

/// Whether the peer closed `s` within `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 16];
    matches!(tokio::time::timeout(within, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
}

/// Finding 3: anonymous connection floods fill only the anonymous budget
/// (per source address too) and are cut at the handshake timeout; operators
/// and sidecars keep working, and descriptors stay bounded.
#[tokio::test]
async fn control_plane_connection_floods_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &[
            "--max-unauthenticated-connections",
            "64",
            "--max-unauthenticated-connections-per-ip",
            "16",
            "--handshake-timeout",
            "2s",
        ],
    )
    .await
    .unwrap();
    let pid = cp.proc.child.id();
    let baseline = fds(pid);
    let mut held = flood("127.0.0.2", cp.port, 300).await;
    held.extend(flood("127.0.0.3", cp.port, 100).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = fds(pid);
    assert!(during <= baseline + 32 + 8, "descriptors bounded by the per-address limit: {baseline} -> {during}");
    let out = cp.ctl(&["check"]);
    assert!(out.status.success(), "operators are not locked out: {}", String::from_utf8_lossy(&out.stderr));
    let sc = Sidecar::meshed("web", &cp, tmp.path(), WEB, &[]).await.unwrap();
    assert!(sc.config().await.unwrap()["cert_valid"].as_bool().unwrap(), "sidecars still join");
    // Connections that never handshake are closed at the handshake timeout.
    let mut cut = 0;
    for s in held.iter_mut().take(40) {
        if closed(s, Duration::from_secs(5)).await {
            cut += 1;
        }
    }
    assert_eq!(cut, 40, "every held connection is closed (beyond the limit at once, the rest at the timeout)");
    drop(held);
    eventually("descriptors back near the baseline", Duration::from_secs(10), || async {
        (fds(pid) <= baseline + 8).then_some(())
    })
    .await
    .unwrap();
}

/// Finding 4: the admin endpoint: a connection limit (per address too),
/// state-changing endpoints from inside the pod only and never from a browser.
#[tokio::test]
async fn sidecar_admin_refuses_browsers_and_survives_floods() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let admin: SocketAddr = p.server.admin.parse().unwrap();
    let ask = |req: String| async move { send(admin.port(), Duration::ZERO, req.as_bytes()).await };
    let post =
        ask("POST /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into())
            .await;
    assert_eq!(status(&post), 405, "a browser can send POST cross-origin: {post}");
    let origin = ask("PUT /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()).await;
    assert_eq!(status(&origin), 403, "{origin}");
    let rebound =
        ask("PUT /shutdown HTTP/1.1\r\nHost: evil.example:4191\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .into())
        .await;
    assert_eq!(status(&rebound), 403, "DNS rebinding: {rebound}");
    let config = ask("GET /config HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".into()).await;
    assert_eq!(status(&config), 403, "{config}");
    assert_eq!(p.server.get("/ready").await.unwrap().0, 200, "still serving");

    // A flood from one address takes only its share; probes and traffic go on.
    let pid = p.server.proc.child.id();
    let baseline = fds(pid);
    let held = flood("127.0.0.2", admin.port(), 300).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fds(pid) <= baseline + 16 + 8, "descriptors bounded: {baseline} -> {}", fds(pid));
    assert_eq!(p.server.get("/ready").await.unwrap().0, 200, "the kubelet's probe still answers");
    let resp = send(p.port, Duration::ZERO, b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&resp), 200, "the data path is not starved: {resp}");
    drop(held);

    let put =
        ask("PUT /shutdown HTTP/1.1\r\nHost: 127.0.0.1:4191\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into())
            .await;
    assert_eq!(status(&put), 200, "{put}");
    let mut server = p.server;
    let code = server.proc.wait_exit(Duration::from_secs(35)).unwrap();
    assert!(code.success(), "drains and exits 0");
}

/// A policy of about `bytes` bytes allowing many callers.
fn big_policy(name: &str, bytes: usize) -> String {
    let n = bytes / 60;
    let ids: Vec<String> = (0..n).map(|i| format!("\"spiffe://cluster.local/ns/tenant-{i:07}/sa/caller\"")).collect();
    format!(
        "{{\"apiVersion\":\"palisade.dev/v1\",\"kind\":\"AuthorizationPolicy\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"shop\"}},\"spec\":{{\"target\":{{\"identities\":[\"{ORDERS}\"]}},\"action\":\"ALLOW\",\"rules\":[{{\"from\":[{{\"identities\":[{}]}}]}}]}}}}",
        ids.join(",")
    )
}

/// Finding 5: what would push a sidecar's snapshot over its message limit is
/// refused at apply, naming the size and the limit; validate takes what
/// apply takes; the sidecar keeps in sync.
#[tokio::test]
async fn oversized_policies_are_refused_before_any_sidecar_chokes() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let first = p.tmp.path().join("big1.json");
    std::fs::write(&first, big_policy("big1", 3 << 20)).unwrap();
    let out = p.cp.ctl(&["policy", "validate", "-f", first.to_str().unwrap()]);
    assert!(out.status.success(), "validate takes a 3 MB policy: {}", String::from_utf8_lossy(&out.stderr));
    let out = p.cp.ctl(&["policy", "apply", "-f", first.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("the sidecar runs the 3 MB policy", Duration::from_secs(10), || async {
        (p.server.config().await?["policy_version"] == "r1").then_some(())
    })
    .await
    .unwrap();
    let second = p.tmp.path().join("big2.json");
    std::fs::write(&second, big_policy("big2", 3 << 20)).unwrap();
    for cmd in ["validate", "apply"] {
        let out = p.cp.ctl(&["policy", cmd, "-f", second.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}: refused");
        assert!(err.contains("limit is 4194304 bytes") && err.contains("would total"), "{cmd}: {err}");
    }
    let huge = p.tmp.path().join("huge.json");
    std::fs::write(&huge, big_policy("huge", 5 << 20)).unwrap();
    let out = p.cp.ctl(&["policy", "apply", "-f", huge.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("largest accepted"), "{err}");
    // Deleting still reaches the sidecar at once: its stream is healthy.
    let out = p.cp.ctl(&["policy", "delete", "AuthorizationPolicy", "shop/big1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("the deletion reaches the sidecar", Duration::from_secs(5), || async {
        (p.server.config().await?["policy_version"] == "r2").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(p.server.metric("palisade_policy_nacks_total").await, Some(0.0));
}

/// A workload certificate (and its key) for `identity`, from a join token.
pub(crate) async fn workload_svid(cp: &ControlPlane, identity: &str) -> Svid {
    use palisade_proto::v1::CertifyRequest;
    use palisade_proto::v1::certify_request::Attestation;
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    let token = cp.create_token(identity, &[]).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let ch = grpc::channel(&cp.addr, &bundle, None).await.unwrap();
    let resp = palisade_proto::v1::identity_client::IdentityClient::new(ch)
        .certify(CertifyRequest {
            csr_der: key.csr_der(None).unwrap(),
            attestation: Some(Attestation::JoinToken(token)),
            inbound_addr: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let chain: Vec<_> = resp.cert_chain_der.into_iter().map(rustls_pki_types::CertificateDer::from).collect();
    let (id, info) = palisade_certs::SvidInfo::parse_svid(&chain[0]).unwrap();
    Svid { certified: key.certified(chain).unwrap(), info, id }
}

fn proxies(cp: &ControlPlane) -> serde_json::Value {
    let out = cp.ctl(&["proxies", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn orders_state(cp: &ControlPlane) -> String {
    let v = proxies(cp);
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["identity"] == ORDERS)
        .map(|p| p["sync_state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// Finding 6: a workload's certificate can only change its own sync state.
#[tokio::test]
async fn a_workload_cannot_rewrite_another_proxys_sync_state() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    eventually("orders is synced", Duration::from_secs(5), || async {
        (orders_state(&p.cp) == "synced").then_some(())
    })
    .await
    .unwrap();
    let web = workload_svid(&p.cp, WEB).await;
    let bundle = std::fs::read_to_string(p.cp.bundle()).unwrap();
    let ch = grpc::channel(&p.cp.addr, &bundle, Some(web)).await.unwrap();
    // Claim orders' inbound address, then NACK.
    let (tx, mut snaps) = palisade_tests::config::subscribe(ch, &p.server.inbound).await;
    let first = snaps.message().await.unwrap().unwrap();
    tx.send(palisade_tests::config::nack(first.nonce, [("policy".into(), "spoofed".into())])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(orders_state(&p.cp), "synced", "{}", proxies(&p.cp));
    drop(tx);
    drop(snaps);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(orders_state(&p.cp), "synced", "closing the spoofing stream does not disconnect orders");
}

/// Finding 9: before a first policy, the answer is 503 with Retry-After
/// (not ready), never a 403 policy decision.
#[tokio::test]
async fn not_ready_is_503_with_retry_after_not_a_decision() {
    let app = HttpApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, cp.create_token(ORDERS, &[]).unwrap()).unwrap();
    // The sidecar's control plane is unreachable: no certificate, no policy.
    let mut cmd = std::process::Command::new(palisade_tests::bin("palisade-sidecar"));
    let inbound = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    cmd.args(["--control-plane", &format!("https://127.0.0.1:{}", free_port())])
        .arg("--ca-bundle")
        .arg(cp.bundle())
        .arg("--join-token-file")
        .arg(&token)
        .args(["--inbound", &inbound, "--admin", &admin, "--app", &app.addr.to_string(), "--mtls-mode", "permissive"]);
    let _sc = palisade_tests::Proc::spawn("lonely", &mut cmd, tmp.path()).unwrap();
    let port: u16 = inbound.rsplit(':').next().unwrap().parse().unwrap();
    eventually("the inbound listener is bound", Duration::from_secs(10), || async {
        TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
    })
    .await
    .unwrap();
    let resp = eventually("the inbound listener answers", Duration::from_secs(10), || async {
        let r = send(port, Duration::ZERO, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        (!r.is_empty()).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(status(&resp), 503, "{resp}");
    assert!(resp.to_ascii_lowercase().contains("retry-after: 1"), "{resp}");
    let grpc = send(port, Duration::ZERO, b"POST /pkg.Svc/M HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert!(grpc.contains("grpc-status: 14"), "gRPC callers get UNAVAILABLE: {grpc}");
    assert_eq!(app.requests.load(Ordering::SeqCst), 0);
}

/// A TCP forwarder standing in for the network between two sidecars: it can
/// silently drop every byte of the connections open so far (as when NAT
/// state is lost), while new connections get through.
struct Network {
    addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicUsize>,
}

impl Network {
    async fn start(to: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let generation = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((a, _)) = listener.accept().await else { return };
                let Ok(b) = TcpStream::connect(to).await else { continue };
                let born = generation.load(Ordering::SeqCst);
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                for (mut r, mut w) in [(ar, bw), (br, aw)].map(|(r, w)| {
                    (
                        Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    )
                }) {
                    let generation = generation.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = r.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            // After a cut, this connection's bytes go nowhere.
                            if generation.load(Ordering::SeqCst) == born && w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        // Keep a cut connection open: nothing tells either side.
                        if generation.load(Ordering::SeqCst) != born {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                    });
                }
            }
        });
        Self { addr, cut }
    }

    fn cut_open_connections(&self) {
        self.cut.fetch_add(1, Ordering::SeqCst);
    }
}

/// Finding 11: a pooled sidecar-to-sidecar connection that died quietly is
/// found by its pings, and a request caught on it is retried on a new one:
/// no failure the caller could not have avoided.
#[tokio::test]
async fn a_dead_pooled_connection_is_replaced_without_failing_requests() {
    let app = HttpApp::start().await;
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let net = Network::start(inbound).await;
    let (inbound_s, advertise) = (inbound.to_string(), net.addr.to_string());
    let p =
        pair(app.addr, &[], &["--inbound", &inbound_s, "--advertise", &advertise], &["--peer-keepalive", "1s"]).await;
    let get = b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    for _ in 0..5 {
        assert_eq!(status(&send(p.port, Duration::ZERO, get).await), 200);
    }
    // The pooled connection dies silently; the next request is caught on it.
    net.cut_open_connections();
    let started = Instant::now();
    let resp = send(p.port, Duration::ZERO, get).await;
    assert_eq!(status(&resp), 200, "retried on a new connection: {resp}\n{}", p.client.proc.logs());
    assert!(started.elapsed() < Duration::from_secs(5), "found dead by its pings, not by a 30 s timeout");
    // Again while idle: the ping finds it before any request does.
    net.cut_open_connections();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut ok, mut failed) = (0, Vec::new());
    for _ in 0..50 {
        let r = send(p.port, Duration::ZERO, get).await;
        if status(&r) == 200 { ok += 1 } else { failed.push(r) }
    }
    assert_eq!(ok, 50, "{failed:?}");
}

/// Finding 8: an idle connection costs little before it sends a byte, and
/// the memory a flood took goes back to the system once it ends.
#[tokio::test]
async fn memory_taken_by_a_connection_flood_comes_back() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let (server, client) = (p.server.proc.child.id(), p.client.proc.child.id());
    let inbound: u16 = p.server.inbound.rsplit(':').next().unwrap().parse().unwrap();
    let idle = rss_kb(server);
    let silent = flood("127.0.0.2", inbound, 2000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_conn = rss_kb(server).saturating_sub(idle) / silent.len().max(1) as u64;
    assert!(silent.len() >= 1900 && per_conn <= 6, "{} silent connections cost {per_conn} KiB each", silent.len());
    drop(silent);

    // Connections that start a request and stall hold more; it is returned.
    let before = rss_kb(client);
    let mut stalled = flood("127.0.0.3", p.port, 2000).await;
    for s in &mut stalled {
        let _ = s.write_all(b"GET /hello HTTP/1.1\r\n").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = rss_kb(client);
    assert!(peak > before + 10_000, "the flood took memory: {before} -> {peak} KiB");
    drop(stalled);
    eventually("memory back near idle", Duration::from_secs(40), || async {
        (rss_kb(client) <= before + 8_000).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {before} -> {peak} -> {} KiB", rss_kb(client)));
}

/// Connection floods on the data and webhook listeners: bounded by their
/// limits, and service resumes once the flood ends.
#[tokio::test]
async fn data_and_webhook_listeners_bound_connection_floods() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &["--max-connections", "100"], &[]).await;
    let get = b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&send(p.port, Duration::ZERO, get).await), 200);
    let pid = p.server.proc.child.id();
    let inbound: u16 = p.server.inbound.rsplit(':').next().unwrap().parse().unwrap();
    let baseline = fds(pid);
    let held = flood("127.0.0.2", inbound, 300).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fds(pid) <= baseline + 100 + 8, "inbound bounded by --max-connections: {baseline} -> {}", fds(pid));
    assert_eq!(status(&send(p.port, Duration::ZERO, get).await), 200, "the pooled connection keeps serving");
    drop(held);
    eventually("service after the flood", Duration::from_secs(15), || async {
        (fds(pid) <= baseline + 8).then_some(())
    })
    .await
    .unwrap();

    // The webhook: 256 connections at most, then it serves again.
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &["--webhook-listen", &format!("127.0.0.1:{port}"), "--handshake-timeout", "2s"],
    )
    .await
    .unwrap();
    let ca = std::fs::read_to_string(cp.bundle()).unwrap();
    let cpid = cp.proc.child.id();
    let baseline = fds(cpid);
    let held = flood("127.0.0.2", port, 400).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fds(cpid) <= baseline + 256 + 8, "webhook bounded: {baseline} -> {}", fds(cpid));
    drop(held);
    let (code, body) =
        crate::kube::post(port, &ca, crate::kube::review("u1", crate::kube::pod_of_deployment(), true)).await;
    assert_eq!(code, 200, "{body}");
}

/// HTTP/2 rapid reset (CVE-2023-44487) on the app's side of a sidecar: the
/// sidecar cuts the connection or absorbs it, and keeps serving.
#[tokio::test]
async fn http2_rapid_reset_is_absorbed() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let pid = p.client.proc.child.id();
    let tcp = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let started = Instant::now();
    let mut sent = 0;
    while sent < 20_000 && started.elapsed() < Duration::from_secs(20) {
        let Ok(ready) = tokio::time::timeout(Duration::from_secs(2), client.clone().ready()).await else { break };
        let Ok(c) = ready else { break };
        client = c;
        let req = http::Request::get("http://orders/slow?ms=1000").body(()).unwrap();
        let Ok((_resp, mut stream)) = client.send_request(req, true) else { break };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(rss_kb(pid) < 200_000, "memory bounded after {sent} resets: {} KiB", rss_kb(pid));
    assert_eq!(p.client.get("/live").await.unwrap().0, 200);
    let get = b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&send(p.port, Duration::ZERO, get).await), 200, "still serving after {sent} resets");
    assert!(app.requests.load(Ordering::SeqCst) < 20_000, "not every reset stream became app work");
}

/// The CA key's mode decision: a key others can read, a group can write, or
/// a group the control plane is not in can read stops it at start (it never
/// serves); group read for its own group (a Kubernetes fsGroup mount) starts.
#[tokio::test]
async fn a_ca_key_readable_by_anyone_else_stops_the_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    drop(ControlPlane::start(&data, tmp.path(), &[]).await.unwrap());
    let key = data.join("ca/ca-key.pem");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let own_gid = std::fs::metadata(&key).unwrap().gid();
    let is_root = palisade_tests::missing_root_and_tools(&[]).is_none();
    let mut cases = vec![(0o444, own_gid), (0o604, own_gid), (0o460, own_gid), (0o640 | 0o002, own_gid)];
    if is_root {
        cases.push((0o440, 54_321)); // a group the control plane does not hold
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root, where a foreign group can be set");
    }
    for (mode, gid) in cases {
        if gid != own_gid {
            std::os::unix::fs::chown(&key, None, Some(gid)).unwrap();
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut child = std::process::Command::new(palisade_tests::bin("palisade-control-plane"))
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mode {mode:o} group {gid}: the control plane started");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "mode {mode:o} group {gid}");
        assert!(err.contains(&format!("has mode {:o}", mode & 0o777)), "mode {mode:o} group {gid}: {err}");
        assert!(!err.contains("BEGIN"), "no key material in the error");
        std::os::unix::fs::chown(&key, None, Some(own_gid)).unwrap();
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
    let cp = ControlPlane::start(&data, tmp.path(), &[]).await.expect("group read for its own group starts");
    drop(cp);
}

/// `palisadectl check --kubernetes` reads what kubectl (or a file) gives it:
/// garbage, the wrong shape, or a huge hostile document is a failed check
/// with a clear message, never a panic.
#[test]
fn check_kubernetes_survives_garbage_cluster_state() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = palisade_tests::bin("palisadectl");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let odd_items = r#"{"kind":"List","items":[{"kind":"Deployment","metadata":{"name":"palisade-control-plane","namespace":"palisade-system"},"status":{"availableReplicas":"x"}},{"kind":"Pod","metadata":{"annotations":{"palisade.dev/injected":"true"}},"spec":{"initContainers":"no"}},{"kind":"MutatingWebhookConfiguration","metadata":{"name":"palisade-x"},"webhooks":[{"clientConfig":{"caBundle":"%%%not base64"}}]}]}"#;
    for (name, body) in
        [("garbage", "not json at all"), ("deep", deep.as_str()), ("wrong", "[1,2,3]"), ("odd", odd_items)]
    {
        let f = tmp.path().join(name);
        std::fs::write(&f, body).unwrap();
        let out = std::process::Command::new(&ctl)
            .args([
                "check",
                "-o",
                "json",
                "--control-plane",
                "https://127.0.0.1:9",
                "--kubernetes",
                "--kubernetes-state",
            ])
            .arg(&f)
            .env_remove("PALISADE_CREDENTIALS")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{name}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["ok"], false, "{name}");
    }
}

/// The OAuth token endpoint, attacked: malformed and oversized requests get
/// a precise OAuth error and nothing more, guessing secrets locks the client
/// and then the address out, and a connection flood is bounded.
#[tokio::test]
async fn the_token_endpoint_refuses_malformed_requests_guessing_and_floods() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &["--oauth-listen", &format!("127.0.0.1:{port}"), "--handshake-timeout", "2s"],
    )
    .await
    .unwrap();
    let out = cp.ctl(&["oauth", "client", "create", "--name", "svc", "--scopes", "read", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, secret) = (client["client_id"].as_str().unwrap(), client["client_secret"].as_str().unwrap());
    let cacert = cp.bundle().to_str().unwrap().to_string();
    let url = format!("https://127.0.0.1:{port}/oauth2/token");
    let curl = |args: &[&str]| -> (u16, String, String) {
        let mut all = vec!["-s", "--http1.1", "-D", "-", "-o", "-", "--cacert", cacert.as_str()];
        all.extend_from_slice(args);
        let out = std::process::Command::new("curl").args(&all).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let code = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (code, head.to_ascii_lowercase(), body.to_string())
    };
    let basic = format!("{id}:{secret}");
    let post_secret = format!("client_secret={secret}");
    let big = format!("grant_type=client_credentials&pad={}", "x".repeat(20_000));
    let many: String = (0..40).map(|i| format!("p{i}=1&")).collect::<String>() + "grant_type=client_credentials";
    let cases: Vec<(Vec<&str>, u16, &str)> = vec![
        (vec!["-u", &basic, "--data-binary", &big, &url], 400, "invalid_request"),
        (vec!["-u", &basic, "-d", &many, &url], 400, "invalid_request"),
        (
            vec!["-u", &basic, "-d", "grant_type=client_credentials&grant_type=client_credentials", &url],
            400,
            "invalid_request",
        ),
        (
            vec!["-u", &basic, "-H", "content-type: text/plain", "-d", "grant_type=client_credentials", &url],
            400,
            "invalid_request",
        ),
        (vec!["-u", &basic, "-d", "grant_type=client_credentials", "-d", &post_secret, &url], 400, "invalid_request"),
        (vec!["-H", "authorization: Basic !!!", "-d", "grant_type=client_credentials", &url], 401, "invalid_client"),
        (vec!["-H", "authorization: Bearer x", "-d", "grant_type=client_credentials", &url], 401, "invalid_client"),
        (vec!["-u", &basic, "-d", "grant_type=client_credentials&client_id=someone-else", &url], 401, "invalid_client"),
        (vec!["-u", &basic, "-d", "scope=read", &url], 400, "invalid_request"),
        (vec!["-u", &basic, "-d", "grant_type=client_credentials&audience=payments", &url], 400, "invalid_target"),
    ];
    for (i, (args, code, error)) in cases.iter().enumerate() {
        let (c, _, body) = curl(args);
        assert_eq!(c, *code, "case {i}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(v["error"], *error, "case {i}: {body}");
        assert!(!body.contains(secret), "the secret is never echoed");
    }
    let (c, head, _) = curl(&[&url]);
    assert_eq!(c, 405);
    assert!(head.contains("allow: post"), "{head}");
    assert_eq!(curl(&[&format!("https://127.0.0.1:{port}/admin")]).0, 404);
    assert_eq!(curl(&["-u", &basic, "-d", "grant_type=client_credentials", &url]).0, 200, "still serves");

    // A connection flood (more than the listener's 1024) is bounded, and it serves again after.
    let pid = cp.proc.child.id();
    let baseline = fds(pid);
    let held = flood("127.0.0.2", port, 1100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fds(pid) <= baseline + 1024 + 8, "token listener bounded: {baseline} -> {}", fds(pid));
    drop(held);
    eventually("the token endpoint after the flood", Duration::from_secs(15), || async {
        (curl(&["-u", &basic, "-d", "grant_type=client_credentials", &url]).0 == 200).then_some(())
    })
    .await
    .unwrap();

    // Guessing: 5 wrong secrets lock the client out (429, even with the right secret);
    // guessing across many client ids locks the address out.
    for _ in 0..5 {
        assert_eq!(curl(&["-u", &format!("{id}:guess"), "-d", "grant_type=client_credentials", &url]).0, 401);
    }
    let (c, head, _) = curl(&["-u", &basic, "-d", "grant_type=client_credentials", &url]);
    assert_eq!(c, 429);
    assert!(head.contains("retry-after:"), "{head}");
    for i in 0..20 {
        let guess = format!("pc_guess{i}:guess");
        let c = curl(&["-u", &guess, "-d", "grant_type=client_credentials", &url]).0;
        assert!(c == 401 || c == 429, "{c}");
    }
    assert_eq!(curl(&["-u", "pc_other:x", "-d", "grant_type=client_credentials", &url]).0, 429, "address locked out");
    assert!(!cp.proc.logs().contains(secret), "the secret never reaches the log");
}

/// Garbage and forged credentials at a sidecar are cheap refusals: each is a
/// 401 (never cached, never a crash), and the sidecar keeps serving.
#[tokio::test]
async fn floods_of_garbage_credentials_are_refused_and_the_sidecar_keeps_serving() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let policy = format!(
        "apiVersion: palisade.dev/v1\nkind: AuthenticationPolicy\nmetadata: {{name: keys, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  apiKeys: {{}}\n  jwt: [{{issuer: https://idp, audiences: [a], jwks: {{keys: [{{kty: OKP, crv: Ed25519, kid: k, x: 11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo}}]}}}}]\n---\napiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: any, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  action: ALLOW\n  rules: [{{}}]\n"
    );
    apply(&p.cp, p.tmp.path(), &p.server, &policy).await;
    let out = p.cp.ctl(&["apikey", "create", "--name", "good", "--principal", "p", "-o", "json"]);
    let key = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["key"].as_str().unwrap().to_string();
    let good = format!("GET /hello HTTP/1.1\r\nHost: orders\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n");
    eventually("the key reaches the sidecar", Duration::from_secs(5), || async {
        (status(&send(p.port, Duration::ZERO, good.as_bytes()).await) == 200).then_some(())
    })
    .await
    .unwrap();
    let pid = p.server.proc.child.id();
    let before = rss_kb(pid);
    let started = Instant::now();
    let mut n = 0;
    while n < 400 && started.elapsed() < Duration::from_secs(30) {
        let garbage = match n % 4 {
            0 => format!(
                "authorization: Bearer eyJhbGciOiJFZERTQSIsImtpZCI6ImsifQ.eyJpc3MiOiJodHRwczovL2lkcCJ9.{n:0>86}"
            ),
            1 => format!("authorization: Bearer {}", "A".repeat(7000 + n)),
            2 => format!("x-api-key: pal_{n}"),
            _ => format!("authorization: Bearer {n}.{n}.{n}\r\nauthorization: Bearer x.y.z"),
        };
        let req = format!("GET /hello HTTP/1.1\r\nHost: orders\r\n{garbage}\r\nConnection: close\r\n\r\n");
        assert_eq!(status(&send(p.port, Duration::ZERO, req.as_bytes()).await), 401, "{garbage}");
        n += 1;
    }
    assert_eq!(status(&send(p.port, Duration::ZERO, good.as_bytes()).await), 200);
    let after = rss_kb(pid);
    assert!(after < before + 8 * 1024, "RSS grew from {before} kB to {after} kB on refused credentials");
}

/// A DENY on `/admin/*` cannot be walked around by spelling the path
/// another way: every encoding, dot segment and doubled slash is decided on
/// the normalised path (and the app receives that path), and disguised
/// separators, encoded controls and overlong UTF-8 are refused outright.
#[tokio::test]
async fn no_path_encoding_walks_around_a_deny() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    apply(&p.cp, p.tmp.path(), &p.server, DENY_ADMIN).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n");
    let cases = [
        ("/admin/x", 403),
        ("/%61dmin/x", 403),
        ("/adm%69n/x", 403),
        ("/%41dmin/x", 404), // `A`: paths are case-sensitive, /Admin is another resource
        ("/x/../admin/x", 403),
        ("/x/%2e%2e/admin/x", 403),
        ("/x/%2E%2E/admin/x", 403),
        ("/x/.%2e/admin/x", 403),
        ("//admin/x", 403),
        ("/./admin/./x", 403),
        ("/../../admin/x", 403),
        ("/admin%2fx", 400),
        ("/admin%2Fx", 400),
        ("/admin%5cx", 400),
        ("/%c0%ae%c0%ae/admin/x", 400),
        ("/%e0%80%afadmin/x", 400),
        ("/admin%00/x", 400),
        ("/admin%", 400),
        ("/private/../admin/y", 403),
    ];
    let before = app.requests.load(Ordering::SeqCst);
    for (path, want) in cases {
        let resp = send(p.port, Duration::ZERO, get(path).as_bytes()).await;
        assert_eq!(status(&resp), want, "{path}: {resp}");
    }
    // Only the /Admin request reached the app (404 there); nothing under /admin did.
    assert_eq!(app.requests.load(Ordering::SeqCst) - before, 1);
    // What the app receives is the normal form.
    let resp = send(p.port, Duration::ZERO, get("/x/%2e%2e/%65cho?a=%2e%2e").as_bytes()).await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert!(resp.contains("\"uri\":\"/echo?a=%2e%2e\""), "the query is untouched: {resp}");
}

/// JSON Schema validation against hostile bodies: a key given twice (which
/// parsers read differently), trailing bytes, deep nesting, non-JSON media
/// types and spellings of them, a missing content type, UTF-16 and BOMs,
/// bodies built to produce thousands of errors, and a flood of them: none
/// reaches the app, every refusal is bounded, and the sidecar keeps serving.
#[tokio::test]
async fn hostile_json_bodies_never_pass_the_schema() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let tp = r#"apiVersion: palisade.dev/v1
kind: TrafficPolicy
metadata: {name: orders-schema, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  validation:
    maxBodyBytes: 65536
    jsonSchema:
      type: object
      required: [qty]
      properties:
        qty: {type: integer, minimum: 1}
        tags: {type: array, items: {type: string}}
"#;
    apply(&p.cp, p.tmp.path(), &p.server, tp).await;
    let post = |ct: Option<&str>, body: &[u8]| {
        let mut head = "POST /echo HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n".to_string();
        if let Some(ct) = ct {
            head.push_str(&format!("content-type: {ct}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut all = head.into_bytes();
        all.extend_from_slice(body);
        all
    };
    let json = Some("application/json");
    let many_errors = format!(r#"{{"qty": 1, "tags": [{}1]}}"#, "1,".repeat(5000));
    let deep = format!("{{\"qty\": 1, \"x\": {}{}}}", "[".repeat(5000), "]".repeat(5000));
    let utf16: Vec<u8> = "{\"qty\": 1}".encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let cases: Vec<(Option<&str>, Vec<u8>, u16)> = vec![
        (json, br#"{"qty": 0, "qty": 1}"#.to_vec(), 400),
        (json, br#"{"qty": 1, "qty": 0}"#.to_vec(), 400),
        (json, br#"{"qty": 1} {"qty": 0}"#.to_vec(), 400),
        (json, br#"{"qty": 1}garbage"#.to_vec(), 400),
        (json, br#"{"qty": NaN}"#.to_vec(), 400),
        (json, br#"{"qty": 1e400}"#.to_vec(), 400),
        (json, b"\xef\xbb\xbf{\"qty\": 1}".to_vec(), 400),
        (json, utf16, 400),
        (json, b"{\"qty\": 1, \"s\": \"\xff\"}".to_vec(), 400),
        (json, deep.into_bytes(), 400),
        (json, many_errors.into_bytes(), 400),
        (None, br#"{"qty": 0}"#.to_vec(), 415),
        (Some("text/plain"), br#"{"qty": 0}"#.to_vec(), 415),
        (Some("application/jsonx"), br#"{"qty": 0}"#.to_vec(), 415),
        (Some("text/json"), br#"{"qty": 0}"#.to_vec(), 415),
        (Some("application/x-www-form-urlencoded"), b"qty=0".to_vec(), 415),
        (Some("multipart/form-data; boundary=x"), b"--x--".to_vec(), 415),
    ];
    let before = app.requests.load(Ordering::SeqCst);
    for (i, (ct, body, want)) in cases.iter().enumerate() {
        let resp = send(p.port, Duration::ZERO, &post(*ct, body)).await;
        assert_eq!(status(&resp), *want, "case {i} ({ct:?}): {resp}");
        assert!(resp.len() < 8192, "case {i}: a bounded refusal ({} bytes)", resp.len());
    }
    // Two Content-Type headers: hyper reads the first; a JSON first one is checked as JSON.
    let two = b"POST /echo HTTP/1.1\r\nHost: orders\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\n{\"qty\": 0}";
    assert_eq!(status(&send(p.port, Duration::ZERO, two).await), 400);
    assert_eq!(app.requests.load(Ordering::SeqCst), before, "nothing refused reached the app");
    // A flood of invalid bodies on concurrent connections, then a valid one passes.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let req = post(json, br#"{"qty": "one"}"#);
        let port = p.port;
        flood.spawn(async move { status(&send(port, Duration::ZERO, &req).await) });
    }
    while let Some(s) = flood.join_next().await {
        assert_eq!(s.unwrap(), 400);
    }
    let ok = send(p.port, Duration::ZERO, &post(Some("application/json; charset=utf-8"), br#"{"qty": 3}"#)).await;
    assert_eq!(status(&ok), 200, "{ok}");
    assert_eq!(app.requests.load(Ordering::SeqCst), before + 1);
}

/// The control plane's metrics listener: a connection flood from one
/// address is held to 8 (32 in all), a client that never finishes its
/// request head is cut off, other methods and paths get 404, and /metrics
/// answers again once the flood is gone.
#[tokio::test]
async fn the_metrics_listener_bounds_floods_and_slow_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--metrics-listen", &listen]).await.unwrap();
    let cpid = cp.proc.child.id();
    let baseline = fds(cpid);
    let held = flood("127.0.0.2", port, 200).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fds(cpid) <= baseline + 8 + 4, "8 per address: {baseline} -> {}", fds(cpid));
    let (code, text) = palisade_tests::http::get(&listen, "/metrics").await.unwrap();
    assert_eq!(code, 200, "another address is still served");
    assert!(text.contains("palisade_cp_policy_streams"), "{text}");
    drop(held);
    for req in [
        &b"POST /metrics HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n"[..],
        b"GET /config HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let r = send(port, Duration::ZERO, req).await;
        assert_eq!(status(&r), 404, "{r}");
    }
    // A request head that never ends is cut off after 5 s.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").await.unwrap();
    let mut buf = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut buf)).await;
    assert!(done.is_ok(), "the slow client was not cut off");
}

/// Spoofed or malformed trace context never breaks a request: each is
/// answered 200, and the app receives a well-formed traceparent (a new
/// trace replacing the malformed one).
#[tokio::test]
async fn malformed_trace_context_is_replaced_not_trusted() {
    let app = HttpApp::start().await;
    let p = pair(
        app.addr,
        &[],
        &["--otlp-endpoint", "http://127.0.0.1:9", "--trace-sampling", "1"],
        &["--otlp-endpoint", "http://127.0.0.1:9", "--trace-sampling", "1"],
    )
    .await;
    let long = format!("00-{}-b7ad6b7169203331-01", "a".repeat(5000));
    for tp in [
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz",
        long.as_str(),
    ] {
        let req = format!(
            "GET /echo HTTP/1.1\r\nHost: orders\r\ntraceparent: {tp}\r\ntracestate: x=y\r\nConnection: close\r\n\r\n"
        );
        let r = send(p.port, Duration::ZERO, req.as_bytes()).await;
        assert_eq!(status(&r), 200, "{tp}: {r}");
        let body: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let got = body["headers"]["traceparent"].as_str().unwrap();
        assert!(got.len() == 55 && got.starts_with("00-") && got.ends_with("-01") && got != tp, "{tp} -> {got}");
        assert!(body["headers"].get("tracestate").is_none(), "the malformed context's tracestate is dropped: {body}");
    }
}

/// Taps and the sidecars' reports: only the admin may tap; taps are
/// capped; a workload can neither inject lines into a tap of another
/// workload nor record requests in another's name; a flood of requests
/// reaches a tap at the per-sidecar rate, the rest counted as dropped.
#[tokio::test]
async fn taps_and_traffic_reports_cannot_be_spoofed_or_flooded() {
    use http_body_util::BodyExt;
    use palisade_proto::v1::admin_client::AdminClient;
    use palisade_proto::v1::{RecordedRequest, Report, TapRecord, TapRequest};
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let bundle = std::fs::read_to_string(p.cp.bundle()).unwrap();

    // A workload certificate may not tap.
    let ch = grpc::channel(&p.cp.addr, &bundle, Some(workload_svid(&p.cp, WEB).await)).await.unwrap();
    let err = AdminClient::new(ch).tap(TapRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // At most 16 taps at once; a malformed one is refused with its field.
    let admin = grpc::channel(&p.cp.addr, &bundle, Some(admin_svid(&p.cp))).await.unwrap();
    let mut c = AdminClient::new(admin);
    let bad = c.tap(TapRequest { decision: "maybe".into(), ..Default::default() }).await.unwrap_err();
    assert!(bad.code() == tonic::Code::InvalidArgument && bad.message().starts_with("decision:"), "{bad:?}");
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(
            c.tap(TapRequest { to: "spiffe://cluster.local/ns/none/*".into(), ..Default::default() }).await.unwrap(),
        );
    }
    let err = c.tap(TapRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    drop(held);
    let mut tap = eventually("the capped taps to end", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { c.tap(TapRequest { to: ORDERS.into(), ..Default::default() }).await.ok() }
    })
    .await
    .unwrap()
    .into_inner();
    eventually("the tap to reach orders", Duration::from_secs(10), || async {
        (p.server.metric("palisade_taps_active").await == Some(1.0)).then_some(())
    })
    .await
    .unwrap();

    // web's certificate, claiming lines and samples for orders (tap ids guessed).
    let ch = grpc::channel(&p.cp.addr, &bundle, Some(workload_svid(&p.cp, WEB).await)).await.unwrap();
    let (tx, mut snaps) = palisade_tests::config::subscribe(ch, "127.0.0.1:1").await;
    let first = snaps.message().await.unwrap().unwrap();
    assert!(!first.nonce.is_empty() && first.taps.is_none(), "a stream that did not say it knows taps gets none");
    // A tap of every workload: this stream (no "taps" capability, as an older
    // sidecar) is never sent a taps-only snapshot it would misread.
    let _all = c.tap(TapRequest::default()).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), snaps.message()).await.is_err());
    let forged = format!(r#"{{"callee":"{ORDERS}","caller":"{WEB}","path":"/forged","decision":"deny"}}"#);
    let sample = format!(r#"{{"from":"{WEB}","to":"{ORDERS}","method":"DELETE","path":"/forged","port":80}}"#);
    tx.send(palisade_tests::config::report(Report {
        tap_events: vec![TapRecord { tap_ids: (1..=64).collect(), json: forged, dropped: 0 }],
        recorded: vec![
            RecordedRequest { sample_json: sample, count: 1_000_000 },
            RecordedRequest { sample_json: "{".repeat(20_000), count: 1 },
        ],
        ..Default::default()
    }))
    .await
    .unwrap();

    // A flood through the real path: 600 requests on one connection.
    let mut h = crate::dataplane::h1_client(p.port).await;
    let start = Instant::now();
    for _ in 0..600 {
        let req = http::Request::get("/echo").header("host", "orders").body(Default::default()).unwrap();
        let resp = h.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let (mut lines, mut dropped) = (Vec::new(), 0);
    while let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::from_millis(2500), tap.message()).await {
        dropped = ev.dropped;
        if !ev.json.is_empty() {
            lines.push(ev);
        }
    }
    assert!(lines.iter().all(|l| !l.json.contains("/forged")), "a workload cannot feed another's tap");
    let bound = (100.0 * (secs.ceil() + 1.0)) as usize;
    assert!(!lines.is_empty() && lines.len() <= bound, "{} lines in {secs:.1}s (bound {bound})", lines.len());
    let metrics = p.server.get("/metrics").await.unwrap().1;
    // Every request is either shown or counted as dropped, for the tapper and in the metrics.
    assert_eq!(lines.len() as u64 + dropped, 600, "{} shown, {dropped} dropped", lines.len());
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("palisade_tap_events_total{result=\"dropped\"} "))
        .map_or(0, |n| n.parse::<u64>().unwrap());
    assert!(counted >= dropped, "the sidecar counts its drops (of both taps running): {counted} >= {dropped}");

    // The forged sample counts as web's own traffic (to web), never as orders'.
    let preview = tmp_file(
        &p,
        "candidate.yaml",
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: lock, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{to: [{methods: [DELETE]}]}]\n",
    );
    let out = p.cp.ctl(&["policy", "preview", "-f", &preview, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["changes"], serde_json::json!([]), "{v}");
}

fn tmp_file(p: &crate::dataplane::Pair, name: &str, text: &str) -> String {
    let f = p.tmp.path().join(name);
    std::fs::write(&f, text).unwrap();
    f.to_str().unwrap().to_string()
}

/// Root rotation is the admin's alone and its inputs are checked; a stream
/// that never ACKs the new bundle holds the step, named in the status, until
/// it goes; after the rotation a certificate from the retired root opens
/// nothing, at the control plane or at a sidecar.
#[tokio::test]
async fn root_rotation_cannot_be_driven_or_skipped_by_a_workload() {
    use palisade_proto::v1::admin_client::AdminClient;
    use palisade_proto::v1::{CertifyRequest, GetCaStatusRequest, RotateCaRequest};
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let bundle = std::fs::read_to_string(p.cp.bundle()).unwrap();

    // A workload certificate may neither rotate nor look.
    let ch = grpc::channel(&p.cp.addr, &bundle, Some(workload_svid(&p.cp, WEB).await)).await.unwrap();
    let mut w = AdminClient::new(ch);
    let err = w.rotate_ca(RotateCaRequest { generate: true, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = w.get_ca_status(GetCaStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let admin = grpc::channel(&p.cp.addr, &bundle, Some(admin_svid(&p.cp))).await.unwrap();
    let mut a = AdminClient::new(admin);
    for bad in [
        RotateCaRequest::default(),
        RotateCaRequest { generate: true, abort: true, ..Default::default() },
        RotateCaRequest { generate: true, min_phase_seconds: u64::MAX, ..Default::default() },
    ] {
        let err = a.rotate_ca(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    // The operator's new root: a key that is not its key, or not a key at
    // all, is refused, and the answer never echoes the key.
    let td = TrustDomain::default();
    let root = palisade_certs::CertificateAuthority::generate(&td, Duration::from_secs(400 * 86400)).unwrap();
    let other = palisade_certs::CertificateAuthority::generate(&td, Duration::from_secs(400 * 86400)).unwrap();
    let key_line = other.key_pem().expose().lines().nth(1).unwrap().to_string();
    for (key, why) in [
        (other.key_pem().expose().to_string(), "does not match"),
        ("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n".to_string(), "the new root"),
    ] {
        let req = RotateCaRequest { new_root_cert_pem: root.cert_pem(), new_root_key_pem: key, ..Default::default() };
        let err = a.rotate_ca(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why) && !err.message().contains(&key_line), "{err:?}");
    }
    let both = RotateCaRequest { generate: true, new_root_cert_pem: root.cert_pem(), ..Default::default() };
    assert_eq!(a.rotate_ca(both).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert!(
        !format!("{:?}", RotateCaRequest { new_root_key_pem: key_line.clone(), ..Default::default() })
            .contains(&key_line)
    );
    assert_eq!(a.get_ca_status(GetCaStatusRequest {}).await.unwrap().into_inner().phase, "none");
    // The admin credential's re-certification (what `ca rotate` does for
    // its own credential): the admin identity only, never longer than the
    // presented certificate, and no other identity through it.
    let identity = |svid: Svid| {
        let addr = p.cp.addr.clone();
        let bundle = bundle.clone();
        async move {
            palisade_proto::v1::identity_client::IdentityClient::new(
                grpc::channel(&addr, &bundle, Some(svid)).await.unwrap(),
            )
        }
    };
    let admin_cert = std::fs::read_to_string(p.cp.admin_dir().join("cert.pem")).unwrap();
    let admin_cert = palisade_certs::ca::parse_pem_certs(&admin_cert).unwrap();
    let (_, presented) = palisade_certs::SvidInfo::parse_svid(&admin_cert[0]).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let mut id = identity(admin_svid(&p.cp)).await;
    let again = id.certify(CertifyRequest { csr_der: key.csr_der(None).unwrap(), ..Default::default() }).await;
    let again = again.unwrap().into_inner();
    assert_eq!(again.spiffe_id, td.admin().to_string());
    let not_after = std::time::SystemTime::try_from(again.not_after.unwrap()).unwrap();
    assert!(not_after <= presented.not_after, "a re-certified admin credential outlives the one presented");
    let web: palisade_certs::SpiffeId = WEB.parse().unwrap();
    let as_web = CertifyRequest { csr_der: key.csr_der(Some(&web)).unwrap(), ..Default::default() };
    assert!(id.certify(as_web).await.is_err(), "the admin credential re-certified as a workload");
    let mut w = identity(workload_svid(&p.cp, WEB).await).await;
    let as_admin = CertifyRequest { csr_der: key.csr_der(Some(&td.admin())).unwrap(), ..Default::default() };
    let err = w.certify(as_admin).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "a workload renewed as the admin: {err:?}");
    let err = a.rotate_ca(RotateCaRequest { abort: true, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // A workload opens a config stream and never answers.
    let old_svid = workload_svid(&p.cp, WEB).await;
    let ch = grpc::channel(&p.cp.addr, &bundle, Some(workload_svid(&p.cp, WEB).await)).await.unwrap();
    let (tx, silent) = palisade_tests::config::subscribe(ch, "10.9.9.9:1").await;
    a.rotate_ca(RotateCaRequest { generate: true, ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = a.get_ca_status(GetCaStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.phase, "publishing", "{s:?}");
    assert_eq!(s.waiting_for, vec![format!("{WEB} 10.9.9.9:1")], "only the silent stream is waited for");
    // It goes: the rotation runs to its end.
    drop((tx, silent));
    let done =
        eventually("the rotation to finish", Duration::from_secs(30), || {
            let mut a = a.clone();
            async move {
                Some(a.get_ca_status(GetCaStatusRequest {}).await.ok()?.into_inner()).filter(|s| s.phase == "done")
            }
        })
        .await
        .unwrap();
    assert_eq!(done.bundle.len(), 1);

    // A certificate from the retired root: no renewal at the control plane.
    let new_bundle = eventually("the admin bundle to hold the new root only", Duration::from_secs(5), || async {
        std::fs::read_to_string(p.cp.bundle()).ok().filter(|b| b.matches("BEGIN CERTIFICATE").count() == 1)
    })
    .await
    .unwrap();
    let renews = |svid: Svid| {
        let new_bundle = new_bundle.clone();
        let addr = p.cp.addr.clone();
        async move {
            let Ok(ch) = grpc::channel(&addr, &new_bundle, Some(svid)).await else { return false };
            let key = WorkloadKey::generate().unwrap();
            let req = CertifyRequest { csr_der: key.csr_der(None).unwrap(), ..Default::default() };
            palisade_proto::v1::identity_client::IdentityClient::new(ch).certify(req).await.is_ok()
        }
    };
    assert!(renews(workload_svid(&p.cp, WEB).await).await, "a certificate from the new root renews");
    let refused = !renews(old_svid).await;
    assert!(refused, "a certificate from the retired root renewed");
    let logs = p.cp.proc.logs();
    assert!(logs.contains("ca_rotation_requested"), "{logs}");
}
