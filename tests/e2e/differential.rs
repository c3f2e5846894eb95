//! Explanation and enforcement cannot disagree: generated policy sets and
//! requests (methods in any case, paths, queries, origins, preflights,
//! bodies, API keys sent as headers to both), each sent through a real caller sidecar to a real callee sidecar
//! and asked of `authz check` (the Simulate API); the two decisions must be
//! the same for every case.

use std::time::Duration;

use palisade_proto::v1::SimulateRequest;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port, grpc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dataplane::{ORDERS, WEB};

const SHOP: &str = "https://shop.example.com";

/// A small deterministic generator (xorshift64*): every run makes the same
/// cases, and a failure names its seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn subset(&mut self, items: &[&str]) -> Vec<String> {
        let out: Vec<String> = items.iter().filter(|_| self.chance(60)).map(|s| s.to_string()).collect();
        if out.is_empty() { vec![items[0].to_string()] } else { out }
    }
}

fn list(v: &[String]) -> String {
    format!("[{}]", v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", "))
}

fn meta(kind: &str, name: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n"
    )
}

/// One generated policy set for orders: always an ALLOW policy, and each of
/// CORS, validation, a DENY rule, API keys (required or optional) and a
/// (generous) rate limit by chance.
fn policies(g: &mut Gen) -> String {
    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "OPTIONS"];
    let mut docs = vec![
        meta("AuthorizationPolicy", "allow")
            + &format!(
                "  action: ALLOW\n  rules:\n    - from: [{{identities: [\"{WEB}\"]}}]\n      to: [{{methods: {}, paths: {}}}]\n",
                list(&g.subset(&METHODS)),
                list(&g.subset(&["/orders*", "/admin*", "/a*"])),
            ),
    ];
    if g.chance(50) {
        docs.push(
            meta("AuthorizationPolicy", "deny")
                + "  action: DENY\n  rules:\n    - to: [{paths: [\"/admin*\"], methods: [\"DELETE\", \"PUT\"]}]\n    - to: [{hosts: [\"evil.*\"]}]\n",
        );
    }
    let mut traffic = String::new();
    if g.chance(70) {
        let origins = if g.chance(20) { vec!["*".to_string()] } else { vec![SHOP.to_string()] };
        traffic += &format!(
            "  cors: {{allowOrigins: {}, allowMethods: {}, allowHeaders: [content-type]}}\n",
            list(&origins),
            list(&g.subset(&["GET", "POST", "PUT"]))
        );
    }
    if g.chance(60) {
        let mut v = format!("methods: {}, maxQueryParams: 2", list(&g.subset(&METHODS)));
        if g.chance(50) {
            v += ", contentTypes: [application/json]";
        }
        if g.chance(30) {
            v += ", pathNormalization: {dotSegments: refuse}";
        }
        traffic += &format!("  validation: {{{v}}}\n");
    }
    if !traffic.is_empty() {
        docs.push(meta("TrafficPolicy", "edge") + &traffic);
    }
    if g.chance(50) {
        let mode = if g.chance(50) { "required" } else { "optional" };
        docs.push(
            meta("AuthenticationPolicy", "keys") + &format!("  mode: {mode}\n  apiKeys: {{header: x-api-key}}\n"),
        );
    }
    if g.chance(50) {
        docs.push(
            meta("RateLimitPolicy", "limit")
                + "  limits:\n    - {name: per-caller, algorithm: fixed_window, rate: 100000, period: 1h, key: identity}\n",
        );
    }
    docs.join("---\n")
}

/// One generated request.
#[derive(Debug)]
struct Case {
    method: &'static str,
    path: &'static str,
    query: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: bool,
    key: bool,
    host: &'static str,
}

