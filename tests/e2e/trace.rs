//! Observability end to end: two sidecars export their request spans over
//! OTLP/gRPC to a real receiver built from the official
//! `opentelemetry-proto` definitions (PyPI, grpcio), and a client traced
//! with the OpenTelemetry Python SDK sees the sidecars' spans join its
//! trace; access logs; the Grafana dashboard; the control plane's metrics.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port, repo_root, skip};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::dataplane::{ORDERS, WEB};

fn python_ready(test: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import grpc, opentelemetry.sdk, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(
            test,
            "python3 lacks grpcio, opentelemetry-proto or opentelemetry-sdk (pip install opentelemetry-proto opentelemetry-sdk grpcio)",
        );
    }
    ok
}

/// The receiver: its port, and the spans it printed so far.
struct Collector {
    port: u16,
    spans: Arc<Mutex<Vec<serde_json::Value>>>,
    _child: tokio::process::Child,
}

impl Collector {
    async fn start(extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new("python3")
            .arg(repo_root().join("tests/python/otlp_peer.py"))
            .arg("collector")
            .args(extra)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("invariant: python3 runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port: u16 = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the collector starts")
            .unwrap()
            .expect("it prints its port")
            .trim()
            .parse()
            .unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Self { port, spans, _child: child }
    }

    /// The spans of one trace, once `n` have arrived.
    async fn trace(&self, trace_id: &str, n: usize) -> Vec<serde_json::Value> {
        self.trace_or(trace_id, n, String::new).await
    }

    /// [`trace`](Self::trace), saying what `explain` returns when they do not arrive.
    async fn trace_or(&self, trace_id: &str, n: usize, explain: impl FnOnce() -> String) -> Vec<serde_json::Value> {
        let got = eventually(&format!("{n} spans of trace {trace_id}"), Duration::from_secs(30), || async {
            let got: Vec<_> =
                self.spans.lock().unwrap().iter().filter(|s| s["trace_id"] == trace_id).cloned().collect();
            (got.len() >= n).then_some(got)
        })
        .await;
        got.unwrap_or_else(|e| {
            let all = self.spans.lock().unwrap().clone();
            panic!("{e}\nspans received: {all:?}\n{}", explain())
        })
    }
}

fn by_kind(spans: &[serde_json::Value], kind: u64) -> &serde_json::Value {
    spans.iter().find(|s| s["kind"] == kind).unwrap_or_else(|| panic!("no span of kind {kind}: {spans:?}"))
}

const CLIENT: u64 = 3;
const SERVER: u64 = 2;

