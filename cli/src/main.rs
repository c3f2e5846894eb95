//! `palisadectl`: the Palisade operator CLI, over the control plane's Admin
//! gRPC API with the admin credential.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use palisade_certs::SvidInfo;
use palisade_certs::svid::rfc3339;
use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, Svid, SvidStore, TrustBundle};
use palisade_cmd::{out, outln};
use palisade_proto::channel::ControlPlaneAddr;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::*;
use tonic::transport::Channel;

mod ca;
mod creds;
mod inspect;
mod kube;
mod observe;
mod policy;
mod table;

/// Operate a Palisade mesh: join tokens, proxies, certificates, policies, health.
#[derive(Debug, Parser)]
#[command(name = "palisadectl", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How commands that talk to the control plane reach it, and how they print.
/// Offered only on those commands (and their subcommands).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Online {
    /// Control-plane address (https://HOST:PORT).
    #[arg(long, global = true, env = "PALISADE_CONTROL_PLANE", default_value = "https://127.0.0.1:7700")]
    control_plane: String,

    /// Directory holding the admin credential (ca.pem, cert.pem, key.pem),
    /// written by the control plane to <data-dir>/admin/ on first start.
    #[arg(long, global = true, env = "PALISADE_CREDENTIALS")]
    credentials: Option<PathBuf>,

    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Human-readable text.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Prints a JSON value as JSON or YAML per `-o`.
