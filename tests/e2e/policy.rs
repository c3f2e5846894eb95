//! Policy end to end: applied with palisadectl, pushed by the control plane,
//! enforced by the callee's real sidecar.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dataplane::{ORDERS, WEB};

const INVOICES: &str = "spiffe://cluster.local/ns/billing/sa/invoices";

struct Mesh {
    tmp: tempfile::TempDir,
    cp: ControlPlane,
    server: Sidecar,
    web: Sidecar,
    web_port: u16,
    invoices: Sidecar,
    invoices_port: u16,
}

async fn mesh(app: std::net::SocketAddr) -> Mesh {
    mesh_with(app, &[]).await
}

/// [`mesh`] with more flags for the server sidecar.
async fn mesh_with(app: std::net::SocketAddr, server_args: &[&str]) -> Mesh {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let app = app.to_string();
    let server = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &[&["--app", &app][..], server_args].concat())
        .await
        .unwrap();
    let (web_port, invoices_port) = (free_port(), free_port());
    let web =
        Sidecar::meshed("web", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{web_port}=orders.shop")])
            .await
            .unwrap();
    let invoices = Sidecar::meshed(
        "invoices",
        &cp,
        tmp.path(),
        INVOICES,
        &["--upstream", &format!("127.0.0.1:{invoices_port}=orders.shop")],
    )
    .await
    .unwrap();
    Mesh { tmp, cp, server, web, web_port, invoices, invoices_port }
}

impl Mesh {
    /// Applies YAML with palisadectl and waits until the server sidecar runs it.
    async fn apply(&self, name: &str, yaml: &str) -> serde_json::Value {
        self.apply_at(&self.server, name, yaml).await
    }

    /// Applies YAML with palisadectl and waits until `sidecar` runs it.
    async fn apply_at(&self, sidecar: &Sidecar, name: &str, yaml: &str) -> serde_json::Value {
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
        v
    }

    fn check(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["authz", "check", "-o", "json"];
        all.extend_from_slice(args);
        let out = self.cp.ctl(&all);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Sends one request, returns the status line and the head.
async fn call(port: u16, method: &str, path: &str, extra: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let body = if method == "POST" { "content-length: 0\r\n" } else { "" };
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: orders\r\n{extra}{body}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

const ALLOW_WEB: &str = r#"apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: web-reads-api, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://cluster.local/ns/shop/sa/web"]}]
      to: [{methods: ["GET"], paths: ["/api/*", "/echo"]}]
      when: [{header: "x-tenant", values: ["acme"]}]
---
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: billing-reads, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: ALLOW
  rules:
    - from: [{namespaces: ["billing"]}]
      to: [{methods: ["GET"], paths: ["/hello"]}]
"#;

#[tokio::test]
async fn authorization_is_enforced_by_the_callees_sidecar() {
    let app = HttpApp::start().await;
    let m = mesh(app.addr).await;
    let t = "x-tenant: acme\r\n";

    // Nothing allows yet: the mesh default denies.
    assert_eq!(status(&call(m.web_port, "GET", "/api/items", t).await), 403);
    let v = m.check(&["--from", WEB, "--to", ORDERS, "--method", "GET", "--path", "/api/items"]);
    assert_eq!((v["decision"].as_str(), v["policy"].is_null(), v["rule"].is_null()), (Some("deny"), true, true), "{v}");
    assert!(v["reason"].as_str().unwrap().contains("mesh default"));

    m.apply("allow", ALLOW_WEB).await;
    let resp = call(m.web_port, "GET", "/echo", t).await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert!(resp.contains(WEB), "the app still learns the caller: {resp}");
    for (what, method, path, extra) in [
        ("no header", "GET", "/api/items", ""),
        ("wrong header", "GET", "/api/items", "x-tenant: evil\r\n"),
        ("method", "POST", "/api/items", t),
        ("path", "GET", "/admin", t),
    ] {
        let resp = call(m.web_port, method, path, extra).await;
        assert_eq!(status(&resp), 403, "{what}: {resp}");
        assert!(!resp.contains("web-reads-api"), "the caller is not told which policy: {resp}");
    }
    // By namespace: billing may GET /hello, not /echo.
    assert_eq!(status(&call(m.invoices_port, "GET", "/hello", "").await), 200);
    assert_eq!(status(&call(m.invoices_port, "GET", "/echo", t).await), 403);
    let v = m.check(&["--from", INVOICES, "--to", ORDERS, "--path", "/hello"]);
    assert_eq!(
        (v["decision"].as_str(), v["policy"].as_str(), v["rule"].as_i64()),
        (Some("allow"), Some("shop/billing-reads"), Some(0))
    );

    // DENY beats ALLOW.
    m.apply("deny", "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-secrets, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/*\"]}\n  action: DENY\n  rules:\n    - to: [{paths: [\"/api/secret*\"]}]\n").await;
    assert_eq!(status(&call(m.web_port, "GET", "/api/secret/x", t).await), 403);
    assert_eq!(status(&call(m.web_port, "GET", "/api/items", t).await), 404, "allowed, and the app has no such path");
    let v = m.check(&["--from", WEB, "--to", ORDERS, "--path", "/api/secret/x", "--header", "x-tenant=acme"]);
    assert_eq!(
        (v["decision"].as_str(), v["policy"].as_str(), v["rule"].as_i64()),
        (Some("deny"), Some("shop/no-secrets"), Some(0)),
        "{v}"
    );

    // gRPC callers get grpc-status 7.
    let resp = call(m.web_port, "POST", "/pkg.Svc/Method", "content-type: application/grpc\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200") && resp.contains("grpc-status: 7"), "{resp}");

    // AUDIT never blocks; it is counted and logged.
    m.apply("audit", "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: trial, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: AUDIT\n  rules:\n    - from: [{namespaces: [\"billing\"]}]\n").await;
    assert_eq!(status(&call(m.web_port, "GET", "/echo", t).await), 200);
    assert!(
        m.server
            .metric("palisade_policy_decisions_total{action=\"audit_deny\",policy=\"shop/web-reads-api\"}")
            .await
            .unwrap()
            >= 1.0
    );
    assert!(
        m.server.proc.logs().lines().any(|l| l.contains("audit") && l.contains("audit_deny")),
        "{}",
        m.server.proc.logs()
    );
    // Every field of every log line is a plain value: an identity is
    // `src.identity="spiffe://..."`, never `Some("spiffe://...")`.
    let logs = m.server.proc.logs();
    assert!(logs.contains(&format!("src.identity=\"{WEB}\"")), "{logs}");
    for l in logs.lines().chain(m.cp.proc.logs().lines()) {
        assert!(!l.contains("=Some(") && !l.contains("=None"), "a Debug Option in a log line: {l}");
    }
    assert!(
        m.server
            .proc
            .logs()
            .lines()
            .any(|l| l.contains("audit") && l.contains("decision=\"deny\"") && l.contains("shop/no-secrets"))
    );

    // The control plane knows what every proxy runs.
    let proxies: serde_json::Value = serde_json::from_slice(&m.cp.ctl(&["proxies", "-o", "json"]).stdout).unwrap();
    for p in proxies.as_array().unwrap() {
        assert_eq!(p["sync_state"], "synced", "{p}");
    }
    let _ = (&m.web, &m.invoices, app.requests.load(Ordering::SeqCst));
}

#[tokio::test]
async fn rate_limits_admit_the_configured_rate_with_ratelimit_headers() {
    let app = HttpApp::start().await;
    let m = mesh(app.addr).await;
    m.apply("allow-all", "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: shop}\nspec:\n  target: {identities: [\"*\"]}\n  action: ALLOW\n  rules:\n    - from: [{namespaces: [\"*\"]}]\n").await;
    m.apply("limit", "apiVersion: palisade.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: per-caller, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  limits:\n    - name: hello\n      match: {paths: [\"/hello\"]}\n      key: identity\n      algorithm: token_bucket\n      rate: 40\n      period: 1s\n      burst: 10\n").await;
    // ~150 requests/s for 3 s on one keep-alive connection.
    let tcp = TcpStream::connect(("127.0.0.1", m.web_port)).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let (mut ok, mut limited, mut other) = (0u32, 0u32, 0u32);
    let mut headers = None;
    let start = Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        let due = start + Duration::from_micros(6_667) * i;
        tokio::time::sleep_until(due.into()).await;
        i += 1;
        let req = hyper::Request::get("/hello")
            .header("host", "orders")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = s.send_request(req).await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                headers.get_or_insert_with(|| r.headers().clone());
            }
            _ => other += 1,
        }
        http_body_util::BodyExt::collect(r.into_body()).await.unwrap();
    }
    // The burst of 10 first, then the rate (a burst absorbs scheduling stalls of the client).
    let rate = f64::from(ok - 10) / start.elapsed().as_secs_f64();
    assert_eq!(other, 0);
    assert!(
        (rate - 40.0).abs() <= 4.0,
        "admitted {ok} in {:?} = {rate:.1}/s for a 40/s limit ({limited} limited)",
        start.elapsed()
    );
    let h = headers.expect("some requests were limited");
    assert!(h.get("retry-after").and_then(|v| v.to_str().ok()).is_some_and(|v| v.parse::<u64>().is_ok()), "{h:?}");
    assert_eq!(h["ratelimit-policy"], "\"hello\";q=40;w=1");
    assert_eq!(h["retry-after"], "1", "a token comes back within 25 ms, announced as 1 s");
    assert!(h["ratelimit"].to_str().unwrap().starts_with("\"hello\";r=0;t="), "{h:?}");
    // Keyed by identity: invoices has its own budget.
    assert_eq!(status(&call(m.invoices_port, "GET", "/hello", "").await), 200);
    assert!(
        m.server.metric("palisade_rate_limited_requests_total{policy=\"shop/per-caller\"}").await.unwrap()
            >= f64::from(limited)
    );
    let v = m.check(&["--from", WEB, "--to", ORDERS, "--path", "/hello"]);
    assert!(v["rate_limits"][0].as_str().unwrap().contains("shop/per-caller/hello"), "{v}");
}