/// A request that crossed two sidecars is one trace: web's client span is
/// the root (or the traced client's child), orders' server span its child,
/// and the app receives a traceparent naming orders' span. Attributes follow
/// the HTTP conventions plus caller and callee SPIFFE IDs and the decision.
/// An unsampled caller is honoured; a collector that refuses or is gone
/// fails no request, and the lost spans are counted.
#[tokio::test]
async fn request_spans_cross_two_sidecars_and_join_the_callers_trace() {
    if !python_ready("trace::request_spans_cross_two_sidecars_and_join_the_callers_trace") {
        return;
    }
    let collector = Collector::start(&[]).await;
    let otlp = format!("http://127.0.0.1:{}", collector.port);
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--default-policy", "allow-authenticated"])
        .await
        .unwrap();
    let app = HttpApp::start().await;
    let traced = ["--otlp-endpoint", &otlp, "--trace-sampling", "1", "--access-log"];
    let server =
        Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &[&["--app", &app.addr.to_string()][..], &traced].concat())
            .await
            .unwrap();
    let port = free_port();
    let web = Sidecar::meshed(
        "web",
        &cp,
        tmp.path(),
        WEB,
        &[&["--upstream", &format!("127.0.0.1:{port}=orders.shop"), "--trace-service-name", "web"][..], &traced]
            .concat(),
    )
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{port}/echo");

    // A new trace, started by web's sidecar.
    let (status, body) = palisade_tests::http::get(&format!("127.0.0.1:{port}"), "/echo").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tp = echoed["headers"]["traceparent"].as_str().expect("the app receives a traceparent").to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{tp}");
    let spans = collector
        .trace_or(parts[1], 2, || format!("--- web\n{}\n--- orders\n{}", web.proc.logs(), server.proc.logs()))
        .await;
    let (client, srv) = (by_kind(&spans, CLIENT), by_kind(&spans, SERVER));
    assert_eq!(client["parent_span_id"], "", "web's span is the root: {client}");
    assert_eq!(srv["parent_span_id"], client["span_id"], "orders' span is its child: {spans:?}");
    assert_eq!(srv["span_id"], parts[2], "the app's traceparent names orders' span");
    assert_eq!((client["service"].as_str(), srv["service"].as_str()), (Some("web"), Some("palisade-sidecar")));
    let a = &srv["attributes"];
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/echo");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["palisade.caller"], WEB);
    assert_eq!(a["palisade.callee"], ORDERS);
    assert_eq!(a["palisade.decision"], "allow");
    assert!(a["network.peer.address"].as_str().is_some_and(|s| s.starts_with("127.")), "{a}");
    assert_eq!(client["attributes"]["server.address"], "orders.shop");
    assert_eq!(client["attributes"]["http.response.status_code"], 200);

    // A client traced with the OpenTelemetry SDK: the sidecars' spans join its trace.
    let out = tokio::process::Command::new("python3")
        .arg(repo_root().join("tests/python/otlp_peer.py"))
        .args(["client", &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["status"], 200, "{c}");
    let trace_id = c["trace_id"].as_str().unwrap();
    let spans = collector
        .trace_or(trace_id, 2, || format!("--- web\n{}\n--- orders\n{}", web.proc.logs(), server.proc.logs()))
        .await;
    let (client, srv) = (by_kind(&spans, CLIENT), by_kind(&spans, SERVER));
    assert_eq!(client["parent_span_id"], c["span_id"], "web's span is a child of the client's: {spans:?}");
    assert_eq!(srv["parent_span_id"], client["span_id"]);
    let app_tp: serde_json::Value = serde_json::from_str(c["body"].as_str().unwrap()).unwrap();
    assert!(app_tp["headers"]["traceparent"].as_str().unwrap().contains(trace_id), "{app_tp}");

    // A caller that did not sample: nothing recorded, the flag passed on.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let r = tokio::process::Command::new("curl")
        .args(["-s", "-H", &format!("traceparent: {unsampled}"), &url])
        .output()
        .await
        .unwrap();
    let echoed: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let passed = echoed["headers"]["traceparent"].as_str().unwrap();
    assert!(passed.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && passed.ends_with("-00"), "{passed}");
    // A sidecar that samples no new trace still starts one, unsampled, so
    // the next hop (which would record at ratio 1) agrees not to record it.
    let port0 = free_port();
    let _web0 = Sidecar::meshed(
        "web0",
        &cp,
        tmp.path(),
        "spiffe://cluster.local/ns/billing/sa/invoices",
        &["--upstream", &format!("127.0.0.1:{port0}=orders.shop"), "--otlp-endpoint", &otlp, "--trace-sampling", "0"],
    )
    .await
    .unwrap();
    let (status, body) = palisade_tests::http::get(&format!("127.0.0.1:{port0}"), "/echo").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tp0 = echoed["headers"]["traceparent"].as_str().expect("a traceparent, unsampled").to_string();
    assert!(tp0.starts_with("00-") && tp0.ends_with("-00") && tp0.len() == 55, "{tp0}");
    let unsampled_trace = tp0[3..35].to_string();
    // A denied request is traced with its decision.
    let f = tmp.path().join("deny.yaml");
    std::fs::write(&f, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{to: [{paths: [\"/admin/*\"]}]}]\n").unwrap();
    assert!(cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "--wait", "10s"]).status.success());
    let denied = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("traceparent: {denied}"),
            &format!("http://127.0.0.1:{port}/admin/x"),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "403");
    let spans = collector.trace("4bf92f3577b34da6a3ce929d0e0e4736", 2).await;
    let srv = by_kind(&spans, SERVER);
    assert_eq!(
        (srv["attributes"]["palisade.decision"].as_str(), srv["attributes"]["http.response.status_code"].as_i64()),
        (Some("deny"), Some(403))
    );
    assert_eq!(by_kind(&spans, CLIENT)["parent_span_id"], "00f067aa0ba902b7");
    // The denied request's spans came after both unsampled requests: neither left a span.
    for t in ["0af7651916cd43dd8448eb211c80319c", unsampled_trace.as_str()] {
        assert!(collector.spans.lock().unwrap().iter().all(|s| s["trace_id"] != t), "unsampled {t}: no span");
    }
    assert!(web.metric("palisade_trace_spans_total{result=\"exported\"}").await.unwrap_or(0.0) >= 3.0);

    // Access logs: one JSON line per request on each side, with the trace id.
    let lines = |s: &Sidecar| -> Vec<serde_json::Value> {
        s.proc
            .logs()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v.get("direction").is_some())
            .collect()
    };
    let secret = "Bearer secret-token-xyz";
    let r = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-H",
            &format!("authorization: {secret}"),
            "-H",
            "x-api-key: key-shh",
            "--data-binary",
            "hello",
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert!(r.status.success());
    let find = |s: &Sidecar, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let all = lines(s);
        all.iter().find(|l| pred(l)).cloned().unwrap_or_else(|| panic!("no such access line in {all:?}"))
    };
    let first = find(&server, &|l| l["trace_id"] == parts[1]);
    assert_eq!(
        (first["direction"].as_str(), first["caller"].as_str(), first["callee"].as_str()),
        (Some("inbound"), Some(WEB), Some(ORDERS))
    );
    assert_eq!(
        (first["method"].as_str(), first["path"].as_str(), first["status"].as_u64(), first["decision"].as_str()),
        (Some("GET"), Some("/echo"), Some(200), Some("allow"))
    );
    assert!(first["bytes_out"].as_u64().unwrap() > 0 && first["duration_ms"].as_f64().is_some(), "{first}");
    assert!(
        first["time"].as_str().unwrap().ends_with('Z') && first["src"].as_str().unwrap().starts_with("127."),
        "{first}"
    );
    let denied_line = find(&server, &|l| l["path"] == "/admin/x");
    assert_eq!(
        (
            denied_line["status"].as_u64(),
            denied_line["decision"].as_str(),
            denied_line["policy"].as_str(),
            denied_line["rule"].as_u64()
        ),
        (Some(403), Some("deny"), Some("shop/no-admin"), Some(0)),
        "{denied_line}"
    );
    let post = find(&server, &|l| l["method"] == "POST");
    assert_eq!(post["bytes_in"], 5, "{post}");
    let out = find(&web, &|l| l["trace_id"] == parts[1]);
    assert_eq!(
        (out["direction"].as_str(), out["caller"].as_str(), out["callee"].as_str(), out["authority"].as_str()),
        (Some("outbound"), Some(WEB), Some("orders.shop"), Some(&*format!("127.0.0.1:{port}"))),
        "{out}"
    );
    for s in [&server, &web] {
        let logs = s.proc.logs();
        assert!(!logs.contains("secret-token-xyz") && !logs.contains("key-shh"), "a credential in the logs");
    }

    // The collector gone: every request still succeeds, the spans are counted as failed.
    drop(collector);
    for _ in 0..20 {
        let (status, _) = palisade_tests::http::get(&format!("127.0.0.1:{port}"), "/hello").await.unwrap();
        assert_eq!(status, 200);
    }
    eventually("failed exports counted", Duration::from_secs(20), || async {
        (server.metric("palisade_trace_spans_total{result=\"failed\"}").await? >= 1.0).then_some(())
    })
    .await
    .unwrap();
}

