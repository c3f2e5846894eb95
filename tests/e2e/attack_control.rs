//! The control plane, attacked from outside (findings 5, 7 and 8 of "Fail
//! closed"): a workload forging audit lines through its NACK text, anyone
//! knowing a client_id locking that OAuth client out (and churn unlocking a
//! guesser), slow key set servers holding every other fetch and `policy
//! apply`. Real processes, real TLS, loopback source addresses; every loop
//! bounded in count and time.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use palisade_tests::{ControlPlane, eventually, free_port, grpc};
use tokio::net::TcpSocket;

use crate::attack::workload_svid;

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// Finding 5: a NACK's version and error are written escaped (and quoted):
/// a workload cannot add a line, an audit one least of all, to the
/// control plane's log.
#[tokio::test]
async fn attack_control_a_nack_cannot_forge_a_log_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let svid = workload_svid(&cp, ORDERS).await;
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    let ch = grpc::channel(&cp.addr, &bundle, Some(svid)).await.unwrap();
    let (tx, mut updates) = palisade_tests::config::subscribe(ch, "").await;
    let first = tokio::time::timeout(Duration::from_secs(10), updates.message()).await.unwrap().unwrap().unwrap();
    let forged = "2030-01-01T00:00:00.000000Z  INFO audit: event=\"admin_authorized\" src.identity=spiffe://cluster.local/palisade/admin forged_marker";
    let rejected = [(format!("policy\n{forged}"), format!("bad policy\r\n{forged}\x1b[2K\x1b]0;title\x07"))];
    tx.send(palisade_tests::config::nack(first.nonce, rejected)).await.unwrap();
    let logs = eventually("the NACK in the control plane's log", Duration::from_secs(10), || async {
        let logs = cp.proc.logs();
        logs.contains("config_nack").then_some(logs)
    })
    .await
    .unwrap();
    let marked: Vec<&str> = logs.lines().filter(|l| l.contains("forged_marker")).collect();
    assert!(!marked.is_empty(), "{logs}");
    for line in &marked {
        assert!(line.contains("event=\"config_nack\""), "a forged line in the log: {line:?}\n{logs}");
        assert!(!line.contains("forged_marker\"") || line.contains("\\n2030"), "{line}");
    }
    assert_eq!(marked.len(), 1, "rejected types and errors on one line, escaped: {marked:?}");
    let line = marked[0];
    assert!(line.contains("rejected=[\"policy\\n2030"), "{line}");
    assert!(line.contains("bad policy\\r\\n2030"), "{line}");
    assert!(line.contains("event=\\\"admin_authorized\\\""), "quoted inside the field: {line}");
    // The operator's terminal: `palisadectl proxies` shows the NACK on one
    // row, no control character raw (no CR, ESC or BEL to rewrite the screen).
    let shown = eventually("the NACK in `palisadectl proxies`", Duration::from_secs(10), || async {
        let shown = String::from_utf8_lossy(&cp.ctl(&["proxies"]).stdout).into_owned();
        shown.contains("nacked").then_some(shown)
    })
    .await
    .unwrap();
    assert!(shown.contains("forged_marker"), "{shown}");
    assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "raw control characters: {shown:?}");
    assert_eq!(shown.lines().filter(|l| l.contains("forged_marker")).count(), 1, "{shown}");
    assert!(!shown.lines().any(|l| l.starts_with("2030")), "a forged row: {shown}");
    drop(tx);
}

