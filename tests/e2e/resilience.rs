//! Resilience on the calling side, with real processes: the caller's
//! sidecar moves traffic away from a slow instance, ejects a failing one
//! and probes it back in once it recovers; retries recover the transient
//! failures of idempotent calls (a POST only when its route allows, sent
//! again whole), never a rate limit's 429, and stay within the budget under
//! a total outage; timeouts end hung calls (504, gRPC DEADLINE_EXCEEDED).
//!
//! Counts are taken at the apps (what really reached them), never from the
//! sidecar under test alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use palisade_tests::apps::{Behaviour, GrpcApp, HttpApp, echo};

use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};

use crate::dataplane::{ORDERS, WEB};

const STOCK: &str = "spiffe://cluster.local/ns/shop/sa/stock";
const ECHO: &str = "spiffe://cluster.local/ns/shop/sa/echo";

/// A control plane that lets any authenticated caller in, and the caller
/// (web) with a local port per service it calls.
struct Mesh {
    tmp: tempfile::TempDir,
    cp: ControlPlane,
}

impl Mesh {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let cp =
            ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--default-policy", "allow-authenticated"])
                .await
                .unwrap();
        Self { tmp, cp }
    }

    /// One instance of `identity`'s service in front of `app`.
    async fn instance(&self, name: &str, identity: &str, app: std::net::SocketAddr) -> Sidecar {
        Sidecar::meshed(name, &self.cp, self.tmp.path(), identity, &["--app", &app.to_string()]).await.unwrap()
    }

    /// The caller, web, with a local port for each service named; ready
    /// once its directory lists `endpoints` endpoints.
    async fn web(&self, services: &[&str], endpoints: f64) -> (Sidecar, Vec<u16>) {
        let ports: Vec<u16> = services.iter().map(|_| free_port()).collect();
        let upstreams: Vec<String> = services.iter().zip(&ports).map(|(s, p)| format!("127.0.0.1:{p}={s}")).collect();
        let args: Vec<&str> = upstreams.iter().flat_map(|u| ["--upstream", u.as_str()]).collect();
        let web = Sidecar::meshed("web", &self.cp, self.tmp.path(), WEB, &args).await.unwrap();
        eventually("the caller's directory lists every endpoint", Duration::from_secs(10), || async {
            (web.metric("palisade_directory_endpoints").await? >= endpoints).then_some(())
        })
        .await
        .unwrap();
        (web, ports)
    }

    /// Applies YAML with palisadectl and waits until `sidecar` runs it.
    async fn apply(&self, sidecar: &Sidecar, name: &str, yaml: &str) {
        let f = self.tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let out = self.cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "-o", "json"]);
        assert!(out.status.success(), "apply {name}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = format!("r{}", v[0]["revision"]);
        eventually("the sidecar runs the new policy", Duration::from_secs(5), || async {
            (sidecar.config().await?["policy_version"] == want.as_str()).then_some(())
        })
        .await
        .unwrap();
    }
}

/// One answer as the app behind the caller sees it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `x-palisade-attempts`.
    attempts: Option<u32>,
    body: Bytes,
    took: Duration,
}

/// Sends one request to the caller's local `port` on a new connection.
async fn send(port: u16, method: &str, path: &str, body: Bytes) -> Answer {
    let mut c = crate::dataplane::h1_client(port).await;
    let req = http::Request::builder().method(method).uri(path).header("host", "orders").body(Full::new(body)).unwrap();
    let started = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(40), c.send_request(req))
        .await
        .expect("the sidecar answers within its 30 s default")
        .unwrap();
    let status = resp.status().as_u16();
    let attempts = resp.headers().get("x-palisade-attempts").and_then(|v| v.to_str().ok()?.parse().ok());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer { status, attempts, body, took: started.elapsed() }
}

