//! What the data path refuses: plaintext under STRICT, client certificates
//! that are not valid SVIDs of the mesh, a server with the wrong identity,
//! malformed or oversized HTTP/1 requests (the app receives nothing).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, TrustBundle};
use palisade_tests::apps::HttpApp;
use palisade_tests::{Sidecar, eventually, free_port};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dataplane::{ORDERS, WEB, pair};

/// Sends raw bytes, returns what comes back until EOF or 5 s.
async fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_oversized_http1_never_reaches_the_app() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &["--max-request-body-bytes", "1000"]).await;
    let cases: &[(&str, &[u8], &str)] = &[
        ("CL+TE", b"POST /framing HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "400"),
        ("two CL", b"POST /framing HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "400"),
        ("same CL twice", b"POST /framing HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "400"),
        ("invalid CL", b"POST /framing HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello", "400"),
        ("invalid chunk size", b"POST /framing HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "400"),
        ("body too large", b"POST /framing HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", "413"),
        ("garbage request line", b"GET /framing\x00 HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ];
    for (name, bytes, status) in cases {
        let resp = raw(p.port, bytes).await;
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{name}: got {resp:?}");
    }
    // Too many headers, and one huge header: 431.
    let mut many = String::from("GET /framing HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let resp = raw(p.port, many.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "too many headers: {resp:?}");
    let huge = format!("GET /framing HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n", "a".repeat(70_000));
    let resp = raw(p.port, huge.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "huge header: {:?}", &resp[..resp.len().min(80)]);
    assert_eq!(app.requests.load(Ordering::SeqCst), 0, "the app must receive none of these");

    // A well-formed request on the same path does arrive.
    let resp =
        raw(p.port, b"POST /framing HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello").await;
    assert!(resp.starts_with("HTTP/1.1 200") && resp.contains("hello"), "{resp}");
    assert_eq!(app.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn strict_inbound_refuses_plaintext_and_permissive_marks_it_unauthenticated() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let port: u16 = p.server.inbound.rsplit(':').next().unwrap().parse().unwrap();
    let resp = raw(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(resp, "", "STRICT: a plaintext request gets no answer");
    assert_eq!(app.requests.load(Ordering::SeqCst), 0);
    eventually("plaintext counted", Duration::from_secs(5), || async {
        (p.server.metric("palisade_tls_handshake_failures_total{direction=\"inbound\",reason=\"plaintext\"}").await?
            >= 1.0)
            .then_some(())
    })
    .await
    .unwrap();
    // Garbage that looks like TLS does not hurt the sidecar.
    let _ = raw(port, b"\x16\x03\x01\x00\x05hello-not-tls").await;
    assert_eq!(p.server.get("/live").await.unwrap().0, 200);

    // PERMISSIVE: plaintext accepted, without (and never with a spoofed) identity.
    let perm = Sidecar::meshed(
        "permissive",
        &p.cp,
        p.tmp.path(),
        "spiffe://cluster.local/ns/shop/sa/legacy",
        &["--app", &app.addr.to_string(), "--mtls-mode", "permissive"],
    )
    .await
    .unwrap();
    let pport: u16 = perm.inbound.rsplit(':').next().unwrap().parse().unwrap();
    // Plaintext callers are unauthenticated: the mesh default does not let them in...
    let refused = raw(pport, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    // ...a policy that names them does.
    let policy = p.tmp.path().join("legacy.yaml");
    std::fs::write(&policy, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: legacy-plaintext, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/legacy\"]}\n  action: ALLOW\n  rules:\n    - from: [{unauthenticated: true}]\n").unwrap();
    let out = p.cp.ctl(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("policy reaches the permissive sidecar", Duration::from_secs(5), || async {
        raw(pport, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await
    .unwrap();
    let resp = raw(pport, b"GET /echo HTTP/1.1\r\nHost: x\r\nx-palisade-peer-identity: spiffe://cluster.local/ns/shop/sa/admin\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(!resp.contains("x-palisade-peer-identity"), "spoofed identity must be stripped: {resp}");
}

/// Signs a client certificate with the mesh CA (read from the data dir) with custom SANs and validity.
fn forged_client(
    data_dir: &std::path::Path,
    uris: &[&str],
    expired: bool,
    other_ca: bool,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_pem = std::fs::read_to_string(data_dir.join("ca/ca.pem")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(data_dir.join("ca/ca-key.pem")).unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = uris.iter().map(|u| rcgen::SanType::URI((*u).try_into().unwrap())).collect();
    if uris.is_empty() {
        params.subject_alt_names = vec![rcgen::SanType::DnsName("web.shop".try_into().unwrap())];
    }
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = SystemTime::now();
    if expired {
        params.not_before = (now - Duration::from_secs(7200)).into();
        params.not_after = (now - Duration::from_secs(3600)).into();
    } else {
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(3600)).into();
    }
    let cert = if other_ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let other = rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
        params.signed_by(&key, &*other).unwrap()
    } else {
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        params.signed_by(&key, &issuer).unwrap()
    };
    (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

/// Connects to `addr` with a client certificate and tries one HTTP/2 request;
/// returns whether it got an HTTP answer.
async fn try_mtls(
    addr: &str,
    bundle: &std::path::Path,
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> bool {
    let roots = palisade_certs::ca::parse_pem_certs(&std::fs::read_to_string(bundle).unwrap()).unwrap();
    let verifier =
        SpiffeServerVerifier::new(TrustBundle::new(&roots).unwrap(), PeerIdentity::TrustDomain(Default::default()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(palisade_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(client.0, client.1)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let Ok(tls) =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await
    else {
        return false;
    };
    let attempt = async {
        let (mut s, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get("http://orders/hello").body(http_body_util::Empty::<bytes::Bytes>::new()).ok()?;
        s.send_request(req).await.ok().map(|r| r.status().as_u16())
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), attempt).await, Ok(Some(_)))
}

#[tokio::test]
async fn client_certificates_that_are_not_mesh_svids_are_refused_at_the_handshake() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let data = p.cp.data_dir.clone();
    let bundle = p.cp.bundle();
    let addr = p.server.inbound.clone();
    // Control: a proper SVID gets through.
    assert!(
        try_mtls(&addr, &bundle, forged_client(&data, &[WEB], false, false)).await,
        "a valid SVID must be accepted"
    );
    let cases = [
        ("another CA", forged_client(&data, &[WEB], false, true), "unknown_issuer"),
        ("expired", forged_client(&data, &[WEB], true, false), "expired"),
        ("no URI SAN", forged_client(&data, &[], false, false), "bad_identity"),
        ("two URI SANs", forged_client(&data, &[WEB, ORDERS], false, false), "bad_identity"),
        (
            "another trust domain",
            forged_client(&data, &["spiffe://evil.example/ns/shop/sa/web"], false, false),
            "bad_identity",
        ),
    ];
    for (name, cert, reason) in cases {
        assert!(!try_mtls(&addr, &bundle, cert).await, "{name}: must be refused");
        let metric = format!("palisade_tls_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}}");
        eventually(name, Duration::from_secs(5), || async { (p.server.metric(&metric).await? >= 1.0).then_some(()) })
            .await
            .unwrap();
    }
    assert_eq!(app.requests.load(Ordering::SeqCst), 1, "only the valid SVID's request reached the app");
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_fails_the_request_with_502() {
    let app = HttpApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cp = palisade_tests::ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    // "orders" registers address P, but P is really served by "evil".
    let p_addr = format!("127.0.0.1:{}", free_port());
    let _orders =
        Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &["--app", &app.addr.to_string(), "--advertise", &p_addr])
            .await
            .unwrap();
    let _evil = Sidecar::meshed(
        "evil",
        &cp,
        tmp.path(),
        "spiffe://cluster.local/ns/shop/sa/evil",
        &["--app", &app.addr.to_string(), "--inbound", &p_addr, "--advertise", &format!("127.0.0.1:{}", free_port())],
    )
    .await
    .unwrap();
    let port = free_port();
    let client =
        Sidecar::meshed("client", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")])
            .await
            .unwrap();
    // The client holds what it calls: orders' endpoint.
    eventually("directory", Duration::from_secs(10), || async {
        (client.metric("palisade_directory_endpoints").await? >= 1.0).then_some(())
    })
    .await
    .unwrap();
    let resp = raw(port, b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert_eq!(app.requests.load(Ordering::SeqCst), 0);
    assert!(client.metric("palisade_identity_mismatch_total").await.unwrap() >= 1.0);
    assert!(
        client.proc.logs().lines().any(|l| l.contains("audit") && l.contains("unexpected identity")),
        "{}",
        client.proc.logs()
    );
    // gRPC callers get grpc-status instead of an HTTP error.
    let resp = raw(port, b"POST /x.Y/Z HTTP/1.1\r\nHost: orders\r\ncontent-type: application/grpc\r\ncontent-length: 0\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200") && resp.contains("grpc-status: 14"), "{resp}");
}
