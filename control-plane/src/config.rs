//! Control-plane configuration: clap flags with `PALISADE_*` env vars.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use palisade_certs::TrustDomain;
use palisade_cmd::{duration_arg, ser_duration};

pub use crate::directory_guard::AddrCheck;

/// Palisade control plane: the mesh CA, workload attestation and the Admin API.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "palisade-control-plane", version, about, long_about = None)]
pub struct Config {
    /// Directory holding all state: the CA (key mode 0600), the admin
    /// credential for palisadectl (admin/ca.pem, cert.pem, key.pem), join
    /// tokens (hashed) and proxy records. Created if missing.
    #[arg(long, env = "PALISADE_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Where the state lives: `file` (DIR/state.json, one replica) or `etcd`
    /// (shared by every replica on the same etcd cluster and --etcd-prefix).
    #[arg(long, env = "PALISADE_STORE", value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,

    /// etcd client URLs, comma-separated (http://HOST:2379, or https:// with --etcd-ca-file).
    #[arg(long, env = "PALISADE_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of this mesh's state in etcd.
    #[arg(long, env = "PALISADE_ETCD_PREFIX", default_value = "/palisade/")]
    pub etcd_prefix: String,

    /// CA certificates (PEM) etcd's serving certificate must chain to.
    #[arg(long, env = "PALISADE_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's client-certificate authentication; needs --etcd-key-file.
    #[arg(long, env = "PALISADE_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,

    /// The client certificate's key (PEM, mode 0600).
    #[arg(long, env = "PALISADE_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user (role-based access control); needs --etcd-password-file.
    #[arg(long, env = "PALISADE_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (never a flag: flags show in `ps`).
    #[arg(long, env = "PALISADE_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,

    /// Key that seals the secrets kept in etcd (the CA's private key): 32
    /// random bytes in base64 (`openssl rand -base64 32`), mode 0600, the
    /// same for every replica (e.g. a Kubernetes Secret), never stored in etcd.
    #[arg(long, env = "PALISADE_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,

    /// With --store etcd: first import a single-node install's state from its
    /// data dir (state.json, and its generated CA, sealed with
    /// --store-key-file) into the empty etcd prefix. Refused once etcd holds state.
    #[arg(long, env = "PALISADE_MIGRATE_FROM", requires = "store_key_file")]
    pub migrate_from: Option<PathBuf>,

    /// Address the gRPC API (TLS) listens on.
    #[arg(long, env = "PALISADE_LISTEN", default_value = "127.0.0.1:7700", value_parser = palisade_cmd::socket_addr)]
    pub listen: SocketAddr,

    /// SPIFFE trust domain of every identity this control plane issues.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// Lifetime of workload certificates: 10s (tests) to 24h; below 5m is warned about.
    #[arg(long, env = "PALISADE_CERT_TTL", default_value = "1h", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub cert_ttl: Duration,

    /// Default lifetime of join tokens created without --ttl.
    #[arg(long, env = "PALISADE_JOIN_TOKEN_TTL", default_value = "10m", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub join_token_ttl: Duration,

    /// Operator CA certificate (PEM: the signing root or intermediate first,
    /// then its parents). Requires --ca-key. Default: a generated root kept in the data dir.
    #[arg(long, env = "PALISADE_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// Private key (PEM) of --ca-cert.
    #[arg(long, env = "PALISADE_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// Roots to trust (PEM), when --ca-cert is an intermediate whose root is
    /// not in the file. Default: the roots in --ca-cert; or, when --ca-cert is
    /// a cert-manager Secret's DIR/tls.crt holding no root, DIR/ca.crt.
    #[arg(long, env = "PALISADE_CA_BUNDLE", requires = "ca_cert")]
    pub ca_bundle: Option<PathBuf>,

    /// The operator CA as a directory laid out like a Kubernetes TLS Secret
    /// (what cert-manager writes): DIR/tls.crt (the CA certificate, then its
    /// parents), DIR/tls.key, and DIR/ca.crt (the root) if present. The same
    /// as --ca-cert DIR/tls.crt --ca-key DIR/tls.key.
    #[arg(long, env = "PALISADE_CA_DIR", conflicts_with_all = ["ca_cert", "ca_key", "ca_bundle"])]
    pub ca_dir: Option<PathBuf>,