fn print_value(output: Output, v: &serde_json::Value) -> Result<()> {
    if output == Output::Yaml {
        out!("{}", serde_saphyr::to_string(v)?);
    } else {
        outln!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list and revoke join tokens (first-certificate attestation).
    Token {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// List proxies holding certificates: identity, address, cert expiry, last seen, policy sync.
    Proxies {
        #[command(flatten)]
        online: Online,
    },
    /// Certificate tools.
    #[command(subcommand)]
    Cert(CertCmd),
    /// The mesh's root CA: rotate it live, and see where a rotation stands.
    Ca {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: ca::CaCmd,
    },
    /// Check the control plane is reachable and healthy, the CA and the admin credential valid.
    Check {
        #[command(flatten)]
        online: Online,
        /// Retry until every check passes or this time has passed (e.g. 10s), for scripts
        /// that have just started the control plane.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
        /// Also check the Kubernetes install, read with `kubectl get
        /// deployments,pods,configmaps,mutatingwebhookconfigurations -A -o json`:
        /// control plane pods, image pulls, the webhook's CA, injected pods' trust bundles.
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: read that command's saved output from FILE (or -) instead of running kubectl.
        #[arg(long, requires = "kubernetes")]
        kubernetes_state: Option<PathBuf>,
        /// With --kubernetes: the kubectl to run.
        #[arg(long, default_value = "kubectl", requires = "kubernetes")]
        kubectl: String,
    },
    /// Apply, validate, list, get and delete policies.
    Policy {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Create, list and revoke API keys (request authentication).
    Apikey {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: creds::ApiKeyCmd,
    },
    /// The mesh's OAuth 2.0 token service: its clients.
    Oauth {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: creds::OAuthCmd,
    },
    /// Which TrafficPolicy route a caller's sidecar sends a request by, and where it goes.
    Route {
        #[command(flatten)]
        online: Online,
        /// Caller SPIFFE ID (routes belong to the caller's TrafficPolicies).
        #[arg(long)]
        from: String,
        /// The service the caller's app calls: <service-account>.<namespace>.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        request: RequestArgs,
    },
    /// Stream requests as the callees' sidecars see them, with the decision and deciding rule,
    /// until interrupted (through the control plane: works from outside a cluster).
    Tap {
        #[command(flatten)]
        online: Online,
        #[command(flatten)]
        args: observe::TapArgs,
    },
    /// Per-workload inbound traffic from the sidecars' reports: request rate, success rate,
    /// share refused by policy, latency percentiles.
    Stat {
        #[command(flatten)]
        online: Online,
        /// Workload SPIFFE ID or glob (default: all).
        #[arg(long)]
        workload: Option<String>,
        /// The time to compute rates over (at most 10m).
        #[arg(long, default_value = "1m", value_parser = parse_duration)]
        window: Duration,
    },
    /// Explain authorization decisions.
    Authz {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: AuthzCmd,
    },
    /// Add the Palisade sidecar to Kubernetes workloads in a YAML file (offline;
    /// the same code as the admission webhook). Pods, Deployments, StatefulSets,
    /// DaemonSets, ReplicaSets, Jobs, CronJobs; other documents pass through.
    Inject {
        /// A YAML file (several documents allowed), or - for standard input.
        #[arg(short, long)]
        file: PathBuf,
        /// Image with palisade-sidecar.
        #[arg(long, default_value = palisade_inject::IMAGE)]
        image: String,
        /// The mesh's trust bundle (PEM), written into each pod's spec.
        /// Default: ca.pem of --credentials.
        #[arg(long)]
        ca_bundle: Option<PathBuf>,
        /// Admin credential directory whose ca.pem is the trust bundle.
        #[arg(long, env = "PALISADE_CREDENTIALS")]
        credentials: Option<PathBuf>,
        /// Control-plane address as pods see it.
        #[arg(long, default_value = "https://palisade-control-plane.palisade-system.svc:7700")]
        mesh_control_plane: String,
        /// Classic sidecar container (Kubernetes < 1.29) instead of a native sidecar.
        #[arg(long)]
        classic_sidecar: bool,
    },
    /// Print the Kubernetes manifests that install Palisade (deploy/base, or deploy/ha with --ha).
    Install {
        /// Fill in a freshly generated root CA (Secret, trust bundle, webhook caBundle).
        #[arg(long)]
        generate_ca: bool,
        /// Trust domain of the generated CA.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Image of the control plane and of injected sidecars.
        #[arg(long, default_value = palisade_inject::IMAGE)]
        image: String,
        /// With --generate-ca: write an admin credential for palisadectl
        /// (ca.pem, cert.pem, key.pem) into this new directory, on this
        /// machine only; the cluster never holds it.
        #[arg(long, requires = "generate_ca")]
        credentials_out: Option<PathBuf>,
        /// Print deploy/ha instead: three control-plane replicas on a three-member etcd
        /// (with --generate-ca, also a fresh store key that seals the CA in etcd).
        #[arg(long)]
        ha: bool,
    },
    /// Print a shell completion script: `source <(palisadectl completion bash)`.
    Completion {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write man pages for palisadectl and each of its subcommands into DIR.
    Man {
        /// Directory to write palisadectl.1, palisadectl-token.1, ... into (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// The request `authz check` and `route` ask about.
#[derive(Debug, clap::Args)]
struct RequestArgs {
    /// HTTP method of the request (any case: get is GET).
    #[arg(long, default_value = "GET", value_parser = parse_method)]
    method: String,
    /// Request path (with its query, if any), e.g. /api/orders.
    #[arg(long, default_value = "/")]
    path: String,
    /// Request header NAME=VALUE, repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum AuthzCmd {
    /// What the callee's sidecar would decide for a request, and which rule decides.
    Check {
        /// Caller SPIFFE ID; omit for an unauthenticated (plaintext) caller.
        #[arg(long)]
        from: Option<String>,
        /// Callee SPIFFE ID.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        request: RequestArgs,
        /// The app port the request is addressed to (rules naming ports match only when it is given).
        #[arg(long)]
        port: Option<u16>,
        /// The request principal, as if its credential verified: `<iss>/<sub>` of a JWT, or an API key's principal.
        #[arg(long)]
        principal: Option<String>,
        /// The name of the API key the request carries.
        #[arg(long)]
        api_key: Option<String>,
        /// A claim of the verified token NAME=VALUE (VALUE may be JSON, e.g. roles=["a","b"]), repeatable.
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a join token; prints only the token on stdout (or JSON with -o json).
    Create {
        /// Identity the token attests: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
        #[arg(long)]
        identity: String,
        /// Lifetime, e.g. 10m, 1h (default: the control plane's, 10m).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// How many certificates the token may obtain.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
    },
    /// List join tokens (ids and state; never the secrets).
    List,
    /// Revoke a join token by id (see `token list`).
    Revoke {
        /// Token id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertCmd {
    /// Show a certificate's SPIFFE ID, issuer, validity and time left, and
    /// verify its chain against a trust bundle.
    Inspect {
        /// A PEM file (leaf first), or a TLS endpoint: HOST:PORT or https://HOST:PORT.
        target: String,
        /// Trust bundle (PEM) to verify against; default: <credentials>/ca.pem.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Directory holding the admin credential; its ca.pem is the default bundle.
        #[arg(long, env = "PALISADE_CREDENTIALS")]
        credentials: Option<PathBuf>,
        /// Output format (table or json).
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// An HTTP method token (RFC 9110), upper-cased: policies name methods in upper case.
fn parse_method(s: &str) -> Result<String, String> {
    let token = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err("not an HTTP method; use e.g. GET, POST, DELETE".into());
    }
    Ok(s.to_ascii_uppercase())
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; use a duration such as 10s, 5m or 1h"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    palisade_certs::install_default_provider();
    let cli: Cli = palisade_cmd::parse_from(hoist_connection_flags(std::env::args_os().collect()));
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(palisade_cmd::EXIT_FAILURE);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Token { online, cmd } => token(online, cmd).await,
        Command::Proxies { online } => proxies(online).await,
        Command::Cert(CertCmd::Inspect { target, bundle, credentials, output }) => {
            let bundle = bundle.clone().or_else(|| credentials.as_ref().map(|c| c.join("ca.pem")));
            inspect::inspect(target, bundle.as_deref(), *output != Output::Table).await
        }
        Command::Check { online, wait, kubernetes, kubernetes_state, kubectl } => {
            let cluster = kubernetes.then(|| (kubectl.as_str(), kubernetes_state.as_deref()));
            check(online, *wait, cluster).await
        }
        Command::Policy { online, cmd } => policy::run(online, cmd).await,
        Command::Inject { file, image, ca_bundle, credentials, mesh_control_plane, classic_sidecar } => {
            let bundle = ca_bundle.clone().or_else(|| credentials.as_ref().map(|c| c.join("ca.pem")));
            kube::inject(file, image, bundle.as_deref(), mesh_control_plane, *classic_sidecar)
        }
        Command::Install { generate_ca, trust_domain, image, credentials_out, ha } => {
            kube::install(*generate_ca, trust_domain, image, credentials_out.as_deref(), *ha)
        }
        Command::Authz {
            online,
            cmd:
                AuthzCmd::Check {
                    from,
                    to,
                    request: RequestArgs { method, path, headers },
                    port,
                    principal,
                    api_key,
                    claims,
                },
        } => {
            let req = policy::CheckRequest { from, to, method, path, headers, port: *port, principal, api_key, claims };
            policy::check(online, req).await
        }
        Command::Route { online, from, to, request: RequestArgs { method, path, headers } } => {
            policy::route(online, from, to, method, path, headers).await
        }
        Command::Tap { online, args } => observe::tap(online, args).await,
        Command::Ca { online, cmd } => ca::run(online, cmd).await,
        Command::Stat { online, workload, window } => observe::stat(online, workload.as_deref(), *window).await,
        Command::Apikey { online, cmd } => creds::apikey(online, cmd).await,
        Command::Oauth { online, cmd } => creds::oauth(online, cmd).await,
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "palisadectl", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::Man { dir } => man(dir),
    }
}

/// `palisadectl --control-plane URL check` (kubectl style, and how scripts
/// written for earlier versions call it): connection and output flags given
/// before the subcommand are moved after it, where they are defined (only
/// commands that talk to the control plane have them, so an offline command
/// still refuses them).
fn hoist_connection_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut moved = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        let takes_value = matches!(a.as_ref(), "--control-plane" | "--credentials" | "-o" | "--output");
        let inline = ["--control-plane=", "--credentials=", "--output="].iter().any(|p| a.starts_with(p))
            || (a.starts_with("-o") && a.len() > 2 && !a.starts_with("--"));
        if takes_value && i + 1 < args.len() {
            moved.extend_from_slice(&args[i..i + 2]);
            i += 2;
        } else if inline {
            moved.push(args[i].clone());
            i += 1;
        } else {
            break;
        }
    }
    if moved.is_empty() || i >= args.len() || args[i].to_string_lossy().starts_with('-') {
        return args;
    }
    let mut out = vec![args[0].clone(), args[i].clone()];
    out.extend(moved);
    out.extend_from_slice(&args[i + 1..]);
    out
}

/// Man pages for the command and each subcommand, named as `man` expects
/// (`palisadectl-policy-apply.1`).
fn man(dir: &std::path::Path) -> Result<()> {
    fn write(cmd: clap::Command, name: String, dir: &std::path::Path, written: &mut Vec<String>) -> Result<()> {
        let cmd = cmd.name(name.clone()).bin_name(name.replace('-', " "));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        let file = dir.join(format!("{name}.1"));
        std::fs::write(&file, page).with_context(|| format!("cannot write {}", file.display()))?;
        written.push(file.display().to_string());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            write(sub.clone(), format!("{name}-{}", sub.get_name()), dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write(cmd, "palisadectl".into(), dir, &mut written)?;
    for w in written {
        outln!("{w}");
    }
    Ok(())
}

/// The admin credential loaded from disk.
struct Credentials {
    bundle: TrustBundle,
    svid: Svid,
}

fn load_credentials(cli: &Online) -> Result<Credentials> {
    let dir = cli
        .credentials
        .as_ref()
        .ok_or_else(|| anyhow!("no admin credential: pass --credentials DIR or set PALISADE_CREDENTIALS to the control plane's <data-dir>/admin"))?;
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!("cannot read {} (is --credentials the control plane's <data-dir>/admin?)", p.display())
        })
    };
    let roots =
        palisade_certs::ca::parse_pem_certs(&read("ca.pem")?).map_err(|e| anyhow!("{}/ca.pem: {e}", dir.display()))?;
    let chain = palisade_certs::ca::parse_pem_certs(&read("cert.pem")?)
        .map_err(|e| anyhow!("{}/cert.pem: {e}", dir.display()))?;
    let key = palisade_certs::SecretPem::new(read("key.pem")?);
    let (id, info) = SvidInfo::parse_svid(&chain[0]).with_context(|| format!("{}/cert.pem", dir.display()))?;
    let certified = palisade_certs::csr::certified_key_from_pem(chain, &key)
        .with_context(|| format!("{}/key.pem", dir.display()))?;
    let bundle = TrustBundle::new(&roots).with_context(|| format!("{}/ca.pem", dir.display()))?;
    Ok(Credentials { bundle, svid: Svid { certified, info, id } })
}

async fn connect(cli: &Online, creds: &Credentials) -> Result<Channel> {
    let addr = ControlPlaneAddr::parse(&cli.control_plane)?;
    let now = SystemTime::now();
    if !creds.svid.is_valid_at(now) {
        bail!(
            "the admin credential expired at {}; restart the control plane to reissue it",
            rfc3339::format(creds.svid.info.not_after)
        );
    }
    let td = creds.svid.id.trust_domain().clone();
    let verifier = SpiffeServerVerifier::new(creds.bundle.clone(), PeerIdentity::Exact(td.control_plane()));
    let store = SvidStore::new();
    store.set(Svid {
        certified: creds.svid.certified.clone(),
        info: creds.svid.info.clone(),
        id: creds.svid.id.clone(),
    });
    let tls = palisade_certs::tls::client_config(verifier, Some(Arc::new(store)))?;
    palisade_proto::channel::connect(&addr, Arc::new(tls), Duration::from_secs(10)).await.map_err(|e| {
        use palisade_proto::channel::{ChannelError, Failure};
        let hint = match &e {
            ChannelError::Connect { failure: Failure::UnknownCa | Failure::ClientRejected, .. } => format!(
                "hint: --credentials / PALISADE_CREDENTIALS ({}) must be the admin directory of the control plane at {addr}",
                cli.credentials.as_ref().map(|c| c.display().to_string()).unwrap_or_default()
            ),
            _ => format!("hint: the address comes from --control-plane / PALISADE_CONTROL_PLANE ({addr})"),
        };
        anyhow!("{e}\n{hint}")
    })
}

pub(crate) async fn admin(cli: &Online) -> Result<AdminClient<Channel>> {
    let creds = load_credentials(cli)?;
    Ok(AdminClient::new(connect(cli, &creds).await?)
        .max_decoding_message_size(palisade_proto::limits::MAX_ADMIN_MESSAGE_BYTES)
        .max_encoding_message_size(palisade_proto::limits::MAX_ADMIN_MESSAGE_BYTES))
}

pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", code_name(s.code()), s.message())
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}").chars().fold(String::new(), |mut out, ch| {
        if ch.is_uppercase() && !out.is_empty() {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
        out
    })
}

fn ts(t: &Option<palisade_proto::prost_types::Timestamp>) -> Option<SystemTime> {
    t.as_ref().and_then(|t| SystemTime::try_from(*t).ok())
}

fn time_str(t: Option<SystemTime>) -> String {
    t.map(rfc3339::format).unwrap_or_else(|| "-".into())
}

/// "in 9m 58s" / "2m 3s ago".
fn relative(t: Option<SystemTime>) -> String {
    let Some(t) = t else { return "-".into() };
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(d) => format!("in {}", short(d)),
        Err(e) => format!("{} ago", short(e.duration())),
    }
}

/// A duration with its two largest units: `89d 2h`, `9m 58s`, `4s`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    let pair =
        |a: u64, ua: &str, b: u64, ub: &str| if b == 0 { format!("{a}{ua}") } else { format!("{a}{ua} {b}{ub}") };
    if days > 0 {
        pair(days, "d", hours, "h")
    } else if hours > 0 {
        pair(hours, "h", mins, "m")
    } else if mins > 0 {
        pair(mins, "m", secs, "s")
    } else {
        format!("{secs}s")
    }
}

