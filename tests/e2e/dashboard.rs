//! `palisadectl dashboard` in a real browser (Debian's headless Chromium)
//! against a real mesh on loopback: the graph, a workload's live tap, the
//! decisions view, the policy preview, the rotation view, a lost control
//! plane; and its attack section (token, Host, Origin, CSRF, injection,
//! secrets, floods). Screenshots land in target/dashboard-screenshots/.

use std::time::Duration;

use palisade_tests::apps::HttpApp;
use palisade_tests::browser::Browser;
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::dataplane::{ORDERS, WEB};
use crate::observe::{ctl_child, curl};

const DENY_ADMIN: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{to: [{paths: [\"/admin/*\"]}]}]\n";
const DENY_ORDERS: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-orders, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{to: [{paths: [\"/orders/*\"]}]}]\n";

const HOSTILE_POLICY: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: hostile, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{to: [{paths: [\"/x/<img src=x onerror=window.__pwned=1>\"]}]}]\n";

/// A mesh of web → orders, with a DENY policy, and a dashboard on it.
struct Mesh {
    tmp: tempfile::TempDir,
    cp: ControlPlane,
    _app: HttpApp,
    _orders: Sidecar,
    _web: Sidecar,
    /// web's app-side port: requests sent here go to orders through both sidecars.
    upstream: u16,
    dashboard: tokio::process::Child,
    /// The URL with its token: http://127.0.0.1:PORT/TOKEN/
    url: String,
    /// The URL without its last slash: `{base}/api/overview`.
    base: String,
    /// http://127.0.0.1:PORT
    origin: String,
}

impl Mesh {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let cp =
            ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--default-policy", "allow-authenticated"])
                .await
                .unwrap();
        let app = HttpApp::start().await;
        let app_addr = app.addr.to_string();
        let orders_args = ["--app", &app_addr, "--report-interval", "1s"];
        let orders = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &orders_args).await.unwrap();
        let upstream = free_port();
        let route = format!("127.0.0.1:{upstream}=orders.shop");
        let web_args = ["--upstream", &route, "--report-interval", "1s"];
        let web = Sidecar::meshed("web", &cp, tmp.path(), WEB, &web_args).await.unwrap();
        let f = tmp.path().join("deny.yaml");
        std::fs::write(&f, DENY_ADMIN).unwrap();
        assert!(cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "--wait", "10s"]).status.success());
        let mut dashboard = ctl_child(&cp, &["dashboard"]);
        let stdout = dashboard.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(20), BufReader::new(stdout).read_line(&mut line))
            .await
            .expect("the dashboard prints its URL")
            .unwrap();
        let url = line.trim().strip_prefix("Palisade dashboard: ").unwrap_or_else(|| panic!("{line}")).to_string();
        assert!(url.starts_with("http://127.0.0.1:") && url.ends_with('/') && url.len() > 60, "{url}");
        let base = url.trim_end_matches('/').to_string();
        let origin = base.rsplit_once('/').unwrap().0.to_string();
        Self { tmp, cp, _app: app, _orders: orders, _web: web, upstream, dashboard, url, base, origin }
    }

    async fn get(&self, path: &str) -> u16 {
        curl("GET", &format!("http://127.0.0.1:{}{path}", self.upstream)).await
    }
}

/// curl against the dashboard: (status, headers, body).
async fn http(args: &[&str]) -> (u16, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-D", "-", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .unwrap();
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

async fn browser(test: &str) -> Option<Browser> {
    let shots = palisade_tests::repo_root().join("target/dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    match Browser::start(&shots).await {
        Ok(Some(b)) => Some(b),
        Ok(None) => {
            palisade_tests::skip(test, "Chromium cannot start here (apt-get install chromium chromium-driver)");
            None
        }
        Err(e) => panic!("{e:#}"),
    }
}

fn css_id(id: &str) -> String {
    id.replace('"', "\\\"")
}

#[tokio::test]
async fn the_dashboard_shows_the_mesh_its_refusals_policies_and_certificates_in_chromium() {
    let mut m = Mesh::start().await;
    // The test app answers 404 to these: they went through both sidecars.
    for i in 0..20 {
        assert_eq!(m.get(&format!("/orders/{i}")).await, 404);
    }
    let Some(mut b) = browser("the_dashboard_shows_the_mesh_in_chromium").await else { return };
    println!("chromium {}", b.version);

    // The graph: both workloads, and web → orders with its traffic.
    let r = b.open(&m.url).await;
    assert_eq!(r["ok"], true, "{r}");
    b.expect(&format!("#view-graph g.node[data-id=\"{}\"]", css_id(ORDERS)), None, 20.0).await;
    let edge = format!("#view-graph g.edge[data-from=\"{}\"][data-to=\"{}\"]", css_id(WEB), css_id(ORDERS));
    b.expect(&edge, None, 20.0).await;
    b.expect("#conn-status", Some("live"), 10.0).await;
    let rows = b.texts("#edge-table tbody tr").await;
    assert!(rows.iter().any(|r| r.contains("web") && r.contains("orders") && r.contains("req/s")), "{rows:?}");
    b.screenshot("graph").await;

    // Decisions: a refused request shows with its policy and rule within 2 s.
    b.open(&format!("{}/#/decisions", m.base)).await;
    b.expect("#view-decisions", None, 5.0).await;
    assert_eq!(m.get("/admin/users").await, 403);
    let rule = "#rules tr.rule[data-policy=\"shop/no-admin\"][data-rule=\"0\"]";
    let elapsed = b.expect(rule, None, 10.0).await;
    println!("refusal shown after {elapsed:.2} s");
    assert!(elapsed <= 2.0, "the issue asks for 2 s; took {elapsed:.2} s");
    b.click(rule).await;
    b.expect("#rule-detail", Some("/admin/users"), 5.0).await;
    b.expect("#explain", Some("no-admin"), 5.0).await;
    b.screenshot("decisions").await;

    // A workload's live tap shows a request within 1 s.
    b.open(&format!("{}/#/workload/{}", m.base, ORDERS.replace(':', "%3A").replace('/', "%2F"))).await;
    b.expect("#view-workload", Some("orders"), 10.0).await;
    b.expect("#view-workload", Some("no-admin"), 10.0).await;
    // The tap is open once the control plane has it (the first request may race it).
    let mut shown = None;
    for i in 0..20 {
        assert_eq!(m.get(&format!("/orders/tap-{i}")).await, 404);
        let r = b.wait("#tap tbody tr", Some(&format!("/orders/tap-{i}")), 1.0).await;
        if r["ok"] == true {
            shown = Some(r["elapsed"].as_f64().unwrap());
            break;
        }
    }
    let shown = shown.expect("a request in the live tap");
    println!("tap row shown after {shown:.2} s");
    assert!(shown <= 1.0);
    b.expect(".chart[data-metric=\"rps\"]", None, 5.0).await;
    b.screenshot("workload").await;

    // Policies: the preview box says what `policy preview` says.
    b.open(&format!("{}/#/policies", m.base)).await;
    b.expect("#policies", Some("shop/no-admin"), 10.0).await;
    let f = m.tmp.path().join("candidate.yaml");
    std::fs::write(&f, DENY_ORDERS).unwrap();
    // The sidecars send what they recorded every second: compare once both saw the same requests.
    let mut same = false;
    for _ in 0..5 {
        let out = m.cp.ctl(&["policy", "preview", "-f", f.to_str().unwrap(), "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
        let want: Vec<(String, String)> = cli["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["path"].as_str().unwrap().to_string(), format!("{} req", c["count"])))
            .collect();
        assert!(!want.is_empty(), "{cli}");
        let r = b
            .cmd(serde_json::json!({"cmd": "type", "css": "#preview-input", "text": DENY_ORDERS, "clear": true}))
            .await;
        assert_eq!(r["ok"], true, "{r}");
        b.click("#preview-run").await;
        b.expect("#preview-result tr.change", None, 10.0).await;
        let shown = b.texts("#preview-result tr.change").await;
        let matches = |(path, count): &(String, String)| {
            shown.iter().any(|s| s.split('\t').any(|f| f == path) && s.contains(count.as_str()))
        };
        if shown.len() == want.len() && want.iter().all(matches) {
            same = true;
            break;
        }
        println!("preview: the page shows {} changes, the CLI {}: again", shown.len(), want.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(same, "the preview box says what `policy preview` says");
    b.screenshot("policies").await;

    // Certificates: the rotation view follows `ca rotate`.
    b.open(&format!("{}/#/certs", m.base)).await;
    b.expect("#cert-phase", Some("none"), 10.0).await;
    b.expect("#cert-timeline .expiry", None, 10.0).await;
    let out = m.cp.ctl(&["ca", "rotate", "--generate", "--no-wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = b.wait("#cert-phase", Some("publishing"), 15.0).await;
    let moved = r["ok"] == true
        || b.wait("#cert-phase", Some("reissuing"), 1.0).await["ok"] == true
        || b.wait("#cert-phase", Some("done"), 1.0).await["ok"] == true;
    assert!(moved, "the phase follows the rotation: {r}");
    b.screenshot("certs").await;

    let console = b.console().await;
    assert!(console.is_empty(), "no console errors on any page: {console:?}");

    // docs/dashboard.md's commands, as a reader runs them against this mesh.
    let page = std::fs::read_to_string(palisade_tests::repo_root().join("docs/dashboard.md")).unwrap();
    let blocks: Vec<&str> = page.split("```sh\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert_eq!(blocks.len(), 1, "the page's one command block");
    std::fs::create_dir_all(m.tmp.path().join("demo-data")).unwrap();
    let path = format!("{}:{}", palisade_tests::bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let out = tokio::process::Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{}", blocks[0])])
        .current_dir(m.tmp.path())
        .env("PATH", path)
        .env("PALISADE_CONTROL_PLANE", &m.cp.addr)
        .env("PALISADE_CREDENTIALS", m.cp.admin_dir())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.trim(), "200", "the URL serves the page");

    // A lost control plane is shown, not hidden.
    // (Killed: a graceful stop waits for the streams the dashboard holds open.)
    m.cp.proc.child.kill().unwrap();
    let _ = m.cp.proc.child.wait();
    b.open(&format!("{}/#/graph", m.base)).await;
    b.expect("#conn-banner.lost", Some("unreachable"), 15.0).await;
    b.screenshot("lost").await;
    let _ = m.dashboard.kill().await;
}

#[tokio::test]
async fn attack_dashboard_refuses_strangers_foreign_pages_forged_posts_and_injected_script() {
    let mut m = Mesh::start().await;
    let (base, origin_url) = (m.base.clone(), m.origin.clone());
    let api = format!("{base}/api/overview");
    let token = base.rsplit('/').next().unwrap().to_string();

    // No token, a wrong one, part of it: nothing but 401, on every path.
    for path in ["/", "/api/overview", "/js/main.js", "/app.css", "/api/events", "/api/tap?to=*", "/?token=x"] {
        for prefix in ["", "/wrong", &format!("/{}", &token[..token.len() - 1]), &format!("/{token}x")] {
            let (s, head, _) = http(&[&format!("{origin_url}{prefix}{path}")]).await;
            assert_eq!(s, 401, "{prefix}{path}");
            assert!(head.contains("content-security-policy:"), "{head}");
        }
    }
    // No cookie ever: a browser would send it to every port of 127.0.0.1.
    let (s, head, _) = http(&[&base]).await;
    assert_eq!(s, 308, "/<token> goes to /<token>/");
    assert!(
        head.contains(&format!("location: /{}/", token.to_ascii_lowercase())) && !head.contains("set-cookie"),
        "{head}"
    );
    let c = "x-test: 1".to_string();

    // The token works; the headers hold on every answer.
    let (s, head, body) = http(&["-H", &c, &api]).await;
    assert!(!head.contains("set-cookie"), "{head}");
    assert_eq!(s, 200, "{body}");
    assert!(head.contains("cache-control: no-store") && head.contains("x-content-type-options: nosniff"), "{head}");
    let csp = head.lines().find_map(|l| l.strip_prefix("content-security-policy: ")).unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"),
        "{csp}"
    );
    let (s, _, page) = http(&["-H", &c, &format!("{base}/")]).await;
    assert!(page.contains("src=\"js/main.js\""), "the page loads its script relative to the token: {page}");
    assert_eq!(s, 200);
    assert!(!page.contains("<script>") && !page.contains("onclick"), "no inline script: {page}");

    // DNS rebinding: a foreign Host with the right token; two Host headers; an absolute URI.
    let port = origin_url.rsplit(':').next().unwrap();
    for host in ["evil.example", &format!("evil.example:{port}"), &format!("127.0.0.1.evil.example:{port}")] {
        assert_eq!(http(&["-H", &c, "-H", &format!("host: {host}"), &api]).await.0, 421, "{host}");
    }
    for hosts in [format!("127.0.0.1:{port}\r\nhost: evil.example"), format!("evil.example\r\nhost: 127.0.0.1:{port}")]
    {
        let mut s = tokio::net::TcpStream::connect(origin_url.trim_start_matches("http://")).await.unwrap();
        let head = format!("GET /{token}/api/overview HTTP/1.1\r\nhost: {hosts}\r\nconnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "two Host headers: {answer}");
    }
    let target = format!("http://evil.example/{token}/api/overview");
    assert_eq!(http(&["--request-target", &target, &api]).await.0, 400);
    // Another site's page: a foreign Origin, or the browser saying cross-site.
    assert_eq!(http(&["-H", &c, "-H", "origin: http://evil.example", &api]).await.0, 403);
    assert_eq!(http(&["-H", &c, "-H", "sec-fetch-site: cross-site", &api]).await.0, 403);
    assert_eq!(http(&["-H", &c, "-H", "origin: null", &api]).await.0, 403);

    // CSRF on the preview: only the page's own fetch (JSON, its header, its origin) is served.
    let preview = format!("{base}/api/preview");
    let doc = serde_json::json!({"yaml": DENY_ORDERS}).to_string();
    let origin = format!("origin: {origin_url}");
    let ok = ["-H", &c, "-H", &origin, "-H", "content-type: application/json", "-H", "x-palisade-dashboard: 1"];
    assert_eq!(http(&[&ok[..], &["-d", &doc, &preview]].concat()).await.0, 200);
    for (drop, why) in [(4, "without its origin"), (6, "as a form"), (8, "without the dashboard's header")] {
        let mut args: Vec<&str> = ok.to_vec();
        args.drain(drop - 2..drop);
        args.extend(["-d", &doc, &preview]);
        assert_eq!(http(&args).await.0, 403, "{why}");
    }
    let form = [
        "-H",
        &c,
        "-H",
        &origin,
        "-H",
        "content-type: text/plain",
        "-H",
        "x-palisade-dashboard: 1",
        "-d",
        &doc,
        &preview,
    ];
    assert_eq!(http(&form).await.0, 403, "text/plain is what a cross-site form can send");
    let evil = [
        "-H",
        &c,
        "-H",
        "origin: http://evil.example",
        "-H",
        "content-type: application/json",
        "-H",
        "x-palisade-dashboard: 1",
        "-d",
        &doc,
        &preview,
    ];
    assert_eq!(http(&evil).await.0, 403);
    assert_eq!(http(&["-H", &c, "-X", "DELETE", &api]).await.0, 405);
    let big = serde_json::json!({"yaml": "x".repeat(300_000)}).to_string();
    let big_file = m.tmp.path().join("big.json");
    std::fs::write(&big_file, big).unwrap();
    let at = format!("@{}", big_file.display());
    assert_eq!(http(&[&ok[..], &["--data-binary", &at, &preview]].concat()).await.0, 413);

    // Secrets in requests never reach the dashboard: API keys, bearer tokens, cookies, query strings.
    let secret = "s3cr3t-VALUE-8d1f";
    for h in
        [format!("authorization: Bearer {secret}"), format!("x-api-key: {secret}"), format!("cookie: session={secret}")]
    {
        let out = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-H",
                &h,
                &format!("http://127.0.0.1:{}/admin/x?token={secret}", m.upstream),
            ])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
    }
    // Script in a path: raw, the sidecar's parser refuses it; percent-encoded it is
    // refused by policy, and the page must show it as text.
    let hostile = "/admin/<img/src=x/onerror=window.__pwned=1>";
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", m.upstream)).await.unwrap();
    s.write_all(format!("GET {hostile} HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(m.get("/admin/%3Cimg%20src=x%20onerror=window.__pwned=1%3E%22%27").await, 403);
    // Script in a policy: its YAML is shown on the policies page.
    let f = m.tmp.path().join("hostile.yaml");
    std::fs::write(&f, HOSTILE_POLICY).unwrap();
    let out = m.cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("the refusals in the decisions view", Duration::from_secs(15), || {
        let c = c.clone();
        let url = format!("{base}/api/decisions");
        async move {
            let (_, _, body) = http(&["-H", &c, "--compressed", &url]).await;
            (body.matches("/admin/").count() >= 4).then_some(())
        }
    })
    .await
    .unwrap();
    for path in
        ["/api/decisions", "/api/overview", "/api/policies", "/api/certs", &format!("/api/workload?id={ORDERS}")]
    {
        let (s, _, body) = http(&["-H", &c, &format!("{base}{path}")]).await;
        assert_eq!(s, 200, "{path}: {body}");
        assert!(!body.contains(secret), "{path} shows a secret: {body}");
        assert!(!body.contains("BEGIN") && !body.contains("PRIVATE KEY"), "{path}: {body}");
    }
    let (_, _, events) = http(&["-H", &c, "--max-time", "6", &format!("{base}/api/events")]).await;
    assert!(events.contains("event: overview") && !events.contains(secret), "{events}");

    if let Some(mut b) = browser("attack_dashboard_injected_script").await {
        b.open(&m.url).await;
        b.open(&format!("{base}/#/decisions")).await;
        let rule = "#rules tr.rule[data-policy=\"shop/no-admin\"]";
        b.expect(rule, None, 10.0).await;
        b.click(rule).await;
        b.expect("#rule-detail", Some("%3Cimg"), 5.0).await;
        b.open(&format!("{base}/#/policies")).await;
        let row = "#policies tr.policy[data-key=\"shop/hostile\"]";
        b.expect(row, None, 10.0).await;
        b.click(row).await;
        b.expect("#policy-yaml", Some("<img src=x onerror=window.__pwned=1>"), 5.0).await;
        assert_eq!(b.eval("return typeof window.__pwned").await, "undefined", "a value ran as script");
        let page = b.eval("return document.documentElement.outerHTML").await;
        assert!(!page.as_str().unwrap().contains(secret));
        let console = b.console().await;
        assert!(console.is_empty(), "{console:?}");
    }

    // A flood of idle connections without the token locks no one out: each
    // newcomer past 64 closes the oldest that never showed the token.
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = tokio::net::TcpStream::connect(origin_url.trim_start_matches("http://")).await {
            idle.push(s);
        }
    }
    let (s, _, _) = http(&["-H", &c, &api]).await;
    assert_eq!(s, 200, "the token holder is served while 200 connections are held without it");
    let mut closed = 0;
    for s in &mut idle {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert!(closed >= 200 - 64, "at most 64 connections stay open ({closed} of 200 closed)");
    drop(idle);

    // Beyond loopback only with TLS.
    let out = m.cp.ctl(&["dashboard", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"), "{out:?}");
    // The dashboard's log never holds the token, though refused requests carried it.
    let _ = m.dashboard.kill().await;
    let mut log = String::new();
    let _ = m.dashboard.stderr.take().unwrap().read_to_string(&mut log).await;
    assert!(log.contains("refused") && !log.contains(&token), "{log}");
}
