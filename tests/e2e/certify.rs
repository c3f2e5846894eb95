//! `Identity.Certify` refusals, sent straight over gRPC: each bad request gets
//! its own status and message, nothing is issued, and an audit event is logged.

use std::time::Duration;

use palisade_certs::{SpiffeId, WorkloadKey};
use palisade_proto::v1::CertifyRequest;
use palisade_proto::v1::certify_request::Attestation;
use palisade_proto::v1::identity_client::IdentityClient;
use palisade_tests::{ControlPlane, grpc};
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

async fn certify(
    cp: &ControlPlane,
    csr: Vec<u8>,
    attestation: Option<Attestation>,
) -> Result<palisade_proto::v1::CertifyResponse, tonic::Status> {
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    let ch = grpc::channel(&cp.addr, &bundle, None).await.unwrap();
    IdentityClient::new(ch)
        .certify(CertifyRequest { csr_der: csr, attestation, inbound_addr: String::new() })
        .await
        .map(|r| r.into_inner())
}

fn csr_for(id: Option<&str>) -> Vec<u8> {
    let id = id.map(|s| s.parse::<SpiffeId>().unwrap());
    WorkloadKey::generate().unwrap().csr_der(id.as_ref()).unwrap()
}

fn token(t: &str) -> Option<Attestation> {
    Some(Attestation::JoinToken(t.to_string()))
}

fn expect(r: Result<palisade_proto::v1::CertifyResponse, tonic::Status>, code: Code, msg: &str) {
    match r {
        Ok(_) => panic!("expected {code:?} ({msg}), got a certificate"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(s.message().contains(msg), "message {:?} should contain {msg:?}", s.message());
        }
    }
}

#[tokio::test]
async fn bad_certificate_requests_are_refused_precisely() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let multi = cp.create_token(WEB, &["--uses", "20"]).unwrap();

    // A CSR asking for another identity than the token attests.
    expect(
        certify(&cp, csr_for(Some("spiffe://cluster.local/ns/shop/sa/admin")), token(&multi)).await,
        Code::PermissionDenied,
        "attested identity is spiffe://cluster.local/ns/shop/sa/web",
    );
    // A foreign trust domain.
    expect(
        certify(&cp, csr_for(Some("spiffe://evil.example/ns/shop/sa/web")), token(&multi)).await,
        Code::PermissionDenied,
        "foreign trust domain",
    );
    // A CA:TRUE CSR.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_csr = params.serialize_request(&key).unwrap().der().to_vec();
    expect(certify(&cp, ca_csr, token(&multi)).await, Code::InvalidArgument, "CA:TRUE");
    // A bad signature: flip a bit in the signature at the end.
    let mut bad = csr_for(Some(WEB));
    let n = bad.len();
    bad[n - 5] ^= 0x01;
    expect(certify(&cp, bad, token(&multi)).await, Code::InvalidArgument, "signature does not verify");
    // Garbage and empty CSRs.
    expect(certify(&cp, b"hello".to_vec(), token(&multi)).await, Code::InvalidArgument, "not a valid DER PKCS#10");
    expect(certify(&cp, Vec::new(), token(&multi)).await, Code::InvalidArgument, "csr_der");
    // Unknown token, no attestation at all.
    expect(certify(&cp, csr_for(None), token("pjt_not-a-real-token")).await, Code::Unauthenticated, "not known");
    expect(certify(&cp, csr_for(None), None).await, Code::Unauthenticated, "no attestation");
    // Kubernetes attestation is off by default.
    expect(
        certify(&cp, csr_for(None), Some(Attestation::K8sServiceAccountToken("x".into()))).await,
        Code::FailedPrecondition,
        "--k8s-attestation",
    );

    // None of these spent a use of the token or issued anything.
    let out = cp.ctl(&["token", "list", "-o", "json"]);
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tokens[0]["uses_left"], 20, "refused requests must not consume the token: {tokens}");
    let proxies: serde_json::Value = serde_json::from_slice(&cp.ctl(&["proxies", "-o", "json"]).stdout).unwrap();
    assert_eq!(proxies.as_array().unwrap().len(), 0);
    let logs = cp.proc.logs();
    assert!(logs.matches("certificate_refused").count() >= 9, "{logs}");
    assert!(!logs.contains("certificate_issued"));
    assert!(!logs.contains(&multi), "the token never reaches the log");

    // The good request works, with a CSR naming the right identity or none.
    let ok = certify(&cp, csr_for(Some(WEB)), token(&multi)).await.unwrap();
    assert_eq!(ok.spiffe_id, WEB);
    assert_eq!(ok.trust_bundle_der.len(), 1);
    let refresh = std::time::SystemTime::try_from(ok.refresh_after.unwrap()).unwrap();
    let after = std::time::SystemTime::try_from(ok.not_after.unwrap()).unwrap();
    assert!(refresh < after);
}