#[tokio::test]
async fn live_updates_apply_within_a_second_and_the_control_plane_can_die() {
    let app = HttpApp::start().await;
    let mut m = mesh(app.addr).await;
    m.apply("allow", ALLOW_WEB).await;
    // Traffic on one keep-alive connection, in the background, recording every outcome.
    let port = m.web_port;
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, u16)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
            tokio::spawn(conn);
            while !stop.load(Ordering::SeqCst) {
                let req = hyper::Request::get("/api/items")
                    .header("host", "orders")
                    .header("x-tenant", "acme")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let code = match s.send_request(req).await {
                    Ok(r) => {
                        let c = r.status().as_u16();
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        c
                    }
                    Err(_) => 0,
                };
                log.lock().unwrap().push((Instant::now(), code));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually("traffic flows", Duration::from_secs(5), || async { (log.lock().unwrap().len() > 20).then_some(()) })
        .await
        .unwrap();

    // Kill the control plane outright: allowed traffic keeps flowing.
    let mark = log.lock().unwrap().len();
    m.cp.proc.child.kill().unwrap();
    m.cp.proc.child.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let port_cp = m.cp.port;
    let data = m.cp.data_dir.clone();
    m.cp = ControlPlane::start_on(port_cp, &data, m.tmp.path(), &[]).await.unwrap();
    eventually("sidecars resync", Duration::from_secs(15), || async {
        let proxies: serde_json::Value = serde_json::from_slice(&m.cp.ctl(&["proxies", "-o", "json"]).stdout).ok()?;
        proxies.as_array()?.iter().all(|p| p["sync_state"] == "synced").then_some(())
    })
    .await
    .unwrap();
    {
        let after: Vec<u16> = log.lock().unwrap()[mark..].iter().map(|(_, c)| *c).collect();
        assert!(
            after.len() > 100 && after.iter().all(|c| *c == 404),
            "allowed requests must not fail during the outage: {:?}",
            after.iter().filter(|c| **c != 404).collect::<Vec<_>>()
        );
    }

    // A DENY applied under traffic takes effect within a second; nothing fails otherwise.
    let f = m.tmp.path().join("deny.yaml");
    std::fs::write(&f, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: stop-web, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n").unwrap();
    let out = m.cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]);
    let applied = Instant::now();
    assert!(out.status.success());
    let first_403 = eventually("deny takes effect", Duration::from_secs(5), || async {
        log.lock().unwrap().iter().find(|(t, c)| *t > applied && *c == 403).map(|(t, _)| *t)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    let took = first_403 - applied;
    assert!(took < Duration::from_secs(1), "policy took {took:?} to apply");
    let codes: Vec<u16> = log.lock().unwrap().iter().map(|(_, c)| *c).collect();
    assert!(
        codes.iter().all(|c| *c == 404 || *c == 403),
        "no request may fail: {:?}",
        codes.iter().filter(|c| **c != 404 && **c != 403).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn an_invalid_snapshot_is_nacked_and_the_previous_policy_stays() {
    let app = HttpApp::start().await;
    let mut m = mesh(app.addr).await;
    m.apply("allow", ALLOW_WEB).await;
    // Force an invalid resource into the store behind the control plane's back.
    m.cp.proc.terminate(Duration::from_secs(10)).unwrap();
    // The file store is state.json plus an append-only journal: one more line.
    let bad = serde_json::json!({"kind": "RateLimitPolicy", "apiVersion": "palisade.dev/v1", "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {"target": {"identities": ["spiffe://cluster.local/ns/shop/sa/orders"]}, "limits": [{"name": "x", "algorithm": "token_bucket", "rate": 0, "period": "1s"}]}});
    let record =
        serde_json::json!({"kind": "RateLimitPolicy", "key": "shop/broken", "revision": 99, "json": bad.to_string()});
    let line = serde_json::json!({"ops": [{"put": {"policy": record}}, {"policy_revision": 99}]});
    let mut journal =
        std::fs::OpenOptions::new().append(true).create(true).open(m.cp.data_dir.join("state.journal")).unwrap();
    std::io::Write::write_all(&mut journal, format!("{line}\n").as_bytes()).unwrap();
    let (port, data) = (m.cp.port, m.cp.data_dir.clone());
    m.cp = ControlPlane::start_on(port, &data, m.tmp.path(), &[]).await.unwrap();
    let server_addr = m.server.inbound.clone();
    let nacked = eventually("the server sidecar NACKs", Duration::from_secs(15), || async {
        let proxies: serde_json::Value = serde_json::from_slice(&m.cp.ctl(&["proxies", "-o", "json"]).stdout).ok()?;
        proxies
            .as_array()?
            .iter()
            .find(|p| p["inbound_addr"] == server_addr.as_str() && p["sync_state"] == "nacked")
            .cloned()
    })
    .await
    .unwrap();
    assert!(nacked["last_nack"].as_str().unwrap().contains("rate"), "{nacked}");
    let table = String::from_utf8(m.cp.ctl(&["proxies"]).stdout).unwrap();
    assert!(table.contains("nacked:"), "{table}");
    assert!(m.server.metric("palisade_policy_nacks_total").await.unwrap() >= 1.0);
    // The previous policy is still enforced.
    assert_eq!(status(&call(m.web_port, "GET", "/echo", "x-tenant: acme\r\n").await), 200);
    assert_eq!(status(&call(m.web_port, "GET", "/echo", "").await), 403);
}

#[tokio::test]
async fn tcp_connections_are_authorized_by_identity() {
    let echo_app = palisade_tests::apps::tcp_echo().await;
    let m = mesh_with(echo_app, &["--access-log", "--opaque-port", &echo_app.port().to_string()]).await;
    m.apply("tcp", "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-only, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n").await;
    let talk = |port: u16| async move {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"\x00binary").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    };
    assert_eq!(talk(m.web_port).await, b"echo:\x00binary");
    assert_eq!(talk(m.invoices_port).await, b"", "invoices is not allowed: the connection closes");
    // The access log has one line for the connection, with its bytes both ways.
    let line = eventually("the TCP access line", Duration::from_secs(5), || async {
        m.server
            .proc
            .logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["direction"] == "inbound")
    })
    .await
    .unwrap();
    assert_eq!(
        (line["caller"].as_str(), line["bytes_in"].as_u64(), line["bytes_out"].as_u64()),
        (Some("spiffe://cluster.local/ns/shop/sa/web"), Some(7), Some(12)),
        "{line}"
    );
    assert!(line.get("method").is_none() && line.get("status").is_none(), "{line}");
}

#[tokio::test]
async fn a_cluster_scope_limit_is_shared_by_the_replicas() {
    let app = HttpApp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--default-policy", "allow-authenticated"])
        .await
        .unwrap();
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(
            Sidecar::meshed(&format!("orders-{i}"), &cp, tmp.path(), ORDERS, &["--app", &app.addr.to_string()])
                .await
                .unwrap(),
        );
    }
    let port = free_port();
    // The shares add up to the rate when the caller spreads its requests
    // evenly (round robin); latency-aware balancing may leave a share unused
    // (docs/resilience.md), which this test is not about.
    let upstream = format!("127.0.0.1:{port}=orders.shop");
    let web = Sidecar::meshed("web", &cp, tmp.path(), WEB, &["--upstream", &upstream, "--balance", "round-robin"])
        .await
        .unwrap();
    eventually("web sees the 3 replicas", Duration::from_secs(10), || async {
        (web.metric("palisade_directory_endpoints").await? >= 3.0).then_some(())
    })
    .await
    .unwrap();
    let f = tmp.path().join("limit.yaml");
    std::fs::write(&f, "apiVersion: palisade.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: shared, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  limits:\n    - name: all\n      key: none\n      algorithm: token_bucket\n      rate: 60\n      period: 1s\n      burst: 5\n      scope: cluster\n").unwrap();
    assert!(cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]).status.success());
    for r in &replicas {
        eventually("replica runs the limit", Duration::from_secs(5), || async {
            (r.config().await?["policy_version"] == "r1").then_some(())
        })
        .await
        .unwrap();
    }
    // Let every replica receive its share (the quota divided by 3) before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let (mut ok, start) = (0u32, Instant::now());
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep_until((start + Duration::from_micros(5_000) * i).into()).await;
        i += 1;
        let req = hyper::Request::get("/hello")
            .header("host", "orders")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = s.send_request(req).await.unwrap();
        if r.status() == 200 {
            ok += 1;
        }
        http_body_util::BodyExt::collect(r.into_body()).await.unwrap();
    }
    // Each replica first admits its burst of 5, then its share of the rate.
    let rate = f64::from(ok - 15) / start.elapsed().as_secs_f64();
    let mut limits = Vec::new();
    for r in &replicas {
        limits.push(r.config().await.unwrap()["rate_limits"].clone());
    }
    assert!(
        (rate - 60.0).abs() <= 6.0,
        "3 replicas admitted {rate:.1}/s in total for a cluster quota of 60/s; limits {limits:?}"
    );
    // A replica goes away: the quota is re-divided among the two left.
    let gone = replicas.pop().unwrap();
    drop(gone);
    eventually("shares re-divided", Duration::from_secs(10), || async {
        (replicas[0].config().await?["rate_limits"][0]["rate"] == 30).then_some(())
    })
    .await
    .unwrap();
}

