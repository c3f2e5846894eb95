//! The data path through two real sidecars with real mTLS: HTTP/1.1,
//! HTTP/2, gRPC and opaque TCP, identity headers, rotation and draining.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_tests::apps::{GrpcApp, HttpApp, echo};
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub(crate) const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// A control plane, a server sidecar in front of `app`, and a client sidecar
/// (identity web) whose local `port` reaches it.
pub(crate) struct Pair {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) cp: ControlPlane,
    pub(crate) server: Sidecar,
    pub(crate) client: Sidecar,
    pub(crate) port: u16,
}

pub(crate) async fn pair(
    app: std::net::SocketAddr,
    cp_args: &[&str],
    server_args: &[&str],
    client_args: &[&str],
) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    // These tests are about transport: any authenticated caller is allowed.
    let cp_args = [&["--default-policy", "allow-authenticated"][..], cp_args].concat();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &cp_args).await.unwrap();
    let app_s = app.to_string();
    let mut sargs = vec!["--app", app_s.as_str()];
    sargs.extend_from_slice(server_args);
    let server = Sidecar::meshed("server", &cp, tmp.path(), ORDERS, &sargs).await.unwrap();
    let port = free_port();
    let upstream = format!("127.0.0.1:{port}=orders.shop");
    let mut cargs = vec!["--upstream", upstream.as_str()];
    cargs.extend_from_slice(client_args);
    let client = Sidecar::meshed("client", &cp, tmp.path(), WEB, &cargs).await.unwrap();
    // The client learns the server's address from the directory.
    eventually("directory lists the server", Duration::from_secs(10), || async {
        (client.metric("palisade_directory_endpoints").await? >= 1.0).then_some(())
    })
    .await
    .unwrap();
    Pair { tmp, cp, server, client, port }
}

pub(crate) async fn h1_client(port: u16) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

async fn json(resp: hyper::Response<hyper::body::Incoming>) -> serde_json::Value {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&b)))
}

#[tokio::test]
async fn http1_travels_between_sidecars_with_the_callers_identity() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let mut c = h1_client(p.port).await;

    // Keep-alive: several requests on one connection; a spoofed identity header is replaced.
    for i in 0..3 {
        let req = hyper::Request::get(format!("/echo?i={i}"))
            .header("host", "orders.shop")
            .header("x-palisade-peer-identity", "spiffe://cluster.local/ns/evil/sa/spoof")
            .header("x-custom", "kept")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), hyper::Version::HTTP_11);
        let v = json(resp).await;
        assert_eq!(v["headers"]["x-palisade-peer-identity"], WEB, "{v}");
        assert_eq!(v["headers"]["x-custom"], "kept");
        assert_eq!(v["headers"]["host"], "orders.shop");
        assert_eq!(v["version"], "HTTP/1.1", "the app gets the protocol the caller spoke");
        assert_eq!(v["uri"], format!("/echo?i={i}"));
        assert!(v["headers"].get("x-palisade-orig-proto").is_none());
    }

    // A chunked request body and a chunked (streamed) response.
    let chunks = tokio_stream::iter(vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from("part1-"))),
        Ok(hyper::body::Frame::data(Bytes::from("part2"))),
    ]);
    let tcp = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let (mut s, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::StreamBody<_>>(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let resp = s
        .send_request(
            hyper::Request::post("/echo").header("host", "x").body(http_body_util::StreamBody::new(chunks)).unwrap(),
        )
        .await
        .unwrap();
    let v = json(resp).await;
    assert_eq!(v["body"], "part1-part2");
    assert_eq!(v["headers"]["transfer-encoding"], "chunked");
    let resp = c
        .send_request(hyper::Request::get("/stream").header("host", "x").body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "chunk0;chunk1;chunk2;");

    // HTTP/1.1 Upgrade (as WebSocket does): 101, then raw bytes both ways.
    let mut ws = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: orders\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = ws.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.write_all(b"ping over the upgrade").await.unwrap();
    let mut got = vec![0u8; 21];
    tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"ping over the upgrade");

    let inbound_2xx =
        p.server.metric("palisade_requests_total{direction=\"inbound\",status_class=\"2xx\"}").await.unwrap();
    assert!(inbound_2xx >= 5.0, "server sidecar counted {inbound_2xx}");
    assert!(p.client.metric("palisade_request_duration_seconds_count{direction=\"outbound\"}").await.unwrap() >= 5.0);
}

