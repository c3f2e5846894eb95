//! Kubernetes ServiceAccount-token attestation: the sidecar sends its
//! projected token (audience `palisade`); we ask the API server with a
//! TokenReview (POST /apis/authentication.k8s.io/v1/tokenreviews) and map
//! `system:serviceaccount:<ns>:<sa>` to `spiffe://<td>/ns/<ns>/sa/<sa>`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use palisade_certs::TrustDomain;
use rustls_pki_types::ServerName;
use serde_json::json;

use super::{AttestError, Attested, Attestor};

/// Why the Kubernetes attestor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("no API server: pass --k8s-api-server or run in a pod (KUBERNETES_SERVICE_HOST)")]
    NoApiServer,
    #[error("cannot read {path}: {source}")]
    ReadCa { path: PathBuf, source: std::io::Error },
    #[error("{path}: {why}")]
    Ca { path: PathBuf, why: String },
    #[error("{0}")]
    Roots(String),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("Kubernetes API server {0:?} must be an https:// URL")]
    NotHttps(String),
    #[error("invalid API server address {0:?}")]
    BadAddress(String),
}

/// Why a TokenReview call failed (the API server is unavailable to us).
#[derive(Debug, thiserror::Error)]
enum ReviewError {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Name(rustls_pki_types::InvalidDnsNameError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Request(#[from] http::Error),
    #[error("TokenReview returned HTTP {0}")]
    Status(http::StatusCode),
    #[error("TokenReview response is not JSON: {0}")]
    NotJson(serde_json::Error),
}

/// Where and how to reach the API server.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    /// `https://host:port`.
    pub api_server: String,
    pub ca_file: PathBuf,
    /// Our own ServiceAccount token, re-read per call (kubelet rotates it).
    pub token_file: PathBuf,
    pub audience: String,
}

impl K8sConfig {
    /// The in-cluster API server address from the environment kubelet sets.
    pub fn in_cluster_api_server() -> Option<String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").ok()?;
        Some(if host.contains(':') { format!("https://[{host}]:{port}") } else { format!("https://{host}:{port}") })
    }
}

/// The TokenReview attestor.
pub struct K8sAttestor {
    cfg: K8sConfig,
    td: TrustDomain,
    tls: tokio_rustls::TlsConnector,
    host: String,
    port: u16,
}

impl std::fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("api_server", &self.cfg.api_server)
            .field("audience", &self.cfg.audience)
            .finish()
    }
}

impl K8sAttestor {
    pub fn new(cfg: K8sConfig, td: TrustDomain) -> Result<Self, K8sError> {
        let pem = std::fs::read_to_string(&cfg.ca_file)
            .map_err(|source| K8sError::ReadCa { path: cfg.ca_file.clone(), source })?;
        let certs =
            palisade_certs::ca::parse_pem_certs(&pem).map_err(|why| K8sError::Ca { path: cfg.ca_file.clone(), why })?;
        let roots = palisade_certs::svid::root_store(&certs).map_err(|e| K8sError::Roots(e.to_string()))?;
        let tls = rustls::ClientConfig::builder_with_provider(palisade_certs::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let authority = cfg
            .api_server
            .strip_prefix("https://")
            .ok_or_else(|| K8sError::NotHttps(cfg.api_server.clone()))?
            .trim_end_matches('/');
        let auth: http::uri::Authority = authority.parse().map_err(|_| K8sError::BadAddress(cfg.api_server.clone()))?;
        let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = auth.port_u16().unwrap_or(443);
        Ok(Self { cfg, td, tls: tokio_rustls::TlsConnector::from(Arc::new(tls)), host, port })
    }

    async fn review(&self, token: &str) -> Result<serde_json::Value, AttestError> {
        let unavailable = |reason: String| AttestError::K8sUnavailable { reason };
        let own_token = std::fs::read_to_string(&self.cfg.token_file)
            .map_err(|e| unavailable(format!("cannot read {}: {e}", self.cfg.token_file.display())))?;
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.cfg.audience]},
        });
        let call = async {
            let tcp =
                tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await.map_err(ReviewError::Connect)?;
            let name = ServerName::try_from(self.host.clone()).map_err(ReviewError::Name)?;
            let tls = self.tls.connect(name, tcp).await.map_err(ReviewError::Connect)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let req = http::Request::post("/apis/authentication.k8s.io/v1/tokenreviews")
                .header(http::header::HOST, &self.host)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, "application/json")
                .header(http::header::AUTHORIZATION, format!("Bearer {}", own_token.trim()))
                .body(Full::new(Bytes::from(body.to_string())))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                return Err(ReviewError::Status(status));
            }
            serde_json::from_slice::<serde_json::Value>(&bytes).map_err(ReviewError::NotJson)
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .map_err(|_| unavailable("timed out after 10s".into()))?
            .map_err(|e| unavailable(e.to_string()))
    }
}

#[async_trait::async_trait]
impl Attestor for K8sAttestor {
    async fn attest(&self, credential: &str) -> Result<Attested, AttestError> {
        let review = self.review(credential.trim()).await?;
        let status = &review["status"];
        if status["authenticated"].as_bool() != Some(true) {
            let reason = status["error"].as_str().filter(|s| !s.is_empty()).unwrap_or("token not authenticated");
            return Err(AttestError::K8sRejected { reason: reason.to_string() });
        }
        if let Some(auds) = status["audiences"].as_array()
            && !auds.iter().any(|a| a.as_str() == Some(self.cfg.audience.as_str()))
        {
            return Err(AttestError::K8sRejected {
                reason: format!("token is not valid for audience {:?}", self.cfg.audience),
            });
        }
        let username = status["user"]["username"].as_str().unwrap_or_default();
        let not_sa = || AttestError::K8sNotServiceAccount { username: username.to_string() };
        let rest = username.strip_prefix("system:serviceaccount:").ok_or_else(not_sa)?;
        let (ns, sa) = rest.split_once(':').ok_or_else(not_sa)?;
        let identity = self.td.workload(ns, sa).map_err(|_| not_sa())?;
        Ok(Attested { identity, method: "k8s", refund: None })
    }
}
