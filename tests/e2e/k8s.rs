//! Kubernetes ServiceAccount-token attestation against a local HTTPS server
//! that answers the TokenReview API the way kube-apiserver does (no API
//! server runs here).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use palisade_tests::{ControlPlane, Sidecar, eventually};
use serde_json::json;

/// Starts the fake API server; returns its address, CA PEM and the requests it saw.
async fn token_review_server(
    dir: &std::path::Path,
) -> (String, std::path::PathBuf, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &*ca).unwrap();
    let ca_file = dir.join("apiserver-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let tls = rustls::ServerConfig::builder_with_provider(palisade_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let path = req.uri().path().to_string();
                        let body: serde_json::Value =
                            serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
                                .unwrap_or_default();
                        seen.lock().unwrap().push((auth.clone(), body.clone()));
                        let (code, resp) = if path != "/apis/authentication.k8s.io/v1/tokenreviews"
                            || auth != "Bearer cp-own-token"
                        {
                            (401, json!({"kind": "Status", "code": 401}))
                        } else {
                            let status = match body["spec"]["token"].as_str() {
                                Some("good-sa-token") => {
                                    json!({"authenticated": true, "user": {"username": "system:serviceaccount:shop:orders"}, "audiences": ["palisade"]})
                                }
                                Some("user-token") => {
                                    json!({"authenticated": true, "user": {"username": "alice"}, "audiences": ["palisade"]})
                                }
                                Some("wrong-aud-token") => {
                                    json!({"authenticated": true, "user": {"username": "system:serviceaccount:shop:orders"}, "audiences": ["other"]})
                                }
                                _ => {
                                    json!({"authenticated": false, "error": "invalid bearer token"})
                                }
                            };
                            (
                                201,
                                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}),
                            )
                        };
                        let mut r = hyper::Response::new(Full::new(Bytes::from(resp.to_string())));
                        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    (format!("https://127.0.0.1:{}", addr.port()), ca_file, seen)
}

#[tokio::test]
async fn sidecar_attests_with_a_service_account_token_via_token_review() {
    let tmp = tempfile::tempdir().unwrap();
    let (api, ca_file, seen) = token_review_server(tmp.path()).await;
    let own_token = tmp.path().join("cp-token");
    std::fs::write(&own_token, "cp-own-token\n").unwrap();
    let cp = ControlPlane::start(
        &tmp.path().join("data"),
        tmp.path(),
        &[
            "--k8s-attestation",
            "--k8s-api-server",
            &api,
            "--k8s-ca-file",
            ca_file.to_str().unwrap(),
            "--k8s-token-file",
            own_token.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();

    let sa_token = tmp.path().join("sa-token");
    std::fs::write(&sa_token, "good-sa-token").unwrap();
    let sc = Sidecar::spawn("sidecar", &cp, tmp.path(), &["--k8s-token-file", sa_token.to_str().unwrap()]).unwrap();
    let cfg = sc.wait_ready().await.unwrap();
    assert_eq!(cfg["identity"], "spiffe://cluster.local/ns/shop/sa/orders");
    {
        let seen = seen.lock().unwrap();
        let (auth, body) = &seen[0];
        assert_eq!(auth, "Bearer cp-own-token");
        assert_eq!(body["kind"], "TokenReview");
        assert_eq!(body["spec"]["audiences"], json!(["palisade"]));
    }
    let proxies: serde_json::Value = serde_json::from_slice(&cp.ctl(&["proxies", "-o", "json"]).stdout).unwrap();
    assert_eq!(proxies[0]["attestation"], "k8s");

    // Rejections: bad token, a user (not a service account), wrong audience.
    for (token, msg) in
        [("bad", "invalid bearer token"), ("user-token", "not a service account"), ("wrong-aud-token", "audience")]
    {
        let f = tmp.path().join(format!("t-{token}"));
        std::fs::write(&f, token).unwrap();
        let sc =
            Sidecar::spawn(&format!("sidecar-{token}"), &cp, tmp.path(), &["--k8s-token-file", f.to_str().unwrap()])
                .unwrap();
        eventually(msg, Duration::from_secs(10), || async { sc.proc.logs().contains(msg).then_some(()) })
            .await
            .unwrap();
        assert_eq!(sc.get("/ready").await.unwrap().0, 503);
    }
    assert!(!cp.proc.logs().contains("good-sa-token"), "tokens never reach the log");
}
