//! Sidecar configuration: clap flags with `PALISADE_*` env vars. Shown (without
//! secrets) at `/config` and in the startup log.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use palisade_certs::TrustDomain;

/// Palisade sidecar proxy: holds the workload's SPIFFE identity, enforces
/// mTLS and policy on its traffic, and serves an admin endpoint.
#[derive(Clone, Parser, serde::Serialize)]
#[command(name = "palisade-sidecar", version, about, long_about = None)]
pub struct Config {
    /// Control-plane gRPC address.
    #[arg(long, env = "PALISADE_CONTROL_PLANE", default_value = "https://127.0.0.1:7700")]
    pub control_plane: String,

    /// Trust anchor: PEM bundle of the mesh root(s), used to verify the
    /// control plane (e.g. <control-plane data dir>/admin/ca.pem).
    #[arg(long, env = "PALISADE_CA_BUNDLE")]
    pub ca_bundle: PathBuf,

    /// Join token for the first certificate (from `palisadectl token create`).
    /// Prefer --join-token-file: command lines are visible to other users.
    #[arg(long, env = "PALISADE_JOIN_TOKEN", conflicts_with_all = ["join_token_file", "k8s_token_file"], hide_env_values = true)]
    #[serde(skip)]
    pub join_token: Option<String>,

    /// File holding the join token.
    #[arg(long, env = "PALISADE_JOIN_TOKEN_FILE", conflicts_with = "k8s_token_file")]
    pub join_token_file: Option<PathBuf>,

    /// Kubernetes projected ServiceAccount token file (audience `palisade`), re-read on every attestation.
    #[arg(long, env = "PALISADE_K8S_TOKEN_FILE")]
    pub k8s_token_file: Option<PathBuf>,

    /// Trust domain of this mesh (the control plane's identity is spiffe://<td>/palisade/control-plane).
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,

    /// Inbound listener (mTLS from other sidecars), registered with the control plane.
    #[arg(long, env = "PALISADE_INBOUND", default_value = "127.0.0.1:4143")]
    pub inbound: SocketAddr,

    /// Outbound listener (plaintext from the local app; transparent mode).
    #[arg(long, env = "PALISADE_OUTBOUND", default_value = "127.0.0.1:4140")]
    pub outbound: SocketAddr,

    /// Where inbound traffic is delivered: the local application.
    #[arg(long, env = "PALISADE_APP", default_value = "127.0.0.1:8080")]
    pub app: SocketAddr,

    /// Explicit outbound mapping LOCAL_HOST:PORT=SERVICE (repeatable), SERVICE is <service-account>.<namespace>.
    #[arg(long = "upstream", env = "PALISADE_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<String>,

    /// Admin HTTP server: /live, /ready, /metrics, /config.
    #[arg(long, env = "PALISADE_ADMIN", default_value = "127.0.0.1:4191")]
    pub admin: SocketAddr,

    /// Log output format.
    #[arg(long, env = "PALISADE_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "PALISADE_LOG", default_value = "info")]
    pub log: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Everything but the join token.
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}

/// A flag value that cannot work, found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--control-plane: {0}")]
    ControlPlane(#[from] palisade_proto::channel::ChannelError),
    #[error("--ca-bundle {path}: {why}")]
    CaBundle { path: PathBuf, why: String },
    #[error(
        "no attestation credential: pass --join-token-file FILE (or --join-token, or --k8s-token-file in Kubernetes)"
    )]
    NoAttestation,
    #[error("--{flag} {path}: {why}")]
    TokenFile { flag: &'static str, path: PathBuf, why: String },
}

impl Config {
    /// Checks what can be checked before starting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        palisade_proto::channel::ControlPlaneAddr::parse(&self.control_plane)?;
        let pem = std::fs::read_to_string(&self.ca_bundle)
            .map_err(|e| ConfigError::CaBundle { path: self.ca_bundle.clone(), why: e.to_string() })?;
        palisade_certs::ca::parse_pem_certs(&pem)
            .map_err(|why| ConfigError::CaBundle { path: self.ca_bundle.clone(), why })?;
        if self.join_token.is_none() && self.join_token_file.is_none() && self.k8s_token_file.is_none() {
            return Err(ConfigError::NoAttestation);
        }
        for (flag, path) in [("join-token-file", &self.join_token_file), ("k8s-token-file", &self.k8s_token_file)] {
            if let Some(path) = path {
                let meta = std::fs::metadata(path).map_err(|e| ConfigError::TokenFile {
                    flag,
                    path: path.clone(),
                    why: e.to_string(),
                })?;
                if !meta.is_file() {
                    return Err(ConfigError::TokenFile { flag, path: path.clone(), why: "not a regular file".into() });
                }
            }
        }
        Ok(())
    }
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}
