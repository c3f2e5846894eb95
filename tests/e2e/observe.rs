//! Seeing the mesh through the control plane: `palisadectl tap` (live
//! requests with their decisions), `palisadectl policy preview` and
//! `policy apply --preview` (what a candidate would break, judged on the
//! requests the sidecars recorded), `palisadectl stat` (per-workload
//! traffic). Real sidecars, control plane and palisadectl.

use std::process::Stdio;
use std::time::Duration;

use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Sidecar, bin, eventually, free_port};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::dataplane::{ORDERS, WEB};

const INVOICES: &str = "spiffe://cluster.local/ns/billing/sa/invoices";

/// palisadectl against `cp`, as a child whose stdout is read as it comes.
pub(crate) fn ctl_child(cp: &ControlPlane, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(bin("palisadectl"))
        .env("PALISADE_CONTROL_PLANE", &cp.addr)
        .env("PALISADE_CREDENTIALS", cp.admin_dir())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("invariant: palisadectl runs")
}

/// `curl -X METHOD url`: the status code.
pub(crate) async fn curl(method: &str, url: &str) -> u16 {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, url])
        .output()
        .await
        .expect("invariant: curl runs");
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

/// Reads JSON lines from a child until `n` arrived (or it ends).
async fn lines(child: &mut tokio::process::Child, n: usize) -> Vec<serde_json::Value> {
    let stdout = child.stdout.take().expect("invariant: piped");
    let mut reader = BufReader::new(stdout).lines();
    let mut out = Vec::new();
    let read = async {
        while out.len() < n {
            match reader.next_line().await {
                Ok(Some(l)) => out.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), read).await;
    out
}

const DENY_ADMIN: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{to: [{paths: [\"/admin/*\"]}]}]\n";

#[tokio::test]
async fn tap_streams_the_requests_a_sidecar_sees_with_their_decisions() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--default-policy", "allow-authenticated"])
        .await
        .unwrap();
    let app = HttpApp::start().await;
    let orders = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &["--app", &app.addr.to_string()]).await.unwrap();
    let port = free_port();
    let _web = Sidecar::meshed("web", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")])
        .await
        .unwrap();
    let f = tmp.path().join("deny.yaml");
    std::fs::write(&f, DENY_ADMIN).unwrap();
    assert!(cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "--wait", "10s"]).status.success());
    assert_eq!(orders.metric("palisade_taps_active").await, Some(0.0), "off unless asked");

    // Only refusals, to orders: the allowed request is not shown.
    let mut tap = ctl_child(&cp, &["tap", "--to", ORDERS, "--decision", "deny", "--max", "2", "-o", "json"]);
    eventually("the tap to reach orders' sidecar", Duration::from_secs(10), || async {
        (orders.metric("palisade_taps_active").await == Some(1.0)).then_some(())
    })
    .await
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(curl("GET", &format!("{base}/echo")).await, 200);
    assert_eq!(curl("GET", &format!("{base}/admin/users")).await, 403);
    assert_eq!(curl("DELETE", &format!("{base}/admin/users")).await, 403);
    let got = lines(&mut tap, 2).await;
    let status = tokio::time::timeout(Duration::from_secs(10), tap.wait()).await.unwrap().unwrap();
    assert!(status.success(), "tap ends by itself after --max");
    assert_eq!(got.len(), 2, "{got:?}");
    for (line, method) in got.iter().zip(["GET", "DELETE"]) {
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["policy"], "shop/no-admin");
        assert_eq!(line["rule"], 0);
        assert_eq!(line["caller"], WEB);
        assert_eq!(line["callee"], ORDERS);
        assert_eq!(line["method"], method);
        assert_eq!(line["path"], "/admin/users");
        assert_eq!(line["status"], 403);
        assert!(line["proxy"].as_str().is_some_and(|p| p.starts_with(ORDERS)), "{line}");
    }
    eventually("the tap to end on the sidecar", Duration::from_secs(10), || async {
        (orders.metric("palisade_taps_active").await == Some(0.0)).then_some(())
    })
    .await
    .unwrap();

    // A path filter; a table for people; a caller that matches no request sees none.
    let by_path = ctl_child(&cp, &["tap", "--path", "/echo*", "--max", "1"]);
    let mut nobody = ctl_child(&cp, &["tap", "--from", INVOICES, "-o", "json"]);
    eventually("both taps to reach orders' sidecar", Duration::from_secs(10), || async {
        (orders.metric("palisade_taps_active").await == Some(2.0)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(curl("GET", &format!("{base}/admin/x")).await, 403);
    assert_eq!(curl("GET", &format!("{base}/echo?q=1")).await, 200);
    let out = tokio::time::timeout(Duration::from_secs(20), by_path.wait_with_output()).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("{WEB} -> {ORDERS} GET /echo 200 allow")), "{text}");
    assert!(!text.contains("/admin"), "{text}");
    // The tap of a caller that sent nothing: no line; interrupted, it ends on the sidecar.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), async {
            let mut r = BufReader::new(nobody.stdout.take().unwrap()).lines();
            r.next_line().await
        })
        .await
        .is_err()
    );
    nobody.kill().await.unwrap();
    eventually("an interrupted tap to end on the sidecar", Duration::from_secs(10), || async {
        (orders.metric("palisade_taps_active").await == Some(0.0)).then_some(())
    })
    .await
    .unwrap();
    let sent = orders.get("/metrics").await.unwrap().1;
    assert!(sent.contains("palisade_tap_events_total{result=\"sent\"} 3"), "{sent}");
    let log = cp.proc.logs();
    assert!(log.contains("tap started") && log.contains("tap ended"), "taps are audited: {log}");
}