/// The names in a Grafana dashboard's expressions and variable queries.
fn dashboard_names(file: &str) -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("deploy/grafana").join(file)).unwrap()).unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let mut out = Vec::new();
    for e in &exprs {
        for name in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("palisade_")) {
            out.push((name.to_string(), e.clone()));
        }
    }
    out
}

/// Sample names and families in OpenMetrics text, plus the families a
/// source file registers (with `prefix`): families without samples yet
/// are not written.
fn exported(text: &str, source: &str, prefix: &str) -> (HashSet<String>, HashSet<String>) {
    let (mut samples, mut families) = (HashSet::new(), HashSet::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.insert(rest.split(' ').next().unwrap().to_string());
        } else if !line.starts_with('#') {
            samples.insert(line.split(['{', ' ']).next().unwrap().to_string());
        }
    }
    let code = std::fs::read_to_string(repo_root().join(source)).unwrap();
    for r in code.split(".register(").skip(1) {
        if let Some(name) = r.trim_start().strip_prefix('"').and_then(|r| r.split('"').next()) {
            families.insert(format!("{prefix}{name}"));
        }
    }
    (samples, families)
}

fn check_names(names: &[(String, String)], samples: &HashSet<String>, families: &HashSet<String>, who: &str) {
    for (name, e) in names {
        let family = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            samples.contains(name) || families.contains(family),
            "the dashboard names {name}, which the {who} does not export ({e})"
        );
    }
}

