//! `palisadectl policy ...` and `palisadectl authz check`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use palisade_proto::v1::*;

use crate::client::{admin, status_err};
use crate::proxies::SyncState;
use crate::show::print_value;
use crate::{Online, Output, table};
use palisade_cmd::{out, outln};

/// Policy management.
#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCmd {
    /// Create or update the resources in FILE or in every .yaml/.yml/.json file of DIR
    /// (validated locally first); prints each revision and the diff.
    Apply {
        /// A file, a directory, or - for standard input.
        #[arg(short, long)]
        file: PathBuf,
        /// Then wait (up to this long, e.g. 30s) until every connected proxy enforces the result;
        /// exit 1 if one rejects it or time runs out.
        #[arg(long, value_parser = palisade_cmd::duration_arg)]
        wait: Option<std::time::Duration>,
        /// First show what the change would decide differently for recent traffic
        /// (as `policy preview`), and ask before applying.
        #[arg(long)]
        preview: bool,
        /// With --preview: apply without asking (for scripts).
        #[arg(long, requires = "preview")]
        yes: bool,
    },
    /// What FILE would change: the recently recorded requests whose decision would flip
    /// (allow -> deny, deny -> allow), grouped by caller, callee, method and path. Changes nothing.
    Preview {
        /// A file, a directory, or - for standard input.
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Validate locally and on the control plane, changing nothing; prints the diff
    /// and warnings (identities of another trust domain, or that no workload has).
    Validate {
        /// A file, a directory, or - for standard input.
        #[arg(short, long)]
        file: PathBuf,
    },
    /// List stored policies.
    List,
    /// Show one policy (YAML; JSON with -o json).
    Get {
        /// AuthorizationPolicy or RateLimitPolicy (any case; plural, or short: ap, rlp).
        kind: String,
        /// NAMESPACE/NAME
        key: String,
    },
    /// Delete one policy.
    Delete {
        /// AuthorizationPolicy or RateLimitPolicy (any case; plural, or short: ap, rlp).
        kind: String,
        /// NAMESPACE/NAME
        key: String,
    },
}

/// Asks on stderr whether to apply; reads the answer from stdin (no answer: no).
fn confirm() -> Result<bool> {
    eprint!("apply this change? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Piped: show what was read, as a terminal would have.
        eprintln!("{}", answer.trim());
    }
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Reads FILE, DIR (sorted, .yaml/.yml/.json) or - into (name, text) pairs.
fn read_documents(path: &Path) -> Result<Vec<(String, String)>> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        return Ok(vec![("stdin".into(), s)]);
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json")))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(crate::usage(format!("{} holds no .yaml, .yml or .json file", path.display())));
        }
        return files
            .iter()
            .map(|f| {
                Ok((
                    f.display().to_string(),
                    std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
                ))
            })
            .collect();
    }
    Ok(vec![(
        path.display().to_string(),
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    )])
}

/// The documents joined into one, after local validation of each.
fn load(path: &Path) -> Result<String> {
    let docs = read_documents(path)?;
    let mut all = Vec::new();
    for (name, text) in &docs {
        let resources =
            palisade_policy::yaml::parse_text(text).map_err(|e| anyhow::Error::new(e).context(name.clone()))?;
        all.extend(resources);
    }
    if all.is_empty() {
        return Err(crate::usage(format!("{} holds no resource", path.display())));
    }
    Ok(serde_json::to_string(&all)?)
}

fn print_applied(cli: &Online, applied: &[AppliedPolicy]) -> Result<()> {
    if cli.output != Output::Table {
        let v: Vec<_> = applied
            .iter()
            .map(|a| serde_json::json!({"kind": a.kind, "key": a.key, "revision": a.revision, "change": a.change, "diff": a.diff}))
            .collect();
        return print_value(cli.output, &serde_json::Value::Array(v));
    }
    for a in applied {
        let rev = if a.revision > 0 { format!(" (revision {})", a.revision) } else { String::new() };
        outln!("{} {} {}{rev}", a.kind, a.key, a.change);
        if !a.diff.is_empty() {
            out!("{}", a.diff);
        }
    }
    Ok(())
}