    /// The CA of --ca-cert/--ca-dir is a self-signed root that only seeds the
    /// control plane's own CA: copied into the data dir on the first start
    /// (with a store key, into etcd, as always), and from then on kept and
    /// rotated there (`palisadectl ca rotate`), so the file is read once.
    /// What `palisadectl install --generate-ca` sets. Without it a CA given
    /// by file is the operator's to rotate.
    #[arg(long, env = "PALISADE_CA_SEED", conflicts_with = "ca_bundle")]
    pub ca_seed: bool,

    /// DNS names put in the control plane's server certificate beside its
    /// SPIFFE ID (clients check the SPIFFE ID, tools like grpcurl the name).
    #[arg(long = "server-name", env = "PALISADE_SERVER_NAMES", value_delimiter = ',', default_value = "localhost")]
    pub server_names: Vec<String>,

    /// Mesh default for workloads no ALLOW policy targets: `deny`, or
    /// `allow-authenticated` (any mTLS caller of the mesh).
    #[arg(long, env = "PALISADE_DEFAULT_POLICY", value_enum, default_value_t = DefaultPolicy::Deny)]
    pub default_policy: DefaultPolicy,

    /// Export a span per gRPC call over OTLP/gRPC to this collector: http://HOST:PORT, or https://HOST:PORT with --otlp-ca-file.
    #[arg(long, env = "PALISADE_OTLP_ENDPOINT")]
    #[serde(skip)]
    pub otlp_endpoint: Option<String>,

    /// CA certificates (PEM) an https:// collector's certificate must chain to.
    #[arg(long, env = "PALISADE_OTLP_CA_FILE", requires = "otlp_endpoint")]
    pub otlp_ca_file: Option<std::path::PathBuf>,

    /// Share of new traces recorded, 0 to 1; a call that arrives with a traceparent follows its sampled flag.
    #[arg(long, env = "PALISADE_TRACE_SAMPLING", default_value_t = 0.01, value_parser = palisade_cmd::ratio)]
    pub trace_sampling: f64,

    /// How long requests the sidecars recorded are kept for `palisadectl policy preview`: 1m to 24h.
    #[arg(long, env = "PALISADE_PREVIEW_WINDOW", default_value = "15m", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub preview_window: Duration,

    /// Memory the recorded requests for previews may take, in MiB (counted
    /// as their JSON size): when full, the identity holding the most gives
    /// up its oldest, so one workload cannot displace the others'.
    #[arg(long, env = "PALISADE_PREVIEW_MEMORY_MIB", default_value_t = 32)]
    pub preview_memory_mib: usize,

    /// Serve the control plane's metrics (plaintext HTTP, GET /metrics) here, e.g. 127.0.0.1:7701.
    #[arg(long, env = "PALISADE_METRICS_LISTEN", value_parser = palisade_cmd::socket_addr)]
    pub metrics_listen: Option<SocketAddr>,

    /// Serve the sidecar-injection admission webhook (HTTPS, POST /mutate) here.
    #[arg(long, env = "PALISADE_WEBHOOK_LISTEN", value_parser = palisade_cmd::socket_addr)]
    pub webhook_listen: Option<SocketAddr>,