fn token_json(t: &JoinTokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "identity": t.identity,
        "created_at": time_str(ts(&t.created_at)),
        "expires_at": time_str(ts(&t.expires_at)),
        "uses_total": t.uses_total,
        "uses_left": t.uses_left,
        "revoked": t.revoked,
        "state": token_state(t),
    })
}

fn token_state(t: &JoinTokenInfo) -> &'static str {
    if t.revoked {
        "revoked"
    } else if ts(&t.expires_at).is_some_and(|e| e <= SystemTime::now()) {
        "expired"
    } else if t.uses_left == 0 {
        "used"
    } else {
        "active"
    }
}

async fn token(cli: &Online, cmd: &TokenCmd) -> Result<()> {
    let mut client = admin(cli).await?;
    match cmd {
        TokenCmd::Create { identity, ttl, uses } => {
            palisade_certs::SpiffeId::parse_workload(identity).map_err(|e| anyhow!("--identity: {e}"))?;
            let resp = client
                .create_join_token(CreateJoinTokenRequest {
                    identity: identity.clone(),
                    ttl_seconds: ttl.map(|d| d.as_secs().max(1)).unwrap_or(0),
                    uses: *uses,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.output != Output::Table {
                let mut v = resp.info.as_ref().map(token_json).unwrap_or_default();
                v["token"] = resp.token.into();
                print_value(cli.output, &serde_json::to_value(&v)?)?;
            } else {
                outln!("{}", resp.token);
                if let Some(info) = &resp.info {
                    eprintln!(
                        "token {} for {} expires {} ({}), {} use(s); it is shown only once",
                        info.id,
                        info.identity,
                        time_str(ts(&info.expires_at)),
                        relative(ts(&info.expires_at)),
                        info.uses_total
                    );
                }
            }
        }
        TokenCmd::List => {
            let tokens =
                client.list_join_tokens(ListJoinTokensRequest {}).await.map_err(status_err)?.into_inner().tokens;
            if cli.output != Output::Table {
                print_value(cli.output, &serde_json::to_value(tokens.iter().map(token_json).collect::<Vec<_>>())?)?;
            } else {
                let rows = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.identity.clone(),
                            token_state(t).into(),
                            format!("{}/{}", t.uses_left, t.uses_total),
                            relative(ts(&t.expires_at)),
                        ]
                    })
                    .collect();
                table::print(&["ID", "IDENTITY", "STATE", "USES LEFT", "EXPIRES"], rows);
            }
        }
        TokenCmd::Revoke { id } => {
            let info = client
                .revoke_join_token(RevokeJoinTokenRequest { id: id.clone() })
                .await
                .map_err(status_err)?
                .into_inner()
                .info
                .unwrap_or_default();
            if cli.output != Output::Table {
                print_value(cli.output, &serde_json::to_value(token_json(&info))?)?;
            } else {
                outln!("revoked token {} ({})", info.id, info.identity);
            }
        }
    }
    Ok(())
}

