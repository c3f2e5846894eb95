//! `palisadectl`: the Palisade operator CLI, over the control plane's Admin
//! gRPC API with the admin credential.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use palisade_cmd::duration_arg;
use palisade_cmd::out;

mod argv;
mod ca;
mod check;
mod client;
mod creds;
mod dashboard;
mod inspect;
mod kube;
mod kubectl;
mod man;
mod observe;
mod policy;
mod proxies;
mod route;
mod show;
mod table;
mod token;

/// Operate a Palisade mesh: join tokens, proxies, certificates, policies, health.
#[derive(Debug, Parser)]
#[command(name = "palisadectl", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    /// Output format, before or after the subcommand (default: table; manifests: yaml).
    #[arg(short, long, global = true, value_enum)]
    output: Option<Output>,

    #[command(subcommand)]
    command: Command,
}

/// How commands that talk to the control plane reach it, and how they print.
/// The connection flags are offered only on those commands (and their
/// subcommands); `output` is the global `-o`, copied in after parsing.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Online {
    /// Control-plane address (https://HOST:PORT).
    #[arg(long, global = true, env = "PALISADE_CONTROL_PLANE", default_value = "https://127.0.0.1:7700")]
    control_plane: String,

    /// Directory holding the admin credential (ca.pem, cert.pem, key.pem),
    /// written by the control plane to <data-dir>/admin/ on first start.
    #[arg(long, global = true, env = "PALISADE_CREDENTIALS")]
    credentials: Option<PathBuf>,

    #[arg(skip)]
    output: Output,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Human-readable text.
    #[default]
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list and revoke join tokens (first-certificate attestation).
    Token {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: token::TokenCmd,
    },
    /// List proxies holding certificates: identity, address, cert expiry, last seen, policy sync.
    Proxies {
        #[command(flatten)]
        online: Online,
    },
    /// Certificate tools.
    #[command(subcommand)]
    Cert(inspect::CertCmd),
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
        #[arg(long, value_parser = duration_arg)]
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
        request: policy::RequestArgs,
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
    /// share refused by policy, latency percentiles. Sidecars report every 10 s (their
    /// --report-interval), so requests of the last seconds may not be counted yet: --wait
    /// waits for the next report.
    Stat {
        #[command(flatten)]
        online: Online,
        /// Workload SPIFFE ID or glob (default: all).
        #[arg(long)]
        workload: Option<String>,
        /// The time to compute rates over (at most 10m).
        #[arg(long, default_value = "1m", value_parser = duration_arg)]
        window: Duration,
        /// First wait (up to this long, e.g. 15s) until every sidecar counted has reported
        /// since the command started, so that requests sent just before are counted.
        #[arg(long, value_parser = duration_arg)]
        wait: Option<Duration>,
        /// Also print, for each sidecar of the workloads as a caller, the endpoints of the
        /// services it calls as its balancer sees them (latency, in flight, failures,
        /// ejections) and its retries (-o json/yaml always include them).
        #[arg(long)]
        endpoints: bool,
    },
    /// Serve a web dashboard on this machine (127.0.0.1) and print its URL: the mesh graph,
    /// each workload's traffic and live requests, refusals and their rules, policies with a
    /// preview, certificates. Read-only; the URL's token is its key (docs/dashboard.md).
    Dashboard {
        #[command(flatten)]
        online: Online,
        #[command(flatten)]
        args: dashboard::DashboardArgs,
    },
    /// Explain authorization decisions.
    Authz {
        #[command(flatten)]
        online: Online,
        #[command(subcommand)]
        cmd: policy::AuthzCmd,
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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    palisade_certs::install_default_provider();
    let mut cli: Cli = palisade_cmd::parse_from(argv::hoist_connection_flags(std::env::args_os().collect()));
    let output = cli.output.unwrap_or_default();
    if let Some(online) = cli.command.online_mut() {
        online.output = output;
    }
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(exit_code(&e));
    }
}

/// The exit status of a failed command: 64 (`EX_USAGE`) when what the user
/// typed or gave is wrong (a flag's value or an argument palisadectl checks
/// itself, a policy document that is not valid, or what the control plane
/// answers `INVALID_ARGUMENT` to), 1 when it is right but the job cannot be
/// done (unreachable, refused, not found, not verified, timed out).
fn exit_code(e: &anyhow::Error) -> i32 {
    let usage = e.chain().any(|c| {
        c.is::<palisade_cmd::UsageError>()
            || c.is::<palisade_policy::PolicyError>()
            || c.downcast_ref::<client::StatusError>().is_some_and(|s| s.0.code() == tonic::Code::InvalidArgument)
    });
    if usage { palisade_cmd::EXIT_USAGE } else { palisade_cmd::EXIT_FAILURE }
}

impl Command {
    /// The connection flags of a command that talks to the control plane.
    fn online_mut(&mut self) -> Option<&mut Online> {
        match self {
            Self::Token { online, .. }
            | Self::Proxies { online }
            | Self::Ca { online, .. }
            | Self::Check { online, .. }
            | Self::Policy { online, .. }
            | Self::Apikey { online, .. }
            | Self::Oauth { online, .. }
            | Self::Route { online, .. }
            | Self::Tap { online, .. }
            | Self::Stat { online, .. }
            | Self::Authz { online, .. }
            | Self::Dashboard { online, .. } => Some(online),
            Self::Cert(_) | Self::Inject { .. } | Self::Install { .. } | Self::Completion { .. } | Self::Man { .. } => {
                None
            }
        }
    }
}

