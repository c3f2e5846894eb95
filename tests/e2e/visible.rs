//! Resilience made visible, through real sidecars: the tries of a retried
//! call in both access logs, the caller's balancer view at `/endpoints`, in
//! `/metrics` and in `palisadectl stat --endpoints`; and the attempt header,
//! which only a peer sidecar may set, never reaching the app.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dataplane::{ORDERS, WEB, h1_client, pair};

/// An app whose `/flaky` answers 503 to every other request (the first of
/// each pair), `/slow` after a second, anything else 200; it notes whether
/// any request carried `x-palisade-attempt`.
struct App {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
    saw_attempt: Arc<AtomicBool>,
}

impl App {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (requests, saw_attempt) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (n, saw) = (requests.clone(), saw_attempt.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (n, saw) = (n.clone(), saw.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (n, saw) = (n.clone(), saw.clone());
                        async move {
                            if req.headers().keys().any(|k| k.as_str().replace('_', "-").contains("palisade-attempt")) {
                                saw.store(true, Ordering::SeqCst);
                            }
                            let count = n.fetch_add(1, Ordering::SeqCst);
                            let status = match req.uri().path() {
                                "/flaky" if count % 2 == 0 => 503,
                                "/slow" => {
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                    200
                                }
                                _ => 200,
                            };
                            let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            // A callee cannot say how many tries a call took.
                            r.headers_mut().insert("x-palisade-attempts", "99".parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, requests, saw_attempt }
    }
}

/// The access-log lines (JSON on stderr) of a sidecar that match `pred`.
fn access_lines(sc: &Sidecar, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    sc.proc
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(|v| v.get("duration_ms").is_some() && pred(v))
        .collect()
}

#[tokio::test]
async fn a_retried_call_shows_its_tries_and_the_callers_endpoints() {
    let app = App::start().await;
    let p = pair(
        app.addr,
        &[],
        &["--access-log", "--report-interval", "1s"],
        &["--access-log", "--report-interval", "1s", "--response-timeout", "300ms"],
    )
    .await;
    // GET /flaky: a 503, retried once (the default route retries 503 for
    // idempotent methods), then 200.
    let mut c = h1_client(p.port).await;
    let req = hyper::Request::get("/flaky").header("host", "orders.shop").body(Full::new(Bytes::new())).unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-palisade-attempts"], "2");
    let _ = resp.into_body().collect().await;
    assert_eq!(app.requests.load(Ordering::SeqCst), 2);
    assert!(!app.saw_attempt.load(Ordering::SeqCst), "the attempt header is between sidecars only");

    // The callee's line of the second try says so, the first's does not; the caller's counts both.
    let flaky = |v: &serde_json::Value| v["path"] == "/flaky";
    let inbound = eventually("the callee's two lines", Duration::from_secs(5), || async {
        let l = access_lines(&p.server, |v| flaky(v) && v["direction"] == "inbound");
        (l.len() == 2).then_some(l)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", p.server.proc.logs()));
    assert_eq!(inbound.iter().map(|v| v.get("attempt").cloned()).collect::<Vec<_>>(), [None, Some(2.into())]);
    let outbound = eventually("the caller's line", Duration::from_secs(5), || async {
        access_lines(&p.client, |v| flaky(v) && v["direction"] == "outbound").pop()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", p.client.proc.logs()));
    assert_eq!((outbound["attempts"].as_u64(), outbound["status"].as_u64()), (Some(2), Some(200)), "{outbound}");
    assert!(outbound.get("error").is_none(), "{outbound}");

    // A call that outlives --response-timeout: 504, and the caller's line says why.
    let req = hyper::Request::get("/slow").header("host", "orders.shop").body(Full::new(Bytes::new())).unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 504);
    let _ = resp.into_body().collect().await;
    let slow = eventually("the caller's line of the timeout", Duration::from_secs(5), || async {
        access_lines(&p.client, |v| v["path"] == "/slow" && v["direction"] == "outbound").pop()
    })
    .await
    .unwrap();
    assert_eq!((slow["status"].as_u64(), slow["error"].as_str()), (Some(504), Some("timeout")), "{slow}");

    // The caller's balancer: one endpoint, three tries (one failed, one timed out), one retry.
    let (status, body) = p.client.get("/endpoints").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let svc = &v["services"][0];
    assert_eq!((svc["service"].as_str(), svc["retries"].as_u64()), (Some("orders.shop"), Some(1)), "{v}");
    let ep = &svc["endpoints"][0];
    assert_eq!(
        (ep["identity"].as_str(), ep["requests"].as_u64(), ep["failures"].as_u64()),
        (Some(ORDERS), Some(3), Some(2)),
        "{v}"
    );
    assert_eq!(ep["addr"].as_str(), Some(p.server.inbound.as_str()), "{v}");
    let (_, metrics) = p.client.get("/metrics").await.unwrap();
    let labels = format!(r#"{{service="orders.shop",endpoint="{}",identity="{ORDERS}"}}"#, p.server.inbound);
    for line in [
        r#"palisade_retries_total{service="orders.shop"} 1"#.to_string(),
        format!("palisade_endpoint_requests_total{labels} 3"),
        format!("palisade_endpoint_failures_total{labels} 2"),
        format!("palisade_endpoint_requests_in_flight{labels} 0"),
        r#"palisade_outbound_timeouts_total{kind="request"} 1"#.to_string(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in:\n{metrics}");
    }

    // The same view through the control plane.
    let out = p.cp.ctl(&["stat", "--workload", WEB, "--endpoints", "--wait", "10s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("ENDPOINTS of {WEB} at {}", p.client.inbound)), "{text}");
    let row = text.lines().find(|l| l.starts_with("orders.shop")).unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cols[1], cols[4], cols[5], cols[6]), (p.server.inbound.as_str(), "3", "2", "ok"), "{row}");
    assert!(text.contains("RETRIES orders.shop: 1 sent, 0 refused by the budget"), "{text}");
    let out = p.cp.ctl(&["stat", "--workload", WEB, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["callers"][0]["services"][0]["endpoints"][0]["requests"], 3, "{v}");
    // Without --endpoints the table stays short.
    let out = p.cp.ctl(&["stat", "--workload", WEB]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ENDPOINTS"));

    // One try: no attempts header, whatever the callee or the caller's app says.
    let req = hyper::Request::get("/once")
        .header("host", "orders.shop")
        .header("x-palisade-attempts", "5")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h1_client(p.port).await.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-palisade-attempts").is_none(), "the callee's 99 was passed on: {resp:?}");
    let _ = resp.into_body().collect().await;
    assert!(!app.saw_attempt.load(Ordering::SeqCst), "the caller's app's attempts header reached the callee");
}

/// A plaintext caller (PERMISSIVE) cannot pass itself off as a retry: its
/// `x-palisade-attempt` is neither logged nor handed to the app.
#[tokio::test]
async fn attack_a_plaintext_callers_attempt_header_is_dropped_and_not_logged() {
    let app = App::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let server = Sidecar::meshed(
        "server",
        &cp,
        tmp.path(),
        ORDERS,
        &["--app", &app.addr.to_string(), "--mtls-mode", "permissive", "--access-log"],
    )
    .await
    .unwrap();
    let f = tmp.path().join(format!("p{}.yaml", free_port()));
    std::fs::write(&f, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n  action: ALLOW\n  rules:\n    - from: [{unauthenticated: true}]\n").unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "--wait", "10s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut tcp = tokio::net::TcpStream::connect(&server.inbound).await.unwrap();
    tcp.write_all(b"GET /forged HTTP/1.1\r\nHost: orders\r\nx-palisade-attempt: 7\r\nX-Palisade-Attempt: 9\r\nx_palisade_attempt: 5\r\nx-palisade-attempts: 3\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(app.requests.load(Ordering::SeqCst), 1);
    assert!(!app.saw_attempt.load(Ordering::SeqCst), "a forged attempt header reached the app");
    let line = eventually("the request's line", Duration::from_secs(5), || async {
        access_lines(&server, |v| v["path"] == "/forged").pop()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", server.proc.logs()));
    assert!(line.get("caller").is_none(), "plaintext: {line}");
    assert!(line.get("attempt").is_none(), "a plaintext caller's claim is not logged: {line}");
}