fn case(g: &mut Gen) -> Case {
    let method = *g.pick(&["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "options"]);
    let path = *g.pick(&["/orders", "/orders/1", "/admin/x", "/a/../orders", "/orders//2", "/x/../admin/y"]);
    let query = *g.pick(&["", "", "?a=1", "?a=1&b=2&c=3"]);
    let mut headers = Vec::new();
    match g.next() % 3 {
        0 => headers.push(("origin", SHOP)),
        1 => headers.push(("origin", "https://evil.example")),
        _ => {}
    }
    if method.eq_ignore_ascii_case("OPTIONS") && g.chance(70) {
        headers.push(("access-control-request-method", *g.pick(&["GET", "POST", "DELETE"])));
        if g.chance(40) {
            headers.push(("access-control-request-headers", *g.pick(&["content-type", "x-secret"])));
        }
    }
    let body = matches!(method, "POST" | "PUT" | "PATCH") && g.chance(70);
    if body {
        headers.push(("content-type", *g.pick(&["application/json", "text/plain"])));
    }
    let host = *g.pick(&["orders", "orders", "evil.example"]);
    Case { method, path, query, headers, body, key: g.chance(50), host }
}

/// The decision a sidecar's answer shows: its own refusals carry
/// `x-palisade-error`; a preflight is its 204; anything else is the app's.
fn enforced(c: &Case, resp: &str) -> &'static str {
    let status: u16 = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = resp.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    let by_sidecar = head.contains("\r\nx-palisade-error:");
    let preflight = c.method.eq_ignore_ascii_case("OPTIONS")
        && c.headers.iter().any(|(k, _)| *k == "access-control-request-method");
    match (by_sidecar, status) {
        (false, 204) if preflight => "preflight",
        (false, _) => "allow",
        (true, 401) => "unauthenticated",
        (true, 403) => "deny",
        (true, 429) => "rate_limited",
        (true, 400 | 405 | 413 | 414 | 415) => "invalid",
        (true, s) => panic!("an answer the pipeline does not make: {s}\n{resp}"),
    }
}

async fn send(port: u16, c: &Case, key: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut head: String = c.headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    if c.key {
        head += &format!("x-api-key: {key}\r\n");
    }
    let body = if c.body { "{}" } else { "" };
    if c.body {
        head += "content-length: 2\r\n";
    }
    let req = format!(
        "{} {}{} HTTP/1.1\r\nHost: {}\r\n{head}Connection: close\r\n\r\n{body}",
        c.method, c.path, c.query, c.host
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn authz_check_and_the_sidecar_agree_on_generated_policies_and_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let app = HttpApp::start().await;
    let server = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &["--app", &app.addr.to_string()]).await.unwrap();
    let port = free_port();
    let _web = Sidecar::meshed("web", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")])
        .await
        .unwrap();
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    let mut admin =
        AdminClient::new(grpc::channel(&cp.addr, &bundle, Some(crate::attack::admin_svid(&cp))).await.unwrap());
    let out = cp.ctl(&["apikey", "create", "--name", "ci", "--principal", "team/ci", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["key"].as_str().unwrap().to_string();

    let (mut cases, mut disagreements) = (0, Vec::new());
    for seed in 1..=6u64 {
        let mut g = Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let yaml = policies(&mut g);
        // Each set replaces the last: delete everything, then apply.
        for kind in ["AuthorizationPolicy", "TrafficPolicy", "AuthenticationPolicy", "RateLimitPolicy"] {
            for name in ["allow", "deny", "edge", "keys", "limit"] {
                let _ = cp.ctl(&["policy", "delete", kind, &format!("shop/{name}")]);
            }
        }
        let f = tmp.path().join(format!("set-{seed}.yaml"));
        std::fs::write(&f, &yaml).unwrap();
        let out = cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "-o", "json"]);
        assert!(out.status.success(), "seed {seed}: apply: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = format!("r{}", v.as_array().unwrap().iter().filter_map(|r| r["revision"].as_u64()).max().unwrap());
        let ran = eventually("the sidecar runs the set", Duration::from_secs(10), || async {
            // `r<revision>`, then `-c<n>` once API keys exist.
            let v = server.config().await?["policy_version"].as_str().unwrap_or_default().to_string();
            (v == want || v.starts_with(&format!("{want}-"))).then_some(())
        })
        .await;
        if let Err(e) = ran {
            let config = server.config().await;
            panic!(
                "seed {seed}: {e}: want {want}, the sidecar says {:?}\n{v}",
                config.map(|c| c["policy_version"].clone())
            );
        }
        for _ in 0..40 {
            let c = case(&mut g);
            let resp = send(port, &c, &key).await;
            let got = enforced(&c, &resp);
            // The same request, headers (the API key included) and all.
            let mut headers: std::collections::HashMap<String, String> =
                c.headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            headers.insert("host".into(), c.host.into());
            if c.key {
                headers.insert("x-api-key".into(), key.clone());
            }
            if c.body {
                headers.insert("content-length".into(), "2".into());
            }
            let sim = SimulateRequest {
                source: WEB.into(),
                target: ORDERS.into(),
                method: c.method.into(),
                path: format!("{}{}", c.path, c.query),
                headers,
                port: app.addr.port().into(),
                ..Default::default()
            };
            let e = admin.simulate(sim).await.unwrap().into_inner();
            let explained = match e.decision.as_str() {
                "audit_allow" | "audit_deny" => "allow",
                d => d,
            };
            cases += 1;
            if got != explained {
                disagreements.push(format!(
                    "seed {seed}: {c:?}\n  sidecar: {got} ({})\n  authz check: {} ({})",
                    resp.lines().next().unwrap_or_default(),
                    e.decision,
                    e.reason
                ));
            }
        }
        if !disagreements.is_empty() {
            panic!("{} of {cases} cases disagree under\n{yaml}\n{}", disagreements.len(), disagreements.join("\n"));
        }
    }
    assert_eq!(cases, 240);
}