/// An error in what the user typed or gave: exit 64 (see [`exit_code`]).
pub(crate) fn usage(message: impl std::fmt::Display) -> anyhow::Error {
    palisade_cmd::UsageError(message.to_string()).into()
}

/// `-o` of a command that prints Kubernetes manifests: YAML (the default) or
/// a JSON `List`, as kubectl reads either; a table is not a manifest.
fn manifest_format(output: Option<Output>, command: &str) -> Result<Output> {
    match output {
        None | Some(Output::Yaml) => Ok(Output::Yaml),
        Some(Output::Json) => Ok(Output::Json),
        Some(Output::Table) => Err(palisade_cmd::UsageError(format!(
            "-o table: `palisadectl {command}` prints Kubernetes manifests; use -o yaml (the default) or -o json"
        ))
        .into()),
    }
}

/// `-o` given to a command whose output has one form only.
fn no_output_format(output: Option<Output>, command: &str, prints: &str) -> Result<()> {
    match output {
        None => Ok(()),
        Some(o) => Err(palisade_cmd::UsageError(format!(
            "-o {}: `palisadectl {command}` {prints}, in one form only; leave -o out",
            o.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
        ))
        .into()),
    }
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Token { online, cmd } => token::run(online, cmd).await,
        Command::Proxies { online } => proxies::run(online).await,
        Command::Cert(inspect::CertCmd::Inspect { target, bundle, credentials }) => {
            let bundle = bundle.clone().or_else(|| credentials.as_ref().map(|c| c.join("ca.pem")));
            inspect::inspect(target, bundle.as_deref(), cli.output.unwrap_or_default()).await
        }
        Command::Check { online, wait, kubernetes, kubernetes_state, kubectl } => {
            let cluster = kubernetes.then(|| (kubectl.as_str(), kubernetes_state.as_deref()));
            check::run(online, *wait, cluster).await
        }
        Command::Policy { online, cmd } => policy::run(online, cmd).await,
        Command::Inject { file, image, ca_bundle, credentials, mesh_control_plane, classic_sidecar } => {
            let bundle = ca_bundle.clone().or_else(|| credentials.as_ref().map(|c| c.join("ca.pem")));
            let format = manifest_format(cli.output, "inject")?;
            kube::inject(file, image, bundle.as_deref(), mesh_control_plane, *classic_sidecar, format)
        }
        Command::Install { generate_ca, trust_domain, image, credentials_out, ha } => {
            let format = manifest_format(cli.output, "install")?;
            kube::install(*generate_ca, trust_domain, image, credentials_out.as_deref(), *ha, format)
        }
        Command::Authz {
            online,
            cmd:
                policy::AuthzCmd::Check {
                    from,
                    to,
                    request: policy::RequestArgs { method, path, headers },
                    port,
                    principal,
                    api_key,
                    claims,
                },
        } => {
            let req = policy::CheckRequest { from, to, method, path, headers, port: *port, principal, api_key, claims };
            policy::check(online, req).await
        }
        Command::Route { online, from, to, request: policy::RequestArgs { method, path, headers } } => {
            route::route(online, from, to, method, path, headers).await
        }
        Command::Tap { online, args } => observe::tap(online, args).await,
        Command::Dashboard { online, args } => {
            no_output_format(cli.output, "dashboard", "serves a web page")?;
            dashboard::run(online, args).await
        }
        Command::Ca { online, cmd } => ca::run(online, cmd).await,
        Command::Stat { online, workload, window, wait, endpoints } => {
            observe::stat(online, workload.as_deref(), *window, *wait, *endpoints).await
        }
        Command::Apikey { online, cmd } => creds::apikey(online, cmd).await,
        Command::Oauth { online, cmd } => creds::oauth(online, cmd).await,
        Command::Completion { shell } => {
            no_output_format(cli.output, "completion", "prints a shell script")?;
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "palisadectl", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::Man { dir } => {
            no_output_format(cli.output, "man", "writes man pages")?;
            man::write_pages(dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn every_flag_and_subcommand_has_help() {
        palisade_cmd::assert_documented(super::Cli::command());
    }

    #[test]
    fn duration_flags_take_durations_and_say_what_one_looks_like() {
        let parse =
            |args: &[&str]| super::Cli::try_parse_from(std::iter::once("palisadectl").chain(args.iter().copied()));
        let cli = parse(&["check", "--wait", "1m30s"]).unwrap();
        assert!(
            matches!(cli.command, super::Command::Check { wait: Some(w), .. } if w == std::time::Duration::from_secs(90))
        );
        for bad in [
            &["check", "--wait", "ten"][..],
            &["token", "create", "--identity", "x", "--ttl", "5"],
            &["stat", "--window", "1q"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
            assert!(e.to_string().contains("use a duration such as 500ms, 10s, 5m or 1h"), "{bad:?}: {e}");
        }
    }
}