#[tokio::test]
async fn single_use_expired_and_revoked_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();

    let once = cp.create_token(WEB, &[]).unwrap();
    certify(&cp, csr_for(None), token(&once)).await.unwrap();
    expect(certify(&cp, csr_for(None), token(&once)).await, Code::Unauthenticated, "used up (1 of 1 use)");

    let short = cp.create_token(WEB, &["--ttl", "1s"]).unwrap();
    // Let the token's lifetime pass (wall clock, not readiness).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    expect(certify(&cp, csr_for(None), token(&short)).await, Code::Unauthenticated, "expired at");

    let revoked = cp.create_token(WEB, &["-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&revoked).unwrap();
    let out = cp.ctl(&["token", "revoke", v["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    expect(
        certify(&cp, csr_for(None), token(v["token"].as_str().unwrap())).await,
        Code::Unauthenticated,
        "was revoked",
    );
    let out = cp.ctl(&["token", "revoke", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    // Tokens for non-workload or foreign identities are refused at creation.
    for bad in ["spiffe://cluster.local/palisade/admin", "spiffe://other.td/ns/a/sa/b", "web"] {
        let out = cp.ctl(&["token", "create", "--identity", bad]);
        assert!(!out.status.success(), "{bad} accepted");
    }
}

#[tokio::test]
async fn admin_api_requires_the_admin_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &[]).await.unwrap();
    let bundle = std::fs::read_to_string(cp.bundle()).unwrap();
    // No client certificate.
    let ch = grpc::channel(&cp.addr, &bundle, None).await.unwrap();
    let err = palisade_proto::v1::admin_client::AdminClient::new(ch)
        .list_join_tokens(palisade_proto::v1::ListJoinTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A workload certificate is not enough.
    let t = cp.create_token(WEB, &[]).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let resp = certify(&cp, key.csr_der(None).unwrap(), token(&t)).await.unwrap();
    let chain: Vec<_> = resp.cert_chain_der.into_iter().map(rustls_pki_types::CertificateDer::from).collect();
    let (id, info) = palisade_certs::SvidInfo::parse_svid(&chain[0]).unwrap();
    let svid = palisade_certs::tls::Svid { certified: key.certified(chain).unwrap(), info, id };
    let ch = grpc::channel(&cp.addr, &bundle, Some(svid)).await.unwrap();
    let err = palisade_proto::v1::admin_client::AdminClient::new(ch)
        .list_proxies(palisade_proto::v1::ListProxiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A client certificate from another CA fails the handshake.
    let other = palisade_certs::CertificateAuthority::generate(&Default::default(), Duration::from_secs(3600)).unwrap();
    let (issued, key_pem) = other
        .issue_with_key(&palisade_certs::TrustDomain::default().admin(), &[], &[], Duration::from_secs(600))
        .unwrap();
    let certified = palisade_certs::csr::certified_key_from_pem(issued.chain.clone(), &key_pem).unwrap();
    let svid =
        palisade_certs::tls::Svid { certified, id: palisade_certs::TrustDomain::default().admin(), info: issued.info };
    let r = match grpc::channel(&cp.addr, &bundle, Some(svid)).await {
        Err(_) => true,
        Ok(ch) => palisade_proto::v1::admin_client::AdminClient::new(ch)
            .list_proxies(palisade_proto::v1::ListProxiesRequest {})
            .await
            .is_err(),
    };
    assert!(r, "a foreign-CA admin cert must be rejected");
    // Garbage on the port does not hurt the server.
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", cp.port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\x01\x02garbage").await.unwrap();
    drop(s);
    assert!(cp.ctl(&["check"]).status.success());
}