    /// DNS names of the webhook's certificate (the Service the API server calls).
    #[arg(
        long = "webhook-name",
        env = "PALISADE_WEBHOOK_NAMES",
        value_delimiter = ',',
        default_value = "palisade-control-plane.palisade-system.svc"
    )]
    pub webhook_names: Vec<String>,

    /// Image injected into pods.
    #[arg(long, env = "PALISADE_PROXY_IMAGE", default_value = palisade_inject::IMAGE)]
    pub proxy_image: String,

    /// Control-plane address injected into pods.
    #[arg(
        long,
        env = "PALISADE_INJECT_CONTROL_PLANE",
        default_value = "https://palisade-control-plane.palisade-system.svc:7700"
    )]
    pub inject_control_plane: String,

    /// Inject classic sidecar containers (clusters older than Kubernetes 1.29).
    #[arg(long, env = "PALISADE_CLASSIC_SIDECAR")]
    pub classic_sidecar: bool,

    /// Enable Kubernetes ServiceAccount-token attestation (TokenReview).
    #[arg(long, env = "PALISADE_K8S_ATTESTATION")]
    pub k8s_attestation: bool,

    /// Kubernetes API server URL. Default: in-cluster (KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, env = "PALISADE_K8S_API_SERVER")]
    pub k8s_api_server: Option<String>,

    /// CA bundle of the Kubernetes API server.
    #[arg(long, env = "PALISADE_K8S_CA_FILE", default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")]
    pub k8s_ca_file: PathBuf,

    /// The control plane's own ServiceAccount token, sent to authorize TokenReviews (re-read on every call).
    #[arg(
        long,
        env = "PALISADE_K8S_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub k8s_token_file: PathBuf,

    /// Audience sidecar tokens must be issued for.
    #[arg(long, env = "PALISADE_K8S_AUDIENCE", default_value = "palisade")]
    pub k8s_audience: String,

    /// How long changes (policies, the directory, credentials) are gathered
    /// before they are pushed to the sidecars that need them: 0 to 1s.
    #[arg(long, env = "PALISADE_PUSH_COALESCE", default_value = "100ms", value_parser = parse_coalesce)]
    #[serde(serialize_with = "ser_duration")]
    pub push_coalesce: Duration,

    /// Most connections with a client certificate (sidecars, operators) open at once on the
    /// gRPC listener; beyond it new ones are closed.
    #[arg(long, env = "PALISADE_MAX_CONNECTIONS", default_value_t = 16384)]
    pub max_connections: usize,

    /// Most connections still in their TLS handshake open at once (each for --handshake-timeout
    /// at most): what anyone on the network can open, kept apart so a flood of them cannot crowd
    /// out sidecars and operators.
    #[arg(long, env = "PALISADE_MAX_UNAUTHENTICATED_CONNECTIONS", default_value_t = 512)]
    pub max_unauthenticated_connections: usize,

    /// Of those, most from one source address.
    #[arg(long, env = "PALISADE_MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP", default_value_t = 32)]
    pub max_unauthenticated_connections_per_ip: usize,

    /// Most connections that finished their handshake without a client certificate (a first
    /// join: one Certify call) open at once. Such a call takes milliseconds, so even a mass
    /// rollout of 2,000 pods needs a few dozen at a time.
    #[arg(long, env = "PALISADE_MAX_ANONYMOUS_CONNECTIONS", default_value_t = 64)]
    pub max_anonymous_connections: usize,

    /// Of those, most from one source address.
    #[arg(long, env = "PALISADE_MAX_ANONYMOUS_CONNECTIONS_PER_IP", default_value_t = 4)]
    pub max_anonymous_connections_per_ip: usize,

    /// A connection without a client certificate is closed this long after it was accepted,
    /// whatever it sends (HTTP/2 PINGs included); it carries at most 4 calls.
    #[arg(long, env = "PALISADE_ANONYMOUS_DEADLINE", default_value = "10s", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub anonymous_deadline: Duration,

    /// Connections beyond every limit that only 127.0.0.1 and ::1 may open, on each listener
    /// (gRPC, OAuth, webhook, metrics): a local operator or probe always gets in.
    #[arg(long, env = "PALISADE_RESERVED_LOOPBACK_CONNECTIONS", default_value_t = 8)]
    pub reserved_loopback_connections: usize,

    /// How the IP of the inbound address a sidecar registers is checked
    /// against where its connection comes from (loopback is never checked):
    /// `exclusive` (must match; an IP is one workload's, as Kubernetes pod
    /// IPs are, so a matching claim takes over a reused IP), `shared` (must
    /// match; hosts run several workloads, an address held by another
    /// identity is never taken over), `off` (sidecars reach the control
    /// plane through NAT; an address held by another identity is never taken over).
    #[arg(long, env = "PALISADE_INBOUND_ADDR_CHECK", value_enum, default_value_t = AddrCheck::Exclusive)]
    pub inbound_addr_check: AddrCheck,

    /// Most inbound addresses one identity holds in the directory at once
    /// (a service's replicas, and through a rolling update the old ones
    /// until their certificates expire); a claim beyond it is refused.
    #[arg(long, env = "PALISADE_MAX_ADDRESSES_PER_IDENTITY", default_value_t = 512)]
    pub max_addresses_per_identity: usize,

    /// Directory changes (a new or moved inbound address) one caller
    /// (identity and source IP) may make a minute by renewals and
    /// Kubernetes attestations; join tokens are bounded by their uses.
    #[arg(long, env = "PALISADE_DIRECTORY_CHANGES_PER_MINUTE", default_value_t = 10)]
    pub directory_changes_per_minute: u32,

    /// Time allowed for a TLS handshake (gRPC and webhook listeners).
    #[arg(long, env = "PALISADE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,

    /// A connection with a client certificate whose peer sends nothing for this long is closed
    /// (the server pings every 30s, so live clients always answer).
    #[arg(long, env = "PALISADE_IDLE_TIMEOUT", default_value = "2m", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,

    /// Serve the mesh's OAuth 2.0 token service (client credentials grant,
    /// HTTPS with the control plane's CA) here: POST /oauth2/token,
    /// /.well-known/jwks.json, /.well-known/oauth-authorization-server.
    #[arg(long, env = "PALISADE_OAUTH_LISTEN", value_parser = palisade_cmd::socket_addr)]
    pub oauth_listen: Option<SocketAddr>,

    /// `iss` of the mesh's tokens and the base of its URLs. Default:
    /// https://<--oauth-listen> (https://localhost:<port> for 0.0.0.0).
    #[arg(long, env = "PALISADE_OAUTH_ISSUER", requires = "oauth_listen")]
    pub oauth_issuer: Option<String>,

    /// Lifetime of the access tokens the token service issues (10s to 24h).
    #[arg(long, env = "PALISADE_OAUTH_TOKEN_TTL", default_value = "10m", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub oauth_token_ttl: Duration,

    /// A new token-signing key every this long (the next one is published
    /// ahead, the old one kept while its tokens live).
    #[arg(long, env = "PALISADE_OAUTH_KEY_ROTATION", default_value = "30days", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub oauth_key_rotation: Duration,

    /// CA certificates (PEM) trusted to serve the key sets policies name by
    /// jwksUri. Default: the system's, /etc/ssl/certs/ca-certificates.crt.
    #[arg(long, env = "PALISADE_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,

    /// How often key sets named by jwksUri are fetched again.
    #[arg(long, env = "PALISADE_JWKS_REFRESH", default_value = "5m", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub jwks_refresh: Duration,

    /// Least time between two fetches of one key set (refreshes asked for by
    /// sidecars that saw an unknown `kid` included).
    #[arg(long, env = "PALISADE_JWKS_MIN_REFRESH_INTERVAL", default_value = "30s", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub jwks_min_refresh_interval: Duration,

    /// Log output format.
    #[arg(long, env = "PALISADE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter: LEVEL and TARGET=LEVEL directives, comma-separated, e.g. `info` or `info,audit=debug`.
    #[arg(long, env = "PALISADE_LOG", default_value = "info")]
    pub log: String,
}