async fn proxies(cli: &Online) -> Result<()> {
    let mut client = admin(cli).await?;
    let proxies = client.list_proxies(ListProxiesRequest {}).await.map_err(status_err)?.into_inner().proxies;
    let now = SystemTime::now();
    let state = |p: &ProxyInfo| {
        if ts(&p.cert_not_after).is_some_and(|t| t > now) { "valid" } else { "expired" }
    };
    if cli.output != Output::Table {
        let v: Vec<_> = proxies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "identity": p.identity,
                    "inbound_addr": p.inbound_addr,
                    "peer_addr": p.peer_addr,
                    "cert_serial": p.cert_serial,
                    "cert_not_after": time_str(ts(&p.cert_not_after)),
                    "cert_state": state(p),
                    "last_seen": time_str(ts(&p.last_seen)),
                    "attestation": p.attestation,
                    "policy_version": p.policy_version,
                    "sync_state": p.sync_state,
                    "last_nack": p.last_nack,
                })
            })
            .collect();
        return print_value(cli.output, &serde_json::Value::Array(v));
    }
    let rows = proxies
        .iter()
        .map(|p| {
            vec![
                p.identity.clone(),
                if p.inbound_addr.is_empty() { "-".into() } else { p.inbound_addr.clone() },
                p.peer_addr.clone(),
                format!("{} ({})", relative(ts(&p.cert_not_after)), state(p)),
                relative(ts(&p.last_seen)),
                p.attestation.clone(),
                if p.policy_version.is_empty() { "-".into() } else { p.policy_version.clone() },
                match (p.sync_state.as_str(), p.last_nack.is_empty()) {
                    ("", _) => "-".into(),
                    ("nacked", false) => format!("nacked: {}", p.last_nack),
                    (s, _) => s.to_string(),
                },
            ]
        })
        .collect();
    table::print(&["IDENTITY", "INBOUND", "PEER", "CERT EXPIRES", "LAST SEEN", "ATTESTED BY", "POLICY", "SYNC"], rows);
    Ok(())
}