/// TrafficPolicy at the callee: request headers rewritten with the caller's
/// identity, security headers on the app's answers and on the sidecar's own
/// refusals, leaks removed; the identity headers stay Palisade's.
#[tokio::test]
async fn traffic_policies_rewrite_headers_and_add_security_headers() {
    let app = HttpApp::start().await;
    let m = mesh(app.addr).await;
    m.apply("allow", ALLOW_WEB).await;
    let tp = r#"apiVersion: palisade.dev/v1
kind: TrafficPolicy
metadata: {name: orders-headers, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  requestHeaders:
    set: {x-caller: "${caller}", x-request-id: "${request_id}"}
    remove: [x-debug]
  responseHeaders:
    add: {x-served-by: orders}
  securityHeaders:
    hsts: true
    contentTypeOptions: true
    frameOptions: DENY
    contentSecurityPolicy: {value: "default-src 'self'", always: true}
    referrerPolicy: no-referrer
    removeServerHeaders: true
"#;
    m.apply("traffic", tp).await;
    let t = "x-tenant: acme\r\nx-debug: 1\r\n";
    let r = call(m.web_port, "GET", "/echo", t).await;
    assert_eq!(status(&r), 200, "{r}");
    let body: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let h = &body["headers"];
    assert_eq!(h["x-caller"], "spiffe://cluster.local/ns/shop/sa/web");
    assert!(h.get("x-debug").is_none(), "{h}");
    assert_eq!(h["x-request-id"].as_str().map(str::len), Some(24), "a fresh request id: {h}");
    let head = r.to_ascii_lowercase();
    for want in [
        "strict-transport-security: max-age=31536000; includesubdomains",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "content-security-policy: default-src 'self'",
        "referrer-policy: no-referrer",
        "x-served-by: orders",
    ] {
        assert!(head.contains(want), "{want}: {r}");
    }
    // The app's own header is kept unless the policy says always; leaks go.
    let r = call(m.web_port, "GET", "/api/leaky", t).await.to_ascii_lowercase();
    assert_eq!(status(&r), 200, "{r}");
    assert!(!r.contains("server: apache") && !r.contains("x-powered-by"), "{r}");
    assert!(r.contains("x-frame-options: allowall") && !r.contains("x-frame-options: deny"), "the app's own: {r}");
    assert!(r.contains("content-security-policy: default-src 'self'"), "always: {r}");
    let r2 = call(m.web_port, "GET", "/leaky", t).await.to_ascii_lowercase();
    assert_eq!(status(&r2), 403, "not allowed by the ALLOW rule: {r2}");
    assert!(r2.contains("strict-transport-security:") && r2.contains("x-served-by: orders"), "refusals too: {r2}");
    assert!(r2.contains("cache-control: no-store"), "a refusal is never cached: {r2}");
    // authz check lists the changes the sidecar makes.
    let c = m.check(&["--from", WEB, "--to", ORDERS, "--path", "/echo", "--header", "x-tenant=acme"]);
    let req: Vec<&str> = c["request_changes"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(
        req.contains(&"remove x-debug") && req.contains(&"set x-caller: spiffe://cluster.local/ns/shop/sa/web"),
        "{c}"
    );
    let resp = c["response_changes"].to_string();
    assert!(
        resp.contains("set strict-transport-security: max-age=31536000; includeSubDomains (unless the app set it)")
            && resp.contains("remove server"),
        "{c}"
    );
    // A caller's x-request-id is kept.
    let r = call(m.web_port, "GET", "/echo", "x-tenant: acme\r\nx-request-id: abc-1\r\n").await;
    assert!(r.contains("\"x-request-id\":\"abc-1\""), "{r}");
    // A policy cannot write the identity headers Palisade owns.
    let f = m.tmp.path().join("forge.yaml");
    std::fs::write(&f, tp.replace("x-caller", "x-palisade-peer-identity")).unwrap();
    let out = m.cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.requestHeaders.set.x-palisade-peer-identity"), "{err}");
}

/// TrafficPolicy validation before the app: a method not allowed is 405
/// with `Allow`, a body of another media type 415, a body over the limit 413
/// (declared, or streamed without a length); what passes reaches the app
/// byte for byte, and nothing refused reaches it at all.
#[tokio::test]
async fn traffic_policy_validation_refuses_bad_requests_before_the_app() {
    let app = HttpApp::start().await;
    let m = mesh(app.addr).await;
    let allow = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-any, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n";
    m.apply("allow", allow).await;
    let tp = "apiVersion: palisade.dev/v1\nkind: TrafficPolicy\nmetadata: {name: orders-input, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  validation: {methods: [GET, POST], contentTypes: [application/json], maxBodyBytes: 64, maxQueryParams: 3, maxQueryBytes: 40}\n";
    m.apply("validation", tp).await;
    let raw = |head: String, body: &'static [u8]| {
        let port = m.web_port;
        async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(body).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let before = app.requests.load(Ordering::SeqCst);
    let r = call(m.web_port, "DELETE", "/echo", "").await;
    assert_eq!(status(&r), 405, "{r}");
    assert!(r.to_ascii_lowercase().contains("allow: get, post"), "{r}");
    let head = |ct: &str, framing: &str| {
        format!("POST /echo HTTP/1.1\r\nHost: orders\r\ncontent-type: {ct}\r\n{framing}Connection: close\r\n\r\n")
    };
    let r = raw(head("text/plain", "content-length: 2\r\n"), b"hi").await;
    assert_eq!(status(&r), 415, "{r}");
    let big: &'static [u8] = &[b'x'; 100];
    let r = raw(head("application/json", "content-length: 100\r\n"), big).await;
    assert_eq!(status(&r), 413, "declared: {r}");
    let chunked_big: &'static [u8] = b"40\r\n0000000000000000000000000000000000000000000000000000000000000000\r\n10\r\n0000000000000000\r\n0\r\n\r\n";
    let r = raw(head("application/json", "transfer-encoding: chunked\r\n"), chunked_big).await;
    assert_eq!(status(&r), 413, "streamed: {r}");
    assert_eq!(app.requests.load(Ordering::SeqCst), before, "nothing refused reached the app");
    let r = raw(head("application/json; charset=utf-8", "content-length: 11\r\n"), b"{\"a\": [1]}\n").await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.contains(r#""body":"{\"a\": [1]}\n""#), "byte for byte: {r}");
    let r =
        raw(head("application/json", "transfer-encoding: chunked\r\n"), b"5\r\n{\"b\":\r\n3\r\n 2}\r\n0\r\n\r\n").await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.contains(r#""body":"{\"b\": 2}""#), "streamed within the limit: {r}");
    let r = call(m.web_port, "GET", "/hello", "").await;
    assert_eq!(status(&r), 200, "a GET without a body needs no content type: {r}");
    assert_eq!(status(&call(m.web_port, "GET", "/hello?a=1&b=2&c=3", "").await), 200);
    assert_eq!(status(&call(m.web_port, "GET", "/hello?a=1&b=2&c=3&d=4", "").await), 400);
    assert_eq!(status(&call(m.web_port, "GET", &format!("/hello?q={}", "x".repeat(40)), "").await), 414);
    // authz check explains it.
    let v = m.check(&[
        "--from",
        "spiffe://cluster.local/ns/shop/sa/web",
        "--to",
        "spiffe://cluster.local/ns/shop/sa/orders",
        "--method",
        "DELETE",
        "--path",
        "/echo",
    ]);
    assert_eq!(v["decision"], "invalid", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("shop/orders-input refuses it with 405"), "{v}");
    let v = m.check(&[
        "--from",
        "spiffe://cluster.local/ns/shop/sa/web",
        "--to",
        "spiffe://cluster.local/ns/shop/sa/orders",
        "--path",
        "/echo?a&b&c&d",
    ]);
    assert_eq!(v["decision"], "invalid", "{v}");
    let v = m.check(&[
        "--from",
        "spiffe://cluster.local/ns/shop/sa/web",
        "--to",
        "spiffe://cluster.local/ns/shop/sa/orders",
        "--path",
        "/echo?a=1",
    ]);
    assert_eq!(v["decision"], "allow", "{v}");
}

const CORS_POLICY: &str = "apiVersion: palisade.dev/v1\nkind: TrafficPolicy\nmetadata: {name: orders-cors, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  cors:\n    allowOrigins: [ORIGIN]\n    allowMethods: [GET, PUT]\n    allowHeaders: [x-token, content-type]\n    exposeHeaders: [x-served-by]\n    allowCredentials: true\n    maxAge: 60\n";

const ALLOW_WEB_ANY: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-any, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n";

/// CORS at the callee's sidecar, on the wire: preflights answered by the
/// sidecar (the app never sees one), Access-Control-* only for the named
/// origin, never the app's own reflection, `Vary: Origin` always.
#[tokio::test]
async fn cors_preflights_are_answered_by_the_sidecar_and_only_named_origins_allowed() {
    let app = HttpApp::start().await;
    let m = mesh(app.addr).await;
    m.apply("allow", ALLOW_WEB_ANY).await;
    m.apply("cors", &CORS_POLICY.replace("ORIGIN", "\"https://app.example.com\"")).await;
    let before = app.requests.load(Ordering::SeqCst);
    let preflight = |origin: &str, method: &str, headers: &str| {
        format!(
            "origin: {origin}\r\naccess-control-request-method: {method}\r\naccess-control-request-headers: {headers}\r\n"
        )
    };
    let r = call(m.web_port, "OPTIONS", "/echo", &preflight("https://app.example.com", "PUT", "X-Token")).await;
    let l = r.to_ascii_lowercase();
    assert_eq!(status(&r), 204, "{r}");
    for want in [
        "access-control-allow-origin: https://app.example.com",
        "access-control-allow-credentials: true",
        "access-control-allow-methods: get, put",
        "access-control-allow-headers: x-token",
        "access-control-max-age: 60",
        "vary: origin",
    ] {
        assert!(l.contains(want), "{want}: {r}");
    }
    for (origin, method, headers) in [
        ("https://evil.example.com", "PUT", "x-token"),
        ("https://app.example.com", "DELETE", ""),
        ("https://app.example.com", "PUT", "x-admin"),
    ] {
        let r = call(m.web_port, "OPTIONS", "/echo", &preflight(origin, method, headers)).await;
        assert_eq!(status(&r), 204, "{r}");
        assert!(!r.to_ascii_lowercase().contains("access-control-allow"), "{origin} {method} {headers}: {r}");
    }
    assert_eq!(app.requests.load(Ordering::SeqCst), before, "no preflight reached the app");
    // Actual requests: the named origin gets its headers; another gets none,
    // even from an app that answers `Access-Control-Allow-Origin: *` itself.
    let r = call(m.web_port, "GET", "/echo", "origin: https://app.example.com\r\n").await.to_ascii_lowercase();
    assert!(r.contains("access-control-allow-origin: https://app.example.com") && r.contains("vary: origin"), "{r}");
    assert!(r.contains("access-control-expose-headers: x-served-by"), "{r}");
    let r = call(m.web_port, "GET", "/leaky", "origin: https://evil.example.com\r\n").await.to_ascii_lowercase();
    assert_eq!(status(&r), 200, "{r}");
    assert!(!r.contains("access-control-allow-origin"), "the app's reflection is removed: {r}");
    let r = call(m.web_port, "GET", "/echo", "origin: null\r\n").await.to_ascii_lowercase();
    assert!(!r.contains("access-control-allow-origin"), "null only when named: {r}");
    // authz check gives the same CORS answers.
    let to = ["--from", WEB, "--to", ORDERS, "--path", "/echo"];
    let c = m.check(&[&to[..], &["--header", "origin=https://app.example.com"]].concat());
    assert!(
        c["cors"].as_str().unwrap_or_default().contains("access-control-allow-origin: https://app.example.com"),
        "{c}"
    );
    let c = m.check(
        &[
            &to[..],
            &[
                "--method",
                "OPTIONS",
                "--header",
                "origin=https://app.example.com",
                "--header",
                "access-control-request-method=PUT",
                "--header",
                "access-control-request-headers=x-token",
            ],
        ]
        .concat(),
    );
    let cors = c["cors"].as_str().unwrap_or_default();
    assert!(
        cors.starts_with("preflight from https://app.example.com allowed by shop/")
            && cors.contains("access-control-allow-methods: GET, PUT"),
        "{c}"
    );
    let c = m.check(&[&to[..], &["--header", "origin=https://evil.example.com"]].concat());
    assert!(c["cors"].as_str().unwrap_or_default().contains("not allowed"), "{c}");
}

/// CORS in a real browser (headless Chromium): a page from the allowed
/// origin calls the meshed API with fetch (simple, with credentials, and a
/// preflighted PUT with a custom header) and reads the answers; a page from
/// another origin is blocked by the browser, and the app never saw a preflight.
#[tokio::test]
async fn cors_in_a_real_browser() {
    let have =
        std::process::Command::new("python3").args(["-c", "import selenium"]).status().is_ok_and(|s| s.success())
            && std::path::Path::new("/usr/bin/chromium").exists()
            && std::path::Path::new("/usr/bin/chromedriver").exists();
    if !have {
        palisade_tests::skip(
            "cors_in_a_real_browser",
            "chromium, chromium-driver or selenium is missing (apt-get install chromium chromium-driver; pip install selenium)",
        );
        return;
    }
    let app = HttpApp::start().await;
    let m = mesh(app.addr).await;
    let (allowed, denied) = (free_port(), free_port());
    m.apply("allow", ALLOW_WEB_ANY).await;
    m.apply("cors", &CORS_POLICY.replace("ORIGIN", &format!("\"http://127.0.0.1:{allowed}\""))).await;
    let before = app.requests.load(Ordering::SeqCst);
    let out = tokio::process::Command::new("python3")
        .arg(palisade_tests::repo_root().join("tests/python/cors_browser.py"))
        .args(["--api", &format!("http://127.0.0.1:{}", m.web_port)])
        .args(["--allowed-port", &allowed.to_string(), "--denied-port", &denied.to_string()])
        .output()
        .await
        .unwrap();
    if out.status.code() == Some(3) {
        palisade_tests::skip("cors_in_a_real_browser", &String::from_utf8_lossy(&out.stderr));
        return;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("chromium {}: {v}", v["browser"]);
    for case in ["simple", "credentials", "preflighted_put"] {
        let r = &v["allowed"][case];
        assert_eq!(r["ok"], true, "{case}: {v}");
        assert_eq!(r["status"], 200, "{case}: {v}");
    }
    let put: serde_json::Value =
        serde_json::from_str(v["allowed"]["preflighted_put"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(put["method"], "PUT");
    assert_eq!(put["headers"]["x-token"], "t-1");
    for case in ["simple", "credentials", "preflighted_put"] {
        let r = &v["denied"][case];
        assert_eq!(r["ok"], false, "the browser blocks {case} from another origin: {v}");
    }
    // The app saw the allowed page's three requests and the denied page's two
    // simple ones (a browser sends those, then hides the answer), and no preflight.
    assert_eq!(app.requests.load(Ordering::SeqCst) - before, 5, "{v}");
}

const ORDERS_V2: &str = "spiffe://cluster.local/ns/shop/sa/orders-v2";

/// Versioned routing on the calling side: the caller's sidecar sends a
/// request by header or path prefix to another service, rewrites the
/// prefix, and splits a canary by weight; the backend's own sidecar still
/// decides whether the caller may (routing is no way around authorization);
/// `palisadectl route` shows the route a request takes.
#[tokio::test]
async fn routes_send_api_versions_and_canaries_to_named_services() {
    use http_body_util::BodyExt;
    let (v1, v2) = (HttpApp::start().await, HttpApp::start().await);
    let m = mesh(v1.addr).await;
    let _v2 =
        Sidecar::meshed("orders-v2", &m.cp, m.tmp.path(), ORDERS_V2, &["--app", &v2.addr.to_string()]).await.unwrap();
    let allow = |targets: &str| {
        format!(
            r#"apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {{name: web-calls-orders, namespace: shop}}
spec:
  target: {{identities: [{targets}]}}
  action: ALLOW
  rules: [{{from: [{{identities: ["spiffe://cluster.local/ns/shop/sa/web"]}}]}}]
"#
        )
    };
    m.apply("allow", &allow(r#""spiffe://cluster.local/ns/shop/sa/orders""#)).await;
    let routes = r#"apiVersion: palisade.dev/v1
kind: TrafficPolicy
metadata: {name: web-routes, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/web"]}
  routes:
    - match: {service: orders.shop, headers: {api-version: "2"}}
      backends: [{service: orders-v2.shop}]
    - match: {service: orders.shop, pathPrefix: /v2/}
      backends: [{service: orders-v2.shop}]
      rewritePrefix: /
    - match: {service: orders.shop, pathPrefix: /canary}
      backends: [{service: orders.shop, weight: 80}, {service: orders-v2.shop, weight: 20}]
      rewritePrefix: /echo
    - match: {service: orders.shop, pathPrefix: /slow}
      rewritePrefix: /echo
      timeout: 2s
      perTryTimeout: 500ms
      retry: {attempts: 3, on: [5xx, reset], budget: {percent: 10}}
"#;
    m.apply_at(&m.web, "routes", routes).await;
    let count = |a: &HttpApp| a.requests.load(Ordering::SeqCst);

    // No route matches: the called service.
    let r = call(m.web_port, "GET", "/echo", "").await;
    assert_eq!((status(&r), count(&v1), count(&v2)), (200, 1, 0), "{r}");
    // Routed by header to v2, whose own sidecar does not allow web yet.
    let r = call(m.web_port, "GET", "/echo", "api-version: 2\r\n").await;
    assert_eq!((status(&r), count(&v2)), (403, 0), "v2's sidecar decides: {r}");
    let want_v2 = r#""spiffe://cluster.local/ns/shop/sa/orders", "spiffe://cluster.local/ns/shop/sa/orders-v2""#;
    m.apply("allow", &allow(want_v2)).await;
    eventually("v2's sidecar allows web", Duration::from_secs(5), || async {
        (status(&call(m.web_port, "GET", "/echo", "api-version: 2\r\n").await) == 200).then_some(())
    })
    .await
    .unwrap();
    assert_eq!((count(&v1), count(&v2)), (1, 1));
    // By path prefix, rewritten: v2's app receives /echo?x=1.
    let r = call(m.web_port, "GET", "/v2/echo?x=1", "").await;
    assert_eq!((status(&r), count(&v2)), (200, 2), "{r}");
    assert!(r.contains(r#""uri":"/echo?x=1""#), "{r}");
    // An encoded spelling of the prefix takes the same route.
    let r = call(m.web_port, "GET", "/%76%32/echo", "").await;
    assert_eq!((status(&r), count(&v2)), (200, 3), "{r}");

    // A canary: 2,000 requests on one connection split 80/20 within 5 points.
    let mut c = crate::dataplane::h1_client(m.web_port).await;
    let (b1, b2) = (count(&v1), count(&v2));
    for _ in 0..2000 {
        let req = http::Request::get("/canary").header("host", "orders").body(Default::default()).unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await.unwrap();
    }
    let to_v2 = count(&v2) - b2;
    assert_eq!(count(&v1) - b1 + to_v2, 2000);
    assert!((300..=500).contains(&to_v2), "20% of 2000 within 5 points: {to_v2}");
    let metric = m.web.get("/metrics").await.unwrap().1;
    let line =
        format!(r#"palisade_routed_requests_total{{route="shop/web-routes#2",backend="orders-v2.shop"}} {to_v2}"#);
    assert!(metric.contains(&line), "{line}\n{metric}");

    // A route without backends keeps the called service (it sets timeouts and retries only).
    let before = count(&v1);
    let r = call(m.web_port, "GET", "/slow?x=2", "").await;
    assert_eq!((status(&r), count(&v1)), (200, before + 1), "{r}");
    assert!(r.contains(r#""uri":"/echo?x=2""#), "{r}");

    // palisadectl shows the route a request takes.
    let route = |args: &[&str]| {
        let mut all = vec!["route", "--from", WEB, "--to", "orders.shop", "-o", "json"];
        all.extend_from_slice(args);
        let out = m.cp.ctl(&all);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = route(&["--path", "/v2/orders/7?all=1"]);
    assert_eq!((r["policy"].as_str(), r["route"].as_i64()), (Some("shop/web-routes"), Some(1)), "{r}");
    assert_eq!(
        (r["backends"][0]["service"].as_str(), r["path"].as_str()),
        (Some("orders-v2.shop"), Some("/orders/7?all=1"))
    );
    let r = route(&["--path", "/canary/x"]);
    assert_eq!(
        r["backends"],
        serde_json::json!([{"service": "orders.shop", "weight": 80}, {"service": "orders-v2.shop", "weight": 20}])
    );
    assert_eq!(r["path"], "/echo/x");
    let r = route(&["--header", "api-version=2"]);
    assert_eq!(r["route"], 0);
    let r = route(&["--path", "/v1/x"]);
    assert_eq!((r["route"].is_null(), r["backends"][0]["service"].as_str()), (true, Some("orders.shop")), "{r}");
    // ... with the defaults: the sidecar's timeout, 2 attempts for idempotent methods, default balancing.
    assert_eq!((r["timeout"].is_null(), r["retry"]["attempts"].as_u64()), (true, Some(2)), "{r}");
    assert_eq!(r["retry"]["on"], serde_json::json!(["connect-failure", "reset", "try-timeout", "503", "unavailable"]));
    assert_eq!((r["retry"]["methodRetried"].as_bool(), r["balancing"]["warmup"].as_str()), (Some(true), Some("10s")));
    assert_eq!(
        (r["balancing"]["policy"].is_null(), r["balancing"]["ejection"]["consecutiveFailures"].as_u64()),
        (true, Some(5))
    );
    // The timeouts and retries of the route a request takes.
    let r = route(&["--path", "/slow/x", "--method", "post"]);
    assert_eq!((r["route"].as_i64(), r["backends"][0]["service"].as_str()), (Some(3), Some("orders.shop")), "{r}");
    assert!(r["reason"].as_str().unwrap().contains("(the called service)") && r["path"] == "/echo/x", "{r}");
    assert_eq!((r["timeout"].as_str(), r["perTryTimeout"].as_str()), (Some("2s"), Some("500ms")), "{r}");
    let retry = &r["retry"];
    assert_eq!((retry["attempts"].as_u64(), &retry["on"]), (Some(3), &serde_json::json!(["reset", "5xx"])), "{r}");
    assert_eq!((retry["methodRetried"].as_bool(), retry["budget"]["percent"].as_u64()), (Some(false), Some(10)), "{r}");
    let table = String::from_utf8_lossy(
        &m.cp.ctl(&["route", "--from", WEB, "--to", "orders.shop", "--path", "/slow", "--method", "POST"]).stdout,
    )
    .into_owned();
    assert!(table.contains("timeout:     2s") && table.contains("POST is not retried (not idempotent"), "{table}");
    assert!(table.contains("at most 10% of the requests + 10/s"), "{table}");
    let table = String::from_utf8_lossy(
        &m.cp.ctl(&["route", "--from", WEB, "--to", "orders.shop", "--path", "/canary"]).stdout,
    )
    .into_owned();
    assert!(table.contains("orders-v2.shop (weight 20)") && table.contains("80%"), "{table}");
    // A route to something that is not a service is refused at apply time.
    let f = m.tmp.path().join("routes.yaml");
    std::fs::write(&f, routes.replace("orders-v2.shop}]\n      rewritePrefix", "orders-v2}]\n      rewritePrefix"))
        .unwrap();
    let out = m.cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec.routes[1].backends[0].service"), "{err}");
}

/// JSON Schema validation before the app: a body that matches reaches it
/// byte for byte (declared or streamed); one that does not is 400 with an
/// RFC 9457 problem naming the field, without echoing large input; a body
/// that is not JSON is 400 or 415. Path normalisation per policy: dot
/// segments refused, encoded slashes kept; a DENY on /admin/* holds either way.
#[tokio::test]
async fn json_schema_and_path_normalisation_per_policy() {
    let app = HttpApp::start().await;
    let m = mesh(app.addr).await;
    let allow = r#"apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: web-any, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: ALLOW
  rules: [{from: [{identities: ["spiffe://cluster.local/ns/shop/sa/web"]}]}]
---
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: DENY
  rules: [{to: [{paths: ["/admin/*", "/admin"]}]}]
"#;
    m.apply("allow", allow).await;
    let tp = r#"apiVersion: palisade.dev/v1
kind: TrafficPolicy
metadata: {name: orders-schema, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  validation:
    maxBodyBytes: 2048
    pathNormalization: {dotSegments: refuse, encodedSlashes: keep}
    jsonSchema:
      type: object
      required: [item, qty]
      additionalProperties: false
      properties:
        item: {type: string, pattern: "^[a-z-]+$"}
        qty: {type: integer, minimum: 1, maximum: 100}
        note: {type: string}
"#;
    m.apply("schema", tp).await;
    let post = |ct: &str, framing: &str, body: &[u8]| {
        let (port, ct, framing, body) = (m.web_port, ct.to_string(), framing.to_string(), body.to_vec());
        async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let head = format!(
                "POST /echo HTTP/1.1\r\nHost: orders\r\ncontent-type: {ct}\r\n{framing}Connection: close\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&body).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let cl = |b: &[u8]| format!("content-length: {}\r\n", b.len());
    let before = app.requests.load(Ordering::SeqCst);
    let good = b"{ \"item\": \"green-tea\",\n  \"qty\": 2 }";
    let r = post("application/json", &cl(good), good).await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.contains(r#""body":"{ \"item\": \"green-tea\",\n  \"qty\": 2 }""#), "byte for byte: {r}");
    let r = post(
        "application/json",
        "transfer-encoding: chunked\r\n",
        b"8\r\n{\"item\":\r\n13\r\n \"tea\", \"qty\": 100}\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 200, "streamed: {r}");
    assert_eq!(app.requests.load(Ordering::SeqCst), before + 2);
    // Refusals never reach the app.
    let bad = br#"{"item": "Tea!", "qty": 0, "admin": true}"#;
    let r = post("application/json", &cl(bad), bad).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(r.to_ascii_lowercase().contains("content-type: application/problem+json"), "{r}");
    let problem: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        (problem["status"].as_u64(), problem["title"].as_str()),
        (Some(400), Some("Request body does not match the schema"))
    );
    let pointers: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().filter_map(|e| e["pointer"].as_str()).collect();
    assert!(pointers.contains(&"#/item") && pointers.contains(&"#/qty") && pointers.contains(&"#"), "{problem}");
    let long = format!(r#"{{"item": 7, "qty": 1, "note": 3, "x": "{}"}}"#, "z".repeat(1500));
    let r = post("application/json", &cl(long.as_bytes()), long.as_bytes()).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(!r.contains("zzzzzzzzzz"), "large input is not echoed: {r}");
    let r = post("application/json", &cl(b"{\"item\":"), b"{\"item\":").await;
    assert_eq!(status(&r), 400);
    assert!(r.contains("Request body is not valid JSON"), "{r}");
    let r = post("text/plain", &cl(good), good).await;
    assert_eq!(status(&r), 415, "a schema needs a JSON body: {r}");
    let huge = format!(r#"{{"item": "a", "qty": 1, "note": "{}"}}"#, "n".repeat(3000));
    let r = post(
        "application/json",
        "transfer-encoding: chunked\r\n",
        format!("{:x}\r\n{huge}\r\n0\r\n\r\n", huge.len()).as_bytes(),
    )
    .await;
    assert_eq!(status(&r), 413, "{r}");
    assert_eq!(app.requests.load(Ordering::SeqCst), before + 2, "nothing refused reached the app");

    // Paths: dot segments refused here, encoded slashes kept (one segment).
    assert_eq!(status(&call(m.web_port, "GET", "/x/../hello", "").await), 400);
    assert_eq!(status(&call(m.web_port, "GET", "/x/%2e%2e/hello", "").await), 400);
    assert_eq!(status(&call(m.web_port, "GET", "//hello", "").await), 200, "empty segments still merged");
    let seen = app.requests.load(Ordering::SeqCst);
    let r = call(m.web_port, "GET", "/repo%2fleaky", "").await;
    assert_eq!(app.requests.load(Ordering::SeqCst), seen + 1, "kept encoded, the app got it: {r}");
    assert!(status(&r) == 404 && !r.contains("x-palisade-error"), "the app's own answer: {r}");
    for p in ["/admin/x", "/%61dmin/x", "//admin/x", "/admin%2fx", "/x%2f..%2fadmin/x", "/admin%5Cx"] {
        let r = call(m.web_port, "GET", p, "").await;
        assert!([400, 403].contains(&status(&r)), "{p}: {r}");
    }
    let v = m.check(&["--from", WEB, "--to", ORDERS, "--path", "/x/../admin"]);
    assert_eq!(v["decision"], "invalid", "{v}");
    // A schema that is not one is refused at apply time.
    let f = m.tmp.path().join("bad-schema.yaml");
    std::fs::write(&f, tp.replace("type: object", "type: objekt")).unwrap();
    let out = m.cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec.validation.jsonSchema"), "{err}");
}