/// The Grafana dashboards in deploy/grafana name only metrics Palisade
/// exports: every `palisade_*` name in a panel expression or a variable
/// query is a sample or family in a live sidecar's (or control plane's)
/// /metrics, or a family it registers, with the suffix its type gives.
#[tokio::test]
async fn the_grafana_dashboards_name_only_exported_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--metrics-listen", &listen]).await.unwrap();
    let s = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &[]).await.unwrap();

    let names = dashboard_names("palisade-sidecars.json");
    assert!(names.len() >= 20, "{names:?}");
    let (_, text) = s.get("/metrics").await.unwrap();
    let (samples, families) = exported(&text, "sidecar/src/metrics.rs", "palisade_");
    check_names(&names, &samples, &families, "sidecar");

    let names = dashboard_names("palisade-control-plane.json");
    assert!(names.len() >= 9, "{names:?}");
    let (_, text) = palisade_tests::http::get(&listen, "/metrics").await.unwrap();
    let (samples, families) = exported(&text, "control-plane/src/metrics.rs", "palisade_cp_");
    check_names(&names, &samples, &families, "control plane");
}

/// The control plane's own metrics on `--metrics-listen`: certificates
/// issued (by attestation) and refused (by code), open policy streams, push
/// latency (apply to ACK), NACKs, store latency, Admin API use; only GET
/// /metrics is served.
#[tokio::test]
async fn the_control_plane_exports_its_own_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--metrics-listen", &listen]).await.unwrap();
    let metrics = || async {
        let (status, text) = palisade_tests::http::get(&listen, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        text
    };
    let value = |text: &str, name: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok())).unwrap_or(0.0)
    };
    let _orders = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &[]).await.unwrap();
    // A refused certificate request: a join token that is not one.
    let mut bad = Sidecar::spawn("bad", &cp, tmp.path(), &["--join-token", "pjt-not-a-token"]).unwrap();
    eventually("the refusal is counted", Duration::from_secs(10), || async {
        (value(&metrics().await, r#"palisade_cp_certificates_total{result="refused",reason="unauthenticated"}"#) >= 1.0)
            .then_some(())
    })
    .await
    .unwrap();
    let _ = bad.proc.terminate(Duration::from_secs(5));
    let f = tmp.path().join("p.yaml");
    std::fs::write(&f, "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules: [{from: [{namespaces: [shop]}]}]\n").unwrap();
    assert!(cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "--wait", "10s"]).status.success());
    let text = eventually("the ACK is timed", Duration::from_secs(10), || async {
        let t = metrics().await;
        (value(&t, "palisade_cp_push_latency_seconds_count") >= 1.0).then_some(t)
    })
    .await
    .unwrap();
    assert_eq!(value(&text, r#"palisade_cp_certificates_total{result="issued",reason="token"}"#), 1.0, "{text}");
    assert_eq!(value(&text, "palisade_cp_policy_streams"), 1.0, "{text}");
    assert!(value(&text, "palisade_cp_store_operation_duration_seconds_count") >= 2.0, "{text}");
    assert!(value(&text, r#"palisade_cp_admin_requests_total{result="authorized"}"#) >= 2.0, "{text}");
    assert!(text.contains("# TYPE palisade_cp_config_nacks counter"), "{text}");
    let (status, _) = palisade_tests::http::get(&listen, "/config").await.unwrap();
    assert_eq!(status, 404);
}

/// An OTLP endpoint with credentials in it is refused at start, and the
/// credentials appear nowhere: not in the start-up log, not in the error.
#[tokio::test]
async fn an_otlp_endpoint_with_credentials_is_refused_without_showing_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let token = cp.create_token(ORDERS, &[]).unwrap();
    let mut s = Sidecar::spawn(
        "creds",
        &cp,
        tmp.path(),
        &["--join-token", &token, "--otlp-endpoint", "http://collector:s3cr3t-pw@127.0.0.1:4317"],
    )
    .unwrap();
    let status = s.proc.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let logs = s.proc.logs();
    assert!(logs.contains("a URL with credentials (user@host) is not accepted"), "{logs}");
    assert!(logs.contains("http://[redacted]@127.0.0.1:4317"), "{logs}");
    assert!(!logs.contains("s3cr3t-pw"), "{logs}");
}

/// The control plane traces its own gRPC calls: a server span per call,
/// named `service/method` with the RPC conventions' attributes and the
/// call's gRPC status, exported to the same kind of collector.
#[tokio::test]
async fn the_control_plane_traces_its_grpc_calls() {
    if !python_ready("trace::the_control_plane_traces_its_grpc_calls") {
        return;
    }
    let collector = Collector::start(&[]).await;
    let otlp = format!("http://127.0.0.1:{}", collector.port);
    let tmp = tempfile::tempdir().unwrap();
    let cp =
        ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--otlp-endpoint", &otlp, "--trace-sampling", "1"])
            .await
            .unwrap();
    let _orders = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &[]).await.unwrap();
    assert!(cp.ctl(&["proxies"]).status.success());
    assert!(!cp.ctl(&["token", "revoke", "no-such-token"]).status.success());
    let find = |name: &'static str, code: i64| {
        let spans = collector.spans.clone();
        async move {
            eventually(&format!("a {name} span with status {code}"), Duration::from_secs(15), || async {
                spans
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|s| s["name"] == name && s["attributes"]["rpc.grpc.status_code"] == code)
                    .cloned()
            })
            .await
            .unwrap()
        }
    };
    let list = find("palisade.v1.Admin/ListProxies", 0).await;
    assert_eq!((list["kind"].as_u64(), list["service"].as_str()), (Some(SERVER), Some("palisade-control-plane")));
    let a = &list["attributes"];
    assert_eq!(
        (a["rpc.system"].as_str(), a["rpc.service"].as_str(), a["rpc.method"].as_str()),
        (Some("grpc"), Some("palisade.v1.Admin"), Some("ListProxies"))
    );
    find("palisade.v1.Identity/Certify", 0).await;
    let revoked = find("palisade.v1.Admin/RevokeJoinToken", 5).await;
    assert_eq!(revoked["parent_span_id"], "", "{revoked}");
}