/// Where the control plane's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// DIR/state.json: one replica.
    File,
    /// etcd: several replicas.
    Etcd,
}

/// Mesh default for workloads no ALLOW policy targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Deny.
    Deny,
    /// Allow callers with a mesh certificate.
    AllowAuthenticated,
}

pub use palisade_cmd::LogFormat;

/// Errors in flag combinations found after parsing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cert-ttl {value}: must be between 10s and 24h")]
    CertTtl { value: String },
    #[error("--join-token-ttl {value}: must be between 10s and 30d")]
    JoinTokenTtl { value: String },
    #[error("--{flag} {value}: {why}")]
    Limit { flag: &'static str, value: String, why: &'static str },
    #[error("--{flag} {value}: must be between {min} and {max}")]
    Range { flag: &'static str, value: String, min: String, max: String },
    #[error("--ca-seed: give the root to seed with --ca-cert and --ca-key, or --ca-dir")]
    Seed,
}

/// The operator's CA files, as given: the certificate (then its parents),
/// its key and, if given, the roots to trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorCa {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: Option<PathBuf>,
}

impl Config {
    /// The operator's CA: --ca-dir's tls.crt and tls.key, or --ca-cert,
    /// --ca-key and --ca-bundle; None for a CA of the control plane's own.
    /// (A cert-manager ca.crt beside tls.crt is looked at when the CA is
    /// loaded: `pki::operator_ca`.)
    pub fn operator_ca(&self) -> Option<OperatorCa> {
        if let Some(dir) = &self.ca_dir {
            return Some(OperatorCa { cert: dir.join("tls.crt"), key: dir.join("tls.key"), bundle: None });
        }
        let (cert, key) = self.ca_cert.clone().zip(self.ca_key.clone())?;
        Some(OperatorCa { cert, key, bundle: self.ca_bundle.clone() })
    }

