//! Sidecar configuration: clap flags with `PALISADE_*` env vars. Shown (without
//! secrets) at `/config` and in the startup log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use palisade_certs::TrustDomain;
use palisade_cmd::{duration_arg, ser_duration};

/// Palisade sidecar proxy: holds the workload's SPIFFE identity, enforces
/// mTLS and policy on its traffic, and serves an admin endpoint.
#[derive(Clone, Parser, serde::Serialize)]
#[command(name = "palisade-sidecar", version, about, long_about = None)]
pub struct Config {
    /// Control-plane gRPC address(es): several replicas comma-separated or
    /// repeated, or a name with several A/AAAA records; the sidecar spreads
    /// across them and moves to another when one fails.
    #[arg(long, env = "PALISADE_CONTROL_PLANE", value_delimiter = ',', default_value = "https://127.0.0.1:7700")]
    pub control_plane: Vec<String>,

    /// Trust anchor: PEM bundle of the mesh root(s), used to verify the
    /// control plane (e.g. <control-plane data dir>/admin/ca.pem).
    #[arg(long, env = "PALISADE_CA_BUNDLE", required_unless_present = "ca_bundle_pem")]
    pub ca_bundle: Option<PathBuf>,

    /// The same trust anchors given as PEM text instead of a file (injected
    /// pods carry them in their spec, so no ConfigMap has to exist in the namespace).
    #[arg(long, env = "PALISADE_CA_BUNDLE_PEM", conflicts_with = "ca_bundle")]
    #[serde(skip)]
    pub ca_bundle_pem: Option<String>,

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
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// Inbound listener (mTLS from other sidecars), registered with the control plane.
    #[arg(long, env = "PALISADE_INBOUND", default_value = "127.0.0.1:4143", value_parser = palisade_cmd::socket_addr)]
    pub inbound: SocketAddr,

    /// Outbound listener for redirected app traffic (bound with --transparent).
    #[arg(long, env = "PALISADE_OUTBOUND", default_value = "127.0.0.1:4140", value_parser = palisade_cmd::socket_addr)]
    pub outbound: SocketAddr,

    /// Where inbound traffic is delivered: the local application.
    #[arg(long, env = "PALISADE_APP", default_value = "127.0.0.1:8080", value_parser = palisade_cmd::socket_addr)]
    pub app: SocketAddr,

    /// Explicit outbound mapping LOCAL_HOST:PORT=SERVICE (repeatable), SERVICE is <service-account>.<namespace>:
    /// the app connects to LOCAL_HOST:PORT in plaintext and reaches SERVICE's sidecar over mTLS.
    #[arg(long = "upstream", env = "PALISADE_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<Upstream>,

    /// Address registered in the directory for peers to reach --inbound
    /// (default: --inbound, unless it is a wildcard address).
    #[arg(long, env = "PALISADE_ADVERTISE", value_parser = palisade_cmd::socket_addr)]
    pub advertise: Option<SocketAddr>,

    /// Transparent mode (with the rules of `palisade-sidecar init`): bind --outbound for
    /// redirected app traffic, and deliver inbound traffic to the app port it was addressed to.
    #[arg(long, env = "PALISADE_TRANSPARENT")]
    pub transparent: bool,

    /// Transparent mode: traffic to destinations outside the mesh is passed through or denied.
    #[arg(long, env = "PALISADE_EGRESS", value_enum, default_value_t = Egress::Passthrough)]
    pub egress: Egress,

    /// How calls are spread over a service's endpoints: `peak-ewma` (the
    /// cheaper by latency and load of two drawn, with warm-up and ejection;
    /// see TrafficPolicy `balancing`), or `round-robin` (in turn, passing
    /// over unreachable ones only; for comparisons).
    #[arg(long, env = "PALISADE_BALANCE", value_enum, default_value_t = crate::balance::Mode::PeakEwma)]
    pub balance: crate::balance::Mode,

    /// Inbound mTLS mode: strict (mTLS only) or permissive (plaintext too, as unauthenticated).
    #[arg(long, env = "PALISADE_MTLS_MODE", value_enum, default_value_t = MtlsMode::Strict)]
    pub mtls_mode: MtlsMode,