const ALLOW_ORDERS: &str = r#"apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: orders-callers, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: ALLOW
  rules:
  - from: [{identities: ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/billing/sa/invoices"]}]
"#;

const ONLY_WEB_READS: &str = r#"apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: orders-callers, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  action: ALLOW
  rules:
  - from: [{identities: ["spiffe://cluster.local/ns/shop/sa/web"]}]
    to: [{methods: [GET]}]
  - from: [{identities: ["spiffe://cluster.local/ns/billing/sa/invoices"]}]
    to: [{paths: ["/admin/*"]}]
"#;

#[tokio::test]
async fn policy_preview_shows_which_live_callers_a_change_would_break() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let current = tmp.path().join("current.yaml");
    std::fs::write(&current, ALLOW_ORDERS).unwrap();
    assert!(cp.ctl(&["policy", "apply", "-f", current.to_str().unwrap()]).status.success());
    let app = HttpApp::start().await;
    let fast = ["--report-interval", "1s"];
    let _orders =
        Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &[&["--app", &app.addr.to_string()][..], &fast].concat())
            .await
            .unwrap();
    let (pw, pi) = (free_port(), free_port());
    let _web = Sidecar::meshed("web", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{pw}=orders.shop")])
        .await
        .unwrap();
    let _invoices =
        Sidecar::meshed("invoices", &cp, tmp.path(), INVOICES, &["--upstream", &format!("127.0.0.1:{pi}=orders.shop")])
            .await
            .unwrap();
    let (web, invoices) = (format!("http://127.0.0.1:{pw}"), format!("http://127.0.0.1:{pi}"));
    for _ in 0..5 {
        assert_eq!(curl("GET", &format!("{web}/echo")).await, 200);
    }
    for _ in 0..3 {
        assert_eq!(curl("POST", &format!("{web}/echo")).await, 200);
    }
    for _ in 0..2 {
        assert_eq!(curl("GET", &format!("{invoices}/echo")).await, 200);
    }
    let candidate = tmp.path().join("candidate.yaml");
    std::fs::write(&candidate, ONLY_WEB_READS).unwrap();
    let file = candidate.to_str().unwrap();
    let preview = eventually("the recorded requests to reach the control plane", Duration::from_secs(15), || async {
        let out = cp.ctl(&["policy", "preview", "-f", file, "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["requests_evaluated"] == 10).then_some(v)
    })
    .await
    .unwrap();
    let changes = preview["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{preview}");
    let web_posts = &changes[0];
    assert_eq!(
        (&web_posts["from"], &web_posts["to"], &web_posts["method"], &web_posts["path"]),
        (&WEB.into(), &ORDERS.into(), &"POST".into(), &"/echo".into())
    );
    assert_eq!(
        (&web_posts["before"], &web_posts["after"], &web_posts["count"]),
        (&"allow".into(), &"deny".into(), &3.into())
    );
    assert_eq!(web_posts["before_rule"], "shop/orders-callers ALLOW rule 0");
    assert_eq!(web_posts["after_rule"], "no ALLOW rule matched");
    let inv = &changes[1];
    assert_eq!((&inv["from"], &inv["method"], &inv["count"]), (&INVOICES.into(), &"GET".into(), &2.into()));
    assert_eq!((&inv["before"], &inv["after"]), (&"allow".into(), &"deny".into()));
    // The table names the same.
    let out = cp.ctl(&["policy", "preview", "-f", file]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("5 of 10 requests recorded in the last"), "{text}");
    assert!(text.contains("POST") && text.contains("allow -> deny") && text.contains(INVOICES), "{text}");

    // apply --preview asks first: "n", or no answer at all, changes nothing.
    for answer in ["n\n", ""] {
        let mut apply = ctl_child(&cp, &["policy", "apply", "-f", file, "--preview"]);
        let mut stdin = apply.stdin.take().unwrap();
        stdin.write_all(answer.as_bytes()).await.unwrap();
        drop(stdin);
        let out = apply.wait_with_output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("would be decided differently") && err.contains("apply this change? [y/N]"), "{err}");
        assert!(err.contains("not applied"), "{err}");
        let stored = cp.ctl(&["policy", "get", "ap", "shop/orders-callers", "-o", "json"]);
        assert!(!String::from_utf8_lossy(&stored.stdout).contains("GET"), "unchanged");
    }
    // "y" applies it; a preview of the same file then changes nothing.
    let mut apply = ctl_child(&cp, &["policy", "apply", "-f", file, "--preview"]);
    apply.stdin.take().unwrap().write_all(b"y\n").await.unwrap();
    let out = apply.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("AuthorizationPolicy shop/orders-callers updated"));
    let again = cp.ctl(&["policy", "preview", "-f", file, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["changes"], serde_json::json!([]), "{v}");
    // Going back, --yes for scripts: the reverse flips are shown and it applies without asking.
    let out = cp.ctl(&["policy", "apply", "-f", current.to_str().unwrap(), "--preview", "--yes", "--wait", "10s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deny -> allow"));
    assert_eq!(curl("POST", &format!("{web}/echo")).await, 200);
}

#[tokio::test]
async fn stat_shows_each_workloads_rate_success_refusals_and_latency() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--default-policy", "allow-authenticated"])
        .await
        .unwrap();
    let f = tmp.path().join("deny.yaml");
    std::fs::write(&f, DENY_ADMIN).unwrap();
    assert!(cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]).status.success());
    let app = HttpApp::start().await;
    let _orders = Sidecar::meshed(
        "orders",
        &cp,
        tmp.path(),
        ORDERS,
        &["--app", &app.addr.to_string(), "--report-interval", "1s"],
    )
    .await
    .unwrap();
    let port = free_port();
    let _web = Sidecar::meshed("web", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")])
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    for (path, n, status) in [("/echo", 12, 200), ("/fail", 4, 500), ("/admin/x", 4, 403)] {
        for _ in 0..n {
            assert_eq!(curl("GET", &format!("{base}{path}")).await, status);
        }
    }
    // Right after the requests, --wait counts every one of them: it waits for
    // a report newer than the command rather than show the last one.
    let out = cp.ctl(&["stat", "-o", "json", "--workload", ORDERS, "--wait", "10s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = v[0].clone();
    assert_eq!(row["requests"], 20, "{v}");
    assert_eq!(row["identity"], ORDERS);
    assert_eq!(row["proxies"], 1);
    assert!((row["success_rate"].as_f64().unwrap() - 0.8).abs() < 1e-9, "4 of 20 failed: {row}");
    assert!((row["refused_rate"].as_f64().unwrap() - 0.2).abs() < 1e-9, "4 of 20 refused: {row}");
    let (p50, p99) = (row["p50_ms"].as_f64().unwrap(), row["p99_ms"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99 && p99 < 10_000.0, "{row}");
    assert!(row["rps"].as_f64().unwrap() > 0.0, "{row}");
    // The table, like `linkerd viz stat`; a glob that selects nothing shows none.
    let out = cp.ctl(&["stat"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("WORKLOAD"), "{text}");
    let line = text.lines().find(|l| l.starts_with(ORDERS)).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("80.00%") && line.contains("20.00%"), "{line}");
    let out = cp.ctl(&["stat", "--workload", "spiffe://cluster.local/ns/nothing/*"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(none)"));
    let out = cp.ctl(&["stat", "--workload", "spiffe://cluster.local/ns/nothing/*", "--wait", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no report newer than this command"));
    let out = cp.ctl(&["stat", "--window", "1h"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 600"));
}
