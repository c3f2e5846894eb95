//! Request authentication end to end: the mesh's OAuth token service used
//! by a real OAuth client (authlib), its tokens checked by a real JOSE
//! library (PyJWT) against the published JWKS; tokens of an external issuer
//! minted by PyJWT (RS256, PS256, ES256, EdDSA) whose keys the control plane
//! fetches from a real HTTPS JWKS endpoint; the RFC 8725 attack set; API
//! keys; all enforced by the callee's sidecar behind a caller's sidecar over mTLS.

use std::process::Command;
use std::time::{Duration, Instant};

use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Proc, Sidecar, eventually, free_port, repo_root, skip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dataplane::{ORDERS, WEB};

fn python_ready(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import jwt, authlib, requests, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(
            test,
            "python3 lacks pyjwt, authlib, requests or cryptography (pip install pyjwt authlib requests-oauthlib)",
        );
    }
    ok
}

/// Runs the Python peer without blocking the runtime (the test's app serves on it).
async fn peer(args: &[&str]) -> String {
    let out = tokio::process::Command::new("python3")
        .arg(repo_root().join("tests/python/oauth_peer.py"))
        .args(args)
        .output()
        .await
        .expect("invariant: python3 runs");
    assert!(out.status.success(), "oauth_peer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

struct Mesh {
    tmp: tempfile::TempDir,
    cp: ControlPlane,
    server: Sidecar,
    web: Sidecar,
    port: u16,
}

async fn mesh(cp_args: &[&str], app: std::net::SocketAddr) -> Mesh {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), cp_args).await.unwrap();
    let server = Sidecar::meshed("orders", &cp, tmp.path(), ORDERS, &["--app", &app.to_string()]).await.unwrap();
    let port = free_port();
    let web = Sidecar::meshed("web", &cp, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")])
        .await
        .unwrap();
    Mesh { tmp, cp, server, web, port }
}

impl Mesh {
    fn ctl(&self, args: &[&str]) -> String {
        let out = self.cp.ctl(args);
        assert!(out.status.success(), "palisadectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    async fn apply(&self, name: &str, yaml: &str) {
        let f = self.tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        self.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "--wait", "10s"]);
    }

    /// Every log line the mesh wrote.
    fn logs(&self) -> String {
        [&self.cp.proc, &self.server.proc, &self.web.proc].iter().map(|p| p.logs()).collect()
    }

    async fn refused(&self, reason: &str) -> f64 {
        let metrics = self.server.get("/metrics").await.unwrap().1;
        let want = format!("palisade_request_authentications_total{{result=\"refused\",reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(want.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    }
}

/// One HTTP/1.1 request through web's sidecar; the whole response.
async fn call(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let body = if method == "POST" { "content-length: 0\r\n" } else { "" };
    let req = format!("{method} {path} HTTP/1.1\r\nHost: orders\r\n{extra}{body}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The headers the app saw (its /echo answer).
fn app_headers(resp: &str) -> serde_json::Value {
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(body).map(|v| v["headers"].clone()).unwrap_or_default()
}

fn mesh_policies(issuer: &str) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1
kind: AuthenticationPolicy
metadata: {{name: orders-api, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  jwt:
    - issuer: {issuer}
      audiences: [orders]
      typ: at+jwt
      claimsToHeaders: [{{claim: client_id, header: x-client-id}}, {{claim: scope, header: x-scope}}]
---
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {{name: orders-clients, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  action: ALLOW
  rules:
    - from: [{{identities: ["{WEB}"], requestPrincipals: ["{issuer}/*"]}}]
      to: [{{methods: [GET]}}]
      when: [{{claim: scope, values: [orders.read]}}]
    - from: [{{identities: ["{WEB}"], requestPrincipals: ["{issuer}/*"]}}]
      to: [{{methods: [POST]}}]
      when: [{{claim: scope, values: [orders.write]}}]
---
apiVersion: palisade.dev/v1
kind: RateLimitPolicy
metadata: {{name: per-client, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  limits:
    - {{name: per-client, key: principal, algorithm: token_bucket, rate: 1, period: 1h, burst: 4, match: {{paths: ["/hello"]}}}}
"#
    )
}

#[tokio::test]
async fn mesh_oauth_tokens_from_a_real_client_are_enforced_through_two_sidecars() {
    if !python_ready("mesh_oauth_tokens_from_a_real_client_are_enforced_through_two_sidecars") {
        return;
    }
    let app = HttpApp::start().await;
    let oauth_port = free_port();
    let listen = format!("127.0.0.1:{oauth_port}");
    let m = mesh(&["--oauth-listen", &listen], app.addr).await;
    let issuer = format!("https://{listen}");
    let token_url = format!("{issuer}/oauth2/token");
    let cacert = m.cp.bundle().to_str().unwrap().to_string();

    // Register a client: client_id and client_secret, once.
    let created: serde_json::Value = serde_json::from_str(&m.ctl(&[
        "oauth",
        "client",
        "create",
        "--name",
        "billing",
        "--scopes",
        "orders.read,orders.write",
        "--audiences",
        "orders",
        "-o",
        "json",
    ]))
    .unwrap();
    let (id, secret) = (created["client_id"].as_str().unwrap(), created["client_secret"].as_str().unwrap());
    let reader: serde_json::Value = serde_json::from_str(&m.ctl(&[
        "oauth",
        "client",
        "create",
        "--name",
        "reader",
        "--scopes",
        "orders.read",
        "--audiences",
        "orders",
        "-o",
        "json",
    ]))
    .unwrap();
    m.apply("mesh", &mesh_policies(&issuer)).await;

    // authlib fetches a token (client_secret_basic) and calls the service with it.
    let url = format!("http://127.0.0.1:{}/echo", m.port);
    let out: serde_json::Value = serde_json::from_str(
        &peer(&[
            "client",
            "--token-url",
            &token_url,
            "--client-id",
            id,
            "--client-secret",
            secret,
            "--cacert",
            &cacert,
            "--url",
            &url,
            "--scope",
            "orders.read orders.write",
        ])
        .await,
    )
    .unwrap();
    assert_eq!(out["status"], 200, "{out}");
    let token = out["token"].as_str().unwrap().to_string();
    let seen: serde_json::Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["x-palisade-request-principal"], format!("{issuer}/{id}").as_str(), "{h}");
    assert_eq!(h["x-client-id"], id);
    assert_eq!(h["x-scope"], "orders.read,orders.write");
    assert_eq!(h["x-palisade-peer-identity"], WEB);
    assert!(h.get("authorization").is_none(), "the token must not reach the app: {h}");

    // PyJWT verifies the control plane's token against its published JWKS (RFC 9068 profile).
    let v: serde_json::Value = serde_json::from_str(
        &peer(&[
            "verify",
            "--jwks-url",
            &format!("{issuer}/.well-known/jwks.json"),
            "--cacert",
            &cacert,
            "--token",
            &token,
            "--issuer",
            &issuer,
            "--audience",
            "orders",
        ])
        .await,
    )
    .unwrap();
    assert_eq!(v["header"]["typ"], "at+jwt");
    assert_eq!(v["header"]["alg"], "ES256");
    assert_eq!(v["claims"]["client_id"], id);
    assert_eq!(v["claims"]["sub"], id);
    assert_eq!(v["claims"]["scope"], "orders.read orders.write");

    // 401 without a token (the challenge alone), 401 invalid_token with a bad one.
    let r = call(m.port, "GET", "/echo", &[]).await;
    assert_eq!(status(&r), 401, "{r}");
    assert_eq!(header(&r, "www-authenticate"), Some("Bearer realm=\"palisade\""));
    let r = call(m.port, "GET", "/echo", &[("authorization", "Bearer not.a.token")]).await;
    assert_eq!(status(&r), 401);
    assert_eq!(header(&r, "www-authenticate"), Some("Bearer realm=\"palisade\", error=\"invalid_token\""));
    assert!(!r.contains("malformed"), "the reason stays in the audit log: {r}");

    // Spoofed principal and claim headers are replaced by the verified ones.
    let bearer = format!("Bearer {token}");
    let r = call(
        m.port,
        "GET",
        "/echo",
        &[("authorization", &bearer), ("x-palisade-request-principal", "admin"), ("x-client-id", "someone-else")],
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
    let h = app_headers(&r);
    assert_eq!(h["x-palisade-request-principal"], format!("{issuer}/{id}").as_str());
    assert_eq!(h["x-client-id"], id);

    // A reader's token may GET but not POST: 403, and authz check explains both.
    let rtoken = serde_json::from_str::<serde_json::Value>(
        &peer(&[
            "client",
            "--token-url",
            &token_url,
            "--client-id",
            reader["client_id"].as_str().unwrap(),
            "--client-secret",
            reader["client_secret"].as_str().unwrap(),
            "--cacert",
            &cacert,
            "--url",
            &url,
        ])
        .await,
    )
    .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let rbearer = format!("Bearer {rtoken}");
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("authorization", &rbearer)]).await), 200);
    assert_eq!(status(&call(m.port, "POST", "/echo", &[("authorization", &rbearer)]).await), 403);
    assert_eq!(status(&call(m.port, "POST", "/echo", &[("authorization", &bearer)]).await), 200);
    let principal = format!("{issuer}/{}", reader["client_id"].as_str().unwrap());
    let check = |method: &str, scope: &str| -> serde_json::Value {
        let claim = format!("scope={scope}");
        serde_json::from_str(&m.ctl(&[
            "authz",
            "check",
            "--from",
            WEB,
            "--to",
            ORDERS,
            "--method",
            method,
            "--path",
            "/echo",
            "--principal",
            &principal,
            "--claim",
            &claim,
            "-o",
            "json",
        ]))
        .unwrap()
    };
    let deny = check("POST", "orders.read");
    assert_eq!(deny["decision"], "deny", "{deny}");
    assert!(deny["reason"].as_str().unwrap().contains("none of their rules matched"), "{deny}");
    let anonymous: serde_json::Value =
        serde_json::from_str(&m.ctl(&[
            "authz", "check", "--from", WEB, "--to", ORDERS, "--method", "GET", "--path", "/echo", "-o", "json",
        ]))
        .unwrap();
    assert_eq!(anonymous["decision"], "unauthenticated", "{anonymous}");
    assert_eq!(anonymous["policy"], "shop/orders-api", "{anonymous}");
    let allow = check("POST", "orders.read orders.write");
    assert_eq!((allow["decision"].as_str(), allow["rule"].as_i64()), (Some("allow"), Some(1)), "{allow}");

    // Per-client quotas: each client its own bucket of 4.
    for _ in 0..4 {
        assert_eq!(status(&call(m.port, "GET", "/hello", &[("authorization", &bearer)]).await), 200);
    }
    let r = call(m.port, "GET", "/hello", &[("authorization", &bearer)]).await;
    assert_eq!(status(&r), 429, "{r}");
    assert_eq!(status(&call(m.port, "GET", "/hello", &[("authorization", &rbearer)]).await), 200);

    // The token endpoint's errors, by the RFC.
    let http = |args: &[&str]| -> (u16, serde_json::Value) {
        let mut all = vec!["-s", "-o", "-", "-w", "\n%{http_code}", "--cacert", &cacert];
        all.extend_from_slice(args);
        let out = Command::new("curl").args(&all).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), serde_json::from_str(body).unwrap_or_default())
    };
    let basic = format!("{id}:{secret}");
    let (c, e) = http(&["-u", &basic, "-d", "grant_type=password", &token_url]);
    assert_eq!((c, e["error"].as_str()), (400, Some("unsupported_grant_type")));
    let (c, e) = http(&["-u", &basic, "-d", "grant_type=client_credentials", "-d", "scope=admin", &token_url]);
    assert_eq!((c, e["error"].as_str()), (400, Some("invalid_scope")));
    let (c, e) = http(&[
        "-d",
        "grant_type=client_credentials",
        "-d",
        &format!("client_id={id}"),
        "-d",
        &format!("client_secret={secret}"),
        &token_url,
    ]);
    assert_eq!((c, e["token_type"].as_str()), (200, Some("Bearer")), "client_secret_post: {e}");
    let (c, _) = http(&["-d", "grant_type=client_credentials", &token_url]);
    assert_eq!(c, 401);
    // Brute force: after 5 wrong secrets the client is locked out, even with the right one.
    for _ in 0..5 {
        let (c, e) = http(&["-u", &format!("{id}:wrong"), "-d", "grant_type=client_credentials", &token_url]);
        assert_eq!((c, e["error"].as_str()), (401, Some("invalid_client")));
    }
    let (c, _) = http(&["-u", &basic, "-d", "grant_type=client_credentials", &token_url]);
    assert_eq!(c, 429, "locked out");
    let (c, meta) = http(&[&format!("{issuer}/.well-known/oauth-authorization-server")]);
    assert_eq!((c, meta["issuer"].as_str()), (200, Some(issuer.as_str())));
    assert_eq!(meta["token_endpoint"], token_url.as_str());

    // A token next to an API key for another principal: one request acts as
    // one principal, so it is refused (401), or a DENY of either principal
    // could be walked around with the other; authz check says the same.
    m.apply("keys", &mesh_policies(&issuer).replacen("  jwt:\n", "  apiKeys: {header: x-api-key}\n  jwt:\n", 1)).await;
    let created: serde_json::Value =
        serde_json::from_str(&m.ctl(&["apikey", "create", "--name", "ci", "--principal", "team/ci", "-o", "json"]))
            .unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    eventually("the key reaches the sidecar", Duration::from_secs(10), || async {
        (status(&call(m.port, "GET", "/echo", &[("x-api-key", &key)]).await) == 403).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("authorization", &bearer)]).await), 200, "the token alone");
    let r = call(m.port, "GET", "/echo", &[("authorization", &bearer), ("x-api-key", &key)]).await;
    assert_eq!(status(&r), 401, "a token and a key for two principals: {r}");
    assert!(!r.contains("principal_conflict"), "the reason stays in the audit log: {r}");
    assert!(m.refused("principal_conflict").await >= 1.0);
    let both: serde_json::Value = serde_json::from_str(&m.ctl(&[
        "authz",
        "check",
        "--from",
        WEB,
        "--to",
        ORDERS,
        "--path",
        "/echo",
        "--header",
        &format!("authorization={bearer}"),
        "--header",
        &format!("x-api-key={key}"),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(both["decision"], "unauthenticated", "{both}");

    // Neither the secret nor any token is ever logged; the refusals are, with their reason.
    let logs = m.logs();
    for s in [secret, &token, &rtoken, &key] {
        assert!(!logs.contains(s), "a secret or token reached a log");
    }
    assert!(logs.contains("reason=\"malformed\"") || logs.contains("reason=malformed"), "audit reason missing");
    assert!(m.refused("missing_credential").await >= 1.0);
}

async fn mint(dir: &str, iss: &str, case: &str) -> String {
    peer(&["mint", dir, "--case", case, "--iss", iss, "--aud", "orders", "--claims", r#"{"tenant": "acme"}"#]).await
}

fn external_policies(issuer: &str, jwks_uri: &str) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1
kind: AuthenticationPolicy
metadata: {{name: idp, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  jwt:
    - issuer: {issuer}
      audiences: [orders]
      jwksUri: {jwks_uri}
      claimsToHeaders: [{{claim: tenant, header: x-tenant}}]
---
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {{name: idp-users, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  action: ALLOW
  rules:
    - from: [{{requestPrincipals: ["{issuer}/*"]}}]
"#
    )
}

#[tokio::test]
async fn external_issuer_tokens_verify_and_the_rfc8725_attack_set_is_refused() {
    if !python_ready("external_issuer_tokens_verify_and_the_rfc8725_attack_set_is_refused") {
        return;
    }
    let idp = tempfile::tempdir().unwrap();
    let dir = idp.path().to_str().unwrap();
    peer(&["keys", dir]).await;
    let jwks_port = free_port();
    let mut server = Proc::spawn(
        "jwks",
        Command::new("python3").arg(repo_root().join("tests/python/oauth_peer.py")).args([
            "serve",
            dir,
            "--port",
            &jwks_port.to_string(),
        ]),
        idp.path(),
    )
    .unwrap();
    eventually("the JWKS server", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", jwks_port)).is_ok().then_some(())
    })
    .await
    .unwrap();
    let ca = format!("{dir}/ca.pem");
    let app = HttpApp::start().await;
    let m = mesh(&["--jwks-ca-file", &ca, "--jwks-min-refresh-interval", "1s"], app.addr).await;
    let (iss, jwks_uri) = ("https://idp.test", format!("https://127.0.0.1:{jwks_port}/jwks.json"));
    m.apply("idp", &external_policies(iss, &jwks_uri)).await;

    for case in ["good-rs256", "good-ps256", "good-es256", "good-eddsa"] {
        let t = format!("Bearer {}", mint(dir, iss, case).await);
        let r = call(m.port, "GET", "/echo", &[("authorization", &t), ("x-tenant", "spoofed")]).await;
        assert_eq!(status(&r), 200, "{case}: {r}");
        let h = app_headers(&r);
        assert_eq!(h["x-palisade-request-principal"], "https://idp.test/user-1", "{case}");
        assert_eq!(h["x-tenant"], "acme", "{case}: the claim header cannot be spoofed");
    }
    let attacks = [
        ("none", "algorithm_not_allowed"),
        ("hs256-public-key", "algorithm_not_allowed"),
        ("unknown-kid", "unknown_key"),
        ("tampered", "bad_signature"),
        ("expired", "expired"),
        ("not-yet-valid", "not_yet_valid"),
        ("wrong-iss", "unknown_issuer"),
        ("wrong-aud", "wrong_audience"),
        ("jku", "bad_signature"),
        ("oversized", "too_large"),
    ];
    for (case, reason) in attacks {
        let before = m.refused(reason).await;
        let t = format!("Bearer {}", mint(dir, iss, case).await);
        let r = call(m.port, "GET", "/echo", &[("authorization", &t)]).await;
        assert_eq!(status(&r), 401, "{case}: {r}");
        assert_eq!(
            header(&r, "www-authenticate"),
            Some("Bearer realm=\"palisade\", error=\"invalid_token\""),
            "{case}"
        );
        assert_eq!(m.refused(reason).await, before + 1.0, "{case} counted as {reason}");
    }
    assert!(!std::fs::read_to_string(format!("{dir}/fetches")).unwrap_or_default().is_empty());

    // The issuer rotates: a token signed with a new key is refused once (unknown kid), the
    // sidecar asks the control plane to fetch the key set again, and the retry passes.
    peer(&["rotate", dir]).await;
    let t = format!("Bearer {}", mint(dir, iss, "rotated").await);
    let first = call(m.port, "GET", "/echo", &[("authorization", &t)]).await;
    assert_eq!(status(&first), 401, "the new kid is not known yet");
    eventually("the rotated key reaches the sidecar", Duration::from_secs(10), || async {
        (status(&call(m.port, "GET", "/echo", &[("authorization", &t)]).await) == 200).then_some(())
    })
    .await
    .unwrap();
    let _ = server.terminate(Duration::from_secs(2));
}

#[tokio::test]
async fn api_keys_are_accepted_limited_per_key_and_refused_within_a_second_of_revocation() {
    let app = HttpApp::start().await;
    let m = mesh(&[], app.addr).await;
    let yaml = format!(
        r#"apiVersion: palisade.dev/v1
kind: AuthenticationPolicy
metadata: {{name: keys, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  apiKeys: {{header: x-api-key}}
---
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {{name: key-holders, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  action: ALLOW
  rules:
    - from: [{{apiKeys: ["ci", "batch"]}}]
---
apiVersion: palisade.dev/v1
kind: RateLimitPolicy
metadata: {{name: per-key, namespace: shop}}
spec:
  target: {{identities: ["{ORDERS}"]}}
  limits:
    - {{name: per-key, key: api_key, algorithm: fixed_window, rate: 3, period: 1h, match: {{paths: ["/hello"]}}}}
"#
    );
    m.apply("keys", &yaml).await;
    let key = |name: &str, extra: &[&str]| -> String {
        let mut args = vec!["apikey", "create", "--name", name, "--principal", "team/ci", "-o", "json"];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&m.ctl(&args)).unwrap();
        assert_eq!(v["name"], name);
        v["key"].as_str().unwrap().to_string()
    };
    let (ci, batch, other, short) =
        (key("ci", &[]), key("batch", &[]), key("other", &[]), key("short", &["--expires", "2s"]));
    // Another namespace's key never reaches this sidecar.
    let foreign = key("batch-billing", &["--namespace", "billing"]);
    eventually("the keys reach the sidecar", Duration::from_secs(5), || async {
        (status(&call(m.port, "GET", "/echo", &[("x-api-key", &ci)]).await) == 200).then_some(())
    })
    .await
    .unwrap();
    let r = call(m.port, "GET", "/echo", &[("x-api-key", &ci)]).await;
    let h = app_headers(&r);
    assert_eq!(h["x-palisade-request-principal"], "team/ci");
    assert!(h.get("x-api-key").is_none(), "the key must not reach the app: {h}");
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("x-api-key", &other)]).await), 403, "not allowed by name");
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("x-api-key", "pal_guess")]).await), 401);
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("x-api-key", &foreign)]).await), 401);
    assert_eq!(status(&call(m.port, "GET", "/echo", &[]).await), 401);
    // gRPC callers get status 16 (UNAUTHENTICATED), with the challenge.
    let r = call(m.port, "POST", "/echo.Echo/Say", &[("content-type", "application/grpc")]).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("grpc-status: 16"), "{r}");
    assert_eq!(header(&r, "www-authenticate"), Some("Bearer realm=\"palisade\""));
    // Per-key quota: ci's 3, then 429; batch has its own.
    for _ in 0..3 {
        assert_eq!(status(&call(m.port, "GET", "/hello", &[("x-api-key", &ci)]).await), 200);
    }
    assert_eq!(status(&call(m.port, "GET", "/hello", &[("x-api-key", &ci)]).await), 429);
    assert_eq!(status(&call(m.port, "GET", "/hello", &[("x-api-key", &batch)]).await), 200);
    // Expiry.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("x-api-key", &short)]).await), 401);

    // Revocation reaches the sidecar within a second.
    m.ctl(&["apikey", "revoke", "ci"]);
    let revoked = Instant::now();
    loop {
        let s = status(&call(m.port, "GET", "/echo", &[("x-api-key", &ci)]).await);
        if s == 401 {
            break;
        }
        assert!(revoked.elapsed() < Duration::from_secs(1), "still {s} {:?} after revoking", revoked.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("x-api-key", &batch)]).await), 200, "others unaffected");

    // The key is never in the API (after creation), the sidecar's /config, or any log.
    let listed = m.ctl(&["apikey", "list", "-o", "json"]);
    let config = m.server.get("/config").await.unwrap().1;
    let logs = m.logs();
    for k in [&ci, &batch, &other, &short, &foreign] {
        assert!(!listed.contains(k.as_str()) && !config.contains(k.as_str()) && !logs.contains(k.as_str()));
    }
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().iter().find(|k| k["name"] == "ci").unwrap()["revoked"], true);
    let _ = &m.web;
}