    /// Ports whose traffic is opaque TCP: no protocol detection (server-speaks-first protocols).
    /// Matches the local port of an --upstream, or the app port for inbound plaintext.
    #[arg(long = "opaque-port", env = "PALISADE_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<u16>,

    /// App ports that carry only HTTP: inbound bytes that are not an HTTP request are refused,
    /// and a silent client is closed after --header-read-timeout instead of carried as TCP.
    #[arg(long = "http-port", env = "PALISADE_HTTP_PORTS", value_delimiter = ',')]
    pub http_ports: Vec<u16>,

    /// Runtime worker threads; 1 runs everything on one thread (lowest CPU and memory per request).
    #[arg(long, env = "PALISADE_THREADS", default_value_t = 1)]
    pub threads: usize,

    /// Write one JSON line per request (and per TCP connection) on stderr, target `access` (fields: docs/observability.md "Access logs").
    #[arg(long, env = "PALISADE_ACCESS_LOG")]
    pub access_log: bool,

    /// Share of requests the access log writes, 0 to 1.
    #[arg(long, env = "PALISADE_ACCESS_LOG_SAMPLING", default_value_t = 1.0, value_parser = palisade_cmd::ratio, requires = "access_log")]
    pub access_log_sampling: f64,

    /// Export a span per request over OTLP/gRPC to this collector: http://HOST:PORT, or https://HOST:PORT with --otlp-ca-file.
    #[arg(long, env = "PALISADE_OTLP_ENDPOINT")]
    #[serde(serialize_with = "ser_endpoint")]
    pub otlp_endpoint: Option<String>,

    /// CA certificates (PEM) an https:// collector's certificate must chain to.
    #[arg(long, env = "PALISADE_OTLP_CA_FILE", requires = "otlp_endpoint")]
    pub otlp_ca_file: Option<std::path::PathBuf>,

    /// Share of new traces recorded, 0 to 1; a request that arrives with a traceparent follows its sampled flag.
    #[arg(long, env = "PALISADE_TRACE_SAMPLING", default_value_t = 0.01, value_parser = palisade_cmd::ratio)]
    pub trace_sampling: f64,

    /// service.name of the exported spans.
    #[arg(long, env = "PALISADE_TRACE_SERVICE_NAME", default_value = "palisade-sidecar")]
    pub trace_service_name: String,

    /// Requests a second recorded (as authorization saw them: no body, no
    /// credential) for `palisadectl policy preview`; 0 records none.
    #[arg(long, env = "PALISADE_PREVIEW_RECORD_RATE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub preview_record_rate: u32,

    /// How often traffic counters (`palisadectl stat`) and recorded requests go to the control plane: 1s to 5m.
    #[arg(long, env = "PALISADE_REPORT_INTERVAL", default_value = "10s", value_parser = report_interval)]
    #[serde(serialize_with = "ser_duration")]
    pub report_interval: std::time::Duration,

    #[command(flatten)]
    pub limits: Limits,

    /// Admin HTTP server: /live, /ready, /metrics, /config.
    #[arg(long, env = "PALISADE_ADMIN", default_value = "127.0.0.1:4191", value_parser = palisade_cmd::socket_addr)]
    pub admin: SocketAddr,

    /// Log output format.
    #[arg(long, env = "PALISADE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter: LEVEL and TARGET=LEVEL directives, comma-separated.
    #[arg(long, env = "PALISADE_LOG", default_value = "info")]
    pub log: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Everything but the join token.
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}

/// Inbound mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// mTLS only.
    Strict,
    /// Plaintext too, as unauthenticated.
    Permissive,
}

pub use palisade_cmd::LogFormat;

/// A flag value that cannot work, found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--control-plane: {0}")]
    ControlPlane(#[from] palisade_proto::channel::ChannelError),
    #[error("--control-plane: {0} addresses given; give 1 to 16")]
    ControlPlanes(usize),
    #[error("{from}: {why}")]
    CaBundle { from: String, why: String },
    #[error(
        "no attestation credential: pass --join-token-file FILE (or --join-token, or --k8s-token-file in Kubernetes)"
    )]
    NoAttestation,
    #[error("--{flag} {path}: {why}")]
    TokenFile { flag: &'static str, path: PathBuf, why: String },
    #[error("--upstream {value:?}: {why}; expected LOCAL_HOST:PORT=<service-account>.<namespace>")]
    Upstream { value: String, why: String },
    #[error("--threads {0}: must be between 1 and 64")]
    Threads(usize),
    #[error("--max-header-bytes {0}: must be between 1024 and 1048576")]
    HeaderBytes(usize),
    #[error("--peer-keepalive {0}: must be between 500ms and 1h")]
    PeerKeepalive(String),
    #[error("port {0} is both an --opaque-port and an --http-port; pick one")]
    PortKind(u16),
}