/// `check`, retried while `--wait` allows, until every check passes.
async fn check(cli: &Online, wait: Option<Duration>, cluster: Option<(&str, Option<&std::path::Path>)>) -> Result<()> {
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    loop {
        let mut results = checks(cli).await;
        if let Some((kubectl, file)) = cluster {
            for r in results.iter_mut().filter(|r| r.0 == "control plane reachable" && !r.1) {
                r.2.push_str(
                    "; in a cluster, reach it with `kubectl -n palisade-system port-forward svc/palisade-control-plane \
                     7700:7700` and --control-plane https://127.0.0.1:7700",
                );
            }
            match kube::cluster_state(kubectl, file) {
                Ok(state) => {
                    let bundle = cli.credentials.as_ref().and_then(|d| std::fs::read_to_string(d.join("ca.pem")).ok());
                    results.extend(kube::cluster_findings(&state, bundle.as_deref()));
                }
                Err(e) => results.push(("kubernetes".into(), false, format!("{e:#}"))),
            }
        }
        let all_ok = results.iter().all(|r| r.1);
        if all_ok || deadline.is_none_or(|d| std::time::Instant::now() >= d) {
            return report_checks(cli, &results);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn report_checks(cli: &Online, results: &[(String, bool, String)]) -> Result<()> {
    let all_ok = results.iter().all(|r| r.1);
    if cli.output != Output::Table {
        let v: Vec<_> =
            results.iter().map(|(n, ok, d)| serde_json::json!({"check": n, "ok": ok, "detail": d})).collect();
        print_value(cli.output, &serde_json::to_value(serde_json::json!({"ok": all_ok, "checks": v}))?)?;
    } else {
        for (name, ok, detail) in results {
            outln!("{} {name}: {detail}", if *ok { "[ok]  " } else { "[FAIL]" });
        }
    }
    if !all_ok {
        bail!("some checks failed");
    }
    Ok(())
}

async fn checks(cli: &Online) -> Vec<(String, bool, String)> {
    let mut results: Vec<(String, bool, String)> = Vec::new();
    let creds = load_credentials(cli);
    match &creds {
        Ok(c) => {
            let left = c.svid.info.time_left(SystemTime::now());
            results.push((
                "admin credential".into(),
                !left.is_zero(),
                format!(
                    "{} expires {} ({})",
                    c.svid.id,
                    rfc3339::format(c.svid.info.not_after),
                    relative(Some(c.svid.info.not_after))
                ),
            ));
        }
        Err(e) => results.push(("admin credential".into(), false, format!("{e:#}"))),
    }
    if let Ok(creds) = &creds {
        match connect(cli, creds).await {
            Err(e) => results.push(("control plane reachable".into(), false, format!("{e:#}"))),
            Ok(ch) => {
                results.push((
                    "control plane reachable".into(),
                    true,
                    format!(
                        "{} (identity verified: {})",
                        cli.control_plane,
                        creds.svid.id.trust_domain().control_plane()
                    ),
                ));
                let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
                    .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await;
                match health {
                    Ok(r) => {
                        let serving = r.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
                        results.push((
                            "control plane healthy".into(),
                            serving,
                            if serving { "SERVING".into() } else { "NOT SERVING".into() },
                        ));
                    }
                    Err(s) => results.push(("control plane healthy".into(), false, status_err(s).to_string())),
                }
                match AdminClient::new(ch).get_status(GetStatusRequest {}).await {
                    Ok(r) => {
                        let s = r.into_inner();
                        let ca_after = ts(&s.ca_not_after);
                        let ok = ca_after.is_some_and(|t| t > SystemTime::now() + Duration::from_secs(86400));
                        results.push((
                            "CA valid".into(),
                            ok,
                            format!(
                                "{} in trust domain {} expires {} ({}); workload cert TTL {}",
                                s.ca_subject,
                                s.trust_domain,
                                time_str(ca_after),
                                relative(ca_after),
                                short(Duration::from_secs(s.cert_ttl_seconds))
                            ),
                        ));
                        results.push(("admin API authorized".into(), true, format!("as {}", s.caller_identity)));
                    }
                    Err(s) => results.push(("admin API authorized".into(), false, status_err(s).to_string())),
                }
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_and_subcommand_has_help() {
        palisade_cmd::assert_documented(super::Cli::command());
    }

    #[test]
    fn connection_flags_before_the_subcommand_are_moved_after_it() {
        let v = |s: &str| s.split(' ').map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            super::hoist_connection_flags(v("ctl --control-plane X -o json check --wait 1s")),
            v("ctl check --control-plane X -o json --wait 1s")
        );
        assert_eq!(
            super::hoist_connection_flags(v("ctl -ojson --credentials=D proxies")),
            v("ctl proxies -ojson --credentials=D")
        );
        assert_eq!(super::hoist_connection_flags(v("ctl proxies -o json")), v("ctl proxies -o json"));
        assert_eq!(super::hoist_connection_flags(v("ctl --help")), v("ctl --help"));
        assert_eq!(super::hoist_connection_flags(v("ctl -o json")), v("ctl -o json"));
    }

    #[test]
    fn methods_are_tokens_in_upper_case() {
        assert_eq!(super::parse_method("get").unwrap(), "GET");
        assert!(super::parse_method("GE T").is_err());
        assert!(super::parse_method("").is_err());
    }
}