/// TLS to the control plane's HTTPS listeners (its bundle), HTTP/1.1.
fn https_client(cp: &ControlPlane) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in palisade_certs::ca::parse_pem_certs(&std::fs::read_to_string(cp.bundle()).unwrap()).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(palisade_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One keep-alive connection to the token endpoint from the loopback address `src`.
struct TokenConn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl TokenConn {
    async fn open(tls: &Arc<rustls::ClientConfig>, src: Ipv4Addr, port: u16) -> Self {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from((src, 0))).unwrap();
        let tcp = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Self(sender)
    }

    /// A client credentials request (client_secret_post); status and body.
    async fn token(&mut self, id: &str, secret: &str) -> (u16, String) {
        self.0.ready().await.unwrap();
        let body = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
        let req = http::Request::post("/oauth2/token")
            .header("host", "127.0.0.1")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = self.0.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// A control plane with the token service, and one client registered.
async fn token_service(tmp: &std::path::Path) -> (ControlPlane, u16, String, String) {
    let port = free_port();
    let cp =
        ControlPlane::start(&tmp.join("data"), tmp, &["--oauth-listen", &format!("127.0.0.1:{port}")]).await.unwrap();
    let out = cp.ctl(&["oauth", "client", "create", "--name", "svc", "--scopes", "read", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, secret) = (client["client_id"].as_str().unwrap(), client["client_secret"].as_str().unwrap());
    (cp, port, id.to_string(), secret.to_string())
}

const GUESSER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HOLDER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Finding 7a: wrong secrets from one address hold that address off the
/// client, never the holder of the secret elsewhere.
#[tokio::test]
async fn attack_control_knowing_a_client_id_cannot_lock_its_holder_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (cp, port, id, secret) = token_service(tmp.path()).await;
    let tls = https_client(&cp);
    let mut guesser = TokenConn::open(&tls, GUESSER, port).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(guesser.token(&id, "wrong").await.0);
    }
    assert_eq!(codes, [401, 401, 401, 401, 401, 429], "the guesser is held off");
    let (c, body) = TokenConn::open(&tls, HOLDER, port).await.token(&id, &secret).await;
    assert_eq!(c, 200, "the holder, from its own address, gets a token: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["token_type"], "Bearer");
    // The guesser's address learns nothing, not even from the right secret.
    assert_eq!(TokenConn::open(&tls, GUESSER, port).await.token(&id, &secret).await.0, 429);
    assert!(!cp.proc.logs().contains(&secret), "the secret never reaches the log");
}

/// Finding 7b: failures with thousands of other client ids, from hundreds
/// of addresses, do not flush the table that holds a guesser off.
#[tokio::test]
async fn attack_control_churn_does_not_unlock_a_throttled_guesser() {
    let tmp = tempfile::tempdir().unwrap();
    let (cp, port, id, secret) = token_service(tmp.path()).await;
    let tls = https_client(&cp);
    let mut guesser = TokenConn::open(&tls, GUESSER, port).await;
    for _ in 0..5 {
        assert_eq!(guesser.token(&id, "wrong").await.0, 401);
    }
    assert_eq!(guesser.token(&id, "wrong").await.0, 429);
    // 520 addresses x 20 other ids (each address up to its own limit): 10,400 failures,
    // more than the 10,000 entries the old table kept. Eight addresses at a time.
    let started = Instant::now();
    let failures = Arc::new(AtomicU64::new(0));
    let next = Arc::new(Mutex::new(0u32..520));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (tls, failures, next) = (tls.clone(), failures.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let Some(i) = next.lock().unwrap().next() else { break };
                let src = Ipv4Addr::new(127, 0, 10 + (i / 250) as u8, 1 + (i % 250) as u8);
                let mut conn = TokenConn::open(&tls, src, port).await;
                for j in 0..20 {
                    let c = conn.token(&format!("churn-{i}-{j}"), "x").await.0;
                    assert_eq!(c, 401, "{src} id {j}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(240), w).await.expect("churn within 4 minutes").unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 10_400);
    eprintln!("churn took {:?}", started.elapsed());
    let mut guesser = TokenConn::open(&tls, GUESSER, port).await;
    assert_eq!(guesser.token(&id, "wrong").await.0, 429, "still held off after the churn");
    let (c, body) = TokenConn::open(&tls, HOLDER, port).await.token(&id, &secret).await;
    assert_eq!(c, 200, "{body}");
}

/// An HTTPS key set server on loopback, with its CA file; counts requests
/// and records when the first came.
async fn fast_jwks_server(dir: &std::path::Path) -> (u16, std::path::PathBuf, Arc<Mutex<Option<Instant>>>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &*ca).unwrap();
    let ca_file = dir.join("jwks-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(palisade_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first = Arc::new(Mutex::new(None));
    let seen = first.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    seen.lock().unwrap().get_or_insert_with(Instant::now);
                    let body = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    (port, ca_file, first)
}

fn jwt_policy(name: &str, uri: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: AuthenticationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  target: {{identities: [\"{ORDERS}\"]}}\n  jwt: [{{issuer: https://{name}.test, audiences: [orders], jwksUri: \"{uri}\"}}]\n"
    )
}

/// Finding 8: three key set servers that never answer hold neither a fast
/// one nor `policy apply`, which stores the policies, returns at once and
/// says which key sets are pending.
#[tokio::test]
async fn attack_control_slow_key_set_servers_hold_neither_other_fetches_nor_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let (fast_port, ca_file, first_fetch) = fast_jwks_server(tmp.path()).await;
    // Servers that accept connections (the kernel does) and never answer.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &["--jwks-ca-file", ca_file.to_str().unwrap(), "--jwks-min-refresh-interval", "1s"],
    )
    .await
    .unwrap();
    let mut doc: Vec<String> = silent
        .iter()
        .enumerate()
        .map(|(i, l)| {
            jwt_policy(&format!("slow{i}"), &format!("https://127.0.0.1:{}/jwks.json", l.local_addr().unwrap().port()))
        })
        .collect();
    doc.push(jwt_policy("fast", &format!("https://127.0.0.1:{fast_port}/jwks.json")));
    let file = tmp.path().join("policies.yaml");
    std::fs::write(&file, doc.join("---\n")).unwrap();
    let started = Instant::now();
    let out = cp.ctl(&["policy", "apply", "-f", file.to_str().unwrap(), "-o", "json"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "apply: {stderr}");
    assert!(took < Duration::from_secs(5), "apply waited {took:?} on key set servers");
    assert_eq!(stderr.matches("pending").count(), 4, "each new key set is said to be pending: {stderr}");
    let applied: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(applied.as_array().map(Vec::len), Some(4), "{applied}");
    // The fast set is fetched at once, whatever the silent servers do.
    let at = eventually("the fast key set fetched", Duration::from_secs(5), || async {
        first_fetch.lock().unwrap().map(|t| t.duration_since(started))
    })
    .await
    .unwrap();
    assert!(at < Duration::from_secs(3), "the fast key set waited {at:?}");
    eventually("the fast key set stored", Duration::from_secs(5), || async {
        cp.proc
            .logs()
            .lines()
            .any(|l| l.contains("jwks_fetched") && l.contains(&format!(":{fast_port}/")))
            .then_some(())
    })
    .await
    .unwrap();
    // Applying again names the held set as such and the others as pending, at once.
    let started = Instant::now();
    let out = cp.ctl(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(String::from_utf8_lossy(&out.stderr).matches("pending").count(), 3);
    drop(silent);
}