/// POSTs `chunks` to /echo (chunked) on the caller's local `port`: the
/// status, `x-palisade-attempts` and the app's echo.
async fn send_chunked(port: u16, chunks: &[&'static str]) -> (u16, Option<u32>, serde_json::Value) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (mut s, conn) = hyper::client::conn::http1::handshake::<_, http_body_util::StreamBody<_>>(io).await.unwrap();
    tokio::spawn(conn);
    let frames = chunks.iter().map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(*c))));
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames.collect::<Vec<_>>()));
    let req = http::Request::post("/echo").header("host", "orders").body(body).unwrap();
    let resp = s.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let attempts = resp.headers().get("x-palisade-attempts").and_then(|v| v.to_str().ok()?.parse().ok());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, attempts, serde_json::from_slice(&body).unwrap_or_default())
}

/// Calls `Echo/Slow` on the caller's local `port` over h2c with a
/// `grpc-timeout` header and no timer of the client's; returns the
/// grpc-status and whether a sidecar answered (`x-palisade-error`).
async fn grpc_slow(port: u16, millis: u32, timeout: &str) -> (Option<u32>, bool) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (mut s, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let msg = prost::Message::encode_to_vec(&echo::SlowRequest { millis });
    let mut frame = vec![0u8];
    frame.extend((msg.len() as u32).to_be_bytes());
    frame.extend(msg);
    let req = http::Request::post(format!("http://127.0.0.1:{port}/palisade.test.v1.Echo/Slow"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(Full::new(Bytes::from(frame)))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let status = |h: &http::HeaderMap| h.get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok());
    let from_sidecar = resp.headers().contains_key("x-palisade-error");
    if let Some(code) = status(resp.headers()) {
        return (Some(code), from_sidecar);
    }
    let trailers = resp.into_body().collect().await.ok().and_then(|c| c.trailers().cloned());
    (trailers.as_ref().and_then(status), from_sidecar)
}

/// A steady stream of GETs from `workers` keep-alive connections, counting
/// the answers the app behind the caller would see.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
                tokio::spawn(async move {
                    let mut c = crate::dataplane::h1_client(port).await;
                    while !stop.load(Ordering::SeqCst) {
                        let req = http::Request::get("/hello").header("host", "orders").body(Full::default()).unwrap();
                        let good = match c.send_request(req).await {
                            Ok(resp) => {
                                let status = resp.status();
                                resp.into_body().collect().await.is_ok() && status == 200
                            }
                            Err(_) => {
                                c = crate::dataplane::h1_client(port).await;
                                false
                            }
                        };
                        if good { &ok } else { &errors }.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Self { stop, ok, errors, tasks }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ok.load(Ordering::SeqCst), self.errors.load(Ordering::SeqCst))
    }
}

/// Requests each app received during `window`.
async fn shares(apps: &[&HttpApp], window: Duration) -> Vec<usize> {
    let before: Vec<usize> = apps.iter().map(|a| a.requests.load(Ordering::SeqCst)).collect();
    tokio::time::sleep(window).await;
    apps.iter().zip(before).map(|(a, b)| a.requests.load(Ordering::SeqCst) - b).collect()
}

const BALANCING: &str = r#"apiVersion: palisade.dev/v1
kind: TrafficPolicy
metadata: {name: web-balancing, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/web"]}
  balancing:
    warmup: 0s
    ejection: {baseTime: 1s, maxTime: 2s}
"#;

/// Three instances of orders (one 100 ms slower, one failing every other
/// request, one healthy) and a caller sending a steady stream of GETs: the
/// slow one soon gets a small share, the failing one is ejected, and once
/// it recovers it is probed back in and gets its share again; the caller
/// sees next to no errors throughout (503s are retried elsewhere).
#[tokio::test]
async fn slow_and_failing_instances_lose_their_share_and_a_recovered_one_comes_back() {
    let (slow, failing, healthy) = (Behaviour::default(), Behaviour::default(), Behaviour::default());
    slow.delay_ms.store(100, Ordering::SeqCst);
    failing.fail(50, 503);
    let slow = HttpApp::start_with(Arc::new(slow)).await;
    let failing = HttpApp::start_with(Arc::new(failing)).await;
    let healthy = HttpApp::start_with(Arc::new(healthy)).await;
    let m = Mesh::start().await;
    let _slow_sc = m.instance("orders-slow", ORDERS, slow.addr).await;
    let failing_sc = m.instance("orders-failing", ORDERS, failing.addr).await;
    let _healthy_sc = m.instance("orders-healthy", ORDERS, healthy.addr).await;
    let (web, ports) = m.web(&["orders.shop"], 3.0).await;
    m.apply(&web, "balancing", BALANCING).await;

    let load = Load::start(ports[0], 4);
    let ejected = format!("endpoint={}", failing_sc.inbound);
    eventually("the caller ejects the failing instance", Duration::from_secs(15), || async {
        let logs = web.proc.logs();
        logs.lines().any(|l| l.contains("endpoint ejected from balancing") && l.contains(&ejected)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", web.proc.logs()));

    // A later window: the slow one gets a small share, the failing one
    // (out but for its probes) little more; round robin would give each a third.
    let d = shares(&[&slow, &failing, &healthy], Duration::from_secs(3)).await;
    let total: usize = d.iter().sum();
    println!("requests over 3 s after the ejection (slow, failing, healthy): {d:?}");
    assert!(total >= 100, "too little traffic to judge: {d:?}");
    assert!(d[0] * 10 < total, "the slow instance's share is under 10%: {d:?}");
    assert!(d[1] * 5 < total, "the ejected instance's share (its probes) is under 20%: {d:?}");

    // It recovers: probed back in, it gets its share again.
    failing.behaviour.fail(0, 503);
    eventually("the recovered instance takes a fair share again", Duration::from_secs(15), || async {
        let d = shares(&[&slow, &failing, &healthy], Duration::from_secs(1)).await;
        let total: usize = d.iter().sum();
        (total > 0 && d[1] * 4 >= total).then_some(())
    })
    .await
    .unwrap();
    let (ok, errors) = load.finish().await;
    assert!(ok >= 500, "{ok} answers");
    assert!(errors * 100 <= ok, "the caller sees next to no errors: {errors} of {}", ok + errors);

    // docs/resilience.md's commands, as a reader runs them against this mesh.
    let page = std::fs::read_to_string(palisade_tests::repo_root().join("docs/resilience.md")).unwrap();
    let blocks: Vec<&str> = page.split("```sh\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert_eq!(blocks.len(), 1, "the page's one command block");
    let path = format!("{}:{}", palisade_tests::bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{}", blocks[0])])
        .current_dir(palisade_tests::repo_root())
        .env("PATH", path)
        .env("PALISADE_CONTROL_PLANE", &m.cp.addr)
        .env("PALISADE_CREDENTIALS", m.cp.admin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for said in ["shop/web-resilience", "2s", "500ms", "POST"] {
        assert!(text.contains(said), "route explains {said}: {text}");
    }
}

const ROUTES: &str = r#"apiVersion: palisade.dev/v1
kind: TrafficPolicy
metadata: {name: web-routes, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/web"]}
  routes:
    - match: {service: orders.shop, pathPrefix: /echo}
      retry: {nonIdempotent: true, maxBodyBytes: 16384}
    - match: {service: orders.shop, pathPrefix: /t/}
      timeout: 500ms
    - match: {service: stock.shop}
      timeout: 5s
      perTryTimeout: 300ms
      retry: {attempts: 3}
"#;

const RATE_LIMIT: &str = r#"apiVersion: palisade.dev/v1
kind: RateLimitPolicy
metadata: {name: orders-hello, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  limits:
    - name: hello
      match: {paths: ["/hello"]}
      key: identity
      algorithm: token_bucket
      rate: 1
      period: 10s
      burst: 3
"#;

/// Retries, timeouts and the budget, in turn on one mesh: orders (one
/// instance), stock (two) and a gRPC service, called by web.
#[tokio::test]
async fn retries_recover_transient_failures_within_the_budget_and_timeouts_end_hung_calls() {
    let orders = HttpApp::start().await;
    let (stock_a, stock_b) = (HttpApp::start().await, HttpApp::start().await);
    let grpc = GrpcApp::default();
    let grpc_addr = grpc.start().await;
    let m = Mesh::start().await;
    let orders_sc = m.instance("orders", ORDERS, orders.addr).await;
    let _stock_a = m.instance("stock-a", STOCK, stock_a.addr).await;
    let _stock_b = m.instance("stock-b", STOCK, stock_b.addr).await;
    let _echo = m.instance("echo", ECHO, grpc_addr).await;
    let (web, ports) = m.web(&["orders.shop", "stock.shop", "echo.shop"], 4.0).await;
    let (orders_port, stock_port, echo_port) = (ports[0], ports[1], ports[2]);
    m.apply(&web, "routes", ROUTES).await;
    let b = &orders.behaviour;

    // (b) Every other request fails with 503: each GET succeeds on its second try.
    b.fail(50, 503);
    for _ in 0..5 {
        let a = send(orders_port, "GET", "/hello", Bytes::new()).await;
        assert_eq!((a.status, a.attempts), (200, Some(2)), "{a:?}");
    }
    assert_eq!(b.received("GET"), 10, "two tries each reached the app");
    // A POST is not retried when its route does not say so...
    b.fail(50, 503);
    let a = send(orders_port, "POST", "/hello", Bytes::from_static(b"once")).await;
    assert_eq!((a.status, a.attempts, b.received("POST")), (503, None, 1), "{a:?}");
    b.fail(0, 503);

    // (d) A hung app: the route's 500ms timeout answers 504.
    let timeouts = |kind: &'static str| {
        let web = &web;
        async move { web.metric(&format!("palisade_outbound_timeouts_total{{kind=\"{kind}\"}}")).await.unwrap_or(0.0) }
    };
    let before = timeouts("request").await;
    b.hang.store(true, Ordering::SeqCst);
    let a = send(orders_port, "GET", "/t/hang", Bytes::new()).await;
    b.hang.store(false, Ordering::SeqCst);
    assert_eq!(a.status, 504, "{a:?}");
    assert!(a.took >= Duration::from_millis(500) && a.took < Duration::from_secs(10), "{:?}", a.took);
    assert_eq!(timeouts("request").await, before + 1.0);
    // perTryTimeout: one stock instance hangs, the other answers: 200, tried twice.
    stock_a.behaviour.hang.store(true, Ordering::SeqCst);
    let mut tries = Vec::new();
    let stock_calls = 5;
    for _ in 0..stock_calls {
        let a = send(stock_port, "GET", "/hello", Bytes::new()).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.took < Duration::from_secs(5), "{a:?}");
        tries.push(a.attempts);
    }
    stock_a.behaviour.hang.store(false, Ordering::SeqCst);
    assert!(tries.contains(&Some(2)), "a try on the hung instance timed out and the next went to the other: {tries:?}");
    assert!(timeouts("try").await >= 1.0);
    assert!(stock_a.behaviour.received("GET") >= 1);

    // (e) A rate limit's 429 is not retried: every request reached the
    // callee's sidecar once, and only those admitted reached the app.
    m.apply(&orders_sc, "rate-limit", RATE_LIMIT).await;
    let inbound_4xx = || orders_sc.metric("palisade_requests_total{direction=\"inbound\",status_class=\"4xx\"}");
    let (before_4xx, before_app) = (inbound_4xx().await.unwrap_or(0.0), b.received("GET"));
    let mut limited = 0;
    for _ in 0..8 {
        let a = send(orders_port, "GET", "/hello", Bytes::new()).await;
        if a.status == 429 {
            assert_eq!(a.attempts, None, "one try: no header {a:?}");
            limited += 1;
        } else {
            assert_eq!(a.status, 200, "{a:?}");
        }
    }
    assert!(limited >= 4, "burst 3: {limited} of 8 limited");
    assert_eq!(b.received("GET") - before_app, 8 - limited);
    assert_eq!(inbound_4xx().await.unwrap_or(0.0) - before_4xx, limited as f64, "no 429 was tried again");

    // (f) grpc-timeout is honoured by the caller's sidecar. The call is
    // made with plain HTTP/2, as tonic's client would end it itself: only
    // the header says 300 ms; the app would take 10 s.
    let started = Instant::now();
    let (code, from_sidecar) = tokio::time::timeout(Duration::from_secs(8), grpc_slow(echo_port, 10_000, "300m"))
        .await
        .expect("the deadline ends it");
    let took = started.elapsed();
    assert_eq!((code, from_sidecar), (Some(4), true), "DEADLINE_EXCEEDED from the sidecar");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "{took:?}");
    eventually("the app's slow handler is abandoned", Duration::from_secs(5), || async {
        (grpc.slow_aborted.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await
    .unwrap();

    // (c) A total outage of stock: the extra requests reaching the apps
    // stay within the budget (20% of the requests plus 10 a second over
    // its 10 s window), though the route allows 3 tries.
    stock_a.behaviour.fail(100, 503);
    stock_b.behaviour.fail(100, 503);
    let count = || stock_a.requests.load(Ordering::SeqCst) + stock_b.requests.load(Ordering::SeqCst);
    let before = count();
    let n = 600;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut c = crate::dataplane::h1_client(stock_port).await;
                let mut statuses = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < n {
                    let req = http::Request::get("/hello").header("host", "stock").body(Full::default()).unwrap();
                    let resp = c.send_request(req).await.unwrap();
                    statuses.push(resp.status().as_u16());
                    let _ = resp.into_body().collect().await;
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.unwrap());
    }
    let secs = started.elapsed().as_secs() + 1;
    assert_eq!(statuses.len(), n);
    assert!(statuses.iter().all(|s| *s == 503), "the outage shows: {:?}", &statuses[..10]);
    let extra = count() - before - n;
    // The floor is 10 a second over any 10 s window: 100 per window begun.
    let bound = (n + stock_calls) * 20 / 100 + 100 * secs.div_ceil(10) as usize;
    println!("outage: {n} calls in {secs} s, {extra} extra requests at the apps, budget bound {bound}");
    assert!(extra > 0, "retries were tried");
    assert!(extra <= bound, "{extra} extra requests over {secs} s for {n} calls: the budget allows {bound}");

    // (b, last: orders has its own budget) A POST is retried, whole, when its
    // route says so (nonIdempotent): streamed (chunked), and of a declared length.
    b.fail(50, 503);
    let (status, attempts, echoed) = send_chunked(orders_port, &["part1-", "part2"]).await;
    assert_eq!((status, attempts, b.received("POST")), (200, Some(2), 3));
    assert_eq!(echoed["body"], "part1-part2", "{echoed}");
    let sent = Bytes::from("0123456789abcdef".repeat(512));
    b.fail(50, 503);
    let a = send(orders_port, "POST", "/echo", sent.clone()).await;
    assert_eq!((a.status, a.attempts, b.received("POST")), (200, Some(2), 5), "{a:?}");
    let echoed: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(echoed["body"].as_str().map(str::len), Some(sent.len()), "the retry carried the whole body");
    assert_eq!(echoed["body"], String::from_utf8_lossy(&sent).as_ref());
    // A body larger than the route keeps (maxBodyBytes) is not sent again.
    b.fail(50, 503);
    let a = send(orders_port, "POST", "/echo", Bytes::from(vec![b'x'; 32 << 10])).await;
    assert_eq!((a.status, a.attempts, b.received("POST")), (503, None, 6), "{a:?}");
    b.fail(0, 503);
}