    /// Cross-field validation, before anything binds or writes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ca_seed && self.operator_ca().is_none() {
            return Err(ConfigError::Seed);
        }
        if self.cert_ttl < palisade_certs::ca::MIN_TTL || self.cert_ttl > palisade_certs::ca::MAX_TTL {
            return Err(ConfigError::CertTtl { value: humantime::format_duration(self.cert_ttl).to_string() });
        }
        if self.join_token_ttl < Duration::from_secs(10) || self.join_token_ttl > Duration::from_secs(30 * 86400) {
            return Err(ConfigError::JoinTokenTtl {
                value: humantime::format_duration(self.join_token_ttl).to_string(),
            });
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(ConfigError::Limit {
                flag: "max-connections",
                value: self.max_connections.to_string(),
                why: "must be between 1 and 1000000",
            });
        }
        for (flag, v) in [
            ("max-unauthenticated-connections", self.max_unauthenticated_connections),
            ("max-unauthenticated-connections-per-ip", self.max_unauthenticated_connections_per_ip),
            ("max-anonymous-connections", self.max_anonymous_connections),
            ("max-anonymous-connections-per-ip", self.max_anonymous_connections_per_ip),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return Err(ConfigError::Limit { flag, value: v.to_string(), why: "must be between 1 and 1000000" });
            }
        }
        for (flag, v, max) in [
            ("max-addresses-per-identity", self.max_addresses_per_identity, 1_000_000),
            ("directory-changes-per-minute", self.directory_changes_per_minute as usize, 100_000),
            ("preview-memory-mib", self.preview_memory_mib, 65_536),
        ] {
            if !(1..=max).contains(&v) {
                return Err(ConfigError::Range { flag, value: v.to_string(), min: "1".into(), max: max.to_string() });
            }
        }
        if self.reserved_loopback_connections > 1024 {
            return Err(ConfigError::Range {
                flag: "reserved-loopback-connections",
                value: self.reserved_loopback_connections.to_string(),
                min: "0".into(),
                max: "1024".into(),
            });
        }
        for (flag, d) in [
            ("handshake-timeout", self.handshake_timeout),
            ("idle-timeout", self.idle_timeout),
            ("anonymous-deadline", self.anonymous_deadline),
        ] {
            if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                return Err(ConfigError::Limit {
                    flag,
                    value: humantime::format_duration(d).to_string(),
                    why: "must be between 1s and 1h",
                });
            }
        }
        let secs = Duration::from_secs;
        for (flag, d, min, max) in [
            ("oauth-token-ttl", self.oauth_token_ttl, secs(10), secs(86400)),
            ("oauth-key-rotation", self.oauth_key_rotation, secs(4), secs(365 * 86400)),
            ("jwks-refresh", self.jwks_refresh, secs(1), secs(86400)),
            ("jwks-min-refresh-interval", self.jwks_min_refresh_interval, secs(1), secs(3600)),
            ("preview-window", self.preview_window, secs(60), secs(86400)),
        ] {
            if d < min || d > max {
                return Err(ConfigError::Range {
                    flag,
                    value: humantime::format_duration(d).to_string(),
                    min: humantime::format_duration(min).to_string(),
                    max: humantime::format_duration(max).to_string(),
                });
            }
        }
        // Keys stay published while their tokens live: keep the set well under
        // the 64 keys a sidecar accepts.
        let live = (self.oauth_token_ttl.as_secs() + 60) / self.oauth_key_rotation.as_secs().max(1);
        if live > 32 {
            return Err(ConfigError::Limit {
                flag: "oauth-key-rotation",
                value: humantime::format_duration(self.oauth_key_rotation).to_string(),
                why: "is too short for --oauth-token-ttl: at most 32 keys may be live at once (rotation >= (token TTL + 60s) / 32)",
            });
        }
        if let Some(iss) = &self.oauth_issuer {
            let ok = iss.strip_prefix("https://").is_some_and(|r| !r.is_empty())
                && !iss.ends_with('/')
                && !iss.contains(['?', '#', ' ']);
            if !ok {
                return Err(ConfigError::Limit {
                    flag: "oauth-issuer",
                    value: iss.clone(),
                    why: "must be an https:// URL without a trailing slash, query or fragment",
                });
            }
        }
        if self.store == StoreKind::Etcd {
            let err = |why: &'static str| ConfigError::Limit { flag: "store", value: "etcd".into(), why };
            if self.etcd_endpoints.is_empty() {
                return Err(err("needs --etcd-endpoints URL,..."));
            }
            if self.operator_ca().is_none() && self.store_key_file.is_none() {
                return Err(err(
                    "needs --store-key-file (the replicas keep a shared CA in etcd, its key sealed with it), or the CA with --ca-cert and --ca-key (or --ca-dir)",
                ));
            }
            if self.oauth_listen.is_some() && (self.oauth_issuer.is_none() || self.store_key_file.is_none()) {
                return Err(err(
                    "with --oauth-listen, give --oauth-issuer (the same URL on every replica: its tokens' iss) and --store-key-file (the signing keys are kept in etcd, sealed)",
                ));
            }
            if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
                return Err(ConfigError::Limit {
                    flag: "etcd-prefix",
                    value: self.etcd_prefix.clone(),
                    why: "must start and end with /",
                });
            }
            for e in &self.etcd_endpoints {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(ConfigError::Limit {
                        flag: "etcd-endpoints",
                        value: e.clone(),
                        why: "must be http://HOST:PORT or https://HOST:PORT",
                    });
                }
            }
        } else if self.migrate_from.is_some() {
            return Err(ConfigError::Limit {
                flag: "migrate-from",
                value: "(a data dir)".into(),
                why: "imports into etcd: give --store etcd --etcd-endpoints ... too",
            });
        } else if !self.etcd_endpoints.is_empty() {
            return Err(ConfigError::Limit {
                flag: "etcd-endpoints",
                value: self.etcd_endpoints.join(","),
                why: "is used with --store etcd only",
            });
        }
        if self.idle_timeout < Duration::from_secs(45) {
            return Err(ConfigError::Limit {
                flag: "idle-timeout",
                value: humantime::format_duration(self.idle_timeout).to_string(),
                why: "must be at least 45s (the server pings every 30s)",
            });
        }
        Ok(())
    }
}

impl Config {
    /// The mesh's OAuth issuer, when the token service is on.
    pub fn issuer_url(&self) -> Option<String> {
        let addr = self.oauth_listen?;
        Some(self.oauth_issuer.clone().unwrap_or_else(|| {
            if addr.ip().is_unspecified() {
                format!("https://localhost:{}", addr.port())
            } else {
                format!("https://{addr}")
            }
        }))
    }
}

/// `--push-coalesce`: a duration up to 1s (longer would hold every change back).
fn parse_coalesce(s: &str) -> Result<Duration, String> {
    let d = duration_arg(s)?;
    if d > Duration::from_secs(1) {
        return Err("at most 1s: every change waits this long before it is pushed".into());
    }
    Ok(d)
}