/// Opaque TCP cannot carry a request credential: once an AuthenticationPolicy
/// requires one, TCP connections to the workload are refused, and counted.
#[tokio::test]
async fn required_authentication_closes_the_opaque_tcp_way_around() {
    let echo = palisade_tests::apps::tcp_echo().await;
    let p = crate::dataplane::pair(echo, &[], &["--opaque-port", &echo.port().to_string()], &[]).await;
    let talk = || async {
        let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
        s.write_all(b"\x00\x01binary payload").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    };
    assert_eq!(talk().await, b"echo:\x00\x01binary payload", "allowed before");
    let f = p.tmp.path().join("authn.yaml");
    std::fs::write(
        &f,
        format!(
            "apiVersion: palisade.dev/v1\nkind: AuthenticationPolicy\nmetadata: {{name: keys, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  apiKeys: {{}}\n"
        ),
    )
    .unwrap();
    let out = p.cp.ctl(&["policy", "apply", "-f", f.to_str().unwrap(), "--wait", "10s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(talk().await, b"", "refused once a credential is required");
    let metrics = p.server.get("/metrics").await.unwrap().1;
    assert!(
        metrics.contains("palisade_request_authentications_total{result=\"refused\",reason=\"missing_credential\"} 1"),
        "{metrics}"
    );
}

/// The mesh's signing key rotates by `kid`: the next key reaches the
/// sidecars before it signs, so tokens of the old and the new key both pass.
#[tokio::test]
async fn the_mesh_signing_key_rotates_without_a_refused_token() {
    let app = HttpApp::start().await;
    let oauth_port = free_port();
    let listen = format!("127.0.0.1:{oauth_port}");
    let m =
        mesh(&["--oauth-listen", &listen, "--oauth-key-rotation", "4s", "--oauth-token-ttl", "60s"], app.addr).await;
    let issuer = format!("https://{listen}");
    let created: serde_json::Value = serde_json::from_str(&m.ctl(&[
        "oauth",
        "client",
        "create",
        "--name",
        "svc",
        "--scopes",
        "orders.read",
        "--audiences",
        "orders",
        "-o",
        "json",
    ]))
    .unwrap();
    m.apply("mesh", &mesh_policies(&issuer)).await;
    let cacert = m.cp.bundle().to_str().unwrap().to_string();
    let basic = format!("{}:{}", created["client_id"].as_str().unwrap(), created["client_secret"].as_str().unwrap());
    let token = || async {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "--cacert", &cacert, "-u", &basic, "-d", "grant_type=client_credentials"])
            .arg(format!("{issuer}/oauth2/token"))
            .output()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["access_token"].as_str().unwrap().to_string()
    };
    let kid = |t: &str| {
        use base64::Engine;
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.split('.').next().unwrap()).unwrap();
        serde_json::from_slice::<serde_json::Value>(&h).unwrap()["kid"].as_str().unwrap().to_string()
    };
    let first = token().await;
    let mut kids = vec![kid(&first)];
    let mut tokens = vec![first];
    // Over ~10 s: every token issued is accepted at once, whatever key signed it.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let t = token().await;
        let bearer = format!("Bearer {t}");
        let r = call(m.port, "GET", "/echo", &[("authorization", &bearer)]).await;
        assert_eq!(status(&r), 200, "token of key {} refused: {r}", kid(&t));
        if !kids.contains(&kid(&t)) {
            kids.push(kid(&t));
        }
        tokens.push(t);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(kids.len() >= 2, "the key rotated: {kids:?}");
    // A token of the first key still passes while it lives.
    let bearer = format!("Bearer {}", tokens[0]);
    assert_eq!(status(&call(m.port, "GET", "/echo", &[("authorization", &bearer)]).await), 200);
    assert_eq!(m.refused("unknown_key").await, 0.0);
}