#[tokio::test]
async fn h2c_prior_knowledge_from_the_app_stays_http2() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &[], &[], &[]).await;
    let tcp = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut waits = Vec::new();
    for i in 0..10 {
        let req = hyper::Request::get(format!("http://orders.shop/echo?i={i}")).body(Full::new(Bytes::new())).unwrap();
        waits.push(s.send_request(req));
    }
    for (i, w) in waits.into_iter().enumerate() {
        let v = json(w.await.unwrap()).await;
        assert_eq!(v["version"], "HTTP/2.0");
        assert_eq!(v["headers"]["x-palisade-peer-identity"], WEB);
        assert_eq!(v["uri"], format!("http://orders.shop/echo?i={i}"));
    }
}

#[tokio::test]
async fn grpc_unary_streaming_deadlines_and_cancellation() {
    let grpc = GrpcApp::default();
    let app = grpc.start().await;
    let p = pair(app, &[], &[], &[]).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", p.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = echo::echo_client::EchoClient::new(ch);

    let r = c.unary(echo::EchoRequest { message: "hi".into() }).await.unwrap().into_inner();
    assert_eq!((r.message.as_str(), r.peer_identity.as_str()), ("hi", WEB));
    // Status codes and messages from the app pass through (trailers intact).
    let e = c.unary(echo::EchoRequest { message: "fail".into() }).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "asked to fail"));

    let mut s = c
        .server_stream(echo::StreamRequest { message: "m".into(), count: 5, interval_ms: 1 })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(m.message);
    }
    assert_eq!(got, vec!["m-0", "m-1", "m-2", "m-3", "m-4"]);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for word in ["alpha", "beta", "gamma"] {
        tx.send(echo::EchoRequest { message: word.into() }).await.unwrap();
        let r = replies.message().await.unwrap().unwrap();
        assert_eq!(r.message, word.to_uppercase(), "bidi: each reply follows its request");
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // Deadline: grpc-timeout travels; the call ends DEADLINE_EXCEEDED.
    let mut req = tonic::Request::new(echo::SlowRequest { millis: 3000 });
    req.set_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let e = c.slow(req).await.unwrap_err();
    // tonic reports its own timer as CANCELLED "Timeout expired"; either way the call ended by deadline.
    assert!(e.code() == tonic::Code::DeadlineExceeded || e.message().contains("Timeout expired"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let sent = grpc.last_grpc_timeout.lock().unwrap().clone().expect("grpc-timeout reached the app");
    assert!(sent.ends_with('m') || sent.ends_with('u') || sent.ends_with('n'), "grpc-timeout {sent}");
    eventually("the app's slow handler is abandoned", Duration::from_secs(5), || async {
        (grpc.slow_aborted.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await
    .unwrap();

    // Cancellation: dropping a stream mid-way reaches the app.
    let mut s = c
        .server_stream(echo::StreamRequest { message: "c".into(), count: 10_000, interval_ms: 5 })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        s.message().await.unwrap().unwrap();
    }
    drop(s);
    eventually("the app sees the cancellation", Duration::from_secs(10), || async {
        (grpc.cancelled.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn opaque_tcp_with_half_close_and_server_speaks_first() {
    let echo_app = palisade_tests::apps::tcp_echo().await;
    // A client-first protocol other than HTTP is carried only on a port
    // declared opaque (at the server sidecar, which decides).
    let p = pair(echo_app, &[], &["--opaque-port", &echo_app.port().to_string()], &[]).await;
    // Carried opaque; half-close carried through.
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    s.write_all(b"\x00\x01binary payload").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert_eq!(out, b"echo:\x00\x01binary payload");

    // A server-speaks-first app behind a declared opaque port, and behind
    // detection (which gives up after its timeout and carries the bytes).
    let greeter = palisade_tests::apps::tcp_greeter().await;
    let g_inbound = format!("127.0.0.1:{}", free_port());
    let g = Sidecar::meshed(
        "greeter",
        &p.cp,
        p.tmp.path(),
        "spiffe://cluster.local/ns/mail/sa/smtp",
        &["--app", &greeter.to_string(), "--inbound", &g_inbound],
    )
    .await
    .unwrap();
    let (opaque, detected) = (free_port(), free_port());
    let c2 = Sidecar::meshed(
        "client2",
        &p.cp,
        p.tmp.path(),
        WEB,
        &[
            "--upstream",
            &format!("127.0.0.1:{opaque}=smtp.mail"),
            "--upstream",
            &format!("127.0.0.1:{detected}=smtp.mail"),
            "--opaque-port",
            &opaque.to_string(),
        ],
    )
    .await
    .unwrap();
    // The directory holds what client2 calls: smtp.mail's endpoint.
    eventually("directory", Duration::from_secs(10), || async {
        (c2.metric("palisade_directory_endpoints").await? >= 1.0).then_some(())
    })
    .await
    .unwrap();
    for port in [opaque, detected] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut greeting = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting)).await.unwrap().unwrap();
        assert_eq!(&greeting, b"220 ready\r\n");
        s.write_all(b"HELO x\r\n").await.unwrap();
        let mut line = [0u8; 8];
        s.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"HELO x\r\n");
    }
    drop(g);
}

#[tokio::test]
async fn certificate_rotation_is_hitless_under_sustained_traffic() {
    let app = HttpApp::start().await;
    let p = pair(app.addr, &["--cert-ttl", "10s"], &[], &[]).await;
    let serial0 = p.client.config().await.unwrap()["cert_serial"].clone();
    let server_serial0 = p.server.config().await.unwrap()["cert_serial"].clone();
    let mut c = h1_client(p.port).await;
    let (mut ok, mut failed) = (0u32, Vec::new());
    let start = std::time::Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(40) {
        n += 1;
        // Mostly one keep-alive connection (rides the live mTLS connection),
        // and every 20th request on a new app connection.
        if n.is_multiple_of(20) {
            c = h1_client(p.port).await;
        }
        let req = hyper::Request::get("/hello").header("host", "orders").body(Full::new(Bytes::new())).unwrap();
        match c.send_request(req).await {
            Ok(r) if r.status() == 200 => {
                r.into_body().collect().await.unwrap();
                ok += 1;
            }
            Ok(r) => failed.push(format!("{} at {:?}", r.status(), start.elapsed())),
            Err(e) => failed.push(format!("{e} at {:?}", start.elapsed())),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 1000, "only {ok} requests");
    assert_ne!(p.client.config().await.unwrap()["cert_serial"], serial0, "client cert rotated");
    assert_ne!(p.server.config().await.unwrap()["cert_serial"], server_serial0, "server cert rotated");
    assert!(p.client.metric("palisade_identity_renewals_total").await.unwrap() >= 4.0);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let app = HttpApp::start().await;
    let mut p = pair(app.addr, &[], &[], &["--drain-timeout", "10s"]).await;
    let port = p.port;
    let slow: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = h1_client(port).await;
                let req = hyper::Request::get("/slow?ms=1500")
                    .header("host", "orders")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let r = c.send_request(req).await?;
                let status = r.status();
                let body = r.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, body))
            })
        })
        .collect();
    // Wait until the three requests are in flight at the app.
    eventually("requests in flight", Duration::from_secs(5), || async {
        (app.requests.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await
    .unwrap();
    let pid = p.client.proc.child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    // Not ready while draining, so Kubernetes stops sending traffic.
    eventually("/ready turns 503", Duration::from_secs(5), || async {
        (p.client.get("/ready").await?.0 == 503).then_some(())
    })
    .await
    .unwrap();
    // New connections are refused while draining.
    eventually("listener closed", Duration::from_secs(5), || async {
        TcpStream::connect(("127.0.0.1", port)).await.is_err().then_some(())
    })
    .await
    .unwrap();
    for h in slow {
        let (status, body) = h.await.unwrap().expect("in-flight request completes");
        assert_eq!((status.as_u16(), &body[..]), (200, &b"slow done"[..]));
    }
    let status = p.client.proc.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", p.client.proc.logs());
    assert!(p.client.proc.logs().contains("drained"));
}

#[tokio::test]
async fn a_service_registered_after_the_caller_is_reachable_at_once() {
    let app = HttpApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--default-policy", "allow-authenticated"])
        .await
        .unwrap();
    let port = free_port();
    // No polling: the directory the control plane pushes when the server registers finds it.
    let client =
        Sidecar::meshed("client", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")])
            .await
            .unwrap();
    // Ready: its first update answered that orders has no endpoints yet.
    assert_eq!(client.metric("palisade_directory_endpoints").await, Some(0.0));
    let _server = Sidecar::meshed("server", &cp, tmp.path(), ORDERS, &["--app", &app.addr.to_string()]).await.unwrap();
    let mut c = h1_client(port).await;
    let req = hyper::Request::get("/hello").header("host", "orders").body(Full::new(Bytes::new())).unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", client.proc.logs());
}