pub(crate) async fn run(cli: &Online, cmd: &PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Preview { file } => {
            let document = load(file)?;
            let p = admin(cli).await?.preview_policy(ApplyPolicyRequest { document }).await.map_err(status_err)?;
            crate::observe::print_preview(cli.output, &p.into_inner())?;
            Ok(())
        }
        PolicyCmd::Apply { file, .. } | PolicyCmd::Validate { file } => {
            let document = load(file)?;
            let mut c = admin(cli).await?;
            if let PolicyCmd::Apply { preview: true, yes, .. } = cmd {
                let p = c
                    .preview_policy(ApplyPolicyRequest { document: document.clone() })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                // The preview goes to stderr, as the question does: stdout stays the apply's result.
                for w in &p.warnings {
                    eprintln!("warning: {w}");
                }
                eprint!("{}", crate::observe::preview_text(&p));
                if !yes && !confirm()? {
                    bail!("not applied");
                }
            }
            let req = ApplyPolicyRequest { document };
            let resp = if matches!(cmd, PolicyCmd::Apply { .. }) {
                c.apply_policy(req).await
            } else {
                c.validate_policy(req).await
            };
            let resp = resp.map_err(status_err)?.into_inner();
            for w in &resp.warnings {
                eprintln!("warning: {w}");
            }
            print_applied(cli, &resp.applied)?;
            if let PolicyCmd::Apply { wait: Some(wait), .. } = cmd {
                let revision = resp.applied.iter().map(|a| a.revision).max().unwrap_or(0);
                wait_synced(&mut c, revision, *wait).await?;
            }
            Ok(())
        }
        PolicyCmd::List => {
            let resp = admin(cli).await?.list_policies(ListPoliciesRequest {}).await.map_err(status_err)?.into_inner();
            if cli.output != Output::Table {
                let v: Vec<serde_json::Value> =
                    resp.policies.iter().filter_map(|p| serde_json::from_str(&p.json).ok()).collect();
                return print_value(cli.output, &serde_json::Value::Array(v));
            }
            let rows =
                resp.policies.iter().map(|p| vec![p.kind.clone(), p.key.clone(), p.revision.to_string()]).collect();
            table::print(&["KIND", "NAMESPACE/NAME", "REVISION"], rows);
            outln!("store revision {}", resp.revision);
            Ok(())
        }
        PolicyCmd::Get { kind, key } => {
            let p = admin(cli)
                .await?
                .get_policy(GetPolicyRequest { kind: kind.clone(), key: key.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            let v: serde_json::Value = serde_json::from_str(&p.json)?;
            if cli.output == Output::Json {
                return print_value(cli.output, &v);
            }
            // Table output of one resource: YAML reads best.
            out!("{}", serde_saphyr::to_string(&v)?);
            Ok(())
        }
        PolicyCmd::Delete { kind, key } => {
            let r = admin(cli)
                .await?
                .delete_policy(GetPolicyRequest { kind: kind.clone(), key: key.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            let kind = palisade_policy::canonical_kind(kind).unwrap_or(kind);
            if cli.output != Output::Table {
                let v = serde_json::json!({"kind": kind, "key": key, "change": "deleted", "revision": r.revision});
                return print_value(cli.output, &v);
            }
            outln!("{kind} {key} deleted (revision {})", r.revision);
            Ok(())
        }
    }
}

/// Waits until every connected proxy's snapshot reflects `revision` and is
/// ACKed; fails on a NACK or when `wait` runs out.
async fn wait_synced(
    c: &mut palisade_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    revision: u64,
    wait: std::time::Duration,
) -> Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let proxies = c.list_proxies(ListProxiesRequest {}).await.map_err(status_err)?.into_inner().proxies;
        let connected: Vec<_> = proxies.iter().filter(|p| SyncState::of(p).is_connected()).collect();
        if let Some(p) = connected.iter().find(|p| SyncState::of(p) == SyncState::Nacked) {
            bail!("{} ({}) rejected the policy: {}", p.identity, p.inbound_addr, p.last_nack);
        }
        let behind: Vec<_> = connected
            .iter()
            .filter(|p| p.policy_revision_evaluated < revision || SyncState::of(p) != SyncState::Synced)
            .map(|p| format!("{} ({})", p.identity, p.inbound_addr))
            .collect();
        if behind.is_empty() {
            eprintln!("in force on {}", in_force_on(connected.len()));
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("not in force within {} on: {}", humantime::format_duration(wait), behind.join(", "));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `1 connected proxy`, `3 connected proxies`: what `--wait` reports.
fn in_force_on(connected: usize) -> String {
    palisade_cmd::plural(connected, "connected proxy", "connected proxies")
}

/// The request `authz check` and `route` ask about.
#[derive(Debug, clap::Args)]
pub(crate) struct RequestArgs {
    /// HTTP method of the request (any case: get is GET).
    #[arg(long, default_value = "GET", value_parser = parse_method)]
    pub(crate) method: String,
    /// Request path (with its query, if any), e.g. /api/orders.
    #[arg(long, default_value = "/")]
    pub(crate) path: String,
    /// Request header NAME=VALUE, repeatable.
    #[arg(long = "header")]
    pub(crate) headers: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuthzCmd {
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

/// An HTTP method token (RFC 9110), upper-cased: policies name methods in upper case.
fn parse_method(s: &str) -> Result<String, String> {
    let token = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err("not an HTTP method; use e.g. GET, POST, DELETE".into());
    }
    Ok(s.to_ascii_uppercase())
}

/// What `authz check` asks about.
#[derive(Debug)]
pub(crate) struct CheckRequest<'a> {
    pub(crate) from: &'a Option<String>,
    pub(crate) to: &'a str,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) headers: &'a [String],
    pub(crate) port: Option<u16>,
    pub(crate) principal: &'a Option<String>,
    pub(crate) api_key: &'a Option<String>,
    pub(crate) claims: &'a [String],
}

/// `authz check`: the simulate API.
pub(crate) async fn check(cli: &Online, r: CheckRequest<'_>) -> Result<()> {
    let hmap = pairs(r.headers, "header")?.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
    let resp = admin(cli)
        .await?
        .simulate(SimulateRequest {
            source: r.from.clone().unwrap_or_default(),
            target: r.to.to_string(),
            method: r.method.to_string(),
            path: r.path.to_string(),
            headers: hmap,
            port: r.port.map(u32::from).unwrap_or(0),
            principal: r.principal.clone().unwrap_or_default(),
            api_key: r.api_key.clone().unwrap_or_default(),
            claims: pairs(r.claims, "claim")?,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let v = serde_json::json!({
        "decision": resp.decision,
        "policy": (!resp.policy.is_empty()).then_some(&resp.policy),
        "rule": (resp.rule >= 0).then_some(resp.rule),
        "reason": resp.reason,
        "rate_limits": resp.rate_limits,
        "request_changes": resp.request_changes,
        "response_changes": resp.response_changes,
        "cors": (!resp.cors.is_empty()).then_some(&resp.cors),
    });
    if cli.output != Output::Table {
        return print_value(cli.output, &v);
    }
    outln!("decision:    {}", resp.decision);
    outln!("policy:      {}", if resp.policy.is_empty() { "-" } else { &resp.policy });
    outln!("rule:        {}", if resp.rule >= 0 { resp.rule.to_string() } else { "-".into() });
    outln!("reason:      {}", resp.reason);
    for l in &resp.rate_limits {
        outln!("rate limit:  {l}");
    }
    for c in &resp.request_changes {
        outln!("request:     {c}");
    }
    for c in &resp.response_changes {
        outln!("response:    {c}");
    }
    if !resp.cors.is_empty() {
        outln!("cors:        {}", resp.cors);
    }
    Ok(())
}

/// `NAME=VALUE` pairs of a repeatable flag.
pub(crate) fn pairs(list: &[String], flag: &str) -> Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    for h in list {
        let (k, v) = h.split_once('=').ok_or_else(|| crate::usage(format!("--{flag} {h:?}: expected NAME=VALUE")))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_wait_counts_proxies_in_english() {
        assert_eq!(super::in_force_on(1), "1 connected proxy");
        assert_eq!(super::in_force_on(2), "2 connected proxies");
    }

    #[test]
    fn methods_are_tokens_in_upper_case() {
        assert_eq!(super::parse_method("get").unwrap(), "GET");
        assert!(super::parse_method("GE T").is_err());
        assert!(super::parse_method("").is_err());
    }
}