/// An explicit outbound mapping: the app connects to `listen`, traffic goes to `service`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Upstream {
    pub listen: SocketAddr,
    pub service: String,
}

impl std::str::FromStr for Upstream {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| ConfigError::Upstream { value: s.to_string(), why: why.to_string() };
        let (listen, service) = s.split_once('=').ok_or_else(|| err("missing '='"))?;
        let listen: SocketAddr = listen.trim().parse().map_err(|_| err("LOCAL_HOST:PORT is not an IP:PORT"))?;
        let service = service.trim();
        let (sa, ns) = service.rsplit_once('.').ok_or_else(|| err("service must be <service-account>.<namespace>"))?;
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok(sa) || !ok(ns) {
            return Err(err("service must be <service-account>.<namespace>"));
        }
        Ok(Self { listen, service: service.to_string() })
    }
}

/// Data-path limits and timeouts, with safe defaults.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct Limits {
    /// Plaintext protocol detection gives up after this and treats the connection as opaque TCP.
    #[arg(long, env = "PALISADE_PROTOCOL_DETECT_TIMEOUT", default_value = "500ms", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub protocol_detect_timeout: Duration,
    /// Time allowed for a client to send a complete HTTP/1 request head.
    #[arg(long, env = "PALISADE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// Time allowed for the upstream to answer with response headers (then 504).
    #[arg(long, env = "PALISADE_RESPONSE_TIMEOUT", default_value = "30s", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub response_timeout: Duration,
    /// Largest request head (request line + headers), in bytes (then 431).
    #[arg(long, env = "PALISADE_MAX_HEADER_BYTES", default_value_t = 65536)]
    pub max_header_bytes: usize,
    /// Most header fields in one request (then 431).
    #[arg(long, env = "PALISADE_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// Largest request body in bytes (then 413); 0 means no limit (bodies stream through).
    #[arg(long, env = "PALISADE_MAX_REQUEST_BODY_BYTES", default_value_t = 0)]
    pub max_request_body_bytes: u64,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "PALISADE_MAX_CONCURRENT_STREAMS", default_value_t = 1000)]
    pub max_concurrent_streams: u32,
    /// Open connections per listener; beyond it new connections are closed at once. Inbound,
    /// these are connections past their handshake (PERMISSIVE plaintext callers get a budget
    /// of the same size of their own).
    #[arg(long, env = "PALISADE_MAX_CONNECTIONS", default_value_t = 10000)]
    pub max_connections: usize,
    /// Inbound connections past their handshake from one source address (a pod IP: a client
    /// pod's pooled and opaque connections fit well under it).
    #[arg(long, env = "PALISADE_MAX_CONNECTIONS_PER_IP", default_value_t = 1000, value_parser = count)]
    pub max_connections_per_ip: usize,
    /// Inbound connections before their first byte or in their TLS handshake, at once: what
    /// anyone who reaches the port can open, kept apart from the peers' connections.
    #[arg(long, env = "PALISADE_MAX_HANDSHAKES", default_value_t = 1024, value_parser = count)]
    pub max_handshakes: usize,
    /// Of those, most from one source address (a peer's handshakes take milliseconds).
    #[arg(long, env = "PALISADE_MAX_HANDSHAKES_PER_IP", default_value_t = 64, value_parser = count)]
    pub max_handshakes_per_ip: usize,
    /// From accept to a complete inbound TLS handshake (or a plaintext first byte), whatever the peer sends.
    #[arg(long, env = "PALISADE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = handshake_timeout)]
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval on pooled connections to peer sidecars, idle ones included: a dead
    /// connection is found within this plus 5s, before a request is put on it.
    #[arg(long, env = "PALISADE_PEER_KEEPALIVE", default_value = "10s", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub peer_keepalive: Duration,
    /// On SIGTERM, how long in-flight requests and connections may finish before exit.
    #[arg(long, env = "PALISADE_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration_arg)]
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
}

fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err("must be a number between 1 and 1000000".into()),
    }
}

fn handshake_timeout(s: &str) -> Result<Duration, String> {
    match duration_arg(s)? {
        d if d >= Duration::from_millis(100) && d <= Duration::from_secs(60) => Ok(d),
        _ => Err("must be between 100ms and 60s".into()),
    }
}

/// What validation turns the flags into, once: the values `start` runs on
/// that had to be parsed or read (the rest of the flags are typed by clap).
#[derive(Debug)]
pub struct Validated {
    pub control_plane: Vec<palisade_proto::channel::ControlPlaneAddr>,
    /// The trust anchors of `--ca-bundle`.
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub credential: crate::identity::Credential,
}

impl Config {
    /// Checks everything that can be checked before starting, and returns
    /// what it parsed so nothing is parsed twice.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        if self.control_plane.is_empty() || self.control_plane.len() > 16 {
            return Err(ConfigError::ControlPlanes(self.control_plane.len()));
        }
        let control_plane = self
            .control_plane
            .iter()
            .map(|a| palisade_proto::channel::ControlPlaneAddr::parse(a.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let (from, pem) = match (&self.ca_bundle, &self.ca_bundle_pem) {
            (_, Some(pem)) => ("--ca-bundle-pem".to_string(), pem.clone()),
            (Some(path), None) => {
                let from = format!("--ca-bundle {}", path.display());
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::CaBundle { from: from.clone(), why: e.to_string() })?;
                (from, pem)
            }
            (None, None) => {
                return Err(ConfigError::CaBundle { from: "--ca-bundle".into(), why: "required".into() });
            }
        };
        let roots = palisade_certs::ca::parse_pem_certs(&pem)
            .map_err(|why| ConfigError::CaBundle { from: from.clone(), why })?;
        palisade_certs::svid::root_store(&roots)
            .map_err(|e| ConfigError::CaBundle { from: from.clone(), why: e.to_string() })?;
        use crate::identity::Credential;
        let credential = match (&self.join_token, &self.join_token_file, &self.k8s_token_file) {
            (Some(t), _, _) => Credential::JoinToken(t.clone()),
            (None, Some(p), _) => Credential::JoinTokenFile(p.clone()),
            (None, None, Some(p)) => Credential::K8sTokenFile(p.clone()),
            (None, None, None) => return Err(ConfigError::NoAttestation),
        };
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
        if let Some(p) = self.http_ports.iter().find(|p| self.opaque_ports.contains(p)) {
            return Err(ConfigError::PortKind(*p));
        }
        if !(1..=64).contains(&self.threads) {
            return Err(ConfigError::Threads(self.threads));
        }
        if !(Duration::from_millis(500)..=Duration::from_secs(3600)).contains(&self.limits.peer_keepalive) {
            return Err(ConfigError::PeerKeepalive(humantime::format_duration(self.limits.peer_keepalive).to_string()));
        }
        if !(1024..=1 << 20).contains(&self.limits.max_header_bytes) {
            return Err(ConfigError::HeaderBytes(self.limits.max_header_bytes));
        }
        Ok(Validated { control_plane, roots, credential })
    }

    /// Whether plaintext inbound connections are accepted.
    pub fn permissive(&self) -> bool {
        self.mtls_mode == MtlsMode::Permissive
    }

    /// The inbound address to register in the directory, if reachable.
    pub fn advertised(&self) -> Option<SocketAddr> {
        self.advertise.or((!self.inbound.ip().is_unspecified()).then_some(self.inbound))
    }
}

/// An endpoint as logged and shown: credentials in it (user@host, refused
/// at start) never appear.
fn ser_endpoint<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(url) => {
            let shown = match (url.split_once("://"), url.rfind('@')) {
                (Some((scheme, _)), Some(at)) => format!("{scheme}://[redacted]@{}", &url[at + 1..]),
                _ => url.clone(),
            };
            s.serialize_some(&shown)
        }
    }
}

fn report_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = duration_arg(s)?;
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(300) {
        return Err("must be between 1s and 5m".into());
    }
    Ok(d)
}

/// What transparent mode does with traffic to destinations outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Connect to the original destination in plaintext, as if there were no mesh.
    Passthrough,
    /// Close the connection.
    Deny,
}
